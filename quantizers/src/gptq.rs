//! GPTQ (Frantar et al., 2022, <https://arxiv.org/abs/2210.17323>) as llm-compressor 0.14 runs it
//! (`modifiers/gptq/gptq_quantize.py` `quantize_weight`, `helpers.py` `factorize_hessian`,
//! `apply_activation_ordering`, the eager `gptq_block_update`): maths on slices, no I/O.
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
    /// [`Grid::quantize`] over the elements of one group, appended to `codes` and `dequant`. Provided, so that each
    /// implementation gets its own copy with `quantize` inlined (a `dyn Grid` caller pays one virtual call per
    /// group, not per element); the results are those of `quantize`.
    fn quantize_group(&self, xs: &[f32], p: &GroupParams, codes: &mut Vec<u8>, dequant: &mut Vec<f32>) {
        for &x in xs {
            let (c, d) = self.quantize(x, p);
            codes.push(c);
            dequant.push(d);
        }
    }
    /// `row` replaced by what the artifact holds for it on this grid: each group's parameters from its original
    /// values, then every element's dequantized value ([`Grid::quantize`]'s second half). What the size-targeted
    /// allocations measure and probe.
    fn roundtrip_row(&self, row: &mut [f32]) {
        let ps = self.row_params(row);
        for (chunk, p) in row.chunks_mut(self.group().min(row.len()).max(1)).zip(&ps) {
            for x in chunk {
                *x = self.quantize(*x, p).1;
            }
        }
    }
    /// This grid as one whose rows the AWQ search quantizes whole ([`crate::awq::delta_row`], which
    /// `sling_kernels` builds for AVX2), if it is one; other grids go group by group.
    fn row_grid(&self) -> Option<RowGrid<'_>> {
        None
    }
    /// [`solve_factored`] on this grid. Provided for the same reason as [`Grid::quantize_group`]: GPTQ's
    /// column loop calls `quantize` once per element, so a `dyn Grid` caller should come through here.
    fn gptq(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        f: &Factor,
        o: &Options,
        update: Update,
    ) -> Result<Solution, GptqError> {
        solve_factored(w, rows, cols, f, self, o, update)
    }
}

/// The grids that quantize-dequantize a whole row in one call (statically dispatched, so that the caller's
/// instruction set reaches every element operation): compressed-tensors' integer grid and MLX's affine grid.
#[derive(Clone, Copy, Debug)]
pub enum RowGrid<'a> {
    Int(&'a crate::ct::IntGrid),
    Affine(&'a crate::mlx::AffineGrid),
}

impl RowGrid<'_> {
    /// `IntGrid::qdq_row` / `AffineGrid::qdq_row`: `false` (row untouched) when the grid has no parameters.
    #[inline(always)]
    pub fn qdq_row(self, row: &mut [f32]) -> bool {
        match self {
            RowGrid::Int(g) => g.qdq_row(row),
            RowGrid::Affine(g) => g.qdq_row(row),
        }
    }

    /// [`Grid::group`] of the grid.
    pub fn group(self) -> usize {
        match self {
            RowGrid::Int(g) => g.group(),
            RowGrid::Affine(g) => g.group(),
        }
    }
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
    #[error("the grid gave {got} parameter groups for a row of {cols} (expected {want}): unsupported bit width?")]
    Params { cols: usize, want: usize, got: usize },
    #[error("GPTQ options: {0}")]
    Options(&'static str),
}

/// Groups per row of `cols` elements under groups of `g` (`g` ≥ 1; `usize::MAX` = one group per row).
fn groups_per_row(cols: usize, g: usize) -> usize {
    cols.div_ceil(g.max(1)).max(1)
}

/// The parameters of every row of `w` (row-major, `rows × ngroups`), checked against the grid's group size.
fn all_params<G: Grid + ?Sized>(w: &[f32], rows: usize, cols: usize, grid: &G) -> Result<Vec<GroupParams>, GptqError> {
    let ng = groups_per_row(cols, grid.group());
    let mut params = Vec::with_capacity(rows * ng);
    for row in w.chunks_exact(cols.max(1)).take(rows) {
        let p = grid.row_params(row);
        if p.len() != ng {
            return Err(GptqError::Params { cols, want: ng, got: p.len() });
        }
        params.extend(p);
    }
    Ok(params)
}

/// Round to nearest on the grid: the reference GPTQ must beat, and what a fallback writes.
pub fn rtn<G: Grid + ?Sized>(w: &[f32], rows: usize, cols: usize, grid: &G) -> Result<Solution, GptqError> {
    if w.len() != rows.saturating_mul(cols) {
        return Err(GptqError::WeightLen { rows, cols, len: w.len() });
    }
    let g = grid.group().max(1);
    let ng = groups_per_row(cols, g);
    let params = if cols == 0 { Vec::new() } else { all_params(w, rows, cols, grid)? };
    let (mut codes, mut dequant) = (Vec::with_capacity(w.len()), Vec::with_capacity(w.len()));
    for (r, row) in w.chunks_exact(cols.max(1)).enumerate() {
        let p = &params[r * ng..(r + 1) * ng];
        for (xs, p) in row.chunks(g).zip(p) {
            grid.quantize_group(xs, p, &mut codes, &mut dequant);
        }
    }
    Ok(Solution { rows, cols, codes, params, dequant, loss: 0.0, fallback: None })
}

/// The dampened Hessian's factor GPTQ runs with (`factorize_hessian`): the upper Cholesky factor `U` of `H⁻¹`
/// (`H⁻¹ = UᵀU`), row-major `n × n` in `f32`, or `None` when a Cholesky factorization fails (not positive
/// definite). `h` is dampened in place. All in `f64` (llm-compressor factorizes in `float32`; `f64` makes the
/// factor of an ill-conditioned Hessian more accurate and changes nothing else), with faer's sequential kernels
/// (`Par::Seq`: the same result for any number of threads).
fn inverse_factor(h: &mut faer::Mat<f64>, damp: f64) -> Option<Vec<f32>> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::{factor, inverse};
    use faer::Par;
    let n = h.nrows();
    // damp = percdamp · mean(diag H); H += damp·I.
    let mean = (0..n).map(|i| h[(i, i)]).sum::<f64>() / n as f64;
    let d = damp * mean;
    for i in 0..n {
        h[(i, i)] += d;
    }
    let chol = |a: &mut faer::Mat<f64>| {
        let mut mem = MemBuffer::new(factor::cholesky_in_place_scratch::<f64>(n, Par::Seq, Default::default()));
        factor::cholesky_in_place(a.as_mut(), Default::default(), Par::Seq, MemStack::new(&mut mem), Default::default())
            .is_ok()
    };
    // torch.linalg.cholesky_ex(H) (lower; faer reads and writes the lower triangle only).
    if !chol(h) {
        return None;
    }
    for j in 0..n {
        for i in 0..j {
            h[(i, j)] = 0.0;
        }
    }
    // torch.cholesky_inverse: H⁻¹ = (LLᵀ)⁻¹, lower triangle.
    let mut inv = faer::Mat::<f64>::zeros(n, n);
    let mut mem = MemBuffer::new(inverse::inverse_scratch::<f64>(n, Par::Seq));
    inverse::inverse(inv.as_mut(), h.as_ref(), Par::Seq, MemStack::new(&mut mem));
    // torch.linalg.cholesky(H⁻¹, upper=True) = (lower factor)ᵀ.
    if !chol(&mut inv) {
        return None;
    }
    let mut u = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = inv[(j, i)] as f32;
        }
    }
    if u.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some(u)
}

