/* Whole Q3_K quantizer: kquants_low.py's quantize_q3_k (the specification) in C, with and without
 * an imatrix, so that a chunk makes one call. Without an imatrix (llama.cpp's
 * quantize_row_q3_K_ref) the search is make_q3_quants, written here on search.c's tiling: TM
 * sub-blocks of 16 in a local [16][TM] array, loops over the tile innermost (vectorized across
 * sub-blocks), each lane's coordinate descent strictly in ggml's weight order; a pass that changes
 * no sub-block of the tile ends the tile's passes (a pass without change is a no-op, as in C). With
 * an imatrix it is search.c's make_qx_quants twice (the weights, then the 16 scales of each block).
 * Operand order and divisions as kquants_low.py's; fp16 round to nearest even.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define TM 32

/* make_q3_quants(16, nmax, x, L, do_rmse=true) on the M sub-blocks of x [M, 16] (the rows as they
 * are: no transposed copy): scale [M], L [M, 16] in 0..2*nmax-1. */
static void make_q3_quants(const float *x, int64_t M, int nmax, float *scale_out, int32_t *L_out) {
    float xt[16][TM], wt[16][TM], wxt[16][TM], lt[16][TM];
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    for (int64_t j0 = 0; j0 < M; j0 += TM) {
        int n = M - j0 < TM ? (int)(M - j0) : TM;
        for (int i = 0; i < 16; i++) {
            for (int j = 0; j < n; j++) xt[i][j] = x[(j0 + j) * 16 + i];
            for (int j = n; j < TM; j++) xt[i][j] = 0.0f;
        }
        float amax[TM], mx[TM], iscale[TM], sumlx[TM], suml2[TM];
        for (int j = 0; j < TM; j++) amax[j] = mx[j] = sumlx[j] = suml2[j] = 0.0f;
        for (int i = 0; i < 16; i++) {
            for (int j = 0; j < TM; j++) {
                float v = xt[i][j], a = v < 0.0f ? -v : v;
                int take = a > amax[j];
                amax[j] = take ? a : amax[j];
                mx[j] = take ? v : mx[j];
            }
        }
        for (int j = 0; j < TM; j++) iscale[j] = lo / mx[j];
        for (int i = 0; i < 16; i++) {
            for (int j = 0; j < TM; j++) {
                float l = (float)nearest_int(iscale[j] * xt[i][j]);
                l = l < lo ? lo : l;
                l = l > hi ? hi : l;
                lt[i][j] = l;
                wt[i][j] = xt[i][j] * xt[i][j];
                wxt[i][j] = wt[i][j] * xt[i][j];
                sumlx[j] += wxt[i][j] * l;
                suml2[j] += (wt[i][j] * l) * l;
            }
        }
        for (int pass = 0; pass < 5; pass++) {
            int changed = 0;
            for (int i = 0; i < 16; i++) {
                for (int j = 0; j < TM; j++) {
                    float li = lt[i][j];
                    float slx = sumlx[j] - wxt[i][j] * li;
                    float sl2 = suml2[j] - (wt[i][j] * li) * li;
                    float nl = (float)nearest_int((xt[i][j] * sl2) / slx);
                    nl = nl < lo ? lo : nl;
                    nl = nl > hi ? hi : nl;
                    float slx_new = slx + wxt[i][j] * nl;
                    float sl2_new = sl2 + (wt[i][j] * nl) * nl;
                    int take = (slx > 0.0f) & (nl != li) & (sl2_new > 0.0f) &
                               ((slx_new * slx_new) * suml2[j] > (sumlx[j] * sumlx[j]) * sl2_new);
                    take &= j < n;
                    lt[i][j] = take ? nl : li;
                    sumlx[j] = take ? slx_new : sumlx[j];
                    suml2[j] = take ? sl2_new : suml2[j];
                    changed |= take;
                }
            }
            if (!changed) break;
        }
        for (int j = 0; j < n; j++) {
            float s = sumlx[j] / suml2[j];
            scale_out[j0 + j] = amax[j] < GROUP_MAX_EPS ? 0.0f : (suml2[j] > 0.0f ? s : 0.0f);
        }
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < n; j++)
                L_out[(j0 + j) * 16 + i] = amax[j] < GROUP_MAX_EPS ? 0 : (int32_t)lt[i][j] + nmax;
    }
}

/* x: [nb, 256]; imatrix: [bpr * 256] or NULL; grid4, grid32: make_qx_quants' numerators for nmax 4
 * and 32 (imatrix only); out: [nb, 110]. Returns 0, or -1 when out of memory. */
