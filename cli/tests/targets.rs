//! `sling quantize --to vllm:…|mlx:…` end to end on the committed fixtures: the same bytes for any thread count,
//! `verify` (and `verify --source`), crash safety (a killed run leaves no directory that looks complete), and bad
//! input (a clear error, exit 2, nothing written). Agreement with compressed-tensors, transformers,
//! convert_hf_to_gguf.py and mlx-lm is tested in tests/interop/test_vllm.py and test_mlx.py.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{files, fixture, run, stderr};

fn quantize(src: &str, to: &str, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let src = fixture(src);
    let mut a =
        vec!["-q", "quantize", src.to_str().unwrap(), "--to", to, "-o", out.to_str().unwrap(), "--reproducible"];
    a.extend_from_slice(extra);
    run(&a, env)
}

const CASES: &[(&str, &str, &[&str])] = &[
    ("qwen3moe", "vllm:w4a16", &[]),
    ("qwen3moe", "vllm:w4a16-asym", &[]),
    ("deepseekv3", "vllm:w8a16", &[]),
    ("mixtral", "vllm:fp8-dynamic", &[]),
    ("deepseekv3-fp8", "vllm:fp8-block", &[]),
    ("qwen2moe", "vllm:nvfp4", &[]),
    ("olmoe", "vllm:mxfp4", &[]),
    ("qwen3moe", "mlx:4", &["--group-size", "32"]),
    ("mixtral", "mlx:3", &["--group-size", "32"]),
    // mlx-lm's rearranged layouts: DeepSeek-V3's embed_q/unembed_out from FP8, gpt-oss's MXFP4 experts copied
    ("deepseekv3-fp8", "mlx:4", &["--group-size", "32"]),
    ("gptoss-mxfp4", "mlx:4", &["--group-size", "32"]),
    ("gptoss", "mlx:6", &["--group-size", "32"]),
];

