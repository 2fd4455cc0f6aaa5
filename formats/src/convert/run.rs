//! Executing a plan: tensors are cut into row chunks of bounded size, chunks are computed in
//! parallel (rayon) a window at a time, and written strictly in plan order. Chunk boundaries do
//! not depend on the thread count, and each chunk is encoded on its own, so the output bytes are
//! identical whatever the number of threads. Peak memory is bounded by the window, not the model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::hparams::{arch_kvs, Kvs};
use super::ops::OpError;
use super::plan::{plan, OutTensor, OutType, Payload, PlanError};
use crate::checkpoint::Checkpoint;
use crate::gguf::write::Written;
use crate::gguf::{GgufError, GgufValue, GgufWriter, SplitPolicy, TensorDesc};
use crate::manifest::{self, ManifestError, Tool};
use crate::tokenizer::{vocab_kvs, TokenizerError, VocabOptions};
use sling_core::DType;

/// Elements per chunk: 4 Mi f32 values (16 MiB) — small enough that a window of chunks stays far
/// below 1 GiB, large enough to amortise the per-chunk overhead.
pub const CHUNK_ELEMS: u64 = 4 << 20;

pub struct ConvertOptions {
    pub out_type: OutType,
    pub output: PathBuf,
    pub split: SplitPolicy,
    /// Continue when a weight holds NaN or Inf (the tensor is reported either way).
    pub allow_nonfinite: bool,
    /// `tokenizer.ggml.pre` to use when the tokenizer's hash is unknown.
    pub tokenizer_pre: Option<String>,
    /// Chunks computed at once (default: 2 × rayon threads).
    pub window: Option<usize>,
    /// Write the provenance manifest (`OUT.sling.json`, see [`crate::manifest`]) naming this tool.
    /// A stale manifest of the same name is removed in every case before the outputs are renamed.
    pub provenance: Option<Tool>,
}

#[derive(Debug)]
pub struct ConvertReport {
    pub outputs: Vec<PathBuf>,
    pub n_tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub notes: Vec<String>,
    pub nonfinite: Vec<String>,
    /// Every output file and tensor with the sha256 of the bytes written.
    pub written: Written,
    /// The manifest written, if one was asked for.
    pub manifest: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("config.json: {0}")]
    Config(#[from] sling_core::ConfigError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tensor {tensor}: {source}")]
    Op { tensor: String, source: OpError },
    #[error("tensor {tensor}: {source}")]
    Encode { tensor: String, source: sling_quantizers::EncodeError },
    #[error("tensor {tensor} (from {sources}) holds non-finite values (first at element {index}: {value}); pass --allow-nonfinite to convert anyway")]
    NonFinite { tensor: String, sources: String, index: u64, value: f32 },
    #[error(
        "output {output} is inside the input directory {input}; write it elsewhere so the source is never touched"
    )]
    OutputInsideInput { output: PathBuf, input: PathBuf },
    #[error("output {0} is one of the input files")]
    OutputIsInput(PathBuf),
    #[error("cannot use {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("internal error: the writer thread panicked")]
    WriterPanicked,
    #[error("provenance manifest: {0}")]
    Manifest(#[from] ManifestError),
}

/// Refuses outputs that could clobber the source.
pub fn check_output_path(ck: &Checkpoint, output: &Path) -> Result<(), ConvertError> {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let out_dir = parent.canonicalize().map_err(|source| ConvertError::Io { path: parent.to_path_buf(), source })?;
    let out_abs = out_dir.join(output.file_name().unwrap_or_default());
    let in_dir = ck.dir.canonicalize().map_err(|source| ConvertError::Io { path: ck.dir.clone(), source })?;
    for f in ck.files.iter().map(|f| &f.path).chain(&ck.other_sources) {
        if f.canonicalize().ok().as_deref() == Some(out_abs.as_path()) {
            return Err(ConvertError::OutputIsInput(output.to_path_buf()));
        }
    }
    // A model directory is protected as a whole; a lone GGUF source only from being overwritten (llama-quantize
    // users write next to it).
    if !ck.files.is_empty() && out_abs.starts_with(&in_dir) {
        return Err(ConvertError::OutputInsideInput { output: output.to_path_buf(), input: ck.dir.clone() });
    }
    Ok(())
}

