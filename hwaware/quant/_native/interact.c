/* DLRM dot interaction in one pass (see hwaware/ops, hwaware::dot_interaction).
 *
 * Input: V row-major [B, D] float32 arrays (the bottom MLP output x, then one embedding per
 * table). Output row b, W = D + P + pad floats, P = V(V-1)/2:
 *     [ x[b] | dot(v_i[b], v_j[b]) for i < j in row-major order | pad zeros ]
 * which is torch.cat([x, bmm(S, S^T).flatten(1)[:, triu(offset=1)], zeros]) of hwaware's DLRM,
 * without the [B, V, D] stack, the [B, V, V] product and the two copies around it.
 *
 * With AVX-512 (16 lanes) or AVX2 + FMA (8 lanes): VL samples at a time, one per lane. Each
 * vector's [VL, D] block is transposed in registers (VL x VL at a time) so that every pair dot is D
 * fused multiply-adds on whole registers, VL samples at once, with no lane wasted on the lower
 * triangle; the [pairs, VL] result is transposed back the same way. Each dot is
 * fma(v_i[d], v_j[d], acc) over d = 0..D-1 in order for every sample (the last block is padded with
 * zero samples), so a sample's result depends neither on the thread count nor on its position in
 * the batch, and is the same bits with AVX-512 and with AVX2 (tested). Against the per-sample pass
 * below (whose scalar transposition into T[d][j] took a large share of its time) the blocks made the
 * forward faster, with AVX-512 and built for AVX2 (x86-64-v3) alike; benchmarks/bench_ops_cpu.py
 * writes the forward's time against the torch ops' to benchmarks/results/ops_cpu.json ("interaction").
 *
 * Without either, per sample: the V vectors are transposed into T[d][j] (j padded to a multiple of
 * 16 with zeros) so 16 dots of row i are D multiply-adds on one register, accumulated over d in
 * order (a multiply, then an add: the library is built with -ffp-contract=off).
 * Either way the result differs from torch's bmm in the last bits (another summation order), which
 * tests bound against a float64 reference.
 *
 * The deployed DLRM's variant (hw_bags_interaction_fwd / _fwd_q) takes x and T row-wise tables with
 * one id per sample instead of V arrays: each block reads its VL samples' table rows straight into
 * the registers the transposes start from (tables.h, the value a one-id bag pass would write), so
 * the [T, B, D] lookups never exist, and the output is the same bits as the lookups then the pass.
 *
 * Backward: with G the symmetric [V, V] matrix of the pair gradients (zero diagonal),
 * grad v_k[b] = sum_j G[k][j] v_j[b] (over j = 0..V-1 in order, starting from grad x for k = 0
 * and from 0 otherwise).
 *
 * Samples are independent: split over torch's OpenMP pool (see w8a8.c) above PAR_MIN
 * multiply-adds. Returns 0, or -1 when a scratch allocation fails.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"
#include "tables.h"

#define PAR_MIN 65536
#define LANES 16

/* LANES floats as one value: kept in registers (one zmm with AVX-512, split by the compiler
 * elsewhere); a local float[LANES] went through the stack on every step and ran slower than bmm */
typedef float vlanes __attribute__((vector_size(LANES * sizeof(float))));

static inline vlanes load_lanes(const float *p) {
    vlanes v;
    memcpy(&v, p, sizeof v);
    return v;
}


#define ROWS 4 /* rows of S S^T per block pass: independent accumulator chains sharing each load */

/* The block forward on VL samples at a time, one per lane, written once over a few vector helpers:
 * AVX-512 (VL 16) or AVX2 + FMA (VL 8). Both compute every dot as fma(v_i[d], v_j[d], acc) over d in
 * order from zero, so a sample's result is the same bits on either (and on any thread count). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define SIMD_FWD 1
#define VL 16
typedef __m512 vf;
typedef __mmask16 vmask;
static inline vmask first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm512_set1_ps(a); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_abs(vf a) { return _mm512_abs_ps(a); }
static inline vf vf_loadn(vmask k, const float *p) { return _mm512_maskz_loadu_ps(k, p); }
static inline void vf_storen(float *p, vmask k, vf v) { _mm512_mask_storeu_ps(p, k, v); }
static inline void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
/* a's lanes, with b where a is below EPS (NaN stays: an ordered compare) */
static inline vf vf_floor_eps(vf a, float eps) {
    return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(a, _mm512_set1_ps(eps), _CMP_LT_OQ), _mm512_set1_ps(eps));
}
/* a's lanes, NaN where c is NaN */
static inline vf vf_nan_where_nan(vf a, vf c) { return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q), _mm512_set1_ps(NAN)); }

