//! Checkpoint formats: lazy safetensors / Hugging Face model directories, GGUF reading and
//! streaming writing, tokenizer metadata, and the HF -> GGUF conversion tables.
//!
//! `unsafe` appears only where files are memory-mapped; every block carries a `// SAFETY:` note.

pub mod checkpoint;
pub mod convert;
pub mod gguf;
pub mod tokenizer;
