//! compressed-tensors 0.20.1 weight encodings as scalar reference functions on slices: integer
//! (`pack-quantized` / `int-quantized`), FP8 (`float-quantized`, channel and block), NVFP4
//! (`nvfp4-pack-quantized`) and MXFP4 (`mxfp4-pack-quantized`). No I/O: callers hand in `f32` rows and get
//! codes, packed words and scales. Facts: `../shared/docs/formats-and-algorithms.md` §1.2–§1.4, §3.2, §3.4,
//! checked against the installed compressed-tensors 0.20.1 and torch 2.15.0 (CPU) by
//! `scripts/gen_ct_mlx_vectors.py` → `tests/ct_mlx_vectors.rs`.
//!
//! **sling's one definition of each encoding.** All arithmetic is in `f32`. A scale is computed in `f32`, rounded
//! once to the dtype it is stored in ([`ScaleDtype`]), and that *rounded* value is what element quantization
//! divides by, so dequantizing from the file reproduces exactly what was encoded. This is compressed-tensors'
//! eager path run on `f32` weights with `QuantizationArgs.scale_dtype` = the storage dtype
//! (`quantization/utils/helpers.py` `calculate_qparams` steps 1–6, then `lifecycle/forward_helpers.py`
//! `_quantize`). compressed-tensors' CPU compressor on BF16/F16 weights differs: it computes the scale in the
//! weight dtype (for asymmetric scales `max − min` is rounded before the division) and divides each element in
//! the weight dtype, `bf16(x / s)`, before the clamp and the half-even round (§1.3), which changes a fraction of a
//! percent of the codes. We deliberately do not replicate that double rounding.
//!
//! **Non-finite input** (compressed-tensors has no defined behaviour: NaN statistics poison whole groups).
//! Group statistics (min, max, amax) are taken over the *finite* elements only (none → 0). Elements are then
//! quantized by the ordinary rule with saturation: ±Inf → the extreme code (`qmax`/`qmin`, ±448, ±6); NaN →
//! the code of 0 for integer and FP4 codes (an integer NaN becomes its group's zero point), and the E4M3 NaN
//! (`0x7f`, `0xff` with the sign bit, as torch casts it) for FP8. On all-finite input this is exactly the
//! library's result.
//!
//! **Lengths.** Nothing here panics on any input. Bit widths outside `1..=8` produce no output. Where a length
//! argument and a slice disagree, a missing input element is read as 0 and extra input is ignored. A group size
//! that does not divide the row (compressed-tensors raises) leaves a shorter last group with its own scale.

use half::{bf16, f16};

use crate::decode::e4m3_to_f32;
use crate::encode::f32_to_bf16_bits;
use crate::mxfp4::e8m0_to_fp32;

/// The dtype a scale (or an MLX bias) is stored in. compressed-tensors stores weight scales in the weight dtype
/// (`lifecycle/initialize.py` `initialize_qparams`, §1.2); MLX stores scales and biases in the input dtype (§2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleDtype {
    F32,
    F16,
    BF16,
}

impl ScaleDtype {
    /// Round to nearest even of `x` to this dtype, returned as `f32`. Values beyond the dtype's finite range,
    /// ±Inf included, saturate to ±max, as compressed-tensors' `round_to_quantized_type_dtype`
    /// (`quant_args.py`: `clamp(finfo.min, finfo.max)` then `.to(dtype)`) does; NaN stays NaN. (MLX casts
    /// without the clamp; the two agree whenever the scale fits the dtype, which is always the case for values
    /// that came from that dtype.)
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleDtype::F32 => clamp_finite(x, f32::MAX),
            ScaleDtype::F16 => f16::from_f32(clamp_finite(x, f16::MAX.to_f32())).to_f32(),
            ScaleDtype::BF16 => f32::from_bits(u32::from(f32_to_bf16_bits(clamp_finite(x, bf16::MAX.to_f32()))) << 16),
        }
    }

    /// The element type of the descriptor table this dtype stores as.
    pub fn dtype(self) -> sling_core::DType {
        match self {
            ScaleDtype::F32 => sling_core::DType::F32,
            ScaleDtype::F16 => sling_core::DType::F16,
            ScaleDtype::BF16 => sling_core::DType::BF16,
        }
    }

    /// Appends the little-endian bytes of `self.round(x)` in this dtype (4 bytes for F32, 2 otherwise).
    pub fn put(self, x: f32, out: &mut Vec<u8>) {
        let r = self.round(x);
        match self {
            ScaleDtype::F32 => out.extend_from_slice(&r.to_le_bytes()),
            ScaleDtype::F16 => out.extend_from_slice(&f16::from_f32(r).to_bits().to_le_bytes()),
            // r is already a bf16 value, so this conversion is exact.
            ScaleDtype::BF16 => out.extend_from_slice(&f32_to_bf16_bits(r).to_le_bytes()),
        }
    }

    /// `torch.finfo(dtype).eps`, what compressed-tensors substitutes for a zero scale (`helpers.py`
    /// `_get_dtype_eps`): BF16 2^-7, F16 2^-10, F32 2^-23.
    pub fn eps(self) -> f32 {
        match self {
            ScaleDtype::F32 => f32::EPSILON,
            ScaleDtype::F16 => 0.000_976_562_5,
            ScaleDtype::BF16 => 0.007_812_5,
        }
    }

    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            ScaleDtype::F32 => 4,
            ScaleDtype::F16 | ScaleDtype::BF16 => 2,
        }
    }
}

/// `x` clamped to `[-max, max]`; NaN passes through (like `torch.clamp`).
#[inline(always)]
fn clamp_finite(x: f32, max: f32) -> f32 {
    if x > max {
        max
    } else if x < -max {
        -max
    } else {
        x
    }
}

/// Integer weight arguments: `bits` in 1..=8 (compressed-tensors presets use 2..=8), symmetric or not, and the
/// group size (`None` = one group per row, the "channel" strategy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntArgs {
    pub bits: u32,
    pub symmetric: bool,
    pub group: Option<usize>,
}

/// `(min, max)` of the finite elements, widened to include 0 (`calculate_qparams` step 0: "0.0 must always be
/// representable"). Empty or all non-finite → `(0, 0)`.
/// Eight running minima and maxima, reduced at the end: the order of a min/max does not change its value (a
/// zero's sign aside, which no caller can see: see [`int_group_params`]), and the eight lanes let the compiler use
/// vector min/max. A non-finite element counts as 0, which the range holds already.
#[inline(always)]
fn finite_min_max0(vals: &[f32]) -> (f32, f32) {
    #[inline(always)]
    fn fin(v: f32) -> f32 {
        if v.is_finite() {
            v
        } else {
            0.0
        }
    }
    let (mut mn, mut mx) = ([0.0f32; 8], [0.0f32; 8]);
    let mut chunks = vals.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            let v = fin(c[k]);
            mn[k] = if v < mn[k] { v } else { mn[k] };
            mx[k] = if v > mx[k] { v } else { mx[k] };
        }
    }
    for (k, &v) in chunks.remainder().iter().enumerate() {
        let v = fin(v);
        mn[k] = if v < mn[k] { v } else { mn[k] };
        mx[k] = if v > mx[k] { v } else { mx[k] };
    }
    let lo = mn.iter().fold(0.0f32, |a, &b| if b < a { b } else { a });
    let hi = mx.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
    (lo, hi)
}

