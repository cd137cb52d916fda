/*
 * Fused causal grouped-query attention over packed sequences on CUDA (cuda/model_ops_cuda.h),
 * FlashAttention-style with float32 SIMT arithmetic: nothing is T × T, memory is linear in T.
 *
 * Rows. A CTA works for one kv head. Its "query rows" are the pairs (token t, query head h of
 * that kv head's group), numbered t·group + g, so one K/V tile in shared memory serves every
 * query head of the group (GQA without repeating K/V). Row (t, g) sees keys [seq_start[t], t].
 *
 * Kernels (tiles of BR owned rows × BC streamed rows, both in shared memory as BF16):
 *   forward  per tile of query rows, streaming key tiles: S = Q·Kᵀ, online softmax in float32
 *            (running max and sum per row), O += P·V; writes out (BF16) and lse (float32).
 *   dq       per tile of query rows, streaming key tiles twice: first D = Σ p·(dout·v) (as the
 *            CPU, exact in float32, not from the BF16 output), then dq = scale·Σ p·(dp − D)·k.
 *            D goes to a float32 scratch for the next kernel.
 *   dkdv     per tile of keys, streaming the query rows that see them (t from the tile's first
 *            key to the end of its sequence): dv = Σ p·dout, dk = scale·Σ p·(dp − D)·q, summed
 *            over the whole group in float32 registers and rounded once: no atomics, and the
 *            results do not depend on scheduling.
 *
 * Thread layout (every kernel): NT threads; thread (ty, tx) = (tid / NC, tid % NC) owns the RT
 * rows ty + RG·i of the BR-row tile (RG = BR / RT) and, of a BR × BC score tile, the columns
 * tx + NC·j; of a BR × d accumulator, the column pairs 2·(tx + NC·j). The NC threads of a row
 * are consecutive lanes of one warp, so row reductions are xor shuffles. Shared rows of d BF16
 * are padded to an odd number of 32-bit words (conflict-free column reads); score tiles to
 * BC + NC floats (conflict-free row writes and reads). Tile sizes per head_dim keep the
 * accumulators at <= 64 floats per thread and shared memory under 99 KiB (sm_86/89's limit).
 */
#include "model_ops_common.cuh"

#include <limits.h>
#include <stdio.h>
#include <string.h>

extern "C" {
#include "model_ops.h"
}

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D_, int BR_, int BC_, int RT_, int NT_>
struct tile_cfg {
    static constexpr int D = D_;   /* largest head_dim this instantiation takes */
    static constexpr int BR = BR_; /* owned rows per CTA */
    static constexpr int BC = BC_; /* streamed rows per step */
    static constexpr int RT = RT_; /* owned rows per thread */
    static constexpr int NT = NT_; /* threads per CTA */
    static constexpr int RG = BR / RT, NC = NT / RG, CT = BC / NC, DP = D / (2 * NC);
    static_assert(BR % RT == 0 && NT % RG == 0, "rows must split evenly over the threads");
    static_assert(NC <= 32 && 32 % NC == 0, "a row's threads must sit in one warp");
    static_assert(BC % 32 == 0 && BC % NC == 0, "score tile columns must split evenly");
    static_assert(D % (2 * NC) == 0 && DP >= 1, "head_dim pairs must split evenly");
    static_assert(NT % 32 == 0 && NT <= 256, "whole warps");
};

/* Per head_dim bound: forward, dq, dkdv configurations. */
template <int D> struct attn_cfgs;
template <> struct attn_cfgs<64> {
    typedef tile_cfg<64, 64, 64, 4, 128> fwd;
    typedef tile_cfg<64, 64, 64, 4, 128> dq;
    typedef tile_cfg<64, 32, 64, 4, 128> dkdv;
};
template <> struct attn_cfgs<128> {
    typedef tile_cfg<128, 64, 64, 4, 128> fwd;
    typedef tile_cfg<128, 32, 64, 4, 128> dq;
    typedef tile_cfg<128, 32, 64, 4, 128> dkdv;
};
template <> struct attn_cfgs<256> {
    typedef tile_cfg<256, 32, 64, 4, 128> fwd;
    typedef tile_cfg<256, 16, 32, 4, 128> dq;
    typedef tile_cfg<256, 16, 32, 4, 128> dkdv;
};
template <> struct attn_cfgs<512> {
    typedef tile_cfg<512, 16, 32, 4, 128> fwd;
    typedef tile_cfg<512, 8, 32, 2, 128> dq;
    typedef tile_cfg<512, 8, 32, 2, 128> dkdv;
};

