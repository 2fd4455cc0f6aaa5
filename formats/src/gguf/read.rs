//! Placeholder: hardened GGUF reader.
pub struct GgufFile;
pub struct GgufTensorInfo;
