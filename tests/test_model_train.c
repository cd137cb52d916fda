/*
 * Training the model's LoRA adapters (qlora_model_forward_backward) against transformers + peft.
 * tests/fixtures/make_model_fixture.py puts random non-zero adapters (r 4, alpha 8, dropout 0)
 * on all seven projections of both layers of tiny_llama and tiny_qwen2 (NF4 weights) and records
 * the logits, the loss and the gradient of every A and B; the same adapters are written here
 * into the model libqlora loads. Also: a packed batch, checkpointing changes no bit, a second
 * call accumulates, loss_denom scales the gradients. Every case runs on every backend of
 * tu_backends(): both CPU kernel sets, and CUDA when a GPU is visible.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "testutil.h"
#ifdef QLORA_HAVE_CUDA
#include "internal.h"
#include "linear_cuda.h"
#endif

enum { MAX_T = 64, MAX_V = 128, RANK = 4, NPROJ = 7 };
#define ALPHA 8.0f

static const char *const MODELS[] = {"tiny_llama", "tiny_qwen2"};

/* <model>_reference.safetensors, open for the test (tensors are copied out: the mapping may be
 * unaligned), with the token arrays of the single-sequence and the packed case. */
typedef struct reference {
    qlora_safetensors *f;
    int64_t T, V, packed_T;
    int32_t ids[MAX_T], labels[MAX_T];
    int32_t packed_ids[MAX_T], packed_labels[MAX_T], packed_seq_start[MAX_T];
} reference;

static void read_tensor(qlora_safetensors *f, const char *name, qlora_dtype dtype, int64_t numel, void *dst,
                        qlora_tensor *t) {
    ck_assert_qlora_ok(qlora_safetensors_find(f, name, t));
    ck_assert_msg(t->dtype == dtype, "%s: dtype %s", name, qlora_dtype_name(t->dtype));
    ck_assert_msg(qlora_tensor_numel(t) <= numel, "%s: %lld elements > %lld", name,
                  (long long)qlora_tensor_numel(t), (long long)numel);
    memcpy(dst, t->data, qlora_tensor_nbytes(t));
}

static float read_scalar(const reference *r, const char *name) {
    float x;
    qlora_tensor t;
    read_tensor(r->f, name, QLORA_F32, 1, &x, &t);
    return x;
}

static void open_reference(const char *model, reference *r) {
    char name[256];
    qlora_tensor t;
    snprintf(name, sizeof name, "%s_reference.safetensors", model);
    ck_assert_qlora_ok(qlora_safetensors_open(tu_fixture(name), &r->f));
    read_tensor(r->f, "input_ids", QLORA_I32, MAX_T, r->ids, &t);
    r->T = t.shape[0];
    read_tensor(r->f, "labels", QLORA_I32, MAX_T, r->labels, &t);
    read_tensor(r->f, "packed_input_ids", QLORA_I32, MAX_T, r->packed_ids, &t);
    r->packed_T = t.shape[0];
    read_tensor(r->f, "packed_labels", QLORA_I32, MAX_T, r->packed_labels, &t);
    read_tensor(r->f, "packed_seq_start", QLORA_I32, MAX_T, r->packed_seq_start, &t);
    ck_assert_qlora_ok(qlora_safetensors_find(r->f, "lora_logits", &t));
    r->V = t.shape[1];
    ck_assert_int_le(r->V, MAX_V);
}

/* The "default" adapter of projection `proj` (index of qlora_target_name) in decoder layer `layer`. */
static void adapter_tensors(qlora_model *m, int64_t layer, int proj, qlora_tensor *a, qlora_tensor *b,
                            qlora_tensor *ga, qlora_tensor *gb) {
    qlora_linear *lin;
    int id;
    ck_assert_qlora_ok(qlora_model_linear(m, layer, qlora_target_name(proj), &lin));
    ck_assert_qlora_ok(qlora_linear_find_adapter(lin, "default", &id));
    ck_assert_qlora_ok(qlora_linear_adapter_tensors(lin, id, a, b, ga, gb));
}

static int64_t num_layers(const qlora_model *m) {
    qlora_model_config cfg;
    ck_assert_qlora_ok(qlora_model_get_config(m, &cfg));
    return cfg.num_layers;
}

