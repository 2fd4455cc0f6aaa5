//! `tokenizer.json` through the `tokenizers` crate, loaded the way transformers 5's `AutoTokenizer` (class
//! `TokenizersBackend`) loads it; then the reference's `get_vocab_base_pre` (chkhsh), `get_vocab_base` (gpt2 BPE
//! tokens and types) and `LlamaHfVocab` (`_set_vocab_llama_hf`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokenizers::{AddedToken, Tokenizer};

use super::{
    does_token_look_special, pre_for_chkhsh, special, token_type, truthy, Hparams, KvWriter, TokenizerError,
    VocabOptions, CHKTXT, LLAMA_CPP_BPE_PRE_NAMES,
};

/// `PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES` (transformers 5).
const SPECIAL_TOKENS_ATTRIBUTES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Reads and parses a JSON file; `Missing` if it does not exist.
pub(crate) fn read_json(path: &Path, needed: &'static str) -> Result<Value, TokenizerError> {
    if !path.is_file() {
        return Err(TokenizerError::Missing { path: path.to_path_buf(), needed });
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json { path: path.to_path_buf(), source })
}

/// Like [`read_json`] but `None` when the file does not exist.
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if path.is_file() {
        read_json(path, "").map(Some)
    } else {
        Ok(None)
    }
}

fn invalid(path: &Path, what: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid { path: path.to_path_buf(), what: what.into() }
}

fn tk_err(path: &Path, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizers { path: path.to_path_buf(), message: e.to_string() }
}

/// A special token as transformers holds it: a plain string or an `AddedToken` with flags.
#[derive(Clone, Debug)]
enum TokVal {
    Str(String),
    Added(AddedToken),
}

impl TokVal {
    fn content(&self) -> &str {
        match self {
            TokVal::Str(s) => s,
            TokVal::Added(t) => &t.content,
        }
    }
}

/// `AddedToken(**dict)` (Python): missing flags take the binding's defaults (`normalized = not special`).
fn added_token_from_dict(path: &Path, d: &Map<String, Value>) -> Result<AddedToken, TokenizerError> {
    let content = d.get("content").and_then(Value::as_str).ok_or_else(|| {
        invalid(path, format!("added token without a string \"content\": {}", Value::Object(d.clone())))
    })?;
    let flag = |k: &str| d.get(k).map(truthy);
    let special = flag("special").unwrap_or(false);
    let mut t = AddedToken::from(content.to_string(), special);
    t.single_word = flag("single_word").unwrap_or(false);
    t.lstrip = flag("lstrip").unwrap_or(false);
    t.rstrip = flag("rstrip").unwrap_or(false);
    t.normalized = flag("normalized").unwrap_or(!special);
    Ok(t)
}

fn same_flags(a: &AddedToken, b: &AddedToken) -> bool {
    a.content == b.content
        && a.single_word == b.single_word
        && a.lstrip == b.lstrip
        && a.rstrip == b.rstrip
        && a.normalized == b.normalized
        && a.special == b.special
}

/// A special-token value from `tokenizer_config.json`: a string, or a dict with `"__type": "AddedToken"`
/// (`convert_added_tokens`); `None` for null. Anything else makes transformers raise.
fn tokval(path: &Path, key: &str, v: &Value) -> Result<Option<TokVal>, TokenizerError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TokVal::Str(s.clone()))),
        Value::Object(o) if o.get("__type").and_then(Value::as_str) == Some("AddedToken") => {
            Ok(Some(TokVal::Added(added_token_from_dict(path, o)?)))
        }
        other => Err(invalid(path, format!("special token {key} has to be a string or an AddedToken, got {other}"))),
    }
}

