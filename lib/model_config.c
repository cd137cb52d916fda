/*
 * The shape of a Llama-family decoder for the memory estimator and the forward: presets with
 * the published dimensions (sources in docs/memory.md), Hugging Face config.json parsing
 * (transformers 4.x and 5.x field names, parsed once for both), validation, parameter counts,
 * and the refusal at model load of what the forward does not implement.
 */
#include "internal.h"
#include "text_file.h"
#include "mem_estimate.h"
#include "model_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Sanity limits: a config beyond them is a typo or a corrupt file, not a model (the largest
 * published dense decoders are far inside: H 16384, I 53248, L 126, V 256000). */
#define QL_MAX_HIDDEN (1LL << 20)
#define QL_MAX_INTERMEDIATE (1LL << 22)
#define QL_MAX_LAYERS 10000LL
#define QL_MAX_HEADS 65536LL
#define QL_MAX_HEAD_DIM 65536LL
#define QL_MAX_VOCAB (1LL << 24)
#define QL_MAX_PARAMS 100000000000000ULL /* 10^14 */
#define QL_CONFIG_MAX_BYTES (16u << 20)

/* ------------------------------------------------------------------ presets */
typedef struct preset {
    const char *name;
    int64_t hidden, intermediate, layers, heads, kv_heads, head_dim, vocab;
    int tied, qkv_bias;
    double rope_theta, rms_norm_eps;
    const char *model_type;
    int64_t sliding_window;
} preset;

/* Dimensions, RoPE base and norm epsilon from each model's config.json on the Hugging Face Hub
 * and its paper; see the table in docs/memory.md. Llama 3.0 (not 3.1) has no RoPE scaling;
 * Mistral 7B v0.1 attends through a 4096-token sliding window. */
static const preset presets[] = {
    {"llama-7b", 4096, 11008, 32, 32, 32, 128, 32000, 0, 0, 10000.0, 1e-6, "llama", 0},
    {"llama-13b", 5120, 13824, 40, 40, 40, 128, 32000, 0, 0, 10000.0, 1e-6, "llama", 0},
    {"llama-33b", 6656, 17920, 60, 52, 52, 128, 32000, 0, 0, 10000.0, 1e-6, "llama", 0},
    {"llama-65b", 8192, 22016, 80, 64, 64, 128, 32000, 0, 0, 10000.0, 1e-6, "llama", 0},
    {"llama-2-70b", 8192, 28672, 80, 64, 8, 128, 32000, 0, 0, 10000.0, 1e-5, "llama", 0},
    {"llama-3-8b", 4096, 14336, 32, 32, 8, 128, 128256, 0, 0, 500000.0, 1e-5, "llama", 0},
    {"llama-3-70b", 8192, 28672, 80, 64, 8, 128, 128256, 0, 0, 500000.0, 1e-5, "llama", 0},
    {"mistral-7b", 4096, 14336, 32, 32, 8, 128, 32000, 0, 0, 10000.0, 1e-5, "mistral", 4096},
    {"qwen2.5-7b", 3584, 18944, 28, 28, 4, 128, 152064, 0, 1, 1000000.0, 1e-6, "qwen2", 0},
};
enum { NUM_PRESETS = sizeof presets / sizeof presets[0] };

const char *qlora_model_preset_name(size_t index) { return index < NUM_PRESETS ? presets[index].name : NULL; }

