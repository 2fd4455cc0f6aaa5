//! The layer-by-layer forward pass.
//!
//! All sequences of a batch advance together, one decoder layer at a time: a layer's attention and
//! dense weights are read (decoded to f32) when the layer starts and dropped when it ends; routed
//! experts are read one at a time, only if some token is routed to them (every expert with
//! [`Model::all_experts`] and an observer), and dropped after use. So the resident weights are one
//! layer's attention + router + shared expert, plus one routed expert per worker thread — never the
//! model. The hidden states of the batch (`tokens × hidden` f32) stay in memory; `lm_head` is
//! applied in row chunks.

use std::sync::Arc;

use ndarray::{s, Array2, ArrayView2, Axis};
use rayon::prelude::*;
use sling_core::{ModelConfig, VecDot};
use sling_kernels::{Backend, Gemm};

use crate::error::{Error, Result};
use crate::math::{attention, linear, rms_norm_rows, rms_norm_view, sigmoid, silu, softmax, top_k, AttnShape, Squares};
use crate::observer::{LinearInput, Observer};
use crate::source::TensorSource;
use crate::spec::{Act, Attention, ExpertLayout, Ffn, Moe, QkNorm, Router, Spec};

type Obs<'o, 'a> = &'o mut Option<&'a mut dyn Observer>;

/// Token layout of a batch: sequences one after the other (opaque; from [`Model::embed_batch`]).
pub struct Batch {
    pub(crate) seqs: Vec<(usize, usize)>,
    /// Position of every token within its sequence.
    pos: Vec<usize>,
    /// cos/sin tables by position.
    cos: Vec<Vec<f32>>,
    sin: Vec<Vec<f32>>,
}

/// A model ready to run: its [`Spec`] and where its weights come from.
pub struct Model<'s> {
    src: &'s dyn TensorSource,
    spec: Spec,
    /// With an observer installed: run every routed expert on every token for the statistics
    /// ([`Model::all_experts`]).
    all_experts: bool,
    /// Where the large products run ([`Model::with_backend`]); the CPU GEMM when `None`.
    backend: Option<Arc<dyn Backend>>,
    /// Round every product's activations as llama.cpp's CPU backend does ([`Model::llama_cpp_cpu`]).
    llama_cpp_cpu: bool,
}

/// Hands `x` to the observer, if any; the name is only built when one is installed.
fn observe(
    obs: Obs,
    tensor: impl FnOnce() -> String,
    hf: impl FnOnce() -> Option<String>,
    expert: Option<usize>,
    x: &Array2<f32>,
    tokens: Option<&[usize]>,
) {
    if let Some(o) = obs.as_deref_mut() {
        let c = x.as_standard_layout();
        if let Some(rows) = c.as_slice() {
            let hf = hf();
            o.linear_input(&LinearInput {
                tensor: &tensor(),
                hf: hf.as_deref(),
                expert,
                rows,
                n_cols: x.ncols(),
                tokens,
            });
        }
    }
}

/// `model.layers.{l}.{stem}.weight`, for [`observe`].
fn hf_name(l: usize, stem: &str) -> Option<String> {
    Some(format!("model.layers.{l}.{stem}.weight"))
}

/// One routed expert's weights in `nn.Linear` layout.
struct Expert {
    gate: Array2<f32>,
    up: Array2<f32>,
    down: Array2<f32>,
    gate_b: Option<Vec<f32>>,
    up_b: Option<Vec<f32>>,
    down_b: Option<Vec<f32>>,
    /// The activation rounding of the gate, up and down products ([`Model::act`]).
    acts: [Option<VecDot>; 3],
}

