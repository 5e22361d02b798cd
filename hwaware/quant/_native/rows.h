/* Row helpers shared by the C passes (included by rowwise_fq.c and w8a8.c; hashed with them). */
#ifndef HWAWARE_ROWS_H
#define HWAWARE_ROWS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* Floats v -> int8 codes clamp(round_half_even(v * inv), +-127), as quantize_per_token_ref makes
 * them: per-token quantization (w8a8.c) and the interaction's codes (interact.c) share it. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline void codes16(__m512 v, __m512 inv, __mmask16 k, int8_t *dst) { /* lanes in k */
    v = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    _mm512_mask_cvtepi32_storeu_epi8(dst, k, _mm512_cvtps_epi32(v));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline void codes8(__m256 v, __m256 inv, int64_t cnt, int8_t *dst) { /* the first cnt (<= 8) lanes */
    v = _mm256_round_ps(_mm256_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)); /* in +-127: exact */
    const __m128i b8 = _mm_packs_epi16(w16, w16);
    if (cnt >= 8) {
        _mm_storel_epi64((__m128i *)dst, b8);
    } else {
        int8_t tmp[16];
        _mm_storeu_si128((__m128i *)tmp, b8);
        memcpy(dst, tmp, (size_t)cnt);
    }
}
#endif
#endif
