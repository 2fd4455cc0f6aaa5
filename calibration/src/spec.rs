//! A model's forward-pass description, read from `config.json`: which attention, norms, rope,
//! router and FFN each layer has. Everything architecture-specific that is not a tensor lives here,
//! as data; the maths in [`crate::model`] only follows it.
//!
//! Facts: the `transformers` 5.24 modeling code of each architecture (`modeling_<arch>.py`).

use sling_core::ModelConfig;
use sling_target_gguf::convert::arch::{self, Arch};

use crate::error::{Error, Result};
use crate::rope::Rope;

/// Query/key normalisation before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (`head_dim` wide): Qwen3-MoE.
    PerHead,
    /// RMSNorm over the whole projection (`heads * head_dim` wide): OLMoE.
    Full,
}

/// Attention kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Attention {
    /// Grouped-query attention (`q_proj`/`k_proj`/`v_proj`/`o_proj`, biases when present).
    Gqa { qk_norm: QkNorm, clip_qkv: Option<f32>, sinks: bool },
    /// DeepSeek multi-head latent attention.
    Mla { q_lora_rank: Option<usize>, kv_lora_rank: usize, qk_nope: usize, qk_rope: usize, v_head_dim: usize },
}

/// How router logits become expert weights.
#[derive(Clone, Debug, PartialEq)]
pub enum Router {
    /// softmax over all experts (float32), top-k, optionally renormalised to sum 1 (Mixtral always;
    /// Qwen-MoE/OLMoE with `norm_topk_prob`).
    SoftmaxTopK { renorm: bool },
    /// top-k of the logits, softmax over those k (gpt-oss; its router has a bias).
    TopKSoftmax,
    /// DeepSeek-V2: softmax, `greedy` or `group_limited_greedy` top-k (groups ranked by their best
    /// expert), times `routed_scaling_factor` (transformers applies no renormalisation here).
    DeepseekV2 { group_limited: bool, n_group: usize, topk_group: usize, scale: f32 },
    /// DeepSeek-V3: sigmoid; choice by score + `e_score_correction_bias` within the `topk_group`
    /// best groups (ranked by the sum of their two best); weights are the plain sigmoid scores,
    /// renormalised with `norm_topk_prob` (+1e-20), times `routed_scaling_factor`.
    DeepseekV3 { n_group: usize, topk_group: usize, renorm: bool, scale: f32 },
}

/// Gated activation of the FFN.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// `silu(gate) * up`.
    Silu,
    /// gpt-oss: `gate.clamp(max=limit)`, `up.clamp(-limit, limit)`, `(up + 1) * gate * sigmoid(alpha * gate)`.
    GptOss { alpha: f32, limit: f32 },
}

/// Where a layer's routed experts are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One tensor per expert and projection: `{prefix}.{e}.{gate,up,down}.weight` (names from the arch table).
    PerExpert,
    /// gpt-oss: stacked `gate_up_proj` `[E, in, 2*ff]` (gate/up interleaved) + `down_proj` `[E, ff, in]`
    /// with biases, or the same as MXFP4 blocks (`[E, out, in]`).
    GptOss,
}

/// A layer's mixture of experts.
#[derive(Clone, Debug, PartialEq)]
pub struct Moe {
    pub n_experts: usize,
    pub top_k: usize,
    pub ff: usize,
    pub router: Router,
    /// Shared-expert width, if any.
    pub shared_ff: Option<usize>,
    /// Qwen2-MoE: the shared expert's output is scaled by `sigmoid(shared_expert_gate(x))`.
    pub shared_gate: bool,
    /// The shared expert's HF stem inside a layer (`mlp.shared_expert` or `mlp.shared_experts`).
    pub shared_stem: &'static str,
    pub layout: ExpertLayout,
}

/// A layer's feed-forward part.
#[derive(Clone, Debug, PartialEq)]
pub enum Ffn {
    Dense { ff: usize },
    Moe(Moe),
}