/// The largest `|x|` over the finite elements of `vals` (0 when there are none): the statistic every scale here is
/// computed from. Use it for the tensor amax handed to [`nvfp4_global_scale`] so that the whole tensor follows
/// the same non-finite policy.
pub fn finite_amax(vals: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    for &v in vals {
        if v.is_finite() {
            amax = amax.max(v.abs());
        }
    }
    amax
}

/// The integer range `[qmin, qmax] = [−2^(b−1), 2^(b−1)−1]` (`helpers.py` `_calculate_range`), or `None` for a
/// bit width outside 1..=8.
#[inline(always)]
fn int_range(bits: u32) -> Option<(f32, f32)> {
    if !(1..=8).contains(&bits) {
        return None;
    }
    let half = (1i32 << (bits - 1)) as f32;
    Some((-half, half - 1.0))
}

/// Quantizes one row to signed integer codes, compressed-tensors 0.20.1 `quantization/utils/helpers.py`
/// `calculate_qparams` + `lifecycle/forward_helpers.py` `_quantize` (§1.3), per group of `a.group` elements:
/// * min/max over the group, widened to include 0;
/// * symmetric: `scale = amax / ((qmax − qmin)/2)` (int4: amax/7.5), zero point 0 (not appended);
/// * asymmetric: `scale = (max − min)/(qmax − qmin)`, `zp = rne(clamp(qmin − min/scale, qmin, qmax))`, where —
///   exactly as `calculate_qparams` orders it — `scale` is still the unrounded `f32` quotient; an all-zero group
///   gives `0/0 = NaN`, which torch casts to the int8 zero point 0 (x86 and Arm alike), so its zero point is 0;
/// * the scale is rounded to `sd` ([`ScaleDtype::round`]), and a zero result becomes `sd.eps()`;
/// * element `q = rne(clamp(x/scale + zp, qmin, qmax))` with the rounded scale, all in `f32`.
///
/// Appends one code per element (in `[qmin, qmax]`), one scale per group (as stored, in `f32`) and, if
/// asymmetric, one zero point per group. Non-finite elements: see the module docs (NaN → the zero point).
/// Bits outside 1..=8: nothing is appended. `Some(0)` as group means one group per row.
#[inline(always)] // built for AVX2 too (`sling_kernels::encode::encode_rows`)
pub fn quantize_int_row(
    row: &[f32],
    a: &IntArgs,
    sd: ScaleDtype,
    codes: &mut Vec<i8>,
    scales: &mut Vec<f32>,
    zeros: &mut Vec<i8>,
) {
    let Some((qmin, qmax)) = int_range(a.bits) else { return };
    let g = int_group_len(a, row.len());
    codes.reserve(row.len());
    for chunk in row.chunks(g) {
        let (scale, zp) = int_group_params(chunk, a.symmetric, sd, qmin, qmax);
        scales.push(scale);
        if !a.symmetric {
            zeros.push(zp as i8);
        }
        // Sized, then filled by a plain loop: `extend` over a map is a std function the AVX2 build does not inline.
        let start = codes.len();
        codes.resize(start + chunk.len(), 0);
        for (c, &x) in codes[start..].iter_mut().zip(chunk) {
            *c = int_code(x, scale, zp, qmin, qmax);
        }
    }
}

/// Elements per group of a row of `len` elements (`None` or `Some(0)`: the whole row, at least 1).
#[inline(always)]
fn int_group_len(a: &IntArgs, len: usize) -> usize {
    match a.group {
        Some(g) if g > 0 => g,
        _ => len.max(1),
    }
}

/// The stored scale and the zero point (an integer in `[qmin, qmax]`, as `f32`; 0 when symmetric) of one group,
/// `calculate_qparams` as [`quantize_int_row`] documents it. The one definition, shared by [`quantize_int_row`]
/// and [`IntGrid`]. (A zero minimum or maximum may come with either sign: `-mn`, `max`, the differences and the
/// quotients below give the same scale and zero point for both.)
#[inline(always)]
fn int_group_params(chunk: &[f32], symmetric: bool, sd: ScaleDtype, qmin: f32, qmax: f32) -> (f32, f32) {
    let (mn, mx) = finite_min_max0(chunk);
    let (raw, zp) = if symmetric {
        ((-mn).max(mx) / ((qmax - qmin) / 2.0), 0.0f32)
    } else {
        let s = (mx - mn) / (qmax - qmin);
        let z = (qmin - mn / s).clamp(qmin, qmax);
        (s, if z.is_nan() { 0.0 } else { z.round_ties_even() })
    };
    let mut scale = sd.round(raw);
    if scale == 0.0 {
        scale = sd.eps();
    }
    (scale, zp)
}

/// The code of one element (`_quantize`): `rne(clamp(x/scale + zp, qmin, qmax))`, NaN read as 0.
#[inline(always)]
fn int_code(x: f32, scale: f32, zp: f32, qmin: f32, qmax: f32) -> i8 {
    // (x/scale + zp) as `_quantize` evaluates it: two f32 roundings. ±Inf clamps to qmin/qmax; the scale is
    // finite and positive, so `v` is never NaN. Rounded through the float adder (`nearest_int`, ties to even)
    // rather than `round_ties_even`, which the baseline x86-64 build compiles to a `rintf` call per element.
    let x = if x.is_nan() { 0.0 } else { x };
    crate::common::nearest_int((x / scale + zp).clamp(qmin, qmax)) as i8
}

/// Integer quantization seen one group at a time ([`crate::gptq::Grid`]): the parameters of a group are those of
/// [`quantize_int_row`] (computed once, from the original weights), the code of an element is its
/// `_quantize`. Codes are bytes: the `i8` code in two's complement.
///
/// The value of a code is what compressed-tensors' fake quantization gives (`forward_helpers.py`
/// `_quantize_dequantize`, the QDQ that llm-compressor's GPTQ propagates the error of): `(q − zp) · scale`
/// computed **in the scale dtype**, i.e. `sd.round((q − zp) · scale)` (the `f32` product is exact, so this is one
/// rounding, as torch's BF16/F16 multiply). With F32 scales it is exactly [`dequantize_int_row`]; with BF16/F16
/// scales it is also what a runtime that dequantizes in the activation dtype (vLLM's W4A16 kernels) computes.
/// Bits outside 1..=8 give no parameters (`row_params` is empty), which `gptq::solve` reports as an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntGrid {
    pub args: IntArgs,
    pub sd: ScaleDtype,
}

impl crate::gptq::Grid for IntGrid {
    fn group(&self) -> usize {
        // One group per row: a group longer than any row.
        int_group_len(&self.args, usize::MAX)
    }

    fn row_params(&self, row: &[f32]) -> Vec<crate::gptq::GroupParams> {
        let Some((qmin, qmax)) = int_range(self.args.bits) else { return Vec::new() };
        let g = int_group_len(&self.args, row.len());
        row.chunks(g)
            .map(|chunk| {
                let (scale, zp) = int_group_params(chunk, self.args.symmetric, self.sd, qmin, qmax);
                crate::gptq::GroupParams { scale, zero: zp, q_scale: scale, q_zero: zp }
            })
            .collect()
    }

    #[inline]
    fn quantize(&self, x: f32, p: &crate::gptq::GroupParams) -> (u8, f32) {
        let (qmin, qmax) = int_range(self.args.bits).unwrap_or((0.0, 0.0));
        let c = int_code(x, p.q_scale, p.q_zero, qmin, qmax) as u8;
        (c, self.dequantize(c, p))
    }

    #[inline]
    fn dequantize(&self, code: u8, p: &crate::gptq::GroupParams) -> f32 {
        self.sd.round((f32::from(code as i8) - p.zero) * p.scale)
    }

