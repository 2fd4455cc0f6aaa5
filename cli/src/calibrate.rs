//! `sling calibrate`: an importance matrix (llama-imatrix's GGUF format) from sling's own f32 forward pass
//! (crate calibration/), for `sling quantize --imatrix` and `llama-quantize --imatrix`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sling_calibration::imatrix::{chunks, ImatrixCollector};
use sling_calibration::spec::Ffn;
use sling_calibration::{CheckpointSource, Model};
use sling_formats::checkpoint::Checkpoint;

pub const AFTER_HELP: &str = "Tokenizes the text with the model's tokenizer.json, cuts it into --ctx-token chunks \
as llama-imatrix does (the tail is dropped; with a BOS token, the first token of each chunk is replaced by BOS), runs \
the forward pass over them and sums the squared inputs of every linear layer (per routed expert, counting one per \
token and routed slot), following llama-imatrix's rules: routed experts and every blk.* matrix, not the output \
head. The file is llama.cpp's GGUF imatrix (in_sum2 + counts per tensor).\n\nExamples:\n  \
sling calibrate ./Qwen3-30B-A3B --data calib.txt -o imatrix.gguf\n  \
sling calibrate fixtures/models/qwen3moe --data tests/interop/data/calib.txt --ctx 64 --chunks 8 -o /tmp/im.gguf --json";

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
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
}

fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        return Ok(raw);
    }
    let mut texts = Vec::new();
    for (i, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let t = v.get("text").and_then(|t| t.as_str());
        texts.push(t.with_context(|| format!("{}:{}: no \"text\" string", path.display(), i + 1))?.to_string());
    }
    Ok(texts.join("\n"))
}

