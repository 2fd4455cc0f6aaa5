//! How much one tensor's quantization error costs at the output: the KL divergence of the model with that tensor
//! alone replaced (by its quantized-then-dequantized values) from the unmodified model, over calibration text.
//! What the size-targeted allocation (`sling quantize --to gguf:auto`) turns its per-type error measurements into
//! KL with.
//!
//! All probes run in one layer-by-layer pass: the clean hidden states go through the model once, and each probe
//! branches off at its tensor's layer (the embedding for `token_embd`, the head for `output`) and is carried
//! through the remaining layers with the clean weights. Each layer's weights are read once per group of probes,
//! not once per probe; the compute is that of one forward pass per probe from its layer on (half a pass on
//! average), and the memory that of one set of hidden states per probe in a group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::Array2;
use sling_pipeline::ops::Op;
use sling_target_gguf::convert::plan::OutTensor;

use crate::candidate::{narrow, scatter};
use crate::error::{Error, Result};
use crate::eval::Evaluator;
use crate::model::Model;
use crate::source::TensorSource;

/// The rows `r0..r1` of the substituted tensor, as the probe replaces them.
pub type Rows<'a> = Box<dyn Fn(u64, u64) -> Result<Vec<f32>> + Send + Sync + 'a>;

/// The reference with the source tensors of one GGUF tensor replaced by other values of its rows (e.g. quantized
/// and dequantized), mapped back through the conversion plan's ops. The values are made by `rows` when the
/// forward pass reads a source tensor, one source tensor's rows at a time (an expert's, for checkpoints that store
/// experts apart), so a probe holds no more than the pass itself does.
pub struct Substituted<'a> {
    reference: &'a dyn TensorSource,
    /// Source tensor name → the substituted outputs it feeds: each output's index, the output row its subtree
    /// starts at, and the subtree (several where one source tensor makes several outputs: DeepSeek's `kv_b_proj`
    /// split into MLX's `embed_q`/`unembed_out`, gpt-oss's `gate_up_proj` into `gate_proj`/`up_proj`).
    pieces: HashMap<String, Vec<(usize, u64, Op)>>,
    /// Per substituted output: its rows, and its row length.
    outputs: Vec<(Rows<'a>, u64)>,
    /// The last substituted source tensor, whole, until [`TensorSource::release`]: layouts that stack experts in
    /// one source tensor are read an expert at a time, and each read would otherwise make all of it again.
    last: Mutex<Option<(String, Arc<Vec<f32>>)>>,
}

impl<'a> Substituted<'a> {
    /// `t` is the GGUF tensor (from the conversion plan of `reference`'s checkpoint); `rows(r0, r1)` gives its rows
    /// `r0..r1` (`(r1 - r0) * t.ne[0]` values).
    pub fn new(reference: &'a dyn TensorSource, t: &OutTensor, rows: Rows<'a>) -> Result<Substituted<'a>> {
        if matches!(t.op, Op::Mxfp4(_) | Op::Gguf(_)) {
            return Err(Error::Read {
                tensor: t.name.clone(),
                why: "only tensors computed from source values can be substituted".into(),
            });
        }
        Ok(Substituted::of_op(reference, &t.op, t.ne.first().copied().unwrap_or(1), rows))
    }

    /// Any output computed by `op` (rows of `cols` values) from `reference`'s tensors: a GGUF tensor's op, or a
    /// Hugging Face-format target's weight (`sling_pipeline::Weight::op`, e.g. MLX's stacked experts).
    pub fn of_op(reference: &'a dyn TensorSource, op: &Op, cols: u64, rows: Rows<'a>) -> Substituted<'a> {
        Substituted::of_ops(reference, vec![(op, cols, rows)])
    }

    /// Several outputs substituted together, each `(op, cols, rows)` as in [`Substituted::of_op`]: the weights a
    /// runtime loads as one layer and quantizes alike (vLLM's q/k/v, a layer's experts), or the weights a target
    /// makes of one source tensor (they must not hold the same source element twice).
    pub fn of_ops(reference: &'a dyn TensorSource, outputs: Vec<(&Op, u64, Rows<'a>)>) -> Substituted<'a> {
        let mut pieces: HashMap<String, Vec<(usize, u64, Op)>> = HashMap::new();
        let mut rows = Vec::with_capacity(outputs.len());
        for (i, (op, cols, r)) in outputs.into_iter().enumerate() {
            let mut names = Vec::new();
            op.sources(&mut names);
            names.sort();
            names.dedup();
            for n in names {
                let (base, sub) = narrow(op, &n);
                pieces.entry(n).or_default().push((i, base, sub.clone()));
            }
            rows.push((r, cols));
        }
        Substituted { reference, pieces, outputs: rows, last: Mutex::new(None) }
    }
}

