//! Tensor names and shapes (ggml order, `ne[0]` first) of real models as llama.cpp's converter names them, every
//! layer, without data: what the type rules and recipes are tested on.

use std::collections::HashMap;

use sling_core::DType;

use super::rules::{sort_key, Choice, Chooser, Ftype, ModelFacts, Options, TensorTypeRule};

pub struct Model {
    pub facts: ModelFacts,
    pub tensors: Vec<(String, Vec<u64>)>,
}

impl Model {
    fn push(&mut self, name: impl Into<String>, ne: &[u64]) {
        self.tensors.push((name.into(), ne.to_vec()));
    }

    /// Every tensor's choice, fed to one [`Chooser`] in llama-quantize's order (1-D tensors and routers as F32, the
    /// rest as BF16, what the reference's intermediate file holds).
    pub fn choose(&self, o: &Options) -> HashMap<String, Choice> {
        let mut t: Vec<&(String, Vec<u64>)> = self.tensors.iter().collect();
        t.sort_by(|a, b| sort_key(&a.0).cmp(&sort_key(&b.0)));
        let mut c = Chooser::new(o, self.facts.clone(), t.iter().map(|x| x.0.as_str()));
        t.iter()
            .map(|(n, ne)| {
                let cur = if ne.len() < 2 || n.contains("ffn_gate_inp") { DType::F32 } else { DType::BF16 };
                (n.clone(), c.choose(n, ne, cur).unwrap_or_else(|e| panic!("{n}: {e}")))
            })
            .collect()
    }

    pub fn elems(&self) -> u64 {
        self.tensors.iter().map(|(_, ne)| ne.iter().product::<u64>()).sum()
    }
}

pub fn options(ftype: Ftype, has_imatrix: bool, tensor_types: Vec<TensorTypeRule>) -> Options {
    Options {
        ftype,
        pure: false,
        leave_output: false,
        output_tensor_type: None,
        token_embedding_type: None,
        tensor_types,
        has_imatrix,
    }
}

/// DeepSeek-V3 (671B): 61 blocks, the first 3 dense, 256 routed experts of 2048 plus one shared, MLA with
/// `kv_b_proj` split into `attn_k_b`/`attn_v_b` (`conversion/deepseek.py`), `head_count_kv` written as 1
/// (so `n_gqa` = 128), untied output. The MTP block is not converted.
pub fn deepseek_v3() -> Model {
    let (h, v, n_layer) = (7168, 129280, 61);
    let mut m = Model { facts: ModelFacts { n_expert: 256, n_gqa: 128, n_layer, is_70b: false }, tensors: Vec::new() };
    m.push("token_embd.weight", &[h, v]);
    m.push("output_norm.weight", &[h]);
    m.push("output.weight", &[h, v]);
    for i in 0..n_layer {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        m.push(b("attn_norm"), &[h]);
        m.push(b("attn_q_a_norm"), &[1536]);
        m.push(b("attn_kv_a_norm"), &[512]);
        m.push(b("attn_q_a"), &[h, 1536]);
        m.push(b("attn_q_b"), &[1536, 128 * 192]);
        m.push(b("attn_kv_a_mqa"), &[h, 576]);
        m.push(b("attn_k_b"), &[128, 512, 128]);
        m.push(b("attn_v_b"), &[512, 128, 128]);
        m.push(b("attn_output"), &[128 * 128, h]);
        m.push(b("ffn_norm"), &[h]);
        if i < 3 {
            m.push(b("ffn_gate"), &[h, 18432]);
            m.push(b("ffn_up"), &[h, 18432]);
            m.push(b("ffn_down"), &[18432, h]);
        } else {
            m.push(b("ffn_gate_inp"), &[h, 256]);
            m.push(format!("blk.{i}.exp_probs_b.bias"), &[256]);
            m.push(b("ffn_gate_exps"), &[h, 2048, 256]);
            m.push(b("ffn_up_exps"), &[h, 2048, 256]);
            m.push(b("ffn_down_exps"), &[2048, h, 256]);
            m.push(b("ffn_gate_shexp"), &[h, 2048]);
            m.push(b("ffn_up_shexp"), &[h, 2048]);
            m.push(b("ffn_down_shexp"), &[2048, h]);
        }
    }
    m
}

