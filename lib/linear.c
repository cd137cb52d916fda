/*
 * The QLoRA linear layer's public API (include/qlora.h): argument checks with messages that
 * name the tensor at fault, adapter storage through the tracked allocator, and dispatch to the
 * reference or fast host kernels (lib/linear_ref.c, lib/linear_fast.c) or the CUDA launchers
 * (lib/linear_device.c).
 */
#include "linear_internal.h"
#include "quant4.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *qlabel(const qlora_qtensor *q) { return q->name[0] ? q->name : "(unnamed weight)"; }

static int is_cuda(const qlora_ctx *ctx) { return ctx->params.backend == QLORA_BACKEND_CUDA; }

static qlora_status check_device(const char *fn, const qlora_ctx *ctx, const char *what, const char *label,
                                 int device) {
    int want = qlora_ctx_device(ctx);
    if (device == want)
        return QLORA_OK;
    if (want == QLORA_DEVICE_HOST)
        return ql_fail(QLORA_ERR_DEVICE, "%s: %s '%s' is on CUDA device %d but the context is CPU", fn, what, label,
                       device);
    if (device == QLORA_DEVICE_HOST)
        return ql_fail(QLORA_ERR_DEVICE, "%s: %s '%s' is in host memory but the context computes on CUDA device %d; "
                       "copy it there first", fn, what, label, want);
    return ql_fail(QLORA_ERR_DEVICE, "%s: %s '%s' is on CUDA device %d but the context computes on CUDA device %d", fn,
                   what, label, device, want);
}

/* ---- parameters ---- */

qlora_lora_params qlora_lora_default_params(void) {
    qlora_lora_params p;
    memset(&p, 0, sizeof p);
    p.rank = 64;
    p.alpha = 16.0f;
    p.use_rslora = 0;
    p.dropout = 0.1f;
    p.seed = 0;
    p.grad_dtype = QLORA_BF16;
    return p;
}

float qlora_lora_scaling(const qlora_lora_params *p) {
    if (!p || p->rank < 1)
        return NAN;
    return p->use_rslora ? p->alpha / sqrtf((float)p->rank) : p->alpha / (float)p->rank;
}

static qlora_status check_lora_params(const char *fn, const char *adapter, const qlora_lora_params *p) {
    if (p->rank < 1)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: adapter '%s': rank %d must be at least 1", fn, adapter, p->rank);
    if (!isfinite(p->alpha))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: adapter '%s': alpha must be finite", fn, adapter);
    if (p->use_rslora != 0 && p->use_rslora != 1)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: adapter '%s': use_rslora must be 0 or 1 (got %d)", fn, adapter,
                       p->use_rslora);
    if (!(p->dropout >= 0.0f && p->dropout < 1.0f))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: adapter '%s': dropout %g is not in [0, 1)", fn, adapter,
                       (double)p->dropout);
    if (p->grad_dtype != QLORA_BF16 && p->grad_dtype != QLORA_F32)
        return ql_fail(QLORA_ERR_DTYPE, "%s: adapter '%s': gradient dtype %s (BF16 or F32 expected)", fn, adapter,
                       qlora_dtype_name(p->grad_dtype));
    return QLORA_OK;
}

/* FNV-1a over both names (with a separator), mixed with the seed through splitmix64's
 * finalizer, a bijection: different seeds always give different keys. */
