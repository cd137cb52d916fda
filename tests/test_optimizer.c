/*
 * Paged AdamW: learning-rate schedules; the step against an independent loop over the scalar
 * reference (ql_adamw_update_ref) for many steps; global-norm clipping; skipping on NaN/Inf;
 * paging under a tight budget (bit-identical to no paging, exact page counts); the pool capped
 * by a failed device allocation; save/restore exactness and load errors; the memory accountant;
 * bad input. Every test runs on each backend of tu_backends().
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adamw.h"
#include "half.h"
#include "optimizer_internal.h"
#include "pager.h"
#include "testutil.h"

/* Bytes per page in these tests: 128 elements with m and v, 64 with a master copy too. */
#define PAGE 1024
#define MAX_PARAMS 6

typedef struct pspec {
    const char *name;
    int ndim;
    int64_t shape[2];
    qlora_dtype grad_dtype;
} pspec;

/* Odd sizes, both gradient dtypes: 3 + 4 + 1 + 4 = 12 pages of 128 elements. */
static const pspec odd_specs[] = {
    {"layers.0.q_proj.lora_A", 2, {8, 37}, QLORA_BF16},
    {"layers.0.q_proj.lora_B", 2, {61, 8}, QLORA_F32},
    {"layers.0.norm_scale", 1, {1, 0}, QLORA_F32},
    {"layers.1.v_proj.lora_A", 2, {3, 129}, QLORA_BF16},
};
#define N_ODD 4

/* 8 + 6 + 6 = 20 pages of 128 elements (38 of 64 with master copies). */
static const pspec specs20[] = {
    {"a.lora_A", 2, {10, 100}, QLORA_BF16},
    {"b.lora_B", 2, {7, 100}, QLORA_F32},
    {"c.lora_A", 2, {13, 50}, QLORA_BF16},
};
#define N_20 3

/* 2 + 2 pages of 128 elements: small enough to count page moves by hand. */
static const pspec specs4[] = {
    {"x.lora_A", 2, {2, 128}, QLORA_F32},
    {"y.lora_B", 1, {200, 0}, QLORA_BF16},
};
#define N_4 2

/* ---- a set of trainable tensors on a context's device, with host copies */

typedef struct model {
    int n;
    pspec spec[MAX_PARAMS];
    int64_t numel[MAX_PARAMS];
    uint16_t *p[MAX_PARAMS];   /* host BF16 values */
    void *g[MAX_PARAMS];       /* host gradient, in its dtype */
    qlora_tensor param[MAX_PARAMS], grad[MAX_PARAMS];
} model;

static size_t gsize(qlora_dtype d) { return d == QLORA_F32 ? 4 : 2; }

static void upload(qlora_ctx *ctx, qlora_tensor *dev, void *host) {
    qlora_tensor h = *dev;
    h.data = host;
    h.device = QLORA_DEVICE_HOST;
    ck_assert_qlora_ok(qlora_tensor_copy(ctx, dev, &h));
}

static void download(qlora_ctx *ctx, const qlora_tensor *dev, void *host) {
    qlora_tensor h = *dev;
    h.data = host;
    h.device = QLORA_DEVICE_HOST;
    ck_assert_qlora_ok(qlora_tensor_copy(ctx, &h, dev));
}

/* Parameters ~ N(0, 0.05^2) from `seed`, so two models made with one seed start equal. */
static void model_init(qlora_ctx *ctx, model *md, const pspec *specs, int n, uint64_t seed) {
    memset(md, 0, sizeof *md);
    md->n = n;
    tu_rng rng;
    tu_rng_init(&rng, seed);
    for (int i = 0; i < n; i++) {
        md->spec[i] = specs[i];
        int64_t numel = specs[i].shape[0] * (specs[i].ndim == 2 ? specs[i].shape[1] : 1);
        md->numel[i] = numel;
        float *f = malloc((size_t)numel * sizeof *f);
        md->p[i] = malloc((size_t)numel * 2);
        md->g[i] = calloc((size_t)numel, gsize(specs[i].grad_dtype));
        ck_assert(f && md->p[i] && md->g[i]);
        tu_fill_normal(&rng, f, numel, 0.05f);
        for (int64_t e = 0; e < numel; e++)
            md->p[i][e] = ql_f32_to_bf16(f[e]);
        free(f);
        char gname[QLORA_NAME_MAX];
        snprintf(gname, sizeof gname, "%s.grad", specs[i].name);
        ck_assert_qlora_ok(qlora_tensor_init(&md->param[i], specs[i].name, QLORA_BF16, specs[i].ndim,
                                             specs[i].shape, NULL, QLORA_DEVICE_HOST));
        ck_assert_qlora_ok(qlora_tensor_init(&md->grad[i], gname, specs[i].grad_dtype, specs[i].ndim,
                                             specs[i].shape, NULL, QLORA_DEVICE_HOST));
        ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &md->param[i], 1, QLORA_MEM_ADAPTER_WEIGHTS));
        ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &md->grad[i], 1, QLORA_MEM_ADAPTER_GRADS));
        upload(ctx, &md->param[i], md->p[i]);
    }
}

static void model_free(qlora_ctx *ctx, model *md) {
    for (int i = 0; i < md->n; i++) {
        qlora_tensor_free(ctx, &md->param[i]);
        qlora_tensor_free(ctx, &md->grad[i]);
        free(md->p[i]);
        free(md->g[i]);
    }
}

/* Gradients ~ N(0, sigma^2) from `seed` (the same for every model given the same seed); with
 * bad >= 0 one element of parameter `bad` becomes bad_value. Uploaded to the device. */
static void model_set_grads(qlora_ctx *ctx, model *md, uint64_t seed, float sigma, int bad, float bad_value) {
    tu_rng rng;
    tu_rng_init(&rng, seed);
    for (int i = 0; i < md->n; i++) {
        float *f = malloc((size_t)md->numel[i] * sizeof *f);
        ck_assert_ptr_nonnull(f);
        tu_fill_normal(&rng, f, md->numel[i], sigma);
        if (i == bad)
            f[tu_next(&rng) % (uint64_t)md->numel[i]] = bad_value;
        for (int64_t e = 0; e < md->numel[i]; e++) {
            if (md->spec[i].grad_dtype == QLORA_F32)
                ((float *)md->g[i])[e] = f[e];
            else
                ((uint16_t *)md->g[i])[e] = ql_f32_to_bf16(f[e]);
        }
        free(f);
        upload(ctx, &md->grad[i], md->g[i]);
    }
}

static void model_register(qlora_optimizer *opt, const model *md) {
    for (int i = 0; i < md->n; i++)
        ck_assert_qlora_ok(qlora_optimizer_add_param(opt, &md->param[i], &md->grad[i]));
}

static float grad_value(const model *md, int i, int64_t e) {
    if (md->spec[i].grad_dtype == QLORA_F32)
        return ((const float *)md->g[i])[e];
    return ql_bf16_to_f32(((const uint16_t *)md->g[i])[e]);
}

/* ---- the optimizer state, as host arrays */

typedef struct state {
    int n;
    float *m[MAX_PARAMS], *v[MAX_PARAMS], *master[MAX_PARAMS];
    uint16_t *p[MAX_PARAMS];
} state;

