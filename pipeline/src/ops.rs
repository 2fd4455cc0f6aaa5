//! How the values of one output tensor are derived from source tensors, evaluated lazily and by
//! row ranges so that no tensor is ever loaded whole unless its layout demands it (a transpose).
//!
//! An output tensor is seen as a matrix `[rows, cols]` where `cols` is GGUF `ne[0]` (numpy's last
//! dimension) and `rows` the product of the other dimensions; ggml rows are independent, so any
//! row range can be produced and encoded on its own.

use std::sync::Arc;

use sling_core::DType;
use sling_quantizers::awq::Fold;
use sling_quantizers::decode_to_f32;

use sling_formats::checkpoint::{Checkpoint, SourceTensor};

/// A source tensor viewed as a row-major matrix `[rows, cols]` (cols = its last dimension).
#[derive(Clone, Debug)]
pub struct Src {
    pub name: String,
    pub dtype: DType,
    pub rows: u64,
    pub cols: u64,
}

impl Src {
    pub fn of(t: &SourceTensor) -> Src {
        let cols = t.shape.last().copied().unwrap_or(1);
        let rows = if cols == 0 { 0 } else { t.numel() / cols };
        Src { name: t.name.clone(), dtype: t.dtype, rows, cols }
    }
}

/// Error while evaluating an op (the tensor vanished from the checkpoint, or cannot be decoded).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("source tensor {0} not found")]
    Missing(String),
    #[error("source tensor {tensor}: {source}")]
    Decode { tensor: String, source: sling_quantizers::DecodeError },
    #[error("source tensor {tensor}: AWQ fold: {why}")]
    Fold { tensor: String, why: String },
    #[error("source tensor {tensor}: {source}")]
    Dequantize { tensor: String, source: sling_quantizers::EncodeError },
}

#[derive(Clone, Debug)]
pub enum Op {
    /// Rows of a source tensor, decoded to f32.
    Source(Src),
    /// DeepSeek FP8: `weight.float() * scale_inv` with the scale repeated over `block` (rows, cols)
    /// and cropped (`dequant_simple` in the reference `conversion/base.py`).
    Fp8 { weight: Src, scale: Src, block: (u64, u64) },
    /// Output row `i` is row `map[i]` of `inner`.
    Rows { inner: Box<Op>, map: Vec<u64> },
    /// Rows of each part, one after the other (expert stacking).
    Concat(Vec<Op>),
    /// `inner` holds `batch` matrices `[r, c]`; each is transposed to `[c, r]`.
    Transpose { inner: Box<Op>, batch: u64, r: u64, c: u64 },
    /// `inner`'s rows with AWQ's per-channel scales folded in ([`Fold::apply`]; in `inner`'s own row and column
    /// indices, so it wraps a source tensor, whose frame the scales were computed in).
    Fold { inner: Box<Op>, fold: Arc<Fold> },
    /// gpt-oss's MXFP4 experts as ggml `block_mxfp4` rows ([`Mxfp4Repack`]); values: those blocks dequantized.
    Mxfp4(Mxfp4Repack),
    /// Rows of a tensor of a GGUF source file ([`GgufSource`], `sling quantize model.gguf`); values: ggml's
    /// `to_float` of its type.
    Gguf(GgufSource),
}

impl Op {
    pub fn rows(&self) -> u64 {
        match self {
            Op::Source(s) => s.rows,
            Op::Fp8 { weight, .. } => weight.rows,
            Op::Rows { map, .. } => map.len() as u64,
            Op::Concat(parts) => parts.iter().map(Op::rows).sum(),
            Op::Transpose { batch, c, .. } => batch * c,
            Op::Fold { inner, .. } => inner.rows(),
            Op::Mxfp4(m) => m.map.len() as u64,
            Op::Gguf(g) => g.rows(),
        }
    }

    pub fn cols(&self) -> u64 {
        match self {
            Op::Source(s) => s.cols,
            Op::Fp8 { weight, .. } => weight.cols,
            Op::Rows { inner, .. } => inner.cols(),
            Op::Concat(parts) => parts.first().map(Op::cols).unwrap_or(0),
            Op::Transpose { r, .. } => *r,
            Op::Fold { inner, .. } => inner.cols(),
            Op::Mxfp4(m) => m.nb * 32,
            Op::Gguf(g) => g.cols,
        }
    }

