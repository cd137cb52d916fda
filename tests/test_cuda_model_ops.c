/*
 * The CUDA model ops (cuda/model_ops_cuda.h) through the dispatching ops of lib/model_ops.h on a
 * CUDA context, against the same ops on a CPU context and, for attention and cross-entropy,
 * against FP64 evaluations written here. Fresh random data every run; outputs start poisoned
 * (BF16 0xFFFF is a NaN) inside guard bytes that must survive. Without a CUDA device (or in a
 * CPU-only build) every test says it is skipped and returns.
 *
 * Tolerances. U = 2^-24, BF = 2^-8 (BF16's relative rounding, with the 1.01 margin of
 * tests/test_model_ops.c). The elementwise ops repeat the CPU's float32 operations, so RMSNorm
 * forward, RoPE, the residual add and the embedding must match bit for bit; SwiGLU's gradients
 * to one BF16 ulp and its output to two (CUDA's expf and glibc's may differ in the last float32
 * bit, which can flip a BF16 rounding, and the output rounds twice). RMSNorm backward: the row mean of g·n̂ is a float32 sum of dim terms on both sides
 * (loop vs tree), off by at most 2·U·Σ|g·n̂| together, plus one BF16 ulp. Attention: against
 * FP64, |got − e| <= 1.01·BF·|e| + K·U·A, A the sum of the magnitudes of the terms of e (with
 * the probabilities' own error folded in through the scores' size S) and K = 2·(L·group + d) +
 * 4·(d + 2)·S + 64 counting float32 sums of L·group and d terms, twice for margin. Cross-entropy:
 * logits and the loss to float32 accumulation over H terms; dhidden to BF·Σ_v|g_v·w_v| more than
 * the CPU, since the GPU rounds the softmax gradient to BF16 before its cuBLAS product (as HF's
 * BF16 backward does).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "internal.h"
#include "model_ops.h"
#include "testutil.h"

static const double U = 1.0 / 16777216.0;
static const double BF = 1.0 / 256.0;

#define SKIP_WITHOUT_GPU()                                                                   \
    do {                                                                                     \
        if (!tu_have_gpu()) {                                                                \
            fprintf(stderr, "test_cuda_model_ops: %s skipped, no CUDA device\n", __func__);  \
            return;                                                                          \
        }                                                                                    \
    } while (0)

/* ------------------------------------------------------------------ helpers */

static double bf(uint16_t h) { return ql_bf16_to_f32(h); }

/* One BF16 ulp at the magnitude of v. */
static double bf16_ulp(double v) {
    int e;
    frexp(fabs(v) > 1e-38 ? fabs(v) : 1e-38, &e);
    return ldexp(1.0, e - 8);
}

typedef struct gpu {
    qlora_ctx *cpu, *cuda;
} gpu;

static gpu gpu_open(void) {
    tu_backend b[4];
    tu_backends(b);
    gpu g = {tu_ctx(&b[0]), tu_cuda_ctx()};
    return g;
}

static void assert_no_live(qlora_ctx *ctx) {
    qlora_mem_stats st;
    ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
    ck_assert_uint_eq(st.live_allocations, 0);
}

static void gpu_close(gpu *g) {
    assert_no_live(g->cpu);
    assert_no_live(g->cuda);
    qlora_ctx_free(g->cpu);
    qlora_ctx_free(g->cuda);
}

/* A device buffer: `bytes` of payload `off` bytes past a guard of GUARD poisoned bytes, and a
 * poisoned guard after it. */
#define GUARD 64
#define POISON 0xFF

typedef struct dbuf {
    qlora_ctx *ctx;
    uint8_t *base;
    size_t bytes, off;
} dbuf;

static size_t dtotal(const dbuf *b) { return b->bytes + b->off + 2 * GUARD; }
static void *dptr(const dbuf *b) { return b->base + GUARD + b->off; }

static dbuf dnew(qlora_ctx *ctx, size_t bytes, size_t off) {
    dbuf b = {ctx, NULL, bytes, off};
    ck_assert_qlora_ok(qlora_alloc(ctx, dtotal(&b), 1, QLORA_MEM_WORKSPACE, (void **)&b.base));
    uint8_t *h = tu_xmalloc(dtotal(&b));
    memset(h, POISON, dtotal(&b));
    ck_assert_qlora_ok(ql_ctx_memcpy(ctx, b.base, h, dtotal(&b)));
    free(h);
    return b;
}

static dbuf dfrom(qlora_ctx *ctx, const void *host, size_t bytes, size_t off) {
    dbuf b = dnew(ctx, bytes, off);
    ck_assert_qlora_ok(ql_ctx_memcpy(ctx, dptr(&b), host, bytes));
    return b;
}

/* Downloads the payload into `out`, checking that nothing outside it was written. */
static void dget(const dbuf *b, void *out, const char *what) {
    uint8_t *h = tu_xmalloc(dtotal(b));
    ck_assert_qlora_ok(ql_ctx_memcpy(b->ctx, h, b->base, dtotal(b)));
    size_t first = GUARD + b->off;
    for (size_t i = 0; i < dtotal(b); i++)
        ck_assert_msg((i >= first && i < first + b->bytes) || h[i] == POISON,
                      "%s: byte %lld (relative to the output) was written", what, (long long)i - (long long)first);
    memcpy(out, h + first, b->bytes);
    free(h);
}

static void *dload(const dbuf *b, const char *what) {
    void *out = tu_xmalloc(b->bytes);
    dget(b, out, what);
    return out;
}

static void dfree(dbuf *b) {
    qlora_free(b->ctx, b->base);
    b->base = NULL;
}

/* BF16 arrays equal bit for bit (ulps = 0) or within `ulps` units in the last place. */
static void assert_bf16_close(const char *what, const uint16_t *got, const uint16_t *want, int64_t n, int ulps) {
    for (int64_t i = 0; i < n; i++) {
        if (got[i] == want[i])
            continue;
        double diff = fabs(bf(got[i]) - bf(want[i]));
        ck_assert_msg(ulps > 0 && isfinite(bf(got[i])) && diff <= ulps * bf16_ulp(bf(want[i])),
                      "%s: element %lld is 0x%04x (%.9g), the CPU gives 0x%04x (%.9g)", what, (long long)i, got[i],
                      bf(got[i]), want[i], bf(want[i]));
    }
}

/* |got − want| <= tol element-wise; reports the worst element. */
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

static double *bf16_to_doubles(const uint16_t *h, int64_t n) {
    double *d = tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++)
        d[i] = bf(h[i]);
    return d;
}

/* ------------------------------------------------------------------ RMSNorm */

