/*
 * The CUDA backend state (device, stream, cuBLAS handle), memory and copies.
 *
 * Device memory comes from cudaMalloc, not the stream-ordered cudaMallocAsync: qlora_alloc
 * promises a pointer that any stream, host API or other library may use at once, while a
 * cudaMallocAsync pointer is only valid in stream order on the allocating stream. Frees first
 * wait for the context stream, so memory still read by queued kernels is never released early.
 */
#include "cuda_internal.cuh"

#include <stdlib.h>
#include <string.h>

#define QL_STRINGIFY_(...) #__VA_ARGS__
#define QL_STRINGIFY(...) QL_STRINGIFY_(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__
#define QL_BUILT_ARCHS QL_STRINGIFY(__CUDA_ARCH_LIST__)
#else
#define QL_BUILT_ARCHS "(unknown)"
#endif

static const char *short_file(const char *file) {
    const char *slash = strrchr(file, '/');
    return slash ? slash + 1 : file;
}

qlora_status ql_cuda_report(cudaError_t err, const char *call, const char *file, int line) {
    (void)cudaGetLastError();
    return ql_fail(QLORA_ERR_CUDA, "CUDA error %s (%d): %s; in %s at %s:%d", cudaGetErrorName(err), (int)err,
                   cudaGetErrorString(err), call, short_file(file), line);
}

qlora_status ql_cublas_report(cublasStatus_t st, const char *call, const char *file, int line) {
    return ql_fail(QLORA_ERR_CUBLAS, "cuBLAS error %s (%d): %s; in %s at %s:%d", cublasGetStatusName(st), (int)st,
                   cublasGetStatusString(st), call, short_file(file), line);
}

qlora_status ql_cuda_launch_report(const char *kernel, dim3 grid, dim3 block, const char *file, int line) {
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess)
        return QLORA_OK;
    return ql_fail(QLORA_ERR_CUDA, "CUDA error %s (%d): %s; launching %s<<<(%u,%u,%u), (%u,%u,%u)>>> at %s:%d",
                   cudaGetErrorName(err), (int)err, cudaGetErrorString(err), kernel, grid.x, grid.y, grid.z,
                   block.x, block.y, block.z, short_file(file), line);
}

/* Used only to ask the runtime whether this binary holds code for the device. */
__global__ void ql_probe_kernel(void) {}

int ql_cuda_device_count(void) {
    int n = 0;
    /* No driver or no GPU is a normal answer here (0), not a failure: nothing is reported. */
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

/* Releases whatever part of the state exists; failures are logged since nobody can act on them. */
static void release_state(ql_cuda_state *s) {
    if (s->stream && cudaStreamSynchronize(s->stream) != cudaSuccess)
        ql_log(QLORA_LOG_WARN, "ql_cuda_destroy: device %d: stream synchronize failed: %s", s->device,
               cudaGetErrorString(cudaGetLastError()));
    if (s->d_scratch && cudaFree(s->d_scratch) != cudaSuccess)
        ql_log(QLORA_LOG_WARN, "ql_cuda_destroy: device %d: cudaFree(scratch) failed: %s", s->device,
               cudaGetErrorString(cudaGetLastError()));
    if (s->cublas) {
        cublasStatus_t st = cublasDestroy(s->cublas);
        if (st != CUBLAS_STATUS_SUCCESS)
            ql_log(QLORA_LOG_WARN, "ql_cuda_destroy: device %d: cublasDestroy failed: %s", s->device,
                   cublasGetStatusName(st));
    }
    if (s->stream && cudaStreamDestroy(s->stream) != cudaSuccess)
        ql_log(QLORA_LOG_WARN, "ql_cuda_destroy: device %d: cudaStreamDestroy failed: %s", s->device,
               cudaGetErrorString(cudaGetLastError()));
    pthread_mutex_destroy(&s->scratch_lock);
    pthread_mutex_destroy(&s->workspace_lock);
    free(s);
}

extern "C" void ql_cuda_set_owner(ql_cuda_state *s, qlora_ctx *owner) {
    if (s)
        s->owner = owner;
}

static qlora_status check_kernel_image(int device) {
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, ql_probe_kernel);
    if (err == cudaSuccess)
        return QLORA_OK;
    (void)cudaGetLastError();
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    (void)cudaGetLastError();
    return ql_fail(QLORA_ERR_CUDA, "CUDA device %d (compute capability %d.%d) cannot run this libqlora: %s (%s); "
                   "it was built for CUDA architectures " QL_BUILT_ARCHS
                   "; rebuild with -DCMAKE_CUDA_ARCHITECTURES=%d%d",
                   device, major, minor, cudaGetErrorName(err), cudaGetErrorString(err), major, minor);
}

static qlora_status init_state(ql_cuda_state *s) {
    QL_CUDA_CHECK(cudaSetDevice(s->device));
    QL_CHECK(check_kernel_image(s->device));
    QL_CUDA_CHECK(cudaDeviceGetAttribute(&s->sm_count, cudaDevAttrMultiProcessorCount, s->device));
    QL_CUDA_CHECK(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking));
    QL_CUBLAS_CHECK(cublasCreate(&s->cublas));
    QL_CUBLAS_CHECK(cublasSetStream(s->cublas, s->stream));
    QL_CUDA_CHECK(cudaMalloc((void **)&s->d_scratch, sizeof(ql_cuda_scratch)));
    return QLORA_OK;
}

