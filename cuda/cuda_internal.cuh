/*
 * Private to the .cu files of cuda/: the backend state, the device scope every entry point opens, and the
 * checks wrapped around every CUDA runtime / cuBLAS call and kernel launch. A failed check
 * returns ql_fail(QLORA_ERR_CUDA or QLORA_ERR_CUBLAS, ...) naming the call, the error name and
 * string, and file:line, so a failure on a GPU machine is diagnosable from the message alone.
 */
#ifndef QLORA_CUDA_INTERNAL_CUH
#define QLORA_CUDA_INTERNAL_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "internal.h"
}
#include "cuda_backend.h"

/* Small device scratch owned by the state: one launcher call uses it at a time (scratch_lock),
 * and the stream orders the calls, so no allocation happens per launch. */
typedef struct ql_cuda_scratch {
    unsigned long long first_nonfinite; /* atomicMin target; all bits set = none found */
    float offset;                       /* double-quant mean, computed on the device */
} ql_cuda_scratch;

/* Default bound of the dequantize workspace: a Llama-7B MLP weight (11008 x 4096 BF16, 86 MiB)
 * is one chunk; a 70B one (28672 x 8192, 448 MiB) is four. */
#define QL_CUDA_WORKSPACE_CAP_DEFAULT ((size_t)128 << 20)

struct ql_cuda_state {
    int device;
    int sm_count;
    cudaStream_t stream;  /* non-blocking: never serialised against the legacy default stream */
    cublasHandle_t cublas; /* bound to stream */
    ql_cuda_scratch *d_scratch;
    pthread_mutex_t scratch_lock;
    /* The context that owns this state: device buffers the backend keeps (the workspace) are
     * allocated through its tracked allocator so the memory accountant sees them. */
    qlora_ctx *owner;
    /* Grow-only BF16 workspace of the dequantize + cuBLAS matmul path (cuda/nf4_matmul.cu): W is
     * dequantized into it chunk by chunk, at most workspace_cap bytes per chunk. A WORKSPACE
     * allocation of the owner; released by qlora_ctx_free before the allocator goes. One launcher
     * uses it at a time (workspace_lock), the stream orders the rest. */
    void *d_workspace;
    size_t workspace_bytes;
    size_t workspace_cap;
    pthread_mutex_t workspace_lock;
};

/* Builds the error for a failed call and clears the (non-sticky) last error so that the next
 * cudaGetLastError is not blamed on it. Returns QLORA_ERR_CUDA / QLORA_ERR_CUBLAS. */
qlora_status ql_cuda_report(cudaError_t err, const char *call, const char *file, int line);
qlora_status ql_cublas_report(cublasStatus_t st, const char *call, const char *file, int line);
/* After a launch: cudaGetLastError, reported with the kernel name and its launch shape. */
qlora_status ql_cuda_launch_report(const char *kernel, dim3 grid, dim3 block, const char *file, int line);

#define QL_CUDA_CHECK(call)                                                   \
    do {                                                                      \
        cudaError_t ql_cuda_err_ = (call);                                    \
        if (ql_cuda_err_ != cudaSuccess)                                      \
            return ql_cuda_report(ql_cuda_err_, #call, __FILE__, __LINE__);   \
    } while (0)

#define QL_CUBLAS_CHECK(call)                                                 \
    do {                                                                      \
        cublasStatus_t ql_cublas_st_ = (call);                                \
        if (ql_cublas_st_ != CUBLAS_STATUS_SUCCESS)                           \
            return ql_cublas_report(ql_cublas_st_, #call, __FILE__, __LINE__); \
    } while (0)

#define QL_CUDA_CHECK_LAUNCH(kernel, grid, block) \
    QL_CHECK(ql_cuda_launch_report((kernel), (grid), (block), __FILE__, __LINE__))

/* Makes the state's device current for the lifetime of the scope and restores the caller's
 * device afterwards, so libqlora never leaves a thread on a device it did not choose. */
class ql_device_scope {
  public:
    ql_device_scope() : previous_(-1) {}
    ~ql_device_scope() {
        if (previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess)
            (void)cudaGetLastError();
    }
    qlora_status enter(int device, const char *file, int line) {
        int current = -1;
        cudaError_t err = cudaGetDevice(&current);
        if (err != cudaSuccess)
            return ql_cuda_report(err, "cudaGetDevice(&current)", file, line);
        if (current == device)
            return QLORA_OK;
        err = cudaSetDevice(device);
        if (err != cudaSuccess)
            return ql_cuda_report(err, "cudaSetDevice(device)", file, line);
        previous_ = current;
        return QLORA_OK;
    }

  private:
    int previous_;
    ql_device_scope(const ql_device_scope &);
    ql_device_scope &operator=(const ql_device_scope &);
};

/* The body of the release functions (free, destroy), which cannot fail: on the state's device,
 * waits for *sync_first when given (queued work may still use the handle), releases the handle,
 * and logs a failure at `level` as "what(handle) ...". */
void ql_cuda_release(const ql_cuda_state *s, const cudaStream_t *sync_first, cudaError_t (*release)(void *),
                     void *handle, qlora_log_level level, const char *what);

#define QL_CUDA_ENTER(state)     \
    ql_device_scope ql_scope_;   \
    QL_CHECK(ql_scope_.enter((state)->device, __FILE__, __LINE__))

#endif
