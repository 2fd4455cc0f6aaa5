// K-quants (Q2_K ... Q6_K) in two passes, for parallelism on the GPU: the scale search of every sub-block (the costly part:
// make_qkx2/qkx3_quants' 15-36 trial scales, make_qx_quants' 19 for Q3_K/Q6_K) runs one thread per sub-block, and
// the rest of ggml's row function (the super-block scales, the final codes, the packing) one thread per
// super-block, reading the searches' results. Each pass is the reference's code for its part in the reference's
// operation order (ggml-quants.c, quantize_row_q{2,3,4,5,6}_K_ref / _impl, as vendored in ggml_quants.cuh), so the
// bytes are the one-pass kernels' (tested through the host build against the scalar reference, as quant.cu).
//
// A sub-block's results go to a scratch record of SLING_SUB_BYTES: scale, min and the sum of the weights as
// floats at 0, 4, 8, and the search's codes L from byte 16 (the reference keeps them for a sub-block whose
// quantized scale comes out as zero, which skips the final codes' loop).
//
// Kernel arguments for a split type T:
//   sling_sub_T(x, qw, scratch, nblocks, blocks_per_row)      nblocks * SUBS threads
//   sling_fin_T(x, qw, scratch, y, nblocks, blocks_per_row)   nblocks threads

#define SLING_SUB_BYTES 48

// ---- Q4_K / Q5_K: 8 sub-blocks of 32 -------------------------------------------------------------------------

// quantize_row_q{4,5}_K_ref (qw null) / _impl: the loop body for sub-block j of the super-block at x.
SLING_DEV void sling_sub_qk45(const float * x, const float * qw, int j, uint8_t * s, int nmax, float rmin_ref,
                              float rdelta_ref, int nstep_ref) {
    float * f = (float *)s;
    uint8_t * L = s + 16;
    uint8_t Laux[32];
    float weights[32];
    float min;
    if (!qw) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32*j + l] * x[32*j + l];
        float av_x = sqrtf(sum_x2/32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32*j + l]);
        f[0] = make_qkx2_quants(32, nmax, x + 32*j, weights, L, &min, Laux, rmin_ref, rdelta_ref, nstep_ref, false);
        f[1] = min;
        f[2] = 0;
    } else {
        float sum_x2 = 0;
        for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
        float sigma2 = 2*sum_x2/QK_K;
        const float * w = qw + 32*j;
        for (int l = 0; l < 32; ++l) weights[l] = w[l] * sqrtf(sigma2 + x[32*j + l]*x[32*j + l]);
        float sumw = 0;
        for (int l = 0; l < 32; ++l) sumw += weights[l];
        f[2] = sumw;
        f[0] = make_qkx3_quants(32, nmax, x + 32*j, weights, L, &min, Laux, -0.9f, 0.05f, 36, false);
        f[1] = min;
    }
}

SLING_DEV void sling_sub_q4_K(const float * x, const float * qw, int j, uint8_t * s) {
    sling_sub_qk45(x, qw, j, s, 15, -1.f, 0.1f, 20);
}

SLING_DEV void sling_sub_q5_K(const float * x, const float * qw, int j, uint8_t * s) {
    sling_sub_qk45(x, qw, j, s, 31, -0.5f, 0.1f, 15);
}

