/*
 * Training: one micro-batch forward and backward to the adapters (qlora_model_forward_backward),
 * with or without per-layer activation checkpointing (include/qlora.h documents what each keeps).
 *
 * Checkpointed: the forward runs every layer in training mode through one set of activation
 * buffers, saving nothing but each layer's input h_i; the backward, layer by layer from the
 * top, reruns layer i from h_i (same dropout stream, so the same masks and bits) with its
 * activations saved, then runs its backward and releases them. Without checkpointing each layer
 * has its own activation set, filled by the forward and consumed by the backward.
 */
#include "model_internal.h"

#include <stdlib.h>
#include <string.h>

qlora_train_step_opts qlora_train_step_default_opts(void) {
    qlora_train_step_opts o;
    memset(&o, 0, sizeof o);
    o.grad_checkpointing = 1;
    return o;
}

typedef struct train_state {
    ql_model_batch batch;
    uint16_t *checkpoints;   /* [L + 1, T, H]: each layer's input, then the final norm's input */
    ql_layer_acts *acts;     /* 1 set (checkpointed) or L sets */
    int64_t nacts;
    uint16_t *xn, *dxn, *dh; /* [T, H] each: final norm output, its gradient, the running gradient */
    void *grad_base;
} train_state;

static qlora_status alloc_state(qlora_model *m, int64_t T, int checkpointing, train_state *s) {
    const int64_t L = m->cfg.num_layers, H = m->cfg.hidden_size;
    const size_t hbytes = (size_t)(T * H) * 2;
    QL_CHECK(qlora_alloc(m->ctx, hbytes * (size_t)(L + 1), 1, QLORA_MEM_CHECKPOINTS, (void **)&s->checkpoints));
    QL_CHECK(qlora_alloc(m->ctx, 3 * hbytes, 1, QLORA_MEM_WORKSPACE, &s->grad_base));
    s->xn = s->grad_base;
    s->dxn = s->xn + T * H;
    s->dh = s->dxn + T * H;
    s->nacts = checkpointing ? 1 : L;
    s->acts = calloc((size_t)s->nacts, sizeof *s->acts);
    if (!s->acts)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "out of memory for %lld activation sets", (long long)s->nacts);
    for (int64_t i = 0; i < s->nacts; i++)
        QL_CHECK(ql_layer_acts_alloc(m, T, QLORA_MEM_ACTIVATIONS, &s->acts[i]));
    return QLORA_OK;
}

static void free_state(qlora_model *m, train_state *s) {
    for (int64_t i = 0; s->acts && i < s->nacts; i++)
        ql_layer_acts_free(m, &s->acts[i]);
    free(s->acts);
    qlora_free(m->ctx, s->grad_base);
    qlora_free(m->ctx, s->checkpoints);
    ql_model_batch_free(m, &s->batch);
}

static qlora_status train_step(qlora_model *m, const qlora_batch *in, const qlora_train_step_opts *o,
                               qlora_train_step_result *out, train_state *s) {
    const qlora_model_config *c = &m->cfg;
    const int64_t T = in->T, H = c->hidden_size, L = c->num_layers;
    const int ckpt = o->grad_checkpointing != 0;
    QL_CHECK(ql_model_batch_init(m, "batch", in->tokens, in->positions, in->seq_start, in->labels, T, &s->batch));
    QL_CHECK(alloc_state(m, T, ckpt, s));
    const qlora_linear_fwd_opts fwd = {1, o->rng_stream};
    uint16_t *h = s->checkpoints;
    QL_CHECK(ql_embedding_forward(m->ctx, m->embed_tokens, c->vocab_size, H, s->batch.tokens, T, h));
    for (int64_t i = 0; i < L; i++) {
        ql_layer_acts *a = &s->acts[ckpt ? 0 : i];
        QL_CHECK(ql_layer_forward(m, i, &s->batch, h + i * T * H, h + (i + 1) * T * H, a, &fwd));
        if (ckpt)
            ql_layer_acts_release_saved(a);
    }
    /* loss and the gradient of the final norm's output, chunk by chunk */
    const uint16_t *h_last = h + L * T * H;
    QL_CHECK(ql_rmsnorm_forward(m->ctx, h_last, m->final_norm, T, H, m->rms_norm_eps, s->xn));
    ql_xent_args xa = {s->xn, m->lm_head, s->batch.labels, T, H, c->vocab_size, o->loss_chunk_tokens, o->loss_denom};
    double loss;
    int64_t count;
    QL_CHECK(ql_cross_entropy(m->ctx, &xa, &loss, &count, s->dxn));
    out->targets = count;
    out->loss_sum = count == 0 ? 0.0 : loss * (o->loss_denom > 0 ? o->loss_denom : (double)count);
    QL_CHECK(ql_rmsnorm_backward(m->ctx, h_last, m->final_norm, s->dxn, T, H, m->rms_norm_eps, s->dh));
    for (int64_t i = L - 1; i >= 0; i--) {
        ql_layer_acts *a = &s->acts[ckpt ? 0 : i];
        const uint16_t *h_in = h + i * T * H;
        if (ckpt) /* recompute, writing the output into xn (scratch here) */
            QL_CHECK(ql_layer_forward(m, i, &s->batch, h_in, s->xn, a, &fwd));
        QL_CHECK(ql_layer_backward(m, i, &s->batch, h_in, a, s->dh, i > 0));
        ql_layer_acts_release_saved(a);
    }
    return QLORA_OK;
}

qlora_status qlora_model_forward_backward(qlora_model *model, const qlora_batch *batch,
                                          const qlora_train_step_opts *opts, qlora_train_step_result *out) {
    QL_REQUIRE_ARG(model != NULL, "model");
    QL_REQUIRE_ARG(batch != NULL, "batch");
    QL_REQUIRE_ARG(batch->tokens != NULL, "batch->tokens");
    QL_REQUIRE_ARG(batch->labels != NULL, "batch->labels");
    QL_REQUIRE_ARG(batch->T > 0 && batch->T <= INT32_MAX, "batch->T");
    QL_REQUIRE_ARG(out != NULL, "out");
    qlora_train_step_opts defaults = qlora_train_step_default_opts();
    if (!opts)
        opts = &defaults;
    QL_REQUIRE_ARG(opts->loss_denom >= 0, "opts->loss_denom");
    QL_REQUIRE_ARG(opts->loss_chunk_tokens >= 0, "opts->loss_chunk_tokens");
    QL_REQUIRE_ARG(opts->rng_stream != UINT64_MAX, "opts->rng_stream (UINT64_MAX is reserved)");
    memset(out, 0, sizeof *out);
    train_state s;
    memset(&s, 0, sizeof s);
    qlora_status st = train_step(model, batch, opts, out, &s);
    if (st != QLORA_OK)
        ql_error_prefix("qlora_model_forward_backward");
    free_state(model, &s);
    return st;
}
