/*
 * The elementwise and per-row ops of the Llama layers on CUDA (cuda/model_ops_cuda.h): RMSNorm,
 * RoPE, SwiGLU, the residual add and the embedding gather. Each rounds exactly where its CPU
 * twin in lib/op_*.c rounds, with the same float32 operations in the same order, so the results
 * are the CPU's bit for bit except where noted: SwiGLU's expf (CUDA's and glibc's may differ in
 * the last float32 bit) and the RMSNorm backward's row sum (a tree here, a loop there).
 */
#include "model_ops_common.cuh"

#include <limits.h>

namespace {

constexpr int kRowThreads = 256; /* RMSNorm: one block per row */
constexpr int kEwThreads = 256;  /* elementwise kernels */

/* ------------------------------------------------------------------ RMSNorm */

/* lib/op_rmsnorm.c's row_rstd: a double sum of squares (exact for BF16 inputs of any sane range,
 * so its order does not matter), mean by the float32 reciprocal, 1/sqrt with two roundings. */
__device__ float rms_rstd(double sumsq, int64_t dim, float eps) {
    const float var = __fmul_rn(__double2float_rn(sumsq), __fdiv_rn(1.0f, (float)dim));
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
}

__device__ double row_sumsq(const uint16_t *xr, int64_t dim, double *red) {
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        const double v = mo_bf16(xr[i]);
        sum += v * v; /* exact product: an FMA here rounds the same */
    }
    return mo_block_sum(sum, red);
}

__global__ void __launch_bounds__(kRowThreads)
    rmsnorm_fwd_kernel(const uint16_t *x, const uint16_t *w, int64_t rows, int64_t dim, float eps, uint16_t *y) {
    __shared__ double red[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint16_t *xr = x + r * dim;
        uint16_t *yr = y + r * dim;
        const float rstd = rms_rstd(row_sumsq(xr, dim, red), dim, eps);
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
            const float normed = mo_round_bf16(__fmul_rn(mo_bf16(xr[i]), rstd));
            yr[i] = mo_to_bf16(__fmul_rn(mo_bf16(w[i]), normed));
        }
    }
}

/* dx = r·(g − n̂·mean(g·n̂)), g = dy·w, n̂ = x·r; each term in lib/op_rmsnorm.c's order. */
__global__ void __launch_bounds__(kRowThreads)
    rmsnorm_bwd_kernel(const uint16_t *x, const uint16_t *w, const uint16_t *dy, int64_t rows, int64_t dim,
                       float eps, uint16_t *dx) {
    __shared__ double red[32];
    __shared__ float redf[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint16_t *xr = x + r * dim, *dyr = dy + r * dim;
        const float rstd = rms_rstd(row_sumsq(xr, dim, red), dim, eps);
        float dot = 0.0f;
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
            const float g = __fmul_rn(mo_bf16(dyr[i]), mo_bf16(w[i]));
            dot = __fadd_rn(dot, __fmul_rn(__fmul_rn(g, mo_bf16(xr[i])), rstd));
        }
        const float mean_gn = __fdiv_rn(mo_block_sum(dot, redf), (float)dim);
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
            const float g = __fmul_rn(mo_bf16(dyr[i]), mo_bf16(w[i]));
            const float n_hat = __fmul_rn(mo_bf16(xr[i]), rstd);
            dx[r * dim + i] = mo_to_bf16(__fmul_rn(rstd, __fsub_rn(g, __fmul_rn(n_hat, mean_gn))));
        }
    }
}

/* ------------------------------------------------------------------ RoPE */

