//! Shared scale searches of the ggml quantizers (ggml-quants.c: make_qx_quants, make_q3_quants, make_qkx2_quants,
//! make_qkx3_quants, make_qp_quants). STUB: being written.
