//! MXFP4 (ggml-quants.c). STUB: being written.
pub fn quantize_row_mxfp4(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_mxfp4(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
