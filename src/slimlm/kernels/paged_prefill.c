/* Paged causal prefill attention on the CPU for bfloat16 KV caches, with AVX512-BF16 dot products.
 *
 * One call serves one prefill chunk of one sequence: T query tokens at positions q_start ..
 * q_start + T - 1 attend causally to the sequence's first q_start + T keys, read from the block
 * pool through its block table (the chunk's own keys are already written there).
 *
 * q    bf16, row t / head h at q + t * qs_t + h * qs_h (head dim contiguous)
 * k, v (num_blocks, block_size, Hkv, d) bf16
 * table (ceil(n / block_size),) int64: physical block of each logical block
 * out  bf16, row t / head h at out + t * os_t + h * os_h
 *
 * Two phases, each one OpenMP parallel region (only GOMP_parallel is needed, as in paged_decode.c):
 *  1. repack: each KV head's keys into groups of 16 keys x (d/2) dimension pairs, and its values
 *     into key pairs x (d/16) blocks of 16 dimensions: the layouts ``vdpbf16ps`` consumes;
 *  2. tiles of R = 6 consecutive query rows of one head, handed out largest first through an
 *     atomic counter. A tile computes its fp32 scores against every key it may see (6 x 64 per
 *     register block), a stable softmax per row (an exact-to-1e-7 vectorised exp, masked keys are
 *     exactly 0), rounds the probabilities to bf16 as flash-attention kernels do, then accumulates
 *     P V in fp32 and divides by the fp32 row sum once.
 * Work per tile is two passes over the repacked K and V of one head, which stay in L2 while
 * the tiles of that head are served.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SLIMLM_HAVE_BF16 1
#endif

#define R 6   /* query rows per tile */
#define NK 4  /* key groups of 16 per score block */

int slimlm_prefill_supported(int64_t d) {
#ifdef SLIMLM_HAVE_BF16
    return d > 0 && d % 64 == 0 && d <= 256;
#else
    (void)d;
    return 0;
#endif
}

#ifdef SLIMLM_HAVE_BF16
/* exp(x) for x <= 0, relative error ~2e-7: 2^n * p(r) with a two-constant ln 2 reduction. */
static inline __attribute__((always_inline)) __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

typedef struct {
    const uint16_t *k, *v;
    const int64_t *table;
    uint32_t *kp, *vp;
    int64_t n, nkg, nkp, Hkv, d, bs;
    int64_t next;
} repack_args;

static inline const uint16_t *key_row(const uint16_t *pool, const int64_t *table, int64_t key, int64_t bs,
                                      int64_t W, int64_t g, int64_t d) {
    return pool + (table[key / bs] * bs + key % bs) * W + g * d;
}

/* Work items: (head, group of 16 keys). K: kp[((g * nkg + kg) * d/2 + c2) * 16 + lane] holds the
 * dimension pair c2 of key 16 kg + lane. V: vp[((g * nkp + p) * d/16 + cb) * 16 + lane] holds
 * dimension 16 cb + lane of keys 2p and 2p + 1. Keys past n are zero. */
static void repack(repack_args *a) {
    const int64_t d = a->d, W = a->Hkv * d, half = d / 2, nvb = d / 16;
    for (;;) {
        const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
        if (item >= a->Hkv * a->nkg) break;
        const int64_t g = item / a->nkg, kg = item % a->nkg;
        uint32_t *dst = a->kp + (g * a->nkg + kg) * half * 16;
        for (int lane = 0; lane < 16; ++lane) {
            const int64_t key = kg * 16 + lane;
            if (key < a->n) {
                const uint32_t *src = (const uint32_t *)key_row(a->k, a->table, key, a->bs, W, g, d);
                for (int64_t c2 = 0; c2 < half; ++c2) dst[c2 * 16 + lane] = src[c2];
            } else {
                for (int64_t c2 = 0; c2 < half; ++c2) dst[c2 * 16 + lane] = 0;
            }
        }
        for (int64_t p = kg * 8; p < kg * 8 + 8 && p < a->nkp; ++p) {
            uint32_t *vd = a->vp + (g * a->nkp + p) * nvb * 16;
            const int64_t k0 = 2 * p, k1 = 2 * p + 1;
            for (int64_t cb = 0; cb < nvb; ++cb) {
                const __m256i zero = _mm256_setzero_si256();
                const __m256i lo = k0 < a->n ? _mm256_loadu_si256((const __m256i *)(key_row(a->v, a->table, k0, a->bs, W, g, d) + 16 * cb)) : zero;
                const __m256i hi = k1 < a->n ? _mm256_loadu_si256((const __m256i *)(key_row(a->v, a->table, k1, a->bs, W, g, d) + 16 * cb)) : zero;
                const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
                _mm512_storeu_si512((void *)(vd + cb * 16), pair);
            }
        }
    }
}

