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
//! it ignores the non-linear interactions between the balance layers. `ΔW` and the Hessian's product are in
//! `f64`; from the inputs themselves ([`balance_losses_x`]) the product `ΔW Xᵀ` is in `f32` and its squares summed
//! in `f64`. faer's sequential kernels (`Par::Seq`), so the result does not depend on the number of threads.
//!
//! The search never returns scales worse than plain RTN: if no grid point beats `s = 1` (which the default grid
//! contains as its first point, `(0.0, false)`), [`search`] returns `s = 1`, ratio 0, `duo = false`.
//!
//! Checked against llm-compressor 0.14's own `AWQModifier._apply_smoothing` on single and multi-linear mappings
//! (`tests/interop/awq_ref.py`; `quantizers/tests/awq.rs` `awq_matches_llm_compressor`): every grid point's loss
//! agrees (llm-compressor's = sling's / (tokens · Σ rows)) and so does the chosen ratio.
//!
//! # Precision
//!
//! The scales are `f64`, as llm-compressor's are with duo scaling (`_compute_layer_means` returns the weight means
//! in `float64`, which promotes the scale formula), and `W·s` is computed in `f64` and rounded once to `f32`
//! ([`scaled`]), as torch stores `weight * scales` into an `f32` parameter. This matters more than it looks:
//! compressed-tensors' symmetric grid (`scale = absmax / 7.5`, codes −8..7) puts every group's largest element
//! exactly on a .5 tie, so one ulp of `W·s` decides whether a negative maximum rounds to −8 or −7; on a channel
//! with a large activation that sign flip moves the loss by ~0.1–0.3%. Rounding the scales to `f32` first was
//! measured to change grid-point losses by up to 3e-3 relative against llm-compressor; with `f64` scales they
//! agree to ~1e-6. The folds ([`fold_into_norm`], [`fold_into_linear_rows`]) divide in `f64` and round once.
//!
//! # Mappings (llm-compressor 0.14 `mappings.py`; the caller's job, listed for it)
//!
//! Qwen3-MoE / Qwen2-MoE (`_moe_default_mappings`): `input_layernorm → q/k/v_proj` (parent: `self_attn`);
//! `v_proj → o_proj` only when `v_proj.out_features == o_proj.in_features` (`_check_layers_are_compatible`: skipped
//! under GQA); `post_attention_layernorm → mlp.gate (the router) + every expert's gate_proj and up_proj`, one
//! shared scale vector (parent: the sparse MoE block; the router is unquantized, so it is left out of the loss and
//! of `w_mean` but multiplied by the scales); `up_proj → down_proj` per expert (parent: that `down_proj` itself, the
//! lowest common ancestor of a single name, so llm-compressor's loss there is exactly this module's layer loss).
//! Mixtral is not in the registry: `default_mappings` (`…gate_proj$`, `…up_proj$`, `…down_proj$`, no router).

use crate::gptq::{rtn, GptqError, Grid, RowGrid};

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
    pub scales: Vec<f64>,
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
    /// The index of the chosen point among [`points`]; `None`: the identity.
    pub point: Option<usize>,
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
    #[error("fold: {what} has {len} values, expected {want}")]
    FoldLen { what: &'static str, len: usize, want: usize },
}

/// Adds one layer's `_compute_layer_means` terms to `sum` (per input channel, `Σ_rows |w| / (chunk max|w| + 1e-6)`)
/// and returns the number of rows read. Chunks are the quantization groups of `group` consecutive elements of a
/// row (the last one of a row shorter; `group ≥ cols` = one chunk per row, the CHANNEL strategy). Element maths
/// in `f32` (the weight's dtype), sums in `f64` (`get_high_precision`).
fn layer_sums(w: &[f32], rows: usize, cols: usize, group: usize, sum: &mut [f64]) -> usize {
    let g = group.clamp(1, cols.max(1));
    let mut count = 0;
    for row in w.chunks_exact(cols.max(1)).take(rows) {
        for (c, chunk) in row.chunks(g).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let d = amax + 1e-6;
            for (j, &v) in chunk.iter().enumerate() {
                sum[c * g + j] += f64::from(v.abs() / d);
            }
        }
        count += 1;
    }
    count
}

/// `_compute_layer_means` (base.py) in `f64`, as llm-compressor returns it: per input channel, the mean over all
/// rows of all layers of `|w|` normalised by its chunk's `max|w| + 1e-6`, each layer chunked by its own group.
fn layer_means_f64(ws: &[(&[f32], usize, usize)], cols: usize) -> Vec<f64> {
    let mut sum = vec![0f64; cols];
    let mut count = 0usize;
    for &(w, rows, group) in ws {
        count += layer_sums(w, rows, cols, group, &mut sum);
    }
    let n = count.max(1) as f64;
    sum.iter().map(|&s| s / n).collect()
}

