//! Quantizers and element conversions on slices. No I/O: callers hand in `f32` rows and get bytes.
//!
//! Every function here is the scalar reference for its type. Facts: `../shared/docs/gguf-spec.md`
//! §2.2 (scalar conversions) and §2.5 (Q8_0), pinned to llama.cpp as vendored by
//! `llama-cpp-python==0.3.36`.
#![deny(unsafe_code)]

pub mod activation;
pub mod alloc;
pub mod awq;
pub mod budget;
pub mod common;
pub mod ct;
pub mod decode;
pub mod encode;
pub mod ggml;
pub mod gptq;
pub mod iq1;
pub mod iq2;
pub mod iq3;
pub mod iq4;
pub mod iq_tables;
pub mod iqgrid;
pub mod iqsearch;
pub mod kquants;
pub mod legacy;
pub mod mlx;
pub mod mxfp4;
pub mod search;
pub mod ternary;

pub use decode::{decode_to_f32, e4m3_to_f32, DecodeError};
pub use encode::{encode_f32, EncodeError};
pub use ggml::{dequantize, quantize_rows, requires_imatrix};
