//! Q4_0, Q4_1, Q5_0, Q5_1: the legacy 32-element block quants (ggml-quants.c), quantize and dequantize, bit-exact
//! with the pinned llama.cpp. Facts: `../shared/docs/gguf-spec.md` §2.3–2.6.
//!
//! Which algorithm runs follows `quantize_q4_0` & co.: without importance weights the `_ref` function, with them
//! the `_impl` function per row (row statistics over the whole row). Rows reach here one at a time from
//! [`crate::ggml::quantize_rows`]; every `_ref` works block by block, so quantizing a whole chunk at once (as C
//! does) or row by row gives the same bytes.
//!
//! Block layouts (ggml-common.h), little endian:
//! - `block_q4_0` (18 B): `d: f16`, `qs[16]`
//! - `block_q4_1` (20 B): `d: f16`, `m: f16`, `qs[16]`
//! - `block_q5_0` (22 B): `d: f16`, `qh: u32`, `qs[16]`
//! - `block_q5_1` (24 B): `d: f16`, `m: f16`, `qh: u32`, `qs[16]`
//!
//! `qs[j]` holds element `j` in its low nibble and element `j + 16` in its high nibble; Q5 `qh` bit `j` is bit 4 of
//! element `j`.

use crate::common::{read_f16, write_f16};
use crate::search::{make_qkx3_quants, make_qx_quants, QkxParams};

const QK: usize = 32;
const Q4_0_BYTES: usize = 18;
const Q4_1_BYTES: usize = 20;
const Q5_0_BYTES: usize = 22;
const Q5_1_BYTES: usize = 24;

// Block layouts, checked at compile time like ggml-common.h's static_asserts: f16 d (and m), then the nibbles
// (and the 32 high bits of Q5).
const _: () = assert!(Q4_0_BYTES == 2 + QK / 2);
const _: () = assert!(Q4_1_BYTES == 2 * 2 + QK / 2);
const _: () = assert!(Q5_0_BYTES == 2 + 4 + QK / 2);
const _: () = assert!(Q5_1_BYTES == 2 * 2 + 4 + QK / 2);

/// The search parameters `quantize_row_q4_1_impl` / `quantize_row_q5_1_impl` pass to `make_qkx3_quants`.
const fn qkx3_params(nmax: i32) -> QkxParams {
    QkxParams { nmax, rmin: -0.9, rdelta: 0.05, nstep: 36, use_mad: false }
}

/// C's `(int8_t)` / `(uint8_t)` cast of a float, as gcc compiles it for x86-64: `cvttss2si` to a 32-bit int
/// (truncation; NaN and out-of-range give `INT_MIN`), then the low byte. Only reached with non-finite values on
/// subnormal blocks (`1/d` overflows to inf), where Rust's saturating `as` would give a different byte.
#[inline(always)]
fn c_f32_to_byte(v: f32) -> i32 {
    let i = if (-2147483648.0..2147483648.0).contains(&v) { v as i32 } else { i32::MIN };
    i as u8 as i32
}

/// `(int8_t)(v)` in C on x86-64 (see [`c_f32_to_byte`]).
#[inline(always)]
fn c_f32_to_i8(v: f32) -> i32 {
    c_f32_to_byte(v) as u8 as i8 as i32
}

