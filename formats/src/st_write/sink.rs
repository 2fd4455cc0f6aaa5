//! Writing a shard set whose tensors are produced in any order: every file is created at its final size with
//! its header (the layout of [`super::layout`], byte-identical to the `safetensors` writer's),
//! and each tensor's bytes are appended at its own place (`pwrite`), so a weight's parts — packed values,
//! scales, zero points, which that writer's order scatters across a shard (dtype descending, then name) — are
//! written as the weight is computed, without holding a shard in memory.
//!
//! Each tensor's sha256 is computed as its bytes arrive (they arrive in order within a tensor); a file's
//! sha256 is computed at [`Sink::finish`] by reading it back once, after it is synced.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::ShardLayout;
use crate::gguf::write::hex;
use crate::journal::Entry;
use sha2::{Digest, Sha256};

/// An I/O error on the output, naming the file and the operation.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot {op} {path}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    #[error("tensor {tensor}: {why}")]
    Order { tensor: String, why: String },
}

struct Place {
    name: String,
    file: usize,
    /// Absolute offset of the first data byte.
    start: u64,
    len: u64,
    written: u64,
    hasher: Sha256,
}

/// What was written: each file (name, size, sha256) and each tensor (name, file name, absolute offset, bytes,
/// sha256), tensors in file order.
#[derive(Clone, Debug, Default)]
pub struct SinkWritten {
    pub files: Vec<(String, u64, String)>,
    pub tensors: Vec<(String, String, u64, u64, String)>,
}

/// A shard set being written; see the module docs.
pub struct Sink {
    dir: PathBuf,
    files: Vec<(String, File)>,
    places: Vec<Place>,
    index: HashMap<String, usize>,
}

impl Sink {
    /// Creates every shard of `layout` in `dir` (which must exist) at its full size, header written.
    pub fn create(dir: &Path, layout: &ShardLayout) -> Result<Sink, SinkError> {
        Sink::open(dir, layout, |path, shard| {
            let io = |op| move |source| SinkError::Io { path: path.to_path_buf(), op, source };
            let f = File::options().read(true).write(true).create_new(true).open(path).map_err(io("create"))?;
            f.set_len(shard.file_size()).map_err(io("size"))?;
            std::os::unix::fs::FileExt::write_all_at(&f, &shard.header, 0).map_err(io("write"))?;
            Ok(f)
        })
    }

    /// Opens each shard of `layout` in `dir` with `open_file` and lays out the places of its tensors.
    fn open(
        dir: &Path,
        layout: &ShardLayout,
        open_file: impl Fn(&Path, &super::Shard) -> Result<File, SinkError>,
    ) -> Result<Sink, SinkError> {
        let mut files = Vec::new();
        let mut places = Vec::new();
        let mut index = HashMap::new();
        for (fi, shard) in layout.shards.iter().enumerate() {
            let f = open_file(&dir.join(&shard.file_name), shard)?;
            let mut at = shard.data_start();
            for t in &shard.tensors {
                let len = t.n_bytes();
                index.insert(t.name.clone(), places.len());
                places.push(Place {
                    name: t.name.clone(),
                    file: fi,
                    start: at,
                    len,
                    written: 0,
                    hasher: Sha256::new(),
                });
                at += len;
            }
            files.push((shard.file_name.clone(), f));
        }
        Ok(Sink { dir: dir.to_path_buf(), files, places, index })
    }

