//! Streaming GGUF writer, byte-compatible with gguf-py's `GGUFWriter` at the pinned llama.cpp.
//!
//! Layout of every output file (as `GGUFWriter.write_header_to_file` / `write_kv_data_to_file` /
//! `write_ti_data_to_file` / `write_tensors_to_file` write it):
//!
//! ```text
//! "GGUF"  u32 version=3  u64 n_tensors  u64 n_kv
//! KVs in the given order (string key, u32 type, value; arrays: u32 elem type, u64 n, values)
//! tensor infos (string name, u32 n_dims = ne.len(), u64 ne[0..n_dims], u32 ggml type, u64 offset)
//! 0x00 padding to the alignment (always, even without tensors)
//! per tensor: its bytes, then 0x00 padding to the alignment (also after the last one)
//! ```
//!
//! The alignment is 32 unless a `general.alignment` UINT32 KV is given (gguf-py's
//! `add_custom_alignment`).
//!
//! **Splits** follow `GGUFWriter.add_tensor_info` / `add_shard_kv_data` / `format_shard_names`:
//! tensors are assigned in descriptor order; a new shard starts before a tensor when the current shard
//! already holds at least one tensor and either holds `max_tensors` tensors or its unpadded byte total
//! plus this tensor's bytes would exceed `max_bytes` (0 = no limit for either). `small_first_shard`
//! adds a leading metadata-only shard. With more than one shard, files are named
//! `{stem}-{i:05}-of-{n:05}.gguf` (1-based `i`), shard 0 carries all given KVs followed by
//! `split.no` (U16), `split.count` (U16), `split.tensors.count` (I32) (a given KV with one of those names
//! is overwritten in place, as the Python dict does), and every other shard carries only those three
//! keys. A plan with one shard writes the plain name and no split keys.
//!
//! [`SplitPolicy::LlamaGgufSplit`] lays the shards out as `llama-gguf-split --split` does instead (`sling
//! quantize`'s reference chain): sizes count tensor bytes padded to 32, and the split keys come in ggml's order.
//!
//! One deliberate difference: shards after the first do not carry `general.alignment`, so they are
//! padded to the default 32 (which is what a reader of those shards expects). gguf-py pads them to the
//! custom alignment, which llama.cpp then rejects; for the default alignment both agree.
//!
//! **Crash safety.** Each file is written under its final name plus `.partial` (`model.gguf.partial`)
//! and renamed to its final name only by [`GgufWriter::finish`], once every shard is complete, padded
//! and fsynced; dropping an unfinished writer deletes its partial files (unless
//! [`GgufWriter::keep_partial`]). A process killed at any moment leaves at most `.partial` files.
//!
//! **Resume** ([`GgufWriter::create_resumable`]). A resumable writer also keeps a journal,
//! `OUT.partial.json` (JSON lines: a header with the caller's fingerprint of everything that decides the
//! bytes, then one line per completed tensor with its shard, offset, size, end and sha256), appended only
//! after the data it lists was flushed and fsynced, at most every `interval` and whenever a shard
//! completes. The journal file is locked (`flock`) while the writer lives, so a second writer of the same
//! output is refused. Resuming re-reads the partial files: each shard's header must be the one this plan
//! writes and each journaled tensor must hash as recorded; the longest prefix that checks out is kept
//! (file hashes are rebuilt from the bytes read), the rest is truncated, and writing continues with the
//! next tensor. Since the bytes do not depend on how the work was cut, a resumed output is identical to an
//! uninterrupted one.
//!
//! **Hashes while writing**: every byte that goes to a shard also goes through a SHA-256 of that shard,
//! and the data bytes of each tensor (without padding) through a SHA-256 of that tensor, so
//! [`GgufWriter::finish_hashed`] can report the sha256 of every file and tensor without reading
//! anything back (the provenance manifest, `sling_provenance::manifest`, is built from them).
//!
//! # Cross-checks done by hand (pinned tree at `/root/.cache/sling-lab/llama.cpp`)
//!
//! - Byte-exact: the same KVs/tensors written by gguf-py from the pinned tree
//!   (`PYTHONPATH=/root/.cache/sling-lab/llama.cpp/gguf-py /root/.cache/sling-lab/venv/bin/python gen.py OUT`,
//!   script in the docs of `formats/tests/gguf_roundtrip.rs`) and by this writer were compared with `cmp`:
//!   identical for every value type, F32/F16/Q8_0/I32(0-dim)/BF16 tensors, `general.alignment` 64, and the
//!   splits by tensor count (2), by bytes (420) and with `small_first_shard`. The test pins their SHA-256.
//! - llama.cpp accepts the shards: with the pinned build,
//!   `cd OUT && LD_LIBRARY_PATH=$B $B/llama-gguf-split --merge bytens-00001-of-00003.gguf merged-bytens.gguf`
//!   (`B=/root/.cache/sling-lab/llama.cpp-build/bin`; same for the `bybytes` and `small` sets) printed
//!   "merged from 3 split with 5 tensors", and the merged files re-opened with [`super::GgufFile`] held
//!   every tensor with its original bytes. A set with `general.alignment` 256 in shard 0 was also read
//!   without complaint by gguf-split (whose own merged output is then invalid: it keeps the KV but pads
//!   to 32, a gguf-split limitation).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sling_core::DType;

use super::error::GgufError;
use super::read::{checked_align, tensor_size, ALIGNMENT_KEY, MAX_NAME_LEN};
use super::value::{GgufValue, ValueType};
use super::{DEFAULT_ALIGNMENT, MAGIC, VERSION};
use crate::journal::{Entry, Header, Journal};

/// `Keys.Split.LLM_KV_SPLIT_NO` and friends.
pub const SPLIT_NO: &str = "split.no";
pub const SPLIT_COUNT: &str = "split.count";
pub const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// Appended to an output file's name while it is being written (`model.gguf.partial`).
pub const PARTIAL_SUFFIX: &str = ".partial";
/// Appended to the output name for the resume journal (`model.gguf.partial.json`).
pub const JOURNAL_SUFFIX: &str = ".partial.json";
/// `schema` of the journal's first line.
pub const JOURNAL_SCHEMA: &str = crate::journal::SCHEMA;

/// Capacity of the output buffer.
const BUF_CAPACITY: usize = 8 << 20;
/// Pieces passed to `write_data` at least this large have their tensor hash computed on a helper
/// thread while the file hash and the write proceed.
const PARALLEL_HASH_MIN: usize = 1 << 20;
/// Pieces passed to `write_data` at least this large go straight to the file (after the buffer is
/// flushed), not through the buffer: copying them into it first would cost a pass over the bytes.
const DIRECT_WRITE_MIN: usize = 256 << 10;
/// Bytes written between two requests to start the kernel's writeback (see [`start_writeback`]).
const WRITEBACK_STEP: u64 = 32 << 20;
/// Read size when re-checking a partial file.
const VERIFY_BUF: usize = 1 << 20;

/// A tensor to be written: its name, type and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DType,
    /// ggml order (`ne[0]` innermost); `n_dims` written is `ne.len()` like the Python writer.
    pub ne: Vec<u64>,
}

impl TensorDesc {
    pub fn new(name: impl Into<String>, dtype: DType, ne: Vec<u64>) -> TensorDesc {
        TensorDesc { name: name.into(), dtype, ne }
    }
}

