/*
 * The 4-bit matmul launchers of cuda/linear_cuda.h: argument checks, the AUTO path table, and
 * the DEQUANT_CUBLAS path (W dequantized chunk by chunk into the state's BF16 workspace, then
 * cublasGemmEx with FP32 compute). The fused kernels live in nf4_gemv.cu and nf4_gemm_mma.cu.
 */
#include "nf4_matmul.cuh"

#include <limits.h>
#include <math.h>
#include <stdio.h>

extern "C" {
#include "quant4.h"
}

namespace {

constexpr int kThreads = 256;
constexpr size_t kMinWorkspaceCap = (size_t)64 << 10;

/* Holds the workspace lock for a scope, so every early return releases it. */
class workspace_lock_scope {
  public:
    explicit workspace_lock_scope(ql_cuda_state *s) : s_(s) { pthread_mutex_lock(&s_->workspace_lock); }
    ~workspace_lock_scope() { pthread_mutex_unlock(&s_->workspace_lock); }

  private:
    ql_cuda_state *s_;
    workspace_lock_scope(const workspace_lock_scope &);
    workspace_lock_scope &operator=(const workspace_lock_scope &);
};

int log2_of(int power_of_two) {
    int l = 0;
    while ((1 << l) < power_of_two)
        l++;
    return l;
}

/* Everything the kernels assume about W, checked once. */
qlora_status check_weight(const ql_cuda_state *s, const qlora_qtensor *w, const char *fn, int64_t *n, int64_t *k) {
    if (!w)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: the weight is NULL", fn);
    const char *label = w->name[0] ? w->name : "(unnamed)";
    if (w->ndim != 2)
        return ql_fail(QLORA_ERR_SHAPE, "%s: weight '%s' is %d-D; a linear weight is 2-D [out, in]", fn, label,
                       w->ndim);
    if (w->shape[0] < 0 || w->shape[1] < 0 || w->numel != w->shape[0] * w->shape[1])
        return ql_fail(QLORA_ERR_SHAPE, "%s: weight '%s' has shape [%lld, %lld] but numel %lld", fn, label,
                       (long long)w->shape[0], (long long)w->shape[1], (long long)w->numel);
    if (w->type != QLORA_QUANT_NF4 && w->type != QLORA_QUANT_FP4)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' has unknown quant type %d", fn, label, (int)w->type);
    if (!ql_quant4_blocksize_ok(w->blocksize))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' has blocksize %d, not a power of two in 32..4096", fn,
                       label, w->blocksize);
    const int64_t nblocks = (w->numel + w->blocksize - 1) / w->blocksize;
    if (w->nblocks != nblocks)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' has nblocks %lld, expected %lld", fn, label,
                       (long long)w->nblocks, (long long)nblocks);
    if (w->double_quant && w->nested_nblocks != (nblocks + QLORA_NESTED_BLOCKSIZE - 1) / QLORA_NESTED_BLOCKSIZE)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' has nested_nblocks %lld, expected %lld", fn, label,
                       (long long)w->nested_nblocks,
                       (long long)((nblocks + QLORA_NESTED_BLOCKSIZE - 1) / QLORA_NESTED_BLOCKSIZE));
    if (w->device != s->device)
        return ql_fail(QLORA_ERR_DEVICE, "%s: weight '%s' is on device %d, the context on CUDA device %d", fn, label,
                       w->device, s->device);
    if (w->numel > 0 && (!w->codes || (w->double_quant ? !w->qabsmax || !w->nested_absmax : !w->absmax)))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: weight '%s' has NULL %s", fn, label,
                       !w->codes ? "codes" : "block scales");
    *n = w->shape[0];
    *k = w->shape[1];
    return QLORA_OK;
}

