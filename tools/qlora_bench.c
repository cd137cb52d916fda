/*
 * qlora-bench: throughput of the shipped 4-bit kernels (NF4 + double quant, blocksize 64) on
 * each available backend, against a plain copy of the same bytes measured in the same run.
 *
 *   qlora-bench [--size MiB] [--iters N] [--backend cpu|cuda|all] [--json]
 *   qlora-bench linear ...   the QLoRA linear layer (tools/bench/bench_linear.c)
 *   qlora-bench adamw ...    the paged AdamW step (tools/bench/bench_adamw.c)
 *   qlora-bench model ...    a training step of whole Llama decoders (tools/bench/bench_model.c)
 *
 * Bytes are counted as moved through memory: quantize reads the BF16 input and writes codes +
 * scales; dequantize reads codes + scales and writes the output; a copy reads and writes the
 * buffer. Each operation runs once to warm up, then N timed times (synchronised around each
 * run); the median is reported. The CPU reference kernels are timed too, for the speedup of
 * the fast kernels (they run at most 3 times, being slow).
 */
#include <qlora.h>

#include "bench_util.h"
#include "bench_adamw.h"
#include "bench_linear.h"
#include "bench_model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { MAX_ROWS = 16, REFERENCE_MAX_ITERS = 3 };

typedef struct bench_row {
    const char *backend;   /* "cpu", "cpu-reference", "cuda" */
    const char *op;        /* "copy", "quantize", "dequantize_bf16", "dequantize_f32" */
    const char *label;     /* human-readable operation */
    double seconds;        /* median */
    double bytes;          /* bytes moved per run */
    double copy_gbps;      /* the same backend's copy, for the fraction (0 for none) */
} bench_row;

typedef struct bench {
    int64_t numel;         /* elements of the BF16 weight */
    int iters;
    int json;
    bench_row rows[MAX_ROWS];
    int nrows;
    char mismatch[256];    /* non-empty when fast and reference results differ */
} bench;

/* An operation under test: one timed call. */
typedef qlora_status (*bench_fn)(void *state);

/* Warmup + `iters` synchronised runs; *median_s gets the median time. */
static qlora_status time_op(qlora_ctx *ctx, bench_fn fn, void *state, int iters, double *median_s) {
    double times[1024];
    if (iters > 1024)
        iters = 1024;
    qlora_status st = fn(state);
    if (st == QLORA_OK)
        st = qlora_ctx_synchronize(ctx);
    for (int i = 0; i < iters && st == QLORA_OK; i++) {
        double t0 = bench_now_s();
        st = fn(state);
        if (st == QLORA_OK)
            st = qlora_ctx_synchronize(ctx);
        times[i] = bench_now_s() - t0;
    }
    if (st != QLORA_OK)
        return st;
    *median_s = bench_median(times, iters);
    return QLORA_OK;
}

/* ---- the operations */
typedef struct op_state {
    qlora_ctx *ctx;
    qlora_tensor src;       /* BF16 weight on the backend's device */
    qlora_tensor copy_dst;  /* same shape and dtype */
    qlora_tensor out_bf16, out_f32;
    qlora_qtensor q;        /* the quantized weight (kept from the last quantize) */
    qlora_quant_params params;
    int use_memcpy;         /* CPU copy baseline: memcpy; CUDA: device-to-device copy */
} op_state;

static qlora_status op_copy(void *p) {
    op_state *s = p;
    if (s->use_memcpy) {
        memcpy(s->copy_dst.data, s->src.data, qlora_tensor_nbytes(&s->src));
        return QLORA_OK;
    }
    return qlora_tensor_copy(s->ctx, &s->copy_dst, &s->src);
}

/* Quantize allocates its output: the previous result is freed first, so one stays live. */
static qlora_status op_quantize(void *p) {
    op_state *s = p;
    qlora_qtensor_free(s->ctx, &s->q);
    return qlora_quantize(s->ctx, &s->src, &s->params, &s->q);
}

static qlora_status op_dequantize_bf16(void *p) {
    op_state *s = p;
    return qlora_dequantize(s->ctx, &s->q, &s->out_bf16);
}

