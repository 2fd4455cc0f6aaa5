//! AWQ scale search (`sling_quantizers::awq`): never worse than RTN, clearly better with outlier channels, the
//! fold is exact up to f32 rounding, and bad inputs are errors.

use proptest::prelude::*;
use sling_quantizers::awq::{
    fold_into_linear_rows, fold_into_norm, layer_means, scaled, search, AwqError, Balance, Options,
};
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
        let xs: Vec<f32> = xt.iter().zip(&s.scales).map(|(&a, &b)| (f64::from(a) / b) as f32).collect();
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
    assert!(scaled(&w, rows, 0, &[1.0; 8]).is_empty());
    assert_eq!(scaled(&w[..10], rows, cols, &[1.0; 8]).len(), 8);
    assert!(layer_means(&[], 32, 0).is_empty());
    assert_eq!(layer_means(&[(&w[..3], 1)], 32, cols), vec![0.0; cols]);
}

/// (c) Uniform activations: nothing to protect, AWQ gains little over RTN.
#[test]
fn awq_uniform_activations_gain_little() {
    let mut rng = Rng::new(17);
    let (rows, cols, n) = (64, 256, 512);
    let (_, xm, h) = inputs(&mut rng, n, cols, &[], 1.0);
    let w = weights(&mut rng, rows, cols);
    let g = int4(128, true);
    let s = search(&xm, &[Balance { w: &w, rows, grid: &g, h: &h, weight: 1.0 }], &Options::default()).unwrap();
    let ratio = s.loss / s.rtn_loss;
    eprintln!("uniform: AWQ/RTN = {ratio:.4} (ratio {}, duo {})", s.ratio, s.duo);
    assert!(ratio > 0.9, "AWQ/RTN = {ratio}");
    // Outliers: the gain grows with their magnitude.
    let mut last = 1.0;
    for k in [4.0, 20.0, 50.0] {
        let mut rng = Rng::new(17);
        let (_, xm, h) = inputs(&mut rng, n, cols, &[3, 77, 130, 201], k);
        let s = search(&xm, &[Balance { w: &w, rows, grid: &g, h: &h, weight: 1.0 }], &Options::default()).unwrap();
        let r = s.loss / s.rtn_loss;
        eprintln!("outliers x{k}: AWQ/RTN = {r:.4} (ratio {})", s.ratio);
        assert!(r < last + 0.02, "x{k}: {r} vs {last}");
        last = r;
    }
}

/// (d) The folds preserve the float function: RMSNorm → q/k/v with the norm divided and the linears multiplied,
/// and up_proj → down_proj through SwiGLU with up's rows divided and down's columns multiplied.
#[test]
fn awq_folds_preserve_the_function() {
    let mut rng = Rng::new(23);
    let (d, f, n) = (64, 96, 16);
    let norm: Vec<f32> = (0..d).map(|_| 1.0 + 0.3 * rng.next()).collect();
    let scales: Vec<f64> = (0..d).map(|_| f64::from((2.0 * rng.next()).exp())).collect();
    let q = weights(&mut rng, 32, d);
    let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
    let matvec = |w: &[f32], v: &[f32]| -> Vec<f32> {
        w.chunks_exact(v.len()).map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum()).collect()
    };
    let close = |a: &[f32], b: &[f32], w: &[f32], v: &[f32]| {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            let row = &w[i * v.len()..(i + 1) * v.len()];
            let mag: f32 = row.iter().zip(v).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1e-30;
            assert!((p - q).abs() <= 1e-5 * mag, "{p} vs {q} (mag {mag})");
        }
    };
    let mut norm2 = norm.clone();
    fold_into_norm(&mut norm2, &scales).unwrap();
    let q2 = scaled(&q, 32, d, &scales);
    for xt in x.chunks_exact(d) {
        let rms = (xt.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-6).sqrt();
        let h1: Vec<f32> = xt.iter().zip(&norm).map(|(v, g)| v / rms * g).collect();
        let h2: Vec<f32> = xt.iter().zip(&norm2).map(|(v, g)| v / rms * g).collect();
        close(&matvec(&q, &h1), &matvec(&q2, &h2), &q, &h1);
    }
    // up_proj → down_proj
    let gate = weights(&mut rng, f, d);
    let up = weights(&mut rng, f, d);
    let down = weights(&mut rng, d, f);
    let s2: Vec<f64> = (0..f).map(|_| f64::from((1.5 * rng.next()).exp())).collect();
    let mut up2 = up.clone();
    fold_into_linear_rows(&mut up2, f, d, &s2).unwrap();
    let down2 = scaled(&down, d, f, &s2);
    let silu = |v: f32| v / (1.0 + (-v).exp());
    for xt in x.chunks_exact(d) {
        let g = matvec(&gate, xt);
        let a1: Vec<f32> = g.iter().zip(matvec(&up, xt)).map(|(&g, u)| silu(g) * u).collect();
        let a2: Vec<f32> = g.iter().zip(matvec(&up2, xt)).map(|(&g, u)| silu(g) * u).collect();
        close(&matvec(&down, &a1), &matvec(&down2, &a2), &down, &a1);
    }
    // Fewer scales than rows: only the last rows (a fused qkv_proj smoothing o_proj).
    let mut qkv = vec![1f32; 6 * 2];
    fold_into_linear_rows(&mut qkv, 6, 2, &[2.0, 4.0]).unwrap();
    assert_eq!(qkv, [1., 1., 1., 1., 1., 1., 1., 1., 0.5, 0.5, 0.25, 0.25]);
}

