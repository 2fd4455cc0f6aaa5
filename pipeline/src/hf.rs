//! A Hugging Face checkpoint seen as the tensors a Hugging Face-format artifact holds: every source tensor
//! under its own name, as a lazy recipe of f32 rows, with its role. DeepSeek FP8 weights come out dequantized
//! (`weight * weight_scale_inv` per 128×128 block, as the reference converters do) and their scales are
//! dropped; transformers-5 fused expert tensors (`mlp.experts.gate_up_proj [E, 2I, H]`,
//! `mlp.experts.down_proj [E, H, I]`) come out as the per-expert 2-D tensors vLLM, transformers and
//! `convert_hf_to_gguf.py` load (`mlp.experts.{e}.{gate,up,down}_proj.weight`). Layers past
//! `num_hidden_layers` (DeepSeek's multi-token-prediction layer) and rotary caches are left out.

use crate::ops::{Op, Src};
use crate::PlanError;
use sling_core::Role;
use sling_core::{DType, ModelConfig};
use sling_formats::checkpoint::{Checkpoint, SourceTensor};

/// One tensor of the checkpoint as an artifact in Hugging Face naming holds it.
#[derive(Clone, Debug)]
pub struct HfTensor {
    pub name: String,
    /// PyTorch order.
    pub shape: Vec<u64>,
    pub op: Op,
    /// The dtype the source stores the values in (BF16 for a dequantized FP8 weight).
    pub dtype: DType,
    pub role: Role,
    /// Layer index, when the name has one.
    pub layer: Option<u64>,
    /// Routed expert index, for per-expert tensors.
    pub expert: Option<u64>,
    pub sources: Vec<String>,
}

impl HfTensor {
    /// This tensor as one weight stored as it is (one part: its name, the dtype the source stores it in, its
    /// shape), encoded as `enc` says.
    pub fn into_weight<E>(self, enc: E) -> crate::Weight<E> {
        crate::Weight {
            parts: vec![crate::Part::new(self.name.clone(), self.dtype, self.shape.clone())],
            name: self.name,
            role: self.role,
            op: self.op,
            enc,
            sources: self.sources,
            row_align: 1,
        }
    }
}

/// A weight the target's scheme cannot take (`why`), kept at source precision: warned about, listed in `kept` (for
/// `plan`, the manifest and the card), and stored as it is, encoded as `keep`.
pub fn keep_unfit<E>(t: HfTensor, why: String, keep: E, kept: &mut Vec<crate::Kept>) -> crate::Weight<E> {
    tracing::warn!("{}: {why}; kept at source precision ({})", t.name, t.dtype);
    kept.push(crate::Kept { name: t.name.clone(), why });
    t.into_weight(keep)
}

/// The layer index in `model.layers.N.…`.
pub fn layer_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// The routed expert index in `….experts.N.…`.
pub fn expert_of(name: &str) -> Option<u64> {
    let (_, rest) = name.split_once(".experts.")?;
    rest.split('.').next()?.parse().ok()
}

fn unsupported(tensor: &str, why: impl Into<String>) -> PlanError {
    PlanError::Unsupported { tensor: tensor.to_string(), why: why.into() }
}

/// The `weight_scale_inv` of an FP8 weight `t` and the block size, checked: present, `[ceil(rows/b0), ceil(cols/b1)]` for the
/// config's `weight_block_size` (both non-zero), f32/bf16/f16, and every value finite. A hostile scale is a
/// [`PlanError`] naming the scale tensor, before any row is read (a NaN scale would otherwise turn whole blocks
/// of the output into NaN, and a short one would be read past its end).
pub fn fp8_scale<'a>(
    ck: &'a Checkpoint,
    t: &SourceTensor,
    block: Option<(u64, u64)>,
) -> Result<(&'a SourceTensor, (u64, u64)), PlanError> {
    let name = t.name.as_str();
    let scale_name = format!("{name}_scale_inv");
    let s = ck.get(&scale_name).ok_or_else(|| unsupported(name, format!("FP8 weight without {scale_name}")))?;
    let block = block.ok_or_else(|| unsupported(name, "FP8 source without weight_block_size"))?;
    if t.shape.len() != 2
        || s.shape.len() != 2
        || block.0 == 0
        || block.1 == 0
        || s.shape[0] != t.shape[0].div_ceil(block.0)
        || s.shape[1] != t.shape[1].div_ceil(block.1)
    {
        return Err(PlanError::Shape {
            tensor: scale_name,
            shape: s.shape.clone(),
            why: format!("must be [ceil(rows/{}), ceil(cols/{})] of {name} {:?}", block.0, block.1, t.shape),
        });
    }
    if !matches!(s.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(unsupported(&scale_name, format!("scale dtype {} (expected f32)", s.dtype)));
    }
    let mut v = Vec::new();
    sling_quantizers::decode_to_f32(s.dtype, ck.bytes(s), &mut v)
        .map_err(|e| unsupported(&scale_name, format!("cannot decode the scale: {e}")))?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(unsupported(&scale_name, format!("non-finite scale {} at element {i}", v[i])));
    }
    Ok((s, block))
}

