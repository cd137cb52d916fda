/*
 * CUDA AdamW (lib/adamw.h): the per-element update, bit-identical to lib/adamw_ref.c, and the
 * gradient sum of squares for global-norm clipping in a fixed-order double reduction.
 *
 * Every float32 operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fsub_rn,
 * __fdiv_rn, __fsqrt_rn): nvcc may not contract them into FMAs or use approximate division or
 * square root, so each result is the IEEE-rounded one the host computes. Subnormals are kept
 * (no -ftz). The one thing that is not matched is the payload of a NaN result (the GPU returns
 * the canonical NaN); finite and infinite results are identical.
 */
#include "cuda_internal.cuh"

#include <cuda_bf16.h>
#include <math.h>
#include <stdio.h>

extern "C" {
#include "adamw.h"
}

namespace {

/* ------------------------------------------------------------------ update */

constexpr int kUpdateThreads = 256;
/* A vector pack: 8 elements = one 16-byte load of BF16 and two of F32 per array. */
constexpr int kPack = 8;

__device__ __forceinline__ float bf16_to_f32(unsigned bits) { return __uint_as_float((bits & 0xffffu) << 16); }

__device__ __forceinline__ unsigned f32_to_bf16(float v) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(v));
}

/* One element, in the order of ql_adamw_update_ref. */
__device__ __forceinline__ void adamw_element(const ql_adamw_step &s, float grad, float &p, float &m, float &v) {
    const float g = __fmul_rn(grad, s.grad_scale);
    const float m_new = __fadd_rn(__fmul_rn(s.beta1, m), __fmul_rn(s.one_minus_beta1, g));
    const float v_new = __fadd_rn(__fmul_rn(s.beta2, v), __fmul_rn(s.one_minus_beta2, __fmul_rn(g, g)));
    const float ratio = __fdiv_rn(m_new, __fadd_rn(__fsqrt_rn(v_new), s.eps_c2));
    p = __fmul_rn(__fsub_rn(p, __fmul_rn(s.step_size, ratio)), s.decay);
    m = m_new;
    v = v_new;
}

template <qlora_dtype GD>
__device__ __forceinline__ float load_grad(const void *__restrict__ grad, int64_t i) {
    if (GD == QLORA_F32)
        return __ldg(static_cast<const float *>(grad) + i);
    return bf16_to_f32(__ldg(static_cast<const unsigned short *>(grad) + i));
}

template <bool MASTER, qlora_dtype GD>
__device__ __forceinline__ void update_one(const ql_adamw_step &s, unsigned short *__restrict__ param,
                                           float *__restrict__ master, const void *__restrict__ grad,
                                           float *__restrict__ m, float *__restrict__ v, int64_t i) {
    float p = MASTER ? master[i] : bf16_to_f32(param[i]);
    float mi = m[i], vi = v[i];
    adamw_element(s, load_grad<GD>(grad, i), p, mi, vi);
    m[i] = mi;
    v[i] = vi;
    if (MASTER)
        master[i] = p;
    param[i] = (unsigned short)f32_to_bf16(p);
}

