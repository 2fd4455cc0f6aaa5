//! The recipe file of the Hugging Face-format targets (`--to mlx:BITS --recipe FILE`, `--to vllm:w4a16 --recipe
//! FILE`): per-weight bits and group sizes over a default, and what their `…:auto` allocations write out so that the
//! same artifact can be made again without measuring. Each target checks the values it can store and applies the
//! rules to its own plan (`mlx::recipe`, `vllm::recipe`).
//!
//! ```toml
//! bits = 4            # the default (optional: --to's otherwise)
//! group_size = 64     # optional: the target's default otherwise
//! [[rule]]
//! name = "self_attn"  # a regex searched in the weight's name (`model.layers.0.self_attn.q_proj.weight`)
//! bits = 8
//! [[rule]]
//! name = "^model\\.embed_tokens\\.weight$"
//! keep = true         # stored at source precision
//! ```
//!
//! Rules are tried in order; the first whose `name` matches a quantized weight sets its bits (and group size,
//! else the default's).

use serde::Deserialize;

use crate::TargetError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    bits: Option<u32>,
    #[serde(default)]
    group_size: Option<u64>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    #[serde(default)]
    bits: Option<u32>,
    #[serde(default)]
    group_size: Option<u64>,
    #[serde(default)]
    keep: bool,
}

/// What a rule gives the weights it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Quantized to `bits`, in groups of `group` (`None`: the recipe's default group size).
    Quant { bits: u32, group: Option<u64> },
    /// The source precision, unquantized.
    Keep,
}

/// One rule: weights whose name matches get `choice`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub regex: regex::Regex,
    pub choice: Choice,
}

/// What a target can store: its name for messages, and the bits and group sizes it takes.
pub struct Limits<'a> {
    pub target: &'a str,
    pub bits: &'a [u32],
    pub groups: &'a [u64],
}

/// `2, 3 or 4`.
fn list<T: std::fmt::Display>(v: &[T]) -> String {
    let s: Vec<String> = v.iter().map(T::to_string).collect();
    match s.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => s.join(""),
    }
}

/// A parsed recipe file.
#[derive(Clone, Debug)]
pub struct RecipeFile {
    pub description: String,
    pub bits: Option<u32>,
    pub group_size: Option<u64>,
    pub rules: Vec<Rule>,
}

fn bad(name: &str, why: String) -> TargetError {
    TargetError::Unsupported(format!("recipe {name}: {why}"))
}

impl RecipeFile {
    /// Parses recipe `text` (`name` for messages), refusing bits and group sizes outside `limits`.
    pub fn parse(name: &str, text: &str, limits: &Limits) -> Result<RecipeFile, TargetError> {
        let check_bits = |b: u32| {
            if limits.bits.contains(&b) {
                Ok(b)
            } else {
                Err(bad(name, format!("bits {b}: {} recipes take {}", limits.target, list(limits.bits))))
            }
        };
        let check_group = |g: u64| {
            if limits.groups.contains(&g) {
                Ok(g)
            } else {
                Err(bad(name, format!("group_size {g}: {} takes {}", limits.target, list(limits.groups))))
            }
        };
        let f: File = toml::from_str(text).map_err(|e| bad(name, e.to_string()))?;
        let bits = f.bits.map(check_bits).transpose()?;
        let group_size = f.group_size.map(check_group).transpose()?;
        let mut rules = Vec::new();
        for (i, r) in f.rules.into_iter().enumerate() {
            let at = |why: String| bad(name, format!("rule {}: {why}", i + 1));
            let regex = regex::Regex::new(&r.name).map_err(|e| at(format!("name {:?}: {e}", r.name)))?;
            let choice = match (r.keep, r.bits) {
                (true, None) if r.group_size.is_none() => Choice::Keep,
                (true, _) => return Err(at("keep = true takes no bits or group_size".into())),
                (false, Some(b)) => {
                    Choice::Quant { bits: check_bits(b)?, group: r.group_size.map(check_group).transpose()? }
                }
                (false, None) => return Err(at("needs bits = N or keep = true".into())),
            };
            rules.push(Rule { regex, choice });
        }
        Ok(RecipeFile { description: f.description.unwrap_or_default(), bits, group_size, rules })
    }

    /// The choice of the first rule whose regex is found in `name`.
    pub fn choice(&self, name: &str) -> Option<Choice> {
        self.rules.iter().find(|r| r.regex.is_match(name)).map(|r| r.choice)
    }

    /// A recipe file [`RecipeFile::parse`] reads back: `header` (comment lines), the defaults, then one rule per
    /// `(regex, choice)`.
    pub fn toml(header: &str, description: &str, bits: u32, group: u64, rules: &[(String, Choice)]) -> String {
        // A TOML string as the toml crate writes it: control characters escaped too (a name holding `\b`
        // written raw did not parse again; found by the `mlx_recipe` fuzz target).
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut s = String::new();
        for line in header.lines() {
            s.push_str(&format!("# {line}\n"));
        }
        s.push_str(&format!("description = {}\nbits = {bits}\ngroup_size = {group}\n", q(description)));
        for (pattern, choice) in rules {
            s.push_str(&format!("[[rule]]\nname = {}\n", q(pattern)));
            match choice {
                // No group: the rule did not set one (the recipe's group_size applies), which a written
                // `group_size = 0` would not say (it is refused).
                Choice::Quant { bits, group: None } => s.push_str(&format!("bits = {bits}\n")),
                Choice::Quant { bits, group: Some(g) } => s.push_str(&format!("bits = {bits}\ngroup_size = {g}\n")),
                Choice::Keep => s.push_str("keep = true\n"),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { target: "T", bits: &[4, 8], groups: &[32, 128] };

    #[test]
    fn lists_like_prose() {
        assert_eq!(list(&[2, 3, 4]), "2, 3 or 4");
        assert_eq!(list(&[8]), "8");
    }

    /// Found by the `mlx_recipe` fuzz target: names and descriptions with control characters, quotes and
    /// backslashes are written so that they parse back to the same strings.
    #[test]
    fn written_strings_parse_back_unchanged() {
        let name = format!("^{}$", regex::escape("a\u{8}b\"c\\d\te\u{1f}"));
        let c = Choice::Quant { bits: 4, group: Some(32) };
        let text = RecipeFile::toml("h", "desc \u{7} \"x\"", 4, 32, &[(name.clone(), c)]);
        let back = RecipeFile::parse("again", &text, &LIMITS).unwrap();
        assert_eq!(back.description, "desc \u{7} \"x\"");
        assert_eq!((back.rules[0].regex.as_str(), back.rules[0].choice), (name.as_str(), c));
    }

    #[test]
    fn refuses_what_the_target_cannot_take() {
        for (text, want) in [
            ("bits = 7", "bits 7: T recipes take 4 or 8"),
            ("group_size = 48", "group_size 48: T takes 32 or 128"),
            ("[[rule]]\nname = \"x\"", "needs bits"),
            ("[[rule]]\nname = \"x\"\nkeep = true\nbits = 4", "keep = true takes"),
            ("[[rule]]\nname = \"(\"\nbits = 4", "rule 1: name"),
            ("colour = 1", "unknown field"),
        ] {
            let e = RecipeFile::parse("t", text, &LIMITS).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("recipe t:"), "{text}: {e}");
        }
    }
}