int gq_quantize_q3_k(const float *x, const float *imatrix, int64_t nb, int64_t bpr, const float *grid4,
                     const float *grid32, int ngrid, uint8_t *out) {
    int64_t M = nb * 16;
    float *xs = NULL, *scales = malloc(sizeof(float) * M);
    int32_t *L = malloc(sizeof(int32_t) * 256 * nb);
    float *w = NULL, *t16 = NULL, *s16 = NULL, *dblk = NULL;
    int32_t *lq = NULL;
    if (imatrix) {
        xs = malloc(sizeof(float) * 256 * nb);
        w = malloc(sizeof(float) * 256 * nb);
        t16 = malloc(sizeof(float) * M);
        s16 = malloc(sizeof(float) * M);
        dblk = malloc(sizeof(float) * nb);
        lq = malloc(sizeof(int32_t) * M);
    }
    int ok = scales && L && (!imatrix || (xs && w && t16 && s16 && dblk && lq));
    /* where code i of sub-block m is in L: [M, 16] from make_q3_quants, [16, M] from make_qx_quants */
    const int64_t at_i = imatrix ? M : 1, at_m = imatrix ? 1 : 16;
    if (ok) {
        if (!imatrix) {
            make_q3_quants(x, M, 4, scales, L);
        } else {
            columns(xs, x, nb, 16);
            imatrix_columns(w, imatrix, nb, bpr, 16);
            sigma_weights(x, xs, w, t16, nb, 16); /* t16: the sums, as scratch until the scales below */
            for (int64_t b = 0; b < nb; b++)
                for (int s = 0; s < 16; s++) s16[s * nb + b] = t16[b * 16 + s];
            gq_make_qx_quants(xs, w, 16, M, 4, grid4, ngrid, scales, L);
            for (int64_t b = 0; b < nb; b++)
                for (int s = 0; s < 16; s++) t16[s * nb + b] = scales[b * 16 + s];
            gq_make_qx_quants(t16, s16, 16, nb, 32, grid32, ngrid, dblk, lq);
        }
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + b * 110;
            const float *xb = x + b * 256;
            int32_t l[16];
            uint16_t d16;
            if (!imatrix) {
                const float *sv = scales + b * 16;
                float amax = 0.0f, max_scale = 0.0f;
                for (int s = 0; s < 16; s++) {
                    float a = sv[s] < 0.0f ? -sv[s] : sv[s];
                    if (a > amax) {
                        amax = a;
                        max_scale = sv[s];
                    }
                }
                if (max_scale != 0.0f) { /* C's `if (max_scale)` (NaN too) */
                    float iscale = -32.0f / max_scale;
                    for (int s = 0; s < 16; s++) {
                        int8_t v = (int8_t)nearest_int(iscale * sv[s]); /* int8_t l = nearest_int(...) */
                        l[s] = (v < -32 ? -32 : v > 31 ? 31 : v) + 32;
                    }
                    d16 = f32_to_f16(1.0f / iscale);
                } else {
                    for (int s = 0; s < 16; s++) l[s] = 0; /* the memset scale bytes */
                    d16 = 0;
                }
            } else {
                for (int s = 0; s < 16; s++) l[s] = lq[s * nb + b];
                d16 = f32_to_f16(dblk[b]);
            }
            float df = f16_to_f32(d16);
            uint8_t q[256];
            for (int s = 0; s < 16; s++) {
                float d = df * (float)(l[s] - 32);
                for (int i = 0; i < 16; i++) {
                    int32_t v;
                    if (d != 0.0f) {
                        v = nearest_int(xb[16 * s + i] / d);
                        v = (v < -4 ? -4 : v > 3 ? 3 : v) + 4;
                    } else {
                        v = L[i * at_i + (b * 16 + s) * at_m]; /* keep the search's codes */
                    }
                    q[16 * s + i] = (uint8_t)v;
                }
            }
            uint8_t *hmask = o, *qs = o + 32, *sc = o + 96;
            memset(hmask, 0, 32);
            for (int k = 0; k < 8; k++)
                for (int i = 0; i < 32; i++) hmask[i] |= (uint8_t)((q[32 * k + i] >> 2) << k);
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < 32; i++) {
                    const uint8_t *qq = q + 128 * h + i;
                    qs[32 * h + i] =
                        (uint8_t)((qq[0] & 3) | ((qq[32] & 3) << 2) | ((qq[64] & 3) << 4) | ((qq[96] & 3) << 6));
                }
            memset(sc, 0, 12);
            for (int s = 0; s < 16; s++) {
                sc[s % 8] |= (uint8_t)((l[s] & 15) << (s < 8 ? 0 : 4));
                sc[8 + s % 4] |= (uint8_t)((l[s] >> 4) << (2 * (s / 4)));
            }
            put_f16(o + 108, d16);
        }
    }
    free(xs); free(scales); free(L); free(w); free(t16); free(s16); free(dblk); free(lq);
    return ok ? 0 : -1;
}
