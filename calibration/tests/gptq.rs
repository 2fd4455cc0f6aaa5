//! The sequential, per-expert GPTQ pass (`sling_calibration::gptq::run`) on the committed fixtures.
//!
//! The store (`sling_pipeline::solved::Store`) and the solver (`sling_quantizers::gptq::solve`) may still be the
//! committed skeletons (a store that keeps nothing, a solver that returns RTN): the checks that need a working
//! store run only when a probe `put` is read back (`store_works`), and the sequential-vs-not check compares the
//! layer inputs (which differ as soon as layer 0 is quantized at all), not the solutions.

use std::collections::BTreeSet;
use std::path::Path;

use sling_calibration::gptq::{run, Method, Progress, Report, Settings};
use sling_calibration::{CheckpointSource, Error, MemSource, TensorSource};
use sling_core::Role;
use sling_formats::checkpoint::Checkpoint;
use sling_pipeline::solved::Store;
use sling_quantizers::gptq::{Grid, Solution};

mod common;
use common::{fixture, grids, quantized, seqs, Sym4};

/// Whether the store keeps what it is given (false while `pipeline::solved` is the skeleton).
fn store_works() -> bool {
    let d = tempfile::tempdir().unwrap();
    let st = Store::open(d.path()).unwrap();
    let s = sling_quantizers::gptq::rtn(&[1.0; 32], 1, 32, &Sym4).unwrap();
    st.put("probe.weight", 32, &s).unwrap();
    st.contains("probe.weight")
}

fn run_on(src: &dyn TensorSource, dir: &Path, data: &[Vec<u32>], store: &Store, s: &Settings) -> Result<Report, Error> {
    let ck = Checkpoint::open(dir).unwrap();
    let cfg = ck.config.clone().unwrap();
    run(src, &cfg, data, &grids, store, s, &mut |_| {})
}

fn run_fixture(name: &str, data: &[Vec<u32>], store: &Store, s: &Settings) -> Result<Report, Error> {
    let ck = Checkpoint::open(&fixture(name)).unwrap();
    let src = CheckpointSource::new(&ck);
    run_on(&src, &fixture(name), data, store, s)
}

fn top_k(name: &str) -> u64 {
    let ck = Checkpoint::open(&fixture(name)).unwrap();
    ck.config.as_ref().unwrap().find_u64(&["num_experts_per_tok"]).unwrap().unwrap_or(0)
}

#[test]
fn every_quantized_linear_is_solved_and_routing_is_reported() {
    let data = seqs(4, 32, 1);
    let tokens = 128u64;
    let works = store_works();
    for name in [
        "qwen3moe",
        "mixtral",
        "qwen2moe",
        "olmoe",
        "deepseekv3",
        "deepseekv2lite",
        "llama",
        "qwen2",
        "gptoss",
        "gptoss-mxfp4",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = run_fixture(name, &data, &store, &Settings::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        // exactly the weights of pipeline::hf::tensors a target quantizes
        let ck = Checkpoint::open(&fixture(name)).unwrap();
        let want: BTreeSet<String> = sling_pipeline::hf::tensors_with(&ck, true)
            .unwrap()
            .into_iter()
            .filter(|t| t.shape.len() == 2 && quantized(&t.name))
            .map(|t| t.name)
            .collect();
        let got: BTreeSet<String> = r.weights.iter().map(|w| w.name.clone()).collect();
        assert_eq!(got, want, "{name}");
        assert_eq!(got.len(), r.weights.len(), "{name}: a weight twice");
        assert_eq!(r.tokens, tokens);
        for w in &r.weights {
            match (&w.method, w.expert) {
                (Method::Gptq, None) => assert_eq!(w.tokens, tokens, "{name} {}", w.name),
                (Method::Gptq, Some(e)) => {
                    let counts = &r.routing.iter().find(|x| x.layer == w.layer).unwrap().counts;
                    assert_eq!(w.tokens, counts[e], "{name} {}", w.name);
                    assert!(w.tokens >= 32, "{name} {}", w.name);
                }
                (Method::Rtn { why }, Some(e)) => {
                    let counts = &r.routing.iter().find(|x| x.layer == w.layer).unwrap().counts;
                    assert_eq!(w.tokens, counts[e], "{name} {}", w.name);
                    assert!(w.tokens < 32 && why.contains("routed tokens"), "{name} {}: {why}", w.name);
                }
                (m, _) => panic!("{name} {}: {m:?}", w.name),
            }
            assert!(w.loss.is_finite() && w.loss >= 0.0);
            if works {
                assert!(store.contains(&w.name), "{name}: {} not stored", w.name);
                let rows = store.rows(&w.name, 0, w.rows).unwrap().unwrap();
                assert_eq!((rows.cols, rows.codes.len()), (w.cols, w.rows * w.cols));
            }
        }
        // routing: tokens × top-k per MoE layer
        let k = top_k(name);
        for lr in &r.routing {
            assert_eq!(lr.counts.iter().sum::<u64>(), tokens * k, "{name} layer {}", lr.layer);
        }
        if k > 0 {
            assert!(!r.routing.is_empty(), "{name}");
        }
        // sequential: the quantized layers move the hidden states
        assert!(r.output_error.iter().flatten().all(|&e| e > 0.0 && e < 1.0), "{name}: {:?}", r.output_error);
        // DeepSeek MLA: kv_b_proj has an observed input (the normed latent)
        if name.starts_with("deepseek") {
            let kvb = r.weights.iter().find(|w| w.name.ends_with("kv_b_proj.weight")).unwrap();
            assert_eq!((kvb.method.clone(), kvb.tokens), (Method::Gptq, tokens));
        }
        // serializable
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&j).unwrap(), r);
    }
}

