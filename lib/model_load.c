/*
 * Loading a Hugging Face Llama-family model directory as a QLoRA model: config.json, then the
 * checkpoint tensor by tensor. Linear weights are quantized straight from the (mapped) file, so
 * only one 16-bit linear weight is ever in memory at a time (inside qlora_quantize, when the
 * mapping is misaligned), or loaded as they are from a bitsandbytes 4-bit checkpoint.
 */
#include "model_internal.h"
#include "half.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

qlora_model_load_opts qlora_model_load_default_opts(void) {
    qlora_model_load_opts o;
    memset(&o, 0, sizeof o);
    o.quant = qlora_quant_default_params();
    o.lora = qlora_lora_default_params();
    o.targets = QLORA_TARGET_ALL_LINEAR;
    return o;
}

const char *qlora_target_name(int i) {
    static const char *const names[QL_LINEAR_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"};
    return i >= 0 && i < QL_LINEAR_COUNT ? names[i] : NULL;
}

/* Finds `name` and checks its shape: rows x cols (cols 0: a vector of rows). */
static qlora_status find_tensor(const qlora_checkpoint *ck, const char *dir, const char *name, int64_t rows,
                                int64_t cols, qlora_tensor *t) {
    if (qlora_checkpoint_find(ck, name, t) != QLORA_OK) {
        ql_error_prefix("model '%s'", dir);
        return QLORA_ERR_NOT_FOUND;
    }
    int ndim = cols > 0 ? 2 : 1;
    if (t->ndim != ndim || t->shape[0] != rows || (ndim == 2 && t->shape[1] != cols))
        return ql_fail(QLORA_ERR_SHAPE, "model '%s': tensor '%s' has shape [%lld%s%lld] where config.json implies "
                       "[%lld%s%lld]", dir, name, (long long)t->shape[0], t->ndim > 1 ? ", " : "",
                       (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)rows, ndim > 1 ? ", " : "",
                       (long long)cols);
    return QLORA_OK;
}

/* A 16-bit frozen tensor (embedding, norm, lm_head, bias) converted to BF16 in DENSE_WEIGHTS. */
static qlora_status load_dense(qlora_ctx *ctx, const qlora_checkpoint *ck, const char *dir, const char *name,
                               int64_t rows, int64_t cols, uint16_t **out) {
    qlora_tensor t;
    QL_CHECK(find_tensor(ck, dir, name, rows, cols, &t));
    if (t.dtype != QLORA_BF16 && t.dtype != QLORA_F16 && t.dtype != QLORA_F32)
        return ql_fail(QLORA_ERR_DTYPE, "model '%s': tensor '%s' is %s; expected BF16, F16 or F32", dir, name,
                       qlora_dtype_name(t.dtype));
    int64_t n = rows * (cols > 0 ? cols : 1);
    /* converted in host memory, then copied to the device on a CUDA context */
    uint16_t *dst;
    QL_CHECK(qlora_alloc(ctx, (size_t)n * 2, 0, ctx->cuda ? QLORA_MEM_WORKSPACE : QLORA_MEM_DENSE_WEIGHTS,
                         (void **)&dst));
    const unsigned char *src = t.data; /* possibly unaligned: read through memcpy */
    for (int64_t i = 0; i < n; i++) {
        if (t.dtype == QLORA_F32) {
            float f;
            memcpy(&f, src + 4 * i, 4);
            dst[i] = ql_f32_to_bf16(f);
        } else {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = t.dtype == QLORA_BF16 ? h : ql_f32_to_bf16(ql_f16_to_f32(h));
        }
    }
    if (!ctx->cuda) {
        *out = dst;
        return QLORA_OK;
    }
    void *dev = NULL;
    qlora_status st = qlora_alloc(ctx, (size_t)n * 2, 1, QLORA_MEM_DENSE_WEIGHTS, &dev);
    if (st == QLORA_OK)
        st = ql_ctx_memcpy(ctx, dev, dst, (size_t)n * 2);
    qlora_free(ctx, dst);
    if (st != QLORA_OK) {
        qlora_free(ctx, dev);
        return st;
    }
    *out = dev;
    return QLORA_OK;
}

/* One decoder linear weight: bitsandbytes 4-bit as stored, else quantized from 16/32-bit. */
static qlora_status load_linear_weight(qlora_ctx *ctx, const qlora_checkpoint *ck, const char *dir,
                                       const char *name, const ql_linear_shape *shape,
                                       const qlora_quant_params *quant, qlora_qtensor *q) {
    if (qlora_bnb_is_quantized(ck, name)) {
        QL_CHECK(qlora_bnb_load(ctx, ck, name, q));
        if (q->ndim != 2 || q->shape[0] != (int64_t)shape->out || q->shape[1] != (int64_t)shape->in) {
            qlora_qtensor_free(ctx, q);
            return ql_fail(QLORA_ERR_SHAPE, "model '%s': 4-bit tensor '%s' does not have the shape [%llu, %llu] "
                           "config.json implies", dir, name, (unsigned long long)shape->out,
                           (unsigned long long)shape->in);
        }
        return QLORA_OK;
    }
    qlora_tensor t;
    QL_CHECK(find_tensor(ck, dir, name, (int64_t)shape->out, (int64_t)shape->in, &t));
    if (t.dtype != QLORA_BF16 && t.dtype != QLORA_F16 && t.dtype != QLORA_F32)
        return ql_fail(QLORA_ERR_DTYPE, "model '%s': tensor '%s' is %s; expected BF16, F16, F32 or a "
                       "bitsandbytes 4-bit weight", dir, name, qlora_dtype_name(t.dtype));
    ql_copy_name(t.name, name);
    /* qlora_quantize reads its source where the context computes: on a CUDA context the mapped
     * weight goes to a device workspace first (one 16/32-bit weight at a time, as on the host) */
    qlora_tensor src = t;
    void *dev = NULL;
    qlora_status st = QLORA_OK;
    if (ctx->cuda) {
        st = qlora_alloc(ctx, qlora_tensor_nbytes(&t), 1, QLORA_MEM_WORKSPACE, &dev);
        if (st == QLORA_OK) {
            src.data = dev;
            src.device = qlora_ctx_device(ctx);
            st = qlora_tensor_copy(ctx, &src, &t);
        }
    }
    if (st == QLORA_OK)
        st = qlora_quantize(ctx, &src, quant, q);
    qlora_free(ctx, dev);
    if (st != QLORA_OK)
        ql_error_prefix("model '%s'", dir);
    return st;
}

static qlora_status load_layer(qlora_model *m, const qlora_checkpoint *ck, const char *dir, int64_t index,
                               const qlora_model_load_opts *opts, ql_decoder_layer *layer) {
    const qlora_model_config *cfg = &m->cfg;
    char name[QLORA_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%lld.input_layernorm.weight", (long long)index);
    QL_CHECK(load_dense(m->ctx, ck, dir, name, cfg->hidden_size, 0, &layer->input_norm));
    snprintf(name, sizeof name, "model.layers.%lld.post_attention_layernorm.weight", (long long)index);
    QL_CHECK(load_dense(m->ctx, ck, dir, name, cfg->hidden_size, 0, &layer->post_attention_norm));
    ql_linear_shape shapes[QL_LINEAR_COUNT];
    ql_layer_linears(cfg, shapes);
    for (int j = 0; j < QL_LINEAR_COUNT; j++) {
        const char *block = shapes[j].attention ? "self_attn" : "mlp";
        snprintf(name, sizeof name, "model.layers.%lld.%s.%s.weight", (long long)index, block, shapes[j].name);
        QL_CHECK(load_linear_weight(m->ctx, ck, dir, name, &shapes[j], &opts->quant, &layer->weight[j]));
        const qlora_tensor *bias = NULL;
        if (shapes[j].has_bias) {
            uint16_t *b;
            snprintf(name, sizeof name, "model.layers.%lld.%s.%s.bias", (long long)index, block, shapes[j].name);
            QL_CHECK(load_dense(m->ctx, ck, dir, name, (int64_t)shapes[j].out, 0, &b));
            int64_t n = (int64_t)shapes[j].out;
            QL_CHECK(qlora_tensor_init(&layer->bias[j], name, QLORA_BF16, 1, &n, b, ql_ctx_tensor_device(m->ctx)));
            bias = &layer->bias[j];
        }
        QL_CHECK(qlora_linear_create(m->ctx, &layer->weight[j], bias, &layer->linear[j]));
        if (opts->lora.rank > 0 && (opts->targets & (1u << j)))
            QL_CHECK(qlora_linear_add_adapter(layer->linear[j], "default", &opts->lora, NULL));
    }
    return QLORA_OK;
}

static ql_rope_params rope_params(const qlora_model_config *cfg) {
    ql_rope_params p;
    memset(&p, 0, sizeof p);
    /* QLORA_ROPE_UNSUPPORTED never gets here: ql_model_config_check_runnable refuses it */
    p.type = cfg->rope.type == QLORA_ROPE_LINEAR ? QL_ROPE_LINEAR
             : cfg->rope.type == QLORA_ROPE_LLAMA3 ? QL_ROPE_LLAMA3 : QL_ROPE_DEFAULT;
    p.head_dim = (int)cfg->head_dim;
    p.theta = cfg->rope_theta > 0 ? cfg->rope_theta : 10000.0; /* transformers' default */
    p.factor = cfg->rope.factor;
    p.low_freq_factor = cfg->rope.low_freq_factor;
    p.high_freq_factor = cfg->rope.high_freq_factor;
    p.original_max_positions = cfg->rope.original_max_position_embeddings;
    return p;
}

static qlora_status load_model(qlora_model *m, const char *dir, const qlora_model_load_opts *opts) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_model_load: directory name '%.64s...' is too long", dir);
    QL_CHECK(qlora_model_config_from_json_file(path, &m->cfg));
    QL_CHECK(ql_model_config_check_runnable(path, &m->cfg));
    const qlora_model_config *cfg = &m->cfg;
    m->rms_norm_eps = (float)cfg->rms_norm_eps;
    m->rope = rope_params(cfg);
    m->layers = calloc((size_t)cfg->num_layers, sizeof *m->layers);
    if (!m->layers)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "model '%s': out of memory for %lld layers", dir,
                       (long long)cfg->num_layers);
    if (cfg->head_dim % 2 != 0 || cfg->head_dim > QL_ATTN_MAX_HEAD_DIM)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': head_dim %lld must be even and at most %d", path,
                       (long long)cfg->head_dim, QL_ATTN_MAX_HEAD_DIM);
    if (cfg->hidden_size > INT32_MAX || cfg->num_heads > INT32_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': dimensions beyond 2^31 are not supported", path);

    qlora_checkpoint *ck = NULL;
    QL_CHECK(qlora_checkpoint_open(dir, &ck));
    qlora_status st = load_dense(m->ctx, ck, dir, "model.embed_tokens.weight", cfg->vocab_size, cfg->hidden_size,
                                 &m->embed_tokens);
    if (st == QLORA_OK)
        st = load_dense(m->ctx, ck, dir, "model.norm.weight", cfg->hidden_size, 0, &m->final_norm);
    if (st == QLORA_OK) {
        /* A tied checkpoint usually lacks lm_head.weight; when present it equals the embedding. */
        if (cfg->tie_word_embeddings)
            m->lm_head = m->embed_tokens;
        else
            st = load_dense(m->ctx, ck, dir, "lm_head.weight", cfg->vocab_size, cfg->hidden_size, &m->lm_head);
    }
    for (int64_t i = 0; st == QLORA_OK && i < cfg->num_layers; i++)
        st = load_layer(m, ck, dir, i, opts, &m->layers[i]);
    qlora_checkpoint_close(ck);
    return st;
}

