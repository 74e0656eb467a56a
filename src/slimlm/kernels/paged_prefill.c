/* Paged causal prefill attention on the CPU: bfloat16 KV caches with AVX512-BF16 dot products,
 * float32 ones with AVX-512 FMAs.
 *
 * One call serves one prefill chunk of one sequence: T query tokens at positions q_start ..
 * q_start + T - 1 attend causally to the sequence's first q_start + T keys, read from the block
 * pool through its block table (the chunk's own keys are already written there).
 *
 * dtype 0: float32 q / out / arithmetic; 1: bfloat16 (``slimlm_paged_prefill_ex``: the pools may
 *      be stored in another format, ``kv_code``: 0 float32, 1 bfloat16, 2 int8 with one fp16
 *      scale per (slot, head), 3 .. 6 int4 in groups of 32 or 16 (kv_pool.h) with fp16 scale and minimum, as the KV
 *      codecs of slimlm.kvcache.codec and paged_decode.c; the repack phase decodes them in place,
 *      c * s (+ m) exactly as the codecs' ``read``, rounded to bf16 for a bf16 query)
 * q    row t / head h at q + t * qs_t + h * qs_h (head dim contiguous)
 * k, v (num_blocks, block_size, Hkv, d) (int4: d/2 bytes per head)
 * mass NULL, or (num_blocks * block_size, Hkv) float32: each key's softmax probabilities, summed
 *      over the chunk's queries and the query heads of its KV head, are added to its slot (H2O).
 *      Deterministic whatever the thread count: tiles are dealt to a fixed number of lanes per
 *      KV head, each lane sums into its own buffer in a fixed order, the lanes are added in order.
 * table (ceil(n / block_size),) int64: physical block of each logical block
 * out  row t / head h at out + t * os_t + h * os_h
 *
 * Two phases, each one OpenMP parallel region (only GOMP_parallel is needed, as in paged_decode.c):
 *  1. repack each KV head's keys into groups of 16 keys (one key per vector lane) and its values
 *     into contiguous rows; for bf16, keys go as (d/2) dimension pairs and values as key pairs
 *     x (d/16) blocks of 16 dimensions: the layouts ``vdpbf16ps`` consumes;
 *  2. tiles of R = 6 consecutive query rows of one head, handed out largest first through an
 *     atomic counter. A tile computes its fp32 scores against every key it may see (6 x 64 per
 *     register block), a stable softmax per row (an exact-to-2e-7 vectorised exp, masked keys are
 *     exactly 0), then accumulates P V in fp32 and divides by the fp32 row sum once. In bf16 the
 *     probabilities are rounded to bf16 for the P V products, as flash-attention kernels do.
 * Work per tile is two passes over the repacked K and V of one head, which stay in L2 while
 * the tiles of that head are served.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_pool.h"
#include "simd_math.h"
#ifdef __AVX512F__
#include <immintrin.h>
#define SLIMLM_HAVE_AVX512 1
#ifdef __AVX512BF16__
#define SLIMLM_HAVE_BF16 1
#endif
#endif

#define R 6   /* query rows per tile */
#define NK 4  /* key groups of 16 per score block */

/* Whether this build serves head size d with cache dtype 0 (float32) or 1 (bfloat16). */
int slimlm_prefill_supported(int64_t d, int dtype) {
    const int shape_ok = d > 0 && d % 64 == 0 && d <= 256;
#ifdef SLIMLM_HAVE_BF16
    if (dtype == 1) return shape_ok;
#endif
#ifdef SLIMLM_HAVE_AVX512
    if (dtype == 0) return shape_ok;
#endif
    (void)dtype;
    (void)shape_ok;
    return 0;
}

#ifdef SLIMLM_HAVE_AVX512
typedef uint32_t __attribute__((may_alias)) u32_alias; /* bf16 pairs read as one word */

typedef struct {
    const void *k, *v;
    const int64_t *table;
    void *kp, *vp; /* the repacked keys and values */
    int64_t n, nkg, Hkv, d, bs;
    int dtype;
    int64_t next;
    int code;                         /* the pools' stored format (kv_code) */
    const void *ka, *ka2, *va, *va2;  /* quantized pools: scales (and int4 minima) */
} repack_args;

/* Head g of stored row ``slot`` decoded to float32 (d values): c * s for int8, c * s + m for int4
 * (two roundings, no fused multiply-add: -std=c11 turns contraction off), as the codecs read. */