qlora_status check_activation(const char *fn, const char *what, const void *p, int64_t elems) {
    if (elems > 0 && !p)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s is NULL", fn, what);
    if ((uintptr_t)p % 2 != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: %s %p is not 2-byte aligned (BF16)", fn, what, p);
    return QLORA_OK;
}

ql_nf4_call make_call(const qlora_qtensor *w, const uint16_t *in, int64_t m, const uint16_t *bias, float beta,
                      uint16_t *out) {
    ql_nf4_call c;
    c.w.codes = w->codes;
    c.w.absmax = w->double_quant ? NULL : w->absmax;
    c.w.qabsmax = w->double_quant ? w->qabsmax : NULL;
    c.w.nested = w->double_quant ? w->nested_absmax : NULL;
    c.w.offset = w->double_quant ? w->nested_offset : 0.0f;
    c.w.n = w->shape[0];
    c.w.k = w->shape[1];
    c.w.log2_bs = log2_of(w->blocksize);
    ql_nf4_fill_tables(w, &c.tab);
    c.in = in;
    c.m = m;
    c.bias = bias;
    c.beta = beta;
    c.out = out;
    return c;
}

/* AUTO: the path for a shape. These rows are ESTIMATES, not measurements; tools/gpu-check.sh
 * bench (qlora-bench linear on H100) must re-measure them and this table must follow.
 *  - M <= 16, forward: GEMV. It reads each weight byte once (0.5 B/weight) where cuBLAS BF16
 *    reads 2 B, and the dequantize round trip moves ~4.5 B.
 *  - M <= 512: FUSED_MMA. The dequantize round trip (~4.5 B/weight through HBM) costs more
 *    than mma.sync's lower peak against cuBLAS' wgmma kernels at these M.
 *  - larger M: DEQUANT_CUBLAS; the GEMM dominates and the round trip is a few percent. */
ql_nf4_matmul_path auto_path(int64_t m, int dx) {
    static const struct {
        int64_t max_m;
        ql_nf4_matmul_path fwd, dx;
    } table[] = {
        {16, QL_NF4_PATH_GEMV, QL_NF4_PATH_FUSED_MMA},
        {512, QL_NF4_PATH_FUSED_MMA, QL_NF4_PATH_FUSED_MMA},
        {INT64_MAX, QL_NF4_PATH_DEQUANT_CUBLAS, QL_NF4_PATH_DEQUANT_CUBLAS},
    };
    size_t i = 0;
    while (m > table[i].max_m)
        i++;
    return dx ? table[i].dx : table[i].fwd;
}

ql_nf4_matmul_path resolve(const ql_nf4_call &c, int dx, ql_nf4_matmul_path path) {
    if (dx && path == QL_NF4_PATH_GEMV)
        path = QL_NF4_PATH_AUTO;
    if (path == QL_NF4_PATH_AUTO) {
        path = auto_path(c.m, dx);
        /* The GEMV's scalar-safe kernel is for correctness, not speed: AUTO prefers cuBLAS. */
        if (path == QL_NF4_PATH_GEMV && !ql_nf4_gemv_fast_ok(c))
            path = QL_NF4_PATH_DEQUANT_CUBLAS;
    }
    if (path == QL_NF4_PATH_FUSED_MMA && !(dx ? ql_nf4_mma_dx_ok(c) : ql_nf4_mma_fwd_ok(c)))
        path = QL_NF4_PATH_DEQUANT_CUBLAS;
    return path;
}

/* out[r, c] = bias[c] + beta * out[r, c] through the shared output rule (out not read when
 * beta == 0): the bias pre-pass of DEQUANT_CUBLAS, and the whole result when K == 0. */
__global__ void __launch_bounds__(kThreads)
    bias_beta_kernel(uint16_t *__restrict__ out, int64_t rows, int64_t cols, const uint16_t *__restrict__ bias,
                     float beta) {
    const int64_t total = rows * cols;
    for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total; i += (int64_t)gridDim.x * kThreads)
        out[i] = ql_linear_out(0.0f, bias, i % cols, beta, out + i);
}

/* Dequantizes the block W[n0 : n0+rows, k0 : k0+cols] into out [rows, cols] BF16, each value
 * bf16_rn(code * absmax) as cuda/quant4.cu. VEC: 8 elements per step (cols, K, k0 multiples of
 * 8, codes 4-byte and out 16-byte aligned); a run of 8 at a flat index multiple of 8 lies in one
 * quant block. */
