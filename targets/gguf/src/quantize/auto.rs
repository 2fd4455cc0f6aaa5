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
use sling_quantizers::alloc::{self, AllocError, Choice as AllocChoice};

use super::rules::{self, Ftype, TensorTypeRule, Why, FTYPES};
use super::QuantizePlan;
use crate::convert::run::read_f32;
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

/// The size asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Bytes of the file (tensor data and metadata).
    Bytes(u64),
    /// Bits per weight over every tensor's elements (as `sling plan` reports bpw).
    Bpw(f64),
}

#[derive(Debug, thiserror::Error)]
pub enum AutoError {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(
        "target {target} is below the smallest model these types can make, {min_bytes} bytes ({min_bpw:.3} bpw); \
         the unquantized model is {max_bytes} bytes ({max_bpw:.3} bpw)"
    )]
    TooSmall { target: String, min_bytes: u64, min_bpw: f64, max_bytes: u64, max_bpw: f64 },
    #[error(
        "target {target} is larger than the unquantized model, {max_bytes} bytes ({max_bpw:.3} bpw); the smallest \
         model these types can make is {min_bytes} bytes ({min_bpw:.3} bpw)"
    )]
    TooLarge { target: String, min_bytes: u64, min_bpw: f64, max_bytes: u64, max_bpw: f64 },
    #[error("tensor {0}: the measured error is not a finite number (NaN or Inf in the weights?)")]
    NonFinite(String),
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// One candidate type of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub dtype: DType,
    pub bytes: u64,
    /// Activation-weighted squared error of the tensor's output (routing-weighted over experts), on the rows
    /// measured.
    pub error: f64,
    /// `error / signal`: the inverse signal-to-noise ratio of the tensor's output.
    pub relative: f64,
    /// What the allocation minimises: `gain * relative`, the predicted KL divergence this tensor adds at this
    /// type (with measured gains), or `relative` alone.
    pub cost: f64,
}

/// What the sensitivity pass measured for one quantizable tensor.
#[derive(Clone, Debug)]
pub struct Measured {
    pub name: String,
    pub ne: Vec<u64>,
    pub role: Role,
    /// Activation-weighted energy of the tensor's output on the rows measured.
    pub signal: f64,
    /// Rows measured (of every expert together) and rows in all.
    pub rows_measured: u64,
    pub rows: u64,
    /// Whether importance weights (an imatrix entry) weighted the measurement.
    pub weighted: bool,
    /// Cheapest first; the last is the source type (no error).
    pub candidates: Vec<Candidate>,
    /// KL divergence per unit of relative error at the first probe, when measured ([`Sensitivity::set_gains`]).
    pub gain: Option<f64>,
    /// How KL grows with the relative error between the probes (`KL ∝ relative^exponent`; 1 with one probe).
    pub exponent: f64,
    /// The probes: type and the KL divergence the model showed with this tensor alone at that type.
    pub probes: Vec<(DType, f64)>,
}

