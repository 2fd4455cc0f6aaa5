//! Bit-exactness of the legacy (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and K-quant (Q2_K … Q6_K) quantizers and dequantizers
//! against the pinned llama.cpp (`ggml_quantize_chunk` / `to_float`, through `ggml-quant-ref`; see common/mod.rs).
//!
//! Every comparison is on bytes (quantize) or `f32::to_bits` (dequantize); mismatches are collected and reported
//! with the type, the case, the first differing byte and its block, so one run shows every failing case.
//!
//! Run in release (each oracle call spawns a process; the searches are slow unoptimised):
//! `cargo test -p sling-quantizers --release --test bitexact_legacy_kquants`.
//! Throughput: `... --test bitexact_legacy_kquants -- --ignored --nocapture throughput`.

mod common;
use common::{dequantize, f32_mismatch, quantize, row_strategy, worst_ratio};

use proptest::prelude::*;
use sling_core::DType;

/// The types under test. `DType::name()` is the `ggml_type_name` spelling the oracle expects.
const TYPES: [DType; 10] = [
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
];

/// Row lengths of the hostile-row cases (K-quants need multiples of 256).
const ROW_LENGTHS: [usize; 2] = [256, 512];
/// Seeds of the hostile rows and importance weights.
const SEEDS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];

/// `None` when equal, else a description of the first differing byte (offset, block, offset in block).
fn byte_mismatch(dtype: DType, ours: &[u8], theirs: &[u8]) -> Option<String> {
    if ours.len() != theirs.len() {
        return Some(format!("length {} vs oracle {}", ours.len(), theirs.len()));
    }
    let i = ours.iter().zip(theirs).position(|(a, b)| a != b)?;
    let bb = dtype.block_bytes();
    let n_diff = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
    Some(format!(
        "first differing byte {i} (block {}, offset {} in block): ours {:#04x} oracle {:#04x}; {n_diff} bytes differ",
        i / bb,
        i % bb,
        ours[i],
        theirs[i]
    ))
}

/// Counts of bit-exact comparisons per type, printed at the end of the hostile-row test.
#[derive(Default, Clone, Copy)]
struct Tally {
    plain: usize,
    imatrix: usize,
}