    /// The largest number of elements one call must hold to produce a single row.
    pub fn granule(&self) -> u64 {
        match self {
            Op::Source(s) => s.cols,
            Op::Fp8 { weight, .. } => weight.cols,
            Op::Rows { inner, .. } => inner.granule(),
            Op::Concat(parts) => parts.iter().map(Op::granule).max().unwrap_or(0),
            Op::Transpose { r, c, .. } => r * c,
            Op::Fold { inner, .. } => inner.granule(),
            Op::Mxfp4(m) => m.nb * 32,
            Op::Gguf(g) => g.cols,
        }
    }

    /// Source tensors this op reads.
    pub fn sources(&self, out: &mut Vec<String>) {
        match self {
            Op::Source(s) => out.push(s.name.clone()),
            Op::Fp8 { weight, scale, .. } => {
                out.push(weight.name.clone());
                out.push(scale.name.clone());
            }
            Op::Rows { inner, .. } | Op::Transpose { inner, .. } | Op::Fold { inner, .. } => inner.sources(out),
            Op::Concat(parts) => parts.iter().for_each(|p| p.sources(out)),
            Op::Mxfp4(m) => {
                out.push(m.blocks.clone());
                out.push(m.scales.clone());
            }
            Op::Gguf(g) => out.push(g.name().to_string()),
        }
    }

    fn first_source(&self) -> Option<String> {
        let mut v = Vec::new();
        self.sources(&mut v);
        v.into_iter().next()
    }

    /// Wraps every leaf (a source tensor, or an FP8 weight with its scales) that `fold` names in [`Op::Fold`], so that
    /// the op produces the folded values; the names folded are added to `hit`.
    pub fn fold_sources(
        self,
        fold: &dyn Fn(&str) -> Option<Arc<Fold>>,
        hit: &mut std::collections::BTreeSet<String>,
    ) -> Op {
        let leaf = |op: Op, name: &str, hit: &mut std::collections::BTreeSet<String>| match fold(name) {
            Some(f) => {
                hit.insert(name.to_string());
                Op::Fold { inner: Box::new(op), fold: f }
            }
            None => op,
        };
        match self {
            Op::Source(s) => {
                let name = s.name.clone();
                leaf(Op::Source(s), &name, hit)
            }
            Op::Fp8 { weight, scale, block } => {
                let name = weight.name.clone();
                leaf(Op::Fp8 { weight, scale, block }, &name, hit)
            }
            Op::Rows { inner, map } => Op::Rows { inner: Box::new(inner.fold_sources(fold, hit)), map },
            Op::Concat(parts) => Op::Concat(parts.into_iter().map(|p| p.fold_sources(fold, hit)).collect()),
            Op::Transpose { inner, batch, r, c } => {
                Op::Transpose { inner: Box::new(inner.fold_sources(fold, hit)), batch, r, c }
            }
            f @ (Op::Fold { .. } | Op::Mxfp4(_) | Op::Gguf(_)) => f,
        }
    }

    /// Appends rows `r0..r1` (as f32, row-major) to `out`.
    pub fn read(&self, ck: &Checkpoint, r0: u64, r1: u64, out: &mut Vec<f32>) -> Result<(), OpError> {
        self.gather(ck, r0, r1, out)
    }

    /// The source dtype if this op only moves elements (no arithmetic) and every leaf has that
    /// dtype: then its rows can be produced by copying bytes.
    pub fn raw_dtype(&self) -> Option<DType> {
        match self {
            Op::Source(s) => Some(s.dtype),
            Op::Fp8 { .. } | Op::Fold { .. } | Op::Mxfp4(_) | Op::Gguf(_) => None,
            Op::Rows { inner, .. } | Op::Transpose { inner, .. } => inner.raw_dtype(),
            Op::Concat(parts) => {
                let d = parts.first()?.raw_dtype()?;
                parts.iter().all(|p| p.raw_dtype() == Some(d)).then_some(d)
            }
        }
    }

