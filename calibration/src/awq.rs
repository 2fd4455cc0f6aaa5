//! The sequential, per-expert AWQ calibration pass (llm-compressor's `AWQModifier` on its sequential pipeline),
//! run before a vLLM/MLX target's executor, which then rounds the folded weights to nearest.
//!
//! AWQ (Lin et al. 2023) picks one positive scale per input channel of the linear layers that read one input (the
//! *balance* layers), multiplies their columns by it and divides the layer that produced the input (the *smooth*
//! layer: a norm, or the rows of a previous linear) by it, so the unquantized model computes the same function while
//! round-to-nearest loses less on the channels with large activations. The search itself is
//! [`sling_quantizers::awq`] (llm-compressor's grid over α with duo scaling; the loss from each balance layer's
//! `XᵀX` instead of re-running the parent module: see its module docs).
//!
//! # Mappings (llm-compressor 0.14 `modifiers/transform/awq/mappings.py`, generalised over [`Spec`])
//!
//! Per decoder layer, in order:
//! * grouped-query attention: `input_layernorm → q/k/v_proj`; `v_proj → o_proj` only when `v_proj`'s rows equal
//!   `o_proj`'s columns (no GQA; `_check_layers_are_compatible`), `v_proj`'s bias divided too;
//! * MLA (DeepSeek, `_deepseek_mappings`): `input_layernorm → q_a_proj (or q_proj) + kv_a_proj_with_mqa`,
//!   `q_a_layernorm → q_b_proj`, `kv_a_layernorm → kv_b_proj`;
//! * dense FFN: `post_attention_layernorm → gate/up_proj`, `up_proj → down_proj`;
//! * MoE (`_moe_default_mappings`, and the same for Mixtral's `w1/w3/w2`, which llm-compressor has no entry
//!   for): `post_attention_layernorm →` the router, the shared expert's gate/up (and Qwen2-MoE's
//!   `shared_expert_gate`) and **every routed expert's gate/up, one shared scale vector**; then per routed expert
//!   `up → down`, and the shared expert's `up → down`;
//! * gpt-oss's MoE: none (its experts are stacked tensors, MXFP4 in the released checkpoints, that take no
//!   per-expert fold); its attention mappings as above.
//!
//! A mapping none of whose readers the target quantizes under its own name (DeepSeek's `kv_b_proj`, which the
//! MLX target splits into `embed_q`/`unembed_out`) has no loss to search and is left unscaled.
//!
//! Every linear that reads a smoothed input is multiplied by the scales, quantized or not (the router stays at
//! source precision, scaled); only quantized ones enter the loss and `w_mean`. A routed expert's loss is
//! `tr(ΔW Σ_routed x xᵀ ΔWᵀ)` over the tokens routed to it (every token with `all_experts`, llm-compressor's
//! default `calibrate_all_experts`), so the shared FFN scales weigh each expert by the tokens it serves. An
//! expert with fewer than `min_expert_tokens` routed tokens is left out of that loss, its own `up → down` is not
//! searched (scales 1), and its three weights are reported as round-to-nearest fallbacks.
//!
//! # The folds and the pass
//! The scales of a layer become [`Fold`]s keyed by source tensor name (a tensor both balance and smooth —
//! `up_proj` — gets both in one rounding); the target's plan wraps the tensors they name
//! ([`sling_pipeline::Plan::fold`]) and writes the folded values: norms and routers in the source dtype, the
//! rest rounded to nearest on the target's grid. The pass runs layer by layer as the GPTQ pass does
//! ([`crate::gptq`]): observe the layer on the current hidden states (Hessians and `Σ|x|` per shared input, in
//! expert groups under `max_ram`: the FFN mapping's loss is a sum over experts, so each group adds its
//! experts' share to every grid point's total), search, then, sequentially, run the layer again with its folded,
//! rounded weights ([`Folded`]) to give the next layer its inputs. The folds of each finished layer are written to
//! the store's directory (`awq-layer-L.json`, `f64` scales as their bits) and reused by `--resume`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sling_core::ModelConfig;
use sling_pipeline::solved::Store;
use sling_quantizers::awq::{self, Balance, Fold, Point};
use sling_quantizers::gptq::{self as qg, Grid, GroupParams};

