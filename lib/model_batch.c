/*
 * The per-token inputs of a model call (lib/model_internal.h): checked on the host, where the
 * messages can name the offending token, then copied to the context's device in one allocation.
 */
#include "model_internal.h"

#include <string.h>

static qlora_status check_inputs(const qlora_model *m, const char *who, const int32_t *tokens,
                                 const int32_t *positions, const int32_t *seq_start, const int32_t *labels, int64_t T,
                                 int32_t *pos, int64_t *max_pos) {
    const int64_t V = m->cfg.vocab_size;
    *max_pos = 0;
    for (int64_t t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= V)
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: tokens[%lld] = %d is outside [0, %lld)", who, (long long)t,
                           tokens[t], (long long)V);
        if (labels && labels[t] != QL_IGNORE_INDEX && (labels[t] < 0 || labels[t] >= V))
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: labels[%lld] = %d is neither -100 nor in [0, %lld)", who,
                           (long long)t, labels[t], (long long)V);
        int64_t start = seq_start ? seq_start[t] : 0;
        if (seq_start && !(t == 0 ? start == 0 : start == seq_start[t - 1] || start == t))
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: seq_start[%lld] = %lld; sequences must be contiguous "
                           "(seq_start[0] = 0, then seq_start[t-1] or t)", who, (long long)t, (long long)start);
        pos[t] = positions ? positions[t] : (int32_t)(t - start);
        if (pos[t] < 0)
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: positions[%lld] = %d is negative", who, (long long)t, pos[t]);
        if (pos[t] > *max_pos)
            *max_pos = pos[t];
    }
    return QLORA_OK;
}

qlora_status ql_model_batch_init(qlora_model *m, const char *who, const int32_t *tokens, const int32_t *positions,
                                 const int32_t *seq_start, const int32_t *labels, int64_t T, ql_model_batch *b) {
    memset(b, 0, sizeof *b);
    b->T = T;
    const size_t row = (size_t)T * sizeof(int32_t);
    int32_t *host = NULL;
    QL_CHECK(qlora_alloc(m->ctx, 4 * row, 0, QLORA_MEM_WORKSPACE, (void **)&host));
    int64_t max_pos = 0;
    qlora_status st = check_inputs(m, who, tokens, positions, seq_start, labels, T, host + T, &max_pos);
    if (st == QLORA_OK) {
        memcpy(host, tokens, row);
        if (seq_start)
            memcpy(host + 2 * T, seq_start, row);
        if (labels)
            memcpy(host + 3 * T, labels, row);
        st = qlora_alloc(m->ctx, 4 * row, 1, QLORA_MEM_WORKSPACE, &b->base);
    }
    if (st == QLORA_OK)
        st = ql_ctx_memcpy(m->ctx, b->base, host, 4 * row);
    qlora_free(m->ctx, host);
    if (st == QLORA_OK) {
        int32_t *dev = b->base;
        b->tokens = dev;
        b->pos = dev + T;
        b->seq_start = seq_start ? dev + 2 * T : NULL;
        b->labels = labels ? dev + 3 * T : NULL;
        st = ql_rope_table_init(m->ctx, &m->rope, max_pos + 1, &b->rope);
    }
    if (st != QLORA_OK)
        ql_model_batch_free(m, b);
    return st;
}

void ql_model_batch_free(qlora_model *m, ql_model_batch *b) {
    ql_rope_table_free(m->ctx, &b->rope);
    qlora_free(m->ctx, b->base);
    memset(b, 0, sizeof *b);
}
