/*
 * `qlora-bench adamw [--backend cpu|cuda|all] [--params M] [--iters N] [--quick] [--json]`
 *
 * The paged AdamW step through the public API only. M million BF16 parameters are cut into
 * the LoRA tensors of Llama-7B decoder layers with rank-64 adapters on every projection (the
 * QLoRA recipe), layer after layer until M million is reached; they get random values, and so
 * do their gradients (F32, and a BF16 rounding of the same values). Then, per backend:
 *  - qlora_optimizer_step with F32 gradients, with BF16 gradients, and with F32 gradients plus
 *    FP32 master weights: the median of N steps after one warm-up step (which also fills the
 *    state pool), each stopped after qlora_ctx_synchronize. Bytes per element are what the
 *    update reads and writes: param 2 + 2, grad 4 (or 2), m 4 + 4, v 4 + 4, master 4 + 4. The
 *    gradient-norm pass re-reads the gradients inside the timed step but is not counted.
 *  - a plain copy moving the same number of bytes (half read, half written), timed the same
 *    way: memcpy on the CPU, a device-to-device qlora_tensor_copy on CUDA.
 *  - paging: the F32-gradient step again with gpu_mem_limit a quarter of the state size (pages
 *    of 2 MiB, smaller for tiny sizes), against the unpaged step above: the extra time per step
 *    and the copy time per GB moved from qlora_optimizer_paging_stats (bytes_in + bytes_out,
 *    seconds) over the timed steps. On a CPU context the "device" pool is simulated in host
 *    memory, so the CPU row measures memcpy between two host buffers, not a PCIe link.
 * The CPU reference kernels run the F32-gradient step on at most 8 million parameters.
 */
#include "bench_util.h"
#include "bench_adamw.h"

#include <qlora.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct ab_shape {
    const char *name;
    int64_t rows, cols;
} ab_shape;

/* One Llama-7B decoder layer (hidden 4096, intermediate 11008), rank-64 adapters A [r, in] and
 * B [out, r] on q, k, v, o, gate, up and down: 5.0 million parameters. */
static const ab_shape llama7b_layer[] = {
    {"q_proj.lora_A", 64, 4096},     {"q_proj.lora_B", 4096, 64},    {"k_proj.lora_A", 64, 4096},
    {"k_proj.lora_B", 4096, 64},     {"v_proj.lora_A", 64, 4096},    {"v_proj.lora_B", 4096, 64},
    {"o_proj.lora_A", 64, 4096},     {"o_proj.lora_B", 4096, 64},    {"gate_proj.lora_A", 64, 4096},
    {"gate_proj.lora_B", 11008, 64}, {"up_proj.lora_A", 64, 4096},   {"up_proj.lora_B", 11008, 64},
    {"down_proj.lora_A", 64, 11008}, {"down_proj.lora_B", 4096, 64}};
/* --quick: a toy layer (hidden 512, intermediate 1376, rank 16), 2^18 parameters in all. */
static const ab_shape toy_layer[] = {
    {"q_proj.lora_A", 16, 512},     {"q_proj.lora_B", 512, 16},   {"k_proj.lora_A", 16, 512},
    {"k_proj.lora_B", 512, 16},     {"v_proj.lora_A", 16, 512},   {"v_proj.lora_B", 512, 16},
    {"o_proj.lora_A", 16, 512},     {"o_proj.lora_B", 512, 16},   {"gate_proj.lora_A", 16, 512},
    {"gate_proj.lora_B", 1376, 16}, {"up_proj.lora_A", 16, 512},  {"up_proj.lora_B", 1376, 16},
    {"down_proj.lora_A", 16, 1376}, {"down_proj.lora_B", 512, 16}};

enum { AB_MAX_ROWS = 16, AB_MAX_ITERS = 1024, AB_REFERENCE_MAX_ITERS = 3 };
#define AB_QUICK_PARAMS ((int64_t)1 << 18)
#define AB_REFERENCE_MAX_PARAMS ((int64_t)8000000)
#define AB_PAGE_BYTES ((size_t)2 << 20)

