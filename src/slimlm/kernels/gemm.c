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
#define G_NZ 4   /* row groups per micro-tile, at most */
#define GEMM_KC 256  /* packed words (fp32: k values, bf16: k pairs) per k block */
#define GEMM_MC 384  /* rows of A per task, at most */

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
    const int64_t groups = (M + G_NZ * G_L - 1) / (G_NZ * G_L) * G_NZ;
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

/* C tile (nr channels x mr rows; acc[z][j] lanes = rows 16z + l of channel j) -> C rows, + bias */
static void store_tile(const __m512 acc[G_NZ][G_NR], int nz, int dtype, void *c, int64_t ldc, int64_t m0, int mr,
                       int64_t n0, int nr, const void *bias) {
    float t[G_NR][G_NZ * G_L];
    for (int j = 0; j < nr; j++)
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

/* The micro-kernels: NZ groups of 16 rows x NR channels (NZ x NR = 24 accumulators, or 12 for few
 * rows) over one block of `kw` packed words (fp32: k values; bf16: k pairs) starting at word `k0`.
 * ap: the tile's packed A at word 0 (group stride gstride); w: the tile's first W row (row stride K
 * elements); rows past N repeat the last one (computed, not stored). acc: in / out (zero before the
 * first block). One accumulator per element, k in order, whatever NZ x NR and the blocking: the sums
 * are the same. Per step: NZ vector loads, NR broadcasts, NZ x NR FMAs / dot products; fewer
 * broadcasts per FMA (NZ 4 x NR 6) keep the FMA pipes busier (broadcasts take issue slots). */
#define UK_F32(NZ, NR)                                                                                       \
    static void uk_f32_##NZ##x##NR(const float *ap, int64_t gstride, const float *w, int64_t K, int64_t k0, \
                                   int64_t kw, int nr, __m512 acc[G_NZ][G_NR]) {                             \
        const float *r[NR];                                                                                  \
        for (int j = 0; j < NR; j++) r[j] = w + (j < nr ? j : nr - 1) * K + k0;                              \
        __m512 cc[NZ][NR];                                                                                   \
        for (int z = 0; z < NZ; z++)                                                                         \
            for (int j = 0; j < NR; j++) cc[z][j] = acc[z][j];                                               \
        const float *a0 = ap + k0 * G_L;                                                                     \
        for (int64_t k = 0; k < kw; k++) {                                                                   \
            __m512 x[NZ];                                                                                    \
            for (int z = 0; z < NZ; z++) x[z] = _mm512_loadu_ps(a0 + z * gstride + k * G_L);                 \
            for (int j = 0; j < NR; j++) {                                                                   \
                const __m512 b = _mm512_set1_ps(r[j][k]);                                                    \
                for (int z = 0; z < NZ; z++) cc[z][j] = _mm512_fmadd_ps(x[z], b, cc[z][j]);                  \
            }                                                                                                \
        }                                                                                                    \
        for (int z = 0; z < NZ; z++)                                                                         \
            for (int j = 0; j < NR; j++) acc[z][j] = cc[z][j];                                               \
    }
UK_F32(1, 12)
UK_F32(2, 12)
UK_F32(4, 6)
#undef UK_F32
#endif

#ifdef GEMM_BF16
/* bf16: word s of a W row is the pair (W[n][2s], W[n][2s+1]); for odd K the last word (s = K/2)
 * is (W[n][K-1], 0), never read past the row. */
#define UK_BF16(NZ, NR)                                                                                      \
    static void uk_bf16_##NZ##x##NR(const uint32_t *ap, int64_t gstride, const uint16_t *w, int64_t K,      \
                                    int64_t k0, int64_t kw, int nr, __m512 acc[G_NZ][G_NR]) {                \
        const uint16_t *r[NR];                                                                               \
        for (int j = 0; j < NR; j++) r[j] = w + (j < nr ? j : nr - 1) * K + 2 * k0;                          \
        __m512 cc[NZ][NR];                                                                                   \
        for (int z = 0; z < NZ; z++)                                                                         \
            for (int j = 0; j < NR; j++) cc[z][j] = acc[z][j];                                               \
        const uint32_t *a0 = ap + k0 * G_L;                                                                  \
        const int64_t full = k0 + kw <= K / 2 ? kw : K / 2 - k0; /* whole pairs in this block */              \
        for (int64_t s = 0; s < full; s++) {                                                                 \
            __m512bh x[NZ];                                                                                  \
            for (int z = 0; z < NZ; z++) x[z] = (__m512bh)_mm512_loadu_si512(a0 + z * gstride + s * G_L);    \
            for (int j = 0; j < NR; j++) {                                                                   \
                uint32_t word;                                                                               \
                memcpy(&word, r[j] + 2 * s, 4);                                                              \
                const __m512bh b = (__m512bh)_mm512_set1_epi32((int)word);                                   \
                for (int z = 0; z < NZ; z++) cc[z][j] = _mm512_dpbf16_ps(cc[z][j], x[z], b);                 \
            }                                                                                                \
        }                                                                                                    \
        if (full < kw) { /* odd K, the last word */                                                          \
            __m512bh x[NZ];                                                                                  \
            for (int z = 0; z < NZ; z++) x[z] = (__m512bh)_mm512_loadu_si512(a0 + z * gstride + full * G_L); \
            for (int j = 0; j < NR; j++) {                                                                   \
                const __m512bh b = (__m512bh)_mm512_set1_epi32((int)(uint32_t)r[j][2 * full]);               \
                for (int z = 0; z < NZ; z++) cc[z][j] = _mm512_dpbf16_ps(cc[z][j], x[z], b);                 \
            }                                                                                                \
        }                                                                                                    \
        for (int z = 0; z < NZ; z++)                                                                         \
            for (int j = 0; j < NR; j++) acc[z][j] = cc[z][j];                                               \
    }
