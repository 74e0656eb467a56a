/* Decode rows through whole decoder layers in one native call (packed weights, fp32 activations).
 *
 * For M decode rows (one query token each, M small) and layers [first, last), each layer is
 *   xn = RMSNorm(h) * ln1                      (fp32, as F.rms_norm: x * rsqrt(mean(x^2) + eps) * w)
 *   qkv = xn @ Wqkv^T (+ b)                    (the fused q/k/v projection, packed int8 / int4)
 *   q, k = RoPE(q), RoPE(k)                    (x * cos + rotate_half(x) * sin, HF's half rotation)
 *   k, v -> the paged pool at each row's slot  (float32 or bfloat16 pool, round to nearest even)
 *   a = paged decode attention of q            (slimlm_paged_decode of paged_decode.c, unchanged)
 *   h += a @ Wo^T (+ b)
 *   xn = RMSNorm(h) * ln2; g, u = xn @ Wgu^T (+ b); h += (silu(g) * u) @ Wdown^T (+ b)
 * with h (M, D) updated in place. The matmuls are the entry points of qlinear.c (included here, so
 * one library holds both and nothing is copied); each is one OpenMP region over output rows, as
 * when PyTorch calls them one by one. What this saves is everything between them: ~10 aten ops,
 * their dispatch and the Python of a layer, ~30 ms of an 86 ms SmolLM2-135M step at 1 thread.
 *
 * Per layer the caller gives NPTR pointers (ln1, ln2; q, scale, mins, bias of the four weights in
 * the order qkv, o, gate_up, down; k pool, v pool; the pools' aux parts k scale, k min, v scale,
 * v min and the keys' static offset mu (Hkv, d) float32, each NULL where the format has none)
 * and NDESC integers (kind 0 int8 / 1 int4 /
 * 2 dense float32 / 3 dense bfloat16, group size, flags: bit 0 = VNNI kernel (int8 / int4) or
 * `vdpbf16ps` (bfloat16), bits 1-2 = qlinear.c's sh (scales / minimums stored as fp16), of each
 * weight); dense weights are dense_linear.c's (q = the weight, no scales).
 * The model's sizes in dims[] (see DIM_*; DIM_POOL is kv_pool.h's format code, DIM_KROT 1 where
 * keys are stored Hadamard-rotated). Quantized pools (int8 / int4, codec/int8.py, codec/int4.py):
 * a key row is stored as quantize(fwht(k - mu)), the codec's write, byte for byte (store_kv), and
 * the query of a rotated-key pool is rotated alike before the decode kernel reads the pool in
 * place (values are stored unrotated: the caller refuses rotated values). Every
 * elementwise step rounds as PyTorch's fp32 ops do (no FMA contraction: -std=c11), so the result
 * differs from the layer-by-layer path only in RMSNorm's summation order and SiLU's exp (a
 * polynomial exp512 on AVX-512, swiglu).
 * The two halves around attention are also entry points (slimlm_decode_layer_in: norm, q/k/v, RoPE,
 * KV write; slimlm_decode_layer_out: o-proj, residual, norm, MLP, residual) for a KV policy that
 * attends in between (the query policies: model/quant/native_layers.py's forward_sparse); the
 * whole-layer loop calls the same two functions.
 * Returns 0, or the first failing kernel's code (1 bad shapes, 2 out of memory, 4 a slot, block id or
 * length outside the pool / table: checked before anything is written).
 */
#include "qlinear.c"
#undef L /* qlinear.c's lane count; paged_decode.c names a length L */
#include "paged_decode.c"
#include "dense_linear.c"
#include "simd_math.h"

enum { W_QKV, W_O, W_GU, W_DOWN, NW };
enum { P_KPOOL = 2 + 4 * NW, P_VPOOL, P_KAUX, P_KAUX2, P_VAUX, P_VAUX2, P_KMU, NPTR };
#define NDESC (3 * NW)
enum { DIM_D, DIM_HQ, DIM_HKV, DIM_HD, DIM_I, DIM_BS, DIM_POOL, DIM_MAXB, DIM_NBLOCKS, DIM_KROT, NDIM };

int slimlm_decode_layer_sizes(int *nptr, int *ndesc, int *ndim) {
    *nptr = NPTR; *ndesc = NDESC; *ndim = NDIM;
    return 0;
}

