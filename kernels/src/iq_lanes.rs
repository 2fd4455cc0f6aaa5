//! The i-quant encoders (IQ1_S, IQ1_M) with their hot spots on AVX2: the same encoder as the scalar reference
//! ([`sling_quantizers::iq1`], a port of ggml-quants.c), instantiated with [`Avx2Iq`] in place of its
//! [`Reference`](sling_quantizers::iq1::Reference) searches. Every replacement returns exactly what the reference
//! returns, for every input (tested against it below, in `tests/kquant_lanes.rs`'s hostile rows and, through the
//! shipped path, against ggml itself in `quantizers/tests/bitexact_iq1.rs`):
//!
//! - **the sort**: glibc's merge sort with a comparator on the value is a stable sort in which `-0.0 == 0.0`; for a
//!   block without NaN (the only values on which comparisons are not a total preorder) sorting the keys
//!   `(value in integer order, index)` gives the same permutation. Blocks with a NaN use the reference's copy of
//!   glibc's algorithm.
//! - **the partition search** (`quantize_row_iq1_*_impl`'s double loop over `i1 <= i2`): eight `i2` per vector.
//!   Each lane computes its candidate's sums with the reference's operations in its order (no FMA), so the values
//!   are the reference's. Which candidate wins depends on the running best score, updated in loop order; a vector
//!   first tests its lanes against the best score so far; the first lane that passes runs the scalar rule on those
//!   same values (updating the best score), then the lanes after it are tested again against the best score as it
//!   is now, and so on. A lane that fails the test against the current best score fails it in the scalar loop too
//!   (the best score has not changed before it).
//! - **the neighbour search** (`iq1_find_best_neighbour2`): the distance of a grid point is a sum of eight terms,
//!   each one of three values per coordinate (`w·(scale·x_g - x)²` for the three levels); they are computed once
//!   per search and looked up per neighbour, then added in the reference's order from `0.0`, so each candidate's
//!   score, and the first strict minimum, are the reference's. When no candidate scores below `FLT_MAX` (non-finite
//!   sums), the reference itself runs (its whole-grid scan).

use std::arch::x86_64::*;

use sling_core::DType;
use sling_quantizers::iq1::{
    find_best_neighbour2, levels, sorted_pairs, Iq1Search, Pair, Partition, IQ1M_BLOCK_SIZE, IQ1M_DELTA,
    IQ1S_BLOCK_SIZE, IQ1S_DELTA,
};
use sling_quantizers::iqgrid::Iq2Maps;

/// Whether [`rows`] handles `dtype`.
pub(crate) fn handles(dtype: DType) -> bool {
    matches!(dtype, DType::IQ1S | DType::IQ1M)
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
            _ => unreachable!("iq_lanes::rows called for {dtype}"),
        }
    }
}

/// The AVX2 searches. Only used by [`rows`] (and the tests), which run after the AVX2 check: that is the safety
/// argument of the `unsafe` calls in the methods.
pub(crate) struct Avx2Iq;

impl Iq1Search for Avx2Iq {
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
    fn neighbour(
        maps: &Iq2Maps,
        nb: &[u16],
        xval: &[f32],
        weight: &[f32],
        scale: f32,
        xg: &[f32; 3],
        l_out: &mut [i8],
    ) -> usize {
        neighbour_by_table(maps, nb, xval, weight, scale, xg, l_out)
    }
}

/// The permutation of glibc's merge sort (see the module doc) through an unstable sort of unique integer keys.
#[inline(always)]
fn sort_by_keys<const N: usize>(xb: &[f32; N]) -> [Pair; N] {
    if xb.iter().any(|v| v.is_nan()) {
        return sorted_pairs(xb);
    }
    let mut keys = [0u64; N];
    for (j, (k, &v)) in keys.iter_mut().zip(xb).enumerate() {
        // -0.0 and 0.0 compare equal: one key. Negative values: all bits flipped; others: the sign bit set.
        let b = if v == 0.0 { 0 } else { v.to_bits() };
        let o = if b >> 31 != 0 { !b } else { b | 0x8000_0000 };
        *k = (o as u64) << 32 | j as u64;
    }
    keys.sort_unstable();
    let mut pairs = [Pair::default(); N];
    for (p, k) in pairs.iter_mut().zip(keys) {
        let i = k as u32 as usize;
        *p = Pair { v: xb[i], i: i as u8 };
    }
    pairs
}

