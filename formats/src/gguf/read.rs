//! Hardened GGUF reader.
//!
//! [`GgufFile::open`] memory-maps the file, parses the header, the key/value pairs and the tensor infos,
//! and validates everything the pinned C reader (`ggml/src/gguf.cpp`, `gguf_init_from_reader`) validates
//! before any tensor byte is touched:
//!
//! - magic `GGUF`; version 2 or 3; a byte-swapped version is reported as such;
//! - `n_tensors`/`n_kv` non-negative as `int64_t`;
//! - every length prefix is checked against the bytes left in the file *before* anything is allocated
//!   (strings: `len <= remaining` and `<= 2^30`; arrays: `n * min_elem_size <= remaining` and `<= 2^30`);
//! - keys non-empty and unique, value types known, no nested arrays, UTF-8 strings;
//! - `general.alignment`, when present, is a UINT32 power of two;
//! - tensor names at most 63 bytes and unique, `n_dims <= 4`, every `ne >= 0`, element and byte counts
//!   computed with checked arithmetic (element count `<= i64::MAX`), ggml type ids known to
//!   [`DType::from_ggml_id`], `ne[0]` a multiple of the block size;
//! - offsets exactly sequential (`offset_i == Σ_{j<i} align(n_bytes_j)`), the aligned data start and
//!   every tensor's bytes inside the file.
//!
//! After `open` succeeds, [`GgufFile::tensor_data`] is a plain slice of the map.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sling_core::DType;

use super::error::GgufError;
use super::value::{GgufValue, ValueType};
use super::{DEFAULT_ALIGNMENT, MAGIC};

/// `GGUF_MAX_STRING_LENGTH` and `GGUF_MAX_ARRAY_ELEMENTS` of the C reader.
const MAX_STRING_LEN: u64 = 1 << 30;
const MAX_ARRAY_ELEMS: u64 = 1 << 30;
/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// `GGML_MAX_NAME` counts the NUL, so names may have at most 63 bytes.
pub const MAX_NAME_LEN: usize = 63;
/// The key that sets the data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// One tensor as described in the file's tensor-info table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub dtype: DType,
    /// ggml order (`ne[0]` innermost); `len()` is `n_dims` as stored (0..=4).
    pub ne: Vec<u64>,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Bytes of tensor data (without padding).
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Number of elements (1 for `n_dims == 0`).
    pub fn n_elements(&self) -> u64 {
        // Validated at open (or by the writer) not to overflow.
        self.ne.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
}

