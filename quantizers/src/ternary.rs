//! TQ1_0 and TQ2_0: ternary quants for BitNet b1.58 / TriLM weights (ggml-quants.c), quantize and dequantize,
//! bit-exact with the pinned llama.cpp. Facts: `../shared/docs/gguf-spec.md` §2.9.
//!
//! `quantize_tq1_0` / `quantize_tq2_0` ignore importance weights and run the `_ref` function, so `qw` is unused.
//! Each 256-block stores `d = max|x|` as f16 and one trit per value, `lroundf(x * (1/d)) + 1` ∈ {0, 1, 2}; the
//! scale is not searched, so only inputs that are already ternary (`{-a, 0, a}`) survive the round trip exactly.
//!
//! Block layouts (ggml-common.h), little endian:
//! - `block_tq1_0` (54 B): `qs[48]` (5 trits per byte), `qh[4]` (4 trits per byte), `d: f16`
//! - `block_tq2_0` (66 B): `qs[64]` (2 bits per value), `d: f16`

use crate::common::{ggml_fp32_to_fp16, read_f16};

const QK_K: usize = 256;
const TQ1_0_BYTES: usize = 54;
const TQ2_0_BYTES: usize = 66;

// Block layouts, checked at compile time like ggml-common.h's static_asserts.
const _: () = assert!(TQ1_0_BYTES == 2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5);
const _: () = assert!(TQ2_0_BYTES == 2 + QK_K / 4);

/// `int xi = lroundf(v) + 1` as the C computes it on x86-64 glibc: `lroundf` rounds half away from zero, and for a
/// NaN, an infinity or |v| >= 2^63 returns `(long) v` = `LONG_MIN`; the `long + 1` is then truncated to `int`.
/// Only the low bits matter to the callers (the trit packing is done in `uint8_t`). In practice |v| <= 1 + ulp
/// unless the input holds non-finite values or `max|x|` is so small that `1/d` overflows.
#[inline(always)]
fn trit(v: f32) -> i32 {
    if v.abs() < 2147483648.0 {
        // Half away from zero without a libm call: truncate, then look at the exact remaining fraction.
        let i = v as i32;
        let frac = v - i as f32;
        i.wrapping_add((frac >= 0.5) as i32 - (frac <= -0.5) as i32).wrapping_add(1)
    } else if v.abs() < 9223372036854775808.0 {
        // Already an integer at this magnitude: lroundf returns it exactly; keep the low 32 bits of it + 1.
        (v as i64).wrapping_add(1) as i32
    } else {
        // LONG_MIN + 1 truncated to int.
        1
    }
}

/// The TQ scale: `amax = MAX(amax, fabsf(v))` over the block with ggml's `MAX(a, b) = a > b ? a : b` (a NaN
/// therefore survives only as the last value), `d = amax`, `id = d ? 1/d : 0` in f32.
#[inline(always)]
fn scale(xb: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    for &v in xb {
        let a = v.abs();
        amax = if amax > a { amax } else { a };
    }
    let id = if amax != 0.0 { 1.0 / amax } else { 0.0 };
    (amax, id)
}

/// Base-3 packing of `n` trits into one byte, first trit most significant, then `ceil(q * 256 / 243)` so that
/// multiplying by 3^k and taking the top bits reads trit k back (`quantize_row_tq1_0_ref`). The arithmetic is the
/// C's: `q` is a `uint8_t` (wrapping), the division is done in int and stored back into `uint8_t`.
#[inline(always)]
fn pack5(trits: impl Iterator<Item = i32>) -> u8 {
    let mut q = 0u8;
    for xi in trits {
        q = q.wrapping_mul(3).wrapping_add(xi as u8);
    }
    // `((uint16_t)q * 256 + (243 - 1)) / 243`, i.e. a ceiling division.
    (q as u32 * 256).div_ceil(243) as u8
}

/// One row of TQ1_0: `quantize_row_tq1_0_ref` (ggml-quants.c), per 256-block. `qw` is ignored, as in
/// `quantize_tq1_0`.
#[inline(always)]
pub fn quantize_row_tq1_0(x: &[f32], _qw: Option<&[f32]>, y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(TQ1_0_BYTES)) {
        let (d, id) = scale(xb);
        let t = |v: f32| trit(v * id);
        // qs[0..32]: values m + 32n (n = 0..5) of the first 160.
        for m in 0..32 {
            yb[m] = pack5((0..5).map(|n| t(xb[m + 32 * n])));
        }
        // qs[32..48]: values m + 16n of the next 80.
        for m in 0..16 {
            yb[32 + m] = pack5((0..5).map(|n| t(xb[160 + m + 16 * n])));
        }
        // qh[0..4]: 4 trits j + 4m of the last 16, shifted up one trit (`q *= 3`) before the same ceiling division.
        for j in 0..4 {
            yb[48 + j] = pack5((0..4).map(|m| t(xb[240 + j + 4 * m])).chain(std::iter::once(0)));
        }
        yb[52..54].copy_from_slice(&ggml_fp32_to_fp16(d).to_le_bytes());
    }
}

