/* Paged decode attention on the CPU: one query token per sequence, keys and values read in
 * place from the block pool (no gather into a padded batch, one pass over the KV).
 *
 * q    (B, Hq, d) float32            out (B, Hq, d) float32
 * k, v (num_blocks, block_size, Hkv, d), float32 (dtype 0) or bfloat16 (dtype 1); or quantized
 *      (the KV codecs of slimlm.kvcache.codec): int8 (dtype 2) with one fp16 scale per
 *      (slot, head) in k_aux/v_aux, or int4 (dtype 3 .. 6, kv_pool.h) as (slot, Hkv, d/2) bytes (even
 *      channel in the low nibble) with fp16 scale and minimum per (slot, head, group of 32 or 16
 *      channels, keys and values each as the code says) in *_aux/*_aux2
 * table (B, max_blocks) int64: physical block of each logical block
 * lens  (B,) int64: tokens to attend (the context including the new token)
 * mass  NULL, or (num_blocks * block_size, Hkv) float32: each attended key's softmax
 *       probabilities, summed over the query heads of its KV head, are added to its slot
 *       (attention-score KV policies such as H2O read them)
 *
 * Work items are sequences, handed out through an atomic counter inside one OpenMP parallel
 * region (only GOMP_parallel is needed, so any libgomp, torch's included, serves); a sequence's
 * result never depends on the others in the batch (same arithmetic alone or among any rows). A
 * sequence walks its blocks twice: scores of every query head against each key row (fp32
 * accumulation), a stable softmax per head, then the weighted sum of value rows. With AVX-512,
 * float32 and bfloat16 pools (head size a multiple of 16, up to 128) run decode_rows_avx512:
 * each key and value row is read and widened once for all the query heads of its KV head (GQA),
 * 16 keys' scores are reduced together, and the next block is prefetched a KV head at a time;
 * with AVX512-BF16 and a bf16 pool (head size a multiple of 32) the scores use bf16 dot
 * products on the keys as stored, the query split into two bf16 parts; int8 / int4 pools are
 * decoded in registers (``decode_quant_avx512``); otherwise a portable loop over a converted
 * row buffer serves. On CPUs with AMX (amx.h: SLIMLM_AMX built, amx_ready(); ``SLIMLM_AMX=0`` says
 * no) bfloat16 pools with head size a multiple of 32 (up to 128), blocks a multiple of 16 keys and
 * at most 8 query heads per KV head take ``decode_rows_amx`` instead: both products on AMX tiles.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_pool.h"
#include "simd_math.h"
#include "amx.h"

/* Prefetch part k of np (its lines k/np .. (k+1)/np) of the block after the one at t0: blocks sit
 * anywhere in the pool, so the hardware sees each as a new stream. Spread over the np KV heads'
 * passes (not all at once, which stalls on the line fill buffers): 1.2x on out-of-cache pools. */
static inline void prefetch_part(const void *pool, size_t elem, const int64_t *tb, int64_t t0, int64_t L,
                                 int64_t block_size, int64_t W, int64_t k, int64_t np) {
    const int64_t next = t0 + block_size;
    if (next >= L) return;
    const int64_t n = L - next < block_size ? L - next : block_size;
    const size_t bytes = (size_t)(n * W) * elem, lines = (bytes + 63) / 64;
    const char *p = (const char *)pool + (size_t)(tb[next / block_size] * block_size * W) * elem;
    for (size_t i = lines * k / np; i < lines * (k + 1) / np; ++i) __builtin_prefetch(p + 64 * i, 0, 3);
}

static inline void softmax_rows(float *s, int64_t Hq, int64_t L) {
    for (int64_t hq = 0; hq < Hq; ++hq) {
        float *sg = s + hq * L, m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < L; ++t) m = sg[t] > m ? sg[t] : m;
#ifdef __AVX512F__
        /* exp512 (simd_math.h, relative error ~2e-7): glibc's expf has no vector form without
         * -ffast-math, and the scalar call was ~a quarter of decode attention's time (session 11) */
        const __m512 vm = _mm512_set1_ps(m);
        __m512 vs = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 16 <= L; t += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), vm));
            _mm512_storeu_ps(sg + t, e);
            vs = _mm512_add_ps(vs, e);
        }
        if (t < L) {
            const __mmask16 mk = (__mmask16)((1u << (L - t)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + t), vm));
            _mm512_mask_storeu_ps(sg + t, mk, e);
            vs = _mm512_mask_add_ps(vs, mk, vs, e);
        }
        sum = _mm512_reduce_add_ps(vs);
#else
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; ++t) { sg[t] = expf(sg[t] - m); sum += sg[t]; }
#endif
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
    }
}

#ifdef __AVX512F__
#define AI __attribute__((always_inline))
#define QG 4 /* query heads of one KV head served by one read of its rows (2 at head sizes above 64) */

/* Four keys' dot products a0..a3 (16 partial sums each) folded so that each 128-bit lane j of
 * the result holds (a0, a1, a2, a3) summed over lane j's four elements. */
static inline AI __m512 fold4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
}

/* Two folded vectors x, y (each 128-bit lane: the same n keys' partial sums) halved: lanes 0, 1 of
 * the result hold x's lanes 0+1 and 2+3, lanes 2, 3 y's. fold16 of four fold4's = 16 keys' sums in
 * key order, one vector: the reduction of 16 dot products in 45 instructions, one store. */
static inline AI __m512 halve(__m512 x, __m512 y) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* A stored row's D channels as D / 16 float32 vectors. float32: as stored. bfloat16 with D a
 * multiple of 32 ("paired"): each 32-channel chunk's even channels (the low halves of its 32-bit
 * lanes, shifted up) and odd ones (the high halves, masked): one instruction per 16 values, the
 * channels in the order even 0..15, odd 0..15 per chunk (queries and outputs are kept in that
 * order too). Other bfloat16 sizes: widened in order. */
static inline AI void row16(const void *pool, int64_t idx, const int dtype, const int64_t D, __m512 *r) {
    if (dtype == 0) {
        for (int64_t j = 0; j < D / 16; ++j) r[j] = _mm512_loadu_ps((const float *)pool + idx + 16 * j);
    } else if (D % 32 == 0) {
        for (int64_t c = 0; c < D / 32; ++c) {
            const __m512i x = _mm512_loadu_si512((const void *)((const uint16_t *)pool + idx + 32 * c));
            r[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
            r[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)));
        }
    } else {
        for (int64_t j = 0; j < D / 16; ++j) r[j] = ld16(pool, idx + 16 * j, 1);
    }
}

/* Natural order <-> the paired order of row16 for n rows of D channels (dir 1: to paired). */
static inline AI void repair(const float *x, float *y, int64_t n, const int64_t D, const int dir) {
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i i0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i i1 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t c = 0; c < n * D; c += 32) {
        const __m512 a = _mm512_loadu_ps(x + c), b = _mm512_loadu_ps(x + c + 16);
        _mm512_storeu_ps(y + c, _mm512_permutex2var_ps(a, dir ? ev : i0, b));
        _mm512_storeu_ps(y + c + 16, _mm512_permutex2var_ps(a, dir ? od : i1, b));
    }
}

/* Scores of HN query heads (qp / qh, ql: their queries, D apart) against the n keys of one block
 * (row kh of the pool holds its first key's KV head, W apart), scaled, into sg (heads L apart). */