/// An opened, validated GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Key/value pairs in file order.
    pub kvs: Vec<(String, GgufValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    map: Mmap,
    kv_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Memory-maps `path` and parses and validates its header; no tensor data is read.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| GgufError::Io { path, op, source }
        };
        let file = File::open(path).map_err(io("open"))?;
        // SAFETY: the map is read-only and private to this struct. Like every mmap-based reader (and
        // llama.cpp), we rely on the file not being truncated or modified by another process while it
        // is open; all offsets into it were validated against its length at open time.
        let map = unsafe { Mmap::map(&file) }.map_err(io("mmap"))?;
        let header = parse(path, &map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            kvs: header.kvs,
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
            map,
            kv_index: header.kv_index,
            tensor_index: header.tensor_index,
        })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        let i = *self.kv_index.get(key)?;
        self.kvs.get(i).map(|(_, v)| v)
    }

    /// The tensor info named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        let i = *self.tensor_index.get(name)?;
        self.tensors.get(i)
    }

    /// The bytes of tensor `t` (without padding). `t` must come from this file (its bounds were
    /// validated at open); an info from elsewhere whose range lies outside the file gives an empty slice.
    pub fn tensor_data(&self, t: &GgufTensorInfo) -> &[u8] {
        let range = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|s| Some((s, s.checked_add(t.n_bytes)?)))
            .and_then(|(s, e)| Some((usize::try_from(s).ok()?, usize::try_from(e).ok()?)));
        match range {
            Some((s, e)) => self.map.get(s..e).unwrap_or(&[]),
            None => &[],
        }
    }

    /// Drops this process's mapped pages (they stay in the page cache): resident memory stays bounded when a
    /// reader walks a large file once (`sling eval` drops them after each layer).
    pub fn release_pages(&self) {
        // SAFETY: the map is a shared, read-only, file-backed mapping. MADV_DONTNEED only removes
        // page-table entries; a later access faults the same file bytes back in from the page
        // cache, so no slice into the map observes different data.
        #[cfg(unix)]
        let _ = unsafe { self.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }

    /// Length of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Everything `open` learns from the header.
struct Header {
    version: u32,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
    kv_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian cursor over the mapped file.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remain(&self) -> u64 {
        (self.buf.len().saturating_sub(self.pos)) as u64
    }

    fn truncated(&self, what: String, need: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what,
            offset: self.pos as u64,
            need,
            remain: self.remain(),
        }
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        let end = usize::try_from(n).ok().and_then(|n| self.pos.checked_add(n));
        match end.and_then(|end| Some((end, self.buf.get(self.pos..end)?))) {
            Some((end, s)) => {
                self.pos = end;
                Ok(s)
            }
            None => Err(self.truncated(what(), n)),
        }
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed string; `context` names what it is for errors.
    fn string(&mut self, context: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("{}: string length", context()))?;
        if len > MAX_STRING_LEN || len > self.remain() {
            return Err(GgufError::StringTooLong {
                path: self.path.to_path_buf(),
                context: context(),
                len,
                remain: self.remain(),
            });
        }
        let bytes = self.take(len, || format!("{}: string bytes", context()))?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::InvalidUtf8 { path: self.path.to_path_buf(), context: context() })
    }

    /// One scalar (or string) value of type `t` (never ARRAY).
    fn scalar(&mut self, t: ValueType, key: &str) -> Result<GgufValue, GgufError> {
        let what = || format!("key '{key}': {t:?} value");
        Ok(match t {
            ValueType::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array::<1>(what)?)),
            ValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array::<2>(what)?)),
            ValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array::<2>(what)?)),
            ValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array::<4>(what)?)),
            ValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array::<4>(what)?)),
            ValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array::<4>(what)?)),
            // Like the C reader: one byte, any non-zero value is true.
            ValueType::Bool => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            ValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array::<8>(what)?)),
            ValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array::<8>(what)?)),
            ValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array::<8>(what)?)),
            ValueType::String => GgufValue::String(self.string(&|| format!("key '{key}': value"))?),
            ValueType::Array => {
                return Err(GgufError::NestedArray { path: self.path.to_path_buf(), key: key.to_string() })
            }
        })
    }

    fn value_type(&mut self, key: &str, what: &str) -> Result<ValueType, GgufError> {
        let id = self.u32(|| format!("key '{key}': {what}"))?;
        ValueType::from_u32(id).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            type_id: id,
        })
    }

    fn value(&mut self, key: &str) -> Result<GgufValue, GgufError> {
        let t = self.value_type(key, "value type")?;
        if t != ValueType::Array {
            return self.scalar(t, key);
        }
        let elem = self.value_type(key, "array element type")?;
        if elem == ValueType::Array {
            return Err(GgufError::NestedArray { path: self.path.to_path_buf(), key: key.to_string() });
        }
        let n = self.u64(|| format!("key '{key}': array length"))?;
        let min = min_size(elem);
        let fits = n.checked_mul(min).is_some_and(|b| b <= self.remain());
        if n > MAX_ARRAY_ELEMS || !fits {
            return Err(GgufError::ArrayTooLong {
                path: self.path.to_path_buf(),
                key: key.to_string(),
                elem,
                len: n,
                remain: self.remain(),
            });
        }
        // `n * min <= remaining bytes` bounds the element count by the file size; the vector still
        // grows only as elements are actually read.
        let mut v = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            v.push(self.scalar(elem, key)?);
        }
        Ok(GgufValue::Array(elem, v))
    }
}

