//! `--to mlx:BITS`: a directory `mlx_lm.load` loads, as `mlx_lm.convert -q` writes it.
//!
//! Facts: `../shared/docs/formats-and-algorithms.md` §2.3 (affine quantization, storage, `config.json`, MoE
//! stacking). Every Linear, embedding and `lm_head` weight whose row length the group size divides is stored
//! as `<path>.weight` (U32, packed codes), `<path>.scales` and `<path>.biases` (source dtype); routed experts are
//! stacked per projection into the `SwitchLinear` mlx-lm's models build (`mlp.switch_mlp.{gate,up,down}_proj`,
//! Mixtral's `block_sparse_moe.switch_mlp.*` from `w1/w3/w2`), one `[E, out, in]` tensor each. Routers are
//! quantized at 8 bits, group 64 (mlx-lm's Qwen3-MoE `quant_predicate`), recorded as a per-layer override in
//! the `quantization` block; norms keep the source precision; weights the group size cannot take are kept at
//! source precision and get no entry (the loader then sees no `.scales`).

use std::collections::BTreeMap;
use std::sync::Arc;

use sling_core::DType;
use sling_core::Role;
use sling_formats::checkpoint::Checkpoint;
use sling_kernels::encode::{EncodedRows, RowEncoding};
use sling_pipeline::hf::HfTensor;
use sling_pipeline::solved::Store;
use sling_pipeline::{EncodeError, Op, Plan, Target, Weight};
use sling_quantizers::ct::ScaleDtype;
use sling_quantizers::gptq::Grid;
use sling_quantizers::mlx::{self as affine, AffineGrid};

use crate::{json_sorted, TargetError};

pub mod auto;
pub mod recipe;

/// Bits per weight (`--to mlx:BITS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bits(pub u32);

impl Bits {
    pub fn parse(s: &str) -> Option<Bits> {
        match s.trim() {
            "2" => Some(Bits(2)),
            "3" => Some(Bits(3)),
            "4" => Some(Bits(4)),
            "5" => Some(Bits(5)),
            "6" => Some(Bits(6)),
            "8" => Some(Bits(8)),
            _ => None,
        }
    }
}

/// Group sizes MLX's affine mode takes.
pub const GROUP_SIZES: &[u64] = &[32, 64, 128];

/// The architectures whose mlx-lm models this target writes for (`model_type`).
pub const MODEL_TYPES: &[&str] = &["llama", "qwen2", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"];

/// How one weight is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Enc {
    Keep(DType),
    Affine {
        bits: u32,
        group: usize,
        sd: ScaleDtype,
        /// For routed experts stacked into one `[E, out, in]` weight: the Hugging Face names of the experts, in
        /// stacking order (row `r` of the stacked weight is row `r % out` of expert `r / out`), under which a
        /// solved-weight store keys them. Empty: the weight is its own Hugging Face tensor (`Weight::name`).
        experts: Vec<String>,
    },
}

/// The MLX target.
#[derive(Default)]
pub struct Mlx {
    /// Weights quantized upstream (GPTQ), keyed by their Hugging Face names (per expert for stacked experts):
    /// rows the store holds are written from its codes and parameters instead of being rounded to nearest.
    pub solved: Option<Arc<Store>>,
    /// Where round-to-nearest rows are encoded (`--device`); `None`: the Rust reference on the CPU. Every backend
    /// gives the reference's bytes ([`sling_kernels::Backend::encode_rows`]).
    pub backend: Option<Arc<dyn sling_kernels::Backend>>,
}

/// The quantization grid of an encoding a solver (GPTQ) can choose the codes of: every affine encoding, whose
/// round-to-nearest on this grid is exactly what [`Mlx`] writes. `None` for weights kept as they are.
pub fn grid(enc: &Enc) -> Option<Box<dyn Grid>> {
    match enc {
        Enc::Affine { bits, group, sd, .. } => Some(Box::new(AffineGrid { bits: *bits, group: *group, sd: *sd })),
        Enc::Keep(_) => None,
    }
}

