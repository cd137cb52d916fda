/*
 * Tensor-core GEMMs that dequantize NF4/FP4 tiles of W inside the main loop (mma.sync
 * m16n8k16 bf16 -> f32; sm_80 and later, sm_90 included), so W never exists in BF16 in
 * device memory:
 *   forward  Y[M, N]  = X[M, K] · W[N, K]ᵀ  (+ bias) (+ beta·Y)
 *   dX       dX[M, K] = dY[M, N] · W[N, K]   (+ beta·dX)
 *
 * Both: CTA of 256 threads (8 warps as 2 x 4), output tile 128 x 128, warp tile 64 x 32
 * (4 x 4 mma tiles, 64 float accumulators per thread), reduction step 64. Per step a 4-stage
 * cp.async pipeline brings in the activation tile (16 KB BF16) and the packed codes of the
 * W tile (4 KB); then every thread decodes 32 codes (one 16-byte LDS) into the BF16 W tile in
 * shared memory, exactly as the dequantize kernel does (bf16_rn(code[c] * absmax), absmax with
 * the double-quant decode fused), so this path computes with the same weight values as
 * dequantize + cuBLAS. A and B fragments come from ldmatrix (.trans for dX, where the
 * reduction runs along W's rows). Shared tiles use a 16-byte-chunk XOR swizzle (chunk ^ row%8),
 * so ldmatrix and the decode stores are free of bank conflicts.
 *
 * Requirements (else the dispatcher takes dequantize + cuBLAS): K % 64 == 0, codes and the
 * activation 16-byte aligned; for dX also N % 8 == 0. M and N (forward) are arbitrary: rows past
 * the end are zero-filled by cp.async and their outputs are not stored.
 */
#include "nf4_matmul.cuh"

#include <stdio.h>

namespace {

constexpr int kThreads = 256;
constexpr int kStages = 4;

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared, asynchronously; zero-filled when !valid (src must still be a valid
 * address, it is not read). */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

/* Element offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `row_chunks`
 * chunks (8 BF16) per row. */
template <int ROW_CHUNKS>
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * ROW_CHUNKS * 8 + ((chunk ^ (row & 7)) << 3);
}

/* Decodes the 32 codes of `words` (16 bytes, element 2j in the high nibble of byte j) with one
 * scale into four 16-byte chunks of 8 BF16, written at dst[chunk_offset(i)], i = 0..3. */
template <typename ChunkOffset>
__device__ __forceinline__ void decode32(uint4 words, float scale, const float *s_code, uint16_t *dst,
                                         ChunkOffset chunk_offset) {
    const uint32_t wv[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint32_t pair[4];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const uint32_t byte = wv[i] >> (8 * b);
            const float hi = __fmul_rn(s_code[(byte >> 4) & 0xfu], scale);
            const float lo = __fmul_rn(s_code[byte & 0xfu], scale);
            const __nv_bfloat162 h2 = __floats2bfloat162_rn(hi, lo); /* .x (low half) = lower k */
            pair[b] = *reinterpret_cast<const uint32_t *>(&h2);
        }
        *reinterpret_cast<uint4 *>(dst + chunk_offset(i)) = make_uint4(pair[0], pair[1], pair[2], pair[3]);
    }
}

/* The raw scale inputs of one decode run (loaded a step ahead), and their decode. */
struct scale_raw {
    uint32_t q;
    float f;
};

__device__ __forceinline__ scale_raw load_scale(const ql_nf4_weight &w, int64_t e, bool valid) {
    scale_raw r = {0u, 0.0f};
    if (!valid)
        return r;
    const int64_t b = e >> w.log2_bs;
    if (w.qabsmax) {
        r.q = __ldg(w.qabsmax + b);
        r.f = __ldg(w.nested + (b >> 8));
    } else {
        r.f = __ldg(w.absmax + b);
    }
    return r;
}

__device__ __forceinline__ float decode_scale(const ql_nf4_weight &w, scale_raw r, bool valid, const float *s_dyn) {
    if (!valid)
        return 0.0f; /* rows/columns past the end decode to zeros */
    return w.qabsmax ? __fadd_rn(__fmul_rn(s_dyn[r.q], r.f), w.offset) : r.f;
}

/* Stores a pair of adjacent outputs (columns c, c+1 of row `row` of a [rows, cols] BF16 matrix)
 * through the shared output rule; `pairs` says 32-bit stores are aligned. */
