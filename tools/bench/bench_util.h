/* What every qlora-bench measurement shares: the clock, the median, seeded inputs. */
#ifndef QLORA_BENCH_UTIL_H
#define QLORA_BENCH_UTIL_H

#include <stdint.h>

/* Seconds on the monotonic clock. */
double bench_now_s(void);
/* The median of t[n] (n >= 1); sorts t. */
double bench_median(double *t, int n);
/* splitmix64: the inputs of a run are the same every time. */
uint64_t bench_rng_next(uint64_t *state);
/* Uniform in [-scale, scale). */
float bench_uniform(uint64_t *state, float scale);

#endif