    fn row_grid(&self) -> Option<crate::gptq::RowGrid<'_>> {
        Some(crate::gptq::RowGrid::Int(self))
    }

    /// [`Grid::quantize`](crate::gptq::Grid::quantize) element by element, the scale dtype's rounding chosen once
    /// per group and the outputs written in place (the loop the AWQ search spends its time in).
    fn quantize_group(&self, xs: &[f32], p: &crate::gptq::GroupParams, codes: &mut Vec<u8>, dequant: &mut Vec<f32>) {
        let (qmin, qmax) = int_range(self.args.bits).unwrap_or((0.0, 0.0));
        let (c0, d0) = (codes.len(), dequant.len());
        codes.resize(c0 + xs.len(), 0);
        dequant.resize(d0 + xs.len(), 0.0);
        let (cs, ds) = (&mut codes[c0..], &mut dequant[d0..]);
        #[inline(always)]
        fn fill(
            xs: &[f32],
            p: &crate::gptq::GroupParams,
            (qmin, qmax): (f32, f32),
            cs: &mut [u8],
            ds: &mut [f32],
            round: impl Fn(f32) -> f32,
        ) {
            for ((&x, c), d) in xs.iter().zip(cs).zip(ds) {
                let q = int_code(x, p.q_scale, p.q_zero, qmin, qmax);
                *c = q as u8;
                *d = round((f32::from(q) - p.zero) * p.scale);
            }
        }
        match self.sd {
            ScaleDtype::F32 => fill(xs, p, (qmin, qmax), cs, ds, |v| ScaleDtype::F32.round(v)),
            ScaleDtype::F16 => fill(xs, p, (qmin, qmax), cs, ds, |v| ScaleDtype::F16.round(v)),
            ScaleDtype::BF16 => fill(xs, p, (qmin, qmax), cs, ds, |v| ScaleDtype::BF16.round(v)),
        }
    }
}

impl IntGrid {
    /// Quantizes `row` and replaces each element by the value its code dequantizes to: per group of the row,
    /// exactly [`Grid::row_params`](crate::gptq::Grid::row_params) then the `dequant` of
    /// [`Grid::quantize_group`](crate::gptq::Grid::quantize_group), without the codes (AWQ's search needs only
    /// `Q(W·s)`). `false`, with `row` untouched, for bits outside 1..=8 (no parameters). `inline(always)` with
    /// everything it calls, so that `sling_kernels` builds this same code for AVX2 (`awq::delta`).
    #[inline(always)]
    pub fn qdq_row(&self, row: &mut [f32]) -> bool {
        let Some((qmin, qmax)) = int_range(self.args.bits) else { return false };
        let g = int_group_len(&self.args, row.len());
        #[inline(always)]
        fn each(row: &mut [f32], g: usize, a: &IntArgs, sd: ScaleDtype, q: (f32, f32), round: impl Fn(f32) -> f32) {
            for chunk in row.chunks_mut(g) {
                let (scale, zp) = int_group_params(chunk, a.symmetric, sd, q.0, q.1);
                for x in chunk.iter_mut() {
                    let c = int_code(*x, scale, zp, q.0, q.1);
                    *x = round((f32::from(c) - zp) * scale);
                }
            }
        }
        let (a, q) = (&self.args, (qmin, qmax));
        match self.sd {
            ScaleDtype::F32 => each(row, g, a, self.sd, q, |v| ScaleDtype::F32.round(v)),
            ScaleDtype::F16 => each(row, g, a, self.sd, q, |v| ScaleDtype::F16.round(v)),
            ScaleDtype::BF16 => each(row, g, a, self.sd, q, |v| ScaleDtype::BF16.round(v)),
        }
        true
    }
}

/// `(q − zp) · scale` per element in `f32` (`forward_helpers.py` `_dequantize`), appended to `out`. Element `i`
/// uses `scales[i / group]` and, if given, `zeros[i / group]`; `zeros = None` is symmetric. `group = 0` means one
/// group for the whole slice. A missing scale or zero point reads as 0.
pub fn dequantize_int_row(codes: &[i8], scales: &[f32], zeros: Option<&[i8]>, group: usize, out: &mut Vec<f32>) {
    let g = if group == 0 { codes.len().max(1) } else { group };
    out.reserve(codes.len());
    for (i, &q) in codes.iter().enumerate() {
        let s = scales.get(i / g).copied().unwrap_or(0.0);
        let z = zeros.and_then(|z| z.get(i / g)).copied().unwrap_or(0);
        out.push((f32::from(q) - f32::from(z)) * s);
    }
}

/// Appends `vals` (each `bits` wide, higher bits masked off) as one LSB-first little-endian bitstream: value `i`
/// at bits `[i·b, i·b+b)`, straddling words where needed, `ceil(n·b/32)` words, padding bits 0. The layout of
/// compressed-tensors `pack_to_int32` (≥ 0.17.0) and of MLX's affine `weight`. `bits` must be 1..=8 (caller checks).
#[inline(always)]
pub(crate) fn pack_bits(vals: impl ExactSizeIterator<Item = u32>, bits: u32, out: &mut Vec<u32>) {
    pack_bits_iter(vals, bits, out)
}

/// [`pack_bits`] of a slice: for 1, 2, 4 and 8 bits one word per `32/bits` values with the shifts known at compile
/// time (a loop the compiler unrolls and vectorises), else [`pack_bits`]. The same words.
#[inline(always)]
pub(crate) fn pack_bits_slice(vals: &[u32], bits: u32, out: &mut Vec<u32>) {
    #[inline(always)]
    fn whole<const B: u32>(vals: &[u32], out: &mut Vec<u32>) {
        let per = (32 / B) as usize;
        let start = out.len();
        out.resize(start + vals.len().div_ceil(per), 0);
        for (w, c) in out[start..].iter_mut().zip(vals.chunks(per)) {
            let mut word = 0u32;
            for (k, &u) in c.iter().enumerate() {
                word |= (u & ((1u32 << B) - 1)) << (k as u32 * B);
            }
            *w = word;
        }
    }
    match bits {
        1 => whole::<1>(vals, out),
        2 => whole::<2>(vals, out),
        4 => whole::<4>(vals, out),
        8 => whole::<8>(vals, out),
        _ => pack_bits_iter(vals.iter().copied(), bits, out),
    }
}

#[inline(always)]
fn pack_bits_iter(vals: impl ExactSizeIterator<Item = u32>, bits: u32, out: &mut Vec<u32>) {
    let mask = (1u32 << bits) - 1;
    if 32 % bits == 0 {
        // 1, 2, 4, 8 bits: whole values per word, one word per `32/bits` values (the same bitstream, no straddling).
        let per = 32 / bits;
        out.reserve((vals.len() * bits as usize).div_ceil(32));
        let (mut word, mut k) = (0u32, 0u32);
        for u in vals {
            word |= (u & mask) << (k * bits);
            k += 1;
            if k == per {
                out.push(word);
                (word, k) = (0, 0);
            }
        }
        if k > 0 {
            out.push(word);
        }
        return;
    }
    let bits = bits as usize;
    let start = out.len();
    out.resize(start + (vals.len() * bits).div_ceil(32), 0);
    let words = &mut out[start..];
    for (i, u) in vals.enumerate() {
        let u = u & mask;
        let bit = i * bits;
        let (w, off) = (bit / 32, bit % 32);
        if let Some(word) = words.get_mut(w) {
            *word |= u << off;
        }
        if off + bits > 32 {
            if let Some(word) = words.get_mut(w + 1) {
                *word |= u >> (32 - off);
            }
        }
    }
}