/// The forward-pass description of a model.
#[derive(Debug)]
pub struct Spec {
    /// The converter's table entry (HF class, GGUF architecture and tensor-name map).
    pub arch: &'static Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// GQA head width (unused for MLA).
    pub head_dim: usize,
    pub eps: f32,
    pub attention: Attention,
    /// Softmax scale of the attention scores.
    pub attn_scale: f32,
    pub rope: Rope,
    /// Sliding window per layer (keys at distance < window are visible).
    pub windows: Vec<Option<usize>>,
    pub ffn: Vec<Ffn>,
    pub act: Act,
    /// `tie_word_embeddings`: `lm_head` is `embed_tokens` when the checkpoint has no `lm_head.weight`.
    pub tied: bool,
    /// Per-expert tensor names: (HF stem prefix between `model.layers.N.` and `.{e}.`, [gate, up, down] names).
    pub expert_names: (&'static str, [&'static str; 3]),
    /// The router's HF stem inside a layer.
    pub router_stem: &'static str,
}

fn usize_of(cfg: &ModelConfig, keys: &[&str]) -> Result<Option<usize>> {
    Ok(cfg.find_u64(keys)?.map(|v| v as usize))
}

fn req(cfg: &ModelConfig, keys: &[&str]) -> Result<usize> {
    Ok(cfg.req_u64(keys)? as usize)
}

fn f32_or(cfg: &ModelConfig, key: &str, default: f32) -> Result<f32> {
    Ok(cfg.find_f64(&[key])?.map(|v| v as f32).unwrap_or(default))
}

impl Spec {
    pub fn from_config(cfg: &ModelConfig) -> Result<Spec> {
        let hf = cfg.architecture()?;
        let arch = arch::find(hf).ok_or_else(|| {
            Error::Unsupported(format!("architecture {hf} (supported: {})", arch::supported().join(", ")))
        })?;
        let n_layers = req(cfg, &["num_hidden_layers"])?;
        let hidden = req(cfg, &["hidden_size"])?;
        let vocab = req(cfg, &["vocab_size"])?;
        let n_heads = req(cfg, &["num_attention_heads"])?;
        let n_kv_heads = usize_of(cfg, &["num_key_value_heads"])?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(Error::BadConfig(format!("{n_heads} attention heads for {n_kv_heads} key/value heads")));
        }
        let head_dim = usize_of(cfg, &["head_dim"])?.unwrap_or(hidden / n_heads);
        let eps = f32_or(cfg, "rms_norm_eps", 1e-6)?;
        let tied = cfg.get_bool("tie_word_embeddings").unwrap_or(false);
        let max_pos = cfg.find_u64(&["max_position_embeddings"])?;
        let inter = usize_of(cfg, &["intermediate_size"])?;
        let n_experts = arch
            .expert_count_keys
            .is_empty()
            .then_some(0)
            .map_or_else(|| usize_of(cfg, arch.expert_count_keys).map(|n| n.unwrap_or(0)), Ok)?;
        let top_k = usize_of(cfg, &["num_experts_per_tok"])?.unwrap_or(0);
        let norm_topk = cfg.get_bool("norm_topk_prob");

