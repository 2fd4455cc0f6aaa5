//! Architectures as data: which Hugging Face classes sling converts, the GGUF architecture each
//! becomes, how HF tensor names map to GGUF names, and how experts are stacked.
//!
//! Facts: `../shared/docs/gguf-spec.md` §5.3 and the pinned reference converter
//! (`conversion/{llama,qwen,olmo,deepseek,gpt_oss}.py`, `gguf-py/gguf/tensor_mapping.py`).

use crate::tokenizer::VocabStyle;

/// Arch-specific behaviour that is not a plain table lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `LlamaModel`: Q/K rows permuted for ggml's RoPE layout.
    Llama,
    /// `Qwen2Model` (dense).
    Qwen2,
    /// `Qwen2MoeModel` / `Qwen3MoeModel`.
    Qwen2Moe,
    /// `OlmoeModel`: RMS eps forced to 1e-5.
    Olmoe,
    /// `DeepseekV2Model`: MLA `kv_b_proj` split, leading dense layers, MTP layers skipped.
    Deepseek2,
    /// `GptOssModel`: sinks, interleaved gate/up, MXFP4 experts.
    GptOss,
}

/// One supported architecture.
#[derive(Debug)]
pub struct Arch {
    /// `architectures[0]` in config.json.
    pub hf: &'static str,
    /// `general.architecture`.
    pub gguf: &'static str,
    pub family: Family,
    pub vocab: VocabStyle,
    /// Config keys holding the routed expert count, in `find_hparam` order (empty: dense).
    pub expert_count_keys: &'static [&'static str],
    /// Per-expert HF tensors: the path between `model.layers.{bid}.` and `.{x}.`.
    pub experts_prefix: &'static str,
    /// Per-expert weight names in the order the stacked tensors are emitted, with the stacked
    /// name's HF stem (mapped like any other tensor).
    pub expert_weights: &'static [(&'static str, &'static str)],
    /// Layer-level overrides of [`LAYER_MAP`], checked first.
    pub layer_overrides: &'static [(&'static str, &'static str)],
}

const MOE_STACK: &[(&str, &str)] = &[
    ("down_proj", "mlp.experts.down_proj"),
    ("gate_proj", "mlp.experts.gate_proj"),
    ("up_proj", "mlp.experts.up_proj"),
];

impl Arch {
    /// A dense architecture (no experts), mapped by [`LAYER_MAP`] alone.
    const fn dense(hf: &'static str, gguf: &'static str, family: Family, vocab: VocabStyle) -> Arch {
        Arch {
            hf,
            gguf,
            family,
            vocab,
            expert_count_keys: &[],
            experts_prefix: "",
            expert_weights: &[],
            layer_overrides: &[],
        }
    }
    /// A MoE architecture whose per-expert tensors are `model.layers.{bid}.{prefix}.{x}.{w}.weight`.
    const fn moe(
        hf: &'static str,
        gguf: &'static str,
        family: Family,
        counts: &'static [&'static str],
        prefix: &'static str,
        weights: &'static [(&'static str, &'static str)],
    ) -> Arch {
        Arch {
            hf,
            gguf,
            family,
            vocab: VocabStyle::Gpt2,
            expert_count_keys: counts,
            experts_prefix: prefix,
            expert_weights: weights,
            layer_overrides: &[],
        }
    }
}

const QWEN_COUNTS: &[&str] = &["num_local_experts", "num_experts"];

