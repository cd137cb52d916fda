/*
 * The QLoRA linear layer on every backend (cpu-fast, cpu-reference, cuda:0 when present):
 * forward and backward against an FP64 evaluation of the formulas in include/qlora.h on the
 * dequantized weight, finite differences for dA, dB and dX, dropout masks, several adapters,
 * merging, the accountant, bad input; and lib/philox.h against Random123's known answers.
 *
 * Tolerances. Inputs are BF16 values and the weight is its dequantized float32 values, so the
 * FP64 evaluation is exact up to 1e-16; a library result v of an exact value e may differ by
 *  - its final rounding to BF16: 2^-8·|e| (relative half-ulp of an 8-bit significand);
 *  - the BF16 rounding of the intermediates H = dropout(X)·Aᵀ and G = dY·B, and on CUDA the
 *    rounding of partial outputs the 4-bit matmul accumulates onto: at most 4 roundings of
 *    2^-8 along the LoRA path, bounded by 2^-6 · Lab, where Lab is the LoRA path's sum of
 *    absolute values (|s| · Σ|H|·|B| with |H| itself taken as Σ|dropout(X)|·|A|);
 *  - FP32 accumulation: n·2^-24 times the sum of absolute products (the classic worst-case
 *    bound, n = the number of terms added), on the base path (Sab) and on the LoRA path.
 *  - on CUDA, the 4-bit matmuls multiply BF16-rounded weights (bitsandbytes' and the QLoRA
 *    paper's "dequantize to BF16, then a 16-bit matmul"): 2^-8 · Sab more (w_rel below).
 * So tol = 1.01·2^-8·|e| + (2^-6 + γ)·Lab + (γ + w_rel)·Sab. Real bugs (a missing scale, a
 * wrong mask, a transposed operand, a lost bias) move results by O(Lab) or O(|e|), far outside.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "linear_internal.h"
#include "philox.h"
#include "testutil.h"

/* ------------------------------------------------------------------ helpers */

static const double U = 1.0 / 16777216.0; /* 2^-24, float32 unit roundoff */

static double bf(uint16_t h) { return ql_bf16_to_f32(h); }

/* A host copy (malloc'ed) of any tensor the context reaches. */
static void *to_host(qlora_ctx *ctx, const qlora_tensor *t) {
    size_t n = qlora_tensor_nbytes(t);
    void *host = tu_xmalloc(n);
    qlora_tensor h = *t;
    h.data = host;
    h.device = QLORA_DEVICE_HOST;
    ck_assert_qlora_ok(qlora_tensor_copy(ctx, &h, t));
    return host;
}

static void from_host(qlora_ctx *ctx, qlora_tensor *t, const void *host) {
    qlora_tensor h = *t;
    h.data = (void *)host;
    h.device = QLORA_DEVICE_HOST;
    ck_assert_qlora_ok(qlora_tensor_copy(ctx, t, &h));
}

/* The dequantized weight as doubles. */
static double *dequantized(qlora_ctx *ctx, const qlora_qtensor *q) {
    int64_t shape[1] = {q->numel};
    qlora_tensor d = tu_device_tensor(ctx, "w32", QLORA_F32, 1, shape, NULL);
    ck_assert_qlora_ok(qlora_dequantize(ctx, q, &d));
    float *f = to_host(ctx, &d);
    double *w = tu_xmalloc((size_t)q->numel * sizeof(double));
    for (int64_t i = 0; i < q->numel; i++)
        w[i] = f[i];
    free(f);
    qlora_tensor_free(ctx, &d);
    return w;
}

static void assert_no_live_memory(qlora_ctx *ctx) {
    qlora_mem_stats st;
    ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
    ck_assert_uint_eq(st.total_current[0] + st.total_current[1], 0);
    ck_assert_uint_eq(st.live_allocations, 0);
}

static uint64_t category_bytes(qlora_ctx *ctx, qlora_mem_category c) {
    qlora_mem_stats st;
    ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
    return st.current[0][c] + st.current[1][c];
}

/* Asserts |got - want| <= tol element-wise; reports the worst element. */
static void assert_close(const char *what, const double *got, const double *want, const double *tol, int64_t n) {
    int64_t worst = -1, bad = 0;
    double worst_ratio = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double err = fabs(got[i] - want[i]);
        ck_assert_msg(isfinite(got[i]), "%s: element %lld is not finite", what, (long long)i);
        double ratio = err / tol[i];
        if (err > tol[i])
            bad++;
        if (ratio > worst_ratio || worst < 0) {
            worst_ratio = ratio;
            worst = i;
        }
    }
    ck_assert_msg(bad == 0, "%s: %lld of %lld elements out of tolerance; worst [%lld]: got %.9g, want %.9g, tol %.3g",
                  what, (long long)bad, (long long)n, (long long)worst, got[worst], want[worst], tol[worst]);
}

static double *bf16_to_doubles(const uint16_t *h, int64_t n) {
    double *d = tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++)
        d[i] = bf(h[i]);
    return d;
}

static double *grads_to_doubles(const void *g, qlora_dtype dtype, int64_t n) {
    if (dtype == QLORA_BF16)
        return bf16_to_doubles(g, n);
    double *d = tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++)
        d[i] = ((const float *)g)[i];
    return d;
}

/* ------------------------------------------------- the FP64 reference layer */

typedef struct ref_adapter {
    int r;
    double s;
    float p;          /* dropout applied (0 when not training) */
    uint64_t key, stream;
    double *a, *b;    /* [r, K], [N, r] */
} ref_adapter;

typedef struct ref_layer {
    int64_t m, k, n;
    double w_rel;     /* relative rounding of the weight values the backend multiplies */
    const double *w;  /* [N, K] */
    const double *bias;
    const uint16_t *x;
    int count;
    ref_adapter ad[QLORA_LINEAR_MAX_ADAPTERS];
} ref_layer;

/* dropout(X)[i, k] as the library defines it: bf16(x / (1 - p)) where kept. With `exact` the
 * product is not rounded (the differentiable function of the finite differences). */
static double ref_input(const ref_layer *L, const ref_adapter *a, const double *x, int64_t i, int64_t k, int exact) {
    int64_t idx = i * L->k + k;
    if (a->p == 0.0f)
        return x[idx];
    if (ql_philox_uniform(a->key, a->stream, (uint64_t)idx) < a->p)
        return 0.0;
    float scale = ql_lora_dropout_scale(a->p);
    return exact ? x[idx] * scale : ql_bf16_to_f32(ql_f32_to_bf16((float)x[idx] * scale));
}

static double mask_scale(const ref_adapter *a, const ref_layer *L, int64_t i, int64_t k) {
    if (a->p == 0.0f)
        return 1.0;
    return ql_philox_uniform(a->key, a->stream, (uint64_t)(i * L->k + k)) < a->p ? 0.0 : ql_lora_dropout_scale(a->p);
}

static double gamma_n(int64_t n) { return (double)(n + 2) * U; }

static int64_t rank_sum(const ref_layer *L) {
    int64_t r = 0;
    for (int a = 0; a < L->count; a++)
        r += L->ad[a].r;
    return r;
}

/* Exact H [M, r] per adapter and its absolute sums. */
static void ref_h(const ref_layer *L, const double *x, const ref_adapter *a, double *h, double *habs) {
    for (int64_t i = 0; i < L->m; i++)
        for (int j = 0; j < a->r; j++) {
            double s = 0, sa = 0;
            for (int64_t k = 0; k < L->k; k++) {
                double v = ref_input(L, a, x, i, k, 0) * a->a[j * L->k + k];
                s += v;
                sa += fabs(v);
            }
            h[i * a->r + j] = s;
            habs[i * a->r + j] = sa;
        }
}

/* Y exact and its tolerance; h_tol/h (optional) for adapter 0's H. */
static void ref_forward(const ref_layer *L, double *y, double *tol) {
    double *x = bf16_to_doubles(L->x, L->m * L->k);
    double *h[QLORA_LINEAR_MAX_ADAPTERS], *habs[QLORA_LINEAR_MAX_ADAPTERS];
    for (int a = 0; a < L->count; a++) {
        h[a] = tu_xmalloc((size_t)(L->m * L->ad[a].r) * sizeof(double));
        habs[a] = tu_xmalloc((size_t)(L->m * L->ad[a].r) * sizeof(double));
        ref_h(L, x, &L->ad[a], h[a], habs[a]);
    }
    double g = gamma_n(L->k + rank_sum(L));
    for (int64_t i = 0; i < L->m; i++)
        for (int64_t n = 0; n < L->n; n++) {
            double e = L->bias ? L->bias[n] : 0.0, sab = fabs(e), lab = 0.0;
            for (int64_t k = 0; k < L->k; k++) {
                double v = x[i * L->k + k] * L->w[n * L->k + k];
                e += v;
                sab += fabs(v);
            }
            for (int a = 0; a < L->count; a++) {
                const ref_adapter *ad = &L->ad[a];
                for (int j = 0; j < ad->r; j++) {
                    e += ad->s * h[a][i * ad->r + j] * ad->b[n * ad->r + j];
                    lab += fabs(ad->s) * habs[a][i * ad->r + j] * fabs(ad->b[n * ad->r + j]);
                }
            }
            y[i * L->n + n] = e;
            tol[i * L->n + n] = 1.01 * fabs(e) / 256.0 + (1.0 / 64.0 + g) * lab + (g + L->w_rel) * sab + 1e-30;
        }
    for (int a = 0; a < L->count; a++) {
        free(h[a]);
        free(habs[a]);
    }
    free(x);
}

/* Exact gradients with tolerances. dx/dx_tol may be NULL; da[a], db[a] per adapter. The grads
 * in `bf16_grads` mode also round their final value. */
