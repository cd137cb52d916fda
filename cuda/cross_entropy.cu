/*
 * The lm_head logits and the chunked token cross-entropy on CUDA (cuda/model_ops_cuda.h).
 *
 * Cross-entropy, as lib/op_cross_entropy.c: a kernel first validates and counts the labels per
 * chunk (one small read-back: the count is the default denominator, and a chunk without a
 * label is skipped as on the CPU). Then per chunk of c tokens: logits [c, V] float32 by cuBLAS
 * into a scratch; one CTA per row takes the max, Σ exp(x − max) in double, the row's loss
 * lse − x[label] (double, kept per token) and the gradient (p − onehot)·(1/denom) with the
 * CPU's float32 operations, rounded to BF16 (the dtype HF's backward feeds the lm_head matmul);
 * then dhidden rows = grad · lm_head by cuBLAS, BF16 out. The per-token losses are summed on the
 * host in token order, like the CPU, so the loss does not depend on the chunking.
 */
#include "model_ops_common.cuh"

#include <limits.h>
#include <stdlib.h>

#include "linear_cuda.h"

extern "C" {
#include "model_ops.h"
}

namespace {

constexpr int kRowThreads = 512;
constexpr int kCountThreads = 256;
constexpr int64_t kDefaultChunk = 128; /* lib/op_cross_entropy.c's default */

/* counts[t / chunk] += 1 for each label in [0, V); *bad = min t of a label that is neither
 * QL_IGNORE_INDEX nor in range. */
__global__ void __launch_bounds__(kCountThreads)
    xent_count_kernel(const int32_t *labels, int64_t tokens, int64_t vocab, int64_t chunk, unsigned *counts,
                      unsigned long long *bad) {
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < tokens; t += (int64_t)gridDim.x * blockDim.x) {
        const int32_t y = labels[t];
        if (y == QL_IGNORE_INDEX)
            continue;
        if (y < 0 || y >= vocab)
            atomicMin(bad, (unsigned long long)t);
        else
            atomicAdd(&counts[t / chunk], 1u);
    }
}

/* One CTA per row of the chunk: row_loss[i] and, when grad is given, its BF16 gradient row. */
__global__ void __launch_bounds__(kRowThreads)
    xent_row_kernel(const float *logits, const int32_t *labels, int64_t vocab, float inv_denom, uint16_t *grad,
                    double *row_loss) {
    __shared__ double redd[32];
    __shared__ float redf[32];
    const int64_t i = blockIdx.x;
    const float *row = logits + i * vocab;
    uint16_t *g = grad ? grad + i * vocab : NULL;
    const int32_t y = labels[i];
    if (y == QL_IGNORE_INDEX) { /* the whole CTA takes this branch */
        if (g)
            for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
                g[v] = 0;
        if (threadIdx.x == 0)
            row_loss[i] = 0.0;
        return;
    }
    float mx = -INFINITY;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
        mx = fmaxf(mx, row[v]);
    mx = mo_block_max(mx, redf);
    double sum = 0.0;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
        sum += exp((double)row[v] - mx);
    const double lse = mx + log(mo_block_sum(sum, redd));
    if (threadIdx.x == 0)
        row_loss[i] = lse - row[y];
    if (!g)
        return;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
        float p = __fmul_rn((float)exp((double)row[v] - lse), inv_denom);
        if (v == y)
            p = __fsub_rn(p, inv_denom);
        g[v] = mo_to_bf16(p);
    }
}

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

/* Offsets in the one workspace allocation of a cross-entropy call. */
struct xent_layout {
    size_t counts, row_loss, logits, grad, total;
};

xent_layout layout_for(int64_t tokens, int64_t vocab, int64_t chunk, int64_t nchunks, int with_grad) {
    xent_layout l;
    l.counts = sizeof(unsigned long long); /* the flag first */
    l.row_loss = align_up(l.counts + (size_t)nchunks * sizeof(unsigned));
    l.logits = align_up(l.row_loss + (size_t)tokens * sizeof(double));
    l.grad = align_up(l.logits + (size_t)chunk * (size_t)vocab * sizeof(float));
    l.total = l.grad + (with_grad ? (size_t)chunk * (size_t)vocab * sizeof(uint16_t) : 0);
    return l;
}

struct xent_call {
    const uint16_t *hidden, *lm_head;
    const int32_t *labels;
    int64_t tokens, hidden_dim, vocab, chunk, nchunks;
    double denom;
    uint16_t *dhidden;
};

