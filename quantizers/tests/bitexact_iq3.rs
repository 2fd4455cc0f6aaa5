//! Bit-exactness of the IQ3_XXS and IQ3_S quantizers and dequantizers against the pinned llama.cpp
//! (`ggml_quantize_chunk` / `to_float`, through `ggml-quant-ref`; see common/mod.rs).
//!
//! Every comparison is on bytes (quantize) or `f32::to_bits` (dequantize); mismatches are collected and reported
//! with the type, the case, the first differing byte and its block, so one run shows every failing case.
//!
//! Run in release (each oracle call spawns a process):
//! `cargo test -p sling-quantizers --release --test bitexact_iq3`.
//! Throughput: `... --test bitexact_iq3 -- --ignored --nocapture throughput`.

mod common;
use common::{byte_mismatch, dequantize, f32_mismatch, quantize, row_strategy};

use proptest::prelude::*;
use sling_core::DType;

/// The types under test. `DType::name()` is the `ggml_type_name` spelling the oracle expects.
const TYPES: [DType; 2] = [DType::IQ3XXS, DType::IQ3S];

/// Row lengths of the hostile-row cases (multiples of 256).
const ROW_LENGTHS: [usize; 2] = [256, 512];
/// Seeds of the hostile rows and importance weights.
const SEEDS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];

/// Rows beyond `common::hostile_rows` that reach the corners of the IQ3 searches: a zero 32-block inside a normal
/// row (the C `continue`s, leaving zero bytes and scale 0), 32-blocks whose max is just above / below
/// `GROUP_MAX_EPS_IQ3_XXS` (1e-8), equal magnitudes with every sign pattern (odd parity flips the smallest
/// `w*x²`, first wins on ties), points exactly between two levels (`nearest_int` ties), exact grid points, huge and
/// f16-overflowing values, lone values per block and negative zeros. `n` is a multiple of 256.
fn extra_rows(n: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut r = common::Rng::new(seed);
    let normal: Vec<f32> = (0..n).map(|_| r.normal() * 0.02).collect();
    let with = |f: &dyn Fn(&mut Vec<f32>)| {
        let mut x = normal.clone();
        f(&mut x);
        x
    };
    vec![
        ("zero-32-block", with(&|x| x[64..96].fill(0.0))),
        ("zero-32-blocks-alternating", with(&|x| x.chunks_exact_mut(64).for_each(|c| c[..32].fill(0.0)))),
        (
            "near-eps-blocks",
            (0..n)
                .map(|i| [2e-8f32, 1e-8, 0.99e-8, 5e-9][(i / 32) % 4] * if i % 3 == 0 { -1.0 } else { 0.7 })
                .collect(),
        ),
        ("all-equal-magnitudes", (0..n).map(|i| if (i * 7 + i / 5) % 3 == 0 { -0.5 } else { 0.5 }).collect()),
        ("one-negative-per-8", (0..n).map(|i| if i % 8 == 3 { -1.0 } else { 1.0 }).collect()),
        ("sign-patterns", (0..n).map(|i| if (i / 8) >> (i % 8) & 1 == 1 { -1.0 } else { 1.0 }).collect()),
        // With max = 15 the first trial has id = (15 - 3)/15; values at odd halves put `0.5*(id*x - 1)` on .5.
        ("level-ties", (0..n).map(|i| if i % 32 == 0 { 15.0 } else { [2.5f32, 5.0, 7.5, 10.0][i % 4] }).collect()),
        ("grid-levels", (0..n).map(|i| (2 * ((i * 5 + i / 7) % 8) + 1) as f32).collect()),
        ("ramp-per-block", (0..n).map(|i| (i % 32) as f32 - 15.5).collect()),
        ("huge", (0..n).map(|_| r.normal() * 1.0e12).collect()),
        ("f16-overflow", (0..n).map(|_| r.normal() * 1.0e6).collect()),
        ("one-per-block", (0..n).map(|i| if i % 32 == 17 { 1.0 + i as f32 } else { 0.0 }).collect()),
        ("one-hot", (0..n).map(|i| if i == n / 2 { -1.0 } else { 0.0 }).collect()),
        ("neg-zero", vec![-0.0; n]),
        ("neg-zero-and-values", with(&|x| x.iter_mut().step_by(3).for_each(|v| *v = -0.0))),
        ("two-levels", (0..n).map(|i| if i % 5 == 0 { 3.0 } else { 0.1 }).collect()),
    ]
}