static qlora_status op_dequantize_f32(void *p) {
    op_state *s = p;
    return qlora_dequantize(s->ctx, &s->q, &s->out_f32);
}

/* ---- input data: N(0, 0.02^2) as BF16, like a freshly initialised weight */
static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static void fill_weights(uint16_t *x, int64_t n) {
    uint64_t rng = 12345;
    for (int64_t i = 0; i < n; i += 2) {
        double u1 = ((double)(next_u64(&rng) >> 11) + 1.0) * 0x1.0p-53;
        double u2 = (double)(next_u64(&rng) >> 11) * 0x1.0p-53;
        double r = 0.02 * sqrt(-2.0 * log(u1));
        x[i] = float_to_bf16((float)(r * cos(6.283185307179586 * u2)));
        if (i + 1 < n)
            x[i + 1] = float_to_bf16((float)(r * sin(6.283185307179586 * u2)));
    }
}

static void add_row(bench *b, const char *backend, const char *op, const char *label, double seconds,
                    double bytes, double copy_gbps) {
    if (b->nrows < MAX_ROWS)
        b->rows[b->nrows++] = (bench_row){backend, op, label, seconds, bytes, copy_gbps};
}

static void free_state(op_state *s) {
    qlora_qtensor_free(s->ctx, &s->q);
    qlora_tensor_free(s->ctx, &s->src);
    qlora_tensor_free(s->ctx, &s->copy_dst);
    qlora_tensor_free(s->ctx, &s->out_bf16);
    qlora_tensor_free(s->ctx, &s->out_f32);
}

/* Sets up the tensors of one backend: the input is copied from the host weights. */
static qlora_status setup_state(op_state *s, qlora_ctx *ctx, const uint16_t *host, int64_t numel, int full) {
    memset(s, 0, sizeof *s);
    s->ctx = ctx;
    s->params = qlora_quant_default_params(); /* NF4, blocksize 64, double quant */
    s->use_memcpy = qlora_ctx_backend(ctx) == QLORA_BACKEND_CPU;
    qlora_tensor host_t;
    int64_t shape[1] = {numel};
    qlora_status st = qlora_tensor_init(&host_t, "weights", QLORA_BF16, 1, shape, (void *)host, QLORA_DEVICE_HOST);
    if (st == QLORA_OK)
        st = qlora_tensor_init(&s->src, "weights", QLORA_BF16, 1, shape, NULL, QLORA_DEVICE_HOST);
    if (st == QLORA_OK)
        st = qlora_tensor_alloc(ctx, &s->src, 1, QLORA_MEM_WORKSPACE);
    if (st == QLORA_OK)
        st = qlora_tensor_copy(ctx, &s->src, &host_t);
    if (st == QLORA_OK)
        st = qlora_tensor_init(&s->out_bf16, "dequantized_bf16", QLORA_BF16, 1, shape, NULL, QLORA_DEVICE_HOST);
    if (st == QLORA_OK)
        st = qlora_tensor_alloc(ctx, &s->out_bf16, 1, QLORA_MEM_WORKSPACE);
    if (full) {
        if (st == QLORA_OK)
            st = qlora_tensor_init(&s->copy_dst, "copy", QLORA_BF16, 1, shape, NULL, QLORA_DEVICE_HOST);
        if (st == QLORA_OK)
            st = qlora_tensor_alloc(ctx, &s->copy_dst, 1, QLORA_MEM_WORKSPACE);
        if (st == QLORA_OK)
            st = qlora_tensor_init(&s->out_f32, "dequantized_f32", QLORA_F32, 1, shape, NULL, QLORA_DEVICE_HOST);
        if (st == QLORA_OK)
            st = qlora_tensor_alloc(ctx, &s->out_f32, 1, QLORA_MEM_WORKSPACE);
    }
    if (st == QLORA_OK)
        st = qlora_ctx_synchronize(ctx);
    return st;
}

