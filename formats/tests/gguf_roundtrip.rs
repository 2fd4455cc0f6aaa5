//! Write-then-read tests of the GGUF writer and reader, with byte-exact comparisons against files
//! written by the pinned gguf-py `GGUFWriter`.
//!
//! The golden lengths and SHA-256 sums below were produced once, by hand, with the gguf-py of the
//! pinned llama.cpp tree (`llama-cpp-python==0.3.36`); Python is not needed to run these tests.
//! The script (`PYTHONPATH=<llama.cpp>/gguf-py python gen.py OUTDIR`, numpy required):
//!
//! ```python
//! import sys, os, hashlib, json
//! import numpy as np
//! from gguf import GGUFWriter, GGUFValueType as T, GGMLQuantizationType as Q
//! out = sys.argv[1]
//! def data(i, n):
//!     return bytes(((i * 31 + k * 7) % 251) for k in range(n))
//! def write(w):
//!     w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
//! # 1. every value type, several dtypes
//! w = GGUFWriter(os.path.join(out, "all.gguf"), "llama")
//! w.add_uint8("t.u8", 200); w.add_int8("t.i8", -100); w.add_uint16("t.u16", 60000); w.add_int16("t.i16", -30000)
//! w.add_uint32("t.u32", 4000000000); w.add_int32("t.i32", -2000000000); w.add_float32("t.f32", 1.5)
//! w.add_bool("t.bool", True); w.add_string("t.str", "héllo"); w.add_uint64("t.u64", 2**63 + 5)
//! w.add_int64("t.i64", -2**62); w.add_float64("t.f64", -0.1)
//! w.add_key_value("t.arr_u32", [1, 2, 3], T.ARRAY, sub_type=T.UINT32)
//! w.add_array("t.arr_i32", [-1, 0, 7])
//! w.add_array("t.arr_str", ["a", "", "ü"])
//! w.add_array("t.arr_f32", [0.5, -2.0])
//! w.add_array("t.arr_bool", [True, False, True])
//! w.add_key_value("t.arr_i8", [-1, 2], T.ARRAY, sub_type=T.INT8)
//! w.add_key_value("t.arr_f64", [1e300], T.ARRAY, sub_type=T.FLOAT64)
//! w.add_tensor("a", np.frombuffer(data(0, 24), dtype=np.float32).reshape(2, 3))
//! w.add_tensor("b", np.frombuffer(data(1, 10), dtype=np.float16).reshape(5))
//! w.add_tensor("c", np.frombuffer(data(2, 136), dtype=np.uint8).reshape(2, 68), raw_dtype=Q.Q8_0)
//! w.add_tensor("d", np.frombuffer(data(3, 4), dtype=np.int32).reshape(()))
//! w.add_tensor("e", np.frombuffer(data(4, 24), dtype=np.uint8).reshape(4, 6), raw_dtype=Q.BF16)
//! write(w)
//! # 2. custom alignment
//! w = GGUFWriter(os.path.join(out, "align64.gguf"), "llama")
//! w.add_custom_alignment(64)
//! w.add_tensor("x", np.frombuffer(data(5, 12), dtype=np.float32).reshape(3))
//! w.add_tensor("y", np.frombuffer(data(6, 68), dtype=np.uint8).reshape(1, 68), raw_dtype=Q.Q8_0)
//! write(w)
//! # 3. splits
//! sizes = [10, 100, 3, 64, 1]
//! def split(name, **kw):
//!     w = GGUFWriter(os.path.join(out, name + ".gguf"), "llama", **kw)
//!     w.add_uint32("t.u32", 7)
//!     for i, n in enumerate(sizes):
//!         w.add_tensor(f"t{i}", np.frombuffer(data(10 + i, 4 * n), dtype=np.float32).reshape(n))
//!     write(w)
//! split("bytens", split_max_tensors=2)
//! split("bybytes", split_max_size=420)
//! split("small", split_max_tensors=3, small_first_shard=True)
//! split("nosplit", split_max_tensors=10)
//! res = {}
//! for f in sorted(os.listdir(out)):
//!     b = open(os.path.join(out, f), "rb").read()
//!     res[f] = {"len": len(b), "sha256": hashlib.sha256(b).hexdigest()}
//! print(json.dumps(res, indent=1))
//! ```
//!
//! The split shards written by sling were also merged by hand with the pinned llama.cpp build:
//! `cd OUT && LD_LIBRARY_PATH=$B $B/llama-gguf-split --merge bytens-00001-of-00003.gguf merged-bytens.gguf`
//! with `B=/root/.cache/sling-lab/llama.cpp-build/bin` (and the same for `bybytes` and `small`); it
//! accepted them ("merged from 3 split with 5 tensors"), and the merged file, re-opened with
//! `GgufFile`, held every tensor with its original bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sling_core::DType;
use sling_formats::gguf::{GgufError, GgufFile, GgufValue, GgufWriter, SplitPolicy, TensorDesc, ValueType};

