//! Importance matrices (imatrix) as llama-quantize reads them: llama.cpp's GGUF format (`<name>.in_sum2` +
//! `<name>.counts` F32 tensors, `imatrix.*` metadata) and the legacy `.dat` format.
//!
//! Follows `common/imatrix-loader.cpp` (`common_imatrix_load`, GGUF first, legacy when the file is not GGUF) and
//! `tools/quantize/quantize.cpp load_imatrix` / `prepare_imatrix` of the pinned llama.cpp
//! (`../shared/docs/gguf-spec.md` §4.2–§4.4): per expert `w = in_sum2 / count`, and **1.0 for every column of an
//! expert whose count is 0**; legacy `w = value / ncall`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sling_core::DType;

use sling_formats::gguf::{GgufFile, GgufValue};

#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error("imatrix {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("imatrix {path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// One weight tensor's importance data.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// `ne0 * n_mat` weights: what llama-quantize passes as `quant_weights` (expert `e` at `e * ne0`).
    pub weights: Vec<f32>,
    /// Tokens seen per matrix (per expert for `_exps` tensors); for legacy files the single `ncall`.
    pub counts: Vec<i64>,
}

/// A loaded imatrix.
#[derive(Clone, Debug, Default)]
pub struct Imatrix {
    /// The path as given (llama-quantize records it in `quantize.imatrix.file`).
    pub file: String,
    pub entries: BTreeMap<String, Entry>,
    pub datasets: Vec<String>,
    /// `imatrix.chunk_count`, or the legacy trailer's chunk count (0 when absent).
    pub chunk_count: u32,
    pub legacy: bool,
}

impl Imatrix {
    /// Loads `path` like `load_imatrix` (GGUF first, legacy `.dat` otherwise).
    pub fn load(path: &Path) -> Result<Imatrix, ImatrixError> {
        let bytes = std::fs::read(path).map_err(|source| ImatrixError::Io { path: path.into(), source })?;
        let inv = |why: String| ImatrixError::Invalid { path: path.into(), why };
        let mut m = if bytes.starts_with(b"GGUF") {
            let g = GgufFile::open(path).map_err(|e| inv(format!("not a readable GGUF file: {e}")))?;
            Self::from_gguf(&g).map_err(inv)?
        } else {
            Self::from_legacy(&bytes).map_err(inv)?
        };
        m.file = path.display().to_string();
        if let Some((name, _)) = m.entries.iter().find(|(_, e)| e.weights.iter().any(|w| !w.is_finite())) {
            return Err(inv(format!("entry {name} holds non-finite values")));
        }
        Ok(m)
    }

