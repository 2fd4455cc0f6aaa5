//! `--to vllm:SCHEME`: a Hugging Face directory in the compressed-tensors format (0.20.x) that vLLM and SGLang
//! serve, transformers loads, and `convert_hf_to_gguf.py` reads.
//!
//! Facts: `../shared/docs/formats-and-algorithms.md` §1 (config block, tensor names/dtypes/shapes, packing,
//! rounding, how vLLM and transformers 5.24 load MoE experts). Every Linear weight the scheme can take is
//! stored under the source checkpoint's own name (`….weight_packed`, `….weight_scale`, …), routed experts as
//! per-expert 2-D tensors (`mlp.experts.{e}.gate_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1`): the names
//! vLLM's `FusedMoE` loader and transformers' converters expect (fused 3-D names load as random weights in
//! transformers 5.24). Routers, norms, embeddings and `lm_head` keep the source precision and are listed in
//! `ignore` where they are Linear modules, as llm-compressor's recipes do.
//!
//! The codes are sling's one definition of each encoding (`sling_quantizers::ct`: f32 arithmetic, the scale
//! rounded to its stored dtype before dividing by it); compressed-tensors' own CPU compressor divides in the
//! weight dtype (bf16) and can differ by one code where that rounding crosses a half step (see `docs/vllm.md`).

use std::sync::Arc;

use sling_core::DType;
use sling_core::Role;
use sling_formats::checkpoint::Checkpoint;
use sling_kernels::encode::{EncodedRows, RowEncoding};
use sling_kernels::Backend;
use sling_pipeline::hf::HfTensor;
use sling_pipeline::ops::Op;
use sling_pipeline::solved::{SolvedRows, Store};
use sling_pipeline::{EncodeError, Part, Plan, Target, Weight};
use sling_quantizers::ct::{self, IntArgs, IntGrid, ScaleDtype};
use sling_quantizers::gptq::Grid;

use crate::{json_sorted, TargetError};

pub mod auto;
pub mod recipe;

/// compressed-tensors version whose format this writes (`quantization_config.version`).
pub const CT_VERSION: &str = "0.20.1";

/// A vLLM scheme (`--to vllm:NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// int4, group 128, `pack-quantized` (`W4A16`, `W4A16_ASYM`).
    W4A16 { symmetric: bool },
    /// int8, group 128, `pack-quantized` (`W8A16`).
    W8A16,
    /// FP8 E4M3 per output channel, dynamic per-token FP8 activations (`FP8_DYNAMIC`).
    Fp8Dynamic,
    /// FP8 E4M3 with 128×128 block scales, dynamic per-group activations (`FP8_BLOCK`, DeepSeek style).
    Fp8Block,
    /// E2M1 + FP8 E4M3 scale per 16 + F32 global scale (`NVFP4A16`).
    Nvfp4,
    /// E2M1 + E8M0 scale per 32 (`MXFP4A16`).
    Mxfp4,
}

/// The names `--to vllm:` takes, in help order.
pub const SCHEMES: &[&str] = &["w4a16", "w4a16-asym", "w8a16", "fp8-dynamic", "fp8-block", "nvfp4", "mxfp4"];

impl Scheme {
    pub fn parse(s: &str) -> Option<Scheme> {
        Some(match s.to_ascii_lowercase().as_str() {
            "w4a16" => Scheme::W4A16 { symmetric: true },
            "w4a16-asym" | "w4a16_asym" => Scheme::W4A16 { symmetric: false },
            "w8a16" => Scheme::W8A16,
            "fp8-dynamic" | "fp8_dynamic" => Scheme::Fp8Dynamic,
            "fp8-block" | "fp8_block" => Scheme::Fp8Block,
            "nvfp4" | "nvfp4a16" => Scheme::Nvfp4,
            "mxfp4" | "mxfp4a16" => Scheme::Mxfp4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheme::W4A16 { symmetric: true } => "w4a16",
            Scheme::W4A16 { symmetric: false } => "w4a16-asym",
            Scheme::W8A16 => "w8a16",
            Scheme::Fp8Dynamic => "fp8-dynamic",
            Scheme::Fp8Block => "fp8-block",
            Scheme::Nvfp4 => "nvfp4",
            Scheme::Mxfp4 => "mxfp4",
        }
    }

    /// The compressed-tensors format string.
    pub fn format(self) -> &'static str {
        match self {
            Scheme::W4A16 { .. } | Scheme::W8A16 => "pack-quantized",
            Scheme::Fp8Dynamic | Scheme::Fp8Block => "float-quantized",
            Scheme::Nvfp4 => "nvfp4-pack-quantized",
            Scheme::Mxfp4 => "mxfp4-pack-quantized",
        }
    }

