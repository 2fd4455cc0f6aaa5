//! Streaming, bounded-memory safetensors shard-set writer.
//!
//! Files come out byte-identical to what the `safetensors` library (Rust crate 0.8 `tensor::prepare` /
//! `serialize_to_file`, which the Python `safetensors.numpy.save_file` / `safetensors.torch.save_file` call) writes
//! for the same tensors:
//!
//! * 8-byte little-endian header length `n`, then `n` bytes of compact JSON (serde_json), then the data;
//! * the JSON is `{"__metadata__":{..},"name":{"dtype":"BF16","shape":[..],"data_offsets":[begin,end]},..}`,
//!   `__metadata__` first (only when given), keys of a tensor in the order `dtype`, `shape`, `data_offsets`;
//! * tensors (in the header and in the data alike) sorted by dtype **descending** in the order of the crate's
//!   [`safetensors::Dtype`] enum (U64, I64, F64, C64, F32, U32, I32, BF16, F16, U16, I16, …, F8_E4M3, F8_E5M2, I8, U8,
//!   …, BOOL), then by name (byte order);
//! * the JSON padded with spaces to a multiple of 8 bytes (`n` counts the padding).
//!
//! One difference is deliberate: the library keeps `__metadata__` in a `HashMap`, so with two or more metadata
//! entries its key order is random from run to run; here it is sorted (a `BTreeMap`). With zero or one entry
//! (transformers writes `{"format":"pt"}`) the bytes are identical.
//!
//! Sharding mirrors huggingface_hub's `split_state_dict_into_shards_factory` (which transformers' `save_pretrained`
//! calls), see [`layout`]; [`ShardLayout::index_json`] mirrors the `model.safetensors.index.json` transformers 5
//! writes. [`ShardWriter`] then streams the data in, holding at most one 8 MiB buffer, hashing as it goes.

pub mod sink;

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sling_core::DType;

/// The safetensors crate's limit on the header length (`MAX_HEADER_SIZE`); readers refuse longer headers.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;
/// Size of the write buffer.
pub const BUF_BYTES: usize = 8 << 20;
/// Suffix of a file while it is being written.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// One tensor to write: its name, element type and shape (row-major, little-endian data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl StTensor {
    pub fn new(name: impl Into<String>, dtype: DType, shape: impl Into<Vec<u64>>) -> StTensor {
        StTensor { name: name.into(), dtype, shape: shape.into() }
    }

    /// Bytes of data, or `None` when the size overflows `u64` (or is not a whole number of blocks).
    pub fn checked_n_bytes(&self) -> Option<u64> {
        let n = self.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.dtype.bytes_for(n)
    }

    /// Bytes of data. Saturates at `u64::MAX` for a shape whose size overflows; [`layout`] rejects such tensors,
    /// so for a tensor of a [`ShardLayout`] this is exact.
    pub fn n_bytes(&self) -> u64 {
        self.checked_n_bytes().unwrap_or(u64::MAX)
    }
}

/// A shard set: which tensors go to which file, in which order, at which offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub shards: Vec<Shard>,
}

/// One file of a [`ShardLayout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub file_name: String,
    /// The 8-byte little-endian length followed by the space-padded JSON header.
    pub header: Vec<u8>,
    /// The tensors in data order (= header order).
    pub tensors: Vec<StTensor>,
    /// Total bytes of tensor data.
    pub data_bytes: u64,
}

impl Shard {
    /// Size of the complete file.
    pub fn file_size(&self) -> u64 {
        self.header.len() as u64 + self.data_bytes
    }
    /// Offset in the file of the first data byte.
    pub fn data_start(&self) -> u64 {
        self.header.len() as u64
    }
}

