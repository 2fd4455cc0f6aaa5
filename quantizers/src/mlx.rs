//! MLX 0.32.4 affine quantization (`mx.quantize(w, group_size, bits, mode="affine")` on the CPU stream) as a
//! scalar reference on slices. Facts: `../shared/docs/formats-and-algorithms.md` §2.3, the ml-explore/mlx source
//! `mlx/backend/cpu/quantized.cpp` `quantize<T, U>` for bits 2–8, and black-box vectors from the installed mlx
//! 0.32.4 + mlx-cpu (`scripts/gen_ct_mlx_vectors.py` → `tests/ct_mlx_vectors.rs`), 1-bit included.
//!
//! **The exception to sling's "quantize with the rounded scale" rule.** MLX quantizes each group with its `f32`
//! scale and bias and only then casts them to the weight dtype for storage (`scales[i] = static_cast<T>(scale)`),
//! so the stored BF16/F16 scale and bias are not exactly what the codes were computed with. We do the same: the
//! codes equal `mx.quantize`'s bit for bit, which is what MLX's consumers (mlx-lm) expect. Dequantizing the file
//! therefore gives `rounded_s · q + rounded_b`, not the `f32` values used during encoding.
//!
//! **Non-finite input.** MLX's `std::max`/`std::min` skip NaN in the group statistics (so NaN elements do not move
//! the scale) but a NaN element then reaches an undefined float-to-integer cast; ±Inf enters the statistics and
//! poisons the group. Here the statistics are over the finite elements only (none → min = max = 0, which gives
//! MLX's all-zero-group result), a NaN element is quantized as 0, and ±Inf saturates to code `n` or 0 by the
//! ordinary clamp. On all-finite input this is exactly MLX's result.
//!
//! **Shapes.** MLX accepts groups of 32/64/128 and bits {1, 2, 3, 4, 5, 6, 8}; here any group ≥ 1 works
//! (0 = one group for the whole row; a shorter last group is allowed) and any bits in 1..=8 (7 follows the same
//! formula); bits outside 1..=8 produce no output. Nothing panics on any input.

use crate::ct::{pack_bits, unpack_bits, ScaleDtype};

/// MLX's `eps` for the affine scale (`float eps = 1e-7`).
const EPS: f32 = 1e-7;

/// `(min, max)` over the finite elements; `(0, 0)` if there are none. Not widened to 0 (MLX does not).
#[inline(always)]
fn finite_min_max(vals: &[f32]) -> (f32, f32) {
    // Eight independent lanes (then folded): no branch and no reassociated reduction, so it vectorises; min and
    // max are exact, so the order does not change the result (a ±0 tie does not matter below).
    let (mut lo, mut hi) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
    let mut chunks = vals.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            let v = c[k];
            let fin = v.is_finite();
            lo[k] = lo[k].min(if fin { v } else { f32::INFINITY });
            hi[k] = hi[k].max(if fin { v } else { f32::NEG_INFINITY });
        }
    }
    let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
    for k in 0..8 {
        mn = mn.min(lo[k]);
        mx = mx.max(hi[k]);
    }
    for &v in chunks.remainder() {
        if v.is_finite() {
            mn = mn.min(v);
            mx = mx.max(v);
        }
    }
    if mn > mx {
        (0.0, 0.0)
    } else {
        (mn, mx)
    }
}

/// The `f32` scale and bias of one group, exactly as MLX 0.32.4 computes them (§2.3):
/// * bits 2–8 (`quantized.cpp` `quantize`): `s = max((α−β)/n, 1e−7)`; if `|β| > |α|` keep `s` and take
///   `edge = β`, else negate `s` and take `edge = α`; `q0 = rint(edge/s)`; if `q0 ≠ 0` then `s = edge/q0`,
///   `bias = edge`, else `bias = 0`. So the larger-magnitude extreme and 0 are exact; the other extreme may clip.
/// * 1 bit (new in 0.32.4, black-box): `s = max(α−β, 1e−7)`, `bias = β` (the docstring formula).
#[inline(always)]
fn group_params(mn: f32, mx: f32, bits: u32, n: f32) -> (f32, f32) {
    if bits == 1 {
        return ((mx - mn).max(EPS), mn);
    }
    let mask = mn.abs() > mx.abs();
    let s = ((mx - mn) / n).max(EPS);
    let (s, edge) = if mask { (s, mn) } else { (-s, mx) };
    let q0 = (edge / s).round_ties_even();
    if q0 != 0.0 {
        (edge / q0, edge)
    } else {
        (s, 0.0)
    }
}

