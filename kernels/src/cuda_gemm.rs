//! Dense products for calibration on a CUDA device: cuBLAS SGEMM (the forward pass's `nn.Linear` products) and
//! DGEMM (GPTQ's `XᵀX` Hessians in f64), through cudarc with dynamic loading, so `libcublas.so` is only needed on
//! a machine that calibrates on a GPU and is opened at the first product, never by quantization.
//!
//! Math mode is cuBLAS's default, which on Ampere and later keeps FP32 products in FP32 (TF32 only with
//! `CUBLAS_TF32_TENSOR_OP_MATH`): results differ from a CPU GEMM only by summation order. Each call takes a
//! *lane* (stream, cuBLAS handle, device buffers) from a small pool, so the forward pass's worker threads (one
//! expert each) run their products concurrently. Inputs larger than a lane's share of `--device-mem` are split
//! into row blocks of `x` and of `w`.

use std::sync::{Arc, Condvar, Mutex};

use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm as _, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::backend::{DeviceError, Gemm};
use crate::cuda::ensure;
use crate::gemm_layout::{gram_call, gram_rows, linear_blocks, linear_call, GemmCall};

/// cudarc's argument set for a [`GemmCall`].
fn config<T>(c: GemmCall, alpha: T, beta: T) -> GemmConfig<T> {
    let op =
        |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    GemmConfig {
        transa: op(c.trans_a),
        transb: op(c.trans_b),
        m: c.m as i32,
        n: c.n as i32,
        k: c.k as i32,
        alpha,
        lda: c.lda as i32,
        ldb: c.ldb as i32,
        beta,
        ldc: c.ldc as i32,
    }
}

/// Products in flight at most (one per forward-pass worker up to this); more callers wait for a lane.
const MAX_LANES: usize = 8;

/// Below this many multiply-adds (`t·k·n`) a product stays on the CPU: its copies would cost more than it saves.
const MIN_WORK: usize = 1 << 24;

struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    a: Option<CudaSlice<f32>>,
    b: Option<CudaSlice<f32>>,
    c: Option<CudaSlice<f32>>,
    a64: Option<CudaSlice<f64>>,
    c64: Option<CudaSlice<f64>>,
}

pub struct CudaGemm {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    idle: Mutex<(Vec<Lane>, usize)>,
    returned: Condvar,
    /// Bytes of device buffers one lane may hold.
    lane_bytes: usize,
    min_work: usize,
    version: String,
    calls: std::sync::atomic::AtomicU64,
    /// Multiply-adds × 2, as f64 bits (a counter for reports, added under the pool's lock).
    flops: Mutex<f64>,
}

fn blas_err(ordinal: usize, op: &'static str) -> impl Fn(cudarc::cublas::result::CublasError) -> DeviceError {
    move |e| DeviceError::Cuda { ordinal, op, message: format!("{e:?}") }
}

