//! One-pass HF → quantized GGUF: the file `convert_hf_to_gguf.py --outtype bf16` followed by `llama-quantize PRESET`
//! would write, without the intermediate file.
//!
//! Planning reuses the converter's plan at BF16 (what the reference's first pass writes, tensor by tensor), then
//! chooses each tensor's type with llama-quantize's rules ([`rules`]), orders the tensors and the metadata as
//! llama-quantize writes them (§3.7 of `../shared/docs/gguf-spec.md`), and attaches importance weights from an
//! imatrix ([`imatrix`]). The values are rounded through BF16 (or F16/F32 where the converter keeps those) before
//! quantizing, exactly what llama-quantize reads back from the intermediate file.

pub mod auto;
pub mod imatrix;
pub mod recipe;
pub mod rules;
#[cfg(test)]
mod test_models;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sling_core::DType;

use crate::convert::hparams::Kvs;
use crate::convert::run::build_kvs;
use crate::convert::{plan, ConvertError, GgufSource, OutTensor, OutType, Prepared};
pub use imatrix::{Imatrix, ImatrixError};
pub use recipe::Recipe;
pub use rules::{Choice, Ftype, ModelFacts, Options as RuleOptions, RuleError, SpecError, TensorTypeRule, Why};
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::{GgufFile, GgufValue};
use sling_pipeline::ops::Op;
use sling_pipeline::PlanError;

/// What `sling quantize` was asked for.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub rules: RuleOptions,
    pub imatrix: Option<Imatrix>,
    /// Requantize tensors the source already holds in a block type (gpt-oss MXFP4 experts), like
    /// `llama-quantize --allow-requantize`.
    pub allow_requantize: bool,
    pub tokenizer_pre: Option<String>,
    /// What to call the result in the manifest (the preset or recipe name).
    pub label: String,
    /// `--override-kv` values, in order (see [`parse_override_kv`]).
    pub overrides: Vec<(String, GgufValue)>,
    /// Only planning (`sling plan`, `--dry-run`): like llama-quantize's `--dry-run`, tensors that need an imatrix
    /// and have none are listed in [`QuantizePlan::needs_imatrix`] instead of refused.
    pub dry_run: bool,
}

/// Parses llama.cpp's `--override-kv KEY=TYPE:VALUE` (`common/common.cpp string_parse_kv_override`) into the value
/// llama-quantize writes: `int:` as u32 of |v| (`(uint32_t)std::abs`), `float:` as f32, `bool:` true/false,
/// `str:` at most 127 bytes. Stricter than `atol`/`atof`: a value that is not a number is an error.
pub fn parse_override_kv(spec: &str) -> Result<(String, GgufValue), SpecError> {
    let syntax = |why| SpecError::OverrideSyntax { spec: spec.to_string(), why };
    let (key, rest) = spec.split_once('=').ok_or_else(|| syntax("expected KEY=TYPE:VALUE"))?;
    if key.is_empty() || key.len() >= 128 {
        return Err(syntax("the key must be 1 to 127 bytes"));
    }
    let bad = |kind| SpecError::OverrideValue { spec: spec.to_string(), kind };
    let v = if let Some(v) = rest.strip_prefix("int:") {
        let n: i64 = v.trim().parse().map_err(|_| bad("int"))?;
        GgufValue::U32(n.unsigned_abs() as u32)
    } else if let Some(v) = rest.strip_prefix("float:") {
        GgufValue::F32(v.trim().parse::<f64>().map_err(|_| bad("float"))? as f32)
    } else if let Some(v) = rest.strip_prefix("bool:") {
        match v {
            "true" => GgufValue::Bool(true),
            "false" => GgufValue::Bool(false),
            _ => return Err(bad("bool")),
        }
    } else if let Some(v) = rest.strip_prefix("str:") {
        if v.len() > 127 {
            return Err(syntax("value cannot exceed 127 chars"));
        }
        GgufValue::String(v.to_string())
    } else {
        return Err(SpecError::OverrideType(spec.to_string()));
    };
    Ok((key.to_string(), v))
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("requantizing from type {from} is disabled (tensor {tensor}); pass --allow-requantize")]
    Requantize { tensor: String, from: DType },
    #[error(
        "this quantization requires an importance matrix: tensor {tensor} would be {dtype}, which llama-quantize \
         refuses to make without one (pass --imatrix FILE, from llama-imatrix or `sling calibrate`)"
    )]
    NeedsImatrix { tensor: String, dtype: DType },
    #[error(
        "{0} is one shard of a split GGUF; merge it first (llama-gguf-split --merge) or quantize the HF checkpoint"
    )]
    SplitSource(PathBuf),
    #[error("imatrix entry {tensor} has {got} values, the tensor needs {want} (ne[0] x experts)")]
    ImatrixSize { tensor: String, got: usize, want: u64 },
}

