//! Executing a plan on the pipeline's engine ([`sling_pipeline::engine`]): each tensor is a one-part
//! weight of the [`Gguf`] target, cut into row chunks of bounded size (never across an expert's rows),
//! computed in parallel (rayon) a window at a time and written strictly in plan order by [`GgufFiles`].
//! Chunk boundaries do not depend on the thread count, and each chunk is encoded on its own, so the output
//! bytes are identical whatever the number of threads. Peak memory is bounded by the window, not the model.
//!
//! Crash safety and resume: outputs are written as `NAME.partial` with a journal
//! (`OUT.partial.json`, see [`sling_formats::gguf::write`]) and renamed only when complete and hashed. The
//! journal's fingerprint covers everything that decides the bytes (see [`fingerprint`]), so a resumed
//! run ([`ConvertOptions::resume`]) reuses only tensors this plan would write identically, after
//! re-hashing them, and skips computing them.
//!
//! Hooks for tests and tuning (environment variables, read by [`execute`]):
//! - `SLING_JOURNAL_INTERVAL_MS` (default 5000): least time between two journal commits (each
//!   flushes and fsyncs the data written so far); `0` commits after every tensor.
//! - `SLING_TEST_ABORT_AFTER_TENSORS=N`: stop the process at once (exit status 134, no destructor runs,
//!   nothing is flushed or cleaned up: what `kill -9` leaves) once N tensors are complete in the partial
//!   files (`0`: as soon as the first header is written).
//! - `SLING_TEST_ABORT_AT=renamed`: the same, after the outputs are renamed into place, before the
//!   model card and the manifest are written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::hparams::{arch_kvs, Kvs};
use super::naming;
use super::plan::{plan, OutTensor, OutType};
use crate::tokenizer::{vocab_kvs, TokenizerError, VocabOptions};
use sling_core::DType;
use sling_formats::checkpoint::Checkpoint;
use sling_formats::gguf::write::{hex, Resumable, Resumed, Written, JOURNAL_SCHEMA};
use sling_formats::gguf::{GgufError, GgufValue, GgufWriter, SplitPolicy, TensorDesc};
use sling_kernels::backend::{Backend, CpuBackend, KernelError};
use sling_pipeline::engine::{self, row_chunks, Chunk, Computed, Container, RunOptions};
use sling_pipeline::ops::{Op, OpError};
use sling_pipeline::{EncodeError, ExecError, Part, PlanError, Target, Weight};
use sling_provenance::card::{self, CardContext};
use sling_provenance::manifest::{self, ManifestError, Tool};

pub use sling_pipeline::engine::CHUNK_ELEMS;

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
    /// Write the provenance manifest (`OUT.sling.json`, see [`sling_provenance::manifest`]) naming this tool.
    /// A stale manifest of the same name is removed in every case before the outputs are renamed.
    pub provenance: Option<Tool>,
    /// Continue an interrupted conversion of the same plan from its partial files (re-hashing what
    /// is reused), and keep the partial files if this run fails too.
    pub resume: bool,
    /// `created` of the manifest (seconds since the Unix epoch); `None` leaves it out.
    pub created: Option<u64>,
    /// Write a model card (`README.md`, see [`card`]) beside the outputs; needs `provenance`.
    pub model_card: bool,
    /// Extra rows for the model card's summary table (recipe description, imatrix, ...).
    pub card_extra: Vec<(String, String)>,
    /// `sling quantize`'s options, recorded in the manifest as `options.quantize`.
    pub quantize: Option<manifest::QuantizeRecord>,
    /// Where blocks are quantized (`--device`); `None`: the CPU. Every backend gives the same bytes.
    pub backend: Option<Arc<dyn Backend>>,
}

impl ConvertOptions {
    /// Options with every optional feature off: no manifest, no card, no resume.
    pub fn new(out_type: OutType, output: PathBuf) -> ConvertOptions {
        ConvertOptions {
            out_type,
            output,
            split: SplitPolicy::None,
            allow_nonfinite: false,
            tokenizer_pre: None,
            window: None,
            provenance: None,
            resume: false,
            created: None,
            model_card: false,
            card_extra: Vec::new(),
            quantize: None,
            backend: None,
        }
    }
}

