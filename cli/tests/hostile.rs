//! Hostile input, end to end (issue 12 §2): safetensors layouts that lie, index values of the wrong type, FP8
//! scales and MXFP4 blocks that do not fit their weights, non-finite weights through `quantize`, hostile
//! importance matrices, manifests and resume journals. Each refusal is checked the same way: exit code 2, a
//! message naming the file and the tensor (or key), nothing left in the output directory, and the source
//! byte-for-byte as it was. Shard symlinks that leave the model directory (the Hugging Face cache's layout)
//! stay allowed. Config dimensions and the other malformed JSON files are in `cli.rs`; GGUF readers in
//! `formats/tests/gguf_hostile.rs`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Output;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;
use sling_provenance::manifest::hash_file;

mod common;
use common::{bin, copy_fixture, fixture, run, s, stderr};

/// `sling <cmd> SRC -o OUT -q <extra>`, with `--tokenizer-pre gpt-2` for GGUF outputs (the fixtures' tokenizer is
/// not in llama.cpp's table).
fn sling(cmd: &str, src: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args([cmd, s(src), "-o", s(out), "-q"]).args(extra);
    if !extra.iter().any(|a| a.starts_with("vllm:") || a.starts_with("mlx:")) {
        c.args(["--tokenizer-pre", "gpt-2"]);
    }
    c.output().unwrap()
}

/// sha256 of every file in `dir` (the source-untouched check).
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().into_string().unwrap(), hash_file(&e.path()).unwrap().1))
        .collect()
}

/// Runs `cmd` on the model `m` into an empty directory: it must fail with exit code 2, say every one of
/// `needles` on stderr (which starts with "error: "), leave nothing in the output directory, and not touch `m`.
fn assert_refused(cmd: &str, m: &Path, extra: &[&str], needles: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let before = hashes(m);
    let o = sling(cmd, m, &out.join("x.gguf"), extra);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{cmd} {extra:?}: expected exit 2, got {:?}; stderr: {e}", o.status.code());
    assert!(e.starts_with("error: "), "stderr should start with 'error: ': {e}");
    for n in needles {
        assert!(e.contains(n), "{cmd} {extra:?}: stderr should mention {n:?}: {e}");
    }
    let left: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing may be left in the output dir, found {left:?}");
    assert_eq!(hashes(m), before, "the source changed");
}

// ---------------------------------------------------------------------------------------------
// safetensors layouts
// ---------------------------------------------------------------------------------------------

/// Rewrites the JSON header of `path` with `f` (the data section is kept, `extra` bytes appended to it).
fn rewrite_header(path: &Path, extra: usize, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let b = fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Map<String, Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
    f(&mut h);
    let mut hb = serde_json::to_vec(&h).unwrap();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend(&hb);
    out.extend(&b[8 + n..]);
    out.extend(vec![0u8; extra]);
    fs::write(path, out).unwrap();
}

