/*
 * Attention of new tokens against a KV cache on the CPU (lib/model_ops.h), for generation: one
 * sequence, query i at position past + i sees keys 0 .. past + i. The walk over key blocks and
 * the online softmax are those of ql_attention_forward, so both give the same bits. On a CUDA
 * context the kernel of cuda/attention_decode.cu runs instead (split-K over the cache).
 */
#include "model_ops.h"

#include <math.h>

#include "half.h"
#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

qlora_status ql_attention_decode(qlora_ctx *ctx, const ql_attn_shape *s, const uint16_t *q, const uint16_t *k_cache,
                                 const uint16_t *v_cache, int64_t past, uint16_t *out) {
    QL_REQUIRE_ARG(ctx != NULL && s != NULL, "ctx/shape");
    QL_REQUIRE_ARG(q != NULL && k_cache != NULL && v_cache != NULL && out != NULL, "q/k_cache/v_cache/out");
    QL_REQUIRE_ARG(past >= 0 && s->tokens >= 0, "past/tokens");
    if (s->heads <= 0 || s->kv_heads <= 0 || s->heads % s->kv_heads != 0 || s->head_dim <= 0 ||
        s->head_dim > QL_ATTN_MAX_HEAD_DIM)
        return ql_fail(QLORA_ERR_SHAPE, "attention decode: %d heads, %d kv heads, head_dim %d", s->heads,
                       s->kv_heads, s->head_dim);
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) /* every pointer on the device */
        return ql_cuda_attention_decode((ql_cuda_state *)ctx->cuda, s->tokens, s->heads, s->kv_heads, s->head_dim, q,
                                        k_cache, v_cache, past, out);
#endif
    const int nh = s->heads, nkv = s->kv_heads, d = s->head_dim, group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)d);
    const int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t row = 0; row < s->tokens * nh; row++) {
        const int64_t t = past + row / nh; /* the query's position = its last visible key */
        const int kvh = (int)(row % nh) / group;
        float qf[QL_ATTN_MAX_HEAD_DIM], acc[QL_ATTN_MAX_HEAD_DIM], score[QL_ATTN_KEY_BLOCK];
        for (int i = 0; i < d; i++) {
            qf[i] = ql_bf16_to_f32(q[row * d + i]);
            acc[i] = 0.0f;
        }
        float m = -INFINITY, l = 0.0f;
        for (int64_t b0 = 0; b0 <= t; b0 += QL_ATTN_KEY_BLOCK) {
            int n = (int)(t + 1 - b0 < QL_ATTN_KEY_BLOCK ? t + 1 - b0 : QL_ATTN_KEY_BLOCK);
            float block_max = -INFINITY;
            for (int j = 0; j < n; j++) {
                const uint16_t *key = k_cache + ((b0 + j) * nkv + kvh) * d;
                float sum = 0.0f;
                for (int i = 0; i < d; i++)
                    sum += qf[i] * ql_bf16_to_f32(key[i]);
                score[j] = sum * scale;
                block_max = score[j] > block_max ? score[j] : block_max;
            }
            float m_new = block_max > m ? block_max : m;
            float rescale = expf(m - m_new);
            l *= rescale;
            for (int i = 0; i < d; i++)
                acc[i] *= rescale;
            for (int j = 0; j < n; j++) {
                float p = expf(score[j] - m_new);
                const uint16_t *val = v_cache + ((b0 + j) * nkv + kvh) * d;
                l += p;
                for (int i = 0; i < d; i++)
                    acc[i] += p * ql_bf16_to_f32(val[i]);
            }
            m = m_new;
        }
        for (int i = 0; i < d; i++)
            out[row * d + i] = ql_f32_to_bf16(acc[i] / l);
    }
    return QLORA_OK;
}
