/*
 * `qlora-bench model [--sizes H,...] [--layers N] [--seq N] [--micro-batch N] [--rank N]
 *                    [--vocab N] [--iters N] [--backend cpu|cuda|all] [--json]`
 *
 * For each hidden size H, on each backend, in one run:
 *  - a random Llama decoder (qlora_model_write_random into a temp dir): I = 256·ceil(⌊8H/3⌋/256),
 *    head_dim 128 from H = 4096 up (so H 4096 is Llama-7B's layer: I 11008, 32 heads), else 64,
 *    no grouped-query attention, vocab 32000, untied; loaded with the QLoRA recipe (NF4 + double
 *    quant, blocksize 64; adapters of rank r, alpha 16, dropout 0.1 on all seven projections);
 *  - one training micro-batch of micro_batch packed sequences of seq tokens (T tokens),
 *    qlora_model_forward_backward with activation checkpointing: the median of N runs after one
 *    warm-up, as tokens/s;
 *  - FLOPs counted: 6·P·T, P = the decoder layers' linear weights (L·7 matrices): forward 2·P·T,
 *    the checkpointed layer's forward again in the backward 2·P·T, the gradient of each layer's
 *    input dX = dY·W 2·P·T (the frozen 4-bit weights need no dW). Not counted: the adapters
 *    (8·r·(in + out)·T per projection), attention scores, lm_head (4·V·H·T: forward and dX; in
 *    the JSON), norms, the loss;
 *  - the reference: Y[T, out] = X[T, in]·W[out, in]ᵀ for the seven projection shapes, dense
 *    (F32 OpenBLAS sgemm on the CPU, BF16 cuBLAS with FP32 compute on CUDA), each the median of
 *    N runs; its FLOP rate 2·T·Σ out·in / Σ time. ratio = our FLOP rate / the dense rate: how
 *    much of the plain matmul rate the 4-bit layer reaches, all the step's other work included;
 *  - memory: the accountant's peak (host on the CPU, device on CUDA) from load through the runs
 *    against qlora_mem_estimate(QLORA_REGIME_QLORA) of the same settings with no optimizer
 *    state (the bench runs no optimizer step).
 */
#include "bench_util.h"
#include "bench_model.h"
#include "tool_cli.h"
#include "tool_files.h"

#include <qlora.h>

#include <cblas.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef QLORA_BENCH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

enum { BM_MAX_SIZES = 8, BM_MAX_ROWS = 2 * BM_MAX_SIZES, BM_MAX_ITERS = 256 };
#define BM_INIT_STD 0.02
#define BM_SEED 1

static const int64_t cpu_default_sizes[] = {512, 1024, 2048};
static const int64_t cuda_default_sizes[] = {4096};

/* What the command line asked; 0 fields take the backend's default. */
typedef struct bm_opts {
    int64_t sizes[BM_MAX_SIZES];
    int nsizes;
    int64_t layers, seq, micro_batch, rank, vocab;
    int iters, json;
} bm_opts;

typedef struct bm_row {
    const char *backend;
    qlora_model_config cfg;
    int64_t seq, micro_batch, tokens, rank;
    int iters;
    double step_s;          /* median forward + backward */
    double dense_layer_s;   /* Σ over the seven projections of the median dense GEMM, M = T */
    uint64_t params_linear; /* P */
    uint64_t peak, estimate;
} bm_row;

typedef struct bm_run {
    bm_row rows[BM_MAX_ROWS];
    int nrows, json;
    char err[1024];
} bm_run;

