//! Executing a [`Plan`] into an artifact directory.
//!
//! The [`crate::engine`] computes the weights in row chunks (aligned to each weight's `row_align`) a window at
//! a time, encoded by the [`Target`]; this module's container writes each chunk's parts at their places in the
//! shard set ([`sling_formats::st_write::sink`]). Chunk boundaries do not depend on the thread count and every
//! chunk is encoded on its own, so the bytes are the same for any `-t`. Peak memory is bounded by the window.
//!
//! Resume: while it runs, the executor keeps the journal every writer keeps ([`sling_formats::journal`]),
//! `OUT.partial.json` beside the partial directory: a header with a fingerprint of everything that decides the
//! bytes (the plan, the options, the code version, each source file's path, size and modification time) and the
//! shard names, then one entry per tensor of each complete weight (its shard, place and sha256), appended after
//! the shards are synced, at most every `SLING_JOURNAL_INTERVAL_MS` (default 5000; 0: as each weight completes).
//! With [`ExecOptions::resume`], a run whose header matches reopens the partial shards and takes back the
//! longest prefix of weights whose every tensor hashes as journaled (a damaged byte ends it), computing only the
//! rest; the result is byte-identical to an uninterrupted run. A run asked to resume keeps its partial
//! directory and journal if it fails too, with what reached the disk journaled.
//!
//! Test hook: `SLING_TEST_ABORT_AFTER_WEIGHTS=N` stops the process at once (exit status 134, no destructor
//! runs: what `kill -9` leaves) once N weights are written.
//!
//! One writer at a time: the journal is the output's lock, held from before the run touches `OUT.partial/`
//! until `OUT` is in place, so a second run of the same output is refused at once ([`sling_formats::lock`], as
//! the GGUF writer's journal is).
//!
//! Crash safety: everything is written into `OUT.partial/` (a directory beside the output) and renamed to
//! `OUT` only when the shards, the extra files, the model card and the manifest are complete and synced, so
//! an interrupted run never leaves a directory that looks complete. The output must not exist yet (or be an
//! empty directory), and must not lie inside the source directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::write::hex;
use sling_formats::journal::{Entry, Header, Journal, JournalError};
use sling_formats::lock::{LockError, OutputLock};
use sling_formats::st_write::{self, StTensor};
use sling_provenance::card::{self, CardContext};
use sling_provenance::manifest::{self, Manifest, ManifestError, OutputFile, TensorRecord, Tool};

use crate::engine::{self, weight_chunks, Chunk, Computed, Container, RunOptions};
use crate::ops::OpError;
use crate::{EncodeError, Plan, Target};
use sling_formats::st_write::sink::{Sink, SinkError};

pub use crate::engine::CHUNK_ELEMS;
/// The manifest's name inside an artifact directory.
pub const MANIFEST_NAME: &str = manifest::DIR_MANIFEST;

/// How to write the artifact.
pub struct ExecOptions {
    /// The artifact directory to create.
    pub output: PathBuf,
    /// Largest shard (data bytes); `None`: one file.
    pub max_shard_bytes: Option<u64>,
    /// safetensors `__metadata__` of every shard (`{"format": "pt"}`, mlx-lm's `{"format": "mlx"}`).
    pub shard_metadata: BTreeMap<String, String>,
    /// How `model.safetensors.index.json` is written.
    pub index: IndexStyle,
    /// Files the target made (`config.json`, ...): name, bytes.
    pub files: Vec<(String, Vec<u8>)>,
    /// Files of the source directory copied as they are when present (tokenizer, generation config).
    pub copy: Vec<String>,
    /// Continue when a weight holds NaN or Inf.
    pub allow_nonfinite: bool,
    /// Chunks computed at once (default 2 × threads).
    pub window: Option<usize>,
    /// Continue an interrupted run of the same plan from `OUT.partial/` (see the module docs).
    pub resume: bool,
    /// Write the provenance manifest (`OUT/sling.json`) with these options, naming this tool.
    pub provenance: Option<(Tool, manifest::Options)>,
    /// `created` of the manifest (seconds since the epoch).
    pub created: Option<u64>,
    /// Write a model card (`OUT/README.md`), with these extra rows; needs `provenance`.
    pub model_card: Option<Vec<(String, String)>>,
    /// What the card calls the format (`compressed-tensors`, `MLX`) and its Hugging Face `library_name`.
    pub card_format: (String, String),
}

