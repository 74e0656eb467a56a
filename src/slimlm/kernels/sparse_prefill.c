/* Vertical-slash sparse prefill attention on the CPU (MInference's pattern, as Qwen2.5-1M uses
 * it; the pattern is chosen in slimlm.engine.sparse_prefill).
 *
 * One call serves one prefill chunk of one sequence: T query tokens at positions q_start ..
 * q_start + T - 1 (storage index == position), keys 0 .. q_start + T - 1 read from the block
 * pool in place through its block table. Query head h at position i attends key j iff j <= i
 * and (j is one of the head's vertical columns, or i - j is one of its slash offsets).
 *
 * q      row t / head h at q + t * qs_t + h * qs_h (head dim contiguous), float32 (qdtype 0) or
 *        bfloat16 (1); out the same layout (os_t, os_h) and dtype
 * k, v   (num_blocks, block_size, Hkv, d) pools in any format of kv_pool.h (kv_code 0 float32,
 *        1 bfloat16, 2 int8, 3 int4 with their aux tensors; head_row decodes the last two)
 * table  physical block of each logical block
 * cols   (Hq, nv) int32: each head's vertical columns, strictly ascending (entries < 0 or >= n
 *        ignored; the checked wrapper in ops.py enforces the order the merge relies on)
 * offs   (Hq, ns) int32: each head's slash offsets, strictly ascending (likewise)
 * stats  NULL, or int64[2] += (query-key pairs the pattern attends, query-candidate pairs scored)
 *
 * Work items are (query head, block of ``qb`` consecutive queries), largest blocks first, handed
 * out through an atomic counter inside one OpenMP parallel region. An item:
 *  1. builds its candidate keys once: the head's verticals <= the block's last position merged
 *     with the union of its slash diagonals' key ranges (offset s gives the block's queries
 *     p0..p1 the consecutive keys p0 - s .. p1 - s; ranges of ascending start are merged as they
 *     come, from the largest offset down), in key order, each flagged vertical or not;
 *  2. streams them in chunks of 64, reading each key and value row once per item (bf16: keys
 *     gathered into dimension-pair columns, values interleaved into key pairs; other formats
 *     decoded to float32 rows and columns), and per query row masks the chunk to the row's exact
 *     pattern (for 16 consecutive keys one byte load from the reversed slash flags, else a 32-bit
 *     gather of the flags at i - j); tiles of RT rows score all 64 keys with shared key loads when
 *     a row allows more than PAIR_MAX of them, else each allowed pair gets its own dot (an
 *     isolated diagonal costs its pairs, not 64 times them); then each row's online softmax
 *     (running max, sum, fp32 output rescaled when the max grows) and P V over the keys allowed;
 *  3. divides each row by its sum and stores it (bf16 rounded to nearest even for a bf16 q).
 * Arithmetic is float32 (bf16 rows are widened exactly), as the PyTorch path's, except in the
 * 64-key tiles of a bf16 q over a bf16 pool on AVX512-BF16 builds: q . k and P V by vdpbf16ps
 * (exact bf16 products summed in fp32; the probabilities rounded to bf16 for P V, the row sums
 * kept in fp32, as paged_prefill.c and flash-attention kernels do). Returns 0, 1
 * on unsupported arguments (no AVX-512 in this build, head size not a multiple of 16 or > 256),
 * 2 when scratch memory could not be allocated.
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
#define SLIMLM_HAVE_BF16 1 /* bf16 q over a bf16 pool: q . k by vdpbf16ps (exact products, fp32 sums) */
#endif
#endif
typedef uint32_t __attribute__((may_alias)) u32_alias; /* bf16 pairs read as one word */

#define KC 64        /* candidate keys per chunk (4 groups of 16) */
#define PAIR_MAX 12  /* rows with at most this many allowed keys in a chunk score them one by one */
#define REV_PAD 16
#define RT 6         /* query rows per tile */

int slimlm_sparse_prefill_supported(int64_t d) {
#ifdef SLIMLM_HAVE_AVX512
    return d > 0 && d % 16 == 0 && d <= 256;
#else
    (void)d;
    return 0;
#endif
}

