/*
 * qlora-mem: where the memory of finetuning a Llama-family model goes, before running it.
 * Prints the analytic estimate (qlora_mem_estimate, formulas in docs/memory.md) for 16-bit
 * full finetuning, 16-bit LoRA and QLoRA side by side, as text, one JSON object, or a stacked
 * bar chart in SVG; --fit answers which training settings fit a GPU. Amounts print in decimal
 * GB, MB or kB, one unit per table picked from its largest amount; --json stays in exact bytes.
 * Public libqlora API only.
 */
#include <qlora.h>

#include <cjson/cJSON.h> /* the --json object */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json_splice.h" /* tool_strbuf */
#include "tool_cli.h"
#include "tool_files.h"

/* Exit codes (documented in --help). */
enum {
    EXIT_USAGE = TOOL_EXIT_USAGE, /* bad command line */
    EXIT_INPUT = 2, /* unknown preset, unreadable or malformed config.json, settings out of range */
    EXIT_OUTPUT = 3  /* the SVG file cannot be written */
};

static const char *const PROG = "qlora-mem";

/* Room left on the GPU for what the estimate does not cover: the CUDA context, cuBLAS
 * workspaces and allocator fragmentation (docs/memory.md, "Fitting a GPU"). */
#define FIT_RESERVE_BYTES 1000000000ULL

typedef struct options {
    const char *model_dir, *preset, *svg;
    qlora_train_settings settings;
    int json;
    double fit_gb;   /* 0 = no --fit */
} options;

/* The three regimes, in display order. */
static const qlora_train_regime REGIMES[3] = {QLORA_REGIME_FULL_16BIT, QLORA_REGIME_LORA_16BIT, QLORA_REGIME_QLORA};
static const char *const REGIME_TITLES[3] = {"16-bit full finetune", "16-bit LoRA", "QLoRA (NF4+DQ)"};

/* The five components every regime is broken into, bottom to top in the chart. */
enum { NCOMP = 5 };
static const char *const COMP_NAMES[NCOMP] = {"weights", "trainable", "gradients", "optimizer", "activations"};
static const char *const COMP_LABELS[NCOMP] = {"weights", "trainable params", "gradients", "optimizer state",
                                               "activations"};
static const char *const COMP_COLOURS[NCOMP] = {"#4e79a7", "#59a14f", "#f28e2b", "#e15759", "#b07aa1"};

static uint64_t component(const qlora_mem_estimate_result *r, int c) {
    const uint64_t v[NCOMP] = {r->weights, r->trainable, r->gradients, r->optimizer, r->activations};
    return v[c];
}

static void usage(FILE *to) {
    fprintf(to,
            "usage: %s (--model DIR | --preset NAME) [options]\n"
            "Estimates the memory of finetuning a Llama-family model three ways: 16-bit full\n"
            "finetuning, 16-bit LoRA and QLoRA (NF4 + double quantization), and what QLoRA saves.\n"
            "\n"
            "  --model DIR           a Hugging Face model directory (its config.json) or a config.json\n"
            "  --preset NAME         published dimensions of:",
            PROG);
    for (size_t i = 0; qlora_model_preset_name(i); i++)
        fprintf(to, "%s %s", i ? "," : "", qlora_model_preset_name(i));
    fprintf(to,
            "\n"
            "  --seq N               tokens per sequence (default 512)\n"
            "  --batch N             sequences per micro-batch (default 1)\n"
            "  --rank R              LoRA rank (default 64)\n"
            "  --targets T           LoRA targets: all-linear (q,k,v,o,gate,up,down; default) or attn\n"
            "  --grad-checkpointing on|off   keep only each layer's input (default on)\n"
            "  --json                print one JSON object instead of the table\n"
            "  --svg FILE            also write a stacked bar chart of the three regimes to FILE\n"
            "  --fit GPU_GB          which settings fit a GPU of GPU_GB GB (10^9 bytes): QLoRA over\n"
            "                        rank 8/16/64, seq 512..4096, micro-batch 1..8, checkpointing on/off\n"
            "  --help, --version\n"
            "\n"
            "Optimizer: AdamW with FP32 moments (8 bytes per trainable parameter); LoRA weights and\n"
            "all gradients in BF16; no FP32 master weights. Amounts in GB = 10^9 bytes, or MB = 10^6\n"
            "or kB = 10^3 for a small model (one unit per table, from its largest amount). Formulas:\n"
            "docs/memory.md.\n"
            "\n"
            "Exit codes: 0 success; 1 bad usage; 2 bad input (unknown preset, unreadable or malformed\n"
            "config.json, settings out of range); 3 the SVG file cannot be written.\n");
}