/* Times copy, quantize and both dequantizations on one context; rows are added to b. */
static qlora_status bench_backend(bench *b, qlora_ctx *ctx, const char *name, const uint16_t *host,
                                  double *quant_s, double *dequant_s) {
    op_state s;
    qlora_status st = setup_state(&s, ctx, host, b->numel, 1);
    double t_copy = 0, t_quant = 0, t_deq16 = 0, t_deq32 = 0;
    if (st == QLORA_OK)
        st = time_op(ctx, op_copy, &s, b->iters, &t_copy);
    if (st == QLORA_OK)
        st = time_op(ctx, op_quantize, &s, b->iters, &t_quant);
    if (st == QLORA_OK)
        st = time_op(ctx, op_dequantize_bf16, &s, b->iters, &t_deq16);
    if (st == QLORA_OK)
        st = time_op(ctx, op_dequantize_f32, &s, b->iters, &t_deq32);
    if (st == QLORA_OK) {
        const double in_bytes = 2.0 * (double)b->numel, packed = (double)qlora_qtensor_nbytes(&s.q);
        const double copy_bytes = 2.0 * in_bytes, copy_gbps = copy_bytes / t_copy * 1e-9;
        add_row(b, name, "copy", s.use_memcpy ? "copy (memcpy)" : "copy (device)", t_copy, copy_bytes, copy_gbps);
        add_row(b, name, "quantize", "quantize bf16->nf4", t_quant, in_bytes + packed, copy_gbps);
        add_row(b, name, "dequantize_bf16", "dequantize nf4->bf16", t_deq16, packed + in_bytes, copy_gbps);
        add_row(b, name, "dequantize_f32", "dequantize nf4->f32", t_deq32, packed + 2.0 * in_bytes, copy_gbps);
        *quant_s = t_quant;
        *dequant_s = t_deq16;
    }
    free_state(&s);
    return st;
}

/* The scalar reference kernels on the same data: timings, and a check that the fast
 * kernels produced the same bytes (quantization is specified to be bit-identical). */
static qlora_status bench_reference(bench *b, const uint16_t *host, double copy_gbps, double *quant_s,
                                    double *dequant_s) {
    qlora_ctx_params params = qlora_ctx_default_params();
    qlora_ctx *ref = NULL, *fast = NULL;
    params.cpu_kernels = QLORA_CPU_REFERENCE;
    qlora_status st = qlora_ctx_create(&params, &ref);
    if (st == QLORA_OK)
        st = qlora_ctx_create(NULL, &fast);
    if (st != QLORA_OK) {
        qlora_ctx_free(ref);
        return st;
    }
    op_state s;
    qlora_qtensor q_fast;
    memset(&q_fast, 0, sizeof q_fast);
    int iters = b->iters < REFERENCE_MAX_ITERS ? b->iters : REFERENCE_MAX_ITERS;
    st = setup_state(&s, ref, host, b->numel, 0);
    if (st == QLORA_OK)
        st = time_op(ref, op_quantize, &s, iters, quant_s);
    if (st == QLORA_OK)
        st = time_op(ref, op_dequantize_bf16, &s, iters, dequant_s);
    if (st == QLORA_OK)
        st = qlora_quantize(fast, &s.src, &s.params, &q_fast);
    if (st == QLORA_OK) {
        const double in_bytes = 2.0 * (double)b->numel, packed = (double)qlora_qtensor_nbytes(&s.q);
        add_row(b, "cpu-reference", "quantize", "quantize bf16->nf4", *quant_s, in_bytes + packed, copy_gbps);
        add_row(b, "cpu-reference", "dequantize_bf16", "dequantize nf4->bf16", *dequant_s, packed + in_bytes,
                copy_gbps);
        size_t ncodes = (size_t)(s.q.numel + 1) / 2, nblocks = (size_t)s.q.nblocks;
        if (memcmp(s.q.codes, q_fast.codes, ncodes) != 0 || memcmp(s.q.qabsmax, q_fast.qabsmax, nblocks) != 0 ||
            s.q.nested_offset != q_fast.nested_offset)
            snprintf(b->mismatch, sizeof b->mismatch, "fast and reference quantization differ");
    }
    qlora_qtensor_free(fast, &q_fast);
    free_state(&s);
    qlora_ctx_free(fast);
    qlora_ctx_free(ref);
    return st;
}

