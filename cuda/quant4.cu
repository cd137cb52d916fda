/*
 * CUDA kernels for 4-bit blockwise quantization (NF4/FP4), double quantization of the block
 * scales, and fused dequantization. Every kernel performs the float32 operations of the CPU
 * reference (lib/quant4_ref.c) in the same order with explicitly rounded intrinsics
 * (__fdiv_rn, __fmul_rn, __fadd_rn, __fsub_rn: no FMA contraction, no fast-math), so the bytes and
 * values are bit-identical to it.
 *
 * Kernel errors that happen while a kernel runs (not at launch) surface at the next synchronising
 * call; run with CUDA_LAUNCH_BLOCKING=1 to pin them to the launch.
 */
#include "cuda_internal.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>

extern "C" {
#include "quant4.h"
}

namespace {

/* ------------------------------------------------------------------ shared pieces */

/* Holds the scratch lock for a scope, so every early return releases it. */
class scratch_lock_scope {
  public:
    explicit scratch_lock_scope(ql_cuda_state *s) : s_(s) { pthread_mutex_lock(&s_->scratch_lock); }
    ~scratch_lock_scope() { pthread_mutex_unlock(&s_->scratch_lock); }

  private:
    ql_cuda_state *s_;
    scratch_lock_scope(const scratch_lock_scope &);
    scratch_lock_scope &operator=(const scratch_lock_scope &);
};

int log2_of(int power_of_two) {
    int l = 0;
    while ((1 << l) < power_of_two)
        l++;
    return l;
}

void *scratch_field(ql_cuda_state *s, size_t offset) { return (char *)s->d_scratch + offset; }

__device__ __forceinline__ float f16_bits_to_f32(unsigned bits) {
    return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu)));
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned bits) { return __uint_as_float((bits & 0xffffu) << 16); }

template <qlora_dtype DT>
__device__ __forceinline__ float half_bits_to_f32(unsigned bits) {
    return DT == QLORA_F16 ? f16_bits_to_f32(bits) : bf16_bits_to_f32(bits);
}

template <qlora_dtype DT>
__device__ __forceinline__ unsigned f32_to_half_bits(float v) {
    return DT == QLORA_F16 ? (unsigned)__half_as_ushort(__float2half_rn(v))
                           : (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(v));
}

/* ------------------------------------------------------------------ quantize */

constexpr int kQuantThreads = 512;
/* Each thread owns 8 consecutive elements: one 16-byte (bf16/f16) or two 16-byte (f32) loads,
 * and one 32-bit word of packed codes. A quant block (32..4096 elements) is then a group of
 * 4..512 consecutive threads, and a CTA (4096 elements) always holds whole groups. */
constexpr int kQuantPerThread = 8;

struct quant_consts {
    float nf4_thresholds[15];
    float fp4_thresholds[7];
    unsigned fp4_bucket_codes; /* 4 bits per bucket: code of bucket k at bits 4k..4k+3 */
};

