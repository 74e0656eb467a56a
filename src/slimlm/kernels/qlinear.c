/* Linear layers on packed low-bit weights: y (M, N) = x (M, K) @ W^T for small M (decode).
 *
 * Two weight layouts (slimlm.model.quant.formats), each in groups of G input channels per row:
 *   int8: q int8 (N, K), scale float (N, K/G):             w = scale * q
 *   int4: q uint8 (N, K/2), scale, min float (N, K/G):     w = scale * q + min, q in 0..15;
 *         byte j of a group holds element j (low nibble) and element j + G/2 (high nibble),
 *         llama.cpp's Q4_0 / Q4_1 layout, so those blocks are used as they are.
 * Accumulation in float32; x is float32. Rows of W are split between threads; each row is read
 * once and applied to every row of x while it is in L1.
 */
#include <stdint.h>
#include <stdlib.h>

int slimlm_q8_linear(const float *x, const int8_t *q, const float *scale, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || K % G) return 1;
    const int64_t ng = K / G;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = q + n * K;
        const float *s = scale + n * ng;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float acc = 0.f;
            for (int64_t g = 0; g < ng; g++) {
                const int8_t *wg = w + g * G;
                const float *xg = xm + g * G;
                float a = 0.f;
#pragma omp simd reduction(+ : a)
                for (int64_t k = 0; k < G; k++) a += (float)wg[k] * xg[k];
                acc += a * s[g];
            }
            y[m * N + n] = acc;
        }
    }
    return 0;
}

int slimlm_q4_linear(const float *x, const uint8_t *q, const float *scale, const float *mins, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || G % 2 || K % G) return 1;
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
            const float *xm = x + m * K;
            float acc = 0.f;
            for (int64_t g = 0; g < ng; g++) {
                const uint8_t *b = w + g * h;
                const float *xg = xm + g * G;
                float a = 0.f;
#pragma omp simd reduction(+ : a)
                for (int64_t j = 0; j < h; j++) a += (float)(b[j] & 15) * xg[j] + (float)(b[j] >> 4) * xg[j + h];
                acc += a * s[g] + mn[g] * xsum[m * ng + g];
            }
            y[m * N + n] = acc;
        }
    }
    free(xsum);
    return 0;
}