static inline AI void score_block(const void *k_pool, const int64_t kh, const int64_t n, const int64_t W,
                                  const float *qp, const uint16_t *qh, const uint16_t *ql, float *sg, const int64_t L,
                                  const int dtype, const int bdot, const int use_lo, const int64_t D, const int HN,
                                  const float scale) {
    const int64_t NC = D / 16, N2 = D / 32;
    (void)N2; /* without AVX512-BF16 */
    __m512 qv[QG][8];
#ifdef __AVX512BF16__
    __m512bh qhv[QG][4], qlv[QG][4];
#endif
    for (int h = 0; h < HN; ++h) {
        if (bdot) {
#ifdef __AVX512BF16__
            for (int64_t j = 0; j < N2; ++j) {
                qhv[h][j] = (__m512bh)_mm512_loadu_si512((const void *)(qh + h * D + 32 * j));
                if (use_lo) qlv[h][j] = (__m512bh)_mm512_loadu_si512((const void *)(ql + h * D + 32 * j));
            }
#endif
        } else {
            for (int64_t j = 0; j < NC; ++j) qv[h][j] = _mm512_loadu_ps(qp + h * D + 16 * j);
        }
    }
    for (int64_t o = 0; o < n; o += 16) {
        __m512 x[QG], w[QG];
        for (int i = 0; i < 4; ++i) {
            __m512 a[QG][4];
            for (int u = 0; u < 4; ++u) {
                const int64_t key = o + 4 * i + u;
                for (int h = 0; h < HN; ++h) a[h][u] = _mm512_setzero_ps();
                if (key >= n) continue;
                const int64_t r = kh + key * W;
                if (bdot) {
#ifdef __AVX512BF16__
                    for (int64_t j = 0; j < N2; ++j) {
                        const __m512bh k = (__m512bh)_mm512_loadu_si512((const void *)((const uint16_t *)k_pool + r + 32 * j));
                        for (int h = 0; h < HN; ++h) {
                            a[h][u] = _mm512_dpbf16_ps(a[h][u], qhv[h][j], k);
                            if (use_lo) a[h][u] = _mm512_dpbf16_ps(a[h][u], qlv[h][j], k);
                        }
                    }
#endif
                } else {
                    __m512 kr[8];
                    row16(k_pool, r, dtype, D, kr);
                    for (int h = 0; h < HN; ++h) {
                        a[h][u] = _mm512_mul_ps(qv[h][0], kr[0]);
                        for (int64_t j = 1; j < NC; ++j) a[h][u] = _mm512_fmadd_ps(qv[h][j], kr[j], a[h][u]);
                    }
                }
            }
            for (int h = 0; h < HN; ++h) {
                const __m512 f = fold4(a[h][0], a[h][1], a[h][2], a[h][3]);
                if (i == 0 || i == 2) w[h] = f;
                else if (i == 1) x[h] = halve(w[h], f);
                else x[h] = halve(x[h], halve(w[h], f));
            }
            if (i < 3 && o + 4 * (i + 1) >= n) { /* the rest of the 16 are past the block's end */
                const __m512 z = _mm512_setzero_ps();
                for (int h = 0; h < HN; ++h) {
                    if (i == 0) x[h] = halve(halve(w[h], z), z);
                    else if (i == 1) x[h] = halve(x[h], z);
                    else x[h] = halve(x[h], halve(w[h], z));
                }
                break;
            }
        }
        const int64_t m = n - o < 16 ? n - o : 16;
        const __mmask16 mk = (__mmask16)((1u << m) - 1);
        for (int h = 0; h < HN; ++h) _mm512_mask_storeu_ps(sg + h * L + o, mk, _mm512_mul_ps(_mm512_set1_ps(scale), x[h]));
    }
}

/* The n value rows of one block (row vh: the first's KV head, W apart), weighted by the HN heads'
 * probabilities pg (L apart), added to their sums acc (D apart): each row loaded and widened once. */
static inline AI void value_block(const void *v_pool, const int64_t vh, const int64_t n, const int64_t W,
                                  const float *pg, const int64_t L, float *acc, const int dtype, const int64_t D,
                                  const int HN) {
    const int64_t NC = D / 16;
    __m512 a[QG][8]; /* the block's sums stay in registers */
    for (int h = 0; h < HN; ++h)
        for (int64_t j = 0; j < NC; ++j) a[h][j] = _mm512_loadu_ps(acc + h * D + 16 * j);
    for (int64_t o = 0; o < n; ++o) {
        __m512 vr[8];
        row16(v_pool, vh + o * W, dtype, D, vr);
        for (int h = 0; h < HN; ++h) {
            const __m512 p = _mm512_set1_ps(pg[h * L + o]);
            for (int64_t j = 0; j < NC; ++j) a[h][j] = _mm512_fmadd_ps(p, vr[j], a[h][j]);
        }
    }
    for (int h = 0; h < HN; ++h)
        for (int64_t j = 0; j < NC; ++j) _mm512_storeu_ps(acc + h * D + 16 * j, a[h][j]);
}

/* The values walk of one sequence's decode (the AVX-512 and the AMX score paths share it): every
 * block's value rows, each loaded and widened once for the query heads of its KV head (up to QG at
 * a time, 2 above head size 64), weighted by the probabilities s (Hq rows of L) into acc (Hq x D,
 * zeroed by the caller). */
static inline AI void values_pass(const void *v_pool, const int64_t *tb, const int64_t L, const int64_t block_size,
                                  const int64_t W, const int64_t D, const int64_t Hq, const int64_t Hkv,
                                  const int64_t G, const size_t elem, const int dtype, const float *s, float *acc) {
    const int64_t QN = D <= 64 ? QG : 2;
    for (int64_t t0 = 0; t0 < L; t0 += block_size) {
        const int64_t n = L - t0 < block_size ? L - t0 : block_size, base = tb[t0 / block_size] * block_size * W;
        for (int64_t h0 = 0, hn = 0; h0 < Hq; h0 += hn) {
            const int64_t g = h0 / G;
            hn = (g + 1) * G - h0 < QN ? (g + 1) * G - h0 : QN;
            if (h0 == g * G) prefetch_part(v_pool, elem, tb, t0, L, block_size, W, g, Hkv);
#define VALUE(HN) value_block(v_pool, base + g * D, n, W, s + h0 * L + t0, L, acc + h0 * D, dtype, D, HN)
            switch (hn) {
            case 1: VALUE(1); break;
            case 2: VALUE(2); break;
            case 3: if (D <= 64) VALUE(3); break;
            default: if (D <= 64) VALUE(4); break;
            }
#undef VALUE
        }
    }
}

/* One sequence's decode over a float32 (dtype 0) or bfloat16 (dtype 1) pool, head size D (a
 * multiple of 16, at most 128), as two walks over its blocks (keys, then values), each block
 * read once: every key and value row is loaded (and widened) once and serves all the query
 * heads of its KV head (up to QG at a time, a constant number per instance: score_block and
 * value_block keep their sums in registers), so the work per byte read is what memory speed
 * allows. Scores: 16 keys' dot products per head reduced together (fold4, halve), one store.
 * With AVX512-BF16 (bdot: bfloat16 pool, D a multiple of 32) the keys are multiplied as stored,
 * the query as bf16 hi + lo parts (lo skipped when zero, as a bf16 model's queries are: use_lo 0;
 * 16 significant bits otherwise, error about 2^-17 relative). ``qx``: scratch of 2 Hq D floats. */
