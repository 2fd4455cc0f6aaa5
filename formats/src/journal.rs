//! The resume journal every writer of an output keeps: the GGUF file set (`model.gguf.partial.json`, beside
//! its `.partial` files) and the artifact directory of the other targets (`OUT.partial.json`, beside
//! `OUT.partial/`). One format, one lock, one rule:
//!
//! - JSON lines: a [`Header`] (the schema, the caller's fingerprint of everything that decides the bytes, the
//!   final file names), then one [`Entry`] per completed tensor: its file, offset, size and sha256.
//! - A line is appended only after the bytes it lists were made durable by the caller (`commit` takes the
//!   sync as an argument, so it cannot be forgotten), at most every interval and whenever the caller forces it.
//! - The journal file is the output's lock ([`crate::lock`]): held while the writer lives, so a second writer
//!   of the same output is refused.
//! - Resuming trusts nothing but hashes: a journaled tensor is reused only when its bytes, read back, hash to
//!   the recorded sha256. A torn last line (the process killed while appending) ends the entries.
//!
//! What is reused follows from the container's write order: the GGUF writer appends, so it keeps the longest
//! prefix that checks out; the shard set writes each tensor at its place, and keeps the longest prefix of
//! weights (each a group of tensors) that checks out.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lock::{LockError, OutputLock};

/// `schema` of the journal's first line.
pub const SCHEMA: &str = "sling.partial/1";

/// Why the journal could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot {op} the resume journal {path}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl JournalError {
    /// The path and operating-system error, for writers whose error type reports I/O by operation.
    pub fn into_io(self) -> (PathBuf, &'static str, std::io::Error) {
        match self {
            JournalError::Lock(e) => {
                let op = if matches!(e, LockError::Io { op: "create", .. }) { "create" } else { "lock" };
                let (path, source) = e.into_io();
                (path, op, source)
            }
            JournalError::Io { path, op, source } => (path, op, source),
        }
    }
}

/// The journal's first line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub schema: String,
    pub fingerprint: String,
    /// Whether entries (with hashes) follow; a writer that keeps no hashes cannot be resumed.
    pub hashes: bool,
    /// Final file names, in order ([`Entry::file`] indexes them).
    pub files: Vec<String>,
}

impl Header {
    pub fn new(fingerprint: &str, hashes: bool, files: Vec<String>) -> Header {
        Header { schema: SCHEMA.into(), fingerprint: fingerprint.into(), hashes, files }
    }

    /// Why a journal with this header cannot be resumed by a run whose header is `want`, if it cannot.
    pub fn why_not(&self, want: &Header) -> Option<String> {
        if self.schema != SCHEMA {
            Some(format!("journal of another format ({})", self.schema))
        } else if !self.hashes || !want.hashes {
            Some("the interrupted run kept no hashes (--no-manifest), so its bytes cannot be checked".into())
        } else if self.fingerprint != want.fingerprint || self.files != want.files {
            Some("the interrupted run had another source, plan, options or sling version".into())
        } else {
            None
        }
    }
}

/// One completed tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Index of the tensor in the writer's order.
    pub i: usize,
    pub name: String,
    /// File index ([`Header::files`]).
    pub file: usize,
    /// Absolute offset of its data.
    pub offset: u64,
    pub n_bytes: u64,
    /// Where its bytes and any padding after them end.
    pub end: u64,
    pub sha256: String,
}

/// The open, locked journal.
#[derive(Debug)]
pub struct Journal {
    lock: OutputLock,
    interval: Duration,
    last: Instant,
    /// Entries completed since the last commit.
    pending: Vec<Entry>,
}

impl Journal {
    /// Opens (creating it) and locks the journal at `path`; a second writer of the same output is refused.
    pub fn open_locked(path: &Path, interval: Duration) -> Result<Journal, JournalError> {
        Ok(Journal::with_lock(OutputLock::acquire(path)?, interval))
    }

    /// The journal in a lock file its caller already holds (taken before other work beside the output).
    pub fn with_lock(lock: OutputLock, interval: Duration) -> Journal {
        Journal { lock: lock.keep(), interval, last: Instant::now(), pending: Vec::new() }
    }

    pub fn path(&self) -> &Path {
        self.lock.path()
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
        let path = self.path().to_path_buf();
        move |source| JournalError::Io { path, op, source }
    }

