/* Helpers of the suites that call the CUDA launchers directly (see testutil_cuda.h). */
#include "testutil_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tu_gpu_open_in(tu_gpu *g, uint8_t poison, const char *file) {
    if (!tu_have_gpu()) {
        fprintf(stderr, "%s: skipped, no CUDA device visible\n", file);
        return 0;
    }
    g->ctx = tu_cuda_ctx();
    g->cs = (ql_cuda_state *)g->ctx->cuda;
    g->poison = poison;
    ck_assert_ptr_nonnull(g->cs);
    return 1;
}

void tu_gpu_close(tu_gpu *g) {
    ck_assert_qlora_ok(ql_cuda_synchronize(g->cs));
    qlora_mem_stats st;
    ck_assert_qlora_ok(qlora_mem_get_stats(g->ctx, &st));
    ck_assert_uint_eq(st.live_allocations, 0);
    qlora_ctx_free(g->ctx);
}

static size_t dbuf_total(const tu_dbuf *b) { return b->bytes + b->off + 2 * TU_GUARD; }

tu_dbuf tu_dbuf_new(tu_gpu *g, size_t bytes, size_t off) {
    tu_dbuf b = {NULL, bytes, off, g->poison};
    size_t total = dbuf_total(&b);
    ck_assert_qlora_ok(qlora_alloc(g->ctx, total, 1, QLORA_MEM_WORKSPACE, (void **)&b.base));
    uint8_t *h = malloc(total);
    ck_assert_ptr_nonnull(h);
    memset(h, b.poison, total);
    ck_assert_qlora_ok(ql_cuda_memcpy(g->cs, b.base, h, total));
    free(h);
    return b;
}

void *tu_dbuf_ptr(const tu_dbuf *b) { return b->base + TU_GUARD + b->off; }

tu_dbuf tu_dbuf_from(tu_gpu *g, const void *host, size_t bytes, size_t off) {
    tu_dbuf b = tu_dbuf_new(g, bytes, off);
    tu_dbuf_set(g, &b, host);
    return b;
}

void tu_dbuf_set(tu_gpu *g, tu_dbuf *b, const void *host) {
    ck_assert_qlora_ok(ql_cuda_memcpy(g->cs, tu_dbuf_ptr(b), host, b->bytes));
}

void tu_dbuf_get(tu_gpu *g, const tu_dbuf *b, void *out, const char *what) {
    size_t total = dbuf_total(b), first = TU_GUARD + b->off;
    uint8_t *h = malloc(total);
    ck_assert_ptr_nonnull(h);
    ck_assert_qlora_ok(ql_cuda_memcpy(g->cs, h, b->base, total));
    for (size_t i = 0; i < total; i++) {
        int inside = i >= first && i < first + b->bytes;
        ck_assert_msg(inside || h[i] == b->poison, "%s: byte %lld (relative to the output) was written", what,
                      (long long)i - (long long)first);
    }
    memcpy(out, h + first, b->bytes);
    free(h);
}

void *tu_dbuf_download(tu_gpu *g, const tu_dbuf *b, const char *what) {
    void *out = malloc(b->bytes ? b->bytes : 1);
    ck_assert_ptr_nonnull(out);
    tu_dbuf_get(g, b, out, what);
    return out;
}

void tu_dbuf_free(tu_gpu *g, tu_dbuf *b) {
    qlora_free(g->ctx, b->base);
    b->base = NULL;
}