/* Reference F32 values -> the BF16 tensor t (on the context's device). The fixture's values are
 * BF16-representable, so the adapters hold exactly PEFT's numbers. */
static void write_adapter(qlora_ctx *ctx, const reference *r, const char *key, qlora_tensor *t) {
    int64_t n = qlora_tensor_numel(t);
    float *x = malloc((size_t)n * sizeof *x);
    ck_assert_ptr_nonnull(x);
    qlora_tensor rt;
    read_tensor(r->f, key, QLORA_F32, n, x, &rt);
    ck_assert_msg(rt.ndim == 2 && rt.shape[0] == t->shape[0] && rt.shape[1] == t->shape[1],
                  "%s [%lld, %lld] vs %s [%lld, %lld]", key, (long long)rt.shape[0], (long long)rt.shape[1],
                  t->name, (long long)t->shape[0], (long long)t->shape[1]);
    uint16_t *h = tu_to_dtype(x, n, QLORA_BF16);
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(ql_bf16_to_f32(h[i]) == x[i], "%s[%lld] = %g is not a BF16 value", key, (long long)i, x[i]);
    qlora_tensor src;
    ck_assert_qlora_ok(qlora_tensor_init(&src, key, QLORA_BF16, 2, t->shape, h, QLORA_DEVICE_HOST));
    ck_assert_qlora_ok(qlora_tensor_copy(ctx, t, &src));
    free(h);
    free(x);
}

/* The model with the fixture's adapters (r 4, alpha 8, no dropout, all seven projections). */
static qlora_model *load_adapted(qlora_ctx *ctx, const char *model, const reference *r) {
    qlora_model_load_opts o = qlora_model_load_default_opts();
    o.lora.rank = RANK;
    o.lora.alpha = ALPHA;
    o.lora.dropout = 0.0f;
    o.targets = QLORA_TARGET_ALL_LINEAR;
    qlora_model *m = NULL;
    ck_assert_qlora_ok(qlora_model_load(ctx, tu_fixture(model), &o, &m));
    for (int64_t l = 0; l < num_layers(m); l++)
        for (int p = 0; p < NPROJ; p++) {
            qlora_tensor a, b;
            char key[96];
            adapter_tensors(m, l, p, &a, &b, NULL, NULL);
            snprintf(key, sizeof key, "lora.%lld.%s.A", (long long)l, qlora_target_name(p));
            write_adapter(ctx, r, key, &a);
            snprintf(key, sizeof key, "lora.%lld.%s.B", (long long)l, qlora_target_name(p));
            write_adapter(ctx, r, key, &b);
        }
    return m;
}

static void zero_grads(qlora_model *m) {
    for (int64_t l = 0; l < num_layers(m); l++)
        for (int p = 0; p < NPROJ; p++) {
            qlora_linear *lin;
            ck_assert_qlora_ok(qlora_model_linear(m, l, qlora_target_name(p), &lin));
            ck_assert_qlora_ok(qlora_linear_zero_grads(lin));
        }
}

/* A gradient tensor (BF16 or F32, on the context's device) as float32 in dst. */
static void read_grad(qlora_ctx *ctx, const qlora_tensor *g, float *dst) {
    int64_t n = qlora_tensor_numel(g);
    void *raw = malloc(qlora_tensor_nbytes(g));
    ck_assert_ptr_nonnull(raw);
    qlora_tensor host;
    ck_assert_qlora_ok(qlora_tensor_init(&host, g->name, g->dtype, g->ndim, g->shape, raw, QLORA_DEVICE_HOST));
    ck_assert_qlora_ok(qlora_tensor_copy(ctx, &host, g));
    ck_assert_msg(g->dtype == QLORA_BF16 || g->dtype == QLORA_F32, "%s: dtype %s", g->name,
                  qlora_dtype_name(g->dtype));
    for (int64_t i = 0; i < n; i++)
        dst[i] = g->dtype == QLORA_BF16 ? ql_bf16_to_f32(((uint16_t *)raw)[i]) : ((float *)raw)[i];
    free(raw);
}

/* Every adapter gradient of the model, (layer, projection, dA then dB) order, in one malloc'ed
 * float32 array of *n values. */