static inline AI void decode_rows_avx512(const float *qb, const void *k_pool, const void *v_pool, const int dtype,
                                         const int bdot, const int use_lo, const int64_t *tb, int64_t L, float *ob,
                                         float *s, float *qx, const int64_t Hq, const int64_t Hkv, const int64_t D,
                                         const int64_t block_size, const float scale) {
    const int64_t G = Hq / Hkv, W = Hkv * D, QN = D <= 64 ? QG : 2;
    const int paired = dtype == 1 && D % 32 == 0;
    const size_t elem = dtype == 0 ? 4 : 2;
    const float *qp = qb; /* queries in the rows' channel order */
    const uint16_t *qh = (const uint16_t *)qx, *ql = qh + Hq * D; /* bdot: bf16 hi and lo parts */
    if (bdot) {
#ifdef __AVX512BF16__
        for (int64_t c = 0; c < Hq * D; c += 16) {
            const __m512 x = _mm512_loadu_ps(qb + c);
            const __m256bh xh = _mm512_cvtneps_pbh(x);
            const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)xh), 16));
            _mm256_storeu_si256((__m256i *)((uint16_t *)qx + c), (__m256i)xh);
            _mm256_storeu_si256((__m256i *)((uint16_t *)qx + Hq * D + c), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, back)));
        }
#endif
    } else if (paired) {
        repair(qb, qx, Hq, D, 1);
        qp = qx;
    }
    for (int64_t t0 = 0; t0 < L; t0 += block_size) { /* scores */
        const int64_t n = L - t0 < block_size ? L - t0 : block_size, base = tb[t0 / block_size] * block_size * W;
        for (int64_t h0 = 0, hn = 0; h0 < Hq; h0 += hn) {
            const int64_t g = h0 / G; /* heads h0 .. h0 + hn - 1 of KV head g */
            hn = (g + 1) * G - h0 < QN ? (g + 1) * G - h0 : QN;
            if (h0 == g * G) prefetch_part(k_pool, elem, tb, t0, L, block_size, W, g, Hkv);
#define SCORE(HN) score_block(k_pool, base + g * D, n, W, qp + h0 * D, qh + h0 * D, ql + h0 * D, s + h0 * L + t0, L, \
                              dtype, bdot, use_lo, D, HN, scale)
            switch (hn) {
            case 1: SCORE(1); break;
            case 2: SCORE(2); break;
            case 3: if (D <= 64) SCORE(3); break;
            default: if (D <= 64) SCORE(4); break;
            }
#undef SCORE
        }
    }
    softmax_rows(s, Hq, L);
    float *acc = paired ? qx : ob; /* paired: summed in the rows' channel order, put back at the end */
    memset(acc, 0, (size_t)(Hq * D) * sizeof(float));
    values_pass(v_pool, tb, L, block_size, W, D, Hq, Hkv, G, elem, dtype, s, acc);
    if (paired) repair(acc, ob, Hq, D, 0);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(SLIMLM_AMX)
#define SLIMLM_DECODE_AMX 1
/* bfloat16 pools with AMX (amx.h; taken when amx_ready(), so SLIMLM_AMX=0 keeps
 * decode_rows_avx512): the scores as tile products (TDPBF16PS), the values as decode_rows_avx512
 * sums them. Per 16 keys (one block's rows; blocks in order, every KV head g in turn, as the AVX-512
 * path walks them, with its prefetch): C (16 keys x 16) = K (16 keys x 32 channels: the pool's rows
 * of head g read in place, W apart) . Q (per pair of channels, g's G <= 8 query heads' bf16 hi parts
 * in columns 0 .. G-1 and lo parts in G .. 2G-1, built once per row: 16 significant bits, as the
 * AVX-512 path's split); a head's score is its hi column plus its lo column, gathered from the
 * stored C tile. Where decode_rows_avx512 spends 4 dot-product instructions per key and head (64
 * channels, hi + lo) and a 16-key reduction, the tiles take 2 tile products per 16 keys and KV head
 * for all its heads. The scores are the AVX-512 path's products summed in the tiles' order; the
 * values' arithmetic is that path's. A row's arithmetic is its own (its own tiles and columns), so
 * its output is the same alone or in any batch. Needs head size a multiple of 32 up to 128, blocks a
 * multiple of 16 keys (a tile's 16 key rows lie in one block: rows past the length are read and
 * their scores dropped), at most 8 query heads per KV head.
 * Tried first (not kept): the values on tiles too (the probabilities as bf16 hi + lo rows, 32 keys'
 * values re-laid per call as key pairs) with each KV head walking all blocks in turn: 1.11x the
 * AVX-512 path with the pool in cache, 0.82-0.97x out of cache (docs/benchmarks.md, session 13). */
#define AMX_MAXG 8

typedef struct {
    uint32_t *qt;  /* Hkv * (D / 32) tiles of 16 channel pairs x 16 columns: the queries (scores' B) */
    uint16_t *qx;  /* the queries' bf16 hi parts (Hq D), then lo parts */
    float *c;      /* four stored C tiles (4 x 256), one per KV head in turn */
} amx_rows_t;

static int decode_amx_ok(int dtype, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size) {
    return dtype == 1 && D % 32 == 0 && D <= 128 && block_size % 16 == 0 && Hq / Hkv <= AMX_MAXG && amx_ready();
}

/* One thread's scratch; 1 when out of memory. */
static int amx_rows_init(amx_rows_t *a, int64_t Hq, int64_t Hkv, int64_t D) {
    const size_t nqt = (size_t)(Hkv * (D / 32) * 256);
    memset(a, 0, sizeof *a);
    char *m = (char *)malloc(nqt * 4 + 1024 * 4 + (size_t)(2 * Hq * D) * 2);
    if (!m) return 1;
    a->qt = (uint32_t *)m;
    a->c = (float *)(m + nqt * 4);
    a->qx = (uint16_t *)(m + nqt * 4 + 4096);
    return 0;
}

