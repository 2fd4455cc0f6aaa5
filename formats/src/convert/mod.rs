//! HF checkpoint → GGUF conversion: architecture tables, planning, and the streaming executor.

pub mod arch;
pub mod card;
pub mod hparams;
pub mod ops;
pub mod plan;
pub mod run;

pub use plan::{plan, GgufSource, OutTensor, OutType, Payload, Plan, PlanError};
pub use run::{convert, execute, ConvertError, ConvertOptions, ConvertReport, Event, Prepared};
