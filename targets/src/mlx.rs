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

/// What the writer must know of an mlx-lm model (`mlx_lm/models/<model_type>.py`) beyond the common layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlxArch {
    pub model_type: &'static str,
    /// How `mlx_lm.convert` stores the router.
    pub router: RouterQuant,
    /// DeepSeek-V3's `sanitize`: `kv_b_proj` `[H·(nope+v), rank]` becomes per-head `MultiLinear`s,
    /// `self_attn.embed_q` `[H, rank, nope]` (the key rows, transposed) and `self_attn.unembed_out` `[H, v, rank]`.
    pub split_kv_b: bool,
    /// gpt-oss's `sanitize`: stacked experts stay under `mlp.experts.{gate,up,down}_proj` (its `SwitchGLU`), gate
    /// and up from the interleaved rows of `gate_up_proj`; MXFP4 sources keep their experts in MLX's `mxfp4` mode.
    pub gpt_oss: bool,
    /// Parameters of modules that have submodules (gpt-oss's attention `sinks`), which mlx-lm's
    /// `get_total_parameters` does not count (it sums over leaf modules): name suffixes.
    pub uncounted: &'static [&'static str],
}

/// How `mlx_lm.convert` stores a model's routers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterQuant {
    /// Like any Linear, at the run's bits and group size (the model has no `quant_predicate`).
    Base,
    /// At 8 bits, group 64, recorded per layer (the model's `quant_predicate`: Qwen3-MoE, gpt-oss).
    Eight,
    /// Not quantized: the router is a bare parameter `nn.quantize` leaves alone (DeepSeek's `MoEGate`).
    Kept,
}

const fn arch(model_type: &'static str, router: RouterQuant) -> MlxArch {
    MlxArch { model_type, router, split_kv_b: false, gpt_oss: false, uncounted: &[] }
}

/// The architectures whose mlx-lm models this target writes for.
pub const ARCHS: &[MlxArch] = &[
    arch("llama", RouterQuant::Base),
    arch("qwen2", RouterQuant::Base),
    arch("qwen2_moe", RouterQuant::Base),
    arch("qwen3_moe", RouterQuant::Eight),
    arch("mixtral", RouterQuant::Base),
    arch("olmoe", RouterQuant::Base),
    arch("deepseek_v2", RouterQuant::Kept),
    MlxArch { split_kv_b: true, ..arch("deepseek_v3", RouterQuant::Kept) },
    MlxArch { gpt_oss: true, uncounted: &[".self_attn.sinks"], ..arch("gpt_oss", RouterQuant::Eight) },
];

impl MlxArch {
    pub fn of(model_type: &str) -> Option<MlxArch> {
        ARCHS.iter().copied().find(|a| a.model_type == model_type)
    }
}

/// How one weight is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Enc {
    Keep(DType),
    /// Bytes copied as they are, one per value (gpt-oss's MXFP4 expert blocks and scales, which mlx-lm keeps in
    /// its `mxfp4` mode); `params`: the weights they hold, as mlx-lm counts them.
    Raw {
        params: u64,
    },
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
        Enc::Keep(_) | Enc::Raw { .. } => None,
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
    /// The `quantization` block's mode (see [`Mode`]).
    pub mode: Mode,
    pub arch: MlxArch,
}

/// The `quantization` block's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Affine,
    /// A gpt-oss MXFP4 source's experts kept in that mode ([`Enc::Raw`]): to mlx-lm a partially quantized model,
    /// every affine module with its own entry ([`config_json`]).
    Mxfp4,
}

/// One item of the plan, in checkpoint order: a tensor, a stack of routed experts (by its MLX name), or a weight
/// already planned.
enum Item {
    One(HfTensor),
    Stack(String),
    Ready(Weight<Enc>),
}

fn shape_err(t: &HfTensor, why: String) -> TargetError {
    TargetError::Plan(sling_pipeline::PlanError::Shape { tensor: t.name.clone(), shape: t.shape.clone(), why })
}

