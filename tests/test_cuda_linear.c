/*
 * The CUDA launchers of the QLoRA linear layer (cuda/linear_cuda.h) called directly and compared
 * with references computed here in double precision on the CPU: every 4-bit matmul path (GEMV
 * fast and scalar-safe kernels with each row grouping, FUSED_MMA, DEQUANT_CUBLAS whole and in
 * chunks, AUTO), forward and dX, bias on/off, beta 0/1, shapes that break naive tiling; LoRA
 * dropout bit for bit against the CPU Philox mask; the row-major BF16 GEMM in every transpose
 * combination. Outputs are poisoned (NaN) first and guard bytes around them must survive.
 * Without a CUDA device only the device-free checks (path resolution) run.
 *
 * Tolerance of a BF16 result y against the double reference r (elementwise, rigorous):
 *   |y - r| <= (2^-8 + L * 2^-22) * sum|terms| + 2^-8 * (|r| + |bias| + |beta * y_old|)
 * 2^-8 is BF16's unit roundoff: each path uses a weight within 2^-8 (relative) of
 * code * absmax and rounds the output once (DEQUANT_CUBLAS with bias and beta: twice, covered by
 * the last term); L * 2^-22 bounds FP32 accumulation over the L-term reduction with margin for
 * the tensor cores' truncating adds. On top, ||y - r|| / ||r|| <= 1e-2 over each output: random
 * rounding errors sit near 2e-3, and an indexing bug moves whole dot products.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "internal.h"
#include "philox.h"
#include "quant4.h"
#include "testutil.h"
#ifdef QLORA_HAVE_CUDA
#include "linear_cuda.h"
#include "testutil_cuda.h"
#endif

#ifdef QLORA_HAVE_CUDA

/* ------------------------------------------------------------------ device-free checks */

/* A weight descriptor for path resolution only: pointers are never dereferenced. */
static qlora_qtensor fake_weight(int64_t n, int64_t k, int bs, uintptr_t codes) {
    qlora_qtensor w;
    memset(&w, 0, sizeof w);
    w.type = QLORA_QUANT_NF4;
    w.blocksize = bs;
    w.ndim = 2;
    w.shape[0] = n;
    w.shape[1] = k;
    w.numel = n * k;
    w.nblocks = (w.numel + bs - 1) / bs;
    w.codes = (uint8_t *)codes;
    w.absmax = (float *)(uintptr_t)4096;
    return w;
}

START_TEST(paths_resolve_by_shape_and_alignment) {
    const void *aligned = (const void *)(uintptr_t)65536, *odd = (const void *)(uintptr_t)65538;
    qlora_qtensor w = fake_weight(4096, 4096, 64, 1 << 20);
    /* Forward: M <= 16 is the decode kernel when its fast kernel can run; an explicit GEMV stays
     * GEMV (its scalar-safe kernel takes any shape), AUTO then prefers dequantize + cuBLAS. */
    qlora_qtensor k40 = fake_weight(96, 40, 32, 1 << 20);
    for (int64_t m = 1; m <= 16; m++) {
        ck_assert_int_eq(ql_cuda_nf4_resolve_path(&w, aligned, m, 0, QL_NF4_PATH_AUTO), QL_NF4_PATH_GEMV);
        ck_assert_int_eq(ql_cuda_nf4_resolve_path(&w, odd, m, 0, QL_NF4_PATH_AUTO), QL_NF4_PATH_DEQUANT_CUBLAS);
        ck_assert_int_eq(ql_cuda_nf4_resolve_path(&k40, aligned, m, 0, QL_NF4_PATH_AUTO),
                         QL_NF4_PATH_DEQUANT_CUBLAS);
        ck_assert_int_eq(ql_cuda_nf4_resolve_path(&w, odd, m, 0, QL_NF4_PATH_GEMV), QL_NF4_PATH_GEMV);
        ck_assert_int_eq(ql_cuda_nf4_resolve_path(&k40, aligned, m, 0, QL_NF4_PATH_GEMV), QL_NF4_PATH_GEMV);
    }
    const int64_t ms[] = {1, 3, 16, 17, 64, 200, 512, 513, 4096, 100000};
    for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) {
        int64_t m = ms[i];
        /* AUTO never gives dX the decode kernel, and never the fused kernel where it cannot run. */
        ck_assert_int_ne(ql_cuda_nf4_resolve_path(&w, aligned, m, 1, QL_NF4_PATH_AUTO), QL_NF4_PATH_GEMV);
        ck_assert_int_ne(ql_cuda_nf4_resolve_path(&w, aligned, m, 1, QL_NF4_PATH_GEMV), QL_NF4_PATH_GEMV);
        if (m > 16)
            ck_assert_int_ne(ql_cuda_nf4_resolve_path(&w, aligned, m, 0, QL_NF4_PATH_AUTO), QL_NF4_PATH_GEMV);
        for (int dx = 0; dx < 2; dx++) {
            ck_assert_int_eq(ql_cuda_nf4_resolve_path(&w, aligned, m, dx, QL_NF4_PATH_FUSED_MMA),
                             QL_NF4_PATH_FUSED_MMA);
            ck_assert_int_eq(ql_cuda_nf4_resolve_path(&w, aligned, m, dx, QL_NF4_PATH_DEQUANT_CUBLAS),
                             QL_NF4_PATH_DEQUANT_CUBLAS);
            /* Misaligned activations, K % 64 != 0, misaligned codes: fused falls back. */
            ck_assert_int_eq(ql_cuda_nf4_resolve_path(&w, odd, m, dx, QL_NF4_PATH_FUSED_MMA),
                             QL_NF4_PATH_DEQUANT_CUBLAS);
            ck_assert_int_ne(ql_cuda_nf4_resolve_path(&w, odd, m, dx, QL_NF4_PATH_AUTO), QL_NF4_PATH_FUSED_MMA);
            qlora_qtensor k_odd = fake_weight(96, 4160 + 32, 32, 1 << 20);
            ck_assert_int_eq(ql_cuda_nf4_resolve_path(&k_odd, aligned, m, dx, QL_NF4_PATH_FUSED_MMA),
                             QL_NF4_PATH_DEQUANT_CUBLAS);
            qlora_qtensor shifted = fake_weight(4096, 4096, 64, (1 << 20) + 8);
            ck_assert_int_eq(ql_cuda_nf4_resolve_path(&shifted, aligned, m, dx, QL_NF4_PATH_FUSED_MMA),
                             QL_NF4_PATH_DEQUANT_CUBLAS);
        }
        /* dX reduces over N: fused needs N % 8 == 0, the forward does not. */
        qlora_qtensor n130 = fake_weight(130, 256, 64, 1 << 20);
        ck_assert_int_eq(ql_cuda_nf4_resolve_path(&n130, aligned, m, 1, QL_NF4_PATH_FUSED_MMA),
                         QL_NF4_PATH_DEQUANT_CUBLAS);
        ck_assert_int_eq(ql_cuda_nf4_resolve_path(&n130, aligned, m, 0, QL_NF4_PATH_FUSED_MMA),
                         QL_NF4_PATH_FUSED_MMA);
    }
}
END_TEST

