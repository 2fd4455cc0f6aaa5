//! Q4_0, Q4_1, Q5_0, Q5_1 (ggml-quants.c). STUB: being written.
pub fn quantize_row_q4_0(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q4_0(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_q4_1(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q4_1(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_q5_0(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q5_0(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_q5_1(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q5_1(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