/* Everything the kernels read; lse_in/delta/dout only in the backward. */
struct attn_args {
    const uint16_t *q, *k, *v, *dout;
    const int32_t *seq_start; /* NULL: one sequence */
    uint16_t *out, *dq, *dk, *dv;
    float *lse;
    const float *lse_in;
    float *delta;
    int64_t tokens;
    int heads, kv_heads, group, head_dim;
    float scale, scale_log2; /* d^-0.5, and times log2(e): scores live in base 2 */
    int vec;                 /* BF16 values per global load: 8 (16 bytes), 2 or 1 */
    int pair_out;            /* outputs 4-byte aligned: store BF16 pairs */
};

/* Shared row stride (BF16 elements) for head_dim d: d rounded up so that the stride is an odd
 * number of 32-bit words. */
__host__ __device__ constexpr int row_stride(int d) { return (d / 2) % 2 == 0 ? d + 2 : d + 4; }

/* Shared memory layout: `bf16_rows` rows of row_stride(d) BF16, then `score_tiles` tiles of
 * BR × (BC + NC) floats, then `row_info` bytes. */
__host__ __device__ constexpr size_t smem_bytes(int d, int bf16_rows, int br, int bc, int nc, int score_tiles,
                                                int row_info) {
    return (size_t)bf16_rows * row_stride(d) * 2 + (size_t)score_tiles * br * (bc + nc) * 4 + (size_t)row_info;
}

/* Row of query row r (t·group + g) of kv head kvh in q/out/dout [T, nh, d], counted in rows of d. */
__device__ __forceinline__ int64_t q_row(const attn_args &a, int64_t r, int kvh) {
    const int64_t t = r / a.group;
    return t * a.heads + (int64_t)kvh * a.group + (r - t * a.group);
}

/* Copies `rows` rows of d BF16 into shared (stride sd); row i comes from src + row_of(i)·d, or
 * is zero when row_of(i) < 0, so no uninitialized value (a NaN pattern) ever reaches a sum. */
template <int NT, class RowOf>
__device__ void load_rows(uint16_t *dst, int sd, const uint16_t *src, int rows, int d, int vec, RowOf row_of) {
    if (vec == 8) {
        const int per_row = d / 8;
        for (int i = threadIdx.x; i < rows * per_row; i += NT) {
            const int r = i / per_row, c = (i - r * per_row) * 8;
            const int64_t g = row_of(r);
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (g >= 0)
                val = *(const uint4 *)(src + g * d + c);
            uint32_t *s = (uint32_t *)(dst + r * sd + c); /* 4-byte aligned: sd is even */
            s[0] = val.x;
            s[1] = val.y;
            s[2] = val.z;
            s[3] = val.w;
        }
    } else if (vec == 2) {
        const int per_row = d / 2;
        for (int i = threadIdx.x; i < rows * per_row; i += NT) {
            const int r = i / per_row, c = (i - r * per_row) * 2;
            const int64_t g = row_of(r);
            *(uint32_t *)(dst + r * sd + c) = g >= 0 ? *(const uint32_t *)(src + g * d + c) : 0u;
        }
    } else {
        for (int i = threadIdx.x; i < rows * d; i += NT) {
            const int r = i / d, c = i - r * d;
            const int64_t g = row_of(r);
            dst[r * sd + c] = g >= 0 ? src[g * d + c] : (uint16_t)0;
        }
    }
}

/* s[i][j] = A[ty + RG·i] · B[tx + NC·j] over d (both shared BF16 tiles, stride sd). */
template <class C>
__device__ __forceinline__ void tile_abt(float (&s)[C::RT][C::CT], const uint16_t *sa, const uint16_t *sb, int sd,
                                         int d, int ty, int tx) {
#pragma unroll
    for (int i = 0; i < C::RT; i++)
#pragma unroll
        for (int j = 0; j < C::CT; j++)
            s[i][j] = 0.0f;
#pragma unroll 4
    for (int p = 0; p < d; p += 2) {
        float a0[C::RT], a1[C::RT];
#pragma unroll
        for (int i = 0; i < C::RT; i++) {
            const uint32_t w = *(const uint32_t *)(sa + (ty + C::RG * i) * sd + p);
            a0[i] = mo_lo(w);
            a1[i] = mo_hi(w);
        }
#pragma unroll
        for (int j = 0; j < C::CT; j++) {
            const uint32_t w = *(const uint32_t *)(sb + (tx + C::NC * j) * sd + p);
            const float b0 = mo_lo(w), b1 = mo_hi(w);
#pragma unroll
            for (int i = 0; i < C::RT; i++)
                s[i][j] = fmaf(a1[i], b1, fmaf(a0[i], b0, s[i][j]));
        }
    }
}

