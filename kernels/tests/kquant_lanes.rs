//! The K-quant kernels that run one sub-block per SIMD lane (`kernels/src/kquant_lanes.rs`) against the scalar
//! reference `sling_quantizers::quantize_rows`, byte for byte: random rows of 1..=17 super-blocks and several row
//! counts, and hostile sub-blocks (zeros, constants, outliers, subnormals, tiny and huge magnitudes, NaN, ±Inf,
//! exact rounding halves), with and without importance weights.

use proptest::prelude::*;
use sling_core::DType;

const LANE_TYPES: &[DType] = &[DType::Q2K, DType::Q4K, DType::Q5K, DType::Q6K];

fn check(dtype: DType, x: &[f32], n_per_row: usize, w: Option<&[f32]>) -> Result<(), String> {
    let (mut fast, mut scalar) = (vec![3u8], vec![3u8]);
    sling_kernels::quantize_rows(dtype, x, n_per_row, w, &mut fast).unwrap();
    sling_quantizers::quantize_rows(dtype, x, n_per_row, w, &mut scalar).unwrap();
    if fast == scalar {
        return Ok(());
    }
    let bb = dtype.block_bytes();
    let k = fast.iter().zip(&scalar).position(|(a, b)| a != b).unwrap_or(0);
    let blk = (k - 1) / bb;
    Err(format!(
        "{dtype} weights={} n_per_row={n_per_row}: first difference at byte {} of block {blk}\n  x = {:?}\n  fast   {:?}\n  scalar {:?}",
        w.is_some(),
        (k - 1) % bb,
        &x[blk * 256..blk * 256 + 256],
        &fast[1 + blk * bb..1 + (blk + 1) * bb],
        &scalar[1 + blk * bb..1 + (blk + 1) * bb],
    ))
}

/// A 32-value group of one of the hostile kinds (`seed` varies it).
fn group(kind: u8, seed: u32) -> [f32; 32] {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(0x9e37_79b9);
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
    };
    let f = |g: &dyn Fn(usize) -> f32| -> [f32; 32] { std::array::from_fn(g) };
    let r: [f32; 32] = std::array::from_fn(|_| rnd());
    let scale = 2f32.powi((seed % 200) as i32 - 130);
    match kind % 24 {
        0 => [0.0; 32],
        1 => [0.75; 32],
        2 => [-1.25; 32],
        3 => {
            let mut g = f(&|i| r[i] * 1e-3);
            g[(seed % 32) as usize] = 50.0;
            g
        }
        4 => f(&|i| f32::from_bits(1 + (i as u32 * 7919 + seed) % 0x7f_ffff)), // subnormals
        5 => f(&|i| r[i] * 1e-38),
        6 => f(&|i| r[i] * 1e30),
        7 => {
            let mut g = r;
            g[(seed % 32) as usize] = f32::NAN;
            g
        }
        8 => {
            let mut g = r;
            g[(seed % 32) as usize] = f32::INFINITY;
            g
        }
        9 => {
            let mut g = r;
            g[(seed % 32) as usize] = f32::NEG_INFINITY;
            g
        }
        10 => f(&|i| if i % 2 == 0 { r[i].abs() } else { -r[i].abs() } * 3.0),
        // Values on a half-step grid: iscale * (x - min) lands on exact .5 for several iscales.
        11 => f(&|i| ((i as u32 * 7 + seed) % 31) as f32 * 0.5),
        12 => f(&|i| ((i as u32 * 5 + seed) % 16) as f32 - 7.5),
        13 => f(&|i| (((i as u32 * 3 + seed) % 63) as f32 * 0.5 - 15.5) * scale),
        14 => f(&|i| r[i] * scale),
        15 => f(&|i| if i == (seed % 32) as usize { -0.0 } else { 0.0 }),
        16 => f(&|i| r[i].abs() * 0.02 + 0.5),    // all positive: min forced to 0
        17 => f(&|i| -(r[i].abs() * 0.02) - 0.5), // all negative
        18 => f(&|i| r[i] * 3e38),
        19 => {
            let mut g = [1.0f32; 32];
            g[(seed % 32) as usize] = 1.0 + f32::EPSILON;
            g
        }
        // NaNs of both signs. (NaNs with other payloads are left out: when both operands of an operation are NaN,
        // x86 returns the first one's payload, and which operand comes first is the compiler's choice for
        // commutative operations, so even two builds of the scalar reference differ on them.)
        20 => f(&|i| if (i as u32 + seed).is_multiple_of(3) { -f32::NAN } else { f32::NAN }),
        21 => f(&|i| if i as u32 % 7 == seed % 7 { f32::NAN } else { 0.0 }),
        22 => f(&|i| r[i] * 0.02),
        _ => f(&|i| (r[i] * 8.0).round() * 0.125),
    }
}