/// Reads `n` values of `bits` (1..=8, caller checks) from an LSB-first bitstream; bits past the end read as 0.
pub(crate) fn unpack_bits(words: &[u32], bits: u32, n: usize, mut f: impl FnMut(u32)) {
    let bits = bits as usize;
    let mask = (1u64 << bits) - 1;
    for i in 0..n {
        let bit = i * bits;
        let (w, off) = (bit / 32, bit % 32);
        let lo = u64::from(words.get(w).copied().unwrap_or(0));
        let hi = u64::from(words.get(w + 1).copied().unwrap_or(0));
        f((((lo | (hi << 32)) >> off) & mask) as u32);
    }
}

/// `pack-quantized` weight row (compressed-tensors 0.20.1 `compressors/pack_quantized/helpers.py`
/// `pack_to_int32`, `packed_dim=1`, §1.3): `u = q + 2^(b−1)`, LSB-first bitstream into `ceil(cols·b/32)` words
/// (stored as I32 bit patterns). Codes outside `[−2^(b−1), 2^(b−1)−1]` are masked to `b` bits (the library would
/// let them spill into the neighbours' bits). Bits outside 1..=8: nothing appended.
pub fn pack_row(codes: &[i8], bits: u32, out: &mut Vec<u32>) {
    if !(1..=8).contains(&bits) {
        return;
    }
    let offset = 1i32 << (bits - 1);
    pack_bits(codes.iter().map(|&q| (i32::from(q) + offset) as u32), bits, out);
}

/// Inverse of [`pack_row`] (`unpack_from_int32`): appends `cols` codes; words missing from `words` read as 0.
/// Bits outside 1..=8: nothing appended.
pub fn unpack_row(words: &[u32], bits: u32, cols: usize, out: &mut Vec<i8>) {
    if !(1..=8).contains(&bits) {
        return;
    }
    let offset = 1i32 << (bits - 1);
    unpack_bits(words, bits, cols, |u| out.push((u as i32 - offset) as i8));
}

/// Asymmetric zero points `[rows, ngroups]` (row-major) packed along dim 0 (`pack_to_int32(zp, b,
/// packed_dim=0)`: the transpose packed row-wise, transposed back), with the same `+2^(b−1)` offset. Returns
/// `[ceil(rows·b/32), ngroups]` words, row-major (§1.2 `weight_zero_point` I32). Missing entries read as 0; bits
/// outside 1..=8 give an empty vector.
pub fn pack_zero_points(zp: &[i8], rows: usize, ngroups: usize, bits: u32) -> Vec<u32> {
    if !(1..=8).contains(&bits) {
        return Vec::new();
    }
    let wrows = rows.saturating_mul(bits as usize).div_ceil(32);
    let Some(n) = wrows.checked_mul(ngroups) else { return Vec::new() };
    let mut out = vec![0u32; n];
    let mut col = Vec::with_capacity(rows);
    let mut words = Vec::with_capacity(wrows);
    for j in 0..ngroups {
        col.clear();
        col.extend((0..rows).map(|r| zp.get(r * ngroups + j).copied().unwrap_or(0)));
        words.clear();
        pack_row(&col, bits, &mut words);
        for (w, &v) in words.iter().enumerate() {
            out[w * ngroups + j] = v;
        }
    }
    out
}

/// Inverse of [`pack_zero_points`]: `[rows, ngroups]` zero points, row-major. Missing words read as 0; bits outside
/// 1..=8 give an empty vector.
pub fn unpack_zero_points(words: &[u32], rows: usize, ngroups: usize, bits: u32) -> Vec<i8> {
    if !(1..=8).contains(&bits) {
        return Vec::new();
    }
    let wrows = rows.saturating_mul(bits as usize).div_ceil(32);
    let Some(n) = rows.checked_mul(ngroups) else { return Vec::new() };
    let mut out = vec![0i8; n];
    let mut col_words = Vec::with_capacity(wrows);
    let mut col = Vec::with_capacity(rows);
    for j in 0..ngroups {
        col_words.clear();
        col_words.extend((0..wrows).map(|w| words.get(w * ngroups + j).copied().unwrap_or(0)));
        col.clear();
        unpack_row(&col_words, bits, rows, &mut col);
        for (r, &z) in col.iter().enumerate() {
            out[r * ngroups + j] = z;
        }
    }
    out
}

/// FP8 E4M3FN as torch 2.15's CPU cast computes it (§3.4, tested there and in `tests/ct_mlx_vectors.rs`): round
/// to nearest even including subnormals (2^-10 → 0x00, 1.5·2^-9 → 0x02), **saturating**: every |x| > 448, ±Inf
/// included, becomes ±448 (0x7e/0xfe); NaN becomes 0x7f with the input's sign bit (torch gives 0xff for a
/// negative NaN). −0 → 0x80.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | 0x7f;
    }
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7e;
    }
    if a < 0.015_625 {
        // subnormal range (below 2^-6): multiples of 2^-9; a·512 is exact and < 8, and 8 is the smallest normal.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // normal: keep 3 of the 23 mantissa bits, RNE on the bit pattern; a carry bumps the exponent as it should.
    let b = a.to_bits();
    let r = (b + 0x7_ffff + ((b >> 20) & 1)) >> 20;
    sign | (r - (120 << 3)).min(0x7e) as u8
}

/// FP8 per-channel (`float-quantized`, strategy channel, §1.3): `scale = sd.round(amax/448)` (0 → `sd.eps()`),
/// codes [`fp8_code`]`(x, scale)`. Appends one code per element and returns the scale as stored. Empty row:
/// nothing appended, returns `sd.eps()`.
pub fn quantize_fp8_row(row: &[f32], sd: ScaleDtype, codes: &mut Vec<u8>) -> f32 {
    let scale = fp8_scale(finite_amax(row), sd);
    codes.extend(row.iter().map(|&x| fp8_code(x, scale)));
    scale
}

/// One FP8 element as compressed-tensors' `_quantize` computes it: `e4m3(x/scale + 0)`. The `+ 0` is the
/// symmetric zero point, which is always there (`initialize_qparams(force_zero_point=True)` registers a zero
/// `weight_zero_point` that the compressor passes to `quantize` before dropping it from the file): it turns a −0
/// quotient (−0 input, or a negative quotient that underflows) into +0, so those store 0x00, not 0x80. The clamp to
/// ±448 before the cast is the cast's own saturation.
#[inline]
pub fn fp8_code(x: f32, scale: f32) -> u8 {
    f32_to_e4m3(x / scale + 0.0)
}

/// `calculate_qparams` for symmetric FP8: `amax / ((448 − (−448))/2)`, rounded to `sd`, zero → eps.
fn fp8_scale(amax: f32, sd: ScaleDtype) -> f32 {
    let s = sd.round(amax / 448.0);
    if s == 0.0 {
        sd.eps()
    } else {
        s
    }
}