/// Every tensor of `ck` in checkpoint order, as listed in the module docs.
pub fn tensors(ck: &Checkpoint) -> Result<Vec<HfTensor>, PlanError> {
    tensors_with(ck, false)
}

/// [`tensors`], and with `gpt_oss` also a gpt-oss checkpoint's: its stacked expert tensors come out as they are
/// stored, for the target to rearrange — bf16 `mlp.experts.gate_up_proj` `[E, H, 2I]` (gate/up interleaved) and
/// `down_proj` `[E, I, H]`, or MXFP4 `…_blocks` `[E, out, n, 16]` and `…_scales` `[E, out, n]` as U8 bytes
/// (each value one byte, exact), with `…_bias` `[E, out]`; role [`Role::RoutedExperts`], no expert index.
pub fn tensors_with(ck: &Checkpoint, gpt_oss: bool) -> Result<Vec<HfTensor>, PlanError> {
    let cfg: &ModelConfig = ck.config.as_ref().ok_or(PlanError::NoConfig)?;
    let n_layers = cfg.req_u64(&["num_hidden_layers", "n_layers", "n_layer", "num_layers"])?;
    let quant = cfg.get("quantization_config");
    let method = quant.and_then(|q| q.get("quant_method")).and_then(|m| m.as_str()).map(str::to_string);
    let block =
        quant.and_then(|q| q.get("weight_block_size")).and_then(|b| b.as_array()).and_then(|b| match b.as_slice() {
            [r, c] => Some((r.as_u64()?, c.as_u64()?)),
            _ => None,
        });
    let is_gpt_oss = ck.config.as_ref().and_then(|c| c.get("model_type")).and_then(|v| v.as_str()) == Some("gpt_oss");
    match method.as_deref() {
        None | Some("fp8") => {}
        Some("mxfp4") if gpt_oss && is_gpt_oss => {}
        Some(m) => {
            return Err(unsupported(
                "quantization_config",
                format!(
                    "quant_method {m:?} sources are not supported for this target (bf16/f16/f32 and DeepSeek fp8 are)"
                ),
            ))
        }
    }
    if is_gpt_oss && !gpt_oss {
        // Its experts are stacked [E, in, out] with gate/up interleaved: not the fused layout handled below.
        return Err(unsupported("config.json", "gpt-oss checkpoints are not supported for this target yet"));
    }
    let mut out = Vec::new();
    for t in ck.tensors() {
        let name = t.name.as_str();
        if name.ends_with(".rotary_emb.inv_freq")
            || name.ends_with("_scale_inv")
            || name.ends_with(".activation_scale")
            || name.ends_with("_activation_scale")
        {
            continue;
        }
        let layer = layer_of(name);
        if layer.is_some_and(|l| l >= n_layers) {
            continue; // DeepSeek's MTP layer (what every runtime skips)
        }
        if t.shape.contains(&0) {
            return Err(PlanError::Shape {
                tensor: t.name.clone(),
                shape: t.shape.clone(),
                why: "empty dimension".into(),
            });
        }
        let src = Src::of(t);
        if gpt_oss && is_gpt_oss && name.contains(".mlp.experts.") {
            let mxfp4 = name.ends_with("_blocks") || name.ends_with("_scales");
            let ok = match t.dtype {
                DType::U8 => mxfp4,
                DType::F32 | DType::F16 | DType::BF16 => !mxfp4,
                _ => false,
            };
            if !ok {
                return Err(unsupported(name, format!("{} gpt-oss expert tensor", t.dtype)));
            }
            out.push(HfTensor {
                role: Role::RoutedExperts,
                layer,
                expert: None,
                shape: t.shape.clone(),
                op: Op::Source(src),
                dtype: t.dtype,
                sources: vec![t.name.clone()],
                name: t.name.clone(),
            });
            continue;
        }
        let (op, dtype, mut sources) = match t.dtype {
            DType::F32 | DType::F16 | DType::BF16 => (Op::Source(src), t.dtype, vec![t.name.clone()]),
            DType::F8E4M3 => {
                let (s, block) = fp8_scale(ck, t, block)?;
                (Op::Fp8 { weight: src, scale: Src::of(s), block }, DType::BF16, vec![t.name.clone(), s.name.clone()])
            }
            d => return Err(unsupported(name, format!("{d} tensors are not supported for this target"))),
        };
        // transformers-5 fused experts: [E, 2I, H] and [E, H, I] -> per-expert 2-D.
        let fused = [("mlp.experts.gate_up_proj", true), ("mlp.experts.down_proj", false)]
            .into_iter()
            .find(|(stem, _)| name.ends_with(stem) || name.ends_with(&format!("{stem}.weight")));
        if let Some((stem, gate_up)) = fused {
            let [e, r, c] = t.shape[..] else {
                return Err(PlanError::Shape {
                    tensor: t.name.clone(),
                    shape: t.shape.clone(),
                    why: "expected [E, rows, cols]".into(),
                });
            };
            if gate_up && r % 2 != 0 {
                return Err(PlanError::Shape {
                    tensor: t.name.clone(),
                    shape: t.shape.clone(),
                    why: "gate_up_proj must be [E, 2*I, H]".into(),
                });
            }
            let base = &name[..name.find(stem).unwrap_or(0)];
            let parts: &[(&str, u64, u64)] =
                if gate_up { &[("gate_proj", 0, r / 2), ("up_proj", r / 2, r / 2)] } else { &[("down_proj", 0, r)] };
            for x in 0..e {
                for &(proj, start, n) in parts {
                    let map = (0..n).map(|i| x * r + start + i).collect();
                    let n_name = format!("{base}mlp.experts.{x}.{proj}.weight");
                    out.push(HfTensor {
                        role: Role::RoutedExperts,
                        layer,
                        expert: Some(x),
                        shape: vec![n, c],
                        op: Op::Rows { inner: Box::new(op.clone()), map },
                        dtype,
                        sources: sources.clone(),
                        name: n_name,
                    });
                }
            }
            continue;
        }
        if name.contains("experts.") && (name.ends_with("_blocks") || name.ends_with("_scales") || t.shape.len() > 2) {
            return Err(unsupported(
                name,
                "stacked or MXFP4 expert tensors (gpt-oss layout) are not supported for this target yet",
            ));
        }
        sources.dedup();
        out.push(HfTensor {
            role: Role::of_hf(name, t.shape.len()),
            layer,
            expert: expert_of(name).filter(|_| !name.contains("shared_expert")),
            shape: t.shape.clone(),
            op,
            dtype,
            sources,
            name: t.name.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let role_of = Role::of_hf;
        assert_eq!(role_of("model.layers.1.mlp.experts.3.gate_proj.weight", 2), Role::RoutedExperts);
        assert_eq!(role_of("model.layers.1.block_sparse_moe.experts.3.w1.weight", 2), Role::RoutedExperts);
        assert_eq!(role_of("model.layers.1.mlp.gate.weight", 2), Role::Router);
        assert_eq!(role_of("model.layers.1.block_sparse_moe.gate.weight", 2), Role::Router);
        assert_eq!(role_of("model.layers.1.mlp.shared_expert_gate.weight", 2), Role::Router);
        assert_eq!(role_of("model.layers.1.mlp.shared_experts.down_proj.weight", 2), Role::SharedExperts);
        assert_eq!(role_of("model.layers.1.mlp.shared_expert.down_proj.weight", 2), Role::SharedExperts);
        assert_eq!(role_of("model.layers.1.self_attn.kv_b_proj.weight", 2), Role::Attention);
        assert_eq!(role_of("model.layers.1.self_attn.kv_a_layernorm.weight", 1), Role::Other);
        assert_eq!(role_of("model.layers.1.self_attn.q_norm.weight", 1), Role::Other);
        assert_eq!(role_of("model.embed_tokens.weight", 2), Role::Embeddings);
        assert_eq!(role_of("lm_head.weight", 2), Role::Output);
        assert_eq!(role_of("model.layers.0.mlp.down_proj.weight", 2), Role::DenseFfn);
        assert_eq!(role_of("model.layers.0.mlp.gate.e_score_correction_bias", 1), Role::Other);
    }

    #[test]
    fn indices() {
        assert_eq!(layer_of("model.layers.12.mlp.experts.7.up_proj.weight"), Some(12));
        assert_eq!(expert_of("model.layers.12.mlp.experts.7.up_proj.weight"), Some(7));
        assert_eq!(expert_of("model.layers.12.mlp.gate.weight"), None);
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
