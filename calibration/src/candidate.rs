//! A GGUF file as a [`TensorSource`] in the reference checkpoint's (Hugging Face) names, for `sling eval`.
//!
//! The converter's plan for the reference checkpoint says how every GGUF tensor was derived from source
//! tensors (`convert::ops::Op`: row selections such as llama's Q/K permutation, expert stacking,
//! transposes, FP8 dequantization; `Mxfp4Repack` for gpt-oss experts). Those are all rearrangements of
//! elements, so they can be run backwards: to read a source tensor, the rows of the GGUF tensor(s) that
//! hold its elements are dequantized (per ggml type, `sling_quantizers::dequantize`) and scattered back to
//! the source layout. The forward pass then runs the candidate's weights exactly as it runs the
//! reference's, with the candidate's quantization error and nothing else.
//!
//! Memory: a per-expert source tensor reads only its own slice of the stacked GGUF tensor. A fused source
//! tensor (transformers-5 `gate_up_proj`, gpt-oss experts) is rebuilt whole once and cached until the
//! layer ends ([`TensorSource::release`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sling_formats::gguf::{GgufFile, GgufTensorInfo, GgufValue};
use sling_pipeline::ops::Op;
use sling_target_gguf::convert::plan::OutTensor;

use crate::error::{Error, Result};
use crate::source::{CheckpointSource, TensorSource};

/// Where the elements of one source tensor are in the GGUF file.
#[derive(Clone, Debug)]
struct Piece {
    /// Index into the plan's tensors.
    out: usize,
    /// Output rows `base..base + op.rows()` hold the subtree `op` (for MXFP4 experts: `None`, all rows).
    base: u64,
    op: Option<Op>,
}

/// A GGUF candidate read in the reference checkpoint's tensor names.
pub struct GgufCandidate<'a> {
    reference: CheckpointSource<'a>,
    files: Vec<GgufFile>,
    /// GGUF tensor name → (file, tensor info).
    tensors: HashMap<String, (usize, GgufTensorInfo)>,
    plan: Vec<OutTensor>,
    /// Source tensor name (as the forward pass asks for it) → pieces.
    pieces: HashMap<String, Vec<Piece>>,
    cache: Mutex<HashMap<String, Arc<Vec<f32>>>>,
}

fn read_err(tensor: &str, why: impl ToString) -> Error {
    Error::Read { tensor: tensor.to_string(), why: why.to_string() }
}