uint64_t ql_lora_key(uint64_t seed, const char *weight_name, const char *adapter_name) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char *s = weight_name; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    h = (h ^ 0xffu) * 0x100000001b3ULL;
    for (const char *s = adapter_name; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    uint64_t z = seed ^ h;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* ---- create / free ---- */

/* The weight must be a consistent 2-D quantized tensor with storage on the context's device. */
static qlora_status check_weight(const char *fn, const qlora_ctx *ctx, const qlora_qtensor *w) {
    const char *label = qlabel(w);
    if (w->type != QLORA_QUANT_NF4 && w->type != QLORA_QUANT_FP4)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s': unknown quant type %d", fn, label, (int)w->type);
    if (!ql_quant4_blocksize_ok(w->blocksize) || (w->double_quant != 0 && w->double_quant != 1))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s': blocksize %d / double_quant %d are invalid", fn, label,
                       w->blocksize, w->double_quant);
    if (w->ndim != 2 || w->shape[0] < 1 || w->shape[1] < 1)
        return ql_fail(QLORA_ERR_SHAPE, "%s: weight '%s' must be 2-D [out, in] with out, in >= 1 (ndim %d)", fn, label,
                       w->ndim);
    if (w->shape[0] > INT_MAX || w->shape[1] > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: weight '%s' [%lld, %lld]: dimensions above %d are not supported",
                       fn, label, (long long)w->shape[0], (long long)w->shape[1], INT_MAX);
    int64_t nblocks = (w->numel + w->blocksize - 1) / w->blocksize;
    if (w->numel != w->shape[0] * w->shape[1] || w->nblocks != nblocks ||
        w->nested_nblocks != (w->double_quant ? (nblocks + QLORA_NESTED_BLOCKSIZE - 1) / QLORA_NESTED_BLOCKSIZE : 0))
        return ql_fail(QLORA_ERR_SHAPE, "%s: weight '%s': numel %lld / nblocks %lld disagree with its shape and "
                       "blocksize", fn, label, (long long)w->numel, (long long)w->nblocks);
    if (!w->codes || (w->double_quant ? !w->qabsmax || !w->nested_absmax : !w->absmax))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' has no storage (codes or scales are NULL)", fn, label);
    return check_device(fn, ctx, "weight", label, w->device);
}

qlora_status qlora_linear_create(qlora_ctx *ctx, qlora_qtensor *weight, const qlora_tensor *bias, qlora_linear **out) {
    static const char fn[] = "qlora_linear_create";
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(weight != NULL, "weight");
    QL_CHECK(check_weight(fn, ctx, weight));
    if (bias) {
        const char *label = ql_tensor_label(bias, "(unnamed bias)");
        if (bias->dtype != QLORA_BF16)
            return ql_fail(QLORA_ERR_DTYPE, "%s: bias '%s' is %s; BF16 expected", fn, label,
                           qlora_dtype_name(bias->dtype));
        if (bias->ndim != 1 || bias->shape[0] != weight->shape[0])
            return ql_fail(QLORA_ERR_SHAPE, "%s: bias '%s' must be [%lld] to match weight '%s'", fn, label,
                           (long long)weight->shape[0], qlabel(weight));
        if (!bias->data)
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: bias '%s' has no data", fn, label);
        QL_CHECK(check_device(fn, ctx, "bias", label, bias->device));
    }
    qlora_linear *lin = calloc(1, sizeof *lin);
    if (!lin)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "%s: out of host memory for the layer of '%s'", fn, qlabel(weight));
    lin->ctx = ctx;
    lin->weight = weight;
    if (bias)
        lin->bias = *bias;
    lin->out = weight->shape[0];
    lin->in = weight->shape[1];
    *out = lin;
    return QLORA_OK;
}

static void free_adapter(qlora_ctx *ctx, ql_lora_adapter *a) {
    qlora_tensor_free(ctx, &a->a);
    qlora_tensor_free(ctx, &a->b);
    qlora_tensor_free(ctx, &a->da);
    qlora_tensor_free(ctx, &a->db);
}

void qlora_linear_free(qlora_linear *lin) {
    if (!lin)
        return;
    for (int i = 0; i < lin->count; i++)
        free_adapter(lin->ctx, &lin->adapters[i]);
    free(lin);
}

int64_t qlora_linear_in_features(const qlora_linear *lin) { return lin ? lin->in : 0; }
int64_t qlora_linear_out_features(const qlora_linear *lin) { return lin ? lin->out : 0; }