/// How `model.safetensors.index.json` is written: `{"metadata": {"total_size": N, …}, "weight_map": {name: file}}`.
#[derive(Clone, Debug)]
pub enum IndexStyle {
    /// transformers' `save_pretrained`: only when sharded; sorted keys, indent 2, trailing newline.
    Transformers,
    /// mlx-lm's `save_model`: always; `total_parameters` after `total_size`, `weight_map` sorted by name, indent
    /// 4, no trailing newline.
    Mlx { total_parameters: u64 },
}

impl IndexStyle {
    fn render(&self, layout: &st_write::ShardLayout) -> Option<String> {
        match self {
            IndexStyle::Transformers => (layout.shards.len() > 1).then(|| layout.index_json(&[])),
            IndexStyle::Mlx { total_parameters } => {
                let mut map: Vec<(&str, &str)> = layout
                    .shards
                    .iter()
                    .flat_map(|s| s.tensors.iter().map(move |t| (t.name.as_str(), s.file_name.as_str())))
                    .collect();
                map.sort();
                let mut wm = serde_json::Map::new();
                for (n, f) in map {
                    wm.insert(n.to_string(), f.into());
                }
                let v = serde_json::json!({
                    "metadata": {"total_size": layout.total_data_bytes(), "total_parameters": total_parameters},
                    "weight_map": wm,
                });
                Some(sling_formats::pyjson::dumps(&v, 4, sling_formats::pyjson::SortKeys::None))
            }
        }
    }
}

/// Progress, in this order: `Start`, `Weight` as each weight is complete, `Stage`s.
#[derive(Debug)]
pub enum Event<'a> {
    /// `resumed`: weights an interrupted run completed, re-checked and reused.
    Start {
        weights: usize,
        bytes: u64,
        resumed: usize,
        /// With `--resume`, why less (or nothing) was reused.
        note: Option<&'a str>,
    },
    Weight {
        index: usize,
        of: usize,
        name: &'a str,
        done_bytes: u64,
        total_bytes: u64,
    },
    Stage(&'a str),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("tensor {tensor}: {source}")]
    Op { tensor: String, source: OpError },
    #[error("tensor {tensor}: {source}")]
    Encode { tensor: String, source: EncodeError },
    #[error("tensor {tensor} (from {sources}) holds non-finite values (first at element {index}: {value}); pass --allow-nonfinite to quantize anyway")]
    NonFinite { tensor: String, sources: String, index: u64, value: f32 },
    #[error("output {0} already exists and is not an empty directory; remove it or choose another name")]
    OutputExists(PathBuf),
    #[error(
        "output {output} is inside the input directory {input}; write it elsewhere so the source is never touched"
    )]
    OutputInsideInput { output: PathBuf, input: PathBuf },
    #[error("cannot {op} {path}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Another process is writing this output (or its lock file cannot be made).
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("shard layout: {0}")]
    Layout(String),
    #[error("provenance manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("internal error: the writer thread panicked")]
    WriterPanicked,
}

/// What was written.
#[derive(Debug)]
pub struct ExecReport {
    pub output: PathBuf,
    pub weights: usize,
    pub tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub files: Vec<String>,
    pub nonfinite: Vec<String>,
    pub manifest: Option<PathBuf>,
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> ExecError + 'a {
    move |source| ExecError::Io { path: path.to_path_buf(), op, source }
}

/// `OUT` → `OUT.partial` beside it.
pub fn partial_dir(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    output.with_file_name(name)
}

