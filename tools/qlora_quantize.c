/*
 * qlora-quantize: converts a safetensors checkpoint (one file, or a Hugging Face model
 * directory) to bitsandbytes 4-bit (NF4/FP4, optional double quant), or back with
 * --dequantize. Uses the public libqlora API only.
 *
 * Every 2-D "*.weight" in F32/F16/BF16 is quantized unless its name matches a skip pattern
 * (embeddings and lm_head by default, as transformers leaves them unconverted); every other
 * tensor is copied byte for byte. The output is streamed one tensor at a time: a first pass
 * declares every output tensor, a second quantizes and writes them, so peak memory is about
 * one tensor. A directory output is built in OUT.tmp-<pid> and renamed into place at the end;
 * a failed run leaves neither OUT nor the temp directory behind.
 */
#include <qlora.h>

#include <cjson/cJSON.h> /* config.json and the shard index */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h> /* AT_FDCWD for renameat2 */
#include <math.h>
#include <regex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bnb_config.h"
#include "json_splice.h" /* config.json edits that keep every other byte */
#include "tool_cli.h"
#include "tool_files.h"

/* Exit codes (documented in --help). */
enum {
    EXIT_USAGE = TOOL_EXIT_USAGE, /* bad command line */
    EXIT_INPUT = 2,       /* IN missing, unreadable, malformed, or not convertible */
    EXIT_OUTPUT = 3,      /* OUT exists, cannot be written, or the system ran out of memory */
    EXIT_INTERRUPTED = 130
};

static const char *const PROG = "qlora-quantize";

/* Tensors transformers never converts (modules_to_not_convert): embeddings and the output
 * head. POSIX extended regexes, matched anywhere in the tensor name. */
static const char *const DEFAULT_SKIP[] = {"embed", "(^|\\.)(wte|wpe)\\.", "(^|\\.)lm_head\\."};
enum { NUM_DEFAULT_SKIP = sizeof DEFAULT_SKIP / sizeof DEFAULT_SKIP[0], MAX_SKIP = 64 };

typedef struct options {
    const char *in, *out;
    qlora_quant_params quant;
    int dequantize, quiet;
    int quant_option_given;   /* --type/--blocksize/--no-double-quant/--skip (not with --dequantize) */
    uint64_t max_shard_bytes;
    int max_shard_given;
    regex_t skip[MAX_SKIP];
    int nskip, nskip_user;    /* default patterns first, then the user's */
} options;

/* Reports a failed library call with the library's message; returns `code`. */
static int lib_fail(int code, const char *what) {
    tool_say("%s: %s", what, qlora_last_error());
    return code;
}

static volatile sig_atomic_t g_interrupted;
/* First signal: stop between tensors and clean up; a second one kills as usual. */
static void on_signal(int sig) {
    g_interrupted = sig;
    signal(sig, SIG_DFL);
}

/* ------------------------------------------------------------------ command line */
static void usage(FILE *to) {
    fprintf(to,
            "usage: %s IN OUT [options]\n"
            "Quantizes a safetensors checkpoint to bitsandbytes 4-bit (NF4/FP4), or back.\n"
            "IN and OUT: a .safetensors file, or a Hugging Face model directory (config.json with\n"
            "model.safetensors, or shards + model.safetensors.index.json). OUT must not exist.\n"
            "\n"
            "  --type nf4|fp4        4-bit data type (default nf4)\n"
            "  --blocksize N         elements per absmax block, power of two in 32..4096 (default 64)\n"
            "  --no-double-quant     keep the block scales in float32 (default: 8-bit, blocks of 256)\n"
            "  --skip REGEX          also keep tensors whose name matches this POSIX extended regex\n"
            "                        (repeatable; always kept: embed_tokens, wte, wpe, embed*, lm_head)\n"
            "  --dequantize          the reverse: bitsandbytes 4-bit weights back to their dtype\n"
            "  --max-shard-size SIZE split a directory output into shards of at most SIZE bytes\n"
            "                        (units KB/MB/GB = 1000^k, KiB/MiB/GiB = 1024^k; 0 = one file;\n"
            "                        default: the largest shard of IN, or one file)\n"
            "  --quiet               print nothing but the summary\n"
            "  --help, --version\n"
            "\n"
            "Quantized: every 2-D *.weight in F32/F16/BF16 not skipped, in the key set of\n"
            "bitsandbytes (loadable by transformers). Everything else is copied byte for byte.\n"
            "\n"
            "Exit codes: 0 success; 1 bad usage; 2 input error (IN missing or malformed, non-finite\n"
            "weights, nothing to convert); 3 output error (OUT exists, cannot be written, out of\n"
            "memory); 130 interrupted. On failure no OUT and no temporary file is left behind.\n",
            PROG);
}

