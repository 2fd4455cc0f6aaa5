//! Calibration and evaluation text: a plain text or JSONL file tokenized with the model's `tokenizer.json`
//! (BOS as llama.cpp's vocab adds it), or token ids given directly. Shared by `calibrate` and `eval`.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Token ids of a data file.
pub struct Tokens {
    pub ids: Vec<u32>,
    /// The file, as given (recorded in imatrix files and quality figures).
    pub dataset: String,
    /// The BOS id when the vocab adds one (chunks then start with it).
    pub bos: Option<u32>,
}

/// A plain text file, or JSONL (`.jsonl`) with a `"text"` string per line (joined with newlines).
pub fn read_text(path: &Path) -> Result<String> {
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

/// `tok.encode(text, add_special)`, with a panic of the tokenizers library (it panics on some tokenizer.json
/// contents; the `tokenizer_json` fuzz target found one) caught: `None` then, for the caller to report.
fn encode(
    tok: &tokenizers::Tokenizer,
    text: &str,
    add_special: bool,
) -> Option<tokenizers::Result<tokenizers::Encoding>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tok.encode(text, add_special))).ok()
}

/// BOS handling of llama.cpp's vocab: a BOS id in config.json and `add_bos_token` in tokenizer_config.json
/// (when absent: whether the tokenizer's own post-processor adds it).
pub fn bos_token(src: &Path, cfg: &serde_json::Value, tok: &tokenizers::Tokenizer) -> Option<u32> {
    let bos = cfg.get("bos_token_id").and_then(|v| v.as_u64())? as u32;
    let tc: Option<serde_json::Value> =
        std::fs::read_to_string(src.join("tokenizer_config.json")).ok().and_then(|s| serde_json::from_str(&s).ok());
    let add = match tc.as_ref().and_then(|t| t.get("add_bos_token")).and_then(|v| v.as_bool()) {
        Some(b) => b,
        None => encode(tok, "a", true).and_then(|r| r.ok()).is_some_and(|e| e.get_ids().first() == Some(&bos)),
    };
    add.then_some(bos)
}

/// Tokenizes `data` with `src`'s tokenizer (a BOS first when the vocab adds one), or reads token ids
/// (comma/whitespace-separated integers) from `tokens`.
pub fn load(src: &Path, data: Option<&Path>, tokens: Option<&Path>) -> Result<Tokens> {
    match (data, tokens) {
        (Some(d), None) => {
            let cfg: serde_json::Value = std::fs::read_to_string(src.join("config.json"))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            let tp = src.join("tokenizer.json");
            let tok = tokenizers::Tokenizer::from_file(&tp)
                .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tp.display()))?;
            let bos = bos_token(src, &cfg, &tok);
            let text = read_text(d)?;
            let enc = encode(&tok, text.as_str(), false)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "cannot tokenize {}: the tokenizers library failed on {}",
                        d.display(),
                        tp.display()
                    )
                })?
                .map_err(|e| anyhow::anyhow!("cannot tokenize {}: {e}", d.display()))?;
            let mut ids = Vec::with_capacity(enc.len() + 1);
            ids.extend(bos);
            ids.extend_from_slice(enc.get_ids());
            Ok(Tokens { ids, dataset: d.display().to_string(), bos })
        }
        (None, Some(t)) => {
            let raw = std::fs::read_to_string(t).with_context(|| format!("cannot read {}", t.display()))?;
            let ids = raw
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<u32>().with_context(|| format!("{}: {s:?} is not a token id", t.display())))
                .collect::<Result<Vec<u32>>>()?;
            Ok(Tokens { ids, dataset: t.display().to_string(), bos: None })
        }
        _ => bail!("give the text with --data FILE (or token ids with --tokens FILE)"),
    }
}
