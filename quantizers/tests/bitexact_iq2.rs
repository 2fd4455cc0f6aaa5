//! Bit-exactness of the IQ2_XXS, IQ2_XS and IQ2_S quantizers and dequantizers against the pinned llama.cpp
//! (`ggml_quantize_chunk` / `to_float`, through `ggml-quant-ref`; see common/mod.rs).
//!
//! Every comparison is on bytes (quantize) or `f32::to_bits` (dequantize); mismatches are collected and reported
//! with the type, the case, the first differing byte and its block, so one run shows every failing case.
//!
//! The oracle runs `iq2xs_init_impl` in every process it starts (seconds for IQ2_S), so the rows are batched: all
//! cases of one row length and one weight vector go to llama.cpp in one call, and are compared case by case.
//! IQ2_XXS and IQ2_XS are compared with importance weights only (ggml asserts them); IQ2_S with and without.
//! Non-finite rows are not compared: ggml aborts on them (`GGML_ASSERT(scale >= 0)` or the off-grid abort).
//!
//! Run in release: `cargo test -p sling-quantizers --release --test bitexact_iq2`.
//! Throughput: `... --test bitexact_iq2 -- --ignored --nocapture throughput`.

mod common;
use common::{byte_mismatch, dequantize, f32_mismatch, quantize, row_strategy};

use proptest::prelude::*;
use sling_core::DType;

/// The types under test. `DType::name()` is the `ggml_type_name` spelling the oracle expects.
const TYPES: [DType; 3] = [DType::IQ2XXS, DType::IQ2XS, DType::IQ2S];

/// Seeds of the hostile rows and importance weights.
const SEEDS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];

/// Rows beyond `common::hostile_rows` that reach the corners of the IQ2 searches (`n` a multiple of 256): exact
/// ties of `nearest_int` and of neighbour distances, equal magnitudes (the parity fold's `w*x*x` minimum ties, first
/// wins), a zero group and a zero super-block inside a normal row, groups at the `GROUP_MAX_EPS` thresholds, huge
/// values (weighted sums overflow to inf), and signed zeros.
fn extra_rows(n: usize, seed: u64) -> Vec<(String, Vec<f32>)> {
    let mut r = common::Rng::new(seed);
    let normal: Vec<f32> = (0..n).map(|_| r.normal() * 0.02).collect();
    let with = |f: &dyn Fn(&mut Vec<f32>)| {
        let mut x = normal.clone();
        f(&mut x);
        x
    };
    let mut rows: Vec<(&str, Vec<f32>)> = vec![
        ("quarter-steps", (0..n).map(|i| (i % 5) as f32 * 0.25 * if i % 3 == 0 { -1.0 } else { 1.0 }).collect()),
        ("level-ties", (0..n).map(|i| [1.0f32, 3.0, 5.0, 2.0, 4.0, 0.0, 6.0, 5.0][i % 8] * 0.125).collect()),
        ("equal-magnitudes", (0..n).map(|_| if r.next_u64() & 1 == 0 { 0.5 } else { -0.5 }).collect()),
        // Exactly one negative per 8: odd parity, and every w*x*x equal (constant weights give imin = 0).
        ("odd-parity-equal", (0..n).map(|i| if i % 8 == 5 { -0.75 } else { 0.75 }).collect()),
        ("all-negative-equal", vec![-1.25; n]),
        (
            "zero-group",
            with(&|x| {
                x[32..64].fill(0.0);
                x[80..96].fill(0.0);
            }),
        ),
        ("below-group-eps", (0..n).map(|_| r.normal() * 1.0e-16).collect()),
        ("below-iq2s-eps", (0..n).map(|_| r.normal() * 1.0e-9).collect()),
        ("near-iq2s-eps", (0..n).map(|_| r.normal() * 2.0e-8).collect()),
        ("huge", (0..n).map(|_| r.normal() * 1.0e12).collect()),
        ("huge-outlier", with(&|x| x[17] = 1.0e17)),
        ("neg-zero", vec![-0.0; n]),
        ("one-hot", (0..n).map(|i| if i == n / 2 { 1.0 } else { 0.0 }).collect()),
        ("alternating", (0..n).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } * ((i % 32) as f32 / 31.0)).collect()),
        ("sparse", (0..n).map(|i| if i % 8 == 3 { r.normal() } else { 0.0 }).collect()),
    ];
    if n >= 512 {
        rows.push(("zero-superblock", with(&|x| x[256..512].fill(0.0))));
    }
    rows.into_iter().map(|(k, x)| (k.to_string(), x)).collect()
}