static void rmsnorm_case(gpu *g, tu_rng *rng, int64_t rows, int64_t dim, float sigma) {
    const float eps = 1e-5f;
    int64_t n = rows * dim;
    uint16_t *x = tu_random_bf16(rng, n, sigma), *w = tu_random_bf16(rng, dim, 1.0f), *dy = tu_random_bf16(rng, n, 1.0f);
    uint16_t *y_cpu = tu_xmalloc(n * 2), *dx_cpu = tu_xmalloc(n * 2);
    ck_assert_qlora_ok(ql_rmsnorm_forward(g->cpu, x, w, rows, dim, eps, y_cpu));
    ck_assert_qlora_ok(ql_rmsnorm_backward(g->cpu, x, w, dy, rows, dim, eps, dx_cpu));

    dbuf dx_ = dfrom(g->cuda, x, n * 2, 0), dw = dfrom(g->cuda, w, dim * 2, 0), ddy = dfrom(g->cuda, dy, n * 2, 0);
    dbuf dyo = dnew(g->cuda, n * 2, 0), ddx = dnew(g->cuda, n * 2, 0);
    ck_assert_qlora_ok(ql_rmsnorm_forward(g->cuda, dptr(&dx_), dptr(&dw), rows, dim, eps, dptr(&dyo)));
    ck_assert_qlora_ok(ql_rmsnorm_backward(g->cuda, dptr(&dx_), dptr(&dw), dptr(&ddy), rows, dim, eps, dptr(&ddx)));
    uint16_t *y_gpu = dload(&dyo, "rmsnorm y"), *dx_gpu = dload(&ddx, "rmsnorm dx");
    assert_bf16_close("rmsnorm forward", y_gpu, y_cpu, n, 0);

    /* backward: the row mean of g·n̂ may differ by 2·U·Σ|g·n̂| (see the header) */
    double *got = bf16_to_doubles(dx_gpu, n), *want = bf16_to_doubles(dx_cpu, n), *tol = tu_xmalloc(n * 8);
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0.0, abs_gn = 0.0;
        for (int64_t i = 0; i < dim; i++)
            ss += bf(x[r * dim + i]) * bf(x[r * dim + i]);
        double rstd = 1.0 / sqrt(ss / dim + eps);
        for (int64_t i = 0; i < dim; i++)
            abs_gn += fabs(bf(dy[r * dim + i]) * bf(w[i]) * bf(x[r * dim + i]) * rstd);
        for (int64_t i = 0; i < dim; i++) {
            double n_hat = fabs(bf(x[r * dim + i]) * rstd);
            tol[r * dim + i] = 1.01 * bf16_ulp(want[r * dim + i]) + 2.0 * rstd * n_hat * 2.0 * U * abs_gn * 1.01;
        }
    }
    assert_close("rmsnorm backward", got, want, tol, n);
    free(got), free(want), free(tol);
    dfree(&dx_), dfree(&dw), dfree(&ddy), dfree(&dyo), dfree(&ddx);
    free(x), free(w), free(dy), free(y_cpu), free(dx_cpu), free(y_gpu), free(dx_gpu);
}

START_TEST(test_rmsnorm_matches_cpu) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    rmsnorm_case(&g, &rng, 37, 1000, 1.0f);  /* dim not a multiple of the block */
    rmsnorm_case(&g, &rng, 5, 4096, 30.0f);  /* a Llama width, large activations */
    rmsnorm_case(&g, &rng, 3, 7, 0.01f);     /* fewer elements than threads */
    gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ RoPE */

static void rope_case(gpu *g, tu_rng *rng, int head_dim, int heads, int64_t tokens) {
    int32_t *pos = tu_xmalloc(tokens * 4);
    int32_t max_pos = 0;
    for (int64_t t = 0; t < tokens; t++) { /* packed: positions restart at 0 twice */
        pos[t] = (int32_t)(t < tokens / 3 ? t : t < tokens / 2 ? t - tokens / 3 : t - tokens / 2);
        max_pos = pos[t] > max_pos ? pos[t] : max_pos;
    }
    ql_rope_params p = {QL_ROPE_LLAMA3, head_dim, 500000.0, 8.0, 1.0, 4.0, 8192};
    ql_rope_table tc, tg;
    ck_assert_qlora_ok(ql_rope_table_init(g->cpu, &p, max_pos + 1, &tc));
    ck_assert_qlora_ok(ql_rope_table_init(g->cuda, &p, max_pos + 1, &tg));
    /* the CUDA context's table lives on the device and holds the same bits */
    int64_t tn = (int64_t)(max_pos + 1) * (head_dim / 2);
    uint16_t *tab = tu_xmalloc(2 * tn * 2);
    ck_assert_qlora_ok(ql_ctx_memcpy(g->cuda, tab, tg.cos, tn * 2));
    ck_assert_qlora_ok(ql_ctx_memcpy(g->cuda, tab + tn, tg.sin, tn * 2));
    ck_assert_mem_eq(tab, tc.cos, tn * 2);
    ck_assert_mem_eq(tab + tn, tc.sin, tn * 2);

    int64_t n = tokens * heads * head_dim;
    uint16_t *x = tu_random_bf16(rng, n, 2.0f), *want = tu_xmalloc(n * 2);
    dbuf dpos = dfrom(g->cuda, pos, tokens * 4, 0);
    for (int backward = 0; backward < 2; backward++) {
        memcpy(want, x, n * 2);
        dbuf dx = dfrom(g->cuda, x, n * 2, 0);
        if (backward) {
            ck_assert_qlora_ok(ql_rope_backward(g->cpu, &tc, pos, tokens, heads, want));
            ck_assert_qlora_ok(ql_rope_backward(g->cuda, &tg, dptr(&dpos), tokens, heads, dptr(&dx)));
        } else {
            ck_assert_qlora_ok(ql_rope_forward(g->cpu, &tc, pos, tokens, heads, want));
            ck_assert_qlora_ok(ql_rope_forward(g->cuda, &tg, dptr(&dpos), tokens, heads, dptr(&dx)));
        }
        uint16_t *got = dload(&dx, backward ? "rope backward" : "rope forward");
        assert_bf16_close(backward ? "rope backward" : "rope forward", got, want, n, 0);
        free(got);
        dfree(&dx);
    }
    dfree(&dpos);
    ql_rope_table_free(g->cpu, &tc);
    ql_rope_table_free(g->cuda, &tg);
    free(pos), free(tab), free(x), free(want);
}

START_TEST(test_rope_matches_cpu) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    rope_case(&g, &rng, 128, 8, 61);
    rope_case(&g, &rng, 64, 2, 40);
    rope_case(&g, &rng, 6, 3, 9); /* half = 3: fewer pairs than a warp */
    gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ SwiGLU, add */