__device__ __forceinline__ void load8(const float *__restrict__ x, int64_t pack, float out[kPack]) {
    const float4 *q = reinterpret_cast<const float4 *>(x) + 2 * pack;
    const float4 a = q[0], b = q[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ void store8(float *__restrict__ x, int64_t pack, const float in[kPack]) {
    float4 *q = reinterpret_cast<float4 *>(x) + 2 * pack;
    q[0] = make_float4(in[0], in[1], in[2], in[3]);
    q[1] = make_float4(in[4], in[5], in[6], in[7]);
}

__device__ __forceinline__ void unpack_bf16x8(uint4 w, float out[kPack]) {
    const unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        out[2 * k] = bf16_to_f32(words[k]);
        out[2 * k + 1] = bf16_to_f32(words[k] >> 16);
    }
}

/* VEC: every pointer is 16-byte aligned, so pack k (elements 8k..8k+7) is whole vectors in every
 * array. Grid-stride over the packs; the n % 8 tail elements go one each to the first threads
 * of CTA 0. Without VEC: grid-stride over single elements. */
template <bool MASTER, qlora_dtype GD, bool VEC>
__global__ void __launch_bounds__(kUpdateThreads)
    adamw_update_kernel(const ql_adamw_step s, unsigned short *__restrict__ param, float *__restrict__ master,
                        const void *__restrict__ grad, float *__restrict__ m, float *__restrict__ v, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * kUpdateThreads;
    const int64_t first = (int64_t)blockIdx.x * kUpdateThreads + threadIdx.x;
    if (!VEC) {
        for (int64_t i = first; i < n; i += stride)
            update_one<MASTER, GD>(s, param, master, grad, m, v, i);
        return;
    }
    const int64_t npacks = n / kPack;
    for (int64_t k = first; k < npacks; k += stride) {
        float g[kPack], p[kPack], mk[kPack], vk[kPack];
        if (GD == QLORA_F32)
            load8(static_cast<const float *>(grad), k, g);
        else
            unpack_bf16x8(__ldg(reinterpret_cast<const uint4 *>(grad) + k), g);
        if (MASTER)
            load8(master, k, p);
        else
            unpack_bf16x8(reinterpret_cast<const uint4 *>(param)[k], p);
        load8(m, k, mk);
        load8(v, k, vk);
#pragma unroll
        for (int j = 0; j < kPack; j++)
            adamw_element(s, g[j], p[j], mk[j], vk[j]);
        store8(m, k, mk);
        store8(v, k, vk);
        if (MASTER)
            store8(master, k, p);
        unsigned h[kPack];
#pragma unroll
        for (int j = 0; j < kPack; j++)
            h[j] = f32_to_bf16(p[j]);
        reinterpret_cast<uint4 *>(param)[k] =
            make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
    }
    const int64_t tail = n - npacks * kPack;
    if (blockIdx.x == 0 && threadIdx.x < tail)
        update_one<MASTER, GD>(s, param, master, grad, m, v, npacks * kPack + threadIdx.x);
}

typedef void (*adamw_update_fn)(const ql_adamw_step, unsigned short *, float *, const void *, float *, float *,
                                int64_t);

template <bool MASTER, qlora_dtype GD>
adamw_update_fn pick_update_vec(bool vec) {
    return vec ? adamw_update_kernel<MASTER, GD, true> : adamw_update_kernel<MASTER, GD, false>;
}

adamw_update_fn pick_update(bool master, qlora_dtype grad_dtype, bool vec) {
    if (grad_dtype == QLORA_F32)
        return master ? pick_update_vec<true, QLORA_F32>(vec) : pick_update_vec<false, QLORA_F32>(vec);
    return master ? pick_update_vec<true, QLORA_BF16>(vec) : pick_update_vec<false, QLORA_BF16>(vec);
}

/* ------------------------------------------------------------------ sum of squares */

constexpr int kSumsqThreads = 256;
/* Partial sums per launch, one per CTA; the final pass is one CTA with a thread per partial. */
constexpr int kSumsqMaxBlocks = 1024;

/* The partial sums and the total live in module memory (one copy per device); sumsq_lock keeps
 * two calls from using them at once (they may come from different states on one device). */
__device__ double g_sumsq_partials[kSumsqMaxBlocks];
__device__ double g_sumsq_total;
pthread_mutex_t sumsq_lock = PTHREAD_MUTEX_INITIALIZER;

class sumsq_lock_scope {
  public:
    sumsq_lock_scope() { pthread_mutex_lock(&sumsq_lock); }
    ~sumsq_lock_scope() { pthread_mutex_unlock(&sumsq_lock); }

  private:
    sumsq_lock_scope(const sumsq_lock_scope &);
    sumsq_lock_scope &operator=(const sumsq_lock_scope &);
};

/* Elements per group: one 16-byte load. */
template <qlora_dtype GD>
struct sumsq_group {
    static constexpr int elements = GD == QLORA_F32 ? 4 : 8;
};

__device__ __forceinline__ double add_square(double sum, float x) {
    const double d = (double)x;
    return __dadd_rn(sum, __dmul_rn(d, d)); /* the square is exact; only the add rounds */
}

/* Fixed tree over a CTA's shared array: the pairing depends only on the CTA size. */
template <int THREADS>
__device__ __forceinline__ double cta_tree_sum(double *shared, double mine) {
    shared[threadIdx.x] = mine;
    __syncthreads();
#pragma unroll
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half)
            shared[threadIdx.x] = __dadd_rn(shared[threadIdx.x], shared[threadIdx.x + half]);
        __syncthreads();
    }
    return shared[0];
}

