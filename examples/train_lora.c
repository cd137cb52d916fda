/*
 * train-lora: the public libqlora API end to end on one QLoRA linear layer.
 *
 *   train-lora [--backend cpu|cuda] [--steps N] [--save FILE]
 *
 * A random frozen weight W [256, 512] is quantized to NF4 with double quantization and wrapped
 * in a qlora_linear with one LoRA adapter (r 8, alpha 16, dropout 0.05). The teacher is the same
 * W plus a fixed random rank-4 delta, applied in FP32 on the host: T = X·(dequant(W) + delta)ᵀ.
 * The adapter learns the delta with paged AdamW (2 micro-batches of 64 rows accumulated per
 * update, gradient clipping at 1.0, a device pool of only two state pages so that pages move),
 * minimising the mean squared error computed on the host. Every 20 steps it prints the training
 * loss (with dropout), the loss of an inference forward over the whole batch (eval_loss),
 * the gradient norm and the learning rate; at the end the paging counters and the memory
 * accountant's report. --save writes the optimizer state (a safetensors file).
 *
 * Dimensions: M rows of the batch, IN/OUT the layer's features, MICRO rows per micro-batch.
 */
#include <qlora.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { OUT = 256, IN = 512, M = 128, MICRO = 64, ACCUM = M / MICRO, DELTA_RANK = 4, PRINT_EVERY = 20 };

/* ---- random numbers: splitmix64 + Box-Muller (the run is the same every time) */
static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static float next_normal(uint64_t *state, double stddev) {
    double u1 = ((double)(next_u64(state) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1]: log is finite */
    double u2 = (double)(next_u64(state) >> 11) * 0x1.0p-53;
    return (float)(stddev * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- bfloat16 <-> float (round to nearest even; every value here is finite) */
static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The library never prints: its warnings (e.g. memory still live at qlora_ctx_free) come here.
 * Failures are logged at ERROR too, but main reports those itself with qlora_last_error(). */
static void log_to_stderr(qlora_log_level level, const char *message, void *user) {
    (void)user;
    if (level == QLORA_LOG_WARN)
        fprintf(stderr, "libqlora: %s\n", message);
}

/* Reports a failed library call with the library's own message. */
static int failed(const char *what) {
    fprintf(stderr, "train-lora: %s: %s\n", what, qlora_last_error());
    return 1;
}

/* A 2-D tensor [rows, cols] with storage from the context: on its device (on_device = 1;
 * host memory for a CPU context) or in (pinned) host memory. */
static qlora_status new_tensor(qlora_ctx *ctx, qlora_tensor *t, const char *name, qlora_dtype dtype,
                               int64_t rows, int64_t cols, int on_device, qlora_mem_category category) {
    const int64_t shape[2] = {rows, cols};
    qlora_status st = qlora_tensor_init(t, name, dtype, 2, shape, NULL, QLORA_DEVICE_HOST);
    return st != QLORA_OK ? st : qlora_tensor_alloc(ctx, t, on_device, category);
}

/* A view of rows [first, first + rows) of a 2-D BF16 tensor (no copy). */
static qlora_status row_view(const qlora_tensor *t, int64_t first, int64_t rows, qlora_tensor *view) {
    const int64_t shape[2] = {rows, t->shape[1]};
    char *data = (char *)t->data + (size_t)(first * t->shape[1]) * sizeof(uint16_t);
    return qlora_tensor_init(view, t->name, t->dtype, 2, shape, data, t->device);
}

/* Mean squared error of y (BF16) against t (FP32) over n elements; writes the gradient of that
 * mean, dy = 2 (y - t) / n, as BF16. */
static double mse_and_grad(const uint16_t *y, const float *t, uint16_t *dy, int64_t n) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double diff = (double)bf16_to_float(y[i]) - (double)t[i];
        sum += diff * diff;
        dy[i] = float_to_bf16((float)(2.0 * diff / (double)n));
    }
    return sum / (double)n;
}

/* Everything the run owns, so that one cleanup path frees it in the right order. */
typedef struct run {
    qlora_ctx *ctx;
    qlora_qtensor w;                   /* frozen NF4 weight [OUT, IN] */
    qlora_linear *lin;
    qlora_optimizer *opt;
    qlora_tensor x_dev, y_dev, dy_dev; /* [M, IN], [M, OUT], [MICRO, OUT] BF16 on the device */
    qlora_tensor x_host, y_host, dy_host;
    float *teacher;                    /* T [M, OUT] FP32 */
} run;

static void run_free(run *r) {
    qlora_optimizer_free(r->opt); /* before the context it belongs to */
    qlora_linear_free(r->lin);
    qlora_qtensor_free(r->ctx, &r->w);
    qlora_tensor *owned[] = {&r->x_dev, &r->y_dev, &r->dy_dev, &r->x_host, &r->y_host, &r->dy_host};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++)
        if (owned[i]->data)
            qlora_tensor_free(r->ctx, owned[i]);
    free(r->teacher);
    qlora_ctx_free(r->ctx);
}