/* acc[i][2j..2j+1] += Σ_c T[ty + RG·i][c] · B[c][2(tx + NC·j) ..], T a shared float tile
 * (stride BC + NC), B a shared BF16 tile of BC rows (stride sd); columns >= d are skipped. */
template <class C>
__device__ __forceinline__ void tile_acc(float (&acc)[C::RT][2 * C::DP], const float *st, const uint16_t *sb, int sd,
                                         int d, int ty, int tx) {
#pragma unroll 2
    for (int c = 0; c < C::BC; c++) {
        float t[C::RT];
#pragma unroll
        for (int i = 0; i < C::RT; i++)
            t[i] = st[(ty + C::RG * i) * (C::BC + C::NC) + c];
#pragma unroll
        for (int j = 0; j < C::DP; j++) {
            const int col = 2 * (tx + C::NC * j);
            if (col < d) {
                const uint32_t w = *(const uint32_t *)(sb + c * sd + col);
                const float b0 = mo_lo(w), b1 = mo_hi(w);
#pragma unroll
                for (int i = 0; i < C::RT; i++) {
                    acc[i][2 * j] = fmaf(t[i], b0, acc[i][2 * j]);
                    acc[i][2 * j + 1] = fmaf(t[i], b1, acc[i][2 * j + 1]);
                }
            }
        }
    }
}

