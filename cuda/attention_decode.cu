/*
 * Attention of new tokens against a KV cache on CUDA (ql_cuda_attention_decode,
 * cuda/model_ops_cuda.h): generation's attention. Float32 SIMT arithmetic, BF16 in and out.
 *
 * Rows. A query row is (token i, query head g of a kv head's group), numbered i·group + g per
 * kv head, and sees keys [0, past + i]. A CTA takes R consecutive rows of one kv head (R up to
 * 8: one K/V tile in shared memory serves every query head of the group) and one range of keys.
 *
 * Split-K (flash-decoding). One decode step has only nkv·ceil(group / R) row tiles: too few CTAs
 * to stream a long cache at the device's bandwidth. The keys are therefore cut into `splits`
 * ranges of `chunk` keys (whole tiles), one CTA per (row tile, range, kv head), each keeping
 * its own online softmax (running max m and sum l, base 2) and writing the unnormalized
 * accumulator with (m, l) to a float32 scratch; a second kernel combines the ranges of each row
 * (out = Σ 2^(m_s − M)·acc_s / Σ 2^(m_s − M)·l_s, M the largest m_s, ranges with l_s = 0 skipped),
 * always in split order, so the result does not depend on scheduling. When the row tiles alone
 * fill the device there is one range and the CTA writes the output itself.
 *
 * A prompt on an empty cache (past = 0, several tokens) is exactly causal self-attention over
 * the cache's first rows: it runs through the FlashAttention-style forward kernel of
 * cuda/attention.cu (its lse goes to a scratch), so the prompt's bits equal the forward's.
 *
 * Not bit-identical with the CPU op (lib/op_attention_decode.c): float32 sums in other orders,
 * exp2 of log2(e)-scaled scores instead of exp, and the split combine. Both are within a few
 * float32 roundings per term of the exact value before the one BF16 rounding; see
 * tests/test_cuda_model_ops.c for the bound.
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
constexpr int kThreads = 128;
constexpr int kCombineThreads = 64;

template <int D_, int R_>
struct dec_cfg {
    static constexpr int D = D_;                       /* largest head_dim this instantiation takes */
    static constexpr int R = R_;                       /* query rows per CTA */
    static constexpr int NT = kThreads;                /* threads per CTA */
    static constexpr int NW = NT / 32;                 /* warps */
    static constexpr int BC = D <= 256 ? 64 : 32;      /* keys per shared tile */
    static constexpr int PAIRS = (R * D / 2 + NT - 1) / NT; /* output column pairs per thread */
    static_assert(BC % 32 == 0, "a tile's keys split over whole warps");
};

struct dec_args {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    float *part_acc; /* [splits, T·nh, d] unnormalized accumulators; NULL: one range, write out */
    float *part_ml;  /* [splits, T·nh, 2]: m (base 2) and l per row and range */
    int tokens, past, chunk;
    int heads, kv_heads, group, head_dim;
    float scale_log2; /* d^-0.5·log2(e): scores live in base 2 */
    int vec;          /* BF16 values per global load: 8 (16 bytes), 2 or 1 */
    int pair_out;     /* out 4-byte aligned: store BF16 pairs */
};

/* Shared row stride (BF16 elements) for head_dim d: an odd number of 32-bit words, so the lanes
 * of a warp reading one column of consecutive rows hit distinct banks. */
__host__ __device__ constexpr int row_stride(int d) { return (d / 2) % 2 == 0 ? d + 2 : d + 4; }

/* Shared layout: floats sq [R·d], ss [R·BC], sm, sl, salpha [R]; ints slimit [R]; padding to 16
 * bytes; then BF16 sk, sv [BC·row_stride(d)]. */
__host__ __device__ constexpr size_t float_words(int d, int r, int bc) { return (size_t)r * (d + bc + 4); }
__host__ __device__ constexpr size_t kv_offset(int d, int r, int bc) {
    return (float_words(d, r, bc) * 4 + 15) / 16 * 16;
}
__host__ __device__ constexpr size_t dec_smem(int d, int r, int bc) {
    return kv_offset(d, r, bc) + 2 * (size_t)bc * row_stride(d) * 2;
}

/* Copies keys [k0, k0 + n) of kv head kvh (rows of d BF16 in src [keys, nkv, d]) into shared rows
 * 0 .. BC-1 (stride sd); rows >= n are zero, so no uninitialized pattern reaches a sum. */
