//! `sling quantize --to vllm:…|mlx:… --method gptq --data FILE` end to end on the committed fixtures: the same bytes
//! for any thread count, a kill during calibration or writing resumed to the same bytes, the settings, coverage and
//! fallbacks in the manifest, `verify --source --data` re-deriving every weight bit for bit, and bad input refused
//! before anything is written. Agreement with llm-compressor's GPTQ, the KL gain over round-to-nearest on a trained
//! model and loading in compressed-tensors/transformers/mlx-lm: tests/interop/test_gptq.py.

use std::fs;
use std::path::Path;
use std::process::Output;

mod common;
use common::{calib, files, fixture, manifest, run, same_weights, stderr};

/// `sling quantize SRC --to TO -o OUT --data calib.txt --ctx 64 --chunks 8 EXTRA`.
fn gptq(src: &str, to: &str, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let (src, data) = (fixture(src), calib());
    let mut a = vec![
        "-q",
        "quantize",
        src.to_str().unwrap(),
        "--to",
        to,
        "-o",
        out.to_str().unwrap(),
        "--reproducible",
        "--data",
        &data,
        "--ctx",
        "64",
        "--chunks",
        "8",
    ];
    a.extend_from_slice(extra);
    run(&a, env)
}

/// The fixtures are 64 wide: MLX group 32 and the vLLM integer schemes' 128 (which keeps the 64-wide rows) both
/// leave integer-grid weights to solve; w4a16 on qwen3moe solves the 128-wide... none, so mlx is the main case.
const CASES: &[(&str, &str, &[&str])] = &[
    ("qwen3moe", "mlx:4", &["--group-size", "32"]),
    ("mixtral", "mlx:3", &["--group-size", "32", "--act-order"]),
    ("deepseekv3", "vllm:w4a16-asym", &[]),
];

#[test]
fn same_bytes_for_any_thread_count_verified_and_rederived() {
    let d = tempfile::tempdir().unwrap();
    for (src, to, extra) in CASES {
        let tag = to.replace(':', "-");
        let (a, b) = (d.path().join(format!("{src}-{tag}-t1")), d.path().join(format!("{src}-{tag}-t2")));
        let mut e1 = vec!["-t", "1"];
        e1.extend_from_slice(extra);
        let o = gptq(src, to, &a, &e1, &[]);
        assert!(o.status.success(), "{src} {to}: {}", stderr(&o));
        let mut e2 = vec!["-t", "2"];
        e2.extend_from_slice(extra);
        let o = gptq(src, to, &b, &e2, &[]);
        assert!(o.status.success(), "{src} {to}: {}", stderr(&o));
        same_weights(&a, &b, &format!("{src} {to}: -t 1 vs -t 2"));
        assert!(!d.path().join(format!("{src}-{tag}-t1.solve")).exists(), "the solve store is removed when done");

        // The manifest records the method and its data; the weights differ from round-to-nearest.
        let m = manifest(&a);
        let cal = &m["options"]["target"]["calibration"];
        assert_eq!(cal["method"], "gptq", "{src} {to}: {cal}");
        assert_eq!(cal["data"]["name"], "calib.txt");
        assert_eq!(cal["data"]["tokens"], 8 * 64);
        assert_eq!(cal["act_order"], extra.contains(&"--act-order"));
        let rtn = d.path().join(format!("{src}-{tag}-rtn"));
        let mut e = vec!["--method", "rtn"];
        e.extend_from_slice(extra.iter().filter(|x| **x != "--act-order").copied().collect::<Vec<_>>().as_slice());
        let (srcp, out) = (fixture(src), rtn.to_str().unwrap().to_string());
        let mut args = vec!["-q", "quantize", srcp.to_str().unwrap(), "--to", to, "-o", &out, "--reproducible"];
        args.extend_from_slice(&e);
        let o = run(&args, &[]);
        assert!(o.status.success(), "{src} {to} rtn: {}", stderr(&o));
        let differ = files(&a).iter().zip(files(&rtn)).any(|(x, y)| x.0.ends_with(".safetensors") && x.1 != y.1);
        assert!(differ, "{src} {to}: GPTQ wrote the round-to-nearest bytes");

        // verify (files) and verify --source --data --full (the calibration runs again; every weight bit for bit).
        let o = run(&["verify", a.to_str().unwrap()], &[]);
        assert!(o.status.success(), "{src} {to}: verify: {}", stderr(&o));
        let (s, data) = (fixture(src), calib());
        let o = run(&["verify", a.to_str().unwrap(), "--source", s.to_str().unwrap(), "--full", "--data", &data], &[]);
        assert!(o.status.success(), "{src} {to}: verify --source --data: {}", stderr(&o));
        // Without the data (or with other data) the re-derivation cannot be made: exit 2, saying what is needed.
        let o = run(&["verify", a.to_str().unwrap(), "--source", s.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("give it with --data FILE"), "{}", stderr(&o));
        let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/data/eval.txt");
        let o = run(
            &["verify", a.to_str().unwrap(), "--source", s.to_str().unwrap(), "--data", other.to_str().unwrap()],
            &[],
        );
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("but the artifact was calibrated on calib.txt"), "{}", stderr(&o));
    }
}

