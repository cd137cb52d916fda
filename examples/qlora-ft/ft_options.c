/* Options of `qlora-ft train` (ft_train.h): defaults from the QLoRA paper, parsing, checks. */
#include "ft_train.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void ft_train_defaults(ft_train_opts *o) {
    memset(o, 0, sizeof *o);
    o->out_dir = "qlora-out";
    o->format = "auto";
    o->device = "auto";
    o->rank = 64;
    o->alpha = 16.0f;
    o->dropout = 0.05f;
    o->targets = QLORA_TARGET_ALL_LINEAR;
    o->lr = 2e-4;
    o->schedule = QLORA_LR_CONSTANT;
    o->warmup_ratio = 0.03;
    o->max_grad_norm = 0.3;
    o->batch = 16;
    o->micro_batch = 1;
    o->seq = 512;
    o->eval_split = 0.02;
    o->seed = 42;
    o->grad_checkpointing = 1;
}

void ft_train_embedded_defaults(ft_train_opts *o) {
    /* A randomly initialised base learns only through its adapters: a higher rate, short
     * packed sequences, and enough steps for the loss to fall well below its start. */
    o->rank = 16;
    o->alpha = 32.0f;
    o->lr = 2e-3;
    o->batch = 8;
    o->micro_batch = 4;
    o->seq = 128;
    o->steps = 100;
    o->eval_split = 0.05;
    o->eval_every = 20;
    o->save_every = 20;
    o->packing = 1;
}

void ft_train_usage(FILE *f) {
    fputs("usage: qlora-ft train --model DIR --data FILE [--out DIR] [options]\n"
          "       qlora-ft [--out DIR] [--metrics FILE] [options]   (the embedded default model and data)\n"
          "\n"
          "Finetunes LoRA adapters on a 4-bit (NF4) base model and writes them as a PEFT adapter.\n"
          "\n"
          "  --model DIR           Hugging Face model directory (config.json, *.safetensors, tokenizer.json)\n"
          "  --data FILE           .json or .jsonl: alpaca, text, prompt/completion or chat messages\n"
          "  --format NAME         auto (default), alpaca, text, prompt-completion, chat\n"
          "  --out DIR             output directory (default qlora-out): adapter/, checkpoints/, loss.svg\n"
          "  --rank N              LoRA rank r (64)\n"
          "  --alpha X             lora_alpha (16)\n"
          "  --dropout P           LoRA dropout (0.05)\n"
          "  --rslora              scale by alpha/sqrt(r) instead of alpha/r\n"
          "  --targets LIST        all-linear (default), attention, or names: q_proj,v_proj,...\n"
          "  --lr X                peak learning rate (2e-4)\n"
          "  --schedule NAME       constant (default), linear, cosine\n"
          "  --warmup-ratio X      fraction of the steps spent warming up (0.03)\n"
          "  --max-grad-norm X     gradient clipping, 0 = off (0.3)\n"
          "  --weight-decay X      AdamW decoupled weight decay (0)\n"
          "  --batch N             sequences per optimizer step (16)\n"
          "  --micro-batch N       sequences per forward/backward; divides --batch (1)\n"
          "  --seq N               tokens per sequence; longer examples are truncated (512)\n"
          "  --steps N | --epochs N  length of the run (default: 1 epoch)\n"
          "  --eval-split X        held-out fraction for the evaluation loss (0.02)\n"
          "  --eval-every N        evaluate every N steps (default: at the end)\n"
          "  --save-every N        checkpoint every N steps (default: at the end)\n"
          "  --seed S              data order, adapter init and dropout (42)\n"
          "  --gpu-mem-limit GB    device memory for optimizer pages; the rest pages to host\n"
          "  --packing             pack several examples per sequence\n"
          "  --train-on-prompt     loss on the prompt tokens too\n"
          "  --skip-bad-lines      skip malformed data records instead of stopping\n"
          "  --no-grad-checkpointing  keep all activations instead of recomputing layers\n"
          "  --device NAME         auto (default: CUDA when a GPU is present), cpu, cuda\n"
          "  --threads N           CPU threads (default: all)\n"
          "  --metrics FILE        one JSON object per step (.jsonl)\n"
          "  --resume              continue from the latest checkpoint in --out\n"
          "\n"
          "Exit codes: 0 done, 1 failure, 2 usage error, 130 interrupted (a checkpoint was saved).\n",
          f);
}

