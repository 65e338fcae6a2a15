/* The scale searches of gemmaquant/numerics/ggml/search.py (make_qx_quants, make_qkx2/3,
 * make_qp_quants) as plain C, written from that module (its docstrings are the specification) and
 * built by native.py on first use with -O3 -ffp-contract=off, without -ffast-math.
 *
 * Layout as search.py: a [P, M] float32 chunk, row i = weight i of every sub-block, M contiguous.
 * The chunk is cut into tiles of TM sub-blocks copied to local [P][TM] arrays (in L1, no
 * aliasing, the tail padded), and every loop over a tile's sub-blocks is innermost, so that the
 * compiler vectorizes ACROSS sub-blocks: each lane still adds its sub-block's P terms strictly in
 * order from 0.0f (or from term 0 where search.py's seq_sum starts there), which is ggml's order.
 * No reassociation or FMA contraction is allowed by the flags, so every value is the one the plain
 * torch path computes. Numerics kept from search.py: divisions stay divisions, products keep their
 * (a*b)*c grouping, nearest_int is the float bit trick, uint8 stores wrap (& 0xFF).
 * Sub-blocks whose search runs on inf/NaN (all-zero ones, the padding) produce garbage that the
 * final masks (or the tile's tail) drop, exactly as in search.py.
 */
#include "common.h"

#ifndef TM
#define TM 32 /* sub-blocks per tile: two AVX-512 registers per state array (fastest of 8-256 at each ISA level) */
#endif
#define PMAX 32 /* largest sub-block: native.py runs larger ones on the plain path */

static void load_tile(float (*dst)[TM], const float *src, int64_t P, int64_t M, int64_t j0, int n) {
    for (int64_t i = 0; i < P; i++) {
        for (int j = 0; j < n; j++) dst[i][j] = src[i * M + j0 + j];
        for (int j = n; j < TM; j++) dst[i][j] = 0.0f;
    }
}

/* ---- make_qx_quants(n, nmax, x, L, rmse_type=1, qw) ---------------------------------------- */

static void qx_candidate(int64_t P, float (*xt)[TM], float (*wt)[TM], float (*wxt)[TM], const float *mx,
                         float c, int nmax, float *iscale, float *sumlx, float *suml2) {
    float lo = (float)-nmax, hi = (float)(nmax - 1);
    for (int j = 0; j < TM; j++) {
        iscale[j] = c / mx[j];
        sumlx[j] = 0.0f;
        suml2[j] = 0.0f;
    }
    for (int64_t i = 0; i < P; i++) {
        for (int j = 0; j < TM; j++) {
            float l = (float)nearest_int(xt[i][j] * iscale[j]);
            l = l < lo ? lo : l;
            l = l > hi ? hi : l;
            sumlx[j] += wxt[i][j] * l;
            suml2[j] += (wt[i][j] * l) * l;
        }
    }
}

/* x, qw (NULL: x*x): [P, M]. grid: the candidate iscale numerators in search order. Out: scale [M],
 * L [P, M] in 0..2*nmax-1. */
