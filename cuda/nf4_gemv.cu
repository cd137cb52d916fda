/*
 * Y[M, N] = X[M, K] · W[N, K]ᵀ for M <= 16 (generation): a skinny tensor-core GEMM that reads
 * every packed weight byte exactly once and is meant to run at HBM bandwidth.
 *
 * Why tensor cores at M = 1: on CUDA cores every weight costs a table lookup plus one FMA per
 * row of X; from M = 4 on that is more issue slots than an H100 SM has per byte of HBM
 * bandwidth. With mma.sync the multiply-accumulate of all M <= 16 rows is one instruction per
 * 16x8x16 tile, and a weight costs only its decode (~1.5 instructions).
 *
 * Layout of the work (fast kernel, K % 32 == 0):
 *  - A CTA (8 warps) owns 16*RG rows of W; the KS = 8/RG warps of each 16-row group split K into
 *    interleaved rounds. A round is 4*CPT consecutive elements of each of the group's 16 rows,
 *    CPT = 16 (8-byte loads) when K % 64 == 0 and blocksize >= 64, else CPT = 8 (4-byte loads):
 *    either way a round of a row lies in one quant block, so its absmax is applied once, in
 *    float32, to the round's partial sums. (16-byte loads would give each lane 32 codes and a
 *    round two blocks per row; a warp's 8-byte load still fills whole 32-byte sectors.)
 *  - W is the mma A operand (rows = W rows g and g+8 of the lane's group g = lane/4), X the B
 *    operand (columns = X rows). K is permuted inside a round, identically for A and B (a dot
 *    product does not care about order): lane t = lane%4 owns the CPT consecutive elements
 *    starting at round*4*CPT + t*CPT, so its code loads are contiguous, its X loads are 16-byte
 *    loads of the same elements, and at mma step s its A pair registers are code bytes 2s, 2s+1.
 *  - Decode: a byte (two codes) indexes a 256-entry table of bf16 pairs {code[hi], code[lo]} in
 *    shared memory, replicated once per lane (entry v of lane l at word v*32 + l) so that a warp's
 *    32 random lookups never collide in a bank: two integer instructions and one LDS per byte.
 *    The code book values are rounded to bf16 (the absmax stays float32): the weight used is
 *    bf16(code) * absmax, relative error <= 2^-8, like the bf16 weight of the other paths.
 *  - The KS partial tiles are summed in shared memory in a fixed order (deterministic), then
 *    bias and beta are applied and Y is written as bf16.
 * Loads: weights with ld.global.nc.L1::no_allocate (streamed once), X through L1 (shared by the
 * RG row groups of a CTA). U rounds of loads are issued before the first is used.
 *
 * Anything else (K % 32 != 0, misaligned codes or X) takes a scalar-safe kernel: one warp per
 * row, per-element decode with the exact float32 weight, warp-shuffle reduction.
 */
#include "nf4_matmul.cuh"

#include <limits.h>
#include <stdio.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ uint32_t ld_stream_u32(const uint8_t *p) {
    uint32_t v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 ld_stream_u64(const uint8_t *p) {
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

/* CW 32-bit words of codes (CW = 1 or 2), zeros when !valid. */
template <int CW>
__device__ __forceinline__ void load_codes(uint32_t (&c)[CW], const uint8_t *p, bool valid) {
    if constexpr (CW == 2) {
        uint2 v = valid ? ld_stream_u64(p) : make_uint2(0u, 0u);
        c[0] = v.x;
        c[1] = v.y;
    } else {
        c[0] = valid ? ld_stream_u32(p) : 0u;
    }
}

/* XW 32-bit words (bf16 pairs) of one X row, XW = 4 or 8, zeros when !valid. */
template <int XW>
__device__ __forceinline__ void load_x(uint32_t (&r)[XW], const uint16_t *p, bool valid) {
#pragma unroll
    for (int i = 0; i < XW / 4; i++) {
        uint4 v = valid ? __ldg(reinterpret_cast<const uint4 *>(p) + i) : make_uint4(0u, 0u, 0u, 0u);
        r[4 * i] = v.x;
        r[4 * i + 1] = v.y;
        r[4 * i + 2] = v.z;
        r[4 * i + 3] = v.w;
    }
}

/* The bf16 pair of byte J of `word` from this lane's copy of the table (lut_lane: shared-window
 * address of the table + 4 * lane; entries 128 bytes apart): PRMT isolates the byte, one LEA
 * forms the address (a plain C++ pointer here costs a third instruction to add the window base
 * on sm_90). */
template <int J>
__device__ __forceinline__ uint32_t lut_pair(uint32_t lut_lane, uint32_t word) {
    const uint32_t byte = __byte_perm(word, 0u, 0x4440u | J);
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(lut_lane + (byte << 7)));
    return v;
}