/// One row of MLX affine quantization: groups of `group` consecutive elements (MLX: 32, 64 or 128), `bits` in
/// {1, 2, 3, 4, 5, 6, 8}. Per group the `f32` scale `s` and bias `b` (below); codes
/// `q = clip(rint((w − b)/s), 0, 2^bits − 1)` (round half to even) computed with those `f32` values; appends the
/// codes as an LSB-first little-endian bitstream (`cols·bits/32` u32 words, `ceil` for a ragged row; for 3/5/6
/// bits MLX writes byte packs that form the same stream), and per group `sd.round(s)` and `sd.round(b)` — the
/// values the file holds (`static_cast<T>`). `sd` is the weight dtype MLX would be called with.
///
/// Scale and bias, in `f32` exactly as MLX 0.32.4 computes them (§2.3), with α = max, β = min of the group:
/// * bits 2–8 (`quantized.cpp` `quantize`): `s = max((α−β)/n, 1e−7)`; if `|β| > |α|` keep `s` and take
///   `edge = β`, else negate `s` and take `edge = α`; `q0 = rint(edge/s)`; if `q0 ≠ 0` then `s = edge/q0`,
///   `bias = edge`, else `bias = 0` (the larger-magnitude extreme and 0 are exact; the other extreme may clip);
/// * 1 bit (new in 0.32.4, black-box, confirmed by the vectors): `s = max(α−β, 1e−7)`, `bias = β`.
#[inline(always)] // built for AVX2 too (`sling_kernels::encode::encode_rows`)
pub fn quantize_affine_row(
    row: &[f32],
    bits: u32,
    group: usize,
    sd: ScaleDtype,
    packed: &mut Vec<u32>,
    scales: &mut Vec<f32>,
    biases: &mut Vec<f32>,
) {
    if !(1..=8).contains(&bits) {
        return;
    }
    let g = if group == 0 { row.len().max(1) } else { group };
    let n = ((1u32 << bits) - 1) as f32;
    let mut codes = Vec::with_capacity(row.len());
    for chunk in row.chunks(g) {
        let (mn, mx) = finite_min_max(chunk);
        let (s, b) = group_params(mn, mx, bits, n);
        // Sized, then filled by a plain loop: `extend` over a map is a std function the AVX2 build does not inline.
        let start = codes.len();
        codes.resize(start + chunk.len(), 0);
        for (c, &w) in codes[start..].iter_mut().zip(chunk) {
            *c = affine_code(w, s, b, n);
        }
        scales.push(sd.round(s));
        biases.push(sd.round(b));
    }
    crate::ct::pack_bits_slice(&codes, bits, packed);
}

/// The code of one element with the group's `f32` scale `s` and bias `b`: `clip(rint((w − b)/s), 0, n)`, NaN read
/// as 0. The one definition, shared by [`quantize_affine_row`] and [`AffineGrid`].
#[inline(always)]
fn affine_code(w: f32, s: f32, b: f32, n: f32) -> u32 {
    // clip(rint(v)) == rint(clip(v)) for the bounds 0 and n (integers); clipped first, `v` is small enough for
    // the float adder's rounding (`nearest_int`, ties to even). A NaN element reads as 0; `s` and `b` are finite.
    let w = if w.is_nan() { 0.0 } else { w };
    crate::common::nearest_int(((w - b) / s).clamp(0.0, n)) as u32
}

/// MLX affine quantization seen one group at a time ([`crate::gptq::Grid`]): per group the `f32` scale and bias of
/// [`quantize_affine_row`] (`q_scale`, `q_zero`: what codes are computed with) and their stored roundings
/// `sd.round(s)`, `sd.round(b)` (`scale`, `zero`: what the file holds). The value of a code is what
/// [`dequantize_affine_row`] computes from the file, `scale · q + zero` in `f32`. `group` 0 = one group per row;
/// bits outside 1..=8 give no parameters (`row_params` is empty), which `gptq::solve` reports as an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffineGrid {
    pub bits: u32,
    pub group: usize,
    pub sd: ScaleDtype,
}

