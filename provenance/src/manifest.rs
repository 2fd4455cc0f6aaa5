//! Provenance manifests (`OUT.sling.json`) and their verification.
//!
//! `sling convert` writes, next to its output, one manifest for the whole artifact (all shards of a
//! split output): the sling version and git commit, the conversion options, the compute path, the
//! size and sha256 of every source file read and of every output file, and per tensor its place
//! (file, offset, bytes), type, shape, sha256 and the source tensors it came from. Output hashes are
//! those of the bytes as they were written ([`sling_formats::gguf::GgufWriter::finish_hashed`]); nothing is
//! read back. Apart from the optional `created` timestamp (omitted with `--reproducible`, pinned by
//! `SOURCE_DATE_EPOCH`), the same source and options give the same bytes, whatever the thread count or
//! run (`docs/reproducibility.md`). When a model card (`README.md`) is written with the artifact, its
//! size and sha256 are in `model_card`, and [`verify`] checks it too.
//!
//! The manifest is sealed by `manifest_sha256`: the sha256 of its canonical JSON without that field
//! (see [`canonical_json`]), which catches a manifest edited by hand or damaged on disk (not a
//! forger, who can recompute it: signatures are for that).
//!
//! `sling quantize` also records every option that decides the tensor types and bytes
//! (`options.quantize`, [`QuantizeRecord`]: preset, recipe and its resolved rules, imatrix file and
//! hash, flags), so that a reader sees the exact recipe and [`verify_with`] can rebuild the plan.
//! Quality figures measured on the artifact (`quality`) are added afterwards by [`attach_quality`],
//! which also re-renders the model card's quality row and section and reseals the manifest.
//!
//! [`verify`] re-hashes every output file and every tensor's bytes against the manifest, looks for
//! missing and extra files of the set, checks the seal, and optionally re-hashes the source files;
//! [`verify_with`] can also re-derive tensors from the source, through the target's [`Rederiver`]
//! that the caller supplies (GGUF's: `sling_target_gguf::rederive`): rebuild the plan from the
//! recorded options, recompute a sample of tensors (or all of them) and compare their sha256 with the
//! manifest and the file. The schema is documented in `docs/manifest.md`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use sling_core::Role;
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::write::{hex, Written};
use sling_formats::gguf::{GgufFile, SplitPolicy};

pub mod rederive;
pub use rederive::{RederiveInputs, RederiveReport, RederiveStatus, Rederiver, DEFAULT_SAMPLE};

/// The value of the `schema` field this version writes and reads.
pub const SCHEMA: &str = "sling.manifest/1";
/// What is appended to the output's stem to name its manifest.
pub const MANIFEST_SUFFIX: &str = ".sling.json";
/// Read size when hashing files.
const HASH_BUF: usize = 1 << 20;

/// Files of a model directory that a conversion may read besides the weights (config and
/// tokenizer). Those present are hashed into the manifest.
pub const SOURCE_METADATA_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "tekken.json",
    "model.safetensors.index.json",
];

/// Errors that stop a manifest from being written or read. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid manifest: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: unsupported manifest schema {found:?} (this sling reads {SCHEMA:?})")]
    Schema { path: PathBuf, found: String },
    #[error("cannot serialize the manifest for {path}: {source}")]
    Serialize { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: String },
}

/// Who made the artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `"sling"`.
    pub name: String,
    /// The crate version.
    pub version: String,
    /// `git rev-parse HEAD` at build time, or `"unknown"`.
    pub git_commit: String,
}

/// How the output was split (`0` = no limit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub max_tensors: u64,
    pub max_bytes: u64,
    pub small_first_shard: bool,
    /// Whose shard layout: absent for gguf-py's (`convert`, and manifests written before this was recorded),
    /// `"llama-gguf-split"` for `quantize`'s ([`SplitPolicy::LlamaGgufSplit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<SplitLayout>,
}

/// [`Split::layout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitLayout {
    LlamaGgufSplit,
}

impl From<SplitPolicy> for Split {
    fn from(s: SplitPolicy) -> Split {
        let (max_tensors, max_bytes, small_first_shard) = s.limits();
        let layout = s.is_llama_gguf_split().then_some(SplitLayout::LlamaGgufSplit);
        Split { max_tensors: max_tensors as u64, max_bytes, small_first_shard, layout }
    }
}

/// The conversion options that shape the output bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Options {
    /// Target format: `"gguf"`.
    pub to: String,
    /// Output type asked for (`f32`, `f16`, `bf16`, `q8_0`); per-tensor types are in `tensors`.
    #[serde(rename = "type")]
    pub out_type: String,
    pub split: Split,
    pub tokenizer_pre: Option<String>,
    pub allow_nonfinite: bool,
    /// `sling quantize` only: every option that decides the tensor types (absent for `sling convert`
    /// and in manifests written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantizeRecord>,
    /// `sling quantize --to vllm:…|mlx:…` only: what decides the artifact's tensors besides the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetRecord>,
}

/// The options of an artifact written by the target-agnostic pipeline (`--to vllm:…`, `--to mlx:…`):
/// enough for `sling verify --source` to plan it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// `vllm:w4a16`, `mlx:4`.
    pub target: String,
    /// `--group-size` (mlx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u64>,
    /// `--strict`.
    pub strict: bool,
    /// Calibrated quantization (`--method gptq|awq`): its settings, the calibration data and what fell back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
    /// The recipe that chose each weight's bits (`--recipe FILE`, or what `mlx:auto` allocated), as TOML text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
}

/// How a calibrated quantization (GPTQ, AWQ) was run: enough to run it again (`verify --source --data`) and to
/// see which weights it could not calibrate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    /// The method and its own settings (`"method": "gptq"` or `"awq"` beside them in the JSON).
    #[serde(flatten)]
    pub method: MethodRecord,
    /// Each layer calibrated on the outputs of the already-quantized layers before it.
    pub sequential: bool,
    /// Every token through every routed expert for the statistics.
    pub all_experts: bool,
    /// Routed experts with fewer routed calibration tokens fall back to round-to-nearest.
    pub min_expert_tokens: u64,
    /// The calibration data.
    pub data: CalibrationData,
    /// Weights quantized by round-to-nearest instead, with why.
    pub fallbacks: Vec<CalibrationFallback>,
    /// Per MoE layer (`model.layers.N`), the calibration tokens the router sent to each expert.
    pub expert_tokens: std::collections::BTreeMap<String, Vec<u64>>,
}

