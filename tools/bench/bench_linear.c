/*
 * `qlora-bench linear [--backend cpu|cuda|all] [--iters N] [--quick] [--json]`
 *
 * For each shape (in -> out) and batch M, in one run:
 *  - ours: a qlora_linear over the NF4 + double-quant (blocksize 64) weight with one adapter of
 *    QLoRA's defaults (r 64, alpha 16, dropout 0.1, BF16 gradients): the inference forward, and
 *    a training step (forward with dropout + backward with dX);
 *  - the same layer with the weight unquantized: F32 cblas_sgemm on the CPU (OpenBLAS), BF16
 *    cublasGemmEx with FP32 compute on CUDA, the LoRA products included, no dropout;
 *  - the ratios ours / unquantized, the weight-bytes bound (BF16 bytes / NF4 bytes: how much
 *    faster than the unquantized layer a memory-bound M may get), and our forward's GB/s
 *    (weight + activation bytes) and TFLOP/s.
 * Each timing is the median of N synchronised runs after one warm-up.
 */
#include "bench_util.h"
#include "bench_linear.h"

#include <qlora.h>

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef QLORA_BENCH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

typedef struct lb_shape {
    const char *name;
    int64_t in, out;
} lb_shape;

static const lb_shape cpu_shapes[] = {
    {"1k->1k", 1024, 1024}, {"2k->2k", 2048, 2048}, {"2k->5.5k", 2048, 5632}, {"5.5k->2k", 5632, 2048}};
static const int cpu_ms[] = {1, 16, 128, 512};
static const lb_shape quick_shapes[] = {{"256->384", 256, 384}};
static const int quick_ms[] = {1, 33};
static const lb_shape gpu_shapes[] = {
    {"llama-7b qkvo", 4096, 4096},   {"llama-7b gate/up", 4096, 11008}, {"llama-7b down", 11008, 4096},
    {"llama3-8b kv", 4096, 1024},    {"llama3-8b up", 4096, 14336},     {"llama3-8b down", 14336, 4096},
    {"llama-70b qo", 8192, 8192},    {"llama-70b up", 8192, 28672},     {"llama-70b down", 28672, 8192}};
static const int gpu_ms[] = {1, 4, 16, 64, 512, 4096};

enum { LB_MAX_ROWS = 128 };

typedef struct lb_row {
    const char *backend, *shape;
    int64_t m, in, out;
    double fwd_s, base_fwd_s, train_s, base_train_s;
    double bytes_q, bytes_dense;  /* weight bytes: NF4 codes + scales; unquantized BF16 */
} lb_row;

typedef struct lb_run {
    int iters, json;
    int cpu_iters, cuda_iters;  /* what each backend ran with, for the header */
    lb_row rows[LB_MAX_ROWS];
    int nrows;
} lb_run;

/* ---- timing ---- */

typedef struct lb_case lb_case;
typedef qlora_status (*lb_fn)(lb_case *c);

/* ---- one case: the layer, its inputs, and the unquantized copy ---- */

struct lb_case {
    qlora_ctx *ctx;
    int cuda;
    int64_t m, in, out;
    qlora_qtensor w;
    qlora_linear *lin;
    qlora_tensor x, y, dy, dx;
    qlora_tensor a, b, da, db;    /* the adapter's (owned by lin) */
    float scaling;
    uint64_t step;
    /* unquantized layer: CPU F32 copies, or CUDA BF16 on the device */
    qlora_tensor dense, xb, yb, dyb, dxb, h, g, ab, bb, dab, dbb;
#ifdef QLORA_BENCH_CUDA
    cublasHandle_t cublas;
#endif
};

static qlora_status sync_case(lb_case *c) {
#ifdef QLORA_BENCH_CUDA
    if (c->cuda && cudaDeviceSynchronize() != cudaSuccess)
        return QLORA_ERR_CUDA;
#endif
    return qlora_ctx_synchronize(c->ctx);
}

static qlora_status time_median(lb_case *c, lb_fn fn, int iters, double *out) {
    double t[256];
    if (iters > 256)
        iters = 256;
    qlora_status st = fn(c);
    if (st == QLORA_OK)
        st = sync_case(c);
    for (int i = 0; i < iters && st == QLORA_OK; i++) {
        double t0 = bench_now_s();
        st = fn(c);
        if (st == QLORA_OK)
            st = sync_case(c);
        t[i] = bench_now_s() - t0;
    }
    if (st != QLORA_OK)
        return st;
    *out = bench_median(t, iters);
    return QLORA_OK;
}

