/* Dense linear layers for decode: y (M, N) = x (M, K) @ W^T for small M, W float32 or bfloat16 (N, K).
 *
 * Three kinds (``kind``):
 *   0  float32 W, float32 x: FMA in float32 (the de-quantized reference up to summation order).
 *   1  bfloat16 W widened to float32 in registers, float32 x: the products are exact (a bf16
 *      times an fp32 fits an fp32 FMA), so this is the bf16 matmul with fp32 activations.
 *   2  bfloat16 W, x rounded to bfloat16 (nearest even), `vdpbf16ps` (2 products per fp32 lane):
 *      llama.cpp's BF16 path; x's rounding adds a relative error of at most 2^-9 per channel.
 *      Built only where the compiler targets AVX512-BF16; elsewhere returns 3. Where AMX is built
 *      and granted (amx.h's amx_ready; ``SLIMLM_AMX=0`` says no), K a multiple of 32 and N >= 32,
 *      kind 2 runs on AMX tiles instead (amx_linear below: W read in place, the same x rounding,
 *      another summation order; every M, so batch invariance holds there too).
 * Rows of W are split between threads in blocks of NR rows (each thread one contiguous range);
 * each block is applied to every row of x while it is in L1. For the first x row the block's rows
 * are read one after the other (two accumulators per row), so a thread's reads of W from DRAM are
 * one sequential stream; the other x rows, with W in L1, go through register tiles of NX = 3 x
 * rows x NR = 4 W rows (24 accumulators: each W vector loaded and widened once for 3 x rows, each
 * x vector once for 4 W rows), every (x row, W row) pair summed in the same order as the first
 * row's (the same two accumulators, steps, tail and final reduction), so every x row's y is
 * bitwise what it would be alone: batch invariance. Reading the NR rows side by side from DRAM
 * (NR streams 2K or 4K bytes apart, each restarting every block) was 1.3x (fp32) to 2x (bf16)
 * slower with W streamed from DRAM, as in a decode step: the hardware prefetchers follow one long
 * stream, not NR short ones (docs/benchmarks.md, "dense decode step"). The tiles took a 64-row
 * step's GEMMs from 45-50 to 83-102 GFLOPS (fp32), 50 to 96-105 (bf16 widened), 141-168 to
 * 174-191 (vdpbf16ps) per core (docs/benchmarks.md, "session 11: all-decode steps"); while a
 * block's tiles run, the next block's rows are prefetched, so the first x row's pass over it
 * reads the cache, not DRAM (with one x row there is nothing to overlap: no prefetch). Kind 2's x
 * is rounded to bf16 16 values at a time into a buffer the calling thread keeps (no allocation
 * per call). Any K (masked tails). The portable loops (no AVX-512) are the reference; kinds 0 and
 * 1 there give the same values up to summation order.
 */
#include <stdint.h>
#include <stdlib.h>
#include "amx.h"
#include "kv_pool.h"

#define NR 4     /* output rows per block */
#define NX 3     /* x rows per tile: 2 * NX * NR = 24 accumulators (reduce4 takes NR = 4) */
#define DL_L 16  /* float lanes */

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SLIMLM_DPBF16 1
#endif

int slimlm_dense_has_dpbf16(void) {
#ifdef SLIMLM_DPBF16
    return 1;
#else
    return 0;
#endif
}

/* Software prefetch of the weight stream a batch-1 row reads (row_f32x): dl_pf bytes ahead of each
 * 64-byte line (0: off). With one x row nothing overlaps DRAM but the hardware prefetchers, which
 * stop at every 4 KiB page; asking for the lines DL_PF_BYTES ahead kept more of them in flight
 * (docs/benchmarks.md, "session 14"). No arithmetic changes (prefetches never fault, so those
 * past W's end are harmless); ``slimlm_dense_prefetch(0)`` turns it off for A/B runs. */
#define DL_PF_BYTES 4096
static int64_t dl_pf = DL_PF_BYTES;

