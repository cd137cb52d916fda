/*
 * adapter_model.safetensors: the "default" adapter of every adapted decoder projection, as peft
 * names it (ft_adapter_key), A [r, in] and B [out, r] in BF16. Loading validates every tensor of
 * the file against the model before it writes any, so a bad file leaves the model unchanged.
 * On a CUDA context the adapter tensors live on the GPU and travel through host buffers.
 */
#include "ft_error.h"
#include "ft_adapter.h"
#include "ft_fs.h"
#include "ft_half.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FT_TARGET_COUNT 7
#define FT_ADAPTER_FILE "adapter_model.safetensors"

void ft_adapter_key(int64_t layer, int proj, char which, char *out, size_t cap) {
    snprintf(out, cap, "base_model.model.model.layers.%lld.%s.%s.lora_%c.weight", (long long)layer,
             proj < 4 ? "self_attn" : "mlp", qlora_target_name(proj), which);
}

/* The adapter "default" of (layer, proj): *lin and *id, or *lin NULL when the layer has none. */
static int find_adapter(qlora_model *model, int64_t layer, int proj, qlora_linear **lin, int *id, char *err,
                        size_t cap) {
    *lin = NULL;
    qlora_linear *l;
    if (qlora_model_linear(model, layer, qlora_target_name(proj), &l) != QLORA_OK)
        return ft_fail(err, cap, "layer %lld %s: %s", (long long)layer, qlora_target_name(proj), qlora_last_error());
    qlora_status st = qlora_linear_find_adapter(l, "default", id);
    if (st == QLORA_ERR_NOT_FOUND)
        return 0;
    if (st != QLORA_OK)
        return ft_fail(err, cap, "layer %lld %s: %s", (long long)layer, qlora_target_name(proj), qlora_last_error());
    *lin = l;
    return 0;
}

static int num_layers(qlora_model *model, int64_t *n, char *err, size_t cap) {
    qlora_model_config mc;
    if (qlora_model_get_config(model, &mc) != QLORA_OK)
        return ft_fail(err, cap, "%s", qlora_last_error());
    *n = mc.num_layers;
    return 0;
}

/* Copies adapter tensor t to host memory (to_host) or host memory into it, through the model's
 * context (a synchronous copy on its stream: queued work on the tensor finishes first). */
static int transfer(qlora_ctx *ctx, const qlora_tensor *t, void *host, int to_host, char *err, size_t cap) {
    size_t n = qlora_tensor_nbytes(t);
    if (t->device == QLORA_DEVICE_HOST) {
        if (to_host)
            memcpy(host, t->data, n);
        else
            memcpy(t->data, host, n);
        return 0;
    }
    qlora_tensor h = *t, d = *t;
    h.data = host;
    h.device = QLORA_DEVICE_HOST;
    qlora_status st = to_host ? qlora_tensor_copy(ctx, &h, &d) : qlora_tensor_copy(ctx, &d, &h);
    return st == QLORA_OK ? 0 : ft_fail(err, cap, "%s: %s", t->name, qlora_last_error());
}

/* --------------------------------------------------------------- saving */
typedef struct saved_adapter {
    qlora_linear *lin;
    qlora_tensor a, b;
    char key_a[QLORA_NAME_MAX], key_b[QLORA_NAME_MAX];
} saved_adapter;

