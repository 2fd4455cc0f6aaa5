//! The `general.*` naming and sampling keys, derived exactly as the reference converter derives them, so that the
//! whole output file (not only its tensors) equals `convert_hf_to_gguf.py`'s.
//!
//! Ported from the pinned llama.cpp's gguf-py:
//! - `gguf/metadata.py`: `Metadata.load` (generation_config.json sampling keys), `Metadata.id_to_title`,
//!   `Metadata.get_model_id_components`, `Metadata.apply_metadata_heuristic` (the `_name_or_path` and directory-name
//!   fallbacks) and `Metadata.set_gguf_meta_model` (the order the keys are written in);
//! - `gguf/utility.py`: `model_weight_count_rounded_notation`, `size_label`;
//! - `gguf/gguf_writer.py`: `GGUFWriter.get_total_parameter_count`;
//! - `conversion/base.py`: `ModelBase.prepare_metadata` (name fallback to the directory name, size label from the
//!   parameter counts).
//!
//! The model card (`README.md` YAML front matter: license, tags, languages, base models, datasets, name/author/...
//! overrides) as far as `convert/model_card.rs` reads it; a card it cannot read as PyYAML would is ignored and
//! reported ([`MODEL_CARD_NOTE`]), so that the difference is never silent. Not ported: `--metadata` override files and
//! `--model-name` (sling has no such options).

use std::path::Path;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;
use sling_formats::gguf::GgufValue;

use super::model_card::{Item, Scalar};

/// Python's `pathlib.Path(p).name` for the path the user gave (`"."` and `"/"` give `""`, `".."` gives `".."`).
pub fn py_path_name(p: &Path) -> String {
    use std::path::Component;
    match p.components().next_back() {
        Some(Component::Normal(s)) => s.to_string_lossy().into_owned(),
        Some(Component::ParentDir) => "..".into(),
        _ => String::new(),
    }
}

/// Python's `str.islower()`: at least one cased character and no uppercase (or titlecase) one.
fn py_islower(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_uppercase() {
            return false;
        }
        if c.is_lowercase() {
            cased = true;
        }
    }
    cased
}

/// Python's `str.title()`: a cased character after a cased one is lowercased, any other is uppercased.
fn py_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = cased;
    }
    out
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("valid regex"))
}

/// `Metadata.id_to_title`: words split on whitespace and `-`, lowercase words title-cased unless they are a
/// version (`v1.2`) or start with a digit.
pub fn id_to_title(s: &str) -> String {
    static KEEP: OnceLock<Regex> = OnceLock::new();
    let keep = re(&KEEP, r"^(v\d+(?:\.\d+)*|\d.*)$");
    s.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| if py_islower(w) && !keep.is_match(w) { py_title(w) } else { w.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `Metadata.get_model_id_components` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdComponents {
    pub full_name: Option<String>,
    pub org: Option<String>,
    pub basename: Option<String>,
    pub finetune: Option<String>,
    pub version: Option<String>,
    pub size_label: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ann {
    Basename,
    SizeLabel,
    Finetune,
    Version,
    Type,
}

/// Python's `float(s)` for the strings the size-label regex lets through (`12`, `1.5`, `8x7`, `A3`): `None` where
/// Python raises `ValueError`.
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.chars().all(|c| c.is_ascii_digit() || c == '.')
        && t.chars().filter(|&c| c == '.').count() <= 1
        && t.chars().any(|c| c.is_ascii_digit());
    if ok {
        t.parse().ok()
    } else {
        None
    }
}

/// `Metadata.get_model_id_components(model_id, total_params)`: splits a Hugging Face model id (`org/Name-7B-Chat`)
/// or a directory name into name, organization, basename, finetune, version and size label.
pub fn model_id_components(model_id: &str, total_params: i64) -> IdComponents {
    static VERSION: OnceLock<Regex> = OnceLock::new();
    static QTYPE: OnceLock<Regex> = OnceLock::new();
    static SIZE: OnceLock<Regex> = OnceLock::new();
    static FINETUNE: OnceLock<Regex> = OnceLock::new();
    // `re.fullmatch(..., re.IGNORECASE)`: anchored, case-insensitive.
    let version = re(&VERSION, r"(?i)^(?:(v|iter)?\d+([.]\d+)*)$");
    let qtype = re(&QTYPE, r"(?i)^(?:i?q\d(_\w)*|b?fp?(16|32))$");
    let size = re(&SIZE, r"(?i)^(?:(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl))$");
    let finetune = re(&FINETUNE, r"(?i)^(?:chat|instruct|vision|lora)$");

    if model_id.contains(' ') {
        return IdComponents { full_name: Some(model_id.to_string()), ..Default::default() };
    }
    let (mut org, full) = match model_id.split_once('/') {
        Some((o, f)) => (Some(o.to_string()), f.to_string()),
        None => (None, model_id.to_string()),
    };
    if org.as_deref().is_some_and(|o| o.starts_with('.')) {
        org = None;
    }
    let mut parts: Vec<String> = full.split('-').filter(|p| !p.is_empty()).map(str::to_string).collect();
    let mut types: Vec<Vec<Ann>> = vec![Vec::new(); parts.len()];
    let add = |t: &mut Vec<Ann>, a: Ann| {
        if !t.contains(&a) {
            t.push(a)
        }
    };
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if version.is_match(&part) {
            add(&mut types[i], Ann::Version);
        } else if qtype.is_match(&part) {
            add(&mut types[i], Ann::Type);
            parts[i] = part.to_uppercase();
        } else if i > 0 && size.is_match(&part) {
            let mut p: Vec<char> = part.replace('_', ".").chars().collect();
            // "Handle weird bloom-7b1 notation"
            if p.last().is_some_and(|c| c.is_ascii_digit()) {
                let n = p.len();
                let (a, b) = (p[n - 2], p[n - 1]);
                p.truncate(n - 2);
                p.extend(['.', b, a]);
            }
            // "Normalize the size suffixes"
            let n = p.len();
            if n > 1 && p[n - 2].is_ascii_digit() && "kmbt".contains(p[n - 1]) {
                p[n - 1] = p[n - 1].to_ascii_uppercase();
            }
            if total_params != 0 {
                let n = p.len();
                let head: String = p[..n - 1].iter().collect();
                if let Some(v) = py_float(&head) {
                    let label_params = v * 1000f64.powi(" KMBT".find(p[n - 1]).map_or(-1, |k| k as i32));
                    let tp = total_params as f64;
                    let context_length = (total_params < 0 && label_params < (total_params.abs() / 8) as f64)
                        || (total_params > 0 && (label_params - tp).abs() > (7 * total_params / 8) as f64);
                    if context_length {
                        // "Likely a context length": a finetune, with a lowercase suffix
                        add(&mut types[i], Ann::Finetune);
                        p[n - 1] = p[n - 1].to_ascii_lowercase();
                    }
                }
            }
            if types[i].is_empty() {
                add(&mut types[i], Ann::SizeLabel);
            }
            parts[i] = p.into_iter().collect();
        } else if i > 0 && finetune.is_match(&part) {
            if total_params < 0 && part.eq_ignore_ascii_case("lora") {
                add(&mut types[i], Ann::Type);
            } else {
                add(&mut types[i], Ann::Finetune);
            }
        }
    }
    // "Ignore word-based size labels when there is at least a number-based one present"
    let numeric_size =
        parts.iter().zip(&types).any(|(n, t)| t.contains(&Ann::SizeLabel) && n.chars().any(|c| c.is_ascii_digit()));
    if numeric_size {
        for (n, t) in parts.iter().zip(types.iter_mut()) {
            if t.contains(&Ann::SizeLabel) && n.chars().all(char::is_alphabetic) {
                t.retain(|a| *a != Ann::SizeLabel);
            }
        }
    }
    // "Find the basename through the annotated name"
    let mut at_start = true;
    for (part, t) in parts.iter().zip(types.iter_mut()) {
        let alpha_first = part.chars().next().is_some_and(char::is_alphabetic);
        if at_start && ((t.is_empty() && alpha_first) || t.contains(&Ann::Version)) {
            add(t, Ann::Basename);
        } else {
            at_start = false;
            if t.is_empty() {
                add(t, Ann::Finetune);
            }
        }
    }
    // "Remove the basename annotation from trailing version"
    for t in types.iter_mut().rev() {
        if t.contains(&Ann::Basename) && t.len() > 1 {
            t.retain(|a| *a != Ann::Basename);
        } else {
            break;
        }
    }
    let join = |keep: &dyn Fn(&Vec<Ann>) -> bool, dedup: bool| {
        let mut v: Vec<&str> = Vec::new();
        for (n, t) in parts.iter().zip(&types) {
            if keep(t) && !(dedup && v.contains(&n.as_str())) {
                v.push(n);
            }
        }
        (!v.is_empty()).then(|| v.join("-"))
    };
    let mut basename = join(&|t| t.contains(&Ann::Basename), false);
    let size_label = join(&|t| t.contains(&Ann::SizeLabel), true);
    let finetune = join(&|t| t.contains(&Ann::Finetune), false);
    let version = join(&|t| t.contains(&Ann::Version) && !t.contains(&Ann::Basename), false);
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        // "Too ambiguous, output nothing"
        basename = None;
    }
    // Python's `'-'.join(...) or None`: an empty join is None (parts are never empty strings here).
    IdComponents { full_name: Some(full), org, basename, finetune, version, size_label }
}