fn scale_dtype(d: DType) -> ScaleDtype {
    match d {
        DType::F32 => ScaleDtype::F32,
        DType::F16 => ScaleDtype::F16,
        _ => ScaleDtype::BF16,
    }
}

/// A planned MLX artifact: the weights, and the per-layer overrides of the `quantization` block.
pub struct MlxPlan {
    pub plan: Plan<Enc>,
    pub overrides: BTreeMap<String, (u32, u64)>,
    pub bits: u32,
    pub group: u64,
}

/// `experts.{e}.w1` → `gate_proj` (Mixtral's names, as mlx-lm's `mixtral.py` `sanitize` maps them).
fn proj_name(p: &str) -> &str {
    match p {
        "w1" => "gate_proj",
        "w2" => "down_proj",
        "w3" => "up_proj",
        other => other,
    }
}

/// Plans the MLX artifact of `ck` at `bits`, group `group`.
pub fn plan(ck: &Checkpoint, bits: Bits, group: u64, strict: bool) -> Result<MlxPlan, TargetError> {
    if !GROUP_SIZES.contains(&group) {
        return Err(TargetError::Unsupported(format!("--group-size {group}: MLX takes 32, 64 or 128")));
    }
    let cfg = ck.config.as_ref().ok_or(sling_pipeline::PlanError::NoConfig)?;
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if !MODEL_TYPES.contains(&model_type) {
        return Err(TargetError::Unsupported(format!(
            "model_type {model_type:?} is not supported for mlx yet (supported: {})",
            MODEL_TYPES.join(", ")
        )));
    }
    let tied = cfg.get_bool("tie_word_embeddings") == Some(true);
    let tensors = sling_pipeline::hf::tensors(ck)?;
    // Stack routed experts: (layer, projection) → experts in order.
    let mut stacks: BTreeMap<String, Vec<HfTensor>> = BTreeMap::new();
    let mut order: Vec<Result<HfTensor, String>> = Vec::new();
    for t in tensors {
        if tied && t.name == "lm_head.weight" {
            continue;
        }
        if t.role == Role::RoutedExperts && t.expert.is_some() && t.shape.len() == 2 {
            let (before, after) = t.name.split_once(".experts.").unwrap_or((&t.name, ""));
            let mut rest = after.splitn(2, '.');
            let _expert = rest.next();
            let tail = rest.next().unwrap_or("");
            let (proj, suffix) = tail.split_once('.').unwrap_or((tail, ""));
            let key = format!("{before}.switch_mlp.{}.{suffix}", proj_name(proj));
            if !stacks.contains_key(&key) {
                order.push(Err(key.clone()));
            }
            stacks.entry(key).or_default().push(t);
        } else {
            order.push(Ok(t));
        }
    }
    let (mut weights, mut kept, mut overrides) = (Vec::new(), Vec::new(), BTreeMap::new());
    let mut quantized = 0;
    for item in order {
        let mut expert_names = Vec::new();
        let t = match item {
            Ok(t) => t,
            Err(key) => {
                let mut experts = stacks.remove(&key).unwrap_or_default();
                experts.sort_by_key(|t| t.expert);
                expert_names = experts.iter().map(|t| t.name.clone()).collect();
                let first = &experts[0];
                if experts.iter().enumerate().any(|(i, t)| t.expert != Some(i as u64) || t.shape != first.shape) {
                    return Err(TargetError::Unsupported(format!(
                        "{key}: routed experts are missing or differ in shape; cannot stack them"
                    )));
                }
                let mut shape = vec![experts.len() as u64];
                shape.extend(&first.shape);
                let mut sources = Vec::new();
                for t in &experts {
                    sources.extend(t.sources.iter().cloned());
                }
                HfTensor {
                    name: key,
                    shape,
                    dtype: first.dtype,
                    role: Role::RoutedExperts,
                    layer: first.layer,
                    expert: None,
                    op: Op::Concat(experts.into_iter().map(|t| t.op).collect()),
                    sources,
                }
            }
        };
        let module = t.name.strip_suffix(".weight").map(str::to_string);
        let quantizable = t.name.ends_with(".weight") && t.shape.len() >= 2 && !matches!(t.role, Role::Other);
        let Some(module) = module.filter(|_| quantizable) else {
            weights.push(keep(t));
            continue;
        };
        let (b, g) = if t.role == Role::Router { (8, 64) } else { (bits.0, group) };
        let cols = *t.shape.last().unwrap_or(&0);
        if cols % group != 0 || cols % g != 0 {
            let why = format!("row length {cols} is not a multiple of the group size {g}");
            if strict {
                return Err(TargetError::Strict { tensor: t.name, why });
            }
            let dtype = t.dtype;
            weights.push(sling_pipeline::hf::keep_unfit(t, why, Enc::Keep(dtype), &mut kept));
            continue;
        }
        if (b, g) != (bits.0, group) {
            overrides.insert(module.clone(), (b, g));
        }
        quantized += 1;
        let sd = scale_dtype(t.dtype);
        let parts = auto::affine_parts(&module, &t.shape[..t.shape.len() - 1], cols, b, g, sd);
        weights.push(Weight {
            name: t.name,
            role: t.role,
            op: t.op,
            enc: Enc::Affine { bits: b, group: g as usize, sd, experts: expert_names },
            parts,
            sources: t.sources,
            row_align: 1,
        });
    }
    if quantized == 0 {
        return Err(TargetError::NothingToQuantize {
            scheme: format!("mlx:{}", bits.0),
            why: format!("no weight has a row length that is a multiple of the group size {group}"),
        });
    }
    Ok(MlxPlan { plan: Plan { weights, kept, notes: Vec::new() }, overrides, bits: bits.0, group })
}