/// Refuses outputs that exist (unless an empty directory) or lie inside the source.
pub fn check_output(ck: &Checkpoint, output: &Path) -> Result<(), ExecError> {
    match std::fs::read_dir(output) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(ExecError::OutputExists(output.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return Err(ExecError::OutputExists(output.to_path_buf())),
    }
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let out_dir = parent.canonicalize().map_err(io(parent, "open the output's directory"))?;
    let out_abs = out_dir.join(output.file_name().unwrap_or_default());
    let in_dir = ck.dir.canonicalize().map_err(io(&ck.dir, "open"))?;
    if out_abs.starts_with(&in_dir) || in_dir.starts_with(&out_abs) {
        return Err(ExecError::OutputInsideInput { output: output.to_path_buf(), input: ck.dir.clone() });
    }
    Ok(())
}

/// The sha256 of each of `w`'s parts as [`execute`] writes them (the same chunks and encoding), without
/// writing anything: what `sling verify --source` re-derives.
pub fn part_sha256<T: Target>(
    target: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    i: usize,
    allow_nonfinite: bool,
) -> Result<Vec<String>, T::Error> {
    let w = &plan.weights[i];
    let amax = amaxes(target, ck, plan, &[i])?.get(&i).copied();
    Ok(engine::hash_weight(target, ck, w, amax, allow_nonfinite)?.hex())
}

/// The amax of each of `which` weights that needs one ([`Target::needs_amax`]), shared across its
/// [`Target::amax_group`]: the largest finite |value| of every weight of the group (one pass over each).
fn amaxes<T: Target>(
    target: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    which: &[usize],
) -> Result<HashMap<usize, f32>, ExecError> {
    let groups: Vec<Option<String>> = plan.weights.iter().map(|w| target.amax_group(w)).collect();
    let mut members_of: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, g) in groups.iter().enumerate() {
        if let Some(g) = g {
            members_of.entry(g.as_str()).or_default().push(j);
        }
    }
    let mut own: HashMap<usize, f32> = HashMap::new();
    let mut out = HashMap::new();
    for &i in which.iter().filter(|&&i| target.needs_amax(&plan.weights[i].enc)) {
        let members: Vec<usize> = match &groups[i] {
            Some(g) => members_of.get(g.as_str()).cloned().unwrap_or_else(|| vec![i]),
            None => vec![i],
        };
        let mut m = 0f32;
        for j in members {
            let a = match own.get(&j) {
                Some(a) => *a,
                None => {
                    let cs = weight_chunks(target, &plan.weights[j], j);
                    let a = weight_amax(ck, &plan.weights[j], &cs)?;
                    own.insert(j, a);
                    a
                }
            };
            m = m.max(a);
        }
        out.insert(i, m);
    }
    Ok(out)
}

/// The largest finite |value| of a weight (one pass over its chunks, in parallel).
fn weight_amax<E: Sync>(ck: &Checkpoint, w: &crate::Weight<E>, cs: &[Chunk]) -> Result<f32, ExecError> {
    let parts: Result<Vec<f32>, ExecError> = cs
        .par_iter()
        .map(|c| {
            engine::values(ck, w, c.r0, c.r1, true)
                .map(|(v, _)| v.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs())))
        })
        .collect();
    ck.release_pages();
    Ok(parts?.into_iter().fold(0f32, f32::max))
}

/// Writes `plan` for `target` from `ck` as `opts` says.
pub fn execute<T: Target<Error = ExecError>>(
    target: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    opts: &ExecOptions,
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<ExecReport, ExecError> {
    check_output(ck, &opts.output)?;
    // Held until the output is renamed into place: a second writer of this output touches nothing of ours.
    let lock = OutputLock::acquire(&journal_path(&opts.output))?;
    execute_locked(target, ck, plan, opts, lock, events)
}

/// [`execute`] with the output's lock already held (taken at [`journal_path`] by a caller that writes beside
/// the output before the pipeline runs, e.g. a calibration pass's store). The lock file becomes the run's
/// journal: removed when the output is in place or abandoned, kept (with what reached the disk) when a run
/// asked to resume fails.
pub fn execute_locked<T: Target<Error = ExecError>>(
    target: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    opts: &ExecOptions,
    lock: OutputLock,
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<ExecReport, ExecError> {
    let interval = std::time::Duration::from_millis(
        std::env::var("SLING_JOURNAL_INTERVAL_MS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(5000),
    );
    let mut journal = Journal::with_lock(lock, interval);
    let res =
        check_output(ck, &opts.output).and_then(|()| execute_journaled(target, ck, plan, opts, &mut journal, events));
    if res.is_ok() || !opts.resume {
        journal.remove();
    }
    res
}

fn execute_journaled<T: Target<Error = ExecError>>(
    target: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    opts: &ExecOptions,
    journal: &mut Journal,
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<ExecReport, ExecError> {
    let partial = partial_dir(&opts.output);
    let layout = shard_layout(plan, opts)?;
    let want =
        Header::new(&fingerprint(ck, plan, opts), true, layout.shards.iter().map(|s| s.file_name.clone()).collect());
    let resumed = if opts.resume { Some(journal.resumable(&want)?) } else { None };
    if !matches!(resumed, Some(Ok(_))) && partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial, "remove the stale"))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial, "create"))?;
    let res = write_all(target, ck, plan, opts, &partial, (&layout, &want, journal), resumed, events);
    match res {
        Ok(mut report) => {
            if opts.output.exists() {
                std::fs::remove_dir(&opts.output).map_err(io(&opts.output, "replace the empty directory"))?;
            }
            std::fs::rename(&partial, &opts.output).map_err(io(&opts.output, "rename the finished output to"))?;
            if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
                if let Ok(d) = std::fs::File::open(parent) {
                    let _ = d.sync_all();
                }
            }
            report.manifest = report.manifest.map(|_| opts.output.join(MANIFEST_NAME));
            Ok(report)
        }
        Err(e) => {
            if !opts.resume {
                let _ = std::fs::remove_dir_all(&partial);
            }
            Err(e)
        }
    }
}

