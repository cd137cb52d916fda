/*
 * The tracked allocator: every byte libqlora allocates goes through qlora_alloc with a
 * category, so the memory accountant can report current and peak bytes per category. Live
 * allocations sit in an open-addressing hash table keyed by pointer (device pointers cannot
 * carry a header in front of them).
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#endif

#define QL_ALIGN 256
#define QL_TOMBSTONE ((void *)1)

static const char *category_names[QLORA_MEM_CATEGORY_COUNT] = {
    "base_weights",     "quant_state",      "adapter_weights", "adapter_grads",
    "optimizer_device", "optimizer_host",   "master_weights",  "activations",
    "checkpoints",      "workspace",        "dense_weights",
};

const char *qlora_mem_category_name(qlora_mem_category category) {
    if ((int)category < 0 || category >= QLORA_MEM_CATEGORY_COUNT)
        return "invalid";
    return category_names[category];
}

static size_t hash_ptr(const void *p, size_t cap) {
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x & (cap - 1);
}

static ql_alloc_entry *table_find(qlora_ctx *ctx, const void *ptr) {
    if (!ctx->table_cap)
        return NULL;
    size_t i = hash_ptr(ptr, ctx->table_cap);
    for (;;) {
        ql_alloc_entry *e = &ctx->table[i];
        if (e->ptr == NULL)
            return NULL;
        if (e->ptr == ptr)
            return e;
        i = (i + 1) & (ctx->table_cap - 1);
    }
}

static int table_insert_raw(ql_alloc_entry *table, size_t cap, const ql_alloc_entry *entry) {
    size_t i = hash_ptr(entry->ptr, cap);
    while (table[i].ptr != NULL && table[i].ptr != QL_TOMBSTONE)
        i = (i + 1) & (cap - 1);
    int reused_tombstone = table[i].ptr == QL_TOMBSTONE;
    table[i] = *entry;
    return reused_tombstone;
}

static qlora_status table_reserve(qlora_ctx *ctx) {
    if ((ctx->table_used + ctx->table_tombstones + 1) * 4 < ctx->table_cap * 3)
        return QLORA_OK;
    size_t cap = ctx->table_cap ? ctx->table_cap * 2 : 64;
    while (ctx->table_used * 2 >= cap)
        cap *= 2;
    ql_alloc_entry *t = calloc(cap, sizeof *t);
    if (!t)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "qlora_alloc: out of host memory for the allocation table");
    for (size_t i = 0; i < ctx->table_cap; i++) {
        void *p = ctx->table[i].ptr;
        if (p != NULL && p != QL_TOMBSTONE)
            table_insert_raw(t, cap, &ctx->table[i]);
    }
    free(ctx->table);
    ctx->table = t;
    ctx->table_cap = cap;
    ctx->table_tombstones = 0;
    return QLORA_OK;
}

static void stats_add(qlora_mem_stats *s, int loc, int cat, size_t bytes) {
    s->current[loc][cat] += bytes;
    if (s->current[loc][cat] > s->peak[loc][cat])
        s->peak[loc][cat] = s->current[loc][cat];
    s->total_current[loc] += bytes;
    if (s->total_current[loc] > s->total_peak[loc])
        s->total_peak[loc] = s->total_current[loc];
    s->allocations++;
    s->live_allocations++;
}

static void stats_sub(qlora_mem_stats *s, int loc, int cat, size_t bytes) {
    s->current[loc][cat] -= bytes;
    s->total_current[loc] -= bytes;
    s->live_allocations--;
}

/* Where an allocation physically lives: index 1 ("device") only for CUDA device memory; a CPU
 * context's "device" is host memory and is counted as host. */
static int location_index(const qlora_ctx *ctx, int on_device) {
    return ctx->params.backend == QLORA_BACKEND_CUDA && on_device ? 1 : 0;
}

static void raw_free(qlora_ctx *ctx, const ql_alloc_entry *e) {
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda && e->on_device) {
        ql_cuda_free((ql_cuda_state *)ctx->cuda, e->base);
        return;
    }
    if (ctx->cuda && e->pinned) {
        ql_cuda_host_free((ql_cuda_state *)ctx->cuda, e->base);
        return;
    }
#else
    (void)ctx;
#endif
    free(e->base);
}

