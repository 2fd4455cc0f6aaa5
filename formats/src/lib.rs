//! Containers: the lazy reader of safetensors / Hugging Face model directories (`checkpoint`), GGUF reading
//! and streaming writing (`gguf`), the safetensors shard layout and writer (`st_write`), and JSON as Python
//! writes it (`pyjson`), and the lock and resume journal every writer of an output keeps (`lock`, `journal`). Nothing here knows a quantization policy, a target or provenance.
//!
//! `unsafe` appears only where files are memory-mapped; every block carries a `// SAFETY:` note.

pub mod checkpoint;
pub mod gguf;
pub mod journal;
pub mod lock;
pub mod pyjson;
pub mod st_write;