static float *all_grads(qlora_ctx *ctx, qlora_model *m, int64_t *n) {
    int64_t total = 0, L = num_layers(m);
    for (int64_t l = 0; l < L; l++)
        for (int p = 0; p < NPROJ; p++) {
            qlora_tensor ga, gb;
            adapter_tensors(m, l, p, NULL, NULL, &ga, &gb);
            total += qlora_tensor_numel(&ga) + qlora_tensor_numel(&gb);
        }
    float *g = malloc((size_t)total * sizeof *g), *at = g;
    ck_assert_ptr_nonnull(g);
    for (int64_t l = 0; l < L; l++)
        for (int p = 0; p < NPROJ; p++) {
            qlora_tensor ga, gb;
            adapter_tensors(m, l, p, NULL, NULL, &ga, &gb);
            read_grad(ctx, &ga, at);
            at += qlora_tensor_numel(&ga);
            read_grad(ctx, &gb, at);
            at += qlora_tensor_numel(&gb);
        }
    *n = total;
    return g;
}

/* Gradients against the reference's <prefix>.<l>.<proj>.grad_A / grad_B: the worst per-tensor
 * rms(diff) / rms(ref) and the same over all tensors together. */
typedef struct grad_diff {
    double worst, total;
    char worst_name[96];
} grad_diff;

static grad_diff compare_grads(qlora_ctx *ctx, qlora_model *m, const reference *r, const char *prefix) {
    grad_diff d = {0, 0, ""};
    double sd_all = 0, ss_all = 0;
    for (int64_t l = 0; l < num_layers(m); l++)
        for (int p = 0; p < NPROJ; p++) {
            qlora_tensor g[2];
            adapter_tensors(m, l, p, NULL, NULL, &g[0], &g[1]);
            for (int w = 0; w < 2; w++) {
                int64_t n = qlora_tensor_numel(&g[w]);
                float *ours = malloc((size_t)n * sizeof *ours), *ref = malloc((size_t)n * sizeof *ref);
                ck_assert(ours && ref);
                char key[96];
                qlora_tensor rt;
                snprintf(key, sizeof key, "%s.%lld.%s.grad_%c", prefix, (long long)l, qlora_target_name(p), "AB"[w]);
                read_tensor(r->f, key, QLORA_F32, n, ref, &rt);
                ck_assert_int_eq(qlora_tensor_numel(&rt), n);
                read_grad(ctx, &g[w], ours);
                double sd = 0, ss = 0;
                for (int64_t i = 0; i < n; i++) {
                    sd += ((double)ours[i] - ref[i]) * ((double)ours[i] - ref[i]);
                    ss += (double)ref[i] * ref[i];
                }
                ck_assert_msg(ss > 0, "%s is zero: the fixture tests nothing", key);
                if (sqrt(sd / ss) > d.worst) {
                    d.worst = sqrt(sd / ss);
                    snprintf(d.worst_name, sizeof d.worst_name, "%s", key);
                }
                sd_all += sd;
                ss_all += ss;
                free(ours);
                free(ref);
            }
        }
    d.total = sqrt(sd_all / ss_all);
    return d;
}

/* max |a - b| and rms(a - b), both divided by rms(b) (b: the reference). */
static void logit_diff(const float *a, const float *b, int64_t n, double *max_rel, double *rms_rel) {
    double ss = 0, sd = 0, md = 0;
    for (int64_t i = 0; i < n; i++) {
        ss += (double)b[i] * b[i];
        sd += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        md = fmax(md, fabs((double)a[i] - b[i]));
    }
    double rms = sqrt(ss / (double)n);
    *max_rel = md / rms;
    *rms_rel = sqrt(sd / (double)n) / rms;
}

static qlora_train_step_result train(qlora_model *m, const int32_t *ids, const int32_t *seq_start,
                                     const int32_t *labels, int64_t T, const qlora_train_step_opts *o) {
    qlora_batch batch = {ids, NULL, seq_start, labels, T};
    qlora_train_step_result res;
    ck_assert_qlora_ok(qlora_model_forward_backward(m, &batch, o, &res));
    return res;
}

/* The 4-bit matmul's dequantize workspace belongs to a CUDA context, not to a model: it is kept
 * (grow-only) for the next call until the context goes. Released here so that "nothing left
 * allocated" means the model and its calls freed everything they own. */
static void release_context_cache(qlora_ctx *ctx) {
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        ql_cuda_workspace_release((ql_cuda_state *)ctx->cuda);
#else
    (void)ctx;
#endif
}

