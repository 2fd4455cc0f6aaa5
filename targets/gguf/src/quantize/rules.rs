//! llama-quantize's choice of a type per tensor, as data and one function per step.
//!
//! A port of the pinned `src/llama-quant.cpp` (llama.cpp 0c1e57098, vendored by llama-cpp-python 0.3.36):
//! `tensor_allows_quantization`, `tensor_get_category`, `llama_tensor_get_type(_impl)`, `tensor_type_fallback`,
//! `tensor_requires_imatrix`, `llama_ftype_get_default_type`. Facts: `../shared/docs/gguf-spec.md` §3.
//! Every ftype llama-quantize offers except Q1_0/Q2_0 and COPY is here, the IQ1/IQ2/IQ3 families included, and
//! every branch that can fire for one of them, in the C order (FALCON's and GLM5_NEXT's branches are left out:
//! sling converts neither architecture).

use sling_core::{DType, Role};
use sling_provenance::manifest::RuleRecord;

/// A llama-quantize preset (`llama_ftype`): its CLI name, id and default tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ftype {
    pub name: &'static str,
    /// `llama_ftype` id, written as `general.file_type`.
    pub id: u32,
    /// `llama_ftype_get_default_type`.
    pub default: DType,
    pub about: &'static str,
}

macro_rules! ftypes {
    ($( $c:ident = $name:literal, $id:literal, $dt:ident, $about:literal; )*) => {
        $( pub const $c: Ftype = Ftype { name: $name, id: $id, default: DType::$dt, about: $about }; )*
        /// Every preset, in llama-quantize's `QUANT_OPTIONS` order.
        pub static FTYPES: &[Ftype] = &[$($c),*];
    };
}

ftypes! {
    Q4_0 = "Q4_0", 2, Q4_0, "4.34 bpw legacy 4-bit";
    Q4_1 = "Q4_1", 3, Q4_1, "4.78 bpw legacy 4-bit with minimum";
    MXFP4_MOE = "MXFP4_MOE", 38, MXFP4, "MXFP4 routed experts, Q8_0 elsewhere";
    Q5_0 = "Q5_0", 8, Q5_0, "5.21 bpw legacy 5-bit";
    Q5_1 = "Q5_1", 9, Q5_1, "5.65 bpw legacy 5-bit with minimum";
    IQ2_XXS = "IQ2_XXS", 19, IQ2XXS, "2.06 bpw quantization (needs an imatrix)";
    IQ2_XS = "IQ2_XS", 20, IQ2XS, "2.31 bpw quantization (needs an imatrix)";
    IQ2_S = "IQ2_S", 28, IQ2XS, "2.5 bpw quantization (needs an imatrix)";
    IQ2_M = "IQ2_M", 29, IQ2S, "2.7 bpw quantization (needs an imatrix)";
    IQ1_S = "IQ1_S", 24, IQ1S, "1.56 bpw quantization (needs an imatrix)";
    IQ1_M = "IQ1_M", 31, IQ1M, "1.75 bpw quantization (needs an imatrix)";
    TQ1_0 = "TQ1_0", 36, TQ1_0, "1.69 bpw ternarization";
    TQ2_0 = "TQ2_0", 37, TQ2_0, "2.06 bpw ternarization";
    Q2_K = "Q2_K", 10, Q2K, "2.96 bpw K-quant mix";
    Q2_K_S = "Q2_K_S", 21, Q2K, "2.96 bpw K-quant mix (needs an imatrix)";
    IQ3_XXS = "IQ3_XXS", 23, IQ3XXS, "3.06 bpw quantization (needs an imatrix)";
    IQ3_S = "IQ3_S", 26, IQ3S, "3.44 bpw quantization";
    IQ3_M = "IQ3_M", 27, IQ3S, "3.66 bpw quantization mix";
    IQ3_XS = "IQ3_XS", 22, IQ3S, "3.3 bpw quantization (needs an imatrix)";
    Q3_K_S = "Q3_K_S", 11, Q3K, "3.41 bpw K-quant mix";
    Q3_K_M = "Q3_K_M", 12, Q3K, "3.74 bpw K-quant mix";
    Q3_K_L = "Q3_K_L", 13, Q3K, "4.03 bpw K-quant mix";
    IQ4_NL = "IQ4_NL", 25, IQ4NL, "4.50 bpw non-linear 4-bit";
    IQ4_XS = "IQ4_XS", 30, IQ4XS, "4.25 bpw non-linear 4-bit";
    Q4_K_S = "Q4_K_S", 14, Q4K, "4.37 bpw K-quant mix";
    Q4_K_M = "Q4_K_M", 15, Q4K, "4.58 bpw K-quant mix";
    Q5_K_S = "Q5_K_S", 16, Q5K, "5.21 bpw K-quant mix";
    Q5_K_M = "Q5_K_M", 17, Q5K, "5.33 bpw K-quant mix";
    Q6_K = "Q6_K", 18, Q6K, "6.56 bpw K-quant";
    Q8_0 = "Q8_0", 7, Q8_0, "8.50 bpw";
    F16 = "F16", 1, F16, "16 bpw half precision";
    BF16 = "BF16", 32, BF16, "16 bpw bfloat16";
    F32 = "F32", 0, F32, "32 bpw";
}

/// Aliases llama-quantize accepts (`QUANT_OPTIONS`): the K-quant names without a size letter.
const ALIASES: &[(&str, Ftype)] = &[("Q3_K", Q3_K_M), ("Q4_K", Q4_K_M), ("Q5_K", Q5_K_M)];

impl Ftype {
    /// Looks a preset up by name (case-insensitive) or by its decimal `llama_ftype` id, like llama-quantize.
    pub fn parse(s: &str) -> Option<Ftype> {
        if let Ok(id) = s.parse::<u32>() {
            return FTYPES.iter().find(|f| f.id == id).copied();
        }
        FTYPES
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(s))
            .copied()
            .or_else(|| ALIASES.iter().find(|(a, _)| a.eq_ignore_ascii_case(s)).map(|(_, f)| *f))
    }
    pub fn names() -> Vec<&'static str> {
        FTYPES.iter().map(|f| f.name).collect()
    }
    /// Does llama-quantize refuse this preset without an imatrix, for a model whose rows are multiples of 256? Its
    /// rules then give some tensors a type [`requires_imatrix`] names: the IQ1/IQ2 presets, IQ3_XXS, IQ3_XS
    /// (attn_q, attn_k and the middle ffn_gate/ffn_up at IQ3_XXS) and Q2_K_S. IQ3_S and IQ3_M never need one.
    /// Where rows fall back (gpt-oss, 2880 wide, to IQ4_NL) fewer tensors keep such a type: the per-tensor
    /// [`Choice::requires_imatrix`] decides.
    pub fn needs_imatrix(&self) -> bool {
        [Q2_K_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ1_S, IQ1_M, IQ3_XXS, IQ3_XS].contains(self)
    }
}