    /// Elements along a row that share a scale (the row length must be a multiple), if any.
    pub fn group(self) -> Option<u64> {
        match self {
            Scheme::W4A16 { .. } | Scheme::W8A16 => Some(128),
            Scheme::Nvfp4 => Some(16),
            Scheme::Mxfp4 => Some(32),
            Scheme::Fp8Dynamic | Scheme::Fp8Block => None,
        }
    }

    /// The integer schemes' bits, symmetry and group size; `None` for the float schemes.
    pub fn int_args(self) -> Option<IntArgs> {
        match self {
            Scheme::W4A16 { symmetric } => Some(IntArgs { bits: 4, symmetric, group: Some(128) }),
            Scheme::W8A16 => Some(IntArgs { bits: 8, symmetric: true, group: Some(128) }),
            _ => None,
        }
    }

    /// `config_groups.group_0` as compressed-tensors 0.20.1 serialises the matching preset scheme
    /// (`W4A16`, `W4A16_ASYM`, `W8A16`, `FP8_DYNAMIC`, `FP8_BLOCK`, `NVFP4A16`, `MXFP4A16`).
    pub fn config_group(self) -> serde_json::Value {
        use serde_json::json;
        let linear = ["Linear".to_string()];
        let (weights, input) = match self {
            Scheme::W4A16 { symmetric } => {
                return int_config_group(IntArgs { bits: 4, symmetric, group: Some(128) }, &linear)
            }
            Scheme::W8A16 => return int_config_group(IntArgs { bits: 8, symmetric: true, group: Some(128) }, &linear),
            Scheme::Fp8Dynamic => (
                json!({"dynamic": false, "group_size": null, "num_bits": 8, "strategy": "channel", "symmetric": true, "type": "float"}),
                json!({"dynamic": true, "group_size": null, "num_bits": 8, "strategy": "token", "symmetric": true, "type": "float"}),
            ),
            Scheme::Fp8Block => (
                json!({"block_structure": [128, 128], "dynamic": false, "group_size": null, "num_bits": 8, "strategy": "block", "symmetric": true, "type": "float"}),
                json!({"dynamic": true, "group_size": 128, "num_bits": 8, "strategy": "group", "symmetric": true, "type": "float"}),
            ),
            Scheme::Nvfp4 => (
                json!({"dynamic": false, "group_size": 16, "num_bits": 4, "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": true, "type": "float"}),
                serde_json::Value::Null,
            ),
            Scheme::Mxfp4 => (
                json!({"dynamic": false, "group_size": 32, "num_bits": 4, "scale_dtype": "torch.uint8", "strategy": "group", "symmetric": true, "type": "float"}),
                serde_json::Value::Null,
            ),
        };
        json!({"format": self.format(), "input_activations": input, "output_activations": null, "targets": ["Linear"], "weights": weights})
    }
}

/// How one weight is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Enc {
    /// At source precision, in this dtype.
    Keep(DType),
    /// FP8 E4M3 codes copied from an FP8 source (the values are the codes, decoded exactly).
    Fp8Codes,
    Int {
        args: IntArgs,
        sd: ScaleDtype,
    },
    Fp8Channel {
        sd: ScaleDtype,
    },
    Fp8Block {
        sd: ScaleDtype,
    },
    Nvfp4,
    Mxfp4,
}

