//! Q2_K … Q6_K: the 256-element super-block quants (ggml-quants.c), quantize and dequantize, bit-exact with the
//! pinned llama.cpp. Facts: `../shared/docs/gguf-spec.md` §2.6–2.7.
//!
//! Which algorithm runs follows `quantize_q2_K` & co.: without importance weights `quantize_row_qN_K_ref` (C runs it
//! over the whole chunk; it is block-local, so row by row gives the same bytes), with them `quantize_row_qN_K_impl`
//! per row. Every `_impl` computes its statistics (`sigma2`) per 256-block, not per row.
//!
//! Block layouts (ggml-common.h), byte offsets, little endian:
//! - `block_q2_K` (84 B): `scales[16]` @0, `qs[64]` @16, `d: f16` @80, `dmin: f16` @82
//! - `block_q3_K` (110 B): `hmask[32]` @0, `qs[64]` @32, `scales[12]` @96, `d: f16` @108
//! - `block_q4_K` (144 B): `d` @0, `dmin` @2, `scales[12]` @4, `qs[128]` @16
//! - `block_q5_K` (176 B): `d` @0, `dmin` @2, `scales[12]` @4, `qh[32]` @16, `qs[128]` @48
//! - `block_q6_K` (210 B): `ql[128]` @0, `qh[64]` @128, `scales: i8[16]` @192, `d: f16` @208
//!
//! All stores of ints into C's `uint8_t`/`int8_t` fields truncate; the Rust casts (`as u8`, `as i8`) do the same.

use crate::common::{fp16_to_fp32, fp32_to_fp16, read_f16, write_f16};
use crate::search::{
    get_scale_min_k4, make_q3_quants, make_qkx2_quants, make_qkx3_quants, make_qp_quants, make_qx_quants, nearest_int,
    pack_scale_min_k4, QkxParams, GROUP_MAX_EPS,
};

const QK_K: usize = 256;
const Q2_K_BYTES: usize = 84;
const Q3_K_BYTES: usize = 110;
const Q4_K_BYTES: usize = 144;
const Q5_K_BYTES: usize = 176;
const Q6_K_BYTES: usize = 210;

// Block layouts, checked at compile time like ggml-common.h's static_asserts (K_SCALE_SIZE = 12).
const _: () = assert!(Q2_K_BYTES == 2 * 2 + QK_K / 16 + QK_K / 4);
const _: () = assert!(Q3_K_BYTES == 2 + QK_K / 4 + QK_K / 8 + 12);
const _: () = assert!(Q4_K_BYTES == 2 * 2 + 12 + QK_K / 2);
const _: () = assert!(Q5_K_BYTES == 2 * 2 + 12 + QK_K / 2 + QK_K / 8);
const _: () = assert!(Q6_K_BYTES == 2 + QK_K / 16 + 3 * QK_K / 4);

/// The search parameters every K-quant `_impl` passes to `make_qkx3_quants`.
const fn qkx3_params(nmax: i32) -> QkxParams {
    QkxParams { nmax, rmin: -0.9, rdelta: 0.05, nstep: 36, use_mad: false }
}

/// Iterates over the super-blocks of a row as fixed-size arrays (whole blocks only, as the dispatcher guarantees).
#[inline(always)]
fn blocks<'a, const B: usize>(
    x: &'a [f32],
    y: &'a mut [u8],
) -> impl Iterator<Item = (usize, &'a [f32; QK_K], &'a mut [u8; B])> {
    x.chunks_exact(QK_K).zip(y.chunks_exact_mut(B)).enumerate().filter_map(|(i, (xb, yb))| {
        let xb: &[f32; QK_K] = xb.try_into().ok()?;
        let yb: &mut [u8; B] = yb.try_into().ok()?;
        Some((i, xb, yb))
    })
}

/// The importance weights of super-block `i` (`quant_weights + QK_K*i`); empty if the caller passed too few
/// (the zip-based loops then produce zero weights instead of panicking).
#[inline(always)]
fn block_qw(quant_weights: &[f32], i: usize) -> &[f32] {
    quant_weights.get(QK_K * i..QK_K * (i + 1)).unwrap_or(&[])
}

