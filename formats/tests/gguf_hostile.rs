//! The GGUF reader against malformed files built byte by byte: one test per error kind, plus a
//! property test that random mutations and truncations of a valid file never panic.

use std::path::PathBuf;

use proptest::prelude::*;
use sling_core::DType;
use sling_formats::gguf::{GgufError, GgufFile, GgufValue, ValueType};

/// Little-endian GGUF byte builder.
#[derive(Clone, Default)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        let mut b = B::default();
        b.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn raw(&mut self, x: &[u8]) -> &mut Self {
        self.0.extend_from_slice(x);
        self
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.raw(&[x])
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// A KV with a u32 value.
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(ValueType::U32 as u32).u32(v)
    }
    fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.str(key).u32(ValueType::String as u32).str(v)
    }
    fn tensor(&mut self, name: &str, ne: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }
    fn pad(&mut self, align: usize) -> &mut Self {
        let n = self.0.len().div_ceil(align) * align;
        self.0.resize(n, 0);
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// A valid file: 2 KVs (one string array), 2 tensors (F32 [4,2] = 32 bytes, Q8_0 [32] = 34 bytes).
fn valid() -> B {
    let mut b = B::header(3, 2, 2);
    b.kv_str("general.architecture", "llama");
    b.str("tokenizer.ggml.tokens").u32(ValueType::Array as u32).u32(ValueType::String as u32).u64(2).str("a").str("bc");
    b.tensor("w", &[4, 2], 0, 0).tensor("q", &[32], 8, 32).pad(32);
    b.zeros(32).zeros(34).pad(32);
    b
}

/// A richer valid file for the property test: custom alignment, arrays of several types, 3 tensors.
fn rich() -> B {
    let mut b = B::header(3, 3, 5);
    b.kv_u32("general.alignment", 64).kv_str("general.architecture", "qwen3moe");
    b.str("a.u32").u32(ValueType::Array as u32).u32(ValueType::U32 as u32).u64(3).u32(1).u32(2).u32(3);
    b.str("a.str").u32(ValueType::Array as u32).u32(ValueType::String as u32).u64(2).str("x").str("yz");
    b.str("a.bool").u32(ValueType::Array as u32).u32(ValueType::Bool as u32).u64(2).u8(1).u8(0);
    b.tensor("w", &[4, 2], 0, 0).tensor("q", &[32], 8, 64).tensor("s", &[], 26, 128).pad(64);
    b.zeros(32).pad(64).zeros(34).pad(64).zeros(4).pad(64);
    b
}

struct Tmp {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write(bytes: &[u8]) -> Tmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.gguf");
    std::fs::write(&path, bytes).unwrap();
    Tmp { _dir: dir, path }
}

/// Opens `bytes` as a file; the error must name the file.
fn open_err(bytes: &[u8]) -> GgufError {
    let t = write(bytes);
    match GgufFile::open(&t.path) {
        Ok(_) => panic!("malformed file was accepted"),
        Err(e) => {
            assert!(e.to_string().contains("hostile.gguf"), "error does not name the file: {e}");
            e
        }
    }
}

#[test]
fn valid_file_opens() {
    let t = write(&valid().0);
    let f = GgufFile::open(&t.path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("general.architecture"), Some(&GgufValue::String("llama".into())));
    assert_eq!(f.get("tokenizer.ggml.tokens"), Some(&GgufValue::strings(["a", "bc"])));
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensor("q").unwrap().dtype, DType::Q8_0);
    assert_eq!(f.tensor("q").unwrap().n_bytes, 34);
    assert_eq!(f.tensor_data(f.tensor("q").unwrap()).len(), 34);
    let t = write(&rich().0);
    let f = GgufFile::open(&t.path).unwrap();
    assert_eq!((f.alignment, f.tensors.len(), f.kvs.len()), (64, 3, 5));
    // Version 2 has the same layout.
    let mut v2 = valid();
    v2.0[4] = 2;
    let t = write(&v2.0);
    assert_eq!(GgufFile::open(&t.path).unwrap().version, 2);
}

#[test]
fn missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = GgufFile::open(&dir.path().join("absent.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e}");
    assert!(e.to_string().contains("absent.gguf"));
}

