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

/// `tests/interop/data/calib.txt`, the calibration text of the calibrated-method tests.
pub fn calib() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/data/calib.txt").to_string_lossy().into_owned()
}

/// `sling ARGS` with the extra environment `env` (test hooks).
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Every file of a directory, sorted by name: `(name, bytes)`.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

/// Two artifact directories hold the same files with the same bytes, the manifest and model card aside (they
/// record paths and times).
pub fn same_weights(a: &Path, b: &Path, what: &str) {
    let (fa, fb) = (files(a), files(b));
    assert_eq!(fa.iter().map(|f| &f.0).collect::<Vec<_>>(), fb.iter().map(|f| &f.0).collect::<Vec<_>>(), "{what}");
    for ((na, ba), (_, bb)) in fa.iter().zip(&fb) {
        if na != "sling.json" && na != "README.md" {
            assert!(ba == bb, "{what}: {na} differs");
        }
    }
}

/// The artifact's `sling.json`.
pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("sling.json")).unwrap()).unwrap()
}
