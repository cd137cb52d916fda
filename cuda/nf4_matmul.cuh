/*
 * Private to the 4-bit matmul .cu files: the device view of a quantized weight W [N, K], the
 * tables every kernel needs, the per-block absmax decode, and the kernel launchers that
 * cuda/nf4_matmul.cu dispatches to. Arguments reaching these launchers are already validated.
 *
 * Layout facts the kernels rely on (bitsandbytes, see lib/quant4.h): W is one flat row-major
 * array cut into blocks of `blocksize` (a power of two >= 32), so element (n, k) has flat index
 * e = n*K + k, code nibble (e & 1 ? low : high) of byte e/2, and absmax block e >> log2(bs).
 * A run of 8 (or 32) elements starting at a multiple of 8 (or 32) never straddles two blocks.
 */
#ifndef QLORA_NF4_MATMUL_CUH
#define QLORA_NF4_MATMUL_CUH

#include <cuda_bf16.h>

#include "cuda_internal.cuh"
#include "linear_cuda.h"

/* Everything a kernel needs to decode W; passed by value. */
struct ql_nf4_weight {
    const uint8_t *codes;
    const float *absmax;   /* NULL when double quantized */
    const uint8_t *qabsmax; /* NULL unless double quantized */
    const float *nested;
    float offset;
    int64_t n, k;
    int log2_bs;
};

/* The 4-bit code book and the signed dynamic map (double quant), as kernel parameters. */
struct ql_nf4_tables {
    float code[16];
    float dyn[256];
};

/* The arguments of one Y = X·Wᵀ (or dX = dY·W) call after validation. */
struct ql_nf4_call {
    ql_nf4_weight w;
    ql_nf4_tables tab;
    const uint16_t *in;   /* X [m, K] (forward) or dY [m, N] (dX) */
    int64_t m;
    const uint16_t *bias; /* [N] or NULL; forward only */
    float beta;
    uint16_t *out;        /* Y [m, N] or dX [m, K] */
};

/* Decoded absmax of quant block b; with double quant dyn[q] * nested + offset, two float32
 * roundings exactly as lib/quant4_ref.c (no FMA contraction). */
__device__ __forceinline__ float ql_nf4_block_absmax(const ql_nf4_weight &w, int64_t b, const float *s_dyn) {
    if (w.qabsmax)
        return __fadd_rn(__fmul_rn(s_dyn[__ldg(w.qabsmax + b)], __ldg(w.nested + (b >> 8))), w.offset);
    return __ldg(w.absmax + b);
}

__device__ __forceinline__ float ql_bf16_bits_to_f32(uint32_t bits) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ uint16_t ql_f32_to_bf16_bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

/* The output rule shared by every path's epilogue: y = acc + bias[n] + beta * y_old in float32,
 * in that order, rounded once to bf16; y_old is not read when beta == 0. */
__device__ __forceinline__ uint16_t ql_linear_out(float acc, const uint16_t *bias, int64_t n, float beta,
                                                  const uint16_t *y_old) {
    float v = acc;
    if (bias)
        v = __fadd_rn(v, ql_bf16_bits_to_f32(__ldg(bias + n)));
    if (beta != 0.0f)
        v = __fadd_rn(v, __fmul_rn(beta, ql_bf16_bits_to_f32(*y_old)));
    return ql_f32_to_bf16_bits(v);
}

/* D = A·B + D with mma.sync m16n8k16 (sm_80+): A 16x16 bf16 row-major fragment a0..a3, B 16x8
 * bf16 fragment b0, b1, D 16x8 float32. Fragment layouts (PTX ISA, "mma.m16n8k16"), with
 * g = lane / 4 and t = lane % 4: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
 * a3 = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; d0, d1 = D[g][2t], D[g][2t+1],
 * d2, d3 = D[g+8][2t], D[g+8][2t+1]. The lower k of each pair is in the low 16 bits. */
__device__ __forceinline__ void ql_mma_bf16_16816(float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* cublasGemmEx on column-major operands (cuBLAS' own convention): BF16 A and B, C of type
 * ctype (CUDA_R_16BF or CUDA_R_32F), FP32 compute, reduced-precision split-K reductions
 * disallowed so every sum stays in FP32 (cuda/lora_ops.cu). */
qlora_status ql_cublas_gemm(ql_cuda_state *s, cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k,
                            float alpha, const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, void *c,
                            cudaDataType_t ctype, int ldc);

/* Fills the tables from a validated qtensor. */
void ql_nf4_fill_tables(const qlora_qtensor *w, ql_nf4_tables *tab);

/* ---- cuda/nf4_gemv.cu: M <= 16 ----
 * Fast kernel when K % 32 == 0 and codes/X are suitably aligned, else a scalar-safe kernel.
 * row_groups: 16-row groups of W per CTA (1, 2 or 4), 0 = chosen by shape. */
int ql_nf4_gemv_fast_ok(const ql_nf4_call &c);
qlora_status ql_nf4_gemv_launch(ql_cuda_state *s, const ql_nf4_call &c, int row_groups);

/* ---- cuda/nf4_gemm_mma.cu: tensor-core GEMMs dequantizing W tiles in the main loop ---- */
int ql_nf4_mma_fwd_ok(const ql_nf4_call &c);
int ql_nf4_mma_dx_ok(const ql_nf4_call &c);
qlora_status ql_nf4_mma_fwd_launch(ql_cuda_state *s, const ql_nf4_call &c);
qlora_status ql_nf4_mma_dx_launch(ql_cuda_state *s, const ql_nf4_call &c);

#endif
