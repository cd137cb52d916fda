/*
 * AdamW math (lib/adamw.h): the per-step scalars against hand-computed values; the scalar
 * reference against an independent FP64 textbook AdamW over 200 steps, within a first-order
 * rounding-error bound tracked alongside; decoupled decay after the step; the fast host path
 * and the CUDA kernels against the reference bit for bit; and the gradient sum of squares
 * against a compensated long double sum, with non-finite detection.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adamw.h"
#include "half.h"
#include "internal.h"
#include "testutil.h"
#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#endif

/* float32 unit roundoff */
#define U 0x1p-24

/* ck_assert_msg records a mark point (a write to the runner) on every pass; the per-element
 * checks only call into Check when they fail. */
#define EXPECT(cond, ...)                 \
    do {                                  \
        if (!(cond))                      \
            ck_abort_msg(__VA_ARGS__);    \
    } while (0)

/* ------------------------------------------------------------------ helpers */

static size_t grad_size(qlora_dtype d) { return d == QLORA_F32 ? 4 : 2; }

static double grad_at(const void *grad, qlora_dtype d, int64_t i) {
    return d == QLORA_F32 ? ((const float *)grad)[i] : ql_bf16_to_f32(((const uint16_t *)grad)[i]);
}

/* A gradient with some structure: a per-element mean (so m does not just average to zero),
 * noise, and the awkward values mixed in: exact zeros, tiny and large elements. */
static void fill_grad(tu_rng *rng, void *grad, qlora_dtype d, int64_t n, const float *mean) {
    for (int64_t i = 0; i < n; i++) {
        float g = (mean ? mean[i] : 0.0f) + (float)tu_normal(rng);
        uint64_t r = tu_next(rng) % 64;
        if (r == 0)
            g = 0.0f;
        else if (r == 1)
            g *= 1e-6f;
        else if (r == 2)
            g *= 50.0f;
        if (d == QLORA_F32)
            ((float *)grad)[i] = g;
        else
            ((uint16_t *)grad)[i] = ql_f32_to_bf16(g);
    }
}

/* Optimizer state on the host: BF16 params, optional F32 master, F32 moments. */
typedef struct state {
    int64_t n;
    uint16_t *param;
    float *master; /* NULL in BF16-only mode */
    float *m, *v;
} state;

static state state_new(tu_rng *rng, int64_t n, int with_master) {
    state s;
    s.n = n;
    s.param = tu_xmalloc((size_t)n * 2);
    s.master = with_master ? tu_xmalloc((size_t)n * 4) : NULL;
    s.m = tu_xmalloc((size_t)n * 4);
    s.v = tu_xmalloc((size_t)n * 4);
    float *p = tu_xmalloc((size_t)n * 4);
    tu_fill_normal(rng, p, n, 0.5f);
    for (int64_t i = 0; i < n; i++) {
        s.param[i] = ql_f32_to_bf16(p[i]);
        if (s.master)
            s.master[i] = p[i];
        s.m[i] = 0.0f;
        s.v[i] = 0.0f;
    }
    free(p);
    return s;
}

static state state_copy(const state *a) {
    state s = *a;
    s.param = tu_xmalloc((size_t)a->n * 2);
    memcpy(s.param, a->param, (size_t)a->n * 2);
    if (a->master) {
        s.master = tu_xmalloc((size_t)a->n * 4);
        memcpy(s.master, a->master, (size_t)a->n * 4);
    }
    s.m = tu_xmalloc((size_t)a->n * 4);
    s.v = tu_xmalloc((size_t)a->n * 4);
    memcpy(s.m, a->m, (size_t)a->n * 4);
    memcpy(s.v, a->v, (size_t)a->n * 4);
    return s;
}

static void state_free(state *s) {
    free(s->param);
    free(s->master);
    free(s->m);
    free(s->v);
}

static void assert_states_equal(const state *got, const state *want, const char *what) {
    for (int64_t i = 0; i < want->n; i++) {
        EXPECT(got->param[i] == want->param[i], "%s: param[%lld] %04x != %04x", what, (long long)i,
                      got->param[i], want->param[i]);
        EXPECT(ql_f32_bits(got->m[i]) == ql_f32_bits(want->m[i]), "%s: m[%lld] %a != %a", what, (long long)i,
                      (double)got->m[i], (double)want->m[i]);
        EXPECT(ql_f32_bits(got->v[i]) == ql_f32_bits(want->v[i]), "%s: v[%lld] %a != %a", what, (long long)i,
                      (double)got->v[i], (double)want->v[i]);
        if (want->master)
            EXPECT(ql_f32_bits(got->master[i]) == ql_f32_bits(want->master[i]), "%s: master[%lld] %a != %a",
                          what, (long long)i, (double)got->master[i], (double)want->master[i]);
    }
}

/* ------------------------------------------- FP64 textbook AdamW + error bound */

