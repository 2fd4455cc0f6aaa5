//! The target-agnostic pipeline: a target plans *weights* — each a lazy row-range recipe ([`Op`]) over the
//! source checkpoint, stored as a group of tensors ([`Part`]s: packed values, scales, zero points, ...) — and
//! encodes row chunks of them ([`Target`]); the pipeline's [`engine`] chunks, computes in parallel a window at a
//! time, and hands the chunks in order to the artifact's container. For Hugging Face-style directories of
//! safetensors shards (vLLM/SGLang compressed-tensors, MLX), [`exec`] writes every part at its place in the shard
//! set (`sling_formats::st_write::sink`), then the extra files, the manifest and the model card, and renames the
//! finished directory into place.
//!
//! The lazy row-range recipe itself ([`ops`]: [`Op`], [`ops::Src`], [`ops::Mxfp4Repack`]) is shared by every
//! target and by the calibration forward pass. The execution engine ([`engine`]: chunks, the parallel window,
//! the writer thread) is shared by every target too: the GGUF target (`sling_target_gguf`) runs it with its own
//! [`engine::Container`] (a GGUF file set and its journal), the Hugging Face-style targets through [`exec`]
//! (a safetensors shard set).
//!
//! This crate never names a target: everything target-specific comes through the [`Target`] trait.

use sling_core::{DType, Role};

pub mod engine;
pub mod exec;
pub mod hf;
pub mod ops;
pub mod solved;

pub use ops::Op;

pub use exec::{execute, Event, ExecError, ExecOptions, ExecReport, IndexStyle};

/// One stored tensor of an output weight, in the artifact's own naming and shape (PyTorch order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl Part {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<u64>) -> Part {
        Part { name: name.into(), dtype, shape }
    }
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn n_bytes(&self) -> u64 {
        self.dtype.bytes_for(self.numel()).unwrap_or(0)
    }
}

/// One weight of the output: values `[rows, cols]` computed by `op`, encoded by the target as `enc` into
/// `parts`. Rows are independent except in groups of `row_align` rows (a block scale spanning 128 rows, zero
/// points packed across 32 rows): chunks start at multiples of it.
#[derive(Clone, Debug)]
pub struct Weight<E> {
    /// What reports call it: the artifact's name of the weight (the source's name, or a stacked name).
    pub name: String,
    pub role: Role,
    pub op: Op,
    pub enc: E,
    pub parts: Vec<Part>,
    /// Source tensor names, for reports and provenance.
    pub sources: Vec<String>,
    pub row_align: u64,
}

impl<E> Weight<E> {
    pub fn rows(&self) -> u64 {
        self.op.rows()
    }
    pub fn cols(&self) -> u64 {
        self.op.cols()
    }
}

/// A weight the scheme cannot take, kept at source precision (listed in `plan`, the manifest and the card).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Kept {
    pub name: String,
    pub why: String,
}

/// A planned artifact.
#[derive(Clone, Debug)]
pub struct Plan<E> {
    /// In computation order (layer by layer).
    pub weights: Vec<Weight<E>>,
    /// Weights the scheme would quantize but cannot, kept at source precision.
    pub kept: Vec<Kept>,
    /// Notes for the user.
    pub notes: Vec<String>,
}

impl<E> Plan<E> {
    /// Folds AWQ's per-channel scales into the weights that read the tensors `folds` names (by source tensor name;
    /// [`Op::fold_sources`]), so that the target encodes the folded values. Returns the names no weight reads, in
    /// order: a fold the plan cannot apply (the caller refuses the run).
    pub fn fold(
        &mut self,
        folds: &std::collections::BTreeMap<String, std::sync::Arc<sling_quantizers::awq::Fold>>,
    ) -> Vec<String> {
        let mut hit = std::collections::BTreeSet::new();
        let f = |n: &str| folds.get(n).cloned();
        for w in &mut self.weights {
            let op = std::mem::replace(&mut w.op, Op::Concat(Vec::new()));
            w.op = op.fold_sources(&f, &mut hit);
        }
        folds.keys().filter(|k| !hit.contains(*k)).cloned().collect()
    }
}

