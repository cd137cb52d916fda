/*
 * Paged AdamW (include/qlora.h): registration, the step (global gradient norm, clipping, the
 * schedule, then page by page: bring the page in, update its element range, prefetch the next
 * page), zero_grad and statistics. Saving and loading are in optimizer_io.c; the pages in
 * pager.c; the per-element math in adamw_{ref,fast}.c and cuda/adamw.cu.
 */
#include "adamw.h"
#include "internal.h"
#include "optimizer_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#endif

#define QL_DEFAULT_PAGE_BYTES ((size_t)2 << 20)
/* torch.nn.utils.clip_grad_norm_ divides by norm + 1e-6 */
#define QL_CLIP_EPS 1e-6

qlora_adamw_params qlora_adamw_default_params(void) {
    qlora_adamw_params p;
    memset(&p, 0, sizeof p);
    p.beta1 = 0.9;
    p.beta2 = 0.999;
    p.eps = 1e-8;
    p.weight_decay = 0.0;
    p.max_grad_norm = 0.3;
    p.master_weights = 0;
    p.gpu_mem_limit = 0;
    p.page_bytes = QL_DEFAULT_PAGE_BYTES;
    p.schedule.kind = QLORA_LR_CONSTANT;
    p.schedule.lr = 2e-4;
    return p;
}

int ql_adamw_states(const qlora_adamw_params *p) { return p->master_weights ? 3 : 2; }

qlora_status ql_adamw_params_validate(const qlora_adamw_params *p, const char *who) {
    if (!(p->beta1 >= 0 && p->beta1 < 1))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: beta1 %g is outside [0, 1)", who, p->beta1);
    if (!(p->beta2 >= 0 && p->beta2 < 1))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: beta2 %g is outside [0, 1)", who, p->beta2);
    if (!(isfinite(p->eps) && p->eps > 0))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: eps %g must be finite and > 0", who, p->eps);
    if (!(isfinite(p->weight_decay) && p->weight_decay >= 0))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight_decay %g must be finite and >= 0", who, p->weight_decay);
    if (!(isfinite(p->max_grad_norm) && p->max_grad_norm >= 0))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: max_grad_norm %g must be finite and >= 0 (0 = off)", who,
                       p->max_grad_norm);
    if (p->master_weights != 0 && p->master_weights != 1)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: master_weights %d must be 0 or 1", who, p->master_weights);
    size_t min_page = (size_t)256 * (size_t)ql_adamw_states(p);
    if (p->page_bytes < min_page)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: page_bytes %zu is below the minimum %zu (64 elements of %d "
                       "float32 states)", who, p->page_bytes, min_page, ql_adamw_states(p));
    if (p->gpu_mem_limit != 0 && p->gpu_mem_limit < p->page_bytes)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: gpu_mem_limit %llu bytes does not hold one page of %zu bytes", who,
                       (unsigned long long)p->gpu_mem_limit, p->page_bytes);
    return ql_lr_schedule_validate(&p->schedule, who);
}

qlora_status qlora_adamw_create(qlora_ctx *ctx, const qlora_adamw_params *params, qlora_optimizer **out) {
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    qlora_adamw_params p = params ? *params : qlora_adamw_default_params();
    QL_CHECK(ql_adamw_params_validate(&p, "qlora_adamw_create"));
    qlora_optimizer *opt = calloc(1, sizeof *opt);
    if (!opt)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "qlora_adamw_create: out of host memory");
    opt->ctx = ctx;
    opt->params = p;
    /* A multiple of 64 elements keeps every state array of a slot 256-byte aligned. */
    opt->elems_per_page = (int64_t)(p.page_bytes / (sizeof(float) * (size_t)ql_adamw_states(&p)) / 64 * 64);
    uint64_t max_slots = p.gpu_mem_limit ? p.gpu_mem_limit / p.page_bytes : 0;
    qlora_status st = ql_pager_create(ctx, opt->elems_per_page, p.master_weights, max_slots, &opt->pager);
    if (st != QLORA_OK) {
        free(opt);
        return st;
    }
    *out = opt;
    return QLORA_OK;
}

void qlora_optimizer_free(qlora_optimizer *opt) {
    if (!opt)
        return;
    ql_pager_destroy(opt->pager);
    free(opt->p);
    free(opt);
}

ql_pager *ql_optimizer_pager(qlora_optimizer *opt) { return opt ? opt->pager : NULL; }

static const char *device_name(int device, char buf[24]) {
    if (device == QLORA_DEVICE_HOST)
        return "host";
    snprintf(buf, 24, "cuda:%d", device);
    return buf;
}

static qlora_status check_tensor_device(const qlora_optimizer *opt, const qlora_tensor *t, const char *role,
                                        const char *name) {
    int dev = qlora_ctx_device(opt->ctx);
    char a[24], b[24];
    if (t->device != dev)
        return ql_fail(QLORA_ERR_DEVICE, "qlora_optimizer_add_param: %s of '%s' is on %s but the optimizer's "
                       "context is on %s", role, name, device_name(t->device, a), device_name(dev, b));
    if (!t->data)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_add_param: %s of '%s' has no data", role, name);
    return QLORA_OK;
}

