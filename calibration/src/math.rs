//! Numerical building blocks on row-major `f32` matrices: GEMM (faer's, in fixed tiles split over rayon; the
//! attention's small per-head products through `ndarray`/`matrixmultiply`), RMSNorm, activations,
//! softmax and causal attention. Everything accumulates in `f32` (RMSNorm's mean of squares in `f64`).

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut1, Axis};
use rayon::prelude::*;

/// Rows of one output tile of [`linear`]: every tile is exactly this many rows (the last one padded with zero
/// rows), because the GEMM kernels' blocking depends on the operands' shapes: with one shape for every tile, an
/// output row's bits depend on its input row only, not on the thread count, on how many tokens share the call or
/// where the row sits among them (so a routed expert's rows are the same whether the expert runs over its tokens
/// or over every token, `Model::all_experts`).
const TILE_ROWS: usize = 64;
/// Output columns of one tile (the last tile of a row narrower: a function of the weight's shape only).
const TILE_COLS: usize = 256;

/// `y = x · wᵀ (+ b)`: `x` `[t, in]`, `w` `[out, in]` (PyTorch `nn.Linear` layout), `y` `[t, out]`.
///
/// faer's GEMM (`Par::Seq`, dispatched to AVX-512 where the CPU has it: about twice `matrixmultiply`'s AVX2
/// throughput there) over [`TILE_ROWS`] × [`TILE_COLS`] tiles run in parallel by rayon, each into its own buffer.
pub fn linear(x: ArrayView2<f32>, w: ArrayView2<f32>, b: Option<&[f32]>) -> Array2<f32> {
    let (t, k, out) = (x.nrows(), x.ncols(), w.nrows());
    debug_assert_eq!(k, w.ncols());
    let (xs, ws) = (x.as_standard_layout(), w.as_standard_layout());
    let mut y = Array2::<f32>::zeros((t, out));
    let (Some(xs), Some(ws), Some(ys)) = (xs.as_slice(), ws.as_slice(), y.as_slice_mut()) else {
        // unreachable (standard layout is contiguous), but a slower product beats a panic
        general_mat_mul(1.0, &x, &w.t(), 0.0, &mut y);
        return add_bias(y, b);
    };
    if t > 0 && out > 0 && k > 0 {
        ys.par_chunks_mut(TILE_ROWS * out).enumerate().for_each(|(bi, band)| {
            let rows = band.len() / out;
            let full = &xs[bi * TILE_ROWS * k..(bi * TILE_ROWS + rows) * k];
            let padded: Vec<f32>;
            let lhs = if rows == TILE_ROWS {
                full
            } else {
                let mut p = vec![0f32; TILE_ROWS * k];
                p[..full.len()].copy_from_slice(full);
                padded = p;
                &padded[..]
            };
            let lhs = faer::MatRef::from_row_major_slice(lhs, TILE_ROWS, k);
            let starts: Vec<usize> = (0..out).step_by(TILE_COLS).collect();
            let tiles: Vec<(usize, Vec<f32>)> = starts
                .into_par_iter()
                .map(|c0| {
                    let n = TILE_COLS.min(out - c0);
                    let mut tile = vec![0f32; TILE_ROWS * n];
                    let dst = faer::MatMut::from_row_major_slice_mut(&mut tile, TILE_ROWS, n);
                    let rhs = faer::MatRef::from_row_major_slice(&ws[c0 * k..(c0 + n) * k], n, k).transpose();
                    faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1.0f32, faer::Par::Seq);
                    (c0, tile)
                })
                .collect();
            for (c0, tile) in tiles {
                let n = tile.len() / TILE_ROWS;
                for (yrow, trow) in band.chunks_exact_mut(out).zip(tile.chunks_exact(n)) {
                    yrow[c0..c0 + n].copy_from_slice(trow);
                }
            }
        });
    }
    add_bias(y, b)
}

/// Rows of `x` per f32 product in [`add_gram`]: each chunk's `XᵀX` is computed in `f32` (as llm-compressor
/// accumulates its Hessians) and added to the `f64` sum, which bounds the `f32` sums to 1024 terms.
const GRAM_ROWS: usize = 1024;
/// Rows and columns of one block of [`add_gram`]'s `XᵀX`.
const GRAM_TILE: usize = 256;

