//! The i-quant encoders IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S with their hot spots on AVX2:
//! the very encoders of the scalar reference ([`sling_quantizers::iq1`], [`sling_quantizers::iq2`],
//! [`sling_quantizers::iq3`], ports of ggml-quants.c),
//! instantiated with [`Avx2Iq`] in place of [`Reference`](sling_quantizers::iqsearch::Reference). Every replacement
//! returns exactly what the reference returns, for every input (tested against it below and on hostile rows in
//! `lib.rs`; the reference against ggml itself in `quantizers/tests/bitexact_iq*.rs`):
//!
//! - **the sort** (IQ1): glibc's merge sort with a comparator on the value is a stable sort in which `-0.0 == 0.0`;
//!   for a block without NaN (the only values on which comparisons are not a total preorder) sorting the keys
//!   `(value in integer order, index)` gives the same permutation. Blocks with a NaN use the reference's copy of
//!   glibc's algorithm.
//! - **the partition search** (IQ1, `quantize_row_iq1_*_impl`'s double loop over `i1 <= i2`): eight `i2` per
//!   vector. Each lane computes its candidate's sums with the reference's operations in its order (no FMA), so the
//!   values are the reference's. The loop keeps a running best: a candidate replaces it when
//!   `sumqx² > best·sumq2`, `best = (sumqx/sumq2)·sumqx`. Each comparison is off by a few ulp from the exact one on
//!   the same sums, so when one candidate's score `sumqx²/sumq2` exceeds every other's by a relative margin far
//!   above that ([`Top2`], 1e-5), it wins the first comparison it meets and every later candidate loses to it: it
//!   is the loop's answer. One pass keeps, per lane, the best and second best score; the winner's sums are then
//!   computed again as the reference does. Blocks where that cannot be told (a tie or near tie, no positive score,
//!   magnitudes where an f32 product could underflow or overflow) run the replay: a vector first tests its lanes
//!   against the best score so far; the first lane that passes runs the scalar rule on those same values (updating
//!   the best score), then the lanes after it are tested again against the best score as it is now, and so on. A
//!   lane that fails the test against the current best score fails it in the scalar loop too (the best score has
//!   not changed before it).
//! - **the neighbour search** (`iq1_find_best_neighbour2`, `iq2_find_best_neighbour`): the distance of a grid
//!   point is a sum of eight terms, each one of at most four values per coordinate (`w·(scale·q - x)²` for the
//!   levels `q`); they are computed once per search, then eight neighbours per vector look theirs up
//!   (`vpermps`) and add them from `0.0` in coordinate order, so each candidate's score is the reference's. Each
//!   lane keeps its first strict minimum; the first least among the lanes is the reference's answer. When no
//!   candidate scores below `FLT_MAX` (non-finite sums), and for IQ2 lists too short to gain, the reference runs.
//!
//! IQ3_XXS and IQ3_S replace their whole scale search instead ([`crate::iq_steps`]: eight steps per vector): their
//! neighbour lists are short (mostly 2 to 8 points of 4 coordinates with 8 levels each), and the vector search over
//! one list above measured 0.8x of the reference loop there.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use sling_core::DType;
use sling_quantizers::iq1::{
    find_best_neighbour2, levels, partition_m_consts, partition_m_sums, partition_s_sums, sorted_pairs, Pair,
    IQ1M_BLOCK_SIZE, IQ1S_BLOCK_SIZE, IQ1S_DELTA,
};
use sling_quantizers::iq2::Iq2Step;
use sling_quantizers::iq3::{Iq3Best, Iq3Data};
use sling_quantizers::iqgrid::Iq2Maps;
use sling_quantizers::iqsearch::{IqSearch, Partition};

/// Whether [`rows`] handles `dtype`.
pub(crate) fn handles(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::IQ1S | DType::IQ1M | DType::IQ2XXS | DType::IQ2XS | DType::IQ2S | DType::IQ3XXS | DType::IQ3S
    )
}

/// `quantize_row_iq1_*` over every row of `x` into `y` (`row_bytes` per row), with the [`Avx2Iq`] searches.
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
    for (row, dst) in x.chunks_exact(n_per_row).zip(y.chunks_exact_mut(row_bytes)) {
        match dtype {
            DType::IQ1S => sling_quantizers::iq1::quantize_row_iq1_s_with::<Avx2Iq>(row, imatrix, dst),
            DType::IQ1M => sling_quantizers::iq1::quantize_row_iq1_m_with::<Avx2Iq>(row, imatrix, dst),
            DType::IQ2XXS => sling_quantizers::iq2::quantize_row_iq2_xxs_with::<Avx2Iq>(row, imatrix, dst),
            DType::IQ2XS => sling_quantizers::iq2::quantize_row_iq2_xs_with::<Avx2Iq>(row, imatrix, dst),
            DType::IQ2S => sling_quantizers::iq2::quantize_row_iq2_s_with::<Avx2Iq>(row, imatrix, dst),
            DType::IQ3XXS => sling_quantizers::iq3::quantize_row_iq3_xxs_with::<Avx2Iq>(row, imatrix, dst),
            DType::IQ3S => sling_quantizers::iq3::quantize_row_iq3_s_with::<Avx2Iq>(row, imatrix, dst),
            _ => unreachable!("iq_lanes::rows called for {dtype}"),
        }
    }
}

/// IQ2 neighbour lists shorter than this run the reference's loop: below it, computing the terms of every level
/// costs more than the vector saves (measured with the `iq_ab` timing below).
const VECTOR_MIN_IQ2: usize = 8;

/// The AVX2 searches. Only used by [`rows`] (and the tests), which run after the AVX2 check: that is the safety
/// argument of the `unsafe` calls in the methods.
pub(crate) struct Avx2Iq;

impl IqSearch for Avx2Iq {
    #[inline(always)]
    fn sort<const N: usize>(xb: &[f32; N]) -> [Pair; N] {
        sort_by_keys(xb)
    }