/* ------------------------------------------------------------------ GPU helpers */

#define POISON 0xFF /* BF16 0xFFFF is a NaN: an output that reads it by mistake stays NaN */

/* Random BF16 values N(0, sigma^2), returned as bits and as floats. */
static uint16_t *rand_bf16(tu_rng *rng, int64_t n, float sigma, float **as_float) {
    float *f = malloc((size_t)(n ? n : 1) * sizeof(float));
    ck_assert_ptr_nonnull(f);
    tu_fill_normal(rng, f, n, sigma);
    uint16_t *h = tu_to_dtype(f, n, QLORA_BF16);
    for (int64_t i = 0; i < n; i++)
        f[i] = ql_bf16_to_f32(h[i]);
    if (as_float)
        *as_float = f;
    else
        free(f);
    return h;
}

/* A random quantized weight [n, k] on the device (codes `code_off` bytes past an aligned
 * address) and its float32 dequantization code * absmax on the host. */
typedef struct weight {
    qlora_qtensor q;
    float *w;
    tu_dbuf codes, absmax, qabsmax, nested;
} weight;

static void weight_make(tu_gpu *g, tu_rng *rng, int64_t n, int64_t k, int bs, int dq, qlora_quant_type type,
                        size_t code_off, weight *out) {
    memset(out, 0, sizeof *out);
    int64_t numel = n * k, nblocks = (numel + bs - 1) / bs, nested_n = (nblocks + 255) / 256;
    size_t ncodes = (size_t)(numel + 1) / 2;
    uint8_t *codes = malloc(ncodes + 1), *qabsmax = malloc((size_t)nblocks + 1);
    float *absmax = malloc((size_t)(nblocks + 1) * 4), *nested = malloc((size_t)(nested_n + 1) * 4);
    float *decoded = malloc((size_t)(nblocks + 1) * 4);
    out->w = malloc((size_t)(numel + 1) * 4);
    ck_assert(codes && qabsmax && absmax && nested && decoded && out->w);
    for (size_t j = 0; j < ncodes; j++)
        codes[j] = (uint8_t)tu_next(rng);
    for (int64_t b = 0; b < nblocks; b++) {
        absmax[b] = (float)fabs(tu_normal(rng)) * 0.08f + 0.01f;
        qabsmax[b] = (uint8_t)tu_next(rng);
    }
    for (int64_t j = 0; j < nested_n; j++)
        nested[j] = (float)fabs(tu_normal(rng)) * 0.05f + 0.01f;
    float offset = 0.06f + (float)fabs(tu_normal(rng)) * 0.01f;
    const float *dyn = qlora_dynamic_map_signed();
    if (dq)
        ql_double_dequant_ref(qabsmax, nested, offset, dyn, nblocks, decoded);
    else
        memcpy(decoded, absmax, (size_t)nblocks * 4);
    ql_dequant4_ref(codes, decoded, qlora_quant_codebook(type), numel, bs, out->w, QLORA_F32);

    out->codes = tu_dbuf_from(g, codes, ncodes, code_off);
    qlora_qtensor *q = &out->q;
    q->type = type;
    q->blocksize = bs;
    q->double_quant = dq;
    q->dtype = QLORA_BF16;
    q->ndim = 2;
    q->shape[0] = n;
    q->shape[1] = k;
    q->numel = numel;
    q->nblocks = nblocks;
    q->codes = tu_dbuf_ptr(&out->codes);
    if (dq) {
        out->qabsmax = tu_dbuf_from(g, qabsmax, (size_t)nblocks, 0);
        out->nested = tu_dbuf_from(g, nested, (size_t)nested_n * 4, 0);
        q->nested_nblocks = nested_n;
        q->qabsmax = tu_dbuf_ptr(&out->qabsmax);
        q->nested_absmax = tu_dbuf_ptr(&out->nested);
        q->nested_offset = offset;
    } else {
        out->absmax = tu_dbuf_from(g, absmax, (size_t)nblocks * 4, 0);
        q->absmax = tu_dbuf_ptr(&out->absmax);
    }
    memcpy(q->code, qlora_quant_codebook(type), sizeof q->code);
    memcpy(q->nested_code, dyn, sizeof q->nested_code);
    q->device = 0;
    ql_copy_name(q->name, "test.weight");
    free(codes);
    free(qabsmax);
    free(absmax);
    free(nested);
    free(decoded);
}