use crate::error::{Error, Result};
use crate::gptq::{
    expert_groups, forward, layer_weights, propagate, read_weight, sub_batches, weight_shape, Grids, Hessians,
    LayerRouting, Method, Progress, Report, RoundedEmbeddings, RoutingOnly, Settings, SolvedWeight, EMBEDDINGS,
};
use crate::model::{Batch, Model};
use crate::observer::{LinearInput, Observer};
use crate::source::TensorSource;
use crate::spec::{Attention, ExpertLayout, Ffn, Spec};

/// The folds of a whole run, by source tensor name.
pub type Folds = BTreeMap<String, Arc<Fold>>;

/// What [`run`] gives: the report (as the GPTQ pass's) and the folds for the target's plan.
pub struct Outcome {
    pub report: Report,
    pub folds: Folds,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SmoothKind {
    Norm,
    Linear,
}

/// One AWQ mapping: the smooth tensor, and every linear weight that reads its output.
struct Mapping {
    smooth: String,
    kind: SmoothKind,
    /// The previous linear's bias (divided like its rows).
    bias: Option<String>,
    readers: Vec<String>,
    /// A routed expert's own mapping (`up → down`).
    expert: Option<usize>,
}

/// The mappings of layer `l` whose tensors exist (see the module docs).
fn mappings(spec: &Spec, src: &dyn TensorSource, l: usize) -> Result<Vec<Mapping>> {
    let p = format!("model.layers.{l}.");
    let w = |s: &str| format!("{p}{s}.weight");
    let norm = |n: &str, readers: Vec<String>| Mapping {
        smooth: w(n),
        kind: SmoothKind::Norm,
        bias: None,
        readers,
        expert: None,
    };
    let linear = |prev: &str, readers: Vec<String>, expert| Mapping {
        smooth: w(prev),
        kind: SmoothKind::Linear,
        bias: Some(format!("{p}{prev}.bias")).filter(|b| src.contains(b)),
        readers,
        expert,
    };
    let mut m = Vec::new();
    match &spec.attention {
        Attention::Gqa { .. } => {
            m.push(norm("input_layernorm", vec![w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")]));
            let (v, o) = (weight_shape(src, &w("self_attn.v_proj")), weight_shape(src, &w("self_attn.o_proj")));
            if let (Some((v_rows, _)), Some((_, o_cols))) = (v, o) {
                if v_rows == o_cols {
                    m.push(linear("self_attn.v_proj", vec![w("self_attn.o_proj")], None));
                }
            }
        }
        Attention::Mla { q_lora_rank, .. } => {
            let q = if q_lora_rank.is_some() { "self_attn.q_a_proj" } else { "self_attn.q_proj" };
            m.push(norm("input_layernorm", vec![w(q), w("self_attn.kv_a_proj_with_mqa")]));
            if q_lora_rank.is_some() {
                m.push(norm("self_attn.q_a_layernorm", vec![w("self_attn.q_b_proj")]));
            }
            m.push(norm("self_attn.kv_a_layernorm", vec![w("self_attn.kv_b_proj")]));
        }
    }
    match &spec.ffn[l] {
        Ffn::Dense { .. } => {
            m.push(norm("post_attention_layernorm", vec![w("mlp.gate_proj"), w("mlp.up_proj")]));
            m.push(linear("mlp.up_proj", vec![w("mlp.down_proj")], None));
        }
        // gpt-oss: the FFN norm's readers include the stacked experts, which cannot take a per-expert fold (and a
        // target keeping their MXFP4 codes cannot take any): no FFN mapping, the router rounded without scales.
        Ffn::Moe(moe) if moe.layout == ExpertLayout::GptOss => {}
        Ffn::Moe(moe) => {
            let sh = moe.shared_stem;
            let (prefix, [g, u, d]) = spec.expert_names;
            let ex = |e: usize, n: &str| format!("{prefix}.{e}.{n}");
            let mut readers = vec![w(spec.router_stem)];
            if moe.shared_ff.is_some() {
                readers.extend([w(&format!("{sh}.gate_proj")), w(&format!("{sh}.up_proj"))]);
                if moe.shared_gate {
                    readers.push(w(&format!("{sh}_gate")));
                }
            }
            readers.extend((0..moe.n_experts).flat_map(|e| [w(&ex(e, g)), w(&ex(e, u))]));
            m.push(norm("post_attention_layernorm", readers));
            for e in 0..moe.n_experts {
                m.push(linear(&ex(e, u), vec![w(&ex(e, d))], Some(e)));
            }
            if moe.shared_ff.is_some() {
                m.push(linear(&format!("{sh}.up_proj"), vec![w(&format!("{sh}.down_proj"))], None));
            }
        }
    }
    // Readers that do not exist (no shared expert, a bias-free layer) drop out; a reader or smooth tensor that
    // exists only inside a transformers-5 fused expert tensor cannot be folded per expert.
    let mut out = Vec::new();
    for mut mp in m {
        let fused = |n: &str| !src.contains(n) && weight_shape(src, n).is_some();
        if fused(&mp.smooth) || mp.readers.iter().any(|r| fused(r)) {
            return Err(Error::Unsupported(format!(
                "AWQ of transformers-5 fused expert tensors (layer {l}: {}); convert the checkpoint to per-expert \
                 tensors or use --method gptq",
                mp.smooth
            )));
        }
        mp.readers.retain(|r| src.contains(r));
        if src.contains(&mp.smooth) && !mp.readers.is_empty() {
            out.push(mp);
        }
    }
    Ok(out)
}

/// The grid of a weight that is observed but not quantized (a router): [`layer_weights`] gives it an input
/// (a Hessian and `Σ|x|`); nothing rounds on it.
struct ObserveOnly;

impl Grid for ObserveOnly {
    fn group(&self) -> usize {
        usize::MAX
    }
    fn row_params(&self, row: &[f32]) -> Vec<GroupParams> {
        vec![GroupParams { scale: 1.0, zero: 0.0, q_scale: 1.0, q_zero: 0.0 }; usize::from(!row.is_empty())]
    }
    fn quantize(&self, x: f32, _: &GroupParams) -> (u8, f32) {
        (0, x)
    }
    fn dequantize(&self, _: u8, _: &GroupParams) -> f32 {
        0.0
    }
}

/// The GPTQ pass's Hessians, plus the raw inputs of each shared input while they number at most its width (a routed
/// expert's few tokens; every input of a short calibration set): the loss is then `‖ΔW Xᵀ‖²` (`rows · cols · n`),
/// not `tr(ΔW XᵀX ΔWᵀ)` (`rows · cols²`).
struct Observed<'a> {
    h: Hessians<'a>,
    xs: Vec<Option<Vec<f32>>>,
    over: Vec<bool>,
}

impl Observed<'_> {
    fn keep(&mut self, x: &LinearInput<'_>) {
        let Some(&i) = x.hf.and_then(|n| self.h.by_name.get(n)) else { return };
        let input = &self.h.inputs[i];
        if !self.h.active[i] || self.h.taken[i] || self.over[i] || x.n_cols != input.cols {
            return;
        }
        let c = input.cols.max(1);
        let v = self.xs[i].get_or_insert_with(Vec::new);
        if (v.len() + x.rows.len()) / c > c {
            self.over[i] = true;
            self.xs[i] = None;
        } else {
            v.extend_from_slice(x.rows);
        }
    }
}

impl Observer for Observed<'_> {
    fn linear_input(&mut self, x: &LinearInput<'_>) {
        self.keep(x);
        self.h.add(x);
    }
    fn hf_only_input(&mut self, x: &LinearInput<'_>) {
        self.keep(x);
        self.h.add(x);
    }
    fn routing(&mut self, layer: usize, counts: &[u64]) {
        self.h.routing(layer, counts);
    }
    fn layer_done(&mut self, layer: usize) {
        self.h.layer_done(layer);
    }
}

// ---- the folded, rounded model ----------------------------------------------------------------------

/// The source with the folds applied and the quantized weights rounded to nearest on their grids: what the
/// artifact holds (norms and routers in `f32` rather than the source dtype), for the sequential forward.
struct Folded<'a> {
    base: &'a dyn TensorSource,
    folds: &'a Folds,
    grids: &'a Grids<'a>,
}

