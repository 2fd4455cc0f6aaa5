//! `gguf.SpecialVocab` (`gguf-py/gguf/vocab.py`): merges, special token ids, `add_*_token` flags, chat
//! template(s) and normalizer flags, read from `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` /
//! `chat_template.json`, `merges.txt` and `config.json`, and written in `add_to_gguf` order.

use std::path::Path;

use serde_json::{Map, Value};

use super::hf::{read_json, read_json_opt};
use super::{keys, truthy, KvWriter, TokenizerError};
use sling_formats::gguf::{GgufValue, ValueType};

/// The default `special_token_types`.
pub(crate) const DEFAULT_TYPES: &[&str] = &["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// A chat template as `tokenizer_config.json` (or the alternatives) gives it.
#[derive(Debug, Clone)]
enum ChatTemplate {
    One(String),
    /// `[{"name": ..., "template": ...}, ...]`
    Named(Vec<Value>),
}

#[derive(Debug, Default)]
pub(crate) struct SpecialVocab {
    merges: Vec<String>,
    load_merges: bool,
    n_vocab: Option<u64>,
    types: Vec<String>,
    /// Insertion-ordered, first set wins.
    ids: Vec<(String, u32)>,
    /// Insertion-ordered, later assignments overwrite in place (Python dict).
    add: Vec<(String, bool)>,
    chat_template: Option<ChatTemplate>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
}

fn invalid(path: &Path, what: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid { path: path.to_path_buf(), what: what.into() }
}

/// `x.get('SpecialToken', {}).get('id')` on a TemplateProcessing piece.
fn special_piece_id(piece: Option<&Value>) -> Option<Value> {
    piece.and_then(|p| p.get("SpecialToken")).and_then(|s| s.get("id")).cloned().filter(|v| !v.is_null())
}

fn seq_piece_id(piece: Option<&Value>) -> Option<Value> {
    piece.and_then(|p| p.get("Sequence")).and_then(|s| s.get("id")).cloned().filter(|v| !v.is_null())
}

/// Python `a in (b, c)` for optional JSON values (None compares equal to None).
fn in2(a: &Option<Value>, b: &Option<Value>, c: &Option<Value>) -> bool {
    a == b || a == c
}

fn opt_truthy(v: &Option<Value>) -> bool {
    v.as_ref().is_some_and(truthy)
}

impl SpecialVocab {
    pub fn load(
        dir: &Path,
        config: &Value,
        load_merges: bool,
        types: &[&str],
        n_vocab: Option<u64>,
    ) -> Result<Self, TokenizerError> {
        let mut sv = SpecialVocab {
            load_merges,
            n_vocab,
            types: types.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        sv.load_from_tokenizer_json(dir)?;
        sv.load_from_config_json(dir, config)?;
        if sv.load_merges && sv.merges.is_empty() {
            sv.load_merges_txt(dir)?;
        }
        Ok(sv)
    }

    fn set_add(&mut self, kind: &str, v: bool) {
        if let Some(slot) = self.add.iter_mut().find(|(k, _)| k == kind) {
            slot.1 = v;
        } else {
            self.add.push((kind.to_string(), v));
        }
    }

    fn setdefault_add(&mut self, kind: &str, v: bool) {
        if !self.add.iter().any(|(k, _)| k == kind) {
            self.add.push((kind.to_string(), v));
        }
    }

    fn get_add(&self, kind: &str) -> Option<bool> {
        self.add.iter().find(|(k, _)| k == kind).map(|(_, v)| *v)
    }

    /// `_set_special_token`: ints only (JSON booleans count, as Python bools are ints), negative → error,
    /// out of range (when `n_vocab` is known) → skipped, first value wins.
    pub fn set_special_token(&mut self, kind: &str, tid: &Value, path: &Path) -> Result<(), TokenizerError> {
        let id: i64 = match tid {
            Value::Bool(b) => i64::from(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => i,
                None if n.is_u64() => i64::MAX,
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        if id < 0 {
            return Err(TokenizerError::BadSpecialTokenId { path: path.to_path_buf(), kind: kind.to_string(), id });
        }
        let id_u = id as u64;
        let in_range = match self.n_vocab {
            Some(n) => id_u < n,
            None => true,
        };
        if in_range {
            if self.ids.iter().any(|(k, _)| k == kind) {
                return Ok(());
            }
            let id32 = u32::try_from(id_u)
                .map_err(|_| invalid(path, format!("special token id {kind}={id} does not fit the u32 GGUF field")))?;
            self.ids.push((kind.to_string(), id32));
            return Ok(());
        }
        tracing::warn!(
            "special token type {kind}, id {id} out of range, must be under {} - skipping",
            self.n_vocab.unwrap_or(0)
        );
        Ok(())
    }

    fn parse_normalizer(&mut self, n: &Value) {
        match n.get("type").and_then(Value::as_str) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(v) = n.get("lowercase") {
                    self.lowercase = bool_like(v);
                }
                if let Some(v) = n.get("strip_accents") {
                    self.strip_accents = bool_like(v);
                }
            }
            Some("Sequence") => {
                for m in n.get("normalizers").and_then(Value::as_array).into_iter().flatten() {
                    self.parse_normalizer(m);
                }
            }
            _ => {}
        }
    }

    fn load_merges_txt(&mut self, dir: &Path) -> Result<(), TokenizerError> {
        let path = dir.join("merges.txt");
        if !path.is_file() {
            return Ok(());
        }
        let text =
            std::fs::read_to_string(&path).map_err(|source| TokenizerError::Io { path: path.clone(), source })?;
        let mut lines = text.split_inclusive('\n').peekable();
        if lines.peek().is_some_and(|l| l.trim().starts_with('#')) {
            lines.next();
        }
        let mut merges = Vec::new();
        for line in lines {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            // line.split(None, 3): at most 4 parts; exactly 2 is a merge
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() != 2 {
                tracing::warn!("merges.txt: entry malformed, ignoring: {line:?}");
                continue;
            }
            merges.push(format!("{} {}", parts[0], parts[1]));
        }
        self.merges = merges;
        Ok(())
    }

    fn load_from_tokenizer_json(&mut self, dir: &Path) -> Result<(), TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let cfg_path = dir.join("tokenizer_config.json");
        let tokenizer: Option<Value> = read_json_opt(&tok_path)?;
        let mut added_tokens: Vec<Value> = Vec::new();
        if let Some(tj) = &tokenizer {
            if self.load_merges {
                if let Some(Value::Array(merges)) = tj.get("model").and_then(|m| m.get("merges")) {
                    if !merges.is_empty() {
                        self.merges = convert_merges(&tok_path, merges)?;
                    }
                }
            }
            if let Some(n) = tj.get("normalizer").filter(|n| truthy(n)) {
                self.parse_normalizer(n);
            }
            if let Some(Value::Array(a)) = tj.get("added_tokens") {
                added_tokens = a.clone();
            }
        }
        let mut tc: Option<Map<String, Value>> = match read_json_opt(&cfg_path)? {
            None => None,
            Some(Value::Object(o)) => Some(o),
            Some(_) => return Err(invalid(&cfg_path, "is not a JSON object")),
        };
        // `tokenizer_config` is truthy only when it is a non-empty dict.
        let tc_truthy = |tc: &Option<Map<String, Value>>| tc.as_ref().is_some_and(|m| !m.is_empty());

        if tokenizer.as_ref().is_some_and(truthy) {
            let tj = tokenizer.as_ref().unwrap_or(&Value::Null);
            let get = |tc: &Option<Map<String, Value>>, k: &str| {
                tc.as_ref().and_then(|m| m.get(k)).cloned().filter(|v| !v.is_null())
            };
            let mut special_bos = get(&tc, "bos_token");
            let mut special_cls = get(&tc, "cls_token");
            let mut special_eos = get(&tc, "eos_token");
            let mut special_sep = get(&tc, "sep_token");
            if !opt_truthy(&special_bos) && opt_truthy(&special_cls) && tc_truthy(&tc) {
                special_bos = special_cls.clone();
                set_tc(&mut tc, "bos_token", &special_bos);
            }
            if !opt_truthy(&special_eos) && opt_truthy(&special_sep) && tc_truthy(&tc) {
                special_eos = special_sep.clone();
                set_tc(&mut tc, "eos_token", &special_eos);
            }
            if let Some(pp) = tj.get("post_processor").filter(|p| truthy(p)) {
                let procs: Vec<Value> = match pp.get("processors") {
                    Some(Value::Array(a)) => a.clone(),
                    Some(other) => vec![other.clone()],
                    None => vec![pp.clone()],
                };
                for processor in &procs {
                    match processor.get("type").and_then(Value::as_str) {
                        Some("ByteLevel") => {
                            self.setdefault_add("bos", false);
                            self.setdefault_add("eos", false);
                        }
                        Some("RobertaProcessing") => {
                            self.set_add("bos", true);
                            self.set_add("eos", true);
                            self.set_add("sep", true);
                            if !opt_truthy(&special_cls) && tc_truthy(&tc) {
                                special_cls = match processor.get("cls") {
                                    Some(c) => c.get(0).cloned(),
                                    None => special_bos.clone(),
                                };
                                set_tc(&mut tc, "cls_token", &special_cls);
                            }
                            if !opt_truthy(&special_sep) && tc_truthy(&tc) {
                                special_sep = match processor.get("sep") {
                                    Some(c) => c.get(0).cloned(),
                                    None => special_eos.clone(),
                                };
                                set_tc(&mut tc, "sep_token", &special_sep);
                            }
                        }
                        Some("TemplateProcessing") => {
                            self.template_processing(
                                processor,
                                &mut tc,
                                &mut special_bos,
                                &mut special_cls,
                                &mut special_eos,
                                &mut special_sep,
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
        let Some(tc) = tc.filter(|m| !m.is_empty()) else {
            return Ok(());
        };

        // chat template: tokenizer_config's key wins (even when null), else chat_template.jinja (+ additional
        // templates), else chat_template.json
        let jinja = dir.join("chat_template.jinja");
        let cjson = dir.join("chat_template.json");
        let alt: Option<Value> = if jinja.is_file() {
            let main = read_text(&jinja)?;
            let mut extra: Vec<std::path::PathBuf> = match std::fs::read_dir(dir.join("additional_chat_templates")) {
                Ok(rd) => rd
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
                    .collect(),
                Err(_) => Vec::new(),
            };
            // glob order is the directory's; sort for determinism
            extra.sort();
            if extra.is_empty() {
                Some(Value::String(main))
            } else {
                let mut list = vec![serde_json::json!({"name": "default", "template": main})];
                for p in extra {
                    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    list.push(serde_json::json!({"name": stem, "template": read_text(&p)?}));
                }
                Some(Value::Array(list))
            }
        } else if cjson.is_file() {
            read_json(&cjson, "chat_template.json")?.get("chat_template").cloned()
        } else {
            None
        };
        let ct = match tc.get("chat_template") {
            Some(v) => Some(v.clone()),
            None => alt,
        };
        match ct {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => self.chat_template = Some(ChatTemplate::One(s)),
            Some(Value::Array(a)) => self.chat_template = Some(ChatTemplate::Named(a)),
            Some(_) => tracing::warn!("bad type for chat_template field in {} - ignoring", cfg_path.display()),
        }

        let types = self.types.clone();
        for typ in &types {
            if let Some(Value::Bool(b)) = tc.get(&format!("add_{typ}_token")) {
                match self.get_add(typ) {
                    None => self.set_add(typ, *b),
                    Some(prev) if prev != *b => tracing::warn!(
                        "mismatch between tokenizer_config add_{typ}_token({b}) and tokenizer post_processor<{typ}>({prev}) - opting for the latter"
                    ),
                    Some(_) => {}
                }
            }
            let content = match tc.get(&format!("{typ}_token")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            let found = added_tokens
                .iter()
                .find(|a| a.get("content").and_then(Value::as_str) == Some(content.as_str()))
                .map(|a| a.get("id").cloned().unwrap_or(Value::Null));
            if let Some(id) = found {
                self.set_special_token(typ, &id, &tok_path)?;
            }
        }
        Ok(())
    }

    /// The crude TemplateProcessing parse of `_try_load_from_tokenizer_json`.
    fn template_processing(
        &mut self,
        processor: &Value,
        tc: &mut Option<Map<String, Value>>,
        special_bos: &mut Option<Value>,
        special_cls: &mut Option<Value>,
        special_eos: &mut Option<Value>,
        special_sep: &mut Option<Value>,
    ) {
        let empty = Vec::new();
        let single = processor.get("single").and_then(Value::as_array).unwrap_or(&empty);
        let pair = processor.get("pair").and_then(Value::as_array).unwrap_or(&empty);
        let tc_truthy = tc.as_ref().is_some_and(|m| !m.is_empty());
        let mut special_first: Option<Value> = None;
        let mut special_last: Option<Value> = None;
        if single.len() > 1 {
            special_first = special_piece_id(single.first()).filter(truthy);
            if special_first.is_some() {
                if !tc_truthy {
                    *special_bos = special_first.clone();
                } else if !in2(&special_first, special_bos, special_cls) {
                    if !opt_truthy(special_bos) {
                        *special_bos = special_first.clone();
                        set_tc(tc, "bos_token", special_bos);
                    }
                    if !opt_truthy(special_cls) {
                        *special_cls = special_first.clone();
                        set_tc(tc, "cls_token", special_cls);
                    }
                }
                let v = in2(&special_first, special_bos, special_cls);
                self.set_add("bos", v);
                if !v {
                    tracing::warn!("unknown leading special token {special_first:?} in TemplateProcessing<single>");
                }
            }
            special_last = special_piece_id(single.last()).filter(truthy);
            if special_last.is_some() {
                if !tc_truthy {
                    *special_eos = special_last.clone();
                } else if special_last != *special_eos {
                    if !self.types.iter().any(|t| t == "eot") {
                        self.types.push("eot".into());
                        set_tc(tc, "eot_token", special_eos);
                    } else if !self.types.iter().any(|t| t == "eom") {
                        self.types.push("eom".into());
                        set_tc(tc, "eom_token", special_eos);
                    } else {
                        tracing::warn!(
                            "overriding EOS token {special_eos:?} with {special_last:?} without EOT/EOM fallback"
                        );
                    }
                    *special_eos = special_last.clone();
                    set_tc(tc, "eos_token", special_eos);
                }
                let v = special_last == *special_eos;
                self.set_add("eos", v);
                if !v {
                    tracing::warn!("unknown trailing special token {special_last:?} in TemplateProcessing<single>");
                }
            }
        }
        if !pair.is_empty() {
            let seq_start = usize::from(special_first.is_some() && special_piece_id(pair.first()) == special_first);
            let stop_trim = special_last.is_some() && special_piece_id(pair.last()) == special_last;
            if (special_first.is_some() && seq_start == 0) || (special_last.is_some() && !stop_trim) {
                tracing::warn!(
                    "TemplateProcessing<single> leading/trailing special tokens do not match TemplateProcessing<pair>"
                );
            }
            let end = if stop_trim { pair.len().saturating_sub(1) } else { pair.len() };
            let mid: &[Value] = if seq_start <= end { &pair[seq_start..end] } else { &[] };
            if !mid.is_empty() {
                let tmpl_a = seq_piece_id(mid.first());
                let tmpl_b = seq_piece_id(mid.last());
                let a_ok = tmpl_a.as_ref().and_then(Value::as_str) == Some("A");
                let b_ok = tmpl_b.as_ref().and_then(Value::as_str) == Some("B");
                if !a_ok || !b_ok {
                    tracing::warn!("unknown sequence {tmpl_a:?}...{tmpl_b:?} in TemplateProcessing<pair>");
                }
                // A [sep] [eos] B
                let inner: &[Value] = if mid.len() >= 2 { &mid[1..mid.len() - 1] } else { &[] };
                if a_ok && b_ok && !inner.is_empty() {
                    let mut add_sep = false;
                    let entry = special_piece_id(inner.first()).filter(truthy);
                    if entry.is_some() {
                        if in2(&entry, special_sep, special_eos) && special_last.is_none() {
                            add_sep = true;
                        }
                        if !in2(&entry, special_sep, special_eos) {
                            tracing::warn!("unknown separator token {entry:?} in TemplateProcessing<pair>");
                        }
                    } else {
                        tracing::warn!("unknown middle sequence in TemplateProcessing<pair>");
                    }
                    if inner.len() == 2 {
                        let entry = special_piece_id(inner.get(1)).filter(truthy);
                        if entry.is_some() {
                            if in2(&entry, special_sep, special_eos) {
                                add_sep = true;
                            } else {
                                tracing::warn!("unknown second separator token {entry:?} in TemplateProcessing<pair>");
                            }
                        } else {
                            tracing::warn!("unknown second middle sequence in TemplateProcessing<pair>");
                        }
                    }
                    self.set_add("sep", add_sep);
                    if add_sep && !opt_truthy(special_sep) && tc.as_ref().is_some_and(|m| !m.is_empty()) {
                        set_tc(tc, "sep_token", special_eos);
                    }
                }
            }
        }
    }

    fn load_from_config_json(&mut self, dir: &Path, config: &Value) -> Result<(), TokenizerError> {
        // The reference re-reads config.json; a directory without one contributes nothing.
        let path = dir.join("config.json");
        let text_config = config.get("text_config");
        let types = self.types.clone();
        for typ in &types {
            let key = format!("{typ}_token_id");
            let mut id = config.get(&key).filter(|v| !v.is_null());
            if id.is_none() {
                if let Some(tc) = text_config {
                    id = tc.get(&key);
                }
            }
            if let Some(id) = id {
                self.set_special_token(typ, id, &path)?;
            }
        }
        Ok(())
    }

    /// `SpecialVocab.add_to_gguf`.
    pub fn add_to_gguf(&self, w: &mut KvWriter, dir: &Path) -> Result<(), TokenizerError> {
        if !self.merges.is_empty() {
            w.add_array(keys::MERGES, ValueType::String, self.merges.iter().cloned().map(GgufValue::String).collect());
        } else if self.load_merges {
            tracing::warn!("adding merges requested but no merges found, output may be non-functional");
        }
        for (typ, id) in &self.ids {
            match id_key(typ) {
                Some(key) => w.add_u32(key, *id),
                None => tracing::debug!("no handler for special token type {typ} with id {id} - skipping"),
            }
        }
        for (typ, v) in &self.add {
            match typ.as_str() {
                "bos" => w.add_bool("tokenizer.ggml.add_bos_token", *v),
                "eos" => w.add_bool("tokenizer.ggml.add_eos_token", *v),
                "sep" => w.add_bool("tokenizer.ggml.add_sep_token", *v),
                _ => tracing::debug!("no handler for add_{typ}_token with value {v} - skipping"),
            }
        }
        if let Some(ct) = &self.chat_template {
            add_chat_template(w, ct, &dir.join("tokenizer_config.json"))?;
        }
        if let Some(v) = self.lowercase {
            w.add_bool(keys::NORMALIZER_LOWERCASE, v);
        }
        if let Some(v) = self.strip_accents {
            w.add_bool(keys::NORMALIZER_STRIP_ACCENTS, v);
        }
        Ok(())
    }
}

/// `gw.add_{typ}_token_id` handlers that exist in `gguf_writer.py`.
fn id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        "eot" => "tokenizer.ggml.eot_token_id",
        "eom" => "tokenizer.ggml.eom_token_id",
        _ => return None,
    })
}

/// `GGUFWriter.add_chat_template`.
fn add_chat_template(w: &mut KvWriter, ct: &ChatTemplate, path: &Path) -> Result<(), TokenizerError> {
    match ct {
        ChatTemplate::One(s) => w.add_string(keys::CHAT_TEMPLATE, s),
        ChatTemplate::Named(list) => {
            let mut default: Option<String> = None;
            // a Python set in the reference, so its order there depends on PYTHONHASHSEED; sling sorts the names
            let mut names: Vec<String> = Vec::new();
            for choice in list {
                let o = choice
                    .as_object()
                    .ok_or_else(|| invalid(path, format!("chat_template list entry is not an object: {choice}")))?;
                let name = match o.get("name") {
                    None => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => return Err(invalid(path, format!("chat_template name is not a string: {other}"))),
                };
                let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
                let template = match o.get("template") {
                    None | Some(Value::Null) => continue,
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(invalid(path, format!("chat_template {name:?} is not a string: {other}")))
                    }
                };
                if name.is_empty() {
                    continue;
                }
                if name == "default" {
                    default = Some(template);
                } else {
                    if !names.contains(&name) {
                        names.push(name.clone());
                    }
                    w.add_string(&format!("tokenizer.chat_template.{name}"), &template);
                }
            }
            names.sort();
            if !names.is_empty() {
                w.add_array(
                    keys::CHAT_TEMPLATES,
                    ValueType::String,
                    names.into_iter().map(GgufValue::String).collect(),
                );
            }
            if let Some(d) = default {
                w.add_string(keys::CHAT_TEMPLATE, &d);
            }
        }
    }
    Ok(())
}

/// `tokenizer.json` merges → `"a b"` strings (list-form merges joined with a space, inner spaces as U+0120).
fn convert_merges(path: &Path, merges: &[Value]) -> Result<Vec<String>, TokenizerError> {
    match merges.first() {
        Some(Value::String(_)) => merges
            .iter()
            .map(|m| m.as_str().map(str::to_string).ok_or_else(|| invalid(path, format!("merge {m} is not a string"))))
            .collect(),
        Some(Value::Array(p)) if p.len() == 2 && p[0].is_string() => {
            if merges
                .iter()
                .any(|m| m.as_array().is_some_and(|p| p.iter().any(|s| s.as_str().is_some_and(|s| s.contains(' ')))))
            {
                tracing::warn!("spaces in merges detected, encoding as U+0120");
            }
            merges
                .iter()
                .map(|m| {
                    let parts = m.as_array().ok_or_else(|| invalid(path, format!("merge {m} is not a pair")))?;
                    let enc: Result<Vec<String>, TokenizerError> = parts
                        .iter()
                        .map(|s| {
                            s.as_str()
                                .map(|s| s.replace(' ', "\u{0120}"))
                                .ok_or_else(|| invalid(path, format!("merge {m} has a non-string part")))
                        })
                        .collect();
                    Ok(enc?.join(" "))
                })
                .collect()
        }
        _ => Err(invalid(path, "unknown tokenizer merges format")),
    }
}

fn set_tc(tc: &mut Option<Map<String, Value>>, key: &str, v: &Option<Value>) {
    if let Some(m) = tc.as_mut() {
        m.insert(key.to_string(), v.clone().unwrap_or(Value::Null));
    }
}

fn bool_like(v: &Value) -> Option<bool> {
    match v {
        Value::Null => None,
        other => Some(truthy(other)),
    }
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}