qlora_status ql_cuda_init(int device, ql_cuda_state **out) {
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    int count = ql_cuda_device_count();
    if (device < 0 || device >= count)
        return ql_fail(QLORA_ERR_DEVICE, "ql_cuda_init: CUDA device %d requested, %d visible", device, count);
    ql_cuda_state *s = (ql_cuda_state *)calloc(1, sizeof *s);
    if (!s)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "ql_cuda_init: out of host memory");
    s->device = device;
    if (pthread_mutex_init(&s->scratch_lock, NULL) != 0) {
        free(s);
        return ql_fail(QLORA_ERR_INTERNAL, "ql_cuda_init: pthread_mutex_init failed");
    }
    if (pthread_mutex_init(&s->workspace_lock, NULL) != 0) {
        pthread_mutex_destroy(&s->scratch_lock);
        free(s);
        return ql_fail(QLORA_ERR_INTERNAL, "ql_cuda_init: pthread_mutex_init failed");
    }
    s->workspace_cap = QL_CUDA_WORKSPACE_CAP_DEFAULT;
    qlora_status st;
    {
        ql_device_scope scope;
        st = scope.enter(device, __FILE__, __LINE__);
        if (st == QLORA_OK)
            st = init_state(s);
        if (st != QLORA_OK) {
            ql_error_prefix("creating the CUDA context on device %d", device);
            release_state(s);
        }
    }
    if (st != QLORA_OK)
        return st;
    *out = s;
    return QLORA_OK;
}

void ql_cuda_destroy(ql_cuda_state *s) {
    if (!s)
        return;
    ql_device_scope scope;
    if (scope.enter(s->device, __FILE__, __LINE__) != QLORA_OK)
        ql_log(QLORA_LOG_WARN, "ql_cuda_destroy: %s", qlora_last_error());
    release_state(s);
}

qlora_status ql_cuda_synchronize(ql_cuda_state *s) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return QLORA_OK;
}

qlora_status ql_cuda_malloc(ql_cuda_state *s, size_t bytes, void **out) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    QL_CUDA_ENTER(s);
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        size_t free_b = 0, total_b = 0;
        if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
            (void)cudaGetLastError();
        return ql_fail(QLORA_ERR_CUDA, "cudaMalloc(%zu bytes) on device %d failed: %s (%s); %zu of %zu bytes free",
                       bytes, s->device, cudaGetErrorName(err), cudaGetErrorString(err), free_b, total_b);
    }
    if ((uintptr_t)p % 256 != 0) {
        cudaFree(p);
        return ql_fail(QLORA_ERR_INTERNAL, "cudaMalloc returned %p, not 256-byte aligned", p);
    }
    *out = p;
    return QLORA_OK;
}

void ql_cuda_release(const ql_cuda_state *s, const cudaStream_t *sync_first, cudaError_t (*release)(void *),
                     void *handle, qlora_log_level level, const char *what) {
    ql_device_scope scope;
    if (scope.enter(s->device, __FILE__, __LINE__) != QLORA_OK) {
        ql_log(level, "%s(%p): %s", what, handle, qlora_last_error());
        return;
    }
    cudaError_t err = sync_first ? cudaStreamSynchronize(*sync_first) : cudaSuccess;
    if (err == cudaSuccess)
        err = release(handle);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        ql_log(level, "%s(%p) on device %d: %s (%s)", what, handle, s->device, cudaGetErrorName(err),
               cudaGetErrorString(err));
    }
}

void ql_cuda_free(ql_cuda_state *s, void *ptr) {
    if (!s || !ptr)
        return;
    ql_cuda_release(s, &s->stream, [](void *p) { return cudaFree(p); }, ptr, QLORA_LOG_ERROR, "ql_cuda_free");
}

qlora_status ql_cuda_host_alloc(ql_cuda_state *s, size_t bytes, void **out) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    QL_CUDA_ENTER(s);
    void *p = NULL;
    /* Portable: pinned for every CUDA context, not just this device's. */
    cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        return ql_fail(QLORA_ERR_CUDA, "cudaHostAlloc(%zu bytes, pinned) failed: %s (%s)", bytes,
                       cudaGetErrorName(err), cudaGetErrorString(err));
    }
    *out = p;
    return QLORA_OK;
}

void ql_cuda_host_free(ql_cuda_state *s, void *ptr) {
    if (!s || !ptr)
        return;
    /* a queued copy may still read it */
    ql_cuda_release(s, &s->stream, [](void *p) { return cudaFreeHost(p); }, ptr, QLORA_LOG_ERROR,
                    "ql_cuda_host_free");
}

qlora_status ql_cuda_memcpy(ql_cuda_state *s, void *dst, const void *src, size_t bytes) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (bytes == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(dst != NULL, "dst");
    QL_REQUIRE_ARG(src != NULL, "src");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s->stream));
    QL_CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return QLORA_OK;
}

int ql_cuda_is_device_pointer(const void *ptr) {
    if (!ptr)
        return 0;
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return attr.type == cudaMemoryTypeDevice;
}
