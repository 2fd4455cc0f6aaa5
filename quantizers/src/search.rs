//! Shared scale searches of the ggml quantizers (ggml-quants.c: `make_qx_quants`, `make_q3_quants`,
//! `make_qkx2_quants`, `make_qkx3_quants`, `make_qp_quants`, `get_scale_min_k4`). Facts:
//! `../shared/docs/gguf-spec.md` §2.3 and §2.6.
//!
//! Bit-exactness rules followed throughout (the reference is `ggml-base`, compiled for baseline x86-64: SSE2
//! single precision, no FMA, no reassociation):
//! - every expression is evaluated in the C order, left to right (`w*x*l` is `(w*x)*l`), all in `f32`;
//! - ints are converted to `f32` where C converts them (at the operator), never earlier;
//! - C's `MIN`/`MAX` macros are reproduced as written (`a < b ? a : b`), not with `f32::min`/`f32::max`, whose
//!   NaN handling differs;
//! - stores into `uint8_t`/`int8_t` arrays truncate (`as u8` / `as i8`), as C's implicit conversions do.
//!
//! The two hot searches (`make_qx_quants`, `make_qkx*`) are generic over the group size `N` (16 or 32) and split
//! each pass into element-wise loops (vectorisable) and the order-preserving sums; the values summed and the order
//! they are summed in are exactly C's, so the bytes are too (checked against llama.cpp in
//! `tests/bitexact_legacy_kquants.rs`).
//!
//! `nearest_int`, `make_qp_quants` and the 6-bit scale packing are public for `sling-kernels`, whose lane-parallel
//! K-quant searches finish each super-block with these very functions.

/// `GROUP_MAX_EPS` (ggml-quants.c): groups whose max |x| is below this are treated as all zero.
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// `nearest_int` (ggml-quants.c): round half to even through the f32 adder.
///
/// Same bits as [`crate::common::nearest_int`] but without its debug range assertion: the reference is compiled
/// with `NDEBUG`, and hostile rows (subnormals) legitimately reach this with ±inf or NaN (e.g. `15 / (max - min)`
/// overflows when the range is subnormal). The bit trick then gives -4194304 (inf) or 0 (NaN), which the callers
/// clamp exactly as C does, so a debug build must not panic there.
#[inline(always)]
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12582912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// `MAX(a, b)` (ggml-impl.h) on ints: `(a) > (b) ? (a) : (b)`.
#[inline(always)]
fn imax(a: i32, b: i32) -> i32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `MIN(a, b)` (ggml-impl.h) on ints: `(a) < (b) ? (a) : (b)`.
#[inline(always)]
fn imin(a: i32, b: i32) -> i32 {
    if a < b {
        a
    } else {
        b
    }
}

/// `MAX(-nmax, MIN(nmax - 1, l))`: the symmetric clamp of `make_qx_quants` / `make_q3_quants`.
#[inline(always)]
fn clamp_sym(l: i32, nmax: i32) -> i32 {
    imax(-nmax, imin(nmax - 1, l))
}

/// `MAX(0, MIN(nmax, l))`: the asymmetric clamp of `make_qkx2_quants` / `make_qkx3_quants`.
#[inline(always)]
fn clamp_pos(l: i32, nmax: i32) -> i32 {
    imax(0, imin(nmax, l))
}

/// The signed element with the largest magnitude (first wins, strict `>`), and that magnitude: the opening loop
/// of `make_qx_quants` / `make_q3_quants`.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (max, amax)
}

