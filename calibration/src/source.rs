//! Where the forward pass gets its weights: [`TensorSource`], decoded to `f32` on demand.
//!
//! [`CheckpointSource`] reads a Hugging Face checkpoint through the converter's lazy mmap reader and
//! the converter's own decoders, so the values are exactly those `sling convert` writes at F32:
//! plain bf16/f16/f32 tensors, DeepSeek FP8 (`weight * weight_scale_inv` per block, `ops::Op::Fp8`)
//! and gpt-oss MXFP4 (`*_blocks`/`*_scales`, repacked by `ops::Mxfp4Repack` and dequantized by
//! the ggml MXFP4 dequantizer).

use sling_core::DType;
use sling_formats::checkpoint::Checkpoint;
use sling_pipeline::ops::{Mxfp4Repack, Op, Src};

use crate::error::{Error, Result};

/// A read-only store of named tensors, decoded to `f32`.
///
/// Shapes are in PyTorch order (outermost first). A name `X` that is not stored but has MXFP4
/// siblings `X_blocks` `[.., out, n_blocks, 16]` and `X_scales` `[.., out, n_blocks]` reads as the
/// dequantized tensor `[.., out, n_blocks * 32]` (note: gpt-oss's bf16 `X` is stored `[.., in, out]`;
/// use [`TensorSource::is_mxfp4`] to tell the layouts apart).
pub trait TensorSource: Send + Sync {
    /// The (logical) shape of `name`, or `None` if absent.
    fn shape(&self, name: &str) -> Option<Vec<u64>>;

    /// Slices `i0..i1` along the outermost dimension of `name`, as row-major `f32`.
    fn read_outer(&self, name: &str, i0: u64, i1: u64) -> Result<Vec<f32>>;

    /// Whether `name` is stored as MXFP4 blocks.
    fn is_mxfp4(&self, name: &str) -> bool {
        let _ = name;
        false
    }

    /// What llama.cpp's CPU backend would round a product's activations to before multiplying them with the
    /// weight `name` (the `vec_dot_type` of the type it is stored in, [`sling_core::DTypeInfo::cpu_vec_dot`]);
    /// `None` where this source has no ggml type for it (a checkpoint, an MLX or compressed-tensors directory).
    fn cpu_vec_dot(&self, name: &str) -> Option<sling_core::VecDot> {
        let _ = name;
        None
    }

    /// [`TensorSource::cpu_vec_dot`] of a tensor the checkpoint does not have, by its GGUF name: DeepSeek's
    /// `blk.N.attn_k_b.weight`/`attn_v_b.weight`, the halves of `kv_b_proj` llama.cpp multiplies separately.
    fn gguf_vec_dot(&self, gguf_name: &str) -> Option<sling_core::VecDot> {
        let _ = gguf_name;
        None
    }

    /// Called after each layer: a source may drop cached pages.
    fn release(&self) {}

    /// The whole of `name`.
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        let shape = self.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        let n0 = shape.first().copied().unwrap_or(1);
        self.read_outer(name, 0, n0)
    }

    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
}

/// A [`TensorSource`] over a Hugging Face [`Checkpoint`].
pub struct CheckpointSource<'a> {
    ck: &'a Checkpoint,
    /// `quantization_config.weight_block_size` of an FP8 checkpoint.
    fp8_block: Option<(u64, u64)>,
}

impl<'a> CheckpointSource<'a> {
    pub fn new(ck: &'a Checkpoint) -> CheckpointSource<'a> {
        let fp8_block = ck
            .config
            .as_ref()
            .and_then(|c| c.get("quantization_config"))
            .and_then(|q| q.get("weight_block_size"))
            .and_then(|b| b.as_array())
            .and_then(|b| match b.as_slice() {
                [r, c] => Some((r.as_u64()?, c.as_u64()?)),
                _ => None,
            });
        CheckpointSource { ck, fp8_block }
    }

    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ck
    }

    fn mxfp4_parts(
        &self,
        name: &str,
    ) -> Option<(&'a sling_formats::checkpoint::SourceTensor, &'a sling_formats::checkpoint::SourceTensor)> {
        if self.ck.get(name).is_some() {
            return None;
        }
        Some((self.ck.get(&format!("{name}_blocks"))?, self.ck.get(&format!("{name}_scales"))?))
    }
}

fn read_err(tensor: &str, why: impl ToString) -> Error {
    Error::Read { tensor: tensor.to_string(), why: why.to_string() }
}

