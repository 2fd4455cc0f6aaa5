//! Single-thread quantizer benchmark, sling's side of `ggml-quant-ref bench` (tests/ggml-ref/ggml-quant-ref.c):
//! the same arguments, the same input and the same output, so that scripts/bench/quantize.py can time both
//! sides the same way.
//!
//! ```text
//! cargo run --release -p sling-kernels --example qbench -- TYPE NROWS NPERROW REPS [IMATRIX.f32] < rows.f32
//! ```
//!
//! TYPE is a ggml type name (`q4_K`, `iq4_xs`, ...); stdin holds NROWS x NPERROW little-endian f32; IMATRIX
//! holds NPERROW f32 importance weights shared by all rows. Times, REPS times each, only the calls:
//! `sling_kernels::quantize_rows` (the dispatcher `sling quantize` uses: the AVX2 kernels for Q8_0, Q4_K, Q5_K, Q6_K,
//! the scalar ports of ggml-quants.c otherwise; `SLING_NO_SIMD=1` / `SLING_NO_LANES=1` to compare) over all rows,
//! then `sling_quantizers::dequantize` over the result.
//! Prints, one line each:
//!
//! ```text
//! quantize S1 .. SREPS       seconds per call
//! dequantize S1 .. SREPS     seconds per call
//! fnv1a64 HEX                FNV-1a of the quantized bytes (equal to ggml-quant-ref's when the bytes are)
//! ```
use std::io::{Read, Write};
use std::time::Instant;

use sling_core::DType;

fn read_f32(mut r: impl Read, n: usize) -> Vec<f32> {
    let mut buf = vec![0u8; n * 4];
    r.read_exact(&mut buf).unwrap_or_else(|e| die(&format!("short input ({} bytes wanted): {e}", n * 4)));
    buf.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn die(msg: &str) -> ! {
    eprintln!("qbench: {msg}");
    std::process::exit(2)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        die("usage: qbench TYPE NROWS NPERROW REPS [IMATRIX.f32] < rows.f32");
    }
    let dtype = DType::from_name(&args[0]).unwrap_or_else(|| die(&format!("unknown type {}", args[0])));
    let num = |s: &str| s.parse::<usize>().unwrap_or_else(|_| die(&format!("not a number: {s}")));
    let (nrows, n_per_row, reps) = (num(&args[1]), num(&args[2]), num(&args[3]));
    let x = read_f32(std::io::stdin().lock(), nrows * n_per_row);
    let imatrix = args.get(4).map(|p| {
        let f = std::fs::File::open(p).unwrap_or_else(|e| die(&format!("{p}: {e}")));
        read_f32(f, n_per_row)
    });
    let row_bytes = n_per_row / dtype.block_elems() * dtype.block_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(nrows * row_bytes);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        out.clear();
        let t0 = Instant::now();
        sling_kernels::quantize_rows(dtype, &x, n_per_row, imatrix.as_deref(), &mut out)
            .unwrap_or_else(|e| die(&format!("quantize_rows: {e}")));
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(&out);
    }
    if out.len() != nrows * row_bytes {
        die(&format!("quantize_rows wrote {} bytes, expected {}", out.len(), nrows * row_bytes));
    }
    print_times("quantize", &times);
    let mut back: Vec<f32> = Vec::with_capacity(nrows * n_per_row);
    times.clear();
    for _ in 0..reps {
        back.clear();
        let t0 = Instant::now();
        sling_quantizers::dequantize(dtype, &out, &mut back).unwrap_or_else(|e| die(&format!("dequantize: {e}")));
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(&back);
    }
    print_times("dequantize", &times);
    let _ = writeln!(std::io::stdout(), "fnv1a64 {:016x}", fnv1a64(&out));
}

fn print_times(what: &str, times: &[f64]) {
    let s: Vec<String> = times.iter().map(|t| format!("{t:.9}")).collect();
    // A closed pipe (e.g. `| head -1`) is not an error worth a panic.
    let _ = writeln!(std::io::stdout(), "{what} {}", s.join(" "));
}
