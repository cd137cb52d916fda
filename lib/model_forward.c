/*
 * The inference forward of a loaded model, as transformers computes it in BF16 (formats.md §2):
 * embedding, L pre-norm decoder layers (lib/model_layer.c), final norm, FP32 logits and/or the
 * chunked cross-entropy. Activations live in workspace allocations freed before returning.
 */
#include "model_internal.h"

#include <string.h>

typedef struct fwd_state {
    ql_model_batch batch;
    ql_layer_acts acts;
    uint16_t *h;        /* [T, H] residual stream, then the final norm's output in acts.xn1 */
    float *logits;      /* [T, V] on the device (CUDA) or the caller's buffer */
} fwd_state;

static qlora_status forward(qlora_model *m, const int32_t *tokens, const int32_t *positions,
                            const int32_t *seq_start, int64_t T, const int32_t *labels, float *loss_out,
                            float *logits_out, fwd_state *f) {
    const qlora_model_config *c = &m->cfg;
    const int64_t H = c->hidden_size, V = c->vocab_size;
    QL_CHECK(ql_model_batch_init(m, "batch", tokens, positions, seq_start, labels, T, &f->batch));
    QL_CHECK(ql_layer_acts_alloc(m, T, QLORA_MEM_WORKSPACE, &f->acts));
    QL_CHECK(qlora_alloc(m->ctx, (size_t)(T * H) * 2, 1, QLORA_MEM_WORKSPACE, (void **)&f->h));
    QL_CHECK(ql_embedding_forward(m->ctx, m->embed_tokens, V, H, f->batch.tokens, T, f->h));
    for (int64_t i = 0; i < c->num_layers; i++)
        QL_CHECK(ql_layer_forward(m, i, &f->batch, f->h, f->h, &f->acts, NULL));
    uint16_t *xn = f->acts.xn1;
    QL_CHECK(ql_rmsnorm_forward(m->ctx, f->h, m->final_norm, T, H, m->rms_norm_eps, xn));
    if (logits_out) {
        if (m->ctx->cuda)
            QL_CHECK(qlora_alloc(m->ctx, (size_t)(T * V) * 4, 1, QLORA_MEM_WORKSPACE, (void **)&f->logits));
        float *dst = m->ctx->cuda ? f->logits : logits_out;
        QL_CHECK(ql_lm_head_logits(m->ctx, xn, m->lm_head, T, H, V, dst));
        if (dst != logits_out)
            QL_CHECK(ql_ctx_memcpy(m->ctx, logits_out, dst, (size_t)(T * V) * 4));
    }
    if (labels) {
        ql_xent_args a = {xn, m->lm_head, f->batch.labels, T, H, V, 0, 0.0};
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
    fwd_state f;
    memset(&f, 0, sizeof f);
    qlora_status st = forward(model, tokens, positions, seq_start, T, labels, loss_out, logits_out, &f);
    if (st != QLORA_OK)
        ql_error_prefix("qlora_model_forward");
    qlora_free(model->ctx, f.logits);
    qlora_free(model->ctx, f.h);
    ql_layer_acts_free(model, &f.acts);
    ql_model_batch_free(model, &f.batch);
    return st;
}