static void set_err(bm_run *run, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(bm_run *run, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(run->err, sizeof run->err, fmt, ap);
    va_end(ap);
}

/* ---- timing */
/* ---- the model shape */
static qlora_model_config bench_config(int64_t hidden, int64_t layers, int64_t vocab) {
    qlora_model_config c;
    memset(&c, 0, sizeof c);
    c.hidden_size = hidden;
    c.intermediate_size = ((8 * hidden / 3) + 255) / 256 * 256; /* Llama's rule: 4096 -> 11008 */
    c.num_layers = layers;
    c.head_dim = hidden >= 4096 && hidden % 128 == 0 ? 128 : 64;
    c.num_heads = c.num_kv_heads = hidden / c.head_dim;
    c.vocab_size = vocab;
    c.rope_theta = 10000.0;
    c.rms_norm_eps = 1e-5;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    snprintf(c.hidden_act, sizeof c.hidden_act, "silu");
    snprintf(c.name, sizeof c.name, "%s", hidden == 4096 ? "llama-7b layers" : "llama-style");
    return c;
}

/* The seven projections [out, in] of one layer, in checkpoint order. */
static void layer_shapes(const qlora_model_config *c, int64_t out[7], int64_t in[7]) {
    /* (no `I`: <cblas.h> brings <complex.h>, whose I is a macro) */
    const int64_t H = c->hidden_size, inter = c->intermediate_size, qd = c->num_heads * c->head_dim;
    const int64_t kvd = c->num_kv_heads * c->head_dim;
    const int64_t o[7] = {qd, kvd, kvd, H, inter, inter, H}, i[7] = {H, H, H, qd, H, H, inter};
    memcpy(out, o, sizeof o);
    memcpy(in, i, sizeof i);
}

/* ---- the dense reference: Y = X·Wᵀ per projection shape, M = T */
static int dense_cpu(const qlora_model_config *c, int64_t T, int iters, double *layer_s, bm_run *run) {
    int64_t out[7], in[7], max_in = 0, max_out = 0;
    layer_shapes(c, out, in);
    for (int p = 0; p < 7; p++) {
        max_in = in[p] > max_in ? in[p] : max_in;
        max_out = out[p] > max_out ? out[p] : max_out;
    }
    float *x = malloc((size_t)(T * max_in) * sizeof *x), *w = malloc((size_t)(max_out * max_in) * sizeof *w);
    float *y = malloc((size_t)(T * max_out) * sizeof *y);
    if (!x || !w || !y) {
        free(x);
        free(w);
        free(y);
        set_err(run, "out of memory for the dense reference (T %lld, %lld x %lld)", (long long)T, (long long)max_out,
                (long long)max_in);
        return -1;
    }
    uint64_t rng = 7;
    for (int64_t i = 0; i < T * max_in; i++)
        x[i] = bench_uniform(&rng, 1.0f);
    for (int64_t i = 0; i < max_out * max_in; i++)
        w[i] = bench_uniform(&rng, 0.035f); /* standard deviation 0.02 */
    double t[BM_MAX_ITERS];
    *layer_s = 0;
    for (int p = 0; p < 7; p++) {
        for (int k = -1; k < iters; k++) { /* k = -1: warm-up */
            double t0 = bench_now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)out[p], (int)in[p], 1.0f, x, (int)in[p],
                        w, (int)in[p], 0.0f, y, (int)out[p]);
            if (k >= 0)
                t[k] = bench_now_s() - t0;
        }
        *layer_s += bench_median(t, iters);
    }
    free(x);
    free(w);
    free(y);
    return 0;
}

