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
    (
        "moe-iq1",
        r#"description = "DeepSeek-R1-style 1.58-bit dynamic quant (after Unsloth's): routed experts IQ1_S, down-projections IQ2_XXS in blocks 0-7 and IQ1_M after; attention Q4_K, shared experts Q6_K, dense FFN Q5_K; token embeddings Q4_K, output Q6_K; needs an imatrix"
base = "IQ1_S"
[[rule]]
role = "routed_experts"
name = "ffn_down_exps"
layers = [0, 7]
type = "iq2_xxs"
[[rule]]
role = "routed_experts"
name = "ffn_down_exps"
type = "iq1_m"
[[rule]]
role = "routed_experts"
type = "iq1_s"
[[rule]]
role = "shared_experts"
type = "q6_K"
[[rule]]
role = "dense_ffn"
type = "q5_K"
[[rule]]
role = "attention"
type = "q4_K"
[[rule]]
role = "embeddings"
type = "q4_K"
[[rule]]
role = "output"
type = "q6_K"
"#,
    ),
    (
        "moe-iq2",
        r#"description = "2-bit dynamic MoE quant: routed experts IQ2_XXS, down-projections IQ3_XXS in blocks 0-7 and IQ2_S after; attention Q5_K, shared experts and dense FFN Q6_K; token embeddings Q4_K, output Q6_K; needs an imatrix"
base = "IQ2_XXS"
[[rule]]
role = "routed_experts"
name = "ffn_down_exps"
layers = [0, 7]
type = "iq3_xxs"
[[rule]]
role = "routed_experts"
name = "ffn_down_exps"
type = "iq2_s"
[[rule]]
role = "routed_experts"
type = "iq2_xxs"
[[rule]]
role = "shared_experts"
type = "q6_K"
[[rule]]
role = "dense_ffn"
type = "q6_K"
[[rule]]
role = "attention"
type = "q5_K"
[[rule]]
role = "embeddings"
type = "q4_K"
[[rule]]
role = "output"
type = "q6_K"
"#,
    ),
];

use super::rules::SpecError;