template <qlora_dtype DT>
__device__ __forceinline__ void load8(const void *__restrict__ x, int64_t e0, int64_t n, bool vec, float v[8]) {
    if (vec && e0 + 8 <= n) {
        if (DT == QLORA_F32) {
            const float4 *p = reinterpret_cast<const float4 *>(static_cast<const float *>(x) + e0);
            float4 a = __ldg(p), b = __ldg(p + 1);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        } else {
            uint4 w = __ldg(reinterpret_cast<const uint4 *>(static_cast<const unsigned short *>(x) + e0));
            unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                v[2 * k] = half_bits_to_f32<DT>(words[k]);
                v[2 * k + 1] = half_bits_to_f32<DT>(words[k] >> 16);
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float value = 0.0f; /* past the end: 0 cannot raise a max of magnitudes */
        if (e0 + i < n) {
            if (DT == QLORA_F32)
                value = static_cast<const float *>(x)[e0 + i];
            else
                value = half_bits_to_f32<DT>(static_cast<const unsigned short *>(x)[e0 + i]);
        }
        v[i] = value;
    }
}

/* The code of one normalized value: count of thresholds strictly below it (lib/quant4_ref.c). */
template <qlora_quant_type QT>
__device__ __forceinline__ unsigned code_of(float v, const quant_consts &qc) {
    if (QT == QLORA_QUANT_NF4) {
        unsigned code = 0;
#pragma unroll
        for (int t = 0; t < 15; t++)
            code += v > qc.nf4_thresholds[t] ? 1u : 0u;
        return code;
    }
    float magnitude = fabsf(v);
    unsigned bucket = 0;
#pragma unroll
    for (int t = 0; t < 7; t++)
        bucket += magnitude > qc.fp4_thresholds[t] ? 1u : 0u;
    unsigned sign = v < 0.0f ? 8u : 0u; /* sign of the normalized value, as the reference */
    return ((qc.fp4_bucket_codes >> (4 * bucket)) & 0xfu) | sign;
}

template <qlora_dtype DT, qlora_quant_type QT>
__global__ void __launch_bounds__(kQuantThreads)
    quantize4_kernel(const void *__restrict__ x, int64_t n, int log2_bs, quant_consts qc, int vec_in, int vec_out,
                     uint8_t *__restrict__ codes, float *__restrict__ absmax,
                     unsigned long long *__restrict__ first_nonfinite) {
    __shared__ float warp_max[kQuantThreads / 32];
    const unsigned zero_code = QT == QLORA_QUANT_NF4 ? 7u : 0u;
    const int64_t t = (int64_t)blockIdx.x * kQuantThreads + threadIdx.x;
    const int64_t e0 = t * kQuantPerThread;

    float v[8];
    load8<DT>(x, e0, n, vec_in != 0, v);

    float m = 0.0f;
    int64_t bad = -1;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (bad < 0 && !isfinite(v[i]))
            bad = e0 + i;
        m = fmaxf(m, fabsf(v[i]));
    }
    if (bad >= 0)
        atomicMin(first_nonfinite, (unsigned long long)bad);

    /* absmax of the quant block = max over its group of 2^log2_group threads. */
    const int log2_group = log2_bs - 3;
    if (log2_group <= 5) {
        for (int off = 1 << (log2_group - 1); off > 0; off >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    } else {
        for (int off = 16; off > 0; off >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0)
            warp_max[warp] = m;
        __syncthreads();
        const int log2_warps = log2_group - 5;
        const int first = (warp >> log2_warps) << log2_warps;
        m = warp_max[first];
        for (int k = 1; k < (1 << log2_warps); k++)
            m = fmaxf(m, warp_max[first + k]);
    }
    if (e0 >= n)
        return;
    if ((t & ((1 << log2_group) - 1)) == 0)
        absmax[e0 >> log2_bs] = m;

    const float scale = m > 0.0f ? __fdiv_rn(1.0f, m) : 0.0f;
    unsigned word = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        unsigned code = zero_code; /* all-zero block, and the pad nibble of an odd tail */
        if (m > 0.0f && e0 + i < n)
            code = code_of<QT>(__fmul_rn(v[i], scale), qc);
        /* byte k = code(2k) << 4 | code(2k+1); byte k sits at bits 8k of the little-endian word */
        word |= code << (8 * (i >> 1) + ((i & 1) ? 0 : 4));
    }
    const int64_t byte0 = e0 / 2;
    if (vec_out && e0 + 8 <= n) {
        *reinterpret_cast<unsigned *>(codes + byte0) = word;
    } else {
        const int64_t nbytes = (n + 1) / 2;
        for (int k = 0; k < 4 && byte0 + k < nbytes; k++)
            codes[byte0 + k] = (uint8_t)(word >> (8 * k));
    }
}

typedef void (*quantize4_fn)(const void *, int64_t, int, quant_consts, int, int, uint8_t *, float *,
                             unsigned long long *);

quantize4_fn pick_quantize4(qlora_dtype dtype, qlora_quant_type type) {
    const bool nf4 = type == QLORA_QUANT_NF4;
    switch (dtype) {
    case QLORA_F32: return nf4 ? quantize4_kernel<QLORA_F32, QLORA_QUANT_NF4> : quantize4_kernel<QLORA_F32, QLORA_QUANT_FP4>;
    case QLORA_F16: return nf4 ? quantize4_kernel<QLORA_F16, QLORA_QUANT_NF4> : quantize4_kernel<QLORA_F16, QLORA_QUANT_FP4>;
    case QLORA_BF16: return nf4 ? quantize4_kernel<QLORA_BF16, QLORA_QUANT_NF4> : quantize4_kernel<QLORA_BF16, QLORA_QUANT_FP4>;
    default: return NULL;
    }
}

