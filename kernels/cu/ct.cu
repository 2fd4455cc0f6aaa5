// compressed-tensors and MLX affine encodings, one row group per thread: the Rust scalar reference
// (sling_quantizers::ct and ::mlx) written out in C with the same f32 operations in the same order, so the codes,
// scales and zero points equal the reference's bit for bit (kernels/tests/host_ct.rs checks the host build of
// this file against it). Compiled like quant.cu: no fast math, `--fmad=false` / `-ffp-contract=off`.
//
// Rounding as the Rust spells it: `round_ties_even` is rintf (the default rounding mode is to nearest even on
// both sides), `nearest_int` is the float-adder trick read back from the bits (no float-to-integer conversion).
// Scale dtypes (`ScaleDtype`): 0 = F32, 1 = F16, 2 = BF16, rounded bitwise as the `half` crate and
// `f32_to_bf16_bits` do. NaN inputs never reach an operation whose NaN payload or sign would differ between x86
// and CUDA: statistics skip non-finite values, integer and FP4 codes read NaN as 0, and the FP8 code of a NaN is
// built from its sign bit (as the x86 division that the reference does keeps it).

#define SLING_SD_F32 0
#define SLING_SD_F16 1
#define SLING_SD_BF16 2

SLING_DEV bool sling_isnan(float x) { return x != x; }
SLING_DEV bool sling_isfinite(float x) { return (fp32_to_bits(x) & 0x7f800000u) != 0x7f800000u; }

// `x` clamped to [-max, max], NaN passing through (ct.rs `clamp_finite`).
SLING_DEV float sling_clamp_finite(float x, float max) {
    if (x > max) return max;
    if (x < -max) return -max;
    return x;
}

// `f32::clamp(x, lo, hi)` as Rust implements it: NaN passes through.
SLING_DEV float sling_clamp(float x, float lo, float hi) {
    if (x < lo) x = lo;
    if (x > hi) x = hi;
    return x;
}

// `sling_quantizers::common::nearest_int`: round half to even through the float adder, |x| <= 4194303.
SLING_DEV int sling_nearest_int(float fval) {
    const float val = fval + 12582912.0f;
    const int i = (int)fp32_to_bits(val);
    return (i & 0x007fffff) - 0x00400000;
}

// `half::f16::from_f32` (half 2.7.1 `f32_to_f16_fallback`): round to nearest even, subnormals, saturation to
// infinity, NaN keeping its top payload bits.
SLING_DEV uint16_t sling_f32_to_f16_bits(float value) {
    const uint32_t x = fp32_to_bits(value);
    const uint32_t sign = x & 0x80000000u;
    const uint32_t exp = x & 0x7F800000u;
    const uint32_t man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        const uint32_t nan_bit = man == 0 ? 0u : 0x0200u;
        return (uint16_t)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    const uint32_t half_sign = sign >> 16;
    const int unbiased_exp = (int)(exp >> 23) - 127;
    const int half_exp = unbiased_exp + 15;
    if (half_exp >= 0x1F) return (uint16_t)(half_sign | 0x7C00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (uint16_t)half_sign;
        const uint32_t m = man | 0x00800000u;
        uint32_t half_man = m >> (14 - half_exp);
        const uint32_t round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
        return (uint16_t)(half_sign | half_man);
    }
    const uint32_t hexp = (uint32_t)half_exp << 10;
    const uint32_t half_man = man >> 13;
    const uint32_t round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) return (uint16_t)((half_sign | hexp | half_man) + 1);
    return (uint16_t)(half_sign | hexp | half_man);
}