/* Threads x over the pairs (j, j + half) of a row, threads y over the rows (token, head). */
template <bool kBackward>
__global__ void __launch_bounds__(kEwThreads)
    rope_kernel(const uint16_t *cosv, const uint16_t *sinv, int half, const int32_t *pos, int64_t tokens, int heads,
                uint16_t *x) {
    const int64_t rows = tokens * heads;
    for (int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y; row < rows;
         row += (int64_t)gridDim.x * blockDim.y) {
        const int64_t t = row / heads;
        const int64_t p = pos[t];
        const uint16_t *c = cosv + p * half, *sn = sinv + p * half;
        uint16_t *xr = x + row * 2 * half;
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            const float x1 = mo_bf16(xr[j]), x2 = mo_bf16(xr[j + half]);
            const float cj = mo_bf16(c[j]), sj = mo_bf16(sn[j]);
            if (kBackward) {
                xr[j] = mo_to_bf16(__fadd_rn(__fmul_rn(x1, cj), __fmul_rn(x2, sj)));
                xr[j + half] = mo_to_bf16(__fsub_rn(__fmul_rn(x2, cj), __fmul_rn(x1, sj)));
            } else {
                /* q·cos + rotate_half(q)·sin with BF16 torch's rounding of each product and the sum */
                xr[j] = mo_to_bf16(__fadd_rn(mo_round_bf16(__fmul_rn(x1, cj)), mo_round_bf16(__fmul_rn(-x2, sj))));
                xr[j + half] = mo_to_bf16(__fadd_rn(mo_round_bf16(__fmul_rn(x2, cj)), mo_round_bf16(__fmul_rn(x1, sj))));
            }
        }
    }
}

/* ------------------------------------------------------------------ elementwise (SwiGLU, add) */

__device__ __forceinline__ float sigmoid(float g) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g))); }

struct swiglu_fwd_op {
    const uint16_t *gate, *up;
    uint16_t *out; /* may alias gate: each element is read before its own write, by one thread */
    __device__ static float value(float g, float u) {
        const float act = mo_round_bf16(__fmul_rn(g, sigmoid(g)));
        return __fmul_rn(act, u);
    }
    __device__ void one(int64_t i) const { out[i] = mo_to_bf16(value(mo_bf16(gate[i]), mo_bf16(up[i]))); }
    __device__ void eight(int64_t i) const {
        const uint4 gv = *(const uint4 *)(gate + i), uv = *(const uint4 *)(up + i);
        const uint32_t *gw = &gv.x, *uw = &uv.x;
        uint4 ov;
        uint32_t *ow = &ov.x;
#pragma unroll
        for (int k = 0; k < 4; k++)
            ow[k] = mo_pack(value(mo_lo(gw[k]), mo_lo(uw[k])), value(mo_hi(gw[k]), mo_hi(uw[k])));
        *(uint4 *)(out + i) = ov;
    }
};

struct swiglu_bwd_op {
    const uint16_t *gate, *up, *dout;
    uint16_t *dgate, *dup;
    /* silu'(g) = σ(g)·(1 + g·(1 − σ(g))), in lib/op_swiglu.c's order */
    __device__ static void value(float g, float u, float d, float *dg, float *du) {
        const float sg = sigmoid(g);
        *dg = __fmul_rn(__fmul_rn(__fmul_rn(d, u), sg), __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, sg))));
        *du = __fmul_rn(__fmul_rn(d, g), sg);
    }
    __device__ void one(int64_t i) const {
        float dg, du;
        value(mo_bf16(gate[i]), mo_bf16(up[i]), mo_bf16(dout[i]), &dg, &du);
        dgate[i] = mo_to_bf16(dg);
        dup[i] = mo_to_bf16(du);
    }
    __device__ void eight(int64_t i) const {
        const uint4 gv = *(const uint4 *)(gate + i), uv = *(const uint4 *)(up + i), dv = *(const uint4 *)(dout + i);
        const uint32_t *gw = &gv.x, *uw = &uv.x, *dw = &dv.x;
        uint4 gov, uov;
        uint32_t *gow = &gov.x, *uow = &uov.x;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float g0, u0, g1, u1;
            value(mo_lo(gw[k]), mo_lo(uw[k]), mo_lo(dw[k]), &g0, &u0);
            value(mo_hi(gw[k]), mo_hi(uw[k]), mo_hi(dw[k]), &g1, &u1);
            gow[k] = mo_pack(g0, g1);
            uow[k] = mo_pack(u0, u1);
        }
        *(uint4 *)(dgate + i) = gov;
        *(uint4 *)(dup + i) = uov;
    }
};

