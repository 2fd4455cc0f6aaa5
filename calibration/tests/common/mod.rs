//! Shared by the GPTQ tests (`gptq.rs`, `device_gemm.rs`): the fixtures, seeded token sequences and a stand-in
//! integer grid.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sling_core::Role;
use sling_quantizers::gptq::{Grid, GroupParams};

/// Symmetric int4, groups of 32, scale = max|x| / 7 (a stand-in for the targets' grids).
pub struct Sym4;

impl Grid for Sym4 {
    fn group(&self) -> usize {
        32
    }
    fn row_params(&self, row: &[f32]) -> Vec<GroupParams> {
        row.chunks(32)
            .map(|g| {
                let m = g.iter().fold(0f32, |a, &x| a.max(x.abs()));
                let sc = if m > 0.0 { m / 7.0 } else { 1.0 };
                GroupParams { scale: sc, zero: 0.0, q_scale: sc, q_zero: 0.0 }
            })
            .collect()
    }
    fn quantize(&self, x: f32, p: &GroupParams) -> (u8, f32) {
        let q = (x / p.q_scale).round().clamp(-8.0, 7.0) as i8;
        (q as u8, q as f32 * p.scale)
    }
    fn dequantize(&self, code: u8, p: &GroupParams) -> f32 {
        (code as i8) as f32 * p.scale
    }
}

/// `fixtures/models/NAME`; `SLING_FIXTURES` overrides the directory for a test binary run on another machine
/// (`scripts/gpu-check`).
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("SLING_FIXTURES") {
        Some(d) => PathBuf::from(d).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name),
    }
}

/// `n` sequences of `len` pseudo-random token ids below 384.
pub fn seqs(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 33) % 384) as u32
                })
                .collect()
        })
        .collect()
}

/// Every decoder-layer weight a target quantizes (the router and Qwen2-MoE's shared-expert gate are not).
pub fn quantized(name: &str) -> bool {
    let role = Role::of_hf(name, 2);
    name.starts_with("model.layers.")
        && name.ends_with(".weight")
        && matches!(role, Role::Attention | Role::RoutedExperts | Role::SharedExperts | Role::DenseFfn)
}

pub fn grids(name: &str) -> Option<Arc<dyn Grid>> {
    quantized(name).then(|| Arc::new(Sym4) as Arc<dyn Grid>)
}