/* The body of ql_cuda_cross_entropy once the workspace exists; `host` holds the flag and the
 * chunk counts, then the per-token losses. */
qlora_status xent_run(ql_cuda_state *s, const xent_call &c, unsigned char *ws, const xent_layout &l, void *host,
                      double *loss_sum, int64_t *count) {
    const int64_t T = c.tokens, H = c.hidden_dim, V = c.vocab;
    unsigned long long *d_flag = (unsigned long long *)ws;
    unsigned *d_counts = (unsigned *)(ws + l.counts);
    double *d_loss = (double *)(ws + l.row_loss);
    float *d_logits = (float *)(ws + l.logits);
    uint16_t *d_grad = c.dhidden ? (uint16_t *)(ws + l.grad) : NULL;

    QL_CUDA_CHECK(cudaMemsetAsync(d_flag, 0xff, sizeof *d_flag, s->stream));
    QL_CUDA_CHECK(cudaMemsetAsync(d_counts, 0, (size_t)c.nchunks * sizeof(unsigned), s->stream));
    QL_CUDA_CHECK(cudaMemsetAsync(d_loss, 0, (size_t)T * sizeof(double), s->stream));
    const dim3 cgrid = mo_stride_grid(s, T, kCountThreads), cblock(kCountThreads);
    xent_count_kernel<<<cgrid, cblock, 0, s->stream>>>(c.labels, T, V, c.chunk, d_counts, d_flag);
    QL_CUDA_CHECK_LAUNCH("xent_count_kernel", cgrid, cblock);
    QL_CUDA_CHECK(cudaMemcpyAsync(host, ws, l.counts + (size_t)c.nchunks * sizeof(unsigned), cudaMemcpyDeviceToHost,
                                  s->stream));
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    unsigned long long flag;
    memcpy(&flag, host, sizeof flag);
    if (flag != ~0ull) {
        int32_t y = 0;
        QL_CUDA_CHECK(cudaMemcpyAsync(&y, c.labels + flag, sizeof y, cudaMemcpyDeviceToHost, s->stream));
        QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
        return ql_fail(QLORA_ERR_INVALID_ARG, "cross-entropy: label[%lld] = %d is neither %d (ignored) nor in [0, %lld)",
                       (long long)flag, y, QL_IGNORE_INDEX, (long long)V);
    }
    const unsigned *counts = (const unsigned *)((unsigned char *)host + l.counts);
    int64_t valid = 0;
    for (int64_t k = 0; k < c.nchunks; k++)
        valid += counts[k];
    *count = valid;
    if (valid == 0) {
        if (c.dhidden)
            QL_CUDA_CHECK(cudaMemsetAsync(c.dhidden, 0, (size_t)(T * H) * sizeof(uint16_t), s->stream));
        return QLORA_OK;
    }
    const double denom = c.denom > 0.0 ? c.denom : (double)valid;
    const float inv_denom = (float)(1.0 / denom);
    for (int64_t k = 0; k < c.nchunks; k++) {
        const int64_t t0 = k * c.chunk, rows = T - t0 < c.chunk ? T - t0 : c.chunk;
        if (counts[k] == 0) { /* a masked prompt: no loss, zero gradient */
            if (c.dhidden)
                QL_CUDA_CHECK(
                    cudaMemsetAsync(c.dhidden + t0 * H, 0, (size_t)(rows * H) * sizeof(uint16_t), s->stream));
            continue;
        }
        QL_CHECK(ql_cuda_gemm_bf16(s, 0, 1, rows, V, H, 1.0f, c.hidden + t0 * H, c.lm_head, 0.0f, d_logits, 1));
        const dim3 grid((unsigned)rows), block(kRowThreads);
        xent_row_kernel<<<grid, block, 0, s->stream>>>(d_logits, c.labels + t0, V, inv_denom, d_grad, d_loss + t0);
        QL_CUDA_CHECK_LAUNCH("xent_row_kernel", grid, block);
        if (c.dhidden)
            QL_CHECK(ql_cuda_gemm_bf16(s, 0, 0, rows, H, V, 1.0f, d_grad, c.lm_head, 0.0f, c.dhidden + t0 * H, 0));
    }
    double *losses = (double *)host;
    QL_CUDA_CHECK(cudaMemcpyAsync(losses, d_loss, (size_t)T * sizeof(double), cudaMemcpyDeviceToHost, s->stream));
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    double total = 0.0;
    for (int64_t t = 0; t < T; t++) /* in token order, as the CPU */
        total += losses[t];
    *loss_sum = total;
    return QLORA_OK;
}