const qlora_qtensor *qlora_linear_weight(const qlora_linear *lin) { return lin ? lin->weight : NULL; }

/* ---- adapters ---- */

/* Writes host bytes into a tensor on the context's device. */
static qlora_status upload(qlora_ctx *ctx, qlora_tensor *dst, const void *host) {
    qlora_tensor src = *dst;
    src.data = (void *)host;
    src.device = QLORA_DEVICE_HOST;
    return qlora_tensor_copy(ctx, dst, &src);
}

/* Sets a tensor to zero: memset on the host, a copy of zeros to a GPU. */
static qlora_status zero_tensor(qlora_ctx *ctx, qlora_tensor *t) {
    size_t bytes = qlora_tensor_nbytes(t);
    if (!is_cuda(ctx)) {
        memset(t->data, 0, bytes);
        return QLORA_OK;
    }
    void *zeros = NULL;
    QL_CHECK(qlora_alloc(ctx, bytes, 0, QLORA_MEM_WORKSPACE, &zeros));
    memset(zeros, 0, bytes);
    qlora_status st = upload(ctx, t, zeros);
    qlora_free(ctx, zeros);
    return st;
}

/* A = uniform(±1/sqrt(in)) in BF16 from the adapter's key (PEFT's kaiming_uniform(a = sqrt(5))). */
static qlora_status init_a(qlora_ctx *ctx, ql_lora_adapter *ad, int64_t in) {
    int64_t n = qlora_tensor_numel(&ad->a);
    uint16_t *host = ad->a.data;
    if (is_cuda(ctx))
        QL_CHECK(qlora_alloc(ctx, (size_t)n * 2, 0, QLORA_MEM_WORKSPACE, (void **)&host));
    float bound = (float)(1.0 / sqrt((double)in));
    for (int64_t i = 0; i < n; i++) {
        float u = ql_philox_uniform(ad->key, QL_LORA_INIT_STREAM, (uint64_t)i);
        host[i] = ql_f32_to_bf16((2.0f * u - 1.0f) * bound);
    }
    qlora_status st = QLORA_OK;
    if (is_cuda(ctx)) {
        st = upload(ctx, &ad->a, host);
        qlora_free(ctx, host);
    }
    return st;
}

/* "<weight name without .weight>.<kind>.<adapter>.weight[.grad]" */
static void tensor_name(char out[QLORA_NAME_MAX], const char *weight_name, const char *kind, const char *adapter,
                        int grad) {
    size_t len = strlen(weight_name);
    if (len >= 7 && strcmp(weight_name + len - 7, ".weight") == 0)
        len -= 7;
    snprintf(out, QLORA_NAME_MAX, "%.*s%s%s.%s.weight%s", (int)len, weight_name, len ? "." : "", kind, adapter,
             grad ? ".grad" : "");
}

static qlora_status alloc_adapter(qlora_linear *lin, ql_lora_adapter *ad) {
    qlora_ctx *ctx = lin->ctx;
    const char *wname = lin->weight->name;
    int64_t r = ad->params.rank;
    int64_t a_shape[2] = {r, lin->in}, b_shape[2] = {lin->out, r};
    char name[QLORA_NAME_MAX];
    qlora_dtype g = ad->params.grad_dtype;
    tensor_name(name, wname, "lora_A", ad->name, 0);
    QL_CHECK(qlora_tensor_init(&ad->a, name, QLORA_BF16, 2, a_shape, NULL, qlora_ctx_device(ctx)));
    tensor_name(name, wname, "lora_B", ad->name, 0);
    QL_CHECK(qlora_tensor_init(&ad->b, name, QLORA_BF16, 2, b_shape, NULL, qlora_ctx_device(ctx)));
    tensor_name(name, wname, "lora_A", ad->name, 1);
    QL_CHECK(qlora_tensor_init(&ad->da, name, g, 2, a_shape, NULL, qlora_ctx_device(ctx)));
    tensor_name(name, wname, "lora_B", ad->name, 1);
    QL_CHECK(qlora_tensor_init(&ad->db, name, g, 2, b_shape, NULL, qlora_ctx_device(ctx)));
    QL_CHECK(qlora_tensor_alloc(ctx, &ad->a, 1, QLORA_MEM_ADAPTER_WEIGHTS));
    QL_CHECK(qlora_tensor_alloc(ctx, &ad->b, 1, QLORA_MEM_ADAPTER_WEIGHTS));
    QL_CHECK(qlora_tensor_alloc(ctx, &ad->da, 1, QLORA_MEM_ADAPTER_GRADS));
    QL_CHECK(qlora_tensor_alloc(ctx, &ad->db, 1, QLORA_MEM_ADAPTER_GRADS));
    QL_CHECK(init_a(ctx, ad, lin->in));
    QL_CHECK(zero_tensor(ctx, &ad->b));
    QL_CHECK(zero_tensor(ctx, &ad->da));
    return zero_tensor(ctx, &ad->db);
}