/// The vLLM target (see the module docs).
pub struct Vllm {
    pub scheme: Scheme,
    /// Weights quantized upstream (GPTQ), keyed by their Hugging Face name: an integer weight the store holds is
    /// written from its stored codes and parameters instead of being rounded to nearest; any other is encoded
    /// as usual.
    pub solved: Option<Arc<Store>>,
    /// Where round-to-nearest rows are encoded (`--device`); `None`: the Rust reference on the CPU. Every backend
    /// gives the reference's bytes ([`Backend::encode_rows`]).
    pub backend: Option<Arc<dyn Backend>>,
}

/// `enc` over whole rows of `cols` through `backend` (or the Rust reference when `None`), appended to `out`.
pub(crate) fn encode_rows(
    backend: Option<&dyn Backend>,
    enc: &RowEncoding,
    vals: &[f32],
    cols: usize,
    out: &mut EncodedRows,
) -> Result<(), EncodeError> {
    match backend {
        Some(b) => b.encode_rows(enc, vals, cols, out).map_err(EncodeError::target),
        None => sling_kernels::encode::encode_rows(enc, vals, cols, out).map_err(EncodeError::target),
    }
}

/// The quantization grid of an encoding a solver (GPTQ) can choose the codes of: the integer schemes (w4a16,
/// w4a16-asym, w8a16), whose round-to-nearest on this grid is exactly what [`Vllm`] writes. `None` for the rest.
pub fn grid(enc: &Enc) -> Option<Box<dyn Grid>> {
    match enc {
        Enc::Int { args, sd } => Some(Box::new(IntGrid { args: *args, sd: *sd })),
        _ => None,
    }
}

/// Rows of `name` from `store`, checked against the grid they are written with.
pub(crate) fn solved_rows(
    store: Option<&Store>,
    name: &str,
    r0: usize,
    n: usize,
    cols: usize,
    group: usize,
) -> Result<Option<SolvedRows>, EncodeError> {
    let Some(store) = store else { return Ok(None) };
    let Some(sr) = store.rows(name, r0, r0 + n)? else { return Ok(None) };
    if sr.cols != cols || sr.group != group {
        return Err(EncodeError::SolvedShape { stored_cols: sr.cols, stored_group: sr.group, cols, group });
    }
    Ok(Some(sr))
}

/// The scale dtype compressed-tensors gives a weight of dtype `d` (`initialize_qparams`: the weight dtype if it
/// is a float type, else F16; a dequantized FP8 source is BF16 here).
fn scale_dtype(d: DType) -> ScaleDtype {
    match d {
        DType::F32 => ScaleDtype::F32,
        DType::F16 => ScaleDtype::F16,
        _ => ScaleDtype::BF16,
    }
}

/// Why gpt-oss is refused (docs/vllm.md, "gpt-oss"): vLLM's gpt-oss model loads its experts stacked, gate and
/// up interleaved, as the original checkpoint stores them (`_load_weights_mxfp4` / `_load_weights_other`, each
/// name not in its table skipped), while compressed-tensors stores each expert's projections apart (what
/// llm-compressor writes for gpt-oss); an artifact vLLM would load with its experts missing is not written.
const GPT_OSS_WHY: &str = "its gpt-oss loader takes the experts stacked, gate and up interleaved, as the \
     original checkpoint stores them, and compressed-tensors stores each expert apart; serve the original MXFP4 \
     checkpoint with vLLM, or quantize it with --to gguf:… or --to mlx:…";

/// Plans the artifact: every tensor of the checkpoint, Linear weights encoded with `scheme` where their shape
/// allows. `strict`: a weight the scheme cannot take is an error instead of being kept.
pub fn plan(ck: &Checkpoint, scheme: Scheme, strict: bool) -> Result<Plan<Enc>, TargetError> {
    plan_in_groups(ck, scheme, strict, scheme.group())
}

