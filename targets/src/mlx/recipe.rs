//! MLX recipes (`--to mlx:BITS --recipe FILE`): per-weight bits and group sizes over the default, as mlx-lm's
//! mixed-precision recipes and `quant_predicate`s choose them, and what `--to mlx:auto` writes out so that the same
//! artifact can be made again without measuring.
//!
//! ```toml
//! bits = 4            # the default (optional: --to mlx:BITS otherwise)
//! group_size = 64     # optional: --group-size otherwise
//! [[rule]]
//! name = "self_attn"  # a regex searched in the weight's name (`model.layers.0.self_attn.q_proj.weight`)
//! bits = 8
//! [[rule]]
//! name = "^model\\.embed_tokens\\.weight$"
//! keep = true         # stored at source precision
//! ```
//!
//! Rules are tried in order; the first whose `name` matches a quantized weight sets its bits (and group size,
//! else the default's). Stacked experts are named `….switch_mlp.{gate,up,down}_proj.weight`.

use super::auto::{affine_parts, Kind};
use super::{Enc, MlxPlan, GROUP_SIZES};
use crate::recipe::{Choice, Limits, RecipeFile};
use crate::TargetError;

/// What MLX recipes take.
const LIMITS: Limits = Limits { target: "MLX", bits: super::auto::BITS, groups: GROUP_SIZES };

/// One rule: weights whose name matches get `kind` (`Affine` with group 0: the default group).
#[derive(Clone, Debug)]
pub struct Rule {
    pub regex: regex::Regex,
    pub kind: Kind,
}

/// A parsed MLX recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub description: String,
    pub bits: Option<u32>,
    pub group_size: Option<u64>,
    pub rules: Vec<Rule>,
}

impl Recipe {
    /// Parses recipe `text` (`name` for messages).
    pub fn parse(name: &str, text: &str) -> Result<Recipe, TargetError> {
        let f = RecipeFile::parse(name, text, &LIMITS)?;
        let rules = f
            .rules
            .into_iter()
            .map(|r| Rule {
                regex: r.regex,
                kind: match r.choice {
                    Choice::Quant { bits, group } => Kind::Affine { bits, group: group.unwrap_or(0) as u32 },
                    Choice::Keep => Kind::Keep,
                },
            })
            .collect();
        Ok(Recipe { description: f.description, bits: f.bits, group_size: f.group_size, rules })
    }

    /// Applies the recipe to `p` (planned at the finest group, 32, so that every weight MLX can quantize is
    /// planned quantized): the recipe's defaults, when it sets them, then each rule's choice for the weights it
    /// matches. Routers the model's `quant_predicate` sets (8 bits, group 64) keep that unless a rule names them. A weight no rule names whose rows the default
    /// group cannot divide is kept at source precision, as [`super::plan`] keeps it (an error with `strict`); a
    /// rule's group that cannot divide the rows of a weight it names is an error.
    pub fn apply(&self, p: &mut MlxPlan, strict: bool) -> Result<(), TargetError> {
        let (old_bits, old_group) = (p.bits, p.group);
        let bits = self.bits.unwrap_or(p.bits);
        let group = self.group_size.unwrap_or(p.group);
        p.bits = bits;
        p.group = group;
        for w in &mut p.plan.weights {
            let Enc::Affine { bits: b, group: g, sd, experts } = &w.enc else { continue };
            let module = w.name.strip_suffix(".weight").unwrap_or(&w.name).to_string();
            let at_default = (*b, *g as u64) == (old_bits, old_group) && !p.overrides.contains_key(&module);
            let rule = self.rules.iter().find(|r| r.regex.is_match(&w.name)).map(|r| r.kind);
            let cols = w.cols();
            let kind = match rule {
                Some(Kind::Affine { bits, group: 0 }) => Kind::Affine { bits, group: group as u32 },
                Some(k) => k,
                // Routers a model's quant_predicate sets carry an override, so they are not at the default.
                None if at_default => {
                    if cols % group != 0 {
                        let why = format!("row length {cols} is not a multiple of the group size {group}");
                        if strict {
                            return Err(TargetError::Strict { tensor: w.name.clone(), why });
                        }
                        tracing::warn!("{}: {why}; kept at source precision", w.name);
                        p.plan.kept.push(sling_pipeline::Kept { name: w.name.clone(), why });
                        Kind::Keep
                    } else {
                        Kind::Affine { bits, group: group as u32 }
                    }
                }
                None => Kind::Affine { bits: *b, group: *g as u32 },
            };
            let (sd, experts) = (*sd, experts.clone());
            let lead = w.parts[0].shape[..w.parts[0].shape.len() - 1].to_vec();
            p.overrides.remove(&module);
            match kind {
                Kind::Affine { bits: nb, group: ng } => {
                    if cols % u64::from(ng) != 0 {
                        return Err(TargetError::Strict {
                            tensor: w.name.clone(),
                            why: format!("row length {cols} is not a multiple of the recipe's group size {ng}"),
                        });
                    }
                    if (nb, u64::from(ng)) != (bits, group) {
                        p.overrides.insert(module.clone(), (nb, u64::from(ng)));
                    }
                    w.enc = Enc::Affine { bits: nb, group: ng as usize, sd, experts };
                    w.parts = affine_parts(&module, &lead, cols, nb, u64::from(ng), sd);
                }
                Kind::Keep => {
                    let d = sd.dtype();
                    let mut shape = lead;
                    shape.push(cols);
                    w.enc = Enc::Keep(d);
                    w.parts = vec![sling_pipeline::Part::new(w.name.clone(), d, shape)];
                }
            }
        }
        Ok(())
    }

