/* Linear layers on packed low-bit weights: y (M, N) = x (M, K) @ W^T for small M (decode).
 *
 * Two weight layouts (slimlm.model.quant.formats), each in groups of G input channels per row:
 *   int8: q int8 (N, K), scale (N, K/G):               w = scale * q
 *   int4: q uint8 (N, K/2), scale, min (N, K/G):       w = scale * q + min, q in 0..15;
 *         byte j of a group holds element j (low nibble) and element j + G/2 (high nibble),
 *         llama.cpp's Q4_0 / Q4_1 layout, so those blocks are used as they are.
 * Scales and minimums are float32 or IEEE float16 (as GGUF's Q8_0 / Q4_0 / Q4_1 blocks store them,
 * half the bytes), per the flags argument ``sh``: bit 0 (QL_SCALE_F16) the scales, bit 1
 * (QL_MIN_F16) the minimums. fp16 ones are widened to float32 (exactly) one weight row at a time
 * into a per-thread buffer (F16C / AVX-512 `vcvtph2ps`, 16 a instruction) before the row is read,
 * so the inner loops are the same for both.
 * Accumulation in float32; x is float32 (no activation quantization: the result is the
 * de-quantized matmul up to summation order). Rows of W are split between threads; each row is
 * read once and applied to every row of x while it is in L1. AVX-512 intrinsics where the
 * compiler targets it (gcc vectorized the portable loops only 4 lanes wide: 2.5-3x slower).
 * These two are the reference; the *_vnni entry points below (x rounded to int8, integer dot
 * products) are what decode runs by default where the build has AVX512-VNNI, through restructured
 * loops with software prefetch for the common layouts (int4 group 32; int8 group 32, per channel or
 * a multiple of 64; K a multiple of 64), bitwise the original VNNI loops ("Restructured VNNI loops").
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QL_SCALE_F16 1 /* sh flags: scales stored as float16 */
#define QL_MIN_F16 2   /* minimums stored as float16 */

static inline int ql_tid(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* IEEE binary16 -> float32 (exact; subnormals, inf and NaN kept) */
static inline float ql_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu;
    uint32_t u;
    if (e == 31) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sign;
    else { /* subnormal: m * 2^-24, exact in float32 */
        const float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* floats a widened row of n values takes in a buffer: n rounded up to 16 (vector tails write whole) */
static inline int64_t ql_pad(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* n values at element offset off of a float32 (half = 0) or float16 (half = 1) array as float32:
 * a pointer into it, or buf (ql_pad(n) floats) filled with the widened values */
static inline const float *ql_row(const void *a, int half, int64_t off, int64_t n, float *buf) {
    if (!half) return (const float *)a + off;
    const uint16_t *h = (const uint16_t *)a + off;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (i < n) { /* the tail in one masked load (nothing read past the row) */
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + i)));
        return buf;
    }
#endif
#endif
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) buf[i] = ql_half_to_float(h[i]);
    return buf;
}

/* Per-thread buffers for a row's widened scales and minimums: 2 * ql_pad(ng) floats per thread
 * (scales, then minimums), or NULL when nothing is fp16 (*oom set when the allocation failed) */
static float *ql_scratch(int sh, int64_t ng, int nthreads, int *oom) {
    *oom = 0;
    if (!(sh & (QL_SCALE_F16 | QL_MIN_F16))) return NULL;
    float *b = malloc(sizeof(float) * 2 * (size_t)ql_pad(ng) * (size_t)(nthreads > 0 ? nthreads : 1));
    *oom = b == NULL;
    return b;
}

#define L 16 /* lanes: per-lane partial sums, reduced once per output (no reduction per group) */

#ifndef __AVX512F__
static float hsum(const float *a) {
    float t = 0.f;
    for (int l = 0; l < L; l++) t += a[l];
    return t;
}
#endif

/* xsum[m, g] = sum of x[m] over group g (G channels): the int4 minimums' term, exact in fp32 */
static void group_sums(const float *x, float *xsum, int64_t M, int64_t K, int64_t G) {
    const int64_t ng = K / G;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            float a = 0.f;
            for (int64_t k = 0; k < G; k++) a += x[m * K + g * G + k];
            xsum[m * ng + g] = a;
        }
}

