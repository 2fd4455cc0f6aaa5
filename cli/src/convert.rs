//! `sling convert`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sling_formats::checkpoint::Checkpoint;
use sling_formats::convert::{convert, ConvertOptions, OutType};
use sling_formats::gguf::SplitPolicy;
use sling_formats::manifest::Tool;

pub const AFTER_HELP: &str = "Examples:
  sling convert ./Qwen3-30B-A3B --to gguf -o qwen3-30b-a3b-bf16.gguf
  sling convert ./DeepSeek-V3 --to gguf --type q8_0 --split-max-size 50G -o ds-v3-q8_0.gguf
  sling convert ./Mixtral-8x7B --to gguf --type f16 --json -o mixtral-f16.gguf

Types: f32, f16, bf16 (default), q8_0 — the same as convert_hf_to_gguf.py --outtype, with the same bytes. \
Norms, biases and routers stay f32; for q8_0, rows whose length is not a multiple of 32 fall back to f16, as the \
reference converter does.

Sources: bf16/f16/f32 safetensors, DeepSeek FP8 (weight_scale_inv blocks, dequantized on the fly) and gpt-oss \
MXFP4 experts (copied as MXFP4). Nothing is loaded whole: memory stays bounded whatever the model size.

The output is written to a temporary file next to OUT and renamed only when complete; the source is never written.

Provenance: OUT.sling.json is written beside the output (one for all shards, named after OUT) once the output is \
in place: sling version and commit, options, sha256 of every source and output file and of every tensor. Check an \
artifact with `sling verify OUT.gguf` (docs/manifest.md).";

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
}

/// Parses 500M, 50G, 1.5T, 1000 (bytes) like gguf-split's --split-max-size.
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
    Tool { name: "sling".into(), version: env!("CARGO_PKG_VERSION").into(), git_commit: env!("SLING_GIT_COMMIT").into() }
}

/// A byte progress bar on stderr (hidden when asked, and by indicatif when stderr is not a terminal).
pub fn progress_bar(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    let out_type = OutType::parse(&a.out_type).context("unknown --type")?;
    let split = match (&a.split_max_size, a.split_max_tensors) {
        (Some(_), Some(_)) => bail!("use either --split-max-size or --split-max-tensors, not both"),
        (Some(s), None) => SplitPolicy::MaxBytes(parse_size(s)?),
        (None, Some(n)) if n > 0 => SplitPolicy::MaxTensors(n),
        (None, Some(_)) => bail!("--split-max-tensors must be at least 1"),
        (None, None) => SplitPolicy::None,
    };
    let t0 = Instant::now();
    let ck = Checkpoint::open(&a.src).with_context(|| format!("cannot read checkpoint {}", a.src.display()))?;
    let bar = progress_bar(quiet || a.json);
    let opts = ConvertOptions {
        out_type,
        output: a.output.clone(),
        split,
        allow_nonfinite: a.allow_nonfinite,
        tokenizer_pre: a.tokenizer_pre.clone(),
        window: None,
        provenance: (!a.no_manifest).then(tool),
    };
    let report = convert(&ck, &opts, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("cannot convert {}", a.src.display()))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    for n in &report.notes {
        tracing::info!("{n}");
    }
    for n in &report.nonfinite {
        tracing::warn!("{n}");
    }
    if a.json {
        let v = serde_json::json!({
            "outputs": report.outputs,
            "manifest": report.manifest,
            "type": a.out_type,
            "tensors": report.n_tensors,
            "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out,
            "seconds": secs,
            "notes": report.notes,
            "nonfinite": report.nonfinite,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !quiet {
        eprintln!(
            "wrote {} ({} tensors, {:.2} GB) in {:.1}s, {:.2} GB/s of input",
            report.outputs.iter().chain(&report.manifest).map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            report.n_tensors,
            report.bytes_out as f64 / 1e9,
            secs,
            report.bytes_in as f64 / 1e9 / secs.max(1e-9)
        );
    }
    Ok(())
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
