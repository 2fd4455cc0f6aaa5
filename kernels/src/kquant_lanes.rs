//! Q2_K, Q4_K, Q5_K, Q6_K (and Q3_K with importance weights; without, [`crate::q3k_search`]) with AVX2, one
//! sub-block per lane: the scale search
//! of ggml-quants.c (`make_qkx2_quants` for `quantize_row_q{2,4,5}_K_ref`, `make_qkx3_quants` for
//! `quantize_row_q{2,4,5}_K_impl`, `make_qx_quants` for Q6_K and `quantize_row_q3_K_impl`) runs over the eight 32-value sub-blocks of a super-block at once, lane `j` holding
//! sub-block `j` (Q2_K, Q3_K and Q6_K: their sixteen 16-value sub-blocks as two sets of eight). Every lane performs exactly its own
//! sub-block's scalar arithmetic, in the reference's order (each sum still adds element 0, 1, …, 31 in turn; only
//! the eight independent sub-blocks run side by side), so the bytes are those of [`sling_quantizers::kquants`]
//! (tested against it below and in `tests/kquant_lanes.rs`).
//!
//! How the scalar operations map onto lanes:
//! - `if (x < min) min = x` is `minps(x, min)` (`x < min ? x : min`, the second operand on NaN), likewise
//!   `maxps(x, max)`; `if (min > 0) min = 0` is a compare and mask, so NaN and -0 stay as C leaves them;
//! - `nearest_int` is the same float-adder trick per lane, clamped with integer min/max as C's `MAX(0, MIN(nmax, l))`;
//! - the data-dependent branches (`D > 0`, `this_min > 0`, `cur_error < best_error`, the degenerate range, `if (!d)
//!   continue` of the requantization) are ordered-quiet compares (false on NaN, as in C) selecting per lane;
//! - divisions and square roots are `divps`/`sqrtps`, correctly rounded like the scalar ones; no FMA anywhere;
//! - what is per super-block (the maxima over the eight sub-blocks, `make_qp_quants`, the 6-bit packing, f16
//!   rounding) runs in scalar code on the lanes' results, with the scalar reference's own helpers.
//!
//! A super-block always has eight (Q6_K: sixteen) sub-blocks, so there is no tail: every block of every row goes
//! through here.

// Loops index several lane arrays by element (and super-block) at once, as the C indexes x[i], w[i], L[i].
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use sling_core::DType;
use sling_quantizers::common::{fp16_to_fp32, fp32_to_fp16};
use sling_quantizers::kquants::q2_k_tail;
use sling_quantizers::search::{get_scale_min_k4, make_qp_quants, make_qx_quants, nearest_int, pack_scale_min_k4};

const QK_K: usize = 256;
/// Values per sub-block, i.e. vectors per lane-transposed super-block.
const SUB: usize = 32;

/// Parameters of `make_qkx2_quants` / `make_qkx3_quants` (`v3`: the degenerate test is `max <= min`).
#[derive(Clone, Copy)]
struct Search {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    v3: bool,
}

/// What `quantize_row_q4_K_ref` passes to `make_qkx2_quants`.
const Q4_REF: Search = Search { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false, v3: false };
/// What `quantize_row_q5_K_ref` passes to `make_qkx2_quants`.
const Q5_REF: Search = Search { nmax: 31, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: false, v3: false };

/// What every K-quant `_impl` passes to `make_qkx3_quants`.
const fn impl_search(nmax: i32) -> Search {
    Search { nmax, rmin: -0.9, rdelta: 0.05, nstep: 36, use_mad: false, v3: true }
}

/// What `quantize_row_q2_K_ref` passes to `make_qkx2_quants` (the only caller with `use_mad`).
const Q2_REF: Search = Search { nmax: 3, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true, v3: false };

/// Whether [`rows`] handles `dtype` (with or without importance weights). Q3_K without them takes another shape
/// ([`crate::q3k_search`]): its search stops at the first refinement pass that changes nothing, which lanes over
/// sub-blocks cannot share.
pub(crate) fn handles(dtype: DType, _weights: bool) -> bool {
    matches!(dtype, DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K)
}

/// `nearest_int` per lane followed by `MAX(0, MIN(nmax, l))`, returned as f32 (exact: 0..=nmax).
#[inline]
#[target_feature(enable = "avx2")]
fn code(t: __m256, nmax: __m256i) -> __m256 {
    let i = _mm256_castps_si256(_mm256_add_ps(t, _mm256_set1_ps(12582912.0)));
    let l = _mm256_sub_epi32(_mm256_and_si256(i, _mm256_set1_epi32(0x007f_ffff)), _mm256_set1_epi32(0x0040_0000));
    _mm256_cvtepi32_ps(_mm256_max_epi32(_mm256_setzero_si256(), _mm256_min_epi32(nmax, l)))
}

/// Bound under which [`code_fast`] rounds as `nearest_int`.
const FAST_LIMIT: f32 = 2_097_152.0; // 2^21

/// [`code`] for `t` known to be a number with |t| < 2^21: then `t + 12582912` lies in (2^23, 2^24), where the
/// adder rounds to an integer (half to even) exactly as `nearest_int`'s, and subtracting 12582912 again gives that
/// integer exactly; clamping it in float (never NaN, never -0) is the integer clamp. Two operations fewer.
#[inline]
#[target_feature(enable = "avx2")]
fn code_fast(t: __m256, nmax: __m256) -> __m256 {
    let magic = _mm256_set1_ps(12582912.0);
    let r = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
    _mm256_max_ps(_mm256_min_ps(r, nmax), _mm256_setzero_ps())
}