int slimlm_q8_linear(const float *x, const int8_t *q, const void *scale, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int sh, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || K % G || G % L) return 1;
    const int64_t ng = K / G;
    int oom;
    float *sbuf = ql_scratch(sh, ng, nthreads, &oom);
    if (oom) return 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = q + n * K;
        const float *s = ql_row(scale, sh & QL_SCALE_F16, n * ng, ng, sbuf ? sbuf + 2 * ql_pad(ng) * ql_tid() : NULL);
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
    free(sbuf);
    return 0;
}

int slimlm_q4_linear(const float *x, const uint8_t *q, const void *scale, const void *mins, float *y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int sh, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || K % G || G % (2 * L)) return 1;
    const int64_t ng = K / G, h = G / 2;
    int oom;
    float *sbuf = ql_scratch(sh, ng, nthreads, &oom);
    float *xsum = malloc(sizeof(float) * M * ng); /* sum of x over each group: the mins' term */
    if (!xsum || oom) { free(xsum); free(sbuf); return 2; }
    group_sums(x, xsum, M, K, G);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *w = q + n * (K / 2);
        float *rb = sbuf ? sbuf + 2 * ql_pad(ng) * ql_tid() : NULL;
        const float *s = ql_row(scale, sh & QL_SCALE_F16, n * ng, ng, rb);
        const float *mn = ql_row(mins, sh & QL_MIN_F16, n * ng, ng, rb ? rb + ql_pad(ng) : NULL);
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
    free(sbuf);
    return 0;
}

/* ---- VNNI path: x quantized to int8, integer dot products ------------------------------------
 *
 * Each row of x is quantized to int8 per block of 32 channels (symmetric: xs = max|x| / 127,
 * xq = round(x / xs)); then per 32-block an integer dot product of the weight codes and xq
 * (`vpdpbusd`: u8 x s8 -> int32, 4 products per int32 lane), converted to float and scaled by
 * w_scale * xs, accumulated in float lanes and reduced once per output. llama.cpp's Q8_0 / Q8_1
 * activations, the same error: |x - xs * xq| <= xs / 2 per channel, so each output is off the
 * de-quantized fp32 matmul by at most sum over blocks of (max|x_block| / 254) * sum|w_block|
 * (the int4 mins' term uses the exact float sum of x per group, so it adds no error).
 *   int8 weights (s8 x s8): vpdpbusd takes u8 x s8, so |w| times x with w's sign (exact).
 *   int4 weights: codes are 0..15, u8 as they are; low / high nibbles of a group's bytes line
 *   up with x[0, G/2) and x[G/2, G). Groups: int8 any multiple of 32, int4 32 or a multiple of 64.
 * Built only where the compiler targets AVX512-VNNI (+BW, VL); elsewhere the entry points
 * return 3 and callers use the fp32-activation kernels above. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SLIMLM_VNNI 1
#endif

int slimlm_qlinear_has_vnni(void) {
#ifdef SLIMLM_VNNI
    return 1;
#else
    return 0;
#endif
}

#ifdef SLIMLM_VNNI
/* x (M, K) float -> xq (M, K) int8, xs (M, K/32) float; K % 32 == 0 */
static void quant_x32(const float *x, int8_t *xq, float *xs, int64_t M, int64_t K) {
    const int64_t nb = K / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + m * K + b * 32;
            __m512 a0 = _mm512_loadu_ps(xb), a1 = _mm512_loadu_ps(xb + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
            float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            __m512 iv = _mm512_set1_ps(inv);
            __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a0, iv))); /* nearest-even */
            __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a1, iv)));
            _mm_storeu_si128((__m128i *)(xq + m * K + b * 32), q0);
            _mm_storeu_si128((__m128i *)(xq + m * K + b * 32 + 16), q1);
            xs[m * nb + b] = s;
        }
}

/* xs (M, nb) -> xv (M, nb/2, 16): lanes 0-7 the even block's scale, 8-15 the odd one's (the lanes of
 * one vpdpbusd over 64 bytes) */
