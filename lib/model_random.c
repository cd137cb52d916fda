/*
 * qlora_model_write_random: a Hugging Face Llama-family model directory with seeded random
 * weights, for tests, examples and benchmarks (include/qlora.h states the distribution and the
 * random stream). model.safetensors goes through the atomic safetensors writer; config.json is
 * built with cJSON, written to a temp file and renamed into place.
 */
#include "internal.h"
#include "half.h"
#include "json_util.h"
#include "mem_estimate.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ the tensors */
typedef enum fill_kind { FILL_NORMAL, FILL_ONES, FILL_ZEROS } fill_kind;

typedef struct random_tensor {
    char name[QLORA_NAME_MAX];
    int64_t rows, cols; /* cols 0: a vector of `rows` */
    fill_kind fill;
} random_tensor;

static void add_tensor(random_tensor *list, size_t *n, fill_kind fill, int64_t rows, int64_t cols, const char *fmt,
                       ...) QL_PRINTF(6, 7);
static void add_tensor(random_tensor *list, size_t *n, fill_kind fill, int64_t rows, int64_t cols, const char *fmt,
                       ...) {
    random_tensor *t = &list[(*n)++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->rows = rows;
    t->cols = cols;
    t->fill = fill;
}

/* The tensors of qlora_model_load, in transformers' order. list holds 3 + 16 L entries. */
static size_t list_tensors(const qlora_model_config *cfg, random_tensor *list) {
    const int64_t H = cfg->hidden_size, V = cfg->vocab_size;
    ql_linear_shape lin[QL_LINEAR_COUNT];
    ql_layer_linears(cfg, lin);
    size_t n = 0;
    add_tensor(list, &n, FILL_NORMAL, V, H, "model.embed_tokens.weight");
    for (int64_t l = 0; l < cfg->num_layers; l++) {
        add_tensor(list, &n, FILL_ONES, H, 0, "model.layers.%lld.input_layernorm.weight", (long long)l);
        for (int j = 0; j < QL_LINEAR_COUNT; j++) {
            if (j == QL_LINEAR_GATE)
                add_tensor(list, &n, FILL_ONES, H, 0, "model.layers.%lld.post_attention_layernorm.weight",
                           (long long)l);
            const char *block = lin[j].attention ? "self_attn" : "mlp";
            add_tensor(list, &n, FILL_NORMAL, (int64_t)lin[j].out, (int64_t)lin[j].in, "model.layers.%lld.%s.%s.weight",
                       (long long)l, block, lin[j].name);
            if (lin[j].has_bias)
                add_tensor(list, &n, FILL_ZEROS, (int64_t)lin[j].out, 0, "model.layers.%lld.%s.%s.bias", (long long)l,
                           block, lin[j].name);
        }
    }
    add_tensor(list, &n, FILL_ONES, H, 0, "model.norm.weight");
    if (!cfg->tie_word_embeddings)
        add_tensor(list, &n, FILL_NORMAL, V, H, "lm_head.weight");
    return n;
}

/* ------------------------------------------------------------------ the random stream */
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t splitmix64(uint64_t *state) { return mix64(*state += 0x9e3779b97f4a7c15ULL); }

static uint64_t fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

/* n BF16 values N(0, std²) from the stream that starts at `state`: Box-Muller pairs. */
static void fill_normal_row(uint16_t *dst, int64_t n, uint64_t state, double std) {
    for (int64_t i = 0; i < n; i += 2) {
        double u1 = ((double)(splitmix64(&state) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1]: log is finite */
        double u2 = (double)(splitmix64(&state) >> 11) * 0x1.0p-53;
        double r = std * sqrt(-2.0 * log(u1)), theta = 6.283185307179586 * u2;
        dst[i] = ql_f32_to_bf16((float)(r * cos(theta)));
        if (i + 1 < n)
            dst[i + 1] = ql_f32_to_bf16((float)(r * sin(theta)));
    }
}

/* One tensor's values. Rows have independent streams, so any thread count gives the same bytes. */
static void fill_tensor(uint16_t *dst, const random_tensor *t, uint64_t seed, double std) {
    const int64_t rows = t->rows, cols = t->cols > 0 ? t->cols : 1;
    if (t->fill != FILL_NORMAL || std == 0.0) {
        const uint16_t v = t->fill == FILL_ONES ? ql_f32_to_bf16(1.0f) : 0;
        for (int64_t i = 0; i < rows * cols; i++)
            dst[i] = v;
        return;
    }
    const uint64_t key = seed ^ fnv1a64(t->name);
    if (t->cols == 0) { /* a vector: one stream */
        fill_normal_row(dst, rows, mix64(key), std);
        return;
    }
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 16))
    for (int64_t r = 0; r < rows; r++)
        fill_normal_row(dst + r * cols, cols, mix64(key ^ ((uint64_t)r * 0xd1b54a32d192ed03ULL)), std);
}

