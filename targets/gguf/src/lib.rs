//! The GGUF target: HF checkpoint -> GGUF conversion (`convert`: architecture tables, hyper-parameters, the
//! plan of output tensors and the resumable executor), llama-quantize-compatible quantization (`quantize`:
//! type rules, recipes, imatrix), the tokenizer -> GGUF metadata (`tokenizer`), and the re-derivation of a
//! GGUF artifact from its source (`rederive`, which `sling verify --source` plugs into
//! `sling_provenance::manifest::verify_with`).
//!
//! It predates the `sling_pipeline::Target` trait and still has its own executor and writer
//! (`docs/architecture.md`, "Known debt"). It never depends on another target.

pub mod convert;
pub mod quantize;
pub mod rederive;
pub mod tokenizer;
