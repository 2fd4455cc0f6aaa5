//! Tokenizer → GGUF metadata: the `tokenizer.*` KVs the pinned reference converter writes.
//!
//! Facts: `../shared/docs/gguf-spec.md` §6 (tokenizer metadata) and §5.1 (KV order), pinned to the llama.cpp
//! vendored by `llama-cpp-python==0.3.36`: `conversion/base.py` (`get_vocab_base`, `get_vocab_base_pre`,
//! `_set_vocab_gpt2`, `_set_vocab_sentencepiece`, `_set_vocab_llama_hf`), `conversion/llama.py`
//! (`LlamaModel.set_vocab`), `gguf-py/gguf/vocab.py` (`SpecialVocab`, `LlamaHfVocab`) and
//! `gguf-py/gguf/gguf_writer.py` (which keys are skipped, overwritten in place or typed how).
//!
//! The reference loads the tokenizer with `transformers.AutoTokenizer` (transformers 5 at the pin); this module
//! loads `tokenizer.json` with the `tokenizers` crate (the same Rust core) and replays what transformers 5's
//! `TokenizersBackend` does on load (named, extra and model-specific special tokens from `tokenizer_config.json`,
//! `special_tokens_map.json`, `added_tokens.json` become added tokens; `add_bos_token`/`add_eos_token` are
//! dropped because `tokenizer.json` exists). Model-specific transformers classes that rebuild the pipeline from
//! vocab/merges are not replayed: sling always uses `tokenizer.json` as written. That differs from the reference
//! only when `tokenizer.json` disagrees with the class's own pipeline, e.g. a GPT-2-regex tokenizer in a
//! directory whose `tokenizer_class` is `Qwen2Tokenizer` (or, without `tokenizer_class`, whose config
//! `model_type` maps to one); the chkhsh then differs.
//!
//! Entry points: [`vocab_kvs`] (the KVs, in the reference's order) and [`check_vocab`] (the same work, for
//! refusing early). Layout: [`pre_table`] (chkhsh table and accepted pre names, data), `hf` (tokenizer.json
//! loading, chkhsh, `get_vocab_base`, `LlamaHfVocab`), `special` (`SpecialVocab`), `spm` (`tokenizer.model`).

mod hf;
pub mod pre_table;
mod special;
mod spm;

use std::path::{Path, PathBuf};

use serde_json::Value;

use sling_formats::gguf::{GgufValue, ValueType};

pub use hf::chkhsh;
pub use pre_table::{CHKHSH_TABLE, CHKTXT, LLAMA_CPP_BPE_PRE_NAMES};

/// Which `set_vocab` of the reference converter to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabStyle {
    /// `TextModel._set_vocab_gpt2` (Qwen2/3-MoE, DeepSeek-V2/V3, gpt-oss, OLMoE, …): byte-level BPE from
    /// `tokenizer.json`.
    Gpt2,
    /// `conversion/llama.py LlamaModel.set_vocab` (Llama, Mistral, Mixtral): `add_prefix_space` from
    /// `tokenizer_config.json`, then SentencePiece `tokenizer.model` → `LlamaHfVocab` (`tokenizer.json` BPE with
    /// byte fallback) → gpt2 BPE, then the CodeLlama (vocab 32016) and Granite-small (vocab 49152) fix-ups.
    Llama,
    /// `try: _set_vocab_sentencepiece() except FileNotFoundError: _set_vocab_gpt2()` (dense `Qwen2Model`,
    /// `DeepseekModel` v1): SentencePiece when `tokenizer.model` exists, else as [`VocabStyle::Gpt2`].
    SpmOrGpt2,
}

/// User choices that change the vocabulary KVs.
#[derive(Clone, Debug, Default)]
pub struct VocabOptions {
    /// `--tokenizer-pre NAME`: the `tokenizer.ggml.pre` to write for a BPE vocabulary. It wins over the chkhsh
    /// detection (a disagreement is logged) and is required when the chkhsh is not in the reference table. It must
    /// be a name llama.cpp accepts ([`LLAMA_CPP_BPE_PRE_NAMES`]).
    pub pre_override: Option<String>,
}