/// `_compute_layer_means` (base.py): per input channel, the mean over all rows of all `ws` of `|w|` normalised by
/// its chunk's `max|w| + 1e-6`, chunks being the quantization groups of `group` consecutive elements of a row
/// (the last one of a row shorter; `group ≥ cols` = one chunk per row, the CHANNEL strategy). This equals
/// llm-compressor's `reshape(-1, group_size)` for GROUP when `group` divides `cols`, and CHANNEL; the TENSOR and
/// BLOCK strategies are not covered. Element maths in `f32`, sums in `f64` (`get_high_precision`).
/// Layers whose length is not a multiple of `cols` contribute their whole rows only; `rows` is trusted
/// (`min(rows, len / cols)` rows are read). Empty input → zeros. ([`search`] uses the `f64` means, each layer
/// chunked by its own grid's group.)
pub fn layer_means(ws: &[(&[f32], usize)], group: usize, cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let ws: Vec<(&[f32], usize, usize)> = ws.iter().map(|&(w, r)| (w, r, group)).collect();
    layer_means_f64(&ws, cols).iter().map(|&v| v as f32).collect()
}

/// `W·diag(s)`: row-major `rows × cols` with column `j` multiplied by `scales[j]` (`_apply_smoothing` for a
/// balance layer: `weight * scales.view(1, -1)`, an `f32` weight times `f64` scales computed in `f64` and stored
/// rounded to `f32`, which is what this does). The smooth layer must be divided by the same `scales`
/// ([`fold_into_norm`], [`fold_into_linear_rows`]). Short inputs give a short output.
pub fn scaled(w: &[f32], rows: usize, cols: usize, scales: &[f64]) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let k = cols.min(scales.len());
    let mut out = Vec::with_capacity(rows.saturating_mul(k).min(w.len()));
    for row in w.chunks_exact(cols).take(rows) {
        let at = out.len();
        out.resize(at + k, 0.0);
        scale_into(row, scales, &mut out[at..]);
    }
    out
}

/// Folds the scales into a 1-D smooth layer: `norm_w[j] /= scales[j]` (`_apply_smoothing`'s
/// `module.weight.div_(scales)` for a norm, and `module.bias.div_(scales)` for its bias: pass the bias the same
/// way). With the balance layers multiplied by the scales ([`scaled`]), `(W·s)(norm(x)/s) = W·norm(x)` up to `f32`
/// rounding. Lengths must agree.
pub fn fold_into_norm(norm_w: &mut [f32], scales: &[f64]) -> Result<(), AwqError> {
    if norm_w.len() != scales.len() {
        return Err(AwqError::FoldLen { what: "norm weight", len: norm_w.len(), want: scales.len() });
    }
    norm_w.iter_mut().zip(scales).for_each(|(v, &s)| *v = (f64::from(*v) / s) as f32);
    Ok(())
}

/// Folds the scales into a previous linear (`prev`: row-major `rows × cols`, e.g. `up_proj` for `down_proj`'s
/// scales, `v_proj` for `o_proj`'s): its LAST `scales.len()` output rows are divided by the scales, row `rows −
/// scales.len() + j` by `scales[j]` (`_apply_smoothing`: `weight[-scales.size(0):].div_(scales.view(-1, 1))`, the
/// AutoAWQ edge case of a fused qkv_proj smoothing o_proj; with as many rows as scales, every row). A bias of the
/// previous linear is divided the same way ([`fold_into_norm`] on its last `scales.len()` values). For `up_proj →
/// down_proj` this is exact because `act(gate)·up` is linear in `up`'s output. Needs `prev.len() == rows·cols` and
/// `scales.len() ≤ rows`.
pub fn fold_into_linear_rows(prev: &mut [f32], rows: usize, cols: usize, scales: &[f64]) -> Result<(), AwqError> {
    if Some(prev.len()) != rows.checked_mul(cols) {
        return Err(AwqError::FoldLen { what: "previous linear", len: prev.len(), want: rows.saturating_mul(cols) });
    }
    if scales.len() > rows {
        return Err(AwqError::FoldLen {
            what: "scales (more than the previous linear's rows)",
            len: scales.len(),
            want: rows,
        });
    }
    let first = rows - scales.len();
    if cols > 0 {
        for (row, &s) in prev.chunks_exact_mut(cols).skip(first).zip(scales) {
            row.iter_mut().for_each(|v| *v = (f64::from(*v) / s) as f32);
        }
    }
    Ok(())
}

