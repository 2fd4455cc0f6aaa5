//! Checkpoint formats: lazy safetensors / Hugging Face model directories, GGUF reading and
//! streaming writing, tokenizer metadata, the HF -> GGUF conversion tables, and provenance manifests.
//!
//! `unsafe` appears only where files are memory-mapped; every block carries a `// SAFETY:` note.

pub mod checkpoint;
pub mod convert;
pub mod gguf;
pub mod manifest;
pub mod pyjson;
pub mod quantize;
pub mod signing;
pub mod st_write;
pub mod tokenizer;