/// How to split the output into shards (gguf-py `split_max_tensors` / `split_max_size` /
/// `small_first_shard`; `convert_hf_to_gguf.py --split-max-tensors/--split-max-size/--no-tensor-first-split`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SplitPolicy {
    /// One file.
    #[default]
    None,
    /// At most this many tensors per shard (0 = no limit).
    MaxTensors(usize),
    /// At most this many (unpadded) tensor bytes per shard, except that a single tensor larger than
    /// the limit gets a shard of its own (0 = no limit).
    MaxBytes(u64),
    /// Both limits at once (0 = no limit), and optionally a leading metadata-only shard.
    Limits { max_tensors: usize, max_bytes: u64, small_first_shard: bool },
    /// The shards `llama-gguf-split --split` makes of the unsplit file (`tools/gguf-split/gguf-split.cpp`,
    /// `split_strategy`), for `sling quantize`, whose reference is llama-quantize + llama-gguf-split: at most
    /// `max_tensors` tensors (0 = no limit) or `max_bytes` bytes of tensor data *padded to 32* per shard (0 = no limit),
    /// and the split keys in the order ggml's `gguf_set_val` leaves them: `split.no`, `split.tensors.count`, then
    /// `split.count` (set last, moved to the end), after the given KVs (a given KV with one of those names is
    /// dropped from its place). One difference: where a single tensor is larger than `max_bytes`, llama-gguf-split
    /// aborts ("one of splits have 0 tensors"); here it gets a shard of its own.
    LlamaGgufSplit { max_tensors: usize, max_bytes: u64 },
}

impl SplitPolicy {
    /// `(max_tensors, max_bytes, small_first_shard)`, 0 meaning no limit.
    pub fn limits(self) -> (usize, u64, bool) {
        match self {
            SplitPolicy::None => (0, 0, false),
            SplitPolicy::MaxTensors(n) => (n, 0, false),
            SplitPolicy::MaxBytes(b) => (0, b, false),
            SplitPolicy::Limits { max_tensors, max_bytes, small_first_shard } => {
                (max_tensors, max_bytes, small_first_shard)
            }
            SplitPolicy::LlamaGgufSplit { max_tensors, max_bytes } => (max_tensors, max_bytes, false),
        }
    }

    /// The same limits, as llama-gguf-split lays the shards out ([`SplitPolicy::LlamaGgufSplit`]); `None` stays
    /// `None`. (A leading metadata-only shard is gguf-py's; llama-gguf-split's `--no-tensor-first-split` is not
    /// offered.)
    pub fn as_llama_gguf_split(self) -> SplitPolicy {
        match self {
            SplitPolicy::None => SplitPolicy::None,
            other => {
                let (max_tensors, max_bytes, _) = other.limits();
                SplitPolicy::LlamaGgufSplit { max_tensors, max_bytes }
            }
        }
    }

    /// Whether shards follow llama-gguf-split's layout rather than gguf-py's.
    pub fn is_llama_gguf_split(self) -> bool {
        matches!(self, SplitPolicy::LlamaGgufSplit { .. })
    }
}

/// A tensor with its place in its shard.
#[derive(Debug)]
struct Planned {
    desc: TensorDesc,
    ggml_id: u32,
    n_bytes: u64,
    offset: u64,
}

/// A finished output file, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFile {
    /// Final path.
    pub path: PathBuf,
    /// Bytes written.
    pub size: u64,
    /// SHA-256 of every byte written, lowercase hex.
    pub sha256: String,
}

/// A finished tensor, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenTensor {
    pub name: String,
    pub dtype: DType,
    pub ne: Vec<u64>,
    /// Index into [`Written::files`] of the shard holding it.
    pub file: usize,
    /// Absolute offset of its first data byte in that file.
    pub offset: u64,
    /// Data bytes (without padding).
    pub n_bytes: u64,
    /// SHA-256 of its data bytes (without padding), lowercase hex.
    pub sha256: String,
}

/// What [`GgufWriter::finish_hashed`] returns: every file and tensor with the hashes of the bytes that
/// were written, computed while writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub files: Vec<WrittenFile>,
    /// In file order (shard by shard, tensor by tensor).
    pub tensors: Vec<WrittenTensor>,
}

impl Written {
    /// The final paths, in shard order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// `dir/model.gguf` → `dir/model.gguf.partial`: the name an output file has until it is complete.
pub fn partial_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(PARTIAL_SUFFIX);
    final_path.with_file_name(name)
}

/// `dir/model.gguf` → `dir/model.gguf.partial.json`: the resume journal of a conversion to `out`
/// (one for all shards of a split output).
pub fn journal_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(JOURNAL_SUFFIX);
    out.with_file_name(name)
}

/// Crash safety and resume settings (see the module docs): the writer keeps a journal beside its
/// partial files, locked against a second writer of the same output.
#[derive(Clone, Debug)]
pub struct Resumable {
    /// Identifies everything that decides the output bytes (the caller's plan, options, sources and
    /// code version). A journal with another fingerprint is never resumed.
    pub fingerprint: String,
    /// Continue from the partial files if the journal matches; otherwise they are replaced.
    pub resume: bool,
    /// Least time between two journal commits (flush + fsync of the data, then journal lines
    /// appended and fsynced). Shards are committed as they complete whatever the interval.
    pub interval: Duration,
}

/// What [`GgufWriter::create_resumable`] reused from an earlier, interrupted run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Tensors re-checked (sha256) and kept: the first `tensors` of the plan.
    pub tensors: usize,
    /// Their data bytes.
    pub bytes: u64,
    /// Bytes of the partial files re-read to check them.
    pub bytes_checked: u64,
    /// Why nothing (or less than the journal lists) was reused, when resuming was asked for.
    pub note: Option<String>,
}

/// A writer that hashes (and counts) every byte that its file accepts, and starts the kernel's
/// writeback of what it wrote every [`WRITEBACK_STEP`] bytes.
#[derive(Debug)]
struct HashingWriter {
    inner: File,
    hasher: Sha256,
    n: u64,
    /// Off when no caller wants the hashes (`GgufWriter::create_with(.., false)`): hashing is a
    /// pass over every byte, a large share of a plain bf16 conversion's time.
    enabled: bool,
    writeback: Writeback,
}

impl HashingWriter {
    fn new(inner: File, hasher: Sha256, n: u64, enabled: bool) -> HashingWriter {
        HashingWriter { inner, hasher, n, enabled, writeback: Writeback::at(n) }
    }
}

/// Which byte ranges of a file being appended to should start writing back, and which are old enough to
/// be dropped from the page cache (see [`start_writeback`], [`drop_behind`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Writeback {
    /// Writeback has been started for every byte before this offset.
    kicked: u64,
    /// `kicked` one step earlier: bytes before it have been writing back for at least a step.
    kicked_before: u64,
    /// Bytes before this offset (from where the writer began) have been dropped from the page cache.
    dropped: u64,
}

impl Writeback {
    fn at(n: u64) -> Writeback {
        Writeback { kicked: n, kicked_before: n, dropped: n }
    }