/* off: bytes past 16-byte alignment of every device operand (2: the one-by-one path) */
static void swiglu_case(gpu *g, tu_rng *rng, int64_t n, size_t off) {
    uint16_t *gate = tu_random_bf16(rng, n, 3.0f), *up = tu_random_bf16(rng, n, 1.0f), *dout = tu_random_bf16(rng, n, 1.0f);
    uint16_t *out = tu_xmalloc(n * 2), *dg = tu_xmalloc(n * 2), *du = tu_xmalloc(n * 2);
    ck_assert_qlora_ok(ql_swiglu_forward(g->cpu, gate, up, n, out));
    ck_assert_qlora_ok(ql_swiglu_backward(g->cpu, gate, up, dout, n, dg, du));
    dbuf dgate = dfrom(g->cuda, gate, n * 2, off), dup_ = dfrom(g->cuda, up, n * 2, off);
    dbuf ddout = dfrom(g->cuda, dout, n * 2, off), dout_ = dnew(g->cuda, n * 2, off);
    dbuf ddg = dnew(g->cuda, n * 2, off), ddu = dnew(g->cuda, n * 2, off);
    ck_assert_qlora_ok(ql_swiglu_forward(g->cuda, dptr(&dgate), dptr(&dup_), n, dptr(&dout_)));
    ck_assert_qlora_ok(
        ql_swiglu_backward(g->cuda, dptr(&dgate), dptr(&dup_), dptr(&ddout), n, dptr(&ddg), dptr(&ddu)));
    uint16_t *o = dload(&dout_, "swiglu out"), *gg = dload(&ddg, "swiglu dgate"), *gu = dload(&ddu, "swiglu dup");
    assert_bf16_close("swiglu forward", o, out, n, 2); /* two roundings: 2 ulps */
    assert_bf16_close("swiglu dgate", gg, dg, n, 1);
    assert_bf16_close("swiglu dup", gu, du, n, 1);
    /* in place on gate, as the model calls it */
    ck_assert_qlora_ok(ql_swiglu_forward(g->cuda, dptr(&dgate), dptr(&dup_), n, dptr(&dgate)));
    uint16_t *inplace = dload(&dgate, "swiglu in place");
    ck_assert_mem_eq(inplace, o, n * 2);
    dfree(&dgate), dfree(&dup_), dfree(&ddout), dfree(&dout_), dfree(&ddg), dfree(&ddu);
    free(gate), free(up), free(dout), free(out), free(dg), free(du), free(o), free(gg), free(gu), free(inplace);
}

static void add_case(gpu *g, tu_rng *rng, int64_t n, size_t off) {
    uint16_t *a = tu_random_bf16(rng, n, 1.0f), *b = tu_random_bf16(rng, n, 0.3f), *want = tu_xmalloc(n * 2);
    memcpy(want, a, n * 2);
    ck_assert_qlora_ok(ql_add_bf16(g->cpu, want, b, n));
    dbuf da = dfrom(g->cuda, a, n * 2, off), db = dfrom(g->cuda, b, n * 2, off);
    ck_assert_qlora_ok(ql_add_bf16(g->cuda, dptr(&da), dptr(&db), n));
    uint16_t *got = dload(&da, "add");
    assert_bf16_close("residual add", got, want, n, 0);
    dfree(&da), dfree(&db);
    free(a), free(b), free(want), free(got);
}

START_TEST(test_swiglu_and_add_match_cpu) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    swiglu_case(&g, &rng, 8 * 4099 + 5, 0); /* 8 at a time, then a tail */
    swiglu_case(&g, &rng, 1001, 2);         /* misaligned: one at a time */
    add_case(&g, &rng, 8 * 1500 + 3, 0);
    add_case(&g, &rng, 777, 2);
    gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ embedding */

START_TEST(test_embedding_matches_cpu_and_reports_bad_ids) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t V = 300, T = 50;
    const int64_t hiddens[2] = {72, 30}; /* 16-byte rows, then 2-byte copies */
    for (int c = 0; c < 2; c++) {
        int64_t H = hiddens[c];
        uint16_t *table = tu_random_bf16(&rng, V * H, 1.0f), *want = tu_xmalloc(T * H * 2);
        int32_t ids[50];
        for (int64_t t = 0; t < T; t++)
            ids[t] = (int32_t)(tu_next(&rng) % V);
        ids[7] = 0;
        ids[8] = (int32_t)V - 1;
        ck_assert_qlora_ok(ql_embedding_forward(g.cpu, table, V, H, ids, T, want));
        dbuf dt = dfrom(g.cuda, table, V * H * 2, 0), di = dfrom(g.cuda, ids, T * 4, 0), dout = dnew(g.cuda, T * H * 2, 0);
        ck_assert_qlora_ok(ql_embedding_forward(g.cuda, dptr(&dt), V, H, dptr(&di), T, dptr(&dout)));
        uint16_t *got = dload(&dout, "embedding");
        ck_assert_mem_eq(got, want, T * H * 2);
        /* the first bad id is named, as on the CPU */
        ids[9] = -3;
        ids[31] = (int32_t)V;
        ck_assert_qlora_ok(ql_ctx_memcpy(g.cuda, dptr(&di), ids, T * 4));
        ck_assert_qlora_fails(ql_embedding_forward(g.cuda, dptr(&dt), V, H, dptr(&di), T, dptr(&dout)),
                              QLORA_ERR_INVALID_ARG, "token 9 has id -3");
        ids[9] = 1;
        ck_assert_qlora_ok(ql_ctx_memcpy(g.cuda, dptr(&di), ids, T * 4));
        ck_assert_qlora_fails(ql_embedding_forward(g.cuda, dptr(&dt), V, H, dptr(&di), T, dptr(&dout)),
                              QLORA_ERR_INVALID_ARG, "token 31 has id 300");
        dfree(&dt), dfree(&di), dfree(&dout);
        free(table), free(want), free(got);
    }
    gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ attention */

typedef struct attn_ref {
    double *out, *lse, *dq, *dk, *dv;       /* FP64 values */
    double *a_out, *a_dq, *a_dk, *a_dv;     /* sums of the magnitudes of their terms */
    double s_max;                           /* largest |score| */
} attn_ref;

static int64_t key_start(const int32_t *seq_start, int64_t t) { return seq_start ? seq_start[t] : 0; }