/* 16 x 16 floats in registers: on return r[i] holds column i (lane l = old row l) */
static inline void transpose_vl(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) {
        const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * k + 2]), d = _mm512_castps_pd(t[4 * k + 3]);
        u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int k = 0; k < 2; ++k)
        for (int m = 0; m < 4; ++m) {
            t[8 * k + m] = _mm512_shuffle_f32x4(u[8 * k + m], u[8 * k + 4 + m], 0x88);
            t[8 * k + 4 + m] = _mm512_shuffle_f32x4(u[8 * k + m], u[8 * k + 4 + m], 0xdd);
        }
    for (int m = 0; m < 8; ++m) {
        r[m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88);
        r[8 + m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0xdd);
    }
}

/* The first cnt (<= 16) lanes -> int8 codes (rows.h) */
static inline void codes_vl(vf v, vf inv, int64_t cnt, int8_t *dst) { codes16(v, inv, first_lanes(cnt), dst); }
#ifdef HAVE_ROW_VALUE16
#define row_value_vl row_value16
#define HAVE_ROW_VALUE_VL 1
#endif

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD_FWD 1
#define VL 8
typedef __m256 vf;
typedef __m256i vmask; /* all-ones lanes */
static inline vmask first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm256_set1_ps(a); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline vf vf_loadn(vmask k, const float *p) { return _mm256_maskload_ps(p, k); } /* masked lanes: 0, never read */
static inline void vf_storen(float *p, vmask k, vf v) { _mm256_maskstore_ps(p, k, v); }
static inline void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vf_floor_eps(vf a, float eps) {
    return _mm256_blendv_ps(a, _mm256_set1_ps(eps), _mm256_cmp_ps(a, _mm256_set1_ps(eps), _CMP_LT_OQ));
}
static inline vf vf_nan_where_nan(vf a, vf c) { return _mm256_blendv_ps(a, _mm256_set1_ps(NAN), _mm256_cmp_ps(c, c, _CMP_UNORD_Q)); }

