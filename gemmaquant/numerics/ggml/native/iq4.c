/* Whole IQ4_NL / IQ4_XS quantizers: iq4.py's quantize_iq4_nl / quantize_iq4_xs (the specification;
 * llama.cpp's quantize_row_iq4_nl_impl with 7 tries) in C. Same tiling as search.c: TM 32-weight
 * sub-blocks at a time in a local [32][TM] array, every loop over the tile innermost, so the
 * compiler vectorizes across sub-blocks while each lane adds its sub-block's 32 terms in order from
 * 0.0f. The nearest level is found without a branch (the levels are sorted): the last level <= v
 * and the one after it by selects, then ggml's `v - lo < hi - v` in float32, which also gives
 * ggml's answer at both ends and for NaN (level 15). Operand order and divisions as iq4.py's; fp16
 * is IEEE round to nearest even; sqrt goes through double (correctly rounded, as sqrtf).
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define TM 32 /* sub-blocks per tile: a multiple of 8, so an IQ4_XS block never straddles two tiles */

/* kvalues_iq4nl; a constant, so that the compiler keeps the levels in registers (a table passed at
 * run time made the search 15x slower). gq_quantize_iq4 refuses a caller whose table differs. */
static const float KV[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                             1.f,    13.f,   25.f,  38.f,  53.f,  69.f,  89.f,  113.f};

/* best_index_int8(16, KV, v) as a level (returned) and its index; KV: the 16 levels, ascending. */
static inline float nearest_level(float v, int *index) {
    float lo = KV[0], hi = KV[1];
    int mu = 1;
    for (int k = 1; k < 15; k++) {
        int t = !(v < KV[k]); /* NaN climbs to the top, as ggml's binary search does */
        lo = t ? KV[k] : lo;
        hi = t ? KV[k + 1] : hi;
        mu = t ? k + 1 : mu;
    }
    int below = (v - lo) < (hi - v);
    *index = below ? mu - 1 : mu;
    return below ? lo : hi;
}

/* Σ (w*q)*x and Σ (w*q)*q over each lane's 32 weights, q the level nearest to id*x. */
static void sums(float (*xt)[TM], float (*wt)[TM], const float *id, float *sqx, float *sq2) {
    for (int j = 0; j < TM; j++) sqx[j] = sq2[j] = 0.0f;
    for (int i = 0; i < 32; i++) {
        for (int j = 0; j < TM; j++) {
            int idx;
            float q = nearest_level(id[j] * xt[i][j], &idx);
            float wq = wt[i][j] * q;
            sqx[j] += wq * xt[i][j];
            sq2[j] += wq * q;
        }
    }
}

/* x: [nb, sbs] (sbs 32: IQ4_NL, 256: IQ4_XS); imatrix: [bpr * sbs] or NULL; kv: the 16 levels
 * (kvalues_iq4nl, ascending); out: [nb, 18 | 136]. Returns 0, -1 when out of memory, -2 when kv is
 * not this file's table. */