/// The block's element with the largest magnitude, signed (first wins: strict `<`), as in
/// `quantize_row_q4_0_ref` / `quantize_row_q5_0_ref`.
#[inline(always)]
fn signed_absmax(x: &[f32; QK]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Min and max of a block, initialised to `FLT_MAX` / `-FLT_MAX` (`quantize_row_q4_1_ref` / `q5_1_ref`).
#[inline(always)]
fn min_max(x: &[f32; QK]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `sigma2 = Σ x² / n_per_row` over the whole row (the legacy `_impl` functions).
#[inline(always)]
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// `weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j])` (the legacy `_impl` functions).
#[inline(always)]
fn block_weights(xb: &[f32; QK], qw: &[f32], sigma2: f32) -> [f32; QK] {
    let mut w = [0.0f32; QK];
    for (j, (wj, q)) in w.iter_mut().zip(qw).enumerate() {
        *wj = q * (sigma2 + xb[j] * xb[j]).sqrt();
    }
    w
}

/// Packs two 16-element nibble halves and returns the Q5 `qh` word (bit 4 of each code), as the Q5 quantizers do.
#[inline(always)]
fn pack_q5(l: &[u8; QK], qs: &mut [u8]) -> u32 {
    let mut qh = 0u32;
    for j in 0..16 {
        let (xi0, xi1) = (l[j], l[j + 16]);
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= ((xi0 as u32 & 0x10) >> 4) << j;
        qh |= ((xi1 as u32 & 0x10) >> 4) << (j + QK / 2);
    }
    qh
}

/// Iterates over the blocks of a row as fixed-size arrays (whole blocks only, as the dispatcher guarantees).
#[inline(always)]
fn blocks<'a, const B: usize>(
    x: &'a [f32],
    y: &'a mut [u8],
) -> impl Iterator<Item = (usize, &'a [f32; QK], &'a mut [u8; B])> {
    x.chunks_exact(QK).zip(y.chunks_exact_mut(B)).enumerate().filter_map(|(i, (xb, yb))| {
        let xb: &[f32; QK] = xb.try_into().ok()?;
        let yb: &mut [u8; B] = yb.try_into().ok()?;
        Some((i, xb, yb))
    })
}

// ---------------------------------------------------------------- Q4_0

/// `quantize_q4_0` for one row: `quantize_row_q4_0_ref` without weights, `quantize_row_q4_0_impl` with them.
#[inline(always)]
pub fn quantize_row_q4_0(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    match qw {
        None => quantize_row_q4_0_ref(x, y),
        Some(qw) => quantize_row_q4_0_impl(x, y, qw),
    }
}

/// `quantize_row_q4_0_ref` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q4_0_ref(x: &[f32], y: &mut [u8]) {
    for (_, xb, yb) in blocks::<Q4_0_BYTES>(x, y) {
        let max = signed_absmax(xb);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(yb, 0, d);
        for j in 0..QK / 2 {
            let x0 = xb[j] * id;
            let x1 = xb[QK / 2 + j] * id;
            // MIN(15, (int8_t)(x + 8.5f)), then stored as uint8_t; the high nibble is `xi1 << 4` truncated.
            let xi0 = c_f32_to_i8(x0 + 8.5).min(15) as u8;
            let xi1 = c_f32_to_i8(x1 + 8.5).min(15) as u8;
            yb[2 + j] = xi0 | (xi1 << 4);
        }
    }
}

/// `quantize_row_q4_0_impl` with `quant_weights != NULL` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q4_0_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    for (ib, xb, yb) in blocks::<Q4_0_BYTES>(x, y) {
        let qw = quant_weights.get(QK * ib..QK * ib + QK).unwrap_or(&[]);
        let weight = block_weights(xb, qw, sigma2);
        let mut l = [0i8; QK];
        let d = make_qx_quants::<QK>(8, xb, &mut l, 1, Some(&weight));
        write_f16(yb, 0, d);
        for j in 0..16 {
            yb[2 + j] = (l[j] as u8) | ((l[j + 16] as u8) << 4);
        }
    }
}

/// `dequantize_row_q4_0` (ggml-quants.c).
pub fn dequantize_row_q4_0(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q4_0_BYTES).zip(x.chunks_exact_mut(QK)) {
        let d = read_f16(yb, 0);
        for j in 0..QK / 2 {
            let q = yb[2 + j];
            let x0 = (q & 0x0F) as i32 - 8;
            let x1 = (q >> 4) as i32 - 8;
            xb[j] = x0 as f32 * d;
            xb[j + QK / 2] = x1 as f32 * d;
        }
    }
}

// ---------------------------------------------------------------- Q4_1

/// `quantize_q4_1` for one row: `quantize_row_q4_1_ref` without weights, `quantize_row_q4_1_impl` with them.
#[inline(always)]
pub fn quantize_row_q4_1(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    match qw {
        None => quantize_row_q4_1_ref(x, y),
        Some(qw) => quantize_row_q4_1_impl(x, y, qw),
    }
}