typedef struct hyper {
    double lr, beta1, beta2, eps, weight_decay, grad_scale;
} hyper;

/* One element of AdamW in double, as the paper and PyTorch write it (bias-corrected moments),
 * with the decoupled decay after the step. */
typedef struct fp64_elem {
    double p, m, v;
} fp64_elem;

static void fp64_step(const hyper *h, int64_t t, double grad, fp64_elem *e) {
    double g = grad * h->grad_scale;
    e->m = h->beta1 * e->m + (1.0 - h->beta1) * g;
    e->v = h->beta2 * e->v + (1.0 - h->beta2) * g * g;
    double m_hat = e->m / (1.0 - pow(h->beta1, (double)t));
    double v_hat = e->v / (1.0 - pow(h->beta2, (double)t));
    e->p -= h->lr * m_hat / (sqrt(v_hat) + h->eps);
    e->p *= 1.0 - h->lr * h->weight_decay;
}

/* First-order bounds on |float32 state - exact state|, carried from step to step: each float32
 * operation of the documented order contributes u * |its result| (u = 2^-24), the float32
 * scalars (grad_scale, step_size, eps * c2, decay) one more u each, and the incoming errors of m
 * and v propagate through the update. The betas are float32 values, so 1 - beta is exact. The
 * test allows twice the bound, for the second-order terms. */
typedef struct err_bound {
    double p, m, v;
} err_bound;

static void bound_step(const hyper *h, int64_t t, double grad, const fp64_elem *before, const fp64_elem *after,
                       err_bound *b) {
    double b1 = h->beta1, b2 = h->beta2;
    double g = fabs(grad * h->grad_scale); /* carries 2u: the float32 grad_scale and the product */
    b->m = b1 * b->m + U * (b1 * fabs(before->m) + 3.0 * (1.0 - b1) * g + fabs(after->m));
    b->v = b2 * b->v + U * (b2 * before->v + 6.0 * (1.0 - b2) * g * g + after->v);
    double c1 = 1.0 - pow(b1, (double)t), c2 = sqrt(1.0 - pow(b2, (double)t));
    double step = h->lr * c2 / c1;
    double denom = sqrt(after->v) + h->eps * c2;
    double ratio = after->m / denom;
    double denom_rel = after->v > 0.0 ? 0.5 * b->v / after->v + 2.0 * U : 2.0 * U;
    double ratio_err = b->m / denom + fabs(ratio) * (denom_rel + U);
    double update_err = step * ratio_err + 2.0 * U * step * fabs(ratio);
    double p_mid = fabs(before->p) + step * fabs(ratio);
    double decay = 1.0 - h->lr * h->weight_decay;
    b->p = decay * (b->p + update_err + U * p_mid) + 2.0 * U * fabs(after->p);
}

/* Runs `steps` of ql_adamw_update_ref from a fresh state and compares with FP64 textbook AdamW.
 * Master mode: p, m, v follow their own FP64 trajectories within the tracked bound, and the
 * BF16 parameter is exactly the rounded master. BF16-only mode: p is re-rounded to 8 bits every
 * step, so it cannot follow an FP64 trajectory; each step is checked instead against the FP64
 * step taken from the current (widened) state: within half a BF16 ulp plus the float32 bound.
 * m and v do not depend on p and are checked along the whole trajectory in both modes. */