/// Smallest encoded size of one value of type `t` (strings: the length prefix).
fn min_size(t: ValueType) -> u64 {
    match t {
        ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
        ValueType::U16 | ValueType::I16 => 2,
        ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
        ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
        // length prefix + element type + count
        ValueType::Array => 12,
    }
}

/// `x` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn checked_align(x: u64, align: u64) -> Option<u64> {
    let rem = x % align;
    if rem == 0 {
        Some(x)
    } else {
        x.checked_add(align - rem)
    }
}

/// Element count and byte size of a tensor, validated like the C reader does. Shared with the writer.
pub(crate) fn tensor_size(path: &Path, name: &str, dtype: DType, ne: &[u64]) -> Result<u64, GgufError> {
    let p = || path.to_path_buf();
    if ne.len() > MAX_DIMS {
        return Err(GgufError::TooManyDims { path: p(), tensor: name.to_string(), n_dims: ne.len() as u64 });
    }
    for (dim, &value) in ne.iter().enumerate() {
        if value > i64::MAX as u64 {
            return Err(GgufError::NegativeDim { path: p(), tensor: name.to_string(), dim, value });
        }
    }
    let overflow = || GgufError::ShapeOverflow { path: p(), tensor: name.to_string(), ne: ne.to_vec() };
    let mut n: u64 = 1;
    for &d in ne {
        n = n.checked_mul(d).filter(|&n| n <= i64::MAX as u64).ok_or_else(overflow)?;
    }
    let block = dtype.block_elems() as u64;
    let ne0 = ne.first().copied().unwrap_or(1);
    if block == 0 || ne0 % block != 0 {
        return Err(GgufError::RowNotBlockMultiple { path: p(), tensor: name.to_string(), dtype, ne0, block });
    }
    dtype.bytes_for(n).ok_or_else(overflow)
}