/// `sum += XᵀX` for `x` `[n, c]` row-major and `sum` `[c, c]` row-major: chunks of [`GRAM_ROWS`] rows, each
/// chunk's lower-triangle [`GRAM_TILE`] × [`GRAM_TILE`] blocks by faer's GEMM (`Par::Seq`, the blocks in parallel), the
/// upper triangle then mirrored from the lower. Every element's sum runs over the same chunks and block shape
/// whatever the thread count. Slices shorter than the shapes say are an error of the caller: nothing is added.
pub fn add_gram(sum: &mut [f64], x: &[f32], n: usize, c: usize) {
    if c == 0 || sum.len() != c * c || x.len() < n * c {
        return;
    }
    let nb = c.div_ceil(GRAM_TILE);
    for r0 in (0..n).step_by(GRAM_ROWS) {
        let m = GRAM_ROWS.min(n - r0);
        let xm = faer::MatRef::from_row_major_slice(&x[r0 * c..(r0 + m) * c], m, c);
        sum.par_chunks_mut(GRAM_TILE * c).enumerate().for_each(|(bi, band)| {
            let i0 = bi * GRAM_TILE;
            let h = band.len() / c;
            let mut tile = vec![0f32; h * GRAM_TILE];
            for bj in 0..=bi.min(nb - 1) {
                let j0 = bj * GRAM_TILE;
                let w = GRAM_TILE.min(c - j0);
                let dst = faer::MatMut::from_row_major_slice_mut(&mut tile[..h * w], h, w);
                let lhs = xm.subcols(i0, h).transpose();
                let rhs = xm.subcols(j0, w);
                faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1.0f32, faer::Par::Seq);
                for (row, trow) in band.chunks_exact_mut(c).zip(tile.chunks_exact(w)) {
                    row[j0..j0 + w].iter_mut().zip(trow).for_each(|(s, &t)| *s += f64::from(t));
                }
            }
        });
    }
    for i in 0..c {
        for j in i + 1..c {
            sum[i * c + j] = sum[j * c + i];
        }
    }
}

fn add_bias(mut y: Array2<f32>, b: Option<&[f32]>) -> Array2<f32> {
    if let Some(b) = b {
        for mut row in y.rows_mut() {
            row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
        }
    }
    y
}

/// How RMSNorm's mean of squares is summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Squares {
    /// Each square exact in f64 (sling's forward pass).
    #[default]
    F64,
    /// Each square rounded to f32, then summed in f64: ggml's `rms_norm` (`ggml_compute_forward_rms_norm_f32`,
    /// `sum += (ggml_float)(x[i]*x[i])`), for `Model::llama_cpp_cpu`. A scale one ulp apart moves an activation
    /// across an 8-bit rounding boundary now and then, and the two runs take different branches from there.
    F32,
}

/// RMSNorm of one row (a view) in place, `w * (x * rsqrt(mean(x²) + eps))`, the squares summed as `sq` says.
pub fn rms_norm_view(mut row: ArrayViewMut1<f32>, w: &[f32], eps: f32, sq: Squares) {
    let n = row.len();
    if n == 0 {
        return;
    }
    let sum = match sq {
        Squares::F64 => row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>(),
        Squares::F32 => row.iter().map(|&v| (v * v) as f64).sum::<f64>(),
    };
    let ms = sum / n as f64;
    let r = 1.0 / ((ms as f32) + eps).sqrt();
    row.iter_mut().zip(w).for_each(|(v, wi)| *v = wi * (*v * r));
}