/* The adapters to save, checked against cfg (targets and r, alpha, rsLoRA of every adapter). */
static int collect(qlora_model *model, const ft_adapter_config *cfg, saved_adapter **out, size_t *count, char *err,
                   size_t cap) {
    int64_t layers = 0;
    *out = NULL;
    *count = 0;
    if (num_layers(model, &layers, err, cap))
        return -1;
    saved_adapter *list = calloc((size_t)layers * FT_TARGET_COUNT + 1, sizeof *list);
    if (!list)
        return ft_fail(err, cap, "out of memory");
    size_t n = 0;
    for (int64_t i = 0; i < layers; i++)
        for (int j = 0; j < FT_TARGET_COUNT; j++) {
            qlora_linear *lin;
            int id;
            qlora_lora_params p;
            const char *proj = qlora_target_name(j);
            int wanted = (cfg->targets >> j) & 1;
            if (find_adapter(model, i, j, &lin, &id, err, cap))
                goto fail;
            if (!lin && !wanted)
                continue;
            if (!lin || !wanted) {
                ft_fail(err, cap, "layer %lld %s %s an adapter \"default\" but target_modules %s it", (long long)i, proj,
                     lin ? "has" : "has no", wanted ? "lists" : "does not list");
                goto fail;
            }
            if (qlora_linear_adapter_params(lin, id, &p) != QLORA_OK ||
                qlora_linear_adapter_tensors(lin, id, &list[n].a, &list[n].b, NULL, NULL) != QLORA_OK) {
                ft_fail(err, cap, "layer %lld %s: %s", (long long)i, proj, qlora_last_error());
                goto fail;
            }
            if (p.rank != cfg->rank || p.alpha != cfg->alpha || (p.use_rslora != 0) != (cfg->use_rslora != 0)) {
                ft_fail(err, cap, "layer %lld %s: the adapter has r %d, lora_alpha %g, use_rslora %d; the config says "
                     "r %d, lora_alpha %g, use_rslora %d", (long long)i, proj, p.rank, (double)p.alpha, p.use_rslora,
                     cfg->rank, (double)cfg->alpha, cfg->use_rslora);
                goto fail;
            }
            list[n].lin = lin;
            ft_adapter_key(i, j, 'A', list[n].key_a, sizeof list[n].key_a);
            ft_adapter_key(i, j, 'B', list[n].key_b, sizeof list[n].key_b);
            n++;
        }
    *out = list;
    *count = n;
    return 0;
fail:
    free(list);
    return -1;
}

static int write_weights(qlora_model *model, const saved_adapter *list, size_t n, const char *path, char *err,
                         size_t cap) {
    qlora_st_writer *w;
    if (qlora_st_writer_open(path, 0, &w) != QLORA_OK)
        return ft_fail(err, cap, "%s", qlora_last_error());
    int rc = qlora_st_writer_set_metadata(w, "format", "pt") == QLORA_OK ? 0 : -1;
    size_t largest = 0;
    for (size_t k = 0; rc == 0 && k < n; k++) {
        if (qlora_st_writer_declare(w, list[k].key_a, QLORA_BF16, 2, list[k].a.shape) != QLORA_OK ||
            qlora_st_writer_declare(w, list[k].key_b, QLORA_BF16, 2, list[k].b.shape) != QLORA_OK)
            rc = -1;
        size_t na = qlora_tensor_nbytes(&list[k].a), nb = qlora_tensor_nbytes(&list[k].b);
        largest = na > largest ? na : largest;
        largest = nb > largest ? nb : largest;
    }
    if (rc)
        ft_fail(err, cap, "%s", qlora_last_error());
    void *buf = rc == 0 ? malloc(largest ? largest : 1) : NULL;
    if (rc == 0 && !buf)
        rc = ft_fail(err, cap, "%s: out of memory", path);
    qlora_ctx *ctx = qlora_model_context(model);
    for (size_t k = 0; rc == 0 && k < 2 * n; k++) {
        const qlora_tensor *t = k % 2 ? &list[k / 2].b : &list[k / 2].a;
        const char *key = k % 2 ? list[k / 2].key_b : list[k / 2].key_a;
        rc = transfer(ctx, t, buf, 1, err, cap);
        if (rc == 0 && qlora_st_writer_write(w, key, buf, qlora_tensor_nbytes(t)) != QLORA_OK)
            rc = ft_fail(err, cap, "%s", qlora_last_error());
    }
    free(buf);
    if (rc) {
        qlora_st_writer_abort(w);
        return -1;
    }
    if (qlora_st_writer_commit(w) != QLORA_OK)
        return ft_fail(err, cap, "%s", qlora_last_error());
    return 0;
}

