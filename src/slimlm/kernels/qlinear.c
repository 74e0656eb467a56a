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

#define L 16 /* lanes: per-lane partial sums, reduced once per output (no reduction per group) */

static float hsum(const float *a) {
    float t = 0.f;
    for (int l = 0; l < L; l++) t += a[l];
    return t;
}

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
            float acc[L] = {0};
            for (int64_t g = 0; g < ng; g++) {
                const float sg = s[g];
                for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += L) {
#pragma omp simd
                    for (int l = 0; l < L; l++) acc[l] += (float)w[k0 + l] * xm[k0 + l] * sg;
                }
            }
            y[m * N + n] = hsum(acc);
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
            float acc[L] = {0}, accm = 0.f;
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
        }
    }
    free(xsum);
    return 0;
}
