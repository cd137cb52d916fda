/*
 * Fast host AdamW math (lib/adamw.h): OpenMP over element ranges and branch-free loops the
 * compiler vectorises. Same float32 operations as lib/adamw_ref.c in the same order, and
 * sqrtf/division are IEEE-exact in SIMD too, so every output bit equals the reference.
 * Built with -fno-math-errno (CMakeLists.txt): sqrtf's errno side effect blocks vectorisation.
 */
#include "adamw.h"
#include "half.h"
#include "simd_attrs.h"

#include <math.h>
#include <omp.h>

/* Below this many elements a parallel region costs more than it saves. */
#define QL_ADAMW_PARALLEL_MIN (1 << 15)
/* Elements per work item of the update: large enough to amortise the call, small enough that
 * threads finish together. */
#define QL_ADAMW_RANGE 8192

static int thread_count(int num_threads) { return num_threads > 0 ? num_threads : omp_get_max_threads(); }

QL_INLINE float load_grad(const void *grad, qlora_dtype grad_dtype, int64_t i) {
    if (grad_dtype == QLORA_F32)
        return ((const float *)grad)[i];
    return ql_bf16_to_f32(((const uint16_t *)grad)[i]);
}

/* ---- update ---- */

QL_INLINE void update_range(const ql_adamw_step *s, uint16_t *restrict param, float *restrict master,
                            const void *restrict grad, qlora_dtype grad_dtype, float *restrict m,
                            float *restrict v, int64_t begin, int64_t end) {
    /* Locals, so the loop does not reload the scalars through a pointer that might alias. */
    const float grad_scale = s->grad_scale, beta1 = s->beta1, one_minus_beta1 = s->one_minus_beta1;
    const float beta2 = s->beta2, one_minus_beta2 = s->one_minus_beta2;
    const float step_size = s->step_size, eps_c2 = s->eps_c2, decay = s->decay;
    for (int64_t i = begin; i < end; i++) {
        float g = load_grad(grad, grad_dtype, i) * grad_scale;
        float m_new = beta1 * m[i] + one_minus_beta1 * g;
        float v_new = beta2 * v[i] + one_minus_beta2 * (g * g);
        float ratio = m_new / (sqrtf(v_new) + eps_c2);
        float p = master ? master[i] : ql_bf16_to_f32(param[i]);
        p = (p - step_size * ratio) * decay;
        m[i] = m_new;
        v[i] = v_new;
        if (master)
            master[i] = p;
        param[i] = ql_f32_to_bf16(p);
    }
}

typedef void (*update_range_fn)(const ql_adamw_step *s, uint16_t *param, float *master, const void *grad,
                                float *m, float *v, int64_t begin, int64_t end);

/* One copy per (gradient dtype, master or not), each with its branches resolved at compile time,
 * compiled for AVX-512, AVX2 and the baseline. */
#define QL_DEFINE_UPDATE_RANGE(NAME, GRAD_DTYPE, HAS_MASTER)                                                \
    QL_TARGET_CLONES("avx512f", "avx2", "default")                                                          \
    static void NAME(const ql_adamw_step *s, uint16_t *param, float *master, const void *grad, float *m,     \
                     float *v, int64_t begin, int64_t end) {                                                 \
        update_range(s, param, HAS_MASTER ? master : NULL, grad, GRAD_DTYPE, m, v, begin, end);              \
    }
QL_DEFINE_UPDATE_RANGE(update_range_f32_master, QLORA_F32, 1)
QL_DEFINE_UPDATE_RANGE(update_range_f32_bf16only, QLORA_F32, 0)
QL_DEFINE_UPDATE_RANGE(update_range_bf16_master, QLORA_BF16, 1)
QL_DEFINE_UPDATE_RANGE(update_range_bf16_bf16only, QLORA_BF16, 0)

static update_range_fn pick_update_range(qlora_dtype grad_dtype, int has_master) {
    if (grad_dtype == QLORA_F32)
        return has_master ? update_range_f32_master : update_range_f32_bf16only;
    return has_master ? update_range_bf16_master : update_range_bf16_bf16only;
}

void ql_adamw_update_fast(const ql_adamw_step *s, uint16_t *param, float *master, const void *grad,
                          qlora_dtype grad_dtype, float *m, float *v, int64_t n, int num_threads) {
    update_range_fn update = pick_update_range(grad_dtype, master != NULL);
    const ql_adamw_step step = *s;
    int64_t nranges = (n + QL_ADAMW_RANGE - 1) / QL_ADAMW_RANGE;
#pragma omp parallel for schedule(static) num_threads(thread_count(num_threads)) if (n >= QL_ADAMW_PARALLEL_MIN)
    for (int64_t r = 0; r < nranges; r++) {
        int64_t begin = r * QL_ADAMW_RANGE;
        int64_t end = n - begin < QL_ADAMW_RANGE ? n : begin + QL_ADAMW_RANGE;
        update(&step, param, master, grad, m, v, begin, end);
    }
}

