//! The backend seam: where a window of rows is quantized. [`CpuBackend`] runs the Rust kernels (SIMD chosen at
//! run time); the CUDA backend (feature `cuda`, `crate::cuda`) runs `cu/quant.cu` compiled by NVRTC. Both give
//! the same bytes (tested), so callers pick one with [`open`] and never branch on which they got. Without the
//! `cuda` feature the CUDA backend is a stub whose `open` says so: the same API, no `#[cfg]` in callers.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sling_core::DType;
use sling_quantizers::EncodeError;

/// `--device`: where kernels run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// A CUDA device when one works, else the CPU (saying once why).
    #[default]
    Auto,
    Cpu,
    /// CUDA device `N` (`cuda` is `cuda:0`); an error when it cannot start.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a backend could not start or a launch failed. Names the device and the operation.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("this sling was built without CUDA support (cargo feature `cuda`)")]
    NotBuilt,
    #[error("no CUDA driver found (libcuda.so): {0}")]
    NoDriver(String),
    #[error("NVRTC not found (libnvrtc.so.13 / .12 on the library path; the nvidia-cuda-nvrtc wheel provides it)")]
    NoNvrtc,
    #[error("CUDA device {ordinal}: {op}: {message}")]
    Cuda { ordinal: usize, op: &'static str, message: String },
    #[error("compiling the kernels for {arch} with NVRTC failed: {log}")]
    Compile { arch: String, log: String },
    #[error("{0} have not yet been run on a GPU by this project's checks (docs/kernels.md, \"Not yet run on a GPU\"); SLING_CUDA_UNVERIFIED=1 turns them on")]
    Unverified(&'static str),
    #[error("kernel cache {path}: {source}")]
    Cache { path: std::path::PathBuf, source: std::io::Error },
}

/// An error of [`Backend::quantize_rows`]: the caller's arguments, or the device.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Encoding(#[from] crate::encode::EncodingError),
}

/// Blocks quantized so far, by where they ran (reported by `--json` and checked by the parity tests).
#[derive(Debug, Default)]
pub struct Counters {
    pub device_blocks: AtomicU64,
    pub host_blocks: AtomicU64,
}

impl Counters {
    pub fn add(&self, device: bool, blocks: u64) {
        let c = if device { &self.device_blocks } else { &self.host_blocks };
        c.fetch_add(blocks, Ordering::Relaxed);
    }
    pub fn get(&self) -> (u64, u64) {
        (self.device_blocks.load(Ordering::Relaxed), self.host_blocks.load(Ordering::Relaxed))
    }
}

/// Where windows of rows are quantized. Implementations give [`crate::quantize_rows`]'s bytes for every input.
pub trait Backend: Send + Sync {
    /// `cpu (x86_64+avx2)`, `cuda:0 (NVIDIA H200, sm_90)`.
    fn describe(&self) -> String;
    /// Whether this backend runs kernels on a GPU (the default: no).
    fn is_gpu(&self) -> bool {
        false
    }
    /// `ggml_quantize_chunk` over whole rows (`x` holds rows of `n_per_row`, `imatrix` `n_per_row` importance
    /// weights shared by all rows), appending the blocks to `out`. Types or rows this backend has no exact kernel
    /// for are quantized on the CPU; the default quantizes everything there ([`crate::quantize_rows`]).
    fn quantize_rows(
        &self,
        dtype: DType,
        x: &[f32],
        n_per_row: usize,
        imatrix: Option<&[f32]>,
        out: &mut Vec<u8>,
    ) -> Result<(), KernelError> {
        Ok(crate::quantize_rows(dtype, x, n_per_row, imatrix, out)?)
    }
    /// ggml's `to_float` of whole blocks of `dtype` (`bytes` a multiple of the block size), appending to `out`;
    /// the same floats, bit for bit, as [`sling_quantizers::dequantize`].
    fn dequantize(&self, dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), KernelError> {
        Ok(sling_quantizers::dequantize(dtype, bytes, out)?)
    }
    /// The compressed-tensors / MLX affine encoding `enc` of whole rows (`x` holds rows of `n_per_row`), appended
    /// to `out` exactly as [`crate::encode::encode_rows`] (the scalar reference in `sling_quantizers::ct` / `::mlx`)
    /// appends it. The default runs that reference; a GPU backend runs `cu/ct.cu` where it gives the same bytes.
    fn encode_rows(
        &self,
        enc: &crate::encode::RowEncoding,
        x: &[f32],
        n_per_row: usize,
        out: &mut crate::encode::EncodedRows,
    ) -> Result<(), KernelError> {
        Ok(crate::encode::encode_rows(enc, x, n_per_row, out)?)
    }
    /// Blocks quantized on the device and on the host so far (the default counts none).
    fn counters(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Dense matrix products on this backend's device, for the calibration forward pass and GPTQ's Hessians:
    /// `Ok(None)` on the CPU (callers use their own GEMM), an error when a GPU backend cannot offer them (cuBLAS
    /// missing). Opened at the first call, so quantization never loads cuBLAS.
    fn gemm(&self) -> Result<Option<&dyn Gemm>, DeviceError> {
        Ok(None)
    }
}

impl fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Dense products on a device (cuBLAS on CUDA). Results agree with a CPU GEMM within float tolerance, not bit
/// for bit: the summation order is the library's (docs/kernels.md, "Calibration").
pub trait Gemm: Send + Sync {
    /// `cublas 13.0 on cuda:0`.
    fn describe(&self) -> String;
    /// Whether a product of `[t, k] · [k, n]` is worth sending to the device (copies cost more than small
    /// products save; `SLING_GEMM_MIN_WORK=0` sends every one, for tests).
    fn wants(&self, t: usize, k: usize, n: usize) -> bool;
    /// `y = x · wᵀ` in IEEE f32 (no TF32): `x` `[t, k]`, `w` `[n, k]` (PyTorch `nn.Linear` layout), `y`
    /// `[t, n]`, all row-major; `y` is overwritten.
    fn linear(&self, x: &[f32], w: &[f32], t: usize, k: usize, n: usize, y: &mut [f32]) -> Result<(), DeviceError>;
    /// `h += xᵀ · x` in f64 (the inputs widened exactly): `x` `[t, k]` row-major, `h` `[k, k]`. GPTQ's Hessian.
    fn gram(&self, x: &[f32], t: usize, k: usize, h: &mut [f64]) -> Result<(), DeviceError>;
    /// Products run on the device so far and their floating-point operations.
    fn counters(&self) -> (u64, f64);
}

/// The CPU: [`crate::quantize_rows`] (AVX2 where present, else the scalar reference).
#[derive(Debug, Default)]
pub struct CpuBackend {
    counters: Counters,
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({})", crate::cpu_path())
    }
    fn quantize_rows(
        &self,
        dtype: DType,
        x: &[f32],
        n_per_row: usize,
        imatrix: Option<&[f32]>,
        out: &mut Vec<u8>,
    ) -> Result<(), KernelError> {
        crate::quantize_rows(dtype, x, n_per_row, imatrix, out)?;
        if dtype.is_quantized() {
            self.counters.add(false, (x.len() / dtype.block_elems()) as u64);
        }
        Ok(())
    }
    fn counters(&self) -> (u64, u64) {
        self.counters.get()
    }
}

