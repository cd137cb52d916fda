/*
 * Private to the .cu files of the model ops (model_norm_rope.cu, attention.cu, cross_entropy.cu):
 * BF16 bit conversions, block reductions, the grid of the grid-stride kernels and the lock of
 * the state's scratch flag. Arithmetic that must equal the CPU ops bit for bit is written with
 * the _rn intrinsics, since nvcc would otherwise contract a*b + c into an FMA (the C side is
 * built with -ffp-contract=off).
 */
#ifndef QLORA_MODEL_OPS_COMMON_CUH
#define QLORA_MODEL_OPS_COMMON_CUH

#include <cuda_bf16.h>
#include <math.h>
#include <stddef.h>

#include "cuda_internal.cuh"
#include "model_ops_cuda.h"

namespace {

__device__ __forceinline__ float mo_bf16(uint32_t bits) { return __uint_as_float((bits & 0xffffu) << 16); }
/* The two BF16 values of a 32-bit word: element 2i in the low half, 2i+1 in the high half. */
__device__ __forceinline__ float mo_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float mo_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint16_t mo_to_bf16(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
/* v rounded to BF16 and back: the value a BF16 tensor would hold. */
__device__ __forceinline__ float mo_round_bf16(float v) { return mo_bf16(mo_to_bf16(v)); }
__device__ __forceinline__ uint32_t mo_pack(float lo, float hi) {
    return (uint32_t)mo_to_bf16(lo) | ((uint32_t)mo_to_bf16(hi) << 16);
}

template <typename T>
__device__ __forceinline__ T mo_warp_sum(T v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float mo_warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
 * `shared` holds 32 values; the call begins and ends with a barrier so it can be reused. */
template <typename T>
__device__ T mo_block_sum(T v, T *shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = mo_warp_sum(v);
    __syncthreads();
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    T total = lane < warps ? shared[lane] : (T)0;
    total = mo_warp_sum(total);
    __syncthreads();
    return total;
}

__device__ float mo_block_max(float v, float *shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = mo_warp_max(v);
    __syncthreads();
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    float total = lane < warps ? shared[lane] : -INFINITY;
    total = mo_warp_max(total);
    __syncthreads();
    return total;
}

/* Blocks for a grid-stride loop over `items` with `threads` per block: enough to fill the
 * device a few times over, never more than the items need. */
inline dim3 mo_stride_grid(const ql_cuda_state *s, int64_t items, int threads) {
    int64_t ctas = (items + threads - 1) / threads;
    const int64_t most = (int64_t)s->sm_count * 16;
    if (ctas > most)
        ctas = most;
    return dim3((unsigned)(ctas < 1 ? 1 : ctas));
}

/* Holds the scratch lock (the state's device flag) for a scope. */
class mo_scratch_lock {
  public:
    explicit mo_scratch_lock(ql_cuda_state *s) : s_(s) { pthread_mutex_lock(&s_->scratch_lock); }
    ~mo_scratch_lock() { pthread_mutex_unlock(&s_->scratch_lock); }

  private:
    ql_cuda_state *s_;
    mo_scratch_lock(const mo_scratch_lock &);
    mo_scratch_lock &operator=(const mo_scratch_lock &);
};

/* The scratch flag: an atomicMin target, all bits set meaning "nothing found". */
inline unsigned long long *mo_scratch_flag(ql_cuda_state *s) {
    return (unsigned long long *)((char *)s->d_scratch + offsetof(ql_cuda_scratch, first_nonfinite));
}

} // namespace

#endif
