//! `sling eval`: perplexity, KL divergence, top-1 agreement and Δp of a candidate (a GGUF file, dequantized
//! per ggml type, or another HF checkpoint) against a reference HF checkpoint, with sling's own f32 forward
//! pass over both — the figures of `llama-perplexity --kl-divergence`, without a second tool or a saved
//! logits file. `--max-kld` makes it a gate (exit code 1).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sling_calibration::eval::{evaluate, EvalReport};
use sling_calibration::imatrix::chunks;
use sling_calibration::{CheckpointSource, GgufCandidate, Model, TensorSource};
use sling_formats::checkpoint::Checkpoint;
use sling_target_gguf::convert::plan::{plan, OutType};

use crate::textdata::{self, Tokens};

/// Exit code: the candidate failed the `--max-kld` gate.
pub const EXIT_GATE_FAILED: u8 = 1;

/// `quantize --eval --max-kld`: the artifact was written but fails the gate (exit code [`EXIT_GATE_FAILED`]).
#[derive(Debug)]
pub struct GateFailed {
    pub kld: f64,
    pub max: f64,
}

impl std::fmt::Display for GateFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the mean KLD {:.6} is above --max-kld {} (the artifact and its figures are kept)",
            self.kld, self.max
        )
    }
}

impl std::error::Error for GateFailed {}

pub const AFTER_HELP: &str = "Tokenizes the text with the reference's tokenizer.json, cuts it into --ctx-token \
chunks as llama-perplexity does (the tail is dropped; with a BOS token, the first token of each chunk is replaced by \
BOS) and runs both models over them, layer by layer. Only the second half of every chunk is scored, as in \
llama-perplexity: PPL of both, KL divergence of the candidate's next-token distribution from the reference's \
(mean, median, 99th and 99.9th percentile, max), how often their most likely tokens agree (top-1), and Δp, the \
change in the probability of the actual next token.

A GGUF candidate must come from the reference checkpoint (sling convert/quantize, or convert_hf_to_gguf.py + \
llama-quantize): its tensors are dequantized per ggml type and mapped back to the checkpoint's layout with the \
converter's own plan. Split GGUF files are read from any shard. By default (--as llama.cpp-cpu) every matrix \
product of a GGUF candidate first rounds its activations as llama.cpp's CPU backend does (to 8-bit blocks against \
quantized weights, to bf16/f16 against bf16/f16 ones), so the figures are those llama-perplexity measures on a CPU \
(-ctk f32 -ctv f32 -fa off); --as weights runs the dequantized weights in f32 and measures the weights' error alone.

Exit codes: 0 done (and, with --max-kld, passed); 1 the mean KLD is above --max-kld; 2 usage or input error.

Examples (they run as written from the repository root, on its fixtures):
  sling quantize fixtures/models/qwen3moe --to gguf:Q4_K_M --tokenizer-pre gpt-2 -o qwen3-q4_k_m.gguf
  sling eval --ref fixtures/models/qwen3moe qwen3-q4_k_m.gguf --data tests/interop/data/eval.txt
  sling eval --ref fixtures/models/qwen3moe qwen3-q4_k_m.gguf --data tests/interop/data/calib.txt --ctx 64 --chunks 32 --max-kld 0.05 --json
  sling eval --ref fixtures/models/qwen3moe qwen3-q4_k_m.gguf --data tests/interop/data/eval.txt --as weights   # the weights' error alone
  sling quantize fixtures/models/qwen3moe --to mlx:4 -o qwen3-mlx-4bit
  sling eval --ref fixtures/models/qwen3moe qwen3-mlx-4bit --data tests/interop/data/eval.txt --ctx 256   # a vllm or mlx directory";

