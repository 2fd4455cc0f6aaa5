//! Planning on the committed fixtures: names, encodings and kept weights as docs/vllm.md and docs/mlx.md say.

use std::path::{Path, PathBuf};

use sling_core::DType;
use sling_formats::checkpoint::Checkpoint;
use sling_targets::{mlx, vllm, TargetError};

fn fixture(name: &str) -> Checkpoint {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name);
    Checkpoint::open(&p).unwrap()
}

#[test]
fn vllm_mxfp4_quantizes_every_linear_and_keeps_the_rest() {
    let ck = fixture("qwen3moe");
    let p = vllm::plan(&ck, vllm::Scheme::Mxfp4, false).unwrap();
    let names: Vec<&str> = p.weights.iter().flat_map(|w| w.parts.iter().map(|t| t.name.as_str())).collect();
    assert!(names.contains(&"model.layers.0.mlp.experts.3.gate_proj.weight_packed"));
    assert!(names.contains(&"model.layers.0.mlp.experts.3.gate_proj.weight_scale"));
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.weight_packed"));
    // Routers, norms, embeddings and lm_head stay as they are.
    for kept in ["model.layers.0.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] {
        let w = p.weights.iter().find(|w| w.name == kept).unwrap();
        assert_eq!(w.enc, vllm::Enc::Keep(DType::BF16), "{kept}");
    }
    assert!(p.kept.is_empty());
}

#[test]
fn vllm_int_schemes_keep_rows_the_group_does_not_divide() {
    let ck = fixture("qwen3moe"); // 64-, 32- and 128-wide rows: only the 128-wide ones take group 128
    let p = vllm::plan(&ck, vllm::Scheme::W4A16 { symmetric: true }, false).unwrap();
    assert!(!p.kept.is_empty());
    assert!(p.kept.iter().all(|k| k.why.contains("group size 128")));
    let err = vllm::plan(&ck, vllm::Scheme::W4A16 { symmetric: true }, true).err().unwrap();
    assert!(matches!(err, TargetError::Strict { .. }), "{err}");
}

#[test]
fn vllm_scheme_no_tensor_can_take_is_an_error() {
    let ck = fixture("mixtral"); // hidden 64, ffn 32: nothing is 128 wide
    let err = vllm::plan(&ck, vllm::Scheme::W8A16, false).err().unwrap();
    assert!(matches!(err, TargetError::NothingToQuantize { .. }), "{err}");
}

#[test]
fn vllm_fp8_source_is_dequantized_and_scales_dropped() {
    let ck = fixture("deepseekv3-fp8");
    let p = vllm::plan(&ck, vllm::Scheme::Fp8Dynamic, false).unwrap();
    let names: Vec<&str> = p.weights.iter().flat_map(|w| w.parts.iter().map(|t| t.name.as_str())).collect();
    assert!(!names.iter().any(|n| n.ends_with("_scale_inv")));
    assert!(names.contains(&"model.layers.1.mlp.experts.0.down_proj.weight_scale"));
}

#[test]
fn mlx_stacks_experts_and_sets_routers_as_each_model_does() {
    // Mixtral has no quant_predicate: its router is quantized like any Linear (mlx_lm.convert).
    let ck = fixture("mixtral");
    let p = mlx::plan(&ck, mlx::Bits(4), 32, false).unwrap();
    let w = p
        .plan
        .weights
        .iter()
        .find(|w| w.name == "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight")
        .unwrap();
    assert_eq!(w.parts[0].shape[0], 8, "8 experts stacked");
    assert_eq!(w.parts[0].dtype, DType::U32);
    assert!(p.overrides.is_empty(), "{:?}", p.overrides);
    let router = p.plan.weights.iter().find(|w| w.name == "model.layers.0.block_sparse_moe.gate.weight").unwrap();
    assert!(matches!(router.enc, mlx::Enc::Affine { bits: 4, group: 32, .. }), "{:?}", router.enc);
    assert!(!p.plan.weights.iter().any(|w| w.name.contains(".experts.")));
    // Qwen3-MoE's quant_predicate: 8 bits, group 64.
    let p = mlx::plan(&fixture("qwen3moe"), mlx::Bits(4), 32, false).unwrap();
    assert_eq!(p.overrides.get("model.layers.0.mlp.gate"), Some(&(8, 64)));
}