int gq_quantize_iq4(const float *x, const float *imatrix, int64_t nb, int64_t bpr, int sbs, const float *kv,
                    uint8_t *out) {
    for (int k = 0; k < 16; k++)
        if (kv[k] != KV[k]) return -2;
    const int per = sbs / 32, nbytes = sbs == 32 ? 18 : 136;
    const int64_t M = nb * per; /* sub-blocks */
    float *sigma2 = imatrix ? malloc(sizeof(float) * (nb > 0 ? nb : 1)) : NULL;
    if (imatrix && !sigma2) return -1;
    if (imatrix) {
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.0f;
            for (int k = 0; k < sbs; k++) s += x[b * sbs + k] * x[b * sbs + k];
            sigma2[b] = s * (2.0f / (float)sbs); /* a power of two: exact */
        }
    }
    float xt[32][TM], wt[32][TM];
    for (int64_t j0 = 0; j0 < M; j0 += TM) {
        int n = M - j0 < TM ? (int)(M - j0) : TM;
        for (int i = 0; i < 32; i++) {
            for (int j = 0; j < n; j++) xt[i][j] = x[(j0 + j) * 32 + i];
            for (int j = n; j < TM; j++) xt[i][j] = 0.0f;
        }
        if (imatrix) {
            for (int j = 0; j < TM; j++) {
                int64_t m = j < n ? j0 + j : j0; /* the padding reuses a live lane's weights */
                const float *qw = imatrix + (m / per % bpr) * sbs + (m % per) * 32;
                float s2 = sigma2[m / per];
                for (int i = 0; i < 32; i++) wt[i][j] = qw[i] * sqrt_f(s2 + xt[i][j] * xt[i][j]);
            }
        } else {
            for (int i = 0; i < 32; i++)
                for (int j = 0; j < TM; j++) wt[i][j] = xt[i][j] * xt[i][j];
        }
        float amax[TM], mx[TM];
        for (int j = 0; j < TM; j++) amax[j] = mx[j] = 0.0f;
        for (int i = 0; i < 32; i++) {
            for (int j = 0; j < TM; j++) {
                float v = xt[i][j], a = v < 0.0f ? -v : v;
                int take = a > amax[j];
                amax[j] = take ? a : amax[j];
                mx[j] = take ? v : mx[j];
            }
        }
        float id[TM], sqx[TM], sq2[TM], d[TM], best[TM];
        for (int j = 0; j < TM; j++) id[j] = 1.0f / (-mx[j] / KV[0]);
        sums(xt, wt, id, sqx, sq2);
        for (int j = 0; j < TM; j++) {
            float s = sqx[j] / sq2[j];
            d[j] = sq2[j] > 0.0f ? s : 0.0f;
            best[j] = d[j] * sqx[j];
        }
        for (int itry = -7; itry <= 7; itry++) {
            float c = (float)(itry - 127);
            for (int j = 0; j < TM; j++) id[j] = c / mx[j];
            sums(xt, wt, id, sqx, sq2);
            for (int j = 0; j < TM; j++) {
                int take = (sq2[j] > 0.0f) & (sqx[j] * sqx[j] > best[j] * sq2[j]);
                float s = sqx[j] / sq2[j];
                d[j] = take ? s : d[j];
                best[j] = take ? d[j] * sqx[j] : best[j];
            }
        }
        for (int j = 0; j < TM; j++) d[j] = amax[j] < GROUP_MAX_EPS ? 0.0f : d[j];

        /* the multiplier of each sub-block's final codes, and the block headers */
        float idl[TM];
        for (int j = 0; j < n; j += per) {
            uint8_t *o = out + (j0 + j) / per * nbytes;
            if (per == 1) {
                put_f16(o, f32_to_f16(d[j]));
                idl[j] = d[j] != 0.0f ? 1.0f / d[j] : 0.0f;
                continue;
            }
            float amax_s = 0.0f, max_s = 0.0f;
            for (int s = 0; s < per; s++) {
                float a = d[j + s] < 0.0f ? -d[j + s] : d[j + s];
                if (a > amax_s) {
                    amax_s = a;
                    max_s = d[j + s];
                }
            }
            float db = -max_s / 32.0f;
            float ib = db != 0.0f ? 1.0f / db : 0.0f;
            uint16_t high = 0;
            uint8_t low[4] = {0, 0, 0, 0};
            for (int s = 0; s < per; s++) {
                int32_t l = nearest_int(ib * d[j + s]);
                l = l < -32 ? -32 : l > 31 ? 31 : l;
                float dl = db * (float)l;
                idl[j + s] = dl != 0.0f ? 1.0f / dl : 0.0f;
                l += 32;
                low[s / 2] |= (uint8_t)((l & 15) << (4 * (s % 2)));
                high |= (uint16_t)((l >> 4) << (2 * s));
            }
            put_f16(o, f32_to_f16(db));
            put_f16(o + 2, high);
            memcpy(o + 4, low, 4);
        }
        for (int j = n; j < TM; j++) idl[j] = 0.0f;
        uint8_t L[32][TM];
        for (int i = 0; i < 32; i++) {
            for (int j = 0; j < TM; j++) {
                int idx;
                nearest_level(idl[j] * xt[i][j], &idx);
                L[i][j] = (uint8_t)idx;
            }
        }
        for (int j = 0; j < n; j++) {
            int64_t m = j0 + j;
            uint8_t *qs = out + m / per * nbytes + (per == 1 ? 2 : 8) + (m % per) * 16;
            for (int i = 0; i < 16; i++) qs[i] = (uint8_t)(L[i][j] | (L[16 + i][j] << 4));
        }
    }
    free(sigma2);
    return 0;
}
