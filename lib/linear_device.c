/*
 * The QLoRA linear layer on a CUDA context: the order of launches (cuda/linear_cuda.h) that
 * computes the formulas of include/qlora.h. The LoRA products go first, so that the 4-bit
 * matmul, the expensive pass, accumulates onto them (beta = 1) and writes the output once.
 * Compiled only with the CUDA backend.
 */
#ifdef QLORA_HAVE_CUDA

#include "linear_cuda.h"
#include "linear_internal.h"

static ql_cuda_state *state(qlora_ctx *ctx) { return (ql_cuda_state *)ctx->cuda; }

static qlora_status device_scratch(qlora_ctx *ctx, size_t bytes, void **out) {
    return qlora_alloc(ctx, bytes, 1, QLORA_MEM_WORKSPACE, out);
}

qlora_status ql_linear_forward_cuda(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *bias, const uint16_t *x,
                                    int64_t m, const ql_lora_term *terms, int nterms, uint16_t *y) {
    ql_cuda_state *s = state(ctx);
    int64_t n_dim = w->shape[0], k_dim = w->shape[1];
    uint16_t *dropped = NULL;
    qlora_status st = QLORA_OK;
    /* H = dropout(X)·Aᵀ per adapter */
    for (int t = 0; t < nterms && st == QLORA_OK; t++) {
        const ql_lora_term *term = &terms[t];
        const uint16_t *input = x;
        if (term->p != 0.0f) {
            if (!dropped)
                st = device_scratch(ctx, (size_t)(m * k_dim) * 2, (void **)&dropped);
            if (st == QLORA_OK)
                st = ql_cuda_dropout_bf16(s, x, m, k_dim, term->p, term->key, term->stream, dropped);
            input = dropped;
        }
        if (st == QLORA_OK)
            st = ql_cuda_gemm_bf16(s, 0, 1, m, term->rank, k_dim, 1.0f, input, term->a, 0.0f, term->h, 0);
    }
    /* Y = Σ s·H·Bᵀ, then Y += X·Wᵀ + bias */
    for (int t = 0; t < nterms && st == QLORA_OK; t++)
        st = ql_cuda_gemm_bf16(s, 0, 1, m, n_dim, terms[t].rank, terms[t].scaling, terms[t].h, terms[t].b,
                               t ? 1.0f : 0.0f, y, 0);
    if (st == QLORA_OK)
        st = ql_cuda_nf4_matmul(s, w, x, m, bias, nterms ? 1.0f : 0.0f, y, QL_NF4_PATH_AUTO);
    qlora_free(ctx, dropped);
    return st;
}

qlora_status ql_linear_backward_cuda(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *x, const uint16_t *dy,
                                     int64_t m, const ql_lora_term *terms, int nterms, uint16_t *dx) {
    ql_cuda_state *s = state(ctx);
    int64_t n_dim = w->shape[0], k_dim = w->shape[1];
    int masked = 0;
    for (int t = 0; t < nterms; t++)
        masked += terms[t].p != 0.0f;
    uint16_t *g[QLORA_LINEAR_MAX_ADAPTERS] = {NULL};
    uint16_t *scratch = NULL; /* dropout(X), then the masked product */
    qlora_status st = QLORA_OK;
    if (masked)
        st = device_scratch(ctx, (size_t)(m * k_dim) * 2, (void **)&scratch);
    /* G = dY·B; dB += s·dYᵀ·H; dA += s·Gᵀ·dropout(X) */
    for (int t = 0; t < nterms && st == QLORA_OK; t++) {
        const ql_lora_term *term = &terms[t];
        int f32 = term->grad_dtype == QLORA_F32;
        st = device_scratch(ctx, (size_t)(m * term->rank) * 2, (void **)&g[t]);
        if (st == QLORA_OK)
            st = ql_cuda_gemm_bf16(s, 0, 0, m, term->rank, n_dim, 1.0f, dy, term->b, 0.0f, g[t], 0);
        if (st == QLORA_OK)
            st = ql_cuda_gemm_bf16(s, 1, 0, n_dim, term->rank, m, term->scaling, dy, term->h, 1.0f, term->db, f32);
        const uint16_t *input = x;
        if (st == QLORA_OK && term->p != 0.0f) {
            st = ql_cuda_dropout_bf16(s, x, m, k_dim, term->p, term->key, term->stream, scratch);
            input = scratch;
        }
        if (st == QLORA_OK)
            st = ql_cuda_gemm_bf16(s, 1, 0, term->rank, k_dim, m, term->scaling, g[t], input, 1.0f, term->da, f32);
    }
    /* dX = Σ dropout'(s·G·A) over adapters with dropout (each with its own mask) + Σ s·G·A over
     * the others + dY·W */
    int written = 0;
    for (int t = 0; dx && t < nterms && st == QLORA_OK; t++) {
        const ql_lora_term *term = &terms[t];
        if (term->p == 0.0f)
            continue;
        st = ql_cuda_gemm_bf16(s, 0, 0, m, k_dim, term->rank, term->scaling, g[t], term->a, 0.0f, scratch, 0);
        if (st == QLORA_OK && written)
            st = ql_cuda_dropout_add_bf16(s, scratch, m, k_dim, term->p, term->key, term->stream, dx);
        else if (st == QLORA_OK)
            st = ql_cuda_dropout_bf16(s, scratch, m, k_dim, term->p, term->key, term->stream, dx);
        written = 1;
    }
    for (int t = 0; dx && t < nterms && st == QLORA_OK; t++) {
        const ql_lora_term *term = &terms[t];
        if (term->p != 0.0f)
            continue;
        st = ql_cuda_gemm_bf16(s, 0, 0, m, k_dim, term->rank, term->scaling, g[t], term->a, written ? 1.0f : 0.0f,
                               dx, 0);
        written = 1;
    }
    if (dx && st == QLORA_OK)
        st = ql_cuda_nf4_matmul_dx(s, w, dy, m, written ? 1.0f : 0.0f, dx, QL_NF4_PATH_AUTO);
    for (int t = 0; t < nterms; t++)
        qlora_free(ctx, g[t]);
    qlora_free(ctx, scratch);
    return st;
}

qlora_status ql_linear_merge_cuda(qlora_ctx *ctx, float *w, int64_t n, int64_t k, const ql_lora_term *term) {
    return ql_cuda_gemm_bf16(state(ctx), 0, 0, n, k, term->rank, term->scaling, term->b, term->a, 1.0f, w, 1);
}

#endif