#[test]
fn mlx_deepseek_v3_splits_kv_b_and_keeps_the_moe_gate() {
    let ck = fixture("deepseekv3"); // 4 heads, nope 16, v 16, rank 32
    let p = mlx::plan(&ck, mlx::Bits(4), 32, false).unwrap();
    let find = |n: &str| p.plan.weights.iter().find(|w| w.name == n);
    assert!(find("model.layers.1.self_attn.kv_b_proj.weight").is_none());
    let eq = find("model.layers.1.self_attn.embed_q.weight").unwrap();
    assert_eq!(eq.parts[0].shape, vec![4, 32, 16]);
    assert_eq!((eq.rows(), eq.cols()), (4 * 32, 16));
    assert!(matches!(eq.enc, mlx::Enc::Keep(DType::BF16)), "16 columns do not take group 32");
    let uo = find("model.layers.1.self_attn.unembed_out.weight").unwrap();
    assert_eq!(uo.parts[0].shape, vec![4, 16, 32 * 4 / 32]);
    assert!(matches!(find("model.layers.1.mlp.gate.weight").unwrap().enc, mlx::Enc::Keep(DType::BF16)));
    assert!(p.overrides.is_empty());
    // What GPTQ/AWQ cannot address by a checkpoint name (embed_q is kept here, so not among them).
    let r = mlx::unsolvable(&ck, &p);
    assert!(!r.is_empty() && r.iter().all(|(w, _)| w.name.ends_with(".self_attn.unembed_out.weight")));
}

#[test]
fn mlx_gpt_oss_mxfp4_experts_are_copied_in_mxfp4_mode() {
    let ck = fixture("gptoss-mxfp4"); // 4 experts, ff 32, hidden 64
    let p = mlx::plan(&ck, mlx::Bits(4), 32, false).unwrap();
    assert_eq!(p.mode, mlx::Mode::Mxfp4);
    let find = |n: &str| p.plan.weights.iter().find(|w| w.name == n).unwrap();
    let gate = find("model.layers.0.mlp.experts.gate_proj.weight");
    assert!(matches!(gate.enc, mlx::Enc::Raw { params } if params == 4 * 32 * 64), "{:?}", gate.enc);
    assert_eq!((gate.parts[0].dtype, gate.parts[0].shape.clone()), (DType::U32, vec![4, 32, 8]));
    let scales = find("model.layers.0.mlp.experts.up_proj.scales");
    assert_eq!((scales.parts[0].dtype, scales.parts[0].shape.clone()), (DType::U8, vec![4, 32, 2]));
    assert_eq!(find("model.layers.0.mlp.experts.gate_proj.bias").parts[0].shape, vec![4, 32]);
    assert_eq!(p.overrides.get("model.layers.0.mlp.router"), Some(&(8, 64)));
    // bf16 gpt-oss: the same layout, quantized affine.
    let p = mlx::plan(&fixture("gptoss"), mlx::Bits(4), 32, false).unwrap();
    assert_eq!(p.mode, mlx::Mode::Affine);
    let down = p.plan.weights.iter().find(|w| w.name == "model.layers.0.mlp.experts.down_proj.weight").unwrap();
    assert!(matches!(down.enc, mlx::Enc::Affine { .. }));
    assert_eq!(down.parts[0].shape, vec![4, 64, 32 * 4 / 32]);
}

#[test]
fn mlx_refuses_unknown_group_sizes_and_architectures() {
    let ck = fixture("qwen3moe");
    assert!(mlx::plan(&ck, mlx::Bits(4), 48, false).is_err());
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/llama");
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"llama\"", "\"phi3\"")).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = mlx::plan(&ck, mlx::Bits(4), 32, false).err().unwrap();
    assert!(matches!(&err, TargetError::Unsupported(m) if m.contains("phi3") && m.contains("gpt_oss")), "{err}");
}

