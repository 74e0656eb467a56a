/* Vector FMA rate of one thread: 12 independent zmm FMA chains (docs/benchmarks.md, "session 12:
 * decode attention at memory speed"). cc -O2 -march=native fma_rate.c -o /tmp/fr && /tmp/fr */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(){
  __m512 a[12]; for(int i=0;i<12;i++) a[i]=_mm512_set1_ps(i*1e-3f);
  const __m512 b=_mm512_set1_ps(0.999f), c=_mm512_set1_ps(1e-4f);
  struct timespec t0,t1; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t0);
  long N=200000000;
  for(long n=0;n<N;n++){ for(int i=0;i<12;i++) a[i]=_mm512_fmadd_ps(a[i],b,c); __asm__ volatile("" :: "v"(a[0]));}
  clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t1);
  double s=(t1.tv_sec-t0.tv_sec)+1e-9*(t1.tv_nsec-t0.tv_nsec);
  float r=0; for(int i=0;i<12;i++) r+=_mm512_reduce_add_ps(a[i]);
  printf("%.2f G zmm FMA/s (%f)\n", 12.0*N/s/1e9, r);
}