/// All metadata of the output, in the reference converter's order.
pub fn build_kvs(
    ck: &Checkpoint,
    out: OutType,
    tokenizer_pre: Option<String>,
    mxfp4_moe: bool,
) -> Result<Kvs, ConvertError> {
    let cfg = ck.config.as_ref().ok_or(PlanError::NoConfig)?;
    let arch = super::plan::arch_of(cfg)?;
    let mut kvs = Kvs::default();
    kvs.set("general.architecture", GgufValue::String(arch.gguf.into()));
    kvs.set("general.type", GgufValue::String("model".into()));
    let name = ck.dir.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
    kvs.set("general.name", GgufValue::String(name));
    // `prepare_metadata`: an MXFP4 source written at a float type is "MOSTLY_MXFP4_MOE".
    let file_type = if mxfp4_moe && out != OutType::Q8_0 { 38 } else { out.file_type() };
    arch_kvs(arch, cfg, file_type, &mut kvs)?;
    kvs.set("general.quantization_version", GgufValue::U32(2));
    let vk = vocab_kvs(
        &ck.dir,
        &serde_json::Value::Object(cfg.root().clone()),
        arch.vocab,
        &VocabOptions { pre_override: tokenizer_pre },
    )?;
    kvs.extend(vk);
    Ok(kvs)
}

/// One unit of work: rows `r0..r1` of tensor `t`.
struct Chunk {
    t: usize,
    r0: u64,
    r1: u64,
}

fn chunks(tensors: &[OutTensor]) -> Vec<Chunk> {
    let mut out = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let cols = t.ne.first().copied().unwrap_or(1).max(1);
        let rows = t.rows();
        let step = (CHUNK_ELEMS / cols).max(1);
        // Chunks never cross an expert boundary (each expert has its own importance weights). Bytes do not
        // depend on where chunks are cut: every row is encoded on its own.
        let per_expert = if t.ne.len() >= 3 { t.ne[1].max(1) } else { rows.max(1) };
        let mut r = 0;
        while r < rows {
            let e = (r + step).min(rows).min((r / per_expert + 1) * per_expert);
            out.push(Chunk { t: i, r0: r, r1: e });
            r = e;
        }
        if rows == 0 {
            out.push(Chunk { t: i, r0: 0, r1: 0 });
        }
    }
    out
}

/// Rounds `v` through `via` as a file of that type stores it and ggml reads it back (`ggml_bf16_to_fp32`,
/// `ggml_fp16_to_fp32`): the values llama-quantize sees when it reads the converter's intermediate file.
fn round_through(via: DType, v: &mut [f32]) {
    use sling_quantizers::encode::{f32_to_bf16_bits, f32_to_f16_bits};
    match via {
        DType::BF16 => v.iter_mut().for_each(|x| *x = f32::from_bits((f32_to_bf16_bits(*x) as u32) << 16)),
        DType::F16 => v.iter_mut().for_each(|x| *x = half::f16::from_bits(f32_to_f16_bits(*x)).to_f32()),
        _ => {}
    }
}

/// Encodes rows `r0..` of `t` (values `v`) as `t.dtype`, with the importance weights of the chunk's expert.
fn encode(t: &OutTensor, r0: u64, v: &[f32], out: &mut Vec<u8>) -> Result<(), ConvertError> {
    let cols = t.ne.first().copied().unwrap_or(1) as usize;
    let w = t.weights.as_deref().and_then(|w| {
        let per_expert = if t.ne.len() >= 3 { t.ne[1].max(1) } else { t.rows().max(1) };
        let e = (r0 / per_expert) as usize;
        w.get(e * cols..(e + 1) * cols)
    });
    sling_kernels::quantize_rows(t.dtype, v, cols, w, out)
        .map_err(|source| ConvertError::Encode { tensor: t.name.clone(), source })
}

