//! The CUDA backend (feature `cuda`): `cu/quant.cu` compiled at first use by NVRTC for the device's exact
//! architecture (`sm_90` on Hopper), cached on disk, and launched one thread per block. cudarc loads the driver
//! and NVRTC at run time, so this builds and starts on machines without CUDA; [`CudaBackend::open`] then says why
//! it cannot run.
//!
//! Each call of [`Backend::quantize_rows`] takes a *lane* (a stream with its device buffers) from a pool, so the
//! pipeline's worker threads keep several windows in flight: one lane's copies overlap another's kernels. A
//! window larger than a lane's share of `--device-mem` is processed in row groups. Rows the kernels cannot
//! reproduce exactly (non-finite or extreme values, see [`crate::cu::device_safe`]) and types without a kernel
//! are quantized on the CPU, so the bytes never depend on the backend.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};
use sling_core::DType;

use crate::backend::{Backend, Counters, DeviceError, DeviceOptions, KernelError};
use crate::cu;

/// Lanes (streams with buffers) at most; further callers wait for one to come back. Above the pipeline's
/// worker count on the machines measured (16 to 32 cores), so no worker waits for a lane.
const MAX_LANES: usize = 32;

struct Lane {
    stream: Arc<CudaStream>,
    /// Page-locked staging buffers: the window is copied in (write-combined, host writes only) and the blocks out,
    /// so the DMA runs at PCIe speed and never through the driver's shared pageable staging.
    pin_x: Option<PinnedHostSlice<f32>>,
    pin_y: Option<PinnedHostSlice<u8>>,
    x: Option<CudaSlice<f32>>,
    qw: Option<CudaSlice<f32>>,
    sig2: Option<CudaSlice<f32>>,
    y: Option<CudaSlice<u8>>,
    /// Sub-block records of the two-pass K-quant kernels.
    scratch: Option<CudaSlice<u8>>,
}

struct Pool {
    idle: Vec<Lane>,
    created: usize,
}

pub struct CudaBackend {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    describe: String,
    kernels: Vec<(DType, CudaFunction)>,
    dequant: Vec<(DType, CudaFunction)>,
    /// The two-pass kernels (`cu::SPLIT`): (type, sub-blocks per block, sub-block pass, block pass).
    split: Vec<(DType, usize, CudaFunction, CudaFunction)>,
    /// Launch the two-pass kernels where a type has them ([`DeviceOptions::unverified`] and not
    /// `SLING_CUDA_SPLIT=0`; the bytes are the same as the one-pass kernels').
    use_split: bool,
    sigma2: CudaFunction,
    pool: Mutex<Pool>,
    returned: Condvar,
    /// Bytes of device buffers one lane may hold.
    lane_bytes: u64,
    /// Threads per CUDA block (`cu::THREADS`, or `SLING_CUDA_THREADS` for tuning; bytes do not depend on it).
    threads: u32,
    /// Stage windows through page-locked buffers ([`DeviceOptions::unverified`] and not `SLING_CUDA_PAGEABLE=1`).
    pinned: bool,
    /// Dequantize on the device ([`DeviceOptions::unverified`]).
    gpu_dequantize: bool,
    counters: Counters,
    /// cuBLAS for calibration, opened at the first [`Backend::gemm`] call (quantization never loads it).
    gemm: std::sync::OnceLock<Result<crate::cuda_gemm::CudaGemm, DeviceError>>,
    mem_limit: u64,
    /// [`DeviceOptions::unverified`]: cuBLAS products for calibration are offered only then.
    unverified: bool,
    /// `cu/ct.cu`'s kernels, in [`crate::encode::KERNELS`] order ([`Backend::encode_rows`]).
    ct_kernels: Vec<CudaFunction>,
}

/// Makes `buf` hold at least `n` elements (reallocated, zeroed, when shorter; the old buffer is freed first).
pub(crate) fn ensure<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    s: &Arc<CudaStream>,
    buf: &mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<(), cudarc::driver::DriverError> {
    if buf.as_ref().is_none_or(|b| b.len() < n) {
        *buf = None;
        *buf = Some(s.alloc_zeros::<T>(n.max(1))?);
    }
    Ok(())
}

