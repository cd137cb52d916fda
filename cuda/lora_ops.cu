/*
 * The LoRA side of the linear layer on CUDA: dropout of the adapter input with the shared
 * Philox stream (lib/philox.h, so masks equal the CPU's), and row-major BF16 GEMMs through
 * cublasGemmEx with FP32 compute.
 */
#include "nf4_matmul.cuh"

#include <limits.h>
#include <math.h>

#include "philox.h"

namespace {

constexpr int kThreads = 256;

/* One Philox call serves the 4 consecutive elements 4i..4i+3, exactly the elements whose
 * ql_philox_uniform(seed, stream, index) shares the counter index/4; lane index%4 and the
 * conversion (24 high bits * 2^-24) are the ones of ql_philox_uniform. x and out may alias.
 * kAccumulate: out += dropout(x) (one bf16 rounding of the float sum) instead of out = ... */
template <bool kAccumulate>
__global__ void __launch_bounds__(kThreads)
    dropout_kernel(const uint16_t *x, int64_t n, float p, float scale, uint64_t seed, uint64_t stream,
                   uint16_t *out) {
    const int64_t groups = (n + 3) / 4;
    for (int64_t gi = (int64_t)blockIdx.x * kThreads + threadIdx.x; gi < groups; gi += (int64_t)gridDim.x * kThreads) {
        const uint64_t counter = (uint64_t)gi;
        const ql_philox_out o = ql_philox4x32(seed, (uint32_t)counter, (uint32_t)stream, (uint32_t)(stream >> 32),
                                              (uint32_t)(counter >> 32));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int64_t idx = 4 * gi + i;
            if (idx < n) {
                const float u = (float)(o.v[i] >> 8) * 5.9604644775390625e-8f;
                const float kept = u >= p ? __fmul_rn(ql_bf16_bits_to_f32(x[idx]), scale) : 0.0f;
                if (kAccumulate)
                    out[idx] = ql_f32_to_bf16_bits(__fadd_rn(ql_bf16_bits_to_f32(out[idx]), kept));
                else
                    out[idx] = ql_f32_to_bf16_bits(kept);
            }
        }
    }
}

/* c[i] = beta * c[i] (c not read when beta == 0): a GEMM with k = 0. */
__global__ void __launch_bounds__(kThreads) scale_kernel(void *c, int64_t n, float beta, int c_f32) {
    for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += (int64_t)gridDim.x * kThreads) {
        if (c_f32) {
            float *f = static_cast<float *>(c);
            f[i] = beta == 0.0f ? 0.0f : __fmul_rn(beta, f[i]);
        } else {
            uint16_t *h = static_cast<uint16_t *>(c);
            h[i] = beta == 0.0f ? (uint16_t)0 : ql_f32_to_bf16_bits(__fmul_rn(beta, ql_bf16_bits_to_f32(h[i])));
        }
    }
}

dim3 stride_grid(const ql_cuda_state *s, int64_t items) {
    int64_t ctas = (items + kThreads - 1) / kThreads;
    const int64_t most = (int64_t)s->sm_count * 8;
    if (ctas > most)
        ctas = most;
    return dim3((unsigned)(ctas < 1 ? 1 : ctas));
}

} // namespace