fn keep(t: HfTensor) -> Weight<Enc> {
    let dtype = t.dtype;
    t.into_weight(Enc::Keep(dtype))
}

impl Target for Mlx {
    type Enc = Enc;

    fn encode(
        &self,
        w: &Weight<Enc>,
        r0: u64,
        vals: &[f32],
        _amax: Option<f32>,
        out: &mut [Vec<u8>],
    ) -> Result<(), EncodeError> {
        match &w.enc {
            Enc::Keep(d) => crate::vllm::put_float(*d, vals, &mut out[0]),
            Enc::Affine { bits, group, sd, experts } => {
                let cols = w.cols() as usize;
                let rows = vals.len() / cols.max(1);
                let (mut packed, mut scales, mut biases) = (Vec::new(), Vec::new(), Vec::new());
                let g = AffineGrid { bits: *bits, group: *group, sd: *sd }.group();
                let ng = cols.div_ceil(g.max(1)).max(1);
                // Rows of one Hugging Face tensor at a time: the whole weight, or one stacked expert's rows.
                let per = if experts.is_empty() { usize::MAX } else { (w.rows() as usize / experts.len()).max(1) };
                let mut r = 0;
                while r < rows {
                    let at = r0 as usize + r;
                    let (key, local, n) = match experts.get(at / per) {
                        Some(e) => (e.as_str(), at % per, (per - at % per).min(rows - r)),
                        None => (w.name.as_str(), at, rows - r),
                    };
                    let seg = &vals[r * cols..(r + n) * cols];
                    match crate::vllm::solved_rows(self.solved.as_deref(), key, local, n, cols, g)? {
                        // The stored codes and parameters, laid out exactly as the RTN path lays out its own.
                        Some(sr) => {
                            if sr.codes.iter().any(|&c| u32::from(c) >> bits != 0) {
                                return Err(EncodeError(format!("{key}: a solved code does not fit {bits} bits")));
                            }
                            for i in 0..n {
                                affine::pack_codes(&sr.codes[i * cols..(i + 1) * cols], *bits, &mut packed);
                                for p in &sr.params[i * ng..(i + 1) * ng] {
                                    scales.push(p.scale);
                                    biases.push(p.zero);
                                }
                            }
                        }
                        None => {
                            // Round to nearest through the backend: words, scales and biases per row, as
                            // `affine::quantize_affine_row` appends them.
                            let enc = RowEncoding::Affine { bits: *bits, group: *group, sd: *sd };
                            let mut e = EncodedRows::default();
                            crate::vllm::encode_rows(self.backend.as_deref(), &enc, seg, cols, &mut e)?;
                            packed.extend_from_slice(&e.words);
                            scales.extend_from_slice(&e.scales);
                            biases.extend_from_slice(&e.biases);
                        }
                    }
                    r += n;
                }
                out[0].extend(packed.iter().flat_map(|x| x.to_le_bytes()));
                for s in &scales {
                    sd.put(*s, &mut out[1]);
                }
                for b in &biases {
                    sd.put(*b, &mut out[2]);
                }
                Ok(())
            }
        }
    }
}

