/* What the KV-pool readers and writers share (paged_decode.c, paged_prefill.c, sparse_decode.c;
 * decode_layer.c through paged_decode.c): the stored formats' scalar conversions, one head of a stored row as float32,
 * and the AVX-512 load / reduction helpers.
 *
 * Pool formats (``dtype``): 0 float32, 1 bfloat16, 2 int8 (fp16 scale per row and KV head:
 * ``aux``), 3 int4 (groups of ``group`` channels, 16 or 32, fp16 scale ``aux`` and minimum ``aux2``
 * per group; byte i of a row holds channel 2i in its low nibble and 2i+1 in its high one).
 *
 * The code a kernel is called with (``kv code``) names the formats of both pools: 0 float32,
 * 1 bfloat16, 2 int8, and int4 as 3 + (keys in groups of 16) + 2 * (values in groups of 16):
 * 3 keys and values in groups of 32, 4 keys in 16 and values in 32, 5 keys in 32 and values in
 * 16, 6 both in 16 (codec/int4.py's ``native_code``). ``kv_pool`` builds one pool's view. */
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

/* A block pool (K or V) of Hkv heads of size d per stored row; ``group``: int4's channels per
 * scale (0: I4_GROUP). */
typedef struct { const void *data, *aux, *aux2; int dtype; int64_t Hkv, d, group; } pool_t;

#define KV_CODE_MAX 6

/* int4's group size of the keys (role 0) or values (role 1) of kv code ``code`` (3 .. 6). */
static inline int64_t i4_group(int code, int role) { return ((code - 3) >> role) & 1 ? 16 : 32; }

/* The kv code whose keys and values both have the format of ``code``'s pool ``role`` (what an
 * encoder of that one pool is called with: 3 for groups of 32, 6 for groups of 16). */
static inline int kv_pool_code(int code, int role) { return code < 3 ? code : i4_group(code, role) == 16 ? 6 : 3; }

/* Whether a kernel can read kv code ``code`` with head size d and these scale pointers. */
static inline int kv_code_ok(int code, int64_t d, const void *ka, const void *ka2, const void *va, const void *va2) {
    if (code < 0 || code > KV_CODE_MAX) return 0;
    if (code >= 2 && !(ka && va)) return 0;
    if (code >= 3 && (!(ka2 && va2) || d % i4_group(code, 0) || d % i4_group(code, 1))) return 0;
    return 1;
}

/* Pool ``role`` (0 keys, 1 values) of kv code ``code``. */
static inline pool_t kv_pool(const void *data, const void *aux, const void *aux2, int code, int role, int64_t Hkv,
                             int64_t d) {
    const pool_t p = {data, aux, aux2, code < 3 ? code : 3, Hkv, d, code < 3 ? 0 : i4_group(code, role)};
    return p;
}

/* One int4 head row (d channels: codes ``src``, fp16 scales ``sc`` and minima ``mn`` per group of
 * GS) as float32 into buf: c * s + m per channel, two roundings (no fused multiply-add), as the
 * codec's ``read``. GS and d are constants at each instance (head_row dispatches once per row),
 * so no group index is divided out at run time. */
static inline __attribute__((always_inline)) void i4_head_row(const uint8_t *src, const uint16_t *sc,
                                                             const uint16_t *mn, const int64_t d, const int64_t GS,
                                                             float *buf) {
    int64_t c0 = 0; /* channels done */
#if defined(__AVX512F__)
    for (; c0 + 32 <= d; c0 += 32) {
        /* 32 channels (16 bytes) at once, channels re-interleaved; with groups of 16 the lanes
         * 0-7 hold the first group's channels, 8-15 the second's */
        const int64_t ga = c0 / GS, gb = (c0 + 16) / GS;
        const uint8_t *b = src + c0 / 2;
        const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
        __m512 vs = _mm512_set1_ps(f16_to_f32(sc[ga])), vm = _mm512_set1_ps(f16_to_f32(mn[ga]));
        if (gb != ga) {
            vs = _mm512_mask_blend_ps(0xFF00, vs, _mm512_set1_ps(f16_to_f32(sc[gb])));
            vm = _mm512_mask_blend_ps(0xFF00, vm, _mm512_set1_ps(f16_to_f32(mn[gb])));
        }
        const __m512 lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(15))), vs), vm);
        const __m512 hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4)), vs), vm);
        const __m512i i0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i i1 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        _mm512_storeu_ps(buf + c0, _mm512_permutex2var_ps(lo, i0, hi));
        _mm512_storeu_ps(buf + c0 + 16, _mm512_permutex2var_ps(lo, i1, hi));
    }
#endif
    for (int64_t c = c0; c < d; c += 2) {
        const float s = f16_to_f32(sc[c / GS]), m = f16_to_f32(mn[c / GS]);
        const uint8_t b = src[c / 2];
        buf[c] = (float)(b & 15) * s + m;
        buf[c + 1] = (float)(b >> 4) * s + m;
    }
}

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
        const int64_t gs = p->group ? p->group : I4_GROUP, ng = d / gs;
        const uint8_t *src = (const uint8_t *)p->data + off / 2;
        const uint16_t *sc = (const uint16_t *)p->aux + (slot * p->Hkv + h) * ng;
        const uint16_t *mn = (const uint16_t *)p->aux2 + (slot * p->Hkv + h) * ng;
        if (d == 64) { /* the workload's head size: every size a constant */
            if (gs == 16) i4_head_row(src, sc, mn, 64, 16, buf);
            else i4_head_row(src, sc, mn, 64, 32, buf);
        } else if (gs == 16) i4_head_row(src, sc, mn, d, 16, buf);
        else i4_head_row(src, sc, mn, d, 32, buf);
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