/// The test data pattern shared with the Python script.
fn data(i: usize, n: usize) -> Vec<u8> {
    (0..n).map(|k| ((i * 31 + k * 7) % 251) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn kv(key: &str, v: GgufValue) -> (String, GgufValue) {
    (key.to_string(), v)
}

/// Writes `tensors` with `payloads`, feeding each tensor in chunks of `chunk` bytes.
fn write_all(
    out: &Path,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<TensorDesc>,
    payloads: &[Vec<u8>],
    split: SplitPolicy,
    chunk: usize,
) -> Vec<PathBuf> {
    let mut w = GgufWriter::create(out, kvs, tensors, split).unwrap();
    for p in payloads {
        for c in p.chunks(chunk) {
            w.write_data(c).unwrap();
        }
    }
    let expected = w.output_paths();
    let paths = w.finish().unwrap();
    assert_eq!(paths, expected);
    paths
}

fn assert_golden(path: &Path, len: usize, sha: &str) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len(), len, "{}: length differs from gguf-py", path.display());
    assert_eq!(sha256_hex(&bytes), sha, "{}: bytes differ from gguf-py", path.display());
}

fn all_types_kvs() -> Vec<(String, GgufValue)> {
    vec![
        kv("general.architecture", GgufValue::String("llama".into())),
        kv("t.u8", GgufValue::U8(200)),
        kv("t.i8", GgufValue::I8(-100)),
        kv("t.u16", GgufValue::U16(60000)),
        kv("t.i16", GgufValue::I16(-30000)),
        kv("t.u32", GgufValue::U32(4_000_000_000)),
        kv("t.i32", GgufValue::I32(-2_000_000_000)),
        kv("t.f32", GgufValue::F32(1.5)),
        kv("t.bool", GgufValue::Bool(true)),
        kv("t.str", GgufValue::String("héllo".into())),
        kv("t.u64", GgufValue::U64((1u64 << 63) + 5)),
        kv("t.i64", GgufValue::I64(-(1i64 << 62))),
        kv("t.f64", GgufValue::F64(-0.1)),
        kv(
            "t.arr_u32",
            GgufValue::Array(ValueType::U32, vec![GgufValue::U32(1), GgufValue::U32(2), GgufValue::U32(3)]),
        ),
        kv(
            "t.arr_i32",
            GgufValue::Array(ValueType::I32, vec![GgufValue::I32(-1), GgufValue::I32(0), GgufValue::I32(7)]),
        ),
        kv("t.arr_str", GgufValue::strings(["a", "", "ü"])),
        kv("t.arr_f32", GgufValue::Array(ValueType::F32, vec![GgufValue::F32(0.5), GgufValue::F32(-2.0)])),
        kv(
            "t.arr_bool",
            GgufValue::Array(
                ValueType::Bool,
                vec![GgufValue::Bool(true), GgufValue::Bool(false), GgufValue::Bool(true)],
            ),
        ),
        kv("t.arr_i8", GgufValue::Array(ValueType::I8, vec![GgufValue::I8(-1), GgufValue::I8(2)])),
        kv("t.arr_f64", GgufValue::Array(ValueType::F64, vec![GgufValue::F64(1e300)])),
    ]
}