/// `tokenizer.json` loaded as transformers 5 does for `AutoTokenizer.from_pretrained(dir)`.
pub(crate) struct HfTokenizer {
    pub tok: Tokenizer,
    /// The raw `tokenizer.json`.
    pub path: PathBuf,
    /// Named special tokens (`_special_tokens_map`, the 7 attributes then model-specific ones), by content.
    named: Vec<String>,
    /// `_extra_special_tokens`, by content.
    extra: Vec<String>,
    /// `clean_up_tokenization_spaces` (transformers 5 applies it only to non-BPE models).
    clean_up: bool,
    is_bpe: bool,
}

impl HfTokenizer {
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let raw = read_json(&path, "tokenizer.json: the reference converter loads the vocabulary with AutoTokenizer")?;
        check_post_processor(&path, raw.get("post_processor"))?;
        let mut tok: Tokenizer = serde_json::from_value(raw.clone()).map_err(|e| tk_err(&path, e))?;
        // transformers calls `no_truncation()`/`set_truncation_and_padding(DO_NOT_*)` for a plain encode().
        tok.with_truncation(None).map_err(|e| tk_err(&path, e))?;
        tok.with_padding(None);
        let is_bpe = raw.get("model").and_then(|m| m.get("type")).and_then(Value::as_str) == Some("BPE");

        let cfg_path = dir.join("tokenizer_config.json");
        let mut kw: Map<String, Value> = match read_json_opt(&cfg_path)? {
            None => Map::new(),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(invalid(&cfg_path, "is not a JSON object")),
        };

