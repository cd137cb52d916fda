/*
 * Causal grouped-query attention over packed sequences on the CPU (lib/model_ops.h), in the
 * FlashAttention manner: the forward walks the keys in blocks with an online softmax and keeps
 * only the logsumexp per (token, head); the backward recomputes the probabilities from it.
 * Nothing is T × T: the workspace is float32 copies of the inputs (each O(T)).
 *
 * The backward runs two passes so that no two threads write the same row: one per query row
 * (dq, and D = Σ p·dp, which the second needs), one per key row (dk, dv), which visits the
 * queries that see that key: the following tokens of the same sequence.
 *
 * ql_attention_decode (generation) runs the forward's row walk against a KV cache, so a prompt
 * run through the cache gives the forward's bits.
 */
#include "model_ops.h"

#include <math.h>
#include <string.h>

#include "half.h"
#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

static qlora_status check_shape(const qlora_ctx *ctx, const ql_attn_shape *s) {
    QL_REQUIRE_ARG(ctx != NULL && s != NULL, "ctx/shape");
    QL_REQUIRE_ARG(s->tokens >= 0, "tokens");
    if (s->heads <= 0 || s->kv_heads <= 0 || s->heads % s->kv_heads != 0)
        return ql_fail(QLORA_ERR_SHAPE, "attention: %d query heads is not a multiple of %d kv heads (the %d heads "
                       "cannot share them evenly)", s->heads, s->kv_heads, s->heads);
    if (s->head_dim <= 0 || s->head_dim > QL_ATTN_MAX_HEAD_DIM)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "attention: head_dim %d outside [1, %d]", s->head_dim,
                       QL_ATTN_MAX_HEAD_DIM);
    return QLORA_OK;
}

/* Reads seq_start on the host: CPU contexts only (on a CUDA context the caller validated it). */
static qlora_status check_seq_start(const ql_attn_shape *s, const int32_t *seq_start) {
    if (seq_start == NULL)
        return QLORA_OK;
    for (int64_t t = 0; t < s->tokens; t++) {
        int32_t prev = t == 0 ? 0 : seq_start[t - 1];
        if (seq_start[t] != prev && seq_start[t] != t)
            return ql_fail(QLORA_ERR_INVALID_ARG,
                           "attention: seq_start[%lld] = %d; it must be seq_start[t-1] (%d) or t (contiguous "
                           "packed sequences)",
                           (long long)t, seq_start[t], prev);
    }
    return QLORA_OK;
}

static int64_t first_key(const int32_t *seq_start, int64_t t) { return seq_start ? seq_start[t] : 0; }

static float dot(const float *a, const float *b, int d) {
    float sum = 0.0f;
    for (int i = 0; i < d; i++)
        sum += a[i] * b[i];
    return sum;
}

static void axpy(float alpha, const float *x, float *y, int d) {
    for (int i = 0; i < d; i++)
        y[i] += alpha * x[i];
}

static void to_f32(const uint16_t *src, int64_t n, float *dst, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (n >= (1 << 15))
    for (int64_t i = 0; i < n; i++)
        dst[i] = ql_bf16_to_f32(src[i]);
}

/* One tracked float32 allocation holding `count` arrays of the given sizes. */
static qlora_status alloc_f32(qlora_ctx *ctx, int count, const int64_t *sizes, float **arrays, void **base) {
    size_t total = 0;
    for (int i = 0; i < count; i++)
        total += ((size_t)sizes[i] + 15) / 16 * 16;
    QL_CHECK(qlora_alloc(ctx, (total ? total : 1) * sizeof(float), 0, QLORA_MEM_WORKSPACE, base));
    float *p = (float *)*base;
    for (int i = 0; i < count; i++) {
        arrays[i] = p;
        p += ((size_t)sizes[i] + 15) / 16 * 16;
    }
    return QLORA_OK;
}

/* One query row against keys first..last (float32 copies [*, nkv, d], kv head kvh): keys in
 * blocks of QL_ATTN_KEY_BLOCK with an online softmax; writes the BF16 output row and returns the
 * logsumexp of the scaled scores. Shared by the forward and the KV-cache decode, so a prompt run
 * through the cache gives the forward's bits. */