static inline AI void decode_rows_amx(const float *qb, const uint16_t *k_pool, const uint16_t *v_pool,
                                      const int64_t *tb, int64_t L, float *ob, float *s, float *qx, amx_rows_t *a,
                                      const int use_lo, int64_t Hq, int64_t Hkv, const int64_t D, int64_t bs,
                                      float scale) {
    const int64_t G = Hq / Hkv, W = Hkv * D, NC = D / 32;
    uint16_t *qh = a->qx, *ql = a->qx + Hq * D;
    for (int64_t c = 0; c < Hq * D; c += 16) { /* the queries' hi and lo bf16 parts */
        const __m512 x = _mm512_loadu_ps(qb + c);
        const __m256bh xh = _mm512_cvtneps_pbh(x);
        const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)xh), 16));
        _mm256_storeu_si256((__m256i *)(qh + c), (__m256i)xh);
        _mm256_storeu_si256((__m256i *)(ql + c), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, back)));
    }
    memset(a->qt, 0, (size_t)(Hkv * NC * 256) * 4);
    for (int64_t h = 0; h < Hq; ++h) {
        const int64_t g = h / G, j = h % G;
        const uint32_t *hi = (const uint32_t *)(qh + h * D), *lo = (const uint32_t *)(ql + h * D);
        for (int64_t c = 0; c < NC; ++c) {
            uint32_t *t = a->qt + (g * NC + c) * 256;
            for (int p = 0; p < 16; ++p) {
                t[p * 16 + j] = hi[16 * c + p];
                t[p * 16 + G + j] = lo[16 * c + p];
            }
        }
    }
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < L; t0 += 16) { /* scores: 16 keys (one block's rows) at a time, every KV head */
        const int64_t n = L - t0 < 16 ? L - t0 : 16, base = (tb[t0 / bs] * bs + t0 % bs) * W;
        const __mmask16 mk = (__mmask16)((1u << n) - 1);
        for (int64_t g = 0; g < Hkv; ++g) {
            if (t0 % bs == 0) prefetch_part(k_pool, 2, tb, t0, L, bs, W, g, Hkv);
            const uint32_t *qg = a->qt + g * NC * 256;
            const uint16_t *kr = k_pool + base + g * D;
            _tile_zero(0);
            _tile_loadd(2, qg, 64);
            _tile_loadd(1, kr, W * 2);
            _tile_dpbf16ps(0, 1, 2);
            if (NC > 1) { _tile_loadd(4, qg + 256, 64); _tile_loadd(3, kr + 32, W * 2); _tile_dpbf16ps(0, 3, 4); }
            if (NC > 2) { _tile_loadd(2, qg + 512, 64); _tile_loadd(1, kr + 64, W * 2); _tile_dpbf16ps(0, 1, 2); }
            if (NC > 3) { _tile_loadd(4, qg + 768, 64); _tile_loadd(3, kr + 96, W * 2); _tile_dpbf16ps(0, 3, 4); }
            float *cb = a->c + 256 * (g & 3); /* a store buffer per head in turn: the gathers need not wait on the next store */
            _tile_stored(0, cb, 64);
            for (int64_t j = 0; j < G; ++j) {
                __m512 x = _mm512_i32gather_ps(col, cb + j, 4);
                if (use_lo) x = _mm512_add_ps(x, _mm512_i32gather_ps(col, cb + G + j, 4));
                _mm512_mask_storeu_ps(s + (g * G + j) * L + t0, mk, _mm512_mul_ps(vscale, x));
            }
        }
    }
    softmax_rows(s, Hq, L);
    /* values: decode_rows_avx512's (bf16 rows widened in the paired channel order, fp32 FMAs) */
    float *acc = qx;
    memset(acc, 0, (size_t)(Hq * D) * sizeof(float));
    values_pass(v_pool, tb, L, bs, W, D, Hq, Hkv, G, 2, 1, s, acc);
    repair(acc, ob, Hq, D, 0);
}
#endif

/* 1 when this build and process run bfloat16 pools' decode on AMX tiles now (SLIMLM_AMX is read
 * at each call), else 0: tests and benchmarks tell which path they measured. */
int slimlm_decode_amx(void) {
#ifdef SLIMLM_DECODE_AMX
    return amx_ready();
#else
    return 0;
#endif
}

/* One stored row (slot) of all Hkv heads as float32 (W = Hkv * d values). */
static const float *load_row(const pool_t *p, int64_t slot, float *buf) {
    if (p->dtype == 0) return (const float *)p->data + slot * p->Hkv * p->d;
    for (int64_t h = 0; h < p->Hkv; ++h) head_row(p, slot, h, buf + h * p->d);
    return buf;
}

#ifdef __AVX512F__
#define QH 4 /* query heads of one KV head served per pass over its rows */

/* n (<= 8) fp16 values as float32 in the low lanes (the rest zero), reading only n. */
static inline __attribute__((always_inline)) __m512 ld_f16x8(const uint16_t *p, int64_t n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << n) - 1), p)));
#else
    uint16_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(b, p, (size_t)n * sizeof(uint16_t));
    return _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b)));
#endif
}

/* Quantized pools with AVX-512 (int8: head size a multiple of 16; int4: of 32; at most 128),
 * rows decoded in registers once per pass and used by up to QH query heads of their KV head
 * (heads h0 .. h0 + hn - 1 of KV head g). Rows are walked block by block (no division per key),
 * 4 keys per transposing reduction (sum4) for the scores. The int4 readers take their group
 * size as a constant (``KG`` / ``VG``: each kv code is its own instance, dispatched once per
 * call; the group sizes never reach the inner loops as run-time values).
 *
 * int8: q . (c s) = s (q . c), and the values' weight p s multiplies the codes. */
static inline __attribute__((always_inline)) void i8_scores(const float *qb, const pool_t *kp, const int64_t *tb,
                                                           int64_t L, float *s, int64_t h0, int64_t hn, int64_t g,
                                                           int64_t Hkv, int64_t d, int64_t block_size, float scale) {
    const int64_t W = Hkv * d, nv = d / 16;
    __m512 qv[QH][8];
    for (int64_t h = 0; h < QH; ++h) if (h < hn)
        for (int64_t j = 0; j < nv; ++j) qv[h][j] = _mm512_loadu_ps(qb + (h0 + h) * d + 16 * j);
    for (int64_t b0 = 0; b0 < L; b0 += block_size) {
        const int64_t nb = L - b0 < block_size ? L - b0 : block_size, base = tb[b0 / block_size] * block_size;
        for (int64_t o = 0; o < nb; o += 4) {
            const int64_t nt = nb - o < 4 ? nb - o : 4;
            __m512 a[QH][4];
            float sc[4];
            for (int64_t u = 0; u < 4; ++u) {
                if (u >= nt) {
                    for (int64_t h = 0; h < QH; ++h) if (h < hn) a[h][u] = _mm512_setzero_ps();
                    continue;
                }
                const int64_t slot = base + o + u;
                const int8_t *kr = (const int8_t *)kp->data + slot * W + g * d;
                __m512 c[8];
                for (int64_t j = 0; j < nv; ++j) c[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(kr + 16 * j))));
                for (int64_t h = 0; h < QH; ++h) if (h < hn) {
                    a[h][u] = _mm512_mul_ps(qv[h][0], c[0]);
                    for (int64_t j = 1; j < nv; ++j) a[h][u] = _mm512_fmadd_ps(qv[h][j], c[j], a[h][u]);
                }
                sc[u] = scale * _cvtsh_ss(((const uint16_t *)kp->aux)[slot * Hkv + g]);
            }
            for (int64_t h = 0; h < QH; ++h) if (h < hn) {
                float r[4];
                _mm_storeu_ps(r, sum4(a[h][0], a[h][1], a[h][2], a[h][3]));
                for (int64_t u = 0; u < nt; ++u) s[(h0 + h) * L + b0 + o + u] = sc[u] * r[u];
            }
        }
    }
}

static inline __attribute__((always_inline)) void i8_values(const pool_t *vp, const int64_t *tb, int64_t L,
                                                           const float *s, float *ob, int64_t h0, int64_t hn, int64_t g,
                                                           int64_t Hkv, int64_t d, int64_t block_size) {
    const int64_t W = Hkv * d, nv = d / 16;
    __m512 acc[QH][8];
    for (int64_t h = 0; h < QH; ++h) if (h < hn)
        for (int64_t j = 0; j < nv; ++j) acc[h][j] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < L; b0 += block_size) {
        const int64_t nb = L - b0 < block_size ? L - b0 : block_size, base = tb[b0 / block_size] * block_size;
        for (int64_t o = 0; o < nb; ++o) {
            const int64_t slot = base + o, t = b0 + o;
            const int8_t *vr = (const int8_t *)vp->data + slot * W + g * d;
            const float sv = _cvtsh_ss(((const uint16_t *)vp->aux)[slot * Hkv + g]);
            __m512 c[8];
            for (int64_t j = 0; j < nv; ++j) c[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(vr + 16 * j))));
            for (int64_t h = 0; h < QH; ++h) if (h < hn) {
                const __m512 w = _mm512_set1_ps(s[(h0 + h) * L + t] * sv);
                for (int64_t j = 0; j < nv; ++j) acc[h][j] = _mm512_fmadd_ps(w, c[j], acc[h][j]);
            }
        }
    }
    for (int64_t h = 0; h < QH; ++h) if (h < hn)
        for (int64_t j = 0; j < nv; ++j) _mm512_storeu_ps(ob + (h0 + h) * d + 16 * j, acc[h][j]);
}

