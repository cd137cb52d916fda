/*
 * CPU building blocks of the Llama-family forward and backward (internal): RMSNorm, RoPE,
 * SwiGLU, causal grouped-query attention over packed sequences, the chunked cross-entropy
 * against the lm_head, and the embedding gather. Each op has a forward and a backward.
 *
 * Conventions. Activations and activation gradients are BF16 stored as uint16_t, row-major;
 * all arithmetic accumulates in float32 (double where noted) and rounds to BF16 once per
 * value that HF also rounds. Dimensions: T tokens, H hidden, nh query heads, nkv key/value
 * heads, d head_dim, V vocab. ctx gives the thread count and tracks workspace allocations
 * (QLORA_MEM_WORKSPACE, freed before returning). Errors go through ql_fail; nothing prints.
 * The formulas follow /work/shared/spec/formats.md §2 (HF transformers' Llama).
 *
 * Backends. On a CUDA context every op runs the kernel of cuda/model_ops_cuda.h instead, and
 * every pointer argument (activations, weights, ids, labels, positions, seq_start, lse, the
 * RoPE table) must then be device memory; scalars and results (loss, count) stay on the host.
 * There, positions and seq_start are not read on the host: the caller validates them before
 * copying them over (the model does); ids and labels are checked on the device, and a bad one
 * fails naming its token as on the CPU.
 */
#ifndef QLORA_MODEL_OPS_H
#define QLORA_MODEL_OPS_H

#include <stdint.h>

#include "internal.h"

/* ---------------------------------------------------------------- RMSNorm
 * HF LlamaRMSNorm: n = bf16(x · rsqrt(mean(x²) + eps)) in float32, y = bf16(weight · n).
 * x, y [rows, dim]; weight [dim] BF16. The backward treats the weight as frozen and the
 * BF16 rounding of n as identity: dx = r·(g − n̂·mean(g·n̂)), g = dy·weight, n̂ = x·r (float32). */
qlora_status ql_rmsnorm_forward(qlora_ctx *ctx, const uint16_t *x, const uint16_t *weight, int64_t rows,
                                int64_t dim, float eps, uint16_t *y);
qlora_status ql_rmsnorm_backward(qlora_ctx *ctx, const uint16_t *x, const uint16_t *weight, const uint16_t *dy,
                                 int64_t rows, int64_t dim, float eps, uint16_t *dx);

/* ---------------------------------------------------------------- RoPE */
typedef enum ql_rope_type {
    QL_ROPE_DEFAULT = 0,
    QL_ROPE_LINEAR = 1, /* inv_freq / factor (positions divided by factor) */
    QL_ROPE_LLAMA3 = 2  /* transformers' _compute_llama3_parameters */
} ql_rope_type;

typedef struct ql_rope_params {
    ql_rope_type type;
    int head_dim;                     /* even */
    double theta;                     /* rope_theta */
    double factor;                    /* linear, llama3 */
    double low_freq_factor;           /* llama3 */
    double high_freq_factor;          /* llama3 */
    int64_t original_max_positions;   /* llama3: original_max_position_embeddings */
} ql_rope_params;

/* inv_freq [head_dim/2] in float32, bit for bit as transformers computes it on the CPU (up to
 * the last-bit differences of its vectorized pow; see tests/test_model_ops.c). */
qlora_status ql_rope_inv_freq(const ql_rope_params *p, float *inv_freq);

/* cos/sin per position, float32 angle pos·inv_freq, cos/sin in float32, cast to BF16 as HF casts
 * them to the activation dtype. Only d/2 columns are stored: HF's emb repeats them. */
typedef struct ql_rope_table {
    int64_t positions;   /* rows: positions 0 .. positions-1 */
    int half;            /* head_dim / 2 */
    uint16_t *cos, *sin; /* [positions, half] BF16, one tracked allocation (cos first) */
} ql_rope_table;

qlora_status ql_rope_table_init(qlora_ctx *ctx, const ql_rope_params *p, int64_t positions, ql_rope_table *out);
void ql_rope_table_free(qlora_ctx *ctx, ql_rope_table *t);

/* In place on x [T, heads, d] (d = 2·half), token t at position pos[t] (packed sequences restart
 * at 0). Forward, HF split halves with HF's BF16 roundings of each product and the sum:
 *   x1' = bf16(bf16(x1·c) − bf16(x2·s)),  x2' = bf16(bf16(x2·c) + bf16(x1·s)).
 * Backward (rotation by −angle, one rounding): dx1 = dy1·c + dy2·s, dx2 = dy2·c − dy1·s. */
qlora_status ql_rope_forward(qlora_ctx *ctx, const ql_rope_table *t, const int32_t *pos, int64_t tokens, int heads,
                             uint16_t *x);
qlora_status ql_rope_backward(qlora_ctx *ctx, const ql_rope_table *t, const int32_t *pos, int64_t tokens, int heads,
                              uint16_t *dx);

/* ---------------------------------------------------------------- SwiGLU
 * out = bf16(bf16(silu(gate)) · up) (HF: act_fn(gate) rounds, then the product rounds), over n
 * elements. Backward: dgate = dout·up·silu'(gate), dup = dout·silu(gate), in float32. */
qlora_status ql_swiglu_forward(qlora_ctx *ctx, const uint16_t *gate, const uint16_t *up, int64_t n, uint16_t *out);
qlora_status ql_swiglu_backward(qlora_ctx *ctx, const uint16_t *gate, const uint16_t *up, const uint16_t *dout,
                                int64_t n, uint16_t *dgate, uint16_t *dup);