/// [`plan`] with the integer schemes' group size `group` in place of theirs: the finest group vLLM takes (32)
/// plans every weight vLLM can quantize, which a recipe or `vllm:auto` then gives its own group size.
pub fn plan_in_groups(
    ck: &Checkpoint,
    scheme: Scheme,
    strict: bool,
    group: Option<u64>,
) -> Result<Plan<Enc>, TargetError> {
    let group = if scheme.int_args().is_some() { group } else { scheme.group() };
    if ck.config.as_ref().and_then(|c| c.get("model_type")).and_then(|v| v.as_str()) == Some("gpt_oss") {
        return Err(TargetError::NotServed {
            runtime: "vLLM",
            model: "gpt-oss",
            format: "compressed-tensors",
            why: GPT_OSS_WHY,
        });
    }
    let tensors = sling_pipeline::hf::tensors(ck)?;
    let mut weights = Vec::new();
    let mut kept = Vec::new();
    let mut quantized = 0usize;
    for t in tensors {
        let linear = matches!(t.role, Role::RoutedExperts | Role::SharedExperts | Role::Attention | Role::DenseFfn)
            && t.shape.len() == 2
            && t.name.ends_with(".weight");
        if !linear {
            weights.push(keep(t));
            continue;
        }
        let cols = t.shape[1];
        if let Some(g) = group.filter(|g| cols % g != 0) {
            let why = format!("row length {cols} is not a multiple of {}'s group size {g}", scheme.name());
            if strict {
                return Err(TargetError::Strict { tensor: t.name, why });
            }
            let dtype = t.dtype;
            weights.push(sling_pipeline::hf::keep_unfit(t, why, Enc::Keep(dtype), &mut kept));
            continue;
        }
        quantized += 1;
        match (&t.op, scheme) {
            // DeepSeek FP8 (128×128 blocks) to FP8_BLOCK: the source's codes and scales as they are, no
            // requantization (which would round each block's scale again).
            (Op::Fp8 { weight, scale, block: (128, 128) }, Scheme::Fp8Block) => {
                let module = t.name.strip_suffix(".weight").unwrap_or(&t.name).to_string();
                let scale_shape = vec![scale.rows, scale.cols];
                weights.push(Weight {
                    name: t.name.clone(),
                    role: t.role,
                    op: Op::Source(weight.clone()),
                    enc: Enc::Fp8Codes,
                    parts: vec![Part::new(t.name.clone(), DType::F8E4M3, t.shape.clone())],
                    sources: vec![weight.name.clone()],
                    row_align: 1,
                });
                weights.push(Weight {
                    name: format!("{module}.weight_scale"),
                    role: t.role,
                    op: Op::Source(scale.clone()),
                    enc: Enc::Keep(DType::F32),
                    parts: vec![Part::new(format!("{module}.weight_scale"), DType::F32, scale_shape)],
                    sources: vec![scale.name.clone()],
                    row_align: 1,
                });
            }
            _ => weights.push(quantize(t, scheme, group)),
        }
    }
    if quantized == 0 {
        return Err(TargetError::NothingToQuantize {
            scheme: format!("vllm:{}", scheme.name()),
            why: match scheme.group() {
                Some(g) => format!("no Linear weight has a row length that is a multiple of {g}"),
                None => "the checkpoint has no Linear weights".into(),
            },
        });
    }
    Ok(Plan { weights, kept, notes: Vec::new() })
}

fn keep(t: HfTensor) -> Weight<Enc> {
    let dtype = t.dtype;
    t.into_weight(Enc::Keep(dtype))
}