// The super-block scales of quantize_row_q{4,5}_K_ref / _impl from the sub-blocks' results: `scales` (12 bytes)
// and d/dmin as the reference sets them. `q5_impl` adds the `MIN(63, ...)` the Q5_K _impl has and Q4_K's lacks.
SLING_DEV void sling_fin_scales_qk45(const float * qw, const uint8_t * s, uint8_t * y_scales, ggml_half * y_d,
                                     ggml_half * y_dmin, bool q5) {
    float scales[QK_K/32];
    float mins[QK_K/32];
    for (int j = 0; j < QK_K/32; ++j) {
        scales[j] = ((const float *)(s + j*SLING_SUB_BYTES))[0];
        mins[j]   = ((const float *)(s + j*SLING_SUB_BYTES))[1];
    }
    if (!qw) {
        float max_scale = 0;
        float max_min = 0;
        for (int j = 0; j < QK_K/32; ++j) {
            float scale = scales[j];
            if (scale > max_scale) {
                max_scale = scale;
            }
            float min = mins[j];
            if (min > max_min) {
                max_min = min;
            }
        }
        float inv_scale = max_scale > 0 ? 63.f/max_scale : 0.f;
        float inv_min   = max_min   > 0 ? 63.f/max_min   : 0.f;
        for (int j = 0; j < QK_K/32; ++j) {
            uint8_t ls = nearest_int(inv_scale*scales[j]);
            uint8_t lm = nearest_int(inv_min*mins[j]);
            ls = MIN(63, ls);
            lm = MIN(63, lm);
            if (j < 4) {
                y_scales[j] = ls;
                y_scales[j+4] = lm;
            } else {
                y_scales[j+4] = (ls & 0xF) | ((lm & 0xF) << 4);
                y_scales[j-4] |= ((ls >> 4) << 6);
                y_scales[j-0] |= ((lm >> 4) << 6);
            }
        }
        *y_d = GGML_FP32_TO_FP16(max_scale/63.f);
        *y_dmin = GGML_FP32_TO_FP16(max_min/63.f);
    } else {
        float sw[QK_K/32];
        uint8_t Ls[QK_K/32];
        uint8_t Lm[QK_K/32];
        for (int j = 0; j < QK_K/32; ++j) sw[j] = ((const float *)(s + j*SLING_SUB_BYTES))[2];
        float d_block = make_qp_quants(QK_K/32, 63, scales, Ls, sw);
        float m_block = make_qp_quants(QK_K/32, 63, mins,   Lm, sw);
        for (int j = 0; j < QK_K/32; ++j) {
            uint8_t ls = Ls[j];
            uint8_t lm = Lm[j];
            if (q5) {
                ls = MIN(63, ls);
                lm = MIN(63, lm);
            }
            if (j < 4) {
                y_scales[j] = ls;
                y_scales[j+4] = lm;
            } else {
                y_scales[j+4] = (ls & 0xF) | ((lm & 0xF) << 4);
                y_scales[j-4] |= ((ls >> 4) << 6);
                y_scales[j-0] |= ((lm >> 4) << 6);
            }
        }
        *y_d = GGML_FP32_TO_FP16(d_block);
        *y_dmin = GGML_FP32_TO_FP16(m_block);
    }
}

// The levels of a Q4_K/Q5_K block (0..nmax): the first pass's, re-rounded against the final 6-bit scales and mins
// as the second half of quantize_row_q4_K_impl / q5_K_impl does (a sub-block whose final scale is 0 keeps them).
SLING_DEV void sling_fin_levels_qk45(const float * x, const uint8_t * s, const uint8_t * scales, ggml_half d16,
                                     ggml_half dmin16, int nmax, uint8_t * L) {
    for (int j = 0; j < QK_K/32; ++j) {
        for (int l = 0; l < 32; ++l) L[32*j + l] = s[j*SLING_SUB_BYTES + 16 + l];
    }
    uint8_t sc, m;
    for (int j = 0; j < QK_K/32; ++j) {
        get_scale_min_k4(j, scales, &sc, &m);
        const float d = GGML_FP16_TO_FP32(d16) * sc;
        if (!d) continue;
        const float dm = GGML_FP16_TO_FP32(dmin16) * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32*j + ii] + dm)/d);
            l = MAX(0, MIN(nmax, l));
            L[32*j + ii] = l;
        }
    }
}