impl TensorSource for Folded<'_> {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.base.shape(name)
    }
    fn is_mxfp4(&self, name: &str) -> bool {
        self.base.is_mxfp4(name)
    }
    fn release(&self) {
        self.base.release()
    }
    fn read_outer(&self, name: &str, i0: u64, i1: u64) -> Result<Vec<f32>> {
        let fold_err = |e: awq::AwqError| Error::Read { tensor: name.into(), why: format!("AWQ fold: {e}") };
        let shape = self.base.shape(name).ok_or_else(|| Error::Missing(name.into()))?;
        let fold = self.folds.get(name);
        let mut v = match (fold, shape.len()) {
            (Some(f), 1) => {
                // a norm or bias: folded whole (one row), then sliced
                let mut all = self.base.read_outer(name, 0, shape[0])?;
                let n = all.len();
                f.apply(&mut all, 0, n).map_err(fold_err)?;
                all.get(i0 as usize..i1 as usize)
                    .map(<[f32]>::to_vec)
                    .ok_or_else(|| Error::Read { tensor: name.into(), why: format!("elements {i0}..{i1} of {n}") })?
            }
            (Some(f), _) => {
                let mut v = self.base.read_outer(name, i0, i1)?;
                let cols = v.len() / (i1 - i0).max(1) as usize;
                f.apply(&mut v, i0 as usize, cols).map_err(fold_err)?;
                v
            }
            (None, _) => self.base.read_outer(name, i0, i1)?,
        };
        if name != EMBEDDINGS && shape.len() == 2 && i1 > i0 {
            if let Some(g) = (self.grids)(name) {
                let rows = (i1 - i0) as usize;
                let cols = v.len() / rows;
                v = qg::rtn(&v, rows, cols, &*g)
                    .map_err(|e| Error::Solve { tensor: name.into(), why: e.to_string() })?
                    .dequant;
            }
        }
        Ok(v)
    }
}