/// The sensitivity pass's result: everything the allocation needs.
#[derive(Clone, Debug)]
pub struct Sensitivity {
    pub tensors: Vec<Measured>,
    /// Bytes of the tensors that are never quantized (norms, routers, 1-D tensors).
    pub kept_bytes: u64,
    /// Elements of every tensor (the bpw denominator).
    pub elements: u64,
    /// File bytes besides tensor data: header, metadata, alignment padding (an upper bound).
    pub overhead_bytes: u64,
}

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
            let mut v = Vec::new();
            let mut buf = Vec::new();
            let mut r = e * per_mat;
            while r < (e + 1) * per_mat {
                read_f32(ck, t, r, r + 1, &mut buf, backend)?;
                v.extend_from_slice(&buf);
                r += step;
            }
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
    let energy = |vals: &[f32], ew: &[f64]| -> f64 {
        vals.chunks_exact(cols as usize)
            .map(|r| r.iter().zip(ew).map(|(&x, &a)| a * (x as f64).powi(2)).sum::<f64>())
            .sum()
    };
    let signal: f64 = mats.iter().map(|(v, _, ew)| energy(v, ew)).sum::<f64>() * scale;
    let candidates = dtypes
        .par_iter()
        .map(|&d| {
            let mut error = 0.0;
            if d != row.from {
                for (v, qw, ew) in &mats {
                    let mut q = Vec::new();
                    backend.quantize_rows(d, v, cols as usize, *qw, &mut q).map_err(|e| kernel_error(t, e))?;
                    let mut back = Vec::new();
                    backend.dequantize(d, &q, &mut back).map_err(|e| kernel_error(t, e))?;
                    for (rv, rb) in v.chunks_exact(cols as usize).zip(back.chunks_exact(cols as usize)) {
                        error += rv
                            .iter()
                            .zip(rb)
                            .zip(ew)
                            .map(|((&x, &y), &a)| a * (x as f64 - y as f64).powi(2))
                            .sum::<f64>();
                    }
                }
                error *= scale;
            }
            let bytes = d.bytes_for(t.numel()).unwrap_or(u64::MAX);
            let relative = if signal > 0.0 { error / signal } else { 0.0 };
            Ok(Candidate { dtype: d, bytes, error, relative, cost: relative })
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

/// Relative error the gain probe aims for: large enough that its KL divergence stands far above rounding, small
/// enough to stay where KL grows in proportion to the error.
pub const PROBE_RELATIVE: f64 = 0.02;

impl Measured {
    /// The types to probe: the quantized type whose relative error is nearest (in ratio) to [`PROBE_RELATIVE`],
    /// and the cheapest type (where low-bit errors leave the proportional regime), when they differ.
    pub fn probe_types(&self) -> Vec<DType> {
        let q = self.candidates.len().saturating_sub(1);
        let mid = (0..q).filter(|&k| self.candidates[k].relative > 0.0).min_by(|&a, &b| {
            let d = |k: usize| (self.candidates[k].relative / PROBE_RELATIVE).ln().abs();
            d(a).total_cmp(&d(b)).then(a.cmp(&b))
        });
        let low = (0..q).filter(|&k| self.candidates[k].relative > 0.0).min_by_key(|&k| (self.candidates[k].bytes, k));
        let mut v: Vec<DType> = mid.into_iter().chain(low).map(|k| self.candidates[k].dtype).collect();
        v.dedup();
        v
    }
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
        backend.quantize_rows(dtype, row, cols, qw, &mut q).map_err(|e| kernel_error(t, e))?;
        backend.dequantize(dtype, &q, &mut back).map_err(|e| kernel_error(t, e))?;
        row.copy_from_slice(&back);
        Ok::<_, ConvertError>(())
    })?;
    Ok(v)
}

fn kernel_error(t: &crate::convert::OutTensor, e: sling_kernels::backend::KernelError) -> ConvertError {
    use sling_kernels::backend::KernelError;
    match e {
        KernelError::Encode(source) => ConvertError::Encode { tensor: t.name.clone(), source },
        KernelError::Device(source) => ConvertError::Device { tensor: t.name.clone(), source },
        KernelError::Encoding(source) => ConvertError::Encoding { tensor: t.name.clone(), source },
    }
}

/// The chosen types.
#[derive(Clone, Debug)]
pub struct Allocation {
    /// Per measured tensor (in [`Sensitivity::tensors`] order): the index of its chosen candidate.
    pub pick: Vec<usize>,
    /// What the budget allowed for the file, in bytes.
    pub budget_bytes: u64,
    /// The file size this allocation gives (an upper bound: alignment padding counted at its largest).
    pub file_bytes: u64,
    pub tensor_bytes: u64,
    pub bpw: f64,
    /// Summed cost (relative output error) of the allocation.
    pub cost: f64,
    /// The preset whose `general.file_type` the file carries: the one whose default type holds the most
    /// elements.
    pub base: Ftype,
}

impl Sensitivity {
    /// Sets each tensor's KL model from its probes (type, KL divergence; none: not probed) and makes every
    /// candidate's cost the KL it predicts: through the first probe `(relative0, kl0)`, proportional to the
    /// relative error below it, and `kl0 * (relative / relative0)^exponent` above it, the exponent fitted through
    /// the second probe (clamped to 0.5..4; 1 with one probe).
    /// Tensors without a probe take the median gain (KL per relative error) of those with one, exponent 1.
    pub fn set_gains(&mut self, probes: &[Vec<(DType, f64)>]) {
        let mut gains = Vec::new();
        for (m, p) in self.tensors.iter_mut().zip(probes) {
            m.probes = p.clone();
            let pts: Vec<(f64, f64)> = p
                .iter()
                .filter_map(|&(d, kl)| {
                    let rel = m.candidates.iter().find(|c| c.dtype == d)?.relative;
                    (rel > 0.0).then_some((rel, kl.max(0.0)))
                })
                .collect();
            let Some(&(r0, k0)) = pts.first() else { continue };
            m.gain = Some(k0 / r0);
            m.exponent = match pts.get(1) {
                Some(&(r1, k1)) if k0 > 0.0 && k1 > 0.0 && r1 != r0 => {
                    ((k1 / k0).ln() / (r1 / r0).ln()).clamp(0.5, 4.0)
                }
                _ => 1.0,
            };
            gains.push(k0 / r0);
        }
        gains.sort_by(f64::total_cmp);
        let median = gains.get(gains.len() / 2).copied().unwrap_or(1.0);
        for m in &mut self.tensors {
            let (r0, k0) = match (m.gain, m.probes.first()) {
                (Some(g), Some(&(d, _))) => {
                    let r0 = m.candidates.iter().find(|c| c.dtype == d).map_or(1.0, |c| c.relative);
                    (r0, g * r0)
                }
                _ => {
                    m.gain = Some(median);
                    (1.0, median)
                }
            };
            for c in &mut m.candidates {
                // Below the first probe, KL is proportional to the error (KL ≈ ½ δᵀFδ for small output changes δ,
                // and the relative error is the power of δ); above it, the fitted exponent.
                let x = c.relative / r0;
                c.cost = if x <= 1.0 { k0 * x } else { k0 * x.powf(m.exponent) };
            }
        }
    }

