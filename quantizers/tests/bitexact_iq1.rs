//! Bit-exactness of the IQ1_S and IQ1_M quantizers and dequantizers against the pinned llama.cpp
//! (`ggml_quantize_chunk` / `to_float`, through `ggml-quant-ref`; see common/mod.rs).
//!
//! Every comparison is on bytes (quantize) or `f32::to_bits` (dequantize); mismatches are collected and reported
//! with the type, the case, the first differing byte and its block, so one run shows every failing case.
//!
//! IQ1_S needs importance weights in ggml (`GGML_ASSERT(quant_weights)`); sling's `None` means weights of one, so
//! that case is compared with the oracle run on an imatrix of ones. IQ1_M is compared with and without weights.
//! Rows full of tied values check that the `qsort` of the encoders is reproduced (glibc's merge sort, see
//! `src/iq1.rs`).
//!
//! Run in release (each oracle call spawns a process):
//! `cargo test -p sling-quantizers --release --test bitexact_iq1`.

mod common;
use common::{byte_mismatch, dequantize, f32_mismatch, row_strategy};

use proptest::prelude::*;
use sling_core::DType;

const TYPES: [DType; 2] = [DType::IQ1S, DType::IQ1M];
const ROW_LENGTHS: [usize; 2] = [256, 768];
const SEEDS: [u64; 3] = [0x5eed_0001, 0x5eed_0002, 0x5eed_0003];

/// sling's bytes for `x` (rows of `n`). IQ1_S without weights goes through the row function itself:
/// `quantize_rows` may refuse it, as ggml does (`requires_imatrix`).
fn quantize(dtype: DType, x: &[f32], n: usize, qw: Option<&[f32]>) -> Vec<u8> {
    if dtype == DType::IQ1S && qw.is_none() {
        let rb = n / 256 * dtype.block_bytes();
        let mut y = vec![0u8; x.len() / n * rb];
        for (row, out) in x.chunks_exact(n).zip(y.chunks_exact_mut(rb)) {
            sling_quantizers::iq1::quantize_row_iq1_s(row, None, out);
        }
        return y;
    }
    common::quantize(dtype, x, n, qw)
}

/// Rows beyond `common::hostile_rows` aimed at these encoders: tied values in every block (the sort), both
/// zeros, a zero 32-block and a zero 16-block inside a normal row (the `GROUP_MAX_EPS` paths), blocks below the
/// IQ1_M epsilon, all-equal magnitudes with random signs, huge values whose squares overflow `sigma2` (infinite
/// weights, so every split scores NaN and the block is written as zero), and exact lattice rows. `n` is a multiple
/// of 256.
fn extra_rows(n: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut r = common::Rng::new(seed);
    let normal: Vec<f32> = (0..n).map(|_| r.normal() * 0.02).collect();
    let with = |f: &dyn Fn(&mut Vec<f32>)| {
        let mut x = normal.clone();
        f(&mut x);
        x
    };
    let mut pick =
        |vals: &[f32]| -> Vec<f32> { (0..n).map(|_| vals[(r.next_u64() % vals.len() as u64) as usize]).collect() };
    vec![
        ("ties-five-levels", pick(&[-0.02, -0.01, 0.0, 0.01, 0.02])),
        ("ties-two-values", pick(&[0.5, -0.25])),
        ("ties-with-signed-zeros", pick(&[0.0, -0.0, 0.3, -0.3, 0.3, 1.0])),
        ("equal-magnitudes", pick(&[0.7, -0.7])),
        ("ternary-lattice", pick(&[-1.125, 0.125, 1.125])),
        ("ternary-lattice-m", pick(&[-0.875, -0.125, 0.875])),
        ("all-equal", vec![0.01; n]),
        ("neg-zero", vec![-0.0; n]),
        (
            "zero-32-block",
            with(&|x| {
                for v in &mut x[32..64] {
                    *v = 0.0;
                }
            }),
        ),
        (
            "zero-16-block",
            with(&|x| {
                for v in &mut x[16..32] {
                    *v = 0.0;
                }
            }),
        ),
        (
            "below-iq1m-eps-block",
            with(&|x| {
                for v in &mut x[64..96] {
                    *v *= 1.0e-8;
                }
            }),
        ),
        ("tiny-1e-10", normal.iter().map(|v| v * 5.0e-9).collect()),
        ("huge-1e20", normal.iter().map(|v| v * 1.0e22).collect()),
        // 1e18: its square still fits in f32. At 1e20 (square infinite) IQ1_M without weights gets a NaN scale
        // and ggml aborts (`GGML_ASSERT(scale >= 0)`); see `no_panic_where_ggml_aborts`.
        ("one-huge", with(&|x| x[100] = 1.0e18)),
        ("one-hot", (0..n).map(|i| if i == n / 2 { 1.0 } else { 0.0 }).collect()),
        ("opposite-maxima", (0..n).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } * ((i % 32) as f32 / 31.0)).collect()),
        ("f16-overflow", normal.iter().map(|v| v * 5.0e6).collect()),
    ]
}

