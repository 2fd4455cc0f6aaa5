//! `sling quantize` and `sling plan` end to end: help and plan snapshots, determinism, and bad input (clear error,
//! exit 2, nothing written). Byte-identity with llama-quantize is tested in tests/interop/test_quantize.py.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sling"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

fn run(args: &[&str]) -> Output {
    bin().args(args).env("COLUMNS", "100").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn quantize(src: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["quantize", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--tokenizer-pre", "gpt-2", "-q"];
    a.extend_from_slice(extra);
    run(&a)
}

fn snapshot(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        fs::write(&path, got).unwrap();
    }
    let want = fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(got, want, "{name} changed; rerun with UPDATE_SNAPSHOTS=1 if intended");
}

/// Regenerate with `UPDATE_SNAPSHOTS=1 cargo test -p sling --test quantize`.
#[test]
fn help_and_plan_snapshots() {
    for (name, args) in [("quantize-help", vec!["quantize", "--help"]), ("plan-help", vec!["plan", "--help"])] {
        let o = run(&args);
        assert!(o.status.success());
        snapshot(name, &String::from_utf8(o.stdout).unwrap());
    }
    let src = fixture("mixtral");
    let o = run(&["plan", src.to_str().unwrap(), "--to", "gguf:Q4_K_M", "--tokenizer-pre", "gpt-2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    snapshot("plan-mixtral-Q4_K_M", &String::from_utf8(o.stdout).unwrap());
    let o = run(&["plan", src.to_str().unwrap(), "--to", "gguf:moe-q4", "--tokenizer-pre", "gpt-2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["preset"], "moe-q4");
    assert_eq!(v["base"], "Q4_K_M");
    assert_eq!(v["file_type"], 15);
    let t = v["tensors"].as_array().unwrap();
    let ty = |n: &str| t.iter().find(|x| x["name"] == n).unwrap()["type"].as_str().unwrap().to_string();
    assert_eq!(ty("blk.0.ffn_gate_inp.weight"), "f32", "the router is never quantized");
    assert_eq!(ty("blk.0.attn_q.weight"), "q8_0");
    // The estimate depends on the machine (threads, calibration figures): tested in tests/pipeline.rs.
    let mut v = v;
    v.as_object_mut().unwrap().remove("estimate");
    snapshot("plan-mixtral-moe-q4", &serde_json::to_string_pretty(&v).unwrap());
}

#[test]
fn output_is_identical_across_thread_counts_and_runs() {
    let t = tempfile::tempdir().unwrap();
    for preset in ["gguf:Q4_K_M", "gguf:IQ4_NL", "gguf:moe-q2"] {
        let mut files = Vec::new();
        for (i, threads) in ["1", "2", "2", "3"].iter().enumerate() {
            let p = t.path().join(format!("{}-{i}.gguf", &preset[5..]));
            let o = quantize(&fixture("qwen2moe"), &p, &["--to", preset, "-t", threads]);
            assert!(o.status.success(), "{}", stderr(&o));
            files.push(fs::read(&p).unwrap());
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]), "{preset}: outputs differ across threads/runs");
    }
}

/// Failed with exit code 2, said `needle`, left nothing in `dir`.
fn assert_refused(o: &Output, needle: &str, dir: &Path) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2: {e}");
    assert!(e.starts_with("error: ") && e.contains(needle), "stderr should mention {needle:?}: {e}");
    let left: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing may be left, found {left:?}");
}

#[test]
fn bad_input_is_refused_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let out_dir = t.path().join("out");
    fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("x.gguf");
    let src = fixture("qwen3moe");
    let w = |name: &str, bytes: &[u8]| {
        let p = t.path().join(name);
        fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--to".into(), "gguf:Q4_K_X".into()], "unknown preset"),
        (vec!["--to".into(), "Q4_K_M".into()], "expected gguf:PRESET"),
        (vec![], "--to gguf:PRESET"),
        (vec!["--to".into(), "gguf:Q4_K_M".into(), "--tensor-type".into(), "ffn=q9_K".into()], "unknown tensor type"),
        (vec!["--to".into(), "gguf:Q4_K_M".into(), "--tensor-type".into(), "(=q8_0".into()], "bad pattern"),
        (vec!["--to".into(), "gguf:Q4_K_M".into(), "--output-tensor-type".into(), "q7".into()], "unknown tensor type"),
        (
            vec![
                "--recipe".into(),
                w("bad.toml", b"base = \"Q4_K_M\"\n[[rule]]\nrole = \"everything\"\ntype = \"q8_0\"\n"),
            ],
            "recipe",
        ),
        (vec!["--recipe".into(), w("nobase.toml", b"[[rule]]\ntype = \"q8_0\"\n")], "base"),
        (
            vec!["--to".into(), "gguf:Q4_K_M".into(), "--imatrix".into(), w("junk.dat", b"\x01\x00\x00\x00\xff\xff")],
            "imatrix",
        ),
        (
            vec!["--to".into(), "gguf:Q4_K_M".into(), "--imatrix".into(), w("trunc.gguf", b"GGUF\x03\x00\x00\x00")],
            "imatrix",
        ),
        (
            vec![
                "--to".into(),
                "gguf:Q4_K_M".into(),
                "--imatrix".into(),
                t.path().join("missing").display().to_string(),
            ],
            "imatrix",
        ),
    ];
    for (extra, needle) in cases {
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        let o = quantize(&src, &out, &extra);
        assert_refused(&o, needle, &out_dir);
    }
}

/// An imatrix whose entry does not fit the tensor is an error naming the tensor (llama-quantize: "imatrix size
/// ... is different from tensor size").
#[test]
fn imatrix_of_the_wrong_size_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let out_dir = t.path().join("out");
    fs::create_dir_all(&out_dir).unwrap();
    // legacy .dat: one entry, ncall 1, 3 values
    let name = b"blk.0.attn_q.weight";
    let mut b = 1i32.to_le_bytes().to_vec();
    b.extend((name.len() as i32).to_le_bytes());
    b.extend(name);
    b.extend(1i32.to_le_bytes());
    b.extend(3i32.to_le_bytes());
    for v in [1.0f32, 2.0, 3.0] {
        b.extend(v.to_le_bytes());
    }
    let im = t.path().join("im.dat");
    fs::write(&im, b).unwrap();
    let o = quantize(
        &fixture("qwen3moe"),
        &out_dir.join("x.gguf"),
        &["--to", "gguf:Q4_K_M", "--imatrix", im.to_str().unwrap()],
    );
    assert_refused(&o, "blk.0.attn_q.weight", &out_dir);
}

