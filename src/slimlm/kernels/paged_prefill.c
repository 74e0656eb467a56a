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
 *     register block, narrower over the tile's last keys), a stable softmax per row (the scale
 *     folded into a vectorised 2^x exact to 2e-7, masked keys are exactly 0), then accumulates
 *     P V in fp32 and divides by the fp32 row sum once. In bf16 the probabilities are rounded to
 *     bf16 for the P V products, as flash-attention kernels do.
 * Work per tile is two passes over the repacked K and V of one head, which stay in L2 while
 * the tiles of that head are served. The key-range entry (below) runs the same tiles.
 *
 * On CPUs with AMX (SLIMLM_AMX, amx.h), bf16 pools read with bf16 queries run tile_amx instead:
 * both products on AMX tiles, 32 query rows per tile (the GQA group's heads stacked), an online
 * softmax over blocks of 256 keys; SLIMLM_AMX=0 keeps the tiles above (see tile_amx).
 */
#define _GNU_SOURCE /* syscall() in amx.h under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "kv_pool.h"
#include "simd_math.h"
#ifdef __AVX512F__
#include <immintrin.h>
#define SLIMLM_HAVE_AVX512 1
#ifdef __AVX512BF16__
#define SLIMLM_HAVE_BF16 1
#if defined(SLIMLM_AMX)
#define SLIMLM_PREFILL_AMX 1 /* bf16 pools with bf16 queries: the two products on AMX tiles */
#endif
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

/* dst[w * 16 + lane] = word w of rows[lane] (NULL: zeros), w < words (a multiple of 16): the keys
 * of a group transposed 16 x 16 words at a time (32-bit interleaves, 64-bit interleaves, then
 * 128-bit lane shuffles). */
static void transpose_keys(const u32_alias *const rows[16], int64_t words, uint32_t *dst) {
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
        __m512i r[16], t[16];
        for (int i = 0; i < 16; ++i) r[i] = rows[i] ? _mm512_loadu_si512((const void *)(rows[i] + w0)) : _mm512_setzero_si512();
        for (int i = 0; i < 16; i += 2) { /* rows i, i + 1 interleaved per 128-bit lane */
            t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) { /* u[i + c]: rows i .. i + 3, words c, c + 4, c + 8, c + 12 by lane */
            r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
            r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
            r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
            r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        for (int c = 0; c < 4; ++c) {
            const __m512i v = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), w = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
            const __m512i x = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
            const __m512i y = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
            _mm512_storeu_si512((void *)(dst + (w0 + c) * 16), _mm512_shuffle_i32x4(v, x, 0x88));
            _mm512_storeu_si512((void *)(dst + (w0 + c + 4) * 16), _mm512_shuffle_i32x4(v, x, 0xDD));
            _mm512_storeu_si512((void *)(dst + (w0 + c + 8) * 16), _mm512_shuffle_i32x4(w, y, 0x88));
            _mm512_storeu_si512((void *)(dst + (w0 + c + 12) * 16), _mm512_shuffle_i32x4(w, y, 0xDD));
        }
    }
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
            const u32_alias *rows[16];
            for (int lane = 0; lane < 16; ++lane) {
                const int64_t key = kg * 16 + lane;
                rows[lane] = key < a->n ? (const u32_alias *)((const uint16_t *)a->k + key_off(a->table, key, a->bs, W, g, d)) : NULL;
            }
            transpose_keys(rows, half, (uint32_t *)a->kp + (g * a->nkg + kg) * half * 16);
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
            float *vd = (float *)a->vp + (g * a->nkg * 16 + kg * 16) * d;
            const u32_alias *rows[16];
            for (int lane = 0; lane < 16; ++lane) {
                const int64_t key = kg * 16 + lane;
                if (key < a->n) {
                    const int64_t off = key_off(a->table, key, a->bs, W, g, d);
                    rows[lane] = (const u32_alias *)((const float *)a->k + off);
                    memcpy(vd + lane * d, (const float *)a->v + off, (size_t)d * sizeof(float));
                } else {
                    rows[lane] = NULL;
                    memset(vd + lane * d, 0, (size_t)d * sizeof(float));
                }
            }
            transpose_keys(rows, d, (uint32_t *)a->kp + (g * a->nkg + kg) * d * 16);
        }
    }
}

/* One tile function serves both entries: the causal chunk (keys [0, q_start + T), bf16 or fp32
 * output in q's dtype, optional attention mass) and the key range (keys [lo, n) of the repacked
 * frame, optionally causal, fp32 output and each row's log-sum-exp). */
typedef struct {
    const void *q;
    void *out;   /* q's dtype, or float32 when out_f32 */
    float *lse;  /* NULL, or each row's log-sum-exp of its scaled scores at lse[t * Hq + h] */
    const void *kp, *vp;
    int64_t qs_t, qs_h, os_t, os_h;
    int64_t T, Hq, Hkv, d, nkg, ntiles;
    int64_t lo, n, cq; /* repacked frame: keys [lo, n) live; when causal, row t's last key is cq + t */
    int causal, out_f32;
    float scale;
    int dtype;
    int64_t next;
    int failed;
    float *lanes; /* mass: MASS_LANES buffers of n floats per KV head, or NULL */
    int amx;      /* 1: the AMX tiles (tile_amx) serve this call */
} tile_args;

