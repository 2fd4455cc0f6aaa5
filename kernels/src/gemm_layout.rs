//! How calibration's row-major products map onto column-major BLAS calls (cuBLAS `gemm`): the argument sets the
//! CUDA backend passes (`cuda_gemm.rs`) and how it cuts a product that exceeds its device memory into blocks.
//! Pure functions, so that the layout arithmetic — the usual place for a transposition bug — is tested on every
//! machine against BLAS's definition (`C = α·op(A)·op(B) + β·C`, column-major), without a GPU.

/// One column-major `gemm`: `C (m × n, ld ldc) = op(A) · op(B) (+ C)` with `op(A)` `m × k` and `op(B)` `k × n`;
/// `trans_a`: A is stored `k × m` (ld `lda`) and transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// A `rows × cols` block of `y = x · wᵀ` (all row-major: `x` `rows × k`, `w` `cols × k`, the block `rows × cols`)
/// as one call with **A = the `w` block, B = the `x` block, C = the `y` block**. A row-major `r × c` matrix is a
/// column-major `c × r` one, so C (column-major `cols × rows`) = W (stored `k × cols`, transposed) · X (stored
/// `k × rows`).
pub fn linear_call(rows: usize, cols: usize, k: usize) -> GemmCall {
    GemmCall { trans_a: true, trans_b: false, m: cols, n: rows, k, lda: k, ldb: k, ldc: cols }
}

/// `H += xᵀ · x` for a `rows × k` row-major block of `x` and a `k × k` `H` as one call with **A = B = the block**,
/// β = 1: the block is column-major `k × rows` (= xᵀ), so H = A · Aᵀ. H is symmetric, so its own layout does
/// not matter.
pub fn gram_call(rows: usize, k: usize) -> GemmCall {
    GemmCall { trans_a: false, trans_b: true, m: k, n: k, k: rows, lda: k, ldb: k, ldc: k }
}

/// Row blocks of `x` (`tr` rows) and of `w` (`nc` rows) so that one block each and their product fit in
/// `floats` (a lane's device buffers): `x` takes at most a third, `w` and `y` the rest; at least one row each.
pub fn linear_blocks(t: usize, k: usize, n: usize, floats: usize) -> (usize, usize) {
    let floats = floats.max(3 * k);
    let tr = (floats / 3 / k.max(1)).clamp(1, t.max(1));
    let nc = ((floats - tr * k) / (k + tr)).clamp(1, n.max(1));
    (tr, nc)
}

/// Rows of `x` per block of [`gram_call`] beside a `k × k` f64 `H` in `doubles` (at least 64).
pub fn gram_rows(t: usize, k: usize, doubles: usize) -> usize {
    (doubles.saturating_sub(k * k) / k.max(1)).clamp(64, t.max(64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS `gemm` by its definition, column-major, in f64.
    fn gemm(c: &GemmCall, a: &[f64], b: &[f64], out: &mut [f64], beta: f64) {
        for j in 0..c.n {
            for i in 0..c.m {
                let mut s = 0.0;
                for p in 0..c.k {
                    let av = if c.trans_a { a[p + i * c.lda] } else { a[i + p * c.lda] };
                    let bv = if c.trans_b { b[j + p * c.ldb] } else { b[p + j * c.ldb] };
                    s += av * bv;
                }
                out[i + j * c.ldc] = s + beta * out[i + j * c.ldc];
            }
        }
    }

    fn vals(n: usize, seed: usize) -> Vec<f64> {
        (0..n).map(|i| (((i + seed) * 2654435761) % 1001) as f64 / 500.0 - 1.0).collect()
    }

    #[test]
    fn linear_call_computes_x_times_w_transposed_row_major() {
        for (t, k, n) in [(1, 1, 1), (3, 5, 7), (8, 2, 3), (2, 9, 1)] {
            let (x, w) = (vals(t * k, 1), vals(n * k, 2));
            let mut y = vec![0.0; t * n];
            gemm(&linear_call(t, n, k), &w, &x, &mut y, 0.0);
            for i in 0..t {
                for j in 0..n {
                    let r: f64 = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
                    assert!((y[i * n + j] - r).abs() < 1e-12, "{t}x{k}x{n} [{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn gram_call_accumulates_x_transposed_times_x() {
        for (t, k) in [(1, 1), (5, 3), (2, 7)] {
            let x = vals(t * k, 3);
            let mut h = vec![1.0; k * k];
            gemm(&gram_call(t, k), &x, &x, &mut h, 1.0);
            for i in 0..k {
                for j in 0..k {
                    let r: f64 = 1.0 + (0..t).map(|rr| x[rr * k + i] * x[rr * k + j]).sum::<f64>();
                    assert!((h[i * k + j] - r).abs() < 1e-12, "{t}x{k} [{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn blocks_fit_the_lane_and_cover_the_product() {
        for (t, k, n, floats) in
            [(2048, 2048, 4096, 4 << 20), (1, 7, 1, 0), (5000, 777, 300, 1 << 20), (10, 10, 10, 1 << 30)]
        {
            let (tr, nc) = linear_blocks(t, k, n, floats);
            assert!(tr >= 1 && nc >= 1 && tr <= t.max(1) && nc <= n.max(1));
            let need = tr * k + nc * k + tr * nc;
            assert!(need <= floats.max(3 * k) || (tr == 1 && nc == 1), "{t} {k} {n} {floats}: {need}");
        }
        assert_eq!(linear_blocks(10, 10, 10, 1 << 30), (10, 10));
        assert!(gram_rows(100, 4, 0) >= 64);
    }
}
