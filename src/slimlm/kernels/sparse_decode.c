/* Sparse paged decode attention on the CPU: one query token per sequence, each KV head attends
 * only a given list of its sequence's tokens plus a dense tail (the query KV policies: Squeezed
 * Attention, ShadowKV). Keys and values are read in place from the block pool; a selected key
 * may instead come from an explicit float32 buffer (ShadowKV's keys rebuilt from low-rank
 * factors).
 *
 * q      (B, Hq, d) float32                      out (B, Hq, d) float32
 * k, v   (num_blocks, block_size, Hkv, d) pools: float32 (dtype 0), bfloat16 (1), int8 (2) with
 *        one fp16 scale per (slot, head) in *_aux, int4 (3) as (slot, Hkv, d/2) bytes (even
 *        channel in the low nibble) with fp16 scale / minimum per (slot, head, 32 channels) in
 *        *_aux / *_aux2 (the formats of slimlm.kvcache.codec)
 * table  (B, max_blocks) int64: physical block of each logical block
 * ktable NULL, or (B, max_blocks) int64: the block of each logical block in the key pool when keys
 *        live apart from values (ShadowKV's second tier; NULL: ``table`` for both)
 * idx    (B, Hkv, N) int32: logical token indices each KV head attends; the first cnt[b, h] used
 * cnt    (B, Hkv) int64
 * qmask  NULL, or (B, Hkv, G, N) uint8: 0 where query head g of the group skips entry j
 * kbuf   NULL, or (B, Hkv, N, d) float32: entries j < nbuf[b, h] take their key from here
 * nbuf   (B, Hkv) int64 (ignored when kbuf and fA are NULL)
 * fA, fB, fcos, fsin, fP, rank: NULL, or per sequence b low-rank keys (fA[b] NULL: none):
 *        entries j < nbuf[b, h] are rebuilt as RoPE_t(A[h, t] B[h]) with t = idx[b, h, j]
 *        (A (Hkv, P, rank), B (Hkv, rank, d), cos / sin (P, d) float32, rotate-half convention,
 *        P = fP[b]):
 *        ShadowKV's keys, rebuilt inside the kernel instead of read
 * tail   (B, 2) int64: tokens [tail[b,0], tail[b,1]) attended by every query head, from the pool
 *
 * Work items are (sequence, KV head) pairs handed out through an atomic counter inside one
 * OpenMP parallel region. An item reads each of its key rows once for the G query heads of its
 * group (scores kept in a per-thread buffer), takes a stable softmax per query head, then reads
 * each value row once and accumulates it into the G outputs. Returns 0, 1 on bad arguments, 2
 * when scratch memory could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_pool.h"
#include "sparse_select.h"

static inline float dot(const float *a, const float *b, int64_t d) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
    return acc;
}

/* Entry j of an item: the token's pool slot. */
static inline int64_t slot_of(const int64_t *tb, int64_t tok, int64_t block_size) {
    return tb[tok / block_size] * block_size + tok % block_size;
}

/* Low-rank keys of one (sequence, KV head): key(t) = RoPE_t(A[t] B), A (P, r), B (r, d), with
 * RoPE's rotate-half convention from the position tables cos, sin (P, d). */
typedef struct { const float *A, *B, *cs, *sn; int64_t r; } factors_t;

static inline void rebuild_row(const factors_t *f, int64_t t, int64_t d, float *restrict pre, float *restrict out) {
    const float *a = f->A + t * f->r;
    memset(pre, 0, (size_t)d * sizeof(float));
    for (int64_t c = 0; c < f->r; ++c) {
        const float w = a[c], *b = f->B + c * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) pre[i] += w * b[i];
    }
    const float *cs = f->cs + t * d, *sn = f->sn + t * d;
    const int64_t h = d / 2;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) out[i] = pre[i] * cs[i] - pre[i + h] * sn[i];
#pragma omp simd
    for (int64_t i = h; i < d; ++i) out[i] = pre[i] * cs[i] + pre[i - h] * sn[i];
}