/// `make_qx_quants(n, nmax, x, L, rmse_type, qw)` (ggml-quants.c): symmetric scale search over a group of `N`
/// (16 or 32) values. `L` receives `l + nmax` (0..2*nmax-1); returns the scale. `qw`, when given, has `N` weights.
///
/// Speed without changing a bit: the per-element weight and `w*x` are computed once (C recomputes the same
/// values in every pass: `w*x*l` is `(w*x)*l`), and each pass first fills the rounded codes of all elements (a
/// loop the compiler vectorises) before the two sums, which are accumulated strictly in element order as in C.
#[inline(always)]
pub fn make_qx_quants<const N: usize>(
    nmax: i32,
    x: &[f32],
    l_out: &mut [i8],
    rmse_type: i32,
    qw: Option<&[f32]>,
) -> f32 {
    let (Some(x), Some(l_out)) = (x.first_chunk::<N>(), l_out.first_chunk_mut::<N>()) else {
        debug_assert!(false, "make_qx_quants: group shorter than {N}");
        return 0.0;
    };
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        // all zero
        l_out.fill(0);
        return 0.0;
    }
    let mut iscale = -nmax as f32 / max;
    if rmse_type == 0 {
        for (li, &xi) in l_out.iter_mut().zip(x) {
            let l = nearest_int(iscale * xi);
            *li = (nmax + clamp_sym(l, nmax)) as i8;
        }
        return 1.0 / iscale;
    }
    let mut rmse_type = rmse_type;
    let mut return_early = false;
    if rmse_type < 0 {
        rmse_type = -rmse_type;
        return_early = true;
    }
    // The C ternary `qw ? qw[i] : rmse_type == 1 ? x*x : rmse_type == 2 ? 1 : rmse_type == 3 ? |x| : sqrtf|x|`.
    let mut w = [0.0f32; N];
    for (i, wi) in w.iter_mut().enumerate() {
        let xi = x[i];
        *wi = match qw {
            Some(q) => q.get(i).copied().unwrap_or(0.0),
            None => match rmse_type {
                1 => xi * xi,
                2 => 1.0,
                3 => xi.abs(),
                _ => xi.abs().sqrt(),
            },
        };
    }
    let mut wx = [0.0f32; N];
    for i in 0..N {
        wx[i] = w[i] * x[i];
    }
    // The codes of one pass, as f32 (exact: |l| <= nmax).
    let codes = |iscale: f32| -> [f32; N] {
        let mut lf = [0.0f32; N];
        for i in 0..N {
            lf[i] = clamp_sym(nearest_int(iscale * x[i]), nmax) as f32;
        }
        lf
    };
    // sumlx += w*x*l; suml2 += w*l*l, in element order.
    let sums = |lf: &[f32; N]| -> (f32, f32) {
        let mut sumlx = 0.0f32;
        let mut suml2 = 0.0f32;
        for i in 0..N {
            sumlx += wx[i] * lf[i];
            suml2 += w[i] * lf[i] * lf[i];
        }
        (sumlx, suml2)
    };
    let lf = codes(iscale);
    for (li, &l) in l_out.iter_mut().zip(&lf) {
        *li = (l as i32 + nmax) as i8;
    }
    let (mut sumlx, mut suml2) = sums(&lf);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    if return_early {
        return if suml2 > 0.0 { 0.5 * (scale + 1.0 / iscale) } else { 1.0 / iscale };
    }
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1f32 * is as f32) / max;
        let lf = codes(iscale);
        (sumlx, suml2) = sums(&lf);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            // C recomputes the same codes here.
            for (li, &l) in l_out.iter_mut().zip(&lf) {
                *li = (nmax + l as i32) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants(n, nmax, x, L, do_rmse)` (ggml-quants.c): the Q3_K reference search (weights `x²`, then up to
/// five coordinate-descent passes). `L` receives `l + nmax`; returns the scale.
#[inline(always)]
pub(crate) fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8], do_rmse: bool) -> f32 {
    let n = x.len().min(l_out.len());
    let x = &x[..n];
    let l_out = &mut l_out[..n];
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        // all zero
        l_out.fill(0);
        return 0.0;
    }
    let iscale = -nmax as f32 / max;
    if do_rmse {
        let mut sumlx = 0.0f32;
        let mut suml2 = 0.0f32;
        for i in 0..n {
            let l = clamp_sym(nearest_int(iscale * x[i]), nmax);
            l_out[i] = l as i8;
            let w = x[i] * x[i];
            let lf = l as f32;
            sumlx += w * x[i] * lf;
            suml2 += w * lf * lf;
        }
        for _itry in 0..5 {
            let mut n_changed = 0;
            for i in 0..n {
                let w = x[i] * x[i];
                let li = l_out[i] as f32;
                let mut slx = sumlx - w * x[i] * li;
                if slx > 0.0 {
                    let mut sl2 = suml2 - w * li * li;
                    let new_l = clamp_sym(nearest_int(x[i] * sl2 / slx), nmax);
                    if new_l != l_out[i] as i32 {
                        let nf = new_l as f32;
                        slx += w * x[i] * nf;
                        sl2 += w * nf * nf;
                        if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                            l_out[i] = new_l as i8;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed += 1;
                        }
                    }
                }
            }
            if n_changed == 0 {
                break;
            }
        }
        for li in l_out.iter_mut() {
            *li = li.wrapping_add(nmax as i8);
        }
        return if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    }
    for (li, &xi) in l_out.iter_mut().zip(x) {
        let l = clamp_sym(nearest_int(iscale * xi), nmax);
        *li = (l + nmax) as i8;
    }
    1.0 / iscale
}

/// Parameters of the asymmetric (scale + min) searches `make_qkx2_quants` / `make_qkx3_quants`.
#[derive(Clone, Copy)]
pub(crate) struct QkxParams {
    pub nmax: i32,
    pub rmin: f32,
    pub rdelta: f32,
    pub nstep: i32,
    pub use_mad: bool,
}

/// `make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad)` (ggml-quants.c) over a
/// group of `N` (16 or 32) values. Returns `(scale, the_min)` where `the_min = -min` (so `x ≈ scale*L - the_min`).
/// `L` receives 0..nmax.
#[inline(always)]
pub(crate) fn make_qkx2_quants<const N: usize>(
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    p: QkxParams,
) -> (f32, f32) {
    make_qkx::<N>(x, weights, l_out, p, false)
}

/// `make_qkx3_quants` (ggml-quants.c): `make_qkx2_quants` except that the degenerate test is `max <= min`.
/// (C also accepts `weights == NULL`, meaning `x²`; every caller llama-quantize reaches passes weights.)
#[inline(always)]
pub(crate) fn make_qkx3_quants<const N: usize>(
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    p: QkxParams,
) -> (f32, f32) {
    make_qkx::<N>(x, weights, l_out, p, true)
}

/// Body shared by [`make_qkx2_quants`] and [`make_qkx3_quants`]; the two C functions differ only in the
/// degenerate-range test (`max == min` vs `max <= min`), which `v3` selects.
///
/// This search dominates K-quant time (37 or 21 passes per group). Each pass is split into element-wise loops
/// the compiler vectorises (codes, `w*l`, `w*l*l`, `w*l*x`, the weighted errors: the very products C forms,
/// `w*l*x` being `(w*l)*x`) and the sums, which stay sequential in element order as in C. `x - min` is likewise
/// computed once per element (and again whenever `min` changes); C recomputes the identical value.
#[inline(always)]
fn make_qkx<const N: usize>(x: &[f32], weights: &[f32], l_out: &mut [u8], p: QkxParams, v3: bool) -> (f32, f32) {
    let (Some(x), Some(w), Some(l_out)) =
        (x.first_chunk::<N>(), weights.first_chunk::<N>(), l_out.first_chunk_mut::<N>())
    else {
        debug_assert!(false, "make_qkx: group shorter than {N}");
        return (0.0, 0.0);
    };
    if N == 0 {
        return (0.0, 0.0);
    }
    let nmax = p.nmax;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..N {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    let degenerate = if v3 { max <= min } else { max == min };
    if degenerate {
        l_out.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if p.use_mad { d.abs() } else { d * d };
    let mut xm = [0.0f32; N];
    for i in 0..N {
        xm[i] = x[i] - min;
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut e = [0.0f32; N];
    for i in 0..N {
        let li = clamp_pos(nearest_int(iscale * xm[i]), nmax) as u8;
        l_out[i] = li;
        e[i] = w[i] * err(scale * li as f32 + min - x[i]);
    }
    let mut best_error = 0.0f32;
    for &v in &e {
        best_error += v;
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmax as f32) / (max - min);
        let mut lf = [0.0f32; N];
        let mut wl = [0.0f32; N];
        let mut wl2 = [0.0f32; N];
        let mut wlx = [0.0f32; N];
        for i in 0..N {
            lf[i] = clamp_pos(nearest_int(iscale * xm[i]), nmax) as f32;
            wl[i] = w[i] * lf[i];
            wl2[i] = wl[i] * lf[i];
            wlx[i] = wl[i] * x[i];
        }
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..N {
            sum_l += wl[i];
            sum_l2 += wl2[i];
            sum_xl += wlx[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            for i in 0..N {
                e[i] = w[i] * err(this_scale * lf[i] + this_min - x[i]);
            }
            let mut cur_error = 0.0f32;
            for &v in &e {
                cur_error += v;
            }
            if cur_error < best_error {
                for (li, &l) in l_out.iter_mut().zip(&lf) {
                    *li = l as u8;
                }
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
                // Later passes use the new min, in `iscale` and in `x - min`.
                for i in 0..N {
                    xm[i] = x[i] - min;
                }
            }
        }
    }
    (scale, -min)
}

/// `make_qp_quants(n, nmax, x, L, quant_weights)` (ggml-quants.c): quantizes the (non-negative) sub-block scales or
/// mins of an imatrix K-quant to 0..nmax. Returns the super-scale. `L` is `uint8_t` in C and the first pass stores
/// `nearest_int` unclamped, so values are truncated to `u8` exactly as C stores them.
#[inline(always)]
pub fn make_qp_quants(nmax: i32, x: &[f32], l_out: &mut [u8], quant_weights: &[f32]) -> f32 {
    let n = x.len().min(l_out.len()).min(quant_weights.len());
    let x = &x[..n];
    let l_out = &mut l_out[..n];
    let qw = &quant_weights[..n];
    let mut max = 0.0f32;
    for &v in x {
        // MAX(max, x[i]) as the C macro evaluates it.
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        // all zero
        l_out.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (li, &xi) in l_out.iter_mut().zip(x) {
        *li = nearest_int(iscale * xi) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l_out[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1f32 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let l = imin(nmax, nearest_int(iscale_is * x[i]));
            let diff = x[i] - scale_is * l as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = imin(nmax, nearest_int(iscale * x[i]));
        l_out[i] = l as u8;
        // The sums use the int `l`, not the stored byte: they differ only for a negative l (a negative input),
        // which C also sums as itself while `L[i]` keeps the truncated byte read by the passes below.
        let lf = l as f32;
        sumlx += qw[i] * x[i] * lf;
        suml2 += qw[i] * lf * lf;
    }
    for _itry in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = imin(nmax, nearest_int(x[i] * sl2 / slx));
                if new_l != l_out[i] as i32 {
                    let nf = new_l as f32;
                    slx += w * x[i] * nf;
                    sl2 += w * nf * nf;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// `get_scale_min_k4(j, q, &d, &m)` (ggml-quants.c): the 6-bit scale and min of sub-block `j` (0..8) from the
/// 12 packed scale bytes of a Q4_K/Q5_K block.
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The inverse of [`get_scale_min_k4`]: the packing loop of `quantize_row_q4_K_ref` (also Q5_K, ref and impl).
/// Callers clamp to 0..=63 where C does (`MIN(63, ·)`); `quantize_row_q4_K_impl` does not, so any byte is packed
/// with C's exact operations (u8 shifts drop the bits C's truncating store drops).
#[inline(always)]
pub fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (a, b) = (ls[j], lm[j]);
        if j < 4 {
            s[j] = a;
            s[j + 4] = b;
        } else {
            // Order matters: scales[j+4] is assigned (j+4 >= 8, never touched before) then bits 6..7 of the
            // j<4 bytes are OR-ed in, as in C.
            s[j + 4] = (a & 0xF) | ((b & 0xF) << 4);
            s[j - 4] |= (a >> 4) << 6;
            s[j] |= (b >> 4) << 6;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_matches_common_and_rounds_half_to_even() {
        for v in [0.5f32, 1.5, -2.5, 7.49, -7.51, 0.0, -0.0, 4194303.0, -4194303.0, 1e-30, 123.5] {
            assert_eq!(nearest_int(v), crate::common::nearest_int(v), "{v}");
        }
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        // Out of range: what the C bit trick gives (no assertion under NDEBUG).
        assert_eq!(nearest_int(f32::INFINITY), -4194304);
        assert_eq!(nearest_int(f32::NEG_INFINITY), -4194304);
        assert_eq!(nearest_int(f32::NAN), 0);
    }

    #[test]
    fn scale_min_k4_packing_roundtrips() {
        // Every 6-bit value in every slot, in a few combinations.
        for seed in 0u32..64 {
            let mut ls = [0u8; 8];
            let mut lm = [0u8; 8];
            for j in 0..8 {
                ls[j] = ((seed * 7 + j as u32 * 13) % 64) as u8;
                lm[j] = ((seed * 11 + j as u32 * 5 + 3) % 64) as u8;
            }
            let packed = pack_scale_min_k4(&ls, &lm);
            for j in 0..8 {
                assert_eq!(get_scale_min_k4(j, &packed), (ls[j], lm[j]), "seed {seed} j {j}");
            }
        }
    }

    #[test]
    fn qx_quants_all_zero_group_gives_zero_codes() {
        let x = [0.0f32; 16];
        let mut l = [5i8; 16];
        assert_eq!(make_qx_quants::<16>(32, &x, &mut l, 1, None), 0.0);
        assert_eq!(l, [0i8; 16]);
        let mut l = [5i8; 16];
        assert_eq!(make_q3_quants(4, &x, &mut l, true), 0.0);
        assert_eq!(l, [0i8; 16]);
    }

    #[test]
    fn qx_quants_reconstructs_exact_grid() {
        // Values on the grid k*0.5 for k in -8..7 must be found exactly (scale -0.5 with max = -4.0 → iscale 2).
        let x: Vec<f32> = (-8..8).map(|k| k as f32 * 0.5).collect();
        let mut l = [0i8; 16];
        let s = make_qx_quants::<16>(8, &x, &mut l, 2, None);
        for (i, &xi) in x.iter().enumerate() {
            assert_eq!(s * (l[i] as i32 - 8) as f32, xi);
        }
    }

    #[test]
    fn qkx_degenerate_range() {
        let x = [0.25f32; 32];
        let w = [1.0f32; 32];
        let mut l = [9u8; 32];
        let p = QkxParams { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false };
        // All equal and positive: min is forced to 0, so the range is (0, 0.25], not degenerate.
        let (s, m) = make_qkx2_quants::<32>(&x, &w, &mut l, p);
        assert!(s > 0.0 && m == 0.0);
        let x = [-0.5f32; 32];
        let (s, m) = make_qkx3_quants::<32>(&x, &w, &mut l, p);
        // max = -0.5 <= min = -0.5: degenerate, L = 0 and the_min = 0.5.
        assert_eq!((s, m), (0.0, 0.5));
        assert_eq!(l, [0u8; 32]);
    }

    #[test]
    fn qp_quants_positive_scales() {
        let x: Vec<f32> = (1..=8).map(|k| k as f32).collect();
        let w = [1.0f32; 8];
        let mut l = [0u8; 8];
        let d = make_qp_quants(63, &x, &mut l, &w);
        for i in 0..8 {
            assert!((d * l[i] as f32 - x[i]).abs() <= d * 0.5 + 1e-6);
        }
    }
}
