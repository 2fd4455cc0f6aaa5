//! Provenance manifests and `sling verify`: an untouched artifact verifies (exit 0); any flipped
//! byte, truncation, missing or extra file, swapped tensor or edited manifest is a mismatch that names
//! what differs (exit 1); no manifest means "could not check" (exit 2). Manifests are byte-identical
//! across thread counts and runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sling_formats::gguf::GgufFile;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sling"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

/// A writable copy of a fixture.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Without the model card (README.md): these tests are about the GGUF files and the manifest; the card's
/// coverage by the manifest is tested in tests/pipeline.rs.
fn convert(src: &Path, out: &Path, extra: &[&str]) {
    let mut a = vec![
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--tokenizer-pre",
        "gpt-2",
        "-q",
        "--no-model-card",
    ];
    a.extend_from_slice(extra);
    let o = run(&a);
    assert!(o.status.success(), "convert failed: {}", stderr(&o));
}

fn verify(artifact: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["verify", artifact.to_str().unwrap()];
    a.extend_from_slice(extra);
    run(&a)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_verified(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "expected verified; stdout: {}\nstderr: {}", stdout(o), stderr(o));
    assert!(stdout(o).starts_with("verified: "), "{}", stdout(o));
}

/// Exit 1 and every needle in the problem lines on stdout.
fn assert_mismatch(o: &Output, needles: &[&str]) {
    let out = stdout(o);
    assert_eq!(o.status.code(), Some(1), "expected mismatch; stdout: {out}\nstderr: {}", stderr(o));
    assert!(stderr(o).contains("verification failed"), "{}", stderr(o));
    for n in needles {
        assert!(out.contains(n), "the problems should mention {n:?}:\n{out}");
    }
}

fn flip(path: &Path, at: u64) {
    let mut b = fs::read(path).unwrap();
    b[at as usize] ^= 0x01;
    fs::write(path, b).unwrap();
}

/// A converted single-file artifact `dir/m.gguf` + `dir/m.sling.json`.
fn artifact(name: &str, ty: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m.gguf");
    convert(&fixture(name), &out, &["--type", ty]);
    (t, out)
}

