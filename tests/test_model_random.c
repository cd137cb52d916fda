/*
 * qlora_model_write_random: the directory it writes loads with qlora_model_load and runs on every
 * backend; the tensors have the documented values (norms 1, biases 0, N(0, init_std²) drawn by
 * the documented stream, re-derived here from include/qlora.h); the same arguments give the same
 * bytes, at any thread count; config.json reads back as the config; bad arguments fail naming
 * the path or the field.
 */
#include <dirent.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "half.h"
#include "testutil.h"

#define INIT_STD 0.02

/* A small Llama with grouped-query attention and attention_bias (q/k/v and o biases). */
static qlora_model_config small_llama(void) {
    qlora_model_config c;
    memset(&c, 0, sizeof c);
    c.hidden_size = 64;
    c.intermediate_size = 176;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 16;
    c.vocab_size = 97;
    c.qkv_bias = c.o_bias = 1;
    c.rope_theta = 10000.0;
    c.rms_norm_eps = 1e-5;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    snprintf(c.hidden_act, sizeof c.hidden_act, "silu");
    c.rope.type = QLORA_ROPE_DEFAULT;
    snprintf(c.rope.type_name, sizeof c.rope.type_name, "default");
    return c;
}

/* A small Qwen2: q/k/v biases only, tied embeddings, head_dim not hidden / heads. */
static qlora_model_config small_qwen2(void) {
    qlora_model_config c = small_llama();
    snprintf(c.model_type, sizeof c.model_type, "qwen2");
    c.o_bias = 0;
    c.tie_word_embeddings = 1;
    c.head_dim = 8;
    c.num_layers = 3;
    c.rope_theta = 1000000.0;
    c.rms_norm_eps = 1e-6;
    return c;
}

static char *path_in(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    ck_assert_ptr_nonnull(p);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static void *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    ck_assert_int_ge(n, 0);
    rewind(f);
    void *buf = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    void *x = read_file(a, &na), *y = read_file(b, &nb);
    int same = na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* The directory holds config.json and model.safetensors, nothing else (no temp files). */
static void assert_only_model_files(const char *dir) {
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot list %s", dir);
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        ck_assert_msg(!strcmp(e->d_name, "config.json") || !strcmp(e->d_name, "model.safetensors"),
                      "unexpected file %s in %s", e->d_name, dir);
        n++;
    }
    closedir(d);
    ck_assert_int_eq(n, 2);
}

static float bf16_at(const qlora_tensor *t, int64_t i) {
    uint16_t h;
    memcpy(&h, (const char *)t->data + 2 * i, 2); /* the mapping may be unaligned */
    return ql_bf16_to_f32(h);
}

/* ---- the generator as include/qlora.h documents it, written again here */
static uint64_t doc_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t doc_fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    while (*s)
        h = (h ^ (unsigned char)*s++) * 0x100000001b3ULL;
    return h;
}

static void doc_row(const char *name, uint64_t seed, int64_t row, int64_t n, double std, uint16_t *out) {
    uint64_t state = doc_mix64(seed ^ doc_fnv1a64(name) ^ ((uint64_t)row * 0xd1b54a32d192ed03ULL));
    for (int64_t i = 0; i < n; i += 2) {
        uint64_t a = doc_mix64(state += 0x9e3779b97f4a7c15ULL), b = doc_mix64(state += 0x9e3779b97f4a7c15ULL);
        double u1 = ((double)(a >> 11) + 1.0) / 9007199254740992.0, u2 = (double)(b >> 11) / 9007199254740992.0;
        double r = std * sqrt(-2.0 * log(u1));
        out[i] = ql_f32_to_bf16((float)(r * cos(2.0 * M_PI * u2)));
        if (i + 1 < n)
            out[i + 1] = ql_f32_to_bf16((float)(r * sin(2.0 * M_PI * u2)));
    }
}

/* Norms are 1, biases 0, lm_head present unless tied; the random matrices have mean ~0 and
 * standard deviation ~INIT_STD, and rows 0 and 5 of one are the documented stream's. */
