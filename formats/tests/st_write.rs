//! The streaming safetensors shard-set writer against the `safetensors` crate itself.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use sling_core::DType;
use sling_formats::st_write::{
    layout, st_dtype, ShardLayout, ShardWriter, StTensor, StWriteError, Written, MAX_HEADER_SIZE,
};

fn t(name: &str, dtype: DType, shape: &[u64]) -> StTensor {
    StTensor::new(name, dtype, shape.to_vec())
}

/// Deterministic bytes for a tensor.
fn data_for(t: &StTensor) -> Vec<u8> {
    let mut x: u64 = t.name.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    (0..t.n_bytes())
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// What the safetensors crate writes for these tensors.
fn reference(tensors: &[StTensor], metadata: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let datas: Vec<Vec<u8>> = tensors.iter().map(data_for).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&datas)
        .map(|(t, d)| {
            let shape: Vec<usize> = t.shape.iter().map(|&s| s as usize).collect();
            (t.name.clone(), TensorView::new(st_dtype(t.dtype).unwrap(), shape, d).unwrap())
        })
        .collect();
    let md: Option<HashMap<String, String>> = metadata.map(|m| m.clone().into_iter().collect());
    safetensors::tensor::serialize(views.iter().map(|(n, v)| (n.clone(), v)), md).unwrap()
}

/// Writes a layout, feeding data in pieces of the given sizes (cycled), and returns what finish() said.
fn write_all(dir: &Path, lay: ShardLayout, pieces: &[usize]) -> Written {
    let stream: Vec<u8> = lay.tensors().flat_map(|(_, t)| data_for(t)).collect();
    let mut w = ShardWriter::create(dir, lay).unwrap();
    let mut pos = 0;
    let mut k = 0;
    while pos < stream.len() {
        let n = pieces[k % pieces.len()].min(stream.len() - pos);
        w.write(&stream[pos..pos + n]).unwrap();
        pos += n;
        k += 1;
    }
    assert!(w.current().is_none());
    w.finish().unwrap()
}

fn mixed() -> Vec<StTensor> {
    vec![
        t("z.bias", DType::F32, &[3]),
        t("a.weight", DType::BF16, &[2, 3]),
        t("ids", DType::I64, &[5]),
        t("b.scale", DType::F8E4M3, &[7]),
        t("mask", DType::Bool, &[3]),
        t("u8", DType::U8, &[5]),
        t("h", DType::F16, &[2]),
        t("i32", DType::I32, &[2, 2]),
        t("u32", DType::U32, &[3]),
        t("d", DType::F64, &[1]),
        t("i8", DType::I8, &[4]),
        t("i16", DType::I16, &[1, 3]),
        t("e5", DType::F8E5M2, &[2]),
        t("scalar", DType::F32, &[]),
        t("empty", DType::BF16, &[0, 4]),
        t("A.upper", DType::F32, &[2]),
    ]
}

#[test]
fn every_spelled_dtype_maps_to_the_crate_enum_with_the_same_spelling() {
    let mut n = 0;
    for &d in DType::ALL {
        match (d.info().safetensors, st_dtype(d)) {
            (Some(s), Some(sd)) => {
                assert_eq!(serde_json::to_string(&sd).unwrap(), format!("\"{s}\""));
                assert_eq!(sd.bitsize(), 8 * d.block_bytes());
                n += 1;
            }
            (None, None) => {}
            other => panic!("{d}: {other:?}"),
        }
    }
    assert_eq!(n, 13);
}

#[test]
fn single_file_is_byte_identical_to_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    for md in [None, Some(BTreeMap::from([("format".to_string(), "pt".to_string())]))] {
        let tensors = mixed();
        let lay = layout(tensors.clone(), None, "model", md.as_ref()).unwrap();
        assert_eq!(lay.shards.len(), 1);
        assert_eq!(lay.shards[0].file_name, "model.safetensors");
        let w = write_all(dir.path(), lay, &[1 << 20]);
        let got = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(got, reference(&tensors, md.as_ref()));
        assert_eq!(w.files, vec![("model.safetensors".to_string(), got.len() as u64, sha_hex(&got))]);
    }
}

