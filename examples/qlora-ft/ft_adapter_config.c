/*
 * adapter_config.json: written with the fields of peft's LoraConfig that every peft release
 * since 0.10 knows (older releases refuse unknown fields, newer ones fill in the rest with their
 * defaults), keys sorted as peft writes them; read back with a check of every field qlora-ft
 * depends on, refusing LoRA variants it does not implement rather than ignoring them.
 */
#include "ft_error.h"
#include "ft_adapter.h"
#include "ft_fs.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FT_TARGET_COUNT 7

/* The shortest decimal that reads back as the same float, as a double: 0.05f is written 0.05
 * (as Python writes the value it was given), not 0.05000000074505806. */
static double short_decimal(float v) {
    char buf[32];
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, (double)v);
        if ((float)strtod(buf, NULL) == v)
            break;
    }
    return strtod(buf, NULL);
}

/* Adds key: value (NULL value = JSON null); returns 0 or -1 when out of memory. */
static int add(cJSON *obj, const char *key, cJSON *value) {
    if (!value)
        return -1;
    if (!cJSON_AddItemToObject(obj, key, value)) {
        cJSON_Delete(value);
        return -1;
    }
    return 0;
}

static cJSON *build(const ft_adapter_config *cfg) {
    cJSON *o = cJSON_CreateObject(), *targets = cJSON_CreateArray();
    if (!o || !targets) {
        cJSON_Delete(o);
        cJSON_Delete(targets);
        return NULL;
    }
    /* sorted by name, as peft's json.dumps(sort_keys=True) writes them */
    const char *sorted[FT_TARGET_COUNT];
    int n = 0;
    for (int j = 0; j < FT_TARGET_COUNT; j++)
        if (cfg->targets & (1u << j))
            sorted[n++] = qlora_target_name(j);
    for (int a = 1; a < n; a++)
        for (int b = a; b > 0 && strcmp(sorted[b - 1], sorted[b]) > 0; b--) {
            const char *t = sorted[b];
            sorted[b] = sorted[b - 1];
            sorted[b - 1] = t;
        }
    int bad = 0;
    for (int j = 0; j < n; j++)
        bad |= add(targets, "", cJSON_CreateString(sorted[j])) != 0;
    bad |= add(o, "alpha_pattern", cJSON_CreateObject());
    bad |= add(o, "auto_mapping", cJSON_CreateNull());
    bad |= add(o, "base_model_name_or_path", cJSON_CreateString(cfg->base_model));
    bad |= add(o, "bias", cJSON_CreateString("none"));
    bad |= add(o, "fan_in_fan_out", cJSON_CreateFalse());
    bad |= add(o, "inference_mode", cJSON_CreateTrue());
    bad |= add(o, "init_lora_weights", cJSON_CreateTrue());
    bad |= add(o, "layer_replication", cJSON_CreateNull());
    bad |= add(o, "layers_pattern", cJSON_CreateNull());
    bad |= add(o, "layers_to_transform", cJSON_CreateNull());
    bad |= add(o, "loftq_config", cJSON_CreateObject());
    bad |= add(o, "lora_alpha", cJSON_CreateNumber(short_decimal(cfg->alpha)));
    bad |= add(o, "lora_dropout", cJSON_CreateNumber(short_decimal(cfg->dropout)));
    bad |= add(o, "megatron_config", cJSON_CreateNull());
    bad |= add(o, "megatron_core", cJSON_CreateString("megatron.core"));
    bad |= add(o, "modules_to_save", cJSON_CreateNull());
    bad |= add(o, "peft_type", cJSON_CreateString("LORA"));
    bad |= add(o, "r", cJSON_CreateNumber(cfg->rank));
    bad |= add(o, "rank_pattern", cJSON_CreateObject());
    bad |= add(o, "revision", cJSON_CreateNull());
    bad |= add(o, "target_modules", targets);
    bad |= add(o, "task_type", cJSON_CreateString("CAUSAL_LM"));
    bad |= add(o, "use_dora", cJSON_CreateFalse());
    bad |= add(o, "use_rslora", cJSON_CreateBool(cfg->use_rslora != 0));
    if (bad) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* Appends text to the growing string *buf (len, cap); -1 when out of memory. */
static int append(char **buf, size_t *len, size_t *cap, const char *text) {
    size_t n = strlen(text);
    if (*len + n + 1 > *cap) {
        size_t want = 2 * (*len + n + 1);
        char *grown = realloc(*buf, want);
        if (!grown)
            return -1;
        *buf = grown;
        *cap = want;
    }
    memcpy(*buf + *len, text, n + 1);
    *len += n;
    return 0;
}

/* The object laid out as Python's json.dumps(indent=2) lays it out (what peft writes): one
 * member per line, a non-empty list one item per line, an empty object as {}. */
static char *print_like_python(const cJSON *o) {
    char *buf = NULL, *piece = NULL;
    size_t len = 0, cap = 0;
    int bad = append(&buf, &len, &cap, "{");
    for (const cJSON *m = o->child; m && !bad; m = m->next) {
        bad |= append(&buf, &len, &cap, "\n  \"") || append(&buf, &len, &cap, m->string) ||
               append(&buf, &len, &cap, "\": ");
        if (cJSON_IsArray(m) && m->child) {
            bad |= append(&buf, &len, &cap, "[");
            for (const cJSON *it = m->child; it && !bad; it = it->next) {
                bad |= !(piece = cJSON_PrintUnformatted(it)) || append(&buf, &len, &cap, "\n    ") ||
                       append(&buf, &len, &cap, piece) || append(&buf, &len, &cap, it->next ? "," : "\n  ]");
                cJSON_free(piece);
                piece = NULL;
            }
        } else {
            bad |= !(piece = cJSON_PrintUnformatted(m)) || append(&buf, &len, &cap, piece);
            cJSON_free(piece);
            piece = NULL;
        }
        bad |= append(&buf, &len, &cap, m->next ? "," : "\n");
    }
    bad |= append(&buf, &len, &cap, "}\n");
    if (bad) {
        free(buf);
        return NULL;
    }
    return buf;
}

int ft_adapter_config_write(const ft_adapter_config *cfg, const char *dir, char *err, size_t cap) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/adapter_config.json", dir) >= sizeof path)
        return ft_fail(err, cap, "path too long: '%s/adapter_config.json'", dir);
    if (cfg->rank < 1 || !isfinite(cfg->alpha) || !(cfg->dropout >= 0 && cfg->dropout < 1) || cfg->targets == 0 ||
        (cfg->targets & ~(uint32_t)QLORA_TARGET_ALL_LINEAR))
        return ft_fail(err, cap, "%s: invalid adapter settings (r %d, lora_alpha %g, lora_dropout %g, targets 0x%x)",
                    path, cfg->rank, (double)cfg->alpha, (double)cfg->dropout, cfg->targets);
    cJSON *o = build(cfg);
    char *text = o ? print_like_python(o) : NULL;
    cJSON_Delete(o);
    if (!text)
        return ft_fail(err, cap, "%s: out of memory", path);
    int rc = ft_write_file(path, text, strlen(text), err, cap);
    free(text);
    return rc;
}

