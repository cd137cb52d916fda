/* qlora-ft generate: try a base model with or without an adapter (ft_generate.h). */
#include "ft_adapter.h"
#include "ft_generate.h"
#include "ft_template.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fputs("usage: qlora-ft generate [--model DIR] [--adapter DIR] --prompt TEXT [options]\n"
          "\n"
          "Generates text with the 4-bit base model, with the LoRA adapter applied when --adapter is given\n"
          "(--model defaults to the adapter's base_model_name_or_path).\n"
          "\n"
          "  --max-new N        tokens to generate (128)\n"
          "  --temperature T    0 = greedy (default 0.7)\n"
          "  --top-p P          nucleus sampling (0.9)\n"
          "  --seed S           sampling seed (0)\n"
          "  --template NAME    none (default: the prompt as given), alpaca (the instruction template of\n"
          "                     the alpaca data format), chat (one human turn)\n"
          "  --no-adapter       load the adapter's base but generate without it (to compare)\n"
          "  --dump-logits FILE also write the prompt's logits (F32 [T, V], tensor \"logits\", and its\n"
          "                     \"input_ids\") to a safetensors file, for tests/interop/check_peft_adapter.py\n"
          "  --device NAME      auto, cpu, cuda\n"
          "\n"
          "Exit codes: 0 done, 1 failure, 2 usage error.\n",
          f);
}

static int usage_error(const char *msg, const char *arg) {
    fprintf(stderr, "qlora-ft generate: %s%s\n(qlora-ft generate --help lists the options)\n", msg, arg);
    return 2;
}

typedef struct stream {
    const qlora_tokenizer *tok;
    int32_t *ids;
    int64_t n;
    size_t printed;
    char *text;
    size_t cap;
} stream;

/* Prints what the new token adds to the decoded text (a token may end inside a character). */
static int print_token(int32_t id, void *user) {
    stream *s = user;
    s->ids[s->n++] = id;
    size_t need = 0;
    if (qlora_tokenizer_decode(s->tok, s->ids, (size_t)s->n, 1, s->text, s->cap, &need) != QLORA_OK)
        return 0;
    size_t len = strlen(s->text);
    /* an incomplete character decodes to U+FFFD for now: wait for the next token */
    int partial = len >= 3 && memcmp(s->text + len - 3, "\xef\xbf\xbd", 3) == 0;
    if (len > s->printed && !partial) {
        fwrite(s->text + s->printed, 1, len - s->printed, stdout);
        fflush(stdout);
        s->printed = len;
    }
    return 0;
}

/* The prompt as training rendered it: an alpaca instruction or a one-turn chat with an empty
 * response, cut where the response would start. Returns a malloc'ed string or NULL. */
static char *templated(const char *prompt, const char *name, char *why, size_t cap) {
    cJSON *rec = cJSON_CreateObject();
    ft_format f = FT_FORMAT_ALPACA;
    if (!strcmp(name, "alpaca")) {
        cJSON_AddStringToObject(rec, "instruction", prompt);
        cJSON_AddStringToObject(rec, "output", "");
    } else {
        f = FT_FORMAT_CHAT;
        cJSON *msgs = cJSON_AddArrayToObject(rec, "messages"), *m = cJSON_CreateObject(), *a = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "user");
        cJSON_AddStringToObject(m, "content", prompt);
        cJSON_AddStringToObject(a, "role", "assistant");
        cJSON_AddStringToObject(a, "content", "");
        cJSON_AddItemToArray(msgs, m);
        cJSON_AddItemToArray(msgs, a);
    }
    ft_render r;
    memset(&r, 0, sizeof r);
    char *out = NULL;
    if (ft_render_record(rec, f, &r, why, cap) == 0) {
        size_t end = r.len;
        for (int i = r.n - 1; i >= 0; i--)
            if (r.piece[i].response)
                end = r.piece[i].off;
        out = malloc(end + 1);
        if (out) {
            memcpy(out, r.text, end);
            out[end] = '\0';
        }
    }
    ft_render_free(&r);
    cJSON_Delete(rec);
    return out;
}