#[test]
fn ordering_is_dtype_descending_then_name() {
    let lay = layout(mixed(), None, "model", None).unwrap();
    let order: Vec<&str> = lay.shards[0].tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        order,
        [
            "ids", "d", "A.upper", "scalar", "z.bias", "u32", "i32", "a.weight", "empty", "h", "i16", "b.scale", "e5",
            "i8", "u8", "mask"
        ]
    );
}

#[test]
fn header_is_exact_compact_json_padded_with_spaces() {
    let md = BTreeMap::from([("format".to_string(), "pt".to_string()), ("a\"b".to_string(), "é\n".to_string())]);
    let lay = layout(
        vec![t("w", DType::BF16, &[2, 3]), t("b", DType::F32, &[3]), t("s", DType::I8, &[])],
        None,
        "model",
        Some(&md),
    )
    .unwrap();
    let h = &lay.shards[0].header;
    let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
    assert_eq!(n, h.len() - 8);
    assert_eq!(n % 8, 0);
    let json = std::str::from_utf8(&h[8..]).unwrap();
    let want = "{\"__metadata__\":{\"a\\\"b\":\"é\\n\",\"format\":\"pt\"},\
                \"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},\
                \"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[12,24]},\
                \"s\":{\"dtype\":\"I8\",\"shape\":[],\"data_offsets\":[24,25]}}";
    assert_eq!(json.trim_end_matches(' '), want);
    assert_eq!(json.len(), want.len().next_multiple_of(8));
    assert!(json.len() - want.len() < 8);
    assert_eq!(lay.shards[0].data_bytes, 25);
}

#[test]
fn padding_for_every_remainder() {
    // Names of growing length walk the JSON length through all residues mod 8.
    let dir = tempfile::tempdir().unwrap();
    for len in 1..=16 {
        let tensors = vec![t(&"x".repeat(len), DType::U8, &[3])];
        let lay = layout(tensors.clone(), None, "model", None).unwrap();
        assert_eq!(lay.shards[0].header.len() % 8, 0);
        write_all(dir.path(), lay, &[2]);
        assert_eq!(std::fs::read(dir.path().join("model.safetensors")).unwrap(), reference(&tensors, None));
    }
}

fn sizes_layout(sizes: &[u64], max: u64) -> Vec<Vec<String>> {
    let tensors: Vec<StTensor> = sizes.iter().enumerate().map(|(i, &s)| t(&format!("t{i}"), DType::U8, &[s])).collect();
    let lay = layout(tensors, Some(max), "model", None).unwrap();
    lay.shards.iter().map(|s| s.tensors.iter().map(|t| t.name.clone()).collect()).collect()
}

#[test]
fn sharding_follows_huggingface_hub() {
    // huggingface_hub's docstring example: [6, 6, 2, 6, 2, 2] with limit 10 -> [6], [6+2], [6+2+2].
    assert_eq!(sizes_layout(&[6, 6, 2, 6, 2, 2], 10), [vec!["t0"], vec!["t1", "t2"], vec!["t3", "t4", "t5"]]);
    // Exact fit stays in the shard; one byte more starts a new one.
    assert_eq!(sizes_layout(&[2, 3, 5], 5), [vec!["t0", "t1"], vec!["t2"]]);
    assert_eq!(sizes_layout(&[2, 4, 1], 5), [vec!["t0"], vec!["t1", "t2"]]);
    // An oversized tensor gets its own shard, appended before the shard still being filled.
    assert_eq!(sizes_layout(&[1, 9, 1], 5), [vec!["t1"], vec!["t0", "t2"]]);
    assert_eq!(sizes_layout(&[9], 5), [vec!["t0"]]);
    // Zero-size tensors join the current shard; limit 0 puts every non-empty tensor alone.
    assert_eq!(sizes_layout(&[0, 1, 0, 1], 0), [vec!["t1"], vec!["t3"], vec!["t0", "t2"]]);
}