/// `Σ x²` over a super-block, in order.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s
}

/// `weight[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l])` and its sum (`sw[j]`), as the `_impl` functions compute them.
/// The sum starts at 0 and adds in order, like C's `sumw`/`sw[j]` loops.
#[inline(always)]
fn imatrix_weights<const N: usize>(x: &[f32], qw: &[f32], sigma2: f32) -> ([f32; N], f32) {
    let mut w = [0.0f32; N];
    for ((wl, &xl), &q) in w.iter_mut().zip(x).zip(qw) {
        *wl = q * (sigma2 + xl * xl).sqrt();
    }
    let mut sum = 0.0f32;
    for &v in &w {
        sum += v;
    }
    (w, sum)
}

/// The 2-bit packing shared by Q2_K and Q3_K: for each 128-half, `qs[32h + l] = L[l] | L[l+32]<<2 | L[l+64]<<4 |
/// L[l+96]<<6` (int arithmetic truncated to the byte).
#[inline(always)]
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for (h, q) in qs.chunks_exact_mut(32).take(2).enumerate() {
        let j = 128 * h;
        for (k, qk) in q.iter_mut().enumerate() {
            let v = l[j + k] as u32
                | (l[j + k + 32] as u32) << 2
                | (l[j + k + 64] as u32) << 4
                | (l[j + k + 96] as u32) << 6;
            *qk = v as u8;
        }
    }
}

/// The 4-bit packing of Q4_K/Q5_K: for each 64-chunk, `qs[32c + l] = L[l] | L[l+32] << 4` (low 4 bits of `L` in
/// Q5_K, which the caller has already reduced).
#[inline(always)]
fn pack_4bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for (c, q) in qs.chunks_exact_mut(32).take(4).enumerate() {
        let j = 64 * c;
        for (k, qk) in q.iter_mut().enumerate() {
            *qk = ((l[j + k] as u32) | (l[j + k + 32] as u32) << 4) as u8;
        }
    }
}

// ---------------------------------------------------------------- Q2_K

/// `quantize_q2_K` for one row: `quantize_row_q2_K_ref` without weights, `quantize_row_q2_K_impl` with them.
#[inline(always)]
pub fn quantize_row_q2_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    match qw {
        None => quantize_row_q2_k_ref(x, y),
        Some(qw) => quantize_row_q2_k_impl(x, y, qw),
    }
}

/// Everything of a Q2_K block after the sub-block search, shared by `quantize_row_q2_K_ref` (`sw` `None`: 4-bit
/// scales and mins from their maxima) and `_impl` (`sw` the sub-blocks' weight sums: `make_qp_quants`), and by the
/// AVX2 lanes in sling-kernels: the f16 super-scales, then [`q2_k_finish`]. `l` holds the search's levels.
#[inline(always)]
pub fn q2_k_tail(
    x: &[f32; QK_K],
    l: &mut [u8; QK_K],
    scales: &[f32; 16],
    mins: &[f32; 16],
    sw: Option<&[f32; 16]>,
    yb: &mut [u8; Q2_K_BYTES],
) {
    let mut sb = [0u8; 16];
    let (d16, dmin16) = match sw {
        None => {
            const Q4SCALE: f32 = 15.0;
            let mut max_scale = 0.0f32; // as we are deducting the min, scales are always positive
            let mut max_min = 0.0f32;
            for j in 0..16 {
                if scales[j] > max_scale {
                    max_scale = scales[j];
                }
                if mins[j] > max_min {
                    max_min = mins[j];
                }
            }
            let d16 = if max_scale > 0.0 {
                let iscale = Q4SCALE / max_scale;
                for (b, &s) in sb.iter_mut().zip(scales) {
                    *b = nearest_int(iscale * s) as u8;
                }
                fp32_to_fp16(max_scale / Q4SCALE)
            } else {
                fp32_to_fp16(0.0)
            };
            let dmin16 = if max_min > 0.0 {
                let iscale = Q4SCALE / max_min;
                for (b, &m) in sb.iter_mut().zip(mins) {
                    *b |= (nearest_int(iscale * m) << 4) as u8;
                }
                fp32_to_fp16(max_min / Q4SCALE)
            } else {
                fp32_to_fp16(0.0)
            };
            (d16, dmin16)
        }
        Some(sw) => {
            let mut ls = [0u8; 16];
            let mut lm = [0u8; 16];
            let dm = make_qp_quants(15, scales, &mut ls, sw);
            let mm = make_qp_quants(15, mins, &mut lm, sw);
            for j in 0..16 {
                sb[j] = ls[j] | (lm[j] << 4);
            }
            (fp32_to_fp16(dm), fp32_to_fp16(mm))
        }
    };
    yb[80..82].copy_from_slice(&d16.to_le_bytes());
    yb[82..84].copy_from_slice(&dmin16.to_le_bytes());
    q2_k_finish(x, l, &sb, fp16_to_fp32(d16), fp16_to_fp32(dmin16), yb);
}

