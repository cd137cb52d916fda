/*
 * Saving and restoring the optimizer state exactly: one safetensors file (written through the
 * atomic writer) with, per parameter P, F32 tensors "P.exp_avg" (m), "P.exp_avg_sq" (v) and,
 * with master weights, "P.master", all of P's shape; the step counts and hyperparameters go in
 * __metadata__ (numbers printed with 17 significant digits, so they read back bit for bit).
 */
#include "internal.h"
#include "optimizer_internal.h"
#include "safetensors_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QL_OPT_FORMAT "libqlora.adamw"
#define QL_OPT_FORMAT_VERSION "1"

static const char *const state_suffix[3] = {".exp_avg", ".exp_avg_sq", ".master"};
static const char *const schedule_names[3] = {"constant", "linear", "cosine"};

/* Parameter names are shorter than QLORA_NAME_MAX and suffixes than 16 bytes. */
typedef struct ql_state_name {
    char s[QLORA_NAME_MAX + 16];
} ql_state_name;

static ql_state_name state_name(const ql_opt_param *q, int which) {
    ql_state_name n;
    snprintf(n.s, sizeof n.s, "%s%s", q->param.name, state_suffix[which]);
    return n;
}

/* ---- save */

static qlora_status put_meta(qlora_st_writer *w, const char *key, const char *fmt, ...) QL_PRINTF(3, 4);
static qlora_status put_meta(qlora_st_writer *w, const char *key, const char *fmt, ...) {
    char value[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(value, sizeof value, fmt, ap);
    va_end(ap);
    return qlora_st_writer_set_metadata(w, key, value);
}

static qlora_status write_metadata(const qlora_optimizer *opt, qlora_st_writer *w) {
    const qlora_adamw_params *p = &opt->params;
    QL_CHECK(qlora_st_writer_set_metadata(w, "format", QL_OPT_FORMAT));
    QL_CHECK(qlora_st_writer_set_metadata(w, "format_version", QL_OPT_FORMAT_VERSION));
    QL_CHECK(put_meta(w, "step", "%lld", (long long)opt->step));
    QL_CHECK(put_meta(w, "skipped_steps", "%lld", (long long)opt->skipped));
    QL_CHECK(put_meta(w, "beta1", "%.17g", p->beta1));
    QL_CHECK(put_meta(w, "beta2", "%.17g", p->beta2));
    QL_CHECK(put_meta(w, "eps", "%.17g", p->eps));
    QL_CHECK(put_meta(w, "weight_decay", "%.17g", p->weight_decay));
    QL_CHECK(put_meta(w, "max_grad_norm", "%.17g", p->max_grad_norm));
    QL_CHECK(put_meta(w, "master_weights", "%d", p->master_weights));
    QL_CHECK(qlora_st_writer_set_metadata(w, "lr_schedule", schedule_names[p->schedule.kind]));
    QL_CHECK(put_meta(w, "lr", "%.17g", p->schedule.lr));
    QL_CHECK(put_meta(w, "warmup_steps", "%lld", (long long)p->schedule.warmup_steps));
    QL_CHECK(put_meta(w, "total_steps", "%lld", (long long)p->schedule.total_steps));
    QL_CHECK(put_meta(w, "min_lr_ratio", "%.17g", p->schedule.min_lr_ratio));
    return QLORA_OK;
}

static qlora_status declare_states(const qlora_optimizer *opt, qlora_st_writer *w, int states) {
    for (size_t i = 0; i < opt->n; i++) {
        const ql_opt_param *q = &opt->p[i];
        for (int s = 0; s < states; s++)
            QL_CHECK(qlora_st_writer_declare(w, state_name(q, s).s, QLORA_F32, q->param.ndim, q->param.shape));
    }
    return QLORA_OK;
}

/* buf holds `states` arrays of `stride` floats: m, v, master. */
static qlora_status write_states(qlora_optimizer *opt, qlora_st_writer *w, int states, float *buf, int64_t stride) {
    for (size_t i = 0; i < opt->n; i++) {
        const ql_opt_param *q = &opt->p[i];
        for (int64_t j = 0; j < q->npages; j++) {
            int64_t off = j * opt->elems_per_page;
            QL_CHECK(ql_pager_read(opt->pager, q->first_page + j, buf + off, buf + stride + off,
                                   states == 3 ? buf + 2 * stride + off : NULL));
        }
        for (int s = 0; s < states; s++)
            QL_CHECK(qlora_st_writer_write(w, state_name(q, s).s, buf + s * stride,
                                           (size_t)q->numel * sizeof(float)));
    }
    return QLORA_OK;
}

qlora_status qlora_optimizer_save(qlora_optimizer *opt, const char *path) {
    QL_REQUIRE_ARG(opt != NULL, "opt");
    QL_REQUIRE_ARG(path != NULL, "path");
    int states = ql_adamw_states(&opt->params);
    int64_t stride = 0;
    for (size_t i = 0; i < opt->n; i++)
        if (opt->p[i].numel > stride)
            stride = opt->p[i].numel;
    float *buf = NULL;
    qlora_st_writer *w = NULL;
    qlora_status st = qlora_alloc(opt->ctx, (size_t)stride * sizeof(float) * (size_t)states, 0, QLORA_MEM_WORKSPACE,
                                  (void **)&buf);
    if (st == QLORA_OK)
        st = qlora_st_writer_open(path, 0, &w);
    if (st == QLORA_OK)
        st = write_metadata(opt, w);
    if (st == QLORA_OK)
        st = declare_states(opt, w, states);
    if (st == QLORA_OK)
        st = ql_pager_quiesce(opt->pager);
    if (st == QLORA_OK)
        st = write_states(opt, w, states, buf, stride);
    if (st == QLORA_OK) {
        st = qlora_st_writer_commit(w);
        w = NULL;
    }
    if (w)
        qlora_st_writer_abort(w);
    qlora_free(opt->ctx, buf);
    if (st != QLORA_OK)
        ql_error_prefix("qlora_optimizer_save '%s'", path);
    return st;
}

/* ---- load */

static qlora_status meta_text(const qlora_safetensors *f, const char *path, const char *key, const char **out) {
    *out = qlora_safetensors_metadata(f, key);
    if (!*out)
        return ql_fail(QLORA_ERR_FORMAT, "qlora_optimizer_load '%s': metadata '%s' is missing", path, key);
    return QLORA_OK;
}

static qlora_status meta_double(const qlora_safetensors *f, const char *path, const char *key, double *out) {
    const char *s;
    QL_CHECK(meta_text(f, path, key, &s));
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE)
        return ql_fail(QLORA_ERR_FORMAT, "qlora_optimizer_load '%s': metadata '%s' = '%s' is not a number", path,
                       key, s);
    return QLORA_OK;
}