quant_consts make_quant_consts(void) {
    quant_consts qc;
    for (int t = 0; t < 15; t++)
        qc.nf4_thresholds[t] = ql_nf4_thresholds[t];
    for (int t = 0; t < 7; t++)
        qc.fp4_thresholds[t] = ql_fp4_thresholds[t];
    qc.fp4_bucket_codes = 0;
    for (int k = 0; k < 8; k++)
        qc.fp4_bucket_codes |= (unsigned)(ql_fp4_bucket_code[k] & 0xfu) << (4 * k);
    return qc;
}

/* ------------------------------------------------------------------ double quant */

constexpr int kDqSumThreads = 1024;
constexpr int kNested = QLORA_NESTED_BLOCKSIZE; /* one CTA of 256 threads per nested block */

struct dynamic_map_table {
    float v[256];
};

/* The canonical mean: chunk sums of QL_DQ_SUM_CHUNK entries, each sequential in double (one
 * thread per chunk), then the chunk sums added in order by thread 0, then divided in double and
 * rounded to float32, exactly as canonical_mean() in lib/quant4_ref.c. */
__global__ void __launch_bounds__(kDqSumThreads)
    dq_offset_kernel(const float *__restrict__ absmax, int64_t nblocks, float *__restrict__ offset) {
    __shared__ double chunk_sums[kDqSumThreads];
    const int64_t nchunks = (nblocks + QL_DQ_SUM_CHUNK - 1) / QL_DQ_SUM_CHUNK;
    double total = 0.0;
    for (int64_t first = 0; first < nchunks; first += kDqSumThreads) {
        const int64_t chunk = first + threadIdx.x;
        double sum = 0.0;
        if (chunk < nchunks) {
            const int64_t begin = chunk * QL_DQ_SUM_CHUNK;
            const int64_t end = begin + QL_DQ_SUM_CHUNK < nblocks ? begin + QL_DQ_SUM_CHUNK : nblocks;
#pragma unroll 8
            for (int64_t i = begin; i < end; i++)
                sum = __dadd_rn(sum, (double)__ldg(absmax + i));
        }
        chunk_sums[threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.x == 0) {
            const int64_t count = nchunks - first < kDqSumThreads ? nchunks - first : kDqSumThreads;
            for (int64_t k = 0; k < count; k++)
                total = __dadd_rn(total, chunk_sums[k]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        *offset = __double2float_rn(__ddiv_rn(total, (double)nblocks));
}

/* bitsandbytes' 8-bit search, step for step as ql_dynamic_map_nearest. */
__device__ __forceinline__ uint8_t dynamic_map_nearest(const float *dyn, float x) {
    int pivot = 127, lower_pivot = 0, upper_pivot = 255;
#pragma unroll
    for (int step = 64; step > 0; step >>= 1) {
        if (x > dyn[pivot]) {
            lower_pivot = pivot;
            pivot += step;
        } else {
            upper_pivot = pivot;
            pivot -= step;
        }
    }
    const float value = dyn[pivot];
    if (x > value) {
        const float midpoint = __fmul_rn(__fadd_rn(dyn[upper_pivot], value), 0.5f);
        return (uint8_t)(x > midpoint ? upper_pivot : pivot);
    }
    const float midpoint = __fmul_rn(__fadd_rn(dyn[lower_pivot], value), 0.5f);
    return (uint8_t)(x < midpoint ? lower_pivot : pivot);
}

/* One CTA per nested block of 256 scales: c = absmax - offset, nested = max |c|, and each scale's
 * nearest dynamic-map code of c * (1 / nested). */
__global__ void __launch_bounds__(kNested)
    dq_quantize_kernel(const float *__restrict__ absmax, int64_t nblocks, const float *__restrict__ offset_ptr,
                       const __grid_constant__ dynamic_map_table dyn, uint8_t *__restrict__ qabsmax,
                       float *__restrict__ nested) {
    __shared__ float s_dyn[256];
    __shared__ float warp_max[kNested / 32];
    s_dyn[threadIdx.x] = dyn.v[threadIdx.x];
    const float offset = *offset_ptr;
    const int64_t j = (int64_t)blockIdx.x * kNested + threadIdx.x;
    const float c = j < nblocks ? __fsub_rn(absmax[j], offset) : 0.0f;
    float m = fabsf(c);
    for (int off = 16; off > 0; off >>= 1)
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if ((threadIdx.x & 31) == 0)
        warp_max[threadIdx.x >> 5] = m;
    __syncthreads(); /* also publishes s_dyn */
    m = warp_max[0];
#pragma unroll
    for (int k = 1; k < kNested / 32; k++)
        m = fmaxf(m, warp_max[k]);
    if (threadIdx.x == 0)
        nested[blockIdx.x] = m;
    if (j < nblocks) {
        const float scale = m > 0.0f ? __fdiv_rn(1.0f, m) : 0.0f;
        qabsmax[j] = dynamic_map_nearest(s_dyn, __fmul_rn(c, scale));
    }
}

/* ------------------------------------------------------------------ dequantize */

constexpr int kDequantThreads = 256;
/* Chunks per thread per loop trip, loaded before any is decoded so several loads are in flight. */
constexpr int kDequantUnroll = 4;

struct dequant_tables {
    float code[16];
    float dyn[256];
};

/* A chunk is the run of elements one thread turns into 16 output bytes: 8 elements (4 code
 * bytes) for f16/bf16, 4 elements (2 code bytes) for f32. 8 divides every blocksize, so a chunk
 * never straddles two quant blocks. A warp's stores are 512 contiguous bytes. */
template <qlora_dtype OUT>
struct chunk_shape {
    static constexpr int elements = OUT == QLORA_F32 ? 4 : 8;
    static constexpr int code_bytes = elements / 2;
};

template <qlora_dtype OUT, bool VEC>
__device__ __forceinline__ unsigned load_chunk_codes(const uint8_t *__restrict__ codes, int64_t chunk) {
    constexpr int nb = chunk_shape<OUT>::code_bytes;
    if (VEC) {
        if (nb == 4)
            return __ldg(reinterpret_cast<const unsigned *>(codes) + chunk);
        return __ldg(reinterpret_cast<const unsigned short *>(codes) + chunk);
    }
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < nb; k++)
        bits |= (unsigned)__ldg(codes + chunk * nb + k) << (8 * k);
    return bits;
}

/* Decoded absmax of quant block b; with double quant: dyn[q] * nested + offset, two roundings. */
__device__ __forceinline__ float block_absmax(int64_t b, const float *__restrict__ absmax,
                                              const uint8_t *__restrict__ qabsmax, const float *__restrict__ nested,
                                              float offset, const float *s_dyn) {
    if (qabsmax)
        return __fadd_rn(__fmul_rn(s_dyn[__ldg(qabsmax + b)], __ldg(nested + (b / kNested))), offset);
    return __ldg(absmax + b);
}

template <qlora_dtype OUT, bool VEC>
__device__ __forceinline__ void store_chunk(void *__restrict__ out, int64_t chunk, unsigned bits, float scale,
                                            const float *s_code) {
    constexpr int ne = chunk_shape<OUT>::elements;
    float y[ne];
#pragma unroll
    for (int k = 0; k < ne / 2; k++) {
        y[2 * k] = __fmul_rn(s_code[(bits >> (8 * k + 4)) & 0xfu], scale);
        y[2 * k + 1] = __fmul_rn(s_code[(bits >> (8 * k)) & 0xfu], scale);
    }
    if (OUT == QLORA_F32) {
        float *o = static_cast<float *>(out) + chunk * ne;
        if (VEC) {
            *reinterpret_cast<float4 *>(o) = make_float4(y[0], y[1], y[2], y[3]);
        } else {
#pragma unroll
            for (int i = 0; i < ne; i++)
                o[i] = y[i];
        }
    } else {
        unsigned h[ne];
#pragma unroll
        for (int i = 0; i < ne; i++)
            h[i] = f32_to_half_bits<OUT>(y[i]);
        unsigned short *o = static_cast<unsigned short *>(out) + chunk * ne;
        if (VEC) {
            *reinterpret_cast<uint4 *>(o) = make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16,
                                                       h[6] | h[7] << 16);
        } else {
#pragma unroll
            for (int i = 0; i < ne; i++)
                o[i] = (unsigned short)h[i];
        }
    }
}

template <qlora_dtype OUT>
__device__ __forceinline__ void store_one(void *__restrict__ out, int64_t i, float y) {
    if (OUT == QLORA_F32)
        static_cast<float *>(out)[i] = y;
    else
        static_cast<unsigned short *>(out)[i] = (unsigned short)f32_to_half_bits<OUT>(y);
}

/* Grid-stride over full chunks (the grid is sized to fill the GPU once); the n % chunk tail
 * elements are done one each by the first threads of CTA 0. */
template <qlora_dtype OUT, bool VEC>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize4_kernel(const uint8_t *__restrict__ codes, const float *__restrict__ absmax,
                       const uint8_t *__restrict__ qabsmax, const float *__restrict__ nested, float offset, int64_t n,
                       int log2_bs, const __grid_constant__ dequant_tables tab, void *__restrict__ out) {
    constexpr int ne = chunk_shape<OUT>::elements;
    __shared__ float s_code[16];
    __shared__ float s_dyn[256];
    if (threadIdx.x < 16)
        s_code[threadIdx.x] = tab.code[threadIdx.x];
    if (qabsmax)
        s_dyn[threadIdx.x] = tab.dyn[threadIdx.x];
    __syncthreads();

    const int64_t nchunks = n / ne;
    const int64_t step = (int64_t)gridDim.x * kDequantThreads * kDequantUnroll;
    for (int64_t base = (int64_t)blockIdx.x * kDequantThreads * kDequantUnroll + threadIdx.x; base < nchunks;
         base += step) {
        unsigned bits[kDequantUnroll];
        float scale[kDequantUnroll];
#pragma unroll
        for (int u = 0; u < kDequantUnroll; u++) {
            const int64_t chunk = base + (int64_t)u * kDequantThreads;
            bits[u] = 0;
            scale[u] = 0.0f;
            if (chunk < nchunks) {
                bits[u] = load_chunk_codes<OUT, VEC>(codes, chunk);
                scale[u] = block_absmax((chunk * ne) >> log2_bs, absmax, qabsmax, nested, offset, s_dyn);
            }
        }
#pragma unroll
        for (int u = 0; u < kDequantUnroll; u++) {
            const int64_t chunk = base + (int64_t)u * kDequantThreads;
            if (chunk < nchunks)
                store_chunk<OUT, VEC>(out, chunk, bits[u], scale[u], s_code);
        }
    }

    const int64_t tail = n - nchunks * ne;
    if (blockIdx.x == 0 && threadIdx.x < tail) {
        const int64_t i = nchunks * ne + threadIdx.x;
        const unsigned byte = __ldg(codes + i / 2);
        const unsigned nibble = (i & 1) ? byte & 0xfu : byte >> 4;
        const float scale = block_absmax(i >> log2_bs, absmax, qabsmax, nested, offset, s_dyn);
        store_one<OUT>(out, i, __fmul_rn(s_code[nibble], scale));
    }
}

typedef void (*dequantize4_fn)(const uint8_t *, const float *, const uint8_t *, const float *, float, int64_t, int,
                               dequant_tables, void *);

dequantize4_fn pick_dequantize4(qlora_dtype out_dtype, bool vec) {
    switch (out_dtype) {
    case QLORA_F32: return vec ? dequantize4_kernel<QLORA_F32, true> : dequantize4_kernel<QLORA_F32, false>;
    case QLORA_F16: return vec ? dequantize4_kernel<QLORA_F16, true> : dequantize4_kernel<QLORA_F16, false>;
    case QLORA_BF16: return vec ? dequantize4_kernel<QLORA_BF16, true> : dequantize4_kernel<QLORA_BF16, false>;
    default: return NULL;
    }
}

bool is_float_dtype(qlora_dtype d) { return d == QLORA_F32 || d == QLORA_F16 || d == QLORA_BF16; }

} // namespace