/* Runs fn(ctx, backend name, model name, reference) for both models on every backend and checks
 * that the model freed everything. */
typedef void (*model_case)(qlora_ctx *ctx, const char *backend, qlora_model *m, const reference *r,
                           const char *model);

static void for_each_backend_and_model(model_case fn, int models) {
    tu_backend b[4];
    int n = tu_backends(b);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < models; k++) {
            qlora_ctx *ctx = tu_ctx(&b[i]);
            static reference r;
            open_reference(MODELS[k], &r);
            qlora_model *m = load_adapted(ctx, MODELS[k], &r);
            fn(ctx, b[i].name, m, &r, MODELS[k]);
            qlora_model_free(m);
            qlora_safetensors_close(r.f);
            release_context_cache(ctx);
            qlora_mem_stats st;
            ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
            ck_assert_uint_eq(st.live_allocations, 0);
            qlora_ctx_free(ctx);
        }
}

/* The forward with the adapters against PEFT's. Both compute in BF16 (PEFT's LoRA branch in
 * float32, see the fixture script): two independent BF16 noises, as in test_model.c, which
 * bounds them at 10% max / 2.5% RMS of the logits' RMS for the plain model. The adapted model
 * measured 7.2% max / 1.6% RMS (tiny_llama; tiny_qwen2 4.8% / 1.1%; PEFT itself is 5.0% / 1.4%
 * from the same model in float64), so the bounds are 12% / 3%. The adapters move the logits by
 * ~50% RMS: a missing, unscaled or transposed adapter is far outside. CUDA is held to the same
 * bounds: its kernels round to BF16 where the CPU's do (RMSNorm, RoPE, the residual add and the
 * embedding bit for bit, SwiGLU within 2 ulps, attention and every product in float32 with other
 * summation orders, the 4-bit products on the same bf16(code·absmax) weights), so it is another
 * BF16 noise of the same size as the CPU's, which is itself inside these bounds. */
static void forward_case(qlora_ctx *ctx, const char *backend, qlora_model *m, const reference *r,
                         const char *model) {
    (void)ctx;
    static float logits[MAX_T * MAX_V], ref[MAX_T * MAX_V];
    qlora_tensor t;
    read_tensor(r->f, "lora_logits", QLORA_F32, MAX_T * MAX_V, ref, &t);
    float loss = NAN, ref_loss = read_scalar(r, "lora_loss");
    ck_assert_qlora_ok(qlora_model_forward(m, r->ids, NULL, NULL, r->T, r->labels, &loss, logits));
    double max_rel, rms_rel;
    logit_diff(logits, ref, r->T * r->V, &max_rel, &rms_rel);
    printf("%s %s: LoRA logits vs PEFT max %.4f rms %.4f, loss %.5f (ref %.5f)\n", model, backend, max_rel, rms_rel,
           loss, ref_loss);
    ck_assert_msg(max_rel < 0.12, "%s %s: max |logit diff| / rms = %g", model, backend, max_rel);
    ck_assert_msg(rms_rel < 0.03, "%s %s: rms logit diff / rms = %g", model, backend, rms_rel);
    ck_assert_msg(fabsf(loss - ref_loss) < 0.02f, "%s %s: loss %g vs %g", model, backend, loss, ref_loss);
}

START_TEST(lora_forward_matches_peft) {
    for_each_backend_and_model(forward_case, 2);
}
END_TEST

/* Gradient bounds, as rms(ours - PEFT) / rms(PEFT): per tensor and over all 28 tensors. The
 * same computation in float64 (PEFT's graph on a float64 copy of the model) is up to 2.9% per
 * tensor and 1.4-1.7% overall from PEFT's BF16 gradients: the BF16 activations (rounded after
 * every op, through two layers and back) decide the error, ours is a second noise of that size,
 * plus the BF16 rounding of our gradients (0.2%). Measured on both CPU backends: up to 3.7% per
 * tensor and 2.5% overall (packed tiny_llama). A real error is far larger (measured in PEFT's
 * graph): RMSNorm's backward without the d(rstd) term 97% per tensor / 56% overall, no
 * gradient through k 100% / 25%, a gradient missing the scaling s (2) 50%, the loss divided by
 * T instead of the T - 1 targets 9% overall. The loss bound, 0.02, allows twice the gap measured (0.010,
 * packed tiny_llama; float64 sits between the two). CUDA takes the same bounds, for the reason
 * given at forward_case; its cross-entropy gradient is rounded to BF16 before the lm_head
 * product as in PEFT's BF16 graph, and its attention backward takes D from an exact float32
 * pass like the CPU's. */