/// Importance-weight vectors beyond `common::importance`: all ones (what sling's `None` means for IQ1_S), all zero,
/// tiny, huge, and tied weights.
fn extra_weights(n: usize) -> Vec<(&'static str, Vec<f32>)> {
    vec![
        ("zero-weights", vec![0.0; n]),
        ("tiny-weights", (0..n).map(|i| 1.0e-30 * (1 + i % 7) as f32).collect()),
        ("huge-weights", (0..n).map(|i| 1.0e30 * (1 + i % 5) as f32).collect()),
        ("two-weights", (0..n).map(|i| [1.0, 2.0][i % 2]).collect()),
    ]
}

/// One oracle process per call (each `quant` call rebuilds ggml's IQ1 neighbour maps: seconds), so every
/// `(type, row length, weights)` runs all its rows in one call and compares them row by row.
struct Batch<'a> {
    oracle: &'a common::Oracle,
    failures: Vec<String>,
    rows_compared: usize,
}

impl Batch<'_> {
    /// Quantizes `rows` (each `n` long) in llama.cpp with `qw_ref`, and here with each of `ours` (mode name,
    /// weights), comparing each row's bytes; dequantizes llama.cpp's bytes both ways, comparing each row's bits.
    fn check(
        &mut self,
        dtype: DType,
        n: usize,
        ours: &[(&str, Option<&[f32]>)],
        qw_ref: Option<&[f32]>,
        rows: &[(String, Vec<f32>)],
    ) {
        let name = dtype.name();
        let all: Vec<f32> = rows.iter().flat_map(|(_, x)| x.iter().copied()).collect();
        let theirs = self.oracle.quantize(name, &all, n, qw_ref);
        let rb = n / 256 * dtype.block_bytes();
        for &(mode, qw) in ours {
            let ours = quantize(dtype, &all, n, qw);
            if ours.len() != theirs.len() {
                self.failures.push(format!("{name} {mode} n={n}: {} bytes, oracle {}", ours.len(), theirs.len()));
                continue;
            }
            for (r, (case, _)) in rows.iter().enumerate() {
                let (a, b) = (&ours[r * rb..(r + 1) * rb], &theirs[r * rb..(r + 1) * rb]);
                if let Some(m) = byte_mismatch(dtype, n, a, b) {
                    self.failures.push(format!("quantize {name} {mode} n={n} {case}: {m}"));
                }
            }
            self.rows_compared += rows.len();
        }
        let back = dequantize(dtype, &theirs);
        let back_ref = self.oracle.dequantize(name, &theirs, rows.len(), n);
        for (r, (case, _)) in rows.iter().enumerate() {
            if let Some(m) = f32_mismatch(dtype, &back[r * n..(r + 1) * n], &back_ref[r * n..(r + 1) * n]) {
                self.failures.push(format!("dequantize {name} n={n} {case}: {m}"));
            }
        }
    }
}

