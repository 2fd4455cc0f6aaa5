//! GPU parity: the CUDA backend's bytes equal the CPU backend's for every type with a kernel, with and without
//! importance weights, on rows that run on the device and on rows it hands to the CPU. Runs where a CUDA device
//! works; `SLING_REQUIRE_CUDA=1` (scripts/gpu-check) makes a missing device a failure instead of a skip.
#![cfg(feature = "cuda")]

mod common;
use sling_core::DType;
use sling_kernels::backend::{Backend, CpuBackend, DeviceOptions};
use sling_kernels::cu;
use sling_kernels::cuda::CudaBackend;

fn gpu() -> Option<CudaBackend> {
    // The paths not yet run on a GPU (page-locked staging, dequantization) are on here, so this test checks them.
    let opts = DeviceOptions { unverified: true, ..DeviceOptions::default() };
    match CudaBackend::open(0, &opts) {
        Ok(b) => {
            eprintln!("{}", b.describe());
            Some(b)
        }
        Err(e) if std::env::var_os("SLING_REQUIRE_CUDA").is_some_and(|v| v == "1") => {
            panic!("SLING_REQUIRE_CUDA=1 but CUDA device 0 cannot be used: {e}")
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn rows(seed: u64, n: usize) -> Vec<f32> {
    common::rows(seed, n, &[0.02, 0.5, 3.0, 1e-3, 0.0], 96)
}

fn both(gpu: &CudaBackend, t: DType, x: &[f32], n: usize, qw: Option<&[f32]>) -> (Vec<u8>, Vec<u8>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    gpu.quantize_rows(t, x, n, qw, &mut a).unwrap();
    CpuBackend::default().quantize_rows(t, x, n, qw, &mut b).unwrap();
    (a, b)
}

#[test]
fn gpu_bytes_equal_cpu_bytes_for_every_type() {
    let Some(gpu) = gpu() else { return };
    let mut failures = Vec::new();
    for &t in cu::TYPES {
        for (nrows, n) in [(1usize, 256usize), (37, 2048), (512, 4096)] {
            let x = rows(t as u64 ^ n as u64, nrows * n);
            let w: Vec<f32> = (0..n).map(|i| 0.05 + (i * 31 % 113) as f32 / 17.0).collect();
            for qw in [None, Some(w.as_slice())] {
                let (a, b) = both(&gpu, t, &x, n, qw);
                if a != b {
                    let i = a.iter().zip(&b).position(|(p, q)| p != q).unwrap_or(0);
                    failures.push(format!(
                        "{t} {nrows}x{n} qw={}: first difference at byte {i} (block {})",
                        qw.is_some(),
                        i / t.block_bytes()
                    ));
                }
            }
        }
    }
    let (dev, host) = gpu.counters();
    eprintln!("blocks on the device: {dev}, on the host: {host}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(dev > 0, "nothing ran on the device");
}

#[test]
fn rows_the_gpu_cannot_reproduce_go_to_the_cpu_with_the_same_bytes() {
    let Some(gpu) = gpu() else { return };
    let mut x = rows(7, 4 * 256);
    x[300] = f32::NAN;
    x[700] = 1e-38;
    for &t in cu::TYPES {
        let (a, b) = both(&gpu, t, &x, 256, None);
        assert_eq!(a, b, "{t}");
    }
    let (dev, host) = gpu.counters();
    assert_eq!(dev, 0, "a non-finite window ran on the device");
    assert!(host > 0);
}

/// A window larger than a lane's share of device memory is processed in row groups, with the same bytes.
#[test]
fn windows_larger_than_device_memory_limit_run_in_row_groups() {
    if gpu().is_none() {
        return;
    }
    let opts = DeviceOptions { mem_limit: 8 << 20, unverified: true, ..DeviceOptions::default() };
    let small = CudaBackend::open(0, &opts).unwrap();
    let x = rows(11, 1024 * 4096); // 16 MiB of f32: several groups of a 1 MiB lane
    let (a, b) = both(&small, DType::Q4K, &x, 4096, None);
    assert_eq!(a, b);
}

/// Dequantization on the GPU = the reference's floats, bit for bit: blocks from the quantizer and arbitrary bytes
/// (NaN, infinite and subnormal scales; NaN-producing windows are redone on the CPU).
#[test]
fn gpu_dequantize_equals_the_reference() {
    let Some(gpu) = gpu() else { return };
    for &t in cu::TYPES {
        let x = rows(t as u64 + 99, 300 * 512);
        let mut q = Vec::new();
        CpuBackend::default().quantize_rows(t, &x, 512, None, &mut q).unwrap();
        let junk = common::junk_bytes(0x2545F4914F6CDD1D ^ t as u64, t.block_bytes() * 4096);
        for (what, y) in [("quantized", &q), ("arbitrary bytes", &junk)] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            gpu.dequantize(t, y, &mut a).unwrap();
            sling_quantizers::dequantize(t, y, &mut b).unwrap();
            let same = a.len() == b.len() && a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{t} {what}");
        }
    }
}

/// The compressed-tensors / MLX affine encodings (`cu/ct.cu`): the GPU's codes, scales and zero points equal the
/// CPU backend's (the Rust reference) for every encoding the vLLM and MLX targets write and more, on random
/// windows (several 128-row FP8 tiles, ragged edges), on windows with NaN/±Inf/subnormals (which the kernels take)
/// and on windows with a huge finite value (which go to the CPU), and the counters say where each ran.
#[test]
fn gpu_encodings_equal_the_reference() {
    use sling_kernels::encode::{EncodedRows, RowEncoding};
    use sling_quantizers::ct::ScaleDtype;
    let Some(gpu) = gpu() else { return };
    let mut encs = Vec::new();
    for sd in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::BF16] {
        for bits in [4, 8] {
            for symmetric in [true, false] {
                for group in [32, 128] {
                    encs.push(RowEncoding::Int { bits, symmetric, group, sd });
                }
            }
        }
        encs.push(RowEncoding::Fp8Channel { sd });
        encs.push(RowEncoding::Fp8Block { sd });
        for bits in [2, 3, 4, 5, 6, 8] {
            encs.push(RowEncoding::Affine { bits, group: 64, sd });
        }
    }
    encs.push(RowEncoding::Nvfp4 { global: 448.0 * 6.0 / 2.5 });
    encs.push(RowEncoding::Mxfp4);
    let cpu = CpuBackend::default();
    let mut failures = Vec::new();
    for (k, enc) in encs.iter().enumerate() {
        for (nrows, n) in [(1usize, 256usize), (300, 2048), (7, 200)] {
            let mut x = rows(k as u64 * 7 + n as u64, nrows * n);
            for (what, special) in [("random", None), ("nonfinite", Some(f32::NAN)), ("huge", Some(3e30f32))] {
                if let Some(v) = special {
                    x[5] = v;
                    x[n / 2] = f32::NEG_INFINITY;
                    x[n - 1] = f32::from_bits(7);
                }
                let (mut a, mut b) = (EncodedRows::default(), EncodedRows::default());
                let before = gpu.counters();
                gpu.encode_rows(enc, &x, n, &mut a).unwrap();
                cpu.encode_rows(enc, &x, n, &mut b).unwrap();
                let after = gpu.counters();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let same = a.codes == b.codes
                    && a.words == b.words
                    && bits(&a.scales) == bits(&b.scales)
                    && a.scale_bytes == b.scale_bytes
                    && a.zeros == b.zeros
                    && bits(&a.biases) == bits(&b.biases);
                if !same {
                    failures.push(format!("{enc:?} {nrows}x{n} {what}: GPU output differs from the reference"));
                }
                let on_device = after.0 > before.0;
                if on_device != (what != "huge") {
                    failures.push(format!("{enc:?} {nrows}x{n} {what}: ran on the device: {on_device}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// The one-pass kernels of the types that have two-pass ones (`SLING_CUDA_SPLIT=0`, which the benchmark
/// compares): the CPU's bytes too.
#[test]
fn one_pass_kernels_of_split_types_equal_cpu_bytes() {
    if gpu().is_none() {
        return;
    }
    std::env::set_var("SLING_CUDA_SPLIT", "0");
    let one = CudaBackend::open(0, &DeviceOptions::default());
    std::env::remove_var("SLING_CUDA_SPLIT");
    let one = one.expect("CUDA device 0 opened a moment ago");
    for &(t, _) in cu::SPLIT {
        let n = 4096;
        let x = rows(t as u64 + 5, 64 * n);
        let w: Vec<f32> = (0..n).map(|i| 0.05 + (i * 31 % 113) as f32 / 17.0).collect();
        for qw in [None, Some(w.as_slice())] {
            let (a, b) = both(&one, t, &x, n, qw);
            assert!(a == b, "{t} one-pass, qw {}", qw.is_some());
        }
    }
}
