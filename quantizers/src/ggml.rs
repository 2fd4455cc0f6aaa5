//! ggml block quantization: every GGUF type llama-quantize writes, quantize **and** dequantize,
//! bit-exact with the pinned llama.cpp (`ggml/src/ggml-quants.c`, `ggml.c ggml_quantize_chunk`).
//!
//! [`quantize_rows`] is `ggml_quantize_chunk` for whole rows: the same function per type, the same
//! choice between the `_ref` algorithm (no importance weights) and the `_impl` one (with them).
//! Facts: `../shared/docs/gguf-spec.md` §2.3–2.10.

use sling_core::DType;

use crate::encode::{self, EncodeError};
use crate::{iq1, iq2, iq3, iq4, kquants, legacy, mxfp4, ternary};

/// `ggml_quantize_requires_imatrix` (ggml.c): the types whose ggml quantizer asserts that importance weights are
/// given (IQ2_XXS, IQ2_XS, IQ1_S). [`quantize_rows`] and [`check_rows`] refuse them without an imatrix
/// ([`EncodeError::ImatrixRequired`]). llama-quantize's own, wider list (`tensor_requires_imatrix`: IQ2_S, IQ1_M,
/// IQ3_XXS too) is `sling-gguf`'s business.
pub fn requires_imatrix(dtype: DType) -> bool {
    matches!(dtype, DType::IQ2XXS | DType::IQ2XS | DType::IQ1S)
}

type QuantRow = fn(&[f32], Option<&[f32]>, &mut [u8]);
type DequantRow = fn(&[u8], &mut [f32]);

/// The quantize / dequantize pair of a block type, or `None` for types that are not block-quantized here.
fn kernels(dtype: DType) -> Option<(QuantRow, DequantRow)> {
    Some(match dtype {
        DType::Q4_0 => (legacy::quantize_row_q4_0, legacy::dequantize_row_q4_0),
        DType::Q4_1 => (legacy::quantize_row_q4_1, legacy::dequantize_row_q4_1),
        DType::Q5_0 => (legacy::quantize_row_q5_0, legacy::dequantize_row_q5_0),
        DType::Q5_1 => (legacy::quantize_row_q5_1, legacy::dequantize_row_q5_1),
        DType::Q8_0 => (quantize_row_q8_0, dequantize_row_q8_0),
        DType::Q2K => (kquants::quantize_row_q2_k, kquants::dequantize_row_q2_k),
        DType::Q3K => (kquants::quantize_row_q3_k, kquants::dequantize_row_q3_k),
        DType::Q4K => (kquants::quantize_row_q4_k, kquants::dequantize_row_q4_k),
        DType::Q5K => (kquants::quantize_row_q5_k, kquants::dequantize_row_q5_k),
        DType::Q6K => (kquants::quantize_row_q6_k, kquants::dequantize_row_q6_k),
        DType::IQ2XXS => (iq2::quantize_row_iq2_xxs, iq2::dequantize_row_iq2_xxs),
        DType::IQ2XS => (iq2::quantize_row_iq2_xs, iq2::dequantize_row_iq2_xs),
        DType::IQ2S => (iq2::quantize_row_iq2_s, iq2::dequantize_row_iq2_s),
        DType::IQ3XXS => (iq3::quantize_row_iq3_xxs, iq3::dequantize_row_iq3_xxs),
        DType::IQ3S => (iq3::quantize_row_iq3_s, iq3::dequantize_row_iq3_s),
        DType::IQ1S => (iq1::quantize_row_iq1_s, iq1::dequantize_row_iq1_s),
        DType::IQ1M => (iq1::quantize_row_iq1_m, iq1::dequantize_row_iq1_m),
        DType::IQ4NL => (iq4::quantize_row_iq4_nl, iq4::dequantize_row_iq4_nl),
        DType::IQ4XS => (iq4::quantize_row_iq4_xs, iq4::dequantize_row_iq4_xs),
        DType::TQ1_0 => (ternary::quantize_row_tq1_0, ternary::dequantize_row_tq1_0),
        DType::TQ2_0 => (ternary::quantize_row_tq2_0, ternary::dequantize_row_tq2_0),
        DType::MXFP4 => (mxfp4::quantize_row_mxfp4, mxfp4::dequantize_row_mxfp4),
        _ => return None,
    })
}

/// Quantizes one row with a direct (inlinable) call for `dtype`; false for types without a block quantizer here.
/// `sling-kernels` compiles this, and the whole call tree below it (all `#[inline(always)]`), once more with AVX2
/// enabled; element-wise IEEE operations only, no FMA, no reassociation, so both builds give the same bits.
#[inline(always)]
pub fn quantize_row_inline(dtype: DType, x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) -> bool {
    match dtype {
        DType::Q4_0 => legacy::quantize_row_q4_0(x, qw, y),
        DType::Q4_1 => legacy::quantize_row_q4_1(x, qw, y),
        DType::Q5_0 => legacy::quantize_row_q5_0(x, qw, y),
        DType::Q5_1 => legacy::quantize_row_q5_1(x, qw, y),
        DType::Q2K => kquants::quantize_row_q2_k(x, qw, y),
        DType::Q3K => kquants::quantize_row_q3_k(x, qw, y),
        DType::Q4K => kquants::quantize_row_q4_k(x, qw, y),
        DType::Q5K => kquants::quantize_row_q5_k(x, qw, y),
        DType::Q6K => kquants::quantize_row_q6_k(x, qw, y),
        DType::IQ2XXS => iq2::quantize_row_iq2_xxs(x, qw, y),
        DType::IQ2XS => iq2::quantize_row_iq2_xs(x, qw, y),
        DType::IQ2S => iq2::quantize_row_iq2_s(x, qw, y),
        DType::IQ3XXS => iq3::quantize_row_iq3_xxs(x, qw, y),
        DType::IQ3S => iq3::quantize_row_iq3_s(x, qw, y),
        DType::IQ1S => iq1::quantize_row_iq1_s(x, qw, y),
        DType::IQ1M => iq1::quantize_row_iq1_m(x, qw, y),
        DType::IQ4NL => iq4::quantize_row_iq4_nl(x, qw, y),
        DType::IQ4XS => iq4::quantize_row_iq4_xs(x, qw, y),
        DType::TQ1_0 => ternary::quantize_row_tq1_0(x, qw, y),
        DType::TQ2_0 => ternary::quantize_row_tq2_0(x, qw, y),
        DType::MXFP4 => mxfp4::quantize_row_mxfp4(x, qw, y),
        _ => return false,
    }
    true
}

