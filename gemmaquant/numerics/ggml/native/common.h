/* Shared by the native sources (native.py compiles them into one library). */
#ifndef GQ_COMMON_H
#define GQ_COMMON_H
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

void gq_make_qx_quants(const float *x, const float *qw, int64_t P, int64_t M, int nmax, const float *grid,
                       int ngrid, float *scale_out, int32_t *L_out);
void gq_make_qkx(const float *x, const float *w, int64_t P, int64_t M, int nmax, float rmin, float rdelta,
                 int nstep, int qkx3, int use_mad, float *scale_out, float *min_out, int32_t *L_out);
void gq_make_qp_quants(const float *x, const float *w, int64_t P, int64_t M, int nmax, float *scale_out,
                       int32_t *L_out);
#endif