#[test]
fn safetensors_offsets_that_overlap_gap_or_pass_the_end_are_refused() {
    let t = tempfile::tempdir().unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, usize, Edit, Vec<&str>)> = vec![
        (
            "overlap",
            0,
            // embed_tokens [49152, 98304] moved onto lm_head's bytes [0, 49152]
            Box::new(|h| h["model.embed_tokens.weight"]["data_offsets"] = serde_json::json!([0, 49152])),
            vec!["model.safetensors", "model.embed_tokens.weight", "overlap"],
        ),
        (
            "gap",
            2,
            // the last tensor two bytes further on, the file two bytes longer: covered, but with a hole
            Box::new(|h| h["model.norm.weight"]["data_offsets"] = serde_json::json!([246274, 246402])),
            vec!["model.safetensors", "model.norm.weight", "gap of 2 bytes"],
        ),
        (
            "past the end",
            0,
            Box::new(|h| {
                h["model.norm.weight"]["data_offsets"] = serde_json::json!([246272, 246528]);
                h["model.norm.weight"]["shape"] = serde_json::json!([128]);
            }),
            vec!["model.safetensors", "model.norm.weight", "past the end of the data"],
        ),
        (
            "size",
            0,
            // 128 bytes declared as [32] bf16 (64 bytes)
            Box::new(|h| h["model.norm.weight"]["shape"] = serde_json::json!([32])),
            vec!["model.safetensors", "model.norm.weight", "hold 128 bytes but shape [32] of BF16 needs 64"],
        ),
        (
            "huge shape",
            0,
            Box::new(|h| h["model.norm.weight"]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40])),
            vec!["model.safetensors", "model.norm.weight"],
        ),
    ];
    for (what, extra, edit, needles) in cases {
        let m = copy_fixture("llama", &t.path().join(what));
        rewrite_header(&m.join("model.safetensors"), extra, edit);
        assert_refused("convert", &m, &[], &needles);
        assert_refused("quantize", &m, &["--to", "gguf:Q4_K_M"], &needles);
    }
}

#[test]
fn index_weight_map_values_must_be_strings() {
    let t = tempfile::tempdir().unwrap();
    for bad in [serde_json::json!(3), serde_json::json!(null), serde_json::json!(["model-00001-of-00003.safetensors"])]
    {
        let m = copy_fixture("mixtral-sharded", &t.path().join(bad.to_string().replace(['[', ']', '"'], "_")));
        let ip = m.join("model.safetensors.index.json");
        let mut v: Value = serde_json::from_str(&fs::read_to_string(&ip).unwrap()).unwrap();
        v["weight_map"]["model.embed_tokens.weight"] = bad;
        fs::write(&ip, v.to_string()).unwrap();
        assert_refused(
            "convert",
            &m,
            &[],
            &["model.safetensors.index.json", "weight_map[\"model.embed_tokens.weight\"] is not a string"],
        );
    }
}

/// The Hugging Face cache links each snapshot file to `../../blobs/<sha256>`: shards (and the index, config and
/// tokenizer) that are symlinks out of the model directory convert exactly like the files themselves.
#[test]
fn shard_symlinks_out_of_the_directory_stay_allowed() {
    let t = tempfile::tempdir().unwrap();
    let blobs = t.path().join("blobs");
    // named like the fixture: the GGUF's general.name comes from the directory name
    let snap = t.path().join("snapshots/mixtral-sharded");
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snap).unwrap();
    for e in fs::read_dir(fixture("mixtral-sharded")).unwrap() {
        let e = e.unwrap();
        let blob = blobs.join(hash_file(&e.path()).unwrap().1);
        fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../..").join("blobs").join(blob.file_name().unwrap()),
            snap.join(e.file_name()),
        )
        .unwrap();
    }
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let a = sling("convert", &snap, &out.join("linked.gguf"), &["--no-model-card"]);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = sling("convert", &fixture("mixtral-sharded"), &out.join("plain.gguf"), &["--no-model-card"]);
    assert!(b.status.success(), "{}", stderr(&b));
    let (linked, plain) = (hash_file(&out.join("linked.gguf")).unwrap(), hash_file(&out.join("plain.gguf")).unwrap());
    assert_eq!(linked, plain, "converting through the symlinks gave another file");
}

// ---------------------------------------------------------------------------------------------
// FP8 scales and MXFP4 blocks
// ---------------------------------------------------------------------------------------------

/// Rewrites the single-file checkpoint `m` through `f` over (name, dtype, shape, bytes).
fn rebuild(m: &Path, f: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let p = m.join("model.safetensors");
    let b = fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&b).unwrap();
    let mut ts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    f(&mut ts);
    let views: Vec<(String, TensorView)> =
        ts.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let meta = safetensors::SafeTensors::read_metadata(&b).unwrap().1.metadata().clone();
    drop(st);
    safetensors::serialize_to_file(views, meta, &p).unwrap();
}

