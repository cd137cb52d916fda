/*
 * qlora-ft train: the finetuning loop (ft_train.c), its options (ft_options.c) and its reports
 * (ft_report.c: progress, metrics, loss curve, memory report).
 */
#ifndef QLORA_FT_TRAIN_H
#define QLORA_FT_TRAIN_H

#include <qlora.h>

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct ft_train_opts {
    const char *model_dir;      /* NULL: the embedded default (written to <out>/base-model) */
    const char *data_path;      /* NULL: the embedded default data */
    const char *out_dir;        /* "qlora-out" */
    const char *metrics_path;   /* NULL: none */
    const char *format;         /* "auto" */
    const char *device;         /* "auto" (CUDA when a GPU is present), "cpu", "cuda" */
    int rank;                   /* 64 */
    float alpha;                /* 16 */
    float dropout;              /* 0.05 */
    int use_rslora;             /* 0 */
    uint32_t targets;           /* QLORA_TARGET_ALL_LINEAR */
    double lr;                  /* 2e-4 */
    qlora_lr_kind schedule;     /* constant */
    double warmup_ratio;        /* 0.03 */
    double max_grad_norm;       /* 0.3 */
    double weight_decay;        /* 0 */
    int64_t batch;              /* 16 sequences per update */
    int64_t micro_batch;        /* 1 sequence per forward/backward */
    int64_t seq;                /* 512 */
    int64_t steps;              /* 0: from epochs */
    int64_t epochs;             /* 1 when steps is 0 */
    double eval_split;          /* 0.02 */
    int64_t eval_every;         /* 0: at the end only */
    int64_t save_every;         /* 0: at the end only */
    uint64_t seed;              /* 42 */
    double gpu_mem_limit_gb;    /* 0: no limit on the optimizer's device pool */
    int packing, resume, train_on_prompt, skip_bad_lines;
    int grad_checkpointing;     /* 1 */
    int threads;                /* CPU threads, 0: all */
} ft_train_opts;

void ft_train_defaults(ft_train_opts *o);
/* The settings of the no-argument run (small enough for a few minutes on 2 CPU cores). */
void ft_train_embedded_defaults(ft_train_opts *o);
/* Parses argv (after "train"); returns 0, or 2 after printing a usage error, or 1 with *help
 * set when --help was asked (usage printed). */
int ft_train_parse(int argc, char **argv, ft_train_opts *o, int *help);
void ft_train_usage(FILE *f);
/* Runs the training; returns the process exit code (0 done, 1 failure, 130 interrupted after
 * saving a checkpoint). */
int ft_train_run(const ft_train_opts *o);

#endif
