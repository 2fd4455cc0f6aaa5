//! AWQ scale search (`sling_quantizers::awq`): never worse than RTN, clearly better with outlier channels, the
//! fold is exact up to f32 rounding, and bad inputs are errors.

use proptest::prelude::*;
use sling_quantizers::awq::{layer_means, scaled, search, AwqError, Balance, Options};
use sling_quantizers::ct::{IntArgs, IntGrid, ScaleDtype};
use sling_quantizers::gptq::Grid;
use sling_quantizers::mlx::AffineGrid;

fn int4(group: usize, symmetric: bool) -> IntGrid {
    IntGrid { args: IntArgs { bits: 4, symmetric, group: Some(group) }, sd: ScaleDtype::F32 }
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Roughly standard normal (sum of 4 uniforms).
    fn normal(&mut self) -> f32 {
        (self.next() + self.next() + self.next() + self.next()) * 0.866
    }
}

/// `n` inputs of `cols` channels with the channels in `hot` multiplied by `k`: (X row-major, mean |x|, XᵀX).
fn inputs(rng: &mut Rng, n: usize, cols: usize, hot: &[usize], k: f32) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    let mut x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
    for t in 0..n {
        for &j in hot {
            x[t * cols + j] *= k;
        }
    }
    let mut xm = vec![0f64; cols];
    let mut h = vec![0f64; cols * cols];
    for r in x.chunks_exact(cols) {
        for a in 0..cols {
            xm[a] += f64::from(r[a].abs());
            let ra = f64::from(r[a]);
            for b in 0..cols {
                h[a * cols + b] += ra * f64::from(r[b]);
            }
        }
    }
    (x, xm.iter().map(|v| (v / n as f64) as f32).collect(), h)
}

fn weights(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|_| rng.normal() * 0.02).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// (a) The chosen loss is never above plain RTN's, whatever the data and grid.
    #[test]
    fn awq_never_worse_than_rtn(seed in any::<u64>(), k in 1.0f32..50.0, nhot in 0usize..4, sym in any::<bool>(), duo in any::<bool>(), mlx in any::<bool>()) {
        let mut rng = Rng::new(seed);
        let (rows, cols, n) = (8, 64, 96);
        let hot: Vec<usize> = (0..nhot).map(|i| (seed as usize >> (8 * i)) % cols).collect();
        let (_, xm, h) = inputs(&mut rng, n, cols, &hot, k);
        let w1 = weights(&mut rng, rows, cols);
        let w2 = weights(&mut rng, 2 * rows, cols);
        let ig = int4(32, sym);
        let ag = AffineGrid { bits: 4, group: 32, sd: ScaleDtype::F16 };
        let grid: &dyn Grid = if mlx { &ag } else { &ig };
        let bal = [
            Balance { w: &w1, rows, grid, h: &h, weight: 1.0 },
            Balance { w: &w2, rows: 2 * rows, grid, h: &h, weight: 0.5 },
        ];
        let o = Options { n_grid: 10, duo_scaling: duo };
        let s = search(&xm, &bal, &o).unwrap();
        prop_assert!(s.loss <= s.rtn_loss, "{} > {}", s.loss, s.rtn_loss);
        prop_assert_eq!(s.losses.len(), 10);
        prop_assert!(s.losses.iter().all(|p| p.2 >= s.loss));
        prop_assert!(s.scales.iter().all(|v| v.is_finite() && *v > 0.0));
        // The first grid point is the identity: its loss is RTN's.
        prop_assert_eq!(s.losses[0].2, s.rtn_loss);
        // Deterministic.
        let again = search(&xm, &bal, &o).unwrap();
        prop_assert_eq!(again, s);
    }
}

/// (b) 64×256 weight, 512 inputs, 4 channels ×20: AWQ clearly beats RTN (symmetric int4, group 128).
#[test]
fn awq_outliers_beat_rtn() {
    let mut rng = Rng::new(42);
    let (rows, cols, n) = (64, 256, 512);
    let hot = [3, 77, 130, 201];
    let (_, xm, h) = inputs(&mut rng, n, cols, &hot, 20.0);
    let w = weights(&mut rng, rows, cols);
    let g = int4(128, true);
    let s = search(&xm, &[Balance { w: &w, rows, grid: &g, h: &h, weight: 1.0 }], &Options::default()).unwrap();
    let ratio = s.loss / s.rtn_loss;
    eprintln!(
        "AWQ/RTN loss = {:.4e}/{:.4e} = {ratio:.4} (ratio {}, duo {}); grid: {:?}",
        s.loss,
        s.rtn_loss,
        s.ratio,
        s.duo,
        s.losses.iter().map(|p| (p.0, p.1, format!("{:.3e}", p.2))).collect::<Vec<_>>()
    );
    assert!(ratio < 0.8, "AWQ/RTN = {ratio}");
    assert!(s.ratio > 0.0 && s.duo);
    // Hot channels get the largest scales.
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| s.scales[b].total_cmp(&s.scales[a]));
    let mut top: Vec<usize> = order[..4].to_vec();
    top.sort_unstable();
    assert_eq!(top, hot);
}

