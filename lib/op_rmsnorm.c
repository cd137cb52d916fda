/*
 * RMSNorm as HF's LlamaRMSNorm computes it (lib/model_ops.h): the normalization in float32,
 * rounded to BF16 before the weight multiplies it. One row per loop iteration, rows in parallel.
 */
#include "model_ops.h"

#include <math.h>

#include "half.h"
#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

/* Below this many elements the work runs on one thread (a parallel region costs more). */
#define QL_RMSNORM_PARALLEL_MIN (1 << 14)

static float row_rstd(const uint16_t *x, int64_t dim, float eps) {
    /* torch sums float32 pairwise, close to the exact sum; a double sum rounded once gets
     * nearest to both. Its mean is sum.div_(dim), a multiply by the float32 reciprocal, and
     * torch.rsqrt on float32 is 1/sqrt with two roundings. */
    double sum = 0.0;
    for (int64_t i = 0; i < dim; i++) {
        double v = ql_bf16_to_f32(x[i]);
        sum += v * v;
    }
    float var = (float)sum * (1.0f / (float)dim);
    return 1.0f / sqrtf(var + eps);
}

static qlora_status check_args(const qlora_ctx *ctx, const void *x, const uint16_t *weight, int64_t rows,
                               int64_t dim, float eps, const void *out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(x != NULL && weight != NULL && out != NULL, "x/weight/out");
    QL_REQUIRE_ARG(rows >= 0 && dim > 0, "rows/dim");
    QL_REQUIRE_ARG(eps >= 0.0f && isfinite(eps), "eps");
    return QLORA_OK;
}

qlora_status ql_rmsnorm_forward(qlora_ctx *ctx, const uint16_t *x, const uint16_t *weight, int64_t rows,
                                int64_t dim, float eps, uint16_t *y) {
    QL_CHECK(check_args(ctx, x, weight, rows, dim, eps, y));
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_rmsnorm_forward((ql_cuda_state *)ctx->cuda, x, weight, rows, dim, eps, y);
#endif
    int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * dim >= QL_RMSNORM_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *yr = y + r * dim;
        float rstd = row_rstd(xr, dim, eps);
        for (int64_t i = 0; i < dim; i++) {
            float normed = ql_bf16_to_f32(ql_f32_to_bf16(ql_bf16_to_f32(xr[i]) * rstd));
            yr[i] = ql_f32_to_bf16(ql_bf16_to_f32(weight[i]) * normed);
        }
    }
    return QLORA_OK;
}

qlora_status ql_rmsnorm_backward(qlora_ctx *ctx, const uint16_t *x, const uint16_t *weight, const uint16_t *dy,
                                 int64_t rows, int64_t dim, float eps, uint16_t *dx) {
    QL_CHECK(check_args(ctx, x, weight, rows, dim, eps, dx));
    QL_REQUIRE_ARG(dy != NULL, "dy");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_rmsnorm_backward((ql_cuda_state *)ctx->cuda, x, weight, dy, rows, dim, eps, dx);
#endif
    int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * dim >= QL_RMSNORM_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim, *dyr = dy + r * dim;
        float rstd = row_rstd(xr, dim, eps);
        /* mean over the row of g·n̂ with g = dy·w, n̂ = x·rstd */
        float dot = 0.0f;
        for (int64_t i = 0; i < dim; i++)
            dot += ql_bf16_to_f32(dyr[i]) * ql_bf16_to_f32(weight[i]) * ql_bf16_to_f32(xr[i]) * rstd;
        float mean_gn = dot / (float)dim;
        for (int64_t i = 0; i < dim; i++) {
            float g = ql_bf16_to_f32(dyr[i]) * ql_bf16_to_f32(weight[i]);
            float n_hat = ql_bf16_to_f32(xr[i]) * rstd;
            dx[r * dim + i] = ql_f32_to_bf16(rstd * (g - n_hat * mean_gn));
        }
    }
    return QLORA_OK;
}
