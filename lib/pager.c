/*
 * The optimizer's page table and device pool (contract and eviction rule in pager.h). The same
 * code runs on a CPU context, where the "device" pool is host memory and copies are memcpy, and
 * on CUDA, where copies are queued on a copy stream and ordered against the update kernels
 * with two events per slot.
 */
#include "pager.h"

#include "half.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#endif

/* Page copies timed with CUDA events between two collections; a full set forces a collection
 * (a copy-stream sync), which bounds the number of events. */
#define QL_TIMER_PAIRS 256

typedef struct ql_page {
    const uint16_t *param; /* the BF16 elements this page covers (context device) */
    int64_t count;         /* elements in use: E, or fewer for a parameter's last page */
    int64_t slot;          /* pool slot, -1 when not resident */
    float *host;           /* host copy [m | v | master]; NULL until the page is first evicted */
} ql_page;

typedef struct ql_slot {
    float *mv;             /* [m: E | v: E] */
    float *master;         /* [E], NULL without master copies */
    int64_t page;          /* page held, -1 when free */
#ifdef QLORA_HAVE_CUDA
    ql_cuda_event *used;   /* context stream: after the last kernel that touched the slot */
    ql_cuda_event *filled; /* copy stream: after the last copy into the slot */
    int fill_pending;      /* `filled` not yet waited for by the context stream */
#endif
} ql_slot;

struct ql_pager {
    qlora_ctx *ctx;
    int64_t map_elems;      /* E as configured: page j of a parameter starts at element j·E */
    int64_t elems;          /* elements a slot or host copy holds: E, or less when every page is
                               smaller (the largest page rounded up to 64; fixed once the pool exists) */
    int master;
    size_t page_bytes;      /* 4 * E * states: what one page copy moves */
    uint64_t max_slots;     /* 0 = no limit */
    uint64_t sim_capacity;  /* tests: simulated device capacity in slots, 0 = off */
    ql_page *pages;
    int64_t npages, pages_cap;
    ql_slot *slots;
    int64_t nslots, slots_cap;
    int64_t nresident;
    uint64_t page_outs, page_ins, bytes_out, bytes_in;
    double seconds;
#ifdef QLORA_HAVE_CUDA
    ql_cuda_state *cuda;    /* NULL on a CPU context */
    ql_cuda_stream *copy;
    ql_cuda_event *timers[2 * QL_TIMER_PAIRS];
    int timers_used;
    float *staging;         /* pinned [E floats | E bf16]: fresh master copies on their way in */
    int staging_busy;       /* an asynchronous copy may still read staging */
#endif
};

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

qlora_status ql_pager_create(qlora_ctx *ctx, int64_t elems_per_page, int master, uint64_t max_slots,
                             ql_pager **out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(out != NULL, "out");
    QL_REQUIRE_ARG(elems_per_page > 0, "elems_per_page");
    *out = NULL;
    ql_pager *p = calloc(1, sizeof *p);
    if (!p)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "optimizer pager: out of host memory");
    p->ctx = ctx;
    p->map_elems = p->elems = elems_per_page;
    p->master = master != 0;
    p->page_bytes = (size_t)elems_per_page * sizeof(float) * (size_t)(p->master ? 3 : 2);
    p->max_slots = max_slots;
#ifdef QLORA_HAVE_CUDA
    p->cuda = (ql_cuda_state *)ctx->cuda;
    if (p->cuda) {
        qlora_status st = ql_cuda_stream_create(p->cuda, &p->copy);
        if (st != QLORA_OK) {
            free(p);
            ql_error_prefix("optimizer pager: creating the copy stream");
            return st;
        }
    }
#endif
    *out = p;
    return QLORA_OK;
}