/// Rows like trained weights: roughly normal at several magnitudes, a few with an outlier.
fn random_rows(n: usize, count: usize, seed: u64) -> Vec<(String, Vec<f32>)> {
    let mut r = common::Rng::new(seed);
    (0..count)
        .map(|k| {
            let s = 10f32.powi((k % 7) as i32 - 4);
            let mut x: Vec<f32> = (0..n).map(|_| r.normal() * s).collect();
            if k % 3 == 1 {
                x[(r.next_u64() % n as u64) as usize] = 20.0 * s;
            }
            (format!("random-{seed:#x}-{k}"), x)
        })
        .collect()
}

/// Importance-weight vectors beyond `common::importance`: all zero (every group falls back to scale 0), tiny, huge.
fn extra_weights(n: usize) -> Vec<(&'static str, Vec<f32>)> {
    vec![
        ("zero-weights", vec![0.0; n]),
        ("tiny-weights", (0..n).map(|i| 1.0e-30 * (1 + i % 7) as f32).collect()),
        ("huge-weights", (0..n).map(|i| 1.0e30 * (1 + i % 5) as f32).collect()),
    ]
}

/// Quantizes all `cases` (rows of `n`) in one call each side, compares the bytes case by case, then dequantizes
/// the oracle's bytes both ways (independent of our quantizer). Returns the number of rows found byte-identical.
fn check_batch(
    oracle: &common::Oracle,
    dtype: DType,
    n: usize,
    cases: &[(String, Vec<f32>)],
    mode: &str,
    qw: Option<&[f32]>,
    failures: &mut Vec<String>,
) -> usize {
    let name = dtype.name();
    let all: Vec<f32> = cases.iter().flat_map(|(_, x)| x.iter().copied()).collect();
    let ours = quantize(dtype, &all, n, qw);
    let theirs = oracle.quantize(name, &all, n, qw);
    let row_bytes = n / dtype.block_elems() * dtype.block_bytes();
    if ours.len() != theirs.len() {
        failures.push(format!("quantize {name} {mode} n={n}: length {} vs oracle {}", ours.len(), theirs.len()));
        return 0;
    }
    let mut identical = 0;
    for (i, (case, _)) in cases.iter().enumerate() {
        let r = i * row_bytes..(i + 1) * row_bytes;
        match byte_mismatch(dtype, n, &ours[r.clone()], &theirs[r]) {
            Some(m) => failures.push(format!("quantize {name} {mode} n={n} {case}: {m}")),
            None => identical += 1,
        }
    }
    let back = dequantize(dtype, &theirs);
    let back_ref = oracle.dequantize(name, &theirs, cases.len(), n);
    if let Some(m) = f32_mismatch(dtype, &back, &back_ref) {
        failures.push(format!("dequantize {name} {mode} n={n}: {m}"));
    }
    identical
}