qlora_status qlora_alloc(qlora_ctx *ctx, size_t bytes, int on_device, qlora_mem_category category, void **out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    if ((int)category < 0 || category >= QLORA_MEM_CATEGORY_COUNT)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_alloc: invalid memory category %d", (int)category);
    if (bytes > SIZE_MAX - QL_ALIGN)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "qlora_alloc: %zu bytes is too large", bytes);
    size_t padded = bytes ? (bytes + QL_ALIGN - 1) / QL_ALIGN * QL_ALIGN : QL_ALIGN;
    int loc = location_index(ctx, on_device);
    ql_alloc_entry e = {0};
    e.bytes = bytes;
    e.category = (unsigned char)category;
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) {
        ql_cuda_state *cs = (ql_cuda_state *)ctx->cuda;
        qlora_status st = on_device ? ql_cuda_malloc(cs, padded, &e.base) : ql_cuda_host_alloc(cs, padded, &e.base);
        if (st != QLORA_OK) {
            ql_error_prefix("qlora_alloc(%zu bytes, %s, %s)", bytes, on_device ? "device" : "pinned host",
                            qlora_mem_category_name(category));
            return st == QLORA_ERR_CUDA ? QLORA_ERR_OUT_OF_MEMORY : st;
        }
        e.on_device = (unsigned char)(on_device != 0);
        e.pinned = (unsigned char)(on_device == 0);
    } else
#endif
    {
        e.base = aligned_alloc(QL_ALIGN, padded);
        if (!e.base)
            return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "qlora_alloc: out of host memory (%zu bytes for %s)", bytes,
                           qlora_mem_category_name(category));
    }
    e.ptr = e.base;
    pthread_mutex_lock(&ctx->lock);
    qlora_status st = table_reserve(ctx);
    if (st == QLORA_OK) {
        if (table_insert_raw(ctx->table, ctx->table_cap, &e))
            ctx->table_tombstones--;
        ctx->table_used++;
        stats_add(&ctx->stats, loc, category, bytes);
    }
    pthread_mutex_unlock(&ctx->lock);
    if (st != QLORA_OK) {
        raw_free(ctx, &e);
        return st;
    }
    *out = e.ptr;
    return QLORA_OK;
}

void qlora_free(qlora_ctx *ctx, void *ptr) {
    if (!ctx || !ptr)
        return;
    pthread_mutex_lock(&ctx->lock);
    ql_alloc_entry *slot = table_find(ctx, ptr);
    ql_alloc_entry e = {0};
    if (slot) {
        e = *slot;
        slot->ptr = QL_TOMBSTONE;
        ctx->table_used--;
        ctx->table_tombstones++;
        stats_sub(&ctx->stats, location_index(ctx, e.on_device), e.category, e.bytes);
    }
    pthread_mutex_unlock(&ctx->lock);
    if (!slot) {
        ql_log(QLORA_LOG_WARN, "qlora_free: pointer %p was not allocated by this context; ignored", ptr);
        return;
    }
    raw_free(ctx, &e);
}

qlora_status qlora_mem_get_stats(const qlora_ctx *ctx, qlora_mem_stats *out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(out != NULL, "out");
    pthread_mutex_lock((pthread_mutex_t *)&ctx->lock);
    *out = ctx->stats;
    pthread_mutex_unlock((pthread_mutex_t *)&ctx->lock);
    return QLORA_OK;
}

void qlora_mem_reset_peak(qlora_ctx *ctx) {
    if (!ctx)
        return;
    pthread_mutex_lock(&ctx->lock);
    memcpy(ctx->stats.peak, ctx->stats.current, sizeof ctx->stats.peak);
    memcpy(ctx->stats.total_peak, ctx->stats.total_current, sizeof ctx->stats.total_peak);
    pthread_mutex_unlock(&ctx->lock);
}

/* Called by qlora_ctx_free: releases whatever is still live and reports it as a leak. */
void ql_alloc_table_destroy(qlora_ctx *ctx) {
    size_t leaked = 0, leaked_bytes = 0;
    for (size_t i = 0; i < ctx->table_cap; i++) {
        ql_alloc_entry *e = &ctx->table[i];
        if (e->ptr == NULL || e->ptr == QL_TOMBSTONE)
            continue;
        leaked++;
        leaked_bytes += e->bytes;
        raw_free(ctx, e);
    }
    if (leaked)
        ql_log(QLORA_LOG_WARN, "qlora_ctx_free: %zu allocations (%zu bytes) were still live and have been freed",
               leaked, leaked_bytes);
    free(ctx->table);
    ctx->table = NULL;
    ctx->table_cap = ctx->table_used = ctx->table_tombstones = 0;
}
