/*
 * qlora-ft's PEFT adapters and merge (examples/qlora-ft/ft_adapter*.c, ft_merge.c, ft_fs.c) on
 * tests/fixtures/tiny_llama: save/load round trips bit for bit, the files carry peft's names and
 * config fields, bad files are refused naming the file and tensor, output directories are
 * replaced whole, and a merged model computes what the base with its adapter computes.
 * Adapters get random A and B (B != 0), so a step that drops or misplaces one changes the result.
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ft_adapter.h"
#include "ft_fs.h"
#include "testutil.h"

enum { T = 24, NPROJ = 7 };
/* Bound on rms(merged - adapted) / (the base's NF4 noise): see close_to_adapted. */
#define MERGE_NOISE_BOUND 2.0

static const char *model_dir(void) {
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s", tu_fixture("tiny_llama"));
    return dir;
}

static qlora_ctx *cpu_ctx(void) {
    qlora_ctx_params p = qlora_ctx_default_params();
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(&p, &ctx));
    return ctx;
}

static ft_adapter_config make_config(int rank, float alpha, uint32_t targets) {
    ft_adapter_config c;
    memset(&c, 0, sizeof c);
    c.rank = rank;
    c.alpha = alpha;
    c.dropout = 0.05f;
    c.targets = targets;
    snprintf(c.base_model, sizeof c.base_model, "%s", model_dir());
    return c;
}

static qlora_model *load_model(qlora_ctx *ctx, const char *dir, const ft_adapter_config *c) {
    qlora_model_load_opts o = qlora_model_load_default_opts();
    o.lora.rank = c ? c->rank : 0;
    if (c) {
        o.lora.alpha = c->alpha;
        o.lora.use_rslora = c->use_rslora;
        o.lora.dropout = 0;
        o.targets = c->targets;
    }
    qlora_model *m = NULL;
    ck_assert_qlora_ok(qlora_model_load(ctx, dir, &o, &m));
    return m;
}

static int64_t num_layers(qlora_model *m) {
    qlora_model_config mc;
    ck_assert_qlora_ok(qlora_model_get_config(m, &mc));
    return mc.num_layers;
}

/* The adapter "default" of (layer, proj): 1 with its tensors, 0 when the layer has none. */
static int adapter_of(qlora_model *m, int64_t layer, int proj, qlora_tensor *a, qlora_tensor *b) {
    qlora_linear *lin;
    int id;
    ck_assert_qlora_ok(qlora_model_linear(m, layer, qlora_target_name(proj), &lin));
    if (qlora_linear_find_adapter(lin, "default", &id) != QLORA_OK)
        return 0;
    ck_assert_qlora_ok(qlora_linear_adapter_tensors(lin, id, a, b, NULL, NULL));
    return 1;
}

/* A ~ N(0, 1/in) and B ~ N(0, 0.1²) in every adapter: with s = 2 and r = 4, s·B·A has about
 * half the spread of the fixture's weights (N(0, 0.1²)), a change no merge step can hide. */
static void randomize_adapters(qlora_model *m, tu_rng *rng) {
    for (int64_t i = 0; i < num_layers(m); i++)
        for (int j = 0; j < NPROJ; j++) {
            qlora_tensor a, b;
            if (!adapter_of(m, i, j, &a, &b))
                continue;
            const qlora_tensor *ts[2] = {&a, &b};
            for (int k = 0; k < 2; k++) {
                int64_t n = qlora_tensor_numel(ts[k]);
                float *f = malloc((size_t)n * sizeof *f);
                ck_assert_ptr_nonnull(f);
                tu_fill_normal(rng, f, n, k == 0 ? 1.0f / sqrtf((float)a.shape[1]) : 0.1f);
                void *bf = tu_to_dtype(f, n, QLORA_BF16);
                memcpy(ts[k]->data, bf, (size_t)n * 2);
                free(bf);
                free(f);
            }
        }
}

static void random_tokens(tu_rng *rng, int32_t *tokens) {
    for (int t = 0; t < T; t++)
        tokens[t] = (int32_t)(tu_next(rng) % 128);
}

static float *logits_n(qlora_model *m, const int32_t *tokens, int64_t n) {
    float *out = malloc((size_t)n * 128 * sizeof *out);
    ck_assert_ptr_nonnull(out);
    ck_assert_qlora_ok(qlora_model_forward(m, tokens, NULL, NULL, n, NULL, NULL, out));
    return out;
}

static float *logits_of(qlora_model *m, const int32_t *tokens) { return logits_n(m, tokens, T); }

/* What quantizing tiny_llama to NF4 does to its logits, as transformers + bitsandbytes computed
 * it (tests/fixtures/make_model_fixture.py): rms(logits_bf16 - logits_nf4) over the fixture's
 * input_ids[*n], which are copied to ids. The yardstick for re-quantizing a merged model. */