#[test]
fn file_names_and_order_within_shards() {
    let tensors = vec![
        t("b", DType::U8, &[4]),
        t("a", DType::F32, &[1]),
        t("c", DType::U8, &[4]),
        t("d", DType::BF16, &[2]),
        t("e", DType::U8, &[4]),
    ];
    let lay = layout(tensors, Some(8), "consolidated", None).unwrap();
    let names: Vec<&str> = lay.shards.iter().map(|s| s.file_name.as_str()).collect();
    assert_eq!(
        names,
        [
            "consolidated-00001-of-00003.safetensors",
            "consolidated-00002-of-00003.safetensors",
            "consolidated-00003-of-00003.safetensors"
        ]
    );
    let order: Vec<Vec<&str>> =
        lay.shards.iter().map(|s| s.tensors.iter().map(|t| t.name.as_str()).collect()).collect();
    assert_eq!(order, [vec!["a", "b"], vec!["d", "c"], vec!["e"]]);
    assert_eq!(lay.shards.iter().map(|s| s.data_bytes).collect::<Vec<_>>(), [8, 8, 4]);
    assert_eq!(lay.total_data_bytes(), 20);
    let one = layout(vec![t("a", DType::F32, &[1])], Some(100), "model", None).unwrap();
    assert_eq!(one.shards[0].file_name, "model.safetensors");
}

#[test]
fn sharded_set_reads_back_and_hashes_match() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = mixed();
    let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let lay = layout(tensors.clone(), Some(24), "model", Some(&md)).unwrap();
    assert!(lay.shards.len() > 2);
    let shard_tensors: Vec<Vec<StTensor>> = lay.shards.iter().map(|s| s.tensors.clone()).collect();
    let w = write_all(dir.path(), lay.clone(), &[3, 1, 7]);
    assert_eq!(w.files.len(), lay.shards.len());
    assert_eq!(w.tensors.len(), tensors.len());
    let mut seen = 0;
    for ((s, (file, size, sha)), want) in lay.shards.iter().zip(&w.files).zip(&shard_tensors) {
        assert_eq!(file, &s.file_name);
        let bytes = std::fs::read(dir.path().join(file)).unwrap();
        assert_eq!(*size, bytes.len() as u64);
        assert_eq!(sha, &sha_hex(&bytes));
        // Each shard equals what the crate writes for its tensors.
        assert_eq!(bytes, reference(want, Some(&md)));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), s.tensors.len());
        for t in &s.tensors {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(v.data(), &data_for(t)[..], "{}", t.name);
            assert_eq!(v.dtype(), st_dtype(t.dtype).unwrap());
            assert_eq!(v.shape().iter().map(|&x| x as u64).collect::<Vec<_>>(), t.shape);
            let rec = w.tensors.iter().find(|r| r.0 == t.name).unwrap();
            assert_eq!(&rec.1, file);
            assert_eq!(&bytes[rec.2 as usize..(rec.2 + rec.3) as usize], &data_for(t)[..]);
            assert_eq!(rec.4, sha_hex(&data_for(t)));
            seen += 1;
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
    }
    assert_eq!(seen, tensors.len());
    // Written.tensors is in layout order.
    let order: Vec<&str> = lay.tensors().map(|(_, t)| t.name.as_str()).collect();
    assert_eq!(w.tensors.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), order);
    // No partial files are left.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        assert!(!e.unwrap().file_name().to_string_lossy().ends_with(".partial"));
    }
}

#[test]
fn odd_sized_pieces_give_the_same_bytes() {
    let tensors = mixed();
    let lay = layout(tensors, Some(30), "model", None).unwrap();
    let mut results = Vec::new();
    for pieces in [&[usize::MAX][..], &[1], &[3, 5, 1, 13], &[7], &[64]] {
        let dir = tempfile::tempdir().unwrap();
        let w = write_all(dir.path(), lay.clone(), &pieces.iter().map(|&p| p.min(1 << 20)).collect::<Vec<_>>());
        let files: Vec<Vec<u8>> =
            lay.shards.iter().map(|s| std::fs::read(dir.path().join(&s.file_name)).unwrap()).collect();
        results.push((w, files));
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0]);
    }
}

