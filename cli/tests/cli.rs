//! End-to-end tests of the `sling` binary: bad input gets a clear error, exit code 2, and nothing
//! is written; good input converts deterministically whatever the thread count.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sling"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

/// A writable copy of a fixture.
fn copy_fixture(name: &str, tmp: &Path) -> PathBuf {
    let dst = tmp.join(name);
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn convert(src: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--tokenizer-pre", "gpt-2", "-q"];
    a.extend_from_slice(extra);
    run(&a)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run failed with exit code 2, said `needle`, and left no file in `out_dir`.
fn assert_refused(o: &Output, needle: &str, out_dir: &Path) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, got {:?}; stderr: {e}", o.status.code());
    assert!(e.starts_with("error: "), "stderr should start with 'error: ': {e}");
    assert!(e.contains(needle), "stderr should mention {needle:?}: {e}");
    let left: Vec<_> = fs::read_dir(out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing may be left in the output dir, found {left:?}");
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let out = t.path().join("out");
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&out).unwrap();
    (t, src, out)
}

#[test]
fn output_is_identical_across_thread_counts_and_runs() {
    let (_t, _src, out) = dirs();
    for ty in ["bf16", "q8_0"] {
        let mut hashes = Vec::new();
        for (i, threads) in ["1", "2", "2", "3"].iter().enumerate() {
            let p = out.join(format!("{ty}-{i}.gguf"));
            let o = convert(&fixture("qwen2moe"), &p, &["--type", ty, "-t", threads]);
            assert!(o.status.success(), "{}", stderr(&o));
            hashes.push(fs::read(&p).unwrap());
        }
        assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{ty}: outputs differ across threads/runs");
    }
}

#[test]
fn truncated_safetensors_is_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("llama", t.path());
    let f = m.join("model.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "model.safetensors", &out);
}

#[test]
fn malformed_header_is_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("llama", t.path());
    fs::write(m.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "not a valid safetensors file", &out);
    fs::write(m.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "model.safetensors", &out);
}

#[test]
fn missing_shard_is_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("mixtral-sharded", t.path());
    let shard = fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("00002-of-00003.safetensors"))
        .unwrap();
    fs::remove_file(&shard).unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "is named in the index but missing", &out);
}

#[test]
fn shard_escaping_the_directory_is_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("mixtral-sharded", t.path());
    let ip = m.join("model.safetensors.index.json");
    let s = fs::read_to_string(&ip).unwrap().replacen(
        "\"model-00001-of-00003.safetensors\"",
        "\"../outside.safetensors\"",
        1,
    );
    fs::write(&ip, s).unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "escapes the model directory", &out);
}

#[test]
fn index_disagreeing_with_shards_is_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("mixtral-sharded", t.path());
    let ip = m.join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&ip).unwrap()).unwrap();
    v["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00003.safetensors".into();
    fs::write(&ip, v.to_string()).unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "model.layers.9.ghost.weight", &out);
}