    /// With `n` bytes written: once at least [`WRITEBACK_STEP`] bytes are new, the range to start
    /// writing back, and the range (possibly empty) whose writeback started two steps ago or earlier,
    /// to drop. Contiguous and without gaps whatever the size of each write.
    fn step(&mut self, n: u64) -> Option<(std::ops::Range<u64>, std::ops::Range<u64>)> {
        if n.saturating_sub(self.kicked) < WRITEBACK_STEP {
            return None;
        }
        let start = self.kicked..n;
        let drop = self.dropped..self.kicked_before.max(self.dropped);
        self.dropped = drop.end;
        self.kicked_before = self.kicked;
        self.kicked = n;
        Some((start, drop))
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.enabled {
            self.hasher.update(buf.get(..n).unwrap_or(buf));
        }
        self.n += n as u64;
        if let Some((start, drop)) = self.writeback.step(self.n) {
            start_writeback(&self.inner, start.start, start.end - start.start);
            if !drop.is_empty() {
                drop_behind(&self.inner, drop.start, drop.end - drop.start);
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Asks the kernel to start writing `len` bytes at `from` to disk now, without waiting: the output is
/// fsynced before it is renamed, and without this the whole file would still be dirty then (a 4 GB
/// bf16 output waited 1.5 s in that fsync). Writing back while the conversion runs overlaps the disk
/// with the computation. Advisory: errors are ignored (the fsync reports real ones).
#[cfg(target_os = "linux")]
fn start_writeback(f: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else { return };
    // SAFETY: sync_file_range takes a descriptor and plain integers and touches no memory of ours;
    // `f` is an open file for the whole call.
    let _ = unsafe { libc::sync_file_range(f.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

#[cfg(not(target_os = "linux"))]
fn drop_behind(_: &File, _: u64, _: u64) {}

/// Waits until `len` bytes at `from` (whose writeback started at least two steps earlier, so it is
/// normally done) are on disk, then drops them from the page cache. A conversion writes far more than it
/// will read again soon; left cached, its output fills memory and every later page the process
/// writes must first be reclaimed from that full cache, in its own system time. Measured on a 4 GB
/// model with the page cache full (2 cores): bf16 3.2 -> 2.5 s, q8_0 2.5-2.8 -> 1.6-1.7 s, system
/// time down 40-65 %. Dirty data stays bounded by three steps, so the final fsync is short. The cost:
/// reading the output right afterwards (llama.cpp, `sling verify`) comes from disk. The
/// `posix_fadvise(DONTNEED)` behind streaming writes is what `dd oflag=nocache` does.
#[cfg(target_os = "linux")]
fn drop_behind(f: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else { return };
    // SAFETY: both calls take a descriptor and plain integers and touch no memory of ours; `f` is an
    // open file for the whole block. Advisory: failures are ignored (the final fsync reports real
    // write errors).
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            from,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
        libc::posix_fadvise(f.as_raw_fd(), from, len, libc::POSIX_FADV_DONTNEED);
    }
}

type ShardWriter = BufWriter<HashingWriter>;

/// One output file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<Planned>,
    alignment: u64,
}

/// Streaming GGUF writer; see the module docs.
#[derive(Debug)]
pub struct GgufWriter {
    out: PathBuf,
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Shard being written (== `shards.len()` when all are done).
    shard_idx: usize,
    /// Tensor of the current shard being written.
    tensor_idx: usize,
    /// Bytes of that tensor written so far.
    written: u64,
    cur: Option<ShardWriter>,
    /// Absolute offset of the current shard's data section.
    cur_data_offset: u64,
    /// SHA-256 of the current tensor's data so far.
    tensor_hasher: Sha256,
    /// Whether file and tensor hashes are computed (see [`GgufWriter::create_with`]).
    hash: bool,
    /// Finished shards (their partial files are complete and fsynced): size, sha256.
    done: Vec<(u64, String)>,
    /// Finished tensors.
    tensors_done: Vec<WrittenTensor>,
    poisoned: bool,
    /// The resume journal, when the writer was created resumable.
    journal: Option<Journal>,
    /// Leave the partial files and the journal in place when dropped unfinished (to resume later).
    keep_partial: bool,
    /// Renamed into place: nothing to clean up.
    finished: bool,
    resumed: Resumed,
}

impl GgufWriter {
    /// Validates the KVs and tensor descriptors, plans the shards, creates the first partial file
    /// (`OUT.partial`) in the output's directory and writes its header, KVs and tensor infos.
    pub fn create(
        out: &Path,
        kvs: Vec<(String, GgufValue)>,
        tensors: Vec<TensorDesc>,
        split: SplitPolicy,
    ) -> Result<GgufWriter, GgufError> {
        Self::create_with(out, kvs, tensors, split, true)
    }

    /// [`create`](Self::create), choosing whether file and tensor sha256 are computed while writing
    /// (`hash = false`: [`finish_hashed`](Self::finish_hashed) then reports empty-input digests).
    pub fn create_with(
        out: &Path,
        kvs: Vec<(String, GgufValue)>,
        tensors: Vec<TensorDesc>,
        split: SplitPolicy,
        hash: bool,
    ) -> Result<GgufWriter, GgufError> {
        Self::create_resumable(out, kvs, tensors, split, hash, None)
    }

    /// [`create_with`](Self::create_with), and with `resumable` a journal (`OUT.partial.json`) that
    /// records each completed tensor (offsets and sha256) once its bytes are fsynced, and a lock that
    /// refuses a second writer of the same output. With `resumable.resume`, the partial files of an
    /// interrupted run with the same fingerprint are re-read and every journaled tensor re-hashed; the
    /// longest prefix that checks out is kept and writing continues after it ([`resumed`](Self::resumed)
    /// says how much). Anything else found under the partial names is replaced.
    pub fn create_resumable(
        out: &Path,
        kvs: Vec<(String, GgufValue)>,
        tensors: Vec<TensorDesc>,
        split: SplitPolicy,
        hash: bool,
        resumable: Option<Resumable>,
    ) -> Result<GgufWriter, GgufError> {
        let shards = plan_shards(out, kvs, tensors, split)?;
        let dir = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Nothing on disk is touched before the lock is held (a failure here must not remove another
        // writer's files).
        let journal = match &resumable {
            Some(r) => Some(Journal::open_locked(&journal_path(out), r.interval)?),
            None => None,
        };
        let mut w = GgufWriter {
            out: out.to_path_buf(),
            dir,
            shards,
            shard_idx: 0,
            tensor_idx: 0,
            written: 0,
            cur: None,
            cur_data_offset: 0,
            tensor_hasher: Sha256::new(),
            hash,
            done: Vec::new(),
            tensors_done: Vec::new(),
            poisoned: false,
            journal,
            keep_partial: false,
            finished: false,
            resumed: Resumed::default(),
        };
        // From here on, dropping `w` removes the partial files (unless asked to keep them).
        let fingerprint = resumable.as_ref().map(|r| r.fingerprint.clone()).unwrap_or_default();
        let resumed = match &resumable {
            Some(r) if r.resume => w.try_resume(&r.fingerprint)?,
            _ => false,
        };
        if !resumed {
            w.start_fresh(&fingerprint)?;
        }
        w.advance()?;
        Ok(w)
    }

    /// Final file names: `out` itself, or `{stem}-00001-of-0000N.gguf` ... next to it.
    pub fn output_paths(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// The names the outputs have while they are written (`NAME.partial`), and the journal's.
    pub fn partial_paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.shards.iter().map(|s| partial_path(&s.path)).collect();
        if let Some(j) = &self.journal {
            v.push(j.path().to_path_buf());
        }
        v
    }

    /// What was reused from an interrupted run (all zero unless resuming).
    pub fn resumed(&self) -> &Resumed {
        &self.resumed
    }

    /// The tensors completed so far (reused ones included), in file order.
    pub fn completed(&self) -> &[WrittenTensor] {
        &self.tensors_done
    }

    /// Keep the partial files and the journal when dropped unfinished, so that a later run can resume.
    pub fn keep_partial(&mut self, keep: bool) {
        self.keep_partial = keep;
    }

    /// The tensor that the next [`write_data`](Self::write_data) call appends to, and how many of its
    /// bytes are still missing; `None` once every tensor is complete.
    pub fn pending(&self) -> Option<(&str, u64)> {
        let t = self.shards.get(self.shard_idx)?.tensors.get(self.tensor_idx)?;
        Some((t.desc.name.as_str(), t.n_bytes.saturating_sub(self.written)))
    }

    /// Appends bytes to the current tensor. Tensors are filled strictly in descriptor order; a call may
    /// hold part of a tensor but never spans two: once a tensor's byte count is complete the writer
    /// pads it and moves on (opening the next shard when needed).
    pub fn write_data(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        if self.poisoned {
            return Err(GgufError::Poisoned { path: self.out.clone() });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let got = bytes.len() as u64;
        let Some(shard) = self.shards.get(self.shard_idx) else {
            return Err(GgufError::NoTensorLeft { path: self.out.clone(), got });
        };
        let Some(t) = shard.tensors.get(self.tensor_idx) else {
            return Err(GgufError::NoTensorLeft { path: self.out.clone(), got });
        };
        let remaining = t.n_bytes.saturating_sub(self.written);
        if got > remaining {
            return Err(GgufError::TooMuchData {
                path: shard.path.clone(),
                tensor: t.desc.name.clone(),
                got,
                remaining,
                n_bytes: t.n_bytes,
            });
        }
        let path = partial_path(&shard.path);
        let cur = self.cur.as_mut();
        let write = move || match cur {
            Some(f) => {
                let res = if bytes.len() >= DIRECT_WRITE_MIN {
                    f.flush().and_then(|()| f.get_mut().write_all(bytes))
                } else {
                    f.write_all(bytes)
                };
                res.map_err(|source| GgufError::Io { path, op: "write", source })
            }
            None => Err(GgufError::Poisoned { path }),
        };
        let hasher = &mut self.tensor_hasher;
        // The tensor's hash and the file's (computed as the buffer reaches the file) run side by side
        // for large pieces, so that hashing costs the writer one pass over the bytes, not two.
        let res = if !self.hash {
            write()
        } else if bytes.len() >= PARALLEL_HASH_MIN {
            std::thread::scope(|s| {
                s.spawn(|| hasher.update(bytes));
                write()
            })
        } else {
            hasher.update(bytes);
            write()
        };
        if let Err(e) = res {
            self.poisoned = true;
            return Err(e);
        }
        self.written += got;
        self.advance().inspect_err(|_| self.poisoned = true)
    }

    /// Checks that every tensor was fully written, then renames the (already padded, flushed and
    /// fsynced) partial files to their final names. Returns the final paths.
    pub fn finish(self) -> Result<Vec<PathBuf>, GgufError> {
        self.finish_hashed().map(|w| w.paths())
    }

    /// Like [`finish`](Self::finish), and returns the size and sha256 of every file and the place and
    /// sha256 of every tensor, all computed from the bytes as they were written (or, for tensors reused
    /// by a resumed run, as they were re-read and checked).
    pub fn finish_hashed(mut self) -> Result<Written, GgufError> {
        if self.poisoned {
            return Err(GgufError::Poisoned { path: self.out.clone() });
        }
        if let Some(shard) = self.shards.get(self.shard_idx) {
            let (tensor, n_bytes) = match shard.tensors.get(self.tensor_idx) {
                Some(t) => (t.desc.name.clone(), t.n_bytes),
                None => (String::new(), 0),
            };
            return Err(GgufError::IncompleteTensor {
                path: shard.path.clone(),
                tensor,
                written: self.written,
                n_bytes,
            });
        }
        let done = std::mem::take(&mut self.done);
        let mut persisted: Vec<WrittenFile> = Vec::with_capacity(done.len());
        for ((size, sha256), shard) in done.into_iter().zip(&self.shards) {
            if let Err(e) = std::fs::rename(partial_path(&shard.path), &shard.path) {
                // Leave nothing half-finished behind: undo the renames already done (the rest of the
                // partial files are removed when `self` is dropped).
                for f in &persisted {
                    let _ = std::fs::remove_file(&f.path);
                }
                return Err(GgufError::Io { path: shard.path.clone(), op: "rename", source: e });
            }
            persisted.push(WrittenFile { path: shard.path.clone(), size, sha256 });
        }
        // Make the renames durable. Some filesystems refuse fsync on directories; the data itself is
        // already synced, so a failure here is not an error.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.finished = true;
        if let Some(j) = self.journal.take() {
            j.remove();
        }
        Ok(Written { files: persisted, tensors: std::mem::take(&mut self.tensors_done) })
    }

    /// No resume: removes what an earlier run left under this output's partial names and starts the
    /// journal.
    fn start_fresh(&mut self, fingerprint: &str) -> Result<(), GgufError> {
        // The partial files of an earlier run of this output with other splits go too.
        let earlier: Vec<PathBuf> = match self.journal.as_mut().map(Journal::read) {
            Some(Ok((Some(h), _))) => h
                .files
                .into_iter()
                .filter(|n| Path::new(n).components().count() == 1 && n.ends_with(".gguf"))
                .map(|n| partial_path(&self.out.with_file_name(n)))
                .collect(),
            _ => Vec::new(),
        };
        for p in earlier {
            let _ = std::fs::remove_file(p);
        }
        for s in &self.shards {
            let p = partial_path(&s.path);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(GgufError::Io { path: p, op: "remove stale partial file", source: e });
                }
                _ => {}
            }
        }
        let header = self.journal_header(fingerprint);
        if let Some(j) = self.journal.as_mut() {
            j.rewrite(&header, &[])?;
        }
        Ok(())
    }

    fn journal_header(&self, fingerprint: &str) -> Header {
        Header::new(fingerprint, self.hash, self.shards.iter().map(|s| file_name(&s.path)).collect())
    }

    /// Tries to continue from the journal and partial files of an interrupted run. Returns whether
    /// the writer was set up to continue (possibly with nothing reused when only a header checked
    /// out); `false` means start over (the reason is in `self.resumed.note`).
    #[allow(clippy::needless_range_loop)] // `self` is updated inside the loop over its shards
    fn try_resume(&mut self, fingerprint: &str) -> Result<bool, GgufError> {
        let want = self.journal_header(fingerprint);
        let Some(j) = self.journal.as_mut() else { return Ok(false) };
        let journaled = match j.resumable(&want)? {
            Ok(entries) => entries,
            Err(note) => {
                self.resumed.note = Some(note);
                return Ok(false);
            }
        };

        // The journaled tensors that agree with this plan, in order.
        let flat: Vec<(usize, usize)> =
            self.shards.iter().enumerate().flat_map(|(s, sh)| (0..sh.tensors.len()).map(move |t| (s, t))).collect();
        let headers: Vec<Vec<u8>> = self.shards.iter().map(shard_header).collect();
        let mut entries: Vec<Entry> = Vec::new();
        for e in journaled {
            let i = entries.len();
            let Some(&(s, t)) = flat.get(i) else { break };
            let (shard, hdr) = (&self.shards[s], &headers[s]);
            let p = &shard.tensors[t];
            let offset = hdr.len() as u64 + p.offset;
            let end = offset + checked_align(p.n_bytes, shard.alignment).unwrap_or(p.n_bytes);
            if e.i != i
                || e.name != p.desc.name
                || e.file != s
                || e.offset != offset
                || e.n_bytes != p.n_bytes
                || e.end != end
            {
                break;
            }
            entries.push(e);
        }

        // Re-read the partial files: headers must be those this plan writes, tensors must hash as
        // journaled. Keep the longest prefix that checks out.
        let mut next = 0; // entries consumed
        let mut bytes_checked = 0u64;
        let mut reused_bytes = 0u64;
        for s in 0..self.shards.len() {
            let shard = &self.shards[s];
            let path = partial_path(&shard.path);
            let hdr = &headers[s];
            let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(_) => break,
            };
            let mut file_hasher = Sha256::new();
            let mut buf = vec![0u8; VERIFY_BUF];
            let mut head = vec![0u8; hdr.len()];
            if f.read_exact(&mut head).is_err() || head != *hdr {
                break;
            }
            file_hasher.update(&head);
            let mut pos = hdr.len() as u64;
            bytes_checked += pos;
            let mut in_shard = 0;
            while in_shard < shard.tensors.len() {
                let Some(e) = entries.get(next) else { break };
                let p = &shard.tensors[in_shard];
                // The file hash must end at the checked prefix: restored if this tensor fails.
                let before = file_hasher.clone();
                let mut th = Sha256::new();
                let ok = read_hashing(&mut f, p.n_bytes, &mut buf, |b| {
                    th.update(b);
                    file_hasher.update(b);
                })
                .is_ok()
                    && hex(&th.finalize()) == e.sha256;
                let pad = e.end - e.offset - p.n_bytes;
                let mut zeros = true;
                let ok = ok
                    && read_hashing(&mut f, pad, &mut buf, |b| {
                        zeros &= b.iter().all(|&x| x == 0);
                        file_hasher.update(b);
                    })
                    .is_ok()
                    && zeros;
                if !ok {
                    file_hasher = before;
                    break;
                }
                bytes_checked += e.end - pos;
                reused_bytes += p.n_bytes;
                pos = e.end;
                self.tensors_done.push(WrittenTensor {
                    name: p.desc.name.clone(),
                    dtype: p.desc.dtype,
                    ne: p.desc.ne.clone(),
                    file: s,
                    offset: e.offset,
                    n_bytes: p.n_bytes,
                    sha256: e.sha256.clone(),
                });
                in_shard += 1;
                next += 1;
            }
            let io = |op: &'static str| {
                let path = path.clone();
                move |source| GgufError::Io { path, op, source }
            };
            // Anything after the checked prefix goes (a tensor half written when the run stopped).
            f.set_len(pos).map_err(io("truncate"))?;
            if in_shard == shard.tensors.len() {
                f.sync_all().map_err(io("fsync"))?;
                self.done.push((pos, hex(&file_hasher.finalize())));
                self.shard_idx = s + 1;
                continue;
            }
            // The shard to continue: append after the checked prefix.
            f.seek(SeekFrom::Start(pos)).map_err(io("seek"))?;
            let hw = HashingWriter::new(f, file_hasher, pos, self.hash);
            self.cur = Some(BufWriter::with_capacity(BUF_CAPACITY, hw));
            self.cur_data_offset = hdr.len() as u64;
            self.shard_idx = s;
            self.tensor_idx = in_shard;
            break;
        }
        // Later shards' partial files (if any) are stale.
        for shard in self.shards.iter().skip(self.shard_idx + 1) {
            let _ = std::fs::remove_file(partial_path(&shard.path));
        }
        if self.cur.is_none() && self.shard_idx < self.shards.len() {
            let _ = std::fs::remove_file(partial_path(&self.shards[self.shard_idx].path));
        }
        let kept = self.tensors_done.len();
        let listed = entries.len();
        self.resumed.tensors = kept;
        self.resumed.bytes = reused_bytes;
        self.resumed.bytes_checked = bytes_checked;
        if kept < listed {
            self.resumed.note = Some(format!(
                "{} of the {listed} journaled tensors checked out; {} are written again",
                kept,
                listed - kept
            ));
        } else if listed == 0 {
            self.resumed.note = Some("the interrupted run had not completed a tensor; starting over".into());
        }
        // The journal now lists exactly what was kept.
        if let Some(j) = self.journal.as_mut() {
            j.rewrite(&want, &entries[..kept])?;
        }
        Ok(true)
    }

    /// Appends the completed tensor to the journal's pending lines.
    fn journal_tensor(&mut self, end: u64) {
        let (Some(j), Some(t)) = (self.journal.as_mut(), self.tensors_done.last()) else { return };
        if !self.hash {
            return;
        }
        j.push(Entry {
            i: self.tensors_done.len() - 1,
            name: t.name.clone(),
            file: t.file,
            offset: t.offset,
            n_bytes: t.n_bytes,
            end,
            sha256: t.sha256.clone(),
        });
    }

    /// Makes the pending journal lines durable when the interval has passed (or `force`): the data
    /// is flushed and fsynced first, so the journal never lists bytes that are not on disk.
    fn commit(&mut self, force: bool) -> Result<(), GgufError> {
        let Some(j) = self.journal.as_mut() else { return Ok(()) };
        if !j.due(force) {
            return Ok(());
        }
        let (cur, shard) = (self.cur.as_mut(), self.shards.get(self.shard_idx));
        j.commit(|| {
            if let (Some(f), Some(shard)) = (cur, shard) {
                let path = partial_path(&shard.path);
                f.flush().map_err(|source| GgufError::Io { path: path.clone(), op: "write", source })?;
                f.get_ref().inner.sync_data().map_err(|source| GgufError::Io { path, op: "fsync", source })?;
            }
            Ok(())
        })
    }

    /// Moves past complete tensors and shards: pads finished tensors, finishes (flush + fsync) shards
    /// whose tensors are all written, and opens the next shard. Afterwards either every shard is done
    /// or the current tensor still needs bytes.
    fn advance(&mut self) -> Result<(), GgufError> {
        loop {
            let Some(shard) = self.shards.get(self.shard_idx) else { return Ok(()) };
            if self.cur.is_none() {
                let (f, data_offset) = open_shard(shard, self.hash)?;
                self.cur = Some(f);
                self.cur_data_offset = data_offset;
                self.tensor_idx = 0;
                self.written = 0;
                self.tensor_hasher = Sha256::new();
            }
            let io = |op: &'static str| {
                let path = partial_path(&shard.path);
                move |source| GgufError::Io { path, op, source }
            };
            match shard.tensors.get(self.tensor_idx) {
                Some(t) if self.written < t.n_bytes => return Ok(()),
                Some(t) => {
                    let padded = checked_align(t.n_bytes, shard.alignment).unwrap_or(t.n_bytes);
                    if let Some(f) = self.cur.as_mut() {
                        write_zeros(f, padded - t.n_bytes).map_err(io("write"))?;
                    }
                    let digest = std::mem::replace(&mut self.tensor_hasher, Sha256::new()).finalize();
                    let offset = self.cur_data_offset.saturating_add(t.offset);
                    self.tensors_done.push(WrittenTensor {
                        name: t.desc.name.clone(),
                        dtype: t.desc.dtype,
                        ne: t.desc.ne.clone(),
                        file: self.shard_idx,
                        offset,
                        n_bytes: t.n_bytes,
                        sha256: hex(&digest),
                    });
                    self.tensor_idx += 1;
                    self.written = 0;
                    self.journal_tensor(offset + padded);
                    self.commit(false)?;
                }
                None => {
                    // Flushed in place first: if that fails (disk full), the writer still holds the
                    // file, so that a kept partial can be journaled up to what reached it.
                    if let Some(f) = self.cur.as_mut() {
                        f.flush().map_err(io("write"))?;
                    }
                    if let Some(f) = self.cur.take() {
                        let (hw, _) = f.into_parts();
                        hw.inner.sync_all().map_err(io("fsync"))?;
                        self.done.push((hw.n, hex(&hw.hasher.finalize())));
                    }
                    self.shard_idx += 1;
                    self.tensor_idx = 0;
                    self.written = 0;
                    self.commit(true)?;
                }
            }
        }
    }
}

impl Drop for GgufWriter {
    /// An unfinished writer removes its partial files and journal, unless told to keep them.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.keep_partial {
            // Make what was written durable for a later resume and journal the tensors that made it
            // to disk (best effort: after a failed write, e.g. a full disk, only those whose bytes
            // are all in the file are listed).
            let mut on_disk = None;
            if let Some(mut f) = self.cur.take() {
                let _ = f.flush();
                let (hw, _) = f.into_parts();
                if hw.inner.sync_data().is_ok() {
                    on_disk = hw.inner.metadata().ok().map(|m| m.len());
                }
            }
            let cur_shard = self.shard_idx;
            if let Some(j) = self.journal.as_mut() {
                let pending = j.pending_mut();
                let keep =
                    pending.iter().take_while(|e| e.file < cur_shard || on_disk.is_some_and(|n| e.end <= n)).count();
                pending.truncate(keep);
                let _ = j.commit(|| Ok::<(), GgufError>(()));
            }
            return;
        }
        if let Some(f) = self.cur.take() {
            // Dropping the buffer would flush it; nothing is kept, so skip the write.
            let (hw, _) = f.into_parts();
            drop(hw);
        }
        for s in &self.shards {
            let _ = std::fs::remove_file(partial_path(&s.path));
        }
        if let Some(j) = self.journal.take() {
            j.remove();
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Reads exactly `n` bytes in pieces, passing each to `f`.
fn read_hashing(r: &mut impl Read, mut n: u64, buf: &mut [u8], mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        let piece = buf.get_mut(..k).unwrap_or_default();
        r.read_exact(piece)?;
        f(piece);
        n -= k as u64;
    }
    Ok(())
}

/// Validates the KVs and tensor descriptors and assigns tensors to shards
/// (`GGUFWriter.add_tensor_info`).
fn plan_shards(
    out: &Path,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<TensorDesc>,
    split: SplitPolicy,
) -> Result<Vec<Shard>, GgufError> {
    let p = || out.to_path_buf();

    // ---- KVs ----
    let mut seen = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for (i, (key, value)) in kvs.iter().enumerate() {
        if key.is_empty() {
            return Err(GgufError::EmptyKey { path: p(), index: i as u64 });
        }
        if !seen.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey { path: p(), key: key.clone() });
        }
        check_value(out, key, value)?;
        if key == ALIGNMENT_KEY {
            match value {
                GgufValue::U32(a) if *a != 0 && a.is_power_of_two() => alignment = u64::from(*a),
                GgufValue::U32(a) => return Err(GgufError::BadAlignment { path: p(), alignment: u64::from(*a) }),
                other => return Err(GgufError::AlignmentType { path: p(), found: other.value_type() }),
            }
        }
    }