#[test]
fn same_bytes_for_any_thread_count_and_verified() {
    let d = tempfile::tempdir().unwrap();
    for (src, to, extra) in CASES {
        let tag = to.replace(':', "-");
        let (a, b) = (d.path().join(format!("{src}-{tag}-t1")), d.path().join(format!("{src}-{tag}-t2")));
        let mut e1 = vec!["-t", "1"];
        e1.extend_from_slice(extra);
        let o = quantize(src, to, &a, &e1, &[]);
        assert!(o.status.success(), "{src} {to}: {}", stderr(&o));
        let mut e2 = vec!["-t", "2"];
        e2.extend_from_slice(extra);
        let o = quantize(src, to, &b, &e2, &[]);
        assert!(o.status.success(), "{src} {to}: {}", stderr(&o));
        // The manifest names the output directory; everything else must be byte-identical.
        let (fa, fb) = (files(&a), files(&b));
        assert_eq!(fa.len(), fb.len());
        for ((na, ba), (nb, bb)) in fa.iter().zip(&fb) {
            assert_eq!(na, nb);
            if na != "sling.json" && na != "README.md" {
                assert!(ba == bb, "{src} {to}: {na} differs between -t 1 and -t 2");
            }
        }
        let o = run(&["verify", a.to_str().unwrap(), "--source", fixture(src).to_str().unwrap(), "--full"], &[]);
        assert!(o.status.success(), "{src} {to}: verify: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert!(!d.path().join(format!("{src}-{tag}-t1.partial")).exists());
    }
}

#[test]
fn verify_finds_a_changed_byte_and_an_extra_file() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    assert!(quantize("qwen3moe", "vllm:fp8-dynamic", &out, &[], &[]).status.success());
    fs::write(out.join("notes.txt"), "x").unwrap();
    let o = run(&["verify", out.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("notes.txt: extra file"));
    fs::remove_file(out.join("notes.txt")).unwrap();
    let p = out.join("model.safetensors");
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n - 3] ^= 0x10;
    fs::write(&p, b).unwrap();
    let o = run(&["verify", out.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("data differs"));
}

#[test]
fn a_killed_run_leaves_nothing_that_looks_complete() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = quantize("qwen3moe", "vllm:w8a16", &out, &["-t", "1"], &[("SLING_TEST_ABORT_AFTER_WEIGHTS", "5")]);
    assert_eq!(o.status.code(), Some(134), "{}", stderr(&o));
    assert!(!out.exists(), "a killed run must not leave the output directory");
    assert!(d.path().join("o.partial").exists());
    let o = run(&["verify", d.path().join("o.partial").to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "no manifest: not verifiable");
    // The next run replaces the partial directory.
    let o = quantize("qwen3moe", "vllm:w8a16", &out, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("sling.json").exists() && !d.path().join("o.partial").exists());
}

#[test]
fn bad_input_is_a_clear_error_and_nothing_is_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let cases: &[(&str, &str, &[&str], &str)] = &[
        ("qwen3moe", "onnx:int8", &[], "unknown target \"onnx:int8\""),
        ("qwen3moe", "vllm:w3a16", &[], "unknown vllm scheme \"w3a16\""),
        ("qwen3moe", "mlx:7", &[], "unknown mlx scheme \"7\""),
        ("qwen3moe", "vllm:w4a16", &["--strict"], "(--strict)"),
        ("mixtral", "vllm:w8a16", &[], "nothing to quantize"),
        ("qwen3moe", "mlx:4", &["--group-size", "48"], "MLX takes 32, 64 or 128"),
        ("gptoss-mxfp4", "vllm:w4a16", &[], "vLLM does not run gpt-oss checkpoints in compressed-tensors"),
        ("gptoss", "vllm:fp8-dynamic", &[], "serve the original MXFP4 checkpoint with vLLM"),
        ("gptoss", "vllm:auto", &["--target-size", "1M"], "vLLM does not run gpt-oss"),
        ("qwen3moe", "vllm:w4a16", &["--imatrix", "x.gguf"], "--imatrix applies to --to gguf"),
        ("qwen3moe", "vllm:w4a16", &["--group-size", "64"], "--group-size applies to mlx"),
    ];
    for (src, to, extra, want) in cases {
        let o = quantize(src, to, &out, extra, &[]);
        assert_eq!(o.status.code(), Some(2), "{src} {to} {extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{src} {to} {extra:?}: wanted {want:?} in: {}", stderr(&o));
        assert!(!out.exists() && !d.path().join("o.partial").exists(), "{src} {to}: something was written");
    }
    // An existing, non-empty output and an output inside the source are refused.
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = quantize("qwen3moe", "vllm:mxfp4", &out, &[], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    let inside = fixture("qwen3moe").join("out");
    let o = quantize("qwen3moe", "vllm:mxfp4", &inside, &[], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("inside the input directory"), "{}", stderr(&o));
    assert!(!inside.exists());
}

#[test]
fn a_second_writer_of_the_same_output_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    // Another run is writing `o`: it holds the lock and has its partial directory.
    let lock = fs::File::create(d.path().join("o.partial.json")).unwrap();
    lock.try_lock().unwrap();
    fs::create_dir(d.path().join("o.partial")).unwrap();
    fs::write(d.path().join("o.partial/model.safetensors"), "theirs").unwrap();
    for extra in [&[][..], &["--resume"][..]] {
        let o = quantize("qwen3moe", "vllm:w4a16", &out, extra, &[]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("another sling process is writing this output"), "{}", stderr(&o));
        assert_eq!(fs::read_to_string(d.path().join("o.partial/model.safetensors")).unwrap(), "theirs");
        assert!(!out.exists());
    }
    // Once it is gone, the stale partial directory is replaced and the lock file removed with it.
    drop(lock);
    let o = quantize("qwen3moe", "vllm:w4a16", &out, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> =
        fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["o"]);
}

