//! Architecture metadata keys, in the order and with the types the reference converter writes
//! them (`TextModel.set_gguf_parameters` and the per-architecture overrides; gguf-spec §5.2).

use serde_json::Value;
use sling_core::{ConfigError, ModelConfig};

use super::arch::{Arch, Family};
use sling_formats::gguf::GgufValue;

/// An ordered KV list with the reference writer's semantics: setting an existing key replaces the
/// value in place (the key keeps its position).
#[derive(Clone, Debug, Default)]
pub struct Kvs(pub Vec<(String, GgufValue)>);

impl Kvs {
    pub fn set(&mut self, key: impl Into<String>, v: GgufValue) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = v,
            None => self.0.push((key, v)),
        }
    }
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn extend(&mut self, kvs: impl IntoIterator<Item = (String, GgufValue)>) {
        for (k, v) in kvs {
            self.set(k, v);
        }
    }
}

fn u32_of(key: &str, v: &Value) -> Result<GgufValue, ConfigError> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .map(GgufValue::U32)
        .ok_or_else(|| ConfigError::BadValue { key: key.into(), value: v.to_string() })
}

fn f32_of(key: &str, v: &Value) -> Result<GgufValue, ConfigError> {
    v.as_f64()
        .map(|x| GgufValue::F32(x as f32))
        .ok_or_else(|| ConfigError::BadValue { key: key.into(), value: v.to_string() })
}

/// `gguf.ExpertGatingFuncType`.
fn gating_func(arch: &Arch, cfg: &ModelConfig) -> Result<Option<u32>, ConfigError> {
    let keys = [
        "score_function",
        "scoring_func",
        "score_func",
        "moe_router_activation",
        "moe_router_activation_func",
        "expert_selection_fn",
    ];
    match cfg.find(&keys) {
        Some(Value::String(s)) => match s.as_str() {
            "softmax" => Ok(Some(1)),
            "sigmoid" => Ok(Some(2)),
            "sqrtsoftplus" => Ok(Some(4)),
            other => Err(ConfigError::BadValue { key: "scoring_func".into(), value: other.into() }),
        },
        Some(v) => Err(ConfigError::BadValue { key: "scoring_func".into(), value: v.to_string() }),
        // DeepSeek-V3 configs saved by transformers drop `scoring_func` because its modeling code
        // hard-codes sigmoid routing; the reference then writes nothing and llama.cpp silently
        // routes with softmax (KL ~0.4). sling writes what the architecture computes.
        None if arch.hf == "DeepseekV3ForCausalLM" => Ok(Some(2)),
        None => Ok(None),
    }
}