static void decode_head(int code, int role, const void *data, const void *aux, const void *aux2, int64_t slot,
                        int64_t g, int64_t Hkv, int64_t d, float *o) {
    const pool_t p = kv_pool(data, aux, aux2, code, role, Hkv, d);
    const float *r = head_row(&p, slot, g, o);
    if (r != o) memcpy(o, r, (size_t)d * sizeof(float));
}

/* repack() for pools in another format than the arithmetic's: each row decoded to float32 first. */
static void repack_decoded(repack_args *a, int64_t g, int64_t kg) {
    const int64_t d = a->d;
    float kr[16][256], vr[16][256];
    for (int lane = 0; lane < 16; ++lane) {
        const int64_t key = kg * 16 + lane;
        if (key < a->n) {
            const int64_t slot = a->table[key / a->bs] * a->bs + key % a->bs;
            decode_head(a->code, 0, a->k, a->ka, a->ka2, slot, g, a->Hkv, d, kr[lane]);
            decode_head(a->code, 1, a->v, a->va, a->va2, slot, g, a->Hkv, d, vr[lane]);
        } else {
            memset(kr[lane], 0, (size_t)d * sizeof(float));
            memset(vr[lane], 0, (size_t)d * sizeof(float));
        }
    }
    if (a->dtype == 1) {
        const int64_t half = d / 2, nvb = d / 16, nkp = a->nkg * 8;
        uint32_t *dst = (uint32_t *)a->kp + (g * a->nkg + kg) * half * 16;
        for (int lane = 0; lane < 16; ++lane)
            for (int64_t c2 = 0; c2 < half; ++c2)
                dst[c2 * 16 + lane] = (uint32_t)f32_to_bf16(kr[lane][2 * c2]) | ((uint32_t)f32_to_bf16(kr[lane][2 * c2 + 1]) << 16);
        for (int64_t pi = 0; pi < 8; ++pi) {
            uint32_t *vd = (uint32_t *)a->vp + (g * nkp + kg * 8 + pi) * nvb * 16;
            for (int64_t c = 0; c < d; ++c)
                vd[c] = (uint32_t)f32_to_bf16(vr[2 * pi][c]) | ((uint32_t)f32_to_bf16(vr[2 * pi + 1][c]) << 16);
        }
    } else {
        float *dst = (float *)a->kp + (g * a->nkg + kg) * d * 16;
        float *vd = (float *)a->vp + (g * a->nkg * 16 + kg * 16) * d;
        for (int lane = 0; lane < 16; ++lane) {
            for (int64_t c = 0; c < d; ++c) dst[c * 16 + lane] = kr[lane][c];
            memcpy(vd + lane * d, vr[lane], (size_t)d * sizeof(float));
        }
    }
}

/* Offset (in elements) of key ``key``'s head ``g`` in a pool. */
static inline int64_t key_off(const int64_t *table, int64_t key, int64_t bs, int64_t W, int64_t g, int64_t d) {
    return (table[key / bs] * bs + key % bs) * W + g * d;
}

/* Work items: (head, group of 16 keys); keys past n are zero.
 * bf16 K: uint32 kp[((g * nkg + kg) * d/2 + c2) * 16 + lane] = dimension pair c2 of key 16 kg + lane
 * bf16 V: uint32 vp[((g * 8 nkg + p) * d/16 + cb) * 16 + lane] = dimension 16 cb + lane of keys 2p, 2p + 1
 * fp32 K: float kp[((g * nkg + kg) * d + c) * 16 + lane] = dimension c of key 16 kg + lane
 * fp32 V: float vp[(g * 16 nkg + key) * d + c] */