void ql_pager_destroy(ql_pager *p) {
    if (!p)
        return;
#ifdef QLORA_HAVE_CUDA
    if (p->cuda) {
        /* Kernels on the context stream may still use the pool, copies may still use host copies. */
        if (ql_cuda_synchronize(p->cuda) != QLORA_OK)
            ql_log(QLORA_LOG_WARN, "optimizer pager: %s", qlora_last_error());
        ql_cuda_stream_destroy(p->cuda, p->copy);
        for (int i = 0; i < 2 * QL_TIMER_PAIRS; i++)
            ql_cuda_event_destroy(p->cuda, p->timers[i]);
        for (int64_t s = 0; s < p->nslots; s++) {
            ql_cuda_event_destroy(p->cuda, p->slots[s].used);
            ql_cuda_event_destroy(p->cuda, p->slots[s].filled);
        }
    }
    qlora_free(p->ctx, p->staging);
#endif
    for (int64_t s = 0; s < p->nslots; s++) {
        qlora_free(p->ctx, p->slots[s].mv);
        qlora_free(p->ctx, p->slots[s].master);
    }
    for (int64_t k = 0; k < p->npages; k++)
        qlora_free(p->ctx, p->pages[k].host);
    free(p->slots);
    free(p->pages);
    free(p);
}

qlora_status ql_pager_add(ql_pager *p, const uint16_t *param, int64_t n, int64_t *first_page) {
    QL_REQUIRE_ARG(p != NULL, "pager");
    QL_REQUIRE_ARG(param != NULL, "param");
    QL_REQUIRE_ARG(n > 0, "n");
    const int64_t E = p->map_elems;
    int64_t count = (n + E - 1) / E;
    if (p->npages + count > p->pages_cap) {
        int64_t cap = p->pages_cap ? p->pages_cap : 64;
        while (cap < p->npages + count)
            cap *= 2;
        ql_page *pages = realloc(p->pages, (size_t)cap * sizeof *pages);
        if (!pages)
            return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "optimizer pager: out of host memory for %lld pages",
                           (long long)cap);
        p->pages = pages;
        p->pages_cap = cap;
    }
    *first_page = p->npages;
    for (int64_t j = 0; j < count; j++) {
        ql_page *pg = &p->pages[p->npages++];
        int64_t begin = j * E;
        pg->param = param + begin;
        pg->count = n - begin < E ? n - begin : E;
        pg->slot = -1;
        pg->host = NULL;
    }
    /* Small parameters (LoRA adapters of small models) would each pay for a whole page:
     * storage shrinks to the largest page while nothing is stored yet. */
    int64_t largest = 0;
    for (int64_t k = 0; k < p->npages; k++)
        largest = p->pages[k].count > largest ? p->pages[k].count : largest;
    largest = (largest + 63) / 64 * 64;
    int64_t want = largest < E ? largest : E;
    if (p->nslots == 0 && p->page_outs == 0) {
        p->elems = want;
        p->page_bytes = (size_t)want * sizeof(float) * (size_t)(p->master ? 3 : 2);
    } else if (want > p->elems) {
        return ql_fail(QLORA_ERR_INTERNAL, "optimizer pager: a parameter was added after the pool was built");
    }
    return QLORA_OK;
}

int64_t ql_pager_count(const ql_pager *p) { return p ? p->npages : 0; }

void ql_pager_simulate_device_capacity(ql_pager *p, uint64_t slots) {
    if (p)
        p->sim_capacity = slots;
}

/* ---- copies: memcpy on a CPU context, the copy stream on CUDA */

static qlora_status copy_bytes(ql_pager *p, void *dst, const void *src, size_t n) {
#ifdef QLORA_HAVE_CUDA
    if (p->cuda)
        return ql_cuda_memcpy_async(p->cuda, p->copy, dst, src, n);
#else
    (void)p;
#endif
    memcpy(dst, src, n);
    return QLORA_OK;
}

/* Copies into or out of a slot must not overtake the last kernel that used it. */
static qlora_status wait_slot_idle(ql_pager *p, ql_slot *s) {
#ifdef QLORA_HAVE_CUDA
    if (p->cuda)
        return ql_cuda_stream_wait_event(p->cuda, p->copy, s->used);
#else
    (void)p;
    (void)s;
#endif
    return QLORA_OK;
}

