//! `sling dequantize` (developer command): sling's own dequantization of a compressed-tensors (`vllm:…`) or
//! MLX (`mlx:…`) directory, written as F32 safetensors in the source checkpoint's names and shapes — what
//! `sling eval` and `sling logits` run, and what the interop tests compare with the consumers' decoders.
//! Also the [`TensorSource`] those commands read such a directory through.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sling_calibration::TensorSource;
use sling_core::DType;
use sling_formats::st_write::{self, ShardWriter, StTensor};
use sling_targets::read::Artifact;

pub const AFTER_HELP: &str = "Every tensor of the artifact as F32, in the source checkpoint's names (per-expert \
2-D tensors also for MLX's stacked experts), each dequantized by sling's definition of its encoding.\n\n\
Examples:\n  sling quantize fixtures/models/qwen3moe --to vllm:fp8-dynamic -o q3-fp8\n  \
sling dequantize q3-fp8 -o q3-fp8-f32.safetensors";

#[derive(clap::Args)]
pub struct Args {
    /// An artifact directory written by `sling quantize --to vllm:… | mlx:…`.
    dir: PathBuf,
    /// Output .safetensors file.
    #[arg(short, long = "output")]
    output: PathBuf,
}

/// An artifact directory as a [`TensorSource`] (its weights dequantized on demand).
pub struct ArtifactSource(pub Artifact);

impl TensorSource for ArtifactSource {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.0.shape(name)
    }
    fn read_outer(&self, name: &str, i0: u64, i1: u64) -> sling_calibration::Result<Vec<f32>> {
        self.0
            .read_outer(name, i0, i1)
            .map_err(|e| sling_calibration::Error::Read { tensor: name.to_string(), why: e.to_string() })
    }
    fn release(&self) {
        self.0.release();
    }
    fn is_mxfp4(&self, name: &str) -> bool {
        // gpt-oss experts read back from MLX come in the MXFP4 checkpoint's [E, out, in] orientation.
        self.0.is_out_major(name)
    }
}

/// Opens `dir` as an artifact, if it is one.
pub fn open(dir: &std::path::Path) -> Result<Option<ArtifactSource>> {
    Ok(Artifact::open(dir).with_context(|| format!("cannot read {}", dir.display()))?.map(ArtifactSource))
}

pub fn run(a: Args) -> Result<()> {
    let Some(src) = open(&a.dir)? else {
        bail!(
            "{}: not a compressed-tensors or MLX artifact (no such quantization block in config.json)",
            a.dir.display()
        );
    };
    let ext_ok = a.output.extension().and_then(|e| e.to_str()) == Some("safetensors");
    if !ext_ok {
        bail!("-o {}: the file name must end in .safetensors", a.output.display());
    }
    let prefix = a.output.file_stem().and_then(|s| s.to_str()).context("-o: no file name")?.to_string();
    let dir = match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tensors: Vec<StTensor> =
        src.0.tensors().map(|(n, s)| StTensor::new(n.to_string(), DType::F32, s.to_vec())).collect();
    let names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    let layout = st_write::layout(tensors, None, &prefix, None)?;
    let order: Vec<String> = layout.shards.iter().flat_map(|s| s.tensors.iter().map(|t| t.name.clone())).collect();
    debug_assert_eq!(order.len(), names.len());
    let mut w = ShardWriter::create(&dir, layout)?;
    for name in &order {
        let v = src.read(name).with_context(|| format!("cannot dequantize {name}"))?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write(&bytes)?;
        src.release();
    }
    let written = w.finish()?;
    for (f, size, _) in &written.files {
        eprintln!("wrote {} ({size} bytes, {} tensors)", dir.join(f).display(), order.len());
    }
    Ok(())
}
