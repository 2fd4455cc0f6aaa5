//! Q2_K … Q6_K (ggml-quants.c). STUB: being written.
pub fn quantize_row_q2_k(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q2_k(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_q3_k(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q3_k(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_q4_k(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q4_k(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_q5_k(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q5_k(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
pub fn quantize_row_q6_k(_x: &[f32], _qw: Option<&[f32]>, _y: &mut [u8]) {
    todo!()
}
pub fn dequantize_row_q6_k(_y: &[u8], _x: &mut [f32]) {
    todo!()
}