static void expand_xs(const float *xs, float *xv, int64_t M, int64_t nb) {
    const int64_t np = nb / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t p = 0; p < np; p++)
            for (int l = 0; l < 16; l++) xv[(m * np + p) * 16 + l] = xs[m * nb + 2 * p + (l >= 8)];
}

/* two consecutive floats -> lanes 0-7 a[0], 8-15 a[1] */
static inline __m512 pair_bcast(const float *a) {
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)a))));
}

static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#endif

/* ---- Restructured VNNI loops (the default where they apply; the loops below are their fallback) --
 *
 * ql_fast: 0 the original loops only; 1 the restructured ones; 2 (default) those with software
 * prefetch too. A batch-1 step streams every weight from DRAM once (SmolLM2-135M int4: ~90 MB a
 * token), rows in order, each thread its own contiguous range; the hardware prefetchers stop at
 * every 4 KiB page, so the loops ask for the weight bytes ~QL_PF_BYTES ahead (the rows that far
 * on: their codes one cache line per step, their scales / minimums once per 16 groups). Measured
 * on this project's AMX VM, int4 weights streamed at 1 thread: 1.6x the original loop
 * (docs/benchmarks.md, "session 14"). A prefetch never faults, so the ones past the last row are
 * harmless. Both restructured loops give the original's result bit for bit (tests/model/test_quant.py). */
static int ql_fast = 2;
#define QL_PF_BYTES 4096

int slimlm_qlinear_fast(int on) {
    const int was = ql_fast;
    if (on >= 0 && on <= 2) ql_fast = on;
    return was;
}

/* rows ahead to prefetch for rows of rb bytes (0: prefetch off) */
static inline int64_t ql_pf_rows(int64_t rb) { return ql_fast >= 2 ? (QL_PF_BYTES + rb - 1) / rb : 0; }

#ifdef SLIMLM_VNNI
/* 16 float16 (half = 1) or float32 values at element offset off of a, lanes outside k zero */
static inline __m512 ql_load16(const void *a, int half, int64_t off, __mmask16 k) {
    if (half) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)a + off));
    return _mm512_maskz_loadu_ps(k, (const float *)a + off);
}

/* slimlm_q8_linear_vnni's loop for G == 32 or G % 64 == 0 and an even number of 32-blocks, with the
 * weight's scales read in registers (no per-row widening pass: 16 at a time, fp16 widened by
 * vcvtph2ps) and the prefetch; the same operations per output in the same order, so the same bits. */
static int q8_fast(const float *x, const int8_t *q, const void *scale, float *y, int64_t M, int64_t N, int64_t K,
                   int64_t G, int sh, int nthreads) {
    const int64_t nb = K / 32, ng = K / G;
    int8_t *xq = malloc(M * K);
    float *xs = malloc(sizeof(float) * M * nb);
    float *xv2 = malloc(sizeof(float) * (M * (nb / 2) * 16 + 1));
    if (!xq || !xs || !xv2) { free(xq); free(xs); free(xv2); return 2; }
    quant_x32(x, xq, xs, M, K);
    expand_xs(xs, xv2, M, nb);
    const int half = sh & QL_SCALE_F16;
    const int64_t pf = ql_pf_rows(K);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = q + n * K;
        const __m512i zero = _mm512_setzero_si512(), two = _mm512_set1_epi32(2);
        const __m512i idx0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); /* lanes 0-7: block 0 */
        if (pf) {
            _mm_prefetch((const char *)scale + (n + pf) * ng * (half ? 2 : 4), _MM_HINT_T0);
            if (ng > 16) _mm_prefetch((const char *)scale + ((n + pf) * ng + 16) * (half ? 2 : 4), _MM_HINT_T0);
        }
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *xvm = xv2 + m * (nb / 2) * 16;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t b0 = 0; b0 < nb; b0 += 16) { /* 16 blocks (8 steps) at a time */
                const int64_t cnt = nb - b0 >= 16 ? 16 : nb - b0;
                __m512 sc = _mm512_setzero_ps();
                if (G == 32)
                    sc = ql_load16(scale, half, n * ng + b0, (__mmask16)(cnt == 16 ? 0xFFFF : (1u << cnt) - 1));
                __m512i idx = idx0;
                for (int64_t b = b0; b < b0 + cnt; b += 2) {
                    if (pf && m == 0) _mm_prefetch((const char *)(w + pf * K + b * 32), _MM_HINT_T0);
                    __m512i wv = _mm512_loadu_si512((const void *)(w + b * 32));
                    __m512i xv = _mm512_loadu_si512((const void *)(xm + b * 32));
                    __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv); /* x * sign(w) */
                    __m512i d = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), sx);
                    __m512 ws;
                    if (G == 32) ws = _mm512_permutexvar_ps(idx, sc);
                    else {
                        const int64_t o = n * ng + b * 32 / G;
                        ws = _mm512_set1_ps(half ? _cvtsh_ss(((const uint16_t *)scale)[o]) : ((const float *)scale)[o]);
                    }
                    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(xvm + b * 8)), ws, acc);
                    idx = _mm512_add_epi32(idx, two);
                }
            }
            y[m * N + n] = _mm512_reduce_add_ps(acc);
        }
    }
    free(xq); free(xs); free(xv2);
    return 0;
}
#endif