static void weight_free(tu_gpu *g, weight *w) {
    tu_dbuf_free(g, &w->codes);
    if (w->q.double_quant) {
        tu_dbuf_free(g, &w->qabsmax);
        tu_dbuf_free(g, &w->nested);
    } else {
        tu_dbuf_free(g, &w->absmax);
    }
    free(w->w);
}

/* dot[i, j] = sum_l a[i, l] * b(l, j) and absdot = sum |...| in double, where b(l, j) =
 * b[j * bs_j + l * bs_l] (so one routine serves X·Wᵀ and dY·W). */
static void ref_product(const float *a, int64_t rows, int64_t len, const float *b, int64_t cols, int64_t bs_j,
                        int64_t bs_l, double *dot, double *absdot) {
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t j = 0; j < cols; j++) {
            double s = 0.0, sa = 0.0;
            for (int64_t l = 0; l < len; l++) {
                double p = (double)a[i * len + l] * (double)b[j * bs_j + l * bs_l];
                s += p;
                sa += fabs(p);
            }
            dot[i * cols + j] = s;
            absdot[i * cols + j] = sa;
        }
    }
}

/* Checks a BF16 output [rows, cols] against dot (+ bias[col]) (+ beta * y_old) with the
 * tolerance of the file comment; len = reduction length. */
static void check_out(const char *what, const uint16_t *got, int64_t rows, int64_t cols, int64_t len,
                      const double *dot, const double *absdot, const uint16_t *bias, float beta,
                      const uint16_t *y_old) {
    double err2 = 0.0, ref2 = 0.0;
    const double u = ldexp(1.0, -8), acc = (double)len * ldexp(1.0, -22);
    for (int64_t i = 0; i < rows * cols; i++) {
        double b = bias ? (double)ql_bf16_to_f32(bias[i % cols]) : 0.0;
        double old = beta != 0.0f ? (double)beta * (double)ql_bf16_to_f32(y_old[i]) : 0.0;
        double want = dot[i] + b + old;
        double tol = (u + acc) * absdot[i] + u * (fabs(want) + fabs(b) + fabs(old)) + 1e-30;
        double v = (double)ql_bf16_to_f32(got[i]);
        ck_assert_msg(isfinite(v) && fabs(v - want) <= tol,
                      "%s: element (%lld, %lld) = %.9g, reference %.9g (tol %.3g)", what, (long long)(i / cols),
                      (long long)(i % cols), v, want, tol);
        err2 += (v - want) * (v - want);
        ref2 += want * want;
    }
    ck_assert_msg(sqrt(err2) <= 1e-2 * sqrt(ref2) + 1e-30, "%s: relative L2 error %.3g > 1e-2", what,
                  sqrt(err2) / sqrt(ref2));
}

static const char *path_name(ql_nf4_matmul_path p) {
    switch (p) {
    case QL_NF4_PATH_GEMV: return "GEMV";
    case QL_NF4_PATH_FUSED_MMA: return "FUSED_MMA";
    case QL_NF4_PATH_DEQUANT_CUBLAS: return "DEQUANT_CUBLAS";
    default: return "AUTO";
    }
}

/* How one call is made: a path, or the GEMV with forced row groups, and the workspace cap. */
typedef struct variant {
    ql_nf4_matmul_path path;
    int row_groups;   /* > 0: ql_cuda_nf4_gemv_tuned with this many */
    size_t cap;       /* 0: default workspace cap */
} variant;

/* ------------------------------------------------------------------ forward */

typedef struct shape {
    int64_t n, k;
    int bs;
} shape;

/* N and K not multiples of the tiles; K < 64, K % 32 != 0, K % 64 != 0 with K % 32 == 0, blocks
 * that straddle rows (K < blocksize), blocksize 32 with K % 64 == 0. */
static const shape shapes[] = {
    {96, 4160, 64}, {72, 40, 32}, {130, 256, 128}, {200, 96, 64}, {136, 192, 32}, {66, 320, 256},
};
static const int64_t ms[] = {1, 3, 16, 17, 64, 200};

