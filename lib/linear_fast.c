/*
 * The QLoRA linear layer, fast CPU path (lib/linear_internal.h). W is never dequantized whole:
 * each thread decodes a tile of it to float32 (up to 2 MiB, so it stays in cache) and
 * multiplies it with OpenBLAS' sgemm right away. The forward cuts W into row tiles (a slice of
 * the output columns each); dX = dY·W cuts it into column tiles (a slice of dX's columns each),
 * so no two threads write the same output. The LoRA products are small GEMMs on the whole batch.
 *
 * OpenBLAS must be its OpenMP build (Debian: libopenblas0-openmp): inside our parallel regions
 * it then runs single-threaded, outside them it uses the same thread pool.
 */
#include "linear_internal.h"
#include "simd_attrs.h"

#include <cblas.h>
#include <omp.h>
#include <string.h>

/* Bytes of float32 weight a thread decodes at once: large enough that each sgemm call amortizes
 * packing its other operand (X in the forward, dY for dX, which spans all N rows and so gets a
 * larger tile), small enough to stay in L2/L3. Measured on x86-64 with OpenBLAS 0.3.21. */
#define QL_TILE_BYTES_FORWARD (2 << 20)
#define QL_TILE_BYTES_DX (2 << 20)
/* Below this many elements a conversion loop runs on one thread, and below this many
 * multiply-adds (M + 1 for the decoding) a tiled product does: a parallel region and its
 * barrier cost more than that work. */
#define QL_PARALLEL_MIN (1 << 15)
#define QL_PARALLEL_MIN_MACS (1 << 21)