/// Errors of layout and writing. Nothing here panics on hostile input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StWriteError {
    /// An operating-system error on a file or directory.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor #{index}: empty tensor name")]
    EmptyName { index: usize },
    #[error("tensor {name:?}: duplicate tensor name")]
    DuplicateName { name: String },
    #[error("tensor {name:?}: the name is reserved for the safetensors metadata block")]
    ReservedName { name: String },
    #[error("tensor {name:?}: element type {dtype} has no safetensors spelling")]
    UnsupportedDtype { name: String, dtype: DType },
    #[error("tensor {name:?}: shape {shape:?} of {dtype} has a byte size that overflows u64")]
    SizeOverflow { name: String, dtype: DType, shape: Vec<u64> },
    #[error("{file}: total data size overflows u64")]
    ShardOverflow { file: String },
    #[error("{file}: header of {len} bytes exceeds the safetensors limit of {MAX_HEADER_SIZE} bytes")]
    HeaderTooLarge { file: String, len: u64 },
    #[error("invalid shard file name {name:?} (prefix {prefix:?}): must be a plain file name")]
    BadFileName { name: String, prefix: String },
    /// A hand-built [`ShardLayout`] whose header or sizes do not agree with its tensors.
    #[error("inconsistent shard layout: {0}")]
    InvalidLayout(String),
    #[error("{given} bytes written but only {remaining} remain in the shard set (current tensor: {current:?})")]
    TooMuchData { given: u64, remaining: u64, current: Option<String> },
    #[error("finish() before all data: tensor {tensor:?} of {file} misses {missing} of {len} bytes ({total_missing} missing in all)")]
    Incomplete { tensor: String, file: String, missing: u64, len: u64, total_missing: u64 },
    #[error("the writer failed earlier and cannot go on")]
    Poisoned,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StWriteError + 'a {
    move |source| StWriteError::Io { path: path.to_path_buf(), op, source }
}

/// The `safetensors` crate's dtype for a sling [`DType`], found by its safetensors spelling.
pub fn st_dtype(dtype: DType) -> Option<safetensors::Dtype> {
    let spelling = dtype.info().safetensors?;
    serde_json::from_value(serde_json::Value::String(spelling.to_string())).ok()
}

/// Orders tensors as `safetensors::tensor::prepare` does: dtype descending, then name.
fn sort_like_safetensors(tensors: &mut [(safetensors::Dtype, StTensor)]) {
    tensors.sort_by(|(ld, l), (rd, r)| rd.cmp(ld).then_with(|| l.name.cmp(&r.name)));
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping, as the safetensors crate uses; writing to a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("serializing a str to a Vec never fails");
}

/// The header (length + padded JSON) for tensors already in data order.
fn build_header(
    tensors: &[(safetensors::Dtype, StTensor)],
    sizes: &[u64],
    metadata: Option<&BTreeMap<String, String>>,
) -> Vec<u8> {
    let mut json = Vec::with_capacity(64 + 96 * tensors.len());
    json.push(b'{');
    let mut first = true;
    if let Some(md) = metadata {
        json.extend_from_slice(b"\"__metadata__\":{");
        for (i, (k, v)) in md.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json_str(&mut json, k);
            json.push(b':');
            json_str(&mut json, v);
        }
        json.push(b'}');
        first = false;
    }
    let mut offset = 0u64;
    for ((dt, t), &size) in tensors.iter().zip(sizes) {
        if !first {
            json.push(b',');
        }
        first = false;
        json_str(&mut json, &t.name);
        json.extend_from_slice(b":{\"dtype\":");
        serde_json::to_writer(&mut json, dt).expect("serializing a Dtype to a Vec never fails");
        json.extend_from_slice(b",\"shape\":[");
        for (i, d) in t.shape.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(d.to_string().as_bytes());
        }
        json.extend_from_slice(b"],\"data_offsets\":[");
        json.extend_from_slice(offset.to_string().as_bytes());
        json.push(b',');
        offset += size; // checked by the caller
        json.extend_from_slice(offset.to_string().as_bytes());
        json.extend_from_slice(b"]}");
    }
    json.push(b'}');
    let padded = json.len().next_multiple_of(8);
    json.resize(padded, b' ');
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    header
}

fn check_file_name(name: &str, prefix: &str) -> Result<(), StWriteError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(StWriteError::BadFileName { name: name.to_string(), prefix: prefix.to_string() })
    }
}