static float attend_row(const uint16_t *q_row, const float *kf, const float *vf, int64_t first, int64_t last,
                        int nkv, int kvh, int d, uint16_t *out_row) {
    const float scale = 1.0f / sqrtf((float)d);
    float qf[QL_ATTN_MAX_HEAD_DIM], acc[QL_ATTN_MAX_HEAD_DIM], score[QL_ATTN_KEY_BLOCK];
    for (int i = 0; i < d; i++) {
        qf[i] = ql_bf16_to_f32(q_row[i]);
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int64_t b0 = first; b0 <= last; b0 += QL_ATTN_KEY_BLOCK) {
        int n = (int)(last + 1 - b0 < QL_ATTN_KEY_BLOCK ? last + 1 - b0 : QL_ATTN_KEY_BLOCK);
        float block_max = -INFINITY;
        for (int j = 0; j < n; j++) {
            score[j] = dot(qf, kf + ((b0 + j) * nkv + kvh) * d, d) * scale;
            block_max = score[j] > block_max ? score[j] : block_max;
        }
        float m_new = block_max > m ? block_max : m;
        float rescale = expf(m - m_new); /* 0 on the first block (m = -inf) */
        l *= rescale;
        for (int i = 0; i < d; i++)
            acc[i] *= rescale;
        for (int j = 0; j < n; j++) {
            float p = expf(score[j] - m_new);
            l += p;
            axpy(p, vf + ((b0 + j) * nkv + kvh) * d, acc, d);
        }
        m = m_new;
    }
    for (int i = 0; i < d; i++)
        out_row[i] = ql_f32_to_bf16(acc[i] / l);
    return m + logf(l);
}

qlora_status ql_attention_forward(qlora_ctx *ctx, const ql_attn_shape *s, const uint16_t *q, const uint16_t *k,
                                  const uint16_t *v, const int32_t *seq_start, uint16_t *out, float *lse) {
    QL_CHECK(check_shape(ctx, s));
    QL_REQUIRE_ARG(q != NULL && k != NULL && v != NULL && out != NULL && lse != NULL, "q/k/v/out/lse");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_attention_forward((ql_cuda_state *)ctx->cuda, s->tokens, s->heads, s->kv_heads, s->head_dim, q,
                                         k, v, seq_start, out, lse);
#endif
    QL_CHECK(check_seq_start(s, seq_start));
    const int64_t T = s->tokens;
    const int nh = s->heads, nkv = s->kv_heads, d = s->head_dim, group = nh / nkv;
    int nt = ql_ops_threads(ctx);
    float *arr[2];
    void *base = NULL;
    int64_t sizes[2] = {T * nkv * d, T * nkv * d};
    QL_CHECK(alloc_f32(ctx, 2, sizes, arr, &base));
    float *kf = arr[0], *vf = arr[1];
    to_f32(k, sizes[0], kf, nt);
    to_f32(v, sizes[1], vf, nt);

#pragma omp parallel for schedule(dynamic, 4) num_threads(nt)
    for (int64_t row = 0; row < T * nh; row++) {
        int64_t t = row / nh;
        lse[row] = attend_row(q + row * d, kf, vf, first_key(seq_start, t), t, nkv, (int)(row % nh) / group, d,
                              out + row * d);
    }
    qlora_free(ctx, base);
    return QLORA_OK;
}