    // ---- tensors ----
    let mut names = HashSet::new();
    let mut planned = Vec::with_capacity(tensors.len());
    for (i, desc) in tensors.into_iter().enumerate() {
        if desc.name.len() > MAX_NAME_LEN {
            return Err(GgufError::TensorNameTooLong {
                path: p(),
                index: i as u64,
                len: desc.name.len() as u64,
                name: desc.name,
            });
        }
        if !names.insert(desc.name.clone()) {
            return Err(GgufError::DuplicateTensor { path: p(), tensor: desc.name });
        }
        let Some(ggml_id) = desc.dtype.info().ggml_id else {
            return Err(GgufError::NotAGgufType { path: p(), tensor: desc.name, dtype: desc.dtype });
        };
        let n_bytes = tensor_size(out, &desc.name, desc.dtype, &desc.ne)?;
        planned.push(Planned { desc, ggml_id, n_bytes, offset: 0 });
    }

    // ---- split plan (GGUFWriter.add_tensor_info) ----
    let (max_tensors, max_bytes, small_first_shard) = split.limits();
    let mut groups: Vec<Vec<Planned>> = vec![Vec::new()];
    if small_first_shard {
        groups.push(Vec::new());
    }
    let llama = split.is_llama_gguf_split();
    let mut last_bytes: u64 = 0;
    for t in planned {
        // gguf-py counts a tensor's bytes as they are; llama-gguf-split as GGML_PAD(ggml_nbytes, 32).
        let counted = if llama { checked_align(t.n_bytes, DEFAULT_ALIGNMENT).unwrap_or(u64::MAX) } else { t.n_bytes };
        let start_new = match groups.last() {
            Some(last) if !last.is_empty() => {
                (max_tensors != 0 && last.len() >= max_tensors)
                    || (max_bytes != 0 && last_bytes.saturating_add(counted) > max_bytes)
            }
            _ => false,
        };
        if start_new {
            groups.push(Vec::new());
            last_bytes = 0;
        }
        last_bytes = last_bytes.saturating_add(counted);
        if let Some(last) = groups.last_mut() {
            last.push(t);
        }
    }
    let n_shards = groups.len();
    let n_tensors_total: usize = groups.iter().map(Vec::len).sum();
    if n_shards > 1 && (n_shards > usize::from(u16::MAX) || n_tensors_total > i32::MAX as usize) {
        return Err(GgufError::TooManyShards { path: p(), shards: n_shards, tensors: n_tensors_total });
    }
    let paths = shard_paths(out, n_shards);