static double nf4_noise_of_base(int32_t *ids, int64_t *n) {
    qlora_safetensors *f;
    qlora_tensor t, a, b;
    ck_assert_qlora_ok(qlora_safetensors_open(tu_fixture("tiny_llama_reference.safetensors"), &f));
    ck_assert_qlora_ok(qlora_safetensors_find(f, "input_ids", &t));
    *n = t.shape[0];
    ck_assert_int_le(*n, T);
    memcpy(ids, t.data, (size_t)*n * 4);
    ck_assert_qlora_ok(qlora_safetensors_find(f, "logits", &a));
    ck_assert_qlora_ok(qlora_safetensors_find(f, "logits_nf4", &b));
    int64_t m = qlora_tensor_numel(&a);
    double sum = 0;
    for (int64_t i = 0; i < m; i++) {
        float x, y;
        memcpy(&x, (unsigned char *)a.data + 4 * i, 4);
        memcpy(&y, (unsigned char *)b.data + 4 * i, 4);
        sum += ((double)x - y) * ((double)x - y);
    }
    qlora_safetensors_close(f);
    return sqrt(sum / (double)m);
}

static double rms_diff(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(s / (double)n);
}

static char *path_in(const char *dir, const char *name) {
    char *p = NULL;
    ck_assert_int_ge(asprintf(&p, "%s/%s", dir, name), 0);
    return p;
}

/* A model with random adapters saved to <tmp>/adapter. */
typedef struct fixture {
    char *tmp, *adapter;
    qlora_ctx *ctx;
    qlora_model *model;
    ft_adapter_config cfg;
    tu_rng rng;
} fixture;

static void fixture_make(fixture *f, int rank, uint32_t targets) {
    memset(f, 0, sizeof *f);
    tu_rng_init(&f->rng, tu_seed());
    f->tmp = tu_tempdir();
    f->adapter = path_in(f->tmp, "adapter");
    f->ctx = cpu_ctx();
    f->cfg = make_config(rank, 8.0f, targets);
    f->model = load_model(f->ctx, model_dir(), &f->cfg);
    randomize_adapters(f->model, &f->rng);
    char err[2048] = "";
    ck_assert_msg(ft_adapter_save(f->model, &f->cfg, f->adapter, err, sizeof err) == 0, "%s", err);
}

static void fixture_free(fixture *f) {
    qlora_model_free(f->model);
    qlora_ctx_free(f->ctx);
    tu_rmtree(f->tmp);
    free(f->tmp);
    free(f->adapter);
}

