//! IQ2_XXS, IQ2_XS and IQ2_S: the 2-bit lattice quants (ggml-quants.c), quantize and dequantize, bit-exact with the
//! pinned llama.cpp. Facts: `../shared/docs/gguf-spec.md` §2.10.
//!
//! llama-quantize reaches these through `quantize_iq2_xxs` / `quantize_iq2_xs` / `quantize_iq2_s`, which run
//! `quantize_row_iq2_xxs_impl` / `quantize_row_iq2_xs_impl` / `quantize_row_iq2_s_impl` row by row; the grids and
//! neighbour lists are those of `iq2xs_init_impl` ([`crate::iqgrid`]); the search helper is
//! `iq2_find_best_neighbour`, the IQ2_XXS start scale `make_qp_quants` ([`crate::search::make_qp_quants`]).
//!
//! Importance weights: ggml requires them for IQ2_XXS and IQ2_XS (`GGML_ASSERT(quant_weights)` in both `_impl`s,
//! `ggml_quantize_requires_imatrix`), and [`crate::ggml::quantize_rows`] refuses those types without them
//! ([`crate::EncodeError::ImatrixRequired`]). Called directly with `None`, [`quantize_row_iq2_xxs`] and
//! [`quantize_row_iq2_xs`] use weights of 1 for every element: a usable result that ggml has no counterpart for
//! (it aborts). IQ2_S without weights uses `0.25*sigma2 + x²`, as ggml does.
//!
//! Non-finite inputs: ggml has no defined result for them (the searches end in `GGML_ASSERT(scale >= 0)` or the
//! "point not on grid" abort with NaN scales, or in `iq2_find_best_neighbour`'s assertion when every distance is
//! infinite or NaN). Here they give a deterministic block and never panic: an unmatched neighbour search takes the
//! first neighbour, an off-grid final point grid index 0.
//!
//! Block layouts (ggml-common.h), byte offsets, little endian:
//! - `block_iq2_xxs` (66 B): `d: f16` @0, `qs: u16[32]` @2 — per 32 values two u32: 4 grid bytes (256-grid), then
//!   4 × 7 sign-index bits and the 4-bit scale in bits 28..31
//! - `block_iq2_xs` (74 B): `d` @0, `qs: u16[32]` @2 (9-bit grid index, 7-bit sign index), `scales[8]` @66
//! - `block_iq2_s` (82 B): `d` @0, `qs[64]` @2 (32 low grid bytes, then 32 sign bytes), `qh[8]` @66 (2 high grid
//!   bits per 8 values), `scales[8]` @74
//!
//! Floating point: every operation is the C one, in the C order, in f32 (no FMA; `w*x*q` is `(w*x)*q`). C's `MIN` /
//! `MAX` macros are written out as the comparisons they expand to.

use sling_core::DType;

use crate::common::{fp16_to_fp32, ggml_fp32_to_fp16};
use crate::iq_tables::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, KMASK_IQ2XS, KSIGNS_IQ2XS};
use crate::iqgrid::{iq2_maps, Iq2Maps};
use crate::iqsearch::{IqSearch, Reference};
use crate::search::{make_qp_quants, nearest_int, GROUP_MAX_EPS};

const QK_K: usize = 256;
const IQ2_XXS_BYTES: usize = 66;
const IQ2_XS_BYTES: usize = 74;
const IQ2_S_BYTES: usize = 82;

// Block layouts, checked at compile time like ggml-common.h's static_asserts.
const _: () = assert!(IQ2_XXS_BYTES == 2 + QK_K / 8 * 2);
const _: () = assert!(IQ2_XS_BYTES == 2 + QK_K / 8 * 2 + QK_K / 32);
const _: () = assert!(IQ2_S_BYTES == 2 + QK_K / 4 + QK_K / 16);