#define GRAD_TENSOR_BOUND 0.08
#define GRAD_TOTAL_BOUND 0.05

static void gradient_case(qlora_ctx *ctx, const char *backend, qlora_model *m, const reference *r,
                          const char *model) {
    zero_grads(m);
    qlora_train_step_result res = train(m, r->ids, NULL, r->labels, r->T, NULL);
    float ref_loss = read_scalar(r, "lora_loss");
    ck_assert_int_eq(res.targets, r->T - 1);
    double loss = res.loss_sum / (double)res.targets;
    grad_diff d = compare_grads(ctx, m, r, "lora");
    printf("%s %s: loss %.5f (PEFT %.5f); gradients vs PEFT: worst %.4f (%s), all %.4f\n", model, backend, loss,
           ref_loss, d.worst, d.worst_name, d.total);
    ck_assert_msg(fabs(loss - ref_loss) < 0.02, "%s %s: loss %g vs %g", model, backend, loss, ref_loss);
    ck_assert_msg(d.worst < GRAD_TENSOR_BOUND, "%s %s: %s rel rms %g", model, backend, d.worst_name, d.worst);
    ck_assert_msg(d.total < GRAD_TOTAL_BOUND, "%s %s: gradients rel rms %g", model, backend, d.total);

    /* Packed: two sequences in one row (seq_start), one mean over both sequences' targets. */
    zero_grads(m);
    res = train(m, r->packed_ids, r->packed_seq_start, r->packed_labels, r->packed_T, NULL);
    ref_loss = read_scalar(r, "packed_loss");
    ck_assert_int_eq(res.targets, r->packed_T - 2);
    loss = res.loss_sum / (double)res.targets;
    d = compare_grads(ctx, m, r, "packed");
    printf("%s %s: packed loss %.5f (PEFT %.5f); gradients vs PEFT: worst %.4f (%s), all %.4f\n", model, backend,
           loss, ref_loss, d.worst, d.worst_name, d.total);
    ck_assert_msg(fabs(loss - ref_loss) < 0.02, "%s %s: packed loss %g vs %g", model, backend, loss, ref_loss);
    ck_assert_msg(d.worst < GRAD_TENSOR_BOUND, "%s %s: packed %s rel rms %g", model, backend, d.worst_name, d.worst);
    ck_assert_msg(d.total < GRAD_TOTAL_BOUND, "%s %s: packed gradients rel rms %g", model, backend, d.total);
}

START_TEST(gradients_match_peft) {
    for_each_backend_and_model(gradient_case, 2);
}
END_TEST

/* Checkpointing recomputes each layer with the same kernels on the same inputs: the same bits.
 * A second call adds the same gradient again: exactly twice the first (doubling a BF16 or F32
 * value is exact, and bf16(g + c) = 2g when g = bf16(c)). On CUDA as well: no kernel sums in an
 * order that depends on scheduling (no float atomics; the attention backward gives each dk/dv
 * row to one CTA), and cuBLAS is deterministic for a fixed shape, stream and device. */