/// `iq1_find_best_neighbour2` with the per-coordinate terms looked up (module doc).
#[inline(always)]
fn neighbour_by_table(
    maps: &Iq2Maps,
    nb: &[u16],
    xval: &[f32],
    weight: &[f32],
    scale: f32,
    xg: &[f32; 3],
    l_out: &mut [i8],
) -> usize {
    // t[4i + level]: the reference's `w * diff * diff` with `diff = scale * xg[level] - xval[i]`.
    let mut t = [0.0f32; 32];
    for i in 0..8 {
        for (lv, &q) in xg.iter().enumerate() {
            let diff = scale * q - xval[i];
            t[4 * i + lv] = weight[i] * diff * diff;
        }
    }
    let num_neighbors = nb[0] as usize;
    let mut best_score = f32::MAX;
    let mut grid_index = None;
    for &k in &nb[1..=num_neighbors] {
        let g = maps.grid[k as usize];
        let mut d2 = 0.0f32;
        for i in 0..8 {
            // Byte i is 2*level + 1 (1, 3 or 5): the level is the byte shifted right once.
            d2 += t[4 * i + ((g >> (8 * i + 1)) & 3) as usize];
        }
        if d2 < best_score {
            best_score = d2;
            grid_index = Some(k as usize);
        }
    }
    let Some(k) = grid_index else {
        return find_best_neighbour2(maps, nb, xval, weight, scale, xg, l_out);
    };
    let g = maps.grid[k];
    for (i, l) in l_out.iter_mut().enumerate().take(8) {
        *l = ((g >> (8 * i + 1)) & 3) as i8;
    }
    k
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

/// One vector of candidates with what the reference's update rule needs of them, computed once per vector (the
/// division and product are those the rule would compute, so the results are the same bits).
struct Cands {
    /// `sumqx * sumqx`.
    qx2: [f32; 8],
    /// `sumq2`.
    q2: [f32; 8],
    /// `sumqx / sumq2`: the scale the rule would take.
    scale: [f32; 8],
    /// `scale * sumqx`: the best score the rule would take.
    score: [f32; 8],
}

impl Cands {
    #[inline]
    #[target_feature(enable = "avx2")]
    fn new(qx: __m256, q2: __m256) -> Cands {
        let scale = _mm256_div_ps(qx, q2);
        Cands {
            qx2: lanes(_mm256_mul_ps(qx, qx)),
            q2: lanes(q2),
            scale: lanes(scale),
            score: lanes(_mm256_mul_ps(scale, qx)),
        }
    }

    /// The reference's rule for lane `l`: `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale = sumqx/sumq2;
    /// best = scale*sumqx; ... }`.
    #[inline(always)]
    fn update(&self, l: usize, best: &mut f32, r: &mut Partition, cand: (i32, i32, i32)) {
        if self.q2[l] > 0.0 && self.qx2[l] > *best * self.q2[l] {
            r.scale = self.scale[l];
            *best = self.score[l];
            (r.i1, r.i2, r.shift) = cand;
        }
    }
}

/// [`sling_quantizers::iq1::partition_s`] with eight `i2` per vector (module doc).
#[inline(never)]
#[target_feature(enable = "avx2")]
fn partition_s_avx2(sumx: &[f32; IQ1S_BLOCK_SIZE + 1], sumw: &[f32; IQ1S_BLOCK_SIZE + 1], max: f32) -> Partition {
    const BS: usize = IQ1S_BLOCK_SIZE;
    let (x_p, x_m) = levels(IQ1S_DELTA);
    // Padded so that a vector may start at any i2 <= BS; the lanes past BS are masked off.
    let mut sx = [0.0f32; BS + 8];
    let mut sw = [0.0f32; BS + 8];
    sx[..=BS].copy_from_slice(sumx);
    sw[..=BS].copy_from_slice(sumw);
    let mut best = -f32::MAX;
    let mut r = Partition { i1: -1, i2: -1, shift: 0, scale: max };
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
            let n = (BS + 1 - i2).min(8);
            // SAFETY: i2 <= BS, so i2 + 8 <= BS + 8 = the arrays' length.
            let (x2, w2) = unsafe { (_mm256_loadu_ps(sx.as_ptr().add(i2)), _mm256_loadu_ps(sw.as_ptr().add(i2))) };
            let (b, c) = (_mm256_sub_ps(x2, sx1), _mm256_sub_ps(sx_end, x2));
            let (bw, cw) = (_mm256_sub_ps(w2, sw1), _mm256_sub_ps(sw_end, w2));
            // a*x[0] + b*x[1] + c*x[2] and aw*x[0]*x[0] + bw*x[1]*x[1] + cw*x[2]*x[2], left to right.
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
            let hits = |best: f32| {
                let vb = set(best);
                _mm256_movemask_ps(_mm256_or_ps(better(qxp, q2p, vb), better(qxm, q2m, vb))) as u32
            };
            let mut mask = hits(best) & ((1u32 << n) - 1);
            if mask != 0 {
                let (cp, cm) = (Cands::new(qxp, q2p), Cands::new(qxm, q2m));
                while mask != 0 {
                    let l = mask.trailing_zeros() as usize;
                    let (i1, i2) = (i1 as i32, (i2 + l) as i32);
                    cp.update(l, &mut best, &mut r, (i1, i2, 1));
                    cm.update(l, &mut best, &mut r, (i1, i2, -1));
                    // The lanes after `l` against the best score as it is now.
                    mask = hits(best) & ((1u32 << n) - 1) & !((2u32 << l) - 1);
                }
            }
            i2 += 8;
        }
    }
    r
}