qlora_status qlora_model_config_preset(const char *name, qlora_model_config *out) {
    QL_REQUIRE_ARG(name != NULL, "name");
    QL_REQUIRE_ARG(out != NULL, "out");
    for (size_t i = 0; i < NUM_PRESETS; i++) {
        const preset *p = &presets[i];
        if (strcmp(p->name, name) != 0)
            continue;
        memset(out, 0, sizeof *out);
        ql_copy_name(out->name, p->name);
        out->hidden_size = p->hidden;
        out->intermediate_size = p->intermediate;
        out->num_layers = p->layers;
        out->num_heads = p->heads;
        out->num_kv_heads = p->kv_heads;
        out->head_dim = p->head_dim;
        out->vocab_size = p->vocab;
        out->tie_word_embeddings = p->tied;
        out->qkv_bias = p->qkv_bias;
        out->rope_theta = p->rope_theta;
        snprintf(out->model_type, sizeof out->model_type, "%s", p->model_type);
        out->rms_norm_eps = p->rms_norm_eps;
        out->rope.type = QLORA_ROPE_DEFAULT;
        snprintf(out->rope.type_name, sizeof out->rope.type_name, "default");
        snprintf(out->hidden_act, sizeof out->hidden_act, "silu");
        out->sliding_window = p->sliding_window;
        return QLORA_OK;
    }
    char list[512] = "";
    size_t used = 0;
    for (size_t i = 0; i < NUM_PRESETS && used < sizeof list; i++)
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "", presets[i].name);
    return ql_fail(QLORA_ERR_NOT_FOUND, "unknown model preset '%s' (valid: %s)", name, list);
}

/* ------------------------------------------------------------------ shapes and counts */
void ql_layer_linears(const qlora_model_config *cfg, ql_linear_shape out[QL_LINEAR_COUNT]) {
    uint64_t h = (uint64_t)cfg->hidden_size, inter = (uint64_t)cfg->intermediate_size;
    uint64_t q = (uint64_t)cfg->num_heads * (uint64_t)cfg->head_dim;
    uint64_t kv = (uint64_t)cfg->num_kv_heads * (uint64_t)cfg->head_dim;
    out[QL_LINEAR_Q] = (ql_linear_shape){"q_proj", q, h, cfg->qkv_bias, 1};
    out[QL_LINEAR_K] = (ql_linear_shape){"k_proj", kv, h, cfg->qkv_bias, 1};
    out[QL_LINEAR_V] = (ql_linear_shape){"v_proj", kv, h, cfg->qkv_bias, 1};
    out[QL_LINEAR_O] = (ql_linear_shape){"o_proj", h, q, cfg->o_bias, 1};
    out[QL_LINEAR_GATE] = (ql_linear_shape){"gate_proj", inter, h, cfg->mlp_bias, 0};
    out[QL_LINEAR_UP] = (ql_linear_shape){"up_proj", inter, h, cfg->mlp_bias, 0};
    out[QL_LINEAR_DOWN] = (ql_linear_shape){"down_proj", h, inter, cfg->mlp_bias, 0};
}

static uint64_t mul(uint64_t a, uint64_t b, int *overflow) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r))
        *overflow = 1;
    return r;
}

static uint64_t add(uint64_t a, uint64_t b, int *overflow) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r))
        *overflow = 1;
    return r;
}

int ql_model_param_counts(const qlora_model_config *cfg, ql_param_counts *out) {
    int ovf = 0;
    ql_linear_shape lin[QL_LINEAR_COUNT];
    ql_layer_linears(cfg, lin);
    uint64_t layer_linear = 0, layer_bias = 0, layers = (uint64_t)cfg->num_layers, h = (uint64_t)cfg->hidden_size;
    for (int i = 0; i < QL_LINEAR_COUNT; i++) {
        layer_linear = add(layer_linear, mul(lin[i].out, lin[i].in, &ovf), &ovf);
        if (lin[i].has_bias)
            layer_bias = add(layer_bias, lin[i].out, &ovf);
    }
    memset(out, 0, sizeof *out);
    out->linear = mul(layer_linear, layers, &ovf);
    out->biases = mul(layer_bias, layers, &ovf);
    out->embedding = mul((uint64_t)cfg->vocab_size, h, &ovf);
    out->lm_head = cfg->tie_word_embeddings ? 0 : out->embedding;
    out->norms = mul(add(mul(2, layers, &ovf), 1, &ovf), h, &ovf); /* two per layer + the final norm */
    out->dense = add(add(add(out->embedding, out->lm_head, &ovf), out->norms, &ovf), out->biases, &ovf);
    out->total = add(out->linear, out->dense, &ovf);
    return ovf ? -1 : 0;
}