#define MASS_LANES 8 /* work items per KV head when mass is accumulated (fixed: deterministic sums) */

/* Add rows r < rows of a tile's probabilities (exp scores S, 1 / row sums inv) to a lane's mass. */
static inline void add_mass(float *lane, const float *S, int64_t ldS, const float *inv, const int64_t *hi,
                            int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
        const float w = inv[r], *e = S + r * ldS;
        for (int64_t k = 0; k < hi[r]; ++k) lane[k] += e[k] * w;
    }
}

/* Lanes of keys k .. k + 15 inside [lo, hi). */
static inline __mmask16 live16(int64_t k, int64_t lo, int64_t hi) {
    uint32_t m = 0xFFFFu;
    if (lo > k) m = lo - k >= 16 ? 0 : m << (lo - k);
    if (hi < k + 16) m &= hi <= k ? 0 : (1u << (hi - k)) - 1;
    return (__mmask16)m;
}

/* exp of the scores s[k0, k1) (16-aligned chunks) minus the row maximum, into fp32 ``pf`` and / or
 * bf16 ``pb``, added to *sum; with ``edge`` (a constant where inlined) keys outside [lo, hi) get 0. */
static inline __attribute__((always_inline)) void exp_cols(const float *s, int64_t k0, int64_t k1, int64_t lo,
                                                           int64_t hi, int edge, __m512 cv, __m512 mc, __m512 *sum,
                                                           float *pf, uint16_t *pb) {
    (void)pb; /* used only by bf16 builds */
    for (int64_t k = k0; k < k1; k += 16) {
        __m512 e = exp2_512(_mm512_fmsub_ps(_mm512_loadu_ps(s + k), cv, mc));
        if (edge) e = _mm512_maskz_mov_ps(live16(k, lo, hi), e);
        *sum = _mm512_add_ps(*sum, e);
#ifdef SLIMLM_HAVE_BF16
        if (pb) _mm256_storeu_si256((__m256i *)(pb + k), (__m256i)_mm512_cvtneps_pbh(e));
#endif
        if (pf) _mm512_storeu_ps(pf + k, e);
    }
}

/* Softmax of one row's raw scores s over its keys [lo, hi) (a 16-aligned base <= lo: the columns
 * [base, ncols) are written, keys outside the range get probability exactly 0) into fp32 ``pf``
 * (may alias s) and / or bf16 ``pb``. c = scale * log2(e). Chunks of 16 keys wholly inside the
 * range, [f0, f1), go unmasked. Returns 1 / row sum; *mx = the row's largest raw score. */
static inline __attribute__((always_inline)) float softmax_row(const float *s, int64_t base, int64_t lo, int64_t hi,
                                                               int64_t ncols, float c, float *pf, uint16_t *pb,
                                                               float *mx) {
    const int64_t f0 = (lo + 15) & ~(int64_t)15, hf = hi & ~(int64_t)15, f1 = hf > f0 ? hf : f0;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t k = base; k < f0; k += 16) mv = _mm512_mask_max_ps(mv, live16(k, lo, hi), mv, _mm512_loadu_ps(s + k));
    for (int64_t k = f0; k < f1; k += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + k));
    for (int64_t k = f1; k < hi; k += 16) mv = _mm512_mask_max_ps(mv, live16(k, lo, hi), mv, _mm512_loadu_ps(s + k));
    *mx = _mm512_reduce_max_ps(mv);
    const __m512 cv = _mm512_set1_ps(c), mc = _mm512_set1_ps(*mx * c);
    __m512 sum = _mm512_setzero_ps();
    exp_cols(s, base, f0, lo, hi, 1, cv, mc, &sum, pf, pb);
    exp_cols(s, f0, f1, lo, hi, 0, cv, mc, &sum, pf, pb);
    exp_cols(s, f1, ncols, lo, hi, 1, cv, mc, &sum, pf, pb);
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* Raw scores of R query rows against nk (a constant where inlined) key groups of 16 from kb,
 * into S[r * ldS + col ..]: fp32 FMAs, or bf16 dimension pairs by vdpbf16ps. */
static inline __attribute__((always_inline)) void qk_f32(const void *const *qr, const float *kb, int64_t d, int nk,
                                                         float *S, int64_t ldS, int64_t col) {
    __m512 acc[R][NK];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < nk; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
        __m512 kv[NK];
        for (int j = 0; j < nk; ++j) kv[j] = _mm512_loadu_ps(kb + (j * d + c) * 16);
        for (int r = 0; r < R; ++r) {
            const __m512 qb = _mm512_set1_ps(((const float *)qr[r])[c]);
            for (int j = 0; j < nk; ++j) acc[r][j] = _mm512_fmadd_ps(qb, kv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < nk; ++j) _mm512_storeu_ps(S + r * ldS + col + j * 16, acc[r][j]);
}

#ifdef SLIMLM_HAVE_BF16
static inline __attribute__((always_inline)) void qk_bf16(const void *const *qr, const uint32_t *kb, int64_t half,
                                                          int nk, float *S, int64_t ldS, int64_t col) {
    __m512 acc[R][NK];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < nk; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c2 = 0; c2 < half; ++c2) {
        __m512bh kv[NK];
        for (int j = 0; j < nk; ++j) kv[j] = (__m512bh)_mm512_loadu_si512((const void *)(kb + (j * half + c2) * 16));
        for (int r = 0; r < R; ++r) {
            const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)((const u32_alias *)qr[r])[c2]);
            for (int j = 0; j < nk; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qb, kv[j]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < nk; ++j) _mm512_storeu_ps(S + r * ldS + col + j * 16, acc[r][j]);
}
#endif