UK_BF16(1, 12)
UK_BF16(2, 12)
UK_BF16(4, 6)
#undef UK_BF16
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
    /* micro-tile: 64 x 6 from 64 rows on, 32 x 12 from 17, else 16 x 12 */
    const int nz = M >= 4 * G_L ? 4 : M > G_L ? 2 : 1, ntw = nz == 4 ? 6 : G_NR;
    const int64_t mt = nz * G_L;                                 /* rows per micro-tile */
    const int64_t ngroups = (M + mt - 1) / mt * nz;              /* whole micro-tiles, zero-padded */
    /* rows per task block (whole micro-tiles, at most GEMM_MC); k in blocks of GEMM_KC words: a block of
     * the tile's 12 W rows (12 KB) stays in L1 while every micro-tile of the task's rows passes,
     * the rows' packed A block (<= GEMM_MC x GEMM_KC words, 384 KB) in L2 */
    int64_t mc = (M + mt - 1) / mt * mt;
    if (mc > GEMM_MC) mc = GEMM_MC;
    const int64_t nmb = (M + mc - 1) / mc, ntiles = (N + ntw - 1) / ntw;
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
        __m512 acc[G_NZ][G_NR];
        __m512 part[GEMM_MC / G_L][G_NR]; /* the task's accumulators between k blocks: (row group, channel) */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nmb * nnb; t++) {
            const int64_t mb = t / nnb, nb = t % nnb;
            const int64_t m_lo = mb * mc, m_hi = m_lo + mc < M ? m_lo + mc : M;
            const int64_t t_lo = nb * tiles_per, t_hi = t_lo + tiles_per < ntiles ? t_lo + tiles_per : ntiles;
            for (int64_t tn = t_lo; tn < t_hi; tn++) {
                const int64_t n0 = tn * ntw;
                const int nr = (int)(N - n0 < ntw ? N - n0 : ntw);
                for (int64_t k0 = 0; k0 < ks; k0 += GEMM_KC) {
                    const int64_t kw = ks - k0 < GEMM_KC ? ks - k0 : GEMM_KC;
                    const int last = k0 + kw == ks;
                    for (int64_t m0 = m_lo; m0 < m_hi; m0 += mt) {
                        const int mr = (int)(m_hi - m0 < mt ? m_hi - m0 : mt);
                        const int64_t pg = (m0 - m_lo) / G_L; /* the tile's first row group in `part` */
                        for (int z = 0; z < nz; z++)
                            for (int j = 0; j < ntw; j++) acc[z][j] = k0 ? part[pg + z][j] : _mm512_setzero_ps();
                        const uint32_t *apt = ap + (m0 / G_L) * gstride;
                        if (dtype == 0) {
                            const float *wt = (const float *)w + n0 * K, *at = (const float *)apt;
                            if (nz == 4) uk_f32_4x6(at, gstride, wt, K, k0, kw, nr, acc);
                            else if (nz == 2) uk_f32_2x12(at, gstride, wt, K, k0, kw, nr, acc);
                            else uk_f32_1x12(at, gstride, wt, K, k0, kw, nr, acc);
                        } else {
#ifdef GEMM_BF16
                            const uint16_t *wt = (const uint16_t *)w + n0 * K;
                            if (nz == 4) uk_bf16_4x6(apt, gstride, wt, K, k0, kw, nr, acc);
                            else if (nz == 2) uk_bf16_2x12(apt, gstride, wt, K, k0, kw, nr, acc);
                            else uk_bf16_1x12(apt, gstride, wt, K, k0, kw, nr, acc);
#endif
                        }
                        if (last) {
                            store_tile((const __m512(*)[G_NR])acc, nz, dtype, c, ldc, m0, mr, n0, nr, bias);
                        } else {
                            for (int z = 0; z < nz; z++)
                                for (int j = 0; j < ntw; j++) part[pg + z][j] = acc[z][j];
                        }
                    }
                }
            }
        }
    }
    return 0;
#endif
}