/// The ftypes of `llama_tensor_get_type_impl`'s IQ1/IQ2 branch (the `else if` right after TOKEN_EMBD's).
const IQ1_IQ2: [Ftype; 6] = [IQ2_XXS, IQ2_XS, IQ1_S, IQ2_S, IQ2_M, IQ1_M];

/// `tensor_category`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

/// `tensor_get_category`: first match wins, on substrings of the name.
pub fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        return Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return TokenEmbd;
    }
    const SUBSTR: &[(&str, Category)] = &[
        ("attn_qkv.weight", AttnQkv),
        ("attn_kv_b.weight", AttnKvB),
        ("attn_v.weight", AttnV),
        ("attn_k.weight", AttnK),
        ("attn_q.weight", AttnQ),
        ("attn_output.weight", AttnOutput),
        ("ffn_up", FfnUp),
        ("ffn_gate", FfnGate),
        ("ffn_down", FfnDown),
    ];
    SUBSTR.iter().find(|(s, _)| name.contains(s)).map(|(_, c)| *c).unwrap_or(Other)
}

fn is_attn_v(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// Substrings that keep a tensor as it is (`tensor_allows_quantization`, generic part, pinned order).
const NEVER_QUANTIZED: &[&str] = &[
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
];

/// `ggml_n_dims`: dimensions up to the last one larger than 1 (at least 1).
pub fn n_dims(ne: &[u64]) -> usize {
    ne.iter().rposition(|&n| n > 1).map(|i| i + 1).unwrap_or(1)
}

/// `tensor_allows_quantization` for the architectures sling converts (none has a position-embedding or
/// token-types tensor, and GLM5_NEXT is not one of them).
pub fn allows_quantization(name: &str, ne: &[u64], leave_output: bool) -> bool {
    n_dims(ne) >= 2
        && name.ends_with("weight")
        && !(leave_output && name == "output.weight")
        && !NEVER_QUANTIZED.iter().any(|s| name.contains(s))
}

/// Facts about the model the rules depend on (`llama_hparams`, `llama_model`).
#[derive(Clone, Debug, Default)]
pub struct ModelFacts {
    /// `{arch}.expert_count` (0 for dense models).
    pub n_expert: u64,
    /// `n_head(0) / n_head_kv(0)`, 0 when `n_head_kv` is 0.
    pub n_gqa: u64,
    /// `{arch}.block_count` (`n_layer_all`, NextN/MTP blocks included).
    pub n_layer: u64,
    /// `model.type == LLM_TYPE_70B`.
    pub is_70b: bool,
}

/// A type override: `--tensor-type PATTERN=TYPE`, or a recipe rule that also selects by role and layer range.
/// llama-quantize lower-cases `--tensor-type` pattern text before compiling it (`tools/quantize/quantize.cpp
/// parse_tensor_type`), so `\D` means `\d` there and here alike; recipe patterns are used as written.
#[derive(Clone, Debug)]
pub struct TensorTypeRule {
    /// The pattern text (or a description of the selector), for reports.
    pub pattern: String,
    pub regex: regex::Regex,
    pub dtype: DType,
    pub role: Option<Role>,
    /// Inclusive layer range; tensors outside blocks never match a rule with a range.
    pub layers: Option<(u64, u64)>,
}

impl TensorTypeRule {
    /// Does this rule select tensor `name`?
    pub fn matches(&self, name: &str) -> bool {
        self.role.is_none_or(|r| Role::of(name) == r)
            && self.layers.is_none_or(|(a, b)| layer_of(name).is_some_and(|l| a <= l && l <= b))
            && self.regex.is_match(name)
    }

    /// A `--tensor-type PATTERN=TYPE` rule (llama-quantize's syntax; the pattern is lower-cased, as there).
    pub fn parse(spec: &str) -> Result<TensorTypeRule, SpecError> {
        let (pat, ty) = spec.rsplit_once('=').ok_or_else(|| SpecError::NotPatternType(spec.to_string()))?;
        if pat.is_empty() {
            return Err(SpecError::EmptyPattern(spec.to_string()));
        }
        let dtype =
            ggml_type(ty).ok_or_else(|| SpecError::UnknownType { spec: format!("{spec:?}"), ty: ty.to_string() })?;
        let pattern = pat.to_ascii_lowercase();
        let regex = regex::Regex::new(&pattern)
            .map_err(|source| SpecError::BadPattern { spec: format!("{spec:?}"), source: Box::new(source) })?;
        Ok(TensorTypeRule { pattern, regex, dtype, role: None, layers: None })
    }
}

impl TensorTypeRule {
    /// The manifest's record of this rule, which came from `from`.
    pub fn record(&self, from: &str) -> RuleRecord {
        RuleRecord {
            from: from.to_string(),
            pattern: self.pattern.clone(),
            regex: self.regex.as_str().to_string(),
            dtype: self.dtype.name().to_string(),
            role: self.role,
            layers: self.layers.map(|(a, b)| [a, b]),
        }
    }

    /// The rule back from the manifest's record, as the quantizer uses it.
    pub fn from_record(r: &RuleRecord) -> Result<TensorTypeRule, SpecError> {
        let spec = || format!("rule {}", r.pattern);
        let dtype = ggml_type(&r.dtype).ok_or_else(|| SpecError::UnknownType { spec: spec(), ty: r.dtype.clone() })?;
        let regex = regex::Regex::new(&r.regex)
            .map_err(|source| SpecError::BadPattern { spec: spec(), source: Box::new(source) })?;
        Ok(TensorTypeRule {
            pattern: r.pattern.clone(),
            regex,
            dtype,
            role: r.role,
            layers: r.layers.map(|[a, b]| (a, b)),
        })
    }
}

/// Everything llama-quantize's type choice depends on besides the tensor.
#[derive(Clone, Debug)]
pub struct Options {
    pub ftype: Ftype,
    pub pure: bool,
    pub leave_output: bool,
    pub output_tensor_type: Option<DType>,
    pub token_embedding_type: Option<DType>,
    pub tensor_types: Vec<TensorTypeRule>,
    pub has_imatrix: bool,
}

/// Why a tensor got its type, for `plan` and the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// Not a quantizable tensor: copied as it is.
    Kept,
    /// `--token-embedding-type` / `--output-tensor-type`.
    Flag,
    /// A `--tensor-type` pattern.
    Pattern(String),
    /// The ftype's default type (`--pure`, or no rule changed it).
    Default,
    /// One of llama-quantize's mixture rules.
    Mix,
}

/// The type chosen for one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub dtype: DType,
    pub why: Why,
    /// `ne[0]` did not fit the block size: the type the rules wanted before the fallback.
    pub fallback_from: Option<DType>,
    /// `tensor_requires_imatrix` on the final type.
    pub requires_imatrix: bool,
}

/// Errors of the type choice.