// `half::f16::to_f32` (half 2.7.1 `f16_to_f32_fallback`), exact.
SLING_DEV float sling_f16_bits_to_f32(uint16_t i) {
    if ((i & 0x7FFFu) == 0) return fp32_from_bits((uint32_t)i << 16);
    const uint32_t half_sign = (uint32_t)(i & 0x8000u);
    const uint32_t half_exp = (uint32_t)(i & 0x7C00u);
    const uint32_t half_man = (uint32_t)(i & 0x03FFu);
    if (half_exp == 0x7C00u) {
        if (half_man == 0) return fp32_from_bits((half_sign << 16) | 0x7F800000u);
        return fp32_from_bits((half_sign << 16) | 0x7FC00000u | (half_man << 13));
    }
    const uint32_t sign = half_sign << 16;
    if (half_exp == 0) {
        // Subnormal: find the leading one (the crate's leading_zeros - 6).
        int e = 0;
        while ((half_man << (e + 1)) < 0x400u) ++e;
        const uint32_t exp32 = (uint32_t)(127 - 15 - e) << 23;
        const uint32_t man32 = (half_man << (14 + e)) & 0x7FFFFFu;
        return fp32_from_bits(sign | exp32 | man32);
    }
    const int unbiased_exp = (int)(half_exp >> 10) - 15;
    const uint32_t exp32 = (uint32_t)(unbiased_exp + 127) << 23;
    const uint32_t man32 = (half_man & 0x03FFu) << 13;
    return fp32_from_bits(sign | exp32 | man32);
}

// `sling_quantizers::encode::f32_to_bf16_bits`: quiet NaNs, round to nearest even.
SLING_DEV uint16_t sling_f32_to_bf16_bits(float x) {
    const uint32_t u = fp32_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u);
    return (uint16_t)(((uint64_t)u + 0x7fffu + (uint64_t)((u >> 16) & 1u)) >> 16);
}

// `ScaleDtype::round`: saturate to the dtype's finite range, round to nearest even, back to f32.
SLING_DEV float sling_sd_round(int sd, float x) {
    if (sd == SLING_SD_F16) return sling_f16_bits_to_f32(sling_f32_to_f16_bits(sling_clamp_finite(x, 65504.0f)));
    if (sd == SLING_SD_BF16) {
        // bf16::MAX = 0x7f7f.
        return fp32_from_bits((uint32_t)sling_f32_to_bf16_bits(sling_clamp_finite(x, fp32_from_bits(0x7f7f0000u))) << 16);
    }
    return sling_clamp_finite(x, FLT_MAX);
}

// `ScaleDtype::eps`.
SLING_DEV float sling_sd_eps(int sd) {
    if (sd == SLING_SD_F16) return 0.0009765625f;
    if (sd == SLING_SD_BF16) return 0.0078125f;
    return fp32_from_bits(0x34000000u); // f32::EPSILON
}

// `ct::finite_amax`.
SLING_DEV float sling_finite_amax(const float * x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) {
        if (sling_isfinite(x[i])) {
            const float a = fabsf(x[i]);
            amax = a > amax ? a : amax;
        }
    }
    return amax;
}

// `ct::f32_to_e4m3`: round to nearest even including subnormals, saturating to ±448, NaN → 0x7f | sign.
SLING_DEV uint8_t sling_f32_to_e4m3(float x) {
    const uint8_t sign = (uint8_t)((fp32_to_bits(x) >> 24) & 0x80u);
    if (sling_isnan(x)) return sign | 0x7f;
    const float a = fabsf(x);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0.015625f) return sign | (uint8_t)rintf(a * 512.0f);
    const uint32_t b = fp32_to_bits(a);
    const uint32_t r = (b + 0x7ffffu + ((b >> 20) & 1u)) >> 20;
    const uint32_t c = r - (120u << 3);
    return sign | (uint8_t)(c < 0x7eu ? c : 0x7eu);
}

// `decode::e4m3_to_f32` for a non-NaN code, exact: `sign · m/512` or `sign · (1 + m/8) · 2^(e−7)`.
SLING_DEV float sling_e4m3_to_f32(uint8_t b) {
    const float sign = (b & 0x80) ? -1.0f : 1.0f;
    const int e = (b >> 3) & 0x0f;
    const float m = (float)(b & 0x07);
    if (e == 0x0f && (b & 0x07) == 0x07) return fp32_from_bits(0x7fc00000u);
    if (e == 0) return sign * m * (1.0f / 512.0f);
    return sign * (1.0f + m / 8.0f) * fp32_from_bits((uint32_t)(e - 7 + 127) << 23);
}