template <int MT, int RG, int CPT, bool DQ>
__global__ void __launch_bounds__(kThreads, 2)
    nf4_skinny_kernel(const ql_nf4_weight w, const __grid_constant__ ql_nf4_tables tab, const uint16_t *__restrict__ x,
                      int m_rows, const uint16_t *__restrict__ bias, float beta, uint16_t *__restrict__ y) {
    constexpr int KS = kWarps / RG;    /* warps splitting K inside a 16-row group */
    constexpr int RW = 4 * CPT;        /* elements of a row per round */
    constexpr int U = MT == 1 ? 4 : 2; /* rounds in flight per batch */
    constexpr int STEPS = CPT / 4;     /* mma k16 steps per round */
    constexpr int CW = CPT / 8;        /* 32-bit code words per row per round */
    constexpr int XW = CPT / 2;        /* 32-bit X words per X row per round */
    static_assert(kThreads == 256, "s_dyn is filled one entry per thread");

    __shared__ __align__(16) uint32_t s_lut[256 * 32];
    __shared__ float s_dyn[256];
    __shared__ float s_red[kWarps][MT * 4][32];

    for (int i = threadIdx.x; i < 256 * 8; i += kThreads) {
        const int v = i >> 3;
        const uint32_t pair =
            (uint32_t)ql_f32_to_bf16_bits(tab.code[v >> 4]) | (uint32_t)ql_f32_to_bf16_bits(tab.code[v & 15]) << 16;
        reinterpret_cast<uint4 *>(s_lut)[i] = make_uint4(pair, pair, pair, pair);
    }
    if (DQ)
        s_dyn[threadIdx.x] = tab.dyn[threadIdx.x];
    __syncthreads();

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rg = warp / KS, ks = warp % KS;
    const int64_t K = w.k;
    const int64_t na = (int64_t)blockIdx.x * (16 * RG) + 16 * rg + g, nb = na + 8;
    const bool va = na < w.n, vb = nb < w.n;
    const int64_t ea = (va ? na : 0) * K, eb = (vb ? nb : 0) * K; /* flat index of the row starts */
    const uint8_t *row_a = w.codes + ea / 2, *row_b = w.codes + eb / 2;
    /* Offsets inside a row and block indices fit 32 bits (K < 2^31, fewer than 2^32 blocks): the
     * block of round r is blk + (off + r*RW) >> log2(bs), off = the row start inside its block. */
    const uint32_t bs_mask = (1u << w.log2_bs) - 1u;
    const uint32_t blk_a = (uint32_t)(ea >> w.log2_bs), off_a = (uint32_t)ea & bs_mask;
    const uint32_t blk_b = (uint32_t)(eb >> w.log2_bs), off_b = (uint32_t)eb & bs_mask;
    const float *scale_src = DQ ? w.nested : w.absmax;
    const uint16_t *x_row[MT];
    bool xv[MT];
#pragma unroll
    for (int j = 0; j < MT; j++) {
        const int m = 8 * j + g;
        xv[j] = m < m_rows;
        x_row[j] = x + (xv[j] ? m : 0) * K;
    }
    const uint32_t lut_lane = (uint32_t)__cvta_generic_to_shared(s_lut) + 4 * lane;
    const int rounds = (int)(K / RW);

    float acc[MT][4];
#pragma unroll
    for (int j = 0; j < MT; j++)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    for (int base = ks; base < rounds; base += KS * U) {
        uint32_t ca[U][CW], cb[U][CW];
        uint32_t xr[U][MT][XW];
        uint32_t qa[U], qb[U];
        float fa[U], fb[U];
        /* Issue every load of the batch first; nothing below waits on them until the decode. A
         * round past the end (warp-uniform) loads nothing and is skipped below. */
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int r = base + u * KS;
            const bool vr = r < rounds;
            const uint32_t kr = (uint32_t)r * RW, k0 = kr + (uint32_t)(t * CPT);
            load_codes<CW>(ca[u], row_a + (k0 >> 1), vr && va);
            load_codes<CW>(cb[u], row_b + (k0 >> 1), vr && vb);
            const uint32_t ba = blk_a + ((off_a + kr) >> w.log2_bs), bb = blk_b + ((off_b + kr) >> w.log2_bs);
            qa[u] = qb[u] = 0;
            fa[u] = fb[u] = 0.0f;
            if (vr) {
                if (DQ) {
                    qa[u] = __ldg(w.qabsmax + ba);
                    qb[u] = __ldg(w.qabsmax + bb);
                }
                fa[u] = __ldg(scale_src + (DQ ? ba >> 8 : ba));
                fb[u] = __ldg(scale_src + (DQ ? bb >> 8 : bb));
            }
#pragma unroll
            for (int j = 0; j < MT; j++)
                load_x<XW>(xr[u][j], x_row[j] + k0, vr && xv[j]);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (base + u * KS >= rounds) /* warp-uniform */
                break;
            float sa = fa[u], sb = fb[u];
            if (DQ) {
                sa = __fadd_rn(__fmul_rn(s_dyn[qa[u]], sa), w.offset);
                sb = __fadd_rn(__fmul_rn(s_dyn[qb[u]], sb), w.offset);
            }
            sa = va ? sa : 0.0f;
            sb = vb ? sb : 0.0f;
            float tmp[MT][4];
#pragma unroll
            for (int j = 0; j < MT; j++)
                tmp[j][0] = tmp[j][1] = tmp[j][2] = tmp[j][3] = 0.0f;
#pragma unroll
            for (int s = 0; s < STEPS; s++) {
                /* Code bytes 2s and 2s + 1 of each row: bytes 2(s&1), 2(s&1)+1 of word s/2. */
                const uint32_t wa = ca[u][s >> 1], wb = cb[u][s >> 1];
                uint32_t a0, a1, a2, a3;
                if (s & 1) {
                    a0 = lut_pair<2>(lut_lane, wa);
                    a2 = lut_pair<3>(lut_lane, wa);
                    a1 = lut_pair<2>(lut_lane, wb);
                    a3 = lut_pair<3>(lut_lane, wb);
                } else {
                    a0 = lut_pair<0>(lut_lane, wa);
                    a2 = lut_pair<1>(lut_lane, wa);
                    a1 = lut_pair<0>(lut_lane, wb);
                    a3 = lut_pair<1>(lut_lane, wb);
                }
#pragma unroll
                for (int j = 0; j < MT; j++)
                    ql_mma_bf16_16816(tmp[j], a0, a1, a2, a3, xr[u][j][2 * s], xr[u][j][2 * s + 1]);
            }
#pragma unroll
            for (int j = 0; j < MT; j++) {
                acc[j][0] = fmaf(tmp[j][0], sa, acc[j][0]);
                acc[j][1] = fmaf(tmp[j][1], sa, acc[j][1]);
                acc[j][2] = fmaf(tmp[j][2], sb, acc[j][2]);
                acc[j][3] = fmaf(tmp[j][3], sb, acc[j][3]);
            }
        }
    }