fn find<'a>(
    ts: &'a mut [(String, Dtype, Vec<usize>, Vec<u8>)],
    name: &str,
) -> &'a mut (String, Dtype, Vec<usize>, Vec<u8>) {
    ts.iter_mut().find(|t| t.0 == name).unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn fp8_scales_missing_misshaped_or_nonfinite_are_refused() {
    let t = tempfile::tempdir().unwrap();
    const W: &str = "model.layers.0.mlp.down_proj.weight";
    const S: &str = "model.layers.0.mlp.down_proj.weight_scale_inv";
    type Edit = Box<dyn Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "missing",
            Box::new(|ts| ts.retain(|t| t.0 != S)),
            vec![W, &"FP8 weight without model.layers.0.mlp.down_proj.weight_scale_inv"],
        ),
        (
            "misshaped",
            Box::new(|ts| {
                let s = find(ts, S);
                s.2 = vec![1, 4]; // [2, 4] for a [64, 128] weight in 32x32 blocks
                s.3.truncate(16);
            }),
            vec![S, "must be [ceil(rows/32), ceil(cols/32)]"],
        ),
        (
            "oversized",
            Box::new(|ts| {
                let s = find(ts, S);
                s.2 = vec![3, 4];
                s.3.extend([0u8; 16]);
            }),
            vec![S, "must be [ceil(rows/32), ceil(cols/32)]"],
        ),
        (
            "nan",
            Box::new(|ts| find(ts, S).3[4..8].copy_from_slice(&f32::NAN.to_le_bytes())),
            vec![S, "non-finite scale NaN at element 1"],
        ),
        (
            "inf",
            Box::new(|ts| find(ts, S).3[0..4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes())),
            vec![S, "non-finite scale -inf at element 0"],
        ),
        ("int scale", Box::new(|ts| find(ts, S).1 = Dtype::I32), vec![S]),
    ];
    for (what, edit, needles) in cases {
        let m = copy_fixture("deepseekv3-fp8", &t.path().join(what));
        rebuild(&m, edit);
        assert_refused("convert", &m, &[], &needles);
        assert_refused("convert", &m, &["--type", "q8_0", "--allow-nonfinite"], &needles);
        assert_refused("quantize", &m, &["--to", "gguf:Q4_K_M"], &needles);
        assert_refused("quantize", &m, &["--to", "vllm:w4a16"], &needles);
    }
    // A zero block size would divide by zero.
    let m = copy_fixture("deepseekv3-fp8", &t.path().join("block0"));
    let cp = m.join("config.json");
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&cp).unwrap()).unwrap();
    v["quantization_config"]["weight_block_size"] = serde_json::json!([0, 32]);
    fs::write(&cp, v.to_string()).unwrap();
    assert_refused("convert", &m, &[], &["weight_scale_inv", "ceil(rows/0)"]);
}