typedef struct ref_grads {
    double *dx, *dx_tol;
    double *da[QLORA_LINEAR_MAX_ADAPTERS], *da_tol[QLORA_LINEAR_MAX_ADAPTERS];
    double *db[QLORA_LINEAR_MAX_ADAPTERS], *db_tol[QLORA_LINEAR_MAX_ADAPTERS];
} ref_grads;

static void ref_backward(const ref_layer *L, const uint16_t *dy16, ref_grads *out) {
    int64_t M = L->m, K = L->k, N = L->n;
    double *x = bf16_to_doubles(L->x, M * K);
    double *dy = bf16_to_doubles(dy16, M * N);
    double *gm[QLORA_LINEAR_MAX_ADAPTERS], *gabs[QLORA_LINEAR_MAX_ADAPTERS];
    for (int a = 0; a < L->count; a++) {
        const ref_adapter *ad = &L->ad[a];
        int r = ad->r;
        double *h = tu_xmalloc((size_t)(M * r) * sizeof(double)), *habs = tu_xmalloc((size_t)(M * r) * sizeof(double));
        ref_h(L, x, ad, h, habs);
        gm[a] = tu_xmalloc((size_t)(M * r) * sizeof(double));
        gabs[a] = tu_xmalloc((size_t)(M * r) * sizeof(double));
        for (int64_t i = 0; i < M; i++)
            for (int j = 0; j < r; j++) {
                double s = 0, sa = 0;
                for (int64_t n = 0; n < N; n++) {
                    s += dy[i * N + n] * ad->b[n * r + j];
                    sa += fabs(dy[i * N + n] * ad->b[n * r + j]);
                }
                gm[a][i * r + j] = s;
                gabs[a][i * r + j] = sa;
            }
        double g_db = gamma_n(M + K), g_da = gamma_n(M + N);
        for (int64_t n = 0; n < N; n++)
            for (int j = 0; j < r; j++) {
                double e = 0, ab = 0;
                for (int64_t i = 0; i < M; i++) {
                    e += dy[i * N + n] * h[i * r + j];
                    ab += fabs(dy[i * N + n]) * habs[i * r + j];
                }
                out->db[a][n * r + j] = ad->s * e;
                out->db_tol[a][n * r + j] = 1.01 * fabs(ad->s * e) / 256.0 + (1.0 / 128.0 + g_db) * fabs(ad->s) * ab +
                                            1e-30;
            }
        for (int j = 0; j < r; j++)
            for (int64_t k = 0; k < K; k++) {
                double e = 0, ab = 0;
                for (int64_t i = 0; i < M; i++) {
                    double in = ref_input(L, ad, x, i, k, 0);
                    e += gm[a][i * r + j] * in;
                    ab += gabs[a][i * r + j] * fabs(in);
                }
                out->da[a][j * K + k] = ad->s * e;
                out->da_tol[a][j * K + k] = 1.01 * fabs(ad->s * e) / 256.0 + (1.0 / 128.0 + g_da) * fabs(ad->s) * ab +
                                            1e-30;
            }
        free(h);
        free(habs);
    }
    if (out->dx) {
        double g = gamma_n(N + rank_sum(L));
        for (int64_t i = 0; i < M; i++)
            for (int64_t k = 0; k < K; k++) {
                double e = 0, sab = 0, lab = 0;
                for (int64_t n = 0; n < N; n++) {
                    e += dy[i * N + n] * L->w[n * K + k];
                    sab += fabs(dy[i * N + n] * L->w[n * K + k]);
                }
                for (int a = 0; a < L->count; a++) {
                    const ref_adapter *ad = &L->ad[a];
                    double ms = mask_scale(ad, L, i, k);
                    for (int j = 0; j < ad->r; j++) {
                        e += ad->s * ms * gm[a][i * ad->r + j] * ad->a[j * K + k];
                        lab += fabs(ad->s) * ms * gabs[a][i * ad->r + j] * fabs(ad->a[j * K + k]);
                    }
                }
                out->dx[i * K + k] = e;
                out->dx_tol[i * K + k] = 1.01 * fabs(e) / 256.0 + (1.0 / 64.0 + g) * lab + (g + L->w_rel) * sab + 1e-30;
            }
    }
    for (int a = 0; a < L->count; a++) {
        free(gm[a]);
        free(gabs[a]);
    }
    free(x);
    free(dy);
}

static void ref_grads_alloc(ref_grads *g, const ref_layer *L, int with_dx) {
    memset(g, 0, sizeof *g);
    if (with_dx) {
        g->dx = tu_xmalloc((size_t)(L->m * L->k) * sizeof(double));
        g->dx_tol = tu_xmalloc((size_t)(L->m * L->k) * sizeof(double));
    }
    for (int a = 0; a < L->count; a++) {
        size_t na = (size_t)(L->ad[a].r * L->k), nb = (size_t)(L->n * L->ad[a].r);
        g->da[a] = tu_xmalloc(na * sizeof(double));
        g->da_tol[a] = tu_xmalloc(na * sizeof(double));
        g->db[a] = tu_xmalloc(nb * sizeof(double));
        g->db_tol[a] = tu_xmalloc(nb * sizeof(double));
    }
}

static void ref_grads_free(ref_grads *g) {
    free(g->dx);
    free(g->dx_tol);
    for (int a = 0; a < QLORA_LINEAR_MAX_ADAPTERS; a++) {
        free(g->da[a]);
        free(g->da_tol[a]);
        free(g->db[a]);
        free(g->db_tol[a]);
    }
}

/* ------------------------------------------------ a layer on one backend */

typedef struct adapter_spec {
    const char *name;
    int rank;
    float alpha, dropout;
    int rslora;
    qlora_dtype grad_dtype;
} adapter_spec;

typedef struct case_spec {
    int64_t m, k, n;
    int blocksize, double_quant, bias;
    int nadapters;
    adapter_spec ad[3];
} case_spec;

/* Host data of a case, shared by every backend. */
typedef struct case_data {
    case_spec c;
    float *w;                  /* [N, K] float32 weights to quantize */
    uint16_t *bias;            /* [N] or NULL */
    uint16_t *x, *dy;          /* [M, K], [M, N] */
    uint16_t *b[3];            /* B values per adapter */
    uint64_t seed;
} case_data;

static case_data case_make(tu_rng *rng, const case_spec *c) {
    case_data d;
    memset(&d, 0, sizeof d);
    d.c = *c;
    d.w = tu_xmalloc((size_t)(c->n * c->k) * sizeof(float));
    tu_fill_normal(rng, d.w, c->n * c->k, (float)(1.0 / sqrt((double)c->k)));
    if (c->bias)
        d.bias = tu_random_bf16(rng, c->n, 0.5f);
    d.x = tu_random_bf16(rng, c->m * c->k, 1.0f);
    d.dy = tu_random_bf16(rng, c->m * c->n, 1.0f);
    for (int a = 0; a < c->nadapters; a++)
        d.b[a] = tu_random_bf16(rng, c->n * c->ad[a].rank, 0.3f);
    d.seed = tu_next(rng);
    return d;
}

static void case_free(case_data *d) {
    free(d->w);
    free(d->bias);
    free(d->x);
    free(d->dy);
    for (int a = 0; a < 3; a++)
        free(d->b[a]);
}

typedef struct layer {
    qlora_ctx *ctx;
    qlora_qtensor w;
    qlora_tensor bias, x, y, dy, dx;
    qlora_linear *lin;
    int ids[3];
} layer;

static qlora_lora_params spec_params(const adapter_spec *s, uint64_t seed) {
    qlora_lora_params p = qlora_lora_default_params();
    p.rank = s->rank;
    p.alpha = s->alpha;
    p.dropout = s->dropout;
    p.use_rslora = s->rslora;
    p.grad_dtype = s->grad_dtype;
    p.seed = seed;
    return p;
}

static void layer_make(layer *L, qlora_ctx *ctx, const case_data *d) {
    const case_spec *c = &d->c;
    memset(L, 0, sizeof *L);
    L->ctx = ctx;
    int64_t wshape[2] = {c->n, c->k}, xs[2] = {c->m, c->k}, ys[2] = {c->m, c->n}, bs[1] = {c->n};
    qlora_tensor w32 = tu_device_tensor(ctx, "model.layers.0.mlp.up_proj.weight", QLORA_F32, 2, wshape, d->w);
    qlora_quant_params qp = {QLORA_QUANT_NF4, c->blocksize, c->double_quant};
    ck_assert_qlora_ok(qlora_quantize(ctx, &w32, &qp, &L->w));
    qlora_tensor_free(ctx, &w32);
    if (d->bias)
        L->bias = tu_device_tensor(ctx, "model.layers.0.mlp.up_proj.bias", QLORA_BF16, 1, bs, d->bias);
    ck_assert_qlora_ok(qlora_linear_create(ctx, &L->w, d->bias ? &L->bias : NULL, &L->lin));
    for (int a = 0; a < c->nadapters; a++) {
        qlora_lora_params p = spec_params(&c->ad[a], d->seed + (uint64_t)a);
        ck_assert_qlora_ok(qlora_linear_add_adapter(L->lin, c->ad[a].name, &p, &L->ids[a]));
        qlora_tensor b;
        ck_assert_qlora_ok(qlora_linear_adapter_tensors(L->lin, L->ids[a], NULL, &b, NULL, NULL));
        from_host(ctx, &b, d->b[a]);
    }
    L->x = tu_device_tensor(ctx, "x", QLORA_BF16, 2, xs, d->x);
    L->y = tu_device_tensor(ctx, "y", QLORA_BF16, 2, ys, NULL);
    L->dy = tu_device_tensor(ctx, "dy", QLORA_BF16, 2, ys, d->dy);
    L->dx = tu_device_tensor(ctx, "dx", QLORA_BF16, 2, xs, NULL);
}

