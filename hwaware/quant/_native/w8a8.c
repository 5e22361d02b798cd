/* The two float passes around an int8 x int8 -> int32 GEMM for W8A8 (see hwaware/ops, "int_mm").
 *
 * hw_quant_tokens_i8: dynamic symmetric per-token int8, bit-identical to
 * hwaware.ops.reference.quantize_per_token_ref: s = max(max|x_r| / 127, eps) in float32,
 * q = clamp(round_half_even(x * (1/s)), -127, 127). A row holding NaN/inf gets a NaN scale, so
 * its output row is NaN (the reference's codes for such a row are undefined; ours are finite).
 *
 * hw_w8a8_epilogue: out = (float)((double)acc * sx[r] * sw[c] + bias[c]), the reference's float64
 * arithmetic in the same order (built with -ffp-contract=off: no fused multiply-add), so the whole
 * W8A8 path equals int8_linear_ref bit for bit for float32 inputs; with `relu`, the output then goes
 * through max(out, 0) as torch.relu does (-0.0 and NaN pass unchanged): a fused following ReLU.
 */
#include <math.h>
#include <stdint.h>

#include "rows.h"
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define EPS 1.1920928955078125e-07f /* torch.finfo(torch.float32).eps */

/* A rounded value -> its int8 code, clamped to +-127 as the SIMD passes do it: max(v, -127) then
 * min(., 127) with the operand order of MAXPS / MINPS, so NaN (a row holding NaN or inf, whose scale
 * is NaN) becomes -127 as in every SIMD lane, and the float -> int conversion is always in range
 * (a NaN converted to int32 is undefined behaviour in C). Finite values: the plain clamp. */
static inline int8_t code_of(float v) {
    v = v > -127.0f ? v : -127.0f;
    v = v < 127.0f ? v : 127.0f;
    return (int8_t)(int32_t)v;
}

#ifdef __AVX512F__
static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* One row, AVX-512 (gcc's auto-vectorized generic loop was slower, mostly in its scalar tails). */
static void quant_row(const float *xr, int64_t cols, int8_t *qr, float *scale_out) {
    __m512 vm0 = _mm512_setzero_ps(), vm1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) { /* two chains: max latency, not loads, bounds one */
        vm0 = _mm512_max_ps(vm0, _mm512_abs_ps(_mm512_loadu_ps(xr + c)));
        vm1 = _mm512_max_ps(vm1, _mm512_abs_ps(_mm512_loadu_ps(xr + c + 16)));
    }
    for (; c < cols; c += 16)
        vm0 = _mm512_max_ps(vm0, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(cols - c), xr + c)));
    float m = _mm512_reduce_max_ps(_mm512_max_ps(vm0, vm1)); /* NaN is dropped here, caught below */
    float s = m / 127.0f;
    s = s < EPS ? EPS : s;
    const __m512 vinv = _mm512_set1_ps(1.0f / s);
    __mmask16 nan = 0;
    for (c = 0; c < cols; c += 16) {
        __mmask16 k = tail_mask(cols - c);
        __m512 xv = _mm512_maskz_loadu_ps(k, xr + c);
        nan = _kor_mask16(nan, _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q));
        codes16(xv, vinv, k, qr + c);
    }
    *scale_out = (nan || !(m <= 3.4028234663852886e+38f)) ? NAN : s;
}
#elif defined(__AVX2__)
/* One row, AVX2: the AVX-512 pass on 8 lanes (the generic loop's max reduction did not vectorize,
 * which made it much slower). The max is exact in any order; the codes are the same
 * operations per value, so the same bits as the generic loop and the AVX-512 pass. */
static void quant_row(const float *xr, int64_t cols, int8_t *qr, float *scale_out) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vm0 = _mm256_setzero_ps(), vm1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) { /* two chains: max latency, not loads, bounds one */
        vm0 = _mm256_max_ps(vm0, _mm256_and_ps(_mm256_loadu_ps(xr + c), absmask));
        vm1 = _mm256_max_ps(vm1, _mm256_and_ps(_mm256_loadu_ps(xr + c + 8), absmask));
    }
    if (c + 8 <= cols) {
        vm0 = _mm256_max_ps(vm0, _mm256_and_ps(_mm256_loadu_ps(xr + c), absmask));
        c += 8;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(vm0, vm1));
    float m = 0.0f;
    for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m; /* NaN is dropped here, caught below */
    for (; c < cols; ++c) {
        const float a = fabsf(xr[c]);
        m = a > m ? a : m;
    }
    float s = m / 127.0f;
    s = s < EPS ? EPS : s;
    const float inv = 1.0f / s;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256 nan = _mm256_setzero_ps();
    for (c = 0; c + 8 <= cols; c += 8) {
        const __m256 xv = _mm256_loadu_ps(xr + c);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
        codes8(xv, vinv, 8, qr + c);
    }
    int bad = _mm256_movemask_ps(nan) != 0;
    for (; c < cols; ++c) {
        bad |= xr[c] != xr[c];
        qr[c] = code_of(rintf(xr[c] * inv));
    }
    *scale_out = (bad || !(m <= 3.4028234663852886e+38f)) ? NAN : s;
}
#else
static void quant_row(const float *xr, int64_t cols, int8_t *qr, float *scale_out) {
    int bad;
    float m = row_absmax(xr, cols, &bad);
    float s = m / 127.0f;
    s = s < EPS ? EPS : s;
    float inv = 1.0f / s;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
        qr[c] = code_of(rintf(xr[c] * inv)); /* not nearbyintf: glibc saves/restores the FP environment around it */
    }
    *scale_out = bad ? NAN : s;
}
#endif