/// The calibrated method of a [`CalibrationRecord`] and the settings only it has.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum MethodRecord {
    Gptq {
        /// Dampening (fraction of the Hessian's mean diagonal).
        damp: f64,
        /// Block width (columns).
        block: u64,
        act_order: bool,
    },
    /// AWQ's grid search (llm-compressor's `AWQModifier` names).
    Awq {
        /// Grid points tried per mapping (`n_grid`).
        n_grid: u64,
        /// Scales divided by the weight magnitude too (`duo_scaling`).
        duo_scaling: bool,
    },
    /// AWQ's scales, then GPTQ on the smoothed model (llm-compressor's `[AWQModifier, GPTQModifier]` recipe).
    #[serde(rename = "awq-gptq")]
    AwqGptq { n_grid: u64, duo_scaling: bool, damp: f64, block: u64, act_order: bool },
}

impl MethodRecord {
    /// `gptq`, `awq` or `awq-gptq`, as `--method` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            MethodRecord::Gptq { .. } => "gptq",
            MethodRecord::Awq { .. } => "awq",
            MethodRecord::AwqGptq { .. } => "awq-gptq",
        }
    }
}

/// The calibration data of a [`CalibrationRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationData {
    /// The file name as given (`calib.txt`).
    pub name: String,
    /// The file holds token ids (`--tokens`), not text (`--data`).
    #[serde(default)]
    pub token_ids: bool,
    /// sha256 of the file's bytes.
    pub sha256: String,
    /// Tokens per sequence and sequences used.
    pub ctx: u64,
    pub chunks: u64,
    pub tokens: u64,
}

/// A weight a calibrated method could not calibrate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationFallback {
    pub weight: String,
    /// Calibration rows (tokens) it saw.
    pub tokens: u64,
    pub why: String,
}

/// The manifest's name inside an artifact directory (`sling quantize --to vllm:…|mlx:…`).
pub const DIR_MANIFEST: &str = "sling.json";

/// What `sling quantize` was asked for, resolved: enough to read the exact recipe and to rebuild the
/// plan (`sling_target_gguf::quantize::QuantizeOptions`) when verifying against the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizeRecord {
    /// The llama-quantize preset the types derive from (a recipe's `base`): `Q4_K_M`.
    pub ftype: String,
    /// Its `llama_ftype` id, as written in `general.file_type`.
    pub file_type: u32,
    /// The recipe, when one was used (`--to gguf:moe-q4`, `--recipe FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<RecipeRecord>,
    /// `--tensor-type-file`, when given (its rules are in `rules`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_type_file: Option<FileRecord>,
    /// Every type rule, resolved, in the order they are tried (first match wins): the `--tensor-type`
    /// flags, then the `--tensor-type-file` rules, then the recipe's rules.
    pub rules: Vec<RuleRecord>,
    /// `--pure`.
    pub pure: bool,
    /// `--leave-output-tensor`.
    pub leave_output_tensor: bool,
    /// `--output-tensor-type` (a ggml type name).
    pub output_tensor_type: Option<String>,
    /// `--token-embedding-type` (a ggml type name).
    pub token_embedding_type: Option<String>,
    /// `--allow-requantize`.
    pub allow_requantize: bool,
    /// `--imatrix`, when given.
    pub imatrix: Option<ImatrixRecord>,
    /// `--override-kv` values as given (`KEY=TYPE:VALUE`), in order.
    pub override_kv: Vec<String>,
    /// The source was this GGUF file (its path relative to the source directory, as in `sources`)
    /// rather than a Hugging Face checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_gguf: Option<String>,
}

/// A file given on the command line: the path as given, its size and sha256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

impl FileRecord {
    /// Hashes `path` (recorded as given).
    pub fn of(path: &Path) -> Result<FileRecord, ManifestError> {
        let (size, sha256) = hash_file(path)?;
        Ok(FileRecord { path: path.display().to_string(), size, sha256 })
    }
}

/// The recipe used: a named one (`moe-q4`) or a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeRecord {
    /// `moe-q4`, or the file's path as given.
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The recipe file (`--recipe FILE`); absent for a named recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRecord>,
}

/// One type rule, as the quantizer applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    /// Where it came from: `tensor-type`, `tensor-type-file` or `recipe`.
    pub from: String,
    /// Its text in reports (`ffn_down_exps` for a flag, `moe-q4#5(role=routed_experts,name=…)` for a
    /// recipe rule).
    pub pattern: String,
    /// The regular expression searched in the GGUF tensor name, as compiled (`--tensor-type`
    /// patterns are lower-cased first, as llama-quantize does).
    pub regex: String,
    /// The ggml type it sets.
    #[serde(rename = "type")]
    pub dtype: String,
    /// Only tensors of this role (recipe rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Only tensors of blocks in this inclusive range (recipe rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<[u64; 2]>,
}

/// The importance matrix used: the file as given, and how it was filtered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImatrixRecord {
    /// The path as given (also what `quantize.imatrix.file` holds in the GGUF).
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// `--include-weights`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_weights: Vec<String>,
    /// `--exclude-weights`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_weights: Vec<String>,
    /// Entries used, after the filters.
    pub entries: u64,
    /// Calibration data named in the file (`imatrix.datasets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
    /// Chunks it was computed from (`imatrix.chunk_count`; 0 when unknown).
    pub chunk_count: u32,
}

/// A file read from the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Relative to the source directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// A file of the artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// File name, in the manifest's directory.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// One output tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    pub name: String,
    /// ggml type name (`ggml_type_name`): `f32`, `bf16`, `q8_0`, `mxfp4`, ...
    #[serde(rename = "type")]
    pub dtype: String,
    /// ggml order (`ne[0]` innermost).
    pub ne: Vec<u64>,
    /// The output file holding it (an [`OutputFile::name`]).
    pub file: String,
    /// Absolute offset of its first data byte in that file.
    pub offset: u64,
    pub n_bytes: u64,
    /// sha256 of its data bytes (without padding).
    pub sha256: String,
    /// Source tensor names it was computed from.
    pub sources: Vec<String>,
}

/// A weight kept at source precision, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRecord {
    pub name: String,
    pub why: String,
}

