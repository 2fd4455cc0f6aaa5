//! The scale searches of IQ3_XXS, IQ3_S ([`sling_quantizers::iq3::scale_search`]) and of IQ2_XXS, IQ2_XS, IQ2_S
//! ([`sling_quantizers::iq2::step_search`]) on AVX2, ports of the `for (int is = -n; is <= n; ++is)` loops of
//! `quantize_row_iq3_*_impl` and `quantize_row_iq2_*_impl`: eight steps of the search side by side, one per lane.
//! Each returns exactly what its reference returns, for every input (tested against it below, and through the
//! encoders on hostile rows in `lib.rs`):
//!
//! - **the levels** of each step: `MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*x - 1))))` with the reference's
//!   operations (no FMA) and `nearest_int`'s bit trick, per lane;
//! - **the grid**: the packed point of each group of levels (4 x 3 bits for IQ3, 8 x 2 bits for IQ2) looked up in
//!   the index map (a gather); where a lane is off the grid, the neighbour search (`iq3_find_best_neighbour`,
//!   `iq2_find_best_neighbour`) runs in that lane over its own list, the lanes in step (the longest list sets the
//!   count; the lists hold each point's packed levels in 16 bits, so one gather brings two consecutive points of
//!   every lane's list), each distance summed from `0.0` in coordinate order and kept on a strict `<` against the
//!   lane's best so far, as the C loop keeps its first least. A lane none of whose distances is below `FLT_MAX` (non-finite
//!   sums, where ggml aborts) takes its first neighbour, as the reference. IQ2 lanes whose list is longer than
//!   [`IQ2_LANE_MAX`] search it alone with the vector search over the list ([`crate::iq_lanes`]);
//! - **the sums** `sumqx`, `sumq2` over the sub-block in element order, one lane per step, so each step's sums are
//!   the reference's to the bit;
//! - **the choice** of the best step: the reference's test, scalar, in step order, on those sums.
//!
//! The lanes of the last vector past the final step repeat it and are never chosen.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use sling_quantizers::iq2::Iq2Step;
use sling_quantizers::iq3::{iq3_steps, Iq3Best, Iq3Data};
use sling_quantizers::iqgrid::Iq2Maps;
use sling_quantizers::iqsearch::IqSearch;

use crate::iq_lanes::Avx2Iq;

/// Neighbour lists (`[n, index_1, ..., index_n]` back to back, as `iq3xs_init_impl` and `iq2xs_init_impl` lay
/// them out) for gathers: each grid index replaced by `packed(index)`, the packed levels of that grid point; the
/// counts stay as they are.
pub(crate) fn packed_lists(neighbours: &[u16], packed: impl Fn(usize) -> i32) -> Vec<i32> {
    let mut out: Vec<i32> = neighbours.iter().map(|&v| v as i32).collect();
    let mut at = 0;
    while at < out.len() {
        let n = neighbours[at] as usize;
        for e in &mut out[at + 1..=at + n] {
            *e = packed(*e as usize);
        }
        at += n + 1;
    }
    out
}

/// [`packed_lists`] with 16-bit entries (points whose packed levels fit 16 bits: IQ2's 8 × 2, IQ3's 4 × 3), and
/// one zero entry after the last list, so that a 32-bit gather at any entry — which reads it and the next — stays
/// inside: one gather brings two consecutive points of a list.
fn packed_lists16(neighbours: &[u16], packed: impl Fn(usize) -> u16) -> Vec<u16> {
    let mut out: Vec<u16> = packed_lists(neighbours, |k| i32::from(packed(k))).into_iter().map(|v| v as u16).collect();
    out.push(0);
    out
}

/// [`packed_lists16`] of an [`Iq3Data`]: levels `u = Σ l_i << 3i` (12 bits).
fn neighbour_points(data: &Iq3Data) -> &'static [u16] {
    static N256: OnceLock<Vec<u16>> = OnceLock::new();
    static N512: OnceLock<Vec<u16>> = OnceLock::new();
    let build = || {
        packed_lists16(&data.neighbours, |k| {
            data.grid[k].iter().enumerate().fold(0u16, |u, (c, &qc)| u | ((qc as u16 - 1) / 2) << (3 * c))
        })
    };
    // Only the two shared grids of `iq3_data` reach here, told apart by their size.
    match data.grid.len() {
        256 => N256.get_or_init(build),
        _ => N512.get_or_init(build),
    }
}

