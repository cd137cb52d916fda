/*
 * The CPU building blocks of the Llama forward/backward (lib/model_ops.h): each op against an
 * FP64 evaluation written here, every backward against central finite differences of an FP64
 * forward, and the HF-specific arithmetic (RoPE inv_freq incl. llama3 scaling, cos/sin, RMSNorm)
 * against transformers' own outputs (tests/fixtures/model_ops_reference.safetensors, written by
 * tests/fixtures/make_rope_fixture.py).
 *
 * Tolerances. Inputs are BF16, so their FP64 values are exact. U = 2^-24 (float32 unit
 * roundoff). Each BF16 rounding of a result e costs at most 2^-8·|e| (we use 1.01·2^-8 for the
 * final one, and 2^-8 per extra intermediate rounding the op does as HF does: RMSNorm and
 * SwiGLU round twice, RoPE three times). A float32 sum of n terms errs by at most n·U times the
 * sum of the terms' absolute values (the classic worst-case bound); each tolerance below names
 * that absolute sum. Finite differences in FP64 with h = 1e-5 err by ~1e-10 relative, covered
 * by an extra 1e-7·(1 + max|g|). Real bugs (a lost scale, a wrong mask, a swapped half) move
 * results by O(|e|), far outside.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "model_ops.h"
#include "testutil.h"

static const double U = 1.0 / 16777216.0;
static const double BF = 1.0 / 256.0; /* 2^-8: relative rounding of BF16 */

static double bf(uint16_t h) { return ql_bf16_to_f32(h); }

static double *to_doubles(const uint16_t *h, int64_t n) {
    double *d = tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++)
        d[i] = bf(h[i]);
    return d;
}

static qlora_ctx *cpu_ctx(void) {
    tu_backend b[4];
    tu_backends(b);
    return tu_ctx(&b[0]); /* cpu-fast: the ops only use its thread count and allocator */
}

static void assert_no_live_memory(qlora_ctx *ctx) {
    qlora_mem_stats st;
    ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
    ck_assert_uint_eq(st.live_allocations, 0);
}

/* |got - want| <= tol element-wise; reports the worst element. */
static void assert_close(const char *what, const double *got, const double *want, const double *tol, int64_t n) {
    int64_t worst = 0, bad = 0;
    double worst_ratio = -1.0;
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(isfinite(got[i]), "%s: element %lld is not finite", what, (long long)i);
        double ratio = fabs(got[i] - want[i]) / tol[i];
        bad += ratio > 1.0;
        if (ratio > worst_ratio) {
            worst_ratio = ratio;
            worst = i;
        }
    }
    ck_assert_msg(bad == 0, "%s: %lld of %lld out of tolerance; worst [%lld]: got %.9g want %.9g tol %.3g", what,
                  (long long)bad, (long long)n, (long long)worst, got[worst], want[worst], tol[worst]);
}

static double max_abs(const double *x, int64_t n) {
    double m = 0.0;
    for (int64_t i = 0; i < n; i++)
        m = fmax(m, fabs(x[i]));
    return m;
}

/* Central differences of f at x (modified and restored in place). */
typedef double (*fp64_fn)(const double *x, const void *arg);
static double *finite_diff(fp64_fn f, double *x, int64_t n, const void *arg) {
    double *g = tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        double x0 = x[i], h = 1e-5 * fmax(1.0, fabs(x0));
        x[i] = x0 + h;
        double up = f(x, arg);
        x[i] = x0 - h;
        double down = f(x, arg);
        x[i] = x0;
        g[i] = (up - down) / (2.0 * h);
    }
    return g;
}

/* Library gradient (BF16) against FD, with tol = 1.01·2^-8·|g| + fp32_tol[i] + FD error. */
static void assert_grad(const char *what, const uint16_t *got, const double *fd, const double *fp32_tol, int64_t n) {
    double *g = to_doubles(got, n), *tol = tu_xmalloc((size_t)n * sizeof(double));
    double fd_err = 1e-7 * (1.0 + max_abs(fd, n));
    for (int64_t i = 0; i < n; i++)
        tol[i] = 1.01 * BF * fabs(fd[i]) + fp32_tol[i] + fd_err;
    assert_close(what, g, fd, tol, n);
    free(g);
    free(tol);
}

/* ================================================================ RMSNorm */

typedef struct norm_arg {
    int64_t rows, dim;
    const double *w, *c; /* weight, and the cotangent contracted with the output */
    double eps;
} norm_arg;

static double rmsnorm_ref_row(const double *x, const double *w, int64_t dim, double eps, double *y) {
    double ss = 0.0;
    for (int64_t i = 0; i < dim; i++)
        ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / (double)dim + eps);
    for (int64_t i = 0; i < dim; i++)
        y[i] = w[i] * x[i] * r;
    return r;
}

static double rmsnorm_objective(const double *x, const void *arg) {
    const norm_arg *a = arg;
    double *y = tu_xmalloc((size_t)a->dim * sizeof(double)), f = 0.0;
    for (int64_t r = 0; r < a->rows; r++) {
        rmsnorm_ref_row(x + r * a->dim, a->w, a->dim, a->eps, y);
        for (int64_t i = 0; i < a->dim; i++)
            f += a->c[r * a->dim + i] * y[i];
    }
    free(y);
    return f;
}

