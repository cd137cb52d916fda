/*
 * qlora-ft merge: folds a LoRA adapter into its base model and writes a plain Hugging Face model
 * directory (atomically, ft_fs.h). The base is loaded as qlora-ft trained against it, 4-bit,
 * so the merged weights are W' = dequant(W) + s·B·A with the W the adapter learned to correct:
 *   --bits 16  every decoder linear weight in BF16 (W' computed in float32 on the host; the
 *              unadapted ones dequantized), loadable by any transformers install;
 *   --bits 4   W' re-quantized (qlora_linear_merge: the base's NF4 layout) in the bitsandbytes
 *              key set, with a quantization_config in config.json.
 * Every other tensor (embeddings, norms, biases, lm_head) is copied from the base checkpoint
 * byte for byte, and so are the tokenizer and generation files.
 */
#include "ft_adapter.h"
#include "ft_fs.h"
#include "ft_half.h"
#include "bnb_config.h"
#include "json_splice.h" /* tools/common: text-level edits of config.json */

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FT_TARGET_COUNT 7
#define ERR_CAP 2048
/* transformers' default max_shard_size ("5GB") */
#define FT_MAX_SHARD_BYTES 5000000000ull

typedef struct merge_opts {
    const char *model, *adapter, *out;
    int bits;
} merge_opts;

typedef struct merge_job {
    merge_opts o;
    ft_adapter_config acfg;
    qlora_ctx *ctx;
    qlora_model *model;
    qlora_checkpoint *ck;
    int64_t layers;
    char tmp[PATH_MAX];
    int64_t merged, dequantized, copied; /* linear weights with / without an adapter; other tensors */
    char err[ERR_CAP];
} merge_job;

static void merge_usage(FILE *f) {
    fputs("usage: qlora-ft merge --model DIR --adapter DIR --out DIR [--bits 16|4]\n"
          "\n"
          "Folds a LoRA adapter (a PEFT adapter directory, as qlora-ft train saves it) into its base model\n"
          "and writes a Hugging Face model directory to --out (replacing it whole if it holds a model).\n"
          "The base is loaded in 4 bits as it was for training, so the merged weights are\n"
          "dequant(W) + s*B*A with s = lora_alpha / r (or / sqrt(r) with use_rslora).\n"
          "\n"
          "  --model DIR     the base model (config.json, *.safetensors) the adapter was trained on\n"
          "  --adapter DIR   adapter_config.json and adapter_model.safetensors\n"
          "  --out DIR       where to write the merged model\n"
          "  --bits 16       BF16 linear weights (default): loads in any transformers install\n"
          "  --bits 4        re-quantized NF4 weights in the bitsandbytes layout, with quantization_config\n"
          "\n"
          "Embeddings, norms, biases and lm_head are copied from the base as they are, and so are\n"
          "tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json\n"
          "(and tokenizer.model, chat_template.jinja) when present.\n"
          "Exit codes: 0 done, 1 failure, 2 usage error.\n",
          f);
}

static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("qlora-ft merge: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs("\n(qlora-ft merge --help lists the options)\n", stderr);
    va_end(ap);
    return 2;
}

static int job_fail(merge_job *j, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->err, sizeof j->err, fmt, ap);
    va_end(ap);
    return -1;
}

static int lib_fail(merge_job *j, const char *what) {
    return job_fail(j, "%s: %s", what, qlora_last_error());
}

/* out[PATH_MAX] = dir/name; 0, or -1 when it does not fit. */
static int path_join(char *out, const char *dir, const char *name) {
    int n = snprintf(out, PATH_MAX, "%s/%s", dir, name);
    return n >= 0 && n < PATH_MAX ? 0 : -1;
}