static int thread_count(const qlora_ctx *ctx) {
    return ctx->params.num_threads > 0 ? ctx->params.num_threads : omp_get_max_threads();
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- workspace: one tracked allocation carved into float32 arrays ---- */

typedef struct workspace {
    qlora_ctx *ctx;
    float *base;
    size_t used, cap;  /* in floats */
} workspace;

/* Each array is rounded up to 64 floats so they all start 256-byte aligned. */
static size_t padded(int64_t n) { return ((size_t)n + 63) / 64 * 64; }

static qlora_status workspace_alloc(workspace *ws, qlora_ctx *ctx, size_t floats) {
    ws->ctx = ctx;
    ws->used = 0;
    ws->cap = floats;
    ws->base = NULL;
    return qlora_alloc(ctx, floats * sizeof(float), 1, QLORA_MEM_WORKSPACE, (void **)&ws->base);
}

static float *workspace_take(workspace *ws, int64_t n) {
    float *p = ws->base + ws->used;
    ws->used += padded(n);
    return p;
}

static void workspace_free(workspace *ws) { qlora_free(ws->ctx, ws->base); }

/* ---- conversions ---- */

static void bf16_to_f32(const uint16_t *src, int64_t n, float *dst, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (n >= QL_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++)
        dst[i] = ql_bf16_to_f32(src[i]);
}

/* Rounds v[n] to BF16 in place (keeping float32 storage) and optionally stores the BF16 bits. */
static void round_bf16(float *v, int64_t n, uint16_t *bits) {
    for (int64_t i = 0; i < n; i++) {
        uint16_t h = ql_f32_to_bf16(v[i]);
        v[i] = ql_bf16_to_f32(h);
        if (bits)
            bits[i] = h;
    }
}

/* dst[n] = the gradient (BF16 or F32) as float32, and back. */
static void grad_to_f32(const void *grad, qlora_dtype dtype, int64_t n, float *dst) {
    if (dtype == QLORA_F32)
        memcpy(dst, grad, (size_t)n * sizeof(float));
    else
        bf16_to_f32((const uint16_t *)grad, n, dst, 1);
}

static void grad_from_f32(const float *src, int64_t n, qlora_dtype dtype, void *grad) {
    if (dtype == QLORA_F32) {
        memcpy(grad, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *g = (uint16_t *)grad;
    for (int64_t i = 0; i < n; i++)
        g[i] = ql_f32_to_bf16(src[i]);
}

/* ---- the weight, decoded a range at a time ---- */

static void decode_absmax(const qlora_qtensor *q, float *absmax, int nt) {
    if (!q->double_quant) {
        memcpy(absmax, q->absmax, (size_t)q->nblocks * sizeof(float));
        return;
    }
    /* dyn[q] * nested + offset as two float32 roundings, as lib/quant4.h prescribes */
#pragma omp parallel for schedule(static) num_threads(nt) if (q->nblocks >= QL_PARALLEL_MIN)
    for (int64_t b = 0; b < q->nblocks; b++) {
        float scaled = q->nested_code[q->qabsmax[b]] * q->nested_absmax[b / QLORA_NESTED_BLOCKSIZE];
        absmax[b] = scaled + q->nested_offset;
    }
}

/* The code-book values of both nibbles of every byte, unscaled: one 8-byte copy decodes a pair. */
typedef struct code_pairs {
    float v[256][2];
} code_pairs;

static void make_code_pairs(const qlora_qtensor *q, code_pairs *p) {
    for (int b = 0; b < 256; b++) {
        p->v[b][0] = q->code[b >> 4];
        p->v[b][1] = q->code[b & 0x0f];
    }
}

/* v[n] *= s, vectorised; the same single float32 product code · absmax a per-block table gives. */
QL_TARGET_CLONES("avx2", "default")
static void scale_floats(float *v, int64_t n, float s) {
    for (int64_t j = 0; j < n; j++)
        v[j] *= s;
}

/* Elements [begin, begin + count) of the flat weight into out, with decoded block scales: the
 * code values a byte pair at a time, then one multiply by the block's absmax per element. */
static void decode_range(const qlora_qtensor *q, const code_pairs *pairs, const float *absmax, int64_t begin,
                         int64_t count, float *out) {
    int64_t i = begin, end = begin + count;
    while (i < end) {
        int64_t block = i / q->blocksize;
        int64_t stop = min64((block + 1) * q->blocksize, end);
        float *seg = out;
        if (i % 2 == 1) /* only at the start of the range: blocks begin at even elements */
            *out++ = q->code[q->codes[i++ / 2] & 0x0f];
        const uint8_t *src = q->codes + i / 2;
        int64_t npairs = (stop - i) / 2;
        for (int64_t j = 0; j < npairs; j++)
            memcpy(out + 2 * j, pairs->v[src[j]], 2 * sizeof(float));
        out += 2 * npairs;
        i += 2 * npairs;
        if (i < stop)
            *out++ = q->code[q->codes[i++ / 2] >> 4];
        scale_floats(seg, out - seg, absmax[block]);
    }
}

/* ---- small M: decoded rows straight into dot products ---- */

/* Up to this many input rows the forward decodes W a few output rows at a time into L1 and takes
 * their dot products with every input row itself: at small M a tile sgemm is bound by writing
 * and re-reading the decoded tile, not by its multiply-adds. */
#define QL_FUSED_MAX_M 16
/* dX's fused form re-reads its output rows per group of weight rows, where sgemm keeps them in
 * registers: it wins only while the decode dominates (measured: M = 1 yes, M = 16 no). */
#define QL_FUSED_MAX_M_DX 4
#define QL_FUSED_ROWS 4

/* Eight float32 lanes (GNU vector extension): one AVX2 register in the avx2 clone, two SSE ones
 * otherwise. Kept as named vectors so the partial sums stay in registers. */
typedef float ql_v8 __attribute__((vector_size(8 * sizeof(float))));

/* Vectors go by pointer: passing them by value in a non-AVX function changes the ABI. */
QL_INLINE void load8(ql_v8 *v, const float *p) { memcpy(v, p, sizeof *v); }

/* Sums the lanes pairwise (fixed order, so every run gives the same bits). */
QL_INLINE float sum_lanes(const ql_v8 *s) {
    const float *v = (const float *)s;
    float a = (v[0] + v[4]) + (v[2] + v[6]);
    float b = (v[1] + v[5]) + (v[3] + v[7]);
    return a + b;
}

/* res[i · QL_FUSED_ROWS + r] = x[i · ldx ...] · w[r · k ...] for i < MR, r < NR: MR·NR lane-wise
 * FP32 accumulators, each x and w vector loaded once per step. MR, NR are constants once inlined. */
QL_INLINE void dots(const float *x, int64_t ldx, int mr, const float *w, int64_t k, int nr, float *res) {
    ql_v8 acc[2][QL_FUSED_ROWS];
    for (int i = 0; i < mr; i++)
        for (int r = 0; r < nr; r++)
            acc[i][r] = (ql_v8){0};
    int64_t body = k / 8 * 8;
    for (int64_t j = 0; j < body; j += 8) {
        ql_v8 xv[2];
        for (int i = 0; i < mr; i++)
            load8(&xv[i], x + i * ldx + j);
        for (int r = 0; r < nr; r++) {
            ql_v8 wv;
            load8(&wv, w + r * k + j);
            for (int i = 0; i < mr; i++)
                acc[i][r] += xv[i] * wv;
        }
    }
    for (int i = 0; i < mr; i++)
        for (int r = 0; r < nr; r++) {
            float tail = 0.0f;
            for (int64_t j = body; j < k; j++)
                tail += x[i * ldx + j] * w[r * k + j];
            res[i * QL_FUSED_ROWS + r] = sum_lanes(&acc[i][r]) + tail;
        }
}

QL_TARGET_CLONES("avx2", "default")
static void dots_2x4(const float *x, int64_t ldx, const float *w, int64_t k, float *res) {
    dots(x, ldx, 2, w, k, QL_FUSED_ROWS, res);
}

QL_TARGET_CLONES("avx2", "default")
static void dots_1x4(const float *x, const float *w, int64_t k, float *res) {
    dots(x, 0, 1, w, k, QL_FUSED_ROWS, res);
}

QL_TARGET_CLONES("avx2", "default")
static void dots_1x1(const float *x, const float *w, int64_t k, float *res) {
    dots(x, 0, 1, w, k, 1, res);
}

/* out[i, c] (+)= X[i] · W[n0 + c] for c < cols, i < m: W decoded QL_FUSED_ROWS rows at a time
 * into buf[QL_FUSED_ROWS · k]; accumulate: add to out instead of overwriting it. */
static void fused_rows(const qlora_qtensor *w, const code_pairs *pairs, const float *absmax, const float *xf,
                       int64_t m, int64_t k, int64_t n0, int64_t cols, int accumulate, float *buf, float *out) {
    for (int64_t c = 0; c < cols; c += QL_FUSED_ROWS) {
        int64_t group = min64(QL_FUSED_ROWS, cols - c);
        decode_range(w, pairs, absmax, (n0 + c) * k, group * k, buf);
        for (int64_t i = 0; i < m; i += 2) {
            int64_t pair = min64(2, m - i);
            float res[2 * QL_FUSED_ROWS];
            if (group == QL_FUSED_ROWS && pair == 2)
                dots_2x4(xf + i * k, k, buf, k, res);
            else
                for (int64_t p = 0; p < pair; p++) {
                    if (group == QL_FUSED_ROWS)
                        dots_1x4(xf + (i + p) * k, buf, k, res + p * QL_FUSED_ROWS);
                    else
                        for (int64_t r = 0; r < group; r++)
                            dots_1x1(xf + (i + p) * k, buf + r * k, k, res + p * QL_FUSED_ROWS + r);
                }
            for (int64_t p = 0; p < pair; p++) {
                float *o = out + (i + p) * cols + c;
                for (int64_t r = 0; r < group; r++)
                    o[r] = accumulate ? o[r] + res[p * QL_FUSED_ROWS + r] : res[p * QL_FUSED_ROWS + r];
            }
        }
    }
}

/* out[width] += Σ_r coef[r] · w[r · width ...] for r < NR, out read and written once. */
QL_INLINE void axpys(float *out, const float *w, int64_t width, int nr, const float *coef) {
    int64_t body = width / 8 * 8;
    for (int64_t j = 0; j < body; j += 8) {
        ql_v8 acc, wv;
        load8(&acc, out + j);
        for (int r = 0; r < nr; r++) {
            load8(&wv, w + r * width + j);
            acc += coef[r] * wv;
        }
        memcpy(out + j, &acc, sizeof acc);
    }
    for (int64_t j = body; j < width; j++)
        for (int r = 0; r < nr; r++)
            out[j] += coef[r] * w[r * width + j];
}

QL_TARGET_CLONES("avx2", "default")
static void axpys_4(float *out, const float *w, int64_t width, const float *coef) {
    axpys(out, w, width, QL_FUSED_ROWS, coef);
}

QL_TARGET_CLONES("avx2", "default")
static void axpys_1(float *out, const float *w, int64_t width, const float *coef) {
    axpys(out, w, width, 1, coef);
}

/* out[i, c] += Σ_n dY[i, n] · W[n, k0 + c] for c < width, i < m (out: row stride k): W's column
 * slice decoded QL_FUSED_ROWS rows at a time into buf[QL_FUSED_ROWS · width]. */
static void fused_cols(const qlora_qtensor *w, const code_pairs *pairs, const float *absmax, const float *dyf,
                       int64_t m, int64_t n_dim, int64_t k, int64_t k0, int64_t width, float *buf, float *out) {
    for (int64_t n = 0; n < n_dim; n += QL_FUSED_ROWS) {
        int64_t group = min64(QL_FUSED_ROWS, n_dim - n);
        for (int64_t r = 0; r < group; r++)
            decode_range(w, pairs, absmax, (n + r) * k + k0, width, buf + r * width);
        for (int64_t i = 0; i < m; i++) {
            const float *coef = dyf + i * n_dim + n;
            if (group == QL_FUSED_ROWS)
                axpys_4(out + i * k, buf, width, coef);
            else
                for (int64_t r = 0; r < group; r++)
                    axpys_1(out + i * k, buf + r * width, width, coef + r);
        }
    }
}

/* Rows (or columns) per tile: `bytes` of float32 for lines of `line` elements, a multiple of 8
 * in [8, 512], and small enough that every thread gets at least two tiles. */
static int64_t tile_lines(int64_t line, int64_t lines, int nt, size_t bytes) {
    int64_t t = min64(512, max64(8, (int64_t)(bytes / sizeof(float)) / max64(line, 1)));
    int64_t fair = (lines + 2 * nt - 1) / (2 * nt);
    t = min64(t, max64(8, (fair + 7) / 8 * 8));
    return t / 8 * 8;
}

/* out[M, K] = dropout(X) as float32 (kept: bf16(x · scale); dropped: 0). */
static void dropout_input(const ql_lora_term *t, const uint16_t *x, int64_t total, float *out, int nt) {
    float scale = ql_lora_dropout_scale(t->p);
    int64_t groups = (total + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nt) if (total >= QL_PARALLEL_MIN)
    for (int64_t g = 0; g < groups; g++) {
        float u[4];
        ql_lora_uniform4(t->key, t->stream, (uint64_t)g, u);
        for (int e = 0; e < 4 && 4 * g + e < total; e++) {
            int64_t i = 4 * g + e;
            out[i] = u[e] >= t->p ? ql_lora_dropped_value(x[i], scale) : 0.0f;
        }
    }
}

/* acc[M, K] += factor · dropout'(v): v where kept, times `factor` · scale; nothing where dropped. */
static void add_masked(const ql_lora_term *t, const float *v, int64_t total, float factor, float *acc, int nt) {
    float scaled = factor * ql_lora_dropout_scale(t->p);
    int64_t groups = (total + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nt) if (total >= QL_PARALLEL_MIN)
    for (int64_t g = 0; g < groups; g++) {
        float u[4];
        ql_lora_uniform4(t->key, t->stream, (uint64_t)g, u);
        for (int e = 0; e < 4 && 4 * g + e < total; e++) {
            int64_t i = 4 * g + e;
            if (u[e] >= t->p)
                acc[i] += scaled * v[i];
        }
    }
}

static int any_dropout(const ql_lora_term *terms, int nterms) {
    for (int t = 0; t < nterms; t++)
        if (terms[t].p != 0.0f)
            return 1;
    return 0;
}

static int64_t largest_rank(const ql_lora_term *terms, int nterms) {
    int64_t r = 0;
    for (int t = 0; t < nterms; t++)
        r = max64(r, terms[t].rank);
    return r;
}

/* ---- forward ---- */

qlora_status ql_linear_forward_fast(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *bias, const uint16_t *x,
                                    int64_t m, const ql_lora_term *terms, int nterms, uint16_t *y) {
    int nt = thread_count(ctx);
    int64_t n_dim = w->shape[0], k_dim = w->shape[1];
    int64_t rows = tile_lines(k_dim, n_dim, nt, QL_TILE_BYTES_FORWARD);
    int64_t max_rank = largest_rank(terms, nterms);
    int dropout = any_dropout(terms, nterms);
    size_t floats = padded(m * k_dim) * (size_t)(1 + dropout) + padded(w->nblocks) + padded(max_rank * k_dim) +
                    (size_t)nt * (padded(rows * k_dim) + padded(m * rows));
    for (int t = 0; t < nterms; t++)
        floats += padded(m * terms[t].rank) + padded(n_dim * terms[t].rank);
    workspace ws;
    QL_CHECK(workspace_alloc(&ws, ctx, floats));
    float *xf = workspace_take(&ws, m * k_dim);
    float *xd = dropout ? workspace_take(&ws, m * k_dim) : NULL;
    float *absmax = workspace_take(&ws, w->nblocks);
    float *af = workspace_take(&ws, max_rank * k_dim);
    float *tiles = workspace_take(&ws, (int64_t)((size_t)nt * padded(rows * k_dim)));
    float *outs = workspace_take(&ws, (int64_t)((size_t)nt * padded(m * rows)));
    float *hf[QLORA_LINEAR_MAX_ADAPTERS], *bf[QLORA_LINEAR_MAX_ADAPTERS];
    bf16_to_f32(x, m * k_dim, xf, nt);
    decode_absmax(w, absmax, nt);
    code_pairs pairs;
    make_code_pairs(w, &pairs);

    /* H = bf16(dropout(X)·Aᵀ): one GEMM per adapter, BLAS-threaded */
    for (int t = 0; t < nterms; t++) {
        const ql_lora_term *term = &terms[t];
        int r = term->rank;
        hf[t] = workspace_take(&ws, m * r);
        bf[t] = workspace_take(&ws, n_dim * r);
        bf16_to_f32(term->a, r * k_dim, af, nt);
        bf16_to_f32(term->b, n_dim * r, bf[t], nt);
        const float *input = xf;
        if (term->p != 0.0f) {
            dropout_input(term, x, m * k_dim, xd, nt);
            input = xd;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, r, (int)k_dim, 1.0f, input, (int)k_dim, af,
                    (int)k_dim, 0.0f, hf[t], r);
        round_bf16(hf[t], m * r, term->h);
    }

    /* Y a tile of columns at a time: s·H·B_tileᵀ, + X·W_tileᵀ, + bias, rounded to BF16 */
    int64_t ntiles = (n_dim + rows - 1) / rows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if ((m + 1) * n_dim * k_dim >= QL_PARALLEL_MIN_MACS)
    for (int64_t tile = 0; tile < ntiles; tile++) {
        int me = omp_get_thread_num();
        float *wt = tiles + (size_t)me * padded(rows * k_dim);
        float *out = outs + (size_t)me * padded(m * rows);
        int64_t n0 = tile * rows, cols = min64(rows, n_dim - n0);
        float beta = 0.0f;
        for (int t = 0; t < nterms; t++) {
            int r = terms[t].rank;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)cols, r, terms[t].scaling, hf[t], r,
                        bf[t] + n0 * r, r, beta, out, (int)cols);
            beta = 1.0f;
        }
        if (m <= QL_FUSED_MAX_M) {
            fused_rows(w, &pairs, absmax, xf, m, k_dim, n0, cols, beta != 0.0f, wt, out);
        } else {
            decode_range(w, &pairs, absmax, n0 * k_dim, cols * k_dim, wt);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)cols, (int)k_dim, 1.0f, xf, (int)k_dim,
                        wt, (int)k_dim, beta, out, (int)cols);
        }
        for (int64_t i = 0; i < m; i++)
            for (int64_t c = 0; c < cols; c++) {
                float v = out[i * cols + c];
                if (bias)
                    v += ql_bf16_to_f32(bias[n0 + c]);
                y[i * n_dim + n0 + c] = ql_f32_to_bf16(v);
            }
    }
    workspace_free(&ws);
    return QLORA_OK;
}