/* int4 keys in groups of KG (16 or 32): 16 bytes (32 channels) widen to their even channels
 * (low nibbles) and odd ones (high nibbles); the query is split alike. Groups of 32: q . (c s + m)
 * = s (q_even . c_lo + q_odd . c_hi) + m sum(q), the codes times the scale once for the hn heads.
 * Groups of 16: a chunk's lanes 0-7 hold the first group's channels, lanes 8-15 the second's; the
 * row's scales and minima are loaded once and permuted into place per chunk, the key decoded as
 * c s + m. */
static inline __attribute__((always_inline)) void i4_scores(const float *qb, const pool_t *kp, const int64_t *tb,
                                                           int64_t L, float *s, int64_t h0, int64_t hn, int64_t g,
                                                           int64_t Hkv, int64_t d, int64_t block_size, float scale,
                                                           const int KG) {
    const int64_t W = Hkv * d, NC = d / 32, NGK = d / KG;
    const __m512i low = _mm512_set1_epi32(15);
    const __m512i two_groups = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 qe[QH][4], qo[QH][4];
    float qsum[QH][4]; /* groups of 32: the sum of the query over each group */
    for (int64_t h = 0; h < QH; ++h) if (h < hn)
        for (int64_t gr = 0; gr < NC; ++gr) {
            float e[16], o[16];
            const float *qg = qb + (h0 + h) * d + gr * 32;
            qsum[h][gr] = 0.f;
            for (int i = 0; i < 16; ++i) { e[i] = qg[2 * i]; o[i] = qg[2 * i + 1]; qsum[h][gr] += e[i] + o[i]; }
            qe[h][gr] = _mm512_loadu_ps(e);
            qo[h][gr] = _mm512_loadu_ps(o);
        }
    for (int64_t b0 = 0; b0 < L; b0 += block_size) {
        const int64_t nb = L - b0 < block_size ? L - b0 : block_size, base = tb[b0 / block_size] * block_size;
        for (int64_t o = 0; o < nb; o += 4) {
            const int64_t nt = nb - o < 4 ? nb - o : 4;
            __m512 a[QH][4];
            float c[QH][4];
            for (int64_t u = 0; u < 4; ++u) {
                for (int64_t h = 0; h < QH; ++h) if (h < hn) { a[h][u] = _mm512_setzero_ps(); c[h][u] = 0.f; }
                if (u >= nt) continue;
                const int64_t slot = base + o + u;
                const uint8_t *kr = (const uint8_t *)kp->data + slot * (W / 2) + g * (d / 2);
                const uint16_t *sc = (const uint16_t *)kp->aux + (slot * Hkv + g) * NGK;
                const uint16_t *mn = (const uint16_t *)kp->aux2 + (slot * Hkv + g) * NGK;
                if (KG == 16) {
                    const __m512 sv = ld_f16x8(sc, NGK), mv = ld_f16x8(mn, NGK);
                    for (int64_t gr = 0; gr < NC; ++gr) {
                        const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(kr + gr * 16)));
                        const __m512i pick = _mm512_add_epi32(two_groups, _mm512_set1_epi32((int)(2 * gr)));
                        const __m512 sg = _mm512_permutexvar_ps(pick, sv), mg = _mm512_permutexvar_ps(pick, mv);
                        const __m512 lo = _mm512_fmadd_ps(sg, _mm512_cvtepi32_ps(_mm512_and_si512(x, low)), mg);
                        const __m512 hi = _mm512_fmadd_ps(sg, _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4)), mg);
                        for (int64_t h = 0; h < QH; ++h) if (h < hn)
                            a[h][u] = _mm512_fmadd_ps(qo[h][gr], hi, _mm512_fmadd_ps(qe[h][gr], lo, a[h][u]));
                    }
                } else {
                    for (int64_t gr = 0; gr < NC; ++gr) {
                        const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(kr + gr * 16)));
                        const __m512 sg = _mm512_set1_ps(_cvtsh_ss(sc[gr]));
                        const __m512 lo = _mm512_mul_ps(sg, _mm512_cvtepi32_ps(_mm512_and_si512(x, low)));
                        const __m512 hi = _mm512_mul_ps(sg, _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4)));
                        const float mg = _cvtsh_ss(mn[gr]);
                        for (int64_t h = 0; h < QH; ++h) if (h < hn) {
                            a[h][u] = _mm512_fmadd_ps(qo[h][gr], hi, _mm512_fmadd_ps(qe[h][gr], lo, a[h][u]));
                            c[h][u] += mg * qsum[h][gr];
                        }
                    }
                }
            }
            for (int64_t h = 0; h < QH; ++h) if (h < hn) {
                float r[4];
                _mm_storeu_ps(r, sum4(a[h][0], a[h][1], a[h][2], a[h][3]));
                for (int64_t u = 0; u < nt; ++u) s[(h0 + h) * L + b0 + o + u] = scale * (r[u] + c[h][u]);
            }
        }
    }
}

/* int4 values in groups of VG: the output accumulates p s c (even and odd channels apart) plus
 * p m per group, interleaved back at the end; with groups of 16 the weight p s is blended per
 * half of a chunk. */
static inline __attribute__((always_inline)) void i4_values(const pool_t *vp, const int64_t *tb, int64_t L,
                                                           const float *s, float *ob, int64_t h0, int64_t hn, int64_t g,
                                                           int64_t Hkv, int64_t d, int64_t block_size, const int VG) {
    const int64_t W = Hkv * d, NC = d / 32, NGV = d / VG;
    const __m512i low = _mm512_set1_epi32(15);
    __m512 ae[QH][4], ao[QH][4];
    float msum[QH][8]; /* sum over keys of p times the value group's minimum */
    for (int64_t h = 0; h < QH; ++h) if (h < hn) {
        for (int64_t gr = 0; gr < NC; ++gr) ae[h][gr] = ao[h][gr] = _mm512_setzero_ps();
        for (int64_t gr = 0; gr < NGV; ++gr) msum[h][gr] = 0.f;
    }
    for (int64_t b0 = 0; b0 < L; b0 += block_size) {
        const int64_t nb = L - b0 < block_size ? L - b0 : block_size, base = tb[b0 / block_size] * block_size;
        for (int64_t o = 0; o < nb; ++o) {
            const int64_t slot = base + o, t = b0 + o;
            const uint8_t *vr = (const uint8_t *)vp->data + slot * (W / 2) + g * (d / 2);
            const uint16_t *sc = (const uint16_t *)vp->aux + (slot * Hkv + g) * NGV;
            const uint16_t *mn = (const uint16_t *)vp->aux2 + (slot * Hkv + g) * NGV;
            for (int64_t gr = 0; gr < NC; ++gr) {
                const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(vr + gr * 16)));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(x, low)), hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
                if (VG == 16) {
                    const float sa = _cvtsh_ss(sc[2 * gr]), sb = _cvtsh_ss(sc[2 * gr + 1]);
                    const float ma = _cvtsh_ss(mn[2 * gr]), mb = _cvtsh_ss(mn[2 * gr + 1]);
                    for (int64_t h = 0; h < QH; ++h) if (h < hn) {
                        const float p = s[(h0 + h) * L + t];
                        const __m512 w = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(p * sa), _mm512_set1_ps(p * sb));
                        ae[h][gr] = _mm512_fmadd_ps(w, lo, ae[h][gr]);
                        ao[h][gr] = _mm512_fmadd_ps(w, hi, ao[h][gr]);
                        msum[h][2 * gr] += p * ma;
                        msum[h][2 * gr + 1] += p * mb;
                    }
                } else {
                    const float sg = _cvtsh_ss(sc[gr]), mg = _cvtsh_ss(mn[gr]);
                    for (int64_t h = 0; h < QH; ++h) if (h < hn) {
                        const float p = s[(h0 + h) * L + t];
                        const __m512 w = _mm512_set1_ps(p * sg);
                        ae[h][gr] = _mm512_fmadd_ps(w, lo, ae[h][gr]);
                        ao[h][gr] = _mm512_fmadd_ps(w, hi, ao[h][gr]);
                        msum[h][gr] += p * mg;
                    }
                }
            }
        }
    }
    for (int64_t h = 0; h < QH; ++h) if (h < hn)
        for (int64_t gr = 0; gr < NC; ++gr) {
            float e[16], od[16];
            _mm512_storeu_ps(e, ae[h][gr]);
            _mm512_storeu_ps(od, ao[h][gr]);
            float *og = ob + (h0 + h) * d + gr * 32;
            for (int i = 0; i < 16; ++i) {
                const float m = msum[h][VG == 16 ? 2 * gr + (i >= 8) : gr];
                og[2 * i] = e[i] + m;
                og[2 * i + 1] = od[i] + m;
            }
        }
}