/* ------------------------------------------------------------------ launchers */

extern "C" qlora_status ql_cuda_quantize_4bit(ql_cuda_state *s, const void *d_x, qlora_dtype dtype, int64_t n,
                                              int blocksize, qlora_quant_type type, uint8_t *d_codes,
                                              float *d_absmax, int64_t *first_nonfinite) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(first_nonfinite != NULL, "first_nonfinite");
    *first_nonfinite = -1;
    QL_REQUIRE_ARG(n >= 0, "n");
    if (!ql_quant4_blocksize_ok(blocksize))
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_quantize_4bit: blocksize %d is not a power of two in 32..4096",
                       blocksize);
    if (type != QLORA_QUANT_NF4 && type != QLORA_QUANT_FP4)
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_quantize_4bit: unknown quant type %d", (int)type);
    quantize4_fn kernel = pick_quantize4(dtype, type);
    if (!kernel)
        return ql_fail(QLORA_ERR_DTYPE, "ql_cuda_quantize_4bit: input dtype %s is not F32, F16 or BF16",
                       qlora_dtype_name(dtype));
    if (n == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(d_x != NULL, "d_x");
    QL_REQUIRE_ARG(d_codes != NULL, "d_codes");
    QL_REQUIRE_ARG(d_absmax != NULL, "d_absmax");
    const size_t elem = dtype == QLORA_F32 ? 4 : 2;
    if ((uintptr_t)d_x % elem != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_quantize_4bit: input %p is not aligned to its %zu-byte dtype",
                       d_x, elem);
    const int64_t threads = (n + kQuantPerThread - 1) / kQuantPerThread;
    const int64_t ctas = (threads + kQuantThreads - 1) / kQuantThreads;
    if (ctas > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "ql_cuda_quantize_4bit: %lld elements is too many for one launch",
                       (long long)n);

    QL_CUDA_ENTER(s);
    scratch_lock_scope lock(s);
    unsigned long long *d_flag =
        (unsigned long long *)scratch_field(s, offsetof(ql_cuda_scratch, first_nonfinite));
    QL_CUDA_CHECK(cudaMemsetAsync(d_flag, 0xff, sizeof *d_flag, s->stream));
    const int vec_in = (uintptr_t)d_x % 16 == 0;
    const int vec_out = (uintptr_t)d_codes % 4 == 0;
    const dim3 grid((unsigned)ctas), block(kQuantThreads);
    kernel<<<grid, block, 0, s->stream>>>(d_x, n, log2_of(blocksize), make_quant_consts(), vec_in, vec_out, d_codes,
                                          d_absmax, d_flag);
    char name[96];
    snprintf(name, sizeof name, "quantize4_kernel<%s,%s>", qlora_dtype_name(dtype), qlora_quant_type_name(type));
    QL_CUDA_CHECK_LAUNCH(name, grid, block);
    unsigned long long flag = 0;
    QL_CUDA_CHECK(cudaMemcpyAsync(&flag, d_flag, sizeof flag, cudaMemcpyDeviceToHost, s->stream));
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    *first_nonfinite = flag == ~0ull ? -1 : (int64_t)flag;
    return QLORA_OK;
}

