/*
 * Token cross-entropy against the lm_head without the full [T, V] logits (lib/model_ops.h).
 * A chunk of tokens at a time: their float32 logits [c, V] come from OpenBLAS sgemm on tiles of
 * the BF16 lm_head decoded to float32 (a tile stays in cache, and the whole [V, H] float32 copy,
 * 2 GiB for a 128k × 4096 head, never exists); each row's logsumexp is taken in double; the
 * logits are overwritten by d loss / d logits, and dhidden = that · lm_head, tile by tile again.
 */
#include "model_ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "half.h"
#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

#define QL_XENT_DEFAULT_CHUNK 128
/* float32 bytes of one decoded lm_head tile */
#define QL_XENT_TILE_BYTES (4 << 20)

typedef struct xent_ws {
    void *base;
    float *hidden, *logits, *tile, *dhidden; /* [c, H], [c, V], [rows, H], [c, H] */
    double *row_loss;                        /* [c] */
    int64_t tile_rows;
} xent_ws;

static int64_t tile_rows_for(int64_t hidden_dim, int64_t vocab) {
    int64_t rows = (int64_t)(QL_XENT_TILE_BYTES / sizeof(float)) / hidden_dim;
    rows = rows < 16 ? 16 : rows;
    return rows > vocab ? vocab : rows;
}

static size_t pad16(int64_t n) { return ((size_t)n + 15) / 16 * 16; }

static qlora_status ws_alloc(qlora_ctx *ctx, int64_t chunk, int64_t H, int64_t V, int with_grad, xent_ws *ws) {
    ws->tile_rows = tile_rows_for(H, V);
    size_t floats = pad16(chunk * H) + pad16(chunk * V) + pad16(ws->tile_rows * H) +
                    (with_grad ? pad16(chunk * H) : 0) + 2 * pad16(chunk);
    ws->base = NULL;
    QL_CHECK(qlora_alloc(ctx, floats * sizeof(float), 0, QLORA_MEM_WORKSPACE, &ws->base));
    float *p = (float *)ws->base;
    ws->hidden = p;
    p += pad16(chunk * H);
    ws->logits = p;
    p += pad16(chunk * V);
    ws->tile = p;
    p += pad16(ws->tile_rows * H);
    ws->dhidden = with_grad ? p : NULL;
    p += with_grad ? pad16(chunk * H) : 0;
    ws->row_loss = (double *)p;
    return QLORA_OK;
}

static void bf16_rows_to_f32(const uint16_t *src, int64_t n, float *dst, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (n >= (1 << 15))
    for (int64_t i = 0; i < n; i++)
        dst[i] = ql_bf16_to_f32(src[i]);
}

/* logits[c, V] (row stride V) = hidden[c, H] · lm_headᵀ, one decoded tile of rows at a time. */
static void chunk_logits(const xent_ws *ws, const uint16_t *lm_head, int64_t c, int64_t H, int64_t V, int nt) {
    for (int64_t v0 = 0; v0 < V; v0 += ws->tile_rows) {
        int64_t rows = V - v0 < ws->tile_rows ? V - v0 : ws->tile_rows;
        bf16_rows_to_f32(lm_head + v0 * H, rows * H, ws->tile, nt);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c, (int)rows, (int)H, 1.0f, ws->hidden, (int)H,
                    ws->tile, (int)H, 0.0f, ws->logits + v0, (int)V);
    }
}

/* dhidden[c, H] = G[c, V] · lm_head, with G in ws->logits. */
static void chunk_dhidden(const xent_ws *ws, const uint16_t *lm_head, int64_t c, int64_t H, int64_t V, int nt) {
    for (int64_t v0 = 0; v0 < V; v0 += ws->tile_rows) {
        int64_t rows = V - v0 < ws->tile_rows ? V - v0 : ws->tile_rows;
        bf16_rows_to_f32(lm_head + v0 * H, rows * H, ws->tile, nt);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)c, (int)H, (int)rows, 1.0f, ws->logits + v0,
                    (int)V, ws->tile, (int)H, v0 == 0 ? 0.0f : 1.0f, ws->dhidden, (int)H);
    }
}

static qlora_status check_dims(const qlora_ctx *ctx, const uint16_t *hidden, const uint16_t *lm_head, int64_t T,
                               int64_t H, int64_t V) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(hidden != NULL && lm_head != NULL, "hidden/lm_head");
    QL_REQUIRE_ARG(T >= 0 && H > 0 && V > 0, "tokens/hidden_dim/vocab");
    if (H > INT32_MAX || V > INT32_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "lm_head: hidden %lld or vocab %lld exceeds BLAS's int dimensions",
                       (long long)H, (long long)V);
    return QLORA_OK;
}

