// Block quantization kernels: one thread owns one block (32 or 256 values) and runs ggml's reference code for
// it (kernels/cu/ggml_quants.cuh) in the reference's operation order. Compiled without fast math and with
// `--fmad=false` (NVRTC) / `-ffp-contract=off` (host), so every float operation is the IEEE one the C does and
// the bytes equal `ggml_quantize_chunk`'s (and sling_quantizers' scalar reference). Same source for the GPU and
// the host build (shim.h); the dispatch by ggml type lives in Rust (sling_kernels::cuda / host tests).
//
// Kernel arguments, for every type T:
//   sling_quantize_T(x, qw, sig2, y, nblocks, blocks_per_row)
//   x: nblocks * QK values (whole rows, row-major), qw: the row's importance weights (blocks_per_row * QK
//   values, the same for every row) or null, sig2: one float per row (sling_row_sigma2 of that row, only read by
//   the legacy types with qw) or null, y: nblocks blocks out.

// `sum_x2 / n_per_row` of the legacy `_impl` quantizers: the row's mean square, summed left to right as the C
// does. One thread per row.
SLING_DEV float sling_row_sigma2(const float * x, int64_t n) {
    float sum_x2 = 0;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j]*x[j];
    return sum_x2/n;
}

SLING_KERNEL void sling_row_sigma2_rows(const float * x, float * sig2, int64_t nrows, int n_per_row) {
    const int64_t r = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (r < nrows) sig2[r] = sling_row_sigma2(x + r*n_per_row, n_per_row);
}

// One block of each type, as `quantize_T(src, dst, nrow, n_per_row, quant_weights)` (ggml-quants.c) treats it.
SLING_DEV void sling_blk_q4_0(const float * x, const float * qw, float s2, uint8_t * y) {
    if (qw) quantize_row_q4_0_impl(x, (block_q4_0 *)y, QK4_0, qw, s2); else quantize_row_q4_0_ref(x, (block_q4_0 *)y, QK4_0);
}
SLING_DEV void sling_blk_q4_1(const float * x, const float * qw, float s2, uint8_t * y) {
    if (qw) quantize_row_q4_1_impl(x, (block_q4_1 *)y, QK4_1, qw, s2); else quantize_row_q4_1_ref(x, (block_q4_1 *)y, QK4_1);
}
SLING_DEV void sling_blk_q5_0(const float * x, const float * qw, float s2, uint8_t * y) {
    if (qw) quantize_row_q5_0_impl(x, (block_q5_0 *)y, QK5_0, qw, s2); else quantize_row_q5_0_ref(x, (block_q5_0 *)y, QK5_0);
}
SLING_DEV void sling_blk_q5_1(const float * x, const float * qw, float s2, uint8_t * y) {
    if (qw) quantize_row_q5_1_impl(x, (block_q5_1 *)y, QK5_1, qw, s2); else quantize_row_q5_1_ref(x, (block_q5_1 *)y, QK5_1);
}
// quantize_q8_0 and quantize_mxfp4 ignore importance weights.
SLING_DEV void sling_blk_q8_0(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)qw; (void)s2; quantize_row_q8_0_ref(x, (block_q8_0 *)y, QK8_0);
}
SLING_DEV void sling_blk_mxfp4(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)qw; (void)s2; quantize_row_mxfp4_ref(x, (block_mxfp4 *)y, QK_MXFP4);
}
SLING_DEV void sling_blk_q2_K(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)s2; if (qw) quantize_row_q2_K_impl(x, (block_q2_K *)y, QK_K, qw); else quantize_row_q2_K_ref(x, (block_q2_K *)y, QK_K);
}
SLING_DEV void sling_blk_q3_K(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)s2; if (qw) quantize_row_q3_K_impl(x, (block_q3_K *)y, QK_K, qw); else quantize_row_q3_K_ref(x, (block_q3_K *)y, QK_K);
}
SLING_DEV void sling_blk_q4_K(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)s2; if (qw) quantize_row_q4_K_impl(x, (block_q4_K *)y, QK_K, qw); else quantize_row_q4_K_ref(x, (block_q4_K *)y, QK_K);
}
SLING_DEV void sling_blk_q5_K(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)s2; if (qw) quantize_row_q5_K_impl(x, (block_q5_K *)y, QK_K, qw); else quantize_row_q5_K_ref(x, (block_q5_K *)y, QK_K);
}
SLING_DEV void sling_blk_q6_K(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)s2; if (qw) quantize_row_q6_K_impl(x, (block_q6_K *)y, QK_K, qw); else quantize_row_q6_K_ref(x, (block_q6_K *)y, QK_K);
}
// quantize_tq1_0 / quantize_tq2_0 ignore importance weights.
SLING_DEV void sling_blk_tq1_0(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)qw; (void)s2; quantize_row_tq1_0_ref(x, (block_tq1_0 *)y, QK_K);
}
SLING_DEV void sling_blk_tq2_0(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)qw; (void)s2; quantize_row_tq2_0_ref(x, (block_tq2_0 *)y, QK_K);
}
// quantize_iq4_nl / quantize_iq4_xs: ntry 7 with or without importance weights.
SLING_DEV void sling_blk_iq4_nl(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)s2;
    block_iq4_nl * b = (block_iq4_nl *)y;
    uint8_t L[QK4_NL];
    float weight[QK4_NL];
    uint16_t unused_h;
    uint8_t * unused_l = 0;
    float scale;
    quantize_row_iq4_nl_impl(QK4_NL, 32, x, &b->d, b->qs, &unused_h, unused_l, &scale, weight, L, kvalues_iq4nl, qw, 7);
}
SLING_DEV void sling_blk_iq4_xs(const float * x, const float * qw, float s2, uint8_t * y) {
    (void)s2;
    block_iq4_xs * b = (block_iq4_xs *)y;
    uint8_t L[QK_K];
    float weight[32];
    float scales[QK_K/32];
    quantize_row_iq4_nl_impl(QK_K, 32, x, &b->d, b->qs, &b->scales_h, b->scales_l, scales, weight, L, kvalues_iq4nl, qw, 7);
}