    /// The recipe as a file [`Recipe::parse`] reads back: the defaults, then one anchored rule per weight.
    pub fn toml(description: &str, bits: u32, group: u64, choices: &[(String, Kind)]) -> String {
        let rules: Vec<(String, Choice)> = choices
            .iter()
            .map(|(name, kind)| {
                let choice = match *kind {
                    Kind::Affine { bits, group: 0 } => Choice::Quant { bits, group: None },
                    Kind::Affine { bits, group } => Choice::Quant { bits, group: Some(u64::from(group)) },
                    Kind::Keep => Choice::Keep,
                };
                (format!("^{}$", regex::escape(name)), choice)
            })
            .collect();
        RecipeFile::toml(HEADER, description, bits, group, &rules)
    }
}

/// The comment heading a recipe `mlx:auto` writes.
const HEADER: &str = "Written by `sling quantize|plan --to mlx:auto`: one rule per quantized weight, chosen from
measured sensitivities under a size budget. `sling quantize SRC --to mlx:BITS --recipe THIS -o OUT`
makes the same weights (the recipe's bits and group_size replace --to's).";

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `mlx_recipe` fuzz target: names and descriptions with control characters, quotes and
    /// backslashes are written so that they parse back to the same strings.
    #[test]
    fn written_strings_parse_back_unchanged() {
        let name = "a\u{8}b\"c\\d\te\u{1f}";
        let text = Recipe::toml("desc \u{7} \"x\"", 4, 64, &[(name.to_string(), Kind::Affine { bits: 4, group: 64 })]);
        let back = Recipe::parse("again", &text).unwrap();
        assert_eq!(back.description, "desc \u{7} \"x\"");
        assert_eq!(back.rules[0].regex.as_str(), format!("^{}$", regex::escape(name)));
    }

    /// Found by the `mlx_recipe` fuzz target: a parsed rule without its own group size was written back as
    /// `group_size = 0`, which does not parse.
    #[test]
    fn a_rule_without_a_group_size_is_written_without_one() {
        let r = Recipe::parse("t", "bits = 3\ngroup_size = 64\n[[rule]]\nname = \"self_attn\"\nbits = 8\n").unwrap();
        let choices: Vec<(String, Kind)> = r.rules.iter().map(|x| ("self_attn".to_string(), x.kind)).collect();
        let back = Recipe::parse("again", &Recipe::toml("", 3, 64, &choices)).unwrap();
        assert_eq!(back.rules[0].kind, Kind::Affine { bits: 8, group: 0 });
    }

    #[test]
    fn parses_and_refuses_what_mlx_cannot_take() {
        let r = Recipe::parse(
            "t",
            "bits = 3\n[[rule]]\nname = \"self_attn\"\nbits = 8\n[[rule]]\nname = \"embed\"\nkeep = true\n",
        )
        .unwrap();
        assert_eq!((r.bits, r.group_size, r.rules.len()), (Some(3), None, 2));
        assert_eq!(r.rules[0].kind, Kind::Affine { bits: 8, group: 0 });
        assert_eq!(r.rules[1].kind, Kind::Keep);
        for (text, want) in [
            ("bits = 7", "bits 7"),
            ("group_size = 48", "group_size 48"),
            ("[[rule]]\nname = \"x\"", "needs bits"),
            ("[[rule]]\nname = \"x\"\nkeep = true\nbits = 4", "keep = true takes"),
            ("[[rule]]\nname = \"(\"\nbits = 4", "rule 1: name"),
            ("colour = 1", "unknown field"),
        ] {
            let e = Recipe::parse("t", text).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("recipe t:"), "{text}: {e}");
        }
    }

    #[test]
    fn written_recipes_parse_back() {
        let choices = vec![
            ("model.layers.0.mlp.switch_mlp.up_proj.weight".to_string(), Kind::Affine { bits: 3, group: 32 }),
            ("model.embed_tokens.weight".to_string(), Kind::Keep),
        ];
        let r = Recipe::parse("t", &Recipe::toml("a \"b\"", 4, 64, &choices)).unwrap();
        assert_eq!((r.description.as_str(), r.bits, r.group_size), ("a \"b\"", Some(4), Some(64)));
        assert_eq!(r.rules.iter().map(|r| r.kind).collect::<Vec<_>>(), choices.iter().map(|c| c.1).collect::<Vec<_>>());
        assert!(
            r.rules[0].regex.is_match(&choices[0].0)
                && !r.rules[0].regex.is_match("xmodel.layers.0.mlp.switch_mlp.up_proj.weight")
        );
    }
}