#ifdef QLORA_BENCH_CUDA
static int dense_cuda(const qlora_model_config *c, int64_t T, int iters, double *layer_s, bm_run *run) {
    int64_t out[7], in[7], max_in = 0, max_out = 0;
    layer_shapes(c, out, in);
    for (int p = 0; p < 7; p++) {
        max_in = in[p] > max_in ? in[p] : max_in;
        max_out = out[p] > max_out ? out[p] : max_out;
    }
    const size_t nx = (size_t)(T * max_in), nw = (size_t)(max_out * max_in), ny = (size_t)(T * max_out);
    uint16_t *host = malloc((nx > nw ? nx : nw) * sizeof *host);
    void *x = NULL, *w = NULL, *y = NULL;
    cublasHandle_t h = NULL;
    int rc = -1;
    if (!host) {
        set_err(run, "out of memory for the dense reference");
        return -1;
    }
    if (cudaMalloc(&x, nx * 2) != cudaSuccess || cudaMalloc(&w, nw * 2) != cudaSuccess ||
        cudaMalloc(&y, ny * 2) != cudaSuccess || cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        set_err(run, "dense reference: cannot allocate %zu bytes on the GPU or create a cuBLAS handle",
                2 * (nx + nw + ny));
        goto done;
    }
    uint64_t rng = 7;
    void *dst[2] = {x, w};
    size_t n[2] = {nx, nw};
    float scale[2] = {1.0f, 0.035f};
    for (int b = 0; b < 2; b++) {
        for (size_t i = 0; i < n[b]; i++) {
            float v = bench_uniform(&rng, scale[b]);
            uint32_t u;
            memcpy(&u, &v, 4);
            host[i] = (uint16_t)(u >> 16);
        }
        if (cudaMemcpy(dst[b], host, n[b] * 2, cudaMemcpyHostToDevice) != cudaSuccess) {
            set_err(run, "dense reference: cudaMemcpy failed");
            goto done;
        }
    }
    double t[BM_MAX_ITERS];
    const float one = 1.0f, zero = 0.0f;
    *layer_s = 0;
    for (int p = 0; p < 7; p++) {
        for (int k = -1; k < iters; k++) {
            double t0 = bench_now_s();
            /* row-major Y = X·Wᵀ is column-major Yᵀ = W·Xᵀ: W stored [out, in] is Wᵀ column-major */
            cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)out[p], (int)T, (int)in[p], &one, w,
                                             CUDA_R_16BF, (int)in[p], x, CUDA_R_16BF, (int)in[p], &zero, y,
                                             CUDA_R_16BF, (int)out[p], CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (st != CUBLAS_STATUS_SUCCESS || cudaDeviceSynchronize() != cudaSuccess) {
                set_err(run, "dense reference: cublasGemmEx failed (status %d)", (int)st);
                goto done;
            }
            if (k >= 0)
                t[k] = bench_now_s() - t0;
        }
        *layer_s += bench_median(t, iters);
    }
    rc = 0;
done:
    if (h)
        cublasDestroy(h);
    cudaFree(x);
    cudaFree(w);
    cudaFree(y);
    free(host);
    return rc;
}
#endif

/* ---- the model */
typedef struct bm_batch {
    int32_t *tokens, *labels, *seq_start;
    int64_t T;
} bm_batch;

/* micro_batch packed sequences of seq random tokens; each label is the next token. */
static int make_batch(int64_t seq, int64_t micro_batch, int64_t vocab, bm_batch *b) {
    b->T = seq * micro_batch;
    b->tokens = malloc((size_t)b->T * sizeof *b->tokens);
    b->labels = malloc((size_t)b->T * sizeof *b->labels);
    b->seq_start = malloc((size_t)b->T * sizeof *b->seq_start);
    if (!b->tokens || !b->labels || !b->seq_start)
        return -1;
    uint64_t rng = 11;
    for (int64_t t = 0; t < b->T; t++)
        b->tokens[t] = (int32_t)(bench_rng_next(&rng) % (uint64_t)vocab);
    for (int64_t t = 0; t < b->T; t++) {
        b->seq_start[t] = (int32_t)(t / seq * seq);
        b->labels[t] = (t + 1) % seq == 0 ? -100 : b->tokens[t + 1];
    }
    return 0;
}

static void free_batch(bm_batch *b) {
    free(b->tokens);
    free(b->labels);
    free(b->seq_start);
}

