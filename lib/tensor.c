/* Tensor descriptors: shape bookkeeping, allocation through the tracked allocator, copies. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#endif

void ql_copy_name(char *dst, const char *src) {
    if (!src)
        src = "";
    snprintf(dst, QLORA_NAME_MAX, "%s", src);
}

const char *ql_tensor_label(const qlora_tensor *t, const char *fallback) {
    return t && t->name[0] ? t->name : fallback;
}

qlora_status qlora_tensor_init(qlora_tensor *t, const char *name, qlora_dtype dtype, int ndim, const int64_t *shape,
                               void *data, int device) {
    QL_REQUIRE_ARG(t != NULL, "t");
    memset(t, 0, sizeof *t);
    ql_copy_name(t->name, name);
    if (qlora_dtype_bits(dtype) == 0)
        return ql_fail(QLORA_ERR_DTYPE, "tensor '%s': invalid dtype %d", t->name, (int)dtype);
    if (ndim < 0 || ndim > QLORA_MAX_DIMS)
        return ql_fail(QLORA_ERR_SHAPE, "tensor '%s': %d dimensions (at most %d)", t->name, ndim, QLORA_MAX_DIMS);
    if (ndim > 0 && !shape)
        return ql_fail(QLORA_ERR_INVALID_ARG, "tensor '%s': shape is NULL for %d dimensions", t->name, ndim);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return ql_fail(QLORA_ERR_SHAPE, "tensor '%s': dimension %d is negative (%lld)", t->name, i,
                           (long long)shape[i]);
        t->shape[i] = shape[i];
    }
    t->dtype = dtype;
    t->ndim = ndim;
    t->data = data;
    t->device = device;
    return QLORA_OK;
}

int64_t qlora_tensor_numel(const qlora_tensor *t) {
    if (!t)
        return 0;
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] != 0 && n > INT64_MAX / t->shape[i])
            return -1; /* overflow */
        n *= t->shape[i];
    }
    return n;
}

size_t qlora_tensor_nbytes(const qlora_tensor *t) {
    int overflow;
    size_t n = ql_dtype_nbytes(t ? t->dtype : QLORA_F32, qlora_tensor_numel(t), &overflow);
    return overflow ? 0 : n;
}

qlora_status qlora_tensor_alloc(qlora_ctx *ctx, qlora_tensor *t, int on_device, qlora_mem_category category) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(t != NULL, "t");
    int overflow;
    size_t bytes = ql_dtype_nbytes(t->dtype, qlora_tensor_numel(t), &overflow);
    if (overflow)
        return ql_fail(QLORA_ERR_SHAPE, "tensor '%s': size overflows", t->name);
    QL_CHECK(qlora_alloc(ctx, bytes, on_device, category, &t->data));
    t->device = on_device ? qlora_ctx_device(ctx) : QLORA_DEVICE_HOST;
    return QLORA_OK;
}

void qlora_tensor_free(qlora_ctx *ctx, qlora_tensor *t) {
    if (!t)
        return;
    qlora_free(ctx, t->data);
    t->data = NULL;
}

qlora_status qlora_tensor_copy(qlora_ctx *ctx, qlora_tensor *dst, const qlora_tensor *src) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(dst != NULL, "dst");
    QL_REQUIRE_ARG(src != NULL, "src");
    if (dst->dtype != src->dtype)
        return ql_fail(QLORA_ERR_DTYPE, "qlora_tensor_copy: '%s' is %s but '%s' is %s", ql_tensor_label(dst, "dst"),
                       qlora_dtype_name(dst->dtype), ql_tensor_label(src, "src"), qlora_dtype_name(src->dtype));
    if (qlora_tensor_numel(dst) != qlora_tensor_numel(src))
        return ql_fail(QLORA_ERR_SHAPE, "qlora_tensor_copy: '%s' has %lld elements but '%s' has %lld",
                       ql_tensor_label(dst, "dst"), (long long)qlora_tensor_numel(dst), ql_tensor_label(src, "src"),
                       (long long)qlora_tensor_numel(src));
    size_t bytes = qlora_tensor_nbytes(src);
    if (bytes == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(dst->data != NULL, "dst->data");
    QL_REQUIRE_ARG(src->data != NULL, "src->data");
    if (dst->device == QLORA_DEVICE_HOST && src->device == QLORA_DEVICE_HOST) {
        memmove(dst->data, src->data, bytes);
        return QLORA_OK;
    }
    int dev = qlora_ctx_device(ctx);
    if ((dst->device != QLORA_DEVICE_HOST && dst->device != dev) ||
        (src->device != QLORA_DEVICE_HOST && src->device != dev))
        return ql_fail(QLORA_ERR_DEVICE, "qlora_tensor_copy: '%s' (device %d) -> '%s' (device %d) is not reachable "
                       "from a context on device %d", ql_tensor_label(src, "src"), src->device,
                       ql_tensor_label(dst, "dst"), dst->device, dev);
#ifdef QLORA_HAVE_CUDA
    return ql_cuda_memcpy((ql_cuda_state *)ctx->cuda, dst->data, src->data, bytes);
#else
    return ql_fail(QLORA_ERR_INTERNAL, "qlora_tensor_copy: device tensor in a CPU-only build");
#endif
}

qlora_status ql_ctx_memcpy(qlora_ctx *ctx, void *dst, const void *src, size_t bytes) {
    if (bytes == 0)
        return QLORA_OK;
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda)
        return ql_cuda_memcpy((ql_cuda_state *)ctx->cuda, dst, src, bytes);
#else
    (void)ctx;
#endif
    memmove(dst, src, bytes);
    return QLORA_OK;
}

int ql_ctx_tensor_device(const qlora_ctx *ctx) {
    return ctx->cuda ? qlora_ctx_device(ctx) : QLORA_DEVICE_HOST;
}
