//! The CUDA backend of a build without the `cuda` feature: the same API as `cuda.rs`, every entry saying that
//! this build has no CUDA support.

use crate::backend::{Backend, DeviceError, DeviceOptions};

/// Never constructed in this build.
pub enum CudaBackend {}

impl CudaBackend {
    pub fn open(_ordinal: usize, _options: &DeviceOptions) -> Result<CudaBackend, DeviceError> {
        Err(DeviceError::NotBuilt)
    }
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        match *self {}
    }
}

/// What `sling doctor` reports about CUDA.
pub fn probe() -> crate::Probe {
    crate::Probe {
        built: false,
        driver: Err(DeviceError::NotBuilt.to_string()),
        nvrtc: Err(DeviceError::NotBuilt.to_string()),
        devices: Vec::new(),
    }
}

/// Compiles the kernels for `arch` with NVRTC (unavailable in this build).
pub fn compile(_arch: &str) -> Result<Vec<u8>, DeviceError> {
    Err(DeviceError::NotBuilt)
}

/// The compiled kernels for `arch`, from the cache or NVRTC (unavailable in this build).
pub fn cubin(_arch: &str, _cache: Option<&std::path::Path>) -> Result<(Vec<u8>, &'static str), DeviceError> {
    Err(DeviceError::NotBuilt)
}