#[test]
fn few_token_experts_fall_back_and_all_experts_sees_every_token() {
    let data = seqs(2, 16, 7); // 32 tokens × top-2 over 8 experts: 8 per expert on average
    for name in ["qwen3moe", "mixtral"] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = Settings { sequential: false, ..Settings::default() };
        let plain = run_fixture(name, &data, &store, &s).unwrap();
        let experts: Vec<_> = plain.weights.iter().filter(|w| w.expert.is_some()).collect();
        assert!(!experts.is_empty());
        for w in &experts {
            assert!(matches!(&w.method, Method::Rtn { why } if why.contains("routed tokens")), "{name}: {w:?}");
        }
        // with a minimum of 0: every routed expert with a token gets GPTQ, one without none says so
        let s0 = Settings { min_expert_tokens: 0, sequential: false, ..Settings::default() };
        let dir0 = tempfile::tempdir().unwrap();
        let r0 = run_fixture(name, &data, &Store::open(dir0.path()).unwrap(), &s0).unwrap();
        for w in r0.weights.iter().filter(|w| w.expert.is_some()) {
            if w.tokens > 0 {
                assert_eq!(w.method, Method::Gptq, "{name}: {w:?}");
            } else {
                assert!(matches!(&w.method, Method::Rtn { why } if why.contains("no input")), "{name}: {w:?}");
            }
        }
        // all_experts: every expert sees every token, routing unchanged
        let sa = Settings { all_experts: true, sequential: false, ..Settings::default() };
        let dira = tempfile::tempdir().unwrap();
        let ra = run_fixture(name, &data, &Store::open(dira.path()).unwrap(), &sa).unwrap();
        assert_eq!(ra.routing, plain.routing);
        assert_eq!(ra.weights.len(), plain.weights.len());
        for w in &ra.weights {
            assert_eq!((w.method.clone(), w.tokens), (Method::Gptq, 32), "{name}: {w:?}");
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let data = seqs(3, 24, 3);
    let works = store_works();
    let s = Settings { min_expert_tokens: 4, ..Settings::default() };
    let one = |threads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let r = pool.install(|| run_fixture("qwen3moe", &data, &store, &s)).unwrap();
        let rows: Vec<_> = if works {
            r.weights.iter().map(|w| store.rows(&w.name, 0, w.rows).unwrap().unwrap()).collect()
        } else {
            Vec::new()
        };
        (r, rows)
    };
    let (r1, s1) = one(1);
    let (r2, s2) = one(2);
    let bits = |r: &Report| r.weights.iter().map(|w| w.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&r1), bits(&r2));
    assert_eq!(r1, r2);
    assert_eq!(s1, s2);
}