static void repack(repack_args *a) {
    const int64_t d = a->d, W = a->Hkv * d;
    for (;;) {
        const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
        if (item >= a->Hkv * a->nkg) break;
        const int64_t g = item / a->nkg, kg = item % a->nkg;
        if (a->code != a->dtype) { repack_decoded(a, g, kg); continue; }
        if (a->dtype == 1) {
            const int64_t half = d / 2, nvb = d / 16, nkp = a->nkg * 8;
            uint32_t *dst = (uint32_t *)a->kp + (g * a->nkg + kg) * half * 16;
            for (int lane = 0; lane < 16; ++lane) {
                const int64_t key = kg * 16 + lane;
                const u32_alias *src = key < a->n ? (const u32_alias *)((const uint16_t *)a->k + key_off(a->table, key, a->bs, W, g, d)) : NULL;
                for (int64_t c2 = 0; c2 < half; ++c2) dst[c2 * 16 + lane] = src ? src[c2] : 0;
            }
            for (int64_t p = kg * 8; p < kg * 8 + 8; ++p) {
                uint32_t *vd = (uint32_t *)a->vp + (g * nkp + p) * nvb * 16;
                const int64_t k0 = 2 * p, k1 = 2 * p + 1;
                const uint16_t *r0 = k0 < a->n ? (const uint16_t *)a->v + key_off(a->table, k0, a->bs, W, g, d) : NULL;
                const uint16_t *r1 = k1 < a->n ? (const uint16_t *)a->v + key_off(a->table, k1, a->bs, W, g, d) : NULL;
                for (int64_t cb = 0; cb < nvb; ++cb) {
                    const __m256i lo = r0 ? _mm256_loadu_si256((const __m256i *)(r0 + 16 * cb)) : _mm256_setzero_si256();
                    const __m256i hi = r1 ? _mm256_loadu_si256((const __m256i *)(r1 + 16 * cb)) : _mm256_setzero_si256();
                    _mm512_storeu_si512((void *)(vd + cb * 16), _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                                                                               _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16)));
                }
            }
        } else {
            float *dst = (float *)a->kp + (g * a->nkg + kg) * d * 16;
            float *vd = (float *)a->vp + (g * a->nkg * 16 + kg * 16) * d;
            for (int lane = 0; lane < 16; ++lane) {
                const int64_t key = kg * 16 + lane;
                if (key < a->n) {
                    const int64_t off = key_off(a->table, key, a->bs, W, g, d);
                    const float *src = (const float *)a->k + off;
                    for (int64_t c = 0; c < d; ++c) dst[c * 16 + lane] = src[c];
                    memcpy(vd + lane * d, (const float *)a->v + off, (size_t)d * sizeof(float));
                } else {
                    for (int64_t c = 0; c < d; ++c) dst[c * 16 + lane] = 0.f;
                    memset(vd + lane * d, 0, (size_t)d * sizeof(float));
                }
            }
        }
    }
}

typedef struct {
    const void *q;
    void *out;
    const void *kp, *vp;
    int64_t qs_t, qs_h, os_t, os_h;
    int64_t T, q_start, Hq, Hkv, d, nkg, ntiles;
    float scale;
    int dtype;
    int64_t next;
    int failed;
    float *lanes;  /* mass: MASS_LANES buffers of n floats per KV head, or NULL */
    int64_t n;
} tile_args;

#define MASS_LANES 8 /* work items per KV head when mass is accumulated (fixed: deterministic sums) */

/* Add rows r < rows of a tile's probabilities (exp scores S, 1 / row sums inv) to a lane's mass. */
static inline void add_mass(float *lane, const float *S, int64_t ldS, const float *inv, const int64_t *lim,
                            int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
        const float w = inv[r], *e = S + r * ldS;
        for (int64_t k = 0; k < lim[r]; ++k) lane[k] += e[k] * w;
    }
}

/* Softmax of one score row s[0, n) (keys past n get probability 0, up to ncols)
 * into fp32 ``pf`` (may alias s) or, when ``pb`` is given, bf16 ``pb``. Returns 1 / row sum. */
static inline __attribute__((always_inline)) float softmax_row(const float *s, int64_t n, int64_t ncols, float *pf,
                                                               uint16_t *pb) {
    (void)pb; /* used only by bf16 builds */
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + k));
    if (k < n) mv = _mm512_mask_max_ps(mv, (__mmask16)((1u << (n - k)) - 1), mv, _mm512_loadu_ps(s + k));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (k = 0; k < ncols; k += 16) {
        const int64_t left = n - k;
        const __mmask16 live = left <= 0 ? 0 : left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + k), m)));
        sum = _mm512_add_ps(sum, e);
#ifdef SLIMLM_HAVE_BF16
        if (pb) {
            _mm256_storeu_si256((__m256i *)(pb + k), (__m256i)_mm512_cvtneps_pbh(e));
            if (pf) _mm512_storeu_ps(pf + k, e); /* mass wants the fp32 probabilities too */
            continue;
        }