fn quantize(t: HfTensor, scheme: Scheme, group: Option<u64>) -> Weight<Enc> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let module = t.name.strip_suffix(".weight").unwrap_or(&t.name).to_string();
    let sd = scale_dtype(t.dtype);
    let p = |suffix: &str, dtype, shape| Part::new(format!("{module}.{suffix}"), dtype, shape);
    let (enc, parts, row_align) = match scheme {
        Scheme::W4A16 { .. } | Scheme::W8A16 => {
            let mut args = scheme.int_args().unwrap_or(IntArgs { bits: 4, symmetric: true, group: Some(128) });
            args.group = group.map(|g| g as usize);
            let (parts, row_align) = int_parts(&module, rows, cols, args, sd);
            (Enc::Int { args, sd }, parts, row_align)
        }
        Scheme::Fp8Dynamic => (
            Enc::Fp8Channel { sd },
            vec![p("weight", DType::F8E4M3, vec![rows, cols]), p("weight_scale", sd.dtype(), vec![rows, 1])],
            1,
        ),
        Scheme::Fp8Block => (
            Enc::Fp8Block { sd },
            vec![
                p("weight", DType::F8E4M3, vec![rows, cols]),
                p("weight_scale", sd.dtype(), vec![rows.div_ceil(128), cols.div_ceil(128)]),
            ],
            128,
        ),
        Scheme::Nvfp4 => (
            Enc::Nvfp4,
            vec![
                p("weight_packed", DType::U8, vec![rows, cols / 2]),
                p("weight_scale", DType::F8E4M3, vec![rows, cols / 16]),
                p("weight_global_scale", DType::F32, vec![1]),
            ],
            1,
        ),
        Scheme::Mxfp4 => (
            Enc::Mxfp4,
            vec![
                p("weight_packed", DType::U8, vec![rows, cols / 2]),
                p("weight_scale", DType::U8, vec![rows, cols / 32]),
            ],
            1,
        ),
    };
    Weight { name: t.name, role: t.role, op: t.op, enc, parts, sources: t.sources, row_align }
}

/// The stored tensors of an integer-quantized `module` (`rows` × `cols`, scales in `sd`) and the row alignment its
/// chunks need: `weight_packed` (32/bits codes per int32 along a row), `weight_scale` per group, `weight_shape`, and
/// for asymmetric args `weight_zero_point` (packed along dim 0, so chunks must not split a word).
pub(crate) fn int_parts(module: &str, rows: u64, cols: u64, args: IntArgs, sd: ScaleDtype) -> (Vec<Part>, u64) {
    let b = u64::from(args.bits);
    let g = args.group.map_or(cols, |g| g as u64).max(1);
    let p = |suffix: &str, dtype, shape| Part::new(format!("{module}.{suffix}"), dtype, shape);
    let mut parts = vec![
        p("weight_packed", DType::I32, vec![rows, (cols * b).div_ceil(32)]),
        p("weight_scale", sd.dtype(), vec![rows, cols / g]),
        p("weight_shape", DType::I64, vec![2]),
    ];
    if !args.symmetric {
        parts.push(p("weight_zero_point", DType::I32, vec![(rows * b).div_ceil(32), cols / g]));
    }
    (parts, if args.symmetric { 1 } else { 32 })
}

/// `config_groups` entry of an integer scheme as compressed-tensors 0.20.1 serialises it (`W4A16`'s and `W8A16`'s
/// presets at group 128), targeting `targets`.
pub fn int_config_group(args: IntArgs, targets: &[String]) -> serde_json::Value {
    serde_json::json!({
        "format": "pack-quantized",
        "input_activations": null,
        "output_activations": null,
        "targets": targets,
        "weights": {"dynamic": false, "group_size": args.group, "num_bits": args.bits, "strategy": "group",
                    "symmetric": args.symmetric, "type": "int"},
    })
}

/// The `FusedMoE` layer holding routed expert weight `name` and the expert's projection:
/// `model.layers.3.mlp.experts.5.gate_proj.weight` → (`model.layers.3.mlp.experts`, `gate_proj`).
pub fn expert_layer(name: &str) -> Option<(&str, &str)> {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let at = module.rfind(".experts.")?;
    let (e, proj) = module[at + ".experts.".len()..].split_once('.')?;
    e.parse::<u64>().ok()?;
    (!proj.contains('.')).then_some((&module[..at + ".experts".len()], proj))
}

/// What vLLM loads `w` into, and so the unit a mixed-precision choice is made for: a layer's routed experts are one
/// `FusedMoE` whose scheme vLLM takes from `experts.0.{gate,up,down}_proj` and requires to be the same for all three
/// (`CompressedTensorsMoEMethod.get_moe_method`), fused projections one layer ([`fused_group`]), any other weight
/// its own module.
pub fn fused_unit<E>(w: &Weight<E>) -> String {
    if w.role == Role::RoutedExperts {
        if let Some((layer, _)) = expert_layer(&w.name) {
            return layer.to_string();
        }
    }
    fused_group(&w.name).unwrap_or_else(|| w.name.strip_suffix(".weight").unwrap_or(&w.name).to_string())
}

