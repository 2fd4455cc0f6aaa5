//! Lazy reading of Hugging Face checkpoints: a model directory (`config.json`, `model.safetensors`
//! or `model.safetensors.index.json` + shards) or a single `.safetensors` file.
//!
//! Only headers are parsed when a checkpoint is opened (validated by the `safetensors` crate's
//! `read_metadata`: contiguous offsets, exact coverage of the data section); tensor bytes are
//! reached through a read-only memory map when a conversion asks for them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use sling_core::{DType, ModelConfig};

/// Errors while opening a checkpoint. Each names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor {tensor} has dtype {dtype}, which sling cannot read")]
    UnsupportedDType { path: PathBuf, tensor: String, dtype: String },
    #[error("{path}: invalid JSON")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("{index}: shard {shard:?} escapes the model directory")]
    ShardEscapes { index: PathBuf, shard: String },
    #[error("{index}: shard {shard} is named in the index but missing")]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error("{index}: tensors in the index and in the shards disagree; missing: {missing:?}, extra: {extra:?}")]
    IndexMismatch { index: PathBuf, missing: Vec<String>, extra: Vec<String> },
    #[error("tensor {tensor} appears in both {first} and {second}")]
    DuplicateTensor { tensor: String, first: PathBuf, second: PathBuf },
    #[error("{path}: no model.safetensors or model.safetensors.index.json found (only safetensors checkpoints are supported)")]
    NoWeights { path: PathBuf },
    #[error("{path}: unusable config")]
    Config { path: PathBuf, source: sling_core::ConfigError },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub name: String,
    pub dtype: DType,
    /// PyTorch order (outermost first).
    pub shape: Vec<u64>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Byte range in the file (absolute).
    pub start: usize,
    pub end: usize,
}

impl SourceTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn n_bytes(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    /// Tensors sorted by name (what `gguf.utility.SafetensorsLocal` and the `safetensors`
    /// library iterate).
    pub tensors: Vec<SourceTensor>,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header. `file_idx` is stored in each [`SourceTensor`].
    pub fn open(path: &Path, file_idx: usize) -> Result<SafetensorsFile, CheckpointError> {
        let f = File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only. Concurrent modification of the file by another process
        // would change the bytes we read (as with any reader), but cannot violate memory safety
        // of this process beyond that; the source is never written by sling.
        let mmap = unsafe { Mmap::map(&f) }.map_err(io_err(path))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            let mut reason = e.to_string();
            if let Some(why) = diagnose_layout(&mmap) {
                reason = format!("{reason}: {why}");
            }
            CheckpointError::Safetensors { path: path.to_path_buf(), reason }
        })?;
        let base = 8 + n;
        let mut tensors = Vec::new();
        for (name, info) in meta.tensors() {
            let st_name = format!("{:?}", info.dtype);
            let dtype = DType::from_safetensors(&st_name).ok_or_else(|| CheckpointError::UnsupportedDType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: st_name.clone(),
            })?;
            tensors.push(SourceTensor {
                name,
                dtype,
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                file: file_idx,
                start: base + info.data_offsets.0,
                end: base + info.data_offsets.1,
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, tensors })
    }

    /// Drops this process's mappings of the file's pages (they stay in the page cache).
    pub fn release_pages(&self) {
        // SAFETY: the map is a shared, read-only, file-backed mapping. MADV_DONTNEED only removes
        // page-table entries; a later access faults the same file bytes back in from the page
        // cache, so no slice into the map observes different data (unlike anonymous or private
        // copy-on-write maps, where DONTNEED would zero them).
        #[cfg(unix)]
        let _ = unsafe { self.mmap.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }

    /// The bytes of one of this file's tensors.
    pub fn bytes(&self, t: &SourceTensor) -> &[u8] {
        // Offsets were validated against the file length by `read_metadata`.
        &self.mmap[t.start..t.end]
    }
}

/// Names the tensor behind a layout error that the `safetensors` crate reports without one (a byte size that
/// disagrees with shape × dtype, data past the end of the file, a gap or an overlap): the header is re-read on
/// its own terms, tensors in offset order. `None` when the header cannot be read that far (the crate's
/// message says why) or nothing is found.
fn diagnose_layout(file: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(file.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = (file.len() - 8 - n) as u64;
    let mut ts: Vec<(u64, u64, &str, &serde_json::Value)> = Vec::new();
    for (name, v) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offs = v.get("data_offsets")?.as_array()?;
        let (s, e) = (offs.first()?.as_u64()?, offs.get(1)?.as_u64()?);
        ts.push((s, e, name, v));
    }
    ts.sort_by_key(|t| (t.0, t.1));
    let mut at = 0u64;
    for (s, e, name, v) in ts {
        if e < s {
            return Some(format!("tensor {name}: data_offsets [{s}, {e}] end before they start"));
        }
        if e > data_len {
            return Some(format!(
                "tensor {name}: data_offsets [{s}, {e}] go past the end of the data ({data_len} bytes)"
            ));
        }
        if s < at {
            return Some(format!(
                "tensor {name}: data_offsets [{s}, {e}] overlap the previous tensor (which ends at {at})"
            ));
        }
        if s > at {
            return Some(format!("tensor {name}: data_offsets [{s}, {e}] leave a gap of {} bytes before it", s - at));
        }
        let shape: Option<Vec<u64>> = v.get("shape")?.as_array()?.iter().map(serde_json::Value::as_u64).collect();
        let dtype = v.get("dtype")?.as_str()?;
        if let (Some(shape), Some(d)) = (shape, DType::from_safetensors(dtype)) {
            let want = shape.iter().try_fold(1u64, |a, &x| a.checked_mul(x)).and_then(|numel| d.bytes_for(numel));
            if want != Some(e - s) {
                let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
                return Some(format!(
                    "tensor {name}: data_offsets [{s}, {e}] hold {} bytes but shape {shape:?} of {dtype} needs {want}",
                    e - s
                ));
            }
        }
        at = e;
    }
    if at != data_len {
        return Some(format!("the tensors end at byte {at} of the data, which has {data_len}"));
    }
    None
}