/// `fabsf` per lane (clears the sign bit, NaN payload kept, as `f32::abs`).
#[inline]
#[target_feature(enable = "avx2")]
fn abs(v: __m256) -> __m256 {
    _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)))
}

/// The 8x8 transpose: row `r` of the input becomes lane `r` of every output vector.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Eight groups of `G` values in lane form: `out[i]` lane `j` is `b[G * j + i]`. Pure data movement.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn to_lanes<const G: usize>(b: &[f32]) -> [__m256; G] {
    assert!(b.len() >= 8 * G && G.is_multiple_of(8));
    let mut out = [_mm256_setzero_ps(); G];
    for k in 0..G / 8 {
        // SAFETY: row `j` reads b[G*j + 8k .. G*j + 8k + 8], within the 8*G values asserted above (j < 8, k < G/8).
        let rows: [__m256; 8] = std::array::from_fn(|j| unsafe { _mm256_loadu_ps(b.as_ptr().add(G * j + 8 * k)) });
        out[8 * k..8 * k + 8].copy_from_slice(&transpose8(rows));
    }
    out
}

/// The inverse of [`to_lanes`] for codes: `out[G * j + i]` is lane `j` of `v[i]`, converted to an integer
/// (the codes are small integers held in f32, so the conversion is exact).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn codes_from_lanes<const G: usize>(v: &[__m256; G], out: &mut [i32]) {
    assert!(out.len() >= 8 * G && G.is_multiple_of(8));
    for k in 0..G / 8 {
        let rows = transpose8(std::array::from_fn(|c| v[8 * k + c]));
        for (j, r) in rows.iter().enumerate() {
            // SAFETY: writes out[G*j + 8k .. G*j + 8k + 8], within the 8*G values asserted above.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(G * j + 8 * k).cast(), _mm256_cvttps_epi32(*r)) };
        }
    }
}