/// Plans a shard set.
///
/// Validation: names non-empty, unique and not `__metadata__`; every dtype has a safetensors spelling; no size
/// overflows `u64`; each header within the safetensors limit of [`MAX_HEADER_SIZE`].
///
/// Sharding (`max_shard_bytes`, counting tensor data only) is huggingface_hub's `split_state_dict_into_shards_factory`
/// exactly, going through the tensors in the order given:
/// * a tensor larger than the limit gets its own shard, **appended to the shard list at once**, i.e. before the shard
///   that is still being filled (sizes `[1, 9, 1]` with limit 5 give shards `[9]`, `[1, 1]`);
/// * otherwise, when adding it to the shard being filled would exceed the limit, that shard is closed and a new one
///   started; the tensor joins the shard being filled.
///
/// `None` means one shard. Zero tensors give one file with an empty header (as `save_file({})` writes).
/// Within each shard the tensors are then ordered as the safetensors writer orders them.
///
/// File names: one shard: `{prefix}.safetensors`; `n` shards: `{prefix}-{i:05}-of-{n:05}.safetensors`, 1-based.
pub fn layout(
    tensors: Vec<StTensor>,
    max_shard_bytes: Option<u64>,
    prefix: &str,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<ShardLayout, StWriteError> {
    // Validate every tensor first.
    let mut seen: HashSet<&str> = HashSet::with_capacity(tensors.len());
    let mut sized = Vec::with_capacity(tensors.len());
    for (index, t) in tensors.iter().enumerate() {
        if t.name.is_empty() {
            return Err(StWriteError::EmptyName { index });
        }
        if t.name == "__metadata__" {
            return Err(StWriteError::ReservedName { name: t.name.clone() });
        }
        if !seen.insert(&t.name) {
            return Err(StWriteError::DuplicateName { name: t.name.clone() });
        }
        let dt = st_dtype(t.dtype).ok_or(StWriteError::UnsupportedDtype { name: t.name.clone(), dtype: t.dtype })?;
        let size = t.checked_n_bytes().ok_or_else(|| StWriteError::SizeOverflow {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })?;
        // A size the library can express (usize offsets); on 64-bit targets this always holds.
        if usize::try_from(size).is_err() {
            return Err(StWriteError::SizeOverflow { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() });
        }
        sized.push((dt, size));
    }
    drop(seen);

    // Assign to shards (huggingface_hub's greedy split).
    let mut groups: Vec<Vec<usize>> = Vec::new();
    match max_shard_bytes {
        None => groups.push((0..tensors.len()).collect()),
        Some(max) => {
            let mut current: Vec<usize> = Vec::new();
            let mut current_size = 0u64;
            for (i, &(_, size)) in sized.iter().enumerate() {
                if size > max {
                    groups.push(vec![i]);
                    continue;
                }
                // current_size <= max and size <= max, so this cannot overflow.
                if current_size + size > max {
                    groups.push(std::mem::take(&mut current));
                    current_size = 0;
                }
                current.push(i);
                current_size += size;
            }
            if !current.is_empty() || groups.is_empty() {
                groups.push(current);
            }
        }
    }

    let n = groups.len();
    let file_name = |i: usize| {
        if n == 1 {
            format!("{prefix}.safetensors")
        } else {
            format!("{prefix}-{:05}-of-{:05}.safetensors", i + 1, n)
        }
    };
    check_file_name(&file_name(0), prefix)?;

    let mut slots: Vec<Option<StTensor>> = tensors.into_iter().map(Some).collect();
    let mut shards = Vec::with_capacity(n);
    for (gi, group) in groups.into_iter().enumerate() {
        let file = file_name(gi);
        let mut members: Vec<(safetensors::Dtype, StTensor)> = group
            .iter()
            .map(|&i| (sized[i].0, slots[i].take().expect("each tensor is in exactly one shard")))
            .collect();
        sort_like_safetensors(&mut members);
        let sizes: Vec<u64> = members.iter().map(|(_, t)| t.n_bytes()).collect();
        let data_bytes = sizes
            .iter()
            .try_fold(0u64, |acc, &s| acc.checked_add(s))
            .ok_or_else(|| StWriteError::ShardOverflow { file: file.clone() })?;
        let header = build_header(&members, &sizes, metadata);
        let json_len = header.len() as u64 - 8;
        if json_len > MAX_HEADER_SIZE {
            return Err(StWriteError::HeaderTooLarge { file, len: json_len });
        }
        if data_bytes.checked_add(header.len() as u64).is_none() {
            return Err(StWriteError::ShardOverflow { file });
        }
        shards.push(Shard {
            file_name: file,
            header,
            tensors: members.into_iter().map(|(_, t)| t).collect(),
            data_bytes,
        });
    }
    Ok(ShardLayout { shards })
}

impl ShardLayout {
    /// Sum of the data bytes of all shards (the index's `total_size`).
    pub fn total_data_bytes(&self) -> u64 {
        self.shards.iter().fold(0u64, |acc, s| acc.saturating_add(s.data_bytes))
    }

    /// All tensors in global layout (= write) order, with the index of their shard.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &StTensor)> + '_ {
        self.shards.iter().enumerate().flat_map(|(i, s)| s.tensors.iter().map(move |t| (i, t)))
    }

    /// `model.safetensors.index.json` as transformers 5 `save_pretrained` writes it:
    /// `json.dumps({"metadata": {..extra_metadata, "total_size": N}, "weight_map": {name: file}}, indent=2,
    /// sort_keys=True) + "\n"` (so `ensure_ascii`: non-ASCII escaped as `\uXXXX`; all keys sorted; floats as Python's
    /// `repr`). `total_size` is the data bytes; it wins over an `extra_metadata` entry of that name, as in
    /// transformers (which passes `("total_parameters", N)` here). transformers writes no index for a single shard;
    /// this returns one anyway (callers decide).
    pub fn index_json(&self, extra_metadata: &[(&str, serde_json::Value)]) -> String {
        let mut md: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (k, v) in extra_metadata {
            md.insert((*k).to_string(), v.clone());
        }
        md.insert("total_size".to_string(), serde_json::Value::from(self.total_data_bytes()));
        let mut weight_map = serde_json::Map::new();
        let mut names: Vec<(&str, &str)> =
            self.tensors().map(|(si, t)| (t.name.as_str(), self.shards[si].file_name.as_str())).collect();
        names.sort();
        for (name, file) in names {
            weight_map.insert(name.to_string(), serde_json::Value::String(file.to_string()));
        }
        let mut root = serde_json::Map::new();
        root.insert("metadata".to_string(), serde_json::Value::Object(md.into_iter().collect()));
        root.insert("weight_map".to_string(), serde_json::Value::Object(weight_map));
        let mut out = String::new();
        out.push_str(&crate::pyjson::dumps(&serde_json::Value::Object(root), 2, crate::pyjson::SortKeys::All));
        out.push('\n');
        out
    }
}