/// Every architecture sling converts.
pub static ARCHS: &[Arch] = &[
    Arch::dense("LlamaForCausalLM", "llama", Family::Llama, VocabStyle::Llama),
    Arch::dense("MistralForCausalLM", "llama", Family::Llama, VocabStyle::Llama),
    Arch {
        vocab: VocabStyle::Llama,
        // LlamaModel.modify_tensors: w1, w2, w3 -> feed_forward.experts.w{1,2,3}
        ..Arch::moe(
            "MixtralForCausalLM",
            "llama",
            Family::Llama,
            &["num_local_experts"],
            "block_sparse_moe.experts",
            &[("w1", "feed_forward.experts.w1"), ("w2", "feed_forward.experts.w2"), ("w3", "feed_forward.experts.w3")],
        )
    },
    // Qwen2Model.set_vocab: tokenizer.model if present, else gpt2.
    Arch::dense("Qwen2ForCausalLM", "qwen2", Family::Qwen2, VocabStyle::SpmOrGpt2),
    Arch::moe("Qwen2MoeForCausalLM", "qwen2moe", Family::Qwen2Moe, QWEN_COUNTS, "mlp.experts", MOE_STACK),
    Arch::moe("Qwen3MoeForCausalLM", "qwen3moe", Family::Qwen2Moe, QWEN_COUNTS, "mlp.experts", MOE_STACK),
    Arch::moe("OlmoeForCausalLM", "olmoe", Family::Olmoe, QWEN_COUNTS, "mlp.experts", MOE_STACK),
    Arch::moe("DeepseekV2ForCausalLM", "deepseek2", Family::Deepseek2, &["n_routed_experts"], "mlp.experts", MOE_STACK),
    Arch::moe("DeepseekV3ForCausalLM", "deepseek2", Family::Deepseek2, &["n_routed_experts"], "mlp.experts", MOE_STACK),
    Arch {
        // gpt-oss has no ffn_norm: the post-attention norm is ATTN_POST_NORM. Its experts come fused
        // (`gate_up_proj`, `down_proj`) or as MXFP4 blocks, handled in the planner.
        layer_overrides: &[("post_attention_layernorm", "post_attention_norm")],
        ..Arch::moe("GptOssForCausalLM", "gpt-oss", Family::GptOss, QWEN_COUNTS, "", &[])
    },
];

/// HF tensor stems inside `model.layers.{bid}.` → GGUF names inside `blk.{bid}.`
/// (`gguf-py/gguf/tensor_mapping.py`, restricted to what the architectures above use).
pub static LAYER_MAP: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("self_attn.sinks", "attn_sinks"),
    ("self_attn.q_a_proj", "attn_q_a"),
    ("self_attn.q_a_layernorm", "attn_q_a_norm"),
    ("self_attn.q_b_proj", "attn_q_b"),
    ("self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"),
    ("self_attn.kv_a_layernorm", "attn_kv_a_norm"),
    ("self_attn.k_b_proj", "attn_k_b"),
    ("self_attn.v_b_proj", "attn_v_b"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("block_sparse_moe.gate", "ffn_gate_inp"),
    ("mlp.gate", "ffn_gate_inp"),
    ("mlp.router", "ffn_gate_inp"),
    ("mlp.gate.e_score_correction", "exp_probs_b"),
    ("mlp.experts.gate_proj", "ffn_gate_exps"),
    ("mlp.experts.up_proj", "ffn_up_exps"),
    ("mlp.experts.down_proj", "ffn_down_exps"),
    ("feed_forward.experts.w1", "ffn_gate_exps"),
    ("feed_forward.experts.w2", "ffn_down_exps"),
    ("feed_forward.experts.w3", "ffn_up_exps"),
    ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"),
    ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
    ("mlp.shared_expert.down_proj", "ffn_down_shexp"),
    ("mlp.shared_experts.gate_proj", "ffn_gate_shexp"),
    ("mlp.shared_experts.up_proj", "ffn_up_shexp"),
    ("mlp.shared_experts.down_proj", "ffn_down_shexp"),
    ("mlp.shared_expert_gate", "ffn_gate_inp_shexp"),
];

/// Tensors outside the layers.
pub static GLOBAL_MAP: &[(&str, &str)] =
    &[("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output")];

/// GGUF tensors kept in F32 whatever the output type (`prepare_tensors` keep-list).
pub static KEEP_F32: &[&str] = &["ffn_gate_inp", "ffn_gate_inp_shexp"];

/// Looks up the architecture for an HF class name.
pub fn find(hf: &str) -> Option<&'static Arch> {
    ARCHS.iter().find(|a| a.hf == hf)
}

/// The HF class names sling supports, for error messages.
pub fn supported() -> Vec<&'static str> {
    ARCHS.iter().map(|a| a.hf).collect()
}