impl Recipe {
    /// Parses a recipe from TOML text; `name` labels it in reports.
    pub fn parse(name: &str, text: &str) -> Result<Recipe, SpecError> {
        let f: RecipeFile =
            toml::from_str(text).map_err(|e| SpecError::Toml { name: name.to_string(), source: Box::new(e) })?;
        let base = Ftype::parse(&f.base)
            .ok_or_else(|| SpecError::UnknownPreset { spec: format!("recipe {name}"), name: f.base.clone() })?;
        let mut rules = Vec::new();
        for (i, r) in f.rules.iter().enumerate() {
            let spec = || format!("recipe {name}: rule {}", i + 1);
            let dtype = super::rules::ggml_type(&r.dtype)
                .ok_or_else(|| SpecError::UnknownType { spec: spec(), ty: r.dtype.clone() })?;
            let pat = r.name.clone().unwrap_or_default();
            let regex = regex::Regex::new(&pat)
                .map_err(|e| SpecError::BadPattern { spec: format!("{} name", spec()), source: Box::new(e) })?;
            if let Some([a, b]) = r.layers {
                if a > b {
                    return Err(SpecError::EmptyLayers { spec: spec(), first: a, last: b });
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

    /// Does llama-quantize's check refuse this recipe without an imatrix (some rule picks an IQ1/IQ2/IQ3_XXS type)?
    pub fn needs_imatrix(&self) -> bool {
        self.rules.iter().any(|r| super::rules::requires_imatrix("", r.dtype, self.base))
    }

    /// A named recipe (`moe-q4`, …), case-insensitive.
    pub fn named(name: &str) -> Option<Recipe> {
        NAMED.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(n, t)| Recipe::parse(n, t).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sling_core::DType;

    use super::super::rules::{allows_quantization, layer_of, Why};
    use super::super::test_models as tm;

    /// The recipe table of docs/quantization.md (between the `moe-iq recipes` markers): role → type per recipe.
    fn docs_table() -> (Vec<String>, Vec<(String, Vec<String>)>) {
        let doc = include_str!("../../../../docs/quantization.md");
        let a = doc.find("<!-- moe-iq recipes -->").expect("start marker");
        let b = doc.find("<!-- /moe-iq recipes -->").expect("end marker");
        let rows: Vec<Vec<String>> = doc[a..b]
            .lines()
            .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
            .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`').to_string()).collect())
            .collect();
        let recipes = rows[0][2..].to_vec();
        (recipes, rows[1..].iter().map(|r| (r[0].clone(), r[2..].to_vec())).collect())
    }

    /// The docs row a tensor belongs to.
    fn row_of(name: &str) -> &'static str {
        match Role::of(name) {
            Role::RoutedExperts if name.contains("ffn_down_exps") && layer_of(name).unwrap() <= 7 => {
                "routed experts, down, blocks 0-7"
            }
            Role::RoutedExperts if name.contains("ffn_down_exps") => "routed experts, down, later blocks",
            Role::RoutedExperts => "routed experts, gate and up",
            Role::SharedExperts => "shared experts",
            Role::DenseFfn => "dense FFN",
            Role::Attention => "attention",
            Role::Embeddings => "token embeddings",
            Role::Output => "output",
            r => panic!("{name}: role {r:?} is not in the table"),
        }
    }

    /// llama-quantize's row fallback (docs/quantization.md "Row fallbacks").
    fn fallback(t: DType, ne0: u64) -> DType {
        if ne0.is_multiple_of(t.block_elems() as u64) {
            return t;
        }
        match t {
            DType::Q4K => DType::Q5_0,
            DType::Q5K => DType::Q5_1,
            DType::Q6K => DType::Q8_0,
            _ => DType::IQ4NL,
        }
    }

    #[test]
    fn moe_iq_recipes_give_the_documented_types() {
        let (recipes, rows) = docs_table();
        assert_eq!(recipes, ["moe-iq1", "moe-iq2"]);
        for (i, rname) in recipes.iter().enumerate() {
            let r = Recipe::named(rname).unwrap();
            assert!(r.needs_imatrix(), "{rname}");
            for m in [tm::deepseek_v3(), tm::qwen3_moe(), tm::gpt_oss()] {
                let got = m.choose(&tm::options(r.base, true, r.rules.clone()));
                let mut seen = std::collections::BTreeSet::new();
                for (name, ne) in &m.tensors {
                    let c = &got[name];
                    if !allows_quantization(name, ne, false) {
                        assert_eq!(c.why, Why::Kept, "{rname} {name}");
                        let kept = rows.iter().find(|(l, _)| l.starts_with("router")).unwrap();
                        assert_eq!(kept.1[i], "kept");
                        continue;
                    }
                    let label = row_of(name);
                    seen.insert(label);
                    let (_, types) = rows.iter().find(|(l, _)| l == label).unwrap_or_else(|| panic!("{label}"));
                    let want = DType::from_name(&types[i]).unwrap_or_else(|| panic!("{}", types[i]));
                    assert_eq!(c.dtype, fallback(want, ne[0]), "{rname} {name} {ne:?}");
                    assert!(matches!(c.why, Why::Pattern(_)), "{rname} {name}: {:?}", c.why);
                }
                // DeepSeek-V3 has every row; Qwen3-MoE and gpt-oss have no shared experts or dense layers.
                let n = if m.facts.n_expert == 256 { 8 } else { 6 };
                assert_eq!(seen.len(), n, "{rname}: {seen:?}");
            }
        }
    }

    /// Bytes and bits per weight of every tensor's choice on a test model.
    fn size(m: &tm::Model, base: super::super::rules::Ftype, rules: Vec<TensorTypeRule>) -> (u64, f64) {
        let got = m.choose(&tm::options(base, true, rules));
        let bytes: u64 = m.tensors.iter().map(|(n, ne)| got[n].dtype.bytes_for(ne.iter().product()).unwrap()).sum();
        (bytes, bytes as f64 * 8.0 / m.elems() as f64)
    }

    /// The sizes docs/quantization.md quotes (full DeepSeek-V3 and Qwen3-30B-A3B shapes, with an imatrix).
    /// `cargo test -p sling-target-gguf moe_iq_sizes -- --nocapture` prints them.
    #[test]
    fn moe_iq_sizes() {
        let (ds, qw) = (tm::deepseek_v3(), tm::qwen3_moe());
        let mut lines = Vec::new();
        let mut row = |label: &str, base, rules: Vec<TensorTypeRule>| {
            let (b1, p1) = size(&ds, base, rules.clone());
            let (b2, p2) = size(&qw, base, rules);
            lines.push(format!(
                "| {label} | {:.1} GB, {p1:.2} bpw | {:.2} GB, {p2:.2} bpw |",
                b1 as f64 / 1e9,
                b2 as f64 / 1e9
            ));
            (p1, p2)
        };
        let mut bpw = std::collections::HashMap::new();
        for n in ["moe-iq1", "moe-iq2"] {
            let r = Recipe::named(n).unwrap();
            bpw.insert(n.to_string(), row(&format!("`{n}`"), r.base, r.rules));
        }
        for f in super::super::rules::FTYPES
            .iter()
            .filter(|f| f.name.starts_with("IQ1") || f.name.starts_with("IQ2") || f.name.starts_with("IQ3"))
        {
            bpw.insert(f.name.to_string(), row(f.name, *f, vec![]));
        }
        eprintln!("{}", lines.join("\n"));
        let doc = include_str!("../../../../docs/quantization.md");
        for l in &lines {
            assert!(doc.contains(l.as_str()), "docs/quantization.md should say {l}");
        }
        // The issue's target: a 1.6-2.5 bpw DeepSeek-class quant.
        assert!((1.6..2.5).contains(&bpw["moe-iq1"].0) && (1.6..2.5).contains(&bpw["moe-iq2"].0));
    }

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