#endif
        _mm512_storeu_ps(pf + k, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* Rows t0 .. t0 + R - 1 of query head h: their query pointers, key limits, and the tile's. */
static inline int64_t tile_rows(const tile_args *a, int64_t h, int64_t t0, size_t elem, const void **qr, int64_t *lim) {
    const int64_t rows = a->T - t0 < R ? a->T - t0 : R;
    for (int r = 0; r < R; ++r) {
        const int64_t t = t0 + (r < rows ? r : 0); /* rows past the chunk repeat its first row */
        qr[r] = (const char *)a->q + (t * a->qs_t + h * a->qs_h) * elem;
        lim[r] = a->q_start + t + 1;
    }
    return rows;
}

static void tile_f32(const tile_args *a, int64_t h, int64_t t0, float *S, int64_t ldS, float *mlane) {
    const int64_t d = a->d, nvb = d / 16, g = h / (a->Hq / a->Hkv);
    const float *qr[R];
    int64_t lim[R];
    const int64_t rows = tile_rows(a, h, t0, sizeof(float), (const void **)qr, lim), n_tile = lim[rows - 1];
    const __m512 sc = _mm512_set1_ps(a->scale);
    for (int64_t kg = 0; kg < (n_tile + 15) / 16; kg += NK) {
        __m512 acc[R][NK];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_setzero_ps();
        const float *kb = (const float *)a->kp + (g * a->nkg + kg) * d * 16;
        for (int64_t c = 0; c < d; ++c) {
            __m512 kv[NK];
            for (int j = 0; j < NK; ++j) kv[j] = _mm512_loadu_ps(kb + (j * d + c) * 16);
            for (int r = 0; r < R; ++r) {
                const __m512 qb = _mm512_set1_ps(qr[r][c]);
                for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_fmadd_ps(qb, kv[j], acc[r][j]);
            }
        }
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NK; ++j) _mm512_storeu_ps(S + r * ldS + (kg + j) * 16, _mm512_mul_ps(acc[r][j], sc));
    }
    float inv[R];
    for (int r = 0; r < R; ++r) inv[r] = softmax_row(S + r * ldS, lim[r], n_tile, S + r * ldS, NULL);
    if (mlane) add_mass(mlane, S, ldS, inv, lim, rows);
    for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) {
        __m512 acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
        const float *vb = (const float *)a->vp + g * a->nkg * 16 * d + cb0 * 16;
        for (int64_t k = 0; k < n_tile; ++k) {
            __m512 vv[4];
            for (int j = 0; j < 4; ++j) vv[j] = _mm512_loadu_ps(vb + k * d + 16 * j);
            for (int r = 0; r < R; ++r) {
                const __m512 pb = _mm512_set1_ps(S[r * ldS + k]);
                for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(pb, vv[j], acc[r][j]);
            }
        }
        for (int r = 0; r < rows; ++r) {
            float *o = (float *)a->out + (t0 + r) * a->os_t + h * a->os_h + cb0 * 16;
            const __m512 w = _mm512_set1_ps(inv[r]);
            for (int j = 0; j < 4; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[r][j], w));
        }
    }
}

#ifdef SLIMLM_HAVE_BF16
static void tile_bf16(const tile_args *a, int64_t h, int64_t t0, float *S, uint16_t *P, int64_t ldS, float *mlane) {
    const int64_t d = a->d, half = d / 2, nvb = d / 16, g = h / (a->Hq / a->Hkv);
    const u32_alias *qr[R]; /* bf16 dimension pairs */
    int64_t lim[R];
    const int64_t rows = tile_rows(a, h, t0, sizeof(uint16_t), (const void **)qr, lim), n_tile = lim[rows - 1];
    const __m512 sc = _mm512_set1_ps(a->scale);
    for (int64_t kg = 0; kg < (n_tile + 15) / 16; kg += NK) { /* K is zero-padded to whole NK groups */
        __m512 acc[R][NK];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_setzero_ps();
        const uint32_t *kb = (const uint32_t *)a->kp + (g * a->nkg + kg) * half * 16;
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
    const int64_t npair = (n_tile + 1) / 2;
    float inv[R];
    for (int r = 0; r < R; ++r) inv[r] = softmax_row(S + r * ldS, lim[r], 2 * npair, mlane ? S + r * ldS : NULL, P + r * ldS);
    if (mlane) add_mass(mlane, S, ldS, inv, lim, rows);
    for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) { /* output dimensions in blocks of 64 */
        __m512 acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
        const uint32_t *vb = (const uint32_t *)a->vp + g * a->nkg * 8 * nvb * 16 + cb0 * 16;
        for (int64_t pi = 0; pi < npair; ++pi) {
            __m512bh vv[4];
            for (int j = 0; j < 4; ++j) vv[j] = (__m512bh)_mm512_loadu_si512((const void *)(vb + (pi * nvb + j) * 16));
            for (int r = 0; r < R; ++r) {
                const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)((const uint32_t *)(P + r * ldS))[pi]);
                for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, vv[j]);
            }
        }
        for (int r = 0; r < rows; ++r) {
            uint16_t *o = (uint16_t *)a->out + (t0 + r) * a->os_t + h * a->os_h + cb0 * 16;
            const __m512 w = _mm512_set1_ps(inv[r]);
            for (int j = 0; j < 4; ++j)
                _mm256_storeu_si256((__m256i *)(o + 16 * j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], w)));
        }
    }
}
#endif

