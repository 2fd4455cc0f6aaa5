//! What a re-derivation (`sling verify --source SRC`, with `--sample N` or `--full`) reports, and the hook
//! through which [`super::verify_with`] asks the artifact's target for it. The target rebuilds its plan from the
//! source and the options the manifest records, checks the manifest's tensors (and metadata) against it and
//! recomputes a sample of tensors, or all of them: GGUF's is `sling_target_gguf::rederive::run`, vLLM/MLX
//! directories' is the CLI's (`cli/src/hfout.rs`), which knows the targets.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::{Manifest, Problem, Rederive};

/// Tensors `sling verify --source` re-derives when `--sample` is not given.
pub const DEFAULT_SAMPLE: usize = 8;

/// The outcome of a re-derivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RederiveStatus {
    /// The plan, the metadata and every re-derived tensor match.
    Verified,
    /// At least one `rederived_*` problem (or the imatrix given differs).
    Mismatch,
    /// The re-derivation could not be made (`error` says why).
    NotChecked,
}

/// What re-deriving found (the problems themselves are in the report's `problems`).
#[derive(Clone, Debug, Serialize)]
pub struct RederiveReport {
    pub status: RederiveStatus,
    /// `sample` or `full`.
    pub mode: &'static str,
    /// The sample size asked for (`sample` mode).
    pub sample: Option<usize>,
    /// What the plan was rebuilt as: `convert q8_0`, `quantize Q4_K_M`, … (none if it could not be).
    pub plan: Option<String>,
    /// The tensors whose bytes were recomputed, in file order.
    pub tensors: Vec<String>,
    /// Whether the first output's metadata was compared with the plan's.
    pub metadata_checked: bool,
    /// The imatrix file used (`--imatrix`), when the artifact was quantized with one.
    pub imatrix: Option<String>,
    /// Why it could not be made, for `not_checked`.
    pub error: Option<String>,
}

/// What a re-derivation works on.
pub struct RederiveInputs<'a> {
    pub manifest: &'a Manifest,
    /// The manifest's directory (where the outputs are).
    pub dir: &'a Path,
    pub source: &'a Path,
    /// Never [`Rederive::Off`].
    pub mode: Rederive,
    /// `verify --imatrix`.
    pub imatrix: Option<&'a Path>,
    /// `verify --data`: the calibration data of a `--method gptq` artifact.
    pub data: Option<&'a Path>,
    /// Whether re-hashing the source files found one that differs or is missing.
    pub sources_differ: bool,
    /// The sha256 of each tensor's bytes as found in the output files, by name.
    pub file_hashes: &'a HashMap<String, String>,
}

/// A target's re-derivation: re-derives as the inputs say, pushes what differs to `problems` (and remarks to
/// `notes`) and reports what it did.
pub type Rederiver<'r> = dyn Fn(&RederiveInputs<'_>, &mut Vec<Problem>, &mut Vec<String>) -> RederiveReport + 'r;