/// What [`convert`] and [`execute`] report while they run, in this order: `Start`, then `Bytes` after
/// every chunk written and `Tensor` as each tensor completes (reused ones first), then `Stage`s.
#[derive(Debug)]
pub enum Event<'a> {
    /// About to write (the outputs' partial files exist). `resumed` says what an interrupted run left
    /// that was re-checked and reused.
    Start { tensors: usize, bytes: u64, outputs: &'a [PathBuf], resumed: &'a Resumed },
    /// Output data bytes complete so far, of `total`.
    Bytes { done: u64, total: u64 },
    /// Tensor `index` (0-based, file order) of `of` is complete in its file; `done_bytes` counts the
    /// data bytes of every tensor complete so far.
    Tensor {
        index: usize,
        of: usize,
        name: &'a str,
        dtype: DType,
        bytes: u64,
        done_bytes: u64,
        total_bytes: u64,
        reused: bool,
    },
    /// A step after the tensors: `"hashing sources"`, `"writing manifest"`.
    Stage(&'a str),
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
    /// The model card written, if one was asked for.
    pub model_card: Option<PathBuf>,
    /// What was reused from an interrupted run.
    pub resumed: Resumed,
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
    #[error("tensor {tensor}: {source}")]
    Device { tensor: String, source: sling_kernels::DeviceError },
    /// The compressed-tensors / MLX encodings' argument errors (`Backend::encode_rows`); GGUF blocks never
    /// produce them.
    #[error("tensor {tensor}: {source}")]
    Encoding { tensor: String, source: sling_kernels::EncodingError },
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
    #[error(transparent)]
    Exec(ExecError),
    #[error("cannot write {path}: {reason}{hint}")]
    Output { path: PathBuf, reason: String, hint: String, source: std::io::Error },
    #[error("provenance manifest: {0}")]
    Manifest(#[from] ManifestError),
}

impl From<ExecError> for ConvertError {
    fn from(e: ExecError) -> ConvertError {
        match e {
            // An internal error, whichever layer saw it (exit status 3).
            ExecError::WriterPanicked => ConvertError::WriterPanicked,
            e => ConvertError::Exec(e),
        }
    }
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

/// All metadata of the output, in the reference converter's order. `tensors` are the output tensors (the parameter
/// counts behind `general.size_label`).
pub fn build_kvs(
    ck: &Checkpoint,
    out: OutType,
    tokenizer_pre: Option<String>,
    mxfp4_moe: bool,
    tensors: &[OutTensor],
) -> Result<Kvs, ConvertError> {
    let cfg = ck.config.as_ref().ok_or(PlanError::NoConfig)?;
    let arch = super::plan::arch_of(cfg)?;
    let mut kvs = Kvs::default();
    kvs.set("general.architecture", GgufValue::String(arch.gguf.into()));
    kvs.set("general.type", GgufValue::String("model".into()));
    // `prepare_metadata` -> `Metadata.load` + `set_gguf_meta_model`: sampling keys from generation_config.json, then
    // name, version, organization, finetune, basename and size label as gguf-py derives them (convert/naming.rs).
    let gen_cfg = std::fs::read(ck.dir.join("generation_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    kvs.extend(naming::sampling_kvs(gen_cfg.as_ref()));
    let counts = naming::parameter_counts(tensors.iter().map(|t| (t.name.as_str(), t.ne.as_slice())));
    let cfg_json = serde_json::Value::Object(cfg.root().clone());
    // The model card too, unless sling cannot read it as the reference does (then a note says so; see `plan`).
    let card = naming::card_keys(&ck.dir).unwrap_or_default();
    let dir_name = naming::py_path_name(&ck.dir);
    let names = naming::derive_naming(&dir_name, Some(&cfg_json), counts, &card)
        .unwrap_or_else(|_| naming::derive_naming(&dir_name, Some(&cfg_json), counts, &[]).unwrap_or_default());
    kvs.extend(naming::naming_kvs(&names));
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

/// How a GGUF tensor is encoded: its type and shape, the intermediate type its values are rounded through, its
/// importance weights.
#[derive(Clone, Debug)]
pub struct GgufEnc {
    pub dtype: DType,
    /// ggml order (`ne[0]` innermost).
    pub ne: Vec<u64>,
    pub round_via: Option<DType>,
    /// `ne[0]` per expert, expert-major.
    pub weights: Option<Arc<Vec<f32>>>,
}

/// The GGUF target as a plug-in of the pipeline's engine: each tensor one weight of one part, encoded by a
/// [`Backend`] (ggml's blocks, with llama-quantize's importance weights) or copied from the source.
pub struct Gguf<'b> {
    pub backend: &'b dyn Backend,
}

/// A planned GGUF tensor as a pipeline weight.
pub fn weight(t: OutTensor) -> Weight<GgufEnc> {
    let shape: Vec<u64> = t.ne.iter().rev().copied().collect();
    Weight {
        role: sling_core::Role::of(&t.name),
        parts: vec![Part::new(t.name.clone(), t.dtype, shape)],
        name: t.name,
        op: t.op,
        enc: GgufEnc { dtype: t.dtype, ne: t.ne, round_via: t.round_via, weights: t.weights },
        sources: t.sources,
        row_align: 1,
    }
}

/// Rows per expert of a stacked (3-D) tensor, which chunks never cross: each expert has its own importance
/// weights. Bytes do not depend on where chunks are cut otherwise: every row is encoded on its own.
fn expert_rows(ne: &[u64]) -> Option<u64> {
    (ne.len() >= 3).then(|| ne[1].max(1))
}

impl Target for Gguf<'_> {
    type Enc = GgufEnc;
    type Error = ConvertError;

    fn encode(
        &self,
        w: &Weight<GgufEnc>,
        r0: u64,
        vals: &[f32],
        _: Option<f32>,
        out: &mut [Vec<u8>],
    ) -> Result<(), EncodeError> {
        encode(w, r0, vals, &mut out[0], self.backend).map_err(EncodeError::target)
    }

    fn segment_rows(&self, w: &Weight<GgufEnc>) -> Option<u64> {
        expert_rows(&w.enc.ne)
    }

    fn compute<'a>(
        &self,
        ck: &'a Checkpoint,
        w: &Weight<GgufEnc>,
        r0: u64,
        r1: u64,
        _: Option<f32>,
        allow_nonfinite: bool,
    ) -> Result<(Computed<'a>, Option<String>), ConvertError> {
        compute(ck, w, &Chunk { w: 0, r0, r1 }, allow_nonfinite, self.backend)
    }
}

/// What `sling plan` estimates for executing a plan (see `docs/pipeline.md`, "Estimates").
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub threads: usize,
    /// Peak resident memory, bytes.
    pub peak_memory: u64,
    /// Wall time, seconds, from the documented throughput figures.
    pub seconds: f64,
}

/// Resident memory of the process before any tensor is computed (binary, metadata, tokenizer, thread
/// stacks): about 12 MiB measured on the fixtures, with a margin (`docs/pipeline.md`).
pub const BASE_MEMORY: u64 = 16 << 20;

/// Output elements written per second by one thread, by output type (read, convert, encode, write; no
/// hashing): measured with `sling -t 1 quantize --pure --no-manifest` (and `convert`) on a one-layer
/// synthetic Qwen3-MoE with Qwen3-30B-A3B's shapes, on a 2-core x86-64 machine with AVX2
/// (`docs/pipeline.md`, "Estimates").
pub fn encode_rate(dtype: DType) -> f64 {
    match dtype {
        // bf16 from bf16 sources is written straight from the mapped files; q8_0 from bf16 through
        // the fused AVX2 kernel. Both include the durable write (fsync) of the output.
        DType::BF16 => 450e6,
        DType::Q8_0 => 700e6,
        DType::F32 | DType::F16 => 230e6,
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => 145e6,
        DType::MXFP4 => 140e6,
        DType::TQ1_0 | DType::TQ2_0 => 125e6,
        DType::IQ4NL | DType::IQ4XS => 37e6,
        DType::Q3K => 52e6,
        DType::Q6K => 21e6,
        DType::Q5K => 18e6,
        DType::Q2K => 16e6,
        DType::Q4K => 14e6,
        _ => 14e6,
    }
}

/// Bytes per second that one thread hashes (sha256 with SHA-NI, the manifest's file, tensor and source
/// hashes; OpenSSL measures the same 1.3 GB/s on the benchmark machine).
pub const HASH_RATE: f64 = 1.3e9;

/// Estimates peak memory and time of executing `tensors` with `threads` workers. `src_bytes_per_elem`
/// gives each tensor's bytes per element in the source. Memory, meant as an upper bound: [`BASE_MEMORY`],
/// the writer's buffer, per worker one chunk's values as f32 and its source bytes read, and, for the
/// worst three consecutive windows (one being written, one queued, one being computed), their output
/// bytes plus the computed window's source pages. Time: encoding at [`encode_rate`] on `threads`
/// threads, plus hashing (outputs on the writer thread, sources on all threads) at [`HASH_RATE`] when
/// `hashing`.
pub fn estimate(
    tensors: &[OutTensor],
    src_bytes_per_elem: &dyn Fn(&OutTensor) -> f64,
    threads: usize,
    hashing: bool,
) -> Estimate {
    let threads = threads.max(1);
    let window = 2 * threads;
    let cs: Vec<Chunk> = tensors
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            row_chunks(t.rows(), t.ne.first().copied().unwrap_or(1), 1, expert_rows(&t.ne))
                .into_iter()
                .map(move |(r0, r1)| Chunk { w: i, r0, r1 })
        })
        .collect();
    let mut out_w = Vec::new();
    let mut src_w = Vec::new();
    let mut max_chunk = 0f64; // bytes of one chunk's f32 values and source bytes
    for win in cs.chunks(window) {
        let (mut o, mut s) = (0u64, 0f64);
        for c in win {
            let t = &tensors[c.w];
            let cols = t.ne.first().copied().unwrap_or(1);
            let elems = (c.r1 - c.r0) * cols;
            max_chunk = max_chunk.max(elems as f64 * (4.0 + src_bytes_per_elem(t)));
            o += t.dtype.bytes_for(elems).unwrap_or(elems * 4);
            s += elems as f64 * src_bytes_per_elem(t);
        }
        out_w.push(o);
        src_w.push(s as u64);
    }
    let worst = (0..out_w.len())
        .map(|i| {
            let o: u64 = out_w[i.saturating_sub(2)..=i].iter().sum();
            o + src_w[i]
        })
        .max()
        .unwrap_or(0);
    let peak_memory = BASE_MEMORY + (8 << 20) + threads as u64 * max_chunk as u64 + worst;
    let encode: f64 = tensors.iter().map(|t| t.numel() as f64 / encode_rate(t.dtype)).sum::<f64>() / threads as f64;
    let out_bytes: u64 = tensors.iter().map(OutTensor::n_bytes).sum();
    let in_bytes: f64 = tensors.iter().map(|t| t.numel() as f64 * src_bytes_per_elem(t)).sum();
    let hash = if hashing { out_bytes as f64 / HASH_RATE + in_bytes / HASH_RATE / threads as f64 } else { 0.0 };
    Estimate { threads, peak_memory, seconds: encode + hash }
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