#[test]
fn sequential_propagates_the_quantized_layer() {
    let data = seqs(2, 20, 5);
    let inputs = |sequential: bool| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ck = Checkpoint::open(&fixture("qwen3moe")).unwrap();
        let cfg = ck.config.clone().unwrap();
        let src = CheckpointSource::new(&ck);
        let mut seen = Vec::new();
        let s = Settings { sequential, ..Settings::default() };
        let r = run(&src, &cfg, &data, &grids, &store, &s, &mut |p| {
            if let Progress::LayerStart { inputs, .. } = p {
                seen.push(inputs.to_vec());
            }
        })
        .unwrap();
        (seen, r)
    };
    let (seq, rs) = inputs(true);
    let (plain, rp) = inputs(false);
    assert_eq!(seq.len(), 2);
    assert_eq!(seq[0], plain[0], "layer 0 sees the embeddings either way");
    assert_ne!(seq[1], plain[1], "layer 1 sees layer 0's quantized output only when sequential");
    assert!(rp.output_error.iter().all(Option::is_none));
    assert!(rs.output_error.iter().all(Option::is_some));
    // With the real solver, layer 1's GPTQ losses differ too (its Hessians come from other inputs), layer 0's
    // do not.
    if solver_works() {
        let loss = |r: &Report, l: usize| r.weights.iter().filter(|w| w.layer == l).map(|w| w.loss).collect::<Vec<_>>();
        assert_eq!(loss(&rs, 0), loss(&rp, 0));
        assert_ne!(loss(&rs, 1), loss(&rp, 1));
    }
}

/// Whether `gptq::solve` is the real solver (false while it is the skeleton that returns RTN).
fn solver_works() -> bool {
    let w: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) / 7.3).collect();
    let mut h = vec![0.0f64; 64 * 64];
    for i in 0..64 {
        for j in 0..64 {
            h[i * 64 + j] = if i == j { 2.0 } else { 0.9f64.powi((i as i32 - j as i32).abs()) };
        }
    }
    let g = sling_quantizers::gptq::solve(&w, 1, 64, &h, &Sym4, &Default::default()).unwrap();
    g.loss > 0.0
}

#[test]
fn gptq_lowers_the_layer_output_error() {
    if !solver_works() {
        eprintln!("skipped until quantizers::gptq::solve is merged");
        return;
    }
    // measured (qwen3moe, 8 × 64 tokens): layer outputs' relative error 0.190 / 0.089 with GPTQ against
    // 0.214 / 0.138 with GPTQ damped into RTN (damp 1e6)
    let data = seqs(8, 64, 21);
    let go = |damp: f64| {
        let dir = tempfile::tempdir().unwrap();
        let gptq = sling_quantizers::gptq::Options { damp, ..Default::default() };
        let s = Settings { min_expert_tokens: 8, gptq, ..Settings::default() };
        run_fixture("qwen3moe", &data, &Store::open(dir.path()).unwrap(), &s).unwrap()
    };
    let (g, r) = (go(0.01), go(1e6));
    for (a, b) in g.output_error.iter().zip(&r.output_error) {
        assert!(a.unwrap() < b.unwrap(), "{:?} vs {:?}", g.output_error, r.output_error);
    }
}

#[test]
fn max_ram_splits_the_experts_into_passes_with_the_same_result() {
    let data = seqs(3, 24, 11);
    let works = store_works();
    let s = Settings { min_expert_tokens: 4, ..Settings::default() };
    let go = |s: &Settings| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = run_fixture("qwen3moe", &data, &store, s).unwrap();
        let rows: Vec<_> = if works {
            r.weights.iter().map(|w| store.rows(&w.name, 0, w.rows).unwrap().unwrap()).collect()
        } else {
            Vec::new()
        };
        (r, rows)
    };
    let (whole, w_rows) = go(&s);
    assert!(whole.passes.iter().all(|&p| p == 1));
    // attention 64² + 64² (q/k/v, o: 128 wide → 128²) … budget for ~2 experts (64² + 32²) × 8 B each
    let dense = (64 * 64 + 128 * 128) * 8;
    let per_expert = (64 * 64 + 32 * 32) * 8;
    let small = Settings { max_ram: Some((dense + 2 * per_expert) as u64), ..s.clone() };
    let (split, s_rows) = go(&small);
    assert!(split.passes.iter().all(|&p| p == 4), "{:?}", split.passes);
    assert_eq!(split.weights, whole.weights);
    assert_eq!(split.routing, whole.routing);
    assert_eq!(s_rows, w_rows);
}