/// Qwen3-30B-A3B: 48 blocks, 128 experts of 768, 32 query / 4 KV heads of 128 (`n_gqa` 8), untied output.
pub fn qwen3_moe() -> Model {
    let (h, v, n_layer) = (2048, 151936, 48);
    let mut m = Model { facts: ModelFacts { n_expert: 128, n_gqa: 8, n_layer, is_70b: false }, tensors: Vec::new() };
    m.push("token_embd.weight", &[h, v]);
    m.push("output_norm.weight", &[h]);
    m.push("output.weight", &[h, v]);
    for i in 0..n_layer {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        m.push(b("attn_norm"), &[h]);
        m.push(b("attn_q_norm"), &[128]);
        m.push(b("attn_k_norm"), &[128]);
        m.push(b("attn_q"), &[h, 4096]);
        m.push(b("attn_k"), &[h, 512]);
        m.push(b("attn_v"), &[h, 512]);
        m.push(b("attn_output"), &[4096, h]);
        m.push(b("ffn_norm"), &[h]);
        m.push(b("ffn_gate_inp"), &[h, 128]);
        m.push(b("ffn_gate_exps"), &[h, 768, 128]);
        m.push(b("ffn_up_exps"), &[h, 768, 128]);
        m.push(b("ffn_down_exps"), &[768, h, 128]);
    }
    m
}

/// gpt-oss-20b: 24 blocks, 32 experts of 2880, 64 query / 8 KV heads of 64 (`n_gqa` 8), hidden 2880 (not a
/// multiple of 256: every 256-block type falls back), untied output.
pub fn gpt_oss() -> Model {
    let (h, v, n_layer) = (2880, 201088, 24);
    let mut m = Model { facts: ModelFacts { n_expert: 32, n_gqa: 8, n_layer, is_70b: false }, tensors: Vec::new() };
    m.push("token_embd.weight", &[h, v]);
    m.push("output_norm.weight", &[h]);
    m.push("output.weight", &[h, v]);
    for i in 0..n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        m.push(b("attn_norm.weight"), &[h]);
        m.push(b("attn_q.weight"), &[h, 4096]);
        m.push(b("attn_q.bias"), &[4096]);
        m.push(b("attn_k.weight"), &[h, 512]);
        m.push(b("attn_v.weight"), &[h, 512]);
        m.push(b("attn_output.weight"), &[4096, h]);
        m.push(b("attn_sinks.weight"), &[64]);
        m.push(b("post_attention_norm.weight"), &[h]);
        m.push(b("ffn_gate_inp.weight"), &[h, 32]);
        m.push(b("ffn_gate_exps.weight"), &[h, h, 32]);
        m.push(b("ffn_up_exps.weight"), &[h, h, 32]);
        m.push(b("ffn_down_exps.weight"), &[h, h, 32]);
        m.push(b("ffn_down_exps.bias"), &[h, 32]);
    }
    m
}

/// Llama-3-8B: 32 dense blocks, 32 query / 8 KV heads (`n_gqa` 4), FFN 14336, untied output.
pub fn llama3_8b() -> Model {
    let (h, v, n_layer) = (4096, 128256, 32);
    let mut m = Model { facts: ModelFacts { n_expert: 0, n_gqa: 4, n_layer, is_70b: false }, tensors: Vec::new() };
    m.push("token_embd.weight", &[h, v]);
    m.push("rope_freqs.weight", &[64]);
    m.push("output_norm.weight", &[h]);
    m.push("output.weight", &[h, v]);
    for i in 0..n_layer {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        m.push(b("attn_norm"), &[h]);
        m.push(b("attn_q"), &[h, h]);
        m.push(b("attn_k"), &[h, 1024]);
        m.push(b("attn_v"), &[h, 1024]);
        m.push(b("attn_output"), &[h, h]);
        m.push(b("ffn_norm"), &[h]);
        m.push(b("ffn_gate"), &[h, 14336]);
        m.push(b("ffn_up"), &[h, 14336]);
        m.push(b("ffn_down"), &[14336, h]);
    }
    m
}