    #[inline(always)]
    fn partition_s(sumx: &[f32; IQ1S_BLOCK_SIZE + 1], sumw: &[f32; IQ1S_BLOCK_SIZE + 1], max: f32) -> Partition {
        // SAFETY: `Avx2Iq` runs only where AVX2 is present (type doc).
        unsafe { partition_s_avx2(sumx, sumw, max) }
    }

    #[inline(always)]
    fn partition_m(px: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], pw: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], max: f32) -> Partition {
        // SAFETY: `Avx2Iq` runs only where AVX2 is present (type doc).
        unsafe { partition_m_avx2(px, pw, max) }
    }

    #[inline(always)]
    fn neighbour_iq1(
        maps: &Iq2Maps,
        nb: &[u16],
        xval: &[f32],
        weight: &[f32],
        scale: f32,
        xg: &[f32; 3],
        l_out: &mut [i8],
    ) -> usize {
        let t = terms::<8, 4>(xval, weight, scale, |l| xg[l.min(2)]);
        // SAFETY: `Avx2Iq` runs only where AVX2 is present (type doc).
        match unsafe { argmin(maps, &nb[1..=nb[0] as usize], &t) } {
            Some(k) => {
                set_levels_u64(maps.grid[k], l_out);
                k
            }
            None => find_best_neighbour2(maps, nb, xval, weight, scale, xg, l_out),
        }
    }

    #[inline(always)]
    fn neighbour_iq2(maps: &Iq2Maps, u: usize, xval: &[f32], weight: &[f32], scale: f32, l: &mut [i8]) -> usize {
        let found = match maps.map.get(u) {
            Some(&m) if m < 0 && maps.neighbours[(-m - 1) as usize] as usize >= VECTOR_MIN_IQ2 => {
                // q = pg[i], the grid byte 2*level + 1.
                let t = terms::<8, 4>(xval, weight, scale, |l| (2 * l + 1) as f32);
                // SAFETY: as in `neighbour_iq1`.
                unsafe { argmin(maps, maps.neighbours_of(u), &t) }
            }
            _ => None,
        };
        match found {
            Some(k) => {
                set_levels_u64(maps.grid[k], l);
                k
            }
            None => sling_quantizers::iq2::find_best_neighbour(maps, u, xval, weight, scale, l),
        }
    }
    #[inline(always)]
    fn steps_iq2<const G: usize>(
        maps: &Iq2Maps,
        nsteps: i32,
        den: f32,
        xval: &[f32],
        weight: &[f32],
        waux: &[f32],
    ) -> Option<Iq2Step<G>> {
        // IQ2_XS (the 512-point grid) keeps the loop over steps, with the vector search per list: its lists are
        // long (11.8 points on average) and eight steps per vector measured 3 % slower there.
        if maps.grid.len() == 512 {
            return sling_quantizers::iq2::step_search::<Self, G>(maps, nsteps, den, xval, weight, waux);
        }
        // SAFETY: `Avx2Iq` only runs after the AVX2 check (its doc).
        unsafe { crate::iq_steps::iq2_step_search::<G>(maps, nsteps, den, xval, weight, waux) }
    }
    #[inline(always)]
    fn scale_search_iq3<const XXS: bool>(
        data: &Iq3Data,
        xval: &[f32; 32],
        weight: &[f32; 32],
        waux: &[f32; 32],
        max: f32,
    ) -> Iq3Best {
        // SAFETY: `Avx2Iq` only runs after the AVX2 check (its doc).
        unsafe { crate::iq_steps::scale_search::<XXS>(data, xval, weight, waux, max) }
    }
}

/// The permutation of glibc's merge sort (see the module doc) through an unstable sort of unique integer keys.
#[inline(always)]
fn sort_by_keys<const N: usize>(xb: &[f32; N]) -> [Pair; N] {
    if xb.iter().any(|v| v.is_nan()) {
        return sorted_pairs(xb);
    }
    // -0.0 and 0.0 compare equal: one key. Negative values: all bits flipped; others: the sign bit set. The key
    // of value order, then the index, orders the block as the merge sort does.
    let order = |v: f32| {
        let b = if v == 0.0 { 0 } else { v.to_bits() };
        if b >> 31 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    };
    if N % 8 == 0 && N <= 32 {
        let mut keys = [0i32; 32];
        for (k, &v) in keys.iter_mut().zip(xb) {
            // Signed, for the signed compares of `ranks`.
            *k = (order(v) ^ 0x8000_0000) as i32;
        }
        // SAFETY: `Avx2Iq` runs only where AVX2 is present (type doc); N is a multiple of 8 up to 32.
        let rank = unsafe { ranks::<N>(&keys) };
        let mut pairs = [Pair::default(); N];
        for (i, &r) in rank.iter().enumerate() {
            pairs[r as usize % N] = Pair { v: xb[i], i: i as u8 };
        }
        return pairs;
    }
    let mut keys = [0u64; N];
    for (j, (k, &v)) in keys.iter_mut().zip(xb).enumerate() {
        *k = (order(v) as u64) << 32 | j as u64;
    }
    keys.sort_unstable();
    let mut pairs = [Pair::default(); N];
    for (p, k) in pairs.iter_mut().zip(keys) {
        let i = k as u32 as usize;
        *p = Pair { v: xb[i], i: i as u8 };
    }
    pairs
}

/// Each key's place in the order of (key, index): the number of keys below it plus the number of equal keys
/// before it, counted eight at a time with compares, so without a branch on the data (`N` a multiple of 8, at most
/// 32; `keys[N..]` unused).
#[target_feature(enable = "avx2")]
unsafe fn ranks<const N: usize>(keys: &[i32; 32]) -> [u32; N] {
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let v: [__m256i; 4] = std::array::from_fn(|c| {
        // SAFETY: 8c + 8 <= 32.
        unsafe { _mm256_loadu_si256(keys.as_ptr().add(8 * c).cast()) }
    });
    let mut rank = [0u32; N];
    for (i, r) in rank.iter_mut().enumerate() {
        let k = _mm256_set1_epi32(keys[i]);
        let mut n = 0;
        for (c, vc) in v.iter().enumerate().take(N / 8) {
            // Keys below `keys[i]`, and equal keys at indices below i (lane j of chunk c is index 8c + j).
            let below = _mm256_cmpgt_epi32(k, *vc);
            let earlier = _mm256_cmpgt_epi32(_mm256_set1_epi32(i as i32 - 8 * c as i32), iota);
            let before = _mm256_and_si256(_mm256_cmpeq_epi32(k, *vc), earlier);
            n += (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(below, before))) as u32).count_ones();
        }
        *r = n;
    }
    rank
}

