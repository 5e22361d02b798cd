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

