//! Importance matrices as `llama-imatrix` computes them (pinned llama.cpp `tools/imatrix/imatrix.cpp`,
//! `../shared/docs/gguf-spec.md` §4.1–4.2), and its GGUF output format.
//!
//! Collection rules followed (`IMatrixCollector::collect_imatrix`):
//! * routed experts (`MUL_MAT_ID`): always; one count per (token, routed slot) for the chosen expert, sums
//!   of `x²` per input column per expert;
//! * every other matrix product whose weight name starts with `blk.` (so the router `ffn_gate_inp` and the
//!   shared-expert gate are included, `output.weight` and `token_embd.weight` are not) when the batch has
//!   at least 16 tokens; one count per token; DeepSeek's per-head `attn_k_b`/`attn_v_b` get one sum
//!   vector per head (`n_mat = n_heads`) and one count per token;
//! * the GGUF file: `general.type = "imatrix"`, `imatrix.datasets`, `imatrix.chunk_count`,
//!   `imatrix.chunk_size`; per entry, in name order, `<name>.in_sum2` F32 `[ne0, n_mat]` (raw sums) then
//!   `<name>.counts` F32 `[1, n_mat]`.
//!
//! Chunking (`compute_imatrix`): the text is tokenized once with the special tokens (a BOS when the vocab
//! adds one), cut into `n_ctx`-token chunks (the tail is dropped), and when the vocab adds a BOS the first
//! token of every chunk is *replaced* by BOS.
//!
//! With [`Model::all_experts`](crate::Model::all_experts) (`sling calibrate --all-experts`, not a
//! llama-imatrix mode) the `*_exps` entries see every token instead of the routed ones, so each expert's
//! count is the number of tokens. [`ImatrixCollector::routing`] keeps the true routing either way, for the
//! coverage report ([`ImatrixCollector::coverage`]).

use std::collections::BTreeMap;
use std::path::Path;

use sling_core::DType;
use sling_formats::gguf::{GgufValue, GgufWriter, SplitPolicy, TensorDesc, ValueType};

use crate::observer::{LinearInput, Observer};

/// One weight's statistics.
#[derive(Clone, Debug, Default)]
pub struct Stat {
    /// `ne0 * n_mat` sums of squares (matrix `m` at `m * ne0`).
    pub sums: Vec<f64>,
    /// Rows seen per matrix (one entry for dense tensors, even with several per-head matrices).
    pub counts: Vec<u64>,
    pub ne0: usize,
}

/// An [`Observer`] that collects llama-imatrix's statistics.
#[derive(Debug)]
pub struct ImatrixCollector {
    pub stats: BTreeMap<String, Stat>,
    /// Experts per MoE layer (the size of every `*_exps` entry).
    pub n_experts: usize,
    /// Collect `output.weight` too (llama-imatrix `--process-output`; off by default).
    pub process_output: bool,
    /// Tokens of the forward call in progress: set with [`begin_batch`](Self::begin_batch).
    batch_tokens: usize,
    /// Problems (inconsistent shapes); reported by the caller.
    pub warnings: Vec<String>,
    /// Per MoE layer: (token, slot) pairs the router sent to each expert, summed over every batch.
    pub routing: BTreeMap<usize, Vec<u64>>,
}

/// Routing coverage of one MoE layer over the whole run.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCoverage {
    pub layer: usize,
    /// Routed (token, slot) pairs per expert.
    pub counts: Vec<u64>,
    /// Experts no token was routed to (llama-imatrix writes them with count 0).
    pub zero: Vec<usize>,
    /// Experts with some tokens, but fewer than the `few` fraction of the layer's mean.
    pub few: Vec<usize>,
    pub min: u64,
    pub max: u64,
    pub mean: f64,
}

impl ImatrixCollector {
    pub fn new(n_experts: usize) -> Self {
        ImatrixCollector {
            stats: BTreeMap::new(),
            n_experts,
            process_output: false,
            batch_tokens: 0,
            warnings: Vec::new(),
            routing: BTreeMap::new(),
        }
    }

    /// Routing coverage per MoE layer: experts with no token (`zero`) and with fewer than `few_frac` of
    /// the layer's mean (`few`).
    pub fn coverage(&self, few_frac: f64) -> Vec<LayerCoverage> {
        self.routing
            .iter()
            .map(|(&layer, counts)| {
                let mean = counts.iter().sum::<u64>() as f64 / counts.len().max(1) as f64;
                LayerCoverage {
                    layer,
                    counts: counts.clone(),
                    zero: (0..counts.len()).filter(|&e| counts[e] == 0).collect(),
                    few: (0..counts.len()).filter(|&e| counts[e] > 0 && (counts[e] as f64) < few_frac * mean).collect(),
                    min: counts.iter().min().copied().unwrap_or(0),
                    max: counts.iter().max().copied().unwrap_or(0),
                    mean,
                }
            })
            .collect()
    }