extern "C" qlora_status ql_cuda_double_quant(ql_cuda_state *s, const float *d_absmax, int64_t nblocks,
                                             const float dynamic_map[256], uint8_t *d_qabsmax,
                                             float *d_nested_absmax, float *offset) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(offset != NULL, "offset");
    *offset = 0.0f;
    QL_REQUIRE_ARG(nblocks >= 0, "nblocks");
    QL_REQUIRE_ARG(dynamic_map != NULL, "dynamic_map");
    if (nblocks == 0)
        return QLORA_OK; /* as the reference: offset 0, nothing written */
    QL_REQUIRE_ARG(d_absmax != NULL, "d_absmax");
    QL_REQUIRE_ARG(d_qabsmax != NULL, "d_qabsmax");
    QL_REQUIRE_ARG(d_nested_absmax != NULL, "d_nested_absmax");
    const int64_t nested_blocks = (nblocks + kNested - 1) / kNested;
    if (nested_blocks > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "ql_cuda_double_quant: %lld blocks is too many for one launch",
                       (long long)nblocks);
    dynamic_map_table dyn;
    for (int i = 0; i < 256; i++)
        dyn.v[i] = dynamic_map[i];

    QL_CUDA_ENTER(s);
    scratch_lock_scope lock(s);
    float *d_offset = (float *)scratch_field(s, offsetof(ql_cuda_scratch, offset));
    const dim3 sum_grid(1), sum_block(kDqSumThreads);
    dq_offset_kernel<<<sum_grid, sum_block, 0, s->stream>>>(d_absmax, nblocks, d_offset);
    QL_CUDA_CHECK_LAUNCH("dq_offset_kernel", sum_grid, sum_block);
    const dim3 grid((unsigned)nested_blocks), block(kNested);
    dq_quantize_kernel<<<grid, block, 0, s->stream>>>(d_absmax, nblocks, d_offset, dyn, d_qabsmax, d_nested_absmax);
    QL_CUDA_CHECK_LAUNCH("dq_quantize_kernel", grid, block);
    float h_offset = 0.0f;
    QL_CUDA_CHECK(cudaMemcpyAsync(&h_offset, d_offset, sizeof h_offset, cudaMemcpyDeviceToHost, s->stream));
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    *offset = h_offset;
    return QLORA_OK;
}