/* Quantizes a random W ~ N(0, 0.02^2) to NF4 + double quantization, and builds the teacher's
 * targets T = X·(dequant(W) + P·Q)ᵀ in FP32, P [OUT, 4] and Q [4, IN] random. X ~ N(0, 1) is
 * uploaded to x_dev (BF16) and T uses the same BF16-rounded X. */
static int make_problem(run *r, uint64_t *rng) {
    qlora_ctx *ctx = r->ctx;
    float *w = malloc(sizeof(float) * OUT * IN), *p = malloc(sizeof(float) * OUT * DELTA_RANK);
    float *q = malloc(sizeof(float) * DELTA_RANK * IN), *x = malloc(sizeof(float) * M * IN);
    r->teacher = malloc(sizeof(float) * M * OUT);
    qlora_tensor w_host = {0}, w_dev = {0}, wdq_dev = {0}, wdq_host = {0};
    int rc = 1;
    if (!w || !p || !q || !x || !r->teacher) {
        fprintf(stderr, "train-lora: out of host memory\n");
        goto done;
    }
    for (int64_t i = 0; i < (int64_t)OUT * IN; i++)
        w[i] = next_normal(rng, 0.02);
    /* delta = P·Q has entries of about 0.01 (std 0.07^2 * 2): as large as a real finetune's. */
    for (int64_t i = 0; i < (int64_t)OUT * DELTA_RANK; i++)
        p[i] = next_normal(rng, 0.07);
    for (int64_t i = 0; i < (int64_t)DELTA_RANK * IN; i++)
        q[i] = next_normal(rng, 0.07);

    /* 1. W: host FP32 -> device -> NF4 with double quantization (blocksize 64). */
    qlora_quant_params qp = qlora_quant_default_params();
    if (new_tensor(ctx, &w_host, "layer.weight", QLORA_F32, OUT, IN, 0, QLORA_MEM_WORKSPACE) != QLORA_OK ||
        new_tensor(ctx, &w_dev, "layer.weight", QLORA_F32, OUT, IN, 1, QLORA_MEM_WORKSPACE) != QLORA_OK) {
        failed("allocating W");
        goto done;
    }
    memcpy(w_host.data, w, sizeof(float) * OUT * IN);
    if (qlora_tensor_copy(ctx, &w_dev, &w_host) != QLORA_OK || qlora_quantize(ctx, &w_dev, &qp, &r->w) != QLORA_OK) {
        failed("quantizing W");
        goto done;
    }

    /* 2. The teacher starts from what the layer actually holds: dequant(W), back on the host. */
    if (new_tensor(ctx, &wdq_dev, "layer.weight.dequant", QLORA_F32, OUT, IN, 1, QLORA_MEM_WORKSPACE) != QLORA_OK ||
        new_tensor(ctx, &wdq_host, "layer.weight.dequant", QLORA_F32, OUT, IN, 0, QLORA_MEM_WORKSPACE) != QLORA_OK ||
        qlora_dequantize(ctx, &r->w, &wdq_dev) != QLORA_OK || qlora_tensor_copy(ctx, &wdq_host, &wdq_dev) != QLORA_OK) {
        failed("dequantizing W");
        goto done;
    }
    const float *wdq = wdq_host.data;
    for (int64_t o = 0; o < OUT; o++)
        for (int64_t i = 0; i < IN; i++) {
            float d = 0.0f;
            for (int k = 0; k < DELTA_RANK; k++)
                d += p[o * DELTA_RANK + k] * q[k * IN + i];
            w[o * IN + i] = wdq[o * IN + i] + d; /* w now holds the teacher's weight */
        }

    /* 3. X in BF16 (what the layer sees) and T = X·W_teacherᵀ in FP32. */
    uint16_t *xb = r->x_host.data;
    for (int64_t i = 0; i < (int64_t)M * IN; i++) {
        xb[i] = float_to_bf16(next_normal(rng, 1.0));
        x[i] = bf16_to_float(xb[i]);
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t o = 0; o < OUT; o++) {
            double acc = 0.0;
            for (int64_t i = 0; i < IN; i++)
                acc += (double)x[m * IN + i] * (double)w[o * IN + i];
            r->teacher[m * OUT + o] = (float)acc;
        }
    if (qlora_tensor_copy(ctx, &r->x_dev, &r->x_host) != QLORA_OK) {
        failed("uploading X");
        goto done;
    }
    rc = 0;
done:;
    qlora_tensor *scratch[] = {&w_host, &w_dev, &wdq_dev, &wdq_host};
    for (size_t i = 0; i < sizeof scratch / sizeof scratch[0]; i++)
        if (scratch[i]->data)
            qlora_tensor_free(ctx, scratch[i]);
    free(w);
    free(p);
    free(q);
    free(x);
    return rc;
}

