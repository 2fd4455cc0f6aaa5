//! `sling quantize` and `sling plan`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sling_core::DType;
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::SplitPolicy;
use sling_target_gguf::convert::{execute, ConvertOptions, ConvertReport, OutType};
use sling_target_gguf::quantize::{
    parse_override_kv, plan_quantize, plan_quantize_gguf, Ftype, Imatrix, QuantizeOptions, QuantizePlan, Recipe,
    RuleOptions, TensorTypeRule, Why,
};

use crate::auto::AutoPlan;
use crate::convert::{split_policy, tool, written_list, PipelineArgs, Reporter};
use serde_json::json;

pub const AFTER_HELP: &str = "Examples (they run as written from the repository root, on its fixtures; with a real \
checkpoint give its directory, e.g. ./Qwen3-30B-A3B, and drop --tokenizer-pre):
  sling quantize fixtures/models/qwen3moe --to gguf:Q4_K_M --tokenizer-pre gpt-2 -o qwen3-Q4_K_M.gguf
  sling calibrate fixtures/models/qwen3moe --data tests/interop/data/calib.txt -o imatrix.gguf   # an imatrix
  sling quantize fixtures/models/qwen3moe --to gguf:IQ4_XS --imatrix imatrix.gguf --tokenizer-pre gpt-2 -o qwen3-IQ4_XS.gguf
  sling quantize fixtures/models/deepseekv3 --to gguf:moe-q2 --split-max-size 100K --tokenizer-pre gpt-2 -o ds-v3-moe-q2.gguf
  sling plan fixtures/models/deepseekv3 --to gguf:moe-iq1 --tokenizer-pre gpt-2   # size and bpw before anything runs
  sling quantize fixtures/models/qwen3moe --to gguf:moe-iq1 --imatrix imatrix.gguf --tokenizer-pre gpt-2 -o qwen3-moe-iq1.gguf
  sling quantize fixtures/models/qwen3moe --to gguf:IQ2_M --imatrix imatrix.gguf --tokenizer-pre gpt-2 -o qwen3-IQ2_M.gguf
  sling quantize fixtures/models/deepseekv3 --to gguf:Q4_K_M --tensor-type 'ffn_.*_exps=q3_K' --tokenizer-pre gpt-2 -o ds-v3.gguf
  sling quantize fixtures/models/gptoss-mxfp4 --to gguf:MXFP4_MOE --tokenizer-pre gpt-2 -o gpt-oss-mxfp4.gguf
  sling plan fixtures/models/qwen3moe --to gguf:Q4_K_M --tokenizer-pre gpt-2   # per-tensor table, nothing written
  sling plan fixtures/models/qwen3moe --to gguf:auto --target-bpw 5 --imatrix imatrix.gguf --data tests/interop/data/calib.txt --tokenizer-pre gpt-2
  sling quantize fixtures/models/qwen3moe --to gguf:auto --target-bpw 5 --imatrix imatrix.gguf --data tests/interop/data/calib.txt --tokenizer-pre gpt-2 -o q.gguf
  sling quantize fixtures/models/qwen3moe --recipe q.gguf.recipe.toml --tokenizer-pre gpt-2 -o q-again.gguf   # the recipe it wrote
  sling quantize fixtures/models/qwen3moe --to vllm:w4a16 -o qwen3-w4a16   # compressed-tensors, for vLLM/SGLang
  sling quantize fixtures/models/deepseekv3-fp8 --to vllm:fp8-block -o ds-v3-fp8-block   # FP8 sources: codes and scales copied
  sling quantize fixtures/models/qwen3moe --to mlx:4 --group-size 64 -o qwen3-mlx-4bit   # for mlx-lm
  sling quantize fixtures/models/qwen3moe --to vllm:auto --target-bpw 10 --imatrix imatrix.gguf --data tests/interop/data/calib.txt -o q-vllm
  sling quantize fixtures/models/qwen3moe --to vllm:w4a16 --recipe q-vllm.recipe.toml -o q-vllm-again   # per-layer bits, docs/vllm.md
  sling quantize fixtures/models/qwen3moe --to mlx:auto --target-bpw 4.5 --imatrix imatrix.gguf --data tests/interop/data/calib.txt -o q-mlx
  sling quantize fixtures/models/qwen3moe --to mlx:4 --recipe q-mlx.recipe.toml -o q-mlx-again   # per-weight bits, docs/mlx.md
  sling quantize fixtures/models/qwen3moe --to mlx:auto --target-bpw 4.5 --data tests/interop/data/calib.txt --method gptq -o q-mlx-gptq
  sling plan fixtures/models/deepseekv3 --to vllm:nvfp4 --json   # what is quantized, what is kept at source precision
  sling quantize fixtures/models/qwen3moe --to vllm:w4a16 --data tests/interop/data/calib.txt -o qwen3-w4a16-gptq   # GPTQ per layer and expert
  sling quantize fixtures/models/qwen3moe --to mlx:4 --group-size 32 --method awq --data tests/interop/data/calib.txt --ctx 64 -o q-awq