__device__ __forceinline__ void store_pair(uint16_t *out, int64_t cols, int64_t row, int64_t col, float v0, float v1,
                                           const uint16_t *bias, float beta, bool pairs) {
    uint16_t *p = out + row * cols + col;
    if (pairs && col + 1 < cols) {
        const uint32_t lo = ql_linear_out(v0, bias, col, beta, p);
        const uint32_t hi = ql_linear_out(v1, bias, col + 1, beta, p + 1);
        *reinterpret_cast<uint32_t *>(p) = lo | hi << 16;
        return;
    }
    if (col < cols)
        p[0] = ql_linear_out(v0, bias, col, beta, p);
    if (col + 1 < cols)
        p[1] = ql_linear_out(v1, bias, col + 1, beta, p + 1);
}

/* ------------------------------------------------------------------ forward */

constexpr int kFwdBM = 128, kFwdBN = 128, kFwdBK = 64;

struct fwd_smem {
    uint16_t x[kStages][kFwdBM * kFwdBK];       /* X tiles [m][k], swizzled */
    uint8_t codes[kStages][kFwdBN * kFwdBK / 2]; /* packed W rows, 32 bytes each */
    uint16_t w[kFwdBN * kFwdBK];                /* decoded W tile [n][k], swizzled */
    float code[16];
    float dyn[256];
};

__global__ void __launch_bounds__(kThreads, 2)
    nf4_mma_fwd_kernel(const ql_nf4_weight w, const __grid_constant__ ql_nf4_tables tab,
                       const uint16_t *__restrict__ x, int64_t m_rows, const uint16_t *__restrict__ bias, float beta,
                       uint16_t *__restrict__ y, int pairs) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    fwd_smem &sm = *reinterpret_cast<fwd_smem *>(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const int64_t K = w.k, N = w.n;
    const int64_t n0 = (int64_t)blockIdx.x * kFwdBN, m0 = (int64_t)blockIdx.y * kFwdBM;
    const int T = (int)(K / kFwdBK);

    if (tid < 16)
        sm.code[tid] = tab.code[tid];
    if (w.qabsmax)
        sm.dyn[tid] = tab.dyn[tid];

    /* This thread's decode run (and code chunk): row dr of the W tile, elements 32*dh.. of each step. */
    const int dr = tid >> 1, dh = tid & 1;
    const bool dvalid = n0 + dr < N;
    const int64_t de0 = (dvalid ? n0 + dr : 0) * K + 32 * dh;
    const uint8_t *code_src = w.codes + de0 / 2;

    /* This thread's X chunks: rows xr0 + 32i (i = 0..3), 16-byte chunk xkc; the swizzle of the
     * four rows is the same (32i % 8 == 0), so one base address serves all four. */
    const int xr0 = tid >> 3, xkc = tid & 7;
    const uint16_t *x_src = x + (m0 + xr0 < m_rows ? m0 + xr0 : 0) * K + 8 * xkc;
    const uint32_t x_dst = smem_addr(&sm.x[0][swz<8>(xr0, xkc)]);

    auto issue = [&](int kt) {
        const int st = kt % kStages;
        const int64_t k0 = (int64_t)kt * kFwdBK;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const bool ok = m0 + xr0 + 32 * i < m_rows;
            cp_async16(x_dst + (uint32_t)(st * kFwdBM * kFwdBK + 32 * i * kFwdBK) * 2,
                       ok ? x_src + 32 * i * K + k0 : x, ok);
        }
        cp_async16(smem_addr(&sm.codes[st][tid * 16]), code_src + k0 / 2, dvalid);
    };

    for (int kt = 0; kt < kStages - 1; kt++) {
        if (kt < T)
            issue(kt);
        cp_async_commit();
    }
    scale_raw next = load_scale(w, de0, dvalid && T > 0);

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[mi][ni][i] = 0.0f;

    for (int kt = 0; kt < T; kt++) {
        cp_async_wait<kStages - 2>(); /* step kt has landed (for this thread's copies) */
        __syncthreads();              /* ... for every thread's; and step kt-1's mma is done */
        if (kt + kStages - 1 < T)
            issue(kt + kStages - 1);
        cp_async_commit(); /* possibly empty: keeps the group count per step uniform */
        const int st = kt % kStages;
        const scale_raw cur = next;
        next = load_scale(w, de0 + (int64_t)(kt + 1) * kFwdBK, dvalid && kt + 1 < T);
        decode32(*reinterpret_cast<const uint4 *>(&sm.codes[st][tid * 16]), decode_scale(w, cur, dvalid, sm.dyn),
                 sm.code, sm.w, [&](int i) { return swz<8>(dr, 4 * dh + i); });
        __syncthreads();

#pragma unroll
        for (int kk = 0; kk < kFwdBK / 16; kk++) {
            /* All B fragments of the step, then one A fragment at a time: 12 live registers. */
            uint32_t b[4][2];
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                const int row = wn * 32 + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
                uint32_t r[4];
                ldmatrix_x4(r, smem_addr(&sm.w[swz<8>(row, 2 * kk + ((lane >> 3) & 1))]));
                b[2 * nj][0] = r[0];
                b[2 * nj][1] = r[1];
                b[2 * nj + 1][0] = r[2];
                b[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                uint32_t a[4];
                const int row = wm * 64 + mi * 16 + (lane & 15);
                ldmatrix_x4(a, smem_addr(&sm.x[st][swz<8>(row, 2 * kk + (lane >> 4))]));
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                    ql_mma_bf16_16816(acc[mi][ni], a[0], a[1], a[2], a[3], b[ni][0], b[ni][1]);
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t m = m0 + wm * 64 + mi * 16 + g + 8 * h;
            if (m >= m_rows)
                continue;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const int64_t n = n0 + wn * 32 + ni * 8 + 2 * t;
                store_pair(y, N, m, n, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], bias, beta, pairs != 0);
            }
        }
    }
}