qlora_status qlora_linear_add_adapter(qlora_linear *lin, const char *name, const qlora_lora_params *params, int *id) {
    static const char fn[] = "qlora_linear_add_adapter";
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_REQUIRE_ARG(name != NULL, "name");
    const char *wname = qlabel(lin->weight);
    size_t len = strlen(name);
    if (len == 0 || len >= 64 || strpbrk(name, ". \t\n"))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s': adapter name '%s' must be 1-63 characters without "
                       "dots or spaces", fn, wname, name);
    for (int i = 0; i < lin->count; i++)
        if (strcmp(lin->adapters[i].name, name) == 0)
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' already has an adapter named '%s'", fn, wname,
                           name);
    if (lin->count == QLORA_LINEAR_MAX_ADAPTERS)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: weight '%s' already has %d adapters (the most a layer holds)", fn,
                       wname, QLORA_LINEAR_MAX_ADAPTERS);
    qlora_lora_params p = params ? *params : qlora_lora_default_params();
    QL_CHECK(check_lora_params(fn, name, &p));
    if (p.rank > INT_MAX / 2)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: adapter '%s': rank %d is too large", fn, name, p.rank);
    ql_lora_adapter *ad = &lin->adapters[lin->count];
    memset(ad, 0, sizeof *ad);
    ql_copy_name(ad->name, name);
    ad->params = p;
    ad->scaling = qlora_lora_scaling(&p);
    ad->key = ql_lora_key(p.seed, lin->weight->name, name);
    ad->enabled = 1;
    qlora_status st = alloc_adapter(lin, ad);
    if (st != QLORA_OK) {
        ql_error_prefix("%s: adapter '%s' of weight '%s'", fn, name, wname);
        free_adapter(lin->ctx, ad);
        memset(ad, 0, sizeof *ad);
        return st;
    }
    if (id)
        *id = lin->count;
    lin->count++;
    return QLORA_OK;
}

static qlora_status check_id(const char *fn, const qlora_linear *lin, int id) {
    if (id < 0 || id >= lin->count)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' has no adapter %d (it has %d)", fn, qlabel(lin->weight),
                       id, lin->count);
    return QLORA_OK;
}

qlora_status qlora_linear_find_adapter(const qlora_linear *lin, const char *name, int *id) {
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_REQUIRE_ARG(name != NULL, "name");
    QL_REQUIRE_ARG(id != NULL, "id");
    for (int i = 0; i < lin->count; i++)
        if (strcmp(lin->adapters[i].name, name) == 0) {
            *id = i;
            return QLORA_OK;
        }
    return ql_fail(QLORA_ERR_NOT_FOUND, "qlora_linear_find_adapter: weight '%s' has no adapter named '%s'",
                   qlabel(lin->weight), name);
}