/// The shard paths of a split GGUF (`m-00001-of-00003.gguf` → all three), or just `path`.
fn shard_paths(path: &Path, first: &GgufFile) -> Vec<PathBuf> {
    let count = match first.get("split.count") {
        Some(GgufValue::U16(n)) => *n as usize,
        Some(GgufValue::U32(n)) => *n as usize,
        _ => 1,
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if count <= 1 || name.len() < 20 || !name.ends_with(".gguf") {
        return vec![path.to_path_buf()];
    }
    let stem = &name[..name.len() - ".gguf".len()];
    // `-00001-of-00003` is 15 characters.
    let base = &stem[..stem.len().saturating_sub(15)];
    (1..=count).map(|i| path.with_file_name(format!("{base}-{i:05}-of-{count:05}.gguf"))).collect()
}

impl<'a> GgufCandidate<'a> {
    /// Opens `path` (any shard of a split file) as the quantized form of `reference`, whose conversion plan is
    /// `plan` (`convert::plan::plan(ck, F32)`: names, shapes and ops do not depend on the output type).
    pub fn open(reference: CheckpointSource<'a>, plan: Vec<OutTensor>, path: &Path) -> Result<GgufCandidate<'a>> {
        let open = |p: &Path| GgufFile::open(p).map_err(|e| read_err(&p.display().to_string(), e));
        let first = open(path)?;
        let paths = shard_paths(path, &first);
        let mut files = vec![first];
        for p in &paths {
            if p.as_path() != path {
                files.push(open(p)?);
            }
        }
        let mut tensors = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for t in &f.tensors {
                tensors.insert(t.name.clone(), (fi, t.clone()));
            }
        }
        let mut pieces: HashMap<String, Vec<Piece>> = HashMap::new();
        for (i, t) in plan.iter().enumerate() {
            match &t.op {
                Op::Gguf(_) => {}
                Op::Mxfp4(rep) => {
                    if let Some(stem) = rep.blocks.strip_suffix("_blocks") {
                        pieces.entry(stem.to_string()).or_default().push(Piece { out: i, base: 0, op: None });
                    }
                }
                op => {
                    let mut names = Vec::new();
                    op.sources(&mut names);
                    names.sort();
                    names.dedup();
                    for n in names {
                        let (base, sub) = narrow(op, &n);
                        pieces.entry(n).or_default().push(Piece { out: i, base, op: Some(sub.clone()) });
                    }
                }
            }
        }
        Ok(GgufCandidate { reference, files, tensors, plan, pieces, cache: Mutex::new(HashMap::new()) })
    }

    /// Rows `r0..r1` of GGUF tensor `name`, dequantized.
    fn gguf_rows(&self, t: &OutTensor, r0: u64, r1: u64) -> Result<Vec<f32>> {
        let (fi, info) = self.tensors.get(&t.name).ok_or_else(|| {
            read_err(&t.name, "not in the candidate GGUF (was it converted from this reference checkpoint?)")
        })?;
        let ne = |v: &[u64]| -> Vec<u64> {
            let mut v = v.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if ne(&info.ne) != ne(&t.ne) {
            return Err(read_err(
                &t.name,
                format!("shape {:?} in the candidate, {:?} from the reference checkpoint", info.ne, t.ne),
            ));
        }
        let ne0 = info.ne.first().copied().unwrap_or(1);
        let row_bytes = info
            .dtype
            .bytes_for(ne0)
            .ok_or_else(|| read_err(&t.name, format!("{} rows of {ne0} elements are not whole blocks", info.dtype)))?;
        let data = self.files[*fi].tensor_data(info);
        let bytes = data
            .get((r0 * row_bytes) as usize..(r1 * row_bytes) as usize)
            .ok_or_else(|| read_err(&t.name, "rows outside the tensor data"))?;
        let mut out = Vec::with_capacity(((r1 - r0) * ne0) as usize);
        sling_quantizers::dequantize(info.dtype, bytes, &mut out).map_err(|e| read_err(&t.name, e))?;
        Ok(out)
    }

    /// The whole source tensor `name`, rebuilt from the candidate.
    fn materialize(&self, name: &str) -> Result<Vec<f32>> {
        let shape = self.reference.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        let numel: u64 = shape.iter().product();
        let pieces = self.pieces.get(name).ok_or_else(|| {
            read_err(name, "the conversion plan writes no GGUF tensor from it, so the candidate cannot supply it")
        })?;
        let mut dst = vec![f32::NAN; numel as usize];
        for p in pieces {
            let t = &self.plan[p.out];
            match &p.op {
                Some(op) => {
                    let vals = self.gguf_rows(t, p.base, p.base + op.rows())?;
                    scatter(op, &vals, op.cols(), name, &mut dst);
                }
                None => {
                    let Op::Mxfp4(rep) = &t.op else { continue };
                    let vals = self.gguf_rows(t, 0, rep.map.len() as u64)?;
                    let cols = (vals.len() / rep.map.len().max(1)) as u64;
                    for (i, &src) in rep.map.iter().enumerate() {
                        let (s, d) = ((i as u64 * cols) as usize, (src * cols) as usize);
                        if let (Some(v), Some(o)) = (vals.get(s..s + cols as usize), dst.get_mut(d..d + cols as usize))
                        {
                            o.copy_from_slice(v);
                        }
                    }
                }
            }
        }
        if let Some(i) = dst.iter().position(|v| v.is_nan()) {
            return Err(read_err(name, format!("element {i} is not held by any tensor of the candidate")));
        }
        Ok(dst)
    }
}

/// The smallest subtree of `op` holding every element of source `name`, and the output row it starts at:
/// descends through concatenations (expert stacking) while a single part holds the name.
pub(crate) fn narrow<'o>(op: &'o Op, name: &str) -> (u64, &'o Op) {
    let mut base = 0;
    let mut cur = op;
    while let Op::Concat(parts) = cur {
        let mut hit = None;
        let mut off = 0;
        for p in parts {
            if has_source(p, name) {
                if hit.is_some() {
                    return (base, cur);
                }
                hit = Some((off, p));
            }
            off += p.rows();
        }
        match hit {
            Some((o, p)) => {
                base += o;
                cur = p;
            }
            None => break,
        }
    }
    (base, cur)
}

fn has_source(op: &Op, name: &str) -> bool {
    let mut v = Vec::new();
    op.sources(&mut v);
    v.iter().any(|s| s == name)
}

/// Writes the elements of source `want` held in `vals` (the output of `op`, `cols` per row) to `dst` (the
/// whole source tensor, row-major); elements `vals` does not hold are NaN and left alone.
pub(crate) fn scatter(op: &Op, vals: &[f32], cols: u64, want: &str, dst: &mut [f32]) {
    match op {
        Op::Source(s) | Op::Fp8 { weight: s, .. } => {
            if s.name == want {
                for (d, &v) in dst.iter_mut().zip(vals) {
                    if !v.is_nan() {
                        *d = v;
                    }
                }
            }
        }
        // The folded tensor's values (AWQ), in the source's frame.
        Op::Fold { inner, .. } => scatter(inner, vals, cols, want, dst),
        Op::Rows { inner, map } => {
            if !has_source(inner, want) {
                return;
            }
            let c = cols as usize;
            let mut iv = vec![f32::NAN; (inner.rows() * cols) as usize];
            for (i, &m) in map.iter().enumerate() {
                let m = m as usize;
                if let (Some(o), Some(v)) = (iv.get_mut(m * c..(m + 1) * c), vals.get(i * c..(i + 1) * c)) {
                    o.copy_from_slice(v);
                }
            }
            scatter(inner, &iv, cols, want, dst);
        }
        Op::Concat(parts) => {
            let mut r = 0usize;
            for p in parts {
                let n = p.rows() as usize;
                if has_source(p, want) {
                    if let Some(v) = vals.get(r * cols as usize..(r + n) * cols as usize) {
                        scatter(p, v, cols, want, dst);
                    }
                }
                r += n;
            }
        }
        Op::Transpose { inner, batch, r, c } => {
            if !has_source(inner, want) {
                return;
            }
            // op: batch × [c, r] (cols = r); inner: batch × [r, c]
            let (r, c) = (*r as usize, *c as usize);
            let mut iv = vec![f32::NAN; *batch as usize * r * c];
            for b in 0..*batch as usize {
                for oc in 0..c {
                    for or in 0..r {
                        if let Some(&v) = vals.get(b * r * c + oc * r + or) {
                            iv[b * r * c + or * c + oc] = v;
                        }
                    }
                }
            }
            scatter(inner, &iv, c as u64, want, dst);
        }
        // Codes of another format: the candidate maps those tensors itself (`GgufCandidate::open`).
        Op::Mxfp4(_) | Op::Gguf(_) => {}
    }
}

impl TensorSource for GgufCandidate<'_> {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.reference.shape(name)
    }

    fn is_mxfp4(&self, name: &str) -> bool {
        self.reference.is_mxfp4(name)
    }

    /// The `vec_dot_type` of the GGUF tensor(s) holding `name`; `None` when they are of different types or the
    /// tensor is not in the file.
    fn cpu_vec_dot(&self, name: &str) -> Option<sling_core::VecDot> {
        let mut types =
            self.pieces.get(name)?.iter().map(|p| self.tensors.get(&self.plan[p.out].name).map(|t| t.1.dtype));
        let first = types.next()??;
        if types.all(|t| t == Some(first)) {
            first.info().cpu_vec_dot
        } else {
            None
        }
    }

    fn gguf_vec_dot(&self, gguf_name: &str) -> Option<sling_core::VecDot> {
        self.tensors.get(gguf_name).and_then(|t| t.1.dtype.info().cpu_vec_dot)
    }

    fn release(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
        self.reference.release();
        self.files.iter().for_each(GgufFile::release_pages);
    }

    fn read_outer(&self, name: &str, i0: u64, i1: u64) -> Result<Vec<f32>> {
        let shape = self.shape(name).ok_or_else(|| Error::Missing(name.to_string()))?;
        let n0 = shape.first().copied().unwrap_or(1);
        if i1 > n0 || i0 > i1 {
            return Err(read_err(name, format!("slice {i0}..{i1} outside the outer dimension {n0}")));
        }
        let per = if shape.is_empty() { 1 } else { shape[1..].iter().product::<u64>() } as usize;
        let cached = self.cache.lock().ok().and_then(|c| c.get(name).cloned());
        let (a, b) = (i0 as usize * per, i1 as usize * per);
        let whole = match cached {
            Some(w) => w,
            // A whole tensor is read once: hand over the rebuilt buffer without copying it.
            None if i1 - i0 == n0 => return self.materialize(name),
            None => {
                // Only fused tensors are read by slices, once per expert: cache those for the layer.
                let w = Arc::new(self.materialize(name)?);
                if let Ok(mut c) = self.cache.lock() {
                    c.insert(name.to_string(), w.clone());
                }
                w
            }
        };
        Ok(whole.get(a..b).map(<[f32]>::to_vec).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sling_core::DType;
    use sling_pipeline::ops::Src;

    fn src(name: &str, rows: u64, cols: u64) -> Op {
        Op::Source(Src { name: name.into(), dtype: DType::F32, rows, cols })
    }

    /// Every op run backwards gives the source back: forward by hand, then scatter.
    #[test]
    fn scatter_inverts_rows_concat_transpose() {
        // a: [2, 3], b: [2, 3]; op = transpose(concat(rows(a, [1, 0]), b)) as 2 batches of [2, 3] → [3, 2]
        let a: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let b: Vec<f32> = (10..16).map(|v| v as f32).collect();
        let op = Op::Transpose {
            inner: Box::new(Op::Concat(vec![
                Op::Rows { inner: Box::new(src("a", 2, 3)), map: vec![1, 0] },
                src("b", 2, 3),
            ])),
            batch: 2,
            r: 2,
            c: 3,
        };
        // forward: concat rows = [a1, a0, b0, b1]; batch 0 = [[3,4,5],[0,1,2]] → T = [[3,0],[4,1],[5,2]]
        let out = vec![3., 0., 4., 1., 5., 2., 10., 13., 11., 14., 12., 15.];
        let mut da = vec![f32::NAN; 6];
        scatter(&op, &out, 2, "a", &mut da);
        assert_eq!(da, a);
        let mut db = vec![f32::NAN; 6];
        scatter(&op, &out, 2, "b", &mut db);
        assert_eq!(db, b);
        // narrow descends into the concatenation
        let stack = Op::Concat(vec![src("e0", 4, 2), src("e1", 4, 2)]);
        let (base, sub) = narrow(&stack, "e1");
        assert_eq!(base, 4);
        assert!(matches!(sub, Op::Source(s) if s.name == "e1"));
    }
}