/// `quantize_row_q4_1_ref` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q4_1_ref(x: &[f32], y: &mut [u8]) {
    for (_, xb, yb) in blocks::<Q4_1_BYTES>(x, y) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(yb, 0, d);
        write_f16(yb, 2, min);
        for j in 0..QK / 2 {
            let x0 = (xb[j] - min) * id;
            let x1 = (xb[QK / 2 + j] - min) * id;
            let xi0 = c_f32_to_i8(x0 + 0.5).min(15) as u8;
            let xi1 = c_f32_to_i8(x1 + 0.5).min(15) as u8;
            yb[4 + j] = xi0 | (xi1 << 4);
        }
    }
}

/// `quantize_row_q4_1_impl` with `quant_weights != NULL` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q4_1_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    for (ib, xb, yb) in blocks::<Q4_1_BYTES>(x, y) {
        let qw = quant_weights.get(QK * ib..QK * ib + QK).unwrap_or(&[]);
        let weight = block_weights(xb, qw, sigma2);
        let mut l = [0u8; QK];
        let (d, the_min) = make_qkx3_quants::<QK>(xb, &weight, &mut l, qkx3_params(15));
        write_f16(yb, 0, d);
        write_f16(yb, 2, -the_min);
        for j in 0..16 {
            yb[4 + j] = l[j] | (l[j + 16] << 4);
        }
    }
}

/// `dequantize_row_q4_1` (ggml-quants.c).
pub fn dequantize_row_q4_1(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q4_1_BYTES).zip(x.chunks_exact_mut(QK)) {
        let d = read_f16(yb, 0);
        let m = read_f16(yb, 2);
        for j in 0..QK / 2 {
            let q = yb[4 + j];
            xb[j] = (q & 0x0F) as f32 * d + m;
            xb[j + QK / 2] = (q >> 4) as f32 * d + m;
        }
    }
}

// ---------------------------------------------------------------- Q5_0

/// `quantize_q5_0` for one row: `quantize_row_q5_0_ref` without weights, `quantize_row_q5_0_impl` with them.
#[inline(always)]
pub fn quantize_row_q5_0(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    match qw {
        None => quantize_row_q5_0_ref(x, y),
        Some(qw) => quantize_row_q5_0_impl(x, y, qw),
    }
}