SLING_DEV void sling_fin_q4_K(const float * x, const float * qw, const uint8_t * s, uint8_t * yb) {
    block_q4_K * y = (block_q4_K *)yb;
    uint8_t L[QK_K];
    sling_fin_scales_qk45(qw, s, y->scales, &y->d, &y->dmin, false);
    sling_fin_levels_qk45(x, s, y->scales, y->d, y->dmin, 15, L);

    uint8_t * q = y->qs;
    for (int j = 0; j < QK_K; j += 64) {
        for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
        q += 32;
    }
}

SLING_DEV void sling_fin_q5_K(const float * x, const float * qw, const uint8_t * s, uint8_t * yb) {
    block_q5_K * y = (block_q5_K *)yb;
    uint8_t L[QK_K];
    sling_fin_scales_qk45(qw, s, y->scales, &y->d, &y->dmin, true);
    sling_fin_levels_qk45(x, s, y->scales, y->d, y->dmin, 31, L);

    uint8_t * GGML_RESTRICT qh = y->qh;
    uint8_t * GGML_RESTRICT ql = y->qs;
    memset(qh, 0, QK_K/8);

    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64) {
        for (int j = 0; j < 32; ++j) {
            int l1 = L[n + j];
            if (l1 > 15) {
                l1 -= 16; qh[j] |= m1;
            }
            int l2 = L[n + j + 32];
            if (l2 > 15) {
                l2 -= 16; qh[j] |= m2;
            }
            ql[j] = l1 | (l2 << 4);
        }
        m1 <<= 2; m2 <<= 2;
        ql += 32;
    }
}

// ---- Q6_K: 16 sub-blocks of 16 -------------------------------------------------------------------------------

// quantize_row_q6_K_ref / _impl: make_qx_quants of sub-block ib (the importance weights as they are, as the
// reference passes them).
SLING_DEV void sling_sub_q6_K(const float * x, const float * qw, int ib, uint8_t * s) {
    float * f = (float *)s;
    int8_t * L = (int8_t *)(s + 16);
    f[0] = make_qx_quants(16, 32, x + 16*ib, L, 1, qw ? qw + 16*ib : NULL);
    f[1] = 0;
    f[2] = 0;
}

SLING_DEV void sling_fin_q6_K(const float * x, const float * qw, const uint8_t * s, uint8_t * yb) {
    (void)qw;
    block_q6_K * y = (block_q6_K *)yb;
    int8_t L[QK_K];
    float scales[QK_K/16];
    float max_scale = 0;
    float max_abs_scale = 0;
    for (int ib = 0; ib < QK_K/16; ++ib) {
        for (int l = 0; l < 16; ++l) L[16*ib + l] = (int8_t)s[ib*SLING_SUB_BYTES + 16 + l];
        const float scale = ((const float *)(s + ib*SLING_SUB_BYTES))[0];
        scales[ib] = scale;
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }

    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(y, 0, sizeof(block_q6_K));
        y->d = GGML_FP32_TO_FP16(0.f);
        return;
    }

    float iscale = -128.f/max_scale;
    y->d = GGML_FP32_TO_FP16(1/iscale);
    for (int ib = 0; ib < QK_K/16; ++ib) {
        y->scales[ib] = MIN(127, nearest_int(iscale*scales[ib]));
    }

    for (int j = 0; j < QK_K/16; ++j) {
        float d = GGML_FP16_TO_FP32(y->d) * y->scales[j];
        if (!d) {
            continue;
        }
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16*j + ii]/d);
            l = MAX(-32, MIN(31, l));
            L[16*j + ii] = l + 32;
        }
    }

    uint8_t * GGML_RESTRICT ql = y->ql;
    uint8_t * GGML_RESTRICT qh = y->qh;
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l +  0] & 0xF;
            const uint8_t q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF;
            const uint8_t q4 = L[j + l + 96] & 0xF;
            ql[l+ 0] = q1 | (q3 << 4);
            ql[l+32] = q2 | (q4 << 4);
            qh[l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6);
        }
        ql += 64;
        qh += 32;
    }
}

