//! Quantizers (placeholder).
