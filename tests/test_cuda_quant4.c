/*
 * The CUDA launchers of cuda/cuda_backend.h called directly and compared byte for byte with the
 * CPU reference (lib/quant4_ref.c), including the paths the public API never takes: misaligned
 * input, code and output pointers (the kernels' scalar paths), every blocksize, odd and partial
 * tails, blocks of zeros and of subnormals, several non-finite elements, and more than 1024
 * summation chunks in double quantization. Outputs are poisoned first and guard bytes around
 * them must survive. Without a CUDA device only the no-device behaviour is checked.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "internal.h"
#include "quant4.h"
#include "testutil.h"
#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#include "testutil_cuda.h"
#endif

static int log_calls;
static void count_log(qlora_log_level level, const char *message, void *user) {
    (void)level;
    (void)message;
    (void)user;
    log_calls++;
}

/* Asking for the device count must never fail loudly (no error, no log), GPU or not. */
START_TEST(device_count_is_quiet) {
    qlora_set_log_callback(count_log, NULL);
    qlora_clear_error();
    log_calls = 0;
    int n = qlora_cuda_device_count();
    int again = qlora_cuda_device_count();
    qlora_set_log_callback(NULL, NULL);
    ck_assert_int_ge(n, 0);
    ck_assert_int_eq(n, again);
    ck_assert_int_eq(log_calls, 0);
    ck_assert_str_eq(qlora_last_error(), "");
    if (!qlora_has_cuda_backend())
        ck_assert_int_eq(n, 0);
}
END_TEST

#ifdef QLORA_HAVE_CUDA

#define POISON 0xAB

static size_t elem_size(qlora_dtype d) { return d == QLORA_F32 ? 4 : 2; }

/* N(0,1) data with zeros, tiny and large values mixed in; block 0 all zeros and block 1 made of
 * subnormal-sized values (1/absmax overflows to +Inf there) when the data has that many blocks. */
static float *test_data(tu_rng *rng, int64_t n, int blocksize) {
    float *x = malloc((size_t)(n ? n : 1) * sizeof(float));
    ck_assert_ptr_nonnull(x);
    tu_fill_normal(rng, x, n, 1.0f);
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = tu_next(rng) % 32;
        x[i] *= r == 0 ? 0.0f : r == 1 ? 1e-6f : r == 2 ? 40.0f : 1.0f;
    }
    if (n >= 3 * (int64_t)blocksize) {
        for (int i = 0; i < blocksize; i++) {
            x[i] = 0.0f;
            x[blocksize + i] *= 1e-39f;
        }
    }
    return x;
}

static const int blocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
static const qlora_dtype float_dtypes[] = {QLORA_F32, QLORA_F16, QLORA_BF16};

/* (input offset in elements, codes offset in bytes): 0/0 takes the vector paths, the others the
 * scalar load and/or store paths. */
static const int offsets[][2] = {{0, 0}, {1, 1}, {0, 1}};