#pragma unroll
    for (int j = 0; j < MT; j++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            s_red[warp][4 * j + i][lane] = acc[j][i];
    __syncthreads();
    if (ks != 0)
        return;
    const int64_t N = w.n;
#pragma unroll
    for (int j = 0; j < MT; j++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float v = 0.0f;
#pragma unroll
            for (int q = 0; q < KS; q++)
                v += s_red[rg * KS + q][4 * j + i][lane];
            const int64_t n = i < 2 ? na : nb;
            const int m = 8 * j + 2 * t + (i & 1);
            if (n < N && m < m_rows)
                y[m * N + n] = ql_linear_out(v, bias, n, beta, y + m * N + n);
        }
    }
}

/* Scalar-safe path: one warp per row of W, lanes stride over K, the exact float32 weight
 * code[c] * absmax, FP32 accumulation per X row, warp-shuffle reduction. */
__global__ void __launch_bounds__(kThreads)
    nf4_gemv_scalar_kernel(const ql_nf4_weight w, const __grid_constant__ ql_nf4_tables tab,
                           const uint16_t *__restrict__ x, int m_rows, const uint16_t *__restrict__ bias, float beta,
                           uint16_t *__restrict__ y) {
    __shared__ float s_code[16];
    __shared__ float s_dyn[256];
    if (threadIdx.x < 16)
        s_code[threadIdx.x] = tab.code[threadIdx.x];
    if (w.qabsmax)
        s_dyn[threadIdx.x] = tab.dyn[threadIdx.x];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t n = (int64_t)blockIdx.x * kWarps + warp;
    if (n >= w.n)
        return;
    const int64_t K = w.k, N = w.n;
    float acc[16];
#pragma unroll
    for (int m = 0; m < 16; m++)
        acc[m] = 0.0f;
    for (int64_t k = lane; k < K; k += 32) {
        const int64_t e = n * K + k;
        const uint32_t byte = __ldg(w.codes + (e >> 1));
        const uint32_t nibble = (e & 1) ? byte & 0xfu : byte >> 4;
        const float wv = __fmul_rn(s_code[nibble], ql_nf4_block_absmax(w, e >> w.log2_bs, s_dyn));
#pragma unroll
        for (int m = 0; m < 16; m++)
            if (m < m_rows)
                acc[m] = fmaf(wv, ql_bf16_bits_to_f32(__ldg(x + m * K + k)), acc[m]);
    }
#pragma unroll
    for (int m = 0; m < 16; m++) {
        if (m < m_rows) {
#pragma unroll
            for (int d = 16; d > 0; d >>= 1)
                acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], d);
        }
    }
    if (lane != 0)
        return;