qlora_status ql_lm_head_logits(qlora_ctx *ctx, const uint16_t *hidden, const uint16_t *lm_head, int64_t tokens,
                               int64_t hidden_dim, int64_t vocab, float *logits) {
    QL_CHECK(check_dims(ctx, hidden, lm_head, tokens, hidden_dim, vocab));
    QL_REQUIRE_ARG(logits != NULL, "logits");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_lm_head_logits((ql_cuda_state *)ctx->cuda, hidden, lm_head, tokens, hidden_dim, vocab, logits);
#endif
    int nt = ql_ops_threads(ctx);
    int64_t chunk = tokens < QL_XENT_DEFAULT_CHUNK ? (tokens > 0 ? tokens : 1) : QL_XENT_DEFAULT_CHUNK;
    xent_ws ws;
    QL_CHECK(ws_alloc(ctx, chunk, hidden_dim, vocab, 0, &ws));
    for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
        int64_t c = tokens - t0 < chunk ? tokens - t0 : chunk;
        bf16_rows_to_f32(hidden + t0 * hidden_dim, c * hidden_dim, ws.hidden, nt);
        chunk_logits(&ws, lm_head, c, hidden_dim, vocab, nt);
        memcpy(logits + t0 * vocab, ws.logits, (size_t)(c * vocab) * sizeof(float));
    }
    qlora_free(ctx, ws.base);
    return QLORA_OK;
}

/* Replaces the row's logits by (softmax − onehot(label)) · inv_denom; returns −log p[label]. */
static double row_loss_and_grad(float *row, int64_t V, int32_t label, float inv_denom) {
    float max = row[0];
    for (int64_t i = 1; i < V; i++)
        max = row[i] > max ? row[i] : max;
    double sum = 0.0;
    for (int64_t i = 0; i < V; i++)
        sum += exp((double)row[i] - max);
    double lse = max + log(sum);
    double loss = lse - row[label];
    for (int64_t i = 0; i < V; i++)
        row[i] = (float)exp((double)row[i] - lse) * inv_denom;
    row[label] -= inv_denom;
    return loss;
}

qlora_status ql_cross_entropy(qlora_ctx *ctx, const ql_xent_args *a, double *loss, int64_t *count,
                              uint16_t *dhidden) {
    QL_REQUIRE_ARG(a != NULL && loss != NULL, "args/loss");
    QL_CHECK(check_dims(ctx, a->hidden, a->lm_head, a->tokens, a->hidden_dim, a->vocab));
    QL_REQUIRE_ARG(a->labels != NULL, "labels");
    QL_REQUIRE_ARG(a->chunk_tokens >= 0, "chunk_tokens");
    QL_REQUIRE_ARG(a->denom >= 0.0 && isfinite(a->denom), "denom");
    const int64_t T = a->tokens, H = a->hidden_dim, V = a->vocab;
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) { /* labels on the device: the launcher validates and counts them */
        double sum = 0.0;
        int64_t n_valid = 0;
        QL_CHECK(ql_cuda_cross_entropy((ql_cuda_state *)ctx->cuda, a->hidden, a->lm_head, a->labels, T, H, V,
                                       a->chunk_tokens, a->denom, &sum, &n_valid, dhidden));
        if (count)
            *count = n_valid;
        *loss = n_valid == 0 ? 0.0 : sum / (a->denom > 0.0 ? a->denom : (double)n_valid);
        return QLORA_OK;
    }
#endif
    int64_t valid = 0;
    for (int64_t t = 0; t < T; t++) {
        int32_t y = a->labels[t];
        if (y == QL_IGNORE_INDEX)
            continue;
        if (y < 0 || y >= V)
            return ql_fail(QLORA_ERR_INVALID_ARG,
                           "cross-entropy: label[%lld] = %d is neither %d (ignored) nor in [0, %lld)", (long long)t,
                           y, QL_IGNORE_INDEX, (long long)V);
        valid++;
    }
    *loss = 0.0;
    if (count)
        *count = valid;
    if (dhidden)
        memset(dhidden, 0, (size_t)(T * H) * sizeof(uint16_t));
    if (valid == 0)
        return QLORA_OK;

    double denom = a->denom > 0.0 ? a->denom : (double)valid;
    float inv_denom = (float)(1.0 / denom);
    int64_t chunk = a->chunk_tokens > 0 ? a->chunk_tokens : QL_XENT_DEFAULT_CHUNK;
    chunk = chunk < T ? chunk : T;
    int nt = ql_ops_threads(ctx);
    xent_ws ws;
    QL_CHECK(ws_alloc(ctx, chunk, H, V, dhidden != NULL, &ws));
    double total = 0.0;
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
        int64_t c = T - t0 < chunk ? T - t0 : chunk;
        const int32_t *labels = a->labels + t0;
        int any = 0;
        for (int64_t i = 0; i < c; i++)
            any |= labels[i] != QL_IGNORE_INDEX;
        if (!any) /* a masked prompt: no loss, zero gradient */
            continue;
        bf16_rows_to_f32(a->hidden + t0 * H, c * H, ws.hidden, nt);
        chunk_logits(&ws, a->lm_head, c, H, V, nt);
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t i = 0; i < c; i++) {
            float *row = ws.logits + i * V;
            if (labels[i] == QL_IGNORE_INDEX) {
                memset(row, 0, (size_t)V * sizeof(float));
                ws.row_loss[i] = 0.0;
            } else {
                ws.row_loss[i] = row_loss_and_grad(row, V, labels[i], inv_denom);
            }
        }
        for (int64_t i = 0; i < c; i++) /* in token order, so the sum does not depend on threads */
            total += ws.row_loss[i];
        if (dhidden) {
            chunk_dhidden(&ws, a->lm_head, c, H, V, nt);
            for (int64_t i = 0; i < c * H; i++)
                dhidden[t0 * H + i] = ql_f32_to_bf16(ws.dhidden[i]);
        }
    }
    qlora_free(ctx, ws.base);
    *loss = total / denom;
    return QLORA_OK;
}