    // ---- shards ----
    let mut shards = Vec::with_capacity(n_shards);
    let mut first_kvs = Some(kvs);
    for (i, (mut tensors, path)) in groups.into_iter().zip(paths).enumerate() {
        let mut shard_kvs = if i == 0 { first_kvs.take().unwrap_or_default() } else { Vec::new() };
        // Shards after the first do not carry general.alignment, so they use the default.
        let shard_alignment = if i == 0 { alignment } else { DEFAULT_ALIGNMENT };
        if n_shards > 1 {
            // Both fit: checked against u16::MAX / i32::MAX above.
            let no = (SPLIT_NO, GgufValue::U16(u16::try_from(i).unwrap_or(u16::MAX)));
            let count = (SPLIT_COUNT, GgufValue::U16(u16::try_from(n_shards).unwrap_or(u16::MAX)));
            let tensors_count =
                (SPLIT_TENSORS_COUNT, GgufValue::I32(i32::try_from(n_tensors_total).unwrap_or(i32::MAX)));
            if llama {
                // gguf_set_val appends a new key and moves an overwritten one to the end; split.count is set last.
                shard_kvs.retain(|(k, _)| k != SPLIT_NO && k != SPLIT_COUNT && k != SPLIT_TENSORS_COUNT);
                shard_kvs.extend([no, tensors_count, count].map(|(k, v)| (k.to_string(), v)));
            } else {
                // gguf-py's dict: a key given again keeps its place.
                for (key, value) in [no, count, tensors_count] {
                    match shard_kvs.iter_mut().find(|(k, _)| k == key) {
                        Some(slot) => slot.1 = value,
                        None => shard_kvs.push((key.to_string(), value)),
                    }
                }
            }
        }
        let mut offset: u64 = 0;
        for t in &mut tensors {
            t.offset = offset;
            let padded = checked_align(t.n_bytes, shard_alignment);
            offset = padded.and_then(|x| offset.checked_add(x)).ok_or_else(|| GgufError::ShapeOverflow {
                path: path.clone(),
                tensor: t.desc.name.clone(),
                ne: t.desc.ne.clone(),
            })?;
        }
        shards.push(Shard { path, kvs: shard_kvs, tensors, alignment: shard_alignment });
    }
    Ok(shards)
}