/// A provenance manifest; see the module docs and `docs/manifest.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`SCHEMA`].
    pub schema: String,
    pub sling: Tool,
    /// When the artifact was made (RFC 3339, UTC, seconds): the current time, or `SOURCE_DATE_EPOCH`;
    /// absent with `--reproducible`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub options: Options,
    /// Where tensors were computed: `"cpu"`.
    pub compute: String,
    /// The output name given to the converter (with splits, the base of the shard names).
    pub output: String,
    pub sources: Vec<SourceFile>,
    pub outputs: Vec<OutputFile>,
    /// The model card written beside the outputs (`README.md`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_card: Option<OutputFile>,
    /// Quality figures measured on the artifact (a JSON object: `kld_mean`, `kld_p99`, `kld_max`,
    /// `top1`, `ppl`, `ppl_ref`, `data`, `chunks`, `ctx`, …), added by [`attach_quality`]; absent
    /// when not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<Value>,
    /// Weights the target's scheme cannot take (a row length its group size does not divide), kept at
    /// source precision; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<KeptRecord>,
    pub tensors: Vec<TensorRecord>,
    /// sha256 of [`canonical_json`] of the manifest without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
}

/// The manifest path for an output: `dir/stem.gguf` → `dir/stem.sling.json` (with splits, `stem` is
/// the base name given with `-o`).
pub fn manifest_path(output: &Path) -> PathBuf {
    let mut name = output.file_stem().map(|s| s.to_os_string()).unwrap_or_default();
    name.push(MANIFEST_SUFFIX);
    output.with_file_name(name)
}

/// JSON with object keys sorted (byte order), no whitespace, UTF-8: what `manifest_sha256` hashes.
/// Python gives the same bytes with `json.dumps(v, sort_keys=True, separators=(",", ":"),
/// ensure_ascii=False)` for the values a manifest holds.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    if let Some(x) = m.get(k) {
                        out.insert(k.clone(), sort(x));
                    }
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    // Serializing a Value cannot fail (all keys are strings).
    serde_json::to_vec(&sort(v)).unwrap_or_default()
}

/// `manifest_sha256` for a manifest given as JSON: the sha256 of its canonical form without that field.
pub fn seal_of(v: &Value) -> String {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("manifest_sha256");
    }
    hex(&Sha256::digest(canonical_json(&v)))
}

impl Manifest {
    /// Sets `manifest_sha256`.
    pub fn seal(&mut self, path: &Path) -> Result<(), ManifestError> {
        self.manifest_sha256 = None;
        let v = serde_json::to_value(&*self)
            .map_err(|source| ManifestError::Serialize { path: path.to_path_buf(), source })?;
        self.manifest_sha256 = Some(seal_of(&v));
        Ok(())
    }

    /// The bytes written to disk: pretty JSON in field order, and a final newline.
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>, ManifestError> {
        let mut b = serde_json::to_vec_pretty(self)
            .map_err(|source| ManifestError::Serialize { path: path.to_path_buf(), source })?;
        b.push(b'\n');
        Ok(b)
    }

    /// Seals the manifest and writes it atomically (temporary file in the same directory, fsync,
    /// rename, fsync of the directory).
    pub fn write(&mut self, path: &Path) -> Result<(), ManifestError> {
        self.seal(path)?;
        let bytes = self.to_bytes(path)?;
        write_atomic(path, &bytes)
    }

    /// Reads and parses a manifest; also returns its raw JSON (for the seal check).
    pub fn read(path: &Path) -> Result<(Manifest, Value), ManifestError> {
        let bytes = std::fs::read(path).map_err(|source| ManifestError::Read { path: path.to_path_buf(), source })?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|source| ManifestError::Json { path: path.to_path_buf(), source })?;
        let schema = v.get("schema").and_then(Value::as_str).unwrap_or("");
        if schema != SCHEMA {
            let found = match v.get("schema") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "(none)".into(),
            };
            return Err(ManifestError::Schema { path: path.to_path_buf(), found });
        }
        let m: Manifest = serde_json::from_value(v.clone())
            .map_err(|source| ManifestError::Json { path: path.to_path_buf(), source })?;
        Ok((m, v))
    }
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ManifestError> {
    let err = |source| ManifestError::Write { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(&dir).map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Size and sha256 of a file, read in 1 MiB pieces.
pub fn hash_file(path: &Path) -> Result<(u64, String), ManifestError> {
    hash_file_until(path, None)
}

/// [`hash_file`] that gives up (with an `Interrupted` error) once `cancel` is set.
fn hash_file_until(path: &Path, cancel: Option<&AtomicBool>) -> Result<(u64, String), ManifestError> {
    let err = |source| ManifestError::Read { path: path.to_path_buf(), source };
    let mut f = File::open(path).map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut n = 0u64;
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(err(std::io::Error::new(std::io::ErrorKind::Interrupted, "cancelled")));
        }
        let k = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        };
        h.update(buf.get(..k).unwrap_or(&[]));
        n += k as u64;
    }
    Ok((n, hex(&h.finalize())))
}

/// `path` relative to `dir`, `/`-separated (the file name when it is not under `dir`).
fn relative(dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(dir).ok().filter(|r| !r.as_os_str().is_empty());
    let rel = rel.unwrap_or_else(|| Path::new(path.file_name().unwrap_or_default()));
    rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

/// Each source file's path (as [`source_paths`] names it) with its size and modification time, or `missing`:
/// what a resume journal's fingerprint covers, so that a source changed between two runs is never resumed.
pub fn source_stamps(ck: &Checkpoint) -> Vec<(String, String)> {
    source_paths(ck)
        .into_iter()
        .map(|(rel, p)| {
            let stamp = match std::fs::metadata(&p) {
                Ok(m) => {
                    let mtime = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    format!("{} {mtime}", m.len())
                }
                Err(_) => "missing".to_string(),
            };
            (rel, stamp)
        })
        .collect()
}

/// The sample of `len` items (in order) that re-derivation recomputes, as indices in increasing order: the middle
/// of each of `n` equal runs, so the sample is spread over the whole artifact (all of them when `n ≥ len`); when
/// none of those is a routed expert (`routed(i)`) and some item is, the middle routed one replaces the nearest
/// pick.
pub fn spread_sample(len: usize, n: usize, routed: impl Fn(usize) -> bool) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).map(|k| (2 * k + 1) * len / (2 * n)).collect();
    if !idx.iter().any(|&i| routed(i)) {
        let all: Vec<usize> = (0..len).filter(|&i| routed(i)).collect();
        if let Some(&r) = all.get(all.len() / 2) {
            if let Some(j) = (0..idx.len()).min_by_key(|&j| idx[j].abs_diff(r)) {
                idx[j] = r;
            }
            idx.sort_unstable();
            idx.dedup();
        }
    }
    idx
}

