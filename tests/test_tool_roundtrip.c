/*
 * The command-line tools checked through the library: make-example-model writes a model with
 * a fresh seed, qlora-quantize converts it, and the files are read back with the checkpoint
 * reader. The quantized weights must be exactly what qlora_quantize computes, everything else
 * byte-identical, and --dequantize must restore dtypes and shapes with a small error.
 * (tests/cli_quantize.sh covers the command line itself: options, messages, exit codes.)
 */
#include "half.h"
#include "testutil.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXAMPLE_LAYERS 2
#define EXAMPLE_TENSORS (3 + 9 * EXAMPLE_LAYERS)
#define EXAMPLE_QUANTIZED (7 * EXAMPLE_LAYERS)

/* Runs a shell command; the test fails when it does not exit 0. */
static void run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void run(const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    ck_assert_msg(rc == 0, "command failed (%d): %s", rc, cmd);
}

static const char *bin_dir(void) {
    const char *b = getenv("QLORA_BIN");
    ck_assert_msg(b && *b, "QLORA_BIN is not set");
    return b;
}

/* An example model in dir/model, with this run's seed. */
static void make_model(const char *dir) {
    run("'%s/make-example-model' '%s/model' --layers %d --seed %llu >/dev/null", bin_dir(), dir, EXAMPLE_LAYERS,
        (unsigned long long)(tu_seed() % 1000000007ULL));
}

static qlora_checkpoint *open_ckpt(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    qlora_checkpoint *c = NULL;
    ck_assert_qlora_ok(qlora_checkpoint_open(path, &c));
    return c;
}

static int is_projection(const char *name) {
    return strstr(name, "_proj.weight") != NULL && strncmp(name, "model.layers.", 13) == 0;
}