impl<'s> Model<'s> {
    pub fn new(src: &'s dyn TensorSource, cfg: &ModelConfig) -> Result<Model<'s>> {
        Ok(Model { src, spec: Spec::from_config(cfg)?, all_experts: false, backend: None, llama_cpp_cpu: false })
    }

    /// With `on` and an observer installed, every token is also sent through every routed expert for
    /// the observer: each expert's gate/up projections see the layer's normed hidden states of all
    /// tokens and its down projection sees `act(gate(x)) * up(x)` of all tokens, so no expert is left
    /// unobserved. The forward pass keeps the true routing: outputs (logits, hidden states) are those
    /// of the model, and [`Observer::routing`] still reports the true routing. Costs about
    /// `n_experts / top_k` times the routed experts' gate/up work. Without an observer it changes nothing.
    pub fn all_experts(mut self, on: bool) -> Self {
        self.all_experts = on;
        self
    }

    /// Runs the products large enough to gain ([`Gemm::wants`]) on `backend`'s device (cuBLAS on a GPU); the
    /// rest, and everything on a CPU backend, on the CPU. Results agree with the CPU's within float tolerance
    /// (summation order), not bit for bit; call [`Backend::gemm`] first to report a device that cannot.
    pub fn with_backend(mut self, backend: Option<Arc<dyn Backend>>) -> Self {
        self.backend = backend;
        self
    }

    /// With `on`, every matrix product with a weight first rounds its activations to what llama.cpp's CPU backend
    /// multiplies that weight with ([`TensorSource::cpu_vec_dot`], `sling_quantizers::activation`): 8-bit blocks
    /// against quantized weights, bf16/f16 against bf16/f16 ones. The logits are then those llama.cpp computes on
    /// a CPU (with an f32 KV cache), up to f32 summation order, instead of those of the weights alone. DeepSeek's
    /// MLA then runs absorbed through `attn_k_b`/`attn_v_b` where the GGUF has them, as llama.cpp runs it
    /// (`Model::mla_absorbed`; not while an observer is installed, which sees the expanded form), and RMSNorm
    /// sums its squares as ggml's does ([`Squares::F32`]). On a source without ggml types (the reference
    /// checkpoint) only the latter applies: the arithmetic of llama.cpp running an F32 file.
    pub fn llama_cpp_cpu(mut self, on: bool) -> Self {
        self.llama_cpp_cpu = on;
        self
    }

    /// The activation rounding of a product with weight `name` ([`Model::llama_cpp_cpu`]).
    fn act(&self, name: &str) -> Option<VecDot> {
        if self.llama_cpp_cpu {
            self.src.cpu_vec_dot(name).filter(|&v| v != VecDot::F32)
        } else {
            None
        }
    }

    /// How RMSNorm sums its squares: as ggml does under [`Model::llama_cpp_cpu`].
    fn squares(&self) -> Squares {
        if self.llama_cpp_cpu {
            Squares::F32
        } else {
            Squares::F64
        }
    }

    /// RMSNorm over the rows of `x` ([`Model::squares`]).
    fn rms(&self, x: &Array2<f32>, w: &[f32], eps: f32) -> Array2<f32> {
        rms_norm_rows(x, w, eps, self.squares())
    }

    /// The device's products, if this model runs on one.
    fn gemm(&self) -> Option<&dyn Gemm> {
        self.backend.as_deref().and_then(|b| b.gemm().ok().flatten())
    }

    /// `y = round(x) · wᵀ (+ b)` ([`linear`]), on the device when there is one and the product is large enough;
    /// `round` is `act`'s activation rounding ([`Model::act`]), none for `None`.
    fn mm(
        &self,
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
        b: Option<&[f32]>,
        act: Option<VecDot>,
    ) -> Result<Array2<f32>> {
        let rounded = match act {
            None => None,
            Some(v) => {
                let mut r = x.as_standard_layout().into_owned();
                let k = x.ncols();
                // Rows are rounded independently: in parallel, the same bits for any thread count.
                let ok = match r.as_slice_mut() {
                    Some(all) if k > 0 => all
                        .par_chunks_mut(k)
                        .map(|row| sling_quantizers::activation::round_like_ggml_cpu(row, v))
                        .reduce(|| true, |a, b| a && b),
                    Some(_) => true,
                    None => false,
                };
                if !ok {
                    return Err(Error::Unsupported(format!(
                        "activation rows of {k} are not whole {v:?} blocks (the weight's ggml type needs them)"
                    )));
                }
                Some(r)
            }
        };
        let x = match &rounded {
            Some(r) => r.view(),
            None => x.view(),
        };
        let (t, k, n) = (x.nrows(), x.ncols(), w.nrows());
        let Some(g) = self.gemm().filter(|g| g.wants(t, k, n) && w.ncols() == k) else {
            return Ok(linear(x, w, b));
        };
        let (xs, ws) = (x.as_standard_layout(), w.as_standard_layout());
        let mut y = Array2::<f32>::zeros((t, n));
        let (Some(xs), Some(ws), Some(ys)) = (xs.as_slice(), ws.as_slice(), y.as_slice_mut()) else {
            return Ok(linear(x, w, b));
        };
        g.linear(xs, ws, t, k, n, ys).map_err(Error::Device)?;
        if let Some(b) = b {
            for mut row in y.rows_mut() {
                row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
            }
        }
        Ok(y)
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    // ---- weights -------------------------------------------------------------------------------

    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let shape = self.src.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        if shape != [rows as u64, cols as u64] {
            return Err(Error::Shape { tensor: name.into(), shape, expected: format!("[{rows}, {cols}]") });
        }
        let v = self.src.read(name)?;
        Array2::from_shape_vec((rows, cols), v).map_err(|e| Error::Read { tensor: name.into(), why: e.to_string() })
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        self.opt_vector(name, n)?.ok_or_else(|| Error::Missing(name.to_string()))
    }

    fn opt_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        let Some(shape) = self.src.shape(name) else { return Ok(None) };
        if shape.iter().product::<u64>() != n as u64 || shape.len() > 2 {
            return Err(Error::Shape { tensor: name.into(), shape, expected: format!("[{n}]") });
        }
        Ok(Some(self.src.read(name)?))
    }

    /// `stem.weight` `[out, in]` and optional `stem.bias` `[out]`.
    fn lin(&self, stem: &str, out: usize, inp: usize) -> Result<(Array2<f32>, Option<Vec<f32>>)> {
        Ok((self.mat(&format!("{stem}.weight"), out, inp)?, self.opt_vector(&format!("{stem}.bias"), out)?))
    }

    /// Outer slice `e` of a stacked tensor as a `[r, c]` matrix.
    fn slice3(&self, name: &str, e: usize, r: usize, c: usize) -> Result<Array2<f32>> {
        let v = self.src.read_outer(name, e as u64, e as u64 + 1)?;
        Array2::from_shape_vec((r, c), v).map_err(|err| Error::Read { tensor: name.into(), why: err.to_string() })
    }

    fn check3(&self, name: &str, want: [usize; 3]) -> Result<()> {
        let shape = self.src.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        if shape != want.map(|d| d as u64) {
            return Err(Error::Shape { tensor: name.into(), shape, expected: format!("{want:?}") });
        }
        Ok(())
    }

