/*
 * Fast host kernels for 4-bit quantization (lib/quant4.h): OpenMP over blocks, branch-free
 * inner loops the compiler vectorises, and per-block lookup tables for decoding. They perform
 * the same float32 operations as lib/quant4_ref.c in the same order, so the bytes are identical.
 */
#include "half.h"
#include "quant4.h"
#include "simd_attrs.h"

#include <math.h>
#include <omp.h>
#include <string.h>

/* Below this many elements a parallel region costs more than it saves. */
#define QL_PARALLEL_MIN_ELEMENTS (1 << 16)

static int thread_count(int num_threads) { return num_threads > 0 ? num_threads : omp_get_max_threads(); }

/* f16 -> f32 for finite inputs without branches: the 15 magnitude bits shifted into float32
 * position read as a float 2^112 times too small (normals and subnormals alike), and the
 * multiply by 2^112 is exact. Equals ql_f16_to_f32 on every finite input. */
QL_INLINE float f16_finite_to_f32(uint16_t h) {
    float magnitude = ql_bits_f32((uint32_t)(h & 0x7fffu) << 13) * 0x1p112f;
    return ql_bits_f32(ql_f32_bits(magnitude) | ((uint32_t)(h & 0x8000u) << 16));
}

QL_INLINE float load_f32(const void *x, qlora_dtype dtype, int64_t i) {
    if (dtype == QLORA_F32)
        return ((const float *)x)[i];
    if (dtype == QLORA_BF16)
        return ql_bf16_to_f32(((const uint16_t *)x)[i]);
    return f16_finite_to_f32(((const uint16_t *)x)[i]);
}

/* Largest magnitude bit pattern of x[begin, end): the order of |x| as unsigned integers is the
 * order of the values, and every NaN/Inf pattern is at or above the infinity pattern. */
QL_INLINE uint32_t max_magnitude_bits(const void *x, qlora_dtype dtype, int64_t begin, int64_t end) {
    uint32_t m = 0;
    if (dtype == QLORA_F32) {
        const uint32_t *u = (const uint32_t *)x;
        for (int64_t i = begin; i < end; i++) {
            uint32_t a = u[i] & 0x7fffffffu;
            m = a > m ? a : m;
        }
    } else {
        const uint16_t *u = (const uint16_t *)x;
        for (int64_t i = begin; i < end; i++) {
            uint32_t a = u[i] & 0x7fffu;
            m = a > m ? a : m;
        }
    }
    return m;
}

QL_INLINE uint32_t infinity_bits(qlora_dtype dtype) {
    return dtype == QLORA_F32 ? 0x7f800000u : dtype == QLORA_BF16 ? 0x7f80u : 0x7c00u;
}

static int64_t first_nonfinite(const void *x, qlora_dtype dtype, int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end && max_magnitude_bits(x, dtype, i, i + 1) < infinity_bits(dtype))
        i++;
    return i;
}

QL_INLINE float magnitude_bits_to_f32(uint32_t m, qlora_dtype dtype) {
    if (dtype == QLORA_F32)
        return ql_bits_f32(m);
    if (dtype == QLORA_BF16)
        return ql_bf16_to_f32((uint16_t)m);
    return ql_f16_to_f32((uint16_t)m);
}

/* Codes of one block into out[0, count): counts thresholds exceeded, no branches. The codes
 * are 32-bit so the vectorised compare-and-count stays in 32-bit lanes until the packing. */
QL_INLINE void block_codes(const void *x, qlora_dtype dtype, qlora_quant_type type, int64_t begin, int64_t count,
                           float scale, int32_t *out) {
    /* Local copies, so the thresholds stay in registers instead of being reloaded. */
    float th[15];
    if (type == QLORA_QUANT_NF4) {
        memcpy(th, ql_nf4_thresholds, sizeof ql_nf4_thresholds);
        for (int64_t i = 0; i < count; i++) {
            float v = load_f32(x, dtype, begin + i) * scale;
            int32_t code = 0;
            for (int t = 0; t < 15; t++)
                code += v > th[t];
            out[i] = code;
        }
    } else {
        memcpy(th, ql_fp4_thresholds, sizeof ql_fp4_thresholds);
        for (int64_t i = 0; i < count; i++) {
            float v = load_f32(x, dtype, begin + i) * scale;
            float magnitude = fabsf(v);
            int32_t bucket = 0;
            for (int t = 0; t < 7; t++)
                bucket += magnitude > th[t];
            /* ql_fp4_bucket_code as arithmetic: buckets 2, 3, 6, 7 flip bit 2. */
            int32_t code = bucket ^ ((bucket & 2) << 1);
            out[i] = code | (v < 0.0f) << 3;
        }
    }
}