#ifdef __AVX512F__
#include <immintrin.h>

/* Scores s[g * M + j0 + i] of the G query heads against rows off[i] (element offsets into base,
 * one dtype), four rows at a time. */
static inline __attribute__((always_inline)) void score_rows(const float *qg, const void *base, const int dtype,
                                                             const int64_t *off, int64_t cnt, int64_t j0, float *s,
                                                             int64_t M, int64_t G, int64_t nv, float scale) {
    const __m128 sc = _mm_set1_ps(scale);
    for (int64_t g = 0; g < G; ++g) {
        __m512 qv[8];
        for (int64_t c = 0; c < nv; ++c) qv[c] = _mm512_loadu_ps(qg + g * nv * 16 + 16 * c);
        float *sg = s + g * M + j0;
        int64_t i = 0;
        for (; i + 4 <= cnt; i += 4) {
            __m512 a0 = _mm512_mul_ps(qv[0], ld16(base, off[i], dtype));
            __m512 a1 = _mm512_mul_ps(qv[0], ld16(base, off[i + 1], dtype));
            __m512 a2 = _mm512_mul_ps(qv[0], ld16(base, off[i + 2], dtype));
            __m512 a3 = _mm512_mul_ps(qv[0], ld16(base, off[i + 3], dtype));
            for (int64_t c = 1; c < nv; ++c) {
                a0 = _mm512_fmadd_ps(qv[c], ld16(base, off[i] + 16 * c, dtype), a0);
                a1 = _mm512_fmadd_ps(qv[c], ld16(base, off[i + 1] + 16 * c, dtype), a1);
                a2 = _mm512_fmadd_ps(qv[c], ld16(base, off[i + 2] + 16 * c, dtype), a2);
                a3 = _mm512_fmadd_ps(qv[c], ld16(base, off[i + 3] + 16 * c, dtype), a3);
            }
            _mm_storeu_ps(sg + i, _mm_mul_ps(sc, sum4(a0, a1, a2, a3)));
        }
        for (; i < cnt; ++i) {
            __m512 a0 = _mm512_mul_ps(qv[0], ld16(base, off[i], dtype));
            for (int64_t c = 1; c < nv; ++c) a0 = _mm512_fmadd_ps(qv[c], ld16(base, off[i] + 16 * c, dtype), a0);
            sg[i] = scale * _mm512_reduce_add_ps(a0);
        }
    }
}

#define TILE 64

