/*
 * Micro-batches of a dataset, epoch after epoch. An epoch's order is a function of (seed, epoch)
 * alone and a batch is a function of that order and the cursor, so (epoch, cursor) is all a
 * checkpoint needs to resume the same sequence of batches.
 *
 * Batch layout (what qlora_model_forward_backward takes): the examples back to back, no
 * padding; seq_start[t] is the offset of t's example, positions[t] = t - seq_start[t], and
 * labels[t] = ids[t+1] when t+1 is in the same example and a target, else -100, so no label
 * crosses from one example into the next.
 *
 * The walk advances eagerly: the call that hands out an epoch's last batch moves to (epoch + 1,
 * 0), so `epoch` always counts the epochs fully handed out and "while (b.epoch < E) next" runs
 * exactly E epochs.
 */
#include "ft_error.h"
#include "ft_data.h"
#include "ft_rng.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Without packing, each run of this many micro-batches (their examples) is sorted by length. */
#define FT_GROUP_WINDOW 64

typedef struct by_length {
    int64_t n, pos, index;
} by_length;

static int compare_length(const void *a, const void *b) {
    const by_length *x = a, *y = b;
    if (x->n != y->n)
        return x->n < y->n ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos; /* stable: keep the permutation's order */
}

/* This epoch's order: the seeded permutation, then (without packing) each window of
 * FT_GROUP_WINDOW micro-batches sorted by length. */
static int make_order(ft_batcher *b, char *err, size_t errcap) {
    int64_t n = b->ds->count;
    for (int64_t i = 0; i < n; i++)
        b->order[i] = i;
    ft_rng rng = ft_rng_stream(b->seed, (uint64_t)b->epoch);
    ft_shuffle(b->order, n, &rng);
    if (b->packing)
        return 0;
    int64_t window = b->micro_batch > n / FT_GROUP_WINDOW ? n : b->micro_batch * FT_GROUP_WINDOW;
    by_length *tmp = malloc((size_t)window * sizeof *tmp);
    if (!tmp)
        return ft_fail(err, errcap, "batcher: out of memory");
    for (int64_t w = 0; w < n; w += window) {
        int64_t m = n - w < window ? n - w : window;
        for (int64_t i = 0; i < m; i++)
            tmp[i] = (by_length){b->ds->ex[b->order[w + i]].n, i, b->order[w + i]};
        qsort(tmp, (size_t)m, sizeof *tmp, compare_length);
        for (int64_t i = 0; i < m; i++)
            b->order[w + i] = tmp[i].index;
    }
    free(tmp);
    return 0;
}

int ft_batcher_init(ft_batcher *b, const ft_dataset *ds, int64_t micro_batch, int64_t max_seq, int packing,
                    uint64_t seed, char *err, size_t errcap) {
    if (!b)
        return ft_fail(err, errcap, "ft_batcher_init: b is NULL");
    memset(b, 0, sizeof *b);
    if (!ds || ds->count < 1)
        return ft_fail(err, errcap, "batcher: the dataset is empty");
    if (micro_batch < 1 || max_seq < 1)
        return ft_fail(err, errcap, "batcher: micro_batch %lld and max_seq %lld must be positive", (long long)micro_batch,
                    (long long)max_seq);
    for (int64_t i = 0; i < ds->count; i++)
        if (ds->ex[i].n < 1 || ds->ex[i].n > max_seq)
            return ft_fail(err, errcap, "batcher: example %lld has %lld tokens (1 to max_seq %lld allowed)", (long long)i,
                        (long long)ds->ex[i].n, (long long)max_seq);
    if (micro_batch > INT32_MAX / max_seq)
        return ft_fail(err, errcap, "batcher: micro_batch %lld x max_seq %lld tokens do not fit 32-bit positions",
                    (long long)micro_batch, (long long)max_seq);
    *b = (ft_batcher){ds, micro_batch, max_seq, packing != 0, seed, 0, 0, malloc((size_t)ds->count * sizeof(int64_t))};
    if (!b->order)
        return ft_fail(err, errcap, "batcher: out of memory");
    if (make_order(b, err, errcap)) {
        ft_batcher_free(b);
        return -1;
    }
    return 0;
}

int ft_batcher_seek(ft_batcher *b, int64_t epoch, int64_t cursor, char *err, size_t errcap) {
    if (!b || !b->order)
        return ft_fail(err, errcap, "ft_batcher_seek: the batcher is not initialised");
    if (epoch < 0 || cursor < 0 || cursor > b->ds->count)
        return ft_fail(err, errcap, "batcher: position epoch %lld, example %lld is outside the data (%lld examples)",
                    (long long)epoch, (long long)cursor, (long long)b->ds->count);
    if (cursor == b->ds->count) { /* the end of an epoch is the start of the next */
        epoch++;
        cursor = 0;
    }
    b->epoch = epoch;
    b->cursor = cursor;
    return make_order(b, err, errcap);
}

static int reserve(ft_batch *out, int64_t T) {
    if (T <= out->cap)
        return 0;
    int64_t cap = out->cap ? out->cap : 256;
    while (cap < T)
        cap *= 2;
    int32_t **arrays[4] = {&out->tokens, &out->labels, &out->seq_start, &out->positions};
    for (int k = 0; k < 4; k++) {
        int32_t *p = realloc(*arrays[k], (size_t)cap * sizeof *p);
        if (!p)
            return -1;
        *arrays[k] = p;
    }
    out->cap = cap;
    return 0;
}

int ft_batcher_next(ft_batcher *b, ft_batch *out, char *err, size_t errcap) {
    if (!b || !b->order || !out)
        return ft_fail(err, errcap, "ft_batcher_next: %s", !out ? "out is NULL" : "the batcher is not initialised");
    const ft_dataset *ds = b->ds;
    int64_t first = b->cursor, last = first, T = 0;
    if (b->packing) {
        for (int64_t row = 0; row < b->micro_batch && last < ds->count; row++)
            for (int64_t used = 0; last < ds->count && used + ds->ex[b->order[last]].n <= b->max_seq; last++) {
                used += ds->ex[b->order[last]].n;
                T += ds->ex[b->order[last]].n;
            }
    } else {
        for (; last < ds->count && last - first < b->micro_batch; last++)
            T += ds->ex[b->order[last]].n;
    }
    if (reserve(out, T))
        return ft_fail(err, errcap, "batcher: out of memory for a batch of %lld tokens", (long long)T);
    out->T = T;
    out->examples = last - first;
    out->targets = 0;
    int64_t t = 0;
    for (int64_t k = first; k < last; k++) {
        const ft_example *e = &ds->ex[b->order[k]];
        for (int64_t i = 0; i < e->n; i++, t++) {
            out->tokens[t] = e->ids[i];
            out->seq_start[t] = (int32_t)(t - i);
            out->positions[t] = (int32_t)i;
            int target = i + 1 < e->n && e->target[i + 1];
            out->labels[t] = target ? e->ids[i + 1] : -100;
            out->targets += target;
        }
    }
    b->cursor = last;
    if (b->cursor == ds->count) {
        b->epoch++;
        b->cursor = 0;
        return make_order(b, err, errcap);
    }
    return 0;
}

void ft_batch_free(ft_batch *b) {
    if (!b)
        return;
    free(b->tokens);
    free(b->labels);
    free(b->seq_start);
    free(b->positions);
    memset(b, 0, sizeof *b);
}

void ft_batcher_free(ft_batcher *b) {
    if (!b)
        return;
    free(b->order);
    memset(b, 0, sizeof *b);
}