typedef struct {
    const uint16_t *q;
    uint16_t *out;
    const uint32_t *kp, *vp;
    int64_t qs_t, qs_h, os_t, os_h;
    int64_t T, q_start, Hq, Hkv, d, nkg, nkp, ntiles;
    float scale;
    int64_t next;
    int failed;
} tile_args;

static _Thread_local float *tl_s = NULL;
static _Thread_local uint16_t *tl_p = NULL;
static _Thread_local int64_t tl_cap = 0;

/* One tile: rows t0 .. t0 + R - 1 of query head h. */
static inline void tile(const tile_args *a, int64_t h, int64_t t0, float *S, uint16_t *P, int64_t ldS) {
    const int64_t d = a->d, half = d / 2, nvb = d / 16, g = h / (a->Hq / a->Hkv);
    const int64_t rows = a->T - t0 < R ? a->T - t0 : R;
    const uint32_t *qr[R];
    int64_t lim[R];
    for (int r = 0; r < R; ++r) {
        const int64_t t = t0 + (r < rows ? r : 0);
        qr[r] = (const uint32_t *)(a->q + t * a->qs_t + h * a->qs_h);
        lim[r] = a->q_start + t + 1;
    }
    const int64_t n_tile = lim[rows - 1];
    const int64_t groups = (n_tile + 15) / 16;
    /* scores, NK groups of 16 keys at a time (K is padded with zero keys to a multiple of NK groups) */
    const __m512 sc = _mm512_set1_ps(a->scale);
    for (int64_t kg = 0; kg < groups; kg += NK) {
        __m512 acc[R][NK];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_setzero_ps();
        const uint32_t *kb = a->kp + (g * a->nkg + kg) * half * 16;
        for (int64_t c2 = 0; c2 < half; ++c2) {
            __m512bh kv[NK];
            for (int j = 0; j < NK; ++j) kv[j] = (__m512bh)_mm512_loadu_si512((const void *)(kb + (j * half + c2) * 16));
            for (int r = 0; r < R; ++r) {
                const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qr[r][c2]);
                for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qb, kv[j]);
            }
        }
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NK; ++j) _mm512_storeu_ps(S + r * ldS + (kg + j) * 16, _mm512_mul_ps(acc[r][j], sc));
    }
    /* softmax rows: probabilities as bf16 pairs, zero past each row's limit up to an even count */
    const int64_t npair = (n_tile + 1) / 2, ncols = 2 * npair;
    float inv[R];
    for (int r = 0; r < R; ++r) {
        const float *s = S + r * ldS;
        uint16_t *p = P + r * ldS;
        const int64_t n = lim[r];
        __m512 mv = _mm512_set1_ps(-INFINITY);
        int64_t k = 0;
        for (; k + 16 <= n; k += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + k));
        if (k < n) mv = _mm512_mask_max_ps(mv, (__mmask16)((1u << (n - k)) - 1), mv, _mm512_loadu_ps(s + k));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        __m512 sum = _mm512_setzero_ps();
        for (k = 0; k + 16 <= n; k += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + k), m));
            const __m256bh eb = _mm512_cvtneps_pbh(e);
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(p + k), (__m256i)eb);
        }
        for (; k < ncols; k += 16) { /* the partial vector and the zero padding */
            const int64_t left = n - k;
            const __mmask16 live = left <= 0 ? 0 : left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + k), m)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(p + k), (__m256i)_mm512_cvtneps_pbh(e));
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    /* P V over key pairs, output dimensions in blocks of 64 */
    for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) {
        __m512 acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
        const uint32_t *vb = a->vp + g * a->nkp * nvb * 16 + cb0 * 16;
        for (int64_t pi = 0; pi < npair; ++pi) {
            __m512bh vv[4];
            for (int j = 0; j < 4; ++j) vv[j] = (__m512bh)_mm512_loadu_si512((const void *)(vb + (pi * nvb + j) * 16));
            for (int r = 0; r < R; ++r) {
                const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)((const uint32_t *)(P + r * ldS))[pi]);
                for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, vv[j]);
            }
        }
        for (int r = 0; r < rows; ++r) {
            uint16_t *o = a->out + (t0 + r) * a->os_t + h * a->os_h + cb0 * 16;
            const __m512 w = _mm512_set1_ps(inv[r]);
            for (int j = 0; j < 4; ++j)
                _mm256_storeu_si256((__m256i *)(o + 16 * j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], w)));
        }
    }
}