static _Thread_local float *tl_s = NULL;
static _Thread_local uint16_t *tl_p = NULL;
static _Thread_local int64_t tl_cap = 0;
#define TL_KEEP 16384 /* keys: per-thread tile scratch up to R x 16k x 6 B (~0.6 MB) is kept between calls */

static void release_tiles(void) {
    free(tl_s);
    free(tl_p);
    tl_s = NULL;
    tl_p = NULL;
    tl_cap = 0;
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
    if (a->lanes) { /* item = (KV head, lane): tiles lane, lane + MASS_LANES, ... of its G query heads */
        for (;;) {
            const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
            if (item >= a->Hkv * MASS_LANES) break;
            const int64_t g = item / MASS_LANES, lane = item % MASS_LANES;
            float *ml = a->lanes + item * a->n;
            for (int64_t i = lane; i < a->ntiles; i += MASS_LANES)
                for (int64_t h = g * G; h < g * G + G; ++h) {
#ifdef SLIMLM_HAVE_BF16
                    if (a->dtype == 1) { tile_bf16(a, h, i * R, tl_s, tl_p, ld, ml); continue; }
#endif
                    tile_f32(a, h, i * R, tl_s, ld, ml);
                }
        }
        if (tl_cap > TL_KEEP) release_tiles();
        return;
    }
    for (;;) {
        const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
        if (item >= a->Hkv * per_head) break;
        /* KV head by KV head (its K and V stay in cache), longest tiles first within a head */
        const int64_t g = item / per_head, rem = item % per_head;
        const int64_t t0 = (a->ntiles - 1 - rem / G) * R, h = g * G + rem % G;
#ifdef SLIMLM_HAVE_BF16
        if (a->dtype == 1) { tile_bf16(a, h, t0, tl_s, tl_p, ld, NULL); continue; }
#endif
        tile_f32(a, h, t0, tl_s, ld, NULL);
    }
    if (tl_cap > TL_KEEP) release_tiles(); /* long prompts: give large buffers back after the call */
}
#endif

#ifdef SLIMLM_HAVE_AVX512
static _Thread_local void *kp = NULL, *vp = NULL; /* the calling thread's repacked K and V */
static _Thread_local size_t cap = 0;

static void release_repack(void) {
    free(kp);
    free(vp);
    kp = vp = NULL;
    cap = 0;
}
#endif

/* Free the scratch every call keeps for the next: the repacked K/V of the calling thread and
 * the tile buffers of each of nthreads OpenMP threads (an OpenMP pool lives as long as the
 * process, so its threads' buffers are otherwise never given back). */
void slimlm_prefill_release(int nthreads) {
#ifdef SLIMLM_HAVE_AVX512
    release_repack();
#pragma omp parallel num_threads(nthreads)
    release_tiles();
#else
    (void)nthreads;
#endif
}

