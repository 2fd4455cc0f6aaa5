//! `f32` rows to GGUF element bytes, bit-exact with the pinned llama.cpp / gguf-py.

use half::f16;
use sling_core::DType;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EncodeError {
    #[error("encoding to {0} is not implemented")]
    Unsupported(DType),
    #[error("row length {row} is not a multiple of the {dtype} block size {block}")]
    RowNotBlockMultiple { dtype: DType, row: usize, block: usize },
    #[error("importance weights for {dtype} have {got} values, the rows have {row}")]
    ImatrixLength { dtype: DType, row: usize, got: usize },
    /// `ggml_quantize_requires_imatrix`: ggml asserts that importance weights are given for this type.
    #[error("quantizing to {0} requires importance weights (an imatrix), as in llama.cpp")]
    ImatrixRequired(DType),
}

/// `ggml_compute_fp32_to_bf16` (ggml-impl.h): quiet NaNs, round to nearest even, no flush to zero.
/// gguf-py's `quants.BF16` is the same function.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + 0x7fff + ((u >> 16) & 1) as u64) >> 16) as u16
}

/// IEEE binary16 round-to-nearest-even, as numpy's `astype(float16)` (the converter's F16 path)
/// and `ggml_compute_fp32_to_fp16` compute it for finite values and infinities.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// C `roundf` (half away from zero, gguf-py `np_roundf`) converted to an integer the way x86's
/// `cvttss2si` does: NaN, ±Inf and |x| >= 2^31 give `i32::MIN` (whose low byte, what an `int8_t`
/// store keeps, is 0). Q8_0 meets those only in a block whose scale is so small (amax < ~4e-37) that
/// `1/d` overflows; the stored f16 scale is then 0 anyway. `f32::round` is a libm call on baseline
/// x86-64; truncation plus an exact fraction test is several times faster and gives the same result
/// (tested against `f32::round`).
#[inline(always)]
pub fn roundf_i32(x: f32) -> i32 {
    if x.is_nan() || x.abs() >= 2_147_483_648.0 {
        return i32::MIN;
    }
    let i = x as i32;
    let frac = x - i as f32; // exact: x and i share the exponent range, |x| < 2^31
    i + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// gguf-py's `Q8_0.quantize_blocks` (`convert_hf_to_gguf.py --outtype q8_0`), which is ggml's
/// `quantize_row_q8_0_ref` except in a block holding a NaN ([`quantize_row_q8_0_ggml`]).
/// The scalar reference; `sling-kernels` compiles the same body for wider vector units.
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) {
    quantize_row_q8_0_body(x, out)
}

/// The body of [`quantize_row_q8_0`], always inlined so that a caller compiled with
/// `#[target_feature]` vectorises it for that target. Element-wise IEEE operations only (no FMA,
/// no reassociation), so every instantiation gives the same bits.
#[inline(always)]
pub fn quantize_row_q8_0_body(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + x.len() / 32 * 34, 0);
    for (block, dst) in x.chunks_exact(32).zip(out[start..].chunks_exact_mut(34)) {
        let Ok(block): Result<&[f32; 32], _> = block.try_into() else { continue };
        // Fixed-size arrays and branch-free bodies let the compiler vectorise both loops.
        // max |v| on the bits: for non-negative floats the integer order is the numeric order, and
        // an integer max reduction vectorises. NaN/Inf propagate as in gguf-py's numpy `max`.
        let mut amax_bits = 0u32;
        for v in block {
            amax_bits = amax_bits.max(v.to_bits() & 0x7fff_ffff);
        }
        let amax = f32::from_bits(amax_bits);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        dst[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        let mut q = [0u8; 32];
        for i in 0..32 {
            // |v * id| <= 127 (up to rounding), so the cast to i8 never saturates differently from C.
            q[i] = roundf_i32(block[i] * id) as i8 as u8;
        }
        dst[2..].copy_from_slice(&q);
    }
}

