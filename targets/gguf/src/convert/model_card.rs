//! The model card (`README.md` YAML front matter) as the reference converter reads it: gguf-py's
//! `Metadata.load_model_card` and the model-card part of `Metadata.apply_metadata_heuristic` (pinned llama.cpp,
//! gguf-py/gguf/metadata.py).
//!
//! sling has no YAML library: this reads the subset model cards use for the keys the reference takes (top-level
//! `key: value` with plain or quoted string scalars, flow `[a, b]` and block `- a` sequences of them). Anything else
//! under one of those keys (a mapping, a multi-line or block scalar, a value PyYAML would load as a number, boolean
//! or date, an anchor or tag ...) makes [`read`] answer [`Card::Unsupported`], and the conversion says that its
//! metadata may differ from the reference's there. Other keys (`model-index`, `widget`, ...) are skipped whatever
//! their value, as long as they are indented below their key.

use std::path::Path;

/// A YAML scalar as PyYAML's `safe_load` would type it, for the subset read here.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Str(String),
    /// `null`, `~` or nothing.
    Null,
    /// A number, boolean, date ...: the reference would get a non-string.
    Other,
}

/// A top-level value.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Scalar(Scalar),
    List(Vec<Scalar>),
    /// Anything this reader does not interpret (mappings, block scalars, multi-line values, ...).
    Complex,
}

/// What the reference reads from `README.md`.
#[derive(Clone, Debug, PartialEq)]
pub enum Card {
    /// No model card (no README.md, or it does not start with a `---` line, or the front matter is not a mapping).
    None,
    /// The top-level keys, in file order (a repeated key keeps its last value, as in PyYAML).
    Keys(Vec<(String, Item)>),
    /// A front matter this reader cannot interpret as PyYAML would, with the reason.
    Unsupported(String),
}

/// The keys `apply_metadata_heuristic` reads from the card.
pub const READ_KEYS: &[&str] = &[
    "name",
    "author",
    "version",
    "organization",
    "description",
    "finetune",
    "basename",
    "size_label",
    "url",
    "doi",
    "uuid",
    "repo_url",
    "model_name",
    "model_author",
    "model_version",
    "model_organization",
    "model_description",
    "model_finetune",
    "model_basename",
    "model_size_label",
    "model_url",
    "model_doi",
    "model_uuid",
    "model_repo_url",
    "model_creator",
    "model_type",
    "base_model",
    "base_models",
    "base_model_sources",
    "datasets",
    "dataset",
    "dataset_sources",
    "license",
    "license_name",
    "license_link",
    "tags",
    "pipeline_tag",
    "languages",
    "language",
];

/// `Metadata.load_model_card(dir)`.
pub fn read(dir: &Path) -> Card {
    let Ok(bytes) = std::fs::read(dir.join("README.md")) else { return Card::None };
    let Ok(content) = String::from_utf8(bytes) else {
        return Card::Unsupported("README.md is not UTF-8".into());
    };
    parse(&content)
}

/// Python's `str.splitlines()` boundaries other than `\n` and `\r\n`: bail on them rather than guess.
fn exotic_line_breaks(s: &str) -> bool {
    let b = s.as_bytes();
    s.chars().any(|c| matches!(c, '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        || b.iter().enumerate().any(|(i, &c)| c == b'\r' && b.get(i + 1) != Some(&b'\n'))
}

/// The front matter of `content` as the reference reads it.
pub fn parse(content: &str) -> Card {
    let mut lines = content.lines();
    match lines.next() {
        None => return Card::None,
        Some(first) if first != "---" => return Card::None,
        _ => {}
    }
    if exotic_line_breaks(content) {
        return Card::Unsupported("unusual line breaks".into());
    }
    let mut yaml = String::new();
    for l in lines {
        if l == "---" {
            break;
        }
        yaml.push_str(l);
        yaml.push('\n');
    }
    // "Quick hack to fix the Norway problem" and "yaml should use 2 spaces instead of tab", as the reference does.
    let yaml = yaml.replace("- no\n", "- \"no\"\n").replace('\t', "  ");
    parse_mapping(&yaml)
}

fn parse_mapping(yaml: &str) -> Card {
    let mut entries: Vec<(String, String, Vec<&str>)> = Vec::new();
    for line in yaml.lines() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indented = line.starts_with(' ') || t.starts_with("- ") || t == "-";
        if indented {
            match entries.last_mut() {
                Some(e) => e.2.push(line),
                None => return Card::Unsupported("the front matter is not a mapping".into()),
            }
            continue;
        }
        if line.starts_with('%') || line == "..." {
            return Card::Unsupported("YAML directives or document markers".into());
        }
        if matches!(line.chars().next(), Some('"' | '\'' | '?' | '[' | '{' | '&' | '*' | '!' | '|' | '>')) {
            return Card::Unsupported(format!("unsupported top-level line {line:?}"));
        }
        let (key, value) = match line.find(": ") {
            Some(i) => (&line[..i], line[i + 2..].trim()),
            None if line.ends_with(':') => (&line[..line.len() - 1], ""),
            None => return Card::Unsupported(format!("unsupported top-level line {line:?}")),
        };
        let key = key.trim_end();
        if key.contains(" #") {
            return Card::Unsupported(format!("unsupported key {key:?}"));
        }
        entries.push((key.to_string(), value.to_string(), Vec::new()));
    }
    let mut keys: Vec<(String, Item)> = Vec::new();
    for (k, inline, cont) in entries {
        let item = item(&inline, &cont);
        if READ_KEYS.contains(&k.as_str()) && item == Item::Complex {
            return Card::Unsupported(format!("the value of {k:?}"));
        }
        keys.retain(|(x, _)| *x != k);
        keys.push((k, item));
    }
    Card::Keys(keys)
}

fn item(inline: &str, cont: &[&str]) -> Item {
    let inline = strip_comment(inline);
    if inline.is_empty() {
        if cont.is_empty() {
            return Item::Scalar(Scalar::Null);
        }
        // a block sequence of scalars, every `- ` at the same indentation
        let indent = cont[0].len() - cont[0].trim_start().len();
        let mut v = Vec::new();
        for l in cont {
            let t = l.trim_start();
            if l.len() - t.len() != indent || !t.starts_with("- ") {
                return Item::Complex;
            }
            match scalar(t[2..].trim()) {
                Some(s) => v.push(s),
                None => return Item::Complex,
            }
        }
        return Item::List(v);
    }
    if !cont.is_empty() {
        return Item::Complex;
    }
    if let Some(inner) = inline.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else { return Item::Complex };
        // quoted items may not hold a comma: split there, `scalar` refuses the halves
        if inner.contains(['[', ']', '{', '}']) {
            return Item::Complex;
        }
        if inner.trim().is_empty() {
            return Item::List(Vec::new());
        }
        let mut v = Vec::new();
        for part in inner.split(',') {
            match scalar(part.trim()) {
                Some(Scalar::Null) | None => return Item::Complex,
                Some(s) => v.push(s),
            }
        }
        return Item::List(v);
    }
    match scalar(inline) {
        Some(s) => Item::Scalar(s),
        None => Item::Complex,
    }
}