/* Raw scores of the tile's rows against key groups [kg0, kg1) of KV head g: blocks of NK groups,
 * the last one only as wide as the keys it must cover. */
static void scores(const tile_args *a, int64_t g, const void *const *qr, int64_t kg0, int64_t kg1, float *S,
                   int64_t ldS) {
    const int64_t d = a->d;
    for (int64_t kg = kg0; kg < kg1; kg += NK) {
        const int nk = kg1 - kg < NK ? (int)(kg1 - kg) : NK;
#ifdef SLIMLM_HAVE_BF16
        if (a->dtype == 1) {
            const uint32_t *kb = (const uint32_t *)a->kp + (g * a->nkg + kg) * (d / 2) * 16;
            switch (nk) {
            case 1: qk_bf16(qr, kb, d / 2, 1, S, ldS, kg * 16); break;
            case 2: qk_bf16(qr, kb, d / 2, 2, S, ldS, kg * 16); break;
            case 3: qk_bf16(qr, kb, d / 2, 3, S, ldS, kg * 16); break;
            default: qk_bf16(qr, kb, d / 2, NK, S, ldS, kg * 16);
            }
            continue;
        }
#endif
        const float *kb = (const float *)a->kp + (g * a->nkg + kg) * d * 16;
        switch (nk) {
        case 1: qk_f32(qr, kb, d, 1, S, ldS, kg * 16); break;
        case 2: qk_f32(qr, kb, d, 2, S, ldS, kg * 16); break;
        case 3: qk_f32(qr, kb, d, 3, S, ldS, kg * 16); break;
        default: qk_f32(qr, kb, d, NK, S, ldS, kg * 16);
        }
    }
}

/* Write (acc / row sum) of output dimensions cb0 * 16 .. + 63 of rows r < rows. */
static inline void store_out(const tile_args *a, int64_t h, int64_t t0, int64_t rows, int64_t cb0, __m512 acc[R][4],
                             const float *inv) {
    for (int r = 0; r < rows; ++r) {
        const int64_t at = (t0 + r) * a->os_t + h * a->os_h + cb0 * 16;
        const __m512 w = _mm512_set1_ps(inv[r]);
#ifdef SLIMLM_HAVE_BF16
        if (a->dtype == 1 && !a->out_f32) {
            for (int j = 0; j < 4; ++j)
                _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + at + 16 * j),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], w)));
            continue;
        }
#endif
        for (int j = 0; j < 4; ++j) _mm512_storeu_ps((float *)a->out + at + 16 * j, _mm512_mul_ps(acc[r][j], w));
    }
}

/* Rows t0 .. t0 + R - 1 of query head h (rows past the chunk repeat its first row, unwritten):
 * raw scores against the key groups holding the rows' keys [lo, hi[r]), a masked softmax (bf16
 * probabilities for the P V products in bf16, as flash-attention kernels do), P V in fp32 sums
 * divided once by the row sum; a row without keys gets out = 0 and lse = -inf. */