/* Loss of an inference forward (no dropout) over the whole batch. */
static int eval_loss(run *r, double *loss) {
    if (qlora_linear_forward(r->lin, &r->x_dev, &r->y_dev, NULL, NULL) != QLORA_OK ||
        qlora_tensor_copy(r->ctx, &r->y_host, &r->y_dev) != QLORA_OK)
        return failed("eval forward");
    double sum = 0.0;
    const uint16_t *y = r->y_host.data;
    for (int64_t i = 0; i < (int64_t)M * OUT; i++) {
        double diff = (double)bf16_to_float(y[i]) - (double)r->teacher[i];
        sum += diff * diff;
    }
    *loss = sum / ((double)M * OUT);
    return 0;
}

/* One optimizer update: forward and backward on each micro-batch (gradients accumulate in the
 * adapter), then a step with grad_scale 1/ACCUM so that the update sees the batch mean. */
static int train_step(run *r, int64_t step, double *loss, qlora_step_report *rep) {
    *loss = 0.0;
    for (int mb = 0; mb < ACCUM; mb++) {
        qlora_tensor x, y, y_host, dy_host;
        /* A fresh dropout stream per micro-batch of every step: masks differ and can be replayed. */
        qlora_linear_fwd_opts opts = {1, (uint64_t)(step * ACCUM + mb)};
        qlora_linear_saved saved = {0};
        if (row_view(&r->x_dev, mb * MICRO, MICRO, &x) != QLORA_OK ||
            row_view(&r->y_dev, mb * MICRO, MICRO, &y) != QLORA_OK ||
            row_view(&r->y_host, mb * MICRO, MICRO, &y_host) != QLORA_OK ||
            row_view(&r->dy_host, 0, MICRO, &dy_host) != QLORA_OK)
            return failed("micro-batch views");
        qlora_status st = qlora_linear_forward(r->lin, &x, &y, &opts, &saved);
        if (st == QLORA_OK)
            st = qlora_tensor_copy(r->ctx, &y_host, &y);
        if (st == QLORA_OK) {
            *loss += mse_and_grad(y_host.data, r->teacher + (size_t)mb * MICRO * OUT, dy_host.data,
                                  (int64_t)MICRO * OUT) / ACCUM;
            st = qlora_tensor_copy(r->ctx, &r->dy_dev, &dy_host);
        }
        /* Backward needs no dX: this is the first (and only) layer. */
        if (st == QLORA_OK)
            st = qlora_linear_backward(r->lin, &x, &r->dy_dev, &saved, NULL);
        qlora_linear_saved_free(&saved);
        if (st != QLORA_OK)
            return failed("training micro-batch");
    }
    if (qlora_optimizer_step(r->opt, 1.0 / ACCUM, rep) != QLORA_OK || qlora_optimizer_zero_grad(r->opt) != QLORA_OK)
        return failed("optimizer step");
    return 0;
}

