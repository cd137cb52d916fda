/*
 * Rotary position embeddings in HF's split-halves layout (lib/model_ops.h). inv_freq repeats
 * transformers' float32 arithmetic step by step (CPU PyTorch semantics: `a / scalar` divides,
 * `scalar / tensor` is reciprocal(tensor) · scalar, Python scalars become float32), so the
 * table matches what HF builds; tests/fixtures/make_rope_fixture.py records HF's values.
 */
#include "model_ops.h"

#include <math.h>

#include "half.h"
#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

#define QL_ROPE_PARALLEL_MIN (1 << 15)

static qlora_status check_params(const ql_rope_params *p) {
    QL_REQUIRE_ARG(p != NULL, "rope params");
    if (p->head_dim <= 0 || p->head_dim % 2 != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "rope: head_dim %d must be positive and even", p->head_dim);
    if (!(p->theta > 0.0) || !isfinite(p->theta))
        return ql_fail(QLORA_ERR_INVALID_ARG, "rope: rope_theta %g must be positive", p->theta);
    if (p->type == QL_ROPE_DEFAULT)
        return QLORA_OK;
    if (!(p->factor > 0.0) || !isfinite(p->factor))
        return ql_fail(QLORA_ERR_INVALID_ARG, "rope: scaling factor %g must be positive", p->factor);
    if (p->type == QL_ROPE_LINEAR)
        return QLORA_OK;
    if (p->type != QL_ROPE_LLAMA3)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "rope: unknown rope type %d", (int)p->type);
    if (!(p->low_freq_factor > 0.0) || !(p->high_freq_factor > p->low_freq_factor) ||
        !isfinite(p->high_freq_factor) || p->original_max_positions <= 0)
        return ql_fail(QLORA_ERR_INVALID_ARG,
                       "rope: llama3 needs 0 < low_freq_factor (%g) < high_freq_factor (%g) and "
                       "original_max_position_embeddings (%lld) > 0",
                       p->low_freq_factor, p->high_freq_factor, (long long)p->original_max_positions);
    return QLORA_OK;
}

/* transformers' _compute_llama3_parameters for one frequency, in its float32 order of operations. */
static float llama3_frequency(const ql_rope_params *p, float inv) {
    float factor = (float)p->factor, low = (float)p->low_freq_factor;
    float orig = (float)p->original_max_positions;
    float low_wavelen = (float)((double)p->original_max_positions / p->low_freq_factor);
    float high_wavelen = (float)((double)p->original_max_positions / p->high_freq_factor);
    float wavelen = (1.0f / inv) * (float)(2.0 * M_PI);
    float scaled = wavelen > low_wavelen ? inv / factor : inv;
    if (wavelen < high_wavelen || wavelen > low_wavelen)
        return scaled;
    float smooth = ((1.0f / wavelen) * orig - low) / (float)(p->high_freq_factor - p->low_freq_factor);
    return (1.0f - smooth) * scaled / factor + smooth * scaled;
}

qlora_status ql_rope_inv_freq(const ql_rope_params *p, float *inv_freq) {
    QL_CHECK(check_params(p));
    QL_REQUIRE_ARG(inv_freq != NULL, "inv_freq");
    float theta = (float)p->theta;
    for (int j = 0; j < p->head_dim / 2; j++) {
        float exponent = (float)(2 * j) / (float)p->head_dim;
        float inv = 1.0f / powf(theta, exponent);
        if (p->type == QL_ROPE_LINEAR)
            inv = inv / (float)p->factor;
        else if (p->type == QL_ROPE_LLAMA3)
            inv = llama3_frequency(p, inv);
        inv_freq[j] = inv;
    }
    return QLORA_OK;
}

qlora_status ql_rope_table_init(qlora_ctx *ctx, const ql_rope_params *p, int64_t positions, ql_rope_table *out) {
    QL_REQUIRE_ARG(ctx != NULL && out != NULL, "ctx/out");
    QL_REQUIRE_ARG(positions > 0 && positions <= INT32_MAX, "positions");
    out->cos = out->sin = NULL;
    QL_CHECK(check_params(p));
    int half = p->head_dim / 2;
    float inv_freq[QL_ATTN_MAX_HEAD_DIM / 2];
    if (half > QL_ATTN_MAX_HEAD_DIM / 2)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "rope: head_dim %d is above the supported %d", p->head_dim,
                       QL_ATTN_MAX_HEAD_DIM);
    QL_CHECK(ql_rope_inv_freq(p, inv_freq));
    size_t n = (size_t)positions * (size_t)half;
    uint16_t *buf = NULL;
    QL_CHECK(qlora_alloc(ctx, 2 * n * sizeof(uint16_t), 0, QLORA_MEM_WORKSPACE, (void **)&buf));
    int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if ((int64_t)n >= QL_ROPE_PARALLEL_MIN)
    for (int64_t pos = 0; pos < positions; pos++) {
        for (int j = 0; j < half; j++) {
            float angle = (float)pos * inv_freq[j]; /* HF: position_ids.float() * inv_freq */
            buf[pos * half + j] = ql_f32_to_bf16(cosf(angle));
            buf[n + pos * half + j] = ql_f32_to_bf16(sinf(angle));
        }
    }
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) { /* the ops read the table on the device: computed here, copied there */
        uint16_t *dev = NULL;
        qlora_status st = qlora_alloc(ctx, 2 * n * sizeof(uint16_t), 1, QLORA_MEM_WORKSPACE, (void **)&dev);
        if (st == QLORA_OK)
            st = ql_cuda_memcpy((ql_cuda_state *)ctx->cuda, dev, buf, 2 * n * sizeof(uint16_t));
        qlora_free(ctx, buf);
        if (st != QLORA_OK) {
            qlora_free(ctx, dev);
            return st;
        }
        buf = dev;
    }