/* Reductions over the NC consecutive lanes that share a row. */
template <int NC>
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
    for (int off = NC / 2; off > 0; off >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

template <int NC>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
    for (int off = NC / 2; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* Stores a BF16 pair (columns col, col + 1) of row `row` (in rows of d). */
__device__ __forceinline__ void store_pair(uint16_t *dst, int64_t row, int d, int col, float lo, float hi,
                                           int pair_out) {
    uint16_t *p = dst + row * d + col;
    if (pair_out) {
        *(uint32_t *)p = mo_pack(lo, hi);
    } else {
        p[0] = mo_to_bf16(lo);
        p[1] = mo_to_bf16(hi);
    }
}

/* The owned query rows of a thread: token (-1 past the end: every key masked), first key. */
template <class C>
struct query_rows {
    int64_t row[C::RT]; /* query row index t·group + g, or -1 */
    int tok[C::RT];
    int start[C::RT];
    __device__ void init(const attn_args &a, int64_t r0, int ty) {
        const int64_t nrows = a.tokens * a.group;
#pragma unroll
        for (int i = 0; i < C::RT; i++) {
            const int64_t r = r0 + ty + C::RG * i;
            row[i] = r < nrows ? r : -1;
            tok[i] = r < nrows ? (int)(r / a.group) : -1;
            start[i] = r < nrows && a.seq_start ? a.seq_start[tok[i]] : 0;
        }
    }
};

/* The key range a tile of query rows [r0, r0 + BR) needs: [first key of its first token, its
 * last token]. seq_start never decreases, so the first token's start is the smallest. */
__device__ __forceinline__ void key_range(const attn_args &a, int64_t r0, int br, int *k_begin, int *k_end) {
    const int64_t last = r0 + br - 1, nrows = a.tokens * a.group;
    const int t_first = (int)(r0 / a.group), t_last = (int)((last < nrows ? last : nrows - 1) / a.group);
    *k_begin = a.seq_start ? a.seq_start[t_first] : 0;
    *k_end = t_last + 1;
}

/* ------------------------------------------------------------------ forward */

template <class C, bool kExact>
__global__ void __launch_bounds__(C::NT) attn_fwd_kernel(attn_args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int d = kExact ? C::D : a.head_dim, sd = row_stride(d);
    uint16_t *sq = (uint16_t *)smem, *sk = sq + C::BR * sd, *sv = sk + C::BC * sd;
    float *sp = (float *)(sv + C::BC * sd);
    const int ty = threadIdx.x / C::NC, tx = threadIdx.x % C::NC, kvh = blockIdx.y;
    /* the longest tiles (last tokens) first */
    const int64_t r0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * C::BR, nrows = a.tokens * a.group;
    query_rows<C> rows;
    rows.init(a, r0, ty);
    load_rows<C::NT>(sq, sd, a.q, C::BR, d, a.vec,
                     [&](int r) { return r0 + r < nrows ? q_row(a, r0 + r, kvh) : (int64_t)-1; });
    int k_begin, k_end;
    key_range(a, r0, C::BR, &k_begin, &k_end);

    float m[C::RT], l[C::RT], acc[C::RT][2 * C::DP];
#pragma unroll
    for (int i = 0; i < C::RT; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < 2 * C::DP; j++)
            acc[i][j] = 0.0f;
    }
    for (int k0 = k_begin; k0 < k_end; k0 += C::BC) {
        auto key_of = [&](int r) { return k0 + r < k_end ? ((int64_t)(k0 + r) * a.kv_heads + kvh) : (int64_t)-1; };
        load_rows<C::NT>(sk, sd, a.k, C::BC, d, a.vec, key_of);
        load_rows<C::NT>(sv, sd, a.v, C::BC, d, a.vec, key_of);
        __syncthreads();
        float s[C::RT][C::CT];
        tile_abt<C>(s, sq, sk, sd, d, ty, tx);
#pragma unroll
        for (int i = 0; i < C::RT; i++) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < C::CT; j++) {
                const int key = k0 + tx + C::NC * j;
                s[i][j] = key >= rows.start[i] && key <= rows.tok[i] ? s[i][j] * a.scale_log2 : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            const float m_new = fmaxf(m[i], row_max<C::NC>(mx));
            /* a row with no visible key yet keeps m = -inf: nothing to rescale, nothing to add */
            const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m[i] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < C::CT; j++) {
                const float p = m_new == -INFINITY ? 0.0f : exp2f(s[i][j] - m_new);
                sum += p;
                sp[(ty + C::RG * i) * (C::BC + C::NC) + tx + C::NC * j] = p;
            }
            l[i] = l[i] * alpha + row_sum<C::NC>(sum);
            m[i] = m_new;
#pragma unroll
            for (int j = 0; j < 2 * C::DP; j++)
                acc[i][j] *= alpha;
        }
        __syncthreads();
        tile_acc<C>(acc, sp, sv, sd, d, ty, tx);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < C::RT; i++) {
        if (rows.row[i] < 0)
            continue;
        const int64_t orow = q_row(a, rows.row[i], kvh);
#pragma unroll
        for (int j = 0; j < C::DP; j++) {
            const int col = 2 * (tx + C::NC * j);
            if (col < d)
                store_pair(a.out, orow, d, col, acc[i][2 * j] / l[i], acc[i][2 * j + 1] / l[i], a.pair_out);
        }
        if (tx == 0)
            a.lse[orow] = (m[i] + log2f(l[i])) * kLn2;
    }
}

/* ------------------------------------------------------------------ backward: dq and D */