static qlora_status write_weights(const char *path, const random_tensor *list, size_t n, uint64_t seed, double std) {
    qlora_st_writer *w = NULL;
    QL_CHECK(qlora_st_writer_open(path, 0, &w));
    /* transformers refuses a __metadata__ without "format" */
    qlora_status st = qlora_st_writer_set_metadata(w, "format", "pt");
    int64_t max_numel = 0;
    for (size_t i = 0; i < n && st == QLORA_OK; i++) {
        int64_t shape[2] = {list[i].rows, list[i].cols};
        st = qlora_st_writer_declare(w, list[i].name, QLORA_BF16, list[i].cols > 0 ? 2 : 1, shape);
        int64_t numel = list[i].rows * (list[i].cols > 0 ? list[i].cols : 1);
        if (numel > max_numel)
            max_numel = numel;
    }
    uint16_t *buf = NULL;
    if (st == QLORA_OK && !(buf = malloc((size_t)(max_numel > 0 ? max_numel : 1) * sizeof *buf)))
        st = ql_fail(QLORA_ERR_OUT_OF_MEMORY, "random model '%s': out of memory for a %lld-element tensor", path,
                     (long long)max_numel);
    for (size_t i = 0; i < n && st == QLORA_OK; i++) {
        fill_tensor(buf, &list[i], seed, std);
        size_t bytes = (size_t)(list[i].rows * (list[i].cols > 0 ? list[i].cols : 1)) * sizeof *buf;
        st = qlora_st_writer_write(w, list[i].name, buf, bytes);
    }
    free(buf);
    if (st != QLORA_OK) {
        qlora_st_writer_abort(w);
        return st;
    }
    return qlora_st_writer_commit(w); /* frees w, success or not */
}

/* ------------------------------------------------------------------ config.json */
static const char *architecture(const char *model_type) {
    if (strcmp(model_type, "mistral") == 0)
        return "MistralForCausalLM";
    if (strcmp(model_type, "qwen2") == 0)
        return "Qwen2ForCausalLM";
    return "LlamaForCausalLM";
}

/* A float as Python writes it (1e-05, 10000.0), as transformers' own config.json has it. */
static int add_float(cJSON *obj, const char *key, double v) {
    char text[32];
    return ql_python_float_repr(v, text, sizeof text) > 0 && cJSON_AddRawToObject(obj, key, text) != NULL;
}

static int add_rope_scaling(cJSON *root, const qlora_rope_config *rope) {
    if (rope->type == QLORA_ROPE_DEFAULT)
        return cJSON_AddNullToObject(root, "rope_scaling") != NULL;
    cJSON *s = cJSON_AddObjectToObject(root, "rope_scaling");
    if (!s)
        return 0;
    if (rope->type == QLORA_ROPE_UNSUPPORTED) /* recorded by name only, as the parser keeps it */
        return cJSON_AddStringToObject(s, "rope_type", rope->type_name) != NULL;
    int ok = add_float(s, "factor", rope->factor);
    if (rope->type == QLORA_ROPE_LLAMA3) {
        ok = ok && add_float(s, "high_freq_factor", rope->high_freq_factor);
        ok = ok && add_float(s, "low_freq_factor", rope->low_freq_factor);
        ok = ok && cJSON_AddNumberToObject(s, "original_max_position_embeddings",
                                           (double)rope->original_max_position_embeddings) != NULL;
    }
    return ok && cJSON_AddStringToObject(s, "rope_type", rope->type == QLORA_ROPE_LLAMA3 ? "llama3" : "linear");
}