impl TensorSource for CheckpointSource<'_> {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        if let Some(t) = self.ck.get(name) {
            return Some(t.shape.clone());
        }
        let (b, _) = self.mxfp4_parts(name)?;
        let n = b.shape.len();
        if n < 3 {
            return None;
        }
        let mut s = b.shape[..n - 2].to_vec();
        s.push(b.shape[n - 2] * 32);
        Some(s)
    }

    fn is_mxfp4(&self, name: &str) -> bool {
        self.mxfp4_parts(name).is_some()
    }

    fn release(&self) {
        self.ck.release_pages();
    }

    fn read_outer(&self, name: &str, i0: u64, i1: u64) -> Result<Vec<f32>> {
        let shape = self.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        let n0 = shape.first().copied().unwrap_or(1);
        if i1 > n0 || i0 > i1 {
            return Err(read_err(name, format!("slice {i0}..{i1} outside the outer dimension {n0}")));
        }
        // Rows (in the `Op` sense: all dimensions but the last) per outer index.
        let inner_rows: u64 = if shape.len() >= 2 { shape[1..shape.len() - 1].iter().product() } else { 1 };
        let (r0, r1) = if shape.len() >= 2 { (i0 * inner_rows, i1 * inner_rows) } else { (0, 1) };
        let mut out = Vec::new();
        if let Some((b, s)) = self.mxfp4_parts(name) {
            let nb = b.shape[b.shape.len() - 2];
            if b.shape.last() != Some(&16)
                || s.shape.len() != b.shape.len() - 1
                || s.shape[..] != b.shape[..b.shape.len() - 1]
            {
                return Err(Error::Shape {
                    tensor: b.name.clone(),
                    shape: b.shape.clone(),
                    expected: format!("[.., n_blocks, 16] matching {} {:?}", s.name, s.shape),
                });
            }
            let rep = Mxfp4Repack { blocks: b.name.clone(), scales: s.name.clone(), nb, map: (r0..r1).collect() };
            let mut bytes = Vec::new();
            rep.read(self.ck, 0, r1 - r0, &mut bytes).map_err(|e| read_err(name, e))?;
            sling_quantizers::dequantize(DType::MXFP4, &bytes, &mut out).map_err(|e| read_err(name, e))?;
            return Ok(out);
        }
        let t = self.ck.get(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        let src = Src::of(t);
        let mut op = Op::Source(src.clone());
        if matches!(t.dtype, DType::F8E4M3 | DType::F8E5M2) {
            // Scale present, shaped for the block size, finite: checked as the converters check it.
            let (s, block) =
                sling_pipeline::hf::fp8_scale(self.ck, t, self.fp8_block).map_err(|e| read_err(name, e))?;
            op = Op::Fp8 { weight: src, scale: Src::of(s), block };
        }
        if shape.len() < 2 {
            op.read(self.ck, 0, op.rows(), &mut out).map_err(|e| read_err(name, e))?;
            if shape.len() == 1 {
                out.truncate(i1 as usize);
                out.drain(..i0 as usize);
            }
        } else {
            op.read(self.ck, r0, r1, &mut out).map_err(|e| read_err(name, e))?;
        }
        Ok(out)
    }
}

/// An in-memory [`TensorSource`] (tests, and callers that already hold `f32` weights).
#[derive(Default)]
pub struct MemSource {
    tensors: std::collections::HashMap<String, (Vec<u64>, Vec<f32>)>,
}

impl MemSource {
    pub fn new() -> MemSource {
        MemSource::default()
    }
    pub fn insert(&mut self, name: &str, shape: &[u64], data: Vec<f32>) {
        debug_assert_eq!(shape.iter().product::<u64>() as usize, data.len());
        self.tensors.insert(name.to_string(), (shape.to_vec(), data));
    }
}

impl TensorSource for MemSource {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.tensors.get(name).map(|(s, _)| s.clone())
    }
    fn read_outer(&self, name: &str, i0: u64, i1: u64) -> Result<Vec<f32>> {
        let (shape, data) = self.tensors.get(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        let n0 = shape.first().copied().unwrap_or(1);
        if i1 > n0 || i0 > i1 {
            return Err(read_err(name, format!("slice {i0}..{i1} outside the outer dimension {n0}")));
        }
        let per = (data.len() as u64).checked_div(n0).unwrap_or(0);
        Ok(data[(i0 * per) as usize..(i1 * per) as usize].to_vec())
    }
}