typedef struct ab_row {
    const char *backend;
    qlora_dtype grad;
    int master;
    int64_t numel;
    int ntensors;
    double step_s, bytes;  /* median step time, bytes per step */
    double copy_s;         /* the copy moving the same bytes */
} ab_row;

typedef struct ab_paging_row {
    const char *backend;
    int simulated;         /* CPU: the pool lives in host memory */
    int64_t numel;
    double state_bytes;
    uint64_t limit, pages_total, pool_limit;
    size_t page_bytes;
    double unpaged_s, paged_s;
    double moved_per_step; /* bytes_in + bytes_out per step */
    double copy_seconds, copy_bytes;  /* over the timed steps */
} ab_paging_row;

typedef struct ab_run {
    int json, quick;
    int cpu_iters, ref_iters, cuda_iters;
    ab_row rows[AB_MAX_ROWS];
    int nrows;
    ab_paging_row paging[4];
    int npaging;
} ab_run;

/* ---- timing ---- */

typedef qlora_status (*ab_fn)(void *arg);

/* One warm-up call, then `iters` calls each followed by qlora_ctx_synchronize: the median. */
static qlora_status ab_time(qlora_ctx *ctx, ab_fn fn, void *arg, int iters, double *median) {
    double t[AB_MAX_ITERS];
    qlora_status st = fn(arg);
    if (st == QLORA_OK)
        st = qlora_ctx_synchronize(ctx);
    for (int i = 0; i < iters && st == QLORA_OK; i++) {
        double t0 = bench_now_s();
        st = fn(arg);
        if (st == QLORA_OK)
            st = qlora_ctx_synchronize(ctx);
        t[i] = bench_now_s() - t0;
    }
    if (st != QLORA_OK)
        return st;
    *median = bench_median(t, iters);
    return QLORA_OK;
}

static qlora_status ab_step(void *opt) { return qlora_optimizer_step(opt, 1.0, NULL); }

typedef struct ab_copy {
    qlora_ctx *ctx;
    int use_memcpy;
    qlora_tensor src, dst;   /* U8 buffers of the largest copy */
    qlora_tensor vsrc, vdst; /* views of their first `bytes` */
} ab_copy;

static qlora_status ab_copy_run(void *arg) {
    ab_copy *c = arg;
    if (c->use_memcpy) {
        memcpy(c->vdst.data, c->vsrc.data, qlora_tensor_nbytes(&c->vsrc));
        return QLORA_OK;
    }
    return qlora_tensor_copy(c->ctx, &c->vdst, &c->vsrc);
}

/* ---- the parameters ---- */

typedef struct ab_set {
    qlora_ctx *ctx;
    int n;
    int64_t numel;
    qlora_tensor *param, *grad_f32, *grad_bf16;
} ab_set;

/* Round to nearest even (the values are finite). */
static uint16_t ab_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The tensors of layer after layer until `target` elements; the last one loses rows to fit
 * (a remainder smaller than one row is left out). Fills shapes/names when non-NULL. */
static int ab_plan(const ab_shape *layer, int nlayer, int64_t target, int64_t (*shapes)[2], char (*names)[64],
                   int64_t *total) {
    int n = 0;
    int64_t sum = 0;
    for (int l = 0; sum < target; l++) {
        for (int i = 0; i < nlayer && sum < target; i++) {
            int64_t rows = layer[i].rows, cols = layer[i].cols;
            if (sum + rows * cols > target)
                rows = (target - sum) / cols;
            if (rows == 0) {
                *total = sum;
                return n;
            }
            if (shapes) {
                shapes[n][0] = rows;
                shapes[n][1] = cols;
                snprintf(names[n], sizeof names[n], "layers.%d.%s", l, layer[i].name);
            }
            sum += rows * cols;
            n++;
        }
    }
    *total = sum;
    return n;
}

