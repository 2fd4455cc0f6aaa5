//! Compute kernels (CPU now; CUDA through cudarc later).