void gq_make_qx_quants(const float *x, const float *qw, int64_t P, int64_t M, int nmax, const float *grid,
                       int ngrid, float *scale_out, int32_t *L_out) {
    float xt[PMAX][TM], wt[PMAX][TM], wxt[PMAX][TM];
    for (int64_t j0 = 0; j0 < M; j0 += TM) {
        int n = M - j0 < TM ? (int)(M - j0) : TM;
        load_tile(xt, x, P, M, j0, n);
        if (qw) {
            load_tile(wt, qw, P, M, j0, n);
        } else {
            for (int64_t i = 0; i < P; i++)
                for (int j = 0; j < TM; j++) wt[i][j] = xt[i][j] * xt[i][j];
        }
        for (int64_t i = 0; i < P; i++)
            for (int j = 0; j < TM; j++) wxt[i][j] = wt[i][j] * xt[i][j];

        float amax[TM], mx[TM];
        for (int j = 0; j < TM; j++) amax[j] = mx[j] = 0.0f;
        for (int64_t i = 0; i < P; i++) {
            for (int j = 0; j < TM; j++) {
                float v = xt[i][j], a = v < 0.0f ? -v : v;
                int take = a > amax[j];
                amax[j] = take ? a : amax[j];
                mx[j] = take ? v : mx[j];
            }
        }
        float iscale[TM], sumlx[TM], suml2[TM], sel[TM], scale[TM], best[TM];
        qx_candidate(P, xt, wt, wxt, mx, grid[0], nmax, iscale, sumlx, suml2);
        for (int j = 0; j < TM; j++) {
            float s = sumlx[j] / suml2[j];
            scale[j] = suml2[j] != 0.0f ? s : 0.0f;
            best[j] = scale[j] * sumlx[j];
            sel[j] = iscale[j];
        }
        for (int g = 1; g < ngrid; g++) {
            qx_candidate(P, xt, wt, wxt, mx, grid[g], nmax, iscale, sumlx, suml2);
            for (int j = 0; j < TM; j++) {
                int take = (suml2[j] > 0.0f) & (sumlx[j] * sumlx[j] > best[j] * suml2[j]);
                float s = sumlx[j] / suml2[j];
                scale[j] = take ? s : scale[j];
                best[j] = take ? scale[j] * sumlx[j] : best[j];
                sel[j] = take ? iscale[j] : sel[j];
            }
        }
        for (int j = 0; j < n; j++) scale_out[j0 + j] = amax[j] < GROUP_MAX_EPS ? 0.0f : scale[j];
        for (int64_t i = 0; i < P; i++) {
            for (int j = 0; j < n; j++) {
                int32_t l = nearest_int(xt[i][j] * sel[j]);
                l = l < -nmax ? -nmax : l;
                l = l > nmax - 1 ? nmax - 1 : l;
                L_out[i * M + j0 + j] = amax[j] < GROUP_MAX_EPS ? 0 : l + nmax;
            }
        }
    }
}

/* ---- make_qkx2_quants / make_qkx3_quants --------------------------------------------------- */

/* x, w: [P, M]. Out: scale [M], the_min [M] (ggml's -min), L [P, M] in 0..nmax. use_mad: weighted
 * absolute instead of squared error (Q2_K). */