/// One thread per item (block or row), `threads` per CUDA block.
fn launch_config(items: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(threads as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cuda_err(ordinal: usize, op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> DeviceError {
    move |e| DeviceError::Cuda { ordinal, op, message: e.to_string() }
}

/// NVRTC's version, when the library loads.
pub fn nvrtc_version() -> Result<(i32, i32), DeviceError> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(DeviceError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); nvrtcVersion writes two ints.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| DeviceError::Compile { arch: String::new(), log: format!("nvrtcVersion: {e}") })?;
    Ok((major, minor))
}

/// Compiles [`cu::SOURCE`] for `arch` (`sm_80`, `sm_90`, ...) with NVRTC and returns the CUBIN (machine code for
/// exactly that architecture). Needs NVRTC only, no GPU.
pub fn compile(arch: &str) -> Result<Vec<u8>, DeviceError> {
    nvrtc_version()?;
    let fail = |log: String| DeviceError::Compile { arch: arch.to_string(), log };
    let src = CString::new(cu::SOURCE).map_err(|_| fail("the source holds a NUL byte".into()))?;
    let prog = nvrtc::create_program(&src, Some(c"sling_kernels.cu")).map_err(|e| fail(e.to_string()))?;
    let opts = cu::nvrtc_options(arch);
    // SAFETY: `prog` was just created and is destroyed below, after its last use; `src` outlives it.
    let out = unsafe {
        let r = match nvrtc::compile_program(prog, &opts) {
            Err(e) => {
                let log = nvrtc::get_program_log(prog).map(|l| c_chars_to_string(&l)).unwrap_or_default();
                Err(fail(format!("{e}: {log}")))
            }
            Ok(()) => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e}")))?;
                let mut cubin = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| fail(format!("nvrtcGetCUBIN: {e}")))?;
                Ok(cubin)
            }
        };
        let _ = nvrtc::destroy_program(prog);
        r
    };
    out
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The cache file's name: what decides the machine code (source, options, architecture), then the NVRTC version
/// that made it. A machine without NVRTC can use a file another machine compiled for its architecture.
fn cache_stem(arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(cu::SOURCE.as_bytes());
    for o in cu::nvrtc_options(arch) {
        h.update([0]);
        h.update(o.as_bytes());
    }
    let hex: String = h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{arch}")
}

