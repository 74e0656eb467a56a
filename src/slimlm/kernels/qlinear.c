/* Linear layers on packed low-bit weights: y (M, N) = x (M, K) @ W^T for small M (decode).
 *
 * Two weight layouts (slimlm.model.quant.formats), each in groups of G input channels per row:
 *   int8: q int8 (N, K), scale float (N, K/G):             w = scale * q
 *   int4: q uint8 (N, K/2), scale, min float (N, K/G):     w = scale * q + min, q in 0..15;
 *         byte j of a group holds element j (low nibble) and element j + G/2 (high nibble),
 *         llama.cpp's Q4_0 / Q4_1 layout, so those blocks are used as they are.
 * Accumulation in float32; x is float32 (no activation quantization: the result is the
 * de-quantized matmul up to summation order). Rows of W are split between threads; each row is
 * read once and applied to every row of x while it is in L1. AVX-512 intrinsics where the
 * compiler targets it (gcc vectorized the portable loops only 4 lanes wide: 2.5-3x slower).
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define L 16 /* lanes: per-lane partial sums, reduced once per output (no reduction per group) */

#ifndef __AVX512F__
static float hsum(const float *a) {
    float t = 0.f;
    for (int l = 0; l < L; l++) t += a[l];
    return t;
}
#endif

int slimlm_q8_linear(const float *x, const int8_t *q, const float *scale, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || K % G || G % L) return 1;
    const int64_t ng = K / G;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = q + n * K;
        const float *s = scale + n * ng;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
#ifdef __AVX512F__
            __m512 acc = _mm512_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                __m512 ag = _mm512_setzero_ps();
                for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += L) {
                    __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k0))));
                    ag = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xm + k0), ag);
                }
                acc = _mm512_fmadd_ps(ag, _mm512_set1_ps(s[g]), acc);
            }
            y[m * N + n] = _mm512_reduce_add_ps(acc);
#else
            float acc[L] = {0};
            for (int64_t g = 0; g < ng; g++) {
                const float sg = s[g];
                for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += L) {
#pragma omp simd
                    for (int l = 0; l < L; l++) acc[l] += (float)w[k0 + l] * xm[k0 + l] * sg;
                }
            }
            y[m * N + n] = hsum(acc);
#endif
        }
    }
    return 0;
}

int slimlm_q4_linear(const float *x, const uint8_t *q, const float *scale, const float *mins, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || K % G || G % (2 * L)) return 1;
    const int64_t ng = K / G, h = G / 2;
    float *xsum = malloc(sizeof(float) * M * ng); /* sum of x over each group: the mins' term */
    if (!xsum) return 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            float a = 0.f;
            for (int64_t k = 0; k < G; k++) a += x[m * K + g * G + k];
            xsum[m * ng + g] = a;
        }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *w = q + n * (K / 2);
        const float *s = scale + n * ng, *mn = mins + n * ng;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K, *xs = xsum + m * ng;
            float accm = 0.f;
#ifdef __AVX512F__
            const __m128i lo4 = _mm_set1_epi8(15);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                const uint8_t *b = w + g * h;
                const float *xg = xm + g * G;
                __m512 ag = _mm512_setzero_ps();
                for (int64_t j0 = 0; j0 < h; j0 += L) {
                    __m128i bv = _mm_loadu_si128((const __m128i *)(b + j0));
                    __m512 wl = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bv, lo4)));
                    __m512 wh = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bv, 4), lo4)));
                    ag = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xg + j0), ag);
                    ag = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xg + j0 + h), ag);
                }
                acc = _mm512_fmadd_ps(ag, _mm512_set1_ps(s[g]), acc);
                accm += mn[g] * xs[g];
            }
            y[m * N + n] = _mm512_reduce_add_ps(acc) + accm;
#else
            float acc[L] = {0};
            for (int64_t g = 0; g < ng; g++) {
                const uint8_t *b = w + g * h;
                const float *xg = xm + g * G;
                const float sg = s[g];
                for (int64_t j0 = 0; j0 < h; j0 += L) {
#pragma omp simd
                    for (int l = 0; l < L; l++)
                        acc[l] += ((float)(b[j0 + l] & 15) * xg[j0 + l] + (float)(b[j0 + l] >> 4) * xg[j0 + l + h]) * sg;
                }
                accm += mn[g] * xs[g];
            }
            y[m * N + n] = hsum(acc) + accm;
#endif
        }
    }
    free(xsum);
    return 0;
}