/* json.dumps(indent=2) + "\n", as transformers writes config.json. Numbers are raw text (floats)
 * or integers. */
static void print_json(ql_buf *b, const cJSON *v, int depth) {
    if (cJSON_IsObject(v) || cJSON_IsArray(v)) {
        const int obj = cJSON_IsObject(v);
        if (!v->child) {
            ql_buf_puts(b, obj ? "{}" : "[]");
            return;
        }
        ql_buf_puts(b, obj ? "{\n" : "[\n");
        for (const cJSON *c = v->child; c; c = c->next) {
            ql_buf_printf(b, "%*s", 2 * (depth + 1), "");
            if (obj) {
                ql_buf_json_string_python(b, c->string);
                ql_buf_puts(b, ": ");
            }
            print_json(b, c, depth + 1);
            ql_buf_puts(b, c->next ? ",\n" : "\n");
        }
        ql_buf_printf(b, "%*s%s", 2 * depth, "", obj ? "}" : "]");
    } else if (cJSON_IsString(v)) {
        ql_buf_json_string_python(b, v->valuestring);
    } else if (cJSON_IsRaw(v)) {
        ql_buf_puts(b, v->valuestring);
    } else if (cJSON_IsNumber(v)) {
        ql_buf_printf(b, "%lld", (long long)v->valuedouble);
    } else if (cJSON_IsBool(v)) {
        ql_buf_puts(b, cJSON_IsTrue(v) ? "true" : "false");
    } else {
        ql_buf_puts(b, "null");
    }
}

/* The config.json text, keys sorted as transformers writes them. */
static qlora_status config_text(const qlora_model_config *cfg, const char *model_type, int attention_bias,
                                double init_std, ql_buf *out) {
    cJSON *root = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(root, "architectures");
    const int qwen2 = strcmp(model_type, "qwen2") == 0, mistral = strcmp(model_type, "mistral") == 0;
    int ok = arch && cJSON_AddItemToArray(arch, cJSON_CreateString(architecture(model_type)));
    ok = ok && cJSON_AddBoolToObject(root, "attention_bias", attention_bias);
    ok = ok && cJSON_AddNumberToObject(root, "bos_token_id", 1);
    ok = ok && cJSON_AddNumberToObject(root, "eos_token_id", 2);
    ok = ok && cJSON_AddNumberToObject(root, "head_dim", (double)cfg->head_dim);
    ok = ok && cJSON_AddStringToObject(root, "hidden_act", cfg->hidden_act[0] ? cfg->hidden_act : "silu");
    ok = ok && cJSON_AddNumberToObject(root, "hidden_size", (double)cfg->hidden_size);
    ok = ok && add_float(root, "initializer_range", init_std);
    ok = ok && cJSON_AddNumberToObject(root, "intermediate_size", (double)cfg->intermediate_size);
    ok = ok && cJSON_AddNumberToObject(root, "max_position_embeddings", 4096);
    ok = ok && cJSON_AddBoolToObject(root, "mlp_bias", cfg->mlp_bias);
    ok = ok && cJSON_AddStringToObject(root, "model_type", model_type);
    ok = ok && cJSON_AddNumberToObject(root, "num_attention_heads", (double)cfg->num_heads);
    ok = ok && cJSON_AddNumberToObject(root, "num_hidden_layers", (double)cfg->num_layers);
    ok = ok && cJSON_AddNumberToObject(root, "num_key_value_heads", (double)cfg->num_kv_heads);
    if (cfg->rms_norm_eps > 0) /* 0: left out, read back as LlamaConfig's default */
        ok = ok && add_float(root, "rms_norm_eps", cfg->rms_norm_eps);
    ok = ok && add_rope_scaling(root, &cfg->rope);
    if (cfg->rope_theta > 0)
        ok = ok && add_float(root, "rope_theta", cfg->rope_theta);
    if (cfg->sliding_window > 0)
        ok = ok && cJSON_AddNumberToObject(root, "sliding_window", (double)cfg->sliding_window);
    else if (mistral)
        ok = ok && cJSON_AddNullToObject(root, "sliding_window");
    ok = ok && cJSON_AddBoolToObject(root, "tie_word_embeddings", cfg->tie_word_embeddings);
    ok = ok && cJSON_AddStringToObject(root, "torch_dtype", "bfloat16");
    ok = ok && cJSON_AddBoolToObject(root, "use_cache", 1);
    if (qwen2)
        ok = ok && cJSON_AddBoolToObject(root, "use_sliding_window", cfg->sliding_window > 0);
    ok = ok && cJSON_AddNumberToObject(root, "vocab_size", (double)cfg->vocab_size);
    if (ok) {
        print_json(out, root, 0);
        ql_buf_puts(out, "\n");
    }
    cJSON_Delete(root);
    if (!ok || out->failed) {
        ql_buf_free(out);
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "random model: out of memory building config.json");
    }
    return QLORA_OK;
}