static void layer_free(layer *L) {
    qlora_linear_free(L->lin);
    qlora_qtensor_free(L->ctx, &L->w);
    qlora_tensor_free(L->ctx, &L->bias);
    qlora_tensor_free(L->ctx, &L->x);
    qlora_tensor_free(L->ctx, &L->y);
    qlora_tensor_free(L->ctx, &L->dy);
    qlora_tensor_free(L->ctx, &L->dx);
}

/* The FP64 model of a layer: its dequantized weight and adapters as they are on the device.
 * Only enabled adapters are included. Free with ref_free. */
static ref_layer ref_of(const layer *L, const case_data *d, int training, uint64_t stream) {
    ref_layer R;
    memset(&R, 0, sizeof R);
    R.m = d->c.m;
    R.k = d->c.k;
    R.n = d->c.n;
    R.w = dequantized(L->ctx, &L->w);
    R.w_rel = qlora_ctx_backend(L->ctx) == QLORA_BACKEND_CUDA ? 1.0 / 256.0 : 0.0;
    if (d->bias) {
        double *b = bf16_to_doubles(d->bias, d->c.n);
        R.bias = b;
    }
    R.x = d->x;
    for (int a = 0; a < d->c.nadapters; a++) {
        const ql_lora_adapter *ad = &L->lin->adapters[L->ids[a]];
        if (!ad->enabled)
            continue;
        ref_adapter *ra = &R.ad[R.count++];
        ra->r = ad->params.rank;
        ra->s = qlora_lora_scaling(&ad->params);
        ra->p = training ? ad->params.dropout : 0.0f;
        ra->key = ql_lora_key(ad->params.seed, L->w.name, ad->name);
        ck_assert_uint_eq(ra->key, ad->key);
        ra->stream = stream;
        uint16_t *a16 = to_host(L->ctx, &ad->a), *b16 = to_host(L->ctx, &ad->b);
        ra->a = bf16_to_doubles(a16, (int64_t)ra->r * R.k);
        ra->b = bf16_to_doubles(b16, R.n * ra->r);
        free(a16);
        free(b16);
    }
    return R;
}

static void ref_free(ref_layer *R) {
    free((void *)R->w);
    free((void *)R->bias);
    for (int a = 0; a < R->count; a++) {
        free(R->ad[a].a);
        free(R->ad[a].b);
    }
}

static double *y_of(const layer *L, const qlora_tensor *t) {
    uint16_t *h = to_host(L->ctx, t);
    double *d = bf16_to_doubles(h, qlora_tensor_numel(t));
    free(h);
    return d;
}

/* Compares the layer's forward output with the FP64 model. */
static void check_forward(const char *what, const layer *L, const ref_layer *R) {
    int64_t n = R->m * R->n;
    double *want = tu_xmalloc((size_t)n * sizeof(double)), *tol = tu_xmalloc((size_t)n * sizeof(double));
    ref_forward(R, want, tol);
    double *got = y_of(L, &L->y);
    assert_close(what, got, want, tol, n);
    free(got);
    free(want);
    free(tol);
}

/* Compares dx (unless NULL) and every saved adapter's gradients with the FP64 model; `times` =
 * how many identical backwards have accumulated into the gradients. */
static void check_backward(const char *what, const layer *L, const ref_layer *R, const uint16_t *dy, int with_dx,
                           int times) {
    ref_grads g;
    ref_grads_alloc(&g, R, with_dx);
    ref_backward(R, dy, &g);
    char label[512];
    if (with_dx) {
        double *got = y_of(L, &L->dx);
        snprintf(label, sizeof label, "%s: dx", what);
        assert_close(label, got, g.dx, g.dx_tol, R->m * R->k);
        free(got);
    }
    int a = 0;
    for (int i = 0; i < L->lin->count; i++) {
        const ql_lora_adapter *ad = &L->lin->adapters[i];
        if (!ad->enabled)
            continue;
        int64_t na = (int64_t)ad->params.rank * R->k, nb = R->n * ad->params.rank;
        void *da = to_host(L->ctx, &ad->da), *db = to_host(L->ctx, &ad->db);
        double *gda = grads_to_doubles(da, ad->params.grad_dtype, na);
        double *gdb = grads_to_doubles(db, ad->params.grad_dtype, nb);
        for (int64_t e = 0; e < na; e++) {
            g.da[a][e] *= times;
            g.da_tol[a][e] *= times;
        }
        for (int64_t e = 0; e < nb; e++) {
            g.db[a][e] *= times;
            g.db_tol[a][e] *= times;
        }
        snprintf(label, sizeof label, "%s: dA of '%s' (%s)", what, ad->name, qlora_dtype_name(ad->params.grad_dtype));
        assert_close(label, gda, g.da[a], g.da_tol[a], na);
        snprintf(label, sizeof label, "%s: dB of '%s'", what, ad->name);
        assert_close(label, gdb, g.db[a], g.db_tol[a], nb);
        free(da);
        free(db);
        free(gda);
        free(gdb);
        a++;
    }
    ref_grads_free(&g);
}

/* ----------------------------------------------------------------- shapes */

#define AD(name, r, alpha, p, rs, g) {name, r, alpha, p, rs, g}

/* M, K, N not multiples of 64 or of the fast path's tiles; in < 64; r in {1, 8, 64}; M = 1. */
static const case_spec shapes[] = {
    {1, 40, 24, 32, 0, 1, 1, {AD("default", 1, 16.0f, 0.1f, 0, QLORA_F32)}},
    {1, 257, 96, 64, 1, 0, 2, {AD("default", 8, 16.0f, 0.1f, 0, QLORA_BF16), AD("extra", 3, 6.0f, 0.0f, 1, QLORA_F32)}},
    {7, 40, 65, 32, 1, 1, 1, {AD("default", 64, 16.0f, 0.1f, 0, QLORA_F32)}},
    {33, 130, 77, 64, 1, 1, 2, {AD("default", 8, 16.0f, 0.1f, 1, QLORA_F32), AD("extra", 1, 2.0f, 0.0f, 0, QLORA_BF16)}},
    {100, 96, 200, 128, 0, 0, 1, {AD("default", 64, 32.0f, 0.05f, 0, QLORA_BF16)}},
    {64, 1000, 300, 64, 1, 1, 1, {AD("default", 16, 16.0f, 0.1f, 0, QLORA_F32)}},
    /* several adapters with dropout: dX adds each masked product (CUDA: dropout_add) */
    {9, 72, 50, 32, 1, 1, 3,
     {AD("default", 4, 16.0f, 0.1f, 0, QLORA_F32), AD("extra", 2, 4.0f, 0.2f, 0, QLORA_BF16),
      AD("third", 1, 2.0f, 0.0f, 1, QLORA_F32)}},
};
#define NSHAPES (sizeof shapes / sizeof shapes[0])

static void case_label(char *buf, size_t cap, const char *backend, const case_spec *c, int training) {
    snprintf(buf, cap, "%s M=%lld K=%lld N=%lld bs=%d dq=%d bias=%d adapters=%d r0=%d %s", backend, (long long)c->m,
             (long long)c->k, (long long)c->n, c->blocksize, c->double_quant, c->bias, c->nadapters, c->ad[0].rank,
             training ? "training" : "inference");
}

/* ------------------------------------------------------------------ Philox */

START_TEST(philox_matches_random123_known_answers) {
    /* Random123's kat_vectors for philox4x32-10 (as also pinned by TensorFlow's XLA tests):
     * counter, key -> output. */
    static const struct {
        uint32_t ctr[4], key[2], out[4];
    } kat[3] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
         {0xffffffff, 0xffffffff},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
         {0xa4093822, 0x299f31d0},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (int t = 0; t < 3; t++) {
        uint64_t seed = (uint64_t)kat[t].key[1] << 32 | kat[t].key[0];
        ql_philox_out o = ql_philox4x32(seed, kat[t].ctr[0], kat[t].ctr[1], kat[t].ctr[2], kat[t].ctr[3]);
        for (int e = 0; e < 4; e++)
            ck_assert_msg(o.v[e] == kat[t].out[e], "vector %d word %d: %08x != %08x", t, e, o.v[e], kat[t].out[e]);
    }
    /* The uniform: 24 bits of word index % 4 of counter {index / 4, stream, index >> 34}. */
    ql_philox_out o = ql_philox4x32(7, 5, 9, 0, 0);
    for (int e = 0; e < 4; e++)
        ck_assert_float_eq(ql_philox_uniform(7, 9, 20 + (uint64_t)e), (float)(o.v[e] >> 8) * 0x1p-24f);
    /* The four-at-a-time helper of the fast path equals it, also with 64-bit counters. */
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (int i = 0; i < 2000; i++) {
        uint64_t key = tu_next(&rng), stream = tu_next(&rng), group = tu_next(&rng) >> (i % 3 ? 40 : 2);
        float u[4];
        ql_lora_uniform4(key, stream, group, u);
        for (int e = 0; e < 4; e++) {
            float want = ql_philox_uniform(key, stream, 4 * group + (uint64_t)e);
            ck_assert_msg(u[e] == want && want >= 0.0f && want < 1.0f, "group %llu: %a vs %a",
                          (unsigned long long)group, (double)u[e], (double)want);
        }
    }
}
END_TEST

/* --------------------------------------------------- parameters, init */

START_TEST(defaults_and_scaling) {
    qlora_lora_params p = qlora_lora_default_params();
    ck_assert_int_eq(p.rank, 64);
    ck_assert_float_eq(p.alpha, 16.0f);
    ck_assert_int_eq(p.use_rslora, 0);
    ck_assert_float_eq(p.dropout, 0.1f);
    ck_assert_int_eq(p.grad_dtype, QLORA_BF16);
    ck_assert_float_eq(qlora_lora_scaling(&p), 0.25f);
    p.use_rslora = 1;
    ck_assert_float_eq(qlora_lora_scaling(&p), 2.0f);
    p.rank = 0;
    ck_assert(isnan(qlora_lora_scaling(&p)));
    ck_assert(isnan(qlora_lora_scaling(NULL)));
}
END_TEST

