//! A store of weights quantized upstream of the executor (GPTQ, AWQ): per weight, its codes and per-group
//! parameters ([`sling_quantizers::gptq::Solution`]), on disk, read back by row range when the target encodes
//! the weight.
//!
//! One file per weight, `<hex sha256 of the weight name>.bin` (names may hold any character), little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `SLINGSOL` |
//! | 4 | version (1) |
//! | 8, 8, 8 | rows, cols, group (elements per group; `u64::MAX`: one group per row) |
//! | 4 + n | name length, the weight name (UTF-8): a hash collision or a foreign file is detected |
//! | rows·cols | codes, `u8`, row-major |
//! | rows·ngroups·8 | per group `scale` (`f32`), `zero` (`f32`), row-major, `ngroups = ceil(cols / group)` |
//!
//! Only the stored parameters are kept: [`Store::rows`] returns `q_scale == scale` and `q_zero == zero` (the
//! values a target writes; the unrounded MLX `q_scale`/`q_zero` are only needed while solving). A weight is
//! written to `<file>.tmp`, synced and renamed, so it is either complete or absent. Reads take only the byte
//! ranges of the rows asked for, after checking the header against the file's length.

use std::path::{Path, PathBuf};

use sling_quantizers::gptq::{GroupParams, Solution};

#[derive(Debug, thiserror::Error)]
pub enum SolvedError {
    #[error("cannot {op} {path}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("solved weight {name}: {why}")]
    Invalid { name: String, why: String },
}

/// Codes and parameters of rows `r0..r1` of a solved weight.
#[derive(Clone, Debug, PartialEq)]
pub struct SolvedRows {
    pub cols: usize,
    pub group: usize,
    /// `(r1 − r0) × cols`.
    pub codes: Vec<u8>,
    /// `(r1 − r0) × ceil(cols / group)`.
    pub params: Vec<GroupParams>,
}

const MAGIC: &[u8; 8] = b"SLINGSOL";
const VERSION: u32 = 1;
/// Magic, version, rows, cols, group, name length.
const FIXED: usize = 8 + 4 + 8 + 8 + 8 + 4;
/// Longest weight name accepted (a hostile header cannot make `rows` allocate more).
const MAX_NAME: usize = 1 << 16;

/// A directory of solved weights, keyed by the weight's Hugging Face tensor name.
pub struct Store {
    dir: PathBuf,
}

/// What a file's header says, checked against the file's length.
struct Header {
    rows: usize,
    cols: usize,
    group: usize,
    ngroups: usize,
    /// Offset of the codes.
    data: u64,
}