    /// Appends rows `r0..r1` as slices of the mapped source files, in order, when this op only
    /// selects and concatenates rows (no arithmetic, no transposition) and every leaf has the
    /// same dtype: the bytes can then be written without copying them first. Returns false, with
    /// `out` as it was, for ops that need their elements moved (transpose) or computed (FP8).
    pub fn raw_slices<'a>(
        &self,
        ck: &'a Checkpoint,
        r0: u64,
        r1: u64,
        out: &mut Vec<&'a [u8]>,
    ) -> Result<bool, OpError> {
        if !self.slices_only() || self.raw_dtype().is_none() {
            return Ok(false);
        }
        self.push_slices(ck, r0, r1, out)?;
        Ok(true)
    }

    fn slices_only(&self) -> bool {
        match self {
            Op::Source(_) => true,
            Op::Fp8 { .. } | Op::Transpose { .. } | Op::Fold { .. } | Op::Mxfp4(_) | Op::Gguf(_) => false,
            Op::Rows { inner, .. } => inner.slices_only(),
            Op::Concat(parts) => parts.iter().all(Op::slices_only),
        }
    }

    fn push_slices<'a>(&self, ck: &'a Checkpoint, r0: u64, r1: u64, out: &mut Vec<&'a [u8]>) -> Result<(), OpError> {
        if r1 <= r0 {
            return Ok(());
        }
        match self {
            Op::Source(s) => out.push(source_bytes(ck, s, r0, r1)?),
            Op::Rows { inner, map } => row_runs(map, r0, r1, |a, b| inner.push_slices(ck, a, b, out))?,
            Op::Concat(parts) => concat_parts(parts, r0, r1, |p, a, b| p.push_slices(ck, a, b, out))?,
            // Excluded by `slices_only`.
            Op::Fp8 { .. } | Op::Transpose { .. } | Op::Fold { .. } | Op::Mxfp4(_) | Op::Gguf(_) => {}
        }
        Ok(())
    }

    /// Appends rows `r0..r1` as raw elements (`u16` for 2-byte, `u32` for 4-byte dtypes); only for
    /// ops where [`raw_dtype`](Self::raw_dtype) is `Some`.
    pub fn read_raw<E: Elem>(&self, ck: &Checkpoint, r0: u64, r1: u64, out: &mut Vec<E>) -> Result<(), OpError> {
        self.gather(ck, r0, r1, out)
    }

    /// Row selection, concatenation and transposition are the same for any element type.
    fn gather<E: Elem>(&self, ck: &Checkpoint, r0: u64, r1: u64, out: &mut Vec<E>) -> Result<(), OpError> {
        if r1 <= r0 {
            return Ok(());
        }
        match self {
            Op::Source(s) => E::source(ck, s, r0, r1, out),
            Op::Fp8 { weight, scale, block } => E::fp8(ck, weight, scale, *block, r0, r1, out),
            Op::Fold { inner, fold } => E::fold(ck, inner, fold, r0, r1, out),
            Op::Mxfp4(_) | Op::Gguf(_) => E::coded(ck, self, r0, r1, out),
            Op::Rows { inner, map } => row_runs(map, r0, r1, |a, b| inner.gather(ck, a, b, out)),
            Op::Concat(parts) => concat_parts(parts, r0, r1, |p, a, b| p.gather(ck, a, b, out)),
            Op::Transpose { inner, r, c, .. } => {
                let (r, c) = (*r, *c);
                let mut m: Vec<E> = Vec::new();
                let mut row = r0;
                while row < r1 {
                    let b = row / c;
                    let end = r1.min((b + 1) * c);
                    m.clear();
                    inner.gather(ck, b * r, (b + 1) * r, &mut m)?;
                    for oc in (row - b * c)..(end - b * c) {
                        out.extend((0..r).map(|or| m[(or * c + oc) as usize]));
                    }
                    row = end;
                }
                Ok(())
            }
        }
    }
}

/// Output rows `r0..r1` of [`Op::Rows`] as runs of consecutive source rows, so that each run is read in
/// one call: `f(first, end)` for each run, in order.
fn row_runs(map: &[u64], r0: u64, r1: u64, mut f: impl FnMut(u64, u64) -> Result<(), OpError>) -> Result<(), OpError> {
    let mut i = r0 as usize;
    while i < r1 as usize {
        let s = map[i];
        let mut j = i + 1;
        while j < r1 as usize && map[j] == map[j - 1] + 1 {
            j += 1;
        }
        f(s, s + (j - i) as u64)?;
        i = j;
    }
    Ok(())
}

/// Output rows `r0..r1` of [`Op::Concat`] split over its parts: `f(part, a, b)` for rows `a..b` of each
/// part that holds some of them, in order.
fn concat_parts(
    parts: &[Op],
    r0: u64,
    r1: u64,
    mut f: impl FnMut(&Op, u64, u64) -> Result<(), OpError>,
) -> Result<(), OpError> {
    let mut base = 0;
    for p in parts {
        let n = p.rows();
        let (a, b) = (r0.max(base), r1.min(base + n));
        if a < b {
            f(p, a - base, b - base)?;
        }
        base += n;
    }
    Ok(())
}

fn source_bytes<'a>(ck: &'a Checkpoint, s: &Src, r0: u64, r1: u64) -> Result<&'a [u8], OpError> {
    let t = ck.get(&s.name).ok_or_else(|| OpError::Missing(s.name.clone()))?;
    let es = s.dtype.block_bytes() as u64;
    Ok(&ck.bytes(t)[(r0 * s.cols * es) as usize..(r1 * s.cols * es) as usize])
}