/// Every fold AWQ applies to one tensor, composed: element `(i, j)` of the tensor (a 1-D tensor, a norm weight, is
/// one row) becomes `w · col_mul[j] / col_div[j] / row_div[i]`, computed in `f64` and rounded once to `f32`. A
/// balance layer gets `col_mul` (= [`scaled`]), a norm `col_div` (= [`fold_into_norm`]), a previous linear `row_div`
/// (= [`fold_into_linear_rows`] when it has as many rows as scales); `up_proj` is both a balance layer (of the FFN
/// norm's mapping) and a previous linear (of `down_proj`'s), so it gets both in one rounding, where llm-compressor
/// rounds after each (in the model's dtype). One definition for the artifact's writer and the calibration pass's
/// sequential forward, so both see the same values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fold {
    pub col_mul: Option<Vec<f64>>,
    pub col_div: Option<Vec<f64>>,
    pub row_div: Option<Vec<f64>>,
}

impl Fold {
    /// Multiplies the columns by `s` (composed element by element with an earlier `col_mul`).
    pub fn mul_cols(&mut self, s: &[f64]) -> Result<(), AwqError> {
        compose(&mut self.col_mul, s, "col_mul")
    }

    /// Divides the columns by `s`.
    pub fn div_cols(&mut self, s: &[f64]) -> Result<(), AwqError> {
        compose(&mut self.col_div, s, "col_div")
    }

    /// Divides the rows by `s`.
    pub fn div_rows(&mut self, s: &[f64]) -> Result<(), AwqError> {
        compose(&mut self.row_div, s, "row_div")
    }

    /// Whether the fold changes nothing (no vector, or every factor exactly 1).
    pub fn is_identity(&self) -> bool {
        [&self.col_mul, &self.col_div, &self.row_div].iter().all(|v| match v {
            Some(v) => v.iter().all(|&x| x == 1.0),
            None => true,
        })
    }

    /// Applies the fold to whole rows `r0..` (of `cols` values each) of the tensor, in place. A 1-D tensor is one row
    /// of its length. Errors when a vector does not match the tensor's dimensions.
    pub fn apply(&self, vals: &mut [f32], r0: usize, cols: usize) -> Result<(), AwqError> {
        let len = |v: &Option<Vec<f64>>| v.as_ref().map_or(cols, Vec::len);
        for (what, l) in [("col_mul", len(&self.col_mul)), ("col_div", len(&self.col_div))] {
            if l != cols {
                return Err(AwqError::FoldLen { what, len: l, want: cols });
            }
        }
        if cols == 0 || vals.len() % cols != 0 {
            return Err(AwqError::FoldLen { what: "values (whole rows)", len: vals.len(), want: cols });
        }
        let rows = vals.len() / cols;
        if let Some(rd) = &self.row_div {
            if rd.len() < r0 + rows {
                return Err(AwqError::FoldLen { what: "row_div", len: rd.len(), want: r0 + rows });
            }
        }
        for (i, row) in vals.chunks_exact_mut(cols).enumerate() {
            let rd = self.row_div.as_ref().map(|v| v[r0 + i]);
            for (j, v) in row.iter_mut().enumerate() {
                let mut x = f64::from(*v);
                if let Some(m) = &self.col_mul {
                    x *= m[j];
                }
                if let Some(d) = &self.col_div {
                    x /= d[j];
                }
                if let Some(d) = rd {
                    x /= d;
                }
                *v = x as f32;
            }
        }
        Ok(())
    }
}

fn compose(acc: &mut Option<Vec<f64>>, s: &[f64], what: &'static str) -> Result<(), AwqError> {
    match acc {
        Some(a) if a.len() != s.len() => return Err(AwqError::FoldLen { what, len: s.len(), want: a.len() }),
        Some(a) => a.iter_mut().zip(s).for_each(|(a, b)| *a *= b),
        None => *acc = Some(s.to_vec()),
    }
    Ok(())
}

/// The grid `_get_grid_search_params` builds: `(ratio, duo)` pairs.
fn grid_points(o: &Options) -> Result<Vec<(f64, bool)>, AwqError> {
    if o.duo_scaling {
        if o.n_grid < 3 {
            return Err(AwqError::Grid(o.n_grid));
        }
        let d = (o.n_grid - 2) as f64;
        Ok(std::iter::once((0.0, false)).chain((0..o.n_grid - 1).map(|k| (k as f64 / d, true))).collect())
    } else {
        if o.n_grid < 2 {
            return Err(AwqError::Grid(o.n_grid));
        }
        let d = (o.n_grid - 1) as f64;
        Ok((0..o.n_grid).map(|k| (k as f64 / d, false)).collect())
    }
}

