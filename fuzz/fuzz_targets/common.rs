//! Shared by the fuzz targets: a scratch directory per process (the parsers under test read files, as sling
//! does: memory maps, directory layouts), and the committed fixtures used as fixed companions of the fuzzed file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory of this process's own (`$SLING_FUZZ_TMP` or the system temp dir, which should be a tmpfs for
/// speed), created once; `name` makes one per target.
pub fn scratch(name: &str) -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let root = std::env::var_os("SLING_FUZZ_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let d = root.join(format!("sling-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    let d = base.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `data` to `dir/name` and returns the path.
pub fn put(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A committed fixture file (`fixtures/models/MODEL/FILE`), read at run time.
pub fn fixture(model: &str, file: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(model).join(file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The input the target parses: `data` itself when it starts with `{` (a whole JSON document or JSON-lines
/// file), else `template` (a valid input of the format) edited by `data` read as 3-byte operations `[pos lo, pos
/// hi, byte]`: byte 0 truncates at `pos`, any other byte overwrites (or appends at the end). A fuzzer with no seed
/// then starts next to a valid input, where the deep checks are.
pub fn edit(template: &[u8], data: &[u8]) -> Vec<u8> {
    if data.first() == Some(&b'{') {
        return data.to_vec();
    }
    let mut t = template.to_vec();
    for op in data.chunks_exact(3) {
        let pos = usize::from(u16::from_le_bytes([op[0], op[1]])) % (t.len() + 1);
        match op[2] {
            0 => t.truncate(pos),
            b if pos < t.len() => t[pos] = b,
            b => t.push(b),
        }
    }
    t
}