impl AffineGrid {
    /// Quantizes `row` and replaces each element by the value its code dequantizes to: per group of the row,
    /// exactly [`Grid::row_params`](crate::gptq::Grid::row_params) then the `dequant` of
    /// [`Grid::quantize_group`](crate::gptq::Grid::quantize_group), without the codes. `false`, with `row`
    /// untouched, for bits outside 1..=8. `inline(always)` with everything it calls, so that `sling_kernels` builds
    /// this same code for AVX2 (`awq::delta`).
    #[inline(always)]
    pub fn qdq_row(&self, row: &mut [f32]) -> bool {
        if !(1..=8).contains(&self.bits) {
            return false;
        }
        let g = if self.group == 0 { row.len().max(1) } else { self.group };
        let n = ((1u32 << self.bits) - 1) as f32;
        for chunk in row.chunks_mut(g) {
            let (mn, mx) = finite_min_max(chunk);
            let (s, b) = group_params(mn, mx, self.bits, n);
            let (scale, zero) = (self.sd.round(s), self.sd.round(b));
            for x in chunk.iter_mut() {
                // `dequantize` of the code (a byte: at most 255).
                *x = scale * f32::from(affine_code(*x, s, b, n) as u8) + zero;
            }
        }
        true
    }
}

impl crate::gptq::Grid for AffineGrid {
    fn group(&self) -> usize {
        if self.group == 0 {
            usize::MAX
        } else {
            self.group
        }
    }

    fn row_params(&self, row: &[f32]) -> Vec<crate::gptq::GroupParams> {
        if !(1..=8).contains(&self.bits) {
            return Vec::new();
        }
        let g = if self.group == 0 { row.len().max(1) } else { self.group };
        let n = ((1u32 << self.bits) - 1) as f32;
        row.chunks(g)
            .map(|chunk| {
                let (mn, mx) = finite_min_max(chunk);
                let (s, b) = group_params(mn, mx, self.bits, n);
                crate::gptq::GroupParams { scale: self.sd.round(s), zero: self.sd.round(b), q_scale: s, q_zero: b }
            })
            .collect()
    }

    fn row_grid(&self) -> Option<crate::gptq::RowGrid<'_>> {
        Some(crate::gptq::RowGrid::Affine(self))
    }

    #[inline]
    fn quantize(&self, x: f32, p: &crate::gptq::GroupParams) -> (u8, f32) {
        let n = ((1u32 << self.bits.clamp(1, 8)) - 1) as f32;
        let c = affine_code(x, p.q_scale, p.q_zero, n) as u8;
        (c, self.dequantize(c, p))
    }

    #[inline]
    fn dequantize(&self, code: u8, p: &crate::gptq::GroupParams) -> f32 {
        p.scale * f32::from(code) + p.zero
    }
}

/// Appends `codes` (each masked to `bits`) as the LSB-first bitstream of [`quantize_affine_row`]'s `packed`
/// (`ceil(n·bits/32)` words). Bits outside 1..=8: nothing appended.
pub fn pack_codes(codes: &[u8], bits: u32, packed: &mut Vec<u32>) {
    if (1..=8).contains(&bits) {
        pack_bits(codes.iter().map(|&c| u32::from(c)), bits, packed);
    }
}

