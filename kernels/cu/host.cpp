// The host build of the GPU kernels (kernels/build.rs compiles it with `-ffp-contract=off`): the very kernel
// source NVRTC compiles, run on the CPU by a launcher that walks the grid one thread at a time. Tests compare
// its bytes with the Rust scalar reference for every type (kernels/tests/host_kernels.rs), so a kernel bug
// shows on a machine with no GPU; on the GPU only the launch and the memory path are new.
#include "shim.h"
#include "ggml_quants.cuh"
#include "quant.cu"
#include "kquant_split.cu"

typedef void (*sling_quantize_kernel)(const float *, const float *, const float *, uint8_t *, int64_t, int);

typedef void (*sling_dequantize_kernel)(const uint8_t *, float *, int64_t);

struct sling_host_kernel {
    const char * name;
    sling_quantize_kernel f;
    sling_dequantize_kernel d;
};

#define SLING_HOST_ENTRY(T, QK, BYTES) {#T, sling_quantize_##T, sling_dequantize_##T},
static const sling_host_kernel SLING_HOST_KERNELS[] = {SLING_TYPES(SLING_HOST_ENTRY)};

static void sling_host_grid(unsigned int nthreads, unsigned int block, void (*body)(void *), void * ctx) {
    blockDim = sling_dim3{block, 1, 1};
    for (unsigned int g = 0; g * block < nthreads; ++g) {
        blockIdx = sling_dim3{g, 0, 0};
        for (unsigned int t = 0; t < block; ++t) {
            threadIdx = sling_dim3{t, 0, 0};
            body(ctx);
        }
    }
}

struct sling_host_args {
    sling_quantize_kernel f;
    const float * x;
    const float * qw;
    float * sig2;
    uint8_t * y;
    int64_t nrows, nblocks;
    int n_per_row, blocks_per_row;
};

static void sling_host_sigma2(void * p) {
    sling_host_args * a = (sling_host_args *)p;
    sling_row_sigma2_rows(a->x, a->sig2, a->nrows, a->n_per_row);
}

static void sling_host_quant(void * p) {
    sling_host_args * a = (sling_host_args *)p;
    a->f(a->x, a->qw, a->sig2, a->y, a->nblocks, a->blocks_per_row);
}

// Quantizes `nrows` rows of `n_per_row` values with the kernel of ggml type `name` (as the CUDA backend launches
// it: the row sigma2 pass when `qw` is given, then one thread per block, 128-thread blocks). Returns 0, or -1
// for an unknown type name. `sig2` holds `nrows` floats of scratch.
extern "C" int sling_host_quantize(const char * name, const float * x, const float * qw, float * sig2, uint8_t * y,
                                   int64_t nrows, int n_per_row, int qk) {
    for (const sling_host_kernel & k : SLING_HOST_KERNELS) {
        if (strcmp(k.name, name) != 0) continue;
        sling_host_args a = {k.f, x, qw, qw ? sig2 : 0, y, nrows, nrows * (n_per_row / qk), n_per_row, n_per_row / qk};
        if (qw) sling_host_grid((unsigned int)nrows, 128, sling_host_sigma2, &a);
        sling_host_grid((unsigned int)a.nblocks, 128, sling_host_quant, &a);
        return 0;
    }
    return -1;
}

struct sling_host_deq_args {
    sling_dequantize_kernel d;
    const uint8_t * y;
    float * x;
    int64_t nblocks;
};

static void sling_host_deq(void * p) {
    sling_host_deq_args * a = (sling_host_deq_args *)p;
    a->d(a->y, a->x, a->nblocks);
}

// Dequantizes `nblocks` blocks of ggml type `name` with its kernel, launched as the CUDA backend launches it.
// Returns 0, or -1 for an unknown type name.
extern "C" int sling_host_dequantize(const char * name, const uint8_t * y, float * x, int64_t nblocks) {
    for (const sling_host_kernel & k : SLING_HOST_KERNELS) {
        if (strcmp(k.name, name) != 0) continue;
        sling_host_deq_args a = {k.d, y, x, nblocks};
        sling_host_grid((unsigned int)nblocks, 128, sling_host_deq, &a);
        return 0;
    }
    return -1;
}

// ---- the two-pass K-quant kernels (kquant_split.cu) ----

typedef void (*sling_sub_kernel)(const float *, const float *, uint8_t *, int64_t, int);
typedef void (*sling_fin_kernel)(const float *, const float *, const uint8_t *, uint8_t *, int64_t, int);

struct sling_host_split {
    const char * name;
    sling_sub_kernel sub;
    sling_fin_kernel fin;
    int subs;
};

#define SLING_HOST_SPLIT_ENTRY(T, QK, BYTES, SUBS) {#T, sling_sub_##T##_k, sling_fin_##T##_k, SUBS},
static const sling_host_split SLING_HOST_SPLITS[] = {SLING_SPLIT_TYPES(SLING_HOST_SPLIT_ENTRY)};

struct sling_host_split_args {
    const sling_host_split * k;
    const float * x;
    const float * qw;
    uint8_t * scratch;
    uint8_t * y;
    int64_t nblocks;
    int blocks_per_row;
};

static void sling_host_sub(void * p) {
    sling_host_split_args * a = (sling_host_split_args *)p;
    a->k->sub(a->x, a->qw, a->scratch, a->nblocks, a->blocks_per_row);
}

static void sling_host_fin(void * p) {
    sling_host_split_args * a = (sling_host_split_args *)p;
    a->k->fin(a->x, a->qw, a->scratch, a->y, a->nblocks, a->blocks_per_row);
}

// The two-pass kernels of ggml type `name` over `nrows` rows, launched as the CUDA backend launches them (one
// thread per sub-block, then one per block, 128-thread blocks). `scratch` holds nblocks * subs * SLING_SUB_BYTES
// bytes. Returns 0, or -1 for a type without two-pass kernels.
extern "C" int sling_host_quantize_split(const char * name, const float * x, const float * qw, uint8_t * scratch,
                                         uint8_t * y, int64_t nrows, int n_per_row, int qk) {
    for (const sling_host_split & k : SLING_HOST_SPLITS) {
        if (strcmp(k.name, name) != 0) continue;
        sling_host_split_args a = {&k, x, qw, scratch, y, nrows * (n_per_row / qk), n_per_row / qk};
        sling_host_grid((unsigned int)(a.nblocks * k.subs), 128, sling_host_sub, &a);
        sling_host_grid((unsigned int)a.nblocks, 128, sling_host_fin, &a);
        return 0;
    }
    return -1;
}

// SLING_SUB_BYTES, for the Rust side's check of its copy.
extern "C" int sling_host_sub_bytes(void) { return SLING_SUB_BYTES; }