/// A checkpoint: its configuration and its safetensors files, in the order the reference
/// converter visits them (parts sorted by file name, tensors sorted by name within a part).
pub struct Checkpoint {
    /// The model directory (or the directory of a single file).
    pub dir: PathBuf,
    pub config: Option<ModelConfig>,
    pub files: Vec<SafetensorsFile>,
    /// Source files read directly rather than as safetensors (a GGUF requantized by `sling quantize`): hashed
    /// for provenance, never written.
    pub other_sources: Vec<PathBuf>,
    by_name: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    /// Opens a model directory or a single `.safetensors` file. Parses headers only.
    pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let (dir, parts): (PathBuf, Vec<PathBuf>) = if meta.is_dir() {
            (path.to_path_buf(), Self::part_paths(path)?)
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
            (dir, vec![path.to_path_buf()])
        };
        let config_path = dir.join("config.json");
        let config = if meta.is_dir() || config_path.is_file() {
            let bytes = std::fs::read(&config_path).map_err(io_err(&config_path))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|source| CheckpointError::Json { path: config_path.clone(), source })?;
            Some(
                ModelConfig::from_value(v)
                    .map_err(|source| CheckpointError::Config { path: config_path.clone(), source })?,
            )
        } else {
            None
        };
        let mut files = Vec::new();
        let mut by_name: HashMap<String, (usize, usize)> = HashMap::new();
        for (fi, p) in parts.iter().enumerate() {
            let f = SafetensorsFile::open(p, fi)?;
            for (ti, t) in f.tensors.iter().enumerate() {
                if let Some(&(ofi, _)) = by_name.get(&t.name) {
                    let first: &SafetensorsFile = &files[ofi];
                    return Err(CheckpointError::DuplicateTensor {
                        tensor: t.name.clone(),
                        first: first.path.clone(),
                        second: p.clone(),
                    });
                }
                by_name.insert(t.name.clone(), (fi, ti));
            }
            files.push(f);
        }
        let ck = Checkpoint { dir: dir.clone(), config, files, other_sources: Vec::new(), by_name };
        ck.check_index()?;
        Ok(ck)
    }

    fn index_path(dir: &Path) -> PathBuf {
        dir.join("model.safetensors.index.json")
    }

    fn read_index(dir: &Path) -> Result<Option<BTreeMap<String, String>>, CheckpointError> {
        let ip = Self::index_path(dir);
        if !ip.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&ip).map_err(io_err(&ip))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Json { path: ip.clone(), source })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| CheckpointError::BadIndex { path: ip.clone(), reason: "no \"weight_map\" object".into() })?;
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let s = v.as_str().ok_or_else(|| CheckpointError::BadIndex {
                path: ip.clone(),
                reason: format!("weight_map[{k:?}] is not a string"),
            })?;
            out.insert(k.clone(), s.to_string());
        }
        Ok(Some(out))
    }

    /// `ModelBase.get_model_part_names` + the index's part list, sorted.
    fn part_paths(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
        if let Some(map) = Self::read_index(dir)? {
            let ip = Self::index_path(dir);
            let mut names: Vec<&String> = map.values().collect();
            names.sort();
            names.dedup();
            let mut out = Vec::new();
            for n in names {
                let rel = Path::new(n);
                if rel.components().any(|c| !matches!(c, Component::Normal(_))) || rel.components().count() != 1 {
                    return Err(CheckpointError::ShardEscapes { index: ip, shard: n.clone() });
                }
                let p = dir.join(rel);
                if !p.is_file() {
                    return Err(CheckpointError::MissingShard { index: ip, shard: p });
                }
                out.push(p);
            }
            return Ok(out);
        }
        let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
            })
            .collect();
        parts.sort();
        if parts.is_empty() {
            return Err(CheckpointError::NoWeights { path: dir.to_path_buf() });
        }
        Ok(parts)
    }

    fn check_index(&self) -> Result<(), CheckpointError> {
        let Some(map) = Self::read_index(&self.dir)? else { return Ok(()) };
        let mut missing: Vec<String> = map.keys().filter(|k| !self.by_name.contains_key(*k)).cloned().collect();
        let mut extra: Vec<String> = self.by_name.keys().filter(|k| !map.contains_key(*k)).cloned().collect();
        if missing.is_empty() && extra.is_empty() {
            return Ok(());
        }
        missing.sort();
        extra.sort();
        Err(CheckpointError::IndexMismatch { index: Self::index_path(&self.dir), missing, extra })
    }

    /// A source that is one file read by other means (a GGUF file): no safetensors, no config.
    pub fn other_file(path: &Path) -> Checkpoint {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Checkpoint {
            dir,
            config: None,
            files: Vec::new(),
            other_sources: vec![path.to_path_buf()],
            by_name: HashMap::new(),
        }
    }

    /// All tensors, in the reference converter's order.
    pub fn tensors(&self) -> impl Iterator<Item = &SourceTensor> {
        self.files.iter().flat_map(|f| f.tensors.iter())
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.by_name.get(name).map(|&(f, t)| &self.files[f].tensors[t])
    }

    pub fn bytes(&self, t: &SourceTensor) -> &[u8] {
        self.files[t.file].bytes(t)
    }

    /// The path of the file holding `t`.
    pub fn file_of(&self, t: &SourceTensor) -> &Path {
        &self.files[t.file].path
    }

    /// Drops the mapped pages of every file from this process (see [`SafetensorsFile::release_pages`]).
    pub fn release_pages(&self) {
        self.files.iter().for_each(SafetensorsFile::release_pages);
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        let other: u64 = self.other_sources.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
        self.tensors().map(|t| t.n_bytes()).sum::<u64>() + other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    /// Writes a safetensors file holding `names`, each a bf16 [2, 2] tensor.
    fn write_st(path: &Path, names: &[&str]) {
        let data = vec![0u8; 8];
        let views: Vec<(String, TensorView)> =
            names.iter().map(|n| (n.to_string(), TensorView::new(Dtype::BF16, vec![2, 2], &data).unwrap())).collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn config(dir: &Path) {
        fs_write(&dir.join("config.json"), br#"{"architectures": ["LlamaForCausalLM"]}"#);
    }

    fn fs_write(p: &Path, b: &[u8]) {
        std::fs::write(p, b).unwrap();
    }

    #[test]
    fn parts_and_names_are_visited_in_reference_order() {
        let d = tempfile::tempdir().unwrap();
        config(d.path());
        write_st(&d.path().join("model-00002-of-00002.safetensors"), &["b.weight", "a.weight"]);
        write_st(&d.path().join("model-00001-of-00002.safetensors"), &["model.layers.10.x", "model.layers.2.x"]);
        let ck = Checkpoint::open(d.path()).unwrap();
        let names: Vec<&str> = ck.tensors().map(|t| t.name.as_str()).collect();
        // sorted part names, then plain string order inside each part (10 < 2)
        assert_eq!(names, ["model.layers.10.x", "model.layers.2.x", "a.weight", "b.weight"]);
        let t = ck.get("a.weight").unwrap();
        assert_eq!(ck.bytes(t).len(), 8);
        assert_eq!(t.shape, [2, 2]);
        assert_eq!(ck.total_bytes(), 32);
    }

    #[test]
    fn duplicate_tensor_across_shards_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        config(d.path());
        write_st(&d.path().join("model-00001-of-00002.safetensors"), &["x"]);
        write_st(&d.path().join("model-00002-of-00002.safetensors"), &["x"]);
        assert!(matches!(Checkpoint::open(d.path()), Err(CheckpointError::DuplicateTensor { .. })));
    }

    #[test]
    fn directory_without_weights_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        config(d.path());
        assert!(matches!(Checkpoint::open(d.path()), Err(CheckpointError::NoWeights { .. })));
    }

    #[test]
    fn absolute_or_nested_shard_paths_escape() {
        for bad in ["/etc/passwd", "sub/model.safetensors", "..", "../m.safetensors"] {
            let d = tempfile::tempdir().unwrap();
            config(d.path());
            let idx = serde_json::json!({"weight_map": {"x": bad}});
            fs_write(&d.path().join("model.safetensors.index.json"), idx.to_string().as_bytes());
            assert!(matches!(Checkpoint::open(d.path()), Err(CheckpointError::ShardEscapes { .. })), "{bad}");
        }
    }

    #[test]
    fn unsupported_dtype_names_the_tensor() {
        let d = tempfile::tempdir().unwrap();
        config(d.path());
        let data = vec![0u8; 16];
        let v = vec![("c.weight".to_string(), TensorView::new(Dtype::C64, vec![2], &data).unwrap())];
        safetensors::serialize_to_file(v, None, &d.path().join("model.safetensors")).unwrap();
        match Checkpoint::open(d.path()) {
            Err(CheckpointError::UnsupportedDType { tensor, .. }) => assert_eq!(tensor, "c.weight"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("C64 must be refused"),
        }
    }

    #[test]
    fn single_file_without_config_opens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.safetensors");
        write_st(&p, &["a"]);
        let ck = Checkpoint::open(&p).unwrap();
        assert!(ck.config.is_none());
        assert_eq!(ck.tensors().count(), 1);
    }
}
