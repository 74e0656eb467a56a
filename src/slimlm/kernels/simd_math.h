/* Vector math the kernels share (included by paged_prefill.c, sparse_prefill.c and decode_layer.c).
 * Header-only and static inline; compiled only where the including kernel has AVX-512. */
#ifndef SLIMLM_SIMD_MATH_H
#define SLIMLM_SIMD_MATH_H

#ifdef __AVX512F__
#include <immintrin.h>

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

/* 2^x for x <= 0, relative error ~2e-7 (as exp512 above): 2^n * p(f), f = x - n in [-1/2, 1/2], p a
 * degree-5 least-squares fit of 2^f. A softmax folds its scale and log2(e) into one FMA before it
 * (paged_prefill.c). */
static inline __attribute__((always_inline)) __m512 exp2_512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.3266970636e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6754599362e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507425219e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022121727e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694405e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192f));
    return _mm512_scalef_ps(p, n);
}
#endif

#endif
