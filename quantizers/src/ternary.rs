//! TQ1_0, TQ2_0 (ggml-quants.c). STUB: being written.
pub fn quantize_row_tq1_0(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_tq1_0(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_tq2_0(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_tq2_0(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
