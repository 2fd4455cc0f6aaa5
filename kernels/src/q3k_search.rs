//! Q3_K without importance weights (`quantize_row_q3_K_ref`) with AVX2: the refinement passes of
//! `make_q3_quants(16, 4, x, L, true)` evaluated speculatively, sixteen elements at once.
//!
//! The reference's pass walks the sub-block's elements in order; element `i` proposes a new code from the running
//! sums `sumlx`, `suml2` and takes it when it lowers the error, updating the sums the next elements read. Most
//! elements change nothing, so their proposals depend on sums that stay as they are. Here each round computes every
//! remaining element's proposal from the current sums at once (two vectors of eight, each lane exactly the
//! scalar arithmetic in the scalar order, no FMA); the first element whose proposal is taken is applied as the
//! scalar code applies it, and the next round starts after it with the new sums. The elements before the first
//! taken one were judged on the very sums the scalar loop would have used, so the codes, sums and pass counts are
//! the reference's, bit for bit; a pass costs one round per change plus one. (Lanes over eight sub-blocks, as for the
//! other K-quants, measured no faster: the pass count differs per sub-block and each lane's element chain is
//! serial.)
//!
//! The start of the search (the absolute maximum, the first codes and the sums, added in element order), the
//! 6-bit scales and the f16 super-scale stay scalar, with the reference's helpers; the requantization divides
//! eight elements per instruction (`divps` is correctly rounded, as `/` is).

use std::arch::x86_64::*;

use sling_quantizers::common::{fp16_to_fp32, fp32_to_fp16};
use sling_quantizers::kquants::q3_k_pack_scale;
use sling_quantizers::search::nearest_int;

const QK_K: usize = 256;
/// `make_q3_quants`' `nmax` for Q3_K.
const NMAX: i32 = 4;
/// `GROUP_MAX_EPS` (ggml-quants.c).
const GROUP_MAX_EPS: f32 = 1e-15;

/// `nearest_int` per lane (the reference's float-adder trick), as i32.
#[inline]
#[target_feature(enable = "avx2")]
fn nearest(t: __m256) -> __m256i {
    let i = _mm256_castps_si256(_mm256_add_ps(t, _mm256_set1_ps(12582912.0)));
    _mm256_sub_epi32(_mm256_and_si256(i, _mm256_set1_epi32(0x007f_ffff)), _mm256_set1_epi32(0x0040_0000))
}

/// `MAX(lo, MIN(hi, l))` per lane.
#[inline]
#[target_feature(enable = "avx2")]
fn clamp(l: __m256i, lo: i32, hi: i32) -> __m256i {
    _mm256_max_epi32(_mm256_set1_epi32(lo), _mm256_min_epi32(_mm256_set1_epi32(hi), l))
}

/// Sixteen i32 lanes (`a` then `b`, each in [-128, 127]) as sixteen bytes, in order.
#[inline]
#[target_feature(enable = "avx2")]
fn to_bytes(a: __m256i, b: __m256i) -> __m128i {
    // packs works within 128-bit halves: [a0-3 b0-3 | a4-7 b4-7] as i16, put back in order, then to bytes.
    let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
    _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w))
}

/// One step of `make_q3_quants`' refinement per lane: element value `x` (with `w = x*x`, `wx = w*x`), its code
/// `l` and the sums `sumlx`, `suml2` (and `sx2 = sumlx*sumlx`, one value for every element) give the proposed code
/// and the sums if it is taken; `ok` is set where the reference takes it. The scalar body, in its order:
/// `slx = sumlx - w*x*L; if (slx > 0) { sl2 = suml2 - w*L*L; new_l = clamp(nearest_int(x*sl2/slx)); if (new_l !=
/// L) { slx += w*x*new_l; sl2 += w*new_l*new_l; if (sl2 > 0 && slx*slx*suml2 > sumlx*sumlx*sl2) take } }`.
struct Step {
    ok: __m256,
    l: __m256i,
    sumlx: __m256,
    suml2: __m256,
}