static qlora_status meta_int(const qlora_safetensors *f, const char *path, const char *key, int64_t *out) {
    const char *s;
    QL_CHECK(meta_text(f, path, key, &s));
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || errno == ERANGE || v < 0)
        return ql_fail(QLORA_ERR_FORMAT, "qlora_optimizer_load '%s': metadata '%s' = '%s' is not an integer >= 0",
                       path, key, s);
    *out = v;
    return QLORA_OK;
}

typedef struct ql_saved_counts {
    int64_t step, skipped;
} ql_saved_counts;

/* Hyperparameters from the file into *hp (paging settings untouched), validated. */
static qlora_status read_hyperparameters(const qlora_safetensors *f, const char *path, qlora_adamw_params *hp,
                                         ql_saved_counts *counts) {
    const char *s;
    QL_CHECK(meta_text(f, path, "format", &s));
    if (strcmp(s, QL_OPT_FORMAT) != 0)
        return ql_fail(QLORA_ERR_FORMAT, "qlora_optimizer_load '%s': not a libqlora optimizer state (format '%s')",
                       path, s);
    QL_CHECK(meta_text(f, path, "format_version", &s));
    if (strcmp(s, QL_OPT_FORMAT_VERSION) != 0)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "qlora_optimizer_load '%s': optimizer state format version '%s'; "
                       "this libqlora reads version " QL_OPT_FORMAT_VERSION, path, s);
    int64_t master, warmup, total;
    QL_CHECK(meta_int(f, path, "step", &counts->step));
    QL_CHECK(meta_int(f, path, "skipped_steps", &counts->skipped));
    QL_CHECK(meta_double(f, path, "beta1", &hp->beta1));
    QL_CHECK(meta_double(f, path, "beta2", &hp->beta2));
    QL_CHECK(meta_double(f, path, "eps", &hp->eps));
    QL_CHECK(meta_double(f, path, "weight_decay", &hp->weight_decay));
    QL_CHECK(meta_double(f, path, "max_grad_norm", &hp->max_grad_norm));
    QL_CHECK(meta_int(f, path, "master_weights", &master));
    QL_CHECK(meta_text(f, path, "lr_schedule", &s));
    int kind = -1;
    for (int k = 0; k < 3; k++)
        if (strcmp(s, schedule_names[k]) == 0)
            kind = k;
    if (kind < 0)
        return ql_fail(QLORA_ERR_FORMAT, "qlora_optimizer_load '%s': unknown lr_schedule '%s'", path, s);
    QL_CHECK(meta_double(f, path, "lr", &hp->schedule.lr));
    QL_CHECK(meta_int(f, path, "warmup_steps", &warmup));
    QL_CHECK(meta_int(f, path, "total_steps", &total));
    QL_CHECK(meta_double(f, path, "min_lr_ratio", &hp->schedule.min_lr_ratio));
    hp->master_weights = master > 1 ? 2 : (int)master; /* 2: rejected by the validation below */
    hp->schedule.kind = (qlora_lr_kind)kind;
    hp->schedule.warmup_steps = warmup;
    hp->schedule.total_steps = total;
    if (ql_adamw_params_validate(hp, "saved hyperparameters") != QLORA_OK) {
        char why[512];
        snprintf(why, sizeof why, "%s", qlora_last_error());
        return ql_fail(QLORA_ERR_FORMAT, "qlora_optimizer_load '%s': %s", path, why);
    }
    return QLORA_OK;
}

