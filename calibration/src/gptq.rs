//! The sequential, per-expert GPTQ calibration pass (what llm-compressor's sequential pipeline does), run
//! before a vLLM/MLX target's executor, which then encodes the solved weights from the
//! [`Store`](sling_pipeline::solved::Store).
//!
//! 1. The calibration sequences are embedded once. For each decoder layer `l`, in order:
//!    * **observe**: layer `l`'s forward runs over the current hidden states with an observer that accumulates,
//!      per input of a linear weight the target quantizes, `Σ x xᵀ` (f32 products of 1024-row chunks summed in f64,
//!      `math::add_gram`) and the rows seen `n`; the solver gets
//!      `H = 2/n Σ x xᵀ`. A routed expert's inputs are only the tokens routed to it, or every token with
//!      [`Settings::all_experts`] (llm-compressor's `calibrate_all_experts`, [`Model::all_experts`]). Weights
//!      that share an input share one accumulator: q/k/v (MLA: `q_a_proj`/`q_proj` and `kv_a_proj_with_mqa`),
//!      one expert's gate/up, the router and the shared expert's gate/up (and, with `all_experts`, every routed
//!      expert's gate/up: they all see the layer's normed hidden states);
//!    * **solve**: every weight of layer `l` that `grids` names is solved with
//!      [`sling_quantizers::gptq`] on the *original* source weight and stored with `Store::put`: each input's
//!      Hessian is factorized once ([`gptq::factor`]) and the weights that read it solved with that factor
//!      ([`Grid::gptq`], the column update from [`sling_kernels::gptq::update`]), the inputs and their weights in
//!      one parallel (rayon) loop, widest inputs first. Results are collected in a fixed order and each solve is independent, so the report and
//!      the store do not depend on the thread count. A routed expert with fewer than
//!      [`Settings::min_expert_tokens`] routed tokens (without `all_experts`), and a weight whose input was never
//!      observed, fall back to [`gptq::rtn`] and say why in the [`Report`];
//!    * **propagate**: with [`Settings::sequential`], layer `l` runs again with its solved weights dequantized
//!      (an overlay [`TensorSource`]: solved weights from their codes and the grid, everything else from the
//!      source) to give layer `l + 1` its inputs; without it, the observing pass's output (original weights)
//!      is layer `l + 1`'s input.
//!
//!    Layer `l`'s Hessians are dropped before layer `l + 1` starts.
//! 2. **Resume**: a weight the store already holds (an interrupted earlier run) is not solved again
//!    ([`Method::Resumed`]); its stored codes serve the sequential re-forward, so a resumed run propagates
//!    exactly what an uninterrupted one does (both dequantize the codes through the grid).
//!
//! Weights outside decoder layers (embeddings), gpt-oss's stacked routed experts, and weights a target stores in
//! another layout than any checkpoint tensor's (the MLX target's `embed_q`/`unembed_out`) are not solved here; a
//! target encodes whatever the store lacks with its plain round-to-nearest path. Their values as stored reach the
//! sequential forward only where the caller's `src` gives them so (the CLI's `solve::StoredAs`).
//!
//! # Memory
//!
//! Held at once: the batch's hidden states twice (`2 × tokens × hidden × 4 B`: the layer's input is kept for the
//! re-forward while the observing pass writes its output), the forward pass's working set of one sub-batch of
//! [`Settings::batch_tokens`] tokens (docs/calibration.md, "Memory bound"), **one layer's Hessians** (`cols² × 8 B`
//! per shared input, allocated when its first input arrives, so a routed expert no token reaches takes none), the
//! solves in flight (per worker thread: the weight in f32 and the solver's working copies of its Hessian, about
//! `2 × cols² × 8 B` in llm-compressor's algorithm) and, until the re-forward, the layer's codes (1 B per element
//! plus one [`GroupParams`] per group) of the weights the store does not read back (none once it keeps them).
//!
//! DeepSeek-V3 (hidden 7168, moe_intermediate 2048, 256 routed experts, q_lora 1536, kv_lora 512, 128 heads of
//! v_head 128): per routed expert gate/up share a 7168² f64 Hessian (411 MB) and down has a 2048² one (33.6 MB):
//! 444.6 MB per expert, **113.8 GB for the 256 experts of a layer** without `all_experts`; with `all_experts` every
//! expert's gate/up shares the layer's one FFN-input Hessian, leaving 256 down Hessians = 8.6 GB. The rest of a
//! layer: attention q_a/kv_a 7168² (411 MB), q_b 1536² (19 MB), kv_b 512² (2 MB), o_proj 16384² (2.15 GB), router
//! and shared expert gate/up 7168² (411 MB, only if one of them is quantized), shared down 2048² (34 MB): 3.0 GB.
//! With [`Settings::max_ram`] the routed experts of a layer are processed in groups whose Hessians fit in
//! `max_ram − the layer's other Hessians` (at least one expert per group), the layer's forward running once per
//! group: `max_ram` = 32 GB → 65 experts per group, 4 observing passes per MoE layer; 16 GB → 29 per group, 9
//! passes. Solving with `T` threads adds about `T × (2 × 411 MB + 59 MB)` for gate/up weights.

use std::collections::HashMap;
use std::sync::Arc;

use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sling_core::ModelConfig;
use sling_pipeline::solved::Store;
use sling_quantizers::gptq::{self, Grid, GroupParams, Options, Solution};

use crate::error::{Error, Result};
use crate::model::{Batch, Model};
use crate::observer::{LinearInput, Observer};
use crate::source::TensorSource;
use crate::spec::{Attention, ExpertLayout, Ffn, Spec};