/* 8 x 8 floats in registers: on return r[i] holds column i (lane l = old row l) */
static inline void transpose_vl(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int k = 0; k < 4; ++k) {
        t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {
        u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {
        r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
        r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
}

static inline void codes_vl(vf v, vf inv, int64_t cnt, int8_t *dst) { codes8(v, inv, cnt, dst); }
#ifdef HAVE_ROW_VALUE8
#define row_value_vl row_value8
#define HAVE_ROW_VALUE_VL 1
#endif
#endif

#ifdef SIMD_FWD
/* The pairs a block computes outside whole runs of 8 in one row (the last (V - 1 - i) % 8 of row i),
 * as (i, j, q) triples in row-major order; built once per call (pair_tails) and shared by every block.
 * Grouping them 8 at a time across rows keeps 8 accumulator chains busy where a chain per pair would
 * wait on the FMA latency at every step. */
typedef struct {
    int64_t i, j, q;
} pair_ref;

static int64_t pair_tails(int64_t nvec, pair_ref *tails) {
    int64_t q = 0, nt = 0;
    for (int64_t i = 0; i + 1 < nvec; ++i) {
        const int64_t runs = (nvec - 1 - i) / 8 * 8;
        q += runs;
        for (int64_t j = i + 1 + runs; j < nvec; ++j, ++q) tails[nt++] = (pair_ref){i, j, q};
    }
    return nt;
}

/* Where the V vectors come from: vecs[j], row-major [batch, dim] floats; or, with tables (w not
 * NULL), vecs[0] (the bottom MLP output) and then, for j >= 1, table t = j - 1's one-id bag of sample
 * b, id idx[t * ts + b * is]: the row-wise row's value (row_value_vl), the float a bag pass would have
 * written, read here straight into the block instead of through a [T, batch, dim] tensor. */
typedef struct {
    const float *const *vecs;
    const uint8_t *const *w;
    const int64_t *rows, *cols, *bits;
    const void *idx;
    int is64;
    int64_t ts, is, batch;
} sources;

/* Rows b0 .. b0 + n - 1 (n <= VL), columns c0 .. c0 + VL - 1 (k: those < dim) of vector j, one row per
 * register; an id outside its table sets *oob and reads as zeros */
static inline void load_rows(const sources *src, int64_t j, int64_t b0, int64_t n, int64_t dim, int64_t c0,
                             int64_t cols, vmask k, vf r[VL], int *oob) {
#ifdef HAVE_ROW_VALUE_VL
    if (src->w != NULL && j > 0) {
        const int64_t t = j - 1, nr = src->rows[t], c = src->cols[t], b8 = src->bits[t] == 8;
        const uint8_t *w = src->w[t];
        for (int64_t l = 0; l < VL; ++l) {
            r[l] = vf_zero();
            if (l >= n) continue;
            const int64_t id = id_at(src->idx, src->is64, t * src->ts + (b0 + l) * src->is);
            if ((uint64_t)id >= (uint64_t)nr)
                *oob = 1;
            else
                r[l] = row_value_vl(w + id * c, c, b8, c0, cols);
        }
        if (c0 == 0) /* the next block's rows are random reads: ask for them now */
            for (int64_t b = b0 + VL; b < b0 + 2 * VL && b < src->batch; ++b) {
                const int64_t id = id_at(src->idx, src->is64, t * src->ts + b * src->is);
                if ((uint64_t)id < (uint64_t)nr) __builtin_prefetch(w + id * c);
            }
        return;
    }
#endif
    (void)oob;
    for (int64_t l = 0; l < VL; ++l)
        r[l] = l < n ? vf_loadn(k, src->vecs[j] + (b0 + l) * dim + c0) : vf_zero();
}

/* Samples b0 .. b0 + n - 1 (n <= VL), one per lane. x: [nvec][dim] lane vectors (sample-major
 * input transposed VL x VL at a time), p: [npair] lane vectors. Each dot is
 * fma(v_i[d], v_j[d], acc) over d = 0..dim-1 in order from zero, the same for every lane, so a
 * sample's result depends neither on its position in the batch nor on the thread count (nor on
 * which group of chains computed it). tails: pair_tails' nt triples. */
static int64_t block_dots(const sources *src, int64_t b0, int64_t n, int64_t nvec, int64_t dim,
                          const pair_ref *tails, int64_t nt, vf *x, vf *p, int *oob) {
    for (int64_t j = 0; j < nvec; ++j)
        for (int64_t c0 = 0; c0 < dim; c0 += VL) {
            const int64_t cols = dim - c0 < VL ? dim - c0 : VL;
            vf r[VL];
            load_rows(src, j, b0, n, dim, c0, cols, first_lanes(cols), r, oob);
            transpose_vl(r);
            vf *dst = x + j * dim + c0;
            if (cols == VL) { /* a constant count: stored from the registers (a variable one went through the stack) */
                for (int m = 0; m < VL; ++m) dst[m] = r[m];
            } else {
                for (int64_t m = 0; m < cols; ++m) dst[m] = r[m];
            }
        }
    int64_t q = 0;
    for (int64_t i = 0; i + 1 < nvec; ++i) {
        const vf *xi = x + i * dim;
        for (int64_t j = i + 1; j + 8 <= nvec; j += 8, q += 8) { /* 8 independent chains sharing v_i's loads */
            vf a[8];
            for (int k2 = 0; k2 < 8; ++k2) a[k2] = vf_zero();
            for (int64_t d = 0; d < dim; ++d) {
                const vf v = xi[d];
                for (int k2 = 0; k2 < 8; ++k2) a[k2] = vf_fma(v, x[(j + k2) * dim + d], a[k2]);
            }
            for (int k2 = 0; k2 < 8; ++k2) p[q + k2] = a[k2];
        }
        q += (nvec - 1 - i) % 8;
    }
    for (int64_t t0 = 0; t0 < nt; t0 += 8) { /* the rest, 8 pairs of any rows at a time */
        const int64_t cnt = nt - t0 < 8 ? nt - t0 : 8;
        const vf *u[8], *w[8];
        for (int k2 = 0; k2 < 8; ++k2) { /* a short last group repeats its first pair, not stored */
            const pair_ref t = tails[t0 + (k2 < cnt ? k2 : 0)];
            u[k2] = x + t.i * dim;
            w[k2] = x + t.j * dim;
        }
        vf a[8];
        for (int k2 = 0; k2 < 8; ++k2) a[k2] = vf_zero();
        for (int64_t d = 0; d < dim; ++d)
            for (int k2 = 0; k2 < 8; ++k2) a[k2] = vf_fma(u[k2][d], w[k2][d], a[k2]);
        for (int64_t k2 = 0; k2 < cnt; ++k2) p[tails[t0 + k2].q] = a[k2];
    }
    return q;
}

/* Pairs p0 .. p0 + VL - 1 (those below q) back to sample-major: r[l] holds sample l's; returns how
 * many pair lanes exist */
static inline int64_t pairs_vl(const vf *p, int64_t p0, int64_t q, vf r[VL]) {
    const int64_t cnt = q - p0 < VL ? q - p0 : VL;
    for (int64_t m = 0; m < VL; ++m) r[m] = m < cnt ? p[p0 + m] : vf_zero();
    transpose_vl(r);
    return cnt;
}

/* block_dots's samples as sample-major float rows [x | pairs | pad zeros] of `width` floats */
static void store_block(const float *const *vecs, int64_t b0, int64_t n, int64_t dim, int64_t q, int64_t width,
                        const vf *p, float *out) {
    for (int64_t l = 0; l < n; ++l) { /* x, then zeros past the pairs */
        float *o = out + (b0 + l) * width;
        memcpy(o, vecs[0] + (b0 + l) * dim, (size_t)dim * sizeof(float));
        for (int64_t k2 = dim + q; k2 < width; ++k2) o[k2] = 0.0f;
    }
    for (int64_t p0 = 0; p0 < q; p0 += VL) {
        vf r[VL];
        const vmask k = first_lanes(pairs_vl(p, p0, q, r));
        for (int64_t l = 0; l < n; ++l) vf_storen(out + (b0 + l) * width + dim + p0, k, r[l]);
    }
}

#define EPS 1.1920928955078125e-07f /* torch.finfo(torch.float32).eps, as w8a8.c */

/* The same rows as store_block, written as w8a8.c's hw_quant_tokens_i8 would quantize them: per-row
 * (per-lane here: a lane is a sample) s = max(max|v| / 127, eps), codes clamp(rint(v / s)); a row
 * holding NaN or inf gets a NaN scale. Bit for bit hw_quant_tokens_i8 of store_block's floats for
 * finite rows (the max is exact in any order; then the same operations per value). */
static void store_block_codes(const float *const *vecs, int64_t b0, int64_t n, int64_t dim, int64_t q,
                              int64_t width, const vf *x, const vf *p, int8_t *codes, float *scales) {
    /* per lane: max |v| over the row, and whether it holds NaN or inf (v * 0 is NaN exactly then, and
     * NaN stays in a sum); four chains each, so the adds and maxes do not wait on each other */
    vf vm[4], chk[4];
    for (int c = 0; c < 4; ++c) vm[c] = chk[c] = vf_zero();
    const vf zero = vf_zero();
    for (int64_t d = 0; d < dim; ++d) { /* vector 0 (x) goes into the row as is */
        vm[d & 3] = vf_max(vm[d & 3], vf_abs(x[d]));
        chk[d & 3] = vf_add(chk[d & 3], vf_mul(x[d], zero));
    }
    int64_t i = 0;
    for (; i + 4 <= q; i += 4)
        for (int c = 0; c < 4; ++c) {
            vm[c] = vf_max(vm[c], vf_abs(p[i + c]));
            chk[c] = vf_add(chk[c], vf_mul(p[i + c], zero));
        }
    for (; i < q; ++i) {
        vm[0] = vf_max(vm[0], vf_abs(p[i]));
        chk[0] = vf_add(chk[0], vf_mul(p[i], zero));
    }
    const vf vmax = vf_max(vf_max(vm[0], vm[1]), vf_max(vm[2], vm[3]));
    const vf vchk = vf_add(vf_add(chk[0], chk[1]), vf_add(chk[2], chk[3]));
    const vf s = vf_floor_eps(vf_div(vmax, vf_set1(127.0f)), EPS);
    float inv[VL], sc[VL];
    vf_store(inv, vf_div(vf_set1(1.0f), s));
    vf_store(sc, vf_nan_where_nan(s, vchk));
    memcpy(scales + b0, sc, (size_t)n * sizeof(float));
    for (int64_t l = 0; l < n; ++l) { /* x, then zeros past the pairs */
        int8_t *o = codes + (b0 + l) * width;
        const vf vinv = vf_set1(inv[l]);
        for (int64_t c = 0; c < dim; c += VL) {
            const int64_t cnt = dim - c < VL ? dim - c : VL;
            codes_vl(vf_loadn(first_lanes(cnt), vecs[0] + (b0 + l) * dim + c), vinv, cnt, o + c);
        }
        memset(o + dim + q, 0, (size_t)(width - dim - q));
    }
    for (int64_t p0 = 0; p0 < q; p0 += VL) {
        vf r[VL];
        const int64_t cnt = pairs_vl(p, p0, q, r);
        for (int64_t l = 0; l < n; ++l) codes_vl(r[l], vf_set1(inv[l]), cnt, codes + (b0 + l) * width + dim + p0);
    }
}
#endif

#ifndef SIMD_FWD /* CPUs without AVX-512 or AVX2 + FMA: one sample at a time */
static int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

static int fwd_per_sample(const float *const *vecs, int64_t batch, int64_t nvec, int64_t dim, int64_t pad,
                           float *out) {
    const int64_t npair = nvec * (nvec - 1) / 2, width = dim + npair + pad, vp = round_up(nvec, LANES);
    int failed = 0;
#pragma omp parallel if (batch * nvec * nvec * dim >= PAR_MIN)
    {
        /* T[d][j] (zero past nvec; ROWS spare floats: a pass reads up to ROWS - 1 columns past the
         * last row it needs) and R[i][j], the rows of S S^T (ROWS spare rows for the same reason) */
        float *t = (float *)calloc((size_t)(dim * vp + ROWS + (vp + ROWS) * vp), sizeof(float));
        if (t == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *r = t + dim * vp + ROWS;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (t == NULL) continue;
            for (int64_t d = 0; d < dim; ++d) {
                float *td = t + d * vp;
                for (int64_t j = 0; j < nvec; ++j) td[j] = vecs[j][b * dim + d];
            }
            /* block jb (columns jb .. jb + LANES - 1) is needed by the rows i < min(jb + LANES, nvec) - 1 */
            for (int64_t jb = 0; jb < nvec; jb += LANES) {
                const int64_t rows = (jb + LANES < nvec ? jb + LANES : nvec) - 1;
                for (int64_t i = 0; i < rows; i += ROWS) {
                    vlanes a0 = {0.0f}, a1 = {0.0f}, a2 = {0.0f}, a3 = {0.0f};
                    for (int64_t d = 0; d < dim; ++d) {
                        const float *td = t + d * vp;
                        const vlanes v = load_lanes(td + jb);
                        a0 = a0 + td[i] * v;
                        a1 = a1 + td[i + 1] * v;
                        a2 = a2 + td[i + 2] * v;
                        a3 = a3 + td[i + 3] * v;
                    }
                    memcpy(r + i * vp + jb, &a0, sizeof a0);
                    memcpy(r + (i + 1) * vp + jb, &a1, sizeof a1);
                    memcpy(r + (i + 2) * vp + jb, &a2, sizeof a2);
                    memcpy(r + (i + 3) * vp + jb, &a3, sizeof a3);
                }
            }
            float *o = out + b * width;
            memcpy(o, vecs[0] + b * dim, (size_t)dim * sizeof(float));
            float *p = o + dim;
            for (int64_t i = 0; i + 1 < nvec; ++i) {
                memcpy(p, r + i * vp + i + 1, (size_t)(nvec - 1 - i) * sizeof(float));
                p += nvec - 1 - i;
            }
            for (int64_t k = 0; k < pad; ++k) p[k] = 0.0f;
        }
        free(t);
    }
    return failed ? -1 : 0;
}

#endif

#ifdef SIMD_FWD
/* The forward over 16-sample blocks split across threads, writing float rows (out) or, with out
 * NULL, int8 codes and scales (store_block16 / store_block16_codes). Returns 0, -1 when a scratch
 * allocation fails, 1 when an id is outside its table (src->w only). */
static int fwd_blocks(const sources *src, int64_t nvec, int64_t dim, int64_t pad, float *out, int8_t *codes,
                      float *scales) {
    const int64_t batch = src->batch, npair = nvec * (nvec - 1) / 2, width = dim + npair + pad, nblock = (batch + VL - 1) / VL;
    pair_ref *tails = (pair_ref *)malloc((size_t)(7 * nvec + 1) * sizeof(pair_ref)); /* at most 7 a row */
    if (tails == NULL) return -1;
    const int64_t nt = pair_tails(nvec, tails);
    int failed = 0, oob = 0;
#pragma omp parallel if (batch * nvec * nvec * dim >= PAR_MIN) reduction(| : oob)
    {
        vf *x = (vf *)_mm_malloc((size_t)(nvec * dim + npair + 1) * sizeof(vf), 64);
        if (x == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblock; ++blk) {
            if (x == NULL) continue;
            const int64_t b0 = blk * VL, n = batch - b0 < VL ? batch - b0 : VL;
            const int64_t q = block_dots(src, b0, n, nvec, dim, tails, nt, x, x + nvec * dim, &oob);
            if (out != NULL)
                store_block(src->vecs, b0, n, dim, q, width, x + nvec * dim, out);
            else
                store_block_codes(src->vecs, b0, n, dim, q, width, x, x + nvec * dim, codes, scales);
        }
        _mm_free(x);
    }
    free(tails);
    return failed ? -1 : (oob ? 1 : 0);
}
#endif

/* hw_dot_interaction_fwd's rows as int8 codes [batch, width] and per-row scales [batch], never
 * written as floats (the int8 input of the top MLP's first layer). Returns 0, -1 when a scratch
 * allocation fails, -2 without AVX-512 or AVX2 + FMA (the caller quantizes hw_dot_interaction_fwd's output). */
int hw_dot_interaction_fwd_q(const float *const *vecs, int64_t batch, int64_t nvec, int64_t dim, int64_t pad,
                             int8_t *codes, float *scales) {
#ifdef SIMD_FWD
    const sources src = {vecs, NULL, NULL, NULL, NULL, NULL, 0, 0, 0, batch};
    return fwd_blocks(&src, nvec, dim, pad, NULL, codes, scales);
#else
    (void)vecs, (void)batch, (void)nvec, (void)dim, (void)pad, (void)codes, (void)scales;
    return -2;
#endif
}

int hw_dot_interaction_fwd(const float *const *vecs, int64_t batch, int64_t nvec, int64_t dim, int64_t pad,
                           float *out) {
#ifdef SIMD_FWD
    const sources src = {vecs, NULL, NULL, NULL, NULL, NULL, 0, 0, 0, batch};
    return fwd_blocks(&src, nvec, dim, pad, out, NULL, NULL);
#else
    return fwd_per_sample(vecs, batch, nvec, dim, pad, out);
#endif
}

/* hw_dot_interaction_fwd (out, float rows) or hw_dot_interaction_fwd_q (out NULL: codes and scales) of
 * [x, bag_0, ..., bag_{T-1}] where bag_t is table t's one-id bag of each sample (hw_rowwise_bags with
 * offsets 0, 1, ..., batch - 1), bit for bit, without writing the bags: each block reads its rows
 * from the tables (tables and ids as hw_rowwise_bags takes them: weights, meta = rows[T], cols[T],
 * bits[T], ids idx[t * ts + b * is]). x: [batch, dim] float32. Returns 0; 1 (info = table, id) for
 * the first id, in table then position order, outside its table; -1 when a scratch allocation
 * fails; -2 without AVX-512 (BW, VL) or AVX2 + FMA + F16C (the caller runs the two ops). */
static int bags_interaction(const float *x, const uint8_t *const *weights, const int64_t *meta, int64_t ntab,
                            int64_t dim, const void *idx, int is64, int64_t ts, int64_t is, int64_t batch, int64_t pad,
                            float *out, int8_t *codes, float *scales, int64_t *info) {
#if defined(SIMD_FWD) && defined(HAVE_ROW_VALUE_VL)
    const float *xv[1] = {x};
    const sources src = {xv, weights, meta, meta + ntab, meta + 2 * ntab, idx, is64, ts, is, batch};
    const int rc = fwd_blocks(&src, ntab + 1, dim, pad, out, codes, scales);
    if (rc == 1) return first_bad_id(meta, ntab, idx, is64, ts, is, batch, info);
    return rc;
#else
    (void)x, (void)weights, (void)meta, (void)ntab, (void)dim, (void)idx, (void)is64, (void)ts, (void)is, (void)batch;
    (void)pad, (void)out, (void)codes, (void)scales, (void)info;
    return -2;
#endif
}

int hw_bags_interaction_fwd_q(const float *x, const uint8_t *const *weights, const int64_t *meta, int64_t ntab,
                              int64_t dim, const void *idx, int is64, int64_t ts, int64_t is, int64_t batch,
                              int64_t pad, int8_t *codes, float *scales, int64_t *info) {
    return bags_interaction(x, weights, meta, ntab, dim, idx, is64, ts, is, batch, pad, NULL, codes, scales, info);
}

int hw_bags_interaction_fwd(const float *x, const uint8_t *const *weights, const int64_t *meta, int64_t ntab,
                            int64_t dim, const void *idx, int is64, int64_t ts, int64_t is, int64_t batch, int64_t pad,
                            float *out, int64_t *info) {
    return bags_interaction(x, weights, meta, ntab, dim, idx, is64, ts, is, batch, pad, out, NULL, NULL, info);
}

int hw_dot_interaction_bwd(const float *grad, const float *const *vecs, int64_t batch, int64_t nvec, int64_t dim,
                           int64_t pad, float *const *grads) {
    const int64_t npair = nvec * (nvec - 1) / 2, width = dim + npair + pad;
    int failed = 0;
#pragma omp parallel if (batch * nvec * nvec * dim >= PAR_MIN)
    {
        float *g = (float *)malloc((size_t)(nvec * nvec) * sizeof(float));
        if (g == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (g == NULL) continue;
            const float *gr = grad + b * width;
            const float *gp = gr + dim;
            for (int64_t i = 0; i < nvec; ++i) {
                g[i * nvec + i] = 0.0f;
                for (int64_t j = i + 1; j < nvec; ++j) g[i * nvec + j] = g[j * nvec + i] = *gp++;
            }
            for (int64_t k = 0; k < nvec; ++k) {
                const float *gk = g + k * nvec;
                float *dst = grads[k] + b * dim;
                int64_t db = 0;
                for (; db + LANES <= dim; db += LANES) {  /* LANES columns in one register */
                    vlanes a = {0.0f};
                    if (k == 0) a = load_lanes(gr + db);
                    for (int64_t j = 0; j < nvec; ++j) a = a + gk[j] * load_lanes(vecs[j] + b * dim + db);
                    memcpy(dst + db, &a, sizeof a);
                }
                for (int64_t d = db; d < dim; ++d) {  /* the last dim % LANES columns */
                    float a = k == 0 ? gr[d] : 0.0f;
                    for (int64_t j = 0; j < nvec; ++j) a = a + gk[j] * vecs[j][b * dim + d];
                    dst[d] = a;
                }
            }
        }
        free(g);
    }
    return failed ? -1 : 0;
}