void gq_make_qkx(const float *x, const float *w, int64_t P, int64_t M, int nmax, float rmin, float rdelta,
                 int nstep, int qkx3, int use_mad, float *scale_out, float *min_out, int32_t *L_out) {
    float xt[PMAX][TM], wt[PMAX][TM], lt[PMAX][TM];
    const float fmax = (float)nmax;
    for (int64_t j0 = 0; j0 < M; j0 += TM) {
        int n = M - j0 < TM ? (int)(M - j0) : TM;
        load_tile(xt, x, P, M, j0, n);
        load_tile(wt, w, P, M, j0, n);

        float mn[TM], mx[TM], sum_w[TM], sum_x[TM];
        for (int j = 0; j < TM; j++) {
            mn[j] = mx[j] = xt[0][j];
            sum_w[j] = wt[0][j];
            sum_x[j] = wt[0][j] * xt[0][j];
        }
        for (int64_t i = 1; i < P; i++) {
            for (int j = 0; j < TM; j++) {
                float v = xt[i][j];
                mn[j] = v < mn[j] ? v : mn[j];
                mx[j] = v > mx[j] ? v : mx[j];
                sum_w[j] += wt[i][j];
                sum_x[j] += wt[i][j] * v;
            }
        }
        float iscale[TM], scale[TM], best[TM], cur_min[TM], sel_iscale[TM], sel_min[TM];
        for (int j = 0; j < TM; j++) {
            mn[j] = mn[j] > 0.0f ? 0.0f : mn[j];
            iscale[j] = fmax / (mx[j] - mn[j]);
            scale[j] = 1.0f / iscale[j];
            best[j] = 0.0f;
            cur_min[j] = sel_min[j] = mn[j];
            sel_iscale[j] = iscale[j];
        }
        for (int64_t i = 0; i < P; i++) {
            for (int j = 0; j < TM; j++) {
                float l = (float)nearest_int(iscale[j] * (xt[i][j] - mn[j]));
                l = l < 0.0f ? 0.0f : l;
                l = l > fmax ? fmax : l;
                float diff = (scale[j] * l + mn[j]) - xt[i][j];
                float e = use_mad ? (diff < 0.0f ? -diff : diff) : diff * diff;
                best[j] += wt[i][j] * e;
            }
        }
        for (int step = 0; step <= nstep; step++) {
            float c = (rmin + rdelta * (float)step) + fmax;
            float is[TM], sl[TM], sl2[TM], sxl[TM];
            for (int j = 0; j < TM; j++) {
                is[j] = c / (mx[j] - cur_min[j]);
                sl[j] = sl2[j] = sxl[j] = 0.0f;
            }
            for (int64_t i = 0; i < P; i++) {
                for (int j = 0; j < TM; j++) {
                    float l = (float)nearest_int((xt[i][j] - cur_min[j]) * is[j]);
                    l = l < 0.0f ? 0.0f : l;
                    l = l > fmax ? fmax : l;
                    lt[i][j] = l;
                    float wl = wt[i][j] * l;
                    sl[j] += wl;
                    sl2[j] += wl * l;
                    sxl[j] += wl * xt[i][j];
                }
            }
            float D[TM], ts[TM], tm[TM], err[TM];
            for (int j = 0; j < TM; j++) {
                D[j] = sum_w[j] * sl2[j] - sl[j] * sl[j];
                float s = (sum_w[j] * sxl[j] - sum_x[j] * sl[j]) / D[j];
                float m = (sl2[j] * sum_x[j] - sl[j] * sxl[j]) / D[j];
                float s0 = sxl[j] / sl2[j];
                int clip = m > 0.0f;
                tm[j] = clip ? 0.0f : m;
                ts[j] = clip ? s0 : s;
                err[j] = 0.0f;
            }
            if (use_mad) {
                for (int64_t i = 0; i < P; i++) {
                    for (int j = 0; j < TM; j++) {
                        float diff = (lt[i][j] * ts[j] + tm[j]) - xt[i][j];
                        err[j] += (diff < 0.0f ? -diff : diff) * wt[i][j];
                    }
                }
            } else {
                for (int64_t i = 0; i < P; i++) {
                    for (int j = 0; j < TM; j++) {
                        float diff = (lt[i][j] * ts[j] + tm[j]) - xt[i][j];
                        err[j] += (diff * diff) * wt[i][j];
                    }
                }
            }
            for (int j = 0; j < TM; j++) {
                int take = (D[j] > 0.0f) & (err[j] < best[j]);
                sel_iscale[j] = take ? is[j] : sel_iscale[j];
                sel_min[j] = take ? cur_min[j] : sel_min[j];
                best[j] = take ? err[j] : best[j];
                scale[j] = take ? ts[j] : scale[j];
                cur_min[j] = take ? tm[j] : cur_min[j];
            }
        }
        for (int j = 0; j < n; j++) {
            int degenerate = qkx3 ? mx[j] <= mn[j] : mx[j] == mn[j];
            scale_out[j0 + j] = degenerate ? 0.0f : scale[j];
            min_out[j0 + j] = -(degenerate ? mn[j] : cur_min[j]);
        }
        for (int64_t i = 0; i < P; i++) {
            for (int j = 0; j < n; j++) {
                int degenerate = qkx3 ? mx[j] <= mn[j] : mx[j] == mn[j];
                int32_t l = nearest_int((xt[i][j] - sel_min[j]) * sel_iscale[j]);
                l = l < 0 ? 0 : l;
                l = l > nmax ? nmax : l;
                L_out[i * M + j0 + j] = degenerate ? 0 : l;
            }
        }
    }
}

/* ---- make_qp_quants(n, nmax, x, L, quant_weights) ------------------------------------------ */

/* x, w: [P, M] (the P scales or mins of each of M blocks). Out: scale [M], L [P, M] holding the
 * uint8 values ggml stores. */
