//! Kernel throughput on the CUDA backend and on this machine's CPU, per type: GB/s of BF16-equivalent input (2
//! bytes per value, what a checkpoint holds). GPU "kernel" excludes transfers (data resident, CUDA events);
//! GPU "window" is `Backend::quantize_rows` from host memory (copies in and out included), as the pipeline calls
//! it; CPU is the Rust kernels on all cores (rayon over rows, as the pipeline's chunks).
//!
//!   cargo run --release -p sling-kernels --features cuda --example gpu_bench -- [MiB-of-values] [types...]
//!
//! Prints a Markdown table (docs/performance.md, "GPU kernels").
#[cfg(feature = "cuda")]
fn main() {
    use sling_kernels::backend::{Backend, DeviceOptions};
    use sling_kernels::cu;
    use std::time::Instant;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(512);
    let only: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    // The paths not yet run on a GPU (two-pass K-quants, page-locked staging) on, as scripts/gpu-check has them.
    let gpu =
        sling_kernels::cuda::CudaBackend::open(0, &DeviceOptions { unverified: true, ..DeviceOptions::default() })
            .expect("CUDA device 0");
    // The one-pass kernels of the types that have two-pass ones, for comparison (same bytes).
    std::env::set_var("SLING_CUDA_SPLIT", "0");
    let one_pass = sling_kernels::cuda::CudaBackend::open(0, &DeviceOptions::default()).expect("CUDA device 0");
    std::env::remove_var("SLING_CUDA_SPLIT");
    println!("device: {}", gpu.describe());
    let n_per_row = 4096usize;
    let nrows = (mib << 20) / 4 / n_per_row;
    let x: Vec<f32> =
        (0..nrows * n_per_row).map(|i| (((i * 2654435761) % 65521) as f32 / 65521.0 - 0.5) * 0.1).collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("{} MiB of f32 values ({} rows of {n_per_row}); CPU: {threads} threads\n", mib, nrows);
    println!(
        "| type | GPU kernel GB/s | kernel, imatrix | one-pass kernel (two-pass types) | GPU window GB/s | CPU GB/s ({threads} threads) | GPU kernel / CPU | kernel GB/s by threads per block |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let gb = (x.len() * 2) as f64 / 1e9;
    for &t in cu::TYPES {
        if !only.is_empty() && !only.contains(&t.name()) {
            continue;
        }
        let k = gpu.time_kernel(t, &x, n_per_row, None, 3, sling_kernels::cu::THREADS).expect("kernel");
        // Threads per CUDA block and importance weights, for tuning (bytes do not depend on either).
        let tune: Vec<String> = [32u32, 64, 256]
            .iter()
            .map(|&th| format!("{th}: {:.0}", gb / gpu.time_kernel(t, &x, n_per_row, None, 3, th).expect("kernel")))
            .collect();
        let w: Vec<f32> = (0..n_per_row).map(|i| 0.1 + (i % 7) as f32).collect();
        let kw = gpu.time_kernel(t, &x, n_per_row, Some(&w), 3, sling_kernels::cu::THREADS).expect("kernel");
        let one = if cu::split_subs(t).is_some() {
            format!(
                "{:.1}",
                gb / one_pass.time_kernel(t, &x, n_per_row, None, 3, sling_kernels::cu::THREADS).expect("kernel")
            )
        } else {
            String::new()
        };
        let mut out = Vec::new();
        let t0 = Instant::now();
        gpu.quantize_rows(t, &x, n_per_row, None, &mut out).unwrap();
        let wt = t0.elapsed().as_secs_f64();
        // CPU: rows split over threads as the pipeline's chunks are.
        let t0 = Instant::now();
        let per = x.len().div_ceil(threads * n_per_row) * n_per_row;
        std::thread::scope(|s| {
            for c in x.chunks(per) {
                s.spawn(move || {
                    let mut o = Vec::new();
                    sling_kernels::quantize_rows(t, c, n_per_row, None, &mut o).unwrap();
                });
            }
        });
        let c = t0.elapsed().as_secs_f64();
        println!(
            "| {} | {:.1} | {:.1} | {} | {:.1} | {:.2} | {:.0}× | {} |",
            t.name(),
            gb / k,
            gb / kw,
            one,
            gb / wt,
            gb / c,
            c / k,
            tune.join(", ")
        );
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_bench needs --features cuda");
    std::process::exit(2);
}