template <bool VEC>
__global__ void __launch_bounds__(kThreads)
    dequant_block_kernel(const ql_nf4_weight w, const __grid_constant__ ql_nf4_tables tab, int64_t n0, int64_t rows,
                         int64_t k0, int64_t cols, uint16_t *__restrict__ out) {
    __shared__ float s_code[16];
    __shared__ float s_dyn[256];
    if (threadIdx.x < 16)
        s_code[threadIdx.x] = tab.code[threadIdx.x];
    if (w.qabsmax)
        s_dyn[threadIdx.x] = tab.dyn[threadIdx.x];
    __syncthreads();
    const int64_t step = (int64_t)gridDim.x * kThreads;
    if (VEC) {
        const int64_t groups_per_row = cols / 8, total = rows * groups_per_row;
        for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total; i += step) {
            const int64_t r = i / groups_per_row, c = (i - r * groups_per_row) * 8;
            const int64_t e = (n0 + r) * w.k + k0 + c;
            const uint32_t bits = __ldg(reinterpret_cast<const uint32_t *>(w.codes + e / 2));
            const float scale = ql_nf4_block_absmax(w, e >> w.log2_bs, s_dyn);
            uint32_t h[4];
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const uint32_t byte = bits >> (8 * b);
                const uint32_t hi = ql_f32_to_bf16_bits(__fmul_rn(s_code[(byte >> 4) & 0xfu], scale));
                const uint32_t lo = ql_f32_to_bf16_bits(__fmul_rn(s_code[byte & 0xfu], scale));
                h[b] = hi | lo << 16;
            }
            *reinterpret_cast<uint4 *>(out + r * cols + c) = make_uint4(h[0], h[1], h[2], h[3]);
        }
        return;
    }
    const int64_t total = rows * cols;
    for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total; i += step) {
        const int64_t r = i / cols, c = i - r * cols;
        const int64_t e = (n0 + r) * w.k + k0 + c;
        const uint32_t byte = __ldg(w.codes + e / 2);
        const uint32_t nibble = (e & 1) ? byte & 0xfu : byte >> 4;
        out[i] = ql_f32_to_bf16_bits(__fmul_rn(s_code[nibble], ql_nf4_block_absmax(w, e >> w.log2_bs, s_dyn)));
    }
}

/* A grid-stride launch sized to fill the GPU a few times over, never more than the work. */
dim3 stride_grid(const ql_cuda_state *s, int64_t items) {
    int64_t ctas = (items + kThreads - 1) / kThreads;
    const int64_t most = (int64_t)s->sm_count * 8;
    if (ctas > most)
        ctas = most;
    return dim3((unsigned)(ctas < 1 ? 1 : ctas));
}

qlora_status launch_bias_beta(ql_cuda_state *s, uint16_t *out, int64_t rows, int64_t cols, const uint16_t *bias,
                              float beta) {
    if (rows == 0 || cols == 0)
        return QLORA_OK;
    const dim3 grid = stride_grid(s, rows * cols), block(kThreads);
    bias_beta_kernel<<<grid, block, 0, s->stream>>>(out, rows, cols, bias, beta);
    QL_CUDA_CHECK_LAUNCH("bias_beta_kernel", grid, block);
    return QLORA_OK;
}

qlora_status launch_dequant_block(ql_cuda_state *s, const ql_nf4_call &c, int64_t n0, int64_t rows, int64_t k0,
                                  int64_t cols, uint16_t *out) {
    const bool vec = cols % 8 == 0 && c.w.k % 8 == 0 && k0 % 8 == 0 && (uintptr_t)c.w.codes % 4 == 0 &&
                     (uintptr_t)out % 16 == 0;
    const dim3 grid = stride_grid(s, vec ? rows * cols / 8 : rows * cols), block(kThreads);
    if (vec)
        dequant_block_kernel<true><<<grid, block, 0, s->stream>>>(c.w, c.tab, n0, rows, k0, cols, out);
    else
        dequant_block_kernel<false><<<grid, block, 0, s->stream>>>(c.w, c.tab, n0, rows, k0, cols, out);
    QL_CUDA_CHECK_LAUNCH(vec ? "dequant_block_kernel<vec>" : "dequant_block_kernel<scalar>", grid, block);
    return QLORA_OK;
}