impl Arch {
    /// Maps an HF name (with `.weight`/`.bias` suffix) to its GGUF name.
    pub fn map_name(&self, hf: &str) -> Option<String> {
        let (stem, suffix) = match hf.rsplit_once('.') {
            Some((s, x @ ("weight" | "bias"))) => (s, x),
            _ => (hf, ""),
        };
        let dot = if suffix.is_empty() { "" } else { "." };
        if let Some(rest) = stem.strip_prefix("model.layers.") {
            let (bid, inner) = rest.split_once('.')?;
            bid.parse::<u64>().ok()?;
            let g = self.layer_overrides.iter().chain(LAYER_MAP.iter()).find(|(h, _)| *h == inner).map(|(_, g)| *g)?;
            return Some(format!("blk.{bid}.{g}{dot}{suffix}"));
        }
        GLOBAL_MAP.iter().find(|(h, _)| *h == stem).map(|(_, g)| format!("{g}{dot}{suffix}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_common_names() {
        let a = find("Qwen2MoeForCausalLM").unwrap();
        assert_eq!(a.map_name("model.layers.3.self_attn.q_proj.bias").unwrap(), "blk.3.attn_q.bias");
        assert_eq!(a.map_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(a.map_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(
            a.map_name("model.layers.0.mlp.shared_expert_gate.weight").unwrap(),
            "blk.0.ffn_gate_inp_shexp.weight"
        );
        assert!(a.map_name("model.layers.0.unknown.weight").is_none());
        let g = find("GptOssForCausalLM").unwrap();
        assert_eq!(
            g.map_name("model.layers.1.post_attention_layernorm.weight").unwrap(),
            "blk.1.post_attention_norm.weight"
        );
        let d = find("DeepseekV3ForCausalLM").unwrap();
        assert_eq!(d.map_name("model.layers.1.mlp.gate.e_score_correction.bias").unwrap(), "blk.1.exp_probs_b.bias");
    }
}

/// What a tensor does in the model; used by `inspect` (and by quantization recipes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Embeddings,
    Attention,
    Router,
    RoutedExperts,
    SharedExperts,
    DenseFfn,
    Norms,
    Output,
    Other,
}

impl Role {
    pub const ALL: [Role; 9] = [
        Role::Embeddings,
        Role::Attention,
        Role::Router,
        Role::RoutedExperts,
        Role::SharedExperts,
        Role::DenseFfn,
        Role::Norms,
        Role::Output,
        Role::Other,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Role::Embeddings => "embeddings",
            Role::Attention => "attention",
            Role::Router => "router",
            Role::RoutedExperts => "routed_experts",
            Role::SharedExperts => "shared_experts",
            Role::DenseFfn => "dense_ffn",
            Role::Norms => "norms",
            Role::Output => "output",
            Role::Other => "other",
        }
    }
}

/// Substring → role, first match wins; covers HF names and GGUF names.
static ROLE_PATTERNS: &[(&str, Role)] = &[
    ("shared_expert_gate", Role::Router),
    ("ffn_gate_inp", Role::Router),
    ("exp_probs_b", Role::Router),
    ("e_score_correction", Role::Router),
    ("block_sparse_moe.gate.", Role::Router),
    ("mlp.gate.", Role::Router),
    ("mlp.router", Role::Router),
    ("shared_expert", Role::SharedExperts),
    ("_shexp", Role::SharedExperts),
    ("experts", Role::RoutedExperts),
    ("_exps", Role::RoutedExperts),
    ("norm", Role::Norms),
    ("embed_tokens", Role::Embeddings),
    ("token_embd", Role::Embeddings),
    ("lm_head", Role::Output),
    ("output.", Role::Output),
    ("self_attn", Role::Attention),
    ("attn_", Role::Attention),
    ("mlp.", Role::DenseFfn),
    ("ffn_", Role::DenseFfn),
];

/// The role of an HF or GGUF tensor name.
pub fn role_of(name: &str) -> Role {
    ROLE_PATTERNS.iter().find(|(p, _)| name.contains(p)).map(|(_, r)| *r).unwrap_or(Role::Other)
}