/// `w = scales · q + biases` per element (in `f32`, a product then a sum, no fused multiply-add), element `i` with
/// `scales[i/group]` and `biases[i/group]` (missing ones read as 0); appends `cols` values read from the
/// bitstream (words past the end read as 0). Bits outside 1..=8: nothing appended.
pub fn dequantize_affine_row(
    packed: &[u32],
    bits: u32,
    group: usize,
    cols: usize,
    scales: &[f32],
    biases: &[f32],
    out: &mut Vec<f32>,
) {
    if !(1..=8).contains(&bits) {
        return;
    }
    let g = if group == 0 { cols.max(1) } else { group };
    let mut i = 0usize;
    unpack_bits(packed, bits, cols, |q| {
        let s = scales.get(i / g).copied().unwrap_or(0.0);
        let b = biases.get(i / g).copied().unwrap_or(0.0);
        out.push(s * q as f32 + b);
        i += 1;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn quant(row: &[f32], bits: u32, group: usize, sd: ScaleDtype) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
        let (mut p, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
        quantize_affine_row(row, bits, group, sd, &mut p, &mut s, &mut b);
        (p, s, b)
    }

    #[test]
    fn documented_examples() {
        // §2.3: a 4-bit group spanning [−0.3, 1.0] dequantizes −0.3 as −0.25; [0.2, 1.0] gives 0.2105.
        let mut row = vec![0.5f32; 32];
        row[0] = -0.3;
        row[1] = 1.0;
        let (p, s, b) = quant(&row, 4, 32, ScaleDtype::F32);
        let mut d = Vec::new();
        dequantize_affine_row(&p, 4, 32, 32, &s, &b, &mut d);
        assert_eq!(d[1], 1.0);
        assert!((d[0] + 0.25).abs() < 1e-6, "{}", d[0]);
        let mut row = vec![0.5f32; 32];
        row[0] = 0.2;
        row[1] = 1.0;
        let (p, s, b) = quant(&row, 4, 32, ScaleDtype::F32);
        let mut d = Vec::new();
        dequantize_affine_row(&p, 4, 32, 32, &s, &b, &mut d);
        assert!((d[0] - 0.2105).abs() < 1e-4, "{}", d[0]);
    }

    #[test]
    fn zero_group_and_one_bit() {
        let (p, s, b) = quant(&[0.0; 64], 4, 64, ScaleDtype::BF16);
        assert_eq!(p, [0; 8]);
        assert_eq!(s, [ScaleDtype::BF16.round(-1e-7)]);
        assert_eq!(b, [0.0]);
        // 1 bit: threshold at the midpoint, a tie goes to 0
        let mut row = vec![0.0f32; 32];
        row[1] = 1.0;
        row[2] = 0.5;
        row[3] = 0.5000001;
        let (p, s, b) = quant(&row, 1, 32, ScaleDtype::F32);
        assert_eq!((s[0], b[0]), (1.0, 0.0));
        assert_eq!(p, [0b1010]);
    }

    #[test]
    fn hostile_rows_do_not_panic() {
        let mut rows: Vec<Vec<f32>> = vec![
            vec![],
            vec![-0.0; 32],
            vec![0.3; 64],
            vec![-7.0; 64],
            vec![f32::NAN; 32],
            vec![f32::INFINITY; 32],
            (0..64).map(|i| f32::from_bits(i * 3 + 1)).collect(),
            vec![f32::MAX, f32::MIN, 1.0, -1.0],
            vec![1.0; 33],
        ];
        let mut mixed: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.05).collect();
        mixed[5] = f32::NAN;
        mixed[6] = f32::NEG_INFINITY;
        mixed[7] = f32::INFINITY;
        rows.push(mixed);
        for row in &rows {
            for bits in 0..=9 {
                for group in [0, 1, 32, 64, 128] {
                    for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
                        let (p, s, b) = quant(row, bits, group, sd);
                        if !(1..=8).contains(&bits) {
                            assert!(p.is_empty() && s.is_empty() && b.is_empty());
                            continue;
                        }
                        assert_eq!(p.len(), (row.len() * bits as usize).div_ceil(32));
                        let g = if group == 0 { row.len().max(1) } else { group };
                        assert_eq!(s.len(), row.len().div_ceil(g));
                        let mut d = Vec::new();
                        dequantize_affine_row(&p, bits, group, row.len(), &s, &b, &mut d);
                        assert_eq!(d.len(), row.len());
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn error_within_one_step_and_extreme_exact(
            bits in prop::sample::select(vec![2u32, 3, 4, 5, 6, 8]),
            x in proptest::collection::vec(-10f32..10.0, 64),
        ) {
            let (p, s, b) = quant(&x, bits, 32, ScaleDtype::F32);
            let mut d = Vec::new();
            dequantize_affine_row(&p, bits, 32, 64, &s, &b, &mut d);
            for (gi, (xs, ds)) in x.chunks(32).zip(d.chunks(32)).enumerate() {
                let step = s[gi].abs();
                let (mn, mx) = finite_min_max(xs);
                let range = mx - mn;
                for (v, r) in xs.iter().zip(ds) {
                    // half a step inside the grid; the clipped side can lose up to one more step
                    // (rint(edge/s) moves the grid by at most half a step), plus f32 rounding
                    prop_assert!((v - r).abs() <= 1.5 * step + 1e-5 * range.max(1.0), "{} {} {}", v, r, step);
                }
                // the larger-magnitude extreme is reproduced exactly when q0 != 0
                let edge = if mn.abs() > mx.abs() { mn } else { mx };
                if b[gi] != 0.0 {
                    let k = xs.iter().position(|&v| v == edge).unwrap_or(0);
                    prop_assert_eq!(ds[k], edge);
                }
            }
        }

        #[test]
        fn codes_unpack_in_range(bits in 1u32..=8, x in proptest::collection::vec(-1e3f32..1e3, 0..130)) {
            let (p, s, _) = quant(&x, bits, 64, ScaleDtype::BF16);
            prop_assert_eq!(s.len(), x.len().div_ceil(64));
            let mut n = 0;
            unpack_bits(&p, bits, x.len(), |q| { assert!(q < (1 << bits)); n += 1; });
            prop_assert_eq!(n, x.len());
        }
    }
}