/// Every file a conversion of `ck` reads: the config and tokenizer files present, the index and the
/// weight files; sorted by relative path.
pub fn source_paths(ck: &Checkpoint) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    let mut seen = HashSet::new();
    for name in SOURCE_METADATA_FILES {
        let p = ck.dir.join(name);
        if p.is_file() && seen.insert(name.to_string()) {
            out.push((name.to_string(), p));
        }
    }
    for path in ck.files.iter().map(|f| &f.path).chain(&ck.other_sources) {
        let rel = relative(&ck.dir, path);
        if seen.insert(rel.clone()) {
            out.push((rel, path.clone()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Hashes the source files in parallel (one file per task).
pub fn hash_sources(ck: &Checkpoint) -> Result<Vec<SourceFile>, ManifestError> {
    source_paths(ck)
        .into_par_iter()
        .map(|(path, p)| hash_file(&p).map(|(size, sha256)| SourceFile { path, size, sha256 }))
        .collect()
}

/// Hashes a checkpoint's source files, one file at a time from a shared queue, by any number of
/// workers: a background thread during the conversion ([`work`](Self::work)), then every rayon
/// thread once the outputs are written ([`work_all`](Self::work_all)), so that source hashing
/// overlaps the conversion instead of following it.
pub struct SourceHasher {
    paths: Vec<(String, PathBuf)>,
    next: AtomicUsize,
    cancel: AtomicBool,
    results: Mutex<Vec<Option<Result<SourceFile, ManifestError>>>>,
}

impl SourceHasher {
    pub fn new(ck: &Checkpoint) -> SourceHasher {
        let paths = source_paths(ck);
        let results = Mutex::new(paths.iter().map(|_| None).collect());
        SourceHasher { paths, next: AtomicUsize::new(0), cancel: AtomicBool::new(false), results }
    }

    /// Hashes files from the queue until it is empty or [`cancel`](Self::cancel) is called.
    pub fn work(&self) {
        while !self.cancel.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some((rel, p)) = self.paths.get(i) else { break };
            let r = hash_file_until(p, Some(&self.cancel)).map(|(size, sha256)| SourceFile {
                path: rel.clone(),
                size,
                sha256,
            });
            if let Ok(mut g) = self.results.lock() {
                if let Some(slot) = g.get_mut(i) {
                    *slot = Some(r);
                }
            }
        }
    }

    /// [`work`](Self::work) on every rayon thread; returns when the queue is empty (files taken by
    /// other workers may still be in progress).
    pub fn work_all(&self) {
        rayon::broadcast(|_| self.work());
    }

    /// Stops the workers soon (within a 1 MiB read).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// The hashes, in [`source_paths`] order, once every worker has stopped.
    pub fn into_results(self) -> Result<Vec<SourceFile>, ManifestError> {
        let results = self.results.into_inner().unwrap_or_else(|e| e.into_inner());
        results
            .into_iter()
            .zip(self.paths)
            .map(|(r, (_, p))| {
                r.unwrap_or_else(|| {
                    Err(ManifestError::Read { path: p, source: std::io::Error::other("source file was not hashed") })
                })
            })
            .collect()
    }
}

/// Builds the (unsealed) manifest of a finished conversion. `sources_of` gives each output tensor's
/// source tensor names.
pub fn build(
    tool: &Tool,
    options: Options,
    output: &Path,
    sources: Vec<SourceFile>,
    written: &Written,
    sources_of: &HashMap<String, Vec<String>>,
) -> Manifest {
    let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let outputs: Vec<OutputFile> = written
        .files
        .iter()
        .map(|f| OutputFile { name: file_name(&f.path), size: f.size, sha256: f.sha256.clone() })
        .collect();
    let tensors = written
        .tensors
        .iter()
        .map(|t| TensorRecord {
            name: t.name.clone(),
            dtype: t.dtype.name().to_string(),
            ne: t.ne.clone(),
            file: outputs.get(t.file).map(|f| f.name.clone()).unwrap_or_default(),
            offset: t.offset,
            n_bytes: t.n_bytes,
            sha256: t.sha256.clone(),
            sources: sources_of.get(&t.name).cloned().unwrap_or_default(),
        })
        .collect();
    Manifest {
        schema: SCHEMA.to_string(),
        sling: tool.clone(),
        created: None,
        options,
        compute: "cpu".to_string(),
        output: file_name(output),
        sources,
        outputs,
        model_card: None,
        quality: None,
        kept: Vec::new(),
        tensors,
        manifest_sha256: None,
    }
}

/// Records quality figures measured on an artifact that is already written (`sling quantize --eval`,
/// `sling eval`): sets `quality` in the manifest at `manifest_path` (replacing any figures recorded
/// before), re-renders the model card's quality row and "Quality" section when the manifest lists a
/// card ([`crate::card::with_quality`]; the rest of the card is kept as written, so no card
/// context needs storing), then writes the card and the manifest with the card's new size and sha256
/// and a fresh `manifest_sha256`, each atomically, card first.
///
/// Refused, with nothing written, when `quality` is not a JSON object, when the manifest's seal does
/// not match its content, when it holds fields this sling does not know (a newer sling's), or when the
/// card differs from the manifest's record of it: an edited manifest or card is never resealed. The
/// outputs are not re-hashed (`verify` does that). A crash between the two writes leaves a card that
/// the manifest does not describe, which `verify` reports as a mismatch, never as verified.
pub fn attach_quality(manifest_path: &Path, quality: Value) -> Result<(), ManifestError> {
    let refuse = |path: &Path, why: &str| ManifestError::Refused { path: path.to_path_buf(), why: why.to_string() };
    if !quality.is_object() {
        return Err(refuse(manifest_path, "quality figures must be a JSON object"));
    }
    let (mut m, raw) = Manifest::read(manifest_path)?;
    if m.manifest_sha256.as_deref() != Some(seal_of(&raw).as_str()) {
        return Err(refuse(
            manifest_path,
            "the manifest's seal (manifest_sha256) does not match its content: it was edited, and is not resealed",
        ));
    }
    let known = serde_json::to_value(&m)
        .map_err(|source| ManifestError::Serialize { path: manifest_path.to_path_buf(), source })?;
    if known != raw {
        return Err(refuse(
            manifest_path,
            "the manifest holds fields this sling does not know (written by a newer sling?)",
        ));
    }
    m.quality = Some(quality);
    if let Some(card) = m.model_card.clone() {
        if !is_plain_name(&card.name) {
            return Err(refuse(manifest_path, &format!("model card name {:?} is not a plain file name", card.name)));
        }
        let dir = match manifest_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let p = dir.join(&card.name);
        let bytes = std::fs::read(&p).map_err(|source| ManifestError::Read { path: p.clone(), source })?;
        if bytes.len() as u64 != card.size || hex(&Sha256::digest(&bytes)) != card.sha256 {
            return Err(refuse(
                &p,
                "the model card differs from the manifest's record of it (edited?), and is not rewritten",
            ));
        }
        let text = String::from_utf8(bytes).map_err(|_| refuse(&p, "the model card is not UTF-8"))?;
        let text = crate::card::with_quality(&text, m.quality.as_ref())
            .ok_or_else(|| refuse(&p, "not a model card sling can update (no quality row or Quality section)"))?;
        write_atomic(&p, text.as_bytes())?;
        m.model_card = Some(OutputFile {
            name: card.name,
            size: text.len() as u64,
            sha256: hex(&Sha256::digest(text.as_bytes())),
        });
    }
    m.write(manifest_path)
}

/// `secs` since the Unix epoch as RFC 3339 UTC (`2024-05-01T12:00:00Z`), as `created` holds it.
pub fn rfc3339(secs: u64) -> String {
    // Civil date from days since 1970-01-01 (H. Hinnant's `civil_from_days`).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

/// What kind of difference a [`Problem`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// `manifest_sha256` is missing or does not match the manifest's content.
    ManifestEdited,
    /// The manifest itself is inconsistent (a bad file name, a tensor in no listed file).
    ManifestInvalid,
    /// An output file listed in the manifest is missing or unreadable.
    MissingFile,
    /// A file of the same set (the base name or a shard name) is not in the manifest.
    ExtraFile,
    /// An output file's size or sha256 differs.
    FileHash,
    /// An output file is not a GGUF that can be parsed.
    NotGguf,
    /// A tensor listed in the manifest is missing from its file.
    MissingTensor,
    /// A file holds a tensor the manifest does not list.
    ExtraTensor,
    /// A tensor's type, shape, offset or size differs.
    TensorInfo,
    /// A tensor's data bytes differ.
    TensorData,
    /// A source file is missing or unreadable.
    MissingSource,
    /// A source file's size or sha256 differs.
    SourceHash,
    /// The imatrix given to `verify --imatrix` is not the one the manifest records.
    ImatrixHash,
    /// Re-derivation: the source and the recorded options give no such tensor, or one of another type,
    /// shape or source tensors, or a tensor the manifest does not list.
    RederivedTensor,
    /// Re-derivation: the output's metadata (GGUF key/value pairs) differs from what the source and the
    /// recorded options give.
    RederivedMetadata,
    /// Re-derivation: a tensor recomputed from the source hashes differently from the manifest (or
    /// from the file).
    RederivedData,
}

/// One difference between the artifact and its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The file concerned (an output name, a source path, or the manifest's name).
    pub file: Option<String>,
    /// The tensor concerned, where there is one.
    pub tensor: Option<String>,
    /// A one-line description naming the file (and tensor).
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A [`Problem`] about `file` (and `tensor`).
pub fn problem(kind: ProblemKind, file: &str, tensor: Option<&str>, message: String) -> Problem {
    Problem { kind, file: Some(file.to_string()), tensor: tensor.map(str::to_string), message }
}

/// The result of [`verify`] / [`verify_with`]: verified when `problems` is empty and the
/// re-derivation, if one was asked for, could be made.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub manifest: PathBuf,
    pub files_checked: usize,
    pub tensors_checked: usize,
    pub sources_checked: usize,
    pub problems: Vec<Problem>,
    /// What re-deriving tensors from the source found, when it was asked for.
    pub rederive: Option<RederiveReport>,
    /// Remarks that are not problems (an `--imatrix` the manifest does not need, …).
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// No problem, and every check asked for was made.
    pub fn verified(&self) -> bool {
        self.problems.is_empty() && self.incomplete().is_none()
    }

    /// Why a check that was asked for (the re-derivation) could not be made, when there is no
    /// problem to report instead: then the artifact is neither verified nor a mismatch.
    pub fn incomplete(&self) -> Option<&str> {
        if !self.problems.is_empty() {
            return None;
        }
        match &self.rederive {
            Some(r) if r.status == RederiveStatus::NotChecked => Some(r.error.as_deref().unwrap_or("not checked")),
            _ => None,
        }
    }
}

/// What [`verify_with`] checks besides the artifact itself.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Re-hash the source files under this directory.
    pub source: Option<PathBuf>,
    /// Re-derive tensors from `source` (needs it).
    pub rederive: Rederive,
    /// The imatrix file, for re-deriving an artifact quantized with one (its sha256 must be the
    /// recorded one).
    pub imatrix: Option<PathBuf>,
    /// The calibration data, for re-deriving an artifact quantized with `--method gptq` (its sha256 must be the
    /// recorded one).
    pub data: Option<PathBuf>,
}

/// Which tensors [`verify_with`] recomputes from the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rederive {
    /// None (the source files are only re-hashed).
    #[default]
    Off,
    /// Up to this many, spread over the file and including a routed-expert tensor when there is one
    /// (GGUF's `sling_target_gguf::rederive::sample`); the plan (every tensor's name, type, shape) and the metadata are
    /// checked in full.
    Sample(usize),
    /// Every tensor.
    Full,
}