START_TEST(adapter_init_is_peft_and_reproducible) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {4, 300, 50, 64, 1, 0, 0, {{0}}};
    case_data d = case_make(&rng, &c);
    uint16_t *first = NULL;
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        layer L;
        layer_make(&L, ctx, &d);
        qlora_lora_params p = qlora_lora_default_params();
        p.rank = 16;
        p.seed = d.seed;
        int id, id2, id3;
        ck_assert_qlora_ok(qlora_linear_add_adapter(L.lin, "default", &p, &id));
        ck_assert_qlora_ok(qlora_linear_add_adapter(L.lin, "other", &p, &id2));
        p.seed++;
        ck_assert_qlora_ok(qlora_linear_add_adapter(L.lin, "third", &p, &id3));
        ck_assert_int_eq(id, 0);
        ck_assert_int_eq(id3, 2);
        int found;
        ck_assert_qlora_ok(qlora_linear_find_adapter(L.lin, "other", &found));
        ck_assert_int_eq(found, id2);
        ck_assert_qlora_fails(qlora_linear_find_adapter(L.lin, "nope", &found), QLORA_ERR_NOT_FOUND, "'nope'");
        qlora_lora_params back;
        ck_assert_qlora_ok(qlora_linear_adapter_params(L.lin, id3, &back));
        ck_assert_uint_eq(back.seed, d.seed + 1);
        ck_assert_int_eq(back.rank, 16);
        qlora_tensor a, bt, da, db, a2, a3;
        ck_assert_qlora_ok(qlora_linear_adapter_tensors(L.lin, id, &a, &bt, &da, &db));
        ck_assert_str_eq(a.name, "model.layers.0.mlp.up_proj.lora_A.default.weight");
        ck_assert_str_eq(bt.name, "model.layers.0.mlp.up_proj.lora_B.default.weight");
        ck_assert_str_eq(db.name, "model.layers.0.mlp.up_proj.lora_B.default.weight.grad");
        ck_assert_int_eq(a.ndim, 2);
        ck_assert_int_eq(a.shape[0], 16);
        ck_assert_int_eq(a.shape[1], 300);
        ck_assert_int_eq(bt.shape[0], 50);
        ck_assert_int_eq(bt.shape[1], 16);
        ck_assert_int_eq(a.dtype, QLORA_BF16);
        ck_assert_int_eq(da.dtype, QLORA_BF16);
        ck_assert_int_eq(a.device, qlora_ctx_device(ctx));
        ck_assert_qlora_ok(qlora_linear_adapter_tensors(L.lin, id2, &a2, NULL, NULL, NULL));
        ck_assert_qlora_ok(qlora_linear_adapter_tensors(L.lin, id3, &a3, NULL, NULL, NULL));
        uint16_t *ha = to_host(ctx, &a), *ha2 = to_host(ctx, &a2), *ha3 = to_host(ctx, &a3);
        uint16_t *hb = to_host(ctx, &bt), *hda = to_host(ctx, &da), *hdb = to_host(ctx, &db);
        /* PEFT: kaiming_uniform(a = sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in)) */
        double bound = 1.0 / sqrt(300.0), mean = 0, var = 0;
        int64_t n = 16 * 300, same2 = 0, same3 = 0;
        for (int64_t i = 0; i < n; i++) {
            double v = bf(ha[i]);
            ck_assert_msg(fabs(v) <= bound * (1 + 1.0 / 256), "A[%lld] = %g outside +-%g", (long long)i, v, bound);
            mean += v;
            var += v * v;
            same2 += ha[i] == ha2[i];
            same3 += ha[i] == ha3[i];
            float u = ql_philox_uniform(ql_lora_key(d.seed, L.w.name, "default"), QL_LORA_INIT_STREAM, (uint64_t)i);
            ck_assert_uint_eq(ha[i], ql_f32_to_bf16((2.0f * u - 1.0f) * (float)bound));
        }
        mean /= (double)n;
        var = var / (double)n - mean * mean;
        /* 4800 draws: the mean is within 5 standard errors (bound/sqrt(3n)); the variance of a
         * uniform is bound^2/3 */
        ck_assert_msg(fabs(mean) < 5 * bound / sqrt(3.0 * (double)n), "mean %g", mean);
        ck_assert_msg(fabs(var / (bound * bound / 3) - 1) < 0.1, "variance %g vs %g", var, bound * bound / 3);
        /* other names or seeds give other draws */
        ck_assert_int_lt(same2, n / 20);
        ck_assert_int_lt(same3, n / 20);
        for (int64_t i = 0; i < 50 * 16; i++)
            ck_assert(hb[i] == 0 && hda[i] == 0 && hdb[i] == 0);
        if (!first)
            first = ha;
        else {
            ck_assert_mem_eq(first, ha, (size_t)n * 2); /* identical on every backend */
            free(ha);
        }
        free(ha2);
        free(ha3);
        free(hb);
        free(hda);
        free(hdb);
        layer_free(&L);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    free(first);
    case_free(&d);
}
END_TEST

/* ------------------------------------------ forward / backward vs FP64 */

START_TEST(forward_and_backward_match_fp64) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (size_t s = 0; s < NSHAPES; s++) {
        case_data d = case_make(&rng, &shapes[s]);
        uint64_t stream = tu_next(&rng) >> 1;
        for (int b = 0; b < nb; b++) {
            qlora_ctx *ctx = tu_ctx(&bs[b]);
            layer L;
            layer_make(&L, ctx, &d);
            for (int training = 0; training < 2; training++) {
                char what[256];
                case_label(what, sizeof what, bs[b].name, &d.c, training);
                qlora_linear_fwd_opts o = {training, stream};
                qlora_linear_saved saved = {0};
                ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &o, &saved));
                ck_assert_int_eq(saved.count, d.c.nadapters);
                ck_assert_int_eq(saved.rows, d.c.m);
                ref_layer R = ref_of(&L, &d, training, stream);
                check_forward(what, &L, &R);
                /* the saved H is bf16(dropout(X)·Aᵀ) */
                for (int a = 0; a < R.count; a++) {
                    int64_t nh = d.c.m * R.ad[a].r;
                    double *x = bf16_to_doubles(d.x, d.c.m * d.c.k);
                    double *h = tu_xmalloc((size_t)nh * 8), *habs = tu_xmalloc((size_t)nh * 8), *tol = tu_xmalloc((size_t)nh * 8);
                    ref_h(&R, x, &R.ad[a], h, habs);
                    for (int64_t i = 0; i < nh; i++)
                        tol[i] = 1.01 * fabs(h[i]) / 256 + gamma_n(d.c.k) * habs[i] + 1e-30;
                    double *got = y_of(&L, &saved.h[a]);
                    assert_close("saved H", got, h, tol, nh);
                    free(got);
                    free(x);
                    free(h);
                    free(habs);
                    free(tol);
                }
                /* backward twice: the gradients accumulate */
                ck_assert_qlora_ok(qlora_linear_zero_grads(L.lin));
                ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &saved, &L.dx));
                check_backward(what, &L, &R, d.dy, 1, 1);
                ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &saved, NULL));
                check_backward(what, &L, &R, d.dy, 0, 2);
                qlora_linear_saved_free(&saved);
                ck_assert_ptr_null(saved.layer);
                ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ACTIVATIONS), 0);
                ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_WORKSPACE),
                                  qlora_tensor_nbytes(&L.x) * 2 + qlora_tensor_nbytes(&L.y) * 2 +
                                      (d.bias ? qlora_tensor_nbytes(&L.bias) : 0));
                ref_free(&R);
            }
            layer_free(&L);
            assert_no_live_memory(ctx);
            qlora_ctx_free(ctx);
        }
        case_free(&d);
    }
}
END_TEST

/* x [2, 3, K] is the same as x [6, K]; M = 0 does nothing. */
START_TEST(leading_dimensions_flatten) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {6, 72, 40, 64, 1, 1, 1, {AD("default", 4, 8.0f, 0.0f, 0, QLORA_BF16)}};
    case_data d = case_make(&rng, &c);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        layer L;
        layer_make(&L, ctx, &d);
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, NULL, NULL));
        uint16_t *flat = to_host(ctx, &L.y);
        qlora_tensor x3 = L.x, y3 = L.y;
        x3.ndim = y3.ndim = 3;
        x3.shape[0] = y3.shape[0] = 2;
        x3.shape[1] = y3.shape[1] = 3;
        x3.shape[2] = 72;
        y3.shape[2] = 40;
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &x3, &y3, NULL, NULL));
        uint16_t *shaped = to_host(ctx, &L.y);
        ck_assert_mem_eq(flat, shaped, 6 * 40 * 2);
        y3.shape[1] = 2;
        ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x3, &y3, NULL, NULL), QLORA_ERR_SHAPE, "leading");
        /* M = 0: nothing to compute, nothing written */
        qlora_tensor x0 = L.x, y0 = L.y;
        x0.shape[0] = y0.shape[0] = 0;
        qlora_linear_saved saved = {0};
        qlora_linear_fwd_opts o = {1, 3};
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &x0, &y0, &o, &saved));
        ck_assert_int_eq(saved.rows, 0);
        ck_assert_qlora_ok(qlora_linear_backward(L.lin, &x0, &y0, &saved, &x0));
        qlora_linear_saved_free(&saved);
        uint16_t *after = to_host(ctx, &L.y);
        ck_assert_mem_eq(flat, after, 6 * 40 * 2);
        free(flat);
        free(shaped);
        free(after);
        layer_free(&L);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    case_free(&d);
}
END_TEST

/* ------------------------------------------------------ finite differences */

