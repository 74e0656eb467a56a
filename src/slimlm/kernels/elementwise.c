/* The memory-bound elementwise work of a decoder layer on the layer-by-layer path (prefill
 * chunks, mixed steps): RMSNorm (optionally after the residual add), SiLU(gate) * up, and RoPE,
 * each one pass over its rows instead of PyTorch's several (kernels/elementwise.py calls them).
 *
 * dtype 0 float32, 1 bfloat16. Rows are split over OpenMP threads; a row is worked on as float32
 * (a bfloat16 row is widened into a stack buffer) and every value that PyTorch rounds to the
 * tensor's dtype between two of its operators is rounded here too (to nearest even), so:
 *
 * - RMSNorm is bitwise PyTorch's `w * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(dt)`
 *   (transformers' order; for float32 the same as F.rms_norm): the sum of squares is added in the
 *   order of PyTorch's CPU sum kernel (aten cascade_sum: 8-lane vectors, 4 interleaved
 *   accumulators, 4 cascade levels, then the tail and the lanes in sequence; rows shorter than 8:
 *   its scalar path), mean = sum / D,
 *   rsqrt = 1 / sqrt. The residual add rounds once (bf16) as `x + r` does.
 * - RoPE is bitwise `x * cos + rotate_half(x) * sin` (each product rounded, then the sum).
 * - SiLU(g) * u uses its own exp (simd_math.h's exp512, ~2e-7 relative; libm's expf without
 *   AVX-512) where PyTorch uses SLEEF's: float32 results agree to a few ulp, bfloat16 ones in all
 *   but rare elements, which are one bf16 ulp apart (tests/kernels/test_elementwise.py).
 *
 * The build needs no particular CPU (plain C loops the compiler vectorises); with AVX-512, SiLU,
 * RMSNorm's passes (not its sum of squares) and RoPE run on intrinsics, 16 values at a time with
 * the same roundings (the same bits as the plain loops, which other CPUs keep). Strides are in elements between rows; the last dimension is contiguous.
 * Return codes: 0 ok, 1 bad arguments (the caller then uses PyTorch).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kv_pool.h"
#include "simd_math.h"

#define EW_ROW_MAX 16384 /* floats of a normalised row in a stack buffer (64 KB) */
#define EW_CHUNK 512     /* floats per piece of a row (SiLU, RoPE: a head of at most this size) */
#define EW_MIN_PAR 32768 /* elements below which a call stays on one thread */
#define SUM_L 8          /* PyTorch's reduction vector width for float (Vectorized<float> of its sum kernel) */
#define SUM_ILP 4
#define SUM_LEVELS 4

/* x rounded to bfloat16 (nearest even) and widened back: the value a bf16 tensor would hold */
static inline float rt_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) << 16;
    r = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) << 16 : r; /* NaN stays NaN */
    float f;
    memcpy(&f, &r, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float x) { /* branch-free f32_to_bf16, vectorisable */
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r);
}

static inline void load_row(const void *src, int dtype, int64_t n, float *dst) {
    if (dtype == 0) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t u = (uint32_t)s[i] << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
}

static inline void store_row(const float *src, int dtype, int64_t n, void *dst) {
    if (dtype == 0) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = to_bf16(src[i]);
}

static inline const char *row_at(const void *base, int64_t row, int64_t stride, int dtype) {
    return (const char *)base + row * stride * (dtype == 0 ? 4 : 2);
}

static int ceil_log2(int64_t n) {
    int k = 0;
    while (((int64_t)1 << k) < n) ++k;
    return k;
}