START_TEST(test_rmsnorm_forward_backward) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t rows = 6, dim = 96;
    const float eps = 1e-5f;
    uint16_t *x = tu_random_bf16(&rng, rows * dim, 2.0f), *w = tu_random_bf16(&rng, dim, 1.0f);
    uint16_t *dy = tu_random_bf16(&rng, rows * dim, 1.0f);
    uint16_t *y = tu_xmalloc(rows * dim * 2), *dx = tu_xmalloc(rows * dim * 2);
    ck_assert_qlora_ok(ql_rmsnorm_forward(ctx, x, w, rows, dim, eps, y));
    ck_assert_qlora_ok(ql_rmsnorm_backward(ctx, x, w, dy, rows, dim, eps, dx));

    double *xd = to_doubles(x, rows * dim), *wd = to_doubles(w, dim), *cd = to_doubles(dy, rows * dim);
    double *want = tu_xmalloc(rows * dim * sizeof(double)), *tol = tu_xmalloc(rows * dim * sizeof(double));
    double *got = to_doubles(y, rows * dim), *fp32_tol = tu_xmalloc(rows * dim * sizeof(double));
    for (int64_t r = 0; r < rows; r++) {
        double rstd = rmsnorm_ref_row(xd + r * dim, wd, dim, eps, want + r * dim);
        double mean_gn = 0.0;
        for (int64_t i = 0; i < dim; i++)
            mean_gn += fabs(cd[r * dim + i] * wd[i] * xd[r * dim + i] * rstd) / (double)dim;
        for (int64_t i = 0; i < dim; i++) {
            /* two BF16 roundings (normalized value, product) + float32 sum of squares */
            tol[r * dim + i] = (1.01 * BF + BF + (dim + 4) * U) * fabs(want[r * dim + i]) + 1e-30;
            /* backward: float32 sums over dim terms of |g·n̂| plus the row's own terms */
            fp32_tol[r * dim + i] =
                (dim + 8) * U * rstd * (fabs(cd[r * dim + i] * wd[i]) + fabs(xd[r * dim + i]) * rstd * mean_gn);
        }
    }
    assert_close("rmsnorm forward", got, want, tol, rows * dim);

    norm_arg a = {rows, dim, wd, cd, eps};
    double *fd = finite_diff(rmsnorm_objective, xd, rows * dim, &a);
    assert_grad("rmsnorm dx", dx, fd, fp32_tol, rows * dim);

    free(x), free(w), free(dy), free(y), free(dx), free(xd), free(wd), free(cd);
    free(want), free(tol), free(got), free(fp32_tol), free(fd);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

/* ================================================================ HF fixtures */

static qlora_tensor fixture_tensor(const qlora_safetensors *f, const char *name) {
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_safetensors_find(f, name, &t));
    return t;
}

/* Copies of fixture data (the mapping may be unaligned). */
static float *fixture_f32(const qlora_safetensors *f, const char *name, int64_t n) {
    qlora_tensor t = fixture_tensor(f, name);
    ck_assert_int_eq(t.dtype, QLORA_F32);
    ck_assert_int_eq(qlora_tensor_numel(&t), n);
    float *p = tu_xmalloc((size_t)n * 4);
    memcpy(p, t.data, (size_t)n * 4);
    return p;
}

static uint16_t *fixture_bf16(const qlora_safetensors *f, const char *name, int64_t n) {
    qlora_tensor t = fixture_tensor(f, name);
    ck_assert_int_eq(t.dtype, QLORA_BF16);
    ck_assert_int_eq(qlora_tensor_numel(&t), n);
    uint16_t *p = tu_xmalloc((size_t)n * 2);
    memcpy(p, t.data, (size_t)n * 2);
    return p;
}

/* The cases of make_rope_fixture.py's CASES. */
typedef struct rope_case {
    const char *name;
    ql_rope_params p;
} rope_case;

static const rope_case ROPE_CASES[] = {
    {"default_64", {QL_ROPE_DEFAULT, 64, 10000.0, 0, 0, 0, 0}},
    {"default_128", {QL_ROPE_DEFAULT, 128, 500000.0, 0, 0, 0, 0}},
    {"linear_64", {QL_ROPE_LINEAR, 64, 10000.0, 3.0, 0, 0, 0}},
    {"llama3_32", {QL_ROPE_LLAMA3, 128, 500000.0, 32.0, 1.0, 4.0, 8192}},
    {"llama3_8", {QL_ROPE_LLAMA3, 64, 500000.0, 8.0, 1.0, 4.0, 8192}},
};

/* inv_freq is float32 arithmetic repeated step by step, so it must match transformers bit for
 * bit (torch's CPU pow agrees with glibc's powf on these inputs). */
START_TEST(test_rope_inv_freq_matches_transformers) {
    qlora_safetensors *f = NULL;
    ck_assert_qlora_ok(qlora_safetensors_open(tu_fixture("model_ops_reference.safetensors"), &f));
    for (size_t c = 0; c < sizeof ROPE_CASES / sizeof ROPE_CASES[0]; c++) {
        const rope_case *rc = &ROPE_CASES[c];
        char name[64];
        snprintf(name, sizeof name, "inv_freq.%s", rc->name);
        int half = rc->p.head_dim / 2;
        float *want = fixture_f32(f, name, half), got[256];
        ck_assert_qlora_ok(ql_rope_inv_freq(&rc->p, got));
        for (int j = 0; j < half; j++)
            ck_assert_msg(ql_f32_bits(got[j]) == ql_f32_bits(want[j]), "%s[%d]: got %.9g, transformers %.9g", name, j,
                          got[j], want[j]);
        free(want);
    }
    qlora_safetensors_close(f);
}
END_TEST

/* Number of elements whose BF16 bits differ by more than `ulps` units (same sign assumed). */
static int64_t bf16_mismatches(const uint16_t *a, const uint16_t *b, int64_t n, int ulps, int64_t *exact_diffs) {
    int64_t bad = 0, diff = 0;
    for (int64_t i = 0; i < n; i++) {
        int d = abs((int)a[i] - (int)b[i]);
        diff += d != 0;
        bad += d > ulps;
    }
    if (exact_diffs)
        *exact_diffs = diff;
    return bad;
}

/* cos/sin and the rotated q: HF casts float32 cos/sin to BF16, and torch's vectorized cos/sin
 * may differ from glibc's by a float32 ulp, which can flip one BF16 rounding: so at most one
 * BF16 ulp, and on at most 1/16 of the elements. q_out inherits that through cos/sin. */