#ifdef QLORA_HAVE_CUDA
static qlora_status collect_timers(ql_pager *p) {
    if (!p->cuda || p->timers_used == 0)
        return QLORA_OK;
    QL_CHECK(ql_cuda_stream_synchronize(p->cuda, p->copy));
    p->staging_busy = 0;
    for (int i = 0; i < p->timers_used; i++) {
        float ms = 0;
        QL_CHECK(ql_cuda_event_elapsed_ms(p->cuda, p->timers[2 * i], p->timers[2 * i + 1], &ms));
        p->seconds += 1e-3 * ms;
    }
    p->timers_used = 0;
    return QLORA_OK;
}
#endif

/* Brackets one page copy for the `seconds` statistic. */
static qlora_status timer_begin(ql_pager *p, double *t0) {
    *t0 = now_seconds();
#ifdef QLORA_HAVE_CUDA
    if (p->cuda) {
        if (p->timers_used == QL_TIMER_PAIRS)
            QL_CHECK(collect_timers(p));
        ql_cuda_event **pair = &p->timers[2 * p->timers_used];
        for (int i = 0; i < 2; i++)
            if (!pair[i])
                QL_CHECK(ql_cuda_event_create(p->cuda, 1, &pair[i]));
        QL_CHECK(ql_cuda_event_record(p->cuda, pair[0], p->copy));
    }
#else
    (void)p;
#endif
    return QLORA_OK;
}

static qlora_status timer_end(ql_pager *p, double t0) {
#ifdef QLORA_HAVE_CUDA
    if (p->cuda) {
        QL_CHECK(ql_cuda_event_record(p->cuda, p->timers[2 * p->timers_used + 1], p->copy));
        p->timers_used++;
        return QLORA_OK;
    }
#endif
    p->seconds += now_seconds() - t0;
    return QLORA_OK;
}

/* ---- the pool */

/* Adds a slot; *slot = -1 when the pool is at its limit, or when the device is out of memory and
 * the pool already holds pages (then the limit becomes the current size). */
static qlora_status grow_pool(ql_pager *p, int64_t *slot) {
    *slot = -1;
    if (p->max_slots && (uint64_t)p->nslots >= p->max_slots)
        return QLORA_OK;
    if (p->nslots == p->slots_cap) {
        int64_t cap = p->slots_cap ? 2 * p->slots_cap : 16;
        ql_slot *slots = realloc(p->slots, (size_t)cap * sizeof *slots);
        if (!slots)
            return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "optimizer pager: out of host memory for %lld slots",
                           (long long)cap);
        p->slots = slots;
        p->slots_cap = cap;
    }
    ql_slot s;
    memset(&s, 0, sizeof s);
    s.page = -1;
    size_t e = (size_t)p->elems * sizeof(float);
    qlora_status st;
    if (p->sim_capacity && (uint64_t)p->nslots >= p->sim_capacity)
        st = ql_fail(QLORA_ERR_OUT_OF_MEMORY, "optimizer pager: simulated device memory full at %lld pages",
                     (long long)p->nslots);
    else
        st = qlora_alloc(p->ctx, 2 * e, 1, QLORA_MEM_OPTIMIZER_DEVICE, (void **)&s.mv);
    if (st == QLORA_OK && p->master)
        st = qlora_alloc(p->ctx, e, 1, QLORA_MEM_MASTER_WEIGHTS, (void **)&s.master);
#ifdef QLORA_HAVE_CUDA
    if (st == QLORA_OK && p->cuda)
        st = ql_cuda_event_create(p->cuda, 0, &s.used);
    if (st == QLORA_OK && p->cuda)
        st = ql_cuda_event_create(p->cuda, 0, &s.filled);
#endif
    if (st != QLORA_OK) {
        qlora_free(p->ctx, s.mv);
        qlora_free(p->ctx, s.master);
#ifdef QLORA_HAVE_CUDA
        ql_cuda_event_destroy(p->cuda, s.used);
        ql_cuda_event_destroy(p->cuda, s.filled);
#endif
        if (st == QLORA_ERR_OUT_OF_MEMORY && p->nslots > 0) {
            ql_log(QLORA_LOG_WARN, "optimizer pager: %s; the device pool stays at %lld pages and pages are "
                   "evicted to host memory from now on", qlora_last_error(), (long long)p->nslots);
            qlora_clear_error();
            p->max_slots = (uint64_t)p->nslots;
            return QLORA_OK;
        }
        ql_error_prefix("optimizer pager: allocating the first page of the device pool");
        return st;
    }
    p->slots[p->nslots] = s;
    *slot = p->nslots++;
    return QLORA_OK;
}

