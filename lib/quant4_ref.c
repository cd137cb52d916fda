/*
 * Scalar reference of 4-bit blockwise quantization and double quantization (lib/quant4.h),
 * written to be read: one element at a time, in the order of the canonical rules. The fast
 * kernels and the CUDA kernels are tested against these functions byte for byte.
 */
#include "half.h"
#include "quant4.h"

#include <math.h>

static float load_f32(const void *x, qlora_dtype dtype, int64_t i) {
    switch (dtype) {
    case QLORA_F16: return ql_f16_to_f32(((const uint16_t *)x)[i]);
    case QLORA_BF16: return ql_bf16_to_f32(((const uint16_t *)x)[i]);
    default: return ((const float *)x)[i];
    }
}

static void store_f32(void *out, qlora_dtype dtype, int64_t i, float v) {
    switch (dtype) {
    case QLORA_F16: ((uint16_t *)out)[i] = ql_f32_to_f16(v); break;
    case QLORA_BF16: ((uint16_t *)out)[i] = ql_f32_to_bf16(v); break;
    default: ((float *)out)[i] = v; break;
    }
}

/* The 4-bit code of one normalized value v (in [-1, 1] up to rounding). */
static uint8_t quantize_value(float v, qlora_quant_type type) {
    if (type == QLORA_QUANT_NF4) {
        uint8_t code = 0;
        for (int t = 0; t < 15; t++)
            if (v > ql_nf4_thresholds[t])
                code++;
        return code;
    }
    float magnitude = fabsf(v);
    int bucket = 0;
    for (int t = 0; t < 7; t++)
        if (magnitude > ql_fp4_thresholds[t])
            bucket++;
    uint8_t sign = v < 0.0f ? 8 : 0;
    return (uint8_t)(sign | ql_fp4_bucket_code[bucket]);
}

static void put_nibble(uint8_t *codes, int64_t i, uint8_t code) {
    if (i % 2 == 0)
        codes[i / 2] = (uint8_t)(code << 4);
    else
        codes[i / 2] |= code;
}

/* max |x| over x[begin, end) into *amax; returns the index of the first non-finite element, or -1. */
static int64_t block_absmax(const void *x, qlora_dtype dtype, int64_t begin, int64_t end, float *amax) {
    *amax = 0.0f;
    for (int64_t i = begin; i < end; i++) {
        float v = load_f32(x, dtype, i);
        if (!isfinite(v))
            return i;
        if (fabsf(v) > *amax)
            *amax = fabsf(v);
    }
    return -1;
}

int64_t ql_block_absmax_ref(const void *x, qlora_dtype dtype, int64_t n, int blocksize, float *absmax) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t begin = b * blocksize;
        int64_t bad = block_absmax(x, dtype, begin, begin + blocksize < n ? begin + blocksize : n, &absmax[b]);
        if (bad >= 0)
            return bad;
    }
    return -1;
}

int64_t ql_quant4_ref(const void *x, qlora_dtype dtype, int64_t n, int blocksize, qlora_quant_type type,
                      uint8_t *codes, float *absmax) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t begin = b * blocksize;
        int64_t end = begin + blocksize < n ? begin + blocksize : n;
        float amax;
        int64_t bad = block_absmax(x, dtype, begin, end, &amax);
        if (bad >= 0)
            return bad;
        absmax[b] = amax;
        float scale = amax > 0.0f ? 1.0f / amax : 0.0f;
        for (int64_t i = begin; i < end; i++) {
            uint8_t code = amax > 0.0f ? quantize_value(load_f32(x, dtype, i) * scale, type)
                                       : ql_quant4_zero_code(type);
            put_nibble(codes, i, code);
        }
    }
    if (n % 2 == 1)
        put_nibble(codes, n, ql_quant4_zero_code(type));
    return -1;
}

void ql_dequant4_ref(const uint8_t *codes, const float *absmax, const float code[16], int64_t n, int blocksize,
                     void *out, qlora_dtype out_dtype) {
    for (int64_t i = 0; i < n; i++) {
        uint8_t byte = codes[i / 2];
        uint8_t nibble = i % 2 == 0 ? byte >> 4 : byte & 0x0f;
        store_f32(out, out_dtype, i, code[nibble] * absmax[i / blocksize]);
    }
}

float ql_absmax_mean_ref(const float *absmax, int64_t nblocks) {
    if (nblocks == 0)
        return 0.0f;
    double total = 0.0;
    for (int64_t chunk = 0; chunk < nblocks; chunk += QL_DQ_SUM_CHUNK) {
        int64_t end = chunk + QL_DQ_SUM_CHUNK < nblocks ? chunk + QL_DQ_SUM_CHUNK : nblocks;
        double chunk_sum = 0.0;
        for (int64_t i = chunk; i < end; i++)
            chunk_sum += absmax[i];
        total += chunk_sum;
    }
    return (float)(total / (double)nblocks);
}

float ql_double_quant_ref(const float *absmax, int64_t nblocks, const float dyn[256], uint8_t *qabsmax,
                          float *nested) {
    if (nblocks == 0)
        return 0.0f;
    float offset = ql_absmax_mean_ref(absmax, nblocks);
    for (int64_t g = 0; g * QLORA_NESTED_BLOCKSIZE < nblocks; g++) {
        int64_t begin = g * QLORA_NESTED_BLOCKSIZE;
        int64_t end = begin + QLORA_NESTED_BLOCKSIZE < nblocks ? begin + QLORA_NESTED_BLOCKSIZE : nblocks;
        float amax = 0.0f;
        for (int64_t i = begin; i < end; i++)
            if (fabsf(absmax[i] - offset) > amax)
                amax = fabsf(absmax[i] - offset);
        nested[g] = amax;
        float scale = amax > 0.0f ? 1.0f / amax : 0.0f;
        for (int64_t i = begin; i < end; i++)
            qabsmax[i] = ql_dynamic_map_nearest(dyn, (absmax[i] - offset) * scale);
    }
    return offset;
}

void ql_double_dequant_ref(const uint8_t *qabsmax, const float *nested, float offset, const float dyn[256],
                           int64_t nblocks, float *absmax) {
    for (int64_t i = 0; i < nblocks; i++) {
        float scaled = dyn[qabsmax[i]] * nested[i / QLORA_NESTED_BLOCKSIZE];
        absmax[i] = scaled + offset;
    }
}

/* bitsandbytes' 8-bit search (dQuantize): seven halving steps from the middle entry, then the
 * final pivot or the neighbour on x's side, whichever x is nearer to; a value exactly on the
 * midpoint of the two stays on the pivot. */
uint8_t ql_dynamic_map_nearest(const float dyn[256], float x) {
    int pivot = 127, lower_pivot = 0, upper_pivot = 255;
    for (int step = 64; step > 0; step /= 2) {
        if (x > dyn[pivot]) {
            lower_pivot = pivot;
            pivot += step;
        } else {
            upper_pivot = pivot;
            pivot -= step;
        }
    }
    float value = dyn[pivot];
    if (x > value) {
        float midpoint = (dyn[upper_pivot] + value) * 0.5f;
        return (uint8_t)(x > midpoint ? upper_pivot : pivot);
    }
    float midpoint = (dyn[lower_pivot] + value) * 0.5f;
    return (uint8_t)(x < midpoint ? lower_pivot : pivot);
}