static void check_quantize(tu_gpu *g, tu_rng *rng, qlora_dtype dtype, qlora_quant_type type, int bs, int64_t n) {
    float *x = test_data(rng, n, bs);
    void *xin = tu_to_dtype(x, n, dtype);
    int64_t nblocks = (n + bs - 1) / bs;
    size_t ncodes = (size_t)(n + 1) / 2;
    uint8_t *want_codes = calloc(ncodes + 1, 1);
    float *want_absmax = calloc((size_t)nblocks + 1, sizeof(float));
    ck_assert(want_codes && want_absmax);
    ck_assert_int_eq(ql_quant4_ref(xin, dtype, n, bs, type, want_codes, want_absmax), -1);
    for (size_t v = 0; v < sizeof offsets / sizeof offsets[0]; v++) {
        size_t in_off = (size_t)offsets[v][0] * elem_size(dtype), code_off = (size_t)offsets[v][1];
        char what[160];
        snprintf(what, sizeof what, "quantize %s %s blocksize %d n %lld offsets %zu/%zu", qlora_dtype_name(dtype),
                 qlora_quant_type_name(type), bs, (long long)n, in_off, code_off);
        tu_dbuf d_x = tu_dbuf_from(g, xin, (size_t)n * elem_size(dtype), in_off);
        tu_dbuf d_codes = tu_dbuf_new(g, ncodes, code_off);
        tu_dbuf d_absmax = tu_dbuf_new(g, (size_t)nblocks * 4, 0);
        int64_t bad = 12345;
        ck_assert_qlora_ok(ql_cuda_quantize_4bit(g->cs, tu_dbuf_ptr(&d_x), dtype, n, bs, type, tu_dbuf_ptr(&d_codes),
                                                 tu_dbuf_ptr(&d_absmax), &bad));
        ck_assert_msg(bad == -1, "%s: first_nonfinite %lld on finite data", what, (long long)bad);
        uint8_t *codes = tu_dbuf_download(g, &d_codes, what);
        uint8_t *absmax = tu_dbuf_download(g, &d_absmax, what);
        for (size_t j = 0; j < ncodes; j++)
            ck_assert_msg(codes[j] == want_codes[j], "%s: code byte %zu is 0x%02x, reference 0x%02x", what, j, codes[j],
                          want_codes[j]);
        for (int64_t b = 0; b < nblocks; b++) {
            uint32_t got, want;
            memcpy(&got, absmax + 4 * b, 4);
            memcpy(&want, &want_absmax[b], 4);
            ck_assert_msg(got == want, "%s: absmax[%lld] %a, reference %a", what, (long long)b,
                          (double)ql_bits_f32(got), (double)want_absmax[b]);
        }
        free(codes);
        free(absmax);
        tu_dbuf_free(g, &d_x);
        tu_dbuf_free(g, &d_codes);
        tu_dbuf_free(g, &d_absmax);
    }
    free(x);
    free(xin);
    free(want_codes);
    free(want_absmax);
}

START_TEST(quantize_matches_reference) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x51);
    for (size_t d = 0; d < 3; d++) {
        for (int t = 0; t < 2; t++) {
            for (size_t k = 0; k < sizeof blocksizes / sizeof blocksizes[0]; k++) {
                int bs = blocksizes[k];
                const int64_t sizes[] = {1, 2, 7, 9, bs - 1, bs, bs + 1, 3 * (int64_t)bs + 5};
                for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
                    check_quantize(&g, &rng, float_dtypes[d], (qlora_quant_type)t, bs, sizes[s]);
            }
        }
        check_quantize(&g, &rng, float_dtypes[d], QLORA_QUANT_NF4, 64, (1 << 20) + 3);
    }
    tu_gpu_close(&g);
}
END_TEST

START_TEST(quantize_reports_the_first_nonfinite_element) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x52);
    for (size_t d = 0; d < 3; d++) {
        qlora_dtype dtype = float_dtypes[d];
        int64_t n = 50000 + (int64_t)(tu_next(&rng) % 1000);
        float *x = malloc((size_t)n * sizeof(float));
        ck_assert_ptr_nonnull(x);
        for (int trial = 0; trial < 4; trial++) {
            tu_fill_normal(&rng, x, n, 1.0f);
            /* trial 0: one at element 0; trial 1: only the last element; then anywhere. */
            int64_t pos[3];
            for (int k = 0; k < 3; k++)
                pos[k] = trial == 1 ? n - 1 : (int64_t)(tu_next(&rng) % (uint64_t)n);
            if (trial == 0)
                pos[1] = 0;
            const float specials[3] = {NAN, INFINITY, -INFINITY};
            int64_t first = n;
            for (int k = 0; k < 3; k++) {
                x[pos[k]] = specials[k];
                first = pos[k] < first ? pos[k] : first;
            }
            void *xin = tu_to_dtype(x, n, dtype);
            tu_dbuf d_x = tu_dbuf_from(&g, xin, (size_t)n * elem_size(dtype), 0);
            tu_dbuf d_codes = tu_dbuf_new(&g, (size_t)(n + 1) / 2, 0);
            tu_dbuf d_absmax = tu_dbuf_new(&g, (size_t)(n / 64 + 1) * 4, 0);
            int64_t bad = -7;
            ck_assert_qlora_ok(ql_cuda_quantize_4bit(g.cs, tu_dbuf_ptr(&d_x), dtype, n, 64, QLORA_QUANT_NF4,
                                                     tu_dbuf_ptr(&d_codes), tu_dbuf_ptr(&d_absmax), &bad));
            ck_assert_msg(bad == first, "%s trial %d: first_nonfinite %lld, expected %lld", qlora_dtype_name(dtype),
                          trial, (long long)bad, (long long)first);
            float *ref_absmax = malloc((size_t)(n / 64 + 1) * 4);
            uint8_t *ref_codes = malloc((size_t)(n + 1) / 2);
            ck_assert(ref_absmax && ref_codes);
            ck_assert_int_eq(ql_quant4_ref(xin, dtype, n, 64, QLORA_QUANT_NF4, ref_codes, ref_absmax), first);
            free(ref_absmax);
            free(ref_codes);
            free(xin);
            tu_dbuf_free(&g, &d_x);
            tu_dbuf_free(&g, &d_codes);
            tu_dbuf_free(&g, &d_absmax);
        }
        free(x);
    }
    tu_gpu_close(&g);
}
END_TEST

