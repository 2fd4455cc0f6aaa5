//! The code that ships under the llama.cpp oracle: [`sling_kernels::quantize_rows`] — the dispatched path the
//! binary runs (AVX2 kernels where the CPU has AVX2, unless `SLING_NO_SIMD=1`) — against the pinned
//! `ggml_quantize_chunk` (`ggml-quant-ref`, quantizers/tests/common), on the hostile rows and the non-finite and
//! extreme ones, for every block type sling writes, with and without importance weights.
//!
//! The quantizers' own bit-exactness tests run the scalar reference; the SIMD twins are tested against that
//! reference on random rows (kernels/src, proptest). This closes the triangle on exactly the inputs where
//! vectorised code goes wrong: NaN, ±Inf, ±FLT_MAX, subnormals, all-zero and constant blocks. Where llama.cpp
//! itself aborts (a `GGML_ASSERT` on a NaN in the i-quant searches) there are no bytes to match; those cases
//! must still give the scalar reference's bytes and are counted in the output.

#[path = "../../quantizers/tests/common/mod.rs"]
mod common;

use sling_core::DType;

/// Every block type sling writes: those of the descriptor table with a block quantizer here.
fn types() -> Vec<DType> {
    DType::ALL
        .iter()
        .copied()
        .filter(|&d| d.is_quantized() && scalar(d, &[0.0; 256], 256, Some(&[1.0; 256])).is_ok())
        .collect()
}

fn shipped(dtype: DType, x: &[f32], n: usize, qw: Option<&[f32]>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    sling_kernels::quantize_rows(dtype, x, n, qw, &mut out).map(|()| out).map_err(|e| e.to_string())
}

fn scalar(dtype: DType, x: &[f32], n: usize, qw: Option<&[f32]>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    sling_quantizers::quantize_rows(dtype, x, n, qw, &mut out).map(|()| out).map_err(|e| e.to_string())
}

/// Rows of 256 with NaN, ±Inf and extreme magnitudes in chosen places (where a NaN sits decides what ggml's
/// `MAX`-based searches remember), after the hostile rows of the quantizer tests.
fn rows(n: usize) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> =
        common::hostile_rows(n, 0x5eed_0003).into_iter().map(|(c, x)| (c.to_string(), x)).collect();
    let mut r = common::Rng::new(11);
    let base: Vec<f32> = (0..n).map(|_| r.normal()).collect();
    let with = |at: &[(usize, f32)]| {
        let mut a = base.clone();
        for &(i, x) in at {
            a[i] = x;
        }
        a
    };
    v.extend([
        ("nan".to_string(), with(&[(5, f32::NAN)])),
        ("nan-last-of-block".to_string(), with(&[(31, f32::NAN)])),
        ("-nan".to_string(), with(&[(100, -f32::NAN)])),
        ("nan-after-outlier".to_string(), with(&[(3, 40.0), (9, f32::NAN)])),
        ("inf".to_string(), with(&[(40, f32::INFINITY)])),
        ("-inf".to_string(), with(&[(70, f32::NEG_INFINITY)])),
        ("nan-and-inf".to_string(), with(&[(12, f32::NAN), (40, f32::INFINITY), (44, f32::NAN)])),
        ("flt-max".to_string(), (0..n).map(|i| if i % 2 == 0 { f32::MAX } else { -f32::MAX }).collect()),
        ("huge".to_string(), base.iter().map(|x| x * 1e38).collect()),
        ("f16-overflow".to_string(), base.iter().map(|x| x * 1e6).collect()),
    ]);
    v
}

/// The rows' names and their values as one matrix.
fn join<'a>(rs: &[&'a (String, Vec<f32>)]) -> (Vec<&'a str>, Vec<f32>) {
    (rs.iter().map(|(c, _)| c.as_str()).collect(), rs.iter().flat_map(|(_, x)| x.iter().copied()).collect())
}

#[test]
fn the_shipped_quantizers_match_llama_cpp_on_hostile_and_non_finite_rows() {
    let Some(oracle) = common::oracle() else { return };
    let path = sling_kernels::cpu_path();
    eprintln!(
        "shipped path under test: {path} (SLING_NO_SIMD={:?}){}",
        std::env::var("SLING_NO_SIMD").ok(),
        if path == "scalar" { " — this CPU lacks AVX2: the vector kernels are NOT exercised here" } else { "" }
    );
    let n = 256;
    let imatrix = common::importance(n, 7);
    let all = rows(n);
    let mut failures = Vec::new();
    let (mut matched, mut aborted) = (0usize, Vec::new());
    let types = types();
    assert_eq!(types.len(), 22, "{types:?}");
    for dtype in types {
        for qw in [None, Some(&imatrix[..])] {
            if qw.is_none() && sling_quantizers::ggml::requires_imatrix(dtype) {
                continue;
            }
            let what = format!("{} ({})", dtype.name(), if qw.is_some() { "imatrix" } else { "plain" });
            // One oracle process per type (some i-quants spend seconds building their grids at start-up), one
            // forked child per row inside it.
            let (_, x) = join(&all.iter().collect::<Vec<_>>());
            let theirs = oracle.quantize_each(dtype.name(), &x, n, qw);
            match shipped(dtype, &x, n, qw) {
                Err(e) => failures.push(format!("{what}: sling says {e}")),
                Ok(ours) => {
                    let row_bytes = n / dtype.block_elems() * dtype.block_bytes();
                    assert_eq!(ours.len(), row_bytes * all.len(), "{what}: output size");
                    for (((case, x), ours), theirs) in all.iter().zip(ours.chunks(row_bytes)).zip(&theirs) {
                        match theirs {
                            Some(theirs) => match common::byte_mismatch(dtype, n, ours, theirs) {
                                None => matched += 1,
                                Some(m) => failures.push(format!("{what} {case}: {m}")),
                            },
                            // No bytes to match where llama.cpp aborts, but the shipped path must be the reference's.
                            None => {
                                aborted.push(format!("{what} {case}"));
                                if scalar(dtype, x, n, qw).as_deref() != Ok(ours) {
                                    failures.push(format!(
                                        "{what} {case}: llama.cpp aborts; the shipped path differs from the scalar reference"
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "{matched} rows byte-identical to llama.cpp; {} where llama.cpp aborts (shipped == scalar): {}",
        aborted.len(),
        aborted.join(", ")
    );
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    assert!(matched > 600, "too few rows compared: {matched}");
}
