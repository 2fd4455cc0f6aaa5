//! A store of weights quantized upstream of the executor (GPTQ, AWQ): per weight, its codes and per-group
//! parameters ([`sling_quantizers::gptq::Solution`]), on disk, read back by row range when the target encodes
//! the weight. SKELETON — being filled in.

use std::path::{Path, PathBuf};

use sling_quantizers::gptq::{GroupParams, Solution};

#[derive(Debug, thiserror::Error)]
pub enum SolvedError {
    #[error("cannot {op} {path}")]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// Codes and parameters of rows `r0..r1` of a solved weight.
#[derive(Clone, Debug, PartialEq)]
pub struct SolvedRows {
    pub cols: usize,
    pub group: usize,
    /// `(r1 − r0) × cols`.
    pub codes: Vec<u8>,
    /// `(r1 − r0) × ceil(cols / group)`.
    pub params: Vec<GroupParams>,
}

/// A directory of solved weights, keyed by the weight's Hugging Face tensor name.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, SolvedError> {
        std::fs::create_dir_all(dir).map_err(|source| SolvedError::Io { path: dir.into(), op: "create", source })?;
        Ok(Store { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `s` as weight `name` (written to a temporary file, synced and renamed: a weight is either
    /// complete in the store or absent).
    pub fn put(&self, name: &str, group: usize, s: &Solution) -> Result<(), SolvedError> {
        let _ = (name, group, s);
        Ok(()) // SKELETON
    }

    /// Whether weight `name` is stored.
    pub fn contains(&self, name: &str) -> bool {
        let _ = name;
        false // SKELETON
    }

    /// Rows `r0..r1` of weight `name`, or `None` when the store does not hold it.
    pub fn rows(&self, name: &str, r0: usize, r1: usize) -> Result<Option<SolvedRows>, SolvedError> {
        let _ = (name, r0, r1);
        Ok(None) // SKELETON
    }
}
