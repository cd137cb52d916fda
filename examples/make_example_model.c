/*
 * make-example-model: writes a small random Llama-style model directory in the Hugging Face
 * layout (config.json + model.safetensors in BF16), using only the public libqlora API.
 *
 *   make-example-model OUT_DIR [--layers N] [--hidden H] [--seed S]
 *
 * It is also the short example of the safetensors writer: open, declare every tensor, then
 * stream each tensor's bytes, then commit (the file appears atomically or not at all).
 * Weights are N(0, 0.02^2), the RMSNorm weights are ones, as a freshly initialised model.
 */
#include <qlora.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Fixed shape of the example; --hidden and --layers change the size. */
enum { VOCAB = 512, HEADS = 4 };

typedef struct model_shape {
    int64_t vocab, hidden, intermediate, layers, heads;
} model_shape;

/* One tensor of the checkpoint: name, shape [out, in] (or [n]), and how to fill it. */
typedef struct tensor_spec {
    char name[QLORA_NAME_MAX];
    int ndim;
    int64_t shape[2];
    int ones; /* 1: RMSNorm weight (all ones), 0: N(0, 0.02^2) */
} tensor_spec;

/* ---- random numbers: splitmix64 + Box-Muller (deterministic for a given --seed) */
static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double next_normal(uint64_t *state) {
    double u1 = ((double)(next_u64(state) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1]: log is finite */
    double u2 = (double)(next_u64(state) >> 11) * 0x1.0p-53;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* float -> bfloat16 bits, round to nearest even (values here are always finite). */
static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* ---- the tensor list of spec §2.2 (LlamaForCausalLM, untied embeddings) */
static void add_spec(tensor_spec *list, int *n, const char *name, int64_t rows, int64_t cols, int ones) {
    tensor_spec *t = &list[(*n)++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = cols > 0 ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->ones = ones;
}

static int build_specs(const model_shape *m, tensor_spec *list) {
    int n = 0;
    char name[QLORA_NAME_MAX];
    const int64_t H = m->hidden, I = m->intermediate;
    add_spec(list, &n, "model.embed_tokens.weight", m->vocab, H, 0);
    for (int64_t i = 0; i < m->layers; i++) {
        static const char *const proj[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                            "mlp.down_proj"};
        /* [out, in] of each projection; no GQA here, so q/k/v/o are all [H, H]. */
        const int64_t out[7] = {H, H, H, H, I, I, H}, in[7] = {H, H, H, H, H, H, I};
        snprintf(name, sizeof name, "model.layers.%lld.input_layernorm.weight", (long long)i);
        add_spec(list, &n, name, H, 0, 1);
        snprintf(name, sizeof name, "model.layers.%lld.post_attention_layernorm.weight", (long long)i);
        add_spec(list, &n, name, H, 0, 1);
        for (int p = 0; p < 7; p++) {
            snprintf(name, sizeof name, "model.layers.%lld.%s.weight", (long long)i, proj[p]);
            add_spec(list, &n, name, out[p], in[p], 0);
        }
    }
    add_spec(list, &n, "model.norm.weight", H, 0, 1);
    add_spec(list, &n, "lm_head.weight", m->vocab, H, 0);
    return n;
}

/* ---- config.json (spec §2.1) */
static int write_config(const char *dir, const model_shape *m) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "make-example-model: cannot create %s: %s\n", path, strerror(errno));
        return -1;
    }
    fprintf(f,
            "{\n"
            "  \"architectures\": [\"LlamaForCausalLM\"],\n"
            "  \"attention_bias\": false,\n"
            "  \"bos_token_id\": 1,\n"
            "  \"eos_token_id\": 2,\n"
            "  \"head_dim\": %lld,\n"
            "  \"hidden_act\": \"silu\",\n"
            "  \"hidden_size\": %lld,\n"
            "  \"initializer_range\": 0.02,\n"
            "  \"intermediate_size\": %lld,\n"
            "  \"max_position_embeddings\": 2048,\n"
            "  \"mlp_bias\": false,\n"
            "  \"model_type\": \"llama\",\n"
            "  \"num_attention_heads\": %lld,\n"
            "  \"num_hidden_layers\": %lld,\n"
            "  \"num_key_value_heads\": %lld,\n"
            "  \"rms_norm_eps\": 1e-05,\n"
            "  \"rope_scaling\": null,\n"
            "  \"rope_theta\": 10000.0,\n"
            "  \"tie_word_embeddings\": false,\n"
            "  \"torch_dtype\": \"bfloat16\",\n"
            "  \"use_cache\": true,\n"
            "  \"vocab_size\": %lld\n"
            "}\n",
            (long long)(m->hidden / m->heads), (long long)m->hidden, (long long)m->intermediate,
            (long long)m->heads, (long long)m->layers, (long long)m->heads, (long long)m->vocab);
    if (fclose(f) != 0) {
        fprintf(stderr, "make-example-model: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- model.safetensors, streamed one tensor at a time through the public writer */
static int write_weights(const char *dir, const tensor_spec *specs, int count, uint64_t seed) {
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);

    qlora_st_writer *w = NULL;
    if (qlora_st_writer_open(path, 0, &w) != QLORA_OK)  /* 0: one file, no sharding */
        goto fail;
    /* transformers rejects a __metadata__ without format (spec §1.4): always say "pt". */
    if (qlora_st_writer_set_metadata(w, "format", "pt") != QLORA_OK)
        goto fail;

    /* 1. Declare every tensor: the writer lays out the header before any data is written. */
    for (int i = 0; i < count; i++)
        if (qlora_st_writer_declare(w, specs[i].name, QLORA_BF16, specs[i].ndim, specs[i].shape) != QLORA_OK)
            goto fail;

    /* 2. Write each tensor's bytes. One buffer, sized for the largest tensor, is reused. */
    int64_t max_numel = 0;
    for (int i = 0; i < count; i++) {
        int64_t numel = specs[i].shape[0] * (specs[i].ndim == 2 ? specs[i].shape[1] : 1);
        if (numel > max_numel)
            max_numel = numel;
    }
    uint16_t *buf = malloc((size_t)max_numel * sizeof *buf);
    if (!buf) {
        qlora_st_writer_abort(w);
        fprintf(stderr, "make-example-model: out of memory\n");
        return -1;
    }
    uint64_t rng = seed;
    for (int i = 0; i < count; i++) {
        int64_t numel = specs[i].shape[0] * (specs[i].ndim == 2 ? specs[i].shape[1] : 1);
        for (int64_t j = 0; j < numel; j++)
            buf[j] = float_to_bf16(specs[i].ones ? 1.0f : (float)(0.02 * next_normal(&rng)));
        if (qlora_st_writer_write(w, specs[i].name, buf, (size_t)numel * sizeof *buf) != QLORA_OK) {
            free(buf);
            goto fail;
        }
    }
    free(buf);

    /* 3. Commit: fsync + rename. It frees the writer whether or not it succeeds. */
    qlora_st_writer *committing = w;
    w = NULL;
    if (qlora_st_writer_commit(committing) != QLORA_OK)
        goto fail;
    return 0;

fail:
    fprintf(stderr, "make-example-model: %s\n", qlora_last_error());
    if (w)
        qlora_st_writer_abort(w); /* leaves no partial file behind */
    return -1;
}

static int parse_int(const char *opt, const char *text, long long min, long long max, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < min || v > max) {
        fprintf(stderr, "make-example-model: %s expects an integer in %lld..%lld, got '%s'\n", opt, min, max, text);
        return -1;
    }
    *out = v;
    return 0;
}

static void usage(FILE *to) {
    fprintf(to, "usage: make-example-model OUT_DIR [--layers N] [--hidden H] [--seed S]\n"
                "Writes a random Llama-style model (config.json + BF16 model.safetensors).\n"
                "Defaults: 2 layers, hidden 256 (intermediate 688), 4 heads, vocab 512, seed 1.\n");
}

int main(int argc, char **argv) {
    const char *out_dir = NULL;
    long long layers = 2, hidden = 256, seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        int takes_value = !strcmp(a, "--layers") || !strcmp(a, "--hidden") || !strcmp(a, "--seed");
        if (takes_value && i + 1 >= argc) {
            fprintf(stderr, "make-example-model: %s needs a value\n", a);
            return 1;
        }
        if (!strcmp(a, "--layers")) {
            if (parse_int(a, argv[++i], 1, 1024, &layers))
                return 1;
        } else if (!strcmp(a, "--hidden")) {
            /* head_dim = hidden / 4 must be even for RoPE: hidden is a multiple of 8. */
            if (parse_int(a, argv[++i], 8, 65536, &hidden))
                return 1;
            if (hidden % (2 * HEADS)) {
                fprintf(stderr, "make-example-model: --hidden must be a multiple of %d\n", 2 * HEADS);
                return 1;
            }
        } else if (!strcmp(a, "--seed")) {
            if (parse_int(a, argv[++i], 0, INT64_MAX, &seed))
                return 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "make-example-model: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        } else if (!out_dir) {
            out_dir = a;
        } else {
            fprintf(stderr, "make-example-model: unexpected argument '%s'\n", a);
            return 1;
        }
    }
    if (!out_dir) {
        usage(stderr);
        return 1;
    }

    /* intermediate = ceil(8/3 * hidden) rounded up to a multiple of 16 (688 for hidden 256). */
    const long long intermediate = ((8 * hidden + 2) / 3 + 15) / 16 * 16;
    model_shape m = {VOCAB, hidden, intermediate, layers, HEADS};

    if (mkdir(out_dir, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "make-example-model: cannot create %s: %s\n", out_dir, strerror(errno));
        return 3;
    }
    /* embed_tokens, norm, lm_head + per layer: 2 norms and 7 projections */
    tensor_spec *specs = calloc(3 + 9 * (size_t)layers, sizeof *specs);
    if (!specs) {
        fprintf(stderr, "make-example-model: out of memory\n");
        return 3;
    }
    int count = build_specs(&m, specs);
    int rc = write_config(out_dir, &m) || write_weights(out_dir, specs, count, (uint64_t)seed) ? 3 : 0;
    free(specs);
    if (rc == 0)
        printf("wrote %s: %lld layers, hidden %lld, intermediate %lld, vocab %lld, %d tensors (BF16)\n", out_dir,
               layers, hidden, (long long)m.intermediate, (long long)m.vocab, count);
    return rc;
}