/// The requantization and packing tail of Q2_K: recomputes `L` from the f16-rounded super-scales (sub-blocks whose
/// scale is 0 keep the search's `L`), then packs.
#[inline(always)]
fn q2_k_finish(x: &[f32; QK_K], l: &mut [u8; QK_K], scales: &[u8; 16], d: f32, dmin: f32, yb: &mut [u8; Q2_K_BYTES]) {
    for j in 0..QK_K / 16 {
        let dj = d * (scales[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * (scales[j] >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / dj);
            l[16 * j + ii] = q.clamp(0, 3) as u8;
        }
    }
    yb[..16].copy_from_slice(scales);
    pack_2bit(l, &mut yb[16..80]);
}

/// `quantize_row_q2_K_ref` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q2_k_ref(x: &[f32], y: &mut [u8]) {
    let p = QkxParams { nmax: 3, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true };
    for (_, xb, yb) in blocks::<Q2_K_BYTES>(x, y) {
        let mut l = [0u8; QK_K];
        let mut mins = [0.0f32; 16];
        let mut scales = [0.0f32; 16];
        for j in 0..QK_K / 16 {
            let xs = &xb[16 * j..16 * j + 16];
            let mut weights = [0.0f32; 16];
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = v.abs();
            }
            (scales[j], mins[j]) = make_qkx2_quants::<16>(xs, &weights, &mut l[16 * j..16 * j + 16], p);
        }
        q2_k_tail(xb, &mut l, &scales, &mins, None, yb);
    }
}

/// `quantize_row_q2_K_impl` (ggml-quants.c; `requantize` is always true there).
#[inline(always)]
fn quantize_row_q2_k_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    for (i, xb, yb) in blocks::<Q2_K_BYTES>(x, y) {
        let qwb = block_qw(quant_weights, i);
        let mut l = [0u8; QK_K];
        let mut mins = [0.0f32; 16];
        let mut scales = [0.0f32; 16];
        let mut sw = [0.0f32; 16];
        let sigma2 = sum_sq(xb) / QK_K as f32;
        for j in 0..QK_K / 16 {
            let xs = &xb[16 * j..16 * j + 16];
            let (weight, sumw) = imatrix_weights::<16>(xs, qwb.get(16 * j..).unwrap_or(&[]), sigma2);
            sw[j] = sumw;
            let (s, m) = make_qkx3_quants::<16>(xs, &weight, &mut l[16 * j..16 * j + 16], qkx3_params(3));
            scales[j] = s;
            mins[j] = m;
        }
        q2_k_tail(xb, &mut l, &scales, &mins, Some(&sw), yb);
    }
}

