//! GGUF v3: values, a hardened reader and a streaming writer.
//!
//! Facts: `../shared/docs/gguf-spec.md` §1 (layout, alignment, split files), pinned to the llama.cpp
//! vendored by `llama-cpp-python==0.3.36`.

pub mod error;
pub mod read;
pub mod value;
pub mod write;

pub use error::GgufError;
pub use read::{GgufFile, GgufTensorInfo};
pub use value::{GgufValue, ValueType};
pub use write::{GgufWriter, SplitPolicy, TensorDesc};

/// `"GGUF"` as read from the first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The only version sling writes.
pub const VERSION: u32 = 3;
/// `GGUF_DEFAULT_ALIGNMENT`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Rounds `x` up to a multiple of `align` (a power of two).
pub fn align_up(x: u64, align: u64) -> u64 {
    x + (align - x % align) % align
}