static int64_t free_slot(const ql_pager *p) {
    for (int64_t s = 0; s < p->nslots; s++)
        if (p->slots[s].page < 0)
            return s;
    return -1;
}

/* The resident page, other than `protect`, whose next use in the cyclic order is farthest from
 * page k: the one that follows k by the most positions. -1 if none. */
static int64_t choose_victim(const ql_pager *p, int64_t k, int64_t protect) {
    int64_t best = -1, best_distance = -1;
    for (int64_t s = 0; s < p->nslots; s++) {
        int64_t j = p->slots[s].page;
        if (j < 0 || j == protect)
            continue;
        int64_t distance = (j - k + p->npages) % p->npages;
        if (distance > best_distance) {
            best_distance = distance;
            best = j;
        }
    }
    return best;
}

static qlora_status evict(ql_pager *p, int64_t j) {
    ql_page *pg = &p->pages[j];
    ql_slot *s = &p->slots[pg->slot];
    if (!pg->host) {
        qlora_status st = qlora_alloc(p->ctx, p->page_bytes, 0, QLORA_MEM_OPTIMIZER_HOST, (void **)&pg->host);
        if (st != QLORA_OK) {
            ql_error_prefix("optimizer pager: evicting page %lld to host memory", (long long)j);
            return st;
        }
    }
    size_t e = (size_t)p->elems * sizeof(float);
    double t0;
    QL_CHECK(wait_slot_idle(p, s));
    QL_CHECK(timer_begin(p, &t0));
    QL_CHECK(copy_bytes(p, pg->host, s->mv, 2 * e));
    if (p->master)
        QL_CHECK(copy_bytes(p, pg->host + 2 * p->elems, s->master, e));
    QL_CHECK(timer_end(p, t0));
    s->page = -1;
    pg->slot = -1;
    p->nresident--;
    p->page_outs++;
    p->bytes_out += p->page_bytes;
    return QLORA_OK;
}

/* dst[0..count) = the page's BF16 parameter values widened to float32 (host memory). */
static qlora_status widen_param(ql_pager *p, const ql_page *pg, float *dst) {
    const uint16_t *src = pg->param;
#ifdef QLORA_HAVE_CUDA
    if (p->cuda) {
        if (!p->staging)
            QL_CHECK(qlora_alloc(p->ctx, (size_t)p->elems * (sizeof(float) + sizeof(uint16_t)), 0,
                                 QLORA_MEM_WORKSPACE, (void **)&p->staging));
        uint16_t *bf16 = (uint16_t *)(p->staging + p->elems);
        QL_CHECK(ql_cuda_memcpy(p->cuda, bf16, src, (size_t)pg->count * sizeof(uint16_t)));
        src = bf16;
    }
#else
    (void)p;
#endif
    for (int64_t i = 0; i < pg->count; i++)
        dst[i] = ql_bf16_to_f32(src[i]);
    return QLORA_OK;
}

/* A page's first contents: m = v = 0, master = the parameter (the unused tail zero). */
static qlora_status fill_fresh(ql_pager *p, const ql_page *pg, ql_slot *s) {
    size_t e = (size_t)p->elems * sizeof(float);
#ifdef QLORA_HAVE_CUDA
    if (p->cuda) {
        QL_CHECK(ql_cuda_memset_async(p->cuda, p->copy, s->mv, 0, 2 * e));
        if (!p->master)
            return QLORA_OK;
        if (p->staging_busy)
            QL_CHECK(ql_cuda_stream_synchronize(p->cuda, p->copy));
        p->staging_busy = 0;
        QL_CHECK(widen_param(p, pg, p->staging));
        memset(p->staging + pg->count, 0, (size_t)(p->elems - pg->count) * sizeof(float));
        QL_CHECK(ql_cuda_memcpy_async(p->cuda, p->copy, s->master, p->staging, e));
        p->staging_busy = 1;
        return QLORA_OK;
    }
#endif
    memset(s->mv, 0, 2 * e);
    if (p->master) {
        QL_CHECK(widen_param(p, pg, s->master));
        memset(s->master + pg->count, 0, (size_t)(p->elems - pg->count) * sizeof(float));
    }
    return QLORA_OK;
}