static void run_forward(tu_gpu *g, tu_rng *rng, const weight *wt, int64_t m, size_t x_off, const char *tag) {
    const int64_t n = wt->q.shape[0], k = wt->q.shape[1];
    float *xf = NULL;
    uint16_t *x = rand_bf16(rng, m * k, 1.0f, &xf);
    uint16_t *bias = rand_bf16(rng, n, 0.5f, NULL);
    uint16_t *y_old = rand_bf16(rng, m * n, 2.0f, NULL);
    uint16_t *got = malloc((size_t)(m * n) * 2);
    double *dot = malloc((size_t)(m * n) * sizeof(double)), *absdot = malloc((size_t)(m * n) * sizeof(double));
    ck_assert(got && dot && absdot);
    ref_product(xf, m, k, wt->w, n, k, 1, dot, absdot);

    tu_dbuf d_x = tu_dbuf_from(g, x, (size_t)(m * k) * 2, x_off);
    tu_dbuf d_bias = tu_dbuf_from(g, bias, (size_t)n * 2, 0);
    tu_dbuf d_y = tu_dbuf_new(g, (size_t)(m * n) * 2, 0);
    variant vs[12];
    int nv = 0;
    if (m <= 16) {
        vs[nv++] = (variant){QL_NF4_PATH_GEMV, 0, 0};
        for (int rg = 1; rg <= 4; rg *= 2)
            vs[nv++] = (variant){QL_NF4_PATH_GEMV, rg, 0};
    }
    vs[nv++] = (variant){QL_NF4_PATH_FUSED_MMA, 0, 0};
    vs[nv++] = (variant){QL_NF4_PATH_DEQUANT_CUBLAS, 0, 0};
    vs[nv++] = (variant){QL_NF4_PATH_DEQUANT_CUBLAS, 0, 1}; /* smallest cap: many chunks */
    vs[nv++] = (variant){QL_NF4_PATH_AUTO, 0, 0};
    for (int v = 0; v < nv; v++) {
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            for (int b1 = 0; b1 < 2; b1++) {
                float beta = b1 ? 1.0f : 0.0f;
                const uint16_t *dbias = with_bias ? tu_dbuf_ptr(&d_bias) : NULL;
                if (b1) {
                    tu_dbuf_set(g, &d_y, y_old);
                } else { /* NaN everywhere: beta = 0 must not read Y */
                    uint16_t *nan = malloc((size_t)(m * n) * 2);
                    ck_assert_ptr_nonnull(nan);
                    memset(nan, POISON, (size_t)(m * n) * 2);
                    tu_dbuf_set(g, &d_y, nan);
                    free(nan);
                }
                ql_cuda_set_workspace_cap(g->cs, vs[v].cap);
                char what[256];
                ql_nf4_matmul_path ran = ql_cuda_nf4_resolve_path(&wt->q, tu_dbuf_ptr(&d_x), m, 0, vs[v].path);
                snprintf(what, sizeof what,
                         "%s forward %s (ran %s, row groups %d, cap %zu) M %lld N %lld K %lld bs %d%s%s%s", tag,
                         path_name(vs[v].path), path_name(ran), vs[v].row_groups, vs[v].cap, (long long)m,
                         (long long)n, (long long)k, wt->q.blocksize, wt->q.double_quant ? " dq" : "",
                         with_bias ? " bias" : "", b1 ? " beta=1" : "");
                if (vs[v].row_groups)
                    ck_assert_qlora_ok(ql_cuda_nf4_gemv_tuned(g->cs, &wt->q, tu_dbuf_ptr(&d_x), m, dbias, beta,
                                                              tu_dbuf_ptr(&d_y), vs[v].row_groups));
                else
                    ck_assert_qlora_ok(ql_cuda_nf4_matmul(g->cs, &wt->q, tu_dbuf_ptr(&d_x), m, dbias, beta,
                                                          tu_dbuf_ptr(&d_y), vs[v].path));
                tu_dbuf_get(g, &d_y, got, what);
                check_out(what, got, m, n, k, dot, absdot, with_bias ? bias : NULL, beta, y_old);
                if (ran == QL_NF4_PATH_DEQUANT_CUBLAS) {
                    size_t ws = ql_cuda_workspace_bytes(g->cs);
                    ck_assert_msg(ws > 0, "%s: no workspace after a dequantize + cuBLAS call", what);
                }
            }
        }
    }
    ql_cuda_set_workspace_cap(g->cs, 0);
    tu_dbuf_free(g, &d_x);
    tu_dbuf_free(g, &d_bias);
    tu_dbuf_free(g, &d_y);
    free(x);
    free(xf);
    free(bias);
    free(y_old);
    free(got);
    free(dot);
    free(absdot);
}

START_TEST(forward_matches_reference) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x71);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) {
            weight wt;
            int dq = (int)((s + i) % 2);
            qlora_quant_type type = (s + 2 * i) % 5 == 4 ? QLORA_QUANT_FP4 : QLORA_QUANT_NF4;
            weight_make(&g, &rng, shapes[s].n, shapes[s].k, shapes[s].bs, dq, type, 0, &wt);
            run_forward(&g, &rng, &wt, ms[i], 0, qlora_quant_type_name(type));
            weight_free(&g, &wt);
        }
    }
    tu_gpu_close(&g);
}
END_TEST

