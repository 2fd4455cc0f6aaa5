//! Shared types of sling: one descriptor table for every tensor element type (source dtypes and
//! ggml types), and the parsed model configuration (`config.json`, both transformers-4 and
//! transformers-5 spellings), and the role of a tensor (what it is for) from its name.
#![deny(unsafe_code)]

pub mod config;
pub mod dtype;
pub mod role;

pub use config::{ConfigError, ModelConfig};
pub use dtype::{DType, DTypeInfo, VecDot};
pub use role::Role;