/* The FP64 forward and backward, with the magnitude sums the tolerances need. */
static attn_ref attn_fp64(const ql_attn_shape *s, const int32_t *seq_start, const uint16_t *q, const uint16_t *k,
                          const uint16_t *v, const uint16_t *dout) {
    const int64_t T = s->tokens;
    const int nh = s->heads, nkv = s->kv_heads, d = s->head_dim, group = nh / nkv;
    const double scale = 1.0 / sqrt((double)d);
    attn_ref r;
    r.out = tu_xmalloc(T * nh * d * 8), r.a_out = tu_xmalloc(T * nh * d * 8), r.lse = tu_xmalloc(T * nh * 8);
    r.dq = tu_xmalloc(T * nh * d * 8), r.a_dq = tu_xmalloc(T * nh * d * 8);
    r.dk = tu_xmalloc(T * nkv * d * 8), r.a_dk = tu_xmalloc(T * nkv * d * 8);
    r.dv = tu_xmalloc(T * nkv * d * 8), r.a_dv = tu_xmalloc(T * nkv * d * 8);
    r.s_max = 0.0;
    double *p = tu_xmalloc(T * 8), *dp = tu_xmalloc(T * 8), *dp_abs = tu_xmalloc(T * 8);
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            const int64_t row = t * nh + h, s0 = key_start(seq_start, t);
            const int kvh = h / group;
            double mx = -INFINITY;
            for (int64_t j = s0; j <= t; j++) {
                double sc = 0.0;
                for (int i = 0; i < d; i++)
                    sc += bf(q[row * d + i]) * bf(k[(j * nkv + kvh) * d + i]);
                p[j] = sc * scale;
                r.s_max = fmax(r.s_max, fabs(p[j]));
                mx = fmax(mx, p[j]);
            }
            double sum = 0.0;
            for (int64_t j = s0; j <= t; j++)
                sum += exp(p[j] - mx);
            r.lse[row] = mx + log(sum);
            double D = 0.0, D_abs = 0.0;
            for (int64_t j = s0; j <= t; j++) {
                p[j] = exp(p[j] - r.lse[row]);
                dp[j] = dp_abs[j] = 0.0;
                for (int i = 0; i < d; i++) {
                    double term = bf(dout[row * d + i]) * bf(v[(j * nkv + kvh) * d + i]);
                    dp[j] += term;
                    dp_abs[j] += fabs(term);
                }
                D += p[j] * dp[j];
                D_abs += p[j] * dp_abs[j];
            }
            for (int i = 0; i < d; i++) {
                double o = 0.0, ao = 0.0, g = 0.0, ag = 0.0;
                for (int64_t j = s0; j <= t; j++) {
                    double vv = bf(v[(j * nkv + kvh) * d + i]), kk = bf(k[(j * nkv + kvh) * d + i]);
                    o += p[j] * vv;
                    ao += p[j] * fabs(vv);
                    g += p[j] * (dp[j] - D) * kk;
                    ag += p[j] * (dp_abs[j] + D_abs) * fabs(kk);
                }
                r.out[row * d + i] = o;
                r.a_out[row * d + i] = ao;
                r.dq[row * d + i] = scale * g;
                r.a_dq[row * d + i] = scale * ag;
            }
            for (int64_t j = s0; j <= t; j++)
                for (int i = 0; i < d; i++) {
                    const int64_t kr = (j * nkv + kvh) * d + i;
                    double qq = bf(q[row * d + i]), dd = bf(dout[row * d + i]);
                    r.dk[kr] += scale * p[j] * (dp[j] - D) * qq;
                    r.a_dk[kr] += scale * p[j] * (dp_abs[j] + D_abs) * fabs(qq);
                    r.dv[kr] += p[j] * dd;
                    r.a_dv[kr] += p[j] * fabs(dd);
                }
        }
    free(p), free(dp), free(dp_abs);
    return r;
}

static void attn_ref_free(attn_ref *r) {
    free(r->out), free(r->lse), free(r->dq), free(r->dk), free(r->dv);
    free(r->a_out), free(r->a_dq), free(r->a_dk), free(r->a_dv);
}

static void check_against_fp64(const char *what, const uint16_t *got, const double *want, const double *mag,
                               int64_t n, double k_u) {
    double *g = bf16_to_doubles(got, n), *tol = tu_xmalloc(n * 8);
    for (int64_t i = 0; i < n; i++)
        tol[i] = 1.01 * BF * fabs(want[i]) + k_u * mag[i] + 1e-30;
    assert_close(what, g, want, tol, n);
    free(g), free(tol);
}

/* One attention shape on the GPU against FP64 (forward and backward) and the CPU op (lse).
 * off: bytes added to every device operand's alignment (2: the one-value-at-a-time loads). */
static void attention_case(gpu *g, tu_rng *rng, int64_t T, int nh, int nkv, int d, const int32_t *seq_start,
                           size_t off) {
    char what[160];
    ql_attn_shape s = {T, nh, nkv, d};
    const int64_t nq = T * nh * d, nk = T * nkv * d;
    uint16_t *q = tu_random_bf16(rng, nq, 1.0f), *k = tu_random_bf16(rng, nk, 1.0f), *v = tu_random_bf16(rng, nk, 1.0f);
    uint16_t *dout = tu_random_bf16(rng, nq, 1.0f);
    uint16_t *out_cpu = tu_xmalloc(nq * 2);
    float *lse_cpu = tu_xmalloc(T * nh * 4);
    ck_assert_qlora_ok(ql_attention_forward(g->cpu, &s, q, k, v, seq_start, out_cpu, lse_cpu));

    dbuf dq_in = dfrom(g->cuda, q, nq * 2, off), dk_in = dfrom(g->cuda, k, nk * 2, off);
    dbuf dv_in = dfrom(g->cuda, v, nk * 2, off), ddout = dfrom(g->cuda, dout, nq * 2, off);
    dbuf dss = {g->cuda, NULL, 0, 0};
    if (seq_start)
        dss = dfrom(g->cuda, seq_start, T * 4, 0);
    const int32_t *d_ss = seq_start ? dptr(&dss) : NULL;
    dbuf dout_ = dnew(g->cuda, nq * 2, off), dlse = dnew(g->cuda, T * nh * 4, 0);
    dbuf ddq = dnew(g->cuda, nq * 2, off), ddk = dnew(g->cuda, nk * 2, off), ddv = dnew(g->cuda, nk * 2, off);
    ck_assert_qlora_ok(
        ql_attention_forward(g->cuda, &s, dptr(&dq_in), dptr(&dk_in), dptr(&dv_in), d_ss, dptr(&dout_), dptr(&dlse)));
    ck_assert_qlora_ok(ql_attention_backward(g->cuda, &s, dptr(&dq_in), dptr(&dk_in), dptr(&dv_in), d_ss, dptr(&dlse),
                                             dptr(&ddout), dptr(&ddq), dptr(&ddk), dptr(&ddv)));
    uint16_t *out = dload(&dout_, "attention out"), *gq = dload(&ddq, "attention dq");
    uint16_t *gk = dload(&ddk, "attention dk"), *gv = dload(&ddv, "attention dv");
    float *lse = dload(&dlse, "attention lse");

    attn_ref r = attn_fp64(&s, seq_start, q, k, v, dout);
    int64_t L = 0;
    for (int64_t t = 0; t < T; t++)
        L = t - key_start(seq_start, t) + 1 > L ? t - key_start(seq_start, t) + 1 : L;
    const double k_u = (2.0 * (L * (nh / nkv) + d) + 4.0 * (d + 2) * r.s_max + 64.0) * U;
    snprintf(what, sizeof what, "attention T=%lld nh=%d nkv=%d d=%d%s off=%zu", (long long)T, nh, nkv, d,
             seq_start ? " packed" : "", off);
    char part[200];
    snprintf(part, sizeof part, "%s: out", what);
    check_against_fp64(part, out, r.out, r.a_out, nq, k_u);
    snprintf(part, sizeof part, "%s: dq", what);
    check_against_fp64(part, gq, r.dq, r.a_dq, nq, k_u);
    snprintf(part, sizeof part, "%s: dk", what);
    check_against_fp64(part, gk, r.dk, r.a_dk, nk, k_u);
    snprintf(part, sizeof part, "%s: dv", what);
    check_against_fp64(part, gv, r.dv, r.a_dv, nk, k_u);
    /* lse against FP64 and the CPU: float32 scores (d + 2 roundings of terms up to S) and the
     * log of a sum of L terms */
    double *lg = tu_xmalloc(T * nh * 8), *lc = tu_xmalloc(T * nh * 8), *lt = tu_xmalloc(T * nh * 8);
    for (int64_t i = 0; i < T * nh; i++) {
        lg[i] = lse[i];
        lc[i] = lse_cpu[i];
        lt[i] = ((d + 2) * r.s_max + (L + 8) * (1.0 + fabs(r.lse[i]))) * 2.0 * U;
    }
    snprintf(part, sizeof part, "%s: lse", what);
    assert_close(part, lg, r.lse, lt, T * nh);
    for (int64_t i = 0; i < T * nh; i++)
        lt[i] *= 2.0;
    snprintf(part, sizeof part, "%s: lse vs the CPU", what);
    assert_close(part, lg, lc, lt, T * nh);
    attn_ref_free(&r);
    free(lg), free(lc), free(lt);
    dfree(&dq_in), dfree(&dk_in), dfree(&dv_in), dfree(&ddout), dfree(&dss), dfree(&dout_), dfree(&dlse);
    dfree(&ddq), dfree(&ddk), dfree(&ddv);
    free(q), free(k), free(v), free(dout), free(out_cpu), free(lse_cpu), free(out), free(gq), free(gk), free(gv),
        free(lse);
}