/// An element the op tree can move: `f32` values (decoded, with arithmetic) or raw bits.
pub trait Elem: Copy + Default + Send {
    fn source(ck: &Checkpoint, s: &Src, r0: u64, r1: u64, out: &mut Vec<Self>) -> Result<(), OpError>;
    fn fp8(
        ck: &Checkpoint,
        w: &Src,
        scale: &Src,
        block: (u64, u64),
        r0: u64,
        r1: u64,
        out: &mut Vec<Self>,
    ) -> Result<(), OpError>;
    fn fold(ck: &Checkpoint, inner: &Op, fold: &Fold, r0: u64, r1: u64, out: &mut Vec<Self>) -> Result<(), OpError>;
    /// Rows of a leaf that holds codes of a block format ([`Op::Mxfp4`], [`Op::Gguf`]).
    fn coded(ck: &Checkpoint, leaf: &Op, r0: u64, r1: u64, out: &mut Vec<Self>) -> Result<(), OpError>;
}

impl Elem for f32 {
    fn source(ck: &Checkpoint, s: &Src, r0: u64, r1: u64, out: &mut Vec<f32>) -> Result<(), OpError> {
        decode_to_f32(s.dtype, source_bytes(ck, s, r0, r1)?, out)
            .map_err(|source| OpError::Decode { tensor: s.name.clone(), source })
    }

    /// `weight.float() * scale` with the scale repeated over the block and cropped: one f32
    /// multiply per element, as `dequant_simple` does.
    fn fp8(
        ck: &Checkpoint,
        weight: &Src,
        scale: &Src,
        block: (u64, u64),
        r0: u64,
        r1: u64,
        out: &mut Vec<f32>,
    ) -> Result<(), OpError> {
        let start = out.len();
        Self::source(ck, weight, r0, r1, out)?;
        let mut sc = Vec::new();
        Self::source(ck, scale, 0, scale.rows, &mut sc)?;
        let cols = weight.cols as usize;
        for (i, row) in out[start..].chunks_exact_mut(cols.max(1)).enumerate() {
            let sr = (r0 + i as u64) / block.0;
            let srow = &sc[(sr * scale.cols) as usize..((sr + 1) * scale.cols) as usize];
            for (j, v) in row.iter_mut().enumerate() {
                *v *= srow[j / block.1 as usize];
            }
        }
        Ok(())
    }

    fn fold(ck: &Checkpoint, inner: &Op, fold: &Fold, r0: u64, r1: u64, out: &mut Vec<f32>) -> Result<(), OpError> {
        let start = out.len();
        inner.gather(ck, r0, r1, out)?;
        fold.apply(&mut out[start..], r0 as usize, inner.cols() as usize)
            .map_err(|e| OpError::Fold { tensor: inner.first_source().unwrap_or_default(), why: e.to_string() })
    }

    /// ggml's `to_float` of the leaf's blocks (exact widening for plain float GGUF tensors).
    fn coded(ck: &Checkpoint, leaf: &Op, r0: u64, r1: u64, out: &mut Vec<f32>) -> Result<(), OpError> {
        let mut raw = Vec::new();
        let (dtype, bytes, tensor) = match leaf {
            Op::Mxfp4(m) => {
                m.read(ck, r0, r1, &mut raw)?;
                (DType::MXFP4, raw.as_slice(), m.blocks.as_str())
            }
            Op::Gguf(g) => (g.dtype, g.rows_or_err(r0, r1)?, g.name()),
            _ => return Ok(()),
        };
        sling_quantizers::dequantize(dtype, bytes, out)
            .map_err(|source| OpError::Dequantize { tensor: tensor.to_string(), source })
    }
}