/* sum of v[i]^2 in the order of PyTorch's cascade_sum over a contiguous row (see the top) */
static float sum_squares(const float *v, int64_t D) {
    if (D < SUM_L) { /* PyTorch's scalar path: 4 interleaved sums, the tail into the first */
        float p[SUM_ILP] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t i = 0;
        for (; i + SUM_ILP <= D; i += SUM_ILP)
            for (int k = 0; k < SUM_ILP; ++k) {
                const float sq = v[i + k] * v[i + k];
                p[k] += sq;
            }
        for (; i < D; ++i) {
            const float sq = v[i] * v[i];
            p[0] += sq;
        }
        return ((p[0] + p[1]) + p[2]) + p[3];
    }
    const int64_t nv = D / SUM_L, size = nv / SUM_ILP;
    int lp = ceil_log2(size) / SUM_LEVELS;
    if (lp < 4) lp = 4;
    const int64_t step = (int64_t)1 << lp, mask = step - 1;
    float acc[SUM_LEVELS][SUM_ILP][SUM_L];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int k = 0; k < SUM_ILP; ++k)
                for (int l = 0; l < SUM_L; ++l) {
                    const float x = v[(i * SUM_ILP + k) * SUM_L + l];
                    const float sq = x * x;
                    acc[0][k][l] += sq;
                }
        for (int j = 1; j < SUM_LEVELS; ++j) {
            for (int k = 0; k < SUM_ILP; ++k)
                for (int l = 0; l < SUM_L; ++l) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (j * lp))) != 0) break;
        }
    }
    for (; i < size; ++i)
        for (int k = 0; k < SUM_ILP; ++k)
            for (int l = 0; l < SUM_L; ++l) {
                const float x = v[(i * SUM_ILP + k) * SUM_L + l];
                const float sq = x * x;
                acc[0][k][l] += sq;
            }
    for (int j = 1; j < SUM_LEVELS; ++j)
        for (int k = 0; k < SUM_ILP; ++k)
            for (int l = 0; l < SUM_L; ++l) acc[0][k][l] += acc[j][k][l];
    float p[SUM_L];
    for (int l = 0; l < SUM_L; ++l) p[l] = acc[0][0][l];
    for (int64_t t = size * SUM_ILP; t < nv; ++t)
        for (int l = 0; l < SUM_L; ++l) {
            const float sq = v[t * SUM_L + l] * v[t * SUM_L + l];
            p[l] += sq;
        }
    for (int k = 1; k < SUM_ILP; ++k)
        for (int l = 0; l < SUM_L; ++l) p[l] += acc[0][k][l];
    float f = 0.0f;
    for (int64_t t = nv * SUM_L; t < D; ++t) {
        const float sq = v[t] * v[t];
        f += sq;
    }
    for (int l = 0; l < SUM_L; ++l) f += p[l];
    return f;
}

#ifdef __AVX512F__
/* 16 (masked) elements as float32 */
static inline __m512 ld16m(const void *p, int64_t k, __mmask16 m, int dtype) {
    if (dtype == 0) return _mm512_maskz_loadu_ps(m, (const float *)p + k);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* float32 -> bfloat16 bits in the low halves of 32-bit lanes, rounded as to_bf16 */
static inline __m512i bf16_bits(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

static inline __m512 rt16(__m512 f) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(f), 16)); }

static inline void st16m(void *p, int64_t k, __mmask16 m, __m512 f, int dtype) {
    if (dtype == 0) _mm512_mask_storeu_ps((float *)p + k, m, f);
    else _mm256_mask_storeu_epi16((uint16_t *)p + k, m, _mm512_cvtepi32_epi16(bf16_bits(f)));
}

static inline __mmask16 tail16(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }
#endif

/* y = RMSNorm(x) * w for each row; with r (not NULL) the row is first h = x + r, written to h. */
int slimlm_rms_norm(const void *x, int64_t xs, const void *r, int64_t rs, void *h, int64_t hs, void *y, int64_t ys,
                    const void *w, int64_t rows, int64_t D, float eps, int dtype, int nthreads) {
    if (rows < 0 || D <= 0 || D > EW_ROW_MAX || (dtype != 0 && dtype != 1) || (r != NULL && h == NULL)) return 1;
    const int64_t es = dtype == 0 ? 4 : 2;
    float *wf = (float *)malloc((size_t)D * sizeof(float));
    if (wf == NULL) return 1;
    load_row(w, dtype, D, wf);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * D >= EW_MIN_PAR)
    for (int64_t i = 0; i < rows; ++i) {
        float v[EW_ROW_MAX];
#ifdef __AVX512F__
        const char *xr = row_at(x, i, xs, dtype), *rr = r != NULL ? row_at(r, i, rs, dtype) : NULL;
        for (int64_t k = 0; k < D; k += 16) { /* the same roundings as the loops below, 16 at a time */
            const __mmask16 m = tail16(D - k);
            __m512 a = ld16m(xr, k, m, dtype);
            if (rr != NULL) {
                a = _mm512_add_ps(a, ld16m(rr, k, m, dtype));
                if (dtype == 1) a = rt16(a);
                st16m((char *)h + i * hs * es, k, m, a, dtype);
            }
            _mm512_mask_storeu_ps(v + k, m, a);
        }
        const float inv = 1.0f / sqrtf(sum_squares(v, D) / (float)D + eps);
        const __m512 iv = _mm512_set1_ps(inv);
        for (int64_t k = 0; k < D; k += 16) {
            const __mmask16 m = tail16(D - k);
            __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, v + k), iv);
            if (dtype == 1) a = rt16(a);
            st16m((char *)y + i * ys * es, k, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, wf + k)), dtype);
        }