/// The resume journal of a writer of `output`, which is also its lock (`OUT.partial.json`, beside the partial
/// directory; see [`sling_formats::journal`]).
pub fn journal_path(output: &Path) -> PathBuf {
    let mut name = partial_dir(output).into_os_string();
    name.push(".json");
    PathBuf::from(name)
}

/// A digest of everything that decides the artifact's bytes; a journal with another one is never resumed.
fn fingerprint<E: std::fmt::Debug>(ck: &Checkpoint, plan: &Plan<E>, opts: &ExecOptions) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    put(sling_formats::journal::SCHEMA);
    put(env!("CARGO_PKG_VERSION"));
    if let Some((tool, options)) = &opts.provenance {
        put(&tool.git_commit);
        put(&format!("{options:?}"));
    }
    put(&format!("{:?} {:?} {}", opts.max_shard_bytes, opts.shard_metadata, opts.allow_nonfinite));
    for w in &plan.weights {
        put(&format!("{} {:?} {:?} {:?} {} {:?}", w.name, w.enc, w.parts, w.sources, w.row_align, w.op));
    }
    for (rel, stamp) in manifest::source_stamps(ck) {
        put(&rel);
        put(&stamp);
    }
    hex(&h.finalize())
}

/// The shard layout of `plan`'s parts (`safetensors`' header and data order).
fn shard_layout<E>(plan: &Plan<E>, opts: &ExecOptions) -> Result<st_write::ShardLayout, ExecError> {
    let st: Vec<StTensor> = plan
        .weights
        .iter()
        .flat_map(|w| &w.parts)
        .map(|p| StTensor { name: p.name.clone(), dtype: p.dtype, shape: p.shape.clone() })
        .collect();
    st_write::layout(st, opts.max_shard_bytes, "model", Some(&opts.shard_metadata))
        .map_err(|e| ExecError::Layout(e.to_string()))
}

/// Takes back from a reopened shard set the longest prefix of `plan`'s weights whose every part the journal
/// lists at its place and whose bytes hash as journaled; returns how many weights and their entries.
fn reuse<E>(sink: &mut Sink, plan: &Plan<E>, entries: &[Entry]) -> Result<(usize, Vec<Entry>), ExecError> {
    let by_name: HashMap<&str, &Entry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut kept: Vec<Entry> = Vec::new();
    for (k, w) in plan.weights.iter().enumerate() {
        let before = kept.len();
        let mut taken = Vec::new();
        for p in &w.parts {
            let (Some(idx), Some(e)) = (sink.index_of(&p.name), by_name.get(p.name.as_str())) else { break };
            if !sink.check(idx, e)? {
                break;
            }
            taken.push(idx);
            kept.push((*e).clone());
        }
        if taken.len() < w.parts.len() {
            taken.into_iter().for_each(|i| sink.reset(i));
            kept.truncate(before);
            return Ok((k, kept));
        }
    }
    Ok((plan.weights.len(), kept))
}

