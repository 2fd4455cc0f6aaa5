//! The execution engine every target runs on: a plan's weights are cut into row chunks of bounded size,
//! computed and encoded by the [`Target`] in parallel (rayon) a window of chunks at a time, and handed in plan
//! order to a [`Container`] — the artifact's writer (a GGUF file set, a safetensors shard set) — on a writer
//! thread, which writes window `k` while window `k + 1` is computed.
//!
//! Chunk boundaries do not depend on the thread count and every chunk is encoded on its own, so the bytes are
//! the same for any `-t`. At most two windows of output are held (one being written, one queued), and the
//! source pages a window read are released from the mappings after it ([`Checkpoint::release_pages`]), so
//! peak memory is bounded by the window, not by the model.

use std::collections::HashMap;

use rayon::prelude::*;
use sling_formats::checkpoint::Checkpoint;

use crate::exec::ExecError;
use crate::{Target, Weight};

/// f32 elements per chunk (16 MiB of values): small enough that a window of chunks stays far below 1 GiB,
/// large enough to amortise the per-chunk overhead.
pub const CHUNK_ELEMS: u64 = 4 << 20;

/// One unit of work: rows `r0..r1` of weight `w` (its index in the plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub w: usize,
    pub r0: u64,
    pub r1: u64,
}

/// The row ranges a weight of `rows` × `cols` is cut into: at most [`CHUNK_ELEMS`] values (at least one row),
/// starting at multiples of `align`, never crossing a multiple of `segment` (e.g. an expert's rows, which
/// have their own importance weights). A weight without rows has one empty chunk, so that it is reported
/// complete like any other.
pub fn row_chunks(rows: u64, cols: u64, align: u64, segment: Option<u64>) -> Vec<(u64, u64)> {
    let align = align.max(1);
    let step = ((CHUNK_ELEMS / cols.max(1)).max(1) / align).max(1) * align;
    if rows == 0 {
        return vec![(0, 0)];
    }
    let mut out = Vec::new();
    let mut r = 0;
    while r < rows {
        let mut e = (r + step).min(rows);
        if let Some(s) = segment.filter(|s| *s > 0) {
            e = e.min((r / s + 1) * s);
        }
        out.push((r, e));
        r = e;
    }
    out
}

/// The chunks of weight `i` of a plan, as [`run`] computes them.
pub fn weight_chunks<T: Target>(target: &T, w: &Weight<T::Enc>, i: usize) -> Vec<Chunk> {
    row_chunks(w.rows(), w.cols(), w.row_align, target.segment_rows(w))
        .into_iter()
        .map(|(r0, r1)| Chunk { w: i, r0, r1 })
        .collect()
}

/// A chunk's output bytes.
#[derive(Debug)]
pub enum Computed<'a> {
    /// Each part's bytes for the chunk's rows (`parts[i]` for the weight's `parts[i]`).
    Parts(Vec<Vec<u8>>),
    /// A one-part weight's bytes as slices of the mapped source files, written as they are (a same-type copy
    /// that only selects rows).
    Mapped(Vec<&'a [u8]>),
}

impl Computed<'_> {
    /// `(part index, bytes)` in order; a part may come in several slices.
    pub fn slices(&self) -> Vec<(usize, &[u8])> {
        match self {
            Computed::Parts(p) => p.iter().enumerate().map(|(i, b)| (i, b.as_slice())).collect(),
            Computed::Mapped(s) => s.iter().map(|b| (0, *b)).collect(),
        }
    }
}

/// Rows `r0..r1` of `w`'s values, checked for NaN/Inf: an error, or with `allow_nonfinite` a note naming the
/// first one.
pub fn values<E>(
    ck: &Checkpoint,
    w: &Weight<E>,
    r0: u64,
    r1: u64,
    allow_nonfinite: bool,
) -> Result<(Vec<f32>, Option<String>), ExecError> {
    let mut v = Vec::with_capacity(((r1 - r0) * w.cols()) as usize);
    w.op.read(ck, r0, r1, &mut v).map_err(|source| ExecError::Op { tensor: w.name.clone(), source })?;
    let mut flagged = None;
    if let Some((i, x)) = sling_quantizers::common::first_nonfinite(&v) {
        let index = r0 * w.cols() + i as u64;
        if !allow_nonfinite {
            return Err(ExecError::NonFinite {
                tensor: w.name.clone(),
                sources: w.sources.join(", "),
                index,
                value: x,
            });
        }
        flagged = Some(format!("{}: non-finite value {x} at element {index}", w.name));
    }
    Ok((v, flagged))
}

