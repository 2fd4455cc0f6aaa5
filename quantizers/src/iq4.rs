//! IQ4_NL and IQ4_XS: 4-bit non-linear quants (ggml-quants.c), quantize and dequantize, bit-exact with the pinned
//! llama.cpp. Facts: `../shared/docs/gguf-spec.md` §2.3 (`best_index_int8`, `nearest_int`) and §2.8.
//!
//! llama-quantize reaches these through `quantize_iq4_nl` / `quantize_iq4_xs`, which call
//! `quantize_row_iq4_nl_impl(..., ntry = 7)` whether or not importance weights are given (without them the
//! weights are `x²`). The `_ref` variant of IQ4_NL (`ntry = -1`) is never used by `ggml_quantize_chunk`, so it is
//! not ported.
//!
//! Block layouts (ggml-common.h), little endian:
//! - `block_iq4_nl` (18 B, 32 values): `d: f16`, `qs[16]`
//! - `block_iq4_xs` (136 B, 256 values): `d: f16`, `scales_h: u16`, `scales_l[4]`, `qs[128]`
//!
//! Within each 32 values `qs[j]` holds index `j` in its low nibble and index `j + 16` in its high nibble; the
//! value is `scale * KVALUES_IQ4NL[index]`.
//!
//! Floating point: every operation is the C one, in the C order, in f32 (the reference is compiled for baseline
//! x86-64 without FMA contraction; Rust never fuses `a*b + c`).

use crate::common::{ggml_fp32_to_fp16, nearest_int, read_f16};

/// `kvalues_iq4nl` (ggml-common.h): the 16 non-linear levels.
pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// The same levels as f32 (exact), which is how C uses them once promoted in float expressions.
const KV: [f32; 16] = {
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = KVALUES_IQ4NL[i] as f32;
        i += 1;
    }
    t
};

/// `GROUP_MAX_EPS` (ggml-quants.c): a 32-block whose max |x| is below it gets scale 0.
const GROUP_MAX_EPS: f32 = 1e-15;

/// The `ntry` that `quantize_iq4_nl` and `quantize_iq4_xs` pass to `quantize_row_iq4_nl_impl`.
const NTRY: i32 = 7;

const QK4_NL: usize = 32;
const QK_K: usize = 256;
const IQ4_NL_BYTES: usize = 18;
const IQ4_XS_BYTES: usize = 136;

// Block layouts, checked at compile time like ggml-common.h's static_asserts.
const _: () = assert!(IQ4_NL_BYTES == 2 + QK4_NL / 2);
const _: () = assert!(IQ4_XS_BYTES == 2 + 2 + QK_K / 64 + QK_K / 2);

/// `best_index_int8(16, kvalues_iq4nl, x)` (ggml-quants.c), line for line: clamp to the ends, binary search for
/// `val[mu-1] <= x < val[mu]`, then the nearer of the two with ties going up. A NaN `x` falls through every
/// comparison and ends at index 15. Kept as the readable reference for [`best_index`], which the loops use.
#[inline(always)]
pub fn best_index_int8(x: f32) -> usize {
    if x <= KV[0] {
        return 0;
    }
    if x >= KV[15] {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < KV[mav] {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - KV[mu - 1] < KV[mu] - x {
        mu - 1
    } else {
        mu
    }
}

/// Midpoints between neighbouring levels, `(val[i] + val[i+1]) / 2` (exact halves).
const MID: [f32; 15] = {
    let mut t = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = (KVALUES_IQ4NL[i] as f32 + KVALUES_IQ4NL[i + 1] as f32) * 0.5;
        i += 1;
    }
    t
};

/// Steps between neighbouring levels, `val[i+1] - val[i]` (exact small integers).
const STEP: [f32; 15] = {
    let mut t = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = KVALUES_IQ4NL[i + 1] as f32 - KVALUES_IQ4NL[i] as f32;
        i += 1;
    }
    t
};

