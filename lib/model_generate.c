/*
 * Generation with a KV cache (qlora_model_generate): the prompt runs through the layers once,
 * filling each layer's cache; every new token then runs alone (M = 1, the 4-bit decode path of
 * the linear layers) against the cache. Token choice on the host: argmax, or sampling from
 * softmax(logits / temperature) cut to the top-p nucleus, with uniforms from Philox keyed by the
 * seed (counter = the step), so a run is reproducible on every backend.
 */
#include "model_internal.h"
#include "philox.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QL_GENERATE_STREAM 0x67656e6572617465ULL /* "generate": the sampling counter stream */

qlora_generate_opts qlora_generate_default_opts(void) {
    qlora_generate_opts o;
    memset(&o, 0, sizeof o);
    o.max_new_tokens = 128;
    o.temperature = 1.0f;
    o.top_p = 1.0f;
    o.eos_id = -1;
    return o;
}

typedef struct gen_state {
    uint16_t *cache;    /* [2, L, cap, kvd]: keys then values */
    uint16_t *h;        /* [T, H] */
    ql_layer_acts acts; /* sized for the prompt; steps use its first row */
    float *logits_dev;  /* [V] on a CUDA context */
    float *logits;      /* [V] host */
    double *prob;       /* [V] */
    int32_t *order;     /* [V] */
    void *host_base;
} gen_state;

/* Runs tokens[0..n) at positions past.. through the model; *logits = the last token's. */
static qlora_status run_tokens(qlora_model *m, gen_state *g, int64_t cap, const int32_t *tokens, int64_t n,
                               int64_t past) {
    const qlora_model_config *c = &m->cfg;
    const int64_t H = c->hidden_size, V = c->vocab_size;
    int32_t positions[1];
    const int32_t *pos = NULL;
    if (n == 1) {
        positions[0] = (int32_t)past;
        pos = positions;
    } else if (past != 0) {
        return ql_fail(QLORA_ERR_INTERNAL, "generate: a multi-token step after the prompt");
    }
    ql_model_batch b;
    QL_CHECK(ql_model_batch_init(m, "prompt", tokens, pos, NULL, NULL, n, &b));
    const int64_t kvd = c->num_kv_heads * c->head_dim;
    b.cache_k = g->cache;
    b.cache_v = g->cache + c->num_layers * cap * kvd;
    b.cache_cap = cap;
    b.past = past;
    qlora_status st = ql_embedding_forward(m->ctx, m->embed_tokens, V, H, b.tokens, n, g->h);
    for (int64_t i = 0; st == QLORA_OK && i < c->num_layers; i++)
        st = ql_layer_forward(m, i, &b, g->h, g->h, &g->acts, NULL);
    const uint16_t *last = g->h + (n - 1) * H;
    if (st == QLORA_OK)
        st = ql_rmsnorm_forward(m->ctx, last, m->final_norm, 1, H, m->rms_norm_eps, g->acts.xn1);
    float *dst = m->ctx->cuda ? g->logits_dev : g->logits;
    if (st == QLORA_OK)
        st = ql_lm_head_logits(m->ctx, g->acts.xn1, m->lm_head, 1, H, V, dst);
    if (st == QLORA_OK && dst != g->logits)
        st = ql_ctx_memcpy(m->ctx, g->logits, dst, (size_t)V * 4);
    ql_model_batch_free(m, &b);
    return st;
}

static int32_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return (int32_t)best;
}