static qlora_status ours_forward(lb_case *c) { return qlora_linear_forward(c->lin, &c->x, &c->y, NULL, NULL); }

static qlora_status ours_train(lb_case *c) {
    qlora_linear_fwd_opts o = {1, c->step++};
    qlora_linear_saved saved;
    memset(&saved, 0, sizeof saved);
    qlora_status st = qlora_linear_forward(c->lin, &c->x, &c->y, &o, &saved);
    if (st == QLORA_OK)
        st = qlora_linear_backward(c->lin, &c->x, &c->dy, &saved, &c->dx);
    qlora_linear_saved_free(&saved);
    return st;
}

/* ---- the unquantized layer ---- */

#define F(t) ((float *)(t).data)

static qlora_status cpu_base_forward(lb_case *c) {
    int m = (int)c->m, k = (int)c->in, n = (int)c->out, r = (int)c->a.shape[0];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, F(c->xb), k, F(c->dense), k, 0.0f, F(c->yb), n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r, k, 1.0f, F(c->xb), k, F(c->ab), k, 0.0f, F(c->h), r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, r, c->scaling, F(c->h), r, F(c->bb), r, 1.0f, F(c->yb),
                n);
    return QLORA_OK;
}

static qlora_status cpu_base_train(lb_case *c) {
    int m = (int)c->m, k = (int)c->in, n = (int)c->out, r = (int)c->a.shape[0];
    float s = c->scaling;
    cpu_base_forward(c);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, r, n, 1.0f, F(c->dyb), n, F(c->bb), r, 0.0f, F(c->g), r);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, r, m, s, F(c->dyb), n, F(c->h), r, 1.0f, F(c->dbb), r);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, k, m, s, F(c->g), r, F(c->xb), k, 1.0f, F(c->dab), k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, k, n, 1.0f, F(c->dyb), n, F(c->dense), k, 0.0f, F(c->dxb),
                k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, k, r, s, F(c->g), r, F(c->ab), k, 1.0f, F(c->dxb), k);
    return QLORA_OK;
}

#ifdef QLORA_BENCH_CUDA
/* Row-major C[m, n] = alpha·op(A)·op(B) + beta·C in BF16 with FP32 compute: the column-major
 * call computes Cᵀ = op(B)ᵀ·op(A)ᵀ. */