/// What [`ShardWriter::finish`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// `(file name, size, sha256 hex)` per file, in layout order.
    pub files: Vec<(String, u64, String)>,
    /// `(name, file name, offset of the data in the file, length, sha256 hex of the data)` per tensor, in layout order.
    pub tensors: Vec<(String, String, u64, u64, String)>,
}

struct OpenFile {
    out: BufWriter<File>,
    partial: PathBuf,
    hasher: Sha256,
}

/// Writes a [`ShardLayout`] into a directory, one file after another, from data supplied strictly in layout order
/// (shard 0's tensors in data order, then shard 1's …) by any number of [`write`](ShardWriter::write) calls of any
/// size. Each file is written as `<name>.partial`, fsynced and renamed to `<name>` when its last byte is in (the
/// directory is fsynced after the rename). Dropping the writer before a successful [`finish`](ShardWriter::finish)
/// removes the `.partial` file being written; files completed before stay.
pub struct ShardWriter {
    dir: PathBuf,
    layout: ShardLayout,
    /// Current shard, tensor within it, global tensor index.
    shard: usize,
    tensor: usize,
    global: usize,
    /// Bytes still missing of the current tensor, and in all.
    remaining: u64,
    total_remaining: u64,
    /// Offset in the current file of the current tensor's data.
    tensor_offset: u64,
    tensor_hasher: Sha256,
    file: Option<OpenFile>,
    written: Written,
    poisoned: bool,
}