#[allow(clippy::too_many_arguments)]
fn write_all<T: Target<Error = ExecError>>(
    target: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    opts: &ExecOptions,
    dir: &Path,
    (layout, want, journal): (&st_write::ShardLayout, &Header, &mut Journal),
    resumed: Option<Result<Vec<Entry>, String>>,
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<ExecReport, ExecError> {
    // Reuse what an interrupted run completed and the journal vouches for; otherwise start over.
    let mut note = None;
    let reopened = match resumed {
        Some(Ok(entries)) => match Sink::reopen(dir, layout) {
            Ok(mut s) => {
                let (k, kept) = reuse(&mut s, plan, &entries)?;
                if entries.is_empty() {
                    note = Some("the interrupted run had not completed a weight; starting over".to_string());
                } else if kept.len() < entries.len() {
                    note = Some(format!(
                        "{} of the {} journaled tensors checked out; {} are written again",
                        kept.len(),
                        entries.len(),
                        entries.len() - kept.len()
                    ));
                }
                Some((s, k, kept))
            }
            Err(e) => {
                note = Some(format!("cannot reuse {}: {e}; starting over", dir.display()));
                std::fs::remove_dir_all(dir).map_err(io(dir, "remove the stale"))?;
                std::fs::create_dir_all(dir).map_err(io(dir, "create"))?;
                None
            }
        },
        Some(Err(why)) => {
            note = Some(why);
            None
        }
        None => None,
    };
    let (mut sink, reused, kept) = match reopened {
        Some(r) => r,
        None => (Sink::create(dir, layout)?, 0, Vec::new()),
    };
    // The journal now lists exactly what is kept.
    journal.rewrite(want, &kept)?;
    let slots: Vec<Vec<usize>> = plan
        .weights
        .iter()
        .map(|w| w.parts.iter().map(|p| sink.index_of(&p.name).unwrap_or(usize::MAX)).collect())
        .collect();
    let total: u64 = crate::plan_bytes(plan);
    events(&Event::Start { weights: plan.weights.len(), bytes: total, resumed: reused, note: note.as_deref() });

    // Source files are hashed by a background thread while the weights are computed.
    let source_hasher = opts.provenance.as_ref().map(|_| manifest::SourceHasher::new(ck));
    let written = std::thread::scope(|scope| {
        if let Some(sh) = &source_hasher {
            scope.spawn(|| sh.work());
        }
        let res = compute_and_write(target, ck, plan, opts, &mut sink, &slots, total, (journal, reused), events);
        if let Some(sh) = &source_hasher {
            match &res {
                Ok(_) => {
                    events(&Event::Stage("hashing sources"));
                    sh.work_all()
                }
                Err(_) => sh.cancel(),
            }
        }
        res
    });
    let nonfinite = match written {
        Ok(n) => n,
        Err(e) => {
            // Whatever reached the disk can be resumed: synced first, then journaled.
            if opts.resume {
                let _ = journal.commit(|| sink.sync().map_err(ExecError::from));
            }
            return Err(e);
        }
    };
    let written = sink.finish()?;

    // Index and the target's files, then copies from the source directory.
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(index) = opts.index.render(layout) {
        files.push(("model.safetensors.index.json".into(), index.into_bytes()));
    }
    files.extend(opts.files.iter().cloned());
    for name in &opts.copy {
        let src = ck.dir.join(name);
        match std::fs::read(&src) {
            Ok(b) => files.push((name.clone(), b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ExecError::Io { path: src, op: "read", source: e }),
        }
    }
    let mut outputs: Vec<OutputFile> =
        written.files.iter().map(|(n, s, h)| OutputFile { name: n.clone(), size: *s, sha256: h.clone() }).collect();
    for (name, bytes) in &files {
        let p = dir.join(name);
        manifest::write_atomic(&p, bytes)?;
        outputs.push(OutputFile { name: name.clone(), size: bytes.len() as u64, sha256: hex(&Sha256::digest(bytes)) });
    }

    let mut report = ExecReport {
        output: opts.output.clone(),
        weights: plan.weights.len(),
        tensors: written.tensors.len(),
        bytes_in: ck.total_bytes(),
        bytes_out: outputs.iter().map(|o| o.size).sum(),
        files: outputs.iter().map(|o| o.name.clone()).collect(),
        nonfinite,
        manifest: None,
    };
    if let (Some((tool, options)), Some(sh)) = (&opts.provenance, source_hasher) {
        events(&Event::Stage("writing manifest"));
        let sources = sh.into_results()?;
        let part_of: HashMap<&str, (&crate::Part, &Vec<String>)> =
            plan.weights.iter().flat_map(|w| w.parts.iter().map(move |p| (p.name.as_str(), (p, &w.sources)))).collect();
        let tensors = written
            .tensors
            .iter()
            .map(|(name, file, offset, n_bytes, sha)| {
                let found = part_of.get(name.as_str());
                let part = found.map(|(p, _)| *p);
                TensorRecord {
                    name: name.clone(),
                    dtype: part.map(|p| p.dtype.name().to_string()).unwrap_or_default(),
                    ne: part.map(|p| p.shape.iter().rev().copied().collect()).unwrap_or_default(),
                    file: file.clone(),
                    offset: *offset,
                    n_bytes: *n_bytes,
                    sha256: sha.clone(),
                    sources: found.map(|(_, s)| (*s).clone()).unwrap_or_default(),
                }
            })
            .collect();
        let mut m = Manifest {
            schema: manifest::SCHEMA.to_string(),
            sling: tool.clone(),
            created: opts.created.map(manifest::rfc3339),
            options: options.clone(),
            compute: "cpu".to_string(),
            output: opts.output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            sources,
            outputs,
            model_card: None,
            quality: None,
            kept: plan.kept.iter().map(|k| manifest::KeptRecord { name: k.name.clone(), why: k.why.clone() }).collect(),
            tensors,
            manifest_sha256: None,
        };
        if let Some(extra) = &opts.model_card {
            let cx = CardContext {
                source_name: ck
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into()),
                hf_architecture: ck.config.as_ref().and_then(|c| c.architecture().ok()).map(str::to_string),
                gguf_architecture: String::new(),
                experts: None,
                manifest_name: MANIFEST_NAME.to_string(),
                extra: extra.clone(),
                format: Some(opts.card_format.clone()),
            };
            let text = card::render(&m, &cx);
            let p = dir.join("README.md");
            manifest::write_atomic(&p, text.as_bytes())?;
            m.model_card = Some(OutputFile {
                name: "README.md".into(),
                size: text.len() as u64,
                sha256: hex(&Sha256::digest(text.as_bytes())),
            });
        }
        m.write(&dir.join(MANIFEST_NAME))?;
        report.manifest = Some(dir.join(MANIFEST_NAME));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(report)
}

/// The shard set as the engine's [`Container`]: each chunk's parts appended at their places, progress
/// reported as weights complete, the journal committed (after syncing) at most every interval.
struct Shards<'s> {
    sink: &'s mut Sink,
    slots: &'s [Vec<usize>],
    names: Vec<&'s str>,
    journal: &'s mut Journal,
    done: u64,
    total: u64,
    weights_done: usize,
    abort_after: Option<usize>,
    events: &'s (dyn Fn(&Event<'_>) + Sync),
}