/// [`best_index_int8`] as the number of midpoints `m` with `!(x < m)`, without branches (the binary search
/// mispredicts on every call, and this runs 16 times per value).
///
/// Why this is the same function for every f32 `x`: between two neighbours `lo < hi` the C picks `hi` iff
/// `!(fl(x - lo) < fl(hi - x))`; `fl` is monotone, so that holds from some threshold on. At the midpoint and the
/// float just below it both differences are exact (each is at most 12.5, a multiple of ulp(x) >= 2^-21, and fits
/// in 24 bits at that precision, for each of the 15 midpoints), so the threshold is the midpoint itself, ties
/// going up as in C. Below `val[0]` and above `val[15]` the
/// count is 0 and 15, as the C's end checks; a NaN passes every `!(x < m)` and gets 15, as the C's search does.
/// Checked against [`best_index_int8`] around every midpoint and level and on random values (unit tests), and
/// on every f32 by the ignored test `best_index_matches_the_binary_search_exhaustively`.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x < m)` is the point: NaN must count as "not below"
fn best_index(x: f32) -> usize {
    let mut n = 0usize;
    for &m in &MID {
        n += !(x < m) as usize;
    }
    n
}

/// `kvalues_iq4nl[best_index_int8(x)]` as an f32: `val[0]` plus the steps of the midpoints passed (a sum of small
/// integers, exact in any order). Branch-free and table-free, so the 16 scale trials vectorise as lanes.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // as in `best_index`
fn level(x: f32) -> f32 {
    let mut q = KV[0];
    for (&m, &s) in MID.iter().zip(&STEP) {
        q += if !(x < m) { s } else { 0.0 };
    }
    q
}

/// Little-endian f16 store with ggml's rounding (`GGML_FP32_TO_FP16`, NaN included).
#[inline(always)]
fn put_f16(b: &mut [u8], at: usize, x: f32) {
    b[at..at + 2].copy_from_slice(&ggml_fp32_to_fp16(x).to_le_bytes());
}

/// `sigma2` of `quantize_row_iq4_nl_impl`: the in-order f32 sum of squares over the super-block, times
/// `2.f/super_block_size`.
#[inline(always)]
fn sigma2(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s * (2.0 / x.len() as f32)
}