qlora_status qlora_model_load(qlora_ctx *ctx, const char *dir, const qlora_model_load_opts *opts,
                              qlora_model **out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(dir != NULL, "dir");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    qlora_model_load_opts defaults = qlora_model_load_default_opts();
    if (!opts)
        opts = &defaults;
    if (opts->lora.rank > 0 && (opts->targets == 0 || (opts->targets & ~QLORA_TARGET_ALL_LINEAR)))
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_model_load: opts->targets 0x%x is not a non-empty set of "
                       "QLORA_TARGET_* bits", opts->targets);
    if (opts->lora.rank < 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_model_load: opts->lora.rank is %d (0: no adapters)",
                       opts->lora.rank);
    qlora_model *m = calloc(1, sizeof *m);
    if (!m)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "qlora_model_load '%s': out of memory", dir);
    m->ctx = ctx;
    qlora_status st = load_model(m, dir, opts);
    if (st != QLORA_OK) {
        qlora_model_free(m);
        return st;
    }
    *out = m;
    return QLORA_OK;
}

void qlora_model_free(qlora_model *m) {
    if (!m)
        return;
    for (int64_t i = 0; m->layers && i < m->cfg.num_layers; i++) {
        ql_decoder_layer *l = &m->layers[i];
        for (int j = 0; j < QL_LINEAR_COUNT; j++) {
            qlora_linear_free(l->linear[j]);
            qlora_qtensor_free(m->ctx, &l->weight[j]);
            qlora_free(m->ctx, l->bias[j].data);
        }
        qlora_free(m->ctx, l->input_norm);
        qlora_free(m->ctx, l->post_attention_norm);
    }
    free(m->layers);
    if (m->lm_head != m->embed_tokens)
        qlora_free(m->ctx, m->lm_head);
    qlora_free(m->ctx, m->embed_tokens);
    qlora_free(m->ctx, m->final_norm);
    free(m);
}

