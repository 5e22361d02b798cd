/* Row-wise dynamic fake quantization in one call per tensor (see hwaware/quant/native.py).
 *
 * Bit-identical to the eager torch path in hwaware/quant/primitives.py: same float32 operations
 * in the same order (x * (1/s) for symmetric, (x - off) / s for the FBGEMM float-offset layout),
 * round half to even (nearbyintf in the default rounding mode), fp16 scale/offset rounding to
 * nearest even, and no fused multiply-add (built with -ffp-contract=off). A row holding NaN/inf
 * gets a NaN scale, so the caller's deferred finiteness check still names the layer.
 */
#include <math.h>
#include <stdint.h>

#include "rows.h"

#define EPS 1.1920928955078125e-07f /* torch.finfo(torch.float32).eps */
#define F16_TINY 6.103515625e-05f   /* torch.finfo(torch.float16).tiny */
#define F16_MAX 65504.0f
#define OFFSET_FLUSH 5.421010862427522e-20f /* 2^-64 */

static inline float round_f16(float v) {
    v = v < F16_TINY ? F16_TINY : (v > F16_MAX ? F16_MAX : v);
    return (float)(_Float16)v;
}

/* y = clamp(round(x * (1/s)), +-qmax) * s per row, s = max(max|x| / qmax, eps); scale_out[r] = s (NaN if the
 * row is not finite). The clamp changes a value only when an fp16 scale saturated at its maximum. */
void hw_fq_sym_rows(const float *x, float *y, float *scale_out, int64_t rows, int64_t cols, int qmax, int fp16_scale) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        int bad;
        float m = row_absmax(xr, cols, &bad);
        float s = m / (float)qmax;
        s = s < EPS ? EPS : s;
        if (fp16_scale) s = round_f16(s);
        float inv = 1.0f / s;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            float q = nearbyintf(xr[c] * inv);
            q = q > (float)qmax ? (float)qmax : (q < -(float)qmax ? -(float)qmax : q);
            yr[c] = q * s;
        }
        scale_out[r] = bad ? NAN : s;
    }
}

/* FBGEMM row-wise: s = max((max - min) / qmax, eps), off = min (fp16-rounded when asked);
 * y = clamp(round((x - off) / s), 0, qmax) * s + off. */
void hw_fq_affine_rows(const float *x, float *y, float *scale_out, float *offset_out, int64_t rows, int64_t cols, int qmax, int fp16) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        float mn = xr[0], mx = xr[0];
        int bad = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : bad)
        for (int64_t c = 0; c < cols; ++c) {
            float v = xr[c];
            bad |= !(fabsf(v) <= 3.4028234663852886e+38f);
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        float s = (mx - mn) / (float)qmax;
        s = s < EPS ? EPS : s;
        float off = mn;
        if (fp16) {
            s = round_f16(s);
            off = (float)(_Float16)mn;
        }
        if (fabsf(off) < OFFSET_FLUSH) off = 0.0f; /* see OFFSET_FLUSH in primitives.py */
        const float lo = 0.0f, hi = (float)qmax;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            float q = nearbyintf((xr[c] - off) / s);
            q = q < lo ? lo : (q > hi ? hi : q);
            yr[c] = q * s + off;
        }
        scale_out[r] = bad ? NAN : s;
        offset_out[r] = off;
    }
}