/// The part of GPTQ that depends only on the Hessian: the column order, the dead columns and the upper Cholesky
/// factor of the dampened inverse. Weights that share an input (q/k/v, one expert's gate/up, every expert's gate/up
/// with `all_experts`) share it: [`factor`] once, [`solve_factored`] per weight.
#[derive(Clone, Debug)]
pub struct Factor {
    cols: usize,
    /// `perm[j]`: the original column processed `j`-th.
    perm: Vec<usize>,
    /// Processing positions whose Hessian diagonal is 0 (their weights are zeroed before GPTQ, as llm-compressor).
    dead: Vec<usize>,
    /// Row-major `cols × cols` upper factor (identity on [`Fallback`]).
    hinv: Vec<f32>,
    pub fallback: Option<Fallback>,
}

/// [`Factor`] of the Hessian `h` (`cols × cols`, row-major): steps 2–3 of llm-compressor's `quantize_weight`.
pub fn factor(h: &[f64], cols: usize, o: &Options) -> Result<Factor, GptqError> {
    if h.len() != cols.saturating_mul(cols) {
        return Err(GptqError::HessianLen { cols, len: h.len() });
    }
    if o.block == 0 {
        return Err(GptqError::Options("block must be at least 1"));
    }
    if !(o.damp.is_finite() && o.damp >= 0.0) {
        return Err(GptqError::Options("dampening must be finite and non-negative"));
    }
    if h.iter().any(|x| !x.is_finite()) {
        return Err(GptqError::NonFinite);
    }
    // Activation ordering: perm[j] = the original column processed j-th (a stable sort: ties keep column order).
    let mut perm: Vec<usize> = (0..cols).collect();
    if o.act_order {
        perm.sort_by(|&a, &b| h[b * cols + b].partial_cmp(&h[a * cols + a]).unwrap_or(std::cmp::Ordering::Equal));
    }
    let mut hm = faer::Mat::<f64>::from_fn(cols, cols, |i, j| h[perm[i] * cols + perm[j]]);
    // Dead columns, dampening, factorization.
    let mut dead = Vec::new();
    for j in 0..cols {
        if hm[(j, j)] == 0.0 {
            hm[(j, j)] = 1.0;
            dead.push(j);
        }
    }
    let (hinv, fallback) = match inverse_factor(&mut hm, o.damp) {
        Some(u) => (u, None),
        None => {
            let mut eye = vec![0f32; cols * cols];
            for i in 0..cols {
                eye[i * cols + i] = 1.0;
            }
            (eye, Some(Fallback::NotPositiveDefinite))
        }
    };
    Ok(Factor { cols, perm, dead, hinv, fallback })
}