/// Importance-weight vectors beyond `common::importance`: all zero (every weighted sum is 0, so the searches keep
/// their starting scale), tiny, huge, and zero on one 32-block.
fn extra_weights(n: usize) -> Vec<(&'static str, Vec<f32>)> {
    vec![
        ("zero-weights", vec![0.0; n]),
        ("tiny-weights", (0..n).map(|i| 1.0e-30 * (1 + i % 7) as f32).collect()),
        ("huge-weights", (0..n).map(|i| 1.0e30 * (1 + i % 5) as f32).collect()),
        (
            "zero-block-weights",
            (0..n).map(|i| if (32..64).contains(&i) { 0.0 } else { 1.0 + (i % 3) as f32 }).collect(),
        ),
    ]
}

/// What one comparison found.
#[derive(PartialEq)]
enum Outcome {
    /// Bytes and dequantized bits identical.
    Same,
    /// llama.cpp aborts (a `GGML_ASSERT`, on inputs whose weighted errors overflow); sling writes its deterministic
    /// block instead (no panic: the call returned).
    BothAbort,
    /// A mismatch, recorded in the failures.
    Differ,
}

/// Quantizes with sling and the oracle and dequantizes the oracle's bytes both ways; pushes mismatches.
fn compare(
    oracle: &common::Oracle,
    dtype: DType,
    x: &[f32],
    n: usize,
    qw: Option<&[f32]>,
    what: &str,
    failures: &mut Vec<String>,
) -> Outcome {
    let name = dtype.name();
    let ours = quantize(dtype, x, n, qw);
    let theirs = match oracle.try_quantize(name, x, n, qw) {
        Ok(theirs) => {
            if let Some(m) = byte_mismatch(dtype, n, &ours, &theirs) {
                failures.push(format!("quantize {name} {what}: {m}"));
                return Outcome::Differ;
            }
            theirs
        }
        Err(_) => return Outcome::BothAbort,
    };
    let back = dequantize(dtype, &theirs);
    let back_ref = oracle.dequantize(name, &theirs, x.len() / n, n);
    if let Some(m) = f32_mismatch(dtype, &back, &back_ref) {
        failures.push(format!("dequantize {name} {what}: {m}"));
        return Outcome::Differ;
    }
    Outcome::Same
}

/// Counts of rows compared per type: identical without / with importance weights, and both aborting.
#[derive(Default, Clone, Copy)]
struct Tally {
    plain: usize,
    imatrix: usize,
    abort: usize,
}