static void state_alloc(state *s, const model *md) {
    memset(s, 0, sizeof *s);
    s->n = md->n;
    for (int i = 0; i < md->n; i++) {
        s->m[i] = calloc((size_t)md->numel[i], 4);
        s->v[i] = calloc((size_t)md->numel[i], 4);
        s->master[i] = calloc((size_t)md->numel[i], 4);
        s->p[i] = calloc((size_t)md->numel[i], 2);
        ck_assert(s->m[i] && s->v[i] && s->master[i] && s->p[i]);
    }
}

static void state_free(state *s) {
    for (int i = 0; i < s->n; i++) {
        free(s->m[i]);
        free(s->v[i]);
        free(s->master[i]);
        free(s->p[i]);
    }
}

/* Reads the optimizer's state (wherever its pages are) and the parameters from the device. */
static void state_read(qlora_ctx *ctx, qlora_optimizer *opt, const model *md, state *s) {
    ql_pager *pg = ql_optimizer_pager(opt);
    ck_assert_qlora_ok(ql_pager_quiesce(pg));
    for (int i = 0; i < md->n; i++) {
        const ql_opt_param *q = &opt->p[i];
        for (int64_t j = 0; j < q->npages; j++) {
            int64_t off = j * opt->elems_per_page;
            ck_assert_qlora_ok(ql_pager_read(pg, q->first_page + j, s->m[i] + off, s->v[i] + off,
                                             opt->params.master_weights ? s->master[i] + off : NULL));
        }
        download(ctx, &md->param[i], s->p[i]);
    }
}

static void assert_same(const void *a, const void *b, size_t bytes, const char *what, const char *backend) {
    if (memcmp(a, b, bytes) == 0)
        return;
    size_t i = 0;
    while (((const unsigned char *)a)[i] == ((const unsigned char *)b)[i])
        i++;
    ck_abort_msg("%s: %s differs at byte %zu of %zu", backend, what, i, bytes);
}

static void assert_states_equal(const state *a, const state *b, const model *md, int master, const char *backend) {
    for (int i = 0; i < md->n; i++) {
        size_t n = (size_t)md->numel[i];
        char what[256];
        snprintf(what, sizeof what, "'%s' parameter", md->spec[i].name);
        assert_same(a->p[i], b->p[i], 2 * n, what, backend);
        snprintf(what, sizeof what, "'%s' m", md->spec[i].name);
        assert_same(a->m[i], b->m[i], 4 * n, what, backend);
        snprintf(what, sizeof what, "'%s' v", md->spec[i].name);
        assert_same(a->v[i], b->v[i], 4 * n, what, backend);
        if (master) {
            snprintf(what, sizeof what, "'%s' master", md->spec[i].name);
            assert_same(a->master[i], b->master[i], 4 * n, what, backend);
        }
    }
}

/* ---- the independent reference: whole tensors through ql_adamw_update_ref */

/* The documented schedule formulas, written out again. */
static double expected_lr(const qlora_lr_schedule *s, int64_t step) {
    double w = (double)s->warmup_steps, t = (double)s->total_steps, x = (double)step;
    if (x < w)
        return s->lr * x / w;
    double span = fmax(1.0, t - w), r = s->min_lr_ratio;
    if (s->kind == QLORA_LR_LINEAR)
        return s->lr * (r + (1 - r) * fmax(0.0, (t - x) / span));
    if (s->kind == QLORA_LR_COSINE)
        return s->lr * (r + (1 - r) * 0.5 * (1 + cos(M_PI * fmin(1.0, (x - w) / span))));
    return s->lr;
}

typedef struct reference {
    state st;
    int64_t t;
} reference;

static void reference_init(reference *r, const model *md) {
    state_alloc(&r->st, md);
    r->t = 0;
    for (int i = 0; i < md->n; i++) {
        memcpy(r->st.p[i], md->p[i], (size_t)md->numel[i] * 2);
        for (int64_t e = 0; e < md->numel[i]; e++)
            r->st.master[i][e] = ql_bf16_to_f32(md->p[i][e]);
    }
}

/* One step on the host gradients of md; returns what the report should say. */
static qlora_step_report reference_step(reference *r, const model *md, const qlora_adamw_params *hp,
                                        double grad_scale) {
    double total = 0;
    for (int i = 0; i < md->n; i++) {
        ck_assert_int_lt(md->numel[i], QL_SUMSQ_CHUNK); /* one chunk: sequential order */
        double sum = 0;
        for (int64_t e = 0; e < md->numel[i]; e++) {
            double g = grad_value(md, i, e);
            sum += g * g;
        }
        total += sum;
    }
    qlora_step_report rep;
    memset(&rep, 0, sizeof rep);
    rep.grad_norm = sqrt(total) * grad_scale;
    rep.clip_coef = 1;
    if (hp->max_grad_norm > 0 && hp->max_grad_norm / (rep.grad_norm + 1e-6) < 1)
        rep.clip_coef = hp->max_grad_norm / (rep.grad_norm + 1e-6);
    rep.lr = expected_lr(&hp->schedule, r->t);
    r->t++;
    rep.step = r->t;
    ql_adamw_step s = ql_adamw_scalars(rep.lr, hp->beta1, hp->beta2, hp->eps, hp->weight_decay, r->t,
                                       grad_scale * rep.clip_coef);
    for (int i = 0; i < md->n; i++)
        ql_adamw_update_ref(&s, r->st.p[i], hp->master_weights ? r->st.master[i] : NULL, md->g[i],
                            md->spec[i].grad_dtype, r->st.m[i], r->st.v[i], md->numel[i]);
    return rep;
}

static int is_cuda(qlora_ctx *ctx) { return qlora_ctx_backend(ctx) == QLORA_BACKEND_CUDA; }

/* CPU norms follow the reference's summation order exactly; the CUDA reduction has its own. */
static void assert_norm(qlora_ctx *ctx, double got, double want, const char *backend) {
    if (is_cuda(ctx))
        ck_assert_msg(fabs(got - want) <= 1e-12 * want, "%s: grad_norm %.17g, expected %.17g", backend, got, want);
    else
        ck_assert_msg(got == want, "%s: grad_norm %.17g, expected %.17g", backend, got, want);
}

/* ---- a simulator of the documented eviction rule, to predict exact page counts */

typedef struct pager_sim {
    int64_t pages, slots, used;
    char *resident, *evicted;
    uint64_t outs, ins;
} pager_sim;

static void sim_init(pager_sim *s, int64_t pages, int64_t slots) {
    memset(s, 0, sizeof *s);
    s->pages = pages;
    s->slots = slots;
    s->resident = calloc((size_t)pages, 1);
    s->evicted = calloc((size_t)pages, 1);
    ck_assert(s->resident && s->evicted);
}

static void sim_fetch(pager_sim *s, int64_t k, int64_t protect) {
    if (s->resident[k])
        return;
    if (s->used == s->slots) {
        int64_t victim = -1, far = -1;
        for (int64_t j = 0; j < s->pages; j++) {
            int64_t d = (j - k + s->pages) % s->pages;
            if (s->resident[j] && j != protect && d > far) {
                far = d;
                victim = j;
            }
        }
        if (victim < 0)
            return; /* only a prefetch can find nothing to evict */
        s->resident[victim] = 0;
        s->evicted[victim] = 1;
        s->outs++;
        s->used--;
    }
    s->resident[k] = 1;
    s->used++;
    if (s->evicted[k])
        s->ins++;
}

