/*
 * The eval split: a seeded choice of examples moved out of the training set. Both sets keep the
 * examples' original order, so the split depends only on (count, fraction, seed).
 */
#include "ft_data.h"
#include "ft_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void recount(ft_dataset *ds) {
    ds->tokens = ds->target_tokens = 0;
    for (int64_t i = 0; i < ds->count; i++) {
        ds->tokens += ds->ex[i].n;
        for (int64_t t = 0; t < ds->ex[i].n; t++)
            ds->target_tokens += ds->ex[i].target[t];
    }
}

/* eval gets format and token counts; truncated and skipped stay with ds (they describe the load). */
int ft_dataset_split(ft_dataset *ds, double fraction, uint64_t seed, ft_dataset *eval, char *err, size_t errcap) {
    if (!ds || !eval) {
        snprintf(err, errcap, "ft_dataset_split: %s is NULL", ds ? "eval" : "ds");
        return -1;
    }
    memset(eval, 0, sizeof *eval);
    eval->format = ds->format;
    if (!(fraction >= 0.0 && fraction < 1.0)) {
        snprintf(err, errcap, "eval fraction %g is not in [0, 1)", fraction);
        return -1;
    }
    int64_t n = ds->count, n_eval = (int64_t)floor(fraction * (double)n + 0.5);
    if (fraction > 0.0 && n >= 2)
        n_eval = n_eval < 1 ? 1 : n_eval > n - 1 ? n - 1 : n_eval;
    else
        n_eval = 0;
    if (n_eval == 0)
        return 0;

    int64_t *perm = malloc((size_t)n * sizeof *perm);
    uint8_t *chosen = calloc((size_t)n, 1);
    eval->ex = malloc((size_t)n_eval * sizeof *eval->ex);
    if (!perm || !chosen || !eval->ex) {
        free(perm);
        free(chosen);
        free(eval->ex);
        eval->ex = NULL;
        snprintf(err, errcap, "eval split: out of memory");
        return -1;
    }
    for (int64_t i = 0; i < n; i++)
        perm[i] = i;
    ft_rng rng = ft_rng_stream(seed, FT_STREAM_SPLIT);
    ft_shuffle(perm, n, &rng);
    for (int64_t i = 0; i < n_eval; i++)
        chosen[perm[i]] = 1;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        if (chosen[i])
            eval->ex[eval->count++] = ds->ex[i];
        else
            ds->ex[kept++] = ds->ex[i];
    }
    ds->count = kept;
    free(perm);
    free(chosen);
    recount(ds);
    recount(eval);
    return 0;
}