    /// The header and the entries that follow it (up to the first line that is not one: a torn tail).
    pub fn read(&mut self) -> Result<(Option<Header>, Vec<Entry>), JournalError> {
        let mut raw = Vec::new();
        let mut f = self.lock.file();
        f.seek(SeekFrom::Start(0)).map_err(self.io("read"))?;
        f.read_to_end(&mut raw).map_err(self.io("read"))?;
        let text = String::from_utf8_lossy(&raw);
        let mut lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        let header = lines.next().and_then(|l| serde_json::from_str(l).ok());
        let entries = lines.map_while(|l| serde_json::from_str(l).ok()).collect();
        Ok((header, entries))
    }

    /// The entries of an interrupted run this run (whose header is `want`) may resume: the same plan, options,
    /// sources and files, with hashes. Otherwise why not, as the note a writer reports ("nothing to resume: …").
    pub fn resumable(&mut self, want: &Header) -> Result<Result<Vec<Entry>, String>, JournalError> {
        let (header, entries) = self.read()?;
        let why_not = match &header {
            None => Some("no journal of an interrupted run".to_string()),
            Some(h) => h.why_not(want),
        };
        Ok(match why_not {
            Some(why) => Err(format!("nothing to resume: {why}; starting over")),
            None => Ok(entries),
        })
    }

    /// Replaces the journal's content with `header` and `entries` (fsynced); pending entries are dropped.
    pub fn rewrite(&mut self, header: &Header, entries: &[Entry]) -> Result<(), JournalError> {
        let mut text = line(header);
        entries.iter().for_each(|e| text.push_str(&line(e)));
        let mut f = self.lock.file();
        f.set_len(0).map_err(self.io("truncate"))?;
        f.seek(SeekFrom::Start(0)).map_err(self.io("seek"))?;
        f.write_all(text.as_bytes()).map_err(self.io("write"))?;
        f.sync_data().map_err(self.io("fsync"))?;
        self.pending.clear();
        self.last = Instant::now();
        Ok(())
    }

    /// Records a completed tensor, to be appended at the next commit.
    pub fn push(&mut self, e: Entry) {
        self.pending.push(e);
    }

    /// Entries recorded and not yet committed.
    pub fn pending_mut(&mut self) -> &mut Vec<Entry> {
        &mut self.pending
    }

    /// Whether a commit is due: something is pending and the interval has passed (or `force`).
    pub fn due(&self, force: bool) -> bool {
        !self.pending.is_empty() && (force || self.last.elapsed() >= self.interval)
    }

    /// Makes the pending entries durable: `sync` first makes their bytes durable, then they are appended and
    /// fsynced, so the journal never lists bytes that are not on disk.
    pub fn commit<E: From<JournalError>>(&mut self, sync: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        if self.pending.is_empty() {
            return Ok(());
        }
        sync()?;
        let text: String = std::mem::take(&mut self.pending).iter().map(line).collect();
        let mut f = self.lock.file();
        f.write_all(text.as_bytes()).map_err(self.io("write"))?;
        f.sync_data().map_err(self.io("fsync"))?;
        self.last = Instant::now();
        Ok(())
    }

    /// The output is complete (or abandoned): the journal file goes, then the lock.
    pub fn remove(self) {
        self.lock.remove();
    }
}

fn line(v: &impl Serialize) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry { i, name: format!("t{i}"), file: 0, offset: 32 * i as u64, n_bytes: 32, end: 32, sha256: "00".into() }
    }

    #[test]
    fn entries_are_listed_only_once_committed_and_a_torn_line_ends_them() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.partial.json");
        let h = Header::new("fp", true, vec!["o".into()]);
        let mut j = Journal::open_locked(&p, Duration::from_secs(3600)).unwrap();
        j.rewrite(&h, &[]).unwrap();
        j.push(entry(0));
        assert!(!j.due(false) && j.due(true));
        assert_eq!(j.read().unwrap(), (Some(h.clone()), vec![]));
        let mut synced = false;
        j.commit(|| -> Result<(), JournalError> {
            synced = true;
            Ok(())
        })
        .unwrap();
        assert!(synced);
        assert_eq!(j.read().unwrap().1, vec![entry(0)]);
        // A second writer is refused while this one lives.
        assert!(matches!(Journal::open_locked(&p, Duration::ZERO), Err(JournalError::Lock(LockError::Busy { .. }))));
        drop(j);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"i\":1,\"name\":\"t1\",\"fi");
        std::fs::write(&p, text).unwrap();
        let mut j = Journal::open_locked(&p, Duration::ZERO).unwrap();
        assert_eq!(j.read().unwrap(), (Some(h.clone()), vec![entry(0)]));
        assert_eq!(h.why_not(&h), None);
        assert!(h.why_not(&Header::new("other", true, vec!["o".into()])).is_some());
        j.remove();
        assert!(!p.exists());
    }
}
