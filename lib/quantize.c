/*
 * The public 4-bit API: argument checks, storage through the tracked allocator (codes as
 * BASE_WEIGHTS, scales as QUANT_STATE) and dispatch to the reference, fast or CUDA kernels.
 *
 * Devices: a tensor handed to a context must live where that context computes: host memory
 * for a CPU context, the context's GPU for a CUDA context (a host tensor there is a
 * QLORA_ERR_DEVICE; copy it over with qlora_tensor_copy first).
 */
#include "half.h"
#include "internal.h"
#include "quant4.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#endif

static int is_compute_dtype(qlora_dtype dtype) {
    return dtype == QLORA_F32 || dtype == QLORA_F16 || dtype == QLORA_BF16;
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static const char *qtensor_label(const qlora_qtensor *q) { return q->name[0] ? q->name : "(unnamed)"; }

static qlora_status check_params(const char *fn, const char *name, const qlora_quant_params *p) {
    if (p->type != QLORA_QUANT_NF4 && p->type != QLORA_QUANT_FP4)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: tensor '%s': unknown quant type %d (NF4 = 0, FP4 = 1)", fn, name,
                       (int)p->type);
    if (!ql_quant4_blocksize_ok(p->blocksize))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: tensor '%s': blocksize %d is not a power of two in 32..4096", fn,
                       name, p->blocksize);
    if (p->double_quant != 0 && p->double_quant != 1)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: tensor '%s': double_quant must be 0 or 1 (got %d)", fn, name,
                       p->double_quant);
    return QLORA_OK;
}

/* Fills everything but the storage pointers: shape, sizes, code books. */
static qlora_status set_layout(const char *fn, qlora_qtensor *q, const char *name, int ndim, const int64_t *shape,
                               qlora_dtype dtype, const qlora_quant_params *p, int device) {
    memset(q, 0, sizeof *q);
    ql_copy_name(q->name, name);
    const char *label = qtensor_label(q);
    if (!is_compute_dtype(dtype))
        return ql_fail(QLORA_ERR_DTYPE, "%s: tensor '%s' is %s; 4-bit quantization takes F32, F16 or BF16", fn, label,
                       qlora_dtype_name(dtype));
    QL_CHECK(check_params(fn, label, p));
    if (ndim < 0 || ndim > QLORA_MAX_DIMS)
        return ql_fail(QLORA_ERR_SHAPE, "%s: tensor '%s' has %d dimensions (at most %d)", fn, label, ndim,
                       QLORA_MAX_DIMS);
    if (ndim > 0 && !shape)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: tensor '%s': shape is NULL for %d dimensions", fn, label, ndim);
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return ql_fail(QLORA_ERR_SHAPE, "%s: tensor '%s': dimension %d is negative (%lld)", fn, label, i,
                           (long long)shape[i]);
        if (shape[i] != 0 && numel > (INT64_MAX - 1) / shape[i])
            return ql_fail(QLORA_ERR_SHAPE, "%s: tensor '%s': element count overflows", fn, label);
        numel *= shape[i];
        q->shape[i] = shape[i];
    }
    q->type = p->type;
    q->blocksize = p->blocksize;
    q->double_quant = p->double_quant;
    q->dtype = dtype;
    q->ndim = ndim;
    q->numel = numel;
    q->nblocks = ceil_div(numel, p->blocksize);
    q->nested_nblocks = p->double_quant ? ceil_div(q->nblocks, QLORA_NESTED_BLOCKSIZE) : 0;
    memcpy(q->code, qlora_quant_codebook(p->type), sizeof q->code);
    if (p->double_quant)
        memcpy(q->nested_code, qlora_dynamic_map_signed(), sizeof q->nested_code);
    q->device = device;
    return QLORA_OK;
}

void qlora_qtensor_free(qlora_ctx *ctx, qlora_qtensor *q) {
    if (!q)
        return;
    qlora_free(ctx, q->codes);
    qlora_free(ctx, q->absmax);
    qlora_free(ctx, q->qabsmax);
    qlora_free(ctx, q->nested_absmax);
    q->codes = NULL;
    q->absmax = NULL;
    q->qabsmax = NULL;
    q->nested_absmax = NULL;
}