/// A type rule, recipe or `--override-kv` as a user (or a manifest) wrote it, refused before anything is read:
/// each names the spec and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0:?}: expected PATTERN=TYPE")]
    NotPatternType(String),
    #[error("{0:?}: empty pattern")]
    EmptyPattern(String),
    #[error("{spec}: unknown tensor type {ty:?}")]
    UnknownType { spec: String, ty: String },
    #[error("{spec}: bad pattern: {source}")]
    BadPattern { spec: String, source: Box<regex::Error> },
    #[error("{spec}: unknown base preset {name:?}")]
    UnknownPreset { spec: String, name: String },
    #[error("{spec}: empty layer range [{first}, {last}]")]
    EmptyLayers { spec: String, first: u64, last: u64 },
    #[error("recipe {name}: {source}")]
    Toml { name: String, source: Box<toml::de::Error> },
    #[error("malformed KV override {spec:?}: {why}")]
    OverrideSyntax { spec: String, why: &'static str },
    #[error("invalid {kind} value in KV override {spec:?}")]
    OverrideValue { spec: String, kind: &'static str },
    #[error("invalid type for KV override {0:?}: use int:, float:, bool: or str:")]
    OverrideType(String),
}

/// A ggml tensor type by name (`q4_K`, `Q8_0`, `iq2_xxs`): one a GGUF file can hold.
pub(crate) fn ggml_type(name: &str) -> Option<DType> {
    DType::from_name(name).filter(|d| d.info().ggml_id.is_some())
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RuleError {
    #[error("tensor {0}: cannot determine its layer from the name")]
    NoLayer(String),
    #[error("tensor {name}: layer {layer} is outside 0..{n_layer}")]
    BadLayer { name: String, layer: u64, n_layer: u64 },
    #[error("tensor {name}: no fallback type is defined for {dtype} (row length {ne0})")]
    NoFallback { name: String, dtype: DType, ne0: u64 },
}

/// `sscanf(name, "blk.%d.")`.
pub fn layer_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("blk.")?;
    let digits = rest.split('.').next()?;
    if rest.len() == digits.len() || digits.is_empty() {
        return None;
    }
    digits.parse().ok()
}

/// `weight_name_comparer`: llama-quantize's tensor order (non-block tensors first, then by layer, then by name).
pub fn sort_key(name: &str) -> (i64, &str) {
    (layer_of(name).map(|l| l as i64).unwrap_or(-1), name)
}

fn use_more_bits(i: i64, n: i64) -> bool {
    // C integer division, as in llama-quant.cpp.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The running state of `quantize_state_impl`; one per file, fed tensors in [`sort_key`] order.
pub struct Chooser<'a> {
    opts: &'a Options,
    facts: ModelFacts,
    n_attention_wv: i64,
    i_attention_wv: i64,
    i_ffn_down: i64,
    i_ffn_gate: i64,
    i_ffn_up: i64,
    has_tied_embeddings: bool,
    pub n_fallback: usize,
}

impl<'a> Chooser<'a> {
    /// `init_quantize_state_counters` over every tensor name of the file.
    pub fn new<'n>(opts: &'a Options, facts: ModelFacts, names: impl IntoIterator<Item = &'n str>) -> Self {
        let mut c = Chooser {
            opts,
            facts,
            n_attention_wv: 0,
            i_attention_wv: 0,
            i_ffn_down: 0,
            i_ffn_gate: 0,
            i_ffn_up: 0,
            has_tied_embeddings: true,
            n_fallback: 0,
        };
        for n in names {
            let cat = category(n);
            if is_attn_v(cat) {
                c.n_attention_wv += 1;
            }
            if cat == Category::Output {
                c.has_tied_embeddings = false;
            }
        }
        c
    }

    /// `llama_tensor_get_type` plus `tensor_requires_imatrix` for tensor `name` of shape `ne` (ggml order),
    /// currently of type `cur`.
    pub fn choose(&mut self, name: &str, ne: &[u64], cur: DType) -> Result<Choice, RuleError> {
        let o = self.opts;
        let done = |dtype: DType, why: Why, fallback_from: Option<DType>| Choice {
            dtype,
            why,
            fallback_from,
            requires_imatrix: requires_imatrix(name, dtype, o.ftype),
        };
        if !allows_quantization(name, ne, o.leave_output) {
            return Ok(done(cur, Why::Kept, None));
        }
        let cat = category(name);
        if let (Some(t), Category::TokenEmbd) = (o.token_embedding_type, cat) {
            // per_layer_token_embd skips this when a --tensor-type pattern names it.
            let named = name == "per_layer_token_embd.weight" && o.tensor_types.iter().any(|r| r.matches(name));
            if !named {
                return Ok(done(t, Why::Flag, None));
            }
        }
        if let (Some(t), Category::Output) = (o.output_tensor_type, cat) {
            return Ok(done(t, Why::Flag, None));
        }
        let mut ty = o.ftype.default;
        let mut why = Why::Default;
        if ty.is_quantized() {
            let mut manual = false;
            if let Some(r) = o.tensor_types.iter().find(|r| r.matches(name)) {
                ty = r.dtype;
                why = Why::Pattern(r.pattern.clone());
                manual = true;
            }
            if !manual && !o.pure {
                let t = self.impl_rules(ty, name, ne, cat)?;
                if t != ty {
                    why = Why::Mix;
                }
                ty = t;
            }
            let before = ty;
            ty = self.fallback(name, ne, ty)?;
            if ty != before {
                return Ok(done(ty, why, Some(before)));
            }
        }
        Ok(done(ty, why, None))
    }

    /// `tensor_type_fallback`.
    fn fallback(&mut self, name: &str, ne: &[u64], target: DType) -> Result<DType, RuleError> {
        let ne0 = ne.first().copied().unwrap_or(1);
        let qk = target.block_elems() as u64;
        if ne0 % qk == 0 {
            return Ok(target);
        }
        self.n_fallback += 1;
        let mut ret = match target {
            DType::IQ1S
            | DType::IQ1M
            | DType::IQ2XXS
            | DType::IQ2XS
            | DType::IQ2S
            | DType::IQ3XXS
            | DType::IQ3S
            | DType::IQ4XS => DType::IQ4NL,
            DType::Q2K | DType::Q3K | DType::TQ1_0 | DType::TQ2_0 => DType::Q4_0,
            DType::Q4K => DType::Q5_0,
            DType::Q5K => DType::Q5_1,
            DType::Q6K => DType::Q8_0,
            t if qk <= 32 => t,
            t => return Err(RuleError::NoFallback { name: name.into(), dtype: t, ne0 }),
        };
        if ne0 % ret.block_elems() as u64 != 0 {
            ret = DType::F16;
        }
        Ok(ret)
    }

    /// `layer_info`: the layer parsed from the name for MoE models, else the running counter.
    fn layer_info(&self, counter: i64, name: &str) -> Result<(i64, i64), RuleError> {
        let n = self.facts.n_layer as i64;
        if self.facts.n_expert.max(1) > 1 {
            let l = layer_of(name).ok_or_else(|| RuleError::NoLayer(name.into()))?;
            if l >= self.facts.n_layer {
                return Err(RuleError::BadLayer { name: name.into(), layer: l, n_layer: self.facts.n_layer });
            }
            return Ok((l as i64, n));
        }
        Ok((counter, n))
    }

    /// `llama_tensor_get_type_impl` (llama-quant.cpp lines 446-720 at the pin), branch for branch in the C order.
    // Kept branch for branch as in C, where adjacent branches can give the same type.
    #[allow(clippy::if_same_then_else)]
    fn impl_rules(&mut self, mut ty: DType, name: &str, ne: &[u64], cat: Category) -> Result<DType, RuleError> {
        use DType as T;
        let f = self.opts.ftype;
        let fx = &self.facts;
        let n_expert = fx.n_expert;
        let gqa4 = fx.n_gqa >= 4;
        let has_imatrix = self.opts.has_imatrix;
        let iq2s_or_m = f == IQ2_S || f == IQ2_M;
        if cat == Category::Output || (self.has_tied_embeddings && cat == Category::TokenEmbd) {
            if let Some(t) = self.opts.output_tensor_type {
                ty = t;
            } else {
                let nx = ne.first().copied().unwrap_or(1);
                if f == MXFP4_MOE || nx % ty.block_elems() as u64 != 0 {
                    ty = T::Q8_0;
                } else if [IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ2_S, IQ2_M, IQ1_M].contains(&f) {
                    ty = T::Q5K;
                } else if ty != T::Q8_0 {
                    ty = T::Q6K;
                }
            }
        } else if f == MXFP4_MOE {
            ty = if ne.get(2).copied().unwrap_or(1) > 1 { T::MXFP4 } else { T::Q8_0 };
        } else if cat == Category::TokenEmbd {
            if let Some(t) = self.opts.token_embedding_type {
                ty = t;
            } else if [IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M].contains(&f) {
                ty = T::Q2K;
            } else if iq2s_or_m || f == IQ3_XXS {
                ty = T::IQ3S;
            } else if f == TQ1_0 || f == TQ2_0 {
                ty = T::Q4K;
            }
        } else if IQ1_IQ2.contains(&f) {
            if is_attn_v(cat) {
                ty = if gqa4 || n_expert >= 4 {
                    T::Q4K
                } else if iq2s_or_m {
                    T::IQ3S
                } else {
                    T::Q2K
                };
                self.i_attention_wv += 1;
            } else if n_expert == 8 && cat == Category::AttnK {
                ty = T::Q4K;
            } else if cat == Category::FfnDown {
                // The running counter over every ffn_down* tensor (experts and shared experts alike), not the
                // layer from the name: `qs.i_ffn_down < qs.n_ffn_down/8`.
                if self.i_ffn_down < fx.n_layer as i64 / 8 {
                    ty = if iq2s_or_m { T::IQ3S } else { T::Q2K };
                }
                self.i_ffn_down += 1;
            } else if cat == Category::AttnOutput {
                if n_expert == 8 {
                    ty = T::Q5K;
                } else if f == IQ1_S || f == IQ1_M {
                    ty = T::IQ2XXS;
                } else if iq2s_or_m {
                    ty = T::IQ3S;
                }
            }
        } else if is_attn_v(cat) {
            if f == Q2_K {
                ty = if gqa4 { T::Q4K } else { T::Q3K };
            } else if f == Q2_K_S && gqa4 {
                ty = T::Q4K;
            } else if f == IQ3_XXS {
                ty = if gqa4 {
                    T::Q4K
                } else if !has_imatrix {
                    T::IQ3S
                } else {
                    T::IQ3XXS
                };
            } else if (f == IQ3_XS || f == IQ3_S) && gqa4 {
                ty = T::Q4K;
            } else if f == IQ3_M {
                ty = T::Q4K;
            } else if f == Q3_K_M {
                ty = if self.i_attention_wv < 2 { T::Q5K } else { T::Q4K };
            } else if f == Q3_K_L {
                ty = T::Q5K;
            } else if (f == IQ4_NL || f == IQ4_XS) && gqa4 {
                ty = T::Q5K;
            } else if (f == Q4_K_M || f == Q5_K_M) && use_more_bits(self.i_attention_wv, self.n_attention_wv) {
                ty = T::Q6K;
            } else if f == Q4_K_S && self.i_attention_wv < 4 {
                ty = T::Q5K;
            }
            if fx.is_70b && (ty == T::Q3K || ty == T::Q4K) {
                ty = T::Q5K;
            }
            if n_expert == 8 {
                ty = T::Q8_0;
            }
            self.i_attention_wv += 1;
        } else if cat == Category::AttnK {
            if n_expert == 8 {
                ty = T::Q8_0;
            } else if f == IQ3_XS {
                ty = T::IQ3XXS;
            } else if f == IQ3_XXS {
                ty = T::IQ2S;
            }
        } else if cat == Category::AttnQ {
            if f == IQ3_XS {
                ty = T::IQ3XXS;
            } else if f == IQ3_XXS {
                ty = T::IQ2S;
            }
        } else if cat == Category::FfnDown {
            let (i, n) = self.layer_info(self.i_ffn_down, name)?;
            if f == Q2_K {
                ty = T::Q3K;
            } else if f == Q2_K_S {
                if i < n / 8 {
                    ty = T::Q4K;
                }
            } else if f == IQ3_XXS && !has_imatrix {
                ty = if i < n / 8 { T::Q4K } else { T::Q3K };
            } else if f == Q3_K_M {
                // Non-FALCON: the `use_more_bits` alternative only matters for FALCON, not converted by sling.
                ty = if i < n / 16 { T::Q5K } else { T::Q4K };
            } else if f == IQ3_M && (i < n / 8 || (n_expert == 8 && use_more_bits(i, n))) {
                ty = T::Q4K;
            } else if f == Q3_K_L {
                ty = T::Q5K;
            } else if f == Q4_K_M {
                if use_more_bits(i, n) {
                    ty = T::Q6K;
                }
            } else if i < n / 8 && (f == IQ4_NL || f == IQ4_XS) && !has_imatrix {
                ty = T::Q5K;
            } else if f == Q5_K_M && use_more_bits(i, n) {
                ty = T::Q6K;
            } else if f == Q4_K_S && i < n / 8 {
                ty = T::Q5K;
            } else if (f == Q4_0 || f == Q5_0) && has_imatrix && i < n / 8 {
                ty = if f == Q4_0 { T::Q4_1 } else { T::Q5_1 };
            }
            self.i_ffn_down += 1;
        } else if cat == Category::AttnOutput {
            if n_expert == 8 {
                if [Q2_K, IQ3_XS, IQ3_XXS, Q3_K_S, Q3_K_M, IQ4_NL, Q4_K_S, Q4_K_M, IQ3_S, IQ3_M, IQ4_XS].contains(&f) {
                    ty = T::Q5K;
                }
            } else if f == Q2_K {
                ty = T::Q3K;
            } else if f == IQ3_XXS {
                ty = T::IQ3S;
            } else if f == Q3_K_M {
                ty = T::Q4K;
            } else if f == Q3_K_L {
                ty = T::Q5K;
            } else if f == IQ3_M {
                ty = T::Q4K;
            }
        } else if cat == Category::FfnGate || cat == Category::FfnUp {
            // ATTENTION_QKV's own branch is unreachable: `category_is_attn_v` takes attn_qkv first.
            let counter = if cat == Category::FfnGate { self.i_ffn_gate } else { self.i_ffn_up };
            let (i, n) = self.layer_info(counter, name)?;
            if f == IQ3_XS && i >= n / 8 && i < 7 * n / 8 {
                ty = T::IQ3XXS;
            }
            if cat == Category::FfnGate {
                self.i_ffn_gate += 1;
            } else {
                self.i_ffn_up += 1;
            }
        }
        Ok(ty)
    }
}