macro_rules! raw_elem {
    ($t:ty, $n:literal) => {
        impl Elem for $t {
            fn source(ck: &Checkpoint, s: &Src, r0: u64, r1: u64, out: &mut Vec<$t>) -> Result<(), OpError> {
                if s.dtype.block_bytes() != $n || s.dtype.is_quantized() {
                    let source = sling_quantizers::DecodeError::Unsupported(s.dtype);
                    return Err(OpError::Decode { tensor: s.name.clone(), source });
                }
                let b = source_bytes(ck, s, r0, r1)?;
                out.extend(b.chunks_exact($n).map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a)
                }));
                Ok(())
            }
            fn fp8(
                _: &Checkpoint,
                w: &Src,
                _: &Src,
                _: (u64, u64),
                _: u64,
                _: u64,
                _: &mut Vec<$t>,
            ) -> Result<(), OpError> {
                let source = sling_quantizers::DecodeError::Unsupported(DType::F8E4M3);
                Err(OpError::Decode { tensor: w.name.clone(), source })
            }
            fn fold(_: &Checkpoint, inner: &Op, _: &Fold, _: u64, _: u64, _: &mut Vec<$t>) -> Result<(), OpError> {
                let tensor = inner.first_source().unwrap_or_default();
                Err(OpError::Fold { tensor, why: "folded values are computed, not copied".into() })
            }
            fn coded(_: &Checkpoint, leaf: &Op, _: u64, _: u64, _: &mut Vec<$t>) -> Result<(), OpError> {
                let (tensor, dtype) = match leaf {
                    Op::Gguf(g) => (g.name().to_string(), g.dtype),
                    _ => (leaf.first_source().unwrap_or_default(), DType::MXFP4),
                };
                Err(OpError::Decode { tensor, source: sling_quantizers::DecodeError::Unsupported(dtype) })
            }
        }
    };
}
raw_elem!(u16, 2);
raw_elem!(u32, 4);

/// Raw MXFP4 repack of gpt-oss experts (`GptOssModel.repack_mxfp4` in the reference): each output
/// row is source row `map[i]` of `blocks` `[E*R, nb, 16]` / `scales` `[E*R, nb]`, written as ggml
/// `block_mxfp4` (E8M0 byte, then 16 bytes with element j in the low and j+16 in the high nibble).
#[derive(Clone, Debug)]
pub struct Mxfp4Repack {
    pub blocks: String,
    pub scales: String,
    pub nb: u64,
    pub map: Vec<u64>,
}

impl Mxfp4Repack {
    pub fn read(&self, ck: &Checkpoint, r0: u64, r1: u64, out: &mut Vec<u8>) -> Result<(), OpError> {
        let bt = ck.get(&self.blocks).ok_or_else(|| OpError::Missing(self.blocks.clone()))?;
        let st = ck.get(&self.scales).ok_or_else(|| OpError::Missing(self.scales.clone()))?;
        let (bb, sb) = (ck.bytes(bt), ck.bytes(st));
        let nb = self.nb as usize;
        for &src in &self.map[r0 as usize..r1 as usize] {
            let src = src as usize;
            for k in 0..nb {
                out.push(sb[src * nb + k]);
                let blk = &bb[(src * nb + k) * 16..(src * nb + k + 1) * 16];
                // HF packs elements (2i, 2i+1) as (low, high) nibble of byte i.
                let el = |e: usize| -> u8 {
                    if e % 2 == 0 {
                        blk[e / 2] & 0x0f
                    } else {
                        blk[e / 2] >> 4
                    }
                };
                out.extend((0..16).map(|j| el(j) | (el(j + 16) << 4)));
            }
        }
        Ok(())
    }
}

/// One tensor of an open GGUF file, read by rows (`sling quantize model.gguf`: what llama-quantize reads).
#[derive(Clone, Debug)]
pub struct GgufSource {
    pub file: Arc<sling_formats::gguf::GgufFile>,
    pub index: usize,
    pub dtype: DType,
    /// Elements per row (`ne[0]`).
    pub cols: u64,
    /// Bytes per row.
    pub row_bytes: u64,
}

impl GgufSource {
    /// The tensor's name in the file.
    pub fn name(&self) -> &str {
        self.file.tensors.get(self.index).map(|t| t.name.as_str()).unwrap_or("")
    }

    /// Rows (`numel / ne[0]`).
    pub fn rows(&self) -> u64 {
        let numel: u64 = self.file.tensors.get(self.index).map(|t| t.ne.iter().product()).unwrap_or(0);
        numel / self.cols.max(1)
    }

    /// The bytes of rows `r0..r1`, if they lie inside the tensor.
    pub fn rows_bytes(&self, r0: u64, r1: u64) -> Option<&[u8]> {
        let t = self.file.tensors.get(self.index)?;
        let data = self.file.tensor_data(t);
        data.get((r0 * self.row_bytes) as usize..(r1 * self.row_bytes) as usize)
    }

    /// [`GgufSource::rows_bytes`], or an error naming the tensor and the file.
    pub fn rows_or_err(&self, r0: u64, r1: u64) -> Result<&[u8], OpError> {
        self.rows_bytes(r0, r1)
            .ok_or_else(|| OpError::Missing(format!("{} rows {r0}..{r1} in {}", self.name(), self.file.path.display())))
    }
}