static size_t codes_bytes(const qlora_qtensor *q) { return (size_t)((q->numel + 1) / 2); }

/* Allocates the storage of a laid-out q; on failure nothing stays allocated. */
static qlora_status alloc_storage(qlora_ctx *ctx, qlora_qtensor *q, int on_device) {
    qlora_status st = qlora_alloc(ctx, codes_bytes(q), on_device, QLORA_MEM_BASE_WEIGHTS, (void **)&q->codes);
    if (st == QLORA_OK && q->double_quant) {
        st = qlora_alloc(ctx, (size_t)q->nblocks, on_device, QLORA_MEM_QUANT_STATE, (void **)&q->qabsmax);
        if (st == QLORA_OK)
            st = qlora_alloc(ctx, (size_t)q->nested_nblocks * sizeof(float), on_device, QLORA_MEM_QUANT_STATE,
                             (void **)&q->nested_absmax);
    } else if (st == QLORA_OK) {
        st = qlora_alloc(ctx, (size_t)q->nblocks * sizeof(float), on_device, QLORA_MEM_QUANT_STATE,
                         (void **)&q->absmax);
    }
    if (st != QLORA_OK) {
        ql_error_prefix("tensor '%s'", qtensor_label(q));
        qlora_qtensor_free(ctx, q);
    }
    return st;
}

size_t qlora_qtensor_nbytes(const qlora_qtensor *q) {
    if (!q)
        return 0;
    size_t scales = q->double_quant ? (size_t)q->nblocks + (size_t)q->nested_nblocks * sizeof(float)
                                    : (size_t)q->nblocks * sizeof(float);
    return codes_bytes(q) + scales;
}

/* A quantized tensor handed in by the caller must be internally consistent. */
static qlora_status check_qtensor(const char *fn, const qlora_qtensor *q) {
    const char *label = qtensor_label(q);
    qlora_quant_params p = {q->type, q->blocksize, q->double_quant};
    QL_CHECK(check_params(fn, label, &p));
    if (!is_compute_dtype(q->dtype))
        return ql_fail(QLORA_ERR_DTYPE, "%s: quantized tensor '%s' records original dtype %s (F32, F16 or BF16 "
                       "expected)", fn, label, qlora_dtype_name(q->dtype));
    if (q->numel < 0 || q->nblocks != ceil_div(q->numel, q->blocksize) ||
        q->nested_nblocks != (q->double_quant ? ceil_div(q->nblocks, QLORA_NESTED_BLOCKSIZE) : 0))
        return ql_fail(QLORA_ERR_SHAPE, "%s: quantized tensor '%s': numel %lld, nblocks %lld, nested_nblocks %lld "
                       "do not agree with blocksize %d", fn, label, (long long)q->numel, (long long)q->nblocks,
                       (long long)q->nested_nblocks, q->blocksize);
    int missing = !q->codes || (q->double_quant ? !q->qabsmax || !q->nested_absmax : !q->absmax);
    if (missing)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: quantized tensor '%s' has no storage (codes or scales are NULL)",
                       fn, label);
    return QLORA_OK;
}

static qlora_status check_device(const char *fn, qlora_ctx *ctx, const char *label, int device) {
    int want = qlora_ctx_device(ctx);
    if (device == want)
        return QLORA_OK;
    if (want == QLORA_DEVICE_HOST)
        return ql_fail(QLORA_ERR_DEVICE, "%s: tensor '%s' is on CUDA device %d but the context is CPU", fn, label,
                       device);
    if (device == QLORA_DEVICE_HOST)
        return ql_fail(QLORA_ERR_DEVICE, "%s: tensor '%s' is in host memory but the context computes on CUDA device "
                       "%d; copy it there first", fn, label, want);
    return ql_fail(QLORA_ERR_DEVICE, "%s: tensor '%s' is on CUDA device %d but the context computes on CUDA device %d",
                   fn, label, device, want);
}