/* A positive integer option value. Returns 0 on success. */
static int parse_count(const char *value, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(value, &end, 10);
    if (errno || end == value || *end || v <= 0)
        return -1;
    *out = v;
    return 0;
}

/* Returns -1 to continue, or an exit code (0 for --help/--version). */
static int parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->settings = qlora_train_default_settings();
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (arg[0] != '-' || arg[1] != '-')
            return tool_usage_error("unexpected argument '%s'", arg);
        static const char *const with_value[] = {"--model", "--preset", "--seq", "--batch", "--rank", "--targets",
                                                 "--grad-checkpointing", "--svg", "--fit", NULL};
        char name[TOOL_OPTION_NAME_MAX];
        const char *value;
        int rc = tool_option(argc, argv, &i, with_value, name, &value);
        if (rc)
            return rc;

        if (!strcmp(name, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(name, "--version")) {
            printf("%s (libqlora %s)\n", PROG, qlora_version_string());
            return 0;
        } else if (!strcmp(name, "--model")) {
            o->model_dir = value;
        } else if (!strcmp(name, "--preset")) {
            o->preset = value;
        } else if (!strcmp(name, "--seq")) {
            if (parse_count(value, &o->settings.seq_len))
                return tool_usage_error("--seq expects a positive integer, got '%s'", value);
        } else if (!strcmp(name, "--batch")) {
            if (parse_count(value, &o->settings.micro_batch))
                return tool_usage_error("--batch expects a positive integer, got '%s'", value);
        } else if (!strcmp(name, "--rank")) {
            if (parse_count(value, &o->settings.lora_rank))
                return tool_usage_error("--rank expects a positive integer, got '%s'", value);
        } else if (!strcmp(name, "--targets")) {
            if (!strcmp(value, "all-linear"))
                o->settings.targets = QLORA_TARGETS_ALL_LINEAR;
            else if (!strcmp(value, "attn"))
                o->settings.targets = QLORA_TARGETS_ATTENTION;
            else
                return tool_usage_error("--targets must be all-linear or attn, got '%s'", value);
        } else if (!strcmp(name, "--grad-checkpointing")) {
            if (!strcmp(value, "on"))
                o->settings.grad_checkpointing = 1;
            else if (!strcmp(value, "off"))
                o->settings.grad_checkpointing = 0;
            else
                return tool_usage_error("--grad-checkpointing must be on or off, got '%s'", value);
        } else if (!strcmp(name, "--json")) {
            o->json = 1;
        } else if (!strcmp(name, "--svg")) {
            if (!*value)
                return tool_usage_error("--svg needs a file name");
            o->svg = value;
        } else if (!strcmp(name, "--fit")) {
            char *end;
            errno = 0;
            o->fit_gb = strtod(value, &end);
            if (errno || end == value || *end || !(o->fit_gb > 0) || o->fit_gb > 1e6)
                return tool_usage_error("--fit expects the GPU's memory in GB (a positive number), got '%s'", value);
        } else {
            return tool_usage_error("unknown option '%s'", arg);
        }
    }
    if (!o->model_dir == !o->preset)
        return tool_usage_error(o->preset ? "give --model or --preset, not both"
                                          : "missing --model DIR or --preset NAME");
    if (o->json && o->fit_gb > 0)
        return tool_usage_error("--fit prints a table and cannot be combined with --json");
    return -1;
}