/* "5GB", "500MiB", "1048576", "0". Returns 0 on success. */
static int parse_size(const char *text, uint64_t *out) {
    static const struct {
        const char *suffix;
        uint64_t mult;
    } units[] = {{"", 1},           {"B", 1},           {"KB", 1000},     {"MB", 1000000},
                 {"GB", 1000000000}, {"TB", 1000000000000ULL}, {"KIB", 1ULL << 10}, {"MIB", 1ULL << 20},
                 {"GIB", 1ULL << 30}, {"TIB", 1ULL << 40}};
    char *end;
    errno = 0;
    if (!(*text >= '0' && *text <= '9'))
        return -1;
    double v = strtod(text, &end);
    if (errno || v < 0)
        return -1;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcasecmp(end, units[i].suffix) == 0) {
            double bytes = v * (double)units[i].mult;
            if (bytes >= 18446744073709551616.0)
                return -1;
            *out = (uint64_t)bytes;
            return 0;
        }
    }
    return -1;
}

/* Returns -1 to continue, or an exit code (0 for --help/--version). */
static int parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->quant = qlora_quant_default_params();
    for (int i = 0; i < NUM_DEFAULT_SKIP; i++)
        if (regcomp(&o->skip[o->nskip++], DEFAULT_SKIP[i], REG_EXTENDED | REG_NOSUB) != 0)
            return tool_usage_error("internal: bad default pattern '%s'", DEFAULT_SKIP[i]);
    int positional = 0, options_done = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (options_done || arg[0] != '-' || !strcmp(arg, "-")) {
            if (positional == 0)
                o->in = arg;
            else if (positional == 1)
                o->out = arg;
            else
                return tool_usage_error("unexpected argument '%s' (IN and OUT are already given)", arg);
            positional++;
            continue;
        }
        if (!strcmp(arg, "--")) {
            options_done = 1;
            continue;
        }
        /* Options with a value accept "--opt VALUE" and "--opt=VALUE". */
        static const char *const with_value[] = {"--type", "--blocksize", "--skip", "--max-shard-size", NULL};
        char name[TOOL_OPTION_NAME_MAX];
        const char *value;
        int rc = tool_option(argc, argv, &i, with_value, name, &value);
        if (rc)
            return rc;

        if (!strcmp(name, "--help") || !strcmp(name, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(name, "--version")) {
            printf("%s (libqlora %s)\n", PROG, qlora_version_string());
            return 0;
        } else if (!strcmp(name, "--type")) {
            if (!strcmp(value, "nf4"))
                o->quant.type = QLORA_QUANT_NF4;
            else if (!strcmp(value, "fp4"))
                o->quant.type = QLORA_QUANT_FP4;
            else
                return tool_usage_error("--type must be nf4 or fp4, got '%s'", value);
            o->quant_option_given = 1;
        } else if (!strcmp(name, "--blocksize")) {
            char *end;
            errno = 0;
            long bs = strtol(value, &end, 10);
            if (errno || end == value || *end || bs < 32 || bs > 4096 || (bs & (bs - 1)))
                return tool_usage_error("--blocksize must be a power of two in 32..4096, got '%s'", value);
            o->quant.blocksize = (int)bs;
            o->quant_option_given = 1;
        } else if (!strcmp(name, "--no-double-quant")) {
            o->quant.double_quant = 0;
            o->quant_option_given = 1;
        } else if (!strcmp(name, "--skip")) {
            if (o->nskip == MAX_SKIP)
                return tool_usage_error("too many --skip patterns (at most %d)", MAX_SKIP - NUM_DEFAULT_SKIP);
            int rc = regcomp(&o->skip[o->nskip], value, REG_EXTENDED | REG_NOSUB);
            if (rc != 0) {
                char why[256];
                regerror(rc, &o->skip[o->nskip], why, sizeof why);
                return tool_usage_error("--skip '%s' is not a valid extended regex: %s", value, why);
            }
            o->nskip++;
            o->nskip_user++;
            o->quant_option_given = 1;
        } else if (!strcmp(name, "--dequantize")) {
            o->dequantize = 1;
        } else if (!strcmp(name, "--max-shard-size")) {
            if (parse_size(value, &o->max_shard_bytes) != 0)
                return tool_usage_error("--max-shard-size expects a size such as 2GB, 500MiB or 1048576, got '%s'",
                                   value);
            o->max_shard_given = 1;
        } else if (!strcmp(name, "--quiet") || !strcmp(name, "-q")) {
            o->quiet = 1;
        } else {
            return tool_usage_error("unknown option '%s'", arg);
        }
    }
    if (positional < 2)
        return tool_usage_error(positional == 0 ? "missing IN and OUT" : "missing OUT");
    if (o->dequantize && o->quant_option_given)
        return tool_usage_error("--type, --blocksize, --no-double-quant and --skip do not apply to --dequantize");
    return -1;
}

static void free_options(options *o) {
    for (int i = 0; i < o->nskip; i++)
        regfree(&o->skip[i]);
}