/// `kMaxQ` of all three quantizers.
const K_MAX_Q: i32 = 3;
/// `GROUP_MAX_EPS_IQ2_S` (ggml-quants.c).
const GROUP_MAX_EPS_IQ2_S: f32 = 1e-8;

/// `MAX(a, b)` on floats as the C macro evaluates it: `a > b ? a : b`.
#[inline(always)]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `MAX(0, MIN(hi, l))` on ints.
#[inline(always)]
fn clamp(l: i32, hi: i32) -> i32 {
    let m = if hi < l { hi } else { l };
    if 0 > m {
        0
    } else {
        m
    }
}

/// `l = MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*x-1))))`: the grid level (0..2) of a magnitude.
#[inline(always)]
fn level(id: f32, x: f32) -> i32 {
    clamp(nearest_int(0.5 * (id * x - 1.0)), K_MAX_Q - 1)
}

/// `uint16_t u = 0; for i: u |= (L[8k+i] << 2*i)` for one group of 8 levels.
#[inline(always)]
fn pack_u(l: &[i8]) -> usize {
    let mut u = 0u16;
    for (i, &li) in l.iter().enumerate().take(8) {
        u |= ((li as i32) << (2 * i)) as u16;
    }
    u as usize
}

/// `kmap_q2xs[u]`, with indices beyond the map (only reachable from non-finite inputs) reading as off-grid.
#[inline(always)]
fn map_at(maps: &Iq2Maps, u: usize) -> i32 {
    maps.map.get(u).copied().unwrap_or(-1)
}

