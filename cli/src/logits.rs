//! `sling logits` (developer command): the calibration engine's forward pass on given token ids,
//! for parity tests against `transformers` (tests/interop/test_forward.py) and debugging.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sling_calibration::{CheckpointSource, Model, TensorSource};
use sling_formats::checkpoint::Checkpoint;

use crate::eval::Arithmetic;

pub const AFTER_HELP: &str =
    "Runs the CPU forward pass of the calibration engine (f32, layer by layer) and writes the logits \
of every position: a .npy file (float32, shape [tokens, vocab]; several --ids sequences are stacked one after the \
other) or a raw little-endian .f32 file. Without --out, prints the top token of every position. With --gguf, the \
weights are those of a GGUF converted from SRC, run as `sling eval` runs a candidate (--as).\n\nExamples:\n  \
sling logits fixtures/models/qwen3moe --ids 342,223,83,87 --out l.npy\n  \
sling logits fixtures/models/deepseekv3 --ids 1,2,3 --ids 4,5\n  \
sling convert fixtures/models/qwen3moe --type q8_0 --tokenizer-pre gpt-2 -o qwen3-q8_0.gguf\n  \
sling logits fixtures/models/qwen3moe --gguf qwen3-q8_0.gguf --ids 342,223,83,87 --as llama.cpp-cpu";

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory (config.json + safetensors), or a compressed-tensors / MLX directory
    /// written by `sling quantize --to vllm:… | mlx:…` (its weights dequantized by sling).
    src: PathBuf,
    /// Comma-separated token ids of one sequence; repeat for a batch.
    #[arg(long, required = true, value_parser = parse_ids)]
    ids: Vec<IdList>,
    /// Output file: .npy (float32 [tokens, vocab]) or .f32 (raw little-endian float32, row-major).
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// Run the weights of this GGUF file, converted from SRC (any shard of a split file), instead of SRC's.
    #[arg(long, value_name = "FILE")]
    gguf: Option<PathBuf>,
    /// With --gguf: llama.cpp-cpu (activations rounded as llama.cpp's CPU backend rounds them; the default) or
    /// weights (the dequantized weights in f32), as `sling eval --as`.
    #[arg(long = "as", value_name = "ARITHMETIC", default_value = "auto", requires = "gguf")]
    arithmetic: Arithmetic,
}

/// The token ids of one sequence.
#[derive(Clone, Debug)]
pub struct IdList(Vec<u32>);

fn parse_ids(raw: &str) -> std::result::Result<IdList, String> {
    let ids = raw
        .split(',')
        .map(|s| s.trim().parse::<u32>().map_err(|_| format!("{s:?} is not a token id")))
        .collect::<std::result::Result<Vec<u32>, String>>()?;
    if ids.is_empty() {
        return Err("no token ids".into());
    }
    Ok(IdList(ids))
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    let seqs: Vec<Vec<u32>> = a.ids.iter().map(|l| l.0.clone()).collect();
    if seqs.iter().any(Vec::is_empty) {
        bail!("--ids: every sequence needs at least one token id");
    }
    if let Some(out) = &a.out {
        let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "npy" && ext != "f32" {
            bail!("--out {}: the file name must end in .npy or .f32", out.display());
        }
    }
    // A compressed-tensors or MLX directory is read through sling's dequantizer; anything else as a checkpoint,
    // or with --gguf, as the GGUF converted from it.
    let artifact = if a.src.is_dir() { crate::dequantize::open(&a.src)? } else { None };
    if artifact.is_some() && a.gguf.is_some() {
        bail!("--gguf needs SRC to be the checkpoint it was converted from, not a vllm or mlx directory");
    }
    let arithmetic = a.arithmetic.resolve(a.gguf.is_some(), a.gguf.as_deref().unwrap_or(&a.src))?;
    let ck;
    let (plain, gguf);
    let (src, cfg): (&dyn TensorSource, _) = match &artifact {
        Some(art) => (art, art.0.ck.config.clone().with_context(|| format!("{}: no config.json", a.src.display()))?),
        None => {
            ck = Checkpoint::open(&a.src).with_context(|| format!("cannot open {}", a.src.display()))?;
            let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", a.src.display()))?;
            match &a.gguf {
                Some(path) => {
                    gguf = crate::eval::open_gguf(&ck, &a.src, path)?;
                    (&gguf, cfg)
                }
                None => {
                    plain = CheckpointSource::new(&ck);
                    (&plain, cfg)
                }
            }
        }
    };
    let model = Model::new(src, &cfg)
        .with_context(|| format!("{}: cannot run the forward pass", a.src.display()))?
        .llama_cpp_cpu(arithmetic == Arithmetic::LlamaCppCpu);
    let t0 = std::time::Instant::now();
    let logits = model.logits(&seqs, None).with_context(|| format!("{}: forward pass failed", a.src.display()))?;
    let vocab = model.spec().vocab;
    let n: usize = logits.iter().map(|l| l.nrows()).sum();
    let cols = logits.first().map_or(vocab, |l| l.ncols());
    if !quiet {
        eprintln!(
            "{}: {} sequence(s), {n} tokens, {} layers, {:.2}s",
            model.spec().arch.hf,
            seqs.len(),
            model.spec().n_layers,
            t0.elapsed().as_secs_f64()
        );
    }
    let Some(out) = &a.out else {
        let mut so = std::io::stdout().lock();
        for (si, l) in logits.iter().enumerate() {
            for (p, row) in l.rows().into_iter().enumerate() {
                let (best, v) =
                    row.iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) });
                writeln!(so, "seq {si} pos {p}: top {best} ({v:.4})")?;
            }
        }
        return Ok(());
    };
    let mut data = Vec::with_capacity(n * cols * 4);
    for l in &logits {
        for v in l.iter() {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    write_out(out, n, cols, &data)
}

fn write_out(out: &Path, rows: usize, cols: usize, data: &[u8]) -> Result<()> {
    let mut bytes = Vec::new();
    if out.extension().and_then(|e| e.to_str()) == Some("npy") {
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
        // magic (6) + version (2) + header length (2) + header, padded with spaces to 64 bytes, ending in \n
        let total = (10 + header.len() + 1).div_ceil(64) * 64;
        header.push_str(&" ".repeat(total - 10 - header.len() - 1));
        header.push('\n');
        bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
    }
    bytes.extend_from_slice(data);
    std::fs::write(out, bytes).with_context(|| format!("cannot write {}", out.display()))
}