static void check_double_quant(tu_gpu *g, tu_rng *rng, int64_t nblocks, int all_equal) {
    float *absmax = malloc((size_t)nblocks * sizeof(float));
    ck_assert_ptr_nonnull(absmax);
    for (int64_t i = 0; i < nblocks; i++)
        absmax[i] = all_equal ? 0.75f : (float)fabs(tu_normal(rng)) * 0.05f + 1e-4f;
    int64_t nested_n = (nblocks + 255) / 256;
    const float *dyn = qlora_dynamic_map_signed();
    uint8_t *want_q = malloc((size_t)nblocks);
    float *want_nested = malloc((size_t)nested_n * sizeof(float));
    ck_assert(want_q && want_nested);
    float want_offset = ql_double_quant_ref(absmax, nblocks, dyn, want_q, want_nested);
    char what[96];
    snprintf(what, sizeof what, "double quant of %lld scales%s", (long long)nblocks, all_equal ? " (all equal)" : "");

    tu_dbuf d_absmax = tu_dbuf_from(g, absmax, (size_t)nblocks * 4, 4); /* 4 bytes off a 16-byte boundary */
    tu_dbuf d_q = tu_dbuf_new(g, (size_t)nblocks, 0);
    tu_dbuf d_nested = tu_dbuf_new(g, (size_t)nested_n * 4, 0);
    float offset = -1.0f;
    ck_assert_qlora_ok(ql_cuda_double_quant(g->cs, tu_dbuf_ptr(&d_absmax), nblocks, dyn, tu_dbuf_ptr(&d_q),
                                            tu_dbuf_ptr(&d_nested), &offset));
    ck_assert_msg(ql_f32_bits(offset) == ql_f32_bits(want_offset), "%s: offset %a, reference %a", what,
                  (double)offset, (double)want_offset);
    uint8_t *q = tu_dbuf_download(g, &d_q, what);
    uint8_t *nested = tu_dbuf_download(g, &d_nested, what);
    for (int64_t i = 0; i < nblocks; i++)
        ck_assert_msg(q[i] == want_q[i], "%s: qabsmax[%lld] = %u, reference %u", what, (long long)i, q[i], want_q[i]);
    ck_assert_msg(memcmp(nested, want_nested, (size_t)nested_n * 4) == 0, "%s: nested absmax differs", what);
    free(q);
    free(nested);
    free(absmax);
    free(want_q);
    free(want_nested);
    tu_dbuf_free(g, &d_absmax);
    tu_dbuf_free(g, &d_q);
    tu_dbuf_free(g, &d_nested);
}

START_TEST(double_quant_matches_reference) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x53);
    /* 1029 chunks of QL_DQ_SUM_CHUNK: more than one round of the 1024-thread summation. */
    const int64_t sizes[] = {1, 2, 255, 256, 257, 4095, 4096, 4097, 3 * 4096 + 17, 1029 * (int64_t)QL_DQ_SUM_CHUNK - 3};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        check_double_quant(&g, &rng, sizes[s], 0);
    check_double_quant(&g, &rng, 1000, 1);
    /* nblocks == 0: offset 0 and nothing written, like the reference. */
    float offset = -1.0f;
    ck_assert_qlora_ok(ql_cuda_double_quant(g.cs, NULL, 0, qlora_dynamic_map_signed(), NULL, NULL, &offset));
    ck_assert(offset == 0.0f);
    tu_gpu_close(&g);
}
END_TEST