qlora_status qlora_linear_adapter_params(const qlora_linear *lin, int id, qlora_lora_params *out) {
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_REQUIRE_ARG(out != NULL, "out");
    QL_CHECK(check_id(__func__, lin, id));
    *out = lin->adapters[id].params;
    return QLORA_OK;
}

qlora_status qlora_linear_adapter_enable(qlora_linear *lin, int id, int enabled) {
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_CHECK(check_id(__func__, lin, id));
    lin->adapters[id].enabled = enabled != 0;
    return QLORA_OK;
}

qlora_status qlora_linear_adapter_tensors(const qlora_linear *lin, int id, qlora_tensor *a, qlora_tensor *b,
                                          qlora_tensor *grad_a, qlora_tensor *grad_b) {
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_CHECK(check_id(__func__, lin, id));
    const ql_lora_adapter *ad = &lin->adapters[id];
    if (a)
        *a = ad->a;
    if (b)
        *b = ad->b;
    if (grad_a)
        *grad_a = ad->da;
    if (grad_b)
        *grad_b = ad->db;
    return QLORA_OK;
}

qlora_status qlora_linear_zero_grads(qlora_linear *lin) {
    QL_REQUIRE_ARG(lin != NULL, "lin");
    for (int i = 0; i < lin->count; i++) {
        QL_CHECK(zero_tensor(lin->ctx, &lin->adapters[i].da));
        QL_CHECK(zero_tensor(lin->ctx, &lin->adapters[i].db));
    }
    return QLORA_OK;
}

/* ---- activations: shape checks ---- */

/* t must be BF16 [lead..., last] on the context's device with data; *rows = product of lead. When
 * like != NULL, t's leading dimensions must equal like's. */
static qlora_status check_activation(const char *fn, const qlora_linear *lin, const char *what, const qlora_tensor *t,
                                     int64_t last, const qlora_tensor *like, int64_t *rows) {
    const char *label = ql_tensor_label(t, "(unnamed)");
    if (t->dtype != QLORA_BF16)
        return ql_fail(QLORA_ERR_DTYPE, "%s: %s '%s' is %s; BF16 expected", fn, what, label,
                       qlora_dtype_name(t->dtype));
    if (t->ndim < 1 || t->ndim > QLORA_MAX_DIMS || t->shape[t->ndim - 1] != last)
        return ql_fail(QLORA_ERR_SHAPE, "%s: %s '%s' must be [..., %lld] for weight '%s' [%lld, %lld]", fn, what,
                       label, (long long)last, qlabel(lin->weight), (long long)lin->out, (long long)lin->in);
    if (like) {
        int same = like->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim - 1; d++)
            same = like->shape[d] == t->shape[d];
        if (!same)
            return ql_fail(QLORA_ERR_SHAPE, "%s: %s '%s' must have the leading dimensions of '%s'", fn, what, label,
                           ql_tensor_label(like, "x"));
    }
    int64_t m = 1;
    for (int d = 0; d < t->ndim - 1; d++) {
        if (t->shape[d] < 0)
            return ql_fail(QLORA_ERR_SHAPE, "%s: %s '%s' has a negative dimension", fn, what, label);
        m *= t->shape[d];
    }
    if (m > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: %s '%s' has %lld rows (at most %d)", fn, what, label, (long long)m,
                       INT_MAX);
    QL_CHECK(check_device(fn, lin->ctx, what, label, t->device));
    if (m > 0 && !t->data)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s '%s' has no data", fn, what, label);
    if ((uintptr_t)t->data % 2 != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s '%s': data %p is not aligned for BF16", fn, what, label,
                       t->data);
    *rows = m;
    return QLORA_OK;
}

static int overlaps(const qlora_tensor *a, const qlora_tensor *b) {
    const char *pa = a->data, *pb = b->data;
    size_t na = qlora_tensor_nbytes(a), nb = qlora_tensor_nbytes(b);
    return na && nb && pa < pb + nb && pb < pa + na;
}