/* L = Σ R ⊙ f(X, A, B) in FP64 with dropout(x) = mask · x / (1 - p), unrounded. */
static double loss(const ref_layer *R, const double *x, const double *dy) {
    double total = 0.0;
    for (int64_t i = 0; i < R->m; i++) {
        double *h[QLORA_LINEAR_MAX_ADAPTERS];
        for (int a = 0; a < R->count; a++) {
            h[a] = tu_xmalloc((size_t)R->ad[a].r * sizeof(double));
            for (int j = 0; j < R->ad[a].r; j++)
                for (int64_t k = 0; k < R->k; k++)
                    h[a][j] += ref_input(R, &R->ad[a], x, i, k, 1) * R->ad[a].a[j * R->k + k];
        }
        for (int64_t n = 0; n < R->n; n++) {
            double f = R->bias ? R->bias[n] : 0.0;
            for (int64_t k = 0; k < R->k; k++)
                f += x[i * R->k + k] * R->w[n * R->k + k];
            for (int a = 0; a < R->count; a++)
                for (int j = 0; j < R->ad[a].r; j++)
                    f += R->ad[a].s * h[a][j] * R->ad[a].b[n * R->ad[a].r + j];
            total += dy[i * R->n + n] * f;
        }
        for (int a = 0; a < R->count; a++)
            free(h[a]);
    }
    return total;
}

/* Central difference of the loss in one parameter (the loss is affine in each parameter, so the
 * difference is exact up to FP64 rounding). */
static double central(const ref_layer *R, double *param, const double *x, const double *dy) {
    double keep = *param, step = 0.25;
    *param = keep + step;
    double up = loss(R, x, dy);
    *param = keep - step;
    double down = loss(R, x, dy);
    *param = keep;
    return (up - down) / (2 * step);
}

START_TEST(gradients_match_finite_differences) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    /* p = 0.5: the dropout scale 2 is exact in BF16, so the library's bf16(x·2) is the
     * differentiable x·2 and the check needs no allowance for it. Two adapters, one with dropout. */
    case_spec c = {9, 70, 33, 32, 1, 1, 2,
                   {AD("default", 4, 8.0f, 0.5f, 0, QLORA_F32), AD("extra", 2, 3.0f, 0.0f, 1, QLORA_F32)}};
    case_data d = case_make(&rng, &c);
    uint64_t stream = tu_next(&rng) >> 1;
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        layer L;
        layer_make(&L, ctx, &d);
        qlora_linear_fwd_opts o = {1, stream};
        qlora_linear_saved saved = {0};
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &o, &saved));
        ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &saved, &L.dx));
        qlora_linear_saved_free(&saved);
        ref_layer R = ref_of(&L, &d, 1, stream);
        ref_grads g;
        ref_grads_alloc(&g, &R, 1);
        ref_backward(&R, d.dy, &g);
        double *x = bf16_to_doubles(d.x, c.m * c.k), *dy = bf16_to_doubles(d.dy, c.m * c.n);
        double *dx = y_of(&L, &L.dx);
        for (int t = 0; t < 24; t++) {
            int64_t i = (int64_t)(tu_next(&rng) % (uint64_t)c.m), k = (int64_t)(tu_next(&rng) % (uint64_t)c.k);
            int64_t e = i * c.k + k;
            double fd = central(&R, &x[e], x, dy);
            /* the FP64 analytic gradient (what the tolerances are built on) is the derivative */
            ck_assert_msg(fabs(fd - g.dx[e]) <= 1e-9 * (1 + fabs(fd)), "dX[%lld]: fd %.12g vs analytic %.12g",
                          (long long)e, fd, g.dx[e]);
            ck_assert_msg(fabs(dx[e] - fd) <= g.dx_tol[e], "%s dX[%lld]: library %.9g vs fd %.9g (tol %.3g)",
                          bs[b].name, (long long)e, dx[e], fd, g.dx_tol[e]);
        }
        for (int a = 0; a < 2; a++) {
            const ql_lora_adapter *ad = &L.lin->adapters[a];
            int r = ad->params.rank;
            float *da = to_host(ctx, &ad->da), *db = to_host(ctx, &ad->db);
            for (int t = 0; t < 12; t++) {
                int64_t ea = (int64_t)(tu_next(&rng) % (uint64_t)(r * c.k));
                int64_t eb = (int64_t)(tu_next(&rng) % (uint64_t)(c.n * r));
                double fa = central(&R, &R.ad[a].a[ea], x, dy), fb = central(&R, &R.ad[a].b[eb], x, dy);
                ck_assert_msg(fabs(fa - g.da[a][ea]) <= 1e-9 * (1 + fabs(fa)), "dA: fd %.12g vs analytic %.12g", fa,
                              g.da[a][ea]);
                ck_assert_msg(fabs(fb - g.db[a][eb]) <= 1e-9 * (1 + fabs(fb)), "dB: fd %.12g vs analytic %.12g", fb,
                              g.db[a][eb]);
                ck_assert_msg(fabs(da[ea] - fa) <= g.da_tol[a][ea], "%s dA%d[%lld]: %.9g vs fd %.9g (tol %.3g)",
                              bs[b].name, a, (long long)ea, (double)da[ea], fa, g.da_tol[a][ea]);
                ck_assert_msg(fabs(db[eb] - fb) <= g.db_tol[a][eb], "%s dB%d[%lld]: %.9g vs fd %.9g (tol %.3g)",
                              bs[b].name, a, (long long)eb, (double)db[eb], fb, g.db_tol[a][eb]);
            }
            free(da);
            free(db);
        }
        free(x);
        free(dy);
        free(dx);
        ref_grads_free(&g);
        ref_free(&R);
        layer_free(&L);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    case_free(&d);
}
END_TEST

/* ---------------------------------------------------------------- dropout */

/* A layer that shows its dropout mask: W = 0, r = in, A = I, B = I (out = r), alpha = r (s = 1),
 * so y = H = bf16(dropout(x)) = dropout(x) exactly. */
typedef struct mask_layer {
    qlora_ctx *ctx;
    qlora_qtensor w;
    qlora_linear *lin;
    qlora_tensor x, y;
} mask_layer;

enum { MASK_M = 33, MASK_K = 40 };

static void mask_layer_make(mask_layer *ml, qlora_ctx *ctx, const uint16_t *x, float p, uint64_t seed) {
    memset(ml, 0, sizeof *ml);
    ml->ctx = ctx;
    int64_t wshape[2] = {MASK_K, MASK_K}, xs[2] = {MASK_M, MASK_K};
    float *zeros = tu_xmalloc(MASK_K * MASK_K * sizeof(float));
    qlora_tensor w32 = tu_device_tensor(ctx, "mask.weight", QLORA_F32, 2, wshape, zeros);
    free(zeros);
    ck_assert_qlora_ok(qlora_quantize(ctx, &w32, NULL, &ml->w));
    qlora_tensor_free(ctx, &w32);
    ck_assert_qlora_ok(qlora_linear_create(ctx, &ml->w, NULL, &ml->lin));
    qlora_lora_params lp = qlora_lora_default_params();
    lp.rank = MASK_K;
    lp.alpha = MASK_K;
    lp.dropout = p;
    lp.seed = seed;
    int id;
    ck_assert_qlora_ok(qlora_linear_add_adapter(ml->lin, "default", &lp, &id));
    uint16_t eye[MASK_K * MASK_K];
    memset(eye, 0, sizeof eye);
    for (int i = 0; i < MASK_K; i++)
        eye[i * MASK_K + i] = ql_f32_to_bf16(1.0f);
    qlora_tensor a, b;
    ck_assert_qlora_ok(qlora_linear_adapter_tensors(ml->lin, id, &a, &b, NULL, NULL));
    from_host(ctx, &a, eye);
    from_host(ctx, &b, eye);
    ml->x = tu_device_tensor(ctx, "x", QLORA_BF16, 2, xs, x);
    ml->y = tu_device_tensor(ctx, "y", QLORA_BF16, 2, xs, NULL);
}

static uint16_t *mask_forward(mask_layer *ml, int training, uint64_t stream) {
    qlora_linear_fwd_opts o = {training, stream};
    ck_assert_qlora_ok(qlora_linear_forward(ml->lin, &ml->x, &ml->y, &o, NULL));
    return to_host(ml->ctx, &ml->y);
}

static void mask_layer_free(mask_layer *ml) {
    qlora_linear_free(ml->lin);
    qlora_qtensor_free(ml->ctx, &ml->w);
    qlora_tensor_free(ml->ctx, &ml->x);
    qlora_tensor_free(ml->ctx, &ml->y);
}

START_TEST(dropout_masks_are_the_rng_on_every_backend) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    uint16_t *x = tu_random_bf16(&rng, MASK_M * MASK_K, 1.0f);
    for (int i = 0; i < MASK_M * MASK_K; i++)
        if (x[i] == 0 || x[i] == 0x8000)
            x[i] = ql_f32_to_bf16(0.5f); /* a kept element must be visible */
    uint64_t seed = tu_next(&rng), stream = tu_next(&rng) >> 1;
    const float p = 0.3f;
    uint64_t key = ql_lora_key(seed, "mask.weight", "default");
    uint16_t *first = NULL;
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        mask_layer ml;
        mask_layer_make(&ml, ctx, x, p, seed);
        uint16_t *y = mask_forward(&ml, 1, stream);
        int kept = 0;
        float scale = ql_lora_dropout_scale(p);
        for (int i = 0; i < MASK_M * MASK_K; i++) {
            int keep = ql_philox_uniform(key, stream, (uint64_t)i) >= p;
            uint16_t want = keep ? ql_f32_to_bf16(ql_bf16_to_f32(x[i]) * scale) : 0;
            ck_assert_msg(y[i] == want || (!keep && y[i] == 0x8000), "%s: element %d: %04x, want %04x (keep %d)",
                          bs[b].name, i, y[i], want, keep);
            kept += keep;
        }
        /* 1320 Bernoulli(0.7) draws: within 5 standard deviations (about 83) of 924 */
        ck_assert_msg(abs(kept - 924) < 83, "kept %d of 1320", kept);
        /* same stream: identical; another stream: another mask; inference: no dropout */
        uint16_t *again = mask_forward(&ml, 1, stream);
        ck_assert_mem_eq(y, again, MASK_M * MASK_K * 2);
        uint16_t *other = mask_forward(&ml, 1, stream + 1);
        int differ = 0;
        for (int i = 0; i < MASK_M * MASK_K; i++)
            differ += (other[i] == 0) != (y[i] == 0);
        ck_assert_int_gt(differ, 200);
        uint16_t *eval = mask_forward(&ml, 0, stream);
        ck_assert_mem_eq(eval, x, MASK_M * MASK_K * 2);
        if (!first)
            first = y;
        else {
            ck_assert_mem_eq(first, y, MASK_M * MASK_K * 2); /* bit for bit across backends */
            free(y);
        }
        free(again);
        free(other);
        free(eval);
        mask_layer_free(&ml);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    free(first);
    free(x);
}
END_TEST