/* The prompt's logits, as tests/interop/check_peft_adapter.py compares them with PEFT's. */
static int dump_logits(qlora_model *model, const int32_t *ids, int64_t n, const char *path) {
    qlora_model_config cfg;
    qlora_model_get_config(model, &cfg);
    float *logits = malloc((size_t)(n * cfg.vocab_size) * sizeof *logits);
    qlora_st_writer *w = NULL;
    int64_t shape[2] = {n, cfg.vocab_size};
    qlora_status st = logits ? qlora_model_forward(model, ids, NULL, NULL, n, NULL, NULL, logits) : QLORA_ERR_OUT_OF_MEMORY;
    if (st == QLORA_OK)
        st = qlora_st_writer_open(path, 0, &w);
    if (st == QLORA_OK && (qlora_st_writer_declare(w, "input_ids", QLORA_I32, 1, &n) != QLORA_OK ||
                           qlora_st_writer_declare(w, "logits", QLORA_F32, 2, shape) != QLORA_OK ||
                           qlora_st_writer_write(w, "input_ids", ids, (size_t)n * sizeof *ids) != QLORA_OK ||
                           qlora_st_writer_write(w, "logits", logits, (size_t)(n * cfg.vocab_size) * 4) != QLORA_OK)) {
        qlora_st_writer_abort(w);
        w = NULL;
        st = QLORA_ERR_IO;
    }
    if (w)
        st = qlora_st_writer_commit(w);
    free(logits);
    if (st != QLORA_OK) {
        fprintf(stderr, "qlora-ft generate: --dump-logits %s: %s\n", path, logits ? qlora_last_error() : "out of memory");
        return -1;
    }
    return 0;
}