#[test]
fn untouched_artifact_verifies_and_the_manifest_describes_it() {
    let (t, out) = artifact("qwen3moe", "q8_0");
    let mp = t.path().join("m.sling.json");
    assert!(mp.is_file(), "the manifest is written beside the output");
    assert_verified(&verify(&out, &[]));
    assert_verified(&verify(&mp, &[]));
    assert_verified(&verify(&out, &["--source", fixture("qwen3moe").to_str().unwrap()]));

    let o = verify(&out, &["--json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "verified");
    assert_eq!(v["problems"], serde_json::json!([]));

    let m: serde_json::Value = serde_json::from_slice(&fs::read(&mp).unwrap()).unwrap();
    assert_eq!(m["schema"], "sling.manifest/1");
    assert_eq!(m["sling"]["name"], "sling");
    assert_eq!(m["sling"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(!m["sling"]["git_commit"].as_str().unwrap().is_empty());
    assert_eq!(m["compute"], "cpu");
    assert_eq!(m["output"], "m.gguf");
    assert_eq!(m["options"]["type"], "q8_0");
    assert_eq!(m["options"]["tokenizer_pre"], "gpt-2");
    assert_eq!(m["options"]["allow_nonfinite"], false);
    assert!(m["manifest_sha256"].as_str().unwrap().len() == 64);
    let bytes = fs::read(&out).unwrap();
    assert_eq!(m["outputs"][0]["name"], "m.gguf");
    assert_eq!(m["outputs"][0]["size"], bytes.len() as u64);
    let srcs: Vec<&str> = m["sources"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
    assert_eq!(srcs, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
    for s in m["sources"].as_array().unwrap() {
        let len = fs::metadata(fixture("qwen3moe").join(s["path"].as_str().unwrap())).unwrap().len();
        assert_eq!(s["size"], len);
    }
    let g = GgufFile::open(&out).unwrap();
    let tensors = m["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), g.tensors.len());
    for (rec, info) in tensors.iter().zip(&g.tensors) {
        assert_eq!(rec["name"], info.name.as_str());
        assert_eq!(rec["type"], info.dtype.name());
        assert_eq!(rec["file"], "m.gguf");
        assert_eq!(rec["offset"], g.data_offset + info.offset);
        assert_eq!(rec["n_bytes"], info.n_bytes);
        assert!(!rec["sources"].as_array().unwrap().is_empty(), "{}", info.name);
    }
    let emb = tensors.iter().find(|t| t["name"] == "token_embd.weight").unwrap();
    assert_eq!(emb["sources"], serde_json::json!(["model.embed_tokens.weight"]));
}

/// Byte ranges of a GGUF: a byte in the KV area, in the tensor-info area, in a tensor's data (and
/// that tensor's name), and in padding.
struct Regions {
    kv: u64,
    tensor_info: u64,
    data: u64,
    data_tensor: String,
    padding: u64,
}

fn regions(path: &Path) -> Regions {
    let bytes = fs::read(path).unwrap();
    let g = GgufFile::open(path).unwrap();
    let header = &bytes[..g.data_offset as usize];
    let find = |needle: &[u8]| header.windows(needle.len()).rposition(|w| w == needle).unwrap() as u64;
    // The first key's bytes start after magic, version, n_tensors, n_kv and the key's length.
    let kv = 24 + 8 + 2;
    let first = &g.tensors[0];
    let tensor_info = find(first.name.as_bytes()) + 1;
    let last = g.tensors.last().unwrap();
    let header_end = find(last.name.as_bytes()) + last.name.len() as u64 + 4 + 8 * last.ne.len() as u64 + 4 + 8;
    let t = &g.tensors[g.tensors.len() / 2];
    let data = g.data_offset + t.offset + t.n_bytes / 2;
    let mut padding = None;
    if header_end < g.data_offset {
        padding = Some(header_end);
    }
    for t in &g.tensors {
        let end = t.offset + t.n_bytes;
        if padding.is_none() && end % g.alignment != 0 {
            padding = Some(g.data_offset + end);
        }
    }
    let padding = padding.expect("the fixture output has some padding");
    assert_eq!(bytes[padding as usize], 0);
    Regions { kv, tensor_info, data, data_tensor: t.name.clone(), padding }
}

#[test]
fn a_flipped_byte_in_any_region_is_found() {
    let (t, out) = artifact("qwen3moe", "q8_0");
    let r = regions(&out);
    for (what, at, tensor) in [
        ("kv", r.kv, None),
        ("tensor info", r.tensor_info, None),
        ("data", r.data, Some(r.data_tensor.as_str())),
        ("padding", r.padding, None),
    ] {
        let d = t.path().join(what.replace(' ', "_"));
        fs::create_dir_all(&d).unwrap();
        fs::copy(&out, d.join("m.gguf")).unwrap();
        fs::copy(t.path().join("m.sling.json"), d.join("m.sling.json")).unwrap();
        flip(&d.join("m.gguf"), at);
        let o = verify(&d.join("m.gguf"), &[]);
        assert_mismatch(&o, &["m.gguf: file differs"]);
        if let Some(tn) = tensor {
            assert_mismatch(&o, &[format!("m.gguf: tensor {tn}: data differs").as_str()]);
            let v: serde_json::Value = serde_json::from_slice(&verify(&d.join("m.gguf"), &["--json"]).stdout).unwrap();
            assert_eq!(v["status"], "mismatch");
            let kinds: Vec<&str> =
                v["problems"].as_array().unwrap().iter().map(|p| p["kind"].as_str().unwrap()).collect();
            assert_eq!(kinds, ["file_hash", "tensor_data"], "{what}");
            assert_eq!(v["problems"][1]["tensor"], tn);
            assert_eq!(v["problems"][1]["file"], "m.gguf");
        }
        if what == "padding" {
            assert!(!stdout(&o).contains("tensor"), "padding is no tensor's data: {}", stdout(&o));
        }
    }
}

#[test]
fn truncation_and_swapped_tensors_are_found() {
    let (_t, out) = artifact("qwen3moe", "bf16");
    let pristine = fs::read(&out).unwrap();
    fs::write(&out, &pristine[..pristine.len() - 40]).unwrap();
    assert_mismatch(&verify(&out, &[]), &["m.gguf: file differs", "m.gguf: cannot be read as GGUF"]);

    // Swap the data of two tensors of the same size.
    let mut bytes = pristine.clone();
    fs::write(&out, &pristine).unwrap();
    let g = GgufFile::open(&out).unwrap();
    let a = g.tensor("blk.0.attn_q.weight").unwrap().clone();
    let b = g.tensor("blk.1.attn_q.weight").unwrap().clone();
    assert_eq!(a.n_bytes, b.n_bytes);
    let (sa, sb, n) = ((g.data_offset + a.offset) as usize, (g.data_offset + b.offset) as usize, a.n_bytes as usize);
    assert_ne!(pristine[sa..sa + n], pristine[sb..sb + n], "the fixture's two projections should differ");
    drop(g);
    bytes[sa..sa + n].copy_from_slice(&pristine[sb..sb + n]);
    bytes[sb..sb + n].copy_from_slice(&pristine[sa..sa + n]);
    fs::write(&out, &bytes).unwrap();
    assert_mismatch(
        &verify(&out, &[]),
        &["tensor blk.0.attn_q.weight: data differs", "tensor blk.1.attn_q.weight: data differs"],
    );
}

#[test]
fn split_outputs_missing_and_extra_shards() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m.gguf");
    convert(&fixture("olmoe"), &out, &["--split-max-tensors", "10"]);
    let shard = |i: u32| t.path().join(format!("m-{i:05}-of-00003.gguf"));
    let mp = t.path().join("m.sling.json");
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&mp).unwrap()).unwrap();
    let names: Vec<&str> = m["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]);
    assert_eq!(m["options"]["split"]["max_tensors"], 10);
    // Any shard, the base name or the manifest finds the manifest of the whole set.
    for a in [shard(1), shard(3), out.clone(), mp.clone()] {
        assert_verified(&verify(&a, &[]));
    }
    // A shard name that is not there (a typo in the count) is not the set.
    let o = verify(&t.path().join("m-00001-of-00004.gguf"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("m-00001-of-00004.gguf: no such file"), "{}", stderr(&o));

    // An extra file of the set.
    fs::copy(shard(3), t.path().join("m-00004-of-00003.gguf")).unwrap();
    assert_mismatch(&verify(&shard(1), &[]), &["m-00004-of-00003.gguf: extra file"]);
    fs::remove_file(t.path().join("m-00004-of-00003.gguf")).unwrap();
    fs::write(t.path().join("m-00001-of-00002.gguf"), b"GGUF").unwrap();
    assert_mismatch(&verify(&shard(1), &[]), &["m-00001-of-00002.gguf: extra file"]);
    fs::remove_file(t.path().join("m-00001-of-00002.gguf")).unwrap();
    // Unrelated files are fine.
    fs::write(t.path().join("README.md"), b"hello").unwrap();
    assert_verified(&verify(&shard(1), &[]));

    // A flipped byte in a later shard names that shard.
    let pristine = fs::read(shard(2)).unwrap();
    flip(&shard(2), pristine.len() as u64 - 1);
    assert_mismatch(&verify(&shard(1), &[]), &["m-00002-of-00003.gguf: file differs"]);
    fs::write(shard(2), &pristine).unwrap();
    assert_verified(&verify(&shard(1), &[]));

    // A missing shard.
    fs::remove_file(shard(2)).unwrap();
    assert_mismatch(&verify(&shard(1), &[]), &["m-00002-of-00003.gguf: missing"]);
}

#[test]
fn an_edited_manifest_is_found() {
    let (t, out) = artifact("mixtral", "bf16");
    let mp = t.path().join("m.sling.json");
    let pristine = fs::read(&mp).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&pristine).unwrap();

    // Reformatting is not editing: the seal covers the canonical JSON.
    fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    assert_verified(&verify(&out, &[]));

    // A changed tensor sha256.
    let sha = m["tensors"][0]["sha256"].as_str().unwrap().to_string();
    let edited = format!("{}{}", if sha.starts_with('0') { "1" } else { "0" }, &sha[1..]);
    m["tensors"][0]["sha256"] = edited.into();
    fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_mismatch(&verify(&out, &[]), &["m.sling.json: manifest was edited", "data differs"]);

    // A changed option, everything else intact.
    let mut m: serde_json::Value = serde_json::from_slice(&pristine).unwrap();
    m["options"]["allow_nonfinite"] = true.into();
    fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let o = verify(&out, &[]);
    assert_mismatch(&o, &["m.sling.json: manifest was edited"]);
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));

    // A removed seal.
    let mut m: serde_json::Value = serde_json::from_slice(&pristine).unwrap();
    m.as_object_mut().unwrap().remove("manifest_sha256");
    fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_mismatch(&verify(&out, &[]), &["m.sling.json: manifest has no manifest_sha256"]);

    // A flipped byte that keeps it valid JSON.
    let mut b = pristine.clone();
    let at = b.windows(8).position(|w| w == b"\"sha256\"").unwrap() + 12;
    b[at] = if b[at] == b'a' { b'b' } else { b'a' };
    fs::write(&mp, &b).unwrap();
    assert_mismatch(&verify(&out, &[]), &["m.sling.json: manifest was edited"]);
}

#[test]
fn no_manifest_means_not_verifiable() {
    let (t, out) = artifact("llama", "bf16");
    let mp = t.path().join("m.sling.json");
    let pristine = fs::read(&mp).unwrap();

    fs::remove_file(&mp).unwrap();
    let o = verify(&out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not verifiable"), "{}", stderr(&o));
    let o = verify(&out, &["--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "error");

    // Unreadable or foreign manifests cannot be checked either.
    fs::write(&mp, b"{not json").unwrap();
    assert_eq!(verify(&out, &[]).status.code(), Some(2));
    let mut m: serde_json::Value = serde_json::from_slice(&pristine).unwrap();
    m["schema"] = "sling.manifest/999".into();
    fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    let o = verify(&out, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unsupported manifest schema"), "{}", stderr(&o));

    // Usage errors.
    assert_eq!(run(&["verify"]).status.code(), Some(2));
    assert_eq!(verify(&t.path().join("nothing.gguf"), &[]).status.code(), Some(2));
    fs::write(&mp, &pristine).unwrap();
    assert_eq!(verify(&out, &["--source", t.path().join("nope").to_str().unwrap()]).status.code(), Some(2));
    assert_verified(&verify(&out, &[]));
}

#[test]
fn manifests_are_identical_across_threads_and_runs() {
    let t = tempfile::tempdir().unwrap();
    for (ty, split) in [("q8_0", None), ("bf16", Some("7"))] {
        let mut manifests = Vec::new();
        for (i, threads) in ["1", "2", "2"].iter().enumerate() {
            let d = t.path().join(format!("{ty}-{i}"));
            fs::create_dir_all(&d).unwrap();
            // --reproducible: no `created` time (docs/reproducibility.md).
            let mut extra = vec!["--type", ty, "-t", threads, "--reproducible"];
            if let Some(n) = split {
                extra.extend(["--split-max-tensors", n]);
            }
            convert(&fixture("mixtral-sharded"), &d.join("m.gguf"), &extra);
            manifests.push(fs::read(d.join("m.sling.json")).unwrap());
        }
        assert!(manifests.windows(2).all(|w| w[0] == w[1]), "{ty}: manifests differ across threads/runs");
        let m: serde_json::Value = serde_json::from_slice(&manifests[0]).unwrap();
        let srcs: Vec<&str> = m["sources"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
        assert_eq!(
            srcs,
            [
                "config.json",
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
    }
}

#[test]
fn source_check_names_the_modified_source_file() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    copy_dir(&fixture("mixtral-sharded"), &src);
    let out = t.path().join("out").join("m.gguf");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    convert(&src, &out, &["--type", "q8_0"]);
    assert_verified(&verify(&out, &["--source", src.to_str().unwrap()]));

    let tc = src.join("tokenizer_config.json");
    let mut b = fs::read(&tc).unwrap();
    b.push(b' ');
    fs::write(&tc, b).unwrap();
    assert_mismatch(
        &verify(&out, &["--source", src.to_str().unwrap()]),
        &["source tokenizer_config.json: file differs"],
    );
    // Without --source the artifact itself still verifies.
    assert_verified(&verify(&out, &[]));

    fs::remove_file(src.join("model-00002-of-00003.safetensors")).unwrap();
    let o = verify(&out, &["--source", src.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let files: Vec<&str> = v["problems"].as_array().unwrap().iter().map(|p| p["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["model-00002-of-00003.safetensors", "tokenizer_config.json"]);
}

#[test]
fn a_new_conversion_replaces_the_manifest_and_a_failed_one_keeps_the_old_pair() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    copy_dir(&fixture("llama"), &src);
    let out = t.path().join("out").join("m.gguf");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    convert(&src, &out, &["--type", "bf16"]);
    convert(&src, &out, &["--type", "q8_0"]);
    assert_verified(&verify(&out, &[]));
    let before = (fs::read(&out).unwrap(), fs::read(t.path().join("out/m.sling.json")).unwrap());

    // A conversion that fails late (NaN in the last tensor written) leaves the previous artifact
    // and its manifest as they were.
    let p = src.join("model.safetensors");
    let mut bytes = fs::read(&p).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let start = 8 + n + meta.info("model.norm.weight").unwrap().data_offsets.0;
    bytes[start..start + 2].copy_from_slice(&[0x80, 0x7f]); // bf16 +Inf
    fs::write(&p, bytes).unwrap();
    let o = run(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--tokenizer-pre", "gpt-2", "-q"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("output_norm.weight"), "{}", stderr(&o));
    assert_eq!(before, (fs::read(&out).unwrap(), fs::read(t.path().join("out/m.sling.json")).unwrap()));
    assert_verified(&verify(&out, &[]));
}

/// `sling verify --help` is part of the interface, like the other help texts (tests/cli.rs).
/// Regenerate with `UPDATE_SNAPSHOTS=1 cargo test -p sling --test verify help`.
#[test]
fn verify_help_snapshot() {
    let o = bin().args(["verify", "--help"]).env("COLUMNS", "100").output().unwrap();
    assert!(o.status.success());
    let got = String::from_utf8(o.stdout).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/verify-help.txt");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        fs::write(&path, &got).unwrap();
    }
    let want = fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(got, want, "verify-help changed; rerun with UPDATE_SNAPSHOTS=1 if intended");
}
