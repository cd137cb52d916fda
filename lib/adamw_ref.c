/*
 * Scalar reference of the AdamW math (lib/adamw.h), one element at a time in the documented
 * order. The fast host path and the CUDA kernel are tested against these functions bit for bit.
 */
#include "adamw.h"
#include "half.h"

#include <math.h>

ql_adamw_step ql_adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                               int64_t t, double grad_scale) {
    /* m and v decay by the float32 betas, so the bias corrections are taken from those same
     * values: then the corrections cancel the start-up bias exactly (at t = 1, v / c2^2 = g^2)
     * instead of leaving an error of |beta2 - (float)beta2| / (1 - beta2) (1e-5 for 0.999). */
    double b1 = (float)beta1, b2 = (float)beta2;
    /* 1 - b^t as -expm1(t log b): no cancellation when b^t is close to 1. */
    double c1 = -expm1((double)t * log(b1));
    double c2 = sqrt(-expm1((double)t * log(b2)));
    ql_adamw_step s;
    s.grad_scale = (float)grad_scale;
    s.beta1 = (float)b1;
    s.one_minus_beta1 = (float)(1.0 - b1); /* exact for b in [0.5, 1]: the two weights sum to 1 */
    s.beta2 = (float)b2;
    s.one_minus_beta2 = (float)(1.0 - b2);
    s.step_size = (float)(lr * c2 / c1);
    s.eps_c2 = (float)(eps * c2);
    s.decay = (float)(1.0 - lr * weight_decay);
    return s;
}

static float load_grad(const void *grad, qlora_dtype grad_dtype, int64_t i) {
    if (grad_dtype == QLORA_F32)
        return ((const float *)grad)[i];
    return ql_bf16_to_f32(((const uint16_t *)grad)[i]);
}

void ql_adamw_update_ref(const ql_adamw_step *s, uint16_t *param, float *master, const void *grad,
                         qlora_dtype grad_dtype, float *m, float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = load_grad(grad, grad_dtype, i) * s->grad_scale;

        float m_decayed = s->beta1 * m[i];
        float m_new = m_decayed + s->one_minus_beta1 * g;

        float g_squared = g * g;
        float v_decayed = s->beta2 * v[i];
        float v_new = v_decayed + s->one_minus_beta2 * g_squared;

        float denom = sqrtf(v_new) + s->eps_c2;
        float ratio = m_new / denom;
        float p = master ? master[i] : ql_bf16_to_f32(param[i]);
        p = p - s->step_size * ratio;
        p = p * s->decay; /* decoupled decay after the step; decay = 1 leaves p unchanged */

        m[i] = m_new;
        v[i] = v_new;
        if (master)
            master[i] = p;
        param[i] = ql_f32_to_bf16(p);
    }
}

double ql_grad_sumsq_ref(const void *grad, qlora_dtype grad_dtype, int64_t n, int *nonfinite) {
    double total = 0.0;
    for (int64_t begin = 0; begin < n; begin += QL_SUMSQ_CHUNK) {
        int64_t end = n - begin < QL_SUMSQ_CHUNK ? n : begin + QL_SUMSQ_CHUNK;
        double chunk = 0.0;
        for (int64_t i = begin; i < end; i++) {
            double g = load_grad(grad, grad_dtype, i);
            chunk += g * g; /* exact: a float32 square fits in a double */
        }
        total += chunk;
    }
    /* A finite float32 square is below 2^256, so no sum of finite elements can overflow a
     * double: the total is NaN/Inf exactly when some element is. */
    if (nonfinite)
        *nonfinite = !isfinite(total);
    return total;
}