static float to_float(const qlora_tensor *t, int64_t i) {
    uint16_t h;
    memcpy(&h, (const char *)t->data + 2 * i, 2);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void assert_same_tensor(const qlora_tensor *a, const qlora_tensor *b, const char *name) {
    ck_assert_msg(a->dtype == b->dtype && a->ndim == b->ndim, "%s: dtype/rank differ", name);
    for (int d = 0; d < a->ndim; d++)
        ck_assert_msg(a->shape[d] == b->shape[d], "%s: dim %d differs", name, d);
    ck_assert_msg(memcmp(a->data, b->data, qlora_tensor_nbytes(a)) == 0, "%s: bytes differ", name);
}

/* Every weight the tool quantized equals the library's own quantization of the original,
 * and every other tensor is the original, byte for byte. */
static void check_quantized(const char *dir, const char *out_name, const qlora_quant_params *params) {
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    qlora_checkpoint *orig = open_ckpt(dir, "model"), *quant = open_ckpt(dir, out_name);
    ck_assert_uint_eq(qlora_checkpoint_count(orig), EXAMPLE_TENSORS);
    const size_t keys_per_weight = params->double_quant ? 6 : 4;
    ck_assert_uint_eq(qlora_checkpoint_count(quant),
                      EXAMPLE_TENSORS - EXAMPLE_QUANTIZED + EXAMPLE_QUANTIZED * keys_per_weight);
    int quantized = 0;
    for (size_t i = 0; i < qlora_checkpoint_count(orig); i++) {
        const char *name = qlora_checkpoint_name(orig, i);
        qlora_tensor src, got;
        ck_assert_qlora_ok(qlora_checkpoint_find(orig, name, &src));
        ck_assert_msg(qlora_bnb_is_quantized(quant, name) == is_projection(name), "%s: quantized is %d", name,
                      qlora_bnb_is_quantized(quant, name));
        if (!is_projection(name)) {
            ck_assert_qlora_ok(qlora_checkpoint_find(quant, name, &got));
            assert_same_tensor(&src, &got, name);
            continue;
        }
        qlora_qtensor from_file, expected;
        memset(&from_file, 0, sizeof from_file);
        memset(&expected, 0, sizeof expected);
        ck_assert_qlora_ok(qlora_bnb_load(ctx, quant, name, &from_file));
        ck_assert_qlora_ok(qlora_quantize(ctx, &src, params, &expected));
        ck_assert_int_eq(from_file.type, params->type);
        ck_assert_int_eq(from_file.blocksize, params->blocksize);
        ck_assert_int_eq(from_file.double_quant, params->double_quant);
        ck_assert_int_eq(from_file.dtype, QLORA_BF16);
        ck_assert_int_eq(from_file.ndim, 2);
        ck_assert(from_file.shape[0] == src.shape[0] && from_file.shape[1] == src.shape[1]);
        ck_assert_msg(memcmp(from_file.codes, expected.codes, (size_t)(expected.numel + 1) / 2) == 0,
                      "%s: codes differ from qlora_quantize", name);
        if (params->double_quant) {
            ck_assert(memcmp(from_file.qabsmax, expected.qabsmax, (size_t)expected.nblocks) == 0);
            ck_assert(memcmp(from_file.nested_absmax, expected.nested_absmax,
                             (size_t)expected.nested_nblocks * sizeof(float)) == 0);
            ck_assert(from_file.nested_offset == expected.nested_offset);
        } else {
            ck_assert(memcmp(from_file.absmax, expected.absmax, (size_t)expected.nblocks * sizeof(float)) == 0);
        }
        qlora_qtensor_free(ctx, &from_file);
        qlora_qtensor_free(ctx, &expected);
        quantized++;
    }
    ck_assert_int_eq(quantized, EXAMPLE_QUANTIZED);
    qlora_checkpoint_close(quant);
    qlora_checkpoint_close(orig);
    qlora_ctx_free(ctx);
}

START_TEST(test_quantize_nf4_double_quant) {
    char *dir = tu_tempdir();
    make_model(dir);
    run("'%s/qlora-quantize' --quiet '%s/model' '%s/q' >/dev/null", bin_dir(), dir, dir);
    qlora_quant_params p = qlora_quant_default_params();
    check_quantized(dir, "q", &p);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_quantize_fp4_single_file) {
    char *dir = tu_tempdir();
    make_model(dir);
    run("'%s/qlora-quantize' --quiet '%s/model/model.safetensors' '%s/q.safetensors' --type fp4 --blocksize 256 "
        "--no-double-quant >/dev/null",
        bin_dir(), dir, dir);
    qlora_quant_params p = {QLORA_QUANT_FP4, 256, 0};
    check_quantized(dir, "q.safetensors", &p);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* --dequantize restores every tensor's dtype and shape: the weights as the library dequantizes
 * the stored ones (close to the originals), the rest unchanged; sharding does not change a
 * single tensor. */
START_TEST(test_dequantize_and_shards) {
    char *dir = tu_tempdir();
    make_model(dir);
    run("'%s/qlora-quantize' --quiet '%s/model' '%s/q' >/dev/null", bin_dir(), dir, dir);
    run("'%s/qlora-quantize' --quiet '%s/model' '%s/qs' --max-shard-size 300KB >/dev/null", bin_dir(), dir, dir);
    run("'%s/qlora-quantize' --quiet --dequantize '%s/qs' '%s/d' >/dev/null", bin_dir(), dir, dir);

    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    qlora_checkpoint *orig = open_ckpt(dir, "model"), *q = open_ckpt(dir, "q"), *qs = open_ckpt(dir, "qs"),
                     *d = open_ckpt(dir, "d");
    ck_assert_uint_eq(qlora_checkpoint_count(qs), qlora_checkpoint_count(q));
    for (size_t i = 0; i < qlora_checkpoint_count(q); i++) {
        const char *name = qlora_checkpoint_name(q, i);
        qlora_tensor a, b;
        ck_assert_str_eq(name, qlora_checkpoint_name(qs, i));
        ck_assert_qlora_ok(qlora_checkpoint_find(q, name, &a));
        ck_assert_qlora_ok(qlora_checkpoint_find(qs, name, &b));
        assert_same_tensor(&a, &b, name);
    }

    ck_assert_uint_eq(qlora_checkpoint_count(d), EXAMPLE_TENSORS);
    for (size_t i = 0; i < qlora_checkpoint_count(orig); i++) {
        const char *name = qlora_checkpoint_name(orig, i);
        qlora_tensor src, back;
        ck_assert_qlora_ok(qlora_checkpoint_find(orig, name, &src));
        ck_assert_qlora_ok(qlora_checkpoint_find(d, name, &back));
        ck_assert_msg(!qlora_bnb_is_quantized(d, name), "%s is still quantized", name);
        if (!is_projection(name)) {
            assert_same_tensor(&src, &back, name);
            continue;
        }
        ck_assert_int_eq(back.dtype, QLORA_BF16);
        ck_assert(back.ndim == 2 && back.shape[0] == src.shape[0] && back.shape[1] == src.shape[1]);
        /* Exactly the library's dequantization of the stored weight... */
        qlora_qtensor stored;
        qlora_tensor expected;
        memset(&stored, 0, sizeof stored);
        ck_assert_qlora_ok(qlora_bnb_load(ctx, q, name, &stored));
        ck_assert_qlora_ok(qlora_tensor_init(&expected, name, QLORA_BF16, 2, src.shape, NULL, QLORA_DEVICE_HOST));
        ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &expected, 0, QLORA_MEM_WORKSPACE));
        ck_assert_qlora_ok(qlora_dequantize(ctx, &stored, &expected));
        assert_same_tensor(&expected, &back, name);
        /* ...and close to the original: NF4 on Gaussian weights gives ~10% relative RMS error. */
        double err = 0, ref = 0;
        for (int64_t k = 0; k < qlora_tensor_numel(&src); k++) {
            double x = to_float(&src, k), e = to_float(&back, k) - x;
            err += e * e;
            ref += x * x;
        }
        ck_assert_msg(ref > 0 && sqrt(err / ref) < 0.12, "%s: relative RMS error %g", name, sqrt(err / ref));
        qlora_tensor_free(ctx, &expected);
        qlora_qtensor_free(ctx, &stored);
    }
    qlora_checkpoint_close(d);
    qlora_checkpoint_close(qs);
    qlora_checkpoint_close(q);
    qlora_checkpoint_close(orig);
    qlora_ctx_free(ctx);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* Runs a command and returns its stdout (malloc'ed) and exit status. */
static char *capture(int *status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *capture(int *status, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    FILE *p = popen(cmd, "r");
    ck_assert_msg(p != NULL, "popen %s", cmd);
    char *out = calloc(1, 65536);
    size_t n = fread(out, 1, 65535, p);
    out[n] = '\0';
    int rc = pclose(p);
    *status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    return out;
}

static double summary_number(const char *summary, const char *label) {
    const char *at = strstr(summary, label);
    ck_assert_msg(at != NULL, "summary lacks '%s': %s", label, summary);
    return strtod(at + strlen(label), NULL);
}

/* Writes F32 and F16 weights (2-D, odd-sized so the last block is partial) to one file. */
static void write_mixed(const char *path, const float *a, const float *b, int64_t rows, int64_t cols) {
    int64_t shape[2] = {rows, cols}, n = rows * cols;
    uint16_t *b16 = malloc((size_t)n * sizeof *b16);
    for (int64_t i = 0; i < n; i++)
        b16[i] = ql_f32_to_f16(b[i]);
    qlora_st_writer *w = NULL;
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "a.weight", QLORA_F32, 2, shape));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "b.weight", QLORA_F16, 2, shape));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "a.weight", a, (size_t)n * sizeof *a));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "b.weight", b16, (size_t)n * sizeof *b16));
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    free(b16);
}