/* ---- backward ---- */

qlora_status ql_linear_backward_fast(qlora_ctx *ctx, const qlora_qtensor *w, const uint16_t *x, const uint16_t *dy,
                                     int64_t m, const ql_lora_term *terms, int nterms, uint16_t *dx) {
    int nt = thread_count(ctx);
    int64_t n_dim = w->shape[0], k_dim = w->shape[1];
    int64_t cols = tile_lines(n_dim, k_dim, nt, QL_TILE_BYTES_DX);
    int64_t max_rank = largest_rank(terms, nterms);
    int dropout = any_dropout(terms, nterms);
    int need_x = nterms > 0;
    /* dY, X, dropout(X) or a masked product, dX; G per adapter; A, B, H, dA, dB of one adapter;
     * weight tiles */
    size_t floats = padded(m * n_dim) + padded(m * k_dim) * (size_t)(need_x + dropout) + padded(max_rank * k_dim) * 2 +
                    padded(n_dim * max_rank) * 2 + padded(m * max_rank);
    for (int t = 0; t < nterms; t++)
        floats += padded(m * terms[t].rank);
    if (dx)
        floats += padded(m * k_dim) + padded(w->nblocks) + (size_t)nt * padded(n_dim * cols);
    workspace ws;
    QL_CHECK(workspace_alloc(&ws, ctx, floats));
    float *dyf = workspace_take(&ws, m * n_dim);
    float *xf = need_x ? workspace_take(&ws, m * k_dim) : NULL;
    float *scratch = dropout ? workspace_take(&ws, m * k_dim) : NULL; /* dropout(X), then masked products */
    float *af = workspace_take(&ws, max_rank * k_dim);
    float *daf = workspace_take(&ws, max_rank * k_dim);
    float *bf = workspace_take(&ws, n_dim * max_rank);
    float *dbf = workspace_take(&ws, n_dim * max_rank);
    float *hf = workspace_take(&ws, m * max_rank);
    float *gf[QLORA_LINEAR_MAX_ADAPTERS];
    bf16_to_f32(dy, m * n_dim, dyf, nt);
    if (need_x)
        bf16_to_f32(x, m * k_dim, xf, nt);

    /* G = bf16(dY·B); dB += s·dYᵀ·H; dA += s·Gᵀ·dropout(X) */
    for (int t = 0; t < nterms; t++) {
        const ql_lora_term *term = &terms[t];
        int r = term->rank;
        gf[t] = workspace_take(&ws, m * r);
        bf16_to_f32(term->b, n_dim * r, bf, nt);
        bf16_to_f32(term->h, m * r, hf, nt);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, r, (int)n_dim, 1.0f, dyf, (int)n_dim, bf, r,
                    0.0f, gf[t], r);
        round_bf16(gf[t], m * r, NULL);
        grad_to_f32(term->db, term->grad_dtype, n_dim * r, dbf);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)n_dim, r, (int)m, term->scaling, dyf, (int)n_dim, hf,
                    r, 1.0f, dbf, r);
        grad_from_f32(dbf, n_dim * r, term->grad_dtype, term->db);
        const float *input = xf;
        if (term->p != 0.0f) {
            dropout_input(term, x, m * k_dim, scratch, nt);
            input = scratch;
        }
        grad_to_f32(term->da, term->grad_dtype, r * k_dim, daf);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, (int)k_dim, (int)m, term->scaling, gf[t], r, input,
                    (int)k_dim, 1.0f, daf, (int)k_dim);
        grad_from_f32(daf, r * k_dim, term->grad_dtype, term->da);
    }
    if (!dx) {
        workspace_free(&ws);
        return QLORA_OK;
    }

    /* dX = Σ s·dropout'(G·A), then + dY·W a tile of columns at a time, rounded to BF16 */
    float *dxf = workspace_take(&ws, m * k_dim);
    float *absmax = workspace_take(&ws, w->nblocks);
    float *tiles = workspace_take(&ws, (int64_t)((size_t)nt * padded(n_dim * cols)));
    decode_absmax(w, absmax, nt);
    code_pairs pairs;
    make_code_pairs(w, &pairs);
    float beta = 0.0f;
    for (int t = 0; t < nterms; t++) {
        const ql_lora_term *term = &terms[t];
        int r = term->rank;
        bf16_to_f32(term->a, r * k_dim, af, nt);
        if (term->p == 0.0f) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)k_dim, r, term->scaling, gf[t], r, af,
                        (int)k_dim, beta, dxf, (int)k_dim);
            beta = 1.0f;
            continue;
        }
        if (beta == 0.0f)
            memset(dxf, 0, (size_t)(m * k_dim) * sizeof(float));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)k_dim, r, 1.0f, gf[t], r, af, (int)k_dim,
                    0.0f, scratch, (int)k_dim);
        add_masked(term, scratch, m * k_dim, term->scaling, dxf, nt);
        beta = 1.0f;
    }
    int64_t ntiles = (k_dim + cols - 1) / cols;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if ((m + 1) * n_dim * k_dim >= QL_PARALLEL_MIN_MACS)
    for (int64_t tile = 0; tile < ntiles; tile++) {
        int me = omp_get_thread_num();
        float *wt = tiles + (size_t)me * padded(n_dim * cols);
        int64_t k0 = tile * cols, width = min64(cols, k_dim - k0);
        float *out = dxf + k0;
        if (m <= QL_FUSED_MAX_M_DX) {
            if (beta == 0.0f)
                for (int64_t i = 0; i < m; i++)
                    memset(out + i * k_dim, 0, (size_t)width * sizeof(float));
            fused_cols(w, &pairs, absmax, dyf, m, n_dim, k_dim, k0, width, wt, out);
        } else {
            for (int64_t n = 0; n < n_dim; n++)
                decode_range(w, &pairs, absmax, n * k_dim + k0, width, wt + n * width);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)width, (int)n_dim, 1.0f, dyf,
                        (int)n_dim, wt, (int)width, beta, out, (int)k_dim);
        }
        for (int64_t i = 0; i < m; i++)
            for (int64_t c = 0; c < width; c++)
                dx[i * k_dim + k0 + c] = ql_f32_to_bf16(out[i * k_dim + c]);
    }
    workspace_free(&ws);
    return QLORA_OK;
}

/* ---- merge ---- */

qlora_status ql_linear_merge_fast(qlora_ctx *ctx, float *w, int64_t n, int64_t k, const ql_lora_term *term) {
    int nt = thread_count(ctx);
    int r = term->rank;
    workspace ws;
    QL_CHECK(workspace_alloc(&ws, ctx, padded(n * r) + padded(r * k)));
    float *bf = workspace_take(&ws, n * r);
    float *af = workspace_take(&ws, r * k);
    bf16_to_f32(term->b, n * r, bf, nt);
    bf16_to_f32(term->a, r * k, af, nt);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)k, r, term->scaling, bf, r, af, (int)k, 1.0f,
                w, (int)k);
    workspace_free(&ws);
    return QLORA_OK;
}