/* Misaligned codes and activations take the scalar-safe and fallback kernels. */
START_TEST(forward_misaligned_operands) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x72);
    const size_t code_offs[] = {1, 4, 8};
    for (size_t c = 0; c < sizeof code_offs / sizeof code_offs[0]; c++) {
        const int64_t mm[] = {3, 17};
        for (size_t i = 0; i < 2; i++) {
            weight wt;
            weight_make(&g, &rng, 96, 4160, 64, 1, QLORA_QUANT_NF4, code_offs[c], &wt);
            /* codes + 8 with aligned X: the fast GEMV (8-byte code loads) but not the fused kernel */
            run_forward(&g, &rng, &wt, mm[i], code_offs[c] == 8 ? 0 : 2 * (c + 1), "misaligned");
            weight_free(&g, &wt);
        }
    }
    tu_gpu_close(&g);
}
END_TEST

/* A tall weight reaches every GEMV row grouping with many CTAs, and K long enough for several
 * batches of rounds per warp. */
START_TEST(forward_large_shapes) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x73);
    const shape big[] = {{4100, 512, 64}, {520, 11008, 64}, {264, 4096, 32}};
    const int64_t mm[] = {1, 9, 16, 300};
    for (size_t s = 0; s < sizeof big / sizeof big[0]; s++) {
        for (size_t i = 0; i < sizeof mm / sizeof mm[0]; i++) {
            weight wt;
            weight_make(&g, &rng, big[s].n, big[s].k, big[s].bs, (int)(i % 2), QLORA_QUANT_NF4, 0, &wt);
            run_forward(&g, &rng, &wt, mm[i], 0, "large");
            weight_free(&g, &wt);
        }
    }
    tu_gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ dX */

static void run_dx(tu_gpu *g, tu_rng *rng, const weight *wt, int64_t m, size_t dy_off) {
    const int64_t n = wt->q.shape[0], k = wt->q.shape[1];
    float *dyf = NULL;
    uint16_t *dy = rand_bf16(rng, m * n, 1.0f, &dyf);
    uint16_t *dx_old = rand_bf16(rng, m * k, 2.0f, NULL);
    uint16_t *got = malloc((size_t)(m * k) * 2);
    double *dot = malloc((size_t)(m * k) * sizeof(double)), *absdot = malloc((size_t)(m * k) * sizeof(double));
    ck_assert(got && dot && absdot);
    ref_product(dyf, m, n, wt->w, k, 1, k, dot, absdot);

    tu_dbuf d_dy = tu_dbuf_from(g, dy, (size_t)(m * n) * 2, dy_off);
    tu_dbuf d_dx = tu_dbuf_new(g, (size_t)(m * k) * 2, 0);
    const variant vs[] = {
        {QL_NF4_PATH_FUSED_MMA, 0, 0}, {QL_NF4_PATH_DEQUANT_CUBLAS, 0, 0}, {QL_NF4_PATH_DEQUANT_CUBLAS, 0, 1},
        {QL_NF4_PATH_AUTO, 0, 0},      {QL_NF4_PATH_GEMV, 0, 0},
    };
    for (size_t v = 0; v < sizeof vs / sizeof vs[0]; v++) {
        for (int b1 = 0; b1 < 2; b1++) {
            float beta = b1 ? 1.0f : 0.0f;
            if (b1) {
                tu_dbuf_set(g, &d_dx, dx_old);
            } else {
                uint16_t *nan = malloc((size_t)(m * k) * 2);
                ck_assert_ptr_nonnull(nan);
                memset(nan, POISON, (size_t)(m * k) * 2);
                tu_dbuf_set(g, &d_dx, nan);
                free(nan);
            }
            ql_cuda_set_workspace_cap(g->cs, vs[v].cap);
            ql_nf4_matmul_path ran = ql_cuda_nf4_resolve_path(&wt->q, tu_dbuf_ptr(&d_dy), m, 1, vs[v].path);
            ck_assert_int_ne(ran, QL_NF4_PATH_GEMV);
            char what[256];
            snprintf(what, sizeof what, "dX %s (ran %s, cap %zu) M %lld N %lld K %lld bs %d%s%s", path_name(vs[v].path),
                     path_name(ran), vs[v].cap, (long long)m, (long long)n, (long long)k, wt->q.blocksize,
                     wt->q.double_quant ? " dq" : "", b1 ? " beta=1" : "");
            ck_assert_qlora_ok(
                ql_cuda_nf4_matmul_dx(g->cs, &wt->q, tu_dbuf_ptr(&d_dy), m, beta, tu_dbuf_ptr(&d_dx), vs[v].path));
            tu_dbuf_get(g, &d_dx, got, what);
            check_out(what, got, m, k, n, dot, absdot, NULL, beta, dx_old);
        }
    }
    ql_cuda_set_workspace_cap(g->cs, 0);
    tu_dbuf_free(g, &d_dy);
    tu_dbuf_free(g, &d_dx);
    free(dy);
    free(dyf);
    free(dx_old);
    free(got);
    free(dot);
    free(absdot);
}