/* ---- non-finite input: say which element, where, and what it is ---- */

static qlora_status read_element(qlora_ctx *ctx, const qlora_tensor *t, int64_t index, float *out) {
    size_t size = t->dtype == QLORA_F32 ? 4 : 2;
    unsigned char raw[4] = {0};
    const unsigned char *src = (const unsigned char *)t->data + (size_t)index * size;
    if (t->device == QLORA_DEVICE_HOST) {
        memcpy(raw, src, size);
    } else {
#ifdef QLORA_HAVE_CUDA
        QL_CHECK(ql_cuda_memcpy((ql_cuda_state *)ctx->cuda, raw, src, size));
#else
        (void)ctx;
        return ql_fail(QLORA_ERR_INTERNAL, "device tensor in a CPU-only build");
#endif
    }
    uint16_t h;
    memcpy(&h, raw, 2);
    if (t->dtype == QLORA_F32)
        memcpy(out, raw, 4);
    else
        *out = t->dtype == QLORA_BF16 ? ql_bf16_to_f32(h) : ql_f16_to_f32(h);
    return QLORA_OK;
}

static qlora_status non_finite_error(qlora_ctx *ctx, const char *fn, const qlora_tensor *t, int64_t index) {
    char where[32 + QLORA_MAX_DIMS * 24] = "";
    if (t->ndim == 2) {
        snprintf(where, sizeof where, " (row %lld, col %lld)", (long long)(index / t->shape[1]),
                 (long long)(index % t->shape[1]));
    } else if (t->ndim > 2) {
        int64_t coord[QLORA_MAX_DIMS], rest = index;
        for (int d = t->ndim - 1; d >= 0; d--) {
            coord[d] = rest % t->shape[d];
            rest /= t->shape[d];
        }
        size_t len = (size_t)snprintf(where, sizeof where, " (index [");
        for (int d = 0; d < t->ndim; d++)
            len += (size_t)snprintf(where + len, sizeof where - len, d ? ", %lld" : "%lld", (long long)coord[d]);
        snprintf(where + len, sizeof where - len, "])");
    }
    float v = NAN;
    const char *what = "NaN or Inf";
    if (read_element(ctx, t, index, &v) == QLORA_OK)
        what = isnan(v) ? "NaN" : v > 0 ? "+Inf" : "-Inf";
    return ql_fail(QLORA_ERR_NON_FINITE, "%s: tensor '%s' has %s at element %lld%s; only finite values can be "
                   "quantized", fn, ql_tensor_label(t, "(unnamed)"), what, (long long)index, where);
}

/* ---- quantize ---- */

/* Host data straight from a file mapping may be unaligned for its dtype: then *in reads an
 * aligned copy, *copy, which the caller frees. */
static qlora_status aligned_input(qlora_ctx *ctx, const qlora_tensor *src, int64_t numel, qlora_tensor *in,
                                  void **copy) {
    *in = *src;
    *copy = NULL;
    size_t elem = src->dtype == QLORA_F32 ? 4 : 2;
    if (src->device != QLORA_DEVICE_HOST || numel == 0 || (uintptr_t)src->data % elem == 0)
        return QLORA_OK;
    QL_CHECK(qlora_alloc(ctx, (size_t)numel * elem, 0, QLORA_MEM_WORKSPACE, copy));
    in->data = memcpy(*copy, src->data, (size_t)numel * elem);
    return QLORA_OK;
}

/* Runs the kernels; absmax is float32 scratch or q->absmax. Returns the first non-finite index
 * through *bad (-1 if none). */