START_TEST(dropout_zero_is_no_dropout) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {17, 100, 45, 64, 1, 1, 1, {AD("default", 8, 16.0f, 0.0f, 0, QLORA_F32)}};
    case_data d = case_make(&rng, &c);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        layer L;
        layer_make(&L, ctx, &d);
        qlora_linear_saved s1 = {0}, s2 = {0};
        qlora_linear_fwd_opts train = {1, 77}, eval = {0, 0};
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &train, &s1));
        uint16_t *y1 = to_host(ctx, &L.y);
        ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &s1, &L.dx));
        uint16_t *dx1 = to_host(ctx, &L.dx);
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &eval, &s2));
        uint16_t *y2 = to_host(ctx, &L.y);
        ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &s2, &L.dx));
        uint16_t *dx2 = to_host(ctx, &L.dx);
        ck_assert_mem_eq(y1, y2, (size_t)(c.m * c.n) * 2);
        ck_assert_mem_eq(dx1, dx2, (size_t)(c.m * c.k) * 2);
        uint16_t *h1 = to_host(ctx, &s1.h[0]), *h2 = to_host(ctx, &s2.h[0]);
        ck_assert_mem_eq(h1, h2, (size_t)(c.m * 8) * 2);
        free(h1);
        free(h2);
        qlora_linear_saved_free(&s1);
        qlora_linear_saved_free(&s2);
        free(y1);
        free(y2);
        free(dx1);
        free(dx2);
        layer_free(&L);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    case_free(&d);
}
END_TEST

/* -------------------------------------------------- backends agree */

/* Every backend against cpu-reference on the same inputs: the fast path and CUDA differ from it
 * by FP32 summation order and where they round, so by at most one more BF16 ulp (2^-8·|e| on
 * top of the FP64 tolerance) plus accumulation (and on CUDA the BF16 weights). */
static void agree_tolerances(ref_layer *R, const uint16_t *dy, double w_rel, double *y_tol, double *dx_tol) {
    R->w_rel = w_rel;
    double *want = tu_xmalloc((size_t)(R->m * R->n) * 8);
    ref_forward(R, want, y_tol);
    for (int64_t i = 0; i < R->m * R->n; i++)
        y_tol[i] += 1.01 * fabs(want[i]) / 256;
    ref_grads rg;
    ref_grads_alloc(&rg, R, 1);
    ref_backward(R, dy, &rg);
    for (int64_t i = 0; i < R->m * R->k; i++)
        dx_tol[i] = rg.dx_tol[i] + 1.01 * fabs(rg.dx[i]) / 256;
    ref_grads_free(&rg);
    free(want);
}

START_TEST(backends_agree_with_the_reference) {
    tu_backend bs[5];
    int nb = tu_backends(bs);
    /* and the fast path cut into other tiles: three threads */
    bs[nb].name = "cpu-fast-3-threads";
    bs[nb].params = qlora_ctx_default_params();
    bs[nb++].params.num_threads = 3;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {70, 200, 150, 64, 1, 1, 2,
                   {AD("default", 16, 16.0f, 0.1f, 0, QLORA_F32), AD("extra", 5, 10.0f, 0.0f, 0, QLORA_F32)}};
    case_data d = case_make(&rng, &c);
    uint64_t stream = tu_next(&rng) >> 1;
    double *ref_y = NULL, *ref_dx = NULL;
    float *ref_g[4] = {NULL};
    int64_t gsize[4] = {16 * 200, 150 * 16, 5 * 200, 150 * 5};
    double *y_tol = tu_xmalloc((size_t)(c.m * c.n) * 8), *dx_tol = tu_xmalloc((size_t)(c.m * c.k) * 8);
    ref_layer R;
    memset(&R, 0, sizeof R);
    for (int pass = 0; pass < 2; pass++) /* reference first, then the others */
        for (int b = 0; b < nb; b++) {
            int is_ref = bs[b].params.cpu_kernels == QLORA_CPU_REFERENCE && bs[b].params.backend == QLORA_BACKEND_CPU;
            if (is_ref != (pass == 0))
                continue;
            qlora_ctx *ctx = tu_ctx(&bs[b]);
            layer L;
            layer_make(&L, ctx, &d);
            qlora_linear_fwd_opts o = {1, stream};
            qlora_linear_saved saved = {0};
            ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &o, &saved));
            ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &saved, &L.dx));
            qlora_linear_saved_free(&saved);
            double *y = y_of(&L, &L.y), *dx = y_of(&L, &L.dx);
            float *g[4];
            for (int a = 0; a < 2; a++) {
                g[2 * a] = to_host(ctx, &L.lin->adapters[a].da);
                g[2 * a + 1] = to_host(ctx, &L.lin->adapters[a].db);
            }
            if (pass == 0) {
                ref_y = y;
                ref_dx = dx;
                memcpy(ref_g, g, sizeof g);
                R = ref_of(&L, &d, 1, stream);
            } else {
                int cuda = bs[b].params.backend == QLORA_BACKEND_CUDA;
                agree_tolerances(&R, d.dy, cuda ? 1.0 / 256 : 0.0, y_tol, dx_tol);
                char what[128];
                snprintf(what, sizeof what, "%s vs cpu-reference: y", bs[b].name);
                assert_close(what, y, ref_y, y_tol, c.m * c.n);
                snprintf(what, sizeof what, "%s vs cpu-reference: dx", bs[b].name);
                assert_close(what, dx, ref_dx, dx_tol, c.m * c.k);
                for (int t = 0; t < 4; t++) {
                    /* F32 gradients: within 2^-6 of the largest one (one-ulp flips of the BF16
                     * H and G, and on CUDA the BF16 rounding of dropout(X)) */
                    double mx = 0;
                    for (int64_t i = 0; i < gsize[t]; i++)
                        mx = fmax(mx, fabs(ref_g[t][i]));
                    for (int64_t i = 0; i < gsize[t]; i++)
                        ck_assert_msg(fabs(g[t][i] - ref_g[t][i]) <= mx / 64,
                                      "%s: gradient %d[%lld]: %g vs reference %g", bs[b].name, t, (long long)i,
                                      (double)g[t][i], (double)ref_g[t][i]);
                    free(g[t]);
                }
                free(y);
                free(dx);
            }
            layer_free(&L);
            assert_no_live_memory(ctx);
            qlora_ctx_free(ctx);
        }
    ref_free(&R);
    free(ref_y);
    free(ref_dx);
    free(y_tol);
    free(dx_tol);
    for (int t = 0; t < 4; t++)
        free(ref_g[t]);
    case_free(&d);
}
END_TEST

/* ------------------------------------------------ several adapters, merge */

START_TEST(adapters_enable_and_disable) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {12, 90, 50, 64, 1, 1, 3,
                   {AD("a", 4, 8.0f, 0.1f, 0, QLORA_F32), AD("b", 8, 4.0f, 0.0f, 1, QLORA_F32),
                    AD("c", 2, 2.0f, 0.0f, 0, QLORA_BF16)}};
    case_data d = case_make(&rng, &c);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        layer L;
        layer_make(&L, ctx, &d);
        /* no adapters enabled: the base layer, bit for bit */
        layer base;
        case_data d0 = d;
        d0.c.nadapters = 0;
        layer_make(&base, ctx, &d0);
        ck_assert_qlora_ok(qlora_linear_forward(base.lin, &base.x, &base.y, NULL, NULL));
        uint16_t *want = to_host(ctx, &base.y);
        for (int a = 0; a < 3; a++)
            ck_assert_qlora_ok(qlora_linear_adapter_enable(L.lin, L.ids[a], 0));
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, NULL, NULL));
        uint16_t *got = to_host(ctx, &L.y);
        ck_assert_mem_eq(got, want, (size_t)(c.m * c.n) * 2);
        free(got);
        free(want);
        layer_free(&base);
        /* each subset against the FP64 model of that subset */
        for (int mask = 1; mask < 8; mask++) {
            for (int a = 0; a < 3; a++)
                ck_assert_qlora_ok(qlora_linear_adapter_enable(L.lin, L.ids[a], (mask >> a) & 1));
            ck_assert_qlora_ok(qlora_linear_zero_grads(L.lin));
            qlora_linear_fwd_opts o = {1, (uint64_t)mask};
            qlora_linear_saved saved = {0};
            ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &o, &saved));
            ck_assert_int_eq(saved.count, __builtin_popcount((unsigned)mask));
            char what[64];
            snprintf(what, sizeof what, "%s adapters %d%d%d", bs[b].name, mask & 1, mask >> 1 & 1, mask >> 2 & 1);
            ref_layer R = ref_of(&L, &d, 1, (uint64_t)mask);
            check_forward(what, &L, &R);
            /* toggling between forward and backward does not matter: backward uses `saved` */
            ck_assert_qlora_ok(qlora_linear_adapter_enable(L.lin, L.ids[0], !(mask & 1)));
            ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &saved, &L.dx));
            ck_assert_qlora_ok(qlora_linear_adapter_enable(L.lin, L.ids[0], mask & 1));
            check_backward(what, &L, &R, d.dy, 1, 1);
            /* disabled adapters' gradients stay zero */
            for (int a = 0; a < 3; a++) {
                if ((mask >> a) & 1)
                    continue;
                const ql_lora_adapter *ad = &L.lin->adapters[a];
                unsigned char *da = to_host(ctx, &ad->da);
                for (size_t i = 0; i < qlora_tensor_nbytes(&ad->da); i++)
                    ck_assert_uint_eq(da[i], 0);
                free(da);
            }
            qlora_linear_saved_free(&saved);
            ref_free(&R);
        }
        layer_free(&L);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    case_free(&d);
}
END_TEST