/* Rows are independent, so the passes split them over OpenMP threads. The library links libgomp by
 * soname, so in a process that imported torch it runs on torch's own OpenMP pool (same runtime, same
 * torch.set_num_threads): the workers that just ran the GEMM pick the rows up. Below PAR_MIN elements
 * a parallel region costs more than it saves. */
#define PAR_MIN 32768

void hw_quant_tokens_i8(const float *x, int64_t rows, int64_t cols, int8_t *q, float *scale_out) {
#pragma omp parallel for schedule(static) if (rows * cols >= PAR_MIN)
    for (int64_t r = 0; r < rows; ++r) quant_row(x + r * cols, cols, q + r * cols, scale_out + r);
}

static inline void epilogue_row(const int32_t *ar, int64_t cols, float sxr, const float *sw, const float *bias, int relu,
                                float *outr) {
    const double a = (double)sxr;
    /* relu: max(v, 0) as torch.relu, in the same pass: NaN stays NaN (v < 0 is false for NaN), -0.0 stays */
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
        double d = (double)ar[c] * a * (double)sw[c];
        float v = (float)(bias ? d + (double)bias[c] : d);
        outr[c] = relu && v < 0.0f ? 0.0f : v;
    }
}

/* epilogue_row with the scales and bias already widened to double (sw_d, bias_d or NULL): the same
 * operations, without two float -> double conversions per output */
static inline void epilogue_row_d(const int32_t *ar, int64_t cols, float sxr, const double *sw_d, const double *bias_d,
                                  int relu, float *outr) {
    const double a = (double)sxr;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
        double d = (double)ar[c] * a * sw_d[c];
        float v = (float)(bias_d ? d + bias_d[c] : d);
        outr[c] = relu && v < 0.0f ? 0.0f : v;
    }
}

/* sw[0..n) then bias[0..n) (zeros without bias) as doubles, for epilogue_row_d; NULL when out of
 * memory (the caller then runs epilogue_row: the same bits, two more conversions per output) */
static void widen_into(double *w, const float *sw, const float *bias, int64_t n) {
    for (int64_t c = 0; c < n; ++c) w[c] = (double)sw[c];
    for (int64_t c = 0; c < n; ++c) w[n + c] = bias ? (double)bias[c] : 0.0;
}

static double *widen(const float *sw, const float *bias, int64_t n) {
    double *w = (double *)malloc((size_t)(2 * n) * sizeof(double));
    if (w != NULL) widen_into(w, sw, bias, n);
    return w;
}

static inline void epilogue_row_any(const int32_t *ar, int64_t cols, float sxr, const float *sw, const float *bias,
                                    const double *wide, int relu, float *outr) {
    if (wide != NULL)
        epilogue_row_d(ar, cols, sxr, wide, bias ? wide + cols : NULL, relu, outr);
    else
        epilogue_row(ar, cols, sxr, sw, bias, relu, outr);
}

void hw_w8a8_epilogue(const int32_t *acc, int64_t rows, int64_t cols, const float *sx, const float *sw,
                      const float *bias, int relu, float *out) {
#pragma omp parallel if (rows * cols >= PAR_MIN)
    {
        double *wide = widen(sw, bias, cols);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            epilogue_row_any(acc + r * cols, cols, sx[r], sw, bias, wide, relu, out + r * cols);
        free(wide);
    }
}

/* hw_w8a8_epilogue then hw_quant_tokens_i8 on its output, one row at a time through a per-thread
 * row buffer: the codes and scales of the next int8 layer's input, bit for bit what the two passes
 * give, without writing the [rows, cols] float output and reading it back (an MLP of int8 layers,
 * hwaware::int8_mlp). Returns 0, or -1 when a row buffer cannot be allocated. */
int hw_w8a8_epilogue_quant(const int32_t *acc, int64_t rows, int64_t cols, const float *sx, const float *sw,
                           const float *bias, int relu, int8_t *q, float *scale_out) {
    int failed = 0;
#pragma omp parallel if (rows * cols >= PAR_MIN)
    {
        float *buf = (float *)malloc((size_t)cols * sizeof(float));
        double *wide = widen(sw, bias, cols);
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            if (buf == NULL) continue;
            epilogue_row_any(acc + r * cols, cols, sx[r], sw, bias, wide, relu, buf);
            quant_row(buf, cols, q + r * cols, scale_out + r);
        }
        free(buf);
        free(wide);
    }
    return failed ? -1 : 0;
}