/// Reasons a target refuses to plan an artifact (GGUF's conversion, vLLM/MLX's weights). Each names the tensor
/// or key involved.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no config.json next to the weights: sling needs it to know the architecture")]
    NoConfig,
    #[error("config.json: {0}")]
    Config(#[from] sling_core::ConfigError),
    #[error("architecture {arch} is not supported; sling converts: {supported}")]
    UnsupportedArch { arch: String, supported: String },
    /// The target (`target`: `"GGUF"`, …) has no name for this checkpoint tensor in this architecture.
    #[error("cannot map tensor {tensor} to a {target} name for this architecture")]
    Unmapped { tensor: String, target: &'static str },
    #[error("tensor {tensor}: shape {shape:?} disagrees with config.json ({why})")]
    Shape { tensor: String, shape: Vec<u64>, why: String },
    #[error("layer {layer}: expert tensors incomplete: {names:?}")]
    IncompleteExperts { layer: u64, names: Vec<String> },
    #[error("tensor {tensor}: {why}")]
    Unsupported { tensor: String, why: String },
    #[error("tensor {0} names a layer outside 0..num_hidden_layers")]
    BadLayer(String),
}

/// Bytes of a plan's parts.
pub fn plan_bytes<E>(p: &Plan<E>) -> u64 {
    p.weights.iter().flat_map(|w| &w.parts).map(Part::n_bytes).sum()
}

/// Why a chunk could not be encoded. The engine wraps it in [`ExecError::Encode`] with the weight's name.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A reference encoder refused the rows (shape, importance weights, type).
    #[error(transparent)]
    Quantize(#[from] sling_quantizers::EncodeError),
    /// The codes a solver stored upstream could not be read.
    #[error(transparent)]
    Solved(#[from] solved::SolvedError),
    /// The solved-weight store holds the weight on another grid than the one the target writes.
    #[error(
        "the solved-weight store holds {stored_cols} columns in groups of {stored_group}, the target writes {cols} \
         in groups of {group}"
    )]
    SolvedShape { stored_cols: usize, stored_group: usize, cols: usize, group: usize },
    /// A solved code lies outside the target's grid.
    #[error("a solved code of {weight} does not fit {bits} bits")]
    SolvedCode { weight: String, bits: u32 },
    /// The target's own encoder failed (a device, a kernel); its error, with its chain, is kept.
    #[error(transparent)]
    Target(Box<dyn std::error::Error + Send + Sync>),
}

impl EncodeError {
    /// Wraps a target's own error.
    pub fn target(e: impl std::error::Error + Send + Sync + 'static) -> EncodeError {
        EncodeError::Target(Box::new(e))
    }
}

/// An output target as a plug-in of the pipeline: how a weight's rows become its parts' bytes. Planning and
/// the artifact's other files are the target's own business (it hands the pipeline a [`Plan`] and a list of
/// files); the pipeline only chunks, computes, writes and records.
pub trait Target: Sync {
    /// What a weight's encoding is (scheme, group size, scale dtype ...), decided when planning.
    type Enc: Sync + Send + std::fmt::Debug + Clone;
    /// The target's execution error (the engine's own errors convert into it).
    type Error: From<ExecError> + Send;

    /// Whether encoding `enc` needs the weight's absolute maximum over all its elements (a pass over the
    /// weight before it is encoded, e.g. NVFP4's global scale).
    fn needs_amax(&self, _enc: &Self::Enc) -> bool {
        false
    }

    /// Weights whose amax is shared: weights with the same key get the largest amax of them all (NVFP4's global
    /// scale of the shards a runtime fuses into one layer, e.g. q/k/v or gate/up). `None`: the weight's own.
    fn amax_group(&self, _w: &Weight<Self::Enc>) -> Option<String> {
        None
    }

    /// Encodes whole rows `r0..r0 + vals.len() / cols` of `w` (`vals` row-major), appending each part's bytes
    /// for those rows to `out[i]` (`out.len() == w.parts.len()`). Row-independent parts (a shape, a global
    /// scale) are written with the chunk that starts at row 0. `amax` is given when [`Target::needs_amax`].
    fn encode(
        &self,
        w: &Weight<Self::Enc>,
        r0: u64,
        vals: &[f32],
        amax: Option<f32>,
        out: &mut [Vec<u8>],
    ) -> Result<(), EncodeError>;

    /// Rows per segment that a chunk must not cross (e.g. an expert's rows, encoded with that expert's
    /// importance weights); `None`: chunks only respect [`Weight::row_align`].
    fn segment_rows(&self, _w: &Weight<Self::Enc>) -> Option<u64> {
        None
    }

    /// Computes rows `r0..r1` of `w` as its parts' bytes, with a note when a non-finite value was let
    /// through. The default reads the values ([`engine::values`], NaN/Inf refused unless `allow_nonfinite`)
    /// and calls [`Target::encode`]; a target overrides it to take bytes straight from the source (a
    /// same-type copy, codes repacked) or to encode on another device.
    fn compute<'a>(
        &self,
        ck: &'a sling_formats::checkpoint::Checkpoint,
        w: &Weight<Self::Enc>,
        r0: u64,
        r1: u64,
        amax: Option<f32>,
        allow_nonfinite: bool,
    ) -> Result<(engine::Computed<'a>, Option<String>), Self::Error> {
        let (v, flag) = engine::values(ck, w, r0, r1, allow_nonfinite)?;
        let mut out = vec![Vec::new(); w.parts.len()];
        self.encode(w, r0, &v, amax, &mut out)
            .map_err(|source| ExecError::Encode { tensor: w.name.clone(), source })?;
        Ok((engine::Computed::Parts(out), flag))
    }
}
