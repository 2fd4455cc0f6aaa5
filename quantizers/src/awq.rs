//! AWQ (Lin et al., 2023, <https://arxiv.org/abs/2306.00978>) scale search as llm-compressor 0.14 runs it
//! (`modifiers/transform/awq/base.py`: `_compute_best_scale`, `_compute_layer_means`,
//! `_get_grid_search_params`, `_apply_smoothing`): maths on slices, no I/O.
//!
//! AWQ picks one positive scale `s_j` per input channel `j` of a group of *balance* layers (e.g. q/k/v_proj)
//! that read the same input. The balance weights become `W·diag(s)` ([`scaled`]) and the layer that produces
//! their input (the *smooth* layer: an RMSNorm weight, or the rows of a previous linear) is divided by `s`
//! (`_apply_smoothing`: `module.weight.div_(scales)` for a 1-D norm weight and its bias,
//! `weight[-len(s):].div_(s.view(-1, 1))` for a linear's last output rows), so the unquantized model computes
//! the same function, while quantization of `W·s` loses less on the channels with large activations.
//!
//! # The loss (a deliberate difference from llm-compressor)
//!
//! llm-compressor scores each grid point by re-running the parent module on the cached calibration batches and
//! taking the MSE of its output against the unquantized output. Here the score is the layer-wise proxy
//!
//! `L(s) = Σ_i weight_i · tr(ΔW_i H_i ΔW_iᵀ)`, `ΔW_i = W_i − Q(W_i·s)/s`,
//!
//! where `Q` is [`crate::gptq::rtn`] on the balance layer's [`Grid`] (dequantized values, the grid's parameters
//! recomputed from `W_i·s` as llm-compressor's `memoryless_minmax` observer does) and `H_i` is (a positive
//! multiple of) `XᵀX` of the layer's inputs. For one linear layer this is exactly `‖ΔW X‖²`, the output error
//! llm-compressor measures when the parent is that linear; for a parent that is a whole block (attention, MLP)
//! it ignores the non-linear interactions between the balance layers. All in `f64`, with faer's sequential
//! kernels (`Par::Seq`), so the result does not depend on the number of threads.
//!
//! The search never returns scales worse than plain RTN: if no grid point beats `s = 1` (which the default grid
//! contains as its first point, `(0.0, false)`), [`search`] returns `s = 1`, ratio 0, `duo = false`.

use crate::gptq::{rtn, GptqError, Grid};

/// One balance layer: a weight that reads the smoothed input.
#[derive(Clone, Copy)]
pub struct Balance<'a> {
    /// Row-major `rows × cols` weight (`cols` = the number of input channels = `x_mean.len()`).
    pub w: &'a [f32],
    pub rows: usize,
    /// The grid the layer will be quantized to (RTN).
    pub grid: &'a dyn Grid,
    /// Row-major `cols × cols`: any positive multiple of `XᵀX` of THIS weight's inputs.
    pub h: &'a [f64],
    /// This weight's share of the loss (e.g. 1.0); finite and ≥ 0.
    pub weight: f64,
}

/// Grid-search settings (`AWQModifier` defaults: `n_grid = 20`, `duo_scaling = True`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Number of grid points (`n_grid`); with `duo_scaling` the grid is `(0, false)` then `n_grid − 1` ratios
    /// `k / (n_grid − 2)` with duo scaling, so `n_grid ≥ 3` there; without, `n_grid ≥ 2` ratios `k / (n_grid − 1)`.
    pub n_grid: usize,
    /// Divide by the weight magnitude too (`duo_scaling`): `s = x_mean^r / (w_mean^(1−r) + 1e-4)`.
    pub duo_scaling: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { n_grid: 20, duo_scaling: true }
    }
}