struct add_op {
    uint16_t *dst;
    const uint16_t *src;
    __device__ void one(int64_t i) const { dst[i] = mo_to_bf16(__fadd_rn(mo_bf16(dst[i]), mo_bf16(src[i]))); }
    __device__ void eight(int64_t i) const {
        const uint4 av = *(const uint4 *)(dst + i), bv = *(const uint4 *)(src + i);
        const uint32_t *aw = &av.x, *bw = &bv.x;
        uint4 ov;
        uint32_t *ow = &ov.x;
#pragma unroll
        for (int k = 0; k < 4; k++)
            ow[k] = mo_pack(__fadd_rn(mo_lo(aw[k]), mo_lo(bw[k])), __fadd_rn(mo_hi(aw[k]), mo_hi(bw[k])));
        *(uint4 *)(dst + i) = ov;
    }
};

/* 8 elements (one 16-byte access per operand) per step when `vec`, then the tail one by one. */
template <class Op>
__global__ void __launch_bounds__(kEwThreads) elementwise_kernel(Op op, int64_t n, int vec) {
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    int64_t done = 0;
    if (vec) {
        const int64_t groups = n / 8;
        for (int64_t g = first; g < groups; g += stride)
            op.eight(g * 8);
        done = groups * 8;
    }
    for (int64_t i = done + first; i < n; i += stride)
        op.one(i);
}

/* ------------------------------------------------------------------ embedding */

/* One block per token row; a token whose id is outside [0, vocab) is skipped and reported
 * through *bad (atomicMin of its index). */
__global__ void __launch_bounds__(kEwThreads)
    embedding_kernel(const uint16_t *table, int64_t vocab, int64_t hidden, const int32_t *ids, int64_t tokens,
                     uint16_t *out, int vec, unsigned long long *bad) {
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const int32_t id = ids[t];
        if (id < 0 || id >= vocab) {
            if (threadIdx.x == 0)
                atomicMin(bad, (unsigned long long)t);
            continue;
        }
        const uint16_t *src = table + (int64_t)id * hidden;
        uint16_t *dst = out + t * hidden;
        if (vec) {
            for (int64_t i = threadIdx.x; i < hidden / 8; i += blockDim.x)
                ((uint4 *)dst)[i] = ((const uint4 *)src)[i];
        } else {
            for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
                dst[i] = src[i];
        }
    }
}

/* ------------------------------------------------------------------ host side */

int aligned(const void *p, size_t bytes) { return (uintptr_t)p % bytes == 0; }

qlora_status check_bf16(const void *p, const char *fn, const char *what) {
    if (p == NULL)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s is NULL", fn, what);
    if (!aligned(p, 2))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s (%p) is not 2-byte aligned", fn, what, p);
    return QLORA_OK;
}

qlora_status check_i32(const void *p, const char *fn, const char *what) {
    if (p == NULL)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s is NULL", fn, what);
    if (!aligned(p, 4))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s (%p) is not 4-byte aligned", fn, what, p);
    return QLORA_OK;
}

qlora_status rmsnorm_launch(ql_cuda_state *s, const char *fn, const uint16_t *x, const uint16_t *w,
                            const uint16_t *dy, int64_t rows, int64_t dim, float eps, uint16_t *out) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (rows < 0 || dim <= 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: rows %lld, dim %lld", fn, (long long)rows, (long long)dim);
    if (!(eps >= 0.0f) || !isfinite(eps))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: eps %g is not finite and >= 0", fn, (double)eps);
    if (rows == 0)
        return QLORA_OK;
    QL_CHECK(check_bf16(x, fn, "x"));
    QL_CHECK(check_bf16(w, fn, "weight"));
    QL_CHECK(check_bf16(out, fn, dy ? "dx" : "y"));
    if (dy)
        QL_CHECK(check_bf16(dy, fn, "dy"));
    QL_CUDA_ENTER(s);
    const int64_t most = (int64_t)s->sm_count * 16;
    const dim3 grid((unsigned)(rows < most ? rows : most)), block(kRowThreads);
    if (dy) {
        rmsnorm_bwd_kernel<<<grid, block, 0, s->stream>>>(x, w, dy, rows, dim, eps, out);
        QL_CUDA_CHECK_LAUNCH("rmsnorm_bwd_kernel", grid, block);
    } else {
        rmsnorm_fwd_kernel<<<grid, block, 0, s->stream>>>(x, w, rows, dim, eps, out);
        QL_CUDA_CHECK_LAUNCH("rmsnorm_fwd_kernel", grid, block);
    }
    return QLORA_OK;
}