// ---- Q2_K: 16 sub-blocks of 16 -------------------------------------------------------------------------------

// quantize_row_q2_K_ref (qw null) / _impl: the loop body for sub-block j.
SLING_DEV void sling_sub_q2_K(const float * x, const float * qw, int j, uint8_t * s) {
    float * f = (float *)s;
    uint8_t * L = s + 16;
    uint8_t Laux[16];
    float weights[16];
    float min;
    if (!qw) {
        for (int l = 0; l < 16; ++l) weights[l] = fabsf(x[16*j + l]);
        f[0] = make_qkx2_quants(16, 3, x + 16*j, weights, L, &min, Laux, -0.5f, 0.1f, 15, true);
        f[1] = min;
        f[2] = 0;
    } else {
        float sumx2 = 0;
        for (int l = 0; l < QK_K; ++l) sumx2 += x[l]*x[l];
        float sigma2 = sumx2/QK_K;
        const float * w = qw + 16*j;
        for (int l = 0; l < 16; ++l) weights[l] = w[l] * sqrtf(sigma2 + x[16*j + l]*x[16*j + l]);
        float sw = 0;
        for (int l = 0; l < QK_K/16; ++l) sw += weights[l];
        f[2] = sw;
        f[0] = make_qkx3_quants(16, 3, x + 16*j, weights, L, &min, Laux, -0.9f, 0.05f, 36, false);
        f[1] = min;
    }
}

SLING_DEV void sling_fin_q2_K(const float * x, const float * qw, const uint8_t * s, uint8_t * yb) {
    block_q2_K * y = (block_q2_K *)yb;
    uint8_t L[QK_K];
    float mins[QK_K/16];
    float scales[QK_K/16];
    for (int j = 0; j < QK_K/16; ++j) {
        for (int l = 0; l < 16; ++l) L[16*j + l] = s[j*SLING_SUB_BYTES + 16 + l];
        scales[j] = ((const float *)(s + j*SLING_SUB_BYTES))[0];
        mins[j]   = ((const float *)(s + j*SLING_SUB_BYTES))[1];
    }
    if (!qw) {
        const float q4scale = 15.f;
        float max_scale = 0;
        float max_min = 0;
        for (int j = 0; j < QK_K/16; ++j) {
            float scale = scales[j];
            if (scale > max_scale) {
                max_scale = scale;
            }
            float min = mins[j];
            if (min > max_min) {
                max_min = min;
            }
        }
        if (max_scale > 0) {
            float iscale = q4scale/max_scale;
            for (int j = 0; j < QK_K/16; ++j) {
                int l = nearest_int(iscale*scales[j]);
                y->scales[j] = l;
            }
            y->d = GGML_FP32_TO_FP16(max_scale/q4scale);
        } else {
            for (int j = 0; j < QK_K/16; ++j) y->scales[j] = 0;
            y->d = GGML_FP32_TO_FP16(0.f);
        }
        if (max_min > 0) {
            float iscale = q4scale/max_min;
            for (int j = 0; j < QK_K/16; ++j) {
                int l = nearest_int(iscale*mins[j]);
                y->scales[j] |= (l << 4);
            }
            y->dmin = GGML_FP32_TO_FP16(max_min/q4scale);
        } else {
            y->dmin = GGML_FP32_TO_FP16(0.f);
        }
        for (int j = 0; j < QK_K/16; ++j) {
            const float d = GGML_FP16_TO_FP32(y->d) * (y->scales[j] & 0xF);
            if (!d) continue;
            const float dm = GGML_FP16_TO_FP32(y->dmin) * (y->scales[j] >> 4);
            for (int ii = 0; ii < 16; ++ii) {
                int l = nearest_int((x[16*j + ii] + dm)/d);
                l = MAX(0, MIN(3, l));
                L[16*j + ii] = l;
            }
        }
    } else {
        float sw[QK_K/16];
        uint8_t Ls[QK_K/16], Lm[QK_K/16];
        for (int j = 0; j < QK_K/16; ++j) sw[j] = ((const float *)(s + j*SLING_SUB_BYTES))[2];
        float dm, mm;
        dm  = make_qp_quants(QK_K/16, 15, scales, Ls, sw);
        mm  = make_qp_quants(QK_K/16, 15, mins,   Lm, sw);
        y->d    = GGML_FP32_TO_FP16(dm);
        y->dmin = GGML_FP32_TO_FP16(mm);
        dm      = GGML_FP16_TO_FP32(y->d);
        mm      = GGML_FP16_TO_FP32(y->dmin);
        for (int j = 0; j < QK_K/16; ++j) {
            y->scales[j] = Ls[j] | (Lm[j] << 4);
        }
        for (int j = 0; j < QK_K/16; ++j) {
            const float d = dm * (y->scales[j] & 0xF);
            if (!d) continue;
            const float m = mm * (y->scales[j] >> 4);
            for (int ii = 0; ii < 16; ++ii) {
                int l = nearest_int((x[16*j + ii] + m)/d);
                l = MAX(0, MIN(3, l));
                L[16*j + ii] = l;
            }
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            y->qs[j/4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6);
        }
    }
}