qlora_status qlora_optimizer_add_param(qlora_optimizer *opt, const qlora_tensor *param, const qlora_tensor *grad) {
    QL_REQUIRE_ARG(opt != NULL, "opt");
    QL_REQUIRE_ARG(param != NULL, "param");
    QL_REQUIRE_ARG(grad != NULL, "grad");
    const char *name = param->name;
    if (!name[0])
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_add_param: the parameter has no name (names key "
                       "its state in errors and save files)");
    if (opt->step > 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_add_param: '%s' added after %lld steps; register "
                       "every parameter before the first step", name, (long long)opt->step);
    if (param->dtype != QLORA_BF16)
        return ql_fail(QLORA_ERR_DTYPE, "qlora_optimizer_add_param: parameter '%s' is %s; the optimizer updates "
                       "BF16 parameters", name, qlora_dtype_name(param->dtype));
    if (grad->dtype != QLORA_BF16 && grad->dtype != QLORA_F32)
        return ql_fail(QLORA_ERR_DTYPE, "qlora_optimizer_add_param: gradient of '%s' is %s; BF16 or F32 expected",
                       name, qlora_dtype_name(grad->dtype));
    int64_t n = qlora_tensor_numel(param);
    if (n <= 0)
        return ql_fail(QLORA_ERR_SHAPE, "qlora_optimizer_add_param: parameter '%s' has no elements", name);
    if (qlora_tensor_numel(grad) != n)
        return ql_fail(QLORA_ERR_SHAPE, "qlora_optimizer_add_param: gradient of '%s' has %lld elements, the "
                       "parameter %lld", name, (long long)qlora_tensor_numel(grad), (long long)n);
    QL_CHECK(check_tensor_device(opt, param, "parameter", name));
    QL_CHECK(check_tensor_device(opt, grad, "gradient", name));
    for (size_t i = 0; i < opt->n; i++)
        if (strcmp(opt->p[i].param.name, name) == 0)
            return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_add_param: a parameter named '%s' is already "
                           "registered", name);
    if (opt->n == opt->cap) {
        size_t cap = opt->cap ? 2 * opt->cap : 16;
        ql_opt_param *p = realloc(opt->p, cap * sizeof *p);
        if (!p)
            return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "qlora_optimizer_add_param: out of host memory");
        opt->p = p;
        opt->cap = cap;
    }
    ql_opt_param *q = &opt->p[opt->n];
    q->param = *param;
    q->grad = *grad;
    q->numel = n;
    QL_CHECK(ql_pager_add(opt->pager, param->data, n, &q->first_page));
    q->npages = ql_pager_count(opt->pager) - q->first_page;
    opt->n++;
    return QLORA_OK;
}

static qlora_status grad_sumsq(const qlora_optimizer *opt, const ql_opt_param *q, double *sum, int *nonfinite) {
#ifdef QLORA_HAVE_CUDA
    if (opt->ctx->cuda)
        return ql_cuda_grad_sumsq((ql_cuda_state *)opt->ctx->cuda, q->grad.data, q->grad.dtype, q->numel, sum,
                                  nonfinite);
#endif
    if (opt->ctx->params.cpu_kernels == QLORA_CPU_REFERENCE)
        *sum = ql_grad_sumsq_ref(q->grad.data, q->grad.dtype, q->numel, nonfinite);
    else
        *sum = ql_grad_sumsq_fast(q->grad.data, q->grad.dtype, q->numel, nonfinite, opt->ctx->params.num_threads);
    return QLORA_OK;
}

/* Updates elements [page * E, page * E + view->count) of parameter q. */
static qlora_status update_page(const qlora_optimizer *opt, const ql_opt_param *q, int64_t page,
                                const ql_page_view *view, const ql_adamw_step *s) {
    int64_t begin = page * opt->elems_per_page;
    uint16_t *param = (uint16_t *)q->param.data + begin;
    const void *grad = (const char *)q->grad.data + (size_t)begin * (q->grad.dtype == QLORA_F32 ? 4 : 2);
#ifdef QLORA_HAVE_CUDA
    if (opt->ctx->cuda)
        return ql_cuda_adamw_update((ql_cuda_state *)opt->ctx->cuda, s, param, view->master, grad, q->grad.dtype,
                                    view->m, view->v, view->count);
#endif
    if (opt->ctx->params.cpu_kernels == QLORA_CPU_REFERENCE)
        ql_adamw_update_ref(s, param, view->master, grad, q->grad.dtype, view->m, view->v, view->count);
    else
        ql_adamw_update_fast(s, param, view->master, grad, q->grad.dtype, view->m, view->v, view->count,
                             opt->ctx->params.num_threads);
    return QLORA_OK;
}

/* Every page in order: make it resident, update it, then bring the next one in (without
 * evicting this one) so that on CUDA its copy overlaps this update. *written = 1 once any
 * parameter may have changed. */