/// Rows `r0..r1` of `t` as f32, as the quantizer sees them (decoded, rounded through the intermediate type):
/// what the size-targeted allocation (`quantize::auto`) measures each candidate type on.
pub fn read_f32(
    ck: &Checkpoint,
    t: &OutTensor,
    r0: u64,
    r1: u64,
    out: &mut Vec<f32>,
    backend: &dyn Backend,
) -> Result<(), ConvertError> {
    out.clear();
    let op_err = |source| ConvertError::Op { tensor: t.name.clone(), source };
    match &t.op {
        Op::Mxfp4(m) => {
            let mut raw = Vec::new();
            m.read(ck, r0, r1, &mut raw).map_err(op_err)?;
            backend.dequantize(DType::MXFP4, &raw, out).map_err(|e| kernel_error(&t.name, e))?;
        }
        Op::Gguf(g) => {
            let src = g.rows_or_err(r0, r1).map_err(op_err)?;
            if g.dtype.is_quantized() {
                backend.dequantize(g.dtype, src, out).map_err(|e| kernel_error(&t.name, e))?;
            } else {
                sling_quantizers::decode_to_f32(g.dtype, src, out).map_err(|_| ConvertError::Encode {
                    tensor: t.name.clone(),
                    source: sling_quantizers::EncodeError::Unsupported(g.dtype),
                })?;
            }
        }
        op => {
            op.read(ck, r0, r1, out).map_err(op_err)?;
            if let Some(via) = t.round_via {
                round_through(via, out);
            }
        }
    }
    Ok(())
}