static int print_report(run *r) {
    qlora_paging_stats ps;
    if (qlora_optimizer_paging_stats(r->opt, &ps) != QLORA_OK)
        return failed("paging stats");
    printf("paging: pages_total %llu pool_pages %llu pool_limit %llu elements_per_page %llu page_ins %llu "
           "page_outs %llu bytes_in %llu bytes_out %llu seconds %.6f\n",
           (unsigned long long)ps.pages_total, (unsigned long long)ps.pool_pages, (unsigned long long)ps.pool_limit,
           (unsigned long long)ps.elements_per_page, (unsigned long long)ps.page_ins,
           (unsigned long long)ps.page_outs, (unsigned long long)ps.bytes_in, (unsigned long long)ps.bytes_out,
           ps.seconds);
    /* The report is sized by a first call with cap 0, as with snprintf. */
    size_t needed = 0;
    if (qlora_mem_report_text(r->ctx, NULL, 0, &needed) != QLORA_OK)
        return failed("memory report");
    char *text = malloc(needed);
    if (!text) {
        fprintf(stderr, "train-lora: out of host memory\n");
        return 1;
    }
    if (qlora_mem_report_text(r->ctx, text, needed, &needed) != QLORA_OK) {
        free(text);
        return failed("memory report");
    }
    fputs(text, stdout);
    free(text);
    return 0;
}

static int parse_steps(const char *text, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < 1 || v > 1000000) {
        fprintf(stderr, "train-lora: --steps expects an integer in 1..1000000, got '%s'\n", text);
        return -1;
    }
    *out = v;
    return 0;
}

static void usage(FILE *to) {
    fprintf(to, "usage: train-lora [--backend cpu|cuda] [--steps N] [--save FILE]\n"
                "Trains a LoRA adapter (r 8) on an NF4 linear layer [256, 512] to match a teacher\n"
                "with paged AdamW. Defaults: cpu, 200 steps, nothing saved.\n");
}

