//! What a tensor is for (routed experts, attention, router, ...), from its Hugging Face or GGUF name: what
//! recipes and targets select on, and what manifests and model cards record. One type for every crate.

/// What a tensor is for, from its GGUF name: what recipes select on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `ffn_{gate,up,down}_exps`: the routed experts (most of an MoE model's parameters).
    RoutedExperts,
    /// `ffn_*_shexp`: shared experts.
    SharedExperts,
    /// `ffn_gate_inp*`, `exp_probs_b`: the router (never quantized).
    Router,
    /// `attn_*`: attention projections (MLA included).
    Attention,
    /// `token_embd`.
    Embeddings,
    /// `output.weight`.
    Output,
    /// `ffn_{gate,up,down}.weight`: dense FFN (dense models, and DeepSeek's leading dense layers).
    DenseFfn,
    /// Norms and everything else.
    Other,
}

impl Role {
    /// The role of a tensor from its Hugging Face (checkpoint) name and number of dimensions.
    pub fn of_hf(name: &str, n_dims: usize) -> Role {
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        if n_dims < 2 || module.ends_with("norm") || module.contains("layernorm") {
            return Role::Other;
        }
        if module.ends_with(".mlp.gate")
            || module.ends_with("block_sparse_moe.gate")
            || module.ends_with(".router")
            || module.ends_with("shared_expert_gate")
            || name.contains("e_score_correction")
        {
            Role::Router
        } else if module.contains("shared_expert") {
            Role::SharedExperts
        } else if module.contains(".experts.") || module.contains(".switch_mlp.") {
            Role::RoutedExperts
        } else if module.contains("self_attn.") || module.contains(".attention.") {
            Role::Attention
        } else if module.ends_with("embed_tokens") || module.ends_with("wte") {
            Role::Embeddings
        } else if module == "lm_head" || module.ends_with(".lm_head") {
            Role::Output
        } else if module.contains(".mlp.") {
            Role::DenseFfn
        } else {
            Role::Other
        }
    }

    /// The role of a tensor from its GGUF name.
    pub fn of(name: &str) -> Role {
        if name.contains("ffn_gate_inp") || name.contains("exp_probs_b") {
            Role::Router
        } else if name.contains("_exps") {
            Role::RoutedExperts
        } else if name.contains("_shexp") {
            Role::SharedExperts
        } else if name.contains("_norm") {
            Role::Other
        } else if name.contains(".attn_") {
            Role::Attention
        } else if name.starts_with("token_embd") {
            Role::Embeddings
        } else if name == "output.weight" {
            Role::Output
        } else if name.contains(".ffn_") {
            Role::DenseFfn
        } else {
            Role::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_names() {
        assert_eq!(Role::of("blk.3.ffn_down_exps.weight"), Role::RoutedExperts);
        assert_eq!(Role::of("blk.3.ffn_up_shexp.weight"), Role::SharedExperts);
        assert_eq!(Role::of("blk.3.ffn_gate_inp.weight"), Role::Router);
        assert_eq!(Role::of("blk.3.ffn_gate_inp_shexp.weight"), Role::Router);
        assert_eq!(Role::of("blk.3.attn_kv_a_mqa.weight"), Role::Attention);
        assert_eq!(Role::of("blk.3.attn_norm.weight"), Role::Other);
        assert_eq!(Role::of("blk.0.ffn_down.weight"), Role::DenseFfn);
        assert_eq!(Role::of("token_embd.weight"), Role::Embeddings);
        assert_eq!(Role::of("output.weight"), Role::Output);
    }
}
