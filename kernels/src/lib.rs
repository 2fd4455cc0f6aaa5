//! Fast kernels for sling's quantizers.
//!
//! Every kernel here has a scalar reference in `sling-quantizers` and is tested against it bit for
//! bit. Instruction sets are chosen at run time (`is_x86_feature_detected!`), never by
//! `target-cpu=native`, so one binary runs everywhere and is fast where it can be. The CUDA kernels
//! (`cu/`, compiled at run time by NVRTC through cudarc, feature `cuda`) run the reference C per block and are
//! tested through their host build on every machine. [`backend`] is the seam callers use: [`backend::open`]
//! gives a CPU or a CUDA [`backend::Backend`] with the same bytes.

use sling_core::DType;
use sling_quantizers::encode::{self as q_encode, EncodeError};

pub mod awq;
pub mod backend;
pub mod cu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
#[cfg(feature = "cuda")]
mod cuda_gemm;
pub mod encode;
pub mod gemm_layout;
pub mod gptq;
#[cfg(target_arch = "x86_64")]
mod iq_lanes;
#[cfg(target_arch = "x86_64")]
mod iq_steps;
#[cfg(target_arch = "x86_64")]
mod kquant_lanes;
#[cfg(target_arch = "x86_64")]
mod q3k_search;

pub use backend::{Backend, Device, DeviceError, DeviceOptions, Gemm, KernelError};
pub use encode::{EncodedRows, EncodingError, RowEncoding};

/// What this build and machine offer for CUDA (`sling doctor`).
#[derive(Debug, Clone)]
pub struct Probe {
    /// Whether this binary was built with the `cuda` feature.
    pub built: bool,
    /// The driver's CUDA version, or why there is none.
    pub driver: Result<String, String>,
    /// NVRTC's version, or why there is none.
    pub nvrtc: Result<String, String>,
    /// One line per device: ordinal, name, architecture, memory (or the error opening it).
    pub devices: Vec<String>,
}

/// Probes CUDA without starting a backend.
pub fn probe_cuda() -> Probe {
    cuda::probe()
}

/// Which code path the kernels use on this machine (reported in provenance and `--version -v`).
pub fn cpu_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return "x86_64+avx2";
    }
    "scalar"
}

/// gguf-py's Q8_0 (ggml's `quantize_row_q8_0_ref` but for NaN), vectorised for the best instruction set
/// present; same bits as [`sling_quantizers::encode::quantize_row_q8_0`]. [`quantize_rows`] gives ggml's.
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && !disabled() {
        // SAFETY: the CPU supports AVX2 (checked just above), which is all `q8_0_avx2` requires.
        unsafe { q8_0_avx2::<false>(x.as_ptr().cast(), x.len() / 32, out) };
        return;
    }
    q_encode::quantize_row_q8_0(x, out)
}

/// [`quantize_row_q8_0`] of bf16 elements given as little-endian bytes (`x.len()` a multiple of 64),
/// widened to f32 in registers: converting a bf16 checkpoint to Q8_0 needs no f32 copy of it. Same
/// bits as [`sling_quantizers::encode::quantize_bf16_row_q8_0`].
pub fn quantize_bf16_row_q8_0(x: &[u8], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && !disabled() {
        // SAFETY: the CPU supports AVX2 (checked just above); `x` holds `x.len() / 64` blocks of
        // 32 bf16 values.
        unsafe { q8_0_avx2::<true>(x.as_ptr(), x.len() / 64, out) };
        return;
    }
    q_encode::quantize_bf16_row_q8_0(x, out)
}