// `ct::fp8_code`: e4m3(x/scale + 0). A NaN element keeps its sign bit (x86's division propagates the operand NaN;
// CUDA's would return its canonical NaN), so it is coded from the bits.
SLING_DEV uint8_t sling_fp8_code(float x, float scale) {
    if (sling_isnan(x)) return (uint8_t)(((fp32_to_bits(x) >> 24) & 0x80u) | 0x7fu);
    return sling_f32_to_e4m3(x / scale + 0.0f);
}

// `ct::fp8_scale`: sd.round(amax/448), zero → eps.
SLING_DEV float sling_fp8_scale(float amax, int sd) {
    const float s = sling_sd_round(sd, amax / 448.0f);
    return s == 0.0f ? sling_sd_eps(sd) : s;
}

// `ct::f32_to_e2m1_ct`.
SLING_DEV uint8_t sling_f32_to_e2m1_ct(float x) {
    if (sling_isnan(x)) return 0;
    const uint8_t sign = x < 0.0f ? 8 : 0;
    const float a = fabsf(x);
    uint8_t idx;
    if (a <= 0.25f) idx = 0;
    else if (a < 0.75f) idx = 1;
    else if (a <= 1.25f) idx = 2;
    else if (a < 1.75f) idx = 3;
    else if (a <= 2.5f) idx = 4;
    else if (a < 3.5f) idx = 5;
    else if (a <= 5.0f) idx = 6;
    else idx = 7;
    return sign | idx;
}

// `mxfp4::e8m0_to_fp32`.
SLING_DEV float sling_e8m0_to_fp32(uint8_t x) {
    return x == 0 ? fp32_from_bits(0x00400000u) : fp32_from_bits((uint32_t)x << 23);
}

// `ct::mx_scale_byte`.
SLING_DEV uint8_t sling_mx_scale_byte(float amax) {
    const uint32_t p2 = (fp32_to_bits(fabsf(amax)) + (1u << 21)) & 0xff800000u;
    const uint32_t e = p2 >> 23;
    if (e == 0) return 0;
    if (e == 255) return 255;
    return (uint8_t)(e >= 2 ? e - 2 : 0);
}

// The group `g` of a row of `cols`: [start, start + len).
SLING_DEV int sling_group_len(int cols, int group, int g) {
    const int start = g * group;
    return cols - start < group ? cols - start : group;
}

// ---- compressed-tensors integer (`ct::quantize_int_row`): one thread per group ------------------------------
// codes: one i8 per element (row-major, as the Rust appends them); scales: one per group (as stored, in f32);
// zeros: one per group when asymmetric (else untouched). `group` > 0 (the Rust side resolves 0 to the row).
SLING_KERNEL void sling_ct_int(const float * x, int64_t nrows, int cols, int group, int bits, int symmetric, int sd,
                               int8_t * codes, float * scales, int8_t * zeros) {
    const int ngroups = (cols + group - 1) / group;
    const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= nrows * ngroups) return;
    const int64_t r = i / ngroups;
    const int g = (int)(i - r*ngroups);
    const int n = sling_group_len(cols, group, g);
    const float * v = x + r*cols + (int64_t)g*group;
    const float half = (float)(1 << (bits - 1));
    const float qmin = -half, qmax = half - 1.0f;
    // finite_min_max0
    float mn = 0.0f, mx = 0.0f;
    for (int j = 0; j < n; ++j) {
        if (sling_isfinite(v[j])) {
            mn = v[j] < mn ? v[j] : mn;
            mx = v[j] > mx ? v[j] : mx;
        }
    }
    float raw, zp;
    if (symmetric) {
        const float nmn = -mn;
        raw = (nmn > mx ? nmn : mx) / ((qmax - qmin) / 2.0f);
        zp = 0.0f;
    } else {
        const float s = (mx - mn) / (qmax - qmin);
        const float z = sling_clamp(qmin - mn / s, qmin, qmax);
        raw = s;
        zp = sling_isnan(z) ? 0.0f : rintf(z);
    }
    float scale = sling_sd_round(sd, raw);
    if (scale == 0.0f) scale = sling_sd_eps(sd);
    scales[i] = scale;
    if (!symmetric) zeros[i] = (int8_t)zp;
    int8_t * c = codes + r*cols + (int64_t)g*group;
    for (int j = 0; j < n; ++j) {
        const float e = sling_isnan(v[j]) ? 0.0f : v[j];
        c[j] = (int8_t)sling_nearest_int(sling_clamp(e / scale + zp, qmin, qmax));
    }
}