/// `dequantize_row_q2_K` (ggml-quants.c).
pub fn dequantize_row_q2_k(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q2_K_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = read_f16(yb, 80);
        let min = read_f16(yb, 82);
        let mut is = 0;
        let mut out = 0;
        for n in 0..2 {
            let q = &yb[16 + 32 * n..16 + 32 * n + 32];
            for shift in [0u32, 2, 4, 6] {
                for half in 0..2 {
                    let sc = yb[is];
                    is += 1;
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    for &qv in &q[16 * half..16 * half + 16] {
                        xb[out] = dl * ((qv >> shift) & 3) as f32 - ml;
                        out += 1;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- Q3_K

/// `quantize_q3_K` for one row: `quantize_row_q3_K_ref` without weights, `quantize_row_q3_K_impl` with them.
#[inline(always)]
pub fn quantize_row_q3_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    match qw {
        None => quantize_row_q3_k_ref(x, y),
        Some(qw) => quantize_row_q3_k_impl(x, y, qw),
    }
}

/// Q3_K 6-bit sub-scale packing (the loop in `quantize_row_q3_K_ref` / `_impl`): `l` is the biased scale (0..63).
#[inline(always)]
pub fn q3_k_pack_scale(sb: &mut [u8; 12], j: usize, l: i8) {
    if j < 8 {
        sb[j] = (l & 0xF) as u8;
    } else {
        sb[j - 8] |= ((l & 0xF) << 4) as u8;
    }
    let hi = l >> 4; // arithmetic shift of int8_t, as C's `l >>= 4`
    sb[j % 4 + 8] |= ((hi as i32) << (2 * (j / 4))) as u8;
}

/// The requantization, high-bit split and packing shared by `quantize_row_q3_K_ref` and `_impl`.
#[inline(always)]
fn q3_k_finish(x: &[f32; QK_K], l: &mut [i8; QK_K], sb: &[u8; 12], d16: u16, yb: &mut [u8; Q3_K_BYTES]) {
    let d_all = fp16_to_fp32(d16);
    for j in 0..QK_K / 16 {
        let low = if j < 8 { sb[j] & 0xF } else { sb[j - 8] >> 4 } as i8;
        let sc = (low | (((sb[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) as i8) as i32 - 32;
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    // The high bit of element j goes to bit j/32 of hmask[j%32].
    let mut hmask = [0u8; 32];
    let mut lu = [0u8; QK_K];
    for j in 0..QK_K {
        let mut v = l[j];
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        lu[j] = v as u8;
    }
    yb[..32].copy_from_slice(&hmask);
    pack_2bit(&lu, &mut yb[32..96]);
    yb[96..108].copy_from_slice(sb);
    yb[108..110].copy_from_slice(&d16.to_le_bytes());
}

/// `quantize_row_q3_K_ref` (ggml-quants.c).
#[inline(always)]
fn quantize_row_q3_k_ref(x: &[f32], y: &mut [u8]) {
    for (_, xb, yb) in blocks::<Q3_K_BYTES>(x, y) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let mut max_scale = 0.0f32;
        let mut amax = 0.0f32;
        for j in 0..QK_K / 16 {
            scales[j] = make_q3_quants(4, &xb[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16], true);
            let scale = scales[j].abs();
            if scale > amax {
                amax = scale;
                max_scale = scales[j];
            }
        }
        let mut sb = [0u8; 12];
        let d16 = if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &s) in scales.iter().enumerate() {
                let li = nearest_int(iscale * s) as i8;
                let li = ((li as i32).clamp(-32, 31) + 32) as i8;
                q3_k_pack_scale(&mut sb, j, li);
            }
            fp32_to_fp16(1.0 / iscale)
        } else {
            fp32_to_fp16(0.0)
        };
        q3_k_finish(xb, &mut l, &sb, d16, yb);
    }
}

/// `quantize_row_q3_K_impl` with `quant_weights != NULL` (ggml-quants.c; `quantize_q3_K` never calls it without).
#[inline(always)]
fn quantize_row_q3_k_impl(x: &[f32], y: &mut [u8], quant_weights: &[f32]) {
    for (i, xb, yb) in blocks::<Q3_K_BYTES>(x, y) {
        let qwb = block_qw(quant_weights, i);
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let mut sw = [0.0f32; 16];
        let sigma2 = 2.0 * sum_sq(xb) / QK_K as f32;
        for j in 0..QK_K / 16 {
            let xs = &xb[16 * j..16 * j + 16];
            let (weight, sumw) = imatrix_weights::<16>(xs, qwb.get(16 * j..).unwrap_or(&[]), sigma2);
            sw[j] = sumw;
            scales[j] = make_qx_quants::<16>(4, xs, &mut l[16 * j..16 * j + 16], 1, Some(&weight));
        }
        let mut sb = [0u8; 12];
        let mut ls = [0i8; 16];
        let d_block = make_qx_quants::<16>(32, &scales, &mut ls, 1, Some(&sw));
        for (j, &lj) in ls.iter().enumerate() {
            q3_k_pack_scale(&mut sb, j, lj);
        }
        q3_k_finish(xb, &mut l, &sb, fp32_to_fp16(d_block), yb);
    }
}

/// `dequantize_row_q3_K` (ggml-quants.c), including its `aux` word shuffle to unpack the 6-bit scales.
pub fn dequantize_row_q3_k(y: &[u8], x: &mut [f32]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    for (yb, xb) in y.chunks_exact(Q3_K_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d_all = read_f16(yb, 108);
        let word = |k: usize| u32::from_le_bytes([yb[96 + 4 * k], yb[97 + 4 * k], yb[98 + 4 * k], yb[99 + 4 * k]]);
        let (a0, a1, tmp) = (word(0), word(1), word(2));
        let aux = [
            (a0 & KMASK2) | ((tmp & KMASK1) << 4),
            (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
            ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
            ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
        ];
        let mut scales = [0i8; 16];
        for (k, w) in aux.iter().enumerate() {
            for (b, v) in w.to_le_bytes().iter().enumerate() {
                scales[4 * k + b] = *v as i8;
            }
        }
        let hm = &yb[..32];
        let mut m = 1u8;
        let mut is = 0;
        let mut out = 0;
        for n in 0..2 {
            let q = &yb[32 + 32 * n..32 + 32 * n + 32];
            for shift in [0u32, 2, 4, 6] {
                for half in 0..2 {
                    let dl = d_all * (scales[is] as i32 - 32) as f32;
                    is += 1;
                    for k in 16 * half..16 * half + 16 {
                        let v = ((q[k] >> shift) & 3) as i32 - if hm[k] & m != 0 { 0 } else { 4 };
                        xb[out] = dl * v as f32;
                        out += 1;
                    }
                }
                m = m.wrapping_shl(1);
            }
        }
    }
}

// ---------------------------------------------------------------- Q4_K / Q5_K shared pieces

/// The super-block search of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: per 32-sub-block
/// `w = sqrtf(Σx²/32) + |x|` and `make_qkx2_quants`, then 6-bit quantization of scales and mins against their
/// maxima. Returns the packed scale bytes and the f16 `d`, `dmin`.
#[inline(always)]
fn q45_k_ref_scales(xb: &[f32; QK_K], l: &mut [u8; QK_K], p: QkxParams) -> ([u8; 12], u16, u16) {
    let mut mins = [0.0f32; 8];
    let mut scales = [0.0f32; 8];
    let mut max_scale = 0.0f32; // as we are deducting the min, scales are always positive
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        let xs = &xb[32 * j..32 * j + 32];
        let av_x = (sum_sq(xs) / 32.0).sqrt();
        let mut weights = [0.0f32; 32];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants::<32>(xs, &weights, &mut l[32 * j..32 * j + 32], p);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    (pack_scale_min_k4(&ls, &lm), fp32_to_fp16(max_scale / 63.0), fp32_to_fp16(max_min / 63.0))
}

/// The super-block search of `quantize_row_q4_K_impl` / `quantize_row_q5_K_impl`: `sigma2 = 2Σx²/256`,
/// `w = qw*sqrtf(sigma2 + x²)`, `make_qkx3_quants` per 32-sub-block, then `make_qp_quants` for scales and mins.
/// `clamp63` is Q5_K's extra `MIN(63, ·)` (Q4_K's `_impl` has none).
#[inline(always)]
fn q45_k_impl_scales(
    xb: &[f32; QK_K],
    qwb: &[f32],
    l: &mut [u8; QK_K],
    nmax: i32,
    clamp63: bool,
) -> ([u8; 12], u16, u16) {
    let mut mins = [0.0f32; 8];
    let mut scales = [0.0f32; 8];
    let mut sw = [0.0f32; 8];
    let sigma2 = 2.0 * sum_sq(xb) / QK_K as f32;
    for j in 0..QK_K / 32 {
        let xs = &xb[32 * j..32 * j + 32];
        let (weights, sumw) = imatrix_weights::<32>(xs, qwb.get(32 * j..).unwrap_or(&[]), sigma2);
        sw[j] = sumw;
        let (s, m) = make_qkx3_quants::<32>(xs, &weights, &mut l[32 * j..32 * j + 32], qkx3_params(nmax));
        scales[j] = s;
        mins[j] = m;
    }
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    if clamp63 {
        for v in ls.iter_mut().chain(lm.iter_mut()) {
            *v = (*v).min(63);
        }
    }
    (pack_scale_min_k4(&ls, &lm), fp32_to_fp16(d_block), fp32_to_fp16(m_block))
}

/// The requantization step of Q4_K/Q5_K (ref and impl): `L = clamp(nearest_int((x + dmin*m)/(d*sc)), 0, nmax)` per
/// 32-sub-block from the f16-rounded super-scales; sub-blocks with `d*sc == 0` keep the search's `L`.
#[inline(always)]
fn q45_k_requantize(xb: &[f32; QK_K], l: &mut [u8; QK_K], sb: &[u8; 12], d16: u16, dmin16: u16, nmax: i32) {
    let (d_all, dmin_all) = (fp16_to_fp32(d16), fp16_to_fp32(dmin16));
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, sb);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            let q = nearest_int((xb[32 * j + ii] + dm) / d);
            l[32 * j + ii] = q.clamp(0, nmax) as u8;
        }
    }
}

/// Writes `d`, `dmin` and the 12 scale bytes of a Q4_K/Q5_K block (same header layout).
#[inline(always)]
fn q45_k_header(yb: &mut [u8], sb: &[u8; 12], d16: u16, dmin16: u16) {
    yb[0..2].copy_from_slice(&d16.to_le_bytes());
    yb[2..4].copy_from_slice(&dmin16.to_le_bytes());
    yb[4..16].copy_from_slice(sb);
}

/// The 12 packed scale bytes of a Q4_K/Q5_K block.
#[inline(always)]
fn q45_k_scales(yb: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&yb[4..16]);
    s
}

// ---------------------------------------------------------------- Q4_K

/// `quantize_q4_K` for one row: `quantize_row_q4_K_ref` without weights, `quantize_row_q4_K_impl` with them.
#[inline(always)]
pub fn quantize_row_q4_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let p = QkxParams { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false };
    for (i, xb, yb) in blocks::<Q4_K_BYTES>(x, y) {
        let mut l = [0u8; QK_K];
        let (sb, d16, dmin16) = match qw {
            // quantize_row_q4_K_ref
            None => q45_k_ref_scales(xb, &mut l, p),
            // quantize_row_q4_K_impl
            Some(qw) => q45_k_impl_scales(xb, block_qw(qw, i), &mut l, 15, false),
        };
        q45_k_header(yb, &sb, d16, dmin16);
        q45_k_requantize(xb, &mut l, &sb, d16, dmin16, 15);
        pack_4bit(&l, &mut yb[16..144]);
    }
}

/// `dequantize_row_q4_K` (ggml-quants.c).
pub fn dequantize_row_q4_k(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q4_K_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = read_f16(yb, 0);
        let min = read_f16(yb, 2);
        let sb = q45_k_scales(yb);
        for (c, (q, out)) in yb[16..144].chunks_exact(32).zip(xb.chunks_exact_mut(64)).enumerate() {
            let (sc, m) = get_scale_min_k4(2 * c, &sb);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = get_scale_min_k4(2 * c + 1, &sb);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            let (lo, hi) = out.split_at_mut(32);
            for ((o, &qv), o2) in lo.iter_mut().zip(q).zip(hi.iter_mut()) {
                *o = d1 * (qv & 0xF) as f32 - m1;
                *o2 = d2 * (qv >> 4) as f32 - m2;
            }
        }
    }
}