/// The distance terms of a neighbour search, `t[L*i + level] = weight[i] * diff * diff` with `diff = scale *
/// q(level) - xval[i]`: the reference's per-coordinate expression, once per level (`C` coordinates, `L` levels).
#[inline(always)]
fn terms<const C: usize, const L: usize>(
    xval: &[f32],
    weight: &[f32],
    scale: f32,
    q: impl Fn(usize) -> f32,
) -> [f32; 32] {
    let mut t = [0.0f32; 32];
    for i in 0..C {
        for lv in 0..L {
            let diff = scale * q(lv) - xval[i];
            t[L * i + lv] = weight[i] * diff * diff;
        }
    }
    t
}

/// `L[i] = (pg[i] - 1) / 2` for the 8 bytes `2*level + 1` of an IQ2/IQ1 grid point.
#[inline(always)]
fn set_levels_u64(g: u64, l: &mut [i8]) {
    for (i, v) in l.iter_mut().enumerate().take(8) {
        *v = ((g >> (8 * i + 1)) & 0x7f) as i8;
    }
}

/// Lane indices 0..7.
#[inline]
#[target_feature(enable = "avx2")]
fn lane_ids() -> __m256i {
    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
}

/// Keeps, per lane, the first strictly smaller distance and its position (`d2 < best`, false on NaN, as the
/// reference's `if (d2 < best_d2)`); lanes `m..8` hold no neighbour.
#[inline]
#[target_feature(enable = "avx2")]
fn keep_least(d2: __m256, p: usize, m: usize, best: &mut __m256, pos: &mut __m256i) {
    let valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(m as i32), lane_ids()));
    let lt = _mm256_and_ps(valid, _mm256_cmp_ps::<_CMP_LT_OQ>(d2, *best));
    *best = _mm256_blendv_ps(*best, d2, lt);
    *pos = _mm256_blendv_epi8(*pos, _mm256_add_epi32(_mm256_set1_epi32(p as i32), lane_ids()), _mm256_castps_si256(lt));
}

/// The reference's answer from the lanes' own: lane `j` saw positions `j, j+8, ...` in order and kept its first
/// least distance below `f32::MAX`; the first least of those (smallest position among equal distances) is the first
/// least of the whole list.
#[inline]
#[target_feature(enable = "avx2")]
fn first_least(best: __m256, pos: __m256i, nb: &[u16]) -> Option<usize> {
    // Lanes that kept nothing hold `f32::MAX` (every kept distance is below it) and position -1.
    let hmin = |v: __m256| {
        let v = _mm256_min_ps(v, _mm256_permute2f128_ps::<1>(v, v));
        let v = _mm256_min_ps(v, _mm256_shuffle_ps::<0b01_00_11_10>(v, v));
        _mm256_min_ps(v, _mm256_shuffle_ps::<0b10_11_00_01>(v, v))
    };
    let least = hmin(best);
    if _mm256_cvtss_f32(least) == f32::MAX {
        return None;
    }
    // The smallest position among the lanes at the least distance (positions are small non-negative integers,
    // exact as f32).
    let at = _mm256_cmp_ps::<_CMP_EQ_OQ>(best, least);
    let q = hmin(_mm256_blendv_ps(_mm256_set1_ps(f32::MAX), _mm256_cvtepi32_ps(pos), at));
    nb.get(_mm256_cvtss_f32(q) as usize).map(|&k| k as usize)
}

/// Which of the four shared grids of `iq2_maps` (256, 512, 1024 and 2048 points) `maps` is, told apart by its size:
/// the slot of its tables built once per grid.
pub(crate) fn grid_slot(maps: &Iq2Maps) -> usize {
    match maps.grid.len() {
        256 => 0,
        512 => 1,
        1024 => 2,
        _ => 3,
    }
}

/// Per grid point of an IQ2/IQ1 grid, the table positions of its 8 coordinates in 4-bit fields: field `i` is
/// `level_i + 4*(i % 2)`, where coordinate `i`'s term sits in the vector of coordinates `2*(i/2)` and `2*(i/2)+1`
/// (see [`argmin_u64`]). Built once per grid (the grids differ in size: 256, 512, 1024, 2048 points).
fn packed_levels(maps: &Iq2Maps) -> &'static [u32] {
    static PACKED: [OnceLock<Vec<u32>>; 4] = [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = grid_slot(maps);
    PACKED[slot].get_or_init(|| {
        let pack =
            |g: u64| (0..8).fold(0u32, |a, i| a | ((((g >> (8 * i + 1)) & 3) as u32 + 4 * (i as u32 % 2)) << (4 * i)));
        maps.grid.iter().map(|&g| pack(g)).collect()
    })
}

/// [`packed_levels`] of every neighbour list of the grid, laid out as [`Iq2Maps::neighbours`] (each list's count,
/// then its points' packed levels), so that a search loads eight points' levels at once.
fn packed_level_lists(maps: &Iq2Maps) -> &'static [i32] {
    static LISTS: [OnceLock<Vec<i32>>; 4] = [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = grid_slot(maps);
    LISTS[slot].get_or_init(|| {
        let packed = packed_levels(maps);
        crate::iq_steps::packed_lists(&maps.neighbours, |k| packed[k] as i32)
    })
}

/// Where `inner` starts in `outer`, when it is a sub-slice of it.
fn offset_in(outer: &[u16], inner: &[u16]) -> Option<usize> {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    let off = i.checked_sub(o)? / std::mem::size_of::<u16>();
    (off + inner.len() <= outer.len()).then_some(off)
}