/* The term of adapter `id` for a kernel call; h is filled in by the caller. */
static ql_lora_term make_term(const ql_lora_adapter *ad, int training, uint64_t stream) {
    ql_lora_term t;
    memset(&t, 0, sizeof t);
    t.a = ad->a.data;
    t.b = ad->b.data;
    t.rank = ad->params.rank;
    t.scaling = ad->scaling;
    t.p = training ? ad->params.dropout : 0.0f;
    t.key = ad->key;
    t.stream = stream;
    t.da = ad->da.data;
    t.db = ad->db.data;
    t.grad_dtype = ad->params.grad_dtype;
    return t;
}

static qlora_status run_forward(qlora_linear *lin, const uint16_t *x, int64_t m, const ql_lora_term *terms,
                                int nterms, uint16_t *y) {
    qlora_ctx *ctx = lin->ctx;
    const uint16_t *bias = lin->bias.data;
#ifdef QLORA_HAVE_CUDA
    if (is_cuda(ctx))
        return ql_linear_forward_cuda(ctx, lin->weight, bias, x, m, terms, nterms, y);
#endif
    if (ctx->params.cpu_kernels == QLORA_CPU_REFERENCE)
        return ql_linear_forward_ref(ctx, lin->weight, bias, x, m, terms, nterms, y);
    return ql_linear_forward_fast(ctx, lin->weight, bias, x, m, terms, nterms, y);
}

static qlora_status run_backward(qlora_linear *lin, const uint16_t *x, const uint16_t *dy, int64_t m,
                                 const ql_lora_term *terms, int nterms, uint16_t *dx) {
    qlora_ctx *ctx = lin->ctx;
#ifdef QLORA_HAVE_CUDA
    if (is_cuda(ctx))
        return ql_linear_backward_cuda(ctx, lin->weight, x, dy, m, terms, nterms, dx);
#endif
    if (ctx->params.cpu_kernels == QLORA_CPU_REFERENCE)
        return ql_linear_backward_ref(ctx, lin->weight, x, dy, m, terms, nterms, dx);
    return ql_linear_backward_fast(ctx, lin->weight, x, dy, m, terms, nterms, dx);
}

/* ---- forward / backward ---- */

qlora_status qlora_linear_forward(qlora_linear *lin, const qlora_tensor *x, qlora_tensor *y,
                                  const qlora_linear_fwd_opts *opts, qlora_linear_saved *saved) {
    static const char fn[] = "qlora_linear_forward";
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_REQUIRE_ARG(x != NULL, "x");
    QL_REQUIRE_ARG(y != NULL, "y");
    qlora_linear_fwd_opts o = {0, 0};
    if (opts)
        o = *opts;
    if (o.training != 0 && o.training != 1)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: opts->training must be 0 or 1 (got %d)", fn, o.training);
    if (o.rng_stream == QL_LORA_INIT_STREAM)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: rng_stream UINT64_MAX is reserved for adapter initialization", fn);
    if (saved && saved->layer)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: `saved` still holds the activations of an earlier forward; free it "
                       "with qlora_linear_saved_free first", fn);
    QL_CHECK(check_weight(fn, lin->ctx, lin->weight));
    int64_t m, m_y;
    QL_CHECK(check_activation(fn, lin, "input", x, lin->in, NULL, &m));
    QL_CHECK(check_activation(fn, lin, "output", y, lin->out, x, &m_y));
    if (overlaps(x, y))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: output '%s' overlaps input '%s'", fn, ql_tensor_label(y, "y"),
                       ql_tensor_label(x, "x"));

    qlora_linear_saved s;
    memset(&s, 0, sizeof s);
    s.layer = lin;
    s.rows = m;
    s.training = o.training;
    s.rng_stream = o.rng_stream;
    ql_lora_term terms[QLORA_LINEAR_MAX_ADAPTERS];
    qlora_mem_category category = saved ? QLORA_MEM_ACTIVATIONS : QLORA_MEM_WORKSPACE;
    qlora_status st = QLORA_OK;
    for (int i = 0; i < lin->count && st == QLORA_OK; i++) {
        const ql_lora_adapter *ad = &lin->adapters[i];
        if (!ad->enabled)
            continue;
        int64_t shape[2] = {m, ad->params.rank};
        char name[QLORA_NAME_MAX];
        snprintf(name, sizeof name, "%.100s.saved_h", ad->a.name);
        qlora_tensor *h = &s.h[s.count];
        st = qlora_tensor_init(h, name, QLORA_BF16, 2, shape, NULL, qlora_ctx_device(lin->ctx));
        if (st == QLORA_OK)
            st = qlora_tensor_alloc(lin->ctx, h, 1, category);
        terms[s.count] = make_term(ad, o.training, o.rng_stream);
        terms[s.count].h = h->data;
        s.adapter[s.count++] = i;
    }
    if (st == QLORA_OK && m > 0)
        st = run_forward(lin, x->data, m, terms, s.count, y->data);
    if (st != QLORA_OK || !saved) {
        qlora_linear_saved_free(&s);
        return st;
    }
    *saved = s;
    return QLORA_OK;
}