/// `model_weight_count_rounded_notation`.
pub fn weight_count_rounded_notation(n: u64, min_digits: usize) -> String {
    let x = n as f64;
    let (scaled, suffix) = if x > 1e12 {
        (x * 1e-12, "T")
    } else if x > 1e9 {
        (x * 1e-9, "B")
    } else if x > 1e6 {
        (x * 1e-6, "M")
    } else {
        (x * 1e-3, "K")
    };
    // Python's `round()` rounds half to even; `str(...).lstrip('0')` counts the integer digits ("0" -> 0).
    let r = scaled.round_ties_even() as u64;
    let digits = if r == 0 { 0 } else { r.to_string().len() };
    let fix = min_digits.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// `gguf.size_label(total, shared, expert, expert_count)`.
pub fn size_label(total: u64, shared: u64, expert: u64, expert_count: u64) -> String {
    if expert_count > 0 {
        format!("{expert_count}x{}", weight_count_rounded_notation(shared + expert, 2))
    } else {
        weight_count_rounded_notation(total, 2)
    }
}

/// `GGUFWriter.get_total_parameter_count` over the output tensors (name, ggml `ne`): total, shared and per-expert
/// parameters and the mean expert count. (No LoRA tensors here: the total is exact.)
pub fn parameter_counts<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [u64])>) -> (u64, u64, u64, u64) {
    let (mut total, mut shared, mut expert, mut expert_sum, mut n_expert_tensors) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for (name, ne) in tensors {
        let size: u64 = ne.iter().product();
        // numpy order is `ne` reversed: shape[-2] = ne[1], shape[-3] = ne[2]
        if name.contains("_exps.") && ne.len() >= 3 {
            let count = if name.contains(".bias") { ne[1] } else { ne[2] };
            expert += size.checked_div(count).unwrap_or(0);
            expert_sum += count;
            n_expert_tensors += 1;
        } else {
            shared += size;
        }
        total += size;
    }
    let expert_count = expert_sum.checked_div(n_expert_tensors).unwrap_or(0);
    (total, shared, expert, expert_count)
}

/// A base model or dataset entry of the model card (`Metadata.base_models` / `datasets` items).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Source {
    pub name: Option<String>,
    pub version: Option<String>,
    pub organization: Option<String>,
    pub repo_url: Option<String>,
}

/// The metadata the reference derives (the `Metadata` fields sling fills).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Naming {
    pub name: String,
    pub author: Option<String>,
    pub version: Option<String>,
    pub organization: Option<String>,
    pub finetune: Option<String>,
    pub basename: Option<String>,
    pub description: Option<String>,
    pub size_label: Option<String>,
    pub license: Option<String>,
    pub license_name: Option<String>,
    pub license_link: Option<String>,
    pub source_url: Option<String>,
    pub source_doi: Option<String>,
    pub source_uuid: Option<String>,
    pub source_repo_url: Option<String>,
    pub base_models: Option<Vec<Source>>,
    pub datasets: Option<Vec<Source>>,
    pub tags: Option<Vec<String>>,
    pub languages: Option<Vec<String>>,
}