/* ------------------------------------------------------------------ validation */
static qlora_status check_range(const char *field, int64_t v, int64_t max) {
    if (v <= 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "model config: %s must be > 0 (got %lld)", field, (long long)v);
    if (v > max)
        return ql_fail(QLORA_ERR_INVALID_ARG, "model config: %s = %lld is absurdly large (limit %lld)", field,
                       (long long)v, (long long)max);
    return QLORA_OK;
}

qlora_status qlora_model_config_validate(const qlora_model_config *cfg) {
    QL_REQUIRE_ARG(cfg != NULL, "cfg");
    QL_CHECK(check_range("hidden_size", cfg->hidden_size, QL_MAX_HIDDEN));
    QL_CHECK(check_range("intermediate_size", cfg->intermediate_size, QL_MAX_INTERMEDIATE));
    QL_CHECK(check_range("num_hidden_layers", cfg->num_layers, QL_MAX_LAYERS));
    QL_CHECK(check_range("num_attention_heads", cfg->num_heads, QL_MAX_HEADS));
    QL_CHECK(check_range("num_key_value_heads", cfg->num_kv_heads, QL_MAX_HEADS));
    QL_CHECK(check_range("head_dim", cfg->head_dim, QL_MAX_HEAD_DIM));
    QL_CHECK(check_range("vocab_size", cfg->vocab_size, QL_MAX_VOCAB));
    if (cfg->num_kv_heads > cfg->num_heads || cfg->num_heads % cfg->num_kv_heads != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG,
                       "model config: num_key_value_heads %lld must divide num_attention_heads %lld",
                       (long long)cfg->num_kv_heads, (long long)cfg->num_heads);
    ql_param_counts pc;
    if (ql_model_param_counts(cfg, &pc) != 0 || pc.total >= QL_MAX_PARAMS)
        return ql_fail(QLORA_ERR_INVALID_ARG, "model config: the model would have more than 10^14 parameters "
                       "(hidden_size %lld, intermediate_size %lld, %lld layers, %lld heads of %lld)",
                       (long long)cfg->hidden_size, (long long)cfg->intermediate_size, (long long)cfg->num_layers,
                       (long long)cfg->num_heads, (long long)cfg->head_dim);
    return QLORA_OK;
}

/* ------------------------------------------------------------------ config.json */

/* An integer field: *present = 0 when absent or null (then *out is untouched). */
static qlora_status get_int(const char *path, const cJSON *obj, const char *field, int required, int *present,
                            int64_t *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, field);
    *present = 0;
    if (!v || cJSON_IsNull(v)) {
        if (required)
            return ql_fail(QLORA_ERR_FORMAT, "config '%s': %s field '%s'", path, v ? "null" : "missing", field);
        return QLORA_OK;
    }
    double d = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    if (!(d == floor(d)) || d < -9.0e15 || d > 9.0e15)
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field '%s' must be an integer", path, field);
    *out = (int64_t)d;
    *present = 1;
    return QLORA_OK;
}

static qlora_status get_bool(const char *path, const cJSON *obj, const char *field, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, field);
    if (!v || cJSON_IsNull(v))
        return QLORA_OK;
    if (!cJSON_IsBool(v))
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field '%s' must be true or false", path, field);
    *out = cJSON_IsTrue(v) ? 1 : 0;
    return QLORA_OK;
}