/* One sequence's decode over quantized pools of kv code ``code`` (2 .. 6, a constant at every
 * call site: the int4 group sizes are fixed per instance). */
static inline __attribute__((always_inline)) void decode_quant_avx512(const float *qb, const pool_t *kp, const pool_t *vp,
                                                                     const int64_t *tb, int64_t L, float *ob, float *s,
                                                                     int64_t Hq, int64_t Hkv, int64_t d,
                                                                     int64_t block_size, float scale, const int code) {
    const int64_t G = Hq / Hkv;
    for (int64_t h0 = 0, hn = 0; h0 < Hq; h0 += hn) { /* scores */
        const int64_t g = h0 / G; /* heads h0 .. h0 + hn - 1 of KV head g */
        hn = (g + 1) * G - h0 < QH ? (g + 1) * G - h0 : QH;
        if (code == 2) i8_scores(qb, kp, tb, L, s, h0, hn, g, Hkv, d, block_size, scale);
        else i4_scores(qb, kp, tb, L, s, h0, hn, g, Hkv, d, block_size, scale, (int)i4_group(code, 0));
    }
    softmax_rows(s, Hq, L);
    for (int64_t h0 = 0, hn = 0; h0 < Hq; h0 += hn) { /* weighted values */
        const int64_t g = h0 / G;
        hn = (g + 1) * G - h0 < QH ? (g + 1) * G - h0 : QH;
        if (code == 2) i8_values(vp, tb, L, s, ob, h0, hn, g, Hkv, d, block_size);
        else i4_values(vp, tb, L, s, ob, h0, hn, g, Hkv, d, block_size, (int)i4_group(code, 1));
    }
}

/* decode_quant_avx512 instantiated per kv code (2 .. 6) at head size D. */
#define DECODE_QUANT(D)                                                                                       \
    switch (dtype) {                                                                                          \
    case 2: decode_quant_avx512(qb, &kp, &vp, tb, L, ob, s, Hq, Hkv, D, block_size, scale, 2); break;        \
    case 3: decode_quant_avx512(qb, &kp, &vp, tb, L, ob, s, Hq, Hkv, D, block_size, scale, 3); break;        \
    case 4: decode_quant_avx512(qb, &kp, &vp, tb, L, ob, s, Hq, Hkv, D, block_size, scale, 4); break;        \
    case 5: decode_quant_avx512(qb, &kp, &vp, tb, L, ob, s, Hq, Hkv, D, block_size, scale, 5); break;        \
    default: decode_quant_avx512(qb, &kp, &vp, tb, L, ob, s, Hq, Hkv, D, block_size, scale, 6); break;       \
    }
#endif

#ifdef __AVX512F__
#ifdef __AVX512BF16__
#define HAVE_BDOT 1
#else
#define HAVE_BDOT 0
#endif
/* decode_rows_avx512 instantiated per pool type and query kind at head size D. */
#define DECODE_ROWS(D)                                                                                         \
    if (dtype == 0) decode_rows_avx512(qb, k_pool, v_pool, 0, 0, 0, tb, L, ob, s, row, Hq, Hkv, D, block_size, scale); \
    else if (!bdot) decode_rows_avx512(qb, k_pool, v_pool, 1, 0, 0, tb, L, ob, s, row, Hq, Hkv, D, block_size, scale); \
    else if (!use_lo) decode_rows_avx512(qb, k_pool, v_pool, 1, 1, 0, tb, L, ob, s, row, Hq, Hkv, D, block_size, scale); \
    else decode_rows_avx512(qb, k_pool, v_pool, 1, 1, 1, tb, L, ob, s, row, Hq, Hkv, D, block_size, scale);
#endif

static void decode_generic(const float *qb, const pool_t *kp, const pool_t *vp, const int64_t *tb,
                           int64_t L, float *ob, float *s, float *row, int64_t Hq, int64_t Hkv, int64_t d,
                           int64_t block_size, float scale) {
    const int64_t G = Hq / Hkv;
    for (int64_t t = 0; t < L; ++t) {
        const float *kr = load_row(kp, tb[t / block_size] * block_size + t % block_size, row);
        for (int64_t hq = 0; hq < Hq; ++hq) {
            const float *qg = qb + hq * d, *k = kr + (hq / G) * d;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < d; ++i) acc += qg[i] * k[i];
            s[hq * L + t] = acc * scale;
        }
    }
    softmax_rows(s, Hq, L);
    memset(ob, 0, (size_t)(Hq * d) * sizeof(float));
    for (int64_t t = 0; t < L; ++t) {
        const float *vr = load_row(vp, tb[t / block_size] * block_size + t % block_size, row);
        for (int64_t hq = 0; hq < Hq; ++hq) {
            const float p = s[hq * L + t], *v = vr + (hq / G) * d;
            float *og = ob + hq * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) og[i] += p * v[i];
        }
    }
}

