//! `sling convert`.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::SplitPolicy;
use sling_provenance::manifest::Tool;
use sling_target_gguf::convert::{convert, ConvertError, ConvertOptions, ConvertReport, Event, OutType};

pub const AFTER_HELP: &str = "Examples (they run as written from the repository root, on its fixtures; with a real \
checkpoint give its directory, e.g. ./DeepSeek-V3, and drop --tokenizer-pre, which the fixtures' tiny tokenizer needs):
  sling convert fixtures/models/qwen3moe --to gguf --tokenizer-pre gpt-2 -o qwen3-bf16.gguf
  sling convert fixtures/models/deepseekv3 --to gguf --type q8_0 --split-max-size 100K --tokenizer-pre gpt-2 -o ds-v3-q8_0.gguf
  sling convert fixtures/models/mixtral --to gguf --type f16 --tokenizer-pre gpt-2 --json -o mixtral-f16.gguf

Types: f32, f16, bf16 (default), q8_0 — the same as convert_hf_to_gguf.py --outtype, with the same bytes. \
Norms, biases and routers stay f32; for q8_0, rows whose length is not a multiple of 32 fall back to f16, as the \
reference converter does.

Sources: bf16/f16/f32 safetensors, DeepSeek FP8 (weight_scale_inv blocks, dequantized on the fly) and gpt-oss \
MXFP4 experts (copied as MXFP4). Nothing is loaded whole: memory stays bounded whatever the model size.

The output is written as OUT.partial (with a journal, OUT.partial.json) and renamed only when complete and hashed; \
the source is never written. A conversion that was killed or failed with --resume is continued by running it again \
with --resume: finished tensors are re-hashed and reused, and the result is byte-identical to an uninterrupted run \
(docs/pipeline.md).

Provenance: OUT.sling.json is written beside the output (one for all shards, named after OUT) once the output is \
in place: sling version and commit, options, sha256 of every source and output file and of every tensor. Check an \
artifact with `sling verify OUT.gguf` (docs/manifest.md). A model card, README.md (or OUT-stem.README.md when a \
README.md of something else is there), is written beside it and hashed in the manifest.

Reproducible: the same source and options give byte-identical files for any -t and any run, except the manifest's \
`created` time, which --reproducible leaves out and SOURCE_DATE_EPOCH pins (docs/reproducibility.md).

Pipelines: --progress json prints one JSON object per line on stderr (start, tensor, warning, done or error), \
--events FILE writes them to a file (docs/pipeline.md). Exit codes: 0 ok, 2 usage, input or output error (disk \
full, read-only output), 3 internal error.";

/// Flags shared by `convert` and `quantize`: resume, progress/events, reproducibility, model card.
#[derive(clap::Args)]
pub struct PipelineArgs {
    /// Continue an interrupted conversion of the same source and options from OUT.partial (finished
    /// tensors are re-hashed before they are reused); if this run fails too, its partial files are kept.
    /// Without --resume, partial files of an earlier run are replaced.
    #[arg(long)]
    pub resume: bool,
    /// Progress on stderr: auto (a bar with bytes, rate and ETA when stderr is a terminal, nothing
    /// otherwise), json (one JSON object per line: start, tensor, warning, done/error), none.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "json", "none"])]
    pub progress: String,
    /// Also write the JSON-lines events to FILE (as --progress json prints them).
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Leave the creation time out of the manifest and model card, so that every file is
    /// byte-identical across runs (SOURCE_DATE_EPOCH, if set, is recorded instead).
    #[arg(long)]
    pub reproducible: bool,
    /// Do not write the model card (README.md) beside the output.
    #[arg(long)]
    pub no_model_card: bool,
    /// Where blocks are quantized: auto (a CUDA GPU when one works, else the CPU, saying why), cpu, cuda or
    /// cuda:N (an error when that GPU cannot start). The output bytes are the same on every device
    /// (docs/kernels.md); `sling doctor` shows what this machine offers.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: sling_kernels::Device,
    /// Device memory the GPU backend may use for its buffers, e.g. 8G (larger windows run in row groups).
    #[arg(long, value_name = "SIZE", default_value = "4G")]
    pub device_mem: String,
}