static qlora_status run_quantize(qlora_ctx *ctx, const qlora_tensor *src, qlora_qtensor *q, float *absmax,
                                 int64_t *bad) {
    const float *dyn = q->nested_code;
#ifdef QLORA_HAVE_CUDA
    if (ctx->params.backend == QLORA_BACKEND_CUDA) {
        ql_cuda_state *cs = (ql_cuda_state *)ctx->cuda;
        QL_CHECK(ql_cuda_quantize_4bit(cs, src->data, src->dtype, q->numel, q->blocksize, q->type, q->codes, absmax,
                                       bad));
        if (*bad < 0 && q->double_quant)
            QL_CHECK(ql_cuda_double_quant(cs, absmax, q->nblocks, dyn, q->qabsmax, q->nested_absmax,
                                          &q->nested_offset));
        return QLORA_OK;
    }
#endif
    if (ctx->params.cpu_kernels == QLORA_CPU_REFERENCE) {
        *bad = ql_quant4_ref(src->data, src->dtype, q->numel, q->blocksize, q->type, q->codes, absmax);
        if (*bad < 0 && q->double_quant)
            q->nested_offset = ql_double_quant_ref(absmax, q->nblocks, dyn, q->qabsmax, q->nested_absmax);
    } else {
        int threads = ctx->params.num_threads;
        *bad = ql_quant4_fast(src->data, src->dtype, q->numel, q->blocksize, q->type, q->codes, absmax, threads);
        if (*bad < 0 && q->double_quant)
            q->nested_offset = ql_double_quant_fast(absmax, q->nblocks, dyn, q->qabsmax, q->nested_absmax, threads);
    }
    return QLORA_OK;
}

qlora_status qlora_quantize(qlora_ctx *ctx, const qlora_tensor *src, const qlora_quant_params *params,
                            qlora_qtensor *out) {
    static const char fn[] = "qlora_quantize";
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(src != NULL, "src");
    QL_REQUIRE_ARG(out != NULL, "out");
    memset(out, 0, sizeof *out); /* on any failure out holds no storage */
    qlora_quant_params p = params ? *params : qlora_quant_default_params();
    const char *label = ql_tensor_label(src, "(unnamed)");
    QL_CHECK(check_device(fn, ctx, label, src->device));
    QL_CHECK(set_layout(fn, out, src->name, src->ndim, src->shape, src->dtype, &p, qlora_ctx_device(ctx)));
    if (out->numel > 0 && !src->data) {
        memset(out, 0, sizeof *out);
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: tensor '%s' has no data", fn, label);
    }
    QL_CHECK(alloc_storage(ctx, out, 1));
    qlora_tensor in;
    void *aligned;
    qlora_status st = aligned_input(ctx, src, out->numel, &in, &aligned);
    float *absmax = out->absmax;
    if (st == QLORA_OK && out->double_quant) /* the float32 scales live until double-quantized */
        st = qlora_alloc(ctx, (size_t)out->nblocks * sizeof(float), 1, QLORA_MEM_WORKSPACE, (void **)&absmax);
    int64_t bad = -1;
    if (st == QLORA_OK)
        st = run_quantize(ctx, &in, out, absmax, &bad);
    if (st == QLORA_OK && bad >= 0)
        st = non_finite_error(ctx, fn, &in, bad);
    if (absmax != out->absmax)
        qlora_free(ctx, absmax);
    qlora_free(ctx, aligned);
    if (st != QLORA_OK) {
        qlora_qtensor_free(ctx, out);
        memset(out, 0, sizeof *out);
    }
    return st;
}

/* ---- the double quant offset alone ---- */