/// How the pass runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub gptq: Options,
    /// A routed expert with fewer routed tokens than this (and not `all_experts`) falls back to RTN
    /// (default 32).
    pub min_expert_tokens: u64,
    /// Every token through every routed expert for the Hessians (llm-compressor's `calibrate_all_experts`).
    pub all_experts: bool,
    /// Propagate each layer's output with its quantized weights (default `true`, llm-compressor's sequential
    /// pipeline); `false`: with the original weights.
    pub sequential: bool,
    /// Bytes the Hessians of one layer may take; the routed experts are then processed in groups.
    pub max_ram: Option<u64>,
    /// Tokens per forward call: the sequences run through a layer in sub-batches of whole sequences of at most
    /// this many tokens (default 2048, llama-imatrix's batch), which bounds the forward pass's activations; the
    /// Hessians sum over all of them.
    pub batch_tokens: usize,
    /// Where the forward pass's large products and the Hessians' `XᵀX` run ([`crate::Model::with_backend`]);
    /// `None`: the CPU.
    pub backend: Option<std::sync::Arc<dyn sling_kernels::Backend>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            gptq: Options::default(),
            min_expert_tokens: 32,
            all_experts: false,
            sequential: true,
            max_ram: None,
            batch_tokens: 2048,
            backend: None,
        }
    }
}

/// How a weight was quantized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Method {
    Gptq,
    /// Round to nearest on the grid, and why.
    Rtn {
        why: String,
    },
    /// Already in the store (an earlier, interrupted run); not solved again.
    Resumed,
    /// AWQ ([`crate::awq`]): rounded to nearest after the scales of the mapping whose balance layer it is were
    /// folded in (`smooth`: that mapping's norm or previous linear; `None`: no mapping reads its input, e.g.
    /// `o_proj` under grouped-query attention, which llm-compressor leaves alone too).
    Awq {
        smooth: Option<String>,
        ratio: f32,
        duo: bool,
    },
}

/// One weight of the pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SolvedWeight {
    /// Hugging Face tensor name.
    pub name: String,
    pub layer: usize,
    /// Routed expert index.
    pub expert: Option<usize>,
    pub rows: usize,
    pub cols: usize,
    /// Input rows its Hessian was accumulated from (a routed expert's routed tokens, without `all_experts`).
    pub tokens: u64,
    pub method: Method,
    /// GPTQ's loss estimate (0 for RTN and resumed weights).
    pub loss: f64,
}

/// The true routing of one MoE layer over the calibration tokens: routed (token, slot) pairs per expert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRouting {
    pub layer: usize,
    pub counts: Vec<u64>,
}

/// What the pass did (serializable, for the manifest and a coverage table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub sequences: usize,
    pub tokens: u64,
    pub all_experts: bool,
    pub sequential: bool,
    pub min_expert_tokens: u64,
    /// Every weight `grids` named, in layer order (within a layer: attention, then FFN, experts by index).
    pub weights: Vec<SolvedWeight>,
    pub routing: Vec<LayerRouting>,
    /// Observing forward passes run per layer (more than one when `max_ram` splits the experts).
    pub passes: Vec<usize>,
    /// Per layer, with `sequential`: `‖y_q − y‖ / ‖y‖` of the layer's output hidden states with its solved
    /// weights (`y_q`) against its original weights (`y`), on the same inputs; `None` where nothing was
    /// quantized or without `sequential`.
    pub output_error: Vec<Option<f64>>,
}

impl Report {
    /// How many weights went `f`'s way.
    pub fn count(&self, f: impl Fn(&Method) -> bool) -> usize {
        self.weights.iter().filter(|w| f(&w.method)).count()
    }

    /// The weights that fell back to round-to-nearest: `(name, tokens, why)` (the manifest's `fallbacks`).
    pub fn fallbacks(&self) -> impl Iterator<Item = (&str, u64, &str)> {
        self.weights.iter().filter_map(|w| match &w.method {
            Method::Rtn { why } => Some((w.name.as_str(), w.tokens, why.as_str())),
            _ => None,
        })
    }

    /// Per MoE layer, `model.layers.N` → routed calibration tokens per expert (the manifest's `expert_tokens`).
    pub fn expert_tokens(&self) -> std::collections::BTreeMap<String, Vec<u64>> {
        self.routing.iter().map(|r| (format!("model.layers.{}", r.layer), r.counts.clone())).collect()
    }
}

/// Progress of [`run`], for a bar.
#[derive(Debug)]
pub enum Progress<'a> {
    /// Before the first layer: layers and weights to go.
    Start {
        layers: usize,
        weights: usize,
    },
    /// Layer `layer` starts: its weights, its observing passes, and its input hidden states (`[tokens, hidden]`
    /// per sub-batch; for diagnostics and tests).
    LayerStart {
        layer: usize,
        weights: usize,
        passes: usize,
        inputs: &'a [Array2<f32>],
    },
    /// One weight is done (solved, fallen back or resumed).
    Solved {
        weight: &'a SolvedWeight,
    },
    LayerDone {
        layer: usize,
    },
}

/// Which grid a Hugging Face weight is quantized on, `None`: left alone.
pub type Grids<'g> = dyn Fn(&str) -> Option<Arc<dyn Grid>> + Sync + 'g;

// ---- the weights of a layer -------------------------------------------------------------------------

/// An input shared by one or more weights: one Hessian.
pub(crate) struct Input {
    pub(crate) cols: usize,
    /// The routed expert whose tokens these are (`None`: every token).
    pub(crate) expert: Option<usize>,
}

pub(crate) struct Weight {
    pub(crate) name: String,
    pub(crate) expert: Option<usize>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) input: usize,
    pub(crate) grid: Arc<dyn Grid>,
    pub(crate) resumed: bool,
}