impl PipelineArgs {
    /// Opens the backend `--device` asks for. With `auto`, a GPU that cannot be used is reported once as a
    /// warning (as an info line when this build has no CUDA support at all).
    pub fn backend(&self, rep: &Reporter) -> Result<std::sync::Arc<dyn sling_kernels::Backend>> {
        let options = sling_kernels::DeviceOptions { mem_limit: parse_size(&self.device_mem)?, ..Default::default() };
        let sel = sling_kernels::backend::open(self.device, &options).with_context(|| {
            format!("--device {}: cannot use it (`sling doctor` says what this machine has)", self.device)
        })?;
        match &sel.fallback {
            // No GPU support or no driver: nothing to tell a CPU-only user on every run.
            Some(e @ (sling_kernels::DeviceError::NotBuilt | sling_kernels::DeviceError::NoDriver(_))) => {
                tracing::info!("--device auto: {e}; using the CPU")
            }
            Some(e) => rep.warn(&format!("--device auto: no usable GPU ({e}); using the CPU")),
            None if sel.backend.is_gpu() => tracing::info!("quantizing on {}", sel.backend.describe()),
            None => {}
        }
        Ok(sel.backend)
    }

    /// The backend for calibration's products (the forward pass, GPTQ's Hessians): [`calibration_backend`].
    pub fn calibration_backend(&self) -> Result<Option<std::sync::Arc<dyn sling_kernels::Backend>>> {
        calibration_backend(self.device, &self.device_mem)
    }
}

/// The backend whose device runs calibration's large products: `Some` when `--device` gives a GPU with cuBLAS,
/// `None` for the CPU. `auto` falls back to the CPU and says why (a GPU without cuBLAS); an explicit `cuda` that
/// cannot start or has no cuBLAS is an error. Results agree with the CPU's within float tolerance.
pub fn calibration_backend(
    device: sling_kernels::Device,
    device_mem: &str,
) -> Result<Option<std::sync::Arc<dyn sling_kernels::Backend>>> {
    let options = sling_kernels::DeviceOptions { mem_limit: parse_size(device_mem)?, ..Default::default() };
    let sel = sling_kernels::backend::open(device, &options)
        .with_context(|| format!("--device {device}: cannot use it (`sling doctor` says what this machine has)"))?;
    match &sel.fallback {
        Some(e @ (sling_kernels::DeviceError::NotBuilt | sling_kernels::DeviceError::NoDriver(_))) => {
            tracing::info!("--device auto: {e}; the forward pass runs on the CPU")
        }
        Some(e) => tracing::warn!("--device auto: no usable GPU ({e}); the forward pass runs on the CPU"),
        None => {}
    }
    match sel.backend.gemm() {
        Ok(Some(g)) => {
            tracing::info!("forward-pass products on {} ({})", sel.backend.describe(), g.describe());
            Ok(Some(sel.backend))
        }
        Ok(None) => Ok(None),
        // Not yet verified on a GPU: nothing to warn about on every run of a default setting.
        Err(e @ sling_kernels::DeviceError::Unverified(_)) if device == sling_kernels::Device::Auto => {
            tracing::info!("--device auto: {e}; the forward pass runs on the CPU");
            Ok(None)
        }
        Err(e) if device == sling_kernels::Device::Auto => {
            tracing::warn!("--device auto: {e}; the forward pass runs on the CPU");
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("--device {device}: cannot calibrate on it"))),
    }
}

impl PipelineArgs {
    /// The manifest's `created`: `SOURCE_DATE_EPOCH` if set, none with --reproducible, else now.
    pub fn created(&self) -> Result<Option<u64>> {
        match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.trim().is_empty() => {
                let n: u64 = v.trim().parse().with_context(|| {
                    format!("SOURCE_DATE_EPOCH={v:?} is not a whole number of seconds since 1970-01-01")
                })?;
                Ok(Some(n))
            }
            _ if self.reproducible => Ok(None),
            _ => Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())),
        }
    }
}