/* The workspace holding at least `bytes`; called with the workspace lock held. Growing frees
 * the old buffer only after the stream has drained (ql_cuda_free synchronizes). */
qlora_status workspace_reserve(ql_cuda_state *s, size_t bytes, uint16_t **out) {
    if (bytes > s->workspace_bytes) {
        QL_CHECK(ql_cuda_synchronize(s)); /* the old buffer may still be read by queued work */
        qlora_free(s->owner, s->d_workspace);
        s->d_workspace = NULL;
        s->workspace_bytes = 0;
        void *p = NULL;
        QL_CHECK(qlora_alloc(s->owner, bytes, 1, QLORA_MEM_WORKSPACE, &p));
        s->d_workspace = p;
        s->workspace_bytes = bytes;
    }
    *out = (uint16_t *)s->d_workspace;
    return QLORA_OK;
}

/* Chunk length along one dimension of W when the other one is `other` elements long: all of it
 * when it fits in the cap, else a multiple of 8 (at least 8) that does. Workspace lock held. */
int64_t chunk_len(const ql_cuda_state *s, int64_t len, int64_t other) {
    const size_t cap = s->workspace_cap;
    if ((size_t)len * (size_t)other * 2 <= cap)
        return len;
    int64_t c = (int64_t)(cap / ((size_t)other * 2)) / 8 * 8;
    if (c < 8)
        c = 8;
    return c < len ? c : len;
}

qlora_status int_dims(const char *fn, int64_t a, int64_t b, int64_t c) {
    if (a > INT_MAX || b > INT_MAX || c > INT_MAX)
        return ql_fail(QLORA_ERR_UNSUPPORTED, "%s: dimension %lld exceeds cuBLAS' int range", fn,
                       (long long)(a > b ? (a > c ? a : c) : (b > c ? b : c)));
    return QLORA_OK;
}

/* Y[M, N] = X · Wᵀ: per chunk of W rows [n0, n0 + rows): Y[:, n0 : n0+rows] (column-major, that
 * is Y_cm rows n0.., ld N) = W_chunk (row-major [rows, K] = column-major K x rows, transposed)
 * · X (row-major [M, K] = column-major K x M). */
qlora_status dequant_cublas_fwd(ql_cuda_state *s, const ql_nf4_call &c) {
    const int64_t N = c.w.n, K = c.w.k, M = c.m;
    QL_CHECK(int_dims("ql_cuda_nf4_matmul", N, K, M));
    float gemm_beta = c.beta;
    if (c.bias) { /* bias folded into Y first, then every chunk accumulates onto it */
        QL_CHECK(launch_bias_beta(s, c.out, M, N, c.bias, c.beta));
        gemm_beta = 1.0f;
    }
    workspace_lock_scope lock(s);
    const int64_t rows = chunk_len(s, N, K);
    uint16_t *ws = NULL;
    QL_CHECK(workspace_reserve(s, (size_t)rows * (size_t)K * 2, &ws));
    const float one = 1.0f;
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t r = N - n0 < rows ? N - n0 : rows;
        QL_CHECK(launch_dequant_block(s, c, n0, r, 0, K, ws));
        QL_CHECK(ql_cublas_gemm(s, CUBLAS_OP_T, CUBLAS_OP_N, (int)r, (int)M, (int)K, one, ws, (int)K, c.in, (int)K,
                                gemm_beta, c.out + n0, CUDA_R_16BF, (int)N));
    }
    return QLORA_OK;
}