#[test]
fn quantize_and_dequantize_match_llama_cpp_on_hostile_rows() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for dtype in TYPES {
        let (mut rows_cmp, mut rows_same) = (0, 0);
        for n in [256, 512] {
            let mut cases: Vec<(String, Vec<f32>)> = Vec::new();
            for &seed in &SEEDS {
                for (k, x) in common::hostile_rows(n, seed).into_iter().map(|(k, x)| (k.to_string(), x)) {
                    cases.push((format!("{k}/{seed:#x}"), x));
                }
                for (k, x) in extra_rows(n, seed) {
                    cases.push((format!("{k}/{seed:#x}"), x));
                }
            }
            cases.extend(random_rows(n, 12, n as u64));
            let mut weights: Vec<(String, Option<Vec<f32>>)> =
                SEEDS.iter().map(|&s| (format!("imatrix/{s:#x}"), Some(common::importance(n, s ^ 0x1111)))).collect();
            if dtype == DType::IQ2S {
                weights.push(("plain".into(), None));
            }
            for (mode, qw) in &weights {
                rows_same += check_batch(&oracle, dtype, n, &cases, mode, qw.as_deref(), &mut failures);
                rows_cmp += cases.len();
            }
            if n == 256 {
                // Extreme weights only on rows with |x| <= 10: huge weights times large values make the weighted
                // sums inf and then NaN, and ggml aborts (the "point not on grid" check), so there is nothing to
                // compare with.
                let moderate: Vec<(String, Vec<f32>)> =
                    cases.iter().filter(|(_, x)| x.iter().all(|v| v.abs() <= 10.0)).cloned().collect();
                for (mode, w) in extra_weights(n) {
                    rows_same += check_batch(&oracle, dtype, n, &moderate, mode, Some(&w), &mut failures);
                    rows_cmp += moderate.len();
                }
            }
        }
        report.push(format!("{:>7}: {rows_same} of {rows_cmp} rows byte-identical", dtype.name()));
    }
    for line in &report {
        eprintln!("{line}");
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Many rows of one long tensor row length (4096, as in real models) in one call, plus 1024-long random rows.
#[test]
fn multi_row_matrix_matches_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let (n, nrows) = (4096, 12);
    let mut rng = common::Rng::new(0xabcd);
    let matrix: Vec<(String, Vec<f32>)> = (0..nrows)
        .map(|r| (format!("row {r}"), (0..n).map(|_| rng.normal() * 0.01 * (1 + r) as f32).collect()))
        .collect();
    let imatrix = common::importance(n, 0x77);
    let long = random_rows(1024, 16, 0x1024);
    let imatrix_1024 = common::importance(1024, 0x78);
    let mut failures = Vec::new();
    for dtype in TYPES {
        check_batch(&oracle, dtype, n, &matrix, "imatrix", Some(&imatrix), &mut failures);
        check_batch(&oracle, dtype, 1024, &long, "imatrix", Some(&imatrix_1024), &mut failures);
        if dtype == DType::IQ2S {
            check_batch(&oracle, dtype, n, &matrix, "plain", None, &mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random block bytes dequantize exactly like llama.cpp: any f16 scale (infinities and NaNs included), every grid
/// index, sign pattern and sub-scale nibble.
#[test]
fn dequantize_random_blocks_matches_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    for dtype in TYPES {
        let mut rng = common::Rng::new(0xdec0de ^ dtype.block_bytes() as u64);
        let nblocks = 1024;
        let y: Vec<u8> = (0..nblocks * dtype.block_bytes()).map(|_| rng.next_u64() as u8).collect();
        let ours = dequantize(dtype, &y);
        let theirs = oracle.dequantize(dtype.name(), &y, 1, nblocks * dtype.block_elems());
        if let Some(m) = f32_mismatch(dtype, &ours, &theirs) {
            failures.push(format!("dequantize {} random blocks: {m}", dtype.name()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Without weights, IQ2_XXS and IQ2_XS are refused (ggml's `ggml_quantize_requires_imatrix`), IQ2_S is not.
#[test]
fn imatrix_is_required_for_iq2_xxs_and_iq2_xs() {
    let x = vec![0.25f32; 256];
    for dtype in TYPES {
        let mut out = Vec::new();
        let r = sling_quantizers::quantize_rows(dtype, &x, 256, None, &mut out);
        if dtype == DType::IQ2S {
            assert!(r.is_ok());
            assert_eq!(out.len(), dtype.block_bytes());
        } else {
            assert_eq!(r, Err(sling_quantizers::EncodeError::ImatrixRequired(dtype)));
            assert!(sling_quantizers::requires_imatrix(dtype));
        }
    }
}

// ---------------------------------------------------------------- properties

fn check_property(dtype: DType, x: &[f32], use_imatrix: bool, seed: u64) -> Result<(), TestCaseError> {
    let n = x.len();
    let imatrix = common::importance(n, seed);
    let qw = (use_imatrix || dtype != DType::IQ2S).then_some(&imatrix[..]);
    let ours = quantize(dtype, x, n, qw);
    let back = dequantize(dtype, &ours);
    prop_assert_eq!(back.len(), n);
    // All-zero 256-blocks come back as zeros (max below GROUP_MAX_EPS: scale 0).
    for (xb, bb) in x.chunks_exact(256).zip(back.chunks_exact(256)) {
        if xb.iter().all(|v| *v == 0.0) {
            prop_assert!(bb.iter().all(|v| *v == 0.0), "{dtype}: zero block does not round-trip");
        }
    }
    if let Some(oracle) = common::oracle() {
        let theirs = oracle.quantize(dtype.name(), x, n, qw);
        if let Some(m) = byte_mismatch(dtype, n, &ours, &theirs) {
            return Err(TestCaseError::fail(format!("{dtype} imatrix={}: {m}", qw.is_some())));
        }
        let back_ref = oracle.dequantize(dtype.name(), &ours, 1, n);
        if let Some(m) = f32_mismatch(dtype, &back, &back_ref) {
            return Err(TestCaseError::fail(format!("{dtype} dequantize: {m}")));
        }
    }
    Ok(())
}

// Few cases: every case starts the oracle, which builds the neighbour maps anew (seconds for IQ2_S).
macro_rules! property_tests {
    ($($name:ident => $dtype:expr, $cases:expr;)*) => {$(
        proptest! {
            #![proptest_config(ProptestConfig { cases: $cases, ..ProptestConfig::default() })]
            #[test]
            fn $name(x in (1usize..=2).prop_flat_map(|k| row_strategy(256 * k)), use_imatrix in any::<bool>(),
                     seed in any::<u64>()) {
                check_property($dtype, &x, use_imatrix, seed)?;
            }
        }
    )*};
}

property_tests! {
    prop_iq2_xxs => DType::IQ2XXS, 8;
    prop_iq2_xs => DType::IQ2XS, 6;
    prop_iq2_s => DType::IQ2S, 4;
}

/// Single-thread throughput in MB/s of f32 input, per type (not a check). The maps are built before timing.
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