template <class C, bool kExact>
__global__ void __launch_bounds__(C::NT) attn_dq_kernel(attn_args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int d = kExact ? C::D : a.head_dim, sd = row_stride(d);
    uint16_t *sq = (uint16_t *)smem, *sdo = sq + C::BR * sd, *sk = sdo + C::BR * sd, *sv = sk + C::BC * sd;
    float *sds = (float *)(sv + C::BC * sd);
    const int ty = threadIdx.x / C::NC, tx = threadIdx.x % C::NC, kvh = blockIdx.y;
    const int64_t r0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * C::BR, nrows = a.tokens * a.group;
    query_rows<C> rows;
    rows.init(a, r0, ty);
    auto qrow_of = [&](int r) { return r0 + r < nrows ? q_row(a, r0 + r, kvh) : (int64_t)-1; };
    load_rows<C::NT>(sq, sd, a.q, C::BR, d, a.vec, qrow_of);
    load_rows<C::NT>(sdo, sd, a.dout, C::BR, d, a.vec, qrow_of);
    float lse2[C::RT];
#pragma unroll
    for (int i = 0; i < C::RT; i++)
        lse2[i] = rows.row[i] >= 0 ? a.lse_in[q_row(a, rows.row[i], kvh)] * kLog2e : 0.0f;
    int k_begin, k_end;
    key_range(a, r0, C::BR, &k_begin, &k_end);

    /* p and dp of the current key tile for the owned rows */
    float p[C::RT][C::CT], dp[C::RT][C::CT];
    auto scores = [&](int k0) {
        auto key_of = [&](int r) { return k0 + r < k_end ? ((int64_t)(k0 + r) * a.kv_heads + kvh) : (int64_t)-1; };
        load_rows<C::NT>(sk, sd, a.k, C::BC, d, a.vec, key_of);
        load_rows<C::NT>(sv, sd, a.v, C::BC, d, a.vec, key_of);
        __syncthreads();
        tile_abt<C>(p, sq, sk, sd, d, ty, tx);
        tile_abt<C>(dp, sdo, sv, sd, d, ty, tx);
#pragma unroll
        for (int i = 0; i < C::RT; i++)
#pragma unroll
            for (int j = 0; j < C::CT; j++) {
                const int key = k0 + tx + C::NC * j;
                p[i][j] = key >= rows.start[i] && key <= rows.tok[i] ? exp2f(p[i][j] * a.scale_log2 - lse2[i]) : 0.0f;
            }
    };

    float delta[C::RT];
#pragma unroll
    for (int i = 0; i < C::RT; i++)
        delta[i] = 0.0f;
    for (int k0 = k_begin; k0 < k_end; k0 += C::BC) {
        scores(k0);
#pragma unroll
        for (int i = 0; i < C::RT; i++)
#pragma unroll
            for (int j = 0; j < C::CT; j++)
                delta[i] = fmaf(p[i][j], dp[i][j], delta[i]);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < C::RT; i++)
        delta[i] = row_sum<C::NC>(delta[i]);

    float acc[C::RT][2 * C::DP];
#pragma unroll
    for (int i = 0; i < C::RT; i++)
#pragma unroll
        for (int j = 0; j < 2 * C::DP; j++)
            acc[i][j] = 0.0f;
    for (int k0 = k_begin; k0 < k_end; k0 += C::BC) {
        scores(k0);
#pragma unroll
        for (int i = 0; i < C::RT; i++)
#pragma unroll
            for (int j = 0; j < C::CT; j++)
                sds[(ty + C::RG * i) * (C::BC + C::NC) + tx + C::NC * j] = p[i][j] * (dp[i][j] - delta[i]);
        __syncthreads();
        tile_acc<C>(acc, sds, sk, sd, d, ty, tx);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < C::RT; i++) {
        if (rows.row[i] < 0)
            continue;
        const int64_t orow = q_row(a, rows.row[i], kvh);
#pragma unroll
        for (int j = 0; j < C::DP; j++) {
            const int col = 2 * (tx + C::NC * j);
            if (col < d)
                store_pair(a.dq, orow, d, col, a.scale * acc[i][2 * j], a.scale * acc[i][2 * j + 1], a.pair_out);
        }
        if (tx == 0)
            a.delta[orow] = delta[i];
    }
}

/* ------------------------------------------------------------------ backward: dk, dv */

/* Per streamed query row: its token (-1 past the end), first key, lse (base 2) and D. */
struct stream_row {
    int tok, start;
    float lse2, delta;
};