template <int NT, int BC>
__device__ void load_tile(uint16_t *dst, int sd, const uint16_t *src, const dec_args &a, int kvh, int64_t k0, int n) {
    const int d = a.head_dim;
    if (a.vec == 8) {
        const int per_row = d / 8;
        for (int i = threadIdx.x; i < BC * per_row; i += NT) {
            const int r = i / per_row, c = (i - r * per_row) * 8;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (r < n)
                val = *(const uint4 *)(src + ((k0 + r) * a.kv_heads + kvh) * d + c);
            uint32_t *s = (uint32_t *)(dst + r * sd + c); /* 4-byte aligned: sd and c are even */
            s[0] = val.x;
            s[1] = val.y;
            s[2] = val.z;
            s[3] = val.w;
        }
    } else if (a.vec == 2) {
        const int per_row = d / 2;
        for (int i = threadIdx.x; i < BC * per_row; i += NT) {
            const int r = i / per_row, c = (i - r * per_row) * 2;
            *(uint32_t *)(dst + r * sd + c) =
                r < n ? *(const uint32_t *)(src + ((k0 + r) * a.kv_heads + kvh) * d + c) : 0u;
        }
    } else {
        for (int i = threadIdx.x; i < BC * d; i += NT) {
            const int r = i / d, c = i - r * d;
            dst[r * sd + c] = r < n ? src[((k0 + r) * a.kv_heads + kvh) * d + c] : (uint16_t)0;
        }
    }
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

/* Grid: x = row tile, y = key range (split), z = kv head. */
template <class C>
__global__ void __launch_bounds__(C::NT) attn_decode_kernel(dec_args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int d = a.head_dim, half = d / 2, sd = row_stride(d);
    float *sq = (float *)smem, *ss = sq + C::R * d, *sm = ss + C::R * C::BC, *sl = sm + C::R, *salpha = sl + C::R;
    int *slimit = (int *)(salpha + C::R);
    uint16_t *sk = (uint16_t *)(smem + kv_offset(d, C::R, C::BC)), *sv = sk + C::BC * sd;
    const int kvh = blockIdx.z, split = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t nrows = (int64_t)a.tokens * a.group, r0 = (int64_t)blockIdx.x * C::R;
    const int64_t nq = (int64_t)a.tokens * a.heads;

    /* the q row (in rows of d of q/out) of tile row r, or -1 past the last row */
    auto q_row = [&](int r) -> int64_t {
        const int64_t gr = r0 + r;
        if (gr >= nrows)
            return -1;
        const int64_t i = gr / a.group;
        return i * a.heads + (int64_t)kvh * a.group + (gr - i * a.group);
    };
    for (int i = threadIdx.x; i < C::R * d; i += C::NT) {
        const int r = i / d, c = i - r * d;
        const int64_t qr = q_row(r);
        sq[i] = qr >= 0 ? mo_bf16(a.q[qr * d + c]) : 0.0f;
    }
    if (threadIdx.x < C::R) {
        const int r = threadIdx.x;
        sm[r] = -INFINITY;
        sl[r] = 0.0f;
        slimit[r] = r0 + r < nrows ? a.past + (int)((r0 + r) / a.group) : -1; /* its last visible key */
    }
    /* the tile's keys: this range, up to the last row's last visible key */
    const int64_t last_row = (r0 + C::R < nrows ? r0 + C::R : nrows) - 1;
    const int64_t k_lo64 = (int64_t)split * a.chunk, k_end = a.past + last_row / a.group + 1;
    const int64_t k_hi = k_lo64 + a.chunk < k_end ? k_lo64 + a.chunk : k_end;

    float acc[C::PAIRS][2];
#pragma unroll
    for (int p = 0; p < C::PAIRS; p++)
        acc[p][0] = acc[p][1] = 0.0f;
    __syncthreads();

    for (int64_t k0 = k_lo64; k0 < k_hi; k0 += C::BC) {
        const int n = (int)(k_hi - k0 < C::BC ? k_hi - k0 : C::BC);
        load_tile<C::NT, C::BC>(sk, sd, a.k, a, kvh, k0, n);
        load_tile<C::NT, C::BC>(sv, sd, a.v, a, kvh, k0, n);
        __syncthreads();
        /* scores (base 2): the lanes of a warp share a row (BC is a multiple of 32): q broadcast,
         * keys of consecutive rows conflict-free */
        for (int i = threadIdx.x; i < C::R * C::BC; i += C::NT) {
            const int r = i / C::BC, j = i - r * C::BC;
            float sc = -INFINITY;
            if (j < n && k0 + j <= slimit[r]) {
                const float *qr = sq + r * d;
                const uint16_t *kr = sk + j * sd;
                float sum = 0.0f;
#pragma unroll 4
                for (int c = 0; c < d; c += 2) {
                    const uint32_t w = *(const uint32_t *)(kr + c);
                    const float2 qq = *(const float2 *)(qr + c);
                    sum = fmaf(qq.y, mo_hi(w), fmaf(qq.x, mo_lo(w), sum));
                }
                sc = sum * a.scale_log2;
            }
            ss[i] = sc;
        }
        __syncthreads();
        /* online softmax per row, one warp per row */
        for (int r = warp; r < C::R; r += C::NW) {
            float mx = -INFINITY;
            for (int j = lane; j < C::BC; j += 32)
                mx = fmaxf(mx, ss[r * C::BC + j]);
            mx = mo_warp_max(mx);
            const float m_old = sm[r], m_new = fmaxf(m_old, mx);
            /* a row with no visible key yet keeps m = -inf: nothing to rescale, nothing to add */
            const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_old - m_new);
            float sum = 0.0f;
            for (int j = lane; j < C::BC; j += 32) {
                const float p = m_new == -INFINITY ? 0.0f : exp2f(ss[r * C::BC + j] - m_new);
                ss[r * C::BC + j] = p;
                sum += p;
            }
            sum = mo_warp_sum(sum);
            __syncwarp(); /* every lane has read sm[r] before lane 0 replaces it */
            if (lane == 0) {
                sm[r] = m_new;
                sl[r] = sl[r] * alpha + sum;
                salpha[r] = alpha;
            }
        }
        __syncthreads();
        /* acc = alpha·acc + P·V over the thread's column pairs */
#pragma unroll
        for (int p = 0; p < C::PAIRS; p++) {
            const int o = threadIdx.x + C::NT * p, r = o / half, c = 2 * (o - r * half);
            if (r < C::R) {
                const float al = salpha[r];
                const float *pr = ss + r * C::BC;
                float a0 = acc[p][0] * al, a1 = acc[p][1] * al;
#pragma unroll 4
                for (int j = 0; j < n; j++) {
                    const float pj = pr[j];
                    const uint32_t w = *(const uint32_t *)(sv + j * sd + c);
                    a0 = fmaf(pj, mo_lo(w), a0);
                    a1 = fmaf(pj, mo_hi(w), a1);
                }
                acc[p][0] = a0;
                acc[p][1] = a1;
            }
        }
        __syncthreads(); /* before the next tile overwrites sk, sv, ss */
    }

#pragma unroll
    for (int p = 0; p < C::PAIRS; p++) {
        const int o = threadIdx.x + C::NT * p, r = o / half, c = 2 * (o - r * half);
        if (r >= C::R)
            continue;
        const int64_t qr = q_row(r);
        if (qr < 0)
            continue;
        if (a.part_acc) {
            float2 v = make_float2(acc[p][0], acc[p][1]);
            *(float2 *)(a.part_acc + ((int64_t)split * nq + qr) * d + c) = v;
        } else { /* one range: every visible key was seen, l > 0 (key 0 is always visible) */
            store_pair(a.out, qr, d, c, acc[p][0] / sl[r], acc[p][1] / sl[r], a.pair_out);
        }
    }
    if (a.part_acc && threadIdx.x < C::R) {
        const int64_t qr = q_row(threadIdx.x);
        if (qr >= 0) {
            float2 ml = make_float2(sm[threadIdx.x], sl[threadIdx.x]);
            *(float2 *)(a.part_ml + ((int64_t)split * nq + qr) * 2) = ml;
        }
    }
}