#[test]
fn truncated_header_at_several_points() {
    let v = valid().0;
    // empty, inside magic, inside version, inside n_tensors, inside n_kv, inside a key length,
    // inside a value type, inside an array count, inside n_dims, inside ne, inside type, inside offset.
    let key0 = 24;
    let ty0 = key0 + 8 + "general.architecture".len();
    let key1 = ty0 + 4 + 8 + 5;
    let arr = key1 + 8 + "tokenizer.ggml.tokens".len() + 8;
    let ti0 = arr + 8 + 9 + 10;
    for cut in [
        0,
        3,
        4,
        7,
        8,
        15,
        16,
        23,
        key0 + 5,
        ty0 + 2,
        arr + 3,
        ti0 + 9 + 2,
        ti0 + 9 + 4 + 3,
        ti0 + 9 + 4 + 16 + 1,
        ti0 + 9 + 4 + 16 + 4 + 7,
    ] {
        let e = open_err(&v[..cut]);
        assert!(matches!(e, GgufError::Truncated { .. }), "cut at {cut}: {e}");
    }
    // Cut inside string bytes: the length prefix exceeds what is left.
    let e = open_err(&v[..key0 + 8 + 3]);
    assert!(matches!(e, GgufError::StringTooLong { .. }), "{e}");
}

#[test]
fn truncated_padding_before_data() {
    let mut b = B::header(3, 1, 0);
    b.tensor("t", &[0], 0, 0); // zero-byte tensor: only the padding is missing
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::Truncated { ref what, .. } if what.contains("padding")), "{e}");
    b.pad(32);
    let t = write(&b.0);
    assert_eq!(GgufFile::open(&t.path).unwrap().tensors[0].n_bytes, 0);
}

#[test]
fn bad_magic() {
    let mut v = valid().0;
    v[..4].copy_from_slice(b"GGML");
    let e = open_err(&v);
    assert!(matches!(e, GgufError::BadMagic { ref found, .. } if found == b"GGML"), "{e}");
}

#[test]
fn bad_version() {
    for version in [0u32, 1, 4, 0xFFFF_FFFF] {
        let mut v = valid().0;
        v[4..8].copy_from_slice(&version.to_le_bytes());
        let e = open_err(&v);
        assert!(matches!(e, GgufError::UnsupportedVersion { version: x, .. } if x == version), "{e}");
    }
}

#[test]
fn byte_swapped_version() {
    let mut v = valid().0;
    v[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = open_err(&v);
    assert!(matches!(e, GgufError::ByteSwappedVersion { version: 0x0300_0000, .. }), "{e}");
}

#[test]
fn negative_counts() {
    let mut b = B::header(3, 0, 1 << 63);
    b.kv_u32("a", 1);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::CountOutOfRange { what: "key/value", .. }), "{e}");
    let e = open_err(&B::header(3, u64::MAX, 0).0);
    assert!(matches!(e, GgufError::CountOutOfRange { what: "tensor", .. }), "{e}");
}

#[test]
fn huge_counts_do_not_allocate() {
    // Plausible (non-negative) but absurd counts: fails on the first missing entry.
    let e = open_err(&B::header(3, 0, 1 << 62).0);
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
}

#[test]
fn huge_string_length() {
    for len in [u64::MAX, 1 << 40, 100] {
        let mut b = B::header(3, 0, 1);
        b.u64(len).raw(b"abc");
        let e = open_err(&b.0);
        assert!(matches!(e, GgufError::StringTooLong { len: l, .. } if l == len), "{e}");
    }
    // In a value, and in a tensor name.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(ValueType::String as u32).u64(1 << 35);
    assert!(matches!(open_err(&b.0), GgufError::StringTooLong { ref context, .. } if context.contains("'k'")));
    let mut b = B::header(3, 1, 0);
    b.u64(u64::MAX / 2);
    assert!(matches!(open_err(&b.0), GgufError::StringTooLong { ref context, .. } if context.contains("tensor #0")));
}

#[test]
fn invalid_utf8() {
    let mut b = B::header(3, 0, 1);
    b.u64(2).raw(&[0xff, 0xfe]).u32(ValueType::U8 as u32).u8(0);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
}