/// Options of a GPU backend.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Device memory the backend may allocate for its buffers, bytes (`--device-mem`); windows larger than that
    /// are processed in row groups.
    pub mem_limit: u64,
    /// Where compiled kernels are cached (`None`: no disk cache).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Paths built and tested on the host but not yet run on a GPU (docs/kernels.md, "Not yet run on a GPU"):
    /// page-locked staging of windows, dequantization on the device, the two-pass K-quant kernels and cuBLAS
    /// products for calibration. Off unless `SLING_CUDA_UNVERIFIED=1`; `scripts/gpu-check` turns them on so
    /// that the next run on a GPU checks them.
    pub unverified: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            mem_limit: 4 << 30,
            cache_dir: default_cache_dir(),
            unverified: std::env::var_os("SLING_CUDA_UNVERIFIED").is_some_and(|v| v == "1"),
        }
    }
}

/// `$SLING_CACHE_DIR`, else `$XDG_CACHE_HOME/sling`, else `~/.cache/sling`; kernels go under `kernels/`.
pub fn default_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("SLING_CACHE_DIR").map(std::path::PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(|x| std::path::PathBuf::from(x).join("sling"))
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/sling")))
    })?;
    Some(base.join("kernels"))
}

/// The backend chosen for a run.
pub struct Selected {
    pub backend: Arc<dyn Backend>,
    /// With `--device auto` on a machine whose GPU could not be used: why (said once to the user).
    pub fallback: Option<DeviceError>,
}

/// Opens the backend for `device`: `cpu` always works; `cuda[:N]` is an error when the device cannot start;
/// `auto` uses CUDA device 0 when it starts, else the CPU with the reason in [`Selected::fallback`].
pub fn open(device: Device, options: &DeviceOptions) -> Result<Selected, DeviceError> {
    let cpu = || Arc::new(CpuBackend::default()) as Arc<dyn Backend>;
    match device {
        Device::Cpu => Ok(Selected { backend: cpu(), fallback: None }),
        Device::Cuda(n) => {
            Ok(Selected { backend: Arc::new(crate::cuda::CudaBackend::open(n, options)?), fallback: None })
        }
        Device::Auto => match crate::cuda::CudaBackend::open(0, options) {
            Ok(b) => Ok(Selected { backend: Arc::new(b), fallback: None }),
            Err(e) => Ok(Selected { backend: cpu(), fallback: Some(e) }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses_as_documented() {
        assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        for d in [Device::Auto, Device::Cpu, Device::Cuda(2)] {
            assert_eq!(d.to_string().parse::<Device>(), Ok(d));
        }
    }

    #[test]
    fn cpu_backend_is_the_fast_path() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let b = open(Device::Cpu, &DeviceOptions::default()).unwrap().backend;
        let (mut a, mut r) = (Vec::new(), Vec::new());
        b.quantize_rows(DType::Q4K, &x, 256, None, &mut a).unwrap();
        crate::quantize_rows(DType::Q4K, &x, 256, None, &mut r).unwrap();
        assert_eq!(a, r);
        assert_eq!(b.counters(), (0, 2));
    }
}
