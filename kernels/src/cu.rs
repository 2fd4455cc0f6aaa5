//! The GPU kernels' source (`kernels/cu/`), the table of types it covers, the NVRTC options it is compiled with,
//! and its host build (the same source compiled as C++ by `build.rs`), which tests compare with the scalar
//! reference bit for bit on machines without a GPU.
//!
//! One thread owns one block and runs ggml's reference code for it (`cu/ggml_quants.cuh`, vendored by
//! `scripts/vendor-ggml-cu.py`), so the bytes are `ggml_quantize_chunk`'s whichever backend runs.

use sling_core::DType;
use sling_quantizers::EncodeError;

/// The program NVRTC compiles: `shim.h`, the vendored reference quantizers, the GGUF block kernels (one-pass and
/// two-pass K-quants) and the compressed-tensors / MLX kernels (`ct.cu`), in that order (NVRTC sees no include
/// files, so the parts are concatenated; `host.cpp` includes the first four, `host_ct.cpp` `shim.h` and `ct.cu`).
pub const SOURCE: &str = concat!(
    include_str!("../cu/shim.h"),
    "\n",
    include_str!("../cu/ggml_quants.cuh"),
    "\n",
    include_str!("../cu/quant.cu"),
    "\n",
    include_str!("../cu/kquant_split.cu"),
    "\n",
    include_str!("../cu/ct.cu")
);

/// Types with a kernel: `sling_quantize_<ggml name>` in `cu/quant.cu` (its `SLING_TYPES` table, whose block sizes
/// are checked against `sling_core`'s descriptor table by the tests).
pub const TYPES: &[DType] = &[
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::MXFP4,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::TQ1_0,
    DType::TQ2_0,
    DType::IQ4NL,
    DType::IQ4XS,
];

/// K-quants with two-pass kernels (`cu/kquant_split.cu`): one thread per sub-block for the scale search
/// (`sling_sub_<T>_k`), then one per block for the rest (`sling_fin_<T>_k`); the same bytes as the one-pass
/// kernel, with 8 or 16 times the threads. (type, sub-blocks per block).
pub const SPLIT: &[(DType, usize)] =
    &[(DType::Q2K, 16), (DType::Q3K, 16), (DType::Q4K, 8), (DType::Q5K, 8), (DType::Q6K, 16)];

/// Bytes of one sub-block's record in the two-pass kernels' scratch (`SLING_SUB_BYTES`).
pub const SUB_BYTES: usize = 48;

/// Sub-blocks per block of `dtype`'s two-pass kernels, if it has them.
pub fn split_subs(dtype: DType) -> Option<usize> {
    SPLIT.iter().find(|(t, _)| *t == dtype).map(|&(_, s)| s)
}

/// Whether `dtype` has a kernel.
pub fn has_kernel(dtype: DType) -> bool {
    TYPES.contains(&dtype)
}

/// The kernel function of `dtype` (`sling_quantize_q4_K`, ...).
pub fn kernel_name(dtype: DType) -> Option<String> {
    has_kernel(dtype).then(|| format!("sling_quantize_{}", dtype.name()))
}

/// The dequantization kernel of `dtype` (`sling_dequantize_q4_K`, ...).
pub fn dequant_kernel_name(dtype: DType) -> Option<String> {
    has_kernel(dtype).then(|| format!("sling_dequantize_{}", dtype.name()))
}

/// The row pass that computes the legacy types' sigma2 (`sum x² / n` of each row, in the C's order).
pub const ROW_SIGMA2: &str = "sling_row_sigma2_rows";

/// Threads per CUDA block of the quantization kernels (the host launcher walks the grid with the same shape).
pub const THREADS: u32 = 128;

/// NVRTC options: no fast math, no FMA contraction, IEEE division and square root, denormals kept, so every
/// float operation is the one the reference C does. `arch` is `sm_90`-style (a real architecture: NVRTC emits
/// machine code for exactly that device).
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
    ]
}

/// Whether a window of values (and its importance weights) may run on the GPU and give the CPU's bytes. The
/// kernels are the reference C, but a float-to-integer conversion of NaN, infinity or an out-of-range value
/// differs between x86 (the "integer indefinite" the reference's bytes encode) and CUDA (saturation). Finite
/// values of moderate magnitude never reach one: a block scale's inverse overflows only below 2^-125 and sums of
/// squares only above 2^63. Such rows are rare in real weights (none in any checkpoint measured) and go to the
/// CPU, so the bytes are the same whichever backend ran.
pub fn device_safe(x: &[f32], qw: Option<&[f32]>) -> bool {
    // |x| == 0 or 2^-100 <= |x| <= 2^60, as exponent bits: one comparison per value, vectorised.
    const LO: u32 = (127 - 100) << 23;
    const HI: u32 = (127 + 61) << 23;
    let ok = |v: &f32| {
        let a = v.to_bits() & 0x7fff_ffff;
        a == 0 || (LO..HI).contains(&a)
    };
    x.iter().fold(true, |acc, v| acc & ok(v)) && qw.is_none_or(|w| w.iter().fold(true, |acc, v| acc & ok(v)))
}