/// No weight rounded: [`folded`]'s source is the smoothed model itself.
const UNROUNDED: &Grids<'static> = &|_: &str| None;

/// `base` with AWQ's `folds` applied and nothing rounded (norms and routers in `f32`): the smoothed model, which a
/// second solver calibrates on and solves (GPTQ after AWQ, llm-compressor's `[AWQModifier, GPTQModifier]` recipe).
pub fn folded<'a>(base: &'a dyn TensorSource, folds: &'a Folds) -> impl TensorSource + 'a {
    Folded { base, folds, grids: UNROUNDED }
}

// ---- the resume file of a layer ---------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct FoldBits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    col_mul: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    col_div: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    row_div: Option<Vec<u64>>,
}

/// A finished layer: what it reported and its folds (scales as `f64` bits: JSON's decimal text would not give
/// back every bit).
#[derive(Serialize, Deserialize)]
struct LayerFile {
    schema: String,
    layer: usize,
    weights: Vec<SolvedWeight>,
    routing: Option<Vec<u64>>,
    folds: BTreeMap<String, FoldBits>,
}

const LAYER_SCHEMA: &str = "sling.awq-layer/1";

fn layer_path(store: &Store, l: usize) -> PathBuf {
    store.dir().join(format!("awq-layer-{l}.json"))
}

fn bits(v: &Option<Vec<f64>>) -> Option<Vec<u64>> {
    v.as_ref().map(|v| v.iter().map(|x| x.to_bits()).collect())
}

fn unbits(v: Option<Vec<u64>>) -> Option<Vec<f64>> {
    v.map(|v| v.into_iter().map(f64::from_bits).collect())
}