    /// Before each forward call: the number of tokens of the batch (all sequences).
    pub fn begin_batch(&mut self, tokens: usize) {
        self.batch_tokens = tokens;
    }

    /// `m_last_chunk` at the end: the largest count divided by the chunk size.
    pub fn chunk_count(&self, chunk_size: u32) -> u32 {
        let max = self.stats.values().flat_map(|s| s.counts.iter().copied()).max().unwrap_or(0);
        if chunk_size == 0 {
            0
        } else {
            (max / chunk_size as u64) as u32
        }
    }

    /// Writes llama.cpp's GGUF imatrix file (`save_imatrix`).
    pub fn save(&self, out: &Path, datasets: &[String], chunk_size: u32) -> crate::Result<()> {
        let kvs = vec![
            ("general.type".to_string(), GgufValue::String("imatrix".into())),
            (
                "imatrix.datasets".to_string(),
                GgufValue::Array(ValueType::String, datasets.iter().map(|d| GgufValue::String(d.clone())).collect()),
            ),
            ("imatrix.chunk_count".to_string(), GgufValue::U32(self.chunk_count(chunk_size))),
            ("imatrix.chunk_size".to_string(), GgufValue::U32(chunk_size)),
        ];
        let mut descs = Vec::new();
        let mut data: Vec<Vec<u8>> = Vec::new();
        for (name, s) in &self.stats {
            let n_mat = s.counts.len();
            if s.sums.is_empty() || n_mat == 0 {
                continue;
            }
            let ne0 = s.sums.len() / n_mat;
            descs.push(TensorDesc::new(format!("{name}.in_sum2"), DType::F32, vec![ne0 as u64, n_mat as u64]));
            data.push(s.sums.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect());
            descs.push(TensorDesc::new(format!("{name}.counts"), DType::F32, vec![1, n_mat as u64]));
            data.push(s.counts.iter().flat_map(|&c| (c as f32).to_le_bytes()).collect());
        }
        if descs.is_empty() {
            return Err(crate::Error::NoStatistics);
        }
        let mut w = GgufWriter::create(out, kvs, descs, SplitPolicy::None)?;
        for d in &data {
            w.write_data(d)?;
        }
        w.finish()?;
        Ok(())
    }
}

impl Observer for ImatrixCollector {
    fn routing(&mut self, layer: usize, counts: &[u64]) {
        let r = self.routing.entry(layer).or_insert_with(|| vec![0; counts.len()]);
        if r.len() != counts.len() {
            self.warnings.push(format!("layer {layer}: routing over {} experts, then {}", r.len(), counts.len()));
            return;
        }
        r.iter_mut().zip(counts).for_each(|(a, &c)| *a += c);
    }

    fn linear_input(&mut self, x: &LinearInput<'_>) {
        let n = x.n_cols;
        if n == 0 {
            return;
        }
        let n_rows = x.rows.len() / n;
        if let Some(ex) = x.expert {
            let n_as = self.n_experts.max(ex + 1);
            let s = self.stats.entry(x.tensor.to_string()).or_default();
            if s.sums.is_empty() {
                s.ne0 = n;
                s.sums = vec![0.0; n * n_as];
                s.counts = vec![0; n_as];
            }
            if s.ne0 != n || s.counts.len() <= ex {
                self.warnings.push(format!("{}: inconsistent size", x.tensor));
                return;
            }
            add_squares(&mut s.sums[ex * n..(ex + 1) * n], x.rows);
            s.counts[ex] += n_rows as u64;
            return;
        }
        let wanted = x.tensor.starts_with("blk.") || (self.process_output && x.tensor == "output.weight");
        let t = self.batch_tokens.max(1);
        if !wanted || self.batch_tokens < 16 {
            return;
        }
        // n_mat > 1: per-head products (DeepSeek attn_k_b/attn_v_b, `n_heads` rows per token, token-major).
        let n_mat = if n_rows > t && n_rows.is_multiple_of(t) { n_rows / t } else { 1 };
        let s = self.stats.entry(x.tensor.to_string()).or_default();
        if s.sums.is_empty() {
            s.ne0 = n;
            s.sums = vec![0.0; n * n_mat];
            s.counts = vec![0];
        }
        if s.ne0 != n || s.sums.len() != n * n_mat {
            self.warnings.push(format!("{}: inconsistent size", x.tensor));
            return;
        }
        if n_mat == 1 {
            add_squares(&mut s.sums, x.rows);
        } else {
            for (r, row) in x.rows.chunks_exact(n).enumerate() {
                let m = r % n_mat;
                s.sums[m * n..(m + 1) * n].iter_mut().zip(row).for_each(|(a, &v)| *a += (v as f64) * (v as f64));
            }
        }
        s.counts[0] += (n_rows / n_mat) as u64;
    }
}