fn ngroups(cols: usize, group: usize) -> usize {
    cols.div_ceil(group.max(1)).max(1)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, SolvedError> {
        std::fs::create_dir_all(dir).map_err(|source| SolvedError::Io { path: dir.into(), op: "create", source })?;
        Ok(Store { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of weight `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        use sha2::Digest;
        let h = sha2::Sha256::digest(name.as_bytes());
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.bin"))
    }

    /// Stores `s` as weight `name` (written to a temporary file, synced and renamed: a weight is either
    /// complete in the store or absent). `group` is the grid's group size (`gptq::Grid::group`; `usize::MAX` for
    /// one group per row); `s.params` must hold `rows × ceil(cols / group)` entries.
    pub fn put(&self, name: &str, group: usize, s: &Solution) -> Result<(), SolvedError> {
        use std::io::Write;
        let invalid = |why: String| SolvedError::Invalid { name: name.to_string(), why };
        if group == 0 {
            return Err(invalid("group size 0".into()));
        }
        if name.len() > MAX_NAME {
            return Err(invalid(format!("name longer than {MAX_NAME} bytes")));
        }
        let ng = ngroups(s.cols, group);
        if s.codes.len() != s.rows.saturating_mul(s.cols) {
            return Err(invalid(format!("{} codes for {}×{}", s.codes.len(), s.rows, s.cols)));
        }
        if s.params.len() != s.rows.saturating_mul(ng) {
            return Err(invalid(format!("{} parameter groups for {} rows of {ng}", s.params.len(), s.rows)));
        }
        let mut buf = Vec::with_capacity(FIXED + name.len() + s.codes.len() + s.params.len() * 8);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        for v in [s.rows, s.cols, group] {
            buf.extend_from_slice(&(v as u64).to_le_bytes());
        }
        buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&s.codes);
        for p in &s.params {
            buf.extend_from_slice(&p.scale.to_le_bytes());
            buf.extend_from_slice(&p.zero.to_le_bytes());
        }
        let path = self.path(name);
        let tmp = path.with_extension("bin.tmp");
        let io = |path: &Path, op: &'static str| {
            let path = path.to_path_buf();
            move |source| SolvedError::Io { path, op, source }
        };
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp, "create"))?;
        f.write_all(&buf).map_err(io(&tmp, "write"))?;
        f.sync_all().map_err(io(&tmp, "sync"))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path, "rename into"))?;
        // The rename itself made durable (best effort: not every platform opens directories).
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Whether weight `name` is stored (its file exists; [`Store::rows`] checks its contents).
    pub fn contains(&self, name: &str) -> bool {
        self.path(name).is_file()
    }

    /// Reads and checks the header of `f` (the file of `name` at `path`).
    fn header(f: &mut std::fs::File, path: &Path, name: &str) -> Result<Header, SolvedError> {
        use std::io::Read;
        let corrupt = |why: String| SolvedError::Corrupt { path: path.to_path_buf(), why };
        let len = f.metadata().map_err(|source| SolvedError::Io { path: path.into(), op: "stat", source })?.len();
        let mut fixed = [0u8; FIXED];
        f.read_exact(&mut fixed).map_err(|_| corrupt(format!("{len} bytes: shorter than a header")))?;
        if &fixed[..8] != MAGIC {
            return Err(corrupt("not a sling solved-weight file (bad magic)".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != VERSION {
            return Err(corrupt(format!("version {version}, this sling reads {VERSION}")));
        }
        let (rows, cols, group) = (u64_at(12), u64_at(20), u64_at(28));
        let name_len = u32_at(36) as usize;
        if name_len != name.len() {
            return Err(corrupt(format!("holds a weight name of {name_len} bytes, not {name:?}")));
        }
        let mut stored = vec![0u8; name_len];
        f.read_exact(&mut stored).map_err(|_| corrupt("truncated in the weight name".into()))?;
        if stored != name.as_bytes() {
            return Err(corrupt(format!("holds weight {:?}, not {name:?}", String::from_utf8_lossy(&stored))));
        }
        if group == 0 {
            return Err(corrupt("group size 0".into()));
        }
        let too_big = || corrupt(format!("shape {rows}×{cols} does not fit this machine"));
        let rows = usize::try_from(rows).map_err(|_| too_big())?;
        let cols = usize::try_from(cols).map_err(|_| too_big())?;
        let group = usize::try_from(group).unwrap_or(usize::MAX);
        let ng = ngroups(cols, group);
        let data = (FIXED + name_len) as u64;
        let want = rows
            .checked_mul(cols)
            .and_then(|c| rows.checked_mul(ng)?.checked_mul(8)?.checked_add(c))
            .and_then(|b| (b as u64).checked_add(data))
            .ok_or_else(too_big)?;
        if want != len {
            return Err(corrupt(format!("{len} bytes, but a {rows}×{cols} weight in groups of {group} takes {want}")));
        }
        Ok(Header { rows, cols, group, ngroups: ng, data })
    }

    /// Rows `r0..r1` of weight `name`, or `None` when the store does not hold it.
    pub fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Option<SolvedRows>, SolvedError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.path(name);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SolvedError::Io { path, op: "open", source }),
        };
        let h = Self::header(&mut f, &path, name)?;
        if r0 > r1 || r1 > h.rows {
            return Err(SolvedError::Invalid {
                name: name.to_string(),
                why: format!("rows {r0}..{r1} asked of a weight of {} rows", h.rows),
            });
        }
        let n = r1 - r0;
        let read_err = |source| SolvedError::Io { path: path.clone(), op: "read", source };
        // Sizes were checked against the file length in `header`, so these products do not overflow.
        let mut codes = vec![0u8; n * h.cols];
        f.seek(SeekFrom::Start(h.data + (r0 * h.cols) as u64)).map_err(read_err)?;
        f.read_exact(&mut codes).map_err(read_err)?;
        let mut raw = vec![0u8; n * h.ngroups * 8];
        let params_at = h.data + (h.rows * h.cols) as u64 + (r0 * h.ngroups * 8) as u64;
        f.seek(SeekFrom::Start(params_at)).map_err(read_err)?;
        f.read_exact(&mut raw).map_err(read_err)?;
        let params = raw
            .chunks_exact(8)
            .map(|b| {
                let scale = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let zero = f32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                GroupParams { scale, zero, q_scale: scale, q_zero: zero }
            })
            .collect();
        Ok(Some(SolvedRows { cols: h.cols, group: h.group, codes, params }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sling_quantizers::gptq::Solution;

    fn solution(rows: usize, cols: usize, group: usize) -> Solution {
        let ng = cols.div_ceil(group);
        Solution {
            rows,
            cols,
            codes: (0..rows * cols).map(|i| (i * 7 % 251) as u8).collect(),
            params: (0..rows * ng)
                .map(|i| GroupParams { scale: i as f32 * 0.5 + 0.25, zero: -(i as f32), q_scale: 9.0, q_zero: 9.0 })
                .collect(),
            dequant: Vec::new(),
            loss: 0.0,
            fallback: None,
        }
    }

    #[test]
    fn round_trip_by_row_range() {
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(&dir.path().join("store")).unwrap();
        let name = "model.layers.0.mlp.experts.3.gate_proj.weight/ä\0";
        assert!(!st.contains(name));
        assert_eq!(st.rows(name, 0, 1).unwrap(), None);
        let s = solution(5, 96, 32);
        st.put(name, 32, &s).unwrap();
        assert!(st.contains(name));
        assert!(!st.contains("other"));
        let all = st.rows(name, 0, 5).unwrap().unwrap();
        assert_eq!((all.cols, all.group), (96, 32));
        assert_eq!(all.codes, s.codes);
        assert_eq!(all.params.len(), 15);
        for (a, b) in all.params.iter().zip(&s.params) {
            assert_eq!((a.scale, a.zero, a.q_scale, a.q_zero), (b.scale, b.zero, b.scale, b.zero));
        }
        let mid = st.rows(name, 2, 4).unwrap().unwrap();
        assert_eq!(mid.codes, s.codes[2 * 96..4 * 96]);
        assert_eq!(mid.params, all.params[6..12]);
        assert_eq!(st.rows(name, 3, 3).unwrap().unwrap().codes.len(), 0);
        assert!(matches!(st.rows(name, 4, 6), Err(SolvedError::Invalid { .. })));
        assert!(matches!(st.rows(name, 3, 2), Err(SolvedError::Invalid { .. })));
        // one group per row
        st.put("ch", usize::MAX, &solution(2, 10, 10)).unwrap();
        assert_eq!(st.rows("ch", 1, 2).unwrap().unwrap().params.len(), 1);
        // overwriting replaces
        let s2 = solution(1, 32, 32);
        st.put(name, 32, &s2).unwrap();
        assert_eq!(st.rows(name, 0, 1).unwrap().unwrap().codes, s2.codes);
        assert!(!st.path(name).with_extension("bin.tmp").exists());
    }

    #[test]
    fn inconsistent_solutions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(dir.path()).unwrap();
        let mut s = solution(2, 64, 32);
        assert!(matches!(st.put("w", 0, &s), Err(SolvedError::Invalid { .. })));
        assert!(matches!(st.put("w", 16, &s), Err(SolvedError::Invalid { .. })));
        s.codes.pop();
        assert!(matches!(st.put("w", 32, &s), Err(SolvedError::Invalid { .. })));
        assert!(!st.contains("w"));
    }

    #[test]
    fn hostile_files_are_corrupt_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(dir.path()).unwrap();
        let name = "w";
        st.put(name, 32, &solution(4, 64, 32)).unwrap();
        let good = std::fs::read(st.path(name)).unwrap();
        let header_len = FIXED + name.len();
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), good[..5].to_vec(), good[..FIXED].to_vec()];
        cases.push(good[..good.len() - 1].to_vec());
        cases.push([&good[..], &[0u8]].concat());
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        cases.push(bad_magic);
        let mut bad_version = good.clone();
        bad_version[8] = 2;
        cases.push(bad_version);
        let mut other_name = good.clone();
        other_name[header_len - 1] = b'v';
        cases.push(other_name);
        let mut long_name = good.clone();
        long_name[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(long_name);
        for (field, v) in [(12, u64::MAX), (20, u64::MAX), (12, 1 << 40), (28, 0), (28, 7), (20, 0)] {
            let mut b = good.clone();
            b[field..field + 8].copy_from_slice(&v.to_le_bytes());
            cases.push(b);
        }
        for (i, bytes) in cases.iter().enumerate() {
            std::fs::write(st.path(name), bytes).unwrap();
            match st.rows(name, 0, 1) {
                Err(SolvedError::Corrupt { path, why }) => {
                    assert_eq!(path, st.path(name));
                    assert!(!why.is_empty());
                }
                other => panic!("case {i}: {other:?}"),
            }
        }
        // a directory where the file should be
        std::fs::remove_file(st.path(name)).unwrap();
        std::fs::create_dir(st.path(name)).unwrap();
        assert!(st.rows(name, 0, 1).is_err());
    }
}