/// mlx-lm 0.32 reads the transformers-4 spellings only: a transformers-5 config (`rope_parameters`, Qwen3-MoE's
/// `num_local_experts`) fails to load ("missing … num_experts, rope_theta") or, worse, silently runs with
/// mlx-lm's default `rope_theta`. Adds the transformers-4 keys beside the transformers-5 ones (transformers 5
/// accepts both), never overwriting a key the source has.
fn legacy_keys(root: &mut serde_json::Map<String, serde_json::Value>) {
    if root.get("model_type").and_then(|v| v.as_str()) == Some("qwen3_moe") && !root.contains_key("num_experts") {
        if let Some(n) = root.get("num_local_experts").cloned() {
            root.insert("num_experts".into(), n);
        }
    }
    if let Some(rp) = root.get("rope_parameters").and_then(|v| v.as_object()).cloned() {
        if let Some(theta) = rp.get("rope_theta").filter(|_| !root.contains_key("rope_theta")) {
            root.insert("rope_theta".into(), theta.clone());
        }
        let kind = rp.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
        if kind != "default" && !root.contains_key("rope_scaling") {
            let scaling: serde_json::Map<String, serde_json::Value> =
                rp.into_iter().filter(|(k, _)| k != "rope_theta").collect();
            root.insert("rope_scaling".into(), serde_json::Value::Object(scaling));
        }
    }
}

/// Parameters as mlx-lm counts them (`get_total_parameters`: a quantized layer counts its unquantized size).
pub fn total_parameters(p: &MlxPlan) -> u64 {
    p.plan.weights.iter().map(|w| w.rows() * w.cols()).sum()
}

/// The artifact's `config.json` as mlx-lm's `save_config` writes it: the source's, `_name_or_path` dropped, a
/// `quantization` block (`group_size`, `bits`, `mode`, then the per-layer overrides) and an identical
/// `quantization_config`, top-level keys sorted, `indent=4`.
pub fn config_json(ck: &Checkpoint, p: &MlxPlan) -> Vec<u8> {
    let mut root = ck.config.as_ref().map(|c| c.root().clone()).unwrap_or_default();
    root.remove("_name_or_path");
    root.remove("vision_config");
    legacy_keys(&mut root);
    let mut q = serde_json::Map::new();
    q.insert("group_size".into(), p.group.into());
    q.insert("bits".into(), p.bits.into());
    q.insert("mode".into(), "affine".into());
    for (module, (b, g)) in &p.overrides {
        q.insert(module.clone(), serde_json::json!({"group_size": g, "bits": b}));
    }
    root.insert("quantization".into(), serde_json::Value::Object(q.clone()));
    root.insert("quantization_config".into(), serde_json::Value::Object(q));
    json_sorted(&serde_json::Value::Object(root), 4, false).into_bytes()
}