// ---- FP8 per channel (`ct::quantize_fp8_row`) and per 128x128 block (`ct::quantize_fp8_block`) --------------
// The scale of each row: one thread per row.
SLING_KERNEL void sling_ct_fp8_row_scale(const float * x, int64_t nrows, int cols, int sd, float * scales) {
    const int64_t r = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (r >= nrows) return;
    scales[r] = sling_fp8_scale(sling_finite_amax(x + r*cols, cols), sd);
}

// The scale of each 128x128 tile of the window (tiles from row 0 / column 0, partial at the edges), row-major
// over [ceil(nrows/128), ceil(cols/128)]: one thread per tile.
SLING_KERNEL void sling_ct_fp8_tile_scale(const float * x, int64_t nrows, int cols, int sd, float * scales) {
    const int nbc = (cols + 127) / 128;
    const int64_t nbr = (nrows + 127) / 128;
    const int64_t t = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (t >= nbr * nbc) return;
    const int64_t br = t / nbc;
    const int bc = (int)(t - br*nbc);
    float amax = 0.0f;
    for (int64_t r = br*128; r < (br + 1)*128 && r < nrows; ++r) {
        for (int c = bc*128; c < (bc + 1)*128 && c < cols; ++c) {
            const float v = x[r*cols + c];
            if (sling_isfinite(v)) {
                const float a = fabsf(v);
                amax = a > amax ? a : amax;
            }
        }
    }
    scales[t] = sling_fp8_scale(amax, sd);
}

// The codes, one thread per element: `tiled` 0 reads the row's scale, 1 its 128x128 tile's.
SLING_KERNEL void sling_ct_fp8_codes(const float * x, int64_t nrows, int cols, int tiled, const float * scales,
                                     uint8_t * codes) {
    const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= nrows * cols) return;
    const int64_t r = i / cols;
    const int c = (int)(i - r*cols);
    const float s = tiled ? scales[(r / 128) * ((cols + 127) / 128) + c / 128] : scales[r];
    codes[i] = sling_fp8_code(x[i], s);
}

// ---- FP4 (`ct::quantize_nvfp4_row`, `ct::quantize_mxfp4_row`): one thread per group --------------------------
// Codes packed two per byte, element 2k of the row in the low nibble; each row takes ceil(cols/2) bytes (the
// groups are 16 or 32 long, so every group starts on a byte); an odd last element has a zero high nibble.
SLING_DEV void sling_fp4_group(const float * v, int n, float scale, uint8_t * packed) {
    for (int j = 0; j < n; j += 2) {
        const uint8_t lo = sling_f32_to_e2m1_ct(v[j] / scale);
        const uint8_t hi = j + 1 < n ? sling_f32_to_e2m1_ct(v[j + 1] / scale) : 0;
        packed[j / 2] = (uint8_t)((lo & 0xf) | (hi << 4));
    }
}

SLING_KERNEL void sling_ct_nvfp4(const float * x, int64_t nrows, int cols, float global, uint8_t * packed,
                                 uint8_t * scales) {
    const int ngroups = (cols + 15) / 16;
    const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= nrows * ngroups) return;
    const int64_t r = i / ngroups;
    const int g = (int)(i - r*ngroups);
    const int n = sling_group_len(cols, 16, g);
    const float * v = x + r*cols + (int64_t)g*16;
    uint8_t byte = sling_f32_to_e4m3(global * (sling_finite_amax(v, n) / 6.0f));
    if ((byte & 0x7f) == 0) byte = 0x20;
    scales[i] = byte;
    sling_fp4_group(v, n, sling_e4m3_to_f32(byte) / global, packed + r*((cols + 1) / 2) + g*8);
}