static qlora_status write_all(int fd, const char *text, size_t n, const char *path) {
    while (n > 0) {
        ssize_t k = write(fd, text, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return ql_fail(QLORA_ERR_IO, "cannot write '%s': %s", path, strerror(k < 0 ? errno : ENOSPC));
        text += k;
        n -= (size_t)k;
    }
    return QLORA_OK;
}

/* dir/config.json: a temp file next to it (exclusive name), fsync, rename. */
static qlora_status write_config(const char *dir, const ql_buf *text) {
    char final_path[4096], tmp[4160];
    if ((size_t)snprintf(final_path, sizeof final_path, "%s/config.json", dir) >= sizeof final_path)
        return ql_fail(QLORA_ERR_INVALID_ARG, "random model: directory name '%s' is too long", dir);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t salt = mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ (uint64_t)getpid());
    int fd = -1;
    for (int attempt = 0; attempt < 16 && fd < 0; attempt++) {
        snprintf(tmp, sizeof tmp, "%s/.config.json.tmp-%ld-%016llx", dir, (long)getpid(),
                 (unsigned long long)mix64(salt + (uint64_t)attempt));
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST)
            return ql_fail(QLORA_ERR_IO, "cannot create temp file '%s': %s", tmp, strerror(errno));
    }
    if (fd < 0)
        return ql_fail(QLORA_ERR_IO, "cannot create a temp file for '%s': every name taken", final_path);
    qlora_status st = write_all(fd, text->data, text->len, tmp);
    if (st == QLORA_OK && fsync(fd) != 0)
        st = ql_fail(QLORA_ERR_IO, "cannot fsync '%s': %s", tmp, strerror(errno));
    if (close(fd) != 0 && st == QLORA_OK)
        st = ql_fail(QLORA_ERR_IO, "cannot close '%s': %s", tmp, strerror(errno));
    if (st == QLORA_OK && rename(tmp, final_path) != 0)
        st = ql_fail(QLORA_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, final_path, strerror(errno));
    if (st != QLORA_OK)
        unlink(tmp);
    return st;
}