/// The layer a runtime fuses this projection into, if any: vLLM loads q/k/v as one `qkv_proj`, gate/up (Mixtral
/// w1/w3) as one `gate_up_proj` / `w13`, DeepSeek's `q_a_proj` and `kv_a_proj_with_mqa` as one
/// `fused_qkv_a_proj`, and keeps one NVFP4 global scale per fused layer; llm-compressor therefore gives the shards
/// one global scale from their combined statistics (`observers/helpers.py` `FUSED_LAYER_NAMES`, facts doc §1.4).
pub fn fused_group(weight: &str) -> Option<String> {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    let (parent, leaf) = module.rsplit_once('.')?;
    let tag = match leaf {
        "q_proj" | "k_proj" | "v_proj" => "qkv",
        "gate_proj" | "up_proj" => "gate_up",
        "w1" | "w3" => "w13",
        "q_a_proj" | "kv_a_proj_with_mqa" => "qkv_a",
        _ => return None,
    };
    Some(format!("{parent}.{tag}"))
}

/// Appends `v` in the plain float type `d`.
pub(crate) fn put_float(d: DType, v: &[f32], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    Ok(sling_quantizers::encode_f32(d, v, v.len().max(1), out)?)
}

impl Target for Vllm {
    type Enc = Enc;
    type Error = sling_pipeline::ExecError;

    fn needs_amax(&self, enc: &Enc) -> bool {
        matches!(enc, Enc::Nvfp4)
    }

    fn amax_group(&self, w: &Weight<Enc>) -> Option<String> {
        if w.enc != Enc::Nvfp4 {
            return None;
        }
        fused_group(&w.name)
    }

    fn encode(
        &self,
        w: &Weight<Enc>,
        r0: u64,
        vals: &[f32],
        amax: Option<f32>,
        out: &mut [Vec<u8>],
    ) -> Result<(), EncodeError> {
        let cols = w.cols() as usize;
        let rows = vals.len() / cols.max(1);
        match &w.enc {
            Enc::Keep(d) => put_float(*d, vals, &mut out[0])?,
            Enc::Fp8Codes => out[0].extend(vals.iter().map(|&x| ct::f32_to_e4m3(x))),
            Enc::Int { args, sd } => {
                let (mut codes, mut scales, mut zeros, mut words) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                let group = IntGrid { args: *args, sd: *sd }.group();
                let solved = solved_rows(self.solved.as_deref(), &w.name, r0 as usize, rows, cols, group)?;
                let ng = cols.div_ceil(group.max(1)).max(1);
                let half = 1i32 << (args.bits.clamp(1, 8) - 1);
                // Round to nearest: the whole window through the backend (codes, then scales and zero points
                // per group, as `ct::quantize_int_row` appends them row after row).
                let mut rtn = EncodedRows::default();
                if solved.is_none() {
                    let enc = RowEncoding::Int {
                        bits: args.bits,
                        symmetric: args.symmetric,
                        group: args.group.unwrap_or(0),
                        sd: *sd,
                    };
                    encode_rows(self.backend.as_deref(), &enc, vals, cols, &mut rtn)?;
                    scales = std::mem::take(&mut rtn.scales);
                    zeros = std::mem::take(&mut rtn.zeros);
                }
                for r in 0..rows {
                    codes.clear();
                    words.clear();
                    match &solved {
                        // The stored codes and parameters, laid out exactly as the RTN path lays out its own.
                        Some(sr) => {
                            codes.extend(sr.codes[r * cols..(r + 1) * cols].iter().map(|&c| c as i8));
                            if codes.iter().any(|&c| !(-half..half).contains(&i32::from(c))) {
                                return Err(EncodeError::SolvedCode { weight: w.name.clone(), bits: args.bits });
                            }
                            for p in &sr.params[r * ng..(r + 1) * ng] {
                                scales.push(p.scale);
                                if !args.symmetric {
                                    zeros.push(p.zero as i8);
                                }
                            }
                        }
                        None => codes.extend(rtn.codes[r * cols..(r + 1) * cols].iter().map(|&c| c as i8)),
                    }
                    ct::pack_row(&codes, args.bits, &mut words);
                    out[0].extend(words.iter().flat_map(|w| w.to_le_bytes()));
                }
                for s in &scales {
                    sd.put(*s, &mut out[1]);
                }
                if r0 == 0 {
                    out[2].extend((w.rows() as i64).to_le_bytes());
                    out[2].extend((cols as i64).to_le_bytes());
                }
                if !args.symmetric {
                    let ngroups = cols / args.group.unwrap_or(cols).max(1);
                    let words = ct::pack_zero_points(&zeros, rows, ngroups, args.bits);
                    out[3].extend(words.iter().flat_map(|w| w.to_le_bytes()));
                }
            }
            Enc::Fp8Channel { sd } | Enc::Fp8Block { sd } => {
                let enc = match w.enc {
                    Enc::Fp8Block { .. } => RowEncoding::Fp8Block { sd: *sd },
                    _ => RowEncoding::Fp8Channel { sd: *sd },
                };
                let mut e = EncodedRows::default();
                encode_rows(self.backend.as_deref(), &enc, vals, cols, &mut e)?;
                out[0].extend_from_slice(&e.codes);
                for s in &e.scales {
                    sd.put(*s, &mut out[1]);
                }
            }
            Enc::Nvfp4 | Enc::Mxfp4 => {
                let global = ct::nvfp4_global_scale(amax.unwrap_or(0.0));
                let enc = if w.enc == Enc::Nvfp4 { RowEncoding::Nvfp4 { global } } else { RowEncoding::Mxfp4 };
                let mut e = EncodedRows::default();
                encode_rows(self.backend.as_deref(), &enc, vals, cols, &mut e)?;
                out[0].extend_from_slice(&e.codes);
                out[1].extend_from_slice(&e.scale_bytes);
                if r0 == 0 && w.enc == Enc::Nvfp4 {
                    out[2].extend(global.to_le_bytes());
                }
            }
        }
        Ok(())
    }
}

