/*
 * The AdamW optimizer object, shared by lib/optimizer.c (create, step) and lib/optimizer_io.c
 * (save, load). State lives in the pager (lib/pager.h): parameter i owns pages
 * [first_page, first_page + npages), page j of it covering elements [j*E, j*E + count).
 */
#ifndef QLORA_OPTIMIZER_INTERNAL_H
#define QLORA_OPTIMIZER_INTERNAL_H

#include "pager.h"
#include "qlora.h"

typedef struct ql_opt_param {
    qlora_tensor param;     /* BF16, caller's memory */
    qlora_tensor grad;      /* BF16 or F32, caller's memory */
    int64_t numel;
    int64_t first_page, npages;
} ql_opt_param;

struct qlora_optimizer {
    qlora_ctx *ctx;
    qlora_adamw_params params;
    int64_t elems_per_page;
    ql_pager *pager;
    ql_opt_param *p;
    size_t n, cap;
    int64_t step;           /* updates taken (t of the last update) */
    int64_t skipped;        /* steps skipped on a non-finite gradient */
    int broken;             /* a step failed midway: the state is inconsistent */
};

/* Checks hyperparameters (and the schedule); `who` starts the message. */
qlora_status ql_adamw_params_validate(const qlora_adamw_params *p, const char *who);
qlora_status ql_lr_schedule_validate(const qlora_lr_schedule *s, const char *who);
/* The schedule's lr for update `step`, for a schedule that passed validation. */
double ql_lr_at_valid(const qlora_lr_schedule *s, int64_t step);
/* 2, or 3 with master copies. */
int ql_adamw_states(const qlora_adamw_params *p);
/* Tests: the pager behind an optimizer. */
ql_pager *ql_optimizer_pager(qlora_optimizer *opt);

#endif
