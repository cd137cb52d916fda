/*
 * The inference forward of a loaded model on the CPU, as transformers computes it in BF16
 * (formats.md §2): embedding, L pre-norm decoder layers, final norm, FP32 logits and/or the
 * chunked cross-entropy. Activations live in one workspace allocation freed before returning.
 */
#include "model_internal.h"
#include "half.h"

#include <string.h>

/* The activation buffers of one forward, carved from one workspace allocation. */
typedef struct fwd_buffers {
    uint16_t *h, *xn, *q, *k, *v, *attn, *out, *gate, *up; /* BF16 */
    float *lse;                                             /* [T, nh] */
    int32_t *pos;                                           /* [T] */
    void *base;
} fwd_buffers;

static qlora_status alloc_buffers(qlora_model *m, int64_t T, fwd_buffers *b) {
    const qlora_model_config *c = &m->cfg;
    const int64_t H = c->hidden_size, qd = c->num_heads * c->head_dim, kvd = c->num_kv_heads * c->head_dim;
    const int64_t I = c->intermediate_size;
    /* element counts of each buffer, each rounded up to 64 bytes */
    const int64_t n16[9] = {T * H, T * H, T * qd, T * kvd, T * kvd, T * qd, T * H, T * I, T * I};
    uint16_t **p16[9] = {&b->h, &b->xn, &b->q, &b->k, &b->v, &b->attn, &b->out, &b->gate, &b->up};
    size_t bytes = 0, off[11];
    for (int i = 0; i < 9; i++) {
        off[i] = bytes;
        bytes += ((size_t)n16[i] * 2 + 63) & ~(size_t)63;
    }
    off[9] = bytes;
    bytes += ((size_t)(T * c->num_heads) * 4 + 63) & ~(size_t)63;
    off[10] = bytes;
    bytes += (size_t)T * 4;
    QL_CHECK(qlora_alloc(m->ctx, bytes, 1, QLORA_MEM_WORKSPACE, &b->base));
    char *base = b->base;
    for (int i = 0; i < 9; i++)
        *p16[i] = (uint16_t *)(base + off[i]);
    b->lse = (float *)(base + off[9]);
    b->pos = (int32_t *)(base + off[10]);
    return QLORA_OK;
}

static qlora_status run_linear(qlora_linear *lin, int64_t T, uint16_t *x, int64_t in, uint16_t *y, int64_t out) {
    qlora_tensor xt, yt;
    int64_t xs[2] = {T, in}, ys[2] = {T, out};
    QL_CHECK(qlora_tensor_init(&xt, "x", QLORA_BF16, 2, xs, x, QLORA_DEVICE_HOST));
    QL_CHECK(qlora_tensor_init(&yt, "y", QLORA_BF16, 2, ys, y, QLORA_DEVICE_HOST));
    return qlora_linear_forward(lin, &xt, &yt, NULL, NULL);
}

/* h = bf16(h + delta): transformers adds the residual in the activation dtype. */
static void residual_add(uint16_t *h, const uint16_t *delta, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        h[i] = ql_f32_to_bf16(ql_bf16_to_f32(h[i]) + ql_bf16_to_f32(delta[i]));
}

static qlora_status decoder_layer(qlora_model *m, ql_decoder_layer *l, const ql_rope_table *rope,
                                  const int32_t *seq_start, int64_t T, fwd_buffers *b) {
    const qlora_model_config *c = &m->cfg;
    const int64_t H = c->hidden_size, I = c->intermediate_size;
    const int64_t qd = c->num_heads * c->head_dim, kvd = c->num_kv_heads * c->head_dim;
    qlora_linear *const *lin = l->linear;
    QL_CHECK(ql_rmsnorm_forward(m->ctx, b->h, l->input_norm, T, H, m->rms_norm_eps, b->xn));
    QL_CHECK(run_linear(lin[QL_LINEAR_Q], T, b->xn, H, b->q, qd));
    QL_CHECK(run_linear(lin[QL_LINEAR_K], T, b->xn, H, b->k, kvd));
    QL_CHECK(run_linear(lin[QL_LINEAR_V], T, b->xn, H, b->v, kvd));
    QL_CHECK(ql_rope_forward(m->ctx, rope, b->pos, T, (int)c->num_heads, b->q));
    QL_CHECK(ql_rope_forward(m->ctx, rope, b->pos, T, (int)c->num_kv_heads, b->k));
    ql_attn_shape s = {T, (int)c->num_heads, (int)c->num_kv_heads, (int)c->head_dim};
    QL_CHECK(ql_attention_forward(m->ctx, &s, b->q, b->k, b->v, seq_start, b->attn, b->lse));
    QL_CHECK(run_linear(lin[QL_LINEAR_O], T, b->attn, qd, b->out, H));
    residual_add(b->h, b->out, T * H);
    QL_CHECK(ql_rmsnorm_forward(m->ctx, b->h, l->post_attention_norm, T, H, m->rms_norm_eps, b->xn));
    QL_CHECK(run_linear(lin[QL_LINEAR_GATE], T, b->xn, H, b->gate, I));
    QL_CHECK(run_linear(lin[QL_LINEAR_UP], T, b->xn, H, b->up, I));
    QL_CHECK(ql_swiglu_forward(m->ctx, b->gate, b->up, T * I, b->gate));
    QL_CHECK(run_linear(lin[QL_LINEAR_DOWN], T, b->gate, I, b->out, H));
    residual_add(b->h, b->out, T * H);
    return QLORA_OK;
}