int slimlm_paged_decode(const float *q, const void *k_pool, const void *v_pool, const void *k_aux,
                        const void *k_aux2, const void *v_aux, const void *v_aux2, int dtype,
                        const int64_t *table, const int64_t *lens, float *out, float *mass,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t d, int64_t block_size,
                        int64_t max_blocks, float scale, int nthreads) {
    if (Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || !kv_code_ok(dtype, d, k_aux, k_aux2, v_aux, v_aux2)) return 1;
    const pool_t kp = kv_pool(k_pool, k_aux, k_aux2, dtype, 0, Hkv, d), vp = kv_pool(v_pool, v_aux, v_aux2, dtype, 1, Hkv, d);
    const int64_t G = Hq / Hkv;
    int64_t next = 0;
    int failed = 0;
#ifdef SLIMLM_DECODE_AMX
    const int amx = decode_amx_ok(dtype, Hq, Hkv, d, block_size);
#endif
#pragma omp parallel num_threads(nthreads)
    {
        /* row: one converted row (portable loop) or the queries rearranged (decode_rows_avx512) */
        float *row = (float *)malloc((size_t)(2 * Hq * d > Hkv * d ? 2 * Hq * d : Hkv * d) * sizeof(float));
        int64_t cap = 0;
        float *s = NULL;
        if (!row) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
#ifdef SLIMLM_DECODE_AMX
        amx_rows_t as;
        if (amx) {
            static const int tr[8] = {16, 16, 16, 16, 16, 16, 16, 16}, tc[8] = {64, 64, 64, 64, 64, 64, 64, 64};
            amx_configure(8, tr, tc); /* per thread: the tile registers are */
            if (amx_rows_init(&as, Hq, Hkv, d)) {
                __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                free(row);
                row = NULL;
            }
        }
#endif
        while (row) {
            const int64_t b = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (b >= B) break;
            const int64_t L = lens[b];
            float *ob = out + b * Hq * d;
            if (L <= 0) { memset(ob, 0, (size_t)(Hq * d) * sizeof(float)); continue; }
            if (Hq * L > cap) {
                free(s);
                cap = Hq * L;
                s = (float *)malloc((size_t)cap * sizeof(float));
                if (!s) { __atomic_store_n(&failed, 1, __ATOMIC_RELAXED); cap = 0; break; }
            }
            const float *qb = q + b * Hq * d;
            const int64_t *tb = table + b * max_blocks;
            int done = 0;
#ifdef SLIMLM_DECODE_AMX
            if (amx) {
                int use_lo = 0; /* a query not exact in bf16: its lo parts' scores are added */
                for (int64_t i = 0; i < Hq * d && !use_lo; ++i) {
                    uint32_t u;
                    memcpy(&u, qb + i, 4);
                    use_lo = (u & 0xFFFFu) != 0;
                }
                if (d == 64) decode_rows_amx(qb, k_pool, v_pool, tb, L, ob, s, row, &as, use_lo, Hq, Hkv, 64, block_size, scale);
                else decode_rows_amx(qb, k_pool, v_pool, tb, L, ob, s, row, &as, use_lo, Hq, Hkv, d, block_size, scale);
                done = 1;
            }
#endif
#ifdef __AVX512F__
            if (!done && d % 16 == 0 && d <= 128 && dtype <= 1) {
                const int bdot = dtype == 1 && d % 32 == 0 && HAVE_BDOT;
                int use_lo = 0; /* a query not exact in bf16 (low 16 bits of a float32 set) */
                for (int64_t i = 0; bdot && i < Hq * d && !use_lo; ++i) {
                    uint32_t u;
                    memcpy(&u, qb + i, 4);
                    use_lo = (u & 0xFFFFu) != 0;
                }
                if (d == 64) { DECODE_ROWS(64) } /* the common size a constant: the loops unroll */
                else { DECODE_ROWS(d) }
                done = 1;
            }
            else if (!done && ((dtype == 2 && d % 16 == 0) || (dtype >= 3 && d % 32 == 0)) && d >= 16 && d <= 128) {
                if (d == 64) { DECODE_QUANT(64) } /* constant sizes: the accumulators stay in registers */
                else { DECODE_QUANT(d) }
                done = 1;
            }
#endif
            if (!done) decode_generic(qb, &kp, &vp, tb, L, ob, s, row, Hq, Hkv, d, block_size, scale);
            if (mass) { /* s holds the softmax probabilities (Hq, L); sequences own their slots */
                for (int64_t t = 0; t < L; ++t) {
                    float *m = mass + (tb[t / block_size] * block_size + t % block_size) * Hkv;
                    for (int64_t hq = 0; hq < Hq; ++hq) m[hq / G] += s[hq * L + t];
                }
            }
        }
#ifdef SLIMLM_DECODE_AMX
        if (amx) {
            _tile_release();
            free(as.qt);
        }
#endif
        free(s);
        free(row);
    }
    return failed ? 2 : 0;
}

/* Quantize rows into a quantized pool, as the codecs' ``write`` computes them (codec/int8.py,
 * codec/int4.py; a rotating codec passes its rows already rotated): x (T, H, d) float32, row t
 * into flat slot slots[t]. int8 (code 2): s = fp16(max(max|x| / 127, 1e-8)), c = clamp(rne(x / s),
 * -127, 127). int4 (codes 3 .. 6: the pool is written as that code's keys, so 3 writes groups of
 * 32 and 6 groups of 16; kv_pool_code): per group, s = fp16(max((max - min) / 15, 1e-8)),
 * m = fp16(min), c = clamp(rne((x - m) / s), 0, 15), even channel in the low nibble. Every step
 * is one float32 operation rounded as PyTorch rounds it, so the stored bytes are the same (a NaN
 * code, from a zero scale, is stored as 0, as PyTorch's conversion gives on x86). */
#ifdef __F16C__
#include <immintrin.h>
static inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

static inline float code_of(float v, float lo, float hi) {
    v = nearbyintf(v);
    if (v != v) return 0.f;
    return v < lo ? lo : v > hi ? hi : v;
}

#ifdef __AVX512F__
/* One int4 group of GS (16 or 32, a constant per instance) values v quantized with the float
 * operations of the scalar loop in slimlm_kv_quantize, 16 channels a vector: the same bytes. A
 * zero minimum is taken by the scalar loop (its sign, which the stored minimum keeps, follows the
 * loop's order); codes packed two a byte (even channel low) into q. */
static inline __attribute__((always_inline)) void i4_quantize_group(const float *v, const int GS, uint8_t *q,
                                                                   uint16_t *s16o, uint16_t *m16o) {
    const __m512 x0 = _mm512_loadu_ps(v), x1 = GS == 32 ? _mm512_loadu_ps(v + 16) : x0;
    float lo = _mm512_reduce_min_ps(GS == 32 ? _mm512_min_ps(x0, x1) : x0);
    const float hi = _mm512_reduce_max_ps(GS == 32 ? _mm512_max_ps(x0, x1) : x0);
    if (lo == 0.f) {
        lo = v[0];
        for (int i = 1; i < GS; ++i) lo = v[i] < lo ? v[i] : lo;
    }
    float s = (hi - lo) / 15.0f;
    s = s < 1e-8f ? 1e-8f : s;
    const uint16_t s16 = f32_to_f16(s), m16 = f32_to_f16(lo);
    const __m512 sf = _mm512_set1_ps(_cvtsh_ss(s16)), mf = _mm512_set1_ps(_cvtsh_ss(m16));
    for (int h = 0; h < GS / 16; ++h) {
        __m512 c = _mm512_div_ps(_mm512_sub_ps(h ? x1 : x0, mf), sf);
        c = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __mmask16 nan = _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
        c = _mm512_maskz_mov_ps((__mmask16)~nan, _mm512_min_ps(_mm512_max_ps(c, _mm512_setzero_ps()), _mm512_set1_ps(15.f)));
        const __m512i ci = _mm512_cvtps_epi32(c); /* 64-bit lane i: channel 2i low, 2i + 1 high */
        const __m512i b = _mm512_or_si512(_mm512_and_si512(ci, _mm512_set1_epi64(0xFFFFFFFFLL)), _mm512_srli_epi64(ci, 28));
        _mm_storel_epi64((__m128i *)(q + 8 * h), _mm512_cvtepi64_epi8(b));
    }
    *s16o = s16;
    *m16o = m16;
}
#endif

#endif

