//! `sling calibrate`: an importance matrix (llama-imatrix's GGUF format) from sling's own f32 forward pass
//! (crate calibration/), for `sling quantize --imatrix` and `llama-quantize --imatrix`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sling_calibration::imatrix::{chunks, ImatrixCollector};
use sling_calibration::spec::Ffn;
use sling_calibration::{CheckpointSource, LinearInput, Model, Observer};
use sling_formats::checkpoint::Checkpoint;

pub const AFTER_HELP: &str = "Tokenizes the text with the model's tokenizer.json, cuts it into --ctx-token chunks \
as llama-imatrix does (the tail is dropped; with a BOS token, the first token of each chunk is replaced by BOS), runs \
the forward pass over them and sums the squared inputs of every linear layer (per routed expert, counting one per \
token and routed slot), following llama-imatrix's rules: routed experts and every blk.* matrix, not the output \
head. The file is llama.cpp's GGUF imatrix (in_sum2 + counts per tensor).\n\nCoverage: the report (stderr; \
stdout with --json) lists per MoE layer the experts the routing sent no token to (written with count 0: \
llama-quantize then gives them uniform importance weights) and those under 10% of the layer's mean. \
--all-experts also sends every token through every routed expert for the statistics (the forward pass keeps the \
true routing): every expert gets statistics from all tokens and a count equal to the number of tokens; this is not \
what llama-imatrix computes, and costs about n_experts/top_k times the routed experts' work.\n\n\
Progress: a bar with chunks, tokens/s and ETA when stderr is a terminal, a line per batch (and every 30 s) \
otherwise; -q for none.\n\nExamples (they run as written from the repository root, on its fixtures):\n  \
sling calibrate fixtures/models/qwen3moe --data tests/interop/data/calib.txt -o imatrix.gguf\n  \
sling calibrate fixtures/models/qwen3moe --data tests/interop/data/calib.txt --all-experts -o imatrix-all.gguf\n  \
sling calibrate fixtures/models/deepseekv3 --data tests/interop/data/calib.txt --ctx 64 --chunks 8 -o im.gguf --json";

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory (config.json + safetensors + tokenizer.json).
    src: PathBuf,
    /// Calibration text: a plain text file, or JSONL (.jsonl) with a "text" field per line.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Token ids instead of text: comma/whitespace-separated integers in a file.
    #[arg(long, conflicts_with = "data")]
    tokens: Option<PathBuf>,
    /// Output imatrix file (GGUF).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Tokens per chunk (llama-imatrix -c).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// At most this many chunks (default: all).
    #[arg(long)]
    chunks: Option<usize>,
    /// Also collect output.weight (llama-imatrix --process-output).
    #[arg(long)]
    process_output: bool,
    /// Statistics of every routed expert from every token (the forward pass keeps the true routing), so
    /// that no expert is left without: counts = tokens. Not llama-imatrix's statistics; costs about
    /// n_experts/top_k times the routed experts' work.
    #[arg(long)]
    all_experts: bool,
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Where the forward pass's large matrix products run: auto (a CUDA GPU with cuBLAS when one works, else the
    /// CPU, saying why), cpu, cuda or cuda:N. GPU sums agree with the CPU's within float tolerance
    /// (docs/kernels.md, "Calibration"), not bit for bit.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: sling_kernels::Device,
    /// Device memory the products may use for their buffers, e.g. 8G.
    #[arg(long, value_name = "SIZE", default_value = "4G")]
    device_mem: String,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    if a.ctx == 0 {
        bail!("--ctx must be > 0");
    }
    let ck = Checkpoint::open(&a.src).with_context(|| format!("cannot open {}", a.src.display()))?;
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", a.src.display()))?;
    let t = crate::textdata::load(&a.src, a.data.as_deref(), a.tokens.as_deref())?;
    let (tokens, dataset, bos) = (t.ids, t.dataset, t.bos);
    if tokens.len() < 2 * a.ctx {
        bail!(
            "{dataset} tokenizes to only {} tokens; a context of {} needs at least {} (as llama-imatrix)",
            tokens.len(),
            a.ctx,
            2 * a.ctx
        );
    }
    let chunks = chunks(&tokens, a.ctx, a.chunks, bos);
    let src = CheckpointSource::new(&ck);
    let backend = crate::convert::calibration_backend(a.device, &a.device_mem)?;
    let model = Model::new(&src, &cfg)
        .with_context(|| format!("{}: cannot run the forward pass", a.src.display()))?
        .all_experts(a.all_experts)
        .with_backend(backend.clone());
    let spec = model.spec();
    let n_experts =
        spec.ffn.iter().find_map(|f| if let Ffn::Moe(m) = f { Some(m.n_experts) } else { None }).unwrap_or(0);
    let mut col = ImatrixCollector::new(n_experts);
    col.process_output = a.process_output;
    // llama-imatrix: n_batch 2048 → max(1, 2048 / n_ctx) chunks per decode.
    let per_batch = (2048 / a.ctx).max(1);
    let t0 = Instant::now();
    let mut progress = Progress::new(chunks.len(), a.ctx, spec.n_layers, quiet, a.json);
    for batch in chunks.chunks(per_batch) {
        col.begin_batch(batch.iter().map(Vec::len).sum());
        progress.begin_batch(batch.len());
        let mut obs = Tracked { col: &mut col, progress: &mut progress };
        // The output head only runs when its input is wanted (--process-output).
        let r = if a.process_output {
            model.logits(batch, Some(&mut obs)).map(drop)
        } else {
            model.hidden_states(batch, Some(&mut obs)).map(drop)
        };
        r.with_context(|| format!("{}: forward pass failed", a.src.display()))?;
        progress.end_batch();
    }
    progress.finish();
    for w in &col.warnings {
        tracing::warn!("{w}");
    }
    let chunk_size = a.ctx as u32;
    col.save(&a.out, std::slice::from_ref(&dataset), chunk_size)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", a.out.display()))?;
    let secs = t0.elapsed().as_secs_f64();

    // Coverage report: routed tokens per expert per MoE layer (the true routing, also with --all-experts).
    let n_tok = chunks.len() * a.ctx;
    let coverage = col.coverage(FEW);
    let mut json_layers = Vec::new();
    let (mut n_zero, mut n_few, mut layers_zero, mut n_exp) = (0, 0, 0, 0);
    for c in &coverage {
        n_zero += c.zero.len();
        n_few += c.few.len();
        n_exp += c.counts.len();
        layers_zero += usize::from(!c.zero.is_empty());
        if !quiet {
            eprintln!(
                "  layer {:>3}: {} experts, routed tokens per expert min {} max {} mean {:.1}{}{}",
                c.layer,
                c.counts.len(),
                c.min,
                c.max,
                c.mean,
                if c.zero.is_empty() { String::new() } else { format!(", {} unused {:?}", c.zero.len(), c.zero) },
                if c.few.is_empty() {
                    String::new()
                } else {
                    format!(", {} under {:.0}% of mean {:?}", c.few.len(), FEW * 100.0, c.few)
                },
            );
        }
        json_layers.push(serde_json::json!({
            "layer": c.layer, "tensor": spec.expert_gguf_name(c.layer, 2), "counts": c.counts, "zero": c.zero,
            "few": c.few, "min": c.min, "max": c.max, "mean": c.mean,
        }));
    }
    if !quiet {
        if !coverage.is_empty() {
            let what = if a.all_experts {
                format!("--all-experts: every expert's statistics cover all {n_tok} tokens")
            } else if n_zero > 0 {
                "unused experts get count 0 (uniform importance weights); --all-experts or more data covers them".into()
            } else {
                "every expert got tokens".into()
            };
            eprintln!(
                "  coverage: {n_zero} of {n_exp} experts unused (in {layers_zero} of {} MoE layers), {n_few} under \
                 {:.0}% of their layer's mean; {what}",
                coverage.len(),
                FEW * 100.0
            );
        }
        eprintln!(
            "{}: {} chunks x {} tokens = {n_tok} tokens, {} entries, {secs:.2}s ({:.1} tokens/s) -> {}",
            spec.arch.hf,
            chunks.len(),
            a.ctx,
            col.stats.len(),
            n_tok as f64 / secs.max(1e-9),
            a.out.display()
        );
    }
    let act = activation_stats(&col.stats);
    if !quiet {
        if let Some(w) = act.iter().max_by(|x, y| x.outlier_ratio.total_cmp(&y.outlier_ratio)) {
            eprintln!(
                "  activations: mean x² over {} tensors {:.3e}..{:.3e}; largest max/mean column ratio {:.1} at {}{} column {}",
                act.len(),
                act.iter().map(|t| t.mean_sq).fold(f64::INFINITY, f64::min),
                act.iter().map(|t| t.mean_sq).fold(0.0, f64::max),
                w.outlier_ratio,
                w.tensor,
                w.max_matrix.map_or(String::new(), |m| format!(" (matrix {m})")),
                w.max_column
            );
        }
    }
    if a.json {
        let tensors: Vec<serde_json::Value> = act
            .iter()
            .map(|t| {
                serde_json::json!({
                    "tensor": t.tensor, "mean_sq": t.mean_sq, "max_sq": t.max_sq, "max_column": t.max_column,
                    "max_matrix": t.max_matrix, "outlier_ratio": t.outlier_ratio, "zero_columns": t.zero_columns,
                })
            })
            .collect();
        let report = serde_json::json!({
            "activations": tensors,
            "out": a.out.display().to_string(),
            "dataset": dataset,
            "tokens_in_data": tokens.len(),
            "bos": bos,
            "chunks": chunks.len(),
            "chunk_size": chunk_size,
            "chunk_count": col.chunk_count(chunk_size),
            "tokens": n_tok,
            "entries": col.stats.len(),
            "all_experts": a.all_experts,
            "experts": json_layers,
            "coverage": {
                "moe_layers": coverage.len(), "experts": n_exp, "unused": n_zero, "few": n_few,
                "layers_with_unused": layers_zero, "few_fraction": FEW,
            },
            "seconds": secs,
            "tokens_per_second": n_tok as f64 / secs.max(1e-9),
            "device": device_json(backend.as_deref()),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// `--json`'s `device`: where the products ran, and how many (with their floating-point operations) went to the
/// device; the rest ran on the CPU.
fn device_json(b: Option<&dyn sling_kernels::Backend>) -> serde_json::Value {
    match b.and_then(|b| b.gemm().ok().flatten().map(|g| (b, g))) {
        Some((b, g)) => {
            let (calls, flops) = g.counters();
            serde_json::json!({ "backend": b.describe(), "gpu": true, "gemm": g.describe(), "device_products": calls, "device_gflop": flops / 1e9 })
        }
        None => serde_json::json!({ "backend": "cpu", "gpu": false, "device_products": 0, "device_gflop": 0.0 }),
    }
}

/// Per-tensor activation statistics from the imatrix sums: the mean of x² per input column (sum / count), over
/// every matrix (expert or head) with data.
struct ActStat {
    tensor: String,
    /// Mean over columns (and matrices) of the per-column mean x².
    mean_sq: f64,
    /// The largest per-column mean x², its column, and its matrix (expert or head) where there are several.
    max_sq: f64,
    max_column: usize,
    max_matrix: Option<usize>,
    /// `max_sq / mean_sq`: how much one input channel dominates (outlier channels make low-bit quants hard).
    outlier_ratio: f64,
    /// Columns whose x² was always 0.
    zero_columns: usize,
}

fn activation_stats(stats: &std::collections::BTreeMap<String, sling_calibration::imatrix::Stat>) -> Vec<ActStat> {
    let mut out = Vec::new();
    for (name, s) in stats {
        if s.ne0 == 0 || s.sums.is_empty() {
            continue;
        }
        let n_mat = s.sums.len() / s.ne0;
        let (mut total, mut n, mut max, mut at, mut zero) = (0.0, 0usize, f64::NEG_INFINITY, (0, 0), 0);
        for m in 0..n_mat {
            let c = if s.counts.len() == n_mat { s.counts[m] } else { s.counts.first().copied().unwrap_or(0) };
            if c == 0 {
                continue;
            }
            for (j, &v) in s.sums[m * s.ne0..(m + 1) * s.ne0].iter().enumerate() {
                let v = v / c as f64;
                total += v;
                n += 1;
                zero += usize::from(v == 0.0);
                if v > max {
                    max = v;
                    at = (m, j);
                }
            }
        }
        if n == 0 {
            continue;
        }
        let mean = total / n as f64;
        out.push(ActStat {
            tensor: name.clone(),
            mean_sq: mean,
            max_sq: max,
            max_column: at.1,
            max_matrix: (n_mat > 1).then_some(at.0),
            outlier_ratio: if mean > 0.0 { max / mean } else { 0.0 },
            zero_columns: zero,
        });
    }
    out
}

/// "Few tokens": under this fraction of the layer's mean.
const FEW: f64 = 0.1;

/// Forwards to the collector and reports each finished layer to the progress display.
struct Tracked<'a> {
    col: &'a mut ImatrixCollector,
    progress: &'a mut Progress,
}

impl Observer for Tracked<'_> {
    fn linear_input(&mut self, x: &LinearInput<'_>) {
        self.col.linear_input(x);
    }
    fn routing(&mut self, layer: usize, counts: &[u64]) {
        self.col.routing(layer, counts);
    }
    fn layer_done(&mut self, layer: usize) {
        self.progress.layer_done(layer);
    }
}

/// Progress on stderr: a bar (chunks, tokens/s, ETA) when stderr is a terminal, otherwise a line per batch
/// and every 30 s within a long batch; nothing with -q. Counted in layer passes of a chunk, so that the ETA
/// moves within a batch of chunks.
struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    t0: Instant,
    last_line: Instant,
    chunks: usize,
    ctx: usize,
    layers: usize,
    /// Chunks of the batches finished, and of the batch running.
    done: usize,
    batch: usize,
    /// Layers of the running batch finished.
    layer: usize,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(30);

    fn new(chunks: usize, ctx: usize, layers: usize, quiet: bool, json: bool) -> Progress {
        let bar_on = !quiet && !json && std::io::stderr().is_terminal();
        let bar = bar_on.then(|| {
            let b = ProgressBar::with_draw_target(Some((chunks * layers.max(1)) as u64), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        let now = Instant::now();
        Progress {
            lines: !quiet && bar.is_none(),
            bar,
            t0: now,
            last_line: now,
            chunks,
            ctx,
            layers: layers.max(1),
            done: 0,
            batch: 0,
            layer: 0,
        }
    }

    /// Chunks finished, counting the running batch's finished layers as a fraction.
    fn chunks_done(&self) -> f64 {
        self.done as f64 + self.batch as f64 * self.layer as f64 / self.layers as f64
    }

    fn rate(&self) -> f64 {
        self.chunks_done() * self.ctx as f64 / self.t0.elapsed().as_secs_f64().max(1e-9)
    }

    fn eta(&self) -> Option<f64> {
        let d = self.chunks_done();
        (d > 0.0 && d < self.chunks as f64).then(|| self.t0.elapsed().as_secs_f64() * (self.chunks as f64 - d) / d)
    }

    fn begin_batch(&mut self, n: usize) {
        self.batch = n;
        self.layer = 0;
        self.update();
    }

    fn layer_done(&mut self, layer: usize) {
        self.layer = (layer + 1).min(self.layers);
        self.update();
        if self.lines && self.last_line.elapsed() >= Self::EVERY && self.layer < self.layers {
            self.line(&format!(
                ", chunks {}-{} at layer {}/{}",
                self.done + 1,
                self.done + self.batch,
                self.layer,
                self.layers
            ));
        }
    }

    fn end_batch(&mut self) {
        self.done += self.batch;
        self.batch = 0;
        self.layer = 0;
        self.update();
        if self.lines {
            self.line("");
        }
    }

    fn update(&self) {
        if let Some(b) = &self.bar {
            b.set_position((self.chunks_done() * self.layers as f64).round() as u64);
            let d = self.chunks_done();
            let d = if d.fract() == 0.0 { format!("{d}") } else { format!("{d:.1}") };
            b.set_message(format!("{d}/{} chunks, {:.1} tokens/s", self.chunks, self.rate()));
        }
    }

    fn line(&mut self, extra: &str) {
        self.last_line = Instant::now();
        let eta = self.eta().map_or(String::new(), |e| format!(", ETA {e:.0}s"));
        eprintln!(
            "calibrate: {}/{} chunks{extra}, {:.1} tokens/s, {:.1}s{eta}",
            self.done,
            self.chunks,
            self.rate(),
            self.t0.elapsed().as_secs_f64()
        );
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