/// (e) The folds check their lengths.
#[test]
fn awq_fold_errors() {
    let mut n = vec![1f32; 4];
    assert!(matches!(fold_into_norm(&mut n, &[1.0; 3]), Err(AwqError::FoldLen { .. })));
    assert_eq!(n, [1.0; 4]);
    let mut w = vec![1f32; 12];
    assert!(matches!(fold_into_linear_rows(&mut w, 4, 4, &[1.0; 4]), Err(AwqError::FoldLen { .. })));
    assert!(matches!(fold_into_linear_rows(&mut w, 3, 4, &[1.0; 4]), Err(AwqError::FoldLen { .. })));
    assert!(matches!(fold_into_linear_rows(&mut w, usize::MAX, 4, &[1.0; 4]), Err(AwqError::FoldLen { .. })));
    assert!(fold_into_linear_rows(&mut [], 0, 0, &[]).is_ok());
    assert!(fold_into_linear_rows(&mut [], 3, 0, &[1.0; 3]).is_ok());
}

// ---- llm-compressor's own AWQ on the same layer (tests/interop/awq_ref.py) ----

/// The reference case: a 64×256 weight, 512 inputs with channels 3, 77, 130, 201 ×20 (seed 42), and two weights
/// sharing the input (96 and 32 rows, seed 43) for the multi-layer loss.
/// `(cols, n, [(rows, weight)], inputs)`.
type Case = (usize, usize, Vec<(usize, Vec<f32>)>, Vec<f32>);
fn reference_case(multi: bool) -> Case {
    let (cols, n) = (256, 512);
    let mut rng = Rng::new(if multi { 43 } else { 42 });
    let (x, _, _) = inputs(&mut rng, n, cols, &[3, 77, 130, 201], 20.0);
    let ws = if multi {
        vec![(96, weights(&mut rng, 96, cols)), (32, weights(&mut rng, 32, cols))]
    } else {
        vec![(64, weights(&mut rng, 64, cols))]
    };
    (cols, n, ws, x)
}

/// A safetensors file of f32 tensors (what awq_ref.py reads).
fn write_safetensors(path: &std::path::Path, tensors: &[(String, Vec<usize>, &[f32])]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        let end = off + 4 * data.len();
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, end]}));
        off = end;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, _, data) in tensors {
        data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    }
    std::fs::write(path, out).unwrap();
}

/// Writes the reference cases for awq_ref.py: `SLING_AWQ_CASE_DIR=DIR cargo test -p sling-quantizers --test awq
/// -- --ignored write_awq_reference_cases`, then `awq_ref.py DIR/awq_case_single.safetensors` (and `_multi`), and
/// the JSON lines into tests/data/awq_llmc_reference.json.
#[test]
#[ignore]
fn write_awq_reference_cases() {
    let dir = std::path::PathBuf::from(std::env::var("SLING_AWQ_CASE_DIR").expect("SLING_AWQ_CASE_DIR"));
    for multi in [false, true] {
        let (cols, n, ws, x) = reference_case(multi);
        let mut t: Vec<(String, Vec<usize>, &[f32])> = vec![("inputs".into(), vec![n, cols], &x)];
        for (i, (rows, w)) in ws.iter().enumerate() {
            let name = if multi { format!("weight.{i}") } else { "weight".into() };
            t.push((name, vec![*rows, cols], w));
        }
        write_safetensors(&dir.join(format!("awq_case_{}.safetensors", if multi { "multi" } else { "single" })), &t);
    }
}