#[derive(clap::Args)]
pub struct Args {
    /// The reference: a Hugging Face model directory (its tokenizer.json tokenizes the text).
    #[arg(long = "ref", value_name = "SRC")]
    reference: PathBuf,
    /// The candidate: a GGUF file converted from the reference, or another HF model directory.
    candidate: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Fail (exit code 1) when the mean KL divergence is above this.
    #[arg(long, value_name = "X")]
    max_kld: Option<f64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Where the forward passes' large matrix products run: auto (a CUDA GPU with cuBLAS when one works, else
    /// the CPU), cpu, cuda or cuda:N. Figures agree with the CPU's within float tolerance.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: sling_kernels::Device,
    /// Device memory the products may use for their buffers, e.g. 8G.
    #[arg(long, value_name = "SIZE", default_value = "4G")]
    device_mem: String,
    /// What the candidate's forward pass computes: llama.cpp-cpu (a GGUF candidate's products with their
    /// activations rounded as llama.cpp's CPU backend rounds them, what llama-perplexity measures), weights
    /// (f32 products of the dequantized weights: the quantization error alone), or auto (llama.cpp-cpu for a
    /// GGUF file, weights for a directory).
    #[arg(long = "as", value_name = "ARITHMETIC", default_value = "auto")]
    pub arithmetic: Arithmetic,
}

/// What a candidate's forward pass computes (`--as`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    /// llama.cpp-cpu for a GGUF candidate, weights for a directory.
    Auto,
    /// f32 products of the dequantized weights.
    Weights,
    /// llama.cpp's CPU matrix products: activations rounded to the weight type's `vec_dot_type` first.
    #[value(name = "llama.cpp-cpu")]
    LlamaCppCpu,
}

impl Arithmetic {
    /// `auto` made concrete for a candidate that is (`gguf`) or is not a GGUF file; `llama.cpp-cpu` on a directory
    /// is an error (it has no ggml types to say how each product rounds).
    pub fn resolve(self, gguf: bool, candidate: &Path) -> Result<Arithmetic> {
        match (self, gguf) {
            (Arithmetic::Auto, true) => Ok(Arithmetic::LlamaCppCpu),
            (Arithmetic::Auto, false) => Ok(Arithmetic::Weights),
            (Arithmetic::LlamaCppCpu, false) => bail!(
                "--as llama.cpp-cpu needs a GGUF candidate (its ggml types say how llama.cpp rounds each product); {} \
                 is a directory",
                candidate.display()
            ),
            (a, _) => Ok(a),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arithmetic::Auto => "auto",
            Arithmetic::Weights => "weights",
            Arithmetic::LlamaCppCpu => "llama.cpp-cpu",
        }
    }
}

/// The evaluation text and its chunking (shared with `quantize --eval`).
#[derive(clap::Args, Clone, Debug)]
pub struct DataArgs {
    /// Evaluation text: a plain text file, or JSONL (.jsonl) with a "text" field per line.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Token ids instead of text: comma/whitespace-separated integers in a file.
    #[arg(long, conflicts_with = "data")]
    pub tokens: Option<PathBuf>,
    /// Tokens per chunk (llama-perplexity -c).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// At most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
}

/// One evaluation's figures and what they were measured on (the `quality` record of a manifest).
pub struct Outcome {
    pub report: EvalReport,
    pub json: serde_json::Value,
}

/// The token chunks of `d`, tokenized with `reference`'s tokenizer.
pub(crate) fn load_chunks(reference: &Path, d: &DataArgs) -> Result<(Tokens, Vec<Vec<u32>>)> {
    if d.ctx < 4 {
        bail!("--ctx must be at least 4");
    }
    let t = textdata::load(reference, d.data.as_deref(), d.tokens.as_deref())?;
    if t.ids.len() < 2 * d.ctx {
        bail!(
            "{} tokenizes to only {} tokens; a context of {} needs at least {} (as llama-perplexity)",
            t.dataset,
            t.ids.len(),
            d.ctx,
            2 * d.ctx
        );
    }
    let c = chunks(&t.ids, d.ctx, d.chunks, t.bos);
    Ok((t, c))
}