/// The model-card part of `Metadata.apply_metadata_heuristic`. `Err` (with the key) where the card holds a value the
/// reference would take as something else than the strings handled here.
fn apply_card(card: &[(String, Item)], m: &mut Naming, name: &mut Option<String>, total: i64) -> Result<(), String> {
    let get = |k: &str| card.iter().find(|(x, _)| x == k).map(|(_, v)| v);
    let string = |k: &str| -> Result<Option<String>, String> {
        match get(k) {
            None | Some(Item::Scalar(Scalar::Null)) => Ok(None),
            Some(Item::Scalar(Scalar::Str(v))) => Ok(Some(v.clone())),
            Some(_) => Err(format!("model card key {k:?} is not a string")),
        }
    };
    // use_model_card_metadata(field, key), in the reference's order ("name" is the only field kept outside `m`)
    const FIELDS: &[(&str, &str)] = &[
        ("name", "name"),
        ("author", "author"),
        ("version", "version"),
        ("organization", "organization"),
        ("description", "description"),
        ("finetune", "finetune"),
        ("basename", "basename"),
        ("size_label", "size_label"),
        ("source_url", "url"),
        ("source_doi", "doi"),
        ("source_uuid", "uuid"),
        ("source_repo_url", "repo_url"),
        ("name", "model_name"),
        ("author", "model_author"),
        ("version", "model_version"),
        ("organization", "model_organization"),
        ("description", "model_description"),
        ("finetune", "model_finetune"),
        ("basename", "model_basename"),
        ("size_label", "model_size_label"),
        ("source_url", "model_url"),
        ("source_doi", "model_doi"),
        ("source_uuid", "model_uuid"),
        ("source_repo_url", "model_repo_url"),
        ("name", "model_name"),
        ("author", "model_creator"),
        ("basename", "model_type"),
    ];
    for (field, key) in FIELDS {
        let slot = match *field {
            "name" => &mut *name,
            "author" => &mut m.author,
            "version" => &mut m.version,
            "organization" => &mut m.organization,
            "description" => &mut m.description,
            "finetune" => &mut m.finetune,
            "basename" => &mut m.basename,
            "size_label" => &mut m.size_label,
            "source_url" => &mut m.source_url,
            "source_doi" => &mut m.source_doi,
            "source_uuid" => &mut m.source_uuid,
            _ => &mut m.source_repo_url,
        };
        if slot.is_none() {
            *slot = string(key)?;
        }
    }
    // base models and datasets: `card.get(a, card.get(b, card.get(c)))`, each entry a model id or a URL
    let sources = |keys: [&str; 3]| -> Result<Option<Vec<Source>>, String> {
        let Some(v) = keys.iter().find_map(|k| get(k)) else { return Ok(None) };
        let items: Vec<Scalar> = match v {
            Item::Scalar(Scalar::Null) => Vec::new(),
            Item::Scalar(Scalar::Str(x)) => vec![Scalar::Str(x.clone())],
            Item::List(l) => l.clone(),
            _ => return Err(format!("model card key {:?} is not a string or a list of them", keys[0])),
        };
        let mut out = Vec::new();
        for it in items {
            let mut e = Source::default();
            match it {
                // "not in a known format": logged, and an empty entry is kept
                Scalar::Null => {}
                Scalar::Other => return Err(format!("model card key {:?}: an entry is not a string", keys[0])),
                Scalar::Str(id) => {
                    if id.starts_with("http://") || id.starts_with("https://") || id.starts_with("ssh://") {
                        e.repo_url = Some(id.clone());
                        if id.contains("huggingface.co") {
                            static HF: OnceLock<Regex> = OnceLock::new();
                            let hf = re(&HF, r"^https?://huggingface.co/([^/]+/[^/]+)$");
                            if let Some(c) = hf.captures(&id) {
                                let c = model_id_components(&c[1], total);
                                e.name = c.full_name.as_deref().map(id_to_title);
                                e.organization = c.org.as_deref().map(id_to_title);
                                e.version = c.version;
                            }
                        }
                    } else {
                        let c = model_id_components(&id, total);
                        e.name = c.full_name.as_deref().map(id_to_title);
                        e.organization = c.org.as_deref().map(id_to_title);
                        e.version = c.version;
                        if let (Some(o), Some(f)) = (&c.org, &c.full_name) {
                            e.repo_url = Some(format!("https://huggingface.co/{o}/{f}"));
                        }
                    }
                }
            }
            out.push(e);
        }
        Ok(Some(out))
    };
    if let Some(b) = sources(["base_model", "base_models", "base_model_sources"])? {
        m.base_models.get_or_insert_with(Vec::new).extend(b);
    }
    if let Some(d) = sources(["datasets", "dataset", "dataset_sources"])? {
        m.datasets.get_or_insert_with(Vec::new).extend(d);
    }
    // license: a string, or a list joined with "," when written
    if m.license.is_none() {
        m.license = match get("license") {
            None | Some(Item::Scalar(Scalar::Null)) => None,
            Some(Item::Scalar(Scalar::Str(v))) => Some(v.clone()),
            Some(Item::List(l)) if !l.is_empty() && l.iter().all(|x| matches!(x, Scalar::Str(_))) => Some(
                l.iter().map(|x| if let Scalar::Str(v) = x { v.as_str() } else { "" }).collect::<Vec<_>>().join(","),
            ),
            Some(_) => return Err("model card key \"license\" is not a string or a list of them".into()),
        };
    }
    if m.license_name.is_none() {
        m.license_name = string("license_name")?;
    }
    if m.license_link.is_none() {
        m.license_link = string("license_link")?;
    }
    // use_array_model_card_metadata: appended
    for (field, key) in
        [("tags", "tags"), ("tags", "pipeline_tag"), ("languages", "languages"), ("languages", "language")]
    {
        let add: Vec<String> = match get(key) {
            None | Some(Item::Scalar(Scalar::Null)) => continue,
            Some(Item::Scalar(Scalar::Str(v))) => vec![v.clone()],
            Some(Item::List(l)) if l.iter().all(|x| matches!(x, Scalar::Str(_))) => {
                l.iter().map(|x| if let Scalar::Str(v) = x { v.clone() } else { String::new() }).collect()
            }
            Some(_) => return Err(format!("model card key {key:?} is not a string or a list of strings")),
        };
        let slot = if field == "tags" { &mut m.tags } else { &mut m.languages };
        slot.get_or_insert_with(Vec::new).extend(add);
    }
    for (k, v) in [("tags", &m.tags), ("languages", &m.languages)] {
        if v.as_ref().is_some_and(Vec::is_empty) {
            return Err(format!("model card key {k:?} is an empty list (the reference cannot write it)"));
        }
    }
    Ok(())
}

/// `Metadata.apply_metadata_heuristic` (the model card, config.json `_name_or_path`, then the directory name)
/// followed by `prepare_metadata`'s fallbacks: the directory name as the name, the size label from the parameter
/// counts. `dir_name` is Python's `Path(model_dir).name`; `counts` is [`parameter_counts`]; `card` the model card's
/// keys ([`model_card::read`]). `Err` says which card value this port does not take as the reference would.
pub fn derive_naming(
    dir_name: &str,
    config: Option<&Value>,
    counts: (u64, u64, u64, u64),
    card: &[(String, Item)],
) -> Result<Naming, String> {
    let (total, shared, expert, expert_count) = counts;
    let total_i = i64::try_from(total).unwrap_or(i64::MAX);
    let mut name: Option<String> = None;
    let mut m = Naming::default();
    apply_card(card, &mut m, &mut name, total_i)?;
    let mut apply = |c: IdComponents, m: &mut Naming| {
        if name.is_none() {
            name = c.full_name.as_deref().map(id_to_title);
        }
        if m.organization.is_none() {
            m.organization = c.org.as_deref().map(id_to_title);
        }
        m.basename = m.basename.take().or(c.basename);
        m.finetune = m.finetune.take().or(c.finetune);
        m.version = m.version.take().or(c.version);
        m.size_label = m.size_label.take().or(c.size_label);
    };
    // "Use _name_or_path only if its actually a model name and not some computer path"
    if let Some(Value::String(id)) = config.and_then(|c| c.get("_name_or_path")) {
        if id.matches('/').count() <= 1 {
            apply(model_id_components(id, total_i), &mut m);
        }
    }
    apply(model_id_components(dir_name, total_i), &mut m);
    m.name = name.unwrap_or_else(|| dir_name.to_string());
    if m.size_label.is_none() && total > 0 {
        m.size_label = Some(size_label(total, shared, expert, expert_count));
    }
    Ok(m)
}

/// The sampling keys `Metadata.load` takes from generation_config.json, in `set_gguf_meta_model`'s order, with the
/// writer's types (`add_sampling_*`: INT32 or FLOAT32; `sequence` a string). A file that does not parse is ignored,
/// as in the reference; a value of another JSON type than the key's is skipped.
pub fn sampling_kvs(generation_config: Option<&Value>) -> Vec<(String, GgufValue)> {
    #[derive(Clone, Copy)]
    enum K {
        Str,
        I32,
        F32,
    }
    let Some(Value::Object(g)) = generation_config else { return Vec::new() };
    let get = |k: &str| g.get(k).filter(|v| !v.is_null());
    let fields: [(&str, K, Option<&Value>); 12] = [
        ("sequence", K::Str, get("sequence")),
        ("top_k", K::I32, get("top_k")),
        ("top_p", K::F32, get("top_p")),
        ("min_p", K::F32, get("min_p")),
        ("xtc_probability", K::F32, get("xtc_probability")),
        ("xtc_threshold", K::F32, get("xtc_threshold")),
        ("temp", K::F32, get("temperature")),
        ("penalty_last_n", K::I32, get("penalty_last_n")),
        // `gen_config.get("penalty_repeat", gen_config.get("repetition_penalty", ...))`
        (
            "penalty_repeat",
            K::F32,
            if g.contains_key("penalty_repeat") { get("penalty_repeat") } else { get("repetition_penalty") },
        ),
        ("mirostat", K::I32, get("mirostat")),
        ("mirostat_tau", K::F32, get("mirostat_tau")),
        ("mirostat_eta", K::F32, get("mirostat_eta")),
    ];
    let mut out = Vec::new();
    for (key, kind, v) in fields {
        let Some(v) = v else { continue };
        let gv = match kind {
            K::Str => v.as_str().map(|s| GgufValue::String(s.to_string())),
            K::I32 => v.as_i64().and_then(|x| i32::try_from(x).ok()).map(GgufValue::I32),
            K::F32 => v.as_f64().map(|x| GgufValue::F32(x as f32)),
        };
        if let Some(gv) = gv {
            out.push((format!("general.sampling.{key}"), gv));
        }
    }
    out
}