/// The scales of one grid point (`_compute_best_scale`), with torch's dtypes: `x_mean` is `f32` and `w_mean`
/// `f64` (`_compute_layer_means` sums in `get_high_precision()`), so with duo scaling `x^r` is an `f32` power and
/// the rest (`/ (w^(1−r) + 1e-4)`, clamp to ≥ 1e-4, `/ sqrt(max · min)`) is `f64`; without, all `f32`. Inf/NaN → 1.
/// The scales stay `f64` (as llm-compressor keeps them): see "Precision" in the module docs.
fn point_scales(x_mean: &[f32], w_mean: &[f64], ratio: f64, duo: bool) -> Vec<f64> {
    // torch's `float32_tensor.pow(r)`: measured (torch 2.14 CPU) to equal the `f64` power of the `f32`-rounded
    // exponent rounded to `f32`, except r = 0.5, which it computes as a square root.
    let xpow = |x: f32| if ratio == 0.5 { x.sqrt() } else { f64::from(x).powf(f64::from(ratio as f32)) as f32 };
    // torch's clamp(min) propagates NaN; `max` would not.
    fn extremes<T: Copy + PartialOrd>(s: &[T], lo: T, hi: T) -> (T, T) {
        s.iter().fold((lo, hi), |(a, b), &v| (if v > a { v } else { a }, if v < b { v } else { b }))
    }
    let fix = |v: f64| if v.is_finite() { v } else { 1.0 };
    if duo {
        let s: Vec<f64> = x_mean
            .iter()
            .zip(w_mean)
            .map(|(&x, &w)| {
                let v = f64::from(xpow(x)) / (w.powf(1.0 - ratio) + 1e-4);
                if v.is_nan() {
                    v
                } else {
                    v.max(1e-4)
                }
            })
            .collect();
        let (mx, mn) = extremes(&s, f64::NEG_INFINITY, f64::INFINITY);
        let norm = (mx * mn).sqrt();
        s.iter().map(|&v| fix(v / norm)).collect()
    } else {
        let s: Vec<f32> = x_mean
            .iter()
            .map(|&x| {
                let v = xpow(x);
                if v.is_nan() {
                    v
                } else {
                    v.max(1e-4)
                }
            })
            .collect();
        let (mx, mn) = extremes(&s, f32::NEG_INFINITY, f32::INFINITY);
        let norm = (mx * mn).sqrt();
        s.iter().map(|&v| fix(f64::from(v / norm))).collect()
    }
}

/// `tr(Δ H Δᵀ)` for row-major `Δ` (`rows × cols`) and `H` (`cols × cols`), in `f64`, sequential faer kernels; `p`
/// (`rows · cols`) is scratch.
fn trace_loss(d: &[f64], h: &[f64], p: &mut [f64], rows: usize, cols: usize) -> f64 {
    use faer::{Accum, MatMut, MatRef, Par};
    // Row-major rows×cols output as the transpose of a column-major cols×rows view (faer 0.24.4's
    // `from_row_major_slice_with_stride_mut` swaps its strides; see gptq.rs).
    let dst = MatMut::from_column_major_slice_mut(p, cols, rows).transpose_mut();
    let lhs = MatRef::from_row_major_slice(d, rows, cols);
    let rhs = MatRef::from_row_major_slice(h, cols, cols);
    faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f64, Par::Seq);
    d.iter().zip(p.iter()).map(|(a, b)| a * b).sum()
}

/// One row of `ΔW = W − Q(W·s)/s`: `ws[j] = f32(f64(w[j])·s[j])` (as [`scaled`]), quantized in place to the
/// values its codes dequantize to (the grid's parameters taken from `ws`, as [`rtn`]), then
/// `d[j] = f64(w[j]) − f64(ws[j]) / s[j]`. `w`, `s`, `ws` and `d` have the row's length (shorter ones cut the
/// row). [`delta_row`] is the scalar reference; `sling_kernels::awq::delta` gives the fastest one this machine
/// runs, with the same values.
pub type DeltaRow = fn(grid: &dyn Grid, w: &[f32], s: &[f64], ws: &mut [f32], d: &mut [f64]) -> Result<(), GptqError>;

/// The scalar reference [`DeltaRow`]: whole rows at once on a [`RowGrid`] ([`delta_row_whole`]), group by group
/// through [`rtn`] on any other grid.
pub fn delta_row(grid: &dyn Grid, w: &[f32], s: &[f64], ws: &mut [f32], d: &mut [f64]) -> Result<(), GptqError> {
    if let Some(g) = grid.row_grid() {
        return delta_row_whole(g, w, s, ws, d);
    }
    let n = w.len().min(s.len()).min(ws.len()).min(d.len());
    scale_into(&w[..n], &s[..n], &mut ws[..n]);
    let q = rtn(&ws[..n], 1, n, grid)?;
    ws[..n].copy_from_slice(&q.dequant);
    unscale_into(&w[..n], &ws[..n], &s[..n], &mut d[..n]);
    Ok(())
}

