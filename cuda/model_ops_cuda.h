/*
 * CUDA launchers of the Llama-family ops (issue 5), the device twins of lib/model_ops.h: same
 * formulas, same BF16 roundings, same argument meaning, every pointer on the state's device
 * (d_*), everything queued on the context stream. The CPU ops in lib/op_*.c dispatch here when
 * their context is a CUDA one, so the model code is the same on both backends. Every CUDA and
 * cuBLAS return code is checked (QLORA_ERR_CUDA / QLORA_ERR_CUBLAS naming the call); scratch
 * memory goes through the owner context's tracked allocator (QLORA_MEM_WORKSPACE).
 */
#ifndef QLORA_MODEL_OPS_CUDA_H
#define QLORA_MODEL_OPS_CUDA_H

#include "cuda_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* y = bf16(w · bf16(x · rsqrt(mean(x²) + eps))); one block per row, float32 sums. */
qlora_status ql_cuda_rmsnorm_forward(ql_cuda_state *s, const uint16_t *d_x, const uint16_t *d_w, int64_t rows,
                                     int64_t dim, float eps, uint16_t *d_y);
qlora_status ql_cuda_rmsnorm_backward(ql_cuda_state *s, const uint16_t *d_x, const uint16_t *d_w,
                                      const uint16_t *d_dy, int64_t rows, int64_t dim, float eps, uint16_t *d_dx);

/* In place on d_x [tokens, heads, 2·half]; d_cos/d_sin [positions, half] BF16 (the table of
 * ql_rope_table on the device); d_pos [tokens] (each in [0, positions), checked by the caller). */
qlora_status ql_cuda_rope_forward(ql_cuda_state *s, const uint16_t *d_cos, const uint16_t *d_sin, int half,
                                  const int32_t *d_pos, int64_t tokens, int heads, uint16_t *d_x);
qlora_status ql_cuda_rope_backward(ql_cuda_state *s, const uint16_t *d_cos, const uint16_t *d_sin, int half,
                                   const int32_t *d_pos, int64_t tokens, int heads, uint16_t *d_dx);

/* d_out may alias d_gate (the model does that). */
qlora_status ql_cuda_swiglu_forward(ql_cuda_state *s, const uint16_t *d_gate, const uint16_t *d_up, int64_t n,
                                    uint16_t *d_out);
qlora_status ql_cuda_swiglu_backward(ql_cuda_state *s, const uint16_t *d_gate, const uint16_t *d_up,
                                     const uint16_t *d_dout, int64_t n, uint16_t *d_dgate, uint16_t *d_dup);

/* dst = bf16(dst + src), n elements (the residual add). */
qlora_status ql_cuda_add_bf16(ql_cuda_state *s, uint16_t *d_dst, const uint16_t *d_src, int64_t n);

/* Fused causal GQA attention, FlashAttention-style: tiles of queries × keys in shared memory,
 * online softmax in float32, no [T, T] matrix anywhere (memory linear in T). d_seq_start as in
 * ql_attention_forward (NULL: one sequence; validated by the caller). Writes d_out [T, nh, d]
 * BF16 and d_lse [T, nh] float32. Backward recomputes the probabilities from d_lse and writes
 * d_dq, d_dk, d_dv (BF16; dk/dv summed over the query heads of each kv head, in float32 before
 * the one rounding). head_dim: even, <= QL_ATTN_MAX_HEAD_DIM (lib/model_ops.h). */
qlora_status ql_cuda_attention_forward(ql_cuda_state *s, int64_t tokens, int heads, int kv_heads, int head_dim,
                                       const uint16_t *d_q, const uint16_t *d_k, const uint16_t *d_v,
                                       const int32_t *d_seq_start, uint16_t *d_out, float *d_lse);
qlora_status ql_cuda_attention_backward(ql_cuda_state *s, int64_t tokens, int heads, int kv_heads, int head_dim,
                                        const uint16_t *d_q, const uint16_t *d_k, const uint16_t *d_v,
                                        const int32_t *d_seq_start, const float *d_lse, const uint16_t *d_dout,
                                        uint16_t *d_dq, uint16_t *d_dk, uint16_t *d_dv);

/* Attention of new tokens against a KV cache (ql_attention_decode on the device): d_q [tokens,
 * heads, d] are the tokens at positions past .. past+tokens-1 of one sequence; d_k_cache and
 * d_v_cache [past+tokens, kv_heads, d] (contiguous rows of kv_heads·d) hold every earlier token's
 * keys and values and the new ones; query i attends keys [0, past+i]; d_out [tokens, heads, d]
 * BF16. Scale d^-0.5, online softmax in float32. Decode steps split the keys over several CTAs
 * per kv head (flash-decoding) and merge the ranges in a second kernel, in a fixed order (the
 * split count depends on the shape and the device's SM count only). A prompt on an empty cache
 * (past 0, tokens > 1) runs the forward kernel above, so it gives ql_cuda_attention_forward's
 * bits. Not bit-identical with the CPU op (summation orders, exp2). head_dim: even,
 * <= QL_ATTN_MAX_HEAD_DIM; past + tokens < 2^31. Scratch through the owner's allocator. */
qlora_status ql_cuda_attention_decode(ql_cuda_state *s, int64_t tokens, int heads, int kv_heads, int head_dim,
                                      const uint16_t *d_q, const uint16_t *d_k_cache, const uint16_t *d_v_cache,
                                      int64_t past, uint16_t *d_out);

/* d_out [T, H] = d_table[d_ids[t]]. *bad_id receives the first t whose id is outside [0, vocab)
 * (or -1), found by the kernel and read back after it. */
qlora_status ql_cuda_embedding_forward(ql_cuda_state *s, const uint16_t *d_table, int64_t vocab, int64_t hidden,
                                       const int32_t *d_ids, int64_t tokens, uint16_t *d_out, int64_t *bad_id);

/* logits [T, V] float32 = hidden · lm_headᵀ (cuBLAS, BF16 inputs, float32 output). */
qlora_status ql_cuda_lm_head_logits(ql_cuda_state *s, const uint16_t *d_hidden, const uint16_t *d_lm_head,
                                    int64_t tokens, int64_t hidden, int64_t vocab, float *d_logits);

/* The chunked cross-entropy of ql_cross_entropy on the device: per chunk of chunk_tokens,
 * logits by cuBLAS into a float32 scratch [chunk, V], a kernel for the row logsumexp, the loss
 * term and the softmax gradient (p − onehot)/denom, then d_dhidden rows = grad · lm_head by
 * cuBLAS (BF16 out). Labels on the device; an out-of-range label (not -100) fails naming the
 * token. *loss_sum receives Σ −log p[label] (double, summed on the host from per-chunk float
 * partials) and *count the non-ignored tokens; denom <= 0 means divide by that count (the
 * launcher counts the labels first). d_dhidden may be NULL (loss only). */
qlora_status ql_cuda_cross_entropy(ql_cuda_state *s, const uint16_t *d_hidden, const uint16_t *d_lm_head,
                                   const int32_t *d_labels, int64_t tokens, int64_t hidden, int64_t vocab,
                                   int64_t chunk_tokens, double denom, double *loss_sum, int64_t *count,
                                   uint16_t *d_dhidden);

#ifdef __cplusplus
}
#endif
#endif
