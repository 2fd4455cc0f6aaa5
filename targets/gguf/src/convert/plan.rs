//! Planning a conversion: which GGUF tensors come out, in which order, with which type, shape and
//! source recipe — decided from headers and config.json alone, before any byte is read or written.
//!
//! Mirrors `ModelBase.prepare_tensors` and the architectures' `modify_tensors` in the pinned
//! reference converter, so that tensor order, names, shapes, types and bytes agree with it.

use std::collections::BTreeMap;

use sling_core::{DType, ModelConfig};

use super::arch::{self, Arch, Family, KEEP_F32};
use sling_formats::checkpoint::{Checkpoint, SourceTensor};
use sling_pipeline::ops::{Mxfp4Repack, Op, Src};
use sling_pipeline::PlanError;

/// The output type requested with `--type` (`--outtype` of the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl OutType {
    pub fn dtype(self) -> DType {
        match self {
            OutType::F32 => DType::F32,
            OutType::F16 => DType::F16,
            OutType::BF16 => DType::BF16,
            OutType::Q8_0 => DType::Q8_0,
        }
    }
    /// `llama_ftype` / `gguf.LlamaFileType`.
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q8_0 => 7,
            OutType::BF16 => 32,
        }
    }
    pub fn parse(s: &str) -> Option<OutType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => OutType::F32,
            "f16" => OutType::F16,
            "bf16" => OutType::BF16,
            "q8_0" => OutType::Q8_0,
            _ => return None,
        })
    }
}

/// One tensor of the output file.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: DType,
    /// ggml order (`ne[0]` innermost); `ne.len()` is the n_dims written.
    pub ne: Vec<u64>,
    /// Where the values (or, for a same-type copy, the bytes) come from: a recipe over the source
    /// checkpoint, gpt-oss's MXFP4 blocks ([`Op::Mxfp4`]) or a GGUF source file's tensor ([`Op::Gguf`]).
    pub op: Op,
    /// Source tensor names, for reports and provenance.
    pub sources: Vec<String>,
    /// Round the values through this type before encoding them as `dtype`: the type of the intermediate
    /// file of a two-pass pipeline (`convert_hf_to_gguf.py --outtype bf16`, then `llama-quantize`).
    pub round_via: Option<DType>,
    /// Importance weights (`ne[0]` per expert, expert-major) used when quantizing, as llama-quantize passes them.
    pub weights: Option<std::sync::Arc<Vec<f32>>>,
}

impl OutTensor {
    pub fn numel(&self) -> u64 {
        self.ne.iter().product()
    }
    pub fn n_bytes(&self) -> u64 {
        self.dtype.bytes_for(self.numel()).unwrap_or(0)
    }
    /// Rows (`numel / ne[0]`).
    pub fn rows(&self) -> u64 {
        self.numel() / self.ne.first().copied().unwrap_or(1).max(1)
    }
}

/// A planned conversion.
pub struct Plan {
    pub arch: &'static Arch,
    pub tensors: Vec<OutTensor>,
    /// Notes for the user (fallbacks to F16, dropped tensors).
    pub notes: Vec<String>,
}

fn shape_err(t: &SourceTensor, why: impl Into<String>) -> PlanError {
    PlanError::Shape { tensor: t.name.clone(), shape: t.shape.clone(), why: why.into() }
}

/// Looks up the architecture of a checkpoint.
pub fn arch_of(cfg: &ModelConfig) -> Result<&'static Arch, PlanError> {
    let name = cfg.architecture()?;
    arch::find(name)
        .ok_or_else(|| PlanError::UnsupportedArch { arch: name.to_string(), supported: arch::supported().join(", ") })
}

/// Pending intermediate tensor: a name in HF space, a numpy shape and a recipe.
struct Pending {
    name: String,
    shape: Vec<u64>,
    op: Op,
}

struct Planner<'a> {
    arch: &'static Arch,
    cfg: &'a ModelConfig,
    out: OutType,
    tensors: Vec<OutTensor>,
    notes: Vec<String>,
    experts: BTreeMap<u64, BTreeMap<String, (Vec<u64>, Op)>>,
}