qlora_status check_dims(const char *fn, const uint16_t *hidden, const uint16_t *lm_head, int64_t tokens,
                        int64_t hidden_dim, int64_t vocab) {
    if (tokens < 0 || hidden_dim <= 0 || vocab <= 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: tokens %lld, hidden %lld, vocab %lld", fn, (long long)tokens,
                       (long long)hidden_dim, (long long)vocab);
    if (hidden_dim > INT_MAX || vocab > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: hidden %lld or vocab %lld exceeds cuBLAS' int dimensions", fn,
                       (long long)hidden_dim, (long long)vocab);
    if (tokens > 0 && (hidden == NULL || lm_head == NULL))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: hidden or lm_head is NULL", fn);
    return QLORA_OK;
}

} // namespace

extern "C" qlora_status ql_cuda_lm_head_logits(ql_cuda_state *s, const uint16_t *d_hidden, const uint16_t *d_lm_head,
                                               int64_t tokens, int64_t hidden, int64_t vocab, float *d_logits) {
    static const char fn[] = "ql_cuda_lm_head_logits";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_CHECK(check_dims(fn, d_hidden, d_lm_head, tokens, hidden, vocab));
    if (tokens == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(d_logits != NULL, "logits");
    /* cuBLAS takes m <= INT_MAX: tokens in slices of at most that many rows */
    for (int64_t t0 = 0; t0 < tokens; t0 += INT_MAX) {
        const int64_t rows = tokens - t0 < INT_MAX ? tokens - t0 : INT_MAX;
        QL_CHECK(ql_cuda_gemm_bf16(s, 0, 1, rows, vocab, hidden, 1.0f, d_hidden + t0 * hidden, d_lm_head, 0.0f,
                                   d_logits + t0 * vocab, 1));
    }
    return QLORA_OK;
}

extern "C" qlora_status ql_cuda_cross_entropy(ql_cuda_state *s, const uint16_t *d_hidden, const uint16_t *d_lm_head,
                                              const int32_t *d_labels, int64_t tokens, int64_t hidden, int64_t vocab,
                                              int64_t chunk_tokens, double denom, double *loss_sum, int64_t *count,
                                              uint16_t *d_dhidden) {
    static const char fn[] = "ql_cuda_cross_entropy";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(loss_sum != NULL && count != NULL, "loss_sum/count");
    *loss_sum = 0.0;
    *count = 0;
    QL_CHECK(check_dims(fn, d_hidden, d_lm_head, tokens, hidden, vocab));
    if (chunk_tokens < 0 || !isfinite(denom))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: chunk_tokens %lld, denom %g", fn, (long long)chunk_tokens, denom);
    if (tokens == 0)
        return QLORA_OK;
    if (d_labels == NULL || (uintptr_t)d_labels % 4 != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: labels (%p) is NULL or not 4-byte aligned", fn,
                       (const void *)d_labels);
    QL_REQUIRE_ARG(s->owner != NULL, "cuda state owner");
    xent_call c;
    c.hidden = d_hidden;
    c.lm_head = d_lm_head;
    c.labels = d_labels;
    c.tokens = tokens;
    c.hidden_dim = hidden;
    c.vocab = vocab;
    c.chunk = chunk_tokens > 0 ? chunk_tokens : kDefaultChunk;
    if (c.chunk > tokens)
        c.chunk = tokens;
    if (c.chunk > INT_MAX) /* one CTA per row of a chunk */
        c.chunk = INT_MAX;
    c.nchunks = (tokens + c.chunk - 1) / c.chunk;
    c.denom = denom;
    c.dhidden = d_dhidden;
    const xent_layout l = layout_for(tokens, vocab, c.chunk, c.nchunks, d_dhidden != NULL);
    size_t host_bytes = l.counts + (size_t)c.nchunks * sizeof(unsigned);
    if (host_bytes < (size_t)tokens * sizeof(double))
        host_bytes = (size_t)tokens * sizeof(double);
    QL_CUDA_ENTER(s);
    void *host = malloc(host_bytes);
    if (!host)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "%s: out of host memory (%zu bytes)", fn, host_bytes);
    void *ws = NULL;
    qlora_status st = qlora_alloc(s->owner, l.total, 1, QLORA_MEM_WORKSPACE, &ws);
    if (st == QLORA_OK)
        st = xent_run(s, c, (unsigned char *)ws, l, host, loss_sum, count);
    qlora_free(s->owner, ws); /* waits for the stream first */
    free(host);
    return st;
}