/// FP8 block (`float-quantized`, strategy block, e.g. `FP8_BLOCK` 128×128; `forward_helpers.py` `_process_block`):
/// `vals` is `rows × cols` row-major; tiles of `block.0 × block.1` start at row 0 / column 0, partial tiles at the
/// edges (compressed-tensors zero-pads them, which does not change a tile's amax). Per tile `scale =
/// sd.round(amax/448)` (0 → `sd.eps()`); appends the codes (`rows·cols`, row-major) and the scales
/// (`[ceil(rows/bh), ceil(cols/bw)]`, row-major). A zero block dimension appends nothing; missing values read as 0.
pub fn quantize_fp8_block(
    vals: &[f32],
    rows: usize,
    cols: usize,
    block: (usize, usize),
    sd: ScaleDtype,
    codes: &mut Vec<u8>,
    scales: &mut Vec<f32>,
) {
    let (bh, bw) = block;
    if bh == 0 || bw == 0 {
        return;
    }
    let (nbr, nbc) = (rows.div_ceil(bh), cols.div_ceil(bw));
    let get = |r: usize, c: usize| {
        r.checked_mul(cols).and_then(|i| i.checked_add(c)).and_then(|i| vals.get(i)).copied().unwrap_or(0.0)
    };
    let mut tile_scales = Vec::with_capacity(nbr * nbc);
    for br in 0..nbr {
        for bc in 0..nbc {
            let mut amax = 0.0f32;
            for r in br * bh..((br + 1) * bh).min(rows) {
                for c in bc * bw..((bc + 1) * bw).min(cols) {
                    let v = get(r, c);
                    if v.is_finite() {
                        amax = amax.max(v.abs());
                    }
                }
            }
            tile_scales.push(fp8_scale(amax, sd));
        }
    }
    for r in 0..rows {
        let srow = &tile_scales[(r / bh) * nbc..(r / bh + 1) * nbc];
        for c in 0..cols {
            codes.push(fp8_code(get(r, c), srow[c / bw]));
        }
    }
    scales.extend_from_slice(&tile_scales);
}

/// `codes · scale` per element (`_dequantize`), appended to `out`.
pub fn dequantize_fp8(codes: &[u8], scale: f32, out: &mut Vec<f32>) {
    out.extend(codes.iter().map(|&c| e4m3_to_f32(c) * scale));
}

/// E2M1 magnitudes by index (`compressors/nvfp4/helpers.py` `kE2M1ToFloat`).
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The 4-bit E2M1 code of `x` as compressed-tensors 0.20.1 rounds and packs it on CPU
/// (`quantization/utils/fp4_utils.py` `cast_to_fp4` then `compressors/nvfp4/helpers.py` `pack_fp4_to_uint8`,
/// §1.4): |x| ≤ 0.25 → 0, < 0.75 → 0.5, ≤ 1.25 → 1, < 1.75 → 1.5, ≤ 2.5 → 2, < 3.5 → 3, ≤ 5 → 4, else 6 (ties to
/// even on the grid, saturating at 6, so the ±6 clamp before it changes nothing); code = sign<<3 | index. The sign
/// comes from `x < 0`: negatives that round to 0 give **0x8**, −0 gives 0 (`torch.sign(−0.0)` is 0), NaN gives 0
/// (torch: sign(NaN) = 0 and NaN → int8 is 0).
pub fn f32_to_e2m1_ct(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = if x < 0.0 { 8 } else { 0 };
    let a = x.abs();
    let idx = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | idx
}

/// The value of a 4-bit E2M1 code (only the low nibble is read); 0x8 is −0.
pub fn e2m1_to_f32(code: u8) -> f32 {
    let m = E2M1[usize::from(code & 7)];
    if code & 8 != 0 {
        -m
    } else {
        m
    }
}

/// NVFP4 `weight_global_scale` (`helpers.py` `generate_gparam`, §1.4): `448·6 / amax(tensor)` written as a Python
/// float divided by an `f32` tensor, which torch evaluates as `amax.reciprocal() * 2688` (`Tensor.__rtruediv__`):
/// two `f32` roundings, so the result can be 1 ulp away from the correctly rounded quotient (the spec's "2688/amax
/// in F32" is off there; the vectors pin the library's bits). The amax is clamped below to `f32::MIN_POSITIVE`
/// (`finfo.tiny`), and a NaN or ±Inf result is replaced by 1.0 (`nan_to_num`, the "uncalibrated experts" rule): so
/// an all-zero tensor (2688·2^126 overflows) and a NaN amax give 1.0. An infinite amax gives 0.0, as in the library
/// (pass [`finite_amax`] to avoid it).
pub fn nvfp4_global_scale(tensor_amax: f32) -> f32 {
    if tensor_amax.is_nan() {
        return 1.0;
    }
    let g = (1.0 / tensor_amax.max(f32::MIN_POSITIVE)) * 2688.0;
    if g.is_finite() {
        g
    } else {
        1.0
    }
}

/// Packs FP4 codes two per byte, element `2k` in the low nibble (`pack_fp4_to_uint8`); an odd last code gets a
/// zero high nibble.
fn pack_nibbles(codes: &[u8], out: &mut Vec<u8>) {
    out.extend(codes.chunks(2).map(|p| (p[0] & 0xf) | (p.get(1).copied().unwrap_or(0) << 4)));
}

/// Appends the E2M1 codes of `chunk / scale`, packed.
fn push_fp4_group(chunk: &[f32], scale: f32, packed_codes: &mut Vec<u8>) {
    packed_codes.extend(chunk.iter().map(|&x| f32_to_e2m1_ct(x / scale)));
}

/// NVFP4 one row (`nvfp4-pack-quantized`; `calculate_qparams` with the `NVFP4A16` args then
/// `quantize_and_pack_fp4`, §1.4), per group of 16: scale byte `e4m3(clamp(global · (amax_g/6), ±448))` (product in
/// `f32`; a scale that is 0 in E4M3 becomes 0x20 = 0.125, `_get_dtype_eps` for FP8), elements
/// `e2m1_ct(x / (e4m3_to_f32(scale)/global))`, packed two per byte (element `2k` low nibble). Appends `cols/2`
/// bytes and `cols/16` scale bytes. compressed-tensors requires `cols % 16 == 0`; otherwise the last group is
/// shorter and an odd last element takes a low nibble alone. On BF16 weights the library computes `amax_g/6` in
/// BF16 (§1.4 `bf16(amax_g/6)`); with `f32` input the definitions coincide.
pub fn quantize_nvfp4_row(row: &[f32], global: f32, packed: &mut Vec<u8>, scales: &mut Vec<u8>) {
    let mut codes = Vec::with_capacity(row.len());
    for chunk in row.chunks(16) {
        let mut byte = f32_to_e4m3(global * (finite_amax(chunk) / 6.0));
        if byte & 0x7f == 0 {
            byte = 0x20;
        }
        scales.push(byte);
        push_fp4_group(chunk, e4m3_to_f32(byte) / global, &mut codes);
    }
    pack_nibbles(&codes, packed);
}

/// `e2m1 · (e4m3_to_f32(scale) / global)` per element (`_dequantize` with a global scale), appended to `out`:
/// two elements per byte, element `i` with `scales[i/16]` (a missing scale reads as 0).
pub fn dequantize_nvfp4_row(packed: &[u8], scales: &[u8], global: f32, out: &mut Vec<f32>) {
    out.reserve(packed.len() * 2);
    for (i, &b) in packed.iter().enumerate() {
        let s = scales.get(2 * i / 16).map_or(0.0, |&s| e4m3_to_f32(s)) / global;
        out.push(e2m1_to_f32(b) * s);
        out.push(e2m1_to_f32(b >> 4) * s);
    }
}