START_TEST(test_rope_table_and_apply_match_transformers) {
    qlora_ctx *ctx = cpu_ctx();
    qlora_safetensors *f = NULL;
    ck_assert_qlora_ok(qlora_safetensors_open(tu_fixture("model_ops_reference.safetensors"), &f));
    qlora_tensor pt = fixture_tensor(f, "rope.positions");
    int64_t P = qlora_tensor_numel(&pt);
    int32_t *pos = tu_xmalloc((size_t)P * 4);
    memcpy(pos, pt.data, (size_t)P * 4);
    const ql_rope_params *p = &ROPE_CASES[3].p; /* llama3_32 */
    int d = p->head_dim, half = d / 2;
    uint16_t *cos_hf = fixture_bf16(f, "rope.cos", P * d), *sin_hf = fixture_bf16(f, "rope.sin", P * d);
    uint16_t *q = fixture_bf16(f, "rope.q", P * d), *q_hf = fixture_bf16(f, "rope.q_out", P * d);

    ql_rope_table tab;
    ck_assert_qlora_ok(ql_rope_table_init(ctx, p, 131072, &tab));
    uint16_t *cos_ours = tu_xmalloc((size_t)P * d * 2), *sin_ours = tu_xmalloc((size_t)P * d * 2);
    for (int64_t i = 0; i < P; i++)
        for (int j = 0; j < d; j++) {
            cos_ours[i * d + j] = tab.cos[(int64_t)pos[i] * half + j % half];
            sin_ours[i * d + j] = tab.sin[(int64_t)pos[i] * half + j % half];
        }
    int64_t diffs = 0;
    ck_assert_int_eq(bf16_mismatches(cos_ours, cos_hf, P * d, 1, &diffs), 0);
    ck_assert_msg(diffs <= P * d / 16, "cos: %lld of %lld differ by one BF16 ulp", (long long)diffs,
                  (long long)(P * d));
    ck_assert_int_eq(bf16_mismatches(sin_ours, sin_hf, P * d, 1, &diffs), 0);
    ck_assert_msg(diffs <= P * d / 16, "sin: %lld of %lld differ by one BF16 ulp", (long long)diffs,
                  (long long)(P * d));

    ck_assert_qlora_ok(ql_rope_forward(ctx, &tab, pos, P, 1, q));
    /* where our cos/sin equal HF's, the rotated values must be identical bits */
    for (int64_t i = 0; i < P; i++)
        for (int j = 0; j < half; j++) {
            int64_t a = i * d + j, b = a + half;
            if (cos_ours[a] == cos_hf[a] && sin_ours[a] == sin_hf[a]) {
                ck_assert_msg(q[a] == q_hf[a] && q[b] == q_hf[b], "q_out at position %d, pair %d: %#x %#x vs HF %#x %#x",
                              pos[i], j, q[a], q[b], q_hf[a], q_hf[b]);
            }
        }
    ql_rope_table_free(ctx, &tab);
    free(pos), free(cos_hf), free(sin_hf), free(q), free(q_hf), free(cos_ours), free(sin_ours);
    qlora_safetensors_close(f);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

/* RMSNorm output: our sum of squares is a double rounded once, torch's a pairwise float32 sum;
 * they can differ by a float32 ulp, which may flip a BF16 rounding: at most one BF16 ulp, rare. */
START_TEST(test_rmsnorm_matches_transformers) {
    qlora_ctx *ctx = cpu_ctx();
    qlora_safetensors *f = NULL;
    ck_assert_qlora_ok(qlora_safetensors_open(tu_fixture("model_ops_reference.safetensors"), &f));
    const int64_t rows = 8, dim = 256;
    uint16_t *x = fixture_bf16(f, "rmsnorm.x", rows * dim), *w = fixture_bf16(f, "rmsnorm.weight", dim);
    uint16_t *want = fixture_bf16(f, "rmsnorm.out", rows * dim), *got = tu_xmalloc(rows * dim * 2);
    ck_assert_qlora_ok(ql_rmsnorm_forward(ctx, x, w, rows, dim, 1e-5f, got));
    int64_t diffs = 0;
    ck_assert_int_eq(bf16_mismatches(got, want, rows * dim, 1, &diffs), 0);
    ck_assert_msg(diffs <= rows * dim / 32, "rmsnorm: %lld of %lld differ by one BF16 ulp", (long long)diffs,
                  (long long)(rows * dim));
    free(x), free(w), free(want), free(got);
    qlora_safetensors_close(f);
    qlora_ctx_free(ctx);
}
END_TEST

/* ================================================================ RoPE */

typedef struct rope_arg {
    int64_t tokens;
    int heads, half;
    const int32_t *pos;
    const ql_rope_table *tab;
    const double *c;
} rope_arg;

/* FP64 rotation with the table's (BF16) cos/sin, contracted with c. */
static void rope_ref(const double *x, const rope_arg *a, double *y) {
    int d = 2 * a->half;
    for (int64_t t = 0; t < a->tokens; t++)
        for (int h = 0; h < a->heads; h++)
            for (int j = 0; j < a->half; j++) {
                int64_t i = (t * a->heads + h) * d + j;
                double c = bf(a->tab->cos[(int64_t)a->pos[t] * a->half + j]);
                double s = bf(a->tab->sin[(int64_t)a->pos[t] * a->half + j]);
                y[i] = x[i] * c - x[i + a->half] * s;
                y[i + a->half] = x[i + a->half] * c + x[i] * s;
            }
}

static double rope_objective(const double *x, const void *arg) {
    const rope_arg *a = arg;
    int64_t n = a->tokens * a->heads * 2 * a->half;
    double *y = tu_xmalloc((size_t)n * sizeof(double)), f = 0.0;
    rope_ref(x, a, y);
    for (int64_t i = 0; i < n; i++)
        f += a->c[i] * y[i];
    free(y);
    return f;
}

START_TEST(test_rope_forward_backward) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const ql_rope_params p = {QL_ROPE_LLAMA3, 16, 500000.0, 8.0, 1.0, 4.0, 64};
    const int64_t T = 11;
    const int heads = 3, d = 16, half = 8;
    /* two packed sequences: positions restart at 0 */
    const int32_t pos[11] = {0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4};
    ql_rope_table tab;
    ck_assert_qlora_ok(ql_rope_table_init(ctx, &p, 6, &tab));
    /* the table: cos/sin of the float32 angle pos·inv_freq, rounded once to BF16 */
    float inv[8];
    ck_assert_qlora_ok(ql_rope_inv_freq(&p, inv));
    for (int ps = 0; ps < 6; ps++)
        for (int j = 0; j < half; j++) {
            double angle = (float)((float)ps * inv[j]);
            ck_assert(fabs(bf(tab.cos[ps * half + j]) - cos(angle)) <= 1.01 * BF * fabs(cos(angle)) + 4 * U);
            ck_assert(fabs(bf(tab.sin[ps * half + j]) - sin(angle)) <= 1.01 * BF * fabs(sin(angle)) + 4 * U);
        }

    int64_t n = T * heads * d;
    uint16_t *x = tu_random_bf16(&rng, n, 1.5f), *dy = tu_random_bf16(&rng, n, 1.0f);
    uint16_t *y = tu_xmalloc(n * 2), *dx = tu_xmalloc(n * 2);
    memcpy(y, x, n * 2);
    memcpy(dx, dy, n * 2);
    ck_assert_qlora_ok(ql_rope_forward(ctx, &tab, pos, T, heads, y));
    ck_assert_qlora_ok(ql_rope_backward(ctx, &tab, pos, T, heads, dx));

    double *xd = to_doubles(x, n), *cd = to_doubles(dy, n), *want = tu_xmalloc(n * 8), *tol = tu_xmalloc(n * 8);
    double *got = to_doubles(y, n), *fp32_tol = tu_xmalloc(n * 8);
    rope_arg a = {T, heads, half, pos, &tab, cd};
    rope_ref(xd, &a, want);
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < heads; h++)
            for (int j = 0; j < half; j++) {
                int64_t i = (t * heads + h) * d + j, k = i + half;
                double c = fabs(bf(tab.cos[pos[t] * half + j])), s = fabs(bf(tab.sin[pos[t] * half + j]));
                /* three roundings: both products and the sum (each ≤ 2^-8 of its magnitude) */
                tol[i] = 1.01 * BF * (fabs(xd[i]) * c + fabs(xd[k]) * s) * 2 + 1e-30;
                tol[k] = 1.01 * BF * (fabs(xd[k]) * c + fabs(xd[i]) * s) * 2 + 1e-30;
                fp32_tol[i] = 4 * U * (fabs(cd[i]) * c + fabs(cd[k]) * s);
                fp32_tol[k] = 4 * U * (fabs(cd[k]) * c + fabs(cd[i]) * s);
            }
    assert_close("rope forward", got, want, tol, n);
    double *fd = finite_diff(rope_objective, xd, n, &a);
    assert_grad("rope dx", dx, fd, fp32_tol, n);

    const int32_t bad_pos[1] = {6};
    ck_assert_qlora_fails(ql_rope_forward(ctx, &tab, bad_pos, 1, heads, y), QLORA_ERR_INVALID_ARG, "position 6");
    ql_rope_params odd = p;
    odd.head_dim = 15;
    ck_assert_qlora_fails(ql_rope_inv_freq(&odd, inv), QLORA_ERR_INVALID_ARG, "head_dim 15");
    ql_rope_table_free(ctx, &tab);
    free(x), free(dy), free(y), free(dx), free(xd), free(cd), free(want), free(tol), free(got), free(fp32_tol), free(fd);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