/// [`sling_quantizers::iq3::scale_search`] on AVX2 (module doc).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn scale_search<const XXS: bool>(
    data: &Iq3Data,
    xval: &[f32; 32],
    weight: &[f32; 32],
    waux: &[f32; 32],
    max: f32,
) -> Iq3Best {
    let nbr = neighbour_points(data);
    let nsteps = iq3_steps(XXS);
    let mut wx = [0.0f32; 32];
    for i in 0..32 {
        wx[i] = weight[i] * xval[i];
    }
    let mut best = 0.0f32;
    // `max / (2*kMaxQ - 1)`, kept when no step wins.
    let mut scale = max / 15.0;
    let mut winner: Option<([i32; 8], u32)> = None;
    let mut is0 = -nsteps;
    while is0 <= nsteps {
        let (valid, ids, scs) = steps(is0, nsteps, 15.0, 0.2, max);
        let (id, sc) = (_mm256_loadu_ps(ids.as_ptr()), _mm256_loadu_ps(scs.as_ptr()));
        let mut sums = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut points = [[0i32; 8]; 8];
        let mut off = [0u32; 8];
        let zero = _mm256_setzero_si256();
        let mut looked = [(zero, zero); 8];
        for (k, l) in looked.iter_mut().enumerate() {
            *l = group_lookup::<4>(id, &data.map, 3, 7, &xval[4 * k..4 * k + 4]);
        }
        for k in 0..8 {
            let r = 4 * k..4 * k + 4;
            let (u, offgrid) = group_sums::<4>(looked[k], 3, &wx[r.clone()], &weight[r.clone()], &mut sums, |g, u| {
                let (m, start, n) = list_heads(nbr, g);
                lanes_snap::<4>(nbr, m, start, n, u, sc, &xval[r.clone()], &waux[r.clone()], 3, 7)
            });
            off[k] = offgrid;
            _mm256_storeu_si256(points[k].as_mut_ptr().cast(), u);
        }
        let (qx, q2) = (lanes(sums.0), lanes(sums.1));
        for j in 0..valid {
            if q2[j] > 0.0 && qx[j] * qx[j] > best * q2[j] {
                scale = qx[j] / q2[j];
                best = scale * qx[j];
                let on = (0..8).fold(0u32, |m, k| m | ((off[k] >> j) & 1 ^ 1) << k);
                winner = Some((std::array::from_fn(|k| points[k][j]), on));
            }
        }
        is0 += 8;
    }
    let mut r = Iq3Best { scale, l: [0; 32], is_on_grid: [XXS; 8] };
    if let Some((points, on)) = winner {
        for (k, &p) in points.iter().enumerate() {
            for c in 0..4 {
                r.l[4 * k + c] = ((p >> (3 * c)) & 7) as i8;
            }
            r.is_on_grid[k] = (on >> k) & 1 != 0;
        }
    }
    r
}

/// The eight steps from `is0` on (the last valid step repeated past `nsteps`): how many are valid, and per lane
/// `id = (base + is*inc)/den` and `this_scale = 1/id`, with the reference's operations.
#[inline(always)]
fn steps(is0: i32, nsteps: i32, base: f32, inc: f32, den: f32) -> (usize, [f32; 8], [f32; 8]) {
    let valid = (nsteps - is0 + 1).min(8) as usize;
    let (mut ids, mut scs) = ([0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let is = is0 + j.min(valid - 1) as i32;
        ids[j] = (base + is as f32 * inc) / den;
        scs[j] = 1.0 / ids[j];
    }
    (valid, ids, scs)
}

/// The lanes of `v`.
#[inline(always)]
unsafe fn lanes(v: __m256) -> [f32; 8] {
    let mut out = [0.0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), v);
    out
}

/// One group of `C` magnitudes `x` in every lane: the levels at the lane's `id` (`bits` bits each, at most `hi`)
/// packed into a point, and the point's entry in `map` (a gather). The searches look up every group of a step
/// vector first and [`group_sums`] them after, so that the gathers of all groups are in flight at once.
#[inline(always)]
unsafe fn group_lookup<const C: usize>(id: __m256, map: &[i32], bits: i32, hi: i32, x: &[f32]) -> (__m256i, __m256i) {
    let mut u = _mm256_setzero_si256();
    for (c, &xc) in x.iter().enumerate().take(C) {
        u = _mm256_or_si256(u, _mm256_sllv_epi32(level(id, xc, hi), _mm256_set1_epi32(bits * c as i32)));
    }
    // SAFETY: `u` packs `C` levels in 0..=hi: inside the map (4096 entries for IQ3's 4 x 3 bits; IQ2's 8 x 2 bits
    // with levels up to 2 reach at most 0xAAAA, below its 43692 entries).
    let g = _mm256_i32gather_epi32::<4>(map.as_ptr(), u);
    (u, g)
}