/// qwen3moe with its experts in the transformers-5 fused layout (`mlp.experts.gate_up_proj [E, 2I, H]`,
/// `mlp.experts.down_proj [E, H, I]`).
fn fused_qwen3moe() -> MemSource {
    let ck = Checkpoint::open(&fixture("qwen3moe")).unwrap();
    let src = CheckpointSource::new(&ck);
    let mut m = MemSource::new();
    let (ne, ff, h) = (8u64, 32u64, 64u64);
    for t in ck.tensors() {
        if t.name.contains(".experts.") {
            continue;
        }
        m.insert(&t.name, &t.shape, src.read(&t.name).unwrap());
    }
    for l in 0..2 {
        let (mut gu, mut dn) = (Vec::new(), Vec::new());
        for e in 0..ne {
            for w in ["gate_proj", "up_proj"] {
                gu.extend(src.read(&format!("model.layers.{l}.mlp.experts.{e}.{w}.weight")).unwrap());
            }
            dn.extend(src.read(&format!("model.layers.{l}.mlp.experts.{e}.down_proj.weight")).unwrap());
        }
        m.insert(&format!("model.layers.{l}.mlp.experts.gate_up_proj"), &[ne, 2 * ff, h], gu);
        m.insert(&format!("model.layers.{l}.mlp.experts.down_proj"), &[ne, h, ff], dn);
    }
    m
}

#[test]
fn fused_experts_are_solved_under_their_split_names() {
    let data = seqs(4, 16, 2);
    let s = Settings { min_expert_tokens: 4, ..Settings::default() };
    let dir = tempfile::tempdir().unwrap();
    let per_expert = run_fixture("qwen3moe", &data, &Store::open(dir.path()).unwrap(), &s).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let fused = fused_qwen3moe();
    let r = run_on(&fused, &fixture("qwen3moe"), &data, &Store::open(dir2.path()).unwrap(), &s).unwrap();
    // same names, tokens, methods, losses and routing (layer 1's routing depends on layer 0's solved experts
    // being served through the fused tensors)
    assert_eq!(r, per_expert);
}

#[test]
fn a_resumed_run_gives_the_same_store() {
    if !store_works() {
        eprintln!("skipped until pipeline::solved::Store is merged");
        return;
    }
    let data = seqs(3, 24, 9);
    let s = Settings { min_expert_tokens: 4, ..Settings::default() };
    let da = tempfile::tempdir().unwrap();
    let a = Store::open(da.path()).unwrap();
    let ra = run_fixture("qwen3moe", &data, &a, &s).unwrap();
    // an interrupted run: layer 0's weights only
    let db = tempfile::tempdir().unwrap();
    let b = Store::open(db.path()).unwrap();
    for w in ra.weights.iter().filter(|w| w.layer == 0) {
        let rows = a.rows(&w.name, 0, w.rows).unwrap().unwrap();
        let ng = w.cols.div_ceil(rows.group);
        let dequant = (0..w.rows * w.cols)
            .map(|i| Sym4.dequantize(rows.codes[i], &rows.params[(i / w.cols) * ng + (i % w.cols) / rows.group]))
            .collect();
        let sol = Solution {
            rows: w.rows,
            cols: w.cols,
            codes: rows.codes,
            params: rows.params,
            dequant,
            loss: w.loss,
            fallback: None,
        };
        b.put(&w.name, rows.group, &sol).unwrap();
    }
    let rb = run_fixture("qwen3moe", &data, &b, &s).unwrap();
    for (x, y) in ra.weights.iter().zip(&rb.weights) {
        assert_eq!(x.name, y.name);
        if x.layer == 0 {
            assert_eq!(y.method, Method::Resumed);
        } else {
            assert_eq!((x.method.clone(), x.loss.to_bits(), x.tokens), (y.method.clone(), y.loss.to_bits(), y.tokens));
        }
        assert_eq!(a.rows(&x.name, 0, x.rows).unwrap(), b.rows(&x.name, 0, x.rows).unwrap(), "{}", x.name);
    }
    assert_eq!(ra.routing, rb.routing);
}