/// Encodes rows `r0..` of `t` (values `v`) as its type, with the importance weights of the chunk's expert.
fn encode(
    t: &Weight<GgufEnc>,
    r0: u64,
    v: &[f32],
    out: &mut Vec<u8>,
    backend: &dyn Backend,
) -> Result<(), ConvertError> {
    let e = &t.enc;
    let cols = e.ne.first().copied().unwrap_or(1) as usize;
    let w = e.weights.as_deref().and_then(|w| {
        let per_expert = expert_rows(&e.ne).unwrap_or(t.rows().max(1));
        let x = (r0 / per_expert) as usize;
        w.get(x * cols..(x + 1) * cols)
    });
    if e.dtype == DType::Q8_0 && e.round_via.is_none() {
        // Q8_0 has two references, which differ in a block holding a NaN (`quantize_row_q8_0_ggml`): a
        // conversion is `convert_hf_to_gguf.py --outtype q8_0`, gguf-py's numpy encoder; a quantization (whose
        // tensors have the intermediate type `round_via`) is llama-quantize's `ggml_quantize_chunk`.
        return sling_kernels::encode_f32(DType::Q8_0, v, cols, out).map_err(|x| kernel_error(&t.name, x.into()));
    }
    backend.quantize_rows(e.dtype, v, cols, w, out).map_err(|x| kernel_error(&t.name, x))
}

/// A kernel's error on tensor `tensor`.
pub(crate) fn kernel_error(tensor: &str, e: KernelError) -> ConvertError {
    let tensor = tensor.to_string();
    match e {
        KernelError::Encode(source) => ConvertError::Encode { tensor, source },
        KernelError::Device(source) => ConvertError::Device { tensor, source },
        KernelError::Encoding(source) => ConvertError::Encoding { tensor, source },
    }
}

/// Whether `b`, elements of the plain float type `dtype`, holds an Inf or NaN (exponent bits all
/// ones). Eight bytes at a time: masking each lane to its exponent and adding the exponent's lowest
/// bit carries into the lane's top bit exactly when the exponent is all ones, and never across
/// lanes; the loop has no branch, so it vectorises. Other dtypes: false.
fn has_nonfinite(dtype: DType, b: &[u8]) -> bool {
    let (mask, add, top) = match dtype {
        DType::BF16 => (0x7f80_7f80_7f80_7f80u64, 0x0080_0080_0080_0080u64, 0x8000_8000_8000_8000u64),
        DType::F16 => (0x7c00_7c00_7c00_7c00, 0x0400_0400_0400_0400, 0x8000_8000_8000_8000),
        DType::F32 => (0x7f80_0000_7f80_0000, 0x0080_0000_0080_0000, 0x8000_0000_8000_0000),
        _ => return false,
    };
    let words = b.chunks_exact(8);
    // The tail holds whole elements; zero lanes after them are finite.
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    let word = |w: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        (u64::from_le_bytes(a) & mask) + add
    };
    let acc = words.fold(word(&tail), |acc, w| acc | word(w));
    acc & top != 0
}