int slimlm_paged_prefill_ex(const void *q, int64_t qs_t, int64_t qs_h, const void *k_pool, const void *k_aux,
                            const void *k_aux2, const void *v_pool, const void *v_aux, const void *v_aux2, int kv_code,
                            int dtype, const int64_t *table, int64_t q_start, void *out, int64_t os_t, int64_t os_h,
                            int64_t T, int64_t Hq, int64_t Hkv, int64_t d, int64_t block_size, float scale, float *mass,
                            int nthreads) {
    if (!slimlm_prefill_supported(d, dtype) || Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || T <= 0 || q_start < 0
        || !kv_code_ok(kv_code, d, k_aux, k_aux2, v_aux, v_aux2))
        return 1;
#ifdef SLIMLM_HAVE_AVX512
    const int64_t n = q_start + T;
    const int64_t nkg = ((n + 16 * NK - 1) / (16 * NK)) * NK;
    const size_t need = (size_t)(Hkv * nkg * 16 * d) * (dtype == 1 ? 2 : 4); /* bytes, each of K and V */
    if (need > cap) {
        free(kp);
        free(vp);
        kp = malloc(need);
        vp = malloc(need);
        cap = (kp && vp) ? need : 0;
        if (!cap) return 2;
    }
    repack_args ra = {k_pool, v_pool, table, kp, vp, n, nkg, Hkv, d, block_size, dtype, 0,
                      kv_code, k_aux, k_aux2, v_aux, v_aux2};
#pragma omp parallel num_threads(nthreads)
    repack(&ra);
    float *lanes = NULL;
    if (mass) {
        lanes = (float *)calloc((size_t)(Hkv * MASS_LANES * n), sizeof(float));
        if (!lanes) return 2;
    }
    tile_args ta = {q, out, kp, vp, qs_t, qs_h, os_t, os_h, T, q_start, Hq, Hkv, d, nkg, (T + R - 1) / R, scale, dtype, 0, 0,
                    lanes, n};
#pragma omp parallel num_threads(nthreads)
    tiles(&ta);
    if (lanes) { /* lanes in order, added to each key's slot */
        for (int64_t g = 0; g < Hkv; ++g)
            for (int64_t key = 0; key < n; ++key) {
                float m = 0.f;
                for (int64_t l = 0; l < MASS_LANES; ++l) m += lanes[(g * MASS_LANES + l) * n + key];
                mass[(table[key / block_size] * block_size + key % block_size) * Hkv + g] += m;
            }
        free(lanes);
    }
    if (cap > ((size_t)64 << 20)) release_repack(); /* keep small scratch for the next call, give large back */
    return ta.failed ? 2 : 0;
#else
    (void)q; (void)qs_t; (void)qs_h; (void)k_pool; (void)k_aux; (void)k_aux2; (void)v_pool; (void)v_aux; (void)v_aux2;
    (void)table; (void)q_start; (void)out; (void)os_t; (void)os_h; (void)Hq; (void)scale; (void)mass; (void)nthreads;
    return 1;
#endif
}

int slimlm_paged_prefill(const void *q, int64_t qs_t, int64_t qs_h, const void *k_pool, const void *v_pool, int dtype,
                         const int64_t *table, int64_t q_start, void *out, int64_t os_t, int64_t os_h, int64_t T,
                         int64_t Hq, int64_t Hkv, int64_t d, int64_t block_size, float scale, int nthreads) {
    return slimlm_paged_prefill_ex(q, qs_t, qs_h, k_pool, NULL, NULL, v_pool, NULL, NULL, dtype, dtype, table, q_start,
                                   out, os_t, os_h, T, Hq, Hkv, d, block_size, scale, NULL, nthreads);
}

/* ------------------------------------------------------------------------------------------------
 * Key-range prefill with log-sum-exps (Dual Chunk Attention's three ranges, model/rope_extension.py).
 *
 * ``slimlm_paged_prefill_range``: T query rows at positions q_start .. q_start + T - 1 attend the
 * keys j in [k_lo, k_hi) of the paged context (storage index == position), and, when ``causal``,
 * only those with j <= the row's position. Each row's output is written in float32 (whatever the
 * arithmetic's dtype) at out + t * os_t + h * os_h, and its log-sum-exp of the scaled scores
 * (natural log) at lse[t * Hq + h], so outputs over disjoint ranges merge exactly:
 * out = sum_r exp(lse_r - logsumexp(lse)) out_r. A row with no key in the range gets out = 0 and
 * lse = -inf. The pools, formats, ``dtype`` and the arithmetic are those of
 * ``slimlm_paged_prefill_ex`` (no mass). The keys are repacked from the block holding k_lo: the
 * first (k_lo mod block_size) of them are masked, their probabilities exactly 0.
 * Returns 0, 1 on unsupported arguments, 2 when scratch memory could not be allocated.
 * --------------------------------------------------------------------------------------------- */
#ifdef SLIMLM_HAVE_AVX512
typedef struct {
    const void *q;
    float *out, *lse;
    const void *kp, *vp;
    int64_t qs_t, qs_h, os_t, os_h;
    int64_t T, Hq, Hkv, d, nkg, ntiles;
    int64_t lo, n, cq; /* repacked frame: keys [lo, n) live; row t's last causal key is cq + t */
    int causal;
    float scale;
    int dtype;
    int64_t next;
    int failed;
} range_args;

/* Rows t0 .. t0 + R - 1 of query head h against the repacked range: scores, masked softmax with
 * each row's log-sum-exp, P V in float32. */