void gq_make_qp_quants(const float *x, const float *w, int64_t P, int64_t M, int nmax, float *scale_out,
                       int32_t *L_out) {
    float xt[PMAX][TM], wt[PMAX][TM], wxt[PMAX][TM];
    int32_t rows[PMAX][TM];
    const float fmax = (float)nmax;
    for (int64_t j0 = 0; j0 < M; j0 += TM) {
        int n = M - j0 < TM ? (int)(M - j0) : TM;
        load_tile(xt, x, P, M, j0, n);
        load_tile(wt, w, P, M, j0, n);

        float mx[TM], iscale[TM], best[TM];
        for (int j = 0; j < TM; j++) mx[j] = 0.0f;
        for (int64_t i = 0; i < P; i++)
            for (int j = 0; j < TM; j++) mx[j] = mx[j] > xt[i][j] ? mx[j] : xt[i][j];
        for (int j = 0; j < TM; j++) {
            iscale[j] = fmax / mx[j];
            best[j] = 0.0f;
        }
        for (int64_t i = 0; i < P; i++) {
            for (int j = 0; j < TM; j++) {
                float scale = 1.0f / iscale[j];
                float l = (float)(nearest_int(iscale[j] * xt[i][j]) & 0xFF);
                float diff = xt[i][j] - scale * l;
                best[j] += (wt[i][j] * diff) * diff;
            }
        }
        for (int step = -4; step <= 4; step++) {
            if (step == 0) continue;
            float c = 0.1f * (float)step + fmax;
            float isk[TM], sk[TM], mse[TM];
            for (int j = 0; j < TM; j++) {
                isk[j] = c / mx[j];
                sk[j] = 1.0f / isk[j];
                mse[j] = 0.0f;
            }
            for (int64_t i = 0; i < P; i++) {
                for (int j = 0; j < TM; j++) {
                    int32_t l = nearest_int(isk[j] * xt[i][j]);
                    l = l > nmax ? nmax : l;
                    float diff = xt[i][j] - sk[j] * (float)l;
                    mse[j] += (wt[i][j] * diff) * diff;
                }
            }
            for (int j = 0; j < TM; j++) {
                int take = mse[j] < best[j];
                best[j] = take ? mse[j] : best[j];
                iscale[j] = take ? isk[j] : iscale[j];
            }
        }
        float sumlx[TM], suml2[TM];
        for (int j = 0; j < TM; j++) sumlx[j] = suml2[j] = 0.0f;
        for (int64_t i = 0; i < P; i++) {
            for (int j = 0; j < TM; j++) {
                int32_t l0 = nearest_int(iscale[j] * xt[i][j]);
                l0 = l0 > nmax ? nmax : l0;
                rows[i][j] = l0 & 0xFF;  /* the uint8 L[i]; the sums use the int (IQ2_XXS: negative x) */
                float lf = (float)l0;
                wxt[i][j] = wt[i][j] * xt[i][j];
                sumlx[j] += wxt[i][j] * lf;
                suml2[j] += (wt[i][j] * lf) * lf;
            }
        }
        for (int pass = 0; pass < 5; pass++) {
            int changed = 0;
            for (int64_t i = 0; i < P; i++) {
                for (int j = 0; j < TM; j++) {
                    float li = (float)rows[i][j];
                    float slx = sumlx[j] - wxt[i][j] * li;
                    float sl2 = suml2[j] - (wt[i][j] * li) * li;
                    int32_t new_l = nearest_int((xt[i][j] * sl2) / slx);
                    new_l = new_l > nmax ? nmax : new_l;
                    float nl = (float)new_l;
                    float slx_new = slx + wxt[i][j] * nl;
                    float sl2_new = sl2 + (wt[i][j] * nl) * nl;
                    int take = (slx > 0.0f) & (sl2 > 0.0f) & (new_l != rows[i][j]) &
                               ((slx_new * slx_new) * suml2[j] > (sumlx[j] * sumlx[j]) * sl2_new);
                    take &= j < n;  /* the padding must not keep the loop going */
                    rows[i][j] = take ? (new_l & 0xFF) : rows[i][j];
                    sumlx[j] = take ? slx_new : sumlx[j];
                    suml2[j] = take ? sl2_new : suml2[j];
                    changed |= take;
                }
            }
            if (!changed) break;  /* a pass without change leaves every sub-block as it was */
        }
        for (int j = 0; j < n; j++) {
            int zero = mx[j] < GROUP_MAX_EPS;
            float s = sumlx[j] / suml2[j];
            scale_out[j0 + j] = zero ? 0.0f : (suml2[j] > 0.0f ? s : 0.0f);
        }
        for (int64_t i = 0; i < P; i++)
            for (int j = 0; j < n; j++) L_out[i * M + j0 + j] = mx[j] < GROUP_MAX_EPS ? 0 : rows[i][j];
    }
}

int gq_pmax(void) { return PMAX; }