/// Architecture keys after `general.*` (base keys, then the subclass's), ending like the
/// reference with `general.file_type` inside the base list.
pub fn arch_kvs(arch: &Arch, cfg_in: &ModelConfig, file_type: u32, kvs: &mut Kvs) -> Result<(), ConfigError> {
    let mut cfg = cfg_in.clone();
    let a = arch.gguf;
    if arch.family == Family::Deepseek2 {
        // MLA is written as MQA; the converter overrides these before the base method.
        cfg.set("num_key_value_heads", Value::from(1));
        if cfg.get("rms_norm_eps").is_none() {
            cfg.set("rms_norm_eps", Value::from(1e-6));
        }
    }
    let block_count = cfg.req_u64(&["n_layers", "num_hidden_layers", "n_layer", "num_layers"])?;
    kvs.set(format!("{a}.block_count"), GgufValue::U32(block_count as u32));
    let base_u32: [(&str, &[&str]); 5] = [
        (
            "context_length",
            &[
                "max_position_embeddings",
                "n_ctx",
                "n_positions",
                "max_length",
                "max_sequence_length",
                "model_max_length",
            ],
        ),
        ("embedding_length", &["hidden_size", "n_embd", "dim"]),
        (
            "feed_forward_length",
            &[
                "prefix_dense_intermediate_size",
                "dense_intermediate_size",
                "intermediate_size",
                "n_inner",
                "hidden_dim",
            ],
        ),
        ("attention.head_count", &["num_attention_heads", "n_head", "n_heads"]),
        ("attention.head_count_kv", &["num_key_value_heads", "n_kv_heads"]),
    ];
    for (k, keys) in base_u32 {
        if let Some(v) = cfg.find(keys) {
            kvs.set(format!("{a}.{k}"), u32_of(keys[0], v)?);
        }
    }
    if cfg.get_bool("is_causal") == Some(false) {
        kvs.set(format!("{a}.attention.causal"), GgufValue::Bool(false));
    }
    let rope = cfg.rope().clone();
    let rp = |k: &str| rope.get(k).filter(|v| !v.is_null());
    if let Some(Value::String(rt)) = rp("rope_type") {
        let factor = rp("factor");
        match (rt.as_str(), factor) {
            ("linear", Some(f)) => {
                kvs.set(format!("{a}.rope.scaling.type"), GgufValue::String("linear".into()));
                kvs.set(format!("{a}.rope.scaling.factor"), f32_of("factor", f)?);
            }
            ("yarn", Some(f)) => {
                kvs.set(format!("{a}.rope.scaling.type"), GgufValue::String("yarn".into()));
                kvs.set(format!("{a}.rope.scaling.factor"), f32_of("factor", f)?);
                let orig = rp("original_max_position_embeddings")
                    .ok_or_else(|| ConfigError::Missing("rope_scaling.original_max_position_embeddings".into()))?;
                kvs.set(
                    format!("{a}.rope.scaling.original_context_length"),
                    u32_of("original_max_position_embeddings", orig)?,
                );
                if let Some(v) = rp("extrapolation_factor") {
                    kvs.set(format!("{a}.rope.scaling.yarn_ext_factor"), f32_of("extrapolation_factor", v)?);
                }
                if let Some(v) = rp("attention_factor").or_else(|| rp("attn_factor")) {
                    kvs.set(format!("{a}.rope.scaling.yarn_attn_factor"), f32_of("attention_factor", v)?);
                }
                if let Some(v) = rp("beta_fast") {
                    kvs.set(format!("{a}.rope.scaling.yarn_beta_fast"), f32_of("beta_fast", v)?);
                }
                if let Some(v) = rp("beta_slow") {
                    kvs.set(format!("{a}.rope.scaling.yarn_beta_slow"), f32_of("beta_slow", v)?);
                }
            }
            ("su" | "longrope", _) => {
                kvs.set(format!("{a}.rope.scaling.type"), GgufValue::String("longrope".into()));
            }
            _ => {}
        }
    }
    if let Some(v) = rp("rope_theta") {
        kvs.set(format!("{a}.rope.freq_base"), f32_of("rope_theta", v)?);
    }
    if let Some(v) = cfg.find(&["rms_norm_eps", "norm_eps"]) {
        kvs.set(format!("{a}.attention.layer_norm_rms_epsilon"), f32_of("rms_norm_eps", v)?);
    }
    if let Some(v) = cfg.find(&["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"]) {
        kvs.set(format!("{a}.attention.layer_norm_epsilon"), f32_of("layer_norm_eps", v)?);
    }
    if let Some(v) = cfg.find(&["num_local_experts", "num_experts", "n_routed_experts"]) {
        kvs.set(format!("{a}.expert_count"), u32_of("num_experts", v)?);
    }
    if let Some(v) = cfg.find(&["num_experts_per_tok", "num_experts_per_token", "top_k_experts"]) {
        kvs.set(format!("{a}.expert_used_count"), u32_of("num_experts_per_tok", v)?);
    }
    if let Some(v) = cfg.get("n_group") {
        kvs.set(format!("{a}.expert_group_count"), u32_of("n_group", v)?);
    }
    if let Some(v) = cfg.get("topk_group") {
        kvs.set(format!("{a}.expert_group_used_count"), u32_of("topk_group", v)?);
    }
    if let Some(g) = gating_func(arch, &cfg)? {
        kvs.set(format!("{a}.expert_gating_func"), GgufValue::U32(g));
    }
    if let Some(v) = cfg.get("head_dim") {
        kvs.set(format!("{a}.attention.key_length"), u32_of("head_dim", v)?);
        kvs.set(format!("{a}.attention.value_length"), u32_of("head_dim", v)?);
    }
    kvs.set("general.file_type", GgufValue::U32(file_type));

    match arch.family {
        Family::Llama => {
            kvs.set(
                format!("{a}.vocab_size"),
                u32_of("vocab_size", cfg.get("vocab_size").ok_or_else(|| ConfigError::Missing("vocab_size".into()))?)?,
            );
            let rope_dim = match cfg.get("head_dim") {
                Some(v) => {
                    v.as_u64().ok_or_else(|| ConfigError::BadValue { key: "head_dim".into(), value: v.to_string() })?
                }
                None => cfg.req_u64(&["hidden_size"])? / cfg.req_u64(&["num_attention_heads"])?.max(1),
            };
            kvs.set(format!("{a}.rope.dimension_count"), GgufValue::U32(rope_dim as u32));
        }
        Family::Qwen2 => {}
        Family::Qwen2Moe => {
            if let Some(v) = cfg.get("moe_intermediate_size") {
                kvs.set(format!("{a}.expert_feed_forward_length"), u32_of("moe_intermediate_size", v)?);
            }
            if let Some(v) = cfg.get("shared_expert_intermediate_size") {
                kvs.set(
                    format!("{a}.expert_shared_feed_forward_length"),
                    u32_of("shared_expert_intermediate_size", v)?,
                );
            }
        }
        Family::Olmoe => {
            kvs.set(format!("{a}.attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5));
        }
        Family::Deepseek2 => {
            let has_moe = cfg.get("n_routed_experts").is_some();
            let first_dense = match cfg.get("first_k_dense_replace") {
                Some(v) => v.as_u64().ok_or_else(|| ConfigError::BadValue {
                    key: "first_k_dense_replace".into(),
                    value: v.to_string(),
                })?,
                None if has_moe => 0,
                None => block_count,
            };
            kvs.set(format!("{a}.leading_dense_block_count"), GgufValue::U32(first_dense as u32));
            let kv_lora = cfg.find_u64(&["kv_lora_rank"])?.unwrap_or(512);
            kvs.set(format!("{a}.vocab_size"), GgufValue::U32(cfg.req_u64(&["vocab_size"])? as u32));
            if let Some(q) = cfg.find_u64(&["q_lora_rank"])? {
                kvs.set(format!("{a}.attention.q_lora_rank"), GgufValue::U32(q as u32));
            }
            let rope_dim = cfg.req_u64(&["qk_rope_head_dim"])?;
            let nope = cfg.req_u64(&["qk_nope_head_dim"])?;
            let v_head = cfg.req_u64(&["v_head_dim"])?;
            kvs.set(format!("{a}.attention.kv_lora_rank"), GgufValue::U32(kv_lora as u32));
            kvs.set(format!("{a}.attention.key_length"), GgufValue::U32((kv_lora + rope_dim) as u32));
            kvs.set(format!("{a}.attention.value_length"), GgufValue::U32(kv_lora as u32));
            kvs.set(format!("{a}.attention.key_length_mla"), GgufValue::U32((nope + rope_dim) as u32));
            kvs.set(format!("{a}.attention.value_length_mla"), GgufValue::U32(v_head as u32));
            let moe_ff = cfg.req_u64(&["moe_intermediate_size", "intermediate_size"])?;
            kvs.set(format!("{a}.expert_feed_forward_length"), GgufValue::U32(moe_ff as u32));
            if let Some(n) = cfg.find_u64(&["n_routed_experts"])? {
                kvs.set(format!("{a}.expert_count"), GgufValue::U32(n as u32));
            }
            let shared = cfg.find_u64(&["n_shared_experts"])?.unwrap_or(0);
            kvs.set(format!("{a}.expert_shared_count"), GgufValue::U32(shared as u32));
            if let Some(v) = cfg.get("routed_scaling_factor") {
                kvs.set(format!("{a}.expert_weights_scale"), f32_of("routed_scaling_factor", v)?);
            }
            if cfg.get_bool("norm_topk_prob") == Some(true) {
                kvs.set(format!("{a}.expert_weights_norm"), GgufValue::Bool(true));
            }
            kvs.set(format!("{a}.rope.dimension_count"), GgufValue::U32(rope_dim as u32));
            if let Some(m) = rp("mscale_all_dim") {
                let m = m
                    .as_f64()
                    .ok_or_else(|| ConfigError::BadValue { key: "mscale_all_dim".into(), value: m.to_string() })?;
                // [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: the reference writes 0.1 * mscale_all_dim
                // (computed in Python floats) and the loader divides by 0.1 again.
                kvs.set(format!("{a}.rope.scaling.yarn_log_multiplier"), GgufValue::F32((0.1 * m) as f32));
            }
        }
        Family::GptOss => {
            let sw = cfg.get("sliding_window").ok_or_else(|| ConfigError::Missing("sliding_window".into()))?;
            kvs.set(format!("{a}.attention.sliding_window"), u32_of("sliding_window", sw)?);
            let ff = cfg.get("intermediate_size").ok_or_else(|| ConfigError::Missing("intermediate_size".into()))?;
            kvs.set(format!("{a}.expert_feed_forward_length"), u32_of("intermediate_size", ff)?);
        }
    }
    Ok(())
}