/* F32 and F16 weights: the tool's file holds qlora_quantize's bytes with the original dtype
 * recorded, and its reported error equals the error computed here from the library. */
START_TEST(test_quantize_f32_f16_inputs) {
    enum { ROWS = 37, COLS = 91 }; /* 3367 elements: 52 full blocks of 64 and a partial one */
    const int64_t n = ROWS * COLS;
    char *dir = tu_tempdir(), in[4096], out[4096];
    snprintf(in, sizeof in, "%s/mixed.safetensors", dir);
    snprintf(out, sizeof out, "%s/q.safetensors", dir);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    tu_fill_normal(&rng, a, n, 0.05f);
    tu_fill_normal(&rng, b, n, 3.0f);
    write_mixed(in, a, b, ROWS, COLS);

    int status;
    char *summary = capture(&status, "'%s/qlora-quantize' --quiet '%s' '%s'", bin_dir(), in, out);
    ck_assert_msg(status == 0, "qlora-quantize exited %d: %s", status, summary);
    ck_assert_int_eq((int)summary_number(summary, "tensors quantized:"), 2);

    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    qlora_checkpoint *src = NULL, *q = NULL;
    ck_assert_qlora_ok(qlora_checkpoint_open(in, &src));
    ck_assert_qlora_ok(qlora_checkpoint_open(out, &q));
    const qlora_quant_params params = qlora_quant_default_params();
    const char *names[2] = {"a.weight", "b.weight"};
    const qlora_dtype dtypes[2] = {QLORA_F32, QLORA_F16};
    double err = 0, ref = 0, max_abs = 0;
    for (int k = 0; k < 2; k++) {
        qlora_tensor t, back;
        qlora_qtensor stored, expected;
        memset(&stored, 0, sizeof stored);
        memset(&expected, 0, sizeof expected);
        ck_assert_qlora_ok(qlora_checkpoint_find(src, names[k], &t));
        ck_assert_qlora_ok(qlora_bnb_load(ctx, q, names[k], &stored));
        ck_assert_qlora_ok(qlora_quantize(ctx, &t, &params, &expected));
        ck_assert_int_eq(stored.dtype, dtypes[k]);
        ck_assert(memcmp(stored.codes, expected.codes, (size_t)(n + 1) / 2) == 0);
        ck_assert(memcmp(stored.qabsmax, expected.qabsmax, (size_t)expected.nblocks) == 0);
        ck_assert_qlora_ok(qlora_tensor_init(&back, names[k], QLORA_F32, 2, t.shape, NULL, QLORA_DEVICE_HOST));
        ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &back, 0, QLORA_MEM_WORKSPACE));
        ck_assert_qlora_ok(qlora_dequantize(ctx, &stored, &back));
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            float x = k == 0 ? a[i] : (memcpy(&h, (const char *)t.data + 2 * i, 2), ql_f16_to_f32(h));
            double e = (double)((float *)back.data)[i] - x;
            err += e * e;
            ref += (double)x * x;
            max_abs = fabs(e) > max_abs ? fabs(e) : max_abs;
        }
        qlora_tensor_free(ctx, &back);
        qlora_qtensor_free(ctx, &stored);
        qlora_qtensor_free(ctx, &expected);
    }
    double rel = sqrt(err / ref);
    ck_assert_msg(fabs(summary_number(summary, "relative RMS error:") - rel) <= 1e-5, "reported %s, computed %.6f",
                  summary, rel);
    ck_assert_msg(fabs(summary_number(summary, "max abs error:") - max_abs) <= 1e-5 * max_abs, "max abs %g",
                  max_abs);
    qlora_checkpoint_close(q);
    qlora_checkpoint_close(src);
    qlora_ctx_free(ctx);
    free(summary);

    /* A non-finite weight: input error (exit 2) naming the tensor, and no output. */
    b[n / 2] = NAN;
    snprintf(in, sizeof in, "%s/nan.safetensors", dir);
    snprintf(out, sizeof out, "%s/nan_q.safetensors", dir);
    write_mixed(in, a, b, ROWS, COLS);
    summary = capture(&status, "'%s/qlora-quantize' --quiet '%s' '%s' 2>&1", bin_dir(), in, out);
    ck_assert_msg(status == 2, "exit %d: %s", status, summary);
    ck_assert_msg(strstr(summary, "b.weight") != NULL, "message lacks the tensor: %s", summary);
    ck_assert_int_eq(access(out, F_OK), -1);
    free(summary);
    free(a);
    free(b);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

static Suite *tool_suite(void) {
    Suite *s = suite_create("tools");
    TCase *tc = tcase_create("quantize_cli");
    tcase_add_test(tc, test_quantize_nf4_double_quant);
    tcase_add_test(tc, test_quantize_fp4_single_file);
    tcase_add_test(tc, test_dequantize_and_shards);
    tcase_add_test(tc, test_quantize_f32_f16_inputs);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(tool_suite()); }