static void sim_step(pager_sim *s) {
    for (int64_t k = 0; k < s->pages; k++) {
        sim_fetch(s, k, -1);
        if (k + 1 < s->pages)
            sim_fetch(s, k + 1, k);
    }
}

static int64_t sim_evicted_count(const pager_sim *s) {
    int64_t n = 0;
    for (int64_t j = 0; j < s->pages; j++)
        n += s->evicted[j];
    return n;
}

static void sim_free(pager_sim *s) {
    free(s->resident);
    free(s->evicted);
}

static qlora_adamw_params test_params(int master, uint64_t limit_pages) {
    qlora_adamw_params hp = qlora_adamw_default_params();
    hp.page_bytes = PAGE;
    hp.master_weights = master;
    hp.gpu_mem_limit = limit_pages * PAGE;
    hp.weight_decay = 0.01;
    hp.max_grad_norm = 1.0;
    hp.schedule.kind = QLORA_LR_COSINE;
    hp.schedule.lr = 1e-2;
    hp.schedule.warmup_steps = 2;
    hp.schedule.total_steps = 8;
    hp.schedule.min_lr_ratio = 0.1;
    return hp;
}

/* ================================================================ tests */

START_TEST(schedules_at_known_steps) {
    qlora_lr_schedule s = {QLORA_LR_CONSTANT, 1e-3, 10, 0, 0};
    double lr;
    ck_assert_qlora_ok(qlora_lr_at(&s, 0, &lr));
    ck_assert_double_eq(lr, 0.0); /* the first update of a warmup uses lr 0, as transformers does */
    ck_assert_qlora_ok(qlora_lr_at(&s, 5, &lr));
    ck_assert_double_eq_tol(lr, 5e-4, 1e-18);
    ck_assert_qlora_ok(qlora_lr_at(&s, 10, &lr));
    ck_assert_double_eq(lr, 1e-3);
    ck_assert_qlora_ok(qlora_lr_at(&s, 100000, &lr));
    ck_assert_double_eq(lr, 1e-3);

    s = (qlora_lr_schedule){QLORA_LR_LINEAR, 1e-3, 10, 110, 0};
    ck_assert_qlora_ok(qlora_lr_at(&s, 10, &lr));
    ck_assert_double_eq(lr, 1e-3);
    ck_assert_qlora_ok(qlora_lr_at(&s, 60, &lr));
    ck_assert_double_eq_tol(lr, 5e-4, 1e-18);
    ck_assert_qlora_ok(qlora_lr_at(&s, 110, &lr));
    ck_assert_double_eq(lr, 0.0);
    ck_assert_qlora_ok(qlora_lr_at(&s, 500, &lr));
    ck_assert_double_eq(lr, 0.0);
    s.min_lr_ratio = 0.1;
    ck_assert_qlora_ok(qlora_lr_at(&s, 60, &lr));
    ck_assert_double_eq_tol(lr, 1e-3 * (0.1 + 0.9 * 0.5), 1e-18);
    ck_assert_qlora_ok(qlora_lr_at(&s, 500, &lr));
    ck_assert_double_eq_tol(lr, 1e-4, 1e-18);

    s = (qlora_lr_schedule){QLORA_LR_COSINE, 2e-4, 10, 110, 0};
    ck_assert_qlora_ok(qlora_lr_at(&s, 3, &lr));
    ck_assert_double_eq_tol(lr, 2e-4 * 0.3, 1e-18);
    ck_assert_qlora_ok(qlora_lr_at(&s, 10, &lr));
    ck_assert_double_eq(lr, 2e-4);
    ck_assert_qlora_ok(qlora_lr_at(&s, 60, &lr)); /* midpoint */
    ck_assert_double_eq_tol(lr, 1e-4, 1e-18);
    ck_assert_qlora_ok(qlora_lr_at(&s, 35, &lr)); /* a quarter: (1 + cos(pi/4)) / 2 */
    ck_assert_double_eq_tol(lr, 2e-4 * 0.5 * (1 + sqrt(0.5)), 1e-18);
    ck_assert_qlora_ok(qlora_lr_at(&s, 110, &lr));
    ck_assert_double_eq_tol(lr, 0.0, 1e-20);
    s.min_lr_ratio = 0.25;
    ck_assert_qlora_ok(qlora_lr_at(&s, 1000, &lr)); /* holds min_lr after total_steps */
    ck_assert_double_eq_tol(lr, 5e-5, 1e-18);

    s = (qlora_lr_schedule){QLORA_LR_LINEAR, 1e-3, 0, 0, 0};
    ck_assert_qlora_fails(qlora_lr_at(&s, 0, &lr), QLORA_ERR_INVALID_ARG, "total_steps");
    s = (qlora_lr_schedule){QLORA_LR_CONSTANT, 1e-3, -1, 0, 0};
    ck_assert_qlora_fails(qlora_lr_at(&s, 0, &lr), QLORA_ERR_INVALID_ARG, "warmup_steps");
    s = (qlora_lr_schedule){QLORA_LR_COSINE, 1e-3, 0, 10, 1.5};
    ck_assert_qlora_fails(qlora_lr_at(&s, 0, &lr), QLORA_ERR_INVALID_ARG, "min_lr_ratio");
    s = (qlora_lr_schedule){QLORA_LR_CONSTANT, NAN, 0, 0, 0};
    ck_assert_qlora_fails(qlora_lr_at(&s, 0, &lr), QLORA_ERR_INVALID_ARG, "lr");
    s = (qlora_lr_schedule){(qlora_lr_kind)7, 1e-3, 0, 0, 0};
    ck_assert_qlora_fails(qlora_lr_at(&s, 0, &lr), QLORA_ERR_INVALID_ARG, "kind");
    s = (qlora_lr_schedule){QLORA_LR_CONSTANT, 1e-3, 0, 0, 0};
    ck_assert_qlora_fails(qlora_lr_at(&s, -1, &lr), QLORA_ERR_INVALID_ARG, "step");
    ck_assert_qlora_fails(qlora_lr_at(NULL, 0, &lr), QLORA_ERR_INVALID_ARG, "schedule");
}
END_TEST

/* Many steps of the optimizer (paged in small pages, several odd-sized parameters, BF16 and F32
 * gradients, clipping on some steps, accumulation scales, weight decay, a cosine schedule)
 * against the whole-tensor reference: parameters after every step, state at the end, reports. */