static void check_tensors(const char *dir, const qlora_model_config *c, uint64_t seed) {
    qlora_checkpoint *ck = NULL;
    ck_assert_qlora_ok(qlora_checkpoint_open(dir, &ck));
    size_t biases = (size_t)(3 * c->qkv_bias + c->o_bias + 3 * c->mlp_bias) * (size_t)c->num_layers;
    ck_assert_uint_eq(qlora_checkpoint_count(ck),
                      3 + 9 * (size_t)c->num_layers + biases - (size_t)c->tie_word_embeddings);
    qlora_tensor t;
    for (size_t i = 0; i < qlora_checkpoint_count(ck); i++) {
        const char *name = qlora_checkpoint_name(ck, i);
        ck_assert_qlora_ok(qlora_checkpoint_find(ck, name, &t));
        ck_assert_msg(t.dtype == QLORA_BF16, "%s is %s", name, qlora_dtype_name(t.dtype));
        int64_t n = qlora_tensor_numel(&t);
        if (strstr(name, "norm.weight") || strstr(name, ".bias")) {
            float want = strstr(name, ".bias") ? 0.0f : 1.0f;
            for (int64_t j = 0; j < n; j++)
                ck_assert_msg(bf16_at(&t, j) == want, "%s[%lld] = %g", name, (long long)j, bf16_at(&t, j));
            continue;
        }
        double sum = 0, sq = 0;
        for (int64_t j = 0; j < n; j++) {
            double v = bf16_at(&t, j);
            sum += v;
            sq += v * v;
        }
        double mean = sum / (double)n, sd = sqrt(sq / (double)n - mean * mean);
        /* within 5 standard errors: sd's is ~1/sqrt(2n) relative, the mean's INIT_STD/sqrt(n) */
        ck_assert_msg(fabs(sd / INIT_STD - 1) < 5 / sqrt(2.0 * (double)n), "%s: sd %g", name, sd);
        ck_assert_msg(fabs(mean) < 5 * INIT_STD / sqrt((double)n), "%s: mean %g", name, mean);
    }
    ck_assert_int_eq(qlora_checkpoint_find(ck, "lm_head.weight", &t) == QLORA_OK, !c->tie_word_embeddings);

    const char *name = "model.layers.1.self_attn.k_proj.weight";
    ck_assert_qlora_ok(qlora_checkpoint_find(ck, name, &t));
    int64_t cols = t.shape[1];
    uint16_t expect[256];
    ck_assert_int_le(cols, 256);
    for (int64_t row = 0; row <= 5; row += 5) {
        doc_row(name, seed, row, cols, INIT_STD, expect);
        ck_assert_msg(memcmp((const char *)t.data + 2 * row * cols, expect, (size_t)cols * 2) == 0,
                      "%s row %lld is not the documented stream's", name, (long long)row);
    }
    qlora_checkpoint_close(ck);
}

START_TEST(writes_a_model_that_loads_and_runs) {
    const qlora_model_config cfgs[2] = {small_llama(), small_qwen2()};
    const uint64_t seed = tu_seed();
    char *tmp = tu_tempdir();
    tu_rng rng;
    tu_rng_init(&rng, seed);
    for (int k = 0; k < 2; k++) {
        const qlora_model_config *c = &cfgs[k];
        char *dir = path_in(tmp, c->model_type); /* does not exist yet */
        ck_assert_qlora_ok(qlora_model_write_random(c, dir, seed, INIT_STD));
        assert_only_model_files(dir);
        check_tensors(dir, c, seed);

        enum { T = 24 };
        int32_t tokens[T], labels[T];
        for (int t = 0; t < T; t++) {
            tokens[t] = (int32_t)(tu_next(&rng) % (uint64_t)c->vocab_size);
            labels[t] = t % 5 == 4 ? -100 : (int32_t)(tu_next(&rng) % (uint64_t)c->vocab_size);
        }
        tu_backend backends[4];
        int nb = tu_backends(backends);
        for (int b = 0; b < nb; b++) {
            qlora_ctx *ctx = tu_ctx(&backends[b]);
            qlora_model *m = NULL;
            ck_assert_qlora_ok(qlora_model_load(ctx, dir, NULL, &m));
            qlora_model_config got;
            ck_assert_qlora_ok(qlora_model_get_config(m, &got));
            ck_assert_int_eq(got.num_layers, c->num_layers);
            /* logits ~ N(0, INIT_STD² H) after the final norm: the loss is log V + ~0.013 */
            float loss = 0;
            ck_assert_qlora_ok(qlora_model_forward(m, tokens, NULL, NULL, T, labels, &loss, NULL));
            ck_assert_msg(isfinite(loss) && fabs(loss - log((double)c->vocab_size)) < 0.2, "%s %s: loss %g",
                          c->model_type, backends[b].name, loss);
            qlora_batch batch = {tokens, NULL, NULL, labels, T};
            qlora_train_step_result r;
            ck_assert_qlora_ok(qlora_model_forward_backward(m, &batch, NULL, &r));
            ck_assert_int_eq(r.targets, T - T / 5);
            ck_assert_msg(isfinite(r.loss_sum) && r.loss_sum > 0, "loss_sum %g", r.loss_sum);
            qlora_model_free(m);
            qlora_ctx_free(ctx);
        }
        free(dir);
    }
    tu_rmtree(tmp);
    free(tmp);
}
END_TEST