fn all_types_tensors() -> (Vec<TensorDesc>, Vec<Vec<u8>>) {
    let tensors = vec![
        TensorDesc::new("a", DType::F32, vec![3, 2]),
        TensorDesc::new("b", DType::F16, vec![5]),
        TensorDesc::new("c", DType::Q8_0, vec![64, 2]),
        TensorDesc::new("d", DType::I32, vec![]),
        TensorDesc::new("e", DType::BF16, vec![3, 4]),
    ];
    let payloads = vec![data(0, 24), data(1, 10), data(2, 136), data(3, 4), data(4, 24)];
    (tensors, payloads)
}

#[test]
fn all_value_types_and_dtypes_match_gguf_py_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("all.gguf");
    let (tensors, payloads) = all_types_tensors();
    let paths = write_all(&out, all_types_kvs(), tensors.clone(), &payloads, SplitPolicy::None, 7);
    assert_eq!(paths, vec![out.clone()]);
    assert_golden(&out, 1120, "f76c8ffb7c10fce5319b46fbd029eded4fca83f5d9b41860bfa380614653932c");

    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(f.kvs, all_types_kvs());
    assert_eq!(f.get("t.u64"), Some(&GgufValue::U64((1u64 << 63) + 5)));
    assert_eq!(f.get("missing"), None);
    assert_eq!(f.tensors.len(), tensors.len());
    let mut expected_offset = 0;
    for ((t, desc), payload) in f.tensors.iter().zip(&tensors).zip(&payloads) {
        assert_eq!(t.name, desc.name);
        assert_eq!(t.dtype, desc.dtype);
        assert_eq!(t.ne, desc.ne);
        assert_eq!(t.n_bytes as usize, payload.len());
        assert_eq!(t.offset, expected_offset);
        expected_offset += t.n_bytes.div_ceil(32) * 32;
        assert_eq!(f.tensor_data(t), &payload[..]);
        assert_eq!(f.tensor(&t.name), Some(t));
    }
    assert!(f.tensor("nope").is_none());
    // Padding after the last tensor too.
    assert_eq!(f.file_len(), f.data_offset + expected_offset);
}

#[test]
fn custom_alignment_matches_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("align64.gguf");
    let kvs = vec![
        kv("general.architecture", GgufValue::String("llama".into())),
        kv("general.alignment", GgufValue::U32(64)),
    ];
    // The Python tensor "y" is (1, 68) bytes = 2 Q8_0 blocks: ne = [64, 1].
    let tensors = vec![TensorDesc::new("x", DType::F32, vec![3]), TensorDesc::new("y", DType::Q8_0, vec![64, 1])];
    let payloads = vec![data(5, 12), data(6, 68)];
    write_all(&out, kvs, tensors, &payloads, SplitPolicy::None, 1000);
    assert_golden(&out, 384, "6c9a5fa28257bb729de42801d16d0453d5e7f3c0acc0d7023ca858462ca3b9b9");
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.tensors[1].offset, 64);
    assert_eq!(f.tensor_data(&f.tensors[1]), &payloads[1][..]);
}

const SPLIT_SIZES: [u64; 5] = [10, 100, 3, 64, 1];

type Input = (Vec<(String, GgufValue)>, Vec<TensorDesc>, Vec<Vec<u8>>);

fn split_input() -> Input {
    let kvs = vec![kv("general.architecture", GgufValue::String("llama".into())), kv("t.u32", GgufValue::U32(7))];
    let tensors =
        SPLIT_SIZES.iter().enumerate().map(|(i, &n)| TensorDesc::new(format!("t{i}"), DType::F32, vec![n])).collect();
    let payloads = SPLIT_SIZES.iter().enumerate().map(|(i, &n)| data(10 + i, 4 * n as usize)).collect();
    (kvs, tensors, payloads)
}