/// A looked-up group ([`group_lookup`]: points `u`, map entries `g`): the lanes off the grid replaced by
/// `snap(g, u)`; then `sums` (`sumqx`, `sumq2`) advanced over the group in element order with `q = 2l + 1`
/// (`wx = weight·x`). Returns the final packed points and the mask of the lanes that were off the grid.
#[inline(always)]
unsafe fn group_sums<const C: usize>(
    (mut u, g): (__m256i, __m256i),
    bits: i32,
    wx: &[f32],
    weight: &[f32],
    sums: &mut (__m256, __m256),
    snap: impl FnOnce(__m256i, __m256i) -> __m256i,
) -> (__m256i, u32) {
    let offgrid = _mm256_movemask_ps(_mm256_castsi256_ps(g)) as u32;
    if offgrid != 0 {
        u = snap(g, u);
    }
    for c in 0..C {
        let q = odd(u, bits * c as i32, (1 << bits) - 1);
        sums.0 = _mm256_add_ps(sums.0, _mm256_mul_ps(_mm256_set1_ps(wx[c]), q));
        sums.1 = _mm256_add_ps(sums.1, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(weight[c]), q), q));
    }
    (u, offgrid)
}

/// The level `MAX(0, MIN(hi, nearest_int(0.5f*(id*x - 1))))` of the magnitude `x` in every lane (inverse scale
/// `id` per lane), with `nearest_int`'s bit trick (`val + 12582912.f`, low 23 bits, `- 0x400000`).
#[inline(always)]
unsafe fn level(id: __m256, x: f32, hi: i32) -> __m256i {
    let f =
        _mm256_mul_ps(_mm256_set1_ps(0.5), _mm256_sub_ps(_mm256_mul_ps(id, _mm256_set1_ps(x)), _mm256_set1_ps(1.0)));
    let bits = _mm256_castps_si256(_mm256_add_ps(f, _mm256_set1_ps(12582912.0)));
    let l = _mm256_sub_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)), _mm256_set1_epi32(0x0040_0000));
    _mm256_max_epi32(_mm256_min_epi32(l, _mm256_set1_epi32(hi)), _mm256_setzero_si256())
}

/// The odd magnitude `2l + 1` (as f32) of the level `l = (u >> shift) & mask` in every lane.
#[inline(always)]
unsafe fn odd(u: __m256i, shift: i32, mask: i32) -> __m256 {
    let l = _mm256_and_si256(_mm256_srlv_epi32(u, _mm256_set1_epi32(shift)), _mm256_set1_epi32(mask));
    _mm256_permutevar8x32_ps(_mm256_setr_ps(1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0), l)
}

/// The lanes off the grid (map entry `g < 0`), the offset of each one's list in `nbr` (`-(offset + 1)` → `!g`; 0
/// elsewhere) and its length (0 elsewhere).
#[inline(always)]
unsafe fn list_heads(nbr: &[u16], g: __m256i) -> (__m256i, __m256i, __m256i) {
    let m = _mm256_cmpgt_epi32(_mm256_setzero_si256(), g);
    let start = _mm256_and_si256(_mm256_xor_si256(g, _mm256_set1_epi32(-1)), m);
    // SAFETY: every offset a negative map entry encodes is a list header of `nbr`, which is followed by at least
    // one more entry (a list, or the final padding); masked-off lanes read nothing.
    let n = _mm256_mask_i32gather_epi32::<2>(_mm256_setzero_si256(), nbr.as_ptr().cast(), start, m);
    (m, start, _mm256_and_si256(n, _mm256_set1_epi32(0xffff)))
}