/// The outcome of [`search`].
#[derive(Clone, Debug, PartialEq)]
pub struct Search {
    /// One scale per input channel (all 1 when AWQ did not beat RTN).
    pub scales: Vec<f32>,
    /// The chosen ratio (0 with `duo = false` for the identity).
    pub ratio: f32,
    /// Whether the chosen point used duo scaling.
    pub duo: bool,
    /// `L(scales)`.
    pub loss: f64,
    /// `L(1)`: plain RTN.
    pub rtn_loss: f64,
    /// Every grid point tried, in order: `(ratio, duo, loss)`.
    pub losses: Vec<(f32, bool, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AwqError {
    #[error("no balance layers")]
    NoLayers,
    #[error("x_mean is empty")]
    NoChannels,
    #[error("x_mean must be finite and ≥ 0 (channel {0})")]
    XMean(usize),
    #[error("balance layer {layer}: weight is {rows}×{cols} but {len} values were given")]
    WeightLen { layer: usize, rows: usize, cols: usize, len: usize },
    #[error("balance layer {layer}: H must be {cols}×{cols} but {len} values were given")]
    HessianLen { layer: usize, cols: usize, len: usize },
    #[error("balance layer {layer}: non-finite values in its weight, H or loss weight (or a negative loss weight)")]
    NonFinite { layer: usize },
    #[error("n_grid = {0} is too small (≥ 3 with duo scaling, ≥ 2 without)")]
    Grid(usize),
    #[error("balance layer {layer}: {source}")]
    Quant { layer: usize, source: GptqError },
}

/// `_compute_layer_means` (base.py): per input channel, the mean over all rows of all `ws` of `|w|` normalised by
/// its chunk's `max|w| + 1e-6`, chunks being the quantization groups of `group` consecutive elements of a row
/// (the last one of a row shorter; `group ≥ cols` = one chunk per row, the CHANNEL strategy). This equals
/// llm-compressor's `reshape(-1, group_size)` for GROUP when `group` divides `cols`, and CHANNEL; the TENSOR and
/// BLOCK strategies are not covered. Element maths in `f32`, sums in `f64` (`get_high_precision`).
/// Layers whose length is not a multiple of `cols` contribute their whole rows only; `rows` is trusted
/// (`min(rows, len / cols)` rows are read). Empty input → zeros.
pub fn layer_means(ws: &[(&[f32], usize)], group: usize, cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let g = group.clamp(1, cols);
    let mut sum = vec![0f64; cols];
    let mut count = 0usize;
    for &(w, rows) in ws {
        for row in w.chunks_exact(cols).take(rows) {
            for (c, chunk) in row.chunks(g).enumerate() {
                let amax = chunk.iter().fold(0f32, |m, &v| m.max(v.abs()));
                let d = amax + 1e-6;
                for (j, &v) in chunk.iter().enumerate() {
                    sum[c * g + j] += f64::from(v.abs() / d);
                }
            }
            count += 1;
        }
    }
    let n = count.max(1) as f64;
    sum.iter().map(|&s| (s / n) as f32).collect()
}

/// `W·diag(s)`: row-major `rows × cols` with column `j` multiplied by `scales[j]` (`_apply_smoothing` for a
/// balance layer). The smooth layer must be divided by the same `scales`. Short inputs give a short output.
pub fn scaled(w: &[f32], rows: usize, cols: usize, scales: &[f32]) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    w.chunks_exact(cols).take(rows).flat_map(|row| row.iter().zip(scales).map(|(&a, &s)| a * s)).collect()
}

/// The grid `_get_grid_search_params` builds: `(ratio, duo)` pairs.
fn grid_points(o: &Options) -> Result<Vec<(f32, bool)>, AwqError> {
    if o.duo_scaling {
        if o.n_grid < 3 {
            return Err(AwqError::Grid(o.n_grid));
        }
        let d = (o.n_grid - 2) as f32;
        Ok(std::iter::once((0.0, false)).chain((0..o.n_grid - 1).map(|k| (k as f32 / d, true))).collect())
    } else {
        if o.n_grid < 2 {
            return Err(AwqError::Grid(o.n_grid));
        }
        let d = (o.n_grid - 1) as f32;
        Ok((0..o.n_grid).map(|k| (k as f32 / d, false)).collect())
    }
}

/// The scales of one grid point (`_compute_best_scale`), in `f32` as torch computes them: `x^r / (w^(1−r) +
/// 1e-4)` (duo) or `x^r`, clamped to ≥ 1e-4, divided by `sqrt(max · min)`; Inf/NaN → 1.
fn point_scales(x_mean: &[f32], w_mean: &[f32], ratio: f32, duo: bool) -> Vec<f32> {
    let mut s: Vec<f32> = x_mean
        .iter()
        .zip(w_mean)
        .map(|(&x, &w)| {
            let v = if duo { x.powf(ratio) / (w.powf(1.0 - ratio) + 1e-4) } else { x.powf(ratio) };
            // torch's clamp(min) propagates NaN; `f32::max` would not.
            if v.is_nan() {
                v
            } else {
                v.max(1e-4)
            }
        })
        .collect();
    let (mx, mn) = s.iter().fold((f32::NEG_INFINITY, f32::INFINITY), |(a, b), &v| (a.max(v), b.min(v)));
    let norm = (mx * mn).sqrt();
    for v in &mut s {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// `tr(Δ H Δᵀ)` for row-major `Δ` (`rows × cols`) and `H` (`cols × cols`), in `f64`, sequential faer kernels.
fn trace_loss(d: &[f64], h: &[f64], rows: usize, cols: usize) -> f64 {
    use faer::{Accum, MatMut, MatRef, Par};
    let mut p = vec![0f64; rows * cols];
    // Row-major rows×cols output as the transpose of a column-major cols×rows view (faer 0.24.4's
    // `from_row_major_slice_with_stride_mut` swaps its strides; see gptq.rs).
    let dst = MatMut::from_column_major_slice_mut(&mut p, cols, rows).transpose_mut();
    let lhs = MatRef::from_row_major_slice(d, rows, cols);
    let rhs = MatRef::from_row_major_slice(h, cols, cols);
    faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f64, Par::Seq);
    d.iter().zip(&p).map(|(a, b)| a * b).sum()
}

/// `L(s)` over all balance layers (see the module docs).
fn loss_at(balance: &[Balance], cols: usize, s: &[f32]) -> Result<f64, AwqError> {
    let mut total = 0f64;
    for (i, b) in balance.iter().enumerate() {
        let ws = scaled(b.w, b.rows, cols, s);
        let q = rtn(&ws, b.rows, cols, b.grid).map_err(|source| AwqError::Quant { layer: i, source })?;
        let d: Vec<f64> =
            b.w.iter()
                .zip(&q.dequant)
                .enumerate()
                .map(|(k, (&w, &dq))| f64::from(w) - f64::from(dq / s[k % cols]))
                .collect();
        total += b.weight * trace_loss(&d, b.h, b.rows, cols);
    }
    Ok(total)
}

/// `_compute_best_scale` (base.py) with the layer-wise loss of the module docs: tries every grid point of
/// `_get_grid_search_params` (in order; the first strictly smallest loss wins, as in llm-compressor) and
/// returns the best scales, never worse than `s = 1`. `x_mean[j]` is the mean `|x_j|` over the calibration
/// tokens (`x_sum / count`); `w_mean` is [`layer_means`] of all balance layers with the first layer's grid
/// group. Deterministic.
pub fn search(x_mean: &[f32], balance: &[Balance], o: &Options) -> Result<Search, AwqError> {
    let cols = x_mean.len();
    if cols == 0 {
        return Err(AwqError::NoChannels);
    }
    if balance.is_empty() {
        return Err(AwqError::NoLayers);
    }
    if let Some(j) = x_mean.iter().position(|&x| !(x.is_finite() && x >= 0.0)) {
        return Err(AwqError::XMean(j));
    }
    for (layer, b) in balance.iter().enumerate() {
        if Some(b.w.len()) != b.rows.checked_mul(cols) {
            return Err(AwqError::WeightLen { layer, rows: b.rows, cols, len: b.w.len() });
        }
        if b.h.len() != cols * cols {
            return Err(AwqError::HessianLen { layer, cols, len: b.h.len() });
        }
        let finite = b.w.iter().all(|v| v.is_finite()) && b.h.iter().all(|v| v.is_finite());
        if !(finite && b.weight.is_finite() && b.weight >= 0.0) {
            return Err(AwqError::NonFinite { layer });
        }
    }
    let points = grid_points(o)?;
    let ws: Vec<(&[f32], usize)> = balance.iter().map(|b| (b.w, b.rows)).collect();
    let w_mean = layer_means(&ws, balance[0].grid.group(), cols);

    let ones = vec![1f32; cols];
    let rtn_loss = loss_at(balance, cols, &ones)?;
    let mut best: Option<(f64, f32, bool, Vec<f32>)> = None;
    let mut losses = Vec::with_capacity(points.len());
    for (ratio, duo) in points {
        let s = point_scales(x_mean, &w_mean, ratio, duo);
        let l = loss_at(balance, cols, &s)?;
        losses.push((ratio, duo, l));
        let better = match &best {
            None => true,
            Some(b) => l < b.0,
        };
        if better {
            best = Some((l, ratio, duo, s));
        }
    }
    Ok(match best {
        Some((loss, ratio, duo, scales)) if loss <= rtn_loss => Search { scales, ratio, duo, loss, rtn_loss, losses },
        _ => Search { scales: ones, ratio: 0.0, duo: false, loss: rtn_loss, rtn_loss, losses },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    /// xorshift64* in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn grid_matches_llm_compressor() {
        let p = grid_points(&Options::default()).unwrap();
        assert_eq!(p.len(), 20);
        assert_eq!(p[0], (0.0, false));
        assert_eq!(p[1], (0.0, true));
        assert_eq!(p[19], (1.0, true));
        let p = grid_points(&Options { n_grid: 5, duo_scaling: false }).unwrap();
        assert_eq!(p, vec![(0.0, false), (0.25, false), (0.5, false), (0.75, false), (1.0, false)]);
        assert!(matches!(grid_points(&Options { n_grid: 2, duo_scaling: true }), Err(AwqError::Grid(2))));
    }

    #[test]
    fn point_scales_identity_and_normalised() {
        let x = [0.5f32, 2.0, 8.0];
        let w = [0.3f32, 0.6, 0.9];
        assert_eq!(point_scales(&x, &w, 0.0, false), vec![1.0; 3]);
        let s = point_scales(&x, &w, 1.0, false);
        // x / sqrt(8 · 0.5) = x / 2.
        assert_eq!(s, vec![0.25, 1.0, 4.0]);
        // All-zero x at ratio 1: x^r clamps to 1e-4 everywhere → all 1.
        let s = point_scales(&[0.0; 3], &w, 1.0, false);
        assert!(s.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn layer_means_by_hand() {
        // One row, groups of 2: [1, -2 | 4, 0] → [0.5, 1 | 1, 0] (up to the 1e-6).
        let w = [1.0f32, -2.0, 4.0, 0.0];
        let m = layer_means(&[(&w, 1)], 2, 4);
        let want = [0.5, 1.0, 1.0, 0.0];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{m:?}");
        }
        // Two layers average over all rows; group ≥ cols is per row.
        let w2 = [2.0f32, 2.0, 2.0, 2.0];
        let m = layer_means(&[(&w, 1), (&w2, 1)], usize::MAX, 4);
        let want = [(0.25 + 1.0) / 2.0, (0.5 + 1.0) / 2.0, 1.0, 0.5];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{m:?}");
        }
    }

    #[test]
    fn trace_loss_matches_loop() {
        let mut rng = Rng(7);
        let (rows, cols) = (3, 5);
        let d: Vec<f64> = (0..rows * cols).map(|_| f64::from(rng.next())).collect();
        let h: Vec<f64> = (0..cols * cols).map(|_| f64::from(rng.next())).collect();
        let mut want = 0.0;
        for r in 0..rows {
            for a in 0..cols {
                for b in 0..cols {
                    want += d[r * cols + a] * h[a * cols + b] * d[r * cols + b];
                }
            }
        }
        assert!((trace_loss(&d, &h, rows, cols) - want).abs() < 1e-12);
    }
}