int ft_generate_main(int argc, char **argv) {
    const char *model_dir = NULL, *adapter_dir = NULL, *prompt = NULL, *device = "auto", *template = "none";
    const char *logits_path = NULL;
    qlora_generate_opts g = qlora_generate_default_opts();
    g.temperature = 0.7f;
    g.top_p = 0.9f;
    int no_adapter = 0;
    for (int i = 0; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(o, "--no-adapter")) {
            no_adapter = 1;
            continue;
        }
        if (i + 1 >= argc)
            return usage_error("missing value or unknown option: ", o);
        const char *v = argv[++i];
        char *end = NULL;
        errno = 0;
        if (!strcmp(o, "--model")) {
            model_dir = v;
        } else if (!strcmp(o, "--adapter")) {
            adapter_dir = v;
        } else if (!strcmp(o, "--prompt")) {
            prompt = v;
        } else if (!strcmp(o, "--device")) {
            device = v;
        } else if (!strcmp(o, "--dump-logits")) {
            logits_path = v;
        } else if (!strcmp(o, "--template")) {
            if (strcmp(v, "none") && strcmp(v, "alpaca") && strcmp(v, "chat"))
                return usage_error("--template must be none, alpaca or chat, not ", v);
            template = v;
        } else if (!strcmp(o, "--max-new")) {
            g.max_new_tokens = strtoll(v, &end, 10);
            if (*end || errno || g.max_new_tokens < 1 || g.max_new_tokens > 1000000)
                return usage_error("--max-new needs an integer in [1, 1000000], not ", v);
        } else if (!strcmp(o, "--temperature")) {
            g.temperature = strtof(v, &end);
            if (*end || errno || !(g.temperature >= 0.0f) || g.temperature > 100.0f)
                return usage_error("--temperature needs a number in [0, 100], not ", v);
        } else if (!strcmp(o, "--top-p")) {
            g.top_p = strtof(v, &end);
            if (*end || errno || !(g.top_p > 0.0f && g.top_p <= 1.0f))
                return usage_error("--top-p needs a number in (0, 1], not ", v);
        } else if (!strcmp(o, "--seed")) {
            g.seed = strtoull(v, &end, 10);
            if (*end || errno)
                return usage_error("--seed needs a non-negative integer, not ", v);
        } else {
            return usage_error("unknown option ", o);
        }
    }
    if (!prompt)
        return usage_error("--prompt TEXT is required", "");
    if (strcmp(device, "auto") && strcmp(device, "cpu") && strcmp(device, "cuda"))
        return usage_error("--device must be auto, cpu or cuda, not ", device);
    char err[1024] = "";
    char *rendered = NULL;
    if (strcmp(template, "none")) {
        rendered = templated(prompt, template, err, sizeof err);
        if (!rendered) {
            fprintf(stderr, "qlora-ft generate: --template %s: %s\n", template, err[0] ? err : "out of memory");
            return 1;
        }
        prompt = rendered;
    }
    ft_adapter_config acfg;
    memset(&acfg, 0, sizeof acfg);
    if (adapter_dir && ft_adapter_read_config(adapter_dir, &acfg, err, sizeof err) != 0) {
        fprintf(stderr, "qlora-ft generate: %s\n", err);
        free(rendered);
        return 1;
    }
    if (!model_dir)
        model_dir = adapter_dir ? acfg.base_model : NULL;
    if (!model_dir || !*model_dir) {
        free(rendered);
        return usage_error("--model DIR is required (or an --adapter whose config names its base)", "");
    }

    int rc = 1;
    qlora_ctx *ctx = NULL;
    qlora_tokenizer *tok = NULL;
    qlora_model *model = NULL;
    int32_t *ids = NULL, *out = NULL;
    stream s;
    memset(&s, 0, sizeof s);
    qlora_ctx_params p = qlora_ctx_default_params();
    if (!strcmp(device, "cuda") || (!strcmp(device, "auto") && qlora_has_cuda_backend() && qlora_cuda_device_count() > 0))
        p.backend = QLORA_BACKEND_CUDA;
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    qlora_model_load_opts lo = qlora_model_load_default_opts();
    lo.lora.rank = adapter_dir ? acfg.rank : 0;
    lo.lora.alpha = acfg.alpha;
    lo.lora.use_rslora = acfg.use_rslora;
    lo.lora.dropout = 0.0f;
    lo.targets = adapter_dir ? acfg.targets : QLORA_TARGET_ALL_LINEAR;
    size_t n_ids = 0;
    if (qlora_ctx_create(&p, &ctx) != QLORA_OK || qlora_tokenizer_load(path, &tok) != QLORA_OK ||
        qlora_model_load(ctx, model_dir, &lo, &model) != QLORA_OK ||
        qlora_tokenizer_encode(tok, prompt, strlen(prompt), 0, NULL, 0, &n_ids) != QLORA_OK) {
        fprintf(stderr, "qlora-ft generate: %s\n", qlora_last_error());
        goto done;
    }
    if (adapter_dir && ft_adapter_load(model, adapter_dir, err, sizeof err) != 0) {
        fprintf(stderr, "qlora-ft generate: %s\n", err);
        goto done;
    }
    if (adapter_dir && no_adapter && qlora_model_enable_adapter(model, "default", 0) != QLORA_OK) {
        fprintf(stderr, "qlora-ft generate: %s\n", qlora_last_error());
        goto done;
    }
    /* BOS + the prompt, as training examples start (the tokenizer's post-processor may also
     * append EOS, which would tell the model the text is over) */
    const int32_t bos = qlora_tokenizer_bos_id(tok);
    const size_t lead = bos >= 0 ? 1 : 0;
    ids = malloc((n_ids + lead) * sizeof *ids);
    out = malloc((size_t)g.max_new_tokens * sizeof *out);
    s.cap = 64 + (size_t)g.max_new_tokens * 64;
    s.text = malloc(s.cap);
    if (!ids || !out || !s.text ||
        qlora_tokenizer_encode(tok, prompt, strlen(prompt), 0, ids + lead, n_ids, &n_ids) != QLORA_OK) {
        fprintf(stderr, "qlora-ft generate: %s\n", ids && out && s.text ? qlora_last_error() : "out of memory");
        goto done;
    }
    if (lead)
        ids[0] = bos;
    n_ids += lead;
    s.tok = tok;
    s.ids = out;
    g.eos_id = qlora_tokenizer_eos_id(tok);
    g.on_token = print_token;
    g.user = &s;
    int64_t n_out = 0;
    if (logits_path && n_ids > 0 && dump_logits(model, ids, (int64_t)n_ids, logits_path) != 0)
        goto done;
    if (n_ids == 0) {
        fprintf(stderr, "qlora-ft generate: the prompt encodes to no tokens\n");
        goto done;
    }
    if (qlora_model_generate(model, ids, (int64_t)n_ids, &g, out, g.max_new_tokens, &n_out) != QLORA_OK) {
        fprintf(stderr, "\nqlora-ft generate: %s\n", qlora_last_error());
        goto done;
    }
    printf("\n");
    rc = 0;
done:
    free(rendered);
    free(s.text);
    free(ids);
    free(out);
    qlora_model_free(model);
    qlora_tokenizer_free(tok);
    qlora_ctx_free(ctx);
    return rc;
}