fn compute(
    ck: &Checkpoint,
    t: &OutTensor,
    c: &Chunk,
    allow_nonfinite: bool,
) -> Result<(Vec<u8>, Option<String>), ConvertError> {
    let mut bytes = Vec::new();
    let mut flagged = None;
    let op_err = |source| ConvertError::Op { tensor: t.name.clone(), source };
    // Rounding through the intermediate type is the identity when the output has that type.
    let round_via = t.round_via.filter(|r| *r != t.dtype);
    match &t.payload {
        Payload::Mxfp4(m) if t.dtype == DType::MXFP4 => m.read(ck, c.r0, c.r1, &mut bytes).map_err(op_err)?,
        Payload::Mxfp4(m) => {
            // Requantizing MXFP4 experts: ggml's `to_float`, then the new type (llama-quantize --allow-requantize).
            let mut raw = Vec::new();
            m.read(ck, c.r0, c.r1, &mut raw).map_err(op_err)?;
            let mut v = Vec::new();
            sling_quantizers::dequantize(DType::MXFP4, &raw, &mut v)
                .map_err(|source| ConvertError::Encode { tensor: t.name.clone(), source })?;
            encode(t, c.r0, &v, &mut bytes)?;
        }
        Payload::Gguf(g) => {
            let src = g.rows(c.r0, c.r1).ok_or_else(|| ConvertError::Op {
                tensor: t.name.clone(),
                source: OpError::Missing(format!("{} rows {}..{} in {}", t.name, c.r0, c.r1, g.file.path.display())),
            })?;
            let enc_err = |source| ConvertError::Encode { tensor: t.name.clone(), source };
            let mut v = Vec::new();
            // ggml's to_float for every type (f32/f16/bf16 exact widening, block types dequantized).
            if g.dtype.is_quantized() {
                sling_quantizers::dequantize(g.dtype, src, &mut v).map_err(enc_err)?;
            } else {
                sling_quantizers::decode_to_f32(g.dtype, src, &mut v)
                    .map_err(|_| enc_err(sling_quantizers::EncodeError::Unsupported(g.dtype)))?;
            }
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                let index = c.r0 * t.ne.first().copied().unwrap_or(1) + i as u64;
                if !allow_nonfinite {
                    return Err(ConvertError::NonFinite {
                        tensor: t.name.clone(),
                        sources: t.sources.join(", "),
                        index,
                        value: *x,
                    });
                }
                flagged = Some(format!("{}: non-finite value {x} at element {index}", t.name));
            }
            if t.dtype == g.dtype {
                bytes.extend_from_slice(src);
            } else {
                encode(t, c.r0, &v, &mut bytes)?;
            }
        }
        Payload::Values(op)
            if round_via.is_none() && op.raw_dtype() == Some(t.dtype) && raw_copy(ck, op, c, t, &mut bytes)? =>
        {
            // Same type in and out and only element moves, no NaN/Inf: the reference's
            // decode-then-round is the identity (bf16->f32->bf16, f16->f32->f16), so bytes were copied.
        }
        Payload::Values(op) => {
            let mut v = Vec::with_capacity(((c.r1 - c.r0) * op.cols()) as usize);
            op.read(ck, c.r0, c.r1, &mut v).map_err(op_err)?;
            // A branch-free scan first (it vectorises); the position is looked up only if needed.
            let any_bad = v.iter().fold(false, |acc, x| acc | (x.to_bits() & 0x7f80_0000 == 0x7f80_0000));
            if let Some((i, x)) = any_bad.then(|| v.iter().enumerate().find(|(_, x)| !x.is_finite())).flatten() {
                let index = c.r0 * op.cols() + i as u64;
                if !allow_nonfinite {
                    return Err(ConvertError::NonFinite {
                        tensor: t.name.clone(),
                        sources: t.sources.join(", "),
                        index,
                        value: *x,
                    });
                }
                flagged = Some(format!("{}: non-finite value {x} at element {index}", t.name));
            }
            if let Some(via) = round_via {
                round_through(via, &mut v);
            }
            encode(t, c.r0, &v, &mut bytes)?;
        }
    }
    Ok((bytes, flagged))
}