qlora_status qlora_quant_offset(qlora_ctx *ctx, const qlora_tensor *src, const qlora_quant_params *params,
                                float *offset) {
    static const char fn[] = "qlora_quant_offset";
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(src != NULL, "src");
    QL_REQUIRE_ARG(offset != NULL, "offset");
    *offset = 0.0f;
    qlora_quant_params p = params ? *params : qlora_quant_default_params();
    const char *label = ql_tensor_label(src, "(unnamed)");
    QL_CHECK(check_device(fn, ctx, label, src->device));
    qlora_qtensor layout; /* the same checks of dtype, params and shape as qlora_quantize */
    QL_CHECK(set_layout(fn, &layout, src->name, src->ndim, src->shape, src->dtype, &p, qlora_ctx_device(ctx)));
    if (layout.numel > 0 && !src->data)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: tensor '%s' has no data", fn, label);
    if (!p.double_quant || layout.numel == 0) /* qlora_quantize stores 0 then */
        return QLORA_OK;
#ifdef QLORA_HAVE_CUDA
    if (ctx->params.backend == QLORA_BACKEND_CUDA) {
        /* No absmax-only kernel on the GPU: quantize into a temporary, which costs about one read
         * of src there, and keep its offset. */
        qlora_qtensor tmp;
        QL_CHECK(qlora_quantize(ctx, src, &p, &tmp));
        *offset = tmp.nested_offset;
        qlora_qtensor_free(ctx, &tmp);
        return QLORA_OK;
    }
#endif
    qlora_tensor in;
    void *aligned;
    float *absmax = NULL;
    qlora_status st = aligned_input(ctx, src, layout.numel, &in, &aligned);
    if (st == QLORA_OK)
        st = qlora_alloc(ctx, (size_t)layout.nblocks * sizeof(float), 1, QLORA_MEM_WORKSPACE, (void **)&absmax);
    if (st == QLORA_OK) {
        int64_t bad;
        float mean;
        if (ctx->params.cpu_kernels == QLORA_CPU_REFERENCE) {
            bad = ql_block_absmax_ref(in.data, in.dtype, layout.numel, p.blocksize, absmax);
            mean = bad < 0 ? ql_absmax_mean_ref(absmax, layout.nblocks) : 0.0f;
        } else {
            int threads = ctx->params.num_threads;
            bad = ql_block_absmax_fast(in.data, in.dtype, layout.numel, p.blocksize, absmax, threads);
            mean = bad < 0 ? ql_absmax_mean_fast(absmax, layout.nblocks, threads) : 0.0f;
        }
        if (bad >= 0)
            st = non_finite_error(ctx, fn, &in, bad);
        else
            *offset = mean;
    }
    qlora_free(ctx, absmax);
    qlora_free(ctx, aligned);
    return st;
}

/* ---- dequantize ---- */

qlora_status qlora_dequantize(qlora_ctx *ctx, const qlora_qtensor *q, qlora_tensor *dst) {
    static const char fn[] = "qlora_dequantize";
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(q != NULL, "q");
    QL_REQUIRE_ARG(dst != NULL, "dst");
    QL_CHECK(check_qtensor(fn, q));
    const char *label = ql_tensor_label(dst, "(unnamed)");
    if (!is_compute_dtype(dst->dtype))
        return ql_fail(QLORA_ERR_DTYPE, "%s: output tensor '%s' is %s; dequantization writes F32, F16 or BF16", fn,
                       label, qlora_dtype_name(dst->dtype));
    int64_t n = qlora_tensor_numel(dst);
    if (n != q->numel)
        return ql_fail(QLORA_ERR_SHAPE, "%s: output tensor '%s' has %lld elements but quantized tensor '%s' has %lld",
                       fn, label, (long long)n, qtensor_label(q), (long long)q->numel);
    QL_CHECK(check_device(fn, ctx, qtensor_label(q), q->device));
    QL_CHECK(check_device(fn, ctx, label, dst->device));
    if (n > 0 && !dst->data)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: output tensor '%s' has no data", fn, label);
    if ((uintptr_t)dst->data % (dst->dtype == QLORA_F32 ? 4 : 2) != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: output tensor '%s': data %p is not aligned for %s", fn, label,
                       dst->data, qlora_dtype_name(dst->dtype));
#ifdef QLORA_HAVE_CUDA
    if (ctx->params.backend == QLORA_BACKEND_CUDA)
        return ql_cuda_dequantize_4bit((ql_cuda_state *)ctx->cuda, q, dst->data, dst->dtype);
#endif
    if (ctx->params.cpu_kernels != QLORA_CPU_REFERENCE) {
        ql_dequant4_fast(q->codes, q->absmax, q->double_quant ? q->qabsmax : NULL, q->nested_absmax,
                         q->nested_offset, q->nested_code, q->code, n, q->blocksize, dst->data, dst->dtype,
                         ctx->params.num_threads);
        return QLORA_OK;
    }
    const float *absmax = q->absmax;
    float *decoded = NULL;
    if (q->double_quant) {
        QL_CHECK(qlora_alloc(ctx, (size_t)q->nblocks * sizeof(float), 1, QLORA_MEM_WORKSPACE, (void **)&decoded));
        ql_double_dequant_ref(q->qabsmax, q->nested_absmax, q->nested_offset, q->nested_code, q->nblocks, decoded);
        absmax = decoded;
    }
    ql_dequant4_ref(q->codes, absmax, q->code, n, q->blocksize, dst->data, dst->dtype);
    qlora_free(ctx, decoded);
    return QLORA_OK;
}