#[test]
fn quantize_and_dequantize_match_llama_cpp_on_hostile_rows() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    let mut tally = [Tally::default(); TYPES.len()];
    for (ti, &dtype) in TYPES.iter().enumerate() {
        let name = dtype.name();
        for &n in &ROW_LENGTHS {
            for &seed in &SEEDS {
                let rows = common::hostile_rows(n, seed);
                let imatrix = common::importance(n, seed ^ 0x1111);
                for qw in [None, Some(&imatrix[..])] {
                    let mode = if qw.is_some() { "imatrix" } else { "plain" };
                    let mut check = |case: &str, x: &[f32]| {
                        let ours = quantize(dtype, x, n, qw);
                        let theirs = oracle.quantize(name, x, n, qw);
                        if let Some(m) = byte_mismatch(dtype, &ours, &theirs) {
                            failures.push(format!("quantize {name} {mode} n={n} seed={seed:#x} {case}: {m}"));
                        }
                        // Dequantize the oracle's bytes both ways: independent of our quantizer.
                        let nrows = x.len() / n;
                        let back = dequantize(dtype, &theirs);
                        let back_ref = oracle.dequantize(name, &theirs, nrows, n);
                        if let Some(m) = f32_mismatch(dtype, &back, &back_ref) {
                            failures.push(format!("dequantize {name} {mode} n={n} seed={seed:#x} {case}: {m}"));
                        }
                        let t = &mut tally[ti];
                        if qw.is_some() {
                            t.imatrix += nrows;
                        } else {
                            t.plain += nrows;
                        }
                    };
                    for (case, x) in &rows {
                        check(case, x);
                    }
                    // All hostile rows as one matrix in one call (llama-quantize hands over chunks of many rows).
                    let all: Vec<f32> = rows.iter().flat_map(|(_, x)| x.iter().copied()).collect();
                    check("all-rows-in-one-call", &all);
                }
            }
        }
    }
    for (dtype, t) in TYPES.iter().zip(&tally) {
        eprintln!("{:>5}: {} rows compared without imatrix, {} with", dtype.name(), t.plain, t.imatrix);
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Random block bytes (any scale, any code) dequantize exactly like llama.cpp: exercises every unpacking path,
/// including negative Q6_K scales and codes the quantizers never write. The f16 fields get finite values only
/// (a NaN scale would make both sides NaN, whose payload is not part of the contract).
#[test]
fn dequantize_random_blocks_matches_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    for dtype in TYPES {
        let mut rng = common::Rng::new(0xdec0de ^ dtype.block_bytes() as u64);
        let nblocks = 64;
        let mut y: Vec<u8> = (0..nblocks * dtype.block_bytes()).map(|_| rng.next_u64() as u8).collect();
        for blk in y.chunks_exact_mut(dtype.block_bytes()) {
            for &at in f16_offsets(dtype) {
                // Clear the top exponent bit: exponent <= 15, so finite and at most 2.
                blk[at + 1] &= 0xBF;
            }
        }
        let ours = dequantize(dtype, &y);
        let theirs = oracle.dequantize(dtype.name(), &y, 1, nblocks * dtype.block_elems());
        if let Some(m) = f32_mismatch(dtype, &ours, &theirs) {
            failures.push(format!("dequantize {} random blocks: {m}", dtype.name()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Byte offsets of the f16 fields of each block (ggml-common.h).
fn f16_offsets(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
        DType::Q2K => &[80, 82],
        DType::Q3K => &[108],
        DType::Q6K => &[208],
        _ => &[],
    }
}

// ---------------------------------------------------------------- properties

/// Round-trip error bounds `(no imatrix, positive imatrix)`, as a fraction of the largest |x| of the block the
/// scale is fitted to (32 elements for the legacy types, the 256-element super-block for K-quants).
///
/// Legacy without imatrix (`_ref`), analytic: a symmetric type with `2^b` codes puts `max` on the code `-2^(b-1)`,
/// so the opposite extreme is clamped one step short: error ≤ one step = amax/2^(b-1) (Q4_0: 1/8, Q5_0: 1/16).
/// An asymmetric type has step range/(2^b - 1) ≤ 2·amax/(2^b - 1) and errs by at most half a step (Q4_1: 1/15,
/// Q5_1: 1/31). On top comes the f16 rounding of `d` (relative 2^-11, times at most 2^b codes of d ≤ 2·amax/2^b)
/// and of `m` (2^-11·amax): at most 1.5·2^-10·amax, covered by [`F16_TERM`].
///
/// K-quants without imatrix, empirical: the sub-block scales are themselves quantized (4, 6 or 8 bits) relative
/// to the largest one and the searches trade the largest elements' error for the bulk's, so no tight closed form
/// holds. The bounds are ~1.5× the worst ratio measured by `measure_error_ratios` (3000 random rows with
/// outliers, zero runs and uniform rows, plus the hostile rows): Q2_K 0.41, Q3_K 0.26, Q4_K 0.096, Q5_K 0.054,
/// Q6_K 0.021.
///
/// With an imatrix the searches minimise a *weighted* error, trading low-weight elements for high-weight ones, so
/// the bound is looser; again ~1.5× the measured worst with positive weights spread over e^±1 (Q4_0 0.19, Q4_1
/// 0.14, Q5_0 0.083, Q5_1 0.067, Q2_K 0.62, Q3_K 0.32, Q4_K 0.13, Q5_K 0.073, Q6_K 0.044). With zero weights
/// (as `common::importance` has) no per-element bound exists at all: a zero-weight element is free, and an
/// outlier with weight 0 can come back as 0 (ratio 1). Those rows are only compared with the oracle.
const F16_TERM: f32 = 1.0 / 512.0;
const BOUND_Q4_0: (f32, f32) = (1.0 / 8.0 + F16_TERM, 0.29);
const BOUND_Q4_1: (f32, f32) = (1.0 / 15.0 + F16_TERM, 0.21);
const BOUND_Q5_0: (f32, f32) = (1.0 / 16.0 + F16_TERM, 0.125);
const BOUND_Q5_1: (f32, f32) = (1.0 / 31.0 + F16_TERM, 0.10);
/// Q8_0 (`_ref` only: ggml ignores importance weights): half a step of amax/127, plus the f16 term.
const BOUND_Q8_0: (f32, f32) = (0.5 / 127.0 + F16_TERM, 0.5 / 127.0 + F16_TERM);
const BOUND_Q2_K: (f32, f32) = (0.62, 0.94);
const BOUND_Q3_K: (f32, f32) = (0.39, 0.48);
const BOUND_Q4_K: (f32, f32) = (0.145, 0.20);
const BOUND_Q5_K: (f32, f32) = (0.08, 0.11);
const BOUND_Q6_K: (f32, f32) = (0.032, 0.066);

fn bound(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::Q4_0 => BOUND_Q4_0,
        DType::Q4_1 => BOUND_Q4_1,
        DType::Q5_0 => BOUND_Q5_0,
        DType::Q5_1 => BOUND_Q5_1,
        DType::Q8_0 => BOUND_Q8_0,
        DType::Q2K => BOUND_Q2_K,
        DType::Q3K => BOUND_Q3_K,
        DType::Q4K => BOUND_Q4_K,
        DType::Q5K => BOUND_Q5_K,
        DType::Q6K => BOUND_Q6_K,
        _ => unreachable!("not under test"),
    }
}

/// Importance weights without zeros, spread over a factor e^2 (the weighted searches keep every element in view).
fn positive_importance(n: usize, seed: u64) -> Vec<f32> {
    let mut r = common::Rng::new(seed);
    (0..n).map(|_| r.uniform().exp()).collect()
}

/// Which importance weights a property case uses.
#[derive(Clone, Copy, Debug)]
enum Weights {
    /// `_ref` path; error bound `bound().0`.
    None,
    /// `_impl` path with positive weights; error bound `bound().1`.
    Positive,
    /// `_impl` path with `common::importance` (has zeros): oracle comparison only.
    WithZeros,
}

fn check_property(dtype: DType, x: &[f32], weights: Weights, seed: u64) -> Result<(), TestCaseError> {
    let n = x.len();
    let imatrix = match weights {
        Weights::None => Vec::new(),
        Weights::Positive => positive_importance(n, seed),
        Weights::WithZeros => common::importance(n, seed),
    };
    let qw = (!imatrix.is_empty()).then_some(&imatrix[..]);
    let ours = quantize(dtype, x, n, qw);
    let back = dequantize(dtype, &ours);
    let worst = worst_ratio(dtype, x, &back);
    let limit = match weights {
        Weights::None => bound(dtype).0,
        Weights::Positive => bound(dtype).1,
        Weights::WithZeros => f32::INFINITY,
    };
    prop_assert!(worst <= limit, "{dtype} {weights:?}: error {worst} x amax exceeds {limit}");
    if let Some(oracle) = common::oracle() {
        let theirs = oracle.quantize(dtype.name(), x, n, qw);
        if let Some(m) = byte_mismatch(dtype, &ours, &theirs) {
            return Err(TestCaseError::fail(format!("{dtype} {weights:?}: {m}")));
        }
    }
    Ok(())
}

macro_rules! property_tests {
    ($($name:ident => $dtype:expr,)*) => {$(
        proptest! {
            #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
            #[test]
            fn $name(x in (1usize..=2).prop_flat_map(|k| row_strategy(256 * k)),
                     weights in prop_oneof![Just(Weights::None), Just(Weights::Positive), Just(Weights::WithZeros)],
                     seed in any::<u64>()) {
                check_property($dtype, &x, weights, seed)?;
            }
        }
    )*};
}

property_tests! {
    prop_q4_0 => DType::Q4_0,
    prop_q4_1 => DType::Q4_1,
    prop_q5_0 => DType::Q5_0,
    prop_q5_1 => DType::Q5_1,
    prop_q8_0 => DType::Q8_0,
    prop_q2_k => DType::Q2K,
    prop_q3_k => DType::Q3K,
    prop_q4_k => DType::Q4K,
    prop_q5_k => DType::Q5K,
    prop_q6_k => DType::Q6K,
}

/// The worst round-trip ratios over many random rows, to set the bounds above (not a check).
#[test]
#[ignore]
fn measure_error_ratios() {
    for dtype in TYPES {
        for mode in 0..3 {
            let mut rng = common::Rng::new(42);
            let mut worst = 0.0f32;
            for r in 0..3000u64 {
                let n = 256;
                let s = 10f32.powi((rng.next_u64() % 6) as i32 - 1);
                let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * s).collect();
                match r % 4 {
                    1 => x[(rng.next_u64() % n as u64) as usize] = 40.0 * s,
                    2 => x.iter_mut().take((rng.next_u64() % 200) as usize).for_each(|v| *v = 0.0),
                    3 => x.iter_mut().for_each(|v| *v = rng.uniform() * s),
                    _ => {}
                }
                let imatrix = match mode {
                    1 => common::importance(n, r),
                    _ => positive_importance(n, r),
                };
                let qw = (mode > 0).then_some(&imatrix[..]);
                let back = dequantize(dtype, &quantize(dtype, &x, n, qw));
                worst = worst.max(worst_ratio(dtype, &x, &back));
            }
            for (case, x) in common::hostile_rows(512, 7) {
                let imatrix = match mode {
                    1 => common::importance(512, 7),
                    _ => positive_importance(512, 7),
                };
                let qw = (mode > 0).then_some(&imatrix[..]);
                let back = dequantize(dtype, &quantize(dtype, &x, 512, qw));
                let w = worst_ratio(dtype, &x, &back);
                if w > worst {
                    eprintln!("  {} mode {mode} worst from hostile {case}: {w}", dtype.name());
                }
                worst = worst.max(w);
            }
            let mode = ["plain", "imatrix-with-zeros", "imatrix-positive"][mode];
            eprintln!("{:>5} {mode}: worst {worst:.4} (bounds {:?})", dtype.name(), bound(dtype));
        }
    }
}

/// Single-thread throughput in MB/s of f32 input, per type, without and with an imatrix (not a check).
#[test]
#[ignore]
fn throughput() {
    let n_per_row = 4096;
    let nrows = 256; // 4 MiB of f32
    let mut rng = common::Rng::new(1);
    let x: Vec<f32> = (0..n_per_row * nrows).map(|_| rng.normal() * 0.02).collect();
    let imatrix = common::importance(n_per_row, 3);
    let mb = (x.len() * 4) as f64 / 1e6;
    for dtype in TYPES {
        for qw in [None, Some(&imatrix[..])] {
            // Best of three runs: the machine may be shared, and the first run pays the page faults.
            let (mut q, mut d) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                let mut out = Vec::with_capacity(x.len());
                let t = std::time::Instant::now();
                sling_quantizers::quantize_rows(dtype, &x, n_per_row, qw, &mut out).expect("quantize");
                q = q.min(t.elapsed().as_secs_f64());
                let mut back = Vec::with_capacity(x.len());
                let t = std::time::Instant::now();
                sling_quantizers::dequantize(dtype, &out, &mut back).expect("dequantize");
                d = d.min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "{:>5} {:>7}: quantize {:8.1} MB/s, dequantize {:8.1} MB/s (f32 side)",
                dtype.name(),
                if qw.is_some() { "imatrix" } else { "plain" },
                mb / q,
                mb / d
            );
        }
    }
}

/// Many rows of assorted shapes in one call per type: rounding ties (integer and half-integer grids), repeated
/// values, powers of two, sparse rows, wide dynamic range within a block, all with and without an imatrix.
#[test]
fn assorted_rows_in_one_call_match_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let n = 512;
    let mut rng = common::Rng::new(0x0a55_07ed);
    let mut x = Vec::new();
    for r in 0..48 {
        let s = 10f32.powi(r % 9 - 4);
        for i in 0..n {
            let v = match r % 8 {
                0 => ((rng.next_u64() % 33) as f32 - 16.0) * s, // integer grid: ties everywhere
                1 => ((rng.next_u64() % 65) as f32 - 32.0) * 0.5 * s, // half-integer grid
                2 => [1.0f32, -1.0, 0.5, 2.0][(rng.next_u64() % 4) as usize] * s, // few distinct values
                3 => 2f32.powi((rng.next_u64() % 40) as i32 - 20) * if i % 3 == 0 { -1.0 } else { 1.0 },
                4 => {
                    if rng.next_u64() & 15 == 0 {
                        rng.normal() * s
                    } else {
                        0.0
                    }
                } // sparse
                5 => rng.normal() * 10f32.powi((i % 13) as i32 - 6), // wide range in a block
                6 => (i % 32) as f32 * s - 7.0 * s,                  // ramps per block
                _ => rng.uniform().abs() * s,                        // all positive
            };
            x.push(v);
        }
    }
    let imatrix = common::importance(n, 99);
    let positive: Vec<f32> = imatrix.iter().map(|w| w + 0.25).collect();
    let mut failures = Vec::new();
    for dtype in TYPES {
        for (mode, qw) in [("plain", None), ("imatrix", Some(&imatrix[..])), ("imatrix+", Some(&positive[..]))] {
            let ours = quantize(dtype, &x, n, qw);
            let theirs = oracle.quantize(dtype.name(), &x, n, qw);
            if let Some(m) = byte_mismatch(dtype, &ours, &theirs) {
                failures.push(format!("quantize {} {mode}: {m}", dtype.name()));
            }
            let back = dequantize(dtype, &theirs);
            let back_ref = oracle.dequantize(dtype.name(), &theirs, x.len() / n, n);
            if let Some(m) = f32_mismatch(dtype, &back, &back_ref) {
                failures.push(format!("dequantize {} {mode}: {m}", dtype.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Non-finite and extreme inputs (NaN, ±inf, ±FLT_MAX, values whose f16 scale overflows) give llama.cpp's bytes
/// too: the C code has no guard for them, so this pins the emulated x86 conversions (`(int8_t)` of inf/NaN, the
/// `nearest_int` bit trick on inf/NaN) and the comparison orders that decide where a NaN ends up.
#[test]
fn non_finite_and_extreme_rows_match_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let n = 256;
    let mut r = common::Rng::new(5);
    let base: Vec<f32> = (0..n).map(|_| r.normal()).collect();
    let with = |i: usize, v: f32| {
        let mut a = base.clone();
        a[i] = v;
        a
    };
    let rows: Vec<(&str, Vec<f32>)> = vec![
        ("nan", with(5, f32::NAN)),
        ("inf", with(40, f32::INFINITY)),
        ("-inf", with(70, f32::NEG_INFINITY)),
        ("huge", (0..n).map(|_| r.normal() * 1e38).collect()),
        ("flt-max", (0..n).map(|i| if i % 2 == 0 { f32::MAX } else { -f32::MAX }).collect()),
        ("f16-overflow", (0..n).map(|_| r.normal() * 1e6).collect()),
        // Where a NaN sits decides what ggml's `MAX(amax, fabsf(v))` remembers (Q8_0: the scale comes from the
        // elements after the last NaN of its block; gguf-py's numpy differs here, see `quantize_row_q8_0_ggml`).
        ("nan-last-of-block", with(31, f32::NAN)),
        ("nan-first", with(0, f32::NAN)),
        ("-nan", with(17, -f32::NAN)),
        ("nan-after-outlier", {
            let mut a = with(9, f32::NAN);
            a[3] = 40.0;
            a
        }),
        ("nan-and-inf", {
            let mut a = with(12, f32::NAN);
            a[40] = f32::INFINITY;
            a[44] = f32::NAN;
            a
        }),
        ("all-nan-block", (0..n).map(|i| if i < 32 { f32::NAN } else { base[i] }).collect()),
    ];
    let imatrix = common::importance(n, 1);
    let mut failures = Vec::new();
    for dtype in TYPES {
        for (case, x) in &rows {
            for qw in [None, Some(&imatrix[..])] {
                let mode = if qw.is_some() { "imatrix" } else { "plain" };
                let ours = quantize(dtype, x, n, qw);
                let theirs = oracle.quantize(dtype.name(), x, n, qw);
                if let Some(m) = byte_mismatch(dtype, &ours, &theirs) {
                    failures.push(format!("quantize {} {mode} {case}: {m}", dtype.name()));
                }
                let back = dequantize(dtype, &theirs);
                let back_ref = oracle.dequantize(dtype.name(), &theirs, 1, n);
                if let Some(m) = f32_mismatch(dtype, &back, &back_ref) {
                    failures.push(format!("dequantize {} {mode} {case}: {m}", dtype.name()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
