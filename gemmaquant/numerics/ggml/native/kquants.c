/* Whole Q4_K / Q5_K / Q6_K quantizers: kquants.py's quantize_q45_k and quantize_q6_k (the
 * specification) in C around the searches of search.c, so that a chunk makes one call instead of
 * ~100 torch ops (which cost three times the searches themselves). Same layout and order as
 * kquants.py: the chunk is transposed to search.py's [P, M] layout, searched, then each block's
 * scales, final codes and bytes are made block by block. Every float expression keeps
 * kquants.py's operand order and division; fp16 is IEEE round to nearest even (torch's .to(float16),
 * ggml's GGML_FP32_TO_FP16); sqrt goes through double, as kquants.py's does.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

/* x: [nb, 256]; imatrix: [bpr * 256] or NULL; grid: make_qx_quants' 19 numerators for nmax 32;
 * out: [nb, 210]. Returns 0, or -1 when out of memory. */
int gq_quantize_q6_k(const float *x, const float *imatrix, int64_t nb, int64_t bpr, const float *grid, int ngrid,
                     uint8_t *out) {
    int64_t M = nb * 16;
    float *xs = malloc(sizeof(float) * 256 * nb), *qw = imatrix ? malloc(sizeof(float) * 256 * nb) : NULL;
    float *scales = malloc(sizeof(float) * M);
    int32_t *L = malloc(sizeof(int32_t) * 256 * nb);
    int ok = xs && scales && L && (qw || !imatrix);
    if (ok) {
        columns(xs, x, nb, 16);
        if (imatrix) imatrix_columns(qw, imatrix, nb, bpr, 16);
        gq_make_qx_quants(xs, qw, 16, M, 32, grid, ngrid, scales, L);
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + b * 210;
            const float *sb = scales + b * 16, *xb = x + b * 256;
            float amax = 0.0f, mx = 0.0f;
            for (int s = 0; s < 16; s++) {
                float a = sb[s] < 0.0f ? -sb[s] : sb[s];
                if (a > amax) {
                    amax = a;
                    mx = sb[s];
                }
            }
            if (amax < GROUP_MAX_EPS) { /* near-zero block: 210 zero bytes */
                memset(o, 0, 210);
                continue;
            }
            float iscale = -128.0f / mx;
            uint16_t d16 = f32_to_f16(1.0f / iscale);
            float df = f16_to_f32(d16);
            int8_t sc[16];
            uint8_t q[256];
            for (int s = 0; s < 16; s++) {
                int32_t l = nearest_int(iscale * sb[s]);
                sc[s] = (int8_t)(l > 127 ? 127 : l);
                float d = df * (float)sc[s];
                for (int i = 0; i < 16; i++) {
                    int32_t v;
                    if (d != 0.0f) {
                        v = nearest_int(xb[16 * s + i] / d);
                        v = (v < -32 ? -32 : v > 31 ? 31 : v) + 32;
                    } else {
                        v = L[i * M + b * 16 + s]; /* keep make_qx_quants' codes */
                    }
                    q[16 * s + i] = (uint8_t)v;
                }
            }
            for (int h = 0; h < 2; h++) { /* quarters k of half h: q[128h + 32k + l] */
                const uint8_t *qq = q + 128 * h;
                for (int l = 0; l < 32; l++) {
                    uint8_t q1 = qq[l], q2 = qq[32 + l], q3 = qq[64 + l], q4 = qq[96 + l];
                    o[64 * h + l] = (uint8_t)((q1 & 15) | ((q3 & 15) << 4));
                    o[64 * h + 32 + l] = (uint8_t)((q2 & 15) | ((q4 & 15) << 4));
                    o[128 + 32 * h + l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
                }
            }
            memcpy(o + 192, sc, 16);
            put_f16(o + 208, d16);
        }
    }
    free(xs);
    free(qw);
    free(scales);
    free(L);
    return ok ? 0 : -1;
}