/// `tensor_requires_imatrix`: IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_M, IQ1_S, and Q2_K inside a Q2_K_S file; never
/// `token_embd`, `per_layer_token_embd` or `output` (llama-quant.cpp `tensor_requires_imatrix`).
pub fn requires_imatrix(name: &str, dtype: DType, ftype: Ftype) -> bool {
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" || name == "output.weight" {
        return false;
    }
    match dtype {
        DType::IQ3XXS | DType::IQ2XXS | DType::IQ2XS | DType::IQ2S | DType::IQ1M | DType::IQ1S => true,
        DType::Q2K => ftype == Q2_K_S,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(f: Ftype) -> Options {
        Options {
            ftype: f,
            pure: false,
            leave_output: false,
            output_tensor_type: None,
            token_embedding_type: None,
            tensor_types: vec![],
            has_imatrix: false,
        }
    }

    use super::super::test_models::{self as tm, Model};

    /// Each expected type is worked out from the pinned llama-quant.cpp; `L<n>` is the line that decides it.
    fn check(m: &Model, f: Ftype, has_imatrix: bool, want: &[(&str, DType)]) {
        let got = m.choose(&tm::options(f, has_imatrix, vec![]));
        for (n, t) in want {
            let c = got.get(*n).unwrap_or_else(|| panic!("{n}: no such tensor"));
            assert_eq!(c.dtype, *t, "{} {n} (imatrix {has_imatrix})", f.name);
            assert_eq!(c.requires_imatrix, requires_imatrix(n, *t, f), "{n}");
        }
    }

    const TE: &str = "token_embd.weight";
    const OUT: &str = "output.weight";

    #[test]
    fn iq_presets_are_llama_quantize_s() {
        let ids: Vec<(&str, u32, DType)> = FTYPES.iter().map(|f| (f.name, f.id, f.default)).collect();
        for want in [
            ("IQ2_XXS", 19, DType::IQ2XXS),
            ("IQ2_XS", 20, DType::IQ2XS),
            ("IQ2_S", 28, DType::IQ2XS),
            ("IQ2_M", 29, DType::IQ2S),
            ("IQ1_S", 24, DType::IQ1S),
            ("IQ1_M", 31, DType::IQ1M),
            ("IQ3_XXS", 23, DType::IQ3XXS),
            ("IQ3_S", 26, DType::IQ3S),
            ("IQ3_M", 27, DType::IQ3S),
            ("IQ3_XS", 22, DType::IQ3S),
        ] {
            assert!(ids.contains(&want), "{want:?}");
        }
        // QUANT_OPTIONS order (tools/quantize/quantize.cpp).
        let pos = |n: &str| FTYPES.iter().position(|f| f.name == n).unwrap();
        let order = ["Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0"];
        assert!(order.windows(2).all(|w| pos(w[0]) < pos(w[1])));
        let order = ["Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ3_XS", "Q3_K_S"];
        assert!(order.windows(2).all(|w| pos(w[0]) < pos(w[1])));
        assert_eq!(Ftype::parse("iq1_m"), Some(IQ1_M));
        assert_eq!(Ftype::parse("22"), Some(IQ3_XS));
        assert!(IQ1_S.needs_imatrix() && IQ3_XS.needs_imatrix() && !IQ3_S.needs_imatrix() && !IQ3_M.needs_imatrix());
    }

    #[test]
    fn iq_types_fall_back_to_iq4_nl_then_f16() {
        // L403-410: every 256-block i-quant falls back to IQ4_NL; L427-437: then F16 if 32 does not divide ne[0].
        for f in [IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ3_XXS, IQ3_S] {
            let o = opts(f);
            let mut c = Chooser::new(&o, ModelFacts { n_layer: 1, ..Default::default() }, []);
            let ch = c.choose("blk.0.attn_k_b.weight", &[128, 512, 16], DType::BF16).unwrap();
            assert_eq!((ch.dtype, ch.fallback_from), (DType::IQ4NL, Some(f.default)), "{}", f.name);
            assert!(!ch.requires_imatrix);
            let ch = c.choose("blk.0.attn_k_b.weight", &[100, 512, 16], DType::BF16).unwrap();
            assert_eq!(ch.dtype, DType::F16);
        }
    }

    #[test]
    fn iq1_iq2_on_deepseek_v3() {
        use DType::*;
        let m = tm::deepseek_v3();
        // ffn_down: the IQ1/IQ2 branch counts every ffn_down* tensor (L553-556): dense layers 0-2 are 0-2, then
        // each MoE layer has ffn_down_exps and ffn_down_shexp, so `i_ffn_down < 61/8 = 7` covers up to blk.4's
        // shared expert, and blk.5's routed experts are the 8th.
        for (f, def, down, attn_out, te) in [
            (IQ1_S, IQ1S, Q2K, IQ2XXS, Q2K),     // L563, L529-531
            (IQ1_M, IQ1M, Q2K, IQ2XXS, Q2K),     // L563
            (IQ2_XXS, IQ2XXS, Q2K, IQ2XXS, Q2K), // attn_output: no IQ2_XXS rule, default
            (IQ2_XS, IQ2XS, Q2K, IQ2XS, Q2K),    //
            (IQ2_S, IQ2XS, IQ3S, IQ3S, IQ3S),    // L555, L564, L533-534
            (IQ2_M, IQ2S, IQ3S, IQ3S, IQ3S),     // default IQ2_S (llama_ftype_get_default_type)
        ] {
            check(
                &m,
                f,
                true,
                &[
                    (TE, te),
                    (OUT, Q5K), // L503-506
                    ("output_norm.weight", F32),
                    ("blk.0.attn_q_a.weight", def), // attn_q_a is no category: default
                    ("blk.0.attn_q_b.weight", def),
                    ("blk.0.attn_kv_a_mqa.weight", def),
                    ("blk.0.attn_k_b.weight", IQ4NL), // 128 wide: fallback L403-410
                    ("blk.0.attn_v_b.weight", def),
                    ("blk.0.attn_output.weight", attn_out), // n_expert 256 != 8: L562-565
                    ("blk.0.ffn_gate.weight", def),
                    ("blk.0.ffn_down.weight", down),
                    ("blk.2.ffn_down.weight", down),
                    ("blk.3.ffn_down_exps.weight", down),
                    ("blk.4.ffn_down_shexp.weight", down),
                    ("blk.5.ffn_down_exps.weight", def),
                    ("blk.5.ffn_down_shexp.weight", def),
                    ("blk.10.ffn_gate_exps.weight", def),
                    ("blk.10.ffn_up_shexp.weight", def),
                    ("blk.10.ffn_gate_inp.weight", F32),
                    ("blk.60.ffn_down_exps.weight", def),
                ],
            );
        }
    }

    #[test]
    fn iq3_on_deepseek_v3() {
        use DType::*;
        let m = tm::deepseek_v3();
        // ffn_down outside the IQ1/IQ2 branch takes the layer from the name (MoE, L456-469): 61/8 = 7.
        check(
            &m,
            IQ3_XXS,
            true,
            &[
                (TE, IQ3S), // L536-537
                (OUT, Q5K), // L503
                ("blk.0.attn_q_a.weight", IQ3XXS),
                ("blk.0.attn_k_b.weight", IQ4NL),
                ("blk.0.attn_output.weight", IQ3S), // L680
                ("blk.0.ffn_down.weight", IQ3XXS),  // with an imatrix L631 does not fire
                ("blk.10.ffn_down_exps.weight", IQ3XXS),
            ],
        );
        check(
            &m,
            IQ3_XXS,
            false,
            &[
                ("blk.6.ffn_down_exps.weight", Q4K), // L631-632
                ("blk.6.ffn_down_shexp.weight", Q4K),
                ("blk.7.ffn_down_exps.weight", Q3K),
            ],
        );
        check(
            &m,
            IQ3_XS,
            true,
            &[
                (TE, IQ3S),
                (OUT, Q6K), // IQ3_XS is not in L503's list: L508
                ("blk.0.attn_output.weight", IQ3S),
                ("blk.0.ffn_down.weight", IQ3S),
                ("blk.0.ffn_gate.weight", IQ3S),        // layer 0 < 61/8
                ("blk.7.ffn_gate_exps.weight", IQ3XXS), // L699: 7 <= i < 7*61/8 = 53
                ("blk.7.ffn_up_shexp.weight", IQ3XXS),  // L707
                ("blk.52.ffn_up_exps.weight", IQ3XXS),
                ("blk.53.ffn_up_exps.weight", IQ3S),
                ("blk.53.ffn_down_exps.weight", IQ3S),
            ],
        );
        check(&m, IQ3_S, false, &[(TE, IQ3S), (OUT, Q6K), ("blk.0.attn_output.weight", IQ3S)]);
        check(
            &m,
            IQ3_M,
            false,
            &[
                (OUT, Q6K),
                ("blk.0.attn_output.weight", Q4K),    // L683
                ("blk.6.ffn_down_exps.weight", Q4K),  // L639: i < n/8
                ("blk.7.ffn_down_exps.weight", IQ3S), // n_expert != 8: no use_more_bits
                ("blk.60.ffn_down_exps.weight", IQ3S),
            ],
        );
    }

    #[test]
    fn iq_presets_on_qwen3_moe() {
        use DType::*;
        let m = tm::qwen3_moe();
        for (f, def, down, attn_out, te) in [
            (IQ1_S, IQ1S, Q2K, IQ2XXS, Q2K),
            (IQ1_M, IQ1M, Q2K, IQ2XXS, Q2K),
            (IQ2_XXS, IQ2XXS, Q2K, IQ2XXS, Q2K),
            (IQ2_XS, IQ2XS, Q2K, IQ2XS, Q2K),
            (IQ2_S, IQ2XS, IQ3S, IQ3S, IQ3S),
            (IQ2_M, IQ2S, IQ3S, IQ3S, IQ3S),
        ] {
            check(
                &m,
                f,
                true,
                &[
                    (TE, te),
                    (OUT, Q5K),
                    ("blk.0.attn_v.weight", Q4K), // n_gqa 8 >= 4: L546
                    ("blk.0.attn_k.weight", def), // n_expert 128 != 8: L550 does not fire
                    ("blk.0.attn_q.weight", def),
                    ("blk.0.attn_output.weight", attn_out),
                    ("blk.0.ffn_down_exps.weight", down), // one ffn_down per layer: counter < 48/8 = 6
                    ("blk.5.ffn_down_exps.weight", down),
                    ("blk.6.ffn_down_exps.weight", def),
                    ("blk.20.ffn_gate_exps.weight", def),
                    ("blk.20.ffn_gate_inp.weight", F32),
                    ("blk.20.attn_q_norm.weight", F32),
                ],
            );
        }
        check(
            &m,
            IQ3_XXS,
            true,
            &[
                (TE, IQ3S),
                (OUT, Q5K),
                ("blk.0.attn_v.weight", Q4K),       // L575
                ("blk.0.attn_k.weight", IQ2S),      // L614-615
                ("blk.0.attn_q.weight", IQ2S),      // L621-622
                ("blk.0.attn_output.weight", IQ3S), // L680
                ("blk.0.ffn_down_exps.weight", IQ3XXS),
                ("blk.9.ffn_up_exps.weight", IQ3XXS),
            ],
        );
        check(&m, IQ3_XXS, false, &[("blk.5.ffn_down_exps.weight", Q4K), ("blk.6.ffn_down_exps.weight", Q3K)]);
        check(
            &m,
            IQ3_XS,
            true,
            &[
                (OUT, Q6K),
                ("blk.0.attn_v.weight", Q4K),         // L577
                ("blk.0.attn_k.weight", IQ3XXS),      // L611
                ("blk.0.attn_q.weight", IQ3XXS),      // L618
                ("blk.5.ffn_gate_exps.weight", IQ3S), // 5 < 48/8
                ("blk.6.ffn_gate_exps.weight", IQ3XXS),
                ("blk.41.ffn_up_exps.weight", IQ3XXS),
                ("blk.42.ffn_up_exps.weight", IQ3S), // 42 >= 7*48/8
                ("blk.6.ffn_down_exps.weight", IQ3S),
            ],
        );
        check(&m, IQ3_S, false, &[("blk.0.attn_v.weight", Q4K), ("blk.0.attn_k.weight", IQ3S), (OUT, Q6K)]);
        check(
            &m,
            IQ3_M,
            false,
            &[
                ("blk.0.attn_v.weight", Q4K),        // L580
                ("blk.0.attn_output.weight", Q4K),   // L683
                ("blk.5.ffn_down_exps.weight", Q4K), // L639
                ("blk.6.ffn_down_exps.weight", IQ3S),
                ("blk.6.ffn_gate_exps.weight", IQ3S),
            ],
        );
    }

    #[test]
    fn iq_presets_on_gpt_oss_fall_back() {
        use DType::*;
        let m = tm::gpt_oss();
        // 2880 = 11.25 x 256: every 256-block type on a 2880-wide row falls back (L403-416); output keeps Q8_0
        // because its rows do not fit the default type (L500).
        for (f, down, attn_out, te) in [
            (IQ1_S, Q4_0, IQ2XXS, Q4_0), // Q2_K -> Q4_0 (L412-416)
            (IQ1_M, Q4_0, IQ2XXS, Q4_0),
            (IQ2_XXS, Q4_0, IQ2XXS, Q4_0),
            (IQ2_XS, Q4_0, IQ2XS, Q4_0),
            (IQ2_S, IQ4NL, IQ3S, IQ4NL), // IQ3_S -> IQ4_NL
            (IQ2_M, IQ4NL, IQ3S, IQ4NL),
        ] {
            check(
                &m,
                f,
                true,
                &[
                    (TE, te),
                    (OUT, Q8_0),
                    ("blk.0.attn_v.weight", Q5_0), // Q4_K (L546) -> Q5_0
                    ("blk.0.attn_k.weight", IQ4NL),
                    ("blk.0.attn_q.weight", IQ4NL),
                    ("blk.0.attn_q.bias", F32),
                    ("blk.0.attn_output.weight", attn_out), // 4096 wide: no fallback
                    ("blk.0.ffn_down_exps.weight", down),   // counter < 24/8 = 3
                    ("blk.2.ffn_down_exps.weight", down),
                    ("blk.3.ffn_down_exps.weight", IQ4NL),
                    ("blk.3.ffn_gate_exps.weight", IQ4NL),
                    ("blk.3.attn_sinks.weight", F32),
                ],
            );
        }
        check(
            &m,
            IQ3_XXS,
            true,
            &[
                (TE, IQ4NL), // IQ3_S (L537) -> IQ4_NL
                (OUT, Q8_0),
                ("blk.0.attn_v.weight", Q5_0),
                ("blk.0.attn_k.weight", IQ4NL), // IQ2_S -> IQ4_NL
                ("blk.0.attn_output.weight", IQ3S),
                ("blk.0.ffn_down_exps.weight", IQ4NL),
            ],
        );
        check(&m, IQ3_XXS, false, &[("blk.2.ffn_down_exps.weight", Q5_0), ("blk.3.ffn_down_exps.weight", Q4_0)]);
        check(&m, IQ3_XS, true, &[("blk.3.ffn_up_exps.weight", IQ4NL), ("blk.0.attn_output.weight", IQ3S)]);
        check(
            &m,
            IQ3_M,
            false,
            &[("blk.0.attn_output.weight", Q4K), ("blk.2.ffn_down_exps.weight", Q5_0), (OUT, Q8_0)],
        );
    }

    #[test]
    fn iq_presets_on_dense_llama() {
        use DType::*;
        let m = tm::llama3_8b();
        for (f, def, down, attn_out, te) in [
            (IQ1_S, IQ1S, Q2K, IQ2XXS, Q2K),
            (IQ1_M, IQ1M, Q2K, IQ2XXS, Q2K),
            (IQ2_XXS, IQ2XXS, Q2K, IQ2XXS, Q2K),
            (IQ2_XS, IQ2XS, Q2K, IQ2XS, Q2K),
            (IQ2_S, IQ2XS, IQ3S, IQ3S, IQ3S),
            (IQ2_M, IQ2S, IQ3S, IQ3S, IQ3S),
        ] {
            check(
                &m,
                f,
                true,
                &[
                    (TE, te),
                    (OUT, Q5K),
                    ("rope_freqs.weight", F32),
                    ("blk.0.attn_v.weight", Q4K), // n_gqa 4: L546
                    ("blk.0.attn_k.weight", def),
                    ("blk.0.attn_output.weight", attn_out),
                    ("blk.3.ffn_down.weight", down), // counter < 32/8
                    ("blk.4.ffn_down.weight", def),
                    ("blk.4.ffn_up.weight", def),
                ],
            );
        }
        check(
            &m,
            IQ3_XXS,
            true,
            &[
                (TE, IQ3S),
                (OUT, Q5K),
                ("blk.0.attn_v.weight", Q4K),
                ("blk.0.attn_q.weight", IQ2S),
                ("blk.0.attn_k.weight", IQ2S),
                ("blk.0.attn_output.weight", IQ3S),
                ("blk.0.ffn_down.weight", IQ3XXS),
            ],
        );
        // Dense models count ffn_down tensors (L456: layer_info keeps the counter when n_expert <= 1).
        check(&m, IQ3_XXS, false, &[("blk.3.ffn_down.weight", Q4K), ("blk.4.ffn_down.weight", Q3K)]);
        check(
            &m,
            IQ3_XS,
            true,
            &[
                (TE, IQ3S),
                (OUT, Q6K),
                ("blk.0.attn_q.weight", IQ3XXS),
                ("blk.0.attn_k.weight", IQ3XXS),
                ("blk.3.ffn_up.weight", IQ3S),
                ("blk.4.ffn_up.weight", IQ3XXS),
                ("blk.27.ffn_gate.weight", IQ3XXS),
                ("blk.28.ffn_gate.weight", IQ3S),
            ],
        );
        check(&m, IQ3_S, false, &[("blk.0.attn_v.weight", Q4K), ("blk.0.attn_q.weight", IQ3S), (OUT, Q6K)]);
        check(
            &m,
            IQ3_M,
            false,
            &[
                ("blk.0.attn_v.weight", Q4K),
                ("blk.0.attn_output.weight", Q4K),
                ("blk.3.ffn_down.weight", Q4K),
                ("blk.4.ffn_down.weight", IQ3S),
                (TE, IQ3S),
            ],
        );
    }

    #[test]
    fn iq_rules_without_gqa_tied_embeddings_and_8_experts() {
        use DType::*;
        let ne = [4096u64, 4096];
        let choose = |f: Ftype, imatrix: bool, facts: ModelFacts, names: &[&str], name: &str| {
            let mut o = opts(f);
            o.has_imatrix = imatrix;
            let mut c = Chooser::new(&o, facts, names.iter().copied());
            c.choose(name, &ne, BF16).unwrap().dtype
        };
        let mha = ModelFacts { n_expert: 0, n_gqa: 1, n_layer: 32, is_70b: false };
        let v = "blk.0.attn_v.weight";
        assert_eq!(choose(IQ2_XXS, true, mha.clone(), &[OUT], v), Q2K); // L547
        assert_eq!(choose(IQ2_M, true, mha.clone(), &[OUT], v), IQ3S); // L547
        assert_eq!(choose(IQ3_XXS, true, mha.clone(), &[OUT], v), IQ3XXS); // L575
        assert_eq!(choose(IQ3_XXS, false, mha.clone(), &[OUT], v), IQ3S); // L575
        assert_eq!(choose(IQ3_S, true, mha.clone(), &[OUT], v), IQ3S); // L577 needs n_gqa >= 4
                                                                       // Tied embeddings (no output.weight): token_embd takes the output rules (L490, L503).
        assert_eq!(choose(IQ1_S, true, mha.clone(), &[TE], TE), Q5K);
        assert_eq!(choose(IQ3_S, true, mha.clone(), &[TE], TE), Q6K);
        // Mixtral: n_expert == 8.
        let mix = ModelFacts { n_expert: 8, n_gqa: 4, n_layer: 32, is_70b: false };
        assert_eq!(choose(IQ1_S, true, mix.clone(), &[], "blk.0.attn_k.weight"), Q4K); // L550
        assert_eq!(choose(IQ1_S, true, mix.clone(), &[], "blk.0.attn_output.weight"), Q5K); // L560
        assert_eq!(choose(IQ3_XXS, true, mix.clone(), &[], "blk.0.attn_k.weight"), Q8_0); // L606
        assert_eq!(choose(IQ3_XXS, true, mix.clone(), &[], v), Q8_0); // L599
        assert_eq!(choose(IQ3_M, true, mix.clone(), &[], "blk.0.attn_output.weight"), Q5K); // L672
                                                                                            // IQ3_M, 8 experts: use_more_bits(7, 32) (7 >= 28? no; (7-4)%3 == 0: no), (6-4)%3 == 2: yes (L639-640).
        assert_eq!(choose(IQ3_M, true, mix.clone(), &[], "blk.6.ffn_down_exps.weight"), Q4K);
        assert_eq!(choose(IQ3_M, true, mix.clone(), &[], "blk.7.ffn_down_exps.weight"), IQ3S);
    }

    #[test]
    fn imatrix_requirements_name_the_types_and_exempt_embeddings() {
        use DType::*;
        for t in [IQ3XXS, IQ2XXS, IQ2XS, IQ2S, IQ1M, IQ1S] {
            assert!(requires_imatrix("blk.0.ffn_up.weight", t, IQ3_S), "{t}");
            for n in [TE, OUT, "per_layer_token_embd.weight"] {
                assert!(!requires_imatrix(n, t, IQ1_S), "{n} {t}");
            }
        }
        for t in [IQ3S, IQ4NL, IQ4XS, Q2K, Q4K] {
            assert!(!requires_imatrix("blk.0.ffn_up.weight", t, IQ1_S), "{t}");
        }
        assert!(requires_imatrix("blk.0.ffn_up.weight", Q2K, Q2_K_S));
        // Every preset said to need one gives some tensor of each test model a type that does, and no other
        // preset does. On gpt-oss most rows (2880 wide) fall back to IQ4_NL, so only the presets that put
        // attn_output (4096 wide) at IQ2_XXS/IQ2_XS or Q2_K need one there.
        for m in [tm::deepseek_v3(), tm::qwen3_moe(), tm::gpt_oss(), tm::llama3_8b()] {
            let gpt_oss = m.facts.n_expert == 32;
            for f in FTYPES {
                let got = m.choose(&tm::options(*f, false, vec![]));
                let any = got.values().any(|c| c.requires_imatrix);
                let expect =
                    if gpt_oss { [IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, Q2_K_S].contains(f) } else { f.needs_imatrix() };
                assert_eq!(any, expect, "{} n_layer {}", f.name, m.facts.n_layer);
            }
        }
    }

    #[test]
    fn presets_parse_like_llama_quantize() {
        assert_eq!(Ftype::parse("q4_k_m"), Some(Q4_K_M));
        assert_eq!(Ftype::parse("Q4_K"), Some(Q4_K_M));
        assert_eq!(Ftype::parse("15"), Some(Q4_K_M));
        assert_eq!(Ftype::parse("Q4_K_X"), None);
    }

    #[test]
    fn categories_follow_first_match() {
        assert_eq!(category("blk.0.ffn_down_exps.weight"), Category::FfnDown);
        assert_eq!(category("blk.0.ffn_gate_inp.weight"), Category::FfnGate);
        assert_eq!(category("blk.0.attn_kv_b.weight"), Category::AttnKvB);
        assert_eq!(category("blk.0.attn_k_b.weight"), Category::Other);
        assert_eq!(category("output.weight"), Category::Output);
    }

    #[test]
    fn sort_order_puts_non_block_tensors_first_then_layers_numerically() {
        let mut v = vec!["blk.10.a.weight", "output.weight", "blk.2.b.weight", "blk.2.a.weight", "token_embd.weight"];
        v.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        assert_eq!(v, ["output.weight", "token_embd.weight", "blk.2.a.weight", "blk.2.b.weight", "blk.10.a.weight"]);
    }

    #[test]
    fn mixtral_q4_k_m_worked_example() {
        // gguf-spec §3.4: attn_v and attn_k Q8_0, attn_output Q5_K, output Q6_K, router unchanged.
        let o = opts(Q4_K_M);
        let facts = ModelFacts { n_expert: 8, n_gqa: 4, n_layer: 32, is_70b: false };
        let names = ["output.weight", "blk.0.attn_v.weight"];
        let mut c = Chooser::new(&o, facts, names);
        let ne = [4096u64, 4096];
        assert_eq!(c.choose("output.weight", &ne, DType::BF16).unwrap().dtype, DType::Q6K);
        assert_eq!(c.choose("blk.0.attn_v.weight", &ne, DType::BF16).unwrap().dtype, DType::Q8_0);
        assert_eq!(c.choose("blk.0.attn_k.weight", &ne, DType::BF16).unwrap().dtype, DType::Q8_0);
        assert_eq!(c.choose("blk.0.attn_output.weight", &ne, DType::BF16).unwrap().dtype, DType::Q5K);
        assert_eq!(c.choose("blk.0.ffn_down_exps.weight", &[14336, 4096, 8], DType::BF16).unwrap().dtype, DType::Q6K);
        assert_eq!(c.choose("blk.5.ffn_down_exps.weight", &[14336, 4096, 8], DType::BF16).unwrap().dtype, DType::Q4K);
        assert_eq!(c.choose("blk.0.ffn_gate_inp.weight", &[4096, 8], DType::F32).unwrap().why, Why::Kept);
        assert_eq!(c.choose("blk.0.attn_norm.weight", &[4096], DType::F32).unwrap().dtype, DType::F32);
    }

    #[test]
    fn fallbacks_follow_the_table() {
        let o = opts(Q4_K_M);
        let mut c = Chooser::new(&o, ModelFacts { n_layer: 1, ..Default::default() }, []);
        let ch = c.choose("blk.0.attn_k_b.weight", &[128, 512, 16], DType::BF16).unwrap();
        assert_eq!((ch.dtype, ch.fallback_from), (DType::Q5_0, Some(DType::Q4K)));
        let ch = c.choose("blk.0.ffn_up.weight", &[2880, 64], DType::BF16).unwrap();
        assert_eq!(ch.dtype, DType::Q5_0);
        let ch = c.choose("blk.0.ffn_up.weight", &[100, 64], DType::BF16).unwrap();
        assert_eq!(ch.dtype, DType::F16);
        assert_eq!(c.n_fallback, 3);
    }

    #[test]
    fn tensor_type_patterns_first_match_and_lowercased() {
        let mut o = opts(Q4_K_M);
        o.tensor_types =
            vec![TensorTypeRule::parse("FFN_.*_EXPS=q8_0").unwrap(), TensorTypeRule::parse("ffn=q2_k").unwrap()];
        let mut c = Chooser::new(&o, ModelFacts { n_layer: 4, n_expert: 4, ..Default::default() }, []);
        let ch = c.choose("blk.1.ffn_up_exps.weight", &[256, 256, 4], DType::BF16).unwrap();
        assert_eq!((ch.dtype, ch.why), (DType::Q8_0, Why::Pattern("ffn_.*_exps".into())));
        assert!(TensorTypeRule::parse("x=q9_9").is_err());
    }
}