/// `(fused tensor, expert, gate 0 / up 1 / down 2)` of a transformers-5 split expert name
/// `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`.
fn fused_part(name: &str) -> Option<(String, usize, usize)> {
    let (base, rest) = name.split_once(".mlp.experts.")?;
    let (e, proj) = rest.split_once('.')?;
    let e: usize = e.parse().ok()?;
    let (stem, which) = match proj {
        "gate_proj.weight" => ("gate_up_proj", 0),
        "up_proj.weight" => ("gate_up_proj", 1),
        "down_proj.weight" => ("down_proj", 2),
        _ => return None,
    };
    Some((format!("{base}.mlp.experts.{stem}"), e, which))
}

/// The `[rows, cols]` of weight `name`, read directly or as a split of a transformers-5 fused expert tensor.
pub(crate) fn weight_shape(src: &dyn TensorSource, name: &str) -> Option<(usize, usize)> {
    if let Some(s) = src.shape(name) {
        return match s[..] {
            [r, c] => Some((r as usize, c as usize)),
            _ => None,
        };
    }
    let (fused, e, which) = fused_part(name)?;
    match src.shape(&fused)?[..] {
        [n, r, c] if (e as u64) < n => Some(((if which < 2 { r / 2 } else { r }) as usize, c as usize)),
        _ => None,
    }
}

/// The original values of weight `name` (`rows × cols`, row-major).
pub(crate) fn read_weight(src: &dyn TensorSource, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    if src.contains(name) {
        let v = src.read(name)?;
        if v.len() != rows * cols {
            return Err(Error::Read { tensor: name.into(), why: format!("{} values for {rows}×{cols}", v.len()) });
        }
        return Ok(v);
    }
    let (fused, e, which) = fused_part(name).ok_or_else(|| Error::Missing(name.into()))?;
    let v = src.read_outer(&fused, e as u64, e as u64 + 1)?;
    let (start, n) = match which {
        0 => (0, rows * cols),
        1 => (rows * cols, rows * cols),
        _ => (0, rows * cols),
    };
    v.get(start..start + n)
        .map(<[f32]>::to_vec)
        .ok_or_else(|| Error::Read { tensor: fused, why: format!("expert {e} is not {rows}×{cols}") })
}

/// The linear weights of layer `l` the target quantizes, grouped by shared input.
pub(crate) fn layer_weights(
    spec: &Spec,
    src: &dyn TensorSource,
    l: usize,
    all_experts: bool,
    grids: &Grids<'_>,
    store: &Store,
) -> Result<(Vec<Input>, Vec<Weight>)> {
    let p = format!("model.layers.{l}.");
    // (input group, expert, names); a group whose weights are all absent or unquantized gets no Input
    let mut groups: Vec<(Option<usize>, Vec<String>)> = Vec::new();
    let stems = |v: &[&str]| v.iter().map(|s| format!("{p}{s}.weight")).collect::<Vec<_>>();
    match &spec.attention {
        Attention::Gqa { .. } => {
            groups.push((None, stems(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])));
        }
        Attention::Mla { q_lora_rank, .. } => {
            let q = if q_lora_rank.is_some() { "self_attn.q_a_proj" } else { "self_attn.q_proj" };
            groups.push((None, stems(&[q, "self_attn.kv_a_proj_with_mqa"])));
            if q_lora_rank.is_some() {
                groups.push((None, stems(&["self_attn.q_b_proj"])));
            }
            groups.push((None, stems(&["self_attn.kv_b_proj"])));
        }
    }
    groups.push((None, stems(&["self_attn.o_proj"])));
    match &spec.ffn[l] {
        Ffn::Dense { .. } => {
            groups.push((None, stems(&["mlp.gate_proj", "mlp.up_proj"])));
            groups.push((None, stems(&["mlp.down_proj"])));
        }
        // gpt-oss's routed experts are one stacked tensor per projection, with no per-expert weight to key a
        // Hessian by: only its router is solved here. A target that keeps them (mlx's MXFP4 mode: the source's own
        // codes) has nothing to solve; one that quantizes them rounds them to nearest and reports it.
        Ffn::Moe(m) if m.layout == ExpertLayout::GptOss => {
            groups.push((None, stems(&[spec.router_stem])));
        }
        Ffn::Moe(m) => {
            let sh = m.shared_stem;
            let mut ffn_in = stems(&[spec.router_stem]);
            if m.shared_ff.is_some() {
                ffn_in.extend(stems(&[&format!("{sh}.gate_proj"), &format!("{sh}.up_proj")]));
                if m.shared_gate {
                    ffn_in.extend(stems(&[&format!("{sh}_gate")]));
                }
            }
            let (prefix, [g, u, d]) = spec.expert_names;
            let ex = |e: usize, w: &str| format!("{p}{prefix}.{e}.{w}.weight");
            if all_experts {
                ffn_in.extend((0..m.n_experts).flat_map(|e| [ex(e, g), ex(e, u)]));
            }
            groups.push((None, ffn_in));
            if m.shared_ff.is_some() {
                groups.push((None, stems(&[&format!("{sh}.down_proj")])));
            }
            for e in 0..m.n_experts {
                if !all_experts {
                    groups.push((Some(e), vec![ex(e, g), ex(e, u)]));
                }
                groups.push((Some(e), vec![ex(e, d)]));
            }
        }
    }
    let (mut inputs, mut weights) = (Vec::new(), Vec::new());
    for (expert, names) in groups {
        let mut cols_of_group = None;
        let mut input = None;
        for name in names {
            let Some((rows, cols)) = weight_shape(src, &name) else { continue };
            let Some(grid) = grids(&name) else { continue };
            if *cols_of_group.get_or_insert(cols) != cols {
                return Err(Error::Shape {
                    tensor: name,
                    shape: vec![rows as u64, cols as u64],
                    expected: format!(
                        "{} input columns like the weights sharing its input",
                        cols_of_group.unwrap_or(0)
                    ),
                });
            }
            let input = *input.get_or_insert_with(|| {
                inputs.push(Input { cols, expert });
                inputs.len() - 1
            });
            let resumed = store.contains(&name);
            let we = expert.or_else(|| spec_expert(&name));
            weights.push(Weight { name, expert: we, rows, cols, input, grid, resumed });
        }
    }
    Ok((inputs, weights))
}

