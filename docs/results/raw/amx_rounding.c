/* Does an AVX-512 loop give TDPBF16PS's bits? (docs/benchmarks.md, "session 12: AMX decode
 * projections": why batch 1 takes the AMX tiles too.) Random bf16 A (16 x K) and B (16 x K),
 * C = A B^T by AMX tiles (one tile op per 32 k, one C tile), against four AVX-512 / scalar
 * candidates for the same per-output order (k pairs, first to last):
 *   dpbf16  vdpbf16ps, a lane per output, the k pair of x broadcast (the order the tiles sum in)
 *   seq     fp32 adds of the exact products, even then odd of each pair
 *   pair    each pair's two products summed exactly, rounded to fp32, then added
 *   tile    each tile op's 32 products summed exactly (double), then one rounding into C
 * and counts the outputs whose bits differ. Values uniform in [-2, 2) (no denormals).
 *
 *   cc -O2 -march=native -std=c11 -ffp-contract=off -Isrc/slimlm/kernels \
 *      docs/results/raw/amx_rounding.c -o /tmp/amx_rounding -lm && /tmp/amx_rounding 576 100
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "amx.h"
#include "kv_pool.h"

int main(int argc, char **argv) {
    const int K = argc > 1 ? atoi(argv[1]) : 576, trials = argc > 2 ? atoi(argv[2]) : 100;
    if (K % 32 || !amx_ready()) {
        printf("K must be a multiple of 32 and AMX available\n");
        return 1;
    }
    uint16_t *A = aligned_alloc(64, 32 * K), *Bt = aligned_alloc(64, 32 * K), *Bv = aligned_alloc(64, 32 * K);
    static const int tr[8] = {16, 16, 16, 16, 16, 16, 16, 16}, tc[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    amx_configure(8, tr, tc);
    srand(1);
    long diff[4] = {0}, tot = 0;
    for (int tt = 0; tt < trials; tt++) {
        for (int i = 0; i < 16 * K; i++) {
            A[i] = f32_to_bf16((rand() / (float)RAND_MAX - 0.5f) * 4.f);
            Bt[i] = f32_to_bf16((rand() / (float)RAND_MAX - 0.5f) * 4.f);
        }
        for (int p = 0; p < K / 2; p++) /* VNNI: Bv[p][n][2] = B[n][2p], B[n][2p + 1] */
            for (int n = 0; n < 16; n++) memcpy(Bv + (p * 16 + n) * 2, Bt + n * K + 2 * p, 4);
        float c[256] __attribute__((aligned(64)));
        _tile_zero(0);
        for (int t = 0; t < K / 32; t++) {
            _tile_loadd(4, A + t * 32, 2 * K);
            _tile_loadd(6, Bv + t * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
        }
        _tile_stored(0, c, 64);
        for (int r = 0; r < 16; r++) {
            float v[4][16];
            __m512 acc = _mm512_setzero_ps();
            for (int p = 0; p < K / 2; p++) {
                uint32_t ap;
                memcpy(&ap, A + r * K + 2 * p, 4);
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(Bv + p * 32), (__m512bh)_mm512_set1_epi32(ap));
            }
            _mm512_storeu_ps(v[0], acc);
            for (int n = 0; n < 16; n++) {
                const uint16_t *a = A + r * K, *b = Bt + n * K;
                float s1 = 0.f, s2 = 0.f, s3 = 0.f;
                for (int k = 0; k < K; k += 2) {
                    volatile float t1 = s1 + bf16_to_f32(a[k]) * bf16_to_f32(b[k]);
                    volatile float t2 = t1 + bf16_to_f32(a[k + 1]) * bf16_to_f32(b[k + 1]);
                    s1 = t2;
                    volatile float pr = (float)((double)bf16_to_f32(a[k]) * bf16_to_f32(b[k]) +
                                                (double)bf16_to_f32(a[k + 1]) * bf16_to_f32(b[k + 1]));
                    volatile float t3 = s2 + pr;
                    s2 = t3;
                }
                for (int t = 0; t < K / 32; t++) {
                    double d = 0;
                    for (int k = 32 * t; k < 32 * t + 32; k++) d += (double)bf16_to_f32(a[k]) * bf16_to_f32(b[k]);
                    s3 = (float)((double)s3 + d);
                }
                v[1][n] = s1, v[2][n] = s2, v[3][n] = s3;
                tot++;
                for (int j = 0; j < 4; j++) diff[j] += memcmp(&v[j][n], &c[r * 16 + n], 4) != 0;
            }
        }
    }
    _tile_release();
    printf("K = %d, %ld outputs: differ from TDPBF16PS: dpbf16 %.1f %%, seq %.1f %%, pair %.1f %%, tile %.1f %%\n", K, tot,
           100.0 * diff[0] / tot, 100.0 * diff[1] / tot, 100.0 * diff[2] / tot, 100.0 * diff[3] / tot);
    return 0;
}