    fn tensor_bytes(&self, pick: &[usize]) -> u64 {
        self.kept_bytes + self.tensors.iter().zip(pick).map(|(m, &k)| m.candidates[k].bytes).sum::<u64>()
    }

    /// The smallest and the largest (every tensor at its source type) file these types can make.
    pub fn bounds(&self) -> (u64, u64) {
        let min = self.kept_bytes
            + self.tensors.iter().map(|m| m.candidates.iter().map(|c| c.bytes).min().unwrap_or(0)).sum::<u64>();
        let max =
            self.kept_bytes + self.tensors.iter().map(|m| m.candidates.last().map_or(0, |c| c.bytes)).sum::<u64>();
        (min + self.overhead_bytes, max + self.overhead_bytes)
    }

    fn bpw_of(&self, file_bytes: u64) -> f64 {
        (file_bytes.saturating_sub(self.overhead_bytes)) as f64 * 8.0 / self.elements.max(1) as f64
    }

    /// Chooses the types for `budget`.
    pub fn allocate(&self, budget: Budget) -> Result<Allocation, AutoError> {
        let (min, max) = self.bounds();
        let (budget_bytes, target) = match budget {
            Budget::Bytes(b) => (b, format!("{b} bytes")),
            // bpw counts tensor data only, like `sling plan`.
            Budget::Bpw(x) => {
                ((x * self.elements as f64 / 8.0).floor() as u64 + self.overhead_bytes, format!("{x} bpw"))
            }
        };
        let bounds = |target: String| (target, min, self.bpw_of(min), max, self.bpw_of(max));
        if budget_bytes < min {
            let (target, min_bytes, min_bpw, max_bytes, max_bpw) = bounds(target);
            return Err(AutoError::TooSmall { target, min_bytes, min_bpw, max_bytes, max_bpw });
        }
        if budget_bytes > max {
            let (target, min_bytes, min_bpw, max_bytes, max_bpw) = bounds(target);
            return Err(AutoError::TooLarge { target, min_bytes, min_bpw, max_bytes, max_bpw });
        }
        let items: Vec<Vec<AllocChoice>> = self
            .tensors
            .iter()
            .map(|m| m.candidates.iter().map(|c| AllocChoice { bytes: c.bytes, cost: c.cost }).collect())
            .collect();
        let pick = alloc::allocate(&items, budget_bytes - self.overhead_bytes - self.kept_bytes)?;
        let tensor_bytes = self.tensor_bytes(&pick);
        let file_bytes = tensor_bytes + self.overhead_bytes;
        Ok(Allocation {
            cost: alloc::total_cost(&items, &pick),
            base: self.base_of(&pick),
            pick,
            budget_bytes,
            file_bytes,
            tensor_bytes,
            bpw: self.bpw_of(file_bytes),
        })
    }

    fn base_of(&self, pick: &[usize]) -> Ftype {
        let mut by_type: Vec<(DType, u64)> = Vec::new();
        for (m, &k) in self.tensors.iter().zip(pick) {
            let d = m.candidates[k].dtype;
            let n: u64 = m.ne.iter().product();
            match by_type.iter_mut().find(|(t, _)| *t == d) {
                Some((_, c)) => *c += n,
                None => by_type.push((d, n)),
            }
        }
        // Most elements first; ties to the earlier tensor's type (deterministic).
        let top = by_type.iter().fold(None::<(DType, u64)>, |b, &(d, n)| match b {
            Some((_, bn)) if bn >= n => b,
            _ => Some((d, n)),
        });
        top.and_then(|(d, _)| FTYPES.iter().find(|f| f.default == d).copied()).unwrap_or(rules::Q8_0)
    }