/* ------------------------------------------------------------------ the model */
/* --model takes a directory holding config.json, or the config.json itself. */
static int load_model(const options *o, qlora_model_config *cfg) {
    if (o->preset) {
        if (qlora_model_config_preset(o->preset, cfg) != QLORA_OK) {
            tool_say("%s", qlora_last_error());
            return EXIT_INPUT;
        }
        return 0;
    }
    struct stat st;
    if (stat(o->model_dir, &st) != 0) {
        tool_say("cannot read %s: %s", o->model_dir, strerror(errno));
        return EXIT_INPUT;
    }
    char *path = S_ISDIR(st.st_mode) ? tool_path_join(o->model_dir, "config.json") : strdup(o->model_dir);
    if (!path) {
        tool_say("out of memory");
        return EXIT_INPUT;
    }
    int rc = 0;
    if (qlora_model_config_from_json_file(path, cfg) != QLORA_OK) {
        tool_say("%s", qlora_last_error());
        rc = EXIT_INPUT;
    }
    free(path);
    return rc;
}

typedef struct estimates {
    qlora_model_config cfg;
    const char *model_label;
    qlora_mem_estimate_result r[3];
} estimates;

static int estimate_all(const qlora_model_config *cfg, const qlora_train_settings *s,
                        qlora_mem_estimate_result out[3]) {
    for (int i = 0; i < 3; i++) {
        if (qlora_mem_estimate(cfg, s, REGIMES[i], &out[i]) != QLORA_OK) {
            tool_say("%s", qlora_last_error());
            return EXIT_INPUT;
        }
    }
    return 0;
}

static double gb(uint64_t bytes) { return (double)bytes / 1e9; }

/* A decimal unit for a group of amounts shown together, picked from the largest so that it
 * reads as at least 1 (a small model shows MB or kB instead of rows of "0.00 GB"). */
typedef struct unit {
    const char *name;  /* "GB", "MB", "kB" */
    double bytes;      /* 1e9, 1e6, 1e3 */
    int exponent;      /* 9, 6, 3 */
} unit;

static unit unit_for(uint64_t largest) {
    if (largest >= 1000000000ULL)
        return (unit){"GB", 1e9, 9};
    if (largest >= 1000000ULL)
        return (unit){"MB", 1e6, 6};
    return (unit){"kB", 1e3, 3};
}

static uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

static double in_unit(uint64_t bytes, unit u) { return (double)bytes / u.bytes; }

static double savings(const estimates *e) {
    return e->r[2].total ? (double)e->r[0].total / (double)e->r[2].total : 0.0;
}

static const char *targets_name(qlora_lora_targets t) {
    return t == QLORA_TARGETS_ATTENTION ? "attn" : "all-linear";
}

/* "65.29 B", "799.5 M": parameter counts. */
static void human_count(uint64_t n, char *out, size_t cap) {
    if (n >= 1000000000ULL)
        snprintf(out, cap, "%.2f B", (double)n / 1e9);
    else if (n >= 1000000ULL)
        snprintf(out, cap, "%.1f M", (double)n / 1e6);
    else
        snprintf(out, cap, "%" PRIu64, n);
}