int slimlm_q8_linear_vnni(const float *x, const int8_t *q, const void *scale, float *y,
                          int64_t M, int64_t N, int64_t K, int64_t G, int sh, int nthreads) {
#ifndef SLIMLM_VNNI
    (void)x; (void)q; (void)scale; (void)y; (void)M; (void)N; (void)K; (void)G; (void)sh; (void)nthreads;
    return 3;
#else
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || K % G || G % 32) return 1;
    if (ql_fast && K % 64 == 0 && (G == 32 || G % 64 == 0)) return q8_fast(x, q, scale, y, M, N, K, G, sh, nthreads);
    const int64_t nb = K / 32, ng = K / G, bpg = G / 32;
    int oom;
    float *sbuf = ql_scratch(sh, ng, nthreads, &oom);
    int8_t *xq = malloc(M * K);
    float *xs = malloc(sizeof(float) * M * nb);
    int32_t *gi = malloc(sizeof(int32_t) * nb); /* block -> weight group */
    float *xv2 = malloc(sizeof(float) * (M * (nb / 2) * 16 + 1));
    if (!xq || !xs || !gi || !xv2 || oom) { free(xq); free(xs); free(gi); free(xv2); free(sbuf); return 2; }
    quant_x32(x, xq, xs, M, K);
    expand_xs(xs, xv2, M, nb);
    for (int64_t b = 0; b < nb; b++) gi[b] = (int32_t)(b / bpg);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = q + n * K;
        const float *s = ql_row(scale, sh & QL_SCALE_F16, n * ng, ng, sbuf ? sbuf + 2 * ql_pad(ng) * ql_tid() : NULL);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *xsm = xs + m * nb;
            const __m512i zero = _mm512_setzero_si512();
            __m512 acc = _mm512_setzero_ps();
            int64_t b = 0;
            const float *xvm = xv2 + m * (nb / 2) * 16;
            for (; b + 2 <= nb; b += 2) {
                __m512i wv = _mm512_loadu_si512((const void *)(w + b * 32));
                __m512i xv = _mm512_loadu_si512((const void *)(xm + b * 32));
                __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv); /* x * sign(w) */
                __m512i d = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), sx);
                __m512 ws = G == 32 ? pair_bcast(s + b)
                            : G % 64 == 0 ? _mm512_set1_ps(s[gi[b]])
                                          : _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[gi[b]]), _mm512_set1_ps(s[gi[b + 1]]));
                acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(xvm + b * 8)), ws, acc);
            }
            float t = _mm512_reduce_add_ps(acc);
            if (b < nb) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * 32));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xm + b * 32));
                __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
                t += hsum8(_mm256_cvtepi32_ps(d)) * (s[gi[b]] * xsm[b]);
            }
            y[m * N + n] = t;
        }
    }
    free(xq); free(xs); free(gi); free(xv2); free(sbuf);
    return 0;
#endif
}