/// Rewrites one tensor of a single-file checkpoint (same dtype and shape) with `f`.
fn poke_tensor(model: &Path, tensor: &str, f: impl Fn(&mut [u8])) {
    let p = model.join("model.safetensors");
    let bytes = fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let (meta_n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(n, meta_n);
    let info = meta.info(tensor).unwrap();
    drop(st);
    let mut out = bytes.clone();
    let (a, b) = (8 + n + info.data_offsets.0, 8 + n + info.data_offsets.1);
    f(&mut out[a..b]);
    fs::write(&p, out).unwrap();
}

#[test]
fn nonfinite_weights_are_reported_and_refused_unless_allowed() {
    let (t, _src, out) = dirs();
    // bf16 NaN (0x7fc0) as the 4th element, -Inf (0xff80) as the 37th: every output type's path (bytes copied
    // from the mapped source for bf16, bf16 straight to Q8_0, decoded for f16/f32) must see each.
    for (at, bits) in [(3usize, [0xc0, 0x7f]), (36, [0x80, 0xff])] {
        let m = copy_fixture("llama", t.path());
        poke_tensor(&m, "model.layers.1.mlp.down_proj.weight", |d| d[2 * at..2 * at + 2].copy_from_slice(&bits));
        for ty in ["bf16", "q8_0", "f16", "f32"] {
            let o = convert(&m, &out.join("x.gguf"), &["--type", ty]);
            assert_refused(&o, "blk.1.ffn_down.weight", &out);
            assert!(stderr(&o).contains(&format!("first at element {at}")), "{ty}: {}", stderr(&o));
            let o = convert(&m, &out.join("x.gguf"), &["--type", ty, "--allow-nonfinite"]);
            assert!(o.status.success(), "{ty}: {}", stderr(&o));
            fs::remove_dir_all(&out).unwrap();
            fs::create_dir(&out).unwrap();
        }
        fs::remove_dir_all(&m).unwrap();
    }
}

#[test]
fn output_inside_the_input_directory_is_refused() {
    let (t, _src, _out) = dirs();
    let m = copy_fixture("llama", t.path());
    let before: Vec<_> = fs::read_dir(&m).unwrap().map(|e| e.unwrap().file_name()).collect();
    let o = convert(&m, &m.join("x.gguf"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("inside the input directory"), "{}", stderr(&o));
    let o = convert(&m.join("model.safetensors"), &m.join("model.safetensors"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("input"), "{}", stderr(&o));
    let after: Vec<_> = fs::read_dir(&m).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before.len(), after.len(), "the source directory must be untouched");
}

#[test]
fn shapes_disagreeing_with_config_are_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("qwen2moe", t.path());
    let cp = m.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&cp).unwrap()).unwrap();
    v["hidden_size"] = 96.into();
    fs::write(&cp, v.to_string()).unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "disagrees with config.json", &out);
}

#[test]
fn unsupported_architecture_is_refused_up_front() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("llama", t.path());
    let cp = m.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&cp).unwrap()).unwrap();
    v["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    fs::write(&cp, v.to_string()).unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "FalconForCausalLM is not supported", &out);
}

#[test]
fn unknown_tokenizer_hash_names_the_flag() {
    let (_t, _src, out) = dirs();
    let o = run(&["convert", fixture("qwen3moe").to_str().unwrap(), "-o", out.join("x.gguf").to_str().unwrap()]);
    assert_refused(&o, "--tokenizer-pre", &out);
}

/// Hostile dimensions in `config.json` (zero or negative heads, widths past any model, more experts per token than
/// experts, KV heads that do not divide the heads) are input errors naming the key, before any plan divides by
/// them or allocates from them; the source stays as it was.
#[test]
fn hostile_config_dimensions_are_refused() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("num_attention_heads", 0.into(), "num_attention_heads has an unexpected value 0"),
        ("num_attention_heads", (-4).into(), "num_attention_heads has an unexpected value -4"),
        ("hidden_size", serde_json::json!(1e30), "hidden_size"),
        ("vocab_size", serde_json::json!(1u64 << 40), "vocab_size"),
        ("num_hidden_layers", "2".into(), "num_hidden_layers"),
        (
            "num_experts_per_tok",
            99.into(),
            "num_experts_per_tok has an unexpected value 99 (must be from 1 to the 8 experts)",
        ),
        ("num_experts_per_tok", 0.into(), "num_experts_per_tok has an unexpected value 0"),
        ("num_key_value_heads", 3.into(), "must divide num_attention_heads"),
    ];
    for (key, value, needle) in cases {
        let (t, _src, out) = dirs();
        let m = copy_fixture("qwen3moe", t.path());
        let cp = m.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&cp).unwrap()).unwrap();
        v[*key] = value.clone();
        fs::write(&cp, v.to_string()).unwrap();
        let before = fs::read(&cp).unwrap();
        assert_refused(&convert(&m, &out.join("x.gguf"), &[]), needle, &out);
        assert_eq!(fs::read(&cp).unwrap(), before, "{key}: the source changed");
    }
}