static void tile(const tile_args *a, int64_t h, int64_t t0, float *S, uint16_t *P, int64_t ldS, float *mlane) {
    const int64_t d = a->d, nvb = d / 16, g = h / (a->Hq / a->Hkv), elem = a->dtype == 1 ? 2 : 4;
    const int64_t rows = a->T - t0 < R ? a->T - t0 : R;
    const void *qr[R];
    int64_t hi[R], n_tile = a->lo;
    for (int r = 0; r < R; ++r) {
        const int64_t t = t0 + (r < rows ? r : 0);
        qr[r] = (const char *)a->q + (t * a->qs_t + h * a->qs_h) * elem;
        const int64_t e = a->causal && a->cq + t + 1 < a->n ? a->cq + t + 1 : a->n;
        hi[r] = e > a->lo ? e : a->lo; /* hi == lo: no key */
        if (hi[r] > n_tile) n_tile = hi[r];
    }
    float inv[R];
    if (n_tile <= a->lo) { /* no row has a key here */
        for (int r = 0; r < R; ++r) inv[r] = 0.f;
        __m512 zero[R][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) zero[r][j] = _mm512_setzero_ps();
        for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) store_out(a, h, t0, rows, cb0, zero, inv);
        for (int64_t r = 0; a->lse && r < rows; ++r) a->lse[(t0 + r) * a->Hq + h] = -INFINITY;
        return;
    }
    const int64_t kg0 = a->lo / 16, base = kg0 * 16, kg1 = (n_tile + 15) / 16;
    scores(a, g, qr, kg0, kg1, S, ldS);
    const int bf = a->dtype == 1;
    const int64_t npair = (n_tile + 1) / 2, ncols = bf ? 2 * npair : n_tile;
    const float c = a->scale * 1.44269504088896341f;
    for (int r = 0; r < R; ++r) {
        float *s = S + r * ldS, mx;
        if (hi[r] <= a->lo) { /* probabilities 0 */
            inv[r] = 0.f;
            if (bf) memset(P + r * ldS + base, 0, (size_t)(kg1 * 16 - base) * sizeof(uint16_t));
            else memset(s + base, 0, (size_t)(kg1 * 16 - base) * sizeof(float));
            if (a->lse && r < rows) a->lse[(t0 + r) * a->Hq + h] = -INFINITY;
            continue;
        }
        inv[r] = softmax_row(s, base, a->lo, hi[r], ncols, c, bf && !mlane ? NULL : s, bf ? P + r * ldS : NULL, &mx);
        if (a->lse && r < rows) a->lse[(t0 + r) * a->Hq + h] = mx * a->scale - logf(inv[r]);
    }
    if (mlane) add_mass(mlane, S, ldS, inv, hi, rows);
    for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) { /* output dimensions in blocks of 64 */
        __m512 acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
#ifdef SLIMLM_HAVE_BF16
        if (bf) {
            const uint32_t *vb = (const uint32_t *)a->vp + g * a->nkg * 8 * nvb * 16 + cb0 * 16;
            for (int64_t pi = base / 2; pi < npair; ++pi) {
                __m512bh vv[4];
                for (int j = 0; j < 4; ++j) vv[j] = (__m512bh)_mm512_loadu_si512((const void *)(vb + (pi * nvb + j) * 16));
                for (int r = 0; r < R; ++r) {
                    const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)((const u32_alias *)(P + r * ldS))[pi]);
                    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, vv[j]);
                }
            }
        } else
#endif
        {
            const float *vb = (const float *)a->vp + g * a->nkg * 16 * d + cb0 * 16;
            for (int64_t k = base; k < n_tile; ++k) {
                __m512 vv[4];
                for (int j = 0; j < 4; ++j) vv[j] = _mm512_loadu_ps(vb + k * d + 16 * j);
                for (int r = 0; r < R; ++r) {
                    const __m512 pb = _mm512_set1_ps(S[r * ldS + k]);
                    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(pb, vv[j], acc[r][j]);
                }
            }
        }
        store_out(a, h, t0, rows, cb0, acc, inv);
    }
}

#ifdef SLIMLM_PREFILL_AMX
/* ------------------------------------------------------------------------------------------------
 * The AMX tile (bf16 pools, bf16 queries). Its 32 rows (two blocks of 16, the tile registers'
 * rows) stack the query heads of one KV head (GQA: G heads x 32 / G consecutive positions, so a
 * K or V tile load serves every head of the group and the rows of one position share their causal
 * end; a group of more than 32 heads is split over tiles). Both products run on the tiles, fp32
 * accumulation: S = Q K^T (A: 16 rows x 32 dimensions of Q, B: the repacked key group, whose
 * 16-lane layout of dimension pairs is already AMX's pair-interleaved B layout) and O = P V (A: the
 * rows' bf16 probabilities over 32 keys, B: the repacked value pairs, again the B layout as it is).
 * The softmax between them is on AVX-512 (exp2_512 as in tile() above), online over blocks of KB
 * keys; the probabilities are rounded to bf16 for P V as there, so the AMX path differs from the
 * vdpbf16ps one in the order of the fp32 sums and in rounding each probability against its
 * block's running maximum rather than its row's maximum (outputs within one bf16 rounding step of
 * each other at the throughput workload's shapes). On this path the repacked frame has an even
 * number of key groups (32-key chunks for P V, the padding keys zero).
 *
 * Tile registers (all 16 rows x 64 bytes): 0, 1 A; 2, 3 B; 4 .. 7 C. */
#define AR 32 /* query rows of an AMX work tile: two blocks of 16 (the tile registers' rows) */

static void amx_tiles_on(void) {
    int rows[8], colsb[8];
    for (int i = 0; i < 8; ++i) rows[i] = 16, colsb[i] = 64;
    amx_configure(8, rows, colsb);
}

/* Raw scores of the 32 rows in Q (d bf16 each, contiguous) against key groups [kg0, kg1) of KV head
 * g into S[r * ldS + 16 kg ..]: two key groups x two blocks of 16 rows per step, four independent
 * C tiles (the products of one C tile depend on each other: four chains hide their latency), each
 * key tile serving 32 rows, the query tiles reloaded from L1. */