qlora_status rope_launch(ql_cuda_state *s, bool backward, const uint16_t *cosv, const uint16_t *sinv, int half,
                         const int32_t *pos, int64_t tokens, int heads, uint16_t *x) {
    const char *fn = backward ? "ql_cuda_rope_backward" : "ql_cuda_rope_forward";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (tokens < 0 || heads <= 0 || half <= 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: tokens %lld, heads %d, half %d", fn, (long long)tokens, heads, half);
    if (tokens == 0)
        return QLORA_OK;
    QL_CHECK(check_bf16(cosv, fn, "cos table"));
    QL_CHECK(check_bf16(sinv, fn, "sin table"));
    QL_CHECK(check_i32(pos, fn, "positions"));
    QL_CHECK(check_bf16(x, fn, "x"));
    QL_CUDA_ENTER(s);
    const int tx = half >= 128 ? 128 : half > 32 ? 64 : 32;
    const dim3 block(tx, kEwThreads / tx);
    const int64_t rows = tokens * heads, blocks = (rows + block.y - 1) / block.y, most = (int64_t)s->sm_count * 16;
    const dim3 grid((unsigned)(blocks < most ? blocks : most));
    if (backward) {
        rope_kernel<true><<<grid, block, 0, s->stream>>>(cosv, sinv, half, pos, tokens, heads, x);
        QL_CUDA_CHECK_LAUNCH("rope_kernel<backward>", grid, block);
    } else {
        rope_kernel<false><<<grid, block, 0, s->stream>>>(cosv, sinv, half, pos, tokens, heads, x);
        QL_CUDA_CHECK_LAUNCH("rope_kernel<forward>", grid, block);
    }
    return QLORA_OK;
}

template <class Op>
qlora_status elementwise_launch(ql_cuda_state *s, const char *kernel, const Op &op, int64_t n, int vec) {
    QL_CUDA_ENTER(s);
    const dim3 grid = mo_stride_grid(s, vec ? n / 8 + 8 : n, kEwThreads), block(kEwThreads);
    elementwise_kernel<Op><<<grid, block, 0, s->stream>>>(op, n, vec);
    QL_CUDA_CHECK_LAUNCH(kernel, grid, block);
    return QLORA_OK;
}

} // namespace

extern "C" qlora_status ql_cuda_rmsnorm_forward(ql_cuda_state *s, const uint16_t *d_x, const uint16_t *d_w,
                                                int64_t rows, int64_t dim, float eps, uint16_t *d_y) {
    return rmsnorm_launch(s, "ql_cuda_rmsnorm_forward", d_x, d_w, NULL, rows, dim, eps, d_y);
}

extern "C" qlora_status ql_cuda_rmsnorm_backward(ql_cuda_state *s, const uint16_t *d_x, const uint16_t *d_w,
                                                 const uint16_t *d_dy, int64_t rows, int64_t dim, float eps,
                                                 uint16_t *d_dx) {
    if (rows > 0 && d_dy == NULL)
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_rmsnorm_backward: dy is NULL");
    return rmsnorm_launch(s, "ql_cuda_rmsnorm_backward", d_x, d_w, d_dy, rows, dim, eps, d_dx);
}

extern "C" qlora_status ql_cuda_rope_forward(ql_cuda_state *s, const uint16_t *d_cos, const uint16_t *d_sin, int half,
                                             const int32_t *d_pos, int64_t tokens, int heads, uint16_t *d_x) {
    return rope_launch(s, false, d_cos, d_sin, half, d_pos, tokens, heads, d_x);
}

extern "C" qlora_status ql_cuda_rope_backward(ql_cuda_state *s, const uint16_t *d_cos, const uint16_t *d_sin,
                                              int half, const int32_t *d_pos, int64_t tokens, int heads,
                                              uint16_t *d_dx) {
    return rope_launch(s, true, d_cos, d_sin, half, d_pos, tokens, heads, d_dx);
}

