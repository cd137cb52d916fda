/*
 * float <-> bf16 / f16 conversions, round-to-nearest-even, matching CUDA's __float2bfloat16_rn
 * and __float2half_rn bit for bit (NaN stays NaN; overflow to F16 gives Inf; subnormals handled).
 */
#ifndef QLORA_HALF_H
#define QLORA_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint32_t ql_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float ql_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float ql_bf16_to_f32(uint16_t h) { return ql_bits_f32((uint32_t)h << 16); }

static inline uint16_t ql_f32_to_bf16(float f) {
    uint32_t u = ql_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign, force a quiet mantissa bit */
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float ql_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) /* Inf / NaN */
        return ql_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return ql_bits_f32(sign);
        /* subnormal: value = man * 2^-24, exact in float32 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return ql_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t ql_f32_to_f16(float f) {
    uint32_t u = ql_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
    if (abs >= 0x477ff000u) /* >= 65520 rounds to Inf (and Inf stays Inf) */
        return (uint16_t)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* below the smallest normal 2^-14: subnormal or zero */
        if (abs < 0x33000000u) /* < 2^-25: rounds to zero (2^-25 exactly ties to even = 0) */
            return sign;
        uint32_t exp = abs >> 23;
        uint32_t man = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exp; /* bits to drop so that 1 ulp = 2^-24 */
        uint32_t half = 1u << (shift - 1);
        uint32_t rest = man & ((1u << shift) - 1u);
        uint32_t r = man >> shift;
        if (rest > half || (rest == half && (r & 1u)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = abs - 0x38000000u; /* rebias exponent 127 -> 15 */
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

#endif
