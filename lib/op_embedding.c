/* The token embedding gather (lib/model_ops.h): rows of the frozen BF16 table. */
#include "model_ops.h"

#include <string.h>

#ifdef QLORA_HAVE_CUDA
#include "model_ops_cuda.h"
#endif

qlora_status ql_embedding_forward(qlora_ctx *ctx, const uint16_t *table, int64_t vocab, int64_t hidden_dim,
                                  const int32_t *ids, int64_t tokens, uint16_t *out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(table != NULL && ids != NULL && out != NULL, "table/ids/out");
    QL_REQUIRE_ARG(vocab > 0 && hidden_dim > 0 && tokens >= 0, "vocab/hidden_dim/tokens");
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) { /* the ids are on the device: the kernel finds a bad one */
        ql_cuda_state *cs = (ql_cuda_state *)ctx->cuda;
        int64_t bad = -1;
        QL_CHECK(ql_cuda_embedding_forward(cs, table, vocab, hidden_dim, ids, tokens, out, &bad));
        if (bad < 0)
            return QLORA_OK;
        int32_t id = 0;
        QL_CHECK(ql_cuda_memcpy(cs, &id, ids + bad, sizeof id));
        return ql_fail(QLORA_ERR_INVALID_ARG, "embedding: token %lld has id %d outside the vocabulary [0, %lld)",
                       (long long)bad, id, (long long)vocab);
    }
#endif
    for (int64_t t = 0; t < tokens; t++)
        if (ids[t] < 0 || ids[t] >= vocab)
            return ql_fail(QLORA_ERR_INVALID_ARG, "embedding: token %lld has id %d outside the vocabulary [0, %lld)",
                           (long long)t, ids[t], (long long)vocab);
    int nt = ql_ops_threads(ctx);
#pragma omp parallel for schedule(static) num_threads(nt) if (tokens * hidden_dim >= (1 << 16))
    for (int64_t t = 0; t < tokens; t++)
        memcpy(out + t * hidden_dim, table + (int64_t)ids[t] * hidden_dim, (size_t)hidden_dim * sizeof(uint16_t));
    return QLORA_OK;
}
