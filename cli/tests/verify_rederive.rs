//! `sling verify --source` re-derivation and recorded quality: an untouched artifact re-derives (a sample
//! and `--full`, converted, quantized, split); a forged manifest (tensor bytes or metadata altered and the
//! manifest rewritten and resealed to match, which the seal cannot catch) is caught by re-derivation; an
//! artifact quantized with an imatrix is re-derived when the imatrix is given and "could not check" (exit 2)
//! without it; quality figures attached afterwards are in the manifest and the model card, and the
//! artifact still verifies. Tampering with files and manifests without re-sealing: tests/verify.rs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use sling_formats::gguf::GgufFile;
use sling_provenance::manifest::{attach_quality, hash_file, seal_of};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sling"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "failed ({:?}): {}\n{}", o.status.code(), stdout(o), stderr(o));
}

/// `sling CMD SRC -o OUT --tokenizer-pre gpt-2 -q --reproducible EXTRA…`.
fn make(cmd: &str, src: &Path, out: &Path, extra: &[&str]) {
    let mut a = vec![cmd, s(src), "-o", s(out), "--tokenizer-pre", "gpt-2", "-q", "--reproducible"];
    a.extend_from_slice(extra);
    ok(&run(&a));
}

/// `sling verify ARTIFACT EXTRA… --json`: the exit code and the JSON.
fn verify_json(artifact: &Path, extra: &[&str]) -> (Option<i32>, Value) {
    let mut a = vec!["verify", s(artifact)];
    a.extend_from_slice(extra);
    a.push("--json");
    let o = run(&a);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}): {}\n{}", stdout(&o), stderr(&o)));
    (o.status.code(), v)
}

fn kinds(v: &Value) -> Vec<String> {
    v["problems"].as_array().unwrap().iter().map(|p| p["kind"].as_str().unwrap().to_string()).collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

/// sha256 of `b`, lowercase hex (through a file: sling's own hasher).
fn sha(b: &[u8]) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    fs::write(f.path(), b).unwrap();
    hash_file(f.path()).unwrap().1
}

/// Writes `m` resealed, pretty, as sling writes it: what a forger who rewrites the manifest does.
fn reseal(mp: &Path, mut m: Value) {
    m["manifest_sha256"] = seal_of(&m).into();
    let mut b = serde_json::to_vec_pretty(&m).unwrap();
    b.push(b'\n');
    fs::write(mp, b).unwrap();
}