START_TEST(same_arguments_same_bytes) {
    const qlora_model_config c = small_llama();
    const uint64_t seed = tu_seed();
    char *tmp = tu_tempdir();
    char *a = path_in(tmp, "a"), *b = path_in(tmp, "b"), *other = path_in(tmp, "other"), *tied = path_in(tmp, "tied");
    ck_assert_qlora_ok(qlora_model_write_random(&c, a, seed, INIT_STD));
    /* rows are independent streams: one thread gives the bytes of many */
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    qlora_status st = qlora_model_write_random(&c, b, seed, INIT_STD);
    omp_set_num_threads(threads);
    ck_assert_qlora_ok(st);
    ck_assert_qlora_ok(qlora_model_write_random(&c, other, seed + 1, INIT_STD));
    const char *files[2] = {"model.safetensors", "config.json"};
    for (int i = 0; i < 2; i++) {
        char *pa = path_in(a, files[i]), *pb = path_in(b, files[i]);
        ck_assert_msg(same_file(pa, pb), "%s differs between two writes", files[i]);
        free(pa);
        free(pb);
    }
    char *pa = path_in(a, "model.safetensors"), *po = path_in(other, "model.safetensors");
    ck_assert_msg(!same_file(pa, po), "seed + 1 wrote the same weights");
    /* a tensor's values do not depend on the others: tying drops lm_head, embed_tokens stays */
    qlora_model_config ct = c;
    ct.tie_word_embeddings = 1;
    ck_assert_qlora_ok(qlora_model_write_random(&ct, tied, seed, INIT_STD));
    qlora_checkpoint *ca = NULL, *cb = NULL;
    ck_assert_qlora_ok(qlora_checkpoint_open(a, &ca));
    ck_assert_qlora_ok(qlora_checkpoint_open(tied, &cb));
    for (size_t i = 0; i < qlora_checkpoint_count(cb); i++) {
        const char *name = qlora_checkpoint_name(cb, i);
        qlora_tensor x, y;
        ck_assert_qlora_ok(qlora_checkpoint_find(ca, name, &x));
        ck_assert_qlora_ok(qlora_checkpoint_find(cb, name, &y));
        ck_assert_msg(memcmp(x.data, y.data, qlora_tensor_nbytes(&x)) == 0, "%s differs once tied", name);
    }
    qlora_checkpoint_close(ca);
    qlora_checkpoint_close(cb);
    /* writing again over an existing model replaces it with the same bytes */
    ck_assert_qlora_ok(qlora_model_write_random(&c, other, seed, INIT_STD));
    ck_assert_msg(same_file(pa, po), "rewriting a directory did not give the same weights");
    assert_only_model_files(other);
    free(pa);
    free(po);
    free(a);
    free(b);
    free(other);
    free(tied);
    tu_rmtree(tmp);
    free(tmp);
}
END_TEST