/* ------------------------------------------------------------------ dX */

constexpr int kDxBM = 128, kDxBK = 128 /* output columns (k of W) */, kDxBN = 64 /* reduction (n) */;

struct dx_smem {
    uint16_t a[kStages][kDxBM * kDxBN];        /* dY tiles [m][n], swizzled */
    uint8_t codes[kStages][kDxBN * kDxBK / 2]; /* packed W rows, 64 bytes each */
    uint16_t w[kDxBN * kDxBK];                 /* decoded W tile [n][k], swizzled (16 chunks a row) */
    float code[16];
    float dyn[256];
};

__global__ void __launch_bounds__(kThreads, 2)
    nf4_mma_dx_kernel(const ql_nf4_weight w, const __grid_constant__ ql_nf4_tables tab,
                      const uint16_t *__restrict__ dy, int64_t m_rows, float beta, uint16_t *__restrict__ dx,
                      int pairs) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    dx_smem &sm = *reinterpret_cast<dx_smem *>(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wk = warp & 3;
    const int64_t K = w.k, N = w.n;
    const int64_t k0 = (int64_t)blockIdx.x * kDxBK, m0 = (int64_t)blockIdx.y * kDxBM;
    const int T = (int)((N + kDxBN - 1) / kDxBN);

    if (tid < 16)
        sm.code[tid] = tab.code[tid];
    if (w.qabsmax)
        sm.dyn[tid] = tab.dyn[tid];

    /* This thread's decode run: row dr of the W tile (n = n0 + dr), columns k0 + 32*dq .. +31. */
    const int dr = tid >> 2, dq = tid & 3;
    const bool col_ok = k0 + 32 * dq < K;
    auto run_valid = [&](int kt) { return col_ok && (int64_t)kt * kDxBN + dr < N; };
    auto run_e = [&](int kt) { return (run_valid(kt) ? ((int64_t)kt * kDxBN + dr) * K + k0 + 32 * dq : 0); };

    /* This thread's dY chunks: rows ar0 + 32i (i = 0..3), 16-byte chunk anc (as in the forward). */
    const int ar0 = tid >> 3, anc = tid & 7;
    const uint16_t *a_src = dy + (m0 + ar0 < m_rows ? m0 + ar0 : 0) * N + 8 * anc;
    const uint32_t a_dst = smem_addr(&sm.a[0][swz<8>(ar0, anc)]);

    auto issue = [&](int kt) {
        const int st = kt % kStages;
        const int64_t n0 = (int64_t)kt * kDxBN;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const bool ok = m0 + ar0 + 32 * i < m_rows && n0 + 8 * anc < N;
            cp_async16(a_dst + (uint32_t)(st * kDxBM * kDxBN + 32 * i * kDxBN) * 2,
                       ok ? a_src + 32 * i * N + n0 : dy, ok);
        }
        const bool ok = run_valid(kt);
        cp_async16(smem_addr(&sm.codes[st][tid * 16]), w.codes + run_e(kt) / 2, ok);
    };

    for (int kt = 0; kt < kStages - 1; kt++) {
        if (kt < T)
            issue(kt);
        cp_async_commit();
    }
    scale_raw next = load_scale(w, run_e(0), T > 0 && run_valid(0));

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[mi][ni][i] = 0.0f;

    for (int kt = 0; kt < T; kt++) {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        if (kt + kStages - 1 < T)
            issue(kt + kStages - 1);
        cp_async_commit();
        const int st = kt % kStages;
        const scale_raw cur = next;
        next = load_scale(w, run_e(kt + 1), kt + 1 < T && run_valid(kt + 1));
        decode32(*reinterpret_cast<const uint4 *>(&sm.codes[st][tid * 16]),
                 decode_scale(w, cur, run_valid(kt), sm.dyn), sm.code, sm.w,
                 [&](int i) { return swz<16>(dr, 4 * dq + i); });
        __syncthreads();

#pragma unroll
        for (int kk = 0; kk < kDxBN / 16; kk++) {
            uint32_t b[4][2];
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                const int nrow = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                uint32_t r[4];
                ldmatrix_x4_trans(r, smem_addr(&sm.w[swz<16>(nrow, wk * 4 + nj * 2 + (lane >> 4))]));
                b[2 * nj][0] = r[0];
                b[2 * nj][1] = r[1];
                b[2 * nj + 1][0] = r[2];
                b[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                uint32_t a[4];
                const int row = wm * 64 + mi * 16 + (lane & 15);
                ldmatrix_x4(a, smem_addr(&sm.a[st][swz<8>(row, 2 * kk + (lane >> 4))]));
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                    ql_mma_bf16_16816(acc[mi][ni], a[0], a[1], a[2], a[3], b[ni][0], b[ni][1]);
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t m = m0 + wm * 64 + mi * 16 + g + 8 * h;
            if (m >= m_rows)
                continue;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const int64_t k = k0 + wk * 32 + ni * 8 + 2 * t;
                store_pair(dx, K, m, k, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], NULL, beta, pairs != 0);
            }
        }
    }
}

