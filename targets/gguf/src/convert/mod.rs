//! HF checkpoint → GGUF conversion: architecture tables, planning, and the streaming executor (the row-range
//! recipes it evaluates are `sling_pipeline::ops`; the model card and manifest it writes, `sling_provenance`).

pub mod arch;
pub mod hparams;
pub mod model_card;
pub mod naming;
pub mod plan;
pub mod run;

pub use plan::{plan, OutTensor, OutType, Plan};
pub use run::{convert, execute, ConvertError, ConvertOptions, ConvertReport, Event, Prepared};
pub use sling_pipeline::ops::GgufSource;