static int qlin(const int64_t *wd, const void *const *wp, const float *x, float *y, int64_t M, int64_t N,
                int64_t K, int nthreads) {
    const int64_t kind = wd[0], G = wd[1], vnni = wd[2] & 1;
    const int sh = (int)((wd[2] >> 1) & 3); /* packed: QL_SCALE_F16 / QL_MIN_F16 (fp16 scales, minimums) */
    int rc;
    if (kind >= 2)
        rc = slimlm_dense_linear(x, wp[0], kind == 2 ? 0 : vnni ? 2 : 1, y, M, N, K, nthreads);
    else if (kind == 0)
        rc = vnni ? slimlm_q8_linear_vnni(x, wp[0], wp[1], y, M, N, K, G, sh, nthreads)
                  : slimlm_q8_linear(x, wp[0], wp[1], y, M, N, K, G, sh, nthreads);
    else
        rc = vnni ? slimlm_q4_linear_vnni(x, wp[0], wp[1], wp[2], y, M, N, K, G, sh, nthreads)
                  : slimlm_q4_linear(x, wp[0], wp[1], wp[2], y, M, N, K, G, sh, nthreads);
    const float *b = wp[3];
    if (!rc && b)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += b[n];
    return rc;
}

static void rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; i++) s += xm[i] * xm[i];
        const float r = 1.f / sqrtf(s / (float)D + eps);
        for (int64_t i = 0; i < D; i++) y[m * D + i] = (xm[i] * r) * w[i];
    }
}

/* act (M, I) = silu(g) * u for gu (M, 2I) = [g | u]: g / (1 + exp(-g)) * u, rounded as the
 * scalar expression; exp is exp512 (simd_math.h, relative error ~2e-7 where expf is within an
 * ulp) on AVX-512, 16 lanes a step with a masked tail. Rows split between threads when there
 * are enough of them to pay for the region. */
static inline float silu_mul(float g, float u) { return (g / (1.f + expf(-g))) * u; }

static void swiglu(const float *gu, float *act, int64_t M, int64_t I, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M >= 8)
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *a = act + m * I;
        int64_t i = 0;
#ifdef __AVX512F__
        const __m512 one = _mm512_set1_ps(1.f);
        for (; i < I; i += 16) {
            const __mmask16 mk = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1);
            const __m512 gv = _mm512_maskz_loadu_ps(mk, g + i);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            _mm512_mask_storeu_ps(a + i, mk, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)),
                                                           _mm512_maskz_loadu_ps(mk, u + i)));
        }
#endif
        for (; i < I; i++) a[i] = silu_mul(g[i], u[i]);
    }
}

/* x (d) rotated by cos/sin (d) into out (d): x * cos + rotate_half(x) * sin */
static void rope(const float *x, const float *c, const float *s, float *out, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) out[i] = x[i] * c[i] + (-x[i + h]) * s[i];
    for (int64_t i = h; i < d; i++) out[i] = x[i] * c[i] + x[i - h] * s[i];
}

static void store_row(void *pool, int pool_dtype, int64_t off, const float *x, int64_t n) {
    if (pool_dtype == 0) {
        memcpy((float *)pool + off, x, (size_t)n * sizeof(float));
    } else {
        uint16_t *p = (uint16_t *)pool + off;
        for (int64_t i = 0; i < n; i++) p[i] = f32_to_bf16(x[i]);
    }
}

/* One token's keys k and values v (Hkv, d) float32 into flat slot ``slot`` of the layer's pools
 * p[P_KPOOL..P_KMU]: float32 / bfloat16 rows as they are; int8 / int4 as the codecs write them
 * (kv_encode of paged_decode.c: keys minus mu, rotated when krot, quantized: the same bytes). kbuf holds
 * Hkv * d floats. Returns 0, or 1 when the pool format cannot be written here. */
static int store_kv(const void *const *p, int dtype, int krot, int64_t slot, int64_t Hkv, int64_t d,
                    const float *k, const float *v, float *kbuf) {
    if (dtype <= 1) {
        store_row((void *)p[P_KPOOL], dtype, slot * Hkv * d, k, Hkv * d);
        store_row((void *)p[P_VPOOL], dtype, slot * Hkv * d, v, Hkv * d);
        return 0;
    }
    if (kv_encode(k, p[P_KMU], krot, &slot, 1, Hkv, d, kv_pool_code(dtype, 0), (void *)p[P_KPOOL], (void *)p[P_KAUX],
                  (void *)p[P_KAUX2], kbuf))
        return 1;
    return kv_encode(v, NULL, 0, &slot, 1, Hkv, d, kv_pool_code(dtype, 1), (void *)p[P_VPOOL], (void *)p[P_VAUX],
                     (void *)p[P_VAUX2], kbuf);
}

/* store_kv for M rows k, v (M, Hkv, d) at slots (M) with one layer's pointer row p (NPTR): the
 * decode layers' KV write on its own, for tests against the codecs. */