/// The neighbour search of the C (`iq3_find_best_neighbour`, `iq2_find_best_neighbour`) in the lanes of `m`, each
/// over its own list of `n` points from `nbr[start + 1]` on, at the lane's scale `sc`, for `C` coordinates of
/// `bits` bits: `Σ_i w_i·(sc·q_i - x_i)²` from `0.0` in coordinate order, the first strict least kept. Returns `u`
/// with the lanes of `m` replaced by their best neighbour's packed levels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lanes_snap<const C: usize>(
    nbr: &[u16],
    m: __m256i,
    start: __m256i,
    n: __m256i,
    u: __m256i,
    sc: __m256,
    x: &[f32],
    w: &[f32],
    bits: i32,
    mask: i32,
) -> __m256i {
    let zero = _mm256_setzero_si256();
    let mut counts = [0i32; 8];
    _mm256_storeu_si256(counts.as_mut_ptr().cast(), _mm256_and_si256(n, m));
    let longest = counts.iter().copied().max().unwrap_or(0);
    let mut best_d2 = _mm256_set1_ps(f32::MAX);
    let mut best = _mm256_set1_epi32(-1);
    let lo16 = _mm256_set1_epi32(0xffff);
    let mut at = _mm256_add_epi32(start, _mm256_set1_epi32(1));
    let mut j = 0;
    while j < longest {
        // Points j and j + 1 of each live lane's list in one gather (low and high 16 bits).
        let live = _mm256_and_si256(m, _mm256_cmpgt_epi32(n, _mm256_set1_epi32(j)));
        // SAFETY: `at` = offset + 1 + j < offset + 1 + n in the live lanes: entry j of the lane's list, followed
        // by another entry of `nbr` (the list's next point, the next list's header, or the final padding).
        let pair = _mm256_mask_i32gather_epi32::<2>(zero, nbr.as_ptr().cast(), at, live);
        for half in 0..2 {
            let live = match half {
                0 => live,
                _ => _mm256_and_si256(m, _mm256_cmpgt_epi32(n, _mm256_set1_epi32(j + 1))),
            };
            let p = match half {
                0 => _mm256_and_si256(pair, lo16),
                _ => _mm256_srli_epi32::<16>(pair),
            };
            let mut d2 = _mm256_setzero_ps();
            for c in 0..C {
                let q = odd(p, bits * c as i32, mask);
                let diff = _mm256_sub_ps(_mm256_mul_ps(sc, q), _mm256_set1_ps(x[c]));
                d2 = _mm256_add_ps(d2, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(w[c]), diff), diff));
            }
            let better = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(d2, best_d2)), live);
            best_d2 = _mm256_blendv_ps(best_d2, d2, _mm256_castsi256_ps(better));
            best = _mm256_blendv_epi8(best, p, better);
        }
        at = _mm256_add_epi32(at, _mm256_set1_epi32(2));
        j += 2;
    }
    let none = _mm256_and_si256(m, _mm256_cmpeq_epi32(best, _mm256_set1_epi32(-1)));
    if _mm256_movemask_ps(_mm256_castsi256_ps(none)) != 0 {
        // SAFETY: as above; the first entry of every list.
        let first = _mm256_add_epi32(start, _mm256_set1_epi32(1));
        let p = _mm256_mask_i32gather_epi32::<2>(zero, nbr.as_ptr().cast(), first, none);
        best = _mm256_blendv_epi8(best, _mm256_and_si256(p, lo16), none);
    }
    _mm256_blendv_epi8(u, best, m)
}

/// IQ2 neighbour lists longer than this are searched lane by lane with the vector search over the list: there
/// one vector holds eight of the list's points, here one point of each of eight lists. Measured (qbench, IQ2_XXS
/// and IQ2_XS): flat from 8 to 32, 5–10 % slower at 48, and IQ2_XS 1.7x slower with no limit.
pub(crate) const IQ2_LANE_MAX: i32 = 24;

/// [`packed_lists16`] of an [`Iq2Maps`]: levels `u = Σ l_i << 2i` (16 bits).
fn iq2_neighbour_points(maps: &Iq2Maps) -> &'static [u16] {
    static P: [OnceLock<Vec<u16>>; 4] = [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let build = || {
        packed_lists16(&maps.neighbours, |k| {
            let pg = maps.grid[k].to_le_bytes();
            pg.iter().enumerate().fold(0u16, |u, (i, &b)| u | ((((b as i8 as i32) - 1) / 2) as u16) << (2 * i))
        })
    };
    P[crate::iq_lanes::grid_slot(maps)].get_or_init(build)
}