impl From<PlanError> for QuantizeError {
    fn from(e: PlanError) -> Self {
        QuantizeError::Convert(e.into())
    }
}

/// One row of the plan: what happens to a tensor.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub ne: Vec<u64>,
    /// The type in the converter's BF16 file (the reference pipeline's intermediate).
    pub from: DType,
    pub choice: Choice,
    /// Tokens per expert from the imatrix, when one was used for this tensor.
    pub imatrix_counts: Option<Vec<i64>>,
    pub bytes: u64,
}

/// The whole decision, before anything is written.
pub struct QuantizePlan {
    pub prepared: Prepared,
    pub rows: Vec<PlannedTensor>,
    /// Quantized tensors the imatrix had no entry for (llama-quantize: "did not find weights for ...").
    pub missing_imatrix: Vec<String>,
    /// Experts with no imatrix data, as `tensor[expert]` (weighted 1.0, like llama-quantize).
    pub empty_experts: Vec<String>,
    /// With [`QuantizeOptions::dry_run`]: tensors whose type needs an imatrix and that have no importance weights
    /// (executing the plan is refused; llama-quantize: "this quantization requires an importance matrix").
    pub needs_imatrix: Vec<(String, DType)>,
    pub n_fallback: usize,
}

fn u64_kv(kvs: &Kvs, key: &str) -> Option<u64> {
    kvs.get(key).and_then(|v| v.as_u64())
}

/// The facts `llama_tensor_get_type` reads from the loaded model, from the metadata the file will carry.
pub fn model_facts(kvs: &Kvs) -> ModelFacts {
    let arch = kvs.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let k = |s: &str| u64_kv(kvs, &format!("{arch}.{s}"));
    let n_head = k("attention.head_count").unwrap_or(0);
    let n_head_kv = k("attention.head_count_kv").unwrap_or(n_head);
    let n_layer = k("block_count").unwrap_or(0);
    // `llm_type` 70B as the loaders set it (src/models/llama.cpp, qwen2.cpp): 80 layers (llama: with GQA).
    let is_70b = n_layer == 80 && ((arch == "llama" && n_head_kv != n_head) || arch == "qwen2");
    ModelFacts {
        n_expert: k("expert_count").unwrap_or(0),
        n_gqa: if n_head_kv == 0 { 0 } else { n_head / n_head_kv },
        n_layer,
        is_70b,
    }
}

/// Plans `sling quantize` of an HF checkpoint: every tensor's type, order and importance weights, and the metadata.
pub fn plan_quantize(ck: &Checkpoint, opts: &QuantizeOptions) -> Result<QuantizePlan, QuantizeError> {
    let p = plan(ck, OutType::BF16)?;
    let mxfp4 = p.tensors.iter().any(|t| matches!(t.op, Op::Mxfp4(_)));
    let kvs = build_kvs(ck, OutType::BF16, opts.tokenizer_pre.clone(), mxfp4, &p.tensors)?;
    decide(p.tensors, kvs, p.notes, opts)
}

/// Plans `sling quantize` of a GGUF file (what llama-quantize reads): its tensors and metadata as they are.
/// Returns the source (to execute the plan with) and the plan.
pub fn plan_quantize_gguf(path: &Path, opts: &QuantizeOptions) -> Result<(Checkpoint, QuantizePlan), QuantizeError> {
    let g = GgufFile::open(path).map_err(|e| QuantizeError::Convert(e.into()))?;
    if g.get("split.count").and_then(|v| v.as_u64()).unwrap_or(1) > 1 {
        return Err(QuantizeError::SplitSource(path.to_path_buf()));
    }
    let g = Arc::new(g);
    let mut tensors = Vec::with_capacity(g.tensors.len());
    for (index, t) in g.tensors.iter().enumerate() {
        let ne0 = t.ne.first().copied().unwrap_or(1);
        let row_bytes = t.dtype.bytes_for(ne0).unwrap_or(0);
        tensors.push(OutTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            ne: t.ne.clone(),
            op: Op::Gguf(GgufSource { file: g.clone(), index, dtype: t.dtype, cols: ne0, row_bytes }),
            sources: vec![t.name.clone()],
            round_via: None,
            weights: None,
        });
    }
    let kvs = Kvs(g.kvs.iter().filter(|(k, _)| !k.starts_with("split.")).cloned().collect());
    Ok((Checkpoint::other_file(path), decide(tensors, kvs, Vec::new(), opts)?))
}