static void check_against_fp64(const hyper *h, qlora_dtype grad_dtype, int with_master, int64_t n, int steps) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ (uint64_t)(grad_dtype * 2 + with_master));
    state s = state_new(&rng, n, with_master);
    fp64_elem *ref = tu_xmalloc((size_t)n * sizeof *ref);
    err_bound *bound = calloc((size_t)n, sizeof *bound);
    float *mean = tu_xmalloc((size_t)n * 4);
    void *grad = tu_xmalloc((size_t)n * grad_size(grad_dtype));
    ck_assert_ptr_nonnull(bound);
    tu_fill_normal(&rng, mean, n, 1.0f);
    for (int64_t i = 0; i < n; i++) {
        ref[i].p = with_master ? s.master[i] : ql_bf16_to_f32(s.param[i]);
        ref[i].m = ref[i].v = 0.0;
    }
    double worst[3] = {0.0, 0.0, 0.0}; /* largest error / allowed, for p, m, v */
    for (int64_t t = 1; t <= steps; t++) {
        fill_grad(&rng, grad, grad_dtype, n, mean);
        uint16_t *p_before = tu_xmalloc((size_t)n * 2);
        memcpy(p_before, s.param, (size_t)n * 2);
        fp64_elem *from_float = tu_xmalloc((size_t)n * sizeof *from_float);
        for (int64_t i = 0; i < n; i++)
            from_float[i] = (fp64_elem){ql_bf16_to_f32(s.param[i]), s.m[i], s.v[i]};

        ql_adamw_step sc = ql_adamw_scalars(h->lr, h->beta1, h->beta2, h->eps, h->weight_decay, t, h->grad_scale);
        ql_adamw_update_ref(&sc, s.param, s.master, grad, grad_dtype, s.m, s.v, n);

        for (int64_t i = 0; i < n; i++) {
            double gi = grad_at(grad, grad_dtype, i);
            fp64_elem before = ref[i];
            fp64_step(h, t, gi, &ref[i]);
            bound_step(h, t, gi, &before, &ref[i], &bound[i]);
            double em = fabs(s.m[i] - ref[i].m), ev = fabs(s.v[i] - ref[i].v);
            EXPECT(em <= 2.0 * bound[i].m, "t=%lld m[%lld] = %.9g, fp64 %.17g, allowed %.3g", (long long)t,
                          (long long)i, (double)s.m[i], ref[i].m, 2.0 * bound[i].m);
            EXPECT(ev <= 2.0 * bound[i].v, "t=%lld v[%lld] = %.9g, fp64 %.17g, allowed %.3g", (long long)t,
                          (long long)i, (double)s.v[i], ref[i].v, 2.0 * bound[i].v);
            if (bound[i].m > 0.0)
                worst[1] = fmax(worst[1], em / (2.0 * bound[i].m));
            if (bound[i].v > 0.0)
                worst[2] = fmax(worst[2], ev / (2.0 * bound[i].v));
            if (with_master) {
                double ep = fabs(s.master[i] - ref[i].p);
                EXPECT(ep <= 2.0 * bound[i].p, "t=%lld master[%lld] = %.9g, fp64 %.17g, allowed %.3g",
                              (long long)t, (long long)i, (double)s.master[i], ref[i].p, 2.0 * bound[i].p);
                EXPECT(s.param[i] == ql_f32_to_bf16(s.master[i]), "t=%lld param[%lld] is not the rounded master",
                       (long long)t, (long long)i);
                if (bound[i].p > 0.0)
                    worst[0] = fmax(worst[0], ep / (2.0 * bound[i].p));
            } else {
                /* one FP64 step from the float state this step started from */
                fp64_elem one = from_float[i];
                err_bound b0 = {0.0, 0.0, 0.0};
                fp64_elem start = one;
                fp64_step(h, t, gi, &one);
                bound_step(h, t, gi, &start, &one, &b0);
                double got = ql_bf16_to_f32(s.param[i]);
                double allowed = 0x1p-8 * fabs(one.p) + 2.0 * b0.p; /* half a bf16 ulp, relative */
                EXPECT(fabs(got - one.p) <= allowed, "t=%lld param[%lld]: %04x -> %04x = %.9g, fp64 %.17g",
                              (long long)t, (long long)i, p_before[i], s.param[i], got, one.p);
                worst[0] = fmax(worst[0], fabs(got - one.p) / allowed);
            }
        }
        free(p_before);
        free(from_float);
    }
    fprintf(stderr, "adamw vs fp64 (%s grad, %s, lr %g, eps %g, wd %g): worst error / allowed p %.3f m %.3f v %.3f\n",
            qlora_dtype_name(grad_dtype), with_master ? "fp32 master" : "bf16 only", h->lr, h->eps, h->weight_decay,
            worst[0], worst[1], worst[2]);
    state_free(&s);
    free(ref);
    free(bound);
    free(mean);
    free(grad);
}

/* ------------------------------------------------------------------ scalars */

START_TEST(scalars_match_hand_computed_values) {
    /* The betas are taken at float32: b1 = 0.89999997615814209, b2 = 0.99900001287460327.
     * t = 1: c1 = 1 - b1 = 0.10000002384185791, c2 = sqrt(1 - b2) = 0.031622573035677039.
     * t = 1000: c1 = 1 - b1^1000 = 1 (b1^1000 ~ 1e-46), c2 = sqrt(1 - b2^1000) = 0.79517283437447831.
     * step_size = lr c2 / c1, eps_c2 = eps c2; decay = 1 - 1e-3 * 0.01 = 0.99999. */
    const struct {
        int64_t t;
        double step_size, eps_c2;
    } want[2] = {{1, 3.162256549626990608e-4, 3.162257303567703925e-10},
                 {1000, 7.9517283437447832476e-4, 7.9517283437447832484e-9}};
    for (int k = 0; k < 2; k++) {
        ql_adamw_step s = ql_adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, want[k].t, 0.5);
        /* each is the double value rounded once to float32: within half an ulp */
        ck_assert_msg(fabs(s.step_size - want[k].step_size) <= U * want[k].step_size, "t=%lld step_size %.9g",
                      (long long)want[k].t, (double)s.step_size);
        ck_assert_msg(fabs(s.eps_c2 - want[k].eps_c2) <= U * want[k].eps_c2, "t=%lld eps_c2 %.9g",
                      (long long)want[k].t, (double)s.eps_c2);
        ck_assert_uint_eq(ql_f32_bits(s.beta1), ql_f32_bits(0.9f));
        ck_assert_uint_eq(ql_f32_bits(s.beta2), ql_f32_bits(0.999f));
        ck_assert_uint_eq(ql_f32_bits(s.one_minus_beta1), ql_f32_bits(1.0f - 0.9f)); /* exact complement */
        ck_assert_uint_eq(ql_f32_bits(s.one_minus_beta2), ql_f32_bits(1.0f - 0.999f));
        ck_assert_double_eq(s.one_minus_beta1, 0.10000002384185791015625);
        ck_assert_double_eq(s.one_minus_beta2, 0.000999987125396728515625);
        ck_assert_uint_eq(ql_f32_bits(s.grad_scale), ql_f32_bits(0.5f));
        ck_assert_uint_eq(ql_f32_bits(s.decay), ql_f32_bits((float)0.99999));
    }
    /* beta = 0 means no bias correction at all */
    ql_adamw_step s = ql_adamw_scalars(0.25, 0.0, 0.0, 0.5, 0.0, 7, 1.0);
    ck_assert_float_eq(s.step_size, 0.25f);
    ck_assert_float_eq(s.eps_c2, 0.5f);
    ck_assert_float_eq(s.decay, 1.0f);
    ck_assert_float_eq(s.one_minus_beta1, 1.0f);
}
END_TEST

