/*
 * The deterministic random numbers of qlora-ft's data module: splitmix64 (Steele, Lea, Flood,
 * "Fast splittable pseudorandom number generators", 2014), one independent stream per
 * (seed, stream) pair, so a shuffle depends only on its seed and its purpose (an epoch, the
 * eval split), never on what was drawn before.
 */
#ifndef QLORA_FT_RNG_H
#define QLORA_FT_RNG_H

#include <stdint.h>

typedef struct ft_rng {
    uint64_t state;
} ft_rng;

static inline uint64_t ft_rng_next(ft_rng *r) {
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The generator of stream `stream` under `seed`: the seed is mixed once so that nearby seeds
 * and nearby streams start far apart. */
static inline ft_rng ft_rng_stream(uint64_t seed, uint64_t stream) {
    ft_rng r = {seed};
    r.state = ft_rng_next(&r) ^ (stream * 0xD1B54A32D192ED03ull);
    (void)ft_rng_next(&r);
    return r;
}

/* Uniform in [0, n), n >= 1, without modulo bias: draws below 2^64 mod n are rejected. */
static inline uint64_t ft_rng_below(ft_rng *r, uint64_t n) {
    uint64_t reject = (0 - n) % n, x;
    do
        x = ft_rng_next(r);
    while (x < reject);
    return x % n;
}

/* Fisher-Yates shuffle of v[n]. */
static inline void ft_shuffle(int64_t *v, int64_t n, ft_rng *r) {
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)ft_rng_below(r, (uint64_t)i + 1);
        int64_t t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

/* Streams of the module (epochs use their own number as the stream). */
#define FT_STREAM_SPLIT 0x5EED5B1170000000ull

#endif
