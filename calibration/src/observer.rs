//! Hooks into the forward pass: what every linear layer reads, for importance matrices (imatrix)
//! and other activation statistics.

/// The input rows of one linear layer (one expert's, for routed experts).
#[derive(Clone, Copy, Debug)]
pub struct LinearInput<'a> {
    /// The weight's GGUF tensor name, as llama.cpp's imatrix names it: `blk.3.attn_q.weight`,
    /// `blk.3.ffn_down_exps.weight`, `output.weight` (`token_embd.weight` when the output is tied).
    pub tensor: &'a str,
    /// The Hugging Face tensor name of the weight these rows are the input of, exactly as
    /// `sling_pipeline::hf::tensors` names it: `model.layers.3.self_attn.q_proj.weight`, per routed expert
    /// `model.layers.3.mlp.experts.5.gate_proj.weight` (Mixtral: `block_sparse_moe.experts.5.w1.weight`;
    /// transformers-5 fused experts: the per-expert split names), `lm_head.weight` (`model.embed_tokens.weight`
    /// when the output is tied). `None` where no Hugging Face weight multiplies these rows: DeepSeek's
    /// `attn_k_b`/`attn_v_b` inputs (GGUF's split of `kv_b_proj`, whose own input goes to
    /// [`Observer::hf_only_input`]) and gpt-oss's stacked experts.
    pub hf: Option<&'a str>,
    /// The expert, for routed experts (`*_exps`).
    pub expert: Option<usize>,
    /// Row-major `[n_rows, n_cols]` inputs.
    pub rows: &'a [f32],
    pub n_cols: usize,
    /// For routed experts: the token (row index into the batch's flattened tokens, sequences one after
    /// the other) each row belongs to: the tokens routed to the expert, or every token of the batch when
    /// the model runs with [`all_experts`](crate::Model::all_experts). `None`: one row per token, in
    /// order, or (DeepSeek's `attn_k_b`/`attn_v_b`, which act per head) `n_heads` rows per token,
    /// token-major.
    pub tokens: Option<&'a [usize]>,
}

/// Observes the forward pass. Installed with the `observer` argument of [`crate::Model::logits`] or
/// [`crate::Model::hidden_states`]; with none installed no inputs are gathered or copied.
pub trait Observer {
    /// Called once per linear layer (and routed expert) per layer pass, with that layer's inputs for
    /// the whole batch.
    fn linear_input(&mut self, input: &LinearInput<'_>);

    /// The input of a Hugging Face weight that has no GGUF counterpart with the same input, so that
    /// [`Observer::linear_input`] never sees it: DeepSeek's `self_attn.kv_b_proj.weight`, whose input is the
    /// `kv_a_layernorm`ed latent (GGUF splits the weight into `attn_k_b`/`attn_v_b`, observed with
    /// llama.cpp's absorbed inputs). `input.tensor` is the Hugging Face name here too, and `input.hf` is
    /// `Some` of it. Default: ignored (importance matrices are keyed by GGUF names).
    fn hf_only_input(&mut self, _input: &LinearInput<'_>) {}

    /// Called once per MoE layer per forward call, before its experts' inputs: how many (token, slot)
    /// pairs the router sent to each expert. This is the true routing, also when the model runs with
    /// [`all_experts`](crate::Model::all_experts) (whose `*_exps` inputs then hold every token).
    fn routing(&mut self, _layer: usize, _counts: &[u64]) {}

    /// Called after each decoder layer of a forward call (progress reporting).
    fn layer_done(&mut self, _layer: usize) {}
}

/// An observer that sums squared inputs per column, as llama.cpp's imatrix collector does (with
/// the row count), keyed by (tensor, expert). Useful on its own and as an example.
#[derive(Default, Debug)]
pub struct SumSquares {
    pub entries: std::collections::BTreeMap<(String, Option<usize>), (Vec<f64>, u64)>,
}

impl Observer for SumSquares {
    fn linear_input(&mut self, x: &LinearInput<'_>) {
        let e = self.entries.entry((x.tensor.to_string(), x.expert)).or_insert_with(|| (vec![0.0; x.n_cols], 0));
        if e.0.len() != x.n_cols || x.n_cols == 0 {
            return;
        }
        for row in x.rows.chunks_exact(x.n_cols) {
            e.0.iter_mut().zip(row).for_each(|(s, &v)| *s += (v as f64) * (v as f64));
            e.1 += 1;
        }
    }
}