template <class C, bool kExact>
__global__ void __launch_bounds__(C::NT) attn_dkdv_kernel(attn_args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int d = kExact ? C::D : a.head_dim, sd = row_stride(d);
    uint16_t *sk = (uint16_t *)smem, *sv = sk + C::BR * sd, *sq = sv + C::BR * sd, *sdo = sq + C::BC * sd;
    float *sp = (float *)(sdo + C::BC * sd), *sds = sp + C::BR * (C::BC + C::NC);
    stream_row *sinfo = (stream_row *)(sds + C::BR * (C::BC + C::NC));
    const int ty = threadIdx.x / C::NC, tx = threadIdx.x % C::NC, kvh = blockIdx.y;
    const int T = (int)a.tokens;
    const int k0 = blockIdx.x * C::BR, k_last = (k0 + C::BR < T ? k0 + C::BR : T) - 1;
    const int64_t nrows = a.tokens * a.group;
    auto key_of = [&](int r) { return k0 + r < T ? ((int64_t)(k0 + r) * a.kv_heads + kvh) : (int64_t)-1; };
    load_rows<C::NT>(sk, sd, a.k, C::BR, d, a.vec, key_of);
    load_rows<C::NT>(sv, sd, a.v, C::BR, d, a.vec, key_of);

    float dk[C::RT][2 * C::DP], dv[C::RT][2 * C::DP];
#pragma unroll
    for (int i = 0; i < C::RT; i++)
#pragma unroll
        for (int j = 0; j < 2 * C::DP; j++) {
            dk[i][j] = 0.0f;
            dv[i][j] = 0.0f;
        }
    /* Query rows from the first that sees key k0 (token k0, first head) while their token's
     * sequence starts at or before the tile's last key; seq_start never decreases, so the
     * first row of a tile decides for the rest. The test reads one value: uniform. */
    for (int64_t r0 = (int64_t)k0 * a.group; r0 < nrows; r0 += C::BC) {
        if (a.seq_start && a.seq_start[r0 / a.group] > k_last)
            break;
        auto qrow_of = [&](int r) { return r0 + r < nrows ? q_row(a, r0 + r, kvh) : (int64_t)-1; };
        load_rows<C::NT>(sq, sd, a.q, C::BC, d, a.vec, qrow_of);
        load_rows<C::NT>(sdo, sd, a.dout, C::BC, d, a.vec, qrow_of);
        for (int c = threadIdx.x; c < C::BC; c += C::NT) {
            stream_row info = {-1, 0, 0.0f, 0.0f};
            if (r0 + c < nrows) {
                const int64_t orow = q_row(a, r0 + c, kvh);
                info.tok = (int)((r0 + c) / a.group);
                info.start = a.seq_start ? a.seq_start[info.tok] : 0;
                info.lse2 = a.lse_in[orow] * kLog2e;
                info.delta = a.delta[orow];
            }
            sinfo[c] = info;
        }
        __syncthreads();
        float s[C::RT][C::CT], dp[C::RT][C::CT];
        tile_abt<C>(s, sk, sq, sd, d, ty, tx);   /* keys × queries */
        tile_abt<C>(dp, sv, sdo, sd, d, ty, tx); /* v · dout */
#pragma unroll
        for (int i = 0; i < C::RT; i++) {
            const int key = k0 + ty + C::RG * i;
#pragma unroll
            for (int j = 0; j < C::CT; j++) {
                const int c = tx + C::NC * j;
                const stream_row info = sinfo[c];
                const float p =
                    key >= info.start && key <= info.tok ? exp2f(s[i][j] * a.scale_log2 - info.lse2) : 0.0f;
                sp[(ty + C::RG * i) * (C::BC + C::NC) + c] = p;
                sds[(ty + C::RG * i) * (C::BC + C::NC) + c] = p * (dp[i][j] - info.delta);
            }
        }
        __syncthreads();
        tile_acc<C>(dv, sp, sdo, sd, d, ty, tx);
        tile_acc<C>(dk, sds, sq, sd, d, ty, tx);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < C::RT; i++) {
        const int key = k0 + ty + C::RG * i;
        if (key >= T)
            continue;
        const int64_t orow = (int64_t)key * a.kv_heads + kvh;
#pragma unroll
        for (int j = 0; j < C::DP; j++) {
            const int col = 2 * (tx + C::NC * j);
            if (col < d) {
                store_pair(a.dk, orow, d, col, a.scale * dk[i][2 * j], a.scale * dk[i][2 * j + 1], a.pair_out);
                store_pair(a.dv, orow, d, col, dv[i][2 * j], dv[i][2 * j + 1], a.pair_out);
            }
        }
    }
}

/* ------------------------------------------------------------------ host side */

enum attn_kernel { ATTN_FWD, ATTN_DQ, ATTN_DKDV };

template <class C>
size_t kernel_smem(attn_kernel which, int d) {
    switch (which) {
    case ATTN_FWD: /* Q; K, V; P */
        return smem_bytes(d, C::BR + 2 * C::BC, C::BR, C::BC, C::NC, 1, 0);
    case ATTN_DQ: /* Q, dout; K, V; dS */
        return smem_bytes(d, 2 * C::BR + 2 * C::BC, C::BR, C::BC, C::NC, 1, 0);
    default: /* K, V; Q, dout; P, dS; row info */
        return smem_bytes(d, 2 * C::BR + 2 * C::BC, C::BR, C::BC, C::NC, 2, C::BC * (int)sizeof(stream_row));
    }
}