/// The routed expert of a per-expert name (`….experts.N.…`, not a shared expert).
fn spec_expert(name: &str) -> Option<usize> {
    if name.contains("shared_expert") {
        return None;
    }
    let (_, rest) = name.split_once(".experts.")?;
    rest.split('.').next()?.parse().ok()
}

// ---- the observer -----------------------------------------------------------------------------------

pub(crate) struct Acc {
    pub(crate) sum: Array2<f64>,
    /// `Σ |x|` per channel (AWQ's activation means).
    pub(crate) abs: Vec<f64>,
    pub(crate) n: u64,
}

/// Accumulates `Σ x xᵀ` per active input; the first observation of an input in a pass counts, the same rows
/// reaching the other weights that share it are skipped.
pub(crate) struct Hessians<'a> {
    pub(crate) by_name: HashMap<&'a str, usize>,
    pub(crate) inputs: &'a [Input],
    pub(crate) active: Vec<bool>,
    pub(crate) acc: Vec<Option<Acc>>,
    /// Inputs accumulated in the current forward call (reset by `layer_done`).
    pub(crate) taken: Vec<bool>,
    /// Routed (token, slot) pairs per expert, summed over the forward calls (sub-batches).
    pub(crate) routing: Option<Vec<u64>>,
    pub(crate) bad: Option<Error>,
    /// `XᵀX` on a device (cuBLAS DGEMM) when the product is large enough.
    pub(crate) gemm: Option<&'a dyn sling_kernels::Gemm>,
}

impl<'a> Hessians<'a> {
    pub(crate) fn new(inputs: &'a [Input], weights: &'a [Weight], active: Vec<bool>) -> Self {
        let by_name = weights.iter().map(|w| (w.name.as_str(), w.input)).collect();
        Hessians {
            by_name,
            inputs,
            acc: inputs.iter().map(|_| None).collect(),
            taken: vec![false; inputs.len()],
            active,
            routing: None,
            bad: None,
            gemm: None,
        }
    }

    pub(crate) fn add(&mut self, x: &LinearInput<'_>) {
        let Some(&i) = x.hf.and_then(|h| self.by_name.get(h)) else { return };
        if !self.active[i] || self.taken[i] {
            return;
        }
        self.taken[i] = true;
        let c = self.inputs[i].cols;
        if x.n_cols != c || !x.rows.len().is_multiple_of(c.max(1)) {
            self.bad.get_or_insert(Error::Shape {
                tensor: x.hf.unwrap_or(x.tensor).to_string(),
                shape: vec![(x.rows.len() / x.n_cols.max(1)) as u64, x.n_cols as u64],
                expected: format!("[rows, {c}] inputs"),
            });
            return;
        }
        let acc = self.acc[i].get_or_insert_with(|| Acc { sum: Array2::zeros((c, c)), abs: vec![0.0; c], n: 0 });
        for row in x.rows.chunks_exact(c.max(1)) {
            acc.abs.iter_mut().zip(row).for_each(|(a, &v)| *a += f64::from(v.abs()));
        }
        let n = x.rows.len() / c;
        if let Some(g) = self.gemm.filter(|g| g.wants(n, c, c)) {
            let sum = acc.sum.as_slice_mut().expect("a standard-layout array");
            match g.gram(x.rows, n, c, sum) {
                Ok(()) => acc.n += n as u64,
                Err(e) => {
                    self.bad.get_or_insert(Error::Device(e));
                }
            }
            return;
        }
        let sum = acc.sum.as_slice_mut().expect("a standard-layout array");
        crate::math::add_gram(sum, x.rows, n, c);
        acc.n += n as u64;
    }
}

impl Observer for Hessians<'_> {
    fn linear_input(&mut self, x: &LinearInput<'_>) {
        self.add(x);
    }
    fn hf_only_input(&mut self, x: &LinearInput<'_>) {
        self.add(x);
    }
    fn routing(&mut self, _layer: usize, counts: &[u64]) {
        add_counts(&mut self.routing, counts);
    }
    fn layer_done(&mut self, _layer: usize) {
        self.taken.iter_mut().for_each(|t| *t = false);
    }
}

fn add_counts(acc: &mut Option<Vec<u64>>, counts: &[u64]) {
    match acc {
        Some(a) if a.len() == counts.len() => a.iter_mut().zip(counts).for_each(|(a, c)| *a += c),
        _ => *acc = Some(counts.to_vec()),
    }
}

/// Only records the routing (a layer with nothing to observe).
#[derive(Default)]
pub(crate) struct RoutingOnly(pub(crate) Option<Vec<u64>>);

impl Observer for RoutingOnly {
    fn linear_input(&mut self, _: &LinearInput<'_>) {}
    fn routing(&mut self, _layer: usize, counts: &[u64]) {
        add_counts(&mut self.0, counts);
    }
}

// ---- the overlay ------------------------------------------------------------------------------------

enum Codes {
    Mem {
        codes: Vec<u8>,
        params: Vec<GroupParams>,
    },
    /// Read back from the store.
    Store,
}

struct SolvedEntry {
    rows: usize,
    cols: usize,
    grid: Arc<dyn Grid>,
    codes: Codes,
}

/// The source with some weights replaced by their dequantized solutions (transformers-5 fused expert tensors
/// patched per expert).
struct Overlay<'a> {
    base: &'a dyn TensorSource,
    store: &'a Store,
    solved: HashMap<String, SolvedEntry>,
    /// Fused tensors with solved splits.
    fused: std::collections::HashSet<String>,
}