/* ------------------------------------------------------------ round trip */
START_TEST(save_then_load_is_bit_exact) {
    fixture f;
    fixture_make(&f, 4, QLORA_TARGET_ALL_LINEAR);
    ft_adapter_config back;
    char err[2048] = "";
    ck_assert_msg(ft_adapter_read_config(f.adapter, &back, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(back.rank, 4);
    ck_assert_float_eq(back.alpha, 8.0f);
    ck_assert_float_eq(back.dropout, 0.05f);
    ck_assert_int_eq(back.use_rslora, 0);
    ck_assert_uint_eq(back.targets, QLORA_TARGET_ALL_LINEAR);
    ck_assert_str_eq(back.base_model, model_dir());

    qlora_model *fresh = load_model(f.ctx, model_dir(), &back);
    ck_assert_msg(ft_adapter_load(fresh, f.adapter, err, sizeof err) == 0, "%s", err);
    int compared = 0;
    for (int64_t i = 0; i < num_layers(fresh); i++)
        for (int j = 0; j < NPROJ; j++) {
            qlora_tensor a0, b0, a1, b1;
            ck_assert_int_eq(adapter_of(f.model, i, j, &a0, &b0), 1);
            ck_assert_int_eq(adapter_of(fresh, i, j, &a1, &b1), 1);
            ck_assert_mem_eq(a0.data, a1.data, qlora_tensor_nbytes(&a0));
            ck_assert_mem_eq(b0.data, b1.data, qlora_tensor_nbytes(&b0));
            compared += 2;
        }
    ck_assert_int_eq(compared, 2 * 2 * NPROJ);
    /* and the loaded adapters are in effect: same logits as the model that saved them */
    int32_t tokens[T];
    random_tokens(&f.rng, tokens);
    float *l0 = logits_of(f.model, tokens), *l1 = logits_of(fresh, tokens);
    ck_assert_mem_eq(l0, l1, (size_t)T * 128 * sizeof *l0);
    free(l0);
    free(l1);
    qlora_model_free(fresh);
    fixture_free(&f);
}
END_TEST

START_TEST(files_carry_peft_names_and_fields) {
    fixture f;
    fixture_make(&f, 4, QLORA_TARGET_ATTENTION | QLORA_TARGET_DOWN_PROJ);
    char *cfg_path = path_in(f.adapter, "adapter_config.json");
    char *text;
    size_t n;
    char err[2048] = "";
    ck_assert_msg(ft_read_file(cfg_path, &text, &n, err, sizeof err) == 0, "%s", err);
    cJSON *root = cJSON_ParseWithLength(text, n);
    ck_assert_ptr_nonnull(root);
    ck_assert_str_eq(cJSON_GetObjectItem(root, "peft_type")->valuestring, "LORA");
    ck_assert_str_eq(cJSON_GetObjectItem(root, "task_type")->valuestring, "CAUSAL_LM");
    ck_assert_str_eq(cJSON_GetObjectItem(root, "base_model_name_or_path")->valuestring, model_dir());
    ck_assert_str_eq(cJSON_GetObjectItem(root, "bias")->valuestring, "none");
    ck_assert_int_eq(cJSON_GetObjectItem(root, "r")->valueint, 4);
    ck_assert_double_eq(cJSON_GetObjectItem(root, "lora_alpha")->valuedouble, 8.0);
    /* written as Python would write the float given: 0.05, not 0.05000000074505806 */
    ck_assert_double_eq(cJSON_GetObjectItem(root, "lora_dropout")->valuedouble, 0.05);
    ck_assert(cJSON_IsFalse(cJSON_GetObjectItem(root, "use_rslora")));
    ck_assert(cJSON_IsTrue(cJSON_GetObjectItem(root, "inference_mode")));
    ck_assert(cJSON_IsFalse(cJSON_GetObjectItem(root, "fan_in_fan_out")));
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(root, "modules_to_save")));
    const char *want[] = {"down_proj", "k_proj", "o_proj", "q_proj", "v_proj"}; /* sorted */
    cJSON *tm = cJSON_GetObjectItem(root, "target_modules");
    ck_assert_int_eq(cJSON_GetArraySize(tm), 5);
    for (int k = 0; k < 5; k++)
        ck_assert_str_eq(cJSON_GetArrayItem(tm, k)->valuestring, want[k]);
    /* keys are sorted, as peft writes them */
    for (cJSON *it = root->child; it && it->next; it = it->next)
        ck_assert_msg(strcmp(it->string, it->next->string) < 0, "%s before %s", it->string, it->next->string);
    cJSON_Delete(root);
    free(text);
    free(cfg_path);

    char *st_path = path_in(f.adapter, "adapter_model.safetensors");
    qlora_safetensors *st;
    ck_assert_qlora_ok(qlora_safetensors_open(st_path, &st));
    ck_assert_str_eq(qlora_safetensors_metadata(st, "format"), "pt");
    ck_assert_uint_eq(qlora_safetensors_count(st), 2 * 2 * 5);
    qlora_tensor t;
    /* spelled out once, independently of ft_adapter_key */
    ck_assert_qlora_ok(qlora_safetensors_find(st, "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", &t));
    ck_assert_int_eq(t.dtype, QLORA_BF16);
    ck_assert_int_eq(t.shape[0], 64);
    ck_assert_int_eq(t.shape[1], 4);
    ck_assert_qlora_ok(qlora_safetensors_find(st, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", &t));
    ck_assert_int_eq(t.shape[0], 4);
    ck_assert_int_eq(t.shape[1], 64);
    ck_assert_int_eq(qlora_safetensors_find(st, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", &t),
                     QLORA_ERR_NOT_FOUND);
    for (int64_t i = 0; i < 2; i++)
        for (int j = 0; j < NPROJ; j++) {
            qlora_tensor a, b;
            if (!adapter_of(f.model, i, j, &a, &b))
                continue;
            char key[256];
            ft_adapter_key(i, j, 'A', key, sizeof key);
            ck_assert_qlora_ok(qlora_safetensors_find(st, key, &t));
            ck_assert_mem_eq(t.data, a.data, qlora_tensor_nbytes(&a));
            ft_adapter_key(i, j, 'B', key, sizeof key);
            ck_assert_qlora_ok(qlora_safetensors_find(st, key, &t));
            ck_assert_int_eq(t.shape[0], b.shape[0]);
            ck_assert_mem_eq(t.data, b.data, qlora_tensor_nbytes(&b));
        }
    qlora_safetensors_close(st);
    free(st_path);
    fixture_free(&f);
}
END_TEST

/* ------------------------------------------------------------ refusals */
/* Rewrites <src>/adapter_model.safetensors into dir: `drop` left out, `reshape` declared with
 * one more column (its data padded with zeros). */
static void rewrite_adapter(const char *src, const char *dir, const char *drop, const char *reshape) {
    char *in = path_in(src, "adapter_model.safetensors"), *out = path_in(dir, "adapter_model.safetensors");
    char err[2048] = "";
    ck_assert_msg(ft_mkdirs(dir, err, sizeof err) == 0, "%s", err);
    qlora_safetensors *f;
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_safetensors_open(in, &f));
    ck_assert_qlora_ok(qlora_st_writer_open(out, 0, &w));
    size_t n = qlora_safetensors_count(f);
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < n; i++) {
            qlora_tensor t;
            ck_assert_qlora_ok(qlora_safetensors_get(f, i, &t));
            if (drop && !strcmp(t.name, drop))
                continue;
            int wider = reshape && !strcmp(t.name, reshape);
            int64_t shape[2] = {t.shape[0], t.shape[1] + wider};
            if (pass == 0) {
                ck_assert_qlora_ok(qlora_st_writer_declare(w, t.name, t.dtype, 2, shape));
                continue;
            }
            size_t bytes = (size_t)(shape[0] * shape[1]) * 2;
            unsigned char *data = calloc(1, bytes);
            for (int64_t r = 0; r < t.shape[0]; r++)
                memcpy(data + (size_t)(r * shape[1]) * 2, (unsigned char *)t.data + (size_t)(r * t.shape[1]) * 2,
                       (size_t)t.shape[1] * 2);
            ck_assert_qlora_ok(qlora_st_writer_write(w, t.name, data, bytes));
            free(data);
        }
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    qlora_safetensors_close(f);
    free(in);
    free(out);
}

static void expect_load_failure(qlora_model *m, const char *dir, const char *needle1, const char *needle2) {
    char err[2048] = "";
    ck_assert_int_ne(ft_adapter_load(m, dir, err, sizeof err), 0);
    ck_assert_msg(strstr(err, needle1) && strstr(err, needle2), "'%s' lacks '%s' or '%s'", err, needle1, needle2);
}

START_TEST(bad_adapters_are_refused_naming_file_and_tensor) {
    fixture f;
    fixture_make(&f, 4, QLORA_TARGET_ALL_LINEAR);
    qlora_model *fresh = load_model(f.ctx, model_dir(), &f.cfg);
    qlora_tensor a, b;
    ck_assert_int_eq(adapter_of(fresh, 1, 6, &a, &b), 1);
    void *before = malloc(qlora_tensor_nbytes(&a));
    memcpy(before, a.data, qlora_tensor_nbytes(&a));

    char *missing = path_in(f.tmp, "missing"), *shaped = path_in(f.tmp, "shaped");
    const char *gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    const char *wide = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight";
    rewrite_adapter(f.adapter, missing, gone, NULL);
    rewrite_adapter(f.adapter, shaped, NULL, wide);
    expect_load_failure(fresh, missing, "missing/adapter_model.safetensors", gone);
    expect_load_failure(fresh, shaped, "shaped/adapter_model.safetensors", wide);
    expect_load_failure(fresh, shaped, "[4, 65]", "[4, 64]");
    /* nothing was written into the model by the failed loads (every tensor is checked first) */
    ck_assert_mem_eq(before, a.data, qlora_tensor_nbytes(&a));

    /* rank 4 in the file, 8 in the model */
    ft_adapter_config r8 = f.cfg;
    r8.rank = 8;
    qlora_model *wrong_rank = load_model(f.ctx, model_dir(), &r8);
    expect_load_failure(wrong_rank, f.adapter, "rank 4", "rank 8");
    expect_load_failure(wrong_rank, f.adapter, "adapter/adapter_model.safetensors", "lora_A.weight");
    /* the file adapts the MLP too, the model only attention: the first extra tensor is named */
    ft_adapter_config attn = f.cfg;
    attn.targets = QLORA_TARGET_ATTENTION;
    qlora_model *fewer = load_model(f.ctx, model_dir(), &attn);
    expect_load_failure(fewer, f.adapter, "adapter_model.safetensors", "mlp.");
    /* a missing directory */
    expect_load_failure(fresh, "/nonexistent-qlora-adapter", "/nonexistent-qlora-adapter/adapter_model.safetensors",
                        "");
    qlora_model_free(fewer);
    qlora_model_free(wrong_rank);

    /* config files: not LORA, a module qlora-ft does not adapt, a DoRA adapter */
    static const struct {
        const char *json, *needle;
    } bad[] = {
        {"{\"peft_type\": \"IA3\", \"r\": 4, \"target_modules\": [\"q_proj\"]}", "peft_type"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": [\"q_proj\", \"lm_head\"]}", "lm_head"},
        {"{\"peft_type\": \"LORA\", \"r\": 0, \"target_modules\": [\"q_proj\"]}", "'r'"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"use_dora\": true, \"target_modules\": [\"q_proj\"]}", "use_dora"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": \"q_proj|v_proj\"}", "target_modules"},
        {"{\"peft_type\": \"LORA\", \"r\": 4,", "not valid JSON"},
    };
    char *cfg_dir = path_in(f.tmp, "config"), *cfg_path = path_in(cfg_dir, "adapter_config.json");
    char err[2048];
    ck_assert_int_eq(ft_mkdirs(cfg_dir, err, sizeof err), 0);
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        tu_write_file(cfg_path, bad[k].json, strlen(bad[k].json));
        ft_adapter_config c;
        err[0] = '\0';
        ck_assert_int_ne(ft_adapter_read_config(cfg_dir, &c, err, sizeof err), 0);
        ck_assert_msg(strstr(err, "config/adapter_config.json") && strstr(err, bad[k].needle),
                      "case %zu: '%s' lacks the file or '%s'", k, err, bad[k].needle);
    }
    /* "all-linear" is peft's shorthand and reads as the seven projections */
    const char *all = "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": \"all-linear\"}";
    tu_write_file(cfg_path, all, strlen(all));
    ft_adapter_config c;
    ck_assert_msg(ft_adapter_read_config(cfg_dir, &c, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(c.targets, QLORA_TARGET_ALL_LINEAR);
    ck_assert_int_eq(c.rank, 2);

    free(cfg_dir);
    free(cfg_path);
    free(before);
    free(missing);
    free(shaped);
    qlora_model_free(fresh);
    fixture_free(&f);
}
END_TEST

/* ---------------------------------------------------------- directories */
static int count_entries_containing(const char *dir, const char *needle) {
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += strstr(e->d_name, needle) != NULL;
    closedir(d);
    return n;
}

START_TEST(dir_commit_replaces_whole_and_leaves_no_temp) {
    char *tmp = tu_tempdir(), *final = path_in(tmp, "out/run"), *parent = path_in(tmp, "out");
    char err[2048] = "", staging[4096];
    for (int round = 0; round < 3; round++) {
        ck_assert_msg(ft_tmpdir_for(final, staging, sizeof staging, err, sizeof err) == 0, "%s", err);
        ck_assert_ptr_nonnull(strstr(staging, "out/run.tmp."));
        char name[4200], body[64];
        snprintf(name, sizeof name, "%s/file%d.txt", staging, round);
        snprintf(body, sizeof body, "round %d", round);
        ck_assert_int_eq(ft_write_file(name, body, strlen(body), err, sizeof err), 0);
        char *sub = path_in(staging, "sub");
        ck_assert_int_eq(ft_mkdirs(sub, err, sizeof err), 0);
        char *subfile = path_in(sub, "x");
        ck_assert_int_eq(ft_write_file(subfile, "x", 1, err, sizeof err), 0);
        if (round == 2) { /* a stale "<final>.old" from a crashed run does not stop the commit */
            char *old = path_in(parent, "run.old");
            ck_assert_int_eq(ft_mkdirs(old, err, sizeof err), 0);
            free(old);
        }
        ck_assert_msg(ft_dir_commit(staging, final, err, sizeof err) == 0, "%s", err);
        free(sub);
        free(subfile);
        /* only this round's file is there, and nothing but "run" in the parent */
        for (int k = 0; k <= round; k++) {
            char *p;
            ck_assert_int_ge(asprintf(&p, "%s/file%d.txt", final, k), 0);
            ck_assert_int_eq(ft_exists(p), k == round);
            if (k == round) {
                char *data;
                size_t n;
                ck_assert_int_eq(ft_read_file(p, &data, &n, err, sizeof err), 0);
                ck_assert_str_eq(data, body);
                free(data);
            }
            free(p);
        }
        ck_assert_int_eq(count_entries_containing(parent, ".tmp."), 0);
        ck_assert_int_eq(count_entries_containing(parent, ".old"), 0);
        ck_assert_int_eq(count_entries_containing(parent, "run"), 1);
    }
    /* a stale temp dir of this pid is emptied by the next ft_tmpdir_for */
    ck_assert_int_eq(ft_tmpdir_for(final, staging, sizeof staging, err, sizeof err), 0);
    char *junk = path_in(staging, "junk");
    ck_assert_int_eq(ft_write_file(junk, "j", 1, err, sizeof err), 0);
    ck_assert_int_eq(ft_tmpdir_for(final, staging, sizeof staging, err, sizeof err), 0);
    ck_assert_int_eq(ft_exists(junk), 0);
    ck_assert_int_eq(ft_remove_tree(staging, err, sizeof err), 0);
    ck_assert_int_eq(ft_exists(staging), 0);
    ck_assert_int_eq(ft_remove_tree(staging, err, sizeof err), 0); /* missing: fine */
    /* failures name the path and the reason */
    char *data;
    size_t n;
    ck_assert_int_ne(ft_read_file(junk, &data, &n, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, junk));
    ck_assert_ptr_nonnull(strstr(err, "No such file"));
    free(junk);
    tu_rmtree(tmp);
    free(tmp);
    free(final);
    free(parent);
}
END_TEST

/* --------------------------------------------------------------- merge */
static int merge(const char *model, const char *adapter, const char *out, const char *bits) {
    char *argv[] = {"--model", (char *)model, "--adapter", (char *)adapter, "--out", (char *)out, "--bits",
                    (char *)bits, NULL};
    return ft_merge_main(8, argv);
}

/* Reads an F32 copy of a (possibly unaligned) BF16 checkpoint tensor. */
static float *bf16_tensor(qlora_checkpoint *ck, const char *name, int64_t *numel) {
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_checkpoint_find(ck, name, &t));
    ck_assert_int_eq(t.dtype, QLORA_BF16);
    *numel = qlora_tensor_numel(&t);
    float *out = malloc((size_t)*numel * sizeof *out);
    for (int64_t i = 0; i < *numel; i++) {
        uint16_t h;
        memcpy(&h, (unsigned char *)t.data + 2 * i, 2);
        uint32_t u = (uint32_t)h << 16;
        memcpy(&out[i], &u, 4);
    }
    return out;
}

/* Every tensor of the base that is not a decoder linear weight is in the merged file, the same
 * bytes; every decoder linear weight is in it too. Returns the number of tensors compared. */
static int same_dense_tensors(const char *base_dir, const char *merged_dir) {
    qlora_checkpoint *base, *merged;
    ck_assert_qlora_ok(qlora_checkpoint_open(base_dir, &base));
    ck_assert_qlora_ok(qlora_checkpoint_open(merged_dir, &merged));
    int dense = 0;
    for (size_t i = 0; i < qlora_checkpoint_count(base); i++) {
        const char *name = qlora_checkpoint_name(base, i);
        qlora_tensor a, b;
        ck_assert_msg(qlora_checkpoint_find(merged, name, &b) == QLORA_OK, "merged lacks %s", name);
        if (strstr(name, "_proj."))
            continue;
        ck_assert_qlora_ok(qlora_checkpoint_find(base, name, &a));
        ck_assert_int_eq(a.dtype, b.dtype);
        ck_assert_uint_eq(qlora_tensor_nbytes(&a), qlora_tensor_nbytes(&b));
        ck_assert_msg(memcmp(a.data, b.data, qlora_tensor_nbytes(&a)) == 0, "%s differs", name);
        dense++;
    }
    qlora_checkpoint_close(base);
    qlora_checkpoint_close(merged);
    return dense;
}

/* The merged model (rank 0, its weights re-quantized to NF4 on load or by --bits 4) against the
 * base with the adapter (base = the base without it). Re-quantizing W' = dequant(W) + s·B·A
 * costs what quantizing W cost: the merged model's logits differ from the adapted model's by
 * about the NF4 noise of the base itself, measured by transformers in the fixture, scaled by
 * |W'| / |W| (s·B·A adds about half the spread of W here). Measured over 20 seeds with both
 * --bits: rms(merged - adapted) / noise in [0.70, 1.28], so the bound is MERGE_NOISE_BOUND = 2.
 * The adapter itself moves the logits by 2.8-3.9x the noise, beyond the bound, so a merge that
 * dropped the adapters (error = that effect) fails. Each weight is checked exactly elsewhere. */
static void close_to_adapted(const char *bits, qlora_model *merged, qlora_model *adapted, qlora_model *base) {
    int32_t ids[T];
    int64_t n;
    const double noise = nf4_noise_of_base(ids, &n);
    float *lm = logits_n(merged, ids, n), *la = logits_n(adapted, ids, n), *lb = logits_n(base, ids, n);
    double err = rms_diff(lm, la, n * 128), effect = rms_diff(la, lb, n * 128);
    fprintf(stderr, "merge --bits %s: rms(merged - adapted) %.4g = %.3f x the base's NF4 noise %.4g; adapter "
            "effect %.4g\n", bits, err, err / noise, noise, effect);
    ck_assert_msg(err < MERGE_NOISE_BOUND * noise, "--bits %s: merged model is off by %g (NF4 noise %g)", bits, err,
                  noise);
    ck_assert_msg(effect > MERGE_NOISE_BOUND * noise, "--bits %s: the adapter moves the logits by %g only", bits,
                  effect);
    free(lm);
    free(la);
    free(lb);
}

START_TEST(merge_16bit_matches_base_plus_adapter) {
    fixture f;
    fixture_make(&f, 4, QLORA_TARGET_ALL_LINEAR & ~QLORA_TARGET_K_PROJ);
    char *out = path_in(f.tmp, "merged16");
    ck_assert_int_eq(merge(model_dir(), f.adapter, out, "16"), 0);

    /* the weights: W' = dequant(W) + s·B·A recomputed here in double, within BF16 rounding
     * (2^-9 relative) plus float32 accumulation; k_proj (not adapted) is dequant(W) alone */
    qlora_checkpoint *ck;
    ck_assert_qlora_ok(qlora_checkpoint_open(out, &ck));
    const double s = 8.0 / 4.0;
    for (int64_t i = 0; i < 2; i++)
        for (int j = 0; j < NPROJ; j++) {
            qlora_linear *lin;
            char name[256];
            ck_assert_qlora_ok(qlora_model_linear(f.model, i, qlora_target_name(j), &lin));
            const qlora_qtensor *q = qlora_linear_weight(lin);
            snprintf(name, sizeof name, "model.layers.%lld.%s.%s.weight", (long long)i, j < 4 ? "self_attn" : "mlp",
                     qlora_target_name(j));
            int64_t n, rows = q->shape[0], cols = q->shape[1];
            float *got = bf16_tensor(ck, name, &n);
            ck_assert_int_eq(n, rows * cols);
            qlora_tensor w;
            ck_assert_qlora_ok(qlora_tensor_init(&w, "w", QLORA_F32, 2, q->shape, NULL, QLORA_DEVICE_HOST));
            ck_assert_qlora_ok(qlora_tensor_alloc(f.ctx, &w, 0, QLORA_MEM_WORKSPACE));
            ck_assert_qlora_ok(qlora_dequantize(f.ctx, q, &w));
            qlora_tensor a, b;
            int adapted = adapter_of(f.model, i, j, &a, &b);
            ck_assert_int_eq(adapted, j != 1);
            float *af = NULL, *bfl = NULL;
            if (adapted) {
                int64_t na = qlora_tensor_numel(&a), nb = qlora_tensor_numel(&b);
                af = malloc((size_t)na * 4);
                bfl = malloc((size_t)nb * 4);
                for (int64_t k = 0; k < na; k++) {
                    uint32_t u = (uint32_t)((uint16_t *)a.data)[k] << 16;
                    memcpy(&af[k], &u, 4);
                }
                for (int64_t k = 0; k < nb; k++) {
                    uint32_t u = (uint32_t)((uint16_t *)b.data)[k] << 16;
                    memcpy(&bfl[k], &u, 4);
                }
            }
            double max_delta = 0;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < cols; c++) {
                    double ref = ((float *)w.data)[r * cols + c], delta = 0;
                    for (int64_t k = 0; adapted && k < 4; k++)
                        delta += (double)bfl[r * 4 + k] * af[k * cols + c];
                    ref += s * delta;
                    max_delta = fmax(max_delta, fabs(s * delta));
                    double tol = fabs(ref) * 0x1p-8 + 1e-6;
                    ck_assert_msg(fabs(got[r * cols + c] - ref) <= tol, "%s[%lld, %lld] = %g, expected %g", name,
                                  (long long)r, (long long)c, got[r * cols + c], ref);
                }
            if (adapted)
                ck_assert_msg(max_delta > 0.05, "%s: adapter term too small to test (%g)", name, max_delta);
            free(af);
            free(bfl);
            free(got);
            qlora_tensor_free(f.ctx, &w);
        }
    qlora_checkpoint_close(ck);
    ck_assert_int_eq(same_dense_tensors(model_dir(), out), 2 * 2 + 3); /* norms; embed, norm, lm_head */

    /* config.json and the side files */
    char *cfg = path_in(out, "config.json"), *gen = path_in(out, "generation_config.json"), *text;
    size_t n;
    char err[2048];
    ck_assert_int_eq(ft_read_file(cfg, &text, &n, err, sizeof err), 0);
    ck_assert_ptr_null(strstr(text, "quantization_config"));
    ck_assert_ptr_nonnull(strstr(text, "\"num_hidden_layers\": 2"));
    free(text);
    ck_assert_int_eq(ft_exists(gen), 1);
    ck_assert_int_eq(count_entries_containing(f.tmp, ".tmp."), 0);

    /* the merged model, loaded (and re-quantized to NF4) without adapters, against the base with
     * its adapter: see close_to_adapted */
    qlora_model *merged = load_model(f.ctx, out, NULL);
    qlora_model *plain = load_model(f.ctx, model_dir(), NULL);
    close_to_adapted("16", merged, f.model, plain);
    qlora_model_free(merged);
    qlora_model_free(plain);
    free(cfg);
    free(gen);
    free(out);
    fixture_free(&f);
}
END_TEST

