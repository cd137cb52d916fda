/* The embedded default model of qlora-ft (ft_default.h). */
#include "ft_default.h"
#include "ft_fs.h"

#include <qlora.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FT_INIT_STD 0.02 /* transformers' initializer_range default */

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint16_t bf16_from_float(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* n BF16 values: N(0, std²) from (seed, tensor index) by Box-Muller, or all `fill` when std = 0. */
static void fill(uint16_t *dst, int64_t n, double std, float value, uint64_t seed) {
    uint64_t s = seed;
    for (int64_t i = 0; i < n; i++) {
        if (std == 0.0) {
            dst[i] = bf16_from_float(value);
            continue;
        }
        double u1 = ((double)(splitmix64(&s) >> 11) + 1.0) * 0x1.0p-53;
        double u2 = (double)(splitmix64(&s) >> 11) * 0x1.0p-53;
        dst[i] = bf16_from_float((float)(std * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2)));
    }
}

typedef struct tensor_spec {
    char name[128];
    int64_t rows, cols; /* cols 0: a vector */
    double std;
} tensor_spec;

static int specs_for(const qlora_model_config *c, tensor_spec **out, int *count) {
    const int64_t H = c->hidden_size, I = c->intermediate_size, qd = c->num_heads * c->head_dim;
    const int64_t kvd = c->num_kv_heads * c->head_dim;
    int n = 3 + (int)c->num_layers * 9;
    tensor_spec *s = calloc((size_t)n, sizeof *s);
    if (!s)
        return -1;
    int k = 0;
    snprintf(s[k].name, sizeof s[k].name, "model.embed_tokens.weight");
    s[k].rows = c->vocab_size, s[k].cols = H, s[k++].std = FT_INIT_STD;
    for (int64_t l = 0; l < c->num_layers; l++) {
        const char *names[9] = {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj"};
        const int64_t rows[9] = {H, qd, kvd, kvd, H, H, I, I, H}, cols[9] = {0, H, H, H, qd, 0, H, H, I};
        for (int j = 0; j < 9; j++, k++) {
            snprintf(s[k].name, sizeof s[k].name, "model.layers.%lld.%s.weight", (long long)l, names[j]);
            s[k].rows = rows[j], s[k].cols = cols[j], s[k].std = cols[j] ? FT_INIT_STD : 0.0;
        }
    }
    snprintf(s[k].name, sizeof s[k].name, "model.norm.weight");
    s[k].rows = H, s[k].cols = 0, s[k++].std = 0.0;
    snprintf(s[k].name, sizeof s[k].name, "lm_head.weight");
    s[k].rows = c->vocab_size, s[k].cols = H, s[k++].std = FT_INIT_STD;
    *out = s;
    *count = k;
    return 0;
}

static int write_weights(const char *path, const qlora_model_config *c, char *err, size_t cap) {
    tensor_spec *specs;
    int count;
    if (specs_for(c, &specs, &count) != 0) {
        snprintf(err, cap, "out of memory");
        return -1;
    }
    qlora_st_writer *w = NULL;
    qlora_status st = qlora_st_writer_open(path, 0, &w);
    for (int i = 0; st == QLORA_OK && i < count; i++) {
        int64_t shape[2] = {specs[i].rows, specs[i].cols};
        st = qlora_st_writer_declare(w, specs[i].name, QLORA_BF16, specs[i].cols ? 2 : 1, shape);
    }
    uint16_t *buf = NULL;
    for (int i = 0; st == QLORA_OK && i < count; i++) {
        int64_t n = specs[i].rows * (specs[i].cols ? specs[i].cols : 1);
        uint16_t *grown = realloc(buf, (size_t)n * sizeof *buf);
        if (!grown) {
            snprintf(err, cap, "out of memory for tensor %s", specs[i].name);
            qlora_st_writer_abort(w);
            free(buf);
            free(specs);
            return -1;
        }
        buf = grown;
        fill(buf, n, specs[i].std, 1.0f, 0x716c6f7261ULL + (uint64_t)i * 0x9e3779b97f4a7c15ULL);
        st = qlora_st_writer_write(w, specs[i].name, buf, (size_t)n * sizeof *buf);
    }
    free(buf);
    free(specs);
    if (st == QLORA_OK)
        st = qlora_st_writer_commit(w);
    else
        qlora_st_writer_abort(w);
    if (st != QLORA_OK) {
        snprintf(err, cap, "%s", qlora_last_error());
        return -1;
    }
    return 0;
}

int ft_default_model_write(const char *dir, char *err, size_t cap) {
    char tmp[4200], path[4300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (ft_exists(path))
        return 0;
    if (ft_tmpdir_for(dir, tmp, sizeof tmp, err, cap) != 0)
        return -1;
    snprintf(path, sizeof path, "%s/config.json", tmp);
    if (ft_write_file(path, ft_default_config, ft_default_config_len, err, cap) != 0)
        return -1;
    snprintf(path, sizeof path, "%s/tokenizer.json", tmp);
    if (ft_write_file(path, ft_default_tokenizer, ft_default_tokenizer_len, err, cap) != 0)
        return -1;
    qlora_model_config cfg;
    snprintf(path, sizeof path, "%s/config.json", tmp);
    if (qlora_model_config_from_json_file(path, &cfg) != QLORA_OK) {
        snprintf(err, cap, "embedded default config: %s", qlora_last_error());
        return -1;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    if (write_weights(path, &cfg, err, cap) != 0)
        return -1;
    return ft_dir_commit(tmp, dir, err, cap);
}