static void run_against_reference(int master) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    uint64_t seed = tu_seed();
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        model md;
        model_init(ctx, &md, odd_specs, N_ODD, seed);
        reference ref;
        reference_init(&ref, &md);
        qlora_adamw_params hp = test_params(master, 0);
        qlora_optimizer *opt = NULL;
        ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &opt));
        model_register(opt, &md);
        state got;
        state_alloc(&got, &md);
        int clipped = 0, unclipped = 0;
        for (int step = 0; step < 12; step++) {
            /* norm ~ sigma * sqrt(1172) * scale: 3.4 (clipped) or 0.34 */
            float sigma = step % 3 == 0 ? 0.1f : 0.01f;
            double grad_scale = step % 2 ? 0.5 : 1.0;
            model_set_grads(ctx, &md, seed + 100 + (uint64_t)step, sigma, -1, 0);
            qlora_step_report rep;
            ck_assert_qlora_ok(qlora_optimizer_step(opt, grad_scale, &rep));
            qlora_step_report want = reference_step(&ref, &md, &hp, grad_scale);
            ck_assert_int_eq(rep.step, step + 1);
            ck_assert_int_eq(rep.skipped, 0);
            ck_assert_double_eq(rep.lr, want.lr);
            assert_norm(ctx, rep.grad_norm, want.grad_norm, bs[b].name);
            if (!is_cuda(ctx))
                ck_assert_double_eq(rep.clip_coef, want.clip_coef);
            clipped += rep.clip_coef < 1;
            unclipped += rep.clip_coef == 1;
            for (int i = 0; i < md.n; i++) {
                download(ctx, &md.param[i], got.p[i]);
                assert_same(got.p[i], ref.st.p[i], (size_t)md.numel[i] * 2, md.spec[i].name, bs[b].name);
            }
        }
        ck_assert(clipped > 0 && unclipped > 0);
        state_read(ctx, opt, &md, &got);
        assert_states_equal(&got, &ref.st, &md, master, bs[b].name);
        /* The updates did move the parameters (a single element may walk back to its start). */
        int64_t moved = 0, total = 0;
        for (int i = 0; i < md.n; i++)
            for (int64_t e = 0; e < md.numel[i]; e++, total++)
                moved += got.p[i][e] != md.p[i][e];
        ck_assert_int_gt(moved, total / 2);
        qlora_optimizer_free(opt);
        state_free(&got);
        state_free(&ref.st);
        model_free(ctx, &md);
        qlora_ctx_free(ctx);
    }
}

START_TEST(step_matches_reference) { run_against_reference(0); }
END_TEST

START_TEST(step_matches_reference_with_master_weights) { run_against_reference(1); }
END_TEST

START_TEST(clipping_reports_true_norm_and_scales_gradients) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    uint64_t seed = tu_seed();
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        model a, c;
        model_init(ctx, &a, odd_specs, N_ODD, seed);
        model_init(ctx, &c, odd_specs, N_ODD, seed);
        qlora_adamw_params hp = test_params(0, 0);
        hp.max_grad_norm = 0.3;
        hp.schedule.warmup_steps = 0;
        qlora_optimizer *oa = NULL, *oc = NULL;
        ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &oa));
        hp.max_grad_norm = 0;
        ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &oc));
        model_register(oa, &a);
        model_register(oc, &c);
        model_set_grads(ctx, &a, seed + 1, 1.0f, -1, 0);
        model_set_grads(ctx, &c, seed + 1, 1.0f, -1, 0);
        double total = 0;
        for (int i = 0; i < a.n; i++) {
            double sum = 0;
            for (int64_t e = 0; e < a.numel[i]; e++)
                sum += (double)grad_value(&a, i, e) * grad_value(&a, i, e);
            total += sum;
        }
        double norm = sqrt(total) * 0.25;
        qlora_step_report ra, rc;
        ck_assert_qlora_ok(qlora_optimizer_step(oa, 0.25, &ra));
        assert_norm(ctx, ra.grad_norm, norm, bs[b].name);
        ck_assert_double_eq_tol(ra.clip_coef, 0.3 / (norm + 1e-6), 1e-12);
        ck_assert(ra.clip_coef < 0.1);
        /* Unclipped, with the clip folded into the scale: the same update, bit for bit. */
        ck_assert_qlora_ok(qlora_optimizer_step(oc, 0.25 * ra.clip_coef, &rc));
        ck_assert_double_eq(rc.clip_coef, 1);
        ck_assert_double_eq_tol(rc.grad_norm, 0.3, 1e-5);
        state sa, sc;
        state_alloc(&sa, &a);
        state_alloc(&sc, &c);
        state_read(ctx, oa, &a, &sa);
        state_read(ctx, oc, &c, &sc);
        assert_states_equal(&sa, &sc, &a, 0, bs[b].name);
        /* Below the threshold nothing is clipped. */
        model_set_grads(ctx, &a, seed + 2, 1e-3f, -1, 0);
        ck_assert_qlora_ok(qlora_optimizer_step(oa, 1.0, &ra));
        ck_assert_double_eq(ra.clip_coef, 1);
        ck_assert(ra.grad_norm < 0.3);
        state_free(&sa);
        state_free(&sc);
        qlora_optimizer_free(oa);
        qlora_optimizer_free(oc);
        model_free(ctx, &a);
        model_free(ctx, &c);
        qlora_ctx_free(ctx);
    }
}
END_TEST

START_TEST(nonfinite_gradient_skips_the_step) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    uint64_t seed = tu_seed();
    const float bad_values[3] = {NAN, INFINITY, -INFINITY};
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        model md;
        model_init(ctx, &md, odd_specs, N_ODD, seed);
        reference ref;
        reference_init(&ref, &md);
        qlora_adamw_params hp = test_params(1, 3); /* paged, with master copies */
        hp.schedule.kind = QLORA_LR_CONSTANT;
        hp.schedule.warmup_steps = 3;
        qlora_optimizer *opt = NULL;
        ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &opt));
        model_register(opt, &md);
        qlora_step_report rep;
        model_set_grads(ctx, &md, seed + 10, 0.01f, -1, 0);
        ck_assert_qlora_ok(qlora_optimizer_step(opt, 1.0, &rep));
        reference_step(&ref, &md, &hp, 1.0);
        state before, after;
        state_alloc(&before, &md);
        state_alloc(&after, &md);
        state_read(ctx, opt, &md, &before);
        for (int k = 0; k < 2 * md.n; k++) {
            int bad = k % md.n;
            model_set_grads(ctx, &md, seed + 11 + (uint64_t)k, 0.01f, bad, bad_values[k % 3]);
            ck_assert_qlora_ok(qlora_optimizer_step(opt, 1.0, &rep));
            ck_assert_int_eq(rep.skipped, 1);
            ck_assert_int_eq(rep.step, 1);
            ck_assert_int_eq(rep.skipped_total, k + 1);
            ck_assert(isnan(rep.grad_norm));
            ck_assert_double_eq(rep.lr, expected_lr(&hp.schedule, 1));
            state_read(ctx, opt, &md, &after);
            assert_states_equal(&after, &before, &md, 1, bs[b].name);
        }
        /* The next finite step is update 2: neither t nor the schedule moved. */
        model_set_grads(ctx, &md, seed + 50, 0.01f, -1, 0);
        ck_assert_qlora_ok(qlora_optimizer_step(opt, 1.0, &rep));
        ck_assert_int_eq(rep.skipped, 0);
        ck_assert_int_eq(rep.step, 2);
        ck_assert_double_eq(rep.lr, expected_lr(&hp.schedule, 1));
        reference_step(&ref, &md, &hp, 1.0);
        state_read(ctx, opt, &md, &after);
        assert_states_equal(&after, &ref.st, &md, 1, bs[b].name);
        state_free(&before);
        state_free(&after);
        state_free(&ref.st);
        qlora_optimizer_free(opt);
        model_free(ctx, &md);
        qlora_ctx_free(ctx);
    }
}
END_TEST