/// The artifact's writer: receives every chunk's bytes, in plan order (a weight's chunks in row order), on
/// the writer thread.
pub trait Container: Send {
    type Error: Send;
    /// Writes chunk `c`'s bytes; `last`: it completes its weight.
    fn put(&mut self, c: &Chunk, last: bool, data: Computed<'_>) -> Result<(), Self::Error>;
}

/// How [`run`] computes.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Chunks computed at once (`None`: 2 × the rayon threads).
    pub window: Option<usize>,
    /// Continue past NaN/Inf (each is reported).
    pub allow_nonfinite: bool,
}

/// Computes weights `from..` of `weights` for `target` and hands their bytes to `container`. `amax` holds the
/// absolute maximum of each weight whose encoding needs one ([`Target::needs_amax`]). Returns the container
/// and the non-finite values let through.
pub fn run<'env, T, C>(
    target: &T,
    ck: &'env Checkpoint,
    weights: &[Weight<T::Enc>],
    from: usize,
    opts: RunOptions,
    amax: &HashMap<usize, f32>,
    container: C,
) -> Result<(C, Vec<String>), T::Error>
where
    T: Target,
    C: Container<Error = T::Error>,
{
    let jobs: Vec<Chunk> =
        weights.iter().enumerate().skip(from).flat_map(|(i, w)| weight_chunks(target, w, i)).collect();
    let window = opts.window.unwrap_or_else(|| 2 * rayon::current_num_threads()).max(1);
    let mut nonfinite = Vec::new();
    std::thread::scope(|scope| {
        // Compute window k+1 while the writer writes window k; the bounded channel keeps at most two windows
        // of output in memory.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(Chunk, Computed<'env>)>>(1);
        let writer = scope.spawn(|| -> Result<C, T::Error> {
            let mut container = container;
            for batch in rx {
                for (c, data) in batch {
                    let last = c.r1 == weights[c.w].rows();
                    container.put(&c, last, data)?;
                }
            }
            Ok(container)
        });
        let mut failed = None;
        for win in jobs.chunks(window) {
            let results: Result<Vec<(Computed<'env>, Option<String>)>, T::Error> = win
                .par_iter()
                .map(|c| target.compute(ck, &weights[c.w], c.r0, c.r1, amax.get(&c.w).copied(), opts.allow_nonfinite))
                .collect();
            // Drop the window's source pages from this process's mappings so resident memory stays bounded by
            // the window (pages stay cached). Mapped chunks the writer has yet to write stay valid: their pages
            // fault back in from the page cache.
            ck.release_pages();
            match results {
                Ok(r) => {
                    let mut batch = Vec::with_capacity(r.len());
                    for (c, (data, flag)) in win.iter().zip(r) {
                        nonfinite.extend(flag);
                        batch.push((*c, data));
                    }
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
        let container = match writer.join() {
            Ok(r) => r?,
            Err(_) => return Err(T::Error::from(ExecError::WriterPanicked)),
        };
        match failed {
            Some(e) => Err(e),
            None => Ok((container, nonfinite)),
        }
    })
}

/// A [`Container`] that writes nothing and hashes each part's bytes (`sling verify --source`'s re-derivation:
/// the same chunks and encoding as the run that wrote the artifact).
pub struct Hashing<E> {
    pub parts: Vec<sha2::Sha256>,
    /// Bytes hashed, all parts together.
    pub bytes: u64,
    error: std::marker::PhantomData<fn() -> E>,
}

impl<E> Hashing<E> {
    pub fn new(parts: usize) -> Hashing<E> {
        Hashing {
            parts: (0..parts).map(|_| sha2::Sha256::default()).collect(),
            bytes: 0,
            error: std::marker::PhantomData,
        }
    }

    /// Each part's sha256, lower-case hex.
    pub fn hex(self) -> Vec<String> {
        use sha2::Digest;
        self.parts.into_iter().map(|h| sling_formats::gguf::write::hex(&h.finalize())).collect()
    }
}

impl<E: Send> Container for Hashing<E> {
    type Error = E;
    fn put(&mut self, _: &Chunk, _: bool, data: Computed<'_>) -> Result<(), E> {
        use sha2::Digest;
        for (i, b) in data.slices() {
            self.parts[i].update(b);
            self.bytes += b.len() as u64;
        }
        Ok(())
    }
}

/// The sha256 of each of `w`'s parts as [`run`] computes them, without writing anything.
pub fn hash_weight<T: Target>(
    target: &T,
    ck: &Checkpoint,
    w: &Weight<T::Enc>,
    amax: Option<f32>,
    allow_nonfinite: bool,
) -> Result<Hashing<T::Error>, T::Error> {
    let amax: HashMap<usize, f32> = amax.map(|a| (0, a)).into_iter().collect();
    let opts = RunOptions { window: None, allow_nonfinite };
    let (h, _) = run(target, ck, std::slice::from_ref(w), 0, opts, &amax, Hashing::new(w.parts.len()))?;
    Ok(h)
}