fn drv_err(ordinal: usize, op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> DeviceError {
    move |e| DeviceError::Cuda { ordinal, op, message: e.to_string() }
}

impl CudaGemm {
    /// Loads cuBLAS for the context's device. `mem_limit` bounds the device buffers of all lanes together.
    pub fn open(ordinal: usize, ctx: Arc<CudaContext>, mem_limit: u64) -> Result<CudaGemm, DeviceError> {
        // SAFETY: only probes whether the shared library can be opened (cudarc panics on a missing library
        // otherwise, so this check comes before any cuBLAS call).
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(DeviceError::Cuda {
                ordinal,
                op: "load cuBLAS",
                message: "libcublas.so not found on the library path (the CUDA toolkit or the nvidia-cublas wheel \
                          provides it); calibration needs it on a GPU"
                    .into(),
            });
        }
        let stream = ctx.new_stream().map_err(drv_err(ordinal, "create stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(blas_err(ordinal, "create cuBLAS handle"))?;
        let mut v = 0i32;
        // SAFETY: the handle was just created; cublasGetVersion_v2 writes one int.
        unsafe { blas_sys::cublasGetVersion_v2(*blas.handle(), &mut v) }
            .result()
            .map_err(blas_err(ordinal, "cuBLAS version"))?;
        let (free, _) = ctx.mem_get_info().map_err(drv_err(ordinal, "memory info"))?;
        let budget = mem_limit.min(free as u64 * 9 / 10) as usize;
        let min_work = std::env::var("SLING_GEMM_MIN_WORK").ok().and_then(|v| v.parse().ok()).unwrap_or(MIN_WORK);
        let first = Lane { stream, blas, a: None, b: None, c: None, a64: None, c64: None };
        Ok(CudaGemm {
            ordinal,
            ctx,
            idle: Mutex::new((vec![first], 1)),
            returned: Condvar::new(),
            lane_bytes: (budget / MAX_LANES).max(16 << 20),
            min_work,
            version: format!("cuBLAS {}.{}.{}", v / 10000, v / 100 % 100, v % 100),
            calls: Default::default(),
            flops: Mutex::new(0.0),
        })
    }

    fn take(&self) -> Result<Lane, DeviceError> {
        let mut pool = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = pool.0.pop() {
                return Ok(l);
            }
            if pool.1 < MAX_LANES {
                pool.1 += 1;
                drop(pool);
                let stream = self.ctx.new_stream().map_err(drv_err(self.ordinal, "create stream"))?;
                let blas = CudaBlas::new(stream.clone()).map_err(blas_err(self.ordinal, "create cuBLAS handle"))?;
                return Ok(Lane { stream, blas, a: None, b: None, c: None, a64: None, c64: None });
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn give(&self, lane: Lane, flops: f64) {
        *self.flops.lock().unwrap_or_else(|p| p.into_inner()) += flops;
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).0.push(lane);
        self.returned.notify_one();
    }

    /// `y[rows of x] = x · wᵀ` over row blocks that fit the lane.
    #[allow(clippy::too_many_arguments)]
    fn linear_on(
        &self,
        lane: &mut Lane,
        x: &[f32],
        w: &[f32],
        t: usize,
        k: usize,
        n: usize,
        y: &mut [f32],
    ) -> Result<(), DeviceError> {
        let err = |op| drv_err(self.ordinal, op);
        let s = lane.stream.clone();
        let (tr, nc) = linear_blocks(t, k, n, self.lane_bytes / 4);
        let mut part = Vec::new();
        for r0 in (0..t).step_by(tr) {
            let r1 = (r0 + tr).min(t);
            let rows = r1 - r0;
            ensure(&s, &mut lane.a, rows * k).map_err(err("allocate"))?;
            let da = lane.a.as_mut().expect("ensured");
            s.memcpy_htod(&x[r0 * k..r1 * k], &mut da.slice_mut(..rows * k)).map_err(err("copy to device"))?;
            for c0 in (0..n).step_by(nc) {
                let c1 = (c0 + nc).min(n);
                let cols = c1 - c0;
                ensure(&s, &mut lane.b, cols * k).map_err(err("allocate"))?;
                ensure(&s, &mut lane.c, cols * rows).map_err(err("allocate"))?;
                let (da, db, dc) = (
                    lane.a.as_ref().expect("ensured"),
                    lane.b.as_mut().expect("ensured"),
                    lane.c.as_mut().expect("ensured"),
                );
                s.memcpy_htod(&w[c0 * k..c1 * k], &mut db.slice_mut(..cols * k)).map_err(err("copy to device"))?;
                // A = the w block, B = the x block (gemm_layout::linear_call, tested against BLAS's definition).
                let cfg = config(linear_call(rows, cols, k), 1.0f32, 0.0f32);
                // SAFETY: db holds cols·k floats (W block, k × cols column-major), da rows·k (X block), dc
                // cols·rows (C); the leading dimensions equal the stored row lengths, so every access is in bounds.
                unsafe {
                    lane.blas.gemm(cfg, &db.slice(..cols * k), &da.slice(..rows * k), &mut dc.slice_mut(..cols * rows))
                }
                .map_err(blas_err(self.ordinal, "sgemm"))?;
                if cols == n {
                    s.memcpy_dtoh(&dc.slice(..cols * rows), &mut y[r0 * n..r1 * n]).map_err(err("copy from device"))?;
                    s.synchronize().map_err(err("synchronize"))?;
                } else {
                    part.resize(cols * rows, 0.0);
                    s.memcpy_dtoh(&dc.slice(..cols * rows), &mut part[..]).map_err(err("copy from device"))?;
                    s.synchronize().map_err(err("synchronize"))?;
                    for (i, row) in part.chunks_exact(cols).enumerate() {
                        y[(r0 + i) * n + c0..(r0 + i) * n + c1].copy_from_slice(row);
                    }
                }
            }
        }
        Ok(())
    }

    fn gram_on(&self, lane: &mut Lane, x: &[f32], t: usize, k: usize, h: &mut [f64]) -> Result<(), DeviceError> {
        let err = |op| drv_err(self.ordinal, op);
        let s = lane.stream.clone();
        ensure(&s, &mut lane.c64, k * k).map_err(err("allocate"))?;
        s.memcpy_htod(&*h, &mut lane.c64.as_mut().expect("ensured").slice_mut(..k * k))
            .map_err(err("copy to device"))?;
        // Rows of x widened to f64 on the host (exact), in blocks that fit next to H.
        let rows_per = gram_rows(t, k, self.lane_bytes / 8);
        let mut wide = Vec::new();
        for r0 in (0..t).step_by(rows_per) {
            let r1 = (r0 + rows_per).min(t);
            let rows = r1 - r0;
            wide.clear();
            wide.extend(x[r0 * k..r1 * k].iter().map(|&v| f64::from(v)));
            ensure(&s, &mut lane.a64, rows * k).map_err(err("allocate"))?;
            let da = lane.a64.as_mut().expect("ensured");
            s.memcpy_htod(&wide[..], &mut da.slice_mut(..rows * k)).map_err(err("copy to device"))?;
            // H += A · Aᵀ with A = B = the block (gemm_layout::gram_call).
            let cfg = config(gram_call(rows, k), 1.0f64, 1.0f64);
            let dc = lane.c64.as_mut().expect("ensured");
            let da = lane.a64.as_ref().expect("ensured");
            // SAFETY: da holds rows·k doubles (A, k × rows, ld k) and dc k·k (H, ld k): in bounds.
            unsafe { lane.blas.gemm(cfg, &da.slice(..rows * k), &da.slice(..rows * k), &mut dc.slice_mut(..k * k)) }
                .map_err(blas_err(self.ordinal, "dgemm"))?;
            // `wide` is reused by the next block: wait for this copy before overwriting it.
            s.synchronize().map_err(err("synchronize"))?;
        }
        s.memcpy_dtoh(&lane.c64.as_ref().expect("ensured").slice(..k * k), h).map_err(err("copy from device"))?;
        s.synchronize().map_err(err("synchronize"))?;
        Ok(())
    }
}

impl Gemm for CudaGemm {
    fn describe(&self) -> String {
        format!("{} on cuda:{}", self.version, self.ordinal)
    }

    fn wants(&self, t: usize, k: usize, n: usize) -> bool {
        t.saturating_mul(k).saturating_mul(n) >= self.min_work
    }

    fn linear(&self, x: &[f32], w: &[f32], t: usize, k: usize, n: usize, y: &mut [f32]) -> Result<(), DeviceError> {
        if x.len() != t * k || w.len() != n * k || y.len() != t * n {
            return Err(DeviceError::Cuda {
                ordinal: self.ordinal,
                op: "sgemm",
                message: format!("shapes: x {} for [{t}, {k}], w {} for [{n}, {k}], y {}", x.len(), w.len(), y.len()),
            });
        }
        if t == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            y.fill(0.0);
            return Ok(());
        }
        let mut lane = self.take()?;
        let r = self.linear_on(&mut lane, x, w, t, k, n, y);
        self.give(lane, 2.0 * (t * k * n) as f64);
        r
    }

    fn gram(&self, x: &[f32], t: usize, k: usize, h: &mut [f64]) -> Result<(), DeviceError> {
        if x.len() != t * k || h.len() != k * k {
            return Err(DeviceError::Cuda {
                ordinal: self.ordinal,
                op: "dgemm",
                message: format!("shapes: x {} for [{t}, {k}], h {} for [{k}, {k}]", x.len(), h.len()),
            });
        }
        if t == 0 || k == 0 {
            return Ok(());
        }
        let mut lane = self.take()?;
        let r = self.gram_on(&mut lane, x, t, k, h);
        self.give(lane, 2.0 * (t * k * k) as f64);
        r
    }

    fn counters(&self) -> (u64, f64) {
        (self.calls.load(std::sync::atomic::Ordering::Relaxed), *self.flops.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