/* Runs `steps` steps on two optimizers over equal models and compares everything. */
static void run_paged_vs_unpaged(qlora_ctx *ctx, const char *backend, const pspec *specs, int n, int master,
                                 uint64_t limit_pages, uint64_t sim_capacity, int steps, qlora_paging_stats *paged,
                                 qlora_paging_stats *unpaged) {
    uint64_t seed = tu_seed();
    model a, c;
    model_init(ctx, &a, specs, n, seed);
    model_init(ctx, &c, specs, n, seed);
    qlora_adamw_params hp = test_params(master, 0);
    qlora_optimizer *oa = NULL, *oc = NULL;
    ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &oa));
    hp.gpu_mem_limit = limit_pages * PAGE;
    ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &oc));
    ql_pager_simulate_device_capacity(ql_optimizer_pager(oc), sim_capacity);
    model_register(oa, &a);
    model_register(oc, &c);
    for (int s = 0; s < steps; s++) {
        model_set_grads(ctx, &a, seed + 200 + (uint64_t)s, 0.02f, -1, 0);
        model_set_grads(ctx, &c, seed + 200 + (uint64_t)s, 0.02f, -1, 0);
        ck_assert_qlora_ok(qlora_optimizer_step(oa, 1.0, NULL));
        ck_assert_qlora_ok(qlora_optimizer_step(oc, 1.0, NULL));
    }
    state sa, sc;
    state_alloc(&sa, &a);
    state_alloc(&sc, &c);
    state_read(ctx, oa, &a, &sa);
    state_read(ctx, oc, &c, &sc);
    assert_states_equal(&sc, &sa, &a, master, backend);
    ck_assert_qlora_ok(qlora_optimizer_paging_stats(oc, paged));
    ck_assert_qlora_ok(qlora_optimizer_paging_stats(oa, unpaged));
    state_free(&sa);
    state_free(&sc);
    qlora_optimizer_free(oa);
    qlora_optimizer_free(oc);
    model_free(ctx, &a);
    model_free(ctx, &c);
}

START_TEST(paging_is_bit_identical_with_exact_counts) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        for (int master = 0; master <= 1; master++) {
            qlora_paging_stats ps, us;
            run_paged_vs_unpaged(ctx, bs[b].name, specs20, N_20, master, 3, 0, 6, &ps, &us);
            int64_t pages = master ? 38 : 20;
            uint64_t page_size = (uint64_t)ps.elements_per_page * 4 * (master ? 3 : 2);
            ck_assert_uint_eq(ps.elements_per_page, master ? 64 : 128);
            ck_assert_uint_eq(ps.pages_total, pages);
            ck_assert_uint_eq(ps.pool_pages, 3);
            ck_assert_uint_eq(ps.pool_limit, 3);
            ck_assert_uint_eq(ps.pages_on_device, 3);
            pager_sim sim;
            sim_init(&sim, pages, 3);
            for (int s = 0; s < 6; s++)
                sim_step(&sim);
            ck_assert_uint_gt(ps.page_outs, 0);
            ck_assert_uint_gt(ps.page_ins, 0);
            ck_assert_uint_eq(ps.page_outs, sim.outs);
            ck_assert_uint_eq(ps.page_ins, sim.ins);
            ck_assert_uint_eq(ps.bytes_out, ps.page_outs * page_size);
            ck_assert_uint_eq(ps.bytes_in, ps.page_ins * page_size);
            ck_assert(ps.seconds >= 0);
            sim_free(&sim);
            ck_assert_uint_eq(us.page_outs, 0);
            ck_assert_uint_eq(us.page_ins, 0);
            ck_assert_uint_eq(us.pool_pages, pages);
            ck_assert_uint_eq(us.pages_on_device, pages);
            ck_assert_uint_eq(us.pool_limit, 0);
        }
        /* Four pages, counted by hand (see pager.h for the rule). Two slots: step 1 evicts 0 and
         * 1; every later step brings all four in and sends four out. Three slots: the farthest
         * next use keeps pages 0 and 2 in and cycles 1 and 3 through the third slot. */
        const uint64_t want2[3][2] = {{2, 0}, {6, 4}, {10, 8}};
        const uint64_t want3[3][2] = {{1, 0}, {3, 2}, {5, 4}};
        for (int steps = 1; steps <= 3; steps++) {
            qlora_paging_stats ps, us;
            run_paged_vs_unpaged(ctx, bs[b].name, specs4, N_4, 0, 2, 0, steps, &ps, &us);
            ck_assert_uint_eq(ps.pages_total, 4);
            ck_assert_uint_eq(ps.page_outs, want2[steps - 1][0]);
            ck_assert_uint_eq(ps.page_ins, want2[steps - 1][1]);
            run_paged_vs_unpaged(ctx, bs[b].name, specs4, N_4, 0, 3, 0, steps, &ps, &us);
            ck_assert_uint_eq(ps.page_outs, want3[steps - 1][0]);
            ck_assert_uint_eq(ps.page_ins, want3[steps - 1][1]);
            pager_sim s2, s3;
            sim_init(&s2, 4, 2);
            sim_init(&s3, 4, 3);
            for (int s = 0; s < steps; s++) {
                sim_step(&s2);
                sim_step(&s3);
            }
            ck_assert_uint_eq(s2.outs, want2[steps - 1][0]);
            ck_assert_uint_eq(s2.ins, want2[steps - 1][1]);
            ck_assert_uint_eq(s3.outs, want3[steps - 1][0]);
            ck_assert_uint_eq(s3.ins, want3[steps - 1][1]);
            sim_free(&s2);
            sim_free(&s3);
        }
        /* One slot: no prefetch is possible, every page goes through the single slot. */
        qlora_paging_stats ps, us;
        run_paged_vs_unpaged(ctx, bs[b].name, odd_specs, N_ODD, 1, 1, 0, 4, &ps, &us);
        pager_sim sim;
        sim_init(&sim, (int64_t)ps.pages_total, 1);
        for (int s = 0; s < 4; s++)
            sim_step(&sim);
        ck_assert_uint_eq(ps.page_outs, sim.outs);
        ck_assert_uint_eq(ps.page_ins, sim.ins);
        ck_assert_uint_eq(ps.pages_on_device, 1);
        sim_free(&sim);
        qlora_ctx_free(ctx);
    }
}
END_TEST

static int warnings_seen;
static void count_warnings(qlora_log_level level, const char *msg, void *user) {
    (void)user;
    if (level == QLORA_LOG_WARN && strstr(msg, "device pool stays at 2 pages"))
        warnings_seen++;
}

START_TEST(device_out_of_memory_caps_the_pool) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    qlora_set_log_callback(count_warnings, NULL);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        warnings_seen = 0;
        qlora_paging_stats ps, us;
        /* No budget, but the (simulated) device fills up after two pages. */
        run_paged_vs_unpaged(ctx, bs[b].name, specs20, N_20, 0, 0, 2, 3, &ps, &us);
        ck_assert_int_eq(warnings_seen, 1);
        ck_assert_uint_eq(ps.pool_pages, 2);
        ck_assert_uint_eq(ps.pool_limit, 2);
        pager_sim sim;
        sim_init(&sim, 20, 2);
        for (int s = 0; s < 3; s++)
            sim_step(&sim);
        ck_assert_uint_eq(ps.page_outs, sim.outs);
        ck_assert_uint_eq(ps.page_ins, sim.ins);
        sim_free(&sim);
        qlora_ctx_free(ctx);
    }
    qlora_set_log_callback(NULL, NULL);
}
END_TEST

