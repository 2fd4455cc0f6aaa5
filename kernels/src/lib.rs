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
        #[cfg(target_arch = "x86_64")]
        _ if dtype.is_quantized() && std::is_x86_feature_detected!("avx2") && !disabled() => {
            // Validate (and size the output) through the scalar entry point's checks, then fill it here.
            let start = out.len();
            sling_quantizers::ggml::check_rows(dtype, x, n_per_row, imatrix)?;
            let row_bytes = n_per_row / dtype.block_elems() * dtype.block_bytes();
            out.resize(start + x.len() / n_per_row * row_bytes, 0);
            // SAFETY: the CPU supports AVX2 (checked just above), which is all `rows_avx2` requires.
            unsafe { rows_avx2(dtype, x, n_per_row, imatrix, &mut out[start..], row_bytes) };
            Ok(())
        }
        _ => sling_quantizers::quantize_rows(dtype, x, n_per_row, imatrix, out),
    }
}

/// `SLING_NO_SIMD=1` forces the scalar reference (for comparisons and benchmarks).
fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("SLING_NO_SIMD").is_some_and(|v| v != "0"))
}

/// The scalar quantizers (`quantize_row_inline` and everything it calls is `#[inline(always)]`) compiled with
/// AVX2 enabled. No FMA: the same IEEE operations in the same order, so the same bits (tested below).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(
    dtype: DType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    y: &mut [u8],
    row_bytes: usize,
) {
    for (row, dst) in x.chunks_exact(n_per_row).zip(y.chunks_exact_mut(row_bytes)) {
        sling_quantizers::ggml::quantize_row_inline(dtype, row, imatrix, dst);
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

    const BLOCK_TYPES: &[DType] = &[
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::IQ4NL,
        DType::IQ4XS,
        DType::TQ1_0,
        DType::TQ2_0,
        DType::MXFP4,
    ];

    fn rows_both(dtype: DType, x: &[f32], n: usize, w: Option<&[f32]>) -> (Vec<u8>, Vec<u8>) {
        let (mut fast, mut scalar) = (Vec::new(), Vec::new());
        quantize_rows(dtype, x, n, w, &mut fast).unwrap();
        sling_quantizers::quantize_rows(dtype, x, n, w, &mut scalar).unwrap();
        (fast, scalar)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The AVX2 build of every block quantizer gives the scalar reference's bytes, with and without weights.
        #[test]
        fn simd_block_quantizers_equal_scalar(
            t in 0..BLOCK_TYPES.len(),
            x in proptest::collection::vec(prop_oneof![-4.0f32..4.0, -1e-3f32..1e-3, Just(0.0f32)], 512),
            w in proptest::option::of(proptest::collection::vec(0.0f32..50.0, 256)),
        ) {
            let (a, b) = rows_both(BLOCK_TYPES[t], &x, 256, w.as_deref());
            prop_assert_eq!(a, b, "{}", BLOCK_TYPES[t]);
        }
    }

    #[test]
    fn simd_block_quantizers_equal_scalar_on_hostile_rows() {
        let n = 256;
        let mut rows: Vec<Vec<f32>> = vec![vec![0.0; n], vec![1.0; n], vec![-7.5; n]];
        let mut spike = vec![0.01f32; n];
        spike[77] = 1e4;
        rows.push(spike);
        rows.push((0..n).map(|i| f32::from_bits(1 + i as u32 * 4099) * if i % 2 == 0 { 1.0 } else { -1.0 }).collect());
        rows.push((0..n).map(|i| ((i * 7919) % 1000) as f32 * 3e4).collect());
        rows.push((0..n).map(|i| (i as f32 * 0.37).sin()).collect());
        let w: Vec<f32> = (0..n).map(|i| if i % 9 == 0 { 0.0 } else { 1.0 + i as f32 }).collect();
        for t in BLOCK_TYPES {
            for r in &rows {
                for wt in [None, Some(w.as_slice())] {
                    let (a, b) = rows_both(*t, r, n, wt);
                    assert_eq!(a, b, "{t} weights={}", wt.is_some());
                }
            }
        }
    }

    /// `cargo test --release -p sling-kernels -- --ignored --nocapture speed`: MB/s of f32 input, one thread.
    #[test]
    #[ignore]
    fn speed() {
        let n = 4096;
        let x: Vec<f32> = (0..n * 256).map(|i| (i as f32 * 0.618).sin() * 0.05).collect();
        let w: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32).collect();
        for t in BLOCK_TYPES {
            for wt in [None, Some(w.as_slice())] {
                let time = |f: &dyn Fn(&mut Vec<u8>)| {
                    let mut best = f64::MAX;
                    for _ in 0..3 {
                        let mut out = Vec::new();
                        let t0 = std::time::Instant::now();
                        f(&mut out);
                        best = best.min(t0.elapsed().as_secs_f64());
                    }
                    x.len() as f64 * 4.0 / 1e6 / best
                };
                let fast = time(&|o| quantize_rows(*t, &x, n, wt, o).unwrap());
                let scalar = time(&|o| sling_quantizers::quantize_rows(*t, &x, n, wt, o).unwrap());
                eprintln!(
                    "{t:8} weights={:5} avx2 {fast:8.1} MB/s  scalar {scalar:8.1} MB/s  x{:.2}",
                    wt.is_some(),
                    fast / scalar
                );
            }
        }
    }
}