impl Overlay<'_> {
    fn dequant(&self, name: &str, e: &SolvedEntry, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let g = e.grid.group().max(1);
        let ng = e.cols.div_ceil(g);
        let deq = |codes: &[u8], params: &[GroupParams], cols: usize, ng: usize, g: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(codes.len());
            for (r, row) in codes.chunks_exact(cols.max(1)).enumerate() {
                let p = &params[r * ng..(r + 1) * ng];
                out.extend(row.iter().enumerate().map(|(c, &q)| e.grid.dequantize(q, &p[c / g])));
            }
            out
        };
        match &e.codes {
            Codes::Mem { codes, params } => {
                Ok(deq(&codes[r0 * e.cols..r1 * e.cols], &params[r0 * ng..r1 * ng], e.cols, ng, g))
            }
            Codes::Store => {
                let rows = self
                    .store
                    .rows(name, r0, r1)
                    .map_err(|err| Error::Store(err.to_string()))?
                    .ok_or_else(|| Error::Store(format!("{name} vanished from the store")))?;
                let rg = rows.group.max(1);
                if rows.cols != e.cols || rows.codes.len() != (r1 - r0) * e.cols {
                    return Err(Error::Store(format!("{name}: stored rows do not match {}×{}", e.rows, e.cols)));
                }
                Ok(deq(&rows.codes, &rows.params, e.cols, e.cols.div_ceil(rg), rg))
            }
        }
    }
}

impl TensorSource for Overlay<'_> {
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
        if let Some(e) = self.solved.get(name) {
            if i0 > i1 || i1 as usize > e.rows {
                return Err(Error::Read { tensor: name.into(), why: format!("rows {i0}..{i1} of {}", e.rows) });
            }
            return self.dequant(name, e, i0 as usize, i1 as usize);
        }
        let mut v = self.base.read_outer(name, i0, i1)?;
        if self.fused.contains(name) {
            let base =
                name.strip_suffix(".mlp.experts.gate_up_proj").or_else(|| name.strip_suffix(".mlp.experts.down_proj"));
            let Some(base) = base else { return Ok(v) };
            let per = v.len() / (i1 - i0).max(1) as usize;
            let parts: &[&str] =
                if name.ends_with("gate_up_proj") { &["gate_proj", "up_proj"] } else { &["down_proj"] };
            for ex in i0..i1 {
                let mut off = (ex - i0) as usize * per;
                for part in parts {
                    let split = format!("{base}.mlp.experts.{ex}.{part}.weight");
                    let Some((rows, cols)) = weight_shape(self.base, &split) else { continue };
                    if let Some(e) = self.solved.get(&split) {
                        let d = self.dequant(&split, e, 0, e.rows)?;
                        v[off..off + rows * cols].copy_from_slice(&d);
                    }
                    off += rows * cols;
                }
            }
        }
        Ok(v)
    }
}

/// The source with the token embeddings as the target stores them (rounded to nearest on their grid), for a
/// target that quantizes them (mlx-lm does): the layers are calibrated on the inputs the quantized model gives them,
/// in the sequential pipeline's spirit. The embeddings themselves cannot be calibrated (a lookup has no Hessian).
pub(crate) struct RoundedEmbeddings<'a> {
    pub(crate) base: &'a dyn TensorSource,
    pub(crate) grid: Arc<dyn Grid>,
}

pub(crate) const EMBEDDINGS: &str = "model.embed_tokens.weight";

impl TensorSource for RoundedEmbeddings<'_> {
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
        let v = self.base.read_outer(name, i0, i1)?;
        if name != EMBEDDINGS || i1 <= i0 {
            return Ok(v);
        }
        let rows = (i1 - i0) as usize;
        let cols = v.len() / rows;
        let sol = gptq::rtn(&v, rows, cols, &*self.grid)
            .map_err(|e| Error::Solve { tensor: name.into(), why: e.to_string() })?;
        Ok(sol.dequant)
    }
}

// ---- the pass ---------------------------------------------------------------------------------------

/// Groups of routed experts (indices) whose Hessians fit in the budget; one group with every expert without
/// `max_ram`. Non-expert inputs go with the first group.
pub(crate) fn expert_groups(inputs: &[Input], active: &[bool], max_ram: Option<u64>) -> Vec<Vec<usize>> {
    let bytes = |i: &Input| (i.cols * i.cols * 8) as u64;
    let mut per_expert: std::collections::BTreeMap<usize, u64> = Default::default();
    let mut dense = 0u64;
    for (k, i) in inputs.iter().enumerate() {
        if !active[k] {
            continue;
        }
        match i.expert {
            Some(e) => *per_expert.entry(e).or_default() += bytes(i),
            None => dense += bytes(i),
        }
    }
    let Some(max) = max_ram else { return vec![per_expert.keys().copied().collect()] };
    let budget = max.saturating_sub(dense);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0u64;
    for (&e, &b) in &per_expert {
        let last = groups.last_mut().expect("one group");
        if !last.is_empty() && used + b > budget {
            groups.push(vec![e]);
            used = b;
        } else {
            last.push(e);
            used += b;
        }
    }
    groups
}

/// Sequences in sub-batches of whole sequences of at most `max_tokens` tokens (a longer sequence alone).
pub(crate) fn sub_batches(seqs: &[Vec<u32>], max_tokens: usize) -> Vec<&[Vec<u32>]> {
    let mut out = Vec::new();
    let (mut start, mut n) = (0, 0);
    for (i, sq) in seqs.iter().enumerate() {
        if i > start && n + sq.len() > max_tokens {
            out.push(&seqs[start..i]);
            (start, n) = (i, 0);
        }
        n += sq.len();
    }
    if start < seqs.len() {
        out.push(&seqs[start..]);
    }
    out
}