/// A shard of a split GGUF is refused as llama-quantize's input would be meaningless without the rest (it keeps
/// the split only with `--keep-split`, which sling does not offer): exit 2, the message says how to proceed, nothing
/// is written, the shards are untouched.
#[test]
fn a_shard_of_a_split_gguf_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let split = t.path().join("split.gguf");
    let o = run(&[
        "convert",
        fixture("qwen3moe").to_str().unwrap(),
        "--type",
        "bf16",
        "--split-max-tensors",
        "10",
        "--tokenizer-pre",
        "gpt-2",
        "--no-manifest",
        "-q",
        "-o",
        split.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shard = t.path().join("split-00001-of-00003.gguf");
    let before = fs::read(&shard).unwrap();
    let out_dir = t.path().join("out");
    fs::create_dir_all(&out_dir).unwrap();
    for preset in ["gguf:Q4_K_M", "gguf:Q8_0"] {
        let o = run(&[
            "quantize",
            shard.to_str().unwrap(),
            "--to",
            preset,
            "-q",
            "-o",
            out_dir.join("q.gguf").to_str().unwrap(),
        ]);
        assert_refused(&o, "one shard of a split GGUF; merge it first", &out_dir);
    }
    assert_eq!(fs::read(&shard).unwrap(), before);
}