#ifdef SLIMLM_HAVE_AVX512
typedef struct {
    const void *q;
    void *out;
    int64_t qs_t, qs_h, os_t, os_h;
    int qdtype;
    pool_t kpool, vpool;
    const int64_t *table;
    int64_t q_start, T, Hq, Hkv, d, bs, n, qb, nblocks;
    int shift; /* log2(bs) when bs is a power of two, else -1 */
    const int32_t *cols, *offs;
    int64_t nv, ns;
    const uint8_t *is_s; /* (Hq, n + 4): 1 where the offset is one of the head's slashes */
    const uint8_t *rev;  /* (Hq, n + REV_PAD): rev[x] = is_s[n - 1 - x], 0 past n */
    float scale;
    int64_t next, pairs, scored;
    int failed;
    int64_t k_lo, k_hi; /* keys outside [k_lo, k_hi) are never candidates (the whole context: 0, n) */
    float *lse;         /* NULL, or (T, Hq): each row's log-sum-exp; out is then float32 */
} sp_args;

typedef struct {
    int32_t *cand;
    uint8_t *vflag;
    int32_t *rlo, *rhi;
    float *qf, *o, *m, *l, *kt, *kr, *vr, *buf, *dummy;
} scratch;

/* Step 1: the item's candidate keys (ascending) and their vertical flags; returns their count. */
static int64_t candidates(const sp_args *a, int64_t h, int64_t p0, int64_t p1, scratch *s) {
    const int32_t *offs = a->offs + h * a->ns, *cols = a->cols + h * a->nv;
    int64_t nr = 0;
    for (int64_t x = a->ns - 1; x >= 0; --x) { /* largest offset first: range starts ascend */
        const int64_t off = offs[x];
        if (off < 0 || off > p1 || off >= a->n) continue;
        int64_t lo = p0 - off > 0 ? p0 - off : 0, hi = p1 - off;
        if (lo < a->k_lo) lo = a->k_lo; /* the key range (starts still ascend, ends too) */
        if (hi > a->k_hi - 1) hi = a->k_hi - 1;
        if (lo > hi) continue;
        if (nr && lo <= s->rhi[nr - 1] + 1) {
            if (hi > s->rhi[nr - 1]) s->rhi[nr - 1] = (int32_t)hi;
        } else {
            s->rlo[nr] = (int32_t)lo;
            s->rhi[nr] = (int32_t)hi;
            ++nr;
        }
    }
    int64_t K = 0, vi = 0;
    const int64_t nvh = a->nv;
    for (int64_t r = 0; r < nr; ++r) {
        for (; vi < nvh && cols[vi] < s->rlo[r]; ++vi)
            if (cols[vi] >= a->k_lo) { s->cand[K] = cols[vi]; s->vflag[K++] = 1; }
        for (int64_t j = s->rlo[r]; j <= s->rhi[r]; ++j) {
            uint8_t f = 0;
            if (vi < nvh && cols[vi] == j) { f = 1; ++vi; }
            s->cand[K] = (int32_t)j;
            s->vflag[K++] = f;
        }
    }
    for (; vi < nvh && cols[vi] <= p1 && cols[vi] < a->k_hi; ++vi)
        if (cols[vi] >= a->k_lo) { s->cand[K] = cols[vi]; s->vflag[K++] = 1; }
    return K;
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static void item(sp_args *a, int64_t h, int64_t b, scratch *s) {
    const int64_t d = a->d, nvb = d / 16, g = h / (a->Hq / a->Hkv);
    const int64_t t0 = b * a->qb, rows = (a->T - t0) < a->qb ? a->T - t0 : a->qb;
    const int64_t p0 = a->q_start + t0, p1 = p0 + rows - 1;
    const int64_t K = candidates(a, h, p0, p1, s);
    for (int64_t r = 0; r < rows; ++r) { /* queries widened and scaled once */
        float *qf = s->qf + r * d;
        const char *src = (const char *)a->q + ((t0 + r) * a->qs_t + h * a->qs_h) * (a->qdtype ? 2 : 4);
        for (int64_t c = 0; c < d; ++c)
            qf[c] = (a->qdtype ? bf16_to_f32(((const uint16_t *)src)[c]) : ((const float *)src)[c]) * a->scale;
        s->m[r] = -INFINITY;
        s->l[r] = 0.f;
    }
    memset(s->o, 0, (size_t)(rows * d) * sizeof(float));
    const uint8_t *iss = a->is_s + h * (a->n + 4), *rev = a->rev + h * (a->n + REV_PAD);
#ifdef SLIMLM_HAVE_BF16
    const int bf = a->qdtype == 1 && a->kpool.dtype == 1;
#else
    const int bf = 0;
#endif
    uint32_t *kt2 = (uint32_t *)s->kt; /* bf: keys as (d/2, KC) dimension pairs in kt's place */
    uint32_t *vp2 = (uint32_t *)s->kt + KC * d / 2; /* bf: values as (KC/2, d) key pairs, after kt2 */
    int64_t pairs = 0;
    for (int64_t c0 = 0; c0 < K; c0 += KC) {
        const int64_t kc = K - c0 < KC ? K - c0 : KC;
        int32_t key[KC];
        __mmask16 vm[4] = {0, 0, 0, 0};
        int64_t slot[KC];
        for (int64_t x = 0; x < KC; ++x) {
            if (x < kc) {
                const int64_t j = s->cand[c0 + x];
                slot[x] = a->shift >= 0 ? a->table[j >> a->shift] * a->bs + (j & (a->bs - 1))
                                        : a->table[j / a->bs] * a->bs + j % a->bs;
                key[x] = (int32_t)j;
                if (s->vflag[c0 + x]) vm[x / 16] |= (__mmask16)(1u << (x % 16));
            } else {
                slot[x] = -1;
                key[x] = 0x3fffffff; /* never <= a query position */
            }
        }
        int have_f32 = !bf; /* bf: float32 rows (for the one-by-one path) decoded on first need */
        if (bf) {
            /* keys: (d/2, KC) dimension pairs, 16 keys a gather; values: key pairs per dimension */
            const u32_alias *kbase = (const u32_alias *)a->kpool.data;
            for (int j = 0; j < 4; ++j) {
                int32_t off[16];
                __mmask16 live = 0;
                for (int l = 0; l < 16; ++l) {
                    const int64_t sl = slot[16 * j + l];
                    off[l] = sl >= 0 ? (int32_t)((sl * a->Hkv + g) * (d / 2)) : 0;
                    if (sl >= 0) live |= (__mmask16)(1u << l);
                }
                const __m512i ov = _mm512_loadu_si512((const void *)off);
                for (int64_t c2 = 0; c2 < d / 2; ++c2)
                    _mm512_storeu_si512((void *)(kt2 + c2 * KC + 16 * j),
                                        _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                                                                    _mm512_add_epi32(ov, _mm512_set1_epi32((int)c2)),
                                                                    (const void *)kbase, 4));
            }
            for (int64_t pi = 0; pi < KC / 2; ++pi) {
                const int64_t s0 = slot[2 * pi], s1 = slot[2 * pi + 1];
                const uint16_t *r0 = s0 >= 0 ? (const uint16_t *)a->vpool.data + (s0 * a->Hkv + g) * d : NULL;
                const uint16_t *r1 = s1 >= 0 ? (const uint16_t *)a->vpool.data + (s1 * a->Hkv + g) * d : NULL;
                for (int64_t cb = 0; cb < nvb; ++cb) {
                    const __m256i lo = r0 ? _mm256_loadu_si256((const __m256i *)(r0 + 16 * cb)) : _mm256_setzero_si256();
                    const __m256i hi = r1 ? _mm256_loadu_si256((const __m256i *)(r1 + 16 * cb)) : _mm256_setzero_si256();
                    _mm512_storeu_si512((void *)(vp2 + pi * d + 16 * cb),
                                        _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                                                        _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16)));
                }
            }
        } else {
            for (int64_t x = 0; x < KC; ++x) {
                if (x < kc) {
                    const float *kr = head_row(&a->kpool, slot[x], g, s->buf);
                    memcpy(s->kr + x * d, kr, (size_t)d * sizeof(float));
                    for (int64_t c = 0; c < d; ++c) s->kt[c * KC + x] = kr[c];
                    const float *vr = head_row(&a->vpool, slot[x], g, s->buf);
                    memcpy(s->vr + x * d, vr, (size_t)d * sizeof(float));
                } else
                    for (int64_t c = 0; c < d; ++c) s->kt[c * KC + x] = 0.f;
            }
        }
        __m512i kv[4];
        for (int j = 0; j < 4; ++j) kv[j] = _mm512_loadu_si512((const void *)(key + 16 * j));
        /* a group of 16 consecutive keys (inside a slash range): its slash flags at i - j are one load
         * from the reversed flags instead of a gather */
        int run[4];
        for (int j = 0; j < 4; ++j) run[j] = 16 * j + 15 < kc && key[16 * j + 15] - key[16 * j] == 15;
        for (int64_t r0 = 0; r0 < rows; r0 += RT) {
            const int nr = rows - r0 < RT ? (int)(rows - r0) : RT;
            __mmask16 mk[RT][4];
            int cnt[RT], any = 0, wide = 0;
            for (int rr = 0; rr < RT; ++rr) {
                cnt[rr] = 0;
                for (int j = 0; j < 4; ++j) mk[rr][j] = 0;
                if (rr >= nr) continue;
                const __m512i iv = _mm512_set1_epi32((int32_t)(p0 + r0 + rr));
                for (int j = 0; j < 4; ++j) {
                    if (run[j]) {
                        const int64_t i = p0 + r0 + rr, j0 = key[16 * j], m = i - j0 + 1; /* keys <= i */
                        if (m <= 0) continue; /* every key past the query (mk stays 0; no load) */
                        const __mmask16 causal = m >= 16 ? 0xFFFF : (__mmask16)((1u << m) - 1);
                        /* rev[n - 1 - i + j0 + l] = is_s[i - j0 - l], inside rev since j0 <= i */
                        const __m128i fl = _mm_loadu_si128((const __m128i *)(rev + a->n - 1 - i + j0));
                        mk[rr][j] = causal & (vm[j] | _mm_test_epi8_mask(fl, fl));
                        cnt[rr] += __builtin_popcount(mk[rr][j]);
                        continue;
                    }
                    const __m512i off = _mm512_sub_epi32(iv, kv[j]);
                    const __mmask16 causal = _mm512_cmpge_epi32_mask(off, _mm512_setzero_si512());
                    const __m512i sl = _mm512_and_si512(
                        _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), causal, off, (const void *)iss, 1),
                        _mm512_set1_epi32(0xff));
                    mk[rr][j] = causal & (vm[j] | _mm512_test_epi32_mask(sl, sl));
                    cnt[rr] += __builtin_popcount(mk[rr][j]);
                }
                pairs += cnt[rr];
                any |= cnt[rr];
                wide |= cnt[rr] > PAIR_MAX;
            }
            if (!any) continue;
            float sc[RT][KC];
            const float *qr[RT];
            float *orow[RT];
            for (int rr = 0; rr < RT; ++rr) {
                qr[rr] = s->qf + (r0 + (rr < nr ? rr : 0)) * d;
                orow[rr] = rr < nr ? s->o + (r0 + rr) * d : s->dummy; /* rows past the block: a scratch row */
            }
