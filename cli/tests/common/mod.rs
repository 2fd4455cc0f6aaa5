//! Helpers shared by the CLI integration tests (each test file is its own crate and uses what it needs).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `sling` binary under test, with none of the test hooks' environment leaking in.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sling"));
    for k in ["SOURCE_DATE_EPOCH", "SLING_JOURNAL_INTERVAL_MS", "SLING_TEST_ABORT_AFTER_TENSORS", "SLING_TEST_ABORT_AT"]
    {
        c.env_remove(k);
    }
    c
}

/// A committed fixture model directory.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A writable copy of a fixture under `tmp`.
pub fn copy_fixture(name: &str, tmp: &Path) -> PathBuf {
    let dst = tmp.join(name);
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}