/* ---------------------------------------------------------------- reading */
typedef struct reader {
    const char *path;
    cJSON *root;
    char *err;
    size_t cap;
} reader;

static int field_fail(reader *r, const char *field, const char *why) {
    return ft_fail(r->err, r->cap, "%s: field '%s' %s", r->path, field, why);
}

/* 1 when the field is absent or null. */
static int absent(const cJSON *v) { return !v || cJSON_IsNull(v); }

/* A field that must be absent, null, false or empty for qlora-ft to load the adapter as peft
 * would: a non-default value means a LoRA variant qlora-ft does not implement. */
static int require_default(reader *r, const char *field) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->root, field);
    if (absent(v) || cJSON_IsFalse(v) || ((cJSON_IsObject(v) || cJSON_IsArray(v)) && !v->child))
        return 0;
    return field_fail(r, field, "is set: qlora-ft does not support it (only plain LoRA on q/k/v/o/gate/up/down)");
}

static int read_number(reader *r, const char *field, int required, double dflt, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->root, field);
    if (absent(v)) {
        if (required)
            return field_fail(r, field, "is missing");
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return field_fail(r, field, "is not a number");
    *out = v->valuedouble;
    return 0;
}

static int read_targets(reader *r, uint32_t *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->root, "target_modules");
    *out = 0;
    if (absent(v))
        return field_fail(r, "target_modules", "is missing");
    if (cJSON_IsString(v)) {
        /* peft: one string is a regular expression, except the "all-linear" shorthand */
        if (!strcmp(v->valuestring, "all-linear")) {
            *out = QLORA_TARGET_ALL_LINEAR;
            return 0;
        }
        return ft_fail(r->err, r->cap, "%s: field 'target_modules' is the pattern '%s': qlora-ft needs a list of "
                    "module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or \"all-linear\"",
                    r->path, v->valuestring);
    }
    if (!cJSON_IsArray(v))
        return field_fail(r, "target_modules", "is neither a list of module names nor a string");
    const cJSON *item;
    cJSON_ArrayForEach(item, v) {
        if (!cJSON_IsString(item))
            return field_fail(r, "target_modules", "holds an entry that is not a string");
        int j = 0;
        while (j < FT_TARGET_COUNT && strcmp(item->valuestring, qlora_target_name(j)) != 0)
            j++;
        if (j == FT_TARGET_COUNT)
            return ft_fail(r->err, r->cap, "%s: field 'target_modules': unknown module '%s' (qlora-ft adapts q_proj, "
                        "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)", r->path, item->valuestring);
        *out |= 1u << j;
    }
    if (*out == 0)
        return field_fail(r, "target_modules", "is empty");
    return 0;
}