/// The files a writer with these arguments would write and their exact sizes, without writing
/// anything (what `sling plan` reports as the disk size).
pub fn planned_files(
    out: &Path,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<TensorDesc>,
    split: SplitPolicy,
) -> Result<Vec<(PathBuf, u64)>, GgufError> {
    let shards = plan_shards(out, kvs, tensors, split)?;
    Ok(shards
        .iter()
        .map(|s| {
            let data: u64 = s.tensors.iter().map(|t| checked_align(t.n_bytes, s.alignment).unwrap_or(t.n_bytes)).sum();
            (s.path.clone(), shard_header(s).len() as u64 + data)
        })
        .collect())
}

/// Final shard names (`GGUFWriter.format_shard_names`).
fn shard_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n <= 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().map(|s| s.to_os_string()).unwrap_or_default();
    (1..=n)
        .map(|i| {
            let mut name = OsString::from(&stem);
            name.push(format!("-{i:05}-of-{n:05}.gguf"));
            out.with_file_name(name)
        })
        .collect()
}

/// A shard's header, KVs, tensor infos and the padding after them: everything before its data.
fn shard_header(shard: &Shard) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(shard.tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(shard.kvs.len() as u64).to_le_bytes());
    for (key, value) in &shard.kvs {
        put_string(&mut h, key);
        h.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        put_value(&mut h, value);
    }
    for t in &shard.tensors {
        put_string(&mut h, &t.desc.name);
        h.extend_from_slice(&(t.desc.ne.len() as u32).to_le_bytes());
        for d in &t.desc.ne {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.ggml_id.to_le_bytes());
        h.extend_from_slice(&t.offset.to_le_bytes());
    }
    let len = h.len() as u64;
    let pad = checked_align(len, shard.alignment).map_or(0, |a| a - len);
    h.resize(h.len() + pad as usize, 0);
    h
}