int slimlm_decode_layer_store(const float *k, const float *v, const int64_t *slots, int64_t M, int64_t Hkv,
                              int64_t d, int dtype, int krot, const void *const *p) {
    if (dtype < 0 || dtype > KV_CODE_MAX || (krot && (d & (d - 1)))) return 1;
    float *kbuf = malloc(sizeof(float) * Hkv * d);
    if (!kbuf) return 2;
    int rc = 0;
    for (int64_t m = 0; m < M && !rc; m++)
        rc = store_kv(p, dtype, krot, slots[m], Hkv, d, k + m * Hkv * d, v + m * Hkv * d, kbuf);
    free(kbuf);
    return rc;
}

/* A step's scratch: xn (M, D), qkv (M, Nqkv), qr (M, Nq), att (M, Nq), o (M, D), gu (M, 2I), act (M, I),
 * kr (2 Hkv d: the roped keys of one row, then store_kv's buffer). */
typedef struct { float *xn, *qkv, *qr, *att, *o, *gu, *act, *kr; } layer_buf_t;

static int layer_buf(layer_buf_t *w, int64_t M, const int64_t *dims) {
    const int64_t D = dims[DIM_D], Nq = dims[DIM_HQ] * dims[DIM_HD], Nkv = dims[DIM_HKV] * dims[DIM_HD];
    const int64_t I = dims[DIM_I], Nqkv = Nq + 2 * Nkv;
    w->xn = malloc(sizeof(float) * M * (D + Nqkv + 2 * Nq + D + 3 * I) + sizeof(float) * 2 * Nkv);
    if (!w->xn) return 2;
    w->qkv = w->xn + M * D; w->qr = w->qkv + M * Nqkv; w->att = w->qr + M * Nq; w->o = w->att + M * Nq;
    w->gu = w->o + M * D; w->act = w->gu + M * 2 * I; w->kr = w->act + M * I;
    return 0;
}

/* The layer's first half: xn = RMSNorm(h) * ln1; qkv; RoPE; k, v into the pool at each row's slot
 * (store_kv); the rotated queries into w->qr (M, Hq * d), Hadamard-rotated too where keys are stored so. */
static int layer_attn_in(const float *h, int64_t M, const int64_t *dims, const void *const *p, const int64_t *wd,
                         const float *cos, const float *sin, const int64_t *slots, float eps, int nthreads,
                         layer_buf_t *w) {
    const int64_t D = dims[DIM_D], Hq = dims[DIM_HQ], Hkv = dims[DIM_HKV], d = dims[DIM_HD];
    const int64_t Nq = Hq * d, Nkv = Hkv * d, Nqkv = Nq + 2 * Nkv;
    const int pool_dtype = (int)dims[DIM_POOL], krot = (int)dims[DIM_KROT];
    int rc;
    rms_norm(h, p[0], w->xn, M, D, eps);
    if ((rc = qlin(wd + 3 * W_QKV, p + 2 + 4 * W_QKV, w->xn, w->qkv, M, Nqkv, D, nthreads))) return rc;
    for (int64_t m = 0; m < M; m++) {
        const float *row = w->qkv + m * Nqkv, *c = cos + m * d, *s = sin + m * d;
        for (int64_t hh = 0; hh < Hq; hh++) {
            rope(row + hh * d, c, s, w->qr + m * Nq + hh * d, d);
            if (krot) kv_fwht(w->qr + m * Nq + hh * d, d); /* into the stored keys' space */
        }
        for (int64_t hh = 0; hh < Hkv; hh++) rope(row + Nq + hh * d, c, s, w->kr + hh * d, d);
        if ((rc = store_kv(p, pool_dtype, krot, slots[m], Hkv, d, w->kr, row + Nq + Nkv, w->kr + Nkv))) return rc;
    }
    return 0;
}

/* The layer's second half: h += w->att @ Wo^T; h += MLP(RMSNorm(h) * ln2). */
static int layer_attn_out(float *h, int64_t M, const int64_t *dims, const void *const *p, const int64_t *wd,
                          float eps, int nthreads, layer_buf_t *w) {
    const int64_t D = dims[DIM_D], Nq = dims[DIM_HQ] * dims[DIM_HD], I = dims[DIM_I];
    int rc;
    if ((rc = qlin(wd + 3 * W_O, p + 2 + 4 * W_O, w->att, w->o, M, D, Nq, nthreads))) return rc;
    for (int64_t i = 0; i < M * D; i++) h[i] = h[i] + w->o[i];
    rms_norm(h, p[1], w->xn, M, D, eps);
    if ((rc = qlin(wd + 3 * W_GU, p + 2 + 4 * W_GU, w->xn, w->gu, M, 2 * I, D, nthreads))) return rc;
    swiglu(w->gu, w->act, M, I, nthreads);
    if ((rc = qlin(wd + 3 * W_DOWN, p + 2 + 4 * W_DOWN, w->act, w->o, M, D, I, nthreads))) return rc;
    for (int64_t i = 0; i < M * D; i++) h[i] = h[i] + w->o[i];
    return 0;
}