#ifdef SLIMLM_HAVE_BF16
            if (wide && bf) { /* the same with bf16 dimension pairs: half the multiply-adds */
                const u32_alias *qh[RT];
                for (int rr = 0; rr < RT; ++rr)
                    qh[rr] = (const u32_alias *)((const uint16_t *)a->q + ((t0 + r0 + (rr < nr ? rr : 0)) * a->qs_t
                                                                        + h * a->qs_h));
                __m512 acc[RT][4];
                for (int rr = 0; rr < RT; ++rr)
                    for (int j = 0; j < 4; ++j) acc[rr][j] = _mm512_setzero_ps();
                for (int64_t c2 = 0; c2 < d / 2; ++c2) {
                    const uint32_t *kt = kt2 + c2 * KC;
                    __m512bh kk[4];
                    for (int j = 0; j < 4; ++j) kk[j] = (__m512bh)_mm512_loadu_si512((const void *)(kt + 16 * j));
                    for (int rr = 0; rr < RT; ++rr) {
                        const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qh[rr][c2]);
                        for (int j = 0; j < 4; ++j) acc[rr][j] = _mm512_dpbf16_ps(acc[rr][j], qb, kk[j]);
                    }
                }
                const __m512 scv = _mm512_set1_ps(a->scale);
                for (int rr = 0; rr < RT; ++rr)
                    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(sc[rr] + 16 * j, _mm512_mul_ps(acc[rr][j], scv));
            } else