/* ---- save / load */

static const char *const meta_keys[] = {"format", "format_version", "step", "skipped_steps", "beta1", "beta2", "eps",
                                        "weight_decay", "max_grad_norm", "master_weights", "lr_schedule", "lr",
                                        "warmup_steps", "total_steps", "min_lr_ratio"};

/* Copies a saved state, leaving out tensor `drop`, adding an F32 [4] tensor `add`, and/or
 * turning tensor `as_f16` into F16 (any may be NULL). */
static void rewrite_state(const char *src, const char *dst, const char *drop, const char *add, const char *as_f16) {
    qlora_safetensors *f = NULL;
    ck_assert_qlora_ok(qlora_safetensors_open(src, &f));
    qlora_st_writer *w = NULL;
    ck_assert_qlora_ok(qlora_st_writer_open(dst, 0, &w));
    for (size_t k = 0; k < sizeof meta_keys / sizeof meta_keys[0]; k++)
        ck_assert_qlora_ok(qlora_st_writer_set_metadata(w, meta_keys[k], qlora_safetensors_metadata(f, meta_keys[k])));
    size_t n = qlora_safetensors_count(f);
    for (size_t k = 0; k < n; k++) {
        qlora_tensor t;
        ck_assert_qlora_ok(qlora_safetensors_get(f, k, &t));
        if (drop && strcmp(t.name, drop) == 0)
            continue;
        int half = as_f16 && strcmp(t.name, as_f16) == 0;
        ck_assert_qlora_ok(qlora_st_writer_declare(w, t.name, half ? QLORA_F16 : t.dtype, t.ndim, t.shape));
    }
    float extra[4] = {1, 2, 3, 4};
    int64_t four = 4;
    if (add)
        ck_assert_qlora_ok(qlora_st_writer_declare(w, add, QLORA_F32, 1, &four));
    for (size_t k = 0; k < n; k++) {
        qlora_tensor t;
        ck_assert_qlora_ok(qlora_safetensors_get(f, k, &t));
        if (drop && strcmp(t.name, drop) == 0)
            continue;
        size_t bytes = qlora_tensor_nbytes(&t);
        if (as_f16 && strcmp(t.name, as_f16) == 0)
            bytes /= 2;
        ck_assert_qlora_ok(qlora_st_writer_write(w, t.name, t.data, bytes));
    }
    if (add)
        ck_assert_qlora_ok(qlora_st_writer_write(w, add, extra, sizeof extra));
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    qlora_safetensors_close(f);
}

static void train(qlora_ctx *ctx, qlora_optimizer *opt, model *md, int from, int to, uint64_t seed,
                  qlora_step_report *last) {
    for (int s = from; s < to; s++) {
        model_set_grads(ctx, md, seed + 300 + (uint64_t)s, 0.02f, -1, 0);
        ck_assert_qlora_ok(qlora_optimizer_step(opt, 0.5, last));
    }
}

static void assert_load_fails(qlora_ctx *ctx, const pspec *specs, int n, int master, const char *path,
                              qlora_status status, const char *needle) {
    model md;
    model_init(ctx, &md, specs, n, 1);
    qlora_adamw_params hp = test_params(master, 0);
    qlora_optimizer *opt = NULL;
    ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &opt));
    model_register(opt, &md);
    ck_assert_qlora_fails(qlora_optimizer_load(opt, path), status, needle);
    qlora_optimizer_free(opt);
    model_free(ctx, &md);
}