/// [`sling_quantizers::iq1::partition_m`] with eight `i2` per vector (module doc).
#[inline(never)]
#[target_feature(enable = "avx2")]
fn partition_m_avx2(px: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], pw: &[[f32; IQ1M_BLOCK_SIZE + 1]; 2], max: f32) -> Partition {
    const BS: usize = IQ1M_BLOCK_SIZE;
    let (x_p, x_m) = levels(IQ1M_DELTA);
    let mut sx = [[0.0f32; BS + 8]; 2];
    let mut sw = [[0.0f32; BS + 8]; 2];
    for h in 0..2 {
        sx[h][..=BS].copy_from_slice(&px[h]);
        sw[h][..=BS].copy_from_slice(&pw[h]);
    }
    let txs = [px[0][BS], px[1][BS]];
    let tws = [pw[0][BS], pw[1][BS]];
    let (p2, m2) = (x_p[2], x_m[2]);
    let cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1];
    let cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2];
    let cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1];
    let cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2];
    let set = _mm256_set1_ps;
    let mut best = -f32::MAX;
    let mut r = Partition { i1: -1, i2: -1, shift: -1, scale: max };
    for i1 in 0..=BS {
        let mut i2 = i1;
        while i2 <= BS {
            let n = (BS + 1 - i2).min(8);
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
            let hits = |best: f32| {
                let vb = set(best);
                let hit = _mm256_or_ps(
                    _mm256_or_ps(better(sumqx[0], sumq2[0], vb), better(sumqx[1], sumq2[1], vb)),
                    _mm256_or_ps(better(sumqx[2], sumq2[2], vb), better(sumqx[3], sumq2[3], vb)),
                );
                _mm256_movemask_ps(hit) as u32
            };
            let mut mask = hits(best) & ((1u32 << n) - 1);
            if mask != 0 {
                let c: [Cands; 4] = std::array::from_fn(|k| Cands::new(sumqx[k], sumq2[k]));
                while mask != 0 {
                    let l = mask.trailing_zeros() as usize;
                    for (k, c) in c.iter().enumerate() {
                        c.update(l, &mut best, &mut r, (i1 as i32, (i2 + l) as i32, k as i32));
                    }
                    // The lanes after `l` against the best score as it is now.
                    mask = hits(best) & ((1u32 << n) - 1) & !((2u32 << l) - 1);
                }
            }
            i2 += 8;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sling_quantizers::iq1::{partition_m, partition_s, Reference};

    fn avx2() -> bool {
        let ok = std::is_x86_feature_detected!("avx2");
        if !ok {
            eprintln!("no AVX2 on this CPU: the AVX2 i-quant searches are not exercised");
        }
        ok
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
            let (mut px, mut pw) = ([[0.0f32; 17]; 2], [[0.0f32; 17]; 2]);
            for j in 0..16 {
                let h = (j * 7 + 3) % 2;
                px[h][j + 1] = px[h][j] + w[j] * x[j];
                px[1 - h][j + 1] = px[1 - h][j];
                pw[h][j + 1] = pw[h][j] + w[j];
                pw[1 - h][j + 1] = pw[1 - h][j];
            }
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
            for dtype in [DType::IQ1S, DType::IQ1M] {
                let row_bytes = 2 * dtype.block_bytes();
                let mut got = vec![0u8; row_bytes];
                // SAFETY: AVX2 checked above.
                unsafe { rows(dtype, &x, 512, qw, &mut got, row_bytes) };
                let mut want = vec![0u8; row_bytes];
                match dtype {
                    DType::IQ1S => sling_quantizers::iq1::quantize_row_iq1_s_with::<Reference>(&x, qw, &mut want),
                    _ => sling_quantizers::iq1::quantize_row_iq1_m_with::<Reference>(&x, qw, &mut want),
                }
                prop_assert_eq!(got, want, "{}", dtype);
            }
        }
    }
}
