/*
 * The page table of the optimizer state (paged AdamW). Pages are numbered 0..P-1 in the order
 * the optimizer visits them every step; page k covers `count` elements of one parameter and
 * holds, in its pool slot, m and v ([m: E floats | v: E floats], one allocation counted as
 * optimizer_device) and optionally the FP32 master copy (E floats, counted as master_weights),
 * E = elements per page. A page is in one of three states:
 *   fresh     never filled: m = v = 0, master = the BF16 parameter widened (made on first use)
 *   resident  in a pool slot (device memory; host memory standing in for it on a CPU context)
 *   evicted   only in its host copy [m | v | master] (pinned, optimizer_host; kept once made)
 * The pool holds at most max_slots pages. Bringing a page in when the pool is full evicts the
 * resident page whose next use in the cyclic order 0..P-1 is farthest from the requested one,
 * never `protect` (the page being updated). The choice depends only on the request sequence, so
 * page counts are identical on every backend.
 *
 * On CUDA the copies run on the pager's own copy stream: a copy into or out of a slot waits for
 * the last kernel that used the slot (an event recorded by ql_pager_end_compute), and a kernel on
 * the context stream waits for the copy that filled its slot (ql_pager_begin_compute), so page
 * transfers overlap the updates of other pages.
 */
#ifndef QLORA_PAGER_H
#define QLORA_PAGER_H

#include "qlora.h"

typedef struct ql_pager ql_pager;

/* Device-side view of a resident page (pool memory). */
typedef struct ql_page_view {
    float *m, *v, *master;  /* master NULL without master copies */
    int64_t count;          /* elements in use */
} ql_page_view;

/* max_slots 0 = no limit. */
qlora_status ql_pager_create(qlora_ctx *ctx, int64_t elems_per_page, int master, uint64_t max_slots,
                             ql_pager **out);
/* Waits for every queued copy and kernel, then releases all memory. NULL is a no-op. */
void ql_pager_destroy(ql_pager *p);
/* Appends the pages of a parameter of n > 0 BF16 elements at `param` (on the context's device,
 * read only to initialise master copies); *first_page = the index of its first page. */
qlora_status ql_pager_add(ql_pager *p, const uint16_t *param, int64_t n, int64_t *first_page);
int64_t ql_pager_count(const ql_pager *p);

/* Makes page k resident, evicting as described above. With optional = 1 (prefetch) it gives up,
 * setting *resident = 0, when that would need evicting `protect` (-1: none). */
qlora_status ql_pager_fetch(ql_pager *p, int64_t k, int64_t protect, int optional, int *resident);
/* Brackets work queued on the context stream that reads or writes resident page k. */
qlora_status ql_pager_begin_compute(ql_pager *p, int64_t k, ql_page_view *out);
qlora_status ql_pager_end_compute(ql_pager *p, int64_t k);
/* Waits for the context stream and the copy stream (no-op on CPU) and collects copy timings. */
qlora_status ql_pager_quiesce(ql_pager *p);

/* Copies the `count` elements of page k's states into host arrays (master may be NULL without
 * master copies), wherever the page is; it does not move the page. */
qlora_status ql_pager_read(ql_pager *p, int64_t k, float *m, float *v, float *master);
/* Makes page k resident and overwrites its states with `count` float32 values from host memory
 * (any alignment). */
qlora_status ql_pager_write(ql_pager *p, int64_t k, const void *m, const void *v, const void *master);

void ql_pager_stats(const ql_pager *p, qlora_paging_stats *out);
/* Tests: the device pool behaves as if device memory ran out once it holds `slots` pages
 * (0 = never), to exercise the cap-and-evict path on any backend. */
void ql_pager_simulate_device_capacity(ql_pager *p, uint64_t slots);

#endif
