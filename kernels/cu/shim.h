// The few definitions that let the same kernel source compile three ways: through NVRTC for the GPU
// (`__CUDACC_RTC__`: no system headers there, so the fixed-width types are spelled out), through nvcc, and as
// plain C++ for the host (`kernels/build.rs`, with `-ffp-contract=off`), where `__global__` functions become
// ordinary functions and `blockIdx`/`threadIdx` are thread-locals set by the host launcher (kernels/cu/host.cpp).
// The block layouts and conversions follow ggml (ggml-common.h, ggml-impl.h of the pinned llama.cpp).
#pragma once

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define SLING_DEVICE 1
#endif

#ifdef __CUDACC_RTC__
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#define FLT_MAX 3.40282346638528859812e+38F
// memcpy, memset and the math functions are built into CUDA device code.
#elif !defined(__CUDACC__)
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#endif

#ifdef SLING_DEVICE
#define SLING_DEV static __device__
#define SLING_CONST static __constant__
#define SLING_KERNEL extern "C" __global__
#else
#define SLING_DEV static inline
#define SLING_CONST static const
#define SLING_KERNEL extern "C"
struct sling_dim3 {
    unsigned int x, y, z;
};
// Set by the host launcher before each call of a kernel function.
static thread_local sling_dim3 blockIdx, blockDim, threadIdx;
#endif

#define GGML_RESTRICT __restrict__
// The reference's asserts guard the callers' contracts (checked in Rust before any launch).
#undef assert
#define assert(x) ((void)0)
#define GGML_ASSERT(x) ((void)0)
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define GROUP_MAX_EPS 1e-15f

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK_MXFP4 32
#define QK4_NL 32
#define QK_K 256

typedef uint16_t ggml_half;
typedef uint16_t ggml_fp16_t;

// ggml-common.h block layouts (the `ggml_half2` unions written as their two halves).
typedef struct { ggml_half d; uint8_t qs[QK4_0 / 2]; } block_q4_0;
typedef struct { ggml_half d; ggml_half m; uint8_t qs[QK4_1 / 2]; } block_q4_1;
typedef struct { ggml_half d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; } block_q5_0;
typedef struct { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]; } block_q5_1;
typedef struct { ggml_half d; int8_t qs[QK8_0]; } block_q8_0;
typedef struct { uint8_t e; uint8_t qs[QK_MXFP4 / 2]; } block_mxfp4;
typedef struct { uint8_t qs[(QK_K - 4 * QK_K / 64) / 5]; uint8_t qh[QK_K / 64]; ggml_half d; } block_tq1_0;
typedef struct { uint8_t qs[QK_K / 4]; ggml_half d; } block_tq2_0;
typedef struct { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; ggml_half d; ggml_half dmin; } block_q2_K;
typedef struct { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; ggml_half d; } block_q3_K;
typedef struct { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; } block_q4_K;
typedef struct { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; } block_q5_K;
typedef struct { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; ggml_half d; } block_q6_K;
typedef struct { ggml_half d; uint8_t qs[QK4_NL / 2]; } block_iq4_nl;
typedef struct { ggml_half d; uint16_t scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2]; } block_iq4_xs;

SLING_CONST int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
SLING_CONST int8_t kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

SLING_DEV float fp32_from_bits(uint32_t w) {
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}

SLING_DEV uint32_t fp32_to_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof w);
    return w;
}

// ggml_compute_fp16_to_fp32 (ggml-impl.h), exact.
SLING_DEV float ggml_compute_fp16_to_fp32(ggml_fp16_t h) {
    // Infinities and NaNs by their bits (x86 keeps a NaN's payload through the multiplication below and quietens
    // it; CUDA would return its canonical NaN).
    if ((h & 0x7C00u) == 0x7C00u) {
        const uint32_t m = (uint32_t)(h & 0x3FFu) << 13;
        return fp32_from_bits(((uint32_t)(h & 0x8000u) << 16) | 0x7F800000u | m | (m ? 0x00400000u : 0u));
    }
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = fp32_from_bits(0x7800000u);
    const float normalized_value = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized_value = fp32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized_value) : fp32_to_bits(normalized_value));
    return fp32_from_bits(result);
}

// ggml_compute_fp32_to_fp16 (ggml-impl.h): round to nearest even, as F16C's vcvtps2ph.
SLING_DEV ggml_fp16_t ggml_compute_fp32_to_fp16(float f) {
    const float scale_to_inf = fp32_from_bits(0x77800000u);
    const float scale_to_zero = fp32_from_bits(0x08800000u);
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) {
        bias = 0x71000000u;
    }
    base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fp32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    // NaN keeps its top payload bits, quietened, as F16C's vcvtps2ph (which the x86 build of ggml uses) does.
    return (ggml_fp16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u | ((w & 0x7FFFFFu) >> 13) : nonsign));
}

#define GGML_FP16_TO_FP32(x) ggml_compute_fp16_to_fp32(x)
#define GGML_FP32_TO_FP16(x) ggml_compute_fp32_to_fp16(x)

// ggml_e8m0_to_fp32_half (ggml-impl.h).
SLING_DEV float ggml_e8m0_to_fp32_half(uint8_t x) {
    uint32_t bits = x < 2 ? 0x00200000u << x : (uint32_t)(x - 1) << 23;
    return fp32_from_bits(bits);
}
#define GGML_E8M0_TO_FP32_HALF(x) ggml_e8m0_to_fp32_half(x)

// `floorf(log2f(x))` for a positive finite x as glibc's correctly rounded log2f gives it: the binary exponent,
// except within a few hundred ulps below a power of two and for subnormals, where log2 in double rounded to
// float decides (the same function as sling_quantizers::mxfp4::floor_log2f, which documents the exhaustive check).
SLING_DEV int sling_floor_log2f(float x) {
    const uint32_t bits = fp32_to_bits(x);
    const int biased = (int)(bits >> 23);
    if (biased != 0 && (bits & 0x7fffffu) < 0x7fff00u) {
        return biased - 127;
    }
    const float l = (float)log2((double)x);
    const int i = (int)l;
    return (float)i > l ? i - 1 : i;
}

// `(uint8_t)(floorf(log2f(amax)) - 2 + 127)` for amax > 0 as gcc compiles it on x86-64 (cvttss2si, low byte):
// negative exponents wrap, an infinite amax gives 0x80000000, i.e. 0.
SLING_DEV uint8_t sling_mxfp4_e(float amax) {
    if (amax == fp32_from_bits(0x7f800000u)) {
        return 0;
    }
    return (uint8_t)(sling_floor_log2f(amax) - 2 + 127);
}