/* seq_start for sequences starting at the given tokens (the first must be 0). */
static int32_t *packed(int64_t T, const int64_t *starts, int n) {
    int32_t *ss = tu_xmalloc(T * 4);
    for (int64_t t = 0, i = 0; t < T; t++) {
        while (i + 1 < n && starts[i + 1] <= t)
            i++;
        ss[t] = (int32_t)starts[i];
    }
    return ss;
}

START_TEST(test_attention_gqa_packed_d64) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    /* boundaries inside and on tile edges (63: the last key of a 32-key tile, 64: a 16-token
     * query tile's first), a one-token sequence, T not a multiple of any tile */
    const int64_t starts[7] = {0, 63, 64, 70, 131, 132, 250};
    int32_t *ss = packed(300, starts, 7);
    attention_case(&g, &rng, 300, 8, 2, 64, ss, 0);
    attention_case(&g, &rng, 300, 8, 2, 64, NULL, 0);
    free(ss);
    gpu_close(&g);
}
END_TEST

START_TEST(test_attention_gqa_d128_and_t1) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t starts[4] = {0, 100, 127, 203};
    int32_t *ss = packed(300, starts, 4);
    attention_case(&g, &rng, 300, 8, 2, 128, ss, 0);
    attention_case(&g, &rng, 1, 8, 2, 128, NULL, 0);
    attention_case(&g, &rng, 1, 4, 4, 64, NULL, 0);
    const int32_t one[1] = {0};
    attention_case(&g, &rng, 1, 4, 1, 64, one, 0);
    free(ss);
    gpu_close(&g);
}
END_TEST

/* Head sizes between and above the common ones (the bounded-loop kernels), the 4-byte and 2-byte
 * load paths, MHA and all-heads-share-one GQA. */
START_TEST(test_attention_other_head_dims_and_alignments) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t starts[3] = {0, 33, 60};
    int32_t *ss = packed(77, starts, 3);
    attention_case(&g, &rng, 77, 4, 1, 80, ss, 0);  /* d <= 128, not 128 */
    attention_case(&g, &rng, 77, 2, 2, 34, ss, 0);  /* d % 8 != 0: 4-byte loads */
    attention_case(&g, &rng, 77, 4, 2, 64, ss, 2);  /* misaligned: 2-byte loads and stores */
    attention_case(&g, &rng, 45, 2, 1, 256, NULL, 0);
    attention_case(&g, &rng, 45, 2, 2, 200, NULL, 0);
    attention_case(&g, &rng, 40, 2, 1, 512, NULL, 0);
    attention_case(&g, &rng, 21, 3, 3, 384, NULL, 0);
    free(ss);
    gpu_close(&g);
}
END_TEST

START_TEST(test_attention_bad_arguments) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    dbuf b = dnew(g.cuda, 4096, 0);
    uint16_t *p = dptr(&b);
    ql_attn_shape odd = {4, 2, 2, 7};
    ck_assert_qlora_fails(ql_attention_forward(g.cuda, &odd, p, p, p, NULL, p, (float *)p), QLORA_ERR_UNSUPPORTED,
                          "head_dim 7");
    ql_attn_shape big = {4, 2, 2, 514};
    ck_assert_qlora_fails(ql_attention_forward(g.cuda, &big, p, p, p, NULL, p, (float *)p), QLORA_ERR_UNSUPPORTED,
                          "head_dim 514");
    ql_attn_shape heads = {4, 3, 2, 8};
    ck_assert_qlora_fails(ql_attention_backward(g.cuda, &heads, p, p, p, NULL, (float *)p, p, p, p, p),
                          QLORA_ERR_SHAPE, "3 query heads");
    ql_attn_shape none = {0, 2, 2, 8};
    ck_assert_qlora_ok(ql_attention_forward(g.cuda, &none, p, p, p, NULL, p, (float *)p));
    ck_assert_qlora_ok(ql_attention_backward(g.cuda, &none, p, p, p, NULL, (float *)p, p, p, p, p));
    uint16_t check[2048];
    dget(&b, check, "untouched buffer");
    for (int i = 0; i < 2048; i++)
        ck_assert_uint_eq(check[i], 0xFFFF);
    dfree(&b);
    gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ attention against a KV cache */

/* FP64 decode attention: query row (i, h) attends keys [0, past + i]. Fills out (the exact
 * values), mag (Σ p·|v|, the size of the sum's terms) and returns the largest per-score
 * Σ_c |q_c·k_c|·scale (what bounds a float32 score's error, > any |score|). */