/// `make_qkx2_quants` / `make_qkx3_quants` over eight `N`-value sub-blocks in lane form, for `K` sets at once
/// (their searches are independent; interleaving them hides the latency of the in-order sums): `x`, `w` the values
/// and weights, `l` receives the codes (0..=nmax, as f32). Returns `(scale, the_min)` per lane. Body and order as
/// `sling_quantizers::search::make_qkx` (and ggml-quants.c); degenerate lanes are computed like the others and then
/// overwritten with what C returns for them (`L = 0`, scale 0, `-min`).
#[inline]
#[target_feature(enable = "avx2")]
fn make_qkx_lanes<const N: usize, const K: usize>(
    x: &[[__m256; N]; K],
    w: &[[__m256; N]; K],
    l: &mut [[__m256; N]; K],
    p: Search,
) -> ([__m256; K], [__m256; K]) {
    let zero = _mm256_setzero_ps();
    let nmaxi = _mm256_set1_epi32(p.nmax);
    let err = |d: __m256| if p.use_mad { abs(d) } else { _mm256_mul_ps(d, d) };
    let mut min: [__m256; K] = std::array::from_fn(|k| x[k][0]);
    let mut max = min;
    let mut sum_w: [__m256; K] = std::array::from_fn(|k| w[k][0]);
    let mut sum_x: [__m256; K] = std::array::from_fn(|k| _mm256_mul_ps(sum_w[k], x[k][0]));
    for i in 1..N {
        for k in 0..K {
            min[k] = _mm256_min_ps(x[k][i], min[k]); // x < min ? x : min
            max[k] = _mm256_max_ps(x[k][i], max[k]); // x > max ? x : max
            sum_w[k] = _mm256_add_ps(sum_w[k], w[k][i]);
            sum_x[k] = _mm256_add_ps(sum_x[k], _mm256_mul_ps(w[k][i], x[k][i]));
        }
    }
    // The data's own minimum (before `min` is clamped to 0) and whether any value is NaN: what the fast rounding
    // below needs to know (see `code_fast`).
    let xlo = min;
    let mut nan = _mm256_setzero_ps();
    for xk in x {
        for xi in xk {
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(*xi, *xi));
        }
    }
    let no_nan = _mm256_movemask_ps(nan) == 0;
    let mut degenerate = [zero; K];
    let mut any_degenerate = false;
    let mut all_degenerate = true;
    for k in 0..K {
        // if (min > 0) min = 0;
        min[k] = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(min[k], zero), min[k]);
        degenerate[k] = if p.v3 {
            _mm256_cmp_ps::<_CMP_LE_OQ>(max[k], min[k])
        } else {
            _mm256_cmp_ps::<_CMP_EQ_OQ>(max[k], min[k])
        };
        let m = _mm256_movemask_ps(degenerate[k]);
        any_degenerate |= m != 0;
        all_degenerate &= m == 0xff;
    }
    let min0 = min;

    let mut best_error = [zero; K];
    let mut scale = [zero; K];
    if !all_degenerate {
        for k in 0..K {
            let iscale = _mm256_div_ps(_mm256_set1_ps(p.nmax as f32), _mm256_sub_ps(max[k], min[k]));
            scale[k] = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);
            for i in 0..N {
                let li = code(_mm256_mul_ps(iscale, _mm256_sub_ps(x[k][i], min[k])), nmaxi);
                l[k][i] = li;
                let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale[k], li), min[k]), x[k][i]);
                best_error[k] = _mm256_add_ps(best_error[k], _mm256_mul_ps(w[k][i], err(diff)));
            }
        }
        let mut laux = [[zero; N]; K];
        // x - min, recomputed whenever a lane's min changes (the same value C computes in every pass).
        let mut xm: [[__m256; N]; K] = std::array::from_fn(|k| std::array::from_fn(|i| _mm256_sub_ps(x[k][i], min[k])));
        let nmaxf = _mm256_set1_ps(p.nmax as f32);
        let limit = _mm256_set1_ps(FAST_LIMIT);
        for is in 0..=p.nstep {
            let num = _mm256_set1_ps(p.rmin + p.rdelta * is as f32 + p.nmax as f32);
            let iscale: [__m256; K] = std::array::from_fn(|k| _mm256_div_ps(num, _mm256_sub_ps(max[k], min[k])));
            // Every iscale*(x - min) of this pass lies between those of the data's minimum and maximum (rounding
            // is monotone); when both bounds are small and no value is NaN, the float rounding is nearest_int's.
            let mut fast = no_nan;
            for k in 0..K {
                let lo = abs(_mm256_mul_ps(iscale[k], _mm256_sub_ps(xlo[k], min[k])));
                let hi = abs(_mm256_mul_ps(iscale[k], _mm256_sub_ps(max[k], min[k])));
                let ok = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(lo, limit), _mm256_cmp_ps::<_CMP_LT_OQ>(hi, limit));
                // Degenerate lanes (their results are replaced at the end) need not qualify.
                fast &= _mm256_movemask_ps(_mm256_or_ps(ok, degenerate[k])) == 0xff;
            }
            let (mut sum_l, mut sum_l2, mut sum_xl) = ([zero; K], [zero; K], [zero; K]);
            let mut sums = |i: usize, k: usize, li: __m256| {
                laux[k][i] = li;
                let wl = _mm256_mul_ps(w[k][i], li);
                sum_l[k] = _mm256_add_ps(sum_l[k], wl);
                sum_l2[k] = _mm256_add_ps(sum_l2[k], _mm256_mul_ps(wl, li));
                sum_xl[k] = _mm256_add_ps(sum_xl[k], _mm256_mul_ps(wl, x[k][i]));
            };
            if fast {
                for i in 0..N {
                    for k in 0..K {
                        sums(i, k, code_fast(_mm256_mul_ps(iscale[k], xm[k][i]), nmaxf));
                    }
                }
            } else {
                for i in 0..N {
                    for k in 0..K {
                        sums(i, k, code(_mm256_mul_ps(iscale[k], xm[k][i]), nmaxi));
                    }
                }
            }
            let mut d_pos = [zero; K];
            let mut this_scale = [zero; K];
            let mut this_min = [zero; K];
            let mut any = false;
            for k in 0..K {
                let d = _mm256_sub_ps(_mm256_mul_ps(sum_w[k], sum_l2[k]), _mm256_mul_ps(sum_l[k], sum_l[k]));
                d_pos[k] = _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero);
                any |= _mm256_movemask_ps(d_pos[k]) != 0;
                let s = _mm256_div_ps(
                    _mm256_sub_ps(_mm256_mul_ps(sum_w[k], sum_xl[k]), _mm256_mul_ps(sum_x[k], sum_l[k])),
                    d,
                );
                let m = _mm256_div_ps(
                    _mm256_sub_ps(_mm256_mul_ps(sum_l2[k], sum_x[k]), _mm256_mul_ps(sum_l[k], sum_xl[k])),
                    d,
                );
                // if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }
                let min_pos = _mm256_cmp_ps::<_CMP_GT_OQ>(m, zero);
                this_min[k] = _mm256_andnot_ps(min_pos, m);
                this_scale[k] = _mm256_blendv_ps(s, _mm256_div_ps(sum_xl[k], sum_l2[k]), min_pos);
            }
            if !any {
                continue;
            }
            let mut cur_error = [zero; K];
            for i in 0..N {
                for k in 0..K {
                    let diff =
                        _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(this_scale[k], laux[k][i]), this_min[k]), x[k][i]);
                    cur_error[k] = _mm256_add_ps(cur_error[k], _mm256_mul_ps(w[k][i], err(diff)));
                }
            }
            for k in 0..K {
                let better = _mm256_and_ps(d_pos[k], _mm256_cmp_ps::<_CMP_LT_OQ>(cur_error[k], best_error[k]));
                if _mm256_movemask_ps(better) == 0 {
                    continue;
                }
                for i in 0..N {
                    l[k][i] = _mm256_blendv_ps(l[k][i], laux[k][i], better);
                }
                best_error[k] = _mm256_blendv_ps(best_error[k], cur_error[k], better);
                scale[k] = _mm256_blendv_ps(scale[k], this_scale[k], better);
                min[k] = _mm256_blendv_ps(min[k], this_min[k], better);
                for i in 0..N {
                    xm[k][i] = _mm256_sub_ps(x[k][i], min[k]);
                }
            }
        }
    }
    // Degenerate lanes: L = 0, return 0 and -min (the min before any search).
    if any_degenerate {
        for k in 0..K {
            for li in l[k].iter_mut() {
                *li = _mm256_andnot_ps(degenerate[k], *li);
            }
            scale[k] = _mm256_andnot_ps(degenerate[k], scale[k]);
            min[k] = _mm256_blendv_ps(min[k], min0[k], degenerate[k]);
        }
    }
    (scale, std::array::from_fn(|k| _mm256_xor_ps(min[k], _mm256_set1_ps(-0.0))))
}

/// Stores the eight lanes of `v`.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes(v: __m256) -> [f32; 8] {
    let mut a = [0.0f32; 8];
    // SAFETY: `a` has room for 8 f32.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
    a
}