/// `iq2_find_best_neighbour(neighbours, grid, xval, weight, scale, L)`: the neighbour of the off-grid point `u`
/// with the least weighted squared error (first wins ties), written to `l` as levels; returns its grid index.
#[inline(always)]
pub fn find_best_neighbour(maps: &Iq2Maps, u: usize, xval: &[f32], weight: &[f32], scale: f32, l: &mut [i8]) -> usize {
    let neighbours = match maps.map.get(u) {
        Some(&m) if m < 0 => maps.neighbours_of(u),
        _ => &[0u16][..],
    };
    let mut best_d2 = f32::MAX;
    // C asserts that some distance is below FLT_MAX; without one (non-finite inputs) take the first neighbour.
    let mut grid_index = neighbours[0] as usize;
    for &nb in neighbours {
        let pg = maps.grid[nb as usize].to_le_bytes();
        let mut d2 = 0.0f32;
        for i in 0..8 {
            let q = pg[i] as i8 as f32;
            let diff = scale * q - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if d2 < best_d2 {
            best_d2 = d2;
            grid_index = nb as usize;
        }
    }
    set_levels(maps, grid_index, l);
    grid_index
}

/// `for i: L[i] = (pg[i] - 1)/2` from grid point `grid_index`.
#[inline(always)]
fn set_levels(maps: &Iq2Maps, grid_index: usize, l: &mut [i8]) {
    let pg = maps.grid[grid_index].to_le_bytes();
    for (li, &p) in l.iter_mut().zip(&pg) {
        *li = (p as i8 - 1) / 2;
    }
}

/// The final lookup of a group's levels: its grid index (C aborts when the levels are off the grid, which only
/// non-finite inputs reach; index 0 here).
#[inline(always)]
fn final_index(maps: &Iq2Maps, l: &[i8]) -> usize {
    let g = map_at(maps, pack_u(l));
    if g >= 0 {
        g as usize
    } else {
        0
    }
}

/// `sumqx = Σ w*x*q`, `sumq2 = Σ w*q*q` with `q = 2*L + 1`, in order.
#[inline(always)]
fn sums(weight: &[f32], xval: &[f32], l: &[i8]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for i in 0..weight.len() {
        let w = weight[i];
        let q = (2 * l[i] as i32 + 1) as f32;
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The winning step of an IQ2 scale search over `G` groups of 8: its scale, levels and which groups were on the
/// grid before snapping.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Iq2Step<const G: usize> {
    pub scale: f32,
    pub l: [[i8; 8]; G],
    pub on_grid: [bool; G],
}

/// The `for (int is = -n; is <= n; ++is)` loop shared by `quantize_row_iq2_xxs_impl` (4 groups, `n` = 6, `den` =
/// `eff_max`) and `quantize_row_iq2_xs_impl` / `quantize_row_iq2_s_impl` (2 groups, `n` = 9, `den` = `max`): for
/// each step the levels at `id = (2*kMaxQ - 1 + 0.1*is)/den`, off-grid groups snapped by `S::neighbour_iq2` (weights
/// `waux`); the step with the largest `sumqx²/sumq2` (weights `weight`) wins, the first on ties (starting from
/// `best = 0`). `None` when no step scores.
#[inline(always)]
pub fn step_search<S: IqSearch, const G: usize>(
    maps: &Iq2Maps,
    nsteps: i32,
    den: f32,
    xval: &[f32],
    weight: &[f32],
    waux: &[f32],
) -> Option<Iq2Step<G>> {
    let mut laux = [[0i8; 8]; G];
    let mut on_grid = [true; G];
    let mut best = 0.0f32;
    let mut win = None;
    for is in -nsteps..=nsteps {
        let id = ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.1) / den;
        let this_scale = 1.0 / id;
        for k in 0..G {
            let r = 8 * k..8 * k + 8;
            for i in 0..8 {
                laux[k][i] = level(id, xval[8 * k + i]) as i8;
            }
            let u = pack_u(&laux[k]);
            on_grid[k] = true;
            if map_at(maps, u) < 0 {
                on_grid[k] = false;
                S::neighbour_iq2(maps, u, &xval[r.clone()], &waux[r], this_scale, &mut laux[k]);
            }
        }
        let (sumqx, sumq2) = sums(&weight[..8 * G], &xval[..8 * G], laux.as_flattened());
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            let scale = sumqx / sumq2;
            best = scale * sumqx;
            win = Some(Iq2Step { scale, l: laux, on_grid });
        }
    }
    win
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

/// The magnitudes of 8 values and their sign bits (`xval = |x|` by `x >= 0`, bit `i` set for the others).
#[inline(always)]
fn fold_signs(xb: &[f32], xval: &mut [f32]) -> (u8, i32) {
    let mut s = 0u8;
    let mut nflip = 0;
    for i in 0..8 {
        if xb[i] >= 0.0 {
            xval[i] = xb[i];
        } else {
            xval[i] = -xb[i];
            nflip += 1;
            s |= 1 << i;
        }
    }
    (s, nflip)
}

/// The even-parity sign fold of IQ2_XXS / IQ2_XS: with an odd number of negatives, the element with the least
/// `w*x*x` (first wins) keeps its magnitude negated and its sign bit flipped, so 7 bits encode the 8 signs.
#[inline(always)]
fn fold_signs_even(xb: &[f32], weight: &[f32], xval: &mut [f32]) -> u8 {
    let (mut s, nflip) = fold_signs(xb, xval);
    if nflip % 2 != 0 {
        let mut imin = 0;
        let mut min = weight[0] * xb[0] * xb[0];
        for i in 1..8 {
            let ax = weight[i] * xb[i] * xb[i];
            if ax < min {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= 1 << imin;
    }
    s & 127
}

/// The importance weights of super-block `ibl` (`quant_weights + QK_K*ibl`); `None` if the caller passed too few.
#[inline(always)]
fn block_qw(qw: Option<&[f32]>, ibl: usize) -> Option<&[f32]> {
    qw.and_then(|w| w.get(QK_K * ibl..QK_K * (ibl + 1)))
}

/// `weight[i] = qw[i] * sqrtf(sigma2 + xb[i]*xb[i])`, with `qw = 1` when there are none (see the module doc).
#[inline(always)]
fn imatrix_weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32, weight: &mut [f32]) {
    for i in 0..weight.len() {
        let q = qw.map_or(1.0, |q| q[i]);
        weight[i] = q * (sigma2 + xb[i] * xb[i]).sqrt();
    }
}

// ---------------------------------------------------------------- IQ2_XXS

/// `quantize_row_iq2_xxs_impl` (ggml-quants.c) for one row of whole 256-blocks. `qw`: see the module doc.
#[inline(always)]
pub fn quantize_row_iq2_xxs(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    quantize_row_iq2_xxs_with::<Reference>(x, qw, y)
}

/// [`quantize_row_iq2_xxs`] with the hot spots of `S`.
#[inline(always)]
pub fn quantize_row_iq2_xxs_with<S: IqSearch>(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let maps = iq2_maps(DType::IQ2XXS);
    for (ibl, (xbl, yb)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(IQ2_XXS_BYTES)).enumerate() {
        quantize_block_iq2_xxs::<S>(maps, xbl, block_qw(qw, ibl), yb);
    }
}

#[inline(always)]
fn quantize_block_iq2_xxs<S: IqSearch>(maps: &Iq2Maps, xbl: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut scales = [0.0f32; QK_K / 32];
    let mut weight = [0.0f32; 32];
    let mut xval = [0.0f32; 32];
    let mut l = [0i8; 32];
    let mut waux = [0.0f32; 32];
    let mut block_signs = [0u8; 4];
    let mut q2 = [0u32; 2 * (QK_K / 32)];

    let mut max_scale = 0.0f32;
    let sigma2 = sum_sq(xbl) / QK_K as f32;

    for ib in 0..QK_K / 32 {
        let xb = &xbl[32 * ib..32 * ib + 32];
        imatrix_weights(xb, qw.map(|q| &q[32 * ib..32 * ib + 32]), sigma2, &mut weight);
        for i in 0..32 {
            waux[i] = weight[i].sqrt();
        }
        for (k, s) in block_signs.iter_mut().enumerate() {
            let r = 8 * k..8 * k + 8;
            *s = fold_signs_even(&xb[r.clone()], &weight[r.clone()], &mut xval[r]);
        }
        let mut max = xval[0];
        for &v in &xval[1..] {
            max = fmax(max, v);
        }
        if max < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            l = [0; 32];
            continue;
        }
        let mut lu = [0u8; 32];
        let mut scale = make_qp_quants(K_MAX_Q + 1, &xval, &mut lu, &weight);
        for (li, &b) in l.iter_mut().zip(&lu) {
            *li = b as i8;
        }
        let eff_max = scale * K_MAX_Q as f32;
        if eff_max <= 0.0 {
            scales[ib] = 0.0;
            l = [0; 32];
            continue;
        }
        if let Some(w) = S::steps_iq2::<4>(maps, 6, eff_max, &xval, &weight, &waux) {
            scale = w.scale;
            l.copy_from_slice(w.l.as_flattened());
        }
        if scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                let mut u = 0u16;
                for i in 0..8 {
                    u |= (level(id, xval[8 * k + i]) << (2 * i)) as u16;
                }
                let u = u as usize;
                let mut grid_index = map_at(maps, u);
                if grid_index < 0 {
                    grid_index =
                        S::neighbour_iq2(maps, u, &xval[r.clone()], &waux[r.clone()], scale, &mut l[r.clone()]) as i32;
                }
                set_levels(maps, grid_index as usize, &mut l[r]);
            }
            let (sumqx, sumq2) = sums(&weight, &xval, &l);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        if scale < 0.0 {
            // "This should never happen": flip the scale positive and every sign with it.
            scale = -scale;
            for s in &mut block_signs {
                *s = !*s & 127;
            }
        }
        for k in 0..4 {
            let grid_index = final_index(maps, &l[8 * k..8 * k + 8]);
            q2[2 * ib] |= (grid_index as u32) << (8 * k);
            q2[2 * ib + 1] |= (block_signs[k] as u32) << (7 * k);
        }
        scales[ib] = scale;
        max_scale = fmax(max_scale, scale);
    }

    y.fill(0);
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    y[..2].copy_from_slice(&ggml_fp32_to_fp16(d).to_le_bytes());
    let id = 1.0 / d;
    for ib in 0..QK_K / 32 {
        let l = clamp(nearest_int(0.5 * (id * scales[ib] - 1.0)), 15);
        q2[2 * ib + 1] |= (l as u32) << 28;
    }
    for (dst, q) in y[2..].chunks_exact_mut(4).zip(&q2) {
        dst.copy_from_slice(&q.to_le_bytes());
    }
}