#[inline]
#[target_feature(enable = "avx2")]
fn step(x: __m256, w: __m256, wx: __m256, l: __m256i, sumlx: __m256, suml2: __m256, sx2: __m256) -> Step {
    let zero = _mm256_setzero_ps();
    let li = _mm256_cvtepi32_ps(l);
    let slx = _mm256_sub_ps(sumlx, _mm256_mul_ps(wx, li));
    let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(slx, zero);
    let sl2 = _mm256_sub_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(w, li), li));
    let nl = clamp(nearest(_mm256_div_ps(_mm256_mul_ps(x, sl2), slx)), -NMAX, NMAX - 1);
    let changed = _mm256_xor_si256(_mm256_cmpeq_epi32(nl, l), _mm256_set1_epi32(-1));
    let nf = _mm256_cvtepi32_ps(nl);
    let slx1 = _mm256_add_ps(slx, _mm256_mul_ps(wx, nf));
    let sl21 = _mm256_add_ps(sl2, _mm256_mul_ps(_mm256_mul_ps(w, nf), nf));
    let better = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(_mm256_mul_ps(slx1, slx1), suml2), _mm256_mul_ps(sx2, sl21));
    let ok = _mm256_and_ps(
        _mm256_and_ps(pos, _mm256_castsi256_ps(changed)),
        _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(sl21, zero), better),
    );
    Step { ok, l: nl, sumlx: slx1, suml2: sl21 }
}

/// The rest of `make_q3_quants(16, 4, x, L, true)`'s refinement passes for one sub-block, from pass `itry0` at
/// element `from0` with `changed0` changes in that pass so far, codes `l` (unbiased) and sums `sumlx`, `suml2`;
/// returns the final sums.
#[inline]
#[target_feature(enable = "avx2")]
fn passes(
    x: &[f32; 16],
    l: &mut [i32; 16],
    (mut sumlx, mut suml2): (f32, f32),
    (itry0, from0, changed0): (usize, u32, u32),
) -> (f32, f32) {
    // SAFETY: each load reads eight of `x`'s sixteen values.
    let xv = unsafe { [_mm256_loadu_ps(x[..8].as_ptr()), _mm256_loadu_ps(x[8..].as_ptr())] };
    // w = x*x and w*x, as the scalar loop computes them for each element.
    let wv = [_mm256_mul_ps(xv[0], xv[0]), _mm256_mul_ps(xv[1], xv[1])];
    let wx = [_mm256_mul_ps(wv[0], xv[0]), _mm256_mul_ps(wv[1], xv[1])];
    let zero = _mm256_setzero_ps();
    for itry in itry0..5 {
        let (mut from, mut n_changed) = if itry == itry0 { (from0, changed0) } else { (0, 0) };
        while from < 16 {
            let (sx, s2) = (_mm256_set1_ps(sumlx), _mm256_set1_ps(suml2));
            // sumlx*sumlx*sl2 is (sumlx*sumlx)*sl2: the product of the first two is one value for every element.
            let sx2 = _mm256_set1_ps(sumlx * sumlx);
            let mut take = 0u32;
            let mut new_l = [_mm256_setzero_si256(); 2];
            let mut nslx = [zero; 2];
            let mut nsl2 = [zero; 2];
            for h in 0..2 {
                // SAFETY (of the load): `l` holds 16 i32, `8 * h + 8 <= 16`.
                let li_i = unsafe { _mm256_loadu_si256(l[8 * h..].as_ptr().cast()) };
                let st = step(xv[h], wv[h], wx[h], li_i, sx, s2, sx2);
                take |= (_mm256_movemask_ps(st.ok) as u32) << (8 * h);
                new_l[h] = st.l;
                nslx[h] = st.sumlx;
                nsl2[h] = st.suml2;
            }
            take &= !0u32 << from;
            if take == 0 {
                break;
            }
            let k = take.trailing_zeros() as usize;
            let (h, j) = (k / 8, k % 8);
            let mut a = [0i32; 8];
            let mut b = [0f32; 8];
            let mut c = [0f32; 8];
            // SAFETY: each store writes eight lanes into an eight-element array.
            unsafe {
                _mm256_storeu_si256(a.as_mut_ptr().cast(), new_l[h]);
                _mm256_storeu_ps(b.as_mut_ptr(), nslx[h]);
                _mm256_storeu_ps(c.as_mut_ptr(), nsl2[h]);
            }
            l[k] = a[j];
            sumlx = b[j];
            suml2 = c[j];
            n_changed += 1;
            from = k as u32 + 1;
        }
        if n_changed == 0 {
            break;
        }
    }
    (sumlx, suml2)
}