/* One CTA per q row: the ranges' partial results merged in split order. */
__global__ void __launch_bounds__(kCombineThreads) attn_decode_combine_kernel(dec_args a, int splits) {
    const int64_t row = blockIdx.x, nq = (int64_t)a.tokens * a.heads;
    const int d = a.head_dim;
    float M = -INFINITY;
    for (int s = 0; s < splits; s++) {
        const float2 ml = *(const float2 *)(a.part_ml + ((int64_t)s * nq + row) * 2);
        if (ml.y > 0.0f)
            M = fmaxf(M, ml.x);
    }
    float den = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float2 ml = *(const float2 *)(a.part_ml + ((int64_t)s * nq + row) * 2);
        if (ml.y > 0.0f)
            den = fmaf(exp2f(ml.x - M), ml.y, den);
    }
    for (int c = 2 * threadIdx.x; c < d; c += 2 * kCombineThreads) {
        float n0 = 0.0f, n1 = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float2 ml = *(const float2 *)(a.part_ml + ((int64_t)s * nq + row) * 2);
            if (ml.y > 0.0f) {
                const float w = exp2f(ml.x - M);
                const float2 v = *(const float2 *)(a.part_acc + ((int64_t)s * nq + row) * d + c);
                n0 = fmaf(w, v.x, n0);
                n1 = fmaf(w, v.y, n1);
            }
        }
        store_pair(a.out, row, d, c, n0 / den, n1 / den, a.pair_out);
    }
}