#[test]
fn vllm_fp8_block_requantizes_fp8_sources_of_another_block_size() {
    // The fixture's FP8 blocks are 32×32; FP8_BLOCK is 128×128, so the weights are requantized (a 128×128 source
    // is copied as it is: cli/tests/targets.rs `deepseek_fp8_goes_to_fp8_block_without_requantizing`).
    let ck = fixture("deepseekv3-fp8");
    let p = vllm::plan(&ck, vllm::Scheme::Fp8Block, false).unwrap();
    let w = p.weights.iter().find(|w| w.name == "model.layers.1.mlp.experts.0.down_proj.weight").unwrap();
    assert!(matches!(w.enc, vllm::Enc::Fp8Block { .. }), "{:?}", w.enc);
    assert!(!p.weights.iter().any(|w| w.name.ends_with(".weight_scale")));
}

#[test]
fn nvfp4_fused_shards_share_one_amax_group() {
    use sling_pipeline::Target;
    let ck = fixture("qwen3moe");
    let p = vllm::plan(&ck, vllm::Scheme::Nvfp4, false).unwrap();
    let t = vllm::Vllm { scheme: vllm::Scheme::Nvfp4, solved: None, backend: None };
    let group = |n: &str| t.amax_group(p.weights.iter().find(|w| w.name == n).unwrap());
    let q = group("model.layers.0.self_attn.q_proj.weight");
    assert_eq!(q.as_deref(), Some("model.layers.0.self_attn.qkv"));
    assert_eq!(group("model.layers.0.self_attn.v_proj.weight"), q);
    assert_eq!(group("model.layers.0.self_attn.o_proj.weight"), None);
    let g = group("model.layers.0.mlp.experts.3.gate_proj.weight");
    assert_eq!(g.as_deref(), Some("model.layers.0.mlp.experts.3.gate_up"));
    assert_eq!(group("model.layers.0.mlp.experts.3.up_proj.weight"), g);
    assert_eq!(
        vllm::fused_group("model.layers.0.block_sparse_moe.experts.1.w3.weight").as_deref(),
        Some("model.layers.0.block_sparse_moe.experts.1.w13")
    );
}