/* ------------------------------------------------------------------ text */
static void print_table(const options *o, const estimates *e) {
    const qlora_train_settings *s = &o->settings;
    char total[32], linear[32], lora[32];
    human_count(e->r[0].params_total, total, sizeof total);
    human_count(e->r[0].params_linear, linear, sizeof linear);
    human_count(e->r[2].params_trainable, lora, sizeof lora);
    printf("model:    %s, %s parameters (%s in the decoder's linear layers)\n", e->model_label, total, linear);
    printf("settings: seq %" PRId64 " x micro-batch %" PRId64 ", LoRA rank %" PRId64 " on %s (%s trainable, "
           "%.2f%% of the model),\n          gradient checkpointing %s, AdamW with FP32 moments\n\n",
           s->seq_len, s->micro_batch, s->lora_rank, targets_name(s->targets), lora,
           100.0 * (double)e->r[2].params_trainable / (double)e->r[2].params_total,
           s->grad_checkpointing ? "on" : "off");
    /* One unit per table or sentence, from its largest amount. */
    unit tu = unit_for(max_u64(max_u64(e->r[0].total, e->r[1].total), e->r[2].total));
    printf("%-14s", "");
    for (int i = 0; i < 3; i++)
        printf(" %21s", REGIME_TITLES[i]);
    printf("\n");
    for (int c = 0; c <= NCOMP; c++) {
        printf("%-14s", c < NCOMP ? COMP_NAMES[c] : "total");
        for (int i = 0; i < 3; i++)
            printf(" %18.2f %s", in_unit(c < NCOMP ? component(&e->r[i], c) : e->r[i].total, tu), tu.name);
        printf("\n");
    }
    const qlora_mem_estimate_result *q = &e->r[2];
    const uint64_t *qb = q->bytes;
    unit wu = unit_for(max_u64(max_u64(qb[QLORA_MEM_BASE_WEIGHTS], qb[QLORA_MEM_QUANT_STATE]),
                               qb[QLORA_MEM_DENSE_WEIGHTS]));
    printf("\nQLoRA weights: %.2f %s NF4 codes + %.2f %s quantization state (%.3f bits per linear parameter)\n"
           "               + %.2f %s BF16 embeddings, lm_head, norms and biases\n",
           in_unit(qb[QLORA_MEM_BASE_WEIGHTS], wu), wu.name, in_unit(qb[QLORA_MEM_QUANT_STATE], wu), wu.name,
           8.0 * (double)(qb[QLORA_MEM_BASE_WEIGHTS] + qb[QLORA_MEM_QUANT_STATE]) / (double)q->params_linear,
           in_unit(qb[QLORA_MEM_DENSE_WEIGHTS], wu), wu.name);
    unit au = unit_for(max_u64(max_u64(qb[QLORA_MEM_ACTIVATIONS], qb[QLORA_MEM_CHECKPOINTS]),
                               qb[QLORA_MEM_WORKSPACE]));
    printf("QLoRA activations: %.2f %s saved for backward + %.2f %s layer checkpoints + %.2f %s workspace\n"
           "               (logits and loss, backward gradients, one dequantized weight)\n",
           in_unit(qb[QLORA_MEM_ACTIVATIONS], au), au.name, in_unit(qb[QLORA_MEM_CHECKPOINTS], au), au.name,
           in_unit(qb[QLORA_MEM_WORKSPACE], au), au.name);
    printf("\nQLoRA needs %.1fx less memory than 16-bit full finetuning (%.2f %s -> %.2f %s).\n", savings(e),
           in_unit(e->r[0].total, tu), tu.name, in_unit(q->total, tu), tu.name);
    printf("Decimal units: kB = 10^3, MB = 10^6, GB = 10^9 bytes. Not included: the CUDA context and library\n"
           "workspaces (about 1 GB).\n");
}

/* ------------------------------------------------------------------ --fit */
typedef enum fit_answer { FIT_YES, FIT_PAGED, FIT_NO } fit_answer;

static fit_answer fits(const qlora_model_config *cfg, qlora_train_settings s, uint64_t budget, uint64_t *need,
                       int *failed) {
    qlora_mem_estimate_result r;
    *need = 0;
    s.page_optimizer = 0;
    if (qlora_mem_estimate(cfg, &s, QLORA_REGIME_QLORA, &r) != QLORA_OK) {
        *failed = 1;
        return FIT_NO;
    }
    *need = r.device_total + FIT_RESERVE_BYTES;
    if (*need <= budget)
        return FIT_YES;
    s.page_optimizer = 1; /* the optimizer state lives in host memory and is paged in per update */
    if (qlora_mem_estimate(cfg, &s, QLORA_REGIME_QLORA, &r) != QLORA_OK) {
        *failed = 1;
        return FIT_NO;
    }
    return r.device_total + FIT_RESERVE_BYTES <= budget ? FIT_PAGED : FIT_NO;
}