/// [`sling_quantizers::iq2::step_search`] on AVX2 (module doc), `G` groups of 8.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn iq2_step_search<const G: usize>(
    maps: &Iq2Maps,
    nsteps: i32,
    den: f32,
    xval: &[f32],
    weight: &[f32],
    waux: &[f32],
) -> Option<Iq2Step<G>> {
    let nbr = iq2_neighbour_points(maps);
    let mut wx = [0.0f32; 32];
    for i in 0..8 * G {
        wx[i] = weight[i] * xval[i];
    }
    let mut best = 0.0f32;
    let mut win = None;
    let mut is0 = -nsteps;
    while is0 <= nsteps {
        // `(2*kMaxQ - 1 + is*0.1)/den`, kMaxQ = 3.
        let (valid, ids, scs) = steps(is0, nsteps, 5.0, 0.1, den);
        let (id, sc) = (_mm256_loadu_ps(ids.as_ptr()), _mm256_loadu_ps(scs.as_ptr()));
        let mut sums = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut points = [[0i32; 8]; G];
        let mut off = [0u32; G];
        let zero = _mm256_setzero_si256();
        let mut looked = [(zero, zero); G];
        for (k, l) in looked.iter_mut().enumerate() {
            *l = group_lookup::<8>(id, &maps.map, 2, 2, &xval[8 * k..8 * k + 8]);
        }
        for k in 0..G {
            let r = 8 * k..8 * k + 8;
            let (u, offgrid) = group_sums::<8>(looked[k], 2, &wx[r.clone()], &weight[r.clone()], &mut sums, |g, u| {
                iq2_snap(maps, nbr, g, u, &scs, sc, &xval[r.clone()], &waux[r.clone()])
            });
            off[k] = offgrid;
            _mm256_storeu_si256(points[k].as_mut_ptr().cast(), u);
        }
        let (qx, q2) = (lanes(sums.0), lanes(sums.1));
        for j in 0..valid {
            if q2[j] > 0.0 && qx[j] * qx[j] > best * q2[j] {
                let scale = qx[j] / q2[j];
                best = scale * qx[j];
                let l = std::array::from_fn(|k| std::array::from_fn(|c| ((points[k][j] >> (2 * c)) & 3) as i8));
                let on_grid = std::array::from_fn(|k| (off[k] >> j) & 1 == 0);
                win = Some(Iq2Step { scale, l, on_grid });
            }
        }
        is0 += 8;
    }
    win
}

