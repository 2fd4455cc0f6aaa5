//! `sling quantize --to vllm:…|mlx:… --method awq --data FILE` end to end on the committed fixtures: the same bytes
//! for any thread count, the folds in the artifact (norms and routers changed, the function kept), the settings in
//! the manifest, `verify --source --data` re-deriving every weight bit for bit, a kill during calibration resumed to
//! the same bytes, and bad input refused before anything is written. The KL gain over round-to-nearest on a trained
//! model, llm-compressor's AWQ at the same settings and loading in compressed-tensors/transformers/mlx-lm:
//! tests/interop/test_awq.py.

use std::path::Path;
use std::process::Output;

mod common;
use common::{calib, files, fixture, manifest, run, same_weights, stderr};

/// `sling -q quantize SRC --to TO -o OUT --reproducible --method awq --data calib.txt --ctx 64 --chunks 8 EXTRA`.
fn awq(src: &str, to: &str, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    calibrated("awq", src, to, out, extra, env)
}

/// [`awq`] with `--method METHOD`.
fn calibrated(method: &str, src: &str, to: &str, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let (src, data) = (fixture(src), calib());
    let mut a = vec!["-q", "quantize", src.to_str().unwrap(), "--to", to, "-o", out.to_str().unwrap()];
    a.extend_from_slice(&["--reproducible", "--method", method, "--data", &data, "--ctx", "64"]);
    if !extra.contains(&"--chunks") {
        a.extend_from_slice(&["--chunks", "8"]);
    }
    a.extend_from_slice(extra);
    run(&a, env)
}