vllm:w4a16, w4a16-asym, w8a16 and mlx:BITS take calibration data (--data) for GPTQ: per linear layer and routed \
expert, layer by layer, experts with fewer than --min-expert-tokens routed tokens rounded to nearest and reported \
(docs/gptq.md). --method awq instead folds activation-aware per-channel scales into the norms and linears before \
rounding to nearest (one scale vector per norm, shared by the router and every expert it feeds).

vllm:SCHEME and mlx:BITS write a Hugging Face directory (docs/vllm.md, docs/mlx.md); gguf:PRESET writes GGUF in \
one pass from the Hugging Face checkpoint: the output is the file `convert_hf_to_gguf.py --outtype bf16` followed \
by `llama-quantize PRESET` would write (same tensor types, order, metadata and bytes), without the BF16 file in \
between.

Presets (llama-quantize names; per-tensor types chosen by llama-quantize's own rules, e.g. Q4_K_M keeps attn_v \
and ffn_down at Q6_K on some layers, 8-expert models get Q8_0 attn_k/attn_v; the router and norms are never \
quantized; rows that do not fit a type's block fall back as llama-quantize does):
  Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_L Q3_K_M Q3_K_S Q2_K Q2_K_S* Q4_0 Q4_1 Q5_0 Q5_1
  IQ4_XS IQ4_NL IQ3_M IQ3_S IQ3_XS* IQ3_XXS* IQ2_M* IQ2_S* IQ2_XS* IQ2_XXS* IQ1_M* IQ1_S*
  TQ1_0 TQ2_0 MXFP4_MOE BF16 F16 F32   (Q4_K = Q4_K_M, Q5_K = Q5_K_M, Q3_K = Q3_K_M)
  * needs an imatrix (--imatrix FILE, from llama-imatrix or `sling calibrate`): llama-quantize refuses IQ1_S, \
IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS tensors (and Q2_K ones in Q2_K_S) without one, and so does sling; \
`sling plan` lists them.

MoE recipes (--to gguf:NAME; role -> type tables in docs/quantization.md): moe-q4, moe-iq4, moe-q2 (routed \
experts Q4_K, IQ4_XS, Q2_K; the rest Q6_K/Q8_0); moe-iq2* (routed experts IQ2_XXS, down-projections IQ3_XXS in \
blocks 0-7, IQ2_S after; ~2.3 bpw on DeepSeek-V3) and moe-iq1* (IQ1_S, down-projections IQ2_XXS then IQ1_M, \
after Unsloth's DeepSeek-R1 1.58-bit quant; ~1.7 bpw), both with attention Q4_K/Q5_K, shared experts and dense \
FFN Q5_K/Q6_K, token_embd Q4_K, output Q6_K; routers and norms are never quantized.

gguf:auto --target-size SIZE | --target-bpw X chooses every tensor's type to fit the size: each tensor's error at \
every type its rows allow is measured (imatrix-weighted, experts weighted by routing), and with --data each \
tensor's KL divergence at two types is probed in one layer-by-layer pass; the types with the least predicted KL \
that fit are written as a recipe (OUT.recipe.toml, also --save-recipe FILE; --recipe FILE makes the same file \
again) and recorded in the manifest and the model card (docs/quantization.md, \"Quantize to a size target\"). \
mlx:auto does the same for mlx-lm: bits 2-8 and group size 32/64/128 per weight, written as per-module overrides, \
its recipe an MLX recipe (--to mlx:BITS --recipe FILE; docs/mlx.md); with --method gptq each weight is then \
GPTQ-solved on the grid chosen for it (the same recipe and size; --data feeds both). vllm:auto does the same for \
vLLM: 4 or 8 bits and group size 32/64/128 (or source precision) per layer vLLM loads as one (a layer's routed \
experts, q/k/v, gate/up), written as one compressed-tensors config group per encoding, its recipe a vLLM recipe \
(--to vllm:w4a16 --recipe FILE; docs/vllm.md).

Rules: --tensor-type REGEX=TYPE (repeatable, first match wins, searched in the GGUF tensor name, e.g. \
'blk\\.[0-2]\\..*=q8_0' or 'ffn_down_exps=q5_K'), --output-tensor-type, --token-embedding-type, --pure, \
--leave-output-tensor — the llama-quantize flags, with the same meaning.

imatrix: llama.cpp's GGUF imatrix (llama-imatrix output) or legacy .dat; per-expert slices for expert tensors; \
experts without data are weighted 1.0 exactly like llama-quantize, and listed.

Crash safety, --resume, --progress json / --events, --reproducible and the model card work as for `sling convert` \
(docs/pipeline.md, docs/reproducibility.md). `sling plan` also estimates peak memory, disk size and time.";