// ---------------------------------------------------------------- Q5_K

/// `quantize_q5_K` for one row: `quantize_row_q5_K_ref` without weights, `quantize_row_q5_K_impl` with them.
#[inline(always)]
pub fn quantize_row_q5_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let p = QkxParams { nmax: 31, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: false };
    for (i, xb, yb) in blocks::<Q5_K_BYTES>(x, y) {
        let mut l = [0u8; QK_K];
        let (sb, d16, dmin16) = match qw {
            // quantize_row_q5_K_ref
            None => q45_k_ref_scales(xb, &mut l, p),
            // quantize_row_q5_K_impl
            Some(qw) => q45_k_impl_scales(xb, block_qw(qw, i), &mut l, 31, true),
        };
        q45_k_header(yb, &sb, d16, dmin16);
        q45_k_requantize(xb, &mut l, &sb, d16, dmin16, 31);
        // Bit 4 of L[64c + j] goes to bit 2c of qh[j], of L[64c + 32 + j] to bit 2c+1; low nibbles as Q4_K.
        let mut qh = [0u8; 32];
        for c in 0..4 {
            for (j, h) in qh.iter_mut().enumerate() {
                for (k, bit) in [(64 * c + j, 2 * c), (64 * c + 32 + j, 2 * c + 1)] {
                    if l[k] > 15 {
                        l[k] -= 16;
                        *h |= 1 << bit;
                    }
                }
            }
        }
        yb[16..48].copy_from_slice(&qh);
        pack_4bit(&l, &mut yb[48..176]);
    }
}