/* ---- int4 group 32, restructured (the default where it applies; the loop above is its fallback) --
 *
 * The same arithmetic as slimlm_q4_linear_vnni's G == 32 loop, bit for bit, in fewer instructions
 * (its inner loop spent 10 port-0/5 operations per 64 weights: 5 to unpack the nibbles into the
 * [lo0 | hi0 | lo1 | hi1] order, 2 to broadcast the pair's scales from a widened buffer):
 *   - x is permuted once per call into the order the nibbles come in: in each 64-channel pair of
 *     groups the 2nd and 3rd 16-byte quarters swap ([g0 0-15 | g1 0-15 | g0 16-31 | g1 16-31]), so
 *     the weight's 32 bytes are unpacked by one broadcast load, one per-qword shift (by 0 in the low
 *     half, 4 in the high one) and one AND;
 *   - fp16 scales and minimums are widened 16 groups at a time in registers (no per-row pass through
 *     a buffer), the pair's scales picked by one permute;
 *   - two weight rows per pass share the loads of x and of its scales.
 * Each int32 lane of the dot product holds the same 4 products as one lane of the old loop (lanes
 * 4-7 and 8-11 trade places), the float steps per lane are the same, and the accumulator's 128-bit
 * quarters are put back in the old order before the same final reduction: so every output is
 * bitwise the old kernel's (tests/model/test_quant.py checks it). Needs K % 64 == 0 (an even number
 * of groups); ``slimlm_qlinear_fast(0)`` turns it off (A/B runs, the bitwise test). The gain is
 * the prefetch's (ql_fast 2): with the weights streamed from DRAM these loops without it ran as
 * fast as the old one (memory-bound at 1 thread), 1.26x faster only on weights already in L2. */
#ifdef SLIMLM_VNNI

/* R (1 or 2) weight rows from n0: y[m, n0 + r] for every row m of x */
static inline __attribute__((always_inline)) void q4g32_rows(const uint8_t *q, const void *scale, const void *mins,
                                                             int sh, float *y, int64_t n0, const int R, int64_t M,
                                                             int64_t N, int64_t K, const int8_t *xp, const float *xw,
                                                             const float *xsum) {
    const int64_t ng = K / 32, np = ng / 2;
    const __m512i zero = _mm512_setzero_si512(), lo4 = _mm512_set1_epi8(15), two = _mm512_set1_epi32(2);
    const __m512i shv = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    const __m512i idx0 = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0); /* lanes 0-3, 8-11: g0 */
    const int64_t ql_pf = ql_pf_rows(K / 2);
    for (int64_t m = 0; m < M; m++) {
        const int8_t *xm = xp + m * K;
        const float *xwm = xw + m * np * 16, *xsu = xsum + m * ng;
        __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, accv[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t g0 = 0; g0 < ng; g0 += 16) {
            const int64_t cnt = ng - g0 >= 16 ? 16 : ng - g0;
            const __mmask16 k = (__mmask16)(cnt == 16 ? 0xFFFF : (1u << cnt) - 1);
            __m512 sc[2];
            for (int r = 0; r < R; r++) {
                sc[r] = ql_load16(scale, sh & QL_SCALE_F16, (n0 + r) * ng + g0, k);
                accv[r] = _mm512_fmadd_ps(ql_load16(mins, sh & QL_MIN_F16, (n0 + r) * ng + g0, k),
                                          _mm512_maskz_loadu_ps(k, xsu + g0), accv[r]);
            }
            __m512i idx = idx0;
            if (ql_pf && m == 0) { /* the rows ql_pf ahead: their scales and minimums, then codes (one line a pair) */
                _mm_prefetch((const char *)scale + ((n0 + ql_pf) * ng + g0) * (sh & QL_SCALE_F16 ? 2 : 4), _MM_HINT_T0);
                _mm_prefetch((const char *)mins + ((n0 + ql_pf) * ng + g0) * (sh & QL_MIN_F16 ? 2 : 4), _MM_HINT_T0);
            }
            for (int64_t p = g0 / 2; p < (g0 + cnt) / 2; p++) {
                if (ql_pf && m == 0) _mm_prefetch((const char *)(q + (n0 + ql_pf) * (K / 2) + p * 64), _MM_HINT_T0);
                const __m512i xv = _mm512_loadu_si512((const void *)(xm + p * 64));
                const __m512 xsv = _mm512_loadu_ps(xwm + p * 16);
                for (int r = 0; r < R; r++) {
                    const __m512i wv = _mm512_broadcast_i64x4(
                        _mm256_loadu_si256((const __m256i *)(q + (n0 + r) * (K / 2) + p * 32)));
                    const __m512i z = _mm512_and_si512(_mm512_srlv_epi64(wv, shv), lo4);
                    const __m512i d = _mm512_dpbusd_epi32(zero, z, xv);
                    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), xsv), _mm512_permutexvar_ps(idx, sc[r]),
                                             acc[r]);
                }
                idx = _mm512_add_epi32(idx, two);
            }
        }
        for (int r = 0; r < R; r++) {
            const float t = 0.f, accm = 0.f; /* the old loop's odd-group terms: none here (ng even) */
            const __m512 a = _mm512_shuffle_f32x4(acc[r], acc[r], _MM_SHUFFLE(3, 1, 2, 0)); /* the old lane order */
            y[m * N + n0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(a, accv[r])) + t + accm;
        }
    }
}