/// Cuts a ` #` comment from a plain value (quoted values keep theirs).
fn strip_comment(v: &str) -> &str {
    if v.starts_with(['"', '\'']) {
        return v.trim();
    }
    match v.find(" #") {
        Some(i) => v[..i].trim(),
        None => v.trim(),
    }
}

/// One scalar as PyYAML's `safe_load` types it; `None` where this reader is unsure.
fn scalar(s: &str) -> Option<Scalar> {
    let s = strip_comment(s);
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        return (!inner.contains(['"', '\\'])).then(|| Scalar::Str(inner.to_string()));
    }
    if let Some(inner) = s.strip_prefix('\'') {
        let inner = inner.strip_suffix('\'')?;
        // `''` is an escaped quote; a lone `'` inside would end the scalar early
        return (!inner.replace("''", "").contains('\'')).then(|| Scalar::Str(inner.replace("''", "'")));
    }
    if s.is_empty() || matches!(s, "~" | "null" | "Null" | "NULL") {
        return Some(Scalar::Null);
    }
    if s.starts_with(['[', ']', '{', '}', '&', '*', '!', '|', '>', '%', '@', '`', ',', '?', ':', '#'])
        || s.starts_with("- ")
        || s == "-"
        || s.contains(": ")
        || s.ends_with(':')
    {
        return None;
    }
    // YAML 1.1 booleans, numbers (ints, floats, sexagesimal, .inf/.nan) and dates are not strings for PyYAML.
    const BOOLS: &[&str] = &[
        "yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE", "on", "On", "ON",
        "off", "Off", "OFF",
    ];
    if BOOLS.contains(&s) {
        return Some(Scalar::Other);
    }
    let numeric_chars = |c: char| c.is_ascii_hexdigit() || "xXoObB_+-.:".contains(c);
    let lower = s.to_ascii_lowercase();
    if (s.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c)) && s.chars().all(numeric_chars))
        || matches!(lower.trim_start_matches(['+', '-']), ".inf" | ".nan")
        || s == "="
        || s == "<<"
    {
        return Some(Scalar::Other);
    }
    let b = s.as_bytes();
    if b.len() >= 8 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[5].is_ascii_digit() {
        return Some(Scalar::Other); // a timestamp
    }
    Some(Scalar::Str(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(card: &str) -> Vec<(String, Item)> {
        match parse(card) {
            Card::Keys(k) => k,
            other => panic!("{other:?}"),
        }
    }
    fn s(x: &str) -> Scalar {
        Scalar::Str(x.into())
    }

    #[test]
    fn typical_card() {
        let k = keys(
            "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\nbase_model:\n- Qwen/Qwen3-30B-A3B\ntags: [moe, 'chat']\nlanguage:\n  - en\n  - no\nmodel-index:\n- name: x\n  results:\n  - task: {type: y}\n---\n# Title\n",
        );
        let get = |n: &str| k.iter().find(|(x, _)| x == n).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("license"), Item::Scalar(s("apache-2.0")));
        assert_eq!(get("base_model"), Item::List(vec![s("Qwen/Qwen3-30B-A3B")]));
        assert_eq!(get("tags"), Item::List(vec![s("moe"), s("chat")]));
        assert_eq!(get("language"), Item::List(vec![s("en"), s("no")]));
        assert_eq!(get("model-index"), Item::Complex);
    }

    #[test]
    fn no_card_and_unsupported() {
        assert_eq!(parse("# Title\n---\n"), Card::None);
        assert_eq!(parse(""), Card::None);
        assert!(matches!(parse("---\nlicense:\n  name: x\n---\n"), Card::Unsupported(_)));
        assert!(matches!(parse("---\nversion: 2\n---\n"), Card::Keys(_)));
        assert_eq!(keys("---\nversion: 2\n---\n")[0].1, Item::Scalar(Scalar::Other));
        assert_eq!(keys("---\nlicense: mit # comment\n---\n")[0].1, Item::Scalar(s("mit")));
        assert_eq!(keys("---\nlicense: ~\n---\n")[0].1, Item::Scalar(Scalar::Null));
        assert_eq!(keys("---\ndate: 2024-01-02\n---\n")[0].1, Item::Scalar(Scalar::Other));
    }
}