/// Exit code for an error: 3 for internal errors, 2 for everything else (usage, input, output).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let internal = e.chain().any(|c| {
        matches!(c.downcast_ref::<ConvertError>(), Some(ConvertError::WriterPanicked))
            || matches!(c.downcast_ref::<sling_pipeline::ExecError>(), Some(sling_pipeline::ExecError::WriterPanicked))
    });
    if internal {
        3
    } else if e.chain().any(|c| c.downcast_ref::<crate::eval::GateFailed>().is_some()) {
        crate::eval::EXIT_GATE_FAILED
    } else {
        crate::EXIT_INPUT
    }
}

/// Where progress goes: a bar on a terminal, JSON lines on stderr and/or a file, warnings.
pub struct Reporter {
    t0: Instant,
    command: &'static str,
    json_stderr: bool,
    file: Option<Mutex<std::io::BufWriter<File>>>,
    bar: ProgressBar,
    quiet: bool,
}

impl Reporter {
    pub fn new(command: &'static str, p: &PipelineArgs, quiet: bool, json_summary: bool) -> Result<Reporter> {
        let file = match &p.events {
            Some(path) => Some(Mutex::new(std::io::BufWriter::new(
                File::create(path).with_context(|| format!("cannot create the events file {}", path.display()))?,
            ))),
            None => None,
        };
        let json_stderr = p.progress == "json";
        let bar_on = p.progress == "auto" && !quiet && !json_summary && std::io::stderr().is_terminal();
        Ok(Reporter { t0: Instant::now(), command, json_stderr, file, bar: progress_bar(!bar_on), quiet })
    }

    /// Whether JSON lines are being written (to stderr or a file).
    pub fn json(&self) -> bool {
        self.json_stderr || self.file.is_some()
    }