/* attend_item for float32 / bfloat16 pools with a head size that is a multiple of 16 (<= 128). */
static void attend_item_avx512(const float *qg, const pool_t *kp, const pool_t *vp, const int64_t *tb,
                               const int64_t *ktb, int64_t h,
                               const int32_t *ix, int64_t n, const uint8_t *qm, int64_t N, const float *kb,
                               const factors_t *fac, int64_t nb, int64_t t0, int64_t t1, float *og, float *s,
                               float *kt, int64_t G, int64_t d, int64_t block_size, float scale) {
    const int dtype = kp->dtype;
    const int64_t M = n + (t1 > t0 ? t1 - t0 : 0), W = kp->Hkv * d, nv = d / 16;
    int64_t off[TILE];
    for (int64_t j0 = 0; j0 < M; j0 += TILE) { /* scores, a tile of rows at a time */
        const int64_t cnt = M - j0 < TILE ? M - j0 : TILE;
        int64_t i = 0;
        for (; i < cnt && j0 + i < nb; ++i) off[i] = fac ? i * d : (j0 + i) * d; /* keys from kb / rebuilt */
        if (i && fac)
            for (int64_t u = 0; u < i; ++u) rebuild_row(fac, ix[j0 + u], d, kt + TILE * d, kt + u * d);
        if (i) score_rows(qg, fac ? kt : kb, 0, off, i, j0, s, M, G, nv, scale);
        const int64_t first = i;
        for (; i < cnt; ++i) {
            const int64_t j = j0 + i;
            off[i - first] = slot_of(ktb, j < n ? ix[j] : t0 + (j - n), block_size) * W + h * d;
        }
        if (cnt > first) score_rows(qg, kp->data, dtype, off, cnt - first, j0 + first, s, M, G, nv, scale);
    }
    if (qm)
        for (int64_t g = 0; g < G; ++g)
            for (int64_t j = 0; j < n; ++j)
                if (!qm[g * N + j]) s[g * M + j] = -INFINITY;
    for (int64_t g = 0; g < G; ++g) {
        float *sg = s + g * M, m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < M; ++j) m = sg[j] > m ? sg[j] : m;
        if (m == -INFINITY) { memset(sg, 0, (size_t)M * sizeof(float)); continue; }
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < M; ++j) { sg[j] = expf(sg[j] - m); sum += sg[j]; }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < M; ++j) sg[j] *= inv;
    }
    memset(og, 0, (size_t)(G * d) * sizeof(float));
    for (int64_t j0 = 0; j0 < M; j0 += TILE) { /* values: a tile's rows stay in cache for the G heads */
        const int64_t cnt = M - j0 < TILE ? M - j0 : TILE;
        for (int64_t i = 0; i < cnt; ++i) {
            const int64_t j = j0 + i;
            off[i] = slot_of(tb, j < n ? ix[j] : t0 + (j - n), block_size) * W + h * d;
        }
        for (int64_t g = 0; g < G; ++g) {
            __m512 acc[8];
            for (int64_t c = 0; c < nv; ++c) acc[c] = _mm512_loadu_ps(og + g * d + 16 * c);
            const float *pg = s + g * M + j0;
            for (int64_t i = 0; i < cnt; ++i) {
                if (pg[i] == 0.f) continue; /* masked for this head */
                const __m512 w = _mm512_set1_ps(pg[i]);
                for (int64_t c = 0; c < nv; ++c) acc[c] = _mm512_fmadd_ps(w, ld16(vp->data, off[i] + 16 * c, dtype), acc[c]);
            }
            for (int64_t c = 0; c < nv; ++c) _mm512_storeu_ps(og + g * d + 16 * c, acc[c]);
        }
    }
}
#endif

static void attend_item(const float *qg, const pool_t *kp, const pool_t *vp, const int64_t *tb, const int64_t *ktb,
                        int64_t h,
                        const int32_t *ix, int64_t n, const uint8_t *qm, int64_t N, const float *kb,
                        const factors_t *fac, int64_t nb, int64_t t0, int64_t t1, float *og, float *s, float *row,
                        float *kt, int64_t G, int64_t d, int64_t block_size, float scale) {
    const int64_t M = n + (t1 > t0 ? t1 - t0 : 0);
    for (int64_t j = 0; j < M; ++j) { /* scores: each key row read once for the group */
        const float *k;
        if (j < n && j < nb && fac) { rebuild_row(fac, ix[j], d, kt + d, kt); k = kt; }
        else if (j < n && j < nb) k = kb + j * d;
        else k = head_row(kp, slot_of(ktb, j < n ? ix[j] : t0 + (j - n), block_size), h, row);
        for (int64_t g = 0; g < G; ++g)
            s[g * M + j] = (j < n && qm && !qm[g * N + j]) ? -INFINITY : dot(qg + g * d, k, d) * scale;
    }
    for (int64_t g = 0; g < G; ++g) { /* stable softmax per query head */
        float *sg = s + g * M, m = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < M; ++j) m = sg[j] > m ? sg[j] : m;
        if (m == -INFINITY) { memset(sg, 0, (size_t)M * sizeof(float)); continue; }
        for (int64_t j = 0; j < M; ++j) { sg[j] = expf(sg[j] - m); sum += sg[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < M; ++j) sg[j] *= inv;
    }
    memset(og, 0, (size_t)(G * d) * sizeof(float));
    for (int64_t j = 0; j < M; ++j) { /* values: each row read once, weighted into every head */
        int any = 0;
        for (int64_t g = 0; g < G; ++g) any |= s[g * M + j] != 0.f;
        if (!any) continue;
        const float *v = head_row(vp, slot_of(tb, j < n ? ix[j] : t0 + (j - n), block_size), h, row);
        for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * M + j];
            float *o = og + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) o[i] += p * v[i];
        }
    }
}

