/* Dense linear layers for decode: y (M, N) = x (M, K) @ W^T for small M, W float32 or bfloat16 (N, K).
 *
 * Three kinds (``kind``):
 *   0  float32 W, float32 x: FMA in float32 (the de-quantized reference up to summation order).
 *   1  bfloat16 W widened to float32 in registers, float32 x: the products are exact (a bf16
 *      times an fp32 fits an fp32 FMA), so this is the bf16 matmul with fp32 activations.
 *   2  bfloat16 W, x rounded to bfloat16 (nearest even), `vdpbf16ps` (2 products per fp32 lane):
 *      llama.cpp's BF16 path; x's rounding adds a relative error of at most 2^-9 per channel.
 *      Built only where the compiler targets AVX512-BF16; elsewhere returns 3.
 * Rows of W are split between threads in blocks of NR rows; each block is read once and applied
 * to every row of x while it is in L1 (NR independent accumulators: no dependency chain on one
 * FMA unit). Any K (masked tails). The portable loops (no AVX-512) are the reference; kinds 0
 * and 1 there give the same values up to summation order.
 */
#include <stdint.h>
#include <stdlib.h>
#include "kv_pool.h"

#define NR 4     /* output rows per block */
#define DL_L 16  /* float lanes */

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SLIMLM_DPBF16 1
#endif

int slimlm_dense_has_dpbf16(void) {
#ifdef SLIMLM_DPBF16
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __m512 ld_w(const void *w, int bf16, int64_t k) {
    if (!bf16) return _mm512_loadu_ps((const float *)w + k);
    __m256i b = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline __m512 ld_w_tail(const void *w, int bf16, int64_t k, __mmask16 mk) {
    if (!bf16) return _mm512_maskz_loadu_ps(mk, (const float *)w + k);
    __m256i b = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)w + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* nr <= NR rows of W (row stride K) against one x row: y[0..nr) */
static void block_f32x(const float *x, const void *w, int bf16, float *y, int nr, int64_t K) {
    const size_t es = bf16 ? 2 : 4;
    const char *r[NR];
    for (int i = 0; i < NR; i++) r[i] = (const char *)w + (size_t)(i < nr ? i : 0) * K * es;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + DL_L <= K; k += DL_L) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(ld_w(r[0], bf16, k), xv, a0);
        a1 = _mm512_fmadd_ps(ld_w(r[1], bf16, k), xv, a1);
        a2 = _mm512_fmadd_ps(ld_w(r[2], bf16, k), xv, a2);
        a3 = _mm512_fmadd_ps(ld_w(r[3], bf16, k), xv, a3);
    }
    if (k < K) {
        const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
        a0 = _mm512_fmadd_ps(ld_w_tail(r[0], bf16, k, mk), xv, a0);
        a1 = _mm512_fmadd_ps(ld_w_tail(r[1], bf16, k, mk), xv, a1);
        a2 = _mm512_fmadd_ps(ld_w_tail(r[2], bf16, k, mk), xv, a2);
        a3 = _mm512_fmadd_ps(ld_w_tail(r[3], bf16, k, mk), xv, a3);
    }
    const float t[NR] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                         _mm512_reduce_add_ps(a3)};
    for (int i = 0; i < nr; i++) y[i] = t[i];
}
#else
static void block_f32x(const float *x, const void *w, int bf16, float *y, int nr, int64_t K) {
    for (int i = 0; i < nr; i++) {
        float acc[DL_L] = {0};
        int64_t k = 0;
        if (bf16) {
            const uint16_t *wr = (const uint16_t *)w + (size_t)i * K;
            for (; k + DL_L <= K; k += DL_L) {
#pragma omp simd
                for (int l = 0; l < DL_L; l++) acc[l] += bf16_to_f32(wr[k + l]) * x[k + l];
            }
            for (; k < K; k++) acc[k % DL_L] += bf16_to_f32(wr[k]) * x[k];
        } else {
            const float *wr = (const float *)w + (size_t)i * K;
            for (; k + DL_L <= K; k += DL_L) {
#pragma omp simd
                for (int l = 0; l < DL_L; l++) acc[l] += wr[k + l] * x[k + l];
            }
            for (; k < K; k++) acc[k % DL_L] += wr[k] * x[k];
        }
        float s = 0.f;
        for (int l = 0; l < DL_L; l++) s += acc[l];
        y[i] = s;
    }
}
#endif

#ifdef SLIMLM_DPBF16
/* xb: one x row in bf16, zero-padded to a multiple of 32 */
static void block_dpbf16(const uint16_t *xb, const uint16_t *w, float *y, int nr, int64_t K) {
    const uint16_t *r[NR];
    for (int i = 0; i < NR; i++) r[i] = w + (size_t)(i < nr ? i : 0) * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + k));
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(r[0] + k)), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(r[1] + k)), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512((const void *)(r[2] + k)), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512((const void *)(r[3] + k)), xv);
    }
    if (k < K) {
        const __mmask32 mk = (__mmask32)((1ull << (K - k)) - 1);
        const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + k));
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mk, r[0] + k), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(mk, r[1] + k), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(mk, r[2] + k), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(mk, r[3] + k), xv);
    }
    const float t[NR] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                         _mm512_reduce_add_ps(a3)};
    for (int i = 0; i < nr; i++) y[i] = t[i];
}
#endif

int slimlm_dense_linear(const float *x, const void *w, int kind, float *y, int64_t M, int64_t N, int64_t K,
                        int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || kind < 0 || kind > 2) return 1;
    const int64_t nblk = (N + NR - 1) / NR;
    if (kind == 2) {
#ifndef SLIMLM_DPBF16
        return 3;
#else
        const int64_t Kp = (K + 31) / 32 * 32;
        uint16_t *xb = calloc((size_t)(M * Kp), sizeof(uint16_t));
        if (!xb) return 2;
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) xb[m * Kp + k] = f32_to_bf16(x[m * K + k]);
        const uint16_t *wb = w;
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t b = 0; b < nblk; b++) {
            const int64_t n0 = b * NR;
            const int nr = (int)(N - n0 < NR ? N - n0 : NR);
            for (int64_t m = 0; m < M; m++) block_dpbf16(xb + m * Kp, wb + n0 * K, y + m * N + n0, nr, K);
        }
        free(xb);
        return 0;
#endif
    }
    const size_t es = kind == 1 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t n0 = b * NR;
        const int nr = (int)(N - n0 < NR ? N - n0 : NR);
        for (int64_t m = 0; m < M; m++)
            block_f32x(x + m * K, (const char *)w + (size_t)n0 * K * es, kind == 1, y + m * N + n0, nr, K);
    }
    return 0;
}