/// Checks a split set: names, split keys, other KVs only in shard 0, each shard self-contained,
/// tensor assignment and data.
fn check_split(paths: &[PathBuf], stem: &str, groups: &[&[usize]], payloads: &[Vec<u8>]) {
    let n = groups.len();
    assert_eq!(paths.len(), n);
    let mut total = 0;
    let mut seen = BTreeSet::new();
    for (i, (path, group)) in paths.iter().zip(groups).enumerate() {
        assert_eq!(path.file_name().unwrap().to_str().unwrap(), format!("{stem}-{:05}-of-{:05}.gguf", i + 1, n));
        let f = GgufFile::open(path).unwrap();
        let keys: Vec<&str> = f.kvs.iter().map(|(k, _)| k.as_str()).collect();
        if i == 0 {
            assert_eq!(keys, ["general.architecture", "t.u32", "split.no", "split.count", "split.tensors.count"]);
        } else {
            assert_eq!(keys, ["split.no", "split.count", "split.tensors.count"]);
        }
        assert_eq!(f.get("split.no"), Some(&GgufValue::U16(i as u16)));
        assert_eq!(f.get("split.count"), Some(&GgufValue::U16(n as u16)));
        assert_eq!(f.get("split.tensors.count"), Some(&GgufValue::I32(payloads.len() as i32)));
        let names: Vec<String> = f.tensors.iter().map(|t| t.name.clone()).collect();
        let want: Vec<String> = group.iter().map(|j| format!("t{j}")).collect();
        assert_eq!(names, want, "{}", path.display());
        for (t, &j) in f.tensors.iter().zip(group.iter()) {
            assert_eq!(f.tensor_data(t), &payloads[j][..]);
            assert!(seen.insert(t.name.clone()));
        }
        total += f.tensors.len();
    }
    assert_eq!(total, payloads.len());
}

#[test]
fn split_by_tensor_count_matches_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    let (kvs, tensors, payloads) = split_input();
    let paths = write_all(&dir.path().join("bytens.gguf"), kvs, tensors, &payloads, SplitPolicy::MaxTensors(2), 13);
    check_split(&paths, "bytens", &[&[0, 1], &[2, 3], &[4]], &payloads);
    assert_golden(&paths[0], 736, "8ef1cf7368284c20404a98d33e48efa3df3dfd42b470803d7dd1a8ad921e5077");
    assert_golden(&paths[1], 480, "2df574886b1eb1e2c5c3d738d6937389a2e11d83f90f9192247b99e16446abb7");
    assert_golden(&paths[2], 192, "bd84986f3ce9ee06d98f826f35ee576d12edc8c8616a72edf2acc3d433bd7010");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "no temporary file is left: {names:?}");
}

#[test]
fn split_by_bytes_matches_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    let (kvs, tensors, payloads) = split_input();
    let paths = write_all(&dir.path().join("bybytes.gguf"), kvs, tensors, &payloads, SplitPolicy::MaxBytes(420), 64);
    check_split(&paths, "bybytes", &[&[0], &[1, 2], &[3, 4]], &payloads);
    assert_golden(&paths[0], 288, "21ab22fda70125cec2644ec8672fca89c9c9c9004d406e3798f393052c68d917");
    assert_golden(&paths[1], 640, "d75d27f367b1bde3fec61c5b7ca2a86efbc7e355bf6d8b792dfc27646da9e234");
    assert_golden(&paths[2], 480, "b118f27be6108d80876c1108f3e9492cc25dfbe24b9e2a088402b93765daf72c");
}

