/*
 * What qlora-ft train shows and writes about a run: the progress line (a bar redrawn in place
 * on a terminal, plain log lines otherwise), the metrics file (one JSON object per step), the
 * loss curve (SVG) and the memory report (measured peaks by category against the analytic
 * estimate, and the saving against 16-bit full finetuning).
 */
#ifndef QLORA_FT_REPORT_H
#define QLORA_FT_REPORT_H

#include <qlora.h>

#include <stdint.h>
#include <stdio.h>

typedef struct ft_step_info {
    int64_t step, total;       /* step is 1-based */
    double loss, lr, grad_norm, tokens_per_s, eta_s;
    uint64_t mem_bytes;        /* accountant's current total (host + device) */
    int has_eval;
    double eval_loss;
    int skipped;               /* the optimizer skipped the update (non-finite gradient) */
} ft_step_info;

/* Progress on stderr: on a tty the line is redrawn every step, else printed every `every`
 * steps, on the last one, and whenever there is an evaluation. */
void ft_progress(const ft_step_info *s, int64_t every);
/* Appends one JSON line; returns nonzero on a write error. */
int ft_metrics_write(FILE *f, const ft_step_info *s);
/* Keeps only the lines with "step" <= last_step (resuming), rewriting the file atomically. */
int ft_metrics_truncate(const char *path, int64_t last_step, char *err, size_t cap);

/* A loss curve: training loss per step and the evaluation points, written atomically. */
typedef struct ft_history {
    int64_t n, cap;
    int64_t *step;
    double *loss, *eval;       /* eval NaN where there was none */
} ft_history;

int ft_history_add(ft_history *h, int64_t step, double loss, double eval);
void ft_history_free(ft_history *h);
int ft_loss_svg_write(const ft_history *h, const char *path, char *err, size_t cap);

/* Prints the accountant's measured peaks next to qlora_mem_estimate for cfg/settings. */
void ft_memory_report(FILE *f, const qlora_ctx *ctx, const qlora_model_config *cfg,
                      const qlora_train_settings *settings);

#endif