/* Thread t of the grid sums groups t, t + T, t + 2T, ... (T = threads in the grid), each group's
 * elements in index order; the grid size depends only on n, so the order does too. The vector
 * and scalar loads visit the same elements in the same order. */
template <qlora_dtype GD, bool VEC>
__global__ void __launch_bounds__(kSumsqThreads)
    sumsq_partial_kernel(const void *__restrict__ grad, int64_t n, double *__restrict__ partials) {
    __shared__ double shared[kSumsqThreads];
    constexpr int G = sumsq_group<GD>::elements;
    const int64_t ngroups = (n + G - 1) / G;
    const int64_t stride = (int64_t)gridDim.x * kSumsqThreads;
    double sum = 0.0;
    for (int64_t k = (int64_t)blockIdx.x * kSumsqThreads + threadIdx.x; k < ngroups; k += stride) {
        float x[G];
        if (VEC && (k + 1) * G <= n) {
            if (GD == QLORA_F32) {
                const float4 a = __ldg(reinterpret_cast<const float4 *>(grad) + k);
                x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
            } else {
                unpack_bf16x8(__ldg(reinterpret_cast<const uint4 *>(grad) + k), x);
            }
#pragma unroll
            for (int j = 0; j < G; j++)
                sum = add_square(sum, x[j]);
        } else {
            for (int j = 0; j < G && k * G + j < n; j++)
                sum = add_square(sum, load_grad<GD>(grad, k * G + j));
        }
    }
    const double cta = cta_tree_sum<kSumsqThreads>(shared, sum);
    if (threadIdx.x == 0)
        partials[blockIdx.x] = cta;
}

__global__ void __launch_bounds__(kSumsqMaxBlocks)
    sumsq_final_kernel(const double *__restrict__ partials, int count, double *__restrict__ total) {
    __shared__ double shared[kSumsqMaxBlocks];
    const double mine = (int)threadIdx.x < count ? partials[threadIdx.x] : 0.0;
    const double sum = cta_tree_sum<kSumsqMaxBlocks>(shared, mine);
    if (threadIdx.x == 0)
        *total = sum;
}

typedef void (*sumsq_partial_fn)(const void *, int64_t, double *);

sumsq_partial_fn pick_sumsq(qlora_dtype grad_dtype, bool vec) {
    if (grad_dtype == QLORA_F32)
        return vec ? sumsq_partial_kernel<QLORA_F32, true> : sumsq_partial_kernel<QLORA_F32, false>;
    return vec ? sumsq_partial_kernel<QLORA_BF16, true> : sumsq_partial_kernel<QLORA_BF16, false>;
}

bool grad_dtype_ok(qlora_dtype d) { return d == QLORA_F32 || d == QLORA_BF16; }

bool aligned(const void *p, uintptr_t bytes) { return (uintptr_t)p % bytes == 0; }

} // namespace

/* ------------------------------------------------------------------ launchers */

extern "C" qlora_status ql_cuda_adamw_update(ql_cuda_state *s, const struct ql_adamw_step *step, uint16_t *d_param,
                                             float *d_master, const void *d_grad, qlora_dtype grad_dtype, float *d_m,
                                             float *d_v, int64_t n) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(step != NULL, "step");
    QL_REQUIRE_ARG(n >= 0, "n");
    if (!grad_dtype_ok(grad_dtype))
        return ql_fail(QLORA_ERR_DTYPE, "ql_cuda_adamw_update: gradient dtype %s is not F32 or BF16",
                       qlora_dtype_name(grad_dtype));
    if (n == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(d_param != NULL, "d_param");
    QL_REQUIRE_ARG(d_grad != NULL, "d_grad");
    QL_REQUIRE_ARG(d_m != NULL, "d_m");
    QL_REQUIRE_ARG(d_v != NULL, "d_v");
    const uintptr_t grad_elem = grad_dtype == QLORA_F32 ? 4 : 2;
    if (!aligned(d_param, 2) || !aligned(d_grad, grad_elem) || !aligned(d_m, 4) || !aligned(d_v, 4) ||
        (d_master && !aligned(d_master, 4)))
        return ql_fail(QLORA_ERR_INVALID_ARG,
                       "ql_cuda_adamw_update: a buffer is not aligned to its element size (param %p, master %p, "
                       "grad %p, m %p, v %p)",
                       (void *)d_param, (void *)d_master, d_grad, (void *)d_m, (void *)d_v);
    const bool vec = aligned(d_param, 16) && aligned(d_grad, 16) && aligned(d_m, 16) && aligned(d_v, 16) &&
                     (!d_master || aligned(d_master, 16));
    adamw_update_fn kernel = pick_update(d_master != NULL, grad_dtype, vec);

    QL_CUDA_ENTER(s);
    int per_sm = 0;
    QL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kUpdateThreads, 0));
    if (per_sm < 1)
        per_sm = 1;
    const int64_t work = vec ? n / kPack : n;
    int64_t ctas = (work + kUpdateThreads - 1) / kUpdateThreads;
    const int64_t resident = (int64_t)s->sm_count * per_sm;
    if (ctas > resident)
        ctas = resident; /* grid-stride beyond one full wave */
    if (ctas < 1)
        ctas = 1; /* CTA 0 also does the tail */
    const dim3 grid((unsigned)ctas), block(kUpdateThreads);
    kernel<<<grid, block, 0, s->stream>>>(*step, d_param, d_master, d_grad, d_m, d_v, n);
    char name[96];
    snprintf(name, sizeof name, "adamw_update_kernel<%s,%s,%s>", d_master ? "master" : "bf16-only",
             qlora_dtype_name(grad_dtype), vec ? "vec" : "scalar");
    QL_CUDA_CHECK_LAUNCH(name, grid, block);
    return QLORA_OK;
}