#[test]
fn quantize_and_dequantize_match_llama_cpp_on_hostile_rows() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    let mut tally = [Tally::default(); TYPES.len()];
    for (ti, &dtype) in TYPES.iter().enumerate() {
        for &n in &ROW_LENGTHS {
            for &seed in &SEEDS {
                let mut rows = common::hostile_rows(n, seed);
                rows.extend(extra_rows(n, seed));
                let imatrix = common::importance(n, seed ^ 0x1111);
                let mut weights: Vec<(&str, Option<Vec<f32>>)> = vec![("plain", None), ("imatrix", Some(imatrix))];
                if seed == SEEDS[0] {
                    weights.extend(extra_weights(n).into_iter().map(|(k, w)| (k, Some(w))));
                }
                for (mode, qw) in &weights {
                    let qw = qw.as_deref();
                    let mut count = |o: Outcome, nrows: usize| {
                        let t = &mut tally[ti];
                        match o {
                            Outcome::Same if qw.is_some() => t.imatrix += nrows,
                            Outcome::Same => t.plain += nrows,
                            Outcome::BothAbort => t.abort += nrows,
                            Outcome::Differ => {}
                        }
                    };
                    let what = |case: &str| format!("{mode} n={n} seed={seed:#x} {case}");
                    // One oracle call for all rows (each spawn pays ggml_quantize_init), each row's bytes compared
                    // with sling's quantization of that row alone and of all rows in one call. Where llama.cpp
                    // aborts on some row, row by row instead, then the others in one call.
                    let all: Vec<f32> = rows.iter().flat_map(|(_, x)| x.iter().copied()).collect();
                    let Ok(theirs) = oracle.try_quantize(dtype.name(), &all, n, qw) else {
                        let mut rest = Vec::new();
                        for (case, x) in &rows {
                            let o = compare(&oracle, dtype, x, n, qw, &what(case), &mut failures);
                            if o != Outcome::BothAbort {
                                rest.extend_from_slice(x);
                            }
                            count(o, 1);
                        }
                        let o = compare(&oracle, dtype, &rest, n, qw, &what("all-rows-in-one-call"), &mut failures);
                        if o != Outcome::Same {
                            failures.push(format!("{} {}: not identical", dtype.name(), what("all-rows-in-one-call")));
                        }
                        continue;
                    };
                    let rb = n / dtype.block_elems() * dtype.block_bytes();
                    let back = dequantize(dtype, &theirs);
                    let back_ref = oracle.dequantize(dtype.name(), &theirs, rows.len(), n);
                    let ours_all = quantize(dtype, &all, n, qw);
                    if let Some(m) = byte_mismatch(dtype, n, &ours_all, &theirs) {
                        failures.push(format!("quantize {} {}: {m}", dtype.name(), what("all-rows-in-one-call")));
                    }
                    for (i, (case, x)) in rows.iter().enumerate() {
                        let ours = quantize(dtype, x, n, qw);
                        let mut same = true;
                        if let Some(m) = byte_mismatch(dtype, n, &ours, &theirs[i * rb..(i + 1) * rb]) {
                            failures.push(format!("quantize {} {}: {m}", dtype.name(), what(case)));
                            same = false;
                        }
                        if let Some(m) = f32_mismatch(dtype, &back[i * n..(i + 1) * n], &back_ref[i * n..(i + 1) * n]) {
                            failures.push(format!("dequantize {} {}: {m}", dtype.name(), what(case)));
                            same = false;
                        }
                        count(if same { Outcome::Same } else { Outcome::Differ }, 1);
                    }
                }
            }
        }
    }
    for (dtype, t) in TYPES.iter().zip(&tally) {
        eprintln!(
            "{:>7}: {} rows identical without imatrix, {} with; {} where llama.cpp aborts",
            dtype.name(),
            t.plain,
            t.imatrix,
            t.abort
        );
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Random rows like trained weights (several seeds and scales, row lengths 256 to 2048), with and without an
/// imatrix.
#[test]
fn random_rows_match_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    let mut rows = 0;
    for dtype in TYPES {
        for (si, &n) in [256usize, 512, 768, 1024, 2048].iter().enumerate() {
            for seed in 0..4u64 {
                let mut r = common::Rng::new(0x1234 + 17 * seed + si as u64);
                let s = 10f32.powi(seed as i32 - 2);
                let x: Vec<f32> = (0..n * 3).map(|_| r.normal() * s).collect();
                let imatrix = common::importance(n, seed ^ 0x99);
                for qw in [None, Some(&imatrix[..])] {
                    let what = format!("imatrix={} n={n} seed={seed}", qw.is_some());
                    if compare(&oracle, dtype, &x, n, qw, &what, &mut failures) == Outcome::BothAbort {
                        failures.push(format!("{} {what}: unexpected abort", dtype.name()));
                    }
                    rows += 3;
                }
            }
        }
    }
    eprintln!("{rows} random rows compared");
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Many rows of one long tensor row length (4096, as in real models) in one call, with and without an imatrix.
#[test]
fn multi_row_matrix_matches_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let (n, nrows) = (4096, 16);
    let mut rng = common::Rng::new(0xabcd);
    let x: Vec<f32> = (0..n * nrows).map(|i| rng.normal() * 0.01 * (1 + i / n) as f32).collect();
    let imatrix = common::importance(n, 0x77);
    let mut failures = Vec::new();
    for dtype in TYPES {
        for qw in [None, Some(&imatrix[..])] {
            let what = format!("imatrix={} {nrows}x{n}", qw.is_some());
            if compare(&oracle, dtype, &x, n, qw, &what, &mut failures) == Outcome::BothAbort {
                failures.push(format!("{} {what}: unexpected abort", dtype.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Non-finite and extreme inputs: where llama.cpp aborts (`GGML_ASSERT(grid_index >= 0)` in
/// `iq3_find_best_neighbour` when every neighbour's weighted error is inf or NaN, e.g. values around 1e15 whose
/// `w*diff*diff` overflows, or `GGML_ASSERT(scale >= 0)` on a NaN scale) sling returns a block without panicking;
/// otherwise the bytes are llama.cpp's.
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
        ("nan-last-of-block", with(31, f32::NAN)),
        ("neg-nan-first", with(0, -f32::NAN)),
        ("inf", with(40, f32::INFINITY)),
        ("-inf", with(70, f32::NEG_INFINITY)),
        ("huge-1e15", (0..n).map(|_| r.normal() * 1e15).collect()),
        ("huge-1e20", (0..n).map(|_| r.normal() * 1e20).collect()),
        ("huge-1e38", (0..n).map(|_| r.normal() * 1e38).collect()),
        ("flt-max", (0..n).map(|i| if i % 2 == 0 { f32::MAX } else { -f32::MAX }).collect()),
        ("one-1e13", with(9, 1e13)),
        ("one-1e16", with(9, 1e16)),
        ("one-1e20", with(9, 1e20)),
    ];
    let imatrix = common::importance(n, 1);
    let mut failures = Vec::new();
    let (mut same, mut both_abort) = (0, 0);
    for dtype in TYPES {
        for (case, x) in &rows {
            for qw in [None, Some(&imatrix[..])] {
                let what = format!("imatrix={} {case}", qw.is_some());
                match compare(&oracle, dtype, x, n, qw, &what, &mut failures) {
                    Outcome::Same => same += 1,
                    Outcome::BothAbort => both_abort += 1,
                    Outcome::Differ => {}
                }
            }
        }
    }
    eprintln!("{same} rows identical, {both_abort} where llama.cpp aborts (sling: a block, no panic)");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random block bytes dequantize exactly like llama.cpp: any f16 scale (infinities and NaNs included), every grid
/// index (IQ3_S's 9th bit), sign pattern and 4-bit sub-scale.
#[test]
fn dequantize_random_blocks_matches_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    for dtype in TYPES {
        let mut rng = common::Rng::new(0xdec0de ^ dtype.block_bytes() as u64);
        let nblocks = 1024;
        let mut y: Vec<u8> = (0..nblocks * dtype.block_bytes()).map(|_| rng.next_u64() as u8).collect();
        // Every f16 exponent, with both signs, including 0x7c00 (inf) and NaNs.
        for (i, blk) in y.chunks_exact_mut(dtype.block_bytes()).enumerate() {
            if i % 2 == 0 {
                blk[1] = (blk[1] & 0x83) | (((i / 2) as u8 % 32) << 2);
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

// ---------------------------------------------------------------- properties

fn check_oracle(dtype: DType, x: &[f32], use_imatrix: bool, seed: u64) -> Result<(), TestCaseError> {
    let n = x.len();
    let imatrix = common::importance(n, seed);
    let qw = use_imatrix.then_some(&imatrix[..]);
    let ours = quantize(dtype, x, n, qw);
    let back = dequantize(dtype, &ours);
    prop_assert_eq!(back.len(), n);
    if let Some(oracle) = common::oracle() {
        let theirs = oracle.quantize(dtype.name(), x, n, qw);
        if let Some(m) = byte_mismatch(dtype, n, &ours, &theirs) {
            return Err(TestCaseError::fail(format!("{dtype} imatrix={use_imatrix}: {m}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn prop_iq3_xxs(x in (1usize..=2).prop_flat_map(|k| row_strategy(256 * k)), use_imatrix in any::<bool>(),
                    seed in any::<u64>()) {
        check_oracle(DType::IQ3XXS, &x, use_imatrix, seed)?;
    }
    #[test]
    fn prop_iq3_s(x in (1usize..=2).prop_flat_map(|k| row_strategy(256 * k)), use_imatrix in any::<bool>(),
                  seed in any::<u64>()) {
        check_oracle(DType::IQ3S, &x, use_imatrix, seed)?;
    }
}

/// Single-thread throughput in MB/s of f32 input, per type, without and with an imatrix (not a check).
#[test]
#[ignore]
fn throughput() {
    let n_per_row = 4096;
    let nrows = 64; // 1 MiB of f32
    let mut rng = common::Rng::new(1);
    let x: Vec<f32> = (0..n_per_row * nrows).map(|_| rng.normal() * 0.02).collect();
    let imatrix = common::importance(n_per_row, 3);
    for dtype in TYPES {
        common::print_throughput(dtype, &x, n_per_row, &imatrix);
    }
}