/* Writes the model into a fresh temp dir, loads it, times the training step, reads the peak. */
static int model_step(bm_row *row, int cuda, bm_run *run) {
    const char *base = getenv("TMPDIR");
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s/qlora-bench-model-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmp)) {
        set_err(run, "cannot create a temp directory %s: %s", tmp, strerror(errno));
        return -1;
    }
    char *dir = tool_path_join(tmp, "model");
    qlora_ctx *ctx = NULL;
    qlora_model *model = NULL;
    bm_batch batch = {0};
    int rc = -1;
    qlora_ctx_params params = qlora_ctx_default_params();
    if (cuda)
        params.backend = QLORA_BACKEND_CUDA;
    qlora_model_load_opts opts = qlora_model_load_default_opts(); /* NF4 + DQ, all-linear adapters */
    opts.lora.rank = row->rank;
    if (!dir || make_batch(row->seq, row->micro_batch, row->cfg.vocab_size, &batch) != 0) {
        set_err(run, "out of memory");
        goto done;
    }
    if (qlora_model_write_random(&row->cfg, dir, BM_SEED, BM_INIT_STD) != QLORA_OK ||
        qlora_ctx_create(&params, &ctx) != QLORA_OK || qlora_model_load(ctx, dir, &opts, &model) != QLORA_OK) {
        set_err(run, "%s", qlora_last_error());
        goto done;
    }
    tool_remove_tree(tmp); /* loaded: the file is no longer needed */
    qlora_batch in = {batch.tokens, NULL, batch.seq_start, batch.labels, batch.T};
    qlora_train_step_opts step = qlora_train_step_default_opts(); /* checkpointing on */
    double t[BM_MAX_ITERS];
    for (int k = -1; k < row->iters; k++) {
        qlora_train_step_result res;
        step.rng_stream = (uint64_t)(k + 1);
        double t0 = bench_now_s();
        if (qlora_model_forward_backward(model, &in, &step, &res) != QLORA_OK || qlora_ctx_synchronize(ctx) != QLORA_OK) {
            set_err(run, "%s", qlora_last_error());
            goto done;
        }
        if (k >= 0)
            t[k] = bench_now_s() - t0;
    }
    row->step_s = bench_median(t, row->iters);
    qlora_mem_stats st;
    if (qlora_mem_get_stats(ctx, &st) != QLORA_OK) {
        set_err(run, "%s", qlora_last_error());
        goto done;
    }
    row->peak = st.total_peak[cuda ? 1 : 0];
    rc = 0;
done:
    qlora_model_free(model);
    qlora_ctx_free(ctx);
    free_batch(&batch);
    tool_remove_tree(tmp);
    free(dir);
    return rc;
}

/* The estimator's prediction and P for the row's settings. */
static int estimate(bm_row *row, bm_run *run) {
    qlora_train_settings s = qlora_train_default_settings();
    s.seq_len = row->seq;
    s.micro_batch = row->micro_batch;
    s.lora_rank = row->rank;
    s.targets = QLORA_TARGETS_ALL_LINEAR;
    s.grad_checkpointing = 1;
    s.optimizer_state_bytes = 0; /* no optimizer step runs */
    qlora_mem_estimate_result r;
    if (qlora_mem_estimate(&row->cfg, &s, QLORA_REGIME_QLORA, &r) != QLORA_OK) {
        set_err(run, "%s", qlora_last_error());
        return -1;
    }
    row->estimate = r.device_total;
    row->params_linear = r.params_linear;
    return 0;
}

static int bench_size(bm_run *run, int cuda, int64_t hidden, const bm_opts *o) {
    bm_row *row = &run->rows[run->nrows];
    memset(row, 0, sizeof *row);
    row->backend = cuda ? "cuda" : "cpu";
    row->cfg = bench_config(hidden, o->layers ? o->layers : cuda ? 2 : 4, o->vocab ? o->vocab : 32000);
    row->seq = o->seq ? o->seq : cuda ? 512 : 256;
    row->micro_batch = o->micro_batch ? o->micro_batch : cuda ? 4 : 1;
    row->tokens = row->seq * row->micro_batch;
    row->rank = o->rank ? o->rank : 64;
    row->iters = o->iters ? o->iters : cuda ? 10 : 3;
    if (qlora_model_config_validate(&row->cfg) != QLORA_OK) {
        set_err(run, "hidden %lld: %s", (long long)hidden, qlora_last_error());
        return -1;
    }
    if (estimate(row, run) != 0)
        return -1;
    int rc;
#ifdef QLORA_BENCH_CUDA
    if (cuda)
        rc = dense_cuda(&row->cfg, row->tokens, row->iters, &row->dense_layer_s, run);
    else
#endif
        rc = dense_cpu(&row->cfg, row->tokens, row->iters, &row->dense_layer_s, run);
    if (rc == 0)
        rc = model_step(row, cuda, run);
    if (rc != 0)
        return -1;
    run->nrows++;
    if (!run->json)
        fprintf(stderr, "  %s hidden %lld done\n", row->backend, (long long)hidden);
    return 0;
}