qlora_status ql_attention_backward(qlora_ctx *ctx, const ql_attn_shape *s, const uint16_t *q, const uint16_t *k,
                                   const uint16_t *v, const int32_t *seq_start, const float *lse,
                                   const uint16_t *dout, uint16_t *dq, uint16_t *dk, uint16_t *dv) {
    QL_CHECK(check_shape(ctx, s));
    QL_REQUIRE_ARG(q != NULL && k != NULL && v != NULL && lse != NULL && dout != NULL, "q/k/v/lse/dout");
    QL_REQUIRE_ARG(dq != NULL && dk != NULL && dv != NULL, "dq/dk/dv");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_attention_backward((ql_cuda_state *)ctx->cuda, s->tokens, s->heads, s->kv_heads, s->head_dim,
                                          q, k, v, seq_start, lse, dout, dq, dk, dv);
#endif
    QL_CHECK(check_seq_start(s, seq_start));
    const int64_t T = s->tokens;
    const int nh = s->heads, nkv = s->kv_heads, d = s->head_dim, group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)d);
    int nt = ql_ops_threads(ctx);
    float *arr[5];
    void *base = NULL;
    int64_t sizes[5] = {T * nh * d, T * nkv * d, T * nkv * d, T * nh * d, T * nh};
    QL_CHECK(alloc_f32(ctx, 5, sizes, arr, &base));
    float *qf = arr[0], *kf = arr[1], *vf = arr[2], *dof = arr[3], *delta = arr[4];
    to_f32(q, sizes[0], qf, nt);
    to_f32(k, sizes[1], kf, nt);
    to_f32(v, sizes[2], vf, nt);
    to_f32(dout, sizes[3], dof, nt);

    /* Pass 1, per query row: ds_s = p_s·(dp_s − D) with D = Σ p_s·dp_s, so
     * dq = scale·(Σ p_s·dp_s·k_s − D·Σ p_s·k_s) comes out of one walk over the keys. */
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt)
    for (int64_t row = 0; row < T * nh; row++) {
        int64_t t = row / nh;
        int h = (int)(row % nh), kvh = h / group;
        const float *qr = qf + row * d, *dor = dof + row * d;
        float weighted[QL_ATTN_MAX_HEAD_DIM], mean_k[QL_ATTN_MAX_HEAD_DIM];
        memset(weighted, 0, (size_t)d * sizeof(float));
        memset(mean_k, 0, (size_t)d * sizeof(float));
        float dsum = 0.0f;
        for (int64_t j = first_key(seq_start, t); j <= t; j++) {
            const float *kr = kf + (j * nkv + kvh) * d;
            float p = expf(dot(qr, kr, d) * scale - lse[row]);
            float pdp = p * dot(dor, vf + (j * nkv + kvh) * d, d);
            dsum += pdp;
            axpy(pdp, kr, weighted, d);
            axpy(p, kr, mean_k, d);
        }
        for (int i = 0; i < d; i++)
            dq[row * d + i] = ql_f32_to_bf16(scale * (weighted[i] - dsum * mean_k[i]));
        delta[row] = dsum;
    }

    /* Pass 2, per key row (token j, kv head): the queries t >= j of j's sequence, every query
     * head of the group. */
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt)
    for (int64_t krow = 0; krow < T * nkv; krow++) {
        int64_t j = krow / nkv;
        int kvh = (int)(krow % nkv);
        const float *kr = kf + krow * d, *vr = vf + krow * d;
        float dkacc[QL_ATTN_MAX_HEAD_DIM], dvacc[QL_ATTN_MAX_HEAD_DIM];
        memset(dkacc, 0, (size_t)d * sizeof(float));
        memset(dvacc, 0, (size_t)d * sizeof(float));
        for (int64_t t = j; t < T && first_key(seq_start, t) <= j; t++) {
            for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                int64_t row = t * nh + h;
                const float *qr = qf + row * d, *dor = dof + row * d;
                float p = expf(dot(qr, kr, d) * scale - lse[row]);
                axpy(p, dor, dvacc, d);
                axpy(p * (dot(dor, vr, d) - delta[row]), qr, dkacc, d);
            }
        }
        for (int i = 0; i < d; i++) {
            dk[krow * d + i] = ql_f32_to_bf16(scale * dkacc[i]);
            dv[krow * d + i] = ql_f32_to_bf16(dvacc[i]);
        }
    }
    qlora_free(ctx, base);
    return QLORA_OK;
}

qlora_status ql_attention_decode(qlora_ctx *ctx, const ql_attn_shape *s, const uint16_t *q, const uint16_t *k_cache,
                                 const uint16_t *v_cache, int64_t past, uint16_t *out) {
    QL_CHECK(check_shape(ctx, s));
    QL_REQUIRE_ARG(q != NULL && k_cache != NULL && v_cache != NULL && out != NULL, "q/k_cache/v_cache/out");
    QL_REQUIRE_ARG(past >= 0, "past");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) /* every pointer on the device; split-K over the cache (cuda/attention_decode.cu) */
        return ql_cuda_attention_decode((ql_cuda_state *)ctx->cuda, s->tokens, s->heads, s->kv_heads, s->head_dim, q,
                                        k_cache, v_cache, past, out);
#endif
    const int nh = s->heads, nkv = s->kv_heads, d = s->head_dim, group = nh / nkv;
    const int nt = ql_ops_threads(ctx);
    float *arr[2];
    void *base = NULL;
    const int64_t keys = past + s->tokens;
    int64_t sizes[2] = {keys * nkv * d, keys * nkv * d};
    QL_CHECK(alloc_f32(ctx, 2, sizes, arr, &base));
    to_f32(k_cache, sizes[0], arr[0], nt);
    to_f32(v_cache, sizes[1], arr[1], nt);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t row = 0; row < s->tokens * nh; row++) /* query at position past + row/nh */
        attend_row(q + row * d, arr[0], arr[1], 0, past + row / nh, nkv, (int)(row % nh) / group, d, out + row * d);
    qlora_free(ctx, base);
    return QLORA_OK;
}