    fn from_gguf(g: &GgufFile) -> Result<Imatrix, String> {
        let datasets = match g.get("imatrix.datasets") {
            Some(GgufValue::Array(_, v)) => v.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        };
        for k in ["imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"] {
            if g.get(k).is_none() {
                return Err(format!("missing imatrix metadata ({k}); is this an imatrix file?"));
            }
        }
        let chunk_count = g.get("imatrix.chunk_count").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        let mut pairs: BTreeMap<
            String,
            (Option<&sling_formats::gguf::GgufTensorInfo>, Option<&sling_formats::gguf::GgufTensorInfo>),
        > = BTreeMap::new();
        for t in &g.tensors {
            if let Some(n) = t.name.strip_suffix(".in_sum2") {
                pairs.entry(n.to_string()).or_default().0 = Some(t);
            } else if let Some(n) = t.name.strip_suffix(".counts") {
                pairs.entry(n.to_string()).or_default().1 = Some(t);
            }
        }
        if pairs.is_empty() {
            return Err("no data (no *.in_sum2 / *.counts tensors)".into());
        }
        let mut entries = BTreeMap::new();
        for (name, p) in pairs {
            let (Some(s), Some(c)) = p else { return Err(format!("mismatched sums and counts for {name}")) };
            if s.dtype != DType::F32 || c.dtype != DType::F32 {
                return Err(format!("sums and counts for {name} must be F32"));
            }
            let sums = f32s(g.tensor_data(s));
            let raw_counts = f32s(g.tensor_data(c));
            // A count is a number of tokens and a sum one of squares: negative, fractional or non-finite values
            // cannot come from llama-imatrix (llama.cpp would turn them into garbage weights silently).
            if let Some((i, v)) = raw_counts
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v >= 0.0 && v.fract() == 0.0 && **v < 9.0e15))
            {
                return Err(format!("{name}.counts: element {i} is {v}, not a count of tokens"));
            }
            if let Some((i, v)) = sums.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                return Err(format!("{name}.in_sum2: element {i} is {v}, not a finite sum of squares"));
            }
            let counts: Vec<i64> = raw_counts.iter().map(|v| *v as i64).collect();
            if counts.is_empty() || sums.len() % counts.len() != 0 {
                return Err(format!("{name}: {} sums do not divide into {} matrices", sums.len(), counts.len()));
            }
            let ne0 = sums.len() / counts.len();
            let mut weights = vec![1.0f32; sums.len()];
            for (e, &n) in counts.iter().enumerate() {
                if n > 0 {
                    let count = n as f32;
                    for i in 0..ne0 {
                        weights[e * ne0 + i] = sums[e * ne0 + i] / count;
                    }
                }
            }
            entries.insert(name, Entry { weights, counts });
        }
        Ok(Imatrix { file: String::new(), entries, datasets, chunk_count, legacy: false })
    }

    fn from_legacy(b: &[u8]) -> Result<Imatrix, String> {
        let mut r = Reader { b, at: 0 };
        let n = r.i32().ok_or("truncated header")?;
        if n < 1 {
            return Err("no data".into());
        }
        let mut entries = BTreeMap::new();
        for i in 0..n {
            let len = r.i32().filter(|l| *l >= 0).ok_or(format!("entry {i}: bad name length"))? as usize;
            let name = r.take(len).ok_or(format!("entry {i}: truncated name"))?;
            // C reads the name into a NUL-terminated buffer: it ends at the first NUL.
            let name = String::from_utf8_lossy(name.split(|c| *c == 0).next().unwrap_or(&[])).into_owned();
            let ncall = r.i32().ok_or(format!("entry {name}: truncated"))?;
            let nval = r.i32().filter(|v| *v >= 1).ok_or(format!("entry {name}: bad number of values"))? as usize;
            let raw = r.take(nval.checked_mul(4).ok_or("overflow")?).ok_or(format!("entry {name}: truncated data"))?;
            let sums = f32s(raw);
            if ncall < 0 {
                return Err(format!("entry {name}: negative ncall {ncall}"));
            }
            if let Some((i, v)) = sums.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                return Err(format!("entry {name}: value {i} is {v}, not a finite sum of squares"));
            }
            let weights = if ncall > 0 { sums.iter().map(|v| v / ncall as f32).collect() } else { sums };
            entries.insert(name, Entry { weights, counts: vec![ncall as i64] });
        }
        let mut chunk_count = 0;
        let mut datasets = Vec::new();
        if let Some(c) = r.i32() {
            chunk_count = c.max(0) as u32;
            if let Some(len) = r.i32().filter(|l| *l > 0) {
                if let Some(d) = r.take(len as usize) {
                    datasets.push(String::from_utf8_lossy(d.split(|c| *c == 0).next().unwrap_or(&[])).into_owned());
                }
            }
        }
        Ok(Imatrix { file: String::new(), entries, datasets, chunk_count, legacy: true })
    }

    /// `--exclude-weights` then `--include-weights` (substring filters on entry names), as `prepare_imatrix`.
    pub fn filter(&mut self, include: &[String], exclude: &[String]) {
        if !exclude.is_empty() {
            self.entries.retain(|k, _| !exclude.iter().any(|s| k.contains(s.as_str())));
        }
        if !include.is_empty() {
            self.entries.retain(|k, _| include.iter().any(|s| k.contains(s.as_str())));
        }
    }

    /// The metadata llama-quantize adds when imatrix data is in use (`quantize.imatrix.*`, in its order).
    pub fn kvs(&self) -> Vec<(String, GgufValue)> {
        let trunc = |s: &str| -> String {
            let mut end = s.len().min(127);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        };
        let mut v = vec![("quantize.imatrix.file".to_string(), GgufValue::String(trunc(&self.file)))];
        if let Some(d) = self.datasets.first() {
            v.push(("quantize.imatrix.dataset".into(), GgufValue::String(trunc(d))));
        }
        v.push(("quantize.imatrix.entries_count".into(), GgufValue::U32(self.entries.len() as u32)));
        if self.chunk_count > 0 {
            v.push(("quantize.imatrix.chunks_count".into(), GgufValue::U32(self.chunk_count)));
        }
        v
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|s| i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_file(entries: &[(&str, i32, &[f32])], trailer: Option<(i32, &str)>) -> Vec<u8> {
        let mut b = (entries.len() as i32).to_le_bytes().to_vec();
        for (n, ncall, v) in entries {
            b.extend((n.len() as i32).to_le_bytes());
            b.extend(n.as_bytes());
            b.extend(ncall.to_le_bytes());
            b.extend((v.len() as i32).to_le_bytes());
            for x in *v {
                b.extend(x.to_le_bytes());
            }
        }
        if let Some((c, d)) = trailer {
            b.extend(c.to_le_bytes());
            b.extend((d.len() as i32).to_le_bytes());
            b.extend(d.as_bytes());
        }
        b
    }

    #[test]
    fn legacy_divides_by_ncall_and_reads_the_trailer() {
        let b = legacy_file(&[("blk.0.ffn_up.weight", 4, &[8.0, 2.0])], Some((10, "wiki.txt")));
        let m = Imatrix::from_legacy(&b).unwrap();
        assert_eq!(m.entries["blk.0.ffn_up.weight"].weights, vec![2.0, 0.5]);
        assert_eq!((m.chunk_count, m.datasets.clone()), (10, vec!["wiki.txt".to_string()]));
    }

    #[test]
    fn hostile_legacy_files_are_errors_not_panics() {
        let good = legacy_file(&[("a", 1, &[1.0; 8])], Some((3, "d")));
        for cut in 0..good.len() {
            let _ = Imatrix::from_legacy(&good[..cut]);
        }
        assert!(Imatrix::from_legacy(&(-5i32).to_le_bytes()).is_err());
        let mut huge = 1i32.to_le_bytes().to_vec();
        huge.extend(i32::MAX.to_le_bytes());
        assert!(Imatrix::from_legacy(&huge).is_err());
    }

    #[test]
    fn filters_like_prepare_imatrix() {
        let b = legacy_file(&[("blk.0.attn_q.weight", 1, &[1.0]), ("blk.0.ffn_up.weight", 1, &[1.0])], None);
        let mut m = Imatrix::from_legacy(&b).unwrap();
        m.filter(&[], &["attn".into()]);
        assert_eq!(m.entries.keys().collect::<Vec<_>>(), ["blk.0.ffn_up.weight"]);
    }
}
