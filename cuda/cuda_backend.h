/*
 * The CUDA backend as seen from C host code: extern "C" launchers implemented in the .cu files of cuda/.
 * Only compiled in when QLORA_HAVE_CUDA is defined. Every function checks every CUDA/cuBLAS
 * return code and reports failures through ql_fail (QLORA_ERR_CUDA / QLORA_ERR_CUBLAS) with the
 * call, the error name and the file:line. Pointers named d_* are device memory.
 */
#ifndef QLORA_CUDA_BACKEND_H
#define QLORA_CUDA_BACKEND_H

#include "qlora.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ql_cuda_state ql_cuda_state;  /* device index, stream, cuBLAS handle */

int ql_cuda_device_count(void);
qlora_status ql_cuda_init(int device, ql_cuda_state **out);
void ql_cuda_destroy(ql_cuda_state *s);
/* Records the context owning s: buffers the backend keeps go through its tracked allocator. */
void ql_cuda_set_owner(ql_cuda_state *s, qlora_ctx *owner);
qlora_status ql_cuda_synchronize(ql_cuda_state *s);

qlora_status ql_cuda_malloc(ql_cuda_state *s, size_t bytes, void **out);
void ql_cuda_free(ql_cuda_state *s, void *ptr);
qlora_status ql_cuda_host_alloc(ql_cuda_state *s, size_t bytes, void **out);  /* pinned */
void ql_cuda_host_free(ql_cuda_state *s, void *ptr);
/* Copies on the context stream and waits for it; either side may be host or device. */
qlora_status ql_cuda_memcpy(ql_cuda_state *s, void *dst, const void *src, size_t bytes);
/* 1 if ptr is device memory (cudaPointerGetAttributes), 0 otherwise. */
int ql_cuda_is_device_pointer(const void *ptr);

/* ---- 4-bit quantization kernels (cuda/quant4.cu) ----
 * Bit-exact with the CPU reference (lib/quant4_ref.c): float32 absmax, multiply by the float32
 * reciprocal, strict '>' against float32 thresholds, all-zero block -> absmax 0 and code 7,
 * even element in the high nibble, odd tail padded with the zero code. */

/* d_x: n elements of dtype (F32/F16/BF16). Writes d_codes[(n+1)/2] and d_absmax[ceil(n/bs)].
 * *first_nonfinite = index of the first NaN/Inf element, or -1 (kernel-side flag, checked
 * after the launch). */
qlora_status ql_cuda_quantize_4bit(ql_cuda_state *s, const void *d_x, qlora_dtype dtype, int64_t n,
                                   int blocksize, qlora_quant_type type,
                                   uint8_t *d_codes, float *d_absmax, int64_t *first_nonfinite);
/* Double quantization of d_absmax[nblocks]: offset = canonical mean (see lib/quant4.h),
 * d_qabsmax[nblocks] = nearest code of the signed dynamic map for (absmax - offset) / nested,
 * d_nested_absmax[ceil(nblocks/256)]. *offset is written on the host. */
qlora_status ql_cuda_double_quant(ql_cuda_state *s, const float *d_absmax, int64_t nblocks,
                                  const float dynamic_map[256], uint8_t *d_qabsmax,
                                  float *d_nested_absmax, float *offset);
/* Dequantizes q (device storage) into d_out (F32/F16/BF16, q->numel elements); with double
 * quantization the absmax decode is fused into the same launch. */
qlora_status ql_cuda_dequantize_4bit(ql_cuda_state *s, const qlora_qtensor *q, void *d_out,
                                     qlora_dtype out_dtype);

/* ---- device memory as the driver sees it (cuda/mem_info.cu), for the memory accountant ----
 * cudaMemGetInfo on the state's device: free and total bytes of the whole device. */
qlora_status ql_cuda_mem_info(ql_cuda_state *s, size_t *free_bytes, size_t *total_bytes);

/* ---- streams, events and asynchronous copies (cuda/stream.cu), for the optimizer pager ----
 * Opaque handles to cudaStream_t / cudaEvent_t of the state's device. A NULL stream means the
 * context stream (never the legacy default stream). Destroy functions first wait for the work
 * that uses the handle; their failures are logged. */
typedef struct ql_cuda_stream ql_cuda_stream;
typedef struct ql_cuda_event ql_cuda_event;

qlora_status ql_cuda_stream_create(ql_cuda_state *s, ql_cuda_stream **out);   /* non-blocking */
void ql_cuda_stream_destroy(ql_cuda_state *s, ql_cuda_stream *stream);
qlora_status ql_cuda_stream_synchronize(ql_cuda_state *s, ql_cuda_stream *stream);
/* timing = 0 creates a cudaEventDisableTiming event (cheaper to record and wait for). */
qlora_status ql_cuda_event_create(ql_cuda_state *s, int timing, ql_cuda_event **out);
void ql_cuda_event_destroy(ql_cuda_state *s, ql_cuda_event *event);
qlora_status ql_cuda_event_record(ql_cuda_state *s, ql_cuda_event *event, ql_cuda_stream *stream);
/* Work queued on `stream` after this call waits for the event's latest record (none: no wait). */
qlora_status ql_cuda_stream_wait_event(ql_cuda_state *s, ql_cuda_stream *stream, ql_cuda_event *event);
/* Milliseconds between two completed timing events. */
qlora_status ql_cuda_event_elapsed_ms(ql_cuda_state *s, ql_cuda_event *start, ql_cuda_event *end, float *ms);
/* Queued on `stream`, not waited for: the host side must be pinned memory for the copy to be
 * asynchronous, and must stay untouched until the stream has passed it. */
qlora_status ql_cuda_memcpy_async(ql_cuda_state *s, ql_cuda_stream *stream, void *dst, const void *src,
                                  size_t bytes);
qlora_status ql_cuda_memset_async(ql_cuda_state *s, ql_cuda_stream *stream, void *d_dst, int value,
                                  size_t bytes);

/* ---- AdamW (cuda/adamw.cu) ----
 * Bit-identical to ql_adamw_update_ref (lib/adamw.h): the same float32 operations in the same
 * order, each explicitly rounded (no FMA contraction), the BF16 parameter rounded RNE. Queued on
 * the context stream, not waited for. d_param: BF16 [n]; d_master: F32 [n] or NULL (BF16-only);
 * d_grad: F32 or BF16 [n]; d_m, d_v: F32 [n]. */
struct ql_adamw_step;
qlora_status ql_cuda_adamw_update(ql_cuda_state *s, const struct ql_adamw_step *step, uint16_t *d_param,
                                  float *d_master, const void *d_grad, qlora_dtype grad_dtype, float *d_m,
                                  float *d_v, int64_t n);
/* Sum of squares of d_grad[n] (F32 or BF16) in double, in a fixed tree that depends only on n
 * and the dtype: the same bits run to run, equal to ql_grad_sumsq_ref within double rounding.
 * Waits for the result. *nonfinite (may be NULL) = 1 if any element is NaN/Inf. */
qlora_status ql_cuda_grad_sumsq(ql_cuda_state *s, const void *d_grad, qlora_dtype grad_dtype, int64_t n,
                                double *sumsq, int *nonfinite);

#ifdef __cplusplus
}
#endif
#endif
