/* Learning-rate schedules (formulas in include/qlora.h, after transformers' LambdaLR ones). */
#include "internal.h"
#include "optimizer_internal.h"

#include <math.h>

qlora_status ql_lr_schedule_validate(const qlora_lr_schedule *s, const char *who) {
    if (s->kind != QLORA_LR_CONSTANT && s->kind != QLORA_LR_LINEAR && s->kind != QLORA_LR_COSINE)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: unknown schedule kind %d", who, (int)s->kind);
    if (!isfinite(s->lr) || s->lr < 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: schedule lr %g must be finite and >= 0", who, s->lr);
    if (s->warmup_steps < 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: schedule warmup_steps %lld < 0", who,
                       (long long)s->warmup_steps);
    if (s->kind != QLORA_LR_CONSTANT && s->total_steps <= 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: schedule total_steps %lld must be > 0 for a decaying schedule",
                       who, (long long)s->total_steps);
    if (!(s->min_lr_ratio >= 0 && s->min_lr_ratio <= 1))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: schedule min_lr_ratio %g is outside [0, 1]", who,
                       s->min_lr_ratio);
    return QLORA_OK;
}

double ql_lr_at_valid(const qlora_lr_schedule *s, int64_t step) {
    double w = (double)s->warmup_steps, t = (double)s->total_steps, x = (double)step;
    if (step < s->warmup_steps)
        return s->lr * x / w;
    double span = t - w > 1 ? t - w : 1;
    double decay;
    switch (s->kind) {
    case QLORA_LR_LINEAR:
        decay = (t - x) / span;
        if (decay < 0)
            decay = 0;
        break;
    case QLORA_LR_COSINE: {
        double progress = (x - w) / span;
        if (progress > 1)
            progress = 1;
        decay = 0.5 * (1.0 + cos(M_PI * progress));
        break;
    }
    default:
        return s->lr;
    }
    return s->lr * (s->min_lr_ratio + (1.0 - s->min_lr_ratio) * decay);
}

qlora_status qlora_lr_at(const qlora_lr_schedule *schedule, int64_t step, double *lr) {
    QL_REQUIRE_ARG(schedule != NULL, "schedule");
    QL_REQUIRE_ARG(lr != NULL, "lr");
    QL_REQUIRE_ARG(step >= 0, "step");
    QL_CHECK(ql_lr_schedule_validate(schedule, "qlora_lr_at"));
    *lr = ql_lr_at_valid(schedule, step);
    return QLORA_OK;
}
