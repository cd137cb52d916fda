/*
 * The parts of config.json the forward needs beyond the shape (qlora_model_config): the RMSNorm
 * epsilon and the RoPE variant, and the refusal of features the kernels do not implement
 * (sliding-window attention, other RoPE types and activations), so such a model is never run
 * differently from transformers.
 */
#include "model_internal.h"
#include "text_file.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QL_CONFIG_MAX_BYTES (16u << 20)

/* A positive finite number; *present = 0 when absent or null. */
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

/* rope_parameters (transformers 5) or rope_scaling (4.x), with "rope_type" or the older "type". */
static qlora_status read_rope(const char *path, const cJSON *obj, const qlora_model_config *cfg,
                              ql_rope_params *rope) {
    memset(rope, 0, sizeof *rope);
    rope->type = QL_ROPE_DEFAULT;
    rope->head_dim = (int)cfg->head_dim;
    rope->theta = cfg->rope_theta > 0 ? cfg->rope_theta : 10000.0; /* transformers' default */
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
    if (strcmp(name, "default") == 0)
        return QLORA_OK;
    if (strcmp(name, "linear") == 0) {
        rope->type = QL_ROPE_LINEAR;
        return require_positive(path, dict, prefix, "factor", name, &rope->factor);
    }
    if (strcmp(name, "llama3") == 0) {
        double orig = 0;
        rope->type = QL_ROPE_LLAMA3;
        QL_CHECK(require_positive(path, dict, prefix, "factor", name, &rope->factor));
        QL_CHECK(require_positive(path, dict, prefix, "low_freq_factor", name, &rope->low_freq_factor));
        QL_CHECK(require_positive(path, dict, prefix, "high_freq_factor", name, &rope->high_freq_factor));
        QL_CHECK(require_positive(path, dict, prefix, "original_max_position_embeddings", name, &orig));
        if (!(rope->high_freq_factor > rope->low_freq_factor) || orig != floor(orig) || orig > 9.0e15)
            return ql_fail(QLORA_ERR_FORMAT, "config '%s': llama3 RoPE needs high_freq_factor > low_freq_factor "
                           "and an integer original_max_position_embeddings", path);
        rope->original_max_positions = (int64_t)orig;
        return QLORA_OK;
    }
    return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field '%srope_type' is '%s'; only default, linear and "
                   "llama3 RoPE are supported", path, prefix, name);
}

/* Mistral's sliding_window (null in v0.2 and later) and Qwen2's use_sliding_window. */
static qlora_status refuse_sliding_window(const char *path, const cJSON *obj) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(obj, "model_type");
    int qwen2 = cJSON_IsString(type) && strcmp(type->valuestring, "qwen2") == 0;
    if (qwen2) {
        const cJSON *use = cJSON_GetObjectItemCaseSensitive(obj, "use_sliding_window");
        if (cJSON_IsTrue(use))
            return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field 'use_sliding_window' is true; sliding-window "
                           "attention is not supported", path);
        return QLORA_OK;
    }
    const cJSON *window = cJSON_GetObjectItemCaseSensitive(obj, "sliding_window");
    if (window && !cJSON_IsNull(window))
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field 'sliding_window' is set; sliding-window "
                       "attention is not supported (only null)", path);
    return QLORA_OK;
}

static qlora_status parse_extras(const char *path, const cJSON *root, const qlora_model_config *cfg,
                                 float *rms_norm_eps, ql_rope_params *rope) {
    const cJSON *obj = root;
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    if (!cJSON_GetObjectItemCaseSensitive(root, "hidden_size") && cJSON_IsObject(text))
        obj = text; /* as qlora_model_config_from_json_file reads it */
    QL_CHECK(refuse_sliding_window(path, obj));
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(obj, "hidden_act");
    if (act && !cJSON_IsNull(act) && !(cJSON_IsString(act) && strcmp(act->valuestring, "silu") == 0))
        return ql_fail(QLORA_ERR_UNSUPPORTED, "config '%s': field 'hidden_act' must be \"silu\"", path);
    double eps = 1e-6; /* LlamaConfig's default */
    int present;
    QL_CHECK(get_positive(path, obj, "", "rms_norm_eps", &present, &eps));
    *rms_norm_eps = (float)eps;
    return read_rope(path, obj, cfg, rope);
}

qlora_status ql_model_read_extras(const char *config_path, const qlora_model_config *cfg, float *rms_norm_eps,
                                  ql_rope_params *rope) {
    char *text = NULL;
    size_t n = 0;
    QL_CHECK(ql_read_text_file("config", config_path, QL_CONFIG_MAX_BYTES, &text, &n));
    cJSON *root = cJSON_ParseWithLength(text, n);
    qlora_status st = root ? parse_extras(config_path, root, cfg, rms_norm_eps, rope)
                           : ql_fail(QLORA_ERR_FORMAT, "config '%s': not valid JSON", config_path);
    cJSON_Delete(root);
    free(text);
    return st;
}
