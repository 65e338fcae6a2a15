/* Shared by the native sources (native.py compiles them into one library). */
#ifndef GQ_COMMON_H
#define GQ_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GROUP_MAX_EPS 1e-15f

/* ggml's nearest_int: round half to even below 2^22, its mantissa bits beyond. */
static inline int32_t nearest_int(float v) {
    float t = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &t, sizeof i);
    return (i & 0x007FFFFF) - 0x00400000;
}

/* float32 -> IEEE half bits, round to nearest even; overflow to inf. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7FFFFFFF;
    if (ax >= 0x7F800000) return sign | (ax > 0x7F800000 ? 0x7E00 : 0x7C00);
    if (ax >= 0x477FF000) return sign | 0x7C00; /* >= 65520 rounds to inf */
    if (ax < 0x38800000) {                      /* below 2^-14: a subnormal half (or 2^-14 itself) */
        float a;
        memcpy(&a, &ax, sizeof a);
        /* a * 2^24 is exact (a power-of-two scale into range) and < 2^10: the 1.5*2^23 trick rounds it */
        float t = a * 16777216.0f + 12582912.0f;
        uint32_t ti;
        memcpy(&ti, &t, sizeof ti);
        return sign | (uint16_t)(ti - 0x4B400000u);
    }
    uint32_t h = ((ax >> 23) - 112) << 10 | ((ax >> 13) & 0x3FF); /* rebias 127 -> 15 */
    uint32_t rem = ax & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* a carry moves into the exponent, as it should */
    return sign | (uint16_t)h;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF, x;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f; /* m * 2^-24: exact */
        memcpy(&x, &v, sizeof x);
        x |= sign;
    } else if (e == 31) {
        x = sign | 0x7F800000 | (m << 13);
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static inline void put_f16(uint8_t *p, uint16_t h) {
    p[0] = (uint8_t)(h & 0xFF);
    p[1] = (uint8_t)(h >> 8);
}
/* [nb, 256] rows -> [width, nb*256/width]: one column per sub-block (kquants._columns). */
static inline void columns(float *dst, const float *src, int64_t nb, int width) {
    int64_t M = nb * (256 / width);
    for (int64_t m = 0; m < M; m++)
        for (int i = 0; i < width; i++) dst[i * M + m] = src[m * width + i];
}

/* The importance of block b's column i (the imatrix row repeats every `bpr` blocks). */
static inline void imatrix_columns(float *dst, const float *im, int64_t nb, int64_t bpr, int width) {
    int per = 256 / width;
    int64_t M = nb * per;
    for (int64_t m = 0; m < M; m++) {
        const float *src = im + (m / per % bpr) * 256 + (m % per) * width;
        for (int i = 0; i < width; i++) dst[i * M + m] = src[i];
    }
}

/* sqrtf as ggml's reference C computes it through double (the same float for every input). */
static inline float sqrt_f(float v) { return (float)sqrt((double)v); }

/* ggml's imatrix weighting of the K-quants: w = imatrix * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) over
   each 256-value block, on the [width, M] columns xs (w holds the imatrix columns on entry); sums[m]: the
   sum of sub-block m's weights in order from 0.0f. x: [nb, 256]. */
static inline void sigma_weights(const float *x, const float *xs, float *w, float *sums, int64_t nb, int width) {
    int per = 256 / width;
    int64_t M = nb * per;
    for (int64_t b = 0; b < nb; b++) {
        float s = 0.0f;
        for (int k = 0; k < 256; k++) s += x[b * 256 + k] * x[b * 256 + k];
        float sigma2 = (2.0f * s) / 256.0f;
        for (int64_t m = b * per; m < b * per + per; m++) {
            float sum = 0.0f;
            for (int i = 0; i < width; i++) {
                float v = xs[i * M + m];
                w[i * M + m] = w[i * M + m] * sqrt_f(sigma2 + v * v);
                sum += w[i * M + m];
            }
            sums[m] = sum;
        }
    }
}

void gq_make_qx_quants(const float *x, const float *qw, int64_t P, int64_t M, int nmax, const float *grid,
                       int ngrid, float *scale_out, int32_t *L_out);
void gq_make_qkx(const float *x, const float *w, int64_t P, int64_t M, int nmax, float rmin, float rdelta,
                 int nstep, int qkx3, int use_mad, float *scale_out, float *min_out, int32_t *L_out);
void gq_make_qp_quants(const float *x, const float *w, int64_t P, int64_t M, int nmax, float *scale_out,
                       int32_t *L_out);
#endif