static int usage_error(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "qlora-ft train: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n(qlora-ft train --help lists the options)\n");
    return 2;
}

static int parse_i64(const char *opt, const char *s, int64_t min, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < min) {
        char bound[32];
        snprintf(bound, sizeof bound, "%lld", (long long)min);
        return usage_error("%s needs an integer >= %s", opt, bound);
    }
    *out = v;
    return 0;
}

static int parse_f64(const char *opt, const char *s, double min, double max, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !isfinite(v) || v < min || v > max) {
        char range[64];
        snprintf(range, sizeof range, "[%g, %g]", min, max);
        return usage_error("%s needs a number in %s", opt, range);
    }
    *out = v;
    return 0;
}

static int parse_targets(const char *s, uint32_t *out) {
    if (strcmp(s, "all-linear") == 0) {
        *out = QLORA_TARGET_ALL_LINEAR;
        return 0;
    }
    if (strcmp(s, "attention") == 0) {
        *out = QLORA_TARGET_ATTENTION;
        return 0;
    }
    *out = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int j = 0;
        while (qlora_target_name(j) && strcmp(qlora_target_name(j), tok) != 0)
            j++;
        if (!qlora_target_name(j))
            return usage_error("--targets: unknown module '%s' (all-linear, attention, or a list of %s)", tok,
                               "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj");
        *out |= 1u << j;
    }
    return *out ? 0 : usage_error("--targets %s names no module%s", s, "");
}