extern "C" qlora_status ql_cuda_dequantize_4bit(ql_cuda_state *s, const qlora_qtensor *q, void *d_out,
                                                qlora_dtype out_dtype) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(q != NULL, "q");
    const char *label = q->name[0] ? q->name : "(unnamed)";
    if (!is_float_dtype(out_dtype))
        return ql_fail(QLORA_ERR_DTYPE, "dequantize '%s': output dtype %s is not F32, F16 or BF16", label,
                       qlora_dtype_name(out_dtype));
    if (!ql_quant4_blocksize_ok(q->blocksize))
        return ql_fail(QLORA_ERR_INVALID_ARG, "dequantize '%s': blocksize %d is not a power of two in 32..4096",
                       label, q->blocksize);
    if (q->numel < 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "dequantize '%s': numel %lld < 0", label, (long long)q->numel);
    if (q->numel == 0)
        return QLORA_OK;
    if (q->device != s->device)
        return ql_fail(QLORA_ERR_DEVICE, "dequantize '%s': tensor is on device %d, the context on CUDA device %d",
                       label, q->device, s->device);
    const int64_t nblocks = (q->numel + q->blocksize - 1) / q->blocksize;
    if (q->nblocks != nblocks)
        return ql_fail(QLORA_ERR_INVALID_ARG, "dequantize '%s': nblocks %lld, expected ceil(%lld / %d) = %lld", label,
                       (long long)q->nblocks, (long long)q->numel, q->blocksize, (long long)nblocks);
    if (!d_out || !q->codes)
        return ql_fail(QLORA_ERR_INVALID_ARG, "dequantize '%s': %s is NULL", label, d_out ? "codes" : "output");
    if (q->double_quant ? (!q->qabsmax || !q->nested_absmax) : !q->absmax)
        return ql_fail(QLORA_ERR_INVALID_ARG, "dequantize '%s': block scales are NULL", label);
    const size_t out_elem = out_dtype == QLORA_F32 ? 4 : 2;
    if ((uintptr_t)d_out % out_elem != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "dequantize '%s': output %p is not aligned to its %zu-byte dtype", label,
                       d_out, out_elem);

    dequant_tables tab;
    for (int i = 0; i < 16; i++)
        tab.code[i] = q->code[i];
    for (int i = 0; i < 256; i++)
        tab.dyn[i] = q->double_quant ? q->nested_code[i] : 0.0f;
    const int chunk_code_bytes = out_dtype == QLORA_F32 ? 2 : 4;
    const bool vec = (uintptr_t)d_out % 16 == 0 && (uintptr_t)q->codes % (uintptr_t)chunk_code_bytes == 0;
    dequantize4_fn kernel = pick_dequantize4(out_dtype, vec);

    QL_CUDA_ENTER(s);
    int per_sm = 0;
    QL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kDequantThreads, 0));
    if (per_sm < 1)
        per_sm = 1;
    const int64_t chunks = q->numel / (16 / (int64_t)out_elem);
    const int64_t per_cta = (int64_t)kDequantThreads * kDequantUnroll;
    int64_t ctas = (chunks + per_cta - 1) / per_cta;
    const int64_t resident = (int64_t)s->sm_count * per_sm;
    if (ctas > resident)
        ctas = resident;
    if (ctas < 1)
        ctas = 1; /* CTA 0 also writes the tail */
    const dim3 grid((unsigned)ctas), block(kDequantThreads);
    kernel<<<grid, block, 0, s->stream>>>(q->codes, q->double_quant ? NULL : q->absmax,
                                          q->double_quant ? q->qabsmax : NULL, q->double_quant ? q->nested_absmax : NULL,
                                          q->double_quant ? q->nested_offset : 0.0f, q->numel, log2_of(q->blocksize),
                                          tab, d_out);
    char name[96];
    snprintf(name, sizeof name, "dequantize4_kernel<%s,%s>", qlora_dtype_name(out_dtype), vec ? "vec" : "scalar");
    QL_CUDA_CHECK_LAUNCH(name, grid, block);
    return QLORA_OK;
}