/* Q4_K (nmax 15) / Q5_K (nmax 31). x: [nb, 256]; imatrix: [bpr * 256] or NULL; out: [nb, 144 | 176]. */
int gq_quantize_q45_k(const float *x, const float *imatrix, int64_t nb, int64_t bpr, int nmax, uint8_t *out) {
    int64_t M = nb * 8;
    float *xs = malloc(sizeof(float) * 256 * nb), *w = malloc(sizeof(float) * 256 * nb);
    float *scales = malloc(sizeof(float) * M), *mins = malloc(sizeof(float) * M);
    float *sw = malloc(sizeof(float) * M), *t8 = malloc(sizeof(float) * M), *s8 = malloc(sizeof(float) * M);
    float *dblk = malloc(sizeof(float) * nb), *mblk = malloc(sizeof(float) * nb);
    int32_t *L = malloc(sizeof(int32_t) * 256 * nb), *ls = malloc(sizeof(int32_t) * M), *lm = malloc(sizeof(int32_t) * M);
    int ok = xs && w && scales && mins && sw && t8 && s8 && dblk && mblk && L && ls && lm;
    int nbytes = nmax == 31 ? 176 : 144;
    if (ok) {
        columns(xs, x, nb, 32);
        if (!imatrix) {
            for (int64_t m = 0; m < M; m++) {
                float s = 0.0f;
                for (int i = 0; i < 32; i++) s += xs[i * M + m] * xs[i * M + m];
                float av_x = sqrt_f(s / 32.0f);
                for (int i = 0; i < 32; i++) {
                    float v = xs[i * M + m];
                    w[i * M + m] = av_x + (v < 0.0f ? -v : v);
                }
            }
            if (nmax == 15)
                gq_make_qkx(xs, w, 32, M, 15, -1.0f, 0.1f, 20, 0, 0, scales, mins, L);
            else
                gq_make_qkx(xs, w, 32, M, 31, -0.5f, 0.1f, 15, 0, 0, scales, mins, L);
        } else {
            imatrix_columns(w, imatrix, nb, bpr, 32);
            sigma_weights(x, xs, w, sw, nb, 32);
            gq_make_qkx(xs, w, 32, M, nmax, -0.9f, 0.05f, 36, 1, 0, scales, mins, L);
            /* make_qp_quants over the 8 scales (then mins) of each block: [8, nb] */
            for (int64_t b = 0; b < nb; b++)
                for (int j = 0; j < 8; j++) {
                    t8[j * nb + b] = scales[b * 8 + j];
                    s8[j * nb + b] = sw[b * 8 + j];
                }
            gq_make_qp_quants(t8, s8, 8, nb, 63, dblk, ls);
            for (int64_t b = 0; b < nb; b++)
                for (int j = 0; j < 8; j++) t8[j * nb + b] = mins[b * 8 + j];
            gq_make_qp_quants(t8, s8, 8, nb, 63, mblk, lm);
        }
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + b * nbytes;
            int32_t lsb[8], lmb[8];
            uint16_t d16, dmin16;
            if (!imatrix) {
                const float *sv = scales + b * 8, *mv = mins + b * 8;
                float max_scale = 0.0f, max_min = 0.0f;
                for (int j = 0; j < 8; j++) {
                    max_scale = sv[j] > max_scale ? sv[j] : max_scale;
                    max_min = mv[j] > max_min ? mv[j] : max_min;
                }
                float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
                float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
                for (int j = 0; j < 8; j++) {
                    int32_t a = nearest_int(inv_scale * sv[j]) & 0xFF, c = nearest_int(inv_min * mv[j]) & 0xFF;
                    lsb[j] = a > 63 ? 63 : a;
                    lmb[j] = c > 63 ? 63 : c;
                }
                d16 = f32_to_f16(max_scale / 63.0f);
                dmin16 = f32_to_f16(max_min / 63.0f);
            } else {
                for (int j = 0; j < 8; j++) {
                    lsb[j] = ls[j * nb + b];
                    lmb[j] = lm[j * nb + b];
                    if (nmax == 31) { /* only the Q5_K impl clamps; Q4_K packs the uint8 as is */
                        lsb[j] = lsb[j] > 63 ? 63 : lsb[j];
                        lmb[j] = lmb[j] > 63 ? 63 : lmb[j];
                    }
                }
                d16 = f32_to_f16(dblk[b]);
                dmin16 = f32_to_f16(mblk[b]);
            }
            uint8_t pk[12];
            for (int j = 0; j < 4; j++) {
                pk[j] = (uint8_t)((lsb[j] | ((lsb[j + 4] >> 4) << 6)) & 0xFF);
                pk[j + 4] = (uint8_t)((lmb[j] | ((lmb[j + 4] >> 4) << 6)) & 0xFF);
                pk[j + 8] = (uint8_t)(((lsb[j + 4] & 0xF) | ((lmb[j + 4] & 0xF) << 4)) & 0xFF);
            }
            float df = f16_to_f32(d16), dmf = f16_to_f32(dmin16);
            uint8_t q[256];
            for (int j = 0; j < 8; j++) { /* get_scale_min_k4 */
                int sc, mm;
                if (j < 4) {
                    sc = pk[j] & 63;
                    mm = pk[j + 4] & 63;
                } else {
                    sc = (pk[j + 4] & 0xF) | ((pk[j - 4] >> 6) << 4);
                    mm = (pk[j + 4] >> 4) | ((pk[j] >> 6) << 4);
                }
                float d = df * (float)sc, dm = dmf * (float)mm;
                for (int i = 0; i < 32; i++) {
                    int32_t v;
                    if (d != 0.0f) {
                        v = nearest_int((x[b * 256 + 32 * j + i] + dm) / d);
                        v = v < 0 ? 0 : v > nmax ? nmax : v;
                    } else {
                        v = L[i * M + b * 8 + j]; /* keep the search's codes */
                    }
                    q[32 * j + i] = (uint8_t)v;
                }
            }
            put_f16(o, d16);
            put_f16(o + 2, dmin16);
            memcpy(o + 4, pk, 12);
            uint8_t *qs = o + 16;
            if (nmax == 31) {
                uint8_t *qh = o + 16;
                qs = o + 48;
                for (int l = 0; l < 32; l++) {
                    uint8_t v = 0;
                    for (int c = 0; c < 4; c++)
                        v |= (uint8_t)(((q[64 * c + l] >> 4) << (2 * c)) | ((q[64 * c + 32 + l] >> 4) << (2 * c + 1)));
                    qh[l] = v;
                }
            }
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < 32; l++)
                    qs[32 * c + l] = (uint8_t)((q[64 * c + l] & 15) | ((q[64 * c + 32 + l] & 15) << 4));
        }
    }
    free(xs); free(w); free(scales); free(mins); free(sw); free(t8); free(s8);
    free(dblk); free(mblk); free(L); free(ls); free(lm);
    return ok ? 0 : -1;
}

/* For the tests: n float32 -> half bits, as the quantizers convert. */
void gq_f32_to_f16(const float *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_f16(x[i]);
}
