//! IQ4_NL, IQ4_XS (ggml-quants.c). STUB: being written.
pub fn quantize_row_iq4_nl(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_iq4_nl(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_iq4_xs(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_iq4_xs(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