/* max |x| over x[begin, begin + count) into *amax; returns the index of the first non-finite
 * element (*amax untouched), or -1. */
QL_INLINE int64_t find_block_absmax(const void *x, qlora_dtype dtype, int64_t begin, int64_t count, float *amax) {
    uint32_t m = max_magnitude_bits(x, dtype, begin, begin + count);
    if (m >= infinity_bits(dtype))
        return first_nonfinite(x, dtype, begin, begin + count);
    *amax = magnitude_bits_to_f32(m, dtype);
    return -1;
}

/* Quantizes block b; returns the index of its first non-finite element, or -1. */
QL_INLINE int64_t quantize_block(const void *x, qlora_dtype dtype, int64_t n, int blocksize, qlora_quant_type type,
                                 int64_t b, uint8_t *codes, float *absmax) {
    int32_t block[4096];
    int64_t begin = b * blocksize;
    int64_t count = n - begin < blocksize ? n - begin : blocksize;
    float amax = 0.0f;
    int64_t bad = find_block_absmax(x, dtype, begin, count, &amax);
    if (bad >= 0)
        return bad;
    absmax[b] = amax;
    if (amax > 0.0f)
        block_codes(x, dtype, type, begin, count, 1.0f / amax, block);
    else
        for (int64_t i = 0; i < count; i++)
            block[i] = ql_quant4_zero_code(type);
    if (count % 2 == 1)
        block[count++] = ql_quant4_zero_code(type);
    uint8_t *dst = codes + begin / 2;
    for (int64_t j = 0; j < count / 2; j++)
        dst[j] = (uint8_t)(block[2 * j] << 4 | block[2 * j + 1]);
    return -1;
}

/* One copy of quantize_block per (input dtype, code book), each with its inner loops
 * specialised and vectorised; the parallel loop picks one through a pointer. The absmax-only
 * copies share the signature and leave codes alone. */
typedef int64_t (*quantize_block_fn)(const void *x, int64_t n, int blocksize, int64_t b, uint8_t *codes,
                                     float *absmax);
/* The quantization loops are compiled for AVX2 and for the baseline. */
#define QL_DEFINE_QUANTIZE_BLOCK(NAME, DTYPE, TYPE)                                                        \
    QL_TARGET_CLONES("avx2", "default")                                                                    \
    static int64_t NAME(const void *x, int64_t n, int blocksize, int64_t b, uint8_t *codes, float *absmax) { \
        return quantize_block(x, DTYPE, n, blocksize, TYPE, b, codes, absmax);                               \
    }
QL_DEFINE_QUANTIZE_BLOCK(quantize_block_f32_nf4, QLORA_F32, QLORA_QUANT_NF4)
QL_DEFINE_QUANTIZE_BLOCK(quantize_block_f16_nf4, QLORA_F16, QLORA_QUANT_NF4)
QL_DEFINE_QUANTIZE_BLOCK(quantize_block_bf16_nf4, QLORA_BF16, QLORA_QUANT_NF4)
QL_DEFINE_QUANTIZE_BLOCK(quantize_block_f32_fp4, QLORA_F32, QLORA_QUANT_FP4)
QL_DEFINE_QUANTIZE_BLOCK(quantize_block_f16_fp4, QLORA_F16, QLORA_QUANT_FP4)
QL_DEFINE_QUANTIZE_BLOCK(quantize_block_bf16_fp4, QLORA_BF16, QLORA_QUANT_FP4)

#define QL_DEFINE_ABSMAX_BLOCK(NAME, DTYPE)                                                                \
    QL_TARGET_CLONES("avx2", "default")                                                                    \
    static int64_t NAME(const void *x, int64_t n, int blocksize, int64_t b, uint8_t *codes, float *absmax) { \
        (void)codes;                                                                                         \
        int64_t begin = b * blocksize;                                                                       \
        return find_block_absmax(x, DTYPE, begin, n - begin < blocksize ? n - begin : blocksize, &absmax[b]);     \
    }