/* ---- hw_int8_mlp: the W8A8 layers in one pass over a block of rows, on AMX tiles or VNNI ---------
 *
 * The same arithmetic as the passes above around torch._int_mm: per-token codes (quant_row), an exact
 * int32 product, the float64 epilogue (epilogue_row), and between two layers the next layer's codes
 * (quant_row). So the output is bit for bit what hw_quant_tokens_i8 -> _int_mm ->
 * hw_w8a8_epilogue_quant -> ... -> hw_w8a8_epilogue gives. What changes is where the data lives: a
 * thread takes MLP_ROWS rows at a time through every layer, so the codes and int32 accumulators of a
 * block stay in L1/L2 and the activations between layers never reach memory.
 *
 * The int32 product of a block runs on one of two engines:
 * - ENGINE_AMX: Intel AMX tiles (TDPBSSD sums int8 x int8 into int32, exact in any order, as _int_mm).
 * - ENGINE_VNNI: VPDPBUSD (AVX-512 VNNI, 16 columns a vector; or AVX-VNNI, 8). It multiplies unsigned
 *   by signed bytes, so the block's codes a are stored as a + 128 (a ^ 0x80) and the product is
 *   sum((a + 128) w) - 128 sum(w): the second term per output column is packed with the weights.
 *   Both sums wrap modulo 2^32 and the difference is the exact product wherever that fits in int32
 *   (as _int_mm's: K up to 2^31 / 127^2 = 133,000).
 * - ENGINE_MADD: VPMADDWD, for CPUs without VNNI (AVX2: Haswell to Comet Lake, Zen 1-3; AVX-512
 *   without VNNI: Skylake-SP). The block's codes are widened to int16 and each instruction multiplies
 *   two int16 pairs per int32 lane and adds the pair: exact (|a w| <= 128^2, no pair reaches the one
 *   saturating case, -32768^2 twice), then VPADDD sums modulo 2^32 as the others do. It reads the
 *   same packed weights, 16 bytes (AVX2; 32 with AVX-512) sign-extended per load: each int32 lane
 *   holds half of one column's 4-code step, and the lane pairs are added once at the end. Two
 *   instructions per 2 x (lanes) products instead of VNNI's one per 4 x lanes, but exact where
 *   VPMADDUBSW (what oneDNN and fbgemm use there) saturates at int16, and about 1.5x the
 *   multiply-adds per cycle of fp32 FMA on such CPUs.
 *
 * Weights come packed by hw_int8_pack: [N, K] int8 -> tiles of 16 output columns x 64 k, each tile
 * 16 rows of 64 bytes where row r holds, for its 16 columns n, the 4 codes k = 4r .. 4r+3 (the
 * layout TDPBSSD reads its second operand in, and VPDPBUSD's 4-byte lanes); K padded to a multiple
 * of 64 and N to 16 with zero codes. Tiles of one column block are consecutive over k, so a column
 * block's 4-code rows form one run of 64-byte vectors. After the tiles: int32 off[n] = 128 sum_k w[n,k]
 * for the padded N (the VNNI engine's correction). A zero weight code makes whatever sits in the
 * padded code columns of the activations irrelevant, so those are never cleared. */
#define MLP_ROWS 32 /* AMX: two 16-row A tiles, a 2 x 2 tile block of C per step */
#define ENGINE_AMX 1
#define ENGINE_VNNI 2
#define ENGINE_MADD 3

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>
#define HW_AMX 1

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_tilecfg;