static void save_and_restore(qlora_ctx *ctx, const char *backend, int master) {
    uint64_t seed = tu_seed();
    char *dir = tu_tempdir();
    char path[4096], bad[4096];
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    model a, c;
    model_init(ctx, &a, odd_specs, N_ODD, seed);
    qlora_adamw_params hp = test_params(master, 3);
    hp.beta1 = 0.85;
    hp.schedule.kind = QLORA_LR_LINEAR;
    hp.schedule.total_steps = 20;
    qlora_optimizer *oa = NULL, *oc = NULL;
    ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &oa));
    model_register(oa, &a);
    qlora_step_report ra, rc;
    train(ctx, oa, &a, 0, 3, seed, &ra);
    model_set_grads(ctx, &a, seed + 1, 0.02f, 0, NAN); /* a skipped step is part of the state too */
    ck_assert_qlora_ok(qlora_optimizer_step(oa, 1.0, &ra));
    ck_assert_int_eq(ra.skipped, 1);
    ck_assert_qlora_ok(qlora_optimizer_save(oa, path));
    state saved;
    state_alloc(&saved, &a);
    state_read(ctx, oa, &a, &saved);
    train(ctx, oa, &a, 3, 7, seed, &ra);

    /* A fresh optimizer with other hyperparameters, larger pages and no paging limit, the
     * parameters restored. */
    model_init(ctx, &c, odd_specs, N_ODD, seed + 999);
    for (int i = 0; i < c.n; i++)
        upload(ctx, &c.param[i], saved.p[i]);
    qlora_adamw_params other = qlora_adamw_default_params();
    other.page_bytes = 2 * PAGE;
    other.master_weights = master;
    ck_assert_qlora_ok(qlora_adamw_create(ctx, &other, &oc));
    model_register(oc, &c);
    ck_assert_qlora_ok(qlora_optimizer_load(oc, path));
    qlora_adamw_params got;
    ck_assert_qlora_ok(qlora_optimizer_get_params(oc, &got));
    ck_assert_double_eq(got.beta1, 0.85);
    ck_assert_double_eq(got.beta2, hp.beta2);
    ck_assert_double_eq(got.eps, hp.eps);
    ck_assert_double_eq(got.weight_decay, hp.weight_decay);
    ck_assert_double_eq(got.max_grad_norm, hp.max_grad_norm);
    ck_assert_int_eq(got.schedule.kind, QLORA_LR_LINEAR);
    ck_assert_double_eq(got.schedule.lr, hp.schedule.lr);
    ck_assert_int_eq(got.schedule.warmup_steps, hp.schedule.warmup_steps);
    ck_assert_int_eq(got.schedule.total_steps, 20);
    ck_assert_double_eq(got.schedule.min_lr_ratio, hp.schedule.min_lr_ratio);
    ck_assert_uint_eq(got.gpu_mem_limit, 0); /* paging settings stay the loader's */
    state loaded;
    state_alloc(&loaded, &c);
    state_read(ctx, oc, &c, &loaded);
    assert_states_equal(&loaded, &saved, &c, master, backend);
    train(ctx, oc, &c, 3, 7, seed, &rc);
    ck_assert_int_eq(rc.step, ra.step);
    ck_assert_int_eq(rc.skipped_total, 1);
    ck_assert_double_eq(rc.lr, ra.lr);
    state sa, sc;
    state_alloc(&sa, &a);
    state_alloc(&sc, &c);
    state_read(ctx, oa, &a, &sa);
    state_read(ctx, oc, &c, &sc);
    assert_states_equal(&sc, &sa, &a, master, backend);

    /* Load errors: each leaves the optimizer untouched (checked on oc). */
    const char *first = odd_specs[0].name;
    char name[256];
    pspec renamed[N_ODD], reshaped[N_ODD];
    memcpy(renamed, odd_specs, sizeof renamed);
    memcpy(reshaped, odd_specs, sizeof reshaped);
    renamed[1].name = "layers.0.k_proj.lora_B";
    reshaped[0].shape[0] = 37;
    reshaped[0].shape[1] = 8;
    assert_load_fails(ctx, renamed, N_ODD, master, path, QLORA_ERR_NOT_FOUND,
                      "no tensor 'layers.0.k_proj.lora_B.exp_avg'");
    assert_load_fails(ctx, reshaped, N_ODD, master, path, QLORA_ERR_SHAPE, "has shape [8, 37] but parameter");
    assert_load_fails(ctx, odd_specs, N_ODD - 1, master, path, QLORA_ERR_NOT_FOUND,
                      "'layers.1.v_proj.lora_A.exp_avg' belongs to no registered parameter");
    assert_load_fails(ctx, odd_specs, N_ODD, !master, path, QLORA_ERR_INVALID_ARG, "master_weights");
    snprintf(bad, sizeof bad, "%s/missing.safetensors", dir);
    snprintf(name, sizeof name, "%s.exp_avg_sq", odd_specs[N_ODD - 1].name);
    rewrite_state(path, bad, name, NULL, NULL);
    ck_assert_qlora_fails(qlora_optimizer_load(oc, bad), QLORA_ERR_NOT_FOUND, name);
    snprintf(bad, sizeof bad, "%s/extra.safetensors", dir);
    rewrite_state(path, bad, NULL, "ghost.exp_avg", NULL);
    ck_assert_qlora_fails(qlora_optimizer_load(oc, bad), QLORA_ERR_NOT_FOUND, "'ghost.exp_avg' belongs to no");
    snprintf(bad, sizeof bad, "%s/f16.safetensors", dir);
    snprintf(name, sizeof name, "%s.exp_avg", odd_specs[N_ODD - 1].name);
    rewrite_state(path, bad, NULL, NULL, name);
    ck_assert_qlora_fails(qlora_optimizer_load(oc, bad), QLORA_ERR_DTYPE, "F32 expected");
    /* Truncated: the first half of the file. */
    FILE *fp = fopen(path, "rb");
    ck_assert_ptr_nonnull(fp);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *bytes = malloc((size_t)size);
    ck_assert_ptr_nonnull(bytes);
    ck_assert_uint_eq(fread(bytes, 1, (size_t)size, fp), (size_t)size);
    fclose(fp);
    snprintf(bad, sizeof bad, "%s/truncated.safetensors", dir);
    tu_write_file(bad, bytes, (size_t)size / 2);
    free(bytes);
    ck_assert_qlora_fails(qlora_optimizer_load(oc, bad), QLORA_ERR_FORMAT, "truncated");
    /* A safetensors file that is no optimizer state. */
    snprintf(bad, sizeof bad, "%s/plain.safetensors", dir);
    qlora_st_writer *w = NULL;
    int64_t four = 4;
    float x[4] = {0};
    ck_assert_qlora_ok(qlora_st_writer_open(bad, 0, &w));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, first, QLORA_F32, 1, &four));
    ck_assert_qlora_ok(qlora_st_writer_write(w, first, x, sizeof x));
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    ck_assert_qlora_fails(qlora_optimizer_load(oc, bad), QLORA_ERR_FORMAT, "not a libqlora optimizer state");
    snprintf(bad, sizeof bad, "%s/nonexistent.safetensors", dir);
    ck_assert_qlora_fails(qlora_optimizer_load(oc, bad), QLORA_ERR_NOT_FOUND, "nonexistent.safetensors");
    state_read(ctx, oc, &c, &loaded);
    assert_states_equal(&loaded, &sc, &c, master, backend);
    ck_assert_qlora_ok(qlora_optimizer_step(oc, 1.0, &rc));
    ck_assert_int_eq(rc.step, ra.step + 1);

    state_free(&saved);
    state_free(&loaded);
    state_free(&sa);
    state_free(&sc);
    qlora_optimizer_free(oa);
    qlora_optimizer_free(oc);
    model_free(ctx, &a);
    model_free(ctx, &c);
    tu_rmtree(dir);
    free(dir);
}

START_TEST(save_and_restore_are_exact) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        save_and_restore(ctx, bs[b].name, 0);
        save_and_restore(ctx, bs[b].name, 1);
        qlora_ctx_free(ctx);
    }
}
END_TEST

START_TEST(accountant_sees_pages_and_nothing_after_free) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    uint64_t seed = tu_seed();
    const qlora_mem_category cats[4] = {QLORA_MEM_OPTIMIZER_DEVICE, QLORA_MEM_OPTIMIZER_HOST,
                                        QLORA_MEM_MASTER_WEIGHTS, QLORA_MEM_WORKSPACE};
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        int dev = is_cuda(ctx) ? 1 : 0;
        for (int master = 0; master <= 1; master++) {
            for (uint64_t limit = 0; limit <= 3; limit += 3) {
                model md;
                model_init(ctx, &md, specs20, N_20, seed);
                qlora_mem_reset_peak(ctx);
                qlora_adamw_params hp = test_params(master, limit);
                qlora_optimizer *opt = NULL;
                ck_assert_qlora_ok(qlora_adamw_create(ctx, &hp, &opt));
                model_register(opt, &md);
                for (int s = 0; s < 3; s++) {
                    model_set_grads(ctx, &md, seed + (uint64_t)s, 0.02f, -1, 0);
                    ck_assert_qlora_ok(qlora_optimizer_step(opt, 1.0, NULL));
                }
                qlora_paging_stats ps;
                qlora_mem_stats ms;
                ck_assert_qlora_ok(qlora_optimizer_paging_stats(opt, &ps));
                ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &ms));
                uint64_t e = ps.elements_per_page;
                uint64_t pool = limit ? 3 : ps.pages_total;
                ck_assert_uint_eq(ps.pool_pages, pool);
                ck_assert_uint_eq(ms.current[dev][QLORA_MEM_OPTIMIZER_DEVICE], pool * 8 * e);
                ck_assert_uint_eq(ms.current[dev][QLORA_MEM_MASTER_WEIGHTS], master ? pool * 4 * e : 0);
                uint64_t host = 0;
                if (limit) {
                    pager_sim sim;
                    sim_init(&sim, (int64_t)ps.pages_total, 3);
                    for (int s = 0; s < 3; s++)
                        sim_step(&sim);
                    host = (uint64_t)sim_evicted_count(&sim) * e * 4 * (master ? 3 : 2);
                    sim_free(&sim);
                    uint64_t on_device = ms.peak[dev][QLORA_MEM_OPTIMIZER_DEVICE] +
                                         ms.peak[dev][QLORA_MEM_MASTER_WEIGHTS];
                    ck_assert_uint_le(on_device, hp.gpu_mem_limit);
                }
                ck_assert_uint_eq(ms.current[0][QLORA_MEM_OPTIMIZER_HOST], host);
                qlora_optimizer_free(opt);
                ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &ms));
                for (int loc = 0; loc < 2; loc++)
                    for (int k = 0; k < 4; k++)
                        ck_assert_uint_eq(ms.current[loc][cats[k]], 0);
                model_free(ctx, &md);
                ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &ms));
                ck_assert_uint_eq(ms.live_allocations, 0);
            }
        }
        qlora_ctx_free(ctx);
    }
}
END_TEST