/// The artifact's `config.json`: the source's, with `quantization_config` replaced by the compressed-tensors
/// block, written as compressed-tensors writes it (`json.dump(indent=2, sort_keys=True)`, no trailing newline).
pub fn config_json(ck: &Checkpoint, scheme: Scheme, plan: &Plan<Enc>) -> Result<Vec<u8>, TargetError> {
    let mut root = ck.config.as_ref().map(|c| c.root().clone()).unwrap_or_default();
    root.remove("quantization_config");
    // `ignore`: every Linear module left unquantized (routers, lm_head, weights the scheme cannot take), in
    // checkpoint order.
    let mut ignore: Vec<String> = Vec::new();
    for w in &plan.weights {
        let linear_kept = matches!(w.enc, Enc::Keep(_))
            && w.name.ends_with(".weight")
            && w.parts.first().is_some_and(|p| p.shape.len() == 2)
            && matches!(
                w.role,
                Role::Router
                    | Role::Output
                    | Role::RoutedExperts
                    | Role::SharedExperts
                    | Role::Attention
                    | Role::DenseFfn
            );
        if linear_kept {
            let m = w.name.strip_suffix(".weight").unwrap_or(&w.name).to_string();
            if !ignore.contains(&m) {
                ignore.push(m);
            }
        }
    }
    // In module order, as compressed-tensors lists them (`named_modules`): layers by number (the checkpoint lists
    // `layers.10` before `layers.2`), `lm_head` last.
    let key = |m: &String| match sling_pipeline::hf::layer_of(m) {
        Some(l) => l + 1,
        None if m == "lm_head" || m.ends_with(".lm_head") => u64::MAX,
        None => 0,
    };
    let (groups, format) = match mixed_groups(scheme, plan)? {
        Some((groups, kept_moe)) => {
            // A FusedMoE layer kept whole: also by its own name, which vLLM checks before its experts'.
            ignore.extend(kept_moe);
            (groups, "pack-quantized")
        }
        None => (serde_json::json!({"group_0": scheme.config_group()}), scheme.format()),
    };
    ignore.sort_by_key(key); // stable: checkpoint order within a layer
    let block = serde_json::json!({
        "config_groups": groups,
        "format": format,        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "moe_sparsity_config": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    });
    root.insert("quantization_config".into(), block);
    Ok(json_sorted(&serde_json::Value::Object(root), 2, true).into_bytes())
}

