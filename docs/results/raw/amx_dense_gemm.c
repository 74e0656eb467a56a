/* kernels/dense_linear.c's kind 2 (bf16 W, x rounded to bf16) at one shape with W in cache: the
 * AVX-512 vdpbf16ps loops (SLIMLM_AMX=0) against the AMX tiles, same process, 1 thread, CPU time
 * per call (docs/benchmarks.md, "session 12: AMX decode projections").
 *
 *   cc -O3 -march=native -fopenmp -std=c11 -Isrc/slimlm/kernels docs/results/raw/amx_dense_gemm.c \
 *      -o /tmp/amx_gemm -lm && for M in 1 16 32 64; do /tmp/amx_gemm $M 576 576 2000; done
 */
#include <stdio.h>
#include <time.h>
#include "dense_linear.c"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

extern int setenv(const char *, const char *, int);

int main(int argc, char **argv) {
    if (argc < 5) return 1;
    const int64_t M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]);
    const int reps = atoi(argv[4]);
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N);
    uint16_t *w = aligned_alloc(64, (size_t)(2 * N * K + 63) / 64 * 64);
    for (int64_t i = 0; i < M * K; i++) x[i] = (float)(i % 7) - 3;
    for (int64_t i = 0; i < N * K; i++) w[i] = f32_to_bf16((float)(i % 5) - 2);
    for (int a = 0; a < 2; a++) {
        setenv("SLIMLM_AMX", a ? "1" : "0", 1);
        if (slimlm_dense_linear(x, w, 2, y, M, N, K, 1)) return 2;
        const double t0 = now();
        for (int r = 0; r < reps; r++) slimlm_dense_linear(x, w, 2, y, M, N, K, 1);
        const double t = (now() - t0) / reps;
        printf("%s M=%ld N=%ld K=%ld: %.1f us, %.0f GFLOPS\n", a && slimlm_dense_has_amx() ? "amx   " : "avx512",
               (long)M, (long)N, (long)K, t * 1e6, 2.0 * M * N * K / t / 1e9);
    }
    return 0;
}