static void checkpoint_case(qlora_ctx *ctx, const char *backend, qlora_model *m, const reference *r,
                            const char *model) {
    qlora_train_step_opts o = qlora_train_step_default_opts();
    ck_assert_int_eq(o.grad_checkpointing, 1);
    int64_t n, n2;
    zero_grads(m);
    qlora_train_step_result on = train(m, r->ids, NULL, r->labels, r->T, &o);
    float *g_on = all_grads(ctx, m, &n);
    qlora_train_step_result twice = train(m, r->ids, NULL, r->labels, r->T, &o);
    float *g_twice = all_grads(ctx, m, &n2);
    o.grad_checkpointing = 0;
    zero_grads(m);
    qlora_train_step_result off = train(m, r->ids, NULL, r->labels, r->T, &o);
    float *g_off = all_grads(ctx, m, &n2);
    ck_assert_int_eq(n, n2);
    printf("%s %s: checkpointing on/off and accumulation over %lld gradient values\n", model, backend, (long long)n);
    ck_assert_msg(on.loss_sum == off.loss_sum && on.loss_sum == twice.loss_sum, "%s %s: loss sums %.17g %.17g %.17g",
                  model, backend, on.loss_sum, off.loss_sum, twice.loss_sum);
    ck_assert_int_eq(on.targets, off.targets);
    int64_t nonzero = 0;
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(memcmp(&g_on[i], &g_off[i], sizeof(float)) == 0, "%s %s: gradient %lld: %a with checkpointing, "
                      "%a without", model, backend, (long long)i, g_on[i], g_off[i]);
        ck_assert_msg(g_twice[i] == 2 * g_on[i], "%s %s: gradient %lld after two calls %a, after one %a", model,
                      backend, (long long)i, g_twice[i], g_on[i]);
        nonzero += g_on[i] != 0;
    }
    ck_assert_int_eq(nonzero, n); /* non-zero adapters: every A and B gets a gradient */
    free(g_on);
    free(g_twice);
    free(g_off);
}

START_TEST(checkpointing_changes_nothing_and_calls_accumulate) {
    for_each_backend_and_model(checkpoint_case, 1);
}
END_TEST

/* loss_denom D makes the gradient that of Σ losses / D. With D = 4·targets every backward op is
 * linear in the incoming gradient and scaling by a power of two commutes with rounding: exactly
 * a quarter of the mean's gradient, on CUDA too (1/D is a float32 power-of-two multiple of
 * 1/targets there as well, and the gradients are far above the subnormal range). With
 * D = 3·targets the BF16 roundings differ, so a third up to BF16 noise (bound 5%: a wrong
 * direction, D·targets, is off by a factor 9). loss_sum does not depend on D. */
static void loss_denom_case(qlora_ctx *ctx, const char *backend, qlora_model *m, const reference *r,
                            const char *model) {
    qlora_train_step_opts o = qlora_train_step_default_opts();
    int64_t n, n2;
    zero_grads(m);
    qlora_train_step_result mean = train(m, r->ids, NULL, r->labels, r->T, &o);
    float *g_mean = all_grads(ctx, m, &n);
    o.loss_denom = 4.0 * (double)mean.targets;
    zero_grads(m);
    qlora_train_step_result quarter = train(m, r->ids, NULL, r->labels, r->T, &o);
    float *g_quarter = all_grads(ctx, m, &n2);
    ck_assert_int_eq(n, n2);
    o.loss_denom = 3.0 * (double)mean.targets;
    zero_grads(m);
    qlora_train_step_result third = train(m, r->ids, NULL, r->labels, r->T, &o);
    float *g_third = all_grads(ctx, m, &n2);
    double sd = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(4 * g_quarter[i] == g_mean[i], "%s %s: gradient %lld with loss_denom 4·targets %a, mean %a",
                      model, backend, (long long)i, g_quarter[i], g_mean[i]);
        double e = 3.0 * g_third[i] - g_mean[i];
        sd += e * e;
        ss += (double)g_mean[i] * g_mean[i];
    }
    printf("%s %s: loss_denom 3·targets: 3·gradient vs mean's rel rms %.4f\n", model, backend, sqrt(sd / ss));
    ck_assert_msg(sqrt(sd / ss) < 0.05, "%s %s: loss_denom 3·targets rel rms %g", model, backend, sqrt(sd / ss));
    ck_assert_msg(fabs(quarter.loss_sum - mean.loss_sum) <= 1e-9 * mean.loss_sum &&
                      fabs(third.loss_sum - mean.loss_sum) <= 1e-9 * mean.loss_sum,
                  "%s %s: loss sums %.17g %.17g %.17g", model, backend, mean.loss_sum, quarter.loss_sum,
                  third.loss_sum);
    free(g_mean);
    free(g_quarter);
    free(g_third);
}

START_TEST(loss_denom_scales_gradients) {
    for_each_backend_and_model(loss_denom_case, 1);
}
END_TEST

int main(void) {
    Suite *s = suite_create("model_train");
    TCase *tc = tcase_create("model_train");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, lora_forward_matches_peft);
    tcase_add_test(tc, gradients_match_peft);
    tcase_add_test(tc, checkpointing_changes_nothing_and_calls_accumulate);
    tcase_add_test(tc, loss_denom_scales_gradients);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
