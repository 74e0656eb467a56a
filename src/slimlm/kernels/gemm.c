/* Dense GEMM for many rows: C (M, N) = A (M, K) @ W^T (+ bias), W (N, K) row-major as nn.Linear
 * holds it, float32 (dtype 0) or bfloat16 (dtype 1; A and C bfloat16 too, fp32 accumulation).
 *
 * Layout: the vector lanes run over rows of A, not over output channels, so W is read in place
 * (no packed copy of the weights: a second layout would double the resident weights), and A is
 * repacked per call into 16-row groups, k-major (Ap[g][k][16] floats; for bf16 Ap[g][k/2][16]
 * 32-bit words, each the pair (A[m][k], A[m][k+1]) that one `vdpbf16ps` lane takes). The
 * micro-kernel holds a 32 x 12 tile of C in 24 zmm accumulators: per k (fp32) or k pair (bf16) it
 * loads two A vectors and broadcasts one word of each of 12 W rows (24 FMAs / dot products,
 * 14 loads). The tile is written out transposed through a small stack buffer.
 *
 * Blocking and threads: tasks are (block of MC rows of A) x (range of output channels), MC chosen
 * so a block of packed A stays in L2; a thread's consecutive tasks share the A block. Inside a
 * task, for each 12-channel tile (its W rows stay in L1) every 32-row tile of the block.
 *
 * Numerics: every C element is one fp32 accumulator updated in k order (fp32: one FMA per k;
 * bf16: one `vdpbf16ps` per k pair), whatever M, the tile it falls in or the thread count: a row's
 * output is bitwise the same alone or in any batch (batch invariance). bf16 output is rounded to
 * nearest even after the bias add.
 *
 * Built with AVX-512F/BW (fp32) and AVX512-BF16 (bf16); `slimlm_gemm_supported(dtype)` says which
 * are built here. Elsewhere the entry point returns 3 and the caller uses PyTorch.
 *
 * Return codes: 0 ok, 1 bad arguments, 2 scratch too small, 3 not built for this dtype.
 */
#include <stdint.h>
#include <string.h>
#include "kv_pool.h"

#define G_L 16   /* lanes: rows of A per group */
#define G_NR 12  /* output channels per micro-tile */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GEMM_F32 1
#endif
#if defined(GEMM_F32) && defined(__AVX512BF16__)
#define GEMM_BF16 1
#endif

int slimlm_gemm_supported(int dtype) {
#ifdef GEMM_BF16
    if (dtype == 1) return 1;
#endif
#ifdef GEMM_F32
    if (dtype == 0) return 1;
#endif
    (void)dtype;
    return 0;
}

/* 32-bit words per packed k step: fp32 one word per k, bf16 one word per k pair */
static inline int64_t gemm_ksteps(int dtype, int64_t K) { return dtype == 0 ? K : (K + 1) / 2; }

/* bytes of scratch the call needs (packed A, zero-padded to whole 32-row tiles) */
int64_t slimlm_gemm_scratch_bytes(int dtype, int64_t M, int64_t K) {
    const int64_t groups = (M + 2 * G_L - 1) / (2 * G_L) * 2;
    return groups * gemm_ksteps(dtype, K) * G_L * 4 + 64;
}

#ifdef GEMM_F32
/* Pack rows [16g, 16g + 16) of A into Ap (k-major, 16 words per step); rows >= M are zeros. */
static void pack_group(const void *a, int dtype, int64_t lda, int64_t M, int64_t K, int64_t g, uint32_t *ap) {
    const int64_t m0 = g * G_L, ks = gemm_ksteps(dtype, K);
    const int rows = (int)(M - m0 >= G_L ? G_L : (M - m0 > 0 ? M - m0 : 0));
    if (rows == 0) {
        memset(ap, 0, (size_t)ks * G_L * 4);
        return;
    }
    const __mmask16 mk = rows == G_L ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
    const int esz = dtype == 0 ? 4 : 2;
    /* byte offsets of the group's rows (masked lanes point at row m0: never read) */
    int32_t offs[G_L];
    for (int i = 0; i < G_L; i++) offs[i] = (int32_t)((i < rows ? i : 0) * lda * esz);
    const __m512i vi = _mm512_loadu_si512(offs);
    const char *base = (const char *)a + (size_t)m0 * lda * esz;
    /* whole words: fp32 every k; bf16 pairs that lie inside the row */
    const int64_t full = dtype == 0 ? K : K / 2;
    for (int64_t s = 0; s < full; s++) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, vi, base + s * 4, 1);
        _mm512_storeu_si512(ap + s * G_L, v);
    }
    if (full < ks) { /* bf16, odd K: the last pair is (A[m][K-1], 0) */
        for (int i = 0; i < G_L; i++)
            ap[full * G_L + i] = i < rows ? (uint32_t)((const uint16_t *)base)[(size_t)i * lda + K - 1] : 0u;
    }
}