/// The grid index of the first neighbour in `nb` (a list of `maps.neighbours`) of least `Σ_i t[4i + level_i]`
/// (added from `0.0` in coordinate order) below `f32::MAX`, eight neighbours per vector: 8 coordinates with up to
/// four levels each (IQ1: levels 0..2, IQ2: 0..3); the levels from [`packed_level_lists`].
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2")]
unsafe fn argmin(maps: &Iq2Maps, nb: &[u16], t: &[f32; 32]) -> Option<usize> {
    let codes = &packed_level_lists(maps)[offset_in(&maps.neighbours, nb)?..][..nb.len()];
    // tv[c]: the terms of coordinates 2c and 2c+1, four levels each.
    let tv: [__m256; 4] = std::array::from_fn(|c| {
        // SAFETY: t has 32 values, 8c + 8 <= 32.
        unsafe { _mm256_loadu_ps(t.as_ptr().add(8 * c)) }
    });
    let (mut best, mut pos) = (_mm256_set1_ps(f32::MAX), _mm256_set1_epi32(-1));
    let mut p = 0;
    while p < nb.len() {
        let m = (nb.len() - p).min(8);
        // Lanes past `m` read nothing and hold 0 (masked off in `keep_least`).
        // SAFETY: p < codes.len(); only the first m <= codes.len() - p lanes are read.
        let w = unsafe { _mm256_maskload_epi32(codes.as_ptr().add(p), _mm256_castps_si256(first_lanes(m))) };
        let mut d2 = _mm256_setzero_ps();
        for i in 0..8 {
            // vpermps reads the low three bits of each index: field i, no mask needed.
            let at = _mm256_srlv_epi32(w, _mm256_set1_epi32(4 * i as i32));
            d2 = _mm256_add_ps(d2, _mm256_permutevar8x32_ps(tv[i / 2], at));
        }
        keep_least(d2, p, m, &mut best, &mut pos);
        p += 8;
    }
    first_least(best, pos, nb)
}

/// The lanes of a vector as an array.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes(v: __m256) -> [f32; 8] {
    // SAFETY: __m256 and [f32; 8] have the same size and every bit pattern is valid for both.
    unsafe { std::mem::transmute::<__m256, [f32; 8]>(v) }
}

/// `sumq2 > 0 && sumqx * sumqx > best * sumq2` per lane (ordered compares: false on NaN, as in C).
#[inline]
#[target_feature(enable = "avx2")]
fn better(qx: __m256, q2: __m256, best: __m256) -> __m256 {
    let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(q2, _mm256_setzero_ps());
    let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(qx, qx), _mm256_mul_ps(best, q2));
    _mm256_and_ps(pos, gt)
}

/// The reference's rule for one candidate: `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale = sumqx/sumq2;
/// best = scale*sumqx; ... }`.
#[inline(always)]
fn update(qx: f32, q2: f32, best: &mut f32, r: &mut Partition, cand: (i32, i32, i32)) {
    if q2 > 0.0 && qx * qx > *best * q2 {
        r.scale = qx / q2;
        *best = r.scale * qx;
        (r.i1, r.i2, r.shift) = cand;
    }
}

/// The best candidate of a partition search without replaying it (module doc, "the partition search"): per lane
/// the largest and second largest score `sumqx²/sumq2` of the candidates with `sumq2 > 0`, the first largest's
/// id, and the least `sumq2`. Used only on blocks whose prefix sums are finite and at most [`TOP2_INPUT_MAX`], so
/// that no sum is NaN or infinite and every `|sumqx|`, `sumq2` stays below 1e16.
struct Top2 {
    t1: __m256,
    t2: __m256,
    id: __m256i,
    min_q2: __m256,
}

/// How far apart (relative) the best and the second best score must be for the best to be the replay's answer:
/// far above the few-ulp rounding of the reference's comparisons (`sumqx*sumqx > best*sumq2`, `best = scale*sumqx`)
/// and of the score itself.
const TOP2_MARGIN: f32 = 1e-5;

/// The largest prefix sum [`Top2`] takes (see there).
const TOP2_INPUT_MAX: f32 = 1e15;

/// Whether every value is finite and at most [`TOP2_INPUT_MAX`] in magnitude.
fn top2_inputs(v: &[f32]) -> bool {
    v.iter().all(|x| x.abs() <= TOP2_INPUT_MAX)
}

impl Top2 {
    #[inline]
    #[target_feature(enable = "avx2")]
    fn new() -> Top2 {
        let m1 = _mm256_set1_ps(-1.0);
        Top2 { t1: m1, t2: m1, id: _mm256_setzero_si256(), min_q2: _mm256_set1_ps(f32::MAX) }
    }

    /// Adds the candidates `(qx, q2)`, with ids `id`. Lanes past the last candidate hold a NaN `q2` (the prefix
    /// sums are padded with NaN): they fail `q2 > 0` and leave the least `q2` alone (`minps` returns its second
    /// operand on NaN). A candidate with `q2 <= 0` is no candidate of the reference's, but lowers the least `q2`
    /// to at most 0, so that [`Top2::winner`] refuses the block (it occurs only when every weight is 0, or by
    /// cancellation in IQ1_M's form of the sums).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn add(&mut self, qx: __m256, q2: __m256, id: __m256i) {
        let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(q2, _mm256_setzero_ps());
        // 1/sumq2 by `rcpps` and one Newton step (relative error about 2^-22, far below the margin).
        let r = _mm256_rcp_ps(q2);
        let r = _mm256_mul_ps(r, _mm256_sub_ps(_mm256_set1_ps(2.0), _mm256_mul_ps(q2, r)));
        let s = _mm256_blendv_ps(_mm256_set1_ps(-1.0), _mm256_mul_ps(_mm256_mul_ps(qx, qx), r), pos);
        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(s, self.t1);
        self.t2 = _mm256_blendv_ps(_mm256_max_ps(self.t2, s), self.t1, gt);
        self.t1 = _mm256_blendv_ps(self.t1, s, gt);
        self.id = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(self.id), _mm256_castsi256_ps(id), gt));
        self.min_q2 = _mm256_min_ps(q2, self.min_q2);
    }

    /// The winner's id when the best score is unique by [`TOP2_MARGIN`] and in the range where f32 products keep
    /// their relative precision (`best·sumq2` neither underflows nor overflows for any candidate); `None`: replay.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn winner(&self) -> Option<i32> {
        let (t1, t2) = (lanes(self.t1), lanes(self.t2));
        let m1 = t1.iter().fold(-1.0f32, |m, &x| m.max(x));
        let l = t1.iter().position(|&x| x == m1)?;
        let m2 = t1.iter().enumerate().filter(|&(j, _)| j != l).fold(t2[l], |m, (_, &x)| m.max(x));
        let min_q2 = lanes(self.min_q2).iter().fold(f32::MAX, |m, &x| m.min(x));
        let ok = m1 > 0.0 && m1 <= 1e20 && m2 < m1 * (1.0 - TOP2_MARGIN) && m1 * min_q2 >= 1e-30;
        // SAFETY: __m256i and [i32; 8] have the same size and every bit pattern is valid for both.
        ok.then(|| unsafe { std::mem::transmute::<__m256i, [i32; 8]>(self.id) }[l])
    }
}