#endif
            if (wide) { /* RT rows x 64 keys, each key vector loaded once for the RT rows */
                __m512 acc[RT][4];
                for (int rr = 0; rr < RT; ++rr)
                    for (int j = 0; j < 4; ++j) acc[rr][j] = _mm512_setzero_ps();
                for (int64_t c = 0; c < d; ++c) {
                    const float *kt = s->kt + c * KC;
                    __m512 kk[4];
                    for (int j = 0; j < 4; ++j) kk[j] = _mm512_loadu_ps(kt + 16 * j);
                    for (int rr = 0; rr < RT; ++rr) {
                        const __m512 qb = _mm512_set1_ps(qr[rr][c]);
                        for (int j = 0; j < 4; ++j) acc[rr][j] = _mm512_fmadd_ps(qb, kk[j], acc[rr][j]);
                    }
                }
                for (int rr = 0; rr < RT; ++rr)
                    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(sc[rr] + 16 * j, acc[rr][j]);
            } else { /* few allowed keys per row (isolated diagonals): one dot each */
                if (!have_f32) {
                    for (int64_t x = 0; x < kc; ++x) {
                        const float *kr = head_row(&a->kpool, slot[x], g, s->buf);
                        memcpy(s->kr + x * d, kr, (size_t)d * sizeof(float));
                        const float *vr = head_row(&a->vpool, slot[x], g, s->buf);
                        memcpy(s->vr + x * d, vr, (size_t)d * sizeof(float));
                    }
                    have_f32 = 1;
                }
                for (int rr = 0; rr < nr; ++rr)
                    for (int j = 0; j < 4; ++j)
                        for (uint32_t bits = mk[rr][j]; bits; bits &= bits - 1) {
                            const int x = 16 * j + __builtin_ctz(bits);
                            const float *kr = s->kr + x * d, *qf = qr[rr];
                            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qf), _mm512_loadu_ps(kr));
                            for (int64_t cb = 1; cb < nvb; ++cb)
                                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + 16 * cb), _mm512_loadu_ps(kr + 16 * cb), acc);
                            sc[rr][x] = hsum(acc);
                        }
            }
            for (int rr = 0; rr < RT; ++rr) { /* online softmax: sc becomes the probabilities (0 where masked) */
                if (!cnt[rr]) {
                    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(sc[rr] + 16 * j, _mm512_setzero_ps());
                    continue;
                }
                const int64_t r = r0 + rr;
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int j = 0; j < 4; ++j) mx = _mm512_mask_max_ps(mx, mk[rr][j], mx, _mm512_loadu_ps(sc[rr] + 16 * j));
                const float cm = _mm512_reduce_max_ps(mx);
                float *o = orow[rr];
                if (cm > s->m[r]) { /* the running max grows: rescale what the row has so far */
                    const float alpha = s->m[r] == -INFINITY ? 0.f : expf(s->m[r] - cm);
                    const __m512 av = _mm512_set1_ps(alpha);
                    for (int64_t cb = 0; cb < nvb; ++cb) _mm512_storeu_ps(o + 16 * cb, _mm512_mul_ps(_mm512_loadu_ps(o + 16 * cb), av));
                    s->l[r] *= alpha;
                    s->m[r] = cm;
                }
                const __m512 mv = _mm512_set1_ps(s->m[r]);
                __m512 sum = _mm512_setzero_ps();
                for (int j = 0; j < 4; ++j) {
                    const __m512 e = _mm512_maskz_mov_ps(mk[rr][j], exp512(_mm512_sub_ps(_mm512_loadu_ps(sc[rr] + 16 * j), mv)));
                    sum = _mm512_add_ps(sum, e);
                    _mm512_storeu_ps(sc[rr] + 16 * j, e);
                }
                s->l[r] += hsum(sum);
            }