/// Every hostile row (common and IQ1-specific, three seeds) at 256 and 768 values per row, with an imatrix and
/// without (IQ1_S: weights of one, compared with the oracle given an imatrix of ones), and at 256 with the extra
/// weight vectors.
#[test]
fn quantize_and_dequantize_match_llama_cpp_on_hostile_rows() {
    let Some(oracle) = common::oracle() else { return };
    let mut batch = Batch { oracle: &oracle, failures: Vec::new(), rows_compared: 0 };
    for dtype in TYPES {
        let before = batch.rows_compared;
        for &n in &ROW_LENGTHS {
            let mut rows = Vec::new();
            for &seed in &SEEDS {
                for (case, x) in common::hostile_rows(n, seed).into_iter().chain(extra_rows(n, seed)) {
                    rows.push((format!("{case} seed={seed:#x}"), x));
                }
            }
            let imatrix = common::importance(n, 0x1111 ^ n as u64);
            batch.check(dtype, n, &[("imatrix", Some(&imatrix))], Some(&imatrix), &rows);
            let ones = vec![1.0f32; n];
            if dtype == DType::IQ1S {
                // sling's None is an imatrix of ones; both are compared with the oracle's run on ones.
                batch.check(dtype, n, &[("none", None), ("ones", Some(&ones))], Some(&ones), &rows);
            } else {
                batch.check(dtype, n, &[("plain", None)], None, &rows);
            }
            if n == ROW_LENGTHS[0] {
                for (mode, w) in extra_weights(n) {
                    batch.check(dtype, n, &[(mode, Some(&w))], Some(&w), &rows);
                }
            }
        }
        let rows = batch.rows_compared - before;
        eprintln!(
            "{:>6}: {rows} rows quantized byte-identical to llama.cpp's, their dequantization bit-identical",
            dtype.name()
        );
    }
    let f = &batch.failures;
    assert!(f.is_empty(), "{} mismatches:\n{}", f.len(), f.join("\n"));
}

