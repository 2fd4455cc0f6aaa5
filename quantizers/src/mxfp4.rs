//! MXFP4 (OCP microscaling FP4: E2M1 values with one E8M0 scale per 32), quantize and dequantize, bit-exact with
//! the pinned llama.cpp (ggml-quants.c, ggml-impl.h). Facts: `../shared/docs/gguf-spec.md` §2.9.
//!
//! `quantize_mxfp4` ignores importance weights and runs `quantize_row_mxfp4_ref`, so `qw` is unused.
//!
//! Block layout (`block_mxfp4`, 17 B, 32 values): `e: u8` (E8M0), `qs[16]`; `qs[j]` holds index `j` in its low
//! nibble and index `j + 16` in its high nibble; the value is `KVALUES_MXFP4[index] * 2^(e - 128)` (the table holds
//! the E2M1 values doubled, hence the halved scale).

/// `kvalues_mxfp4` = `kvalues_fp4` (ggml-common.h): E2M1 values times 2.
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

const QK_MXFP4: usize = 32;
const MXFP4_BYTES: usize = 17;

// Block layout, checked at compile time like ggml-common.h's static_assert: one E8M0 byte, then the nibbles.
const _: () = assert!(MXFP4_BYTES == 1 + QK_MXFP4 / 2);

/// `ggml_e8m0_to_fp32_half` (ggml-impl.h): `2^(x - 128)`, as a subnormal for `x < 2`; NaN (`x = 255`) is not
/// special-cased there either, so 255 gives `2^127`.
#[inline(always)]
pub fn e8m0_to_fp32_half(x: u8) -> f32 {
    if x < 2 {
        f32::from_bits(0x0020_0000 << x)
    } else {
        f32::from_bits((x as u32 - 1) << 23)
    }
}

/// `ggml_e8m0_to_fp32` (ggml-impl.h): `2^(x - 127)`, with `x = 0` as the subnormal `2^-127`.
#[inline(always)]
pub fn e8m0_to_fp32(x: u8) -> f32 {
    if x == 0 {
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits((x as u32) << 23)
    }
}

/// `floorf(log2f(x))` for a positive finite `x`, as the reference computes it with glibc's `log2f`.
///
/// This is not simply the binary exponent: just below a power of two `2^k` (k != 0), `log2f` rounds up to the
/// integer `k` (7456 such inputs among all positive floats), and the floor follows. glibc's `log2f` is correctly
/// rounded there, so the exponent is exact everywhere except within a few hundred ulps below a power of two (at
/// most 89 for normal numbers) and for subnormals; those take `log2` in f64, rounded to f32, which agrees with glibc's
/// `floorf(log2f(x))` on every positive float (checked exhaustively, see the ignored test
/// `floor_log2f_matches_libm_exhaustively` in tests/bitexact_iq4_tq_mxfp4.rs). This keeps the result independent
/// of the platform's `log2f` and keeps the libm call off the common path.
#[inline(always)]
pub fn floor_log2f(x: f32) -> i32 {
    let bits = x.to_bits();
    let biased = (bits >> 23) as i32;
    if biased != 0 && bits & 0x7f_ffff < 0x7f_ff00 {
        return biased - 127;
    }
    let l = (x as f64).log2() as f32;
    // |l| <= 150: the conversion is exact on integers, so this is floorf.
    let i = l as i32;
    if i as f32 > l {
        i - 1
    } else {
        i
    }
}

/// The shared exponent `e` of `quantize_row_mxfp4_ref`:
/// `amax > 0.0f ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0`. The float-to-`uint8_t` conversion is compiled
/// (gcc 12, x86-64) as `cvttss2si` to a 32-bit int and its low byte, so a negative value (`amax < 2^-125`) wraps
/// mod 256 and an infinite `amax` (whose `log2f` is infinite) gives `0x80000000`, i.e. 0.
#[inline(always)]
fn shared_exponent(amax: f32) -> u8 {
    if amax > 0.0 && amax != f32::INFINITY {
        (floor_log2f(amax) - 2 + 127) as u8
    } else {
        0
    }
}

/// `best_index_mxfp4(x, e)` (ggml-quants.c) with `kd[i] = kvalues_mxfp4[i] * e` computed once per block (the same
/// f32 products the C recomputes per value): the first index of least `fabsf(kd[i] - x)` (strict <, so +0 wins
/// over -0 and ties go to the smaller index).
#[inline(always)]
fn best_index(kd: &[f32; 16], x: f32) -> u8 {
    let mut best_index = 0u8;
    let mut best_err = (kd[0] - x).abs();
    for (i, &k) in kd.iter().enumerate().skip(1) {
        let err = (k - x).abs();
        if err < best_err {
            best_index = i as u8;
            best_err = err;
        }
    }
    best_index
}