    fn expert(&self, l: usize, m: &Moe, e: usize) -> Result<Expert> {
        let (h, ff) = (self.spec.hidden, m.ff);
        let p = format!("model.layers.{l}.");
        match m.layout {
            ExpertLayout::PerExpert => {
                let (prefix, [g, u, d]) = self.spec.expert_names;
                let stem = |w: &str| format!("{p}{prefix}.{e}.{w}");
                if self.src.contains(&format!("{}.weight", stem(g))) {
                    let (gate, gate_b) = self.lin(&stem(g), ff, h)?;
                    let (up, up_b) = self.lin(&stem(u), ff, h)?;
                    let (down, down_b) = self.lin(&stem(d), h, ff)?;
                    let acts = [g, u, d].map(|w| self.act(&format!("{}.weight", stem(w))));
                    return Ok(Expert { gate, up, down, gate_b, up_b, down_b, acts });
                }
                // transformers-5 fused layout: gate_up_proj [E, 2ff, h] (gate rows first), down_proj [E, h, ff]
                let (gu, dn) = (format!("{p}mlp.experts.gate_up_proj"), format!("{p}mlp.experts.down_proj"));
                if !self.src.contains(&gu) {
                    return Err(Error::Missing(format!("{}.weight", stem(g))));
                }
                self.check3(&gu, [m.n_experts, 2 * ff, h])?;
                self.check3(&dn, [m.n_experts, h, ff])?;
                let w = self.slice3(&gu, e, 2 * ff, h)?;
                Ok(Expert {
                    gate: w.slice(s![..ff, ..]).to_owned(),
                    up: w.slice(s![ff.., ..]).to_owned(),
                    down: self.slice3(&dn, e, h, ff)?,
                    gate_b: None,
                    up_b: None,
                    down_b: None,
                    acts: [self.act(&gu), self.act(&gu), self.act(&dn)],
                })
            }
            ExpertLayout::GptOss => {
                let gu = format!("{p}mlp.experts.gate_up_proj");
                let dn = format!("{p}mlp.experts.down_proj");
                let n = m.n_experts;
                // [2ff, h] with gate on even rows, up on odd rows
                let w = if self.src.is_mxfp4(&gu) {
                    self.check3(&gu, [n, 2 * ff, h])?;
                    self.slice3(&gu, e, 2 * ff, h)?
                } else {
                    self.check3(&gu, [n, h, 2 * ff])?;
                    self.slice3(&gu, e, h, 2 * ff)?.t().as_standard_layout().into_owned()
                };
                let down = if self.src.is_mxfp4(&dn) {
                    self.check3(&dn, [n, h, ff])?;
                    self.slice3(&dn, e, h, ff)?
                } else {
                    self.check3(&dn, [n, ff, h])?;
                    self.slice3(&dn, e, ff, h)?.t().as_standard_layout().into_owned()
                };
                let bias = |name: String, width: usize| -> Result<Vec<f32>> {
                    self.check_shape(&name, &[n as u64, width as u64])?;
                    self.src.read_outer(&name, e as u64, e as u64 + 1)
                };
                let gub = bias(format!("{gu}_bias"), 2 * ff)?;
                Ok(Expert {
                    gate: w.slice(s![0..;2, ..]).to_owned(),
                    up: w.slice(s![1..;2, ..]).to_owned(),
                    down,
                    gate_b: Some(gub.iter().step_by(2).copied().collect()),
                    up_b: Some(gub.iter().skip(1).step_by(2).copied().collect()),
                    down_b: Some(bias(format!("{dn}_bias"), h)?),
                    acts: [self.act(&gu), self.act(&gu), self.act(&dn)],
                })
            }
        }
    }

    fn check_shape(&self, name: &str, want: &[u64]) -> Result<()> {
        let shape = self.src.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        if shape != want {
            return Err(Error::Shape { tensor: name.into(), shape, expected: format!("{want:?}") });
        }
        Ok(())
    }

    // ---- forward -------------------------------------------------------------------------------

    /// Logits (`[len, vocab]` per sequence) of a batch of token sequences.
    pub fn logits(&self, seqs: &[Vec<u32>], mut observer: Option<&mut dyn Observer>) -> Result<Vec<Array2<f32>>> {
        let (h, b) = self.final_hidden(seqs, &mut observer)?;
        let all = self.lm_head(&h, &mut observer)?;
        Ok(b.seqs.iter().map(|&(st, len)| all.slice(s![st..st + len, ..]).to_owned()).collect())
    }

    /// Final-normed hidden states of a batch (`[tokens, hidden]`, sequences one after the other).
    pub fn hidden_states(&self, seqs: &[Vec<u32>], mut observer: Option<&mut dyn Observer>) -> Result<Array2<f32>> {
        Ok(self.final_hidden(seqs, &mut observer)?.0)
    }

    /// Layer by layer, for callers that act between layers (the GPTQ pass): the embedded hidden states
    /// (`[tokens, hidden]`, sequences one after the other) and the batch layout to hand to
    /// [`Model::run_layer`]. Errors on an empty batch, an empty sequence or a token out of range.
    pub fn embed_batch(&self, seqs: &[Vec<u32>]) -> Result<(Array2<f32>, Batch)> {
        let b = self.batch(seqs)?;
        Ok((self.embed(seqs)?, b))
    }

    /// Runs decoder layer `l` over `h` in place (what [`Model::logits`] does for each layer, observer calls
    /// included: the layer's linear inputs, routing, then [`Observer::layer_done`]). `h` must come from
    /// [`Model::embed_batch`] with `b` (and layers `0..l`).
    pub fn run_layer(
        &self,
        l: usize,
        h: &mut Array2<f32>,
        b: &Batch,
        mut observer: Option<&mut dyn Observer>,
    ) -> Result<()> {
        if l >= self.spec.n_layers {
            return Err(Error::BadConfig(format!("layer {l} of a {}-layer model", self.spec.n_layers)));
        }
        if h.nrows() != b.pos.len() || h.ncols() != self.spec.hidden {
            return Err(Error::Shape {
                tensor: "hidden states".into(),
                shape: h.shape().iter().map(|&d| d as u64).collect(),
                expected: format!("[{}, {}]", b.pos.len(), self.spec.hidden),
            });
        }
        self.layer(l, h, b, &mut observer)?;
        self.src.release();
        if let Some(o) = observer {
            o.layer_done(l);
        }
        Ok(())
    }

    /// Logits of hidden states that went through every layer ([`Model::run_layer`]): the final norm, then the
    /// output head (what [`Model::logits`] does after the last layer).
    pub fn head_logits(&self, h: &Array2<f32>) -> Result<Array2<f32>> {
        let x = self.final_norm(h)?;
        self.lm_head(&x, &mut None)
    }

    /// The final norm (`model.norm`) of hidden states: the input of the output head.
    pub fn final_norm(&self, h: &Array2<f32>) -> Result<Array2<f32>> {
        let w = self.vector("model.norm.weight", self.spec.hidden)?;
        Ok(self.rms(h, &w, self.spec.eps))
    }