/// The compressed-tensors 0.20.1 MX scale byte of a group amax (`quantization/utils/mxfp_utils.py`
/// `generate_mx_scales(num_bits=4)` on an `f32` amax, then the U8 cast of `calculate_qparams` step 3):
/// `round_to_power_2` adds `1 << (23 − 1 − 1)` to the float bits and keeps sign+exponent (rounds up iff the
/// mantissa ≥ 1.75), then `127 + floor(log2(p)) − 2`, clamped to `[0, 255]`. An all-zero group (log2 0 = −inf)
/// stores 0; an amax ≥ 1.75·2^127 rounds to +Inf and stores 255.
pub fn mx_scale_byte(amax: f32) -> u8 {
    let p2 = (amax.abs().to_bits() + (1 << 21)) & 0xff80_0000;
    match p2 >> 23 {
        0 => 0,
        255 => 255,
        e => e.saturating_sub(2) as u8,
    }
}

/// MXFP4 one row (`mxfp4-pack-quantized`, §1.4, §3.2): per 32 elements one E8M0 scale byte
/// [`mx_scale_byte`]`(amax)`, elements `e2m1_ct(x / 2^(scale−127))` (`maybe_convert_from_mx_exp` then `_quantize`;
/// byte 0 divides by the subnormal 2^-127, byte 255 by +Inf), packed two per byte, low nibble first. Appends
/// `cols/2` bytes and `cols/32` scales. compressed-tensors requires `cols % 32 == 0`; otherwise the last group
/// is shorter. This is compressed-tensors' rounding (threshold 1.75, then −2), not OCP's floor nor MLX's ceil.
pub fn quantize_mxfp4_row(row: &[f32], packed: &mut Vec<u8>, scales: &mut Vec<u8>) {
    let mut codes = Vec::with_capacity(row.len());
    for chunk in row.chunks(32) {
        let byte = mx_scale_byte(finite_amax(chunk));
        scales.push(byte);
        push_fp4_group(chunk, e8m0_to_fp32(byte), &mut codes);
    }
    pack_nibbles(&codes, packed);
}

