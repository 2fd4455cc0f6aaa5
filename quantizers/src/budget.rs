//! The size-targeted allocation's model, whatever the encodings: each tensor's candidate encodings (a GGUF type,
//! an MLX bit width, …) with their size and measured output error, the KL divergence each error predicts once
//! probes have measured a few points (`set_gains`), and the choice under a budget ([`crate::alloc`]). Targets
//! measure; this turns measurements into a choice (docs/quantization.md, "Quantize to a size target").
//!
//! The error of a candidate is measured on the tensor's *output*: `Σ_j a_j (w_j - ŵ_j)²` per row, with `a_j` the
//! mean squared input activation of column `j` (an imatrix's `in_sum2 / count`), routing-weighted per expert;
//! the cost the allocation minimises is that error relative to the output's energy `Σ_j a_j w_j²`
//! ([`weighted_error`], [`energy`]), scaled to KL by the probes.

use sling_core::Role;

use crate::alloc::{self, AllocError, Choice};

/// The size asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Bytes of the artifact (tensor data and the container's overhead).
    Bytes(u64),
    /// Bits per weight over every tensor's elements (as `sling plan` reports bpw).
    Bpw(f64),
}

/// Why a budget cannot be met.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
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
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// One candidate encoding `K` of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<K> {
    pub kind: K,
    pub bytes: u64,
    /// Activation-weighted squared error of the tensor's output (routing-weighted over experts), on the rows
    /// measured.
    pub error: f64,
    /// `error / signal`: the inverse signal-to-noise ratio of the tensor's output.
    pub relative: f64,
    /// What the allocation minimises: the predicted KL divergence this tensor adds with this candidate (with
    /// measured gains), or `relative` alone.
    pub cost: f64,
}

/// What the sensitivity pass measured for one quantizable tensor.
#[derive(Clone, Debug)]
pub struct Measured<K> {
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
    /// Cheapest first; the last is the source precision (no error).
    pub candidates: Vec<Candidate<K>>,
    /// KL divergence per unit of relative error at the first probe, when measured ([`Sensitivity::set_gains`]).
    pub gain: Option<f64>,
    /// How KL grows with the relative error between the probes (`KL ∝ relative^exponent`; 1 with one probe).
    pub exponent: f64,
    /// The probes: candidate and the KL divergence the model showed with this tensor alone so encoded.
    pub probes: Vec<(K, f64)>,
}

/// The measurements of every quantizable tensor: everything the allocation needs.
#[derive(Clone, Debug)]
pub struct Sensitivity<K> {
    pub tensors: Vec<Measured<K>>,
    /// Bytes of the tensors whose encoding is not chosen (norms, routers, 1-D tensors).
    pub kept_bytes: u64,
    /// Elements of every tensor (the bpw denominator).
    pub elements: u64,
    /// Artifact bytes besides tensor data: headers, metadata, alignment padding (an upper bound).
    pub overhead_bytes: u64,
}

/// The chosen candidates.
#[derive(Clone, Debug)]
pub struct Allocation {
    /// Per measured tensor (in [`Sensitivity::tensors`] order): the index of its chosen candidate.
    pub pick: Vec<usize>,
    /// What the budget allowed for the artifact, in bytes.
    pub budget_bytes: u64,
    /// The artifact size this allocation gives (an upper bound where the overhead is one).
    pub file_bytes: u64,
    pub tensor_bytes: u64,
    pub bpw: f64,
    /// Summed cost of the allocation (predicted KL with probes; relative output error without).
    pub cost: f64,
}

/// Relative error the gain probe aims for: large enough that its KL divergence stands far above rounding, small
/// enough to stay where KL grows in proportion to the error.
pub const PROBE_RELATIVE: f64 = 0.02;