static void check_dequantize(tu_gpu *g, tu_rng *rng, qlora_dtype out_dtype, int double_quant, int bs, int64_t n,
                             size_t out_off_elems, size_t code_off) {
    qlora_quant_type type = (qlora_quant_type)(tu_next(rng) % 2);
    int64_t nblocks = (n + bs - 1) / bs, nested_n = (nblocks + 255) / 256;
    size_t ncodes = (size_t)(n + 1) / 2, osz = elem_size(out_dtype);
    uint8_t *codes = malloc(ncodes), *qabsmax = malloc((size_t)nblocks);
    float *absmax = malloc((size_t)nblocks * 4), *nested = malloc((size_t)nested_n * 4);
    float *decoded = malloc((size_t)nblocks * 4);
    void *want = malloc((size_t)n * osz);
    ck_assert(codes && qabsmax && absmax && nested && decoded && want);
    for (size_t j = 0; j < ncodes; j++)
        codes[j] = (uint8_t)tu_next(rng);
    for (int64_t b = 0; b < nblocks; b++) {
        absmax[b] = (float)fabs(tu_normal(rng)) * 3.0f;
        qabsmax[b] = (uint8_t)tu_next(rng);
    }
    for (int64_t k = 0; k < nested_n; k++)
        nested[k] = (float)fabs(tu_normal(rng)) * 0.1f;
    float offset = (float)fabs(tu_normal(rng)) * 0.2f;
    const float *dyn = qlora_dynamic_map_signed();
    if (double_quant)
        ql_double_dequant_ref(qabsmax, nested, offset, dyn, nblocks, decoded);
    else
        memcpy(decoded, absmax, (size_t)nblocks * 4);
    ql_dequant4_ref(codes, decoded, qlora_quant_codebook(type), n, bs, want, out_dtype);

    char what[160];
    snprintf(what, sizeof what, "dequantize %s->%s%s blocksize %d n %lld offsets %zu/%zu", qlora_quant_type_name(type),
             qlora_dtype_name(out_dtype), double_quant ? " (double quant)" : "", bs, (long long)n, out_off_elems,
             code_off);
    tu_dbuf d_codes = tu_dbuf_from(g, codes, ncodes, code_off);
    tu_dbuf d_absmax = tu_dbuf_from(g, absmax, (size_t)nblocks * 4, 0);
    tu_dbuf d_q = tu_dbuf_from(g, qabsmax, (size_t)nblocks, 0);
    tu_dbuf d_nested = tu_dbuf_from(g, nested, (size_t)nested_n * 4, 0);
    tu_dbuf d_out = tu_dbuf_new(g, (size_t)n * osz, out_off_elems * osz);

    qlora_qtensor q;
    memset(&q, 0, sizeof q);
    q.type = type;
    q.blocksize = bs;
    q.double_quant = double_quant;
    q.dtype = out_dtype;
    q.ndim = 1;
    q.shape[0] = n;
    q.numel = n;
    q.nblocks = nblocks;
    q.nested_nblocks = double_quant ? nested_n : 0;
    q.codes = tu_dbuf_ptr(&d_codes);
    q.absmax = double_quant ? NULL : tu_dbuf_ptr(&d_absmax);
    q.qabsmax = double_quant ? tu_dbuf_ptr(&d_q) : NULL;
    q.nested_absmax = double_quant ? tu_dbuf_ptr(&d_nested) : NULL;
    q.nested_offset = double_quant ? offset : 0.0f;
    memcpy(q.code, qlora_quant_codebook(type), sizeof q.code);
    memcpy(q.nested_code, dyn, sizeof q.nested_code);
    q.device = 0;
    ql_copy_name(q.name, "cuda-dequant-test");
    ck_assert_qlora_ok(ql_cuda_dequantize_4bit(g->cs, &q, tu_dbuf_ptr(&d_out), out_dtype));
    uint8_t *got = tu_dbuf_download(g, &d_out, what);
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(got + i * osz, (uint8_t *)want + i * osz, osz) == 0, "%s: element %lld differs", what,
                      (long long)i);
    free(got);
    free(codes);
    free(qabsmax);
    free(absmax);
    free(nested);
    free(decoded);
    free(want);
    tu_dbuf_free(g, &d_codes);
    tu_dbuf_free(g, &d_absmax);
    tu_dbuf_free(g, &d_q);
    tu_dbuf_free(g, &d_nested);
    tu_dbuf_free(g, &d_out);
}