/// Gives layer `l + 1` its inputs: layer `l` run again over `quantized` (its weights as the artifact will hold them;
/// the sequential pipeline), with `‖y_q − y‖ / ‖y‖` against the observing pass's output `observed`; without
/// `quantized`, the observing pass's output itself (or, when there was none, a run of the original layer).
#[allow(clippy::too_many_arguments)]
pub(crate) fn propagate(
    model: &Model<'_>,
    quantized: Option<&dyn TensorSource>,
    cfg: &ModelConfig,
    s: &Settings,
    l: usize,
    hs: &mut Vec<Array2<f32>>,
    batches: &[Batch],
    observed: Option<Vec<Array2<f32>>>,
) -> Result<Option<f64>> {
    let Some(q) = quantized else {
        match observed {
            Some(out) => *hs = out,
            None => forward(model, l, hs, batches, None)?,
        }
        return Ok(None);
    };
    forward(&Model::new(q, cfg)?.with_backend(s.backend.clone()), l, hs, batches, None)?;
    Ok(observed.map(|ys| {
        let (mut d, mut n) = (0f64, 0f64);
        for (a, b) in hs.iter().flatten().zip(ys.iter().flatten()) {
            d += (f64::from(*a) - f64::from(*b)).powi(2);
            n += f64::from(*b).powi(2);
        }
        if n > 0.0 {
            (d / n).sqrt()
        } else {
            d.sqrt()
        }
    }))
}

/// Runs layer `l` over every sub-batch, in place.
pub(crate) fn forward(
    model: &Model<'_>,
    l: usize,
    hs: &mut [Array2<f32>],
    batches: &[Batch],
    mut obs: Option<&mut dyn Observer>,
) -> Result<()> {
    for (h, b) in hs.iter_mut().zip(batches) {
        let o: Option<&mut dyn Observer> = match &mut obs {
            Some(o) => Some(&mut **o),
            None => None,
        };
        model.run_layer(l, h, b, o)?;
    }
    Ok(())
}

