//! Recipes: a llama-quantize preset plus rules that choose types by role, layer range and name (TOML), and the
//! named MoE recipes sling ships.
//!
//! ```toml
//! # my-recipe.toml
//! base = "Q4_K_M"                  # the preset for every tensor no rule selects (its mixture rules apply)
//! [[rule]]
//! role = "attention"               # routed_experts | shared_experts | router | attention | embeddings | output | dense_ffn | other
//! type = "q8_0"
//! [[rule]]
//! role = "routed_experts"
//! name = "ffn_down_exps"           # a regex searched in the GGUF tensor name (optional)
//! layers = [0, 3]                  # inclusive layer range (optional)
//! type = "q5_K"
//! ```
//!
//! Rules are tried in order, after any `--tensor-type` flags; the first that selects a tensor sets its type,
//! and llama-quantize's row-size fallbacks still apply. Routers, norms and other 1-D tensors are never
//! quantized, whatever a rule says (`tensor_allows_quantization`).

use serde::Deserialize;
use sling_core::DType;

use super::rules::{Ftype, TensorTypeRule};
use sling_core::Role;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    base: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    layers: Option<[u64; 2]>,
    #[serde(rename = "type")]
    dtype: String,
}

/// A resolved recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    pub base: Ftype,
    pub rules: Vec<TensorTypeRule>,
}

/// The named MoE recipes (`--to gguf:moe-q4` …). Their sizes are in docs/quantization.md.
pub const NAMED: &[(&str, &str)] = &[
    (
        "moe-q4",
        r#"description = "routed experts Q4_K (down-projection Q5_K); attention, shared experts and dense layers Q8_0; embeddings and output Q6_K"
base = "Q4_K_M"
[[rule]]
role = "attention"
type = "q8_0"
[[rule]]
role = "shared_experts"
type = "q8_0"
[[rule]]
role = "dense_ffn"
type = "q8_0"
[[rule]]
role = "embeddings"
type = "q6_K"
[[rule]]
role = "routed_experts"
name = "ffn_down_exps"
type = "q5_K"
[[rule]]
role = "routed_experts"
type = "q4_K"
"#,
    ),
    (
        "moe-q2",
        r#"description = "routed experts Q2_K (down-projection Q3_K); attention, shared experts and dense layers Q6_K; embeddings Q4_K, output Q6_K"
base = "Q2_K"
[[rule]]
role = "attention"
type = "q6_K"
[[rule]]
role = "shared_experts"
type = "q6_K"
[[rule]]
role = "dense_ffn"
type = "q6_K"
[[rule]]
role = "embeddings"
type = "q4_K"
[[rule]]
role = "routed_experts"
name = "ffn_down_exps"
type = "q3_K"
[[rule]]
role = "routed_experts"
type = "q2_K"
"#,
    ),
    (
        "moe-iq4",
        r#"description = "routed experts IQ4_XS; attention, shared experts and dense layers Q8_0; embeddings and output Q6_K"
base = "IQ4_XS"
[[rule]]
role = "attention"
type = "q8_0"
[[rule]]
role = "shared_experts"
type = "q8_0"
[[rule]]
role = "dense_ffn"
type = "q8_0"
[[rule]]
role = "embeddings"
type = "q6_K"
[[rule]]
role = "routed_experts"
type = "iq4_xs"
"#,
    ),
];

impl Recipe {
    /// Parses a recipe from TOML text; `name` labels it in reports.
    pub fn parse(name: &str, text: &str) -> Result<Recipe, String> {
        let f: RecipeFile = toml::from_str(text).map_err(|e| format!("recipe {name}: {e}"))?;
        let base = Ftype::parse(&f.base).ok_or_else(|| format!("recipe {name}: unknown base preset {:?}", f.base))?;
        let mut rules = Vec::new();
        for (i, r) in f.rules.iter().enumerate() {
            let dtype = DType::from_name(&r.dtype)
                .filter(|d| d.info().ggml_id.is_some())
                .ok_or_else(|| format!("recipe {name}: rule {}: unknown type {:?}", i + 1, r.dtype))?;
            let pat = r.name.clone().unwrap_or_default();
            let regex =
                regex::Regex::new(&pat).map_err(|e| format!("recipe {name}: rule {}: bad name pattern: {e}", i + 1))?;
            if let Some([a, b]) = r.layers {
                if a > b {
                    return Err(format!("recipe {name}: rule {}: empty layer range [{a}, {b}]", i + 1));
                }
            }
            let mut desc = Vec::new();
            if let Some(role) = r.role {
                desc.push(format!(
                    "role={}",
                    serde_json::to_value(role).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
                ));
            }
            if let Some([a, b]) = r.layers {
                desc.push(format!("layers={a}-{b}"));
            }
            if !pat.is_empty() {
                desc.push(format!("name={pat}"));
            }
            rules.push(TensorTypeRule {
                pattern: format!("{name}#{}({})", i + 1, desc.join(",")),
                regex,
                dtype,
                role: r.role,
                layers: r.layers.map(|[a, b]| (a, b)),
            });
        }
        Ok(Recipe { name: name.to_string(), description: f.description.unwrap_or_default(), base, rules })
    }

    /// A named recipe (`moe-q4`, …), case-insensitive.
    pub fn named(name: &str) -> Option<Recipe> {
        NAMED.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(n, t)| Recipe::parse(n, t).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_recipes_parse() {
        for (n, _) in NAMED {
            let r = Recipe::named(n).unwrap();
            assert!(!r.rules.is_empty() && !r.description.is_empty(), "{n}");
        }
    }

    #[test]
    fn rules_select_by_role_layers_and_name() {
        let r = Recipe::parse(
            "t",
            "base = \"Q4_K_M\"\n[[rule]]\nrole = \"routed_experts\"\nlayers = [1, 2]\nname = \"down\"\ntype = \"q6_K\"\n",
        )
        .unwrap();
        let rule = &r.rules[0];
        assert!(rule.matches("blk.1.ffn_down_exps.weight"));
        assert!(!rule.matches("blk.3.ffn_down_exps.weight"));
        assert!(!rule.matches("blk.1.ffn_up_exps.weight"));
        assert!(!rule.matches("blk.1.ffn_down_shexp.weight"));
        assert!(!rule.matches("output.weight"));
    }

    #[test]
    fn bad_recipes_are_clear_errors() {
        for bad in [
            "base = \"Q9\"",
            "base = \"Q4_K_M\"\n[[rule]]\ntype = \"q9_K\"",
            "base = \"Q4_K_M\"\n[[rule]]\nrole = \"nope\"\ntype = \"q8_0\"",
            "base = \"Q4_K_M\"\n[[rule]]\nlayers = [3, 1]\ntype = \"q8_0\"",
            "base = \"Q4_K_M\"\n[[rule]]\nname = \"(\"\ntype = \"q8_0\"",
            "base = \"Q4_K_M\"\nextra = 1",
            "not toml at all [",
        ] {
            assert!(Recipe::parse("t", bad).is_err(), "{bad}");
        }
    }
}