int ft_adapter_write_files(qlora_model *model, const ft_adapter_config *cfg, const char *dir, char *err,
                           size_t cap) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/" FT_ADAPTER_FILE, dir) >= sizeof path)
        return ft_fail(err, cap, "path too long: '%s/" FT_ADAPTER_FILE "'", dir);
    saved_adapter *list;
    size_t n;
    if (collect(model, cfg, &list, &n, err, cap))
        return -1;
    int rc = write_weights(model, list, n, path, err, cap);
    free(list);
    return rc ? rc : ft_adapter_config_write(cfg, dir, err, cap);
}

int ft_adapter_save(qlora_model *model, const ft_adapter_config *cfg, const char *dir, char *err, size_t cap) {
    char tmp[4096], why[1024];
    if (ft_tmpdir_for(dir, tmp, sizeof tmp, err, cap))
        return -1;
    if (ft_adapter_write_files(model, cfg, tmp, err, cap) || ft_dir_commit(tmp, dir, err, cap)) {
        if (ft_remove_tree(tmp, why, sizeof why) && err && cap) { /* keep the first failure, add this */
            size_t used = strlen(err);
            snprintf(err + used, cap - used, " (and %s)", why);
        }
        return -1;
    }
    return 0;
}

/* -------------------------------------------------------------- loading */
typedef struct loaded_tensor {
    qlora_tensor dst;   /* the model's adapter tensor */
    qlora_tensor src;   /* the file's (read-only mapping) */
} loaded_tensor;