/// Many rows of one long tensor row length (4096, as in real models) in one call, with and without an imatrix.
#[test]
fn multi_row_matrix_matches_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let (n, nrows) = (4096, 8);
    let mut rng = common::Rng::new(0xabcd);
    let x: Vec<f32> = (0..n * nrows).map(|i| rng.normal() * 0.01 * (1 + i / n) as f32).collect();
    let imatrix = common::importance(n, 0x77);
    let ones = vec![1.0f32; n];
    let mut failures = Vec::new();
    for dtype in TYPES {
        let plain_ref = if dtype == DType::IQ1S { Some(&ones[..]) } else { None };
        for (qw, qw_ref) in [(None, plain_ref), (Some(&imatrix[..]), Some(&imatrix[..]))] {
            let ours = quantize(dtype, &x, n, qw);
            let theirs = oracle.quantize(dtype.name(), &x, n, qw_ref);
            if let Some(m) = byte_mismatch(dtype, n, &ours, &theirs) {
                failures.push(format!("quantize {} imatrix={} {nrows}x{n}: {m}", dtype.name(), qw.is_some()));
            }
            let back = dequantize(dtype, &theirs);
            let back_ref = oracle.dequantize(dtype.name(), &theirs, nrows, n);
            if let Some(m) = f32_mismatch(dtype, &back, &back_ref) {
                failures.push(format!("dequantize {} {nrows}x{n}: {m}", dtype.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random block bytes dequantize exactly like llama.cpp: every grid index, scale, delta sign, and any f16
/// super-scale (infinities and NaNs included).
#[test]
fn dequantize_random_blocks_matches_llama_cpp() {
    let Some(oracle) = common::oracle() else { return };
    let mut failures = Vec::new();
    for dtype in TYPES {
        let mut rng = common::Rng::new(0xdec0de ^ dtype.block_bytes() as u64);
        let nblocks = 512;
        let y: Vec<u8> = (0..nblocks * dtype.block_bytes()).map(|_| rng.next_u64() as u8).collect();
        let ours = dequantize(dtype, &y);
        let theirs = oracle.dequantize(dtype.name(), &y, 1, nblocks * dtype.block_elems());
        if let Some(m) = f32_mismatch(dtype, &ours, &theirs) {
            failures.push(format!("dequantize {} random blocks: {m}", dtype.name()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------- properties

/// Rows whose values are rounded to a coarse step, so that most blocks hold tied values.
fn tied_strategy(n: usize) -> impl Strategy<Value = Vec<f32>> {
    (prop::collection::vec(-4i8..=4, n), 1.0e-3f32..10.0).prop_map(|(t, s)| t.iter().map(|&t| t as f32 * s).collect())
}

fn check_oracle(dtype: DType, x: &[f32], n: usize, use_imatrix: bool, seed: u64) -> Result<(), TestCaseError> {
    let imatrix = common::importance(n, seed);
    let ones = vec![1.0f32; n];
    let qw = use_imatrix.then_some(&imatrix[..]);
    let qw_ref = if use_imatrix {
        Some(&imatrix[..])
    } else if dtype == DType::IQ1S {
        Some(&ones[..])
    } else {
        None
    };
    let ours = quantize(dtype, x, n, qw);
    prop_assert_eq!(ours.len(), x.len() / 256 * dtype.block_bytes());
    if let Some(oracle) = common::oracle() {
        let theirs = oracle.quantize(dtype.name(), x, n, qw_ref);
        if let Some(m) = byte_mismatch(dtype, n, &ours, &theirs) {
            return Err(TestCaseError::fail(format!("{dtype} imatrix={use_imatrix}: {m}")));
        }
    }
    Ok(())
}

// Each case quantizes several rows in one oracle call (one process start rebuilds ggml's neighbour maps).
proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]
    #[test]
    fn prop_iq1_s(rows in prop::collection::vec(row_strategy(512), 6), use_imatrix in any::<bool>(),
                  seed in any::<u64>()) {
        check_oracle(DType::IQ1S, &rows.concat(), 512, use_imatrix, seed)?;
    }
    #[test]
    fn prop_iq1_m(rows in prop::collection::vec(row_strategy(512), 6), use_imatrix in any::<bool>(),
                  seed in any::<u64>()) {
        check_oracle(DType::IQ1M, &rows.concat(), 512, use_imatrix, seed)?;
    }
    #[test]
    fn prop_iq1_s_ties(rows in prop::collection::vec(tied_strategy(512), 6), use_imatrix in any::<bool>(),
                       seed in any::<u64>()) {
        check_oracle(DType::IQ1S, &rows.concat(), 512, use_imatrix, seed)?;
    }
    #[test]
    fn prop_iq1_m_ties(rows in prop::collection::vec(tied_strategy(512), 6), use_imatrix in any::<bool>(),
                       seed in any::<u64>()) {
        check_oracle(DType::IQ1M, &rows.concat(), 512, use_imatrix, seed)?;
    }
}

/// Rows on which ggml aborts (a NaN scale, or no grid point scoring below `FLT_MAX`, from infinite or NaN
/// weights): nothing to compare with, but sling must not panic and must fill the whole output.
#[test]
fn no_panic_where_ggml_aborts() {
    let n = 512;
    let mut r = common::Rng::new(9);
    let normal: Vec<f32> = (0..n).map(|_| r.normal() * 0.02).collect();
    let with = |i: usize, v: f32| {
        let mut x = normal.clone();
        x[i] = v;
        x
    };
    let rows = [
        with(100, 1.0e20),
        with(7, f32::INFINITY),
        with(300, f32::NEG_INFINITY),
        with(31, f32::NAN),
        with(0, f32::MAX),
        vec![f32::MAX; n],
        vec![1.0e20; n],
        vec![f32::NAN; n],
        (0..n).map(|i| if i % 2 == 0 { f32::INFINITY } else { 1.0 }).collect(),
    ];
    let imatrix = common::importance(n, 5);
    let huge = vec![1.0e30f32; n];
    for dtype in TYPES {
        for x in &rows {
            for qw in [None, Some(&imatrix[..]), Some(&huge[..])] {
                let y = quantize(dtype, x, n, qw);
                assert_eq!(y.len(), n / 256 * dtype.block_bytes());
                assert_eq!(dequantize(dtype, &y).len(), n);
            }
        }
    }
}

/// Single-thread throughput in MB/s of f32 input, per type, without and with an imatrix (not a check).
#[test]
#[ignore]
fn throughput() {
    let n_per_row = 4096;
    let nrows = 64;
    let mut rng = common::Rng::new(1);
    let x: Vec<f32> = (0..n_per_row * nrows).map(|_| rng.normal() * 0.02).collect();
    let imatrix = common::importance(n_per_row, 3);
    for dtype in TYPES {
        common::print_throughput(dtype, &x, n_per_row, &imatrix);
    }
}