/// Plans the conversion of `ck` to `out`.
pub fn plan(ck: &Checkpoint, out: OutType) -> Result<Plan, PlanError> {
    let cfg = ck.config.as_ref().ok_or(PlanError::NoConfig)?;
    let arch = arch_of(cfg)?;
    let mut p = Planner { arch, cfg, out, tensors: Vec::new(), notes: Vec::new(), experts: BTreeMap::new() };
    p.run(ck)?;
    if let Some((layer, names)) = p.experts.iter().find(|(_, m)| !m.is_empty()) {
        return Err(PlanError::IncompleteExperts { layer: *layer, names: names.keys().cloned().collect() });
    }
    if let Err(reason) = super::naming::card_keys(&ck.dir) {
        p.notes.push(format!("{}: {reason}", super::naming::MODEL_CARD_NOTE));
    }
    Ok(Plan { arch, tensors: p.tensors, notes: p.notes })
}

fn layer_of(name: &str) -> Option<u64> {
    name.split('.').find(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).and_then(|s| s.parse().ok())
}

/// `LlamaModel.permute`: out row `h*hd + 2i + j` = in row `h*hd + j*hd/2 + i`.
fn permute_map(rows: u64, n_head: u64) -> Vec<u64> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut m = Vec::with_capacity(rows as usize);
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                m.push(h * hd + j * half + i);
            }
        }
    }
    m
}

/// Rows `start, start+step, ...` of each of `batch` blocks of `per` rows.
fn strided(batch: u64, per: u64, start: u64, step: u64, n: u64) -> Vec<u64> {
    (0..batch).flat_map(|b| (0..n).map(move |k| b * per + start + k * step)).collect()
}

impl<'a> Planner<'a> {
    fn quant(&self) -> Option<(String, Option<(u64, u64)>)> {
        let q = self.cfg.get("quantization_config")?;
        let method = q.get("quant_method")?.as_str()?.to_string();
        let block = q.get("weight_block_size").and_then(|b| b.as_array()).and_then(|b| match b.as_slice() {
            [r, c] => Some((r.as_u64()?, c.as_u64()?)),
            _ => None,
        });
        Some((method, block))
    }

    fn run(&mut self, ck: &Checkpoint) -> Result<(), PlanError> {
        let n_layers = self.cfg.req_u64(&["n_layers", "num_hidden_layers", "n_layer", "num_layers"])?;
        let quant = self.quant();
        let fp8 = matches!(&quant, Some((m, _)) if m == "fp8");
        let mxfp4 = matches!(&quant, Some((m, _)) if m == "mxfp4");
        if let Some((m, _)) = &quant {
            if !fp8 && !mxfp4 {
                return Err(PlanError::Unsupported {
                    tensor: "quantization_config".into(),
                    why: format!("quant_method {m:?} sources are not supported (fp8 and mxfp4 are)"),
                });
            }
        }
        if mxfp4 {
            self.mxfp4_experts(ck)?;
        }
        self.check_shapes(ck)?;
        for t in ck.tensors() {
            let mut name = t.name.clone();
            if name.ends_with(".attention.masked_bias")
                || name.ends_with(".attention.bias")
                || name.ends_with(".rotary_emb.inv_freq")
            {
                continue;
            }
            // filter_tensors
            if name.ends_with("e_score_correction_bias") {
                name = name.replace("e_score_correction_bias", "e_score_correction.bias");
            }
            if name.contains("language_model.") {
                name = name.replace("language_model.", "");
            }
            if self.arch.family == Family::GptOss && name.contains("sinks") {
                name.push_str(".weight");
            }
            let src = Src::of(t);
            let mut op = Op::Source(src.clone());
            if fp8 {
                if name.ends_with(".weight_scale_inv")
                    || name.ends_with(".activation_scale")
                    || name.ends_with("_activation_scale")
                {
                    continue;
                }
                // An FP8 weight needs its scale; a scale beside any other weight is applied the same way
                // (`dequant_simple`). Either way it is checked first (sling_pipeline::hf::fp8_scale).
                let has_scale = ck.get(&format!("{}_scale_inv", t.name)).is_some();
                if has_scale || matches!(t.dtype, DType::F8E4M3 | DType::F8E5M2) {
                    let block = quant.as_ref().and_then(|(_, b)| *b);
                    let (s, block) = sling_pipeline::hf::fp8_scale(ck, t, block)?;
                    op = Op::Fp8 { weight: src.clone(), scale: Src::of(s), block };
                }
            }
            if mxfp4 && (name.ends_with("_blocks") || name.ends_with("_scales")) {
                // Written by mxfp4_experts; any other MXFP4 pair would be dropped without a word.
                if !(t.name.contains("mlp.experts.down_proj_") || t.name.contains("mlp.experts.gate_up_proj_")) {
                    return Err(PlanError::Unsupported {
                        tensor: t.name.clone(),
                        why: "MXFP4 blocks/scales are supported for the experts' down_proj and gate_up_proj only"
                            .into(),
                    });
                }
                continue;
            }
            let bid = layer_of(&name);
            if let Some(b) = bid {
                if name.starts_with("model.layers.") && b >= n_layers {
                    if self.arch.family == Family::Deepseek2 {
                        continue; // MTP layers (skip_mtp)
                    }
                    return Err(PlanError::BadLayer(name));
                }
            }
            if matches!(t.dtype, DType::U8 | DType::Bool) {
                return Err(PlanError::Unsupported {
                    tensor: t.name.clone(),
                    why: format!("unexpected {} tensor", t.dtype),
                });
            }
            self.modify(Pending { name, shape: t.shape.clone(), op }, bid)?;
        }
        Ok(())
    }