static void scores_amx(const tile_args *a, int64_t g, const uint16_t *Q, int64_t kg0, int64_t kg1, float *S,
                       int64_t ldS) {
    const int64_t d = a->d, half = d / 2, ldQ = d * 2;
    const uint32_t *kb = (const uint32_t *)a->kp + g * a->nkg * half * 16;
    const uint16_t *Q1 = Q + 16 * d; /* rows 16 .. 31 */
    int64_t kg = kg0;
    for (; kg + 1 < kg1; kg += 2) {
        const uint32_t *k = kb + kg * half * 16;
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t i = 0; i < d / 32; ++i) { /* dimensions 32 i .. 32 i + 31 */
            _tile_loadd(0, Q + 32 * i, ldQ);
            _tile_loadd(1, Q1 + 32 * i, ldQ);
            _tile_loadd(2, k + 256 * i, 64);
            _tile_loadd(3, k + half * 16 + 256 * i, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(5, 0, 3);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
        }
        _tile_stored(4, S + kg * 16, ldS * 4);
        _tile_stored(5, S + kg * 16 + 16, ldS * 4);
        _tile_stored(6, S + 16 * ldS + kg * 16, ldS * 4);
        _tile_stored(7, S + 16 * ldS + kg * 16 + 16, ldS * 4);
    }
    if (kg < kg1) {
        const uint32_t *k = kb + kg * half * 16;
        _tile_zero(4);
        _tile_zero(6);
        for (int64_t i = 0; i < d / 32; ++i) {
            _tile_loadd(0, Q + 32 * i, ldQ);
            _tile_loadd(1, Q1 + 32 * i, ldQ);
            _tile_loadd(2, k + 256 * i, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(6, 1, 2);
        }
        _tile_stored(4, S + kg * 16, ldS * 4);
        _tile_stored(6, S + 16 * ldS + kg * 16, ldS * 4);
    }
}

#define KB 256 /* keys per block of the online softmax (S and P of a block stay in L1) */

/* The rows (t0 + r / hh, head h0 + r % hh), r < 32 and t < T, of KV head g (hh heads per position,
 * tt = 32 / hh positions), over blocks of KB keys with an online softmax: per block the scores,
 * each row's running maximum m (raw scores) and sum l (rescaled by 2^(c (m_old - m)) when m
 * grows), its bf16 probabilities exp2(c s - c m), then the block's P V, added to the fp32 output
 * rows rescaled the same way; at the end each row divided once by l. With mass, one block covers
 * every key (the two-pass softmax of tile(): the fp32 probabilities in S are final). Written as
 * tile() writes its rows (lse and mass too). */
static void tile_amx(const tile_args *a, int64_t g, int64_t h0, int64_t hh, int64_t tt, int64_t t0, float *S,
                     uint16_t *P, int64_t ldS, float *mlane) {
    const int64_t d = a->d, nvb = d / 16;
    const int64_t nt = a->T - t0 < tt ? a->T - t0 : tt, nr = nt * hh;
    uint16_t Q[AR * 256] __attribute__((aligned(64)));
    float O[AR * 256] __attribute__((aligned(64))), Ob[AR * 32] __attribute__((aligned(64)));
    int64_t hi[AR], tr[AR], hr[AR], n_tile = a->lo;
    for (int64_t r = 0; r < AR; ++r) {
        if (r >= nr) { /* padding row: no query, no key, never written */
            memset(Q + r * d, 0, (size_t)d * 2);
            hi[r] = a->lo;
            continue;
        }
        tr[r] = t0 + r / hh;
        hr[r] = h0 + r % hh;
        memcpy(Q + r * d, (const uint16_t *)a->q + tr[r] * a->qs_t + hr[r] * a->qs_h, (size_t)d * 2);
        const int64_t e = a->causal && a->cq + tr[r] + 1 < a->n ? a->cq + tr[r] + 1 : a->n;
        hi[r] = e > a->lo ? e : a->lo;
        if (hi[r] > n_tile) n_tile = hi[r];
    }
    if (n_tile <= a->lo) { /* no row has a key here */
        for (int64_t r = 0; r < nr; ++r) {
            const int64_t at = tr[r] * a->os_t + hr[r] * a->os_h;
            if (a->out_f32) memset((float *)a->out + at, 0, (size_t)d * sizeof(float));
            else memset((uint16_t *)a->out + at, 0, (size_t)d * 2);
            if (a->lse) a->lse[tr[r] * a->Hq + hr[r]] = -INFINITY;
        }
        return;
    }
    const int64_t base = a->lo / 16 * 16, base32 = base & ~(int64_t)31;
    const int64_t ncols = (n_tile + 31) / 32 * 32; /* within the frame's even nkg */
    const int64_t kb = mlane ? ncols - base32 : KB;
    const float c = a->scale * 1.44269504088896341f;
    const uint32_t *vb = (const uint32_t *)a->vp + g * a->nkg * 8 * nvb * 16;
    float m[AR], l[AR], alpha[AR];
    for (int64_t r = 0; r < AR; ++r) m[r] = -INFINITY, l[r] = 0.f;
    memset(O, 0, (size_t)(nr * d) * sizeof(float));
    for (int64_t k0 = base32; k0 < ncols; k0 += kb) {
        const int64_t k1 = k0 + kb < ncols ? k0 + kb : ncols, b0 = base > k0 ? base : k0;
        scores_amx(a, g, Q, b0 / 16, k1 / 16, S, ldS);
        for (int64_t r = 0; r < AR; ++r) {
            uint16_t *p = P + r * ldS;
            const int64_t lo = a->lo > k0 ? a->lo : k0, h = hi[r] < k1 ? hi[r] : k1;
            alpha[r] = 1.f;
            if (h <= lo) { /* no key of this row in the block: probabilities 0 */
                memset(p + k0, 0, (size_t)(k1 - k0) * 2);
                if (mlane) memset(S + r * ldS + b0, 0, (size_t)(k1 - b0) * sizeof(float));
                continue;
            }
            const float *s = S + r * ldS;
            const int64_t f0 = (lo + 15) & ~(int64_t)15, hf = h & ~(int64_t)15, f1 = hf > f0 ? hf : f0;
            __m512 mv = _mm512_set1_ps(-INFINITY), m1 = mv, m2 = mv, m3 = mv; /* four chains of maxima */
            for (int64_t k = b0; k < f0; k += 16) mv = _mm512_mask_max_ps(mv, live16(k, lo, h), mv, _mm512_loadu_ps(s + k));
            int64_t k = f0;
            for (; k + 64 <= f1; k += 64) {
                mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + k));
                m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + k + 16));
                m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + k + 32));
                m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + k + 48));
            }
            for (; k < f1; k += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + k));
            for (k = f1; k < h; k += 16) mv = _mm512_mask_max_ps(mv, live16(k, lo, h), mv, _mm512_loadu_ps(s + k));
            mv = _mm512_max_ps(_mm512_max_ps(mv, m1), _mm512_max_ps(m2, m3));
            const float mb = _mm512_reduce_max_ps(mv), mn = mb > m[r] ? mb : m[r];
            if (mn > m[r]) alpha[r] = m[r] == -INFINITY ? 0.f : exp2f((m[r] - mn) * c);
            m[r] = mn;
            const __m512 cv = _mm512_set1_ps(c), mc = _mm512_set1_ps(mn * c);
            float *pf = mlane ? S + r * ldS : NULL;
            __m512 sum = _mm512_setzero_ps();
            exp_cols(s, b0, f0, lo, h, 1, cv, mc, &sum, pf, p);
            exp_cols(s, f0, f1, lo, h, 0, cv, mc, &sum, pf, p);
            exp_cols(s, f1, k1, lo, h, 1, cv, mc, &sum, pf, p);
            l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
            if (b0 > k0) memset(p + k0, 0, (size_t)(b0 - k0) * 2);
        }
        for (int64_t cb0 = 0; cb0 < nvb; cb0 += 2) { /* output dimensions in blocks of 32: C tiles 4, 5 rows
                                                      * 0 .. 15, 6, 7 rows 16 .. 31 */
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
            for (int64_t k = k0; k < k1; k += 32) {
                const uint32_t *v = vb + ((k / 2) * nvb + cb0) * 16; /* key pairs k/2 .., dimensions 16 cb0 .. */
                _tile_loadd(0, P + k, ldS * 2);
                _tile_loadd(1, P + 16 * ldS + k, ldS * 2);
                _tile_loadd(2, v, nvb * 64);
                _tile_loadd(3, v + 16, nvb * 64);
                _tile_dpbf16ps(4, 0, 2);
                _tile_dpbf16ps(5, 0, 3);
                _tile_dpbf16ps(6, 1, 2);
                _tile_dpbf16ps(7, 1, 3);
            }
            _tile_stored(4, Ob, 128);
            _tile_stored(5, Ob + 16, 128);
            _tile_stored(6, Ob + 16 * 32, 128);
            _tile_stored(7, Ob + 16 * 32 + 16, 128);
            for (int64_t r = 0; r < nr; ++r) {
                const __m512 w = _mm512_set1_ps(alpha[r]);
                float *o = O + r * d + cb0 * 16;
                for (int j = 0; j < 2; ++j)
                    _mm512_store_ps(o + 16 * j, _mm512_fmadd_ps(_mm512_load_ps(o + 16 * j), w, _mm512_load_ps(Ob + r * 32 + 16 * j)));
            }
        }
    }
    float inv[AR];
    for (int64_t r = 0; r < nr; ++r) {
        inv[r] = hi[r] > a->lo ? 1.f / l[r] : 0.f;
        if (a->lse) a->lse[tr[r] * a->Hq + hr[r]] = hi[r] > a->lo ? m[r] * a->scale - logf(inv[r]) : -INFINITY;
        const int64_t at = tr[r] * a->os_t + hr[r] * a->os_h;
        const __m512 w = _mm512_set1_ps(inv[r]);
        for (int64_t j = 0; j < nvb; ++j) {
            const __m512 o = _mm512_mul_ps(_mm512_load_ps(O + r * d + 16 * j), w);
            if (a->out_f32) _mm512_storeu_ps((float *)a->out + at + 16 * j, o);
            else _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + at + 16 * j), (__m256i)_mm512_cvtneps_pbh(o));
        }
    }
    if (mlane) add_mass(mlane, S, ldS, inv, hi, nr);
}