/// [`delta_row`] on a [`RowGrid`]: [`RowGrid::qdq_row`] in place. `inline(always)`, with all it calls, so that
/// `sling_kernels` builds this very code for AVX2.
#[inline(always)]
pub fn delta_row_whole(g: RowGrid, w: &[f32], s: &[f64], ws: &mut [f32], d: &mut [f64]) -> Result<(), GptqError> {
    let n = w.len().min(s.len()).min(ws.len()).min(d.len());
    let (w, s, ws, d) = (&w[..n], &s[..n], &mut ws[..n], &mut d[..n]);
    scale_into(w, s, ws);
    // An empty row has no groups to parameterise (as `rtn` with no columns).
    if !g.qdq_row(ws) && n > 0 {
        let want = n.div_ceil(g.group().max(1)).max(1);
        return Err(GptqError::Params { cols: n, want, got: 0 });
    }
    unscale_into(w, ws, s, d);
    Ok(())
}

/// `ws[j] = f32(f64(w[j]) · s[j])` ([`scaled`]'s product).
#[inline(always)]
fn scale_into(w: &[f32], s: &[f64], ws: &mut [f32]) {
    for ((o, &a), &s) in ws.iter_mut().zip(w).zip(s) {
        *o = (f64::from(a) * s) as f32;
    }
}

/// `d[j] = f64(w[j]) − f64(dq[j]) / s[j]`.
#[inline(always)]
fn unscale_into(w: &[f32], dq: &[f32], s: &[f64], d: &mut [f64]) {
    for (((o, &w), &q), &s) in d.iter_mut().zip(w).zip(dq).zip(s) {
        *o = f64::from(w) - f64::from(q) / s;
    }
}

/// `ΔW` of one balance layer at scales `s` into `dm` (row-major `rows × cols`), each value converted by `out`
/// (`f64` for the Hessian's product, `f32` for the inputs'); `ws` and `d` are a row's scratch.
fn delta<T>(
    b: &Balance,
    i: usize,
    s: &[f64],
    row: DeltaRow,
    (ws, d): (&mut [f32], &mut [f64]),
    dm: &mut [T],
    out: impl Fn(f64) -> T + Copy,
) -> Result<(), AwqError> {
    let cols = ws.len();
    for (wr, dr) in b.w.chunks_exact(cols).zip(dm.chunks_exact_mut(cols)).take(b.rows) {
        row(b.grid, wr, s, ws, d).map_err(|source| AwqError::Quant { layer: i, source })?;
        dr.iter_mut().zip(d.iter()).for_each(|(o, &v)| *o = out(v));
    }
    Ok(())
}

/// `weight · L(s)` of one balance layer at `s = 1`, then at every point, in order, with `loss(ΔW)` the product
/// (the buffers are allocated once for all the points).
fn losses<T: Copy + Default>(
    b: &Balance,
    i: usize,
    points: &[Point],
    row: DeltaRow,
    out: impl Fn(f64) -> T + Copy,
    mut loss: impl FnMut(&[T]) -> f64,
) -> Result<Vec<f64>, AwqError> {
    let cols = points.first().map_or(0, |p| p.scales.len());
    let ones = vec![1f64; cols];
    let (mut ws, mut d) = (vec![0f32; cols], vec![0f64; cols]);
    let mut dm = vec![T::default(); b.rows * cols];
    std::iter::once(&ones[..])
        .chain(points.iter().map(|p| &p.scales[..]))
        .map(|s| {
            delta(b, i, s, row, (&mut ws, &mut d), &mut dm, out)?;
            Ok(b.weight * loss(&dm))
        })
        .collect()
}

