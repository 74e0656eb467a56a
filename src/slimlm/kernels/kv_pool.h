/* What the KV-pool readers and writers share (paged_decode.c, paged_prefill.c, sparse_decode.c;
 * decode_layer.c through paged_decode.c): the stored formats' scalar conversions, one head of a stored row as float32,
 * and the AVX-512 load / reduction helpers.
 *
 * Pool formats (``dtype``): 0 float32, 1 bfloat16, 2 int8 (fp16 scale per row and KV head:
 * ``aux``), 3 int4 (groups of I4_GROUP channels, fp16 scale ``aux`` and minimum ``aux2``; byte i
 * of a group holds channel 2i in its low nibble and 2i+1 in its high one). */
#ifndef SLIMLM_KV_POOL_H
#define SLIMLM_KV_POOL_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define I4_GROUP 32

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h); /* exact, as the branches below */
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t u;
    if (e == 0) {
        if (m == 0) u = sign;
        else { /* subnormal: normalise */
            int sh = 0;
            uint32_t mm = m;
            while (!(mm & 0x400)) { mm <<= 1; ++sh; }
            u = sign | ((uint32_t)(113 - sh) << 23) | ((mm & 0x3ff) << 13);
        }
    } else if (e == 31) u = sign | 0x7f800000u | (m << 13);
    else u = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* A block pool (K or V) of Hkv heads of size d per stored row. */
typedef struct { const void *data, *aux, *aux2; int dtype; int64_t Hkv, d; } pool_t;

/* Head h of stored row ``slot`` as float32: a pointer into the pool for float32, else ``buf``
 * (d floats) filled with the de-quantized values. */
static inline const float *head_row(const pool_t *p, int64_t slot, int64_t h, float *buf) {
    const int64_t d = p->d, off = (slot * p->Hkv + h) * d;
    switch (p->dtype) {
    case 0:
        return (const float *)p->data + off;
    case 1: {
        const uint16_t *src = (const uint16_t *)p->data + off;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) buf[i] = bf16_to_f32(src[i]);
        return buf;
    }
    case 2: {
        const int8_t *src = (const int8_t *)p->data + off;
        const float s = f16_to_f32(((const uint16_t *)p->aux)[slot * p->Hkv + h]);
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) buf[i] = (float)src[i] * s;
        return buf;
    }
    default: {
        const int64_t ng = d / I4_GROUP;
        const uint8_t *src = (const uint8_t *)p->data + off / 2;
        const uint16_t *sc = (const uint16_t *)p->aux + (slot * p->Hkv + h) * ng;
        const uint16_t *mn = (const uint16_t *)p->aux2 + (slot * p->Hkv + h) * ng;
        for (int64_t g = 0; g < ng; ++g) {
            const float s = f16_to_f32(sc[g]), m = f16_to_f32(mn[g]);
            const uint8_t *b = src + g * I4_GROUP / 2;
            float *o = buf + g * I4_GROUP;
#if defined(__AVX512F__) && I4_GROUP == 32
            { /* the 16 bytes at once: c * s, then + m (two roundings, as below), channels re-interleaved */
                const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
                const __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m);
                const __m512 lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(15))), vs), vm);
                const __m512 hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4)), vs), vm);
                const __m512i i0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
                const __m512i i1 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
                _mm512_storeu_ps(o, _mm512_permutex2var_ps(lo, i0, hi));
                _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(lo, i1, hi));
                continue;
            }
#endif
            for (int64_t i = 0; i < I4_GROUP / 2; ++i) {
                o[2 * i] = (float)(b[i] & 15) * s + m;
                o[2 * i + 1] = (float)(b[i] >> 4) * s + m;
            }
        }
        return buf;
    }
    }
}

#ifdef __AVX512F__
/* 16 elements at ``base[idx]`` as float32 (bf16 widened in registers). */
static inline __attribute__((always_inline)) __m512 ld16(const void *base, int64_t idx, const int dtype) {
    if (dtype == 0) return _mm512_loadu_ps((const float *)base + idx);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + idx));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The sums of a0..a3, each over its 16 lanes, as one 4-lane vector (a transposing reduction:
 * about half the shuffles of four separate horizontal sums). */
static inline __attribute__((always_inline)) __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512 t2 = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
    /* each 128-bit lane of t2 now holds (a0, a1, a2, a3) partial sums; add the four lanes */
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t2), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t2), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif
#endif