/* A device tensor filled from host values (f32 or bf16 per dtype). */
static qlora_status ab_tensor(qlora_ctx *ctx, qlora_tensor *t, const char *name, qlora_dtype dtype,
                              const int64_t shape[2], qlora_mem_category cat, void *host) {
    qlora_status st = qlora_tensor_init(t, name, dtype, 2, shape, NULL, QLORA_DEVICE_HOST);
    if (st == QLORA_OK)
        st = qlora_tensor_alloc(ctx, t, 1, cat);
    if (st != QLORA_OK)
        return st;
    qlora_tensor h = *t;
    h.data = host;
    h.device = QLORA_DEVICE_HOST;
    return qlora_tensor_copy(ctx, t, &h);
}

static void ab_set_free(ab_set *s) {
    for (int i = 0; i < s->n; i++) {
        if (s->param)
            qlora_tensor_free(s->ctx, &s->param[i]);
        if (s->grad_f32)
            qlora_tensor_free(s->ctx, &s->grad_f32[i]);
        if (s->grad_bf16)
            qlora_tensor_free(s->ctx, &s->grad_bf16[i]);
    }
    free(s->param);
    free(s->grad_f32);
    free(s->grad_bf16);
    memset(s, 0, sizeof *s);
}

/* Parameters uniform in ±0.035 (standard deviation 0.02), gradients in ±1e-3. */
static qlora_status ab_set_create(ab_set *s, qlora_ctx *ctx, const ab_shape *layer, int nlayer, int64_t target,
                                  int bf16_grads) {
    memset(s, 0, sizeof *s);
    s->ctx = ctx;
    int64_t total = 0;
    int n = ab_plan(layer, nlayer, target, NULL, NULL, &total);
    int64_t(*shapes)[2] = malloc((size_t)(n ? n : 1) * sizeof *shapes);
    char(*names)[64] = malloc((size_t)(n ? n : 1) * sizeof *names);
    s->param = calloc((size_t)(n ? n : 1), sizeof *s->param);
    s->grad_f32 = calloc((size_t)(n ? n : 1), sizeof *s->grad_f32);
    s->grad_bf16 = bf16_grads ? calloc((size_t)(n ? n : 1), sizeof *s->grad_bf16) : NULL;
    int64_t largest = 0;
    for (int i = 0; i < nlayer; i++)
        if (layer[i].rows * layer[i].cols > largest)
            largest = layer[i].rows * layer[i].cols;
    uint16_t *hp = malloc((size_t)largest * sizeof *hp), *hgb = malloc((size_t)largest * sizeof *hgb);
    float *hg = malloc((size_t)largest * sizeof *hg);
    qlora_status st = QLORA_OK;
    if (!shapes || !names || !s->param || !s->grad_f32 || (bf16_grads && !s->grad_bf16) || !hp || !hg || !hgb)
        st = QLORA_ERR_OUT_OF_MEMORY;
    if (st == QLORA_OK)
        ab_plan(layer, nlayer, target, shapes, names, &total);
    for (int i = 0; i < n && st == QLORA_OK; i++) {
        int64_t numel = shapes[i][0] * shapes[i][1];
        uint64_t rng = 1000 + (uint64_t)i;
        for (int64_t j = 0; j < numel; j++) {
            hp[j] = ab_bf16(bench_uniform(&rng, 0.035f));
            hg[j] = bench_uniform(&rng, 1e-3f);
            hgb[j] = ab_bf16(hg[j]);
        }
        char gname[80];
        snprintf(gname, sizeof gname, "%s.grad", names[i]);
        s->n = i + 1; /* what ab_set_free releases */
        st = ab_tensor(ctx, &s->param[i], names[i], QLORA_BF16, shapes[i], QLORA_MEM_ADAPTER_WEIGHTS, hp);
        if (st == QLORA_OK)
            st = ab_tensor(ctx, &s->grad_f32[i], gname, QLORA_F32, shapes[i], QLORA_MEM_ADAPTER_GRADS, hg);
        if (st == QLORA_OK && bf16_grads)
            st = ab_tensor(ctx, &s->grad_bf16[i], gname, QLORA_BF16, shapes[i], QLORA_MEM_ADAPTER_GRADS, hgb);
    }
    if (st == QLORA_OK)
        st = qlora_ctx_synchronize(ctx);
    free(shapes);
    free(names);
    free(hp);
    free(hg);
    free(hgb);
    s->numel = total;
    if (st != QLORA_OK)
        ab_set_free(s);
    return st;
}