/// `e2m1 · 2^(scale−127)` per element (`decompress_mx_scale`, `_dequantize`), element `i` with `scales[i/32]`
/// (byte 255 gives +Inf, so a 0 element becomes NaN; a missing scale reads as 0).
pub fn dequantize_mxfp4_row(packed: &[u8], scales: &[u8], out: &mut Vec<f32>) {
    out.reserve(packed.len() * 2);
    for (i, &b) in packed.iter().enumerate() {
        let s = scales.get(2 * i / 32).map_or(0.0, |&s| e8m0_to_fp32(s));
        out.push(e2m1_to_f32(b) * s);
        out.push(e2m1_to_f32(b >> 4) * s);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantize_group_is_quantize_per_element() {
        use crate::gptq::Grid;
        let xs: Vec<f32> = (0..300)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .chain([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-30, 3.4e38])
            .collect();
        for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
            for (bits, symmetric) in [(4, true), (4, false), (8, true), (2, false)] {
                let g = IntGrid { args: IntArgs { bits, symmetric, group: Some(32) }, sd };
                for p in g.row_params(&xs[..256]) {
                    let (mut c, mut d) = (vec![9u8], vec![9f32]);
                    g.quantize_group(&xs, &p, &mut c, &mut d);
                    for (k, &x) in xs.iter().enumerate() {
                        let (wc, wd) = g.quantize(x, &p);
                        assert_eq!((c[k + 1], d[k + 1].to_bits()), (wc, wd.to_bits()), "{sd:?} {bits} {symmetric} {x}");
                    }
                }
            }
        }
    }

    use super::*;

    #[test]
    fn pack_bits_slice_is_pack_bits() {
        let vals: Vec<u32> = (0..1000u32).map(|i| i.wrapping_mul(2654435761) >> 7).collect();
        for bits in 1..=8 {
            for n in [0, 1, 7, 8, 9, 31, 32, 33, 255, 1000] {
                let (mut a, mut b) = (vec![5u32], vec![5u32]);
                pack_bits(vals[..n].iter().copied(), bits, &mut a);
                pack_bits_slice(&vals[..n], bits, &mut b);
                assert_eq!(a, b, "bits {bits}, {n} values");
            }
        }
    }
    use proptest::prelude::*;

    fn hostile_rows() -> Vec<Vec<f32>> {
        let mut rows = vec![
            vec![],
            vec![0.0; 64],
            vec![-0.0; 64],
            vec![0.37; 64],
            vec![-5.0; 64],
            vec![f32::NAN; 64],
            vec![f32::INFINITY; 64],
            vec![f32::NEG_INFINITY; 64],
            (0..64).map(|i| f32::from_bits(i + 1)).collect(), // subnormals
            (0..64).map(|i| -1e-30 * (i as f32 + 1.0)).collect(),
            vec![f32::MAX, f32::MIN, 0.0, 1.0],
            vec![3.0e38; 40],
            vec![1.0],
        ];
        let mut outlier = vec![0.001f32; 64];
        outlier[17] = 1000.0;
        rows.push(outlier);
        let mut mixed: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) * 0.1).collect();
        mixed[3] = f32::NAN;
        mixed[9] = f32::INFINITY;
        mixed[10] = f32::NEG_INFINITY;
        rows.push(mixed);
        rows
    }

    #[test]
    fn scale_dtype_rounding_eps_and_bytes() {
        assert_eq!(ScaleDtype::BF16.round(1.0 + 1.0 / 256.0), 1.0); // tie → even
        assert_eq!(ScaleDtype::BF16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(ScaleDtype::F16.round(1e-9), 0.0);
        assert_eq!(ScaleDtype::F16.round(1e6), 65504.0);
        assert_eq!(ScaleDtype::F16.round(f32::INFINITY), 65504.0);
        assert_eq!(ScaleDtype::BF16.round(f32::NEG_INFINITY), -bf16::MAX.to_f32());
        assert_eq!(ScaleDtype::F32.round(f32::INFINITY), f32::MAX);
        assert!(ScaleDtype::BF16.round(f32::NAN).is_nan());
        assert_eq!(ScaleDtype::BF16.eps(), 0.0078125);
        assert_eq!(ScaleDtype::F16.eps(), 0.0009765625);
        assert_eq!(ScaleDtype::F32.eps(), f32::EPSILON);
        let mut b = Vec::new();
        ScaleDtype::BF16.put(1.0, &mut b);
        ScaleDtype::F16.put(1.0, &mut b);
        ScaleDtype::F32.put(1.0, &mut b);
        assert_eq!(b, [0x80, 0x3f, 0x00, 0x3c, 0, 0, 0x80, 0x3f]);
    }

    #[test]
    fn pack_known_layouts() {
        // int4: element i at bits 4i, first in the low nibble; q+8.
        let codes: Vec<i8> = (0..8).map(|i| i as i8 - 8).collect();
        let mut w = Vec::new();
        pack_row(&codes, 4, &mut w);
        assert_eq!(w, [0x7654_3210]);
        // int3: 11 values straddle into the second word; padding 0.
        let codes = [3i8; 11]; // u = 7
        let mut w = Vec::new();
        pack_row(&codes, 3, &mut w);
        assert_eq!(w, [0xffff_ffff, 0x1]);
        let mut back = Vec::new();
        unpack_row(&w, 3, 11, &mut back);
        assert_eq!(back, codes);
        // invalid widths: nothing
        let mut w = Vec::new();
        pack_row(&codes, 0, &mut w);
        pack_row(&codes, 9, &mut w);
        assert!(w.is_empty());
        assert!(pack_zero_points(&[1], 1, 1, 0).is_empty());
    }

    #[test]
    fn e4m3_all_codes_round_trip_and_known_values() {
        for c in 0..=255u8 {
            let v = e4m3_to_f32(c);
            if v.is_nan() {
                assert_eq!(f32_to_e4m3(v) & 0x7f, 0x7f);
                continue;
            }
            assert_eq!(f32_to_e4m3(v), c, "code {c:#x} value {v}");
        }
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(f32_to_e4m3(2.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        for x in [464.0, 480.0, 500.0, 1e9, f32::INFINITY, f32::MAX] {
            assert_eq!(f32_to_e4m3(x), 0x7e);
            assert_eq!(f32_to_e4m3(-x), 0xfe);
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0xff);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        // just below the smallest normal rounds up into it
        assert_eq!(f32_to_e4m3(0.015_624), 0x08);
    }

    #[test]
    fn e2m1_thresholds_and_ties() {
        let cases = [
            (0.25, 0),
            (0.2500001, 1),
            (0.75, 2),
            (0.7499999, 1),
            (1.25, 2),
            (1.2500001, 3),
            (1.75, 4),
            (2.5, 4),
            (2.5000002, 5),
            (3.5, 6),
            (5.0, 6),
            (5.0000005, 7),
            (100.0, 7),
            (f32::INFINITY, 7),
        ];
        for (x, c) in cases {
            assert_eq!(f32_to_e2m1_ct(x), c, "{x}");
            assert_eq!(f32_to_e2m1_ct(-x), c | 8, "-{x}");
        }
        assert_eq!(f32_to_e2m1_ct(-0.1), 0x8);
        assert_eq!(f32_to_e2m1_ct(-0.0), 0);
        assert_eq!(f32_to_e2m1_ct(f32::NAN), 0);
        for c in 0..16u8 {
            let v = e2m1_to_f32(c);
            let back = f32_to_e2m1_ct(v);
            // −0 reads back as +0 (torch.sign(−0.0) = 0)
            assert_eq!(back, if c == 8 { 0 } else { c });
        }
    }

    #[test]
    fn nvfp4_global_and_zero_groups() {
        assert_eq!(nvfp4_global_scale(0.0), 1.0);
        assert_eq!(nvfp4_global_scale(f32::NAN), 1.0);
        assert_eq!(nvfp4_global_scale(f32::INFINITY), 0.0);
        assert_eq!(nvfp4_global_scale(2688.0), 1.0);
        let (mut p, mut s) = (Vec::new(), Vec::new());
        quantize_nvfp4_row(&[0.0; 32], 1.0, &mut p, &mut s);
        assert_eq!(s, [0x20, 0x20]);
        assert!(p.iter().all(|&b| b == 0));
        // a group whose scale underflows E4M3 also gets 0.125
        let (mut p, mut s) = (Vec::new(), Vec::new());
        quantize_nvfp4_row(&[1e-6; 16], 1.0, &mut p, &mut s);
        assert_eq!(s, [0x20]);
    }

    #[test]
    fn mx_scale_rule() {
        assert_eq!(mx_scale_byte(0.0), 0);
        assert_eq!(mx_scale_byte(6.0), 127); // 6 = 1.5·2^2 → 2^2 → 127 + 2 − 2
        assert_eq!(mx_scale_byte(7.0), 128); // 1.75·2^2 rounds up to 2^3
        assert_eq!(mx_scale_byte(1.0), 125);
        assert_eq!(mx_scale_byte(f32::MAX), 255);
        assert_eq!(mx_scale_byte(f32::from_bits(1)), 0);
        assert_eq!(mx_scale_byte(f32::MIN_POSITIVE), 0);
        let (mut p, mut s) = (Vec::new(), Vec::new());
        quantize_mxfp4_row(&[0.0; 64], &mut p, &mut s);
        assert_eq!(s, [0, 0]);
        assert_eq!(p, [0; 32]);
    }

    #[test]
    fn int_all_zero_group_asym_has_zp_0_and_eps_scale() {
        let a = IntArgs { bits: 4, symmetric: false, group: Some(32) };
        let (mut c, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
        quantize_int_row(&[0.0; 32], &a, ScaleDtype::BF16, &mut c, &mut s, &mut z);
        assert_eq!(s, [0.0078125]);
        assert_eq!(z, [0]);
        assert!(c.iter().all(|&q| q == 0));
    }

    #[test]
    fn hostile_rows_do_not_panic_and_have_the_right_lengths() {
        for row in hostile_rows() {
            for bits in 0..=9 {
                for symmetric in [true, false] {
                    for group in [None, Some(0), Some(16), Some(32), Some(7)] {
                        for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
                            let a = IntArgs { bits, symmetric, group };
                            let (mut c, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
                            quantize_int_row(&row, &a, sd, &mut c, &mut s, &mut z);
                            if !(1..=8).contains(&bits) {
                                assert!(c.is_empty() && s.is_empty() && z.is_empty());
                                continue;
                            }
                            assert_eq!(c.len(), row.len());
                            assert!(s.iter().all(|v| v.is_finite() && *v > 0.0), "{s:?}");
                            let half = 1i32 << (bits - 1);
                            assert!(c.iter().all(|&q| (-half..half).contains(&i32::from(q))));
                            let g = group.filter(|&g| g > 0).unwrap_or(row.len().max(1));
                            let mut d = Vec::new();
                            dequantize_int_row(&c, &s, (!symmetric).then_some(&z[..]), g, &mut d);
                            assert_eq!(d.len(), row.len());
                            let mut w = Vec::new();
                            pack_row(&c, bits, &mut w);
                            let mut back = Vec::new();
                            unpack_row(&w, bits, c.len(), &mut back);
                            assert_eq!(back, c);
                        }
                    }
                }
            }
            for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
                let mut codes = Vec::new();
                let s = quantize_fp8_row(&row, sd, &mut codes);
                assert!(s.is_finite() && s > 0.0);
                assert_eq!(codes.len(), row.len());
                for bs in [(1, 1), (2, 16), (128, 128), (0, 4)] {
                    let (mut c, mut sc) = (Vec::new(), Vec::new());
                    let cols = 8;
                    let rows = row.len() / cols;
                    quantize_fp8_block(&row, rows, cols, bs, sd, &mut c, &mut sc);
                    if bs.0 > 0 {
                        assert_eq!(c.len(), rows * cols);
                        assert_eq!(sc.len(), rows.div_ceil(bs.0) * cols.div_ceil(bs.1));
                    }
                }
            }
            let (mut p, mut s) = (Vec::new(), Vec::new());
            let g = nvfp4_global_scale(finite_amax(&row));
            quantize_nvfp4_row(&row, g, &mut p, &mut s);
            assert_eq!(p.len(), row.len().div_ceil(2));
            assert_eq!(s.len(), row.len().div_ceil(16));
            let mut d = Vec::new();
            dequantize_nvfp4_row(&p, &s, g, &mut d);
            let (mut p, mut s) = (Vec::new(), Vec::new());
            quantize_mxfp4_row(&row, &mut p, &mut s);
            assert_eq!(p.len(), row.len().div_ceil(2));
            assert_eq!(s.len(), row.len().div_ceil(32));
            let mut d = Vec::new();
            dequantize_mxfp4_row(&p, &s, &mut d);
        }
        // shape mismatches read missing input as 0
        let (mut c, mut s) = (Vec::new(), Vec::new());
        quantize_fp8_block(&[1.0; 3], 4, 4, (2, 2), ScaleDtype::F32, &mut c, &mut s);
        assert_eq!((c.len(), s.len()), (16, 4));
        let mut out = Vec::new();
        unpack_row(&[], 4, 5, &mut out);
        assert_eq!(out, [-8; 5]);
        assert_eq!(unpack_zero_points(&[], 3, 2, 4), [-8; 6]);
    }

    #[test]
    fn nearest_int_is_round_ties_even() {
        use crate::common::nearest_int;
        for i in -(1 << 12)..(1 << 12) {
            for frac in [0.0f32, 0.25, 0.5, 0.499_999_97, 0.500_000_06, 0.75] {
                let v = i as f32 + frac;
                assert_eq!(nearest_int(v) as f32, v.round_ties_even(), "{v}");
                assert_eq!(nearest_int(-v) as f32, (-v).round_ties_even(), "{}", -v);
            }
        }
    }

    #[test]
    fn nan_and_inf_elements_follow_the_policy() {
        let row = [1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.5, 0.0, 0.25, -1.0];
        let a = IntArgs { bits: 4, symmetric: true, group: None };
        let (mut c, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
        quantize_int_row(&row, &a, ScaleDtype::F32, &mut c, &mut s, &mut z);
        assert_eq!(s, [1.0 / 7.5]);
        assert_eq!(&c[..4], &[7, 0, 7, -8]);
        let mut f = Vec::new();
        quantize_fp8_row(&row, ScaleDtype::F32, &mut f);
        assert_eq!(&f[1..4], &[0x7f, 0x7e, 0xfe]);
        let a = IntArgs { bits: 4, symmetric: false, group: None };
        let (mut c, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
        quantize_int_row(&row, &a, ScaleDtype::F32, &mut c, &mut s, &mut z);
        assert_eq!(c[1], z[0]);
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trip(bits in 1u32..=8, raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let half = 1i32 << (bits - 1);
            let codes: Vec<i8> = raw.iter().map(|&r| (i32::from(r) % (2 * half) - half) as i8).collect();
            let mut w = Vec::new();
            pack_row(&codes, bits, &mut w);
            prop_assert_eq!(w.len(), (codes.len() * bits as usize).div_ceil(32));
            let mut back = Vec::new();
            unpack_row(&w, bits, codes.len(), &mut back);
            prop_assert_eq!(&back, &codes);
            // padding bits are zero
            let used = codes.len() * bits as usize;
            if used % 32 != 0 {
                prop_assert_eq!(w[w.len() - 1] >> (used % 32), 0);
            }
        }

        #[test]
        fn zero_point_pack_round_trip(bits in 1u32..=8, rows in 0usize..70, ngroups in 0usize..5, seed in any::<u64>()) {
            let half = 1i64 << (bits - 1);
            let zp: Vec<i8> = (0..rows * ngroups)
                .map(|i| ((seed.wrapping_mul(6364136223846793005).wrapping_add((i as u64).wrapping_mul(1442695040888963407)) >> 33) as i64 % (2 * half) - half) as i8)
                .collect();
            let w = pack_zero_points(&zp, rows, ngroups, bits);
            prop_assert_eq!(w.len(), (rows * bits as usize).div_ceil(32) * ngroups);
            // each column equals pack_row of that column
            for j in 0..ngroups {
                let col: Vec<i8> = (0..rows).map(|r| zp[r * ngroups + j]).collect();
                let mut cw = Vec::new();
                pack_row(&col, bits, &mut cw);
                let got: Vec<u32> = (0..cw.len()).map(|k| w[k * ngroups + j]).collect();
                prop_assert_eq!(got, cw);
            }
            prop_assert_eq!(unpack_zero_points(&w, rows, ngroups, bits), zp);
        }

        #[test]
        fn int_dequant_error_within_half_a_step(
            bits in 2u32..=8,
            symmetric in any::<bool>(),
            x in proptest::collection::vec(-100f32..100.0, 1..96),
        ) {
            let a = IntArgs { bits, symmetric, group: Some(32) };
            let (mut c, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
            quantize_int_row(&x, &a, ScaleDtype::F32, &mut c, &mut s, &mut z);
            let mut d = Vec::new();
            dequantize_int_row(&c, &s, (!symmetric).then_some(&z[..]), 32, &mut d);
            for (i, (v, r)) in x.iter().zip(&d).enumerate() {
                let sc = s[i / 32];
                // half a step (the zero point's rounding can shift the grid by up to half a step at the
                // far end for asymmetric, where the range is [min, max] ⊂ grid ± scale/2 after rounding)
                let bound = if symmetric { 0.5 * sc } else { sc };
                // plus the f32 rounding of x/scale near |x/scale| ≈ 2^(b−1) (a few ulps of amax)
                prop_assert!((v - r).abs() <= bound + 1e-5 * finite_amax(&x), "{} {} {}", v, r, sc);
            }
        }

        #[test]
        fn int_symmetric_error_within_half_a_step_rounded_scales(
            bits in 2u32..=8,
            x in proptest::collection::vec(-100f32..100.0, 1..64),
        ) {
            for sd in [ScaleDtype::BF16, ScaleDtype::F16] {
                let a = IntArgs { bits, symmetric: true, group: None };
                let (mut c, mut s, mut z) = (Vec::new(), Vec::new(), Vec::new());
                quantize_int_row(&x, &a, sd, &mut c, &mut s, &mut z);
                let mut d = Vec::new();
                dequantize_int_row(&c, &s, None, 0, &mut d);
                let amax = finite_amax(&x);
                for (v, r) in x.iter().zip(&d) {
                    // within half a step, except where the rounded-down scale makes amax overshoot qmax
                    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
                    let clip = (amax - qmax * s[0]).max(0.0);
                    prop_assert!((v - r).abs() <= 0.5 * s[0] * (1.0 + 1e-5) + clip);
                }
            }
        }

        #[test]
        fn fp8_dequant_error_is_relative(x in proptest::collection::vec(-1e4f32..1e4, 1..64)) {
            let mut c = Vec::new();
            let s = quantize_fp8_row(&x, ScaleDtype::F32, &mut c);
            let mut d = Vec::new();
            dequantize_fp8(&c, s, &mut d);
            for (v, r) in x.iter().zip(&d) {
                // E4M3 keeps 3 mantissa bits (rel. 2^-4), subnormals absolute 2^-10 of the scale
                prop_assert!((v - r).abs() <= v.abs() / 16.0 + s * 2f32.powi(-10) + 1e-6 * v.abs());
            }
        }

        #[test]
        fn e4m3_is_nearest_even(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            prop_assume!(!x.is_nan());
            let c = f32_to_e4m3(x);
            let v = e4m3_to_f32(c);
            let a = x.abs().min(448.0);
            // no finite code is strictly nearer
            for k in 0..=0x7eu8 {
                let w = e4m3_to_f32(k);
                prop_assert!((w - a).abs() >= (v.abs() - a).abs());
                if (w - a).abs() == (v.abs() - a).abs() && w != v.abs() {
                    prop_assert_eq!(c & 1, 0, "tie must go to the even code");
                }
            }
        }

        #[test]
        fn nvfp4_and_mxfp4_round_trip_grid_values(idx in proptest::collection::vec(0u8..16, 32), e in 100u8..150) {
            // values already on an MX grid with amax hitting 6·2^k come back exactly
            let scale = e8m0_to_fp32(e);
            let mut row: Vec<f32> = idx.iter().map(|&c| e2m1_to_f32(c) * scale).collect();
            row[0] = 6.0 * scale;
            let (mut p, mut s) = (Vec::new(), Vec::new());
            quantize_mxfp4_row(&row, &mut p, &mut s);
            prop_assert_eq!(s[0], e);
            let mut d = Vec::new();
            dequantize_mxfp4_row(&p, &s, &mut d);
            for (a, b) in row.iter().zip(&d) {
                prop_assert_eq!(a.abs(), b.abs());
            }
        }
    }
}
