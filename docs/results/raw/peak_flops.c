/* Peak FLOPS of this CPU: 24 independent zmm accumulator chains of FMA (fp32) or vdpbf16ps (bf16),
 * no memory operands, per OpenMP thread. Prints wall-clock GFLOPS and GFLOPS per CPU-second x threads
 * (the latter holds on a loaded machine). docs/benchmarks.md, "session 10, this machine".
 *   cc -O3 -march=native -fopenmp docs/results/raw/peak_flops.c -o /tmp/peak && /tmp/peak 1 && /tmp/peak 2 */
#include <immintrin.h>
#include <stdio.h>
#include <omp.h>
#include <time.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    long iters = 200000000L / 24;
    int nt = argc > 1 ? atoi(argv[1]) : 1;
    for (int kind = 0; kind < 2; kind++) {
        double t0 = omp_get_wtime(); clock_t c0 = clock();
        float sink = 0;
#pragma omp parallel num_threads(nt) reduction(+:sink)
        {
            __m512 acc[24];
            for (int i = 0; i < 24; i++) acc[i] = _mm512_set1_ps(i * 1e-9f);
            __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
            for (long it = 0; it < iters; it++) {
                if (kind == 0) {
#pragma GCC unroll 24
                    for (int i = 0; i < 24; i++) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
                } else {
#pragma GCC unroll 24
                    for (int i = 0; i < 24; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
                }
                __asm__ volatile("" : "+v"(a));
            }
            for (int i = 0; i < 24; i++) sink += _mm512_reduce_add_ps(acc[i]);
        }
        double t = omp_get_wtime() - t0; double tc = (double)(clock() - c0) / CLOCKS_PER_SEC / nt;
        double flops = (double)iters * 24 * (kind == 0 ? 32 : 64) * nt;
        printf("%s threads=%d: %.1f GFLOPS wall, %.1f GFLOPS per cpu-second x threads %g\n", kind ? "dpbf16" : "fma32", nt, flops / t / 1e9, flops / tc / 1e9, sink);
    }
}