/// `K` Q4_K (`NMAX` 15) or Q5_K (`NMAX` 31) super-blocks, searched together: `quantize_row_qN_K_ref` for those
/// whose `qw` is `None`, `quantize_row_qN_K_impl` with the super-block's 256 importance weights otherwise (all `K`
/// alike: the weights are per column, the same for every row).
#[inline]
#[target_feature(enable = "avx2")]
fn q45_k_blocks<const NMAX: i32, const K: usize>(
    xb: [&[f32; QK_K]; K],
    qw: [Option<&[f32; QK_K]>; K],
    yb: [&mut [u8]; K],
) {
    let zero = _mm256_setzero_ps();
    let x: [[__m256; SUB]; K] = std::array::from_fn(|k| to_lanes::<SUB>(xb[k]));
    let mut w = [[zero; SUB]; K];
    let mut l = [[zero; SUB]; K];
    let mut sw = [zero; K];
    let with_weights = qw[0].is_some();
    // _impl: sigma2 = 2*sum_x2/QK_K over each whole super-block, in element order (the K sums interleaved).
    let mut sum_x2 = [0.0f32; K];
    if with_weights {
        for v in 0..QK_K {
            for k in 0..K {
                sum_x2[k] += xb[k][v] * xb[k][v];
            }
        }
    }
    for k in 0..K {
        match qw[k] {
            None => {
                // av_x = sqrtf(sum_x2/32); weights[l] = av_x + fabsf(x[l]).
                let mut sum_x2 = zero;
                for xi in &x[k] {
                    sum_x2 = _mm256_add_ps(sum_x2, _mm256_mul_ps(*xi, *xi));
                }
                let av_x = _mm256_sqrt_ps(_mm256_div_ps(sum_x2, _mm256_set1_ps(32.0)));
                for (wi, xi) in w[k].iter_mut().zip(&x[k]) {
                    *wi = _mm256_add_ps(av_x, abs(*xi));
                }
            }
            Some(qwb) => {
                let sigma2 = _mm256_set1_ps(2.0 * sum_x2[k] / QK_K as f32);
                let q = to_lanes::<SUB>(qwb);
                // weights[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l]); sw[j] = sum of weights[l], in order.
                for i in 0..SUB {
                    let xi = x[k][i];
                    w[k][i] = _mm256_mul_ps(q[i], _mm256_sqrt_ps(_mm256_add_ps(sigma2, _mm256_mul_ps(xi, xi))));
                    sw[k] = _mm256_add_ps(sw[k], w[k][i]);
                }
            }
        }
    }
    let p = match (with_weights, NMAX) {
        (true, _) => impl_search(NMAX),
        (false, 15) => Q4_REF,
        (false, _) => Q5_REF,
    };
    let (s, m) = make_qkx_lanes::<SUB, K>(&x, &w, &mut l, p);
    for (k, yb) in yb.into_iter().enumerate() {
        q45_k_finish::<NMAX>(&x[k], &mut l[k], lanes(s[k]), lanes(m[k]), with_weights.then(|| lanes(sw[k])), yb);
    }
}