/* ---------------------------------------------------------------- attention
 * Causal grouped-query attention, scale d^-0.5, softmax in float32. q, out [T, nh, d];
 * k, v [T, nkv, d]; query head h uses kv head h / (nh/nkv). Packed batches: seq_start [T] is
 * the first token of t's sequence (NULL: one sequence), so token t attends to s in
 * [seq_start[t], t]. Sequences must be contiguous: seq_start[0] = 0 and each seq_start[t] is
 * seq_start[t-1] or t (QLORA_ERR_INVALID_ARG otherwise).
 * Forward saves lse [T, nh] (float32 logsumexp of the scaled scores) instead of probabilities;
 * key blocks of QL_ATTN_KEY_BLOCK with an online softmax, so memory is linear in T.
 * Backward recomputes p = exp(score − lse) and writes dq [T, nh, d], dk, dv [T, nkv, d]. It
 * takes D = Σ_s p·(dout·v_s) from its own pass over the keys (exact in float32), not from the
 * BF16 output as FlashAttention does, so the forward output is not needed. */
#define QL_ATTN_KEY_BLOCK 64
#define QL_ATTN_MAX_HEAD_DIM 512

typedef struct ql_attn_shape {
    int64_t tokens;
    int heads, kv_heads, head_dim;
} ql_attn_shape;

qlora_status ql_attention_forward(qlora_ctx *ctx, const ql_attn_shape *s, const uint16_t *q, const uint16_t *k,
                                  const uint16_t *v, const int32_t *seq_start, uint16_t *out, float *lse);
qlora_status ql_attention_backward(qlora_ctx *ctx, const ql_attn_shape *s, const uint16_t *q, const uint16_t *k,
                                   const uint16_t *v, const int32_t *seq_start, const float *lse,
                                   const uint16_t *dout, uint16_t *dq, uint16_t *dk, uint16_t *dv);

/* Attention of new tokens against a KV cache (generation): q [tq, nh, d] are the tokens at
 * positions past .. past+tq-1 of one sequence; k_cache, v_cache [past+tq, nkv, d] hold every
 * earlier token's keys and values and the new ones. Query i attends keys [0, past+i], with
 * the same block order and arithmetic as ql_attention_forward, so a prompt run through the
 * cache gives the forward's bits. No lse (nothing to differentiate). On a CUDA context
 * (ql_cuda_attention_decode) a prompt on an empty cache gives the CUDA forward's bits and a
 * step is within float32 rounding of the CPU's result before the BF16 rounding, not bit-equal;
 * head_dim must be even there. */
qlora_status ql_attention_decode(qlora_ctx *ctx, const ql_attn_shape *s, const uint16_t *q, const uint16_t *k_cache,
                                 const uint16_t *v_cache, int64_t past, uint16_t *out);

/* ---------------------------------------------------------------- cross-entropy
 * logits [T, V] float32 = hidden [T, H] · lm_headᵀ ([V, H], BF16), float32 accumulation, not
 * rounded to BF16 (the reference fixtures run in float32). For tests and generation. */
qlora_status ql_lm_head_logits(qlora_ctx *ctx, const uint16_t *hidden, const uint16_t *lm_head, int64_t tokens,
                               int64_t hidden_dim, int64_t vocab, float *logits);

#define QL_IGNORE_INDEX (-100)

/* Token cross-entropy, labels already shifted (label[t] is the target of position t; -100 is
 * ignored; anything else outside [0, V) is QLORA_ERR_INVALID_ARG naming the token). Processes
 * chunk_tokens tokens at a time (0: a default of 128), so at most chunk_tokens × V float32
 * logits exist. loss = Σ −log softmax(logits)[label] / denom, where denom is `denom` when > 0
 * (e.g. tokens over all micro-batches), else the count of non-ignored tokens; when that count
 * is 0 the loss is 0 and dhidden is 0 (PyTorch gives NaN). count (may be NULL) receives the
 * non-ignored tokens. dhidden [T, H] (may be NULL: loss only) = d loss / d hidden, BF16. */
typedef struct ql_xent_args {
    const uint16_t *hidden;  /* [T, H] */
    const uint16_t *lm_head; /* [V, H] */
    const int32_t *labels;   /* [T] */
    int64_t tokens, hidden_dim, vocab;
    int64_t chunk_tokens;
    double denom;
} ql_xent_args;

qlora_status ql_cross_entropy(qlora_ctx *ctx, const ql_xent_args *a, double *loss, int64_t *count,
                              uint16_t *dhidden);

/* ---------------------------------------------------------------- embedding
 * out [T, H] = table[ids[t]] (BF16 rows copied); an id outside [0, V) is QLORA_ERR_INVALID_ARG.
 * The table is frozen, so there is no backward. */
qlora_status ql_embedding_forward(qlora_ctx *ctx, const uint16_t *table, int64_t vocab, int64_t hidden_dim,
                                  const int32_t *ids, int64_t tokens, uint16_t *out);

/* ---------------------------------------------------------------- residual add
 * dst = bf16(dst + src) over n elements: transformers adds the residual in the activation dtype. */
qlora_status ql_add_bf16(qlora_ctx *ctx, uint16_t *dst, const uint16_t *src, int64_t n);

/* Threads for the ops: ctx->params.num_threads, or OpenMP's default. */
int ql_ops_threads(const qlora_ctx *ctx);

#endif