/* Merge: the weight becomes quantize(dequant(W) + s·B·A), within NF4's rounding of the target. */
static void check_merged_weight(qlora_ctx *ctx, const qlora_qtensor *w, const double *target, int64_t n_dim,
                                int64_t k_dim, const char *what) {
    double *got = dequantized(ctx, w);
    /* per block: |error| <= half the largest NF4 gap (0.1523) times the block's absmax, which
     * double quantization may round up by ~1%: 0.16 · max|target| */
    int bsz = w->blocksize;
    int64_t numel = n_dim * k_dim;
    double err2 = 0, sig2 = 0;
    for (int64_t b0 = 0; b0 < numel; b0 += bsz) {
        double amax = 0;
        for (int64_t i = b0; i < numel && i < b0 + bsz; i++)
            amax = fmax(amax, fabs(target[i]));
        for (int64_t i = b0; i < numel && i < b0 + bsz; i++) {
            ck_assert_msg(fabs(got[i] - target[i]) <= 0.16 * amax + 1e-7, "%s: element %lld: %g vs target %g", what,
                          (long long)i, got[i], target[i]);
            err2 += (got[i] - target[i]) * (got[i] - target[i]);
            sig2 += target[i] * target[i];
        }
    }
    /* NF4 on Gaussian-like data: relative RMS error about 0.1 */
    ck_assert_msg(sqrt(err2 / sig2) < 0.13, "%s: relative RMS error %g", what, sqrt(err2 / sig2));
    free(got);
}

START_TEST(merge_folds_the_adapter_into_the_weight) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {20, 128, 96, 64, 1, 1, 2,
                   {AD("default", 8, 16.0f, 0.1f, 0, QLORA_BF16), AD("extra", 4, 4.0f, 0.0f, 0, QLORA_BF16)}};
    case_data d = case_make(&rng, &c);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        for (int relayout = 0; relayout < 2; relayout++) {
            layer L;
            layer_make(&L, ctx, &d);
            ck_assert_qlora_ok(qlora_linear_adapter_enable(L.lin, L.ids[1], 0));
            ref_layer R = ref_of(&L, &d, 0, 0);
            double *target = tu_xmalloc((size_t)(c.n * c.k) * 8);
            for (int64_t n = 0; n < c.n; n++)
                for (int64_t k = 0; k < c.k; k++) {
                    double v = R.w[n * c.k + k];
                    for (int j = 0; j < R.ad[0].r; j++)
                        v += R.ad[0].s * R.ad[0].b[n * R.ad[0].r + j] * R.ad[0].a[j * c.k + k];
                    target[n * c.k + k] = v;
                }
            ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, NULL, NULL));
            double *y_adapter = y_of(&L, &L.y);
            qlora_quant_params rq = {QLORA_QUANT_NF4, 32, 0};
            uint8_t *old_codes = L.w.codes;
            ck_assert_qlora_ok(qlora_linear_merge(L.lin, L.ids[0], relayout ? &rq : NULL));
            ck_assert_int_eq(L.lin->adapters[L.ids[0]].enabled, 0);
            ck_assert_int_eq(L.w.blocksize, relayout ? 32 : 64);
            ck_assert_int_eq(L.w.double_quant, relayout ? 0 : 1);
            ck_assert_int_eq(L.w.shape[0], c.n);
            ck_assert_str_eq(L.w.name, "model.layers.0.mlp.up_proj.weight");
            if (!relayout)
                ck_assert_ptr_eq(L.w.codes, old_codes); /* rewritten in place */
            check_merged_weight(ctx, &L.w, target, c.n, c.k, bs[b].name);
            /* the merged layer without the adapter ≈ the layer with it */
            ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, NULL, NULL));
            double *y_merged = y_of(&L, &L.y);
            double e2 = 0, s2 = 0;
            for (int64_t i = 0; i < c.m * c.n; i++) {
                e2 += (y_merged[i] - y_adapter[i]) * (y_merged[i] - y_adapter[i]);
                s2 += y_adapter[i] * y_adapter[i];
            }
            ck_assert_msg(sqrt(e2 / s2) < 0.13, "%s: merged output differs by %g (relative RMS)", bs[b].name,
                          sqrt(e2 / s2));
            /* and the merge changed the frozen weight: the FP64 base layer of the new weight */
            ref_layer R2 = ref_of(&L, &d, 0, 0);
            check_forward("after merge", &L, &R2);
            ref_free(&R2);
            free(y_adapter);
            free(y_merged);
            free(target);
            ref_free(&R);
            layer_free(&L);
        }
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    case_free(&d);
}
END_TEST

/* ------------------------------------------------------- the accountant */

START_TEST(accountant_counts_adapters_and_activations) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {24, 100, 60, 64, 1, 1, 0, {{0}}};
    case_data d = case_make(&rng, &c);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        layer L;
        layer_make(&L, ctx, &d);
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ADAPTER_WEIGHTS), 0);
        qlora_lora_params p = qlora_lora_default_params();
        p.rank = 8;
        int id1, id2;
        ck_assert_qlora_ok(qlora_linear_add_adapter(L.lin, "one", &p, &id1));
        p.rank = 3;
        p.grad_dtype = QLORA_F32;
        ck_assert_qlora_ok(qlora_linear_add_adapter(L.lin, "two", &p, &id2));
        uint64_t params1 = 8 * (100 + 60), params2 = 3 * (100 + 60);
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ADAPTER_WEIGHTS), 2 * (params1 + params2));
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ADAPTER_GRADS), 2 * params1 + 4 * params2);
        /* saved: 2·r bytes per token per enabled adapter */
        qlora_linear_saved saved = {0};
        qlora_linear_fwd_opts o = {1, 5};
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &o, &saved));
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ACTIVATIONS), 24 * 2 * (8 + 3));
        uint64_t workspace = category_bytes(ctx, QLORA_MEM_WORKSPACE);
        ck_assert_qlora_ok(qlora_linear_backward(L.lin, &L.x, &L.dy, &saved, &L.dx));
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_WORKSPACE), workspace);
        qlora_linear_saved_free(&saved);
        qlora_linear_saved_free(&saved); /* twice: a no-op */
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ACTIVATIONS), 0);
        ck_assert_qlora_ok(qlora_linear_adapter_enable(L.lin, id1, 0));
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, &o, &saved));
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ACTIVATIONS), 24 * 2 * 3);
        qlora_linear_saved_free(&saved);
        /* inference keeps nothing */
        ck_assert_qlora_ok(qlora_linear_forward(L.lin, &L.x, &L.y, NULL, NULL));
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ACTIVATIONS), 0);
        qlora_linear_free(L.lin);
        L.lin = NULL;
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ADAPTER_WEIGHTS), 0);
        ck_assert_uint_eq(category_bytes(ctx, QLORA_MEM_ADAPTER_GRADS), 0);
        qlora_mem_stats st;
        ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
        int dev = bs[b].params.backend == QLORA_BACKEND_CUDA;
        ck_assert_uint_eq(st.peak[dev][QLORA_MEM_ADAPTER_WEIGHTS], 2 * (params1 + params2));
        layer_free(&L);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    case_free(&d);
}
END_TEST

/* ------------------------------------------------------------ bad input */