int slimlm_dense_prefetch(int bytes) {
    const int was = (int)dl_pf;
    if (bytes >= 0) dl_pf = bytes;
    return was;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* a loaded vector held in a register: without this GCC folds the loads into the FMAs as memory
 * operands, one load per FMA (the load-bound loop the tiles are there to avoid) */
#define KEEP(v) __asm__("" : "+v"(v))

/* The next block's W rows (bytes from p) fetched into the cache while this block's tiles run, a
 * share of its lines before each tile: with several x rows the first row's pass over the next
 * block then reads from the cache instead of waiting on DRAM (past the last block the prefetches
 * touch whatever follows W: harmless, a prefetch never faults). */
typedef struct { const char *p, *end; size_t step; } prefetch_t;

static inline prefetch_t prefetch_start(const char *p, size_t bytes, int64_t M) {
    const size_t lines = (bytes + 63) / 64, tiles = (size_t)((M - 1) / NX > 0 ? (M - 1) / NX : 1);
    prefetch_t pf = {p, p + bytes, 64 * ((lines + tiles - 1) / tiles)};
    return pf;
}

static inline void prefetch_some(prefetch_t *pf) {
    const char *stop = pf->p + pf->step < pf->end ? pf->p + pf->step : pf->end;
    for (; pf->p < stop; pf->p += 64) __builtin_prefetch(pf->p, 0, 3);
}

/* y[j] = _mm512_reduce_add_ps(a0[j] + a1[j]) for the NR = 4 pairs, bitwise: the same tree of
 * additions (lane i + lane i + 8, then + 4, + 2, + 1), four vectors at a time (18 instructions
 * where four reductions take 36) */
static inline __attribute__((always_inline)) void reduce4(const __m512 *a0, const __m512 *a1, float *y) {
    const __m512 A = _mm512_add_ps(a0[0], a1[0]), B = _mm512_add_ps(a0[1], a1[1]);
    const __m512 C = _mm512_add_ps(a0[2], a1[2]), D = _mm512_add_ps(a0[3], a1[3]);
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(A, B, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(A, B, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(C, D, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(C, D, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
    t = _mm512_permutexvar_ps(_mm512_set_epi32(15, 14, 13, 11, 10, 9, 7, 6, 5, 3, 2, 1, 12, 8, 4, 0), t);
    _mm_storeu_ps(y, _mm512_castps512_ps128(t));
}

static inline __m512 ld_w(const void *w, int bf16, int64_t k) {
    if (!bf16) return _mm512_loadu_ps((const float *)w + k);
    __m256i b = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline __m512 ld_w_tail(const void *w, int bf16, int64_t k, __mmask16 mk) {
    if (!bf16) return _mm512_maskz_loadu_ps(mk, (const float *)w + k);
    __m256i b = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)w + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* One row of W (K values) against one x row: two accumulators over the row, masked tail. */
static inline float row_f32x(const float *x, const void *w, int bf16, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    const char *pw = dl_pf ? (const char *)w + dl_pf : NULL; /* the bytes dl_pf on: one line a step (two for fp32) */
    for (; k + 2 * DL_L <= K; k += 2 * DL_L) {
        if (pw) {
            __builtin_prefetch(pw + k * (bf16 ? 2 : 4), 0, 3);
            if (!bf16) __builtin_prefetch(pw + k * 4 + 64, 0, 3);
        }
        a0 = _mm512_fmadd_ps(ld_w(w, bf16, k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(ld_w(w, bf16, k + DL_L), _mm512_loadu_ps(x + k + DL_L), a1);
    }
    for (; k < K; k += DL_L) {
        const __mmask16 mk = K - k >= DL_L ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        a0 = _mm512_fmadd_ps(ld_w_tail(w, bf16, k, mk), _mm512_maskz_loadu_ps(mk, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* A tile: the NR rows of W at w (in L1 by then) against nx <= NX x rows (x + i * K), into
 * y + i * N. All 2 * nx * NR accumulators stay in registers, so each W vector is loaded (and
 * widened) once for nx x rows and each x vector once for NR W rows: 14 loads per 24 FMAs at
 * nx = 3, where one x row at a time took 10 per 8. Each (x row, W row) pair is summed exactly as
 * row_f32x sums it (the same two accumulators, steps and tail, the same final reduction), so
 * every y is bitwise what it is alone (batch invariance). nx is a constant at every call. */
static inline __attribute__((always_inline)) void tile_f32x(const float *x, const void *w, int bf16, float *y,
                                                            int nx, int64_t N, int64_t K) {
    const size_t rs = (size_t)K * (bf16 ? 2 : 4);
    __m512 a0[NX][NR], a1[NX][NR]; /* the two accumulators of each pair */
#define TILE_STEP(acc, XLOAD, WLOAD)                                                       \
    do {                                                                                   \
        __m512 xv[NX];                                                                     \
        _Pragma("GCC unroll 4") for (int i = 0; i < nx; i++) { xv[i] = XLOAD; KEEP(xv[i]); } \
        _Pragma("GCC unroll 4") for (int j = 0; j < NR; j++) {                             \
            __m512 wv = WLOAD;                                                             \
            KEEP(wv);                                                                      \
            _Pragma("GCC unroll 4") for (int i = 0; i < nx; i++) acc[i][j] = _mm512_fmadd_ps(wv, xv[i], acc[i][j]); \
        }                                                                                  \
    } while (0)
#pragma GCC unroll 4
    for (int i = 0; i < nx; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++) a0[i][j] = a1[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 * DL_L <= K; k += 2 * DL_L) {
        TILE_STEP(a0, _mm512_loadu_ps(x + i * K + k), ld_w((const char *)w + j * rs, bf16, k));
        TILE_STEP(a1, _mm512_loadu_ps(x + i * K + k + DL_L), ld_w((const char *)w + j * rs, bf16, k + DL_L));
    }
    for (; k < K; k += DL_L) {
        const __mmask16 mk = K - k >= DL_L ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        TILE_STEP(a0, _mm512_maskz_loadu_ps(mk, x + i * K + k), ld_w_tail((const char *)w + j * rs, bf16, k, mk));
    }
#undef TILE_STEP
#pragma GCC unroll 4
    for (int i = 0; i < nx; i++) reduce4(a0[i], a1[i], y + i * N);
}

/* nr rows of W (row stride K) against the M x rows (row stride K) into y (row stride N). The
 * first x row reads the rows one after the other (W comes from DRAM as one stream); the others
 * take the rows from L1 in tiles of NX x rows (a full block; a short last block row by row).
 * bf16 is a constant at both calls below (no branch per load in the tiles). */
static inline __attribute__((always_inline)) void block_f32x_of(const float *x, const void *w, const int bf16,
                                                                float *y, int nr, int64_t M, int64_t N, int64_t K) {
    const size_t rs = (size_t)K * (bf16 ? 2 : 4);
    int64_t m = 1;
    for (int i = 0; i < nr; i++) y[i] = row_f32x(x, (const char *)w + i * rs, bf16, K);
    if (nr == NR) {
        prefetch_t pf = prefetch_start((const char *)w + NR * rs, NR * rs, M);
        for (; m + NX <= M; m += NX) {
            prefetch_some(&pf);
            tile_f32x(x + m * K, w, bf16, y + m * N, NX, N, K);
        }
        if (M - m == 2) tile_f32x(x + m * K, w, bf16, y + m * N, 2, N, K);
        if (M - m == 1) tile_f32x(x + m * K, w, bf16, y + m * N, 1, N, K);
        return;
    }
    for (; m < M; m++)
        for (int i = 0; i < nr; i++) y[m * N + i] = row_f32x(x + m * K, (const char *)w + i * rs, bf16, K);
}

static void block_f32x(const float *x, const void *w, int bf16, float *y, int nr, int64_t M, int64_t N,
                       int64_t K) {
    if (bf16)
        block_f32x_of(x, w, 1, y, nr, M, N, K);
    else
        block_f32x_of(x, w, 0, y, nr, M, N, K);
}
#else
static void block_f32x(const float *x, const void *w, int bf16, float *y, int nr, int64_t M, int64_t N,
                       int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int i = 0; i < nr; i++) {
            const float *xm = x + m * K;
            float acc[DL_L] = {0};
            int64_t k = 0;
            if (bf16) {
                const uint16_t *wr = (const uint16_t *)w + (size_t)i * K;
                for (; k + DL_L <= K; k += DL_L) {
#pragma omp simd
                    for (int l = 0; l < DL_L; l++) acc[l] += bf16_to_f32(wr[k + l]) * xm[k + l];
                }
                for (; k < K; k++) acc[k % DL_L] += bf16_to_f32(wr[k]) * xm[k];
            } else {
                const float *wr = (const float *)w + (size_t)i * K;
                for (; k + DL_L <= K; k += DL_L) {
#pragma omp simd
                    for (int l = 0; l < DL_L; l++) acc[l] += wr[k + l] * xm[k + l];
                }
                for (; k < K; k++) acc[k % DL_L] += wr[k] * xm[k];
            }
            float s = 0.f;
            for (int l = 0; l < DL_L; l++) s += acc[l];
            y[m * N + i] = s;
        }
}
#endif

#ifdef SLIMLM_DPBF16
/* 16 floats to bfloat16 exactly as f32_to_bf16 (kv_pool.h): round to nearest even, NaN kept NaN
 * (vcvtneps2bf16 would flush denormals to zero) */
static inline __m256i bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    const __m512i q = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, q));
}

/* one x row (K) into xb (Kp >= K, a multiple of 32) as bf16, zero-padded */
static void to_bf16_row(const float *x, uint16_t *xb, int64_t K, int64_t Kp) {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm256_storeu_si256((__m256i *)(xb + k), bf16x16(_mm512_loadu_ps(x + k)));
    for (; k < K; k++) xb[k] = f32_to_bf16(x[k]);
    for (; k < Kp; k++) xb[k] = 0;
}

/* The calling thread's bf16 copy of x, kept between calls (grown as needed, never shrunk): no
 * allocation per call (a 100+ KB calloc is an mmap, its pages faulted in again every call). */
static uint16_t *xb_scratch(size_t n) {
    static _Thread_local uint16_t *buf;
    static _Thread_local size_t cap;
    if (n > cap) {
        free(buf);
        buf = malloc(n * sizeof(uint16_t));
        cap = buf ? n : 0;
    }
    return buf;
}

#define DP(acc, r, k) _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)((r) + (k))), \
                                       (__m512bh)_mm512_loadu_si512((const void *)(xb + (k))))
#define DP_TAIL(acc, r, k, mk) _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(mk, (r) + (k)), \
                                                (__m512bh)_mm512_loadu_si512((const void *)(xb + (k))))

/* xb: one x row in bf16, zero-padded to a multiple of 32; one row r of W: two accumulators */
static inline float row_dpbf16(const uint16_t *xb, const uint16_t *r, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = DP(a0, r, k);
        a1 = DP(a1, r, k + 32);
    }
    for (; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
        a0 = DP_TAIL(a0, r, k, mk);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#undef DP
#undef DP_TAIL

/* tile_f32x for vdpbf16ps: NR rows of W against nx <= NX bf16 x rows (xb + i * Kp), each pair
 * summed exactly as row_dpbf16 sums it (bitwise the same y as alone) */
static inline __attribute__((always_inline)) void tile_dpbf16(const uint16_t *xb, int64_t Kp, const uint16_t *w,
                                                              float *y, int nx, int64_t N, int64_t K) {
    __m512 a0[NX][NR], a1[NX][NR];
#define TILE_STEP(acc, XLOAD, WLOAD)                                                       \
    do {                                                                                   \
        __m512bh xv[NX];                                                                   \
        _Pragma("GCC unroll 4") for (int i = 0; i < nx; i++) { xv[i] = (__m512bh)XLOAD; KEEP(xv[i]); } \
        _Pragma("GCC unroll 4") for (int j = 0; j < NR; j++) {                             \
            __m512bh wv = (__m512bh)WLOAD;                                                 \
            KEEP(wv);                                                                      \
            _Pragma("GCC unroll 4") for (int i = 0; i < nx; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv[i]); \
        }                                                                                  \
    } while (0)
#pragma GCC unroll 4
    for (int i = 0; i < nx; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++) a0[i][j] = a1[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        TILE_STEP(a0, _mm512_loadu_si512((const void *)(xb + i * Kp + k)),
                  _mm512_loadu_si512((const void *)(w + j * K + k)));
        TILE_STEP(a1, _mm512_loadu_si512((const void *)(xb + i * Kp + k + 32)),
                  _mm512_loadu_si512((const void *)(w + j * K + k + 32)));
    }
    for (; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
        TILE_STEP(a0, _mm512_loadu_si512((const void *)(xb + i * Kp + k)), _mm512_maskz_loadu_epi16(mk, w + j * K + k));
    }
#undef TILE_STEP
#pragma GCC unroll 4
    for (int i = 0; i < nx; i++) reduce4(a0[i], a1[i], y + i * N);
}

/* block_f32x for vdpbf16ps (x rows xb, row stride Kp) */
static void block_dpbf16(const uint16_t *xb, int64_t Kp, const uint16_t *w, float *y, int nr, int64_t M,
                         int64_t N, int64_t K) {
    int64_t m = 1;
    for (int i = 0; i < nr; i++) y[i] = row_dpbf16(xb, w + i * K, K);
    if (nr == NR) {
        prefetch_t pf = prefetch_start((const char *)(w + NR * K), NR * K * 2, M);
        for (; m + NX <= M; m += NX) {
            prefetch_some(&pf);
            tile_dpbf16(xb + m * Kp, Kp, w, y + m * N, NX, N, K);
        }
        if (M - m == 2) tile_dpbf16(xb + m * Kp, Kp, w, y + m * N, 2, N, K);
        if (M - m == 1) tile_dpbf16(xb + m * Kp, Kp, w, y + m * N, 1, N, K);
        return;
    }
    for (; m < M; m++)
        for (int i = 0; i < nr; i++) y[m * N + i] = row_dpbf16(xb + m * Kp, w + i * K, K);
}
#endif

#if defined(SLIMLM_DPBF16) && defined(SLIMLM_AMX)
/* Kind 2 on AMX tiles (TDPBF16PS), W read in place: y^T (N, M) = W (N, K) @ xb^T, so W, row-major
 * (N, K) bf16, is the A operand as it lies (a tile = 16 W rows x 32 k, row stride 2K bytes) and the
 * few x rows are the B operand, re-laid once per call in the VNNI layout TDPBF16PS wants (per pair
 * of k, 16 x rows side by side: xp[chunk][K/2][16][2], rows past M zero). No packed copy of the
 * weights: nothing resident is added, and PyTorch's prefill keeps reading the same tensor.
 * Blocks of AMX_NB = 32 W rows (two A tiles) against chunks of 16 x rows (one B tile each, two at a
 * time): four C tiles (32 W rows x 32 x rows) from four TDPBF16PS per 32 k. Every output
 * y[m][n] is one fp32 accumulator summed over k in pair order (per 32 k one tile op), the same at
 * any M (zero x rows only add C columns), so a row's y is bitwise the same at M = 1 as at M = 64:
 * batch invariance, which is why M = 1 takes the tiles too (bound by W's DRAM stream either way:
 * batch-1 steps measured at par with the AVX-512 loops). No AVX-512 loop could stand in for the
 * tiles at M = 1: TDPBF16PS does not round as vdpbf16ps does (a lane per output, the same pairs in
 * the same order: 73 % of outputs differ in their last bits at K = 576, 10 % after one tile op),
 * nor as fp32 adds of the exact products, nor exact pair sums, nor one rounding per tile op
 * (docs/results/raw/amx_rounding.c). Taken where K is a multiple of 32 and N >= 32 (the last block starts at N - 32, recomputing
 * a few rows of the one before with the same arithmetic); otherwise the AVX-512 kind 2 above. */
#define AMX_NB 32

/* x row m (row stride K) into xp's VNNI layout, rounded to bf16 as kind 2 rounds it (bf16x16);
 * xb16: scratch for one row (K) */
static void amx_pack_x(const float *x, uint16_t *xp, uint16_t *xb16, int64_t m, int64_t K) {
    uint32_t *dst = (uint32_t *)xp + (m / 16) * (K / 2) * 16 + m % 16;
    to_bf16_row(x + m * K, xb16, K, K);
    const uint32_t *pairs = (const uint32_t *)xb16;
    for (int64_t p = 0; p < K / 2; p++) dst[p * 16] = pairs[p];
}

/* Rows n0..n0+31 of W against the M x rows of xp into y (M, N), rows below n0 + r0 not written
 * (the last block overlaps the one before: each y written by one thread). */
static void amx_block(const uint16_t *w, const uint16_t *xp, float *y, int64_t n0, int r0, int64_t M, int64_t N,
                      int64_t K) {
    const int64_t kt = K / 32, ws = 2 * K, chunk = K / 2 * 32; /* uint16 per x chunk */
    const uint16_t *a0 = w + n0 * K, *a1 = a0 + 16 * K;
    float c[4][16 * 16] __attribute__((aligned(64)));
    const char *pf = (const char *)(a0 + AMX_NB * K), *pf_end = pf + AMX_NB * ws; /* the next block */
    const int64_t pf_step = (AMX_NB * ws / 64 + kt - 1) / kt * 64;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const uint16_t *b0 = xp + (m0 / 16) * chunk, *b1 = b0 + chunk;
        const int two = M - m0 > 16;
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t t = 0; t < kt; t++) {
            if (m0 == 0) { /* a share of the next block's lines into L2 per tile step */
                const char *stop = pf + pf_step < pf_end ? pf + pf_step : pf_end;
                for (; pf < stop; pf += 64) __builtin_prefetch(pf, 0, 2);
            }
            _tile_loadd(4, a0 + t * 32, ws);
            _tile_loadd(5, a1 + t * 32, ws);
            _tile_loadd(6, b0 + t * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            if (two) {
                _tile_loadd(7, b1 + t * 512, 64);
                _tile_dpbf16ps(2, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        if (two) {
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
        }
        /* c[2 h + i][r][j] = y[m0 + 16 h + j][n0 + 16 i + r]: a column of a C tile is a piece of a y row
         * (gathered, 16 at a time; rows below r0 masked off) */
        const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(16));
        const __mmask16 keep0 = (__mmask16)(0xffffu << (r0 < 16 ? r0 : 16)), keep1 = (__mmask16)(0xffffu << (r0 > 16 ? r0 - 16 : 0));
        for (int h = 0; h < 1 + two; h++) {
            const int64_t mb = m0 + 16 * h, nm = M - mb < 16 ? M - mb : 16;
            for (int64_t j = 0; j < nm; j++) {
                float *yr = y + (mb + j) * N + n0;
                _mm512_mask_storeu_ps(yr, keep0, _mm512_i32gather_ps(col, c[2 * h] + j, 4));
                _mm512_mask_storeu_ps(yr + 16, keep1, _mm512_i32gather_ps(col, c[2 * h + 1] + j, 4));
            }
        }
    }
}

static int amx_linear(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t nchunk = (M + 15) / 16; /* 16 x rows each; the last one's rows past M zero */
    uint16_t *xp = xb_scratch((size_t)((nchunk * 16 + 1) * K));
    if (!xp) return 2;
    if (M % 16) memset(xp + M / 16 * 16 * K, 0, sizeof(uint16_t) * (size_t)(16 * K));
    for (int64_t m = 0; m < M; m++) amx_pack_x(x, xp, xp + nchunk * 16 * K, m, K); /* M * K: cheap next to N * M * K */
    const int64_t nblk = (N + AMX_NB - 1) / AMX_NB;
#pragma omp parallel num_threads(nthreads)
    {
        static const int tr[8] = {16, 16, 16, 16, 16, 16, 16, 16}, tc[8] = {64, 64, 64, 64, 64, 64, 64, 64};
        amx_configure(8, tr, tc); /* per thread: the tile registers are */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblk; b++) {
            const int64_t n0 = b * AMX_NB + AMX_NB <= N ? b * AMX_NB : N - AMX_NB;
            amx_block(w, xp, y, n0, (int)(b * AMX_NB - n0), M, N, K);
        }
        _tile_release();
    }
    return 0;
}
#endif

int slimlm_dense_has_amx(void) {
#if defined(SLIMLM_DPBF16) && defined(SLIMLM_AMX)
    return amx_ready();
#else
    return 0;
#endif
}

int slimlm_dense_linear(const float *x, const void *w, int kind, float *y, int64_t M, int64_t N, int64_t K,
                        int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || kind < 0 || kind > 2) return 1;
    const int64_t nblk = (N + NR - 1) / NR;
    if (kind == 2) {
#ifndef SLIMLM_DPBF16
        return 3;
#else
#ifdef SLIMLM_AMX
        if (K % 32 == 0 && N >= AMX_NB && amx_ready()) return amx_linear(x, w, y, M, N, K, nthreads);
#endif
        const int64_t Kp = (K + 31) / 32 * 32;
        uint16_t *xb = xb_scratch((size_t)(M * Kp));
        if (!xb) return 2;
        const uint16_t *wb = w;
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) to_bf16_row(x + m * K, xb + m * Kp, K, Kp);
#pragma omp for schedule(static)
            for (int64_t b = 0; b < nblk; b++) {
                const int64_t n0 = b * NR;
                block_dpbf16(xb, Kp, wb + n0 * K, y + n0, (int)(N - n0 < NR ? N - n0 : NR), M, N, K);
            }
        }
        return 0;
#endif
    }
    const size_t es = kind == 1 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t n0 = b * NR;
        block_f32x(x, (const char *)w + (size_t)n0 * K * es, kind == 1, y + n0, (int)(N - n0 < NR ? N - n0 : NR), M,
                   N, K);
    }
    return 0;
}