/// A plain file name (one normal path component).
fn is_plain_name(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty() && p.components().count() == 1 && matches!(p.components().next(), Some(Component::Normal(_)))
}

/// A relative path that stays inside its directory.
pub fn is_inner_path(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// `{stem}-NNNNN-of-NNNNN.gguf`.
fn is_shard_name(name: &str, stem: &str) -> bool {
    let Some(rest) = name.strip_prefix(stem).and_then(|r| r.strip_suffix(".gguf")) else { return false };
    let b = rest.as_bytes();
    b.len() == 15
        && b[0] == b'-'
        && b[1..6].iter().all(u8::is_ascii_digit)
        && &b[6..10] == b"-of-"
        && b[10..15].iter().all(u8::is_ascii_digit)
}

/// A tensor's name and the sha256 of its data bytes as found in an output file.
type TensorHash = (String, String);
/// [`TensorHash`] of every tensor of a file.
type FileTensorHashes = Vec<TensorHash>;

/// Checks one output file: its size and sha256, and each of its tensors (whose hashes it returns).
fn check_output(dir: &Path, out: &OutputFile, tensors: &[&TensorRecord]) -> (Vec<Problem>, FileTensorHashes) {
    let name = out.name.as_str();
    let path = dir.join(name);
    let mut problems = Vec::new();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            problems.push(problem(
                ProblemKind::MissingFile,
                name,
                None,
                format!("{name}: missing (not a regular file)"),
            ));
            return (problems, Vec::new());
        }
        Err(e) => {
            problems.push(problem(ProblemKind::MissingFile, name, None, format!("{name}: missing ({e})")));
            return (problems, Vec::new());
        }
    }
    let (file_hash, (tensor_problems, hashes)) = rayon::join(
        || hash_file(&path),
        || {
            if name.ends_with(".safetensors") {
                check_st_tensors(&path, name, tensors)
            } else if tensors.is_empty() && !name.ends_with(".gguf") {
                // A file of a directory artifact that holds no tensors (config.json, tokenizer files).
                (Vec::new(), Vec::new())
            } else {
                check_tensors(&path, name, tensors)
            }
        },
    );
    match file_hash {
        Ok((size, sha)) if size == out.size && sha == out.sha256 => {}
        Ok((size, sha)) => problems.push(problem(
            ProblemKind::FileHash,
            name,
            None,
            format!(
                "{name}: file differs: sha256 {sha}, {size} bytes; the manifest says sha256 {}, {} bytes",
                out.sha256, out.size
            ),
        )),
        Err(e) => problems.push(problem(ProblemKind::MissingFile, name, None, format!("{name}: {e}"))),
    }
    problems.extend(tensor_problems);
    (problems, hashes)
}