/// The GGUF file `path` read in the names of the checkpoint `ck` (at `src`) it was converted from, through the
/// converter's own plan (shared by `eval` and `logits --gguf`).
pub(crate) fn open_gguf<'a>(ck: &'a Checkpoint, src: &Path, path: &Path) -> Result<GgufCandidate<'a>> {
    let p = plan(ck, OutType::F32)
        .with_context(|| format!("{}: cannot plan its conversion to map the GGUF back", src.display()))?;
    GgufCandidate::open(CheckpointSource::new(ck), p.tensors, path)
        .with_context(|| format!("cannot read {}", path.display()))
}

/// Evaluates `candidate` against `reference` on `d`.
pub fn run_eval(
    reference: &Path,
    candidate: &Path,
    d: &DataArgs,
    arithmetic: Arithmetic,
    quiet: bool,
    backend: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
) -> Result<Outcome> {
    let (tokens, chunk_list) = load_chunks(reference, d)?;
    let ck = Checkpoint::open(reference).with_context(|| format!("cannot open {}", reference.display()))?;
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", reference.display()))?;
    let arithmetic = arithmetic.resolve(!candidate.is_dir(), candidate)?;
    let ref_src = CheckpointSource::new(&ck);
    // llama-perplexity's base logits are llama.cpp's too (an F32 file: no rounded products, but ggml's RMSNorm).
    let ref_model = Model::new(&ref_src, &cfg)
        .with_context(|| format!("{}: cannot run the forward pass", reference.display()))?
        .with_backend(backend.clone())
        .llama_cpp_cpu(arithmetic == Arithmetic::LlamaCppCpu);
    let vocab = ref_src
        .shape("model.embed_tokens.weight")
        .and_then(|s| s.first().copied())
        .with_context(|| format!("{}: no model.embed_tokens.weight", reference.display()))? as usize;

    // The candidate: a GGUF file (read back through the reference's conversion plan) or an HF checkpoint.
    let cand_ck;
    let cand_gguf;
    let cand_hf;
    let cand_art = if candidate.is_dir() { crate::dequantize::open(candidate)? } else { None };
    let (cand_src, cand_cfg): (&dyn TensorSource, _) = if let Some(art) = &cand_art {
        // A compressed-tensors or MLX directory: its weights dequantized by sling.
        let c = art.0.ck.config.clone().with_context(|| format!("{}: no config.json", candidate.display()))?;
        (art, c)
    } else if candidate.is_dir() {
        cand_ck = Checkpoint::open(candidate).with_context(|| format!("cannot open {}", candidate.display()))?;
        let c = cand_ck.config.clone().with_context(|| format!("{}: no config.json", candidate.display()))?;
        cand_hf = CheckpointSource::new(&cand_ck);
        (&cand_hf, c)
    } else {
        cand_gguf = open_gguf(&ck, reference, candidate)?;
        (&cand_gguf, cfg.clone())
    };
    let cand_model = Model::new(cand_src, &cand_cfg)
        .with_context(|| format!("{}: cannot run the forward pass", candidate.display()))?
        .with_backend(backend)
        .llama_cpp_cpu(arithmetic == Arithmetic::LlamaCppCpu);

    let t0 = std::time::Instant::now();
    let n = chunk_list.len();
    let bar = progress_bar(n as u64, quiet);
    let report = evaluate(&ref_model, &cand_model, &chunk_list, d.ctx, vocab, |done, total| match &bar {
        Some(b) => b.set_position(done as u64),
        None if !quiet => eprintln!("eval: {done}/{total} chunks, {:.1}s", t0.elapsed().as_secs_f64()),
        None => {}
    })
    .with_context(|| format!("evaluating {} against {}", candidate.display(), reference.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut json = report.to_json();
    let data_sha = match (&d.data, &d.tokens) {
        (Some(p), _) | (None, Some(p)) => sling_provenance::manifest::hash_file(p).ok().map(|(_, h)| h),
        _ => None,
    };
    if let Some(o) = json.as_object_mut() {
        o.insert("tool".into(), "sling eval".into());
        o.insert("reference".into(), reference.display().to_string().into());
        o.insert("candidate".into(), candidate.display().to_string().into());
        o.insert("data".into(), tokens.dataset.clone().into());
        if let Some(h) = data_sha {
            o.insert("data_sha256".into(), h.into());
        }
        o.insert("bos".into(), tokens.bos.into());
        o.insert("arithmetic".into(), arithmetic.name().into());
        o.insert("seconds".into(), t0.elapsed().as_secs_f64().into());
    }
    Ok(Outcome { report, json })
}

/// A bar with ETA on a terminal; `None` otherwise (then plain lines, unless quiet).
fn progress_bar(n: u64, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let b = indicatif::ProgressBar::new(n);
    if let Ok(style) = indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} chunks, {per_sec}, ETA {eta}")
    {
        b.set_style(style);
    }
    Some(b)
}

/// Human summary on stderr.
pub fn print_report(r: &EvalReport, dataset: &str) {
    eprintln!(
        "{} chunks x {} tokens of {dataset}, {} positions scored (second half of each chunk)",
        r.chunks, r.ctx, r.tokens
    );
    eprintln!("  PPL            {:>12.4}  (reference {:.4}, ln ratio {:+.6})", r.ppl, r.ppl_ref, r.ln_ppl_ratio);
    eprintln!(
        "  KLD            {:>12.6}  ± {:.6}  (median {:.6}, p99 {:.6}, p99.9 {:.6}, max {:.6})",
        r.kld_mean, r.kld_mean_err, r.kld_median, r.kld_p99, r.kld_p999, r.kld_max
    );
    eprintln!("  same top-1     {:>11.3} %", 100.0 * r.top1);
    eprintln!(
        "  Δp             {:>+11.3} %  (RMS {:.3} %, max |Δp| {:.3} %)",
        100.0 * r.dp_mean,
        100.0 * r.dp_rms,
        100.0 * r.dp_max_abs
    );
}

/// Whether `r` passes `max_kld`; prints the verdict.
pub fn gate(r: &EvalReport, max_kld: Option<f64>, quiet: bool) -> bool {
    let Some(x) = max_kld else { return true };
    let pass = r.kld_mean <= x;
    if !quiet || !pass {
        eprintln!(
            "gate: mean KLD {:.6} {} --max-kld {x}: {}",
            r.kld_mean,
            if pass { "<=" } else { ">" },
            if pass { "pass" } else { "FAIL" }
        );
    }
    pass
}

/// `--max-kld` must be a number >= 0 (not NaN).
pub fn check_max_kld(x: Option<f64>) -> Result<()> {
    if x.is_some_and(|x| !(x >= 0.0)) {
        bail!("--max-kld must be a number >= 0");
    }
    Ok(())
}

pub fn run(a: Args, quiet: bool) -> Result<u8> {
    check_max_kld(a.max_kld)?;
    let backend = crate::convert::calibration_backend(a.device, &a.device_mem)?;
    let o = run_eval(&a.reference, &a.candidate, &a.data, a.arithmetic, quiet, backend)?;
    if !quiet {
        let ds = o.json.get("data").and_then(|v| v.as_str()).unwrap_or("").to_string();
        print_report(&o.report, &ds);
    }
    let pass = gate(&o.report, a.max_kld, quiet);
    if a.json {
        let mut j = o.json;
        if let (Some(obj), Some(x)) = (j.as_object_mut(), a.max_kld) {
            obj.insert("max_kld".into(), x.into());
            obj.insert("pass".into(), pass.into());
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
    }
    Ok(if pass { 0 } else { EXIT_GATE_FAILED })
}