/// `dequantize_row_q5_K` (ggml-quants.c).
pub fn dequantize_row_q5_k(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q5_K_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = read_f16(yb, 0);
        let min = read_f16(yb, 2);
        let sb = q45_k_scales(yb);
        let qh = &yb[16..48];
        for (c, (ql, out)) in yb[48..176].chunks_exact(32).zip(xb.chunks_exact_mut(64)).enumerate() {
            let (sc, m) = get_scale_min_k4(2 * c, &sb);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = get_scale_min_k4(2 * c + 1, &sb);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            let (lo, hi) = out.split_at_mut(32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * ((ql[l] & 0xF) as i32 + h1) as f32 - m1;
                hi[l] = d2 * ((ql[l] >> 4) as i32 + h2) as f32 - m2;
            }
        }
    }
}

// ---------------------------------------------------------------- Q6_K

/// `quantize_q6_K` for one row: `quantize_row_q6_K_ref` without weights, `quantize_row_q6_K_impl` with them.
/// The two differ only in the weights given to `make_qx_quants` (`NULL` → `x²`, else the raw imatrix slice).
#[inline(always)]
pub fn quantize_row_q6_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    for (i, xb, yb) in blocks::<Q6_K_BYTES>(x, y) {
        let qwb = qw.map(|q| block_qw(q, i));
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for ib in 0..QK_K / 16 {
            let w = qwb.map(|q| q.get(16 * ib..16 * ib + 16).unwrap_or(&[]));
            let scale = make_qx_quants::<16>(32, &xb[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16], 1, w);
            scales[ib] = scale;
            let abs_scale = scale.abs();
            if abs_scale > max_abs_scale {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            // memset(&y[i], 0, ...) then d = f16(0): all bytes zero.
            yb.fill(0);
            write_f16(yb, 208, 0.0);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d16 = fp32_to_fp16(1.0 / iscale);
        let mut sc = [0i8; 16];
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        let d_all = fp16_to_fp32(d16);
        for j in 0..QK_K / 16 {
            let d = d_all * sc[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(xb[16 * j + ii] / d).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let (ql, rest) = yb.split_at_mut(128);
        let (qh, rest) = rest.split_at_mut(64);
        for h in 0..2 {
            let (j, ql, qh) = (128 * h, &mut ql[64 * h..64 * h + 64], &mut qh[32 * h..32 * h + 32]);
            for k in 0..32 {
                // L is 0..63 (non-negative), so `>> 4` of the int8_t is a plain shift.
                let (l1, l2, l3, l4) = (l[j + k] as u8, l[j + k + 32] as u8, l[j + k + 64] as u8, l[j + k + 96] as u8);
                ql[k] = (l1 & 0xF) | ((l3 & 0xF) << 4);
                ql[k + 32] = (l2 & 0xF) | ((l4 & 0xF) << 4);
                qh[k] = (l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4) | ((l4 >> 4) << 6);
            }
        }
        for (dst, &s) in rest[..16].iter_mut().zip(&sc) {
            *dst = s as u8;
        }
        rest[16..18].copy_from_slice(&d16.to_le_bytes());
    }
}

/// `dequantize_row_q6_K` (ggml-quants.c): `y = d * sc * q` evaluated as `(d * sc) * q`.
pub fn dequantize_row_q6_k(y: &[u8], x: &mut [f32]) {
    for (yb, xb) in y.chunks_exact(Q6_K_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = read_f16(yb, 208);
        for h in 0..2 {
            let ql = &yb[64 * h..64 * h + 64];
            let qh = &yb[128 + 32 * h..128 + 32 * h + 32];
            let sc = &yb[192 + 8 * h..192 + 8 * h + 8];
            let out = &mut xb[128 * h..128 * h + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                out[l] = d * sc[is] as i8 as f32 * q1 as f32;
                out[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                out[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                out[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u32) -> Vec<f32> {
        // A deterministic, roughly bell-shaped row.
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..512)
            .map(|_| {
                let mut acc = 0.0f32;
                for _ in 0..4 {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    acc += (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                }
                acc
            })
            .collect()
    }

    type Pair = (fn(&[f32], Option<&[f32]>, &mut [u8]), fn(&[u8], &mut [f32]), usize, f32);

    #[test]
    fn kquants_roundtrip_error_is_bounded() {
        let kinds: [Pair; 5] = [
            (quantize_row_q2_k, dequantize_row_q2_k, Q2_K_BYTES, 0.5),
            (quantize_row_q3_k, dequantize_row_q3_k, Q3_K_BYTES, 0.3),
            (quantize_row_q4_k, dequantize_row_q4_k, Q4_K_BYTES, 0.15),
            (quantize_row_q5_k, dequantize_row_q5_k, Q5_K_BYTES, 0.08),
            (quantize_row_q6_k, dequantize_row_q6_k, Q6_K_BYTES, 0.04),
        ];
        let x = row(7);
        let qw: Vec<f32> = (0..512).map(|i| 1.0 + (i % 5) as f32).collect();
        for (q, dq, bytes, bound) in kinds {
            for w in [None, Some(&qw[..])] {
                let mut y = vec![0u8; 2 * bytes];
                q(&x, w, &mut y);
                let mut back = vec![0.0f32; 512];
                dq(&y, &mut back);
                let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for (a, b) in x.iter().zip(&back) {
                    assert!((a - b).abs() <= bound * amax, "{bytes}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn q3_k_scale_packing_matches_dequantizer() {
        // Pack 16 biased 6-bit scales and read them back through the dequantizer's aux shuffle.
        let mut sb = [0u8; 12];
        let vals: [i8; 16] = [0, 63, 1, 62, 17, 32, 45, 5, 31, 33, 8, 60, 2, 48, 16, 47];
        for (j, &v) in vals.iter().enumerate() {
            q3_k_pack_scale(&mut sb, j, v);
        }
        let mut blk = [0u8; Q3_K_BYTES];
        blk[96..108].copy_from_slice(&sb);
        blk[108..110].copy_from_slice(&fp32_to_fp16(1.0).to_le_bytes());
        // All quants 0 with high bit set → value 0; set hmask bits so that q = 0 → element = 0 * scale. Instead use
        // q = 1 (low bits 01 everywhere, high bit set): element = sc - 32 for every element of sub-block j.
        blk[..32].fill(0xFF);
        blk[32..96].fill(0x55);
        let mut out = [0.0f32; QK_K];
        dequantize_row_q3_k(&blk, &mut out);
        for (j, &v) in vals.iter().enumerate() {
            assert_eq!(out[16 * j], (v as i32 - 32) as f32, "sub-block {j}");
        }
    }
}