static void assert_same_config(const qlora_model_config *w, const qlora_model_config *g) {
    ck_assert_int_eq(g->hidden_size, w->hidden_size);
    ck_assert_int_eq(g->intermediate_size, w->intermediate_size);
    ck_assert_int_eq(g->num_layers, w->num_layers);
    ck_assert_int_eq(g->num_heads, w->num_heads);
    ck_assert_int_eq(g->num_kv_heads, w->num_kv_heads);
    ck_assert_int_eq(g->head_dim, w->head_dim);
    ck_assert_int_eq(g->vocab_size, w->vocab_size);
    ck_assert_int_eq(g->tie_word_embeddings, w->tie_word_embeddings);
    ck_assert_int_eq(g->qkv_bias, w->qkv_bias);
    ck_assert_int_eq(g->o_bias, w->o_bias);
    ck_assert_int_eq(g->mlp_bias, w->mlp_bias);
    ck_assert_msg(g->rope_theta == w->rope_theta, "rope_theta %.17g != %.17g", g->rope_theta, w->rope_theta);
    ck_assert_str_eq(g->model_type, w->model_type);
    ck_assert_msg(g->rms_norm_eps == w->rms_norm_eps, "rms_norm_eps %.17g != %.17g", g->rms_norm_eps,
                  w->rms_norm_eps);
    ck_assert_int_eq(g->rope.type, w->rope.type);
    ck_assert_str_eq(g->rope.type_name, w->rope.type_name);
    ck_assert(g->rope.factor == w->rope.factor);
    ck_assert(g->rope.low_freq_factor == w->rope.low_freq_factor);
    ck_assert(g->rope.high_freq_factor == w->rope.high_freq_factor);
    ck_assert_int_eq(g->rope.original_max_position_embeddings, w->rope.original_max_position_embeddings);
    ck_assert_str_eq(g->hidden_act, w->hidden_act);
    ck_assert_int_eq(g->sliding_window, w->sliding_window);
}

START_TEST(config_json_reads_back_as_the_config) {
    qlora_model_config cfgs[5];
    cfgs[0] = small_llama();
    cfgs[1] = small_qwen2();
    /* Llama 3.1's RoPE, no biases, MLP biases, an odd epsilon */
    cfgs[2] = small_llama();
    cfgs[2].qkv_bias = cfgs[2].o_bias = 0;
    cfgs[2].mlp_bias = 1;
    cfgs[2].rms_norm_eps = 3.0517578125e-05 * 1.1;
    cfgs[2].rope_theta = 500000.0;
    cfgs[2].rope.type = QLORA_ROPE_LLAMA3;
    snprintf(cfgs[2].rope.type_name, sizeof cfgs[2].rope.type_name, "llama3");
    cfgs[2].rope.factor = 8.0;
    cfgs[2].rope.low_freq_factor = 1.0;
    cfgs[2].rope.high_freq_factor = 4.0;
    cfgs[2].rope.original_max_position_embeddings = 8192;
    /* Mistral with a sliding window and linear RoPE (recorded; the loader would refuse the window) */
    cfgs[3] = small_llama();
    snprintf(cfgs[3].model_type, sizeof cfgs[3].model_type, "mistral");
    cfgs[3].qkv_bias = cfgs[3].o_bias = 0;
    cfgs[3].sliding_window = 4096;
    cfgs[3].rope.type = QLORA_ROPE_LINEAR;
    snprintf(cfgs[3].rope.type_name, sizeof cfgs[3].rope.type_name, "linear");
    cfgs[3].rope.factor = 2.5;
    /* Qwen2 with its window on, a gelu MLP and a RoPE type the forward lacks */
    cfgs[4] = small_qwen2();
    cfgs[4].o_bias = 1;
    cfgs[4].sliding_window = 2048;
    snprintf(cfgs[4].hidden_act, sizeof cfgs[4].hidden_act, "gelu_pytorch_tanh");
    cfgs[4].rope.type = QLORA_ROPE_UNSUPPORTED;
    snprintf(cfgs[4].rope.type_name, sizeof cfgs[4].rope.type_name, "yarn");
    char *tmp = tu_tempdir();
    for (int k = 0; k < 5; k++) {
        char name[16];
        snprintf(name, sizeof name, "m%d", k);
        char *dir = path_in(tmp, name), *config = path_in(dir, "config.json");
        ck_assert_qlora_ok(qlora_model_write_random(&cfgs[k], dir, (uint64_t)k, INIT_STD));
        qlora_model_config got;
        ck_assert_qlora_ok(qlora_model_config_from_json_file(config, &got));
        assert_same_config(&cfgs[k], &got);
        free(config);
        free(dir);
    }
    /* empty fields read back as the parser's defaults */
    qlora_model_config bare = small_llama();
    bare.model_type[0] = bare.hidden_act[0] = bare.rope.type_name[0] = '\0';
    bare.rms_norm_eps = 0;
    char *dir = path_in(tmp, "bare"), *config = path_in(dir, "config.json");
    ck_assert_qlora_ok(qlora_model_write_random(&bare, dir, 1, INIT_STD));
    qlora_model_config got, want = small_llama();
    want.rms_norm_eps = 1e-6;
    ck_assert_qlora_ok(qlora_model_config_from_json_file(config, &got));
    assert_same_config(&want, &got);
    free(config);
    free(dir);
    tu_rmtree(tmp);
    free(tmp);
}
END_TEST