// ---- Q3_K: 16 sub-blocks of 16 -------------------------------------------------------------------------------

// quantize_row_q3_K_ref (qw null: make_q3_quants) / _impl (make_qx_quants with the weights).
SLING_DEV void sling_sub_q3_K(const float * x, const float * qw, int j, uint8_t * s) {
    float * f = (float *)s;
    int8_t * L = (int8_t *)(s + 16);
    if (!qw) {
        f[0] = make_q3_quants(16, 4, x + 16*j, L, true);
        f[2] = 0;
    } else {
        float weight[16];
        float sumx2 = 0;
        for (int l = 0; l < QK_K; ++l) sumx2 += x[l]*x[l];
        float sigma2 = 2*sumx2/QK_K;
        const float * w = qw + 16*j;
        for (int l = 0; l < 16; ++l) weight[l] = w[l] * sqrtf(sigma2 + x[16*j+l]*x[16*j+l]);
        float sumw = 0;
        for (int l = 0; l < 16; ++l) sumw += weight[l];
        f[2] = sumw;
        f[0] = make_qx_quants(16, 4, x + 16*j, L, 1, weight);
    }
    f[1] = 0;
}

SLING_DEV void sling_fin_q3_K(const float * x, const float * qw, const uint8_t * s, uint8_t * yb) {
    block_q3_K * y = (block_q3_K *)yb;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int j = 0; j < QK_K/16; ++j) {
        for (int l = 0; l < 16; ++l) L[16*j + l] = (int8_t)s[j*SLING_SUB_BYTES + 16 + l];
        scales[j] = ((const float *)(s + j*SLING_SUB_BYTES))[0];
    }
    if (!qw) {
        float max_scale = 0;
        float amax = 0;
        for (int j = 0; j < QK_K/16; ++j) {
            float scale = fabsf(scales[j]);
            if (scale > amax) {
                amax = scale; max_scale = scales[j];
            }
        }
        memset(y->scales, 0, 12);
        if (max_scale) {
            float iscale = -32.f/max_scale;
            for (int j = 0; j < QK_K/16; ++j) {
                int8_t l = nearest_int(iscale*scales[j]);
                l = MAX(-32, MIN(31, l)) + 32;
                if (j < 8) {
                    y->scales[j] = l & 0xF;
                } else {
                    y->scales[j-8] |= ((l & 0xF) << 4);
                }
                l >>= 4;
                y->scales[j%4 + 8] |= (l << (2*(j/4)));
            }
            y->d = GGML_FP32_TO_FP16(1/iscale);
        } else {
            y->d = GGML_FP32_TO_FP16(0.f);
        }
    } else {
        float sw[QK_K / 16];
        int8_t Ls[QK_K / 16];
        for (int j = 0; j < QK_K/16; ++j) sw[j] = ((const float *)(s + j*SLING_SUB_BYTES))[2];
        memset(y->scales, 0, 12);
        float d_block = make_qx_quants(QK_K/16, 32, scales, Ls, 1, sw);
        for (int j = 0; j < QK_K/16; ++j) {
            int l = Ls[j];
            if (j < 8) {
                y->scales[j] = l & 0xF;
            } else {
                y->scales[j-8] |= ((l & 0xF) << 4);
            }
            l >>= 4;
            y->scales[j%4 + 8] |= (l << (2*(j/4)));
        }
        y->d = GGML_FP32_TO_FP16(d_block);
    }

    int8_t sc;
    for (int j = 0; j < QK_K/16; ++j) {
        sc = j < 8 ? y->scales[j] & 0xF : y->scales[j-8] >> 4;
        sc = (sc | (((y->scales[8 + j%4] >> (2*(j/4))) & 3) << 4)) - 32;
        float d = GGML_FP16_TO_FP32(y->d) * sc;
        if (!d) {
            continue;
        }
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16*j + ii]/d);
            l = MAX(-4, MIN(3, l));
            L[16*j + ii] = l + 4;
        }
    }

    memset(y->hmask, 0, QK_K/8);
    // We put the high-bit for the 1st 8 quants into bit 0, the next 8 into bit 1, etc.
    int m = 0;
    uint8_t hm = 1;
    for (int j = 0; j < QK_K; ++j) {
        if (L[j] > 3) {
            y->hmask[m] |= hm;
            L[j] -= 4;
        }
        if (++m == QK_K/8) {
            m = 0; hm <<= 1;
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            y->qs[j/4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6);
        }
    }
}