/* ================================================================ SwiGLU */

typedef struct swiglu_arg {
    int64_t n;
    const double *c;
} swiglu_arg;

static double silu(double g) { return g / (1.0 + exp(-g)); }

/* x = [gate; up] */
static double swiglu_objective(const double *x, const void *arg) {
    const swiglu_arg *a = arg;
    double f = 0.0;
    for (int64_t i = 0; i < a->n; i++)
        f += a->c[i] * silu(x[i]) * x[a->n + i];
    return f;
}

START_TEST(test_swiglu_forward_backward) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t n = 300;
    uint16_t *gu = tu_random_bf16(&rng, 2 * n, 2.5f), *dout = tu_random_bf16(&rng, n, 1.0f);
    uint16_t *out = tu_xmalloc(n * 2), *dgu = tu_xmalloc(2 * n * 2);
    ck_assert_qlora_ok(ql_swiglu_forward(ctx, gu, gu + n, n, out));
    ck_assert_qlora_ok(ql_swiglu_backward(ctx, gu, gu + n, dout, n, dgu, dgu + n));
    double *x = to_doubles(gu, 2 * n), *c = to_doubles(dout, n), *got = to_doubles(out, n);
    double *want = tu_xmalloc(n * 8), *tol = tu_xmalloc(n * 8), *fp32_tol = tu_xmalloc(2 * n * 8);
    for (int64_t i = 0; i < n; i++) {
        want[i] = silu(x[i]) * x[n + i];
        /* BF16 after silu and after the product; expf and the float32 ops a few ulps */
        tol[i] = (1.01 * BF + BF + 16 * U) * fabs(want[i]) + 1e-30;
        double sg = 1.0 / (1.0 + exp(-x[i]));
        fp32_tol[i] = 16 * U * fabs(c[i] * x[n + i]) * (sg + fabs(x[i]) * sg * (1 - sg) + sg);
        fp32_tol[n + i] = 16 * U * fabs(c[i] * silu(x[i]));
    }
    assert_close("swiglu forward", got, want, tol, n);
    swiglu_arg a = {n, c};
    double *fd = finite_diff(swiglu_objective, x, 2 * n, &a);
    assert_grad("swiglu dgate, dup", dgu, fd, fp32_tol, 2 * n);
    free(gu), free(dout), free(out), free(dgu), free(x), free(c), free(got), free(want), free(tol), free(fp32_tol),
        free(fd);
    qlora_ctx_free(ctx);
}
END_TEST

/* ================================================================ attention */

typedef struct attn_case {
    ql_attn_shape s;
    const int32_t *seq_start;
    const double *c; /* cotangent of out, for the FD objective */
} attn_case;

static int64_t key_start(const int32_t *seq_start, int64_t t) { return seq_start ? seq_start[t] : 0; }

/* FP64 attention, x = [q; k; v]. out [T, nh, d] and lse [T, nh] (either may be NULL); bound
 * [T, nh] (NULL ok) gets Σ|q·k|·scale's largest term sum, for the float32 tolerance. */