/// GPTQ of `w` (`rows × cols`, row-major) with the Hessian `h` (`cols × cols`, row-major; any positive
/// multiple of `XᵀX` of the layer's inputs, e.g. llm-compressor's `2/n Σ x xᵀ`): [`factor`] then
/// [`solve_factored`].
pub fn solve<G: Grid + ?Sized>(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    grid: &G,
    o: &Options,
) -> Result<Solution, GptqError> {
    if w.len() != rows.saturating_mul(cols) {
        return Err(GptqError::WeightLen { rows, cols, len: w.len() });
    }
    let f = factor(h, cols, o)?;
    solve_factored(w, rows, cols, &f, grid, o, sub_scaled)
}

/// GPTQ of `w` (`rows × cols`, row-major) with a [`Factor`] of its input's Hessian: steps 1, 4 and 5 of
/// llm-compressor's `quantize_weight`, with the column update `update` (the same bits whichever [`Update`]:
/// [`sub_scaled`] or its SIMD twin).
pub fn solve_factored<G: Grid + ?Sized>(
    w: &[f32],
    rows: usize,
    cols: usize,
    f: &Factor,
    grid: &G,
    o: &Options,
    update: Update,
) -> Result<Solution, GptqError> {
    if w.len() != rows.saturating_mul(cols) {
        return Err(GptqError::WeightLen { rows, cols, len: w.len() });
    }
    if f.cols != cols {
        return Err(GptqError::HessianLen { cols, len: f.cols * f.cols });
    }
    if o.block == 0 {
        return Err(GptqError::Options("block must be at least 1"));
    }
    if rows == 0 || cols == 0 {
        return rtn(w, rows, cols, grid);
    }
    let (perm, hinv, fallback) = (&f.perm, &f.hinv, f.fallback);
    let g = grid.group().max(1);
    let ng = groups_per_row(cols, g);
    // 1. The grid of the original weights.
    let params = all_params(w, rows, cols, grid)?;
    let gidx: Vec<usize> = perm.iter().map(|&c| c / g).collect();
    let mut wk = vec![0f32; rows * cols];
    for (dst, src) in wk.chunks_exact_mut(cols).zip(w.chunks_exact(cols)) {
        for (d, &c) in dst.iter_mut().zip(perm) {
            *d = src[c];
        }
    }
    for &j in &f.dead {
        for row in wk.chunks_exact_mut(cols) {
            row[j] = 0.0;
        }
    }

    // 4. Blocks.
    let mut codes_p = vec![0u8; rows * cols];
    let mut deq_p = vec![0f32; rows * cols];
    let mut loss = 0f64;
    let mut err1: Vec<f32> = Vec::new();
    let mut hb: Vec<f32> = Vec::new();
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + o.block).min(cols);
        let bw = i2 - i1;
        // Hinv[i1:i2, i1:i2], contiguous.
        hb.clear();
        for i in i1..i2 {
            hb.extend_from_slice(&hinv[i * cols + i1..i * cols + i2]);
        }
        err1.clear();
        err1.resize(rows * bw, 0.0);
        let block = Block {
            cols,
            i1,
            bw,
            hb: &hb,
            params: &params,
            ng,
            gidx: &gidx,
            wk: &mut wk,
            errs: &mut err1,
            codes: &mut codes_p,
            dequant: &mut deq_p,
        };
        loss += column_loop(grid, block, update);
        if i2 < cols && fallback.is_none() {
            use faer::{Accum, MatMut, MatRef, Par};
            let tail = cols - i2;
            // Row-major `rows × tail` with row stride `cols`, built as the transpose of a column-major view:
            // faer 0.24.4's `MatMut::from_row_major_slice_with_stride_mut` swaps the strides (it lays the slice
            // out column-major), so it must not be used.
            let dst = MatMut::from_column_major_slice_with_stride_mut(&mut wk[i2..], tail, rows, cols).transpose_mut();
            let lhs = MatRef::from_row_major_slice(&err1[..], rows, bw);
            let rhs = MatRef::from_row_major_slice_with_stride(&hinv[i1 * cols + i2..], bw, tail, cols);
            faer::linalg::matmul::matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::Seq);
        }
        i1 = i2;
    }

    // 5. Original column order.
    let (mut codes, mut dequant) = (vec![0u8; rows * cols], vec![0f32; rows * cols]);
    for r in 0..rows {
        for (j, &c) in perm.iter().enumerate() {
            codes[r * cols + c] = codes_p[r * cols + j];
            dequant[r * cols + c] = deq_p[r * cols + j];
        }
    }
    Ok(Solution { rows, cols, codes, params, dequant, loss, fallback })
}

/// One block of columns of every row, what [`column_loop`] works on (all row-major, processing order).
struct Block<'a> {
    cols: usize,
    /// The block's first column and width.
    i1: usize,
    bw: usize,
    /// `Hinv[i1..i1+bw, i1..i1+bw]`, contiguous `bw × bw`.
    hb: &'a [f32],
    /// `rows × ng` group parameters and each processed column's group.
    params: &'a [GroupParams],
    ng: usize,
    gidx: &'a [usize],
    /// The weights being solved (`rows × cols`), the block's errors (`rows × bw`), codes and values.
    wk: &'a mut [f32],
    errs: &'a mut [f32],
    codes: &'a mut [u8],
    dequant: &'a mut [f32],
}