/// `quantize_row_q8_0_ref` over `nb` blocks of 32 values at `x` (f32, or bf16 when `BF16`), with
/// AVX2 and the same IEEE operations as the scalar body, so the same bits: amax as an integer max
/// of the magnitudes' bits, `d = amax / 127` and `id = 1 / d` in scalar f32, `x * id` rounded half
/// away from zero as truncation plus an exact fraction test (`_mm256_round_ps` toward zero), then
/// `cvttps2dq`, whose "integer indefinite" (NaN, ±Inf) is stored as 0 like the scalar
/// [`q_encode::roundf_i32`]'s `i32::MIN`. No FMA.
///
/// # Safety
/// The CPU must support AVX2, and `x` must be valid for reading `nb` blocks (128 bytes each for
/// f32, 64 for bf16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q8_0_avx2<const BF16: bool>(x: *const u8, nb: usize, out: &mut Vec<u8>) {
    use std::arch::x86_64::*;
    let start = out.len();
    out.reserve(nb * 34);
    // SAFETY (whole body): loads stay within the `nb` blocks the caller vouched for; stores stay
    // within the `nb * 34` bytes reserved above, and the length is set only after all are written.
    unsafe {
        let dst = out.as_mut_ptr().add(start);
        let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
        let half = _mm256_set1_ps(0.5);
        let neg_half = _mm256_set1_ps(-0.5);
        let one = _mm256_set1_ps(1.0);
        let indefinite = _mm256_set1_epi32(i32::MIN);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let load = |b: usize, k: usize| -> __m256 {
            if BF16 {
                let p = x.add(b * 64 + k * 16) as *const __m128i;
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16))
            } else {
                _mm256_loadu_ps((x as *const f32).add(b * 32 + k * 8))
            }
        };
        for b in 0..nb {
            let v = [load(b, 0), load(b, 1), load(b, 2), load(b, 3)];
            let a = |i: usize| _mm256_and_si256(_mm256_castps_si256(v[i]), abs_mask);
            let m = _mm256_max_epu32(_mm256_max_epu32(a(0), a(1)), _mm256_max_epu32(a(2), a(3)));
            let m = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
            let m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0b01_00_11_10));
            let m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0b10_11_00_01));
            let amax = f32::from_bits(_mm_cvtsi128_si32(m) as u32);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let o = dst.add(b * 34);
            std::ptr::copy_nonoverlapping(q_encode::f32_to_f16_bits(d).to_le_bytes().as_ptr(), o, 2);
            let idv = _mm256_set1_ps(id);
            let q = |i: usize| -> __m256i {
                let y = _mm256_mul_ps(v[i], idv);
                let t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm256_sub_ps(y, t);
                let up = _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), one);
                let down = _mm256_and_ps(_mm256_cmp_ps(frac, neg_half, _CMP_LE_OQ), one);
                let r = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(t, up), down));
                // NaN/Inf lanes: 0, as the low byte of i32::MIN; others are within -127..=127.
                _mm256_andnot_si256(_mm256_cmpeq_epi32(r, indefinite), r)
            };
            let w01 = _mm256_packs_epi32(q(0), q(1));
            let w23 = _mm256_packs_epi32(q(2), q(3));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), perm);
            _mm256_storeu_si256(o.add(2) as *mut __m256i, bytes);
        }
        out.set_len(start + nb * 34);
    }
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
        DType::Q8_0 if n_per_row % 32 == 0 && x.len() % n_per_row == 0 => {
            // ggml's bytes: the gguf-py encoding (the fast kernel), then its blocks holding a NaN the C way.
            let start = out.len();
            quantize_row_q8_0(x, out);
            q_encode::q8_0_ggml_nan_blocks(x, &mut out[start..]);
            Ok(())
        }
        DType::Q8_0 => sling_quantizers::quantize_rows(dtype, x, n_per_row, imatrix, out),
        DType::F32 | DType::F16 | DType::BF16 => encode_f32(dtype, x, n_per_row, out),
        #[cfg(target_arch = "x86_64")]
        _ if dtype.is_quantized() && std::is_x86_feature_detected!("avx2") && !disabled() => {
            // Validate (and size the output) through the scalar entry point's checks, then fill it here.
            let start = out.len();
            let row_bytes = sling_quantizers::ggml::check_rows(dtype, x, n_per_row, imatrix)?;
            out.resize(start + x.len() / n_per_row * row_bytes, 0);
            let y = &mut out[start..];
            if kquant_lanes::handles(dtype, imatrix.is_some()) && !lanes_disabled() {
                // SAFETY: the CPU supports AVX2 (checked just above), which is all `kquant_lanes::rows` requires.
                unsafe { kquant_lanes::rows(dtype, x, n_per_row, imatrix, y, row_bytes) };
            } else if iq_lanes::handles(dtype) && !lanes_disabled() {
                // SAFETY: the CPU supports AVX2 (checked just above), which is all `iq_lanes::rows` requires.
                unsafe { iq_lanes::rows(dtype, x, n_per_row, imatrix, y, row_bytes) };
            } else {
                // SAFETY: the CPU supports AVX2 (checked just above), which is all `rows_avx2` requires.
                if !unsafe { rows_avx2(dtype, x, n_per_row, imatrix, y, row_bytes) } {
                    // No block quantizer for this type: an error, not a tensor of zeros.
                    out.truncate(start);
                    return Err(EncodeError::Unsupported(dtype));
                }
            }
            Ok(())
        }
        _ => sling_quantizers::quantize_rows(dtype, x, n_per_row, imatrix, out),
    }
}

/// `SLING_NO_SIMD=1` forces the scalar reference (for comparisons and benchmarks).
fn disabled() -> bool {
    sling_quantizers::common::simd_disabled()
}

/// `SLING_NO_LANES=1` keeps the K-quants that have a one-sub-block-per-lane kernel ([`kquant_lanes`]) on the
/// AVX2 build of the scalar code instead (for comparisons and benchmarks).
#[cfg(target_arch = "x86_64")]
fn lanes_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("SLING_NO_LANES").is_some_and(|v| v != "0"))
}