/// `make_q3_quants(16, 4, x, L, true)` for eight sub-blocks in lane form (`x[i]` lane `j`: element `i` of sub-block
/// `j`) up to the end of the first round of the first pass: the greatest |x| (the first element reaching it, as the
/// reference's `ax > amax` scan keeps; NaN never wins), the first codes and the sums (added in element order per
/// lane), then every element's proposal from those sums. A lane none of whose proposals is taken is done (the
/// first pass changed nothing): most are. Otherwise its first taken change is applied and [`passes`] goes on from
/// the element after it. `l_out` receives the codes biased by 4, sub-block `j` at `16j`; returns the scales.
#[inline]
#[target_feature(enable = "avx2")]
fn make_q3_quants_x8(xb: &[f32; 128], l_out: &mut [i8]) -> [f32; 8] {
    let x = crate::kquant_lanes::to_lanes::<16>(xb);
    let zero = _mm256_setzero_ps();
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut amax = zero;
    for xi in &x {
        amax = _mm256_max_ps(_mm256_and_ps(*xi, absmask), amax);
    }
    let mut max = zero;
    let mut found = zero;
    for xi in &x {
        let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(*xi, absmask), amax);
        max = _mm256_blendv_ps(max, *xi, _mm256_andnot_ps(found, eq));
        found = _mm256_or_ps(found, eq);
    }
    let empty = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(amax, _mm256_set1_ps(GROUP_MAX_EPS)));
    let iscale = _mm256_div_ps(_mm256_set1_ps(-(NMAX as f32)), max);
    let mut lv = [_mm256_setzero_si256(); 16];
    let (mut sumlx, mut suml2) = (zero, zero);
    let w: [__m256; 16] = std::array::from_fn(|i| _mm256_mul_ps(x[i], x[i]));
    let wx: [__m256; 16] = std::array::from_fn(|i| _mm256_mul_ps(w[i], x[i]));
    for i in 0..16 {
        lv[i] = clamp(nearest(_mm256_mul_ps(iscale, x[i])), -NMAX, NMAX - 1);
        let lf = _mm256_cvtepi32_ps(lv[i]);
        sumlx = _mm256_add_ps(sumlx, _mm256_mul_ps(wx[i], lf));
        suml2 = _mm256_add_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(w[i], lf), lf));
    }
    // The first round: each element's proposal from the first sums; per lane the first one taken.
    let sx2 = _mm256_mul_ps(sumlx, sumlx);
    let mut first = _mm256_set1_epi32(16);
    let mut taken = zero;
    let (mut f_l, mut f_slx, mut f_sl2) = (_mm256_setzero_si256(), zero, zero);
    for i in 0..16 {
        let Step { ok, l: nl, sumlx: slx1, suml2: sl21 } = step(x[i], w[i], wx[i], lv[i], sumlx, suml2, sx2);
        let new = _mm256_andnot_ps(taken, ok);
        first = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(first),
            _mm256_castsi256_ps(_mm256_set1_epi32(i as i32)),
            new,
        ));
        f_l = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(f_l), _mm256_castsi256_ps(nl), new));
        f_slx = _mm256_blendv_ps(f_slx, slx1, new);
        f_sl2 = _mm256_blendv_ps(f_sl2, sl21, new);
        taken = _mm256_or_ps(taken, ok);
    }
    let lanes_i = |v: __m256i| {
        let mut a = [0i32; 8];
        // SAFETY: eight lanes into an eight-element array.
        unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), v) };
        a
    };
    let lanes_f = |v: __m256| {
        let mut a = [0f32; 8];
        // SAFETY: eight lanes into an eight-element array.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a
    };
    // Every lane's codes (biased by 4, as bytes) and scale as if its search were done; the lanes that are not (an
    // empty sub-block, a change taken in the first round) are redone below.
    let bias = _mm256_set1_epi32(NMAX);
    let mut codes = [0i32; 128];
    let biased: [__m256; 16] = std::array::from_fn(|i| _mm256_cvtepi32_ps(_mm256_add_epi32(lv[i], bias)));
    crate::kquant_lanes::codes_from_lanes::<16>(&biased, &mut codes);
    for j in 0..8 {
        // SAFETY: the loads read codes[16j..16j + 16], the store writes l_out[16j..16j + 16].
        unsafe {
            let a = _mm256_loadu_si256(codes[16 * j..].as_ptr().cast());
            let b = _mm256_loadu_si256(codes[16 * j + 8..].as_ptr().cast());
            _mm_storeu_si128(l_out[16 * j..16 * j + 16].as_mut_ptr().cast(), to_bytes(a, b));
        }
    }
    // `suml2 > 0 ? sumlx/suml2 : 0` per lane.
    let mut scales = lanes_f(_mm256_and_ps(_mm256_div_ps(sumlx, suml2), _mm256_cmp_ps::<_CMP_GT_OQ>(suml2, zero)));
    let redo = (empty as u32) | (_mm256_movemask_ps(taken) as u32);
    if redo == 0 {
        return scales;
    }
    let (first, f_l, f_slx, f_sl2) = (lanes_i(first), lanes_i(f_l), lanes_f(f_slx), lanes_f(f_sl2));
    for j in (0..8).filter(|j| redo & (1 << j) != 0) {
        let out = &mut l_out[16 * j..16 * j + 16];
        if empty & (1 << j) != 0 {
            out.fill(0);
            scales[j] = 0.0;
            continue;
        }
        let mut l: [i32; 16] = std::array::from_fn(|i| codes[16 * j + i] - NMAX);
        let k = first[j] as usize;
        l[k] = f_l[j];
        let xs: &[f32; 16] = xb[16 * j..16 * j + 16].try_into().unwrap_or(&[0.0; 16]);
        let (sx, s2) = passes(xs, &mut l, (f_slx[j], f_sl2[j]), (0, k as u32 + 1, 1));
        for (o, &v) in out.iter_mut().zip(&l) {
            *o = (v + NMAX) as i8;
        }
        scales[j] = if s2 > 0.0 { sx / s2 } else { 0.0 };
    }
    scales
}