    /// Writes one event (adding `event` and `elapsed`) as a JSON line.
    pub fn emit(&self, event: &str, fields: Value) {
        if !self.json() {
            return;
        }
        let mut obj = serde_json::Map::new();
        obj.insert("event".into(), event.into());
        obj.insert("elapsed".into(), json!((self.t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0));
        if let Value::Object(m) = fields {
            obj.extend(m);
        }
        let line = Value::Object(obj).to_string();
        if self.json_stderr {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(e, "{line}");
        }
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                let _ = writeln!(f, "{line}");
                let _ = f.flush();
            }
        }
    }

    /// A warning: an event in JSON mode, a log line otherwise.
    pub fn warn(&self, message: &str) {
        if self.json() {
            self.emit("warning", json!({ "message": message }));
        }
        if !self.json_stderr {
            tracing::warn!("{message}");
        }
    }

    /// A human-readable line on stderr (not in JSON mode, not with -q).
    pub fn say(&self, message: &str) {
        if !self.quiet && !self.json_stderr {
            self.bar.suspend(|| eprintln!("{message}"));
        }
    }

    /// Handles one event of the conversion.
    pub fn on_event(&self, src: &Path, label: &str, ev: &Event<'_>) {
        match ev {
            Event::Start { tensors, bytes, outputs, resumed } => {
                self.bar.set_length(*bytes);
                self.emit(
                    "start",
                    json!({
                        "tool": "sling",
                        "version": env!("CARGO_PKG_VERSION"),
                        "command": self.command,
                        "source": src,
                        "outputs": outputs,
                        "type": label,
                        "tensors": tensors,
                        "bytes": bytes,
                        "threads": rayon::current_num_threads(),
                        "resumed_tensors": resumed.tensors,
                        "resumed_bytes": resumed.bytes,
                    }),
                );
                if let Some(note) = &resumed.note {
                    self.warn(&format!("--resume: {note}"));
                }
                if resumed.tensors > 0 {
                    self.say(&format!(
                        "resuming: {} of {tensors} tensors ({:.2} GB) re-checked and reused from the interrupted run",
                        resumed.tensors,
                        resumed.bytes as f64 / 1e9
                    ));
                }
            }
            Event::Bytes { done, total } => {
                self.bar.set_length(*total);
                self.bar.set_position(*done);
            }
            Event::Tensor { index, of, name, dtype, bytes, done_bytes, total_bytes, reused } => {
                self.bar.set_message(name.to_string());
                if *reused {
                    self.bar.set_position(*done_bytes);
                }
                self.emit(
                    "tensor",
                    json!({
                        "index": index,
                        "of": of,
                        "name": name,
                        "type": dtype.name(),
                        "bytes": bytes,
                        "done_bytes": done_bytes,
                        "total_bytes": total_bytes,
                        "reused": reused,
                    }),
                );
            }
            Event::Stage(stage) => {
                self.bar.set_message(stage.to_string());
                self.emit("stage", json!({ "stage": stage }));
            }
        }
    }

    /// Progress bar: total bytes.
    pub fn set_length(&self, n: u64) {
        self.bar.set_length(n);
    }

    /// Progress bar: bytes done, and what is being worked on.
    pub fn set_position(&self, n: u64, message: &str) {
        self.bar.set_position(n);
        self.bar.set_message(message.to_string());
    }

    /// Progress bar: what is being worked on.
    pub fn set_message(&self, message: &str) {
        self.bar.set_message(message.to_string());
    }

    /// Removes the progress bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// The final event of a successful run.
    pub fn done(&self, report: &ConvertReport, extra: Value) {
        self.bar.finish_and_clear();
        let mut fields = json!({
            "outputs": report.written.files.iter().map(|f| json!({
                "path": f.path, "size": f.size, "sha256": f.sha256,
            })).collect::<Vec<_>>(),
            "manifest": report.manifest,
            "model_card": report.model_card,
            "tensors": report.n_tensors,
            "bytes": report.bytes_out,
            "resumed_tensors": report.resumed.tensors,
            "seconds": self.t0.elapsed().as_secs_f64(),
        });
        if let (Value::Object(m), Value::Object(x)) = (&mut fields, extra) {
            m.extend(x);
        }
        self.emit("done", fields);
    }

    /// The final event of a failed run (the error itself is printed by `main`).
    pub fn error(&self, e: &anyhow::Error) {
        self.bar.finish_and_clear();
        let message = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
        self.emit("error", json!({ "message": message, "exit_code": exit_code(e) }));
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Source: a Hugging Face model directory or a .safetensors file.
    src: PathBuf,
    /// Target format.
    #[arg(long, default_value = "gguf", value_parser = ["gguf"])]
    to: String,
    /// Output tensor type (like convert_hf_to_gguf.py --outtype).
    #[arg(long = "type", visible_alias = "outtype", default_value = "bf16", value_parser = ["f32", "f16", "bf16", "q8_0"])]
    out_type: String,
    /// Output file (with splits: the first shard's base name, shards are NAME-0000i-of-0000N.gguf).
    #[arg(short, long = "output", visible_alias = "outfile")]
    output: PathBuf,
    /// Maximum size of each output shard, e.g. 50G, 500M (like --split-max-size).
    #[arg(long, value_name = "SIZE")]
    split_max_size: Option<String>,
    /// Maximum number of tensors per output shard (like --split-max-tensors).
    #[arg(long, value_name = "N")]
    split_max_tensors: Option<usize>,
    /// Convert even if weights hold NaN or Inf (each such tensor is reported).
    #[arg(long)]
    allow_nonfinite: bool,
    /// Do not write the provenance manifest OUT.sling.json (skips hashing the source files and the
    /// output; `sling verify` then cannot check the artifact).
    #[arg(long)]
    no_manifest: bool,
    /// tokenizer.ggml.pre to write when the tokenizer is not one llama.cpp knows by hash
    /// (e.g. gpt-2, llama-bpe, qwen2, deepseek-v3).
    #[arg(long, value_name = "NAME")]
    tokenizer_pre: Option<String>,
    /// Print a JSON summary on stdout (logs and progress go to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

/// Parses 500M, 50G, 1.5T, 1000 (bytes) like gguf-split's --split-max-size.
/// `--split-max-size` / `--split-max-tensors` (as llama-gguf-split and convert_hf_to_gguf.py take them).
pub fn split_policy(max_size: Option<&str>, max_tensors: Option<usize>) -> Result<SplitPolicy> {
    Ok(match (max_size, max_tensors) {
        (Some(_), Some(_)) => bail!("use either --split-max-size or --split-max-tensors, not both"),
        (Some(s), None) => SplitPolicy::MaxBytes(parse_size(s)?),
        (None, Some(n)) if n > 0 => SplitPolicy::MaxTensors(n),
        (None, Some(_)) => bail!("--split-max-tensors must be at least 1"),
        (None, None) => SplitPolicy::None,
    })
}

pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1e3),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('G' | 'g') => (&s[..s.len() - 1], 1e9),
        Some('T' | 't') => (&s[..s.len() - 1], 1e12),
        _ => (s, 1.0),
    };
    let n: f64 = num.parse().with_context(|| format!("invalid size {s:?} (examples: 500M, 50G)"))?;
    if !(n > 0.0) {
        bail!("invalid size {s:?}: must be positive");
    }
    Ok((n * mult) as u64)
}