static const char *fit_word(fit_answer a) { return a == FIT_YES ? "fits" : a == FIT_PAGED ? "paged" : "no"; }

static int print_fit(const options *o, const estimates *e) {
    static const int64_t ranks[] = {8, 16, 64}, seqs[] = {512, 1024, 2048, 4096}, batches[] = {1, 2, 4, 8};
    uint64_t budget = (uint64_t)(o->fit_gb * 1e9);
    int failed = 0;
    uint64_t need;
    printf("\nFit on a %.4g GB GPU (GB needed = estimate + 1 GB for the CUDA context and workspaces):\n",
           o->fit_gb);
    for (int i = 0; i < 3; i++)
        printf("  %-21s %8.2f GB  %s\n", REGIME_TITLES[i], gb(e->r[i].device_total + FIT_RESERVE_BYTES),
               e->r[i].device_total + FIT_RESERVE_BYTES <= budget ? "fits" : "does not fit");
    fit_answer mine = fits(&e->cfg, o->settings, budget, &need, &failed);
    printf("  your QLoRA settings: %s\n\n", mine == FIT_YES     ? "fit"
                                            : mine == FIT_PAGED ? "fit with the optimizer state paged to host"
                                                                : "do not fit");
    printf("QLoRA with LoRA on %s, GB needed on the GPU per micro-batch size:\n", targets_name(o->settings.targets));
    printf("%-6s %-9s %-6s", "rank", "ckpt", "seq");
    for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++)
        printf("   batch %-7" PRId64, batches[b]);
    printf("\n");
    for (size_t ri = 0; ri < sizeof ranks / sizeof ranks[0]; ri++) {
        for (int ckpt = 1; ckpt >= 0; ckpt--) {
            for (size_t si = 0; si < sizeof seqs / sizeof seqs[0]; si++) {
                printf("%-6" PRId64 " %-9s %-6" PRId64, ranks[ri], ckpt ? "on" : "off", seqs[si]);
                for (size_t bi = 0; bi < sizeof batches / sizeof batches[0]; bi++) {
                    qlora_train_settings s = o->settings;
                    s.lora_rank = ranks[ri];
                    s.grad_checkpointing = ckpt;
                    s.seq_len = seqs[si];
                    s.micro_batch = batches[bi];
                    fit_answer a = fits(&e->cfg, s, budget, &need, &failed);
                    printf("   %6.1f %-6s", gb(need), fit_word(a));
                }
                printf("\n");
            }
        }
    }
    printf("\nfits: on the GPU as is. paged: fits once the optimizer state (%d bytes per trainable\n"
           "parameter) is paged to host memory, as paged AdamW does. no: does not fit either way.\n"
           "Shown: the GB needed without paging, the 1 GB reserve included.\n",
           o->settings.optimizer_state_bytes);
    if (failed) {
        tool_say("%s", qlora_last_error());
        return EXIT_INPUT;
    }
    return 0;
}

/* ------------------------------------------------------------------ --json */
static cJSON *add_bytes(cJSON *obj, const char *key, uint64_t v) {
    char num[32];
    snprintf(num, sizeof num, "%" PRIu64, v); /* exact: cJSON's doubles lose digits above 2^53 */
    return cJSON_AddRawToObject(obj, key, num);
}