fn parse(path: &Path, buf: &[u8]) -> Result<Header, GgufError> {
    let p = || path.to_path_buf();
    let mut c = Cursor { path, buf, pos: 0 };

    let magic = c.take(4, || "magic".to_string())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { path: p(), found: magic.to_vec() });
    }
    let version = c.u32(|| "version".to_string())?;
    if version != 0 && version & 0xFFFF == 0 {
        return Err(GgufError::ByteSwappedVersion { path: p(), version });
    }
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { path: p(), version });
    }
    let n_tensors = c.u64(|| "tensor count".to_string())?;
    if n_tensors > i64::MAX as u64 {
        return Err(GgufError::CountOutOfRange { path: p(), what: "tensor", value: n_tensors });
    }
    let n_kv = c.u64(|| "key/value count".to_string())?;
    if n_kv > i64::MAX as u64 {
        return Err(GgufError::CountOutOfRange { path: p(), what: "key/value", value: n_kv });
    }

    // ---- key/value pairs ----
    // No allocation from the counts: vectors grow as entries are actually read.
    let mut kvs: Vec<(String, GgufValue)> = Vec::new();
    let mut kv_index: HashMap<String, usize> = HashMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key #{i}"))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { path: p(), index: i });
        }
        if kv_index.contains_key(&key) {
            return Err(GgufError::DuplicateKey { path: p(), key });
        }
        let value = c.value(&key)?;
        kv_index.insert(key.clone(), kvs.len());
        kvs.push((key, value));
    }

    let alignment = match kv_index.get(ALIGNMENT_KEY).and_then(|&i| kvs.get(i)) {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) => u64::from(*a),
        Some((_, other)) => return Err(GgufError::AlignmentType { path: p(), found: other.value_type() }),
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment { path: p(), alignment });
    }

    // ---- tensor infos ----
    let mut tensors: Vec<GgufTensorInfo> = Vec::new();
    let mut tensor_index: HashMap<String, usize> = HashMap::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("tensor #{i} name"))?;
        if name.len() > MAX_NAME_LEN {
            return Err(GgufError::TensorNameTooLong { path: p(), index: i, len: name.len() as u64, name });
        }
        if tensor_index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor { path: p(), tensor: name });
        }
        let n_dims = c.u32(|| format!("tensor '{name}': n_dims"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims { path: p(), tensor: name, n_dims: u64::from(n_dims) });
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for j in 0..n_dims {
            ne.push(c.u64(|| format!("tensor '{name}': ne[{j}]"))?);
        }
        let type_id = c.u32(|| format!("tensor '{name}': type"))?;
        let dtype = DType::from_ggml_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            path: p(),
            tensor: name.clone(),
            type_id,
        })?;
        let n_bytes = tensor_size(path, &name, dtype, &ne)?;
        let offset = c.u64(|| format!("tensor '{name}': offset"))?;
        tensor_index.insert(name.clone(), tensors.len());
        tensors.push(GgufTensorInfo { name, dtype, ne, offset, n_bytes });
    }

    // ---- data section ----
    let file_len = buf.len() as u64;
    let end_of_infos = c.pos as u64;
    // Like the C reader, the data section is aligned only when there are tensors.
    let data_offset = if tensors.is_empty() {
        end_of_infos
    } else {
        match checked_align(end_of_infos, alignment).filter(|&d| d <= file_len) {
            Some(d) => d,
            None => {
                let need = checked_align(end_of_infos, alignment).map_or(u64::MAX, |d| d - end_of_infos);
                return Err(c.truncated("padding before the tensor data".to_string(), need));
            }
        }
    };
    let mut expected: u64 = 0;
    for t in &tensors {
        if t.offset != expected {
            return Err(GgufError::BadOffset { path: p(), tensor: t.name.clone(), offset: t.offset, expected });
        }
        let overflow = || GgufError::ShapeOverflow { path: p(), tensor: t.name.clone(), ne: t.ne.clone() };
        let start = data_offset.checked_add(t.offset).ok_or_else(overflow)?;
        let end = start.checked_add(t.n_bytes).ok_or_else(overflow)?;
        if end > file_len {
            return Err(GgufError::DataOutOfBounds { path: p(), tensor: t.name.clone(), start, end, file_len });
        }
        let padded = checked_align(t.n_bytes, alignment).ok_or_else(overflow)?;
        expected = expected.checked_add(padded).ok_or_else(overflow)?;
    }

    Ok(Header { version, kvs, tensors, alignment, data_offset, kv_index, tensor_index })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_align_rounds_up_and_detects_overflow() {
        assert_eq!(checked_align(0, 32), Some(0));
        assert_eq!(checked_align(1, 32), Some(32));
        assert_eq!(checked_align(64, 32), Some(64));
        assert_eq!(checked_align(u64::MAX - 3, 32), None);
    }

    #[test]
    fn tensor_size_checks_like_the_c_reader() {
        let p = Path::new("x.gguf");
        assert_eq!(tensor_size(p, "t", DType::Q8_0, &[64, 3]).ok(), Some(2 * 3 * 34));
        assert_eq!(tensor_size(p, "t", DType::F32, &[]).ok(), Some(4));
        assert_eq!(tensor_size(p, "t", DType::F32, &[0, 7]).ok(), Some(0));
        assert!(matches!(tensor_size(p, "t", DType::Q4K, &[]), Err(GgufError::RowNotBlockMultiple { .. })));
        assert!(matches!(tensor_size(p, "t", DType::F32, &[1 << 62, 2]), Err(GgufError::ShapeOverflow { .. })));
        assert!(matches!(tensor_size(p, "t", DType::F32, &[1 << 63]), Err(GgufError::NegativeDim { .. })));
        assert!(matches!(tensor_size(p, "t", DType::F32, &[1; 5]), Err(GgufError::TooManyDims { .. })));
    }
}