/* ---------------------------------------------------- reference vs FP64 AdamW */

/* Float32 betas, so both sides decay the moments by the same numbers. */
static const hyper qlora_like = {1e-3, (double)0.9f, (double)0.999f, 1e-8, 0.01, 0.5};
/* Large lr * weight_decay and an eps comparable to sqrt(v): every term of the update matters
 * at the tolerance (decay applied before the step would be off by lr^2 wd per step). */
static const hyper strong_terms = {2e-2, (double)0.8f, (double)0.99f, 3e-2, 0.5, 0.3};

START_TEST(reference_follows_fp64_adamw_with_master) {
    check_against_fp64(&qlora_like, QLORA_F32, 1, 2053, 200);
    check_against_fp64(&strong_terms, QLORA_BF16, 1, 2053, 200);
}
END_TEST

START_TEST(reference_follows_fp64_adamw_bf16_only) {
    check_against_fp64(&qlora_like, QLORA_BF16, 0, 2053, 200);
    check_against_fp64(&strong_terms, QLORA_F32, 0, 2053, 200);
}
END_TEST

/* bitsandbytes decays after the Adam step: p' = (p - u) (1 - lr wd), where PyTorch's AdamW
 * computes p (1 - lr wd) - u. With lr = 0.1, wd = 1, p = 1 and a first step (|u| = lr / (1 + eps)
 * whatever |g|): g > 0 gives 0.9 * 0.9 = 0.81 (PyTorch: 0.8), g < 0 gives 1.1 * 0.9 = 0.99
 * (PyTorch: 1.0). */
START_TEST(weight_decay_is_applied_after_the_step) {
    const float grads[4] = {1.0f, 4.0f, -3.0f, -0.25f};
    const double bnb_order[4] = {0.81, 0.81, 0.99, 0.99};
    const double torch_order[4] = {0.8, 0.8, 1.0, 1.0};
    ql_adamw_step s = ql_adamw_scalars(0.1, 0.9, 0.999, 1e-8, 1.0, 1, 1.0);
    for (int mode = 0; mode < 3; mode++) {
        uint16_t param[4];
        float master[4], m[4] = {0}, v[4] = {0};
        for (int i = 0; i < 4; i++) {
            master[i] = 1.0f;
            param[i] = ql_f32_to_bf16(1.0f);
        }
        if (mode == 0)
            ql_adamw_update_ref(&s, param, master, grads, QLORA_F32, m, v, 4);
        else if (mode == 1)
            ql_adamw_update_fast(&s, param, master, grads, QLORA_F32, m, v, 4, 1);
        else
            ql_adamw_update_ref(&s, param, NULL, grads, QLORA_F32, m, v, 4);
        for (int i = 0; i < 4; i++) {
            double p = mode == 2 ? ql_bf16_to_f32(param[i]) : master[i];
            double tol = mode == 2 ? 0x1p-8 : 1e-6; /* bf16 only: half an ulp of 8 bits */
            ck_assert_msg(fabs(p - bnb_order[i]) <= tol, "mode %d g=%g: p = %.9g, want %.9g", mode,
                          (double)grads[i], p, bnb_order[i]);
            ck_assert_msg(fabs(p - torch_order[i]) > 4e-3, "mode %d: decay was applied before the step", mode);
        }
    }
}
END_TEST

/* grad_scale multiplies the gradient before anything else: scaling the gradient by 2 and
 * grad_scale by 1/2 (both exact) gives the same bits; and with weight_decay 0 nothing decays. */
