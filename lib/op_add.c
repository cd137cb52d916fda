/* The residual add of the decoder layers (lib/model_ops.h), rounded to BF16 as HF's BF16 add is. */
#include "model_ops.h"

#include "half.h"
#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

#define QL_ADD_PARALLEL_MIN (1 << 15)

qlora_status ql_add_bf16(qlora_ctx *ctx, uint16_t *dst, const uint16_t *src, int64_t n) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(dst != NULL && src != NULL, "dst/src");
    QL_REQUIRE_ARG(n >= 0, "n");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_add_bf16((ql_cuda_state *)ctx->cuda, dst, src, n);
#endif
    int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (n >= QL_ADD_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++)
        dst[i] = ql_f32_to_bf16(ql_bf16_to_f32(dst[i]) + ql_bf16_to_f32(src[i]));
    return QLORA_OK;
}