impl ShardWriter {
    /// Checks the layout, creates the first `.partial` file and writes its header.
    pub fn create(dir: &Path, layout: ShardLayout) -> Result<ShardWriter, StWriteError> {
        let md = std::fs::metadata(dir).map_err(io_err(dir, "stat output directory"))?;
        if !md.is_dir() {
            return Err(StWriteError::Io {
                path: dir.to_path_buf(),
                op: "open output directory",
                source: std::io::Error::other("not a directory"),
            });
        }
        let mut total = 0u64;
        let mut names = HashSet::new();
        for s in &layout.shards {
            check_file_name(&s.file_name, "")?;
            if !names.insert(s.file_name.as_str()) {
                return Err(StWriteError::InvalidLayout(format!("file name {:?} used twice", s.file_name)));
            }
            let sum = s.tensors.iter().try_fold(0u64, |acc, t| acc.checked_add(t.checked_n_bytes()?));
            if sum != Some(s.data_bytes) {
                return Err(StWriteError::InvalidLayout(format!(
                    "{}: data_bytes {} but the tensors hold {:?}",
                    s.file_name, s.data_bytes, sum
                )));
            }
            let len_ok = s.header.len() >= 8
                && s.header.len() % 8 == 0
                && u64::from_le_bytes(s.header[..8].try_into().expect("8 bytes")) == s.header.len() as u64 - 8;
            if !len_ok {
                return Err(StWriteError::InvalidLayout(format!("{}: header length prefix mismatch", s.file_name)));
            }
            total = total
                .checked_add(s.data_bytes)
                .ok_or_else(|| StWriteError::ShardOverflow { file: s.file_name.clone() })?;
        }
        drop(names);
        let mut w = ShardWriter {
            dir: dir.to_path_buf(),
            layout,
            shard: 0,
            tensor: 0,
            global: 0,
            remaining: 0,
            total_remaining: total,
            tensor_offset: 0,
            tensor_hasher: Sha256::new(),
            file: None,
            written: Written::default(),
            poisoned: false,
        };
        if !w.layout.shards.is_empty() {
            w.open_shard()?;
            w.settle()?;
        }
        Ok(w)
    }

    /// The layout being written.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// Bytes still to be written in all.
    pub fn remaining_bytes(&self) -> u64 {
        self.total_remaining
    }

    /// Index (in global layout order) and description of the tensor being written, or `None` when all data is in.
    /// Zero-byte tensors are never current: they are complete as soon as they are reached.
    pub fn current(&self) -> Option<(usize, &StTensor)> {
        let t = self.layout.shards.get(self.shard)?.tensors.get(self.tensor)?;
        Some((self.global, t))
    }