qlora_status qlora_linear_backward(qlora_linear *lin, const qlora_tensor *x, const qlora_tensor *dy,
                                   const qlora_linear_saved *saved, qlora_tensor *dx) {
    static const char fn[] = "qlora_linear_backward";
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_REQUIRE_ARG(x != NULL, "x");
    QL_REQUIRE_ARG(dy != NULL, "dy");
    QL_REQUIRE_ARG(saved != NULL, "saved");
    if (saved->layer != lin)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: `saved` %s (weight '%s')", fn,
                       saved->layer ? "comes from another layer's forward" : "is empty: no forward filled it",
                       qlabel(lin->weight));
    QL_CHECK(check_weight(fn, lin->ctx, lin->weight));
    int64_t m, m_dy, m_dx;
    QL_CHECK(check_activation(fn, lin, "input", x, lin->in, NULL, &m));
    QL_CHECK(check_activation(fn, lin, "output gradient", dy, lin->out, x, &m_dy));
    if (m != saved->rows)
        return ql_fail(QLORA_ERR_SHAPE, "%s: input '%s' has %lld rows but the forward saved %lld", fn,
                       ql_tensor_label(x, "x"), (long long)m, (long long)saved->rows);
    if (dx) {
        QL_CHECK(check_activation(fn, lin, "input gradient", dx, lin->in, x, &m_dx));
        if (overlaps(dx, x) || overlaps(dx, dy))
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: input gradient '%s' overlaps x or dy", fn,
                           ql_tensor_label(dx, "dx"));
    }
    ql_lora_term terms[QLORA_LINEAR_MAX_ADAPTERS];
    for (int i = 0; i < saved->count; i++) {
        int id = saved->adapter[i];
        if (id < 0 || id >= lin->count || saved->h[i].shape[1] != lin->adapters[id].params.rank)
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: `saved` does not match the adapters of weight '%s'", fn,
                           qlabel(lin->weight));
        terms[i] = make_term(&lin->adapters[id], saved->training, saved->rng_stream);
        terms[i].h = saved->h[i].data;
    }
    if (m == 0)
        return QLORA_OK;
    return run_backward(lin, x->data, dy->data, m, terms, saved->count, dx ? dx->data : NULL);
}

void qlora_linear_saved_free(qlora_linear_saved *saved) {
    if (!saved || !saved->layer)
        return;
    for (int i = 0; i < saved->count; i++)
        qlora_tensor_free(saved->layer->ctx, &saved->h[i]);
    memset(saved, 0, sizeof *saved);
}

/* ---- merge ---- */