#ifdef SLIMLM_HAVE_BF16
            if (wide && bf) { /* P V by key pairs with bf16 probabilities (as paged_prefill.c), fp32 sums */
                uint32_t pb[RT][KC / 2];
                uint64_t un = 0;
                for (int rr = 0; rr < RT; ++rr)
                    for (int j = 0; j < 4; ++j) {
                        _mm256_storeu_si256((__m256i *)((uint16_t *)pb[rr] + 16 * j),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sc[rr] + 16 * j)));
                        un |= (uint64_t)mk[rr][j] << (16 * j);
                    }
                for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) {
                    const int nb = nvb - cb0 < 4 ? (int)(nvb - cb0) : 4;
                    __m512 acc[RT][4];
                    for (int rr = 0; rr < RT; ++rr)
                        for (int b = 0; b < 4; ++b)
                            acc[rr][b] = b < nb ? _mm512_loadu_ps(orow[rr] + 16 * (cb0 + b)) : _mm512_setzero_ps();
                    for (int pi = 0; pi < KC / 2; ++pi) {
                        if (!((un >> (2 * pi)) & 3)) continue;
                        const uint32_t *vrow = vp2 + pi * d + 16 * cb0;
                        __m512bh vv[4];
                        for (int b = 0; b < 4; ++b)
                            vv[b] = (__m512bh)(b < nb ? _mm512_loadu_si512((const void *)(vrow + 16 * b)) : _mm512_setzero_si512());
                        for (int rr = 0; rr < RT; ++rr) {
                            const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pb[rr][pi]);
                            for (int b = 0; b < 4; ++b) acc[rr][b] = _mm512_dpbf16_ps(acc[rr][b], pv, vv[b]);
                        }
                    }
                    for (int rr = 0; rr < RT; ++rr)
                        for (int b = 0; b < nb; ++b) _mm512_storeu_ps(orow[rr] + 16 * (cb0 + b), acc[rr][b]);
                }
            } else