static int q4g32_fast(const float *x, const uint8_t *q, const void *scale, const void *mins, float *y, int64_t M,
                      int64_t N, int64_t K, int sh, int nthreads) {
    const int64_t nb = K / 32, ng = nb, np = nb / 2;
    int8_t *xq = malloc(2 * M * K);
    float *xs = malloc(sizeof(float) * M * nb);
    float *xsum = malloc(sizeof(float) * M * ng);
    float *xw = malloc(sizeof(float) * M * np * 16);
    if (!xq || !xs || !xsum || !xw) { free(xq); free(xs); free(xsum); free(xw); return 2; }
    int8_t *xp = xq + M * K;
    quant_x32(x, xq, xs, M, K);
    group_sums(x, xsum, M, K, 32);
    for (int64_t i = 0; i < M * K; i += 64) { /* quarters 1 and 2 of each 64 swapped */
        memcpy(xp + i, xq + i, 16);
        memcpy(xp + i + 16, xq + i + 32, 16);
        memcpy(xp + i + 32, xq + i + 16, 16);
        memcpy(xp + i + 48, xq + i + 48, 16);
    }
    for (int64_t m = 0; m < M; m++) /* per pair: lanes 0-3, 8-11 the even block's scale, 4-7, 12-15 the odd one's */
        for (int64_t p = 0; p < np; p++)
            for (int l = 0; l < 16; l++) xw[(m * np + p) * 16 + l] = xs[m * nb + 2 * p + ((l >> 2) & 1)];
    const int64_t npairs = (N + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < npairs; i++) {
        if (2 * i + 1 < N) q4g32_rows(q, scale, mins, sh, y, 2 * i, 2, M, N, K, xp, xw, xsum);
        else q4g32_rows(q, scale, mins, sh, y, 2 * i, 1, M, N, K, xp, xw, xsum);
    }
    free(xq); free(xs); free(xsum); free(xw);
    return 0;
}
#endif

