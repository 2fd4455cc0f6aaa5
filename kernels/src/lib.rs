//! Fast kernels for sling's quantizers.
//!
//! Every kernel here has a scalar reference in `sling-quantizers` and is tested against it bit for
//! bit. Instruction sets are chosen at run time (`is_x86_feature_detected!`), never by
//! `target-cpu=native`, so one binary runs everywhere and is fast where it can be. The CUDA path
//! (cudarc, NVRTC at run time) will live here too, behind the `cuda` feature.

use sling_core::DType;
use sling_quantizers::encode::{self, EncodeError};

/// Which code path the kernels use on this machine (reported in provenance and `--version -v`).
pub fn cpu_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return "x86_64+avx2";
    }
    "scalar"
}

/// `quantize_row_q8_0_ref`, vectorised for the best instruction set present; same bits as
/// [`sling_quantizers::encode::quantize_row_q8_0`].
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above), which is all `q8_0_avx2` requires.
        unsafe { q8_0_avx2(x, out) };
        return;
    }
    encode::quantize_row_q8_0(x, out)
}

/// The scalar body compiled with AVX2 enabled: the compiler vectorises it 8 lanes wide. No FMA is
/// enabled, so results are bit-identical to the scalar build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q8_0_avx2(x: &[f32], out: &mut Vec<u8>) {
    encode::quantize_row_q8_0_body(x, out)
}

/// [`sling_quantizers::encode_f32`] with the fast kernels where there are some.
pub fn encode_f32(dtype: DType, x: &[f32], row_len: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match dtype {
        DType::Q8_0 if row_len % 32 == 0 => {
            quantize_row_q8_0(x, out);
            Ok(())
        }
        _ => sling_quantizers::encode_f32(dtype, x, row_len, out),
    }
}

/// [`sling_quantizers::quantize_rows`] (`ggml_quantize_chunk` over whole rows, with optional importance
/// weights) with the fast kernels where there are some. Q8_0 ignores importance weights, as in ggml.
pub fn quantize_rows(
    dtype: DType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    match dtype {
        DType::Q8_0 | DType::F32 | DType::F16 | DType::BF16 => encode_f32(dtype, x, n_per_row, out),
        _ => sling_quantizers::quantize_rows(dtype, x, n_per_row, imatrix, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn both(x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        quantize_row_q8_0(x, &mut a);
        encode::quantize_row_q8_0(x, &mut b);
        (a, b)
    }

    proptest! {
        #[test]
        fn q8_0_fast_equals_scalar_reference(x in proptest::collection::vec(-1e4f32..1e4, 32 * 9)) {
            let (a, b) = both(&x);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn q8_0_fast_equals_scalar_on_any_bits(bits in proptest::collection::vec(any::<u32>(), 64)) {
            let x: Vec<f32> = bits.into_iter().map(f32::from_bits).collect();
            let (a, b) = both(&x);
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn q8_0_edge_rows() {
        let mut rows: Vec<Vec<f32>> = vec![vec![0.0; 32], vec![1.0; 32], vec![-3.5; 32]];
        let mut outlier = vec![1e-3f32; 32];
        outlier[17] = 6e4;
        rows.push(outlier);
        rows.push((0..32).map(|i| f32::from_bits(i + 1)).collect()); // subnormals
        rows.push((0..32).map(|i| (i as f32 - 16.0) * 1e30).collect()); // large
        rows.push((0..32).map(|i| i as f32 * 0.5 - 8.0).collect()); // exact halves
        for r in rows {
            let (a, b) = both(&r);
            assert_eq!(a, b, "row {r:?}");
        }
        println!("cpu path: {}", cpu_path());
    }
}