#endif
            if (wide) { /* P V: each value vector loaded once for the RT rows, over the keys any row attends */
                uint32_t un[4];
                for (int j = 0; j < 4; ++j) {
                    un[j] = 0;
                    for (int rr = 0; rr < RT; ++rr) un[j] |= mk[rr][j];
                }
                for (int64_t cb0 = 0; cb0 < nvb; cb0 += 4) {
                    const int nb = nvb - cb0 < 4 ? (int)(nvb - cb0) : 4;
                    __m512 acc[RT][4];
                    for (int rr = 0; rr < RT; ++rr)
                        for (int b = 0; b < 4; ++b)
                            acc[rr][b] = b < nb ? _mm512_loadu_ps(orow[rr] + 16 * (cb0 + b)) : _mm512_setzero_ps();
                    for (int j = 0; j < 4; ++j)
                        for (uint32_t bits = un[j]; bits; bits &= bits - 1) {
                            const int x = 16 * j + __builtin_ctz(bits);
                            const float *vrow = s->vr + x * d + 16 * cb0;
                            __m512 vv[4];
                            for (int b = 0; b < 4; ++b) vv[b] = b < nb ? _mm512_loadu_ps(vrow + 16 * b) : _mm512_setzero_ps();
                            for (int rr = 0; rr < RT; ++rr) {
                                const __m512 pb = _mm512_set1_ps(sc[rr][x]);
                                for (int b = 0; b < 4; ++b) acc[rr][b] = _mm512_fmadd_ps(pb, vv[b], acc[rr][b]);
                            }
                        }
                    for (int rr = 0; rr < RT; ++rr)
                        for (int b = 0; b < nb; ++b) _mm512_storeu_ps(orow[rr] + 16 * (cb0 + b), acc[rr][b]);
                }
            } else {
                for (int rr = 0; rr < nr; ++rr)
                    for (int64_t cb = 0; cb < nvb; ++cb) {
                        __m512 acc = _mm512_loadu_ps(orow[rr] + 16 * cb);
                        for (int j = 0; j < 4; ++j)
                            for (uint32_t bits = mk[rr][j]; bits; bits &= bits - 1) {
                                const int x = 16 * j + __builtin_ctz(bits);
                                acc = _mm512_fmadd_ps(_mm512_set1_ps(sc[rr][x]), _mm512_loadu_ps(s->vr + x * d + 16 * cb), acc);
                            }
                        _mm512_storeu_ps(orow[rr] + 16 * cb, acc);
                    }
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        const float inv = s->l[r] > 0.f ? 1.0f / s->l[r] : 0.f;
        const float *o = s->o + r * d;
        const int wide_out = a->qdtype && !a->lse; /* with lse the output is float32 */
        char *dst = (char *)a->out + ((t0 + r) * a->os_t + h * a->os_h) * (wide_out ? 2 : 4);
        for (int64_t c = 0; c < d; ++c) {
            const float y = o[c] * inv;
            if (wide_out) ((uint16_t *)dst)[c] = f32_to_bf16(y);
            else ((float *)dst)[c] = y;
        }
        if (a->lse) a->lse[(t0 + r) * a->Hq + h] = s->l[r] > 0.f ? s->m[r] + logf(s->l[r]) : -INFINITY;
    }
    __atomic_fetch_add(&a->pairs, pairs, __ATOMIC_RELAXED);
    __atomic_fetch_add(&a->scored, K * rows, __ATOMIC_RELAXED);
}