#pragma unroll
    for (int m = 0; m < 16; m++)
        if (m < m_rows)
            y[m * N + n] = ql_linear_out(acc[m], bias, n, beta, y + m * N + n);
}

typedef void (*skinny_fn)(const ql_nf4_weight, const ql_nf4_tables, const uint16_t *, int, const uint16_t *, float,
                          uint16_t *);

template <int MT, int CPT, bool DQ>
skinny_fn pick_rg(int rg) {
    switch (rg) {
    case 1: return nf4_skinny_kernel<MT, 1, CPT, DQ>;
    case 2: return nf4_skinny_kernel<MT, 2, CPT, DQ>;
    default: return nf4_skinny_kernel<MT, 4, CPT, DQ>;
    }
}

template <bool DQ>
skinny_fn pick_mt_cpt(int mt, int rg, int cpt) {
    if (mt == 1)
        return cpt == 16 ? pick_rg<1, 16, DQ>(rg) : pick_rg<1, 8, DQ>(rg);
    return cpt == 16 ? pick_rg<2, 16, DQ>(rg) : pick_rg<2, 8, DQ>(rg);
}

skinny_fn pick_skinny(int mt, int rg, int cpt, bool dq) {
    return dq ? pick_mt_cpt<true>(mt, rg, cpt) : pick_mt_cpt<false>(mt, rg, cpt);
}