    /// Appends data. Refuses, writing nothing, more bytes than the shard set still needs.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<(), StWriteError> {
        if self.poisoned {
            return Err(StWriteError::Poisoned);
        }
        let given = bytes.len() as u64;
        if given > self.total_remaining {
            return Err(StWriteError::TooMuchData {
                given,
                remaining: self.total_remaining,
                current: self.current().map(|(_, t)| t.name.clone()),
            });
        }
        while !bytes.is_empty() {
            let n = usize::try_from(self.remaining).map_or(bytes.len(), |r| r.min(bytes.len()));
            let (now, rest) = bytes.split_at(n);
            if let Err(e) = self.put(now) {
                self.poisoned = true;
                return Err(e);
            }
            self.tensor_hasher.update(now);
            self.remaining -= n as u64;
            self.total_remaining -= n as u64;
            bytes = rest;
            if self.remaining == 0 {
                if let Err(e) = self.settle() {
                    self.poisoned = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Checks that all data is in and returns the file and tensor hashes. Every file is already complete and renamed.
    pub fn finish(mut self) -> Result<Written, StWriteError> {
        if self.poisoned {
            return Err(StWriteError::Poisoned);
        }
        if self.total_remaining > 0 {
            let s = &self.layout.shards[self.shard];
            let t = &s.tensors[self.tensor];
            return Err(StWriteError::Incomplete {
                tensor: t.name.clone(),
                file: s.file_name.clone(),
                missing: self.remaining,
                len: t.n_bytes(),
                total_missing: self.total_remaining,
            });
        }
        Ok(std::mem::take(&mut self.written))
    }

    fn put(&mut self, data: &[u8]) -> Result<(), StWriteError> {
        let f = self.file.as_mut().expect("a file is open while data remains");
        f.hasher.update(data);
        f.out.write_all(data).map_err(io_err(&f.partial, "write"))
    }

    fn open_shard(&mut self) -> Result<(), StWriteError> {
        let shard = &self.layout.shards[self.shard];
        let partial = self.dir.join(format!("{}{}", shard.file_name, PARTIAL_SUFFIX));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(io_err(&partial, "create"))?;
        let mut of = OpenFile { out: BufWriter::with_capacity(BUF_BYTES, file), partial, hasher: Sha256::new() };
        of.hasher.update(&shard.header);
        let res = of.out.write_all(&shard.header).map_err(io_err(&of.partial, "write header"));
        self.tensor = 0;
        self.tensor_offset = shard.data_start();
        self.remaining = shard.tensors.first().map_or(0, |t| t.n_bytes());
        self.tensor_hasher = Sha256::new();
        self.file = Some(of);
        res
    }

    /// While the current tensor is complete: record it and move on, closing and opening files as needed.
    fn settle(&mut self) -> Result<(), StWriteError> {
        while self.remaining == 0 && self.shard < self.layout.shards.len() {
            let shard = &self.layout.shards[self.shard];
            if let Some(t) = shard.tensors.get(self.tensor) {
                let len = t.n_bytes();
                let hasher = std::mem::take(&mut self.tensor_hasher);
                self.written.tensors.push((
                    t.name.clone(),
                    shard.file_name.clone(),
                    self.tensor_offset,
                    len,
                    hex(&hasher.finalize()),
                ));
                self.tensor_offset += len;
                self.tensor += 1;
                self.global += 1;
                self.remaining = shard.tensors.get(self.tensor).map_or(0, |t| t.n_bytes());
                if self.tensor < shard.tensors.len() {
                    continue;
                }
            }
            // The shard is complete.
            self.close_shard()?;
            self.shard += 1;
            if self.shard < self.layout.shards.len() {
                self.open_shard()?;
            }
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), StWriteError> {
        let shard = &self.layout.shards[self.shard];
        let mut of = self.file.take().expect("the shard being closed is open");
        let partial = of.partial.clone();
        // Keep `self.file` set until the rename so that Drop removes the partial file on any error here.
        let res = (|| {
            of.out.flush().map_err(io_err(&partial, "write"))?;
            of.out.get_ref().sync_all().map_err(io_err(&partial, "fsync"))?;
            let path = self.dir.join(&shard.file_name);
            std::fs::rename(&partial, &path).map_err(io_err(&path, "rename into place"))?;
            Ok(())
        })();
        if let Err(e) = res {
            self.file = Some(of);
            return Err(e);
        }
        let hash = hex(&std::mem::take(&mut of.hasher).finalize());
        drop(of);
        self.written.files.push((shard.file_name.clone(), shard.file_size(), hash));
        sync_dir(&self.dir)
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StWriteError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir, "fsync directory"))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StWriteError> {
    Ok(())
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(of) = self.file.take() {
            // Take the file out of the BufWriter without flushing: it is removed right away.
            let (file, _unflushed) = of.out.into_parts();
            drop(file);
            let _ = std::fs::remove_file(&of.partial);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