/// The lanes `0..n` of a vector, as a compare mask.
#[inline]
#[target_feature(enable = "avx2")]
fn first_lanes(n: usize) -> __m256 {
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), iota))
}

/// Candidate ids of a vector: `(i1 << 8) | ((i2 + lane) << 2) | k`.
#[inline]
#[target_feature(enable = "avx2")]
fn ids(i1: usize, i2: usize, k: usize) -> __m256i {
    let iota4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    _mm256_add_epi32(_mm256_set1_epi32(((i1 << 8) | (i2 << 2) | k) as i32), iota4)
}

/// IQ1_S's candidates eight `i2` per vector, in the reference's loop order: `f(i1, i2, sumqx, sumq2)` for the
/// candidates `(i1, i2..i2 + 8)`, `[0]` with the `x_p` levels and `[1]` with the `x_m` ones. The sums are the
/// reference's (`partition_s_sums`: `a*x[0] + b*x[1] + c*x[2]` and `aw*x[0]*x[0] + bw*x[1]*x[1] + cw*x[2]*x[2]`, left
/// to right, no FMA), the lanes past BS computed from `pad`.
#[inline(always)]
unsafe fn each_s(
    sumx: &[f32; IQ1S_BLOCK_SIZE + 1],
    sumw: &[f32; IQ1S_BLOCK_SIZE + 1],
    pad: f32,
    mut f: impl FnMut(usize, usize, [__m256; 2], [__m256; 2]),
) {
    const BS: usize = IQ1S_BLOCK_SIZE;
    let (x_p, x_m) = levels(IQ1S_DELTA);
    let mut sx = [pad; BS + 8];
    let mut sw = [pad; BS + 8];
    sx[..=BS].copy_from_slice(sumx);
    sw[..=BS].copy_from_slice(sumw);
    let set = _mm256_set1_ps;
    let (p1, p2, m1, m2) = (set(x_p[1]), set(x_p[2]), set(x_m[1]), set(x_m[2]));
    let (sx_end, sw_end) = (set(sx[BS]), set(sw[BS]));
    for i1 in 0..=BS {
        let (a, aw) = (sx[i1] - sx[0], sw[i1] - sw[0]);
        // The first terms: `a * x[0]` and `aw * x[0] * x[0]`, the same for every i2.
        let (ap, am) = (set(a * x_p[0]), set(a * x_m[0]));
        let (awp, awm) = (set(aw * x_p[0] * x_p[0]), set(aw * x_m[0] * x_m[0]));
        let (sx1, sw1) = (set(sx[i1]), set(sw[i1]));
        let mut i2 = i1;
        while i2 <= BS {
            // SAFETY: i2 <= BS, so i2 + 8 <= BS + 8 = the arrays' length.
            let (x2, w2) = unsafe { (_mm256_loadu_ps(sx.as_ptr().add(i2)), _mm256_loadu_ps(sw.as_ptr().add(i2))) };
            let (b, c) = (_mm256_sub_ps(x2, sx1), _mm256_sub_ps(sx_end, x2));
            let (bw, cw) = (_mm256_sub_ps(w2, sw1), _mm256_sub_ps(sw_end, w2));
            let qxp = _mm256_add_ps(_mm256_add_ps(ap, _mm256_mul_ps(b, p1)), _mm256_mul_ps(c, p2));
            let q2p = _mm256_add_ps(
                _mm256_add_ps(awp, _mm256_mul_ps(_mm256_mul_ps(bw, p1), p1)),
                _mm256_mul_ps(_mm256_mul_ps(cw, p2), p2),
            );
            let qxm = _mm256_add_ps(_mm256_add_ps(am, _mm256_mul_ps(b, m1)), _mm256_mul_ps(c, m2));
            let q2m = _mm256_add_ps(
                _mm256_add_ps(awm, _mm256_mul_ps(_mm256_mul_ps(bw, m1), m1)),
                _mm256_mul_ps(_mm256_mul_ps(cw, m2), m2),
            );
            f(i1, i2, [qxp, qxm], [q2p, q2m]);
            i2 += 8;
        }
    }
}