static qlora_status fill_slot(ql_pager *p, int64_t k, int64_t slot) {
    ql_page *pg = &p->pages[k];
    ql_slot *s = &p->slots[slot];
    QL_CHECK(wait_slot_idle(p, s));
    if (pg->host) {
        size_t e = (size_t)p->elems * sizeof(float);
        double t0;
        QL_CHECK(timer_begin(p, &t0));
        QL_CHECK(copy_bytes(p, s->mv, pg->host, 2 * e));
        if (p->master)
            QL_CHECK(copy_bytes(p, s->master, pg->host + 2 * p->elems, e));
        QL_CHECK(timer_end(p, t0));
        p->page_ins++;
        p->bytes_in += p->page_bytes;
    } else {
        QL_CHECK(fill_fresh(p, pg, s));
    }
#ifdef QLORA_HAVE_CUDA
    if (p->cuda) {
        QL_CHECK(ql_cuda_event_record(p->cuda, s->filled, p->copy));
        s->fill_pending = 1;
    }
#endif
    s->page = k;
    pg->slot = slot;
    p->nresident++;
    return QLORA_OK;
}

qlora_status ql_pager_fetch(ql_pager *p, int64_t k, int64_t protect, int optional, int *resident) {
    QL_REQUIRE_ARG(p != NULL, "pager");
    QL_REQUIRE_ARG(k >= 0 && k < p->npages, "page");
    *resident = 0;
    if (p->pages[k].slot >= 0) {
        *resident = 1;
        return QLORA_OK;
    }
    int64_t slot = free_slot(p);
    if (slot < 0)
        QL_CHECK(grow_pool(p, &slot));
    if (slot < 0) {
        int64_t victim = choose_victim(p, k, protect);
        if (victim < 0) {
            if (optional)
                return QLORA_OK;
            return ql_fail(QLORA_ERR_INTERNAL, "optimizer pager: no page can be evicted for page %lld",
                           (long long)k);
        }
        slot = p->pages[victim].slot;
        QL_CHECK(evict(p, victim));
    }
    QL_CHECK(fill_slot(p, k, slot));
    *resident = 1;
    return QLORA_OK;
}

static qlora_status resident_slot(ql_pager *p, int64_t k, ql_slot **out) {
    QL_REQUIRE_ARG(p != NULL, "pager");
    QL_REQUIRE_ARG(k >= 0 && k < p->npages, "page");
    if (p->pages[k].slot < 0)
        return ql_fail(QLORA_ERR_INTERNAL, "optimizer pager: page %lld is not resident", (long long)k);
    *out = &p->slots[p->pages[k].slot];
    return QLORA_OK;
}

qlora_status ql_pager_begin_compute(ql_pager *p, int64_t k, ql_page_view *out) {
    ql_slot *s = NULL;
    QL_CHECK(resident_slot(p, k, &s));
#ifdef QLORA_HAVE_CUDA
    if (p->cuda && s->fill_pending) {
        QL_CHECK(ql_cuda_stream_wait_event(p->cuda, NULL, s->filled));
        s->fill_pending = 0;
    }
#endif
    out->m = s->mv;
    out->v = s->mv + p->elems;
    out->master = s->master;
    out->count = p->pages[k].count;
    return QLORA_OK;
}

qlora_status ql_pager_end_compute(ql_pager *p, int64_t k) {
    ql_slot *s = NULL;
    QL_CHECK(resident_slot(p, k, &s));
#ifdef QLORA_HAVE_CUDA
    if (p->cuda)
        return ql_cuda_event_record(p->cuda, s->used, NULL);
#endif
    return QLORA_OK;
}