/// Flags shared by `quantize` and `plan`.
#[derive(clap::Args)]
pub struct QuantArgs {
    /// Source: a Hugging Face model directory, a .safetensors file, or a GGUF file (as llama-quantize takes;
    /// block-quantized tensors in it need --allow-requantize).
    pub(crate) src: PathBuf,
    /// Target: gguf:PRESET, a llama-quantize preset (gguf:Q4_K_M) or a named MoE recipe (gguf:moe-q4);
    /// gguf:auto with --target-size/--target-bpw (types chosen from measured sensitivities);
    /// vllm:SCHEME, a compressed-tensors directory for vLLM/SGLang (w4a16, w4a16-asym, w8a16, fp8-dynamic,
    /// fp8-block, nvfp4, mxfp4); vllm:auto and mlx:auto with --target-size/--target-bpw; mlx:BITS, a directory
    /// for mlx-lm (2, 3, 4, 5, 6, 8). Optional with --recipe (GGUF).
    #[arg(long, value_name = "TARGET")]
    pub(crate) to: Option<String>,
    /// Recipe file (TOML): for gguf, a base preset plus rules by role, layer range and name
    /// (docs/quantization.md); for mlx:BITS and vllm:w4a16|w4a16-asym|w8a16, bits and group size per weight by
    /// name (docs/mlx.md, docs/vllm.md).
    #[arg(long, value_name = "FILE")]
    pub(crate) recipe: Option<PathBuf>,
    /// Importance matrix (llama-imatrix GGUF output or legacy .dat).
    #[arg(long, value_name = "FILE")]
    pub(crate) imatrix: Option<PathBuf>,
    /// Use imatrix entries only for tensors whose name contains this (repeatable).
    #[arg(long, value_name = "NAME", conflicts_with = "exclude_weights")]
    pub(crate) include_weights: Vec<String>,
    /// Do not use imatrix entries for tensors whose name contains this (repeatable).
    #[arg(long, value_name = "NAME")]
    pub(crate) exclude_weights: Vec<String>,
    /// Every quantized tensor gets the preset's default type (no k-quant mixtures).
    #[arg(long)]
    pub(crate) pure: bool,
    /// Leave output.weight as it is (not quantized).
    #[arg(long)]
    pub(crate) leave_output_tensor: bool,
    /// Type for output.weight (e.g. q8_0, f16).
    #[arg(long, value_name = "TYPE")]
    pub(crate) output_tensor_type: Option<String>,
    /// Type for token_embd.weight.
    #[arg(long, value_name = "TYPE")]
    pub(crate) token_embedding_type: Option<String>,
    /// REGEX=TYPE: tensors whose name matches get TYPE (repeatable; first match wins).
    #[arg(long, value_name = "REGEX=TYPE")]
    pub(crate) tensor_type: Vec<String>,
    /// KEY=TYPE:VALUE metadata to set in the output (TYPE int, float, bool or str), like llama-quantize's
    /// --override-kv (repeatable).
    #[arg(long, value_name = "KEY=TYPE:VALUE")]
    pub(crate) override_kv: Vec<String>,
    /// File of whitespace-separated REGEX=TYPE rules, used after --tensor-type (llama-quantize --tensor-type-file).
    #[arg(long, value_name = "FILE")]
    pub(crate) tensor_type_file: Option<PathBuf>,
    /// Requantize tensors the source holds in a block type (gpt-oss MXFP4 experts) for presets other than MXFP4_MOE.
    #[arg(long)]
    pub(crate) allow_requantize: bool,
    /// tokenizer.ggml.pre to write when the tokenizer is not one llama.cpp knows by hash.
    #[arg(long, value_name = "NAME")]
    pub(crate) tokenizer_pre: Option<String>,
    /// Group size for mlx targets: 32, 64 (default) or 128.
    #[arg(long, value_name = "N")]
    pub(crate) group_size: Option<u64>,
    /// vllm/mlx targets: a weight whose shape the scheme cannot take is an error (default: kept at source
    /// precision, with a warning, and listed in the plan, the manifest and the model card).
    #[arg(long)]
    pub(crate) strict: bool,
    /// Print JSON on stdout (logs and progress go to stderr).
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) solve: crate::solve::SolveArgs,
    #[command(flatten)]
    pub(crate) auto: crate::auto::AutoArgs,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub(crate) q: QuantArgs,
    /// Output file (with splits: the first shard's base name).
    #[arg(short, long = "output", visible_alias = "outfile")]
    pub(crate) output: PathBuf,
    /// Maximum size of each output shard, e.g. 50G: tensor bytes padded to 32, as llama-gguf-split counts them (the
    /// shards are those of llama-gguf-split --split on llama-quantize's file).
    #[arg(long, value_name = "SIZE")]
    pub(crate) split_max_size: Option<String>,
    /// Maximum number of tensors per output shard (as llama-gguf-split --split-max-tensors).
    #[arg(long, value_name = "N")]
    pub(crate) split_max_tensors: Option<usize>,
    /// Quantize even if weights hold NaN or Inf.
    #[arg(long)]
    pub(crate) allow_nonfinite: bool,
    /// Do not write the provenance manifest OUT.sling.json.
    #[arg(long)]
    pub(crate) no_manifest: bool,
    /// Print the plan (as `sling plan` does) and write nothing, like llama-quantize --dry-run.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// After writing, evaluate the artifact against the source on this text (as `sling eval` does: PPL, KLD,
    /// top-1, Δp) and record the figures in the manifest (`quality`) and the model card.
    #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
    pub(crate) eval: Option<PathBuf>,
    /// Tokens per evaluation chunk (with --eval).
    #[arg(long, value_name = "N", default_value_t = 512, requires = "eval")]
    pub(crate) eval_ctx: usize,
    /// At most this many evaluation chunks (with --eval; default: all).
    #[arg(long, value_name = "N", requires = "eval")]
    pub(crate) eval_chunks: Option<usize>,
    /// With --eval: what the artifact's forward pass computes, as `sling eval --as` (auto: llama.cpp's CPU
    /// arithmetic for a GGUF file, the dequantized weights in f32 for a vLLM or MLX directory).
    #[arg(long, value_name = "ARITHMETIC", default_value = "auto", requires = "eval")]
    pub(crate) eval_as: crate::eval::Arithmetic,
    /// With --eval: exit with code 1 when the mean KLD is above this (the artifact is kept, with its figures).
    #[arg(long, value_name = "X", requires = "eval")]
    pub(crate) max_kld: Option<f64>,
    #[command(flatten)]
    pub(crate) pipeline: PipelineArgs,
}