/* ---- derived numbers */
static double linear_flops(const bm_row *r) { return 6.0 * (double)r->params_linear * (double)r->tokens; }
static double model_rate(const bm_row *r) { return linear_flops(r) / r->step_s; }
static double dense_rate(const bm_row *r) {
    return 2.0 * (double)r->tokens * (double)r->params_linear / (double)r->cfg.num_layers / r->dense_layer_s;
}
/* The time the dense matmul would take for the counted FLOPs. */
static double dense_equiv_s(const bm_row *r) { return linear_flops(r) / dense_rate(r); }
static double lm_head_flops(const bm_row *r) {
    return 4.0 * (double)r->cfg.vocab_size * (double)r->cfg.hidden_size * (double)r->tokens;
}

static void print_table(const bm_run *run) {
    printf("qlora-bench model %s: training micro-batch (forward + backward, activation checkpointing) of random\n"
           "Llama decoders: NF4 + double quant (blocksize 64), LoRA alpha 16, dropout 0.1 on all 7 projections\n",
           qlora_version_string());
    printf("FLOPs = 6 * P * T (P = decoder linear weights; forward, checkpoint recompute, dX; no dW of frozen\n"
           "weights; adapters, attention, lm_head not counted). dense = F32 OpenBLAS sgemm (cpu) / BF16 cuBLAS\n"
           "(cuda) of the same 7 shapes with M = T, the time it takes for the same FLOPs; ratio = ours / dense\n"
           "FLOP rate (higher is better); peak = the accountant's peak, estimate = qlora_mem_estimate (MB = 1e6 B)\n\n");
    printf("%-5s %6s %6s %3s %4s %6s %3s %6s %9s %9s %6s %9s %9s %9s %9s %9s %6s\n", "where", "hidden", "inter", "L",
           "rank", "T", "N", "P(M)", "step ms", "dense ms", "ratio", "tok/s", "GFLOP/s", "dense", "peak MB", "est MB",
           "ratio");
    for (int i = 0; i < run->nrows; i++) {
        const bm_row *r = &run->rows[i];
        printf("%-5s %6lld %6lld %3lld %4lld %6lld %3d %6.1f %9.2f %9.2f %6.3f %9.1f %9.1f %9.1f %9.2f %9.2f %6.3f\n",
               r->backend, (long long)r->cfg.hidden_size, (long long)r->cfg.intermediate_size,
               (long long)r->cfg.num_layers, (long long)r->rank, (long long)r->tokens, r->iters,
               (double)r->params_linear / 1e6, r->step_s * 1e3, dense_equiv_s(r) * 1e3, model_rate(r) / dense_rate(r),
               (double)r->tokens / r->step_s, model_rate(r) * 1e-9, dense_rate(r) * 1e-9, (double)r->peak / 1e6,
               (double)r->estimate / 1e6, (double)r->peak / (double)r->estimate);
    }
}