int ft_train_parse(int argc, char **argv, ft_train_opts *o, int *help) {
    *help = 0;
    for (int i = 0; i < argc; i++) {
        const char *opt = argv[i];
        const char *val = NULL;
        char name[64];
        /* --opt=VALUE or --opt VALUE */
        const char *eq = strchr(opt, '=');
        if (strncmp(opt, "--", 2) == 0 && eq && (size_t)(eq - opt) < sizeof name) {
            memcpy(name, opt, (size_t)(eq - opt));
            name[eq - opt] = '\0';
            opt = name;
            val = eq + 1;
        }
        static const char *const flags[] = {"--help", "-h", "--rslora", "--packing", "--resume", "--train-on-prompt",
                                            "--skip-bad-lines", "--no-grad-checkpointing", NULL};
        static const char *const valued[] = {
            "--model", "--data", "--out", "--metrics", "--format", "--device", "--rank", "--alpha", "--dropout",
            "--targets", "--lr", "--schedule", "--warmup-ratio", "--max-grad-norm", "--weight-decay", "--batch",
            "--micro-batch", "--seq", "--steps", "--epochs", "--eval-split", "--eval-every", "--save-every",
            "--seed", "--gpu-mem-limit", "--threads", NULL};
        int is_flag = 0, is_valued = 0;
        for (int f = 0; flags[f]; f++)
            is_flag |= strcmp(opt, flags[f]) == 0;
        for (int f = 0; valued[f]; f++)
            is_valued |= strcmp(opt, valued[f]) == 0;
        if (!is_flag && !is_valued)
            return usage_error(strncmp(opt, "--", 2) ? "unexpected argument '%s'%s" : "unknown option '%s'%s", opt,
                               "");
        if (is_flag && val)
            return usage_error("%s takes no value%s", opt, "");
        if (!is_flag && !val) {
            if (i + 1 >= argc)
                return usage_error("%s needs a value%s", opt, "");
            val = argv[++i];
        }
        int rc = 0;
        double d;
        int64_t n;
        if (!strcmp(opt, "--help") || !strcmp(opt, "-h")) {
            ft_train_usage(stdout);
            *help = 1;
            return 1;
        } else if (!strcmp(opt, "--rslora")) {
            o->use_rslora = 1;
        } else if (!strcmp(opt, "--packing")) {
            o->packing = 1;
        } else if (!strcmp(opt, "--resume")) {
            o->resume = 1;
        } else if (!strcmp(opt, "--train-on-prompt")) {
            o->train_on_prompt = 1;
        } else if (!strcmp(opt, "--skip-bad-lines")) {
            o->skip_bad_lines = 1;
        } else if (!strcmp(opt, "--no-grad-checkpointing")) {
            o->grad_checkpointing = 0;
        } else if (!strcmp(opt, "--model")) {
            o->model_dir = val;
        } else if (!strcmp(opt, "--data")) {
            o->data_path = val;
        } else if (!strcmp(opt, "--out")) {
            o->out_dir = val;
        } else if (!strcmp(opt, "--metrics")) {
            o->metrics_path = val;
        } else if (!strcmp(opt, "--format")) {
            o->format = val;
        } else if (!strcmp(opt, "--device")) {
            if (strcmp(val, "auto") && strcmp(val, "cpu") && strcmp(val, "cuda"))
                return usage_error("--device %s: expected auto, cpu or cuda%s", val, "");
            o->device = val;
        } else if (!strcmp(opt, "--rank")) {
            rc = parse_i64(opt, val, 1, &n);
            o->rank = (int)(n > 65536 ? 65536 : n);
        } else if (!strcmp(opt, "--alpha")) {
            rc = parse_f64(opt, val, 1e-6, 1e6, &d);
            o->alpha = (float)d;
        } else if (!strcmp(opt, "--dropout")) {
            rc = parse_f64(opt, val, 0.0, 0.99, &d);
            o->dropout = (float)d;
        } else if (!strcmp(opt, "--targets")) {
            rc = parse_targets(val, &o->targets);
        } else if (!strcmp(opt, "--lr")) {
            rc = parse_f64(opt, val, 0.0, 10.0, &o->lr);
        } else if (!strcmp(opt, "--schedule")) {
            if (!strcmp(val, "constant"))
                o->schedule = QLORA_LR_CONSTANT;
            else if (!strcmp(val, "linear"))
                o->schedule = QLORA_LR_LINEAR;
            else if (!strcmp(val, "cosine"))
                o->schedule = QLORA_LR_COSINE;
            else
                return usage_error("--schedule %s: expected constant, linear or cosine%s", val, "");
        } else if (!strcmp(opt, "--warmup-ratio")) {
            rc = parse_f64(opt, val, 0.0, 1.0, &o->warmup_ratio);
        } else if (!strcmp(opt, "--max-grad-norm")) {
            rc = parse_f64(opt, val, 0.0, 1e9, &o->max_grad_norm);
        } else if (!strcmp(opt, "--weight-decay")) {
            rc = parse_f64(opt, val, 0.0, 1.0, &o->weight_decay);
        } else if (!strcmp(opt, "--batch")) {
            rc = parse_i64(opt, val, 1, &o->batch);
        } else if (!strcmp(opt, "--micro-batch")) {
            rc = parse_i64(opt, val, 1, &o->micro_batch);
        } else if (!strcmp(opt, "--seq")) {
            rc = parse_i64(opt, val, 2, &o->seq);
        } else if (!strcmp(opt, "--steps")) {
            rc = parse_i64(opt, val, 1, &o->steps);
        } else if (!strcmp(opt, "--epochs")) {
            rc = parse_i64(opt, val, 1, &o->epochs);
        } else if (!strcmp(opt, "--eval-split")) {
            rc = parse_f64(opt, val, 0.0, 0.5, &o->eval_split);
        } else if (!strcmp(opt, "--eval-every")) {
            rc = parse_i64(opt, val, 0, &o->eval_every);
        } else if (!strcmp(opt, "--save-every")) {
            rc = parse_i64(opt, val, 0, &o->save_every);
        } else if (!strcmp(opt, "--seed")) {
            rc = parse_i64(opt, val, 0, &n);
            o->seed = (uint64_t)n;
        } else if (!strcmp(opt, "--gpu-mem-limit")) {
            rc = parse_f64(opt, val, 0.0, 1e6, &o->gpu_mem_limit_gb);
        } else if (!strcmp(opt, "--threads")) {
            rc = parse_i64(opt, val, 0, &n);
            o->threads = (int)(n > 4096 ? 4096 : n);
        } else {
            return usage_error("unknown option '%s'%s", opt, "");
        }
        if (rc)
            return rc;
    }
    if (o->batch % o->micro_batch != 0) {
        char b[64];
        snprintf(b, sizeof b, "%lld by --micro-batch %lld", (long long)o->batch, (long long)o->micro_batch);
        return usage_error("--batch must be divisible by --micro-batch: %s%s", b, "");
    }
    if (o->steps && o->epochs)
        return usage_error("give --steps or --epochs, not both%s%s", "", "");
    if ((o->model_dir == NULL) != (o->data_path == NULL))
        return usage_error("give both --model and --data, or neither (the embedded default)%s%s", "", "");
    return 0;
}