// Every type: (ggml type name, values per block, bytes per block). The Rust side holds the same table
// (sling_kernels::cu::KERNELS) and checks it against sling_core's descriptor table.
#define SLING_TYPES(X) \
    X(q4_0, 32, 18) X(q4_1, 32, 20) X(q5_0, 32, 22) X(q5_1, 32, 24) X(q8_0, 32, 34) X(mxfp4, 32, 17) \
    X(q2_K, 256, 84) X(q3_K, 256, 110) X(q4_K, 256, 144) X(q5_K, 256, 176) X(q6_K, 256, 210) \
    X(tq1_0, 256, 54) X(tq2_0, 256, 66) X(iq4_nl, 32, 18) X(iq4_xs, 256, 136)

#define SLING_DEFINE_KERNEL(T, QK, BYTES)                                                                  \
    SLING_KERNEL void sling_quantize_##T(const float * x, const float * qw, const float * sig2, uint8_t * y, \
                                         int64_t nblocks, int blocks_per_row) {                             \
        const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;                                     \
        if (i >= nblocks) return;                                                                           \
        const int64_t r = i / blocks_per_row;                                                               \
        const int64_t b = i - r*blocks_per_row;                                                             \
        sling_blk_##T(x + i*QK, qw ? qw + b*QK : 0, sig2 ? sig2[r] : 0.0f, y + i*BYTES);                    \
    }
SLING_TYPES(SLING_DEFINE_KERNEL)

// Dequantization (ggml's `dequantize_row_T`, `to_float`): one thread per block, nblocks blocks of y into
// nblocks * QK floats of x.
#define SLING_DEFINE_DEQUANT(T, QK, BYTES)                                                                  \
    SLING_KERNEL void sling_dequantize_##T(const uint8_t * y, float * x, int64_t nblocks) {                 \
        const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;                                     \
        if (i >= nblocks) return;                                                                           \
        dequantize_row_##T((const block_##T *)(y + i*BYTES), x + i*QK, QK);                                 \
    }
SLING_TYPES(SLING_DEFINE_DEQUANT)