/// Runs the pass: solves every linear weight of every decoder layer that `grids` names, stores the solutions
/// in `store` and reports what it did. `seqs` are the calibration sequences (token ids); they run through each
/// layer in sub-batches of whole sequences of at most [`Settings::batch_tokens`] tokens, the Hessians summing
/// over all of them. Errors: an empty batch or sequence, a token out of range, a missing or misshapen
/// tensor, a solver or store failure.
pub fn run(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    seqs: &[Vec<u32>],
    grids: &Grids<'_>,
    store: &Store,
    s: &Settings,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Report> {
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
    let (mut hs, batches): (Vec<Array2<f32>>, Vec<Batch>) = sub_batches(seqs, s.batch_tokens.max(1))
        .into_iter()
        .map(|b| model.embed_batch(b))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let layers: Vec<(Vec<Input>, Vec<Weight>)> =
        (0..spec.n_layers).map(|l| layer_weights(spec, src, l, s.all_experts, grids, store)).collect::<Result<_>>()?;
    progress(Progress::Start { layers: spec.n_layers, weights: layers.iter().map(|(_, w)| w.len()).sum() });
    let mut report = Report {
        sequences: seqs.len(),
        tokens: hs.iter().map(|h| h.nrows() as u64).sum(),
        all_experts: s.all_experts,
        sequential: s.sequential,
        min_expert_tokens: s.min_expert_tokens,
        weights: Vec::new(),
        routing: Vec::new(),
        passes: Vec::new(),
        output_error: Vec::new(),
    };
    let moe = |l: usize| matches!(spec.ffn[l], Ffn::Moe(_));
    for (l, (inputs, weights)) in layers.into_iter().enumerate() {
        // inputs with something to solve
        let mut todo = vec![false; inputs.len()];
        for w in weights.iter().filter(|w| !w.resumed) {
            todo[w.input] = true;
        }
        let groups = if todo.iter().any(|&t| t) { expert_groups(&inputs, &todo, s.max_ram) } else { vec![] };
        progress(Progress::LayerStart { layer: l, weights: weights.len(), passes: groups.len(), inputs: &hs });
        let mut overlay = Overlay { base: src, store, solved: HashMap::new(), fused: Default::default() };
        let mut routing: Option<Vec<u64>> = None;
        let mut observed_out: Option<Vec<Array2<f32>>> = None;
        let mut solved: Vec<Option<SolvedWeight>> = weights.iter().map(|_| None).collect();
        for (gi, group) in groups.iter().enumerate() {
            let active: Vec<bool> = inputs
                .iter()
                .enumerate()
                .map(|(k, i)| todo[k] && i.expert.map_or(gi == 0, |e| group.contains(&e)))
                .collect();
            let mut obs = Hessians::new(&inputs, &weights, active.clone());
            obs.gemm = s.backend.as_deref().and_then(|b| b.gemm().ok().flatten());
            let mut hx = hs.clone();
            forward(&model, l, &mut hx, &batches, Some(&mut obs))?;
            if let Some(e) = obs.bad.take() {
                return Err(e);
            }
            if routing.is_none() {
                routing = obs.routing.clone();
            }
            observed_out = Some(hx);
            let mut accs = std::mem::take(&mut obs.acc);
            drop(obs);
            // H = 2/n Σ x xᵀ, in place
            for a in accs.iter_mut().flatten() {
                let f = 2.0 / a.n.max(1) as f64;
                a.sum.mapv_inplace(|v| v * f);
            }
            let hess: Vec<Option<(&[f64], u64)>> = accs
                .iter()
                .map(|a| a.as_ref().filter(|a| a.n > 0).and_then(|a| Some((a.sum.as_slice()?, a.n))))
                .collect();
            let chosen: Vec<usize> = (0..weights.len()).filter(|&i| active[weights[i].input]).collect();
            // Why a weight is rounded to nearest instead (per input: a routed expert's token count, no input seen).
            let why_of = |k: usize| -> (u64, Option<String>) {
                let input = &inputs[k];
                let h = hess[k];
                // a routed expert's own tokens (not with all_experts: its inputs are every token)
                let routed = input.expert.filter(|_| !s.all_experts);
                let routed_tokens = routed.and_then(|e| routing.as_ref().and_then(|r| r.get(e).copied()));
                let tokens = h.map(|h| h.1).or(routed_tokens).unwrap_or(0);
                let why = if routed.is_some() && tokens < s.min_expert_tokens {
                    Some(format!("{tokens} routed tokens, fewer than the minimum {}", s.min_expert_tokens))
                } else if h.is_none() {
                    Some("no input observed for this weight".to_string())
                } else {
                    None
                };
                (tokens, why)
            };
            // One factorization per input, shared by the weights that read it (q/k/v, gate/up), and then those
            // weights, all in one parallel loop over the inputs (widest first, so that the longest factorizations
            // start first and the solves of the others fill the threads around them). Every solve is independent
            // of the others and of the thread count; errors are reported in input order, then weight order.
            let mut by_input: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
            for &i in &chosen {
                by_input.entry(weights[i].input).or_default().push(i);
            }
            let mut by_input: Vec<(usize, Vec<usize>)> = by_input.into_iter().collect();
            by_input.sort_by_key(|&(k, _)| (std::cmp::Reverse(inputs[k].cols), k));
            type Solved = Result<(SolvedWeight, SolvedEntry)>;
            /// An input, whether its factorization succeeded, and its weights' results.
            type Group = (usize, Result<()>, Vec<(usize, Solved)>);
            let groups: Vec<Group> = by_input
                .par_iter()
                .map(|(k, ws)| {
                    let (tokens, why) = why_of(*k);
                    let f = match why {
                        Some(_) => None,
                        None => match gptq::factor(hess[*k].map_or(&[][..], |h| h.0), inputs[*k].cols, &s.gptq) {
                            Ok(f) => Some(f),
                            Err(e) => {
                                let e = Error::Solve { tensor: format!("input {k} of layer {l}"), why: e.to_string() };
                                return (*k, Err(e), Vec::new());
                            }
                        },
                    };
                    let solved = ws
                        .par_iter()
                        .map(|&i| (i, solve_one(src, store, &weights[i], l, tokens, f.as_ref(), why.clone(), s)))
                        .collect();
                    (*k, Ok(()), solved)
                })
                .collect();
            drop(hess);
            drop(accs);
            let mut groups = groups;
            groups.sort_by_key(|g| g.0);
            let mut results: Vec<(usize, Solved)> = Vec::with_capacity(chosen.len());
            for (_, factored, solved) in groups {
                factored?;
                results.extend(solved);
            }
            // `chosen` is ascending: sorted by weight, the results are in its order
            results.sort_by_key(|r| r.0);
            for (i, r) in results {
                let (sw, entry) = r?;
                progress(Progress::Solved { weight: &sw });
                insert(&mut overlay, &weights[i].name, entry);
                solved[i] = Some(sw);
            }
        }
        if moe(l) && routing.is_none() {
            // nothing observed (every weight resumed or left alone): the routing of the original layer, as an
            // uninterrupted run reports it
            let mut ro = RoutingOnly::default();
            let mut hx = hs.clone();
            forward(&model, l, &mut hx, &batches, Some(&mut ro))?;
            routing = ro.0;
            observed_out = Some(hx);
        }
        // resumed weights: no solve, their stored codes for the re-forward
        for (i, w) in weights.iter().enumerate().filter(|(_, w)| w.resumed) {
            let routed = inputs[w.input].expert.filter(|_| !s.all_experts);
            let tokens = match routed {
                Some(e) => routing.as_ref().and_then(|r| r.get(e).copied()).unwrap_or(0),
                None => report.tokens,
            };
            let sw = SolvedWeight {
                name: w.name.clone(),
                layer: l,
                expert: w.expert,
                rows: w.rows,
                cols: w.cols,
                tokens,
                method: Method::Resumed,
                loss: 0.0,
            };
            progress(Progress::Solved { weight: &sw });
            let e = SolvedEntry { rows: w.rows, cols: w.cols, grid: w.grid.clone(), codes: Codes::Store };
            insert(&mut overlay, &w.name, e);
            solved[i] = Some(sw);
        }
        report.weights.extend(solved.into_iter().flatten());
        let quantized: Option<&dyn TensorSource> = (s.sequential && !overlay.solved.is_empty()).then_some(&overlay);
        let err = propagate(&model, quantized, cfg, s, l, &mut hs, &batches, observed_out)?;
        if let (true, Some(counts)) = (moe(l), routing) {
            report.routing.push(LayerRouting { layer: l, counts });
        }
        report.passes.push(groups.len());
        report.output_error.push(err);
        progress(Progress::LayerDone { layer: l });
    }
    // The output head, when the target quantizes it (mlx-lm quantizes `lm_head`; llm-compressor's recipes leave it
    // out, which vLLM targets do too): its input is the final-normed hidden states of the (quantized) model.
    let head = if spec.tied && !src.contains("lm_head.weight") { None } else { Some("lm_head.weight") };
    if let Some(grid) = head.and_then(|n| grids(n)) {
        let name = "lm_head.weight";
        if let Some((rows, cols)) = weight_shape(src, name) {
            let w =
                Weight { name: name.into(), expert: None, rows, cols, input: 0, grid, resumed: store.contains(name) };
            let tokens = report.tokens;
            let sw = if w.resumed {
                SolvedWeight {
                    name: w.name.clone(),
                    layer: spec.n_layers,
                    expert: None,
                    rows,
                    cols,
                    tokens,
                    method: Method::Resumed,
                    loss: 0.0,
                }
            } else {
                let mut h = vec![0f64; cols * cols];
                for hid in &hs {
                    let normed = model.final_norm(hid)?;
                    let x = normed.as_standard_layout();
                    let xs = x.as_slice().ok_or_else(|| Error::Solve { tensor: name.into(), why: "layout".into() })?;
                    crate::math::add_gram(&mut h, xs, x.nrows(), cols);
                }
                let f = 2.0 / tokens.max(1) as f64;
                h.iter_mut().for_each(|v| *v *= f);
                let h = &h[..];
                let f = gptq::factor(h, cols, &s.gptq)
                    .map_err(|e| Error::Solve { tensor: name.into(), why: e.to_string() })?;
                solve_one(src, store, &w, spec.n_layers, tokens, Some(&f), None, s)?.0
            };
            progress(Progress::Solved { weight: &sw });
            report.weights.push(sw);
        }
    }
    Ok(report)
}

fn insert(o: &mut Overlay<'_>, name: &str, e: SolvedEntry) {
    if !o.base.contains(name) {
        if let Some((fused, _, _)) = fused_part(name) {
            o.fused.insert(fused);
        }
    }
    o.solved.insert(name.to_string(), e);
}

#[allow(clippy::too_many_arguments)]
fn solve_one(
    src: &dyn TensorSource,
    store: &Store,
    w: &Weight,
    layer: usize,
    tokens: u64,
    f: Option<&gptq::Factor>,
    rtn_why: Option<String>,
    s: &Settings,
) -> Result<(SolvedWeight, SolvedEntry)> {
    let data = read_weight(src, &w.name, w.rows, w.cols)?;
    let err = |e: gptq::GptqError| Error::Solve { tensor: w.name.clone(), why: e.to_string() };
    let (sol, method) = match (f, rtn_why) {
        (Some(f), None) => {
            let sol = w.grid.gptq(&data, w.rows, w.cols, f, &s.gptq, sling_kernels::gptq::update()).map_err(err)?;
            let m = match sol.fallback {
                Some(f) => Method::Rtn { why: format!("GPTQ fell back to RTN: {f:?}") },
                None => Method::Gptq,
            };
            (sol, m)
        }
        (_, why) => (
            gptq::rtn(&data, w.rows, w.cols, &*w.grid).map_err(err)?,
            Method::Rtn { why: why.unwrap_or_else(|| "no input observed for this weight".into()) },
        ),
    };
    drop(data);
    store.put(&w.name, w.grid.group(), &sol).map_err(|e| Error::Store(e.to_string()))?;
    let sw = SolvedWeight {
        name: w.name.clone(),
        layer,
        expert: w.expert,
        rows: w.rows,
        cols: w.cols,
        tokens,
        method,
        loss: sol.loss,
    };
    let codes = if store.contains(&w.name) {
        Codes::Store
    } else {
        let Solution { codes, params, .. } = sol;
        Codes::Mem { codes, params }
    };
    Ok((sw, SolvedEntry { rows: w.rows, cols: w.cols, grid: w.grid.clone(), codes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hessians_sum_once_per_shared_input() {
        let inputs = [Input { cols: 3, expert: None }, Input { cols: 2, expert: Some(1) }];
        let w = |name: &str, input: usize| Weight {
            name: name.into(),
            expert: None,
            rows: 1,
            cols: inputs[input].cols,
            input,
            grid: Arc::new(NoGrid),
            resumed: false,
        };
        let weights = [w("q", 0), w("k", 0), w("e1", 1)];
        let mut h = Hessians::new(&inputs, &weights, vec![true, true]);
        let x: Vec<f32> = (0..3 * 1100).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        h.routing(0, &[0, 5]);
        h.linear_input(&lin("q", &x, 3));
        h.linear_input(&lin("k", &x, 3)); // the same rows: not counted twice
        h.linear_input(&lin("unknown", &x, 3));
        h.linear_input(&lin("e1", &[1.0, 2.0, 3.0, 4.0], 2));
        let a = h.acc[0].as_ref().unwrap();
        assert_eq!(a.n, 1100);
        for i in 0..3 {
            for j in 0..3 {
                let want: f64 = x.chunks(3).map(|r| r[i] as f64 * r[j] as f64).sum();
                assert_eq!(a.sum[[i, j]], want);
            }
        }
        let e = h.acc[1].as_ref().unwrap();
        assert_eq!((e.n, e.sum.as_slice().unwrap()), (2, &[10.0, 14.0, 14.0, 20.0][..]));
        // a wrong width is an error, not a panic
        let mut h = Hessians::new(&inputs, &weights, vec![true, true]);
        h.linear_input(&lin("q", &[1.0, 2.0], 2));
        assert!(matches!(h.bad, Some(Error::Shape { .. })));
    }

    fn lin<'a>(name: &'a str, rows: &'a [f32], n_cols: usize) -> LinearInput<'a> {
        LinearInput { tensor: "", hf: Some(name), expert: None, rows, n_cols, tokens: None }
    }

    struct NoGrid;
    impl Grid for NoGrid {
        fn group(&self) -> usize {
            1
        }
        fn row_params(&self, row: &[f32]) -> Vec<GroupParams> {
            vec![GroupParams { scale: 1.0, zero: 0.0, q_scale: 1.0, q_zero: 0.0 }; row.len()]
        }
        fn quantize(&self, x: f32, _: &GroupParams) -> (u8, f32) {
            (0, x)
        }
        fn dequantize(&self, _: u8, _: &GroupParams) -> f32 {
            0.0
        }
    }

    #[test]
    fn fused_names() {
        assert_eq!(
            fused_part("model.layers.3.mlp.experts.5.up_proj.weight"),
            Some(("model.layers.3.mlp.experts.gate_up_proj".into(), 5, 1))
        );
        assert_eq!(fused_part("model.layers.3.mlp.experts.5.down_proj.weight").map(|f| f.2), Some(2));
        assert_eq!(fused_part("model.layers.3.block_sparse_moe.experts.5.w1.weight"), None);
        assert_eq!(fused_part("model.layers.3.mlp.shared_experts.up_proj.weight"), None);
    }
}
