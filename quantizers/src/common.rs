//! Rounding and scalar helpers shared by the ggml quantizers (`ggml-quants.c`, `ggml-impl.h`).

/// `nearest_int` (ggml-quants.c): round half to even through the float adder, valid for |x| <= 4194303.
#[inline(always)]
pub fn nearest_int(fval: f32) -> i32 {
    debug_assert!(fval.abs() <= 4194303.0 || fval.is_nan());
    let val = fval + 12582912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// `GGML_FP32_TO_FP16` (round to nearest even).
#[inline(always)]
pub fn fp32_to_fp16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// `GGML_FP16_TO_FP32`.
#[inline(always)]
pub fn fp16_to_fp32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// Reads the little-endian f16 at `b[at..at + 2]` as f32.
#[inline(always)]
pub fn read_f16(b: &[u8], at: usize) -> f32 {
    fp16_to_fp32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Writes `x` rounded to f16 at `b[at..at + 2]`.
#[inline(always)]
pub fn write_f16(b: &mut [u8], at: usize, x: f32) {
    b[at..at + 2].copy_from_slice(&fp32_to_fp16(x).to_le_bytes());
}

/// `ggml_compute_fp32_to_fp16` (ggml-impl.h), NaN included: ggml turns every NaN into `sign | 0x7E00`, while
/// `half` keeps the top payload bits. Finite values and infinities round to nearest even in both (checked over all
/// 2^32 inputs by the ignored test `fp16_conversion_matches_ggml_exhaustively` in tests/bitexact_iq4_tq_mxfp4.rs).
#[inline(always)]
pub fn ggml_fp32_to_fp16(x: f32) -> u16 {
    if x.is_nan() {
        ((x.to_bits() >> 16) & 0x8000) as u16 | 0x7e00
    } else {
        fp32_to_fp16(x)
    }
}

/// `SLING_NO_SIMD=1` (any value but `0`) keeps every kernel with a SIMD build on its scalar build (for comparisons
/// and benchmarks); read once.
pub fn simd_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("SLING_NO_SIMD").is_some_and(|v| v != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(7.49), 7);
        assert_eq!(nearest_int(-7.51), -8);
    }
}

/// The first element of `v` that is NaN or ±Inf, with its index. A branch-free scan of the exponent bits first
/// (it vectorises); the position is looked up only when there is one.
pub fn first_nonfinite(v: &[f32]) -> Option<(usize, f32)> {
    let any = v.iter().fold(false, |acc, x| acc | (x.to_bits() & 0x7f80_0000 == 0x7f80_0000));
    if !any {
        return None;
    }
    v.iter().copied().enumerate().find(|(_, x)| !x.is_finite())
}