/* ---- one backend ---- */

static qlora_status ab_optimizer(const ab_set *s, const qlora_adamw_params *p, qlora_dtype grad,
                                 qlora_optimizer **out) {
    qlora_status st = qlora_adamw_create(s->ctx, p, out);
    for (int i = 0; i < s->n && st == QLORA_OK; i++)
        st = qlora_optimizer_add_param(*out, &s->param[i], grad == QLORA_F32 ? &s->grad_f32[i] : &s->grad_bf16[i]);
    return st;
}

static double ab_bytes_per_element(qlora_dtype grad, int master) {
    return 2.0 + 2.0 + (grad == QLORA_F32 ? 4.0 : 2.0) + 8.0 + 8.0 + (master ? 8.0 : 0.0);
}

/* Steps timed on one configuration, and the copy of the same bytes: appends a row. */
static qlora_status ab_bench_step(ab_run *run, const char *backend, const ab_set *s, ab_copy *copy, qlora_dtype grad,
                                  int master, int iters) {
    qlora_adamw_params p = qlora_adamw_default_params();
    p.master_weights = master;
    qlora_optimizer *opt = NULL;
    ab_row row = {backend, grad, master, s->numel, s->n, 0, 0, 0};
    row.bytes = ab_bytes_per_element(grad, master) * (double)s->numel;
    qlora_status st = ab_optimizer(s, &p, grad, &opt);
    if (st == QLORA_OK)
        st = ab_time(s->ctx, ab_step, opt, iters, &row.step_s);
    qlora_optimizer_free(opt);
    int64_t half = (int64_t)(row.bytes / 2);
    if (st == QLORA_OK)
        st = qlora_tensor_init(&copy->vsrc, "copy.src", QLORA_U8, 1, &half, copy->src.data, copy->src.device);
    if (st == QLORA_OK)
        st = qlora_tensor_init(&copy->vdst, "copy.dst", QLORA_U8, 1, &half, copy->dst.data, copy->dst.device);
    if (st == QLORA_OK)
        st = ab_time(s->ctx, ab_copy_run, copy, iters, &row.copy_s);
    if (st == QLORA_OK && run->nrows < AB_MAX_ROWS)
        run->rows[run->nrows++] = row;
    if (st == QLORA_OK && !run->json)
        fprintf(stderr, "  %s step, %s gradients%s: done\n", backend, qlora_dtype_name(grad),
                master ? ", master weights" : "");
    return st;
}

/* Pages of 2 MiB, or the largest power of two giving the state at least 16 pages. */
static size_t ab_page_bytes(double state_bytes) {
    size_t page = AB_PAGE_BYTES;
    while (page > 512 && (double)page * 16 > state_bytes)
        page /= 2;
    return page;
}