/// The rest of one Q4_K/Q5_K super-block after the search: the 6-bit scales and mins and the f16 super-scales (in
/// scalar, with the reference's helpers: `q45_k_ref_scales`' tail, or `make_qp_quants` with the sub-block weight
/// sums `sw` for `_impl`), the requantization from the f16 values (in lanes) and the packing.
#[inline]
#[target_feature(enable = "avx2")]
fn q45_k_finish<const NMAX: i32>(
    x: &[__m256; SUB],
    l: &mut [__m256; SUB],
    scales: [f32; 8],
    mins: [f32; 8],
    sw: Option<[f32; 8]>,
    yb: &mut [u8],
) {
    let zero = _mm256_setzero_ps();
    let (sb, d16, dmin16) = match sw {
        None => {
            let mut max_scale = 0.0f32;
            let mut max_min = 0.0f32;
            for j in 0..8 {
                if scales[j] > max_scale {
                    max_scale = scales[j];
                }
                if mins[j] > max_min {
                    max_min = mins[j];
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
        Some(sw) => {
            let mut ls = [0u8; 8];
            let mut lm = [0u8; 8];
            let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
            let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
            if NMAX == 31 {
                // Q5_K's extra MIN(63, ·).
                for v in ls.iter_mut().chain(lm.iter_mut()) {
                    *v = (*v).min(63);
                }
            }
            (pack_scale_min_k4(&ls, &lm), fp32_to_fp16(d_block), fp32_to_fp16(m_block))
        }
    };
    yb[0..2].copy_from_slice(&d16.to_le_bytes());
    yb[2..4].copy_from_slice(&dmin16.to_le_bytes());
    yb[4..16].copy_from_slice(&sb);

    // Requantization from the f16 super-scales: L = MAX(0, MIN(nmax, nearest_int((x + dm)/d))) where d != 0.
    let (d_all, dmin_all) = (fp16_to_fp32(d16), fp16_to_fp32(dmin16));
    let mut dv = [0.0f32; 8];
    let mut dmv = [0.0f32; 8];
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &sb);
        dv[j] = d_all * sc as f32;
        dmv[j] = dmin_all * m as f32;
    }
    // SAFETY: `dv` and `dmv` hold 8 f32 each.
    let (d, dm) = unsafe { (_mm256_loadu_ps(dv.as_ptr()), _mm256_loadu_ps(dmv.as_ptr())) };
    let keep = _mm256_cmp_ps::<_CMP_EQ_OQ>(d, zero);
    if _mm256_movemask_ps(keep) != 0xff {
        let nmaxi = _mm256_set1_epi32(NMAX);
        for (li, xi) in l.iter_mut().zip(x) {
            let q = code(_mm256_div_ps(_mm256_add_ps(*xi, dm), d), nmaxi);
            *li = _mm256_blendv_ps(q, *li, keep);
        }
    }

    // Packing. Lane j of l[i] is L[32j + i]; Q4_K/Q5_K put L[64c + i] in the low and L[64c + 32 + i] in the high
    // nibble of qs[32c + i].
    let qs_at = if NMAX == 15 { 16 } else { 48 };
    let sixteen = _mm256_set1_ps(16.0);
    if NMAX == 31 {
        for (i, li) in l.iter_mut().enumerate() {
            // Bit 4 of L[32j + i] goes to bit j of qh[i] (bit 2c for L[64c + i], 2c+1 for L[64c + 32 + i]).
            let high = _mm256_cmp_ps::<_CMP_GE_OQ>(*li, sixteen);
            yb[16 + i] = _mm256_movemask_ps(high) as u8;
            *li = _mm256_sub_ps(*li, _mm256_and_ps(high, sixteen));
        }
    }
    let mut codes = [0i32; QK_K];
    codes_from_lanes::<SUB>(l, &mut codes);
    for c in 0..4 {
        for i in 0..SUB {
            yb[qs_at + SUB * c + i] = (codes[64 * c + i] | codes[64 * c + 32 + i] << 4) as u8;
        }
    }
}

/// Values per Q6_K sub-block.
const SUB6: usize = 16;
/// `GROUP_MAX_EPS` (ggml-quants.c).
const GROUP_MAX_EPS: f32 = 1e-15;

/// `make_qx_quants(16, NMAX, x, L, 1, w)` (ggml-quants.c, as `sling_quantizers::search::make_qx_quants`; Q6_K
/// passes NMAX 32, Q3_K's `_impl` 4) over eight 16-value sub-blocks in lane form, `K` sets at once (interleaved,
/// as [`make_qkx_lanes`]): `w` the weights (`x²` when C gets `NULL`), `l` receives `L = l + NMAX` (as f32). Returns the scale per lane. Lanes whose
/// `amax < GROUP_MAX_EPS` are searched like the others, then given what C returns for them (`L = 0`, scale 0).
#[inline]
#[target_feature(enable = "avx2")]
fn make_qx_lanes<const NMAX: i32, const K: usize>(
    x: &[[__m256; SUB6]; K],
    w: &[[__m256; SUB6]; K],
    l: &mut [[__m256; SUB6]; K],
) -> [__m256; K] {
    let zero = _mm256_setzero_ps();
    let bias = _mm256_set1_ps(NMAX as f32);
    // The signed element of largest magnitude, first wins (strict >).
    let mut max = [zero; K];
    let mut amax = [zero; K];
    let mut nan = zero;
    for k in 0..K {
        for xi in &x[k] {
            let ax = abs(*xi);
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(ax, amax[k]);
            amax[k] = _mm256_blendv_ps(amax[k], ax, gt);
            max[k] = _mm256_blendv_ps(max[k], *xi, gt);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(*xi, *xi));
        }
    }
    let no_nan = _mm256_movemask_ps(nan) == 0;
    let all_zero: [__m256; K] =
        std::array::from_fn(|k| _mm256_cmp_ps::<_CMP_LT_OQ>(amax[k], _mm256_set1_ps(GROUP_MAX_EPS)));
    if all_zero.iter().all(|z| _mm256_movemask_ps(*z) == 0xff) {
        *l = [[zero; SUB6]; K];
        return [zero; K];
    }
    let mut wx = [[zero; SUB6]; K];
    for k in 0..K {
        for i in 0..SUB6 {
            wx[k][i] = _mm256_mul_ps(w[k][i], x[k][i]);
        }
    }
    // MAX(-nmax, MIN(nmax - 1, nearest_int(iscale * x))), as f32: exactly when some |iscale * x| may reach 2^21 or
    // be NaN, else through the float adder (as `code_fast`: |iscale * x| <= |iscale * amax| by monotone rounding).
    let (lo, hi) = (_mm256_set1_epi32(-NMAX), _mm256_set1_epi32(NMAX - 1));
    let (lof, hif) = (_mm256_set1_ps(-NMAX as f32), _mm256_set1_ps((NMAX - 1) as f32));
    let magic = _mm256_set1_ps(12582912.0);
    // One pass: the codes of every element into `lf` and sumlx += w*x*l; suml2 += w*l*l, in element order.
    let pass = |iscale: &[__m256; K], lf: &mut [[__m256; SUB6]; K]| -> ([__m256; K], [__m256; K]) {
        let mut fast = no_nan;
        for k in 0..K {
            let bound = abs(_mm256_mul_ps(iscale[k], amax[k]));
            let ok = _mm256_or_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(bound, _mm256_set1_ps(FAST_LIMIT)), all_zero[k]);
            fast &= _mm256_movemask_ps(ok) == 0xff;
        }
        let (mut sumlx, mut suml2) = ([zero; K], [zero; K]);
        let mut sum = |k: usize, i: usize, li: __m256| {
            lf[k][i] = li;
            sumlx[k] = _mm256_add_ps(sumlx[k], _mm256_mul_ps(wx[k][i], li));
            suml2[k] = _mm256_add_ps(suml2[k], _mm256_mul_ps(_mm256_mul_ps(w[k][i], li), li));
        };
        if fast {
            for i in 0..SUB6 {
                for k in 0..K {
                    let t = _mm256_mul_ps(iscale[k], x[k][i]);
                    let r = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
                    sum(k, i, _mm256_max_ps(_mm256_min_ps(r, hif), lof));
                }
            }
        } else {
            for i in 0..SUB6 {
                for k in 0..K {
                    let t = _mm256_mul_ps(iscale[k], x[k][i]);
                    let n = _mm256_castps_si256(_mm256_add_ps(t, magic));
                    let n = _mm256_sub_epi32(
                        _mm256_and_si256(n, _mm256_set1_epi32(0x007f_ffff)),
                        _mm256_set1_epi32(0x0040_0000),
                    );
                    sum(k, i, _mm256_cvtepi32_ps(_mm256_max_epi32(lo, _mm256_min_epi32(hi, n))));
                }
            }
        }
        (sumlx, suml2)
    };
    let mut lf = [[zero; SUB6]; K];
    let mut iscale = [zero; K];
    for k in 0..K {
        iscale[k] = _mm256_div_ps(_mm256_set1_ps(-NMAX as f32), max[k]);
    }
    let (sumlx, suml2) = pass(&iscale, &mut lf);
    for k in 0..K {
        for (li, lfi) in l[k].iter_mut().zip(&lf[k]) {
            *li = _mm256_add_ps(*lfi, bias);
        }
    }
    // scale = suml2 ? sumlx/suml2 : 0 (NaN is true).
    let mut scale = [zero; K];
    let mut best = [zero; K];
    for k in 0..K {
        scale[k] = _mm256_and_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(suml2[k], zero), _mm256_div_ps(sumlx[k], suml2[k]));
        best[k] = _mm256_mul_ps(scale[k], sumlx[k]);
    }
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let num = _mm256_set1_ps(-(NMAX as f32 + 0.1f32 * is as f32));
        for k in 0..K {
            iscale[k] = _mm256_div_ps(num, max[k]);
        }
        let (sumlx, suml2) = pass(&iscale, &mut lf);
        for k in 0..K {
            let better = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(suml2[k], zero),
                _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(sumlx[k], sumlx[k]), _mm256_mul_ps(best[k], suml2[k])),
            );
            if _mm256_movemask_ps(better) == 0 {
                continue;
            }
            for (li, lfi) in l[k].iter_mut().zip(&lf[k]) {
                *li = _mm256_blendv_ps(*li, _mm256_add_ps(*lfi, bias), better);
            }
            scale[k] = _mm256_blendv_ps(scale[k], _mm256_div_ps(sumlx[k], suml2[k]), better);
            best[k] = _mm256_blendv_ps(best[k], _mm256_mul_ps(scale[k], sumlx[k]), better);
        }
    }
    for k in 0..K {
        if _mm256_movemask_ps(all_zero[k]) != 0 {
            for li in l[k].iter_mut() {
                *li = _mm256_andnot_ps(all_zero[k], *li);
            }
            scale[k] = _mm256_andnot_ps(all_zero[k], scale[k]);
        }
    }
    scale
}