#[test]
fn small_first_shard_matches_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    let (kvs, tensors, payloads) = split_input();
    let policy = SplitPolicy::Limits { max_tensors: 3, max_bytes: 0, small_first_shard: true };
    let paths = write_all(&dir.path().join("small.gguf"), kvs, tensors, &payloads, policy, 5);
    check_split(&paths, "small", &[&[], &[0, 1, 2], &[3, 4]], &payloads);
    assert_golden(&paths[0], 192, "f65833e197beda4b438d775abc2b386b817450a136a30b8d65fc7a71908313d5");
    assert_golden(&paths[1], 736, "12df852b52f6ff290fb033a946c25d2e9a0b6461b7d577f54616ca306ba67543");
    assert_golden(&paths[2], 480, "b118f27be6108d80876c1108f3e9492cc25dfbe24b9e2a088402b93765daf72c");
}

#[test]
fn split_into_one_shard_is_a_plain_file_without_split_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (kvs, tensors, payloads) = split_input();
    let out = dir.path().join("nosplit.gguf");
    let paths = write_all(&out, kvs, tensors, &payloads, SplitPolicy::MaxTensors(10), 100);
    assert_eq!(paths, vec![out.clone()]);
    assert_golden(&out, 1088, "1370703931cabe96f03acbddf83fd76f37274f6d9d630c1e1ed83b823fbb2e7c");
    let f = GgufFile::open(&out).unwrap();
    assert!(f.get("split.count").is_none());
    // MaxBytes larger than everything, and Limits with no limits: also one file.
    for policy in
        [SplitPolicy::MaxBytes(1 << 40), SplitPolicy::Limits { max_tensors: 0, max_bytes: 0, small_first_shard: false }]
    {
        let (kvs, tensors, _) = split_input();
        let w = GgufWriter::create(&out, kvs, tensors, policy).unwrap();
        assert_eq!(w.output_paths(), vec![out.clone()]);
    }
}

#[test]
fn custom_alignment_applies_to_first_shard_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut kvs, tensors, payloads) = split_input();
    kvs.push(kv("general.alignment", GgufValue::U32(256)));
    let paths = write_all(&dir.path().join("al.gguf"), kvs, tensors, &payloads, SplitPolicy::MaxTensors(2), 9);
    let f0 = GgufFile::open(&paths[0]).unwrap();
    assert_eq!(f0.alignment, 256);
    assert_eq!(f0.tensors[1].offset, 256);
    for p in &paths[1..] {
        let f = GgufFile::open(p).unwrap();
        assert_eq!(f.alignment, 32);
        assert!(f.get("general.alignment").is_none());
    }
}

#[test]
fn many_dtypes_and_zero_sized_tensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("many.gguf");
    let mut tensors = Vec::new();
    let mut payloads = Vec::new();
    for (i, &dt) in DType::ALL.iter().filter(|d| d.info().ggml_id.is_some()).enumerate() {
        let be = dt.block_elems() as u64;
        let ne = vec![be * 2, 3, 1, 2];
        let n = dt.bytes_for(ne.iter().product()).unwrap() as usize;
        tensors.push(TensorDesc::new(format!("blk.{i}.{}", dt.name()), dt, ne));
        payloads.push(data(i, n));
    }
    tensors.push(TensorDesc::new("empty", DType::F32, vec![0, 4]));
    payloads.push(Vec::new());
    tensors.push(TensorDesc::new("after_empty", DType::Q4K, vec![256]));
    payloads.push(data(99, 144));
    let paths = write_all(&out, vec![], tensors.clone(), &payloads, SplitPolicy::MaxBytes(4000), 1 << 20);
    assert!(paths.len() > 1);
    let mut found = 0;
    for p in &paths {
        let f = GgufFile::open(p).unwrap();
        for t in &f.tensors {
            let j = tensors.iter().position(|d| d.name == t.name).unwrap();
            assert_eq!(t.dtype, tensors[j].dtype);
            assert_eq!(t.ne, tensors[j].ne);
            assert_eq!(f.tensor_data(t), &payloads[j][..]);
            found += 1;
        }
    }
    assert_eq!(found, tensors.len());
}