/// The raw bytes of tensor `name` in a directory of safetensors files.
fn tensor_bytes(dir: &Path, name: &str) -> Option<Vec<u8>> {
    for (f, bytes) in files(dir) {
        if !f.ends_with(".safetensors") {
            continue;
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        if let Ok(t) = st.tensor(name) {
            return Some(t.data().to_vec());
        }
    }
    None
}

/// GQA + MoE (Qwen3-MoE), Mixtral's w1/w3/w2, MLA + shared experts to compressed-tensors (DeepSeek-V3), MHA with
/// `v_proj → o_proj` (OLMoE).
const CASES: &[(&str, &str, &[&str])] = &[
    ("qwen3moe", "mlx:4", &["--group-size", "32"]),
    ("mixtral", "mlx:3", &["--group-size", "32"]),
    ("deepseekv3", "vllm:w4a16-asym", &[]),
    ("olmoe", "mlx:4", &["--group-size", "32"]),
    // 64 tokens: each routed expert sees fewer rows than its 64 inputs, so its loss comes from the inputs
    // themselves (`‖ΔW Xᵀ‖²`) rather than from `XᵀX`.
    ("qwen2moe", "mlx:4", &["--group-size", "32", "--chunks", "1", "--min-expert-tokens", "1"]),
];

#[test]
fn awq_same_bytes_for_any_thread_count_folded_verified_and_rederived() {
    let d = tempfile::tempdir().unwrap();
    for (src, to, extra) in CASES {
        let tag = to.replace(':', "-");
        let (a, b) = (d.path().join(format!("{src}-{tag}-t1")), d.path().join(format!("{src}-{tag}-t2")));
        for (out, t) in [(&a, "1"), (&b, "2")] {
            let mut e = vec!["-t", t];
            e.extend_from_slice(extra);
            let o = awq(src, to, out, &e, &[]);
            assert!(o.status.success(), "{src} {to} -t {t}: {}", stderr(&o));
        }
        same_weights(&a, &b, &format!("{src} {to}: -t 1 vs -t 2"));
        assert!(!d.path().join(format!("{src}-{tag}-t1.solve")).exists(), "the solve store is removed when done");

        let m = manifest(&a);
        let cal = &m["options"]["target"]["calibration"];
        assert_eq!(cal["method"], "awq", "{src} {to}: {cal}");
        assert_eq!((&cal["n_grid"], &cal["duo_scaling"]), (&serde_json::json!(20), &serde_json::json!(true)), "{cal}");
        assert!(cal.get("damp").is_none() && cal.get("act_order").is_none(), "GPTQ settings in an AWQ record: {cal}");
        let chunks = if extra.contains(&"--chunks") { 1 } else { 8 };
        assert_eq!(cal["data"]["tokens"], chunks * 64);

        // The folds are in the artifact: the attention norm differs from the source's (AWQ divided it by its
        // scales) and the quantized weights differ from round-to-nearest's.
        // (DeepSeek-V3's 64-wide inputs do not take w4a16's group 128: only its dense layer's down_proj (128 wide)
        // is quantized, so its fold is the rows of up_proj, which stays at source precision.)
        let norm = match *src {
            "deepseekv3" => "model.layers.0.mlp.up_proj.weight",
            _ => "model.layers.0.input_layernorm.weight",
        };
        let src_norm = tensor_bytes(&fixture(src), norm).unwrap();
        assert_ne!(tensor_bytes(&a, norm).unwrap(), src_norm, "{src} {to}: {norm} not folded");
        let rtn = d.path().join(format!("{src}-{tag}-rtn"));
        let (srcp, out) = (fixture(src), rtn.to_str().unwrap().to_string());
        let mut args = vec!["-q", "quantize", srcp.to_str().unwrap(), "--to", to, "-o", &out, "--reproducible"];
        args.extend_from_slice(extra);
        let o = run(&args, &[]);
        assert!(o.status.success(), "{src} {to} rtn: {}", stderr(&o));
        assert_eq!(tensor_bytes(&rtn, norm).unwrap(), src_norm, "round to nearest keeps the norms");
        let differ = files(&a).iter().zip(files(&rtn)).any(|(x, y)| x.0.ends_with(".safetensors") && x.1 != y.1);
        assert!(differ, "{src} {to}: AWQ wrote the round-to-nearest bytes");

        // verify, and verify --source --data --full (the AWQ pass runs again; every tensor bit for bit, the folded
        // norms included).
        let o = run(&["verify", a.to_str().unwrap()], &[]);
        assert!(o.status.success(), "{src} {to}: verify: {}", stderr(&o));
        let (s, data) = (fixture(src), calib());
        let o = run(&["verify", a.to_str().unwrap(), "--source", s.to_str().unwrap(), "--full", "--data", &data], &[]);
        assert!(o.status.success(), "{src} {to}: verify --source --data: {}", stderr(&o));
        // Without the data the re-derivation cannot be made: exit 2, saying what is needed.
        let o = run(&["verify", a.to_str().unwrap(), "--source", s.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("made with --method awq"), "{}", stderr(&o));
    }
}

#[test]
fn awq_resume_after_a_kill_and_expert_groups_give_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let (src, to, extra) = ("qwen3moe", "mlx:4", ["--group-size", "32"]);
    let whole = d.path().join("whole");
    let o = awq(src, to, &whole, &extra, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Layer 0 reports its 28 weights (q/k/v/o + 8 experts x 3), then is saved; the kill comes during layer 1.
    let out = d.path().join("resumed");
    let o = awq(src, to, &out, &extra, &[("SLING_TEST_ABORT_AFTER_SOLVED", "30")]);
    assert_eq!(o.status.code(), Some(134), "{}", stderr(&o));
    let solve = d.path().join("resumed.solve");
    assert!(solve.join("awq-layer-0.json").is_file() && !solve.join("awq-layer-1.json").exists());
    let mut args = vec!["--resume"];
    args.extend_from_slice(&extra);
    let o = awq(src, to, &out, &args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_weights(&whole, &out, "after --resume");
    assert!(!solve.exists());
    // --max-ram below one layer's Hessians: one expert per observing pass; each pass adds its experts' share of
    // the shared FFN loss in the same order, so the same scales and bytes.
    let grouped = d.path().join("grouped");
    let o = awq(src, to, &grouped, &["--group-size", "32", "--max-ram", "100K"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_weights(&whole, &grouped, "--max-ram (experts in groups)");
    // A store made with other AWQ settings is not reused.
    let other = d.path().join("other");
    let o =
        awq(src, to, &other, &["--group-size", "32", "--awq-grid", "5"], &[("SLING_TEST_ABORT_AFTER_SOLVED", "30")]);
    assert_eq!(o.status.code(), Some(134), "{}", stderr(&o));
    let o = awq(src, to, &other, &["--group-size", "32", "--resume"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_weights(&whole, &other, "a store of other settings must not be reused");
}

/// `--method awq-gptq` (llm-compressor's `[AWQModifier, GPTQModifier]`): AWQ's folds in the artifact, GPTQ's codes
/// for the smoothed weights (neither AWQ's round-to-nearest nor plain GPTQ's bytes), both settings in the manifest,
/// the same bytes for any thread count, after a kill during the GPTQ pass and `--resume`, and from `verify --source
/// --data --full`. Its KL against llm-compressor's stacked recipe: tests/interop/test_awq.py.
#[test]
fn awq_gptq_solves_the_smoothed_model() {
    let d = tempfile::tempdir().unwrap();
    let (src, to) = ("qwen3moe", "mlx:4");
    let g32 = ["--group-size", "32"];
    let out = |n: &str| d.path().join(n);
    let (a, b) = (out("t1"), out("t2"));
    for (o, t) in [(&a, "1"), (&b, "2")] {
        let r = calibrated("awq-gptq", src, to, o, &["--group-size", "32", "-t", t], &[]);
        assert!(r.status.success(), "-t {t}: {}", stderr(&r));
    }
    same_weights(&a, &b, "awq-gptq: -t 1 vs -t 2");
    let cal = &manifest(&a)["options"]["target"]["calibration"];
    assert_eq!(cal["method"], "awq-gptq", "{cal}");
    for k in ["n_grid", "duo_scaling", "damp", "block", "act_order"] {
        assert!(cal.get(k).is_some(), "{k} missing: {cal}");
    }
    let (aw, gq) = (out("awq"), out("gptq"));
    assert!(awq(src, to, &aw, &g32, &[]).status.success());
    assert!(calibrated("gptq", src, to, &gq, &g32, &[]).status.success());
    let norm = "model.layers.0.input_layernorm.weight";
    assert_eq!(tensor_bytes(&a, norm), tensor_bytes(&aw, norm), "AWQ's folds");
    assert_ne!(tensor_bytes(&a, norm), tensor_bytes(&fixture(src), norm), "no fold");
    let w = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(tensor_bytes(&a, w), tensor_bytes(&aw, w), "AWQ's round-to-nearest codes");
    assert_ne!(tensor_bytes(&a, w), tensor_bytes(&gq, w), "plain GPTQ's codes");
    // Killed in the GPTQ pass (the AWQ pass reports 56 weights, every layer's folds saved), then resumed.
    let k = out("killed");
    let r = calibrated("awq-gptq", src, to, &k, &g32, &[("SLING_TEST_ABORT_AFTER_SOLVED", "70")]);
    assert_eq!(r.status.code(), Some(134), "{}", stderr(&r));
    assert!(out("killed.solve").join("awq-layer-1.json").is_file(), "the kill came before the GPTQ pass");
    let r = calibrated("awq-gptq", src, to, &k, &["--group-size", "32", "--resume"], &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    same_weights(&a, &k, "awq-gptq after --resume");
    let (s, data) = (fixture(src), calib());
    let r = run(&["verify", a.to_str().unwrap(), "--source", s.to_str().unwrap(), "--full", "--data", &data], &[]);
    assert!(r.status.success(), "verify --source --data: {}", stderr(&r));
}

#[test]
fn awq_bad_input_is_a_clear_error_and_nothing_is_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let (s, o_) = (fixture("qwen3moe"), out.to_str().unwrap().to_string());
    let data = calib();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--to", "vllm:fp8-dynamic", "--method", "awq", "--data", &data], "applies to integer schemes"),
        (vec!["--to", "mlx:4", "--group-size", "32", "--method", "awq"], "needs calibration data"),
        (vec!["--to", "mlx:4", "--group-size", "32", "--method", "awq", "--data", &data, "--act-order"], "--act-order"),
        (
            vec!["--to", "mlx:4", "--group-size", "32", "--method", "awq", "--data", &data, "--awq-grid", "2"],
            "--awq-grid",
        ),
        (
            vec!["--to", "mlx:4", "--group-size", "32", "--method", "gptq", "--data", &data, "--no-duo-scaling"],
            "--method awq",
        ),
        (vec!["--to", "gguf:Q8_0", "--method", "awq", "--data", &data], "apply to vllm:… and mlx:… targets"),
        (vec!["--to", "mlx:auto", "--target-bpw", "4", "--method", "awq-gptq", "--data", &data], "not awq-gptq"),
    ];
    for (extra, want) in cases {
        let mut a = vec!["-q", "quantize", s.to_str().unwrap(), "-o", &o_];
        a.extend_from_slice(&extra);
        let o = run(&a, &[]);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{extra:?}: want {want:?} in: {}", stderr(&o));
        assert!(!out.exists() && !d.path().join("o.solve").exists(), "{extra:?}: something was written");
    }
}