/// A vLLM recipe on Mixtral: per-layer choices land on every weight of the layer, the config groups name what
/// vLLM asks for (expert 0's gate/up/down even where Mixtral stores w1/w2/w3), and a FusedMoE kept whole is in
/// `ignore` by its own name.
#[test]
fn vllm_recipe_groups_name_each_layer_as_vllm_looks_it_up() {
    let ck = fixture("mixtral");
    let s = vllm::Scheme::W4A16 { symmetric: true };
    let mut p = vllm::plan_in_groups(&ck, s, false, Some(32)).unwrap();
    let text =
        "bits = 4\ngroup_size = 32\n[[rule]]\nname = \"layers\\\\.0\\\\.block_sparse_moe\\\\.experts\"\nbits = 8\n\
                [[rule]]\nname = \"layers\\\\.1\\\\.block_sparse_moe\\\\.experts\"\nkeep = true\n";
    let r = sling_targets::recipe::RecipeFile::parse("t", text, &vllm::recipe::LIMITS).unwrap();
    vllm::recipe::apply("t", &r, &mut p, (4, 128), false).unwrap();
    let enc = |n: &str| p.weights.iter().find(|w| w.name == n).unwrap().enc.clone();
    assert!(
        matches!(enc("model.layers.0.block_sparse_moe.experts.5.w2.weight"), vllm::Enc::Int { args, .. } if args.bits == 8 && args.group == Some(32))
    );
    assert!(matches!(enc("model.layers.1.block_sparse_moe.experts.5.w2.weight"), vllm::Enc::Keep(_)));
    let cfg: serde_json::Value = serde_json::from_slice(&vllm::config_json(&ck, s, &p).unwrap()).unwrap();
    let q = &cfg["quantization_config"];
    let groups = q["config_groups"].as_object().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let g8 = groups.values().find(|g| g["weights"]["num_bits"] == 8).unwrap();
    let pat = g8["targets"][0].as_str().unwrap().strip_prefix("re:").unwrap();
    let re = regex::Regex::new(pat).unwrap();
    for m in ["w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"] {
        assert!(re.is_match(&format!("model.layers.0.block_sparse_moe.experts.0.{m}")), "{pat} {m}");
    }
    assert!(
        !re.is_match("model.layers.0.block_sparse_moe.gate")
            && !re.is_match("model.layers.10.block_sparse_moe.experts.0.w1")
    );
    let ignore: Vec<&str> = q["ignore"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(ignore.contains(&"model.layers.1.block_sparse_moe.experts"), "{ignore:?}");
    assert!(ignore.contains(&"model.layers.1.block_sparse_moe.experts.3.w2"), "{ignore:?}");
    // One layer split in two is refused.
    let split = "[[rule]]\nname = \"experts\\\\.\\\\d+\\\\.w2\"\nbits = 8\ngroup_size = 32\n";
    let r = sling_targets::recipe::RecipeFile::parse("s", split, &vllm::recipe::LIMITS).unwrap();
    let mut p = vllm::plan_in_groups(&ck, s, false, Some(32)).unwrap();
    let e = vllm::recipe::apply("s", &r, &mut p, (4, 32), false).unwrap_err().to_string();
    assert!(e.contains("as one layer (model.layers.0.block_sparse_moe.experts)"), "{e}");
}

/// The weights GPTQ/AWQ cannot take on the MLX target (mlx-lm's rearranged layouts), and `rows_as_stored`: what the
/// calibration forward pass computes with for them is exactly the artifact's values (the encoder's bytes,
/// dequantized), FP8 sources rounded to BF16 first as the encoder rounds them.
#[test]
fn mlx_unsolvable_weights_and_their_values_as_stored() {
    use sling_pipeline::Target;
    for (name, want) in [
        ("deepseekv3", &["self_attn.unembed_out.weight"][..]),
        ("deepseekv3-fp8", &["self_attn.unembed_out.weight"][..]),
        ("gptoss", &["mlp.experts.gate_proj.weight", "mlp.experts.up_proj.weight", "mlp.experts.down_proj.weight"][..]),
        ("gptoss-mxfp4", &[][..]),
        ("qwen3moe", &[][..]),
    ] {
        let ck = fixture(name);
        let p = mlx::plan(&ck, mlx::Bits(4), 32, false).unwrap();
        let un = mlx::unsolvable(&ck, &p);
        let layers = ck.config.as_ref().unwrap().req_u64(&["num_hidden_layers"]).unwrap() as usize;
        assert_eq!(un.len(), want.len() * layers, "{name}: {:?}", un.iter().map(|u| &u.0.name).collect::<Vec<_>>());
        for (w, why) in &un {
            assert!(want.iter().any(|s| w.name.ends_with(s)), "{name}: {}", w.name);
            assert!(why.contains("round"), "{why}");
            let mlx::Enc::Affine { bits, group, sd, .. } = w.enc.clone() else { panic!("{name}: {}", w.name) };
            let (rows, cols) = (w.rows(), w.cols() as usize);
            let got = mlx::rows_as_stored(&ck, w, 0, rows).unwrap();
            let mut vals = Vec::new();
            w.op.read(&ck, 0, rows, &mut vals).unwrap();
            let mut out = vec![Vec::new(); 3];
            mlx::Mlx::default().encode(w, 0, &vals, None, &mut out).unwrap();
            let packed: Vec<u32> = out[0].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
            let param = |b: &[u8]| -> Vec<f32> {
                use sling_quantizers::ct::ScaleDtype;
                match sd {
                    ScaleDtype::BF16 => {
                        b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                    }
                    ScaleDtype::F16 => {
                        b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                    }
                    _ => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                }
            };
            let (scales, biases) = (param(&out[1]), param(&out[2]));
            let (per_row, ng) = (cols * bits as usize / 32, cols / group);
            let mut want_vals = Vec::new();
            for r in 0..rows as usize {
                sling_quantizers::mlx::dequantize_affine_row(
                    &packed[r * per_row..(r + 1) * per_row],
                    bits,
                    group,
                    cols,
                    &scales[r * ng..(r + 1) * ng],
                    &biases[r * ng..(r + 1) * ng],
                    &mut want_vals,
                );
            }
            assert_eq!(got, want_vals, "{name} {}: the calibration pass's values are not the artifact's", w.name);
        }
    }
}