/// (c) The fold: `(W·s)(x/s) = W x` within f32 rounding.
#[test]
fn awq_fold_is_exact_up_to_rounding() {
    let mut rng = Rng::new(9);
    let (rows, cols, n) = (16, 128, 8);
    let hot = [5, 60];
    let (x, xm, h) = inputs(&mut rng, n, cols, &hot, 20.0);
    let w = weights(&mut rng, rows, cols);
    let g = int4(32, true);
    let s = search(&xm, &[Balance { w: &w, rows, grid: &g, h: &h, weight: 1.0 }], &Options::default()).unwrap();
    assert!(s.scales.iter().any(|&v| v != 1.0));
    let ws = scaled(&w, rows, cols, &s.scales);
    assert_eq!(ws.len(), w.len());
    for xt in x.chunks_exact(cols) {
        let xs: Vec<f32> = xt.iter().zip(&s.scales).map(|(a, b)| a / b).collect();
        for r in 0..rows {
            let (wr, wsr) = (&w[r * cols..(r + 1) * cols], &ws[r * cols..(r + 1) * cols]);
            let y: f32 = wr.iter().zip(xt).map(|(a, b)| a * b).sum();
            let y2: f32 = wsr.iter().zip(&xs).map(|(a, b)| a * b).sum();
            let mag: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
            assert!((y - y2).abs() <= 1e-5 * mag, "{y} vs {y2} (mag {mag})");
        }
    }
}

/// `layer_means` with groups that divide the row equals llm-compressor's `reshape(-1, group)` recipe.
#[test]
fn awq_layer_means_matches_flat_reshape() {
    let mut rng = Rng::new(3);
    let (rows, cols, g) = (4, 64, 16);
    let w = weights(&mut rng, rows, cols);
    let m = layer_means(&[(&w, rows)], g, cols);
    let mut norm = w.clone();
    for chunk in norm.chunks_mut(g) {
        let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs())) + 1e-6;
        chunk.iter_mut().for_each(|v| *v = v.abs() / amax);
    }
    for j in 0..cols {
        let want = (0..rows).map(|r| f64::from(norm[r * cols + j])).sum::<f64>() / rows as f64;
        assert!((f64::from(m[j]) - want).abs() < 1e-6);
    }
}

/// (d) Mismatched lengths and bad values are errors, not panics.
#[test]
fn awq_errors() {
    let g = int4(32, true);
    let (rows, cols) = (2, 8);
    let w = vec![0.1f32; rows * cols];
    let h = vec![0f64; cols * cols];
    let xm = vec![1f32; cols];
    let o = Options::default();
    let ok = Balance { w: &w, rows, grid: &g, h: &h, weight: 1.0 };
    assert!(search(&xm, &[ok], &o).is_ok());
    assert!(matches!(search(&[], &[ok], &o), Err(AwqError::NoChannels)));
    assert!(matches!(search(&xm, &[], &o), Err(AwqError::NoLayers)));
    assert!(matches!(search(&xm[..7], &[ok], &o), Err(AwqError::WeightLen { layer: 0, .. })));
    let short = Balance { w: &w[..15], ..ok };
    assert!(matches!(search(&xm, &[ok, short], &o), Err(AwqError::WeightLen { layer: 1, .. })));
    let big = Balance { rows: usize::MAX, ..ok };
    assert!(matches!(search(&xm, &[big], &o), Err(AwqError::WeightLen { .. })));
    let hs = Balance { h: &h[..63], ..ok };
    assert!(matches!(search(&xm, &[hs], &o), Err(AwqError::HessianLen { layer: 0, .. })));
    let mut xbad = xm.clone();
    xbad[3] = -1.0;
    assert!(matches!(search(&xbad, &[ok], &o), Err(AwqError::XMean(3))));
    xbad[3] = f32::NAN;
    assert!(matches!(search(&xbad, &[ok], &o), Err(AwqError::XMean(3))));
    let mut hn = h.clone();
    hn[5] = f64::INFINITY;
    assert!(matches!(search(&xm, &[Balance { h: &hn, ..ok }], &o), Err(AwqError::NonFinite { layer: 0 })));
    assert!(matches!(search(&xm, &[Balance { weight: -1.0, ..ok }], &o), Err(AwqError::NonFinite { .. })));
    let mut wn = w.clone();
    wn[0] = f32::NAN;
    assert!(matches!(search(&xm, &[Balance { w: &wn, ..ok }], &o), Err(AwqError::NonFinite { .. })));
    assert!(matches!(search(&xm, &[ok], &Options { n_grid: 2, duo_scaling: true }), Err(AwqError::Grid(2))));
    assert!(matches!(search(&xm, &[ok], &Options { n_grid: 1, duo_scaling: false }), Err(AwqError::Grid(1))));
    // A grid that cannot encode (9 bits) is reported, not a panic.
    let bad = IntGrid { args: IntArgs { bits: 9, symmetric: true, group: Some(32) }, sd: ScaleDtype::F32 };
    assert!(matches!(search(&xm, &[Balance { grid: &bad, ..ok }], &o), Err(AwqError::Quant { layer: 0, .. })));
    // scaled / layer_means never panic on short or empty input.
    assert!(scaled(&w, rows, 0, &xm).is_empty());
    assert_eq!(scaled(&w[..10], rows, cols, &xm).len(), 8);
    assert!(layer_means(&[], 32, 0).is_empty());
    assert_eq!(layer_means(&[(&w[..3], 1)], 32, cols), vec![0.0; cols]);
}
