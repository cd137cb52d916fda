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

/* Y = X·Wᵀ (+ bias[N]) (+ beta·Y when beta = 1: accumulate). d_bias may be NULL. */
qlora_status ql_cuda_nf4_matmul(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_x, int64_t m,
                                const uint16_t *d_bias, float beta, uint16_t *d_y, ql_nf4_matmul_path path);
/* dX = dY·W  ([M, N]·[N, K] -> [M, K]), W dequantized on the fly (not transposed in memory);
 * beta = 1 accumulates into dX. */
qlora_status ql_cuda_nf4_matmul_dx(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_dy, int64_t m,
                                   float beta, uint16_t *d_dx, ql_nf4_matmul_path path);

/* out[M, K] = dropout(x) with keep probability 1 - p and scale 1/(1-p); mask element (i, k) uses
 * ql_philox_uniform(seed, stream, i*K + k) >= p (lib/philox.h) so CPU and GPU masks agree. */
qlora_status ql_cuda_dropout_bf16(ql_cuda_state *s, const uint16_t *d_x, int64_t m, int64_t k, float p,
                                  uint64_t seed, uint64_t stream, uint16_t *d_out);

/* C[M, N] = alpha · op(A) · op(B) + beta · C with BF16 A, B and C (or F32 C when c_f32), FP32
 * compute, row-major operands; trans_a/trans_b as in BLAS on the row-major views. */
qlora_status ql_cuda_gemm_bf16(ql_cuda_state *s, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                               float alpha, const uint16_t *d_a, const uint16_t *d_b, float beta, void *d_c,
                               int c_f32);

#ifdef __cplusplus
}
#endif
#endif