// (ggml type name, values per block, bytes per block, sub-blocks per block). The Rust side holds the same table
// (sling_kernels::cu::SPLIT).
#define SLING_SPLIT_TYPES(X) \
    X(q2_K, 256, 84, 16) X(q3_K, 256, 110, 16) X(q4_K, 256, 144, 8) X(q5_K, 256, 176, 8) X(q6_K, 256, 210, 16)

#define SLING_DEFINE_SPLIT(T, QK, BYTES, SUBS)                                                              \
    SLING_KERNEL void sling_sub_##T##_k(const float * x, const float * qw, uint8_t * scratch, int64_t nblocks, \
                                        int blocks_per_row) {                                               \
        const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;                                     \
        if (i >= nblocks*SUBS) return;                                                                      \
        const int64_t blk = i / SUBS;                                                                       \
        const int j = (int)(i - blk*SUBS);                                                                  \
        const int64_t b = blk % blocks_per_row;                                                             \
        sling_sub_##T(x + blk*QK, qw ? qw + b*QK : 0, j, scratch + i*SLING_SUB_BYTES);                       \
    }                                                                                                       \
    SLING_KERNEL void sling_fin_##T##_k(const float * x, const float * qw, const uint8_t * scratch, uint8_t * y, \
                                        int64_t nblocks, int blocks_per_row) {                              \
        const int64_t i = (int64_t)blockIdx.x*blockDim.x + threadIdx.x;                                     \
        if (i >= nblocks) return;                                                                           \
        const int64_t b = i % blocks_per_row;                                                               \
        uint8_t * yb = y + i*BYTES;                                                                         \
        for (int k = 0; k < BYTES; ++k) yb[k] = 0;                                                          \
        sling_fin_##T(x + i*QK, qw ? qw + b*QK : 0, scratch + i*SUBS*SLING_SUB_BYTES, yb);                    \
    }
SLING_SPLIT_TYPES(SLING_DEFINE_SPLIT)