/// `quantize_row_q8_0_ref` (ggml-quants.c) as the pinned llama.cpp compiles it: the bytes `ggml_quantize_chunk`,
/// hence llama-quantize, writes. It differs from gguf-py's [`quantize_row_q8_0`] (the converter's `--outtype q8_0`)
/// only in a block holding a NaN: numpy's `max` propagates it (NaN scale, every code 0), while ggml's
/// `amax = MAX(amax, fabsf(v))`, `(a) > (b) ? (a) : (b)`, takes the NaN and drops it at the next element, so the
/// scale comes from the elements after the last NaN (NaN only when it is the block's last element) and the NaN's
/// code is `(int8_t)roundf(NaN)`, 0 on x86.
pub fn quantize_row_q8_0_ggml(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    quantize_row_q8_0(x, out);
    q8_0_ggml_nan_blocks(x, &mut out[start..]);
}

/// Rewrites, in `y` (the gguf-py Q8_0 encoding of `x`), the blocks whose scale is NaN — exactly those holding a
/// NaN — the way ggml's C computes them (see [`quantize_row_q8_0_ggml`]); other blocks are the same in both.
/// Shared with the vectorised encoders of `sling-kernels`, which produce the gguf-py bytes first.
pub fn q8_0_ggml_nan_blocks(x: &[f32], y: &mut [u8]) {
    for (block, dst) in x.chunks_exact(32).zip(y.chunks_exact_mut(34)) {
        if u16::from_le_bytes([dst[0], dst[1]]) & 0x7fff <= 0x7c00 {
            continue;
        }
        let mut amax = 0.0f32;
        for v in block {
            let a = v.abs();
            amax = if amax > a { amax } else { a };
        }
        let d = amax / 127.0;
        // C's `d ? 1.0f/d : 0.0f`: a NaN `d` is true.
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        dst[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        for (q, v) in dst[2..].iter_mut().zip(block) {
            // An element before the last NaN may exceed `amax`; C keeps the low byte of the 32-bit conversion.
            *q = roundf_i32(v * id) as i8 as u8;
        }
    }
}

/// [`quantize_row_q8_0`] of bf16 elements given as little-endian bytes (`x.len()` a multiple of 64):
/// each is widened to f32 exactly (`ggml_bf16_to_fp32`), so the bytes equal those of quantizing the
/// decoded values. The scalar reference of `sling_kernels::quantize_bf16_row_q8_0`.
pub fn quantize_bf16_row_q8_0(x: &[u8], out: &mut Vec<u8>) {
    let mut v = [0f32; 32];
    for block in x.chunks_exact(64) {
        for (d, c) in v.iter_mut().zip(block.chunks_exact(2)) {
            *d = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
        }
        quantize_row_q8_0_body(&v, out);
    }
}

/// Encodes whole rows of `row_len` elements of `x` as `dtype`, appending to `out`.
pub fn encode_f32(dtype: DType, x: &[f32], row_len: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let block = dtype.block_elems();
    if row_len % block != 0 {
        return Err(EncodeError::RowNotBlockMultiple { dtype, row: row_len, block });
    }
    out.reserve(x.len() / block * dtype.block_bytes());
    // Plain types: size the output once and fill it (much faster than pushing element by element).
    fn fill<const N: usize>(out: &mut Vec<u8>, x: &[f32], f: impl Fn(f32) -> [u8; N]) {
        let start = out.len();
        out.resize(start + x.len() * N, 0);
        for (dst, v) in out[start..].chunks_exact_mut(N).zip(x) {
            dst.copy_from_slice(&f(*v));
        }
    }
    match dtype {
        DType::F32 => fill(out, x, f32::to_le_bytes),
        DType::F16 => fill(out, x, |v| f32_to_f16_bits(v).to_le_bytes()),
        DType::BF16 => fill(out, x, |v| f32_to_bf16_bits(v).to_le_bytes()),
        DType::Q8_0 => quantize_row_q8_0(x, out),
        // Bytes carried through the value pipeline (gpt-oss's MXFP4 blocks and scales copied as they are): exact
        // for the values `decode_to_f32` gives a U8 tensor; `as` saturates anything else.
        DType::U8 => out.extend(x.iter().map(|&v| v as u8)),
        other => return Err(EncodeError::Unsupported(other)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// ggml_compute_fp32_to_fp16 (ggml-impl.h) in f32 arithmetic, with a NaN's top payload bits kept (quietened),
    /// as F16C does.
    fn ggml_fp32_to_fp16(f: f32) -> u16 {
        let scale_to_inf = f32::from_bits(0x7780_0000);
        let scale_to_zero = f32::from_bits(0x0880_0000);
        let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
        let w = f.to_bits();
        let shl1_w = w.wrapping_add(w);
        let sign = w & 0x8000_0000;
        let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
        base = f32::from_bits((bias >> 1) + 0x0780_0000) + base;
        let bits = base.to_bits();
        let nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF);
        ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 | ((w & 0x7F_FFFF) >> 13) } else { nonsign }) as u16
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is a tie between 0x3f80 and 0x3f81: even wins.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn q8_0_known_block() {
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = -63.5;
        x[2] = 0.5;
        let mut out = Vec::new();
        quantize_row_q8_0(&x, &mut out);
        assert_eq!(out.len(), 34);
        assert_eq!(&out[0..2], &f16::from_f32(1.0).to_bits().to_le_bytes());
        assert_eq!(out[2] as i8, 127);
        assert_eq!(out[3] as i8, -64); // roundf(-63.5) = -64, half away from zero
        assert_eq!(out[4] as i8, 1);
        let mut zeros = Vec::new();
        quantize_row_q8_0(&[0.0; 32], &mut zeros);
        assert!(zeros.iter().all(|&b| b == 0));
        // amax so small that 1/d overflows: x * id is ±Inf or NaN, stored as 0 like C's cvttss2si.
        let mut tiny = [0.0f32; 32];
        tiny[0] = 1e-38;
        tiny[1] = -1e-38;
        tiny[2] = -5e-39;
        let mut out = Vec::new();
        quantize_row_q8_0(&tiny, &mut out);
        assert!(out.iter().all(|&b| b == 0), "{out:?}");
    }

    proptest! {
        #[test]
        fn bf16_round_trip_of_bf16_values_is_identity(bits in any::<u16>()) {
            let x = f32::from_bits((bits as u32) << 16);
            prop_assume!(!x.is_nan());
            prop_assert_eq!(f32_to_bf16_bits(x), bits);
        }

        #[test]
        fn q8_0_error_is_within_half_a_step(x in proptest::collection::vec(-1e3f32..1e3, 32)) {
            let mut out = Vec::new();
            quantize_row_q8_0(&x, &mut out);
            let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
            for (i, v) in x.iter().enumerate() {
                let q = out[2 + i] as i8 as f32;
                // half a step, plus the f16 rounding of d (rel. 2^-11) times |q| <= 127
                prop_assert!((q * d - v).abs() <= 0.5 * d + 127.0 * d * 1e-3 + 1e-6);
            }
        }

        #[test]
        fn fast_roundf_equals_libm_round(x in -2.0e9f32..2.0e9) {
            prop_assert_eq!(roundf_i32(x) as f32, x.round());
        }

        #[test]
        fn fast_roundf_equals_libm_round_near_halves(i in -300i32..300, k in 0u32..8) {
            // values at and next to .5 boundaries
            let x = f32::from_bits((i as f32 + 0.5).to_bits().wrapping_add(k).wrapping_sub(4));
            prop_assert_eq!(roundf_i32(x) as f32, x.round());
        }

        #[test]
        fn roundf_of_non_finite_and_huge_is_cvtt_min(x in any::<f32>()) {
            prop_assume!(x.is_nan() || x.abs() >= 2_147_483_648.0);
            prop_assert_eq!(roundf_i32(x), i32::MIN);
        }

        #[test]
        fn q8_0_of_bf16_bytes_equals_q8_0_of_decoded(bits in proptest::collection::vec(any::<u16>(), 64)) {
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let vals: Vec<f32> = bits.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            quantize_bf16_row_q8_0(&bytes, &mut a);
            quantize_row_q8_0(&vals, &mut b);
            prop_assert_eq!(a, b);
        }

        /// `f32_to_f16_bits` against an independent reference on any bits (NaN included): ggml's scalar
        /// `ggml_compute_fp32_to_fp16` (ggml-impl.h, ported below; its NaN as F16C gives it). The comparison with
        /// F16C's `vcvtps2ph` itself (what ggml's x86 build runs) is in sling-kernels, which may use intrinsics.
        #[test]
        fn f16_matches_ggml_scalar_conversion(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            prop_assert_eq!(f32_to_f16_bits(x), ggml_fp32_to_fp16(x), "{:#010x}", bits);
        }
    }
}
