/* The context: which backend runs the work, and the CUDA state when that backend is CUDA. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#include "linear_cuda.h"
#endif

void ql_alloc_table_destroy(qlora_ctx *ctx); /* allocator.c */

qlora_ctx_params qlora_ctx_default_params(void) {
    qlora_ctx_params p;
    memset(&p, 0, sizeof p);
    p.backend = QLORA_BACKEND_CPU;
    p.device = 0;
    p.num_threads = 0;
    p.cpu_kernels = QLORA_CPU_FAST;
    return p;
}

int qlora_cuda_device_count(void) {
#ifdef QLORA_HAVE_CUDA
    return ql_cuda_device_count();
#else
    return 0;
#endif
}

qlora_status qlora_ctx_create(const qlora_ctx_params *params, qlora_ctx **out) {
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    qlora_ctx_params p = params ? *params : qlora_ctx_default_params();
    if (p.backend != QLORA_BACKEND_CPU && p.backend != QLORA_BACKEND_CUDA)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_ctx_create: unknown backend %d", (int)p.backend);
    if (p.cpu_kernels != QLORA_CPU_FAST && p.cpu_kernels != QLORA_CPU_REFERENCE)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_ctx_create: unknown cpu_kernels %d", (int)p.cpu_kernels);
    if (p.num_threads < 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_ctx_create: num_threads %d < 0", p.num_threads);
#ifndef QLORA_HAVE_CUDA
    if (p.backend == QLORA_BACKEND_CUDA)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "qlora_ctx_create: this libqlora was built without the CUDA backend");
#endif
    qlora_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "qlora_ctx_create: out of host memory");
    ctx->params = p;
    pthread_mutex_init(&ctx->lock, NULL);
#ifdef QLORA_HAVE_CUDA
    if (p.backend == QLORA_BACKEND_CUDA) {
        int n = ql_cuda_device_count();
        if (p.device < 0 || p.device >= n) {
            pthread_mutex_destroy(&ctx->lock);
            free(ctx);
            return ql_fail(QLORA_ERR_DEVICE, "qlora_ctx_create: CUDA device %d requested, %d visible", p.device, n);
        }
        qlora_status st = ql_cuda_init(p.device, (ql_cuda_state **)&ctx->cuda);
        if (st != QLORA_OK) {
            pthread_mutex_destroy(&ctx->lock);
            free(ctx);
            return st;
        }
        ql_cuda_set_owner((ql_cuda_state *)ctx->cuda, ctx);
    }
#endif
    *out = ctx;
    return QLORA_OK;
}

void qlora_ctx_free(qlora_ctx *ctx) {
    if (!ctx)
        return;
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) /* the backend's own workspace is a tracked allocation: give it back first */
        ql_cuda_workspace_release((ql_cuda_state *)ctx->cuda);
#endif
    ql_alloc_table_destroy(ctx);
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        ql_cuda_destroy((ql_cuda_state *)ctx->cuda);
#endif
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}

qlora_backend qlora_ctx_backend(const qlora_ctx *ctx) { return ctx ? ctx->params.backend : QLORA_BACKEND_CPU; }

int qlora_ctx_device(const qlora_ctx *ctx) {
    return ctx && ctx->params.backend == QLORA_BACKEND_CUDA ? ctx->params.device : QLORA_DEVICE_HOST;
}

qlora_status qlora_ctx_synchronize(qlora_ctx *ctx) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_synchronize((ql_cuda_state *)ctx->cuda);
#endif
    return QLORA_OK;
}