/// `quantize_row_q5_0_ref` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q5_0_ref(x: &[f32], y: &mut [u8]) {
    for (_, xb, yb) in blocks::<Q5_0_BYTES>(x, y) {
        let max = signed_absmax(xb);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(yb, 0, d);
        let mut l = [0u8; QK];
        for j in 0..QK / 2 {
            let x0 = xb[j] * id;
            let x1 = xb[QK / 2 + j] * id;
            l[j] = c_f32_to_i8(x0 + 16.5).min(31) as u8;
            l[j + 16] = c_f32_to_i8(x1 + 16.5).min(31) as u8;
        }
        let (head, qs) = yb.split_at_mut(6);
        let qh = pack_q5(&l, qs);
        head[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// `quantize_row_q5_0_impl` with `quant_weights != NULL` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q5_0_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    for (ib, xb, yb) in blocks::<Q5_0_BYTES>(x, y) {
        let qw = quant_weights.get(QK * ib..QK * ib + QK).unwrap_or(&[]);
        let weight = block_weights(xb, qw, sigma2);
        let mut l = [0i8; QK];
        let d = make_qx_quants::<QK>(16, xb, &mut l, 1, Some(&weight));
        write_f16(yb, 0, d);
        let l = l.map(|v| v as u8);
        let (head, qs) = yb.split_at_mut(6);
        let qh = pack_q5(&l, qs);
        head[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// `dequantize_row_q5_0` (ggml-quants.c).
pub fn dequantize_row_q5_0(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q5_0_BYTES).zip(x.chunks_exact_mut(QK)) {
        let d = read_f16(yb, 0);
        let qh = u32::from_le_bytes([yb[2], yb[3], yb[4], yb[5]]);
        for j in 0..QK / 2 {
            let xh_0 = ((qh >> j) << 4) & 0x10;
            let xh_1 = (qh >> (j + 12)) & 0x10;
            let q = yb[6 + j] as u32;
            let x0 = ((q & 0x0F) | xh_0) as i32 - 16;
            let x1 = ((q >> 4) | xh_1) as i32 - 16;
            xb[j] = x0 as f32 * d;
            xb[j + QK / 2] = x1 as f32 * d;
        }
    }
}

// ---------------------------------------------------------------- Q5_1

/// `quantize_q5_1` for one row: `quantize_row_q5_1_ref` without weights, `quantize_row_q5_1_impl` with them.
#[inline(always)]
pub fn quantize_row_q5_1(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    match qw {
        None => quantize_row_q5_1_ref(x, y),
        Some(qw) => quantize_row_q5_1_impl(x, y, qw),
    }
}

/// `quantize_row_q5_1_ref` (ggml-quants.c). Note the missing `MIN(31, ·)`: C relies on `(x-min)*id + 0.5 < 32`.
#[inline(always)]
fn quantize_row_q5_1_ref(x: &[f32], y: &mut [u8]) {
    for (_, xb, yb) in blocks::<Q5_1_BYTES>(x, y) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(yb, 0, d);
        write_f16(yb, 2, min);
        let mut l = [0u8; QK];
        for j in 0..QK / 2 {
            let x0 = (xb[j] - min) * id;
            let x1 = (xb[QK / 2 + j] - min) * id;
            l[j] = c_f32_to_byte(x0 + 0.5) as u8;
            l[j + 16] = c_f32_to_byte(x1 + 0.5) as u8;
        }
        let (head, qs) = yb.split_at_mut(8);
        let qh = pack_q5(&l, qs);
        head[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

/// `quantize_row_q5_1_impl` with `quant_weights != NULL` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q5_1_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    let sigma2 = row_sigma2(x);
    for (ib, xb, yb) in blocks::<Q5_1_BYTES>(x, y) {
        let qw = quant_weights.get(QK * ib..QK * ib + QK).unwrap_or(&[]);
        let weight = block_weights(xb, qw, sigma2);
        let mut l = [0u8; QK];
        let (d, the_min) = make_qkx3_quants::<QK>(xb, &weight, &mut l, qkx3_params(31));
        write_f16(yb, 0, d);
        write_f16(yb, 2, -the_min);
        let (head, qs) = yb.split_at_mut(8);
        let qh = pack_q5(&l, qs);
        head[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

/// `dequantize_row_q5_1` (ggml-quants.c).
pub fn dequantize_row_q5_1(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q5_1_BYTES).zip(x.chunks_exact_mut(QK)) {
        let d = read_f16(yb, 0);
        let m = read_f16(yb, 2);
        let qh = u32::from_le_bytes([yb[4], yb[5], yb[6], yb[7]]);
        for j in 0..QK / 2 {
            let xh_0 = ((qh >> j) << 4) & 0x10;
            let xh_1 = (qh >> (j + 12)) & 0x10;
            let q = yb[8 + j] as u32;
            let x0 = (q & 0x0F) | xh_0;
            let x1 = (q >> 4) | xh_1;
            xb[j] = x0 as f32 * d + m;
            xb[j + QK / 2] = x1 as f32 * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_casts_match_x86_truncation() {
        assert_eq!(c_f32_to_i8(8.5), 8);
        assert_eq!(c_f32_to_i8(0.7), 0);
        assert_eq!(c_f32_to_i8(-0.7), 0);
        assert_eq!(c_f32_to_i8(-1.5), -1);
        assert_eq!(c_f32_to_i8(200.0), -56); // low byte of 200
        assert_eq!(c_f32_to_i8(f32::INFINITY), 0); // INT_MIN's low byte
        assert_eq!(c_f32_to_i8(f32::NAN), 0);
        assert_eq!(c_f32_to_byte(31.9), 31);
    }

    #[test]
    fn q4_0_roundtrip_simple_block() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 2.0).collect();
        let mut y = [0u8; Q4_0_BYTES];
        quantize_row_q4_0(&x, None, &mut y);
        let mut back = [0.0f32; 32];
        dequantize_row_q4_0(&y, &mut back);
        // max = -8 → d = 1: every value on the half-grid rounds to within d/2.
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 0.5, "{a} {b}");
        }
    }

    #[test]
    fn q5_qh_bit_layout() {
        // Code 16 (bit 4 set) at element 3 and 20.
        let mut l = [0u8; QK];
        l[3] = 16;
        l[20] = 17;
        let mut qs = [0u8; 16];
        let qh = pack_q5(&l, &mut qs);
        assert_eq!(qh, (1 << 3) | (1 << 20));
        assert_eq!(qs[4], 1 << 4);
    }
}