static void print_json(const bm_run *run) {
    printf("{\n  \"version\": \"%s\",\n", qlora_version_string());
    printf("  \"weight\": {\"type\": \"nf4\", \"blocksize\": 64, \"double_quant\": true},\n");
    printf("  \"adapter\": {\"alpha\": 16, \"dropout\": 0.1, \"targets\": \"all-linear\"},\n");
    printf("  \"flops\": \"6 * params_linear * tokens: forward, checkpoint recompute, dX (no dW of frozen weights); "
           "adapters, attention, lm_head not counted\",\n");
    printf("  \"results\": [\n");
    for (int i = 0; i < run->nrows; i++) {
        const bm_row *r = &run->rows[i];
        const qlora_model_config *c = &r->cfg;
        printf("    {\"backend\": \"%s\", \"hidden\": %lld, \"intermediate\": %lld, \"layers\": %lld, \"heads\": %lld, "
               "\"kv_heads\": %lld, \"head_dim\": %lld, \"vocab\": %lld, \"rank\": %lld, \"seq\": %lld, "
               "\"micro_batch\": %lld, \"tokens\": %lld, \"iters\": %d, \"params_linear\": %llu, "
               "\"step_ms\": %.4f, \"tokens_per_s\": %.3f, \"linear_flops\": %.0f, \"lm_head_flops\": %.0f, "
               "\"model_gflops\": %.4f, \"dense_gflops\": %.4f, \"dense_ms\": %.4f, \"ratio\": %.4f, "
               "\"peak_bytes\": %llu, \"estimate_bytes\": %llu, \"peak_over_estimate\": %.4f}%s\n",
               r->backend, (long long)c->hidden_size, (long long)c->intermediate_size, (long long)c->num_layers,
               (long long)c->num_heads, (long long)c->num_kv_heads, (long long)c->head_dim, (long long)c->vocab_size,
               (long long)r->rank, (long long)r->seq, (long long)r->micro_batch, (long long)r->tokens, r->iters,
               (unsigned long long)r->params_linear, r->step_s * 1e3, (double)r->tokens / r->step_s, linear_flops(r),
               lm_head_flops(r), model_rate(r) * 1e-9, dense_rate(r) * 1e-9, dense_equiv_s(r) * 1e3,
               model_rate(r) / dense_rate(r), (unsigned long long)r->peak, (unsigned long long)r->estimate,
               (double)r->peak / (double)r->estimate, i + 1 < run->nrows ? "," : "");
    }
    printf("  ]\n}\n");
}

/* ---- command line */
static void usage(FILE *to) {
    fprintf(to,
            "usage: qlora-bench model [--sizes H,...] [--layers N] [--seq N] [--micro-batch N] [--rank N]\n"
            "                         [--vocab N] [--iters N] [--backend cpu|cuda|all] [--json]\n"
            "One QLoRA training micro-batch (forward + backward, checkpointing) of random Llama decoders: tokens/s,\n"
            "FLOP rate (6 * linear params * tokens) vs a dense matmul of the same shapes, peak memory vs estimate.\n"
            "  --sizes H,...      hidden sizes, multiples of 64 (default: cpu 512,1024,2048; cuda 4096 = Llama-7B)\n"
            "  --layers N         decoder layers (default: cpu 4, cuda 2)\n"
            "  --seq N            tokens per sequence (default: cpu 256, cuda 512)\n"
            "  --micro-batch N    packed sequences per step (default: cpu 1, cuda 4)\n"
            "  --rank N           LoRA rank (default 64)\n"
            "  --vocab N          vocabulary (default 32000)\n"
            "  --iters N          timed runs, median reported (default: cpu 3, cuda 10)\n"
            "  --backend B        cpu, cuda or all (default: all available)\n"
            "  --json             print the results as JSON\n"
            "Exit codes: 0 ok, 1 bad usage, 2 a backend failed.\n");
}

static int parse_count(const char *opt, const char *text, long long lo, long long hi, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < lo || v > hi)
        return tool_usage_error("%s expects an integer in %lld..%lld, got '%s'", opt, lo, hi, text);
    *out = v;
    return 0;
}

static int parse_sizes(const char *text, bm_opts *o) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", text);
    o->nsizes = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (o->nsizes == BM_MAX_SIZES)
            return tool_usage_error("--sizes takes at most %d sizes", BM_MAX_SIZES);
        int64_t h = 0;
        if (parse_count("--sizes", tok, 64, 16384, &h))
            return TOOL_EXIT_USAGE;
        if (h % 64)
            return tool_usage_error("--sizes: %lld is not a multiple of 64", (long long)h);
        o->sizes[o->nsizes++] = h;
    }
    if (o->nsizes == 0)
        return tool_usage_error("--sizes needs at least one size, got '%s'", text);
    return 0;
}