static void amx_configure(void) { /* tiles 0-7: 16 rows x 64 bytes each (A, B and int32 C alike) */
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* acc[MLP_ROWS, nb_n*16] (row stride ldc int32) = a[MLP_ROWS, kb_n*64] (row stride lda) x packed w */
static void amx_block(const int8_t *a, int64_t lda, int64_t kb_n, const int8_t *w, int64_t nb_n, int32_t *acc,
                      int64_t ldc) {
    const int64_t tile = 1024, ldcb = ldc * 4;
    int64_t nb = 0;
    for (; nb + 2 <= nb_n; nb += 2) {
        const int8_t *b0 = w + nb * kb_n * tile, *b1 = b0 + kb_n * tile;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kb_n; ++kb) {
            _tile_loadd(4, a + kb * 64, lda);
            _tile_loadd(5, a + 16 * lda + kb * 64, lda);
            _tile_loadd(6, b0 + kb * tile, 64);
            _tile_loadd(7, b1 + kb * tile, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, acc + nb * 16, ldcb);
        _tile_stored(1, acc + nb * 16 + 16, ldcb);
        _tile_stored(2, acc + 16 * ldc + nb * 16, ldcb);
        _tile_stored(3, acc + 16 * ldc + nb * 16 + 16, ldcb);
    }
    if (nb < nb_n) { /* an odd last column block */
        const int8_t *b0 = w + nb * kb_n * tile;
        _tile_zero(0);
        _tile_zero(2);
        for (int64_t kb = 0; kb < kb_n; ++kb) {
            _tile_loadd(4, a + kb * 64, lda);
            _tile_loadd(5, a + 16 * lda + kb * 64, lda);
            _tile_loadd(6, b0 + kb * tile, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(2, 5, 6);
        }
        _tile_stored(0, acc + nb * 16, ldcb);
        _tile_stored(2, acc + 16 * ldc + nb * 16, ldcb);
    }
}
#endif

/* VNNI: a register block of MR rows x NV vectors of VL columns, one VPDPBUSD per pair and 4-code step */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HW_VNNI 1
#define VL 16
#define VNNI_MR 8
#define VNNI_NV 3 /* 24 accumulators + 3 weight vectors + 1 broadcast of 32 registers */
typedef __m512i vi;
static inline vi vi_zero(void) { return _mm512_setzero_si512(); }
static inline vi vi_load(const void *p) { return _mm512_loadu_si512(p); }
static inline vi vi_bcast(int32_t v) { return _mm512_set1_epi32(v); }
/* c += a (unsigned bytes) . b (signed bytes): VPDPBUSD written as asm with its accumulator tied, since
 * gcc 12 copied (or spilled) every accumulator once per step around the intrinsic */
static inline vi vi_dp(vi c, vi a, vi b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b));
    return c;
}
static inline void vi_store_sub(int32_t *p, vi c, vi off) { _mm512_storeu_si512(p, _mm512_sub_epi32(c, off)); }
#elif defined(__AVXVNNI__) && defined(__AVX2__)
#define HW_VNNI 1
#define VL 8
#define VNNI_MR 6
#define VNNI_NV 2 /* 12 accumulators + 2 weight vectors + 1 broadcast of 16 registers */
typedef __m256i vi;
static inline vi vi_zero(void) { return _mm256_setzero_si256(); }
static inline vi vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi vi_bcast(int32_t v) { return _mm256_set1_epi32(v); }
static inline vi vi_dp(vi c, vi a, vi b) { /* asm, as the AVX-512 one; %{vex%}: the AVX-VNNI encoding */
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(c) : "x"(a), "x"(b));
    return c;
}
static inline void vi_store_sub(int32_t *p, vi c, vi off) { _mm256_storeu_si256((__m256i *)p, _mm256_sub_epi32(c, off)); }
#endif

#ifdef HW_VNNI
/* acc[mr, nv*VL] (row stride ldc) = the mr rows of unsigned codes a (row stride lda) x the nv column
 * vectors starting at column c0 of packed w (steps 4-code rows; a column block's run is `panel` bytes
 * long), minus off[c]. mr (<= VNNI_MR) and nv (<= VNNI_NV) are constants at every call site, and each accumulator
 * is its own variable (gcc kept an array of them on the stack): the block lives in registers. */
#define VNNI_ROW(i)                                                                                                     \
    if (i < mr) {                                                                                                       \
        int32_t four;                                                                                                   \
        memcpy(&four, a + i * lda + t * 4, 4);                                                                          \
        const vi av = vi_bcast(four);                                                                                   \
        c##i##0 = vi_dp(c##i##0, av, b0);                                                                               \
        if (nv > 1) c##i##1 = vi_dp(c##i##1, av, b1);                                                                   \
        if (nv > 2) c##i##2 = vi_dp(c##i##2, av, b2);                                                                   \
    }