fn hostile_rows(kinds: &[(u8, u32)], nblocks: usize) -> Vec<f32> {
    kinds
        .iter()
        .cycle()
        .take(nblocks * 8)
        .enumerate()
        .flat_map(|(k, &(kind, seed))| group(kind, seed ^ k as u32))
        .collect()
}

fn weights(kind: u8, n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_246_822_519).wrapping_add(seed) >> 9;
            match kind % 5 {
                0 => 1.0 + (h % 97) as f32 * 0.37,
                1 => {
                    if h.is_multiple_of(5) {
                        0.0
                    } else {
                        (h % 1000) as f32 * 1e-3
                    }
                }
                2 => 0.0,
                3 => (h % 13) as f32 * 1e20,
                _ => f32::from_bits(1 + h % 1000) * if h.is_multiple_of(3) { 1e30 } else { 1.0 },
            }
        })
        .collect()
}

proptest! {
    // PROPTEST_CASES=N for a longer run.
    #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)))]

    /// Random rows of 1..=17 super-blocks, 1..=3 rows, bell-ish values at a random magnitude.
    #[test]
    fn lanes_equal_scalar_on_random_rows(
        t in 0..LANE_TYPES.len(),
        nblocks in 1usize..=17,
        nrows in 1usize..=3,
        exp in -30i32..10,
        seed in any::<u64>(),
        with_w in any::<bool>(),
        wkind in 0u8..5,
    ) {
        let n = nblocks * 256;
        let mut s = seed | 1;
        let x: Vec<f32> = (0..n * nrows)
            .map(|_| {
                let mut acc = 0.0f32;
                for _ in 0..3 {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                acc * 2f32.powi(exp)
            })
            .collect();
        let w = with_w.then(|| weights(wkind, n, seed as u32));
        check(LANE_TYPES[t], &x, n, w.as_deref()).map_err(TestCaseError::fail)?;
    }

    /// Super-blocks made of hostile 32-value groups, mixed within the block (each lane sees a different kind).
    #[test]
    fn lanes_equal_scalar_on_hostile_groups(
        t in 0..LANE_TYPES.len(),
        kinds in proptest::collection::vec((any::<u8>(), any::<u32>()), 8..24),
        nblocks in 1usize..=5,
        nrows in 1usize..=2,
        wkind in proptest::option::of(0u8..5),
    ) {
        let n = nblocks * 256;
        let x = hostile_rows(&kinds, nblocks * nrows);
        let w = wkind.map(|k| weights(k, n, kinds[0].1));
        check(LANE_TYPES[t], &x, n, w.as_deref()).map_err(TestCaseError::fail)?;
    }
}

/// Every hostile kind as a whole super-block (all eight lanes alike) and next to ordinary groups.
#[test]
fn lanes_equal_scalar_on_each_hostile_kind() {
    for &dtype in LANE_TYPES {
        for kind in 0..24u8 {
            for seed in [0u32, 1, 17, 123_456] {
                let uniform: Vec<(u8, u32)> = vec![(kind, seed); 8];
                let mixed: Vec<(u8, u32)> =
                    (0..8).map(|j| if j == 3 { (kind, seed) } else { (22, seed + j) }).collect();
                for kinds in [uniform, mixed] {
                    let x = hostile_rows(&kinds, 2);
                    for w in
                        [None, Some(weights(0, 512, seed)), Some(weights(1, 512, seed)), Some(weights(4, 512, seed))]
                    {
                        if let Err(e) = check(dtype, &x, 512, w.as_deref()) {
                            panic!("kind {kind} seed {seed}: {e}");
                        }
                    }
                }
            }
        }
    }
}

/// Large windows (many rows), as `sling quantize` passes them.
#[test]
fn lanes_equal_scalar_on_a_large_window() {
    let n = 4096;
    let x: Vec<f32> =
        (0..n * 16).map(|i| ((i as f32 * 0.618).sin() * 0.05) * (1.0 + (i % 977) as f32 * 1e-3)).collect();
    let w: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32).collect();
    for &dtype in LANE_TYPES {
        for wt in [None, Some(w.as_slice())] {
            check(dtype, &x, n, wt).unwrap();
        }
    }
}
