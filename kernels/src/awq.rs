//! AWQ's search kernel ([`sling_quantizers::awq::DeltaRow`]) for the best instruction set present: on the grids
//! that quantize whole rows (compressed-tensors' integer grid, MLX's affine grid:
//! [`sling_quantizers::gptq::RowGrid`]), the scalar reference [`sling_quantizers::awq::delta_row_whole`]
//! (everything it calls is `#[inline(always)]`) compiled with AVX2 enabled. No FMA: the same IEEE operations in the
//! same order, so the same bits (tested below). Other grids run the reference.

use sling_quantizers::awq::{delta_row, DeltaRow};
#[cfg(target_arch = "x86_64")]
use sling_quantizers::gptq::{GptqError, Grid, RowGrid};

/// The fastest [`DeltaRow`] this machine runs (the scalar reference under `SLING_NO_SIMD=1`).
pub fn delta() -> DeltaRow {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && !crate::disabled() {
        return delta_row_avx2_checked;
    }
    delta_row
}

/// Only handed out by [`delta`] after the AVX2 check.
#[cfg(target_arch = "x86_64")]
fn delta_row_avx2_checked(
    grid: &dyn Grid,
    w: &[f32],
    s: &[f64],
    ws: &mut [f32],
    d: &mut [f64],
) -> Result<(), GptqError> {
    match grid.row_grid() {
        // SAFETY: `delta` returns this function only when the CPU supports AVX2, the one feature
        // `delta_row_whole_avx2` is built with.
        Some(g) => unsafe { delta_row_whole_avx2(g, w, s, ws, d) },
        None => delta_row(grid, w, s, ws, d),
    }
}

/// [`sling_quantizers::awq::delta_row_whole`] built for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn delta_row_whole_avx2(
    g: RowGrid,
    w: &[f32],
    s: &[f64],
    ws: &mut [f32],
    d: &mut [f64],
) -> Result<(), GptqError> {
    sling_quantizers::awq::delta_row_whole(g, w, s, ws, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sling_quantizers::ct::{IntArgs, IntGrid, ScaleDtype};
    use sling_quantizers::gptq::Grid;
    use sling_quantizers::mlx::AffineGrid;

    use crate::test_rows::row;

    #[test]
    fn same_bits_as_the_reference() {
        let f = delta();
        let mut grids: Vec<Box<dyn Grid>> = Vec::new();
        for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
            for bits in [0, 1, 2, 3, 4, 8, 9] {
                for symmetric in [true, false] {
                    for group in [Some(32), Some(128), Some(100), None] {
                        grids.push(Box::new(IntGrid { args: IntArgs { bits, symmetric, group }, sd }));
                    }
                }
                for group in [0, 32, 64, 100] {
                    grids.push(Box::new(AffineGrid { bits, group, sd }));
                }
            }
        }
        for (k, g) in grids.iter().enumerate() {
            let g = &**g;
            for n in [0usize, 1, 7, 8, 9, 100, 256, 300] {
                let w = row(k as u64 * 31 + n as u64, n);
                let s: Vec<f64> = row(k as u64 * 7 + 3, n)
                    .iter()
                    .map(|v| if v.is_finite() { 0.25 + f64::from(v.abs()).min(4.0) } else { 1.0 })
                    .collect();
                let (mut ws_a, mut d_a) = (vec![0f32; n], vec![0f64; n]);
                let (mut ws_b, mut d_b) = (vec![0f32; n], vec![0f64; n]);
                let a = delta_row(g, &w, &s, &mut ws_a, &mut d_a);
                let b = f(g, &w, &s, &mut ws_b, &mut d_b);
                assert_eq!(a.is_ok(), b.is_ok(), "{k} n = {n}");
                let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let bits64 = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits32(&ws_a), bits32(&ws_b), "{k} n = {n}");
                assert_eq!(bits64(&d_a), bits64(&d_b), "{k} n = {n}");
            }
        }
    }
}
