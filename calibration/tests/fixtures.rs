//! The forward pass on every committed fixture: it runs, is consistent across batching and sources,
//! and names what it observes exactly as the converter names the GGUF tensors. (Parity with
//! transformers is tests/interop/test_forward.py.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use sling_calibration::{CheckpointSource, Error, LinearInput, MemSource, Model, Observer, SumSquares, TensorSource};
use sling_formats::checkpoint::Checkpoint;
use sling_target_gguf::convert::{plan, OutType};

const IDS: [u32; 16] = [342, 223, 83, 87, 296, 77, 264, 84, 328, 80, 305, 81, 90, 223, 76, 87];

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    v.sort();
    assert!(v.len() >= 15, "fixtures missing under {}", root.display());
    v
}

fn run(dir: &Path, seqs: &[Vec<u32>], obs: Option<&mut dyn Observer>) -> Result<Vec<Array2<f32>>, Error> {
    let ck = Checkpoint::open(dir).unwrap();
    let cfg = ck.config.clone().unwrap();
    let src = CheckpointSource::new(&ck);
    Model::new(&src, &cfg)?.logits(seqs, obs)
}

fn max_abs(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn every_fixture_runs_and_batches_consistently() {
    let a: Vec<u32> = IDS.to_vec();
    let b: Vec<u32> = IDS[3..10].iter().rev().copied().collect();
    for dir in fixtures() {
        let one = run(&dir, std::slice::from_ref(&a), None).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(one[0].shape(), [16, 384], "{}", dir.display());
        assert!(one[0].iter().all(|v| v.is_finite()), "{}", dir.display());
        let alone_b = run(&dir, std::slice::from_ref(&b), None).unwrap();
        let both = run(&dir, &[a.clone(), b.clone()], None).unwrap();
        assert!(max_abs(&both[0], &one[0]) < 1e-4, "{}: batch changes sequence 0", dir.display());
        assert!(max_abs(&both[1], &alone_b[0]) < 1e-4, "{}: batch changes sequence 1", dir.display());
    }
}

#[test]
fn sharded_and_f32_sources_read_the_same_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
    let seq = [IDS.to_vec()];
    let m = run(&root.join("mixtral"), &seq, None).unwrap();
    let ms = run(&root.join("mixtral-sharded"), &seq, None).unwrap();
    assert_eq!(m, ms);
    // llama-f32 is llama before bf16 rounding: close, not equal
    let l = run(&root.join("llama"), &seq, None).unwrap();
    let lf = run(&root.join("llama-f32"), &seq, None).unwrap();
    let d = max_abs(&l[0], &lf[0]);
    assert!(d > 0.0 && d < 0.5, "llama vs llama-f32: {d}");
}

/// Records names, and checks routed rows against their token lists.
#[derive(Default)]
struct Names {
    names: BTreeSet<String>,
    routed_rows: std::collections::BTreeMap<String, usize>,
    inner: SumSquares,
}

impl Observer for Names {
    fn linear_input(&mut self, x: &LinearInput<'_>) {
        assert!(x.n_cols > 0 && x.rows.len() % x.n_cols == 0, "{}", x.tensor);
        if let Some(t) = x.tokens {
            assert_eq!(t.len() * x.n_cols, x.rows.len(), "{}", x.tensor);
            assert!(x.expert.is_some(), "{}: tokens without an expert", x.tensor);
            *self.routed_rows.entry(x.tensor.to_string()).or_default() += t.len();
        }
        self.names.insert(x.tensor.to_string());
        self.inner.linear_input(x);
    }
}

#[test]
fn observed_names_are_the_converters_gguf_names() {
    for dir in fixtures() {
        let ck = Checkpoint::open(&dir).unwrap();
        let cfg = ck.config.clone().unwrap();
        let src = CheckpointSource::new(&ck);
        let model = Model::new(&src, &cfg).unwrap();
        let mut obs = Names::default();
        model.logits(&[IDS.to_vec()], Some(&mut obs)).unwrap();
        let planned: BTreeSet<String> = plan(&ck, OutType::F32).unwrap().tensors.into_iter().map(|t| t.name).collect();
        let unknown: Vec<&String> = obs.names.iter().filter(|n| !planned.contains(*n)).collect();
        assert!(unknown.is_empty(), "{}: observed names not in the GGUF: {unknown:?}", dir.display());
        // every 2-D+ weight of the GGUF that multiplies activations is observed
        let missed: Vec<&String> = planned
            .iter()
            .filter(|n| {
                n.ends_with(".weight") && !n.contains("norm") && !n.contains("token_embd") && !n.contains("sinks")
            })
            .filter(|n| !obs.names.contains(*n))
            .collect();
        assert!(missed.is_empty(), "{}: GGUF matrices never observed: {missed:?}", dir.display());
        let top_k = cfg.find_u64(&["num_experts_per_tok"]).unwrap().unwrap_or(0) as usize;
        for (name, rows) in &obs.routed_rows {
            assert_eq!(*rows, IDS.len() * top_k, "{}: {name}", dir.display());
        }
        assert!(obs.inner.entries.values().all(|(s, n)| *n > 0 && s.iter().all(|v| v.is_finite())));
    }
}

#[test]
fn errors_name_the_token_or_tensor() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models");
    match run(&root.join("qwen3moe"), &[vec![1, 384]], None) {
        Err(Error::TokenOutOfRange { id: 384, vocab: 384 }) => {}
        other => panic!("expected TokenOutOfRange, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(run(&root.join("qwen3moe"), &[vec![]], None), Err(Error::Empty(_))));

    // A llama config over an in-memory source that lacks layer 0's k_proj.
    let cfg = sling_core::ModelConfig::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16, "rms_norm_eps": 1e-6
    }))
    .unwrap();
    let mut m = MemSource::new();
    m.insert("model.embed_tokens.weight", &[4, 8], vec![0.1; 32]);
    m.insert("model.layers.0.input_layernorm.weight", &[8], vec![1.0; 8]);
    m.insert("model.layers.0.self_attn.q_proj.weight", &[8, 8], vec![0.1; 64]);
    m.insert("model.layers.0.self_attn.v_proj.weight", &[4, 8], vec![0.1; 32]);
    let model = Model::new(&m, &cfg).unwrap();
    match model.logits(&[vec![1, 2]], None) {
        Err(Error::Missing(n)) => assert_eq!(n, "model.layers.0.self_attn.k_proj.weight"),
        other => panic!("expected Missing, got {:?}", other.map(|_| ())),
    }
    // a wrong shape names the tensor and the expected shape
    m.insert("model.layers.0.self_attn.k_proj.weight", &[8, 8], vec![0.1; 64]);
    let model = Model::new(&m, &cfg).unwrap();
    match model.logits(&[vec![1, 2]], None) {
        Err(e @ Error::Shape { .. }) => {
            let s = e.to_string();
            assert!(s.contains("k_proj") && s.contains("[4, 8]"), "{s}");
        }
        other => panic!("expected Shape, got {:?}", other.map(|_| ())),
    }
    assert!(m.contains("model.embed_tokens.weight"));
}

#[test]
fn unsupported_architecture_is_refused() {
    let cfg = sling_core::ModelConfig::from_value(serde_json::json!({"architectures": ["GPT2LMHeadModel"]})).unwrap();
    let m = MemSource::new();
    assert!(matches!(Model::new(&m, &cfg), Err(Error::Unsupported(_))));
}