/* tiles() on AMX: work items (KV head, chunk of its query heads, positions), longest first within
 * a KV head; with mass, (KV head, lane) as there. The thread's tile state is configured here and
 * released at the end. */
static void tiles_amx(tile_args *a, float *S, uint16_t *P, int64_t ld) {
    const int64_t G = a->Hq / a->Hkv, hh = G < AR ? G : AR, nhc = (G + hh - 1) / hh, tt = AR / hh;
    const int64_t nta = (a->T + tt - 1) / tt, per_head = nta * nhc;
    amx_tiles_on();
    if (a->lanes) {
        for (;;) {
            const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
            if (item >= a->Hkv * MASS_LANES) break;
            const int64_t g = item / MASS_LANES, lane = item % MASS_LANES;
            for (int64_t i = lane; i < nta; i += MASS_LANES)
                for (int64_t c = 0; c < nhc; ++c) {
                    const int64_t h0 = g * G + c * hh, nh = G - c * hh < hh ? G - c * hh : hh;
                    tile_amx(a, g, h0, nh, tt, i * tt, S, P, ld, a->lanes + item * a->n);
                }
        }
    } else {
        for (;;) {
            const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
            if (item >= a->Hkv * per_head) break;
            const int64_t g = item / per_head, rem = item % per_head, c = rem % nhc;
            const int64_t h0 = g * G + c * hh, nh = G - c * hh < hh ? G - c * hh : hh;
            tile_amx(a, g, h0, nh, tt, (nta - 1 - rem / nhc) * tt, S, P, ld, NULL);
        }
    }
    _tile_release();
}
#endif

