/*
 * make-example-model: writes a small random Llama-style model directory in the Hugging Face
 * layout (config.json + model.safetensors in BF16), using only the public libqlora API.
 *
 *   make-example-model OUT_DIR [--layers N] [--hidden H] [--seed S]
 *
 * The model is a qlora_model_config filled in by hand and handed to qlora_model_write_random:
 * weights N(0, 0.02^2) from a generator seeded by --seed (the same bytes on every machine),
 * RMSNorm weights ones, as a freshly initialised model.
 */
#include <qlora.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Fixed shape of the example; --hidden and --layers change the size. */
enum { VOCAB = 512, HEADS = 4 };
#define INIT_STD 0.02 /* transformers' initializer_range default */

/* A LlamaForCausalLM without grouped-query attention or biases, untied embeddings. */
static qlora_model_config example_config(long long hidden, long long intermediate, long long layers) {
    qlora_model_config c;
    memset(&c, 0, sizeof c);
    c.hidden_size = hidden;
    c.intermediate_size = intermediate;
    c.num_layers = layers;
    c.num_heads = c.num_kv_heads = HEADS;
    c.head_dim = hidden / HEADS;
    c.vocab_size = VOCAB;
    c.rope_theta = 10000.0;
    c.rms_norm_eps = 1e-5;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    snprintf(c.hidden_act, sizeof c.hidden_act, "silu");
    return c;
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
    qlora_model_config cfg = example_config(hidden, intermediate, layers);
    if (qlora_model_write_random(&cfg, out_dir, (uint64_t)seed, INIT_STD) != QLORA_OK) {
        fprintf(stderr, "make-example-model: %s\n", qlora_last_error());
        return 3;
    }
    /* embed_tokens, norm, lm_head + per layer: 2 norms and 7 projections */
    printf("wrote %s: %lld layers, hidden %lld, intermediate %lld, vocab %d, %lld tensors (BF16)\n", out_dir,
           layers, hidden, intermediate, VOCAB, 3 + 9 * layers);
    return 0;
}
