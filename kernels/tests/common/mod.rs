//! Deterministic test inputs shared by the kernel tests.
#![allow(dead_code)]

/// The xorshift64 stream from state `s` (each item is the state after one step).
pub fn xorshift(mut s: u64) -> impl Iterator<Item = u64> {
    std::iter::repeat_with(move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    })
}

/// Rows of `n` values: cubes of uniform [-1, 1) values, scaled per group of `period` values by `scales` in turn
/// (a mix of magnitudes per block, as weights have).
pub fn rows(seed: u64, n: usize, scales: &[f64], period: usize) -> Vec<f32> {
    let s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    xorshift(s)
        .take(n)
        .enumerate()
        .map(|(i, s)| {
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            let g = (u - 0.5) * 2.0;
            (g * g * g * scales[(i / period) % scales.len()]) as f32
        })
        .collect()
}

/// `n` arbitrary bytes (NaN, infinite and subnormal scales among the blocks they make).
pub fn junk_bytes(seed: u64, n: usize) -> Vec<u8> {
    xorshift(seed).take(n).map(|s| (s >> 24) as u8).collect()
}
