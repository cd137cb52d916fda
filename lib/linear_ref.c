/*
 * The QLoRA linear layer, scalar reference (lib/linear_internal.h): the whole weight is
 * dequantized with the reference 4-bit kernels, then every output element is one FP64 sum,
 * rounded to float32 and then to BF16. Written to be read next to the formulas in
 * include/qlora.h, not to be fast.
 */
#include "linear_internal.h"
#include "quant4.h"

#include <string.h>

/* W [N, K] as float32 (WORKSPACE). */
static qlora_status dequantize_weight(qlora_ctx *ctx, const qlora_qtensor *w, float **out) {
    float *values = NULL, *absmax = NULL;
    QL_CHECK(qlora_alloc(ctx, (size_t)w->numel * sizeof(float), 1, QLORA_MEM_WORKSPACE, (void **)&values));
    const float *scales = w->absmax;
    if (w->double_quant) {
        qlora_status st = qlora_alloc(ctx, (size_t)w->nblocks * sizeof(float), 1, QLORA_MEM_WORKSPACE,
                                      (void **)&absmax);
        if (st != QLORA_OK) {
            qlora_free(ctx, values);
            return st;
        }
        ql_double_dequant_ref(w->qabsmax, w->nested_absmax, w->nested_offset, w->nested_code, w->nblocks, absmax);
        scales = absmax;
    }
    ql_dequant4_ref(w->codes, scales, w->code, w->numel, w->blocksize, values, QLORA_F32);
    qlora_free(ctx, absmax);
    *out = values;
    return QLORA_OK;
}

static float bf16_round(double v) { return ql_bf16_to_f32(ql_f32_to_bf16((float)v)); }

/* Element (i, k) of the adapter input dropout(X). */
static double adapter_input(const ql_lora_term *t, const uint16_t *x, int64_t k_dim, int64_t i, int64_t k) {
    uint64_t index = (uint64_t)(i * k_dim + k);
    if (t->p == 0.0f)
        return ql_bf16_to_f32(x[index]);
    return ql_lora_keep(t, index) ? ql_lora_dropped_value(x[index], ql_lora_dropout_scale(t->p)) : 0.0;
}

/* grad += s · sum, rounded to the gradient's dtype. */
static void accumulate_grad(void *grad, qlora_dtype dtype, int64_t index, double scaled_sum) {
    if (dtype == QLORA_F32) {
        float *g = (float *)grad;
        g[index] = (float)(g[index] + scaled_sum);
    } else {
        uint16_t *g = (uint16_t *)grad;
        g[index] = ql_f32_to_bf16((float)(ql_bf16_to_f32(g[index]) + scaled_sum));
    }
}

qlora_status ql_linear_forward_ref(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *bias, const uint16_t *x,
                                   int64_t m, const ql_lora_term *terms, int nterms, uint16_t *y) {
    int64_t n_dim = w->shape[0], k_dim = w->shape[1];
    float *weight;
    QL_CHECK(dequantize_weight(ctx, w, &weight));
    /* H = bf16(dropout(X)·Aᵀ) for every adapter */
    for (int t = 0; t < nterms; t++) {
        const ql_lora_term *term = &terms[t];
        for (int64_t i = 0; i < m; i++)
            for (int j = 0; j < term->rank; j++) {
                double sum = 0.0;
                for (int64_t k = 0; k < k_dim; k++)
                    sum += adapter_input(term, x, k_dim, i, k) * ql_bf16_to_f32(term->a[j * k_dim + k]);
                term->h[i * term->rank + j] = ql_f32_to_bf16((float)sum);
            }
    }
    /* Y = X·Wᵀ + bias + Σ s·H·Bᵀ */
    for (int64_t i = 0; i < m; i++)
        for (int64_t n = 0; n < n_dim; n++) {
            double sum = bias ? ql_bf16_to_f32(bias[n]) : 0.0;
            for (int64_t k = 0; k < k_dim; k++)
                sum += (double)ql_bf16_to_f32(x[i * k_dim + k]) * weight[n * k_dim + k];
            for (int t = 0; t < nterms; t++) {
                const ql_lora_term *term = &terms[t];
                double lora = 0.0;
                for (int j = 0; j < term->rank; j++)
                    lora += (double)ql_bf16_to_f32(term->h[i * term->rank + j]) *
                            ql_bf16_to_f32(term->b[n * term->rank + j]);
                sum += term->scaling * lora;
            }
            y[i * n_dim + n] = ql_f32_to_bf16((float)sum);
        }
    qlora_free(ctx, weight);
    return QLORA_OK;
}