/// Parses `path` as safetensors (the checkpoint reader's validated header) and checks every tensor the manifest
/// places in it: dtype, shape (`ne` is the reversed shape), absolute offset, size, and the sha256 of its bytes.
fn check_st_tensors(path: &Path, name: &str, tensors: &[&TensorRecord]) -> (Vec<Problem>, FileTensorHashes) {
    let f = match sling_formats::checkpoint::SafetensorsFile::open(path, 0) {
        Ok(f) => f,
        Err(e) => {
            let p = problem(ProblemKind::NotGguf, name, None, format!("{name}: cannot be read as safetensors: {e}"));
            return (vec![p], Vec::new());
        }
    };
    let by_name: HashMap<&str, &sling_formats::checkpoint::SourceTensor> =
        f.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut problems = Vec::new();
    let mut hashes = Vec::new();
    for t in tensors {
        let tn = t.name.as_str();
        let Some(info) = by_name.get(tn) else {
            problems.push(problem(
                ProblemKind::MissingTensor,
                name,
                Some(tn),
                format!("{name}: tensor {tn} is missing"),
            ));
            continue;
        };
        let ne: Vec<u64> = info.shape.iter().rev().copied().collect();
        let (offset, n_bytes) = (info.start as u64, (info.end - info.start) as u64);
        if info.dtype.name() != t.dtype || ne != t.ne || offset != t.offset || n_bytes != t.n_bytes {
            problems.push(problem(
                ProblemKind::TensorInfo,
                name,
                Some(tn),
                format!(
                    "{name}: tensor {tn}: {} {:?} at offset {offset} ({n_bytes} bytes); the manifest says {} {:?} at offset {} ({} bytes)",
                    info.dtype.name(), ne, t.dtype, t.ne, t.offset, t.n_bytes
                ),
            ));
            continue;
        }
        let sha = hex(&Sha256::digest(f.bytes(info)));
        if sha != t.sha256 {
            problems.push(problem(
                ProblemKind::TensorData,
                name,
                Some(tn),
                format!("{name}: tensor {tn}: data differs: sha256 {sha}; the manifest says {}", t.sha256),
            ));
        }
        hashes.push((t.name.clone(), sha));
    }
    let listed: HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    for info in &f.tensors {
        if !listed.contains(info.name.as_str()) {
            let tn = info.name.as_str();
            problems.push(problem(
                ProblemKind::ExtraTensor,
                name,
                Some(tn),
                format!("{name}: tensor {tn} is not in the manifest"),
            ));
        }
    }
    (problems, hashes)
}

/// Parses `path` as GGUF and checks every tensor the manifest places in it; returns the problems and
/// the sha256 of the data of each tensor found with the listed type, shape and place.
fn check_tensors(path: &Path, name: &str, tensors: &[&TensorRecord]) -> (Vec<Problem>, FileTensorHashes) {
    let g = match GgufFile::open(path) {
        Ok(g) => g,
        Err(e) => {
            let p = problem(ProblemKind::NotGguf, name, None, format!("{name}: cannot be read as GGUF: {e}"));
            return (vec![p], Vec::new());
        }
    };
    let results: Vec<(Option<Problem>, Option<TensorHash>)> = tensors
        .par_iter()
        .map(|t| {
            let tn = t.name.as_str();
            let Some(info) = g.tensor(tn) else {
                let p = problem(ProblemKind::MissingTensor, name, Some(tn), format!("{name}: tensor {tn} is missing"));
                return (Some(p), None);
            };
            let offset = g.data_offset.saturating_add(info.offset);
            if info.dtype.name() != t.dtype || info.ne != t.ne || offset != t.offset || info.n_bytes != t.n_bytes {
                let p = problem(
                    ProblemKind::TensorInfo,
                    name,
                    Some(tn),
                    format!(
                        "{name}: tensor {tn}: {} {:?} at offset {offset} ({} bytes); the manifest says {} {:?} at offset {} ({} bytes)",
                        info.dtype.name(),
                        info.ne,
                        info.n_bytes,
                        t.dtype,
                        t.ne,
                        t.offset,
                        t.n_bytes
                    ),
                );
                return (Some(p), None);
            }
            let sha = hex(&Sha256::digest(g.tensor_data(info)));
            let p = (sha != t.sha256).then(|| {
                problem(
                    ProblemKind::TensorData,
                    name,
                    Some(tn),
                    format!("{name}: tensor {tn}: data differs: sha256 {sha}; the manifest says {}", t.sha256),
                )
            });
            (p, Some((t.name.clone(), sha)))
        })
        .collect();
    let mut problems = Vec::new();
    let mut hashes = Vec::new();
    for (p, h) in results {
        problems.extend(p);
        hashes.extend(h);
    }
    let listed: HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    for info in &g.tensors {
        if !listed.contains(info.name.as_str()) {
            let tn = info.name.as_str();
            problems.push(problem(
                ProblemKind::ExtraTensor,
                name,
                Some(tn),
                format!("{name}: tensor {tn} is not in the manifest"),
            ));
        }
    }
    (problems, hashes)
}