int main(int argc, char **argv) {
    qlora_ctx_params cp = qlora_ctx_default_params();
    long long steps = 200;
    const char *save_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if ((!strcmp(a, "--backend") || !strcmp(a, "--steps") || !strcmp(a, "--save")) && i + 1 >= argc) {
            fprintf(stderr, "train-lora: %s needs a value\n", a);
            return 1;
        }
        if (!strcmp(a, "--backend")) {
            const char *b = argv[++i];
            if (!strcmp(b, "cpu")) {
                cp.backend = QLORA_BACKEND_CPU;
            } else if (!strcmp(b, "cuda")) {
                cp.backend = QLORA_BACKEND_CUDA;
            } else {
                fprintf(stderr, "train-lora: --backend expects cpu or cuda, got '%s'\n", b);
                return 1;
            }
        } else if (!strcmp(a, "--steps")) {
            if (parse_steps(argv[++i], &steps))
                return 1;
        } else if (!strcmp(a, "--save")) {
            save_path = argv[++i];
        } else {
            fprintf(stderr, "train-lora: unknown argument '%s'\n", a);
            usage(stderr);
            return 1;
        }
    }

    run r = {0};
    uint64_t rng = 1;
    int rc = 1;
    qlora_set_log_callback(log_to_stderr, NULL);
    if (qlora_ctx_create(&cp, &r.ctx) != QLORA_OK)
        return failed("creating the context");

    /* Buffers that cross between host and device: X, Y and dY. */
    if (new_tensor(r.ctx, &r.x_dev, "x", QLORA_BF16, M, IN, 1, QLORA_MEM_ACTIVATIONS) != QLORA_OK ||
        new_tensor(r.ctx, &r.y_dev, "y", QLORA_BF16, M, OUT, 1, QLORA_MEM_ACTIVATIONS) != QLORA_OK ||
        new_tensor(r.ctx, &r.dy_dev, "dy", QLORA_BF16, MICRO, OUT, 1, QLORA_MEM_ACTIVATIONS) != QLORA_OK ||
        new_tensor(r.ctx, &r.x_host, "x", QLORA_BF16, M, IN, 0, QLORA_MEM_WORKSPACE) != QLORA_OK ||
        new_tensor(r.ctx, &r.y_host, "y", QLORA_BF16, M, OUT, 0, QLORA_MEM_WORKSPACE) != QLORA_OK ||
        new_tensor(r.ctx, &r.dy_host, "dy", QLORA_BF16, MICRO, OUT, 0, QLORA_MEM_WORKSPACE) != QLORA_OK) {
        failed("allocating activations");
        goto done;
    }
    if (make_problem(&r, &rng))
        goto done;

    /* The layer over the NF4 weight, with one adapter: r 8, alpha 16 (s = 2), dropout 0.05. */
    qlora_lora_params lp = qlora_lora_default_params();
    lp.rank = 8;
    lp.alpha = 16.0f;
    lp.dropout = 0.05f;
    lp.seed = 1;
    int id = -1;
    if (qlora_linear_create(r.ctx, &r.w, NULL, &r.lin) != QLORA_OK ||
        qlora_linear_add_adapter(r.lin, "default", &lp, &id) != QLORA_OK) {
        failed("creating the layer");
        goto done;
    }

    /* Paged AdamW over the adapter's A and B. States are m and v (8 bytes per element): a 4 KiB
     * page holds 512 elements, A [8, 512] and B [256, 8] take 12 pages, and the device pool
     * holds 2 of them, so most pages travel to the host and back every step. The learning
     * rate warms up for 10 updates and decays along a cosine so that the fit settles. */
    qlora_adamw_params ap = qlora_adamw_default_params();
    ap.max_grad_norm = 1.0;
    ap.page_bytes = 4096;
    ap.gpu_mem_limit = 2 * ap.page_bytes;
    ap.schedule.kind = QLORA_LR_COSINE;
    ap.schedule.lr = 1e-2;
    ap.schedule.warmup_steps = 10;
    ap.schedule.total_steps = steps;
    ap.schedule.min_lr_ratio = 0.0;
    qlora_tensor a, b, grad_a, grad_b;
    if (qlora_adamw_create(r.ctx, &ap, &r.opt) != QLORA_OK ||
        qlora_linear_adapter_tensors(r.lin, id, &a, &b, &grad_a, &grad_b) != QLORA_OK ||
        qlora_optimizer_add_param(r.opt, &a, &grad_a) != QLORA_OK ||
        qlora_optimizer_add_param(r.opt, &b, &grad_b) != QLORA_OK) {
        failed("creating the optimizer");
        goto done;
    }

    printf("train-lora: %s backend, W [%d, %d] nf4 + double quant, adapter r %d alpha %g dropout %g, "
           "%d rows in %d micro-batches, %lld steps\n",
           cp.backend == QLORA_BACKEND_CUDA ? "cuda" : "cpu", OUT, IN, lp.rank, (double)lp.alpha,
           (double)lp.dropout, M, ACCUM, steps);
    double loss, eval;
    if (eval_loss(&r, &eval))
        goto done;
    printf("step %5d  eval_loss %.6e\n", 0, eval);
    for (int64_t s = 1; s <= steps; s++) {
        qlora_step_report rep;
        if (train_step(&r, s, &loss, &rep))
            goto done;
        if (s % PRINT_EVERY == 0 || s == steps) {
            if (eval_loss(&r, &eval))
                goto done;
            printf("step %5lld  loss %.6e  eval_loss %.6e  grad_norm %.4e  lr %.3e%s\n", (long long)s, loss, eval,
                   rep.grad_norm, rep.lr, rep.skipped ? "  (skipped: non-finite gradient)" : "");
        }
    }
    if (print_report(&r))
        goto done;
    if (save_path) {
        if (qlora_optimizer_save(r.opt, save_path) != QLORA_OK) {
            failed("saving the optimizer state");
            goto done;
        }
        printf("saved the optimizer state to %s\n", save_path);
    }
    rc = 0;
done:
    run_free(&r);
    return rc;
}