/// The per-32-block part of `quantize_row_iq4_nl_impl` with `ntry = 7`: the weights, then the scale search.
/// Returns `scales[ib]` (0 for a block whose max |x| is below `GROUP_MAX_EPS`). The indices the C stores in `Lb`
/// on the way are dead with `ntry > 0` (both callers recompute all of them afterwards), so they are not kept.
#[inline(always)]
fn block_scale(xb: &[f32; 32], qw: Option<&[f32]>, sigma2: f32) -> f32 {
    // Signed value of the largest |x|, first one wins (strict >); NaNs never win.
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in xb {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let mut weight = [0.0f32; 32];
    match qw {
        Some(qw) => {
            for ((w, &q), &v) in weight.iter_mut().zip(qw).zip(xb) {
                *w = q * (sigma2 + v * v).sqrt();
            }
        }
        None => {
            for (w, &v) in weight.iter_mut().zip(xb) {
                *w = v * v;
            }
        }
    }
    // The C runs 16 passes over the block, one per inverse scale: first `id = 1/d` with `d = -max/values[0]`
    // (ntry > 0), then `id = (itry + values[0])/max` for itry = -7..=7; each pass picks the nearest level per
    // value and accumulates `sumqx += (w*q)*x`, `sumq2 += (w*q)*q` in value order. The passes only meet in the
    // comparisons afterwards, so they run here side by side, one lane each: every lane does exactly the C's
    // operations in the C's order (bit-identical), and the 16 independent sums vectorise instead of waiting on
    // one long chain of dependent adds.
    let mut ids = [0.0f32; 16];
    ids[0] = 1.0 / (-max / KV[0]);
    for (id, itry) in ids[1..].iter_mut().zip(-NTRY..=NTRY) {
        // `(itry + values[0])/max`: an int converted to float, then divided.
        *id = (itry + KVALUES_IQ4NL[0] as i32) as f32 / max;
    }
    let mut sumqx = [0.0f32; 16];
    let mut sumq2 = [0.0f32; 16];
    for (&v, &w) in xb.iter().zip(&weight) {
        for t in 0..16 {
            let q = level(ids[t] * v);
            sumqx[t] += w * q * v;
            sumq2[t] += w * q * q;
        }
    }
    let mut d = if sumq2[0] > 0.0 { sumqx[0] / sumq2[0] } else { 0.0 };
    let mut best = d * sumqx[0];
    for t in 1..16 {
        if sumq2[t] > 0.0 && sumqx[t] * sumqx[t] > best * sumq2[t] {
            d = sumqx[t] / sumq2[t];
            best = d * sumqx[t];
        }
    }
    d
}

/// Packs the indices of 32 values scaled by the inverse scale `id` into `qs` (16 bytes): the C fills `L` with
/// `best_index_int8(16, values, id*x[j])`, then `q4[j] = L[j] | L[j+16] << 4`.
#[inline(always)]
fn pack_indices(xb: &[f32; 32], id: f32, qs: &mut [u8]) {
    let mut l = [0u8; 32];
    for (li, &v) in l.iter_mut().zip(xb) {
        *li = best_index(id * v) as u8;
    }
    for (j, q) in qs.iter_mut().take(16).enumerate() {
        *q = l[j] | (l[j + 16] << 4);
    }
}

/// One row of IQ4_NL: `quantize_iq4_nl` (ggml-quants.c) for one row, i.e. `quantize_row_iq4_nl_impl(QK4_NL, 32,
/// ..., qw, ntry = 7)` per 32-block, with the row's weights for that block when given. `x.len()` is a multiple of 32
/// and `y` holds exactly its blocks.
#[inline(always)]
pub fn quantize_row_iq4_nl(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    for (ib, (xb, yb)) in x.chunks_exact(QK4_NL).zip(y.chunks_exact_mut(IQ4_NL_BYTES)).enumerate() {
        let Ok(xb): Result<&[f32; 32], _> = xb.try_into() else { continue };
        let qwb = qw.map(|w| &w[ib * QK4_NL..(ib + 1) * QK4_NL]);
        let scale = block_scale(xb, qwb, sigma2(xb));
        // One block per super-block: dh = f16(scales[0]); with ntry > 0 all indices are recomputed with the f32
        // scale (a zero scale gives id = 0, so every index is best_index(0) = 8).
        put_f16(yb, 0, scale);
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        pack_indices(xb, id, &mut yb[2..18]);
    }
}

/// `dequantize_row_iq4_nl` (ggml-quants.c): `y = d * kvalues_iq4nl[index]`.
pub fn dequantize_row_iq4_nl(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(IQ4_NL_BYTES).zip(x.chunks_exact_mut(QK4_NL)) {
        let d = read_f16(b, 0);
        let (lo, hi) = out.split_at_mut(16);
        for ((&q, l), h) in b[2..18].iter().zip(lo).zip(hi) {
            *l = d * KV[(q & 0xf) as usize];
            *h = d * KV[(q >> 4) as usize];
        }
    }
}

/// One row of IQ4_XS: `quantize_iq4_xs` (ggml-quants.c) for one row, i.e. `quantize_row_iq4_nl_impl(QK_K, 32, ...,
/// qw, ntry = 7)` per 256-super-block. `x.len()` is a multiple of 256 and `y` holds exactly its blocks.
#[inline(always)]
pub fn quantize_row_iq4_xs(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    for (ibl, (xs, ys)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(IQ4_XS_BYTES)).enumerate() {
        let qws = qw.map(|w| &w[ibl * QK_K..(ibl + 1) * QK_K]);
        let sigma2 = sigma2(xs);
        // The scale of each 32-block, and the signed one of largest magnitude (first wins, strict >).
        let mut scales = [0.0f32; 8];
        let (mut max_scale, mut amax_scale) = (0.0f32, 0.0f32);
        for (ib, (xb, s)) in xs.chunks_exact(32).zip(scales.iter_mut()).enumerate() {
            let Ok(xb): Result<&[f32; 32], _> = xb.try_into() else { continue };
            *s = block_scale(xb, qws.map(|w| &w[ib * 32..(ib + 1) * 32]), sigma2);
            let abs_d = s.abs();
            if abs_d > amax_scale {
                amax_scale = abs_d;
                max_scale = *s;
            }
        }
        // Super-block scale d = -max_scale/32 (an all-zero super-block gives -0.0, stored as 0x8000), 6-bit block
        // scales l = nearest_int(id*s) in [-32, 31], and indices with the f32 block scale d*l (not the f16 one).
        let d = -max_scale / 32.0;
        put_f16(ys, 0, d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut scales_h = 0u16;
        let mut scales_l = [0u8; 4];
        for (ib, (xb, &s)) in xs.chunks_exact(32).zip(&scales).enumerate() {
            let Ok(xb): Result<&[f32; 32], _> = xb.try_into() else { continue };
            let l = nearest_int(id * s).clamp(-32, 31);
            let dl = d * l as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            pack_indices(xb, idl, &mut ys[8 + 16 * ib..8 + 16 * (ib + 1)]);
            let l = (l + 32) as u8;
            scales_l[ib / 2] |= (l & 0xf) << (4 * (ib % 2));
            scales_h |= ((l >> 4) as u16) << (2 * ib);
        }
        ys[2..4].copy_from_slice(&scales_h.to_le_bytes());
        ys[4..8].copy_from_slice(&scales_l);
    }
}

/// `dequantize_row_iq4_xs` (ggml-quants.c): per 32-block `dl = d * (ls - 32)`, `y = dl * kvalues_iq4nl[index]`.
pub fn dequantize_row_iq4_xs(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(IQ4_XS_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        for (ib, o) in out.chunks_exact_mut(32).enumerate() {
            let ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
            let dl = d * (ls - 32) as f32;
            let (lo, hi) = o.split_at_mut(16);
            for ((&q, l), h) in b[8 + 16 * ib..8 + 16 * (ib + 1)].iter().zip(lo).zip(hi) {
                *l = dl * KV[(q & 0xf) as usize];
                *h = dl * KV[(q >> 4) as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_index(x: f32) {
        let i = best_index_int8(x);
        assert_eq!(best_index(x), i, "x = {x:e} ({:#010x})", x.to_bits());
        assert_eq!(level(x).to_bits(), KV[i].to_bits(), "x = {x:e}");
    }

    #[test]
    fn best_index_matches_the_binary_search() {
        for x in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, f32::MAX, f32::MIN, 1e-45] {
            check_index(x);
        }
        // 2^16 floats on each side of every level and every midpoint (the thresholds), both signs of zero.
        for &c in KV.iter().chain(&MID) {
            for k in 0..=65536u32 {
                for x in [c + 0.0, c - 0.0] {
                    let b = x.to_bits();
                    check_index(f32::from_bits(b.wrapping_add(k)));
                    check_index(f32::from_bits(b.wrapping_sub(k)));
                }
            }
        }
        let mut s = 0x1234_5678u64;
        for _ in 0..1_000_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            check_index(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 300.0);
            check_index(f32::from_bits((s >> 32) as u32));
        }
        assert_eq!(best_index_int8(f32::NAN), 15);
        assert_eq!(best_index_int8(0.0), 8);
        // Tie between -10 and 1 at -4.5 goes up.
        assert_eq!(best_index_int8(-4.5), 8);
        assert_eq!(best_index_int8(-4.5000005), 7);
    }

    /// Every f32 (a minute or two in release): `cargo test -p sling-quantizers --release --lib -- --ignored`.
    #[test]
    #[ignore]
    fn best_index_matches_the_binary_search_exhaustively() {
        for b in 0..=u32::MAX {
            let x = f32::from_bits(b);
            assert_eq!(best_index(x), best_index_int8(x), "{b:#010x}");
        }
    }

    #[test]
    fn zero_blocks_have_the_documented_bytes() {
        // gguf-spec §2.8 item 6.
        let mut y = [0u8; 18];
        quantize_row_iq4_nl(&[0.0; 32], None, &mut y);
        assert_eq!(&y[..2], &[0, 0]);
        assert!(y[2..].iter().all(|&b| b == 0x88));
        let mut y = [0u8; 136];
        quantize_row_iq4_xs(&[0.0; 256], None, &mut y);
        assert_eq!(u16::from_le_bytes([y[0], y[1]]), 0x8000);
        assert_eq!(u16::from_le_bytes([y[2], y[3]]), 0xaaaa);
        assert_eq!(&y[4..8], &[0; 4]);
        assert!(y[8..].iter().all(|&b| b == 0x88));
    }

    #[test]
    fn round_trip_is_close() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0).collect();
        for (q, dq, bytes) in [
            (
                quantize_row_iq4_nl as fn(&[f32], Option<&[f32]>, &mut [u8]),
                dequantize_row_iq4_nl as fn(&[u8], &mut [f32]),
                18 * 16,
            ),
            (quantize_row_iq4_xs, dequantize_row_iq4_xs, 136 * 2),
        ] {
            let mut y = vec![0u8; bytes];
            q(&x, None, &mut y);
            let mut back = vec![0.0f32; 512];
            dq(&y, &mut back);
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() < 0.1, "{a} vs {b}");
            }
        }
    }
}