qlora_ctx *qlora_model_context(const qlora_model *model) { return model ? model->ctx : NULL; }

qlora_status qlora_model_get_config(const qlora_model *model, qlora_model_config *out) {
    QL_REQUIRE_ARG(model != NULL, "model");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = model->cfg;
    return QLORA_OK;
}

qlora_status qlora_model_linear(qlora_model *model, int64_t layer, const char *proj, qlora_linear **out) {
    QL_REQUIRE_ARG(model != NULL, "model");
    QL_REQUIRE_ARG(proj != NULL, "proj");
    QL_REQUIRE_ARG(out != NULL, "out");
    if (layer < 0 || layer >= model->cfg.num_layers)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_model_linear: layer %lld outside [0, %lld)", (long long)layer,
                       (long long)model->cfg.num_layers);
    ql_linear_shape shapes[QL_LINEAR_COUNT];
    ql_layer_linears(&model->cfg, shapes);
    for (int j = 0; j < QL_LINEAR_COUNT; j++)
        if (strcmp(shapes[j].name, proj) == 0) {
            *out = model->layers[layer].linear[j];
            return QLORA_OK;
        }
    return ql_fail(QLORA_ERR_NOT_FOUND, "qlora_model_linear: no linear layer '%s' (q_proj, k_proj, v_proj, o_proj, "
                   "gate_proj, up_proj, down_proj)", proj);
}

qlora_status qlora_model_enable_adapter(qlora_model *model, const char *name, int enabled) {
    QL_REQUIRE_ARG(model != NULL, "model");
    QL_REQUIRE_ARG(name != NULL, "name");
    int found = 0;
    for (int64_t i = 0; i < model->cfg.num_layers; i++)
        for (int j = 0; j < QL_LINEAR_COUNT; j++) {
            qlora_linear *lin = model->layers[i].linear[j];
            int id;
            if (qlora_linear_find_adapter(lin, name, &id) != QLORA_OK)
                continue;
            QL_CHECK(qlora_linear_adapter_enable(lin, id, enabled));
            found = 1;
        }
    if (!found)
        return ql_fail(QLORA_ERR_NOT_FOUND, "qlora_model_enable_adapter: no layer has an adapter '%s'", name);
    return QLORA_OK;
}