/// Why the vocabulary cannot be converted. Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error("{path}: not found ({needed})")]
    Missing { path: PathBuf, needed: &'static str },
    #[error("{path}: cannot read")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The file parses but lacks something the reference needs, or has it with the wrong type.
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    /// `tokenizer.json` is valid JSON but the `tokenizers` library rejects it (or fails to encode with it).
    #[error("{path}: the tokenizers library cannot use it: {message}")]
    Tokenizers { path: PathBuf, message: String },
    #[error(
        "{path}: the BPE pre-tokenizer is not recognized: chkhsh {chkhsh} is not in the reference converter's \
         table (conversion/base.py get_vocab_base_pre). Pass `--tokenizer-pre NAME` with the pre-tokenizer llama.cpp \
         should use, e.g. `gpt-2`, `llama-bpe`, `qwen2`, `deepseek-v3`, `gpt-4o`, `olmo` (all names: {all})"
    )]
    UnknownPreTokenizer { path: PathBuf, chkhsh: String, all: String },
    #[error(
        "--tokenizer-pre {name:?} is not a pre-tokenizer llama.cpp accepts for a BPE vocabulary \
         (src/llama-vocab.cpp); valid names: {all}"
    )]
    InvalidPreOverride { name: String, all: String },
    #[error("{path}: {what} is not supported yet")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: vocab_size {vocab_size} is not larger than the largest token id {max_id} of the tokenizer")]
    VocabSizeTooSmall { path: PathBuf, vocab_size: u64, max_id: u64 },
    #[error("{path}: invalid value for special token type {kind}: {id} (the reference converter refuses it too)")]
    BadSpecialTokenId { path: PathBuf, kind: String, id: i64 },
}

/// Everything the reference converter writes for the vocabulary, in the reference's order: (for
/// [`VocabStyle::Llama`] `tokenizer.ggml.add_space_prefix` first), `tokenizer.ggml.model`, `.pre`, `.tokens`,
/// (`.scores`), `.token_type`, (`.merges`), special token ids, `add_bos`/`add_sep`/`add_eos`…, chat template(s),
/// normalizer flags. Values and types are the ones `gguf_writer.py` writes (ids u32, types i32 arrays, scores
/// f32 arrays, flags bool); empty strings and arrays are omitted and re-added keys are overwritten in place, as
/// there.
///
/// `config` is the parsed `config.json` (`vocab_size`, `*_token_id`, `text_config`), used where the reference
/// uses its hparams or re-reads `config.json`.
pub fn vocab_kvs(
    model_dir: &Path,
    config: &Value,
    style: VocabStyle,
    opts: &VocabOptions,
) -> Result<Vec<(String, GgufValue)>, TokenizerError> {
    if let Some(name) = &opts.pre_override {
        validate_pre_name(name)?;
    }
    let hparams = Hparams::new(config);
    let mut w = KvWriter::default();
    match style {
        VocabStyle::Gpt2 => set_vocab_gpt2(model_dir, &hparams, opts, &mut w)?,
        VocabStyle::Llama => set_vocab_llama(model_dir, &hparams, opts, &mut w)?,
        VocabStyle::SpmOrGpt2 if model_dir.join("tokenizer.model").is_file() => {
            spm::set_vocab_sentencepiece(model_dir, &hparams, &mut w)?
        }
        VocabStyle::SpmOrGpt2 => set_vocab_gpt2(model_dir, &hparams, opts, &mut w)?,
    }
    if let Some((_, GgufValue::Array(_, tokens))) = w.kvs.iter().find(|(k, _)| k == keys::TOKENS) {
        warn_duplicate_tokens(tokens);
    }
    Ok(w.kvs)
}

/// Checks up front (before any output is written) that the vocabulary can be converted; same errors as
/// [`vocab_kvs`] (it does the same work and drops the result).
pub fn check_vocab(
    model_dir: &Path,
    config: &Value,
    style: VocabStyle,
    opts: &VocabOptions,
) -> Result<(), TokenizerError> {
    vocab_kvs(model_dir, config, style, opts).map(|_| ())
}

/// The pre-tokenizer name the reference table gives a chkhsh (the last entry wins, as in the Python `if` chain).
pub fn pre_for_chkhsh(chkhsh: &str) -> Option<&'static str> {
    CHKHSH_TABLE.iter().rev().find(|(h, _, _)| *h == chkhsh).map(|(_, name, _)| *name)
}

/// Whether llama.cpp's loader accepts `name` as `tokenizer.ggml.pre` of a BPE vocabulary.
pub fn is_valid_pre(name: &str) -> bool {
    LLAMA_CPP_BPE_PRE_NAMES.contains(&name)
}

fn validate_pre_name(name: &str) -> Result<(), TokenizerError> {
    if is_valid_pre(name) {
        Ok(())
    } else {
        Err(TokenizerError::InvalidPreOverride { name: name.to_string(), all: LLAMA_CPP_BPE_PRE_NAMES.join(", ") })
    }
}

/// GGUF key names (`gguf-py/gguf/constants.py Keys.Tokenizer`).
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    pub const CHAT_TEMPLATES: &str = "tokenizer.chat_templates";
    pub const NORMALIZER_LOWERCASE: &str = "tokenizer.ggml.normalizer.lowercase";
    pub const NORMALIZER_STRIP_ACCENTS: &str = "tokenizer.ggml.normalizer.strip_accents";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
}