static _Thread_local float *tl_s = NULL;
static _Thread_local uint16_t *tl_p = NULL;
static _Thread_local int64_t tl_cap = 0;
#define SR 32 /* rows of the tile scratch: R, or the AMX work tile's 32 */
#define TL_KEEP 16384 /* keys: per-thread tile scratch up to 32 x 16k x 6 B (~3 MB) is kept between calls */

static void release_tiles(void) {
    free(tl_s);
    free(tl_p);
    tl_s = NULL;
    tl_p = NULL;
    tl_cap = 0;
}

static void tiles(tile_args *a) {
    /* covers every key, padding included; on AMX 32 more, so that the 16 rows a tile stores or
     * loads at once do not all fall in one L1 set (a power-of-two row stride would) */
    const int64_t ld = a->nkg * 16 + (a->amx ? 32 : 0);
    if (tl_cap < ld) {
        free(tl_s);
        free(tl_p);
        tl_s = (float *)malloc((size_t)(SR * ld) * sizeof(float));
        tl_p = (uint16_t *)malloc((size_t)(SR * ld) * sizeof(uint16_t));
        tl_cap = (tl_s && tl_p) ? ld : 0;
        if (!tl_cap) { __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED); return; }
    }
#ifdef SLIMLM_PREFILL_AMX
    if (a->amx) {
        tiles_amx(a, tl_s, tl_p, ld);
        if (tl_cap > TL_KEEP) release_tiles();
        return;
    }
#endif
    const int64_t G = a->Hq / a->Hkv, per_head = a->ntiles * G;
    if (a->lanes) { /* item = (KV head, lane): tiles lane, lane + MASS_LANES, ... of its G query heads */
        for (;;) {
            const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
            if (item >= a->Hkv * MASS_LANES) break;
            const int64_t g = item / MASS_LANES, lane = item % MASS_LANES;
            for (int64_t i = lane; i < a->ntiles; i += MASS_LANES)
                for (int64_t h = g * G; h < g * G + G; ++h) tile(a, h, i * R, tl_s, tl_p, ld, a->lanes + item * a->n);
        }
    } else {
        for (;;) {
            const int64_t item = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
            if (item >= a->Hkv * per_head) break;
            /* KV head by KV head (its K and V stay in cache), longest tiles first within a head */
            const int64_t g = item / per_head, rem = item % per_head;
            tile(a, g * G + rem % G, (a->ntiles - 1 - rem / G) * R, tl_s, tl_p, ld, NULL);
        }
    }
    if (tl_cap > TL_KEEP) release_tiles(); /* long prompts: give large buffers back after the call */
}

static _Thread_local void *kp = NULL, *vp = NULL; /* the calling thread's repacked K and V */
static _Thread_local size_t cap = 0;

static void release_repack(void) {
    free(kp);
    free(vp);
    kp = vp = NULL;
    cap = 0;
}

/* Repack ``ra``'s keys (ra->n of them from its table, formats and sizes set) into the calling
 * thread's scratch, grown as needed; fills ra->kp, ra->vp, ra->nkg (even when ``even``). Returns 0, or 2 without memory. */
static int repack_all(repack_args *ra, int nthreads, int even) {
    ra->nkg = (ra->n + 15) / 16;
    if (even) ra->nkg += ra->nkg & 1; /* the AMX tiles read keys in chunks of 32 */
    const size_t need = (size_t)(ra->Hkv * ra->nkg * 16 * ra->d) * (ra->dtype == 1 ? 2 : 4); /* bytes, each of K and V */
    if (need > cap) {
        free(kp);
        free(vp);
        kp = malloc(need);
        vp = malloc(need);
        cap = (kp && vp) ? need : 0;
        if (!cap) return 2;
    }
    ra->kp = kp;
    ra->vp = vp;
    ra->next = 0;
#pragma omp parallel num_threads(nthreads)
    repack(ra);
    return 0;
}