/// `acc[j] += Σ_rows x[r][j]²` in f64, rows in order for every column (so the sums do not depend on the thread
/// count), columns split over threads when the block is large: with `--all-experts` every expert sees every
/// token and these sums are a large share of the pass.
fn add_squares(acc: &mut [f64], rows: &[f32]) {
    use rayon::prelude::*;
    let n = acc.len();
    if n == 0 {
        return;
    }
    let add = |a: &mut [f64], c0: usize| {
        let w = a.len();
        for row in rows.chunks_exact(n) {
            a.iter_mut().zip(&row[c0..c0 + w]).for_each(|(s, &v)| *s += (v as f64) * (v as f64));
        }
    };
    if rows.len() < 1 << 18 || rayon::current_num_threads() == 1 {
        add(acc, 0);
    } else {
        const COLS: usize = 128;
        acc.par_chunks_mut(COLS).enumerate().for_each(|(i, a)| add(a, i * COLS));
    }
}

/// Cuts `tokens` into `n_ctx`-token chunks as `compute_imatrix` does: at most `max_chunks` (all when `None`),
/// the tail dropped; with `bos`, the first token of each chunk replaced by it.
pub fn chunks(tokens: &[u32], n_ctx: usize, max_chunks: Option<usize>, bos: Option<u32>) -> Vec<Vec<u32>> {
    if n_ctx == 0 {
        return Vec::new();
    }
    let n_max = tokens.len() / n_ctx;
    let n = max_chunks.map_or(n_max, |c| c.min(n_max));
    (0..n)
        .map(|i| {
            let mut c = tokens[i * n_ctx..(i + 1) * n_ctx].to_vec();
            if let Some(b) = bos {
                c[0] = b;
            }
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_drops_tail_and_sets_bos() {
        let t: Vec<u32> = (0..10).collect();
        assert_eq!(chunks(&t, 4, None, None), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(chunks(&t, 4, Some(1), Some(99)), vec![vec![99, 1, 2, 3]]);
    }

    #[test]
    fn collects_like_llama_imatrix_and_round_trips() {
        let mut c = ImatrixCollector::new(4);
        c.begin_batch(16);
        let rows: Vec<f32> = (0..32).map(|i| i as f32).collect(); // 16 rows x 2
        c.linear_input(&LinearInput {
            hf: None,
            tensor: "blk.0.attn_q.weight",
            expert: None,
            rows: &rows,
            n_cols: 2,
            tokens: None,
        });
        c.linear_input(&LinearInput {
            hf: None,
            tensor: "output.weight",
            expert: None,
            rows: &rows,
            n_cols: 2,
            tokens: None,
        });
        let toks = [0usize, 3];
        c.linear_input(&LinearInput {
            hf: None,
            tensor: "blk.0.ffn_down_exps.weight",
            expert: Some(2),
            rows: &rows[..4],
            n_cols: 2,
            tokens: Some(&toks),
        });
        assert!(!c.stats.contains_key("output.weight"));
        assert_eq!(c.stats["blk.0.attn_q.weight"].counts, vec![16]);
        assert_eq!(c.stats["blk.0.ffn_down_exps.weight"].counts, vec![0, 0, 2, 0]);
        let dir = std::env::temp_dir().join(format!("sling-imatrix-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("im.gguf");
        c.save(&p, &["x.txt".into()], 16).unwrap();
        let m = sling_target_gguf::quantize::imatrix::Imatrix::load(&p).unwrap();
        assert_eq!(m.chunk_count, 1);
        let e = &m.entries["blk.0.ffn_down_exps.weight"];
        assert_eq!(e.counts, vec![0, 0, 2, 0]);
        assert_eq!(e.weights[4..6], [(0.0 + 4.0) / 2.0, (1.0 + 9.0) / 2.0]);
        assert_eq!(e.weights[0], 1.0);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn coverage_lists_unused_and_rare_experts() {
        let mut c = ImatrixCollector::new(4);
        c.routing(3, &[10, 0, 30, 1]);
        c.routing(3, &[10, 0, 30, 0]);
        c.routing(5, &[5, 5, 5, 5]);
        let cov = c.coverage(0.1);
        assert_eq!(cov.len(), 2);
        assert_eq!((cov[0].layer, cov[0].counts.clone()), (3, vec![20, 0, 60, 1]));
        assert_eq!((cov[0].zero.clone(), cov[0].few.clone()), (vec![1], vec![3]));
        assert_eq!((cov[0].min, cov[0].max, cov[0].mean), (0, 60, 20.25));
        assert!(cov[1].zero.is_empty() && cov[1].few.is_empty());
        assert!(c.warnings.is_empty());
    }
}