    fn n_head(&self) -> Result<(u64, u64), PlanError> {
        let h = self.cfg.req_u64(&["n_heads", "num_attention_heads"])?;
        let kv = self.cfg.find_u64(&["n_kv_heads", "num_key_value_heads"])?.unwrap_or(h);
        Ok((h, kv))
    }

    fn n_experts(&self) -> Result<u64, PlanError> {
        Ok(self.cfg.req_u64(self.arch.expert_count_keys)?)
    }

    /// `modify_tensors` of the architecture.
    fn modify(&mut self, mut p: Pending, bid: Option<u64>) -> Result<(), PlanError> {
        let fam = self.arch.family;
        if fam == Family::Llama {
            let (h, kv) = self.n_head()?;
            let n = if p.name.ends_with("q_proj.weight") || p.name.ends_with("q_proj.bias") {
                Some(h)
            } else if p.name.ends_with("k_proj.weight") || p.name.ends_with("k_proj.bias") {
                Some(kv)
            } else {
                None
            };
            if let Some(n) = n {
                let rows = p.shape[0];
                if rows % (2 * n) != 0 {
                    return Err(PlanError::Shape {
                        tensor: p.name,
                        shape: p.shape,
                        why: format!("rows not divisible by 2*{n} heads"),
                    });
                }
                let map = if p.shape.len() == 1 {
                    // A bias is one row of `rows` values: permute columns instead.
                    let m = permute_map(rows, n);
                    let t = Op::Transpose { inner: Box::new(p.op), batch: 1, r: 1, c: rows };
                    let g = Op::Rows { inner: Box::new(t), map: m };
                    p.op = Op::Transpose { inner: Box::new(g), batch: 1, r: rows, c: 1 };
                    None
                } else {
                    Some(permute_map(rows, n))
                };
                if let Some(map) = map {
                    p.op = Op::Rows { inner: Box::new(p.op), map };
                }
            }
        }
        if fam == Family::Deepseek2
            && self.cfg.get_bool("tie_word_embeddings") == Some(true)
            && (p.name == "lm_head.weight" || p.name == "model.lm_head.weight")
        {
            return Ok(());
        }
        if fam == Family::Qwen2Moe {
            if p.name.ends_with("mlp.experts.down_proj") || p.name.ends_with("mlp.experts.down_proj.weight") {
                if !p.name.ends_with(".weight") {
                    p.name.push_str(".weight");
                }
                return self.emit(p, bid);
            }
            if p.name.ends_with("mlp.experts.gate_up_proj") || p.name.ends_with("mlp.experts.gate_up_proj.weight") {
                if p.shape.len() != 3 || p.shape[1] % 2 != 0 {
                    return Err(PlanError::Shape {
                        tensor: p.name,
                        shape: p.shape,
                        why: "gate_up_proj must be [E, 2*n_ff, n_embd]".into(),
                    });
                }
                let (e, ff2) = (p.shape[0], p.shape[1]);
                let ff = ff2 / 2;
                let base = p.name.trim_end_matches(".weight").trim_end_matches(".gate_up_proj").to_string();
                for (part, start) in [("gate_proj", 0), ("up_proj", ff)] {
                    let op = Op::Rows { inner: Box::new(p.op.clone()), map: strided(e, ff2, start, 1, ff) };
                    self.emit(
                        Pending { name: format!("{base}.{part}.weight"), shape: vec![e, ff, p.shape[2]], op },
                        bid,
                    )?;
                }
                return Ok(());
            }
        }
        if fam == Family::GptOss {
            return self.modify_gpt_oss(p, bid);
        }
        let is_expert = match fam {
            Family::Llama => p.name.contains("block_sparse_moe.experts"),
            Family::Qwen2Moe | Family::Olmoe => p.name.contains("experts"),
            Family::Deepseek2 => p.name.contains("mlp.experts"),
            _ => false,
        };
        if is_expert {
            return self.buffer_expert(p, bid);
        }
        if fam == Family::Deepseek2 && p.name.ends_with("kv_b_proj.weight") {
            return self.split_kv_b(p, bid);
        }
        self.emit(p, bid)
    }