static void range_tile(const range_args *a, int64_t h, int64_t t0, float *S, uint16_t *P, int64_t ldS) {
    (void)P; /* used only by bf16 builds */
    const int64_t d = a->d, nvb = d / 16, g = h / (a->Hq / a->Hkv);
    const int64_t rows = a->T - t0 < R ? a->T - t0 : R;
    const size_t elem = a->dtype == 1 ? 2 : 4;
    const void *qr[R];
    int64_t hi[R];
    int64_t n_tile = 0;
    for (int r = 0; r < R; ++r) {
        const int64_t t = t0 + (r < rows ? r : 0); /* rows past the chunk repeat its first row */
        qr[r] = (const char *)a->q + (t * a->qs_t + h * a->qs_h) * elem;
        int64_t e = a->n;
        if (a->causal && a->cq + t + 1 < e) e = a->cq + t + 1;
        hi[r] = e > a->lo ? e : a->lo; /* hi == lo: no key */
        if (hi[r] > n_tile) n_tile = hi[r];
    }
    if (n_tile <= a->lo) { /* no row has a key here */
        for (int64_t r = 0; r < rows; ++r) {
            float *o = a->out + (t0 + r) * a->os_t + h * a->os_h;
            memset(o, 0, (size_t)d * sizeof(float));
            a->lse[(t0 + r) * a->Hq + h] = -INFINITY;
        }
        return;
    }
    const __m512 sc = _mm512_set1_ps(a->scale);
    for (int64_t kg = 0; kg < (n_tile + 15) / 16; kg += NK) { /* K is zero-padded to whole NK groups */
        __m512 acc[R][NK];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_setzero_ps();
#ifdef SLIMLM_HAVE_BF16
        if (a->dtype == 1) {
            const int64_t half = d / 2;
            const uint32_t *kb = (const uint32_t *)a->kp + (g * a->nkg + kg) * half * 16;
            for (int64_t c2 = 0; c2 < half; ++c2) {
                __m512bh kv[NK];
                for (int j = 0; j < NK; ++j) kv[j] = (__m512bh)_mm512_loadu_si512((const void *)(kb + (j * half + c2) * 16));
                for (int r = 0; r < R; ++r) {
                    const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)((const u32_alias *)qr[r])[c2]);
                    for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qb, kv[j]);
                }
            }
        } else
#endif
        {
            const float *kb = (const float *)a->kp + (g * a->nkg + kg) * d * 16;
            for (int64_t c = 0; c < d; ++c) {
                __m512 kv[NK];
                for (int j = 0; j < NK; ++j) kv[j] = _mm512_loadu_ps(kb + (j * d + c) * 16);
                for (int r = 0; r < R; ++r) {
                    const __m512 qb = _mm512_set1_ps(((const float *)qr[r])[c]);
                    for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_fmadd_ps(qb, kv[j], acc[r][j]);
                }
            }
        }
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NK; ++j) _mm512_storeu_ps(S + r * ldS + (kg + j) * 16, _mm512_mul_ps(acc[r][j], sc));
    }
    const int bf = a->dtype == 1;
    const int64_t npair = (n_tile + 1) / 2, ncols = bf ? 2 * npair : n_tile;
    const int64_t padded = (ncols + 15) / 16 * 16; /* what softmax_row writes */
    float inv[R];
    for (int r = 0; r < R; ++r) {
        float *s = S + r * ldS;
        if (hi[r] <= a->lo) { /* no key: probabilities 0, lse -inf */
            inv[r] = 0.f;
            if (bf) memset(P + r * ldS, 0, (size_t)padded * sizeof(uint16_t));
            else memset(s, 0, (size_t)padded * sizeof(float));
            if (r < rows) a->lse[(t0 + r) * a->Hq + h] = -INFINITY;
            continue;
        }
        float m = -INFINITY;
        for (int64_t k = a->lo; k < hi[r]; ++k) m = s[k] > m ? s[k] : m;
        for (int64_t k = 0; k < a->lo; ++k) s[k] = -INFINITY; /* below the range: out of the max */
        inv[r] = softmax_row(s, hi[r], ncols, bf ? NULL : s, bf ? P + r * ldS : NULL);
        if (bf) memset(P + r * ldS, 0, (size_t)a->lo * sizeof(uint16_t)); /* exactly 0 below the range */
        else memset(s, 0, (size_t)a->lo * sizeof(float));
        if (r < rows) a->lse[(t0 + r) * a->Hq + h] = m - logf(inv[r]);
    }
    for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) { /* output dimensions in blocks of 64 */
        __m512 acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
#ifdef SLIMLM_HAVE_BF16
        if (bf) {
            const uint32_t *vb = (const uint32_t *)a->vp + g * a->nkg * 8 * nvb * 16 + cb0 * 16;
            for (int64_t pi = 0; pi < npair; ++pi) {
                __m512bh vv[4];
                for (int j = 0; j < 4; ++j) vv[j] = (__m512bh)_mm512_loadu_si512((const void *)(vb + (pi * nvb + j) * 16));
                for (int r = 0; r < R; ++r) {
                    const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)((const uint32_t *)(P + r * ldS))[pi]);
                    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, vv[j]);
                }
            }
        } else