/* Copies the storage of src into dst (same layout), on the context's device. */
static qlora_status copy_storage(qlora_ctx *ctx, qlora_qtensor *dst, const qlora_qtensor *src) {
    struct {
        void *to;
        const void *from;
        size_t bytes;
    } parts[3] = {{dst->codes, src->codes, (size_t)(src->numel + 1) / 2}, {NULL, NULL, 0}, {NULL, NULL, 0}};
    if (src->double_quant) {
        parts[1].to = dst->qabsmax, parts[1].from = src->qabsmax, parts[1].bytes = (size_t)src->nblocks;
        parts[2].to = dst->nested_absmax, parts[2].from = src->nested_absmax;
        parts[2].bytes = (size_t)src->nested_nblocks * sizeof(float);
    } else {
        parts[1].to = dst->absmax, parts[1].from = src->absmax, parts[1].bytes = (size_t)src->nblocks * sizeof(float);
    }
    for (int i = 0; i < 3; i++) {
        if (!parts[i].bytes)
            continue;
        int64_t shape[1] = {(int64_t)parts[i].bytes};
        qlora_tensor d, s;
        QL_CHECK(qlora_tensor_init(&d, dst->name, QLORA_U8, 1, shape, parts[i].to, dst->device));
        QL_CHECK(qlora_tensor_init(&s, dst->name, QLORA_U8, 1, shape, (void *)parts[i].from, src->device));
        QL_CHECK(qlora_tensor_copy(ctx, &d, &s));
    }
    dst->nested_offset = src->nested_offset;
    return QLORA_OK;
}

qlora_status qlora_linear_merge(qlora_linear *lin, int id, const qlora_quant_params *requant) {
    static const char fn[] = "qlora_linear_merge";
    QL_REQUIRE_ARG(lin != NULL, "lin");
    QL_CHECK(check_id(fn, lin, id));
    qlora_ctx *ctx = lin->ctx;
    qlora_qtensor *w = lin->weight;
    QL_CHECK(check_weight(fn, ctx, w));
    qlora_quant_params p = {w->type, w->blocksize, w->double_quant};
    if (requant)
        p = *requant;
    const ql_lora_adapter *ad = &lin->adapters[id];

    /* W' = dequant(W) + s·B·A in float32 */
    qlora_tensor dense;
    int64_t shape[2] = {lin->out, lin->in};
    QL_CHECK(qlora_tensor_init(&dense, w->name, QLORA_F32, 2, shape, NULL, w->device));
    QL_CHECK(qlora_tensor_alloc(ctx, &dense, 1, QLORA_MEM_WORKSPACE));
    qlora_status st = qlora_dequantize(ctx, w, &dense);
    ql_lora_term term = make_term(ad, 0, 0);
    if (st == QLORA_OK) {
#ifdef QLORA_HAVE_CUDA
        if (is_cuda(ctx))
            st = ql_linear_merge_cuda(ctx, dense.data, lin->out, lin->in, &term);
        else
#endif
        if (ctx->params.cpu_kernels == QLORA_CPU_REFERENCE)
            ql_linear_merge_ref(dense.data, lin->out, lin->in, &term);
        else
            st = ql_linear_merge_fast(ctx, dense.data, lin->out, lin->in, &term);
    }
    qlora_qtensor merged;
    memset(&merged, 0, sizeof merged);
    if (st == QLORA_OK)
        st = qlora_quantize(ctx, &dense, &p, &merged);
    qlora_tensor_free(ctx, &dense);
    if (st != QLORA_OK) {
        ql_error_prefix("%s: adapter '%s' into weight '%s'", fn, ad->name, qlabel(w));
        return st;
    }
    merged.dtype = w->dtype;
    if (p.type == w->type && p.blocksize == w->blocksize && p.double_quant == w->double_quant) {
        st = copy_storage(ctx, w, &merged);
        qlora_qtensor_free(ctx, &merged);
        if (st != QLORA_OK)
            return st;
    } else {
        qlora_qtensor_free(ctx, w);
        *w = merged;
    }
    lin->adapters[id].enabled = 0;
    return QLORA_OK;
}