#[test]
fn file_without_tensors_or_kvs_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("empty.gguf");
    let paths = GgufWriter::create(&out, vec![], vec![], SplitPolicy::MaxTensors(1)).unwrap().finish().unwrap();
    assert_eq!(paths, vec![out.clone()]);
    // Header (24 bytes) padded to 32 like gguf-py does.
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 32);
    let f = GgufFile::open(&out).unwrap();
    assert!(f.kvs.is_empty() && f.tensors.is_empty());
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn dropping_an_unfinished_writer_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let (kvs, tensors, payloads) = split_input();
    let out = dir.path().join("dropped.gguf");
    {
        let _w = GgufWriter::create(&out, kvs.clone(), tensors.clone(), SplitPolicy::None).unwrap();
        assert!(!out.exists());
    }
    assert!(dir_is_empty(dir.path()));
    {
        // Half-written, across shards: completed shards are dropped too.
        let mut w = GgufWriter::create(&out, kvs, tensors, SplitPolicy::MaxTensors(1)).unwrap();
        for p in &payloads[..3] {
            w.write_data(p).unwrap();
        }
        w.write_data(&payloads[3][..5]).unwrap();
        for p in w.output_paths() {
            assert!(!p.exists());
        }
    }
    assert!(dir_is_empty(dir.path()));
}

#[test]
fn finish_refuses_a_short_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (kvs, tensors, payloads) = split_input();
    let out = dir.path().join("short.gguf");
    let mut w = GgufWriter::create(&out, kvs, tensors, SplitPolicy::None).unwrap();
    w.write_data(&payloads[0]).unwrap();
    w.write_data(&payloads[1][..399]).unwrap();
    assert_eq!(w.pending(), Some(("t1", 1)));
    match w.finish() {
        Err(GgufError::IncompleteTensor { tensor, written, n_bytes, .. }) => {
            assert_eq!((tensor.as_str(), written, n_bytes), ("t1", 399, 400));
        }
        other => panic!("expected IncompleteTensor, got {other:?}"),
    }
    assert!(dir_is_empty(dir.path()));

    // Missing whole tensors at the end.
    let (kvs, tensors, payloads) = split_input();
    let mut w = GgufWriter::create(&out, kvs, tensors, SplitPolicy::MaxTensors(2)).unwrap();
    w.write_data(&payloads[0]).unwrap();
    let err = w.finish().unwrap_err();
    assert!(matches!(err, GgufError::IncompleteTensor { ref tensor, written: 0, .. } if tensor == "t1"), "{err}");
    assert!(err.to_string().contains("t1"));
    assert!(dir_is_empty(dir.path()));
}

#[test]
fn write_data_never_spans_two_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (kvs, tensors, payloads) = split_input();
    let out = dir.path().join("span.gguf");
    let mut w = GgufWriter::create(&out, kvs, tensors, SplitPolicy::None).unwrap();
    let mut both = payloads[0].clone();
    both.push(0);
    let err = w.write_data(&both).unwrap_err();
    assert!(
        matches!(err, GgufError::TooMuchData { ref tensor, got: 41, remaining: 40, .. } if tensor == "t0"),
        "{err}"
    );
    // Nothing was written by the refused call; the writer can go on.
    for p in &payloads {
        w.write_data(p).unwrap();
    }
    assert_eq!(w.pending(), None);
    assert!(matches!(w.write_data(&[1]), Err(GgufError::NoTensorLeft { got: 1, .. })));
    w.write_data(&[]).unwrap();
    w.finish().unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.tensor_data(f.tensor("t0").unwrap()), &payloads[0][..]);
}