    fn batch(&self, seqs: &[Vec<u32>]) -> Result<Batch> {
        if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
            return Err(Error::Empty("every sequence needs at least one token"));
        }
        let mut v = Vec::new();
        let mut pos = Vec::new();
        let mut st = 0;
        for s in seqs {
            v.push((st, s.len()));
            pos.extend(0..s.len());
            st += s.len();
        }
        let max_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (cos, sin) = (0..max_len).map(|p| self.spec.rope.cos_sin(p)).unzip();
        Ok(Batch { seqs: v, pos, cos, sin })
    }

    fn final_hidden(&self, seqs: &[Vec<u32>], obs: Obs) -> Result<(Array2<f32>, Batch)> {
        let b = self.batch(seqs)?;
        let mut h = self.embed(seqs)?;
        for l in 0..self.spec.n_layers {
            tracing::debug!(layer = l, "forward");
            self.layer(l, &mut h, &b, obs)?;
            self.src.release();
            if let Some(o) = obs.as_deref_mut() {
                o.layer_done(l);
            }
        }
        let w = self.vector("model.norm.weight", self.spec.hidden)?;
        Ok((self.rms(&h, &w, self.spec.eps), b))
    }

    fn embed(&self, seqs: &[Vec<u32>]) -> Result<Array2<f32>> {
        let name = "model.embed_tokens.weight";
        let hd = self.spec.hidden;
        let shape = self.src.shape(name).ok_or_else(|| Error::Missing(name.into()))?;
        if shape.len() != 2 || shape[1] != hd as u64 {
            return Err(Error::Shape { tensor: name.into(), shape, expected: format!("[vocab, {hd}]") });
        }
        let vocab = shape[0] as usize;
        let ids: Vec<u32> = seqs.iter().flatten().copied().collect();
        let mut h = Array2::<f32>::zeros((ids.len(), hd));
        let mut cache: std::collections::HashMap<u32, Vec<f32>> = std::collections::HashMap::new();
        for (t, &id) in ids.iter().enumerate() {
            if id as usize >= vocab {
                return Err(Error::TokenOutOfRange { id, vocab });
            }
            let row = match cache.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.src.read_outer(name, id as u64, id as u64 + 1)?)
                }
            };
            h.row_mut(t).iter_mut().zip(row.iter()).for_each(|(d, s)| *d = *s);
        }
        Ok(h)
    }

    fn lm_head(&self, x: &Array2<f32>, obs: Obs) -> Result<Array2<f32>> {
        let hd = self.spec.hidden;
        let (name, gguf) = if self.src.contains("lm_head.weight") || !self.spec.tied {
            ("lm_head.weight", "output.weight")
        } else {
            ("model.embed_tokens.weight", "token_embd.weight")
        };
        let shape = self.src.shape(name).ok_or_else(|| Error::Missing(name.into()))?;
        if shape.len() != 2 || shape[1] != hd as u64 {
            return Err(Error::Shape { tensor: name.into(), shape, expected: format!("[vocab, {hd}]") });
        }
        observe(obs, || gguf.to_string(), || Some(name.to_string()), None, x, None);
        let vocab = shape[0] as usize;
        let mut out = Array2::<f32>::zeros((x.nrows(), vocab));
        let act = self.act(name);
        let chunk = ((64usize << 20) / hd.max(1)).clamp(1, vocab.max(1));
        let mut r0 = 0;
        while r0 < vocab {
            let r1 = (r0 + chunk).min(vocab);
            let v = self.src.read_outer(name, r0 as u64, r1 as u64)?;
            let w = ArrayView2::from_shape((r1 - r0, hd), &v)
                .map_err(|e| Error::Read { tensor: name.into(), why: e.to_string() })?;
            out.slice_mut(s![.., r0..r1]).assign(&self.mm(x.view(), w, None, act)?);
            r0 = r1;
        }
        Ok(out)
    }

    fn layer(&self, l: usize, h: &mut Array2<f32>, b: &Batch, obs: Obs) -> Result<()> {
        let (hd, eps) = (self.spec.hidden, self.spec.eps);
        let p = format!("model.layers.{l}.");
        let x = self.rms(h, &self.vector(&format!("{p}input_layernorm.weight"), hd)?, eps);
        let a = match &self.spec.attention {
            Attention::Gqa { qk_norm, clip_qkv, sinks } => self.gqa(l, &x, b, *qk_norm, *clip_qkv, *sinks, obs)?,
            Attention::Mla { .. } => self.mla(l, &x, b, obs)?,
        };
        *h += &a;
        let x = self.rms(h, &self.vector(&format!("{p}post_attention_layernorm.weight"), hd)?, eps);
        let f = match &self.spec.ffn[l] {
            Ffn::Dense { ff } => self.mlp(l, "mlp", *ff, &x, obs)?,
            Ffn::Moe(m) => self.moe(l, m, &x, obs)?,
        };
        *h += &f;
        Ok(())
    }

    fn rope_rows(&self, x: &mut Array2<f32>, b: &Batch, n_heads: usize, stride: usize, offset: usize) {
        let d = 2 * self.spec.rope.inv_freq.len();
        for (t, mut row) in x.rows_mut().into_iter().enumerate() {
            let p = b.pos[t];
            for hh in 0..n_heads {
                let o = hh * stride + offset;
                self.spec.rope.apply(row.slice_mut(s![o..o + d]), &b.cos[p], &b.sin[p]);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gqa(
        &self,
        l: usize,
        x: &Array2<f32>,
        b: &Batch,
        qk_norm: QkNorm,
        clip: Option<f32>,
        sinks: bool,
        obs: Obs,
    ) -> Result<Array2<f32>> {
        let s = &self.spec;
        let (nh, nkv, dh, hd) = (s.n_heads, s.n_kv_heads, s.head_dim, s.hidden);
        let p = format!("model.layers.{l}.self_attn.");
        let (wq, bq) = self.lin(&format!("{p}q_proj"), nh * dh, hd)?;
        let (wk, bk) = self.lin(&format!("{p}k_proj"), nkv * dh, hd)?;
        let (wv, bv) = self.lin(&format!("{p}v_proj"), nkv * dh, hd)?;
        for stem in ["q_proj", "k_proj", "v_proj"] {
            let stem = format!("self_attn.{stem}");
            observe(obs, || s.gguf_name(l, &stem), || hf_name(l, &stem), None, x, None);
        }
        let mut q = self.mm(x.view(), wq.view(), bq.as_deref(), self.act(&format!("{p}q_proj.weight")))?;
        let mut k = self.mm(x.view(), wk.view(), bk.as_deref(), self.act(&format!("{p}k_proj.weight")))?;
        let mut v = self.mm(x.view(), wv.view(), bv.as_deref(), self.act(&format!("{p}v_proj.weight")))?;
        drop((wq, wk, wv));
        match qk_norm {
            QkNorm::None => {}
            QkNorm::Full => {
                q = self.rms(&q, &self.vector(&format!("{p}q_norm.weight"), nh * dh)?, s.eps);
                k = self.rms(&k, &self.vector(&format!("{p}k_norm.weight"), nkv * dh)?, s.eps);
            }
            QkNorm::PerHead => {
                let qn = self.vector(&format!("{p}q_norm.weight"), dh)?;
                let kn = self.vector(&format!("{p}k_norm.weight"), dh)?;
                let sq = self.squares();
                for (m, w) in [(&mut q, &qn), (&mut k, &kn)] {
                    m.axis_iter_mut(Axis(0)).into_par_iter().for_each(|mut row| {
                        row.exact_chunks_mut(dh).into_iter().for_each(|head| rms_norm_view(head, w, s.eps, sq))
                    });
                }
            }
        }
        if let Some(c) = clip {
            for m in [&mut q, &mut k, &mut v] {
                m.mapv_inplace(|x| x.clamp(-c, c));
            }
        }
        if 2 * s.rope.inv_freq.len() != dh {
            return Err(Error::BadConfig(format!("rope width {} != head_dim {dh}", 2 * s.rope.inv_freq.len())));
        }
        self.rope_rows(&mut q, b, nh, dh, 0);
        self.rope_rows(&mut k, b, nkv, dh, 0);
        let sink_v = if sinks { Some(self.vector(&format!("{p}sinks"), nh)?) } else { None };
        let shape = AttnShape {
            seqs: &b.seqs,
            n_heads: nh,
            n_k: nkv,
            n_v: nkv,
            dk: dh,
            dv: dh,
            scale: s.attn_scale,
            window: s.windows[l],
            sinks: sink_v.as_deref(),
        };
        let out = attention(&q, &k, &v, &shape);
        observe(obs, || s.gguf_name(l, "self_attn.o_proj"), || hf_name(l, "self_attn.o_proj"), None, &out, None);
        let (wo, bo) = self.lin(&format!("{p}o_proj"), hd, nh * dh)?;
        self.mm(out.view(), wo.view(), bo.as_deref(), self.act(&format!("{p}o_proj.weight")))
    }

    fn mla(&self, l: usize, x: &Array2<f32>, b: &Batch, obs: Obs) -> Result<Array2<f32>> {
        let s = &self.spec;
        let Attention::Mla { q_lora_rank, kv_lora_rank: kvr, qk_nope, qk_rope, v_head_dim: dv } = s.attention else {
            return Err(Error::Unsupported("MLA call on a GQA model".into()));
        };
        let (nh, hd, eps) = (s.n_heads, s.hidden, s.eps);
        let dk = qk_nope + qk_rope;
        let p = format!("model.layers.{l}.self_attn.");
        if 2 * s.rope.inv_freq.len() != qk_rope {
            return Err(Error::BadConfig(format!(
                "rope width {} != qk_rope_head_dim {qk_rope}",
                2 * s.rope.inv_freq.len()
            )));
        }
        let mut q = match q_lora_rank {
            Some(r) => {
                let (wa, ba) = self.lin(&format!("{p}q_a_proj"), r, hd)?;
                observe(
                    obs,
                    || s.gguf_name(l, "self_attn.q_a_proj"),
                    || hf_name(l, "self_attn.q_a_proj"),
                    None,
                    x,
                    None,
                );
                let qa = self.mm(x.view(), wa.view(), ba.as_deref(), self.act(&format!("{p}q_a_proj.weight")))?;
                let qa = self.rms(&qa, &self.vector(&format!("{p}q_a_layernorm.weight"), r)?, eps);
                let (wb, bb) = self.lin(&format!("{p}q_b_proj"), nh * dk, r)?;
                observe(
                    obs,
                    || s.gguf_name(l, "self_attn.q_b_proj"),
                    || hf_name(l, "self_attn.q_b_proj"),
                    None,
                    &qa,
                    None,
                );
                self.mm(qa.view(), wb.view(), bb.as_deref(), self.act(&format!("{p}q_b_proj.weight")))?
            }
            None => {
                let (w, bq) = self.lin(&format!("{p}q_proj"), nh * dk, hd)?;
                observe(obs, || s.gguf_name(l, "self_attn.q_proj"), || hf_name(l, "self_attn.q_proj"), None, x, None);
                self.mm(x.view(), w.view(), bq.as_deref(), self.act(&format!("{p}q_proj.weight")))?
            }
        };
        let (wkv, bkv) = self.lin(&format!("{p}kv_a_proj_with_mqa"), kvr + qk_rope, hd)?;
        observe(
            obs,
            || s.gguf_name(l, "self_attn.kv_a_proj_with_mqa"),
            || hf_name(l, "self_attn.kv_a_proj_with_mqa"),
            None,
            x,
            None,
        );
        let ckv = self.mm(x.view(), wkv.view(), bkv.as_deref(), self.act(&format!("{p}kv_a_proj_with_mqa.weight")))?;
        let c = self.rms(
            &ckv.slice(s![.., ..kvr]).to_owned(),
            &self.vector(&format!("{p}kv_a_layernorm.weight"), kvr)?,
            eps,
        );
        if let Some(o) = obs.as_deref_mut() {
            // The Hugging Face kv_b_proj multiplies the normed latent; GGUF has no such weight (see
            // `Observer::hf_only_input`).
            if let Some(rows) = c.as_slice() {
                let name = format!("{p}kv_b_proj.weight");
                o.hf_only_input(&LinearInput {
                    tensor: &name,
                    hf: Some(&name),
                    expert: None,
                    rows,
                    n_cols: kvr,
                    tokens: None,
                });
            }
        }
        let mut kpe = ckv.slice(s![.., kvr..]).to_owned();
        self.rope_rows(&mut q, b, nh, dk, qk_nope);
        self.rope_rows(&mut kpe, b, 1, qk_rope, 0);
        let wkvb = self.mat(&format!("{p}kv_b_proj.weight"), nh * (qk_nope + dv), kvr)?;
        let t = x.nrows();
        let shape = AttnShape {
            seqs: &b.seqs,
            n_heads: nh,
            n_k: nh,
            n_v: nh,
            dk,
            dv,
            scale: s.attn_scale,
            window: s.windows[l],
            sinks: None,
        };
        // llama.cpp multiplies a GGUF's separate attn_k_b/attn_v_b absorbed; emulating it, so does this.
        let absorbed = if self.llama_cpp_cpu && obs.is_none() {
            let kb = self.src.gguf_vec_dot(&s.gguf_name(l, "self_attn.k_b_proj"));
            let vb = self.src.gguf_vec_dot(&s.gguf_name(l, "self_attn.v_b_proj"));
            kb.zip(vb)
        } else {
            None
        };
        let out = if let Some((kb, vb)) = absorbed {
            self.mla_absorbed(&q, &c, &kpe, &wkvb, &shape, [qk_nope, qk_rope, dv, kvr], [kb, vb])?
        } else {
            let kv = self.mm(c.view(), wkvb.view(), None, self.act(&format!("{p}kv_b_proj.weight")))?;
            let mut k = Array2::<f32>::zeros((t, nh * dk));
            let mut v = Array2::<f32>::zeros((t, nh * dv));
            for hh in 0..nh {
                let base = hh * (qk_nope + dv);
                k.slice_mut(s![.., hh * dk..hh * dk + qk_nope]).assign(&kv.slice(s![.., base..base + qk_nope]));
                k.slice_mut(s![.., hh * dk + qk_nope..(hh + 1) * dk]).assign(&kpe);
                v.slice_mut(s![.., hh * dv..(hh + 1) * dv])
                    .assign(&kv.slice(s![.., base + qk_nope..base + qk_nope + dv]));
            }
            if obs.is_some() {
                self.observe_absorbed(l, &q, &k, &c, &shape, [qk_nope, kvr], &mut *obs)?;
            }
            attention(&q, &k, &v, &shape)
        };
        observe(obs, || s.gguf_name(l, "self_attn.o_proj"), || hf_name(l, "self_attn.o_proj"), None, &out, None);
        let (wo, bo) = self.lin(&format!("{p}o_proj"), hd, nh * dv)?;
        self.mm(out.view(), wo.view(), bo.as_deref(), self.act(&format!("{p}o_proj.weight")))
    }

    /// What llama.cpp's absorbed MLA multiplies, for the observer: attn_k_b each head's q_nope, attn_v_b each
    /// head's attention-weighted latent (softmax · kv_a_norm(c)).
    #[allow(clippy::too_many_arguments)]
    fn observe_absorbed(
        &self,
        l: usize,
        q: &Array2<f32>,
        k: &Array2<f32>,
        c: &Array2<f32>,
        shape: &AttnShape,
        [qk_nope, kvr]: [usize; 2],
        obs: Obs,
    ) -> Result<()> {
        let s = &self.spec;
        let (t, nh, dk) = (q.nrows(), shape.n_heads, shape.dk);
        let mut qn = Array2::<f32>::zeros((t * nh, qk_nope));
        for tt in 0..t {
            for hh in 0..nh {
                qn.row_mut(tt * nh + hh).assign(&q.slice(s![tt, hh * dk..hh * dk + qk_nope]));
            }
        }
        observe(obs, || s.gguf_name(l, "self_attn.k_b_proj"), || None, None, &qn, None);
        let lat = attention(q, k, c, &AttnShape { n_v: 1, dv: kvr, ..*shape });
        let lat = lat.into_shape_with_order((t * nh, kvr)).map_err(|e| Error::Read {
            tensor: format!("model.layers.{l}.self_attn.kv_b_proj.weight"),
            why: e.to_string(),
        })?;
        observe(obs, || s.gguf_name(l, "self_attn.v_b_proj"), || None, None, &lat, None);
        Ok(())
    }

    /// MLA as llama.cpp runs a GGUF with separate `attn_k_b`/`attn_v_b` (`models/deepseek2.cpp`, `is_mla`): each
    /// head's `q_nope` times its key half of `kv_b` gives a query in the latent space (`q_nope_absorbed`,
    /// activations rounded for `attn_k_b`'s type `kb`), attention runs over the latent `c` and `k_pe` shared by all
    /// heads (MQA), and each head's attention-weighted latent times its value half gives the output (rounded
    /// for `attn_v_b`'s type `vb`). The same products as the expanded form, in the runtime's order and rounding.
    #[allow(clippy::too_many_arguments)]
    fn mla_absorbed(
        &self,
        q: &Array2<f32>,
        c: &Array2<f32>,
        kpe: &Array2<f32>,
        wkvb: &Array2<f32>,
        shape: &AttnShape,
        [qk_nope, qk_rope, dv, kvr]: [usize; 4],
        [kb, vb]: [VecDot; 2],
    ) -> Result<Array2<f32>> {
        let (t, nh) = (q.nrows(), shape.n_heads);
        let (dk, dl) = (qk_nope + qk_rope, kvr + qk_rope);
        let act = |v: VecDot| Some(v).filter(|&v| v != VecDot::F32);
        let mut qa = Array2::<f32>::zeros((t, nh * dl));
        for hh in 0..nh {
            let base = hh * (qk_nope + dv);
            // [kvr, nope]: the `[out, in]` weight of q_nope_h -> latent
            let wk = wkvb.slice(s![base..base + qk_nope, ..]).t().as_standard_layout().into_owned();
            let qn = q.slice(s![.., hh * dk..hh * dk + qk_nope]);
            qa.slice_mut(s![.., hh * dl..hh * dl + kvr]).assign(&self.mm(qn, wk.view(), None, act(kb))?);
            qa.slice_mut(s![.., hh * dl + kvr..(hh + 1) * dl])
                .assign(&q.slice(s![.., hh * dk + qk_nope..(hh + 1) * dk]));
        }
        let mut kl = Array2::<f32>::zeros((t, dl));
        kl.slice_mut(s![.., ..kvr]).assign(c);
        kl.slice_mut(s![.., kvr..]).assign(kpe);
        let lat = attention(&qa, &kl, c, &AttnShape { n_k: 1, n_v: 1, dk: dl, dv: kvr, ..*shape });
        let mut out = Array2::<f32>::zeros((t, nh * dv));
        for hh in 0..nh {
            let base = hh * (qk_nope + dv);
            let wv = wkvb.slice(s![base + qk_nope..base + qk_nope + dv, ..]);
            let lh = lat.slice(s![.., hh * kvr..(hh + 1) * kvr]);
            out.slice_mut(s![.., hh * dv..(hh + 1) * dv]).assign(&self.mm(lh, wv, None, act(vb))?);
        }
        Ok(out)
    }

    /// A gated MLP `down(act(gate(x)) * up(x))` under `model.layers.{l}.{stem}`.
    fn mlp(&self, l: usize, stem: &str, ff: usize, x: &Array2<f32>, obs: Obs) -> Result<Array2<f32>> {
        let (s, hd) = (&self.spec, self.spec.hidden);
        let p = format!("model.layers.{l}.{stem}.");
        let (wg, bg) = self.lin(&format!("{p}gate_proj"), ff, hd)?;
        let (wu, bu) = self.lin(&format!("{p}up_proj"), ff, hd)?;
        for w in ["gate_proj", "up_proj"] {
            let st = format!("{stem}.{w}");
            observe(obs, || s.gguf_name(l, &st), || hf_name(l, &st), None, x, None);
        }
        let mut g = self.mm(x.view(), wg.view(), bg.as_deref(), self.act(&format!("{p}gate_proj.weight")))?;
        let u = self.mm(x.view(), wu.view(), bu.as_deref(), self.act(&format!("{p}up_proj.weight")))?;
        drop((wg, wu));
        self.activate(&mut g, &u);
        let st = format!("{stem}.down_proj");
        observe(obs, || s.gguf_name(l, &st), || hf_name(l, &st), None, &g, None);
        let (wd, bd) = self.lin(&format!("{p}down_proj"), hd, ff)?;
        self.mm(g.view(), wd.view(), bd.as_deref(), self.act(&format!("{p}down_proj.weight")))
    }

    /// `g <- act(g, u)`.
    fn activate(&self, g: &mut Array2<f32>, u: &Array2<f32>) {
        match self.spec.act {
            Act::Silu => g.zip_mut_with(u, |g, &u| *g = silu(*g) * u),
            Act::GptOss { alpha, limit } => g.zip_mut_with(u, |g, &u| {
                let gg = g.min(limit);
                let uu = u.clamp(-limit, limit);
                *g = (uu + 1.0) * (gg * sigmoid(gg * alpha));
            }),
        }
    }

    fn moe(&self, l: usize, m: &Moe, x: &Array2<f32>, obs: Obs) -> Result<Array2<f32>> {
        let s = &self.spec;
        let (t, hd, ne) = (x.nrows(), s.hidden, m.n_experts);
        let p = format!("model.layers.{l}.");
        let (wr, br) = self.lin(&format!("{p}{}", s.router_stem), ne, hd)?;
        observe(obs, || s.gguf_name(l, s.router_stem), || hf_name(l, s.router_stem), None, x, None);
        let logits = self.mm(x.view(), wr.view(), br.as_deref(), self.act(&format!("{p}{}.weight", s.router_stem)))?;
        let e_bias = match m.router {
            Router::DeepseekV3 { .. } => Some(self.vector(&format!("{p}mlp.gate.e_score_correction_bias"), ne)?),
            _ => None,
        };
        // token -> [(expert, weight)], then expert -> [(token, weight)]
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (tt, row) in logits.rows().into_iter().enumerate() {
            let row: Vec<f32> = row.to_vec();
            for (e, w) in route(&row, &m.router, m.top_k, e_bias.as_deref()) {
                per_expert[e].push((tt, w));
            }
        }
        let observing = obs.is_some();
        let all = observing && self.all_experts;
        if let Some(o) = obs.as_deref_mut() {
            let counts: Vec<u64> = per_expert.iter().map(|v| v.len() as u64).collect();
            o.routing(l, &counts);
        }
        // Experts to run: those some token is routed to; with `all`, every expert (for the observer).
        let run: Vec<usize> = (0..ne).filter(|&e| all || !per_expert[e].is_empty()).collect();
        let all_toks: Vec<usize> = if all { (0..t).collect() } else { Vec::new() };
        /// What the observer gets of one expert: its gate/up input and its down input.
        enum Seen {
            None,
            /// The routed tokens' rows.
            Routed(Array2<f32>, Array2<f32>),
            /// Every token's down input (the gate/up input is `x`).
            All(Array2<f32>),
        }
        type ExpertOut = (usize, Option<Array2<f32>>, Seen);
        let run_one = |e: usize| -> Result<ExpertOut> {
            let w = self.expert(l, m, e)?;
            let toks: Vec<usize> = per_expert[e].iter().map(|&(tt, _)| tt).collect();
            let weigh = |y: &mut Array2<f32>| {
                for (mut row, &(_, wt)) in y.rows_mut().into_iter().zip(&per_expert[e]) {
                    row.mapv_inplace(|v| v * wt);
                }
            };
            if all {
                // gate/up over every token; the routed tokens' rows of act(gate)·up are exactly what the
                // routed-only path computes (the GEMM's result for a row does not depend on the others).
                let mut g = self.mm(x.view(), w.gate.view(), w.gate_b.as_deref(), w.acts[0])?;
                let u = self.mm(x.view(), w.up.view(), w.up_b.as_deref(), w.acts[1])?;
                self.activate(&mut g, &u);
                drop(u);
                let y = if toks.is_empty() {
                    None
                } else {
                    let mut y =
                        self.mm(g.select(Axis(0), &toks).view(), w.down.view(), w.down_b.as_deref(), w.acts[2])?;
                    weigh(&mut y);
                    Some(y)
                };
                return Ok((e, y, Seen::All(g)));
            }
            let xe = x.select(Axis(0), &toks);
            let mut g = self.mm(xe.view(), w.gate.view(), w.gate_b.as_deref(), w.acts[0])?;
            let u = self.mm(xe.view(), w.up.view(), w.up_b.as_deref(), w.acts[1])?;
            self.activate(&mut g, &u);
            let mut y = self.mm(g.view(), w.down.view(), w.down_b.as_deref(), w.acts[2])?;
            weigh(&mut y);
            Ok((e, Some(y), if observing { Seen::Routed(xe, g) } else { Seen::None }))
        };
        // Experts run in waves (results summed in expert order, whatever the wave): with `all`, one per
        // worker, so that at most that many `[tokens, ff]` activations wait for the observer; otherwise four
        // per worker (routed rows only), which bounds the outputs (and observed inputs) held at once.
        let threads = rayon::current_num_threads().max(1);
        let wave = if all { threads } else { 4 * threads };
        let mut out = Array2::<f32>::zeros((t, hd));
        let names = if observing { [0, 1, 2].map(|i| s.expert_gguf_name(l, i)) } else { Default::default() };
        for group in run.chunks(wave) {
            let results: Vec<Result<ExpertOut>> = group.par_iter().map(|&e| run_one(e)).collect();
            for r in results {
                let (e, y, seen) = r?;
                let toks: Vec<usize> = per_expert[e].iter().map(|&(tt, _)| tt).collect();
                if let Some(y) = y {
                    for (row, &tt) in y.rows().into_iter().zip(&toks) {
                        let mut o = out.row_mut(tt);
                        o += &row;
                    }
                }
                let hf = |i: usize| match m.layout {
                    ExpertLayout::PerExpert => {
                        let (prefix, w) = s.expert_names;
                        Some(format!("model.layers.{l}.{prefix}.{e}.{}.weight", w[i]))
                    }
                    ExpertLayout::GptOss => None,
                };
                let (xin, down, toks) = match &seen {
                    Seen::None => continue,
                    Seen::Routed(xe, g) => (xe, g, &toks),
                    Seen::All(g) => (x, g, &all_toks),
                };
                observe(obs, || names[0].clone(), || hf(0), Some(e), xin, Some(toks.as_slice()));
                observe(obs, || names[1].clone(), || hf(1), Some(e), xin, Some(toks.as_slice()));
                observe(obs, || names[2].clone(), || hf(2), Some(e), down, Some(toks.as_slice()));
            }
        }
        if let Some(sff) = m.shared_ff {
            let mut sh = self.mlp(l, m.shared_stem, sff, x, obs)?;
            if m.shared_gate {
                let gate_stem = format!("{}_gate", m.shared_stem);
                let wg = self.mat(&format!("{p}{gate_stem}.weight"), 1, hd)?;
                observe(obs, || s.gguf_name(l, &gate_stem), || hf_name(l, &gate_stem), None, x, None);
                let gl = self.mm(x.view(), wg.view(), None, self.act(&format!("{p}{gate_stem}.weight")))?;
                for (mut row, gv) in sh.rows_mut().into_iter().zip(gl.column(0)) {
                    let f = sigmoid(*gv);
                    row.mapv_inplace(|v| f * v);
                }
            }
            out += &sh;
        }
        Ok(out)
    }
}

/// Routes one token: its experts and their weights.
pub fn route(logits: &[f32], r: &Router, k: usize, e_bias: Option<&[f32]>) -> Vec<(usize, f32)> {
    let n = logits.len();
    match *r {
        Router::SoftmaxTopK { renorm } => {
            let mut p = logits.to_vec();
            softmax(&mut p);
            let idx = top_k(&p, k);
            let mut w: Vec<f32> = idx.iter().map(|&i| p[i]).collect();
            if renorm {
                let sum: f32 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= sum);
            }
            idx.into_iter().zip(w).collect()
        }
        Router::TopKSoftmax => {
            let idx = top_k(logits, k);
            let mut w: Vec<f32> = idx.iter().map(|&i| logits[i]).collect();
            softmax(&mut w);
            idx.into_iter().zip(w).collect()
        }
        Router::DeepseekV2 { group_limited, n_group, topk_group, scale } => {
            let mut p = logits.to_vec();
            softmax(&mut p);
            let mut choice = p.clone();
            if group_limited {
                let per = n / n_group;
                let gs: Vec<f32> = (0..n_group)
                    .map(|g| p[g * per..(g + 1) * per].iter().copied().fold(f32::NEG_INFINITY, f32::max))
                    .collect();
                let keep = top_k(&gs, topk_group);
                for (i, c) in choice.iter_mut().enumerate() {
                    if !keep.contains(&(i / per)) {
                        *c = 0.0;
                    }
                }
            }
            let idx = top_k(&choice, k);
            idx.into_iter().map(|i| (i, choice[i] * scale)).collect()
        }
        Router::DeepseekV3 { n_group, topk_group, renorm, scale } => {
            let sc: Vec<f32> = logits.iter().map(|&x| sigmoid(x)).collect();
            let mut choice: Vec<f32> = match e_bias {
                Some(b) => sc.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => sc.clone(),
            };
            let per = n / n_group;
            let gs: Vec<f32> = (0..n_group)
                .map(|g| top_k(&choice[g * per..(g + 1) * per], 2).iter().map(|&i| choice[g * per + i]).sum())
                .collect();
            let keep = top_k(&gs, topk_group);
            for (i, c) in choice.iter_mut().enumerate() {
                if !keep.contains(&(i / per)) {
                    *c = f32::NEG_INFINITY;
                }
            }
            let idx = top_k(&choice, k);
            let mut w: Vec<f32> = idx.iter().map(|&i| sc[i]).collect();
            if renorm {
                let sum: f32 = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|v| *v /= sum);
            }
            idx.into_iter().zip(w.into_iter().map(|v| v * scale)).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers() {
        let l = [1.0f32, 3.0, 2.0, 0.0];
        let r = route(&l, &Router::SoftmaxTopK { renorm: true }, 2, None);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
        let r = route(&l, &Router::SoftmaxTopK { renorm: false }, 2, None);
        assert!(r[0].1 + r[1].1 < 0.95);
        let r = route(&l, &Router::TopKSoftmax, 2, None);
        assert!((r[0].1 - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        // V3: groups {0,1} {2,3}; bias pushes expert 3 and so group 1 up; top-1 group only
        let r = route(
            &l,
            &Router::DeepseekV3 { n_group: 2, topk_group: 1, renorm: false, scale: 2.0 },
            1,
            Some(&[0.0, 0.0, 0.0, 5.0]),
        );
        assert_eq!(r[0].0, 3);
        assert!((r[0].1 - 2.0 * sigmoid(0.0)).abs() < 1e-6);
        // V2 group-limited: group max 3.0 (group 0) wins, expert 1 then 0
        let r = route(&l, &Router::DeepseekV2 { group_limited: true, n_group: 2, topk_group: 1, scale: 1.0 }, 2, None);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0]);
    }
}