static void tiles(tile_args *a) {
    const int64_t ld = a->nkg * 16; /* covers every key plus the NK-group padding */
    if (tl_cap < ld) {
        free(tl_s);
        free(tl_p);
        tl_s = (float *)malloc((size_t)(R * ld) * sizeof(float));
        tl_p = (uint16_t *)malloc((size_t)(R * ld) * sizeof(uint16_t));
        tl_cap = (tl_s && tl_p) ? ld : 0;
        if (!tl_cap) { __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED); return; }
    }
    const int64_t G = a->Hq / a->Hkv, per_head = a->ntiles * G;
    for (;;) {
        const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
        if (item >= a->Hkv * per_head) break;
        /* KV head by KV head (its K and V stay in cache), longest tiles first within a head */
        const int64_t g = item / per_head, rem = item % per_head;
        const int64_t tix = a->ntiles - 1 - rem / G, h = g * G + rem % G;
        tile(a, h, tix * R, tl_s, tl_p, ld);
    }
}
#endif

int slimlm_paged_prefill(const uint16_t *q, int64_t qs_t, int64_t qs_h, const uint16_t *k_pool,
                         const uint16_t *v_pool, const int64_t *table, int64_t q_start, uint16_t *out,
                         int64_t os_t, int64_t os_h, int64_t T, int64_t Hq, int64_t Hkv, int64_t d,
                         int64_t block_size, float scale, int nthreads) {
#ifdef SLIMLM_HAVE_BF16
    if (!slimlm_prefill_supported(d) || Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || T <= 0 || q_start < 0) return 1;
    const int64_t n = q_start + T;
    const int64_t nkg = ((n + 16 * NK - 1) / (16 * NK)) * NK, nkp = nkg * 8;
    static _Thread_local uint32_t *kp = NULL, *vp = NULL;
    static _Thread_local int64_t cap = 0;
    const int64_t need = Hkv * nkg * 16 * (d / 2); /* uint32 words, the same for K and V */
    if (need > cap) {
        free(kp);
        free(vp);
        kp = (uint32_t *)malloc((size_t)need * sizeof(uint32_t));
        vp = (uint32_t *)malloc((size_t)need * sizeof(uint32_t));
        cap = (kp && vp) ? need : 0;
        if (!cap) return 2;
    }
    repack_args ra = {k_pool, v_pool, table, kp, vp, n, nkg, nkp, Hkv, d, block_size, 0};
#pragma omp parallel num_threads(nthreads)
    repack(&ra);
    tile_args ta = {q, out, kp, vp, qs_t, qs_h, os_t, os_h, T, q_start, Hq, Hkv, d, nkg, nkp, (T + R - 1) / R, scale, 0, 0};
#pragma omp parallel num_threads(nthreads)
    tiles(&ta);
    return ta.failed ? 2 : 0;
#else
    (void)q; (void)qs_t; (void)qs_h; (void)k_pool; (void)v_pool; (void)table; (void)q_start; (void)out;
    (void)os_t; (void)os_h; (void)T; (void)Hq; (void)Hkv; (void)d; (void)block_size; (void)scale; (void)nthreads;
    return 1;
#endif
}