impl TensorSource for Substituted<'_> {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.reference.shape(name)
    }

    fn is_mxfp4(&self, name: &str) -> bool {
        self.reference.is_mxfp4(name)
    }

    fn release(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.reference.release();
    }

    fn read_outer(&self, name: &str, i0: u64, i1: u64) -> Result<Vec<f32>> {
        let Some(pieces) = self.pieces.get(name) else {
            return self.reference.read_outer(name, i0, i1);
        };
        let shape = self.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        let per = if shape.is_empty() { 1 } else { shape[1..].iter().product::<u64>() } as usize;
        let cached = match &*self.last.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((n, w)) if n == name => Some(Arc::clone(w)),
            _ => None,
        };
        // Not under the lock: per-expert source tensors are read in parallel, each once.
        let whole = match cached {
            Some(w) => w,
            None => {
                // Elements the outputs do not hold (e.g. the other half of a fused gate/up) keep the reference's
                // values; when they hold them all, the reference need not be read at all.
                let n0 = shape.first().copied().unwrap_or(1);
                let held: u64 = pieces.iter().map(|(out, _, op)| op.rows() * self.outputs[*out].1).sum();
                let mut whole = if held == n0 * per as u64 {
                    vec![0.0; n0 as usize * per]
                } else {
                    self.reference.read_outer(name, 0, n0)?
                };
                for (out, base, op) in pieces {
                    let (rows, cols) = &self.outputs[*out];
                    let cols = *cols;
                    let vals = rows(*base, *base + op.rows())?;
                    if vals.len() as u64 != op.rows() * cols {
                        return Err(Error::Read {
                            tensor: name.to_string(),
                            why: format!("{} substituted values for {} rows of {cols}", vals.len(), op.rows()),
                        });
                    }
                    scatter(op, &vals, cols, name, &mut whole);
                }
                let w = Arc::new(whole);
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.to_string(), Arc::clone(&w)));
                w
            }
        };
        Ok(whole.get(i0 as usize * per..i1 as usize * per).map(<[f32]>::to_vec).unwrap_or_default())
    }
}

/// Where a probe's tensor acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// The token embedding.
    Embedding,
    /// Decoder layer `l`.
    Layer(usize),
    /// The output head.
    Head,
}

/// One probe: a model over a source with one tensor replaced, and where that tensor acts.
pub struct Probe<'m, 's> {
    pub at: At,
    pub model: &'m Model<'s>,
}

/// The mean KL divergence (as `sling eval` and llama-perplexity score it: second half of each chunk) of each probe
/// from `reference` over `chunks` of `ctx` tokens. `per_batch` chunks go through together; `progress(layer)`.
pub fn probe_kld(
    reference: &Model,
    probes: &[Probe<'_, '_>],
    chunks: &[Vec<u32>],
    ctx: usize,
    per_batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let mut evs: Vec<Evaluator> = probes.iter().map(|_| Evaluator::new(ctx)).collect();
    let n_layers = reference.spec().n_layers;
    let batches: Vec<&[Vec<u32>]> = chunks.chunks(per_batch.max(1)).collect();
    for (bi, batch) in batches.iter().enumerate() {
        let (mut h, b) = reference.embed_batch(batch)?;
        // Each probe's hidden states once it has branched off, and the layer it branched at.
        let mut streams: Vec<Option<Array2<f32>>> = vec![None; probes.len()];
        for (p, s) in probes.iter().zip(streams.iter_mut()) {
            if p.at == At::Embedding {
                *s = Some(p.model.embed_batch(batch)?.0);
            }
        }
        for l in 0..n_layers {
            for (p, s) in probes.iter().zip(streams.iter_mut()) {
                match (p.at, s.as_mut()) {
                    (At::Layer(pl), None) if pl == l => {
                        let mut x = h.clone();
                        p.model.run_layer(l, &mut x, &b, None)?;
                        *s = Some(x);
                    }
                    (_, Some(x)) => reference.run_layer(l, x, &b, None)?,
                    _ => {}
                }
            }
            reference.run_layer(l, &mut h, &b, None)?;
            progress(bi * n_layers + l + 1, batches.len() * n_layers);
        }
        let clean = reference.head_logits(&h)?;
        for ((p, s), ev) in probes.iter().zip(streams).zip(evs.iter_mut()) {
            // The probe's own head: the same as the reference's unless its tensor is the head, or the embedding
            // a tied head reads (GGUF then stores no `output.weight` and llama.cpp uses `token_embd`).
            let cand = match (p.at, s) {
                (At::Head, _) => p.model.head_logits(&h)?,
                (_, Some(x)) => p.model.head_logits(&x)?,
                (_, None) => {
                    return Err(Error::BadConfig(format!(
                        "a probe at {:?} never ran (the model has {n_layers} layers)",
                        p.at
                    )))
                }
            };
            for (&(st, len), c) in b.seqs.iter().zip(batch.iter()) {
                let r = clean.slice(ndarray::s![st..st + len, ..]).to_owned();
                let q = cand.slice(ndarray::s![st..st + len, ..]).to_owned();
                ev.add_chunk(c, &r, &q)?;
            }
        }
    }
    Ok(evs.iter().map(|e| e.report().kld_mean).collect())
}
