//! Quality of a candidate model against a reference: perplexity of both, and the KL divergence, top-1
//! agreement and Δp of the candidate's next-token distributions against the reference's — the figures
//! `llama-perplexity --kl-divergence` reports (pinned llama.cpp `tools/perplexity/perplexity.cpp`).
//!
//! Chunking and scoring follow `perplexity()` there: the text is tokenized once (with a BOS when the
//! vocab adds one), cut into `n_ctx`-token chunks (the tail dropped), the first token of every chunk is
//! replaced by BOS when the vocab adds one, and only the second half of each chunk is scored: the logits
//! at positions `n_ctx/2 .. n_ctx-2` predict the tokens at `n_ctx/2 + 1 .. n_ctx-1`, so the model always
//! has at least half a context. Log-probabilities are computed in f64 from f32 logits. Percentiles
//! interpolate as llama-perplexity's `percentile` does.

use ndarray::{Array2, ArrayView1};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::Model;

/// Per-token figures of one scored position.
#[derive(Clone, Copy, Debug, Default)]
struct Token {
    nll_ref: f64,
    nll: f64,
    kld: f64,
    same_top: bool,
    /// p(candidate, actual next token) − p(reference, same token).
    dp: f64,
}

/// Summary figures; see the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalReport {
    pub chunks: usize,
    pub ctx: usize,
    /// Scored positions (`chunks * (ctx - ctx/2 - 1)`).
    pub tokens: usize,
    pub ppl_ref: f64,
    pub ppl: f64,
    /// Mean of ln(PPL(candidate) / PPL(reference)).
    pub ln_ppl_ratio: f64,
    pub kld_mean: f64,
    /// Standard error of the mean KLD.
    pub kld_mean_err: f64,
    pub kld_median: f64,
    pub kld_p99: f64,
    pub kld_p999: f64,
    pub kld_max: f64,
    /// Fraction of positions where both models' most likely token agree.
    pub top1: f64,
    pub dp_mean: f64,
    pub dp_rms: f64,
    pub dp_max_abs: f64,
}

impl EvalReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "chunks": self.chunks, "ctx": self.ctx, "tokens": self.tokens,
            "ppl_ref": self.ppl_ref, "ppl": self.ppl, "ln_ppl_ratio": self.ln_ppl_ratio,
            "kld_mean": self.kld_mean, "kld_mean_err": self.kld_mean_err, "kld_median": self.kld_median,
            "kld_p99": self.kld_p99, "kld_p999": self.kld_p999, "kld_max": self.kld_max,
            "top1": self.top1, "dp_mean": self.dp_mean, "dp_rms": self.dp_rms, "dp_max_abs": self.dp_max_abs,
        })
    }
}

/// `log_softmax` of one row in f64, and its argmax.
fn log_softmax(row: ArrayView1<f32>) -> (Vec<f64>, usize) {
    let mut imax = 0;
    let mut max = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > max {
            max = v;
            imax = i;
        }
    }
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    (row.iter().map(|&v| v as f64 - lse).collect(), imax)
}

fn score(r: ArrayView1<f32>, c: ArrayView1<f32>, target: usize) -> Token {
    let (lr, ir) = log_softmax(r);
    let (lc, ic) = log_softmax(c);
    let kld = lr.iter().zip(&lc).map(|(&a, &b)| if a > -700.0 { a.exp() * (a - b) } else { 0.0 }).sum::<f64>();
    Token {
        nll_ref: -lr[target],
        nll: -lc[target],
        kld: kld.max(0.0),
        same_top: ir == ic,
        dp: lc[target].exp() - lr[target].exp(),
    }
}

/// llama-perplexity's `percentile` on sorted values.
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let ip = p as usize;
    let f = p - ip as f64;
    (1.0 - f) * sorted[ip] + f * sorted[(ip + 1).min(sorted.len() - 1)]
}

/// Accumulates scored positions over batches.
#[derive(Default)]
pub struct Evaluator {
    tokens: Vec<Token>,
    chunks: usize,
    ctx: usize,
}

impl Evaluator {
    pub fn new(ctx: usize) -> Evaluator {
        Evaluator { tokens: Vec::new(), chunks: 0, ctx }
    }

    /// Scores one chunk from both models' logits (`[ctx, vocab]`); `chunk` is the model input (targets are
    /// `chunk[i + 1]`, never the BOS-replaced first token).
    pub fn add_chunk(&mut self, chunk: &[u32], reference: &Array2<f32>, candidate: &Array2<f32>) -> Result<()> {
        let n = chunk.len();
        if reference.dim() != candidate.dim() || reference.nrows() != n {
            return Err(Error::BadConfig(format!(
                "logits of shape {:?} (reference) and {:?} (candidate) for a chunk of {n} tokens: do the models share \
                 a vocabulary?",
                reference.dim(),
                candidate.dim()
            )));
        }
        let first = n / 2;
        let scored: Vec<Token> = (first..n.saturating_sub(1))
            .into_par_iter()
            .map(|i| score(reference.row(i), candidate.row(i), chunk[i + 1] as usize))
            .collect();
        self.tokens.extend(scored);
        self.chunks += 1;
        Ok(())
    }