START_TEST(dx_matches_reference) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x74);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) {
            weight wt;
            weight_make(&g, &rng, shapes[s].n, shapes[s].k, shapes[s].bs, (int)((s + i) % 2),
                        i == 2 ? QLORA_QUANT_FP4 : QLORA_QUANT_NF4, 0, &wt);
            run_dx(&g, &rng, &wt, ms[i], i == 3 ? 2 : 0);
            weight_free(&g, &wt);
        }
    }
    /* Several reduction tiles and output tiles, partial in both. */
    weight wt;
    weight_make(&g, &rng, 392, 1088, 64, 1, QLORA_QUANT_NF4, 0, &wt);
    run_dx(&g, &rng, &wt, 300, 0);
    weight_free(&g, &wt);
    tu_gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ dropout */

START_TEST(dropout_mask_equals_cpu) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x75);
    const int64_t sizes[][2] = {{1, 1}, {1, 3}, {3, 37}, {17, 129}, {64, 4099}};
    const float ps[] = {0.0f, 0.1f, 0.5f, 0.999f};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        for (size_t pi = 0; pi < sizeof ps / sizeof ps[0]; pi++) {
            for (int in_place = 0; in_place < 2; in_place++) {
                int64_t m = sizes[s][0], k = sizes[s][1], n = m * k;
                float p = ps[pi];
                uint64_t seed = tu_next(&rng), stream = tu_next(&rng);
                uint16_t *x = rand_bf16(&rng, n, 1.0f, NULL);
                uint16_t *want = malloc((size_t)n * 2), *got = malloc((size_t)n * 2);
                ck_assert(want && got);
                float scale = 1.0f / (1.0f - p);
                int64_t kept = 0;
                for (int64_t i = 0; i < n; i++) {
                    int keep = ql_philox_uniform(seed, stream, (uint64_t)i) >= p;
                    kept += keep;
                    want[i] = keep ? ql_f32_to_bf16(ql_bf16_to_f32(x[i]) * scale) : 0;
                }
                if (p == 0.0f)
                    ck_assert_int_eq(kept, n);
                size_t off = (size_t)(s % 2) * 2; /* odd element offsets too */
                tu_dbuf d_x = tu_dbuf_from(&g, x, (size_t)n * 2, off);
                tu_dbuf d_out = in_place ? d_x : tu_dbuf_new(&g, (size_t)n * 2, off);
                ck_assert_qlora_ok(
                    ql_cuda_dropout_bf16(g.cs, tu_dbuf_ptr(&d_x), m, k, p, seed, stream, tu_dbuf_ptr(&d_out)));
                char what[160];
                snprintf(what, sizeof what, "dropout [%lld, %lld] p %g%s", (long long)m, (long long)k, (double)p,
                         in_place ? " in place" : "");
                tu_dbuf_get(&g, &d_out, got, what);
                for (int64_t i = 0; i < n; i++)
                    ck_assert_msg(got[i] == want[i], "%s: element %lld is 0x%04x, CPU 0x%04x (mask %d)", what,
                                  (long long)i, got[i], want[i],
                                  ql_philox_uniform(seed, stream, (uint64_t)i) >= p);
                tu_dbuf_free(&g, &d_x);
                if (!in_place)
                    tu_dbuf_free(&g, &d_out);
                free(x);
                free(want);
                free(got);
            }
        }
    }
    uint16_t *d = NULL;
    ck_assert_qlora_ok(qlora_alloc(g.ctx, 64, 1, QLORA_MEM_WORKSPACE, (void **)&d));
    ck_assert_qlora_fails(ql_cuda_dropout_bf16(g.cs, d, 2, 2, 1.0f, 1, 2, d), QLORA_ERR_INVALID_ARG, "[0, 1)");
    ck_assert_qlora_fails(ql_cuda_dropout_bf16(g.cs, d, 2, 2, -0.25f, 1, 2, d), QLORA_ERR_INVALID_ARG, "[0, 1)");
    ck_assert_qlora_fails(ql_cuda_dropout_bf16(g.cs, d, 2, 2, NAN, 1, 2, d), QLORA_ERR_INVALID_ARG, "[0, 1)");
    ck_assert_qlora_fails(ql_cuda_dropout_bf16(g.cs, d, -1, 2, 0.5f, 1, 2, d), QLORA_ERR_SHAPE, "negative");
    qlora_free(g.ctx, d);
    tu_gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ BF16 GEMM */