/// Computes chunk `c` of `t` (see [`Gguf`]): the mapped source bytes when the type is unchanged and only rows
/// are selected, bf16 rows straight to Q8_0, MXFP4 codes repacked or a GGUF source's bytes copied, else the
/// values (rounded through the intermediate type) encoded.
fn compute<'a>(
    ck: &'a Checkpoint,
    t: &Weight<GgufEnc>,
    c: &Chunk,
    allow_nonfinite: bool,
    backend: &dyn Backend,
) -> Result<(Computed<'a>, Option<String>), ConvertError> {
    let mut bytes = Vec::new();
    let mut flagged = None;
    let dtype = t.enc.dtype;
    let op_err = |source| ConvertError::Op { tensor: t.name.clone(), source };
    let nonfinite = |v: &[f32], flagged: &mut Option<String>| -> Result<(), ConvertError> {
        if let Some((i, x)) = sling_quantizers::common::first_nonfinite(v) {
            let index = c.r0 * t.enc.ne.first().copied().unwrap_or(1) + i as u64;
            if !allow_nonfinite {
                return Err(ConvertError::NonFinite {
                    tensor: t.name.clone(),
                    sources: t.sources.join(", "),
                    index,
                    value: x,
                });
            }
            *flagged = Some(format!("{}: non-finite value {x} at element {index}", t.name));
        }
        Ok(())
    };
    // Rounding through the intermediate type is the identity when the output has that type.
    let round_via = t.enc.round_via.filter(|r| *r != dtype);
    if let Some(src) = t.op.raw_dtype() {
        let op = &t.op;
        // Same type in and out and only rows selected: with no NaN/Inf the reference's decode-then-round
        // is the identity (bf16->f32->bf16, f16->f32->f16), so the mapped source bytes are the output.
        let copy = round_via.is_none() && matches!(dtype, DType::BF16 | DType::F16 | DType::F32) && src == dtype;
        // bf16 rows to Q8_0 straight from the mapped bytes (widening bf16 to f32 is exact, and rounding it
        // back through bf16 the identity), without an f32 copy of the chunk.
        let q8_0 = dtype == DType::Q8_0
            && src == DType::BF16
            && matches!(round_via, None | Some(DType::BF16))
            && op.cols() % 32 == 0;
        let mut slices = Vec::new();
        // A chunk with NaN/Inf takes the slow path below, which reports it.
        if (copy || q8_0)
            && op.raw_slices(ck, c.r0, c.r1, &mut slices).map_err(op_err)?
            && !slices.iter().any(|b| has_nonfinite(src, b))
        {
            if copy {
                return Ok((Computed::Mapped(slices), None));
            }
            bytes.reserve_exact(dtype.bytes_for((c.r1 - c.r0) * op.cols()).unwrap_or(0) as usize);
            for b in slices {
                sling_kernels::quantize_bf16_row_q8_0(b, &mut bytes);
            }
            return Ok((Computed::Parts(vec![bytes]), None));
        }
    }
    match &t.op {
        Op::Mxfp4(m) if dtype == DType::MXFP4 => m.read(ck, c.r0, c.r1, &mut bytes).map_err(op_err)?,
        Op::Mxfp4(m) => {
            // Requantizing MXFP4 experts: ggml's `to_float`, then the new type (llama-quantize --allow-requantize).
            let mut raw = Vec::new();
            m.read(ck, c.r0, c.r1, &mut raw).map_err(op_err)?;
            let mut v = Vec::new();
            backend.dequantize(DType::MXFP4, &raw, &mut v).map_err(|e| kernel_error(&t.name, e))?;
            encode(t, c.r0, &v, &mut bytes, backend)?;
        }
        Op::Gguf(g) => {
            let src = g.rows_or_err(c.r0, c.r1).map_err(op_err)?;
            let enc_err = |source| ConvertError::Encode { tensor: t.name.clone(), source };
            let mut v = Vec::new();
            // ggml's to_float for every type (f32/f16/bf16 exact widening, block types dequantized).
            if g.dtype.is_quantized() {
                backend.dequantize(g.dtype, src, &mut v).map_err(|e| kernel_error(&t.name, e))?;
            } else {
                sling_quantizers::decode_to_f32(g.dtype, src, &mut v)
                    .map_err(|_| enc_err(sling_quantizers::EncodeError::Unsupported(g.dtype)))?;
            }
            nonfinite(&v, &mut flagged)?;
            if dtype == g.dtype {
                bytes.extend_from_slice(src);
            } else {
                encode(t, c.r0, &v, &mut bytes, backend)?;
            }
        }
        op if round_via.is_none() && op.raw_dtype() == Some(dtype) && raw_copy(ck, op, c, t, &mut bytes)? => {
            // Same type in and out and only element moves, no NaN/Inf: the reference's
            // decode-then-round is the identity (bf16->f32->bf16, f16->f32->f16), so bytes were copied.
        }
        op => {
            let mut v = Vec::with_capacity(((c.r1 - c.r0) * op.cols()) as usize);
            op.read(ck, c.r0, c.r1, &mut v).map_err(op_err)?;
            nonfinite(&v, &mut flagged)?;
            if let Some(via) = round_via {
                round_through(via, &mut v);
            }
            encode(t, c.r0, &v, &mut bytes, backend)?;
        }
    }
    Ok((Computed::Parts(vec![bytes]), flagged))
}