    /// The allocation as `--tensor-type`-style rules, one anchored name per tensor.
    pub fn rules(&self, a: &Allocation) -> Vec<TensorTypeRule> {
        self.tensors
            .iter()
            .zip(&a.pick)
            .map(|(m, &k)| {
                let pattern = format!("^{}$", regex::escape(&m.name));
                TensorTypeRule {
                    pattern: format!("auto({})", m.name),
                    regex: regex::Regex::new(&pattern).expect("an escaped name is a valid regex"),
                    dtype: m.candidates[k].dtype,
                    role: None,
                    layers: None,
                }
            })
            .collect()
    }

    /// The allocation as a recipe file (`--recipe FILE` makes the same file again).
    pub fn recipe_toml(&self, a: &Allocation, description: &str) -> String {
        let mut s = String::new();
        s.push_str(
            "# Written by `sling quantize|plan --to gguf:auto`: one rule per quantized tensor, chosen from measured\n",
        );
        s.push_str("# sensitivities under a size budget. `sling quantize SRC --recipe THIS -o OUT.gguf` makes the same file.\n");
        s.push_str(&format!("base = {}\n", toml_str(a.base.name)));
        s.push_str(&format!("description = {}\n", toml_str(description)));
        for (m, &k) in self.tensors.iter().zip(&a.pick) {
            let c = &m.candidates[k];
            s.push_str("[[rule]]\n");
            s.push_str(&format!("name = {}\n", toml_str(&format!("^{}$", regex::escape(&m.name)))));
            s.push_str(&format!("type = {}\n", toml_str(c.dtype.name())));
        }
        s
    }
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
                .map(|&(dtype, r)| Candidate {
                    dtype,
                    bytes: dtype.bytes_for(n).unwrap(),
                    error: r,
                    relative: r,
                    cost: r,
                })
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
    fn gains_scale_costs_and_unprobed_tensors_take_the_median() {
        let mut s = sens();
        s.set_gains(&[vec![(DType::IQ2XXS, 0.2)], vec![]]);
        assert_eq!(s.tensors[0].gain, Some(2.0));
        assert_eq!(s.tensors[1].gain, Some(2.0));
        assert_eq!(s.tensors[0].candidates[1].cost, 2.0 * 0.005);
        assert_eq!(s.tensors[0].candidates[2].cost, 0.0);
        // Two probes: KL quadruples where the error doubles (exponent 2).
        let mut s = sens();
        s.tensors[0].candidates[1].relative = 0.05;
        s.set_gains(&[vec![(DType::Q4K, 0.01), (DType::IQ2XXS, 0.04)], vec![]]);
        assert!((s.tensors[0].exponent - 2.0).abs() < 1e-12);
        assert!((s.tensors[0].candidates[0].cost - 0.04).abs() < 1e-12);
        assert_eq!(s.tensors[1].exponent, 1.0);
    }

    #[test]
    fn allocation_fits_and_its_recipe_parses_back_to_the_same_rules() {
        let s = sens();
        let (min, max) = s.bounds();
        assert!(matches!(s.allocate(Budget::Bytes(min - 1)), Err(AutoError::TooSmall { .. })));
        assert!(matches!(s.allocate(Budget::Bytes(max + 1)), Err(AutoError::TooLarge { .. })));
        let e = s.allocate(Budget::Bpw(0.5)).unwrap_err().to_string();
        assert!(e.contains(&format!("{min} bytes")) && e.contains(&format!("{max} bytes")), "{e}");
        let a = s.allocate(Budget::Bytes(max)).unwrap();
        assert!(a.pick.iter().zip(&s.tensors).all(|(&k, m)| m.candidates[k].dtype == DType::BF16));
        // Room for the smaller tensor's upgrade to Q4_K only.
        let b = min + (DType::Q4K.bytes_for(256 * 256).unwrap() - DType::IQ2XXS.bytes_for(256 * 256).unwrap());
        let a = s.allocate(Budget::Bytes(b)).unwrap();
        assert!(a.file_bytes <= b);
        assert_eq!(a.pick, vec![1, 0]);
        assert_eq!(a.base, rules::IQ2_XXS, "the type holding the most elements names the file type");
        let text = s.recipe_toml(&a, "test \"quoted\" description");
        let r = Recipe::parse("auto", &text).unwrap();
        assert_eq!(r.base, a.base);
        assert_eq!(r.description, "test \"quoted\" description");
        let want = s.rules(&a);
        assert_eq!(r.rules.len(), want.len());
        for (got, want) in r.rules.iter().zip(&want) {
            assert_eq!((got.regex.as_str(), got.dtype), (want.regex.as_str(), want.dtype));
            for m in &s.tensors {
                assert_eq!(got.matches(&m.name), want.matches(&m.name));
            }
        }
    }
}