static double gbps(const bench_row *r) { return r->bytes / r->seconds * 1e-9; }

static void print_table(const bench *b, double speedup_q, double speedup_d) {
    printf("qlora-bench %s: %.0f MiB of BF16 weights (%lld elements), NF4 + double quant, blocksize 64\n",
           qlora_version_string(), 2.0 * (double)b->numel / 1048576.0, (long long)b->numel);
    printf("median of %d runs (reference: %d); GB/s = bytes read + written per second\n\n", b->iters,
           b->iters < REFERENCE_MAX_ITERS ? b->iters : REFERENCE_MAX_ITERS);
    printf("%-14s %-22s %10s %9s %8s\n", "backend", "operation", "ms", "GB/s", "of copy");
    for (int i = 0; i < b->nrows; i++) {
        const bench_row *r = &b->rows[i];
        printf("%-14s %-22s %10.2f %9.2f %8.2f\n", r->backend, r->label, r->seconds * 1e3, gbps(r),
               r->copy_gbps > 0 ? gbps(r) / r->copy_gbps : 0.0);
    }
    if (speedup_q > 0)
        printf("\nCPU fast vs reference: quantize %.1fx, dequantize %.1fx faster\n", speedup_q, speedup_d);
    if (b->mismatch[0])
        printf("WARNING: %s\n", b->mismatch);
}

static void print_json(const bench *b, double speedup_q, double speedup_d) {
    printf("{\n  \"version\": \"%s\",\n  \"bytes\": %lld,\n  \"numel\": %lld,\n  \"iters\": %d,\n",
           qlora_version_string(), 2LL * (long long)b->numel, (long long)b->numel, b->iters);
    printf("  \"quant\": {\"type\": \"nf4\", \"blocksize\": 64, \"double_quant\": true},\n  \"results\": [\n");
    for (int i = 0; i < b->nrows; i++) {
        const bench_row *r = &b->rows[i];
        printf("    {\"backend\": \"%s\", \"op\": \"%s\", \"ms\": %.4f, \"bytes\": %.0f, \"gbps\": %.4f, "
               "\"fraction_of_copy\": %.4f}%s\n",
               r->backend, r->op, r->seconds * 1e3, r->bytes, gbps(r),
               r->copy_gbps > 0 ? gbps(r) / r->copy_gbps : 0.0, i + 1 < b->nrows ? "," : "");
    }
    printf("  ]");
    if (speedup_q > 0)
        printf(",\n  \"cpu_speedup_over_reference\": {\"quantize\": %.3f, \"dequantize_bf16\": %.3f}", speedup_q,
               speedup_d);
    printf(",\n  \"fast_matches_reference\": %s\n}\n", b->mismatch[0] ? "false" : "true");
}

static void usage(FILE *to) {
    fprintf(to,
            "usage: qlora-bench [--size MiB] [--iters N] [--backend cpu|cuda|all] [--json]\n"
            "       qlora-bench linear --help   (the QLoRA linear layer vs an unquantized one)\n"
            "       qlora-bench adamw --help    (the paged AdamW step vs a copy of the same bytes)\n"
            "       qlora-bench model --help    (a training step of whole models vs dense matmuls)\n"
            "Throughput of NF4 + double-quant (blocksize 64) quantize/dequantize vs a plain copy.\n"
            "  --size MiB     BF16 weight size (default 64)\n"
            "  --iters N      timed runs per operation, median reported (default 7)\n"
            "  --backend B    cpu, cuda or all (default: all available)\n"
            "  --json         print the results as JSON\n"
            "Exit codes: 0 ok, 1 bad usage, 2 a backend or kernel failed.\n");
}

