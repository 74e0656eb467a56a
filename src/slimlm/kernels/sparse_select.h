/* The query KV policies' decode-time selection in C (included by sparse_decode.c): for one
 * (sequence, KV head) item, score the G query heads of the group against the prefix's summary and
 * write the prefix tokens the item attends, ascending, as the PyTorch code in
 * slimlm/kvcache/policy/{shadowkv,squeezed}.py picks them:
 *
 * ShadowKV (kind 1): p_g = softmax_c(q_g . land[c] / sqrt(d)) over every chunk c, tot = sum_g p_g;
 *   the n_sel non-outlier chunks of highest tot, ties to the lower chunk; the entries are their
 *   rows (chunk * c + i, ascending; rebuilt from the factors: m = n_sel * chunk) then the
 *   outlier rows ``orows`` as given.
 * Squeezed (kind 2): s_g = q_g . cent[c]; per query head the clusters in (s_g desc, index asc)
 *   order are taken while the keys of those taken before hold fewer than ``need`` (compared in
 *   float32, as torch compares an int64 tensor with a Python float); with two levels (C1 > 0)
 *   first the coarse clusters alike (``cneed``), and only the fine clusters whose coarse one was
 *   taken are scored. The entries: every token t < P whose cluster some query head of the group
 *   took; qm[g, j] = head g took entry j's cluster.
 *
 * Orders are computed with a binary max-heap over (score desc, index asc) popped as far as
 * needed: the same order as a stable descending sort, so ties resolve alike in both languages.
 *
 * Per row b: sp[b * NSP + i] pointers, si[b * NSI + i] integers, sf[b * NSF + i] floats:
 *   kind 0 (dense row: nothing selected), 1 ShadowKV, 2 Squeezed (si[0]); P (si[1])
 *   ShadowKV: sp = land (Hkv, nc, d) f32, out (Hkv, nc) u8, orows (Hkv, o) i64;
 *             si[2..5] = nc, chunk, n_sel, o
 *   Squeezed: sp = cents (Hkv, C, d) f32, assign (Hkv, P) i64, sizes (Hkv, C) i64,
 *             top (Hkv, C1, d) f32, up (Hkv, C) i64, csizes (Hkv, C1) i64 (levels 2; else NULL);
 *             si[2..3] = C, C1 (0: one level); sf = need, cneed
 * Counters per item (3 int64): entries n, sum over the group of the entries each head takes,
 * fine clusters scored by some head of the group (two levels; else C). */
#ifndef SLIMLM_SPARSE_SELECT_H
#define SLIMLM_SPARSE_SELECT_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { NSP = 6, NSI = 6, NSF = 2, NCOUNT = 3 };

typedef struct { /* per-thread scratch, sized for the largest row of a call */
    float *s, *tot;     /* (G, Cmax) scores, (Cmax) ShadowKV totals */
    int32_t *heap;      /* (Cmax) */
    uint8_t *take, *any, *allow, *ctake; /* (G, Cmax) taken per head, (Cmax) by any head; two levels:
                                          * (Cmax) fine allowed for some head, (Cmax) coarse taken */
} sel_scratch_t;

static int sel_scratch_init(sel_scratch_t *w, int64_t G, int64_t Cmax) {
    const size_t n = (size_t)(Cmax > 0 ? Cmax : 1);
    w->s = (float *)malloc(sizeof(float) * n * (size_t)(G + 1));
    w->tot = w->s ? w->s + n * (size_t)G : NULL;
    w->heap = (int32_t *)malloc(sizeof(int32_t) * n);
    w->take = (uint8_t *)malloc(n * (size_t)(G + 3));
    w->any = w->take ? w->take + n * (size_t)G : NULL;
    w->allow = w->take ? w->any + n : NULL;
    w->ctake = w->take ? w->allow + n : NULL;
    return w->s && w->heap && w->take;
}

static void sel_scratch_free(sel_scratch_t *w) { free(w->s); free(w->heap); free(w->take); }

static inline int sel_better(const float *s, int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); }

static void sel_sift(const float *s, int32_t *hp, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, best = i;
        if (l < n && sel_better(s, hp[l], hp[best])) best = l;
        if (l + 1 < n && sel_better(s, hp[l + 1], hp[best])) best = l + 1;
        if (best == i) return;
        const int32_t t = hp[i]; hp[i] = hp[best]; hp[best] = t;
        i = best;
    }
}

/* Heap of the n candidate indices in hp (scores s): built in place. */
static void sel_heapify(const float *s, int32_t *hp, int64_t n) {
    for (int64_t i = n / 2 - 1; i >= 0; --i) sel_sift(s, hp, n, i);
}

static int32_t sel_pop(const float *s, int32_t *hp, int64_t *n) {
    const int32_t top = hp[0];
    hp[0] = hp[--*n];
    sel_sift(s, hp, *n, 0);
    return top;
}

/* Clusters among the n candidates in hp, in score order, while those taken before hold < need. */
static void sel_take(const float *s, int32_t *hp, int64_t n, const int64_t *sizes, float need, uint8_t *take) {
    sel_heapify(s, hp, n);
    int64_t cum = 0;
    while (n > 0 && (float)cum < need) {
        const int32_t c = sel_pop(s, hp, &n);
        take[c] = 1;
        cum += sizes[c];
    }
}

static inline float sel_dot(const float *a, const float *b, int64_t d) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
    return acc;
}

/* One item: q (G, d) of the group, KV head h. Writes n entries to ix and, for Squeezed, qm
 * (G rows of stride N); returns n, or -1 on an index outside its range. *m: entries rebuilt
 * from factors (ShadowKV) or 0. */
