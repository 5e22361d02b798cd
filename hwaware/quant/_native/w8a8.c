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
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define EPS 1.1920928955078125e-07f /* torch.finfo(torch.float32).eps */

#ifdef __AVX512F__
static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* One row, AVX-512 (gcc's auto-vectorized generic loop ran 2-3x slower, mostly in its scalar tails). */
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
    const __m512 vinv = _mm512_set1_ps(1.0f / s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    __mmask16 nan = 0;
    for (c = 0; c < cols; c += 16) {
        __mmask16 k = tail_mask(cols - c);
        __m512 xv = _mm512_maskz_loadu_ps(k, xr + c);
        nan = _kor_mask16(nan, _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q));
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(xv, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm512_mask_cvtepi32_storeu_epi8(qr + c, k, _mm512_cvtps_epi32(v));
    }
    *scale_out = (nan || !(m <= 3.4028234663852886e+38f)) ? NAN : s;
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
        float v = rintf(xr[c] * inv); /* not nearbyintf: glibc saves/restores the FP environment around it */
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        qr[c] = (int8_t)(int32_t)v;
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

void hw_w8a8_epilogue(const int32_t *acc, int64_t rows, int64_t cols, const float *sx, const float *sw,
                      const float *bias, int relu, float *out) {
#pragma omp parallel for schedule(static) if (rows * cols >= PAR_MIN)
    for (int64_t r = 0; r < rows; ++r) epilogue_row(acc + r * cols, cols, sx[r], sw, bias, relu, out + r * cols);
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
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            if (buf == NULL) continue;
            epilogue_row(acc + r * cols, cols, sx[r], sw, bias, relu, buf);
            quant_row(buf, cols, q + r * cols, scale_out + r);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