/* One item's attention (the format's fastest path). */
static void attend_one(const float *qg, const pool_t *kp, const pool_t *vp, const int64_t *tb, const int64_t *ktb,
                       int64_t h, const int32_t *ix, int64_t n, const uint8_t *qm, int64_t N, const float *kb,
                       const factors_t *fac, int64_t nb, int64_t t0, int64_t t1, float *og, float *s, float *row,
                       float *kt, int64_t G, int64_t d, int64_t block_size, float scale) {
#ifdef __AVX512F__
    if (kp->dtype <= 1 && d % 16 == 0 && d <= 128) {
        attend_item_avx512(qg, kp, vp, tb, ktb, h, ix, n, qm, N, kb, fac, nb, t0, t1, og, s, kt, G, d, block_size,
                           scale);
        return;
    }
#endif
    attend_item(qg, kp, vp, tb, ktb, h, ix, n, qm, N, kb, fac, nb, t0, t1, og, s, row, kt, G, d, block_size, scale);
}

/* Per-thread buffers of an item loop: a de-quantized row, rebuilt keys, the scores. */
typedef struct { float *row, *kt, *s; int64_t cap; } item_scratch_t;

static int item_scratch_init(item_scratch_t *w, int64_t d) {
    w->row = (float *)malloc((size_t)d * sizeof(float));
    w->kt = (float *)malloc((size_t)((TILE + 1) * d) * sizeof(float)); /* rebuilt keys + scratch */
    w->s = NULL;
    w->cap = 0;
    return w->row && w->kt;
}

static int item_scores(item_scratch_t *w, int64_t need) {
    if (need <= w->cap) return 1;
    free(w->s);
    w->cap = need;
    w->s = (float *)malloc((size_t)need * sizeof(float));
    if (!w->s) w->cap = 0;
    return w->s != NULL;
}

static void item_scratch_free(item_scratch_t *w) { free(w->s); free(w->row); free(w->kt); }

static inline factors_t item_factors(const float *const *fA, const float *const *fB, const float *const *fcos,
                                     const float *const *fsin, int64_t P, int64_t rank, int64_t b, int64_t h,
                                     int64_t d) {
    /* sequence b's factors: A (Hkv, P, r), B (Hkv, r, d), tables (P, d) */
    factors_t f = {fA[b] + h * P * rank, fB[b] + h * rank * d, fcos[b], fsin[b], rank};
    return f;
}

