//! GPTQ (Frantar et al., 2022, <https://arxiv.org/abs/2210.17323>) as llm-compressor 0.14 runs it
//! (`modifiers/gptq/gptq_quantize.py` `quantize_weight`, `helpers.py` `factorize_hessian`,
//! `apply_activation_ordering`): maths on slices, no I/O. SKELETON — being filled in.
//!
//! The quantization grid (scales, zero points / biases) of every group is the round-to-nearest grid of the
//! *original* weights, as llm-compressor 0.14 takes it from its weight observer before GPTQ runs; GPTQ only
//! chooses the codes. So a [`Grid`] is the target's RTN encoder seen one group at a time, and `solve` with an
//! identity Hessian gives exactly the RTN codes.

/// The quantization parameters of one group of one row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    /// The scale as stored in the artifact (already rounded to its dtype), as `f32`.
    pub scale: f32,
    /// The zero point (compressed-tensors, as `f32` of the stored integer) or bias (MLX, stored value), as `f32`.
    pub zero: f32,
    /// What element quantization computes codes with (MLX: the unrounded `f32` scale and bias; compressed-tensors:
    /// the stored ones).
    pub q_scale: f32,
    pub q_zero: f32,
}

/// A weight encoding seen one group at a time: what RTN computes for a group, and the code and runtime value of
/// one element under those parameters.
pub trait Grid: Sync + Send {
    /// Elements per group (the last group of a row may be shorter).
    fn group(&self) -> usize;
    /// The parameters of each group of `row` (original values), in order.
    fn row_params(&self, row: &[f32]) -> Vec<GroupParams>;
    /// The code of `x` (as a byte: two's complement for signed codes) and the value a runtime dequantizes it to.
    fn quantize(&self, x: f32, p: &GroupParams) -> (u8, f32);
    /// The value a runtime dequantizes `code` to (the second half of [`Grid::quantize`]).
    fn dequantize(&self, code: u8, p: &GroupParams) -> f32;
}

/// GPTQ settings (llm-compressor's defaults: block 128, dampening 0.01, no activation ordering).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// Columns per lazy-batch block.
    pub block: usize,
    /// Dampening, as a fraction of the mean diagonal of the Hessian.
    pub damp: f64,
    /// Process columns by descending Hessian diagonal (llm-compressor `actorder="weight"`: groups stay the
    /// original consecutive columns, so no `g_idx` is stored).
    pub act_order: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { block: 128, damp: 0.01, act_order: false }
    }
}

/// Why the Hessian could not be used (the weight falls back to RTN, as llm-compressor does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The dampened Hessian is not positive definite.
    NotPositiveDefinite,
}

/// A solved weight.
#[derive(Clone, Debug)]
pub struct Solution {
    pub rows: usize,
    pub cols: usize,
    /// Row-major codes, original column order.
    pub codes: Vec<u8>,
    /// Row-major, `rows × ceil(cols / group)`.
    pub params: Vec<GroupParams>,
    /// Row-major dequantized values (what a runtime computes).
    pub dequant: Vec<f32>,
    /// GPTQ's loss estimate, `Σ err² / 2` as llm-compressor sums it (0 for RTN).
    pub loss: f64,
    pub fallback: Option<Fallback>,
}

#[derive(Debug, thiserror::Error)]
pub enum GptqError {
    #[error("weight is {rows}×{cols} but {len} values were given")]
    WeightLen { rows: usize, cols: usize, len: usize },
    #[error("Hessian must be {cols}×{cols} ({} values) but {len} were given", cols * cols)]
    HessianLen { cols: usize, len: usize },
    #[error("Hessian holds non-finite values")]
    NonFinite,
}

/// Round to nearest on the grid: the reference GPTQ must beat, and what a fallback writes.
pub fn rtn<G: Grid + ?Sized>(w: &[f32], rows: usize, cols: usize, grid: &G) -> Result<Solution, GptqError> {
    if w.len() != rows * cols {
        return Err(GptqError::WeightLen { rows, cols, len: w.len() });
    }
    let g = grid.group().max(1);
    let (mut codes, mut params, mut dequant) =
        (Vec::with_capacity(w.len()), Vec::new(), Vec::with_capacity(w.len()));
    for row in w.chunks_exact(cols.max(1)) {
        let p = grid.row_params(row);
        for (i, &x) in row.iter().enumerate() {
            let (c, d) = grid.quantize(x, &p[i / g]);
            codes.push(c);
            dequant.push(d);
        }
        params.extend(p);
    }
    Ok(Solution { rows, cols, codes, params, dequant, loss: 0.0, fallback: None })
}

/// GPTQ of `w` (`rows × cols`, row-major) with the Hessian `h` (`cols × cols`, row-major; any positive
/// multiple of `XᵀX` of the layer's inputs, e.g. llm-compressor's `2/n Σ x xᵀ`).
pub fn solve<G: Grid + ?Sized>(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    grid: &G,
    o: &Options,
) -> Result<Solution, GptqError> {
    let _ = o;
    if h.len() != cols * cols {
        return Err(GptqError::HessianLen { cols, len: h.len() });
    }
    rtn(w, rows, cols, grid) // SKELETON
}