/// `dequantize_row_iq2_xxs` (ggml-quants.c).
pub fn dequantize_row_iq2_xxs(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(IQ2_XXS_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = fp16_to_fp32(u16::from_le_bytes([b[0], b[1]]));
        for ib32 in 0..QK_K / 32 {
            let q = &b[2 + 8 * ib32..2 + 8 * ib32 + 8];
            let aux1 = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
            let db = d * (0.5 + (aux1 >> 28) as f32) * 0.25;
            for l in 0..4 {
                let grid = IQ2XXS_GRID[q[l] as usize].to_le_bytes();
                let signs = KSIGNS_IQ2XS[((aux1 >> (7 * l)) & 127) as usize];
                let o = &mut out[32 * ib32 + 8 * l..32 * ib32 + 8 * l + 8];
                for j in 0..8 {
                    o[j] = db * grid[j] as f32 * if signs & KMASK_IQ2XS[j] != 0 { -1.0 } else { 1.0 };
                }
            }
        }
    }
}

// ---------------------------------------------------------------- IQ2_XS and IQ2_S

/// The scale search shared verbatim by `quantize_row_iq2_xs_impl` and `quantize_row_iq2_s_impl` for one group of
/// 16, from `float best = 0` to the refit after re-snapping the off-grid halves. `l` comes in zeroed and leaves with
/// the levels; returns the scale.
#[inline(always)]
fn search_16<S: IqSearch>(
    maps: &Iq2Maps,
    max: f32,
    weight: &[f32; 16],
    waux: &[f32; 16],
    xval: &[f32; 16],
    l: &mut [i8; 16],
) -> f32 {
    let mut is_on_grid = [true; 2];
    let mut scale = max / (2 * K_MAX_Q - 1) as f32;
    if let Some(w) = S::steps_iq2::<2>(maps, 9, max, xval, weight, waux) {
        scale = w.scale;
        l.copy_from_slice(w.l.as_flattened());
        is_on_grid = w.on_grid;
    }
    let n_not_ongrid = is_on_grid.iter().filter(|&&g| !g).count();
    if n_not_ongrid > 0 && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..2 {
            if is_on_grid[k] {
                continue;
            }
            let r = 8 * k..8 * k + 8;
            let mut u = 0u16;
            for i in 0..8 {
                let li = level(id, xval[8 * k + i]);
                u |= (li << (2 * i)) as u16;
                l[8 * k + i] = li as i8;
            }
            let u = u as usize;
            if map_at(maps, u) < 0 {
                S::neighbour_iq2(maps, u, &xval[r.clone()], &waux[r.clone()], scale, &mut l[r]);
            }
        }
        let (sumqx, sumq2) = sums(weight, xval, l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    scale
}

/// `max = xval[0]; for i: max = MAX(max, xval[i])` over a group of 16 magnitudes.
#[inline(always)]
fn max16(xval: &[f32; 16]) -> f32 {
    let mut max = xval[0];
    for &v in &xval[1..] {
        max = fmax(max, v);
    }
    max
}

/// The 16 four-bit sub-block scales of IQ2_XS / IQ2_S relative to `d = max_scale/31`, packed two per byte.
#[inline(always)]
fn pack_scales(scales: &[f32; QK_K / 16], d: f32, out: &mut [u8]) {
    let id = 1.0 / d;
    for ib in 0..QK_K / 16 {
        let l = clamp(nearest_int(0.5 * (id * scales[ib] - 1.0)), 15);
        if ib % 2 == 0 {
            out[ib / 2] = l as u8;
        } else {
            out[ib / 2] |= (l << 4) as u8;
        }
    }
}

/// `quantize_row_iq2_xs_impl` (ggml-quants.c) for one row of whole 256-blocks. `qw`: see the module doc.
#[inline(always)]
pub fn quantize_row_iq2_xs(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    quantize_row_iq2_xs_with::<Reference>(x, qw, y)
}

/// [`quantize_row_iq2_xs`] with the hot spots of `S`.
#[inline(always)]
pub fn quantize_row_iq2_xs_with<S: IqSearch>(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let maps = iq2_maps(DType::IQ2XS);
    for (ibl, (xbl, yb)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(IQ2_XS_BYTES)).enumerate() {
        quantize_block_iq2_xs::<S>(maps, xbl, block_qw(qw, ibl), yb);
    }
}

#[inline(always)]
fn quantize_block_iq2_xs<S: IqSearch>(maps: &Iq2Maps, xbl: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut scales = [0.0f32; QK_K / 16];
    let mut weight = [0.0f32; 16];
    let mut xval = [0.0f32; 16];
    let mut waux = [0.0f32; 16];
    let mut block_signs = [0u8; 2];
    let mut q2 = [0u16; 2 * (QK_K / 16)];

    let mut max_scale = 0.0f32;
    let sigma2 = sum_sq(xbl) / QK_K as f32;

    for ib in 0..QK_K / 16 {
        let xb = &xbl[16 * ib..16 * ib + 16];
        imatrix_weights(xb, qw.map(|q| &q[16 * ib..16 * ib + 16]), sigma2, &mut weight);
        for i in 0..16 {
            waux[i] = weight[i].sqrt();
        }
        for (k, s) in block_signs.iter_mut().enumerate() {
            let r = 8 * k..8 * k + 8;
            *s = fold_signs_even(&xb[r.clone()], &weight[r.clone()], &mut xval[r]);
        }
        let max = max16(&xval);
        let mut l = [0i8; 16];
        if max < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let mut scale = search_16::<S>(maps, max, &weight, &waux, &xval, &mut l);
        if scale < 0.0 {
            scale = -scale;
            for s in &mut block_signs {
                *s = !*s & 127;
            }
        }
        for k in 0..2 {
            let grid_index = final_index(maps, &l[8 * k..8 * k + 8]);
            q2[2 * ib + k] = grid_index as u16 | ((block_signs[k] as u16) << 9);
        }
        scales[ib] = scale;
        max_scale = fmax(max_scale, scale);
    }

    y.fill(0);
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    y[..2].copy_from_slice(&ggml_fp32_to_fp16(d).to_le_bytes());
    pack_scales(&scales, d, &mut y[66..74]);
    for (dst, q) in y[2..66].chunks_exact_mut(2).zip(&q2) {
        dst.copy_from_slice(&q.to_le_bytes());
    }
}

/// `dequantize_row_iq2_xs` (ggml-quants.c).
pub fn dequantize_row_iq2_xs(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(IQ2_XS_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = fp16_to_fp32(u16::from_le_bytes([b[0], b[1]]));
        for ib32 in 0..QK_K / 32 {
            let sc = b[66 + ib32];
            let db = [d * (0.5 + (sc & 0xf) as f32) * 0.25, d * (0.5 + (sc >> 4) as f32) * 0.25];
            for l in 0..4 {
                let at = 2 + 2 * (4 * ib32 + l);
                let q = u16::from_le_bytes([b[at], b[at + 1]]);
                let grid = IQ2XS_GRID[(q & 511) as usize].to_le_bytes();
                let signs = KSIGNS_IQ2XS[(q >> 9) as usize];
                let o = &mut out[32 * ib32 + 8 * l..32 * ib32 + 8 * l + 8];
                for j in 0..8 {
                    o[j] = db[l / 2] * grid[j] as f32 * if signs & KMASK_IQ2XS[j] != 0 { -1.0 } else { 1.0 };
                }
            }
        }
    }
}

/// `quantize_row_iq2_s_impl` (ggml-quants.c) for one row of whole 256-blocks; without `qw` the weights are
/// `0.25*sigma2 + x²`, as in ggml.
#[inline(always)]
pub fn quantize_row_iq2_s(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    quantize_row_iq2_s_with::<Reference>(x, qw, y)
}

/// [`quantize_row_iq2_s`] with the hot spots of `S`.
#[inline(always)]
pub fn quantize_row_iq2_s_with<S: IqSearch>(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let maps = iq2_maps(DType::IQ2S);
    for (ibl, (xbl, yb)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(IQ2_S_BYTES)).enumerate() {
        quantize_block_iq2_s::<S>(maps, xbl, qw.map(|_| block_qw(qw, ibl).unwrap_or(&[])), yb);
    }
}

#[inline(always)]
fn quantize_block_iq2_s<S: IqSearch>(maps: &Iq2Maps, xbl: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut scales = [0.0f32; QK_K / 16];
    let mut weight = [0.0f32; 16];
    let mut xval = [0.0f32; 16];
    let mut waux = [0.0f32; 16];
    let mut block_signs = [0u8; 2];

    y.fill(0);
    let (qs, rest) = y[2..].split_at_mut(QK_K / 4);
    let (qh, sc) = rest.split_at_mut(QK_K / 32);

    let mut max_scale = 0.0f32;
    let sigma2 = 2.0 * sum_sq(xbl) / QK_K as f32;

    for ib in 0..QK_K / 16 {
        let xb = &xbl[16 * ib..16 * ib + 16];
        match qw {
            // A too-short imatrix (not reachable through `quantize_rows`, which checks lengths) weighs 0.
            Some(q) => {
                for i in 0..16 {
                    let qi = q.get(16 * ib + i).copied().unwrap_or(0.0);
                    weight[i] = qi * (sigma2 + xb[i] * xb[i]).sqrt();
                }
            }
            None => {
                for i in 0..16 {
                    weight[i] = 0.25 * sigma2 + xb[i] * xb[i];
                }
            }
        }
        for i in 0..16 {
            waux[i] = weight[i].sqrt();
        }
        for (k, s) in block_signs.iter_mut().enumerate() {
            *s = fold_signs(&xb[8 * k..8 * k + 8], &mut xval[8 * k..8 * k + 8]).0;
        }
        let max = max16(&xval);
        let mut l = [0i8; 16];
        if max < GROUP_MAX_EPS_IQ2_S {
            scales[ib] = 0.0;
            continue;
        }
        let mut scale = search_16::<S>(maps, max, &weight, &waux, &xval, &mut l);
        if scale < 0.0 {
            scale = -scale;
            for s in &mut block_signs {
                *s = !*s;
            }
        }
        for k in 0..2 {
            let grid_index = final_index(maps, &l[8 * k..8 * k + 8]);
            let i8 = 2 * ib + k;
            qs[i8] = (grid_index & 255) as u8;
            qh[i8 / 4] |= ((grid_index >> 8) << (2 * (i8 % 4))) as u8;
            qs[QK_K / 8 + i8] = block_signs[k];
        }
        scales[ib] = scale;
        max_scale = fmax(max_scale, scale);
    }

    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    pack_scales(&scales, d, sc);
    y[..2].copy_from_slice(&ggml_fp32_to_fp16(d * 0.9875).to_le_bytes());
}

/// `dequantize_row_iq2_s` (ggml-quants.c).
pub fn dequantize_row_iq2_s(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(IQ2_S_BYTES).zip(x.chunks_exact_mut(QK_K)) {
        let d = fp16_to_fp32(u16::from_le_bytes([b[0], b[1]]));
        let qs = &b[2..2 + QK_K / 8];
        let signs = &b[2 + QK_K / 8..2 + QK_K / 4];
        let qh = &b[66..74];
        let sc = &b[74..82];
        for ib32 in 0..QK_K / 32 {
            let db = [d * (0.5 + (sc[ib32] & 0xf) as f32) * 0.25, d * (0.5 + (sc[ib32] >> 4) as f32) * 0.25];
            for l in 0..4 {
                let dl = db[l / 2];
                let idx = qs[4 * ib32 + l] as usize | (((qh[ib32] as usize) << (8 - 2 * l)) & 0x300);
                let grid = IQ2S_GRID[idx].to_le_bytes();
                let s = signs[4 * ib32 + l];
                let o = &mut out[32 * ib32 + 8 * l..32 * ib32 + 8 * l + 8];
                for j in 0..8 {
                    o[j] = dl * grid[j] as f32 * if s & KMASK_IQ2XS[j] != 0 { -1.0 } else { 1.0 };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed as f32).sin() * 0.05).collect()
    }

    /// Without weights IQ2_XXS / IQ2_XS do not panic (ggml refuses them higher up); rows on which ggml aborts
    /// (non-finite values, overflowing weighted sums) do not panic either.
    #[test]
    fn no_panics_without_weights_or_on_non_finite_rows() {
        type Q = fn(&[f32], Option<&[f32]>, &mut [u8]);
        let kinds: [(Q, usize); 3] = [
            (quantize_row_iq2_xxs, IQ2_XXS_BYTES),
            (quantize_row_iq2_xs, IQ2_XS_BYTES),
            (quantize_row_iq2_s, IQ2_S_BYTES),
        ];
        let w = vec![1.0f32; 512];
        for (q, bytes) in kinds {
            let mut y = vec![0u8; 2 * bytes];
            q(&row(512, 1), None, &mut y);
            assert!(y.iter().any(|&b| b != 0));
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX] {
                let mut x = row(512, 2);
                x[3] = bad;
                x[300] = -bad;
                q(&x, Some(&w), &mut y);
                q(&x, None, &mut y);
            }
            q(&vec![f32::NAN; 512], Some(&w), &mut y);
            // Huge weights on large values: the weighted sums overflow to inf and NaN (ggml aborts there).
            let huge = vec![1.0e30f32; 512];
            q(&row(512, 4).iter().map(|v| v * 1.0e14).collect::<Vec<_>>(), Some(&huge), &mut y);
        }
    }

    /// Round trips reproduce a row whose groups are exactly on the grid with small error.
    #[test]
    fn round_trip_is_close() {
        let x = row(256, 3);
        let w = vec![1.0f32; 256];
        type Pair = (fn(&[f32], Option<&[f32]>, &mut [u8]), fn(&[u8], &mut [f32]), usize);
        let pairs: [Pair; 3] = [
            (quantize_row_iq2_xxs, dequantize_row_iq2_xxs, IQ2_XXS_BYTES),
            (quantize_row_iq2_xs, dequantize_row_iq2_xs, IQ2_XS_BYTES),
            (quantize_row_iq2_s, dequantize_row_iq2_s, IQ2_S_BYTES),
        ];
        for (q, dq, bytes) in pairs {
            let mut y = vec![0u8; bytes];
            q(&x, Some(&w), &mut y);
            let mut back = vec![0.0f32; 256];
            dq(&y, &mut back);
            let err: f32 = x.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / 256.0;
            let var: f32 = x.iter().map(|a| a * a).sum::<f32>() / 256.0;
            assert!(err < 0.25 * var, "relative mse {}", err / var);
        }
    }
}