int slimlm_sparse_decode(const float *q, const void *k_pool, const void *v_pool, const void *k_aux,
                         const void *k_aux2, const void *v_aux, const void *v_aux2, int dtype,
                         const int64_t *table, const int64_t *ktable, int64_t max_blocks, const int32_t *idx,
                         const int64_t *cnt,
                         int64_t N, const uint8_t *qmask, const float *kbuf, const int64_t *nbuf,
                         const float *const *fA, const float *const *fB, const float *const *fcos,
                         const float *const *fsin, const int64_t *fP, int64_t rank,
                         const int64_t *tail, float *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t d,
                         int64_t block_size, float scale, int nthreads) {
    if (Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || d <= 0 || !kv_code_ok(dtype, d, k_aux, k_aux2, v_aux, v_aux2))
        return 1;
    const pool_t kp = kv_pool(k_pool, k_aux, k_aux2, dtype, 0, Hkv, d), vp = kv_pool(v_pool, v_aux, v_aux2, dtype, 1, Hkv, d);
    const int64_t G = Hq / Hkv, items = B * Hkv;
    int64_t next = 0;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        item_scratch_t w;
        int ok = item_scratch_init(&w, d);
        if (!ok) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        while (ok) {
            const int64_t it = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (it >= items) break;
            const int64_t b = it / Hkv, h = it % Hkv;
            const int64_t n = cnt[it], nb = (kbuf || fA) ? nbuf[it] : 0;
            factors_t fac_b;
            const factors_t *fac = NULL;
            if (fA && fA[b]) {
                fac_b = item_factors(fA, fB, fcos, fsin, fP[b], rank, b, h, d);
                fac = &fac_b;
            }
            const int64_t t0 = tail[2 * b], t1 = tail[2 * b + 1];
            const int64_t M = n + (t1 > t0 ? t1 - t0 : 0);
            float *og = out + (b * Hq + h * G) * d;
            if (M <= 0) { memset(og, 0, (size_t)(G * d) * sizeof(float)); continue; }
            if (!item_scores(&w, G * M)) { __atomic_store_n(&failed, 1, __ATOMIC_RELAXED); break; }
            attend_one(q + (b * Hq + h * G) * d, &kp, &vp, table + b * max_blocks,
                       (ktable ? ktable : table) + b * max_blocks, h, idx + it * N, n,
                       qmask ? qmask + it * G * N : NULL, N, kbuf ? kbuf + it * N * d : NULL, fac, nb, t0, t1, og,
                       w.s, w.row, w.kt, G, d, block_size, scale);
        }
        item_scratch_free(&w);
    }
    return failed ? 2 : 0;
}

/* The query policies' selection alone (sparse_select.h): per row b and KV head h the entries
 * idx (B, Hkv, N) int32, cnt (B, Hkv), qmask (B, Hkv, G, N) u8 (Squeezed rows; may be NULL when no
 * row is Squeezed), nbuf (B, Hkv) entries rebuilt from factors, counters (B, Hkv, 3). Returns 0,
 * 1 on bad arguments or an index outside its range, 2 out of memory. */
int slimlm_sparse_select(const float *q, const void *const *sp, const int64_t *si, const float *sf, int32_t *idx,
                         int64_t *cnt, uint8_t *qmask, int64_t *nbuf, int64_t *counters, int64_t B, int64_t Hq,
                         int64_t Hkv, int64_t d, int64_t N, int nthreads) {
    if (Hkv <= 0 || Hq % Hkv != 0 || d <= 0) return 1;
    const int64_t G = Hq / Hkv, items = B * Hkv, cmax = sel_cmax(si, B);
    for (int64_t b = 0; b < B; ++b)
        if ((si[b * NSI] == 2 && !qmask) || si[b * NSI + 1] > N ||
            (si[b * NSI] == 1 && si[b * NSI + 4] * si[b * NSI + 3] + si[b * NSI + 5] > si[b * NSI + 1]))
            return 1;
    int64_t next = 0;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        sel_scratch_t w;
        int ok = sel_scratch_init(&w, G, cmax);
        if (!ok) __atomic_store_n(&failed, 2, __ATOMIC_RELAXED);
        while (ok) {
            const int64_t it = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (it >= items) break;
            const int64_t b = it / Hkv, h = it % Hkv;
            int64_t m;
            const int64_t n = select_item(q + (b * Hq + h * G) * d, sp + b * NSP, si + b * NSI, sf + b * NSF, h, G,
                                          d, idx + it * N, qmask ? qmask + it * G * N : NULL, N, &m,
                                          counters + it * NCOUNT, &w);
            if (n < 0) { __atomic_store_n(&failed, 1, __ATOMIC_RELAXED); break; }
            cnt[it] = n;
            nbuf[it] = m;
        }
        sel_scratch_free(&w);
    }
    return failed;
}

/* Selection and attention in one pass (each item selects, then attends its own picks): the
 * engine's decode path for pools read in place (no key tier). q (B, Hq, d); per row the summary
 * (sp, si, sf as slimlm_sparse_select) and, for ShadowKV rows, the factors fA.. (P = si[b, 1]);
 * tail (B, 2) the dense range after the prefix (or the whole context of a dense row). */