#else
        float t[EW_CHUNK];
        load_row(row_at(x, i, xs, dtype), dtype, D, v);
        if (r != NULL) {
            for (int64_t c0 = 0; c0 < D; c0 += EW_CHUNK) {
                const int64_t m = D - c0 < EW_CHUNK ? D - c0 : EW_CHUNK;
                load_row(row_at(r, i, rs, dtype) + c0 * es, dtype, m, t);
                for (int64_t k = 0; k < m; ++k) v[c0 + k] = v[c0 + k] + t[k];
                if (dtype == 1)
                    for (int64_t k = 0; k < m; ++k) v[c0 + k] = rt_bf16(v[c0 + k]);
            }
            store_row(v, dtype, D, (char *)h + i * hs * es);
        }
        const float mean = sum_squares(v, D) / (float)D;
        const float inv = 1.0f / sqrtf(mean + eps);
        for (int64_t c0 = 0; c0 < D; c0 += EW_CHUNK) {
            const int64_t m = D - c0 < EW_CHUNK ? D - c0 : EW_CHUNK;
            if (dtype == 1)
                for (int64_t k = 0; k < m; ++k) t[k] = rt_bf16(v[c0 + k] * inv) * wf[c0 + k];
            else
                for (int64_t k = 0; k < m; ++k) t[k] = (v[c0 + k] * inv) * wf[c0 + k];
            store_row(t, dtype, m, (char *)y + (i * ys + c0) * es);
        }
#endif
    }
    free(wf);
    return 0;
}


/* y = silu(g) * u, rows of n; a bf16 silu(g) is rounded before the product, as PyTorch's two ops do */
int slimlm_silu_mul(const void *g, int64_t gs, const void *u, int64_t us, void *y, int64_t ys, int64_t rows,
                    int64_t n, int dtype, int nthreads) {
    if (rows < 0 || n <= 0 || (dtype != 0 && dtype != 1)) return 1;
    const int64_t es = dtype == 0 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * n >= EW_MIN_PAR)
    for (int64_t i = 0; i < rows; ++i) {
        const char *gr = row_at(g, i, gs, dtype), *ur = row_at(u, i, us, dtype);
        char *yr = (char *)y + i * ys * es;
#ifdef __AVX512F__
        for (int64_t k = 0; k < n; k += 16) {
            const __mmask16 m = tail16(n - k);
            const __m512 x = ld16m(gr, k, m, dtype);
            __m512 a = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            if (dtype == 1) a = rt16(a);
            st16m(yr, k, m, _mm512_mul_ps(a, ld16m(ur, k, m, dtype)), dtype);
        }
#else
        float a[EW_CHUNK], b[EW_CHUNK];
        for (int64_t c0 = 0; c0 < n; c0 += EW_CHUNK) {
            const int64_t m = n - c0 < EW_CHUNK ? n - c0 : EW_CHUNK;
            load_row(gr + c0 * es, dtype, m, a);
            load_row(ur + c0 * es, dtype, m, b);
            for (int64_t k = 0; k < m; ++k) a[k] = a[k] / (1.0f + expf(-a[k]));
            if (dtype == 1)
                for (int64_t k = 0; k < m; ++k) a[k] = rt_bf16(a[k]) * b[k];
            else
                for (int64_t k = 0; k < m; ++k) a[k] = a[k] * b[k];
            store_row(a, dtype, m, yr + c0 * es);
        }
#endif
    }
    return 0;
}