static int parse_positive(const char *opt, const char *text, long max, long *out) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < 1 || v > max) {
        fprintf(stderr, "qlora-bench: %s expects an integer in 1..%ld, got '%s'\n", opt, max, text);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    long size_mib = 64, iters = 7;
    const char *backend = "all";
    int json = 0;
    if (argc > 1 && !strcmp(argv[1], "linear"))
        return bench_linear_main(argc - 1, argv + 1);
    if (argc > 1 && !strcmp(argv[1], "adamw"))
        return bench_adamw_main(argc - 1, argv + 1);
    if (argc > 1 && !strcmp(argv[1], "model"))
        return bench_model_main(argc - 1, argv + 1);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int takes_value = !strcmp(a, "--size") || !strcmp(a, "--iters") || !strcmp(a, "--backend");
        if (takes_value && i + 1 >= argc) {
            fprintf(stderr, "qlora-bench: %s needs a value (see --help)\n", a);
            return 1;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--size")) {
            if (parse_positive(a, argv[++i], 65536, &size_mib))
                return 1;
        } else if (!strcmp(a, "--iters")) {
            if (parse_positive(a, argv[++i], 1024, &iters))
                return 1;
        } else if (!strcmp(a, "--backend")) {
            backend = argv[++i];
            if (strcmp(backend, "cpu") && strcmp(backend, "cuda") && strcmp(backend, "all")) {
                fprintf(stderr, "qlora-bench: --backend must be cpu, cuda or all, got '%s'\n", backend);
                return 1;
            }
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else {
            fprintf(stderr, "qlora-bench: unknown argument '%s' (see --help)\n", a);
            return 1;
        }
    }

    bench b;
    memset(&b, 0, sizeof b);
    b.numel = (int64_t)size_mib * 1048576 / 2;
    b.iters = (int)iters;
    b.json = json;
    uint16_t *host = malloc((size_t)b.numel * sizeof *host);
    if (!host) {
        fprintf(stderr, "qlora-bench: cannot allocate %ld MiB of host memory\n", size_mib);
        return 2;
    }
    fill_weights(host, b.numel);

    int rc = 0;
    double speedup_q = 0, speedup_d = 0;
    if (strcmp(backend, "cuda") != 0) {
        qlora_ctx *ctx = NULL;
        double fast_q = 0, fast_d = 0, ref_q = 0, ref_d = 0;
        qlora_status st = qlora_ctx_create(NULL, &ctx);
        if (st == QLORA_OK)
            st = bench_backend(&b, ctx, "cpu", host, &fast_q, &fast_d);
        qlora_ctx_free(ctx);
        if (st == QLORA_OK)
            st = bench_reference(&b, host, b.rows[0].copy_gbps, &ref_q, &ref_d);
        if (st != QLORA_OK) {
            fprintf(stderr, "qlora-bench: cpu: %s\n", qlora_last_error());
            rc = 2;
        } else {
            speedup_q = ref_q / fast_q;
            speedup_d = ref_d / fast_d;
        }
    }
    if (rc == 0 && strcmp(backend, "cpu") != 0) {
        qlora_ctx_params params = qlora_ctx_default_params();
        params.backend = QLORA_BACKEND_CUDA;
        qlora_ctx *ctx = NULL;
        double q = 0, d = 0;
        if (!qlora_has_cuda_backend() || qlora_cuda_device_count() == 0) {
            const char *why = qlora_has_cuda_backend() ? "no CUDA device visible" : "built without CUDA";
            fprintf(stderr, "qlora-bench: cuda: skipped (%s)\n", why);
            if (!strcmp(backend, "cuda"))
                rc = 2;
        } else {
            qlora_status st = qlora_ctx_create(&params, &ctx);
            if (st == QLORA_OK)
                st = bench_backend(&b, ctx, "cuda", host, &q, &d);
            qlora_ctx_free(ctx);
            if (st != QLORA_OK) {
                fprintf(stderr, "qlora-bench: cuda: %s\n", qlora_last_error());
                rc = 2;
            }
        }
    }
    free(host);
    if (b.nrows > 0) {
        if (json)
            print_json(&b, speedup_q, speedup_d);
        else
            print_table(&b, speedup_q, speedup_d);
    }
    if (b.mismatch[0])
        rc = 2;
    return rc;
}
