/* Row helpers shared by the C passes (included by rowwise_fq.c and w8a8.c; hashed with them). */
#ifndef HWAWARE_ROWS_H
#define HWAWARE_ROWS_H
#include <math.h>
#include <stdint.h>

/* max |x[c]| over c < cols; *bad = 1 when an entry is NaN or infinite (the max then skips it) */
static inline float row_absmax(const float *x, int64_t cols, int *bad) {
    float m = 0.0f;
    int b = 0;
#pragma omp simd reduction(max : m) reduction(| : b)
    for (int64_t c = 0; c < cols; ++c) {
        float a = fabsf(x[c]);
        b |= !(a <= 3.4028234663852886e+38f);
        m = a > m ? a : m;
    }
    *bad = b;
    return m;
}
#endif