static int64_t select_item(const float *q, const void *const *sp, const int64_t *si, const float *sf, int64_t h,
                           int64_t G, int64_t d, int32_t *ix, uint8_t *qm, int64_t N, int64_t *m, int64_t *counters,
                           sel_scratch_t *w) {
    const int64_t kind = si[0], P = si[1];
    int64_t n = 0;
    *m = 0;
    counters[0] = counters[1] = counters[2] = 0;
    if (kind != 0 && (P < 0 || si[2] < 0 || si[3] < 0 || si[4] < 0 || si[5] < 0)) return -1;
    if (kind == 1) {
        const int64_t nc = si[2], chunk = si[3], n_sel = si[4], o = si[5];
        const float *land = (const float *)sp[0] + h * nc * d;
        const uint8_t *out = (const uint8_t *)sp[1] + h * nc;
        const int64_t *orows = (const int64_t *)sp[2] + h * o;
        const float rs = sqrtf((float)d);
        float *tot = w->tot, *sg = w->s;
        memset(tot, 0, sizeof(float) * (size_t)nc);
        for (int64_t g = 0; g < G; ++g) {
            float mx = -INFINITY, sum = 0.f;
            for (int64_t c = 0; c < nc; ++c) {
                sg[c] = sel_dot(q + g * d, land + c * d, d) / rs;
                mx = sg[c] > mx ? sg[c] : mx;
            }
            for (int64_t c = 0; c < nc; ++c) { sg[c] = expf(sg[c] - mx); sum += sg[c]; }
            const float inv = 1.f / sum; /* as torch's softmax: times the reciprocal */
            for (int64_t c = 0; c < nc; ++c) tot[c] += sg[c] * inv;
        }
        int64_t k = 0;
        for (int64_t c = 0; c < nc; ++c)
            if (!out[c]) w->heap[k++] = (int32_t)c;
        uint8_t *take = w->take;
        memset(take, 0, (size_t)nc);
        sel_heapify(tot, w->heap, k);
        for (int64_t i = 0; i < n_sel && k > 0; ++i) take[sel_pop(tot, w->heap, &k)] = 1;
        for (int64_t c = 0; c < nc; ++c)
            if (take[c])
                for (int64_t i = 0; i < chunk; ++i) ix[n++] = (int32_t)(c * chunk + i);
        *m = n;
        for (int64_t i = 0; i < o; ++i) {
            if (orows[i] < 0 || orows[i] >= P) return -1;
            ix[n++] = (int32_t)orows[i];
        }
        counters[0] = n;
        counters[1] = G * n;
        counters[2] = nc;
        return n;
    }
    if (kind != 2) return 0;
    const int64_t C = si[2], C1 = si[3];
    const float *cents = (const float *)sp[0] + h * C * d;
    const int64_t *assign = (const int64_t *)sp[1] + h * P, *sizes = (const int64_t *)sp[2] + h * C;
    uint8_t *take = w->take, *any = w->any, *allow = w->allow;
    memset(take, 0, (size_t)(G * C));
    memset(any, 0, (size_t)C);
    int64_t fine_read = 0;
    if (C1 > 0) memset(allow, 0, (size_t)C);
    for (int64_t g = 0; g < G; ++g) {
        const float *qg = q + g * d;
        float *sg = w->s + g * C;
        int64_t k = 0;
        if (C1 > 0) { /* coarse clusters first; only the fine ones inside the taken coarse ones */
            const float *top = (const float *)sp[3] + h * C1 * d;
            const int64_t *up = (const int64_t *)sp[4] + h * C, *csizes = (const int64_t *)sp[5] + h * C1;
            float *cs = w->tot;
            uint8_t *ctake = w->ctake;
            for (int64_t c = 0; c < C1; ++c) { cs[c] = sel_dot(qg, top + c * d, d); w->heap[c] = (int32_t)c; ctake[c] = 0; }
            sel_take(cs, w->heap, C1, csizes, sf[1], ctake);
            for (int64_t c = 0; c < C; ++c) {
                if (up[c] < 0 || up[c] >= C1) return -1;
                if (!ctake[up[c]]) continue;
                sg[c] = sel_dot(qg, cents + c * d, d);
                w->heap[k++] = (int32_t)c;
                allow[c] = 1;
            }
        } else {
            for (int64_t c = 0; c < C; ++c) { sg[c] = sel_dot(qg, cents + c * d, d); w->heap[c] = (int32_t)c; }
            k = C;
        }
        sel_take(sg, w->heap, k, sizes, sf[0], take + g * C);
        for (int64_t c = 0; c < C; ++c) any[c] |= take[g * C + c];
    }
    if (C1 > 0)
        for (int64_t c = 0; c < C; ++c) fine_read += allow[c];
    int64_t qsum = 0;
    for (int64_t t = 0; t < P; ++t) {
        const int64_t a = assign[t];
        if (a < 0 || a >= C) return -1;
        if (!any[a]) continue;
        if (n >= N) return -1;
        ix[n] = (int32_t)t;
        for (int64_t g = 0; g < G; ++g) {
            qm[g * N + n] = take[g * C + a];
            qsum += take[g * C + a];
        }
        ++n;
    }
    counters[0] = n;
    counters[1] = qsum;
    counters[2] = C1 > 0 ? fine_read : C;
    return n;
}

/* The largest summary (chunks / clusters) of a call's rows: scratch size. */
static int64_t sel_cmax(const int64_t *si, int64_t B) {
    int64_t cmax = 1;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t *r = si + b * NSI;
        if ((r[0] == 1 || r[0] == 2) && r[2] > cmax) cmax = r[2];
    }
    return cmax;
}
#endif
