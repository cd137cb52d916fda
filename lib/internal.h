/*
 * Private declarations shared by lib/ and cuda/ host code: the context, error reporting and
 * logging. Nothing here is exported from libqlora.so (everything is hidden by default).
 */
#ifndef QLORA_INTERNAL_H
#define QLORA_INTERNAL_H

#include "qlora.h"

#include <pthread.h>
#include <stdarg.h>

#if defined(__GNUC__)
#  define QL_PRINTF(fmt_idx, arg_idx) __attribute__((format(printf, fmt_idx, arg_idx)))
#else
#  define QL_PRINTF(fmt_idx, arg_idx)
#endif

/* Records `status` with a formatted message as this thread's last error, logs it at ERROR and
 * returns `status`, so a failing path reads: return ql_fail(QLORA_ERR_SHAPE, "...", ...). */
qlora_status ql_fail(qlora_status status, const char *fmt, ...) QL_PRINTF(2, 3);
/* Prepends "context: " to the current last error (for callers that add the file name). */
void ql_error_prefix(const char *fmt, ...) QL_PRINTF(1, 2);
void ql_log(qlora_log_level level, const char *fmt, ...) QL_PRINTF(2, 3);

#define QL_CHECK(expr)                                  \
    do {                                                \
        qlora_status ql_check_status_ = (expr);         \
        if (ql_check_status_ != QLORA_OK)               \
            return ql_check_status_;                    \
    } while (0)

#define QL_REQUIRE_ARG(cond, name)                                                        \
    do {                                                                                  \
        if (!(cond))                                                                      \
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: invalid argument '%s' (%s)",      \
                           __func__, (name), #cond);                                      \
    } while (0)

/* One live allocation of the tracked allocator. */
typedef struct ql_alloc_entry {
    void *ptr;        /* NULL = empty slot, QL_TOMBSTONE = deleted */
    void *base;       /* what the underlying allocator returned (host alignment) */
    size_t bytes;
    unsigned char on_device;
    unsigned char pinned;
    unsigned char category;
} ql_alloc_entry;

struct qlora_ctx {
    qlora_ctx_params params;
    pthread_mutex_t lock;           /* guards the allocation table and stats */
    ql_alloc_entry *table;          /* open addressing, power-of-two capacity */
    size_t table_cap, table_used, table_tombstones;
    qlora_mem_stats stats;
    void *cuda;                     /* ql_cuda_state* when backend == CUDA */
};

/* Sets `name` into a fixed buffer, truncating safely. */
void ql_copy_name(char *dst, const char *src);
/* Bytes to store n elements of dtype (ceil for sub-byte types); 0 with *overflow = 1 if it
 * does not fit in size_t. */
size_t ql_dtype_nbytes(qlora_dtype dtype, int64_t n, int *overflow);
/* A printable name for error messages: t->name, or fallback when empty. */
const char *ql_tensor_label(const qlora_tensor *t, const char *fallback);
/* Copies bytes between host memory and the context's memory (either side may be either; on a
 * CPU context a memmove). Synchronous. */
qlora_status ql_ctx_memcpy(qlora_ctx *ctx, void *dst, const void *src, size_t bytes);
/* The device index a tensor allocated by ctx lives on (QLORA_DEVICE_HOST on a CPU context). */
int ql_ctx_tensor_device(const qlora_ctx *ctx);

#endif