START_TEST(grad_scale_and_zero_decay) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t n = 999;
    state a = state_new(&rng, n, 1);
    state b = state_copy(&a);
    float *g = tu_xmalloc((size_t)n * 4), *g2 = tu_xmalloc((size_t)n * 4);
    fill_grad(&rng, g, QLORA_F32, n, NULL);
    for (int64_t i = 0; i < n; i++)
        g2[i] = 2.0f * g[i];
    ql_adamw_step s1 = ql_adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 3, 1.0);
    ql_adamw_step s2 = ql_adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 3, 0.5);
    ck_assert_float_eq(s1.decay, 1.0f);
    ql_adamw_update_ref(&s1, a.param, a.master, g, QLORA_F32, a.m, a.v, n);
    ql_adamw_update_ref(&s2, b.param, b.master, g2, QLORA_F32, b.m, b.v, n);
    assert_states_equal(&b, &a, "grad x2, scale /2");
    /* zero gradient, zero moments, no decay: the master weight does not move */
    state c = state_new(&rng, n, 1);
    state d = state_copy(&c);
    memset(g, 0, (size_t)n * 4);
    ql_adamw_update_ref(&s1, c.param, c.master, g, QLORA_F32, c.m, c.v, n);
    assert_states_equal(&c, &d, "zero gradient");
    state_free(&a);
    state_free(&b);
    state_free(&c);
    state_free(&d);
    free(g);
    free(g2);
}
END_TEST

/* ------------------------------------------------------------ fast == reference */

/* State with a spread of magnitudes, moments already warm, and parameters one step from
 * BF16 rounding ties, so rounding and tiny/huge values are all exercised. */
static state warm_state(tu_rng *rng, int64_t n, int with_master) {
    state s = state_new(rng, n, with_master);
    for (int64_t i = 0; i < n; i++) {
        s.m[i] = (float)(tu_normal(rng) * 0.1);
        s.v[i] = (float)(tu_uniform(rng) * 0.02);
        if (i % 17 == 0)
            s.v[i] = 0.0f;
        if (i % 23 == 0)
            s.v[i] = 1e-30f;
        if (s.master && i % 5 == 0) /* exactly halfway between two bf16 values */
            s.master[i] = ql_bits_f32((ql_f32_bits(s.master[i]) & 0xffff0000u) | 0x8000u);
    }
    return s;
}

START_TEST(fast_equals_reference_bit_for_bit) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t sizes[] = {0, 1, 7, 1000, 8191, 8193, 32768, 100003};
    const qlora_dtype dtypes[2] = {QLORA_F32, QLORA_BF16};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int64_t n = sizes[k];
        for (int d = 0; d < 2; d++) {
            for (int with_master = 0; with_master < 2; with_master++) {
                /* offset 1: buffers not aligned to the vector width (peeled loops, tails) */
                for (int offset = 0; offset < 2; offset++) {
                    state base = warm_state(&rng, n + offset, with_master);
                    state want = state_copy(&base);
                    void *grad = tu_xmalloc((size_t)(n + offset) * 4);
                    fill_grad(&rng, grad, dtypes[d], n + offset, NULL);
                    const char *g = (const char *)grad + (size_t)offset * grad_size(dtypes[d]);
                    for (int t = 1; t <= 3; t++) {
                        ql_adamw_step s = ql_adamw_scalars(3e-3, 0.9, 0.995, 1e-8, 0.1, t, 0.7);
                        ql_adamw_update_ref(&s, want.param + offset, want.master ? want.master + offset : NULL, g,
                                            dtypes[d], want.m + offset, want.v + offset, n);
                    }
                    for (int threads = 1; threads <= 3; threads++) {
                        state got = state_copy(&base);
                        for (int t = 1; t <= 3; t++) {
                            ql_adamw_step s = ql_adamw_scalars(3e-3, 0.9, 0.995, 1e-8, 0.1, t, 0.7);
                            ql_adamw_update_fast(&s, got.param + offset, got.master ? got.master + offset : NULL, g,
                                                 dtypes[d], got.m + offset, got.v + offset, n, threads);
                        }
                        char what[96];
                        snprintf(what, sizeof what, "n=%lld %s master=%d offset=%d threads=%d", (long long)n,
                                 qlora_dtype_name(dtypes[d]), with_master, offset, threads);
                        assert_states_equal(&got, &want, what);
                        state_free(&got);
                    }
                    state_free(&base);
                    state_free(&want);
                    free(grad);
                }
            }
        }
    }
}
END_TEST

/* ------------------------------------------------------------------ sum of squares */

/* Neumaier-compensated sum in long double: far more accurate than either double order. */
static long double exact_sumsq(const void *grad, qlora_dtype d, int64_t n) {
    long double sum = 0.0L, c = 0.0L;
    for (int64_t i = 0; i < n; i++) {
        long double g = grad_at(grad, d, i);
        long double x = g * g, t = sum + x;
        c += fabsl(sum) >= fabsl(x) ? (sum - t) + x : (x - t) + sum;
        sum = t;
    }
    return sum + c;
}