    fn buffer_expert(&mut self, p: Pending, bid: Option<u64>) -> Result<(), PlanError> {
        let bid = bid.ok_or_else(|| PlanError::Unmapped { tensor: p.name.clone(), target: "GGUF" })?;
        let n = self.n_experts()?;
        let layer = self.experts.entry(bid).or_default();
        layer.insert(p.name, (p.shape, p.op));
        if (layer.len() as u64) < n * 3 {
            return Ok(());
        }
        let mut layer = self.experts.remove(&bid).unwrap_or_default();
        let prefix = self.arch.experts_prefix;
        for (w, stem) in self.arch.expert_weights {
            let mut parts = Vec::new();
            let mut shape: Option<Vec<u64>> = None;
            for x in 0..n {
                let ename = format!("model.layers.{bid}.{prefix}.{x}.{w}.weight");
                let (s, op) = layer
                    .remove(&ename)
                    .ok_or_else(|| PlanError::IncompleteExperts { layer: bid, names: vec![ename.clone()] })?;
                match &shape {
                    Some(s0) if *s0 != s => {
                        return Err(PlanError::Shape {
                            tensor: ename,
                            shape: s,
                            why: format!("other experts of this layer are {s0:?}"),
                        })
                    }
                    _ => shape = Some(s),
                }
                parts.push(op);
            }
            let s = shape.unwrap_or_default();
            let mut full = vec![n];
            full.extend(s);
            self.emit(
                Pending { name: format!("model.layers.{bid}.{stem}.weight"), shape: full, op: Op::Concat(parts) },
                Some(bid),
            )?;
        }
        if !layer.is_empty() {
            // Leftovers are reported at the end, as the reference does ("Unprocessed experts").
            self.experts.insert(bid, layer);
        }
        Ok(())
    }

    fn split_kv_b(&mut self, p: Pending, bid: Option<u64>) -> Result<(), PlanError> {
        // Uses the config's own num_key_value_heads: the converter processes tensors before
        // set_gguf_parameters rewrites it to 1.
        let h = self.cfg.req_u64(&["num_key_value_heads"])?;
        let v = self.cfg.req_u64(&["v_head_dim"])?;
        let nope = self.cfg.req_u64(&["qk_nope_head_dim"])?;
        if p.shape.len() != 2 || p.shape[0] != h * (v + nope) {
            return Err(PlanError::Shape {
                tensor: p.name,
                shape: p.shape,
                why: format!("expected [{h}*({nope}+{v}), kv_lora_rank]"),
            });
        }
        let lora = p.shape[1];
        let kb = Op::Rows { inner: Box::new(p.op.clone()), map: strided(h, v + nope, 0, 1, nope) };
        let kb = Op::Transpose { inner: Box::new(kb), batch: h, r: nope, c: lora };
        let vb = Op::Rows { inner: Box::new(p.op), map: strided(h, v + nope, nope, 1, v) };
        self.emit(Pending { name: p.name.replace("kv_b_proj", "k_b_proj"), shape: vec![h, lora, nope], op: kb }, bid)?;
        self.emit(Pending { name: p.name.replace("kv_b_proj", "v_b_proj"), shape: vec![h, v, lora], op: vb }, bid)
    }