/// The keys `set_gguf_meta_model` writes for `naming`, after the sampling keys, in its order.
pub fn naming_kvs(n: &Naming) -> Vec<(String, GgufValue)> {
    let mut out = vec![("general.name".to_string(), GgufValue::String(n.name.clone()))];
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            out.push((k.to_string(), GgufValue::String(v.clone())));
        }
    };
    put("general.author", &n.author);
    put("general.version", &n.version);
    put("general.organization", &n.organization);
    put("general.finetune", &n.finetune);
    put("general.basename", &n.basename);
    put("general.description", &n.description);
    put("general.size_label", &n.size_label);
    put("general.license", &n.license);
    put("general.license.name", &n.license_name);
    put("general.license.link", &n.license_link);
    put("general.source.url", &n.source_url);
    put("general.source.doi", &n.source_doi);
    put("general.source.uuid", &n.source_uuid);
    put("general.source.repo_url", &n.source_repo_url);
    for (what, list) in [("base_model", &n.base_models), ("dataset", &n.datasets)] {
        let Some(list) = list else { continue };
        out.push((format!("general.{what}.count"), GgufValue::U32(list.len() as u32)));
        for (i, e) in list.iter().enumerate() {
            for (k, v) in [
                ("name", &e.name),
                ("version", &e.version),
                ("organization", &e.organization),
                ("repo_url", &e.repo_url),
            ] {
                if let Some(v) = v {
                    out.push((format!("general.{what}.{i}.{k}"), GgufValue::String(v.clone())));
                }
            }
        }
    }
    for (k, v) in [("general.tags", &n.tags), ("general.languages", &n.languages)] {
        if let Some(v) = v {
            let a = v.iter().map(|x| GgufValue::String(x.clone())).collect();
            out.push((k.to_string(), GgufValue::Array(sling_formats::gguf::ValueType::String, a)));
        }
    }
    out
}

/// The start of the plan's note when the model card cannot be read as the reference reads it ([`card_keys`] fails);
/// the CLI prints that note as a warning.
pub const MODEL_CARD_NOTE: &str = "README.md's model card (YAML front matter) is not fully understood by sling, \
which then writes none of its metadata, where convert_hf_to_gguf.py copies it into general.* keys (license, tags, \
base models, ...): the metadata differs from the reference's there (docs/conversion.md)";