START_TEST(sumsq_fast_equals_reference_and_is_accurate) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    /* around the chunk size, several lockstep groups, and more chunks than one round (256) */
    const int64_t sizes[] = {0, 1, 7, 1000, 65535, 65536, 65537, 3 * 65536 + 1, 8 * 65536 + 3, 9 * 65536 - 5,
                             300 * 65536 + 17};
    const qlora_dtype dtypes[2] = {QLORA_F32, QLORA_BF16};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int64_t n = sizes[k];
        for (int d = 0; d < 2; d++) {
            void *grad = tu_xmalloc((size_t)n * grad_size(dtypes[d]));
            fill_grad(&rng, grad, dtypes[d], n, NULL);
            int bad_ref = -1;
            double ref = ql_grad_sumsq_ref(grad, dtypes[d], n, &bad_ref);
            ck_assert_int_eq(bad_ref, 0);
            for (int threads = 1; threads <= 3; threads++) {
                int bad = -1;
                double fast = ql_grad_sumsq_fast(grad, dtypes[d], n, &bad, threads);
                ck_assert_int_eq(bad, 0);
                ck_assert_msg(memcmp(&fast, &ref, sizeof ref) == 0, "n=%lld %s threads=%d: %a != %a", (long long)n,
                              qlora_dtype_name(dtypes[d]), threads, fast, ref);
            }
            long double exact = exact_sumsq(grad, dtypes[d], n);
            ck_assert_msg(fabsl(ref - exact) <= 1e-12L * exact, "n=%lld: %.17g vs %.20Lg", (long long)n, ref, exact);
            if (n == 0)
                ck_assert_double_eq(ref, 0.0);
            free(grad);
        }
    }
    /* A NULL flag pointer is allowed. */
    float one = 3.0f;
    ck_assert_double_eq(ql_grad_sumsq_ref(&one, QLORA_F32, 1, NULL), 9.0);
    ck_assert_double_eq(ql_grad_sumsq_fast(&one, QLORA_F32, 1, NULL, 2), 9.0);
}
END_TEST

START_TEST(sumsq_flags_nan_and_inf_anywhere) {
    const int64_t n = 2 * 65536 + 11;
    const int64_t where[] = {0, 1, 65535, 65536, 100000, n - 1};
    const float bad_values[3] = {NAN, INFINITY, -INFINITY};
    float *g = tu_xmalloc((size_t)n * 4);
    uint16_t *h = tu_xmalloc((size_t)n * 2);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    tu_fill_normal(&rng, g, n, 1.0f);
    for (size_t w = 0; w < sizeof where / sizeof where[0]; w++) {
        for (int b = 0; b < 3; b++) {
            float saved = g[where[w]];
            g[where[w]] = bad_values[b];
            for (int64_t i = 0; i < n; i++)
                h[i] = ql_f32_to_bf16(g[i]);
            for (int threads = 0; threads <= 3; threads++) {
                int flag_f32 = 0, flag_bf16 = 0;
                if (threads == 0) {
                    ql_grad_sumsq_ref(g, QLORA_F32, n, &flag_f32);
                    ql_grad_sumsq_ref(h, QLORA_BF16, n, &flag_bf16);
                } else {
                    ql_grad_sumsq_fast(g, QLORA_F32, n, &flag_f32, threads);
                    ql_grad_sumsq_fast(h, QLORA_BF16, n, &flag_bf16, threads);
                }
                ck_assert_msg(flag_f32 == 1 && flag_bf16 == 1, "%g at %lld not flagged (threads %d)",
                              (double)bad_values[b], (long long)where[w], threads);
            }
            g[where[w]] = saved;
        }
    }
    /* the largest finite values are not flagged: their squares cannot overflow a double */
    for (int64_t i = 0; i < n; i++)
        g[i] = i % 2 ? FLT_MAX : -FLT_MAX;
    int flag = -1;
    double s = ql_grad_sumsq_fast(g, QLORA_F32, n, &flag, 2);
    ck_assert_int_eq(flag, 0);
    ck_assert(isfinite(s) && s > 1e82);
    flag = -1;
    ql_grad_sumsq_ref(g, QLORA_F32, n, &flag);
    ck_assert_int_eq(flag, 0);
    free(g);
    free(h);
}
END_TEST

/* ------------------------------------------------------------------ CUDA */

