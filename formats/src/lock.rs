//! The lock every writer of an output holds while it writes, so that a second writer of the same output (a
//! second `sling` run, a script started twice) is refused before it touches anything of the first's: it would
//! otherwise replace the first's partial files under it, and the first could then rename a mix of both into
//! place. The lock file is the output's resume journal ([`crate::journal`], `OUT.partial.json`), for the GGUF
//! file set and the artifact directory of the other targets alike; a calibrated run takes it before it writes
//! its store beside the output.
//!
//! An advisory `flock` on a file beside the output. It is released when the process ends, however it ends,
//! so a killed run never leaves a stale lock behind. The file is removed by its holder when the output is
//! complete; a writer that opened the file just before that removal and locks it just after would hold a
//! lock on a file no one else can reach, so a lock is only taken when the path still names the locked file
//! (checked after locking, the usual guard of lock-then-unlink schemes).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Why an output could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock: it is writing this output right now.
    #[error("{path}: another sling process is writing this output")]
    Busy { path: PathBuf },
    #[error("cannot {op} the lock file {path}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl LockError {
    /// The error as the operating-system error it stands for (`WouldBlock` when busy), for writers whose
    /// error type reports I/O errors by operation.
    pub fn into_io(self) -> (PathBuf, std::io::Error) {
        match self {
            LockError::Busy { path } => (
                path,
                std::io::Error::new(std::io::ErrorKind::WouldBlock, "another sling process is writing this output"),
            ),
            LockError::Io { path, source, .. } => (path, source),
        }
    }
}

/// A held lock on `path` (see the module docs); released when dropped.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
    /// Remove the file when dropped ([`OutputLock::temporary`]).
    temporary: bool,
}

impl OutputLock {
    /// Opens (creating it, keeping what it holds) and locks `path`, or says who holds it.
    pub fn acquire(path: &Path) -> Result<OutputLock, LockError> {
        let io = |op| move |source| LockError::Io { path: path.to_path_buf(), op, source };
        // A few tries: each failure of the identity check means the holder has just finished and removed
        // the file, so the next open finds a new one (or none).
        for _ in 0..8 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io("create"))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Err(LockError::Busy { path: path.to_path_buf() }),
                Err(std::fs::TryLockError::Error(source)) => return Err(io("lock")(source)),
            }
            if same_file(&file, path) {
                return Ok(OutputLock { path: path.to_path_buf(), file, temporary: false });
            }
        }
        Err(LockError::Busy { path: path.to_path_buf() })
    }

    /// [`acquire`](Self::acquire) a lock file that holds nothing else, removed when the lock is dropped (a run
    /// that fails removes it too; one that is killed leaves an unlocked, empty file, which the next run takes).
    pub fn temporary(path: &Path) -> Result<OutputLock, LockError> {
        let mut lock = OutputLock::acquire(path)?;
        lock.temporary = true;
        Ok(lock)
    }

    /// The lock file is kept when the lock is dropped (it holds something: a resume journal).
    pub fn keep(mut self) -> OutputLock {
        self.temporary = false;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked file (the GGUF writer keeps its journal in it; `&File` reads, writes and seeks).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Removes the lock file, then releases the lock (in that order: see the module docs). A failure to
    /// remove it is not an error: the next writer locks the file that is left.
    pub fn remove(mut self) {
        self.temporary = true;
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` still names the open file `f`.
#[cfg(unix)]
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_of_the_same_path_is_refused_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.partial.lock");
        let a = OutputLock::acquire(&p).unwrap();
        assert!(matches!(OutputLock::acquire(&p), Err(LockError::Busy { .. })));
        drop(a);
        let b = OutputLock::acquire(&p).unwrap();
        b.remove();
        assert!(!p.exists());
        drop(OutputLock::temporary(&p).unwrap());
        assert!(!p.exists(), "a temporary lock file goes with its lock");
        OutputLock::acquire(&p).unwrap();
    }

    #[test]
    fn a_lock_on_a_removed_file_is_not_held() {
        // The race of the module docs, played in order: B opens the holder's file, the holder removes it and
        // finishes, B locks the orphan. B must not count that as holding the output.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.partial.lock");
        let a = OutputLock::acquire(&p).unwrap();
        let orphan = File::open(&p).unwrap();
        a.remove();
        orphan.try_lock().unwrap();
        assert!(!same_file(&orphan, &p));
        let c = OutputLock::acquire(&p).unwrap();
        assert!(same_file(&c.file, &p));
    }
}