static qlora_status ab_bench_paging(ab_run *run, const char *backend, const ab_set *s, double unpaged_s, int iters) {
    ab_paging_row row;
    memset(&row, 0, sizeof row);
    row.backend = backend;
    row.simulated = qlora_ctx_backend(s->ctx) == QLORA_BACKEND_CPU;
    row.numel = s->numel;
    row.state_bytes = 8.0 * (double)s->numel;
    row.unpaged_s = unpaged_s;
    row.page_bytes = ab_page_bytes(row.state_bytes);
    row.limit = (uint64_t)(row.state_bytes / 4);
    qlora_adamw_params p = qlora_adamw_default_params();
    p.gpu_mem_limit = row.limit;
    p.page_bytes = row.page_bytes;
    qlora_optimizer *opt = NULL;
    qlora_paging_stats before, after;
    qlora_status st = ab_optimizer(s, &p, QLORA_F32, &opt);
    /* the warm-up step makes the host copies of the evicted pages; the stats start after it */
    if (st == QLORA_OK)
        st = ab_step(opt);
    if (st == QLORA_OK)
        st = qlora_optimizer_paging_stats(opt, &before);
    if (st == QLORA_OK)
        st = ab_time(s->ctx, ab_step, opt, iters, &row.paged_s);
    if (st == QLORA_OK)
        st = qlora_optimizer_paging_stats(opt, &after);
    qlora_optimizer_free(opt);
    if (st != QLORA_OK)
        return st;
    /* ab_time's own warm-up step is one more than the `iters` timed */
    row.copy_bytes = (double)(after.bytes_in + after.bytes_out - before.bytes_in - before.bytes_out);
    row.copy_seconds = after.seconds - before.seconds;
    row.moved_per_step = row.copy_bytes / (iters + 1);
    row.pages_total = after.pages_total;
    row.pool_limit = after.pool_limit;
    if (run->npaging < (int)(sizeof run->paging / sizeof run->paging[0]))
        run->paging[run->npaging++] = row;
    if (!run->json)
        fprintf(stderr, "  %s paged step: done\n", backend);
    return QLORA_OK;
}

/* Steps of F32 and BF16 gradients, with master weights, and paged (full); or F32 only. */
static int ab_backend(ab_run *run, const char *backend, const qlora_ctx_params *cp, int64_t target, int iters,
                      int full) {
    qlora_ctx *ctx = NULL;
    ab_set set;
    ab_copy copy;
    memset(&set, 0, sizeof set);
    memset(&copy, 0, sizeof copy);
    const ab_shape *layer = run->quick ? toy_layer : llama7b_layer;
    int nlayer = run->quick ? (int)(sizeof toy_layer / sizeof toy_layer[0])
                            : (int)(sizeof llama7b_layer / sizeof llama7b_layer[0]);
    qlora_status st = qlora_ctx_create(cp, &ctx);
    if (st == QLORA_OK)
        st = ab_set_create(&set, ctx, layer, nlayer, target, full);
    /* copy buffers for the largest byte count: half of F32 gradients with master weights */
    int64_t half = (int64_t)(ab_bytes_per_element(QLORA_F32, full) * (double)set.numel / 2);
    copy.ctx = ctx;
    copy.use_memcpy = cp->backend == QLORA_BACKEND_CPU;
    if (st == QLORA_OK)
        st = qlora_tensor_init(&copy.src, "copy.src", QLORA_U8, 1, &half, NULL, QLORA_DEVICE_HOST);
    if (st == QLORA_OK)
        st = qlora_tensor_alloc(ctx, &copy.src, 1, QLORA_MEM_WORKSPACE);
    if (st == QLORA_OK)
        st = qlora_tensor_init(&copy.dst, "copy.dst", QLORA_U8, 1, &half, NULL, QLORA_DEVICE_HOST);
    if (st == QLORA_OK)
        st = qlora_tensor_alloc(ctx, &copy.dst, 1, QLORA_MEM_WORKSPACE);
    if (st == QLORA_OK && copy.use_memcpy) { /* touch the pages before timing */
        memset(copy.src.data, 1, (size_t)half);
        memset(copy.dst.data, 0, (size_t)half);
    }
    if (st == QLORA_OK)
        st = ab_bench_step(run, backend, &set, &copy, QLORA_F32, 0, iters);
    double unpaged_s = st == QLORA_OK ? run->rows[run->nrows - 1].step_s : 0;
    if (full && st == QLORA_OK)
        st = ab_bench_step(run, backend, &set, &copy, QLORA_BF16, 0, iters);
    if (full && st == QLORA_OK)
        st = ab_bench_step(run, backend, &set, &copy, QLORA_F32, 1, iters);
    qlora_tensor_free(ctx, &copy.src);
    qlora_tensor_free(ctx, &copy.dst);
    if (full && st == QLORA_OK)
        st = ab_bench_paging(run, backend, &set, unpaged_s, iters);
    if (st != QLORA_OK)
        fprintf(stderr, "qlora-bench adamw: %s: %s (%s)\n", backend, qlora_status_string(st), qlora_last_error());
    ab_set_free(&set);
    qlora_ctx_free(ctx);
    return st == QLORA_OK ? 0 : 2;
}

