//! Rotary position embeddings: inverse frequencies for the rope types the supported models use
//! (`default`, `linear`, `llama3`, `yarn`), as `transformers.modeling_rope_utils` computes them,
//! and their application (rotate-half or interleaved pairs).

use ndarray::ArrayViewMut1;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Rotary embedding parameters of a model.
#[derive(Clone, Debug)]
pub struct Rope {
    /// One frequency per rotated pair.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
    /// Pairs `(2i, 2i+1)` (DeepSeek) rather than `(i, i + d/2)` (rotate-half).
    pub interleaved: bool,
}

fn num(m: &Map<String, Value>, k: &str) -> Option<f64> {
    m.get(k).and_then(Value::as_f64)
}

fn bad(k: &str, why: &str) -> Error {
    Error::BadConfig(format!("rope parameter {k}: {why}"))
}

impl Rope {
    /// `dim`: the rotated width (head_dim, or DeepSeek's qk_rope_head_dim); `max_pos`: config's
    /// `max_position_embeddings` (YaRN without `factor`).
    pub fn from_params(p: &Map<String, Value>, dim: usize, max_pos: Option<u64>, interleaved: bool) -> Result<Rope> {
        if dim == 0 || dim % 2 != 0 {
            return Err(bad("head_dim", &format!("rotated width {dim} must be even and positive")));
        }
        if let Some(f) = num(p, "partial_rotary_factor") {
            if f != 1.0 {
                return Err(Error::Unsupported(format!("partial_rotary_factor {f}")));
            }
        }
        let base = num(p, "rope_theta").unwrap_or(10000.0);
        let kind = p.get("rope_type").and_then(Value::as_str).unwrap_or("default");
        let half = dim / 2;
        // transformers: 1 / base ** (arange(0, dim, 2) / dim), in float32.
        let pos_freqs: Vec<f64> = (0..half).map(|i| base.powf((2 * i) as f64 / dim as f64)).collect();
        let default: Vec<f64> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        let (inv, factor) = match kind {
            "default" => (default, 1.0),
            "linear" => {
                let f = num(p, "factor").ok_or_else(|| bad("factor", "missing for linear rope"))?;
                (default.iter().map(|x| x / f).collect(), 1.0)
            }
            "llama3" => (llama3(p, &default)?, 1.0),
            "yarn" => yarn(p, dim, base, &pos_freqs, max_pos)?,
            other => return Err(Error::Unsupported(format!("rope_type {other:?}"))),
        };
        Ok(Rope { inv_freq: inv.iter().map(|&x| x as f32).collect(), attention_factor: factor as f32, interleaved })
    }

    /// Rotates `x` (one head's rotated part, `2 * inv_freq.len()` values) by the angles whose
    /// [`cos_sin`](Self::cos_sin) are given.
    #[inline]
    pub fn apply(&self, mut x: ArrayViewMut1<f32>, cos: &[f32], sin: &[f32]) {
        let half = self.inv_freq.len();
        if self.interleaved {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        } else {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }

    /// cos and sin (times the attention factor) of every frequency at `pos`, in float32 like transformers.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = p * f;
                (a.cos() * self.attention_factor, a.sin() * self.attention_factor)
            })
            .unzip()
    }
}

/// `_compute_llama3_parameters`.
fn llama3(p: &Map<String, Value>, inv: &[f64]) -> Result<Vec<f64>> {
    let factor = num(p, "factor").ok_or_else(|| bad("factor", "missing for llama3 rope"))?;
    let low = num(p, "low_freq_factor").ok_or_else(|| bad("low_freq_factor", "missing"))?;
    let high = num(p, "high_freq_factor").ok_or_else(|| bad("high_freq_factor", "missing"))?;
    let old =
        num(p, "original_max_position_embeddings").ok_or_else(|| bad("original_max_position_embeddings", "missing"))?;
    let (low_wl, high_wl) = (old / low, old / high);
    Ok(inv
        .iter()
        .map(|&f| {
            let wl = 2.0 * std::f64::consts::PI / f;
            let scaled = if wl > low_wl { f / factor } else { f };
            let smooth = (old / wl - low) / (high - low);
            let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
            let medium = wl >= high_wl && wl <= low_wl;
            if medium {
                smoothed
            } else {
                scaled
            }
        })
        .collect())
}