static void worker(sp_args *a) {
    const int64_t d = a->d, qb = a->qb;
    scratch s;
    s.cand = (int32_t *)malloc((size_t)(a->n + KC) * sizeof(int32_t));
    s.vflag = (uint8_t *)malloc((size_t)(a->n + KC));
    s.rlo = (int32_t *)malloc((size_t)(a->ns + 1) * sizeof(int32_t));
    s.rhi = (int32_t *)malloc((size_t)(a->ns + 1) * sizeof(int32_t));
    float *fl = (float *)malloc((size_t)(2 * qb * d + 2 * qb + 3 * KC * d + 2 * d) * sizeof(float));
    if (!s.cand || !s.vflag || !s.rlo || !s.rhi || !fl) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
    } else {
        s.qf = fl;
        s.o = s.qf + qb * d;
        s.m = s.o + qb * d;
        s.l = s.m + qb;
        s.kt = s.l + qb;
        s.kr = s.kt + KC * d;
        s.vr = s.kr + KC * d;
        s.buf = s.vr + KC * d;
        s.dummy = s.buf + d;
        const int64_t total = a->Hq * a->nblocks;
        for (;;) {
            const int64_t it = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
            if (it >= total) break;
            item(a, it % a->Hq, a->nblocks - 1 - it / a->Hq, &s); /* the last (largest) blocks first */
        }
    }
    free(s.cand);
    free(s.vflag);
    free(s.rlo);
    free(s.rhi);
    free(fl);
}
#endif