int slimlm_q4_linear_vnni(const float *x, const uint8_t *q, const void *scale, const void *mins, float *y,
                          int64_t M, int64_t N, int64_t K, int64_t G, int sh, int nthreads) {
#ifndef SLIMLM_VNNI
    (void)x; (void)q; (void)scale; (void)mins; (void)y; (void)M; (void)N; (void)K; (void)G; (void)sh; (void)nthreads;
    return 3;
#else
    if (M <= 0 || N <= 0 || K <= 0 || G <= 0 || K % G || !(G == 32 || G % 64 == 0)) return 1;
    if (ql_fast && G == 32 && K % 64 == 0) return q4g32_fast(x, q, scale, mins, y, M, N, K, sh, nthreads);
    const int64_t nb = K / 32, ng = K / G, h = G / 2;
    int oom;
    float *sbuf = ql_scratch(sh, ng, nthreads, &oom);
    int8_t *xq = malloc(M * K);
    float *xs = malloc(sizeof(float) * M * nb);
    float *xsum = malloc(sizeof(float) * M * ng); /* exact sum of x over each group: the mins' term */
    float *xv2 = malloc(sizeof(float) * (M * (nb / 2) * 16 + 1));
    if (!xq || !xs || !xsum || !xv2 || oom) { free(xq); free(xs); free(xsum); free(xv2); free(sbuf); return 2; }
    quant_x32(x, xq, xs, M, K);
    expand_xs(xs, xv2, M, nb);
    group_sums(x, xsum, M, K, G);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *w = q + n * (K / 2);
        float *rb = sbuf ? sbuf + 2 * ql_pad(ng) * ql_tid() : NULL;
        const float *s = ql_row(scale, sh & QL_SCALE_F16, n * ng, ng, rb);
        const float *mn = ql_row(mins, sh & QL_MIN_F16, n * ng, ng, rb ? rb + ql_pad(ng) : NULL);
        const __m256i lo4 = _mm256_set1_epi8(15);
        const __m512i zero = _mm512_setzero_si512();
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *xsm = xs + m * nb, *xsu = xsum + m * ng;
            __m512 acc = _mm512_setzero_ps();
            float t = 0.f, accm = 0.f;
            __m512 accv = _mm512_setzero_ps();
            if (G == 32) { /* two groups per step: 32 bytes -> [lo0 | hi0 | lo1 | hi1] = x[64g .. 64g+64) */
                const float *xvm = xv2 + m * (nb / 2) * 16;
                int64_t g = 0;
                for (; g + 2 <= ng; g += 2) {
                    __m256i bv = _mm256_loadu_si256((const __m256i *)(w + g * 16));
                    __m256i lo = _mm256_and_si256(bv, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(bv, 4), lo4);
                    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); /* lo0 lo1 hi0 hi1 */
                    z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));             /* lo0 hi0 lo1 hi1 */
                    __m512i d = _mm512_dpbusd_epi32(zero, z, _mm512_loadu_si512((const void *)(xm + g * 32)));
                    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(xvm + g * 8)),
                                          pair_bcast(s + g), acc);
                }
                for (int64_t g0 = 0; g0 < g; g0 += 16) { /* the mins' term, 16 groups a step */
                    __mmask16 k = (__mmask16)(g - g0 >= 16 ? 0xFFFF : (1u << (g - g0)) - 1);
                    accv = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, mn + g0), _mm512_maskz_loadu_ps(k, xsu + g0), accv);
                }
                if (g < ng) {
                    __m128i bv = _mm_loadu_si128((const __m128i *)(w + g * 16));
                    __m128i l4 = _mm_set1_epi8(15);
                    __m128i lo = _mm_and_si128(bv, l4), hi = _mm_and_si128(_mm_srli_epi16(bv, 4), l4);
                    __m256i z = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
                    __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), z,
                                                    _mm256_loadu_si256((const __m256i *)(xm + g * 32)));
                    t += hsum8(_mm256_cvtepi32_ps(d)) * (s[g] * xsm[g]);
                    accm += mn[g] * xsu[g];
                }
            } else { /* G % 64 == 0: 32 bytes of a group -> x[j0, j0+32) (low) and x[h+j0, h+j0+32) (high) */
                for (int64_t g = 0; g < ng; g++) {
                    const uint8_t *bg = w + g * h;
                    const int8_t *xg = xm + g * G;
                    const float *xsg = xsm + g * (G / 32);
                    for (int64_t j0 = 0; j0 < h; j0 += 32) {
                        __m256i bv = _mm256_loadu_si256((const __m256i *)(bg + j0));
                        __m256i lo = _mm256_and_si256(bv, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(bv, 4), lo4);
                        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                        __m512i xv = _mm512_inserti64x4(
                            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xg + j0))),
                            _mm256_loadu_si256((const __m256i *)(xg + h + j0)), 1);
                        __m512i d = _mm512_dpbusd_epi32(zero, z, xv);
                        __m512 dv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[g] * xsg[j0 / 32]),
                                                         _mm512_set1_ps(s[g] * xsg[(h + j0) / 32]));
                        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), dv, acc);
                    }
                    accm += mn[g] * xsu[g];
                }
            }
            y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc, accv)) + t + accm;
        }
    }
    free(xq); free(xs); free(xsum); free(xv2); free(sbuf);
    return 0;
#endif
}