/// Produces chunk `c` of `op` by moving raw elements when its type is a plain float type and every
/// element is finite (checked on the bits: exponent all ones means Inf or NaN). Returns false, with
/// `out` untouched, when the slow path must decide.
fn raw_copy(ck: &Checkpoint, op: &Op, c: &Chunk, t: &Weight<GgufEnc>, out: &mut Vec<u8>) -> Result<bool, ConvertError> {
    fn put<const N: usize, E: Copy>(out: &mut Vec<u8>, v: &[E], f: impl Fn(E) -> [u8; N]) {
        let start = out.len();
        out.resize(start + v.len() * N, 0);
        for (d, x) in out[start..].chunks_exact_mut(N).zip(v) {
            d.copy_from_slice(&f(*x));
        }
    }
    let dtype = t.enc.dtype;
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

/// The sha256 of tensor `t`'s data bytes as [`execute`] writes them (the same chunks, computed a
/// window at a time on the rayon pool and hashed in order), without writing anything: what
/// `sling verify --source` re-derives. Also returns the number of bytes hashed.
pub fn tensor_sha256(ck: &Checkpoint, t: &OutTensor, allow_nonfinite: bool) -> Result<(String, u64), ConvertError> {
    let cpu = CpuBackend::default();
    let h = engine::hash_weight(&Gguf { backend: &cpu }, ck, &weight(t.clone()), None, allow_nonfinite)?;
    let n = h.bytes;
    Ok((h.hex().remove(0), n))
}

/// Converts `ck` as `opts` says, reporting progress through `events`.
pub fn convert(
    ck: &Checkpoint,
    opts: &ConvertOptions,
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<ConvertReport, ConvertError> {
    check_output_path(ck, &opts.output)?;
    let p = plan(ck, opts.out_type)?;
    let mxfp4 = p.tensors.iter().any(|t| matches!(t.op, Op::Mxfp4(_)));
    let kvs = build_kvs(ck, opts.out_type, opts.tokenizer_pre.clone(), mxfp4, &p.tensors)?;
    let label = opts.out_type.dtype().name().to_string();
    execute(ck, Prepared { tensors: p.tensors, kvs, notes: p.notes, label }, opts, events)
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
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<ConvertReport, ConvertError> {
    check_output_path(ck, &opts.output)?;
    let Prepared { tensors, kvs, notes, label } = prep;
    let descs: Vec<TensorDesc> =
        tensors.iter().map(|t| TensorDesc { name: t.name.clone(), dtype: t.dtype, ne: t.ne.clone() }).collect();
    let total: u64 = tensors.iter().map(OutTensor::n_bytes).sum();
    let card_cx = card_context(ck, &kvs, opts);
    let resumable = Resumable {
        fingerprint: fingerprint(ck, &tensors, &kvs, opts, &label),
        resume: opts.resume,
        interval: Duration::from_millis(env_u64("SLING_JOURNAL_INTERVAL_MS").unwrap_or(5000)),
    };
    let mut w = GgufWriter::create_resumable(
        &opts.output,
        kvs.0,
        descs,
        opts.split,
        opts.provenance.is_some(),
        Some(resumable),
    )
    .map_err(output_error(opts.resume))?;
    let n_tensors = tensors.len();
    let tensors: Vec<Weight<GgufEnc>> = tensors.into_iter().map(weight).collect();
    // A run asked to resume keeps its partial files if it fails as well, for the next --resume.
    w.keep_partial(opts.resume);
    let resumed = w.resumed().clone();
    let manifest_path = manifest::manifest_path(&opts.output);
    // Source files are hashed by a background thread during the conversion, and by every rayon
    // thread once the outputs are written.
    let source_hasher = opts.provenance.as_ref().map(|_| manifest::SourceHasher::new(ck));
    let (written, nonfinite) = std::thread::scope(|scope| {
        if let Some(sh) = &source_hasher {
            scope.spawn(|| sh.work());
        }
        let res = write_outputs(ck, opts, &tensors, w, &manifest_path, total, events);
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
    })?;
    if std::env::var("SLING_TEST_ABORT_AT").as_deref() == Ok("renamed") {
        crash_for_test();
    }
    let outputs = written.paths();
    let (manifest, model_card) = match (&opts.provenance, source_hasher) {
        (Some(tool), Some(sh)) => {
            events(&Event::Stage("writing manifest"));
            let res = sh.into_results().map_err(ConvertError::from).and_then(|sources| {
                write_manifest(opts, &label, tool, sources, &tensors, &written, &manifest_path, &card_cx)
            });
            match res {
                Ok(card) => (Some(manifest_path), card),
                Err(e) => {
                    // Keep "an error leaves nothing behind": the outputs would be unverifiable anyway.
                    for o in &outputs {
                        let _ = std::fs::remove_file(o);
                    }
                    let _ = card::remove_stale_cards(&opts.output);
                    return Err(e);
                }
            }
        }
        _ => (None, None),
    };
    Ok(ConvertReport {
        outputs,
        n_tensors,
        bytes_in: ck.total_bytes(),
        bytes_out: total,
        notes,
        nonfinite,
        written,
        manifest,
        model_card,
        resumed,
    })
}

/// The test hooks' crash: exit at once without running destructors (partial files, journal and lock
/// stay as a killed process leaves them; buffered bytes are lost), and without a core dump.
fn crash_for_test() -> ! {
    std::process::exit(134)
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok())
}

/// Turns an I/O error on the output into a message that says what happened (disk full, read-only,
/// permission denied) and what is left behind.
fn output_error(resume: bool) -> impl Fn(GgufError) -> ConvertError {
    move |e| match e {
        GgufError::Io { path, op, source } => {
            use std::io::ErrorKind as K;
            let reason = match source.kind() {
                K::StorageFull => "the disk is full (no space left on device)".to_string(),
                K::QuotaExceeded => "the disk quota is exceeded".to_string(),
                K::FileTooLarge => "the file size limit was reached (file too large)".to_string(),
                K::ReadOnlyFilesystem => "the output directory is on a read-only file system".to_string(),
                K::PermissionDenied => "permission denied (is the output directory writable?)".to_string(),
                K::NotFound => "the output directory does not exist".to_string(),
                K::WouldBlock if op == "lock" => "another sling process is writing this output right now".to_string(),
                _ => format!("{op} failed"),
            };
            let hint = if op == "lock" {
                String::new()
            } else if resume {
                "; the partial output is kept: rerun with --resume to continue (or delete the .partial files)"
                    .to_string()
            } else {
                "; nothing was left behind and the source was not touched".to_string()
            };
            ConvertError::Output { path, reason, hint, source }
        }
        other => ConvertError::Gguf(other),
    }
}

/// A digest of everything that decides the output bytes: the code version, the options, the metadata,
/// every tensor's name, type, shape, recipe and importance weights, and each source file's path, size
/// and modification time. A journal with another fingerprint is never resumed.
pub fn fingerprint(ck: &Checkpoint, tensors: &[OutTensor], kvs: &Kvs, opts: &ConvertOptions, label: &str) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    put(JOURNAL_SCHEMA);
    put(env!("CARGO_PKG_VERSION"));
    if let Some(t) = &opts.provenance {
        put(&t.version);
        put(&t.git_commit);
    }
    put(label);
    put(&format!("{:?} {:?} {} {:?}", opts.out_type, opts.split, opts.allow_nonfinite, opts.tokenizer_pre));
    put(&format!("{:?}", kvs.0));
    for t in tensors {
        put(&t.name);
        put(t.dtype.name());
        put(&format!("{:?} {:?} {:?}", t.ne, t.round_via, t.sources));
        match &t.weights {
            Some(w) => {
                let mut wh = Sha256::new();
                for x in w.iter() {
                    wh.update(x.to_le_bytes());
                }
                put(&hex(&wh.finalize()));
            }
            None => put("-"),
        }
    }
    for (rel, stamp) in manifest::source_stamps(ck) {
        put(&rel);
        put(&stamp);
    }
    hex(&h.finalize())
}

/// The GGUF file set as the engine's [`Container`]: bytes written in file order through the [`GgufWriter`]
/// (its journal, hashing while writing), progress reported as bytes arrive and tensors complete.
struct GgufFiles<'e> {
    w: GgufWriter,
    tensors: &'e [Weight<GgufEnc>],
    reused: usize,
    /// Tensors reported complete so far, and their bytes.
    seen: usize,
    tensor_bytes: u64,
    done: u64,
    total: u64,
    abort_after: Option<usize>,
    resume: bool,
    events: &'e (dyn Fn(&Event<'_>) + Sync),
}