/// A legacy `.dat` importance matrix covering every quantized tensor of `src`'s `preset` plan, with
/// made-up positive values (`seed` varies them).
fn make_imatrix(src: &Path, preset: &str, path: &Path, seed: usize) {
    let o = run(&["plan", s(src), "--to", preset, "--tokenizer-pre", "gpt-2", "--json"]);
    ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut entries = Vec::new();
    for t in v["tensors"].as_array().unwrap() {
        if ["f32", "f16", "bf16"].contains(&t["type"].as_str().unwrap()) {
            continue;
        }
        let shape: Vec<u64> = t["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        entries.push((t["name"].as_str().unwrap().to_string(), shape[0] * if shape.len() >= 3 { shape[2] } else { 1 }));
    }
    let mut b = (entries.len() as i32).to_le_bytes().to_vec();
    for (k, (name, n)) in entries.iter().enumerate() {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(1i32.to_le_bytes());
        b.extend((*n as i32).to_le_bytes());
        for i in 0..*n as usize {
            b.extend((0.5f32 + ((i * 7 + k * 13 + seed * 5) % 17) as f32 / 8.0).to_le_bytes());
        }
    }
    fs::write(path, b).unwrap();
}

#[test]
fn untouched_artifacts_rederive_with_a_sample_and_in_full() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    let out = t.path().join("m.gguf");
    make("convert", &src, &out, &["--type", "q8_0"]);
    let m = read_json(&t.path().join("m.sling.json"));
    assert!(m["options"].get("quantize").is_none() && m.get("quality").is_none(), "convert manifests are unchanged");
    let all: Vec<&str> = m["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();

    // The default: a sample of 8, spread over the file, a routed expert among them.
    let (code, v) = verify_json(&out, &["--source", s(&src)]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["status"], "verified");
    let r = &v["rederived"];
    assert_eq!(
        (r["status"].as_str(), r["mode"].as_str(), r["sample"].as_u64()),
        (Some("verified"), Some("sample"), Some(8))
    );
    assert_eq!(r["plan"], "convert q8_0");
    assert_eq!(r["metadata_checked"], true);
    let sampled: Vec<&str> = r["tensors"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!(sampled.len(), 8);
    assert!(sampled.iter().any(|n| n.contains("_exps")), "{sampled:?}");
    let pos: Vec<usize> = sampled.iter().map(|n| all.iter().position(|a| a == n).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]) && pos[0] < all.len() / 4 && pos[7] >= 3 * all.len() / 4, "{pos:?}");
    // The human output names them.
    let o = run(&["verify", s(&out), "--source", s(&src)]);
    ok(&o);
    assert!(
        stdout(&o).starts_with("verified: ") && stdout(&o).contains("re-derived 8 tensors from the source"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains(sampled[0]), "{}", stdout(&o));

    // --full: every tensor; --sample N: N of them; --sample 0: none (the sources are still re-hashed).
    let (code, v) = verify_json(&out, &["--source", s(&src), "--full"]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["rederived"]["mode"], "full");
    assert_eq!(v["rederived"]["tensors"].as_array().unwrap().len(), all.len());
    let (code, v) = verify_json(&out, &["--source", s(&src), "--sample", "3"]);
    assert_eq!((code, v["rederived"]["tensors"].as_array().unwrap().len()), (Some(0), 3));
    let (code, v) = verify_json(&out, &["--source", s(&src), "--sample", "0"]);
    assert_eq!((code, v["rederived"].is_null(), v["sources_checked"].as_u64()), (Some(0), true, Some(4)));
    // Without --source there is nothing to re-derive from.
    assert_eq!(run(&["verify", s(&out), "--full"]).status.code(), Some(2));
    assert_eq!(run(&["verify", s(&out), "--source", s(&src), "--full", "--sample", "3"]).status.code(), Some(2));

    // Split, quantized (a recipe, flags, --override-kv), and an MXFP4 source: all re-derive in full.
    let cases: [(&str, &str, Vec<&str>); 4] = [
        ("convert", "olmoe", vec!["--type", "bf16", "--split-max-tensors", "10"]),
        ("quantize", "deepseekv2lite", vec!["--to", "gguf:moe-q4", "--split-max-tensors", "100"]),
        (
            "quantize",
            "mixtral",
            vec![
                "--to",
                "gguf:Q3_K_M",
                "--tensor-type",
                "ffn_down_exps=q4_K",
                "--leave-output-tensor",
                "--override-kv",
                "x.y=int:-3",
            ],
        ),
        ("convert", "gptoss-mxfp4", vec!["--type", "q8_0"]),
    ];
    for (i, (cmd, fx, extra)) in cases.iter().enumerate() {
        let out = t.path().join(format!("c{i}")).join("m.gguf");
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        make(cmd, &fixture(fx), &out, extra);
        let (code, v) = verify_json(&out, &["--source", s(&fixture(fx)), "--full"]);
        assert_eq!(code, Some(0), "{cmd} {fx} {extra:?}: {v:#}");
        assert_eq!(v["rederived"]["status"], "verified");
    }
}

#[test]
fn a_forged_manifest_is_caught_by_rederivation() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    let out = t.path().join("m.gguf");
    let mp = t.path().join("m.sling.json");
    make("quantize", &src, &out, &["--to", "gguf:Q4_K_M", "--no-model-card"]);
    let pristine = (fs::read(&out).unwrap(), fs::read(&mp).unwrap());
    let (_, v) = verify_json(&out, &["--source", s(&src)]);
    let sampled: Vec<String> =
        v["rederived"]["tensors"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    let victim = sampled.iter().find(|n| n.contains("_exps")).unwrap().clone();

    // Alter the victim's bytes, then rewrite the manifest to match (tensor and file sha256) and reseal it.
    let forge = |tensor: &str| {
        let mut bytes = pristine.0.clone();
        let g = GgufFile::open(&out).unwrap();
        let info = g.tensor(tensor).unwrap().clone();
        let start = (g.data_offset + info.offset) as usize;
        drop(g);
        bytes[start + info.n_bytes as usize / 2] ^= 0x10;
        fs::write(&out, &bytes).unwrap();
        let mut m: Value = serde_json::from_slice(&pristine.1).unwrap();
        for rec in m["tensors"].as_array_mut().unwrap() {
            if rec["name"] == tensor {
                rec["sha256"] = sha(&bytes[start..start + info.n_bytes as usize]).into();
            }
        }
        m["outputs"][0]["sha256"] = sha(&bytes).into();
        reseal(&mp, m);
    };
    forge(&victim);
    // The seal and the hashes cannot tell: the forgery is self-consistent.
    let o = run(&["verify", s(&out)]);
    ok(&o);
    // Re-derivation can: the sample includes the victim, and --full includes everything.
    for extra in [vec![], vec!["--full"]] {
        let mut a = vec!["--source", s(&src)];
        a.extend(extra);
        let (code, v) = verify_json(&out, &a);
        assert_eq!(code, Some(1), "{v:#}");
        assert_eq!(v["status"], "mismatch");
        assert_eq!(kinds(&v), ["rederived_data"], "{v:#}");
        assert_eq!(v["problems"][0]["tensor"], victim.as_str());
        assert_eq!(v["rederived"]["status"], "mismatch");
    }
    let o = run(&["verify", s(&out), "--source", s(&src)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains(&format!("m.gguf: tensor {victim}: re-derived from the source: sha256")),
        "{}",
        stdout(&o)
    );

    // A tensor outside the sample: --full finds it.
    let m: Value = serde_json::from_slice(&pristine.1).unwrap();
    let other = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .find(|n| !sampled.contains(n))
        .unwrap();
    forge(&other);
    let (code, v) = verify_json(&out, &["--source", s(&src), "--full"]);
    assert_eq!((code, kinds(&v)), (Some(1), vec!["rederived_data".to_string()]), "{v:#}");
    assert_eq!(v["problems"][0]["tensor"], other.as_str());

    // Forged metadata (tokenizer.ggml.pre "gpt-2" -> "gpt-3", same length), manifest resealed: the
    // re-derived metadata differs.
    let mut bytes = pristine.0.clone();
    let key = b"tokenizer.ggml.pre";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    assert_eq!(&bytes[at..at + 5], b"gpt-2");
    bytes[at + 4] = b'3';
    fs::write(&out, &bytes).unwrap();
    let mut m: Value = serde_json::from_slice(&pristine.1).unwrap();
    m["outputs"][0]["sha256"] = sha(&bytes).into();
    reseal(&mp, m);
    ok(&run(&["verify", s(&out)]));
    let (code, v) = verify_json(&out, &["--source", s(&src)]);
    assert_eq!((code, kinds(&v)), (Some(1), vec!["rederived_metadata".to_string()]), "{v:#}");
    assert!(v["problems"][0]["message"].as_str().unwrap().contains("tokenizer.ggml.pre"), "{v:#}");

    // Forged options: the manifest claims another preset than the one the file was made with.
    fs::write(&out, &pristine.0).unwrap();
    let mut m: Value = serde_json::from_slice(&pristine.1).unwrap();
    m["options"]["quantize"]["ftype"] = "Q5_K_M".into();
    m["options"]["quantize"]["file_type"] = 17.into();
    reseal(&mp, m);
    ok(&run(&["verify", s(&out)]));
    let (code, v) = verify_json(&out, &["--source", s(&src)]);
    assert_eq!(code, Some(1), "{v:#}");
    assert!(
        kinds(&v).contains(&"rederived_tensor".to_string()) && kinds(&v).contains(&"rederived_metadata".to_string()),
        "{v:#}"
    );

    // Back to the original: verified; and with a modified source, nothing is re-derived (the sources differ).
    fs::write(&mp, &pristine.1).unwrap();
    let (code, v) = verify_json(&out, &["--source", s(&src), "--full"]);
    assert_eq!(code, Some(0), "{v:#}");
    let copy = t.path().join("src");
    fs::create_dir_all(&copy).unwrap();
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let mut cfg = fs::read(copy.join("tokenizer_config.json")).unwrap();
    cfg.push(b' ');
    fs::write(copy.join("tokenizer_config.json"), cfg).unwrap();
    let (code, v) = verify_json(&out, &["--source", s(&copy)]);
    assert_eq!((code, kinds(&v)), (Some(1), vec!["source_hash".to_string()]), "{v:#}");
    assert_eq!(v["rederived"]["status"], "not_checked");
    assert!(v["rederived"]["error"].as_str().unwrap().contains("source files differ"), "{v:#}");
}

#[test]
fn an_imatrix_artifact_is_rederived_only_with_its_imatrix() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    let im = t.path().join("im.dat");
    let other = t.path().join("other.dat");
    make_imatrix(&src, "gguf:Q4_K_M", &im, 0);
    make_imatrix(&src, "gguf:Q4_K_M", &other, 1);
    let out = t.path().join("o").join("m.gguf");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    make("quantize", &src, &out, &["--to", "gguf:Q4_K_M", "--imatrix", s(&im), "--exclude-weights", "attn_k"]);

    // The manifest records the imatrix (path as given, size, sha256, filters) and the preset.
    let m = read_json(&t.path().join("o/m.sling.json"));
    let q = &m["options"]["quantize"];
    assert_eq!((q["ftype"].as_str(), q["file_type"].as_u64()), (Some("Q4_K_M"), Some(15)));
    assert_eq!(q["imatrix"]["path"], s(&im));
    assert_eq!(q["imatrix"]["size"], fs::metadata(&im).unwrap().len());
    assert_eq!(q["imatrix"]["sha256"], sha(&fs::read(&im).unwrap()));
    assert_eq!(q["imatrix"]["exclude_weights"], json!(["attn_k"]));
    assert_eq!(q["rules"], json!([]));

    // Without the imatrix: everything else is checked, the re-derivation cannot be: exit 2.
    let (code, v) = verify_json(&out, &["--source", s(&src)]);
    assert_eq!(code, Some(2), "{v:#}");
    assert_eq!(v["status"], "error");
    assert_eq!(v["problems"], json!([]));
    assert_eq!(v["rederived"]["status"], "not_checked");
    assert!(v["error"].as_str().unwrap().contains("--imatrix"), "{v:#}");
    let o = run(&["verify", s(&out), "--source", s(&src)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("could not be re-derived") && stderr(&o).contains("--imatrix FILE"), "{}", stderr(&o));
    assert!(!stdout(&o).starts_with("verified"), "{}", stdout(&o));
    // Without --source, the artifact itself verifies as before.
    ok(&run(&["verify", s(&out)]));

    // With it (from another path: only its content counts): verified, sample and full.
    let moved = t.path().join("copy-of-im.dat");
    fs::copy(&im, &moved).unwrap();
    for extra in [vec![], vec!["--full"]] {
        let mut a = vec!["--source", s(&src), "--imatrix", s(&moved)];
        a.extend(extra);
        let (code, v) = verify_json(&out, &a);
        assert_eq!(code, Some(0), "{v:#}");
        assert_eq!(v["rederived"]["status"], "verified");
        assert_eq!(v["rederived"]["imatrix"], s(&moved));
    }

    // Another imatrix: a mismatch naming it, and no re-derivation.
    let (code, v) = verify_json(&out, &["--source", s(&src), "--imatrix", s(&other)]);
    assert_eq!((code, kinds(&v)), (Some(1), vec!["imatrix_hash".to_string()]), "{v:#}");
    assert_eq!(v["rederived"]["status"], "mismatch");

    // A forged manifest that drops the imatrix record: re-derived without it, the tensors differ.
    let mut forged = m.clone();
    forged["options"]["quantize"]["imatrix"] = Value::Null;
    reseal(&t.path().join("o/m.sling.json"), forged);
    let (code, v) = verify_json(&out, &["--source", s(&src), "--full"]);
    assert_eq!(code, Some(1), "{v:#}");
    assert!(kinds(&v).contains(&"rederived_data".to_string()), "{v:#}");

    // A quantization without an imatrix ignores one given, with a note.
    let plain = t.path().join("p").join("m.gguf");
    fs::create_dir_all(plain.parent().unwrap()).unwrap();
    make("quantize", &src, &plain, &["--to", "gguf:Q4_K_M"]);
    let (code, v) = verify_json(&plain, &["--source", s(&src), "--imatrix", s(&im)]);
    assert_eq!(code, Some(0), "{v:#}");
    assert!(v["notes"][0].as_str().unwrap().contains("ignored"), "{v:#}");
    assert_eq!(
        run(&["verify", s(&plain), "--source", s(&src), "--imatrix", s(&t.path().join("nope"))]).status.code(),
        Some(2)
    );
}

#[test]
fn manifests_without_the_quantize_options_are_not_rederived() {
    // A quantized artifact whose manifest predates `options.quantize` (as an older sling wrote it).
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen2moe");
    let out = t.path().join("m.gguf");
    let mp = t.path().join("m.sling.json");
    make("quantize", &src, &out, &["--to", "gguf:Q4_K_M", "--no-model-card"]);
    let mut m = read_json(&mp);
    m["options"].as_object_mut().unwrap().remove("quantize");
    reseal(&mp, m);
    ok(&run(&["verify", s(&out)]));
    let (code, v) = verify_json(&out, &["--source", s(&src)]);
    assert_eq!(code, Some(2), "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("older sling"), "{v:#}");
    // Only re-hashing the sources still works.
    let (code, _) = verify_json(&out, &["--source", s(&src), "--sample", "0"]);
    assert_eq!(code, Some(0));
}

#[test]
fn quality_figures_are_attached_to_the_manifest_and_the_card() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    let out = t.path().join("m.gguf");
    let mp = t.path().join("m.sling.json");
    let card = t.path().join("README.md");
    make("quantize", &src, &out, &["--to", "gguf:moe-q4"]);
    let before = fs::read_to_string(&card).unwrap();
    assert!(before.contains("\n| quality | not measured |\n"), "{before}");
    // The recipe's rules are in the manifest and the card.
    let m = read_json(&mp);
    let rules = m["options"]["quantize"]["rules"].as_array().unwrap();
    assert_eq!(m["options"]["quantize"]["recipe"]["name"], "moe-q4");
    assert_eq!(rules.len(), 6);
    assert_eq!(
        rules[5],
        json!({"from": "recipe", "pattern": "moe-q4#6(role=routed_experts)", "regex": "", "type": "q4_K", "role": "routed_experts"})
    );
    assert!(before.contains("| 6 | recipe | `moe-q4#6(role=routed_experts)` | q4_K |"), "{before}");

    let q = json!({
        "kld_mean": 0.0123, "kld_p99": 0.08, "kld_max": 0.3, "top1": 0.971, "ppl": 12.3, "ppl_ref": 12.1,
        "data": "calib.txt", "chunks": 4, "ctx": 512
    });
    attach_quality(&mp, q.clone()).unwrap();
    let after = fs::read_to_string(&card).unwrap();
    assert!(
        after.contains("\n| quality | KLD mean 0.0123 (p99 0.08, max 0.3), top-1 97.1 %, PPL 12.3 vs 12.1 (reference), on calib.txt, 4 x 512 tokens |\n"),
        "{after}"
    );
    assert!(after.contains("| `kld_p99` | 0.08 |") && !after.contains("Not measured"), "{after}");
    let m = read_json(&mp);
    assert_eq!(m["quality"], q);
    assert_eq!(m["model_card"]["sha256"], sha(after.as_bytes()));
    assert_eq!(m["model_card"]["size"], after.len());
    // Only the quality row and section changed.
    let changed: Vec<(&str, &str)> = before.lines().zip(after.lines()).filter(|(a, b)| a != b).collect();
    assert!(changed[0].0.starts_with("| quality |"), "{changed:?}");
    // The artifact verifies, against the source too.
    let o = run(&["verify", s(&out), "--source", s(&src)]);
    ok(&o);
    assert!(stdout(&o).starts_with("verified: "), "{}", stdout(&o));

    // New figures replace the old ones; still verified.
    attach_quality(&mp, json!({"ppl": 9.5})).unwrap();
    let again = fs::read_to_string(&card).unwrap();
    assert!(again.contains("\n| quality | PPL 9.5 |\n") && !again.contains("kld_p99"), "{again}");
    ok(&run(&["verify", s(&out)]));

    // An edited card (or manifest) is refused and left as it is.
    fs::write(&card, again.replace("PPL 9.5", "PPL 1.0")).unwrap();
    assert!(attach_quality(&mp, json!({"ppl": 8.0})).is_err());
    assert!(fs::read_to_string(&card).unwrap().contains("PPL 1.0"));
    assert_eq!(run(&["verify", s(&out)]).status.code(), Some(1));
}