template <class C>
qlora_status launch_one(ql_cuda_state *s, attn_kernel which, void (*kernel)(attn_args), bool exact,
                        const attn_args &a, int max_smem) {
    const int d = a.head_dim;
    const size_t smem = kernel_smem<C>(which, d);
    const int64_t tiles = which == ATTN_DKDV ? (a.tokens + C::BR - 1) / C::BR
                                             : (a.tokens * a.group + C::BR - 1) / C::BR;
    if (tiles > INT_MAX || a.kv_heads > 65535)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "attention: %lld row tiles × %d kv heads exceed one CUDA grid",
                       (long long)tiles, a.kv_heads);
    if (smem > (size_t)max_smem)
        return ql_fail(QLORA_ERR_UNSUPPORTED,
                       "attention: head_dim %d needs %zu bytes of shared memory per block; device %d allows %d", d,
                       smem, s->device, max_smem);
    const dim3 grid((unsigned)tiles, (unsigned)a.kv_heads), block(C::NT);
    QL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<grid, block, smem, s->stream>>>(a);
    char name[80];
    snprintf(name, sizeof name, "attn_%s_kernel<d<=%d%s>",
             which == ATTN_FWD ? "fwd" : which == ATTN_DQ ? "dq" : "dkdv", C::D, exact ? ", exact" : "");
    QL_CUDA_CHECK_LAUNCH(name, grid, block);
    return QLORA_OK;
}

/* The kernels for head_dim <= D; the exact instantiation (head_dim == D) has constant loop
 * bounds. */
template <int D>
qlora_status launch_for(ql_cuda_state *s, attn_kernel which, const attn_args &a, int max_smem) {
    typedef typename attn_cfgs<D>::fwd fwd;
    typedef typename attn_cfgs<D>::dq dq;
    typedef typename attn_cfgs<D>::dkdv dkdv;
    const bool exact = a.head_dim == D;
    switch (which) {
    case ATTN_FWD:
        return launch_one<fwd>(s, which, exact ? attn_fwd_kernel<fwd, true> : attn_fwd_kernel<fwd, false>, exact, a,
                               max_smem);
    case ATTN_DQ:
        return launch_one<dq>(s, which, exact ? attn_dq_kernel<dq, true> : attn_dq_kernel<dq, false>, exact, a,
                              max_smem);
    default:
        return launch_one<dkdv>(s, which, exact ? attn_dkdv_kernel<dkdv, true> : attn_dkdv_kernel<dkdv, false>, exact,
                                a, max_smem);
    }
}

qlora_status launch(ql_cuda_state *s, attn_kernel which, const attn_args &a) {
    int max_smem = 0;
    QL_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, s->device));
    const int d = a.head_dim;
    if (d <= 64)
        return launch_for<64>(s, which, a, max_smem);
    if (d <= 128)
        return launch_for<128>(s, which, a, max_smem);
    if (d <= 256)
        return launch_for<256>(s, which, a, max_smem);
    return launch_for<512>(s, which, a, max_smem);
}

int aligned(const void *p, size_t bytes) { return (uintptr_t)p % bytes == 0; }

/* Validates the shape and the pointers (non-NULL, aligned to their element) and fills the
 * common part of the kernel arguments. `bf16_in` are the BF16 inputs loaded as tiles. */