int slimlm_sparse_select_decode(const float *q, const void *k_pool, const void *v_pool, const void *k_aux,
                                const void *k_aux2, const void *v_aux, const void *v_aux2, int dtype,
                                const int64_t *table, int64_t max_blocks, const void *const *sp, const int64_t *si,
                                const float *sf, const float *const *fA, const float *const *fB,
                                const float *const *fcos, const float *const *fsin, int64_t rank,
                                const int64_t *tail, float *out, int64_t *counters, int64_t B, int64_t Hq,
                                int64_t Hkv, int64_t d, int64_t block_size, float scale, int nthreads) {
    if (Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || d <= 0 || !kv_code_ok(dtype, d, k_aux, k_aux2, v_aux, v_aux2))
        return 1;
    const int64_t cap = max_blocks * block_size;
    int64_t N = 1;
    for (int64_t b = 0; b < B; ++b) { /* every entry lies below P <= the table's capacity */
        const int64_t *r = si + b * NSI;
        if (r[0] < 0 || r[0] > 2 || r[1] < 0 || r[1] > cap || tail[2 * b] < 0 || tail[2 * b + 1] > cap) return 1;
        if (r[0] == 1 && (r[2] * r[3] > r[1] || r[4] > r[2] || r[4] * r[3] + r[5] > r[1] || !fA || !fA[b])) return 1;
        if (r[1] > N) N = r[1];
    }
    const pool_t kp = kv_pool(k_pool, k_aux, k_aux2, dtype, 0, Hkv, d), vp = kv_pool(v_pool, v_aux, v_aux2, dtype, 1, Hkv, d);
    const int64_t G = Hq / Hkv, items = B * Hkv, cmax = sel_cmax(si, B);
    int64_t next = 0;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        item_scratch_t w;
        sel_scratch_t ws;
        int32_t *ix = (int32_t *)malloc((size_t)N * sizeof(int32_t));
        uint8_t *qm = (uint8_t *)malloc((size_t)(N * G));
        int ok = item_scratch_init(&w, d) & sel_scratch_init(&ws, G, cmax) & (ix != NULL) & (qm != NULL);
        if (!ok) __atomic_store_n(&failed, 2, __ATOMIC_RELAXED);
        while (ok) {
            const int64_t it = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (it >= items) break;
            const int64_t b = it / Hkv, h = it % Hkv, kind = si[b * NSI];
            const float *qg = q + (b * Hq + h * G) * d;
            int64_t m;
            const int64_t n = select_item(qg, sp + b * NSP, si + b * NSI, sf + b * NSF, h, G, d, ix, qm, N, &m,
                                          counters + it * NCOUNT, &ws);
            if (n < 0) { __atomic_store_n(&failed, 1, __ATOMIC_RELAXED); break; }
            factors_t fac_b;
            const factors_t *fac = NULL;
            if (kind == 1) {
                fac_b = item_factors(fA, fB, fcos, fsin, si[b * NSI + 1], rank, b, h, d);
                fac = &fac_b;
            }
            const int64_t t0 = tail[2 * b], t1 = tail[2 * b + 1];
            const int64_t M = n + (t1 > t0 ? t1 - t0 : 0);
            float *og = out + (b * Hq + h * G) * d;
            if (M <= 0) { memset(og, 0, (size_t)(G * d) * sizeof(float)); continue; }
            if (!item_scores(&w, G * M)) { __atomic_store_n(&failed, 2, __ATOMIC_RELAXED); break; }
            attend_one(qg, &kp, &vp, table + b * max_blocks, table + b * max_blocks, h, ix, n,
                       kind == 2 ? qm : NULL, N, NULL, fac, m, t0, t1, og, w.s, w.row, w.kt, G, d, block_size, scale);
        }
        item_scratch_free(&w);
        sel_scratch_free(&ws);
        free(ix);
        free(qm);
    }
    return failed;
}