    fn modify_gpt_oss(&mut self, mut p: Pending, bid: Option<u64>) -> Result<(), PlanError> {
        if p.name.contains("down_proj") {
            if p.name.ends_with("_bias") {
                p.name = p.name.replace("down_proj_bias", "down_proj.bias");
            } else {
                // bf16 experts [E, n_ff, n_embd] -> transpose(-1, -2)
                let [e, r, c] = p.shape[..] else {
                    return Err(PlanError::Shape {
                        tensor: p.name,
                        shape: p.shape,
                        why: "expected [E, in, out]".into(),
                    });
                };
                p.name = p.name.replace("down_proj", "down_proj.weight");
                p.op = Op::Transpose { inner: Box::new(p.op), batch: e, r, c };
                p.shape = vec![e, c, r];
            }
        }
        if p.name.contains("gate_up_proj") {
            if p.name.ends_with("_bias") {
                // [E, 2*n_ff]: gate = [..., ::2], up = [..., 1::2] (columns)
                let [e, ff2] = p.shape[..] else {
                    return Err(PlanError::Shape {
                        tensor: p.name,
                        shape: p.shape,
                        why: "expected [E, 2*n_ff]".into(),
                    });
                };
                let ff = ff2 / 2;
                for (part, start) in [("gate_proj.bias", 0), ("up_proj.bias", 1)] {
                    let t = Op::Transpose { inner: Box::new(p.op.clone()), batch: 1, r: e, c: ff2 };
                    let g = Op::Rows { inner: Box::new(t), map: strided(1, ff2, start, 2, ff) };
                    let op = Op::Transpose { inner: Box::new(g), batch: 1, r: ff, c: e };
                    self.emit(
                        Pending { name: p.name.replace("gate_up_proj_bias", part), shape: vec![e, ff], op },
                        bid,
                    )?;
                }
            } else {
                let [e, r, c] = p.shape[..] else {
                    return Err(PlanError::Shape {
                        tensor: p.name,
                        shape: p.shape,
                        why: "expected [E, n_embd, 2*n_ff]".into(),
                    });
                };
                let t = Op::Transpose { inner: Box::new(p.op), batch: e, r, c };
                let ff = c / 2;
                for (part, start) in [("gate_proj.weight", 0), ("up_proj.weight", 1)] {
                    let op = Op::Rows { inner: Box::new(t.clone()), map: strided(e, c, start, 2, ff) };
                    self.emit(Pending { name: p.name.replace("gate_up_proj", part), shape: vec![e, ff, r], op }, bid)?;
                }
            }
            return Ok(());
        }
        self.emit(p, bid)
    }

    /// gpt-oss MXFP4 experts, written before every other tensor (`generate_extra_tensors`).
    fn mxfp4_experts(&mut self, ck: &Checkpoint) -> Result<(), PlanError> {
        for t in ck.tensors() {
            let n = &t.name;
            // Every `_blocks` needs its `_scales` (and the reverse, below): one without the other would be
            // dropped without a word.
            if n.contains("mlp.experts.down_proj_blocks") || n.contains("mlp.experts.gate_up_proj_blocks") {
                let scales = n.replace("_blocks", "_scales");
                if ck.get(&scales).is_none() {
                    return Err(PlanError::Unsupported {
                        tensor: n.clone(),
                        why: format!("MXFP4 blocks without {scales}"),
                    });
                }
                continue;
            }
            let (is_down, is_gu) =
                (n.contains("mlp.experts.down_proj_scales"), n.contains("mlp.experts.gate_up_proj_scales"));
            if !is_down && !is_gu {
                continue;
            }
            let blocks = n.replace("_scales", "_blocks");
            let b = ck.get(&blocks).ok_or_else(|| PlanError::Unsupported {
                tensor: n.clone(),
                why: format!("MXFP4 scales without {blocks}"),
            })?;
            let [e, r, nb, 16] = b.shape[..] else {
                return Err(shape_err(b, "MXFP4 blocks must be [E, rows, n_blocks, 16]"));
            };
            if t.shape != [e, r, nb] || b.dtype != DType::U8 || t.dtype != DType::U8 {
                return Err(shape_err(t, format!("MXFP4 scales must be u8 [{e}, {r}, {nb}] matching {}", b.name)));
            }
            if e == 0 || r == 0 || nb == 0 || (is_gu && r & 1 != 0) {
                return Err(shape_err(b, "MXFP4 blocks need non-zero dimensions (and an even row count for gate_up)"));
            }
            let parts: Vec<(String, Vec<u64>)> = if is_down {
                vec![(n.replace("_scales", ".weight"), strided(e, r, 0, 1, r))]
            } else {
                vec![
                    (n.replace("gate_up_proj_scales", "gate_proj.weight"), strided(e, r, 0, 2, r / 2)),
                    (n.replace("gate_up_proj_scales", "up_proj.weight"), strided(e, r, 1, 2, r / 2)),
                ]
            };
            for (hf, map) in parts {
                let name = self
                    .arch
                    .map_name(&hf)
                    .ok_or_else(|| PlanError::Unmapped { tensor: hf.clone(), target: "GGUF" })?;
                let rows = map.len() as u64 / e;
                self.tensors.push(OutTensor {
                    name,
                    dtype: DType::MXFP4,
                    ne: vec![nb * 32, rows, e],
                    op: Op::Mxfp4(Mxfp4Repack { blocks: b.name.clone(), scales: t.name.clone(), nb, map }),
                    sources: vec![b.name.clone(), t.name.clone()],
                    round_via: None,
                    weights: None,
                });
            }
        }
        Ok(())
    }