/// RMSNorm over the rows of a matrix (parallel over rows), the squares summed as `sq` says.
pub fn rms_norm_rows(x: &Array2<f32>, w: &[f32], eps: f32, sq: Squares) -> Array2<f32> {
    let mut y = x.to_owned();
    y.axis_iter_mut(Axis(0)).into_par_iter().for_each(|row| rms_norm_view(row, w, eps, sq));
    y
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Softmax of `x` in place (float32, max-subtracted).
pub fn softmax(x: &mut [f32]) {
    softmax_view(ArrayViewMut1::from(x), None);
}

/// Softmax of a row in place; with `sink`, one extra logit joins the normalisation and is dropped.
pub fn softmax_view(mut x: ArrayViewMut1<f32>, sink: Option<f32>) {
    let m = x.iter().copied().fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
    if m == f32::NEG_INFINITY {
        return;
    }
    let mut sum = sink.map_or(0.0, |s| (s - m).exp());
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

/// Indices of the `k` largest values of `x` (ties: the lower index first), in descending order.
pub fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Parameters of one attention call over a batch of sequences.
pub struct AttnShape<'a> {
    /// `(start row, length)` of each sequence in the flattened token matrices.
    pub seqs: &'a [(usize, usize)],
    pub n_heads: usize,
    /// Heads of `k` and of `v` (each divides `n_heads`; query head h uses k head `h / (n_heads / n_k)`).
    pub n_k: usize,
    pub n_v: usize,
    /// Width of a query/key head and of a value head.
    pub dk: usize,
    pub dv: usize,
    pub scale: f32,
    /// Sliding window: key j is visible from query i when `i - j < window`.
    pub window: Option<usize>,
    /// gpt-oss attention sinks: one logit per head joining the softmax (then dropped).
    pub sinks: Option<&'a [f32]>,
}

/// Causal softmax attention: `q` `[T, n_heads*dk]`, `k` `[T, n_k*dk]`, `v` `[T, n_v*dv]` ->
/// `[T, n_heads*dv]`. Sequences and heads run in parallel.
pub fn attention(q: &Array2<f32>, k: &Array2<f32>, v: &Array2<f32>, a: &AttnShape) -> Array2<f32> {
    let t = q.nrows();
    let (gk, gv) = (a.n_heads / a.n_k.max(1), a.n_heads / a.n_v.max(1));
    let jobs: Vec<(usize, usize)> = (0..a.seqs.len()).flat_map(|s| (0..a.n_heads).map(move |h| (s, h))).collect();
    let outs: Vec<Array2<f32>> = jobs
        .par_iter()
        .map(|&(si, h)| {
            let (st, len) = a.seqs[si];
            let qh = q.slice(s![st..st + len, h * a.dk..(h + 1) * a.dk]);
            let kh = k.slice(s![st..st + len, (h / gk) * a.dk..(h / gk + 1) * a.dk]);
            let vh = v.slice(s![st..st + len, (h / gv) * a.dv..(h / gv + 1) * a.dv]);
            let mut sc = Array2::<f32>::zeros((len, len));
            general_mat_mul(1.0, &qh, &kh.t(), 0.0, &mut sc);
            let sink = a.sinks.map(|s| s[h]);
            for (i, mut row) in sc.rows_mut().into_iter().enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    let visible = j <= i && !matches!(a.window, Some(w) if i - j >= w);
                    *x = if visible { *x * a.scale } else { f32::NEG_INFINITY };
                }
                softmax_view(row, sink);
            }
            let mut o = Array2::<f32>::zeros((len, a.dv));
            general_mat_mul(1.0, &sc, &vh, 0.0, &mut o);
            o
        })
        .collect();
    let mut out = Array2::<f32>::zeros((t, a.n_heads * a.dv));
    for (&(si, h), o) in jobs.iter().zip(outs) {
        let (st, len) = a.seqs[si];
        out.slice_mut(s![st..st + len, h * a.dv..(h + 1) * a.dv]).assign(&o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_linear(x: &Array2<f32>, w: &Array2<f32>) -> Array2<f32> {
        let mut y = Array2::zeros((x.nrows(), w.nrows()));
        for i in 0..x.nrows() {
            for j in 0..w.nrows() {
                y[[i, j]] = (0..x.ncols()).map(|k| x[[i, k]] as f64 * w[[j, k]] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn pseudo(n: usize, m: usize, seed: u32) -> Array2<f32> {
        let mut s = seed;
        Array2::from_shape_fn((n, m), |_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
    }

    #[test]
    fn linear_matches_naive_on_every_split() {
        for (t, i, o) in [(3, 5, 7), (300, 64, 40), (4, 64, 3000), (1, 1, 1)] {
            let (x, w) = (pseudo(t, i, 1), pseudo(o, i, 2));
            let b: Vec<f32> = (0..o).map(|j| j as f32 * 0.01).collect();
            let y = linear(x.view(), w.view(), Some(&b));
            let mut r = naive_linear(&x, &w);
            r.rows_mut().into_iter().for_each(|mut row| row.iter_mut().zip(&b).for_each(|(v, bi)| *v += bi));
            let err = (&y - &r).iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(err < 1e-4, "{t}x{i}x{o}: {err}");
        }
    }

    /// A row's bits depend on its input row only: not on how many rows share the call, where the row sits among
    /// them, or the thread count (what `Model::all_experts` and the `-t 1`/`-t 2` contracts rely on).
    #[test]
    fn linear_rows_do_not_depend_on_the_batch() {
        let (x, w) = (pseudo(200, 300, 7), pseudo(520, 300, 8));
        let full = linear(x.view(), w.view(), None);
        for rows in [vec![0usize], vec![199, 3, 64, 65], (37..150).collect::<Vec<_>>(), (0..200).rev().collect()] {
            let xs = x.select(Axis(0), &rows);
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let part = one.install(|| linear(xs.view(), w.view(), None));
            for (k, &r) in rows.iter().enumerate() {
                let same = part.row(k).iter().zip(full.row(r)).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "row {r} (at {k} of {})", rows.len());
            }
        }
    }

    #[test]
    fn add_gram_is_the_symmetric_sum_of_products() {
        for (n, c) in [(1usize, 1usize), (5, 3), (1100, 40), (300, 520)] {
            let x = pseudo(n, c, 9);
            let xs = x.as_slice().unwrap();
            let mut sum = vec![0.5f64; c * c];
            add_gram(&mut sum, xs, n, c);
            for i in 0..c {
                for j in 0..c {
                    let want = 0.5 + (0..n).map(|r| f64::from(xs[r * c + i]) * f64::from(xs[r * c + j])).sum::<f64>();
                    let got = sum[i * c + j];
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{n}x{c} [{i},{j}]: {got} vs {want}");
                    assert_eq!(got.to_bits(), sum[j * c + i].to_bits(), "symmetric");
                }
            }
        }
        // wrong lengths add nothing
        let mut sum = vec![0f64; 4];
        add_gram(&mut sum, &[1.0; 3], 2, 2);
        assert_eq!(sum, vec![0.0; 4]);
    }

    #[test]
    fn rms_norm_unit_rows() {
        let x = rms_norm_rows(
            &Array2::from_shape_vec((2, 2), vec![3.0, 4.0, 0.0, 0.0]).unwrap(),
            &[1.0, 2.0],
            1e-12,
            Squares::F64,
        );
        let x = x.as_slice().unwrap();
        let r = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 0.0]);
    }

    #[test]
    fn ggml_squares_round_each_square_to_f32() {
        // Squares of 12-bit mantissas need 24+ bits: rounded to f32 one by one (ggml) the scale comes out an ulp
        // apart from the exact f64 sum here (found by search), and with it the normalised values.
        let row = [1.1899414f32, 1.3034668, 1.2841797];
        let norm = |sq| {
            let mut a = Array2::from_shape_vec((1, 3), row.to_vec()).unwrap();
            rms_norm_view(a.row_mut(0), &[1.0; 3], 0.0, sq);
            a
        };
        let ggml_sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let r = 1.0 / ((ggml_sum / 3.0) as f32).sqrt();
        let ggml: Vec<f32> = row.iter().map(|&v| 1.0 * (v * r)).collect();
        assert_eq!(norm(Squares::F32).into_raw_vec_and_offset().0, ggml);
        assert_ne!(norm(Squares::F32), norm(Squares::F64));
        assert_eq!(
            norm(Squares::F64),
            rms_norm_rows(&Array2::from_shape_vec((1, 3), row.to_vec()).unwrap(), &[1.0; 3], 0.0, Squares::F64)
        );
    }

    #[test]
    fn top_k_orders_and_breaks_ties_low() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
    }

    #[test]
    fn attention_first_token_sees_itself_and_sinks_dilute() {
        let q = pseudo(3, 4, 3);
        let k = pseudo(3, 4, 4);
        let v = pseudo(3, 4, 5);
        let seqs = [(0, 3)];
        let a =
            AttnShape { seqs: &seqs, n_heads: 1, n_k: 1, n_v: 1, dk: 4, dv: 4, scale: 0.5, window: None, sinks: None };
        let o = attention(&q, &k, &v, &a);
        assert_eq!(o.row(0), v.row(0));
        let sinks = [0.0f32];
        let a2 = AttnShape { sinks: Some(&sinks), ..a };
        let o2 = attention(&q, &k, &v, &a2);
        // one key at weight e^x / (e^x + e^0)
        let x = 0.5 * (0..4).map(|i| q[[0, i]] * k[[0, i]]).sum::<f32>();
        let p = x.exp() / (x.exp() + 1.0);
        for i in 0..4 {
            assert!((o2[[0, i]] - p * v[[0, i]]).abs() < 1e-6);
        }
        // window 1: every token sees only itself
        let a3 = AttnShape { window: Some(1), ..a };
        assert_eq!(attention(&q, &k, &v, &a3), v);
    }
}