static double decode_fp64(const ql_attn_shape *s, int64_t past, const uint16_t *q, const uint16_t *k,
                          const uint16_t *v, double *out, double *mag) {
    const int nh = s->heads, nkv = s->kv_heads, d = s->head_dim, group = nh / nkv;
    const double scale = 1.0 / sqrt((double)d);
    double *p = tu_xmalloc((past + s->tokens) * 8), abs_max = 0.0;
    for (int64_t i = 0; i < s->tokens; i++)
        for (int h = 0; h < nh; h++) {
            const int64_t row = i * nh + h, last = past + i;
            const int kvh = h / group;
            double mx = -INFINITY, sum = 0.0;
            for (int64_t j = 0; j <= last; j++) {
                double sc = 0.0, sa = 0.0;
                for (int c = 0; c < d; c++) {
                    double term = bf(q[row * d + c]) * bf(k[(j * nkv + kvh) * d + c]);
                    sc += term;
                    sa += fabs(term);
                }
                p[j] = sc * scale;
                abs_max = fmax(abs_max, sa * scale);
                mx = fmax(mx, p[j]);
            }
            for (int64_t j = 0; j <= last; j++) {
                p[j] = exp(p[j] - mx);
                sum += p[j];
            }
            for (int c = 0; c < d; c++) {
                double o = 0.0, a = 0.0;
                for (int64_t j = 0; j <= last; j++) {
                    double vv = bf(v[(j * nkv + kvh) * d + c]);
                    o += p[j] * vv;
                    a += p[j] * fabs(vv);
                }
                out[row * d + c] = o / sum;
                mag[row * d + c] = a / sum;
            }
        }
    free(p);
    return abs_max;
}

/* One decode shape on the GPU against FP64 and the CPU op. The cache's first and last rows hold
 * values 32 times larger, so a key dropped at either end of the range (or the newest key leaking
 * to an earlier query of a prompt) moves the output far outside the bound. off: bytes added to
 * every device operand's alignment (2: one value at a time). Tolerance, as for the forward:
 * |got − e| <= 1.01·BF·|e| + K·U·A, A = Σ p·|v|, K = 2·(L + d) + 4·(d + 2)·S + 64 with L the keys
 * (float32 sums of L and d terms for the output and the softmax denominator, the split combine
 * adding a few roundings) and S the largest Σ|q·k|·scale of a score (its float32 error, through
 * exp2 into every p). The CPU op obeys the same bound, so the two differ by at most twice it. */
static void decode_case(gpu *g, tu_rng *rng, int64_t past, int64_t tq, int nh, int nkv, int d, size_t off) {
    char what[160];
    snprintf(what, sizeof what, "attention decode past=%lld tq=%lld nh=%d nkv=%d d=%d off=%zu", (long long)past,
             (long long)tq, nh, nkv, d, off);
    ql_attn_shape s = {tq, nh, nkv, d};
    const int64_t L = past + tq, nq = tq * nh * d, nk = L * nkv * d;
    uint16_t *q = tu_random_bf16(rng, nq, 1.0f), *k = tu_random_bf16(rng, nk, 1.0f), *v = tu_random_bf16(rng, nk, 1.0f);
    for (int64_t c = 0; c < nkv * d; c++) { /* ×32 is exact in BF16 */
        v[c] = ql_f32_to_bf16(32.0f * ql_bf16_to_f32(v[c]));
        v[(L - 1) * nkv * d + c] = ql_f32_to_bf16(32.0f * ql_bf16_to_f32(v[(L - 1) * nkv * d + c]));
    }
    uint16_t *out_cpu = tu_xmalloc(nq * 2);
    ck_assert_qlora_ok(ql_attention_decode(g->cpu, &s, q, k, v, past, out_cpu));

    dbuf dq = dfrom(g->cuda, q, nq * 2, off), dk = dfrom(g->cuda, k, nk * 2, off), dv = dfrom(g->cuda, v, nk * 2, off);
    dbuf dout = dnew(g->cuda, nq * 2, off);
    ck_assert_qlora_ok(ql_attention_decode(g->cuda, &s, dptr(&dq), dptr(&dk), dptr(&dv), past, dptr(&dout)));
    uint16_t *got = dload(&dout, what);

    double *want = tu_xmalloc(nq * 8), *mag = tu_xmalloc(nq * 8), *tol = tu_xmalloc(nq * 8);
    const double S = decode_fp64(&s, past, q, k, v, want, mag);
    const double k_u = (2.0 * (L + d) + 4.0 * (d + 2) * S + 64.0) * U;
    for (int64_t i = 0; i < nq; i++)
        tol[i] = 1.01 * BF * fabs(want[i]) + k_u * mag[i] + 1e-30;
    double *gd = bf16_to_doubles(got, nq), *cd = bf16_to_doubles(out_cpu, nq);
    char part[200];
    snprintf(part, sizeof part, "%s: vs FP64", what);
    assert_close(part, gd, want, tol, nq);
    for (int64_t i = 0; i < nq; i++)
        tol[i] *= 2.0;
    snprintf(part, sizeof part, "%s: vs the CPU", what);
    assert_close(part, gd, cd, tol, nq);

    if (past == 0 && tq > 1) { /* a prompt on an empty cache is the forward: the same bits */
        dbuf fo = dnew(g->cuda, nq * 2, off), lse = dnew(g->cuda, tq * nh * 4, 0);
        ck_assert_qlora_ok(
            ql_attention_forward(g->cuda, &s, dptr(&dq), dptr(&dk), dptr(&dv), NULL, dptr(&fo), dptr(&lse)));
        uint16_t *fwd = dload(&fo, "attention forward");
        ck_assert_mem_eq(got, fwd, nq * 2);
        free(fwd);
        dfree(&fo), dfree(&lse);
    }
    dfree(&dq), dfree(&dk), dfree(&dv), dfree(&dout);
    free(q), free(k), free(v), free(out_cpu), free(got), free(want), free(mag), free(tol), free(gd), free(cd);
}

/* GQA 8/2 at d 64 and 128: a prompt (the forward kernel), a step after 300 tokens (a few key
 * ranges) and one after 4095 (many ranges, a split combine over 4096 keys). */
START_TEST(test_attention_decode_gqa) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int dims[2] = {64, 128};
    for (int i = 0; i < 2; i++) {
        decode_case(&g, &rng, 0, 37, 8, 2, dims[i], 0);
        decode_case(&g, &rng, 300, 1, 8, 2, dims[i], 0);
        decode_case(&g, &rng, 4095, 1, 8, 2, dims[i], 0);
    }
    gpu_close(&g);
}
END_TEST

/* Several new tokens after a cache (the per-row key limits inside one CTA), one group per CTA
 * and less, MHA, MQA with a group of 8, the large head sizes, the 4-byte and 2-byte load paths. */
START_TEST(test_attention_decode_other_shapes) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    decode_case(&g, &rng, 100, 9, 8, 2, 64, 0);
    decode_case(&g, &rng, 40, 3, 4, 4, 128, 0); /* group 1: 3 rows per kv head */
    decode_case(&g, &rng, 500, 1, 8, 1, 128, 0);
    decode_case(&g, &rng, 0, 1, 8, 2, 64, 0);   /* the first token: one key */
    decode_case(&g, &rng, 200, 1, 2, 1, 256, 0);
    decode_case(&g, &rng, 100, 2, 2, 2, 512, 0);
    decode_case(&g, &rng, 70, 1, 4, 2, 36, 0);  /* d % 8 != 0: 4-byte loads */
    decode_case(&g, &rng, 130, 2, 4, 2, 64, 2); /* misaligned: 2-byte loads and stores */
    gpu_close(&g);
}
END_TEST