/// IQ1_M's candidates eight `i2` per vector, in the reference's loop order: `f(i1, i2, sumqx, sumq2)` for the
/// candidates `(i1, i2..i2 + 8)` and the four sign combinations `k` (`partition_m_sums`: its sums, with its
/// operations in its order), the lanes past BS computed from `pad`.
#[inline(always)]
unsafe fn each_m(
    px: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2],
    pw: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2],
    pad: f32,
    mut f: impl FnMut(usize, usize, [__m256; 4], [__m256; 4]),
) {
    const BS: usize = IQ1M_BLOCK_SIZE;
    let mut sx = [[pad; BS + 8]; 2];
    let mut sw = [[pad; BS + 8]; 2];
    for h in 0..2 {
        sx[h][..=BS].copy_from_slice(&px[h]);
        sw[h][..=BS].copy_from_slice(&pw[h]);
    }
    let txs = [px[0][BS], px[1][BS]];
    let tws = [pw[0][BS], pw[1][BS]];
    let [p2, m2, cp1, cp2, cm1, cm2] = partition_m_consts();
    let set = _mm256_set1_ps;
    for i1 in 0..=BS {
        let mut i2 = i1;
        while i2 <= BS {
            let (mut qx_p, mut qx_m, mut q2_p, mut q2_m) = ([set(0.0); 2], [set(0.0); 2], [set(0.0); 2], [set(0.0); 2]);
            for h in 0..2 {
                // SAFETY: i2 <= BS, so i2 + 8 <= BS + 8 = the rows' length.
                let (x2, w2) =
                    unsafe { (_mm256_loadu_ps(sx[h].as_ptr().add(i2)), _mm256_loadu_ps(sw[h].as_ptr().add(i2))) };
                // sx = px[i1] + px[i2]; qx = txs*x[2] - sx; q2 = tws*x[2]*x[2] + pw[i1]*c1 + pw[i2]*c2.
                let s = _mm256_add_ps(set(sx[h][i1]), x2);
                qx_p[h] = _mm256_sub_ps(set(txs[h] * p2), s);
                qx_m[h] = _mm256_sub_ps(set(txs[h] * m2), s);
                q2_p[h] = _mm256_add_ps(set(tws[h] * p2 * p2 + sw[h][i1] * cp1), _mm256_mul_ps(w2, set(cp2)));
                q2_m[h] = _mm256_add_ps(set(tws[h] * m2 * m2 + sw[h][i1] * cm1), _mm256_mul_ps(w2, set(cm2)));
            }
            let add = |a: __m256, b: __m256| _mm256_add_ps(a, b);
            let sumqx = [add(qx_p[0], qx_p[1]), add(qx_p[0], qx_m[1]), add(qx_m[0], qx_p[1]), add(qx_m[0], qx_m[1])];
            let sumq2 = [add(q2_p[0], q2_p[1]), add(q2_p[0], q2_m[1]), add(q2_m[0], q2_p[1]), add(q2_m[0], q2_m[1])];
            f(i1, i2, sumqx, sumq2);
            i2 += 8;
        }
    }
}

/// The running-best replay (module doc) of `K` candidate sums per vector: tests the lanes `0..n` against the best
/// score so far; the first lane that passes runs the reference's rule on its `K` candidates in order, then the lanes
/// after it are tested again against the best score as it is now, and so on. `cand(lane, k)`: the candidate's
/// `(i1, i2, shift)`.
#[inline]
#[target_feature(enable = "avx2")]
fn replay<const K: usize>(
    sumqx: [__m256; K],
    sumq2: [__m256; K],
    n: usize,
    best: &mut f32,
    r: &mut Partition,
    cand: impl Fn(usize, usize) -> (i32, i32, i32),
) {
    let hits = |best: f32| {
        let vb = _mm256_set1_ps(best);
        let hit = (0..K).fold(_mm256_setzero_ps(), |h, k| _mm256_or_ps(h, better(sumqx[k], sumq2[k], vb)));
        _mm256_movemask_ps(hit) as u32 & ((1u32 << n) - 1)
    };
    let mut mask = hits(*best);
    if mask != 0 {
        let qx = sumqx.map(|v| lanes(v));
        let q2 = sumq2.map(|v| lanes(v));
        while mask != 0 {
            let l = mask.trailing_zeros() as usize;
            for k in 0..K {
                update(qx[k][l], q2[k][l], best, r, cand(l, k));
            }
            // The lanes after `l` against the best score as it is now.
            mask = hits(*best) & !((2u32 << l) - 1);
        }
    }
}

/// [`sling_quantizers::iq1::partition_s`]: the best candidate by [`Top2`], or the replay when it cannot tell.
#[inline(never)]
#[target_feature(enable = "avx2")]
fn partition_s_avx2(sumx: &[f32; IQ1S_BLOCK_SIZE + 1], sumw: &[f32; IQ1S_BLOCK_SIZE + 1], max: f32) -> Partition {
    if !top2_inputs(sumx) || !top2_inputs(sumw) {
        return partition_s_replay(sumx, sumw, max);
    }
    let mut top = Top2::new();
    // SAFETY: AVX2 (this function's feature). NaN padding: the lanes past BS hold no candidate (`Top2::add`).
    unsafe {
        each_s(sumx, sumw, f32::NAN, |i1, i2, qx, q2| {
            top.add(qx[0], q2[0], ids(i1, i2, 0));
            top.add(qx[1], q2[1], ids(i1, i2, 1));
        })
    };
    let Some(id) = top.winner() else { return partition_s_replay(sumx, sumw, max) };
    // The winner's sums again, as the reference computes them (the lanes' values).
    let (i1, i2, k) = ((id >> 8) as usize, ((id >> 2) & 63) as usize, (id & 3) as usize);
    let (sumqx, sumq2) = partition_s_sums(sumx, sumw, i1, i2)[k];
    let shift = if k == 0 { 1 } else { -1 };
    Partition { i1: i1 as i32, i2: i2 as i32, shift, scale: sumqx / sumq2 }
}

/// [`sling_quantizers::iq1::partition_s`] with eight `i2` per vector, the running best replayed in order (module
/// doc).
#[inline(never)]
#[target_feature(enable = "avx2")]
fn partition_s_replay(sumx: &[f32; IQ1S_BLOCK_SIZE + 1], sumw: &[f32; IQ1S_BLOCK_SIZE + 1], max: f32) -> Partition {
    const BS: usize = IQ1S_BLOCK_SIZE;
    let mut best = -f32::MAX;
    let mut r = Partition { i1: -1, i2: -1, shift: 0, scale: max };
    // SAFETY: AVX2 (this function's feature); the lanes past BS are masked off.
    unsafe {
        each_s(sumx, sumw, 0.0, |i1, i2, qx, q2| {
            let n = (BS + 1 - i2).min(8);
            replay(qx, q2, n, &mut best, &mut r, |l, k| (i1 as i32, (i2 + l) as i32, if k == 0 { 1 } else { -1 }));
        })
    };
    r
}