#define VNNI_STORE(i)                                                                                                   \
    if (i < mr) {                                                                                                       \
        vi_store_sub(acc + i * ldc + c0, c##i##0, o0);                                                                  \
        if (nv > 1) vi_store_sub(acc + i * ldc + c0 + VL, c##i##1, o1);                                                 \
        if (nv > 2) vi_store_sub(acc + i * ldc + c0 + 2 * VL, c##i##2, o2);                                             \
    }
#define VNNI_ZERO(i) vi c##i##0 = vi_zero(), c##i##1 = vi_zero(), c##i##2 = vi_zero();

static inline __attribute__((always_inline)) void vnni_tile(const uint8_t *a, int64_t lda, int64_t steps, const int8_t *w,
                                                             int64_t panel, const int32_t *off, int64_t c0, int32_t *acc,
                                                             int64_t ldc, const int mr, const int nv) {
    VNNI_ZERO(0) VNNI_ZERO(1) VNNI_ZERO(2) VNNI_ZERO(3) VNNI_ZERO(4) VNNI_ZERO(5) VNNI_ZERO(6) VNNI_ZERO(7)
    /* column c of packed w: block c / 16, bytes 4 (c % 16) of each 64-byte 4-code row */
    const int8_t *p0 = w + (c0 / 16) * panel + (c0 % 16) * 4, *p1 = p0, *p2 = p0; /* p1, p2 only where used */
    if (nv > 1) p1 = w + ((c0 + VL) / 16) * panel + ((c0 + VL) % 16) * 4;
    if (nv > 2) p2 = w + ((c0 + 2 * VL) / 16) * panel + ((c0 + 2 * VL) % 16) * 4;
    for (int64_t t = 0; t < steps; ++t) {
        const vi b0 = vi_load(p0 + t * 64), b1 = nv > 1 ? vi_load(p1 + t * 64) : b0, b2 = nv > 2 ? vi_load(p2 + t * 64) : b0;
        VNNI_ROW(0) VNNI_ROW(1) VNNI_ROW(2) VNNI_ROW(3) VNNI_ROW(4) VNNI_ROW(5) VNNI_ROW(6) VNNI_ROW(7)
    }
    const vi o0 = vi_load(off + c0), o1 = nv > 1 ? vi_load(off + c0 + VL) : o0, o2 = nv > 2 ? vi_load(off + c0 + 2 * VL) : o0;
    VNNI_STORE(0) VNNI_STORE(1) VNNI_STORE(2) VNNI_STORE(3) VNNI_STORE(4) VNNI_STORE(5) VNNI_STORE(6) VNNI_STORE(7)
}

/* nr rows in register blocks of VNNI_MR rows, then 4, 2, 1, for nv (a constant) column vectors at c0 */
static inline __attribute__((always_inline)) void vnni_rows(const uint8_t *a, int64_t lda, int64_t steps, const int8_t *w,
                                                             int64_t panel, const int32_t *off, int64_t c0, int32_t *acc,
                                                             int64_t ldc, int64_t nr, const int nv) {
    int64_t r = 0;
    for (; r + VNNI_MR <= nr; r += VNNI_MR) vnni_tile(a + r * lda, lda, steps, w, panel, off, c0, acc + r * ldc, ldc, VNNI_MR, nv);
    for (; r + 4 <= nr; r += 4) vnni_tile(a + r * lda, lda, steps, w, panel, off, c0, acc + r * ldc, ldc, 4, nv);
    for (; r + 2 <= nr; r += 2) vnni_tile(a + r * lda, lda, steps, w, panel, off, c0, acc + r * ldc, ldc, 2, nv);
    for (; r < nr; ++r) vnni_tile(a + r * lda, lda, steps, w, panel, off, c0, acc + r * ldc, ldc, 1, nv);
}

/* acc[nr, nb_n*16] (row stride ldc) = a[nr, kb_n*64] unsigned codes (row stride lda) x packed w */
static __attribute__((noinline)) void vnni_block(const uint8_t *a, int64_t lda, int64_t kb_n, const int8_t *w, int64_t nb_n, int32_t *acc,
                       int64_t ldc, int64_t nr) {
    const int64_t steps = kb_n * 16, panel = kb_n * 1024, nvec = nb_n * 16 / VL;
    const int32_t *off = (const int32_t *)(w + nb_n * panel);
    int64_t v = 0;
    for (; v + VNNI_NV <= nvec; v += VNNI_NV) /* a panel of columns stays in L1 while the rows pass */
        vnni_rows(a, lda, steps, w, panel, off, v * VL, acc, ldc, nr, VNNI_NV);
    for (; v < nvec; ++v) vnni_rows(a, lda, steps, w, panel, off, v * VL, acc, ldc, nr, 1);
}
#endif

/* MADD: a register block of MADD_MR rows x MADD_NV vectors, each vector MVL int32 lanes = MVL / 2
 * columns x (two halves of a 4-code step); AVX-512BW (no VNNI) where the build has it, else AVX2 */
#if defined(__AVX512BW__)
#define HW_MADD 1
#define MVL 16
#define MADD_MR 6
#define MADD_NV 4 /* 24 accumulators + 4 weight vectors + 1 broadcast of 32 registers */
typedef __m512i mi;
static inline mi mi_zero(void) { return _mm512_setzero_si512(); }
/* 8 columns x 4 codes, sign-extended to int16 */
static inline mi mi_wload(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
#define MI_SET1_64 _mm512_set1_epi64
#define MI_REG "v" /* any of the 32 vector registers */
/* x: lanes 2j, 2j+1 = the two halves of column j (0..7), y: of columns 8..15 -> the 16 sums in order */
static inline void mi_store_pairs(int32_t *p, mi x, mi y) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    _mm512_storeu_si512(p, _mm512_add_epi32(_mm512_permutex2var_epi32(x, ev, y), _mm512_permutex2var_epi32(x, od, y)));
}
#elif defined(__AVX2__)
#define HW_MADD 1
#define MVL 8
#define MADD_MR 6
#define MADD_NV 2 /* 12 accumulators + 2 weight vectors + 1 broadcast of 16 registers */
typedef __m256i mi;
static inline mi mi_zero(void) { return _mm256_setzero_si256(); }
static inline mi mi_wload(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
#define MI_SET1_64 _mm256_set1_epi64x
#define MI_REG "x"
/* hadd gives columns (0 1 4 5 | 2 3 6 7); the 64-bit permute puts them in order */
static inline void mi_store_pairs(int32_t *p, mi x, mi y) {
    _mm256_storeu_si256((__m256i *)p, _mm256_permute4x64_epi64(_mm256_hadd_epi32(x, y), 0xD8));
}
#endif

#ifdef HW_MADD
static inline mi mi_bcast(const int16_t *p) { /* one row's 4 int16 codes in every 64-bit lane */
    int64_t v;
    memcpy(&v, p, 8);
    return MI_SET1_64(v);
}
/* c += the pair sums of a * w, as asm with one scratch register: with the intrinsics, gcc gave every
 * product its own register and spilled accumulators to the stack (as for VPDPBUSD above) */
static inline mi mi_dp(mi c, mi a, mi w) {
    mi t;
    __asm__("vpmaddwd %3, %2, %1\n\tvpaddd %1, %0, %0" : "+" MI_REG(c), "=&" MI_REG(t) : MI_REG(a), MI_REG(w));
    return c;
}

#define MADD_ROW(i)                                                                                                     \
    if (i < mr) {                                                                                                       \
        const mi av = mi_bcast(a + i * lda + t * 4);                                                                    \
        c##i##0 = mi_dp(c##i##0, av, b0);                                                                               \
        c##i##1 = mi_dp(c##i##1, av, b1);                                                                               \
        if (nv > 2) c##i##2 = mi_dp(c##i##2, av, b2);                                                                   \
        if (nv > 2) c##i##3 = mi_dp(c##i##3, av, b3);                                                                   \
    }
#define MADD_STORE(i)                                                                                                   \
    if (i < mr) {                                                                                                       \
        mi_store_pairs(acc + i * ldc + c0, c##i##0, c##i##1);                                                           \
        if (nv > 2) mi_store_pairs(acc + i * ldc + c0 + MVL, c##i##2, c##i##3);                                         \
    }
#define MADD_ZERO(i) mi c##i##0 = mi_zero(), c##i##1 = mi_zero(), c##i##2 = mi_zero(), c##i##3 = mi_zero();

/* acc[mr, nv * MVL / 2] (row stride ldc) = the mr rows of int16 codes a (row stride lda) x the nv
 * column vectors starting at column c0 of packed w; nv is 2 or 4 (whole pairs), mr <= MADD_MR */
static inline __attribute__((always_inline)) void madd_tile(const int16_t *a, int64_t lda, int64_t steps, const int8_t *w,
                                                             int64_t panel, int64_t c0, int32_t *acc, int64_t ldc,
                                                             const int mr, const int nv) {
    MADD_ZERO(0) MADD_ZERO(1) MADD_ZERO(2) MADD_ZERO(3) MADD_ZERO(4) MADD_ZERO(5)
    const int64_t cv = MVL / 2; /* columns per vector */
    const int8_t *p[4];
    for (int v = 0; v < 4; ++v) {
        const int64_t c = c0 + (v < nv ? v : 0) * cv;
        p[v] = w + (c / 16) * panel + (c % 16) * 4;
    }
    for (int64_t t = 0; t < steps; ++t) {
        const mi b0 = mi_wload(p[0] + t * 64), b1 = mi_wload(p[1] + t * 64);
        const mi b2 = nv > 2 ? mi_wload(p[2] + t * 64) : b0, b3 = nv > 2 ? mi_wload(p[3] + t * 64) : b0;
        MADD_ROW(0) MADD_ROW(1) MADD_ROW(2) MADD_ROW(3) MADD_ROW(4) MADD_ROW(5)
    }
    MADD_STORE(0) MADD_STORE(1) MADD_STORE(2) MADD_STORE(3) MADD_STORE(4) MADD_STORE(5)
}

static inline __attribute__((always_inline)) void madd_rows(const int16_t *a, int64_t lda, int64_t steps, const int8_t *w,
                                                             int64_t panel, int64_t c0, int32_t *acc, int64_t ldc,
                                                             int64_t nr, const int nv) {
    int64_t r = 0;
    for (; r + MADD_MR <= nr; r += MADD_MR) madd_tile(a + r * lda, lda, steps, w, panel, c0, acc + r * ldc, ldc, MADD_MR, nv);
    for (; r + 4 <= nr; r += 4) madd_tile(a + r * lda, lda, steps, w, panel, c0, acc + r * ldc, ldc, 4, nv);
    for (; r + 2 <= nr; r += 2) madd_tile(a + r * lda, lda, steps, w, panel, c0, acc + r * ldc, ldc, 2, nv);
    for (; r < nr; ++r) madd_tile(a + r * lda, lda, steps, w, panel, c0, acc + r * ldc, ldc, 1, nv);
}

/* acc[nr, nb_n*16] (row stride ldc) = a[nr, kb_n*64] int16 codes (row stride lda) x packed w */
static __attribute__((noinline)) void madd_block(const int16_t *a, int64_t lda, int64_t kb_n, const int8_t *w, int64_t nb_n,
                                                 int32_t *acc, int64_t ldc, int64_t nr) {
    const int64_t steps = kb_n * 16, panel = kb_n * 1024, ncols = nb_n * 16, span = MADD_NV * MVL / 2;
    int64_t c = 0;
    for (; c + span <= ncols; c += span) madd_rows(a, lda, steps, w, panel, c, acc, ldc, nr, MADD_NV);
    for (; c < ncols; c += MVL) madd_rows(a, lda, steps, w, panel, c, acc, ldc, nr, 2); /* AVX-512: 16 columns left */
}
#endif

/* 1 when this process may run the AMX engine: built with AMX support, the CPU has AMX-TILE and
 * AMX-INT8, the OS enabled the tile state (XCR0 bits 17-18) and granted this process the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM; a process-wide permission, asking again is harmless). */
int hw_amx_available(void) {
#ifdef HW_AMX
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return 0; /* OSXSAVE */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1u) || !((d >> 25) & 1u)) return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 0;
    return 1;
#else
    return 0;
#endif
}

/* The VNNI engine's vector width in int32 lanes (16: AVX-512 VNNI, 8: AVX-VNNI), 0 when the library
 * was built without either (the build targets this CPU, or HWAWARE_NATIVE_ARCH's, so built means usable) */
int hw_vnni_lanes(void) {
#ifdef HW_VNNI
    return VL;
#else
    return 0;
#endif
}

/* The VPMADDWD engine's vector width in int32 lanes (16: AVX-512BW, 8: AVX2), 0 when not built in */
int hw_madd_lanes(void) {
#ifdef HW_MADD
    return MVL;
#else
    return 0;
#endif
}

/* w [n, k] int8 (row stride k) -> the tile layout above, then off[]; out: hw_int8_pack_bytes(n, k) bytes */
int64_t hw_int8_pack_bytes(int64_t n, int64_t k) { return (n + 15) / 16 * 16 * ((k + 63) / 64 * 64 + 4); }

void hw_int8_pack(const int8_t *w, int64_t n, int64_t k, int8_t *out) {
    const int64_t kb_n = (k + 63) / 64, nb_n = (n + 15) / 16;
    memset(out, 0, (size_t)hw_int8_pack_bytes(n, k));
    int32_t *off = (int32_t *)(out + nb_n * kb_n * 1024); /* 4-aligned: the tiles are whole KiB */
    for (int64_t c = 0; c < n; ++c) {
        int8_t *col = out + (c / 16) * kb_n * 1024 + (c % 16) * 4;
        int64_t sum = 0;
        for (int64_t j = 0; j < k; ++j) {
            col[(j / 64) * 1024 + ((j % 64) / 4) * 64 + (j % 4)] = w[c * k + j];
            sum += w[c * k + j];
        }
        off[c] = (int32_t)(uint32_t)((uint64_t)sum * 128u); /* modulo 2^32, as the sums it corrects */
    }
}

/* the rows' codes as VPDPBUSD's unsigned operand: a + 128 */
static inline void to_unsigned(const int8_t *src, uint8_t *dst, int64_t cols) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) dst[c] = (uint8_t)src[c] ^ 0x80u;
}

/* one row of int8 codes into a block buffer row, as the engine reads them: VNNI's a + 128, MADD's int16 */
static inline void stage_row(int32_t engine, const int8_t *src, int8_t *dst, int64_t cols) {
    if (engine == ENGINE_MADD) {
        int16_t *d = (int16_t *)dst;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) d[c] = src[c];
    } else if (engine == ENGINE_VNNI) {
        to_unsigned(src, (uint8_t *)dst, cols);
    } else {
        memcpy(dst, src, (size_t)cols);
    }
}

/* nlayers W8A8 layers: x [rows, dims[0]] float32 -> out [rows, dims[nlayers]] float32, layer i
 * dims[i] -> dims[i+1] with packed weights w[i] (hw_int8_pack), scales sw[i], bias[i] (or NULL) and
 * ReLU when relus[i], on `engine` (ENGINE_AMX, ENGINE_VNNI or ENGINE_MADD). x NULL: the input comes
 * quantized instead, codes qx [rows, dims[0]] int8 and scales sx [rows] (what hw_quant_tokens_i8 of x
 * gives). Returns 0, -1 when per-thread buffers cannot be allocated, -2 when the engine is not built
 * in (or nlayers < 1). */
int hw_int8_mlp(int32_t engine, const float *x, const int8_t *qx, const float *sx, int64_t rows, int32_t nlayers,
                const int64_t *dims, const int8_t *const *w, const float *const *sw, const float *const *bias,
                const int32_t *relus, float *out) {
#ifdef HW_AMX
    const int amx = engine == ENGINE_AMX;
#else
    const int amx = 0;
    if (engine == ENGINE_AMX) return -2;
#endif
#ifndef HW_VNNI
    if (engine == ENGINE_VNNI) return -2;
#endif
#ifndef HW_MADD
    if (engine == ENGINE_MADD) return -2;
#endif
    if ((engine != ENGINE_AMX && engine != ENGINE_VNNI && engine != ENGINE_MADD) || nlayers <= 0) return -2;
    const int64_t esz = engine == ENGINE_MADD ? 2 : 1; /* bytes per code in the block buffers */
    int64_t kmax = 0, nmax = 0; /* kmax covers dims[nlayers] too: the int32 block's rows are roundup(N, 16) wide */
    for (int32_t i = 0; i <= nlayers; ++i) {
        int64_t kp = (dims[i] + 63) / 64 * 64;
        kmax = kp > kmax ? kp : kmax;
        nmax = dims[i] > nmax ? dims[i] : nmax;
    }
    const int64_t blocks = (rows + MLP_ROWS - 1) / MLP_ROWS;
    int64_t width = 0; /* floats each row goes through in the passes: what the work scales with */
    for (int32_t i = 0; i <= nlayers; ++i) width += dims[i];
    int failed = 0;
#pragma omp parallel if (rows * width >= PAR_MIN)
    {
        /* two code buffers (this layer's input, the next one's) in the engine's format, a row of int8
         * codes, the int32 block, a float row, and every layer's scales and bias widened to double once
         * (epilogue_row_d: two fewer conversions per output than epilogue_row, which made this pass a
         * little faster) */
        int8_t *codes = (int8_t *)calloc((size_t)(2 * MLP_ROWS * kmax * esz), 1);
        int8_t *row8 = (int8_t *)malloc((size_t)kmax);
        int32_t *acc = (int32_t *)malloc((size_t)(MLP_ROWS * kmax) * sizeof(int32_t));
        float *buf = (float *)malloc((size_t)nmax * sizeof(float));
        int64_t nsum = 0;
        for (int32_t i = 0; i < nlayers; ++i) nsum += dims[i + 1];
        double *wide = (double *)malloc((size_t)(2 * nsum) * sizeof(double)); /* per layer: sw, then bias */
        if (wide != NULL)
            for (int64_t i = 0, off = 0; i < nlayers; off += 2 * dims[i + 1], ++i) widen_into(wide + off, sw[i], bias[i], dims[i + 1]);
        const int ready = codes != NULL && row8 != NULL && acc != NULL && buf != NULL && wide != NULL;
        float scales[2][MLP_ROWS];
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#ifdef HW_AMX
        if (ready && amx) amx_configure();
#endif
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            if (!ready) continue;
            const double *wl = wide;
            const int64_t r0 = blk * MLP_ROWS, nr = rows - r0 < MLP_ROWS ? rows - r0 : MLP_ROWS;
            int cur = 0;
            const int64_t k0 = dims[0], kp0 = (k0 + 63) / 64 * 64;
            int64_t lda = kp0; /* in codes */
            const int8_t *a = codes;
            if (qx == NULL) {
                for (int64_t r = 0; r < nr; ++r) {
                    if (amx) {
                        quant_row(x + (r0 + r) * k0, k0, codes + r * kp0, &scales[0][r]);
                    } else {
                        quant_row(x + (r0 + r) * k0, k0, row8, &scales[0][r]);
                        stage_row(engine, row8, codes + r * kp0 * esz, k0);
                    }
                }
            } else {
                memcpy(scales[0], sx + r0, (size_t)nr * sizeof(float));
                if (!amx) {
                    for (int64_t r = 0; r < nr; ++r) stage_row(engine, qx + (r0 + r) * k0, codes + r * kp0 * esz, k0);
                } else if ((r0 + MLP_ROWS - 1) * k0 + kp0 <= rows * k0) { /* the tile loads stay inside qx: read it there */
                    a = qx + r0 * k0;
                    lda = k0;
                } else {
                    for (int64_t r = 0; r < nr; ++r) memcpy(codes + r * kp0, qx + (r0 + r) * k0, (size_t)k0);
                }
            }
            for (int32_t i = 0; i < nlayers; ++i) {
                const int64_t n = dims[i + 1], nb_n = (n + 15) / 16, ldc = nb_n * 16, kb_n = (dims[i] + 63) / 64;
                const int8_t *ai = i == 0 ? a : codes + cur * MLP_ROWS * kmax * esz;
                (void)ai, (void)kb_n; /* a build with no engine returned -2 above */
#ifdef HW_AMX
                if (engine == ENGINE_AMX) amx_block(ai, lda, kb_n, w[i], nb_n, acc, ldc);
#endif
#ifdef HW_VNNI
                if (engine == ENGINE_VNNI) vnni_block((const uint8_t *)ai, lda, kb_n, w[i], nb_n, acc, ldc, nr);
#endif
#ifdef HW_MADD
                if (engine == ENGINE_MADD) madd_block((const int16_t *)ai, lda, kb_n, w[i], nb_n, acc, ldc, nr);
#endif
                const double *swd = wl, *bd = bias[i] ? wl + n : NULL;
                wl += 2 * n;
                if (i == nlayers - 1) {
                    for (int64_t r = 0; r < nr; ++r)
                        epilogue_row_d(acc + r * ldc, n, scales[cur][r], swd, bd, relus[i], out + (r0 + r) * n);
                    break;
                }
                const int64_t ldn = (n + 63) / 64 * 64;
                int8_t *next = codes + (1 - cur) * MLP_ROWS * kmax * esz;
                for (int64_t r = 0; r < nr; ++r) {
                    epilogue_row_d(acc + r * ldc, n, scales[cur][r], swd, bd, relus[i], buf);
                    if (amx) {
                        quant_row(buf, n, next + r * ldn, &scales[1 - cur][r]);
                    } else {
                        quant_row(buf, n, row8, &scales[1 - cur][r]);
                        stage_row(engine, row8, next + r * ldn * esz, n);
                    }
                }
                cur = 1 - cur;
                lda = ldn;
            }
        }
#ifdef HW_AMX
        if (ready && amx) _tile_release();
#endif
        free(codes);
        free(row8);
        free(acc);
        free(buf);
        free(wide);
    }
    return failed ? -1 : 0;
}