#endif
    out->positions = positions;
    out->half = half;
    out->cos = buf;
    out->sin = buf + n;
    return QLORA_OK;
}

void ql_rope_table_free(qlora_ctx *ctx, ql_rope_table *t) {
    if (t == NULL)
        return;
    qlora_free(ctx, t->cos);
    t->cos = t->sin = NULL;
}

static qlora_status check_apply(const qlora_ctx *ctx, const ql_rope_table *t, const int32_t *pos, int64_t tokens,
                                int heads, const uint16_t *x) {
    QL_REQUIRE_ARG(ctx != NULL && t != NULL && t->cos != NULL, "ctx/table");
    QL_REQUIRE_ARG(pos != NULL && x != NULL, "pos/x");
    QL_REQUIRE_ARG(tokens >= 0 && heads > 0, "tokens/heads");
    return QLORA_OK;
}

/* Reads pos on the host: CPU contexts only (on a CUDA context the caller validated them). */
static qlora_status check_positions(const ql_rope_table *t, const int32_t *pos, int64_t tokens) {
    for (int64_t i = 0; i < tokens; i++)
        if (pos[i] < 0 || pos[i] >= t->positions)
            return ql_fail(QLORA_ERR_INVALID_ARG, "rope: token %lld has position %d outside the table [0, %lld)",
                           (long long)i, pos[i], (long long)t->positions);
    return QLORA_OK;
}

static float mul_bf16(float a, float b) { return ql_bf16_to_f32(ql_f32_to_bf16(a * b)); }

qlora_status ql_rope_forward(qlora_ctx *ctx, const ql_rope_table *t, const int32_t *pos, int64_t tokens, int heads,
                             uint16_t *x) {
    QL_CHECK(check_apply(ctx, t, pos, tokens, heads, x));
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_rope_forward((ql_cuda_state *)ctx->cuda, t->cos, t->sin, t->half, pos, tokens, heads, x);
#endif
    QL_CHECK(check_positions(t, pos, tokens));
    int half = t->half, nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (tokens * heads * half >= QL_ROPE_PARALLEL_MIN)
    for (int64_t i = 0; i < tokens; i++) {
        const uint16_t *c = t->cos + (int64_t)pos[i] * half, *s = t->sin + (int64_t)pos[i] * half;
        for (int h = 0; h < heads; h++) {
            uint16_t *row = x + (i * heads + h) * 2 * half;
            for (int j = 0; j < half; j++) {
                float x1 = ql_bf16_to_f32(row[j]), x2 = ql_bf16_to_f32(row[j + half]);
                float cj = ql_bf16_to_f32(c[j]), sj = ql_bf16_to_f32(s[j]);
                /* q·cos + rotate_half(q)·sin, each product and the sum rounded as in BF16 torch */
                row[j] = ql_f32_to_bf16(mul_bf16(x1, cj) + mul_bf16(-x2, sj));
                row[j + half] = ql_f32_to_bf16(mul_bf16(x2, cj) + mul_bf16(x1, sj));
            }
        }
    }
    return QLORA_OK;
}

qlora_status ql_rope_backward(qlora_ctx *ctx, const ql_rope_table *t, const int32_t *pos, int64_t tokens, int heads,
                              uint16_t *dx) {
    QL_CHECK(check_apply(ctx, t, pos, tokens, heads, dx));
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_rope_backward((ql_cuda_state *)ctx->cuda, t->cos, t->sin, t->half, pos, tokens, heads, dx);
#endif
    QL_CHECK(check_positions(t, pos, tokens));
    int half = t->half, nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (tokens * heads * half >= QL_ROPE_PARALLEL_MIN)
    for (int64_t i = 0; i < tokens; i++) {
        const uint16_t *c = t->cos + (int64_t)pos[i] * half, *s = t->sin + (int64_t)pos[i] * half;
        for (int h = 0; h < heads; h++) {
            uint16_t *row = dx + (i * heads + h) * 2 * half;
            for (int j = 0; j < half; j++) {
                float d1 = ql_bf16_to_f32(row[j]), d2 = ql_bf16_to_f32(row[j + half]);
                float cj = ql_bf16_to_f32(c[j]), sj = ql_bf16_to_f32(s[j]);
                row[j] = ql_f32_to_bf16(d1 * cj + d2 * sj);
                row[j + half] = ql_f32_to_bf16(d2 * cj - d1 * sj);
            }
        }
    }
    return QLORA_OK;
}
