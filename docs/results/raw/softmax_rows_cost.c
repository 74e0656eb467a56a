/* What paged_decode.c's softmax_rows (scalar expf: glibc has no vector expf without -ffast-math,
 * so `omp simd` leaves a call per score) costs per (row, layer) of a decode step, against the
 * same softmax on simd_math.h's exp512: Hq = 9 heads x L = 959 keys (SmolLM2-135M, the
 * throughput workload's mean context). CPU time of this thread, mean of N repeats.
 *   cc -O3 -march=native -fopenmp -std=c11 docs/results/raw/softmax_rows_cost.c -o /tmp/smc -lm && /tmp/smc */
#include <stdio.h>
#include <time.h>
#include "../../../src/slimlm/kernels/paged_decode.c"
#include "../../../src/slimlm/kernels/simd_math.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void softmax_exp512(float *s, int64_t Hq, int64_t L) {
    for (int64_t hq = 0; hq < Hq; ++hq) {
        float *sg = s + hq * L, m = -INFINITY;
        for (int64_t t = 0; t < L; ++t) m = sg[t] > m ? sg[t] : m;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t t = 0; t < L; t += 16) {
            const __mmask16 mk = L - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - t)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sg + t), _mm512_set1_ps(m)));
            _mm512_mask_storeu_ps(sg + t, mk, e);
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mk, e));
        }
        const float inv = 1.f / _mm512_reduce_add_ps(acc);
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
    }
}

int main(void) {
    const int64_t Hq = 9, L = 959, N = 20000;
    float *s = malloc(sizeof(float) * Hq * L), *s0 = malloc(sizeof(float) * Hq * L), chk = 0.f;
    for (int64_t i = 0; i < Hq * L; i++) s0[i] = (float)((i * 7919) % 1000) / 100.f - 5.f;
    double t[3] = {0};
    for (int v = 0; v < 3; v++) {
        const double c = now();
        for (int64_t r = 0; r < N; r++) {
            memcpy(s, s0, sizeof(float) * Hq * L);
            if (v == 1) softmax_rows(s, Hq, L);
            if (v == 2) softmax_exp512(s, Hq, L);
            chk += s[r % (Hq * L)];
        }
        t[v] = (now() - c) / N * 1e6;
    }
    printf("per (row, layer), %ldx%ld scores: softmax_rows (expf) %.1f us, on exp512 %.1f us (copy %.1f us "
           "included in both) [%g]\n", Hq, L, t[1], t[2], t[0], chk);
    return 0;
}