        // ---- PreTrainedTokenizerBase.from_pretrained: added_tokens_decoder / legacy files ------------------
        let mut atd: Vec<(i64, AddedToken)> = Vec::new();
        if let Some(d) = kw.get("added_tokens_decoder") {
            let d = d.as_object().ok_or_else(|| invalid(&cfg_path, "added_tokens_decoder is not an object"))?;
            for (idx, t) in d {
                let id: i64 = idx
                    .trim()
                    .parse()
                    .map_err(|_| invalid(&cfg_path, format!("added_tokens_decoder key {idx:?} is not an integer")))?;
                let t = t
                    .as_object()
                    .ok_or_else(|| invalid(&cfg_path, format!("added_tokens_decoder[{idx}] is not an object")))?;
                atd.push((id, added_token_from_dict(&cfg_path, t)?));
            }
        } else {
            let stm_path = dir.join("special_tokens_map.json");
            if let Some(stm) = read_json_opt(&stm_path)? {
                let stm = stm.as_object().ok_or_else(|| invalid(&stm_path, "is not a JSON object"))?;
                for (key, value) in stm {
                    let value = match value {
                        Value::Object(o) if key != "extra_special_tokens" => {
                            let mut o = o.clone();
                            o.insert("special".into(), Value::Bool(true));
                            o.insert("__type".into(), Value::from("AddedToken"));
                            Value::Object(o)
                        }
                        Value::Array(list) if key == "extra_special_tokens" => {
                            let mut existing: Vec<Value> =
                                kw.get("extra_special_tokens").and_then(Value::as_array).cloned().unwrap_or_default();
                            for t in list {
                                let t = match t {
                                    Value::Object(o) => {
                                        let mut o = o.clone();
                                        o.insert("special".into(), Value::Bool(true));
                                        o.insert("__type".into(), Value::from("AddedToken"));
                                        Value::Object(o)
                                    }
                                    other => other.clone(),
                                };
                                if !existing.contains(&t) {
                                    existing.push(t);
                                }
                            }
                            Value::Array(existing)
                        }
                        other => other.clone(),
                    };
                    kw.insert(key.clone(), value);
                }
            }
            let at_path = dir.join("added_tokens.json");
            if let Some(at) = read_json_opt(&at_path)? {
                let at = at.as_object().ok_or_else(|| invalid(&at_path, "is not a JSON object"))?;
                let mut specials: HashSet<String> = HashSet::new();
                for k in SPECIAL_TOKENS_ATTRIBUTES {
                    if let Some(v) = kw.get(k).filter(|v| truthy(v)) {
                        specials.insert(value_content(v));
                    }
                }
                for v in kw.get("extra_special_tokens").and_then(Value::as_array).into_iter().flatten() {
                    specials.insert(value_content(v));
                }
                for (s, idx) in at {
                    let id = idx.as_i64().ok_or_else(|| invalid(&at_path, format!("id of {s:?} is not an integer")))?;
                    let special = specials.contains(s);
                    let mut t = AddedToken::from(s.clone(), special);
                    t.normalized = !special;
                    atd.retain(|(i, _)| *i != id);
                    atd.push((id, t));
                }
            }
            for t in raw.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
                let o = t.as_object().ok_or_else(|| invalid(&path, "added_tokens entry is not an object"))?;
                let id = o
                    .get("id")
                    .and_then(Value::as_i64)
                    .ok_or_else(|| invalid(&path, "added token without an integer id"))?;
                atd.retain(|(i, _)| *i != id);
                atd.push((id, added_token_from_dict(&path, o)?));
            }
        }
        atd.sort_by_key(|(i, _)| *i);
        // Named special tokens that name an entry of added_tokens_decoder take its AddedToken (flags).
        let added_map: HashMap<String, AddedToken> = atd.iter().map(|(_, t)| (t.content.clone(), t.clone())).collect();

        // ---- PreTrainedTokenizerBase.__init__: named, extra and model-specific special tokens -------------
        if kw.contains_key("additional_special_tokens") && !kw.contains_key("extra_special_tokens") {
            if let Some(v) = kw.remove("additional_special_tokens") {
                kw.insert("extra_special_tokens".into(), v);
            }
        }
        let mut named: Vec<(String, TokVal)> = Vec::new();
        let mut extra: Vec<TokVal> = Vec::new();
        let mut model_specific: Vec<(String, TokVal)> = Vec::new();
        for attr in SPECIAL_TOKENS_ATTRIBUTES {
            if let Some(v) = kw.get(attr) {
                if let Some(mut tv) = tokval(&cfg_path, attr, v)? {
                    if let Some(t) = added_map.get(tv.content()) {
                        tv = TokVal::Added(t.clone());
                    }
                    named.push((attr.to_string(), tv));
                }
            }
        }
        match kw.get("extra_special_tokens") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for (i, v) in list.iter().enumerate() {
                    if let Some(tv) = tokval(&cfg_path, &format!("extra_special_tokens[{i}]"), v)? {
                        extra.push(tv);
                    }
                }
            }
            Some(Value::Object(o)) => {
                for (k, v) in o {
                    if let Some(tv) = tokval(&cfg_path, k, v)? {
                        model_specific.push((k.clone(), tv));
                    }
                }
            }
            Some(other) => {
                return Err(invalid(&cfg_path, format!("extra_special_tokens must be a list or a dict, got {other}")))
            }
        }
        let mut auto: Vec<(String, TokVal)> = Vec::new();
        for (k, v) in &kw {
            if k.ends_with("_token") && !SPECIAL_TOKENS_ATTRIBUTES.contains(&k.as_str()) {
                if let Some(tv) = match v {
                    Value::String(s) => Some(TokVal::Str(s.clone())),
                    Value::Object(o) if o.get("__type").and_then(Value::as_str) == Some("AddedToken") => {
                        Some(TokVal::Added(added_token_from_dict(&cfg_path, o)?))
                    }
                    _ => None,
                } {
                    auto.push((k.clone(), tv));
                }
            }
        }
        // {**auto, **explicit}: explicit (dict-form extra_special_tokens) wins, keeping the first position.
        for (k, v) in model_specific {
            if let Some(slot) = auto.iter_mut().find(|(ak, _)| *ak == k) {
                slot.1 = v;
            } else {
                auto.push((k, v));
            }
        }
        named.extend(auto);

        // ---- TokenizersBackend.__init__: add missing special / decoder tokens to the backend --------------
        let current: Vec<AddedToken> = {
            let mut d: Vec<(u32, AddedToken)> = tok.get_added_tokens_decoder().into_iter().collect();
            d.sort_by_key(|(i, _)| *i);
            d.into_iter().map(|(_, t)| t).collect()
        };
        let mut to_add: Vec<AddedToken> =
            atd.iter().filter(|(_, t)| !current.iter().any(|c| same_flags(c, t))).map(|(_, t)| t.clone()).collect();
        let encoder: HashSet<String> =
            current.iter().map(|t| t.content.clone()).chain(to_add.iter().map(|t| t.content.clone())).collect();
        let named_contents: Vec<String> = named.iter().map(|(_, v)| v.content().to_string()).collect();
        for tv in named.iter().map(|(_, v)| v).chain(extra.iter()) {
            if encoder.contains(tv.content()) || to_add.iter().any(|t| t.content == tv.content()) {
                continue;
            }
            to_add.push(match tv {
                TokVal::Str(s) => AddedToken::from(s.clone(), true),
                TokVal::Added(t) => {
                    let mut t = t.clone();
                    if !t.special && named_contents.contains(&t.content) {
                        t.special = true;
                    }
                    t
                }
            });
        }
        if !to_add.is_empty() {
            tok.add_tokens(&to_add);
        }
        // _post_init: the same tokens again as special tokens (no-ops for contents already present).
        let post: Vec<AddedToken> = named
            .iter()
            .map(|(_, v)| v)
            .chain(extra.iter())
            .map(|tv| match tv {
                TokVal::Str(s) => AddedToken::from(s.clone(), true),
                TokVal::Added(t) => t.clone(),
            })
            .collect();
        if !post.is_empty() {
            tok.add_special_tokens(&post);
        }

        // Post-processor: transformers 5 pops add_bos_token/add_eos_token from the config when tokenizer.json
        // exists, so it only rebuilds the post-processor when there is none, and then with neither BOS nor EOS:
        // encoding is then the same as the backend's.
        let clean_up = kw.get("clean_up_tokenization_spaces").is_some_and(truthy);
        let named: Vec<String> = named.into_iter().map(|(_, v)| v.content().to_string()).collect();
        let extra: Vec<String> = extra.into_iter().map(|v| v.content().to_string()).collect();
        Ok(HfTokenizer { tok, path, named, extra, clean_up, is_bpe })
    }

    /// `tokenizer.encode(text, add_special_tokens=...)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.guarded(|| self.tok.encode(text, add_special_tokens))?;
        Ok(enc.map_err(|e| tk_err(&self.path, e))?.get_ids().to_vec())
    }

    /// `tokenizer.decode(ids)` (skip_special_tokens=False).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let text = self.guarded(|| self.tok.decode(ids, false))?.map_err(|e| tk_err(&self.path, e))?;
        Ok(if self.clean_up && !self.is_bpe { clean_up_tokenization(&text) } else { text })
    }

    /// A call into the `tokenizers` library, whose code panics on some inputs a `tokenizer.json` can describe (an
    /// index out of bounds, found by the `tokenizer_json` fuzz target): the panic becomes an error naming the file,
    /// not a crash.
    fn guarded<T>(&self, f: impl FnOnce() -> T) -> Result<T, TokenizerError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            tk_err(&self.path, format!("the library failed on it ({why})"))
        })
    }

    /// `sha256(str(tokenizer.encode(chktxt)))`.
    pub fn chkhsh(&self) -> Result<String, TokenizerError> {
        let ids = self.encode(CHKTXT, true)?;
        let mut s = String::with_capacity(ids.len() * 7 + 2);
        s.push('[');
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(&id.to_string());
        }
        s.push(']');
        Ok(hex(&Sha256::digest(s.as_bytes())))
    }

    /// `tokenizer.vocab` reversed (id → token). Where an added token and a model token share an id, the added
    /// token wins (that is what the tokenizer decodes; the Python dict order is unspecified there).
    fn reverse_vocab(&self) -> HashMap<u32, String> {
        let mut rev: HashMap<u32, String> = HashMap::new();
        for (t, id) in self.tok.get_vocab(false) {
            rev.insert(id, t);
        }
        for (id, t) in self.tok.get_added_tokens_decoder() {
            rev.insert(id, t.content);
        }
        rev
    }

    /// `TextModel.get_vocab_base` (+ the pre-tokenizer from `get_vocab_base_pre` or the override).
    pub fn vocab_base(&self, hp: &Hparams<'_>, opts: &VocabOptions) -> Result<BaseVocab, TokenizerError> {
        let vocab = self.tok.get_vocab(true);
        let vocab_size: u64 = match hp.get("vocab_size") {
            None => vocab.len() as u64,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| invalid(Path::new("config.json"), format!("vocab_size is {v}, not a count")))?,
        };
        let max_id = vocab.values().copied().max().map(u64::from);
        match max_id {
            None => return Err(invalid(&self.path, "the vocabulary is empty")),
            Some(m) if m >= vocab_size => {
                return Err(TokenizerError::VocabSizeTooSmall { path: self.path.clone(), vocab_size, max_id: m })
            }
            Some(_) => {}
        }

        let pre = self.resolve_pre(opts)?;

        let reverse = self.reverse_vocab();
        let added_decoder: HashMap<u32, AddedToken> = self.tok.get_added_tokens_decoder().into_iter().collect();
        let added_vocab: HashSet<&str> = added_decoder.values().map(|t| t.content.as_str()).collect();
        let mut tokens = Vec::with_capacity(vocab_size as usize);
        let mut types = Vec::with_capacity(vocab_size as usize);
        for i in 0..vocab_size {
            let Some(token) = u32::try_from(i).ok().and_then(|i| reverse.get(&i)) else {
                tokens.push(format!("[PAD{i}]"));
                types.push(token_type::UNUSED);
                continue;
            };
            let mut token = token.clone();
            if added_vocab.contains(token.as_str()) {
                let at = u32::try_from(i).ok().and_then(|i| added_decoder.get(&i)).ok_or_else(|| {
                    invalid(
                        &self.path,
                        format!("added token {token:?} is not the token with id {i} (KeyError in the reference)"),
                    )
                })?;
                if !at.normalized {
                    let prev = token.clone();
                    token = self.decode(&self.encode(&token, false)?)?;
                    if prev != token {
                        tracing::info!("{prev:?} is encoded and decoded back to {token:?} using the tokenizer");
                    }
                }
                if at.special || does_token_look_special(&token) {
                    types.push(token_type::CONTROL);
                } else {
                    token = token.replace('\u{2581}', " ");
                    types.push(token_type::USER_DEFINED);
                }
            } else {
                types.push(token_type::NORMAL);
            }
            tokens.push(token);
        }
        Ok(BaseVocab { tokens, types, pre })
    }

    /// The `tokenizer.ggml.pre` to write: the override if given (validated by the caller), else the table entry.
    fn resolve_pre(&self, opts: &VocabOptions) -> Result<String, TokenizerError> {
        let hash = self.chkhsh()?;
        let detected = pre_for_chkhsh(&hash);
        tracing::debug!("chkhsh: {hash} -> {detected:?}");
        match (&opts.pre_override, detected) {
            (Some(o), Some(d)) if o != d => {
                tracing::warn!(
                    "--tokenizer-pre {o:?} overrides the detected pre-tokenizer {d:?} (chkhsh {hash}); \
                     the reference converter would write {d:?}"
                );
                Ok(o.clone())
            }
            (Some(o), None) => {
                tracing::info!("chkhsh {hash} is not in the reference table; using --tokenizer-pre {o:?}");
                Ok(o.clone())
            }
            (Some(o), Some(_)) => Ok(o.clone()),
            (None, Some(d)) => Ok(d.to_string()),
            (None, None) => Err(TokenizerError::UnknownPreTokenizer {
                path: self.path.clone(),
                chkhsh: hash,
                all: LLAMA_CPP_BPE_PRE_NAMES.join(", "),
            }),
        }
    }
}