static void format_shape(int ndim, const int64_t *shape, char *buf, size_t size) {
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
}

/* Every registered parameter's states are in the file as F32 of its shape, and nothing else is. */
static qlora_status check_tensors(const qlora_optimizer *opt, const qlora_safetensors *f, const char *path,
                                  int states) {
    for (size_t i = 0; i < opt->n; i++) {
        const ql_opt_param *q = &opt->p[i];
        for (int s = 0; s < states; s++) {
            ql_state_name name = state_name(q, s);
            qlora_tensor t;
            if (ql_safetensors_lookup(f, name.s) < 0)
                return ql_fail(QLORA_ERR_NOT_FOUND, "qlora_optimizer_load '%s': no tensor '%s' for the registered "
                               "parameter '%s'", path, name.s, q->param.name);
            QL_CHECK(qlora_safetensors_find(f, name.s, &t));
            if (t.dtype != QLORA_F32)
                return ql_fail(QLORA_ERR_DTYPE, "qlora_optimizer_load '%s': tensor '%s' is %s, F32 expected", path,
                               name.s, qlora_dtype_name(t.dtype));
            int same = t.ndim == q->param.ndim;
            for (int d = 0; same && d < t.ndim; d++)
                same = t.shape[d] == q->param.shape[d];
            if (!same) {
                char a[128], b[128];
                format_shape(t.ndim, t.shape, a, sizeof a);
                format_shape(q->param.ndim, q->param.shape, b, sizeof b);
                return ql_fail(QLORA_ERR_SHAPE, "qlora_optimizer_load '%s': tensor '%s' has shape %s but parameter "
                               "'%s' has shape %s", path, name.s, a, q->param.name, b);
            }
        }
    }
    size_t expected = opt->n * (size_t)states;
    size_t count = qlora_safetensors_count(f);
    if (count == expected)
        return QLORA_OK;
    for (size_t k = 0; k < count; k++) {
        const char *name = ql_safetensors_name(f, k);
        int known = 0;
        for (size_t i = 0; i < opt->n && !known; i++)
            for (int s = 0; s < states && !known; s++)
                known = strcmp(name, state_name(&opt->p[i], s).s) == 0;
        if (!known)
            return ql_fail(QLORA_ERR_NOT_FOUND, "qlora_optimizer_load '%s': tensor '%s' belongs to no registered "
                           "parameter (%zu registered)", path, name, opt->n);
    }
    return ql_fail(QLORA_ERR_FORMAT, "qlora_optimizer_load '%s': %zu tensors, %zu expected", path, count, expected);
}

static qlora_status restore_pages(qlora_optimizer *opt, const qlora_safetensors *f, int states) {
    for (size_t i = 0; i < opt->n; i++) {
        const ql_opt_param *q = &opt->p[i];
        const unsigned char *data[3] = {NULL, NULL, NULL};
        for (int s = 0; s < states; s++) {
            qlora_tensor t;
            QL_CHECK(qlora_safetensors_find(f, state_name(q, s).s, &t));
            data[s] = t.data;
        }
        for (int64_t j = 0; j < q->npages; j++) {
            size_t off = (size_t)(j * opt->elems_per_page) * sizeof(float);
            QL_CHECK(ql_pager_write(opt->pager, q->first_page + j, data[0] + off, data[1] + off,
                                    states == 3 ? data[2] + off : NULL));
        }
    }
    return QLORA_OK;
}

static qlora_status load_from(qlora_optimizer *opt, const qlora_safetensors *f, const char *path) {
    qlora_adamw_params hp = opt->params;
    ql_saved_counts counts;
    QL_CHECK(read_hyperparameters(f, path, &hp, &counts));
    if (hp.master_weights != opt->params.master_weights)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_optimizer_load '%s': the state was saved with "
                       "master_weights = %d but this optimizer has master_weights = %d", path, hp.master_weights,
                       opt->params.master_weights);
    int states = ql_adamw_states(&hp);
    QL_CHECK(check_tensors(opt, f, path, states));
    qlora_status st = restore_pages(opt, f, states);
    if (st != QLORA_OK) {
        opt->broken = 1;
        ql_error_prefix("qlora_optimizer_load '%s': restoring the pages failed midway (the state is now "
                        "inconsistent)", path);
        return st;
    }
    opt->params = hp;
    opt->step = counts.step;
    opt->skipped = counts.skipped;
    opt->broken = 0;
    return QLORA_OK;
}

qlora_status qlora_optimizer_load(qlora_optimizer *opt, const char *path) {
    QL_REQUIRE_ARG(opt != NULL, "opt");
    QL_REQUIRE_ARG(path != NULL, "path");
    qlora_safetensors *f = NULL;
    qlora_status st = qlora_safetensors_open(path, &f);
    if (st != QLORA_OK) {
        ql_error_prefix("qlora_optimizer_load");
        return st;
    }
    st = load_from(opt, f, path);
    qlora_safetensors_close(f);
    return st;
}