/* rope_theta at the top level (transformers 4.x) or inside rope_parameters (5.x). */
static qlora_status get_rope_theta(const char *path, const cJSON *obj, double *out) {
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(obj, "rope_parameters");
    const cJSON *v = NULL;
    const char *field = "rope_theta";
    if (params && !cJSON_IsNull(params)) {
        if (!cJSON_IsObject(params))
            return ql_fail(QLORA_ERR_FORMAT, "config '%s': field 'rope_parameters' must be an object", path);
        v = cJSON_GetObjectItemCaseSensitive(params, "rope_theta");
        field = "rope_parameters.rope_theta";
    }
    if (!v)
        v = cJSON_GetObjectItemCaseSensitive(obj, "rope_theta");
    if (!v || cJSON_IsNull(v))
        return QLORA_OK;
    if (!cJSON_IsNumber(v) || !(v->valuedouble > 0) || !isfinite(v->valuedouble))
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field '%s' must be a positive number", path, field);
    *out = v->valuedouble;
    return QLORA_OK;
}

/* A positive finite number; *present = 0 when absent or null (then *out is untouched). */
static qlora_status get_positive(const char *path, const cJSON *obj, const char *prefix, const char *field,
                                 int *present, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, field);
    *present = 0;
    if (!v || cJSON_IsNull(v))
        return QLORA_OK;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || !(v->valuedouble > 0))
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field '%s%s' must be a positive number", path, prefix, field);
    *out = v->valuedouble;
    *present = 1;
    return QLORA_OK;
}

static qlora_status require_positive(const char *path, const cJSON *obj, const char *prefix, const char *field,
                                     const char *rope_type, double *out) {
    int present;
    QL_CHECK(get_positive(path, obj, prefix, field, &present, out));
    if (!present)
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': RoPE type '%s' needs field '%s%s'", path, rope_type, prefix,
                       field);
    return QLORA_OK;
}

/* rope_parameters (transformers 5) or rope_scaling (4.x), with "rope_type" or the older "type".
 * A type the forward does not implement is recorded as QLORA_ROPE_UNSUPPORTED: the estimator
 * does not need it, model loading refuses it. */
static qlora_status get_rope(const char *path, const cJSON *obj, qlora_rope_config *rope) {
    memset(rope, 0, sizeof *rope);
    rope->type = QLORA_ROPE_DEFAULT;
    snprintf(rope->type_name, sizeof rope->type_name, "default");
    const char *prefix = "rope_parameters.";
    const cJSON *dict = cJSON_GetObjectItemCaseSensitive(obj, "rope_parameters");
    if (!cJSON_IsObject(dict)) {
        prefix = "rope_scaling.";
        dict = cJSON_GetObjectItemCaseSensitive(obj, "rope_scaling");
    }
    if (!dict || cJSON_IsNull(dict))
        return QLORA_OK;
    if (!cJSON_IsObject(dict))
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field '%.*s' must be an object or null", path,
                       (int)strlen(prefix) - 1, prefix);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(dict, "rope_type");
    if (!type)
        type = cJSON_GetObjectItemCaseSensitive(dict, "type");
    const char *name = "default";
    if (type && !cJSON_IsNull(type)) {
        if (!cJSON_IsString(type))
            return ql_fail(QLORA_ERR_FORMAT, "config '%s': field '%srope_type' must be a string", path, prefix);
        name = type->valuestring;
    }
    snprintf(rope->type_name, sizeof rope->type_name, "%s", name);
    if (strcmp(name, "default") == 0)
        return QLORA_OK;
    if (strcmp(name, "linear") == 0) {
        rope->type = QLORA_ROPE_LINEAR;
        return require_positive(path, dict, prefix, "factor", name, &rope->factor);
    }
    if (strcmp(name, "llama3") != 0) {
        rope->type = QLORA_ROPE_UNSUPPORTED;
        return QLORA_OK;
    }
    double orig = 0;
    rope->type = QLORA_ROPE_LLAMA3;
    QL_CHECK(require_positive(path, dict, prefix, "factor", name, &rope->factor));
    QL_CHECK(require_positive(path, dict, prefix, "low_freq_factor", name, &rope->low_freq_factor));
    QL_CHECK(require_positive(path, dict, prefix, "high_freq_factor", name, &rope->high_freq_factor));
    QL_CHECK(require_positive(path, dict, prefix, "original_max_position_embeddings", name, &orig));
    if (!(rope->high_freq_factor > rope->low_freq_factor) || orig != floor(orig) || orig > 9.0e15)
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': llama3 RoPE needs high_freq_factor > low_freq_factor "
                       "and an integer original_max_position_embeddings", path);
    rope->original_max_position_embeddings = (int64_t)orig;
    return QLORA_OK;
}

