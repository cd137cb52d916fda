/*
 * The QLoRA linear layer inside libqlora: the layer and adapter structs (lib/linear.c owns
 * them) and the contract of the host kernels, which come in two flavours computing the same
 * function (include/qlora.h, "QLoRA linear layer"): lib/linear_ref.c (scalar, FP64 accumulation,
 * written for clarity) and lib/linear_fast.c (W dequantized tile by tile + OpenBLAS, OpenMP).
 * Shapes: X [M, K] (K = in), W [N, K] (N = out), A [r, K], B [N, r], H and G [M, r].
 */
#ifndef QLORA_LINEAR_INTERNAL_H
#define QLORA_LINEAR_INTERNAL_H

#include "half.h"
#include "internal.h"
#include "philox.h"

/* The Philox stream that initializes A; forward rejects it as a dropout stream. */
#define QL_LORA_INIT_STREAM UINT64_MAX

typedef struct ql_lora_adapter {
    char name[QLORA_NAME_MAX];
    qlora_lora_params params;
    float scaling;
    uint64_t key;           /* Philox key: seed mixed with the weight's and the adapter's names */
    int enabled;
    qlora_tensor a, b;      /* A [r, K], B [N, r] BF16 (ADAPTER_WEIGHTS) */
    qlora_tensor da, db;    /* same shapes, grad_dtype (ADAPTER_GRADS) */
} ql_lora_adapter;

struct qlora_linear {
    qlora_ctx *ctx;
    qlora_qtensor *weight;  /* [N, K], referenced */
    qlora_tensor bias;      /* [N] BF16, referenced; data NULL when there is none */
    int64_t in, out;
    int count;
    ql_lora_adapter adapters[QLORA_LINEAR_MAX_ADAPTERS];
};

/* The Philox key of an adapter (see include/qlora.h). */
uint64_t ql_lora_key(uint64_t seed, const char *weight_name, const char *adapter_name);

/* One enabled adapter as a host kernel sees it. Dropout is off when p == 0 (inference, or an
 * adapter without dropout). */
typedef struct ql_lora_term {
    const uint16_t *a, *b;  /* A [r, K], B [N, r] BF16 */
    int rank;
    float scaling;
    float p;                /* dropout probability applied, 0 = none */
    uint64_t key, stream;   /* Philox key and counter stream of the mask */
    uint16_t *h;            /* H [M, r] BF16: written by forward, read by backward */
    void *da, *db;          /* gradients (backward), accumulated */
    qlora_dtype grad_dtype; /* QLORA_BF16 or QLORA_F32 */
} ql_lora_term;

/* 1 when element `index` (= i·K + k) of the mask is kept. */
static inline int ql_lora_keep(const ql_lora_term *t, uint64_t index) {
    return ql_philox_uniform(t->key, t->stream, index) >= t->p;
}

/* The scale of kept elements, 1 / (1 - p) in float32 (what the CUDA kernel uses too). */
static inline float ql_lora_dropout_scale(float p) { return 1.0f / (1.0f - p); }

/* dropout(x) of one kept element: bf16(x · scale), as a float. */
static inline float ql_lora_dropped_value(uint16_t x, float scale) {
    return ql_bf16_to_f32(ql_f32_to_bf16(ql_bf16_to_f32(x) * scale));
}

/* Uniforms of the four mask elements 4·group .. 4·group + 3 from one Philox call: equal to
 * ql_philox_uniform(key, stream, 4·group + e) (same counter layout), four times cheaper. */
static inline void ql_lora_uniform4(uint64_t key, uint64_t stream, uint64_t group, float u[4]) {
    ql_philox_out o = ql_philox4x32(key, (uint32_t)group, (uint32_t)stream, (uint32_t)(stream >> 32),
                                    (uint32_t)(group >> 32));
    for (int e = 0; e < 4; e++)
        u[e] = (float)(o.v[e] >> 8) * 5.9604644775390625e-8f;
}

/* --- host kernels: ctx is for workspace allocations (WORKSPACE, freed before returning) ---
 * forward: y [M, N] = x·Wᵀ + bias + Σ s·H·Bᵀ, writing each term's h. bias may be NULL.
 * backward: accumulates each term's da, db from its h; writes dx [M, K] unless dx is NULL.
 * merge: w [N, K] float32 += s · B·A. */
qlora_status ql_linear_forward_ref(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *bias, const uint16_t *x,
                                   int64_t m, const ql_lora_term *terms, int nterms, uint16_t *y);
qlora_status ql_linear_backward_ref(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *x, const uint16_t *dy,
                                    int64_t m, const ql_lora_term *terms, int nterms, uint16_t *dx);
void ql_linear_merge_ref(float *w, int64_t n, int64_t k, const ql_lora_term *term);

qlora_status ql_linear_forward_fast(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *bias, const uint16_t *x,
                                    int64_t m, const ql_lora_term *terms, int nterms, uint16_t *y);
qlora_status ql_linear_backward_fast(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *x, const uint16_t *dy,
                                     int64_t m, const ql_lora_term *terms, int nterms, uint16_t *dx);
qlora_status ql_linear_merge_fast(qlora_ctx *ctx, float *w, int64_t n, int64_t k, const ql_lora_term *term);

#ifdef QLORA_HAVE_CUDA
/* The same three on a CUDA context (lib/linear_device.c): every pointer is device memory; the
 * work is queued on the context's stream through the launchers of cuda/linear_cuda.h. */
qlora_status ql_linear_forward_cuda(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *bias, const uint16_t *x,
                                    int64_t m, const ql_lora_term *terms, int nterms, uint16_t *y);
qlora_status ql_linear_backward_cuda(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *x, const uint16_t *dy,
                                     int64_t m, const ql_lora_term *terms, int nterms, uint16_t *dx);
qlora_status ql_linear_merge_cuda(qlora_ctx *ctx, float *w, int64_t n, int64_t k, const ql_lora_term *term);
#endif

#endif
