// The host build of kernels/cu/ct.cu (compiled by kernels/build.rs with `-ffp-contract=off`, like host.cpp): the
// compressed-tensors and MLX affine kernels run on the CPU by a launcher that walks the grid one thread at a time
// with the CUDA backend's launch shape, so kernels/tests/host_ct.rs can compare their bytes with the Rust
// reference on a machine with no GPU.
#include "shim.h"
#include "ct.cu"

// Runs `body(ctx)` once per thread of a grid of `nthreads` threads in 128-thread blocks, setting the thread's
// blockIdx/threadIdx as CUDA would.
template <typename F> static void sling_ct_grid(int64_t nthreads, F body) {
    const unsigned int block = 128;
    blockDim = sling_dim3{block, 1, 1};
    for (int64_t g = 0; g * block < nthreads; ++g) {
        blockIdx = sling_dim3{(unsigned int)g, 0, 0};
        for (unsigned int t = 0; t < block; ++t) {
            threadIdx = sling_dim3{t, 0, 0};
            body();
        }
    }
}

extern "C" void sling_host_ct_int(const float * x, int64_t nrows, int cols, int group, int bits, int symmetric, int sd,
                                  int8_t * codes, float * scales, int8_t * zeros) {
    const int64_t n = nrows * ((cols + group - 1) / group);
    sling_ct_grid(n, [&] { sling_ct_int(x, nrows, cols, group, bits, symmetric, sd, codes, scales, zeros); });
}

// `tiled` 0: per-row scales (FP8 channel), 1: 128x128 tiles (FP8 block); then the codes.
extern "C" void sling_host_ct_fp8(const float * x, int64_t nrows, int cols, int tiled, int sd, uint8_t * codes,
                                  float * scales) {
    if (tiled) {
        const int64_t n = ((nrows + 127) / 128) * ((cols + 127) / 128);
        sling_ct_grid(n, [&] { sling_ct_fp8_tile_scale(x, nrows, cols, sd, scales); });
    } else {
        sling_ct_grid(nrows, [&] { sling_ct_fp8_row_scale(x, nrows, cols, sd, scales); });
    }
    sling_ct_grid(nrows * cols, [&] { sling_ct_fp8_codes(x, nrows, cols, tiled, scales, codes); });
}

extern "C" void sling_host_ct_nvfp4(const float * x, int64_t nrows, int cols, float global, uint8_t * packed,
                                    uint8_t * scales) {
    sling_ct_grid(nrows * ((cols + 15) / 16), [&] { sling_ct_nvfp4(x, nrows, cols, global, packed, scales); });
}

extern "C" void sling_host_ct_mxfp4(const float * x, int64_t nrows, int cols, uint8_t * packed, uint8_t * scales) {
    sling_ct_grid(nrows * ((cols + 31) / 32), [&] { sling_ct_mxfp4(x, nrows, cols, packed, scales); });
}

// `codes` is scratch of nrows * cols bytes; `words` receives ceil(cols*bits/32) words per row.
extern "C" void sling_host_mlx_affine(const float * x, int64_t nrows, int cols, int group, int bits, int sd,
                                      uint8_t * codes, uint32_t * words, float * scales, float * biases) {
    const int64_t n = nrows * ((cols + group - 1) / group);
    sling_ct_grid(n, [&] { sling_mlx_affine(x, nrows, cols, group, bits, sd, codes, scales, biases); });
    const int64_t nw = nrows * (((int64_t)cols * bits + 31) / 32);
    sling_ct_grid(nw, [&] { sling_pack_bits(codes, nrows, cols, bits, words); });
}