static int print_json(const options *o, const estimates *e) {
    const qlora_train_settings *s = &o->settings;
    cJSON *root = cJSON_CreateObject();
    int ok = root != NULL;
    ok = ok && cJSON_AddStringToObject(root, "model", e->model_label);
    ok = ok && add_bytes(root, "params_total", e->r[0].params_total);
    cJSON *set = ok ? cJSON_AddObjectToObject(root, "settings") : NULL;
    ok = ok && set;
    ok = ok && cJSON_AddNumberToObject(set, "seq_len", (double)s->seq_len);
    ok = ok && cJSON_AddNumberToObject(set, "micro_batch", (double)s->micro_batch);
    ok = ok && cJSON_AddNumberToObject(set, "lora_rank", (double)s->lora_rank);
    ok = ok && cJSON_AddStringToObject(set, "targets", targets_name(s->targets));
    ok = ok && cJSON_AddBoolToObject(set, "grad_checkpointing", s->grad_checkpointing);
    ok = ok && cJSON_AddNumberToObject(set, "optimizer_state_bytes_per_param", s->optimizer_state_bytes);
    ok = ok && cJSON_AddStringToObject(set, "adapter_dtype", "bf16");
    for (int i = 0; i < 3 && ok; i++) {
        cJSON *reg = cJSON_AddObjectToObject(root, qlora_train_regime_name(REGIMES[i]));
        ok = reg != NULL;
        for (int c = 0; c < NCOMP && ok; c++)
            ok = add_bytes(reg, COMP_NAMES[c], component(&e->r[i], c)) != NULL;
        ok = ok && add_bytes(reg, "total", e->r[i].total);
    }
    ok = ok && cJSON_AddNumberToObject(root, "savings_vs_full_finetune", round(savings(e) * 1000.0) / 1000.0);
    char *text = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!text) {
        tool_say("out of memory");
        return EXIT_OUTPUT;
    }
    printf("%s\n", text);
    cJSON_free(text);
    return 0;
}

/* ------------------------------------------------------------------ --svg */
static void svg_text_escaped(tool_strbuf *b, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '&': tool_strbuf_puts(b, "&amp;"); break;
        case '<': tool_strbuf_puts(b, "&lt;"); break;
        case '>': tool_strbuf_puts(b, "&gt;"); break;
        case '"': tool_strbuf_puts(b, "&quot;"); break;
        case '\'': tool_strbuf_puts(b, "&apos;"); break;
        default: tool_strbuf_add(b, s, 1);
        }
    }
}

static void svg_printf(tool_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void svg_printf(tool_strbuf *b, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof line) {
        b->failed = 1;
        return;
    }
    tool_strbuf_add(b, line, (size_t)n);
}

/* A round axis step (1, 2 or 5 times a power of ten) giving about 5 gridlines up to top. */
static double axis_step(double top) {
    double raw = top / 5.0, p = pow(10.0, floor(log10(raw)));
    double m = raw / p;
    return (m <= 1.0 ? 1.0 : m <= 2.0 ? 2.0 : m <= 5.0 ? 5.0 : 10.0) * p;
}

/* v in unit u, with three significant digits or more: "81.2 GB", "6.22 MB". */
static void format_amount(double v, unit u, char *out, size_t cap) {
    snprintf(out, cap, v >= 100 ? "%.0f %s" : v >= 10 ? "%.1f %s" : "%.2f %s", v, u.name);
}

/* Stacked bars (left), one per regime, with the total above each; under them a table of
 * every component's amount whose colour swatches are the legend. One unit for the whole
 * chart, from its largest amount (the GPU line included). */