QL_DEFINE_ABSMAX_BLOCK(absmax_block_f32, QLORA_F32)
QL_DEFINE_ABSMAX_BLOCK(absmax_block_f16, QLORA_F16)
QL_DEFINE_ABSMAX_BLOCK(absmax_block_bf16, QLORA_BF16)

static quantize_block_fn pick_quantize_block(qlora_dtype dtype, qlora_quant_type type) {
    int nf4 = type == QLORA_QUANT_NF4;
    if (dtype == QLORA_F32)
        return nf4 ? quantize_block_f32_nf4 : quantize_block_f32_fp4;
    if (dtype == QLORA_F16)
        return nf4 ? quantize_block_f16_nf4 : quantize_block_f16_fp4;
    return nf4 ? quantize_block_bf16_nf4 : quantize_block_bf16_fp4;
}

static quantize_block_fn pick_absmax_block(qlora_dtype dtype) {
    return dtype == QLORA_F32 ? absmax_block_f32 : dtype == QLORA_F16 ? absmax_block_f16 : absmax_block_bf16;
}

/* Runs per_block over every block in parallel; returns the first non-finite index, or -1. */
static int64_t for_each_block(quantize_block_fn per_block, const void *x, int64_t n, int blocksize, uint8_t *codes,
                              float *absmax, int num_threads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
    int64_t first_bad = INT64_MAX;
#pragma omp parallel num_threads(thread_count(num_threads)) if (n >= QL_PARALLEL_MIN_ELEMENTS) \
    reduction(min : first_bad)
    {
        /* schedule(static) hands each thread one ascending run of blocks, so after its first
         * non-finite element a thread can stop: its later blocks hold only larger indices. */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            if (first_bad != INT64_MAX)
                continue;
            int64_t bad = per_block(x, n, blocksize, b, codes, absmax);
            if (bad >= 0)
                first_bad = bad;
        }
    }
    return first_bad == INT64_MAX ? -1 : first_bad;
}

int64_t ql_quant4_fast(const void *x, qlora_dtype dtype, int64_t n, int blocksize, qlora_quant_type type,
                       uint8_t *codes, float *absmax, int num_threads) {
    return for_each_block(pick_quantize_block(dtype, type), x, n, blocksize, codes, absmax, num_threads);
}

int64_t ql_block_absmax_fast(const void *x, qlora_dtype dtype, int64_t n, int blocksize, float *absmax,
                             int num_threads) {
    return for_each_block(pick_absmax_block(dtype), x, n, blocksize, NULL, absmax, num_threads);
}

/* ---- dequantization: per block, the 16 possible outputs, then a table lookup per nibble ---- */

static inline float block_absmax(const float *absmax, const uint8_t *qabsmax, const float *nested, float offset,
                                 const float dyn[256], int64_t b) {
    if (!qabsmax)
        return absmax[b];
    float scaled = dyn[qabsmax[b]] * nested[b / QLORA_NESTED_BLOCKSIZE];
    return scaled + offset;
}

#define QL_DEFINE_DEQUANT_BLOCK(NAME, T, CONVERT)                                                         \
    static inline void NAME(const uint8_t *codes, const float code[16], float amax, int64_t begin,          \
                            int64_t count, T *out) {                                                        \
        T lut[16];                                                                                          \
        for (int k = 0; k < 16; k++)                                                                        \
            lut[k] = CONVERT(code[k] * amax);                                                               \
        const uint8_t *src = codes + begin / 2;                                                             \
        T *dst = out + begin;                                                                               \
        int64_t pairs = count / 2;                                                                          \
        for (int64_t j = 0; j < pairs; j++) {                                                               \
            dst[2 * j] = lut[src[j] >> 4];                                                                  \
            dst[2 * j + 1] = lut[src[j] & 0x0f];                                                            \
        }                                                                                                   \
        if (count % 2 == 1)                                                                                 \
            dst[count - 1] = lut[src[pairs] >> 4];                                                          \
    }

static inline float identity_f32(float v) { return v; }
QL_DEFINE_DEQUANT_BLOCK(dequant_block_f32, float, identity_f32)
QL_DEFINE_DEQUANT_BLOCK(dequant_block_bf16, uint16_t, ql_f32_to_bf16)
QL_DEFINE_DEQUANT_BLOCK(dequant_block_f16, uint16_t, ql_f32_to_f16)