/* The grid of a tile kernel, after raising its dynamic shared memory limit. */
qlora_status prepare_tiles(const void *kernel, const char *name, size_t smem, int64_t tiles_x, int64_t tiles_y,
                           dim3 *grid) {
    if (tiles_x > 0x7fffffff || tiles_y > 65535)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: %lld x %lld tiles is too many for one launch", name,
                       (long long)tiles_x, (long long)tiles_y);
    QL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    *grid = dim3((unsigned)tiles_x, (unsigned)tiles_y);
    return QLORA_OK;
}

} // namespace

int ql_nf4_mma_fwd_ok(const ql_nf4_call &c) {
    return c.w.k > 0 && c.w.k % kFwdBK == 0 && (uintptr_t)c.w.codes % 16 == 0 && (uintptr_t)c.in % 16 == 0;
}

int ql_nf4_mma_dx_ok(const ql_nf4_call &c) {
    return c.w.k > 0 && c.w.k % 64 == 0 && c.w.n % 8 == 0 && (uintptr_t)c.w.codes % 16 == 0 &&
           (uintptr_t)c.in % 16 == 0;
}

qlora_status ql_nf4_mma_fwd_launch(ql_cuda_state *s, const ql_nf4_call &c) {
    dim3 grid;
    const dim3 block(kThreads);
    const size_t smem = sizeof(fwd_smem);
    QL_CHECK(prepare_tiles((const void *)nf4_mma_fwd_kernel, "nf4_mma_fwd_kernel", smem,
                           (c.w.n + kFwdBN - 1) / kFwdBN, (c.m + kFwdBM - 1) / kFwdBM, &grid));
    const int pairs = (uintptr_t)c.out % 4 == 0 && c.w.n % 2 == 0;
    nf4_mma_fwd_kernel<<<grid, block, smem, s->stream>>>(c.w, c.tab, c.in, c.m, c.bias, c.beta, c.out, pairs);
    QL_CUDA_CHECK_LAUNCH("nf4_mma_fwd_kernel", grid, block);
    return QLORA_OK;
}

qlora_status ql_nf4_mma_dx_launch(ql_cuda_state *s, const ql_nf4_call &c) {
    dim3 grid;
    const dim3 block(kThreads);
    const size_t smem = sizeof(dx_smem);
    QL_CHECK(prepare_tiles((const void *)nf4_mma_dx_kernel, "nf4_mma_dx_kernel", smem,
                           (c.w.k + kDxBK - 1) / kDxBK, (c.m + kDxBM - 1) / kDxBM, &grid));
    const int pairs = (uintptr_t)c.out % 4 == 0 && c.w.k % 2 == 0;
    nf4_mma_dx_kernel<<<grid, block, smem, s->stream>>>(c.w, c.tab, c.in, c.m, c.beta, c.out, pairs);
    QL_CUDA_CHECK_LAUNCH("nf4_mma_dx_kernel", grid, block);
    return QLORA_OK;
}