/// One super-block of `quantize_row_q3_K_ref`.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn q3_k_ref_block(xb: &[f32; QK_K], yb: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for h in 0..2 {
        let xs: &[f32; 128] = xb[128 * h..128 * h + 128].try_into().unwrap_or(&[0.0; 128]);
        scales[8 * h..8 * h + 8].copy_from_slice(&make_q3_quants_x8(xs, &mut l[128 * h..128 * h + 128]));
    }
    for &s in &scales {
        if s.abs() > amax {
            amax = s.abs();
            max_scale = s;
        }
    }
    let mut sb = [0u8; 12];
    let d16 = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let li = nearest_int(iscale * s) as i8;
            q3_k_pack_scale(&mut sb, j, ((li as i32).clamp(-32, 31) + 32) as i8);
        }
        fp32_to_fp16(1.0 / iscale)
    } else {
        fp32_to_fp16(0.0)
    };
    finish(xb, &mut l, &sb, d16, yb);
}

/// The end of `quantize_row_q3_K_ref` and `_impl` alike: the requantization from the f16 super-scale (a sub-block
/// whose scale is 0 keeps the search's codes, `l`, biased by 4), the high-bit mask and the packing.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn finish(xb: &[f32; QK_K], l: &mut [i8; QK_K], sb: &[u8; 12], d16: u16, yb: &mut [u8]) {
    let d_all = fp16_to_fp32(d16);
    for j in 0..16 {
        let low = if j < 8 { sb[j] & 0xF } else { sb[j - 8] >> 4 } as i8;
        let sc = (low | (((sb[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) as i8) as i32 - 32;
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dv = _mm256_set1_ps(d);
        let four = _mm256_set1_epi32(4);
        // SAFETY: the loads read elements 16j..16j + 16 of `xb`, the store writes the same of `l`.
        unsafe {
            let q = |h: usize| {
                let xv = _mm256_loadu_ps(xb[16 * j + 8 * h..].as_ptr());
                _mm256_add_epi32(clamp(nearest(_mm256_div_ps(xv, dv)), -4, 3), four)
            };
            _mm_storeu_si128(l[16 * j..16 * j + 16].as_mut_ptr().cast(), to_bytes(q(0), q(1)));
        }
    }
    // The high bit of element e goes to bit e/32 of hmask[e%32]; the low two bits (`v - 4` for v > 3 is `v & 3`)
    // are packed four to a byte, element k + 32i of each half to bits 2i of byte k.
    // SAFETY: every load and store covers 32 bytes inside `l` (256) or `yb` (Q3_K's 110 bytes, checked by the
    // slice indexing before each store).
    unsafe {
        let three = _mm256_set1_epi8(3);
        let mut hm = _mm256_setzero_si256();
        let mut low = [_mm256_setzero_si256(); 8];
        for (g, lo) in low.iter_mut().enumerate() {
            let v = _mm256_loadu_si256(l[32 * g..].as_ptr().cast());
            let high = _mm256_cmpgt_epi8(v, three);
            hm = _mm256_or_si256(hm, _mm256_and_si256(high, _mm256_set1_epi8(1 << g)));
            *lo = _mm256_and_si256(v, three);
        }
        _mm256_storeu_si256(yb[..32].as_mut_ptr().cast(), hm);
        for c in 0..2 {
            let [a, b, d, e] = [low[4 * c], low[4 * c + 1], low[4 * c + 2], low[4 * c + 3]];
            let packed = _mm256_or_si256(
                _mm256_or_si256(a, _mm256_slli_epi16::<2>(b)),
                _mm256_or_si256(_mm256_slli_epi16::<4>(d), _mm256_slli_epi16::<6>(e)),
            );
            _mm256_storeu_si256(yb[32 + 32 * c..64 + 32 * c].as_mut_ptr().cast(), packed);
        }
    }
    yb[96..108].copy_from_slice(sb);
    yb[108..110].copy_from_slice(&d16.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use sling_core::DType;

    /// Rows built to reach every branch of the search: random, zeros, constants, one outlier, ties between
    /// codes, tiny and huge magnitudes, subnormals, NaN and infinities (which `--allow-nonfinite` lets through).
    fn rows() -> Vec<Vec<f32>> {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut out = Vec::new();
        for k in 0..400 {
            let scale = [1.0, 1e-3, 1e3, 1e-20, 1e20, 1e-40][k % 6];
            let mut r: Vec<f32> = (0..QK_K).map(|_| next() * scale).collect();
            match k % 7 {
                1 => r[k % QK_K] = 40.0 * scale,
                2 => r.iter_mut().step_by(3).for_each(|v| *v = 0.0),
                3 => r.iter_mut().for_each(|v| *v = (*v * 8.0).round() / 8.0 * scale.max(1e-30)),
                4 => r[..16].fill(0.25),
                _ => {}
            }
            out.push(r);
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE / 4.0, -0.0] {
            for at in [0, 5, 17, 255] {
                let mut r = out[at].clone();
                r[at] = bad;
                out.push(r);
            }
            out.push(vec![bad; QK_K]);
        }
        out.push(vec![0.0; QK_K]);
        out.push(vec![1.0; QK_K]);
        out.push(vec![-3.5; QK_K]);
        out
    }

    #[test]
    fn equals_the_scalar_reference() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        for (n, r) in rows().iter().enumerate() {
            let mut want = vec![0u8; DType::Q3K.block_bytes()];
            sling_quantizers::kquants::quantize_row_q3_k(r, None, &mut want);
            let mut got = vec![0u8; DType::Q3K.block_bytes()];
            // SAFETY: AVX2 is present (checked above).
            unsafe { q3_k_ref_block(r.as_slice().try_into().unwrap(), &mut got) };
            assert_eq!(got, want, "row {n}");
        }
    }
}