START_TEST(merge_4bit_equals_in_place_merge) {
    fixture f;
    fixture_make(&f, 4, QLORA_TARGET_ALL_LINEAR);
    char *out = path_in(f.tmp, "merged4");
    ck_assert_int_eq(merge(model_dir(), f.adapter, out, "4"), 0);
    /* quantization_config for transformers */
    char *cfg = path_in(out, "config.json"), *text;
    size_t n;
    char err[2048];
    ck_assert_int_eq(ft_read_file(cfg, &text, &n, err, sizeof err), 0);
    cJSON *root = cJSON_ParseWithLength(text, n);
    ck_assert_ptr_nonnull(root);
    cJSON *qc = cJSON_GetObjectItem(root, "quantization_config");
    ck_assert_ptr_nonnull(qc);
    ck_assert_str_eq(cJSON_GetObjectItem(qc, "quant_method")->valuestring, "bitsandbytes");
    ck_assert_str_eq(cJSON_GetObjectItem(qc, "bnb_4bit_quant_type")->valuestring, "nf4");
    ck_assert(cJSON_IsTrue(cJSON_GetObjectItem(qc, "load_in_4bit")));
    ck_assert(cJSON_IsTrue(cJSON_GetObjectItem(qc, "bnb_4bit_use_double_quant")));
    ck_assert_int_eq(cJSON_GetObjectItem(root, "num_hidden_layers")->valueint, 2);
    cJSON_Delete(root);
    free(text);
    ck_assert_int_eq(same_dense_tensors(model_dir(), out), 2 * 2 + 3);

    /* close to the base with its adapter (see close_to_adapted) */
    qlora_model *merged = load_model(f.ctx, out, NULL);
    qlora_model *plain = load_model(f.ctx, model_dir(), NULL);
    close_to_adapted("4", merged, f.model, plain);

    /* and exactly the weights (so the logits) of merging in place here */
    for (int64_t i = 0; i < 2; i++)
        for (int j = 0; j < NPROJ; j++) {
            qlora_linear *lin;
            int id;
            ck_assert_qlora_ok(qlora_model_linear(f.model, i, qlora_target_name(j), &lin));
            ck_assert_qlora_ok(qlora_linear_find_adapter(lin, "default", &id));
            ck_assert_qlora_ok(qlora_linear_merge(lin, id, NULL));
        }
    for (int64_t i = 0; i < 2; i++)
        for (int j = 0; j < NPROJ; j++) {
            qlora_linear *l0, *l1;
            ck_assert_qlora_ok(qlora_model_linear(f.model, i, qlora_target_name(j), &l0));
            ck_assert_qlora_ok(qlora_model_linear(merged, i, qlora_target_name(j), &l1));
            const qlora_qtensor *q0 = qlora_linear_weight(l0), *q1 = qlora_linear_weight(l1);
            ck_assert_int_eq(q0->numel, q1->numel);
            ck_assert_mem_eq(q0->codes, q1->codes, (size_t)(q0->numel + 1) / 2);
            ck_assert_mem_eq(q0->qabsmax, q1->qabsmax, (size_t)q0->nblocks);
            ck_assert_mem_eq(q0->nested_absmax, q1->nested_absmax, (size_t)q0->nested_nblocks * 4);
            ck_assert_float_eq(q0->nested_offset, q1->nested_offset);
        }
    int32_t tokens[T];
    random_tokens(&f.rng, tokens);
    float *lm = logits_of(merged, tokens), *lin_merged = logits_of(f.model, tokens);
    ck_assert_mem_eq(lm, lin_merged, (size_t)T * 128 * sizeof *lm);
    free(lm);
    free(lin_merged);
    qlora_model_free(plain);
    qlora_model_free(merged);
    free(cfg);
    free(out);
    fixture_free(&f);
}
END_TEST

