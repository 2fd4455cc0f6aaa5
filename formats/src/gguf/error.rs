//! Errors of the GGUF reader and writer: one variant per kind of problem, each naming the file and,
//! where it applies, the key or tensor.

use std::path::PathBuf;

use sling_core::DType;

use super::value::ValueType;

/// Everything that can go wrong reading or writing a GGUF file.
///
/// Reader checks mirror `gguf_init_from_reader` in the pinned `ggml/src/gguf.cpp`; writer checks refuse
/// anything that reader (or llama.cpp's loader) would refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// An operating-system error on the file.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    // ---- reader: framing ----
    /// The file ends before a field that must be there.
    #[error("{path}: truncated: reading {what} needs {need} bytes at offset {offset}, only {remain} left")]
    Truncated { path: PathBuf, what: String, offset: u64, need: u64, remain: u64 },
    /// The first four bytes are not `GGUF`.
    #[error("{path}: bad magic {found:02x?}, expected \"GGUF\"")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    /// The version looks byte-swapped (big-endian file read on a little-endian host, or the reverse).
    #[error("{path}: version {version:#010x} looks byte-swapped; only little-endian GGUF is supported")]
    ByteSwappedVersion { path: PathBuf, version: u32 },
    /// A version other than 2 or 3.
    #[error("{path}: unsupported GGUF version {version} (only 2 and 3 are read)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    /// `n_tensors` or `n_kv` is negative as an `int64_t` (the C reader reads them signed).
    #[error("{path}: {what} count {value} is out of range")]
    CountOutOfRange { path: PathBuf, what: &'static str, value: u64 },
    /// A string's length prefix is larger than the bytes left in the file.
    #[error("{path}: {context}: string length {len} exceeds the {remain} bytes left in the file")]
    StringTooLong { path: PathBuf, context: String, len: u64, remain: u64 },
    /// A string is not UTF-8.
    #[error("{path}: {context}: string is not valid UTF-8")]
    InvalidUtf8 { path: PathBuf, context: String },
    /// An array's element count cannot fit in the bytes left in the file.
    #[error("{path}: key '{key}': array of {len} {elem:?} elements cannot fit in the {remain} bytes left")]
    ArrayTooLong { path: PathBuf, key: String, elem: ValueType, len: u64, remain: u64 },

    // ---- metadata (reader and writer) ----
    /// A value type id outside `enum gguf_type`.
    #[error("{path}: key '{key}': unknown value type id {type_id}")]
    UnknownValueType { path: PathBuf, key: String, type_id: u32 },
    /// An array whose element type is ARRAY (the C reader refuses them).
    #[error("{path}: key '{key}': nested arrays are not supported")]
    NestedArray { path: PathBuf, key: String },
    /// An array element whose type differs from the array's element type (writer only).
    #[error("{path}: key '{key}': array of {expected:?} holds a {found:?} element at index {index}")]
    ArrayElementType { path: PathBuf, key: String, expected: ValueType, found: ValueType, index: usize },
    /// A key of length 0.
    #[error("{path}: key #{index} is empty")]
    EmptyKey { path: PathBuf, index: u64 },
    /// The same key twice.
    #[error("{path}: duplicate key '{key}'")]
    DuplicateKey { path: PathBuf, key: String },
    /// `general.alignment` is present but not a UINT32.
    #[error("{path}: key 'general.alignment' must be UINT32, found {found:?}")]
    AlignmentType { path: PathBuf, found: ValueType },
    /// `general.alignment` is 0 or not a power of two.
    #[error("{path}: alignment {alignment} is not a non-zero power of two")]
    BadAlignment { path: PathBuf, alignment: u64 },

    // ---- tensor infos (reader and writer) ----
    /// A tensor name of 64 bytes or more (`GGML_MAX_NAME` = 64 including the NUL).
    #[error("{path}: tensor #{index} name '{name}' is {len} bytes, at most 63 allowed")]
    TensorNameTooLong { path: PathBuf, index: u64, name: String, len: u64 },
    /// The same tensor name twice (within one file, or across the shards of one writer).
    #[error("{path}: duplicate tensor name '{tensor}'")]
    DuplicateTensor { path: PathBuf, tensor: String },
    /// More than 4 dimensions.
    #[error("{path}: tensor '{tensor}': {n_dims} dimensions, at most 4 allowed")]
    TooManyDims { path: PathBuf, tensor: String, n_dims: u64 },
    /// A dimension that is negative as an `int64_t`.
    #[error("{path}: tensor '{tensor}': dimension {dim} has {value} elements, which is negative as int64")]
    NegativeDim { path: PathBuf, tensor: String, dim: usize, value: u64 },
    /// The element count or byte size overflows.
    #[error("{path}: tensor '{tensor}': shape {ne:?} overflows")]
    ShapeOverflow { path: PathBuf, tensor: String, ne: Vec<u64> },
    /// A ggml type id sling does not know.
    #[error("{path}: tensor '{tensor}': unknown ggml type id {type_id}")]
    UnknownTensorType { path: PathBuf, tensor: String, type_id: u32 },
    /// A dtype that has no ggml id (writer only: U8, BOOL, FP8).
    #[error("{path}: tensor '{tensor}': dtype {dtype} cannot be stored in GGUF")]
    NotAGgufType { path: PathBuf, tensor: String, dtype: DType },
    /// `ne[0]` is not a multiple of the type's block size.
    #[error("{path}: tensor '{tensor}': row of {ne0} elements is not a multiple of the {dtype} block size {block}")]
    RowNotBlockMultiple { path: PathBuf, tensor: String, dtype: DType, ne0: u64, block: u64 },
    /// A tensor's offset is not the sum of the padded sizes of the tensors before it.
    #[error("{path}: tensor '{tensor}': offset {offset}, expected {expected}")]
    BadOffset { path: PathBuf, tensor: String, offset: u64, expected: u64 },
    /// A tensor's bytes (or the aligned start of the data section) lie past the end of the file.
    #[error("{path}: tensor '{tensor}': data [{start}, {end}) lies outside the file ({file_len} bytes)")]
    DataOutOfBounds { path: PathBuf, tensor: String, start: u64, end: u64, file_len: u64 },

    // ---- writer ----
    /// The split plan needs more shards than `split.count` (UINT16) can hold, or more tensors than
    /// `split.tensors.count` (INT32) can count.
    #[error("{path}: split into {shards} shards holding {tensors} tensors does not fit the split.* keys")]
    TooManyShards { path: PathBuf, shards: usize, tensors: usize },
    /// `write_data` was given more bytes than the current tensor still needs (a call never spans two
    /// tensors).
    #[error("{path}: tensor '{tensor}': {got} bytes written but only {remaining} of its {n_bytes} bytes remain")]
    TooMuchData { path: PathBuf, tensor: String, got: u64, remaining: u64, n_bytes: u64 },
    /// `write_data` was called after every tensor was complete.
    #[error("{path}: {got} bytes written after the last tensor was complete")]
    NoTensorLeft { path: PathBuf, got: u64 },
    /// `finish` was called before every tensor was fully written.
    #[error("{path}: tensor '{tensor}' is incomplete: {written} of {n_bytes} bytes written")]
    IncompleteTensor { path: PathBuf, tensor: String, written: u64, n_bytes: u64 },
    /// A previous write failed; the writer cannot continue.
    #[error("{path}: the writer failed earlier and cannot continue")]
    Poisoned { path: PathBuf },
}

impl From<crate::journal::JournalError> for GgufError {
    /// The journal's errors as the writer's I/O errors by operation (`lock` with `WouldBlock` when another
    /// process writes the output, which callers report as such).
    fn from(e: crate::journal::JournalError) -> GgufError {
        let (path, op, source) = e.into_io();
        GgufError::Io { path, op, source }
    }
}