/* ------------------------------------------------------------------ the entry point */
static qlora_status check_config(const qlora_model_config *cfg, const char *model_type, int *attention_bias) {
    QL_CHECK(qlora_model_config_validate(cfg));
    if (strcmp(model_type, "llama") != 0 && strcmp(model_type, "mistral") != 0 && strcmp(model_type, "qwen2") != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "random model: model_type '%s' is not llama, mistral or qwen2",
                       model_type);
    if (strcmp(model_type, "qwen2") == 0) {
        if (!cfg->qkv_bias)
            return ql_fail(QLORA_ERR_INVALID_ARG, "random model: qwen2 always has q/k/v biases (cfg->qkv_bias is 0)");
        *attention_bias = cfg->o_bias;
    } else {
        if (cfg->qkv_bias != cfg->o_bias)
            return ql_fail(QLORA_ERR_INVALID_ARG, "random model: %s has one attention_bias for q/k/v and o "
                           "(cfg->qkv_bias %d, cfg->o_bias %d)", model_type, cfg->qkv_bias, cfg->o_bias);
        *attention_bias = cfg->qkv_bias;
    }
    size_t bad;
    if (!ql_utf8_valid(cfg->hidden_act, strlen(cfg->hidden_act), &bad) ||
        !ql_utf8_valid(cfg->rope.type_name, strlen(cfg->rope.type_name), &bad))
        return ql_fail(QLORA_ERR_INVALID_ARG, "random model: hidden_act or rope.type_name is not valid UTF-8");
    char probe[32];
    if (cfg->rope_theta < 0 || !ql_python_float_repr(cfg->rope_theta, probe, sizeof probe))
        return ql_fail(QLORA_ERR_INVALID_ARG, "random model: rope_theta must be finite and >= 0");
    if (cfg->rms_norm_eps < 0 || !ql_python_float_repr(cfg->rms_norm_eps, probe, sizeof probe))
        return ql_fail(QLORA_ERR_INVALID_ARG, "random model: rms_norm_eps must be finite and >= 0");
    const double rope[3] = {cfg->rope.factor, cfg->rope.low_freq_factor, cfg->rope.high_freq_factor};
    const int used = cfg->rope.type == QLORA_ROPE_LLAMA3 ? 3 : cfg->rope.type == QLORA_ROPE_LINEAR ? 1 : 0;
    for (int i = 0; i < used; i++)
        if (!(rope[i] > 0) || !ql_python_float_repr(rope[i], probe, sizeof probe))
            return ql_fail(QLORA_ERR_INVALID_ARG, "random model: the %s RoPE factors must be finite and > 0",
                           cfg->rope.type_name);
    return QLORA_OK;
}

static qlora_status make_dir(const char *dir) {
    if (mkdir(dir, 0777) == 0)
        return QLORA_OK;
    int e = errno;
    struct stat sb;
    if (e == EEXIST && stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode))
        return QLORA_OK;
    if (e == EEXIST)
        return ql_fail(QLORA_ERR_IO, "random model: '%s' exists and is not a directory", dir);
    return ql_fail(QLORA_ERR_IO, "random model: cannot create directory '%s': %s", dir, strerror(e));
}

qlora_status qlora_model_write_random(const qlora_model_config *cfg, const char *dir, uint64_t seed,
                                      double init_std) {
    QL_REQUIRE_ARG(cfg != NULL, "cfg");
    QL_REQUIRE_ARG(dir != NULL && *dir != '\0', "dir");
    QL_REQUIRE_ARG(isfinite(init_std) && init_std >= 0, "init_std");
    const char *model_type = cfg->model_type[0] ? cfg->model_type : "llama";
    int attention_bias = 0;
    QL_CHECK(check_config(cfg, model_type, &attention_bias));
    ql_buf text = {0};
    QL_CHECK(config_text(cfg, model_type, attention_bias, init_std, &text));
    random_tensor *list = NULL;
    qlora_status st = make_dir(dir);
    if (st == QLORA_OK && !(list = malloc((3 + 16 * (size_t)cfg->num_layers) * sizeof *list)))
        st = ql_fail(QLORA_ERR_OUT_OF_MEMORY, "random model '%s': out of memory for the tensor list", dir);
    char path[4096];
    if (st == QLORA_OK && (size_t)snprintf(path, sizeof path, "%s/model.safetensors", dir) >= sizeof path)
        st = ql_fail(QLORA_ERR_INVALID_ARG, "random model: directory name '%s' is too long", dir);
    if (st == QLORA_OK)
        st = write_weights(path, list, list_tensors(cfg, list), seed, init_std);
    if (st == QLORA_OK)
        st = write_config(dir, &text);
    free(list);
    ql_buf_free(&text);
    return st;
}