static int sparse_prefill(const void *q, int64_t qs_t, int64_t qs_h, int qdtype, const void *k_pool,
                          const void *k_aux, const void *k_aux2, const void *v_pool, const void *v_aux,
                          const void *v_aux2, int kv_code, const int64_t *table, int64_t q_start, int64_t T,
                          int64_t Hq, int64_t Hkv, int64_t d, int64_t block_size, const int32_t *cols, int64_t nv,
                          const int32_t *offs, int64_t ns, int64_t qb, void *out, int64_t os_t, int64_t os_h,
                          float scale, int64_t *stats, int nthreads, int64_t k_lo, int64_t k_hi, float *lse) {
    if (!slimlm_sparse_prefill_supported(d) || Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || T <= 0 || q_start < 0
        || qb <= 0 || qdtype < 0 || qdtype > 1 || !kv_code_ok(kv_code, d, k_aux, k_aux2, v_aux, v_aux2) || nv < 0
        || ns < 0 || k_lo < 0 || k_hi < k_lo)
        return 1;
#ifdef SLIMLM_HAVE_AVX512
    const int64_t n = q_start + T;
    if (k_hi > n) k_hi = n; /* keys past the chunk are never attended */
    uint8_t *is_s = (uint8_t *)calloc((size_t)(Hq * (n + 4)), 1);
    uint8_t *rev = (uint8_t *)calloc((size_t)(Hq * (n + REV_PAD)), 1);
    if (!is_s || !rev) { free(is_s); free(rev); return 2; }
    for (int64_t h = 0; h < Hq; ++h) {
        for (int64_t x = 0; x < ns; ++x) {
            const int32_t o = offs[h * ns + x];
            if (o >= 0 && o < n) is_s[h * (n + 4) + o] = rev[h * (n + REV_PAD) + n - 1 - o] = 1;
        }
    }
    sp_args a = {q, out, qs_t, qs_h, os_t, os_h, qdtype,
                 kv_pool(k_pool, k_aux, k_aux2, kv_code, 0, Hkv, d), kv_pool(v_pool, v_aux, v_aux2, kv_code, 1, Hkv, d),
                 table, q_start, T, Hq, Hkv, d, block_size, n, qb, (T + qb - 1) / qb,
                 (block_size & (block_size - 1)) ? -1 : __builtin_ctzll((unsigned long long)block_size),
                 cols, offs, nv, ns, is_s, rev, scale, 0, 0, 0, 0, k_lo, k_hi, lse};
#pragma omp parallel num_threads(nthreads)
    worker(&a);
    free(is_s);
    free(rev);
    if (stats) {
        stats[0] += a.pairs;
        stats[1] += a.scored;
    }
    return a.failed ? 2 : 0;
#else
    (void)q; (void)qs_t; (void)qs_h; (void)k_pool; (void)k_aux; (void)k_aux2; (void)v_pool; (void)v_aux; (void)v_aux2;
    (void)table; (void)cols; (void)offs; (void)out; (void)os_t; (void)os_h; (void)scale; (void)stats; (void)nthreads;
    (void)lse;
    return 1;
#endif
}

int slimlm_sparse_prefill(const void *q, int64_t qs_t, int64_t qs_h, int qdtype, const void *k_pool,
                          const void *k_aux, const void *k_aux2, const void *v_pool, const void *v_aux,
                          const void *v_aux2, int kv_code, const int64_t *table, int64_t q_start, int64_t T,
                          int64_t Hq, int64_t Hkv, int64_t d, int64_t block_size, const int32_t *cols, int64_t nv,
                          const int32_t *offs, int64_t ns, int64_t qb, void *out, int64_t os_t, int64_t os_h,
                          float scale, int64_t *stats, int nthreads) {
    return sparse_prefill(q, qs_t, qs_h, qdtype, k_pool, k_aux, k_aux2, v_pool, v_aux, v_aux2, kv_code, table, q_start,
                          T, Hq, Hkv, d, block_size, cols, nv, offs, ns, qb, out, os_t, os_h, scale, stats, nthreads,
                          0, q_start + T, NULL);
}

/* The same pattern restricted to the keys [k_lo, k_hi) (Dual Chunk Attention's key ranges, each
 * attended with its own query rotation): ``out`` is float32 (T, Hq, d) at (os_t, os_h) whatever
 * qdtype, and ``lse`` (T, Hq) float32 receives each row's log-sum-exp of its scaled scores over
 * the pairs it attends in the range (-inf, and a zero output, for a row with none), so the
 * ranges merge exactly. ``stats`` counts the range's pairs. */
int slimlm_sparse_prefill_range(const void *q, int64_t qs_t, int64_t qs_h, int qdtype, const void *k_pool,
                                const void *k_aux, const void *k_aux2, const void *v_pool, const void *v_aux,
                                const void *v_aux2, int kv_code, const int64_t *table, int64_t q_start, int64_t T,
                                int64_t Hq, int64_t Hkv, int64_t d, int64_t block_size, const int32_t *cols,
                                int64_t nv, const int32_t *offs, int64_t ns, int64_t qb, int64_t k_lo, int64_t k_hi,
                                float *out, int64_t os_t, int64_t os_h, float *lse, float scale, int64_t *stats,
                                int nthreads) {
    if (!out || !lse) return 1;
    return sparse_prefill(q, qs_t, qs_h, qdtype, k_pool, k_aux, k_aux2, v_pool, v_aux, v_aux2, kv_code, table, q_start,
                          T, Hq, Hkv, d, block_size, cols, nv, offs, ns, qb, out, os_t, os_h, scale, stats, nthreads,
                          k_lo, k_hi, lse);
}
