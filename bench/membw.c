// The rate at which N threads read memory: each reads its share of a
// 512 MiB buffer with AVX-512 loads; the best of 10 passes is printed.
// The ceiling of batch-1 decode, which reads every weight once a token.
//
//   gcc -O2 -mavx512f -pthread bench/membw.c -o /tmp/membw && /tmp/membw 2
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (512UL << 20)

static char *buf;
static long threads;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
  size_t share = BYTES / threads;
  const __m512i *p = (const __m512i *)(buf + (long)arg * share);
  __m512i sum = _mm512_setzero_si512();
  for (size_t i = 0; i < share / 64; i += 4) {
    sum = _mm512_add_epi64(sum, _mm512_load_si512(p + i));
    sum = _mm512_add_epi64(sum, _mm512_load_si512(p + i + 1));
    sum = _mm512_add_epi64(sum, _mm512_load_si512(p + i + 2));
    sum = _mm512_add_epi64(sum, _mm512_load_si512(p + i + 3));
  }
  // Returned, so that the loads are not dropped.
  return (void *)(long)_mm512_reduce_add_epi64(sum);
}

int main(int argc, char **argv) {
  threads = argc > 1 ? atol(argv[1]) : 1;
  if (threads < 1 || threads > 64) return 1;
  buf = aligned_alloc(64, BYTES);
  memset(buf, 1, BYTES);
  double best = 1e9;
  pthread_t t[64];
  for (int pass = 0; pass < 10; pass++) {
    double start = now();
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, reader, (void *)i);
    for (long i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double took = now() - start;
    if (took < best) best = took;
  }
  printf("%ld threads: %.1f GB/s\n", threads, BYTES / best / 1e9);
  return 0;
}