/// Reads trit `n` (0 = most significant) of a byte written by [`pack5`] (`dequantize_row_tq1_0`): `q * 3^n` in
/// `uint8_t`, then `(q * 3) >> 8`, minus 1.
#[inline(always)]
fn unpack_trit(byte: u8, pow3: u8) -> f32 {
    let q = byte.wrapping_mul(pow3);
    (((q as u16 * 3) >> 8) as i16 - 1) as f32
}

/// `dequantize_row_tq1_0` (ggml-quants.c): `y = (float)(trit - 1) * d`, in the order the values were packed.
pub fn dequantize_row_tq1_0(y: &[u8], x: &mut [f32]) {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    for (b, out) in y.chunks_exact(TQ1_0_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 52);
        let (first, rest) = out.split_at_mut(160);
        let (second, last) = rest.split_at_mut(80);
        for (n, o) in first.chunks_exact_mut(32).enumerate() {
            for (v, &q) in o.iter_mut().zip(&b[..32]) {
                *v = unpack_trit(q, POW3[n]) * d;
            }
        }
        for (n, o) in second.chunks_exact_mut(16).enumerate() {
            for (v, &q) in o.iter_mut().zip(&b[32..48]) {
                *v = unpack_trit(q, POW3[n]) * d;
            }
        }
        for (n, o) in last.chunks_exact_mut(4).enumerate() {
            for (v, &q) in o.iter_mut().zip(&b[48..52]) {
                *v = unpack_trit(q, POW3[n]) * d;
            }
        }
    }
}

/// One row of TQ2_0: `quantize_row_tq2_0_ref` (ggml-quants.c), per 256-block. `qw` is ignored, as in
/// `quantize_tq2_0`. For each 128 values c, `qs[32c + m]` holds `(xi & 3) << 2n` of value `128c + m + 32n`.
#[inline(always)]
pub fn quantize_row_tq2_0(x: &[f32], _qw: Option<&[f32]>, y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(TQ2_0_BYTES)) {
        let (d, id) = scale(xb);
        for (xc, qc) in xb.chunks_exact(128).zip(yb[..64].chunks_exact_mut(32)) {
            for (m, q) in qc.iter_mut().enumerate() {
                let mut b = 0u8;
                for n in 0..4 {
                    b = b.wrapping_add(((trit(xc[m + 32 * n] * id) & 3) << (2 * n)) as u8);
                }
                *q = b;
            }
        }
        yb[64..66].copy_from_slice(&ggml_fp32_to_fp16(d).to_le_bytes());
    }
}

/// `dequantize_row_tq2_0` (ggml-quants.c): `y = (float)(q - 1) * d` with `q = (qs[32c + m] >> 2l) & 3`.
pub fn dequantize_row_tq2_0(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(TQ2_0_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 64);
        for (qc, oc) in b[..64].chunks_exact(32).zip(out.chunks_exact_mut(128)) {
            for (l, o) in oc.chunks_exact_mut(32).enumerate() {
                for (v, &q) in o.iter_mut().zip(qc) {
                    *v = (((q >> (2 * l)) & 3) as i32 - 1) as f32 * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trit_is_lroundf_plus_one() {
        assert_eq!(trit(0.5), 2);
        assert_eq!(trit(-0.5), 0);
        assert_eq!(trit(0.49999997), 1);
        assert_eq!(trit(-0.49999997), 1);
        assert_eq!(trit(1.0000001), 2);
        assert_eq!(trit(-1.0), 0);
        assert_eq!(trit(0.0), 1);
        assert_eq!(trit(-0.0), 1);
        assert_eq!(trit(1.5), 3);
        assert_eq!(trit(f32::NAN), 1);
        assert_eq!(trit(f32::INFINITY), 1);
        assert_eq!(trit(4294967296.0), 1);
        for i in -1000..1000 {
            let v = i as f32 / 64.0;
            assert_eq!(trit(v), v.round() as i32 + 1, "{v}");
        }
    }

    #[test]
    fn ternary_inputs_round_trip_exactly() {
        // Values in {-a, 0, a} with a exact in f16 come back exactly from both types.
        let a = 0.375f32;
        let x: Vec<f32> = (0..512).map(|i| [(-a), 0.0, a][(i * 7 + i / 3) % 3]).collect();
        let mut y1 = vec![0u8; 2 * TQ1_0_BYTES];
        let mut y2 = vec![0u8; 2 * TQ2_0_BYTES];
        quantize_row_tq1_0(&x, None, &mut y1);
        quantize_row_tq2_0(&x, None, &mut y2);
        let mut b1 = vec![0.0f32; 512];
        let mut b2 = vec![0.0f32; 512];
        dequantize_row_tq1_0(&y1, &mut b1);
        dequantize_row_tq2_0(&y2, &mut b2);
        assert_eq!(b1, x);
        assert_eq!(b2, x);
    }
}