/// Refuses a `TemplateProcessing` post-processor (alone or inside a `Sequence` of processors) whose single-sequence
/// template uses sequence `B`: `tokenizers` indexes a pair that is not there and panics (found by the
/// `tokenizer_json` fuzz target; transformers, on the same Rust core, fails too).
fn check_post_processor(path: &Path, pp: Option<&Value>) -> Result<(), TokenizerError> {
    let Some(pp) = pp else { return Ok(()) };
    match pp.get("type").and_then(Value::as_str) {
        Some("TemplateProcessing") => {
            let uses_b = pp.get("single").and_then(Value::as_array).is_some_and(|t| {
                t.iter().any(|piece| piece.pointer("/Sequence/id").and_then(Value::as_str) == Some("B"))
            });
            if uses_b {
                return Err(invalid(path, "post_processor: the single-sequence template uses sequence B"));
            }
            Ok(())
        }
        Some("Sequence") => {
            for p in pp.get("processors").and_then(Value::as_array).into_iter().flatten() {
                check_post_processor(path, Some(p))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Python `str(obj)` of a special-token value from JSON (a string, or an AddedToken dict → its content).
fn value_content(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        other => other.to_string(),
    }
}

/// `PreTrainedTokenizerBase.clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The chkhsh of the tokenizer in `model_dir` (`tokenizer.json`, loaded as the reference loads it).
pub fn chkhsh(model_dir: &Path) -> Result<String, TokenizerError> {
    HfTokenizer::load(model_dir)?.chkhsh()
}

/// Output of `get_vocab_base`.
pub(crate) struct BaseVocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub pre: String,
}

/// Whether `LlamaHfVocab` applies, replaying its up-front checks (what raises `FileNotFoundError`/`TypeError`, which
/// `LlamaModel.set_vocab` catches to fall back to gpt2, and what raises something else, which aborts).
pub(crate) enum LlamaHfProbe {
    LlamaHf,
    FallBackToGpt2(&'static str),
}

pub(crate) fn llama_hf_probe(dir: &Path) -> Result<LlamaHfProbe, TokenizerError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(LlamaHfProbe::FallBackToGpt2("no tokenizer.json"));
    }
    let j = read_json(&path, "tokenizer.json")?;
    let model = j.get("model").ok_or_else(|| invalid(&path, "no \"model\" (KeyError in LlamaHfVocab)"))?;
    let mtype = model.get("type").ok_or_else(|| invalid(&path, "no \"model.type\" (KeyError in LlamaHfVocab)"))?;
    let is_bpe = mtype.as_str() == Some("BPE");
    let is_llama3 = is_bpe
        && model.get("ignore_merges").is_some_and(truthy)
        && !model.get("byte_fallback").map(truthy).unwrap_or(true);
    if is_llama3 {
        return Ok(LlamaHfProbe::FallBackToGpt2("Llama 3 style BPE (ignore_merges, no byte_fallback)"));
    }
    if !is_bpe || !model.get("byte_fallback").is_some_and(truthy) {
        return Ok(LlamaHfProbe::FallBackToGpt2("not a BPE model with byte_fallback"));
    }
    let decoder = j.get("decoder").ok_or_else(|| invalid(&path, "no \"decoder\" (KeyError in LlamaHfVocab)"))?;
    if decoder.is_null() {
        return Ok(LlamaHfProbe::FallBackToGpt2("decoder is null"));
    }
    let dtype = decoder.get("type").ok_or_else(|| invalid(&path, "no \"decoder.type\" (KeyError in LlamaHfVocab)"))?;
    if dtype.as_str() != Some("Sequence") {
        return Ok(LlamaHfProbe::FallBackToGpt2("decoder is not a Sequence"));
    }
    Ok(LlamaHfProbe::LlamaHf)
}

/// `_set_vocab_llama_hf` with `gguf.LlamaHfVocab`.
pub(crate) fn set_vocab_llama_hf(dir: &Path, hp: &Hparams<'_>, w: &mut KvWriter) -> Result<(), TokenizerError> {
    let t = HfTokenizer::load(dir)?;
    let base = t.tok.get_vocab_size(false);
    let mut added: Vec<(u32, String)> =
        t.tok.get_added_tokens_decoder().into_iter().map(|(id, tok)| (id, tok.content)).collect();
    added.sort_by_key(|(id, _)| *id);
    // get_added_vocab() is a dict content -> id: for a repeated content the last id wins, at the first position.
    let mut added_vocab: Vec<(String, u32)> = Vec::new();
    for (id, c) in added {
        if let Some(slot) = added_vocab.iter_mut().find(|(ac, _)| *ac == c) {
            slot.1 = id;
        } else {
            added_vocab.push((c, id));
        }
    }
    added_vocab.sort_by_key(|(_, id)| *id);
    let added_list: Vec<String> =
        added_vocab.into_iter().filter(|(_, id)| *id as usize >= base).map(|(c, _)| c).collect();

    let mut all_special: Vec<&str> = Vec::new();
    for s in t.named.iter().chain(t.extra.iter()) {
        if !all_special.contains(&s.as_str()) {
            all_special.push(s);
        }
    }
    let vocab = t.tok.get_vocab(true);
    let mut specials: HashMap<&str, u32> = HashMap::new();
    for s in &all_special {
        let id =
            vocab.get(*s).ok_or_else(|| invalid(&t.path, format!("special token {s:?} is not in the vocabulary")))?;
        specials.insert(s, *id);
    }
    let special_ids: HashSet<u32> = specials.values().copied().collect();

    let reverse = t.reverse_vocab();
    let mut tokens = Vec::with_capacity(base + added_list.len());
    let mut scores = Vec::with_capacity(base + added_list.len());
    let mut types = Vec::with_capacity(base + added_list.len());
    for id in 0..base {
        let id32 = u32::try_from(id).map_err(|_| invalid(&t.path, "vocabulary too large"))?;
        let text = reverse
            .get(&id32)
            .ok_or_else(|| invalid(&t.path, format!("no token has id {id} (KeyError in LlamaHfVocab)")))?;
        let ty = if is_byte_token(text) {
            token_type::BYTE
        } else if special_ids.contains(&id32) {
            token_type::CONTROL
        } else {
            token_type::NORMAL
        };
        tokens.push(text.clone());
        scores.push(-1000.0f32);
        types.push(ty);
    }
    for text in added_list {
        let ty = match specials.get(text.as_str()) {
            Some(id) if special_ids.contains(id) => token_type::CONTROL,
            Some(_) => token_type::NORMAL,
            None => token_type::USER_DEFINED,
        };
        tokens.push(text);
        scores.push(-1000.0f32);
        types.push(ty);
    }
    let n = tokens.len();
    let _ = hp;
    w.add_vocab("llama", "default", tokens, Some(scores), types);
    let sv = special::SpecialVocab::load(dir, hp.raw(), false, special::DEFAULT_TYPES, Some(n as u64))?;
    sv.add_to_gguf(w, dir)
}

/// `re.fullmatch(br"<0x[0-9A-Fa-f]{2}>", token_text)`.
fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6 && b.starts_with(b"<0x") && b[5] == b'>' && b[3].is_ascii_hexdigit() && b[4].is_ascii_hexdigit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens() {
        assert!(is_byte_token("<0x0A>") && is_byte_token("<0xff>"));
        assert!(!is_byte_token("<0x0G>") && !is_byte_token("<0x0A> ") && !is_byte_token("0x0A"));
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(clean_up_tokenization("a . b ' c do n't"), "a. b'c don't");
    }
}