/// `‖ΔW Xᵀ‖²` for row-major `Δ` (`rows × cols`) and the inputs `X` (`n × cols`): `tr(Δ XᵀX Δᵀ)` in
/// `rows · cols · n` operations instead of `rows · cols²`, sequential faer kernels; `p` (`rows · n`) is scratch.
/// The product is in `f32` (a sum of squares: no cancellation, so `f32`'s rounding moves the loss by about 1e-7
/// relative, far below the differences between grid points; half the bytes and twice the lanes of `f64`), the
/// squares summed in `f64`.
fn input_loss(d: &[f32], x: &[f32], p: &mut [f32], rows: usize, cols: usize, n: usize) -> f64 {
    use faer::{Accum, MatMut, MatRef, Par};
    let dst = MatMut::from_column_major_slice_mut(p, rows, n);
    let lhs = MatRef::from_row_major_slice(d, rows, cols);
    let rhs = MatRef::from_row_major_slice(x, n, cols).transpose();
    faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
    p.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// [`balance_losses`] from the layer's calibration inputs `x` (row-major `n × cols`) instead of `XᵀX` (`b.h` is not
/// read): the same losses up to rounding, cheaper when `n < cols` (a routed expert that sees few tokens). `row`:
/// [`delta_row`] or a faster twin of it.
pub fn balance_losses_x(
    b: &Balance,
    x: &[f32],
    i: usize,
    points: &[Point],
    row: DeltaRow,
) -> Result<Vec<f64>, AwqError> {
    let cols = points.first().map_or(0, |p| p.scales.len());
    if cols == 0 {
        return Err(AwqError::NoChannels);
    }
    if Some(b.w.len()) != b.rows.checked_mul(cols) {
        return Err(AwqError::WeightLen { layer: i, rows: b.rows, cols, len: b.w.len() });
    }
    if x.len() % cols != 0 {
        return Err(AwqError::HessianLen { layer: i, cols, len: x.len() });
    }
    let finite = b.w.iter().all(|v| v.is_finite()) && x.iter().all(|v| v.is_finite());
    if !(finite && b.weight.is_finite() && b.weight >= 0.0) {
        return Err(AwqError::NonFinite { layer: i });
    }
    let n = x.len() / cols;
    let mut p = vec![0f32; b.rows * n];
    losses(b, i, points, row, |v| v as f32, |d| input_loss(d, x, &mut p, b.rows, cols, n))
}

/// Checks one balance layer against `cols` input channels; `i` names it in errors.
fn check_balance(b: &Balance, i: usize, cols: usize) -> Result<(), AwqError> {
    if Some(b.w.len()) != b.rows.checked_mul(cols) {
        return Err(AwqError::WeightLen { layer: i, rows: b.rows, cols, len: b.w.len() });
    }
    if b.h.len() != cols * cols {
        return Err(AwqError::HessianLen { layer: i, cols, len: b.h.len() });
    }
    let finite = b.w.iter().all(|v| v.is_finite()) && b.h.iter().all(|v| v.is_finite());
    if !(finite && b.weight.is_finite() && b.weight >= 0.0) {
        return Err(AwqError::NonFinite { layer: i });
    }
    Ok(())
}

/// One grid point of the search: its ratio, whether it uses duo scaling, and its scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub ratio: f32,
    pub duo: bool,
    pub scales: Vec<f64>,
}

/// `_compute_layer_means` of all balance layers' weights, `(weight, rows, group)` each (chunked by its own group), in
/// `f64`: the `w_mean` of [`points`].
pub fn weight_means(ws: &[(&[f32], usize, usize)], cols: usize) -> Vec<f64> {
    layer_means_f64(ws, cols)
}

/// The grid points of `_get_grid_search_params` with their scales, in order, after the identity (`s = 1`, plain
/// RTN), which [`pick`] takes as its baseline. Errors: no channels, `x_mean` not finite and ≥ 0, a grid too small.
pub fn points(x_mean: &[f32], w_mean: &[f64], o: &Options) -> Result<Vec<Point>, AwqError> {
    if x_mean.is_empty() {
        return Err(AwqError::NoChannels);
    }
    if let Some(j) = x_mean.iter().position(|&x| !(x.is_finite() && x >= 0.0)) {
        return Err(AwqError::XMean(j));
    }
    Ok(grid_points(o)?
        .into_iter()
        .map(|(ratio, duo)| Point { ratio: ratio as f32, duo, scales: point_scales(x_mean, w_mean, ratio, duo) })
        .collect())
}

/// One balance layer's share of the loss, `weight · tr(ΔW H ΔWᵀ)`, first at `s = 1` (RTN), then at each point, in
/// order. Independent per layer, so a caller may compute layers in parallel, or in groups whose Hessians are never
/// all in memory at once, and add the vectors in layer order ([`search`] does exactly that, sequentially). `i`
/// names the layer in errors.
pub fn balance_losses(b: &Balance, i: usize, points: &[Point], row: DeltaRow) -> Result<Vec<f64>, AwqError> {
    let cols = points.first().map_or(0, |p| p.scales.len());
    if cols == 0 {
        return Err(AwqError::NoChannels);
    }
    check_balance(b, i, cols)?;
    let mut p = vec![0f64; b.rows * cols];
    losses(b, i, points, row, |v| v, |d| trace_loss(d, b.h, &mut p, b.rows, cols))
}