/* RoPE of `heads` heads of size d per row: y = x * cos + rotate_half(x) * sin, cos/sin rows of d
 * (row i of x takes row i of cos/sin); y may be x (in place). */
int slimlm_rope(const void *x, int64_t xs, void *y, int64_t ys, const void *cos, const void *sin, int64_t cs,
                int64_t rows, int64_t heads, int64_t d, int dtype, int nthreads) {
    if (rows < 0 || heads <= 0 || d <= 0 || d % 2 || d > EW_CHUNK || (dtype != 0 && dtype != 1)) return 1;
    const int64_t half = d / 2, es = dtype == 0 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * heads * d >= EW_MIN_PAR)
    for (int64_t i = 0; i < rows; ++i) {
        float c[EW_CHUNK], s[EW_CHUNK];
        load_row(row_at(cos, i, cs, dtype), dtype, d, c);
        load_row(row_at(sin, i, cs, dtype), dtype, d, s);
#ifdef __AVX512F__
        for (int64_t hd = 0; hd < heads; ++hd) { /* the loops below, 16 pairs at a time (y may be x: both halves
                                                  * are read before either is written) */
            const char *xr = row_at(x, i, xs, dtype) + hd * d * es;
            char *yr = (char *)y + (i * ys + hd * d) * es;
            for (int64_t k = 0; k < half; k += 16) {
                const __mmask16 m = tail16(half - k);
                const __m512 x1 = ld16m(xr, k, m, dtype), x2 = ld16m(xr, k + half, m, dtype);
                __m512 a = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, c + k));
                __m512 b = _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(m, s + k));
                __m512 e = _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(m, c + k + half));
                __m512 f = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, s + k + half));
                if (dtype == 1) a = rt16(a), b = rt16(b), e = rt16(e), f = rt16(f);
                st16m(yr, k, m, _mm512_sub_ps(a, b), dtype);
                st16m(yr, k + half, m, _mm512_add_ps(e, f), dtype);
            }
        }
#else
        float p[EW_CHUNK];
        for (int64_t hd = 0; hd < heads; ++hd) {
            load_row(row_at(x, i, xs, dtype) + hd * d * es, dtype, d, p);
            if (dtype == 1)
                for (int64_t k = 0; k < half; ++k) {
                    const float x1 = p[k], x2 = p[k + half];
                    p[k] = rt_bf16(x1 * c[k]) - rt_bf16(x2 * s[k]);
                    p[k + half] = rt_bf16(x2 * c[k + half]) + rt_bf16(x1 * s[k + half]);
                }
            else
                for (int64_t k = 0; k < half; ++k) {
                    const float x1 = p[k], x2 = p[k + half];
                    p[k] = x1 * c[k] - x2 * s[k];
                    p[k + half] = x2 * c[k + half] + x1 * s[k + half];
                }
            store_row(p, dtype, d, (char *)y + (i * ys + hd * d) * es);
        }
#endif
    }
    return 0;
}

/* The KV write of a plain (unquantized) pool: row t of k (kb bytes at k + t * ks bytes) to
 * kpool + slots[t] * kb, and row t of v alike to vpool (the same slots; a slot is block *
 * block_size + offset, a pool row Hkv heads of d values). What ``index_copy_`` does for each of
 * the two, in one call, a memcpy per row instead of one indexed element at a time. Every slot is
 * checked against nslots before anything is written: 1 (nothing written) when one is out of
 * range or an argument is bad, else 0. A slot given twice gets one of its rows (which one is
 * unspecified, as for index_copy_). */
int slimlm_kv_write(const void *k, int64_t ks, const void *v, int64_t vs, const int64_t *slots, void *kpool,
                    void *vpool, int64_t nslots, int64_t rows, int64_t kb, int64_t vb, int nthreads) {
    if (rows < 0 || kb <= 0 || vb <= 0 || nslots < 0 || ks < kb || vs < vb) return 1;
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] < 0 || slots[t] >= nslots) return 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * (kb + vb) >= (1 << 20))
    for (int64_t t = 0; t < rows; ++t) {
        memcpy((char *)kpool + slots[t] * kb, (const char *)k + t * ks, (size_t)kb);
        memcpy((char *)vpool + slots[t] * vb, (const char *)v + t * vs, (size_t)vb);
    }
    return 0;
}