START_TEST(test_attention_decode_bad_arguments) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    dbuf b = dnew(g.cuda, 4096, 0);
    uint16_t *p = dptr(&b);
    ql_attn_shape odd = {1, 2, 2, 7};
    ck_assert_qlora_fails(ql_attention_decode(g.cuda, &odd, p, p, p, 3, p), QLORA_ERR_UNSUPPORTED, "head_dim 7");
    ql_attn_shape heads = {1, 3, 2, 8};
    ck_assert_qlora_fails(ql_attention_decode(g.cuda, &heads, p, p, p, 3, p), QLORA_ERR_SHAPE, "3 heads");
    ql_attn_shape ok = {1, 2, 2, 8};
    ck_assert_qlora_fails(ql_attention_decode(g.cuda, &ok, p, p, p, -1, p), QLORA_ERR_INVALID_ARG, "past");
    ck_assert_qlora_fails(ql_attention_decode(g.cuda, &ok, p, p, p, (int64_t)1 << 31, p), QLORA_ERR_INVALID_ARG,
                          "2^31");
    ck_assert_qlora_fails(ql_attention_decode(g.cuda, &ok, p, (const uint16_t *)((uint8_t *)p + 1), p, 3, p),
                          QLORA_ERR_INVALID_ARG, "k_cache");
    ck_assert_qlora_fails(ql_attention_decode(g.cuda, &ok, p, p, p, 3, NULL), QLORA_ERR_INVALID_ARG, "out");
    ql_attn_shape none = {0, 2, 2, 8};
    ck_assert_qlora_ok(ql_attention_decode(g.cuda, &none, p, p, p, 5, p));
    uint16_t check[2048];
    dget(&b, check, "untouched buffer");
    for (int i = 0; i < 2048; i++)
        ck_assert_uint_eq(check[i], 0xFFFF);
    dfree(&b);
    gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ cross-entropy */

typedef struct xent_case {
    int64_t T, H, V, chunk;
    double denom;
} xent_case;

/* FP64 softmax gradients g[T, V] (already divided by denom, zero rows for ignored labels), the
 * per-row max Σ_h|h·w| over the vocabulary, and the mean loss. */
static double xent_fp64(const xent_case *c, const uint16_t *hidden, const uint16_t *head, const int32_t *labels,
                        double denom, double *g, double *row_abs) {
    double total = 0.0;
    double *logit = tu_xmalloc(c->V * 8);
    for (int64_t t = 0; t < c->T; t++) {
        row_abs[t] = 0.0;
        double mx = -INFINITY;
        for (int64_t v = 0; v < c->V; v++) {
            double sum = 0.0, abs_sum = 0.0;
            for (int64_t h = 0; h < c->H; h++) {
                double term = bf(hidden[t * c->H + h]) * bf(head[v * c->H + h]);
                sum += term;
                abs_sum += fabs(term);
            }
            logit[v] = sum;
            row_abs[t] = fmax(row_abs[t], abs_sum);
            mx = fmax(mx, sum);
        }
        if (labels[t] == QL_IGNORE_INDEX) {
            memset(g + t * c->V, 0, c->V * 8);
            continue;
        }
        double se = 0.0;
        for (int64_t v = 0; v < c->V; v++)
            se += exp(logit[v] - mx);
        double lse = mx + log(se);
        total += lse - logit[labels[t]];
        for (int64_t v = 0; v < c->V; v++)
            g[t * c->V + v] = (exp(logit[v] - lse) - (v == labels[t])) / denom;
    }
    free(logit);
    return total / denom;
}

static void xent_run_case(gpu *g, tu_rng *rng, const xent_case *c, int32_t *labels) {
    const int64_t T = c->T, H = c->H, V = c->V;
    uint16_t *hidden = tu_random_bf16(rng, T * H, 1.0f), *head = tu_random_bf16(rng, V * H, 0.3f);
    ql_xent_args a = {hidden, head, labels, T, H, V, c->chunk, c->denom};
    double loss_cpu = 0.0, loss_gpu = 0.0, loss_only = 0.0;
    int64_t count_cpu = -1, count_gpu = -1, count_only = -1;
    uint16_t *dh_cpu = tu_xmalloc(T * H * 2);
    ck_assert_qlora_ok(ql_cross_entropy(g->cpu, &a, &loss_cpu, &count_cpu, dh_cpu));

    dbuf dh = dfrom(g->cuda, hidden, T * H * 2, 0), dw = dfrom(g->cuda, head, V * H * 2, 0);
    dbuf dl = dfrom(g->cuda, labels, T * 4, 0), ddh = dnew(g->cuda, T * H * 2, 0);
    ql_xent_args ad = {dptr(&dh), dptr(&dw), dptr(&dl), T, H, V, c->chunk, c->denom};
    ck_assert_qlora_ok(ql_cross_entropy(g->cuda, &ad, &loss_gpu, &count_gpu, dptr(&ddh)));
    ck_assert_qlora_ok(ql_cross_entropy(g->cuda, &ad, &loss_only, &count_only, NULL));
    uint16_t *dh_gpu = dload(&ddh, "cross-entropy dhidden");
    ck_assert_int_eq(count_gpu, count_cpu);
    ck_assert_int_eq(count_only, count_cpu);
    ck_assert_msg(loss_only == loss_gpu, "loss without dhidden %.17g != %.17g", loss_only, loss_gpu);

    double denom = c->denom > 0.0 ? c->denom : (double)(count_cpu > 0 ? count_cpu : 1);
    double *gr = tu_xmalloc(T * V * 8), *row_abs = tu_xmalloc(T * 8);
    double loss_ref = xent_fp64(c, hidden, head, labels, denom, gr, row_abs);
    double logit_err = 0.0; /* both sides' float32 logits vs the exact ones */
    for (int64_t t = 0; t < T; t++)
        logit_err = fmax(logit_err, 2.0 * (H + 2) * U * row_abs[t]);
    if (count_cpu == 0) {
        ck_assert(loss_gpu == 0.0);
    } else {
        double tol = 2.0 * logit_err * (double)count_cpu / denom + 1e-12 * (1.0 + fabs(loss_ref));
        ck_assert_msg(fabs(loss_gpu - loss_ref) <= tol && fabs(loss_gpu - loss_cpu) <= 2.0 * tol,
                      "loss: GPU %.12g, CPU %.12g, FP64 %.12g, tol %.3g", loss_gpu, loss_cpu, loss_ref, tol);
    }
    /* dhidden: A = Σ_v |g_v|·|w_vh| (see the header) */
    double *got = bf16_to_doubles(dh_gpu, T * H), *want = tu_xmalloc(T * H * 8), *tol = tu_xmalloc(T * H * 8);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            /* A = Σ|g_v·w_vh|; Pw = Σ (p_v/denom)·|w_vh|: a logit error ε moves p_v by about 2ε·p_v */
            double e = 0.0, A = 0.0, Pw = 0.0;
            for (int64_t v = 0; v < V; v++) {
                double gv = gr[t * V + v], w = bf(head[v * H + h]);
                double pv = labels[t] == QL_IGNORE_INDEX ? 0.0 : gv + (v == labels[t]) / denom;
                e += gv * w;
                A += fabs(gv * w);
                Pw += pv * fabs(w);
            }
            want[t * H + h] = e;
            tol[t * H + h] = 1.01 * BF * fabs(e) + (BF + (4.0 * V + 8.0 * H) * U) * A + 2.5 * logit_err * Pw + 1e-30;
        }
    assert_close("cross-entropy dhidden vs FP64", got, want, tol, T * H);
    for (int64_t i = 0; i < T * H; i++) /* and the CPU's, itself within 1.01·BF + its sums */
        want[i] = bf(dh_cpu[i]);
    for (int64_t i = 0; i < T * H; i++)
        tol[i] = 2.0 * tol[i] + 1.01 * BF * fabs(want[i]);
    assert_close("cross-entropy dhidden vs the CPU", got, want, tol, T * H);

    /* the logits themselves */
    float *lc = tu_xmalloc(T * V * 4), *lg = tu_xmalloc(T * V * 4);
    ck_assert_qlora_ok(ql_lm_head_logits(g->cpu, hidden, head, T, H, V, lc));
    dbuf dlog = dnew(g->cuda, T * V * 4, 0);
    ck_assert_qlora_ok(ql_lm_head_logits(g->cuda, dptr(&dh), dptr(&dw), T, H, V, dptr(&dlog)));
    dget(&dlog, lg, "logits");
    for (int64_t t = 0; t < T; t++)
        for (int64_t v = 0; v < V; v++)
            ck_assert_msg(fabs((double)lg[t * V + v] - lc[t * V + v]) <= 2.0 * (H + 2) * U * row_abs[t] + 1e-30,
                          "logit [%lld, %lld]: GPU %.9g, CPU %.9g", (long long)t, (long long)v, lg[t * V + v],
                          lc[t * V + v]);
    dfree(&dlog);
    free(lc), free(lg);
    free(got), free(want), free(tol), free(gr), free(row_abs);
    dfree(&dh), dfree(&dw), dfree(&dl), dfree(&ddh);
    free(hidden), free(head), free(dh_cpu), free(dh_gpu);
}