/* Positions given, or t - seq_start[t]; checks them and returns the largest. */
static qlora_status fill_positions(const int32_t *positions, const int32_t *seq_start, int64_t T, int32_t *pos,
                                   int64_t *max_pos) {
    *max_pos = 0;
    for (int64_t t = 0; t < T; t++) {
        if (positions) {
            pos[t] = positions[t];
        } else {
            int64_t start = seq_start ? seq_start[t] : 0;
            if (start < 0 || start > t)
                return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_model_forward: seq_start[%lld] = %lld is not in "
                               "[0, %lld]", (long long)t, (long long)start, (long long)t);
            pos[t] = (int32_t)(t - start);
        }
        if (pos[t] < 0)
            return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_model_forward: positions[%lld] = %d is negative",
                           (long long)t, pos[t]);
        if (pos[t] > *max_pos)
            *max_pos = pos[t];
    }
    return QLORA_OK;
}

static qlora_status forward(qlora_model *m, const int32_t *tokens, const int32_t *positions,
                            const int32_t *seq_start, int64_t T, const int32_t *labels, float *loss_out,
                            float *logits_out, fwd_buffers *b, ql_rope_table *rope) {
    const qlora_model_config *c = &m->cfg;
    int64_t max_pos;
    QL_CHECK(fill_positions(positions, seq_start, T, b->pos, &max_pos));
    QL_CHECK(ql_rope_table_init(m->ctx, &m->rope, max_pos + 1, rope));
    QL_CHECK(ql_embedding_forward(m->ctx, m->embed_tokens, c->vocab_size, c->hidden_size, tokens, T, b->h));
    for (int64_t i = 0; i < c->num_layers; i++)
        QL_CHECK(decoder_layer(m, &m->layers[i], rope, seq_start, T, b));
    QL_CHECK(ql_rmsnorm_forward(m->ctx, b->h, m->final_norm, T, c->hidden_size, m->rms_norm_eps, b->xn));
    if (logits_out)
        QL_CHECK(ql_lm_head_logits(m->ctx, b->xn, m->lm_head, T, c->hidden_size, c->vocab_size, logits_out));
    if (labels) {
        ql_xent_args a = {b->xn, m->lm_head, labels, T, c->hidden_size, c->vocab_size, 0, 0.0};
        double loss;
        QL_CHECK(ql_cross_entropy(m->ctx, &a, &loss, NULL, NULL));
        *loss_out = (float)loss;
    }
    return QLORA_OK;
}

qlora_status qlora_model_forward(qlora_model *model, const int32_t *tokens, const int32_t *positions,
                                 const int32_t *seq_start, int64_t T, const int32_t *labels, float *loss_out,
                                 float *logits_out) {
    QL_REQUIRE_ARG(model != NULL, "model");
    QL_REQUIRE_ARG(tokens != NULL, "tokens");
    QL_REQUIRE_ARG(T > 0 && T <= INT32_MAX, "T");
    QL_REQUIRE_ARG(!labels || loss_out, "loss_out");
    fwd_buffers b;
    ql_rope_table rope;
    memset(&rope, 0, sizeof rope);
    QL_CHECK(alloc_buffers(model, T, &b));
    qlora_status st = forward(model, tokens, positions, seq_start, T, labels, loss_out, logits_out, &b, &rope);
    if (st != QLORA_OK)
        ql_error_prefix("qlora_model_forward");
    ql_rope_table_free(model->ctx, &rope);
    qlora_free(model->ctx, b.base);
    return st;
}