#[test]
fn plan_lists_kept_weights_and_json() {
    let src = fixture("qwen3moe");
    let o = run(&["plan", src.to_str().unwrap(), "--to", "vllm:w4a16", "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["target"], "vllm:w4a16");
    let kept = v["kept"].as_array().unwrap();
    assert!(!kept.is_empty());
    assert!(kept.iter().all(|k| k["why"].as_str().unwrap().contains("group size 128")));
    // And the manifest and the card list them too.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    assert!(quantize("qwen3moe", "vllm:w4a16", &out, &[], &[]).status.success());
    let m: serde_json::Value = serde_json::from_slice(&fs::read(out.join("sling.json")).unwrap()).unwrap();
    assert_eq!(m["kept"].as_array().unwrap().len(), kept.len());
    assert_eq!(m["options"]["to"], "vllm");
    assert_eq!(m["options"]["target"]["target"], "vllm:w4a16");
    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("Kept at source precision"));
    assert!(card.contains(kept[0]["name"].as_str().unwrap()));
}

#[test]
fn eval_reads_a_vllm_and_an_mlx_directory() {
    let d = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/data/calib.txt");
    for (to, extra) in [("vllm:w8a16", &[][..]), ("vllm:nvfp4", &[][..]), ("mlx:8", &["--group-size", "32"][..])] {
        let out = d.path().join(to.replace(':', "-"));
        // DeepSeek-V3 on mlx: embed_q/unembed_out read back as kv_b_proj.
        let o = quantize("deepseekv3", to, &out, extra, &[]);
        assert!(o.status.success(), "{to}: {}", stderr(&o));
        let reference = fixture("deepseekv3");
        let o = run(
            &[
                "-q",
                "eval",
                "--ref",
                reference.to_str().unwrap(),
                out.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--ctx",
                "64",
                "--chunks",
                "4",
                "--json",
            ],
            &[],
        );
        assert!(o.status.success(), "{to}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let kld = v["kld_mean"].as_f64().unwrap();
        // Quantized weights move the distribution a little; a mis-read (wrong scale, wrong layout) moves it a lot.
        assert!(kld > 0.0 && kld < 0.05, "{to}: mean KLD {kld}");
    }
}

#[test]
fn resume_after_a_kill_gives_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    for (src, to, extra) in [("qwen3moe", "vllm:nvfp4", &[][..]), ("mixtral", "mlx:4", &["--group-size", "32"][..])] {
        let tag = to.replace(':', "-");
        let whole = d.path().join(format!("{tag}-whole"));
        let o = quantize(src, to, &whole, extra, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = d.path().join(format!("{tag}-resumed"));
        let mut args = vec!["-t", "1"];
        args.extend_from_slice(extra);
        let env = [("SLING_TEST_ABORT_AFTER_WEIGHTS", "9"), ("SLING_JOURNAL_INTERVAL_MS", "0")];
        let o = quantize(src, to, &out, &args, &env);
        assert_eq!(o.status.code(), Some(134), "{}", stderr(&o));
        assert!(!out.exists());
        let mut args = vec!["--resume", "--progress", "json"];
        args.extend_from_slice(extra);
        let o = quantize(src, to, &out, &args, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let start = stderr(&o).lines().find(|l| l.contains("\"event\":\"start\"")).unwrap().to_string();
        let v: serde_json::Value = serde_json::from_str(&start).unwrap();
        assert!(v["resumed_weights"].as_u64().unwrap() >= 8, "{start}");
        for ((na, ba), (nb, bb)) in files(&whole).iter().zip(&files(&out)) {
            assert_eq!(na, nb);
            if na != "sling.json" && na != "README.md" {
                assert!(ba == bb, "{to}: {na} differs after --resume");
            }
        }
        let o = run(&["verify", out.to_str().unwrap()], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

/// `--resume` reuses a journaled tensor only when its bytes read back hash as journaled: a damaged byte in the
/// partial shard is found, the weights from that one on are written again, and the result is still the bytes of
/// an uninterrupted run.
#[test]
fn resume_rechecks_every_journaled_tensor() {
    let d = tempfile::tempdir().unwrap();
    let whole = d.path().join("whole");
    assert!(quantize("qwen3moe", "vllm:w8a16", &whole, &[], &[]).status.success());
    let out = d.path().join("o");
    let env = [("SLING_TEST_ABORT_AFTER_WEIGHTS", "9"), ("SLING_JOURNAL_INTERVAL_MS", "0")];
    let o = quantize("qwen3moe", "vllm:w8a16", &out, &["-t", "1"], &env);
    assert_eq!(o.status.code(), Some(134), "{}", stderr(&o));
    // The journal beside the partial directory: a header, then one line per tensor of the complete weights.
    let journal = fs::read_to_string(d.path().join("o.partial.json")).unwrap();
    let lines: Vec<serde_json::Value> = journal.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["schema"], "sling.partial/1");
    assert!(lines.len() > 9, "{journal}");
    let last = lines.last().unwrap();
    let shard =
        d.path().join("o.partial").join(lines[0]["files"][last["file"].as_u64().unwrap() as usize].as_str().unwrap());
    let mut bytes = fs::read(&shard).unwrap();
    bytes[last["offset"].as_u64().unwrap() as usize] ^= 0x01;
    fs::write(&shard, bytes).unwrap();

    let o = quantize("qwen3moe", "vllm:w8a16", &out, &["--resume", "--progress", "json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let start = stderr(&o).lines().find(|l| l.contains("\"event\":\"start\"")).unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&start).unwrap();
    let resumed = v["resumed_weights"].as_u64().unwrap();
    assert!((1..9).contains(&resumed), "the damaged weight and those after it are written again: {start}");
    assert!(stderr(&o).contains("journaled tensors checked out"), "{}", stderr(&o));
    for ((na, ba), (nb, bb)) in files(&whole).iter().zip(&files(&out)) {
        assert_eq!(na, nb);
        if na != "sling.json" && na != "README.md" {
            assert!(ba == bb, "{na} differs after --resume");
        }
    }
    assert!(!d.path().join("o.partial.json").exists() && !d.path().join("o.partial").exists());
    assert!(run(&["verify", out.to_str().unwrap()], &[]).status.success());
}

/// The deepseekv3-fp8 fixture with 128×128 scale blocks (DeepSeek-V3's own block size; the fixture uses 32×32):
/// the same FP8 codes, one scale per 128×128 block (the first of the 4×4 fixture scales it covers).
fn fp8_128_checkpoint(dir: &Path) -> PathBuf {
    let src = fixture("deepseekv3-fp8");
    let out = dir.join("deepseekv3-fp8-128");
    fs::create_dir_all(&out).unwrap();
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "model.safetensors" && name != "config.json" {
            fs::copy(e.path(), out.join(&name)).unwrap();
        }
    }
    let mut cfg: serde_json::Value = serde_json::from_slice(&fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"]["weight_block_size"] = serde_json::json!([128, 128]);
    fs::write(out.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let bytes = fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        if name.ends_with("_scale_inv") {
            let (r, c) = (t.shape()[0], t.shape()[1]);
            let (r2, c2) = (r.div_ceil(4), c.div_ceil(4));
            let mut data = Vec::new();
            for i in 0..r2 {
                for j in 0..c2 {
                    let k = (i * 4 * c + j * 4) * 4;
                    data.extend_from_slice(&t.data()[k..k + 4]);
                }
            }
            owned.push((name, t.dtype(), vec![r2, c2], data));
        } else {
            owned.push((name, t.dtype(), t.shape().to_vec(), t.data().to_vec()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn deepseek_fp8_goes_to_fp8_block_without_requantizing() {
    let d = tempfile::tempdir().unwrap();
    let src_dir = fp8_128_checkpoint(d.path());
    let out = d.path().join("o");
    let o =
        run(&["-q", "quantize", src_dir.to_str().unwrap(), "--to", "vllm:fp8-block", "-o", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let src = fs::read(src_dir.join("model.safetensors")).unwrap();
    let dst = fs::read(out.join("model.safetensors")).unwrap();
    let (src, dst) =
        (safetensors::SafeTensors::deserialize(&src).unwrap(), safetensors::SafeTensors::deserialize(&dst).unwrap());
    let mut n = 0;
    for (name, t) in src.tensors() {
        let Some(module) = name.strip_suffix(".weight_scale_inv") else { continue };
        let w = src.tensor(&format!("{module}.weight")).unwrap();
        assert_eq!(dst.tensor(&format!("{module}.weight")).unwrap().data(), w.data(), "{module}: codes");
        let s = dst.tensor(&format!("{module}.weight_scale")).unwrap();
        assert_eq!(s.dtype(), safetensors::Dtype::F32);
        assert_eq!(s.data(), t.data(), "{module}: scales");
        n += 1;
    }
    assert!(n > 10, "{n} FP8 weights");
    let o = run(&["verify", out.to_str().unwrap(), "--source", src_dir.to_str().unwrap(), "--full"], &[]);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}

#[test]
fn an_mlx_directory_whose_config_disagrees_with_its_tensors_is_a_clear_error() {
    // DeepSeek-V3's kv_b_proj is read back from embed_q/unembed_out with config.json's head dimensions; a config
    // that disagrees with the stored shapes must not make the reader index past them.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("ds");
    assert!(quantize("deepseekv3", "mlx:4", &out, &["--group-size", "32"], &[]).status.success());
    let cfg = fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("\"num_attention_heads\": 4"), "{cfg}");
    fs::write(out.join("config.json"), cfg.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 8"))
        .unwrap();
    let npy = d.path().join("l.npy");
    let o = run(&["logits", out.to_str().unwrap(), "--ids", "1,2,3", "--out", npy.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("forward pass failed") && stderr(&o).contains("expected"), "{}", stderr(&o));
}