#[test]
fn missing_config_is_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("llama", t.path());
    fs::remove_file(m.join("config.json")).unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "config.json", &out);
}

#[test]
fn splits_are_named_like_llama_cpp() {
    let (_t, _src, out) = dirs();
    let o = convert(&fixture("olmoe"), &out.join("m.gguf"), &["--split-max-tensors", "10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> =
        fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    // The shards, one provenance manifest for the set, named after the base name (docs/manifest.md), and
    // the model card (docs/pipeline.md).
    assert_eq!(
        names,
        ["README.md", "m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf", "m.sling.json"]
    );
}

#[test]
fn inspect_json_is_stable() {
    let o = run(&["inspect", fixture("deepseekv3").to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["architecture"], "DeepseekV3ForCausalLM");
    assert_eq!(v["experts"]["routed"], 8);
    assert_eq!(v["experts"]["shared"], 1);
    for g in ["attention", "routed_experts", "shared_experts", "router", "embeddings", "output", "dense_ffn", "norms"] {
        assert!(v["groups"][g]["bytes"].as_u64().unwrap() > 0, "group {g}");
    }
    let total = v["params"]["total"].as_u64().unwrap();
    assert!(v["params"]["active"].as_u64().unwrap() < total);
    for k in ["bf16", "q8_0", "q4_k_m_like_4.8bpw", "low_2.5bpw"] {
        assert!(v["estimates"][k].as_u64().unwrap() > 0);
    }
}

#[test]
fn inspect_reads_gguf_too() {
    let (_t, _src, out) = dirs();
    let p = out.join("m.gguf");
    assert!(convert(&fixture("mixtral"), &p, &[]).status.success());
    let o = run(&["inspect", p.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["experts"]["routed"], 8);
}

/// `--help` texts are part of the interface: compared with committed snapshots.
/// Regenerate with `UPDATE_SNAPSHOTS=1 cargo test -p sling --test cli help`.
#[test]
fn help_snapshots() {
    for (name, args) in [
        ("help", vec!["--help"]),
        ("convert-help", vec!["convert", "--help"]),
        ("inspect-help", vec!["inspect", "--help"]),
        ("eval-help", vec!["eval", "--help"]),
        ("calibrate-help", vec!["calibrate", "--help"]),
    ] {
        let o = bin().args(&args).env("COLUMNS", "100").output().unwrap();
        assert!(o.status.success());
        let got = String::from_utf8(o.stdout).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(format!("{name}.txt"));
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            fs::write(&path, &got).unwrap();
        }
        let want = fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(got, want, "{name} changed; rerun with UPDATE_SNAPSHOTS=1 if intended");
    }
}

#[test]
fn bad_usage_exits_2() {
    let o = run(&["convert"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["convert", "x", "-o", "y", "--type", "q9"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn malformed_json_files_are_refused() {
    let (t, _src, out) = dirs();
    let m = copy_fixture("llama", t.path());
    fs::write(m.join("config.json"), b"{\"architectures\": [").unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "config.json", &out);
    let m = copy_fixture("mixtral-sharded", t.path());
    fs::write(m.join("model.safetensors.index.json"), b"[1, 2]").unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "weight_map", &out);
    let m = copy_fixture("qwen2moe", t.path());
    fs::write(m.join("tokenizer.json"), b"{\"model\": 3}").unwrap();
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "tokenizer", &out);
}

#[test]
fn a_failed_conversion_leaves_no_partial_file() {
    // The NaN sits in the last tensor written, so the writer has already streamed most of the file
    // into its temporary when the error comes: that temporary must be removed.
    let (t, _src, out) = dirs();
    let m = copy_fixture("llama", t.path());
    poke_tensor(&m, "model.norm.weight", |d| d[0..2].copy_from_slice(&[0x80, 0x7f]));
    assert_refused(&convert(&m, &out.join("x.gguf"), &[]), "output_norm.weight", &out);
}
