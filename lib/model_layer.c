/*
 * One Llama decoder layer, forward and backward (lib/model_internal.h), on either backend: the
 * ops of lib/model_ops.h and the QLoRA linear layers do the work, this file only orders them.
 *
 *   xn1 = input_norm(h)          q, k, v = proj(xn1); RoPE on q, k
 *   attn = attention(q, k, v)    h_mid = h + o_proj(attn)
 *   xn2 = post_norm(h_mid)       act = swiglu(gate_proj(xn2), up_proj(xn2))
 *   h_out = h_mid + down_proj(act)
 *
 * The backward runs the same chain in reverse. Where a tensor feeds two consumers (xn1 feeds
 * q, k and v; xn2 feeds gate and up; h feeds the norm and the residual) the gradients are summed
 * in BF16, as PyTorch's autograd sums BF16 gradients.
 */
#include "model_internal.h"

#include <string.h>

static size_t round64(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

qlora_status ql_layer_acts_alloc(qlora_model *m, int64_t T, qlora_mem_category category, ql_layer_acts *a) {
    const qlora_model_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size;
    const int64_t qd = c->num_heads * c->head_dim, kvd = c->num_kv_heads * c->head_dim;
    memset(a, 0, sizeof *a);
    const int64_t n16[11] = {T * H, T * qd, T * kvd, T * kvd, T * qd, T * H, T * H, T * H, T * I, T * I, T * I};
    uint16_t **p16[11] = {&a->xn1, &a->q, &a->k, &a->v, &a->attn, &a->o, &a->h_mid, &a->xn2, &a->gate, &a->up,
                          &a->act};
    size_t off[12], bytes = 0;
    for (int i = 0; i < 11; i++) {
        off[i] = bytes;
        bytes += round64((size_t)n16[i] * 2);
    }
    off[11] = bytes;
    bytes += round64((size_t)(T * c->num_heads) * 4);
    QL_CHECK(qlora_alloc(m->ctx, bytes, 1, category, &a->base));
    char *base = a->base;
    for (int i = 0; i < 11; i++)
        *p16[i] = (uint16_t *)(base + off[i]);
    a->lse = (float *)(base + off[11]);
    return QLORA_OK;
}

void ql_layer_acts_release_saved(ql_layer_acts *a) {
    for (int j = 0; j < QL_LINEAR_COUNT; j++)
        qlora_linear_saved_free(&a->saved[j]);
}

void ql_layer_acts_free(qlora_model *m, ql_layer_acts *a) {
    ql_layer_acts_release_saved(a);
    qlora_free(m->ctx, a->base);
    memset(a, 0, sizeof *a);
}

static void as_tensor(qlora_model *m, qlora_tensor *t, const char *name, const uint16_t *data, int64_t rows,
                      int64_t cols) {
    int64_t shape[2] = {rows, cols};
    /* cannot fail: a valid dtype, 2 dimensions, positive sizes */
    (void)qlora_tensor_init(t, name, QLORA_BF16, 2, shape, (void *)data, ql_ctx_tensor_device(m->ctx));
}

static qlora_status linear_fwd(qlora_model *m, ql_decoder_layer *l, int j, int64_t T, const uint16_t *x, int64_t in,
                               uint16_t *y, int64_t out, const qlora_linear_fwd_opts *opts, ql_layer_acts *a) {
    qlora_tensor xt, yt;
    as_tensor(m, &xt, "x", x, T, in);
    as_tensor(m, &yt, "y", y, T, out);
    return qlora_linear_forward(l->linear[j], &xt, &yt, opts, opts ? &a->saved[j] : NULL);
}

static qlora_status linear_bwd(qlora_model *m, ql_decoder_layer *l, int j, int64_t T, const uint16_t *x,
                               int64_t in, const uint16_t *dy, int64_t out, uint16_t *dx, ql_layer_acts *a) {
    qlora_tensor xt, dyt, dxt;
    as_tensor(m, &xt, "x", x, T, in);
    as_tensor(m, &dyt, "dy", dy, T, out);
    as_tensor(m, &dxt, "dx", dx, T, in);
    return qlora_linear_backward(l->linear[j], &xt, &dyt, &a->saved[j], dx ? &dxt : NULL);
}

qlora_status ql_layer_forward(qlora_model *m, int64_t index, const ql_model_batch *b, const uint16_t *h_in,
                              uint16_t *h_out, ql_layer_acts *a, const qlora_linear_fwd_opts *opts) {
    const qlora_model_config *c = &m->cfg;
    ql_decoder_layer *l = &m->layers[index];
    const int64_t T = b->T, H = c->hidden_size, I = c->intermediate_size;
    const int64_t qd = c->num_heads * c->head_dim, kvd = c->num_kv_heads * c->head_dim;
    const size_t hbytes = (size_t)(T * H) * 2;
    QL_CHECK(ql_rmsnorm_forward(m->ctx, h_in, l->input_norm, T, H, m->rms_norm_eps, a->xn1));
    QL_CHECK(linear_fwd(m, l, QL_LINEAR_Q, T, a->xn1, H, a->q, qd, opts, a));
    QL_CHECK(linear_fwd(m, l, QL_LINEAR_K, T, a->xn1, H, a->k, kvd, opts, a));
    QL_CHECK(linear_fwd(m, l, QL_LINEAR_V, T, a->xn1, H, a->v, kvd, opts, a));
    QL_CHECK(ql_rope_forward(m->ctx, &b->rope, b->pos, T, (int)c->num_heads, a->q));
    QL_CHECK(ql_rope_forward(m->ctx, &b->rope, b->pos, T, (int)c->num_kv_heads, a->k));
    ql_attn_shape s = {T, (int)c->num_heads, (int)c->num_kv_heads, (int)c->head_dim};
    if (b->cache_k) {
        const int64_t slot = (index * b->cache_cap + b->past) * kvd;
        uint16_t *ck = b->cache_k + index * b->cache_cap * kvd, *cv = b->cache_v + index * b->cache_cap * kvd;
        QL_CHECK(ql_ctx_memcpy(m->ctx, b->cache_k + slot, a->k, (size_t)(T * kvd) * 2));
        QL_CHECK(ql_ctx_memcpy(m->ctx, b->cache_v + slot, a->v, (size_t)(T * kvd) * 2));
        QL_CHECK(ql_attention_decode(m->ctx, &s, a->q, ck, cv, b->past, a->attn));
    } else {
        QL_CHECK(ql_attention_forward(m->ctx, &s, a->q, a->k, a->v, b->seq_start, a->attn, a->lse));
    }
    QL_CHECK(linear_fwd(m, l, QL_LINEAR_O, T, a->attn, qd, a->o, H, opts, a));
    QL_CHECK(ql_ctx_memcpy(m->ctx, a->h_mid, h_in, hbytes));
    QL_CHECK(ql_add_bf16(m->ctx, a->h_mid, a->o, T * H));
    QL_CHECK(ql_rmsnorm_forward(m->ctx, a->h_mid, l->post_attention_norm, T, H, m->rms_norm_eps, a->xn2));
    QL_CHECK(linear_fwd(m, l, QL_LINEAR_GATE, T, a->xn2, H, a->gate, I, opts, a));
    QL_CHECK(linear_fwd(m, l, QL_LINEAR_UP, T, a->xn2, H, a->up, I, opts, a));
    QL_CHECK(ql_swiglu_forward(m->ctx, a->gate, a->up, T * I, a->act));
    QL_CHECK(linear_fwd(m, l, QL_LINEAR_DOWN, T, a->act, I, a->o, H, opts, a));
    if (h_out != a->h_mid)
        QL_CHECK(ql_ctx_memcpy(m->ctx, h_out, a->h_mid, hbytes));
    return ql_add_bf16(m->ctx, h_out, a->o, T * H);
}

/* Scratch of one layer's backward: gradients of the layer's intermediates. */
typedef struct bwd_scratch {
    uint16_t *d_act, *d_gate, *d_up, *d_xn, *d_tmp, *d_attn, *d_q, *d_k, *d_v;
    void *base;
} bwd_scratch;

static qlora_status scratch_alloc(qlora_model *m, int64_t T, bwd_scratch *s) {
    const qlora_model_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size;
    const int64_t qd = c->num_heads * c->head_dim, kvd = c->num_kv_heads * c->head_dim;
    const int64_t n[9] = {T * I, T * I, T * I, T * H, T * H, T * qd, T * qd, T * kvd, T * kvd};
    uint16_t **p[9] = {&s->d_act, &s->d_gate, &s->d_up, &s->d_xn, &s->d_tmp, &s->d_attn, &s->d_q, &s->d_k, &s->d_v};
    size_t off[9], bytes = 0;
    for (int i = 0; i < 9; i++) {
        off[i] = bytes;
        bytes += round64((size_t)n[i] * 2);
    }
    QL_CHECK(qlora_alloc(m->ctx, bytes, 1, QLORA_MEM_WORKSPACE, &s->base));
    for (int i = 0; i < 9; i++)
        *p[i] = (uint16_t *)((char *)s->base + off[i]);
    return QLORA_OK;
}

static qlora_status layer_backward(qlora_model *m, ql_decoder_layer *l, const ql_model_batch *b,
                                   const uint16_t *h_in, ql_layer_acts *a, uint16_t *dh, int need_dh_in,
                                   bwd_scratch *s) {
    const qlora_model_config *c = &m->cfg;
    qlora_ctx *ctx = m->ctx;
    const int64_t T = b->T, H = c->hidden_size, I = c->intermediate_size;
    const int64_t qd = c->num_heads * c->head_dim, kvd = c->num_kv_heads * c->head_dim;
    const float eps = m->rms_norm_eps;
    /* MLP block: h_out = h_mid + down(swiglu(gate(xn2), up(xn2))) */
    QL_CHECK(linear_bwd(m, l, QL_LINEAR_DOWN, T, a->act, I, dh, H, s->d_act, a));
    QL_CHECK(ql_swiglu_backward(ctx, a->gate, a->up, s->d_act, T * I, s->d_gate, s->d_up));
    QL_CHECK(linear_bwd(m, l, QL_LINEAR_GATE, T, a->xn2, H, s->d_gate, I, s->d_xn, a));
    QL_CHECK(linear_bwd(m, l, QL_LINEAR_UP, T, a->xn2, H, s->d_up, I, s->d_tmp, a));
    QL_CHECK(ql_add_bf16(ctx, s->d_xn, s->d_tmp, T * H));
    QL_CHECK(ql_rmsnorm_backward(ctx, a->h_mid, l->post_attention_norm, s->d_xn, T, H, eps, s->d_tmp));
    QL_CHECK(ql_add_bf16(ctx, dh, s->d_tmp, T * H)); /* dh is now d h_mid */
    /* attention block: h_mid = h_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))) */
    QL_CHECK(linear_bwd(m, l, QL_LINEAR_O, T, a->attn, qd, dh, H, s->d_attn, a));
    ql_attn_shape shape = {T, (int)c->num_heads, (int)c->num_kv_heads, (int)c->head_dim};
    QL_CHECK(ql_attention_backward(ctx, &shape, a->q, a->k, a->v, b->seq_start, a->lse, s->d_attn, s->d_q, s->d_k,
                                   s->d_v));
    QL_CHECK(ql_rope_backward(ctx, &b->rope, b->pos, T, (int)c->num_heads, s->d_q));
    QL_CHECK(ql_rope_backward(ctx, &b->rope, b->pos, T, (int)c->num_kv_heads, s->d_k));
    /* The first layer's input is the frozen embedding: only the adapters' gradients are needed. */
    QL_CHECK(linear_bwd(m, l, QL_LINEAR_Q, T, a->xn1, H, s->d_q, qd, need_dh_in ? s->d_xn : NULL, a));
    QL_CHECK(linear_bwd(m, l, QL_LINEAR_K, T, a->xn1, H, s->d_k, kvd, need_dh_in ? s->d_tmp : NULL, a));
    if (need_dh_in)
        QL_CHECK(ql_add_bf16(ctx, s->d_xn, s->d_tmp, T * H));
    QL_CHECK(linear_bwd(m, l, QL_LINEAR_V, T, a->xn1, H, s->d_v, kvd, need_dh_in ? s->d_tmp : NULL, a));
    if (!need_dh_in)
        return QLORA_OK;
    QL_CHECK(ql_add_bf16(ctx, s->d_xn, s->d_tmp, T * H));
    QL_CHECK(ql_rmsnorm_backward(ctx, h_in, l->input_norm, s->d_xn, T, H, eps, s->d_tmp));
    return ql_add_bf16(ctx, dh, s->d_tmp, T * H);
}

qlora_status ql_layer_backward(qlora_model *m, int64_t index, const ql_model_batch *b, const uint16_t *h_in,
                               ql_layer_acts *a, uint16_t *dh, int need_dh_in) {
    bwd_scratch s;
    QL_CHECK(scratch_alloc(m, b->T, &s));
    qlora_status st = layer_backward(m, &m->layers[index], b, h_in, a, dh, need_dh_in, &s);
    qlora_free(m->ctx, s.base);
    return st;
}
