//! The llama.cpp oracle for bit-exactness tests: `ggml-quant-ref` (tests/ggml-ref/ggml-quant-ref.c), built
//! against the pinned libggml-base by scripts/setup-reference.sh. It runs llama.cpp's own
//! `ggml_quantize_chunk` and `to_float` on the rows we hand it.
//!
//! Found through `$SLING_GGML_QUANT_REF`, else `$SLING_LAB/llama.cpp-build/bin/ggml-quant-ref` (default lab
//! `~/.cache/sling-lab`). When it is missing the tests fail if `SLING_REQUIRE_REFERENCE=1` (scripts/test
//! and CI set it), else they print why and pass, so a plain `cargo test` works without the reference build.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use sling_core::DType;

pub struct Oracle(PathBuf);

pub fn oracle() -> Option<Oracle> {
    let path = std::env::var_os("SLING_GGML_QUANT_REF").map(PathBuf::from).unwrap_or_else(|| {
        let lab = std::env::var_os("SLING_LAB")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sling-lab"));
        lab.join("llama.cpp-build/bin/ggml-quant-ref")
    });
    if path.is_file() {
        return Some(Oracle(path));
    }
    let msg = format!("ggml-quant-ref not found at {} (run scripts/setup-reference.sh)", path.display());
    // `=1` requires it (scripts/test, CI); unset or anything else (`=0`) does not.
    if std::env::var_os("SLING_REQUIRE_REFERENCE").is_some_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("skipping the llama.cpp comparison: {msg}");
    None
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Oracle {
    fn run(&self, args: &[String], input: &[u8]) -> Vec<u8> {
        let mut child = Command::new(&self.0)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ggml-quant-ref");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().expect("ggml-quant-ref output");
        writer.join().unwrap().expect("write to ggml-quant-ref");
        assert!(out.status.success(), "ggml-quant-ref {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// `ggml-quant-ref MODE TYPE NROWS NPERROW [IMATRIX]` on the rows `x` (the importance weights through a
    /// temporary file, removed afterwards).
    fn quant(&self, mode: &str, ggml_name: &str, x: &[f32], n_per_row: usize, imatrix: Option<&[f32]>) -> Vec<u8> {
        let nrows = x.len() / n_per_row;
        let mut args = vec![mode.into(), ggml_name.into(), nrows.to_string(), n_per_row.to_string()];
        let tmp = imatrix.map(|w| tempfile(&f32_bytes(w)));
        if let Some(t) = &tmp {
            args.push(t.display().to_string());
        }
        let out = self.run(&args, &f32_bytes(x));
        if let Some(t) = tmp {
            let _ = std::fs::remove_file(t);
        }
        out
    }

    /// llama.cpp's `ggml_quantize_chunk(type, x, ..., nrows, n_per_row, imatrix)`.
    pub fn quantize(&self, ggml_name: &str, x: &[f32], n_per_row: usize, imatrix: Option<&[f32]>) -> Vec<u8> {
        self.quant("quant", ggml_name, x, n_per_row, imatrix)
    }

    /// Every row quantized on its own (`quant-each`: one forked child per row, the type's grids built once): the
    /// row's bytes, or `None` where llama.cpp aborts on it (a `GGML_ASSERT`).
    pub fn quantize_each(
        &self,
        ggml_name: &str,
        x: &[f32],
        n_per_row: usize,
        imatrix: Option<&[f32]>,
    ) -> Vec<Option<Vec<u8>>> {
        let nrows = x.len() / n_per_row;
        let out = self.quant("quant-each", ggml_name, x, n_per_row, imatrix);
        assert_eq!(
            out.len() % nrows.max(1),
            0,
            "ggml-quant-ref quant-each {ggml_name}: {} bytes for {nrows} rows",
            out.len()
        );
        out.chunks(out.len() / nrows.max(1)).map(|r| (r[0] == 1).then(|| r[1..].to_vec())).collect()
    }

    /// [`Oracle::quantize`] where llama.cpp may abort (a `GGML_ASSERT` on non-finite input): `None` when the
    /// oracle exits with a failure status, with its stderr.
    pub fn try_quantize(
        &self,
        ggml_name: &str,
        x: &[f32],
        n_per_row: usize,
        imatrix: Option<&[f32]>,
    ) -> Result<Vec<u8>, String> {
        let nrows = x.len() / n_per_row;
        let mut args = vec!["quant".to_string(), ggml_name.into(), nrows.to_string(), n_per_row.to_string()];
        if let Some(w) = imatrix {
            args.push(tempfile(&f32_bytes(w)).display().to_string());
        }
        let out = Command::new(&self.0)
            .args(&args)
            .env("GGML_NO_BACKTRACE", "1") // ggml_abort would otherwise attach gdb (seconds per abort)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                let mut stdin = child.stdin.take().unwrap();
                let input = f32_bytes(x);
                let writer = std::thread::spawn(move || stdin.write_all(&input));
                let out = child.wait_with_output();
                let _ = writer.join();
                out
            })
            .expect("spawn ggml-quant-ref");
        if imatrix.is_some() {
            let _ = std::fs::remove_file(&args[4]);
        }
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").to_string())
        }
    }

    /// llama.cpp's `to_float` for `nrows` rows of `n_per_row`.
    /// `ggml-quant-ref act`: the rows `x` as llama.cpp's CPU backend multiplies them with a `ggml_name` weight.
    pub fn activations(&self, ggml_name: &str, x: &[f32], n_per_row: usize) -> Vec<f32> {
        let args = vec!["act".into(), ggml_name.into(), (x.len() / n_per_row).to_string(), n_per_row.to_string()];
        self.run(&args, &f32_bytes(x)).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// `ggml-quant-ref act-type`: the `vec_dot_type` of a `ggml_name` weight on the CPU backend.
    pub fn activation_type(&self, ggml_name: &str) -> String {
        String::from_utf8_lossy(&self.run(&["act-type".into(), ggml_name.into()], &[])).trim().to_string()
    }

    pub fn dequantize(&self, ggml_name: &str, y: &[u8], nrows: usize, n_per_row: usize) -> Vec<f32> {
        let args = vec!["dequant".into(), ggml_name.into(), nrows.to_string(), n_per_row.to_string()];
        self.run(&args, y).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

fn tempfile(bytes: &[u8]) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "sling-imatrix-{}-{}.f32",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A small seeded generator (splitmix64) so the cases are the same on every run without extra crates.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Roughly normal (sum of uniforms), like trained weights.
    pub fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() * 0.866
    }
}

/// Named hostile rows of `n` values each (n a multiple of 256): what every type must handle exactly like ggml.
pub fn hostile_rows(n: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut r = Rng::new(seed);
    let normal: Vec<f32> = (0..n).map(|_| r.normal() * 0.02).collect();
    let mut outlier = normal.clone();
    outlier[n / 3] = 3.5;
    let mut mixed = normal.clone();
    for (i, v) in mixed.iter_mut().enumerate() {
        if i % 7 == 0 {
            *v = 0.0;
        }
    }
    vec![
        ("normal", normal.clone()),
        ("zeros", vec![0.0; n]),
        ("constant", vec![0.125; n]),
        ("negative-constant", vec![-3.0; n]),
        ("single-outlier", outlier),
        (
            "subnormals",
            (0..n)
                .map(|i| f32::from_bits(1 + (i as u32 * 7919) % 0x7f_ffff) * if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect(),
        ),
        ("large", (0..n).map(|_| r.normal() * 3.0e4).collect()),
        ("tiny", (0..n).map(|_| r.normal() * 1.0e-7).collect()),
        ("some-zeros", mixed),
        ("uniform", (0..n).map(|_| r.uniform()).collect()),
        ("ramp", (0..n).map(|i| i as f32 / n as f32 - 0.3).collect()),
    ]
}

/// Importance weights like an imatrix's (positive, spread over orders of magnitude, a few zeros).
pub fn importance(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|i| if i % 53 == 0 { 0.0 } else { (r.uniform() * 4.0).exp() }).collect()
}

// ---- shared by the bit-exactness test files ----

pub fn quantize(dtype: DType, x: &[f32], n_per_row: usize, qw: Option<&[f32]>) -> Vec<u8> {
    let mut out = Vec::new();
    sling_quantizers::quantize_rows(dtype, x, n_per_row, qw, &mut out).expect("quantize_rows");
    out
}

pub fn dequantize(dtype: DType, y: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    sling_quantizers::dequantize(dtype, y, &mut out).expect("dequantize");
    out
}

/// `None` when equal, else a description of the first differing byte (offset, row, block, offset in block).
pub fn byte_mismatch(dtype: DType, n_per_row: usize, ours: &[u8], theirs: &[u8]) -> Option<String> {
    if ours.len() != theirs.len() {
        return Some(format!("length {} vs oracle {}", ours.len(), theirs.len()));
    }
    let i = ours.iter().zip(theirs).position(|(a, b)| a != b)?;
    let bb = dtype.block_bytes();
    let row_bytes = n_per_row / dtype.block_elems() * bb;
    let n_diff = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
    Some(format!(
        "first differing byte {i} (row {}, block {}, offset {} in block): ours {:#04x} oracle {:#04x}; {n_diff} bytes \
         differ",
        i / row_bytes,
        i / bb,
        i % bb,
        ours[i],
        theirs[i]
    ))
}

/// One thread's MB/s of f32 input for `quantize_rows` and `dequantize` of `dtype` on `x`, without and with
/// `imatrix` (the `--ignored` throughput tests; not a check). A first one-row call builds any tables (the IQ grids,
/// as `ggml_quantize_init` does before the C bench's timing); types that need weights are timed with them only.
pub fn print_throughput(dtype: DType, x: &[f32], n_per_row: usize, imatrix: &[f32]) {
    let mb = (x.len() * 4) as f64 / 1e6;
    for qw in [None, Some(imatrix)] {
        if qw.is_none() && sling_quantizers::requires_imatrix(dtype) {
            continue;
        }
        let _ = quantize(dtype, &x[..n_per_row], n_per_row, qw);
        let t = std::time::Instant::now();
        let out = quantize(dtype, x, n_per_row, qw);
        let q = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let _ = dequantize(dtype, &out);
        let d = t.elapsed().as_secs_f64();
        eprintln!(
            "{:>7} {:>7}: quantize {:8.2} MB/s ({:.0} rows/s of {n_per_row}), dequantize {:8.1} MB/s (f32 side)",
            dtype.name(),
            if qw.is_some() { "imatrix" } else { "plain" },
            mb / q,
            (x.len() / n_per_row) as f64 / q,
            mb / d
        );
    }
}

/// `None` when bit-identical, else the first differing element (index, block, values).
pub fn f32_mismatch(dtype: DType, ours: &[f32], theirs: &[f32]) -> Option<String> {
    if ours.len() != theirs.len() {
        return Some(format!("length {} vs oracle {}", ours.len(), theirs.len()));
    }
    let i = ours.iter().zip(theirs).position(|(a, b)| a.to_bits() != b.to_bits())?;
    Some(format!(
        "first differing element {i} (block {}): ours {:e} ({:#010x}) oracle {:e} ({:#010x})",
        i / dtype.block_elems(),
        ours[i],
        ours[i].to_bits(),
        theirs[i],
        theirs[i].to_bits()
    ))
}

/// Blocks whose max |x| lies outside this window are left out of the error check (still compared with the
/// oracle): below it the f16 super-scale (down to amax/4096 for Q6_K) turns subnormal or flushes to zero, above it
/// the f16 scale or min overflows (65504), and a relative bound means nothing in either case.
pub const F16_SAFE_AMAX: std::ops::RangeInclusive<f32> = 0.5..=3.0e4;

/// The worst `|x - x̂| / amax(block)` of a round trip over the blocks whose amax is in [`F16_SAFE_AMAX`]. All-zero
/// blocks must come back exactly.
pub fn worst_ratio(dtype: DType, x: &[f32], back: &[f32]) -> f32 {
    let be = dtype.block_elems();
    let mut worst = 0.0f32;
    for (xb, bb) in x.chunks_exact(be).zip(back.chunks_exact(be)) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        if amax == 0.0 {
            assert!(bb.iter().all(|v| *v == 0.0), "{dtype}: an all-zero block must dequantize to zeros");
        }
        if !F16_SAFE_AMAX.contains(&amax) {
            continue;
        }
        for (a, b) in xb.iter().zip(bb) {
            worst = worst.max((a - b).abs() / amax);
        }
    }
    worst
}

/// Rows like trained weights at any magnitude: roughly normal values times 10^e, optionally with an outlier and
/// a run of zeros. Half the rows are drawn in the f16-safe window (e in -1..4) so that the error bound is exercised;
/// the rest span 1e-20..1e5 for the oracle comparison (subnormal rows are in the hostile set).
pub fn row_strategy(n: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec((-1.0f32..1.0, -1.0f32..1.0, -1.0f32..1.0), n),
        prop_oneof![-20i32..6, -1i32..4],
        prop::option::of((0..n, -50.0f32..50.0)),
        prop::option::of((0..n, 1..64usize)),
    )
        .prop_map(move |(u, e, outlier, zeros)| {
            let s = 10f32.powi(e);
            let mut x: Vec<f32> = u.iter().map(|(a, b, c)| (a + b + c) * s).collect();
            if let Some((i, v)) = outlier {
                x[i] = v * s;
            }
            if let Some((i, len)) = zeros {
                for v in x.iter_mut().skip(i).take(len) {
                    *v = 0.0;
                }
            }
            x
        })
}