/// Verifies the artifact described by the manifest at `manifest_path` (output files are looked up in
/// the manifest's directory). With `source`, also re-hashes the source files under that directory
/// (no re-derivation: see [`verify_with`]).
///
/// `Err` means the check could not be made (manifest missing, unreadable or of another schema); a
/// report with problems means the artifact does not match.
pub fn verify(manifest_path: &Path, source: Option<&Path>) -> Result<VerifyReport, ManifestError> {
    verify_with(
        manifest_path,
        &VerifyOptions { source: source.map(Path::to_path_buf), ..VerifyOptions::default() },
        None,
    )
}

/// [`verify`], and with `opts.source` and `opts.rederive`, re-derivation: the plan is rebuilt from the
/// source and the options the manifest records, every tensor's name, type and shape and the output's
/// metadata are compared with it, and the chosen tensors are recomputed and their sha256 compared with
/// the manifest's and the file's. The re-derivation is the target's: `rederive` does it (the caller knows the
/// targets; `None`: none is made, the source files are only re-hashed). A re-derivation that cannot be made
/// (an imatrix not given, options not recorded, an unreadable source) leaves the report
/// [`VerifyReport::incomplete`].
pub fn verify_with(
    manifest_path: &Path,
    opts: &VerifyOptions,
    rederive: Option<&Rederiver<'_>>,
) -> Result<VerifyReport, ManifestError> {
    let source = opts.source.as_deref();
    let (m, raw) = Manifest::read(manifest_path)?;
    let dir = match manifest_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mname = manifest_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut problems = Vec::new();

    // The seal.
    let actual = seal_of(&raw);
    match &m.manifest_sha256 {
        Some(s) if *s == actual => {}
        Some(s) => problems.push(problem(
            ProblemKind::ManifestEdited,
            &mname,
            None,
            format!("{mname}: manifest was edited: its content hashes to {actual}, its manifest_sha256 says {s}"),
        )),
        None => problems.push(problem(
            ProblemKind::ManifestEdited,
            &mname,
            None,
            format!("{mname}: manifest has no manifest_sha256"),
        )),
    }

    // The manifest's own consistency.
    if m.outputs.is_empty() {
        problems.push(problem(ProblemKind::ManifestInvalid, &mname, None, format!("{mname}: lists no output file")));
    }
    let mut outputs = Vec::new();
    let mut names = HashSet::new();
    for o in &m.outputs {
        if !is_plain_name(&o.name) || !names.insert(o.name.as_str()) {
            problems.push(problem(
                ProblemKind::ManifestInvalid,
                &mname,
                None,
                format!("{mname}: output name {:?} is not a plain file name or appears twice", o.name),
            ));
        } else {
            outputs.push(o);
        }
    }
    let mut by_file: HashMap<&str, Vec<&TensorRecord>> = HashMap::new();
    for t in &m.tensors {
        if names.contains(t.file.as_str()) {
            by_file.entry(t.file.as_str()).or_default().push(t);
        } else {
            problems.push(problem(
                ProblemKind::ManifestInvalid,
                &mname,
                Some(t.name.as_str()),
                format!("{mname}: tensor {} is placed in {:?}, which is not a listed output", t.name, t.file),
            ));
        }
    }

    // Output files and their tensors.
    let per_file: Vec<(Vec<Problem>, FileTensorHashes)> = outputs
        .par_iter()
        .map(|o| check_output(&dir, o, by_file.get(o.name.as_str()).map(Vec::as_slice).unwrap_or(&[])))
        .collect();
    let mut file_hashes: HashMap<String, String> = HashMap::new();
    for (p, h) in per_file {
        problems.extend(p);
        file_hashes.extend(h);
    }

    // The model card, when the manifest lists one.
    if let Some(card) = &m.model_card {
        let name = card.name.as_str();
        if !is_plain_name(name) || names.contains(name) {
            problems.push(problem(
                ProblemKind::ManifestInvalid,
                &mname,
                None,
                format!("{mname}: model card name {name:?} is not a plain file name or is also an output"),
            ));
        } else {
            match hash_file(&dir.join(name)) {
                Ok((size, sha)) if size == card.size && sha == card.sha256 => {}
                Ok((size, sha)) => problems.push(problem(
                    ProblemKind::FileHash,
                    name,
                    None,
                    format!(
                        "{name}: model card differs: sha256 {sha}, {size} bytes; the manifest says sha256 {}, {} bytes",
                        card.sha256, card.size
                    ),
                )),
                Err(e) => problems.push(problem(
                    ProblemKind::MissingFile,
                    name,
                    None,
                    format!("{name}: model card missing ({e})"),
                )),
            }
        }
    }

    // Extra files of the same set.
    let base = if is_plain_name(&m.output) { m.output.clone() } else { String::new() };
    let stem = base.strip_suffix(".gguf").unwrap_or(&base).to_string();
    let manifest_stem = mname.strip_suffix(MANIFEST_SUFFIX).unwrap_or(&mname).to_string();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut extra: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !names.contains(n.as_str()))
            .filter(|n| {
                // A directory artifact: every file in it is the manifest's, its card's, or extra.
                (m.options.to != "gguf" && *n != mname && m.model_card.as_ref().map_or(true, |c| c.name != *n))
                    || (!base.is_empty() && (*n == base || is_shard_name(n, &stem)))
                    || *n == format!("{manifest_stem}.gguf")
                    || is_shard_name(n, &manifest_stem)
            })
            .collect();
        extra.sort();
        for n in extra {
            problems.push(problem(
                ProblemKind::ExtraFile,
                &n,
                None,
                format!("{n}: extra file of the set, not in the manifest"),
            ));
        }
    }

    // Sources.
    let mut sources_checked = 0;
    if let Some(src) = source {
        sources_checked = m.sources.len();
        let src_problems: Vec<Option<Problem>> = m
            .sources
            .par_iter()
            .map(|s| {
                let sp = s.path.as_str();
                if !is_inner_path(sp) {
                    return Some(problem(
                        ProblemKind::ManifestInvalid,
                        &mname,
                        None,
                        format!("{mname}: source path {sp:?} leaves the source directory"),
                    ));
                }
                match hash_file(&src.join(sp)) {
                    Ok((size, sha)) if size == s.size && sha == s.sha256 => None,
                    Ok((size, sha)) => Some(problem(
                        ProblemKind::SourceHash,
                        sp,
                        None,
                        format!("source {sp}: file differs: sha256 {sha}, {size} bytes; the manifest says sha256 {}, {} bytes", s.sha256, s.size),
                    )),
                    Err(e) => Some(problem(ProblemKind::MissingSource, sp, None, format!("source {sp}: missing or unreadable: {e}"))),
                }
            })
            .collect();
        problems.extend(src_problems.into_iter().flatten());
    }

    // Re-derivation from the source.
    let mut notes = Vec::new();
    let rederive = match (source, opts.rederive, rederive) {
        (Some(src), mode, Some(rederiver)) if mode != Rederive::Off => {
            let sources_differ =
                problems.iter().any(|p| matches!(p.kind, ProblemKind::SourceHash | ProblemKind::MissingSource));
            let inputs = RederiveInputs {
                manifest: &m,
                dir: &dir,
                source: src,
                mode,
                imatrix: opts.imatrix.as_deref(),
                data: opts.data.as_deref(),
                sources_differ,
                file_hashes: &file_hashes,
            };
            Some(rederiver(&inputs, &mut problems, &mut notes))
        }
        _ => None,
    };

    Ok(VerifyReport {
        manifest: manifest_path.to_path_buf(),
        files_checked: outputs.len(),
        tensors_checked: m.tensors.len(),
        sources_checked,
        problems,
        rederive,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names() {
        assert_eq!(manifest_path(Path::new("/o/m.gguf")), PathBuf::from("/o/m.sling.json"));
        assert_eq!(manifest_path(Path::new("m.Q8_0.gguf")), PathBuf::from("m.Q8_0.sling.json"));
        assert!(is_shard_name("m-00001-of-00003.gguf", "m"));
        assert!(is_shard_name("m-00004-of-00003.gguf", "m"));
        assert!(!is_shard_name("m-0001-of-00003.gguf", "m"));
        assert!(!is_shard_name("mm-00001-of-00003.gguf", "m"));
        assert!(!is_shard_name("m-00001-of-00003.gguf.tmp", "m"));
        assert!(is_plain_name("a.gguf"));
        assert!(!is_plain_name("../a.gguf"));
        assert!(!is_plain_name("/a.gguf"));
        assert!(!is_plain_name("d/a.gguf"));
        assert!(is_inner_path("d/a.json"));
        assert!(!is_inner_path("d/../../a.json"));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v: Value = serde_json::from_str(r#"{"b": [1, {"z": "é", "a": null}], "a": true}"#).unwrap();
        assert_eq!(String::from_utf8(canonical_json(&v)).unwrap(), r#"{"a":true,"b":[1,{"a":null,"z":"é"}]}"#);
        let mut with = v.clone();
        with["manifest_sha256"] = "x".into();
        assert_eq!(seal_of(&with), seal_of(&v));
    }

    #[test]
    fn source_hasher_matches_hash_sources() {
        let ck = Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/mixtral-sharded"))
            .unwrap();
        let sh = SourceHasher::new(&ck);
        std::thread::scope(|s| {
            s.spawn(|| sh.work());
            sh.work_all();
        });
        let got = sh.into_results().unwrap();
        assert_eq!(got, hash_sources(&ck).unwrap());
        assert_eq!(got.len(), 7);
        // Cancelled before any work: nothing hashed, which is an error.
        let sh = SourceHasher::new(&ck);
        sh.cancel();
        sh.work_all();
        assert!(sh.into_results().is_err());
    }

    #[test]
    fn old_manifests_parse_and_convert_manifests_gain_no_field() {
        let old = r#"{"schema":"sling.manifest/1","sling":{"name":"sling","version":"0.1.0","git_commit":"x"},
            "options":{"to":"gguf","type":"Q4_K_M","split":{"max_tensors":0,"max_bytes":0,"small_first_shard":false},
            "tokenizer_pre":null,"allow_nonfinite":false},"compute":"cpu","output":"m.gguf","sources":[],
            "outputs":[{"name":"m.gguf","size":1,"sha256":"00"}],"tensors":[]}"#;
        let m: Manifest = serde_json::from_str(old).unwrap();
        assert!(m.options.quantize.is_none() && m.quality.is_none());
        let v: Value = serde_json::from_slice(&m.to_bytes(Path::new("m")).unwrap()).unwrap();
        let want: Value = serde_json::from_str(old).unwrap();
        assert_eq!(v, want, "a manifest without the new fields writes none of them");
    }

    #[test]
    fn attach_quality_refuses_what_it_must_not_reseal() {
        let d = tempfile::tempdir().unwrap();
        let mp = d.path().join("m.sling.json");
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "schema": SCHEMA, "sling": {"name": "sling", "version": "0", "git_commit": "x"},
            "options": {"to": "gguf", "type": "bf16", "split": {"max_tensors": 0, "max_bytes": 0, "small_first_shard": false},
                "tokenizer_pre": null, "allow_nonfinite": false},
            "compute": "cpu", "output": "m.gguf", "sources": [], "outputs": [{"name": "m.gguf", "size": 1, "sha256": "00"}],
            "tensors": []
        }))
        .unwrap();
        m.write(&mp).unwrap();
        assert!(matches!(attach_quality(&mp, serde_json::json!([1])), Err(ManifestError::Refused { .. })));
        // No card: only the manifest changes, and stays sealed.
        attach_quality(&mp, serde_json::json!({"kld_mean": 0.5})).unwrap();
        let (m2, raw) = Manifest::read(&mp).unwrap();
        assert_eq!(m2.quality, Some(serde_json::json!({"kld_mean": 0.5})));
        assert_eq!(m2.manifest_sha256.as_deref(), Some(seal_of(&raw).as_str()));
        // An edited manifest is not resealed.
        let text = std::fs::read_to_string(&mp).unwrap().replace("\"bf16\"", "\"f16\"");
        std::fs::write(&mp, &text).unwrap();
        assert!(matches!(attach_quality(&mp, serde_json::json!({})), Err(ManifestError::Refused { .. })));
        assert_eq!(std::fs::read_to_string(&mp).unwrap(), text);
        // Nor one with fields this sling does not know.
        let mut v: Value = serde_json::from_str(&text.replace("\"f16\"", "\"bf16\"")).unwrap();
        v["future"] = 1.into();
        v["manifest_sha256"] = seal_of(&v).into();
        std::fs::write(&mp, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        assert!(matches!(attach_quality(&mp, serde_json::json!({})), Err(ManifestError::Refused { .. })));
    }

    #[test]
    fn hash_file_matches_a_one_shot_digest() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..(3 * HASH_BUF + 17)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        assert_eq!(hash_file(&p).unwrap(), (data.len() as u64, hex(&Sha256::digest(&data))));
        assert!(matches!(hash_file(&d.path().join("nope")), Err(ManifestError::Read { .. })));
    }
}
