//! `sling eval` end to end: a GGUF read back through the converter's plan gives the reference's logits exactly
//! (F32, every fixture architecture); quantized candidates give a KLD > 0; the --max-kld gate and bad input.
//! Agreement with llama-perplexity is tested in tests/interop/test_eval.py.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/data/calib.txt")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sling")).args(args).output().unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sling-eval-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn convert(src: &Path, ty: &str, out: &Path) {
    let o = run(&[
        "-q",
        "convert",
        src.to_str().unwrap(),
        "--type",
        ty,
        "-o",
        out.to_str().unwrap(),
        "--tokenizer-pre",
        "gpt-2",
        "--no-manifest",
    ]);
    assert!(o.status.success(), "convert: {}", String::from_utf8_lossy(&o.stderr));
}

fn eval(src: &Path, cand: &Path, extra: &[&str]) -> Output {
    let d = data();
    let mut a = vec![
        "-q",
        "eval",
        "--ref",
        src.to_str().unwrap(),
        cand.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--ctx",
        "32",
        "--chunks",
        "4",
        "--json",
    ];
    a.extend_from_slice(extra);
    run(&a)
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "eval failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Every converter op (Q/K permutation, expert stacking, MLA kv_b split, gpt-oss interleave/transposes, FP8
/// dequantization, MXFP4 repacking) runs backwards exactly: an F32 GGUF evaluates as the checkpoint itself with
/// `--as weights`. Under the default `--as llama.cpp-cpu`, F32 weights round nothing: the figures are the same
/// (DeepSeek's absorbed MLA sums in another order: within 1e-6), except gpt-oss's MXFP4 experts, whose
/// products llama.cpp runs on q8_0 activations.
#[test]
fn f32_gguf_reads_back_as_the_reference_for_every_architecture() {
    let dir = tmp("f32");
    for name in [
        "llama",
        "qwen2",
        "mixtral-sharded",
        "qwen2moe",
        "qwen3moe",
        "olmoe",
        "deepseekv2",
        "deepseekv2lite",
        "deepseekv3",
        "deepseekv3-fp8",
        "gptoss",
        "gptoss-mxfp4",
    ] {
        let out = dir.join(format!("{name}.gguf"));
        convert(&fixture(name), "f32", &out);
        let r = json(&eval(&fixture(name), &out, &["--as", "weights"]));
        assert_eq!(r["arithmetic"], "weights");
        assert_eq!(r["kld_max"], 0.0, "{name}: {r}");
        assert_eq!(r["ppl"], r["ppl_ref"], "{name}");
        assert_eq!(r["top1"], 1.0, "{name}");
        assert_eq!(r["tokens"], 4 * 15, "{name}");
        let d = json(&eval(&fixture(name), &out, &[]));
        assert_eq!(d["arithmetic"], "llama.cpp-cpu");
        let kld = d["kld_max"].as_f64().unwrap();
        match name {
            "gptoss-mxfp4" => assert!(kld > 0.0 && d["kld_mean"].as_f64().unwrap() < 0.01, "{name}: {d}"),
            n if n.starts_with("deepseek") => assert!(kld < 1e-6, "{name}: {d}"),
            _ => assert_eq!(kld, 0.0, "{name}: {d}"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn quantized_candidate_gate_and_hf_candidate() {
    let dir = tmp("q8");
    let src = fixture("qwen3moe");
    let out = dir.join("q8.gguf");
    convert(&src, "q8_0", &out);
    let r = json(&eval(&src, &out, &[]));
    let kld = r["kld_mean"].as_f64().unwrap();
    assert!(kld > 0.0 && kld < 0.05, "{r}");
    assert!(r["data_sha256"].as_str().is_some_and(|h| h.len() == 64));
    // llama.cpp's q8_0 activations add their own error to the weights' (tests/interop/test_eval.py compares
    // both with llama-perplexity)
    let w = json(&eval(&src, &out, &["--as", "weights"]));
    assert!(w["kld_mean"].as_f64().unwrap() < kld, "weights {w} vs llama.cpp-cpu {r}");
    assert_eq!(json(&eval(&src, &out, &["--as", "llama.cpp-cpu"]))["kld_mean"], r["kld_mean"]);
    // the rounded rows do not depend on the thread count
    for t in ["1", "3"] {
        let j = json(&eval(&src, &out, &["-t", t]));
        assert_eq!((&j["kld_mean"], &j["ppl"]), (&r["kld_mean"], &r["ppl"]), "-t {t}");
    }

    // the gate: exit 1 above the threshold, 0 below, and the verdict in the JSON
    let o = eval(&src, &out, &["--max-kld", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["pass"], false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("FAIL"));
    assert_eq!(json(&eval(&src, &out, &["--max-kld", "1"]))["pass"], true);

    // a split GGUF, named by any shard
    let split = dir.join("split.gguf");
    let o = run(&[
        "-q",
        "convert",
        src.to_str().unwrap(),
        "--type",
        "f32",
        "-o",
        split.to_str().unwrap(),
        "--tokenizer-pre",
        "gpt-2",
        "--no-manifest",
        "--split-max-tensors",
        "10",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for shard in ["split-00001-of-00003.gguf", "split-00003-of-00003.gguf"] {
        assert_eq!(json(&eval(&src, &dir.join(shard), &[]))["kld_max"], 0.0, "{shard}");
    }

    // an HF checkpoint as the candidate: the reference against itself
    let r = json(&eval(&src, &src, &[]));
    assert_eq!(r["kld_max"], 0.0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tmp("bad");
    let src = fixture("qwen3moe");
    // a GGUF of another model: named tensor, exit 2
    let other = dir.join("mixtral.gguf");
    convert(&fixture("mixtral"), "f32", &other);
    let o = eval(&src, &other, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error:") && err.contains("candidate"), "{err}");
    // too little text for the context
    let d = data();
    let s = src.to_str().unwrap();
    let o = run(&["-q", "eval", "--ref", s, s, "--data", d.to_str().unwrap(), "--ctx", "100000"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 200000"));
    // a missing candidate
    let o = eval(&src, &dir.join("nope.gguf"), &[]);
    assert_eq!(o.status.code(), Some(2));
    // a bad threshold
    let o = eval(&src, &src, &["--max-kld", "nan"]);
    assert_eq!(o.status.code(), Some(2));
    // llama.cpp's arithmetic needs ggml types: a directory candidate has none
    let o = eval(&src, &src, &["--as", "llama.cpp-cpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--as llama.cpp-cpu needs a GGUF candidate"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `quantize --eval`: the figures land in the manifest and the card, the artifact still verifies, the same run
/// twice gives the same bytes (no timings or machine paths recorded), and --max-kld fails with exit 1 while
/// keeping the artifact.
#[test]
fn quantize_eval_records_quality() {
    let dir = tmp("qeval");
    let src = fixture("qwen3moe");
    let d = data();
    let quantize = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "-q",
            "quantize",
            src.to_str().unwrap(),
            "--to",
            "gguf:Q4_K_M",
            "-o",
            out.to_str().unwrap(),
            "--tokenizer-pre",
            "gpt-2",
            "--reproducible",
            "--eval",
            d.to_str().unwrap(),
            "--eval-ctx",
            "32",
            "--eval-chunks",
            "4",
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    let mut manifests = Vec::new();
    for i in 0..2 {
        let sub = dir.join(format!("run{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let out = sub.join("m.gguf");
        let o = quantize(&out, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = run(&["verify", out.to_str().unwrap()]);
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(sub.join("m.sling.json")).unwrap()).unwrap();
        let q = &m["quality"];
        assert!(q["kld_mean"].as_f64().is_some_and(|k| k > 0.0), "{q}");
        assert_eq!(q["tokens"], 4 * 15);
        assert_eq!(q["arithmetic"], "llama.cpp-cpu", "{q}");
        assert!(q.get("seconds").is_none());
        let card = std::fs::read_to_string(sub.join("README.md")).unwrap();
        assert!(card.contains("| quality | KLD mean"), "{card}");
        manifests.push((std::fs::read(sub.join("m.sling.json")).unwrap(), card));
    }
    // the data path is recorded as given, so equal runs give equal manifests and cards
    assert_eq!(manifests[0], manifests[1]);

    let sub = dir.join("gate");
    std::fs::create_dir_all(&sub).unwrap();
    let out = sub.join("m.gguf");
    let o = quantize(&out, &["--max-kld", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-kld"));
    assert!(run(&["verify", out.to_str().unwrap()]).status.success());

    // --eval-as weights: the weights' error alone, recorded as such
    let sub = dir.join("weights");
    std::fs::create_dir_all(&sub).unwrap();
    let out = sub.join("m.gguf");
    let o = quantize(&out, &["--eval-as", "weights"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(sub.join("m.sling.json")).unwrap()).unwrap();
    assert_eq!(m["quality"]["arithmetic"], "weights");
    std::fs::remove_dir_all(&dir).ok();
}