static int bad_dims(int64_t M, const int64_t *dims) {
    const int64_t d = dims[DIM_HD], Hkv = dims[DIM_HKV], Hq = dims[DIM_HQ], pool_dtype = dims[DIM_POOL];
    const int64_t krot = dims[DIM_KROT];
    return M <= 0 || d % 2 || Hkv <= 0 || Hq % Hkv || pool_dtype < 0 || pool_dtype > KV_CODE_MAX ||
           (pool_dtype >= 3 && (d % i4_group((int)pool_dtype, 0) || d % i4_group((int)pool_dtype, 1))) ||
           (krot && (pool_dtype <= 1 || (d & (d - 1))));
}

static int bad_slots(int64_t M, const int64_t *dims, const int64_t *slots) {
    for (int64_t m = 0; m < M; m++)
        if (slots[m] < 0 || slots[m] >= dims[DIM_NBLOCKS] * dims[DIM_BS]) return 1;
    return 0;
}

int slimlm_decode_layers(float *h, int64_t M, int64_t first, int64_t last, const int64_t *dims,
                         const void *const *ptrs, const int64_t *desc, const float *cos, const float *sin,
                         const int64_t *slots, const int64_t *table, const int64_t *lens, float eps, float scale,
                         int nthreads) {
    const int64_t Hq = dims[DIM_HQ], Hkv = dims[DIM_HKV], d = dims[DIM_HD];
    const int64_t bs = dims[DIM_BS], maxb = dims[DIM_MAXB], nblocks = dims[DIM_NBLOCKS];
    const int pool_dtype = (int)dims[DIM_POOL];
    if (bad_dims(M, dims) || first < 0 || last < first) return 1;
    if (bad_slots(M, dims, slots)) return 4; /* the pointers are trusted, the step's indices are not */
    for (int64_t m = 0; m < M; m++) {
        if (lens[m] < 1 || lens[m] > maxb * bs) return 4;
        for (int64_t j = 0; j < maxb; j++)
            if (table[m * maxb + j] < 0 || table[m * maxb + j] >= nblocks) return 4;
    }
    layer_buf_t w;
    if (layer_buf(&w, M, dims)) return 2;
    const int dthreads = (int)(M < nthreads ? M : nthreads);
    int rc = 0;
    for (int64_t l = first; l < last && !rc; l++) {
        const void *const *p = ptrs + l * NPTR;
        const int64_t *wd = desc + l * NDESC;
        if ((rc = layer_attn_in(h, M, dims, p, wd, cos, sin, slots, eps, nthreads, &w))) break;
        if ((rc = slimlm_paged_decode(w.qr, p[P_KPOOL], p[P_VPOOL], p[P_KAUX], p[P_KAUX2], p[P_VAUX], p[P_VAUX2],
                                      pool_dtype, table, lens, w.att, NULL, M, Hq, Hkv, d, bs, maxb, scale, dthreads)))
            break;
        rc = layer_attn_out(h, M, dims, p, wd, eps, nthreads, &w);
    }
    free(w.xn);
    return rc;
}

/* Layer l's first half alone (a KV policy attends in between): q (M, Hq * d) the rotated queries;
 * k, v stored at ``slots``. Returns as slimlm_decode_layers (4: a slot outside the pool). */
int slimlm_decode_layer_in(const float *h, int64_t M, int64_t l, const int64_t *dims, const void *const *ptrs,
                           const int64_t *desc, const float *cos, const float *sin, const int64_t *slots, float *q,
                           float eps, int nthreads) {
    if (bad_dims(M, dims) || l < 0) return 1;
    if (bad_slots(M, dims, slots)) return 4;
    layer_buf_t w;
    if (layer_buf(&w, M, dims)) return 2;
    w.qr = q;
    const int rc = layer_attn_in(h, M, dims, ptrs + l * NPTR, desc + l * NDESC, cos, sin, slots, eps, nthreads, &w);
    free(w.xn);
    return rc;
}

/* Layer l's second half alone: h (M, D) += o-proj of att (M, Hq * d), then the MLP block. */
int slimlm_decode_layer_out(float *h, int64_t M, int64_t l, const int64_t *dims, const void *const *ptrs,
                            const int64_t *desc, const float *att, float eps, int nthreads) {
    if (bad_dims(M, dims) || l < 0) return 1;
    layer_buf_t w;
    if (layer_buf(&w, M, dims)) return 2;
    w.att = (float *)att;
    const int rc = layer_attn_out(h, M, dims, ptrs + l * NPTR, desc + l * NDESC, eps, nthreads, &w);
    free(w.xn);
    return rc;
}