/// One row of MXFP4: `quantize_row_mxfp4_ref` (ggml-quants.c) per 32-block. `qw` is ignored, as in
/// `quantize_mxfp4`.
#[inline(always)]
pub fn quantize_row_mxfp4(x: &[f32], _qw: Option<&[f32]>, y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_MXFP4).zip(y.chunks_exact_mut(MXFP4_BYTES)) {
        // max |x|, strict < update: NaNs are skipped.
        let mut amax = 0.0f32;
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
            }
        }
        let e = shared_exponent(amax);
        let d = e8m0_to_fp32_half(e);
        let kd: [f32; 16] = std::array::from_fn(|i| KVALUES_MXFP4[i] as f32 * d);
        yb[0] = e;
        for (j, q) in yb[1..17].iter_mut().enumerate() {
            *q = best_index(&kd, xb[j]) | (best_index(&kd, xb[j + 16]) << 4);
        }
    }
}

/// `dequantize_row_mxfp4` (ggml-quants.c): `y = kvalues_mxfp4[index] * 2^(e - 128)`.
pub fn dequantize_row_mxfp4(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(MXFP4_BYTES).zip(x.chunks_exact_mut(QK_MXFP4)) {
        let d = e8m0_to_fp32_half(b[0]);
        let (lo, hi) = out.split_at_mut(16);
        for ((&q, l), h) in b[1..17].iter().zip(lo).zip(hi) {
            *l = KVALUES_MXFP4[(q & 0x0f) as usize] as f32 * d;
            *h = KVALUES_MXFP4[(q >> 4) as usize] as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_conversions() {
        assert_eq!(e8m0_to_fp32(127), 1.0);
        assert_eq!(e8m0_to_fp32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_fp32_half(127), 0.5);
        assert_eq!(e8m0_to_fp32_half(1), 2f32.powi(-127));
        // 2^-128 is subnormal: spelled by its bits (`powi(-128)` may compute 1/2^128 = 1/inf = 0).
        assert_eq!(e8m0_to_fp32_half(0), f32::from_bits(1 << 21));
        assert_eq!(e8m0_to_fp32_half(255), 2f32.powi(127));
        for x in 1..=254u8 {
            assert_eq!(e8m0_to_fp32_half(x), e8m0_to_fp32(x) / 2.0);
        }
    }

    #[test]
    fn shared_exponent_edge_cases() {
        assert_eq!(shared_exponent(0.0), 0);
        assert_eq!(shared_exponent(f32::INFINITY), 0);
        assert_eq!(shared_exponent(6.0), 127); // floor(log2 6) = 2
        assert_eq!(shared_exponent(1.0), 125);
        // Just below 8: log2f rounds up to 3.
        assert_eq!(shared_exponent(f32::from_bits(8.0f32.to_bits() - 1)), 128);
        // gguf-spec §2.9: 2^-126 wraps to 255, 2^-127 to 254.
        assert_eq!(shared_exponent(2f32.powi(-126)), 255);
        assert_eq!(shared_exponent(2f32.powi(-127)), 254);
    }

    #[test]
    fn floor_log2f_matches_libm_near_powers_of_two() {
        // Every input where the exponent shortcut could be wrong lies just below a power of two; compare a window
        // around each one (and the subnormal range's ends) with the platform's log2f, which on glibc is the
        // reference's. Exhaustive check: the ignored test in tests/bitexact_iq4_tq_mxfp4.rs.
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        for k in 1u32..255 {
            let p = k << 23;
            for b in p.saturating_sub(400)..p + 400 {
                let x = f32::from_bits(b);
                if x > 0.0 && x.is_finite() {
                    assert_eq!(floor_log2f(x), x.log2().floor() as i32, "{b:#x}");
                }
            }
        }
    }

    #[test]
    fn round_trip_of_representable_values() {
        // Values on the FP4 grid of their block's scale come back exactly.
        let x: Vec<f32> = (0..64).map(|i| KVALUES_MXFP4[i % 16] as f32 * 0.25).collect();
        let mut y = [0u8; 34];
        quantize_row_mxfp4(&x, None, &mut y);
        let mut back = [0.0f32; 64];
        dequantize_row_mxfp4(&y, &mut back);
        assert_eq!(&back[..], &x[..]);
    }
}