/* Whether the AMX tiles serve a call: bf16 pools read with bf16 arithmetic, on a CPU (and process)
 * with AMX, SLIMLM_AMX not "0". Other pool formats and fp32 keep the AVX-512 tiles. */
static int use_amx(int code, int dtype) {
#ifdef SLIMLM_PREFILL_AMX
    return code == 1 && dtype == 1 && amx_ready();
#else
    (void)code;
    (void)dtype;
    return 0;
#endif
}

/* The tiles of ``ta`` (its frame and outputs set) over the repacked ``ra``, then the scratch kept
 * small. Returns 0, or 2 when scratch memory could not be allocated. */
static int run_tiles(tile_args *ta, const repack_args *ra, int nthreads) {
    ta->kp = ra->kp;
    ta->vp = ra->vp;
    ta->nkg = ra->nkg;
    ta->ntiles = (ta->T + R - 1) / R;
    ta->next = 0;
    ta->failed = 0;
#pragma omp parallel num_threads(nthreads)
    tiles(ta);
    if (cap > ((size_t)64 << 20)) release_repack(); /* keep small scratch for the next call, give large back */
    return ta->failed ? 2 : 0;
}
#endif

/* 1 when this build and process run bf16 calls (bf16 pools, bf16 queries) on the AMX tiles now
 * (SLIMLM_AMX is read at each call), else 0: tests and benchmarks tell which path they measured. */
int slimlm_prefill_amx(void) {
#ifdef SLIMLM_HAVE_AVX512
    return use_amx(1, 1);
#else
    return 0;
#endif
}

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
    repack_args ra = {k_pool, v_pool, table, NULL, NULL, n, 0, Hkv, d, block_size, dtype, 0,
                      kv_code, k_aux, k_aux2, v_aux, v_aux2};
    const int amx = use_amx(kv_code, dtype);
    if (repack_all(&ra, nthreads, amx)) return 2;
    float *lanes = NULL;
    if (mass) {
        lanes = (float *)calloc((size_t)(Hkv * MASS_LANES * n), sizeof(float));
        if (!lanes) return 2;
    }
    tile_args ta = {.q = q, .out = out, .qs_t = qs_t, .qs_h = qs_h, .os_t = os_t, .os_h = os_h, .T = T, .Hq = Hq,
                    .Hkv = Hkv, .d = d, .lo = 0, .n = n, .cq = q_start, .causal = 1, .scale = scale, .dtype = dtype,
                    .lanes = lanes, .amx = amx};
    const int rc = run_tiles(&ta, &ra, nthreads);
    if (lanes) { /* lanes in order, added to each key's slot */
        for (int64_t g = 0; g < Hkv; ++g)
            for (int64_t key = 0; key < n; ++key) {
                float m = 0.f;
                for (int64_t l = 0; l < MASS_LANES; ++l) m += lanes[(g * MASS_LANES + l) * n + key];
                mass[(table[key / block_size] * block_size + key % block_size) * Hkv + g] += m;
            }
        free(lanes);
    }
    return rc;
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
 * ``slimlm_paged_prefill_ex`` (no mass), and so is the tile function. The keys are repacked from
 * the block holding k_lo: the first (k_lo mod block_size) of them are masked, their probabilities
 * exactly 0. Returns 0, 1 on unsupported arguments, 2 when scratch memory could not be allocated.
 * --------------------------------------------------------------------------------------------- */
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
    if (k_hi == k_lo || (causal && k_lo > q_start + T - 1)) { /* no row has a key */
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < Hq; ++h) {
                memset(out + t * os_t + h * os_h, 0, (size_t)d * sizeof(float));
                lse[t * Hq + h] = -INFINITY;
            }
        return 0;
    }
    repack_args ra = {k_pool, v_pool, table + a0 / block_size, NULL, NULL, k_hi - a0, 0, Hkv, d, block_size, dtype, 0,
                      kv_code, k_aux, k_aux2, v_aux, v_aux2};
    const int amx = use_amx(kv_code, dtype);
    if (repack_all(&ra, nthreads, amx)) return 2;
    tile_args ta = {.q = q, .out = out, .lse = lse, .qs_t = qs_t, .qs_h = qs_h, .os_t = os_t, .os_h = os_h, .T = T,
                    .Hq = Hq, .Hkv = Hkv, .d = d, .lo = k_lo - a0, .n = k_hi - a0, .cq = q_start - a0,
                    .causal = causal != 0, .out_f32 = 1, .scale = scale, .dtype = dtype, .amx = amx};
    return run_tiles(&ta, &ra, nthreads);
#else
    (void)q; (void)qs_t; (void)qs_h; (void)k_pool; (void)k_aux; (void)k_aux2; (void)v_pool; (void)v_aux; (void)v_aux2;
    (void)table; (void)q_start; (void)k_lo; (void)k_hi; (void)causal; (void)out; (void)os_t; (void)os_h; (void)lse;
    (void)Hq; (void)scale; (void)nthreads;
    return 1;
#endif
}