static int parse_args(int argc, char **argv, bm_opts *o, const char **backend) {
    static const char *const with_value[] = {"--sizes", "--layers", "--seq", "--micro-batch", "--rank", "--vocab",
                                             "--iters", "--backend", NULL};
    for (int i = 1; i < argc; i++) {
        char name[TOOL_OPTION_NAME_MAX];
        const char *v;
        if (tool_option(argc, argv, &i, with_value, name, &v))
            return TOOL_EXIT_USAGE;
        int64_t iters = 0;
        int bad = 0;
        if (!strcmp(name, "--help") || !strcmp(name, "-h")) {
            usage(stdout);
            return -1;
        } else if (!strcmp(name, "--sizes")) {
            bad = parse_sizes(v, o);
        } else if (!strcmp(name, "--layers")) {
            bad = parse_count(name, v, 1, 1024, &o->layers);
        } else if (!strcmp(name, "--seq")) {
            bad = parse_count(name, v, 2, 1 << 20, &o->seq);
        } else if (!strcmp(name, "--micro-batch")) {
            bad = parse_count(name, v, 1, 4096, &o->micro_batch);
        } else if (!strcmp(name, "--rank")) {
            bad = parse_count(name, v, 1, 4096, &o->rank);
        } else if (!strcmp(name, "--vocab")) {
            bad = parse_count(name, v, 2, 1 << 24, &o->vocab);
        } else if (!strcmp(name, "--iters")) {
            bad = parse_count(name, v, 1, BM_MAX_ITERS, &iters);
            o->iters = (int)iters;
        } else if (!strcmp(name, "--backend")) {
            *backend = v;
            if (strcmp(v, "cpu") && strcmp(v, "cuda") && strcmp(v, "all"))
                bad = tool_usage_error("--backend must be cpu, cuda or all, got '%s'", v);
        } else if (!strcmp(name, "--json")) {
            o->json = 1;
        } else {
            bad = tool_usage_error("unknown option '%s'", argv[i]);
        }
        if (bad)
            return TOOL_EXIT_USAGE;
    }
    return 0;
}

static int run_backend(bm_run *run, int cuda, const bm_opts *o) {
    const int64_t *sizes = o->nsizes ? o->sizes : cuda ? cuda_default_sizes : cpu_default_sizes;
    int n = o->nsizes ? o->nsizes
            : cuda  ? (int)(sizeof cuda_default_sizes / sizeof cuda_default_sizes[0])
                    : (int)(sizeof cpu_default_sizes / sizeof cpu_default_sizes[0]);
    for (int i = 0; i < n; i++)
        if (bench_size(run, cuda, sizes[i], o) != 0) {
            tool_say("%s, hidden %lld: %s", cuda ? "cuda" : "cpu", (long long)sizes[i], run->err);
            return 2;
        }
    return 0;
}

int bench_model_main(int argc, char **argv) {
    tool_cli_init("qlora-bench model");
    bm_opts o;
    memset(&o, 0, sizeof o);
    const char *backend = "all";
    int rc = parse_args(argc, argv, &o, &backend);
    if (rc != 0)
        return rc < 0 ? 0 : rc;
    bm_run *run = calloc(1, sizeof *run);
    if (!run) {
        tool_say("out of memory");
        return 2;
    }
    run->json = o.json;
    if (strcmp(backend, "cuda") != 0)
        rc = run_backend(run, 0, &o);
    if (rc == 0 && strcmp(backend, "cpu") != 0) {
        if (!qlora_has_cuda_backend() || qlora_cuda_device_count() == 0) {
            tool_say("cuda: skipped (%s)", qlora_has_cuda_backend() ? "no CUDA device visible" : "built without CUDA");
            if (!strcmp(backend, "cuda"))
                rc = 2;
        } else {
#ifdef QLORA_BENCH_CUDA
            rc = run_backend(run, 1, &o);
#else
            tool_say("cuda: this qlora-bench was built without CUDA");
            rc = 2;
#endif
        }
    }
    if (run->nrows > 0) {
        if (run->json)
            print_json(run);
        else
            print_table(run);
    }
    free(run);
    return rc;
}