static void build_svg(const options *o, const estimates *e, tool_strbuf *b) {
    const qlora_train_settings *s = &o->settings;
    const double width = 820, plot_x = 90, plot_y = 110, plot_w = 600, plot_h = 330;
    const double table_y = plot_y + plot_h + 60, row_h = 22, height = table_y + row_h * (NCOMP + 2) + 30;
    uint64_t largest = max_u64(max_u64(e->r[0].total, e->r[1].total), e->r[2].total);
    const uint64_t fit_bytes = (uint64_t)(o->fit_gb * 1e9);
    unit u = unit_for(max_u64(largest, fit_bytes));
    double top = in_unit(largest, u);
    if (o->fit_gb > 0)
        top = fmax(top, in_unit(fit_bytes, u));
    double step = axis_step(top);
    double axis_top = ceil(top / step) * step;
    if (axis_top < top * 1.08)
        axis_top += step; /* room for the total labels above the tallest bar */
    double scale = plot_h / axis_top;

    svg_printf(b, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                  "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
                  "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n",
               width, height, width, height);
    svg_printf(b, "<rect width=\"100%%\" height=\"100%%\" fill=\"#ffffff\"/>\n");
    tool_strbuf_puts(b, "<text x=\"20\" y=\"32\" font-size=\"20\" font-weight=\"bold\">Training memory: ");
    svg_text_escaped(b, e->model_label);
    char params[32];
    human_count(e->r[0].params_total, params, sizeof params);
    svg_printf(b, " (%s parameters)</text>\n", params);
    svg_printf(b, "<text x=\"20\" y=\"56\" font-size=\"13\" fill=\"#444\">seq %" PRId64 " x micro-batch %" PRId64
                  ", LoRA rank %" PRId64 " on %s, gradient checkpointing %s, AdamW with FP32 moments</text>\n",
               s->seq_len, s->micro_batch, s->lora_rank, targets_name(s->targets),
               s->grad_checkpointing ? "on" : "off");
    svg_printf(b, "<text x=\"20\" y=\"78\" font-size=\"14\" font-weight=\"bold\" fill=\"#222\">QLoRA needs %.1fx "
                  "less memory than 16-bit full finetuning</text>\n",
               savings(e));

    /* gridlines and the axis, in u */
    for (int k = 0; k * step <= axis_top * 1.0001; k++) {
        double v = k * step, y = plot_y + plot_h - v * scale;
        svg_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#dddddd\"/>\n", plot_x, y,
                   plot_x + plot_w, y);
        svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"end\" fill=\"#444\">%g</text>\n",
                   plot_x - 8, y + 4, v);
    }
    svg_printf(b, "<text x=\"24\" y=\"%.1f\" font-size=\"13\" fill=\"#444\" transform=\"rotate(-90 24 %.1f)\" "
                  "text-anchor=\"middle\">%s (10^%d bytes)</text>\n",
               plot_y + plot_h / 2, plot_y + plot_h / 2, u.name, u.exponent);
    svg_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", plot_x, plot_y + plot_h,
               plot_x + plot_w, plot_y + plot_h);

    /* the GPU line first: bars drawn over it keep their labels readable */
    if (o->fit_gb > 0) {
        double y = plot_y + plot_h - in_unit(fit_bytes, u) * scale;
        svg_printf(b, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#222\" stroke-width=\"1.5\" "
                      "stroke-dasharray=\"6 4\"/>\n",
                   plot_x, y, plot_x + plot_w, y);
        svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\">%.4g GB GPU</text>\n", plot_x + plot_w + 6, y + 4,
                   o->fit_gb);
    }
    const double slot = plot_w / 3, bar_w = slot * 0.5;
    for (int i = 0; i < 3; i++) {
        double x = plot_x + slot * i + (slot - bar_w) / 2, y = plot_y + plot_h;
        for (int c = 0; c < NCOMP; c++) {
            double v = in_unit(component(&e->r[i], c), u), h = v * scale;
            if (h <= 0)
                continue;
            y -= h;
            svg_printf(b, "<rect x=\"%.1f\" y=\"%.2f\" width=\"%.1f\" height=\"%.2f\" fill=\"%s\"><title>%s: %.2f "
                          "%s</title></rect>\n",
                       x, y, bar_w, h, COMP_COLOURS[c], COMP_LABELS[c], v, u.name);
            if (h >= 16) {
                char label[32];
                format_amount(v, u, label, sizeof label);
                svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\" fill=\"#ffffff\">"
                              "%s</text>\n",
                           x + bar_w / 2, y + h / 2 + 4, label);
            }
        }
        char total[32];
        format_amount(in_unit(e->r[i].total, u), u, total, sizeof total);
        svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"14\" font-weight=\"bold\" text-anchor=\"middle\">"
                      "%s</text>\n",
                   x + bar_w / 2, y - 7, total);
        svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\">%s</text>\n",
                   x + bar_w / 2, plot_y + plot_h + 20, REGIME_TITLES[i]);
    }

    /* the table: one row per component, the swatch is the legend */
    const double col_x[4] = {40, 330, 490, 650};
    svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" font-weight=\"bold\">component (%s)</text>\n",
               col_x[0], table_y, u.name);
    for (int i = 0; i < 3; i++)
        svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" font-weight=\"bold\" text-anchor=\"end\">%s"
                      "</text>\n",
                   col_x[i + 1] + 120, table_y, REGIME_TITLES[i]);
    for (int c = NCOMP - 1, row = 1; c >= -1; c--, row++) { /* top of the stack first, total last */
        double y = table_y + row * row_h;
        if (c >= 0)
            svg_printf(b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"14\" fill=\"%s\"/>\n"
                          "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\">%s</text>\n",
                       col_x[0], y - 12, COMP_COLOURS[c], col_x[0] + 22, y, COMP_LABELS[c]);
        else
            svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" font-weight=\"bold\">total</text>\n",
                       col_x[0] + 22, y);
        for (int i = 0; i < 3; i++)
            svg_printf(b, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"end\"%s>%.2f</text>\n",
                       col_x[i + 1] + 120, y, c < 0 ? " font-weight=\"bold\"" : "",
                       in_unit(c >= 0 ? component(&e->r[i], c) : e->r[i].total, u));
    }
    tool_strbuf_puts(b, "</svg>\n");
}