/* C tile (nr channels x mr rows, acc[z][j] lanes = rows 16z + l of channel j) -> C rows, + bias */
static void store_tile(const __m512 acc[2][G_NR], int nz, int dtype, void *c, int64_t ldc, int64_t m0, int mr,
                       int64_t n0, int nr, const void *bias) {
    float t[G_NR][2 * G_L];
    for (int j = 0; j < G_NR; j++)
        for (int z = 0; z < nz; z++) _mm512_storeu_ps(&t[j][z * G_L], acc[z][j]);
    float bv[G_NR];
    for (int j = 0; j < nr; j++)
        bv[j] = !bias ? 0.f : dtype == 0 ? ((const float *)bias)[n0 + j] : bf16_to_f32(((const uint16_t *)bias)[n0 + j]);
    if (dtype == 0) {
        for (int i = 0; i < mr; i++) {
            float *cr = (float *)c + (m0 + i) * ldc + n0;
            for (int j = 0; j < nr; j++) cr[j] = t[j][i] + bv[j];
        }
    } else {
        for (int i = 0; i < mr; i++) {
            uint16_t *cr = (uint16_t *)c + (m0 + i) * ldc + n0;
            for (int j = 0; j < nr; j++) cr[j] = f32_to_bf16(t[j][i] + bv[j]);
        }
    }
}

/* The micro-kernels: NZ (1 or 2) groups of 16 rows x 12 channels. w: the tile's first W row; rows
 * past N repeat the last one (computed, not stored). One accumulator per element, k in order. */
#define UKERNEL_F32(NZ)                                                                                      \
    static void uk_f32_##NZ(const float *ap, int64_t gstride, const float *w, int64_t K, int nr,            \
                            __m512 acc[2][G_NR]) {                                                           \
        const float *r[G_NR];                                                                                \
        for (int j = 0; j < G_NR; j++) r[j] = w + (j < nr ? j : nr - 1) * K;                                 \
        __m512 c0[G_NR], c1[G_NR];                                                                           \
        for (int j = 0; j < G_NR; j++) c0[j] = c1[j] = _mm512_setzero_ps();                                  \
        const float *a1 = ap + gstride;                                                                      \
        for (int64_t k = 0; k < K; k++) {                                                                    \
            const __m512 x0 = _mm512_loadu_ps(ap + k * G_L);                                                 \
            const __m512 x1 = NZ == 2 ? _mm512_loadu_ps(a1 + k * G_L) : x0;                                  \
            for (int j = 0; j < G_NR; j++) {                                                                 \
                const __m512 b = _mm512_set1_ps(r[j][k]);                                                    \
                c0[j] = _mm512_fmadd_ps(x0, b, c0[j]);                                                       \
                if (NZ == 2) c1[j] = _mm512_fmadd_ps(x1, b, c1[j]);                                          \
            }                                                                                                \
        }                                                                                                    \
        for (int j = 0; j < G_NR; j++) {                                                                     \
            acc[0][j] = c0[j];                                                                               \
            acc[1][j] = c1[j];                                                                               \
        }                                                                                                    \
    }
UKERNEL_F32(1)
UKERNEL_F32(2)
#undef UKERNEL_F32
#endif

#ifdef GEMM_BF16
#define UKERNEL_BF16(NZ)                                                                                     \
    static void uk_bf16_##NZ(const uint32_t *ap, int64_t gstride, const uint16_t *w, int64_t K, int nr,     \
                             __m512 acc[2][G_NR]) {                                                          \
        const uint16_t *r[G_NR];                                                                             \
        for (int j = 0; j < G_NR; j++) r[j] = w + (j < nr ? j : nr - 1) * K;                                 \
        __m512 c0[G_NR], c1[G_NR];                                                                           \
        for (int j = 0; j < G_NR; j++) c0[j] = c1[j] = _mm512_setzero_ps();                                  \
        const uint32_t *a1 = ap + gstride;                                                                   \
        const int64_t kp = K / 2;                                                                            \
        for (int64_t s = 0; s < kp; s++) {                                                                   \
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(ap + s * G_L);                                  \
            const __m512bh x1 = NZ == 2 ? (__m512bh)_mm512_loadu_si512(a1 + s * G_L) : x0;                   \
            for (int j = 0; j < G_NR; j++) {                                                                 \
                uint32_t word;                                                                               \
                memcpy(&word, r[j] + 2 * s, 4);                                                              \
                const __m512bh b = (__m512bh)_mm512_set1_epi32((int)word);                                   \
                c0[j] = _mm512_dpbf16_ps(c0[j], x0, b);                                                      \
                if (NZ == 2) c1[j] = _mm512_dpbf16_ps(c1[j], x1, b);                                         \
            }                                                                                                \
        }                                                                                                    \
        if (K & 1) { /* the last pair: (W[n][K-1], 0), never reading past the row */                         \
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(ap + kp * G_L);                                 \
            const __m512bh x1 = NZ == 2 ? (__m512bh)_mm512_loadu_si512(a1 + kp * G_L) : x0;                  \
            for (int j = 0; j < G_NR; j++) {                                                                 \
                const __m512bh b = (__m512bh)_mm512_set1_epi32((int)(uint32_t)r[j][K - 1]);                  \
                c0[j] = _mm512_dpbf16_ps(c0[j], x0, b);                                                      \
                if (NZ == 2) c1[j] = _mm512_dpbf16_ps(c1[j], x1, b);                                         \
            }                                                                                                \
        }                                                                                                    \
        for (int j = 0; j < G_NR; j++) {                                                                     \
            acc[0][j] = c0[j];                                                                               \
            acc[1][j] = c1[j];                                                                               \
        }                                                                                                    \
    }