/// `Σ_rows Σ_j a_j x_j²` over rows of `cols`.
pub fn energy(vals: &[f32], ew: &[f64], cols: usize) -> f64 {
    vals.chunks_exact(cols.max(1)).map(|r| r.iter().zip(ew).map(|(&x, &a)| a * (x as f64).powi(2)).sum::<f64>()).sum()
}

/// `Σ_rows Σ_j a_j (x_j - y_j)²` over rows of `cols`.
pub fn weighted_error(x: &[f32], y: &[f32], ew: &[f64], cols: usize) -> f64 {
    x.chunks_exact(cols.max(1))
        .zip(y.chunks_exact(cols.max(1)))
        .map(|(rx, ry)| rx.iter().zip(ry).zip(ew).map(|((&a, &b), &w)| w * (a as f64 - b as f64).powi(2)).sum::<f64>())
        .sum()
}

/// Every `step`-th row of `r0..r1` (rows of `cols`), read through `read(a, b, out)` (which replaces `out` with rows
/// `a..b`) one row at a time when `block` is 1, else `block` rows at a time: where a source must make a whole block
/// to give one row (a transposed expert), each block is made once, not once per sampled row.
pub fn sample_rows<E>(
    r0: u64,
    r1: u64,
    step: u64,
    block: u64,
    cols: u64,
    mut read: impl FnMut(u64, u64, &mut Vec<f32>) -> Result<(), E>,
) -> Result<Vec<f32>, E> {
    let (mut v, mut buf) = (Vec::new(), Vec::new());
    let mut b = r0;
    while b < r1 {
        let end = if block <= 1 { b + 1 } else { r1.min(b + block) };
        buf.clear();
        read(b, end, &mut buf)?;
        for r in (b..end).filter(|r| (r - r0) % step.max(1) == 0) {
            let i = ((r - b) * cols) as usize;
            v.extend_from_slice(&buf[i..i + cols as usize]);
        }
        b = if block <= 1 { b + step.max(1) } else { end };
    }
    Ok(v)
}

impl<K: Copy + PartialEq> Measured<K> {
    /// The candidates to probe: the one whose relative error is nearest (in ratio) to [`PROBE_RELATIVE`], and the
    /// cheapest (where low-bit errors leave the proportional regime), when they differ.
    pub fn probe_kinds(&self) -> Vec<K> {
        let q = self.candidates.len().saturating_sub(1);
        let mid = (0..q).filter(|&k| self.candidates[k].relative > 0.0).min_by(|&a, &b| {
            let d = |k: usize| (self.candidates[k].relative / PROBE_RELATIVE).ln().abs();
            d(a).total_cmp(&d(b)).then(a.cmp(&b))
        });
        let low = (0..q).filter(|&k| self.candidates[k].relative > 0.0).min_by_key(|&k| (self.candidates[k].bytes, k));
        let mut v: Vec<K> = mid.into_iter().chain(low).map(|k| self.candidates[k].kind).collect();
        v.dedup();
        v
    }
}