qlora_status prepare(ql_cuda_state *s, const char *fn, int64_t tokens, int heads, int kv_heads, int head_dim,
                     const void *const *bf16_in, int n_in, const void *const *bf16_out, int n_out,
                     const void *const *words, int n_words, const int32_t *seq_start, attn_args *a) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (tokens < 0 || tokens > INT32_MAX)
        return ql_fail(QLORA_ERR_SHAPE, "%s: tokens %lld outside [0, 2^31)", fn, (long long)tokens);
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: %d query heads is not a multiple of %d kv heads", fn, heads, kv_heads);
    if (head_dim <= 0 || head_dim > QL_ATTN_MAX_HEAD_DIM || head_dim % 2 != 0)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: head_dim %d is not even in [2, %d]", fn, head_dim,
                       QL_ATTN_MAX_HEAD_DIM);
    int all16 = head_dim % 8 == 0, all4 = 1;
    for (int i = 0; i < n_in; i++) {
        if (bf16_in[i] == NULL || !aligned(bf16_in[i], 2))
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: BF16 input %d is NULL or not 2-byte aligned", fn, i);
        all16 &= aligned(bf16_in[i], 16);
        all4 &= aligned(bf16_in[i], 4);
    }
    int out4 = 1;
    for (int i = 0; i < n_out; i++) {
        if (bf16_out[i] == NULL || !aligned(bf16_out[i], 2))
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: BF16 output %d is NULL or not 2-byte aligned", fn, i);
        out4 &= aligned(bf16_out[i], 4);
    }
    for (int i = 0; i < n_words; i++)
        if (words[i] == NULL || !aligned(words[i], 4))
            return ql_fail(QLORA_ERR_INVALID_ARG, "%s: lse/float argument %d is NULL or not 4-byte aligned", fn, i);
    if (seq_start && !aligned(seq_start, 4))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: seq_start (%p) is not 4-byte aligned", fn, (const void *)seq_start);
    memset(a, 0, sizeof *a);
    a->seq_start = seq_start;
    a->tokens = tokens;
    a->heads = heads;
    a->kv_heads = kv_heads;
    a->group = heads / kv_heads;
    a->head_dim = head_dim;
    a->scale = 1.0f / sqrtf((float)head_dim);
    a->scale_log2 = a->scale * kLog2e;
    a->vec = all16 ? 8 : all4 ? 2 : 1;
    a->pair_out = out4;
    return QLORA_OK;
}

} // namespace

extern "C" qlora_status ql_cuda_attention_forward(ql_cuda_state *s, int64_t tokens, int heads, int kv_heads,
                                                  int head_dim, const uint16_t *d_q, const uint16_t *d_k,
                                                  const uint16_t *d_v, const int32_t *d_seq_start, uint16_t *d_out,
                                                  float *d_lse) {
    const void *in[3] = {d_q, d_k, d_v}, *out[1] = {d_out}, *words[1] = {d_lse};
    attn_args a;
    QL_CHECK(prepare(s, "ql_cuda_attention_forward", tokens, heads, kv_heads, head_dim, in, 3, out, 1, words, 1,
                     d_seq_start, &a));
    if (tokens == 0)
        return QLORA_OK;
    a.q = d_q;
    a.k = d_k;
    a.v = d_v;
    a.out = d_out;
    a.lse = d_lse;
    QL_CUDA_ENTER(s);
    return launch(s, ATTN_FWD, a);
}

extern "C" qlora_status ql_cuda_attention_backward(ql_cuda_state *s, int64_t tokens, int heads, int kv_heads,
                                                   int head_dim, const uint16_t *d_q, const uint16_t *d_k,
                                                   const uint16_t *d_v, const int32_t *d_seq_start,
                                                   const float *d_lse, const uint16_t *d_dout, uint16_t *d_dq,
                                                   uint16_t *d_dk, uint16_t *d_dv) {
    const void *in[4] = {d_q, d_k, d_v, d_dout}, *out[3] = {d_dq, d_dk, d_dv}, *words[1] = {d_lse};
    attn_args a;
    QL_CHECK(prepare(s, "ql_cuda_attention_backward", tokens, heads, kv_heads, head_dim, in, 4, out, 3, words, 1,
                     d_seq_start, &a));
    if (tokens == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(s->owner != NULL, "cuda state owner");
    a.q = d_q;
    a.k = d_k;
    a.v = d_v;
    a.dout = d_dout;
    a.lse_in = d_lse;
    a.dq = d_dq;
    a.dk = d_dk;
    a.dv = d_dv;
    QL_CUDA_ENTER(s);
    void *delta = NULL; /* D per (token, query head), float32 */
    QL_CHECK(qlora_alloc(s->owner, (size_t)tokens * (size_t)heads * sizeof(float), 1, QLORA_MEM_WORKSPACE, &delta));
    a.delta = (float *)delta;
    qlora_status st = launch(s, ATTN_DQ, a);
    if (st == QLORA_OK)
        st = launch(s, ATTN_DKDV, a);
    qlora_free(s->owner, delta); /* waits for the stream first */
    return st;
}