START_TEST(test_cross_entropy_matches_cpu) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const xent_case cases[3] = {
        {300, 64, 1000, 0, 0.0},    /* default chunks of 128: the middle one all ignored */
        {300, 64, 1000, 50, 700.0}, /* a given denominator */
        {37, 40, 3001, 1000, 0.0},  /* one chunk, an odd vocabulary */
    };
    for (int c = 0; c < 3; c++) {
        const xent_case *xc = &cases[c];
        int32_t *labels = tu_xmalloc(xc->T * 4);
        for (int64_t t = 0; t < xc->T; t++)
            labels[t] = (tu_next(&rng) % 3 == 0 || (t >= 128 && t < 256)) ? QL_IGNORE_INDEX
                                                                          : (int32_t)(tu_next(&rng) % xc->V);
        labels[0] = (int32_t)xc->V - 1;
        xent_run_case(&g, &rng, xc, labels);
        free(labels);
    }
    gpu_close(&g);
}
END_TEST

START_TEST(test_cross_entropy_ignored_and_bad_labels) {
    SKIP_WITHOUT_GPU();
    gpu g = gpu_open();
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const int64_t T = 60, H = 16, V = 50;
    uint16_t *hidden = tu_random_bf16(&rng, T * H, 1.0f), *head = tu_random_bf16(&rng, V * H, 1.0f);
    int32_t labels[60];
    for (int t = 0; t < T; t++)
        labels[t] = QL_IGNORE_INDEX;
    dbuf dh = dfrom(g.cuda, hidden, T * H * 2, 0), dw = dfrom(g.cuda, head, V * H * 2, 0);
    dbuf dl = dfrom(g.cuda, labels, T * 4, 0), ddh = dnew(g.cuda, T * H * 2, 0);
    ql_xent_args a = {dptr(&dh), dptr(&dw), dptr(&dl), T, H, V, 16, 0.0};
    double loss = -1.0;
    int64_t count = -1;
    /* every label ignored: loss 0, count 0, dhidden written with zeros */
    ck_assert_qlora_ok(ql_cross_entropy(g.cuda, &a, &loss, &count, dptr(&ddh)));
    ck_assert(loss == 0.0);
    ck_assert_int_eq(count, 0);
    uint16_t *zeros = dload(&ddh, "dhidden");
    for (int64_t i = 0; i < T * H; i++)
        ck_assert_uint_eq(zeros[i], 0);
    /* bad labels: the first is named with its value */
    labels[3] = 7;
    labels[17] = (int32_t)V;
    labels[40] = -5;
    ck_assert_qlora_ok(ql_ctx_memcpy(g.cuda, dptr(&dl), labels, sizeof labels));
    ck_assert_qlora_fails(ql_cross_entropy(g.cuda, &a, &loss, &count, dptr(&ddh)), QLORA_ERR_INVALID_ARG,
                          "label[17] = 50");
    labels[17] = 1;
    ck_assert_qlora_ok(ql_ctx_memcpy(g.cuda, dptr(&dl), labels, sizeof labels));
    ck_assert_qlora_fails(ql_cross_entropy(g.cuda, &a, &loss, &count, NULL), QLORA_ERR_INVALID_ARG, "label[40] = -5");
    dfree(&dh), dfree(&dw), dfree(&dl), dfree(&ddh);
    free(hidden), free(head), free(zeros);
    gpu_close(&g);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_model_ops");
    TCase *tc = tcase_create("cuda_model_ops");
    tcase_set_timeout(tc, 600);
    /* No CUDA call here: each test (in its own forked process) opens its own context. */
    tcase_add_test(tc, test_rmsnorm_matches_cpu);
    tcase_add_test(tc, test_rope_matches_cpu);
    tcase_add_test(tc, test_swiglu_and_add_match_cpu);
    tcase_add_test(tc, test_embedding_matches_cpu_and_reports_bad_ids);
    tcase_add_test(tc, test_attention_gqa_packed_d64);
    tcase_add_test(tc, test_attention_gqa_d128_and_t1);
    tcase_add_test(tc, test_attention_other_head_dims_and_alignments);
    tcase_add_test(tc, test_attention_bad_arguments);
    tcase_add_test(tc, test_attention_decode_gqa);
    tcase_add_test(tc, test_attention_decode_other_shapes);
    tcase_add_test(tc, test_attention_decode_bad_arguments);
    tcase_add_test(tc, test_cross_entropy_matches_cpu);
    tcase_add_test(tc, test_cross_entropy_ignored_and_bad_labels);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