static qlora_status update_all(qlora_optimizer *opt, const ql_adamw_step *s, int *written) {
    int64_t total = ql_pager_count(opt->pager);
    for (size_t i = 0; i < opt->n; i++) {
        const ql_opt_param *q = &opt->p[i];
        for (int64_t j = 0; j < q->npages; j++) {
            int64_t k = q->first_page + j;
            int resident;
            ql_page_view view;
            QL_CHECK(ql_pager_fetch(opt->pager, k, -1, 0, &resident));
            QL_CHECK(ql_pager_begin_compute(opt->pager, k, &view));
            *written = 1;
            QL_CHECK(update_page(opt, q, j, &view, s));
            QL_CHECK(ql_pager_end_compute(opt->pager, k));
            if (k + 1 < total)
                QL_CHECK(ql_pager_fetch(opt->pager, k + 1, k, 1, &resident));
        }
    }
    return QLORA_OK;
}

qlora_status qlora_optimizer_step(qlora_optimizer *opt, double grad_scale, qlora_step_report *out) {
    QL_REQUIRE_ARG(opt != NULL, "opt");
    if (!(isfinite(grad_scale) && grad_scale > 0))
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_step: grad_scale %g must be finite and > 0",
                       grad_scale);
    if (opt->n == 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_step: no parameters registered");
    if (opt->broken)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_step: an earlier step failed midway, so parameters "
                       "and state are inconsistent; restore them (qlora_optimizer_load and the saved parameters)");
    qlora_step_report r;
    memset(&r, 0, sizeof r);
    r.lr = ql_lr_at_valid(&opt->params.schedule, opt->step);

    double sumsq = 0;
    const ql_opt_param *bad = NULL;
    for (size_t i = 0; i < opt->n && !bad; i++) {
        double s;
        int nonfinite = 0;
        QL_CHECK(grad_sumsq(opt, &opt->p[i], &s, &nonfinite));
        if (nonfinite)
            bad = &opt->p[i];
        sumsq += s;
    }
    double norm = sqrt(sumsq) * grad_scale;
    if (bad || !isfinite(norm)) {
        opt->skipped++;
        ql_log(QLORA_LOG_WARN, "qlora_optimizer_step: %s%s%s; update %lld skipped, nothing written",
               bad ? "the gradient of '" : "the gradient norm is not finite", bad ? bad->param.name : "",
               bad ? "' holds NaN or Inf" : "", (long long)opt->step + 1);
        r.step = opt->step;
        r.skipped = 1;
        r.skipped_total = opt->skipped;
        r.grad_norm = NAN;
        r.clip_coef = 1;
        if (out)
            *out = r;
        return QLORA_OK;
    }
    r.grad_norm = norm;
    r.clip_coef = 1;
    if (opt->params.max_grad_norm > 0) {
        double coef = opt->params.max_grad_norm / (norm + QL_CLIP_EPS);
        if (coef < 1)
            r.clip_coef = coef;
    }
    const qlora_adamw_params *hp = &opt->params;
    ql_adamw_step s = ql_adamw_scalars(r.lr, hp->beta1, hp->beta2, hp->eps, hp->weight_decay, opt->step + 1,
                                       grad_scale * r.clip_coef);
    int written = 0;
    qlora_status st = update_all(opt, &s, &written);
    if (st != QLORA_OK) {
        if (written) {
            opt->broken = 1;
            ql_error_prefix("qlora_optimizer_step: update %lld failed midway (parameters and state are now "
                            "inconsistent)", (long long)opt->step + 1);
        }
        return st;
    }
    opt->step++;
    r.step = opt->step;
    r.skipped_total = opt->skipped;
    if (out)
        *out = r;
    return QLORA_OK;
}

qlora_status qlora_optimizer_zero_grad(qlora_optimizer *opt) {
    QL_REQUIRE_ARG(opt != NULL, "opt");
    for (size_t i = 0; i < opt->n; i++) {
        qlora_tensor *g = &opt->p[i].grad;
        size_t bytes = qlora_tensor_nbytes(g);
#ifdef QLORA_HAVE_CUDA
        if (opt->ctx->cuda) {
            QL_CHECK(ql_cuda_memset_async((ql_cuda_state *)opt->ctx->cuda, NULL, g->data, 0, bytes));
            continue;
        }
#endif
        memset(g->data, 0, bytes);
    }
    return QLORA_OK;
}

qlora_status qlora_optimizer_get_params(const qlora_optimizer *opt, qlora_adamw_params *out) {
    QL_REQUIRE_ARG(opt != NULL, "opt");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = opt->params;
    return QLORA_OK;
}

qlora_status qlora_optimizer_paging_stats(qlora_optimizer *opt, qlora_paging_stats *out) {
    QL_REQUIRE_ARG(opt != NULL, "opt");
    QL_REQUIRE_ARG(out != NULL, "out");
    QL_CHECK(ql_pager_quiesce(opt->pager));
    ql_pager_stats(opt->pager, out);
    return QLORA_OK;
}