/// DeepSeek-V3's `kv_b_proj` as mlx-lm's `sanitize` splits it: per head `h`, rows `h·(nope+v)..+nope` are the
/// key part, stored transposed as `embed_q[h]` `[rank, nope]`; the next `v` rows are `unembed_out[h]` `[v, rank]`.
fn split_kv_b(cfg: &sling_core::ModelConfig, t: HfTensor) -> Result<[HfTensor; 2], TargetError> {
    let key = |k: &str| cfg.req_u64(&[k]).map_err(|e| TargetError::Plan(e.into()));
    let (heads, nope, v, rank) =
        (key("num_attention_heads")?, key("qk_nope_head_dim")?, key("v_head_dim")?, key("kv_lora_rank")?);
    if t.shape != [heads * (nope + v), rank] {
        let want = format!(
            "[num_attention_heads·(qk_nope_head_dim+v_head_dim), kv_lora_rank] = [{}, {rank}]",
            heads * (nope + v)
        );
        return Err(shape_err(&t, want));
    }
    let stem = t.name.trim_end_matches("kv_b_proj.weight");
    let rows = |off: u64, n: u64| -> Vec<u64> {
        (0..heads).flat_map(|h| (0..n).map(move |i| h * (nope + v) + off + i)).collect()
    };
    let part = |name: String, shape: Vec<u64>, op: Op| HfTensor { name, shape, op, ..t.clone() };
    let keys = Op::Rows { inner: Box::new(t.op.clone()), map: rows(0, nope) };
    Ok([
        part(
            format!("{stem}embed_q.weight"),
            vec![heads, rank, nope],
            Op::Transpose { inner: Box::new(keys), batch: heads, r: nope, c: rank },
        ),
        part(
            format!("{stem}unembed_out.weight"),
            vec![heads, v, rank],
            Op::Rows { inner: Box::new(t.op.clone()), map: rows(nope, v) },
        ),
    ])
}