static void check_gemm(tu_gpu *g, tu_rng *rng, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, float beta,
                       int c_f32) {
    float *af = NULL, *bf = NULL, *cf = NULL;
    uint16_t *a = rand_bf16(rng, m * k, 1.0f, &af), *b = rand_bf16(rng, k * n, 1.0f, &bf);
    uint16_t *c0 = rand_bf16(rng, m * n, 1.0f, &cf);
    size_t csz = c_f32 ? 4 : 2;
    void *cin = c_f32 ? (void *)cf : (void *)c0;
    void *got = malloc((size_t)(m * n) * csz);
    ck_assert_ptr_nonnull(got);
    tu_dbuf d_a = tu_dbuf_from(g, a, (size_t)(m * k) * 2, 0), d_b = tu_dbuf_from(g, b, (size_t)(k * n) * 2, 0);
    tu_dbuf d_c = tu_dbuf_new(g, (size_t)(m * n) * csz, 0);
    if (beta != 0.0f)
        tu_dbuf_set(g, &d_c, cin);
    ck_assert_qlora_ok(ql_cuda_gemm_bf16(g->cs, ta, tb, m, n, k, alpha, tu_dbuf_ptr(&d_a), tu_dbuf_ptr(&d_b), beta,
                                         tu_dbuf_ptr(&d_c), c_f32));
    char what[160];
    snprintf(what, sizeof what, "gemm %s%s m %lld n %lld k %lld alpha %g beta %g %s", ta ? "T" : "N", tb ? "T" : "N",
             (long long)m, (long long)n, (long long)k, (double)alpha, (double)beta, c_f32 ? "F32" : "BF16");
    tu_dbuf_get(g, &d_c, got, what);
    double err2 = 0.0, ref2 = 0.0;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < n; j++) {
            double s = 0.0, sa = 0.0;
            for (int64_t l = 0; l < k; l++) {
                double av = ta ? af[l * m + i] : af[i * k + l], bv = tb ? bf[j * k + l] : bf[l * n + j];
                s += av * bv;
                sa += fabs(av * bv);
            }
            double old = beta != 0.0f ? (double)beta * (double)cf[i * n + j] : 0.0;
            double want = (double)alpha * s + old;
            double v = c_f32 ? (double)((float *)got)[i * n + j] : (double)ql_bf16_to_f32(((uint16_t *)got)[i * n + j]);
            double tol = (double)k * ldexp(1.0, -22) * fabs((double)alpha) * sa +
                         (c_f32 ? ldexp(1.0, -22) : ldexp(1.0, -8)) * (fabs(want) + fabs(old)) + 1e-30;
            ck_assert_msg(isfinite(v) && fabs(v - want) <= tol, "%s: (%lld, %lld) = %.9g, reference %.9g", what,
                          (long long)i, (long long)j, v, want);
            err2 += (v - want) * (v - want);
            ref2 += want * want;
        }
    }
    ck_assert_msg(sqrt(err2) <= 1e-2 * sqrt(ref2) + 1e-30, "%s: relative L2 error %.3g", what, sqrt(err2 / ref2));
    tu_dbuf_free(g, &d_a);
    tu_dbuf_free(g, &d_b);
    tu_dbuf_free(g, &d_c);
    free(a);
    free(b);
    free(c0);
    free(af);
    free(bf);
    free(cf);
    free(got);
}

START_TEST(gemm_bf16_matches_reference) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x76);
    const int64_t dims[][3] = {{1, 1, 1}, {5, 7, 3}, {33, 17, 65}, {128, 96, 4160}, {200, 8, 64}, {4, 3, 0}};
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++)
        for (int t = 0; t < 4; t++)
            for (int f = 0; f < 2; f++)
                for (int b = 0; b < 2; b++)
                    check_gemm(&g, &rng, t & 1, t >> 1, dims[d][0], dims[d][1], dims[d][2], 0.75f,
                               b ? -1.25f : 0.0f, f);
    tu_gpu_close(&g);
}
END_TEST

/* ------------------------------------------------------------------ bad input, workspace */