#[test]
fn mxfp4_blocks_and_scales_that_do_not_match_are_refused() {
    let t = tempfile::tempdir().unwrap();
    const B: &str = "model.layers.0.mlp.experts.down_proj_blocks";
    const S: &str = "model.layers.0.mlp.experts.down_proj_scales";
    const GB: &str = "model.layers.0.mlp.experts.gate_up_proj_blocks";
    type Edit = Box<dyn Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "scales shape",
            Box::new(|ts| {
                let s = find(ts, S);
                s.2 = vec![4, 32, 2]; // blocks are [4, 64, 1, 16]
            }),
            vec![S, "MXFP4 scales must be u8 [4, 64, 1] matching model.layers.0.mlp.experts.down_proj_blocks"],
        ),
        (
            "blocks shape",
            Box::new(|ts| {
                let b = find(ts, B);
                b.2 = vec![4, 64, 2, 8];
            }),
            vec![B, "MXFP4 blocks must be [E, rows, n_blocks, 16]"],
        ),
        ("no scales", Box::new(|ts| ts.retain(|t| t.0 != S)), vec![B, "MXFP4 blocks without", S]),
        ("no blocks", Box::new(|ts| ts.retain(|t| t.0 != GB)), vec!["gate_up_proj_scales", "MXFP4 scales without", GB]),
        (
            "stray blocks",
            Box::new(|ts| {
                ts.push(("model.layers.0.self_attn.o_proj_blocks".into(), Dtype::U8, vec![2, 16], vec![0; 32]))
            }),
            vec![
                "model.layers.0.self_attn.o_proj_blocks",
                "supported for the experts' down_proj and gate_up_proj only",
            ],
        ),
        (
            "scales dtype",
            Box::new(|ts| {
                let s = find(ts, S);
                s.1 = Dtype::I8;
            }),
            vec![S, "MXFP4 scales must be u8"],
        ),
    ];
    for (what, edit, needles) in cases {
        let m = copy_fixture("gptoss-mxfp4", &t.path().join(what));
        rebuild(&m, edit);
        assert_refused("convert", &m, &[], &needles);
        assert_refused("quantize", &m, &["--to", "gguf:Q4_K_M"], &needles);
    }
}

// ---------------------------------------------------------------------------------------------
// Non-finite weights through quantize
// ---------------------------------------------------------------------------------------------