#[test]
fn current_walks_the_layout_and_skips_empty_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![t("a", DType::U8, &[2]), t("z0", DType::U8, &[0]), t("b", DType::U8, &[1])];
    let lay = layout(tensors, Some(2), "model", None).unwrap();
    // [a, z0] then [b]; z0 is complete the moment a is.
    assert_eq!(lay.shards.len(), 2);
    let mut w = ShardWriter::create(dir.path(), lay).unwrap();
    assert_eq!(w.current().map(|(i, t)| (i, t.name.clone())), Some((0, "a".to_string())));
    w.write(&[1]).unwrap();
    assert_eq!(w.current().unwrap().0, 0);
    w.write(&[2]).unwrap();
    // Shard 1 is complete and renamed already.
    assert!(dir.path().join("model-00001-of-00002.safetensors").exists());
    assert!(dir.path().join("model-00002-of-00002.safetensors.partial").exists());
    assert_eq!(w.current().map(|(i, t)| (i, t.name.clone())), Some((2, "b".to_string())));
    w.write(&[]).unwrap();
    w.write(&[3]).unwrap();
    assert!(w.current().is_none());
    w.write(&[]).unwrap();
    let r = w.finish().unwrap();
    assert_eq!(r.tensors.iter().map(|x| (x.0.as_str(), x.3)).collect::<Vec<_>>(), [("a", 2), ("z0", 0), ("b", 1)]);
    assert_eq!(r.tensors[1].4, sha_hex(b""));
}

#[test]
fn all_empty_and_no_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(vec![], None, "model", None).unwrap();
    assert_eq!(lay.shards.len(), 1);
    let w = ShardWriter::create(dir.path(), lay).unwrap();
    assert!(w.current().is_none());
    let r = w.finish().unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    assert_eq!(bytes, reference(&[], None));
    assert_eq!(&bytes[8..], b"{}      ");
    assert_eq!(r.files.len(), 1);

    let tensors = vec![t("e", DType::F32, &[0]), t("f", DType::I64, &[3, 0])];
    let lay = layout(tensors.clone(), Some(1), "model", None).unwrap();
    let w = ShardWriter::create(dir.path(), lay).unwrap();
    w.finish().unwrap();
    assert_eq!(std::fs::read(dir.path().join("model.safetensors")).unwrap(), reference(&tensors, None));
}

#[test]
fn too_much_data_is_refused_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(vec![t("a", DType::U8, &[2]), t("b", DType::U8, &[2])], None, "model", None).unwrap();
    let mut w = ShardWriter::create(dir.path(), lay).unwrap();
    w.write(&[1]).unwrap();
    let e = w.write(&[2, 3, 4, 5]).unwrap_err();
    assert!(matches!(e, StWriteError::TooMuchData { given: 4, remaining: 3, .. }), "{e}");
    assert!(e.to_string().contains("\"a\""), "{e}");
    // Nothing was consumed: the writer goes on.
    w.write(&[2, 3, 4]).unwrap();
    let e = w.write(&[9]).unwrap_err();
    assert!(matches!(e, StWriteError::TooMuchData { given: 1, remaining: 0, current: None }), "{e}");
    w.finish().unwrap();
    let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st).unwrap();
    assert_eq!(st.tensor("a").unwrap().data(), &[1, 2]);
    assert_eq!(st.tensor("b").unwrap().data(), &[3, 4]);
}

#[test]
fn finish_before_all_data_fails_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(vec![t("a", DType::U8, &[2]), t("b", DType::F32, &[2])], Some(8), "model", None).unwrap();
    let mut w = ShardWriter::create(dir.path(), lay).unwrap();
    w.write(&[0; 2]).unwrap();
    w.write(&[1; 5]).unwrap();
    let e = w.finish().unwrap_err();
    match &e {
        StWriteError::Incomplete { tensor, missing, len, total_missing, .. } => {
            assert_eq!((tensor.as_str(), *missing, *len, *total_missing), ("b", 3, 8, 3));
        }
        other => panic!("{other}"),
    }
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    // The first shard was complete and stays; the second's partial file is gone.
    assert_eq!(names, ["model-00001-of-00002.safetensors"]);
}