/// The best point given the summed losses (`losses[0]` at `s = 1`, then one per point, as [`balance_losses`] gives
/// them): the first strictly smallest loss, as llm-compressor; the identity when no point beats RTN.
pub fn pick(points: &[Point], losses: &[f64]) -> Search {
    let cols = points.first().map_or(0, |p| p.scales.len());
    let rtn_loss = losses.first().copied().unwrap_or(0.0);
    let mut best: Option<(f64, usize)> = None;
    for (k, &l) in losses.iter().skip(1).enumerate().take(points.len()) {
        let better = match best {
            None => true,
            Some((b, _)) => l < b,
        };
        if better {
            best = Some((l, k));
        }
    }
    let tried = points.iter().zip(losses.iter().skip(1)).map(|(p, &l)| (p.ratio, p.duo, l)).collect();
    match best {
        Some((loss, k)) if loss <= rtn_loss => {
            let p = &points[k];
            Search {
                scales: p.scales.clone(),
                ratio: p.ratio,
                duo: p.duo,
                loss,
                rtn_loss,
                losses: tried,
                point: Some(k),
            }
        }
        _ => Search {
            scales: vec![1.0; cols],
            ratio: 0.0,
            duo: false,
            loss: rtn_loss,
            rtn_loss,
            losses: tried,
            point: None,
        },
    }
}