/// `gguf.TokenType` values (i32 in the file).
#[allow(dead_code)]
pub(crate) mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Replays `GGUFWriter`'s KV bookkeeping: insertion order, in-place overwrite of a re-added key, `add_string("")`
/// and empty arrays skipped.
#[derive(Default, Debug)]
pub(crate) struct KvWriter {
    pub kvs: Vec<(String, GgufValue)>,
}

impl KvWriter {
    pub fn add(&mut self, key: &str, value: GgufValue) {
        if let Some(slot) = self.kvs.iter_mut().find(|(k, _)| k == key) {
            tracing::debug!("duplicated key name {key:?}, overwriting it in place (as gguf_writer.py does)");
            slot.1 = value;
        } else {
            self.kvs.push((key.to_string(), value));
        }
    }
    pub fn add_string(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.add(key, GgufValue::String(value.to_string()));
        }
    }
    pub fn add_array(&mut self, key: &str, elem: ValueType, items: Vec<GgufValue>) {
        if !items.is_empty() {
            self.add(key, GgufValue::Array(elem, items));
        }
    }
    pub fn add_bool(&mut self, key: &str, value: bool) {
        self.add(key, GgufValue::Bool(value));
    }
    pub fn add_u32(&mut self, key: &str, value: u32) {
        self.add(key, GgufValue::U32(value));
    }
    #[cfg(test)]
    pub fn remove(&mut self, key: &str) {
        self.kvs.retain(|(k, _)| k != key);
    }

    /// tokenizer.ggml.model, .pre, .tokens, (.scores), .token_type, as `_set_vocab_*` write them.
    pub fn add_vocab(
        &mut self,
        model: &str,
        pre: &str,
        tokens: Vec<String>,
        scores: Option<Vec<f32>>,
        types: Vec<i32>,
    ) {
        self.add_string(keys::MODEL, model);
        self.add_string(keys::PRE, pre);
        self.add_array(keys::TOKENS, ValueType::String, tokens.into_iter().map(GgufValue::String).collect());
        if let Some(scores) = scores {
            self.add_array(keys::SCORES, ValueType::F32, scores.into_iter().map(GgufValue::F32).collect());
        }
        self.add_array(keys::TOKEN_TYPE, ValueType::I32, types.into_iter().map(GgufValue::I32).collect());
    }
}

/// The reference's `self.hparams` view of `config.json`: `text_config` merged into the root.
pub(crate) struct Hparams<'a> {
    root: &'a Value,
    text: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> Hparams<'a> {
    fn new(config: &'a Value) -> Self {
        let text = config.get("text_config").and_then(Value::as_object);
        Hparams { root: config, text }
    }
    /// `self.hparams.get(key)` (text_config entries win, as `{**hparams, **text_config}`).
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.text.and_then(|t| t.get(key)).or_else(|| self.root.get(key))
    }
    /// The raw `config.json` (what `SpecialVocab._try_load_from_config_json` reads).
    pub fn raw(&self) -> &'a Value {
        self.root
    }
}

/// `_set_vocab_gpt2`.
fn set_vocab_gpt2(dir: &Path, hp: &Hparams<'_>, opts: &VocabOptions, w: &mut KvWriter) -> Result<(), TokenizerError> {
    let tok = hf::HfTokenizer::load(dir)?;
    let base = tok.vocab_base(hp, opts)?;
    w.add_vocab("gpt2", &base.pre, base.tokens, None, base.types);
    let sv = special::SpecialVocab::load(dir, hp.raw(), true, special::DEFAULT_TYPES, None)?;
    sv.add_to_gguf(w, dir)
}