/// The CUBIN for `arch`: from the cache when present (any NVRTC version's), else compiled and stored (written to a
/// temporary file and renamed, so a concurrent run never reads half a file).
pub fn cubin(arch: &str, cache: Option<&Path>) -> Result<(Vec<u8>, &'static str), DeviceError> {
    let stem = cache_stem(arch);
    let version = nvrtc_version();
    if let Some(dir) = cache {
        let exact = version.as_ref().ok().map(|(a, b)| dir.join(format!("{stem}-nvrtc{a}.{b}.cubin")));
        let any = || -> Option<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&stem) && n.ends_with(".cubin"))
                })
                .collect();
            v.sort();
            v.pop()
        };
        if let Some(p) = exact.filter(|p| p.is_file()).or_else(|| if version.is_err() { any() } else { None }) {
            if let Ok(b) = std::fs::read(&p) {
                return Ok((b, "cache"));
            }
        }
    }
    let (major, minor) = version?;
    let bin = compile(arch)?;
    if let Some(dir) = cache {
        let path = dir.join(format!("{stem}-nvrtc{major}.{minor}.cubin"));
        let tmp = dir.join(format!(".{stem}.{}.tmp", std::process::id()));
        let io = |source| DeviceError::Cache { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(&tmp, &bin).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    Ok((bin, "nvrtc"))
}

impl CudaBackend {
    /// Starts CUDA device `ordinal`: loads the driver, creates the context, compiles (or reads from the cache) the
    /// kernels for its architecture and loads them.
    pub fn open(ordinal: usize, options: &DeviceOptions) -> Result<CudaBackend, DeviceError> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(DeviceError::NoDriver("libcuda.so.1 is not on the library path".into()));
        }
        let n = CudaContext::device_count().map_err(|e| DeviceError::NoDriver(e.to_string()))?;
        if ordinal as i32 >= n {
            return Err(DeviceError::Cuda {
                ordinal,
                op: "select device",
                message: format!("{n} CUDA device(s) present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err(ordinal, "create context"))?;
        let (major, minor) = ctx.compute_capability().map_err(cuda_err(ordinal, "compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().map_err(cuda_err(ordinal, "device name"))?;
        let (bin, from) = cubin(&arch, options.cache_dir.as_deref())?;
        let module =
            ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin)).map_err(cuda_err(ordinal, "load kernels"))?;
        let load = |f: &str| module.load_function(f).map_err(cuda_err(ordinal, "load kernel function"));
        let (mut kernels, mut dequant) = (Vec::new(), Vec::new());
        for &t in cu::TYPES {
            kernels.push((t, load(&cu::kernel_name(t).expect("every listed type has a kernel"))?));
            dequant.push((t, load(&cu::dequant_kernel_name(t).expect("every listed type has a kernel"))?));
        }
        let mut split = Vec::new();
        for &(t, subs) in cu::SPLIT {
            split.push((
                t,
                subs,
                load(&format!("sling_sub_{}_k", t.name()))?,
                load(&format!("sling_fin_{}_k", t.name()))?,
            ));
        }
        let sigma2 = load(cu::ROW_SIGMA2)?;
        let ct_kernels = crate::encode::KERNELS.iter().map(|n| load(n)).collect::<Result<Vec<_>, _>>()?;
        let (free, _) = ctx.mem_get_info().map_err(cuda_err(ordinal, "memory info"))?;
        let budget = options.mem_limit.min(free as u64 * 9 / 10);
        Ok(CudaBackend {
            ordinal,
            describe: format!("cuda:{ordinal} ({name}, {arch}, kernels from {from})"),
            ctx,
            kernels,
            dequant,
            split,
            use_split: options.unverified && std::env::var_os("SLING_CUDA_SPLIT").is_none_or(|v| v != "0"),
            sigma2,
            pool: Mutex::new(Pool { idle: Vec::new(), created: 0 }),
            returned: Condvar::new(),
            lane_bytes: (budget / MAX_LANES as u64).max(1 << 20),
            threads: std::env::var("SLING_CUDA_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|t: &u32| (32..=1024).contains(t) && t % 32 == 0)
                .unwrap_or(cu::THREADS),
            pinned: options.unverified && std::env::var_os("SLING_CUDA_PAGEABLE").is_none_or(|v| v == "0"),
            gpu_dequantize: options.unverified,
            counters: Counters::default(),
            gemm: std::sync::OnceLock::new(),
            mem_limit: options.mem_limit,
            unverified: options.unverified,
            ct_kernels,
        })
    }

    fn take_lane(&self) -> Result<Lane, DeviceError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = pool.idle.pop() {
                return Ok(l);
            }
            if pool.created < MAX_LANES {
                pool.created += 1;
                drop(pool);
                let stream = self.ctx.new_stream().map_err(cuda_err(self.ordinal, "create stream"))?;
                return Ok(Lane {
                    stream,
                    pin_x: None,
                    pin_y: None,
                    x: None,
                    qw: None,
                    sig2: None,
                    y: None,
                    scratch: None,
                });
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn give_lane(&self, lane: Lane) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).idle.push(lane);
        self.returned.notify_one();
    }

    /// One row group on the device: copies in, row pass (with importance weights), one thread per block, copy out.
    #[allow(clippy::too_many_arguments)]
    fn run_group(
        &self,
        lane: &mut Lane,
        f: &CudaFunction,
        dtype: DType,
        x: &[f32],
        n_per_row: usize,
        qw: Option<&[f32]>,
        out: &mut [u8],
    ) -> Result<(), DeviceError> {
        let err = |op| cuda_err(self.ordinal, op);
        let s = lane.stream.clone();
        let nrows = x.len() / n_per_row;
        let nblocks = x.len() / dtype.block_elems();
        // Page-locked staging, sized to this window (kept while windows are of a similar size); copies move whole
        // staging buffers, so the device buffers are at least as long.
        fn pinned<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Copy>(
            ctx: &Arc<CudaContext>,
            buf: &mut Option<PinnedHostSlice<T>>,
            n: usize,
            flags: u32,
        ) -> Result<(), cudarc::driver::DriverError> {
            if buf.as_ref().is_none_or(|b| b.len() < n || b.len() > 4 * n.max(1 << 16)) {
                *buf = None;
                // SAFETY: the buffer is filled with zeros before any read, just below.
                let mut b = unsafe { ctx.alloc_pinned_with_flags::<T>(n.max(1), flags) }?;
                b.as_mut_slice()?.fill(T::default());
                *buf = Some(b);
            }
            Ok(())
        }
        let (xn, yn) = if self.pinned {
            pinned(&self.ctx, &mut lane.pin_x, x.len(), cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED)
                .map_err(err("allocate page-locked memory"))?;
            pinned(&self.ctx, &mut lane.pin_y, out.len(), 0).map_err(err("allocate page-locked memory"))?;
            (lane.pin_x.as_ref().unwrap().len(), lane.pin_y.as_ref().unwrap().len())
        } else {
            (x.len(), out.len())
        };
        ensure(&s, &mut lane.x, xn).map_err(err("allocate"))?;
        ensure(&s, &mut lane.y, yn).map_err(err("allocate"))?;
        ensure(&s, &mut lane.sig2, nrows).map_err(err("allocate"))?;
        let (dx, dy, dsig) = (lane.x.as_mut().unwrap(), lane.y.as_mut().unwrap(), lane.sig2.as_mut().unwrap());
        if let Some(px) = lane.pin_x.as_mut().filter(|_| self.pinned) {
            px.as_mut_slice().map_err(err("stage window"))?[..x.len()].copy_from_slice(x);
            s.memcpy_htod(&*px, &mut dx.slice_mut(..xn)).map_err(err("copy to device"))?;
        } else {
            s.memcpy_htod(x, &mut dx.slice_mut(..x.len())).map_err(err("copy to device"))?;
        }
        let null = 0u64;
        let nblocks_i = nblocks as i64;
        let bpr = (n_per_row / dtype.block_elems()) as i32;
        let cfg = |n: usize| launch_config(n, self.threads);
        if let Some((_, subs, sub, fin)) = self.split.iter().find(|(t, ..)| *t == dtype).filter(|_| self.use_split) {
            let nsub = nblocks * subs;
            ensure(&s, &mut lane.scratch, nsub * cu::SUB_BYTES).map_err(err("allocate"))?;
            if let Some(w) = qw {
                ensure(&s, &mut lane.qw, w.len()).map_err(err("allocate"))?;
                s.memcpy_htod(w, &mut lane.qw.as_mut().unwrap().slice_mut(..w.len())).map_err(err("copy to device"))?;
            }
            let dscr = lane.scratch.as_mut().unwrap();
            let dw = lane.qw.as_ref().filter(|_| qw.is_some());
            let mut b = s.launch_builder(sub);
            b.arg(&*dx);
            match dw {
                Some(dw) => b.arg(dw),
                None => b.arg(&null),
            };
            b.arg(&mut *dscr).arg(&nblocks_i).arg(&bpr);
            // SAFETY: sling_sub_T_k(const float*, const float*, uint8_t*, int64_t, int) reads nblocks blocks of x
            // and blocks_per_row * QK weights (or none when null), and writes nblocks * subs records of
            // cu::SUB_BYTES to scratch: every buffer holds at least that (ensured above).
            unsafe { b.launch(cfg(nsub)) }.map_err(err("launch sub-block kernel"))?;
            let mut b = s.launch_builder(fin);
            b.arg(&*dx);
            match dw {
                Some(dw) => b.arg(dw),
                None => b.arg(&null),
            };
            b.arg(&*dscr).arg(&mut *dy).arg(&nblocks_i).arg(&bpr);
            // SAFETY: sling_fin_T_k(const float*, const float*, const uint8_t*, uint8_t*, int64_t, int) reads what
            // the sub-block pass read plus its records, and writes nblocks blocks to y (out.len() bytes, ensured).
            unsafe { b.launch(cfg(nblocks)) }.map_err(err("launch block kernel"))?;
        } else if let Some(w) = qw {
            ensure(&s, &mut lane.qw, w.len()).map_err(err("allocate"))?;
            let dw = lane.qw.as_mut().unwrap();
            s.memcpy_htod(w, &mut dw.slice_mut(..w.len())).map_err(err("copy to device"))?;
            let (nrows_i, npr) = (nrows as i64, n_per_row as i32);
            let mut b = s.launch_builder(&self.sigma2);
            b.arg(&*dx).arg(&mut *dsig).arg(&nrows_i).arg(&npr);
            // SAFETY: sling_row_sigma2_rows(const float*, float*, int64_t, int) reads nrows * n_per_row floats of
            // x and writes nrows floats of sig2; both buffers hold at least that many (ensured above).
            unsafe { b.launch(cfg(nrows)) }.map_err(err("launch sling_row_sigma2_rows"))?;
            let mut b = s.launch_builder(f);
            b.arg(&*dx).arg(&*dw).arg(&*dsig).arg(&mut *dy).arg(&nblocks_i).arg(&bpr);
            // SAFETY: the kernel (const float*, const float*, const float*, uint8_t*, int64_t, int) reads nblocks
            // blocks of x, blocks_per_row * QK weights and nrows sigma2 values, and writes nblocks blocks to y:
            // every buffer holds at least that (ensured above; out.len() == nblocks * block bytes).
            unsafe { b.launch(cfg(nblocks)) }.map_err(err("launch quantize kernel"))?;
        } else {
            let mut b = s.launch_builder(f);
            b.arg(&*dx).arg(&null).arg(&null).arg(&mut *dy).arg(&nblocks_i).arg(&bpr);
            // SAFETY: as above, with null weights and sigma2, which the kernel then does not read.
            unsafe { b.launch(cfg(nblocks)) }.map_err(err("launch quantize kernel"))?;
        }
        if let Some(py) = lane.pin_y.as_mut().filter(|_| self.pinned) {
            s.memcpy_dtoh(&dy.slice(..yn), &mut *py).map_err(err("copy from device"))?;
            s.synchronize().map_err(err("synchronize"))?;
            out.copy_from_slice(&py.as_slice().map_err(err("read blocks"))?[..out.len()]);
        } else {
            s.memcpy_dtoh(&dy.slice(..out.len()), out).map_err(err("copy from device"))?;
            s.synchronize().map_err(err("synchronize"))?;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// Seconds one launch of `dtype`'s kernel takes over `x` already on the device (no transfers) with `threads`
    /// threads per CUDA block: one warm-up, then the mean of `reps` launches. For benchmarks.
    #[allow(clippy::too_many_arguments)]
    pub fn time_kernel(
        &self,
        dtype: DType,
        x: &[f32],
        n_per_row: usize,
        qw: Option<&[f32]>,
        reps: usize,
        threads: u32,
    ) -> Result<f64, KernelError> {
        sling_quantizers::ggml::check_rows(dtype, x, n_per_row, qw)?;
        let f = self
            .kernels
            .iter()
            .find(|(t, _)| *t == dtype)
            .map(|(_, f)| f)
            .ok_or(sling_quantizers::EncodeError::Unsupported(dtype))?;
        let err = |op| cuda_err(self.ordinal, op);
        let s = self.ctx.new_stream().map_err(err("create stream"))?;
        let dx = s.clone_htod(x).map_err(err("copy to device"))?;
        let w = qw.map(|w| s.clone_htod(w)).transpose().map_err(err("copy to device"))?;
        let nrows = x.len() / n_per_row;
        let nblocks = (x.len() / dtype.block_elems()) as i64;
        let mut dy = s.alloc_zeros::<u8>(nblocks as usize * dtype.block_bytes()).map_err(err("allocate"))?;
        let mut sig = s.alloc_zeros::<f32>(nrows.max(1)).map_err(err("allocate"))?;
        let bpr = (n_per_row / dtype.block_elems()) as i32;
        let (nrows_i, npr, null) = (nrows as i64, n_per_row as i32, 0u64);
        let cfg = |n: usize| launch_config(n, threads);
        let split = self.split.iter().find(|(t, ..)| *t == dtype).filter(|_| self.use_split);
        let mut scratch = match split {
            Some((_, subs, ..)) => {
                Some(s.alloc_zeros::<u8>(nblocks as usize * subs * cu::SUB_BYTES).map_err(err("allocate"))?)
            }
            None => None,
        };
        let mut once = || -> Result<(), DeviceError> {
            if let (Some((_, subs, sub, fin)), Some(scr)) = (split, scratch.as_mut()) {
                let mut b = s.launch_builder(sub);
                b.arg(&dx);
                match &w {
                    Some(w) => b.arg(w),
                    None => b.arg(&null),
                };
                b.arg(&mut *scr).arg(&nblocks).arg(&bpr);
                // SAFETY: as in `run_group`: every buffer holds what the kernel reads or writes.
                unsafe { b.launch(cfg(nblocks as usize * subs)) }.map_err(err("launch"))?;
                let mut b = s.launch_builder(fin);
                b.arg(&dx);
                match &w {
                    Some(w) => b.arg(w),
                    None => b.arg(&null),
                };
                b.arg(&*scr).arg(&mut dy).arg(&nblocks).arg(&bpr);
                // SAFETY: as above.
                unsafe { b.launch(cfg(nblocks as usize)) }.map_err(err("launch"))?;
            } else if let Some(w) = &w {
                let mut b = s.launch_builder(&self.sigma2);
                b.arg(&dx).arg(&mut sig).arg(&nrows_i).arg(&npr);
                // SAFETY: as in `run_group`: every buffer holds what the kernel reads or writes.
                unsafe { b.launch(cfg(nrows)) }.map_err(err("launch"))?;
                let mut b = s.launch_builder(f);
                b.arg(&dx).arg(w).arg(&sig).arg(&mut dy).arg(&nblocks).arg(&bpr);
                // SAFETY: as above.
                unsafe { b.launch(cfg(nblocks as usize)) }.map_err(err("launch"))?;
            } else {
                let mut b = s.launch_builder(f);
                b.arg(&dx).arg(&null).arg(&null).arg(&mut dy).arg(&nblocks).arg(&bpr);
                // SAFETY: as above, null weights and sigma2 are not read.
                unsafe { b.launch(cfg(nblocks as usize)) }.map_err(err("launch"))?;
            }
            Ok(())
        };
        once()?;
        s.synchronize().map_err(err("synchronize"))?;
        let t0 = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            once()?;
        }
        s.synchronize().map_err(err("synchronize"))?;
        Ok(t0.elapsed().as_secs_f64() / reps.max(1) as f64)
    }
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn is_gpu(&self) -> bool {
        true
    }

    fn quantize_rows(
        &self,
        dtype: DType,
        x: &[f32],
        n_per_row: usize,
        imatrix: Option<&[f32]>,
        out: &mut Vec<u8>,
    ) -> Result<(), KernelError> {
        let row_bytes = sling_quantizers::ggml::check_rows(dtype, x, n_per_row, imatrix)?;
        let f = self.kernels.iter().find(|(t, _)| *t == dtype).map(|(_, f)| f);
        let Some(f) = f.filter(|_| !x.is_empty() && cu::device_safe(x, imatrix)) else {
            crate::quantize_rows(dtype, x, n_per_row, imatrix, out)?;
            if dtype.is_quantized() {
                self.counters.add(false, (x.len() / dtype.block_elems()) as u64);
            }
            return Ok(());
        };
        let nrows = x.len() / n_per_row;
        let start = out.len();
        out.resize(start + nrows * row_bytes, 0);
        // Rows per group: the lane's share of device memory over each row's input, output and sigma2.
        let scratch = cu::split_subs(dtype).map_or(0, |subs| n_per_row / dtype.block_elems() * subs * cu::SUB_BYTES);
        let per_row = (n_per_row * 4 + row_bytes + 4 + scratch) as u64;
        let group = ((self.lane_bytes.saturating_sub(n_per_row as u64 * 4)) / per_row).max(1) as usize;
        let mut lane = self.take_lane()?;
        let mut result = Ok(());
        for (xs, ys) in x.chunks(group * n_per_row).zip(out[start..].chunks_mut(group * row_bytes)) {
            result = self.run_group(&mut lane, f, dtype, xs, n_per_row, imatrix, ys);
            if result.is_err() {
                break;
            }
        }
        self.give_lane(lane);
        if let Err(e) = result {
            out.truncate(start);
            return Err(e.into());
        }
        self.counters.add(true, (x.len() / dtype.block_elems()) as u64);
        Ok(())
    }

    fn dequantize(&self, dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), KernelError> {
        let f = self.dequant.iter().find(|(t, _)| *t == dtype).map(|(_, f)| f);
        let Some(f) = f.filter(|_| self.gpu_dequantize && !bytes.is_empty() && bytes.len() % dtype.block_bytes() == 0)
        else {
            return Ok(sling_quantizers::dequantize(dtype, bytes, out)?);
        };
        let nblocks = bytes.len() / dtype.block_bytes();
        let start = out.len();
        out.resize(start + nblocks * dtype.block_elems(), 0.0);
        let mut lane = self.take_lane()?;
        let r = self.run_dequant(&mut lane, f, dtype, bytes, &mut out[start..]);
        self.give_lane(lane);
        if let Err(e) = r {
            out.truncate(start);
            return Err(e.into());
        }
        // A NaN scale: x86 keeps its payload through the products, CUDA returns its canonical NaN. Such (hostile or
        // corrupt) blocks are dequantized again on the CPU, so the floats are the reference's bit for bit.
        if out[start..].iter().any(|v| v.is_nan()) {
            out.truncate(start);
            return Ok(sling_quantizers::dequantize(dtype, bytes, out)?);
        }
        Ok(())
    }

    /// Windows the kernels cannot reproduce exactly ([`crate::encode::device_safe`]), and every window unless
    /// [`DeviceOptions::unverified`], run the reference on the CPU; others run in row groups under the lane's share of `--device-mem` (whole 128-row tiles for FP8 block).
    /// One counted "block" per group (scale).
    fn encode_rows(
        &self,
        enc: &crate::encode::RowEncoding,
        x: &[f32],
        n_per_row: usize,
        out: &mut crate::encode::EncodedRows,
    ) -> Result<(), KernelError> {
        use crate::encode::{self, RowEncoding};
        enc.check(x.len(), n_per_row)?;
        let groups = enc.groups(x.len() / n_per_row, n_per_row);
        // A NaN or infinite NVFP4 global scale (never what `ct::nvfp4_global_scale` returns) would make NaN scales
        // whose sign is x86's on the CPU and CUDA's canonical one on the GPU: the CPU takes it.
        let odd_global = matches!(enc, RowEncoding::Nvfp4 { global } if !global.is_finite());
        // Not yet run on a GPU (docs/kernels.md): on the device only with `SLING_CUDA_UNVERIFIED=1`, which
        // scripts/gpu-check and the parity test set, until a GPU run has checked it.
        if !self.unverified || x.is_empty() || odd_global || !encode::device_safe(x) {
            encode::encode_rows(enc, x, n_per_row, out)?;
            self.counters.add(false, groups);
            return Ok(());
        }
        // Input, codes, and a word, scales and zero points per row at most: 6 bytes per value and some.
        let per_row = n_per_row as u64 * 6 + 64;
        let mut rows = (self.lane_bytes / per_row).max(1) as usize;
        if let RowEncoding::Fp8Block { .. } = enc {
            rows = rows.div_ceil(encode::FP8_TILE) * encode::FP8_TILE;
        }
        let lens = [
            out.codes.len(),
            out.words.len(),
            out.scales.len(),
            out.scale_bytes.len(),
            out.zeros.len(),
            out.biases.len(),
        ];
        let lane = self.take_lane()?;
        let mut result = Ok(());
        for xs in x.chunks(rows * n_per_row) {
            result = self.run_encode(&lane, enc, xs, n_per_row, out);
            if result.is_err() {
                break;
            }
        }
        self.give_lane(lane);
        if let Err(e) = result {
            out.codes.truncate(lens[0]);
            out.words.truncate(lens[1]);
            out.scales.truncate(lens[2]);
            out.scale_bytes.truncate(lens[3]);
            out.zeros.truncate(lens[4]);
            out.biases.truncate(lens[5]);
            return Err(e.into());
        }
        self.counters.add(true, groups);
        Ok(())
    }

    fn counters(&self) -> (u64, u64) {
        self.counters.get()
    }

    fn gemm(&self) -> Result<Option<&dyn crate::backend::Gemm>, DeviceError> {
        if !self.unverified {
            return Err(DeviceError::Unverified("calibration's products on the GPU (cuBLAS)"));
        }
        match self.gemm.get_or_init(|| crate::cuda_gemm::CudaGemm::open(self.ordinal, self.ctx.clone(), self.mem_limit))
        {
            Ok(g) => Ok(Some(g)),
            Err(e) => Err(DeviceError::Cuda { ordinal: self.ordinal, op: "open cuBLAS", message: e.to_string() }),
        }
    }
}

impl CudaBackend {
    fn run_dequant(
        &self,
        lane: &mut Lane,
        f: &CudaFunction,
        dtype: DType,
        y: &[u8],
        out: &mut [f32],
    ) -> Result<(), DeviceError> {
        let err = |op| cuda_err(self.ordinal, op);
        let s = lane.stream.clone();
        let nblocks = (y.len() / dtype.block_bytes()) as i64;
        let dy = s.clone_htod(y).map_err(err("copy to device"))?;
        let mut dx = s.alloc_zeros::<f32>(out.len()).map_err(err("allocate"))?;
        let cfg = launch_config(nblocks as usize, self.threads);
        let mut b = s.launch_builder(f);
        b.arg(&dy).arg(&mut dx).arg(&nblocks);
        // SAFETY: sling_dequantize_T(const uint8_t*, float*, int64_t) reads nblocks blocks of y and writes
        // nblocks * QK floats of x; dy holds exactly the blocks, dx out.len() == nblocks * QK floats.
        unsafe { b.launch(cfg) }.map_err(err("launch dequantize kernel"))?;
        s.memcpy_dtoh(&dx, out).map_err(err("copy from device"))?;
        s.synchronize().map_err(err("synchronize"))?;
        Ok(())
    }
}

/// What `sling doctor` reports about CUDA.
pub fn probe() -> crate::Probe {
    let nvrtc = nvrtc_version().map(|(a, b)| format!("{a}.{b}")).map_err(|e| e.to_string());
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return crate::Probe { built: true, driver: Err("libcuda.so.1 not found".into()), nvrtc, devices: Vec::new() };
    }
    let mut version = 0i32;
    // SAFETY: the driver library is present (checked above); cuDriverGetVersion writes one int.
    let driver = match unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }.result() {
        Ok(()) => Ok(format!("CUDA {}.{}", version / 1000, version % 1000 / 10)),
        Err(e) => Err(e.to_string()),
    };
    let mut devices = Vec::new();
    if let Ok(n) = CudaContext::device_count() {
        for i in 0..n.max(0) as usize {
            let d = CudaContext::new(i).and_then(|c| {
                let (a, b) = c.compute_capability()?;
                let mem = c.total_mem()?;
                Ok(format!("cuda:{i} {} (sm_{a}{b}, {:.1} GiB)", c.name()?, mem as f64 / (1u64 << 30) as f64))
            });
            devices.push(d.unwrap_or_else(|e| format!("cuda:{i}: {e}")));
        }
    }
    crate::Probe { built: true, driver, nvrtc, devices }
}

/// The compressed-tensors / MLX affine encodings on the device (`cu/ct.cu`, [`Backend::encode_rows`]): the same
/// bytes as [`crate::encode::encode_rows`], the Rust reference (tested through the host build in
/// `tests/host_ct.rs`, on a GPU by `tests/cuda_parity.rs`).
impl CudaBackend {
    fn ct_kernel(&self, name: &str) -> Result<&CudaFunction, DeviceError> {
        crate::encode::KERNELS
            .iter()
            .position(|n| *n == name)
            .and_then(|i| self.ct_kernels.get(i))
            .ok_or(DeviceError::Cuda { ordinal: self.ordinal, op: "find kernel", message: name.to_string() })
    }

    /// One row group: copy in, the encoding's kernels, copy the outputs out and append them.
    fn run_encode(
        &self,
        lane: &Lane,
        enc: &crate::encode::RowEncoding,
        x: &[f32],
        n_per_row: usize,
        out: &mut crate::encode::EncodedRows,
    ) -> Result<(), DeviceError> {
        use crate::encode::{output_lens, sd_code, RowEncoding};
        let err = |op| cuda_err(self.ordinal, op);
        let s = lane.stream.clone();
        let rows = x.len() / n_per_row;
        let [nc, nw, ns, nsb, nz, nb] = output_lens(enc, rows, n_per_row);
        let dx = s.clone_htod(x).map_err(err("copy to device"))?;
        let mut dc = s.alloc_zeros::<u8>(nc.max(1)).map_err(err("allocate"))?;
        let mut dw = s.alloc_zeros::<u32>(nw.max(1)).map_err(err("allocate"))?;
        let mut ds = s.alloc_zeros::<f32>(ns.max(1)).map_err(err("allocate"))?;
        let mut dsb = s.alloc_zeros::<u8>(nsb.max(1)).map_err(err("allocate"))?;
        let mut dz = s.alloc_zeros::<u8>(nz.max(1)).map_err(err("allocate"))?;
        let mut db = s.alloc_zeros::<f32>(nb.max(1)).map_err(err("allocate"))?;
        let (nrows, cols, group) = (rows as i64, n_per_row as i32, enc.group_len(n_per_row) as i32);
        let ngroups = enc.groups(rows, n_per_row) as usize;
        let cfg = |n: usize| launch_config(n, self.threads);
        let launch = "launch encoding kernel";
        match *enc {
            RowEncoding::Int { bits, symmetric, sd, .. } => {
                let (bits, symmetric, sd) = (bits as i32, i32::from(symmetric), sd_code(sd));
                let mut b = s.launch_builder(self.ct_kernel("sling_ct_int")?);
                b.arg(&dx).arg(&nrows).arg(&cols).arg(&group).arg(&bits).arg(&symmetric).arg(&sd);
                b.arg(&mut dc).arg(&mut ds).arg(&mut dz);
                // SAFETY: sling_ct_int(const float*, int64_t, int, int, int, int, int, int8_t*, float*, int8_t*)
                // reads nrows * cols floats and writes nrows * cols codes and one scale (and zero point when
                // asymmetric) per group, one thread per group: the buffers hold output_lens' counts (bits 1..=8 and
                // cols checked by `RowEncoding::check`).
                unsafe { b.launch(cfg(ngroups)) }.map_err(err(launch))?;
            }
            RowEncoding::Fp8Channel { sd } | RowEncoding::Fp8Block { sd } => {
                let tiled = i32::from(matches!(enc, RowEncoding::Fp8Block { .. }));
                let sd = sd_code(sd);
                let name = if tiled == 1 { "sling_ct_fp8_tile_scale" } else { "sling_ct_fp8_row_scale" };
                let mut b = s.launch_builder(self.ct_kernel(name)?);
                b.arg(&dx).arg(&nrows).arg(&cols).arg(&sd).arg(&mut ds);
                // SAFETY: (const float*, int64_t, int, int, float*): reads nrows * cols floats, writes one scale per
                // row (channel) or per 128x128 tile (block), one thread each; `ds` holds that many.
                unsafe { b.launch(cfg(ngroups)) }.map_err(err(launch))?;
                let mut b = s.launch_builder(self.ct_kernel("sling_ct_fp8_codes")?);
                b.arg(&dx).arg(&nrows).arg(&cols).arg(&tiled).arg(&ds).arg(&mut dc);
                // SAFETY: sling_ct_fp8_codes(const float*, int64_t, int, int, const float*, uint8_t*): one thread per
                // element reads its value and its row's or tile's scale and writes one code; `dc` holds nrows * cols.
                unsafe { b.launch(cfg(rows * n_per_row)) }.map_err(err(launch))?;
            }
            RowEncoding::Nvfp4 { global } => {
                let mut b = s.launch_builder(self.ct_kernel("sling_ct_nvfp4")?);
                b.arg(&dx).arg(&nrows).arg(&cols).arg(&global).arg(&mut dc).arg(&mut dsb);
                // SAFETY: sling_ct_nvfp4(const float*, int64_t, int, float, uint8_t*, uint8_t*): one thread per group
                // of 16 reads it and writes its packed bytes (ceil(cols/2) per row) and one scale byte.
                unsafe { b.launch(cfg(ngroups)) }.map_err(err(launch))?;
            }
            RowEncoding::Mxfp4 => {
                let mut b = s.launch_builder(self.ct_kernel("sling_ct_mxfp4")?);
                b.arg(&dx).arg(&nrows).arg(&cols).arg(&mut dc).arg(&mut dsb);
                // SAFETY: sling_ct_mxfp4(const float*, int64_t, int, uint8_t*, uint8_t*): as NVFP4, groups of 32.
                unsafe { b.launch(cfg(ngroups)) }.map_err(err(launch))?;
            }
            RowEncoding::Affine { bits, sd, .. } => {
                let (bits, sd) = (bits as i32, sd_code(sd));
                let mut b = s.launch_builder(self.ct_kernel("sling_mlx_affine")?);
                b.arg(&dx).arg(&nrows).arg(&cols).arg(&group).arg(&bits).arg(&sd);
                b.arg(&mut dc).arg(&mut ds).arg(&mut db);
                // SAFETY: sling_mlx_affine(const float*, int64_t, int, int, int, int, uint8_t*, float*, float*): one
                // thread per group writes its codes (nrows * cols bytes in all), scale and bias.
                unsafe { b.launch(cfg(ngroups)) }.map_err(err(launch))?;
                let mut b = s.launch_builder(self.ct_kernel("sling_pack_bits")?);
                b.arg(&dc).arg(&nrows).arg(&cols).arg(&bits).arg(&mut dw);
                // SAFETY: sling_pack_bits(const uint8_t*, int64_t, int, int, uint32_t*): one thread per output word
                // (ceil(cols*bits/32) per row, `dw`'s length) reads the codes it covers from `dc`.
                unsafe { b.launch(cfg(nw)) }.map_err(err(launch))?;
            }
        }
        let is_affine = matches!(enc, RowEncoding::Affine { .. });
        let mut codes = vec![0u8; if is_affine { 0 } else { nc }];
        let mut words = vec![0u32; nw];
        let mut scales = vec![0f32; ns];
        let mut scale_bytes = vec![0u8; nsb];
        let mut zeros = vec![0u8; nz];
        let mut biases = vec![0f32; nb];
        let copy = err("copy from device");
        if !codes.is_empty() {
            s.memcpy_dtoh(&dc.slice(..codes.len()), &mut codes).map_err(&copy)?;
        }
        if nw > 0 {
            s.memcpy_dtoh(&dw.slice(..nw), &mut words).map_err(&copy)?;
        }
        if ns > 0 {
            s.memcpy_dtoh(&ds.slice(..ns), &mut scales).map_err(&copy)?;
        }
        if nsb > 0 {
            s.memcpy_dtoh(&dsb.slice(..nsb), &mut scale_bytes).map_err(&copy)?;
        }
        if nz > 0 {
            s.memcpy_dtoh(&dz.slice(..nz), &mut zeros).map_err(&copy)?;
        }
        if nb > 0 {
            s.memcpy_dtoh(&db.slice(..nb), &mut biases).map_err(&copy)?;
        }
        s.synchronize().map_err(err("synchronize"))?;
        out.codes.extend_from_slice(&codes);
        out.words.extend_from_slice(&words);
        out.scales.extend_from_slice(&scales);
        out.scale_bytes.extend_from_slice(&scale_bytes);
        out.zeros.extend(zeros.iter().map(|&z| z as i8));
        out.biases.extend_from_slice(&biases);
        Ok(())
    }
}
