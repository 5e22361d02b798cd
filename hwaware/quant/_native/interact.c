/* DLRM dot interaction in one pass per sample (see hwaware/ops, hwaware::dot_interaction).
 *
 * Input: V row-major [B, D] float32 arrays (the bottom MLP output x, then one embedding per
 * table). Output row b, W = D + P + pad floats, P = V(V-1)/2:
 *     [ x[b] | dot(v_i[b], v_j[b]) for i < j in row-major order | pad zeros ]
 * which is torch.cat([x, bmm(S, S^T).flatten(1)[:, triu(offset=1)], zeros]) of hwaware's DLRM,
 * without the [B, V, D] stack, the [B, V, V] product and the two copies around it.
 *
 * Per sample the V vectors are transposed into T[d][j] (j padded to a multiple of 16 with zeros)
 * so 16 dots of row i are D multiply-adds on one register. Every dot is accumulated over
 * d = 0..D-1 in order (a multiply, then an add: the library is built with -ffp-contract=off), so
 * the result does not depend on the thread count; it differs from torch's bmm in the last bits
 * (another summation order), which tests bound against a float64 reference.
 *
 * Backward: with G the symmetric [V, V] matrix of the pair gradients (zero diagonal),
 * grad v_k[b] = sum_j G[k][j] v_j[b] (over j = 0..V-1 in order, starting from grad x for k = 0
 * and from 0 otherwise).
 *
 * Samples are independent: split over torch's OpenMP pool (see w8a8.c) above PAR_MIN
 * multiply-adds. Returns 0, or -1 when a scratch allocation fails.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

static int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

#define ROWS 4 /* rows of S S^T per block pass: independent accumulator chains sharing each load */

int hw_dot_interaction_fwd(const float *const *vecs, int64_t batch, int64_t nvec, int64_t dim, int64_t pad,
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