/* ---- output ---- */

static double ab_gbps(double bytes, double s) { return bytes / s * 1e-9; }

static const char *ab_grad_name(qlora_dtype d) { return d == QLORA_F32 ? "f32" : "bf16"; }

static void ab_print_table(const ab_run *run) {
    printf("qlora-bench adamw %s: paged AdamW, 32-bit states, over BF16 LoRA parameters (%s layers)\n",
           qlora_version_string(), run->quick ? "toy rank-16" : "Llama-7B rank-64");
    printf("median of");
    if (run->cpu_iters)
        printf(" %d steps (cpu), %d (cpu-reference)%s", run->cpu_iters, run->ref_iters, run->cuda_iters ? "," : "");
    if (run->cuda_iters)
        printf(" %d steps (cuda)", run->cuda_iters);
    printf(" after one warm-up step; GB/s = bytes per\n"
           "element (param 2+2, grad 4|2, m 4+4, v 4+4, master 4+4) / time; copy = one-thread memcpy (cpu) or\n"
           "a device-to-device qlora_tensor_copy (cuda) moving the same bytes; the gradient-norm pass is timed,\n"
           "not counted\n\n");
    printf("%-14s %-5s %-6s %9s %8s %8s %10s %8s\n", "backend", "grad", "master", "M params", "ms/step", "GB/s",
           "copy GB/s", "of copy");
    for (int i = 0; i < run->nrows; i++) {
        const ab_row *r = &run->rows[i];
        double g = ab_gbps(r->bytes, r->step_s), c = ab_gbps(r->bytes, r->copy_s);
        printf("%-14s %-5s %-6s %9.2f %8.2f %8.2f %10.2f %8.2f\n", r->backend, ab_grad_name(r->grad),
               r->master ? "yes" : "no", 1e-6 * (double)r->numel, r->step_s * 1e3, g, c, g / c);
    }
    if (run->npaging == 0)
        return;
    printf("\npaging: f32 grads, gpu_mem_limit = 1/4 of the m+v state; extra = paged - the unpaged f32 row above;\n"
           "s/GB = page copy time per GB in+out (qlora_optimizer_paging_stats)\n%s\n",
           run->paging[0].simulated
               ? "cpu pages to a SIMULATED device pool in host memory: its copies are memcpy, not PCIe\n"
               : "");
    printf("%-14s %9s %9s %8s %9s %9s %9s %9s %8s\n", "backend", "state MiB", "limit MiB", "page KiB", "pool/all",
           "paged ms", "extra ms", "GB/step", "s/GB");
    for (int i = 0; i < run->npaging; i++) {
        const ab_paging_row *r = &run->paging[i];
        char pages[32];
        snprintf(pages, sizeof pages, "%llu/%llu", (unsigned long long)r->pool_limit,
                 (unsigned long long)r->pages_total);
        printf("%-14s %9.1f %9.1f %8.0f %9s %9.2f %9.2f %9.3f %8.4f\n", r->backend, r->state_bytes / 1048576.0,
               (double)r->limit / 1048576.0, (double)r->page_bytes / 1024.0, pages, r->paged_s * 1e3,
               (r->paged_s - r->unpaged_s) * 1e3, r->moved_per_step * 1e-9,
               r->copy_bytes > 0 ? r->copy_seconds / (r->copy_bytes * 1e-9) : 0.0);
    }
}