/// Creates (or truncates) the shard's partial file and writes its header, KVs, tensor infos and the
/// padding after them. Returns the writer and the absolute offset of the data section.
fn open_shard(shard: &Shard, hash: bool) -> Result<(ShardWriter, u64), GgufError> {
    let path = partial_path(&shard.path);
    let io = |op: &'static str| {
        let path = path.clone();
        move |source| GgufError::Io { path, op, source }
    };
    // The usual 0o666 & !umask (what `open(path, "wb")` gives gguf-py).
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(&path).map_err(io("create"))?;
    let h = shard_header(shard);
    let mut f = BufWriter::with_capacity(BUF_CAPACITY, HashingWriter::new(file, Sha256::new(), 0, hash));
    f.write_all(&h).map_err(io("write"))?;
    Ok((f, h.len() as u64))
}

fn write_zeros(f: &mut impl Write, mut n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        f.write_all(ZEROS.get(..k).unwrap_or(&ZEROS))?;
        n -= k as u64;
    }
    Ok(())
}

/// Refuses values the C reader would refuse: nested arrays and arrays with mixed element types.
/// (Empty arrays are written as given; gguf-py refuses to write them, the C reader accepts them.)
fn check_value(path: &Path, key: &str, value: &GgufValue) -> Result<(), GgufError> {
    let GgufValue::Array(elem, items) = value else { return Ok(()) };
    if *elem == ValueType::Array {
        return Err(GgufError::NestedArray { path: path.to_path_buf(), key: key.to_string() });
    }
    for (index, item) in items.iter().enumerate() {
        let found = item.value_type();
        if found == ValueType::Array {
            return Err(GgufError::NestedArray { path: path.to_path_buf(), key: key.to_string() });
        }
        if found != *elem {
            return Err(GgufError::ArrayElementType {
                path: path.to_path_buf(),
                key: key.to_string(),
                expected: *elem,
                found,
                index,
            });
        }
    }
    Ok(())
}