#[test]
fn nonfinite_weights_through_quantize_are_refused_unless_allowed() {
    let t = tempfile::tempdir().unwrap();
    // bf16 NaN, +Inf and -Inf in a quantized weight (Q4_K for ffn_down in Q4_K_M) and in an F32-kept norm.
    for (what, tensor, needles, bits) in [
        (
            "nan",
            "model.layers.1.mlp.down_proj.weight",
            &["blk.1.ffn_down.weight", "first at element 5"][..],
            [0xc0u8, 0x7f],
        ),
        // q_proj rows are permuted on the way (rope layout): only the tensor is named here
        ("inf", "model.layers.0.self_attn.q_proj.weight", &["blk.0.attn_q.weight"][..], [0x80, 0x7f]),
        ("-inf", "model.norm.weight", &["output_norm.weight", "first at element 5"][..], [0x80, 0xff]),
    ] {
        let m = copy_fixture("llama", &t.path().join(what));
        rebuild(&m, |ts| find(ts, tensor).3[10..12].copy_from_slice(&bits));
        for preset in ["gguf:Q4_K_M", "gguf:Q8_0"] {
            assert_refused("quantize", &m, &["--to", preset], needles);
            let out = t.path().join(format!("ok-{what}-{preset}.gguf").replace(':', "_"));
            let o = sling("quantize", &m, &out, &["--to", preset, "--allow-nonfinite"]);
            assert!(o.status.success(), "{what} {preset} --allow-nonfinite: {}", stderr(&o));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Importance matrices
// ---------------------------------------------------------------------------------------------

/// A GGUF v3 imatrix in llama.cpp's layout: `imatrix.*` metadata, then each tensor (name, ggml type id, shape
/// ne0-first, raw little-endian bytes), 32-byte aligned.
fn gguf_imatrix(tensors: &[(&str, u32, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
    fn str_(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend(3u64.to_le_bytes());
    str_(&mut b, "imatrix.datasets");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(8u32.to_le_bytes()); // of strings
    b.extend(1u64.to_le_bytes());
    str_(&mut b, "calib.txt");
    for k in ["imatrix.chunk_count", "imatrix.chunk_size"] {
        str_(&mut b, k);
        b.extend(4u32.to_le_bytes()); // u32
        b.extend(8u32.to_le_bytes());
    }
    let mut off = 0u64;
    let mut offs = Vec::new();
    for (name, ty, ne, data) in tensors {
        str_(&mut b, name);
        b.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
        offs.push(off);
        off += (data.len() as u64).div_ceil(32) * 32;
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        let start = b.len();
        b.extend(data);
        while !(b.len() - start).is_multiple_of(32) {
            b.push(0);
        }
    }
    b
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A legacy `.dat` imatrix: (name, ncall, values).
fn dat_imatrix(entries: &[(&str, i32, &[f32])]) -> Vec<u8> {
    let mut b = (entries.len() as i32).to_le_bytes().to_vec();
    for (n, ncall, v) in entries {
        b.extend((n.len() as i32).to_le_bytes());
        b.extend(n.as_bytes());
        b.extend(ncall.to_le_bytes());
        b.extend((v.len() as i32).to_le_bytes());
        b.extend(f32_bytes(v));
    }
    b
}

#[test]
fn hostile_imatrices_are_refused() {
    let t = tempfile::tempdir().unwrap();
    const Q: &str = "blk.0.attn_q.weight";
    let ok_sums = f32_bytes(&[1.0; 64]);
    let ok_counts = f32_bytes(&[4.0]);
    let mut nan_sums = [1.0f32; 64];
    nan_sums[7] = f32::NAN;
    let mut neg_sums = [1.0f32; 64];
    neg_sums[3] = -2.0;
    let sums = |b: Vec<u8>| (format!("{Q}.in_sum2"), 0u32, vec![64u64, 1], b);
    let counts = |b: Vec<u8>| (format!("{Q}.counts"), 0u32, vec![1u64, 1], b);
    type ImTensor = (String, u32, Vec<u64>, Vec<u8>);
    let cases: Vec<(&str, Vec<ImTensor>, Vec<&str>)> = vec![
        ("nan-sums", vec![sums(f32_bytes(&nan_sums)), counts(ok_counts.clone())], vec!["in_sum2: element 7 is NaN"]),
        ("neg-sums", vec![sums(f32_bytes(&neg_sums)), counts(ok_counts.clone())], vec!["in_sum2: element 3 is -2"]),
        ("neg-count", vec![sums(ok_sums.clone()), counts(f32_bytes(&[-4.0]))], vec!["counts: element 0 is -4"]),
        ("nan-count", vec![sums(ok_sums.clone()), counts(f32_bytes(&[f32::NAN]))], vec!["counts: element 0 is NaN"]),
        (
            "inf-count",
            vec![sums(ok_sums.clone()), counts(f32_bytes(&[f32::INFINITY]))],
            vec!["counts: element 0 is inf"],
        ),
        ("frac-count", vec![sums(ok_sums.clone()), counts(f32_bytes(&[2.5]))], vec!["counts: element 0 is 2.5"]),
        (
            "mismatched",
            vec![sums(f32_bytes(&[1.0; 64])), (format!("{Q}.counts"), 0, vec![1, 3], f32_bytes(&[1.0; 3]))],
            vec!["64 sums do not divide into 3 matrices"],
        ),
        ("no-counts", vec![sums(ok_sums.clone())], vec!["mismatched sums and counts for blk.0.attn_q.weight"]),
        ("no-sums", vec![counts(ok_counts.clone())], vec!["mismatched sums and counts for blk.0.attn_q.weight"]),
        (
            "f16-sums",
            vec![(format!("{Q}.in_sum2"), 1, vec![64, 1], vec![0u8; 128]), counts(ok_counts.clone())],
            vec!["must be F32"],
        ),
        (
            "i32-counts",
            vec![sums(ok_sums.clone()), (format!("{Q}.counts"), 26, vec![1, 1], 4i32.to_le_bytes().to_vec())],
            vec!["must be F32"],
        ),
        // Well-formed, but one matrix of 64 where the tensor has 64 columns per... row count disagreeing.
        (
            "wrong-size",
            vec![(format!("{Q}.in_sum2"), 0, vec![32, 1], f32_bytes(&[1.0; 32])), counts(ok_counts.clone())],
            vec![Q],
        ),
    ];
    let m = fixture("qwen3moe");
    for (what, tensors, needles) in cases {
        let p = t.path().join(format!("{what}.gguf"));
        let ts: Vec<(&str, u32, Vec<u64>, Vec<u8>)> =
            tensors.iter().map(|(n, ty, ne, d)| (n.as_str(), *ty, ne.clone(), d.clone())).collect();
        fs::write(&p, gguf_imatrix(&ts)).unwrap();
        let mut needles = needles.clone();
        needles.push("imatrix");
        assert_refused("quantize", &m, &["--to", "gguf:Q4_K_M", "--imatrix", s(&p)], &needles);
    }
    // The same through the legacy format.
    let mut nan = [1.0f32; 64];
    nan[9] = f32::NAN;
    let mut neg = [1.0f32; 64];
    neg[2] = -1.0;
    for (what, b, needle) in [
        ("nan", dat_imatrix(&[(Q, 1, &nan)]), "value 9 is NaN"),
        ("neg", dat_imatrix(&[(Q, 1, &neg)]), "value 2 is -1"),
        ("ncall", dat_imatrix(&[(Q, -3, &[1.0; 64])]), "negative ncall -3"),
    ] {
        let p = t.path().join(format!("{what}.dat"));
        fs::write(&p, b).unwrap();
        assert_refused("quantize", &m, &["--to", "gguf:Q4_K_M", "--imatrix", s(&p)], &["imatrix", Q, needle]);
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests and resume journals
// ---------------------------------------------------------------------------------------------

/// A manifest edited by someone who also recomputed its seal: names that leave the directory, tensors past the
/// end of the file, sources outside the source directory are problems `verify` reports (exit 1), never paths it
/// follows; nothing is written.
#[test]
fn resealed_hostile_manifests_are_problems_not_paths() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let o = sling("convert", &fixture("mixtral"), &out.join("m.gguf"), &["--no-model-card"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mp = out.join("m.sling.json");
    let pristine: Value = serde_json::from_slice(&fs::read(&mp).unwrap()).unwrap();
    // A file outside the artifact that a hostile manifest points at.
    fs::write(t.path().join("victim.gguf"), b"victim").unwrap();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, Vec<&str>, &[&str])> = vec![
        (
            "output ../",
            Box::new(|m| m["outputs"][0]["name"] = "../victim.gguf".into()),
            vec!["\"../victim.gguf\" is not a plain file name"],
            &[],
        ),
        (
            "output abs",
            Box::new(|m| m["outputs"][0]["name"] = "/etc/passwd".into()),
            vec!["\"/etc/passwd\" is not a plain file name"],
            &[],
        ),
        (
            "offset past EOF",
            Box::new(|m| {
                let last = m["tensors"].as_array().unwrap().len() - 1;
                m["tensors"][last]["offset"] = (1u64 << 50).into();
            }),
            vec!["m.gguf"],
            &[],
        ),
        ("size past EOF", Box::new(|m| m["tensors"][0]["n_bytes"] = u64::MAX.into()), vec!["m.gguf"], &[]),
        (
            "tensor file ../",
            Box::new(|m| m["tensors"][0]["file"] = "../victim.gguf".into()),
            vec!["not a listed output"],
            &[],
        ),
        (
            "source ../",
            Box::new(|m| m["sources"][0]["path"] = "../../victim.gguf".into()),
            vec!["leaves the source directory"],
            &["--source"],
        ),
    ];
    for (what, edit, needles, flags) in cases {
        let mut m = pristine.clone();
        edit(&mut m);
        m["manifest_sha256"] = sling_provenance::manifest::seal_of(&m).into();
        fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        let before = hashes(&out);
        let src = fixture("mixtral");
        let artifact = out.join("m.gguf");
        let mut args = vec!["verify", s(&artifact)];
        if !flags.is_empty() {
            args.extend(["--source", s(&src)]);
        }
        let o = bin().args(&args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert_eq!(o.status.code(), Some(1), "{what}: {text}");
        assert!(!text.contains("manifest was edited"), "{what}: the seal should hold: {text}");
        for n in needles {
            assert!(text.contains(n), "{what}: should mention {n:?}: {text}");
        }
        assert_eq!(hashes(&out), before, "{what}: verify wrote something");
        assert_eq!(fs::read(t.path().join("victim.gguf")).unwrap(), b"victim");
    }
}

/// A resume journal is a claim to check, never trusted: shard names that leave the directory, offsets past the
/// end of the partial file and tensor names with `../` end what is reused, the file they name is untouched, and
/// the resumed output is byte-identical to an uninterrupted run.
#[test]
fn hostile_resume_journals_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("mixtral");
    let reference = t.path().join("ref");
    fs::create_dir_all(&reference).unwrap();
    let o = sling("convert", &src, &reference.join("m.gguf"), &["--reproducible", "--no-model-card"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = fs::read(reference.join("m.gguf")).unwrap();
    let victim = t.path().join("victim.gguf");
    let victim_partial = t.path().join("victim.gguf.partial");
    type Edit = Box<dyn Fn(&mut Vec<Value>)>;
    let cases: Vec<(&str, Edit, u64)> = vec![
        ("files ../", Box::new(|j| j[0]["files"] = serde_json::json!(["../victim.gguf"])), 0),
        ("offset past EOF", Box::new(|j| j[1 + 5]["offset"] = (1u64 << 40).into()), 5),
        ("end past EOF", Box::new(|j| j[1 + 5]["end"] = u64::MAX.into()), 5),
        ("name ../", Box::new(|j| j[1 + 3]["name"] = "../../victim.gguf".into()), 3),
        ("huge n_bytes", Box::new(|j| j[1 + 4]["n_bytes"] = (1u64 << 62).into()), 4),
        ("file index", Box::new(|j| j[1 + 2]["file"] = 7.into()), 2),
    ];
    for (what, edit, reused) in cases {
        fs::write(&victim, b"victim").unwrap();
        fs::write(&victim_partial, b"victim").unwrap();
        let d = t.path().join(what.replace([' ', '/'], "_"));
        fs::create_dir_all(&d).unwrap();
        let o = bin()
            .args(["convert", s(&src), "-o", s(&d.join("m.gguf")), "--tokenizer-pre", "gpt-2", "-q"])
            .args(["--reproducible", "--no-model-card"])
            .env("SLING_TEST_ABORT_AFTER_TENSORS", "12")
            .env("SLING_JOURNAL_INTERVAL_MS", "0")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(134), "{what}: the hook should stop the run: {}", stderr(&o));
        let jp = d.join("m.gguf.partial.json");
        let mut lines: Vec<Value> =
            fs::read_to_string(&jp).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(lines.len() > 8, "{what}: the journal should list tensors");
        edit(&mut lines);
        let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
        fs::write(&jp, text).unwrap();
        let o = sling("convert", &src, &d.join("m.gguf"), &["--reproducible", "--no-model-card", "--resume", "--json"]);
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["resumed_tensors"].as_u64(), Some(reused), "{what}: {}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(fs::read(d.join("m.gguf")).unwrap(), want, "{what}: the resumed output differs");
        assert_eq!(fs::read(&victim).unwrap(), b"victim", "{what}");
        assert_eq!(fs::read(&victim_partial).unwrap(), b"victim", "{what}");
    }
}

/// The same for the journal of a `--to vllm:…` / `--to mlx:…` directory (`OUT.partial.json`): what it claims is
/// checked against the plan's own layout and the bytes' hashes, a file it names is never opened, and the resumed
/// directory is byte-identical to an uninterrupted run. The run is stopped after 9 weights; an edit of the first
/// entry reuses nothing, one of the last entry reuses the 8 weights before it.
#[test]
fn hostile_directory_resume_journals_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let src = fixture("qwen3moe");
    let quantize = |out: &Path, extra: &[&str], env: &[(&str, &str)]| {
        bin()
            .args(["quantize", s(&src), "--to", "vllm:w8a16", "-o", s(out), "-q", "--reproducible"])
            .args(extra)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let reference = t.path().join("ref");
    assert!(quantize(&reference, &[], &[]).status.success());
    let victim = t.path().join("victim.safetensors");
    type Edit = Box<dyn Fn(&mut Vec<Value>)>;
    let cases: Vec<(&str, Edit, u64)> = vec![
        ("as written", Box::new(|_| {}), 9),
        ("files ../", Box::new(|j| j[0]["files"] = serde_json::json!(["../victim.safetensors"])), 0),
        ("offset past EOF", Box::new(|j| j[1]["offset"] = (1u64 << 40).into()), 0),
        ("sha256", Box::new(|j| j[1]["sha256"] = "00".repeat(32).into()), 0),
        (
            "name ../",
            Box::new(|j| *j.last_mut().unwrap().get_mut("name").unwrap() = "../../victim.safetensors".into()),
            8,
        ),
        ("huge n_bytes", Box::new(|j| *j.last_mut().unwrap().get_mut("n_bytes").unwrap() = (1u64 << 62).into()), 8),
        ("file index", Box::new(|j| *j.last_mut().unwrap().get_mut("file").unwrap() = 7.into()), 8),
        ("torn line", Box::new(|j| *j.last_mut().unwrap() = Value::String("{\"i\":".into())), 8),
    ];
    for (what, edit, reused) in cases {
        fs::write(&victim, b"victim").unwrap();
        let d = t.path().join(what.replace([' ', '/', '.'], "_"));
        let env = [("SLING_TEST_ABORT_AFTER_WEIGHTS", "9"), ("SLING_JOURNAL_INTERVAL_MS", "0")];
        let o = quantize(&d, &["-t", "1"], &env);
        assert_eq!(o.status.code(), Some(134), "{what}: the hook should stop the run: {}", stderr(&o));
        let jp = t.path().join(format!("{}.partial.json", d.file_name().unwrap().to_string_lossy()));
        let mut lines: Vec<Value> =
            fs::read_to_string(&jp).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(lines.len() > 9, "{what}: the journal should list the tensors of 9 weights");
        edit(&mut lines);
        let text: String =
            lines.iter().map(|l| l.as_str().map(str::to_string).unwrap_or_else(|| l.to_string()) + "\n").collect();
        fs::write(&jp, text).unwrap();
        let o = bin()
            .args(["quantize", s(&src), "--to", "vllm:w8a16", "-o", s(&d), "--reproducible", "--resume"])
            .args(["--progress", "json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        let start = stderr(&o).lines().find(|l| l.contains("\"event\":\"start\"")).unwrap().to_string();
        let v: Value = serde_json::from_str(&start).unwrap();
        assert_eq!(v["resumed_weights"].as_u64(), Some(reused), "{what}: {start}");
        for name in ["model.safetensors", "config.json"] {
            assert_eq!(fs::read(d.join(name)).unwrap(), fs::read(reference.join(name)).unwrap(), "{what}: {name}");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"victim", "{what}");
    }
}

/// Found by the `tokenizer_json` fuzz target: a `TemplateProcessing` post-processor whose single-sequence template
/// uses sequence B made the tokenizers library panic (index out of bounds), so `convert` crashed with exit 101.
/// Now: exit 2 naming tokenizer.json, nothing written.
#[test]
fn a_tokenizer_template_the_library_cannot_run_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = copy_fixture("qwen3moe", t.path());
    let p = src.join("tokenizer.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "B", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {}
    });
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = t.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let o = run(&["convert", s(&src), "--type", "q8_0", "-o", s(&out.join("m.gguf"))], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("tokenizer.json") && stderr(&o).contains("sequence B"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}