impl GgufFiles<'_> {
    /// Reports the tensors completed since the last call, and stops the process at the test hook.
    fn report(&mut self) {
        while self.seen < self.w.completed().len() {
            let t = &self.tensors[self.seen];
            let bytes = t.parts[0].n_bytes();
            self.tensor_bytes += bytes;
            (self.events)(&Event::Tensor {
                index: self.seen,
                of: self.tensors.len(),
                name: &t.name,
                dtype: t.enc.dtype,
                bytes,
                done_bytes: self.tensor_bytes,
                total_bytes: self.total,
                reused: self.seen < self.reused,
            });
            self.seen += 1;
        }
        if self.abort_after.is_some_and(|a| self.seen >= a) {
            crash_for_test();
        }
    }
}

impl Container for GgufFiles<'_> {
    type Error = ConvertError;
    fn put(&mut self, _: &Chunk, _: bool, data: Computed<'_>) -> Result<(), ConvertError> {
        for (_, bytes) in data.slices() {
            self.w.write_data(bytes).map_err(output_error(self.resume))?;
            self.done += bytes.len() as u64;
        }
        (self.events)(&Event::Bytes { done: self.done, total: self.total });
        self.report();
        Ok(())
    }
}

/// Computes the tensors on the pipeline's engine ([`Gguf`] into [`GgufFiles`]), then renames the outputs.
/// Tensors reused from an interrupted run are not computed again. Returns what was written and the
/// non-finite values let through.
fn write_outputs(
    ck: &Checkpoint,
    opts: &ConvertOptions,
    tensors: &[Weight<GgufEnc>],
    w: GgufWriter,
    manifest_path: &Path,
    total: u64,
    events: &(dyn Fn(&Event<'_>) + Sync),
) -> Result<(Written, Vec<String>), ConvertError> {
    let reused = w.resumed().tensors;
    let outputs = w.output_paths();
    events(&Event::Start { tensors: tensors.len(), bytes: total, outputs: &outputs, resumed: w.resumed() });
    let cpu = CpuBackend::default();
    let target = Gguf { backend: opts.backend.as_deref().unwrap_or(&cpu) };
    let mut files = GgufFiles {
        w,
        tensors,
        reused,
        seen: 0,
        tensor_bytes: 0,
        done: 0,
        total,
        abort_after: env_u64("SLING_TEST_ABORT_AFTER_TENSORS").map(|n| n as usize),
        resume: opts.resume,
        events,
    };
    files.report();
    files.done = files.tensor_bytes;
    let run = RunOptions { window: opts.window, allow_nonfinite: opts.allow_nonfinite };
    // On an error the writer is dropped, which removes its partial files (or keeps them with --resume).
    let (files, nonfinite) = engine::run(&target, ck, tensors, reused, run, &HashMap::new(), files)?;
    // A manifest (and model card) left by an earlier run must never describe the new files: remove
    // them before the new files take their outputs' names. A crash from here until the new manifest is
    // in place leaves outputs without a manifest, which `verify` reports as not verifiable.
    match std::fs::remove_file(manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ConvertError::Io { path: manifest_path.to_path_buf(), source: e });
        }
        _ => {}
    }
    card::remove_stale_cards(&opts.output).map_err(|source| ConvertError::Io { path: opts.output.clone(), source })?;
    Ok((files.w.finish_hashed().map_err(output_error(false))?, nonfinite))
}