impl Shards<'_> {
    /// Journals the parts of weight `w`, now complete.
    fn journal_weight(&mut self, w: usize) {
        for &idx in &self.slots[w] {
            if let Some(e) = self.sink.entry(idx) {
                self.journal.push(e);
            }
        }
    }
}

impl Container for Shards<'_> {
    type Error = ExecError;
    fn put(&mut self, c: &Chunk, last: bool, data: Computed<'_>) -> Result<(), ExecError> {
        for (part, bytes) in data.slices() {
            if !bytes.is_empty() {
                self.sink.append(self.slots[c.w][part], bytes)?;
            }
            self.done += bytes.len() as u64;
        }
        if last {
            let of = self.slots.len();
            (self.events)(&Event::Weight {
                index: c.w,
                of,
                name: self.names[c.w],
                done_bytes: self.done,
                total_bytes: self.total,
            });
            self.weights_done += 1;
            self.journal_weight(c.w);
            if self.journal.due(false) {
                let sink = &*self.sink;
                self.journal.commit(|| sink.sync().map_err(ExecError::from))?;
            }
            if self.abort_after.is_some_and(|n| self.weights_done >= n) {
                std::process::exit(134);
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn compute_and_write<T: Target<Error = ExecError>>(
    target: &T,
    ck: &Checkpoint,
    plan: &Plan<T::Enc>,
    opts: &ExecOptions,
    sink: &mut Sink,
    slots: &[Vec<usize>],
    total: u64,
    (journal, reused): (&mut Journal, usize),
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<Vec<String>, ExecError> {
    // Weights whose encoding needs their absolute maximum: one pass over each first.
    let todo: Vec<usize> = (reused..plan.weights.len()).collect();
    let amax = amaxes(target, ck, plan, &todo)?;
    let shards = Shards {
        sink,
        slots,
        names: plan.weights.iter().map(|w| w.name.as_str()).collect(),
        journal,
        done: plan.weights[..reused].iter().flat_map(|w| &w.parts).map(crate::Part::n_bytes).sum(),
        total,
        weights_done: reused,
        abort_after: std::env::var("SLING_TEST_ABORT_AFTER_WEIGHTS").ok().and_then(|v| v.trim().parse().ok()),
        events,
    };
    let run = RunOptions { window: opts.window, allow_nonfinite: opts.allow_nonfinite };
    let (_, nonfinite) = engine::run(target, ck, &plan.weights, reused, run, &amax, shards)?;
    Ok(nonfinite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_dir_is_beside() {
        assert_eq!(partial_dir(Path::new("/a/b/out")), PathBuf::from("/a/b/out.partial"));
    }
}
