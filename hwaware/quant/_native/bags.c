/* Bounds check of an embedding-bag call in one pass (see hwaware/ops, embedding_bag_rowwise).
 *
 * fbgemm's row-wise bag kernels read out of bounds rather than raising, so every call checks its
 * index and offset values first, once per lookup (a DLRM forward makes 26): here in one pass instead
 * of several numpy reductions (benchmarks/bench_ops_cpu.py times it). Returns 0 when the call is
 * valid, else the first failing rule, with what the error message needs in info[0..1]:
 *   1: an index outside [0, rows)                      info = min, max of indices
 *   2: offsets do not start at 0, decrease, or pass n  info = first, last offset
 *   3: include_last_offset and the last offset != n   info = first, last offset
 */
#include <stdint.h>

#define MINMAX(T, p, n, lo, hi)                                      \
    do {                                                             \
        const T *a = (const T *)(p);                                 \
        int64_t l = a[0], h = a[0];                                  \
        for (int64_t i = 1; i < (n); ++i) {                          \
            int64_t v = a[i];                                        \
            l = v < l ? v : l;                                       \
            h = v > h ? v : h;                                       \
        }                                                            \
        lo = l;                                                      \
        hi = h;                                                      \
    } while (0)

#define MONOTONE(T, p, n, ok)                                        \
    do {                                                             \
        const T *a = (const T *)(p);                                 \
        int bad = 0;                                                 \
        for (int64_t i = 1; i < (n); ++i) bad |= a[i] < a[i - 1];   \
        ok = !bad;                                                   \
    } while (0)

int hw_check_bags(const void *indices, int64_t n, const void *offsets, int64_t nb, int is64, int64_t rows,
                  int include_last, int64_t *info) {
    if (n > 0) {
        int64_t lo, hi;
        if (is64) MINMAX(int64_t, indices, n, lo, hi);
        else MINMAX(int32_t, indices, n, lo, hi);
        if (lo < 0 || hi >= rows) {
            info[0] = lo;
            info[1] = hi;
            return 1;
        }
    }
    if (nb > 0) {
        int64_t first = is64 ? ((const int64_t *)offsets)[0] : ((const int32_t *)offsets)[0];
        int64_t last = is64 ? ((const int64_t *)offsets)[nb - 1] : ((const int32_t *)offsets)[nb - 1];
        int ok;
        if (is64) MONOTONE(int64_t, offsets, nb, ok);
        else MONOTONE(int32_t, offsets, nb, ok);
        info[0] = first;
        info[1] = last;
        if (first != 0 || last > n || !ok) return 2;
        if (include_last && last != n) return 3;
    }
    return 0;
}


/* Table-batched row-wise bags (see hwaware/ops, embedding_bags_rowwise): T tables in the FBGEMM
 * row-wise layout looked up in one pass, so a model with many tables makes one call, not T.
 *
 * Table t (meta = rows[T], cols[T], bits[T]): weights[t] is uint8 [rows[t], cols[t]], bits[t] 8 (codes, then float32 scale and bias)
 * or 4 (nibbles low first, then float16 scale and bias). Its ids are idx[t * ts + i * is], i < n
 * (is64: int64, else int32); bag b covers i in [offsets[b], offsets[b + 1]) (the last: up to n),
 * the same offsets for every table. out[t][b][:] (float32, [T, B, dim]) is the sum of the bag's
 * dequantized rows, accumulated as fbgemm's kernels do, acc = fma(scale, code, acc + bias), so it
 * equals fbgemm's per-table output bit for bit; mean divides by the bag size (empty bags: 0).
 *
 * Returns 0; 2 (info = first, last offset) when offsets do not start at 0, decrease or pass n;
 * 1 (info = table, id) for the first id, in table then position order, outside [0, rows[t]):
 * nothing is read out of bounds, and out is then undefined. */
#include <math.h>
#include <string.h>

#define BAGS_PAR_MIN 4096
#define PREFETCH 32 /* ids ahead */
#define BAGS_CHUNK 256 /* bags per work item */ /* lookups below which the parallel region costs more than it saves */

