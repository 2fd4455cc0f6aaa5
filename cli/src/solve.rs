//! `--method gptq|awq` for `--to vllm:…|mlx:…`: the calibrated quantization that runs before the pipeline
//! writes the artifact. The calibration pass (`sling_calibration::gptq`) solves every quantized weight layer by
//! layer into a store beside the output (`OUT.solve/`); the target then packs the stored codes instead of
//! rounding to nearest. The store survives an interrupted run for `--resume` (with a fingerprint of everything
//! that decides its contents) and is removed once the artifact is complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Why the calibration flags are refused for GGUF.
pub const GGUF_REFUSAL: &str = "--method, --data and the GPTQ/AWQ flags apply to vllm:… and mlx:… targets; GGUF \
     calibrates through an importance matrix: `sling calibrate SRC --data FILE -o imatrix.gguf`, then `--imatrix`";

/// How the integer schemes choose their codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Round to nearest (no calibration data).
    Rtn,
    /// GPTQ: Hessian-based error compensation per linear layer and routed expert.
    Gptq,
    /// AWQ: activation-aware per-channel scales, folded into the preceding norm or linear.
    Awq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
        }
    }
}

/// Calibrated quantization for vllm/mlx integer schemes (w4a16, w4a16-asym, w8a16, mlx:BITS).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SolveArgs {
    /// vllm/mlx integer schemes: how codes are chosen: rtn, gptq, awq. Default: gptq with --data (or --tokens),
    /// rtn without.
    #[arg(long, value_enum)]
    pub(crate) method: Option<Method>,
    /// Calibration text for --method gptq|awq: a plain text file, or JSONL (.jsonl) with a "text" field per line.
    #[arg(long, value_name = "FILE")]
    pub(crate) data: Option<PathBuf>,
    /// Calibration token ids instead of text: comma/whitespace-separated integers in a file.
    #[arg(long, value_name = "FILE", conflicts_with = "data")]
    pub(crate) tokens: Option<PathBuf>,
    /// Tokens per calibration sequence (llm-compressor's max_seq_length).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub(crate) ctx: usize,
    /// At most this many calibration sequences (llm-compressor's num_calibration_samples; default: all).
    #[arg(long, value_name = "N")]
    pub(crate) chunks: Option<usize>,
    /// GPTQ dampening: this fraction of the Hessian's mean diagonal is added to its diagonal.
    #[arg(long, value_name = "X", default_value_t = 0.01)]
    pub(crate) damp: f64,
    /// GPTQ block width in columns (error compensation is applied lazily per block).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub(crate) gptq_block_size: usize,
    /// GPTQ: quantize columns in order of decreasing activation energy (llm-compressor actorder="weight":
    /// groups stay consecutive columns, so no g_idx is stored and every runtime loads it).
    #[arg(long)]
    pub(crate) act_order: bool,
    /// Statistics of every routed expert from every calibration token (llm-compressor's calibrate_all_experts);
    /// the forward pass keeps the true routing.
    #[arg(long)]
    pub(crate) all_experts: bool,
    /// A routed expert that received fewer calibration tokens falls back to round-to-nearest (reported in the
    /// run summary, the manifest and the model card).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub(crate) min_expert_tokens: u64,
    /// Calibrate each layer on the source model's activations instead of those of the already-quantized layers
    /// before it (default: sequential, as llm-compressor).
    #[arg(long)]
    pub(crate) no_sequential: bool,
    /// Memory budget for one layer's calibration statistics (e.g. 64G): routed experts are calibrated in groups
    /// that fit, running the layer again per group.
    #[arg(long, value_name = "SIZE")]
    pub(crate) max_ram: Option<String>,
}

impl SolveArgs {
    /// The method asked for, resolved against the data given.
    pub fn method(&self) -> Result<Method> {
        let has_data = self.data.is_some() || self.tokens.is_some();
        match (self.method, has_data) {
            (None, true) => Ok(Method::Gptq),
            (None, false) | (Some(Method::Rtn), false) => Ok(Method::Rtn),
            (Some(Method::Rtn), true) => bail!("--data/--tokens are calibration data: --method rtn uses none"),
            (Some(m), false) => bail!("--method {} needs calibration data: --data FILE (or --tokens FILE)", m.name()),
            (Some(m), true) => Ok(m),
        }
    }

    /// Whether any calibration flag was given (refused for GGUF targets, which calibrate through --imatrix).
    pub fn any(&self) -> bool {
        self.method.is_some()
            || self.data.is_some()
            || self.tokens.is_some()
            || self.act_order
            || self.all_experts
            || self.no_sequential
            || self.max_ram.is_some()
            || self.chunks.is_some()
    }
}

/// `OUT` → `OUT.solve` beside it: where the solved weights wait for the executor.
pub fn store_dir(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".solve");
    output.with_file_name(name)
}

/// sha256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sling_formats::gguf::write::hex(&h.finalize()))
}