/* ---- gradient sum of squares ----
 * The canonical order is a sequential double sum per chunk, a chain the CPU can only run one add
 * at a time. The chunks are independent, though: LANES of them are summed side by side in one
 * loop, which keeps each chunk's order and gives the adder LANES chains to overlap. */

#define QL_SUMSQ_LANES 8
/* Chunk sums kept on the stack per round; the rounds are folded in order. */
#define QL_SUMSQ_ROUND 256

QL_INLINE double square(const void *grad, qlora_dtype grad_dtype, int64_t i) {
    double g = load_grad(grad, grad_dtype, i);
    return g * g;
}

/* Sums chunks [first, first + count) into sums[0, count): lockstep over the part every one of
 * them has, then each chunk's own remainder (only the last chunk of the gradient is short).
 * count is a constant in every inlined copy, so the lockstep loop is fully unrolled. */
QL_INLINE void sum_chunks(const void *grad, qlora_dtype grad_dtype, int64_t n, int64_t first, int count,
                          double *sums) {
    double s[QL_SUMSQ_LANES];
    int64_t length[QL_SUMSQ_LANES], common = QL_SUMSQ_CHUNK;
    for (int k = 0; k < count; k++) {
        int64_t begin = (first + k) * QL_SUMSQ_CHUNK;
        length[k] = n - begin < QL_SUMSQ_CHUNK ? n - begin : QL_SUMSQ_CHUNK;
        common = length[k] < common ? length[k] : common;
        s[k] = 0.0;
    }
    const int64_t base = first * QL_SUMSQ_CHUNK;
    for (int64_t i = 0; i < common; i++)
        for (int k = 0; k < count; k++)
            s[k] += square(grad, grad_dtype, base + k * QL_SUMSQ_CHUNK + i);
    for (int k = 0; k < count; k++) {
        for (int64_t i = common; i < length[k]; i++)
            s[k] += square(grad, grad_dtype, base + k * QL_SUMSQ_CHUNK + i);
        sums[k] = s[k];
    }
}

#define QL_SUM_CHUNKS_CASE(K)                                   \
    case K:                                                     \
        sum_chunks(grad, grad_dtype, n, first, K, sums);        \
        break;

QL_INLINE void sum_chunks_any(const void *grad, qlora_dtype grad_dtype, int64_t n, int64_t first, int count,
                              double *sums) {
    switch (count) {
        QL_SUM_CHUNKS_CASE(1)
        QL_SUM_CHUNKS_CASE(2)
        QL_SUM_CHUNKS_CASE(3)
        QL_SUM_CHUNKS_CASE(4)
        QL_SUM_CHUNKS_CASE(5)
        QL_SUM_CHUNKS_CASE(6)
        QL_SUM_CHUNKS_CASE(7)
        QL_SUM_CHUNKS_CASE(8)
    default: break; /* callers pass 1..QL_SUMSQ_LANES */
    }
}

typedef void (*sum_chunks_fn)(const void *grad, int64_t n, int64_t first, int count, double *sums);

static void sum_chunks_f32(const void *grad, int64_t n, int64_t first, int count, double *sums) {
    sum_chunks_any(grad, QLORA_F32, n, first, count, sums);
}

static void sum_chunks_bf16(const void *grad, int64_t n, int64_t first, int count, double *sums) {
    sum_chunks_any(grad, QLORA_BF16, n, first, count, sums);
}

double ql_grad_sumsq_fast(const void *grad, qlora_dtype grad_dtype, int64_t n, int *nonfinite, int num_threads) {
    sum_chunks_fn sum = grad_dtype == QLORA_F32 ? sum_chunks_f32 : sum_chunks_bf16;
    const int threads = thread_count(num_threads);
    double sums[QL_SUMSQ_ROUND];
    double total = 0.0;
    int64_t nchunks = (n + QL_SUMSQ_CHUNK - 1) / QL_SUMSQ_CHUNK;
    for (int64_t first = 0; first < nchunks; first += QL_SUMSQ_ROUND) {
        int count = nchunks - first < QL_SUMSQ_ROUND ? (int)(nchunks - first) : QL_SUMSQ_ROUND;
        /* At least one group per thread while there are chunks for it, at most LANES chunks per
         * group; group g takes chunks [g * count / ngroups, (g + 1) * count / ngroups). */
        int ngroups = (count + QL_SUMSQ_LANES - 1) / QL_SUMSQ_LANES;
        if (ngroups < threads)
            ngroups = threads < count ? threads : count;
#pragma omp parallel for schedule(static) num_threads(threads) if (ngroups > 1)
        for (int group = 0; group < ngroups; group++) {
            int k0 = group * count / ngroups, k1 = (group + 1) * count / ngroups;
            sum(grad, n, first + k0, k1 - k0, sums + k0);
        }
        for (int k = 0; k < count; k++)
            total += sums[k];
    }
    /* As the reference: the total is NaN/Inf exactly when some element is. */
    if (nonfinite)
        *nonfinite = !isfinite(total);
    return total;
}