START_TEST(zero_grad_clears_every_gradient) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        model md;
        model_init(ctx, &md, odd_specs, N_ODD, tu_seed());
        qlora_optimizer *opt = NULL;
        ck_assert_qlora_ok(qlora_adamw_create(ctx, NULL, &opt));
        model_register(opt, &md);
        model_set_grads(ctx, &md, tu_seed(), 1.0f, -1, 0);
        ck_assert_qlora_ok(qlora_optimizer_zero_grad(opt));
        for (int i = 0; i < md.n; i++) {
            size_t bytes = (size_t)md.numel[i] * gsize(md.spec[i].grad_dtype);
            unsigned char *got = malloc(bytes), *zero = calloc(bytes, 1);
            ck_assert(got && zero);
            download(ctx, &md.grad[i], got);
            assert_same(got, zero, bytes, md.spec[i].name, bs[b].name);
            free(got);
            free(zero);
        }
        qlora_optimizer_free(opt);
        model_free(ctx, &md);
        qlora_ctx_free(ctx);
    }
}
END_TEST

START_TEST(bad_input_gives_clear_errors) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        qlora_optimizer *opt = NULL;
        qlora_adamw_params hp = qlora_adamw_default_params();
        ck_assert_qlora_fails(qlora_adamw_create(NULL, &hp, &opt), QLORA_ERR_INVALID_ARG, "ctx");
        ck_assert_qlora_fails(qlora_adamw_create(ctx, &hp, NULL), QLORA_ERR_INVALID_ARG, "out");
        hp.beta1 = 1.0;
        ck_assert_qlora_fails(qlora_adamw_create(ctx, &hp, &opt), QLORA_ERR_INVALID_ARG, "beta1");
        hp = qlora_adamw_default_params();
        hp.eps = 0;
        ck_assert_qlora_fails(qlora_adamw_create(ctx, &hp, &opt), QLORA_ERR_INVALID_ARG, "eps");
        hp = qlora_adamw_default_params();
        hp.max_grad_norm = -1;
        ck_assert_qlora_fails(qlora_adamw_create(ctx, &hp, &opt), QLORA_ERR_INVALID_ARG, "max_grad_norm");
        hp = qlora_adamw_default_params();
        hp.master_weights = 1;
        hp.page_bytes = 512;
        ck_assert_qlora_fails(qlora_adamw_create(ctx, &hp, &opt), QLORA_ERR_INVALID_ARG, "page_bytes");
        hp = qlora_adamw_default_params();
        hp.gpu_mem_limit = hp.page_bytes - 1;
        ck_assert_qlora_fails(qlora_adamw_create(ctx, &hp, &opt), QLORA_ERR_INVALID_ARG, "gpu_mem_limit");
        hp = qlora_adamw_default_params();
        hp.schedule.kind = QLORA_LR_COSINE;
        ck_assert_qlora_fails(qlora_adamw_create(ctx, &hp, &opt), QLORA_ERR_INVALID_ARG, "total_steps");
        ck_assert_ptr_null(opt);

        model md;
        model_init(ctx, &md, odd_specs, 2, tu_seed());
        ck_assert_qlora_ok(qlora_adamw_create(ctx, NULL, &opt));
        ck_assert_qlora_fails(qlora_optimizer_step(opt, 1.0, NULL), QLORA_ERR_INVALID_ARG, "no parameters");
        ck_assert_qlora_fails(qlora_optimizer_add_param(NULL, &md.param[0], &md.grad[0]), QLORA_ERR_INVALID_ARG,
                              "opt");
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, NULL, &md.grad[0]), QLORA_ERR_INVALID_ARG, "param");
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &md.param[0], NULL), QLORA_ERR_INVALID_ARG, "grad");
        qlora_tensor t = md.param[0];
        t.dtype = QLORA_F32;
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &t, &md.grad[0]), QLORA_ERR_DTYPE,
                              "parameter 'layers.0.q_proj.lora_A' is F32");
        t = md.grad[0];
        t.dtype = QLORA_F16;
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &md.param[0], &t), QLORA_ERR_DTYPE, "is F16");
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &md.param[0], &md.grad[1]), QLORA_ERR_SHAPE,
                              "has 488 elements, the parameter 296");
        t = md.param[0];
        t.device = is_cuda(ctx) ? QLORA_DEVICE_HOST : 0;
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &t, &md.grad[0]), QLORA_ERR_DEVICE,
                              is_cuda(ctx) ? "is on host but the optimizer's context is on cuda:0"
                                           : "is on cuda:0 but the optimizer's context is on host");
        t = md.grad[0];
        t.device = 3;
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &md.param[0], &t), QLORA_ERR_DEVICE, "gradient of");
        t = md.param[0];
        t.name[0] = '\0';
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &t, &md.grad[0]), QLORA_ERR_INVALID_ARG, "no name");
        t = md.param[0];
        t.data = NULL;
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &t, &md.grad[0]), QLORA_ERR_INVALID_ARG, "no data");
        ck_assert_qlora_ok(qlora_optimizer_add_param(opt, &md.param[0], &md.grad[0]));
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &md.param[0], &md.grad[0]), QLORA_ERR_INVALID_ARG,
                              "already registered");
        ck_assert_qlora_fails(qlora_optimizer_step(opt, 0.0, NULL), QLORA_ERR_INVALID_ARG, "grad_scale");
        ck_assert_qlora_fails(qlora_optimizer_step(opt, NAN, NULL), QLORA_ERR_INVALID_ARG, "grad_scale");
        model_set_grads(ctx, &md, tu_seed(), 0.01f, -1, 0);
        ck_assert_qlora_ok(qlora_optimizer_step(opt, 1.0, NULL));
        ck_assert_qlora_fails(qlora_optimizer_add_param(opt, &md.param[1], &md.grad[1]), QLORA_ERR_INVALID_ARG,
                              "before the first step");
        ck_assert_qlora_fails(qlora_optimizer_save(opt, NULL), QLORA_ERR_INVALID_ARG, "path");
        ck_assert_qlora_fails(qlora_optimizer_save(opt, "/nonexistent-dir/x.safetensors"), QLORA_ERR_IO,
                              "qlora_optimizer_save '/nonexistent-dir/x.safetensors'");
        ck_assert_qlora_fails(qlora_optimizer_paging_stats(opt, NULL), QLORA_ERR_INVALID_ARG, "out");
        qlora_optimizer_free(opt);
        qlora_optimizer_free(NULL);
        model_free(ctx, &md);
        qlora_ctx_free(ctx);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("optimizer");
    TCase *tc = tcase_create("optimizer");
    tcase_add_test(tc, schedules_at_known_steps);
    tcase_add_test(tc, step_matches_reference);
    tcase_add_test(tc, step_matches_reference_with_master_weights);
    tcase_add_test(tc, clipping_reports_true_norm_and_scales_gradients);
    tcase_add_test(tc, nonfinite_gradient_skips_the_step);
    tcase_add_test(tc, paging_is_bit_identical_with_exact_counts);
    tcase_add_test(tc, device_out_of_memory_caps_the_pool);
    tcase_add_test(tc, save_and_restore_are_exact);
    tcase_add_test(tc, accountant_sees_pages_and_nothing_after_free);
    tcase_add_test(tc, zero_grad_clears_every_gradient);
    tcase_add_test(tc, bad_input_gives_clear_errors);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