START_TEST(bad_arguments_fail_naming_the_path_or_field) {
    qlora_model_config c = small_llama();
    char *tmp = tu_tempdir();
    char *file = path_in(tmp, "file"), *under_file = path_in(file, "model"), *missing = path_in(tmp, "no/such/model");
    tu_write_file(file, "x", 1);
    ck_assert_qlora_fails(qlora_model_write_random(&c, missing, 1, INIT_STD), QLORA_ERR_IO, missing);
    ck_assert_qlora_fails(qlora_model_write_random(&c, under_file, 1, INIT_STD), QLORA_ERR_IO, under_file);
    ck_assert_qlora_fails(qlora_model_write_random(&c, file, 1, INIT_STD), QLORA_ERR_IO, "not a directory");
    ck_assert_qlora_fails(qlora_model_write_random(NULL, tmp, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "cfg");
    ck_assert_qlora_fails(qlora_model_write_random(&c, NULL, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "dir");
    ck_assert_qlora_fails(qlora_model_write_random(&c, tmp, 1, -0.5), QLORA_ERR_INVALID_ARG, "init_std");
    ck_assert_qlora_fails(qlora_model_write_random(&c, tmp, 1, NAN), QLORA_ERR_INVALID_ARG, "init_std");
    qlora_model_config bad = c;
    bad.hidden_size = 0;
    ck_assert_qlora_fails(qlora_model_write_random(&bad, tmp, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "hidden_size");
    bad = c;
    bad.o_bias = 0;
    ck_assert_qlora_fails(qlora_model_write_random(&bad, tmp, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "attention_bias");
    bad = small_qwen2();
    bad.qkv_bias = 0;
    ck_assert_qlora_fails(qlora_model_write_random(&bad, tmp, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "qkv_bias");
    bad = c;
    snprintf(bad.model_type, sizeof bad.model_type, "gpt2");
    ck_assert_qlora_fails(qlora_model_write_random(&bad, tmp, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "gpt2");
    bad = c;
    bad.rope_theta = INFINITY;
    ck_assert_qlora_fails(qlora_model_write_random(&bad, tmp, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "rope_theta");
    bad = c;
    bad.rope.type = QLORA_ROPE_LINEAR;
    bad.rope.factor = NAN;
    ck_assert_qlora_fails(qlora_model_write_random(&bad, tmp, 1, INIT_STD), QLORA_ERR_INVALID_ARG, "RoPE factors");
    /* nothing was written by the refused calls */
    struct stat sb;
    ck_assert_int_ne(stat(missing, &sb), 0);
    char *config = path_in(tmp, "config.json");
    ck_assert_int_ne(stat(config, &sb), 0);
    free(config);
    free(file);
    free(under_file);
    free(missing);
    tu_rmtree(tmp);
    free(tmp);
}
END_TEST

int main(void) {
    Suite *s = suite_create("model_random");
    TCase *tc = tcase_create("model_random");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, writes_a_model_that_loads_and_runs);
    tcase_add_test(tc, same_arguments_same_bytes);
    tcase_add_test(tc, config_json_reads_back_as_the_config);
    tcase_add_test(tc, bad_arguments_fail_naming_the_path_or_field);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