#[test]
fn writer_refuses_what_the_reader_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.gguf");
    let t = |name: &str, dt: DType, ne: Vec<u64>| vec![TensorDesc::new(name, dt, ne)];
    let create = |kvs: Vec<(String, GgufValue)>, tensors: Vec<TensorDesc>| {
        GgufWriter::create(&out, kvs, tensors, SplitPolicy::None).map(|_| ()).unwrap_err()
    };
    let e = create(vec![kv("", GgufValue::U8(1))], vec![]);
    assert!(matches!(e, GgufError::EmptyKey { index: 0, .. }), "{e}");
    let e = create(vec![kv("a", GgufValue::U8(1)), kv("a", GgufValue::U8(2))], vec![]);
    assert!(matches!(e, GgufError::DuplicateKey { ref key, .. } if key == "a"), "{e}");
    let nested = GgufValue::Array(ValueType::Array, vec![]);
    let e = create(vec![kv("n", nested)], vec![]);
    assert!(matches!(e, GgufError::NestedArray { .. }), "{e}");
    let nested = GgufValue::Array(ValueType::U8, vec![GgufValue::Array(ValueType::U8, vec![])]);
    assert!(matches!(create(vec![kv("n", nested)], vec![]), GgufError::NestedArray { .. }));
    let mixed = GgufValue::Array(ValueType::U32, vec![GgufValue::U32(1), GgufValue::I32(2)]);
    let e = create(vec![kv("m", mixed)], vec![]);
    assert!(
        matches!(e, GgufError::ArrayElementType { index: 1, expected: ValueType::U32, found: ValueType::I32, .. }),
        "{e}"
    );
    let e = create(vec![kv("general.alignment", GgufValue::U64(32))], vec![]);
    assert!(matches!(e, GgufError::AlignmentType { found: ValueType::U64, .. }), "{e}");
    let e = create(vec![kv("general.alignment", GgufValue::U32(48))], vec![]);
    assert!(matches!(e, GgufError::BadAlignment { alignment: 48, .. }), "{e}");
    let e = create(vec![], t("x", DType::U8, vec![4]));
    assert!(matches!(e, GgufError::NotAGgufType { dtype: DType::U8, .. }), "{e}");
    let e = create(vec![], t(&"n".repeat(64), DType::F32, vec![4]));
    assert!(matches!(e, GgufError::TensorNameTooLong { len: 64, .. }), "{e}");
    GgufWriter::create(&out, vec![], t(&"n".repeat(63), DType::F32, vec![4]), SplitPolicy::None).unwrap();
    let mut two = t("x", DType::F32, vec![4]);
    two.extend(t("x", DType::F32, vec![4]));
    let e = create(vec![], two);
    assert!(matches!(e, GgufError::DuplicateTensor { ref tensor, .. } if tensor == "x"), "{e}");
    let e = create(vec![], t("x", DType::F32, vec![1, 1, 1, 1, 1]));
    assert!(matches!(e, GgufError::TooManyDims { n_dims: 5, .. }), "{e}");
    let e = create(vec![], t("x", DType::Q4K, vec![128, 2]));
    assert!(matches!(e, GgufError::RowNotBlockMultiple { ne0: 128, block: 256, .. }), "{e}");
    let e = create(vec![], t("x", DType::F32, vec![1 << 40, 1 << 40]));
    assert!(matches!(e, GgufError::ShapeOverflow { .. }), "{e}");
    let e = create(vec![], t("x", DType::F32, vec![u64::MAX]));
    assert!(matches!(e, GgufError::NegativeDim { dim: 0, .. }), "{e}");
    assert!(e.to_string().contains("bad.gguf"), "{e}");
    assert!(dir_is_empty(dir.path()));
}

#[test]
fn replaces_given_split_keys_in_place() {
    // gguf-py keeps KVs in a dict: a split key already present keeps its position, gets the new value.
    let dir = tempfile::tempdir().unwrap();
    let (mut kvs, tensors, payloads) = split_input();
    kvs.insert(1, kv("split.count", GgufValue::U16(99)));
    let paths = write_all(&dir.path().join("r.gguf"), kvs, tensors, &payloads, SplitPolicy::MaxTensors(3), 50);
    let f = GgufFile::open(&paths[0]).unwrap();
    let keys: Vec<&str> = f.kvs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["general.architecture", "split.count", "t.u32", "split.no", "split.tensors.count"]);
    assert_eq!(f.get("split.count"), Some(&GgufValue::U16(2)));
}