/// `conversion/llama.py LlamaModel.set_vocab` (the HF-format, non-eagle path).
fn set_vocab_llama(dir: &Path, hp: &Hparams<'_>, opts: &VocabOptions, w: &mut KvWriter) -> Result<(), TokenizerError> {
    let tekken = dir.join("tekken.json");
    let tok_json = dir.join("tokenizer.json");
    if tekken.is_file() && !tok_json.is_file() {
        return Err(TokenizerError::Unsupported {
            path: tekken,
            what: "a Mistral tekken.json vocabulary without tokenizer.json (`_set_vocab_mistral`)".into(),
        });
    }
    if let Some(cfg) = hf::read_json_opt(&dir.join("tokenizer_config.json"))? {
        if let Some(v) = cfg.get("add_prefix_space").filter(|v| !v.is_null()) {
            w.add_bool(keys::ADD_SPACE_PREFIX, truthy(v));
        }
        if cfg.get("tokenizer_class").and_then(Value::as_str) == Some("HybridDNATokenizer") {
            return Err(TokenizerError::Unsupported {
                path: dir.join("tokenizer_config.json"),
                what: "HybridDNATokenizer (`_set_vocab_hybriddna`)".into(),
            });
        }
    }

    if dir.join("tokenizer.model").is_file() {
        spm::set_vocab_sentencepiece(dir, hp, w)?;
    } else {
        match hf::llama_hf_probe(dir)? {
            hf::LlamaHfProbe::LlamaHf => hf::set_vocab_llama_hf(dir, hp, w)?,
            hf::LlamaHfProbe::FallBackToGpt2(why) => {
                tracing::debug!("vocab: LlamaHfVocab not applicable ({why}); using the gpt2 BPE path");
                set_vocab_gpt2(dir, hp, opts, w)?;
            }
        }
    }

    // hparams.get("vocab_size", 32000) compared with ints (a float 32016.0 compares equal in Python too)
    let vocab_size = hp.get("vocab_size").map_or(Some(32000.0), Value::as_f64);
    if vocab_size == Some(32016.0) {
        // CodeLlama: the reference re-runs SpecialVocab with the infill types and fixed ids.
        let mut sv = special::SpecialVocab::load(dir, hp.raw(), false, &["prefix", "suffix", "middle", "eot"], None)?;
        for (kind, id) in [("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)] {
            sv.set_special_token(kind, &Value::from(id), dir)?;
        }
        sv.add_to_gguf(w, dir)?;
    }
    if vocab_size == Some(49152.0) {
        w.add_bool(keys::ADD_BOS, false);
    }
    Ok(())
}

/// Python truthiness of a JSON value.
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// `ModelBase.does_token_look_special`.
pub(crate) fn does_token_look_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// llama.cpp refuses a vocabulary with repeated token strings; the reference converter writes them anyway, so
/// sling does too (byte-for-byte), but says so.
fn warn_duplicate_tokens(tokens: &[GgufValue]) {
    let mut seen = std::collections::HashSet::with_capacity(tokens.len());
    let dups: Vec<&str> = tokens.iter().filter_map(GgufValue::as_str).filter(|t| !seen.insert(*t)).take(5).collect();
    if !dups.is_empty() {
        tracing::warn!(
            "the vocabulary repeats token strings (e.g. {dups:?}); llama.cpp will refuse to load it \
             (id_to_token.size() == token_to_id.size() assertion)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chkhsh_table_last_entry_wins() {
        assert_eq!(pre_for_chkhsh("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166"), Some("olmo"));
        assert_eq!(
            pre_for_chkhsh("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f"),
            Some("jina-v2-en")
        );
        assert_eq!(pre_for_chkhsh("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454"), Some("gpt-2"));
        assert_eq!(pre_for_chkhsh("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"), Some("qwen2"));
        assert_eq!(pre_for_chkhsh("00"), None);
        assert_eq!(CHKHSH_TABLE.len(), 97);
    }

    #[test]
    fn every_bpe_name_in_the_table_is_accepted_or_known_non_bpe() {
        // Names the table maps to that are not BPE pre-types in llama-vocab.cpp (WPM/BERT vocabularies, whose
        // pre is not checked by the loader).
        let non_bpe = ["bert-bge", "bert-bge-large", "jina-v2-en", "jina-v1-en"];
        for (_, name, _) in CHKHSH_TABLE {
            assert!(is_valid_pre(name) || non_bpe.contains(name), "{name}");
        }
        assert!(is_valid_pre("gpt-2") && is_valid_pre("qwen2") && !is_valid_pre("gpt2"));
    }

    #[test]
    fn writer_overwrites_in_place_and_skips_empty() {
        let mut w = KvWriter::default();
        w.add_string("a", "x");
        w.add_string("b", "");
        w.add_u32("c", 1);
        w.add_array("d", ValueType::I32, vec![]);
        w.add_string("a", "y");
        assert_eq!(w.kvs, vec![("a".into(), GgufValue::String("y".into())), ("c".into(), GgufValue::U32(1))]);
        w.remove("a");
        assert_eq!(w.kvs.len(), 1);
    }

    #[test]
    fn looks_special() {
        for t in ["<|im_start|>", "<pad>", "<｜begin▁of▁sentence｜>", "<unused12>", "[@BOS@]"] {
            assert!(does_token_look_special(t), "{t}");
        }
        for t in ["<s>", "<think>", "|>", "<|"] {
            assert!(!does_token_look_special(t), "{t}");
        }
    }

    #[test]
    fn python_truthiness() {
        use serde_json::json;
        for v in [json!(null), json!(false), json!(0), json!(""), json!([]), json!({})] {
            assert!(!truthy(&v));
        }
        for v in [json!(true), json!(1), json!("a"), json!([0]), json!({"a": 0})] {
            assert!(truthy(&v));
        }
    }
}