/* dX[M, K] = dY · W: per chunk of W columns [k0, k0 + cols): dX[:, k0 : k0+cols] (column-major
 * rows k0.., ld K) = W[:, chunk] (dequantized row-major [N, cols] = column-major cols x N) ·
 * dY (row-major [M, N] = column-major N x M). */
qlora_status dequant_cublas_dx(ql_cuda_state *s, const ql_nf4_call &c) {
    const int64_t N = c.w.n, K = c.w.k, M = c.m;
    QL_CHECK(int_dims("ql_cuda_nf4_matmul_dx", N, K, M));
    workspace_lock_scope lock(s);
    const int64_t cols = chunk_len(s, K, N);
    uint16_t *ws = NULL;
    QL_CHECK(workspace_reserve(s, (size_t)cols * (size_t)N * 2, &ws));
    const float one = 1.0f;
    for (int64_t k0 = 0; k0 < K; k0 += cols) {
        const int64_t w_cols = K - k0 < cols ? K - k0 : cols;
        QL_CHECK(launch_dequant_block(s, c, 0, N, k0, w_cols, ws));
        QL_CHECK(ql_cublas_gemm(s, CUBLAS_OP_N, CUBLAS_OP_N, (int)w_cols, (int)M, (int)N, one, ws, (int)w_cols, c.in,
                                (int)N, c.beta, c.out + k0, CUDA_R_16BF, (int)K));
    }
    return QLORA_OK;
}

bool path_known(ql_nf4_matmul_path p) {
    return p == QL_NF4_PATH_AUTO || p == QL_NF4_PATH_GEMV || p == QL_NF4_PATH_FUSED_MMA ||
           p == QL_NF4_PATH_DEQUANT_CUBLAS;
}

/* Checks shared by the forward launchers; *skip = 1 when there is nothing to compute. */
qlora_status check_forward(ql_cuda_state *s, const char *fn, const qlora_qtensor *w, const uint16_t *d_x, int64_t m,
                           const uint16_t *d_bias, float beta, uint16_t *d_y, int64_t *n, int64_t *k) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_CHECK(check_weight(s, w, fn, n, k));
    if (m < 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: M = %lld < 0", fn, (long long)m);
    if (!isfinite(beta))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: beta is not finite", fn);
    QL_CHECK(check_activation(fn, "X", d_x, m * *k));
    QL_CHECK(check_activation(fn, "Y", d_y, m * *n));
    QL_CHECK(check_activation(fn, "bias", d_bias, 0));
    return QLORA_OK;
}

} // namespace

/* ------------------------------------------------------------------ shared with the kernels */

void ql_nf4_fill_tables(const qlora_qtensor *w, ql_nf4_tables *tab) {
    for (int i = 0; i < 16; i++)
        tab->code[i] = w->code[i];
    for (int i = 0; i < 256; i++)
        tab->dyn[i] = w->double_quant ? w->nested_code[i] : 0.0f;
}

/* ------------------------------------------------------------------ launchers */

/* ql_cuda_nf4_matmul, and ql_cuda_nf4_gemv_tuned with an explicit GEMV row grouping (0: the
 * tuned default). */
static qlora_status forward(ql_cuda_state *s, const char *fn, const qlora_qtensor *w, const uint16_t *d_x, int64_t m,
                            const uint16_t *d_bias, float beta, uint16_t *d_y, ql_nf4_matmul_path path,
                            int row_groups) {
    int64_t n = 0, k = 0;
    QL_CHECK(check_forward(s, fn, w, d_x, m, d_bias, beta, d_y, &n, &k));
    if (!path_known(path))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: unknown path %d", fn, (int)path);
    if (path == QL_NF4_PATH_GEMV && m > 16)
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: the GEMV path takes M <= 16 rows, got M = %lld", fn,
                       (long long)m);
    if (m == 0 || n == 0)
        return QLORA_OK;
    QL_CUDA_ENTER(s);
    const ql_nf4_call c = make_call(w, d_x, m, d_bias, beta, d_y);
    if (k == 0)
        return launch_bias_beta(s, d_y, m, n, d_bias, beta);
    switch (resolve(c, 0, path)) { /* an explicit GEMV stays GEMV in the forward */
    case QL_NF4_PATH_GEMV: return ql_nf4_gemv_launch(s, c, row_groups);
    case QL_NF4_PATH_FUSED_MMA: return ql_nf4_mma_fwd_launch(s, c);
    default: return dequant_cublas_fwd(s, c);
    }
}