static inline float half_to_float(uint16_t h) { /* IEEE binary16 -> float32, exact (subnormals too) */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    uint32_t bits;
    if (e == 0x1Fu) {
        bits = sign | 0x7F800000u | (m << 13); /* inf, NaN */
    } else if (e != 0) {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    } else {
        float f = (float)m * 5.9604644775390625e-08f; /* m * 2^-24: exact */
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#include "tables.h"

/* acc[0..len) of one bag over one table, columns d0 .. d0 + len - 1 (len <= BAG_LANES), into o */
static inline int bag_chunk(const uint8_t *w, int64_t r, int64_t c, int b8, const void *idx, int is64, int64_t first,
                            int64_t is, int64_t start, int64_t end, int64_t d0, int64_t len, int mean, float *o) {
    int oob = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = start; i < end; ++i) {
        const uint8_t *row = row_at(w, r, c, idx, is64, first + i * is, &oob);
        if (row == NULL) continue;
        __m512 vs, vz;
        const __m512 codes = row_codes(row, c, b8, d0, len, &vs, &vz);
        acc = _mm512_fmadd_ps(vs, codes, _mm512_add_ps(acc, vz)); /* fbgemm's fma(scale, code, acc + bias) */
    }
    if (mean && end - start > 1) acc = _mm512_div_ps(acc, _mm512_set1_ps((float)(end - start)));
    _mm512_mask_storeu_ps(o + d0, lanes_mask(len), acc);
#else
    float acc[BAG_LANES] = {0.0f};
    for (int64_t i = start; i < end; ++i) {
        const uint8_t *row = row_at(w, r, c, idx, is64, first + i * is, &oob);
        if (row == NULL) continue;
        float s, z;
        if (b8) {
            float sb[2];
            memcpy(sb, row + c - 8, sizeof sb);
            s = sb[0];
            z = sb[1];
            for (int64_t j = 0; j < len; ++j) acc[j] = fmaf(s, (float)row[d0 + j], acc[j] + z);
        } else {
            uint16_t hb[2];
            memcpy(hb, row + c - 4, sizeof hb);
            s = half_to_float(hb[0]);
            z = half_to_float(hb[1]);
            for (int64_t j = 0; j < len; ++j) {
                const int64_t d = d0 + j;
                acc[j] = fmaf(s, (float)((row[d >> 1] >> ((d & 1) * 4)) & 15), acc[j] + z);
            }
        }
    }
    const float cnt = mean && end - start > 1 ? (float)(end - start) : 1.0f;
    for (int64_t j = 0; j < len; ++j) o[d0 + j] = cnt == 1.0f ? acc[j] : acc[j] / cnt;
#endif
    return oob;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* Single-id bags (DLRM's lookups): out row b = fma(scale, codes, 0 + bias), the value bag_chunk
 * gives, with one id load per row and no bag bookkeeping (bag_chunk's generality was slower here).
 * Returns 1 when an id is out of range (that row is left unwritten). */
static int single_rows(const uint8_t *w, int64_t r, int64_t c, int b8, int64_t dim, const void *idx, int is64,
                       int64_t first, int64_t is, int64_t b0, int64_t b1, float *out) {
    int oob = 0;
    for (int64_t b = b0; b < b1; ++b) {
        if (b + PREFETCH < b1) {
            const int64_t ahead = id_at(idx, is64, first + (b + PREFETCH) * is);
            if ((uint64_t)ahead < (uint64_t)r) __builtin_prefetch(w + ahead * c);
        }
        const uint8_t *row = row_at(w, r, c, idx, is64, first + b * is, &oob);
        if (row == NULL) continue;
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
            const int64_t len = dim - d0 < 16 ? dim - d0 : 16;
            _mm512_mask_storeu_ps(out + b * dim + d0, lanes_mask(len), row_value16(row, c, b8, d0, len));
        }
    }
    return oob;
}
#define HAVE_SINGLE_ROWS 1
#endif

int hw_rowwise_bags(const uint8_t *const *weights, const int64_t *meta, int64_t ntab, int64_t dim, const void *idx, int is64, int64_t ts, int64_t is, int64_t n,
                    const void *offsets, int64_t nbags, int mean, float *out, int64_t *info) {
    const int64_t *rows = meta, *cols = meta + ntab, *bits = meta + 2 * ntab;
    if (nbags > 0) {
        int64_t first = id_at(offsets, is64, 0), last = id_at(offsets, is64, nbags - 1);
        int bad = 0;
        for (int64_t b = 1; b < nbags; ++b) bad |= id_at(offsets, is64, b) < id_at(offsets, is64, b - 1);
        if (first != 0 || last > n || bad) {
            info[0] = first;
            info[1] = last;
            return 2;
        }
    }
    int oob = 0;
    /* table-major: one table's rows stay in cache while its bags are summed (sample-major order,
     * all T tables per sample, ran slower than fbgemm's per-table calls on the recipe DLRM) */
    if (nbags == 0) return first_bad_id(rows, ntab, idx, is64, ts, is, n, info); /* no bag reads an id; all are checked */
    int single = n == nbags; /* one id per bag (offsets 0, 1, ..., n - 1): the common CTR case */
    for (int64_t b = 0; single && b < nbags; ++b) single = id_at(offsets, is64, b) == b;
    const int64_t nchunk = (nbags + BAGS_CHUNK - 1) / BAGS_CHUNK; /* work items: (table, run of bags) */
#pragma omp parallel for schedule(static) reduction(| : oob) if (n * ntab >= BAGS_PAR_MIN)
    for (int64_t item = 0; item < ntab * nchunk; ++item) {
        const int64_t t = item / nchunk, b0 = item % nchunk * BAGS_CHUNK;
        const int64_t b1 = b0 + BAGS_CHUNK < nbags ? b0 + BAGS_CHUNK : nbags;
        const uint8_t *w = weights[t];
        const int64_t r = rows[t], c = cols[t], first = t * ts;
        const int b8 = bits[t] == 8;
#ifdef HAVE_SINGLE_ROWS
        if (single) {
            oob |= single_rows(w, r, c, b8, dim, idx, is64, first, is, b0, b1, out + t * nbags * dim);
            continue;
        }
#endif
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t start = id_at(offsets, is64, b), end = b + 1 < nbags ? id_at(offsets, is64, b + 1) : n;
            /* rows are random reads: ask for the row PREFETCH ids ahead, as fbgemm's kernels do */
            if (start + PREFETCH < n) {
                const int64_t ahead = id_at(idx, is64, first + (start + PREFETCH) * is);
                if ((uint64_t)ahead < (uint64_t)r) __builtin_prefetch(w + ahead * c);
            }
            for (int64_t d0 = 0; d0 < dim; d0 += BAG_LANES)
                oob |= bag_chunk(w, r, c, b8, idx, is64, first, is, start, end, d0,
                                 dim - d0 < BAG_LANES ? dim - d0 : BAG_LANES, mean, out + (t * nbags + b) * dim);
        }
    }
    return oob ? first_bad_id(rows, ntab, idx, is64, ts, is, n, info) : 0;
}