extern "C" qlora_status ql_cuda_swiglu_forward(ql_cuda_state *s, const uint16_t *d_gate, const uint16_t *d_up,
                                               int64_t n, uint16_t *d_out) {
    static const char fn[] = "ql_cuda_swiglu_forward";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (n < 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: n = %lld", fn, (long long)n);
    if (n == 0)
        return QLORA_OK;
    QL_CHECK(check_bf16(d_gate, fn, "gate"));
    QL_CHECK(check_bf16(d_up, fn, "up"));
    QL_CHECK(check_bf16(d_out, fn, "out"));
    const int vec = aligned(d_gate, 16) && aligned(d_up, 16) && aligned(d_out, 16);
    return elementwise_launch(s, "elementwise_kernel<swiglu_fwd>", swiglu_fwd_op{d_gate, d_up, d_out}, n, vec);
}

extern "C" qlora_status ql_cuda_swiglu_backward(ql_cuda_state *s, const uint16_t *d_gate, const uint16_t *d_up,
                                                const uint16_t *d_dout, int64_t n, uint16_t *d_dgate,
                                                uint16_t *d_dup) {
    static const char fn[] = "ql_cuda_swiglu_backward";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (n < 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: n = %lld", fn, (long long)n);
    if (n == 0)
        return QLORA_OK;
    QL_CHECK(check_bf16(d_gate, fn, "gate"));
    QL_CHECK(check_bf16(d_up, fn, "up"));
    QL_CHECK(check_bf16(d_dout, fn, "dout"));
    QL_CHECK(check_bf16(d_dgate, fn, "dgate"));
    QL_CHECK(check_bf16(d_dup, fn, "dup"));
    const int vec = aligned(d_gate, 16) && aligned(d_up, 16) && aligned(d_dout, 16) && aligned(d_dgate, 16) &&
                    aligned(d_dup, 16);
    return elementwise_launch(s, "elementwise_kernel<swiglu_bwd>", swiglu_bwd_op{d_gate, d_up, d_dout, d_dgate, d_dup},
                              n, vec);
}

extern "C" qlora_status ql_cuda_add_bf16(ql_cuda_state *s, uint16_t *d_dst, const uint16_t *d_src, int64_t n) {
    static const char fn[] = "ql_cuda_add_bf16";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (n < 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: n = %lld", fn, (long long)n);
    if (n == 0)
        return QLORA_OK;
    QL_CHECK(check_bf16(d_dst, fn, "dst"));
    QL_CHECK(check_bf16(d_src, fn, "src"));
    const int vec = aligned(d_dst, 16) && aligned(d_src, 16);
    return elementwise_launch(s, "elementwise_kernel<add>", add_op{d_dst, d_src}, n, vec);
}

extern "C" qlora_status ql_cuda_embedding_forward(ql_cuda_state *s, const uint16_t *d_table, int64_t vocab,
                                                  int64_t hidden, const int32_t *d_ids, int64_t tokens,
                                                  uint16_t *d_out, int64_t *bad_id) {
    static const char fn[] = "ql_cuda_embedding_forward";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(bad_id != NULL, "bad_id");
    *bad_id = -1;
    if (vocab <= 0 || hidden <= 0 || tokens < 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: vocab %lld, hidden %lld, tokens %lld", fn, (long long)vocab,
                       (long long)hidden, (long long)tokens);
    if (tokens == 0)
        return QLORA_OK;
    QL_CHECK(check_bf16(d_table, fn, "table"));
    QL_CHECK(check_i32(d_ids, fn, "ids"));
    QL_CHECK(check_bf16(d_out, fn, "out"));
    const int vec = hidden % 8 == 0 && aligned(d_table, 16) && aligned(d_out, 16);
    QL_CUDA_ENTER(s);
    mo_scratch_lock lock(s);
    unsigned long long *d_flag = mo_scratch_flag(s);
    QL_CUDA_CHECK(cudaMemsetAsync(d_flag, 0xff, sizeof *d_flag, s->stream));
    const int64_t most = (int64_t)s->sm_count * 16;
    const dim3 grid((unsigned)(tokens < most ? tokens : most)), block(hidden >= 2048 ? kEwThreads : 128);
    embedding_kernel<<<grid, block, 0, s->stream>>>(d_table, vocab, hidden, d_ids, tokens, d_out, vec, d_flag);
    QL_CUDA_CHECK_LAUNCH("embedding_kernel", grid, block);
    unsigned long long flag = 0;
    QL_CUDA_CHECK(cudaMemcpyAsync(&flag, d_flag, sizeof flag, cudaMemcpyDeviceToHost, s->stream));
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    *bad_id = flag == ~0ull ? -1 : (int64_t)flag;
    return QLORA_OK;
}