/// gpt-oss's stacked expert tensors in mlx-lm's layout (`gpt_oss.py` `sanitize`): `gate_up_proj`'s even rows
/// (output channels) are `gate_proj`, its odd rows `up_proj`; every weight `[E, out, in]`. bf16 tensors are
/// stored `[E, in, out]` and come out transposed, to be quantized like any weight; MXFP4 `_blocks`/`_scales` are
/// copied byte for byte into MLX's `mxfp4` mode (`.weight` U32 `[E, out, in/8]`, `.scales` U8 `[E, out, in/32]`).
fn gpt_oss_experts(t: HfTensor, items: &mut Vec<Item>) -> Result<bool, TargetError> {
    let Some((base, what)) = t.name.split_once(".mlp.experts.") else {
        return Err(shape_err(&t, "not a gpt-oss expert tensor".into()));
    };
    let base = format!("{base}.mlp.experts.");
    let (fused, kind) = match what.split_once('_') {
        Some(("gate", rest)) if rest.starts_with("up_proj") => (true, &rest["up_proj".len()..]),
        Some(("down", rest)) if rest.starts_with("proj") => (false, &rest["proj".len()..]),
        _ => return Err(shape_err(&t, "not a gpt-oss expert tensor".into())),
    };
    let projs: &[(&str, u64)] = if fused { &[("gate_proj", 0), ("up_proj", 1)] } else { &[("down_proj", 0)] };
    let step = projs.len() as u64;
    // Rows `phase, phase + step, …` of each expert's `n` rows (the de-interleave; all rows for `down_proj`).
    let pick = |op: Op, e: u64, n: u64, phase: u64| Op::Rows {
        inner: Box::new(op),
        map: (0..e).flat_map(|x| (0..n / step).map(move |i| x * n + i * step + phase)).collect(),
    };
    let bad = |t: &HfTensor, want: &str| Err(shape_err(t, format!("expected {want}")));
    let mut mxfp4 = false;
    match (kind, &t.shape[..]) {
        ("", &[e, i, o]) => {
            if o % step != 0 {
                return bad(&t, "an even number of gate/up columns");
            }
            let cols = Op::Transpose { inner: Box::new(t.op.clone()), batch: e, r: i, c: o };
            for &(proj, phase) in projs {
                let op = pick(cols.clone(), e, o, phase);
                let shape = vec![e, o / step, i];
                items.push(Item::One(HfTensor { name: format!("{base}{proj}.weight"), shape, op, ..t.clone() }));
            }
        }
        ("_bias", &[e, o]) => {
            if o % step != 0 {
                return bad(&t, "an even number of gate/up biases");
            }
            // Columns picked as rows of the transpose, then transposed back.
            let cols = Op::Transpose { inner: Box::new(t.op.clone()), batch: 1, r: e, c: o };
            for &(proj, phase) in projs {
                let rows = pick(cols.clone(), 1, o, phase);
                let op = Op::Transpose { inner: Box::new(rows), batch: 1, r: o / step, c: e };
                let shape = vec![e, o / step];
                items.push(Item::One(HfTensor { name: format!("{base}{proj}.bias"), shape, op, ..t.clone() }));
            }
        }
        ("_blocks", &[e, o, n, 16]) | ("_scales", &[e, o, n]) => {
            if o % step != 0 {
                return bad(&t, "an even number of gate/up rows");
            }
            mxfp4 = true;
            let blocks = kind == "_blocks";
            let Op::Source(mut src) = t.op.clone() else { return bad(&t, "a stored tensor") };
            src.rows = e * o;
            src.cols = if blocks { n * 16 } else { n };
            for &(proj, phase) in projs {
                let op = pick(Op::Source(src.clone()), e, o, phase);
                let (part, dtype, last, params) = match blocks {
                    true => (format!("{base}{proj}.weight"), DType::U32, n * 4, e * (o / step) * n * 32),
                    false => (format!("{base}{proj}.scales"), DType::U8, n, 0),
                };
                items.push(Item::Ready(Weight {
                    name: part.clone(),
                    role: Role::RoutedExperts,
                    op,
                    enc: Enc::Raw { params },
                    parts: vec![sling_pipeline::Part::new(part, dtype, vec![e, o / step, last])],
                    sources: t.sources.clone(),
                    row_align: 1,
                }));
            }
        }
        _ => return bad(&t, "[E, in, out], [E, out] biases, or MXFP4 [E, out, n, 16] blocks / [E, out, n] scales"),
    }
    Ok(mxfp4)
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
    let Some(arch) = MlxArch::of(model_type) else {
        return Err(TargetError::Unsupported(format!(
            "model_type {model_type:?} is not supported for mlx yet (supported: {})",
            ARCHS.iter().map(|a| a.model_type).collect::<Vec<_>>().join(", ")
        )));
    };
    let tied = cfg.get_bool("tie_word_embeddings") == Some(true);
    let tensors = sling_pipeline::hf::tensors_with(ck, arch.gpt_oss)?;
    // Stack routed experts: (layer, projection) → experts in order.
    let mut stacks: BTreeMap<String, Vec<HfTensor>> = BTreeMap::new();
    let mut order: Vec<Item> = Vec::new();
    let mut mode = Mode::Affine;
    for t in tensors {
        if tied && t.name == "lm_head.weight" {
            continue;
        }
        if arch.split_kv_b && t.name.ends_with(".self_attn.kv_b_proj.weight") {
            order.extend(split_kv_b(cfg, t)?.map(Item::One));
        } else if arch.gpt_oss && t.role == Role::RoutedExperts && t.expert.is_none() {
            if gpt_oss_experts(t, &mut order)? {
                mode = Mode::Mxfp4;
            }
        } else if t.role == Role::RoutedExperts && t.expert.is_some() && t.shape.len() == 2 {
            let (before, after) = t.name.split_once(".experts.").unwrap_or((&t.name, ""));
            let mut rest = after.splitn(2, '.');
            let _expert = rest.next();
            let tail = rest.next().unwrap_or("");
            let (proj, suffix) = tail.split_once('.').unwrap_or((tail, ""));
            let key = format!("{before}.switch_mlp.{}.{suffix}", proj_name(proj));
            if !stacks.contains_key(&key) {
                order.push(Item::Stack(key.clone()));
            }
            stacks.entry(key).or_default().push(t);
        } else {
            order.push(Item::One(t));
        }
    }
    let (mut weights, mut kept, mut overrides) = (Vec::new(), Vec::new(), BTreeMap::new());
    let mut quantized = 0;
    for item in order {
        let mut expert_names = Vec::new();
        let t = match item {
            Item::Ready(w) => {
                weights.push(w);
                continue;
            }
            Item::One(t) => t,
            Item::Stack(key) => {
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
        let Some(module) =
            module.filter(|_| quantizable && (t.role != Role::Router || arch.router != RouterQuant::Kept))
        else {
            weights.push(keep(t));
            continue;
        };
        let (b, g) =
            if t.role == Role::Router && arch.router == RouterQuant::Eight { (8, 64) } else { (bits.0, group) };
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
    Ok(MlxPlan { plan: Plan { weights, kept, notes: Vec::new() }, overrides, bits: bits.0, group, mode, arch })
}

fn keep(t: HfTensor) -> Weight<Enc> {
    let dtype = t.dtype;
    t.into_weight(Enc::Keep(dtype))
}

impl Target for Mlx {
    type Enc = Enc;
    type Error = sling_pipeline::ExecError;

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
            Enc::Raw { .. } => crate::vllm::put_float(DType::U8, vals, &mut out[0]),
            Enc::Affine { bits, group, sd, experts } => {
                // mlx-lm quantizes a weight held in the scales' dtype: DeepSeek FP8 weights are dequantized to
                // BF16 first (`deepseek_v3.py` `sanitize`, `.astype(mx.bfloat16)`), so values that dtype cannot
                // hold are rounded to it first. A bf16/f16 source's values already are.
                let mut rounded: Vec<f32>;
                let vals = if from_fp8(&w.op) {
                    rounded = vals.to_vec();
                    round_finite(*sd, &mut rounded);
                    &rounded[..]
                } else {
                    vals
                };
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
                                return Err(EncodeError::SolvedCode { weight: key.to_string(), bits: *bits });
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

/// `w`'s values (any rows) as [`Mlx`] quantizes them: those of a DeepSeek FP8 source rounded to the scales' dtype
/// first ([`from_fp8`]), anything else as it is. What the writer, [`rows_as_stored`] and `mlx:auto`'s measurements
/// all start from.
pub(crate) fn as_written(w: &Weight<Enc>, v: &mut [f32]) {
    if let Enc::Affine { sd, .. } = &w.enc {
        if from_fp8(&w.op) {
            round_finite(*sd, v);
        }
    }
}

/// Every finite value rounded to `sd` (NaN and ±Inf kept for the writer's checks).
fn round_finite(sd: ScaleDtype, v: &mut [f32]) {
    v.iter_mut().filter(|x| x.is_finite()).for_each(|x| *x = sd.round(*x));
}

/// Whether `op` dequantizes DeepSeek FP8 (whose values mlx-lm rounds to BF16 before quantizing) and folds no AWQ
/// scales in: AWQ's search scored the folded values as they are, unrounded, so they are quantized as they are.
fn from_fp8(op: &Op) -> bool {
    fn walk(op: &Op, fp8: &mut bool) -> bool {
        match op {
            Op::Source(_) | Op::Mxfp4(_) | Op::Gguf(_) => true,
            Op::Fp8 { .. } => {
                *fp8 = true;
                true
            }
            Op::Fold { .. } => false,
            Op::Rows { inner, .. } | Op::Transpose { inner, .. } => walk(inner, fp8),
            Op::Concat(parts) => parts.iter().all(|p| walk(p, fp8)),
        }
    }
    let mut fp8 = false;
    walk(op, &mut fp8) && fp8
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

/// The weights this plan rounds on an affine grid that a solver (GPTQ, AWQ) cannot take, with why: those mlx-lm's
/// `sanitize` rearranges from their checkpoint tensors (DeepSeek-V3's `embed_q`/`unembed_out`, a bf16 gpt-oss's
/// stacked experts), which are no checkpoint tensor (or stack of them) row for row. The executor rounds them to
/// nearest; a calibrated run lists them. (gpt-oss's MXFP4 experts, copied as they are, are not rounded at all and
/// are not listed.)
pub fn unsolvable<'a>(ck: &Checkpoint, p: &'a MlxPlan) -> Vec<(&'a Weight<Enc>, &'static str)> {
    p.plan
        .weights
        .iter()
        .filter(|w| matches!(&w.enc, Enc::Affine { experts, .. } if experts.is_empty() && ck.get(&w.name).is_none()))
        .map(|w| {
            let why = if p.arch.gpt_oss {
                "gpt-oss's stacked experts: no per-expert weight for a solver to key its statistics by; rounded to \
                 nearest"
            } else {
                "mlx-lm's per-head MultiLinear (kv_b_proj split by sanitize): not a Linear the solvers take (mlx-lm's \
                 own GPTQ and AWQ round it to nearest too)"
            };
            (w, why)
        })
        .collect()
}

/// Rows `r0..r1` of `w` as the artifact holds them, dequantized: read from the checkpoint, rounded to the scales'
/// dtype where [`Mlx`] rounds them first (DeepSeek FP8 sources), then rounded to nearest on the weight's grid
/// ([`Grid::roundtrip_row`]). What a calibration forward pass computes with for the weights no solver takes
/// ([`unsolvable`]). A weight kept as it is comes back as the checkpoint gives it.
pub fn rows_as_stored(ck: &Checkpoint, w: &Weight<Enc>, r0: u64, r1: u64) -> Result<Vec<f32>, TargetError> {
    let mut v = Vec::new();
    w.op.read(ck, r0, r1, &mut v)
        .map_err(|e| TargetError::Unsupported(format!("{}: cannot read rows {r0}..{r1}: {e}", w.name)))?;
    if let Some(g) = grid(&w.enc) {
        as_written(w, &mut v);
        v.chunks_exact_mut(w.cols().max(1) as usize).for_each(|row| g.roundtrip_row(row));
    }
    Ok(v)
}

/// Parameters as mlx-lm counts them (`get_total_parameters`: a quantized layer counts its unquantized size).
pub fn total_parameters(p: &MlxPlan) -> u64 {
    p.plan
        .weights
        .iter()
        .filter(|w| !p.arch.uncounted.iter().any(|s| w.name.ends_with(s)))
        .map(|w| match w.enc {
            Enc::Raw { params } => params,
            _ => w.rows() * w.cols(),
        })
        .sum()
}

/// Where `nn.quantize` visits `module` in an mlx-lm model: the model's modules (`model.embed_tokens` first, then
/// the layers by number, each its attention's `q, k, v, o` projections first, then the rest by name), then the
/// top-level ones (`lm_head`). Modules are visited in the order the model's `__init__` assigns them, which every
/// architecture here follows for these names.
fn module_order(module: &str) -> (u8, u64, usize, String) {
    const IN_LAYER: &[&str] = &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"];
    if module == "model.embed_tokens" {
        return (0, 0, 0, String::new());
    }
    if let Some(layer) = sling_pipeline::hf::layer_of(module) {
        let rest = module.splitn(4, '.').nth(3).unwrap_or("");
        let rank = IN_LAYER.iter().position(|p| rest == *p).unwrap_or(IN_LAYER.len());
        return (1, layer, rank, rest.to_string());
    }
    (if module.starts_with("model.") { 2 } else { 3 }, 0, 0, module.to_string())
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
    let mut entries: Vec<(&str, serde_json::Value)> = Vec::new();
    if p.mode == Mode::Mxfp4 {
        // A partially quantized source (gpt-oss's MXFP4 experts): mlx-lm's `quantize_model` records the source's
        // mode (group 32, 4 bits) and then every module it quantizes: with the predicate's own dict where there
        // is one (routers), else group size, bits and mode "affine".
        q.insert("group_size".into(), 32.into());
        q.insert("bits".into(), 4.into());
        q.insert("mode".into(), "mxfp4".into());
        for w in &p.plan.weights {
            let Some(module) = w.name.strip_suffix(".weight").filter(|_| matches!(w.enc, Enc::Affine { .. })) else {
                continue;
            };
            let router = (w.role == Role::Router && p.arch.router == RouterQuant::Eight).then_some((8, 64));
            let v = match p.overrides.get(module).copied().or(router) {
                Some((b, g)) => serde_json::json!({"group_size": g, "bits": b}),
                None => serde_json::json!({"group_size": p.group, "bits": p.bits, "mode": "affine"}),
            };
            entries.push((module, v));
        }
    } else {
        for (module, (b, g)) in &p.overrides {
            entries.push((module, serde_json::json!({"group_size": g, "bits": b})));
        }
    }
    // In the order `nn.quantize` visits the modules, which is the order mlx-lm writes them in.
    entries.sort_by_cached_key(|(m, _)| module_order(m));
    for (module, v) in entries {
        q.insert(module.to_string(), v);
    }
    root.insert("quantization".into(), serde_json::Value::Object(q.clone()));
    root.insert("quantization_config".into(), serde_json::Value::Object(q));
    json_sorted(&serde_json::Value::Object(root), 4, false).into_bytes()
}