/* Mistral's sliding_window (null in v0.2 and later) and Qwen2's use_sliding_window (Qwen2 keeps
 * a sliding_window size that is unused while use_sliding_window is false). */
static qlora_status get_sliding_window(const char *path, const cJSON *obj, int qwen2, int64_t *out) {
    *out = 0;
    if (qwen2) {
        int use = 0;
        QL_CHECK(get_bool(path, obj, "use_sliding_window", &use));
        if (!use)
            return QLORA_OK;
    }
    int present;
    QL_CHECK(get_int(path, obj, "sliding_window", 0, &present, out));
    if (present && *out <= 0)
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field 'sliding_window' must be a positive integer or null "
                       "(got %lld)", path, (long long)*out);
    if (qwen2 && !present)
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field 'use_sliding_window' is true but 'sliding_window' "
                       "has no size", path);
    return QLORA_OK;
}

static qlora_status get_hidden_act(const char *path, const cJSON *obj, char *out, size_t cap) {
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(obj, "hidden_act");
    const char *name = "silu"; /* LlamaConfig's default */
    if (act && !cJSON_IsNull(act)) {
        if (!cJSON_IsString(act))
            return ql_fail(QLORA_ERR_FORMAT, "config '%s': field 'hidden_act' must be a string", path);
        name = act->valuestring;
    }
    snprintf(out, cap, "%s", name);
    return QLORA_OK;
}

/* Fields whose range check failed in qlora_model_config_validate are reported again with the
 * file name, so a user sees which file holds the bad value. */
static qlora_status parse_config(const char *path, const cJSON *root, qlora_model_config *cfg) {
    if (!cJSON_IsObject(root))
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': the top level is not a JSON object", path);
    const cJSON *obj = root;
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    if (!cJSON_GetObjectItemCaseSensitive(root, "hidden_size") && cJSON_IsObject(text))
        obj = text; /* multimodal wrapper: the language model's config is nested */

    const cJSON *type = cJSON_GetObjectItemCaseSensitive(obj, "model_type");
    const char *model_type = "llama";
    if (type && !cJSON_IsNull(type)) {
        if (!cJSON_IsString(type))
            return ql_fail(QLORA_ERR_FORMAT, "config '%s': field 'model_type' must be a string", path);
        model_type = type->valuestring;
    }
    if (strcmp(model_type, "llama") != 0 && strcmp(model_type, "mistral") != 0 && strcmp(model_type, "qwen2") != 0)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': model_type '%s' is not supported (llama, mistral, qwen2)",
                       path, model_type);

    memset(cfg, 0, sizeof *cfg);
    int present;
    QL_CHECK(get_int(path, obj, "hidden_size", 1, &present, &cfg->hidden_size));
    QL_CHECK(get_int(path, obj, "intermediate_size", 1, &present, &cfg->intermediate_size));
    QL_CHECK(get_int(path, obj, "num_hidden_layers", 1, &present, &cfg->num_layers));
    QL_CHECK(get_int(path, obj, "num_attention_heads", 1, &present, &cfg->num_heads));
    QL_CHECK(get_int(path, obj, "vocab_size", 1, &present, &cfg->vocab_size));
    if (cfg->num_heads <= 0)
        return ql_fail(QLORA_ERR_FORMAT, "config '%s': field 'num_attention_heads' must be > 0 (got %lld)", path,
                       (long long)cfg->num_heads);
    cfg->num_kv_heads = cfg->num_heads; /* absent or null: no grouped-query attention */
    QL_CHECK(get_int(path, obj, "num_key_value_heads", 0, &present, &cfg->num_kv_heads));
    QL_CHECK(get_int(path, obj, "head_dim", 0, &present, &cfg->head_dim));
    if (!present) {
        if (cfg->hidden_size % cfg->num_heads != 0)
            return ql_fail(QLORA_ERR_FORMAT, "config '%s': field 'hidden_size' (%lld) is not divisible by "
                           "'num_attention_heads' (%lld) and there is no 'head_dim'", path,
                           (long long)cfg->hidden_size, (long long)cfg->num_heads);
        cfg->head_dim = cfg->hidden_size / cfg->num_heads;
    }
    QL_CHECK(get_bool(path, obj, "tie_word_embeddings", &cfg->tie_word_embeddings));
    int attention_bias = 0;
    QL_CHECK(get_bool(path, obj, "attention_bias", &attention_bias));
    QL_CHECK(get_bool(path, obj, "mlp_bias", &cfg->mlp_bias));
    cfg->qkv_bias = attention_bias || strcmp(model_type, "qwen2") == 0; /* Qwen2 hard-wires q/k/v bias */
    cfg->o_bias = attention_bias;
    QL_CHECK(get_rope_theta(path, obj, &cfg->rope_theta));
    snprintf(cfg->name, sizeof cfg->name, "%s (%s)", model_type, path);
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", model_type);
    QL_CHECK(get_sliding_window(path, obj, strcmp(model_type, "qwen2") == 0, &cfg->sliding_window));
    QL_CHECK(get_hidden_act(path, obj, cfg->hidden_act, sizeof cfg->hidden_act));
    cfg->rms_norm_eps = 1e-6; /* LlamaConfig's default */
    QL_CHECK(get_positive(path, obj, "", "rms_norm_eps", &present, &cfg->rms_norm_eps));
    QL_CHECK(get_rope(path, obj, &cfg->rope));

    if (qlora_model_config_validate(cfg) != QLORA_OK) {
        ql_error_prefix("config '%s'", path);
        return QLORA_ERR_FORMAT;
    }
    return QLORA_OK;
}