START_TEST(merge_usage_errors_exit_2) {
    fixture f;
    fixture_make(&f, 2, QLORA_TARGET_Q_PROJ);
    char *out = path_in(f.tmp, "m"), *home = path_in(f.tmp, "notamodel"), *keep = path_in(home, "keep.txt");
    char err[256];
    const char *m = model_dir();
    char *none[] = {NULL};
    char *no_out[] = {"--model", (char *)m, "--adapter", f.adapter, NULL};
    char *bits8[] = {"--model", (char *)m, "--adapter", f.adapter, "--out", out, "--bits", "8", NULL};
    char *unknown[] = {"--model", (char *)m, "--adapter", f.adapter, "--out", out, "--fast", NULL};
    char *dangling[] = {"--model", (char *)m, "--adapter", f.adapter, "--out", NULL};
    char *onto_base[] = {"--model", (char *)m, "--adapter", f.adapter, "--out", (char *)m, NULL};
    char *onto_dir[] = {"--model", (char *)m, "--adapter", f.adapter, "--out", home, NULL};
    char *help[] = {"--help", NULL};
    ck_assert_int_eq(ft_merge_main(0, none), 2);
    ck_assert_int_eq(ft_merge_main(4, no_out), 2);
    ck_assert_int_eq(ft_merge_main(8, bits8), 2);
    ck_assert_int_eq(ft_merge_main(7, unknown), 2);
    ck_assert_int_eq(ft_merge_main(5, dangling), 2);
    ck_assert_int_eq(ft_merge_main(6, onto_base), 2);
    ck_assert_int_eq(ft_mkdirs(home, err, sizeof err), 0);
    ck_assert_int_eq(ft_write_file(keep, "k", 1, err, sizeof err), 0);
    ck_assert_int_eq(ft_merge_main(6, onto_dir), 2); /* a directory that is not a model is never replaced */
    ck_assert_int_eq(ft_exists(keep), 1);
    ck_assert_int_eq(ft_merge_main(1, help), 0);
    ck_assert_int_eq(ft_exists(out), 0);
    /* not usage errors but failures: exit 1, nothing written */
    ck_assert_int_eq(merge(m, "/nonexistent-qlora-adapter", out, "16"), 1);
    ck_assert_int_eq(merge(f.tmp, f.adapter, out, "16"), 1); /* no model there */
    ck_assert_int_eq(ft_exists(out), 0);
    ck_assert_int_eq(count_entries_containing(f.tmp, ".tmp."), 0);
    free(out);
    free(home);
    free(keep);
    fixture_free(&f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ft_adapter");
    TCase *tc = tcase_create("adapter");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, save_then_load_is_bit_exact);
    tcase_add_test(tc, files_carry_peft_names_and_fields);
    tcase_add_test(tc, bad_adapters_are_refused_naming_file_and_tensor);
    tcase_add_test(tc, dir_commit_replaces_whole_and_leaves_no_temp);
    suite_add_tcase(s, tc);
    TCase *merge_tc = tcase_create("merge");
    tcase_set_timeout(merge_tc, 600);
    tcase_add_test(merge_tc, merge_16bit_matches_base_plus_adapter);
    tcase_add_test(merge_tc, merge_4bit_equals_in_place_merge);
    tcase_add_test(merge_tc, merge_usage_errors_exit_2);
    suite_add_tcase(s, merge_tc);
    return tu_run_suite(s);
}