#endif
        {
            const float *vb = (const float *)a->vp + g * a->nkg * 16 * d + cb0 * 16;
            for (int64_t k = 0; k < n_tile; ++k) {
                __m512 vv[4];
                for (int j = 0; j < 4; ++j) vv[j] = _mm512_loadu_ps(vb + k * d + 16 * j);
                for (int r = 0; r < R; ++r) {
                    const __m512 pb = _mm512_set1_ps(S[r * ldS + k]);
                    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(pb, vv[j], acc[r][j]);
                }
            }
        }
        for (int r = 0; r < rows; ++r) {
            float *o = a->out + (t0 + r) * a->os_t + h * a->os_h + cb0 * 16;
            const __m512 w = _mm512_set1_ps(inv[r]);
            for (int j = 0; j < 4; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[r][j], w));
        }
    }
}

static void range_tiles(range_args *a) {
    const int64_t ld = a->nkg * 16;
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
        const int64_t g = item / per_head, rem = item % per_head; /* KV head by KV head, longest tiles first */
        range_tile(a, g * G + rem % G, (a->ntiles - 1 - rem / G) * R, tl_s, tl_p, ld);
    }
    if (tl_cap > TL_KEEP) release_tiles();
}
#endif

int slimlm_paged_prefill_range(const void *q, int64_t qs_t, int64_t qs_h, const void *k_pool, const void *k_aux,
                               const void *k_aux2, const void *v_pool, const void *v_aux, const void *v_aux2,
                               int kv_code, int dtype, const int64_t *table, int64_t q_start, int64_t k_lo,
                               int64_t k_hi, int causal, float *out, int64_t os_t, int64_t os_h, float *lse,
                               int64_t T, int64_t Hq, int64_t Hkv, int64_t d, int64_t block_size, float scale,
                               int nthreads) {
    if (!slimlm_prefill_supported(d, dtype) || Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || T <= 0 || q_start < 0
        || k_lo < 0 || k_hi < k_lo || !out || !lse || !kv_code_ok(kv_code, d, k_aux, k_aux2, v_aux, v_aux2))
        return 1;
#ifdef SLIMLM_HAVE_AVX512
    const int64_t a0 = k_lo / block_size * block_size; /* the range's first block */
    const int64_t n = k_hi - a0;
    if (k_hi == k_lo || (causal && k_lo > q_start + T - 1)) { /* no row has a key */
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < Hq; ++h) {
                memset(out + t * os_t + h * os_h, 0, (size_t)d * sizeof(float));
                lse[t * Hq + h] = -INFINITY;
            }
        return 0;
    }
    const int64_t nkg = ((n + 16 * NK - 1) / (16 * NK)) * NK;
    const size_t need = (size_t)(Hkv * nkg * 16 * d) * (dtype == 1 ? 2 : 4);
    if (need > cap) {
        free(kp);
        free(vp);
        kp = malloc(need);
        vp = malloc(need);
        cap = (kp && vp) ? need : 0;
        if (!cap) return 2;
    }
    repack_args ra = {k_pool, v_pool, table + a0 / block_size, kp, vp, n, nkg, Hkv, d, block_size, dtype, 0,
                      kv_code, k_aux, k_aux2, v_aux, v_aux2};
#pragma omp parallel num_threads(nthreads)
    repack(&ra);
    range_args ta = {q, out, lse, kp, vp, qs_t, qs_h, os_t, os_h, T, Hq, Hkv, d, nkg, (T + R - 1) / R,
                     k_lo - a0, n, q_start - a0, causal != 0, scale, dtype, 0, 0};
#pragma omp parallel num_threads(nthreads)
    range_tiles(&ta);
    if (cap > ((size_t)64 << 20)) release_repack();
    return ta.failed ? 2 : 0;
#else
    (void)q; (void)qs_t; (void)qs_h; (void)k_pool; (void)k_aux; (void)k_aux2; (void)v_pool; (void)v_aux; (void)v_aux2;
    (void)table; (void)q_start; (void)k_lo; (void)k_hi; (void)causal; (void)out; (void)os_t; (void)os_h; (void)lse;
    (void)Hq; (void)scale; (void)nthreads;
    return 1;
#endif
}