    /// Maps the name, picks the type (`prepare_tensors`), records the tensor.
    fn emit(&mut self, p: Pending, _bid: Option<u64>) -> Result<(), PlanError> {
        let name = self
            .arch
            .map_name(&p.name)
            .ok_or_else(|| PlanError::Unmapped { tensor: p.name.clone(), target: "GGUF" })?;
        let n_dims = p.shape.len();
        let ne: Vec<u64> = p.shape.iter().rev().copied().collect();
        let stem = name.rsplit('.').nth(1).unwrap_or("");
        let mut dtype = if n_dims <= 1
            || name.ends_with("_norm.weight")
            || !name.ends_with(".weight")
            || KEEP_F32.contains(&stem)
        {
            DType::F32
        } else {
            self.out.dtype()
        };
        if dtype.is_quantized() && ne.first().copied().unwrap_or(0) % dtype.block_elems() as u64 != 0 {
            self.notes.push(format!(
                "{name}: row length {} is not a multiple of {}, written as f16 (as the reference converter does)",
                ne[0],
                dtype.block_elems()
            ));
            dtype = DType::F16;
        }
        if p.op.rows() * p.op.cols() != ne.iter().product::<u64>() {
            return Err(PlanError::Shape {
                tensor: p.name,
                shape: p.shape,
                why: "internal: recipe size differs from shape".into(),
            });
        }
        let mut sources = Vec::new();
        p.op.sources(&mut sources);
        sources.dedup();
        self.tensors.push(OutTensor { name, dtype, ne, op: p.op, sources, round_via: None, weights: None });
        Ok(())
    }

    /// Shapes that must agree with config.json, checked before anything is written.
    fn check_shapes(&self, ck: &Checkpoint) -> Result<(), PlanError> {
        let hidden = self.cfg.find_u64(&["hidden_size", "n_embd", "dim"])?;
        let vocab = self.cfg.find_u64(&["vocab_size"])?;
        for t in ck.tensors() {
            let n = t.name.as_str();
            if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                if let (Some(h), Some(v)) = (hidden, vocab) {
                    if t.shape != [v, h] {
                        return Err(shape_err(t, format!("expected [vocab_size {v}, hidden_size {h}]")));
                    }
                }
            }
            if n.ends_with("input_layernorm.weight") || n == "model.norm.weight" {
                if let Some(h) = hidden {
                    if t.shape != [h] {
                        return Err(shape_err(t, format!("expected [hidden_size {h}]")));
                    }
                }
            }
            if t.shape.iter().any(|&d| d == 0) {
                return Err(shape_err(t, "empty dimension"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_matches_reference_reshape_swapaxes() {
        // reshape(n_head, 2, hd/2).swapaxes(1, 2): for hd = 4: rows [0, 2, 1, 3] per head
        assert_eq!(permute_map(8, 2), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn strided_rows() {
        assert_eq!(strided(2, 4, 1, 2, 2), vec![1, 3, 5, 7]);
        assert_eq!(strided(2, 6, 2, 1, 3), vec![2, 3, 4, 8, 9, 10]);
    }

    #[test]
    fn layer_ids() {
        assert_eq!(layer_of("model.layers.12.mlp.gate.weight"), Some(12));
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