/// Q8_0 ignores importance weights in ggml (`quantize_q8_0` calls the `_ref` function).
fn quantize_row_q8_0(x: &[f32], _qw: Option<&[f32]>, y: &mut [u8]) {
    let mut out = Vec::with_capacity(y.len());
    encode::quantize_row_q8_0_ggml(x, &mut out);
    y.copy_from_slice(&out);
}

/// `dequantize_row_q8_0` (ggml-quants.c).
fn dequantize_row_q8_0(y: &[u8], x: &mut [f32]) {
    for (b, out) in y.chunks_exact(34).zip(x.chunks_exact_mut(32)) {
        let d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        for (o, q) in out.iter_mut().zip(&b[2..]) {
            *o = *q as i8 as f32 * d;
        }
    }
}

/// The preconditions of [`quantize_rows`]: whole rows of whole blocks, `n_per_row` importance weights, and weights
/// at all for the types that [`requires_imatrix`]. Returns the bytes of one encoded row.
pub fn check_rows(dtype: DType, x: &[f32], n_per_row: usize, imatrix: Option<&[f32]>) -> Result<usize, EncodeError> {
    let block = dtype.block_elems();
    if n_per_row == 0 || n_per_row % block != 0 || x.len() % n_per_row != 0 {
        return Err(EncodeError::RowNotBlockMultiple { dtype, row: n_per_row, block });
    }
    match imatrix {
        Some(w) if w.len() != n_per_row => {
            return Err(EncodeError::ImatrixLength { dtype, row: n_per_row, got: w.len() });
        }
        None if requires_imatrix(dtype) => return Err(EncodeError::ImatrixRequired(dtype)),
        _ => {}
    }
    Ok(n_per_row / block * dtype.block_bytes())
}

/// `ggml_quantize_chunk` over whole rows: quantizes `x` (rows of `n_per_row`) as `dtype`, appending the
/// blocks to `out`. `imatrix` holds `n_per_row` importance weights shared by all rows, as llama-quantize
/// passes them. Plain types (f32, f16, bf16) are encoded as ggml rounds them.
pub fn quantize_rows(
    dtype: DType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let row_bytes = check_rows(dtype, x, n_per_row, imatrix)?;
    let Some((quant, _)) = kernels(dtype) else {
        return encode::encode_f32(dtype, x, n_per_row, out);
    };
    let start = out.len();
    out.resize(start + x.len() / n_per_row * row_bytes, 0);
    for (row, dst) in x.chunks_exact(n_per_row).zip(out[start..].chunks_exact_mut(row_bytes)) {
        quant(row, imatrix, dst);
    }
    Ok(())
}

/// Dequantizes whole blocks of `dtype` (`dequantize_row_*` / ggml `to_float`), appending to `out`.
pub fn dequantize(dtype: DType, y: &[u8], out: &mut Vec<f32>) -> Result<(), EncodeError> {
    let (bb, be) = (dtype.block_bytes(), dtype.block_elems());
    if y.len() % bb != 0 {
        return Err(EncodeError::RowNotBlockMultiple { dtype, row: y.len(), block: bb });
    }
    let start = out.len();
    let n = y.len() / bb * be;
    match kernels(dtype) {
        Some((_, deq)) => {
            out.resize(start + n, 0.0);
            // Every block type's dequantizer works block by block, so any whole number of blocks is a valid "row".
            deq(y, &mut out[start..]);
        }
        None => crate::decode::decode_to_f32(dtype, y, out).map_err(|_| EncodeError::Unsupported(dtype))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block type's kernels agree with the one descriptor table: quantizing one block's worth of values
    /// fills exactly `block_bytes`, and dequantizing gives `block_elems` values back.
    #[test]
    fn kernels_agree_with_the_descriptor_table() {
        for &dtype in DType::ALL.iter().filter(|d| d.is_quantized() && kernels(**d).is_some()) {
            let be = dtype.block_elems();
            let n = if be == 32 { 256 } else { be };
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let w = vec![1.0f32; n];
            let qw = requires_imatrix(dtype).then_some(&w[..]);
            let mut y = Vec::new();
            quantize_rows(dtype, &x, n, qw, &mut y).unwrap();
            assert_eq!(y.len(), n / be * dtype.block_bytes(), "{dtype}");
            let mut back = Vec::new();
            dequantize(dtype, &y, &mut back).unwrap();
            assert_eq!(back.len(), n, "{dtype}");
        }
    }

    #[test]
    fn required_imatrix_is_refused_without_weights() {
        for dtype in [DType::IQ2XXS, DType::IQ2XS, DType::IQ1S] {
            assert!(requires_imatrix(dtype));
            let mut y = Vec::new();
            assert_eq!(quantize_rows(dtype, &[0.5; 256], 256, None, &mut y), Err(EncodeError::ImatrixRequired(dtype)));
            assert!(y.is_empty());
        }
        assert!(!requires_imatrix(DType::IQ2S) && !requires_imatrix(DType::Q2K));
    }
}