#[test]
fn resume_after_a_kill_during_calibration_or_writing_gives_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let (src, to, extra) = ("qwen3moe", "mlx:4", ["--group-size", "32"]);
    let whole = d.path().join("whole");
    let o = gptq(src, to, &whole, &extra, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (k, v) in [("SLING_TEST_ABORT_AFTER_SOLVED", "40"), ("SLING_TEST_ABORT_AFTER_WEIGHTS", "9")] {
        let out = d.path().join(format!("resumed-{k}"));
        let mut args = vec!["-t", "1"];
        args.extend_from_slice(&extra);
        let env = [(k, v), ("SLING_JOURNAL_INTERVAL_MS", "0")];
        let o = gptq(src, to, &out, &args, &env);
        assert_eq!(o.status.code(), Some(134), "{k}: {}", stderr(&o));
        assert!(!out.exists(), "{k}: a killed run must not leave the output directory");
        let solve = d.path().join(format!("resumed-{k}.solve"));
        assert!(solve.is_dir(), "{k}: the solved weights wait for --resume");
        let mut args = vec!["--resume", "--progress", "json"];
        args.extend_from_slice(&extra);
        let o = gptq(src, to, &out, &args, &[]);
        assert!(o.status.success(), "{k}: {}", stderr(&o));
        let resumed = stderr(&o).lines().filter(|l| l.contains("\"kind\":\"resumed\"")).count();
        if k == "SLING_TEST_ABORT_AFTER_SOLVED" {
            assert!(resumed >= 40, "{k}: {resumed} weights reused from the store");
        }
        same_weights(&whole, &out, &format!("{k}: after --resume"));
        assert!(!solve.exists());
    }
    // A store made with other options is not reused: the run starts again and still gives the right bytes.
    let out = d.path().join("other");
    let o = gptq(src, to, &out, &["--group-size", "32", "--damp", "0.1"], &[("SLING_TEST_ABORT_AFTER_SOLVED", "10")]);
    assert_eq!(o.status.code(), Some(134), "{}", stderr(&o));
    let o = gptq(src, to, &out, &["--group-size", "32", "--resume"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_weights(&whole, &out, "a store of other options must not be reused");
}

#[test]
fn experts_without_enough_tokens_fall_back_and_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    // 4 x 64 tokens over 8 experts top-2: every expert gets fewer than 1000.
    let (src, data) = (fixture("qwen3moe"), calib());
    let args = [
        "quantize",
        src.to_str().unwrap(),
        "--to",
        "mlx:4",
        "--group-size",
        "32",
        "-o",
        out.to_str().unwrap(),
        "--data",
        &data,
        "--ctx",
        "64",
        "--chunks",
        "4",
        "--min-expert-tokens",
        "1000",
    ];
    let o = run(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("layer   0: 8 experts, routed tokens min"), "coverage table: {err}");
    assert!(err.contains("under --min-expert-tokens 1000"), "{err}");
    assert!(err.contains("round-to-nearest: model.layers.0.mlp.experts."), "{err}");
    let m = manifest(&out);
    let cal = &m["options"]["target"]["calibration"];
    let fb = cal["fallbacks"].as_array().unwrap();
    // 2 layers x 8 experts x 3 projections.
    assert_eq!(fb.len(), 48, "{cal}");
    let counts = &cal["expert_tokens"]["model.layers.0"];
    let total: u64 = counts.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(total, 4 * 64 * 2, "routed (token, slot) pairs: {counts}");
    for f in fb {
        assert!(f["tokens"].as_u64().unwrap() < 1000 && f["why"].as_str().unwrap().contains("1000"), "{f}");
    }
    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("round-to-nearest fallbacks"), "{card}");
    // `plan` shows the same coverage before a long run, without writing anything.
    let mut p = vec!["plan"];
    p.extend(args.iter().filter(|a| **a != "-o" && **a != out.to_str().unwrap() && **a != "quantize"));
    let o = run(&p, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("model.layers.0: 8 experts, routed tokens min"), "{err}");
    assert!(err.contains("8 under --min-expert-tokens 1000 (round-to-nearest)"), "{err}");
    // The artifact is still complete and verifiable.
    let o = run(&["verify", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bad_calibration_input_is_a_clear_error_and_nothing_is_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let src = fixture("qwen3moe");
    let (s, o_) = (src.to_str().unwrap(), out.to_str().unwrap());
    let data = calib();
    let missing = d.path().join("none.txt");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--to", "vllm:fp8-dynamic", "--data", &data], "applies to integer schemes"),
        (vec!["--to", "mlx:4", "--group-size", "32", "--method", "gptq"], "needs calibration data"),
        (vec!["--to", "mlx:4", "--group-size", "32", "--method", "rtn", "--data", &data], "--method rtn uses none"),
        (vec!["--to", "gguf:Q8_0", "--data", &data], "apply to vllm:… and mlx:… targets"),
        (vec!["--to", "mlx:4", "--group-size", "32", "--data", missing.to_str().unwrap()], "none.txt"),
        (vec!["--to", "mlx:4", "--group-size", "32", "--data", &data, "--ctx", "100000"], "fewer than one --ctx"),
        (vec!["--to", "mlx:4", "--group-size", "32", "--data", &data, "--damp=-1"], "--damp must be"),
    ];
    for (extra, want) in cases {
        let mut a = vec!["-q", "quantize", s, "-o", o_];
        a.extend_from_slice(&extra);
        let o = run(&a, &[]);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{extra:?}: want {want:?} in: {}", stderr(&o));
        assert!(!out.exists() && !d.path().join("o.solve").exists(), "{extra:?}: something was written");
        assert!(!d.path().join("o.partial.json").exists(), "{extra:?}: the lock file was left");
    }
    let o = run(&["-q", "plan", s, "--to", "gguf:Q4_K_M", "--data", &data], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// A calibrated run takes the output's lock before it writes its store beside the output: a second run of the
/// same output is refused before it touches the first's `OUT.solve/`.
#[test]
fn a_second_calibrated_run_of_the_same_output_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let lock = fs::File::create(d.path().join("o.partial.json")).unwrap();
    lock.try_lock().unwrap();
    fs::create_dir(d.path().join("o.solve")).unwrap();
    fs::write(d.path().join("o.solve/theirs"), "theirs").unwrap();
    for extra in [&["--group-size", "32"][..], &["--group-size", "32", "--resume"][..]] {
        let o = gptq("qwen3moe", "mlx:4", &out, extra, &[]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("another sling process is writing this output"), "{}", stderr(&o));
        assert_eq!(fs::read_to_string(d.path().join("o.solve/theirs")).unwrap(), "theirs");
        assert!(!out.exists() && !d.path().join("o.partial").exists());
    }
    drop(lock);
    let o = gptq("qwen3moe", "mlx:4", &out, &["--group-size", "32"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> =
        fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["o"], "the store and the lock file go once the artifact is in place");
}

/// Every tensor of an MLX directory's safetensors files, by name: its bytes.
fn tensors(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut m = std::collections::BTreeMap::new();
    for (name, bytes) in files(dir).into_iter().filter(|(n, _)| n.ends_with(".safetensors")) {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (t, v) in st.tensors() {
            m.insert(t, v.data().to_vec());
        }
    }
    m
}

/// mlx-lm's rearranged layouts (DeepSeek-V3's `embed_q`/`unembed_out`, FP8 source included; gpt-oss's stacked
/// experts, bf16 and MXFP4): GPTQ and AWQ solve every other weight, round these to nearest (exactly a `--method rtn`
/// run's bytes), list them in the manifest with the reason, leave gpt-oss's MXFP4 experts as the source's codes,
/// give the same bytes for any thread count, and are re-derived bit for bit by `verify --source --data --full`.
#[test]
fn mlx_rearranged_weights_are_rounded_to_nearest_and_listed() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("deepseekv3-fp8", &["self_attn.unembed_out."]),
        ("gptoss", &["mlp.experts.gate_proj.", "mlp.experts.up_proj.", "mlp.experts.down_proj."]),
        ("gptoss-mxfp4", &[]),
    ];
    for &(src, rearranged) in cases {
        let rtn = d.path().join(format!("{src}-rtn"));
        let srcp = fixture(src);
        let o = run(
            &[
                "-q",
                "quantize",
                srcp.to_str().unwrap(),
                "--to",
                "mlx:4",
                "-o",
                rtn.to_str().unwrap(),
                "--group-size",
                "32",
            ],
            &[],
        );
        assert!(o.status.success(), "{src} rtn: {}", stderr(&o));
        let want = tensors(&rtn);
        for method in ["gptq", "awq"] {
            let (a, b) = (d.path().join(format!("{src}-{method}-t1")), d.path().join(format!("{src}-{method}-t2")));
            for (out, t) in [(&a, "1"), (&b, "2")] {
                let o = gptq(src, "mlx:4", out, &["--group-size", "32", "--method", method, "-t", t], &[]);
                assert!(o.status.success(), "{src} {method} -t {t}: {}", stderr(&o));
            }
            same_weights(&a, &b, &format!("{src} {method}: -t 1 vs -t 2"));
            let got = tensors(&a);
            let (mut same, mut differ) = (0, 0);
            for (name, bytes) in &got {
                let listed = rearranged.iter().any(|r| name.contains(r));
                if listed || name.contains(".mlp.experts.") {
                    // rounded to nearest, or MXFP4 codes copied from the source
                    assert_eq!(Some(bytes), want.get(name), "{src} {method} {name}: not the round-to-nearest bytes");
                    same += 1;
                } else if name.ends_with(".weight") && bytes != &want[name] {
                    differ += 1;
                }
            }
            assert!(same > 0 && differ > 0, "{src} {method}: {same} kept, {differ} solved");
            let cal = &manifest(&a)["options"]["target"]["calibration"];
            let fb: Vec<&str> =
                cal["fallbacks"].as_array().unwrap().iter().map(|f| f["weight"].as_str().unwrap()).collect();
            let config: serde_json::Value =
                serde_json::from_slice(&fs::read(fixture(src).join("config.json")).unwrap()).unwrap();
            let n_layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
            assert_eq!(fb.len(), rearranged.len() * n_layers, "{src} {method}: {fb:?}");
            for f in cal["fallbacks"].as_array().unwrap() {
                let w = f["weight"].as_str().unwrap();
                assert!(rearranged.iter().any(|r| w.contains(r)), "{src} {method}: {w}");
                assert!(f["why"].as_str().unwrap().contains("round"), "{f}");
                assert_eq!(f["tokens"], 8 * 64, "{f}");
            }
            let (s, data) = (fixture(src), calib());
            let o =
                run(&["verify", a.to_str().unwrap(), "--source", s.to_str().unwrap(), "--full", "--data", &data], &[]);
            assert!(o.status.success(), "{src} {method}: verify --source --data: {}", stderr(&o));
        }
    }
}