static int read_fields(reader *r, ft_adapter_config *cfg) {
    if (!cJSON_IsObject(r->root))
        return ft_fail(r->err, r->cap, "%s: not a JSON object", r->path);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->root, "peft_type");
    if (!cJSON_IsString(v))
        return field_fail(r, "peft_type", absent(v) ? "is missing" : "is not a string");
    if (strcmp(v->valuestring, "LORA") != 0)
        return ft_fail(r->err, r->cap, "%s: peft_type is '%s'; qlora-ft reads LORA adapters only", r->path,
                    v->valuestring);
    v = cJSON_GetObjectItemCaseSensitive(r->root, "task_type");
    if (!absent(v) && (!cJSON_IsString(v) || strcmp(v->valuestring, "CAUSAL_LM") != 0))
        return field_fail(r, "task_type", "is not \"CAUSAL_LM\" (qlora-ft adapts causal language models)");
    double rank = 0, alpha = 0, dropout = 0;
    /* the defaults of peft's LoraConfig where a field may be left out */
    if (read_number(r, "r", 1, 0, &rank) || read_number(r, "lora_alpha", 0, 8, &alpha) ||
        read_number(r, "lora_dropout", 0, 0, &dropout))
        return -1;
    if (rank != floor(rank) || rank < 1 || rank > 1 << 20)
        return field_fail(r, "r", "must be an integer >= 1");
    if (!(dropout >= 0 && dropout < 1))
        return field_fail(r, "lora_dropout", "must be in [0, 1)");
    cfg->rank = (int)rank;
    cfg->alpha = (float)alpha;
    cfg->dropout = (float)dropout;
    v = cJSON_GetObjectItemCaseSensitive(r->root, "use_rslora");
    if (!absent(v) && !cJSON_IsBool(v))
        return field_fail(r, "use_rslora", "is not true or false");
    cfg->use_rslora = cJSON_IsTrue(v);
    v = cJSON_GetObjectItemCaseSensitive(r->root, "bias");
    if (!absent(v) && (!cJSON_IsString(v) || strcmp(v->valuestring, "none") != 0))
        return field_fail(r, "bias", "is not \"none\": qlora-ft does not train biases");
    static const char *const unsupported[] = {"use_dora", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                                              "rank_pattern", "alpha_pattern", "layer_replication", "use_qalora",
                                              "lora_bias", "target_parameters", "trainable_token_indices",
                                              "exclude_modules", NULL};
    for (int i = 0; unsupported[i]; i++)
        if (require_default(r, unsupported[i]))
            return -1;
    if (read_targets(r, &cfg->targets))
        return -1;
    v = cJSON_GetObjectItemCaseSensitive(r->root, "base_model_name_or_path");
    if (!absent(v) && !cJSON_IsString(v))
        return field_fail(r, "base_model_name_or_path", "is not a string");
    if (cJSON_IsString(v) && strlen(v->valuestring) >= sizeof cfg->base_model)
        return field_fail(r, "base_model_name_or_path", "is too long");
    snprintf(cfg->base_model, sizeof cfg->base_model, "%s", cJSON_IsString(v) ? v->valuestring : "");
    return 0;
}

int ft_adapter_read_config(const char *dir, ft_adapter_config *cfg, char *err, size_t cap) {
    char path[4096];
    memset(cfg, 0, sizeof *cfg);
    if ((size_t)snprintf(path, sizeof path, "%s/adapter_config.json", dir) >= sizeof path)
        return ft_fail(err, cap, "path too long: '%s/adapter_config.json'", dir);
    char *text;
    size_t n;
    if (ft_read_file(path, &text, &n, err, cap))
        return -1;
    reader r = {path, cJSON_ParseWithLength(text, n), err, cap};
    int rc;
    if (!r.root) {
        /* cJSON_GetErrorPtr points into text: report the line */
        const char *at = cJSON_GetErrorPtr();
        long line = 1;
        for (const char *p = text; at && p < at && p < text + n; p++)
            line += *p == '\n';
        rc = ft_fail(err, cap, "%s:%ld: not valid JSON", path, line);
    } else {
        rc = read_fields(&r, cfg);
    }
    cJSON_Delete(r.root);
    free(text);
    if (rc)
        memset(cfg, 0, sizeof *cfg);
    return rc;
}