/// The scalar quantizers (`quantize_row_inline` and everything it calls is `#[inline(always)]`) compiled with
/// AVX2 enabled. No FMA: the same IEEE operations in the same order, so the same bits (tested below). False when
/// `dtype` has no block quantizer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(
    dtype: DType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    y: &mut [u8],
    row_bytes: usize,
) -> bool {
    for (row, dst) in x.chunks_exact(n_per_row).zip(y.chunks_exact_mut(row_bytes)) {
        if !sling_quantizers::ggml::quantize_row_inline(dtype, row, imatrix, dst) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn both(x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        quantize_row_q8_0(x, &mut a);
        q_encode::quantize_row_q8_0(x, &mut b);
        (a, b)
    }

    /// F16C's `vcvtps2ph` (round to nearest even), what ggml's x86 build converts scales with.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "f16c")]
    unsafe fn f16c(x: f32) -> u16 {
        use std::arch::x86_64::*;
        _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))) as u16
    }

    proptest! {
        /// The scalar f32→f16 conversion every block scale goes through = the hardware instruction, on any bits.
        #[test]
        #[cfg(target_arch = "x86_64")]
        fn f16_conversion_equals_f16c(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            if std::is_x86_feature_detected!("f16c") {
                // SAFETY: the CPU supports F16C (checked just above).
                let hw = unsafe { f16c(x) };
                prop_assert_eq!(q_encode::f32_to_f16_bits(x), hw, "{:#010x}", bits);
            } else {
                eprintln!("this CPU has no F16C: the f16 conversion is checked against ggml's scalar port only");
            }
        }

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

        /// Magnitudes spread over the whole exponent range (tiny scales whose inverse overflows,
        /// huge ones, subnormals), mixed signs, and exact halves after scaling.
        #[test]
        fn q8_0_fast_equals_scalar_across_scales(
            exp in -149i32..128,
            m in proptest::collection::vec((-1000i32..1000, any::<bool>()), 32 * 3),
        ) {
            let x: Vec<f32> = m.iter().map(|&(k, half)| (k as f32 + if half { 0.5 } else { 0.0 }) * 2f32.powi(exp)).collect();
            let (a, b) = both(&x);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn q8_0_from_bf16_fast_equals_scalar(bits in proptest::collection::vec(any::<u16>(), 32 * 5)) {
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let (mut a, mut b) = (vec![7u8], vec![7u8]);
            quantize_bf16_row_q8_0(&bytes, &mut a);
            q_encode::quantize_bf16_row_q8_0(&bytes, &mut b);
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
        DType::IQ3XXS,
        DType::IQ3S,
        DType::IQ4NL,
        DType::IQ4XS,
        DType::TQ1_0,
        DType::TQ2_0,
        DType::MXFP4,
        DType::IQ2XXS,
        DType::IQ2XS,
        DType::IQ2S,
        DType::IQ1S,
        DType::IQ1M,
    ];

    fn rows_both(dtype: DType, x: &[f32], n: usize, w: Option<&[f32]>) -> (Vec<u8>, Vec<u8>) {
        let (mut fast, mut scalar) = (Vec::new(), Vec::new());
        if w.is_none() && sling_quantizers::requires_imatrix(dtype) {
            // Both refuse, as ggml does (IQ2_XXS, IQ2_XS).
            let err = Err(sling_quantizers::EncodeError::ImatrixRequired(dtype));
            assert_eq!(quantize_rows(dtype, x, n, w, &mut fast), err);
            assert_eq!(sling_quantizers::quantize_rows(dtype, x, n, w, &mut scalar), err);
            return (fast, scalar);
        }
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
        // Non-finite values (the shipped build and the reference must agree on them too) and ties.
        let wave: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        for (at, v) in [(5, f32::NAN), (40, f32::INFINITY), (255, f32::NEG_INFINITY), (31, -f32::NAN)] {
            let mut r = wave.clone();
            r[at] = v;
            rows.push(r);
        }
        rows.push((0..n).map(|i| [0.5f32, -0.5, 0.25, 0.0][i % 4]).collect());
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

/// Test inputs shared by the kernels' bit-identity tests.
#[cfg(test)]
pub(crate) mod test_rows {
    /// Mixed magnitudes, signs, exact zeros, ties, subnormals and the non-finite values a weight may hold
    /// (xorshift, seeded).
    pub(crate) fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match (s >> 8) % 97 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f32::NAN,
                    3 => f32::INFINITY,
                    4 => f32::NEG_INFINITY,
                    5 => 1e-41,
                    6 => ((i % 16) as f32 - 8.0) * 0.125,
                    _ => u * [1e-3, 0.05, 1.0, 300.0][(s >> 4) as usize % 4],
                }
            })
            .collect()
    }
}
