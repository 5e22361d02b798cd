/* Row-wise (FBGEMM layout) table rows, shared by the bag pass (bags.c) and the interaction that reads
 * the tables itself (interact.c); hashed with the sources. A table is uint8 [rows, cols]: 8-bit rows
 * hold dim codes then float32 scale and bias, 4-bit rows dim nibbles (low first) then float16 scale
 * and bias. A row's value is fma(scale, code, bias + 0) per column, as fbgemm computes a one-id bag. */
#ifndef HWAWARE_TABLES_H
#define HWAWARE_TABLES_H
#include <stdint.h>
#include <string.h>

static inline int64_t id_at(const void *idx, int is64, int64_t k) {
    return is64 ? ((const int64_t *)idx)[k] : ((const int32_t *)idx)[k];
}

/* The row of the id at position k, or NULL (and *oob = 1) when the id is outside [0, r) */
static inline const uint8_t *row_at(const uint8_t *w, int64_t r, int64_t c, const void *idx, int is64, int64_t k,
                                    int *oob) {
    const int64_t id = id_at(idx, is64, k);
    if ((uint64_t)id >= (uint64_t)r) {
        *oob = 1;
        return NULL;
    }
    return w + id * c;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define BAG_LANES 16
static inline __mmask16 lanes_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* Columns d0 .. d0 + len - 1 (len <= 16) of a row as floats, and the row's scale and bias */
static inline __m512 row_codes(const uint8_t *row, int64_t c, int b8, int64_t d0, int64_t len, __m512 *vs, __m512 *vz) {
    if (b8) {
        float sb[2];
        memcpy(sb, row + c - 8, sizeof sb);
        *vs = _mm512_set1_ps(sb[0]);
        *vz = _mm512_set1_ps(sb[1]);
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes_mask(len), row + d0)));
    }
    uint16_t hb[2];
    memcpy(hb, row + c - 4, sizeof hb);
    *vs = _mm512_set1_ps(_cvtsh_ss(hb[0])); /* F16C: exact */
    *vz = _mm512_set1_ps(_cvtsh_ss(hb[1]));
    const __m128i packed = _mm_maskz_loadu_epi8(lanes_mask((len + 1) / 2), row + d0 / 2);
    const __m128i lo = _mm_and_si128(packed, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))); /* d even: low nibble */
}

/* Columns d0 .. d0 + len - 1 (len <= 16) of the one-id bag of `row`, the value a bag pass writes */
static inline __m512 row_value16(const uint8_t *row, int64_t c, int b8, int64_t d0, int64_t len) {
    __m512 vs, vz;
    const __m512 codes = row_codes(row, c, b8, d0, len, &vs, &vz);
    /* + 0.0f: fma(scale, code, 0 + bias) as a bag's first step computes it (-0.0 bias becomes +0.0) */
    return _mm512_fmadd_ps(vs, codes, _mm512_add_ps(vz, _mm512_setzero_ps()));
}
#define HAVE_ROW_VALUE16 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BAG_LANES 16
/* Columns d0 .. d0 + 7 of the one-id bag of `row` (those at or past len: 0), the value a bag pass
 * writes, fma(scale, code, 0 + bias). Reads 8 bytes (8-bit) or 4 (4-bit) of codes from column d0
 * on: inside the row, whose scale and bias follow its codes. */
static inline __m256 row_value8(const uint8_t *row, int64_t c, int b8, int64_t d0, int64_t len) {
    __m256 vs, vz, codes;
    if (b8) {
        float sb[2];
        int64_t raw;
        memcpy(sb, row + c - 8, sizeof sb);
        memcpy(&raw, row + d0, sizeof raw);
        vs = _mm256_set1_ps(sb[0]);
        vz = _mm256_set1_ps(sb[1]);
        codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(raw)));
    } else {
        uint16_t hb[2];
        int32_t raw;
        memcpy(hb, row + c - 4, sizeof hb);
        memcpy(&raw, row + d0 / 2, sizeof raw);
        vs = _mm256_set1_ps(_cvtsh_ss(hb[0])); /* F16C: exact */
        vz = _mm256_set1_ps(_cvtsh_ss(hb[1]));
        const __m128i packed = _mm_cvtsi32_si128(raw);
        const __m128i lo = _mm_and_si128(packed, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
        codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))); /* d even: low nibble */
    }
    const __m256 v = _mm256_fmadd_ps(vs, codes, _mm256_add_ps(vz, _mm256_setzero_ps()));
    if (len >= 8) return v;
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)len), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_ps(v, _mm256_castsi256_ps(keep));
}
#define HAVE_ROW_VALUE8 1
#else
#define BAG_LANES 16
#endif


/* 1 with info = (table, id) for the first id outside [0, rows[t]) in table then position order, else 0 */
static inline int first_bad_id(const int64_t *rows, int64_t ntab, const void *idx, int is64, int64_t ts, int64_t is, int64_t n,
                        int64_t *info) {
    for (int64_t t = 0; t < ntab; ++t)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t id = id_at(idx, is64, t * ts + i * is);
            if ((uint64_t)id >= (uint64_t)rows[t]) {
                info[0] = t;
                info[1] = id;
                return 1;
            }
        }
    return 0;
}

#endif