#[test]
fn bad_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = Settings::default();
    assert!(matches!(
        run_fixture("qwen3moe", &[vec![1, 2, 384]], &store, &s),
        Err(Error::TokenOutOfRange { id: 384, vocab: 384 })
    ));
    assert!(matches!(run_fixture("qwen3moe", &[], &store, &s), Err(Error::Empty(_))));
    assert!(matches!(run_fixture("qwen3moe", &[vec![1], vec![]], &store, &s), Err(Error::Empty(_))));
}

/// Records the Hugging Face names the forward pass gives its linear inputs.
#[derive(Default)]
struct HfNames(BTreeSet<String>, BTreeSet<String>);

impl sling_calibration::Observer for HfNames {
    fn linear_input(&mut self, x: &sling_calibration::LinearInput<'_>) {
        if let Some(h) = x.hf {
            self.0.insert(h.to_string());
        }
    }
    fn hf_only_input(&mut self, x: &sling_calibration::LinearInput<'_>) {
        assert_eq!(x.hf, Some(x.tensor));
        assert_eq!(x.rows.len() % x.n_cols, 0);
        self.1.insert(x.tensor.to_string());
    }
}

#[test]
fn observed_hf_names_are_the_artifact_tensor_names() {
    for name in
        ["qwen3moe", "mixtral", "qwen2moe", "olmoe", "deepseekv3", "deepseekv2", "deepseekv2lite", "llama", "qwen2"]
    {
        let ck = Checkpoint::open(&fixture(name)).unwrap();
        let cfg = ck.config.clone().unwrap();
        let src = CheckpointSource::new(&ck);
        let mut o = HfNames::default();
        let model = sling_calibration::Model::new(&src, &cfg).unwrap().all_experts(true);
        model.logits(&seqs(1, 8, 4), Some(&mut o)).unwrap();
        let hf: BTreeSet<String> = sling_pipeline::hf::tensors(&ck)
            .unwrap()
            .into_iter()
            .filter(|t| t.shape.len() == 2 && t.name.ends_with(".weight") && t.role != Role::Other)
            .map(|t| t.name)
            .filter(|n| n != "model.embed_tokens.weight" || !ck.tensors().any(|t| t.name == "lm_head.weight"))
            .collect();
        let all: BTreeSet<String> = o.0.union(&o.1).cloned().collect();
        assert_eq!(all, hf, "{name}");
        assert!(o.1.iter().all(|n| n.ends_with("self_attn.kv_b_proj.weight")), "{name}: {:?}", o.1);
        assert_eq!(!o.1.is_empty(), name.starts_with("deepseek"), "{name}");
    }
}

#[test]
fn sub_batches_sum_into_the_same_statistics() {
    let data = seqs(4, 24, 13);
    let s = Settings { min_expert_tokens: 8, ..Settings::default() };
    let go = |s: &Settings| {
        let dir = tempfile::tempdir().unwrap();
        run_fixture("mixtral", &data, &Store::open(dir.path()).unwrap(), s).unwrap()
    };
    let whole = go(&s);
    let split = go(&Settings { batch_tokens: 50, ..s.clone() }); // two sequences per forward call
    let single = go(&Settings { batch_tokens: 1, ..s.clone() }); // one per call
    for r in [&split, &single] {
        assert_eq!(r.tokens, whole.tokens);
        assert_eq!(r.routing, whole.routing);
        for (a, b) in r.weights.iter().zip(&whole.weights) {
            assert_eq!((&a.name, a.tokens, &a.method), (&b.name, b.tokens, &b.method));
            assert!((a.loss - b.loss).abs() <= 1e-4 * b.loss.abs().max(1e-12), "{}: {} vs {}", a.name, a.loss, b.loss);
        }
    }
}