/* ---- De-quantization (prefill: more rows than the decode kernels take) ------------------------
 *
 * out (N, K) = the packed weight's values, float32 (obf16 = 0) or bfloat16 (obf16 = 1, rounded to
 * nearest even from the float32 value, as torch's .to(bfloat16)). The same arithmetic as the
 * PyTorch reference (formats.py: codes as float, times the scale, plus the minimum; two roundings,
 * no FMA), so the result is bit-identical to it; written straight into the caller's buffer with no
 * temporaries (the PyTorch path makes three: the codes, their float copy, the dtype cast). */
static inline uint16_t ql_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* row (K floats) -> out row n, in the output dtype */
static inline void ql_store_row(void *out, int obf16, int64_t n, int64_t K, const float *row) {
    if (!obf16) return;
    uint16_t *o = (uint16_t *)out + n * K;
    for (int64_t k = 0; k < K; k++) o[k] = ql_f32_to_bf16(row[k]);
}

int slimlm_q8_dequant(const int8_t *q, const void *scale, int sh, void *out, int obf16, int64_t N, int64_t K,
                      int64_t G, int nthreads) {
    if (N <= 0 || K <= 0 || G <= 0 || K % G) return 1;
    const int64_t ng = K / G;
    const int64_t st = 2 * ql_pad(ng) + (obf16 ? K : 0); /* per thread: scales, minimums, a bf16 row's floats */
    float *buf = malloc(sizeof(float) * (size_t)st * (size_t)(nthreads > 0 ? nthreads : 1));
    if (!buf) return 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float *tb = buf + st * ql_tid();
        const float *s = ql_row(scale, sh & QL_SCALE_F16, n * ng, ng, tb);
        float *row = obf16 ? tb + 2 * ql_pad(ng) : (float *)out + n * K;
        const int8_t *w = q + n * K;
        for (int64_t g = 0; g < ng; g++) {
            const float sg = s[g];
            for (int64_t k = g * G; k < (g + 1) * G; k++) row[k] = (float)w[k] * sg;
        }
        ql_store_row(out, obf16, n, K, row);
    }
    free(buf);
    return 0;
}

int slimlm_q4_dequant(const uint8_t *q, const void *scale, const void *mins, int sh, void *out, int obf16,
                      int64_t N, int64_t K, int64_t G, int nthreads) {
    if (N <= 0 || K <= 0 || G <= 0 || K % G || G % 2) return 1;
    const int64_t ng = K / G, h = G / 2;
    const int64_t st = 2 * ql_pad(ng) + (obf16 ? K : 0); /* per thread: scales, minimums, a bf16 row's floats */
    float *buf = malloc(sizeof(float) * (size_t)st * (size_t)(nthreads > 0 ? nthreads : 1));
    if (!buf) return 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float *tb = buf + st * ql_tid();
        const float *s = ql_row(scale, sh & QL_SCALE_F16, n * ng, ng, tb);
        const float *mn = ql_row(mins, sh & QL_MIN_F16, n * ng, ng, tb + ql_pad(ng));
        float *row = obf16 ? tb + 2 * ql_pad(ng) : (float *)out + n * K;
        const uint8_t *w = q + n * (K / 2);
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *b = w + g * h;
            float *rg = row + g * G;
            const float sg = s[g], mg = mn[g];
            int64_t j = 0;
#ifdef __AVX512F__
            const __m512 sv = _mm512_set1_ps(sg), mv = _mm512_set1_ps(mg);
            const __m128i lo4 = _mm_set1_epi8(15);
            for (; j + 16 <= h; j += 16) {
                __m128i bv = _mm_loadu_si128((const __m128i *)(b + j));
                __m512 wl = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bv, lo4)));
                __m512 wh = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bv, 4), lo4)));
                _mm512_storeu_ps(rg + j, _mm512_add_ps(_mm512_mul_ps(wl, sv), mv));
                _mm512_storeu_ps(rg + h + j, _mm512_add_ps(_mm512_mul_ps(wh, sv), mv));
            }
#endif
            for (; j < h; j++) {
                rg[j] = (float)(b[j] & 15) * sg + mg;
                rg[h + j] = (float)(b[j] >> 4) * sg + mg;
            }
        }
        ql_store_row(out, obf16, n, K, row);
    }
    free(buf);
    return 0;
}