qlora_status ql_pager_quiesce(ql_pager *p) {
    QL_REQUIRE_ARG(p != NULL, "pager");
#ifdef QLORA_HAVE_CUDA
    if (p->cuda) {
        QL_CHECK(ql_cuda_synchronize(p->cuda));
        QL_CHECK(ql_cuda_stream_synchronize(p->cuda, p->copy));
        p->staging_busy = 0;
        QL_CHECK(collect_timers(p));
    }
#endif
    return QLORA_OK;
}

/* Host <-> pool copy of `bytes`, done before returning (the context stream on CUDA, ordered
 * after the copy that filled the slot by ql_pager_begin_compute). */
static qlora_status copy_now(ql_pager *p, void *dst, const void *src, size_t bytes) {
#ifdef QLORA_HAVE_CUDA
    if (p->cuda)
        return ql_cuda_memcpy(p->cuda, dst, src, bytes);
#else
    (void)p;
#endif
    memcpy(dst, src, bytes);
    return QLORA_OK;
}

qlora_status ql_pager_read(ql_pager *p, int64_t k, float *m, float *v, float *master) {
    QL_REQUIRE_ARG(p != NULL, "pager");
    QL_REQUIRE_ARG(k >= 0 && k < p->npages, "page");
    QL_REQUIRE_ARG(m != NULL && v != NULL, "m, v");
    QL_REQUIRE_ARG(master != NULL || !p->master, "master");
    ql_page *pg = &p->pages[k];
    size_t n = (size_t)pg->count * sizeof(float);
    if (pg->slot >= 0) {
        ql_page_view view;
        QL_CHECK(ql_pager_begin_compute(p, k, &view));
        QL_CHECK(copy_now(p, m, view.m, n));
        QL_CHECK(copy_now(p, v, view.v, n));
        if (p->master)
            QL_CHECK(copy_now(p, master, view.master, n));
        return QLORA_OK;
    }
    if (pg->host) {
#ifdef QLORA_HAVE_CUDA
        if (p->cuda)
            QL_CHECK(ql_cuda_stream_synchronize(p->cuda, p->copy)); /* a pending eviction writes it */
#endif
        memcpy(m, pg->host, n);
        memcpy(v, pg->host + p->elems, n);
        if (p->master)
            memcpy(master, pg->host + 2 * p->elems, n);
        return QLORA_OK;
    }
    memset(m, 0, n);
    memset(v, 0, n);
    if (p->master)
        QL_CHECK(widen_param(p, pg, master));
    return QLORA_OK;
}

qlora_status ql_pager_write(ql_pager *p, int64_t k, const void *m, const void *v, const void *master) {
    QL_REQUIRE_ARG(p != NULL, "pager");
    QL_REQUIRE_ARG(m != NULL && v != NULL, "m, v");
    QL_REQUIRE_ARG(master != NULL || !p->master, "master");
    int resident;
    QL_CHECK(ql_pager_fetch(p, k, -1, 0, &resident));
    ql_page_view view;
    QL_CHECK(ql_pager_begin_compute(p, k, &view));
    size_t n = (size_t)view.count * sizeof(float);
    QL_CHECK(copy_now(p, view.m, m, n));
    QL_CHECK(copy_now(p, view.v, v, n));
    if (p->master)
        QL_CHECK(copy_now(p, view.master, master, n));
    return ql_pager_end_compute(p, k);
}

void ql_pager_stats(const ql_pager *p, qlora_paging_stats *out) {
    memset(out, 0, sizeof *out);
    if (!p)
        return;
    out->pages_total = (uint64_t)p->npages;
    out->pages_on_device = (uint64_t)p->nresident;
    out->pool_pages = (uint64_t)p->nslots;
    out->pool_limit = p->max_slots;
    out->elements_per_page = (uint64_t)p->elems;
    out->page_outs = p->page_outs;
    out->page_ins = p->page_ins;
    out->bytes_out = p->bytes_out;
    out->bytes_in = p->bytes_in;
    out->seconds = p->seconds;
}