/// One Q6_K super-block (`quantize_row_q6_K_ref`, or `quantize_row_q6_K_impl` with the super-block's importance
/// weights, which it passes to `make_qx_quants` as they are): the sixteen 16-value sub-blocks as two sets of eight
/// lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn q6_k_block(xb: &[f32; QK_K], qw: Option<&[f32; QK_K]>, yb: &mut [u8]) {
    let zero = _mm256_setzero_ps();
    let x = [to_lanes::<SUB6>(&xb[..128]), to_lanes::<SUB6>(&xb[128..])];
    let mut l = [[zero; SUB6]; 2];
    let mut w = [[zero; SUB6]; 2];
    for h in 0..2 {
        match qw {
            Some(q) => w[h] = to_lanes::<SUB6>(&q[128 * h..]),
            None => {
                for i in 0..SUB6 {
                    w[h][i] = _mm256_mul_ps(x[h][i], x[h][i]);
                }
            }
        }
    }
    let s = make_qx_lanes::<32, 2>(&x, &w, &mut l);
    let mut scales = [0.0f32; 16];
    for h in 0..2 {
        scales[8 * h..8 * h + 8].copy_from_slice(&lanes(s[h]));
    }
    // The rest of quantize_row_q6_K_ref/_impl per super-block, in scalar.
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &scale in &scales {
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        // memset(&y[i], 0, ...) then d = f16(0): all bytes zero.
        yb[..210].fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d16 = fp32_to_fp16(1.0 / iscale);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    // Requantization: L = MAX(-32, MIN(31, nearest_int(x/d))) + 32 where d = d_all * sc != 0.
    let d_all = fp16_to_fp32(d16);
    let mut codes = [0i32; QK_K];
    for h in 0..2 {
        let dv: [f32; 8] = std::array::from_fn(|j| d_all * sc[8 * h + j] as f32);
        // SAFETY: `dv` holds 8 f32.
        let d = unsafe { _mm256_loadu_ps(dv.as_ptr()) };
        let keep = _mm256_cmp_ps::<_CMP_EQ_OQ>(d, zero);
        if _mm256_movemask_ps(keep) != 0xff {
            let (lo, hi) = (_mm256_set1_epi32(-32), _mm256_set1_epi32(31));
            for (li, xi) in l[h].iter_mut().zip(&x[h]) {
                let n = _mm256_castps_si256(_mm256_add_ps(_mm256_div_ps(*xi, d), _mm256_set1_ps(12582912.0)));
                let n = _mm256_sub_epi32(
                    _mm256_and_si256(n, _mm256_set1_epi32(0x007f_ffff)),
                    _mm256_set1_epi32(0x0040_0000),
                );
                let q = _mm256_cvtepi32_ps(_mm256_add_epi32(
                    _mm256_max_epi32(lo, _mm256_min_epi32(hi, n)),
                    _mm256_set1_epi32(32),
                ));
                *li = _mm256_blendv_ps(q, *li, keep);
            }
        }
        codes_from_lanes::<SUB6>(&l[h], &mut codes[128 * h..]);
    }
    // Packing, as the reference (L is 0..63).
    let (ql, rest) = yb.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for h in 0..2 {
        let (j, ql, qh) = (128 * h, &mut ql[64 * h..64 * h + 64], &mut qh[32 * h..32 * h + 32]);
        for k in 0..32 {
            let (l1, l2, l3, l4) =
                (codes[j + k] as u8, codes[j + k + 32] as u8, codes[j + k + 64] as u8, codes[j + k + 96] as u8);
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

/// One Q2_K super-block: `quantize_row_q2_K_ref` (`qw` `None`: weights `|x|`, `make_qkx2_quants` with `use_mad`)
/// or `quantize_row_q2_K_impl` (weights `qw * sqrtf(sigma2 + x²)`, `make_qkx3_quants`), the sixteen 16-value
/// sub-blocks searched as two sets of eight lanes; the super-block scales, the requantization and the packing in
/// scalar (`sling_quantizers::kquants::q2_k_tail`).
#[inline]
#[target_feature(enable = "avx2")]
fn q2_k_block(xb: &[f32; QK_K], qw: Option<&[f32; QK_K]>, yb: &mut [u8]) {
    let zero = _mm256_setzero_ps();
    let x = [to_lanes::<SUB6>(&xb[..128]), to_lanes::<SUB6>(&xb[128..])];
    let mut w = [[zero; SUB6]; 2];
    let mut l = [[zero; SUB6]; 2];
    let mut sw = [zero; 2];
    match qw {
        None => {
            for h in 0..2 {
                for i in 0..SUB6 {
                    w[h][i] = abs(x[h][i]);
                }
            }
        }
        Some(q) => {
            // sigma2 = sumx2/QK_K over the super-block, in element order.
            let mut sumx2 = 0.0f32;
            for v in xb {
                sumx2 += v * v;
            }
            let sigma2 = _mm256_set1_ps(sumx2 / QK_K as f32);
            for h in 0..2 {
                let qv = to_lanes::<SUB6>(&q[128 * h..]);
                // weight[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l]); sw[j] += weight[l], in order from 0.
                for i in 0..SUB6 {
                    let xi = x[h][i];
                    w[h][i] = _mm256_mul_ps(qv[i], _mm256_sqrt_ps(_mm256_add_ps(sigma2, _mm256_mul_ps(xi, xi))));
                    sw[h] = _mm256_add_ps(sw[h], w[h][i]);
                }
            }
        }
    }
    let p = if qw.is_some() { impl_search(3) } else { Q2_REF };
    let (s, m) = make_qkx_lanes::<SUB6, 2>(&x, &w, &mut l, p);
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut codes = [0i32; QK_K];
    for h in 0..2 {
        scales[8 * h..8 * h + 8].copy_from_slice(&lanes(s[h]));
        mins[8 * h..8 * h + 8].copy_from_slice(&lanes(m[h]));
        codes_from_lanes::<SUB6>(&l[h], &mut codes[128 * h..]);
    }
    let swv: [f32; 16] = std::array::from_fn(|j| lanes(sw[j / 8])[j % 8]);
    let mut lq: [u8; QK_K] = std::array::from_fn(|i| codes[i] as u8);
    let yb: &mut [u8; 84] = yb.try_into().expect("a Q2_K block is 84 bytes");
    q2_k_tail(xb, &mut lq, &scales, &mins, qw.map(|_| &swv), yb);
}

/// One Q3_K super-block with importance weights: `quantize_row_q3_K_impl` (`make_qx_quants(16, 4, …)` with
/// `qw * sqrtf(sigma2 + x²)`), the sixteen 16-value sub-blocks as two sets of eight lanes; the 6-bit scales, the requantization, the high-bit split and
/// the packing in scalar, as `sling_quantizers::kquants` (whose `q3_k_finish` this repeats).
#[inline]
#[target_feature(enable = "avx2")]
fn q3_k_block(xb: &[f32; QK_K], qw: &[f32; QK_K], yb: &mut [u8]) {
    let zero = _mm256_setzero_ps();
    let x = [to_lanes::<SUB6>(&xb[..128]), to_lanes::<SUB6>(&xb[128..])];
    let mut l = [[zero; SUB6]; 2];
    let mut sw = [zero; 2];
    // sigma2 = 2*sumx2/QK_K over the super-block, in element order.
    let mut sumx2 = 0.0f32;
    for v in xb {
        sumx2 += v * v;
    }
    let sigma2 = _mm256_set1_ps(2.0 * sumx2 / QK_K as f32);
    let mut w = [[zero; SUB6]; 2];
    for h in 0..2 {
        let qv = to_lanes::<SUB6>(&qw[128 * h..]);
        // weight[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l]); sw[j] = sum of weight[l], in order.
        for i in 0..SUB6 {
            let xi = x[h][i];
            w[h][i] = _mm256_mul_ps(qv[i], _mm256_sqrt_ps(_mm256_add_ps(sigma2, _mm256_mul_ps(xi, xi))));
            sw[h] = _mm256_add_ps(sw[h], w[h][i]);
        }
    }
    let s = make_qx_lanes::<4, 2>(&x, &w, &mut l);
    let mut scales = [0.0f32; 16];
    let mut codes = [0i32; QK_K];
    for h in 0..2 {
        scales[8 * h..8 * h + 8].copy_from_slice(&lanes(s[h]));
        codes_from_lanes::<SUB6>(&l[h], &mut codes[128 * h..]);
    }
    // The 6-bit sub-scales (Q3_K's packing of `q3_k_pack_scale`) and the f16 super-scale.
    let mut sb = [0u8; 12];
    let d16 = {
        let swv: [f32; 16] = std::array::from_fn(|j| lanes(sw[j / 8])[j % 8]);
        let mut ls = [0i8; 16];
        let d_block = make_qx_quants::<16>(32, &scales, &mut ls, 1, Some(&swv));
        for (j, &lj) in ls.iter().enumerate() {
            sling_quantizers::kquants::q3_k_pack_scale(&mut sb, j, lj);
        }
        fp32_to_fp16(d_block)
    };
    // Requantization, high bits and packing, as without weights.
    let mut l8 = [0i8; QK_K];
    for (o, &c) in l8.iter_mut().zip(&codes) {
        *o = c as i8;
    }
    crate::q3k_search::finish(xb, &mut l8, &sb, d16, yb);
}

/// Quantizes whole rows of Q2_K, Q3_K, Q4_K, Q5_K or Q6_K (`quantize_q4_K` & co.) into `y` (`row_bytes` per row), with or
/// without importance weights (`n_per_row` of them, checked by the caller). Q4_K and Q5_K take the window's
/// super-blocks two at a time (any two: each is quantized on its own), the last one alone if their number is odd.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn rows(
    dtype: DType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    y: &mut [u8],
    row_bytes: usize,
) {
    let block_bytes = dtype.block_bytes();
    // Every super-block of the window with its importance weights (block `i` of a row takes qw[256i..256i+256]).
    let mut blocks = x.chunks_exact(n_per_row).zip(y.chunks_exact_mut(row_bytes)).flat_map(|(row, dst)| {
        row.chunks_exact(QK_K).zip(dst.chunks_exact_mut(block_bytes)).enumerate().filter_map(move |(i, (xb, yb))| {
            let xb: &[f32; QK_K] = xb.try_into().ok()?;
            let qw = imatrix.and_then(|q| q.get(QK_K * i..QK_K * (i + 1))).and_then(|q| q.try_into().ok());
            Some((xb, qw, yb))
        })
    });
    while let Some((x0, q0, y0)) = blocks.next() {
        match (dtype, blocks.next()) {
            (DType::Q4K, Some((x1, q1, y1))) => q45_k_blocks::<15, 2>([x0, x1], [q0, q1], [y0, y1]),
            (DType::Q5K, Some((x1, q1, y1))) => q45_k_blocks::<31, 2>([x0, x1], [q0, q1], [y0, y1]),
            (DType::Q4K, None) => q45_k_blocks::<15, 1>([x0], [q0], [y0]),
            (DType::Q5K, None) => q45_k_blocks::<31, 1>([x0], [q0], [y0]),
            (DType::Q2K, next) => {
                q2_k_block(x0, q0, y0);
                if let Some((x1, q1, y1)) = next {
                    q2_k_block(x1, q1, y1);
                }
            }
            (DType::Q3K, next) => {
                for (xb, qw, yb) in std::iter::once((x0, q0, y0)).chain(next) {
                    match qw {
                        Some(qw) => q3_k_block(xb, qw, yb),
                        None => crate::q3k_search::q3_k_ref_block(xb, yb),
                    }
                }
            }
            (DType::Q6K, next) => {
                q6_k_block(x0, q0, y0);
                if let Some((x1, q1, y1)) = next {
                    q6_k_block(x1, q1, y1);
                }
            }
            _ => unreachable!("kquant_lanes::rows called for {dtype}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `code_fast` = `code` for every |t| < 2^21: integers, halves (ties to even), values next to halves, tiny ones.
    #[test]
    fn fast_rounding_equals_nearest_int_below_the_limit() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut ts = vec![0.0f32, -0.0, 0.49999997, 0.5, 1.5, 2.5, -0.5, -1.5, 1e-30, -1e-30, 15.5, 16.5, 31.5, 32.5];
        for k in -40i32..80 {
            let h = k as f32 * 0.5;
            ts.extend([h, f32::from_bits(h.to_bits() + 1), f32::from_bits(h.to_bits().saturating_sub(1))]);
        }
        let mut s = 0x2545_f491u32;
        for _ in 0..20000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            ts.push(((s >> 1) as f32 / (1u32 << 31) as f32 * 2.0 - 1.0) * 2f32.powi((s % 23) as i32 - 1));
        }
        ts.retain(|t| t.abs() < FAST_LIMIT);
        for nmax in [15, 31] {
            for c in ts.chunks_exact(8) {
                // SAFETY: AVX2 is present (checked above); `c` holds 8 f32.
                let (a, b) = unsafe {
                    let t = _mm256_loadu_ps(c.as_ptr());
                    (lanes(code(t, _mm256_set1_epi32(nmax))), lanes(code_fast(t, _mm256_set1_ps(nmax as f32))))
                };
                for j in 0..8 {
                    assert_eq!(a[j].to_bits(), b[j].to_bits(), "t = {} nmax {nmax}", c[j]);
                    assert_eq!(a[j], nearest_int(c[j]).clamp(0, nmax) as f32);
                }
            }
        }
    }

    #[test]
    fn to_lanes_transposes() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let b: [f32; QK_K] = std::array::from_fn(|k| k as f32);
        // SAFETY: AVX2 is present (checked above).
        let v = unsafe { to_lanes::<SUB>(&b) };
        for (i, vi) in v.iter().enumerate() {
            // SAFETY: as above.
            let a = unsafe { lanes(*vi) };
            for (j, &aj) in a.iter().enumerate() {
                assert_eq!(aj, (SUB * j + i) as f32);
            }
        }
    }
}