/* ------------------------------------------------------------------ half conversions */
static float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            e++;
            mant <<= 1;
        } while (!(mant & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Element i of an F32/F16/BF16 buffer that may be unaligned (memory-mapped input). */
static float load_element(const void *data, qlora_dtype dtype, int64_t i) {
    const unsigned char *p = data;
    if (dtype == QLORA_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return dtype == QLORA_BF16 ? bf16_to_float(h) : f16_to_float(h);
}

/* ------------------------------------------------------------------ files */
static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

/* Total size of the *.safetensors files in a directory. */
static uint64_t safetensors_bytes_in_dir(const char *dir) {
    uint64_t total = 0;
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (ends_with(e->d_name, ".safetensors")) {
            char *p = tool_path_join(dir, e->d_name);
            if (p)
                total += tool_file_size(p);
            free(p);
        }
    }
    closedir(d);
    return total;
}

/* ------------------------------------------------------------------ config.json */
/* The config.json to write: IN's with quantization_config added (or, --dequantize, removed),
 * in *out (malloc'ed; NULL when IN has none). Done before any weight is converted so a bad
 * config fails at once. Returns 0 or an exit code. */
static int edit_config(const options *o, char **skipped, size_t nskipped, char **out) {
    char *path = tool_path_join(o->in, "config.json"), *text = NULL, *member = NULL;
    tool_json_object obj;
    memset(&obj, 0, sizeof obj);
    cJSON *root = NULL;
    size_t n = 0;
    int rc = 0;
    *out = NULL;
    if (!path) {
        tool_say("out of memory");
        return EXIT_OUTPUT;
    }
    if (tool_read_file(path, &text, &n) != 0) {
        if (errno == ENOENT) {
            if (!o->quiet)
                tool_say("note: %s has no config.json; none written", o->in);
        } else {
            rc = EXIT_INPUT;
            tool_say("cannot read %s: %s", path, strerror(errno));
        }
        goto done;
    }
    root = cJSON_ParseWithLength(text, n);
    if (!root || !cJSON_IsObject(root) || tool_json_scan(text, n, &obj) != 0) {
        rc = EXIT_INPUT;
        tool_say("%s: not a valid JSON object", path);
        goto done;
    }
    size_t existing = tool_json_find(&obj, "quantization_config");
    if (!o->dequantize && existing < obj.count) {
        rc = EXIT_INPUT;
        tool_say("%s already has a quantization_config: the model is quantized (use --dequantize)", path);
        goto done;
    }
    if (!o->dequantize) {
        member = tool_bnb_quantization_member(&obj, o->quant.type, o->quant.double_quant, skipped, nskipped);
        *out = member ? tool_json_insert(text, n, &obj, "quantization_config", member) : NULL;
    } else {
        *out = existing < obj.count ? tool_json_remove(text, n, &obj, existing) : strdup(text);
    }
    if (!*out) {
        rc = EXIT_OUTPUT;
        tool_say("out of memory");
    }
done:
    cJSON_Delete(root);
    tool_json_object_free(&obj);
    free(member);
    free(text);
    free(path);
    return rc;
}

/* ------------------------------------------------------------------ input directory */
typedef struct input_files {
    char **shards;        /* safetensors files of the checkpoint (names within IN) */
    size_t nshards;
    uint64_t largest;     /* size of the largest shard file (bytes) */
    uint64_t total;       /* total size of the checkpoint's files */
} input_files;

static void free_input_files(input_files *f) {
    for (size_t i = 0; i < f->nshards; i++)
        free(f->shards[i]);
    free(f->shards);
    memset(f, 0, sizeof *f);
}

static int add_shard(input_files *f, const char *name) {
    for (size_t i = 0; i < f->nshards; i++)
        if (!strcmp(f->shards[i], name))
            return 0;
    char **grown = realloc(f->shards, (f->nshards + 1) * sizeof *grown);
    if (!grown)
        return -1;
    f->shards = grown;
    if (!(f->shards[f->nshards] = strdup(name)))
        return -1;
    f->nshards++;
    return 0;
}

/* Which files of IN hold the checkpoint: the index's shards, else model.safetensors (the
 * checkpoint reader has already validated them). Returns 0 or an exit code. */
static int list_input_files(const char *in, input_files *f) {
    memset(f, 0, sizeof *f);
    char *index_path = tool_path_join(in, "model.safetensors.index.json"), *text = NULL;
    size_t n;
    int rc = 0;
    if (!index_path)
        return EXIT_OUTPUT;
    if (tool_read_file(index_path, &text, &n) == 0) {
        cJSON *root = cJSON_ParseWithLength(text, n);
        cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
        const cJSON *e;
        if (!cJSON_IsObject(map)) {
            tool_say("%s: no weight_map object", index_path);
            rc = EXIT_INPUT;
        }
        cJSON_ArrayForEach(e, map) {
            if (rc == 0 && cJSON_IsString(e) && add_shard(f, e->valuestring) != 0)
                rc = EXIT_OUTPUT;
        }
        cJSON_Delete(root);
        free(text);
    } else if (add_shard(f, "model.safetensors") != 0) {
        rc = EXIT_OUTPUT;
    }
    free(index_path);
    for (size_t i = 0; rc == 0 && i < f->nshards; i++) {
        char *p = tool_path_join(in, f->shards[i]);
        uint64_t size = p ? tool_file_size(p) : 0;
        free(p);
        f->total += size;
        if (size > f->largest)
            f->largest = size;
    }
    return rc;
}

/* Copies every other regular file of IN (tokenizer, generation config, ...) verbatim. */
static int copy_other_files(const options *o, const input_files *f, const char *dir) {
    DIR *d = opendir(o->in);
    if (!d) {
        tool_say("cannot list %s: %s", o->in, strerror(errno));
        return EXIT_INPUT;
    }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        /* model*.safetensors: the checkpoint's own files, or stale ones the new weights replace. */
        int skip = !strcmp(name, ".") || !strcmp(name, "..") || !strcmp(name, "config.json") ||
                   !strcmp(name, "model.safetensors.index.json") ||
                   (!strncmp(name, "model", 5) && ends_with(name, ".safetensors"));
        for (size_t i = 0; !skip && i < f->nshards; i++)
            skip = !strcmp(name, f->shards[i]);
        if (skip)
            continue;
        char *from = tool_path_join(o->in, name), *to = tool_path_join(dir, name);
        struct stat st;
        if (!from || !to) {
            tool_say("out of memory");
            rc = EXIT_OUTPUT;
        } else if (stat(from, &st) != 0) {
            tool_say("cannot read %s: %s", from, strerror(errno));
            rc = EXIT_INPUT;
        } else if (S_ISDIR(st.st_mode)) {
            if (!o->quiet)
                tool_say("note: subdirectory %s not copied", from);
        } else if (S_ISREG(st.st_mode) && tool_copy_file(from, to) != 0) {
            tool_say("cannot copy %s to %s: %s", from, to, strerror(errno));
            rc = access(from, R_OK) == 0 ? EXIT_OUTPUT : EXIT_INPUT;
        }
        free(from);
        free(to);
    }
    closedir(d);
    return rc;
}

/* ------------------------------------------------------------------ the conversion */
typedef enum action { ACT_COPY, ACT_SKIP, ACT_QUANTIZE, ACT_DEQUANTIZE, ACT_DROP } action;

static const char *action_name(action a) {
    static const char *const names[] = {"copy", "keep", "quantize", "dequantize", "drop"};
    return names[a];
}

typedef struct plan_item {
    const char *name;     /* owned by the checkpoint */
    action act;
} plan_item;

typedef struct stats {
    size_t quantized, copied, skipped, dequantized, dropped;
    uint64_t quant_in_bytes, quant_out_bytes; /* original vs packed (codes + scales) bytes */
    uint64_t quant_params;
    double err_sq, ref_sq, max_abs_err;
    uint64_t file_bytes_in, file_bytes_out;
} stats;

typedef struct job {
    options *opt;
    qlora_ctx *ctx;
    qlora_checkpoint *ckpt;
    plan_item *items;
    size_t count;
    stats st;
    int tty;                /* progress as one updating line */
    char **skipped_modules; /* modules kept unquantized by user --skip (for llm_int8_skip_modules) */
    size_t nskipped_modules;
} job;

static int matches_any(const regex_t *re, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (regexec(&re[i], name, 0, NULL, 0) == 0)
            return 1;
    return 0;
}

static const char *const BNB_SUFFIXES[] = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                           ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"};

/* If name is a companion key of a bitsandbytes weight, that weight's name (malloc'ed). */
static char *bnb_owner(const qlora_checkpoint *c, const char *name) {
    for (size_t s = 0; s < sizeof BNB_SUFFIXES / sizeof BNB_SUFFIXES[0]; s++) {
        if (!ends_with(name, BNB_SUFFIXES[s]))
            continue;
        char *owner = strndup(name, strlen(name) - strlen(BNB_SUFFIXES[s]));
        if (owner && qlora_bnb_is_quantized(c, owner))
            return owner;
        free(owner);
    }
    return NULL;
}

static int record_skipped_module(job *j, const char *weight_name) {
    char **grown = realloc(j->skipped_modules, (j->nskipped_modules + 1) * sizeof *grown);
    if (!grown)
        return -1;
    j->skipped_modules = grown;
    /* transformers matches modules by name: "model.layers.0.mlp.down_proj" */
    char *module = strndup(weight_name, strlen(weight_name) - strlen(".weight"));
    if (!module)
        return -1;
    j->skipped_modules[j->nskipped_modules++] = module;
    return 0;
}

/* Decides what happens to each tensor. Returns 0 or an exit code. */
static int make_plan(job *j) {
    j->count = qlora_checkpoint_count(j->ckpt);
    j->items = calloc(j->count ? j->count : 1, sizeof *j->items);
    if (!j->items) {
        tool_say("out of memory");
        return EXIT_OUTPUT;
    }
    size_t candidates = 0;
    int user_skipped_any = 0;
    for (size_t i = 0; i < j->count; i++) {
        plan_item *it = &j->items[i];
        it->name = qlora_checkpoint_name(j->ckpt, i);
        qlora_tensor t;
        if (qlora_checkpoint_find(j->ckpt, it->name, &t) != QLORA_OK)
            return lib_fail(EXIT_INPUT, it->name);
        if (j->opt->dequantize) {
            char *owner = NULL;
            if (ends_with(it->name, ".weight") && qlora_bnb_is_quantized(j->ckpt, it->name))
                it->act = ACT_DEQUANTIZE;
            else if ((owner = bnb_owner(j->ckpt, it->name)) != NULL)
                it->act = ACT_DROP;
            else
                it->act = ACT_COPY;
            free(owner);
            candidates += it->act == ACT_DEQUANTIZE;
            continue;
        }
        if (ends_with(it->name, ".quant_state.bitsandbytes__nf4") ||
            ends_with(it->name, ".quant_state.bitsandbytes__fp4")) {
            tool_say("%s: tensor '%s' shows the checkpoint is already 4-bit quantized (use --dequantize)", j->opt->in,
                it->name);
            return EXIT_INPUT;
        }
        int eligible = ends_with(it->name, ".weight") && t.ndim == 2 && qlora_tensor_numel(&t) > 0 &&
                       (t.dtype == QLORA_F32 || t.dtype == QLORA_F16 || t.dtype == QLORA_BF16);
        if (!eligible) {
            it->act = ACT_COPY;
        } else if (matches_any(j->opt->skip, j->opt->nskip, it->name)) {
            it->act = ACT_SKIP;
            if (matches_any(j->opt->skip + NUM_DEFAULT_SKIP, j->opt->nskip_user, it->name))
                user_skipped_any = 1;
            if (record_skipped_module(j, it->name) != 0) {
                tool_say("out of memory");
                return EXIT_OUTPUT;
            }
        } else {
            it->act = ACT_QUANTIZE;
            candidates++;
        }
    }
    /* llm_int8_skip_modules stays null (transformers' own defaults) unless the user skipped
     * more; then it lists every kept module, as older transformers replace the defaults. */
    if (!user_skipped_any) {
        for (size_t i = 0; i < j->nskipped_modules; i++)
            free(j->skipped_modules[i]);
        j->nskipped_modules = 0;
    }
    if (candidates == 0) {
        tool_say(j->opt->dequantize ? "%s: no bitsandbytes 4-bit weights to dequantize"
                               : "%s: no 2-D F32/F16/BF16 *.weight tensor to quantize",
            j->opt->in);
        return EXIT_INPUT;
    }
    return 0;
}

static void progress(job *j, size_t i, const char *what, const char *name) {
    if (j->opt->quiet)
        return;
    int width = snprintf(NULL, 0, "%zu", j->count);
    if (j->tty)
        fprintf(stderr, "\r\033[K[%*zu/%zu] %s %s", width, i + 1, j->count, what, name);
    else
        fprintf(stderr, "[%*zu/%zu] %s %s\n", width, i + 1, j->count, what, name);
    fflush(stderr);
}

static void progress_done(job *j) {
    if (!j->opt->quiet && j->tty)
        fputs("\r\033[K", stderr);
}

/* The input tensor, copied to an aligned buffer when the mapping leaves it unaligned for its
 * dtype (possible in files from other writers). *owned is set when a copy was made. */
static int aligned_input(job *j, qlora_tensor *t, void **owned) {
    size_t elem = (size_t)qlora_dtype_bits(t->dtype) / 8;
    *owned = NULL;
    if (elem <= 1 || (uintptr_t)t->data % elem == 0)
        return 0;
    size_t bytes = qlora_tensor_nbytes(t);
    if (qlora_alloc(j->ctx, bytes, 0, QLORA_MEM_WORKSPACE, owned) != QLORA_OK)
        return lib_fail(EXIT_OUTPUT, t->name);
    memcpy(*owned, t->data, bytes);
    t->data = *owned;
    return 0;
}

/* Quantizes one weight into q (host). Returns 0 or an exit code. */
static int quantize_one(job *j, const char *name, qlora_tensor *t, qlora_qtensor *q) {
    void *owned;
    int rc = aligned_input(j, t, &owned);
    if (rc)
        return rc;
    qlora_status s = qlora_quantize(j->ctx, t, &j->opt->quant, q);
    qlora_free(j->ctx, owned);
    if (s != QLORA_OK)
        return lib_fail(s == QLORA_ERR_OUT_OF_MEMORY ? EXIT_OUTPUT : EXIT_INPUT, name);
    return 0;
}

/* Adds the reconstruction error of q against the original t to the totals. */
static int measure_error(job *j, const char *name, const qlora_tensor *t, const qlora_qtensor *q) {
    qlora_tensor back;
    qlora_status s = qlora_tensor_init(&back, name, QLORA_F32, q->ndim, q->shape, NULL, QLORA_DEVICE_HOST);
    if (s == QLORA_OK)
        s = qlora_tensor_alloc(j->ctx, &back, 0, QLORA_MEM_WORKSPACE);
    if (s == QLORA_OK)
        s = qlora_dequantize(j->ctx, q, &back);
    if (s != QLORA_OK) {
        qlora_tensor_free(j->ctx, &back);
        return lib_fail(EXIT_OUTPUT, name);
    }
    const float *d = back.data;
    const int64_t n = q->numel;
    double err_sq = 0, ref_sq = 0, max_abs = j->st.max_abs_err;
    for (int64_t i = 0; i < n; i++) {
        double x = load_element(t->data, t->dtype, i), e = (double)d[i] - x;
        err_sq += e * e;
        ref_sq += x * x;
        if (fabs(e) > max_abs)
            max_abs = fabs(e);
    }
    j->st.err_sq += err_sq;
    j->st.ref_sq += ref_sq;
    j->st.max_abs_err = max_abs;
    qlora_tensor_free(j->ctx, &back);
    return 0;
}

/* What qlora_bnb_declare reads of a weight that is not quantized yet: its shape, block counts
 * and nested_offset (set by the caller: with double quant the quant_state blob's length
 * depends on it). */
static void describe_qtensor(const qlora_tensor *t, const qlora_quant_params *p, qlora_qtensor *q) {
    memset(q, 0, sizeof *q);
    q->type = p->type;
    q->blocksize = p->blocksize;
    q->double_quant = p->double_quant;
    q->dtype = t->dtype;
    q->ndim = t->ndim;
    memcpy(q->shape, t->shape, sizeof q->shape);
    q->numel = qlora_tensor_numel(t);
    q->nblocks = (q->numel + p->blocksize - 1) / p->blocksize;
    q->nested_nblocks = p->double_quant ? (q->nblocks + QLORA_NESTED_BLOCKSIZE - 1) / QLORA_NESTED_BLOCKSIZE : 0;
    q->device = QLORA_DEVICE_HOST;
}

/* Pass 1: declares every output tensor. With double quant the length of a weight's
 * quant_state blob depends on its data (it holds nested_offset as text): qlora_quant_offset
 * reads the weight once for the offset pass 2's qlora_quantize will store, without quantizing. */
static int declare_all(job *j, qlora_st_writer *w) {
    for (size_t i = 0; i < j->count; i++) {
        const plan_item *it = &j->items[i];
        qlora_tensor t;
        qlora_qtensor q;
        int rc = 0;
        if (g_interrupted)
            return EXIT_INTERRUPTED;
        if (qlora_checkpoint_find(j->ckpt, it->name, &t) != QLORA_OK)
            return lib_fail(EXIT_INPUT, it->name);
        switch (it->act) {
        case ACT_COPY:
        case ACT_SKIP:
            if (qlora_st_writer_declare(w, it->name, t.dtype, t.ndim, t.shape) != QLORA_OK)
                return lib_fail(EXIT_OUTPUT, it->name);
            break;
        case ACT_QUANTIZE: {
            describe_qtensor(&t, &j->opt->quant, &q);
            if (j->opt->quant.double_quant) {
                if (j->tty) /* a plain log gets one line per tensor, in pass 2 */
                    progress(j, i, "scan", it->name);
                qlora_status s = qlora_quant_offset(j->ctx, &t, &j->opt->quant, &q.nested_offset);
                if (s != QLORA_OK)
                    return lib_fail(s == QLORA_ERR_OUT_OF_MEMORY ? EXIT_OUTPUT : EXIT_INPUT, it->name);
            }
            if (qlora_bnb_declare(w, it->name, &q) != QLORA_OK)
                return lib_fail(EXIT_OUTPUT, it->name);
            break;
        }
        case ACT_DEQUANTIZE:
            memset(&q, 0, sizeof q);
            if (qlora_bnb_load(j->ctx, j->ckpt, it->name, &q) != QLORA_OK)
                return lib_fail(EXIT_INPUT, it->name);
            if (qlora_st_writer_declare(w, it->name, q.dtype, q.ndim, q.shape) != QLORA_OK)
                rc = lib_fail(EXIT_OUTPUT, it->name);
            qlora_qtensor_free(j->ctx, &q);
            break;
        case ACT_DROP:
            break;
        }
        if (rc)
            return rc;
    }
    return 0;
}

/* Pass 2: converts and writes every tensor. */
static int write_all(job *j, qlora_st_writer *w) {
    for (size_t i = 0; i < j->count; i++) {
        const plan_item *it = &j->items[i];
        qlora_tensor t;
        qlora_qtensor q;
        int rc = 0;
        if (g_interrupted)
            return EXIT_INTERRUPTED;
        if (qlora_checkpoint_find(j->ckpt, it->name, &t) != QLORA_OK)
            return lib_fail(EXIT_INPUT, it->name);
        progress(j, i, action_name(it->act), it->name);
        memset(&q, 0, sizeof q);
        switch (it->act) {
        case ACT_COPY:
        case ACT_SKIP:
            /* Straight from the mapping: same dtype, same bytes. */
            if (qlora_st_writer_write(w, it->name, t.data, qlora_tensor_nbytes(&t)) != QLORA_OK)
                return lib_fail(EXIT_OUTPUT, it->name);
            if (it->act == ACT_COPY)
                j->st.copied++;
            else
                j->st.skipped++;
            break;
        case ACT_QUANTIZE:
            rc = quantize_one(j, it->name, &t, &q);
            if (rc == 0)
                rc = measure_error(j, it->name, &t, &q);
            if (rc == 0 && qlora_bnb_write(w, it->name, &q) != QLORA_OK)
                rc = lib_fail(EXIT_OUTPUT, it->name);
            if (rc == 0) {
                j->st.quantized++;
                j->st.quant_in_bytes += qlora_tensor_nbytes(&t);
                j->st.quant_out_bytes += qlora_qtensor_nbytes(&q);
                j->st.quant_params += (uint64_t)q.numel;
            }
            qlora_qtensor_free(j->ctx, &q);
            break;
        case ACT_DEQUANTIZE: {
            qlora_tensor out;
            memset(&out, 0, sizeof out);
            if (qlora_bnb_load(j->ctx, j->ckpt, it->name, &q) != QLORA_OK)
                return lib_fail(EXIT_INPUT, it->name);
            qlora_status s = qlora_tensor_init(&out, it->name, q.dtype, q.ndim, q.shape, NULL, QLORA_DEVICE_HOST);
            if (s == QLORA_OK)
                s = qlora_tensor_alloc(j->ctx, &out, 0, QLORA_MEM_WORKSPACE);
            if (s == QLORA_OK)
                s = qlora_dequantize(j->ctx, &q, &out);
            if (s != QLORA_OK)
                rc = lib_fail(s == QLORA_ERR_OUT_OF_MEMORY ? EXIT_OUTPUT : EXIT_INPUT, it->name);
            else if (qlora_st_writer_write(w, it->name, out.data, qlora_tensor_nbytes(&out)) != QLORA_OK)
                rc = lib_fail(EXIT_OUTPUT, it->name);
            if (rc == 0) {
                j->st.dequantized++;
                j->st.quant_in_bytes += qlora_qtensor_nbytes(&q);
                j->st.quant_out_bytes += qlora_tensor_nbytes(&out);
                j->st.quant_params += (uint64_t)q.numel;
            }
            qlora_tensor_free(j->ctx, &out);
            qlora_qtensor_free(j->ctx, &q);
            break;
        }
        case ACT_DROP:
            j->st.dropped++;
            break;
        }
        if (rc)
            return rc;
    }
    progress_done(j);
    return 0;
}

/* Streams the checkpoint through a writer at `path`. Returns 0 or an exit code. */
static int convert(job *j, const char *path, uint64_t max_shard_bytes) {
    qlora_st_writer *w = NULL;
    if (qlora_st_writer_open(path, max_shard_bytes, &w) != QLORA_OK)
        return lib_fail(EXIT_OUTPUT, "cannot create output");
    /* transformers rejects __metadata__ without "format" (spec §1.4). */
    int rc = qlora_st_writer_set_metadata(w, "format", "pt") == QLORA_OK ? 0 : lib_fail(EXIT_OUTPUT, path);
    if (rc == 0)
        rc = declare_all(j, w);
    if (rc == 0)
        rc = write_all(j, w);
    if (rc != 0) {
        progress_done(j);
        qlora_st_writer_abort(w);
        return rc;
    }
    if (qlora_st_writer_commit(w) != QLORA_OK) /* frees w either way */
        return lib_fail(EXIT_OUTPUT, "cannot finish output");
    return 0;
}

static void human_bytes(uint64_t b, char *out, size_t cap) {
    static const char *const unit[] = {"B", "kB", "MB", "GB", "TB"};
    double v = (double)b;
    int u = 0;
    while (v >= 1000 && u < 4) {
        v /= 1000;
        u++;
    }
    snprintf(out, cap, u ? "%.2f %s" : "%.0f %s", v, unit[u]);
}

static void print_summary(const job *j) {
    const stats *s = &j->st;
    char a[32], b[32];
    printf("%s -> %s\n", j->opt->in, j->opt->out);
    if (!j->opt->dequantize) {
        human_bytes(s->quant_in_bytes, a, sizeof a);
        human_bytes(s->quant_out_bytes, b, sizeof b);
        printf("  quant type:          %s, blocksize %d, %s\n", qlora_quant_type_name(j->opt->quant.type),
               j->opt->quant.blocksize, j->opt->quant.double_quant ? "double quant" : "float32 scales");
        printf("  tensors quantized:   %zu (%s -> %s)\n", s->quantized, a, b);
        printf("  tensors copied:      %zu (of which %zu weights kept by the skip list)\n", s->copied + s->skipped,
               s->skipped);
    } else {
        human_bytes(s->quant_in_bytes, a, sizeof a);
        human_bytes(s->quant_out_bytes, b, sizeof b);
        printf("  tensors dequantized: %zu (%s -> %s)\n", s->dequantized, a, b);
        printf("  tensors copied:      %zu\n", s->copied);
        printf("  keys dropped:        %zu (bitsandbytes quant state)\n", s->dropped);
    }
    human_bytes(s->file_bytes_in, a, sizeof a);
    human_bytes(s->file_bytes_out, b, sizeof b);
    printf("  checkpoint bytes:    %s -> %s (%llu -> %llu, %.1f%%)\n", a, b, (unsigned long long)s->file_bytes_in,
           (unsigned long long)s->file_bytes_out,
           s->file_bytes_in ? 100.0 * (double)s->file_bytes_out / (double)s->file_bytes_in : 0.0);
    if (!j->opt->dequantize) {
        printf("  bits per parameter:  %.3f (codes + scales of the quantized weights)\n",
               s->quant_params ? 8.0 * (double)s->quant_out_bytes / (double)s->quant_params : 0.0);
        printf("  relative RMS error:  %.5f\n", s->ref_sq > 0 ? sqrt(s->err_sq / s->ref_sq) : 0.0);
        printf("  max abs error:       %.6g\n", s->max_abs_err);
    }
}

/* ------------------------------------------------------------------ main */
/* Strips trailing slashes ("out/" -> "out") in place. */
static void strip_slashes(char *p) {
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        p[--n] = '\0';
}

/* Moves the finished temp directory to OUT, refusing to replace anything that appeared. */
static int publish_dir(const char *tmp, const char *out) {
    if (renameat2(AT_FDCWD, tmp, AT_FDCWD, out, RENAME_NOREPLACE) == 0)
        return 0;
    if (errno != EINVAL && errno != ENOSYS)
        return -1;
    struct stat st; /* file system without RENAME_NOREPLACE */
    if (lstat(out, &st) == 0) {
        errno = EEXIST;
        return -1;
    }
    return rename(tmp, out);
}

static int run_directory(job *j, const char *out) {
    input_files files;
    char *config = NULL;
    int rc = list_input_files(j->opt->in, &files);
    if (rc == 0)
        rc = edit_config(j->opt, j->skipped_modules, j->nskipped_modules, &config);
    if (rc) {
        free_input_files(&files);
        return rc;
    }
    j->st.file_bytes_in = files.total;
    uint64_t max_shard = j->opt->max_shard_given ? j->opt->max_shard_bytes : files.nshards > 1 ? files.largest : 0;

    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp-%ld", out, (long)getpid());
    if (mkdir(tmp, 0755) != 0) {
        tool_say("cannot create %s: %s", tmp, strerror(errno));
        free_input_files(&files);
        free(config);
        return EXIT_OUTPUT;
    }
    char *weights = max_shard ? strdup(tmp) : tool_path_join(tmp, "model.safetensors");
    if (!weights) {
        tool_say("out of memory");
        rc = EXIT_OUTPUT;
    }
    if (rc == 0)
        rc = convert(j, weights, max_shard);
    if (rc == 0)
        j->st.file_bytes_out = safetensors_bytes_in_dir(tmp);
    if (rc == 0 && config) {
        char *path = tool_path_join(tmp, "config.json");
        if (!path || tool_write_new_file(path, config, strlen(config)) != 0) {
            tool_say("cannot write %s/config.json: %s", tmp, path ? strerror(errno) : "out of memory");
            rc = EXIT_OUTPUT;
        }
        free(path);
    }
    if (rc == 0)
        rc = copy_other_files(j->opt, &files, tmp);
    if (rc == 0 && g_interrupted)
        rc = EXIT_INTERRUPTED;
    if (rc == 0 && publish_dir(tmp, out) != 0) {
        tool_say("cannot rename %s to %s: %s", tmp, out, strerror(errno));
        rc = EXIT_OUTPUT;
    }
    if (rc != 0)
        tool_remove_tree(tmp);
    free(weights);
    free(config);
    free_input_files(&files);
    return rc;
}

static int run_file(job *j, const char *out) {
    if (j->opt->max_shard_given) {
        tool_say("--max-shard-size needs a model directory as IN (OUT is then a directory)");
        return EXIT_USAGE;
    }
    j->st.file_bytes_in = tool_file_size(j->opt->in);
    int rc = convert(j, out, 0);
    if (rc == 0)
        j->st.file_bytes_out = tool_file_size(out);
    return rc;
}

int main(int argc, char **argv) {
    tool_cli_init(PROG);
    options opt;
    int rc = parse_args(argc, argv, &opt);
    if (rc >= 0) {
        free_options(&opt);
        return rc;
    }
    char *out = strdup(opt.out);
    if (!out) {
        tool_say("out of memory");
        free_options(&opt);
        return EXIT_OUTPUT;
    }
    strip_slashes(out);

    job j;
    memset(&j, 0, sizeof j);
    j.opt = &opt;
    j.tty = isatty(STDERR_FILENO);

    struct stat in_st, out_st;
    if (stat(opt.in, &in_st) != 0) {
        tool_say("cannot read %s: %s", opt.in, strerror(errno));
        rc = EXIT_INPUT;
    } else if (!S_ISDIR(in_st.st_mode) && !S_ISREG(in_st.st_mode)) {
        tool_say("%s is neither a .safetensors file nor a model directory", opt.in);
        rc = EXIT_INPUT;
    } else if (lstat(out, &out_st) == 0) {
        tool_say("%s already exists; refusing to overwrite it (remove it or choose another OUT)", out);
        rc = EXIT_OUTPUT;
    } else if (qlora_checkpoint_open(opt.in, &j.ckpt) != QLORA_OK) {
        rc = lib_fail(EXIT_INPUT, "cannot open the input checkpoint");
    } else if (qlora_ctx_create(NULL, &j.ctx) != QLORA_OK) {
        rc = lib_fail(EXIT_OUTPUT, "cannot create a CPU context");
    } else {
        rc = make_plan(&j);
    }

    if (rc == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sa.sa_flags = SA_RESTART;
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGHUP, &sa, NULL);
        rc = S_ISDIR(in_st.st_mode) ? run_directory(&j, out) : run_file(&j, out);
        if (rc == EXIT_INTERRUPTED)
            tool_say("interrupted; nothing written");
        else if (rc == 0)
            print_summary(&j);
    }

    for (size_t i = 0; i < j.nskipped_modules; i++)
        free(j.skipped_modules[i]);
    free(j.skipped_modules);
    free(j.items);
    qlora_ctx_free(j.ctx);
    qlora_checkpoint_close(j.ckpt);
    free_options(&opt);
    free(out);
    return rc;
}