/// `iq2_find_best_neighbour` in every lane whose map entry `g` is negative, at the lane's scale: returns `u` with
/// those lanes replaced by their best neighbour's packed levels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn iq2_snap(
    maps: &Iq2Maps,
    nbr: &[u16],
    g: __m256i,
    u: __m256i,
    scs: &[f32; 8],
    sc: __m256,
    x: &[f32],
    w: &[f32],
) -> __m256i {
    let (m, start, n) = list_heads(nbr, g);
    let long = _mm256_and_si256(m, _mm256_cmpgt_epi32(n, _mm256_set1_epi32(IQ2_LANE_MAX)));
    let short = _mm256_andnot_si256(long, m);
    let mut u = lanes_snap::<8>(nbr, short, start, n, u, sc, x, w, 2, 3);
    let long = _mm256_movemask_ps(_mm256_castsi256_ps(long)) as u32;
    if long != 0 {
        let mut us = [0i32; 8];
        _mm256_storeu_si256(us.as_mut_ptr().cast(), u);
        for (j, uj) in us.iter_mut().enumerate() {
            if (long >> j) & 1 != 0 {
                let mut l = [0i8; 8];
                <Avx2Iq as IqSearch>::neighbour_iq2(maps, *uj as usize, x, w, scs[j], &mut l);
                *uj = l.iter().enumerate().fold(0i32, |a, (i, &li)| a | (li as i32) << (2 * i));
            }
        }
        u = _mm256_loadu_si256(us.as_ptr().cast());
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sling_quantizers::iq3::{iq3_data, scale_search as reference};

    fn avx2() -> bool {
        let yes = is_x86_feature_detected!("avx2");
        if !yes {
            eprintln!("no AVX2 on this CPU: the IQ3 lane search is not tested here");
        }
        yes
    }

    /// A sub-block's search inputs as the encoders make them (no imatrix: weights `x²`), the weights times `wmul`
    /// where given (any weights are valid search inputs).
    fn inputs(xb: &[f32], wmul: Option<&[f32]>) -> ([f32; 32], [f32; 32], [f32; 32], f32) {
        let mut xval = [0.0f32; 32];
        let mut weight = [0.0f32; 32];
        let mut waux = [0.0f32; 32];
        for i in 0..32 {
            xval[i] = xb[i].abs();
            weight[i] = xb[i] * xb[i] * wmul.map_or(1.0, |w| w[i]);
            waux[i] = weight[i].sqrt();
        }
        let max = xval.iter().copied().fold(xval[0], |a, b| if a > b { a } else { b });
        (xval, weight, waux, max)
    }

    fn check(xb: &[f32], wmul: Option<&[f32]>) {
        let (xval, weight, waux, max) = inputs(xb, wmul);
        for grid in [256, 512] {
            let data = iq3_data(grid);
            let (want, got) = if grid == 256 {
                // SAFETY: AVX2 checked by the caller.
                (reference::<true>(data, &xval, &weight, &waux, max), unsafe {
                    scale_search::<true>(data, &xval, &weight, &waux, max)
                })
            } else {
                (reference::<false>(data, &xval, &weight, &waux, max), unsafe {
                    scale_search::<false>(data, &xval, &weight, &waux, max)
                })
            };
            assert_eq!(want.scale.to_bits(), got.scale.to_bits(), "grid {grid}: {xb:?}");
            assert_eq!(want.l, got.l, "grid {grid}");
            assert_eq!(want.is_on_grid, got.is_on_grid, "grid {grid}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn step_searches_equal_the_reference(
            xb in proptest::collection::vec(prop_oneof![
                8 => -2.0f32..2.0,
                1 => Just(0.0f32),
                1 => -1e-3f32..1e-3,
                1 => prop::num::f32::ANY,
            ], 32),
            qw in proptest::collection::vec(prop_oneof![4 => 0.0f32..4.0, 1 => Just(0.0f32), 1 => prop::num::f32::ANY], 32),
            weighted in any::<bool>(),
        ) {
            if avx2() {
                check(&xb, weighted.then_some(&qw[..]));
                check_iq2(&xb, weighted.then_some(&qw[..]));
            }
        }
    }

    fn check_iq2(xb: &[f32], wmul: Option<&[f32]>) {
        use sling_core::DType;
        use sling_quantizers::iq2::step_search;
        use sling_quantizers::iqgrid::iq2_maps;
        use sling_quantizers::iqsearch::Reference;
        let (xval, weight, waux, max) = inputs(xb, wmul);
        let max16 = xval[..16].iter().copied().fold(xval[0], |a, b| if a > b { a } else { b });
        for t in [DType::IQ2XXS, DType::IQ2XS, DType::IQ2S] {
            let maps = iq2_maps(t);
            if t == DType::IQ2XXS {
                let want = step_search::<Reference, 4>(maps, 6, max, &xval, &weight, &waux);
                // SAFETY: AVX2 checked by the caller.
                let got = unsafe { iq2_step_search::<4>(maps, 6, max, &xval, &weight, &waux) };
                assert_eq!(
                    want.map(|w| (w.scale.to_bits(), w.l, w.on_grid)),
                    got.map(|w| (w.scale.to_bits(), w.l, w.on_grid)),
                    "{t}: {xb:?}"
                );
            } else {
                let want = step_search::<Reference, 2>(maps, 9, max16, &xval[..16], &weight[..16], &waux[..16]);
                // SAFETY: AVX2 checked by the caller.
                let got = unsafe { iq2_step_search::<2>(maps, 9, max16, &xval[..16], &weight[..16], &waux[..16]) };
                assert_eq!(
                    want.map(|w| (w.scale.to_bits(), w.l, w.on_grid)),
                    got.map(|w| (w.scale.to_bits(), w.l, w.on_grid)),
                    "{t}: {xb:?}"
                );
            }
        }
    }

    #[test]
    fn hostile_sub_blocks_equal_the_reference() {
        if !avx2() {
            return;
        }
        let mut cases: Vec<Vec<f32>> = vec![
            vec![0.0; 32],
            vec![1.0; 32],
            vec![-1.0; 32],
            (0..32).map(|i| if i == 7 { 100.0 } else { 0.01 }).collect(),
            (0..32).map(|i| f32::from_bits(1 + i as u32)).collect(),
            (0..32).map(|i| (i % 4) as f32).collect(),
            (0..32).map(|i| 1e19 * (i as f32 - 16.0)).collect(),
            (0..32).map(|i| if i == 3 { f32::NAN } else { i as f32 }).collect(),
            (0..32).map(|i| if i == 3 { f32::INFINITY } else { i as f32 }).collect(),
            vec![f32::MAX; 32],
        ];
        let mut s = 0x1234_5678u32;
        for _ in 0..200 {
            cases.push(
                (0..32)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 17;
                        s ^= s << 5;
                        (s as f32 / u32::MAX as f32 - 0.5) * 0.1
                    })
                    .collect(),
            );
        }
        for c in &cases {
            check(c, None);
            check_iq2(c, None);
        }
    }
}