#[test]
fn huge_array_length() {
    for (elem, n) in
        [(ValueType::U8, 1u64 << 40), (ValueType::U64, u64::MAX / 4), (ValueType::String, 1 << 33), (ValueType::U32, 3)]
    {
        let mut b = B::header(3, 0, 1);
        b.str("arr").u32(ValueType::Array as u32).u32(elem as u32).u64(n).u32(0);
        let e = open_err(&b.0);
        assert!(matches!(e, GgufError::ArrayTooLong { ref key, len, .. } if key == "arr" && len == n), "{e}");
    }
}

#[test]
fn nested_array() {
    let mut b = B::header(3, 0, 1);
    b.str("arr").u32(ValueType::Array as u32).u32(ValueType::Array as u32).u64(1);
    b.u32(ValueType::U8 as u32).u64(1).u8(0);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::NestedArray { ref key, .. } if key == "arr"), "{e}");
}

#[test]
fn unknown_value_type() {
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(13).u32(0);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::UnknownValueType { type_id: 13, ref key, .. } if key == "k"), "{e}");
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(ValueType::Array as u32).u32(0xFFFF_FFFF).u64(0);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::UnknownValueType { type_id: 0xFFFF_FFFF, .. }), "{e}");
}

#[test]
fn empty_key() {
    let mut b = B::header(3, 0, 2);
    b.kv_u32("a", 1).kv_u32("", 2);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::EmptyKey { index: 1, .. }), "{e}");
}

#[test]
fn duplicate_key() {
    let mut b = B::header(3, 0, 3);
    b.kv_u32("a", 1).kv_u32("b", 2).kv_str("a", "x");
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::DuplicateKey { ref key, .. } if key == "a"), "{e}");
}

#[test]
fn bad_alignment_type() {
    let mut b = B::header(3, 0, 1);
    b.str("general.alignment").u32(ValueType::U64 as u32).u64(32);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::AlignmentType { found: ValueType::U64, .. }), "{e}");
}

#[test]
fn bad_alignment_value() {
    for a in [0u32, 3, 48] {
        let mut b = B::header(3, 0, 1);
        b.kv_u32("general.alignment", a);
        let e = open_err(&b.0);
        assert!(matches!(e, GgufError::BadAlignment { alignment, .. } if alignment == u64::from(a)), "{e}");
    }
    // A valid custom alignment is honoured.
    let mut b = B::header(3, 2, 1);
    b.kv_u32("general.alignment", 64).tensor("a", &[1], 0, 0).tensor("b", &[1], 0, 64).pad(64).zeros(68);
    let t = write(&b.0);
    let f = GgufFile::open(&t.path).unwrap();
    assert_eq!((f.alignment, f.data_offset % 64), (64, 0));
}

#[test]
fn too_many_dims() {
    let mut b = B::header(3, 1, 0);
    b.tensor("t", &[1, 1, 1, 1, 1], 0, 0);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::TooManyDims { n_dims: 5, ref tensor, .. } if tensor == "t"), "{e}");
    let mut b = B::header(3, 1, 0);
    b.str("t").u32(u32::MAX);
    assert!(matches!(open_err(&b.0), GgufError::TooManyDims { .. }));
}

#[test]
fn negative_dim() {
    let mut b = B::header(3, 1, 0);
    b.tensor("t", &[4, (-2i64) as u64], 0, 0).pad(32).zeros(64);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::NegativeDim { dim: 1, .. }), "{e}");
}

#[test]
fn shape_overflow() {
    let mut b = B::header(3, 1, 0);
    b.tensor("t", &[1 << 32, 1 << 32], 0, 0).pad(32);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::ShapeOverflow { ref tensor, .. } if tensor == "t"), "{e}");
    // Elements fit in i64 but bytes do not fit in u64.
    let mut b = B::header(3, 1, 0);
    b.tensor("t", &[1 << 31, 1 << 31], 26, 0).pad(32);
    assert!(matches!(open_err(&b.0), GgufError::ShapeOverflow { .. }));
}

#[test]
fn unknown_tensor_type() {
    // 15 = Q8_K (not a file type sling knows), 4 = removed Q4_2, 43 = past GGML_TYPE_COUNT.
    for id in [4u32, 15, 43, u32::MAX] {
        let mut b = B::header(3, 1, 0);
        b.tensor("t", &[256], id, 0).pad(32).zeros(1024);
        let e = open_err(&b.0);
        assert!(matches!(e, GgufError::UnknownTensorType { type_id, .. } if type_id == id), "{e}");
    }
}