UKERNEL_BF16(1)
UKERNEL_BF16(2)
#undef UKERNEL_BF16
#endif

int slimlm_gemm(const void *a, int64_t lda, const void *w, const void *bias, void *c, int64_t ldc, int dtype,
                int64_t M, int64_t N, int64_t K, void *scratch, int64_t scratch_bytes, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || lda < K || ldc < N || (dtype != 0 && dtype != 1) || nthreads < 1) return 1;
    if (!slimlm_gemm_supported(dtype)) return 3;
#ifndef GEMM_F32
    (void)a; (void)w; (void)bias; (void)c; (void)scratch; (void)scratch_bytes;
    return 3;
#else
    if (scratch_bytes < slimlm_gemm_scratch_bytes(dtype, M, K)) return 2;
    uint32_t *ap = (uint32_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    const int64_t ks = gemm_ksteps(dtype, K), gstride = ks * G_L;
    const int64_t ngroups = (M + 2 * G_L - 1) / (2 * G_L) * 2;  /* whole 32-row tiles */
    const int nz = M <= G_L ? 1 : 2;                             /* 16-row tiles for few rows */
    const int64_t mt = nz * G_L;                                 /* rows per micro-tile */
    /* rows per task block: packed A of the block within ~384 KB (L2), whole micro-tiles */
    int64_t mc = (384 * 1024) / (ks * 4 * G_L) * G_L;
    mc = mc / mt * mt;
    if (mc < mt) mc = mt;
    const int64_t nmb = (M + mc - 1) / mc, ntiles = (N + G_NR - 1) / G_NR;
    /* channel ranges: enough tasks for the threads to share (~4 per thread), whole tiles, and where
     * it can be a task count that the threads split evenly */
    int64_t nnb = (4 * (int64_t)nthreads + nmb - 1) / nmb;
    if (nnb < 1) nnb = 1;
    for (int64_t e = nnb; e < nnb + nthreads && e <= ntiles; e++)
        if ((nmb * e) % nthreads == 0) { nnb = e; break; }
    if (nnb > ntiles) nnb = ntiles;
    const int64_t tiles_per = (ntiles + nnb - 1) / nnb;
    nnb = (ntiles + tiles_per - 1) / tiles_per;
    if (nthreads > nmb * nnb) nthreads = (int)(nmb * nnb); /* an idle thread still waits at the barrier */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < ngroups; g++) pack_group(a, dtype, lda, M, K, g, ap + g * gstride);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nmb * nnb; t++) {
            const int64_t mb = t / nnb, nb = t % nnb;
            const int64_t m_lo = mb * mc, m_hi = m_lo + mc < M ? m_lo + mc : M;
            const int64_t t_lo = nb * tiles_per, t_hi = t_lo + tiles_per < ntiles ? t_lo + tiles_per : ntiles;
            __m512 acc[2][G_NR];
            for (int64_t tn = t_lo; tn < t_hi; tn++) {
                const int64_t n0 = tn * G_NR;
                const int nr = (int)(N - n0 < G_NR ? N - n0 : G_NR);
                for (int64_t m0 = m_lo; m0 < m_hi; m0 += mt) {
                    const int mr = (int)(m_hi - m0 < mt ? m_hi - m0 : mt);
                    const uint32_t *apt = ap + (m0 / G_L) * gstride;
                    if (dtype == 0) {
                        const float *wt = (const float *)w + n0 * K;
                        if (nz == 2) uk_f32_2((const float *)apt, gstride, wt, K, nr, acc);
                        else uk_f32_1((const float *)apt, gstride, wt, K, nr, acc);
                    } else {
#ifdef GEMM_BF16
                        const uint16_t *wt = (const uint16_t *)w + n0 * K;
                        if (nz == 2) uk_bf16_2(apt, gstride, wt, K, nr, acc);
                        else uk_bf16_1(apt, gstride, wt, K, nr, acc);
#endif
                    }
                    store_tile((const __m512(*)[G_NR])acc, nz, dtype, c, ldc, m0, mr, n0, nr, bias);
                }
            }
        }
    }
    return 0;
#endif
}