/// What the model card says besides the manifest.
fn card_context(ck: &Checkpoint, kvs: &Kvs, opts: &ConvertOptions) -> CardContext {
    let gguf_architecture = match kvs.get("general.architecture") {
        Some(GgufValue::String(a)) => a.clone(),
        _ => String::new(),
    };
    let experts = match kvs.get(&format!("{gguf_architecture}.expert_count")) {
        Some(GgufValue::U32(n)) => Some(u64::from(*n)),
        Some(GgufValue::U64(n)) => Some(*n),
        _ => None,
    };
    let hf_architecture = ck.config.as_ref().and_then(|c| c.architecture().ok()).map(str::to_string);
    let source_name = match ck.files.is_empty() {
        // A lone file (a GGUF being requantized): its name.
        true => ck.other_sources.first().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()),
        false => ck.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
    }
    .unwrap_or_else(|| "model".into());
    CardContext {
        source_name,
        hf_architecture,
        gguf_architecture,
        experts,
        manifest_name: manifest::manifest_path(&opts.output)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        extra: opts.card_extra.clone(),
        format: None,
    }
}

/// Builds the manifest, writes the model card (when asked) and then the manifest, sealed, atomically.
/// Returns the card's path.
#[allow(clippy::too_many_arguments)]
fn write_manifest(
    opts: &ConvertOptions,
    label: &str,
    tool: &Tool,
    sources: Vec<manifest::SourceFile>,
    tensors: &[Weight<GgufEnc>],
    written: &Written,
    path: &Path,
    card_cx: &CardContext,
) -> Result<Option<PathBuf>, ConvertError> {
    let sources_of: HashMap<String, Vec<String>> =
        tensors.iter().map(|t| (t.name.clone(), t.sources.clone())).collect();
    let options = manifest::Options {
        to: "gguf".into(),
        out_type: label.to_string(),
        split: opts.split.into(),
        tokenizer_pre: opts.tokenizer_pre.clone(),
        allow_nonfinite: opts.allow_nonfinite,
        quantize: opts.quantize.clone(),
        target: None,
    };
    let mut m = manifest::build(tool, options, &opts.output, sources, written, &sources_of);
    m.created = opts.created.map(manifest::rfc3339);
    let mut card_path = None;
    if opts.model_card {
        let p = card::card_path(&opts.output);
        let text = card::render(&m, card_cx);
        manifest::write_atomic(&p, text.as_bytes())?;
        m.model_card = Some(manifest::OutputFile {
            name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            size: text.len() as u64,
            sha256: hex(&Sha256::digest(text.as_bytes())),
        });
        card_path = Some(p);
    }
    m.write(path)?;
    Ok(card_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scalar definition: decode each element and ask it.
    fn scalar(dtype: DType, b: &[u8]) -> bool {
        match dtype {
            DType::BF16 => b.chunks_exact(2).any(|c| !half::bf16::from_le_bytes([c[0], c[1]]).is_finite()),
            DType::F16 => b.chunks_exact(2).any(|c| !half::f16::from_le_bytes([c[0], c[1]]).is_finite()),
            DType::F32 => b.chunks_exact(4).any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn has_nonfinite_agrees_with_is_finite(
            words in proptest::collection::vec(any::<u32>(), 0..40),
            special in proptest::collection::vec((0usize..80, prop_oneof![Just(0x7f80u16), Just(0x7c00), Just(0xffff), Just(0x7fc0), Just(0x7bff), Just(0x7f7f)]), 0..3),
        ) {
            let mut b: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            for (i, v) in special {
                if 2 * i + 1 < b.len() {
                    b[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let es = dtype.block_bytes();
                // Every length that holds whole elements, so the tail is exercised too.
                for len in (0..=b.len()).filter(|l| l % es == 0) {
                    prop_assert_eq!(has_nonfinite(dtype, &b[..len]), scalar(dtype, &b[..len]), "{:?} len {}", dtype, len);
                }
            }
        }
    }

    #[test]
    fn has_nonfinite_finds_each_lane() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let es = dtype.block_bytes();
            let bad: &[u8] = match dtype {
                DType::BF16 => &[0x80, 0x7f],
                DType::F16 => &[0x00, 0xfc],
                _ => &[0x01, 0x00, 0x80, 0x7f],
            };
            for n in 1..12 {
                for at in 0..n {
                    let mut b = vec![0x11u8; n * es];
                    b[at * es..(at + 1) * es].copy_from_slice(bad);
                    assert!(has_nonfinite(dtype, &b), "{dtype:?} n {n} at {at}");
                }
                assert!(!has_nonfinite(dtype, &vec![0x11u8; n * es]));
            }
        }
    }
}