template <class C>
qlora_status launch_rows(ql_cuda_state *s, const dec_args &a, dim3 grid, int max_smem) {
    const size_t smem = dec_smem(a.head_dim, C::R, C::BC);
    if (smem > (size_t)max_smem)
        return ql_fail(QLORA_ERR_UNSUPPORTED,
                       "attention decode: head_dim %d needs %zu bytes of shared memory per block; device %d allows "
                       "%d", a.head_dim, smem, s->device, max_smem);
    QL_CUDA_CHECK(cudaFuncSetAttribute(attn_decode_kernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    attn_decode_kernel<C><<<grid, dim3(C::NT), smem, s->stream>>>(a);
    char name[64];
    snprintf(name, sizeof name, "attn_decode_kernel<d<=%d, rows %d>", C::D, C::R);
    QL_CUDA_CHECK_LAUNCH(name, grid, dim3(C::NT));
    return QLORA_OK;
}

template <int D>
qlora_status launch_d(ql_cuda_state *s, const dec_args &a, int rows, dim3 grid, int max_smem) {
    switch (rows) {
    case 1:
        return launch_rows<dec_cfg<D, 1> >(s, a, grid, max_smem);
    case 2:
        return launch_rows<dec_cfg<D, 2> >(s, a, grid, max_smem);
    case 4:
        return launch_rows<dec_cfg<D, 4> >(s, a, grid, max_smem);
    default:
        return launch_rows<dec_cfg<D, 8> >(s, a, grid, max_smem);
    }
}

/* Keys per shared tile for head_dim d (dec_cfg<D, R>::BC of the instantiation d runs on). */
int tile_keys(int d) { return d <= 256 ? 64 : 32; }

int aligned(const void *p, size_t bytes) { return (uintptr_t)p % bytes == 0; }

/* The prompt on an empty cache: causal self-attention over keys 0 .. T-1, by the forward kernel. */
qlora_status prompt_by_forward(ql_cuda_state *s, int64_t tokens, int heads, int kv_heads, int head_dim,
                               const uint16_t *d_q, const uint16_t *d_k, const uint16_t *d_v, uint16_t *d_out) {
    void *lse = NULL;
    QL_CHECK(qlora_alloc(s->owner, (size_t)tokens * (size_t)heads * sizeof(float), 1, QLORA_MEM_WORKSPACE, &lse));
    qlora_status st =
        ql_cuda_attention_forward(s, tokens, heads, kv_heads, head_dim, d_q, d_k, d_v, NULL, d_out, (float *)lse);
    qlora_free(s->owner, lse); /* waits for the stream first */
    return st;
}

} // namespace

extern "C" qlora_status ql_cuda_attention_decode(ql_cuda_state *s, int64_t tokens, int heads, int kv_heads,
                                                 int head_dim, const uint16_t *d_q, const uint16_t *d_k_cache,
                                                 const uint16_t *d_v_cache, int64_t past, uint16_t *d_out) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (tokens < 0 || past < 0 || past + tokens > INT32_MAX)
        return ql_fail(QLORA_ERR_INVALID_ARG, "attention decode: past %lld and tokens %lld must be >= 0 with "
                       "past + tokens < 2^31", (long long)past, (long long)tokens);
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0)
        return ql_fail(QLORA_ERR_SHAPE, "attention decode: %d query heads is not a multiple of %d kv heads", heads,
                       kv_heads);
    if (head_dim <= 0 || head_dim > QL_ATTN_MAX_HEAD_DIM || head_dim % 2 != 0)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "attention decode: head_dim %d is not even in [2, %d]", head_dim,
                       QL_ATTN_MAX_HEAD_DIM);
    const uint16_t *in[3] = {d_q, d_k_cache, d_v_cache};
    int all16 = head_dim % 8 == 0, all4 = 1;
    for (int i = 0; i < 3; i++) {
        if (in[i] == NULL || !aligned(in[i], 2))
            return ql_fail(QLORA_ERR_INVALID_ARG, "attention decode: %s is NULL or not 2-byte aligned",
                           i == 0 ? "q" : i == 1 ? "k_cache" : "v_cache");
        all16 &= aligned(in[i], 16);
        all4 &= aligned(in[i], 4);
    }
    if (d_out == NULL || !aligned(d_out, 2))
        return ql_fail(QLORA_ERR_INVALID_ARG, "attention decode: out is NULL or not 2-byte aligned");
    if (tokens == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(s->owner != NULL, "cuda state owner");
    if (past == 0 && tokens > 1)
        return prompt_by_forward(s, tokens, heads, kv_heads, head_dim, d_q, d_k_cache, d_v_cache, d_out);

    dec_args a;
    memset(&a, 0, sizeof a);
    a.q = d_q;
    a.k = d_k_cache;
    a.v = d_v_cache;
    a.out = d_out;
    a.tokens = (int)tokens;
    a.past = (int)past;
    a.heads = heads;
    a.kv_heads = kv_heads;
    a.group = heads / kv_heads;
    a.head_dim = head_dim;
    a.scale_log2 = 1.0f / sqrtf((float)head_dim) * kLog2e;
    a.vec = all16 ? 8 : all4 ? 2 : 1;
    a.pair_out = aligned(d_out, 4);

    /* rows per CTA: the group's rows of one token (and more tokens) up to 8, a power of two */
    const int64_t rows_per_kv = tokens * a.group;
    const int rows = rows_per_kv >= 8 ? 8 : rows_per_kv > 2 ? 4 : (int)rows_per_kv;
    const int64_t row_tiles = (rows_per_kv + rows - 1) / rows;
    if (row_tiles > INT_MAX || kv_heads > 65535)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "attention decode: %lld row tiles × %d kv heads exceed one CUDA grid",
                       (long long)row_tiles, kv_heads);
    /* key ranges: enough CTAs for about two per SM, each at least one tile of keys */
    const int bc = tile_keys(head_dim);
    const int64_t keys = past + tokens, base = row_tiles * kv_heads, target = 2 * (int64_t)s->sm_count;
    int64_t splits = base >= target ? 1 : (target + base - 1) / base;
    const int64_t key_tiles = (keys + bc - 1) / bc;
    if (splits > key_tiles)
        splits = key_tiles;
    const int64_t tiles_per_split = (key_tiles + splits - 1) / splits;
    a.chunk = (int)(tiles_per_split * bc);
    splits = (keys + a.chunk - 1) / a.chunk;

    int max_smem = 0;
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, s->device));
    const int64_t nq = tokens * heads;
    void *scratch = NULL;
    if (splits > 1) {
        if (nq > INT_MAX)
            return ql_fail(QLORA_ERR_UNSUPPORTED, "attention decode: %lld query rows exceed one CUDA grid",
                           (long long)nq);
        const size_t acc_bytes = (size_t)splits * (size_t)nq * (size_t)head_dim * sizeof(float);
        QL_CHECK(qlora_alloc(s->owner, acc_bytes + (size_t)splits * (size_t)nq * 2 * sizeof(float), 1,
                             QLORA_MEM_WORKSPACE, &scratch));
        a.part_acc = (float *)scratch;
        a.part_ml = (float *)((char *)scratch + acc_bytes);
    }
    const dim3 grid((unsigned)row_tiles, (unsigned)splits, (unsigned)kv_heads);
    qlora_status st;
    if (head_dim <= 64)
        st = launch_d<64>(s, a, rows, grid, max_smem);
    else if (head_dim <= 128)
        st = launch_d<128>(s, a, rows, grid, max_smem);
    else if (head_dim <= 256)
        st = launch_d<256>(s, a, rows, grid, max_smem);
    else
        st = launch_d<512>(s, a, rows, grid, max_smem);
    if (st == QLORA_OK && splits > 1) {
        const dim3 cgrid((unsigned)nq), cblock(kCombineThreads);
        attn_decode_combine_kernel<<<cgrid, cblock, 0, s->stream>>>(a, (int)splits);
        st = ql_cuda_launch_report("attn_decode_combine_kernel", cgrid, cblock, __FILE__, __LINE__);
    }
    qlora_free(s->owner, scratch); /* waits for the stream first; NULL is a no-op */
    return st;
}