static int by_prob_desc(const void *a, const void *b, void *arg) {
    const double *sort_prob = arg;
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (sort_prob[i] != sort_prob[j])
        return sort_prob[i] > sort_prob[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

/* Samples from softmax(logits / temperature) restricted to the top-p nucleus with uniform u. */
static int32_t sample(const qlora_generate_opts *o, gen_state *g, int64_t V, float u) {
    double mx = -INFINITY, sum = 0.0;
    for (int64_t i = 0; i < V; i++)
        mx = fmax(mx, (double)g->logits[i] / o->temperature);
    for (int64_t i = 0; i < V; i++) {
        g->prob[i] = exp((double)g->logits[i] / o->temperature - mx);
        sum += g->prob[i];
        g->order[i] = (int32_t)i;
    }
    int64_t keep = V;
    if (o->top_p < 1.0f) {
        qsort_r(g->order, (size_t)V, sizeof *g->order, by_prob_desc, g->prob);
        double cum = 0.0;
        for (keep = 0; keep < V;) {
            cum += g->prob[g->order[keep++]] / sum;
            if (cum >= o->top_p)
                break;
        }
    }
    double kept = 0.0;
    for (int64_t r = 0; r < keep; r++)
        kept += g->prob[g->order[r]];
    double target = (double)u * kept, cum = 0.0;
    for (int64_t r = 0; r < keep; r++) {
        cum += g->prob[g->order[r]];
        if (target < cum)
            return g->order[r];
    }
    return g->order[keep - 1];
}

static qlora_status generate(qlora_model *m, const int32_t *prompt, int64_t n_prompt, const qlora_generate_opts *o,
                             int32_t *out, int64_t cap_out, int64_t *n_out, gen_state *g) {
    const qlora_model_config *c = &m->cfg;
    const int64_t H = c->hidden_size, V = c->vocab_size, kvd = c->num_kv_heads * c->head_dim;
    const int64_t cap = n_prompt + o->max_new_tokens;
    QL_CHECK(qlora_alloc(m->ctx, (size_t)(2 * c->num_layers * cap * kvd) * 2, 1, QLORA_MEM_WORKSPACE,
                         (void **)&g->cache));
    QL_CHECK(qlora_alloc(m->ctx, (size_t)(n_prompt * H) * 2, 1, QLORA_MEM_WORKSPACE, (void **)&g->h));
    QL_CHECK(ql_layer_acts_alloc(m, n_prompt, QLORA_MEM_WORKSPACE, &g->acts));
    if (m->ctx->cuda)
        QL_CHECK(qlora_alloc(m->ctx, (size_t)V * 4, 1, QLORA_MEM_WORKSPACE, (void **)&g->logits_dev));
    QL_CHECK(qlora_alloc(m->ctx, (size_t)V * (4 + 8 + 4), 0, QLORA_MEM_WORKSPACE, &g->host_base));
    g->prob = g->host_base;
    g->logits = (float *)(g->prob + V);
    g->order = (int32_t *)(g->logits + V);

    QL_CHECK(run_tokens(m, g, cap, prompt, n_prompt, 0));
    const int64_t limit = o->max_new_tokens < cap_out ? o->max_new_tokens : cap_out;
    for (int64_t step = 0; step < limit; step++) {
        int32_t id = o->temperature == 0.0f
                         ? argmax(g->logits, V)
                         : sample(o, g, V, ql_philox_uniform(o->seed, QL_GENERATE_STREAM, (uint64_t)step));
        out[(*n_out)++] = id;
        if (id == o->eos_id || (o->on_token && o->on_token(id, o->user)) || step + 1 == limit)
            break;
        QL_CHECK(run_tokens(m, g, cap, &id, 1, n_prompt + step));
    }
    return QLORA_OK;
}

qlora_status qlora_model_generate(qlora_model *model, const int32_t *prompt, int64_t n_prompt,
                                  const qlora_generate_opts *opts, int32_t *out, int64_t cap, int64_t *n_out) {
    QL_REQUIRE_ARG(model != NULL, "model");
    QL_REQUIRE_ARG(prompt != NULL && n_prompt >= 1 && n_prompt <= INT32_MAX, "prompt/n_prompt");
    QL_REQUIRE_ARG(out != NULL || cap == 0, "out");
    QL_REQUIRE_ARG(cap >= 0, "cap");
    QL_REQUIRE_ARG(n_out != NULL, "n_out");
    qlora_generate_opts defaults = qlora_generate_default_opts();
    if (!opts)
        opts = &defaults;
    QL_REQUIRE_ARG(opts->max_new_tokens >= 0 && opts->max_new_tokens <= INT32_MAX - n_prompt,
                   "opts->max_new_tokens");
    QL_REQUIRE_ARG(isfinite(opts->temperature) && opts->temperature >= 0.0f, "opts->temperature");
    QL_REQUIRE_ARG(opts->top_p > 0.0f && opts->top_p <= 1.0f, "opts->top_p (in (0, 1])");
    *n_out = 0;
    gen_state g;
    memset(&g, 0, sizeof g);
    qlora_status st = generate(model, prompt, n_prompt, opts, out, cap, n_out, &g);
    if (st != QLORA_OK)
        ql_error_prefix("qlora_model_generate");
    qlora_free(model->ctx, g.host_base);
    qlora_free(model->ctx, g.logits_dev);
    ql_layer_acts_free(model, &g.acts);
    qlora_free(model->ctx, g.h);
    qlora_free(model->ctx, g.cache);
    return st;
}