impl<K: Copy + PartialEq> Sensitivity<K> {
    /// Sets each tensor's KL model from its probes (candidate, KL divergence; none: not probed) and makes every
    /// candidate's cost the KL it predicts: through the first probe `(relative0, kl0)`, proportional to the
    /// relative error below it, and `kl0 * (relative / relative0)^exponent` above it, the exponent fitted through
    /// the second probe (clamped to 0.5..4; 1 with one probe).
    /// Tensors without a probe take the median gain (KL per relative error) of those with one, exponent 1.
    pub fn set_gains(&mut self, probes: &[Vec<(K, f64)>]) {
        let mut gains = Vec::new();
        for (m, p) in self.tensors.iter_mut().zip(probes) {
            m.probes = p.clone();
            let pts: Vec<(f64, f64)> = p
                .iter()
                .filter_map(|&(d, kl)| {
                    let rel = m.candidates.iter().find(|c| c.kind == d)?.relative;
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
                    let r0 = m.candidates.iter().find(|c| c.kind == d).map_or(1.0, |c| c.relative);
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

    /// The smallest and the largest (every tensor at its source precision) artifact these candidates can make.
    pub fn bounds(&self) -> (u64, u64) {
        let min = self.kept_bytes
            + self.tensors.iter().map(|m| m.candidates.iter().map(|c| c.bytes).min().unwrap_or(0)).sum::<u64>();
        let max =
            self.kept_bytes + self.tensors.iter().map(|m| m.candidates.last().map_or(0, |c| c.bytes)).sum::<u64>();
        (min + self.overhead_bytes, max + self.overhead_bytes)
    }

    /// Bits per weight of an artifact of `file_bytes` (tensor data only, like `sling plan`).
    pub fn bpw_of(&self, file_bytes: u64) -> f64 {
        (file_bytes.saturating_sub(self.overhead_bytes)) as f64 * 8.0 / self.elements.max(1) as f64
    }

    /// Chooses the candidates for `budget`.
    pub fn allocate(&self, budget: Budget) -> Result<Allocation, BudgetError> {
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
            return Err(BudgetError::TooSmall { target, min_bytes, min_bpw, max_bytes, max_bpw });
        }
        if budget_bytes > max {
            let (target, min_bytes, min_bpw, max_bytes, max_bpw) = bounds(target);
            return Err(BudgetError::TooLarge { target, min_bytes, min_bpw, max_bytes, max_bpw });
        }
        let items: Vec<Vec<Choice>> = self
            .tensors
            .iter()
            .map(|m| m.candidates.iter().map(|c| Choice { bytes: c.bytes, cost: c.cost }).collect())
            .collect();
        let pick = alloc::allocate(&items, budget_bytes - self.overhead_bytes - self.kept_bytes)?;
        let tensor_bytes = self.tensor_bytes(&pick);
        let file_bytes = tensor_bytes + self.overhead_bytes;
        Ok(Allocation {
            cost: alloc::total_cost(&items, &pick),
            pick,
            budget_bytes,
            file_bytes,
            tensor_bytes,
            bpw: self.bpw_of(file_bytes),
        })
    }

    /// The chosen candidate (among those `counts` accepts) holding the most elements; ties to the earlier tensor's.
    pub fn dominant(&self, a: &Allocation, counts: impl Fn(K) -> bool) -> Option<K> {
        let mut by_kind: Vec<(K, u64)> = Vec::new();
        for (m, c) in self.chosen(a).filter(|(_, c)| counts(c.kind)) {
            let n = m.ne.iter().product::<u64>();
            match by_kind.iter_mut().find(|(k, _)| *k == c.kind) {
                Some((_, t)) => *t += n,
                None => by_kind.push((c.kind, n)),
            }
        }
        let top = by_kind.iter().fold(None::<(K, u64)>, |b, &(k, n)| match b {
            Some((_, bn)) if bn >= n => b,
            _ => Some((k, n)),
        });
        top.map(|(k, _)| k)
    }

    /// The chosen candidate of each tensor, in [`Sensitivity::tensors`] order.
    pub fn chosen<'s>(&'s self, a: &'s Allocation) -> impl Iterator<Item = (&'s Measured<K>, &'s Candidate<K>)> + 's {
        self.tensors.iter().zip(&a.pick).map(|(m, &k)| (m, &m.candidates[k]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three candidates: 1 byte per element (relative error 0.1), 2 bytes (0.005), the source's 4 bytes (0).
    fn measured(name: &str, n: u64) -> Measured<u32> {
        let c = |kind: u32, per: u64, r: f64| Candidate { kind, bytes: per * n, error: r, relative: r, cost: r };
        Measured {
            name: name.into(),
            ne: vec![n],
            role: Role::Other,
            signal: 1.0,
            rows_measured: 1,
            rows: 1,
            weighted: true,
            candidates: vec![c(2, 1, 0.1), c(4, 2, 0.005), c(16, 4, 0.0)],
            gain: None,
            exponent: 1.0,
            probes: Vec::new(),
        }
    }

    fn sens() -> Sensitivity<u32> {
        Sensitivity {
            tensors: vec![measured("a", 100), measured("b", 400)],
            kept_bytes: 10,
            elements: 520,
            overhead_bytes: 5,
        }
    }

    #[test]
    fn gains_scale_costs_and_unprobed_tensors_take_the_median() {
        let mut s = sens();
        s.set_gains(&[vec![(2, 0.2)], vec![]]);
        assert_eq!(s.tensors[0].gain, Some(2.0));
        assert_eq!(s.tensors[1].gain, Some(2.0));
        assert_eq!(s.tensors[0].candidates[1].cost, 2.0 * 0.005);
        assert_eq!(s.tensors[0].candidates[2].cost, 0.0);
        // Two probes: KL quadruples where the error doubles (exponent 2).
        let mut s = sens();
        s.tensors[0].candidates[1].relative = 0.05;
        s.set_gains(&[vec![(4, 0.01), (2, 0.04)], vec![]]);
        assert!((s.tensors[0].exponent - 2.0).abs() < 1e-12);
        assert!((s.tensors[0].candidates[0].cost - 0.04).abs() < 1e-12);
        assert_eq!(s.tensors[1].exponent, 1.0);
    }

    #[test]
    fn allocation_fits_and_names_the_bounds_it_cannot_meet() {
        let s = sens();
        let (min, max) = s.bounds();
        assert_eq!((min, max), (10 + 500 + 5, 10 + 2000 + 5));
        assert!(matches!(s.allocate(Budget::Bytes(min - 1)), Err(BudgetError::TooSmall { .. })));
        assert!(matches!(s.allocate(Budget::Bytes(max + 1)), Err(BudgetError::TooLarge { .. })));
        let e = s.allocate(Budget::Bpw(0.5)).unwrap_err().to_string();
        assert!(e.contains(&format!("{min} bytes")) && e.contains(&format!("{max} bytes")), "{e}");
        assert_eq!(s.allocate(Budget::Bytes(max)).unwrap().pick, vec![2, 2]);
        // Room for the smaller tensor's upgrade only.
        let a = s.allocate(Budget::Bytes(min + 100)).unwrap();
        assert_eq!(a.pick, vec![1, 0]);
        assert!(a.file_bytes <= min + 100);
        assert_eq!(s.chosen(&a).map(|(m, c)| (m.name.as_str(), c.kind)).collect::<Vec<_>>(), [("a", 4), ("b", 2)]);
        assert_eq!(s.dominant(&a, |_| true), Some(2), "b holds more elements");
        assert_eq!(s.dominant(&a, |k| k != 2), Some(4));
    }

    #[test]
    fn probes_aim_at_the_probe_error_and_the_cheapest() {
        let m = measured("a", 10);
        assert_eq!(m.probe_kinds(), vec![4, 2]);
        let (x, y) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 1.0, 3.0, 5.0]);
        assert_eq!(energy(&x, &[1.0, 2.0], 2), 1.0 + 8.0 + 9.0 + 32.0);
        assert_eq!(weighted_error(&x, &y, &[1.0, 2.0], 2), 2.0 + 2.0);
        // Rows 0, 3, 6 of 0..8 (rows of 2), read one at a time or in blocks of 4: the same rows.
        let src: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let read = |a: u64, b: u64, out: &mut Vec<f32>| -> Result<(), ()> {
            out.clear();
            out.extend_from_slice(&src[a as usize * 2..b as usize * 2]);
            Ok(())
        };
        let want = vec![0.0, 1.0, 6.0, 7.0, 12.0, 13.0];
        assert_eq!(sample_rows(0, 8, 3, 1, 2, read).unwrap(), want);
        assert_eq!(sample_rows(0, 8, 3, 4, 2, read).unwrap(), want);
    }
}