/// Produces chunk `c` of `op` by moving raw elements when its type is a plain float type and every
/// element is finite (checked on the bits: exponent all ones means Inf or NaN). Returns false, with
/// `out` untouched, when the slow path must decide.
fn raw_copy(
    ck: &Checkpoint,
    op: &super::ops::Op,
    c: &Chunk,
    t: &OutTensor,
    out: &mut Vec<u8>,
) -> Result<bool, ConvertError> {
    fn put<const N: usize, E: Copy>(out: &mut Vec<u8>, v: &[E], f: impl Fn(E) -> [u8; N]) {
        let start = out.len();
        out.resize(start + v.len() * N, 0);
        for (d, x) in out[start..].chunks_exact_mut(N).zip(v) {
            d.copy_from_slice(&f(*x));
        }
    }
    let dtype = t.dtype;
    let err = |source| ConvertError::Op { tensor: t.name.clone(), source };
    match dtype {
        DType::BF16 | DType::F16 => {
            let mask = if dtype == DType::BF16 { 0x7f80 } else { 0x7c00 };
            let mut v: Vec<u16> = Vec::with_capacity(((c.r1 - c.r0) * op.cols()) as usize);
            op.read_raw(ck, c.r0, c.r1, &mut v).map_err(err)?;
            if v.iter().any(|x| x & mask == mask) {
                return Ok(false);
            }
            put(out, &v, u16::to_le_bytes);
        }
        DType::F32 => {
            let mut v: Vec<u32> = Vec::with_capacity(((c.r1 - c.r0) * op.cols()) as usize);
            op.read_raw(ck, c.r0, c.r1, &mut v).map_err(err)?;
            if v.iter().any(|x| x & 0x7f80_0000 == 0x7f80_0000) {
                return Ok(false);
            }
            put(out, &v, u32::to_le_bytes);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Converts `ck` as `opts` says. `progress` is called with the output bytes written so far.
pub fn convert(
    ck: &Checkpoint,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ConvertReport, ConvertError> {
    check_output_path(ck, &opts.output)?;
    let p = plan(ck, opts.out_type)?;
    let mxfp4 = p.tensors.iter().any(|t| matches!(t.payload, Payload::Mxfp4(_)));
    let kvs = build_kvs(ck, opts.out_type, opts.tokenizer_pre.clone(), mxfp4)?;
    let label = opts.out_type.dtype().name().to_string();
    execute(ck, Prepared { tensors: p.tensors, kvs, notes: p.notes, label }, opts, progress)
}

/// A fully decided output: tensors in file order with their types and recipes, and the metadata.
pub struct Prepared {
    pub tensors: Vec<OutTensor>,
    pub kvs: Kvs,
    pub notes: Vec<String>,
    /// What the output is, for the manifest (`bf16`, `Q4_K_M`, ...).
    pub label: String,
}

/// Writes a prepared output (see [`convert`]; `sling quantize` prepares its own).
pub fn execute(
    ck: &Checkpoint,
    prep: Prepared,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ConvertReport, ConvertError> {
    check_output_path(ck, &opts.output)?;
    let Prepared { tensors, kvs, notes, label } = prep;
    let descs: Vec<TensorDesc> =
        tensors.iter().map(|t| TensorDesc { name: t.name.clone(), dtype: t.dtype, ne: t.ne.clone() }).collect();
    let total: u64 = tensors.iter().map(OutTensor::n_bytes).sum();
    let w = GgufWriter::create_with(&opts.output, kvs.0, descs, opts.split, opts.provenance.is_some())?;
    let manifest_path = manifest::manifest_path(&opts.output);
    // Source files are hashed by a background thread during the conversion, and by every rayon
    // thread once the outputs are written.
    let source_hasher = opts.provenance.as_ref().map(|_| manifest::SourceHasher::new(ck));
    let (written, nonfinite) = std::thread::scope(|scope| {
        if let Some(sh) = &source_hasher {
            scope.spawn(|| sh.work());
        }
        let res = write_outputs(scope, ck, opts, &tensors, w, &manifest_path, total, progress);
        if let Some(sh) = &source_hasher {
            match &res {
                Ok(_) => sh.work_all(),
                Err(_) => sh.cancel(),
            }
        }
        res
    })?;
    let outputs = written.paths();
    let manifest = match (&opts.provenance, source_hasher) {
        (Some(tool), Some(sh)) => {
            let res = sh
                .into_results()
                .map_err(ConvertError::from)
                .and_then(|sources| write_manifest(opts, &label, tool, sources, &tensors, &written, &manifest_path));
            if let Err(e) = res {
                // Keep "an error leaves nothing behind": the outputs would be unverifiable anyway.
                for o in &outputs {
                    let _ = std::fs::remove_file(o);
                }
                return Err(e);
            }
            Some(manifest_path)
        }
        _ => None,
    };
    Ok(ConvertReport {
        outputs,
        n_tensors: tensors.len(),
        bytes_in: ck.total_bytes(),
        bytes_out: total,
        notes,
        nonfinite,
        written,
        manifest,
    })
}

/// Computes the tensors a window of chunks at a time (in parallel) while a writer thread spawned in
/// `scope` writes the previous window, then renames the outputs. Returns what was written and the
/// non-finite values let through.
#[allow(clippy::too_many_arguments)]
fn write_outputs<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    ck: &'env Checkpoint,
    opts: &'env ConvertOptions,
    tensors: &'env [OutTensor],
    w: GgufWriter,
    manifest_path: &Path,
    total: u64,
    progress: &'env (dyn Fn(u64, u64) + Sync),
) -> Result<(Written, Vec<String>), ConvertError> {
    let jobs = chunks(tensors);
    let window = opts.window.unwrap_or_else(|| 2 * rayon::current_num_threads()).max(1);
    let mut nonfinite = Vec::new();
    // Compute window k+1 while a writer thread writes window k; the bounded channel keeps at most
    // two windows of output in memory.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(1);
    let writer = scope.spawn(move || -> Result<GgufWriter, ConvertError> {
        let mut w = w;
        let mut done = 0u64;
        for batch in rx {
            for bytes in batch {
                w.write_data(&bytes)?;
                done += bytes.len() as u64;
                progress(done, total);
            }
        }
        Ok(w)
    });
    let mut failed = None;
    for win in jobs.chunks(window) {
        let results: Result<Vec<(Vec<u8>, Option<String>)>, ConvertError> =
            win.par_iter().map(|c| compute(ck, &tensors[c.t], c, opts.allow_nonfinite)).collect();
        // The window's source pages were copied out: drop them from this process's mappings so
        // resident memory stays bounded by the window, not by the model (pages stay cached).
        ck.release_pages();
        match results {
            Ok(r) => {
                let (batch, flags): (Vec<_>, Vec<_>) = r.into_iter().unzip();
                nonfinite.extend(flags.into_iter().flatten());
                if tx.send(batch).is_err() {
                    break; // the writer failed; its error is returned below
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let w = writer.join().map_err(|_| ConvertError::WriterPanicked)??;
    if let Some(e) = failed {
        return Err(e); // dropping `w` removes its temporary files
    }
    // A manifest left by an earlier run must never describe the new files: remove it before they
    // take its outputs' names. A crash from here until the new manifest is in place leaves outputs
    // without a manifest, which `verify` reports as not verifiable.
    match std::fs::remove_file(manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ConvertError::Io { path: manifest_path.to_path_buf(), source: e });
        }
        _ => {}
    }
    Ok((w.finish_hashed()?, nonfinite))
}

/// Builds the manifest and writes it, sealed, atomically.
fn write_manifest(
    opts: &ConvertOptions,
    label: &str,
    tool: &Tool,
    sources: Vec<manifest::SourceFile>,
    tensors: &[OutTensor],
    written: &Written,
    path: &Path,
) -> Result<(), ConvertError> {
    let sources_of: HashMap<String, Vec<String>> =
        tensors.iter().map(|t| (t.name.clone(), t.sources.clone())).collect();
    let options = manifest::Options {
        to: "gguf".into(),
        out_type: label.to_string(),
        split: opts.split.into(),
        tokenizer_pre: opts.tokenizer_pre.clone(),
        allow_nonfinite: opts.allow_nonfinite,
    };
    let mut m = manifest::build(tool, options, &opts.output, sources, written, &sources_of);
    m.write(path)?;
    Ok(())
}