qlora_status qlora_model_config_from_json_file(const char *path, qlora_model_config *out) {
    QL_REQUIRE_ARG(path != NULL, "path");
    QL_REQUIRE_ARG(out != NULL, "out");
    char *text = NULL;
    size_t n = 0;
    QL_CHECK(ql_read_text_file("config", path, QL_CONFIG_MAX_BYTES, &text, &n));
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    qlora_status st = QLORA_OK;
    size_t at = end ? (size_t)(end - text) : 0;
    while (root && at < n && (text[at] == ' ' || text[at] == '\t' || text[at] == '\r' || text[at] == '\n'))
        at++;
    if (!root || at != n) {
        st = ql_fail(QLORA_ERR_FORMAT, "config '%s': not valid JSON (near byte %zu)", path, at);
    } else {
        qlora_model_config cfg;
        st = parse_config(path, root, &cfg);
        if (st == QLORA_OK)
            *out = cfg;
    }
    cJSON_Delete(root);
    free(text);
    return st;
}

/* ------------------------------------------------------------------ what the forward implements */
qlora_status ql_model_config_check_runnable(const char *path, const qlora_model_config *cfg) {
    if (cfg->sliding_window != 0) {
        if (strcmp(cfg->model_type, "qwen2") == 0)
            return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field 'use_sliding_window' is true; sliding-window "
                           "attention is not supported", path);
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field 'sliding_window' is %lld; sliding-window "
                       "attention is not supported (only null)", path, (long long)cfg->sliding_window);
    }
    if (strcmp(cfg->hidden_act, "silu") != 0)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field 'hidden_act' is '%s'; it must be \"silu\"", path,
                       cfg->hidden_act);
    if (cfg->rope.type == QLORA_ROPE_UNSUPPORTED)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field 'rope_scaling.rope_type' (transformers 5: "
                       "'rope_parameters.rope_type') is '%s'; only default, linear and llama3 RoPE are supported",
                       path, cfg->rope.type_name);
    return QLORA_OK;
}