static void ab_print_json(const ab_run *run) {
    printf("{\n  \"version\": \"%s\",\n  \"iters\": {\"cpu\": %d, \"cpu-reference\": %d, \"cuda\": %d},\n",
           qlora_version_string(), run->cpu_iters, run->ref_iters, run->cuda_iters);
    printf("  \"layers\": \"%s\",\n", run->quick ? "toy rank-16" : "llama-7b rank-64");
    printf("  \"bytes_per_element\": {\"param\": 4, \"grad_f32\": 4, \"grad_bf16\": 2, \"m\": 8, \"v\": 8, "
           "\"master\": 8},\n  \"results\": [\n");
    for (int i = 0; i < run->nrows; i++) {
        const ab_row *r = &run->rows[i];
        double g = ab_gbps(r->bytes, r->step_s), c = ab_gbps(r->bytes, r->copy_s);
        printf("    {\"backend\": \"%s\", \"grad\": \"%s\", \"master\": %s, \"params\": %lld, \"tensors\": %d, "
               "\"ms\": %.4f, \"bytes\": %.0f, \"gbps\": %.4f, \"copy_ms\": %.4f, \"copy_gbps\": %.4f, "
               "\"fraction_of_copy\": %.4f}%s\n",
               r->backend, qlora_dtype_name(r->grad), r->master ? "true" : "false", (long long)r->numel, r->ntensors,
               r->step_s * 1e3, r->bytes, g, r->copy_s * 1e3, c, g / c, i + 1 < run->nrows ? "," : "");
    }
    printf("  ],\n  \"paging\": [\n");
    for (int i = 0; i < run->npaging; i++) {
        const ab_paging_row *r = &run->paging[i];
        printf("    {\"backend\": \"%s\", \"simulated_pool\": %s, \"grad\": \"F32\", \"params\": %lld, "
               "\"state_bytes\": %.0f, \"gpu_mem_limit\": %llu, \"page_bytes\": %zu, \"pages_total\": %llu, "
               "\"pool_limit\": %llu, \"unpaged_ms\": %.4f, \"paged_ms\": %.4f, \"extra_ms\": %.4f, "
               "\"bytes_moved_per_step\": %.0f, \"seconds_per_gb\": %.6f}%s\n",
               r->backend, r->simulated ? "true" : "false", (long long)r->numel, r->state_bytes,
               (unsigned long long)r->limit, r->page_bytes, (unsigned long long)r->pages_total,
               (unsigned long long)r->pool_limit, r->unpaged_s * 1e3, r->paged_s * 1e3,
               (r->paged_s - r->unpaged_s) * 1e3, r->moved_per_step,
               r->copy_bytes > 0 ? r->copy_seconds / (r->copy_bytes * 1e-9) : 0.0, i + 1 < run->npaging ? "," : "");
    }
    printf("  ]\n}\n");
}

/* ---- command line ---- */

static void ab_usage(FILE *to) {
    fprintf(to, "usage: qlora-bench adamw [--backend cpu|cuda|all] [--params M] [--iters N] [--quick] [--json]\n"
                "The paged AdamW step (32-bit states) over BF16 LoRA parameters vs a copy of the same bytes,\n"
                "and the cost of paging the state out of a device pool a quarter of its size.\n"
                "  --backend B   cpu, cuda or all (default: all available)\n"
                "  --params M    million parameters (default 64 on CPU, 512 on CUDA; the CPU reference\n"
                "                kernels use at most 8)\n"
                "  --iters N     timed steps per measurement, median reported (default 5 on CPU, 20 on CUDA)\n"
                "  --quick       2^18 parameters in toy layers (a check that the harness runs)\n"
                "  --json        print the results as JSON\n"
                "On a CPU context the paged pool is simulated in host memory: its row measures memcpy.\n"
                "Exit codes: 0 ok, 1 bad usage, 2 a backend failed.\n");
}