/* 1 when a and b name the same existing file system object. */
static int same_path(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int dir_is_empty(const char *dir) {
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    struct dirent *ent;
    int empty = 1;
    while (empty && (ent = readdir(d)) != NULL)
        empty = !strcmp(ent->d_name, ".") || !strcmp(ent->d_name, "..");
    closedir(d);
    return empty;
}

/* Parses argv (after "merge"): 0, 2 after a usage error, or -1 after printing --help. */
static int parse(int argc, char **argv, merge_opts *o) {
    memset(o, 0, sizeof *o);
    o->bits = 16;
    for (int i = 0; i < argc; i++) {
        const char *opt = argv[i], *val = NULL;
        char name[32];
        const char *eq = strchr(opt, '=');
        if (!strncmp(opt, "--", 2) && eq && (size_t)(eq - opt) < sizeof name) {
            snprintf(name, sizeof name, "%.*s", (int)(eq - opt), opt);
            opt = name;
            val = eq + 1;
        }
        if (!strcmp(opt, "--help") || !strcmp(opt, "-h")) {
            if (val)
                return usage_error("%s takes no value", opt);
            merge_usage(stdout);
            return -1;
        }
        if (strcmp(opt, "--model") && strcmp(opt, "--adapter") && strcmp(opt, "--out") && strcmp(opt, "--bits"))
            return strncmp(opt, "-", 1) ? usage_error("unexpected argument '%s'", opt)
                                        : usage_error("unknown option '%s'", opt);
        if (!val) {
            if (i + 1 >= argc)
                return usage_error("%s needs a value", opt);
            val = argv[++i];
        }
        if (*val == '\0')
            return usage_error("%s needs a non-empty value", opt);
        if (!strcmp(opt, "--model"))
            o->model = val;
        else if (!strcmp(opt, "--adapter"))
            o->adapter = val;
        else if (!strcmp(opt, "--out"))
            o->out = val;
        else if (!strcmp(val, "16") || !strcmp(val, "4"))
            o->bits = atoi(val);
        else
            return usage_error("--bits %s: expected 16 (BF16 weights) or 4 (NF4, bitsandbytes layout)", val);
    }
    if (!o->model || !o->adapter || !o->out)
        return usage_error("missing %s: give --model DIR --adapter DIR --out DIR",
                           !o->model ? "--model" : !o->adapter ? "--adapter" : "--out");
    if (same_path(o->out, o->model) || same_path(o->out, o->adapter))
        return usage_error("--out %s is the %s directory; write the merged model elsewhere", o->out,
                           same_path(o->out, o->model) ? "--model" : "--adapter");
    /* The output replaces whatever --out holds: only ever a model directory (or an empty one),
     * never, say, a home directory given by mistake. */
    struct stat st;
    if (stat(o->out, &st) == 0) {
        char cfg[PATH_MAX];
        if (path_join(cfg, o->out, "config.json"))
            return usage_error("--out %s: path too long", o->out);
        if (!S_ISDIR(st.st_mode))
            return usage_error("--out %s exists and is not a directory", o->out);
        if (!ft_exists(cfg) && !dir_is_empty(o->out))
            return usage_error("--out %s exists and holds no model (no config.json); refusing to replace it",
                               o->out);
    }
    return 0;
}

/* ------------------------------------------------------------- weights */
static void linear_name(int64_t layer, int proj, char *out, size_t cap) {
    snprintf(out, cap, "model.layers.%lld.%s.%s.weight", (long long)layer, proj < 4 ? "self_attn" : "mlp",
             qlora_target_name(proj));
}

/* 1 when a base checkpoint tensor is a decoder linear weight or one of its bitsandbytes
 * companions ("<weight>.absmax", ...): those are written from the merged model instead. */
static int is_linear_part(const char *name, int64_t layers) {
    static const char prefix[] = "model.layers.";
    if (strncmp(name, prefix, sizeof prefix - 1) != 0)
        return 0;
    char *end;
    errno = 0;
    long long layer = strtoll(name + sizeof prefix - 1, &end, 10);
    if (errno || end == name + sizeof prefix - 1 || *end != '.' || layer < 0 || layer >= layers)
        return 0;
    for (int j = 0; j < FT_TARGET_COUNT; j++) {
        char full[QLORA_NAME_MAX];
        linear_name(layer, j, full, sizeof full);
        size_t n = strlen(full);
        if (!strncmp(name, full, n) && (name[n] == '\0' || name[n] == '.'))
            return 1;
    }
    return 0;
}

/* The layer's adapter "default" (*id), or NULL *lin_adapted when the layer has none. */
static int layer_linear(merge_job *j, int64_t layer, int proj, qlora_linear **lin, int *id) {
    if (qlora_model_linear(j->model, layer, qlora_target_name(proj), lin) != QLORA_OK)
        return lib_fail(j, "merged model");
    qlora_status st = qlora_linear_find_adapter(*lin, "default", id);
    if (st == QLORA_ERR_NOT_FOUND)
        *id = -1;
    else if (st != QLORA_OK)
        return lib_fail(j, "merged model");
    return 0;
}

/* W' = dequant(W) + s·B·A in float32 (s·B·A left out when id < 0), rounded to BF16 in out. */
static int merged_bf16(merge_job *j, qlora_linear *lin, int id, uint16_t *out) {
    const qlora_qtensor *q = qlora_linear_weight(lin);
    int64_t rows = q->shape[0], cols = q->shape[1];
    qlora_tensor w;
    if (qlora_tensor_init(&w, q->name, QLORA_F32, 2, q->shape, NULL, QLORA_DEVICE_HOST) != QLORA_OK ||
        qlora_tensor_alloc(j->ctx, &w, 0, QLORA_MEM_WORKSPACE) != QLORA_OK)
        return lib_fail(j, q->name);
    int rc = 0;
    float *wf = w.data, *a = NULL, *acc = NULL;
    if (qlora_dequantize(j->ctx, q, &w) != QLORA_OK)
        rc = lib_fail(j, q->name);
    if (rc == 0 && id >= 0) {
        qlora_tensor ta, tb;
        qlora_lora_params p;
        if (qlora_linear_adapter_tensors(lin, id, &ta, &tb, NULL, NULL) != QLORA_OK ||
            qlora_linear_adapter_params(lin, id, &p) != QLORA_OK) {
            rc = lib_fail(j, q->name);
            goto done;
        }
        int64_t r = p.rank;
        const float s = qlora_lora_scaling(&p);
        const uint16_t *A = ta.data, *B = tb.data; /* A [r, cols], B [rows, r], host (CPU context) */
        a = malloc((size_t)(r * cols) * sizeof *a);
        acc = malloc((size_t)cols * sizeof *acc);
        if (!a || !acc) {
            rc = job_fail(j, "%s: out of memory", q->name);
            goto done;
        }
        for (int64_t k = 0; k < r * cols; k++)
            a[k] = ft_bf16_to_f32(A[k]);
        for (int64_t row = 0; row < rows; row++) {
            for (int64_t c = 0; c < cols; c++)
                acc[c] = 0.0f;
            for (int64_t k = 0; k < r; k++) {
                const float b = ft_bf16_to_f32(B[row * r + k]);
                const float *ak = a + k * cols;
                for (int64_t c = 0; c < cols; c++)
                    acc[c] += b * ak[c];
            }
            float *wr = wf + row * cols;
            for (int64_t c = 0; c < cols; c++)
                wr[c] += s * acc[c];
        }
    }
    if (rc == 0)
        for (int64_t k = 0; k < rows * cols; k++)
            out[k] = ft_f32_to_bf16(wf[k]);
done:
    free(a);
    free(acc);
    qlora_tensor_free(j->ctx, &w);
    return rc;
}

/* --bits 4: merges every adapter into its (4-bit) weight, before the writer needs the weights'
 * quantization constants (nested_offset) at declaration. */
static int merge_in_place(merge_job *j) {
    for (int64_t i = 0; i < j->layers; i++)
        for (int p = 0; p < FT_TARGET_COUNT; p++) {
            qlora_linear *lin;
            int id;
            if (layer_linear(j, i, p, &lin, &id))
                return -1;
            if (id >= 0 && qlora_linear_merge(lin, id, NULL) != QLORA_OK)
                return lib_fail(j, "merge");
        }
    return 0;
}

static int declare_all(merge_job *j, qlora_st_writer *w) {
    size_t count = qlora_checkpoint_count(j->ck);
    for (size_t k = 0; k < count; k++) {
        const char *name = qlora_checkpoint_name(j->ck, k);
        qlora_tensor t;
        if (is_linear_part(name, j->layers))
            continue;
        if (qlora_checkpoint_find(j->ck, name, &t) != QLORA_OK ||
            qlora_st_writer_declare(w, name, t.dtype, t.ndim, t.shape) != QLORA_OK)
            return lib_fail(j, j->o.model);
    }
    for (int64_t i = 0; i < j->layers; i++)
        for (int p = 0; p < FT_TARGET_COUNT; p++) {
            qlora_linear *lin;
            int id;
            char name[QLORA_NAME_MAX];
            if (layer_linear(j, i, p, &lin, &id))
                return -1;
            const qlora_qtensor *q = qlora_linear_weight(lin);
            linear_name(i, p, name, sizeof name);
            qlora_status st = j->o.bits == 4 ? qlora_bnb_declare(w, name, q)
                                             : qlora_st_writer_declare(w, name, QLORA_BF16, 2, q->shape);
            if (st != QLORA_OK)
                return lib_fail(j, j->o.out);
        }
    return 0;
}

static int write_all(merge_job *j, qlora_st_writer *w) {
    size_t count = qlora_checkpoint_count(j->ck);
    for (size_t k = 0; k < count; k++) {
        const char *name = qlora_checkpoint_name(j->ck, k);
        qlora_tensor t;
        if (is_linear_part(name, j->layers))
            continue;
        if (qlora_checkpoint_find(j->ck, name, &t) != QLORA_OK ||
            qlora_st_writer_write(w, name, t.data, qlora_tensor_nbytes(&t)) != QLORA_OK)
            return lib_fail(j, j->o.out);
        j->copied++;
    }
    for (int64_t i = 0; i < j->layers; i++)
        for (int p = 0; p < FT_TARGET_COUNT; p++) {
            qlora_linear *lin;
            int id;
            char name[QLORA_NAME_MAX];
            if (layer_linear(j, i, p, &lin, &id))
                return -1;
            const qlora_qtensor *q = qlora_linear_weight(lin);
            linear_name(i, p, name, sizeof name);
            if (id >= 0)
                j->merged++;
            else
                j->dequantized++;
            if (j->o.bits == 4) {
                if (qlora_bnb_write(w, name, q) != QLORA_OK)
                    return lib_fail(j, j->o.out);
                continue;
            }
            uint16_t *bf = malloc((size_t)q->numel * 2);
            if (!bf)
                return job_fail(j, "%s: out of memory", name);
            int rc = merged_bf16(j, lin, id, bf);
            if (rc == 0 && qlora_st_writer_write(w, name, bf, (size_t)q->numel * 2) != QLORA_OK)
                rc = lib_fail(j, j->o.out);
            free(bf);
            if (rc)
                return -1;
        }
    return 0;
}

static int write_weights(merge_job *j) {
    qlora_st_writer *w;
    if (qlora_st_writer_open(j->tmp, FT_MAX_SHARD_BYTES, &w) != QLORA_OK)
        return lib_fail(j, j->o.out);
    int rc = qlora_st_writer_set_metadata(w, "format", "pt") == QLORA_OK ? 0 : lib_fail(j, j->o.out);
    if (rc == 0)
        rc = declare_all(j, w);
    if (rc == 0)
        rc = write_all(j, w);
    if (rc) {
        qlora_st_writer_abort(w);
        return -1;
    }
    return qlora_st_writer_commit(w) == QLORA_OK ? 0 : lib_fail(j, j->o.out);
}

/* ------------------------------------------------------ config and files */
/* The base's config.json without its quantization_config (if any) and, for --bits 4, with the
 * merged weights' one; every other byte as it was. */
static int write_config(merge_job *j) {
    char src[PATH_MAX], dst[PATH_MAX];
    if (path_join(src, j->o.model, "config.json") || path_join(dst, j->tmp, "config.json"))
        return job_fail(j, "%s: path too long", j->o.model);
    char *text, *edited = NULL, *member = NULL;
    size_t n;
    if (ft_read_file(src, &text, &n, j->err, sizeof j->err))
        return -1;
    tool_json_object obj;
    memset(&obj, 0, sizeof obj);
    cJSON *root = cJSON_ParseWithLength(text, n);
    int rc = 0;
    if (!cJSON_IsObject(root) || tool_json_scan(text, n, &obj) != 0) {
        rc = job_fail(j, "%s: not a valid JSON object", src);
        goto done;
    }
    size_t k = tool_json_find(&obj, "quantization_config");
    if (k < obj.count) {
        if (!(edited = tool_json_remove(text, n, &obj, k)))
            goto oom;
        free(text);
        text = edited;
        n = strlen(text);
        edited = NULL;
        tool_json_object_free(&obj);
        if (tool_json_scan(text, n, &obj) != 0)
            goto oom;
    }
    if (j->o.bits == 4) {
        qlora_linear *lin;
        if (qlora_model_linear(j->model, 0, qlora_target_name(0), &lin) != QLORA_OK) {
            rc = lib_fail(j, "merged model");
            goto done;
        }
        if (!(member = tool_bnb_quantization_member(&obj, qlora_linear_weight(lin)->type, qlora_linear_weight(lin)->double_quant, NULL, 0)) ||
            !(edited = tool_json_insert(text, n, &obj, "quantization_config", member)))
            goto oom;
        free(text);
        text = edited;
        n = strlen(text);
    }
    rc = ft_write_file(dst, text, n, j->err, sizeof j->err);
    goto done;
oom:
    rc = job_fail(j, "%s: out of memory", src);
done:
    cJSON_Delete(root);
    tool_json_object_free(&obj);
    free(member);
    free(text);
    return rc;
}

/* Copies the base's tokenizer and generation files that exist; returns how many or -1. */
static int copy_side_files(merge_job *j) {
    static const char *const names[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                        "generation_config.json", "tokenizer.model", "chat_template.jinja", NULL};
    int copied = 0;
    for (int i = 0; names[i]; i++) {
        char src[PATH_MAX], dst[PATH_MAX], *data;
        size_t n;
        if (path_join(src, j->o.model, names[i]) || path_join(dst, j->tmp, names[i]))
            return job_fail(j, "%s: path too long", j->o.model);
        if (!ft_exists(src))
            continue;
        if (ft_read_file(src, &data, &n, j->err, sizeof j->err))
            return -1;
        int rc = ft_write_file(dst, data, n, j->err, sizeof j->err);
        free(data);
        if (rc)
            return -1;
        copied++;
    }
    return copied;
}

/* ------------------------------------------------------------------ run */
static int run(merge_job *j) {
    if (ft_adapter_read_config(j->o.adapter, &j->acfg, j->err, sizeof j->err))
        return -1;
    qlora_ctx_params cp = qlora_ctx_default_params(); /* the merge runs on the host */
    if (qlora_ctx_create(&cp, &j->ctx) != QLORA_OK)
        return lib_fail(j, "context");
    qlora_model_load_opts lo = qlora_model_load_default_opts();
    lo.lora.rank = j->acfg.rank;
    lo.lora.alpha = j->acfg.alpha;
    lo.lora.use_rslora = j->acfg.use_rslora;
    lo.lora.dropout = 0.0f;
    lo.targets = j->acfg.targets;
    qlora_model_config mc;
    if (qlora_model_load(j->ctx, j->o.model, &lo, &j->model) != QLORA_OK ||
        qlora_model_get_config(j->model, &mc) != QLORA_OK)
        return job_fail(j, "cannot load the base model %s: %s", j->o.model, qlora_last_error());
    j->layers = mc.num_layers;
    if (ft_adapter_load(j->model, j->o.adapter, j->err, sizeof j->err))
        return -1;
    if (qlora_checkpoint_open(j->o.model, &j->ck) != QLORA_OK)
        return lib_fail(j, j->o.model);
    if (j->o.bits == 4 && merge_in_place(j))
        return -1;
    if (ft_tmpdir_for(j->o.out, j->tmp, sizeof j->tmp, j->err, sizeof j->err))
        return -1;
    int side = 0;
    if (write_weights(j) || write_config(j) || (side = copy_side_files(j)) < 0 ||
        ft_dir_commit(j->tmp, j->o.out, j->err, sizeof j->err))
        return -1;
    j->tmp[0] = '\0';
    printf("qlora-ft merge: %s (r %d, lora_alpha %g%s) merged into %s\n", j->o.adapter, j->acfg.rank,
           (double)j->acfg.alpha, j->acfg.use_rslora ? ", rsLoRA" : "", j->o.model);
    printf("  wrote %s: %lld adapted + %lld unadapted linear weights as %s, %lld tensors copied, "
           "config.json%s and %d tokenizer/generation file%s\n",
           j->o.out, (long long)j->merged, (long long)j->dequantized,
           j->o.bits == 4 ? "NF4 (bitsandbytes)" : "BF16", (long long)j->copied,
           j->o.bits == 4 ? " (with quantization_config)" : "", side, side == 1 ? "" : "s");
    return 0;
}

int ft_merge_main(int argc, char **argv) {
    merge_job *j = calloc(1, sizeof *j);
    if (!j) {
        fputs("qlora-ft merge: out of memory\n", stderr);
        return 1;
    }
    int rc = parse(argc, argv, &j->o);
    if (rc == 0) {
        rc = run(j) ? 1 : 0;
        if (rc)
            fprintf(stderr, "qlora-ft merge: %s\n", j->err);
    } else if (rc < 0) {
        rc = 0; /* --help */
    }
    if (j->tmp[0]) {
        char why[ERR_CAP];
        if (ft_remove_tree(j->tmp, why, sizeof why))
            fprintf(stderr, "qlora-ft merge: %s\n", why);
    }
    qlora_checkpoint_close(j->ck);
    qlora_model_free(j->model);
    qlora_ctx_free(j->ctx);
    free(j);
    return rc;
}