START_TEST(dequantize_matches_reference) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x54);
    for (size_t d = 0; d < 3; d++) {
        for (int dq = 0; dq < 2; dq++) {
            for (size_t k = 0; k < sizeof blocksizes / sizeof blocksizes[0]; k++) {
                int bs = blocksizes[k];
                const int64_t sizes[] = {1, 3, 8, 9, bs + 3, 5 * (int64_t)bs + 3, 300 * (int64_t)bs + 1};
                for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
                    check_dequantize(&g, &rng, float_dtypes[d], dq, bs, sizes[s], 0, 0);
                    check_dequantize(&g, &rng, float_dtypes[d], dq, bs, sizes[s], 1, 0);
                    check_dequantize(&g, &rng, float_dtypes[d], dq, bs, sizes[s], 0, 1);
                }
            }
            check_dequantize(&g, &rng, float_dtypes[d], dq, 64, (1 << 22) + 5, 0, 0);
        }
    }
    tu_gpu_close(&g);
}
END_TEST

START_TEST(failures_are_reported_with_the_call) {
    tu_gpu g;
    if (!tu_gpu_open(&g, POISON))
        return;
    void *p = NULL;
    /* An impossible allocation: the CUDA error is named, and it does not poison later calls. */
    ck_assert_qlora_fails(ql_cuda_malloc(g.cs, (size_t)1 << 60, &p), QLORA_ERR_CUDA, "cudaErrorMemoryAllocation");
    ck_assert(strstr(qlora_last_error(), "cudaMalloc") != NULL);
    ck_assert_ptr_null(p);
    ck_assert_qlora_fails(qlora_alloc(g.ctx, (size_t)1 << 60, 1, QLORA_MEM_WORKSPACE, &p), QLORA_ERR_OUT_OF_MEMORY,
                          "qlora_alloc");
    ck_assert_qlora_ok(ql_cuda_synchronize(g.cs));

    tu_dbuf buf = tu_dbuf_new(&g, 4096, 0);
    uint8_t *d = tu_dbuf_ptr(&buf);
    int64_t bad = 0;
    ck_assert_qlora_fails(ql_cuda_quantize_4bit(g.cs, d, QLORA_F32, 100, 48, QLORA_QUANT_NF4, d, (float *)d, &bad),
                          QLORA_ERR_INVALID_ARG, "blocksize 48");
    ck_assert_qlora_fails(ql_cuda_quantize_4bit(g.cs, d, QLORA_U8, 100, 64, QLORA_QUANT_NF4, d, (float *)d, &bad),
                          QLORA_ERR_DTYPE, "U8");
    ck_assert_int_eq(ql_cuda_is_device_pointer(d), 1);
    ck_assert_int_eq(ql_cuda_is_device_pointer(&bad), 0);

    qlora_qtensor q;
    memset(&q, 0, sizeof q);
    q.blocksize = 64;
    q.numel = 100;
    q.nblocks = 2;
    q.codes = d;
    q.absmax = (float *)d;
    q.device = 5;
    ql_copy_name(q.name, "wrong-device");
    ck_assert_qlora_fails(ql_cuda_dequantize_4bit(g.cs, &q, d + 1024, QLORA_BF16), QLORA_ERR_DEVICE, "wrong-device");
    q.device = 0;
    ck_assert_qlora_fails(ql_cuda_dequantize_4bit(g.cs, &q, d + 1024, QLORA_I32), QLORA_ERR_DTYPE, "I32");

    ql_cuda_state *other = NULL;
    ck_assert_qlora_fails(ql_cuda_init(qlora_cuda_device_count() + 3, &other), QLORA_ERR_DEVICE, "visible");
    ck_assert_ptr_null(other);
    tu_dbuf_free(&g, &buf);
    tu_gpu_close(&g);
}
END_TEST

#endif /* QLORA_HAVE_CUDA */

int main(void) {
    Suite *s = suite_create("cuda_quant4");
    TCase *tc = tcase_create("cuda_quant4");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, device_count_is_quiet);
#ifdef QLORA_HAVE_CUDA
    /* No CUDA call here: a CUDA context created before Check forks would be unusable in the
     * forked test processes. Each test finds out for itself whether a device is there. */
    tcase_add_test(tc, quantize_matches_reference);
    tcase_add_test(tc, quantize_reports_the_first_nonfinite_element);
    tcase_add_test(tc, double_quant_matches_reference);
    tcase_add_test(tc, dequantize_matches_reference);
    tcase_add_test(tc, failures_are_reported_with_the_call);
#endif
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