static qlora_status gemm_rm(lb_case *c, int ta, int tb, int m, int n, int k, float alpha, const void *a, const void *b,
                            float beta, void *out) {
    cublasStatus_t st = cublasGemmEx(c->cublas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m,
                                     k, &alpha, b, CUDA_R_16BF, tb ? k : n, a, CUDA_R_16BF, ta ? m : k, &beta, out,
                                     CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return st == CUBLAS_STATUS_SUCCESS ? QLORA_OK : QLORA_ERR_CUBLAS;
}

static qlora_status cuda_base_forward(lb_case *c) {
    int m = (int)c->m, k = (int)c->in, n = (int)c->out, r = (int)c->a.shape[0];
    qlora_status st = gemm_rm(c, 0, 1, m, n, k, 1.0f, c->x.data, c->dense.data, 0.0f, c->yb.data);
    if (st == QLORA_OK)
        st = gemm_rm(c, 0, 1, m, r, k, 1.0f, c->x.data, c->a.data, 0.0f, c->h.data);
    if (st == QLORA_OK)
        st = gemm_rm(c, 0, 1, m, n, r, c->scaling, c->h.data, c->b.data, 1.0f, c->yb.data);
    return st;
}

static qlora_status cuda_base_train(lb_case *c) {
    int m = (int)c->m, k = (int)c->in, n = (int)c->out, r = (int)c->a.shape[0];
    float s = c->scaling;
    qlora_status st = cuda_base_forward(c);
    if (st == QLORA_OK)
        st = gemm_rm(c, 0, 0, m, r, n, 1.0f, c->dy.data, c->b.data, 0.0f, c->g.data);
    if (st == QLORA_OK)
        st = gemm_rm(c, 1, 0, n, r, m, s, c->dy.data, c->h.data, 1.0f, c->dbb.data);
    if (st == QLORA_OK)
        st = gemm_rm(c, 1, 0, r, k, m, s, c->g.data, c->x.data, 1.0f, c->dab.data);
    if (st == QLORA_OK)
        st = gemm_rm(c, 0, 0, m, k, n, 1.0f, c->dy.data, c->dense.data, 0.0f, c->dxb.data);
    if (st == QLORA_OK)
        st = gemm_rm(c, 0, 0, m, k, r, s, c->g.data, c->a.data, 1.0f, c->dxb.data);
    return st;
}
#endif

/* ---- setup ---- */

/* Uniform values in [-scale, scale) as float32 (BF16 when bf16: the top half, truncated). */
static void fill(void *dst, int64_t n, float scale, int bf16, uint64_t seed) {
    for (int64_t i = 0; i < n; i++) {
        float v = ((float)(bench_rng_next(&seed) >> 40) * 0x1p-24f * 2.0f - 1.0f) * scale;
        if (bf16) {
            uint32_t u;
            memcpy(&u, &v, 4);
            ((uint16_t *)dst)[i] = (uint16_t)(u >> 16);
        } else {
            ((float *)dst)[i] = v;
        }
    }
}

/* A tensor on the context's device (on_device) or host, optionally filled with random data. */
static qlora_status make_tensor(lb_case *c, qlora_tensor *t, const char *name, qlora_dtype dtype, int64_t rows,
                                int64_t cols, float scale, uint64_t seed) {
    int64_t shape[2] = {rows, cols};
    qlora_status st = qlora_tensor_init(t, name, dtype, 2, shape, NULL, QLORA_DEVICE_HOST);
    if (st == QLORA_OK)
        st = qlora_tensor_alloc(c->ctx, t, 1, QLORA_MEM_WORKSPACE);
    if (st != QLORA_OK || scale == 0.0f)
        return st;
    size_t bytes = qlora_tensor_nbytes(t);
    void *host = malloc(bytes ? bytes : 1);
    if (!host)
        return QLORA_ERR_OUT_OF_MEMORY;
    fill(host, qlora_tensor_numel(t), scale, dtype == QLORA_BF16, seed);
    qlora_tensor h = *t;
    h.data = host;
    h.device = QLORA_DEVICE_HOST;
    st = qlora_tensor_copy(c->ctx, t, &h);
    free(host);
    return st;
}

static void case_free(lb_case *c) {
    qlora_tensor *ts[] = {&c->x, &c->y, &c->dy, &c->dx, &c->dense, &c->xb, &c->yb, &c->dyb, &c->dxb,
                          &c->h, &c->g, &c->ab, &c->bb, &c->dab, &c->dbb};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        qlora_tensor_free(c->ctx, ts[i]);
    qlora_linear_free(c->lin);
    qlora_qtensor_free(c->ctx, &c->w);
#ifdef QLORA_BENCH_CUDA
    if (c->cublas)
        cublasDestroy(c->cublas);
#endif
}

static qlora_status case_setup(lb_case *c, qlora_ctx *ctx, int cuda, const lb_shape *sh, int64_t m) {
    memset(c, 0, sizeof *c);
    c->ctx = ctx;
    c->cuda = cuda;
    c->m = m;
    c->in = sh->in;
    c->out = sh->out;
    qlora_dtype base_dtype = cuda ? QLORA_BF16 : QLORA_F32;
    qlora_tensor w32;
    memset(&w32, 0, sizeof w32);
    /* weights uniform in ±0.035 (standard deviation 0.02, a freshly initialised weight) */
    qlora_status st = make_tensor(c, &w32, "bench.weight", QLORA_F32, c->out, c->in, 0.035f, 1);
    if (st == QLORA_OK)
        st = qlora_quantize(ctx, &w32, NULL, &c->w);
    qlora_tensor_free(ctx, &w32);
    if (st == QLORA_OK)
        st = make_tensor(c, &c->dense, "bench.dense", base_dtype, c->out, c->in, 0.0f, 0);
    if (st == QLORA_OK)
        st = qlora_dequantize(ctx, &c->w, &c->dense);
    if (st == QLORA_OK)
        st = qlora_linear_create(ctx, &c->w, NULL, &c->lin);
    qlora_lora_params p = qlora_lora_default_params();
    if (st == QLORA_OK)
        st = qlora_linear_add_adapter(c->lin, "default", &p, NULL);
    if (st == QLORA_OK)
        st = qlora_linear_adapter_tensors(c->lin, 0, &c->a, &c->b, &c->da, &c->db);
    c->scaling = qlora_lora_scaling(&p);
    int64_t r = p.rank;
    struct {
        qlora_tensor *t;
        const char *name;
        qlora_dtype dtype;
        int64_t rows, cols;
        float scale;
    } plan[] = {
        {&c->x, "x", QLORA_BF16, m, c->in, 1.0f},       {&c->y, "y", QLORA_BF16, m, c->out, 0.0f},
        {&c->dy, "dy", QLORA_BF16, m, c->out, 1.0f},    {&c->dx, "dx", QLORA_BF16, m, c->in, 0.0f},
        {&c->yb, "base.y", base_dtype, m, c->out, 0.0f}, {&c->dxb, "base.dx", base_dtype, m, c->in, 0.0f},
        {&c->h, "base.h", base_dtype, m, r, 0.0f},      {&c->g, "base.g", base_dtype, m, r, 0.0f},
        /* accumulated into: small values, never denormals */
        {&c->dab, "base.da", base_dtype, r, c->in, 1e-3f}, {&c->dbb, "base.db", base_dtype, c->out, r, 1e-3f},
        /* the CPU baseline's own F32 operands */
        {&c->xb, "base.x", QLORA_F32, cuda ? 0 : m, c->in, 1.0f},
        {&c->dyb, "base.dy", QLORA_F32, cuda ? 0 : m, c->out, 1.0f},
        {&c->ab, "base.a", QLORA_F32, cuda ? 0 : r, c->in, 0.01f},
        {&c->bb, "base.b", QLORA_F32, cuda ? 0 : c->out, r, 0.01f},
    };
    for (size_t i = 0; i < sizeof plan / sizeof plan[0] && st == QLORA_OK; i++)
        st = make_tensor(c, plan[i].t, plan[i].name, plan[i].dtype, plan[i].rows, plan[i].cols, plan[i].scale,
                         100 + i);
#ifdef QLORA_BENCH_CUDA
    if (st == QLORA_OK && cuda && cublasCreate(&c->cublas) != CUBLAS_STATUS_SUCCESS)
        st = QLORA_ERR_CUBLAS;
#endif
    if (st == QLORA_OK)
        st = qlora_ctx_synchronize(ctx);
    return st;
}

static qlora_status bench_case(lb_run *run, qlora_ctx *ctx, int cuda, const char *backend, const lb_shape *sh,
                               int64_t m) {
    lb_case c;
    qlora_status st = case_setup(&c, ctx, cuda, sh, m);
    lb_row row;
    memset(&row, 0, sizeof row);
    row.backend = backend;
    row.shape = sh->name;
    row.m = m;
    row.in = sh->in;
    row.out = sh->out;
    lb_fn base_fwd = cpu_base_forward, base_train = cpu_base_train;
#ifdef QLORA_BENCH_CUDA
    if (cuda) {
        base_fwd = cuda_base_forward;
        base_train = cuda_base_train;
    }
#endif
    if (st == QLORA_OK)
        st = time_median(&c, ours_forward, run->iters, &row.fwd_s);
    if (st == QLORA_OK)
        st = time_median(&c, base_fwd, run->iters, &row.base_fwd_s);
    if (st == QLORA_OK)
        st = time_median(&c, ours_train, run->iters, &row.train_s);
    if (st == QLORA_OK)
        st = time_median(&c, base_train, run->iters, &row.base_train_s);
    if (st == QLORA_OK) {
        row.bytes_q = (double)qlora_qtensor_nbytes(&c.w);
        row.bytes_dense = 2.0 * (double)sh->in * (double)sh->out;
        if (run->nrows < LB_MAX_ROWS)
            run->rows[run->nrows++] = row;
        if (!run->json)
            fprintf(stderr, "  %s %s M=%lld done\n", backend, sh->name, (long long)m);
    }
    case_free(&c);
    return st;
}

/* ---- output ---- */

static double fwd_gbps(const lb_row *r) {
    return (r->bytes_q + 2.0 * (double)r->m * (double)(r->in + r->out)) / r->fwd_s * 1e-9;
}

static double fwd_tflops(const lb_row *r) {
    return 2.0 * (double)r->m * (double)r->in * (double)r->out / r->fwd_s * 1e-12;
}

static void print_table(const lb_run *run) {
    printf("qlora-bench linear %s: QLoRA linear layer (NF4 + double quant, blocksize 64; one adapter r 64,\n"
           "alpha 16, dropout 0.1) vs the same layer unquantized (cpu: F32 OpenBLAS sgemm; cuda: BF16 cuBLAS)\n",
           qlora_version_string());
    printf("median of %d runs (CPU) / %d (CUDA); ratio = ours / unquantized (lower is better); train = forward\n"
           "(dropout) + backward with dX; bound = BF16 weight bytes / NF4 weight bytes (the best ratio's inverse\n"
           "for a memory-bound M)\n\n",
           run->cpu_iters, run->cuda_iters);
    printf("%-6s %-17s %5s %9s %9s %6s %9s %9s %6s %6s %8s %8s\n", "where", "shape in->out", "M", "fwd ms",
           "base ms", "ratio", "train ms", "base ms", "ratio", "bound", "fwd GB/s", "TFLOP/s");
    for (int i = 0; i < run->nrows; i++) {
        const lb_row *r = &run->rows[i];
        printf("%-6s %-17s %5lld %9.3f %9.3f %6.2f %9.3f %9.3f %6.2f %6.2f %8.1f %8.2f\n", r->backend, r->shape,
               (long long)r->m, r->fwd_s * 1e3, r->base_fwd_s * 1e3, r->fwd_s / r->base_fwd_s, r->train_s * 1e3,
               r->base_train_s * 1e3, r->train_s / r->base_train_s, r->bytes_dense / r->bytes_q, fwd_gbps(r),
               fwd_tflops(r));
    }
}

static void print_json(const lb_run *run) {
    printf("{\n  \"version\": \"%s\",\n  \"iters\": {\"cpu\": %d, \"cuda\": %d},\n", qlora_version_string(),
           run->cpu_iters, run->cuda_iters);
    printf("  \"weight\": {\"type\": \"nf4\", \"blocksize\": 64, \"double_quant\": true},\n");
    printf("  \"adapter\": {\"rank\": 64, \"alpha\": 16, \"dropout\": 0.1, \"grad_dtype\": \"BF16\"},\n");
    printf("  \"results\": [\n");
    for (int i = 0; i < run->nrows; i++) {
        const lb_row *r = &run->rows[i];
        printf("    {\"backend\": \"%s\", \"shape\": \"%s\", \"in\": %lld, \"out\": %lld, \"m\": %lld, "
               "\"fwd_ms\": %.4f, \"base_fwd_ms\": %.4f, \"fwd_ratio\": %.4f, \"train_ms\": %.4f, "
               "\"base_train_ms\": %.4f, \"train_ratio\": %.4f, \"weight_bytes_nf4\": %.0f, "
               "\"weight_bytes_bf16\": %.0f, \"bytes_bound\": %.4f, \"fwd_gbps\": %.3f, \"fwd_tflops\": %.4f}%s\n",
               r->backend, r->shape, (long long)r->in, (long long)r->out, (long long)r->m, r->fwd_s * 1e3,
               r->base_fwd_s * 1e3, r->fwd_s / r->base_fwd_s, r->train_s * 1e3, r->base_train_s * 1e3,
               r->train_s / r->base_train_s, r->bytes_q, r->bytes_dense, r->bytes_dense / r->bytes_q, fwd_gbps(r),
               fwd_tflops(r), i + 1 < run->nrows ? "," : "");
    }
    printf("  ]\n}\n");
}

/* ---- command line ---- */

static void usage(FILE *to) {
    fprintf(to, "usage: qlora-bench linear [--backend cpu|cuda|all] [--iters N] [--quick] [--json]\n"
                "The QLoRA linear layer vs the same layer unquantized, forward and training step.\n"
                "  --backend B   cpu, cuda or all (default: all available)\n"
                "  --iters N     timed runs per measurement, median reported (default 5 on CPU, 20 on CUDA)\n"
                "  --quick       one small CPU shape (a check that the harness runs)\n"
                "  --json        print the results as JSON\n"
                "CPU shapes: 1k->1k, 2k->2k, 2k->5.5k, 5.5k->2k with M 1, 16, 128, 512. CUDA shapes: Llama-7B,\n"
                "Llama-3-8B and Llama-70B projections with M 1, 4, 16, 64, 512, 4096.\n"
                "Exit codes: 0 ok, 1 bad usage, 2 a backend failed.\n");
}

static int run_backend(lb_run *run, int cuda, int quick) {
    qlora_ctx_params params = qlora_ctx_default_params();
    if (cuda) {
        params.backend = QLORA_BACKEND_CUDA;
#ifndef QLORA_BENCH_CUDA
        fprintf(stderr, "qlora-bench linear: cuda: this qlora-bench was built without CUDA\n");
        return 2;
#endif
    }
    qlora_ctx *ctx = NULL;
    qlora_status st = qlora_ctx_create(&params, &ctx);
    const lb_shape *shapes = cuda ? gpu_shapes : quick ? quick_shapes : cpu_shapes;
    size_t nshapes = cuda ? sizeof gpu_shapes / sizeof gpu_shapes[0]
                          : quick ? sizeof quick_shapes / sizeof quick_shapes[0] : sizeof cpu_shapes / sizeof cpu_shapes[0];
    const int *ms = cuda ? gpu_ms : quick ? quick_ms : cpu_ms;
    size_t nms = cuda ? sizeof gpu_ms / sizeof gpu_ms[0] : quick ? sizeof quick_ms / sizeof quick_ms[0]
                                                                 : sizeof cpu_ms / sizeof cpu_ms[0];
    for (size_t s = 0; s < nshapes && st == QLORA_OK; s++)
        for (size_t i = 0; i < nms && st == QLORA_OK; i++)
            st = bench_case(run, ctx, cuda, cuda ? "cuda" : "cpu", &shapes[s], ms[i]);
    qlora_ctx_free(ctx);
    if (st != QLORA_OK) {
        fprintf(stderr, "qlora-bench linear: %s: %s (%s)\n", cuda ? "cuda" : "cpu", qlora_status_string(st),
                qlora_last_error());
        return 2;
    }
    return 0;
}

int bench_linear_main(int argc, char **argv) {
    const char *backend = "all";
    long iters = 0;
    int quick = 0;
    lb_run *run = calloc(1, sizeof *run);
    if (!run) {
        fprintf(stderr, "qlora-bench linear: out of memory\n");
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            free(run);
            return 0;
        } else if (!strcmp(a, "--backend") && i + 1 < argc) {
            backend = argv[++i];
            if (strcmp(backend, "cpu") && strcmp(backend, "cuda") && strcmp(backend, "all")) {
                fprintf(stderr, "qlora-bench linear: --backend must be cpu, cuda or all, got '%s'\n", backend);
                free(run);
                return 1;
            }
        } else if (!strcmp(a, "--iters") && i + 1 < argc) {
            char *end;
            errno = 0;
            iters = strtol(argv[++i], &end, 10);
            if (errno || *end || end == argv[i] || iters < 1 || iters > 256) {
                fprintf(stderr, "qlora-bench linear: --iters expects an integer in 1..256, got '%s'\n", argv[i]);
                free(run);
                return 1;
            }
        } else if (!strcmp(a, "--quick")) {
            quick = 1;
        } else if (!strcmp(a, "--json")) {
            run->json = 1;
        } else {
            fprintf(stderr, "qlora-bench linear: unknown or incomplete argument '%s' (see --help)\n", a);
            free(run);
            return 1;
        }
    }
    int want_cuda = strcmp(backend, "cpu") != 0, want_cpu = strcmp(backend, "cuda") != 0;
    int rc = 0;
    if (want_cpu) {
        run->iters = run->cpu_iters = iters ? (int)iters : 5;
        rc = run_backend(run, 0, quick);
    }
    if (rc == 0 && want_cuda) {
        if (!qlora_has_cuda_backend() || qlora_cuda_device_count() == 0) {
            fprintf(stderr, "qlora-bench linear: cuda: skipped (%s)\n",
                    qlora_has_cuda_backend() ? "no CUDA device visible" : "built without CUDA");
            if (!strcmp(backend, "cuda"))
                rc = 2;
        } else {
            run->iters = run->cuda_iters = iters ? (int)iters : 20;
            rc = run_backend(run, 1, quick);
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