/// `_compute_yarn_parameters`: (inverse frequencies, attention factor).
fn yarn(
    p: &Map<String, Value>,
    dim: usize,
    base: f64,
    pos_freqs: &[f64],
    max_pos: Option<u64>,
) -> Result<(Vec<f64>, f64)> {
    let orig = num(p, "original_max_position_embeddings")
        .ok_or_else(|| bad("original_max_position_embeddings", "missing for yarn"))?;
    let factor = match num(p, "factor") {
        Some(f) => f,
        None => max_pos.ok_or_else(|| bad("factor", "missing and no max_position_embeddings"))? as f64 / orig,
    };
    let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
    let mscale = num(p, "mscale").filter(|&m| m != 0.0);
    let mscale_all = num(p, "mscale_all_dim").filter(|&m| m != 0.0);
    let attention_factor = match (num(p, "attention_factor"), mscale, mscale_all) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(ma)) => get_mscale(factor, m) / get_mscale(factor, ma),
        _ => get_mscale(factor, 1.0),
    };
    let beta_fast = num(p, "beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0);
    let beta_slow = num(p, "beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0);
    let truncate = p.get("truncate").and_then(Value::as_bool).unwrap_or(true);
    let d = dim as f64;
    let corr = |rot: f64| (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
    let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    let inv = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &pf)| {
            // linear_ramp_factor is computed in float32 in transformers
            let ramp = (((i as f64 - low) / (high - low)) as f32).clamp(0.0, 1.0) as f64;
            let extrap = 1.0 - ramp;
            let (e, it) = (1.0 / pf, 1.0 / (factor * pf));
            it * (1.0 - extrap) + e * extrap
        })
        .collect();
    Ok((inv, attention_factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn default_frequencies() {
        let r = Rope::from_params(&params(json!({"rope_theta": 10000.0})), 8, None, false).unwrap();
        assert_eq!(r.inv_freq.len(), 4);
        assert_eq!(r.inv_freq[0], 1.0);
        assert!((r.inv_freq[1] - 0.1).abs() < 1e-7);
        assert_eq!(r.attention_factor, 1.0);
    }

    #[test]
    fn yarn_deepseek_fixture_values() {
        // DS_YARN of fixtures/make_fixtures.py, dim = qk_rope_head_dim 8: mscale == mscale_all_dim -> factor 1.
        let p = params(json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}));
        let r = Rope::from_params(&p, 8, None, true).unwrap();
        assert_eq!(r.attention_factor, 1.0);
        // low = floor(8 ln(4096/(64 pi)) / (2 ln 1e4)) = 1, high = ceil(8 ln(4096/(2 pi)) / (2 ln 1e4)) = 3
        // pair 0: extrapolation (1.0), pair 3: interpolation (1e-3 / 40)
        assert_eq!(r.inv_freq[0], 1.0);
        assert!((r.inv_freq[3] as f64 - 1e-3 / 40.0).abs() < 1e-10);
        // gpt-oss: no mscale -> 0.1 ln(32) + 1
        let g = params(json!({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "truncate": true}));
        let r = Rope::from_params(&g, 16, None, false).unwrap();
        assert!((r.attention_factor as f64 - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn rotate_half_and_interleaved_agree_on_norms() {
        let p = params(json!({"rope_theta": 10000.0}));
        for inter in [false, true] {
            let r = Rope::from_params(&p, 4, None, inter).unwrap();
            let (c, s) = r.cos_sin(3);
            let mut x = [1.0, 2.0, 3.0, 4.0];
            r.apply(ArrayViewMut1::from(&mut x[..]), &c, &s);
            let n: f32 = x.iter().map(|v| v * v).sum();
            assert!((n - 30.0).abs() < 1e-4);
        }
    }

    #[test]
    fn unknown_rope_type_is_refused() {
        let p = params(json!({"rope_type": "longrope"}));
        assert!(matches!(Rope::from_params(&p, 8, None, false), Err(Error::Unsupported(_))));
    }
}