/// The source-independent part: llama-quantize's order, type choice, imatrix lookup and metadata.
fn decide(
    mut tensors: Vec<OutTensor>,
    mut kvs: Kvs,
    notes: Vec<String>,
    opts: &QuantizeOptions,
) -> Result<QuantizePlan, QuantizeError> {
    // llama-quantize walks (and writes) the tensors in `weight_name_comparer` order.
    tensors.sort_by(|a, b| rules::sort_key(&a.name).cmp(&rules::sort_key(&b.name)));
    let facts = model_facts(&kvs);
    let mut ropts = opts.rules.clone();
    let imatrix = opts.imatrix.as_ref().filter(|m| !m.entries.is_empty());
    ropts.has_imatrix = imatrix.is_some();
    let mut chooser = rules::Chooser::new(&ropts, facts, tensors.iter().map(|t| t.name.as_str()));
    let mut rows = Vec::with_capacity(tensors.len());
    let mut missing_imatrix = Vec::new();
    let mut empty_experts = Vec::new();
    let mut needs_imatrix = Vec::new();
    for t in &mut tensors {
        let from = t.dtype;
        let choice = chooser.choose(&t.name, &t.ne, from)?;
        let mut imatrix_counts = None;
        if choice.dtype != from {
            if from.is_quantized() && !opts.allow_requantize {
                return Err(QuantizeError::Requantize { tensor: t.name.clone(), from });
            }
            // Only rewritten tensors look their imatrix entry up, as in llama-quantize's main loop.
            if let Some(m) = imatrix {
                match m.entries.get(&t.name) {
                    None => missing_imatrix.push(t.name.clone()),
                    Some(e) => {
                        let n_mat = t.ne.get(2).copied().unwrap_or(1);
                        let want = t.ne[0] * n_mat;
                        if e.weights.len() as u64 == want {
                            t.weights = Some(Arc::new(e.weights.clone()));
                            if !m.legacy {
                                for (i, c) in e.counts.iter().enumerate() {
                                    if *c <= 0 {
                                        empty_experts.push(if n_mat > 1 {
                                            format!("{}[{i}]", t.name)
                                        } else {
                                            t.name.clone()
                                        });
                                    }
                                }
                            }
                            imatrix_counts = Some(e.counts.clone());
                        } else if t.name != "token_embd.weight" && t.name != "per_layer_token_embd.weight" {
                            return Err(QuantizeError::ImatrixSize {
                                tensor: t.name.clone(),
                                got: e.weights.len(),
                                want,
                            });
                        }
                    }
                }
            }
            if choice.requires_imatrix && t.weights.is_none() {
                if !opts.dry_run {
                    return Err(QuantizeError::NeedsImatrix { tensor: t.name.clone(), dtype: choice.dtype });
                }
                needs_imatrix.push((t.name.clone(), choice.dtype));
            }
            t.round_via = Some(from);
            t.dtype = choice.dtype;
        }
        // The C writer stores `ggml_n_dims` dimensions: trailing 1s go (a converter-written [E, 1] becomes [E]).
        t.ne.truncate(rules::n_dims(&t.ne));
        rows.push(PlannedTensor {
            name: t.name.clone(),
            ne: t.ne.clone(),
            from,
            choice,
            imatrix_counts,
            bytes: t.n_bytes(),
        });
    }
    // KV order (llama_model_quantize_impl): input KVs, then quantization_version and file_type re-appended, then
    // the imatrix overrides.
    kvs.0.retain(|(k, _)| k != "general.quantization_version" && k != "general.file_type");
    kvs.0.push(("general.quantization_version".into(), GgufValue::U32(2)));
    kvs.0.push(("general.file_type".into(), GgufValue::U32(opts.rules.ftype.id)));
    // Then the overrides in llama-quantize's order: the user's, then the imatrix keys (each removed and re-appended).
    let imatrix_kvs = imatrix.map(|m| m.kvs()).unwrap_or_default();
    for (k, v) in opts.overrides.iter().cloned().chain(imatrix_kvs) {
        kvs.0.retain(|(x, _)| *x != k);
        kvs.0.push((k, v));
    }
    let n_fallback = chooser.n_fallback;
    let mut notes = notes;
    if n_fallback > 0 {
        notes.push(format!("{n_fallback} of {} tensor(s) required fallback quantization", tensors.len()));
    }
    let label = opts.label.clone();
    Ok(QuantizePlan {
        prepared: Prepared { tensors, kvs, notes, label },
        rows,
        missing_imatrix,
        empty_experts,
        needs_imatrix,
        n_fallback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sling_formats::gguf::write::GgufWriter;
    use sling_formats::gguf::{SplitPolicy, TensorDesc};

    /// A one-block llama GGUF with 256-wide rows (so i-quants apply without falling back).
    fn gguf_256(dir: &Path) -> PathBuf {
        let p = dir.join("m.gguf");
        let kvs = vec![
            ("general.architecture".to_string(), GgufValue::String("llama".into())),
            ("llama.block_count".to_string(), GgufValue::U32(1)),
            ("llama.attention.head_count".to_string(), GgufValue::U32(4)),
            ("llama.attention.head_count_kv".to_string(), GgufValue::U32(4)),
        ];
        let t = [
            ("token_embd.weight", vec![256u64, 16]),
            ("output.weight", vec![256, 16]),
            ("blk.0.attn_q.weight", vec![256, 256]),
            ("blk.0.ffn_down.weight", vec![256, 256]),
        ];
        let descs = t.iter().map(|(n, ne)| TensorDesc::new(*n, DType::F32, ne.clone())).collect();
        let mut w = GgufWriter::create(&p, kvs, descs, SplitPolicy::None).unwrap();
        for (_, ne) in &t {
            w.write_data(&vec![0u8; (ne[0] * ne[1] * 4) as usize]).unwrap();
        }
        w.finish().unwrap();
        p
    }

    fn opts(f: Ftype, dry_run: bool) -> QuantizeOptions {
        QuantizeOptions {
            rules: RuleOptions {
                ftype: f,
                pure: false,
                leave_output: false,
                output_tensor_type: None,
                token_embedding_type: None,
                tensor_types: vec![],
                has_imatrix: false,
            },
            imatrix: None,
            allow_requantize: false,
            tokenizer_pre: None,
            label: f.name.into(),
            overrides: vec![],
            dry_run,
        }
    }

    #[test]
    fn iq_presets_without_an_imatrix_are_refused_naming_the_tensor_and_planned_in_a_dry_run() {
        let t = tempfile::tempdir().unwrap();
        let src = gguf_256(t.path());
        for f in [rules::IQ2_XXS, rules::IQ1_S, rules::IQ3_XXS] {
            // llama-quantize order: output, token_embd (both exempt), then blk.0.attn_q first.
            let e = plan_quantize_gguf(&src, &opts(f, false)).err().expect("refused");
            let want = if f == rules::IQ3_XXS { DType::IQ2S } else { f.default };
            assert!(
                matches!(&e, QuantizeError::NeedsImatrix { tensor, dtype } if tensor == "blk.0.attn_q.weight" && *dtype == want),
                "{}: {e}",
                f.name
            );
            assert!(e.to_string().contains("blk.0.attn_q.weight") && e.to_string().contains(want.name()));
            let (_, p) = plan_quantize_gguf(&src, &opts(f, true)).unwrap();
            let names: Vec<&str> = p.needs_imatrix.iter().map(|(n, _)| n.as_str()).collect();
            // IQ3_XXS without an imatrix keeps ffn_down at Q3_K (llama-quant.cpp L631-632).
            let want: &[&str] = if f == rules::IQ3_XXS {
                &["blk.0.attn_q.weight"]
            } else {
                &["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
            };
            assert_eq!(names, want, "{}", f.name);
            let ty = |n: &str| p.rows.iter().find(|r| r.name == n).unwrap().choice.dtype;
            // token_embd Q2_K (IQ1/IQ2) or IQ3_S (IQ3_XXS), output Q5_K: neither needs an imatrix.
            assert_eq!(ty("output.weight"), DType::Q5K);
            assert!(!p.rows.iter().any(|r| r.name.contains("token_embd") && r.choice.requires_imatrix));
        }
        // IQ3_S needs none.
        let (_, p) = plan_quantize_gguf(&src, &opts(rules::IQ3_S, false)).unwrap();
        assert!(p.needs_imatrix.is_empty());
    }
}