fn dtype_arg(flag: &str, s: &Option<String>) -> Result<Option<DType>> {
    s.as_deref()
        .map(|t| {
            DType::from_name(t)
                .filter(|d| d.info().ggml_id.is_some())
                .with_context(|| format!("{flag}: unknown tensor type {t:?}"))
        })
        .transpose()
}

/// The preset (or recipe) asked for: `--to gguf:NAME` and/or `--recipe FILE`.
fn target(a: &QuantArgs) -> Result<(Ftype, Vec<TensorTypeRule>, String)> {
    let named = match &a.to {
        Some(to) => {
            let name = to
                .strip_prefix("gguf:")
                .with_context(|| format!("--to {to:?}: expected gguf:PRESET (e.g. gguf:Q4_K_M)"))?;
            Some(name)
        }
        None => None,
    };
    let file = match &a.recipe {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read recipe {}", p.display()))?;
            Some(Recipe::parse(&p.display().to_string(), &text).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    match (named, file) {
        (Some(_), Some(_)) => bail!("give either --to gguf:PRESET or --recipe FILE, not both"),
        (None, Some(r)) => Ok((r.base, r.rules, r.name)),
        (None, None) => bail!("say what to make: --to gguf:PRESET (e.g. gguf:Q4_K_M) or --recipe FILE"),
        (Some(n), None) => {
            if let Some(f) = Ftype::parse(n) {
                return Ok((f, Vec::new(), f.name.to_string()));
            }
            if let Some(r) = Recipe::named(n) {
                return Ok((r.base, r.rules, r.name));
            }
            let recipes: Vec<&str> = sling_target_gguf::quantize::recipe::NAMED.iter().map(|(n, _)| *n).collect();
            bail!("unknown preset {n:?}; presets: {}; MoE recipes: {}", Ftype::names().join(", "), recipes.join(", "))
        }
    }
}

/// The options of `quantize` (`dry_run` false) or `plan` / `--dry-run` (true: tensors that need an imatrix are
/// listed, not refused, as llama-quantize --dry-run does).
/// `pipeline`: the `--device` flags of `sling quantize` (the KL probes of `gguf:auto` run their forward-pass
/// products there); `sling plan` probes on the CPU.
fn options(
    a: &QuantArgs,
    dry_run: bool,
    quiet: bool,
    pipeline: Option<&PipelineArgs>,
) -> Result<(QuantizeOptions, String, Option<AutoPlan>)> {
    let auto = crate::auto::wanted(a)?;
    let (ftype, recipe_rules, label) =
        if auto { (sling_target_gguf::quantize::rules::Q8_0, Vec::new(), "auto".to_string()) } else { target(a)? };
    let mut tensor_types = a
        .tensor_type
        .iter()
        .map(|s| TensorTypeRule::parse(s).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    if let Some(p) = &a.tensor_type_file {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        for tok in text.split_whitespace() {
            tensor_types.push(
                TensorTypeRule::parse(tok)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("in {}", p.display()))?,
            );
        }
    }
    tensor_types.extend(recipe_rules);
    let overrides =
        a.override_kv.iter().map(|s| parse_override_kv(s).map_err(anyhow::Error::msg)).collect::<Result<Vec<_>>>()?;
    let imatrix = match &a.imatrix {
        Some(p) => {
            let mut m = Imatrix::load(p)?;
            m.filter(&a.include_weights, &a.exclude_weights);
            Some(m)
        }
        None => None,
    };
    let mut o = QuantizeOptions {
        rules: RuleOptions {
            ftype,
            pure: a.pure,
            leave_output: a.leave_output_tensor,
            output_tensor_type: dtype_arg("--output-tensor-type", &a.output_tensor_type)?,
            token_embedding_type: dtype_arg("--token-embedding-type", &a.token_embedding_type)?,
            tensor_types,
            has_imatrix: false,
        },
        imatrix,
        allow_requantize: a.allow_requantize,
        tokenizer_pre: a.tokenizer_pre.clone(),
        label: label.clone(),
        overrides,
        dry_run,
    };
    if !auto {
        return Ok((o, label, None));
    }
    let gemm = match pipeline {
        Some(p) if a.solve.data.is_some() || a.solve.tokens.is_some() => p.calibration_backend()?,
        _ => None,
    };
    let plan = crate::auto::plan(a, &o, quiet, gemm)?;
    o.rules.ftype = sling_target_gguf::quantize::auto::base_of(&plan.sens, &plan.alloc);
    o.rules.tensor_types = plan.rules();
    Ok((o, label, Some(plan)))
}

fn why(w: &Why) -> String {
    match w {
        Why::Kept => "kept".into(),
        Why::Flag => "flag".into(),
        Why::Pattern(p) => format!("--tensor-type {p}"),
        Why::Default => "default".into(),
        Why::Mix => "mix".into(),
    }
}

fn plan_json(p: &QuantizePlan, ftype: &Ftype, label: &str) -> serde_json::Value {
    let total: u64 = p.rows.iter().map(|r| r.bytes).sum();
    let elems: u64 = p.rows.iter().map(|r| r.ne.iter().product::<u64>()).sum();
    serde_json::json!({
        "preset": label,
        "base": ftype.name,
        "file_type": ftype.id,
        "bytes": total,
        "bpw": if elems > 0 { total as f64 * 8.0 / elems as f64 } else { 0.0 },
        "n_fallback": p.n_fallback,
        "missing_imatrix": p.missing_imatrix,
        "empty_experts": p.empty_experts,
        "needs_imatrix": p.needs_imatrix.iter().map(|(n, t)| json!({ "name": n, "type": t.name() })).collect::<Vec<_>>(),
        "tensors": p.rows.iter().map(|r| serde_json::json!({
            "name": r.name,
            "shape": r.ne,
            "from": r.from.name(),
            "type": r.choice.dtype.name(),
            "why": why(&r.choice.why),
            "fallback_from": r.choice.fallback_from.map(|d| d.name()),
            "bytes": r.bytes,
        })).collect::<Vec<_>>(),
    })
}

fn imatrix_warnings(p: &QuantizePlan) -> Vec<String> {
    let mut w = Vec::new();
    if !p.missing_imatrix.is_empty() {
        w.push(format!(
            "imatrix has no data for {} tensor(s), quantized without it: {}",
            p.missing_imatrix.len(),
            p.missing_imatrix.join(", ")
        ));
    }
    if !p.empty_experts.is_empty() {
        w.push(format!(
            "{} expert matrices have no imatrix data and are weighted 1.0 (as llama-quantize does): {}",
            p.empty_experts.len(),
            p.empty_experts.join(", ")
        ));
    }
    w
}

fn warn_imatrix(p: &QuantizePlan) {
    for w in imatrix_warnings(p) {
        tracing::warn!("{w}");
    }
}

/// Rows for the model card: recipe description, imatrix and type overrides.
fn card_extra(a: &QuantArgs, auto: Option<(&AutoPlan, PathBuf)>) -> Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    if let Some((ap, path)) = auto {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (_, sha) = sling_provenance::manifest::hash_file(&path)?;
        rows.push(("allocation".to_string(), ap.description.clone()));
        rows.push(("recipe file".to_string(), format!("`{name}` (sha256 `{sha}`)")));
    }
    if let Some(to) = a.to.as_deref().and_then(|t| t.strip_prefix("gguf:")) {
        if let Some(r) = Recipe::named(to) {
            rows.push(("recipe description".to_string(), r.description));
        }
    }
    if let Some(p) = &a.recipe {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (_, sha) = sling_provenance::manifest::hash_file(p)?;
        rows.push(("recipe file".to_string(), format!("`{name}` (sha256 `{sha}`)")));
    }
    if let Some(p) = &a.imatrix {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (_, sha) = sling_provenance::manifest::hash_file(p)?;
        rows.push(("imatrix".to_string(), format!("`{name}` (sha256 `{sha}`)")));
    } else {
        rows.push(("imatrix".to_string(), "none".to_string()));
    }
    for t in &a.tensor_type {
        rows.push(("--tensor-type".to_string(), format!("`{}`", t.replace('|', "\\|"))));
    }
    for (flag, on) in [
        ("--pure", a.pure),
        ("--leave-output-tensor", a.leave_output_tensor),
        ("--allow-requantize", a.allow_requantize),
    ] {
        if on {
            rows.push((flag.to_string(), "yes".to_string()));
        }
    }
    for (flag, v) in
        [("--output-tensor-type", &a.output_tensor_type), ("--token-embedding-type", &a.token_embedding_type)]
    {
        if let Some(v) = v {
            rows.push((flag.to_string(), format!("`{v}`")));
        }
    }
    Ok(rows)
}

fn is_gguf(p: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    p.is_file() && std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// Opens the source (HF checkpoint, .safetensors, or a GGUF file as llama-quantize takes) and plans.
pub(crate) fn open_and_plan(src: &std::path::Path, opts: &QuantizeOptions) -> Result<(Checkpoint, QuantizePlan)> {
    if is_gguf(src) {
        return plan_quantize_gguf(src, opts).with_context(|| format!("cannot quantize {}", src.display()));
    }
    let ck = Checkpoint::open(src).with_context(|| format!("cannot read checkpoint {}", src.display()))?;
    let p = plan_quantize(&ck, opts).with_context(|| format!("cannot quantize {}", src.display()))?;
    Ok((ck, p))
}

/// Disk size, peak memory and time of executing the plan (docs/pipeline.md, "Estimates").
fn estimate_json(p: &QuantizePlan) -> Result<serde_json::Value> {
    use sling_formats::gguf::write::planned_files;
    use sling_formats::gguf::TensorDesc;
    let t = &p.prepared.tensors;
    let descs = t.iter().map(|t| TensorDesc::new(t.name.clone(), t.dtype, t.ne.clone())).collect();
    let files = planned_files(std::path::Path::new("model.gguf"), p.prepared.kvs.0.clone(), descs, SplitPolicy::None)?;
    let disk: u64 = files.iter().map(|f| f.1).sum();
    let from: std::collections::HashMap<&str, DType> = p.rows.iter().map(|r| (r.name.as_str(), r.from)).collect();
    let src_bpe = |t: &sling_target_gguf::convert::OutTensor| {
        let n = t.numel().max(1);
        from.get(t.name.as_str()).and_then(|d| d.bytes_for(n)).map_or(2.0, |b| b as f64 / n as f64)
    };
    let e = sling_target_gguf::convert::run::estimate(t, &src_bpe, rayon::current_num_threads(), true);
    Ok(json!({
        "disk_bytes": disk,
        "peak_memory_bytes": e.peak_memory,
        "seconds": (e.seconds * 1000.0).round() / 1000.0,
        "threads": e.threads,
    }))
}

fn human_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// `--to vllm:…` or `--to mlx:…`, if that is what was asked for.
fn hf_target(a: &QuantArgs) -> Result<Option<sling_targets::To>> {
    match &a.to {
        // Without a `kind:` prefix, the gguf path says what it expects.
        Some(to) if to.contains(':') => Ok(sling_targets::To::parse(to)?),
        _ => Ok(None),
    }
}

/// `sling plan`: the per-tensor table, total size and bits per weight, nothing written.
pub fn run_plan(a: QuantArgs, quiet: bool) -> Result<()> {
    if let Some(to) = hf_target(&a)? {
        return crate::hfout::run_plan(&a, to, quiet);
    }
    if a.group_size.is_some() || a.strict {
        bail!("--group-size and --strict apply to vllm:… and mlx:… targets");
    }
    if a.solve.any() && !crate::auto::is_auto(&a) {
        bail!(crate::solve::GGUF_REFUSAL);
    }
    let (opts, label, auto) = options(&a, true, quiet, None)?;
    let (_ck, p) = open_and_plan(&a.src, &opts)?;
    warn_imatrix(&p);
    let mut j = plan_json(&p, &opts.rules.ftype, &label);
    let est = estimate_json(&p)?;
    j["estimate"] = est.clone();
    if let Some(ap) = &auto {
        check_auto(ap, &p)?;
        j["auto"] = ap.json();
        if let Some(path) = &a.auto.save_recipe {
            ap.save(path)?;
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("{:<40} {:>22} {:>8} {:>8}  {:>12}  why", "tensor", "shape", "from", "type", "bytes");
    for r in &p.rows {
        let shape = r.ne.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("x");
        let fb = r.choice.fallback_from.map(|d| format!(" (fallback from {d})")).unwrap_or_default();
        println!(
            "{:<40} {:>22} {:>8} {:>8}  {:>12}  {}{}",
            r.name,
            shape,
            r.from.name(),
            r.choice.dtype.name(),
            r.bytes,
            why(&r.choice.why),
            fb
        );
    }
    println!(
        "total: {} tensors, {} bytes ({:.2} MiB), {:.3} bits per weight, {} fallback(s)",
        p.rows.len(),
        j["bytes"],
        j["bytes"].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64,
        j["bpw"].as_f64().unwrap_or(0.0),
        p.n_fallback
    );
    if let Some((first, ty)) = p.needs_imatrix.first() {
        println!(
            "needs an imatrix: {} tensor(s) would be IQ1/IQ2/IQ3_XXS (or Q2_K in Q2_K_S), e.g. {first} ({ty}); \
             `sling quantize` refuses without --imatrix FILE, as llama-quantize does",
            p.needs_imatrix.len()
        );
    }
    if let Some(ap) = &auto {
        println!("{}", ap.description);
    }
    // On stderr: it depends on the machine (threads), the table above does not.
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "estimated: disk {} bytes ({:.2} MiB), peak memory {:.0} MiB with {} threads, about {} (docs/pipeline.md)",
        est["disk_bytes"],
        mib(est["disk_bytes"].as_u64().unwrap_or(0)),
        mib(est["peak_memory_bytes"].as_u64().unwrap_or(0)),
        est["threads"],
        human_secs(est["seconds"].as_f64().unwrap_or(0.0))
    );
    Ok(())
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    if a.dry_run {
        return run_plan(a.q, quiet);
    }
    let rep = Reporter::new("quantize", &a.pipeline, quiet, a.q.json)?;
    let r = match hf_target(&a.q) {
        Ok(Some(to)) => crate::hfout::run(&a, to, quiet, &rep),
        Ok(None) if a.q.group_size.is_some() || a.q.strict => {
            Err(anyhow::anyhow!("--group-size and --strict apply to vllm:… and mlx:… targets"))
        }
        Ok(None) if a.q.solve.any() && !crate::auto::is_auto(&a.q) => Err(anyhow::anyhow!(crate::solve::GGUF_REFUSAL)),
        Ok(None) => run_with(&a, quiet, &rep),
        Err(e) => Err(e),
    };
    if let Err(e) = &r {
        rep.error(e);
    }
    r
}

fn run_with(a: &Args, quiet: bool, rep: &Reporter) -> Result<()> {
    crate::eval::check_max_kld(a.max_kld)?;
    let (opts, label, auto) = options(&a.q, false, quiet, Some(&a.pipeline))?;
    // llama.cpp's split quant is llama-quantize, then llama-gguf-split: its shard layout.
    let split = split_policy(a.split_max_size.as_deref(), a.split_max_tensors)?.as_llama_gguf_split();
    let t0 = Instant::now();
    let created = a.pipeline.created()?;
    let src = &a.q.src;
    let (ck, p) = open_and_plan(src, &opts)?;
    let warnings = imatrix_warnings(&p);
    // The allocation as a recipe beside the output (recorded in the manifest and the card by its hash).
    let auto = match &auto {
        Some(ap) => {
            check_auto(ap, &p)?;
            let path = crate::auto::recipe_path(&a.output);
            ap.save(&path)?;
            if let Some(extra) = &a.q.auto.save_recipe {
                ap.save(extra)?;
            }
            Some((ap, path))
        }
        None => None,
    };
    let summary = plan_json(&p, &opts.rules.ftype, &label);
    let backend = a.pipeline.backend(rep)?;
    let copts = ConvertOptions {
        split,
        allow_nonfinite: a.allow_nonfinite,
        tokenizer_pre: a.q.tokenizer_pre.clone(),
        provenance: (!a.no_manifest).then(tool),
        resume: a.pipeline.resume,
        created,
        model_card: !a.no_manifest && !a.pipeline.no_model_card,
        card_extra: card_extra(&a.q, auto.clone())?,
        quantize: if a.no_manifest { None } else { Some(record(&a.q, &opts, auto)?) },
        backend: Some(backend.clone()),
        ..ConvertOptions::new(OutType::BF16, a.output.clone())
    };
    let report = execute(&ck, p.prepared, &copts, &|ev| {
        rep.on_event(src, &label, ev);
        // Warnings come right after the start event.
        if matches!(ev, sling_target_gguf::convert::Event::Start { .. }) {
            for w in &warnings {
                rep.warn(w);
            }
        }
    })
    .with_context(|| format!("cannot quantize {}", src.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    for n in &report.notes {
        if n.starts_with(sling_target_gguf::convert::naming::MODEL_CARD_NOTE) {
            rep.warn(n);
        } else {
            tracing::info!("{n}");
        }
    }
    // --eval: measure the artifact just written against its source and record the figures beside it.
    let quality = match &a.eval {
        Some(data) => Some(evaluate_artifact(a, data, &report, quiet)?),
        None => None,
    };
    rep.done(&report, json!({ "preset": summary["preset"], "bpw": summary["bpw"], "quality": quality }));
    if a.q.json {
        let v = json!({
            "quality": quality,
            "outputs": report.outputs,
            "manifest": report.manifest,
            "model_card": report.model_card,
            "preset": summary["preset"],
            "bpw": summary["bpw"],
            "tensors": report.n_tensors,
            "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out,
            "resumed_tensors": report.resumed.tensors,
            "seconds": secs,
            "notes": report.notes,
            "missing_imatrix": summary["missing_imatrix"],
            "empty_experts": summary["empty_experts"],
            "device": device_json(&*backend),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !quiet {
        rep.say(&format!(
            "wrote {} ({} tensors, {:.2} GB, {:.2} bpw) in {:.1}s, {:.2} GB/s of input",
            written_list(&report),
            report.n_tensors,
            report.bytes_out as f64 / 1e9,
            summary["bpw"].as_f64().unwrap_or(0.0),
            secs,
            report.bytes_in as f64 / 1e9 / secs.max(1e-9)
        ));
    }
    Ok(())
}

/// `--eval`: runs `sling eval` on the first output and records the figures with `manifest::attach_quality`
/// (with --no-manifest they are only printed). Returns the figures.
fn evaluate_artifact(a: &Args, data: &Path, report: &ConvertReport, quiet: bool) -> Result<serde_json::Value> {
    if !a.q.src.is_dir() {
        bail!("--eval needs a Hugging Face model directory as the source (the reference), not {}", a.q.src.display());
    }
    let out = report.outputs.first().context("--eval: nothing was written")?;
    let d =
        crate::eval::DataArgs { data: Some(data.to_path_buf()), tokens: None, ctx: a.eval_ctx, chunks: a.eval_chunks };
    let o = crate::eval::run_eval(&a.q.src, out, &d, a.eval_as, quiet, a.pipeline.calibration_backend()?)
        .context("--eval: the evaluation failed (the artifact is complete)")?;
    if !quiet {
        crate::eval::print_report(&o.report, &data.display().to_string());
    }
    // Only what the bytes and the text determine: no timings, no paths of this machine (reproducible manifests).
    let mut q = o.json;
    if let Some(m) = q.as_object_mut() {
        for k in ["seconds", "reference", "candidate"] {
            m.remove(k);
        }
        if let Some(x) = a.max_kld {
            m.insert("max_kld".into(), x.into());
            m.insert("pass".into(), (o.report.kld_mean <= x).into());
        }
    }
    if let Some(mp) = &report.manifest {
        sling_provenance::manifest::attach_quality(mp, q.clone())
            .with_context(|| format!("--eval: cannot record the figures in {}", mp.display()))?;
    }
    if !crate::eval::gate(&o.report, a.max_kld, quiet) {
        return Err(anyhow::Error::new(crate::eval::GateFailed {
            kld: o.report.kld_mean,
            max: a.max_kld.unwrap_or(0.0),
        }));
    }
    Ok(q)
}

/// The options as the manifest records them (`options.quantize`, docs/manifest.md): enough to read the
/// exact recipe and for `sling verify --source` to rebuild the plan.
fn record(
    a: &QuantArgs,
    opts: &QuantizeOptions,
    auto: Option<(&AutoPlan, PathBuf)>,
) -> Result<sling_provenance::manifest::QuantizeRecord> {
    use sling_provenance::manifest::{FileRecord, ImatrixRecord, QuantizeRecord, RecipeRecord};
    // `options` puts the --tensor-type flags first, then the --tensor-type-file rules, then the recipe's.
    let recipe_rules = match &auto {
        Some((ap, _)) => ap.rules(),
        None => target(a)?.1,
    };
    let all = &opts.rules.tensor_types;
    let rules = all
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let from = if i < a.tensor_type.len() {
                "tensor-type"
            } else if i + recipe_rules.len() < all.len() {
                "tensor-type-file"
            } else {
                "recipe"
            };
            r.record(from)
        })
        .collect();
    let recipe = match (&a.recipe, a.to.as_deref().and_then(|t| t.strip_prefix("gguf:"))) {
        _ if auto.is_some() => auto
            .as_ref()
            .map(|(ap, path)| -> Result<RecipeRecord> {
                Ok(RecipeRecord {
                    name: "auto".into(),
                    description: ap.description.clone(),
                    file: Some(FileRecord::of(path)?),
                })
            })
            .transpose()?,
        (Some(p), _) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read recipe {}", p.display()))?;
            let r = Recipe::parse(&p.display().to_string(), &text).map_err(anyhow::Error::msg)?;
            Some(RecipeRecord { name: r.name, description: r.description, file: Some(FileRecord::of(p)?) })
        }
        (None, Some(n)) if Ftype::parse(n).is_none() => {
            Recipe::named(n).map(|r| RecipeRecord { name: r.name, description: r.description, file: None })
        }
        _ => None,
    };
    let imatrix = match (&a.imatrix, &opts.imatrix) {
        (Some(p), Some(m)) => {
            let f = FileRecord::of(p)?;
            Some(ImatrixRecord {
                path: f.path,
                size: f.size,
                sha256: f.sha256,
                include_weights: a.include_weights.clone(),
                exclude_weights: a.exclude_weights.clone(),
                entries: m.entries.len() as u64,
                datasets: m.datasets.clone(),
                chunk_count: m.chunk_count,
            })
        }
        _ => None,
    };
    Ok(QuantizeRecord {
        ftype: opts.rules.ftype.name.to_string(),
        file_type: opts.rules.ftype.id,
        recipe,
        tensor_type_file: a.tensor_type_file.as_deref().map(FileRecord::of).transpose()?,
        rules,
        pure: opts.rules.pure,
        leave_output_tensor: opts.rules.leave_output,
        output_tensor_type: opts.rules.output_tensor_type.map(|d| d.name().to_string()),
        token_embedding_type: opts.rules.token_embedding_type.map(|d| d.name().to_string()),
        allow_requantize: opts.allow_requantize,
        imatrix,
        override_kv: a.override_kv.clone(),
        source_gguf: is_gguf(&a.src).then(|| a.src.file_name().map(|n| n.to_string_lossy().into_owned())).flatten(),
    })
}

/// The plan made from the allocation's rules gives every tensor the type the allocation chose (rules are
/// anchored names and every candidate fits its tensor's rows, so nothing falls back).
fn check_auto(ap: &AutoPlan, p: &QuantizePlan) -> Result<()> {
    for (m, &k) in ap.sens.tensors.iter().zip(&ap.alloc.pick) {
        let want = m.candidates[k].kind;
        match p.rows.iter().find(|r| r.name == m.name) {
            Some(r) if r.choice.dtype == want => {}
            r => bail!(
                "internal error: gguf:auto chose {want} for {} but the plan gives {:?}",
                m.name,
                r.map(|r| r.choice.dtype.name())
            ),
        }
    }
    Ok(())
}

/// `--json`'s `device`: the backend and how many blocks ran on the device and on the host (windows with values
/// the GPU kernels cannot reproduce exactly, and types without a kernel, run on the CPU).
pub fn device_json(b: &dyn sling_kernels::Backend) -> serde_json::Value {
    let (device_blocks, host_blocks) = b.counters();
    json!({ "backend": b.describe(), "gpu": b.is_gpu(), "device_blocks": device_blocks, "host_blocks": host_blocks })
}