int slimlm_kv_quantize(const float *x, const int64_t *slots, int64_t T, int64_t H, int64_t d, int code, void *data,
                       void *aux, void *aux2) {
#ifndef __F16C__
    (void)x; (void)slots; (void)T; (void)H; (void)d; (void)code; (void)data; (void)aux; (void)aux2;
    return 1; /* no fp16 conversion instructions: the codecs quantize with PyTorch */
#else
    if (T < 0 || H <= 0 || d <= 0 || code < 2 || code > KV_CODE_MAX || !aux) return 1;
    const int64_t GS = code >= 3 ? i4_group(code, 0) : 0; /* int4: the group size of the code's keys */
    if (code >= 3 && (d % GS || !aux2)) return 1;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
            const float *r = x + (t * H + h) * d;
            const int64_t row = slots[t] * H + h;
            if (code == 2) {
                float amax = 0.f;
                for (int64_t i = 0; i < d; ++i) { const float a = fabsf(r[i]); amax = a > amax ? a : amax; }
                float s = amax / 127.0f;
                s = s < 1e-8f ? 1e-8f : s;
                const uint16_t s16 = f32_to_f16(s);
                const float sf = _cvtsh_ss(s16);
                int8_t *q = (int8_t *)data + row * d;
                for (int64_t i = 0; i < d; ++i) q[i] = (int8_t)code_of(r[i] / sf, -127.f, 127.f);
                ((uint16_t *)aux)[row] = s16;
                continue;
            }
            const int64_t G = d / GS;
            uint8_t *q = (uint8_t *)data + row * (d / 2);
#ifdef __AVX512F__
            for (int64_t g = 0; g < G; ++g) {
                uint16_t *so = (uint16_t *)aux + row * G + g, *mo = (uint16_t *)aux2 + row * G + g;
                if (GS == 16) i4_quantize_group(r + g * 16, 16, q + g * 8, so, mo);
                else i4_quantize_group(r + g * 32, 32, q + g * 16, so, mo);
            }
            continue;
#endif
            for (int64_t g = 0; g < G; ++g) {
                const float *v = r + g * GS;
                float lo = v[0], hi = v[0];
                for (int i = 1; i < GS; ++i) { lo = v[i] < lo ? v[i] : lo; hi = v[i] > hi ? v[i] : hi; }
                float s = (hi - lo) / 15.0f;
                s = s < 1e-8f ? 1e-8f : s;
                const uint16_t s16 = f32_to_f16(s), m16 = f32_to_f16(lo);
                const float sf = _cvtsh_ss(s16), mf = _cvtsh_ss(m16);
                for (int i = 0; i < GS / 2; ++i) {
                    const uint8_t c0 = (uint8_t)code_of((v[2 * i] - mf) / sf, 0.f, 15.f);
                    const uint8_t c1 = (uint8_t)code_of((v[2 * i + 1] - mf) / sf, 0.f, 15.f);
                    q[g * GS / 2 + i] = (uint8_t)(c0 | (c1 << 4));
                }
                ((uint16_t *)aux)[row * G + g] = s16;
                ((uint16_t *)aux2)[row * G + g] = m16;
            }
        }
    return 0;
#endif
}

/* x (d) <- x @ H, H the normalized Sylvester-Hadamard matrix, d a power of two: the butterflies
 * in the order of codec/rotation.py's fwht (h = 1, 2, 4, ...), then one multiplication by
 * float32(1 / sqrt(d)), so the result is the PyTorch rotation's to the bit. */
#ifdef __AVX512F__
/* kv_fwht at d = 64 in four registers: each stage's butterflies are the scalar loop's float
 * operations (a + b into the first of a pair, a - b into the second), so the same floats. */
static void kv_fwht64(float *x) {
    __m512 a[4];
    for (int k = 0; k < 4; ++k) a[k] = _mm512_loadu_ps(x + 16 * k);
    for (int k = 0; k < 4; ++k) { /* h = 1, 2, 4, 8 inside a register: partner lanes swapped in */
        __m512 sw = _mm512_permute_ps(a[k], 0xB1);
        a[k] = _mm512_mask_blend_ps(0xAAAA, _mm512_add_ps(a[k], sw), _mm512_sub_ps(sw, a[k]));
        sw = _mm512_permute_ps(a[k], 0x4E);
        a[k] = _mm512_mask_blend_ps(0xCCCC, _mm512_add_ps(a[k], sw), _mm512_sub_ps(sw, a[k]));
        sw = _mm512_shuffle_f32x4(a[k], a[k], _MM_SHUFFLE(2, 3, 0, 1));
        a[k] = _mm512_mask_blend_ps(0xF0F0, _mm512_add_ps(a[k], sw), _mm512_sub_ps(sw, a[k]));
        sw = _mm512_shuffle_f32x4(a[k], a[k], _MM_SHUFFLE(1, 0, 3, 2));
        a[k] = _mm512_mask_blend_ps(0xFF00, _mm512_add_ps(a[k], sw), _mm512_sub_ps(sw, a[k]));
    }
    for (int h = 1; h <= 2; h *= 2) /* h = 16, 32: whole registers */
        for (int k = 0; k < 4; ++k)
            if (!(k & h)) {
                const __m512 u = a[k], w = a[k + h];
                a[k] = _mm512_add_ps(u, w);
                a[k + h] = _mm512_sub_ps(u, w);
            }
    const __m512 c = _mm512_set1_ps((float)(1.0 / sqrt(64.0)));
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(x + 16 * k, _mm512_mul_ps(a[k], c));
}
#endif

static void kv_fwht(float *x, int64_t d) {
#ifdef __AVX512F__
    if (d == 64) { kv_fwht64(x); return; }
#endif
    for (int64_t h = 1; h < d; h *= 2)
        for (int64_t i = 0; i < d; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    const float c = (float)(1.0 / sqrt((double)d));
    for (int64_t i = 0; i < d; i++) x[i] = x[i] * c;
}

/* Rows x (T, H, d) float32 encoded into slots as the codecs' ``write`` stores them: minus the
 * offset mu (H, d) where given, each head Hadamard-rotated (kv_fwht) when rot, then quantized
 * (slimlm_kv_quantize). One call for what the codec's PyTorch code does in about twenty small ops;
 * scratch: H * d floats or NULL. Returns slimlm_kv_quantize's code (1: cannot run here). */
static int kv_encode(const float *x, const float *mu, int rot, const int64_t *slots, int64_t T, int64_t H,
                     int64_t d, int code, void *data, void *aux, void *aux2, float *scratch) {
    if (!mu && !rot) return slimlm_kv_quantize(x, slots, T, H, d, code, data, aux, aux2);
    if (rot && (d & (d - 1))) return 1;
    float *buf = scratch ? scratch : (float *)malloc(sizeof(float) * (size_t)(H * d));
    if (!buf) return 2;
    int rc = 0;
    for (int64_t t = 0; t < T && !rc; ++t) {
        const float *r = x + t * H * d;
        for (int64_t i = 0; i < H * d; ++i) buf[i] = mu ? r[i] - mu[i] : r[i];
        if (rot)
            for (int64_t h = 0; h < H; ++h) kv_fwht(buf + h * d, d);
        rc = slimlm_kv_quantize(buf, slots + t, 1, H, d, code, data, aux, aux2);
    }
    if (!scratch) free(buf);
    return rc;
}

int slimlm_kv_encode(const float *x, const float *mu, int rot, const int64_t *slots, int64_t T, int64_t H, int64_t d,
                     int code, void *data, void *aux, void *aux2) {
    return kv_encode(x, mu, rot, slots, T, H, d, code, data, aux, aux2, NULL);
}

/* n rows x (d) rotated in place by kv_fwht (rotation.fwht's operations): the codecs' Hadamard
 * rotation of queries and read-back rows in one call. */
int slimlm_kv_fwht(float *x, int64_t n, int64_t d) {
    if (d < 1 || (d & (d - 1)) || n < 0) return 1;
    for (int64_t i = 0; i < n; ++i) kv_fwht(x + i * d, d);
    return 0;
}