    /// Reopens the shard set an interrupted run left in `dir` (every file at its full size, its header the
    /// layout's), every tensor taken as not yet written: [`check`](Self::check) takes back the complete ones.
    pub fn reopen(dir: &Path, layout: &ShardLayout) -> Result<Sink, SinkError> {
        Sink::open(dir, layout, |path, shard| {
            let io = |op| move |source| SinkError::Io { path: path.to_path_buf(), op, source };
            let f = File::options().read(true).write(true).open(path).map_err(io("reopen"))?;
            let len = f.metadata().map_err(io("reopen"))?.len();
            let mut header = vec![0u8; shard.header.len()];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0).map_err(io("read back"))?;
            if len != shard.file_size() || header != shard.header {
                return Err(SinkError::Order {
                    tensor: shard.file_name.clone(),
                    why: "the interrupted run's file does not have this plan's layout".into(),
                });
            }
            Ok(f)
        })
    }

    /// Takes tensor `idx` back from a reopened shard set when the journal entry `e` places it where this layout
    /// does and its bytes, read back, hash as `e` records: it then counts as written (its hash kept for
    /// [`finish`](Self::finish)) and `true` is returned; otherwise it stays unwritten.
    pub fn check(&mut self, idx: usize, e: &Entry) -> Result<bool, SinkError> {
        let p = &self.places[idx];
        if (e.file, e.offset, e.n_bytes) != (p.file, p.start, p.len) {
            return Ok(false);
        }
        let mut buf = vec![0u8; (1 << 20).min(p.len.max(1) as usize)];
        let p = &mut self.places[idx];
        let (fname, f) = &self.files[p.file];
        let mut h = Sha256::new();
        let mut off = 0;
        while off < p.len {
            let n = buf.len().min((p.len - off) as usize);
            std::os::unix::fs::FileExt::read_exact_at(f, &mut buf[..n], p.start + off)
                .map_err(|source| SinkError::Io { path: self.dir.join(fname), op: "read back", source })?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        if hex(&h.clone().finalize()) != e.sha256 {
            return Ok(false);
        }
        p.hasher = h;
        p.written = p.len;
        Ok(true)
    }

    /// Takes tensor `idx` as not written (its bytes are written again from the start).
    pub fn reset(&mut self, idx: usize) {
        let p = &mut self.places[idx];
        p.written = 0;
        p.hasher = Sha256::new();
    }

    /// The journal entry of tensor `idx` once all its bytes are written.
    pub fn entry(&self, idx: usize) -> Option<Entry> {
        let p = &self.places[idx];
        (p.written == p.len).then(|| Entry {
            i: idx,
            name: p.name.clone(),
            file: p.file,
            offset: p.start,
            n_bytes: p.len,
            end: p.start + p.len,
            sha256: hex(&p.hasher.clone().finalize()),
        })
    }

    /// Makes the bytes written so far durable (before a journal says they are there).
    pub fn sync(&self) -> Result<(), SinkError> {
        for (name, f) in &self.files {
            f.sync_data().map_err(|source| SinkError::Io { path: self.dir.join(name), op: "sync", source })?;
        }
        Ok(())
    }

    /// The place index of tensor `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Appends `bytes` to tensor `idx` (its next bytes, in order).
    pub fn append(&mut self, idx: usize, bytes: &[u8]) -> Result<(), SinkError> {
        let p = &mut self.places[idx];
        if p.written + bytes.len() as u64 > p.len {
            return Err(SinkError::Order {
                tensor: p.name.clone(),
                why: format!(
                    "{} bytes written past its {} bytes (internal error)",
                    p.written + bytes.len() as u64,
                    p.len
                ),
            });
        }
        let (fname, f) = &self.files[p.file];
        std::os::unix::fs::FileExt::write_all_at(f, bytes, p.start + p.written).map_err(|source| SinkError::Io {
            path: self.dir.join(fname),
            op: "write",
            source,
        })?;
        p.hasher.update(bytes);
        p.written += bytes.len() as u64;
        Ok(())
    }

    /// Checks that every tensor is complete, syncs every file and hashes it.
    pub fn finish(self) -> Result<SinkWritten, SinkError> {
        let mut out = SinkWritten::default();
        for p in &self.places {
            if p.written != p.len {
                return Err(SinkError::Order {
                    tensor: p.name.clone(),
                    why: format!("only {} of its {} bytes were written (internal error)", p.written, p.len),
                });
            }
        }
        for (name, f) in &self.files {
            let path = self.dir.join(name);
            let io = |op: &'static str| {
                let path = path.clone();
                move |source| SinkError::Io { path, op, source }
            };
            f.sync_all().map_err(io("sync"))?;
            let mut r = File::open(&path).map_err(io("read back"))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = r.read(&mut buf).map_err(io("read back"))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                size += n as u64;
            }
            out.files.push((name.clone(), size, hex(&h.finalize())));
        }
        for p in self.places {
            let file = self.files[p.file].0.clone();
            out.tensors.push((p.name, file, p.start, p.len, hex(&p.hasher.finalize())));
        }
        Ok(out)
    }
}
