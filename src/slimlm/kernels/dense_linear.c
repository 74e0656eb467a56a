/* Dense linear layers for decode: y (M, N) = x (M, K) @ W^T for small M, W float32 or bfloat16 (N, K).
 *
 * Three kinds (``kind``):
 *   0  float32 W, float32 x: FMA in float32 (the de-quantized reference up to summation order).
 *   1  bfloat16 W widened to float32 in registers, float32 x: the products are exact (a bf16
 *      times an fp32 fits an fp32 FMA), so this is the bf16 matmul with fp32 activations.
 *   2  bfloat16 W, x rounded to bfloat16 (nearest even), `vdpbf16ps` (2 products per fp32 lane):
 *      llama.cpp's BF16 path; x's rounding adds a relative error of at most 2^-9 per channel.
 *      Built only where the compiler targets AVX512-BF16; elsewhere returns 3.
 * Rows of W are split between threads in blocks of NR rows (each thread one contiguous range);
 * each block is applied to every row of x while it is in L1. For the first x row the block's rows
 * are read one after the other (two accumulators per row), so a thread's reads of W from DRAM are
 * one sequential stream; for the other x rows, with W in L1, the NR rows side by side (x loaded
 * once for NR rows; each row summed in the same order, so every x row's y is bitwise what it
 * would be alone: batch invariance). Reading the NR rows side by side (NR streams 2K or 4K bytes apart, each
 * restarting every block) was 1.3x (fp32) to 2x (bf16) slower with W streamed from DRAM, as in a
 * decode step: the hardware prefetchers follow one long stream, not NR short ones
 * (docs/benchmarks.md, "dense decode step"). Any K (masked tails). The portable loops (no
 * AVX-512) are the reference; kinds 0 and 1 there give the same values up to summation order.
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

/* One row of W (K values) against one x row: two accumulators over the row, masked tail. */
static inline float row_f32x(const float *x, const void *w, int bf16, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k + 2 * DL_L <= K; k += 2 * DL_L) {
        a0 = _mm512_fmadd_ps(ld_w(w, bf16, k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(ld_w(w, bf16, k + DL_L), _mm512_loadu_ps(x + k + DL_L), a1);
    }
    for (; k < K; k += DL_L) {
        const __mmask16 mk = K - k >= DL_L ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        a0 = _mm512_fmadd_ps(ld_w_tail(w, bf16, k, mk), _mm512_maskz_loadu_ps(mk, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* 4 rows of W side by side against one x row (W in L1: x loaded once for the 4), each row summed
 * exactly as row_f32x sums it (the same two accumulators, steps and tail): bitwise the same y. */
static void rows4_f32x(const float *x, const void *w, int bf16, float *y, int64_t K) {
    const char *r0 = w, *r1 = r0 + K * (bf16 ? 2 : 4), *r2 = r1 + K * (bf16 ? 2 : 4), *r3 = r2 + K * (bf16 ? 2 : 4);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    int64_t k = 0;
    for (; k + 2 * DL_L <= K; k += 2 * DL_L) {
        const __m512 xv = _mm512_loadu_ps(x + k), xw = _mm512_loadu_ps(x + k + DL_L);
        a0 = _mm512_fmadd_ps(ld_w(r0, bf16, k), xv, a0);
        a1 = _mm512_fmadd_ps(ld_w(r0, bf16, k + DL_L), xw, a1);
        b0 = _mm512_fmadd_ps(ld_w(r1, bf16, k), xv, b0);
        b1 = _mm512_fmadd_ps(ld_w(r1, bf16, k + DL_L), xw, b1);
        c0 = _mm512_fmadd_ps(ld_w(r2, bf16, k), xv, c0);
        c1 = _mm512_fmadd_ps(ld_w(r2, bf16, k + DL_L), xw, c1);
        d0 = _mm512_fmadd_ps(ld_w(r3, bf16, k), xv, d0);
        d1 = _mm512_fmadd_ps(ld_w(r3, bf16, k + DL_L), xw, d1);
    }
    for (; k < K; k += DL_L) {
        const __mmask16 mk = K - k >= DL_L ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
        a0 = _mm512_fmadd_ps(ld_w_tail(r0, bf16, k, mk), xv, a0);
        b0 = _mm512_fmadd_ps(ld_w_tail(r1, bf16, k, mk), xv, b0);
        c0 = _mm512_fmadd_ps(ld_w_tail(r2, bf16, k, mk), xv, c0);
        d0 = _mm512_fmadd_ps(ld_w_tail(r3, bf16, k, mk), xv, d0);
    }
    y[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    y[1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    y[2] = _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
    y[3] = _mm512_reduce_add_ps(_mm512_add_ps(d0, d1));
}

/* nr rows of W (row stride K) against one x row: y[0..nr). seq: one row after the other (the
 * first x row: W comes from DRAM as one stream); else side by side (W is in L1 by then). */
static void block_f32x(const float *x, const void *w, int bf16, float *y, int nr, int64_t K, int seq) {
    const size_t es = bf16 ? 2 : 4;
    if (!seq && nr == NR) {
        rows4_f32x(x, w, bf16, y, K);
        return;
    }
    for (int i = 0; i < nr; i++) y[i] = row_f32x(x, (const char *)w + (size_t)i * K * es, bf16, K);
}
#else
static void block_f32x(const float *x, const void *w, int bf16, float *y, int nr, int64_t K, int seq) {
    (void)seq;
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
#define DP(acc, r, k) _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)((r) + (k))), \
                                       (__m512bh)_mm512_loadu_si512((const void *)(xb + (k))))
#define DP_TAIL(acc, r, k, mk) _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(mk, (r) + (k)), \
                                                (__m512bh)_mm512_loadu_si512((const void *)(xb + (k))))

/* xb: one x row in bf16, zero-padded to a multiple of 32; one row r of W: two accumulators */
static inline float row_dpbf16(const uint16_t *xb, const uint16_t *r, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = DP(a0, r, k);
        a1 = DP(a1, r, k + 32);
    }
    for (; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
        a0 = DP_TAIL(a0, r, k, mk);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* 4 rows side by side, each summed as row_dpbf16 sums it (bitwise the same y) */
static void rows4_dpbf16(const uint16_t *xb, const uint16_t *w, float *y, int64_t K) {
    const uint16_t *r0 = w, *r1 = w + K, *r2 = w + 2 * K, *r3 = w + 3 * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = DP(a0, r0, k); a1 = DP(a1, r0, k + 32);
        b0 = DP(b0, r1, k); b1 = DP(b1, r1, k + 32);
        c0 = DP(c0, r2, k); c1 = DP(c1, r2, k + 32);
        d0 = DP(d0, r3, k); d1 = DP(d1, r3, k + 32);
    }
    for (; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
        a0 = DP_TAIL(a0, r0, k, mk); b0 = DP_TAIL(b0, r1, k, mk);
        c0 = DP_TAIL(c0, r2, k, mk); d0 = DP_TAIL(d0, r3, k, mk);
    }
    y[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    y[1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    y[2] = _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
    y[3] = _mm512_reduce_add_ps(_mm512_add_ps(d0, d1));
}

/* nr rows of W against one x row; seq as for block_f32x */
static void block_dpbf16(const uint16_t *xb, const uint16_t *w, float *y, int nr, int64_t K, int seq) {
    if (!seq && nr == NR) {
        rows4_dpbf16(xb, w, y, K);
        return;
    }
    for (int i = 0; i < nr; i++) y[i] = row_dpbf16(xb, w + (size_t)i * K, K);
}
#undef DP
#undef DP_TAIL
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
            for (int64_t m = 0; m < M; m++) block_dpbf16(xb + m * Kp, wb + n0 * K, y + m * N + n0, nr, K, m == 0);
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
            block_f32x(x + m * K, (const char *)w + (size_t)n0 * K * es, kind == 1, y + m * N + n0, nr, K, m == 0);
    }
    return 0;
}
