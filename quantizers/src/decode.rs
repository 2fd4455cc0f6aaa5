//! Source element types to `f32`.

use half::f16;
use sling_core::DType;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("cannot decode {0} elements to f32")]
    Unsupported(DType),
    #[error("{bytes} bytes is not a whole number of {dtype} elements")]
    Length { dtype: DType, bytes: usize },
}

/// FP8 E4M3 (`float8_e4m3fn`: bias 7, no infinities, S.1111.111 is NaN) to f32. Exact.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0x0f) as i32;
    let m = (b & 0x07) as f32;
    if e == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        // subnormal: m/8 * 2^(1-7)
        sign * m * (1.0 / 512.0)
    } else {
        sign * (1.0 + m / 8.0) * f32::powi(2.0, e - 7)
    }
}

/// FP8 E5M2 (IEEE-like, bias 15) to f32. Exact: it is the top byte of an f16.
fn e5m2_to_f32(b: u8) -> f32 {
    f16::from_bits((b as u16) << 8).to_f32()
}

/// Appends the `f32` values of `bytes` (little-endian elements of `dtype`) to `out`.
pub fn decode_to_f32(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), DecodeError> {
    let size = dtype.block_bytes();
    if dtype.is_quantized() || bytes.len() % size != 0 {
        return Err(if dtype.is_quantized() {
            DecodeError::Unsupported(dtype)
        } else {
            DecodeError::Length { dtype, bytes: bytes.len() }
        });
    }
    out.reserve(bytes.len() / size);
    fn fill<const N: usize>(out: &mut Vec<f32>, bytes: &[u8], f: impl Fn([u8; N]) -> f32) {
        let start = out.len();
        out.resize(start + bytes.len() / N, 0.0);
        for (dst, c) in out[start..].iter_mut().zip(bytes.chunks_exact(N)) {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            *dst = f(a);
        }
    }
    match dtype {
        DType::F32 => fill(out, bytes, f32::from_le_bytes),
        DType::F16 => fill(out, bytes, |b| f16::from_le_bytes(b).to_f32()),
        // bf16 is the top half of an f32: exact.
        DType::BF16 => fill(out, bytes, |b| f32::from_bits((u16::from_le_bytes(b) as u32) << 16)),
        DType::F64 => out.extend(
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32),
        ),
        DType::F8E4M3 => {
            let lut: [f32; 256] = std::array::from_fn(|i| e4m3_to_f32(i as u8));
            out.extend(bytes.iter().map(|&b| lut[b as usize]))
        }
        DType::F8E5M2 => out.extend(bytes.iter().map(|&b| e5m2_to_f32(b))),
        DType::U8 => out.extend(bytes.iter().map(|&b| b as f32)),
        DType::I8 => out.extend(bytes.iter().map(|&b| b as i8 as f32)),
        DType::I16 => out.extend(bytes.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)),
        DType::I32 => out.extend(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)),
        DType::I64 => out.extend(
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32),
        ),
        DType::Bool => out.extend(bytes.iter().map(|&b| (b != 0) as u8 as f32)),
        other => return Err(DecodeError::Unsupported(other)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_matches_published_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(e4m3_to_f32(0x7f).is_nan());
        assert_eq!(e4m3_to_f32(0x40), 2.0);
    }

    #[test]
    fn bf16_and_f16_decode_exactly() {
        let mut out = Vec::new();
        decode_to_f32(DType::BF16, &[0x80, 0x3f, 0x00, 0xc0], &mut out).unwrap();
        assert_eq!(out, vec![1.0, -2.0]);
        out.clear();
        decode_to_f32(DType::F16, &[0x00, 0x3c], &mut out).unwrap();
        assert_eq!(out, vec![1.0]);
        assert!(decode_to_f32(DType::F16, &[0], &mut out).is_err());
        assert!(decode_to_f32(DType::Q8_0, &[0; 34], &mut out).is_err());
    }
}
