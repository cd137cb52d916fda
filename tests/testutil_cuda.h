/*
 * Helpers of the suites that call the CUDA launchers directly (built with QLORA_WITH_CUDA): a
 * context on device 0 with its CUDA state, and device buffers with poisoned guard bytes around
 * the payload so that a kernel writing outside its output is caught.
 */
#ifndef QLORA_TESTUTIL_CUDA_H
#define QLORA_TESTUTIL_CUDA_H

#include "cuda_backend.h"
#include "internal.h"
#include "testutil.h"

typedef struct tu_gpu {
    qlora_ctx *ctx;
    ql_cuda_state *cs;
    uint8_t poison; /* the byte every buffer of tu_dbuf_new starts filled with */
} tu_gpu;

/* Opens cuda:0 and returns 1, or says "FILE: skipped" and returns 0 when no device is visible. */
#define tu_gpu_open(g, poison) tu_gpu_open_in(g, poison, __FILE__)
int tu_gpu_open_in(tu_gpu *g, uint8_t poison, const char *file);
/* Synchronizes, checks that nothing is left allocated and frees the context. */
void tu_gpu_close(tu_gpu *g);

/* Bytes checked on each side of a device buffer's payload. */
#define TU_GUARD 64

/* A device buffer: `bytes` of payload at `off` bytes past a front guard of TU_GUARD bytes, and a
 * back guard of TU_GUARD bytes; all of it holds the gpu's poison until written. */
typedef struct tu_dbuf {
    uint8_t *base;
    size_t bytes, off;
    uint8_t poison;
} tu_dbuf;

tu_dbuf tu_dbuf_new(tu_gpu *g, size_t bytes, size_t off);
/* A buffer holding a copy of `bytes` of host data. */
tu_dbuf tu_dbuf_from(tu_gpu *g, const void *host, size_t bytes, size_t off);
/* The payload's first byte. */
void *tu_dbuf_ptr(const tu_dbuf *b);
/* Uploads b->bytes of host data into the payload. */
void tu_dbuf_set(tu_gpu *g, tu_dbuf *b, const void *host);
/* Downloads the payload into `out` and checks that the guards (and the offset gap) still hold
 * the poison; `what` names the output in a failure. */
void tu_dbuf_get(tu_gpu *g, const tu_dbuf *b, void *out, const char *what);
/* tu_dbuf_get into a malloc'ed copy. */
void *tu_dbuf_download(tu_gpu *g, const tu_dbuf *b, const char *what);
void tu_dbuf_free(tu_gpu *g, tu_dbuf *b);

#endif