static int ab_parse(const char *opt, const char *text, long max, long *out) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < 1 || v > max) {
        fprintf(stderr, "qlora-bench adamw: %s expects an integer in 1..%ld, got '%s'\n", opt, max, text);
        return -1;
    }
    *out = v;
    return 0;
}

int bench_adamw_main(int argc, char **argv) {
    const char *backend = "all";
    long iters = 0, params = 0;
    ab_run *run = calloc(1, sizeof *run);
    if (!run) {
        fprintf(stderr, "qlora-bench adamw: out of memory\n");
        return 2;
    }
    int rc = 0;
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        int takes_value = !strcmp(a, "--backend") || !strcmp(a, "--params") || !strcmp(a, "--iters");
        if (takes_value && i + 1 >= argc) {
            fprintf(stderr, "qlora-bench adamw: %s needs a value (see --help)\n", a);
            rc = 1;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            ab_usage(stdout);
            free(run);
            return 0;
        } else if (!strcmp(a, "--backend")) {
            backend = argv[++i];
            if (strcmp(backend, "cpu") && strcmp(backend, "cuda") && strcmp(backend, "all")) {
                fprintf(stderr, "qlora-bench adamw: --backend must be cpu, cuda or all, got '%s'\n", backend);
                rc = 1;
            }
        } else if (!strcmp(a, "--params")) {
            rc = ab_parse(a, argv[++i], 65536, &params) ? 1 : 0;
        } else if (!strcmp(a, "--iters")) {
            rc = ab_parse(a, argv[++i], AB_MAX_ITERS, &iters) ? 1 : 0;
        } else if (!strcmp(a, "--quick")) {
            run->quick = 1;
        } else if (!strcmp(a, "--json")) {
            run->json = 1;
        } else {
            fprintf(stderr, "qlora-bench adamw: unknown argument '%s' (see --help)\n", a);
            rc = 1;
        }
    }
    if (rc == 0 && run->quick && params) {
        fprintf(stderr, "qlora-bench adamw: --quick sets its own size; drop --params\n");
        rc = 1;
    }
    if (rc != 0) {
        free(run);
        return rc;
    }
    int want_cpu = strcmp(backend, "cuda") != 0, want_cuda = strcmp(backend, "cpu") != 0;
    if (want_cpu) {
        int64_t target = run->quick ? AB_QUICK_PARAMS : (int64_t)(params ? params : 64) * 1000000;
        qlora_ctx_params cp = qlora_ctx_default_params();
        run->cpu_iters = iters ? (int)iters : 5;
        rc = ab_backend(run, "cpu", &cp, target, run->cpu_iters, 1);
        cp.cpu_kernels = QLORA_CPU_REFERENCE;
        run->ref_iters = run->cpu_iters < AB_REFERENCE_MAX_ITERS ? run->cpu_iters : AB_REFERENCE_MAX_ITERS;
        if (rc == 0)
            rc = ab_backend(run, "cpu-reference", &cp,
                            target < AB_REFERENCE_MAX_PARAMS ? target : AB_REFERENCE_MAX_PARAMS, run->ref_iters, 0);
    }
    if (rc == 0 && want_cuda) {
        if (!qlora_has_cuda_backend() || qlora_cuda_device_count() == 0) {
            fprintf(stderr, "qlora-bench adamw: cuda: skipped (%s)\n",
                    qlora_has_cuda_backend() ? "no CUDA device visible" : "built without CUDA");
            if (!strcmp(backend, "cuda"))
                rc = 2;
        } else {
            int64_t target = run->quick ? AB_QUICK_PARAMS : (int64_t)(params ? params : 512) * 1000000;
            qlora_ctx_params cp = qlora_ctx_default_params();
            cp.backend = QLORA_BACKEND_CUDA;
            run->cuda_iters = iters ? (int)iters : 20;
            rc = ab_backend(run, "cuda", &cp, target, run->cuda_iters, 1);
        }
    }
    if (run->nrows > 0) {
        if (run->json)
            ab_print_json(run);
        else
            ab_print_table(run);
    }
    free(run);
    return rc;
}