#[test]
fn drop_removes_partial_files() {
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(vec![t("a", DType::F32, &[1 << 20])], None, "model", None).unwrap();
    let mut w = ShardWriter::create(dir.path(), lay).unwrap();
    assert!(dir.path().join("model.safetensors.partial").exists());
    w.write(&vec![7u8; 3 << 20]).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn create_fails_cleanly_on_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let lay = layout(vec![t("a", DType::U8, &[1])], None, "model", None).unwrap();
    let e = ShardWriter::create(&missing, lay).err().unwrap();
    assert!(matches!(e, StWriteError::Io { .. }), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn hostile_inputs_are_errors() {
    let err = |ts: Vec<StTensor>| layout(ts, None, "model", None).expect_err("must fail");
    assert!(matches!(err(vec![t("", DType::U8, &[1])]), StWriteError::EmptyName { index: 0 }));
    assert!(matches!(
        err(vec![t("a", DType::U8, &[1]), t("a", DType::F32, &[1])]),
        StWriteError::DuplicateName { name } if name == "a"
    ));
    assert!(matches!(err(vec![t("__metadata__", DType::U8, &[1])]), StWriteError::ReservedName { .. }));
    assert!(matches!(err(vec![t("q", DType::Q8_0, &[32])]), StWriteError::UnsupportedDtype { dtype: DType::Q8_0, .. }));
    assert!(matches!(err(vec![t("m", DType::MXFP4, &[32])]), StWriteError::UnsupportedDtype { .. }));
    // Element count overflows; byte count overflows. The product is checked left to right as the safetensors
    // reader does (`try_fold(1, checked_mul)`), so [MAX, MAX, 0] is refused (the reader would refuse it too) and
    // [0, MAX, MAX] is fine.
    assert!(matches!(err(vec![t("o", DType::U8, &[u64::MAX, 2])]), StWriteError::SizeOverflow { .. }));
    assert!(matches!(err(vec![t("o", DType::F64, &[1 << 62])]), StWriteError::SizeOverflow { .. }));
    assert!(matches!(err(vec![t("z", DType::F64, &[u64::MAX, u64::MAX, 0])]), StWriteError::SizeOverflow { .. }));
    assert!(layout(vec![t("z", DType::F64, &[0, u64::MAX, u64::MAX])], None, "m", None).is_ok());
    // The shard total overflows.
    let big = vec![t("a", DType::U8, &[u64::MAX - 4096]), t("b", DType::U8, &[8192])];
    assert!(matches!(err(big.clone()), StWriteError::ShardOverflow { .. }));
    // ...but sharded they are fine on paper (each file is within u64).
    assert!(layout(big, Some(1 << 40), "model", None).is_ok());
    // A header over the safetensors limit.
    let long = "n".repeat(MAX_HEADER_SIZE as usize);
    assert!(matches!(err(vec![t(&long, DType::U8, &[1])]), StWriteError::HeaderTooLarge { .. }));
    // A prefix that is a path.
    assert!(matches!(layout(vec![t("a", DType::U8, &[1])], None, "../x", None), Err(StWriteError::BadFileName { .. })));
    // Error messages name the tensor.
    assert!(err(vec![t("a", DType::U8, &[1]), t("a", DType::U8, &[1])]).to_string().contains("\"a\""));
}

#[test]
fn hand_built_inconsistent_layouts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = layout(vec![t("a", DType::U8, &[2])], None, "model", None).unwrap();
    let mut bad = good.clone();
    bad.shards[0].data_bytes = 3;
    assert!(matches!(ShardWriter::create(dir.path(), bad), Err(StWriteError::InvalidLayout(_))));
    let mut bad = good.clone();
    bad.shards[0].header.pop();
    assert!(matches!(ShardWriter::create(dir.path(), bad), Err(StWriteError::InvalidLayout(_))));
    let mut bad = good.clone();
    bad.shards[0].file_name = "../evil.safetensors".into();
    assert!(matches!(ShardWriter::create(dir.path(), bad), Err(StWriteError::BadFileName { .. })));
    let mut bad = good.clone();
    bad.shards[0].tensors[0].shape = vec![u64::MAX, 3];
    assert!(matches!(ShardWriter::create(dir.path(), bad), Err(StWriteError::InvalidLayout(_))));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn index_json_is_what_transformers_writes() {
    let tensors = vec![
        t("model.b", DType::U8, &[4]),
        t("model.a", DType::U8, &[4]),
        t("lm_head.weight", DType::BF16, &[2]),
        t("ünï", DType::U8, &[1]),
    ];
    let lay = layout(tensors, Some(6), "model", None).unwrap();
    let got = lay.index_json(&[("total_parameters", serde_json::json!(11))]);
    let want = r#"{
  "metadata": {
    "total_parameters": 11,
    "total_size": 13
  },
  "weight_map": {
    "lm_head.weight": "model-00003-of-00003.safetensors",
    "model.a": "model-00002-of-00003.safetensors",
    "model.b": "model-00001-of-00003.safetensors",
    "\u00fcn\u00ef": "model-00003-of-00003.safetensors"
  }
}
"#;
    assert_eq!(got, want);
    // total_size wins over an extra entry of that name; nested values, floats and escapes as Python writes them.
    let got = lay.index_json(&[
        ("total_size", serde_json::json!(1)),
        ("x", serde_json::json!({"b": [1.0, 1e16, 1e-5, 0.0001, 123.456, -0.0, 2.5e-300], "a": [], "c": {}})),
        ("y", serde_json::json!("tab\t\"q\" \u{7f} 😀")),
    ]);
    let want = r#"{
  "metadata": {
    "total_size": 13,
    "x": {
      "a": [],
      "b": [
        1.0,
        1e+16,
        1e-05,
        0.0001,
        123.456,
        -0.0,
        2.5e-300
      ],
      "c": {}
    },
    "y": "tab\t\"q\" \u007f \ud83d\ude00"
  },
"#;
    assert!(got.starts_with(want), "{got}");
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.iter().copied().filter(|d| d.info().safetensors.is_some()).collect::<Vec<_>>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_sets_match_the_crate(
        specs in prop::collection::btree_map("[a-zA-Z0-9._é]{1,12}", (dtype_strategy(), prop::collection::vec(0u64..5, 0..3)), 0..12),
        max in prop::option::of(0u64..64),
        piece in 1usize..17,
    ) {
        let tensors: Vec<StTensor> = specs.into_iter().map(|(n, (d, s))| StTensor::new(n, d, s)).collect();
        let lay = layout(tensors.clone(), max, "model", None).unwrap();
        let mut all: Vec<&str> = lay.tensors().map(|(_, t)| t.name.as_str()).collect();
        all.sort();
        let mut want: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        want.sort();
        prop_assert_eq!(all, want);
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), lay.clone(), &[piece]);
        for s in &lay.shards {
            let bytes = std::fs::read(dir.path().join(&s.file_name)).unwrap();
            prop_assert_eq!(bytes, reference(&s.tensors, None));
        }
    }
}

#[test]
fn large_tensors_cross_the_write_buffer() {
    // 8 MiB buffer: pieces smaller and larger than it, tensors spanning it.
    let tensors =
        vec![t("big.a", DType::BF16, &[5 << 20]), t("big.b", DType::U8, &[3 << 20]), t("c", DType::F32, &[7])];
    let lay = layout(tensors.clone(), None, "model", None).unwrap();
    for pieces in [&[9 << 20][..], &[(5 << 20) + 3, 1, 4093]] {
        let dir = tempfile::tempdir().unwrap();
        let w = write_all(dir.path(), lay.clone(), pieces);
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(bytes, reference(&tensors, None));
        assert_eq!(w.files[0].2, sha_hex(&bytes));
    }
}