extern "C" {
    fn sling_host_quantize_split(
        name: *const std::ffi::c_char,
        x: *const f32,
        qw: *const f32,
        scratch: *mut u8,
        y: *mut u8,
        nrows: i64,
        n_per_row: i32,
        qk: i32,
    ) -> i32;
    fn sling_host_sub_bytes() -> i32;
    fn sling_host_dequantize(name: *const std::ffi::c_char, y: *const u8, x: *mut f32, nblocks: i64) -> i32;
    fn sling_host_quantize(
        name: *const std::ffi::c_char,
        x: *const f32,
        qw: *const f32,
        sig2: *mut f32,
        y: *mut u8,
        nrows: i64,
        n_per_row: i32,
        qk: i32,
    ) -> i32;
}

/// Quantizes whole rows with the host build of the GPU kernels of `dtype`, launched as the CUDA backend launches
/// them (the two-pass kernels where the type has them, else the row pass and one thread per block), appending to
/// `out`. For tests and `sling doctor`; the CPU backend uses the Rust kernels.
pub fn host_quantize_rows(
    dtype: DType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    host_quantize_rows_with(dtype, x, n_per_row, imatrix, out, split_subs(dtype).is_some())
}

/// [`host_quantize_rows`] with the pass chosen: `split` the two-pass kernels (an error for a type without them),
/// else the one-pass kernel.
pub fn host_quantize_rows_with(
    dtype: DType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    out: &mut Vec<u8>,
    split: bool,
) -> Result<(), EncodeError> {
    let row_bytes = sling_quantizers::ggml::check_rows(dtype, x, n_per_row, imatrix)?;
    if !has_kernel(dtype) || (split && split_subs(dtype).is_none()) {
        return Err(EncodeError::Unsupported(dtype));
    }
    let nrows = x.len() / n_per_row;
    let start = out.len();
    out.resize(start + nrows * row_bytes, 0);
    let name = std::ffi::CString::new(dtype.name()).expect("type names hold no NUL");
    let qk = dtype.block_elems() as i32;
    let qw = imatrix.map_or(std::ptr::null(), <[f32]>::as_ptr);
    let rc = if let Some(subs) = split_subs(dtype).filter(|_| split) {
        // SAFETY: sling_host_sub_bytes only returns a constant.
        debug_assert_eq!(unsafe { sling_host_sub_bytes() } as usize, SUB_BYTES);
        let mut scratch = vec![0u8; (x.len() / dtype.block_elems()) * subs * SUB_BYTES];
        // SAFETY: `x` holds `nrows * n_per_row` values, `qw` (checked above) `n_per_row` or is null, `scratch`
        // a record per sub-block and `out[start..]` `nrows * row_bytes` bytes: what the launcher reads and writes.
        unsafe {
            sling_host_quantize_split(
                name.as_ptr(),
                x.as_ptr(),
                qw,
                scratch.as_mut_ptr(),
                out[start..].as_mut_ptr(),
                nrows as i64,
                n_per_row as i32,
                qk,
            )
        }
    } else {
        let mut sig2 = vec![0f32; nrows];
        // SAFETY: `x` holds `nrows * n_per_row` values, `qw` (checked above) `n_per_row` or is null, `sig2`
        // `nrows` floats and `out[start..]` `nrows * row_bytes` bytes: exactly what the launcher reads and writes
        // for `nrows` rows of `n_per_row / qk` blocks of this type.
        unsafe {
            sling_host_quantize(
                name.as_ptr(),
                x.as_ptr(),
                qw,
                sig2.as_mut_ptr(),
                out[start..].as_mut_ptr(),
                nrows as i64,
                n_per_row as i32,
                qk,
            )
        }
    };
    if rc != 0 {
        out.truncate(start);
        return Err(EncodeError::Unsupported(dtype));
    }
    Ok(())
}

/// Dequantizes whole blocks with the host build of the GPU kernel of `dtype`, appending to `out`. For tests.
pub fn host_dequantize(dtype: DType, y: &[u8], out: &mut Vec<f32>) -> Result<(), EncodeError> {
    if !has_kernel(dtype) || y.len() % dtype.block_bytes() != 0 {
        return Err(EncodeError::Unsupported(dtype));
    }
    let nblocks = y.len() / dtype.block_bytes();
    let start = out.len();
    out.resize(start + nblocks * dtype.block_elems(), 0.0);
    let name = std::ffi::CString::new(dtype.name()).expect("type names hold no NUL");
    // SAFETY: `y` holds `nblocks` blocks and `out[start..]` `nblocks * block_elems` floats: what the launcher reads
    // and writes for `nblocks` blocks of this type.
    let rc = unsafe { sling_host_dequantize(name.as_ptr(), y.as_ptr(), out[start..].as_mut_ptr(), nblocks as i64) };
    if rc != 0 {
        out.truncate(start);
        return Err(EncodeError::Unsupported(dtype));
    }
    Ok(())
}