/// This build of sling, as the manifest names it.
pub fn tool() -> Tool {
    Tool {
        name: "sling".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        git_commit: env!("SLING_GIT_COMMIT").into(),
    }
}

/// A byte progress bar on stderr (hidden when asked, and by indicatif when stderr is not a terminal).
pub fn progress_bar(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    let rep = Reporter::new("convert", &a.pipeline, quiet, a.json)?;
    let r = run_with(&a, quiet, &rep);
    if let Err(e) = &r {
        rep.error(e);
    }
    r
}

fn run_with(a: &Args, quiet: bool, rep: &Reporter) -> Result<()> {
    let out_type = OutType::parse(&a.out_type).context("unknown --type")?;
    let split = split_policy(a.split_max_size.as_deref(), a.split_max_tensors)?;
    let t0 = Instant::now();
    let created = a.pipeline.created()?;
    let ck = Checkpoint::open(&a.src).with_context(|| format!("cannot read checkpoint {}", a.src.display()))?;
    let opts = ConvertOptions {
        split,
        allow_nonfinite: a.allow_nonfinite,
        tokenizer_pre: a.tokenizer_pre.clone(),
        provenance: (!a.no_manifest).then(tool),
        resume: a.pipeline.resume,
        created,
        model_card: !a.no_manifest && !a.pipeline.no_model_card,
        backend: Some(a.pipeline.backend(rep)?),
        ..ConvertOptions::new(out_type, a.output.clone())
    };
    let label = out_type.dtype().name().to_string();
    let report = convert(&ck, &opts, &|ev| rep.on_event(&a.src, &label, ev))
        .with_context(|| format!("cannot convert {}", a.src.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    for n in &report.notes {
        if n.starts_with(sling_target_gguf::convert::naming::MODEL_CARD_NOTE) {
            rep.warn(n);
        } else {
            tracing::info!("{n}");
        }
    }
    for n in &report.nonfinite {
        rep.warn(n);
    }
    rep.done(&report, json!({}));
    if a.json {
        let v = json!({
            "outputs": report.outputs,
            "manifest": report.manifest,
            "model_card": report.model_card,
            "type": a.out_type,
            "tensors": report.n_tensors,
            "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out,
            "resumed_tensors": report.resumed.tensors,
            "seconds": secs,
            "notes": report.notes,
            "nonfinite": report.nonfinite,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !quiet {
        rep.say(&format!(
            "wrote {} ({} tensors, {:.2} GB) in {:.1}s, {:.2} GB/s of input",
            written_list(&report),
            report.n_tensors,
            report.bytes_out as f64 / 1e9,
            secs,
            report.bytes_in as f64 / 1e9 / secs.max(1e-9)
        ));
    }
    Ok(())
}

/// The files written, for the summary line.
pub fn written_list(report: &ConvertReport) -> String {
    report
        .outputs
        .iter()
        .chain(&report.manifest)
        .chain(&report.model_card)
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M").unwrap(), 500_000_000);
        assert_eq!(parse_size("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1G").is_err());
    }
}