START_TEST(cuda_matches_reference) {
#ifdef QLORA_HAVE_CUDA
    if (!tu_have_gpu()) {
        fprintf(stderr, "%s: CUDA AdamW skipped, no CUDA device visible\n", __FILE__);
        return;
    }
    qlora_ctx *ctx = tu_cuda_ctx();
    ql_cuda_state *cs = (ql_cuda_state *)ctx->cuda;
    ck_assert_ptr_nonnull(cs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t sizes[] = {1, 7, 8, 9, 1000, 100003, (1 << 20) + 13};
    const qlora_dtype dtypes[2] = {QLORA_F32, QLORA_BF16};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        for (int d = 0; d < 2; d++) {
            for (int with_master = 0; with_master < 2; with_master++) {
                /* offset 1: every device pointer off its 16-byte alignment (the scalar path) */
                for (int offset = 0; offset < 2; offset++) {
                    int64_t n = sizes[k], total = n + offset;
                    size_t gs = grad_size(dtypes[d]);
                    state want = warm_state(&rng, total, with_master);
                    state init = state_copy(&want);
                    void *grad = tu_xmalloc((size_t)total * gs);
                    fill_grad(&rng, grad, dtypes[d], total, NULL);
                    void *d_param, *d_master = NULL, *d_grad, *d_m, *d_v;
                    ck_assert_qlora_ok(qlora_alloc(ctx, (size_t)total * 2, 1, QLORA_MEM_WORKSPACE, &d_param));
                    ck_assert_qlora_ok(qlora_alloc(ctx, (size_t)total * gs, 1, QLORA_MEM_WORKSPACE, &d_grad));
                    ck_assert_qlora_ok(qlora_alloc(ctx, (size_t)total * 4, 1, QLORA_MEM_WORKSPACE, &d_m));
                    ck_assert_qlora_ok(qlora_alloc(ctx, (size_t)total * 4, 1, QLORA_MEM_WORKSPACE, &d_v));
                    ck_assert_qlora_ok(ql_cuda_memcpy(cs, d_param, init.param, (size_t)total * 2));
                    ck_assert_qlora_ok(ql_cuda_memcpy(cs, d_grad, grad, (size_t)total * gs));
                    ck_assert_qlora_ok(ql_cuda_memcpy(cs, d_m, init.m, (size_t)total * 4));
                    ck_assert_qlora_ok(ql_cuda_memcpy(cs, d_v, init.v, (size_t)total * 4));
                    if (with_master) {
                        ck_assert_qlora_ok(qlora_alloc(ctx, (size_t)total * 4, 1, QLORA_MEM_WORKSPACE, &d_master));
                        ck_assert_qlora_ok(ql_cuda_memcpy(cs, d_master, init.master, (size_t)total * 4));
                    }
                    for (int t = 1; t <= 3; t++) {
                        ql_adamw_step s = ql_adamw_scalars(3e-3, 0.9, 0.995, 1e-8, 0.1, t, 0.7);
                        ql_adamw_update_ref(&s, want.param + offset, want.master ? want.master + offset : NULL,
                                            (const char *)grad + (size_t)offset * gs, dtypes[d], want.m + offset,
                                            want.v + offset, n);
                        ck_assert_qlora_ok(ql_cuda_adamw_update(
                            cs, &s, (uint16_t *)d_param + offset, d_master ? (float *)d_master + offset : NULL,
                            (const char *)d_grad + (size_t)offset * gs, dtypes[d], (float *)d_m + offset,
                            (float *)d_v + offset, n));
                    }
                    state got = state_copy(&init);
                    ck_assert_qlora_ok(ql_cuda_memcpy(cs, got.param, d_param, (size_t)total * 2));
                    ck_assert_qlora_ok(ql_cuda_memcpy(cs, got.m, d_m, (size_t)total * 4));
                    ck_assert_qlora_ok(ql_cuda_memcpy(cs, got.v, d_v, (size_t)total * 4));
                    if (with_master)
                        ck_assert_qlora_ok(ql_cuda_memcpy(cs, got.master, d_master, (size_t)total * 4));
                    char what[96];
                    snprintf(what, sizeof what, "cuda n=%lld %s master=%d offset=%d", (long long)n,
                             qlora_dtype_name(dtypes[d]), with_master, offset);
                    assert_states_equal(&got, &want, what); /* also: element 0 untouched when offset = 1 */

                    /* the sum of squares of the same gradient */
                    double sq = 0.0;
                    int bad = -1;
                    ck_assert_qlora_ok(ql_cuda_grad_sumsq(cs, (const char *)d_grad + (size_t)offset * gs, dtypes[d],
                                                          n, &sq, &bad));
                    ck_assert_int_eq(bad, 0);
                    double host = ql_grad_sumsq_ref((const char *)grad + (size_t)offset * gs, dtypes[d], n, NULL);
                    ck_assert_msg(fabs(sq - host) <= 1e-12 * host, "%s: sumsq %.17g vs host %.17g", what, sq, host);
                    double again = 0.0;
                    ck_assert_qlora_ok(ql_cuda_grad_sumsq(cs, (const char *)d_grad + (size_t)offset * gs, dtypes[d],
                                                          n, &again, &bad));
                    ck_assert_msg(memcmp(&again, &sq, sizeof sq) == 0, "%s: sumsq not deterministic", what);

                    state_free(&got);
                    state_free(&want);
                    state_free(&init);
                    free(grad);
                    qlora_free(ctx, d_param);
                    qlora_free(ctx, d_master);
                    qlora_free(ctx, d_grad);
                    qlora_free(ctx, d_m);
                    qlora_free(ctx, d_v);
                }
            }
        }
    }
    qlora_ctx_free(ctx);
#else
    ck_assert_int_eq(tu_have_gpu(), 0); /* no CUDA backend built: nothing to compare */
#endif
}
END_TEST