static void attn_ref(const double *x, const attn_case *a, double *out, double *lse, double *bound) {
    const ql_attn_shape *s = &a->s;
    int nh = s->heads, nkv = s->kv_heads, d = s->head_dim, group = nh / nkv;
    const double *q = x, *k = x + s->tokens * nh * d, *v = k + s->tokens * nkv * d;
    double scale = 1.0 / sqrt((double)d);
    double *score = tu_xmalloc((size_t)s->tokens * sizeof(double));
    for (int64_t t = 0; t < s->tokens; t++)
        for (int h = 0; h < nh; h++) {
            const double *qr = q + (t * nh + h) * d;
            int kvh = h / group;
            double m = -INFINITY, sabs = 0.0;
            int64_t j0 = key_start(a->seq_start, t);
            for (int64_t j = j0; j <= t; j++) {
                double dot = 0.0, dabs = 0.0;
                for (int i = 0; i < d; i++) {
                    dot += qr[i] * k[(j * nkv + kvh) * d + i];
                    dabs += fabs(qr[i] * k[(j * nkv + kvh) * d + i]);
                }
                score[j] = dot * scale;
                m = fmax(m, score[j]);
                sabs = fmax(sabs, dabs * scale);
            }
            double l = 0.0;
            for (int64_t j = j0; j <= t; j++)
                l += exp(score[j] - m);
            if (lse)
                lse[t * nh + h] = m + log(l);
            if (bound)
                bound[t * nh + h] = sabs;
            if (out)
                for (int i = 0; i < d; i++) {
                    double acc = 0.0;
                    for (int64_t j = j0; j <= t; j++)
                        acc += exp(score[j] - m) / l * v[(j * nkv + kvh) * d + i];
                    out[(t * nh + h) * d + i] = acc;
                }
        }
    free(score);
}

static double attn_objective(const double *x, const void *arg) {
    const attn_case *a = arg;
    int64_t n = a->s.tokens * a->s.heads * a->s.head_dim;
    double *out = tu_xmalloc((size_t)n * sizeof(double)), f = 0.0;
    attn_ref(x, a, out, NULL, NULL);
    for (int64_t i = 0; i < n; i++)
        f += a->c[i] * out[i];
    free(out);
    return f;
}

typedef struct attn_data {
    int64_t nq, nkv; /* elements of q and of k (= v) */
    uint16_t *qkv;   /* [q; k; v] */
    uint16_t *out, *dout, *dqkv;
    float *lse;
} attn_data;

static attn_data attn_run(qlora_ctx *ctx, const ql_attn_shape *s, const int32_t *seq_start, const uint16_t *qkv,
                          const uint16_t *dout) {
    attn_data r;
    r.nq = s->tokens * s->heads * s->head_dim;
    r.nkv = s->tokens * s->kv_heads * s->head_dim;
    r.qkv = (uint16_t *)qkv;
    r.dout = (uint16_t *)dout;
    r.out = tu_xmalloc((size_t)r.nq * 2);
    r.lse = tu_xmalloc((size_t)(s->tokens * s->heads) * 4);
    r.dqkv = tu_xmalloc((size_t)(r.nq + 2 * r.nkv) * 2);
    const uint16_t *q = qkv, *k = qkv + r.nq, *v = k + r.nkv;
    ck_assert_qlora_ok(ql_attention_forward(ctx, s, q, k, v, seq_start, r.out, r.lse));
    if (dout)
        ck_assert_qlora_ok(ql_attention_backward(ctx, s, q, k, v, seq_start, r.lse, dout, r.dqkv, r.dqkv + r.nq,
                                                 r.dqkv + r.nq + r.nkv));
    return r;
}

static void attn_free(attn_data *r) {
    free(r->out);
    free(r->lse);
    free(r->dqkv);
}

/* Forward against FP64 with several key blocks and three packed sequences. Per (token, head)
 * with L keys, S = max_s Σ|q·k|·scale: scores err ≤ (d+2)·U·S in float32, so the weights err
 * relatively by ≤ 2(d+2)·U·S + expf's few ulps, and the weighted sum of L rows by L·U more:
 * |out − e| ≤ 1.01·2^-8|e| + (4(d+2)·S + 2L + 16)·U·max|v|, |lse − e| ≤ ((d+2)·S + (L+8)(1+|e|))·U. */
START_TEST(test_attention_forward_vs_fp64) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    ql_attn_shape s = {150, 4, 2, 16};
    int32_t seq_start[150];
    for (int t = 0; t < 150; t++)
        seq_start[t] = t < 70 ? 0 : t < 130 ? 70 : 130;
    int64_t nq = 150 * 4 * 16, nkv = 150 * 2 * 16;
    uint16_t *qkv = tu_random_bf16(&rng, nq + 2 * nkv, 1.0f);
    attn_data r = attn_run(ctx, &s, seq_start, qkv, NULL);
    double *x = to_doubles(qkv, nq + 2 * nkv), *out = tu_xmalloc(nq * 8), *lse = tu_xmalloc(600 * 8), *bound = tu_xmalloc(600 * 8);
    attn_case a = {s, seq_start, NULL};
    attn_ref(x, &a, out, lse, bound);
    double vmax = max_abs(x + nq + nkv, nkv);
    double *tol = tu_xmalloc(nq * 8), *got = to_doubles(r.out, nq), *lse_got = tu_xmalloc(600 * 8), *lse_tol = tu_xmalloc(600 * 8);
    for (int64_t t = 0; t < 150; t++)
        for (int h = 0; h < 4; h++) {
            int64_t row = t * 4 + h, L = t - seq_start[t] + 1;
            for (int i = 0; i < 16; i++)
                tol[row * 16 + i] = 1.01 * BF * fabs(out[row * 16 + i]) + (4 * 18 * bound[row] + 2 * L + 16) * U * vmax;
            lse_got[row] = r.lse[row];
            lse_tol[row] = (18 * bound[row] + (L + 8) * (1 + fabs(lse[row]))) * U;
        }
    assert_close("attention out", got, out, tol, nq);
    assert_close("attention lse", lse_got, lse, lse_tol, 600);
    attn_free(&r);
    free(qkv), free(x), free(out), free(lse), free(bound), free(tol), free(got), free(lse_got), free(lse_tol);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

/* dq, dk, dv against finite differences of the FP64 forward (two packed sequences, GQA).
 * Float32 tolerance, norm-wise: each gradient is a float32 sum of at most L·d·group ≤ 2^8
 * products whose absolute sum stays within 2^4 of the tensor's largest gradient on these
 * inputs, so 2^8·U·2^4 = 2^-12 of max|g| per tensor; we allow 2^-10. */