    pub fn report(&self) -> EvalReport {
        let n = self.tokens.len();
        if n == 0 {
            return EvalReport { ctx: self.ctx, ..Default::default() };
        }
        let nf = n as f64;
        let mean = |f: &dyn Fn(&Token) -> f64| self.tokens.iter().map(f).sum::<f64>() / nf;
        let (nll_ref, nll) = (mean(&|t| t.nll_ref), mean(&|t| t.nll));
        let kld_mean = mean(&|t| t.kld);
        let kld2 = mean(&|t| t.kld * t.kld);
        let kld_mean_err = if n > 1 { ((kld2 - kld_mean * kld_mean).max(0.0) / (nf - 1.0)).sqrt() } else { 0.0 };
        let mut kld: Vec<f64> = self.tokens.iter().map(|t| t.kld).collect();
        kld.sort_by(f64::total_cmp);
        let median = if n % 2 == 0 { 0.5 * (kld[n / 2] + kld[n / 2 - 1]) } else { kld[n / 2] };
        EvalReport {
            chunks: self.chunks,
            ctx: self.ctx,
            tokens: n,
            ppl_ref: nll_ref.exp(),
            ppl: nll.exp(),
            ln_ppl_ratio: nll - nll_ref,
            kld_mean,
            kld_mean_err,
            kld_median: median,
            kld_p99: percentile(&kld, 0.99),
            kld_p999: percentile(&kld, 0.999),
            kld_max: kld[n - 1],
            top1: self.tokens.iter().filter(|t| t.same_top).count() as f64 / nf,
            dp_mean: mean(&|t| t.dp),
            dp_rms: mean(&|t| t.dp * t.dp).sqrt(),
            dp_max_abs: self.tokens.iter().map(|t| t.dp.abs()).fold(0.0, f64::max),
        }
    }
}

/// Chunks per forward call so that both models' logits of a batch stay under ~1 GiB (and at most 2048 tokens,
/// llama-perplexity's default batch).
pub fn chunks_per_batch(ctx: usize, vocab: usize) -> usize {
    let per_chunk = ctx.max(1) * vocab.max(1) * 4 * 2;
    ((1usize << 30) / per_chunk).clamp(1, (2048 / ctx.max(1)).max(1))
}

/// Runs both models over `chunks` (already BOS-adjusted) and scores them; `progress(done, total)` after
/// each batch.
pub fn evaluate(
    reference: &Model,
    candidate: &Model,
    chunks: &[Vec<u32>],
    ctx: usize,
    vocab: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let mut ev = Evaluator::new(ctx);
    let per = chunks_per_batch(ctx, vocab);
    let mut done = 0;
    for batch in chunks.chunks(per) {
        let lr = reference.logits(batch, None)?;
        let lc = candidate.logits(batch, None)?;
        for ((c, r), q) in batch.iter().zip(&lr).zip(&lc) {
            ev.add_chunk(c, r, q)?;
        }
        done += batch.len();
        progress(done, chunks.len());
    }
    Ok(ev.report())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_models_have_zero_kld_and_equal_ppl() {
        let l = Array2::from_shape_fn((8, 5), |(i, j)| ((i * 7 + j * 3) % 5) as f32 * 0.3);
        let mut ev = Evaluator::new(8);
        ev.add_chunk(&[1, 2, 3, 4, 0, 1, 2, 3], &l, &l).unwrap();
        let r = ev.report();
        assert_eq!(r.tokens, 3); // positions 4, 5, 6
        assert_eq!(r.kld_max, 0.0);
        assert_eq!(r.top1, 1.0);
        assert_eq!(r.ppl, r.ppl_ref);
        assert_eq!(r.dp_rms, 0.0);
    }

    #[test]
    fn kld_matches_a_hand_computed_value() {
        // reference uniform over 2 tokens, candidate p = (0.8, 0.2): KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
        // (4 positions: only position 2 is scored, predicting token 3)
        let r = Array2::<f32>::zeros((4, 2));
        let mut c = Array2::<f32>::zeros((4, 2));
        c[[2, 0]] = 4f32.ln();
        let mut ev = Evaluator::new(4);
        ev.add_chunk(&[1, 1, 1, 0], &r, &c).unwrap();
        let rep = ev.report();
        let want = 0.5 * (0.5f64 / 0.8).ln() + 0.5 * (0.5f64 / 0.2).ln();
        assert!((rep.kld_mean - want).abs() < 1e-7, "{} vs {want}", rep.kld_mean);
        assert!((rep.ppl_ref - 2.0).abs() < 1e-9);
        assert!((rep.dp_mean - 0.3).abs() < 1e-6);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), 2.0);
    }
}