void ql_dequant4_fast(const uint8_t *codes, const float *absmax, const uint8_t *qabsmax, const float *nested,
                      float offset, const float dyn[256], const float code[16], int64_t n, int blocksize,
                      void *out, qlora_dtype out_dtype, int num_threads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) num_threads(thread_count(num_threads)) \
    if (n >= QL_PARALLEL_MIN_ELEMENTS)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t begin = b * blocksize;
        int64_t count = n - begin < blocksize ? n - begin : blocksize;
        float amax = block_absmax(absmax, qabsmax, nested, offset, dyn, b);
        if (out_dtype == QLORA_F32)
            dequant_block_f32(codes, code, amax, begin, count, (float *)out);
        else if (out_dtype == QLORA_BF16)
            dequant_block_bf16(codes, code, amax, begin, count, (uint16_t *)out);
        else
            dequant_block_f16(codes, code, amax, begin, count, (uint16_t *)out);
    }
}

/* ---- double quantization ---- */

/* ql_dynamic_map_nearest without branches (selects instead): the scales of a tensor are noisy
 * enough that the reference's seven data-dependent branches mostly mispredict. */
static inline uint8_t dynamic_map_nearest(const float dyn[256], float x) {
    int pivot = 127, lower_pivot = 0, upper_pivot = 255;
    for (int step = 64; step > 0; step /= 2) {
        int up = x > dyn[pivot];
        lower_pivot = up ? pivot : lower_pivot;
        upper_pivot = up ? upper_pivot : pivot;
        pivot += up ? step : -step;
    }
    float value = dyn[pivot];
    int above = x > value;
    int neighbour = above ? upper_pivot : lower_pivot;
    float midpoint = (dyn[neighbour] + value) * 0.5f;
    int move = (above & (x > midpoint)) | (!above & (x < midpoint));
    return (uint8_t)(pivot + move * (neighbour - pivot));
}

/* The canonical mean (lib/quant4.h): chunk sums in parallel, folded in order. Chunks are done
 * in rounds of a fixed number so the partial sums fit on the stack. */
float ql_absmax_mean_fast(const float *absmax, int64_t nblocks, int num_threads) {
    if (nblocks == 0)
        return 0.0f;
    enum { ROUND = 256 };
    double sums[ROUND];
    double total = 0.0;
    int64_t nchunks = (nblocks + QL_DQ_SUM_CHUNK - 1) / QL_DQ_SUM_CHUNK;
    for (int64_t first = 0; first < nchunks; first += ROUND) {
        int count = nchunks - first < ROUND ? (int)(nchunks - first) : ROUND;
#pragma omp parallel for schedule(static) num_threads(thread_count(num_threads)) if (count > 1)
        for (int c = 0; c < count; c++) {
            int64_t begin = (first + c) * QL_DQ_SUM_CHUNK;
            int64_t end = begin + QL_DQ_SUM_CHUNK < nblocks ? begin + QL_DQ_SUM_CHUNK : nblocks;
            double s = 0.0;
            for (int64_t i = begin; i < end; i++)
                s += absmax[i];
            sums[c] = s;
        }
        for (int c = 0; c < count; c++)
            total += sums[c];
    }
    return (float)(total / (double)nblocks);
}

float ql_double_quant_fast(const float *absmax, int64_t nblocks, const float dyn[256], uint8_t *qabsmax,
                           float *nested, int num_threads) {
    if (nblocks == 0)
        return 0.0f;
    float offset = ql_absmax_mean_fast(absmax, nblocks, num_threads);
    int64_t ngroups = (nblocks + QLORA_NESTED_BLOCKSIZE - 1) / QLORA_NESTED_BLOCKSIZE;
#pragma omp parallel for schedule(static) num_threads(thread_count(num_threads)) if (ngroups > 16)
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t begin = g * QLORA_NESTED_BLOCKSIZE;
        int64_t count = nblocks - begin < QLORA_NESTED_BLOCKSIZE ? nblocks - begin : QLORA_NESTED_BLOCKSIZE;
        float centered[QLORA_NESTED_BLOCKSIZE];
        float amax = 0.0f;
        for (int64_t i = 0; i < count; i++) {
            centered[i] = absmax[begin + i] - offset;
            float a = fabsf(centered[i]);
            amax = a > amax ? a : amax;
        }
        nested[g] = amax;
        float scale = amax > 0.0f ? 1.0f / amax : 0.0f;
        for (int64_t i = 0; i < count; i++)
            qabsmax[begin + i] = dynamic_map_nearest(dyn, centered[i] * scale);
    }
    return offset;
}