START_TEST(test_attention_backward_finite_differences) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    ql_attn_shape s = {9, 4, 2, 8};
    const int32_t seq_start[9] = {0, 0, 0, 0, 0, 5, 5, 5, 5};
    int64_t nq = 9 * 4 * 8, nkv = 9 * 2 * 8, n = nq + 2 * nkv;
    uint16_t *qkv = tu_random_bf16(&rng, n, 1.0f), *dout = tu_random_bf16(&rng, nq, 1.0f);
    attn_data r = attn_run(ctx, &s, seq_start, qkv, dout);
    double *x = to_doubles(qkv, n), *c = to_doubles(dout, nq);
    attn_case a = {s, seq_start, c};
    double *fd = finite_diff(attn_objective, x, n, &a), *fp32_tol = tu_xmalloc(n * 8);
    const int64_t part_begin[3] = {0, nq, nq + nkv}, part_end[3] = {nq, nq + nkv, n};
    for (int p = 0; p < 3; p++) {
        double m = max_abs(fd + part_begin[p], part_end[p] - part_begin[p]);
        for (int64_t i = part_begin[p]; i < part_end[p]; i++)
            fp32_tol[i] = m / 1024.0;
    }
    assert_grad("attention dq, dk, dv", r.dqkv, fd, fp32_tol, n);
    attn_free(&r);
    free(qkv), free(dout), free(x), free(c), free(fd), free(fp32_tol);
    qlora_ctx_free(ctx);
}
END_TEST

/* Slices rows [t0, t0+len) of a [T, heads·d] tensor into dst. */
static void copy_rows(uint16_t *dst, const uint16_t *src, int64_t t0, int64_t len, int64_t width) {
    memcpy(dst, src + t0 * width, (size_t)(len * width) * 2);
}

/* Packing two sequences gives, bit for bit, what running each alone gives: the same keys in
 * the same order and the same key blocks (blocks start at the sequence's first token). */
START_TEST(test_attention_packed_equals_separate) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t T = 100, split = 67;
    ql_attn_shape s = {T, 4, 2, 8};
    int32_t seq_start[100];
    for (int t = 0; t < T; t++)
        seq_start[t] = t < split ? 0 : (int32_t)split;
    int64_t wq = 4 * 8, wk = 2 * 8;
    uint16_t *qkv = tu_random_bf16(&rng, T * (wq + 2 * wk), 1.0f), *dout = tu_random_bf16(&rng, T * wq, 1.0f);
    attn_data packed = attn_run(ctx, &s, seq_start, qkv, dout);
    const int64_t starts[2] = {0, split}, lens[2] = {split, T - split};
    for (int part = 0; part < 2; part++) {
        int64_t t0 = starts[part], L = lens[part];
        ql_attn_shape one = {L, 4, 2, 8};
        uint16_t *sub = tu_xmalloc((size_t)(L * (wq + 2 * wk)) * 2), *dsub = tu_xmalloc((size_t)(L * wq) * 2);
        copy_rows(sub, qkv, t0, L, wq);
        copy_rows(sub + L * wq, qkv + T * wq, t0, L, wk);
        copy_rows(sub + L * (wq + wk), qkv + T * (wq + wk), t0, L, wk);
        copy_rows(dsub, dout, t0, L, wq);
        attn_data alone = attn_run(ctx, &one, NULL, sub, dsub);
        ck_assert_mem_eq(alone.out, packed.out + t0 * wq, (size_t)(L * wq) * 2);
        ck_assert_mem_eq(alone.lse, packed.lse + t0 * 4, (size_t)(L * 4) * 4);
        ck_assert_mem_eq(alone.dqkv, packed.dqkv + t0 * wq, (size_t)(L * wq) * 2);
        ck_assert_mem_eq(alone.dqkv + L * wq, packed.dqkv + T * wq + t0 * wk, (size_t)(L * wk) * 2);
        ck_assert_mem_eq(alone.dqkv + L * (wq + wk), packed.dqkv + T * (wq + wk) + t0 * wk, (size_t)(L * wk) * 2);
        attn_free(&alone);
        free(sub), free(dsub);
    }
    attn_free(&packed);
    free(qkv), free(dout);
    qlora_ctx_free(ctx);
}
END_TEST

/* GQA equals MHA on k/v heads repeated nh/nkv times (HF's repeat_kv): out, lse and dq are the
 * same arithmetic, hence identical bits; dk, dv of a kv head are the sum over its group of the
 * MHA heads' gradients, each of which MHA rounded to BF16: 1.01·2^-8 of the sum of their
 * magnitudes, plus one rounding of the total. */
START_TEST(test_attention_gqa_equals_repeated_mha) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t T = 40;
    const int nh = 6, nkv = 2, d = 8, group = 3;
    ql_attn_shape gqa = {T, nh, nkv, d}, mha = {T, nh, nh, d};
    int64_t nq = T * nh * d, nk = T * nkv * d;
    uint16_t *qkv = tu_random_bf16(&rng, nq + 2 * nk, 1.0f), *dout = tu_random_bf16(&rng, nq, 1.0f);
    uint16_t *rep = tu_xmalloc((size_t)(3 * nq) * 2);
    memcpy(rep, qkv, (size_t)nq * 2);
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < d; i++)
                for (int part = 0; part < 2; part++)
                    rep[nq * (1 + part) + (t * nh + h) * d + i] = qkv[nq + nk * part + (t * nkv + h / group) * d + i];
    attn_data a = attn_run(ctx, &gqa, NULL, qkv, dout), b = attn_run(ctx, &mha, NULL, rep, dout);
    ck_assert_mem_eq(a.out, b.out, (size_t)nq * 2);
    ck_assert_mem_eq(a.lse, b.lse, (size_t)(T * nh) * 4);
    ck_assert_mem_eq(a.dqkv, b.dqkv, (size_t)nq * 2);
    double *got = tu_xmalloc(2 * nk * 8), *want = tu_xmalloc(2 * nk * 8), *tol = tu_xmalloc(2 * nk * 8);
    for (int part = 0; part < 2; part++)
        for (int64_t t = 0; t < T; t++)
            for (int g = 0; g < nkv; g++)
                for (int i = 0; i < d; i++) {
                    int64_t idx = part * nk + (t * nkv + g) * d + i;
                    double sum = 0.0, mag = 0.0;
                    for (int h = g * group; h < (g + 1) * group; h++) {
                        double v = bf(b.dqkv[nq * (1 + part) + (t * nh + h) * d + i]);
                        sum += v;
                        mag += fabs(v);
                    }
                    got[idx] = bf(a.dqkv[nq + idx]);
                    want[idx] = sum;
                    tol[idx] = 1.01 * BF * (mag + fabs(sum)) + 64 * U * mag + 1e-30;
                }
    assert_close("gqa dk, dv", got, want, tol, 2 * nk);
    attn_free(&a), attn_free(&b);
    free(qkv), free(dout), free(rep), free(got), free(want), free(tol);
    qlora_ctx_free(ctx);
}
END_TEST