extern "C" qlora_status ql_cuda_grad_sumsq(ql_cuda_state *s, const void *d_grad, qlora_dtype grad_dtype, int64_t n,
                                           double *sumsq, int *nonfinite) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(sumsq != NULL, "sumsq");
    *sumsq = 0.0;
    if (nonfinite)
        *nonfinite = 0;
    QL_REQUIRE_ARG(n >= 0, "n");
    if (!grad_dtype_ok(grad_dtype))
        return ql_fail(QLORA_ERR_DTYPE, "ql_cuda_grad_sumsq: gradient dtype %s is not F32 or BF16",
                       qlora_dtype_name(grad_dtype));
    if (n == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(d_grad != NULL, "d_grad");
    const uintptr_t elem = grad_dtype == QLORA_F32 ? 4 : 2;
    if (!aligned(d_grad, elem))
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_grad_sumsq: gradient %p is not aligned to its %u-byte dtype",
                       d_grad, (unsigned)elem);
    const int64_t group = grad_dtype == QLORA_F32 ? 4 : 8;
    const int64_t ngroups = (n + group - 1) / group;
    int64_t ctas = (ngroups + kSumsqThreads - 1) / kSumsqThreads;
    if (ctas > kSumsqMaxBlocks)
        ctas = kSumsqMaxBlocks;
    sumsq_partial_fn kernel = pick_sumsq(grad_dtype, aligned(d_grad, 16));

    QL_CUDA_ENTER(s);
    sumsq_lock_scope lock;
    double *d_partials = NULL, *d_total = NULL;
    QL_CUDA_CHECK(cudaGetSymbolAddress((void **)&d_partials, g_sumsq_partials));
    QL_CUDA_CHECK(cudaGetSymbolAddress((void **)&d_total, g_sumsq_total));
    const dim3 grid((unsigned)ctas), block(kSumsqThreads);
    kernel<<<grid, block, 0, s->stream>>>(d_grad, n, d_partials);
    char name[96];
    snprintf(name, sizeof name, "sumsq_partial_kernel<%s>", qlora_dtype_name(grad_dtype));
    QL_CUDA_CHECK_LAUNCH(name, grid, block);
    const dim3 final_grid(1), final_block(kSumsqMaxBlocks);
    sumsq_final_kernel<<<final_grid, final_block, 0, s->stream>>>(d_partials, (int)ctas, d_total);
    QL_CUDA_CHECK_LAUNCH("sumsq_final_kernel", final_grid, final_block);
    double total = 0.0;
    QL_CUDA_CHECK(cudaMemcpyAsync(&total, d_total, sizeof total, cudaMemcpyDeviceToHost, s->stream));
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    /* Squares of finite float32 values cannot overflow a double sum: the total is NaN/Inf exactly
     * when some element is. */
    *sumsq = total;
    if (nonfinite)
        *nonfinite = !isfinite(total);
    return QLORA_OK;
}
