//! Errors of the forward pass. Each names the tensor (or config key) it is about.

/// An error while building or running the forward pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tensor {0} not found in the checkpoint")]
    Missing(String),
    #[error("tensor {tensor} has shape {shape:?}, expected {expected}")]
    Shape { tensor: String, shape: Vec<u64>, expected: String },
    #[error("tensor {tensor}: {why}")]
    Read { tensor: String, why: String },
    #[error("config.json")]
    Config(#[from] sling_core::ConfigError),
    #[error("config.json: {0}")]
    BadConfig(String),
    #[error("{0} is not supported by the forward pass")]
    Unsupported(String),
    #[error("token id {id} is out of range (vocabulary of {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("empty input: {0}")]
    Empty(&'static str),
    #[error("GPTQ of {tensor}: {why}")]
    Solve { tensor: String, why: String },
    #[error("calibration on the device")]
    Device(#[source] sling_kernels::DeviceError),
    #[error("solved-weight store: {0}")]
    Store(String),
    #[error("no statistics collected")]
    NoStatistics,
    #[error(transparent)]
    Write(#[from] sling_formats::gguf::GgufError),
}

pub type Result<T> = std::result::Result<T, Error>;