        // sliding windows: layer_types when present; otherwise Mistral/Mixtral/Qwen3-MoE apply
        // config.sliding_window to every layer (Qwen3-MoE only with use_sliding_window).
        let sw = usize_of(cfg, &["sliding_window"])?.filter(|&w| w > 0);
        let layer_types: Option<Vec<String>> = cfg
            .get("layer_types")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|t| t.as_str().unwrap_or("").to_string()).collect());
        let all_layers_window = match hf {
            "MistralForCausalLM" | "MixtralForCausalLM" => sw,
            "Qwen3MoeForCausalLM" => sw.filter(|_| cfg.get_bool("use_sliding_window").unwrap_or(false)),
            _ => None,
        };
        let windows: Vec<Option<usize>> = (0..n_layers)
            .map(|l| match &layer_types {
                Some(t) => sw.filter(|_| t.get(l).map(String::as_str) == Some("sliding_attention")),
                None => all_layers_window,
            })
            .collect();

        let need = |what: &str, v: Option<usize>| v.ok_or_else(|| Error::BadConfig(format!("missing {what}")));
        let rope_params = cfg.rope();
        let moe_all = |ff: usize, router: Router| Moe {
            n_experts,
            top_k,
            ff,
            router,
            shared_ff: None,
            shared_gate: false,
            shared_stem: "mlp.shared_experts",
            layout: ExpertLayout::PerExpert,
        };
        let gqa = Attention::Gqa { qk_norm: QkNorm::None, clip_qkv: None, sinks: false };
        let mut act = Act::Silu;
        let mut expert_names = ("mlp.experts", ["gate_proj", "up_proj", "down_proj"]);
        let mut router_stem = "mlp.gate";
        let (attention, ffn, rope, attn_scale) = match hf {
            "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" => {
                let ff = need("intermediate_size", inter)?;
                (gqa, vec![Ffn::Dense { ff }; n_layers], None, None)
            }
            "MixtralForCausalLM" => {
                expert_names = ("block_sparse_moe.experts", ["w1", "w3", "w2"]);
                router_stem = "block_sparse_moe.gate";
                let ff = need("intermediate_size", inter)?;
                (gqa, vec![Ffn::Moe(moe_all(ff, Router::SoftmaxTopK { renorm: true })); n_layers], None, None)
            }
            "Qwen2MoeForCausalLM" | "Qwen3MoeForCausalLM" | "OlmoeForCausalLM" => {
                let moe_ff = if hf == "OlmoeForCausalLM" {
                    need("intermediate_size", inter)?
                } else {
                    need("moe_intermediate_size", usize_of(cfg, &["moe_intermediate_size"])?)?
                };
                let mut moe = moe_all(moe_ff, Router::SoftmaxTopK { renorm: norm_topk.unwrap_or(false) });
                if hf == "Qwen2MoeForCausalLM" {
                    moe.shared_ff = usize_of(cfg, &["shared_expert_intermediate_size"])?.filter(|&s| s > 0);
                    moe.shared_gate = moe.shared_ff.is_some();
                    moe.shared_stem = "mlp.shared_expert";
                }
                // Qwen-MoE: mlp_only_layers and decoder_sparse_step choose the MoE layers.
                let mlp_only: Vec<u64> = cfg
                    .get("mlp_only_layers")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
                let step = usize_of(cfg, &["decoder_sparse_step"])?.unwrap_or(1).max(1);
                let ffn = (0..n_layers)
                    .map(|l| {
                        let sparse = hf == "OlmoeForCausalLM"
                            || (!mlp_only.contains(&(l as u64)) && n_experts > 0 && (l + 1) % step == 0);
                        if sparse {
                            Ok(Ffn::Moe(moe.clone()))
                        } else {
                            Ok(Ffn::Dense { ff: need("intermediate_size", inter)? })
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let attention = match hf {
                    "Qwen3MoeForCausalLM" => Attention::Gqa { qk_norm: QkNorm::PerHead, clip_qkv: None, sinks: false },
                    "OlmoeForCausalLM" => Attention::Gqa {
                        qk_norm: QkNorm::Full,
                        clip_qkv: cfg.find_f64(&["clip_qkv"])?.map(|c| c as f32),
                        sinks: false,
                    },
                    _ => gqa,
                };
                (attention, ffn, None, None)
            }
            "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM" => {
                let v3 = hf == "DeepseekV3ForCausalLM";
                let qk_nope = req(cfg, &["qk_nope_head_dim"])?;
                let qk_rope = req(cfg, &["qk_rope_head_dim"])?;
                let attention = Attention::Mla {
                    q_lora_rank: usize_of(cfg, &["q_lora_rank"])?,
                    kv_lora_rank: req(cfg, &["kv_lora_rank"])?,
                    qk_nope,
                    qk_rope,
                    v_head_dim: req(cfg, &["v_head_dim"])?,
                };
                let scale = f32_or(cfg, "routed_scaling_factor", if v3 { 2.5 } else { 1.0 })?;
                let n_group = usize_of(cfg, &["n_group"])?.unwrap_or(1).max(1);
                let topk_group = usize_of(cfg, &["topk_group"])?.unwrap_or(n_group).max(1);
                let router = if v3 {
                    Router::DeepseekV3 { n_group, topk_group, renorm: norm_topk.unwrap_or(true), scale }
                } else {
                    let method = cfg.get_str("topk_method").unwrap_or("greedy");
                    let group_limited = match method {
                        "greedy" => false,
                        "group_limited_greedy" => true,
                        m => return Err(Error::Unsupported(format!("DeepSeek-V2 topk_method {m:?}"))),
                    };
                    Router::DeepseekV2 { group_limited, n_group, topk_group, scale }
                };
                let moe_ff = req(cfg, &["moe_intermediate_size"])?;
                let n_shared = usize_of(cfg, &["n_shared_experts"])?.unwrap_or(0);
                let mut moe = moe_all(moe_ff, router);
                moe.shared_ff = (n_shared > 0).then_some(moe_ff * n_shared);
                let first_dense = usize_of(cfg, &["first_k_dense_replace"])?.unwrap_or(0);
                let ffn = (0..n_layers)
                    .map(|l| {
                        if l >= first_dense {
                            Ok(Ffn::Moe(moe.clone()))
                        } else {
                            Ok(Ffn::Dense { ff: need("intermediate_size", inter)? })
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let interleaved = !v3 || cfg.get_bool("rope_interleave").unwrap_or(true);
                let rope = Rope::from_params(rope_params, qk_rope, max_pos, interleaved)?;
                // yarn_apply_mscale: qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2
                let mut s = ((qk_nope + qk_rope) as f64).powf(-0.5);
                let rt = rope_params.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
                if rt != "default" {
                    let ma = rope_params.get("mscale_all_dim").and_then(|v| v.as_f64()).unwrap_or(0.0);
                    if ma != 0.0 {
                        let factor = rope_params.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0);
                        let m = if factor <= 1.0 { 1.0 } else { 0.1 * ma * factor.ln() + 1.0 };
                        s *= m * m;
                    }
                }
                (attention, ffn, Some(rope), Some(s as f32))
            }
            "GptOssForCausalLM" => {
                act = Act::GptOss {
                    alpha: f32_or(cfg, "swiglu_alpha", 1.702)?,
                    limit: f32_or(cfg, "swiglu_limit", 7.0)?,
                };
                router_stem = "mlp.router";
                let ff = need("intermediate_size", inter)?;
                let mut moe = moe_all(ff, Router::TopKSoftmax);
                moe.layout = ExpertLayout::GptOss;
                let attention = Attention::Gqa { qk_norm: QkNorm::None, clip_qkv: None, sinks: true };
                (attention, vec![Ffn::Moe(moe); n_layers], None, None)
            }
            other => return Err(Error::Unsupported(format!("architecture {other}"))),
        };
        if let Some(Ffn::Moe(m)) = ffn.iter().find(|f| matches!(f, Ffn::Moe(_))) {
            if m.n_experts == 0 || m.top_k == 0 || m.top_k > m.n_experts {
                return Err(Error::BadConfig(format!("{} experts, {} per token", m.n_experts, m.top_k)));
            }
            if let Router::DeepseekV3 { n_group, topk_group, .. } | Router::DeepseekV2 { n_group, topk_group, .. } =
                m.router
            {
                if m.n_experts % n_group != 0 || topk_group > n_group {
                    return Err(Error::BadConfig(format!(
                        "{} experts in {n_group} groups, top {topk_group} groups",
                        m.n_experts
                    )));
                }
                if matches!(m.router, Router::DeepseekV3 { .. }) && (m.n_experts / n_group < 2 && n_group > 1) {
                    return Err(Error::BadConfig("DeepSeek-V3 group routing needs >= 2 experts per group".into()));
                }
            }
        }
        let rope = match rope {
            Some(r) => r,
            None => Rope::from_params(rope_params, head_dim, max_pos, false)?,
        };
        let attn_scale = attn_scale.unwrap_or((head_dim as f32).powf(-0.5));
        Ok(Spec {
            arch,
            n_layers,
            hidden,
            vocab,
            n_heads,
            n_kv_heads,
            head_dim,
            eps,
            attention,
            attn_scale,
            rope,
            windows,
            ffn,
            act,
            tied,
            expert_names,
            router_stem,
        })
    }

    /// The GGUF name of routed-expert projection `which` (0 gate, 1 up, 2 down) of `layer`.
    pub fn expert_gguf_name(&self, layer: usize, which: usize) -> String {
        const FALLBACK: [&str; 3] = ["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"];
        let w = self.expert_names.1[which];
        let stem = self.arch.expert_weights.iter().find(|(n, _)| *n == w).map_or(FALLBACK[which], |(_, s)| *s);
        self.gguf_name(layer, stem)
    }

    /// The GGUF name of HF tensor `model.layers.{layer}.{stem}.weight` (the converter's map), or the
    /// HF name itself when the converter has no GGUF name for it.
    pub fn gguf_name(&self, layer: usize, stem: &str) -> String {
        let hf = format!("model.layers.{layer}.{stem}.weight");
        self.arch.map_name(&hf).unwrap_or(hf)
    }
}
