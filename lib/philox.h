/*
 * Philox4x32-10, the counter-based RNG (Salmon et al., SC'11), shared by the C and CUDA code so
 * that LoRA dropout masks are identical on every backend: element i of a mask drawn with
 * (seed, stream) keeps its value iff uniform(seed, stream, i) >= p, with
 *   uniform = (philox(key = seed, counter = {(i/4) lo32, stream lo32, stream hi32, (i/4) hi32})[i % 4] >> 8)
 *             * 2^-24.
 * No state: any element can be generated independently, in any order, on any device.
 */
#ifndef QLORA_PHILOX_H
#define QLORA_PHILOX_H

#include <stdint.h>

#if defined(__CUDACC__)
#define QL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QL_HOST_DEVICE static inline
#endif

typedef struct ql_philox_out {
    uint32_t v[4];
} ql_philox_out;

QL_HOST_DEVICE void ql_philox_mulhilo(uint32_t a, uint32_t b, uint32_t *hi, uint32_t *lo) {
    uint64_t p = (uint64_t)a * b;
    *hi = (uint32_t)(p >> 32);
    *lo = (uint32_t)p;
}

QL_HOST_DEVICE ql_philox_out ql_philox4x32(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; round++) {
        uint32_t hi0, lo0, hi1, lo1;
        ql_philox_mulhilo(0xD2511F53u, c0, &hi0, &lo0);
        ql_philox_mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    ql_philox_out o;
    o.v[0] = c0;
    o.v[1] = c1;
    o.v[2] = c2;
    o.v[3] = c3;
    return o;
}

/* Uniform float in [0, 1) with 24 random bits for element `index` of stream `stream`. */
QL_HOST_DEVICE float ql_philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
    ql_philox_out o = ql_philox4x32(seed, (uint32_t)(index >> 2), (uint32_t)stream, (uint32_t)(stream >> 32),
                                    (uint32_t)(index >> 34));
    return (float)(o.v[index & 3] >> 8) * 5.9604644775390625e-8f;
}

#endif