/// sling's search on the reference cases against llm-compressor 0.14's (tests/data/awq_llmc_reference.json,
/// made by awq_ref.py on the cases above): for one or several linears that share an input and whose parent's
/// output is their outputs, llm-compressor's loss is sling's divided by `n · Σ rows`, so every grid point's loss
/// and the chosen ratio must agree (f32 forward passes vs f64 sums: 1e-4 relative).
#[test]
fn awq_matches_llm_compressor() {
    let refs: serde_json::Value =
        serde_json::from_str(include_str!("data/awq_llmc_reference.json")).expect("awq_llmc_reference.json");
    for (name, multi) in [("single", false), ("multi", true)] {
        let r = &refs[name];
        let (cols, n, ws, x) = reference_case(multi);
        let mut xm = vec![0f32; cols];
        for xt in x.chunks_exact(cols) {
            xm.iter_mut().zip(xt).for_each(|(m, v)| *m += v.abs());
        }
        xm.iter_mut().for_each(|m| *m /= n as f32);
        // llm-compressor's own mean |x| (torch's f32 summation order): one ulp in a scale can flip a code at the
        // .5 tie every group's absmax sits on, so the grid-point losses are compared from the same x_mean.
        let xm_ref: Vec<f32> = r["x_mean"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let maxrel = xm.iter().zip(&xm_ref).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
        assert!(maxrel < 1e-5, "{name}: x_mean differs by {maxrel}");
        let xm = xm_ref;
        let mut h = vec![0f64; cols * cols];
        for xt in x.chunks_exact(cols) {
            for a in 0..cols {
                let xa = f64::from(xt[a]);
                for b in 0..cols {
                    h[a * cols + b] += xa * f64::from(xt[b]);
                }
            }
        }
        let g = int4(128, true);
        let bal: Vec<Balance> =
            ws.iter().map(|(rows, w)| Balance { w, rows: *rows, grid: &g, h: &h, weight: 1.0 }).collect();
        let s = search(&xm, &bal, &Options::default()).unwrap();
        let norm = (n * ws.iter().map(|w| w.0).sum::<usize>()) as f64;
        let grid = r["grid"].as_array().unwrap();
        assert_eq!(grid.len(), s.losses.len());
        let (mut worst, mut off) = (0f64, 0);
        for ((ratio, duo, l), p) in s.losses.iter().zip(grid) {
            assert!((f64::from(*ratio) - p[0].as_f64().unwrap()).abs() < 1e-6);
            assert_eq!(*duo, p[1].as_bool().unwrap());
            let want = p[2].as_f64().unwrap();
            let rel = (l / norm - want).abs() / want;
            if std::env::var_os("SLING_AWQ_VERBOSE").is_some() {
                eprintln!("  {ratio} {duo}: sling {:.7e} llm-compressor {want:.7e} rel {rel:.1e}", l / norm);
            }
            worst = worst.max(rel);
            off += usize::from(rel > 1e-6);
        }
        eprintln!(
            "{name}: sling ratio {} duo {} loss/RTN {:.4}; llm-compressor ratio {} loss/RTN {:.4}; worst grid-loss rel diff {worst:.2e}",
            s.ratio,
            s.duo,
            s.loss / s.rtn_loss,
            r["ratio"],
            r["ratio_awq_over_rtn"]
        );
        // Most points agree to f32 rounding; a few differ by a flipped tie where torch's pow (SLEEF) or sqrt and
        // Rust's differ by an ulp in a scale.
        assert!(off <= 3 && worst < 5e-3, "{name}: {off} points off, worst {worst}");
        assert!((f64::from(s.ratio) - r["ratio"].as_f64().unwrap()).abs() < 1e-6, "{name}");
        assert_eq!(s.duo, r["duo"].as_bool().unwrap());
        let e = r["err_awq"].as_f64().unwrap();
        assert!((s.loss - e).abs() <= 1e-4 * e, "{name}: {} vs {e}", s.loss);
        let e = r["err_rtn"].as_f64().unwrap();
        assert!((s.rtn_loss - e).abs() <= 1e-4 * e, "{name}: {} vs {e}", s.rtn_loss);
    }
}
