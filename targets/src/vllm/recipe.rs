//! vLLM recipes (`--to vllm:w4a16|w4a16-asym|w8a16 --recipe FILE`, the file format of [`crate::recipe`]): per-weight
//! bits (4 or 8) and group sizes (32, 64, 128) over the scheme's, or the source precision, stored as a
//! compressed-tensors config with one config group per encoding. What `--to vllm:auto` writes out, so that the same
//! artifact can be made again without measuring.
//!
//! vLLM loads some weights as one layer and needs one scheme for all of them ([`super::fused_unit`]): a layer's
//! routed experts (every projection of every expert), q/k/v, gate/up. A recipe that splits such a layer is refused.

use std::collections::HashMap;

use sling_pipeline::{Part, Plan};
use sling_quantizers::ct::IntArgs;

use super::{fused_unit, int_parts, Enc};
use crate::recipe::{Choice, Limits, RecipeFile};
use crate::TargetError;

/// What vLLM recipes take: the integer widths vLLM's WNA16 kernels run (Marlin: 4 and 8 bits; groups 32, 64, 128).
pub const LIMITS: Limits = Limits { target: "vLLM", bits: &[4, 8], groups: &[32, 64, 128] };

/// Applies recipe `r` (`name` for messages) to the integer weights of `plan` (planned at group 32,
/// [`super::plan_in_groups`], so that every weight vLLM can take is planned quantized): the recipe's defaults over
/// `default` (the scheme's bits and group size), then each rule's choice for the weights it matches; symmetry stays
/// the scheme's. A weight no rule names whose rows the default group does not divide is kept at source precision,
/// as [`super::plan`] keeps it (an error with `strict`); a rule's group that does not divide the rows of a weight it
/// names is an error.
pub fn apply(
    name: &str,
    r: &RecipeFile,
    plan: &mut Plan<Enc>,
    default: (u32, u64),
    strict: bool,
) -> Result<(), TargetError> {
    let (bits, group) = (r.bits.unwrap_or(default.0), r.group_size.unwrap_or(default.1));
    let mut kept = Vec::new();
    for w in &mut plan.weights {
        let Enc::Int { args, sd } = w.enc.clone() else { continue };
        let (rows, cols) = (w.rows(), w.cols());
        let module = w.name.strip_suffix(".weight").unwrap_or(&w.name).to_string();
        let choice = match r.choice(&w.name) {
            Some(c) => c,
            None if cols % group != 0 => {
                let why = format!("row length {cols} is not a multiple of the group size {group}");
                if strict {
                    return Err(TargetError::Strict { tensor: w.name.clone(), why });
                }
                tracing::warn!("{}: {why}; kept at source precision", w.name);
                kept.push(sling_pipeline::Kept { name: w.name.clone(), why });
                Choice::Keep
            }
            None => Choice::Quant { bits, group: Some(group) },
        };
        match choice {
            Choice::Keep => {
                let d = sd.dtype();
                w.enc = Enc::Keep(d);
                w.parts = vec![Part::new(w.name.clone(), d, vec![rows, cols])];
                w.row_align = 1;
            }
            Choice::Quant { bits, group: g } => {
                let g = g.unwrap_or(group);
                if cols % g != 0 {
                    return Err(TargetError::Unsupported(format!(
                        "recipe {name}: {}: row length {cols} is not a multiple of the rule's group size {g}",
                        w.name
                    )));
                }
                let args = IntArgs { bits, symmetric: args.symmetric, group: Some(g as usize) };
                (w.parts, w.row_align) = int_parts(&module, rows, cols, args, sd);
                w.enc = Enc::Int { args, sd };
            }
        }
    }
    plan.kept.extend(kept);
    check_units(name, plan)
}

/// Refuses a plan that gives the weights of one vLLM layer different encodings.
pub fn check_units(name: &str, plan: &Plan<Enc>) -> Result<(), TargetError> {
    let mut seen: HashMap<String, (&str, &Enc)> = HashMap::new();
    for w in &plan.weights {
        let unit = fused_unit(w);
        match seen.get(&unit) {
            Some((first, enc)) if *enc != &w.enc => {
                return Err(TargetError::Unsupported(format!(
                    "recipe {name}: vLLM loads {first} and {} as one layer ({unit}); they need the same bits and \
                     group size (or both keep = true)",
                    w.name
                )))
            }
            Some(_) => {}
            None => {
                seen.insert(unit, (&w.name, &w.enc));
            }
        }
    }
    Ok(())
}

/// The anchored pattern of a rule for the weights `names` of one vLLM layer: a layer's routed experts by the
/// layer's name (`^model\.layers\.3\.mlp\.experts\.\d+\.[^.]+\.weight$`, whatever the count), other units by
/// their weights' names.
pub fn unit_pattern(names: &[&str]) -> String {
    let layers: Vec<Option<&str>> = names.iter().map(|n| super::expert_layer(n).map(|(l, _)| l)).collect();
    match layers.first() {
        Some(Some(l)) if layers.iter().all(|x| x == &Some(*l)) => {
            format!("^{}\\.\\d+\\.[^.]+\\.weight$", regex::escape(l))
        }
        _ => {
            let alts: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
            format!("^(?:{})$", alts.join("|"))
        }
    }
}

/// The recipe file of per-unit choices (`(pattern, choice)`, patterns from [`unit_pattern`]) over `default` bits
/// and group size.
pub fn toml(description: &str, default: (u32, u64), rules: &[(String, Choice)]) -> String {
    RecipeFile::toml(HEADER, description, default.0, default.1, rules)
}

/// The comment heading a recipe `vllm:auto` writes.
const HEADER: &str = "Written by `sling quantize|plan --to vllm:auto`: one rule per vLLM layer, chosen from measured
sensitivities under a size budget. `sling quantize SRC --to vllm:w4a16 --recipe THIS -o OUT` makes
the same weights (the recipe's bits and group_size replace the scheme's).";