/* 16-row groups per CTA. More groups share each X load among more rows (X traffic per weight
 * byte is ~M/(4*RG)), fewer give more CTAs. Estimate: the largest that still leaves two CTAs
 * per SM; to be re-measured on H100 with tools/gpu-check.sh bench (qlora-bench linear). */
int auto_row_groups(int64_t n, int sm_count) {
    for (int rg = 4; rg > 1; rg /= 2)
        if ((n + 16 * rg - 1) / (16 * rg) >= 2 * (int64_t)sm_count)
            return rg;
    return 1;
}

} // namespace

int ql_nf4_gemv_fast_ok(const ql_nf4_call &c) {
    /* The fast kernel's 32-bit in-row offsets and block indices bound K and the block count. */
    const bool fits = c.w.k <= ((int64_t)1 << 30) && ((c.w.n * c.w.k) >> c.w.log2_bs) < ((int64_t)1 << 32);
    return c.m <= 16 && fits && c.w.k % 32 == 0 && (uintptr_t)c.w.codes % 8 == 0 && (uintptr_t)c.in % 16 == 0;
}

qlora_status ql_nf4_gemv_launch(ql_cuda_state *s, const ql_nf4_call &c, int row_groups) {
    if (c.m < 1 || c.m > 16)
        return ql_fail(QLORA_ERR_INVALID_ARG, "NF4 GEMV: M = %lld, the decode kernel takes 1..16 rows",
                       (long long)c.m);
    if (row_groups != 0 && row_groups != 1 && row_groups != 2 && row_groups != 4)
        return ql_fail(QLORA_ERR_INVALID_ARG, "NF4 GEMV: row_groups %d is not 0 (auto), 1, 2 or 4", row_groups);
    char name[96];
    if (ql_nf4_gemv_fast_ok(c)) {
        const int rg = row_groups ? row_groups : auto_row_groups(c.w.n, s->sm_count);
        const int mt = c.m <= 8 ? 1 : 2;
        const int cpt = c.w.k % 64 == 0 && c.w.log2_bs >= 6 ? 16 : 8;
        const int64_t ctas = (c.w.n + 16 * rg - 1) / (16 * rg);
        if (ctas > INT_MAX)
            return ql_fail(QLORA_ERR_UNSUPPORTED, "NF4 GEMV: %lld rows is too many for one launch", (long long)c.w.n);
        const dim3 grid((unsigned)ctas), block(kThreads);
        const bool dq = c.w.qabsmax != NULL;
        pick_skinny(mt, rg, cpt, dq)<<<grid, block, 0, s->stream>>>(c.w, c.tab, c.in, (int)c.m, c.bias, c.beta,
                                                                    c.out);
        snprintf(name, sizeof name, "nf4_skinny_kernel<MT=%d,RG=%d,CPT=%d,DQ=%d>", mt, rg, cpt, (int)dq);
        QL_CUDA_CHECK_LAUNCH(name, grid, block);
        return QLORA_OK;
    }
    const int64_t ctas = (c.w.n + kWarps - 1) / kWarps;
    if (ctas > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "NF4 GEMV: %lld rows is too many for one launch", (long long)c.w.n);
    const dim3 grid((unsigned)ctas), block(kThreads);
    nf4_gemv_scalar_kernel<<<grid, block, 0, s->stream>>>(c.w, c.tab, c.in, (int)c.m, c.bias, c.beta, c.out);
    QL_CUDA_CHECK_LAUNCH("nf4_gemv_scalar_kernel", grid, block);
    return QLORA_OK;
}