/// The update of one row's remaining block columns after column `k`: `dst[i] -= e · h[i]`, a multiply then a
/// subtraction (two roundings per element, as torch's `W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:])` rounds
/// them; no fused multiply-add). [`sub_scaled`] is the reference; `sling-kernels` has its SIMD twin.
pub type Update = fn(dst: &mut [f32], e: f32, h: &[f32]);

/// The scalar [`Update`].
pub fn sub_scaled(dst: &mut [f32], e: f32, h: &[f32]) {
    for (v, &hv) in dst.iter_mut().zip(h) {
        *v -= e * hv;
    }
}

/// Rows [`column_loop`] runs side by side: their columns are independent, so interleaving a few rows lets the CPU
/// overlap one row's dependent chain (quantize, error, update) with the others'. Each row's arithmetic is unchanged.
const ROWS_AT_ONCE: usize = 4;

/// The eager `gptq_block_update` of one block, row by row: quantize column `k`, its error
/// `(w − q) / Hinv[k, k]`, then `update` the rest of the block's columns. Returns the block's loss (summed per row,
/// the rows in order).
#[inline(always)]
fn column_loop<G: Grid + ?Sized>(grid: &G, b: Block<'_>, update: Update) -> f64 {
    let Block { cols, i1, bw, hb, params, ng, gidx, wk, errs, codes, dequant } = b;
    const R: usize = ROWS_AT_ONCE;
    let mut loss = 0f64;
    let groups = wk.chunks_mut(R * cols).zip(errs.chunks_mut(R * bw)).zip(codes.chunks_mut(R * cols));
    for (g, (((w_now, e_now), c_now), d_now)) in groups.zip(dequant.chunks_mut(R * cols)).enumerate() {
        let mut segs: Vec<&mut [f32]> = w_now.chunks_exact_mut(cols).map(|row| &mut row[i1..i1 + bw]).collect();
        let mut es: Vec<&mut [f32]> = e_now.chunks_exact_mut(bw).collect();
        let mut cs: Vec<&mut [u8]> = c_now.chunks_exact_mut(cols).map(|row| &mut row[i1..i1 + bw]).collect();
        let mut ds: Vec<&mut [f32]> = d_now.chunks_exact_mut(cols).map(|row| &mut row[i1..i1 + bw]).collect();
        let prows: Vec<&[GroupParams]> = params[g * R * ng..].chunks_exact(ng).take(segs.len()).collect();
        let mut row_loss = [0f64; R];
        for k in 0..bw {
            let p = gidx[i1 + k];
            let hkk = hb[k * bw + k];
            let hrow = &hb[k * bw + k + 1..(k + 1) * bw];
            for j in 0..segs.len() {
                let x = segs[j][k];
                let (c, q) = grid.quantize(x, &prows[j][p]);
                cs[j][k] = c;
                ds[j][k] = q;
                let e = if x.is_finite() { (x - q) / hkk } else { 0.0 };
                if !e.is_finite() {
                    continue;
                }
                es[j][k] = e;
                row_loss[j] += f64::from(e) * f64::from(e) / 2.0;
                update(&mut segs[j][k + 1..], e, hrow);
            }
        }
        for l in &row_loss[..segs.len()] {
            loss += l;
        }
    }
    loss
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ct::{self, IntArgs, IntGrid, ScaleDtype};
    use crate::mlx::{self, AffineGrid};

    /// xorshift64* and Box–Muller: seeded test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn u(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn n(&mut self) -> f64 {
            (-2.0 * self.u().ln()).sqrt() * (std::f64::consts::TAU * self.u()).cos()
        }
        fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
            (0..n).map(|_| (self.n() * scale) as f32).collect()
        }
    }

    fn grids() -> Vec<(&'static str, Box<dyn Grid>)> {
        vec![
            (
                "int4 sym bf16",
                Box::new(IntGrid { args: IntArgs { bits: 4, symmetric: true, group: Some(32) }, sd: ScaleDtype::BF16 }),
            ),
            (
                "int4 asym f32",
                Box::new(IntGrid { args: IntArgs { bits: 4, symmetric: false, group: Some(32) }, sd: ScaleDtype::F32 }),
            ),
            (
                "int8 sym f16",
                Box::new(IntGrid { args: IntArgs { bits: 8, symmetric: true, group: Some(32) }, sd: ScaleDtype::F16 }),
            ),
            ("mlx4 bf16", Box::new(AffineGrid { bits: 4, group: 32, sd: ScaleDtype::BF16 })),
            ("mlx3 f32", Box::new(AffineGrid { bits: 3, group: 32, sd: ScaleDtype::F32 })),
        ]
    }

    /// Inputs `n × cols` with correlated features (a shared low-rank part plus noise), and `H = 2/n XᵀX` in f64.
    fn inputs(rng: &mut Rng, n: usize, cols: usize) -> (Vec<f32>, Vec<f64>) {
        let rank = 4;
        let basis = rng.vec(rank * cols, 1.0);
        let mut x = vec![0f32; n * cols];
        for s in 0..n {
            let coef = rng.vec(rank, 1.0);
            for c in 0..cols {
                let mut v = 0.3 * rng.n() as f32;
                for k in 0..rank {
                    v += coef[k] * basis[k * cols + c];
                }
                x[s * cols + c] = v;
            }
        }
        (x.clone(), hessian(&x, n, cols))
    }

    fn hessian(x: &[f32], n: usize, cols: usize) -> Vec<f64> {
        let mut h = vec![0f64; cols * cols];
        for s in x.chunks_exact(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += 2.0 * f64::from(s[i]) * f64::from(s[j]) / n as f64;
                }
            }
        }
        h
    }

    /// ‖(W − Ŵ) Xᵀ‖² over the samples.
    fn out_err(w: &[f32], dq: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
        let mut e = 0.0;
        for r in 0..rows {
            for s in x.chunks_exact(cols) {
                let d: f64 = (0..cols).map(|c| f64::from(w[r * cols + c] - dq[r * cols + c]) * f64::from(s[c])).sum();
                e += d * d;
            }
        }
        e
    }

    fn eye(n: usize, d: f64) -> Vec<f64> {
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            h[i * n + i] = d;
        }
        h
    }

    #[test]
    fn identity_and_diagonal_hessians_give_rtn() {
        let mut rng = Rng(1);
        let (rows, cols) = (8, 96);
        let w = rng.vec(rows * cols, 0.05);
        let mut diag = eye(cols, 1.0);
        for i in 0..cols {
            diag[i * cols + i] = 0.1 + rng.u() * 10.0;
        }
        for (name, g) in grids() {
            let r = rtn(&w, rows, cols, g.as_ref()).unwrap();
            for (h, act_order) in [(eye(cols, 1.0), false), (diag.clone(), false), (diag.clone(), true)] {
                let o = Options { block: 32, act_order, ..Options::default() };
                let s = solve(&w, rows, cols, &h, g.as_ref(), &o).unwrap();
                assert_eq!(s.codes, r.codes, "{name} act_order={act_order}");
                assert_eq!(s.params, r.params, "{name}");
                assert_eq!(s.dequant, r.dequant, "{name}");
                assert!(s.fallback.is_none());
                assert!(s.loss > 0.0);
            }
        }
    }

    #[test]
    fn gptq_beats_rtn_on_correlated_inputs() {
        let mut rng = Rng(7);
        let (rows, cols, n) = (16, 128, 256);
        let w = rng.vec(rows * cols, 0.05);
        let (x, h) = inputs(&mut rng, n, cols);
        for (name, g) in grids() {
            for act_order in [false, true] {
                let o = Options { block: 32, act_order, ..Options::default() };
                let s = solve(&w, rows, cols, &h, g.as_ref(), &o).unwrap();
                let r = rtn(&w, rows, cols, g.as_ref()).unwrap();
                let (es, er) = (out_err(&w, &s.dequant, &x, rows, cols), out_err(&w, &r.dequant, &x, rows, cols));
                eprintln!("{name} act_order={act_order}: GPTQ {es:.4e} RTN {er:.4e} ({:.1}%)", 100.0 * es / er);
                assert!(es < 0.8 * er, "{name}: {es} vs {er}");
                // The dequantized values are the grid's values of the codes.
                for (i, (&c, &d)) in s.codes.iter().zip(&s.dequant).enumerate() {
                    let p = &s.params[(i / cols) * cols.div_ceil(32) + (i % cols) / 32];
                    assert_eq!(g.dequantize(c, p).to_bits(), d.to_bits());
                }
            }
        }
    }

    /// Textbook GPTQ (OBQ order, Frantar et al. 2022 eq. 2–3) in `f64`: explicit inverse, one column at a time,
    /// the inverse updated by Gaussian elimination of the quantized column; no Cholesky, no blocks.
    fn naive(w: &[f32], rows: usize, cols: usize, h: &[f64], grid: &dyn Grid, damp: f64) -> Vec<u8> {
        use faer::linalg::solvers::DenseSolveCore;
        let mean = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
        let hm = faer::Mat::<f64>::from_fn(cols, cols, |i, j| h[i * cols + j] + if i == j { damp * mean } else { 0.0 });
        let mut hinv = hm.llt(faer::Side::Lower).unwrap().inverse();
        let params: Vec<Vec<GroupParams>> = w.chunks(cols).map(|r| grid.row_params(r)).collect();
        let g = grid.group();
        let mut wk: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
        let mut codes = vec![0u8; rows * cols];
        for i in 0..cols {
            let d = hinv[(i, i)];
            for r in 0..rows {
                let (c, q) = grid.quantize(wk[r * cols + i] as f32, &params[r][i / g]);
                codes[r * cols + i] = c;
                let e = (wk[r * cols + i] - f64::from(q)) / d;
                for j in i + 1..cols {
                    wk[r * cols + j] -= e * hinv[(i, j)];
                }
            }
            let col: Vec<f64> = (0..cols).map(|k| hinv[(k, i)]).collect();
            for a in 0..cols {
                for b in 0..cols {
                    hinv[(a, b)] -= col[a] * col[b] / d;
                }
            }
        }
        codes
    }

    #[test]
    fn agrees_with_a_textbook_implementation() {
        let mut rng = Rng(11);
        let (rows, cols, n) = (12, 64, 512);
        let w = rng.vec(rows * cols, 0.05);
        // Well conditioned: plenty of samples, noise on every feature.
        let (_, h) = inputs(&mut rng, n, cols);
        for (name, g) in grids() {
            let reference = naive(&w, rows, cols, &h, g.as_ref(), 0.01);
            for block in [1, 16, 64, 128] {
                let o = Options { block, ..Options::default() };
                let s = solve(&w, rows, cols, &h, g.as_ref(), &o).unwrap();
                let same = s.codes.iter().zip(&reference).filter(|(a, b)| a == b).count();
                assert_eq!(same, rows * cols, "{name} block {block}: {same} of {} codes agree", rows * cols);
            }
        }
    }

    #[test]
    fn blocks_and_column_order_are_consistent() {
        // One group per row: the grid does not depend on column order, so permuting the columns (and H) permutes
        // the act-order result, which must come back in the caller's column order.
        let mut rng = Rng(5);
        let (rows, cols, n) = (6, 48, 200);
        let w = rng.vec(rows * cols, 0.05);
        let (_, h) = inputs(&mut rng, n, cols);
        let g = IntGrid { args: IntArgs { bits: 4, symmetric: false, group: None }, sd: ScaleDtype::BF16 };
        let o = Options { block: 16, act_order: true, ..Options::default() };
        let s = solve(&w, rows, cols, &h, &g, &o).unwrap();
        let perm: Vec<usize> = (0..cols).map(|j| (j * 7 + 3) % cols).collect(); // 7 is prime to 48
        let wp: Vec<f32> = (0..rows * cols).map(|i| w[(i / cols) * cols + perm[i % cols]]).collect();
        let hp: Vec<f64> = (0..cols * cols).map(|i| h[perm[i / cols] * cols + perm[i % cols]]).collect();
        let sp = solve(&wp, rows, cols, &hp, &g, &o).unwrap();
        for r in 0..rows {
            for (j, &pj) in perm.iter().enumerate() {
                assert_eq!(sp.codes[r * cols + j], s.codes[r * cols + pj]);
            }
        }
        assert!((sp.loss - s.loss).abs() <= 1e-9 * s.loss);
        // act-order with an already descending diagonal is the plain order
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by(|&a, &b| h[b * cols + b].partial_cmp(&h[a * cols + a]).unwrap());
        let ws: Vec<f32> = (0..rows * cols).map(|i| w[(i / cols) * cols + order[i % cols]]).collect();
        let hs: Vec<f64> = (0..cols * cols).map(|i| h[order[i / cols] * cols + order[i % cols]]).collect();
        let a = solve(&ws, rows, cols, &hs, &g, &o).unwrap();
        let b = solve(&ws, rows, cols, &hs, &g, &Options { act_order: false, ..o }).unwrap();
        assert_eq!(a.codes, b.codes);
        assert_eq!(a.dequant, b.dequant);
    }

    #[test]
    fn not_positive_definite_falls_back_to_rtn() {
        let mut rng = Rng(3);
        let (rows, cols) = (4, 64);
        let w = rng.vec(rows * cols, 0.05);
        let (_, mut h) = inputs(&mut rng, 100, cols);
        h[5 * cols + 5] = -50.0;
        for (name, g) in grids() {
            for act_order in [false, true] {
                let o = Options { act_order, ..Options::default() };
                let s = solve(&w, rows, cols, &h, g.as_ref(), &o).unwrap();
                assert_eq!(s.fallback, Some(Fallback::NotPositiveDefinite), "{name}");
                let r = rtn(&w, rows, cols, g.as_ref()).unwrap();
                assert_eq!(s.codes, r.codes, "{name}");
                assert_eq!(s.dequant, r.dequant, "{name}");
            }
        }
        h[5 * cols + 5] = f64::NAN;
        let g = AffineGrid { bits: 4, group: 32, sd: ScaleDtype::BF16 };
        assert!(matches!(solve(&w, rows, cols, &h, &g, &Options::default()), Err(GptqError::NonFinite)));
        // an all-zero Hessian: every column dead, H = I after the fix-up: RTN of zeroed weights
        let s = solve(&w, rows, cols, &vec![0.0; cols * cols], &g, &Options::default()).unwrap();
        assert!(s.fallback.is_none());
        let p = &s.params;
        assert!(s.codes.iter().enumerate().all(|(i, &c)| c == g.quantize(0.0, &p[(i / cols) * 2 + (i % cols) / 32]).0));
    }

    #[test]
    fn dead_columns_are_zeroed_and_the_rest_solved() {
        let mut rng = Rng(9);
        let (rows, cols, n) = (8, 64, 300);
        let w = rng.vec(rows * cols, 0.05);
        let (mut x, _) = inputs(&mut rng, n, cols);
        for s in x.chunks_exact_mut(cols) {
            s[3] = 0.0;
            s[40] = 0.0;
        }
        let h = hessian(&x, n, cols);
        for (name, g) in grids() {
            for act_order in [false, true] {
                let o = Options { block: 16, act_order, ..Options::default() };
                let s = solve(&w, rows, cols, &h, g.as_ref(), &o).unwrap();
                assert!(s.fallback.is_none(), "{name}");
                for r in 0..rows {
                    for c in [3, 40] {
                        let p = &s.params[r * 2 + c / 32];
                        assert_eq!(s.codes[r * cols + c], g.quantize(0.0, p).0, "{name}");
                    }
                }
                let rt = rtn(&w, rows, cols, g.as_ref()).unwrap();
                assert!(out_err(&w, &s.dequant, &x, rows, cols) < out_err(&w, &rt.dequant, &x, rows, cols), "{name}");
            }
        }
    }

    #[test]
    fn non_finite_weights_do_not_spread() {
        let mut rng = Rng(13);
        let (rows, cols, n) = (3, 64, 200);
        let mut w = rng.vec(rows * cols, 0.05);
        w[10] = f32::NAN;
        w[70] = f32::INFINITY;
        let (_, h) = inputs(&mut rng, n, cols);
        for (name, g) in grids() {
            let s = solve(&w, rows, cols, &h, g.as_ref(), &Options::default()).unwrap();
            assert!(s.loss.is_finite(), "{name}");
            assert!(s.dequant.iter().all(|v| v.is_finite()), "{name}");
        }
    }

    #[test]
    fn wrong_lengths_and_options_are_errors() {
        let g = IntGrid { args: IntArgs { bits: 4, symmetric: true, group: Some(32) }, sd: ScaleDtype::BF16 };
        let w = vec![0.1f32; 2 * 64];
        let h = eye(64, 1.0);
        let o = Options::default();
        assert!(matches!(solve(&w[1..], 2, 64, &h, &g, &o), Err(GptqError::WeightLen { .. })));
        assert!(matches!(solve(&w, 2, 64, &h[1..], &g, &o), Err(GptqError::HessianLen { .. })));
        assert!(matches!(solve(&w, usize::MAX, 3, &h, &g, &o), Err(GptqError::WeightLen { .. })));
        assert!(matches!(solve(&w, 2, 64, &h, &g, &Options { block: 0, ..o }), Err(GptqError::Options(_))));
        assert!(matches!(solve(&w, 2, 64, &h, &g, &Options { damp: f64::NAN, ..o }), Err(GptqError::Options(_))));
        let bad = IntGrid { args: IntArgs { bits: 9, ..g.args }, sd: ScaleDtype::BF16 };
        assert!(matches!(solve(&w, 2, 64, &h, &bad, &o), Err(GptqError::Params { .. })));
        assert!(matches!(
            rtn(&w, 2, 64, &AffineGrid { bits: 0, group: 32, sd: ScaleDtype::F32 }),
            Err(GptqError::Params { .. })
        ));
        assert!(matches!(rtn(&w, 3, 64, &g), Err(GptqError::WeightLen { .. })));
        // empty shapes
        assert_eq!(solve(&[], 0, 64, &h, &g, &o).unwrap().codes.len(), 0);
        assert_eq!(solve(&[], 5, 0, &[], &g, &o).unwrap().codes.len(), 0);
        // a ragged last group and one group per row
        let w = vec![0.3f32; 2 * 40];
        let s = solve(&w, 2, 40, &eye(40, 1.0), &g, &o).unwrap();
        assert_eq!(s.params.len(), 4);
        let ch = IntGrid { args: IntArgs { bits: 4, symmetric: true, group: None }, sd: ScaleDtype::BF16 };
        assert_eq!(solve(&w, 2, 40, &eye(40, 1.0), &ch, &o).unwrap().params.len(), 2);
        let m0 = AffineGrid { bits: 4, group: 0, sd: ScaleDtype::BF16 };
        assert_eq!(rtn(&w, 2, 40, &m0).unwrap().params.len(), 2);
    }

    /// The grids are the targets' RTN encoders: codes and parameters of `rtn`, packed, are the encoders' bytes.
    #[test]
    fn grid_rtn_is_the_encoders_output() {
        let mut rng = Rng(21);
        for trial in 0..40 {
            let cols = [32, 64, 96, 128, 256][trial % 5];
            let rows = 3;
            let scale = [1e-3, 0.05, 3.0, 100.0][trial % 4];
            let mut w = rng.vec(rows * cols, scale);
            if trial % 7 == 0 {
                w[1] = f32::NAN;
                w[2] = f32::NEG_INFINITY;
                w[cols..2 * cols].iter_mut().for_each(|v| *v = 0.0);
            }
            for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
                for (bits, symmetric, group) in [
                    (4, true, Some(32)),
                    (4, false, Some(32)),
                    (8, true, Some(128)),
                    (4, false, None),
                    (2, true, Some(16)),
                ] {
                    let args = IntArgs { bits, symmetric, group };
                    let s = rtn(&w, rows, cols, &IntGrid { args, sd }).unwrap();
                    let ng = s.params.len() / rows;
                    for r in 0..rows {
                        let row = &w[r * cols..(r + 1) * cols];
                        let (mut c, mut sc, mut z, mut words) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                        ct::quantize_int_row(row, &args, sd, &mut c, &mut sc, &mut z);
                        ct::pack_row(&c, bits, &mut words);
                        let mine: Vec<i8> = s.codes[r * cols..(r + 1) * cols].iter().map(|&b| b as i8).collect();
                        let mut mw = Vec::new();
                        ct::pack_row(&mine, bits, &mut mw);
                        assert_eq!(mw, words);
                        let p = &s.params[r * ng..(r + 1) * ng];
                        assert_eq!(p.iter().map(|p| p.scale).collect::<Vec<_>>(), sc);
                        if !symmetric {
                            assert_eq!(p.iter().map(|p| p.zero as i8).collect::<Vec<_>>(), z);
                        }
                        if sd == ScaleDtype::F32 {
                            let mut d = Vec::new();
                            ct::dequantize_int_row(&c, &sc, (!symmetric).then_some(&z[..]), group.unwrap_or(0), &mut d);
                            assert_eq!(d, s.dequant[r * cols..(r + 1) * cols]);
                        }
                    }
                }
                for bits in [1, 2, 3, 4, 5, 6, 8] {
                    for group in [32, 0] {
                        let s = rtn(&w, rows, cols, &AffineGrid { bits, group, sd }).unwrap();
                        let ng = s.params.len() / rows;
                        for r in 0..rows {
                            let row = &w[r * cols..(r + 1) * cols];
                            let (mut pk, mut sc, mut bi) = (Vec::new(), Vec::new(), Vec::new());
                            mlx::quantize_affine_row(row, bits, group, sd, &mut pk, &mut sc, &mut bi);
                            let mut mine = Vec::new();
                            ct::pack_bits(
                                s.codes[r * cols..(r + 1) * cols].iter().map(|&c| u32::from(c)),
                                bits,
                                &mut mine,
                            );
                            assert_eq!(mine, pk, "bits {bits}");
                            let p = &s.params[r * ng..(r + 1) * ng];
                            assert_eq!(p.iter().map(|p| p.scale).collect::<Vec<_>>(), sc);
                            assert_eq!(p.iter().map(|p| p.zero).collect::<Vec<_>>(), bi);
                            let mut d = Vec::new();
                            mlx::dequantize_affine_row(&pk, bits, group, cols, &sc, &bi, &mut d);
                            assert_eq!(d, s.dequant[r * cols..(r + 1) * cols]);
                        }
                    }
                }
            }
        }
    }
}
/// The two faer pieces on their own: the factor, and the strided row-major product view (faer 0.24.4's
/// `from_row_major_slice_with_stride_mut` lays a slice out column-major; this guards the workaround).
#[cfg(test)]
mod faer_pieces {
    #[test]
    fn factor_is_the_upper_cholesky_of_the_inverse() {
        let n = 64;
        let mut a = faer::Mat::<f64>::from_fn(n, n, |i, j| {
            if i == j {
                2.0 + i as f64
            } else {
                0.5 / (1.0 + (i as f64 - j as f64).abs())
            }
        });
        let orig = a.clone();
        let u = super::inverse_factor(&mut a, 0.0).unwrap();
        // (UᵀU) H ≈ I
        let mut maxe = 0f64;
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0;
                for k in 0..n {
                    let mut hinv = 0.0;
                    for m in 0..n {
                        hinv += f64::from(u[m * n + i]) * f64::from(u[m * n + k]);
                    }
                    s += hinv * orig[(k, j)];
                }
                maxe = maxe.max((s - if i == j { 1.0 } else { 0.0 }).abs());
            }
        }
        assert!(maxe < 1e-5, "{maxe}");
    }
    #[test]
    fn trailing_update_is_row_major() {
        use faer::{Accum, MatMut, MatRef, Par};
        let (rows, cols, i1, i2) = (16usize, 128usize, 32usize, 64usize);
        let bw = i2 - i1;
        let mut wk: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.01).collect();
        let err: Vec<f32> = (0..rows * bw).map(|i| (i % 7) as f32).collect();
        let hinv: Vec<f32> = (0..cols * cols).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut expect = wk.clone();
        for r in 0..rows {
            for j in i2..cols {
                let mut s = 0f32;
                for k in 0..bw {
                    s += err[r * bw + k] * hinv[(i1 + k) * cols + j];
                }
                expect[r * cols + j] -= s;
            }
        }
        let tail = cols - i2;
        let dst = MatMut::from_column_major_slice_with_stride_mut(&mut wk[i2..], tail, rows, cols).transpose_mut();
        let lhs = MatRef::from_row_major_slice(&err[..], rows, bw);
        let rhs = MatRef::from_row_major_slice_with_stride(&hinv[i1 * cols + i2..], bw, tail, cols);
        faer::linalg::matmul::matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::Seq);
        let maxe = wk.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(maxe < 1e-3, "{maxe}");
    }
}
