//! The activations llama.cpp's CPU backend multiplies a weight with.
//!
//! `ggml_compute_forward_mul_mat` (and `_mul_mat_id`, the experts' product) first converts the activation rows to
//! the weight type's `vec_dot_type` ([`sling_core::VecDot`], a column of the descriptor table), then runs integer
//! (or f16/bf16) dot products against the weight's blocks. Those dot products equal the f32 product of the
//! dequantized weight and the dequantized activations up to f32 summation order, so rounding a row to what its
//! `vec_dot_type` block holds and back is how `sling eval --as llama.cpp-cpu` reproduces the runtime's arithmetic.
//!
//! Each function follows the code a CPU with AVX2 runs at the pinned llama.cpp (`ggml/src/ggml-cpu/arch/x86/
//! quants.c`, `ggml/src/ggml-quants.c`), which is what the reference build in CI is:
//! * `q8_0`/`q8_1`: `d = amax / 127` stored as f16, codes `round_even(x · (127 / amax))`; the AVX2 build
//!   multiplies by `127 / amax`, where the scalar `quantize_row_q8_0_ref` multiplies by `1 / d` and rounds half
//!   away from zero.
//! * `q8_K`: `quantize_row_q8_K_ref` (x86 has no SIMD twin): the signed value of largest magnitude `max`,
//!   `iscale = -127 / max`, codes `nearest_int(iscale · x)` capped at 127, `d = 1 / iscale` in f32.
//! * `f16`/`bf16`: round to nearest even (`GGML_CPU_FP32_TO_FP16`, `GGML_FP32_TO_BF16`).
//!
//! Not reproduced: `q8_1`'s second term. A `q4_1`/`q5_1` dot adds `m · s` with `s = f16(d · Σq)`, where the
//! dequantized row gives `m · f16(d) · Σq`; the two differ by one f16 rounding of the sum.

use half::{bf16, f16};
use sling_core::VecDot;

use crate::common::{fp16_to_fp32, fp32_to_fp16};

/// Elements per block of `v` (1 for the plain float types).
pub fn block_len(v: VecDot) -> usize {
    match v {
        VecDot::F32 | VecDot::F16 | VecDot::BF16 => 1,
        VecDot::Q8_0 | VecDot::Q8_1 => 32,
        VecDot::Q8K => 256,
    }
}

/// Rounds `row` in place to the values llama.cpp's CPU backend multiplies with, for a weight whose `vec_dot_type`
/// is `v`. Returns `false`, leaving `row` untouched, when its length is not a whole number of `v`'s blocks (a weight
/// of such a type cannot have that row length; the caller decides what that means).
pub fn round_like_ggml_cpu(row: &mut [f32], v: VecDot) -> bool {
    if row.len() % block_len(v) != 0 {
        return false;
    }
    match v {
        VecDot::F32 => {}
        VecDot::F16 => row.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        VecDot::BF16 => row.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        VecDot::Q8_0 | VecDot::Q8_1 => row.chunks_exact_mut(32).for_each(q8_0_block),
        VecDot::Q8K => row.chunks_exact_mut(256).for_each(q8_k_block),
    }
    true
}

/// One `q8_0` (or `q8_1`) block, quantized as `quantize_row_q8_0`'s AVX2 branch does and dequantized.
fn q8_0_block(b: &mut [f32]) {
    // _mm256_max_ps over |x|: NaN-free activations assumed, as in ggml.
    let amax = b.iter().fold(0f32, |m, x| if x.abs() > m { x.abs() } else { m });
    let d = fp16_to_fp32(fp32_to_fp16(amax / 127.0));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for x in b.iter_mut() {
        *x = d * cvt_pack(*x * id) as f32;
    }
}

/// `_mm256_round_ps(_MM_ROUND_NEAREST)` (half to even), `_mm256_cvtps_epi32` (NaN and out-of-range values become
/// `i32::MIN`, "integer indefinite") and the saturating packs to i8. Only a block of subnormals reaches the
/// indefinite case: `127 / amax` overflows to infinity.
fn cvt_pack(v: f32) -> i8 {
    let r = v.round_ties_even();
    let i = if r.is_nan() || !(-2147483648.0..2147483648.0).contains(&r) { i32::MIN } else { r as i32 };
    i.clamp(-128, 127) as i8
}

/// `nearest_int` without its range assertion: what its bit trick gives for any input (0 for NaN, -4194304 for
/// ±Inf; `quantize_row_q8_K_ref` stores the result in an `int8_t`, keeping the low byte).
fn nearest_int_bits(fval: f32) -> i32 {
    let val = fval + 12582912.0;
    ((val.to_bits() as i32) & 0x007f_ffff) - 0x0040_0000
}

/// One `q8_K` block, quantized as `quantize_row_q8_K_ref` does and dequantized (`dequantize_row_q8_K`).
fn q8_k_block(b: &mut [f32]) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &x in b.iter() {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    if amax == 0.0 {
        b.iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    let iscale = -127.0 / max;
    let d = 1.0 / iscale;
    for x in b.iter_mut() {
        // A block of subnormals overflows `iscale` to infinity; ggml's int8_t store then keeps the low byte.
        let q = nearest_int_bits(iscale * *x).min(127) as i8;
        *x = d * q as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    #[test]
    fn q8_0_codes_are_the_avx2_ones() {
        // Half-way code: x · 127/amax = 2.5 rounds to 2 (even), where roundf would give 3.
        let mut b = vec![0f32; 32];
        b[0] = 127.0;
        b[1] = 2.5;
        assert!(round_like_ggml_cpu(&mut b, VecDot::Q8_0));
        assert_eq!(b[0], 127.0);
        assert_eq!(b[1], 2.0);
    }

    #[test]
    fn q8_k_keeps_the_signed_maximum_and_rounds_within_half_a_step() {
        let mut r = row(512, 7);
        r[3] = -9.0;
        r[300] = 11.0;
        let orig = r.clone();
        assert!(round_like_ggml_cpu(&mut r, VecDot::Q8K));
        // d = 1 / (-127 / max) is not exact: the maximum comes back within a few ulps.
        assert!((r[3] + 9.0).abs() < 4e-6 && (r[300] - 11.0).abs() < 4e-6, "{} {}", r[3], r[300]);
        for (blk, ob) in r.chunks(256).zip(orig.chunks(256)) {
            let amax = ob.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            for (x, o) in blk.iter().zip(ob) {
                assert!((x - o).abs() <= 0.5 * d * 1.0001, "{x} vs {o}");
            }
        }
    }

    #[test]
    fn zero_blocks_and_wrong_lengths() {
        let mut z = vec![0f32; 256];
        assert!(round_like_ggml_cpu(&mut z, VecDot::Q8K));
        assert!(z.iter().all(|&x| x == 0.0));
        let mut short = row(48, 1);
        let before = short.clone();
        assert!(!round_like_ggml_cpu(&mut short, VecDot::Q8_0));
        assert_eq!(short, before);
        assert!(round_like_ggml_cpu(&mut short, VecDot::BF16));
        assert!(short.iter().all(|x| x.to_bits() & 0xffff == 0));
    }
}
