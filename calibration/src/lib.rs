//! Calibration engine: a layer-by-layer forward pass of every architecture the converter supports,
//! on the CPU, in f32, reading the checkpoint's weights lazily (bf16/f16/f32, DeepSeek FP8 and
//! gpt-oss MXFP4 decoded on the fly). Its logits match `transformers` float32 (docs/calibration.md).
//!
//! ```no_run
//! use sling_calibration::{CheckpointSource, Model};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ck = sling_formats::checkpoint::Checkpoint::open(std::path::Path::new("fixtures/models/qwen3moe"))?;
//! let cfg = ck.config.clone().ok_or("no config.json")?;
//! let src = CheckpointSource::new(&ck);
//! let model = Model::new(&src, &cfg)?;
//! let logits = model.logits(&[vec![342, 223, 83]], None)?; // one [3, vocab] array per sequence
//! # let _ = logits; Ok(()) }
//! ```
//!
//! [`Observer`] sees the input of every linear layer (per routed expert, with the routed tokens),
//! named by its GGUF tensor name: the hook for importance matrices.
#![deny(unsafe_code)]

pub mod awq;
pub mod candidate;
pub mod error;
pub mod eval;
pub mod gptq;
pub mod imatrix;
pub mod math;
pub mod model;
pub mod observer;
pub mod rope;
pub mod sensitivity;
pub mod source;
pub mod spec;

pub use candidate::GgufCandidate;
pub use error::{Error, Result};
pub use eval::{evaluate, EvalReport, Evaluator};
pub use model::{Batch, Model};
pub use observer::{LinearInput, Observer, SumSquares};
pub use source::{CheckpointSource, MemSource, TensorSource};
pub use spec::Spec;