/// [`sling_quantizers::iq1::partition_m`]: the best candidate by [`Top2`], or the replay when it cannot tell.
#[inline(never)]
#[target_feature(enable = "avx2")]
fn partition_m_avx2(px: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], pw: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], max: f32) -> Partition {
    if !px.iter().chain(pw).all(|v| top2_inputs(v)) {
        return partition_m_replay(px, pw, max);
    }
    let mut top = Top2::new();
    // SAFETY: AVX2 (this function's feature). NaN padding: the lanes past BS hold no candidate (`Top2::add`).
    unsafe {
        each_m(px, pw, f32::NAN, |i1, i2, qx, q2| {
            for k in 0..4 {
                top.add(qx[k], q2[k], ids(i1, i2, k));
            }
        })
    };
    let Some(id) = top.winner() else { return partition_m_replay(px, pw, max) };
    // The winner's sums again, as the reference computes them (the lanes' values).
    let (i1, i2, k) = ((id >> 8) as usize, ((id >> 2) & 63) as usize, (id & 3) as usize);
    let (sumqx, sumq2) = partition_m_sums(px, pw, i1, i2)[k];
    Partition { i1: i1 as i32, i2: i2 as i32, shift: k as i32, scale: sumqx / sumq2 }
}

/// [`sling_quantizers::iq1::partition_m`] with eight `i2` per vector, the running best replayed in order (module
/// doc).
#[inline(never)]
#[target_feature(enable = "avx2")]
fn partition_m_replay(
    px: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2],
    pw: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2],
    max: f32,
) -> Partition {
    const BS: usize = IQ1M_BLOCK_SIZE;
    let mut best = -f32::MAX;
    let mut r = Partition { i1: -1, i2: -1, shift: -1, scale: max };
    // SAFETY: AVX2 (this function's feature); the lanes past BS are masked off.
    unsafe {
        each_m(px, pw, 0.0, |i1, i2, qx, q2| {
            let n = (BS + 1 - i2).min(8);
            replay(qx, q2, n, &mut best, &mut r, |l, k| (i1 as i32, (i2 + l) as i32, k as i32));
        })
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sling_quantizers::iq1::{partition_m, partition_s};
    use sling_quantizers::iqsearch::Reference;

    fn avx2() -> bool {
        let ok = std::is_x86_feature_detected!("avx2");
        if !ok {
            eprintln!("no AVX2 on this CPU: the AVX2 i-quant searches are not exercised");
        }
        ok
    }

    /// IQ1_M's prefix sums of the two halves over the first 16 values and weights (sorted order), value `j` in half
    /// `half(j)`, as the encoder builds them.
    #[allow(clippy::type_complexity)]
    fn halves(x: &[f32], w: &[f32], half: impl Fn(usize) -> usize) -> ([[f32; 17]; 2], [[f32; 17]; 2]) {
        let (mut px, mut pw) = ([[0.0f32; 17]; 2], [[0.0f32; 17]; 2]);
        for j in 0..16 {
            let h = half(j);
            px[h][j + 1] = px[h][j] + w[j] * x[j];
            px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + w[j];
            pw[1 - h][j + 1] = pw[1 - h][j];
        }
        (px, pw)
    }

    /// Prefix sums as the encoders build them, from values and weights in sorted order.
    fn prefix<const N: usize>(x: &[f32], w: &[f32]) -> ([f32; N], [f32; N]) {
        let (mut sx, mut sw) = ([0.0f32; N], [0.0f32; N]);
        for j in 0..N - 1 {
            sx[j + 1] = sx[j] + w[j] * x[j];
            sw[j + 1] = sw[j] + w[j];
        }
        (sx, sw)
    }

    /// The partition searches' best-candidate shortcut ([`Top2`]) against the reference's in-order loop on blocks
    /// made to reach its edges: exact ties (few distinct values, zero weights), near ties, magnitudes from 1e-20 to
    /// 1e20 on either side of its range guards.
    #[test]
    fn top2_shortcut_equals_the_replay() {
        if !avx2() {
            return;
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for case in 0..20_000 {
            let family = case % 4;
            let (xs, ws) = (10f32.powi((next() * 40.0) as i32 - 20), 10f32.powi((next() * 40.0) as i32 - 20));
            let mut x = [0.0f32; 32];
            let mut w = [0.0f32; 32];
            for j in 0..32 {
                (x[j], w[j]) = match family {
                    0 => ((next() * 2.0 - 1.0) * xs, next() * 2.0 * ws),
                    1 => ([-1.0, 0.0, 0.5, 1.0][(next() * 4.0) as usize % 4], [0.0, 1.0][(next() * 2.0) as usize % 2]),
                    2 => (next() * 2.0 - 1.0, if next() < 0.3 { 0.0 } else { next() * 1e-3 }),
                    _ => ((next() * 2.0 - 1.0) * (1.0 + (j % 3) as f32 * 1e-6), 1.0 + (j % 2) as f32 * 1e-6),
                };
            }
            x.sort_by(f32::total_cmp);
            let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let (sx, sw) = prefix::<33>(&x, &w);
            // SAFETY: AVX2 checked above.
            let got = unsafe { partition_s_avx2(&sx, &sw, max) };
            let want = partition_s(&sx, &sw, max);
            assert_eq!(
                (got.i1, got.i2, got.shift, got.scale.to_bits()),
                (want.i1, want.i2, want.shift, want.scale.to_bits()),
                "IQ1_S case {case}"
            );
            let (px, pw) = halves(&x, &w, |j| (j * 5 + case) % 2);
            // SAFETY: AVX2 checked above.
            let got = unsafe { partition_m_avx2(&px, &pw, max) };
            let want = partition_m(&px, &pw, max);
            assert_eq!(
                (got.i1, got.i2, got.shift, got.scale.to_bits()),
                (want.i1, want.i2, want.shift, want.scale.to_bits()),
                "IQ1_M case {case}"
            );
        }
    }

    proptest! {
        #[test]
        fn sort_equals_glibc_merge_sort(v in proptest::collection::vec(prop_oneof![
            -2.0f32..2.0, Just(0.0f32), Just(-0.0f32), Just(1.0f32), Just(f32::INFINITY), Just(f32::NEG_INFINITY),
            Just(f32::NAN), Just(f32::MIN_POSITIVE / 4.0)], 32)) {
            let xb: [f32; 32] = v.clone().try_into().unwrap();
            let got = sort_by_keys(&xb);
            let want = sorted_pairs(&xb);
            prop_assert_eq!(got.map(|p| (p.v.to_bits(), p.i)), want.map(|p| (p.v.to_bits(), p.i)));
            let xb16: [f32; 16] = v[..16].try_into().unwrap();
            prop_assert_eq!(sort_by_keys(&xb16).map(|p| (p.v.to_bits(), p.i)), sorted_pairs(&xb16).map(|p| (p.v.to_bits(), p.i)));
        }

        #[test]
        fn partition_searches_equal_the_reference(
            x in proptest::collection::vec(prop_oneof![-3.0f32..3.0, Just(0.0f32), Just(1.0f32), Just(1e30f32)], 32),
            w in proptest::collection::vec(prop_oneof![0.0f32..4.0, Just(0.0f32), Just(1.0f32)], 32),
            max in 0.0f32..3.0,
        ) {
            if !avx2() { return Ok(()); }
            let mut x = x;
            x.sort_by(f32::total_cmp);
            let (sx, sw) = prefix::<33>(&x, &w);
            // SAFETY: AVX2 checked above.
            let got = unsafe { partition_s_avx2(&sx, &sw, max) };
            let want = partition_s(&sx, &sw, max);
            prop_assert_eq!((got.i1, got.i2, got.shift, got.scale.to_bits()), (want.i1, want.i2, want.shift, want.scale.to_bits()));
            // IQ1_M: the two halves' prefix sums over the same sorted order.
            let (px, pw) = halves(&x, &w, |j| (j * 7 + 3) % 2);
            // SAFETY: AVX2 checked above.
            let got = unsafe { partition_m_avx2(&px, &pw, max) };
            let want = partition_m(&px, &pw, max);
            prop_assert_eq!((got.i1, got.i2, got.shift, got.scale.to_bits()), (want.i1, want.i2, want.shift, want.scale.to_bits()));
        }

        #[test]
        fn rows_equal_the_reference(
            x in proptest::collection::vec(prop_oneof![8 => -1.0f32..1.0, 1 => Just(0.0f32), 1 => Just(0.25f32)], 512),
            w in proptest::collection::vec(0.0f32..4.0, 512),
            weighted in any::<bool>(),
        ) {
            if !avx2() { return Ok(()); }
            let qw = weighted.then_some(&w[..]);
            use sling_quantizers::{iq1, iq2};
            for dtype in [DType::IQ1S, DType::IQ1M, DType::IQ2XXS, DType::IQ2XS, DType::IQ2S] {
                let row_bytes = 2 * dtype.block_bytes();
                let mut got = vec![0u8; row_bytes];
                // SAFETY: AVX2 checked above.
                unsafe { rows(dtype, &x, 512, qw, &mut got, row_bytes) };
                let mut want = vec![0u8; row_bytes];
                let reference = match dtype {
                    DType::IQ1S => iq1::quantize_row_iq1_s_with::<Reference>,
                    DType::IQ1M => iq1::quantize_row_iq1_m_with::<Reference>,
                    DType::IQ2XXS => iq2::quantize_row_iq2_xxs_with::<Reference>,
                    DType::IQ2XS => iq2::quantize_row_iq2_xs_with::<Reference>,
                    _ => iq2::quantize_row_iq2_s_with::<Reference>,
                };
                reference(&x, qw, &mut want);
                prop_assert_eq!(got, want, "{}", dtype);
            }
        }
    }
}

/// A/B timing of the lane path against the AVX2 build of the scalar encoders, interleaved in one process so that
/// other load on the machine hits both alike: `cargo test --release -p sling-kernels iq_ab -- --ignored --nocapture`.
#[cfg(test)]
mod ab {
    use super::*;

    #[test]
    #[ignore = "timing, not a test"]
    fn iq_ab() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let n = 4096;
        let nrows = 16;
        let mut s = 1u32;
        let mut rnd = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // As scripts/bench/quantize.py: N(0, 0.02²) values, importance weights 0.05 + N(0, 1)².
        let mut normal = || {
            let (u, v) = (rnd() + 0.5, rnd() + 0.5);
            (-2.0 * u.max(1e-7).ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        };
        let x: Vec<f32> = (0..n * nrows).map(|_| 0.02 * normal()).collect();
        let w: Vec<f32> = (0..n).map(|_| 0.05 + normal().powi(2)).collect();
        let only = std::env::var("IQ_AB").ok();
        for dtype in [DType::IQ1S, DType::IQ1M, DType::IQ2XXS, DType::IQ2XS, DType::IQ2S] {
            if only.as_deref().is_some_and(|o| o != dtype.name()) {
                continue;
            }
            let row_bytes = n / 256 * dtype.block_bytes();
            let mut a = vec![0u8; nrows * row_bytes];
            let mut b = vec![0u8; nrows * row_bytes];
            let (mut ta, mut tb) = (f64::MAX, f64::MAX);
            for _ in 0..12 {
                let t = std::time::Instant::now();
                // SAFETY: AVX2 checked above.
                unsafe { rows(dtype, &x, n, Some(&w), &mut a, row_bytes) };
                ta = ta.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                // SAFETY: AVX2 checked above.
                unsafe { crate::rows_avx2(dtype, &x, n, Some(&w), &mut b, row_bytes) };
                tb = tb.min(t.elapsed().as_secs_f64());
            }
            assert_eq!(a, b);
            let mb = (x.len() * 4) as f64 / 1e6;
            println!(
                "{:8} lanes {:6.1} MB/s  scalar-avx2 {:6.1} MB/s  {:.2}x",
                dtype.name(),
                mb / ta,
                mb / tb,
                tb / ta
            );
        }
    }
}
