//! `--to gguf:auto --target-size SIZE` / `--target-bpw X`: every quantizable tensor's type chosen under a size
//! budget from measured sensitivities (docs/quantization.md, "Quantize to a size target").
//!
//! For each tensor and each candidate type its block size allows, the tensor's rows are quantized as the real run
//! would (same quantizer, same importance weights) and the error is measured where it matters: on the tensor's
//! *output*, `Σ_j a_j (w_j - ŵ_j)²` per row with `a_j` the mean squared input activation of column `j` (the
//! imatrix: llama-imatrix's or `sling calibrate`'s `in_sum2 / count`). For stacked experts each expert's error is
//! weighted by how often calibration routed tokens to it (`count_e / tokens`), so rarely used experts cost less.
//! GGUF stores one type per stacked expert tensor, so the choice is per tensor, never per expert. The cost of a
//! type is that error relative to the tensor's output energy (`Σ_j a_j w_j²`, the same weighting), i.e. the
//! inverse signal-to-noise ratio of the tensor's output; the allocation minimises the summed cost under the
//! budget ([`sling_quantizers::alloc`]).
//!
//! Large tensors are measured on a deterministic sample of rows (every `k`-th row of each expert), so the pass
//! costs a bounded fraction of the quantization itself.

use rayon::prelude::*;
use sling_core::{DType, Role};
use sling_formats::checkpoint::Checkpoint;
use sling_kernels::backend::Backend;
use sling_pipeline::ops::Op;
use sling_quantizers::budget::{self, BudgetError};
pub use sling_quantizers::budget::{Allocation, Budget};

use super::rules::{self, Ftype, TensorTypeRule, Why, FTYPES};
use super::QuantizePlan;
use crate::convert::run::{kernel_error, read_f32};
use crate::convert::ConvertError;

/// The ladder of candidate types for tensors whose rows are a multiple of 256, cheapest first.
pub const LADDER_256: &[DType] = &[
    DType::IQ1S,
    DType::IQ1M,
    DType::IQ2XXS,
    DType::IQ2XS,
    DType::IQ2S,
    DType::IQ3XXS,
    DType::IQ3S,
    DType::Q2K,
    DType::Q3K,
    DType::IQ4XS,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::Q8_0,
];

/// The ladder for rows that are a multiple of 32 only (e.g. 128-wide expert down-projections, gpt-oss's 2880).
pub const LADDER_32: &[DType] = &[DType::IQ4NL, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0];

/// Rows measured per expert (or per 2-D tensor) at most; the rest are skipped at an even stride.
pub const DEFAULT_SAMPLE_ROWS: u64 = 64;

/// Rows per expert (or 2-D tensor) a sensitivity probe quantizes at most ([`roundtrip`]).
pub const DEFAULT_PROBE_ROWS: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum AutoError {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("tensor {0}: the measured error is not a finite number (NaN or Inf in the weights?)")]
    NonFinite(String),
}

/// One candidate type of one tensor.
pub type Candidate = budget::Candidate<DType>;
/// What the sensitivity pass measured for one quantizable tensor.
pub type Measured = budget::Measured<DType>;
/// The sensitivity pass's result: everything the allocation needs.
pub type Sensitivity = budget::Sensitivity<DType>;