#[test]
fn row_not_multiple_of_block() {
    let mut b = B::header(3, 1, 0);
    b.tensor("t", &[33, 2], 8, 0).pad(32).zeros(128);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::RowNotBlockMultiple { ne0: 33, block: 32, dtype: DType::Q8_0, .. }), "{e}");
    // Zero dims means ne = [1, 1, 1, 1]: not a multiple of a quantized block either.
    let mut b = B::header(3, 1, 0);
    b.tensor("t", &[], 12, 0).pad(32).zeros(256);
    assert!(matches!(open_err(&b.0), GgufError::RowNotBlockMultiple { ne0: 1, block: 256, .. }));
}

#[test]
fn offset_past_eof() {
    let mut v = valid();
    v.0.truncate(v.0.len() - 32); // second tensor's 34 bytes no longer all present
    let e = open_err(&v.0);
    assert!(matches!(e, GgufError::DataOutOfBounds { ref tensor, .. } if tensor == "q"), "{e}");
    // Only the padding after the last tensor missing: accepted (the tensor bytes are all there).
    let mut v = valid();
    v.0.truncate(v.0.len() - 30);
    let t = write(&v.0);
    GgufFile::open(&t.path).unwrap();
}

#[test]
fn non_sequential_offset() {
    for offset in [0u64, 64, 33] {
        let mut b = B::header(3, 2, 0);
        b.tensor("a", &[4], 0, 0).tensor("b", &[4], 0, offset).pad(32).zeros(200);
        let e = open_err(&b.0);
        assert!(matches!(e, GgufError::BadOffset { ref tensor, expected: 32, .. } if tensor == "b"), "{e}");
    }
    let mut b = B::header(3, 1, 0);
    b.tensor("a", &[4], 0, 32).pad(32).zeros(200);
    assert!(matches!(open_err(&b.0), GgufError::BadOffset { expected: 0, offset: 32, .. }));
}

#[test]
fn duplicate_tensor_name() {
    let mut b = B::header(3, 2, 0);
    b.tensor("a", &[4], 0, 0).tensor("a", &[4], 0, 32).pad(32).zeros(64);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::DuplicateTensor { ref tensor, .. } if tensor == "a"), "{e}");
}

#[test]
fn tensor_name_too_long() {
    let mut b = B::header(3, 1, 0);
    b.tensor(&"x".repeat(64), &[4], 0, 0).pad(32).zeros(32);
    let e = open_err(&b.0);
    assert!(matches!(e, GgufError::TensorNameTooLong { len: 64, index: 0, .. }), "{e}");
    let mut b = B::header(3, 1, 0);
    b.tensor(&"x".repeat(63), &[4], 0, 0).pad(32).zeros(32);
    let t = write(&b.0);
    GgufFile::open(&t.path).unwrap();
}

/// Structured-ish mutations: overwrite bytes, overwrite little-endian u64s with edge values, truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Byte(usize, u8),
    Word(usize, u64),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u64),
                Just(1),
                Just(u64::MAX),
                Just(1 << 63),
                Just(u32::MAX as u64),
                any::<u64>(),
                0u64..300
            ]
        )
            .prop_map(|(i, w)| Mutation::Word(i, w)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn mutations_never_panic(use_rich in any::<bool>(), muts in prop::collection::vec(mutation(), 1..6)) {
        let mut v = if use_rich { rich().0 } else { valid().0 };
        for m in muts {
            match m {
                Mutation::Byte(i, b) => {
                    if !v.is_empty() {
                        let n = v.len();
                        v[i % n] = b;
                    }
                }
                Mutation::Word(i, w) => {
                    if v.len() >= 8 {
                        let at = i % (v.len() - 7);
                        v[at..at + 8].copy_from_slice(&w.to_le_bytes());
                    }
                }
                Mutation::Truncate(i) => {
                    let n = v.len() + 1;
                    v.truncate(i % n);
                }
            }
        }
        let t = write(&v);
        if let Ok(f) = GgufFile::open(&t.path) {
            for ti in &f.tensors {
                prop_assert_eq!(f.tensor_data(ti).len() as u64, ti.n_bytes);
            }
        }
    }
}