/// BOS handling of llama.cpp's vocab: a BOS id in config.json and `add_bos_token` in tokenizer_config.json
/// (when absent: whether the tokenizer's own post-processor adds it).
fn bos_token(src: &Path, cfg: &serde_json::Value, tok: &tokenizers::Tokenizer) -> Option<u32> {
    let bos = cfg.get("bos_token_id").and_then(|v| v.as_u64())? as u32;
    let tc: Option<serde_json::Value> =
        std::fs::read_to_string(src.join("tokenizer_config.json")).ok().and_then(|s| serde_json::from_str(&s).ok());
    let add = match tc.as_ref().and_then(|t| t.get("add_bos_token")).and_then(|v| v.as_bool()) {
        Some(b) => b,
        None => tok.encode("a", true).ok().is_some_and(|e| e.get_ids().first() == Some(&bos)),
    };
    add.then_some(bos)
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    if a.ctx == 0 {
        bail!("--ctx must be > 0");
    }
    let ck = Checkpoint::open(&a.src).with_context(|| format!("cannot open {}", a.src.display()))?;
    let cfg = ck.config.clone().with_context(|| format!("{}: no config.json", a.src.display()))?;
    let cfg_json: serde_json::Value = std::fs::read_to_string(a.src.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let (tokens, dataset, bos) = match (&a.data, &a.tokens) {
        (Some(d), None) => {
            let tp = a.src.join("tokenizer.json");
            let tok = tokenizers::Tokenizer::from_file(&tp)
                .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tp.display()))?;
            let bos = bos_token(&a.src, &cfg_json, &tok);
            let text = read_text(d)?;
            let enc = tok
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("cannot tokenize {}: {e}", d.display()))?;
            let mut ids = Vec::with_capacity(enc.len() + 1);
            ids.extend(bos);
            ids.extend_from_slice(enc.get_ids());
            (ids, d.display().to_string(), bos)
        }
        (None, Some(t)) => {
            let raw = std::fs::read_to_string(t).with_context(|| format!("cannot read {}", t.display()))?;
            let ids = raw
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<u32>().with_context(|| format!("{}: {s:?} is not a token id", t.display())))
                .collect::<Result<Vec<u32>>>()?;
            (ids, t.display().to_string(), None)
        }
        _ => bail!("give the calibration text with --data FILE (or token ids with --tokens FILE)"),
    };
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
    let model = Model::new(&src, &cfg).with_context(|| format!("{}: cannot run the forward pass", a.src.display()))?;
    let spec = model.spec();
    let n_experts =
        spec.ffn.iter().find_map(|f| if let Ffn::Moe(m) = f { Some(m.n_experts) } else { None }).unwrap_or(0);
    let mut col = ImatrixCollector::new(n_experts);
    col.process_output = a.process_output;
    // llama-imatrix: n_batch 2048 → max(1, 2048 / n_ctx) chunks per decode.
    let per_batch = (2048 / a.ctx).max(1);
    let t0 = std::time::Instant::now();
    let mut done = 0;
    for batch in chunks.chunks(per_batch) {
        col.begin_batch(batch.iter().map(Vec::len).sum());
        // The output head only runs when its input is wanted (--process-output).
        let r = if a.process_output {
            model.logits(batch, Some(&mut col)).map(drop)
        } else {
            model.hidden_states(batch, Some(&mut col)).map(drop)
        };
        r.with_context(|| format!("{}: forward pass failed", a.src.display()))?;
        done += batch.len();
        if !quiet {
            eprintln!("calibrate: {done}/{} chunks, {:.1}s", chunks.len(), t0.elapsed().as_secs_f64());
        }
    }
    for w in &col.warnings {
        tracing::warn!("{w}");
    }
    let chunk_size = a.ctx as u32;
    col.save(&a.out, std::slice::from_ref(&dataset), chunk_size)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", a.out.display()))?;

    // Report: tokens per expert per layer (from each layer's ffn_down_exps, or the first *_exps entry).
    let n_tok = chunks.len() * a.ctx;
    let mut layers = Vec::new();
    for (name, s) in &col.stats {
        if !name.ends_with("_exps.weight") || s.counts.len() < 2 {
            continue;
        }
        let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
        if layers.iter().any(|(l, _, _)| *l == layer) {
            continue;
        }
        layers.push((layer, name.clone(), s.counts.clone()));
    }
    let mut json_layers = Vec::new();
    for (layer, name, counts) in &layers {
        let total: u64 = counts.iter().sum();
        let mean = total as f64 / counts.len() as f64;
        let zero: Vec<usize> = (0..counts.len()).filter(|&e| counts[e] == 0).collect();
        let few: Vec<usize> = (0..counts.len()).filter(|&e| counts[e] > 0 && (counts[e] as f64) < 0.1 * mean).collect();
        let (mn, mx) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
        if !quiet {
            let l = layer.map_or("?".into(), |l| l.to_string());
            eprintln!(
                "  layer {l:>3}: {} experts, tokens per expert min {mn} max {mx} mean {mean:.1}{}{}",
                counts.len(),
                if zero.is_empty() { String::new() } else { format!(", {} unused {:?}", zero.len(), zero) },
                if few.is_empty() { String::new() } else { format!(", {} under 10% of mean {:?}", few.len(), few) },
            );
        }
        json_layers.push(serde_json::json!({
            "layer": layer, "tensor": name, "counts": counts, "zero": zero, "few": few,
            "min": mn, "max": mx, "mean": mean,
        }));
    }
    if !quiet {
        eprintln!(
            "{}: {} chunks x {} tokens = {n_tok} tokens, {} entries, {:.2}s -> {}",
            spec.arch.hf,
            chunks.len(),
            a.ctx,
            col.stats.len(),
            t0.elapsed().as_secs_f64(),
            a.out.display()
        );
    }
    if a.json {
        let report = serde_json::json!({
            "out": a.out.display().to_string(),
            "dataset": dataset,
            "tokens_in_data": tokens.len(),
            "bos": bos,
            "chunks": chunks.len(),
            "chunk_size": chunk_size,
            "chunk_count": col.chunk_count(chunk_size),
            "tokens": n_tok,
            "entries": col.stats.len(),
            "experts": json_layers,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