START_TEST(cuda_sumsq_flags_nonfinite) {
#ifdef QLORA_HAVE_CUDA
    if (!tu_have_gpu()) {
        fprintf(stderr, "%s: CUDA sumsq skipped, no CUDA device visible\n", __FILE__);
        return;
    }
    qlora_ctx *ctx = tu_cuda_ctx();
    ql_cuda_state *cs = (ql_cuda_state *)ctx->cuda;
    const int64_t n = 3 * 1000003;
    float *g = tu_xmalloc((size_t)n * 4);
    uint16_t *h = tu_xmalloc((size_t)n * 2);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    tu_fill_normal(&rng, g, n, 1.0f);
    void *d_g, *d_h;
    ck_assert_qlora_ok(qlora_alloc(ctx, (size_t)n * 4, 1, QLORA_MEM_WORKSPACE, &d_g));
    ck_assert_qlora_ok(qlora_alloc(ctx, (size_t)n * 2, 1, QLORA_MEM_WORKSPACE, &d_h));
    const int64_t where[] = {0, 12345, n - 1};
    const float bad_values[3] = {NAN, INFINITY, -INFINITY};
    for (int w = -1; w < 3; w++) {
        for (int b = 0; b < 3; b++) {
            float saved = 0.0f;
            if (w >= 0) {
                saved = g[where[w]];
                g[where[w]] = bad_values[b];
            }
            for (int64_t i = 0; i < n; i++)
                h[i] = ql_f32_to_bf16(g[i]);
            ck_assert_qlora_ok(ql_cuda_memcpy(cs, d_g, g, (size_t)n * 4));
            ck_assert_qlora_ok(ql_cuda_memcpy(cs, d_h, h, (size_t)n * 2));
            double sq = 0.0;
            int flag = -1;
            ck_assert_qlora_ok(ql_cuda_grad_sumsq(cs, d_g, QLORA_F32, n, &sq, &flag));
            ck_assert_int_eq(flag, w >= 0);
            if (w < 0) {
                double host = ql_grad_sumsq_ref(g, QLORA_F32, n, NULL);
                ck_assert(fabs(sq - host) <= 1e-12 * host);
            }
            flag = -1;
            ck_assert_qlora_ok(ql_cuda_grad_sumsq(cs, d_h, QLORA_BF16, n, &sq, &flag));
            ck_assert_int_eq(flag, w >= 0);
            if (w >= 0)
                g[where[w]] = saved;
        }
    }
    {
        double sq = -1.0;
        int flag = -1;
        ck_assert_qlora_ok(ql_cuda_grad_sumsq(cs, d_g, QLORA_F32, 0, &sq, &flag));
        ck_assert_double_eq(sq, 0.0);
        ck_assert_int_eq(flag, 0);
    }
    qlora_free(ctx, d_g);
    qlora_free(ctx, d_h);
    free(g);
    free(h);
    qlora_ctx_free(ctx);
#else
    ck_assert_int_eq(tu_have_gpu(), 0);
#endif
}
END_TEST

int main(void) {
    Suite *s = suite_create("adamw");
    TCase *math = tcase_create("math");
    tcase_set_timeout(math, 120);
    tcase_add_test(math, scalars_match_hand_computed_values);
    tcase_add_test(math, reference_follows_fp64_adamw_with_master);
    tcase_add_test(math, reference_follows_fp64_adamw_bf16_only);
    tcase_add_test(math, weight_decay_is_applied_after_the_step);
    tcase_add_test(math, grad_scale_and_zero_decay);
    suite_add_tcase(s, math);
    TCase *fast = tcase_create("fast");
    tcase_set_timeout(fast, 120);
    tcase_add_test(fast, fast_equals_reference_bit_for_bit);
    tcase_add_test(fast, sumsq_fast_equals_reference_and_is_accurate);
    tcase_add_test(fast, sumsq_flags_nan_and_inf_anywhere);
    suite_add_tcase(s, fast);
    TCase *cuda = tcase_create("cuda");
    tcase_set_timeout(cuda, 120);
    tcase_add_test(cuda, cuda_matches_reference);
    tcase_add_test(cuda, cuda_sumsq_flags_nonfinite);
    suite_add_tcase(s, cuda);
    return tu_run_suite(s);
}