fn save_layer(store: &Store, f: &LayerFile) -> Result<()> {
    let path = layer_path(store, f.layer);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(f).map_err(|e| Error::Store(e.to_string()))?;
    let io = |e: std::io::Error| Error::Store(format!("{}: {e}", path.display()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// A finished layer from an earlier, interrupted run, if its file is there and whole.
fn load_layer(store: &Store, l: usize) -> Option<LayerFile> {
    let text = std::fs::read(layer_path(store, l)).ok()?;
    let f: LayerFile = serde_json::from_slice(&text).ok()?;
    (f.schema == LAYER_SCHEMA && f.layer == l).then_some(f)
}

// ---- the pass ---------------------------------------------------------------------------------------

/// The state of one mapping's search across the expert groups of a layer.
struct Search {
    points: Option<Vec<Point>>,
    /// Per point (after the identity), the loss summed over the balance layers seen so far.
    totals: Vec<f64>,
    /// Per quantized reader in the loss: its own loss vector.
    own: HashMap<String, Vec<f64>>,
}

/// Runs the pass: the AWQ scales of every mapping of every decoder layer, for the weights `grids` names (those the
/// target rounds to nearest on an integer grid), as folds. `o` are the grid-search settings; from `s`:
/// `min_expert_tokens`, `all_experts`, `sequential`, `max_ram`, `batch_tokens`, `backend` (the GPTQ options are
/// unused). Finished layers are saved in `store`'s directory and reused when present (`--resume`). Errors: as
/// [`crate::gptq::run`], and transformers-5 fused expert tensors, which cannot be folded per expert.
#[allow(clippy::too_many_arguments)]
pub fn run(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    seqs: &[Vec<u32>],
    grids: &Grids<'_>,
    store: &Store,
    s: &Settings,
    o: &awq::Options,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Outcome> {
    let rounded = grids(EMBEDDINGS).map(|grid| RoundedEmbeddings { base: src, grid });
    let fwd: &dyn TensorSource = match &rounded {
        Some(r) => r,
        None => src,
    };
    let model = Model::new(fwd, cfg)?.all_experts(s.all_experts).with_backend(s.backend.clone());
    let spec = model.spec();
    if seqs.is_empty() {
        return Err(Error::Empty("no calibration sequences"));
    }
    let maps: Vec<Vec<Mapping>> = (0..spec.n_layers).map(|l| mappings(spec, src, l)).collect::<Result<_>>()?;
    // Every reader gets an observed input, quantized or not (the router's is the FFN's all-token input).
    let readers: HashSet<String> = maps.iter().flatten().flat_map(|m| m.readers.iter().cloned()).collect();
    let observe_only: Arc<dyn Grid> = Arc::new(ObserveOnly);
    let obs_grids = |n: &str| grids(n).or_else(|| readers.contains(n).then(|| observe_only.clone()));
    let layers: Vec<_> = (0..spec.n_layers)
        .map(|l| layer_weights(spec, src, l, s.all_experts, &obs_grids, store))
        .collect::<Result<_>>()?;
    let quantized = |n: &str| grids(n).is_some();
    let n_weights: usize = layers.iter().map(|(_, w)| w.iter().filter(|w| quantized(&w.name)).count()).sum();
    progress(Progress::Start { layers: spec.n_layers, weights: n_weights });

    let (mut hs, batches): (Vec<Array2<f32>>, Vec<Batch>) = sub_batches(seqs, s.batch_tokens.max(1))
        .into_iter()
        .map(|b| model.embed_batch(b))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let n_tokens: u64 = hs.iter().map(|h| h.nrows() as u64).sum();
    let mut report = Report {
        sequences: seqs.len(),
        tokens: n_tokens,
        all_experts: s.all_experts,
        sequential: s.sequential,
        min_expert_tokens: s.min_expert_tokens,
        weights: Vec::new(),
        routing: Vec::new(),
        passes: Vec::new(),
        output_error: Vec::new(),
    };
    let mut folds: BTreeMap<String, Fold> = BTreeMap::new();
    let mut shared: Folds = BTreeMap::new();
    let moe = |l: usize| matches!(spec.ffn[l], Ffn::Moe(_));
    for (l, ((inputs, weights), maps)) in layers.into_iter().zip(&maps).enumerate() {
        let mut observed_out: Option<Vec<Array2<f32>>> = None;
        let (layer_weights_report, routing, layer_folds, passes) = if let Some(f) = load_layer(store, l) {
            progress(Progress::LayerStart { layer: l, weights: f.weights.len(), passes: 0, inputs: &hs });
            for w in &f.weights {
                progress(Progress::Solved { weight: w });
            }
            let lf: BTreeMap<String, Fold> = f
                .folds
                .into_iter()
                .map(|(k, b)| {
                    (k, Fold { col_mul: unbits(b.col_mul), col_div: unbits(b.col_div), row_div: unbits(b.row_div) })
                })
                .collect();
            (f.weights, f.routing, lf, 0)
        } else {
            let index: HashMap<&str, usize> = weights.iter().enumerate().map(|(i, w)| (w.name.as_str(), i)).collect();
            let active_all = vec![true; inputs.len()];
            let groups = expert_groups(&inputs, &active_all, s.max_ram);
            progress(Progress::LayerStart {
                layer: l,
                weights: weights.iter().filter(|w| quantized(&w.name)).count(),
                passes: groups.len(),
                inputs: &hs,
            });
            let mut searches: Vec<Search> =
                maps.iter().map(|_| Search { points: None, totals: Vec::new(), own: HashMap::new() }).collect();
            let mut routing: Option<Vec<u64>> = None;
            // per input: tokens seen (for the report)
            let mut tokens_of: Vec<u64> = vec![0; inputs.len()];
            let min_ok = |e: Option<usize>, routing: &Option<Vec<u64>>| -> Option<u64> {
                // the routed tokens of an expert below the minimum (not with all_experts)
                let e = e.filter(|_| !s.all_experts)?;
                let n = routing.as_ref().and_then(|r| r.get(e).copied()).unwrap_or(0);
                (n < s.min_expert_tokens).then_some(n)
            };
            for (gi, group) in groups.iter().enumerate() {
                let active: Vec<bool> =
                    inputs.iter().map(|i| i.expert.map_or(gi == 0, |e| group.contains(&e))).collect();
                let mut h = Hessians::new(&inputs, &weights, active.clone());
                h.gemm = s.backend.as_deref().and_then(|b| b.gemm().ok().flatten());
                let mut obs =
                    Observed { h, xs: inputs.iter().map(|_| None).collect(), over: vec![false; inputs.len()] };
                let mut hx = hs.clone();
                forward(&model, l, &mut hx, &batches, Some(&mut obs))?;
                if let Some(e) = obs.h.bad.take() {
                    return Err(e);
                }
                if routing.is_none() {
                    routing = obs.h.routing.clone();
                }
                observed_out = Some(hx);
                let accs = std::mem::take(&mut obs.h.acc);
                let xs = std::mem::take(&mut obs.xs);
                drop(obs);
                for (k, a) in accs.iter().enumerate() {
                    if let Some(a) = a {
                        tokens_of[k] = a.n;
                    }
                }
                // The balance layers of this group: (mapping, reader name, weight index), in mapping order.
                let mut work: Vec<(usize, usize)> = Vec::new();
                for (mi, mp) in maps.iter().enumerate() {
                    if mp.expert.is_some_and(|e| !group.contains(&e)) {
                        continue;
                    }
                    let st = &mut searches[mi];
                    if st.points.is_none() {
                        // x_mean: the first reader's input that sees every token of the mapping (the FFN norm's
                        // router), else the first reader's own.
                        let inp = |r: &String| index.get(r.as_str()).map(|&i| weights[i].input);
                        let xi = mp
                            .readers
                            .iter()
                            .filter_map(inp)
                            .find(|&k| inputs[k].expert.is_none())
                            .or_else(|| mp.readers.iter().find_map(inp));
                        let Some(acc) = xi.and_then(|k| accs[k].as_ref()).filter(|a| a.n > 0) else { continue };
                        let x_mean: Vec<f32> = acc.abs.iter().map(|&v| (v / acc.n as f64) as f32).collect();
                        // w_mean over every quantized reader (each read once more, dropped at once)
                        let cols = x_mean.len();
                        let mut sum = vec![0f64; cols];
                        let mut ws_rows = 0usize;
                        for r in mp.readers.iter().filter(|r| quantized(r)) {
                            let Some(&i) = index.get(r.as_str()) else { continue };
                            let w = &weights[i];
                            let data = read_weight(src, &w.name, w.rows, w.cols)?;
                            let m = awq::weight_means(&[(&data, w.rows, w.grid.group())], cols);
                            sum.iter_mut().zip(&m).for_each(|(a, b)| *a += b * w.rows as f64);
                            ws_rows += w.rows;
                        }
                        if ws_rows == 0 {
                            continue;
                        }
                        let w_mean: Vec<f64> = sum.iter().map(|v| v / ws_rows as f64).collect();
                        let pts = awq::points(&x_mean, &w_mean, o)
                            .map_err(|e| Error::Solve { tensor: mp.smooth.clone(), why: format!("AWQ: {e}") })?;
                        st.totals = vec![0.0; pts.len() + 1];
                        st.points = Some(pts);
                    }
                    for r in mp.readers.iter().filter(|r| quantized(r)) {
                        let Some(&i) = index.get(r.as_str()) else { continue };
                        let k = weights[i].input;
                        if !(active[k] && accs[k].as_ref().is_some_and(|a| a.n > 0)) {
                            continue;
                        }
                        if min_ok(inputs[k].expert, &routing).is_some() {
                            continue;
                        }
                        work.push((mi, i));
                    }
                }
                let inv_n = 1.0 / n_tokens.max(1) as f64;
                let delta_row = sling_kernels::awq::delta();
                let losses: Vec<Result<Vec<f64>>> = work
                    .par_iter()
                    .map(|&(mi, i)| {
                        let w = &weights[i];
                        let acc = accs[w.input].as_ref().expect("checked above");
                        let pts = searches[mi].points.as_deref().expect("set above");
                        let data = read_weight(src, &w.name, w.rows, w.cols)?;
                        let h = acc
                            .sum
                            .as_slice()
                            .ok_or_else(|| Error::Solve { tensor: w.name.clone(), why: "Hessian layout".into() })?;
                        let b = Balance { w: &data, rows: w.rows, grid: &*w.grid, h, weight: inv_n };
                        match &xs[w.input] {
                            Some(x) => awq::balance_losses_x(&b, x, 0, pts, delta_row),
                            None => awq::balance_losses(&b, 0, pts, delta_row),
                        }
                        .map_err(|e| Error::Solve { tensor: w.name.clone(), why: format!("AWQ: {e}") })
                    })
                    .collect();
                for (&(mi, i), ls) in work.iter().zip(losses) {
                    let ls = ls?;
                    let st = &mut searches[mi];
                    st.totals.iter_mut().zip(&ls).for_each(|(t, v)| *t += v);
                    st.own.insert(weights[i].name.clone(), ls);
                }
            }
            if moe(l) && routing.is_none() {
                let mut ro = RoutingOnly::default();
                let mut hx = hs.clone();
                forward(&model, l, &mut hx, &batches, Some(&mut ro))?;
                routing = ro.0;
                observed_out = Some(hx);
            }
            // choose, fold, report
            let mut lf: BTreeMap<String, Fold> = BTreeMap::new();
            let mut method_of: HashMap<String, (Method, f64)> = HashMap::new();
            let err = |t: &str, e: awq::AwqError| Error::Solve { tensor: t.to_string(), why: format!("AWQ fold: {e}") };
            for (mp, st) in maps.iter().zip(&searches) {
                let Some(pts) = st.points.as_deref().filter(|_| !st.own.is_empty()) else { continue };
                let pick = awq::pick(pts, &st.totals);
                for r in &mp.readers {
                    if let Some(own) = st.own.get(r) {
                        let loss = own[pick.point.map_or(0, |k| k + 1)];
                        let m = Method::Awq { smooth: Some(mp.smooth.clone()), ratio: pick.ratio, duo: pick.duo };
                        method_of.insert(r.clone(), (m, loss));
                    }
                }
                if pick.scales.iter().all(|&x| x == 1.0) {
                    continue;
                }
                match mp.kind {
                    SmoothKind::Norm => lf.entry(mp.smooth.clone()).or_default().div_cols(&pick.scales),
                    SmoothKind::Linear => lf.entry(mp.smooth.clone()).or_default().div_rows(&pick.scales),
                }
                .map_err(|e| err(&mp.smooth, e))?;
                if let Some(b) = &mp.bias {
                    lf.entry(b.clone()).or_default().div_cols(&pick.scales).map_err(|e| err(b, e))?;
                }
                for r in &mp.readers {
                    lf.entry(r.clone()).or_default().mul_cols(&pick.scales).map_err(|e| err(r, e))?;
                }
            }
            let mut rep = Vec::new();
            for w in weights.iter().filter(|w| quantized(&w.name)) {
                let k = w.input;
                let routed = min_ok(inputs[k].expert, &routing);
                let tokens = match (inputs[k].expert.filter(|_| !s.all_experts), &routing) {
                    (Some(e), Some(r)) => r.get(e).copied().unwrap_or(0),
                    _ => tokens_of[k],
                };
                let (method, loss) = if let Some(n) = routed {
                    let why = format!(
                        "{n} routed tokens, fewer than the minimum {}: rounded to nearest without its own AWQ \
                         scales",
                        s.min_expert_tokens
                    );
                    (Method::Rtn { why }, 0.0)
                } else if let Some(m) = method_of.remove(&w.name) {
                    m
                } else {
                    (Method::Awq { smooth: None, ratio: 0.0, duo: false }, 0.0)
                };
                let sw = SolvedWeight {
                    name: w.name.clone(),
                    layer: l,
                    expert: w.expert,
                    rows: w.rows,
                    cols: w.cols,
                    tokens,
                    method,
                    loss,
                };
                progress(Progress::Solved { weight: &sw });
                rep.push(sw);
            }
            lf.retain(|_, f| !f.is_identity());
            let file = LayerFile {
                schema: LAYER_SCHEMA.into(),
                layer: l,
                weights: rep.clone(),
                routing: routing.clone(),
                folds: lf
                    .iter()
                    .map(|(k, f)| {
                        (
                            k.clone(),
                            FoldBits {
                                col_mul: bits(&f.col_mul),
                                col_div: bits(&f.col_div),
                                row_div: bits(&f.row_div),
                            },
                        )
                    })
                    .collect(),
            };
            save_layer(store, &file)?;
            (rep, routing, lf, groups.len())
        };
        folds.extend(layer_folds);
        shared = folds.iter().map(|(k, f)| (k.clone(), Arc::new(f.clone()))).collect();
        report.weights.extend(layer_weights_report);
        let overlay = Folded { base: fwd, folds: &shared, grids };
        let quantized: Option<&dyn TensorSource> = s.sequential.then_some(&overlay);
        let err = propagate(&model, quantized, cfg, s, l, &mut hs, &batches, observed_out)?;
        if let (true, Some(counts)) = (moe(l), routing) {
            report.routing.push(LayerRouting { layer: l, counts });
        }
        report.passes.push(passes);
        report.output_error.push(err);
        progress(Progress::LayerDone { layer: l });
    }
    Ok(Outcome { report, folds: shared })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CheckpointSource;
    use sling_formats::checkpoint::Checkpoint;
    use sling_quantizers::ct::ScaleDtype;
    use sling_quantizers::mlx::AffineGrid;

    /// transformers-5 fused expert tensors (one `[experts, 2·ff, hidden]` tensor per layer) cannot carry a fold per
    /// expert: a clear error naming the layer, not a wrong artifact.
    #[test]
    fn fused_expert_tensors_are_refused() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3moe");
        let cfg = Checkpoint::open(&root).unwrap().config.unwrap();
        let spec = Spec::from_config(&cfg).unwrap();
        let mut src = crate::MemSource::new();
        let (h, ff, e) = (spec.hidden, 32usize, 8usize);
        src.insert("model.layers.0.post_attention_layernorm.weight", &[h as u64], vec![1.0; h]);
        src.insert("model.layers.0.mlp.gate.weight", &[e as u64, h as u64], vec![0.0; e * h]);
        src.insert(
            "model.layers.0.mlp.experts.gate_up_proj",
            &[e as u64, 2 * ff as u64, h as u64],
            vec![0.0; e * 2 * ff * h],
        );
        src.insert("model.layers.0.mlp.experts.down_proj", &[e as u64, h as u64, ff as u64], vec![0.0; e * h * ff]);
        let err = mappings(&spec, &src, 0).err().expect("fused experts must be refused");
        assert!(err.to_string().contains("fused expert tensors (layer 0"), "{err}");
    }

    /// The folds alone (no rounding) leave the model's function as it was: logits equal up to `f32` rounding, on
    /// every architecture with a mapping of each kind (GQA + MoE, Mixtral's w1/w3/w2, MHA `v → o` (OLMoE), MLA +
    /// shared experts (DeepSeek-V3), Qwen2-MoE's shared expert gate, dense).
    #[test]
    fn folds_preserve_the_function() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
        let seqs: Vec<Vec<u32>> =
            (0..4u32).map(|s| (0..32u32).map(|i| (i * 37 + s * 11 + 5) % 300).collect()).collect();
        for name in ["qwen3moe", "mixtral", "olmoe", "deepseekv3", "qwen2moe", "llama"] {
            let ck = Checkpoint::open(&root.join(name)).unwrap();
            let cfg = ck.config.clone().unwrap();
            let src = CheckpointSource::new(&ck);
            let grid: Arc<dyn Grid> = Arc::new(AffineGrid { bits: 3, group: 32, sd: ScaleDtype::BF16 });
            let grids = |n: &str| {
                let quantized = n.starts_with("model.layers.")
                    && n.ends_with(".weight")
                    && src.shape(n).is_some_and(|s| s.len() == 2 && s[1] % 32 == 0)
                    && !n.ends_with("mlp.gate.weight")
                    && !n.ends_with("block_sparse_moe.gate.weight");
                quantized.then(|| grid.clone())
            };
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let o = run(&src, &cfg, &seqs, &grids, &store, &Settings::default(), &awq::Options::default(), &mut |_| {})
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let norms = o.folds.keys().filter(|k| k.ends_with("layernorm.weight")).count();
            assert!(norms > 0 && o.folds.len() > norms, "{name}: folds {:?}", o.folds.keys().collect::<Vec<_>>());
            let none = |_: &str| -> Option<Arc<dyn Grid>> { None };
            let folded = Folded { base: &src, folds: &o.folds, grids: &none };
            let want = Model::new(&src, &cfg).unwrap().logits(&seqs, None).unwrap();
            let got = Model::new(&folded, &cfg).unwrap().logits(&seqs, None).unwrap();
            for (a, b) in got.iter().zip(&want) {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(diff <= 1e-4 * scale.max(1.0), "{name}: logits moved by {diff} (max |logit| {scale})");
            }
            // every quantized weight is reported once, in layer order
            let n = o.report.weights.len();
            assert!(n > 0 && o.report.weights.windows(2).all(|w| w[0].layer <= w[1].layer), "{name}");
        }
    }
}