qlora_status ql_linear_backward_ref(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *x, const uint16_t *dy,
                                    int64_t m, const ql_lora_term *terms, int nterms, uint16_t *dx) {
    int64_t n_dim = w->shape[0], k_dim = w->shape[1];
    float *weight = NULL, *g = NULL;
    int64_t g_total = 0;
    for (int t = 0; t < nterms; t++)
        g_total += m * terms[t].rank;
    QL_CHECK(qlora_alloc(ctx, (size_t)g_total * sizeof(float), 1, QLORA_MEM_WORKSPACE, (void **)&g));
    /* G = bf16(dY·B), then dB += s·dYᵀ·H and dA += s·Gᵀ·dropout(X) */
    float *g_term = g;
    for (int t = 0; t < nterms; t++) {
        const ql_lora_term *term = &terms[t];
        int r = term->rank;
        for (int64_t i = 0; i < m; i++)
            for (int j = 0; j < r; j++) {
                double sum = 0.0;
                for (int64_t n = 0; n < n_dim; n++)
                    sum += (double)ql_bf16_to_f32(dy[i * n_dim + n]) * ql_bf16_to_f32(term->b[n * r + j]);
                g_term[i * r + j] = bf16_round(sum);
            }
        for (int64_t n = 0; n < n_dim; n++)
            for (int j = 0; j < r; j++) {
                double sum = 0.0;
                for (int64_t i = 0; i < m; i++)
                    sum += (double)ql_bf16_to_f32(dy[i * n_dim + n]) * ql_bf16_to_f32(term->h[i * r + j]);
                accumulate_grad(term->db, term->grad_dtype, n * r + j, term->scaling * sum);
            }
        for (int j = 0; j < r; j++)
            for (int64_t k = 0; k < k_dim; k++) {
                double sum = 0.0;
                for (int64_t i = 0; i < m; i++)
                    sum += (double)g_term[i * r + j] * adapter_input(term, x, k_dim, i, k);
                accumulate_grad(term->da, term->grad_dtype, j * k_dim + k, term->scaling * sum);
            }
        g_term += m * r;
    }
    /* dX = dY·W + Σ s·dropout'(G·A) */
    qlora_status st = QLORA_OK;
    if (dx)
        st = dequantize_weight(ctx, w, &weight);
    for (int64_t i = 0; dx && st == QLORA_OK && i < m; i++)
        for (int64_t k = 0; k < k_dim; k++) {
            double sum = 0.0;
            for (int64_t n = 0; n < n_dim; n++)
                sum += (double)ql_bf16_to_f32(dy[i * n_dim + n]) * weight[n * k_dim + k];
            g_term = g;
            for (int t = 0; t < nterms; t++) {
                const ql_lora_term *term = &terms[t];
                int r = term->rank;
                double lora = 0.0;
                for (int j = 0; j < r; j++)
                    lora += (double)g_term[i * r + j] * ql_bf16_to_f32(term->a[j * k_dim + k]);
                if (term->p != 0.0f)
                    lora *= ql_lora_keep(term, (uint64_t)(i * k_dim + k)) ? ql_lora_dropout_scale(term->p) : 0.0f;
                sum += term->scaling * lora;
                g_term += m * r;
            }
            dx[i * k_dim + k] = ql_f32_to_bf16((float)sum);
        }
    qlora_free(ctx, weight);
    qlora_free(ctx, g);
    return st;
}

void ql_linear_merge_ref(float *w, int64_t n, int64_t k, const ql_lora_term *term) {
    int r = term->rank;
    for (int64_t row = 0; row < n; row++)
        for (int64_t col = 0; col < k; col++) {
            double sum = 0.0;
            for (int j = 0; j < r; j++)
                sum += (double)ql_bf16_to_f32(term->b[row * r + j]) * ql_bf16_to_f32(term->a[j * k + col]);
            w[row * k + col] = (float)(w[row * k + col] + term->scaling * sum);
        }
}