/// `_compute_best_scale` (base.py) with the layer-wise loss of the module docs: tries every grid point of
/// `_get_grid_search_params` (in order; the first strictly smallest loss wins, as in llm-compressor) and
/// returns the best scales, never worse than `s = 1`. `x_mean[j]` is the mean `|x_j|` over the calibration
/// tokens (`x_sum / count`); `w_mean` is `_compute_layer_means` of all balance layers (each chunked by its own
/// grid's group, in `f64`). Balance layers that are not quantized (a router kept in 16 bits) must not be passed:
/// llm-compressor leaves them out of `w_mean` and of the loss (their output does not change) and only multiplies
/// them by the scales at the end ([`scaled`]). Deterministic. The pieces ([`weight_means`], [`points`],
/// [`balance_losses`], [`pick`]) are public for callers that spread the layers over threads or passes.
pub fn search(x_mean: &[f32], balance: &[Balance], o: &Options) -> Result<Search, AwqError> {
    let cols = x_mean.len();
    if cols == 0 {
        return Err(AwqError::NoChannels);
    }
    if balance.is_empty() {
        return Err(AwqError::NoLayers);
    }
    for (i, b) in balance.iter().enumerate() {
        check_balance(b, i, cols)?;
    }
    let ws: Vec<(&[f32], usize, usize)> = balance.iter().map(|b| (b.w, b.rows, b.grid.group())).collect();
    let pts = points(x_mean, &weight_means(&ws, cols), o)?;
    let mut total = vec![0f64; pts.len() + 1];
    for (i, b) in balance.iter().enumerate() {
        for (t, l) in total.iter_mut().zip(balance_losses(b, i, &pts, delta_row)?) {
            *t += l;
        }
    }
    Ok(pick(&pts, &total))
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
    fn losses_from_inputs_equal_losses_from_the_hessian() {
        use crate::mlx::AffineGrid;
        let mut rng = Rng(5);
        let (rows, cols, n) = (6, 32, 9);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next()).collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.next() * 3.0).collect();
        let mut h = vec![0f64; cols * cols];
        for t in x.chunks(cols) {
            for a in 0..cols {
                for b in 0..cols {
                    h[a * cols + b] += f64::from(t[a]) * f64::from(t[b]);
                }
            }
        }
        let grid = AffineGrid { bits: 3, group: 16, sd: crate::ct::ScaleDtype::F32 };
        let x_mean: Vec<f32> =
            (0..cols).map(|j| x.iter().skip(j).step_by(cols).map(|v| v.abs()).sum::<f32>() / n as f32).collect();
        let bal = Balance { w: &w, rows, grid: &grid, h: &h, weight: 0.5 };
        let pts = points(&x_mean, &weight_means(&[(&w, rows, 16)], cols), &Options::default()).unwrap();
        let lh = balance_losses(&bal, 0, &pts, delta_row).unwrap();
        let lx = balance_losses_x(&Balance { h: &[], ..bal }, &x, 0, &pts, delta_row).unwrap();
        assert_eq!(lh.len(), pts.len() + 1);
        // The inputs' product is in f32.
        for (a, b) in lh.iter().zip(&lx) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-12), "{a} vs {b}");
        }
        assert!(balance_losses_x(&bal, &x[1..], 0, &pts, delta_row).is_err());
    }

    /// A grid seen only through the group-by-group methods (`row_grid` left at `None`).
    struct Groups<'a>(&'a dyn Grid);
    impl Grid for Groups<'_> {
        fn group(&self) -> usize {
            self.0.group()
        }
        fn row_params(&self, row: &[f32]) -> Vec<crate::gptq::GroupParams> {
            self.0.row_params(row)
        }
        fn quantize(&self, x: f32, p: &crate::gptq::GroupParams) -> (u8, f32) {
            self.0.quantize(x, p)
        }
        fn dequantize(&self, code: u8, p: &crate::gptq::GroupParams) -> f32 {
            self.0.dequantize(code, p)
        }
    }

    #[test]
    fn whole_rows_are_the_groups() {
        use crate::ct::{IntArgs, IntGrid, ScaleDtype};
        use crate::mlx::AffineGrid;
        let mut rng = Rng(23);
        let special = [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-41, 0.5, -0.5];
        let mut grids: Vec<Box<dyn Grid>> = Vec::new();
        for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
            for bits in [0, 1, 2, 4, 8, 9] {
                for (symmetric, group) in [(true, Some(32)), (false, Some(32)), (true, None), (false, Some(48))] {
                    grids.push(Box::new(IntGrid { args: IntArgs { bits, symmetric, group }, sd }));
                }
                for group in [0, 32, 48] {
                    grids.push(Box::new(AffineGrid { bits, group, sd }));
                }
            }
        }
        for g in &grids {
            let g = &**g;
            assert!(g.row_grid().is_some());
            for n in [0usize, 1, 31, 32, 100] {
                for case in 0..6 {
                    let w: Vec<f32> = (0..n)
                        .map(|j| match case {
                            0 => 0.0,
                            1 | 2 if j % 7 == 3 => special[(j / 7) % special.len()],
                            _ => rng.next() * [0.01, 1.0, 300.0][case % 3],
                        })
                        .collect();
                    let s: Vec<f64> = (0..n).map(|_| 0.25 + f64::from(rng.next().abs()) * 3.0).collect();
                    let (mut ws_a, mut d_a) = (vec![0f32; n], vec![0f64; n]);
                    let (mut ws_b, mut d_b) = (vec![0f32; n], vec![0f64; n]);
                    let a = delta_row(g, &w, &s, &mut ws_a, &mut d_a);
                    let b = delta_row(&Groups(g), &w, &s, &mut ws_b, &mut d_b);
                    assert_eq!(a.is_ok(), b.is_ok(), "n = {n} case {case}");
                    if a.is_ok() {
                        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&d_a), bits(&d_b), "n = {n} case {case}");
                    }
                }
            }
        }
    }

    #[test]
    fn fold_is_the_three_folds() {
        let mut rng = Rng(11);
        let (rows, cols) = (3, 4);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next()).collect();
        let s: Vec<f64> = (0..cols).map(|_| f64::from(rng.next().abs()) + 0.25).collect();
        let sr: Vec<f64> = (0..rows).map(|_| f64::from(rng.next().abs()) + 0.25).collect();
        let mut f = Fold::default();
        f.mul_cols(&s).unwrap();
        let mut v = w.clone();
        f.apply(&mut v, 0, cols).unwrap();
        assert_eq!(v, scaled(&w, rows, cols, &s));
        // rows 1.. alone give the same rows
        let mut tail = w[cols..].to_vec();
        f.apply(&mut tail, 1, cols).unwrap();
        assert_eq!(tail, v[cols..]);
        let mut f = Fold::default();
        f.div_cols(&s).unwrap();
        let (mut v, mut want) = (w[..cols].to_vec(), w[..cols].to_vec());
        f.apply(&mut v, 0, cols).unwrap();
        fold_into_norm(&mut want, &s).unwrap();
        assert_eq!(v, want);
        let mut f = Fold::default();
        f.div_rows(&sr).unwrap();
        let (mut v, mut want) = (w.clone(), w.clone());
        f.apply(&mut v, 0, cols).unwrap();
        fold_into_linear_rows(&mut want, rows, cols, &sr).unwrap();
        assert_eq!(v, want);
        // composed: one rounding of w · s / sr
        f.mul_cols(&s).unwrap();
        let mut v = w.clone();
        f.apply(&mut v, 0, cols).unwrap();
        for (k, x) in v.iter().enumerate() {
            assert_eq!(*x, (f64::from(w[k]) * s[k % cols] / sr[k / cols]) as f32);
        }
        assert!(!f.is_identity() && Fold::default().is_identity());
        // mismatched vectors are errors, not panics
        assert!(f.mul_cols(&[1.0]).is_err());
        assert!(f.apply(&mut [0.0; 5], 0, cols).is_err());
        assert!(f.apply(&mut vec![0.0; 4 * cols], 0, cols).is_err());
        assert!(Fold { col_mul: Some(vec![1.0; 3]), ..Default::default() }.apply(&mut [0.0; 4], 0, 4).is_err());
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
        let w = [0.3f64, 0.6, 0.9];
        assert_eq!(point_scales(&x, &w, 0.0, false), vec![1.0; 3]);
        assert_eq!(point_scales(&x, &[0.0; 3], 0.0, true), vec![1.0; 3]);
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
        assert!((trace_loss(&d, &h, &mut vec![0.0; rows * cols], rows, cols) - want).abs() < 1e-12);
    }
}