/// The model card's top-level keys, checked to be taken by this port as the reference takes them; `Err` with the
/// reason otherwise (the conversion then ignores the card and says so).
pub fn card_keys(dir: &Path) -> Result<Vec<(String, Item)>, String> {
    match super::model_card::read(dir) {
        super::model_card::Card::None => Ok(Vec::new()),
        super::model_card::Card::Unsupported(r) => Err(r),
        super::model_card::Card::Keys(k) => {
            apply_card(&k, &mut Naming::default(), &mut None, 0)?;
            Ok(k)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Option<String> {
        Some(x.to_string())
    }

    /// (model id, total params) -> (full name, org, basename, finetune, version, size label), as printed by the
    /// pinned gguf-py's `Metadata.get_model_id_components` (the cases of its tests/test_metadata.py and more).
    #[test]
    fn model_id_components_like_gguf_py() {
        #[rustfmt::skip]
        let cases: Vec<(&str, i64, [Option<String>; 6])> = vec![
        ("Mistral/Mixtral-8x7B-Instruct-v0.1", 0, [s("Mixtral-8x7B-Instruct-v0.1"), s("Mistral"), s("Mixtral"), s("Instruct"), s("v0.1"), s("8x7B")]),
        ("Mixtral-8x7B", 0, [s("Mixtral-8x7B"), None, s("Mixtral"), None, None, s("8x7B")]),
        ("Llama-2-7b-chat-hf", 0, [s("Llama-2-7b-chat-hf"), None, s("Llama-2"), s("chat-hf"), None, s("7B")]),
        ("hermes-2-pro-llama-3-8b-DPO", 0, [s("hermes-2-pro-llama-3-8b-DPO"), None, s("hermes-2-pro-llama-3"), s("DPO"), None, s("8B")]),
        ("bloom-7b1-petals", 0, [s("bloom-7b1-petals"), None, s("bloom"), s("petals"), None, s("7.1B")]),
        ("Qwen2-1.5B-Instruct-GGUF", 0, [s("Qwen2-1.5B-Instruct-GGUF"), None, s("Qwen2"), s("Instruct-GGUF"), None, s("1.5B")]),
        ("Meta-Llama-3-8B-Instruct", 0, [s("Meta-Llama-3-8B-Instruct"), None, s("Meta-Llama-3"), s("Instruct"), None, s("8B")]),
        ("gpt2", 0, [s("gpt2"), None, None, None, None, None]),
        ("Phi-3-mini-128k-instruct", 0, [s("Phi-3-mini-128k-instruct"), None, s("Phi-3-mini"), s("instruct"), None, s("128K")]),
        ("Phi-3-mini-128k-instruct", 3800000000, [s("Phi-3-mini-128k-instruct"), None, s("Phi-3"), s("128k-instruct"), None, s("mini")]),
        ("Qwen1.5-MoE-A2.7B-Chat", 0, [s("Qwen1.5-MoE-A2.7B-Chat"), None, s("Qwen1.5-MoE"), s("Chat"), None, s("A2.7B")]),
        ("Mixtral-8x7B-v0.1", 0, [s("Mixtral-8x7B-v0.1"), None, s("Mixtral"), None, s("v0.1"), s("8x7B")]),
        ("Qwen2-57B-A14B-Instruct", 0, [s("Qwen2-57B-A14B-Instruct"), None, s("Qwen2"), s("Instruct"), None, s("57B-A14B")]),
        ("qwen3moe", 0, [s("qwen3moe"), None, None, None, None, None]),
        ("mixtral-sharded", 0, [s("mixtral-sharded"), None, None, None, None, None]),
        ("llama-f32", 0, [s("llama-f32"), None, None, None, None, None]),
        ("a sentence with spaces", 0, [s("a sentence with spaces"), None, None, None, None, None]),
        ("./x-7B", 0, [s("x-7B"), None, s("x"), None, None, s("7B")]),
        ("Qwen3-30B-A3B-Instruct-2507", 30000000000, [s("Qwen3-30B-A3B-Instruct-2507"), None, s("Qwen3"), s("Instruct"), s("2507"), s("30B-A3B")]),
        ("gpt-oss-20b", 20000000000, [s("gpt-oss-20b"), None, s("gpt-oss"), None, None, s("20B")]),
        ("DeepSeek-V3-0324", 0, [s("DeepSeek-V3-0324"), None, s("DeepSeek"), None, s("V3-0324"), None]),
        ("Mistral-7B-v0.1-q4_k_m", 0, [s("Mistral-7B-v0.1-q4_k_m"), None, s("Mistral"), None, s("v0.1"), s("7B")]),
        ("model-7b1", 0, [s("model-7b1"), None, s("model"), None, None, s("7.1B")]),
        ("x-small-7B", 0, [s("x-small-7B"), None, s("x-small"), None, None, s("7B")]),
        ("foo-128k", 7000000000, [s("foo-128k"), None, s("foo"), s("128k"), None, None]),
        ("Qwen2.5-7B-Instruct-1M", 7000000000, [s("Qwen2.5-7B-Instruct-1M"), None, s("Qwen2.5"), s("Instruct-1m"), None, s("7B")]),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1500000000, [s("DeepSeek-R1-Distill-Qwen-1.5B"), s("deepseek-ai"), s("DeepSeek-R1-Distill-Qwen"), None, None, s("1.5B")]),
        ("iter2-v1.5-chat", 0, [s("iter2-v1.5-chat"), None, s("iter2-v1.5"), s("chat"), None, None]),
        ("Foo-xl-7B-Vision", 0, [s("Foo-xl-7B-Vision"), None, s("Foo-xl"), s("Vision"), None, s("7B")]),
        ("org/sub/x", 0, [s("sub/x"), s("org"), None, None, None, None]),
        ("7B-model", 0, [s("7B-model"), None, None, s("7B-model"), None, None]),
        // real Hugging Face ids and odd directory names, at four parameter counts
        ("Qwen/Qwen3-235B-A22B-Instruct-2507", 0, [s("Qwen3-235B-A22B-Instruct-2507"), s("Qwen"), s("Qwen3"), s("Instruct"), s("2507"), s("235B-A22B")]),
        ("Qwen/Qwen3-235B-A22B-Instruct-2507", 30000000000, [s("Qwen3-235B-A22B-Instruct-2507"), s("Qwen"), s("Qwen3"), s("235b-Instruct"), s("2507"), s("A22B")]),
        ("Qwen/Qwen3-235B-A22B-Instruct-2507", 112000, [s("Qwen3-235B-A22B-Instruct-2507"), s("Qwen"), s("Qwen3"), s("235b-Instruct"), s("2507"), s("A22B")]),
        ("Qwen/Qwen3-235B-A22B-Instruct-2507", 7000000000, [s("Qwen3-235B-A22B-Instruct-2507"), s("Qwen"), s("Qwen3"), s("235b-Instruct"), s("2507"), s("A22B")]),
        ("Qwen/Qwen3-30B-A3B", 0, [s("Qwen3-30B-A3B"), s("Qwen"), s("Qwen3"), None, None, s("30B-A3B")]),
        ("Qwen/Qwen3-30B-A3B", 30000000000, [s("Qwen3-30B-A3B"), s("Qwen"), s("Qwen3"), None, None, s("30B-A3B")]),
        ("Qwen/Qwen3-30B-A3B", 112000, [s("Qwen3-30B-A3B"), s("Qwen"), s("Qwen3"), s("30b"), None, s("A3B")]),
        ("Qwen/Qwen3-30B-A3B", 7000000000, [s("Qwen3-30B-A3B"), s("Qwen"), s("Qwen3"), s("30b"), None, s("A3B")]),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", 0, [s("Qwen2.5-Coder-32B-Instruct"), s("Qwen"), s("Qwen2.5-Coder"), s("Instruct"), None, s("32B")]),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", 30000000000, [s("Qwen2.5-Coder-32B-Instruct"), s("Qwen"), s("Qwen2.5-Coder"), s("Instruct"), None, s("32B")]),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", 112000, [s("Qwen2.5-Coder-32B-Instruct"), s("Qwen"), s("Qwen2.5-Coder"), s("32b-Instruct"), None, None]),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", 7000000000, [s("Qwen2.5-Coder-32B-Instruct"), s("Qwen"), s("Qwen2.5-Coder"), s("32b-Instruct"), None, None]),
        ("deepseek-ai/DeepSeek-V3-0324", 0, [s("DeepSeek-V3-0324"), s("deepseek-ai"), s("DeepSeek"), None, s("V3-0324"), None]),
        ("deepseek-ai/DeepSeek-V3-0324", 30000000000, [s("DeepSeek-V3-0324"), s("deepseek-ai"), s("DeepSeek"), None, s("V3-0324"), None]),
        ("deepseek-ai/DeepSeek-V3-0324", 112000, [s("DeepSeek-V3-0324"), s("deepseek-ai"), s("DeepSeek"), None, s("V3-0324"), None]),
        ("deepseek-ai/DeepSeek-V3-0324", 7000000000, [s("DeepSeek-V3-0324"), s("deepseek-ai"), s("DeepSeek"), None, s("V3-0324"), None]),
        ("deepseek-ai/DeepSeek-R1", 0, [s("DeepSeek-R1"), s("deepseek-ai"), None, None, None, None]),
        ("deepseek-ai/DeepSeek-R1", 30000000000, [s("DeepSeek-R1"), s("deepseek-ai"), None, None, None, None]),
        ("deepseek-ai/DeepSeek-R1", 112000, [s("DeepSeek-R1"), s("deepseek-ai"), None, None, None, None]),
        ("deepseek-ai/DeepSeek-R1", 7000000000, [s("DeepSeek-R1"), s("deepseek-ai"), None, None, None, None]),
        ("deepseek-ai/DeepSeek-V2-Lite-Chat", 0, [s("DeepSeek-V2-Lite-Chat"), s("deepseek-ai"), s("DeepSeek-V2-Lite"), s("Chat"), None, None]),
        ("deepseek-ai/DeepSeek-V2-Lite-Chat", 30000000000, [s("DeepSeek-V2-Lite-Chat"), s("deepseek-ai"), s("DeepSeek-V2-Lite"), s("Chat"), None, None]),
        ("deepseek-ai/DeepSeek-V2-Lite-Chat", 112000, [s("DeepSeek-V2-Lite-Chat"), s("deepseek-ai"), s("DeepSeek-V2-Lite"), s("Chat"), None, None]),
        ("deepseek-ai/DeepSeek-V2-Lite-Chat", 7000000000, [s("DeepSeek-V2-Lite-Chat"), s("deepseek-ai"), s("DeepSeek-V2-Lite"), s("Chat"), None, None]),
        ("mistralai/Mixtral-8x22B-Instruct-v0.1", 0, [s("Mixtral-8x22B-Instruct-v0.1"), s("mistralai"), s("Mixtral"), s("Instruct"), s("v0.1"), s("8x22B")]),
        ("mistralai/Mixtral-8x22B-Instruct-v0.1", 30000000000, [s("Mixtral-8x22B-Instruct-v0.1"), s("mistralai"), s("Mixtral"), s("Instruct"), s("v0.1"), s("8x22B")]),
        ("mistralai/Mixtral-8x22B-Instruct-v0.1", 112000, [s("Mixtral-8x22B-Instruct-v0.1"), s("mistralai"), s("Mixtral"), s("Instruct"), s("v0.1"), s("8x22B")]),
        ("mistralai/Mixtral-8x22B-Instruct-v0.1", 7000000000, [s("Mixtral-8x22B-Instruct-v0.1"), s("mistralai"), s("Mixtral"), s("Instruct"), s("v0.1"), s("8x22B")]),
        ("openai/gpt-oss-120b", 0, [s("gpt-oss-120b"), s("openai"), s("gpt-oss"), None, None, s("120B")]),
        ("openai/gpt-oss-120b", 30000000000, [s("gpt-oss-120b"), s("openai"), s("gpt-oss"), s("120b"), None, None]),
        ("openai/gpt-oss-120b", 112000, [s("gpt-oss-120b"), s("openai"), s("gpt-oss"), s("120b"), None, None]),
        ("openai/gpt-oss-120b", 7000000000, [s("gpt-oss-120b"), s("openai"), s("gpt-oss"), s("120b"), None, None]),
        ("allenai/OLMoE-1B-7B-0924-Instruct", 0, [s("OLMoE-1B-7B-0924-Instruct"), s("allenai"), s("OLMoE"), s("Instruct"), s("0924"), s("1B-7B")]),
        ("allenai/OLMoE-1B-7B-0924-Instruct", 30000000000, [s("OLMoE-1B-7B-0924-Instruct"), s("allenai"), s("OLMoE"), s("1b-Instruct"), s("0924"), s("7B")]),
        ("allenai/OLMoE-1B-7B-0924-Instruct", 112000, [s("OLMoE-1B-7B-0924-Instruct"), s("allenai"), s("OLMoE"), s("1b-7b-Instruct"), s("0924"), None]),
        ("allenai/OLMoE-1B-7B-0924-Instruct", 7000000000, [s("OLMoE-1B-7B-0924-Instruct"), s("allenai"), s("OLMoE"), s("Instruct"), s("0924"), s("1B-7B")]),
        ("meta-llama/Llama-3.1-8B-Instruct", 0, [s("Llama-3.1-8B-Instruct"), s("meta-llama"), s("Llama-3.1"), s("Instruct"), None, s("8B")]),
        ("meta-llama/Llama-3.1-8B-Instruct", 30000000000, [s("Llama-3.1-8B-Instruct"), s("meta-llama"), s("Llama-3.1"), s("Instruct"), None, s("8B")]),
        ("meta-llama/Llama-3.1-8B-Instruct", 112000, [s("Llama-3.1-8B-Instruct"), s("meta-llama"), s("Llama-3.1"), s("8b-Instruct"), None, None]),
        ("meta-llama/Llama-3.1-8B-Instruct", 7000000000, [s("Llama-3.1-8B-Instruct"), s("meta-llama"), s("Llama-3.1"), s("Instruct"), None, s("8B")]),
        ("meta-llama/Meta-Llama-3-70B", 0, [s("Meta-Llama-3-70B"), s("meta-llama"), s("Meta-Llama-3"), None, None, s("70B")]),
        ("meta-llama/Meta-Llama-3-70B", 30000000000, [s("Meta-Llama-3-70B"), s("meta-llama"), s("Meta-Llama-3"), s("70b"), None, None]),
        ("meta-llama/Meta-Llama-3-70B", 112000, [s("Meta-Llama-3-70B"), s("meta-llama"), s("Meta-Llama-3"), s("70b"), None, None]),
        ("meta-llama/Meta-Llama-3-70B", 7000000000, [s("Meta-Llama-3-70B"), s("meta-llama"), s("Meta-Llama-3"), s("70b"), None, None]),
        ("microsoft/Phi-3.5-MoE-instruct", 0, [s("Phi-3.5-MoE-instruct"), s("microsoft"), s("Phi-3.5-MoE"), s("instruct"), None, None]),
        ("microsoft/Phi-3.5-MoE-instruct", 30000000000, [s("Phi-3.5-MoE-instruct"), s("microsoft"), s("Phi-3.5-MoE"), s("instruct"), None, None]),
        ("microsoft/Phi-3.5-MoE-instruct", 112000, [s("Phi-3.5-MoE-instruct"), s("microsoft"), s("Phi-3.5-MoE"), s("instruct"), None, None]),
        ("microsoft/Phi-3.5-MoE-instruct", 7000000000, [s("Phi-3.5-MoE-instruct"), s("microsoft"), s("Phi-3.5-MoE"), s("instruct"), None, None]),
        ("google/gemma-2-9b-it", 0, [s("gemma-2-9b-it"), s("google"), s("gemma-2"), s("it"), None, s("9B")]),
        ("google/gemma-2-9b-it", 30000000000, [s("gemma-2-9b-it"), s("google"), s("gemma-2"), s("it"), None, s("9B")]),
        ("google/gemma-2-9b-it", 112000, [s("gemma-2-9b-it"), s("google"), s("gemma-2"), s("9b-it"), None, None]),
        ("google/gemma-2-9b-it", 7000000000, [s("gemma-2-9b-it"), s("google"), s("gemma-2"), s("it"), None, s("9B")]),
        ("moonshotai/Kimi-K2-Instruct", 0, [s("Kimi-K2-Instruct"), s("moonshotai"), s("Kimi-K2"), s("Instruct"), None, None]),
        ("moonshotai/Kimi-K2-Instruct", 30000000000, [s("Kimi-K2-Instruct"), s("moonshotai"), s("Kimi-K2"), s("Instruct"), None, None]),
        ("moonshotai/Kimi-K2-Instruct", 112000, [s("Kimi-K2-Instruct"), s("moonshotai"), s("Kimi-K2"), s("Instruct"), None, None]),
        ("moonshotai/Kimi-K2-Instruct", 7000000000, [s("Kimi-K2-Instruct"), s("moonshotai"), s("Kimi-K2"), s("Instruct"), None, None]),
        ("zai-org/GLM-4.5-Air", 0, [s("GLM-4.5-Air"), s("zai-org"), None, None, None, None]),
        ("zai-org/GLM-4.5-Air", 30000000000, [s("GLM-4.5-Air"), s("zai-org"), None, None, None, None]),
        ("zai-org/GLM-4.5-Air", 112000, [s("GLM-4.5-Air"), s("zai-org"), None, None, None, None]),
        ("zai-org/GLM-4.5-Air", 7000000000, [s("GLM-4.5-Air"), s("zai-org"), None, None, None, None]),
        ("ibm-granite/granite-3.1-3b-a800m-instruct", 0, [s("granite-3.1-3b-a800m-instruct"), s("ibm-granite"), s("granite-3.1"), s("instruct"), None, s("3B-a800M")]),
        ("ibm-granite/granite-3.1-3b-a800m-instruct", 30000000000, [s("granite-3.1-3b-a800m-instruct"), s("ibm-granite"), s("granite-3.1"), s("3b-instruct"), None, s("a800M")]),
        ("ibm-granite/granite-3.1-3b-a800m-instruct", 112000, [s("granite-3.1-3b-a800m-instruct"), s("ibm-granite"), s("granite-3.1"), s("3b-instruct"), None, s("a800M")]),
        ("ibm-granite/granite-3.1-3b-a800m-instruct", 7000000000, [s("granite-3.1-3b-a800m-instruct"), s("ibm-granite"), s("granite-3.1"), s("instruct"), None, s("3B-a800M")]),
        ("Qwen/Qwen1.5-MoE-A2.7B", 0, [s("Qwen1.5-MoE-A2.7B"), s("Qwen"), s("Qwen1.5-MoE"), None, None, s("A2.7B")]),
        ("Qwen/Qwen1.5-MoE-A2.7B", 30000000000, [s("Qwen1.5-MoE-A2.7B"), s("Qwen"), s("Qwen1.5-MoE"), None, None, s("A2.7B")]),
        ("Qwen/Qwen1.5-MoE-A2.7B", 112000, [s("Qwen1.5-MoE-A2.7B"), s("Qwen"), s("Qwen1.5-MoE"), None, None, s("A2.7B")]),
        ("Qwen/Qwen1.5-MoE-A2.7B", 7000000000, [s("Qwen1.5-MoE-A2.7B"), s("Qwen"), s("Qwen1.5-MoE"), None, None, s("A2.7B")]),
        ("mistralai/Mistral-7B-Instruct-v0.3", 0, [s("Mistral-7B-Instruct-v0.3"), s("mistralai"), s("Mistral"), s("Instruct"), s("v0.3"), s("7B")]),
        ("mistralai/Mistral-7B-Instruct-v0.3", 30000000000, [s("Mistral-7B-Instruct-v0.3"), s("mistralai"), s("Mistral"), s("Instruct"), s("v0.3"), s("7B")]),
        ("mistralai/Mistral-7B-Instruct-v0.3", 112000, [s("Mistral-7B-Instruct-v0.3"), s("mistralai"), s("Mistral"), s("7b-Instruct"), s("v0.3"), None]),
        ("mistralai/Mistral-7B-Instruct-v0.3", 7000000000, [s("Mistral-7B-Instruct-v0.3"), s("mistralai"), s("Mistral"), s("Instruct"), s("v0.3"), s("7B")]),
        ("tiiuae/falcon-40b", 0, [s("falcon-40b"), s("tiiuae"), s("falcon"), None, None, s("40B")]),
        ("tiiuae/falcon-40b", 30000000000, [s("falcon-40b"), s("tiiuae"), s("falcon"), None, None, s("40B")]),
        ("tiiuae/falcon-40b", 112000, [s("falcon-40b"), s("tiiuae"), s("falcon"), s("40b"), None, None]),
        ("tiiuae/falcon-40b", 7000000000, [s("falcon-40b"), s("tiiuae"), s("falcon"), s("40b"), None, None]),
        ("bigscience/bloom-560m", 0, [s("bloom-560m"), s("bigscience"), s("bloom"), None, None, s("560M")]),
        ("bigscience/bloom-560m", 30000000000, [s("bloom-560m"), s("bigscience"), s("bloom"), s("560m"), None, None]),
        ("bigscience/bloom-560m", 112000, [s("bloom-560m"), s("bigscience"), s("bloom"), s("560m"), None, None]),
        ("bigscience/bloom-560m", 7000000000, [s("bloom-560m"), s("bigscience"), s("bloom"), s("560m"), None, None]),
        ("EleutherAI/pythia-1.4b-deduped", 0, [s("pythia-1.4b-deduped"), s("EleutherAI"), s("pythia"), s("deduped"), None, s("1.4B")]),
        ("EleutherAI/pythia-1.4b-deduped", 30000000000, [s("pythia-1.4b-deduped"), s("EleutherAI"), s("pythia"), s("1.4b-deduped"), None, None]),
        ("EleutherAI/pythia-1.4b-deduped", 112000, [s("pythia-1.4b-deduped"), s("EleutherAI"), s("pythia"), s("1.4b-deduped"), None, None]),
        ("EleutherAI/pythia-1.4b-deduped", 7000000000, [s("pythia-1.4b-deduped"), s("EleutherAI"), s("pythia"), s("deduped"), None, s("1.4B")]),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 0, [s("TinyLlama-1.1B-Chat-v1.0"), s("TinyLlama"), s("TinyLlama"), s("Chat"), s("v1.0"), s("1.1B")]),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 30000000000, [s("TinyLlama-1.1B-Chat-v1.0"), s("TinyLlama"), s("TinyLlama"), s("1.1b-Chat"), s("v1.0"), None]),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 112000, [s("TinyLlama-1.1B-Chat-v1.0"), s("TinyLlama"), s("TinyLlama"), s("1.1b-Chat"), s("v1.0"), None]),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 7000000000, [s("TinyLlama-1.1B-Chat-v1.0"), s("TinyLlama"), s("TinyLlama"), s("Chat"), s("v1.0"), s("1.1B")]),
        ("stabilityai/stablelm-2-zephyr-1_6b", 0, [s("stablelm-2-zephyr-1_6b"), s("stabilityai"), s("stablelm-2-zephyr"), None, None, s("1.6B")]),
        ("stabilityai/stablelm-2-zephyr-1_6b", 30000000000, [s("stablelm-2-zephyr-1_6b"), s("stabilityai"), s("stablelm-2-zephyr"), s("1.6b"), None, None]),
        ("stabilityai/stablelm-2-zephyr-1_6b", 112000, [s("stablelm-2-zephyr-1_6b"), s("stabilityai"), s("stablelm-2-zephyr"), s("1.6b"), None, None]),
        ("stabilityai/stablelm-2-zephyr-1_6b", 7000000000, [s("stablelm-2-zephyr-1_6b"), s("stabilityai"), s("stablelm-2-zephyr"), None, None, s("1.6B")]),
        ("nvidia/Llama-3_3-Nemotron-Super-49B-v1", 0, [s("Llama-3_3-Nemotron-Super-49B-v1"), s("nvidia"), s("Llama"), s("3_3-Nemotron-Super"), s("v1"), s("49B")]),
        ("nvidia/Llama-3_3-Nemotron-Super-49B-v1", 30000000000, [s("Llama-3_3-Nemotron-Super-49B-v1"), s("nvidia"), s("Llama"), s("3_3-Nemotron-Super"), s("v1"), s("49B")]),
        ("nvidia/Llama-3_3-Nemotron-Super-49B-v1", 112000, [s("Llama-3_3-Nemotron-Super-49B-v1"), s("nvidia"), s("Llama"), s("3_3-Nemotron-Super-49b"), s("v1"), None]),
        ("nvidia/Llama-3_3-Nemotron-Super-49B-v1", 7000000000, [s("Llama-3_3-Nemotron-Super-49B-v1"), s("nvidia"), s("Llama"), s("3_3-Nemotron-Super-49b"), s("v1"), None]),
        ("unsloth/Qwen3-30B-A3B-GGUF", 0, [s("Qwen3-30B-A3B-GGUF"), s("unsloth"), s("Qwen3"), s("GGUF"), None, s("30B-A3B")]),
        ("unsloth/Qwen3-30B-A3B-GGUF", 30000000000, [s("Qwen3-30B-A3B-GGUF"), s("unsloth"), s("Qwen3"), s("GGUF"), None, s("30B-A3B")]),
        ("unsloth/Qwen3-30B-A3B-GGUF", 112000, [s("Qwen3-30B-A3B-GGUF"), s("unsloth"), s("Qwen3"), s("30b-GGUF"), None, s("A3B")]),
        ("unsloth/Qwen3-30B-A3B-GGUF", 7000000000, [s("Qwen3-30B-A3B-GGUF"), s("unsloth"), s("Qwen3"), s("30b-GGUF"), None, s("A3B")]),
        ("snapshots", 0, [s("snapshots"), None, None, None, None, None]),
        ("snapshots", 30000000000, [s("snapshots"), None, None, None, None, None]),
        ("snapshots", 112000, [s("snapshots"), None, None, None, None, None]),
        ("snapshots", 7000000000, [s("snapshots"), None, None, None, None, None]),
        ("5f2a0c1e9d", 0, [s("5f2a0c1e9d"), None, None, s("5f2a0c1e9d"), None, None]),
        ("5f2a0c1e9d", 30000000000, [s("5f2a0c1e9d"), None, None, s("5f2a0c1e9d"), None, None]),
        ("5f2a0c1e9d", 112000, [s("5f2a0c1e9d"), None, None, s("5f2a0c1e9d"), None, None]),
        ("5f2a0c1e9d", 7000000000, [s("5f2a0c1e9d"), None, None, s("5f2a0c1e9d"), None, None]),
        ("model", 0, [s("model"), None, None, None, None, None]),
        ("model", 30000000000, [s("model"), None, None, None, None, None]),
        ("model", 112000, [s("model"), None, None, None, None, None]),
        ("model", 7000000000, [s("model"), None, None, None, None, None]),
        ("my_model-v2-final", 0, [s("my_model-v2-final"), None, None, None, None, None]),
        ("my_model-v2-final", 30000000000, [s("my_model-v2-final"), None, None, None, None, None]),
        ("my_model-v2-final", 112000, [s("my_model-v2-final"), None, None, None, None, None]),
        ("my_model-v2-final", 7000000000, [s("my_model-v2-final"), None, None, None, None, None]),
        ("Foo-Bar-Q4_K_M", 0, [s("Foo-Bar-Q4_K_M"), None, None, None, None, None]),
        ("Foo-Bar-Q4_K_M", 30000000000, [s("Foo-Bar-Q4_K_M"), None, None, None, None, None]),
        ("Foo-Bar-Q4_K_M", 112000, [s("Foo-Bar-Q4_K_M"), None, None, None, None, None]),
        ("Foo-Bar-Q4_K_M", 7000000000, [s("Foo-Bar-Q4_K_M"), None, None, None, None, None]),
        ("x-BF16", 0, [s("x-BF16"), None, None, None, None, None]),
        ("x-BF16", 30000000000, [s("x-BF16"), None, None, None, None, None]),
        ("x-BF16", 112000, [s("x-BF16"), None, None, None, None, None]),
        ("x-BF16", 7000000000, [s("x-BF16"), None, None, None, None, None]),
        ("lora-test", 0, [s("lora-test"), None, None, None, None, None]),
        ("lora-test", 30000000000, [s("lora-test"), None, None, None, None, None]),
        ("lora-test", 112000, [s("lora-test"), None, None, None, None, None]),
        ("lora-test", 7000000000, [s("lora-test"), None, None, None, None, None]),
        ("a-LoRA", 0, [s("a-LoRA"), None, s("a"), s("LoRA"), None, None]),
        ("a-LoRA", 30000000000, [s("a-LoRA"), None, s("a"), s("LoRA"), None, None]),
        ("a-LoRA", 112000, [s("a-LoRA"), None, s("a"), s("LoRA"), None, None]),
        ("a-LoRA", 7000000000, [s("a-LoRA"), None, s("a"), s("LoRA"), None, None]),
        ("a--b", 0, [s("a--b"), None, None, None, None, None]),
        ("a--b", 30000000000, [s("a--b"), None, None, None, None, None]),
        ("a--b", 112000, [s("a--b"), None, None, None, None, None]),
        ("a--b", 7000000000, [s("a--b"), None, None, None, None, None]),
        ("-lead", 0, [s("-lead"), None, None, None, None, None]),
        ("-lead", 30000000000, [s("-lead"), None, None, None, None, None]),
        ("-lead", 112000, [s("-lead"), None, None, None, None, None]),
        ("-lead", 7000000000, [s("-lead"), None, None, None, None, None]),
        ("trail-", 0, [s("trail-"), None, None, None, None, None]),
        ("trail-", 30000000000, [s("trail-"), None, None, None, None, None]),
        ("trail-", 112000, [s("trail-"), None, None, None, None, None]),
        ("trail-", 7000000000, [s("trail-"), None, None, None, None, None]),
        ("v1-model", 0, [s("v1-model"), None, None, None, None, None]),
        ("v1-model", 30000000000, [s("v1-model"), None, None, None, None, None]),
        ("v1-model", 112000, [s("v1-model"), None, None, None, None, None]),
        ("v1-model", 7000000000, [s("v1-model"), None, None, None, None, None]),
        ("iter3-foo-7b", 0, [s("iter3-foo-7b"), None, s("iter3-foo"), None, None, s("7B")]),
        ("iter3-foo-7b", 30000000000, [s("iter3-foo-7b"), None, s("iter3-foo"), None, None, s("7B")]),
        ("iter3-foo-7b", 112000, [s("iter3-foo-7b"), None, s("iter3-foo"), s("7b"), None, None]),
        ("iter3-foo-7b", 7000000000, [s("iter3-foo-7b"), None, s("iter3-foo"), None, None, s("7B")]),
        ];
        for (id, total, want) in cases {
            let c = model_id_components(id, total);
            let got = [c.full_name, c.org, c.basename, c.finetune, c.version, c.size_label];
            assert_eq!(got, want, "{id} ({total} params)");
        }
    }

    /// `Metadata.id_to_title`, as printed by the pinned gguf-py.
    #[test]
    fn titles_like_gguf_py() {
        #[rustfmt::skip]
        let cases = [
        ("qwen3moe", "Qwen3Moe"),
        ("llama-f32", "Llama F32"),
        ("qwen2moe-f16", "Qwen2Moe F16"),
        ("Mixtral-8x7B-Instruct-v0.1", "Mixtral 8x7B Instruct v0.1"),
        ("deepseekv3-fp8", "Deepseekv3 Fp8"),
        ("gpt-oss-20b", "Gpt Oss 20b"),
        ("", ""),
        ("GPT-oss  v2 hello-World", "GPT Oss v2 Hello World"),
        ("Qwen3-235B-A22B-Instruct-2507", "Qwen3 235B A22B Instruct 2507"),
        ("DeepSeek-V3-0324", "DeepSeek V3 0324"),
        ("gpt-oss-120b", "Gpt Oss 120b"),
        ("OLMoE-1B-7B-0924-Instruct", "OLMoE 1B 7B 0924 Instruct"),
        ("Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct"),
        ("Phi-3.5-MoE-instruct", "Phi 3.5 MoE Instruct"),
        ("gemma-2-9b-it", "Gemma 2 9b It"),
        ("Kimi-K2-Instruct", "Kimi K2 Instruct"),
        ("granite-3.1-3b-a800m-instruct", "Granite 3.1 3b A800M Instruct"),
        ("my_model-v2-final", "My_Model v2 Final"),
        ("Foo-Bar-Q4_K_M", "Foo Bar Q4_K_M"),
        ("5f2a0c1e9d", "5f2a0c1e9d"),
        ("a--b", "A B"),
        ("iter3-foo-7b", "Iter3 Foo 7b"),
        ("ÉcoleModel-über-7b", "ÉcoleModel Über 7b"),
        ("v1.2-x", "v1.2 X"),
        ("hello world  ok", "Hello World Ok"),
        ];
        for (id, want) in cases {
            assert_eq!(id_to_title(id), want, "{id:?}");
        }
    }

    /// `gguf.size_label(total, shared, expert, expert_count)`, as printed by the pinned gguf-py (Python's
    /// round-half-even included: 9500 -> "10K").
    #[test]
    fn size_labels_like_gguf_py() {
        #[rustfmt::skip]
        let cases = [
        ((112000, 0, 0, 0), "112K"),
        ((0, 40000, 72000, 8), "8x112K"),
        ((123456, 0, 0, 0), "123K"),
        ((7241732096, 0, 0, 0), "7.2B"),
        ((999, 0, 0, 0), "1.0K"),
        ((1500000000000, 0, 0, 0), "1.5T"),
        ((0, 1600000000, 1300000000, 128), "128x2.9B"),
        ((9500, 0, 0, 0), "10K"),
        ((0, 0, 0, 0), "0.00K"),
        ((10500, 0, 0, 0), "10K"),
        ((999999, 0, 0, 0), "1000K"),
        ((1000000, 0, 0, 0), "1000K"),
        ((30532122624, 0, 0, 0), "31B"),
        ];
        for ((t, sh, ex, n), want) in cases {
            assert_eq!(size_label(t, sh, ex, n), want, "{t} {sh} {ex} {n}");
        }
    }

    #[test]
    fn parameter_counts_split_experts() {
        let t: Vec<(&str, Vec<u64>)> = vec![
            ("token_embd.weight", vec![64, 384]),
            ("blk.0.ffn_up_exps.weight", vec![64, 32, 8]),
            // a 2-D expert bias counts as shared (gguf-py: `len(shape) >= 3` first)
            ("blk.0.ffn_up_exps.bias", vec![32, 8]),
        ];
        let c = parameter_counts(t.iter().map(|(n, ne)| (*n, ne.as_slice())));
        assert_eq!(c, (64 * 384 + 64 * 32 * 8 + 256, 64 * 384 + 256, 64 * 32, 8));
    }

    #[test]
    fn path_names_like_pathlib() {
        assert_eq!(py_path_name(Path::new("fixtures/models/qwen3moe/")), "qwen3moe");
        assert_eq!(py_path_name(Path::new(".")), "");
        assert_eq!(py_path_name(Path::new("..")), "..");
        assert_eq!(py_path_name(Path::new("/")), "");
    }

    #[test]
    fn sampling_keys_in_reference_order_and_types() {
        let g: Value = serde_json::from_str(
            r#"{"temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.1, "min_p": null}"#,
        )
        .unwrap();
        let kv = sampling_kvs(Some(&g));
        let keys: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "general.sampling.top_k",
                "general.sampling.top_p",
                "general.sampling.temp",
                "general.sampling.penalty_repeat"
            ]
        );
        assert_eq!(kv[0].1, GgufValue::I32(20));
        assert_eq!(kv[2].1, GgufValue::F32(0.6));
    }
}