/// The config groups of a plan whose integer weights do not all have `scheme`'s bits and group size (a recipe's or
/// `vllm:auto`'s): one group per encoding, in (bits, group size) order, each targeting its modules by exact name and
/// each layer's routed experts by one `re:` pattern over the projection names both the checkpoint and vLLM use
/// (vLLM asks for `experts.0.gate_proj` even where Mixtral stores `w1`). Also the `FusedMoE` layers kept whole,
/// for `ignore`. `None`: the plan is `scheme` throughout.
fn mixed_groups(scheme: Scheme, plan: &Plan<Enc>) -> Result<Option<(serde_json::Value, Vec<String>)>, TargetError> {
    use std::collections::{BTreeMap, BTreeSet};
    let want = scheme.int_args();
    let mixed = plan.weights.iter().any(|w| match &w.enc {
        Enc::Int { args, .. } => Some(*args) != want,
        _ => false,
    });
    if !mixed {
        return Ok(None);
    }
    /// A config group's target: a module by name, or a FusedMoE layer's experts by pattern.
    #[derive(PartialEq)]
    enum Named {
        Module(String),
        Experts(String),
    }
    // Per encoding, its targets in plan order; per FusedMoE layer, its projections and whether any is quantized.
    let mut by_args: BTreeMap<(u32, usize, bool), (IntArgs, Vec<Named>)> = BTreeMap::new();
    let mut layers: BTreeMap<String, (BTreeSet<String>, bool)> = BTreeMap::new();
    for w in &plan.weights {
        let expert = (w.role == Role::RoutedExperts).then(|| expert_layer(&w.name)).flatten();
        if let Some((layer, proj)) = expert {
            let e = layers.entry(layer.to_string()).or_default();
            e.0.insert(proj.to_string());
            e.1 |= matches!(w.enc, Enc::Int { .. });
        }
        match &w.enc {
            Enc::Int { args, .. } => {
                let key = (args.bits, args.group.unwrap_or(0), args.symmetric);
                let targets = &mut by_args.entry(key).or_insert_with(|| (*args, Vec::new())).1;
                let t = match expert {
                    Some((layer, _)) => Named::Experts(layer.to_string()),
                    None => Named::Module(w.name.strip_suffix(".weight").unwrap_or(&w.name).to_string()),
                };
                if !targets.contains(&t) {
                    targets.push(t);
                }
            }
            Enc::Keep(_) => {}
            other => {
                return Err(TargetError::Unsupported(format!(
                    "{}: a mixed-precision vllm artifact holds integer weights only, not {other:?}",
                    w.name
                )))
            }
        }
    }
    // `re.match` anchors at the start only (compressed-tensors' `match_name`, vLLM's `_is_equal_or_regex_match`).
    let pattern = |layer: &str| {
        let mut projs = layers.get(layer).map(|l| l.0.clone()).unwrap_or_default();
        projs.extend(["gate_proj", "up_proj", "down_proj"].map(String::from));
        let alts: Vec<String> = projs.iter().map(|p| regex::escape(p)).collect();
        format!("re:^{}\\.\\d+\\.(?:{})$", regex::escape(layer), alts.join("|"))
    };
    let mut groups = serde_json::Map::new();
    for (i, (args, targets)) in by_args.into_values().enumerate() {
        let targets: Vec<String> = targets
            .into_iter()
            .map(|t| match t {
                Named::Module(m) => m,
                Named::Experts(layer) => pattern(&layer),
            })
            .collect();
        groups.insert(format!("group_{i}"), int_config_group(args, &targets));
    }
    let kept_moe = layers.into_iter().filter(|(_, (_, quantized))| !quantized).map(|(l, _)| l).collect();
    Ok(Some((serde_json::Value::Object(groups), kept_moe)))
}