START_TEST(bad_arguments_are_reported) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x77);
    weight wt;
    weight_make(&g, &rng, 64, 128, 64, 1, QLORA_QUANT_NF4, 0, &wt);
    tu_dbuf x = tu_dbuf_new(&g, 32 * 128 * 2, 0), y = tu_dbuf_new(&g, 32 * 64 * 2, 0);
    uint16_t *dx = tu_dbuf_ptr(&x), *dy = tu_dbuf_ptr(&y);
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &wt.q, dx, 17, NULL, 0.0f, dy, QL_NF4_PATH_GEMV),
                          QLORA_ERR_INVALID_ARG, "M <= 16");
    ck_assert_qlora_fails(ql_cuda_nf4_gemv_tuned(g.cs, &wt.q, dx, 4, NULL, 0.0f, dy, 3), QLORA_ERR_INVALID_ARG,
                          "row_groups 3");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &wt.q, NULL, 4, NULL, 0.0f, dy, QL_NF4_PATH_AUTO),
                          QLORA_ERR_INVALID_ARG, "X is NULL");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &wt.q, dx, 4, NULL, 0.0f, NULL, QL_NF4_PATH_AUTO),
                          QLORA_ERR_INVALID_ARG, "Y is NULL");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &wt.q, dx + 1, 4, (const uint16_t *)((uint8_t *)dy + 1), 0.0f, dy,
                                             QL_NF4_PATH_AUTO),
                          QLORA_ERR_INVALID_ARG, "bias");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &wt.q, dx, -1, NULL, 0.0f, dy, QL_NF4_PATH_AUTO), QLORA_ERR_SHAPE,
                          "M = -1");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &wt.q, dx, 4, NULL, NAN, dy, QL_NF4_PATH_AUTO),
                          QLORA_ERR_INVALID_ARG, "beta");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &wt.q, dx, 4, NULL, 0.0f, dy, (ql_nf4_matmul_path)9),
                          QLORA_ERR_INVALID_ARG, "unknown path");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, NULL, dx, 4, NULL, 0.0f, dy, QL_NF4_PATH_AUTO),
                          QLORA_ERR_INVALID_ARG, "weight is NULL");
    qlora_qtensor bad = wt.q;
    bad.device = 3;
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &bad, dx, 4, NULL, 0.0f, dy, QL_NF4_PATH_AUTO), QLORA_ERR_DEVICE,
                          "test.weight");
    ck_assert_qlora_fails(ql_cuda_nf4_matmul_dx(g.cs, &bad, dy, 4, 0.0f, dx, QL_NF4_PATH_AUTO), QLORA_ERR_DEVICE,
                          "test.weight");
    bad = wt.q;
    bad.ndim = 1;
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &bad, dx, 4, NULL, 0.0f, dy, QL_NF4_PATH_AUTO), QLORA_ERR_SHAPE,
                          "2-D");
    bad = wt.q;
    bad.nblocks = 3;
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &bad, dx, 4, NULL, 0.0f, dy, QL_NF4_PATH_AUTO),
                          QLORA_ERR_INVALID_ARG, "nblocks");
    bad = wt.q;
    bad.qabsmax = NULL;
    ck_assert_qlora_fails(ql_cuda_nf4_matmul(g.cs, &bad, dx, 4, NULL, 0.0f, dy, QL_NF4_PATH_AUTO),
                          QLORA_ERR_INVALID_ARG, "block scales");
    ck_assert_qlora_fails(ql_cuda_gemm_bf16(g.cs, 0, 0, 2, 2, 2, 1.0f, dx, dx, 0.0f, (uint8_t *)dy + 2, 1),
                          QLORA_ERR_INVALID_ARG, "aligned");
    ck_assert_qlora_fails(ql_cuda_gemm_bf16(g.cs, 0, 0, -2, 2, 2, 1.0f, dx, dx, 0.0f, dy, 0), QLORA_ERR_SHAPE,
                          "negative");
    /* M == 0 does nothing and succeeds. */
    ck_assert_qlora_ok(ql_cuda_nf4_matmul(g.cs, &wt.q, NULL, 0, NULL, 0.0f, NULL, QL_NF4_PATH_AUTO));
    ck_assert_qlora_ok(ql_cuda_nf4_matmul_dx(g.cs, &wt.q, NULL, 0, 0.0f, NULL, QL_NF4_PATH_AUTO));

    /* The workspace grows to what a call needs (one chunk under the cap), then is released. */
    /* It is a tracked WORKSPACE allocation of the context, so the accountant sees it. */
    qlora_mem_stats before, during, after;
    ql_cuda_workspace_release(g.cs);
    ck_assert_uint_eq(ql_cuda_workspace_bytes(g.cs), 0);
    ck_assert_qlora_ok(qlora_mem_get_stats(g.ctx, &before));
    ck_assert_qlora_ok(ql_cuda_nf4_matmul(g.cs, &wt.q, dx, 32, NULL, 0.0f, dy, QL_NF4_PATH_DEQUANT_CUBLAS));
    ck_assert_uint_eq(ql_cuda_workspace_bytes(g.cs), 64 * 128 * 2);
    ck_assert_qlora_ok(qlora_mem_get_stats(g.ctx, &during));
    ck_assert_uint_eq(during.current[1][QLORA_MEM_WORKSPACE] - before.current[1][QLORA_MEM_WORKSPACE], 64 * 128 * 2);
    ql_cuda_workspace_release(g.cs);
    ck_assert_uint_eq(ql_cuda_workspace_bytes(g.cs), 0);
    ck_assert_qlora_ok(qlora_mem_get_stats(g.ctx, &after));
    ck_assert_uint_eq(after.current[1][QLORA_MEM_WORKSPACE], before.current[1][QLORA_MEM_WORKSPACE]);
    tu_dbuf_free(&g, &x);
    tu_dbuf_free(&g, &y);
    weight_free(&g, &wt);
    tu_gpu_close(&g);
}
END_TEST

#else /* !QLORA_HAVE_CUDA */

/* A CPU-only build has no CUDA backend and reports no device. */
START_TEST(cpu_only_build_has_no_cuda_backend) {
    ck_assert_int_eq(qlora_has_cuda_backend(), 0);
    ck_assert_int_eq(qlora_cuda_device_count(), 0);
}
END_TEST

#endif /* QLORA_HAVE_CUDA */

int main(void) {
    Suite *s = suite_create("cuda_linear");
    TCase *tc = tcase_create("cuda_linear");
    tcase_set_timeout(tc, 600);
#ifdef QLORA_HAVE_CUDA
    /* No CUDA call here: a CUDA context created before Check forks would be unusable in the
     * forked test processes. Each test finds out for itself whether a device is there. */
    tcase_add_test(tc, paths_resolve_by_shape_and_alignment);
    tcase_add_test(tc, forward_matches_reference);
    tcase_add_test(tc, forward_misaligned_operands);
    tcase_add_test(tc, forward_large_shapes);
    tcase_add_test(tc, dx_matches_reference);
    tcase_add_test(tc, dropout_mask_equals_cpu);
    tcase_add_test(tc, gemm_bf16_matches_reference);
    tcase_add_test(tc, bad_arguments_are_reported);
#else
    tcase_add_test(tc, cpu_only_build_has_no_cuda_backend);
#endif
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