fn put_string(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

/// The value without its type id (`GGUFWriter._pack_val(..., add_vtype=False)`).
fn put_value(h: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => h.push(*x),
        GgufValue::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => h.push(u8::from(*x)),
        GgufValue::String(s) => put_string(h, s),
        GgufValue::Array(elem, items) => {
            h.extend_from_slice(&(*elem as u32).to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(h, item);
            }
        }
        GgufValue::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the write sizes: writeback starts on contiguous ranges from where the writer began, each
        /// at least a step long; the dropped ranges are contiguous too, and cover exactly what started writing
        /// back two steps (or more) before.
        #[test]
        fn writeback_ranges_are_contiguous_and_drop_two_steps_behind(
            start in 0u64..1000,
            writes in proptest::collection::vec(0u64..3 * WRITEBACK_STEP, 0..60),
        ) {
            let mut wb = Writeback::at(start);
            let (mut n, mut kicked, mut dropped) = (start, start, start);
            let mut kicks: Vec<u64> = vec![start];
            for w in writes {
                n += w;
                if let Some((k, d)) = wb.step(n) {
                    prop_assert_eq!(k.start, kicked);
                    prop_assert!(k.end - k.start >= WRITEBACK_STEP);
                    prop_assert_eq!(d.start, dropped);
                    kicked = k.end;
                    dropped = d.end;
                    kicks.push(k.end);
                    // Dropped: everything that started writing back before the previous step's start.
                    let two_back = kicks.len().checked_sub(3).map_or(start, |i| kicks[i]);
                    prop_assert_eq!(dropped, two_back);
                } else {
                    prop_assert!(n - kicked < WRITEBACK_STEP);
                }
            }
        }
    }

    #[test]
    fn shard_names_follow_gguf_py() {
        // `Path.stem` drops only the last extension, like Rust's `file_stem`.
        assert_eq!(shard_paths(Path::new("/o/model.gguf"), 1), vec![PathBuf::from("/o/model.gguf")]);
        assert_eq!(
            shard_paths(Path::new("/o/m.Q8_0.gguf"), 2),
            vec![PathBuf::from("/o/m.Q8_0-00001-of-00002.gguf"), PathBuf::from("/o/m.Q8_0-00002-of-00002.gguf")]
        );
        assert_eq!(shard_paths(Path::new("model"), 2)[1], PathBuf::from("model-00002-of-00002.gguf"));
    }

    #[test]
    fn llama_gguf_split_layout() {
        // Tensors of 40, 40, 20 and 8 bytes: padded to 32 they count 64, 64, 32, 32.
        let tensors = || {
            [("a", 10), ("b", 10), ("c", 5), ("d", 2)].map(|(n, e)| TensorDesc::new(n, DType::F32, vec![e])).to_vec()
        };
        let kvs = || {
            vec![
                ("general.architecture".to_string(), GgufValue::String("llama".into())),
                (SPLIT_COUNT.to_string(), GgufValue::U16(9)),
                ("general.name".to_string(), GgufValue::String("m".into())),
            ]
        };
        fn keys(s: &Shard) -> Vec<&str> {
            s.kvs.iter().map(|(k, _)| k.as_str()).collect()
        }
        let sizes = |sh: &[Shard]| sh.iter().map(|s| s.tensors.len()).collect::<Vec<_>>();
        let out = Path::new("m.gguf");
        // 100 bytes: gguf-py counts 40 + 40 + 20 = 100 into one shard, llama-gguf-split 64 + 64 > 100.
        let py = plan_shards(out, kvs(), tensors(), SplitPolicy::MaxBytes(100)).unwrap();
        assert_eq!(sizes(&py), [3, 1]);
        let ll = plan_shards(out, kvs(), tensors(), SplitPolicy::MaxBytes(100).as_llama_gguf_split()).unwrap();
        assert_eq!(sizes(&ll), [1, 2, 1]);
        // gguf-py: a given split key keeps its place; llama-gguf-split: split.no, split.tensors.count, split.count last
        assert_eq!(keys(&py[0]), ["general.architecture", SPLIT_COUNT, "general.name", SPLIT_NO, SPLIT_TENSORS_COUNT]);
        assert_eq!(keys(&ll[0]), ["general.architecture", "general.name", SPLIT_NO, SPLIT_TENSORS_COUNT, SPLIT_COUNT]);
        assert_eq!(keys(&ll[2]), [SPLIT_NO, SPLIT_TENSORS_COUNT, SPLIT_COUNT]);
        assert_eq!(ll[0].kvs[4].1, GgufValue::U16(3));
        // By tensor count both agree on the shards; a tensor over the size limit gets its own shard.
        let t = SplitPolicy::MaxTensors(3).as_llama_gguf_split();
        assert_eq!(t, SplitPolicy::LlamaGgufSplit { max_tensors: 3, max_bytes: 0 });
        assert_eq!(sizes(&plan_shards(out, kvs(), tensors(), t).unwrap()), [3, 1]);
        let big = SplitPolicy::LlamaGgufSplit { max_tensors: 0, max_bytes: 50 };
        assert_eq!(sizes(&plan_shards(out, kvs(), tensors(), big).unwrap()), [1, 1, 1, 1]);
        assert_eq!(SplitPolicy::None.as_llama_gguf_split(), SplitPolicy::None);
    }

    #[test]
    fn hashes_are_those_of_the_bytes_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("h.gguf");
        let tensors = vec![
            TensorDesc::new("a", DType::F32, vec![3]),
            TensorDesc::new("b", DType::F16, vec![5, 2]),
            TensorDesc::new("c", DType::F32, vec![0]),
            TensorDesc::new("d", DType::F32, vec![1]),
            // Large enough for the parallel tensor hash.
            TensorDesc::new("e", DType::F32, vec![PARALLEL_HASH_MIN as u64 / 2 + 3]),
        ];
        let kvs = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
        let mut w = GgufWriter::create(&out, kvs, tensors, SplitPolicy::MaxTensors(2)).unwrap();
        let big: Vec<u8> = (0..(PARALLEL_HASH_MIN * 2 + 12)).map(|i| (i * 31 % 253) as u8).collect();
        let data: Vec<Vec<u8>> = vec![(0..12).collect(), (100..120).collect(), vec![], vec![7, 7, 7, 7], big];
        for bytes in &data {
            // Two pieces of the big tensor are at least PARALLEL_HASH_MIN bytes.
            let (first, rest) = bytes.split_at(bytes.len() / 2);
            w.write_data(first).unwrap();
            w.write_data(rest).unwrap();
        }
        let written = w.finish_hashed().unwrap();
        assert_eq!(written.files.len(), 3);
        for f in &written.files {
            let on_disk = std::fs::read(&f.path).unwrap();
            assert_eq!(f.size, on_disk.len() as u64);
            assert_eq!(f.sha256, hex(&Sha256::digest(&on_disk)));
        }
        let names: Vec<&str> = written.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        for (t, bytes) in written.tensors.iter().zip(&data) {
            let file = std::fs::read(&written.files[t.file].path).unwrap();
            let start = t.offset as usize;
            assert_eq!(&file[start..start + t.n_bytes as usize], bytes.as_slice(), "{}", t.name);
            assert_eq!(t.sha256, hex(&Sha256::digest(bytes)));
            let g = super::super::GgufFile::open(&written.files[t.file].path).unwrap();
            let info = g.tensor(&t.name).unwrap();
            assert_eq!(g.data_offset + info.offset, t.offset);
        }
        assert_eq!(written.tensors[2].file, 1);
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }

    #[test]
    fn a_kept_partial_resumes_to_the_same_bytes_and_hashes() {
        let d = tempfile::tempdir().unwrap();
        let tensors: Vec<TensorDesc> =
            (0..9).map(|i| TensorDesc::new(format!("t{i}"), DType::F32, vec![5 + i as u64, 3])).collect();
        let data: Vec<Vec<u8>> =
            tensors.iter().map(|t| (0..t.ne[0] * 12).map(|b| (b * 7 + t.ne[0]) as u8).collect()).collect();
        let kvs = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
        let r = |resume| Resumable { fingerprint: "fp".into(), resume, interval: Duration::ZERO };
        let make = |out: &Path, resume| {
            GgufWriter::create_resumable(
                out,
                kvs.clone(),
                tensors.clone(),
                SplitPolicy::MaxTensors(4),
                true,
                Some(r(resume)),
            )
            .unwrap()
        };
        let direct = {
            let mut w = make(&d.path().join("a.gguf"), false);
            data.iter().for_each(|b| w.write_data(b).unwrap());
            w.finish_hashed().unwrap()
        };
        for stop in [0, 1, 4, 6, 9] {
            let out = d.path().join(format!("b{stop}.gguf"));
            let mut w = make(&out, false);
            data[..stop].iter().for_each(|b| w.write_data(b).unwrap());
            w.keep_partial(true);
            drop(w);
            assert!(journal_path(&out).exists());
            let mut w = make(&out, true);
            assert_eq!(w.resumed().tensors, stop, "{:?}", w.resumed());
            data[stop..].iter().for_each(|b| w.write_data(b).unwrap());
            let got = w.finish_hashed().unwrap();
            assert!(!journal_path(&out).exists());
            assert_eq!(
                got.tensors.iter().map(|t| &t.sha256).collect::<Vec<_>>(),
                direct.tensors.iter().map(|t| &t.sha256).collect::<Vec<_>>()
            );
            for (g, a) in got.files.iter().zip(&direct.files) {
                assert_eq!((g.size, &g.sha256), (a.size, &a.sha256));
                assert_eq!(std::fs::read(&g.path).unwrap(), std::fs::read(&a.path).unwrap());
                assert_eq!(g.sha256, hex(&Sha256::digest(std::fs::read(&g.path).unwrap())));
            }
        }
        // Another fingerprint: nothing is reused.
        let out = d.path().join("c.gguf");
        let mut w = make(&out, false);
        data[..5].iter().for_each(|b| w.write_data(b).unwrap());
        w.keep_partial(true);
        drop(w);
        let other = Resumable { fingerprint: "other".into(), resume: true, interval: Duration::ZERO };
        let w = GgufWriter::create_resumable(
            &out,
            kvs.clone(),
            tensors.clone(),
            SplitPolicy::MaxTensors(4),
            true,
            Some(other),
        )
        .unwrap();
        assert_eq!(w.resumed().tensors, 0);
        assert!(w.resumed().note.as_deref().unwrap_or("").contains("nothing to resume"));
        drop(w);
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('c'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn values_encode_like_pack_val() {
        let mut h = Vec::new();
        put_value(&mut h, &GgufValue::strings(["ab"]));
        assert_eq!(h, [8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
        h.clear();
        put_value(&mut h, &GgufValue::Bool(true));
        put_value(&mut h, &GgufValue::I16(-2));
        assert_eq!(h, [1, 0xfe, 0xff]);
    }
}