START_TEST(bad_input_is_rejected_clearly) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    case_spec c = {5, 64, 32, 64, 1, 1, 1, {AD("default", 4, 8.0f, 0.1f, 0, QLORA_BF16)}};
    case_data d = case_make(&rng, &c);
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    layer L;
    layer_make(&L, ctx, &d);
    qlora_linear *lin = NULL;
    /* create */
    ck_assert_qlora_fails(qlora_linear_create(ctx, NULL, NULL, &lin), QLORA_ERR_INVALID_ARG, "weight");
    ck_assert_qlora_fails(qlora_linear_create(NULL, &L.w, NULL, &lin), QLORA_ERR_INVALID_ARG, "ctx");
    ck_assert_qlora_fails(qlora_linear_create(ctx, &L.w, NULL, NULL), QLORA_ERR_INVALID_ARG, "out");
    qlora_qtensor w = L.w;
    w.device = 0;
    ck_assert_qlora_fails(qlora_linear_create(ctx, &w, NULL, &lin), QLORA_ERR_DEVICE,
                          "weight 'model.layers.0.mlp.up_proj.weight' is on CUDA device 0");
    ck_assert_ptr_null(lin);
    w = L.w;
    w.ndim = 1;
    w.shape[0] = w.numel;
    ck_assert_qlora_fails(qlora_linear_create(ctx, &w, NULL, &lin), QLORA_ERR_SHAPE, "2-D");
    w = L.w;
    w.codes = NULL;
    ck_assert_qlora_fails(qlora_linear_create(ctx, &w, NULL, &lin), QLORA_ERR_INVALID_ARG, "no storage");
    w = L.w;
    w.nblocks++;
    ck_assert_qlora_fails(qlora_linear_create(ctx, &w, NULL, &lin), QLORA_ERR_SHAPE, "nblocks");
    qlora_tensor bias = L.bias;
    bias.dtype = QLORA_F32;
    ck_assert_qlora_fails(qlora_linear_create(ctx, &L.w, &bias, &lin), QLORA_ERR_DTYPE,
                          "bias 'model.layers.0.mlp.up_proj.bias' is F32");
    bias = L.bias;
    bias.shape[0] = 31;
    ck_assert_qlora_fails(qlora_linear_create(ctx, &L.w, &bias, &lin), QLORA_ERR_SHAPE, "[32]");
    bias = L.bias;
    bias.device = 1;
    ck_assert_qlora_fails(qlora_linear_create(ctx, &L.w, &bias, &lin), QLORA_ERR_DEVICE, "bias");
    ck_assert_ptr_null(lin);
    /* adapters */
    qlora_lora_params p = qlora_lora_default_params();
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "default", &p, NULL), QLORA_ERR_INVALID_ARG,
                          "already has an adapter named 'default'");
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "", &p, NULL), QLORA_ERR_INVALID_ARG, "adapter name");
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "a.b", &p, NULL), QLORA_ERR_INVALID_ARG, "dots");
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, NULL, &p, NULL), QLORA_ERR_INVALID_ARG, "name");
    p.rank = 0;
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "r0", &p, NULL), QLORA_ERR_INVALID_ARG, "rank 0");
    p = qlora_lora_default_params();
    p.dropout = 1.0f;
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "p1", &p, NULL), QLORA_ERR_INVALID_ARG, "dropout");
    p.dropout = NAN;
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "pn", &p, NULL), QLORA_ERR_INVALID_ARG, "dropout");
    p = qlora_lora_default_params();
    p.alpha = INFINITY;
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "ai", &p, NULL), QLORA_ERR_INVALID_ARG, "alpha");
    p = qlora_lora_default_params();
    p.grad_dtype = QLORA_F16;
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "g16", &p, NULL), QLORA_ERR_DTYPE, "F16");
    ck_assert_int_eq(L.lin->count, 1);
    p = qlora_lora_default_params();
    p.rank = 2;
    for (int i = 1; i < QLORA_LINEAR_MAX_ADAPTERS; i++) {
        char name[16];
        snprintf(name, sizeof name, "more%d", i);
        ck_assert_qlora_ok(qlora_linear_add_adapter(L.lin, name, &p, NULL));
    }
    ck_assert_qlora_fails(qlora_linear_add_adapter(L.lin, "ninth", &p, NULL), QLORA_ERR_UNSUPPORTED, "8 adapters");
    for (int i = 1; i < QLORA_LINEAR_MAX_ADAPTERS; i++)
        ck_assert_qlora_ok(qlora_linear_adapter_enable(L.lin, i, 0));
    ck_assert_qlora_fails(qlora_linear_adapter_enable(L.lin, 8, 1), QLORA_ERR_INVALID_ARG, "no adapter 8");
    ck_assert_qlora_fails(qlora_linear_adapter_enable(L.lin, -1, 1), QLORA_ERR_INVALID_ARG, "no adapter -1");
    ck_assert_qlora_fails(qlora_linear_adapter_tensors(L.lin, 9, NULL, NULL, NULL, NULL), QLORA_ERR_INVALID_ARG,
                          "no adapter 9");
    ck_assert_qlora_fails(qlora_linear_merge(L.lin, 9, NULL), QLORA_ERR_INVALID_ARG, "no adapter 9");
    qlora_quant_params bad_q = {QLORA_QUANT_NF4, 48, 1};
    ck_assert_qlora_fails(qlora_linear_merge(L.lin, 0, &bad_q), QLORA_ERR_INVALID_ARG, "blocksize");
    ck_assert_int_eq(L.w.blocksize, 64);
    /* forward */
    qlora_tensor x = L.x, y = L.y;
    ck_assert_qlora_fails(qlora_linear_forward(NULL, &x, &y, NULL, NULL), QLORA_ERR_INVALID_ARG, "lin");
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, NULL, &y, NULL, NULL), QLORA_ERR_INVALID_ARG, "x");
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, NULL, NULL, NULL), QLORA_ERR_INVALID_ARG, "y");
    x.dtype = QLORA_F32;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, NULL, NULL), QLORA_ERR_DTYPE, "input 'x' is F32");
    x = L.x;
    x.shape[1] = 63;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, NULL, NULL), QLORA_ERR_SHAPE,
                          "input 'x' must be [..., 64]");
    x = L.x;
    y.shape[0] = 4;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, NULL, NULL), QLORA_ERR_SHAPE, "output 'y'");
    y = L.y;
    y.shape[1] = 64;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, NULL, NULL), QLORA_ERR_SHAPE, "[..., 32]");
    y = L.y;
    x.device = 0;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, NULL, NULL), QLORA_ERR_DEVICE, "input 'x'");
    x = L.x;
    x.data = NULL;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, NULL, NULL), QLORA_ERR_INVALID_ARG, "no data");
    x = L.x;
    y.data = (char *)x.data + 2;
    y.shape[1] = 32;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, NULL, NULL), QLORA_ERR_INVALID_ARG, "overlaps");
    y = L.y;
    qlora_linear_fwd_opts o = {1, UINT64_MAX};
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, &o, NULL), QLORA_ERR_INVALID_ARG, "reserved");
    o.training = 2;
    o.rng_stream = 0;
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, &o, NULL), QLORA_ERR_INVALID_ARG, "training");
    o.training = 1;
    /* backward */
    qlora_linear_saved saved = {0};
    ck_assert_qlora_fails(qlora_linear_backward(L.lin, &x, &L.dy, &saved, NULL), QLORA_ERR_INVALID_ARG, "empty");
    ck_assert_qlora_ok(qlora_linear_forward(L.lin, &x, &y, &o, &saved));
    ck_assert_qlora_fails(qlora_linear_forward(L.lin, &x, &y, &o, &saved), QLORA_ERR_INVALID_ARG, "saved_free");
    ck_assert_qlora_fails(qlora_linear_backward(L.lin, &x, &L.dy, NULL, NULL), QLORA_ERR_INVALID_ARG, "saved");
    ck_assert_qlora_fails(qlora_linear_backward(L.lin, &x, &L.x, &saved, NULL), QLORA_ERR_SHAPE,
                          "output gradient 'x' must be [..., 32]");
    qlora_tensor dx = L.dx;
    dx.dtype = QLORA_F16;
    ck_assert_qlora_fails(qlora_linear_backward(L.lin, &x, &L.dy, &saved, &dx), QLORA_ERR_DTYPE,
                          "input gradient 'dx' is F16");
    ck_assert_qlora_fails(qlora_linear_backward(L.lin, &x, &L.dy, &saved, &x), QLORA_ERR_INVALID_ARG, "overlaps");
    /* fewer rows than the forward saw */
    qlora_tensor x4 = x, dy4 = L.dy;
    x4.shape[0] = dy4.shape[0] = 4;
    ck_assert_qlora_fails(qlora_linear_backward(L.lin, &x4, &dy4, &saved, NULL), QLORA_ERR_SHAPE, "5");
    layer other;
    layer_make(&other, ctx, &d);
    ck_assert_qlora_fails(qlora_linear_backward(other.lin, &x, &L.dy, &saved, NULL), QLORA_ERR_INVALID_ARG,
                          "another layer");
    layer_free(&other);
    qlora_linear_saved_free(&saved);
    /* inputs on a CUDA context must be on its GPU */
    if (tu_have_gpu()) {
        tu_backend bs[4];
        int nb = tu_backends(bs);
        qlora_ctx *gpu = tu_ctx(&bs[nb - 1]);
        layer G;
        layer_make(&G, gpu, &d);
        ck_assert_qlora_fails(qlora_linear_forward(G.lin, &L.x, &G.y, NULL, NULL), QLORA_ERR_DEVICE,
                              "is in host memory");
        layer_free(&G);
        qlora_ctx_free(gpu);
    }
    /* the NULL-tolerant calls */
    qlora_linear_free(NULL);
    qlora_linear_saved_free(NULL);
    ck_assert_int_eq(qlora_linear_in_features(L.lin), 64);
    ck_assert_int_eq(qlora_linear_out_features(L.lin), 32);
    ck_assert_int_eq(qlora_linear_in_features(NULL), 0);
    layer_free(&L);
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
    case_free(&d);
}
END_TEST

int main(void) {
    Suite *s = suite_create("linear");
    TCase *rng = tcase_create("philox");
    tcase_add_test(rng, philox_matches_random123_known_answers);
    suite_add_tcase(s, rng);
    TCase *api = tcase_create("api");
    tcase_add_test(api, defaults_and_scaling);
    tcase_add_test(api, adapter_init_is_peft_and_reproducible);
    tcase_add_test(api, accountant_counts_adapters_and_activations);
    tcase_add_test(api, bad_input_is_rejected_clearly);
    suite_add_tcase(s, api);
    TCase *math = tcase_create("math");
    tcase_set_timeout(math, 600);
    tcase_add_test(math, forward_and_backward_match_fp64);
    tcase_add_test(math, leading_dimensions_flatten);
    tcase_add_test(math, gradients_match_finite_differences);
    tcase_add_test(math, dropout_masks_are_the_rng_on_every_backend);
    tcase_add_test(math, dropout_zero_is_no_dropout);
    tcase_add_test(math, backends_agree_with_the_reference);
    tcase_add_test(math, adapters_enable_and_disable);
    tcase_add_test(math, merge_folds_the_adapter_into_the_weight);
    suite_add_tcase(s, math);
    return tu_run_suite(s);
}
