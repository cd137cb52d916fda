/*
 * The SwiGLU activation of the Llama MLP (lib/model_ops.h): down's input is silu(gate) · up,
 * rounded to BF16 where HF's BF16 modules round (after silu, after the product).
 */
#include "model_ops.h"

#include <math.h>

#include "half.h"
#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

#define QL_SWIGLU_PARALLEL_MIN (1 << 15)

static float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

qlora_status ql_swiglu_forward(qlora_ctx *ctx, const uint16_t *gate, const uint16_t *up, int64_t n, uint16_t *out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(gate != NULL && up != NULL && out != NULL, "gate/up/out");
    QL_REQUIRE_ARG(n >= 0, "n");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_swiglu_forward((ql_cuda_state *)ctx->cuda, gate, up, n, out);
#endif
    int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (n >= QL_SWIGLU_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float g = ql_bf16_to_f32(gate[i]);
        float act = ql_bf16_to_f32(ql_f32_to_bf16(g * sigmoid(g)));
        out[i] = ql_f32_to_bf16(act * ql_bf16_to_f32(up[i]));
    }
    return QLORA_OK;
}

qlora_status ql_swiglu_backward(qlora_ctx *ctx, const uint16_t *gate, const uint16_t *up, const uint16_t *dout,
                                int64_t n, uint16_t *dgate, uint16_t *dup) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(gate != NULL && up != NULL && dout != NULL && dgate != NULL && dup != NULL,
                   "gate/up/dout/dgate/dup");
    QL_REQUIRE_ARG(n >= 0, "n");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_swiglu_backward((ql_cuda_state *)ctx->cuda, gate, up, dout, n, dgate, dup);
#endif
    int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (n >= QL_SWIGLU_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float g = ql_bf16_to_f32(gate[i]), u = ql_bf16_to_f32(up[i]), d = ql_bf16_to_f32(dout[i]);
        float sg = sigmoid(g);
        /* silu'(g) = σ(g)·(1 + g·(1 − σ(g))) */
        dgate[i] = ql_f32_to_bf16(d * u * sg * (1.0f + g * (1.0f - sg)));
        dup[i] = ql_f32_to_bf16(d * g * sg);
    }
    return QLORA_OK;
}
