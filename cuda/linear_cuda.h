/*
 * CUDA launchers of the QLoRA linear layer (issue 3), called by lib/linear*.c. Row-major
 * everywhere: X [M, K] BF16, W [N, K] quantized (qlora_qtensor with device storage), Y [M, N]
 * BF16, LoRA A [r, K] and B [N, r] BF16. FP32 accumulation inside every kernel. All run on the
 * context stream; every CUDA/cuBLAS call is checked (QLORA_ERR_CUDA / QLORA_ERR_CUBLAS).
 */
#ifndef QLORA_LINEAR_CUDA_H
#define QLORA_LINEAR_CUDA_H

#include "cuda_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Which kernel computes a 4-bit matmul. AUTO picks by shape (a measured heuristic). */
typedef enum ql_nf4_matmul_path {
    QL_NF4_PATH_AUTO = 0,
    QL_NF4_PATH_GEMV = 1,        /* fused decode kernel, M <= 16 */
    QL_NF4_PATH_FUSED_MMA = 2,   /* tensor-core GEMM dequantizing W tiles in the main loop */
    QL_NF4_PATH_DEQUANT_CUBLAS = 3 /* dequantize into a reusable BF16 workspace + cublasGemmEx */
} ql_nf4_matmul_path;

/* Y = X·Wᵀ (+ bias[N]) (+ beta·Y; beta = 1 accumulates, beta = 0 never reads Y). d_bias may be
 * NULL. W: 2-D [N, K], NF4 or FP4, any blocksize, with or without double quantization, on the
 * state's device. Per output: y = acc + bias[n] + beta·y_old in float32, rounded once to BF16
 * (DEQUANT_CUBLAS with both bias and beta != 0 rounds bias + beta·y_old to BF16 first).
 * Weight values used: bf16_rn(code·absmax) (FUSED_MMA, DEQUANT_CUBLAS), code·absmax in float32
 * (GEMV scalar-safe kernel), bf16_rn(code)·absmax (GEMV fast kernel).
 * path: GEMV needs M <= 16 (else QLORA_ERR_INVALID_ARG); FUSED_MMA on a shape it cannot take
 * (K % 64 != 0, codes or X not 16-byte aligned) runs DEQUANT_CUBLAS; ql_cuda_nf4_resolve_path
 * says what will run. M == 0 does nothing. */
qlora_status ql_cuda_nf4_matmul(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_x, int64_t m,
                                const uint16_t *d_bias, float beta, uint16_t *d_y, ql_nf4_matmul_path path);
/* dX = dY·W  ([M, N]·[N, K] -> [M, K]), W dequantized on the fly (not transposed in memory);
 * beta = 1 accumulates into dX. path GEMV means AUTO here (there is no decode kernel for dX);
 * FUSED_MMA needs K % 64 == 0, N % 8 == 0 and 16-byte aligned codes and dY, else DEQUANT_CUBLAS. */
qlora_status ql_cuda_nf4_matmul_dx(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_dy, int64_t m,
                                   float beta, uint16_t *d_dx, ql_nf4_matmul_path path);

/* The path ql_cuda_nf4_matmul (dx = 0) or ql_cuda_nf4_matmul_dx (dx = 1) runs for these
 * arguments: AUTO resolved by the shape heuristic, unsupported shapes resolved to their
 * fallback. d_in is X (or dY); only its alignment is looked at. */
ql_nf4_matmul_path ql_cuda_nf4_resolve_path(const qlora_qtensor *w, const void *d_in, int64_t m, int dx,
                                            ql_nf4_matmul_path path);
/* The GEMV path with a forced number of 16-row groups of W per CTA (1, 2 or 4; 0 = by shape):
 * for the benchmark that measures the heuristic, and for tests reaching every variant. */
qlora_status ql_cuda_nf4_gemv_tuned(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_x, int64_t m,
                                    const uint16_t *d_bias, float beta, uint16_t *d_y, int row_groups);

/* The DEQUANT_CUBLAS path dequantizes W into a grow-only device workspace kept by the state,
 * in chunks of at most `cap` bytes (rows of W for the forward, column blocks for dX), so W is
 * never materialised whole when it is larger than the cap (default 128 MiB). The workspace is a
 * QLORA_MEM_WORKSPACE allocation of the owning context (the accountant counts it);
 * ql_cuda_workspace_bytes reports its size; ql_cuda_workspace_release frees it (after the stream
 * drains; qlora_ctx_free calls it). */
size_t ql_cuda_workspace_bytes(ql_cuda_state *s);
void ql_cuda_workspace_release(ql_cuda_state *s);
/* cap 0 restores the default; values under 64 KiB are raised to 64 KiB. */
void ql_cuda_set_workspace_cap(ql_cuda_state *s, size_t cap);

/* out[M, K] = dropout(x) with keep probability 1 - p and scale 1/(1-p); mask element (i, k) uses
 * ql_philox_uniform(seed, stream, i*K + k) >= p (lib/philox.h) so CPU and GPU masks agree.
 * Values: kept -> bf16_rn(x · scale) with scale = 1.0f / (1.0f - p) computed in float32, dropped
 * -> +0. 0 <= p < 1 (else QLORA_ERR_INVALID_ARG); p = 0 copies x. d_out may equal d_x. */
qlora_status ql_cuda_dropout_bf16(ql_cuda_state *s, const uint16_t *d_x, int64_t m, int64_t k, float p,
                                  uint64_t seed, uint64_t stream, uint16_t *d_out);
/* d_acc[M, K] += dropout(x) with the same mask and scale (the float sum rounded once to BF16):
 * the input gradient through a dropped adapter input, added to the rest of dX. */
qlora_status ql_cuda_dropout_add_bf16(ql_cuda_state *s, const uint16_t *d_x, int64_t m, int64_t k, float p,
                                      uint64_t seed, uint64_t stream, uint16_t *d_acc);

/* C[M, N] = alpha · op(A) · op(B) + beta · C with BF16 A, B and C (or F32 C when c_f32), FP32
 * compute, row-major operands; trans_a/trans_b as in BLAS on the row-major views: A is [M, K]
 * ([K, M] when trans_a), B is [K, N] ([N, K] when trans_b), all densely packed. beta = 0 does
 * not read C. m, n, k <= INT_MAX. */
qlora_status ql_cuda_gemm_bf16(ql_cuda_state *s, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                               float alpha, const uint16_t *d_a, const uint16_t *d_b, float beta, void *d_c,
                               int c_f32);

#ifdef __cplusplus
}
#endif
#endif