/// Measures every quantizable tensor of `plan` (planned with every quantizable tensor rewritten, e.g. `Q8_0
/// --pure`, so each carries its importance weights) at every type of its ladder. `has_imatrix`: whether types
/// that need an imatrix may be candidates (a tensor without importance weights never gets one).
pub fn measure(
    ck: &Checkpoint,
    plan: &QuantizePlan,
    overhead_bytes: u64,
    sample_rows: u64,
    backend: &dyn Backend,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<Sensitivity, AutoError> {
    let tokens = plan
        .rows
        .iter()
        .filter_map(|r| r.imatrix_counts.as_ref())
        .flat_map(|c| c.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut kept_bytes = 0;
    let mut elements = 0;
    let mut tensors = Vec::new();
    let quantizable: Vec<usize> = (0..plan.rows.len()).filter(|&i| plan.rows[i].choice.why != Why::Kept).collect();
    for row in &plan.rows {
        elements += row.ne.iter().product::<u64>();
        if row.choice.why == Why::Kept {
            kept_bytes += row.bytes;
        }
    }
    for (k, &i) in quantizable.iter().enumerate() {
        let row = &plan.rows[i];
        let t = &plan.prepared.tensors[i];
        debug_assert_eq!(t.name, row.name);
        progress(k, quantizable.len(), &row.name);
        tensors.push(measure_tensor(ck, t, row, tokens, sample_rows, backend)?);
        // Only the sampled rows were needed: drop the mapped pages (memory stays bounded by a tensor).
        ck.release_pages();
    }
    progress(quantizable.len(), quantizable.len(), "");
    Ok(Sensitivity { tensors, kept_bytes, elements, overhead_bytes })
}

/// The candidate types of a tensor with rows of `ne0`, and whether it has importance weights.
pub fn ladder(name: &str, ne0: u64, from: DType, weighted: bool) -> Vec<DType> {
    let base: &[DType] = if ne0 % 256 == 0 {
        LADDER_256
    } else if ne0 % 32 == 0 {
        LADDER_32
    } else {
        &[]
    };
    let mut v: Vec<DType> = base
        .iter()
        .copied()
        // Without importance weights: neither what llama-quantize refuses nor what ggml cannot quantize.
        .filter(|&d| {
            weighted || !(rules::requires_imatrix(name, d, rules::Q8_0) || sling_quantizers::requires_imatrix(d))
        })
        .filter(|&d| d.bytes_for(ne0).is_some_and(|b| from.bytes_for(ne0).is_none_or(|f| b < f)))
        .collect();
    v.push(from);
    v
}

/// One matrix's sampled rows, the quantizer's importance weights and the error weights (`a_j`, routing-weighted).
type Sampled<'w> = (Vec<f32>, Option<&'w [f32]>, Vec<f64>);

fn measure_tensor(
    ck: &Checkpoint,
    t: &crate::convert::OutTensor,
    row: &super::PlannedTensor,
    tokens: f64,
    sample_rows: u64,
    backend: &dyn Backend,
) -> Result<Measured, AutoError> {
    let cols = t.ne[0];
    let n_mat = t.ne.get(2).copied().unwrap_or(1).max(1);
    let per_mat = t.rows() / n_mat;
    let step = per_mat.div_ceil(sample_rows.max(1)).max(1);
    let weighted = t.weights.is_some();
    // The output is measured as a token sees it: an embedding row is one token's output.
    let is_embd = Role::of(&t.name) == Role::Embeddings;
    let dtypes = ladder(&t.name, cols, row.from, weighted);
    // Per matrix: its sampled values, its quantizer weights and its error weights.
    let mats: Vec<Sampled> = (0..n_mat)
        .into_par_iter()
        .map(|e| {
            let block = match &t.op {
                Op::Mxfp4(_) | Op::Gguf(_) => 1,
                op => op.granule() / cols.max(1),
            };
            let v = budget::sample_rows(e * per_mat, (e + 1) * per_mat, step, block, cols, |a, b, out| {
                read_f32(ck, t, a, b, out, backend)
            })?;
            let qw = t.weights.as_deref().map(|w| &w[(e * cols) as usize..((e + 1) * cols) as usize]);
            let freq = match &row.imatrix_counts {
                Some(c) if c.len() as u64 == n_mat => (c[e as usize].max(1)) as f64 / tokens,
                _ => 1.0,
            };
            let ew: Vec<f64> = match qw {
                Some(w) => w.iter().map(|&a| a as f64 * freq).collect(),
                None => vec![if is_embd { 1.0 / per_mat as f64 } else { 1.0 }; cols as usize],
            };
            Ok((v, qw, ew))
        })
        .collect::<Result<_, ConvertError>>()?;
    let scale = per_mat as f64 / per_mat.div_ceil(step) as f64;
    let signal: f64 = mats.iter().map(|(v, _, ew)| budget::energy(v, ew, cols as usize)).sum::<f64>() * scale;
    let candidates = dtypes
        .par_iter()
        .map(|&d| {
            let mut error = 0.0;
            if d != row.from {
                for (v, qw, ew) in &mats {
                    let mut q = Vec::new();
                    backend.quantize_rows(d, v, cols as usize, *qw, &mut q).map_err(|e| kernel_error(&t.name, e))?;
                    let mut back = Vec::new();
                    backend.dequantize(d, &q, &mut back).map_err(|e| kernel_error(&t.name, e))?;
                    error += budget::weighted_error(v, &back, ew, cols as usize);
                }
                error *= scale;
            }
            let bytes = d.bytes_for(t.numel()).unwrap_or(u64::MAX);
            let relative = if signal > 0.0 { error / signal } else { 0.0 };
            Ok(Candidate { kind: d, bytes, error, relative, cost: relative })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    if candidates.iter().any(|c| !c.cost.is_finite()) || !signal.is_finite() {
        return Err(AutoError::NonFinite(t.name.clone()));
    }
    Ok(Measured {
        name: t.name.clone(),
        ne: t.ne.clone(),
        role: Role::of(&t.name),
        signal,
        rows_measured: n_mat * per_mat.div_ceil(step),
        rows: t.rows(),
        weighted,
        candidates,
        gain: None,
        exponent: 1.0,
        probes: Vec::new(),
    })
}

/// The stride of a probe's quantized rows: every `k`-th row of each expert, at most `sample_rows` of each.
fn probe_step(t: &crate::convert::OutTensor, sample_rows: u64) -> (u64, u64) {
    let n_mat = t.ne.get(2).copied().unwrap_or(1).max(1);
    let per_mat = (t.rows() / n_mat).max(1);
    (per_mat, per_mat.div_ceil(sample_rows.max(1)).max(1))
}

/// The fraction of `t`'s rows that [`roundtrip`] quantizes with `sample_rows`.
pub fn probe_fraction(t: &crate::convert::OutTensor, sample_rows: u64) -> f64 {
    let (per_mat, step) = probe_step(t, sample_rows);
    per_mat.div_ceil(step) as f64 / per_mat as f64
}

/// Rows `r0..r1` of `t` with every `k`-th row of each expert (at most `sample_rows` of each; the fraction is
/// [`probe_fraction`]) quantized as `dtype` (with its importance weights) and dequantized, the other rows as they
/// are. What a probe substitutes for the tensor: in the regime where KL is proportional to the error's power, the
/// probe's KL divided by that fraction is the whole tensor's, at a fraction of the cost of quantizing all of it.
/// By row range, so that a probe holds one source tensor's rows (an expert's, for per-expert checkpoints) at a
/// time. (Rows are read as the quantizer reads them, rounded through the intermediate type: the identity for bf16
/// checkpoints, and an error some 10⁴ times below a probe's for f32.)
pub fn roundtrip(
    ck: &Checkpoint,
    t: &crate::convert::OutTensor,
    dtype: DType,
    sample_rows: u64,
    r0: u64,
    r1: u64,
    backend: &dyn Backend,
) -> Result<Vec<f32>, ConvertError> {
    let cols = t.ne[0] as usize;
    let (per_mat, step) = probe_step(t, sample_rows);
    let mut v = Vec::new();
    read_f32(ck, t, r0, r1, &mut v, backend)?;
    let picked: Vec<(u64, &mut [f32])> = v
        .chunks_exact_mut(cols)
        .enumerate()
        .map(|(i, row)| (r0 + i as u64, row))
        .filter(|(r, _)| (r % per_mat) % step == 0)
        .collect();
    picked.into_par_iter().try_for_each(|(r, row)| {
        let e = (r / per_mat) as usize;
        let qw = t.weights.as_deref().map(|w| &w[e * cols..(e + 1) * cols]);
        let (mut q, mut back) = (Vec::new(), Vec::new());
        backend.quantize_rows(dtype, row, cols, qw, &mut q).map_err(|e| kernel_error(&t.name, e))?;
        backend.dequantize(dtype, &q, &mut back).map_err(|e| kernel_error(&t.name, e))?;
        row.copy_from_slice(&back);
        Ok::<_, ConvertError>(())
    })?;
    Ok(v)
}

/// The preset whose `general.file_type` the file carries: the one whose default type holds the most elements.
pub fn base_of(s: &Sensitivity, a: &Allocation) -> Ftype {
    s.dominant(a, |_| true).and_then(|d| FTYPES.iter().find(|f| f.default == d).copied()).unwrap_or(rules::Q8_0)
}

/// The allocation as `--tensor-type`-style rules, one anchored name per tensor.
pub fn rules(s: &Sensitivity, a: &Allocation) -> Vec<TensorTypeRule> {
    s.chosen(a)
        .map(|(m, c)| {
            let pattern = format!("^{}$", regex::escape(&m.name));
            TensorTypeRule {
                pattern: format!("auto({})", m.name),
                regex: regex::Regex::new(&pattern).expect("an escaped name is a valid regex"),
                dtype: c.kind,
                role: None,
                layers: None,
            }
        })
        .collect()
}

/// The allocation as a recipe file (`--recipe FILE` makes the same file again).
pub fn recipe_toml(sens: &Sensitivity, a: &Allocation, description: &str) -> String {
    let mut s = String::new();
    s.push_str(
        "# Written by `sling quantize|plan --to gguf:auto`: one rule per quantized tensor, chosen from measured\n",
    );
    s.push_str(
        "# sensitivities under a size budget. `sling quantize SRC --recipe THIS -o OUT.gguf` makes the same file.\n",
    );
    s.push_str(&format!("base = {}\n", toml_str(base_of(sens, a).name)));
    s.push_str(&format!("description = {}\n", toml_str(description)));
    for (m, c) in sens.chosen(a) {
        s.push_str("[[rule]]\n");
        s.push_str(&format!("name = {}\n", toml_str(&format!("^{}$", regex::escape(&m.name)))));
        s.push_str(&format!("type = {}\n", toml_str(c.kind.name())));
    }
    s
}

fn toml_str(s: &str) -> String {
    // TOML basic strings: escape backslash and quote (names and descriptions hold no control characters).
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::Recipe;

    fn measured(name: &str, ne: Vec<u64>, rel: &[(DType, f64)]) -> Measured {
        let n: u64 = ne.iter().product();
        Measured {
            name: name.into(),
            role: Role::of(name),
            signal: 1.0,
            rows_measured: 1,
            rows: 1,
            weighted: true,
            candidates: rel
                .iter()
                .map(|&(kind, r)| Candidate { kind, bytes: kind.bytes_for(n).unwrap(), error: r, relative: r, cost: r })
                .collect(),
            ne,
            gain: None,
            exponent: 1.0,
            probes: Vec::new(),
        }
    }

    fn sens() -> Sensitivity {
        let ladder = [(DType::IQ2XXS, 0.1), (DType::Q4K, 0.005), (DType::BF16, 0.0)];
        Sensitivity {
            tensors: vec![
                measured("blk.0.attn_q.weight", vec![256, 256], &ladder),
                measured("blk.0.ffn_up_exps.weight", vec![256, 128, 8], &ladder),
            ],
            kept_bytes: 1000,
            elements: 256 * 256 + 256 * 128 * 8 + 250,
            overhead_bytes: 500,
        }
    }

    #[test]
    fn ladders_fit_the_rows_and_the_imatrix() {
        let l = ladder("blk.0.ffn_up_exps.weight", 256, DType::BF16, true);
        assert_eq!(l.first(), Some(&DType::IQ1S));
        assert_eq!(l.last(), Some(&DType::BF16));
        // Without importance weights: nothing llama-quantize refuses or ggml cannot make.
        let l = ladder("blk.0.ffn_up_exps.weight", 256, DType::BF16, false);
        assert!(!l.iter().any(|d| matches!(
            d,
            DType::IQ1S | DType::IQ1M | DType::IQ2XXS | DType::IQ2XS | DType::IQ2S | DType::IQ3XXS
        )));
        let l = ladder("output.weight", 256, DType::BF16, false);
        assert!(l.contains(&DType::IQ1M) && !l.contains(&DType::IQ1S), "{l:?}");
        // 128-wide rows: the 32-element block types; 100-wide: only the source type.
        assert_eq!(ladder("blk.0.ffn_down_exps.weight", 128, DType::BF16, true)[0], DType::IQ4NL);
        assert_eq!(ladder("blk.0.ffn_down_exps.weight", 100, DType::BF16, true), vec![DType::BF16]);
    }

    #[test]
    fn allocation_fits_and_its_recipe_parses_back_to_the_same_rules() {
        let s = sens();
        let (min, max) = s.bounds();
        assert!(s.allocate(Budget::Bytes(min - 1)).is_err());
        let a = s.allocate(Budget::Bytes(max)).unwrap();
        assert!(s.chosen(&a).all(|(_, c)| c.kind == DType::BF16));
        // Room for the smaller tensor's upgrade to Q4_K only.
        let b = min + (DType::Q4K.bytes_for(256 * 256).unwrap() - DType::IQ2XXS.bytes_for(256 * 256).unwrap());
        let a = s.allocate(Budget::Bytes(b)).unwrap();
        assert!(a.file_bytes <= b);
        assert_eq!(a.pick, vec![1, 0]);
        assert_eq!(base_of(&s, &a), rules::IQ2_XXS, "the type holding the most elements names the file type");
        let text = recipe_toml(&s, &a, "test \"quoted\" description");
        let r = Recipe::parse("auto", &text).unwrap();
        assert_eq!(r.base, base_of(&s, &a));
        assert_eq!(r.description, "test \"quoted\" description");
        let want = rules(&s, &a);
        assert_eq!(r.rules.len(), want.len());
        for (got, want) in r.rules.iter().zip(&want) {
            assert_eq!((got.regex.as_str(), got.dtype), (want.regex.as_str(), want.dtype));
            for m in &s.tensors {
                assert_eq!(got.matches(&m.name), want.matches(&m.name));
            }
        }
    }
}