/* Workspace linear in T (float32 copies of the inputs, no T×T buffer), and bad packing rejected. */
START_TEST(test_attention_memory_linear_and_bad_seq_start) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t T = 1500;
    ql_attn_shape s = {T, 2, 1, 8};
    uint16_t *qkv = tu_random_bf16(&rng, T * 4 * 8, 1.0f), *dout = tu_random_bf16(&rng, T * 2 * 8, 1.0f);
    qlora_mem_reset_peak(ctx);
    attn_data r = attn_run(ctx, &s, NULL, qkv, dout);
    qlora_mem_stats st;
    ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
    /* backward: q, k, v, dout as float32 and D per (token, head), plus alignment padding */
    uint64_t linear = (uint64_t)(T * (2 * 8 + 8 + 8 + 2 * 8 + 2)) * 4 + 5 * 64;
    uint64_t peak = st.peak[0][QLORA_MEM_WORKSPACE] + st.peak[1][QLORA_MEM_WORKSPACE];
    ck_assert_msg(peak <= linear, "attention workspace peak %llu > %llu", (unsigned long long)peak,
                  (unsigned long long)linear);
    ck_assert_msg(peak < (uint64_t)T * T, "attention workspace is quadratic in T");
    int32_t bad[1500];
    for (int t = 0; t < T; t++)
        bad[t] = t < 10 ? 0 : 5;
    ck_assert_qlora_fails(ql_attention_forward(ctx, &s, qkv, qkv + T * 16, qkv + T * 24, bad, r.out, r.lse),
                          QLORA_ERR_INVALID_ARG, "seq_start[10]");
    ql_attn_shape odd = {T, 3, 2, 8};
    ck_assert_qlora_fails(ql_attention_forward(ctx, &odd, qkv, qkv, qkv, NULL, r.out, r.lse), QLORA_ERR_SHAPE,
                          "not a multiple");
    attn_free(&r);
    free(qkv), free(dout);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

/* ================================================================ cross-entropy */

typedef struct xent_ref {
    int64_t T, H, V;
    const double *w; /* [V, H] */
    const int32_t *labels;
    double denom;
} xent_ref;

/* FP64 loss of hidden x [T, H]; with lerr (NULL ok) the float32 logit error bound per token
 * (H·U·max_v Σ|h·w|) and with gabs (NULL ok) Σ_v |dloss/dlogit_v|·|w_v| per element. */
static double xent_loss_ref(const double *x, const xent_ref *a, double *lerr, double *gabs) {
    double total = 0.0, *z = tu_xmalloc((size_t)a->V * 8);
    for (int64_t t = 0; t < a->T; t++) {
        if (lerr)
            lerr[t] = 0.0;
        if (gabs)
            memset(gabs + t * a->H, 0, (size_t)a->H * 8);
        if (a->labels[t] == QL_IGNORE_INDEX)
            continue;
        double m = -INFINITY, amax = 0.0;
        for (int64_t v = 0; v < a->V; v++) {
            double dot = 0.0, aabs = 0.0;
            for (int64_t i = 0; i < a->H; i++) {
                dot += x[t * a->H + i] * a->w[v * a->H + i];
                aabs += fabs(x[t * a->H + i] * a->w[v * a->H + i]);
            }
            z[v] = dot;
            m = fmax(m, dot);
            amax = fmax(amax, aabs);
        }
        double l = 0.0;
        for (int64_t v = 0; v < a->V; v++)
            l += exp(z[v] - m);
        double lse = m + log(l);
        total += lse - z[a->labels[t]];
        if (lerr)
            lerr[t] = (a->H + 2) * U * amax;
        if (gabs)
            for (int64_t v = 0; v < a->V; v++) {
                double g = fabs(exp(z[v] - lse) - (v == a->labels[t])) / a->denom;
                for (int64_t i = 0; i < a->H; i++)
                    gabs[t * a->H + i] += g * fabs(a->w[v * a->H + i]);
            }
    }
    free(z);
    return total / a->denom;
}

static double xent_objective(const double *x, const void *arg) { return xent_loss_ref(x, arg, NULL, NULL); }

/* Loss: each float32 logit errs by ≤ lerr_t = (H+2)·U·max_v Σ|h·w|, so lse and the label's
 * logit by as much: |loss − e| ≤ Σ_t 2·lerr_t / denom (+ double rounding). dhidden: softmax's
 * relative error ≤ 2·lerr_t + 8U, then sgemm sums V products: tolerance
 * (2·lerr_t + (V+8)·U)·Σ_v|g_v|·|w_v| over the final BF16 rounding. Run for several chunk sizes
 * (1, one not dividing T, T, more than T, the default): each is held to the same bounds. */