/* Writes FILE.tmp-<pid>, fsynced, then renames it over FILE: readers see the old or the new
 * chart, never half of one. */
static int write_svg(const options *o, const estimates *e) {
    tool_strbuf b = {0};
    build_svg(o, e, &b);
    if (b.failed) {
        tool_strbuf_free(&b);
        tool_say("out of memory building the SVG");
        return EXIT_OUTPUT;
    }
    size_t n = strlen(o->svg) + 32;
    char *tmp = malloc(n);
    int rc = 0;
    if (!tmp) {
        tool_say("out of memory");
        rc = EXIT_OUTPUT;
    } else {
        snprintf(tmp, n, "%s.tmp-%ld", o->svg, (long)getpid());
        if (tool_write_new_file(tmp, b.data, b.len) != 0) {
            tool_say("cannot write %s: %s", tmp, strerror(errno));
            unlink(tmp);
            rc = EXIT_OUTPUT;
        } else if (rename(tmp, o->svg) != 0) {
            tool_say("cannot rename %s to %s: %s", tmp, o->svg, strerror(errno));
            unlink(tmp);
            rc = EXIT_OUTPUT;
        }
    }
    free(tmp);
    tool_strbuf_free(&b);
    return rc;
}

/* ------------------------------------------------------------------ main */
int main(int argc, char **argv) {
    tool_cli_init(PROG);
    options opt;
    int rc = parse_args(argc, argv, &opt);
    if (rc >= 0)
        return rc;
    estimates e;
    memset(&e, 0, sizeof e);
    rc = load_model(&opt, &e.cfg);
    if (rc)
        return rc;
    e.model_label = opt.preset ? opt.preset : opt.model_dir;
    rc = estimate_all(&e.cfg, &opt.settings, e.r);
    if (rc)
        return rc;
    if (opt.json) {
        rc = print_json(&opt, &e);
    } else {
        print_table(&opt, &e);
        if (opt.fit_gb > 0)
            rc = print_fit(&opt, &e);
    }
    if (rc == 0 && opt.svg)
        rc = write_svg(&opt, &e);
    if (rc == 0 && fflush(stdout) != 0) {
        tool_say("cannot write to standard output: %s", strerror(errno));
        rc = EXIT_OUTPUT;
    }
    return rc;
}