SLING_KERNEL void sling_ct_mxfp4(const float * x, int64_t nrows, int cols, uint8_t * packed, uint8_t * scales) {
    const int ngroups = (cols + 31) / 32;
    const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= nrows * ngroups) return;
    const int64_t r = i / ngroups;
    const int g = (int)(i - r*ngroups);
    const int n = sling_group_len(cols, 32, g);
    const float * v = x + r*cols + (int64_t)g*32;
    const uint8_t byte = sling_mx_scale_byte(sling_finite_amax(v, n));
    scales[i] = byte;
    sling_fp4_group(v, n, sling_e8m0_to_fp32(byte), packed + r*((cols + 1) / 2) + g*16);
}

// ---- MLX affine (`mlx::quantize_affine_row`): one thread per group, then the bit packing ---------------------
// codes: one u8 per element; scales and biases: per group, rounded to `sd` (what the file holds; the codes use
// the f32 values, as MLX does).
SLING_KERNEL void sling_mlx_affine(const float * x, int64_t nrows, int cols, int group, int bits, int sd,
                                   uint8_t * codes, float * scales, float * biases) {
    const int ngroups = (cols + group - 1) / group;
    const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= nrows * ngroups) return;
    const int64_t r = i / ngroups;
    const int g = (int)(i - r*ngroups);
    const int n = sling_group_len(cols, group, g);
    const float * v = x + r*cols + (int64_t)g*group;
    const float nq = (float)((1u << bits) - 1u);
    // mlx.rs `finite_min_max`: min and max are exact, so the order of the Rust's eight lanes does not matter.
    float mn = fp32_from_bits(0x7f800000u), mx = fp32_from_bits(0xff800000u);
    for (int j = 0; j < n; ++j) {
        if (sling_isfinite(v[j])) {
            mn = v[j] < mn ? v[j] : mn;
            mx = v[j] > mx ? v[j] : mx;
        }
    }
    if (mn > mx) mn = mx = 0.0f;
    // mlx.rs `group_params`.
    const float eps = 1e-7f;
    float s, b;
    if (bits == 1) {
        const float d = mx - mn;
        s = d > eps ? d : eps;
        b = mn;
    } else {
        const bool mask = fabsf(mn) > fabsf(mx);
        float s0 = (mx - mn) / nq;
        s0 = s0 > eps ? s0 : eps;
        const float edge = mask ? mn : mx;
        s0 = mask ? s0 : -s0;
        const float q0 = rintf(edge / s0);
        if (q0 != 0.0f) {
            s = edge / q0;
            b = edge;
        } else {
            s = s0;
            b = 0.0f;
        }
    }
    uint8_t * c = codes + r*cols + (int64_t)g*group;
    for (int j = 0; j < n; ++j) {
        const float w = sling_isnan(v[j]) ? 0.0f : v[j];
        c[j] = (uint8_t)sling_nearest_int(sling_clamp((w - b) / s, 0.0f, nq));
    }
    scales[i] = sling_sd_round(sd, s);
    biases[i] = sling_sd_round(sd, b);
}

// `ct::pack_bits` per row: codes (one byte each, masked to `bits`) as an LSB-first bitstream of
// ceil(cols*bits/32) words per row. One thread per word.
SLING_KERNEL void sling_pack_bits(const uint8_t * codes, int64_t nrows, int cols, int bits, uint32_t * words) {
    const int64_t nw = ((int64_t)cols * bits + 31) / 32;
    const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= nrows * nw) return;
    const int64_t r = i / nw;
    const int64_t w = i - r*nw;
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t lo = w * 32, hi = lo + 32;
    int64_t e0 = lo / bits;
    int64_t e1 = (hi + bits - 1) / bits;
    if (e1 > cols) e1 = cols;
    uint32_t word = 0;
    for (int64_t e = e0; e < e1; ++e) {
        const uint32_t u = (uint32_t)codes[r*cols + e] & mask;
        const int64_t bit = e * bits;
        if (bit >= lo) word |= u << (bit - lo);
        else word |= u >> (lo - bit);
    }
    words[i] = word;
}