extern "C" qlora_status ql_cuda_nf4_matmul(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_x, int64_t m,
                                           const uint16_t *d_bias, float beta, uint16_t *d_y,
                                           ql_nf4_matmul_path path) {
    return forward(s, "ql_cuda_nf4_matmul", w, d_x, m, d_bias, beta, d_y, path, 0);
}

extern "C" qlora_status ql_cuda_nf4_gemv_tuned(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_x,
                                               int64_t m, const uint16_t *d_bias, float beta, uint16_t *d_y,
                                               int row_groups) {
    return forward(s, "ql_cuda_nf4_gemv_tuned", w, d_x, m, d_bias, beta, d_y, QL_NF4_PATH_GEMV, row_groups);
}

extern "C" qlora_status ql_cuda_nf4_matmul_dx(ql_cuda_state *s, const qlora_qtensor *w, const uint16_t *d_dy,
                                              int64_t m, float beta, uint16_t *d_dx, ql_nf4_matmul_path path) {
    static const char fn[] = "ql_cuda_nf4_matmul_dx";
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    int64_t n = 0, k = 0;
    QL_CHECK(check_weight(s, w, fn, &n, &k));
    if (m < 0)
        return ql_fail(QLORA_ERR_SHAPE, "%s: M = %lld < 0", fn, (long long)m);
    if (!isfinite(beta))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: beta is not finite", fn);
    if (!path_known(path))
        return ql_fail(QLORA_ERR_INVALID_ARG, "%s: unknown path %d", fn, (int)path);
    QL_CHECK(check_activation(fn, "dY", d_dy, m * n));
    QL_CHECK(check_activation(fn, "dX", d_dx, m * k));
    if (m == 0 || k == 0)
        return QLORA_OK;
    QL_CUDA_ENTER(s);
    const ql_nf4_call c = make_call(w, d_dy, m, NULL, beta, d_dx);
    if (n == 0)
        return launch_bias_beta(s, d_dx, m, k, NULL, beta);
    if (resolve(c, 1, path) == QL_NF4_PATH_FUSED_MMA)
        return ql_nf4_mma_dx_launch(s, c);
    return dequant_cublas_dx(s, c);
}

extern "C" ql_nf4_matmul_path ql_cuda_nf4_resolve_path(const qlora_qtensor *w, const void *d_in, int64_t m, int dx,
                                                       ql_nf4_matmul_path path) {
    if (!w || w->ndim != 2)
        return path;
    ql_nf4_call c = make_call(w, (const uint16_t *)d_in, m, NULL, 0.0f, NULL);
    return resolve(c, dx, path);
}

extern "C" size_t ql_cuda_workspace_bytes(ql_cuda_state *s) {
    if (!s)
        return 0;
    workspace_lock_scope lock(s);
    return s->workspace_bytes;
}

extern "C" void ql_cuda_workspace_release(ql_cuda_state *s) {
    if (!s)
        return;
    workspace_lock_scope lock(s);
    if (s->d_workspace && ql_cuda_synchronize(s) != QLORA_OK)
        ql_log(QLORA_LOG_WARN, "ql_cuda_workspace_release: device %d: %s", s->device, qlora_last_error());
    qlora_free(s->owner, s->d_workspace);
    s->d_workspace = NULL;
    s->workspace_bytes = 0;
}

extern "C" void ql_cuda_set_workspace_cap(ql_cuda_state *s, size_t cap) {
    if (!s)
        return;
    workspace_lock_scope lock(s);
    s->workspace_cap = cap == 0 ? QL_CUDA_WORKSPACE_CAP_DEFAULT : cap < kMinWorkspaceCap ? kMinWorkspaceCap : cap;
}