START_TEST(test_cross_entropy_vs_fp64_and_chunks) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t T = 13, H = 24, V = 77;
    uint16_t *hidden = tu_random_bf16(&rng, T * H, 1.0f), *w = tu_random_bf16(&rng, V * H, 0.5f);
    int32_t labels[13];
    int64_t valid = 0;
    for (int t = 0; t < T; t++) {
        labels[t] = (t % 4 == 1) ? QL_IGNORE_INDEX : (int32_t)(tu_next(&rng) % V);
        valid += labels[t] != QL_IGNORE_INDEX;
    }
    double *x = to_doubles(hidden, T * H), *wd = to_doubles(w, V * H);
    xent_ref ref = {T, H, V, wd, labels, (double)valid};
    double *lerr = tu_xmalloc(T * 8), *gabs = tu_xmalloc(T * H * 8);
    double want = xent_loss_ref(x, &ref, lerr, gabs);
    double loss_tol = 1e-12 * fabs(want);
    for (int t = 0; t < T; t++)
        loss_tol += 2 * lerr[t] / (double)valid;
    double *fd = finite_diff(xent_objective, x, T * H, &ref), *fp32_tol = tu_xmalloc(T * H * 8);
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < H; i++)
            fp32_tol[t * H + i] = (2 * lerr[t] + (V + 8) * U) * gabs[t * H + i];

    const int64_t chunks[5] = {1, 5, 13, 64, 0};
    uint16_t *dh = tu_xmalloc(T * H * 2);
    for (int c = 0; c < 5; c++) {
        ql_xent_args a = {hidden, w, labels, T, H, V, chunks[c], 0.0};
        double loss = 0.0;
        int64_t count = -1;
        ck_assert_qlora_ok(ql_cross_entropy(ctx, &a, &loss, &count, dh));
        ck_assert_int_eq(count, valid);
        ck_assert_msg(fabs(loss - want) <= loss_tol, "chunk %lld: loss %.12g, fp64 %.12g, tol %.3g",
                      (long long)chunks[c], loss, want, loss_tol);
        char what[64];
        snprintf(what, sizeof what, "dhidden (chunk %lld)", (long long)chunks[c]);
        assert_grad(what, dh, fd, fp32_tol, T * H);
        for (int64_t t = 0; t < T; t++) /* ignored tokens get no gradient at all */
            if (labels[t] == QL_IGNORE_INDEX)
                for (int64_t i = 0; i < H; i++)
                    ck_assert_uint_eq(dh[t * H + i], 0);
    }

    /* a caller-given denominator (tokens over all micro-batches) scales loss and gradient */
    ql_xent_args a = {hidden, w, labels, T, H, V, 4, 40.0};
    double loss = 0.0;
    uint16_t *dh40 = tu_xmalloc(T * H * 2);
    ck_assert_qlora_ok(ql_cross_entropy(ctx, &a, &loss, NULL, dh40));
    ck_assert_msg(fabs(loss - want * valid / 40.0) <= loss_tol, "denom 40: loss %.12g", loss);
    ref.denom = 40.0;
    double *fd40 = finite_diff(xent_objective, x, T * H, &ref);
    for (int64_t i = 0; i < T * H; i++)
        fp32_tol[i] *= valid / 40.0;
    assert_grad("dhidden (denom 40)", dh40, fd40, fp32_tol, T * H);

    /* logits for tests and generation: the same float32 products */
    float *logits = tu_xmalloc(T * V * 4);
    ck_assert_qlora_ok(ql_lm_head_logits(ctx, hidden, w, T, H, V, logits));
    for (int64_t t = 0; t < T; t++)
        for (int64_t v = 0; v < V; v++) {
            double z = 0.0, zabs = 0.0;
            for (int64_t i = 0; i < H; i++) {
                z += x[t * H + i] * wd[v * H + i];
                zabs += fabs(x[t * H + i] * wd[v * H + i]);
            }
            ck_assert(fabs(logits[t * V + v] - z) <= (H + 2) * U * zabs);
        }
    free(hidden), free(w), free(x), free(wd), free(lerr), free(gabs), free(fd), free(fp32_tol), free(dh), free(dh40),
        free(fd40), free(logits);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

/* Every label ignored: loss 0, count 0, dhidden all zero (PyTorch's mean would be NaN); a label
 * outside the vocabulary is rejected by token. */
START_TEST(test_cross_entropy_ignored_and_bad_labels) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t T = 6, H = 8, V = 11;
    uint16_t *hidden = tu_random_bf16(&rng, T * H, 1.0f), *w = tu_random_bf16(&rng, V * H, 1.0f);
    uint16_t *dh = tu_random_bf16(&rng, T * H, 1.0f);
    int32_t labels[6] = {-100, -100, -100, -100, -100, -100};
    ql_xent_args a = {hidden, w, labels, T, H, V, 4, 0.0};
    double loss = 123.0;
    int64_t count = -1;
    ck_assert_qlora_ok(ql_cross_entropy(ctx, &a, &loss, &count, dh));
    ck_assert(loss == 0.0);
    ck_assert_int_eq(count, 0);
    for (int64_t i = 0; i < T * H; i++)
        ck_assert_uint_eq(dh[i], 0);
    labels[3] = (int32_t)V;
    ck_assert_qlora_fails(ql_cross_entropy(ctx, &a, &loss, &count, dh), QLORA_ERR_INVALID_ARG, "label[3] = 11");
    labels[3] = -1;
    ck_assert_qlora_fails(ql_cross_entropy(ctx, &a, &loss, &count, dh), QLORA_ERR_INVALID_ARG, "label[3] = -1");
    free(hidden), free(w), free(dh);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

/* ================================================================ embedding */

START_TEST(test_embedding_gather) {
    qlora_ctx *ctx = cpu_ctx();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t V = 19, H = 12, T = 7;
    uint16_t *table = tu_random_bf16(&rng, V * H, 1.0f), *out = tu_xmalloc(T * H * 2);
    int32_t ids[7];
    for (int t = 0; t < T; t++)
        ids[t] = (int32_t)(tu_next(&rng) % V);
    ck_assert_qlora_ok(ql_embedding_forward(ctx, table, V, H, ids, T, out));
    for (int t = 0; t < T; t++)
        ck_assert_mem_eq(out + t * H, table + ids[t] * H, (size_t)H * 2);
    ids[4] = (int32_t)V;
    ck_assert_qlora_fails(ql_embedding_forward(ctx, table, V, H, ids, T, out), QLORA_ERR_INVALID_ARG, "token 4");
    free(table), free(out);
    qlora_ctx_free(ctx);
}
END_TEST

static Suite *model_ops_suite(void) {
    Suite *s = suite_create("model_ops");
    TCase *tc = tcase_create("ops");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_rmsnorm_forward_backward);
    tcase_add_test(tc, test_rope_inv_freq_matches_transformers);
    tcase_add_test(tc, test_rope_table_and_apply_match_transformers);
    tcase_add_test(tc, test_rmsnorm_matches_transformers);
    tcase_add_test(tc, test_rope_forward_backward);
    tcase_add_test(tc, test_swiglu_forward_backward);
    tcase_add_test(tc, test_attention_forward_vs_fp64);
    tcase_add_test(tc, test_attention_backward_finite_differences);
    tcase_add_test(tc, test_attention_packed_equals_separate);
    tcase_add_test(tc, test_attention_gqa_equals_repeated_mha);
    tcase_add_test(tc, test_attention_memory_linear_and_bad_seq_start);
    tcase_add_test(tc, test_cross_entropy_vs_fp64_and_chunks);
    tcase_add_test(tc, test_cross_entropy_ignored_and_bad_labels);
    tcase_add_test(tc, test_embedding_gather);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(model_ops_suite()); }