static void shape_text(const qlora_tensor *t, char *out, size_t cap) {
    size_t used = (size_t)snprintf(out, cap, "[");
    for (int d = 0; d < t->ndim && used < cap; d++)
        used += (size_t)snprintf(out + used, cap - used, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    if (used < cap)
        snprintf(out + used, cap - used, "]");
}

/* Finds and checks the file's tensor for one adapter tensor of the model. */
static int match(const qlora_safetensors *f, const char *path, const char *key, char which, const qlora_tensor *dst,
                 qlora_tensor *src, char *err, size_t cap) {
    if (qlora_safetensors_find(f, key, src) != QLORA_OK)
        return ft_fail(err, cap, "%s: tensor '%s' is missing", path, key);
    if (src->dtype != QLORA_BF16 && src->dtype != QLORA_F16 && src->dtype != QLORA_F32)
        return ft_fail(err, cap, "%s: tensor '%s' is %s; expected BF16, F16 or F32", path, key,
                    qlora_dtype_name(src->dtype));
    if (src->ndim == 2 && src->shape[0] == dst->shape[0] && src->shape[1] == dst->shape[1])
        return 0;
    char got[96], want[96];
    shape_text(src, got, sizeof got);
    shape_text(dst, want, sizeof want);
    /* A [r, in], B [out, r]: a difference in r alone is a rank mismatch */
    int rdim = which == 'A' ? 0 : 1;
    if (src->ndim == 2 && src->shape[1 - rdim] == dst->shape[1 - rdim])
        return ft_fail(err, cap, "%s: tensor '%s' has shape %s: rank %lld, but the model's adapter has rank %lld "
                    "(shape %s); load the model with the adapter's r", path, key, got, (long long)src->shape[rdim],
                    (long long)dst->shape[rdim], want);
    return ft_fail(err, cap, "%s: tensor '%s' has shape %s; the model's adapter needs %s", path, key, got, want);
}

/* The first tensor of the file that is not in list[n] (called when the file has more). */
static int name_extra(const qlora_safetensors *f, const char *path, const char *const *keys, size_t n, char *err,
                      size_t cap) {
    size_t count = qlora_safetensors_count(f);
    for (size_t i = 0; i < count; i++) {
        qlora_tensor t;
        if (qlora_safetensors_get(f, i, &t) != QLORA_OK)
            return ft_fail(err, cap, "%s", qlora_last_error());
        size_t k = 0;
        while (k < n && strcmp(keys[k], t.name) != 0)
            k++;
        if (k == n)
            return ft_fail(err, cap, "%s: tensor '%s' has no adapter in the model to go into (load the model with the "
                        "adapter's target_modules)", path, t.name);
    }
    return ft_fail(err, cap, "%s: more tensors than the model's adapters", path);
}

/* Converts the file's tensor to BF16 in out[numel] (the data may be unaligned). */
static void to_bf16(const qlora_tensor *src, uint16_t *out) {
    int64_t n = qlora_tensor_numel(src);
    const unsigned char *p = src->data;
    for (int64_t i = 0; i < n; i++) {
        if (src->dtype == QLORA_F32) {
            float v;
            memcpy(&v, p + 4 * i, 4);
            out[i] = ft_f32_to_bf16(v);
        } else {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = src->dtype == QLORA_BF16 ? h : ft_f32_to_bf16(ft_f16_to_f32(h));
        }
    }
}

static int check_file(qlora_model *model, const qlora_safetensors *f, const char *path, loaded_tensor **out,
                      size_t *count, char *err, size_t cap) {
    int64_t layers = 0;
    *out = NULL;
    *count = 0;
    if (num_layers(model, &layers, err, cap))
        return -1;
    size_t max = (size_t)layers * FT_TARGET_COUNT * 2;
    loaded_tensor *list = calloc(max + 1, sizeof *list);
    char **keys = calloc(max + 1, sizeof *keys);
    size_t n = 0;
    int rc = list && keys ? 0 : ft_fail(err, cap, "%s: out of memory", path);
    for (int64_t i = 0; rc == 0 && i < layers; i++)
        for (int j = 0; rc == 0 && j < FT_TARGET_COUNT; j++) {
            qlora_linear *lin;
            int id;
            if ((rc = find_adapter(model, i, j, &lin, &id, err, cap)) != 0 || !lin)
                continue;
            if (qlora_linear_adapter_tensors(lin, id, &list[n].dst, &list[n + 1].dst, NULL, NULL) != QLORA_OK) {
                rc = ft_fail(err, cap, "%s", qlora_last_error());
                break;
            }
            for (int k = 0; rc == 0 && k < 2; k++, n++) {
                if (!(keys[n] = malloc(QLORA_NAME_MAX))) {
                    rc = ft_fail(err, cap, "%s: out of memory", path);
                    break;
                }
                ft_adapter_key(i, j, k ? 'B' : 'A', keys[n], QLORA_NAME_MAX);
                rc = match(f, path, keys[n], k ? 'B' : 'A', &list[n].dst, &list[n].src, err, cap);
            }
        }
    if (rc == 0 && n == 0)
        rc = ft_fail(err, cap, "%s: the model has no adapter \"default\" to load into (load it with the adapter's r and "
                  "target_modules)", path);
    if (rc == 0 && qlora_safetensors_count(f) > n)
        rc = name_extra(f, path, (const char *const *)keys, n, err, cap);
    for (size_t k = 0; keys && k < max; k++)
        free(keys[k]);
    free(keys);
    if (rc) {
        free(list);
        return -1;
    }
    *out = list;
    *count = n;
    return 0;
}

int ft_adapter_load(qlora_model *model, const char *dir, char *err, size_t cap) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/" FT_ADAPTER_FILE, dir) >= sizeof path)
        return ft_fail(err, cap, "path too long: '%s/" FT_ADAPTER_FILE "'", dir);
    qlora_safetensors *f;
    if (qlora_safetensors_open(path, &f) != QLORA_OK)
        return ft_fail(err, cap, "%s", qlora_last_error());
    loaded_tensor *list;
    size_t n;
    if (check_file(model, f, path, &list, &n, err, cap)) {
        qlora_safetensors_close(f);
        return -1;
    }
    /* everything checked: now write */
    size_t largest = 0;
    for (size_t k = 0; k < n; k++)
        largest = qlora_tensor_nbytes(&list[k].dst) > largest ? qlora_tensor_nbytes(&list[k].dst) : largest;
    uint16_t *buf = malloc(largest ? largest : 1);
    int rc = buf ? 0 : ft_fail(err, cap, "%s: out of memory", path);
    qlora_ctx *ctx = qlora_model_context(model);
    for (size_t k = 0; rc == 0 && k < n; k++) {
        to_bf16(&list[k].src, buf);
        rc = transfer(ctx, &list[k].dst, buf, 0, err, cap);
    }
    free(buf);
    free(list);
    qlora_safetensors_close(f);
    return rc;
}
