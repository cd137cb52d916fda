/*
 * AdamW math on raw buffers: the per-element update of bitsandbytes' 32-bit optimizer
 * (spec nf4-bitsandbytes.md §6.3), the gradient sum of squares for global-norm clipping, and
 * the learning-rate schedules. Two host flavours that give IDENTICAL results (*_ref scalar,
 * *_fast OpenMP) and a CUDA kernel (cuda/adamw.cu) that matches them bit for bit.
 *
 * Update, per element, all float32, in this order (no FMA contraction):
 *   g  = grad * grad_scale                       (grad_scale folds 1/accumulation and clipping)
 *   m  = beta1 * m + (1 - beta1) * g
 *   v  = beta2 * v + (1 - beta2) * (g * g)
 *   p  = p - (lr * c2 / c1) * (m / (sqrt(v) + eps * c2))   c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t)
 *   p  = p * (1 - lr * weight_decay)             decoupled decay AFTER the Adam step, as bnb does
 * where p is the FP32 master weight when there is one (then the BF16 parameter = round(p)),
 * else the BF16 parameter widened to float32 and rounded back (RNE). c1, c2 and the scalar
 * factors are computed once per step on the host in double and passed as float32 (the grouping
 * in parentheses is bitsandbytes' kOptimizer32bit2State; each product and sum rounds once).
 */
#ifndef QLORA_ADAMW_H
#define QLORA_ADAMW_H

#include "qlora.h"

/* Per-step scalars, computed once on the host by ql_adamw_scalars. */
typedef struct ql_adamw_step {
    float grad_scale;      /* multiplies every gradient element */
    float beta1, one_minus_beta1;
    float beta2, one_minus_beta2;
    float step_size;       /* lr * c2 / c1 */
    float eps_c2;          /* eps * c2 */
    float decay;           /* 1 - lr * weight_decay */
} ql_adamw_step;

/* t >= 1 is the step number after incrementing. */
ql_adamw_step ql_adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                               int64_t t, double grad_scale);

/* param: BF16 [n]; master: F32 [n] or NULL; grad: F32 or BF16 [n]; m, v: F32 [n]. */
void ql_adamw_update_ref(const ql_adamw_step *s, uint16_t *param, float *master, const void *grad,
                         qlora_dtype grad_dtype, float *m, float *v, int64_t n);
void ql_adamw_update_fast(const ql_adamw_step *s, uint16_t *param, float *master, const void *grad,
                          qlora_dtype grad_dtype, float *m, float *v, int64_t n, int num_threads);

/* Sum of squares of a gradient in double, in a canonical order so both host implementations
 * give the same bits: sequential within chunks of QL_SUMSQ_CHUNK elements, chunk sums added in
 * order. (The CUDA reduction uses its own fixed tree: deterministic run to run, equal to the
 * host within double rounding.) *nonfinite is set to 1 if any element is NaN/Inf. */
#define QL_SUMSQ_CHUNK 65536
double ql_grad_sumsq_ref(const void *grad, qlora_dtype grad_dtype, int64_t n, int *nonfinite);
double ql_grad_sumsq_fast(const void *grad, qlora_dtype grad_dtype, int64_t n, int *nonfinite, int num_threads);

#endif