/* ---- storage for loading, and copies between devices ---- */

qlora_status qlora_qtensor_alloc(qlora_ctx *ctx, qlora_qtensor *q, const char *name, int ndim, const int64_t *shape,
                                 qlora_dtype dtype, const qlora_quant_params *params, int on_device) {
    static const char fn[] = "qlora_qtensor_alloc";
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(q != NULL, "q");
    qlora_quant_params p = params ? *params : qlora_quant_default_params();
    int device = on_device ? qlora_ctx_device(ctx) : QLORA_DEVICE_HOST;
    qlora_status st = set_layout(fn, q, name, ndim, shape, dtype, &p, device);
    if (st == QLORA_OK)
        st = alloc_storage(ctx, q, on_device);
    if (st != QLORA_OK)
        memset(q, 0, sizeof *q);
    return st;
}

static qlora_status copy_bytes(qlora_ctx *ctx, void *dst, int dst_device, const void *src, int src_device,
                               size_t bytes) {
    qlora_tensor d, s;
    int64_t shape[1] = {(int64_t)bytes};
    QL_CHECK(qlora_tensor_init(&d, "dst", QLORA_U8, 1, shape, dst, dst_device));
    QL_CHECK(qlora_tensor_init(&s, "src", QLORA_U8, 1, shape, (void *)src, src_device));
    return qlora_tensor_copy(ctx, &d, &s);
}

qlora_status qlora_qtensor_copy(qlora_ctx *ctx, qlora_qtensor *dst, const qlora_qtensor *src, int on_device) {
    static const char fn[] = "qlora_qtensor_copy";
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(dst != NULL, "dst");
    QL_REQUIRE_ARG(src != NULL, "src");
    QL_REQUIRE_ARG(dst != src, "dst != src");
    QL_CHECK(check_qtensor(fn, src));
    *dst = *src;
    dst->codes = NULL;
    dst->absmax = NULL;
    dst->qabsmax = NULL;
    dst->nested_absmax = NULL;
    dst->device = on_device ? qlora_ctx_device(ctx) : QLORA_DEVICE_HOST;
    qlora_status st = alloc_storage(ctx, dst, on_device);
    if (st != QLORA_OK) {
        memset(dst, 0, sizeof *dst);
        return st;
    }
    st = copy_bytes(ctx, dst->codes, dst->device, src->codes, src->device, codes_bytes(src));
    if (st == QLORA_OK && src->double_quant) {
        st = copy_bytes(ctx, dst->qabsmax, dst->device, src->qabsmax, src->device, (size_t)src->nblocks);
        if (st == QLORA_OK)
            st = copy_bytes(ctx, dst->nested_absmax, dst->device, src->nested_absmax, src->device,
                            (size_t)src->nested_nblocks * sizeof(float));
    } else if (st == QLORA_OK) {
        st = copy_bytes(ctx, dst->absmax, dst->device, src->absmax, src->device, (size_t)src->nblocks * sizeof(float));
    }
    if (st != QLORA_OK) {
        ql_error_prefix("%s: tensor '%s'", fn, qtensor_label(src));
        qlora_qtensor_free(ctx, dst);
        memset(dst, 0, sizeof *dst);
    }
    return st;
}