qlora_status ql_cublas_gemm(ql_cuda_state *s, cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k,
                            float alpha, const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, void *c,
                            cudaDataType_t ctype, int ldc) {
    QL_CUBLAS_CHECK(cublasSetMathMode(
        s->cublas, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    QL_CUBLAS_CHECK(cublasGemmEx(s->cublas, op_a, op_b, m, n, k, &alpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb,
                                 &beta, c, ctype, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return QLORA_OK;
}

static qlora_status dropout_launch(ql_cuda_state *s, const uint16_t *d_x, int64_t m, int64_t k, float p, uint64_t seed,
                                   uint64_t stream, uint16_t *d_out, bool accumulate) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (m < 0 || k < 0)
        return ql_fail(QLORA_ERR_SHAPE, "ql_cuda_dropout_bf16: shape [%lld, %lld] has a negative dimension",
                       (long long)m, (long long)k);
    if (!(p >= 0.0f && p < 1.0f))
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_dropout_bf16: dropout probability %g is not in [0, 1)",
                       (double)p);
    const int64_t n = m * k;
    if (n == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(d_x != NULL, "d_x");
    QL_REQUIRE_ARG(d_out != NULL, "d_out");
    if ((uintptr_t)d_x % 2 != 0 || (uintptr_t)d_out % 2 != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_dropout_bf16: input %p or output %p is not 2-byte aligned",
                       (const void *)d_x, (void *)d_out);
    const float scale = 1.0f / (1.0f - p);
    QL_CUDA_ENTER(s);
    const dim3 grid = stride_grid(s, (n + 3) / 4), block(kThreads);
    if (accumulate) {
        dropout_kernel<true><<<grid, block, 0, s->stream>>>(d_x, n, p, scale, seed, stream, d_out);
        QL_CUDA_CHECK_LAUNCH("dropout_kernel<accumulate>", grid, block);
    } else {
        dropout_kernel<false><<<grid, block, 0, s->stream>>>(d_x, n, p, scale, seed, stream, d_out);
        QL_CUDA_CHECK_LAUNCH("dropout_kernel", grid, block);
    }
    return QLORA_OK;
}

extern "C" qlora_status ql_cuda_dropout_bf16(ql_cuda_state *s, const uint16_t *d_x, int64_t m, int64_t k, float p,
                                             uint64_t seed, uint64_t stream, uint16_t *d_out) {
    return dropout_launch(s, d_x, m, k, p, seed, stream, d_out, false);
}

extern "C" qlora_status ql_cuda_dropout_add_bf16(ql_cuda_state *s, const uint16_t *d_x, int64_t m, int64_t k, float p,
                                                 uint64_t seed, uint64_t stream, uint16_t *d_acc) {
    return dropout_launch(s, d_x, m, k, p, seed, stream, d_acc, true);
}

extern "C" qlora_status ql_cuda_gemm_bf16(ql_cuda_state *s, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                                          float alpha, const uint16_t *d_a, const uint16_t *d_b, float beta, void *d_c,
                                          int c_f32) {
    static const char fn[] = "ql_cuda_gemm_bf16";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (m < 0 || n < 0 || k < 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: m = %lld, n = %lld, k = %lld: negative dimension", fn, (long long)m,
                       (long long)n, (long long)k);
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: m = %lld, n = %lld, k = %lld exceeds cuBLAS' int range", fn,
                       (long long)m, (long long)n, (long long)k);
    if (!isfinite(alpha) || !isfinite(beta))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: alpha %g or beta %g is not finite", fn, (double)alpha,
                       (double)beta);
    if (m == 0 || n == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(d_c != NULL, "d_c");
    QL_REQUIRE_ARG(k == 0 || (d_a != NULL && d_b != NULL), "d_a, d_b");
    if ((uintptr_t)d_a % 2 != 0 || (uintptr_t)d_b % 2 != 0 || (uintptr_t)d_c % (c_f32 ? 4 : 2) != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: an operand is not aligned to its element size", fn);
    QL_CUDA_ENTER(s);
    if (k == 0) {
        const dim3 grid = stride_grid(s, m * n), block(kThreads);
        scale_kernel<<<grid, block, 0, s->stream>>>(d_c, m * n, beta, c_f32);
        QL_CUDA_CHECK_LAUNCH("scale_kernel", grid, block);
        return QLORA_OK;
    }
    /* Row-major C[m, n] = op(A)·op(B) is column-major Cᵀ[n, m] = op(B)ᵀ·op(A)ᵀ, and a row-major
     * buffer read column-major is the transpose: so B comes first, with the same op flags. */
    const int ldb = (int)(trans_b ? k : n), lda = (int)(trans_a ? m : k);
    return ql_cublas_gemm(s, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m,
                          (int)k, alpha, d_b, ldb, d_a, lda, beta, d_c, c_f32 ? CUDA_R_32F : CUDA_R_16BF, (int)n);
}
