/*
 * 4-bit quantization: code books, thresholds and the dynamic map bit for bit; the scalar
 * reference on hand-made vectors; and every backend (cpu-fast, cpu-reference, cuda) against the
 * reference functions called directly, on fresh random data.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "quant4.h"
#include "testutil.h"

/* ------------------------------------------------------------------ helpers */

static uint32_t f_bits(float f) { return ql_f32_bits(f); }

static size_t elem_size(qlora_dtype dtype) { return dtype == QLORA_F32 ? 4 : 2; }

/* Random data with the awkward cases mixed in: exact zeros, tiny values (f16 subnormals), a
 * few large ones. */
static float *random_data(tu_rng *rng, int64_t n) {
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    ck_assert_ptr_nonnull(x);
    tu_fill_normal(rng, x, n, 1.0f);
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = tu_next(rng) % 64;
        if (r == 0)
            x[i] = 0.0f;
        else if (r == 1)
            x[i] *= 1e-6f;
        else if (r == 2)
            x[i] *= 30.0f;
    }
    return x;
}

/* The expected result of quantizing x: the reference functions called directly. */
typedef struct expected {
    int64_t n, nblocks, nested_nblocks;
    uint8_t *codes, *qabsmax;
    float *absmax, *nested;
    float offset;
} expected;

static expected reference_quantize(const void *x, qlora_dtype dtype, int64_t n, const qlora_quant_params *p) {
    expected e;
    memset(&e, 0, sizeof e);
    e.n = n;
    e.nblocks = (n + p->blocksize - 1) / p->blocksize;
    e.nested_nblocks = p->double_quant ? (e.nblocks + 255) / 256 : 0;
    e.codes = calloc((size_t)(n + 1) / 2 + 1, 1);
    e.absmax = calloc((size_t)e.nblocks + 1, sizeof(float));
    e.qabsmax = calloc((size_t)e.nblocks + 1, 1);
    e.nested = calloc((size_t)e.nested_nblocks + 1, sizeof(float));
    ck_assert(e.codes && e.absmax && e.qabsmax && e.nested);
    ck_assert_int_eq(ql_quant4_ref(x, dtype, n, p->blocksize, p->type, e.codes, e.absmax), -1);
    if (p->double_quant)
        e.offset = ql_double_quant_ref(e.absmax, e.nblocks, qlora_dynamic_map_signed(), e.qabsmax, e.nested);
    return e;
}

static void expected_free(expected *e) {
    free(e->codes);
    free(e->absmax);
    free(e->qabsmax);
    free(e->nested);
}

static void quantize_host_data(qlora_ctx *ctx, const void *x, qlora_dtype dtype, int ndim, const int64_t *shape,
                               const qlora_quant_params *p, qlora_qtensor *out) {
    qlora_tensor src = tu_device_tensor(ctx, "w", dtype, ndim, shape, x);
    ck_assert_qlora_ok(qlora_quantize(ctx, &src, p, out));
    qlora_tensor_free(ctx, &src);
}

/* Asserts that a quantized tensor (any device) holds exactly the expected bytes. */
static void assert_matches(qlora_ctx *ctx, const qlora_qtensor *q, const expected *e, const char *what) {
    qlora_qtensor h;
    ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &h, q, 0));
    ck_assert_int_eq(h.numel, e->n);
    ck_assert_int_eq(h.nblocks, e->nblocks);
    ck_assert_int_eq(h.nested_nblocks, e->nested_nblocks);
    ck_assert_msg(memcmp(h.codes, e->codes, (size_t)(e->n + 1) / 2) == 0, "%s: codes differ", what);
    if (h.double_quant) {
        ck_assert_msg(memcmp(h.qabsmax, e->qabsmax, (size_t)e->nblocks) == 0, "%s: qabsmax differs", what);
        ck_assert_msg(memcmp(h.nested_absmax, e->nested, (size_t)e->nested_nblocks * 4) == 0,
                      "%s: nested absmax differs", what);
        ck_assert_msg(f_bits(h.nested_offset) == f_bits(e->offset), "%s: offset %a != %a", what,
                      (double)h.nested_offset, (double)e->offset);
    } else {
        ck_assert_msg(memcmp(h.absmax, e->absmax, (size_t)e->nblocks * 4) == 0, "%s: absmax differs", what);
    }
    qlora_qtensor_free(ctx, &h);
}

/* Dequantizes q into host memory of dtype out_dtype (malloc'ed). */
static void *dequantize_to_host(qlora_ctx *ctx, const qlora_qtensor *q, qlora_dtype out_dtype) {
    int64_t shape[1] = {q->numel};
    qlora_tensor d = tu_device_tensor(ctx, "out", out_dtype, 1, shape, NULL);
    ck_assert_qlora_ok(qlora_dequantize(ctx, q, &d));
    void *host = malloc((size_t)(q->numel > 0 ? q->numel : 1) * elem_size(out_dtype));
    ck_assert_ptr_nonnull(host);
    qlora_tensor h;
    ck_assert_qlora_ok(qlora_tensor_init(&h, "host", out_dtype, 1, shape, host, QLORA_DEVICE_HOST));
    ck_assert_qlora_ok(qlora_tensor_copy(ctx, &h, &d));
    qlora_tensor_free(ctx, &d);
    return host;
}

/* The reference dequantization of expected bytes. */
static void *reference_dequantize(const expected *e, const qlora_quant_params *p, qlora_dtype out_dtype) {
    void *out = malloc((size_t)(e->n > 0 ? e->n : 1) * elem_size(out_dtype));
    float *absmax = malloc((size_t)(e->nblocks + 1) * sizeof(float));
    ck_assert(out && absmax);
    if (p->double_quant)
        ql_double_dequant_ref(e->qabsmax, e->nested, e->offset, qlora_dynamic_map_signed(), e->nblocks, absmax);
    else
        memcpy(absmax, e->absmax, (size_t)e->nblocks * sizeof(float));
    ql_dequant4_ref(e->codes, absmax, qlora_quant_codebook(p->type), e->n, p->blocksize, out, out_dtype);
    free(absmax);
    return out;
}

static void assert_no_live_memory(qlora_ctx *ctx) {
    qlora_mem_stats st;
    ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
    ck_assert_uint_eq(st.total_current[0] + st.total_current[1], 0);
    ck_assert_uint_eq(st.live_allocations, 0);
}

/* --------------------------------------------------- code books and tables */

START_TEST(codebooks_are_bitsandbytes_bit_for_bit) {
    static const uint32_t nf4[16] = {0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f,
                                     0xbdba7871, 0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a,
                                     0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};
    /* FP4: {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12, then the negatives; code 8 is +0 as bnb stores it. */
    static const uint32_t fp4[16] = {0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000,
                                     0x3e2aaaab, 0x3e800000, 0x00000000, 0xbbaaaaab, 0xbf2aaaab, 0xbf800000,
                                     0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000};
    const float *c = qlora_quant_codebook(QLORA_QUANT_NF4);
    for (int i = 0; i < 16; i++)
        ck_assert_msg(f_bits(c[i]) == nf4[i], "nf4[%d] = %08x", i, f_bits(c[i]));
    c = qlora_quant_codebook(QLORA_QUANT_FP4);
    for (int i = 0; i < 16; i++) {
        ck_assert_msg(f_bits(c[i]) == fp4[i], "fp4[%d] = %08x", i, f_bits(c[i]));
        if (i < 8) /* the magnitude table divided by 12, rounded to float32 */
            ck_assert_float_eq(c[i], (float)((const double[]){0, 0.0625, 8, 12, 4, 6, 2, 3}[i] / 12.0));
    }
    ck_assert_ptr_null(qlora_quant_codebook((qlora_quant_type)7));
    ck_assert_str_eq(qlora_quant_type_name(QLORA_QUANT_NF4), "nf4");
    ck_assert_str_eq(qlora_quant_type_name(QLORA_QUANT_FP4), "fp4");
    ck_assert_str_eq(qlora_quant_type_name((qlora_quant_type)7), "invalid");
    qlora_quant_params p = qlora_quant_default_params();
    ck_assert_int_eq(p.type, QLORA_QUANT_NF4);
    ck_assert_int_eq(p.blocksize, 64);
    ck_assert_int_eq(p.double_quant, 1);
    ck_assert_int_eq(ql_quant4_zero_code(QLORA_QUANT_NF4), 7);
    ck_assert_int_eq(ql_quant4_zero_code(QLORA_QUANT_FP4), 0);
}
END_TEST

START_TEST(thresholds_are_the_bitsandbytes_decision_points) {
    const float *nf4 = qlora_quant_codebook(QLORA_QUANT_NF4);
    /* NF4: bnb's CUDA float literals (the float32 roundings of the printed double midpoints);
     * four of them are one ulp off the float32 midpoint, which is an exact tie there. */
    static const uint32_t nf4_literals[15] = {0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec,
                                              0xbe0d38bc, 0xbd3a7871, 0x3d22faff, 0x3df64863, 0x3e5067e0,
                                              0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9};
    int off_by_one = 0;
    for (int t = 0; t < 15; t++) {
        ck_assert_msg(f_bits(ql_nf4_thresholds[t]) == nf4_literals[t], "nf4 threshold %d = %08x", t,
                      f_bits(ql_nf4_thresholds[t]));
        float mid = (nf4[t] + nf4[t + 1]) / 2.0f;
        int64_t ulps = (int64_t)f_bits(ql_nf4_thresholds[t]) - (int64_t)f_bits(mid);
        ck_assert_msg(llabs(ulps) <= 1, "nf4 threshold %d is %lld ulps from the midpoint", t, (long long)ulps);
        off_by_one += ulps != 0;
        double exact = ((double)nf4[t] + (double)nf4[t + 1]) / 2.0;
        ck_assert(fabs(ql_nf4_thresholds[t] - exact) <= fabs(mid - exact));
    }
    ck_assert_int_eq(off_by_one, 4);
    /* FP4: bnb's CUDA float literals, short decimals within 2e-6 (relative) of the float32
     * midpoints of the magnitudes in value order, which the bucket codes list. */
    static const uint32_t fp4_literals[7] = {0x3b2aaab9, 0x3db00000, 0x3e555555, 0x3e955555,
                                             0x3ed55556, 0x3f155550, 0x3f555555};
    const float *fp4 = qlora_quant_codebook(QLORA_QUANT_FP4);
    for (int t = 0; t < 7; t++) {
        ck_assert_msg(f_bits(ql_fp4_thresholds[t]) == fp4_literals[t], "fp4 threshold %d = %08x", t,
                      f_bits(ql_fp4_thresholds[t]));
        float lo = fp4[ql_fp4_bucket_code[t]], hi = fp4[ql_fp4_bucket_code[t + 1]];
        ck_assert(lo < hi);
        float mid = (lo + hi) / 2.0f;
        ck_assert_msg(fabsf(ql_fp4_thresholds[t] - mid) <= 2e-6f * mid, "fp4 threshold %d: %a vs midpoint %a", t,
                      (double)ql_fp4_thresholds[t], (double)mid);
    }
    for (int blocksize = -64; blocksize <= 8192; blocksize++) {
        int ok = blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
        ck_assert_int_eq(ql_quant4_blocksize_ok(blocksize), ok);
    }
}
END_TEST

START_TEST(dynamic_map_matches_bitsandbytes) {
    const float *d = qlora_dynamic_map_signed();
    for (int i = 1; i < 256; i++)
        ck_assert_msg(d[i - 1] < d[i], "not sorted at %d", i);
    ck_assert_uint_eq(f_bits(d[127]), 0);
    ck_assert_uint_eq(f_bits(d[255]), f_bits(1.0f));
    ck_assert_uint_eq(f_bits(d[0]), f_bits(-0.99296875f));
    ck_assert_uint_eq(f_bits(d[254]), f_bits(0.99296875f));
    for (int i = 0; i < 127; i++) /* symmetric apart from 1.0, which has no negative */
        ck_assert_uint_eq(f_bits(d[i]), f_bits(-d[254 - i]));
    /* Entries of bitsandbytes 0.50.2 create_dynamic_map(signed=True); all but 192 and 254 come
     * out one ulp different from a float64 build, so they pin torch's float32 arithmetic. */
    static const struct {
        int index;
        uint32_t bits;
    } known[] = {{128, 0x3513a3b7}, {129, 0x365a1a94}, {131, 0x37b24206}, {135, 0x3923d70b},
                 {136, 0x398ce705}, {140, 0x3a3c6a80}, {162, 0x3ca28f5d}, {192, 0x3df80000},
                 {201, 0x3e7d9999}, {234, 0x3f363334}, {254, 0x3f7e3333}};
    for (size_t k = 0; k < sizeof known / sizeof known[0]; k++)
        ck_assert_msg(f_bits(d[known[k].index]) == known[k].bits, "dyn[%d] = %08x, bitsandbytes has %08x",
                      known[k].index, f_bits(d[known[k].index]), known[k].bits);
    ck_assert(fabsf(d[128] - 5.5e-7f) < 1e-12f);
}
END_TEST

static void *call_dynamic_map(void *out) {
    *(const float **)out = qlora_dynamic_map_signed();
    return NULL;
}

START_TEST(dynamic_map_is_built_once_across_threads) {
    pthread_t th[8];
    const float *seen[8];
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, call_dynamic_map, &seen[i]), 0);
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
    for (int i = 1; i < 8; i++)
        ck_assert_ptr_eq(seen[i], seen[0]);
    for (int i = 1; i < 256; i++)
        ck_assert(seen[0][i - 1] < seen[0][i]);
}
END_TEST

/* ------------------------------------------------------- 8-bit nearest search */

/* The nearest entry by exhaustive search, deciding between neighbours at their float32 midpoint
 * (d[i] + d[i + 1]) * 0.5f as bnb's search does; *tie is set when x is exactly on it. */
static int brute_nearest(const float *d, float x, int *tie) {
    *tie = 0;
    for (int i = 0; i < 255; i++) {
        float mid = (d[i] + d[i + 1]) * 0.5f;
        if (x == mid)
            *tie = 1;
        if (x <= mid)
            return i;
    }
    return 255;
}

START_TEST(dynamic_map_nearest_search) {
    const float *d = qlora_dynamic_map_signed();
    ck_assert_int_eq(ql_dynamic_map_nearest(d, 0.0f), 127);
    ck_assert_int_eq(ql_dynamic_map_nearest(d, -0.0f), 127);
    ck_assert_int_eq(ql_dynamic_map_nearest(d, 1.0f), 255);
    ck_assert_int_eq(ql_dynamic_map_nearest(d, 1.5f), 255);
    ck_assert_int_eq(ql_dynamic_map_nearest(d, -1.0f), 0);
    for (int i = 0; i < 256; i++)
        ck_assert_int_eq(ql_dynamic_map_nearest(d, d[i]), i);
    for (int i = 0; i < 255; i++) {
        /* Exactly on the float32 midpoint the search stays on its final pivot, which is one of
         * the two; one ulp either side picks the nearer entry. */
        float mid = (d[i] + d[i + 1]) * 0.5f;
        int q = ql_dynamic_map_nearest(d, mid);
        ck_assert_msg(q == i || q == i + 1, "midpoint %d/%d -> %d", i, i + 1, q);
        ck_assert_int_eq(ql_dynamic_map_nearest(d, nextafterf(mid, 2.0f)), i + 1);
        ck_assert_int_eq(ql_dynamic_map_nearest(d, nextafterf(mid, -2.0f)), i);
    }
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (int k = 0; k < 50000; k++) {
        float x = (float)(tu_uniform(&rng) * 2.0 - 1.0);
        if (k % 3 == 0)
            x *= (float)pow(10.0, -6.0 * tu_uniform(&rng));
        int tie;
        int want = brute_nearest(d, x, &tie);
        int got = ql_dynamic_map_nearest(d, x);
        ck_assert_msg(got == want || (tie && got == want + 1), "x = %a: got %d, nearest %d", (double)x, got, want);
        /* and it is the nearest in exact arithmetic too, unless x is within an ulp of a midpoint */
        double best = 2.0;
        for (int i = 0; i < 256; i++)
            best = fmin(best, fabs((double)x - d[i]));
        ck_assert_msg(fabs((double)x - d[got]) <= best + 2.5e-7 * fabs((double)x), "x = %a: %d is not nearest",
                      (double)x, got);
    }
}
END_TEST

/* Double quantization fed values whose normalized form is exactly chosen: pairs +-a cancel so
 * the offset is exactly 0, and every group of 256 starts with +-1 so its scale is exactly 1. */
START_TEST(double_quant_ties_fast_equals_reference) {
    const float *d = qlora_dynamic_map_signed();
    float vals[4 * 255 + 8];
    int nv = 0;
    for (int i = 0; i < 255; i++) {
        float mid = (d[i] + d[i + 1]) * 0.5f;
        vals[nv++] = mid;
        vals[nv++] = nextafterf(mid, 2.0f);
        vals[nv++] = nextafterf(mid, -2.0f);
        vals[nv++] = d[i];
    }
    int64_t nblocks = 0, cap = 4096;
    float *absmax = malloc((size_t)cap * sizeof(float));
    ck_assert_ptr_nonnull(absmax);
    for (int k = 0; k < nv;) {
        if (nblocks % 256 == 0) {
            absmax[nblocks++] = 1.0f;
            absmax[nblocks++] = -1.0f;
        }
        absmax[nblocks++] = vals[k];
        absmax[nblocks++] = -vals[k];
        k++;
    }
    uint8_t *q_ref = malloc((size_t)nblocks), *q_fast = malloc((size_t)nblocks);
    float nested_ref[64], nested_fast[64];
    float off_ref = ql_double_quant_ref(absmax, nblocks, d, q_ref, nested_ref);
    ck_assert_float_eq(off_ref, 0.0f);
    for (int threads = 1; threads <= 3; threads++) {
        float off_fast = ql_double_quant_fast(absmax, nblocks, d, q_fast, nested_fast, threads);
        ck_assert_uint_eq(f_bits(off_fast), f_bits(off_ref));
        ck_assert_mem_eq(q_fast, q_ref, (size_t)nblocks);
        ck_assert_mem_eq(nested_fast, nested_ref, (size_t)(nblocks + 255) / 256 * 4);
    }
    for (int64_t i = 0; i < nblocks; i++)
        ck_assert_int_eq(q_ref[i], ql_dynamic_map_nearest(d, absmax[i]));
    free(absmax);
    free(q_ref);
    free(q_fast);
}
END_TEST

/* ----------------------------------------------------- hand-made vectors */

START_TEST(known_vectors_nf4) {
    const float *c = qlora_quant_codebook(QLORA_QUANT_NF4);
    float x[64];
    /* Block 0 (absmax 1): the 16 code values, then each threshold exactly, then -1. */
    for (int i = 0; i < 16; i++)
        x[i] = c[i];
    for (int t = 0; t < 15; t++)
        x[16 + t] = ql_nf4_thresholds[t];
    x[31] = -1.0f;
    /* Block 1 (absmax 1): one ulp above each threshold, one ulp below each, then 1 and 0. */
    for (int t = 0; t < 15; t++) {
        x[32 + t] = nextafterf(ql_nf4_thresholds[t], 2.0f);
        x[47 + t] = nextafterf(ql_nf4_thresholds[t], -2.0f);
    }
    x[62] = 1.0f;
    x[63] = 0.0f;
    static const uint8_t want[32] = {
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, /* each code value -> its own code */
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xe0, /* on threshold t -> t (the lower); -1 -> 0 */
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, /* just above t -> t + 1; then below t = 0 */
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf7, /* just below t -> t; 1 -> 15, 0 -> 7 */
    };
    uint8_t codes[32];
    float absmax[2];
    ck_assert_int_eq(ql_quant4_ref(x, QLORA_F32, 64, 32, QLORA_QUANT_NF4, codes, absmax), -1);
    ck_assert_float_eq(absmax[0], 1.0f);
    ck_assert_float_eq(absmax[1], 1.0f);
    ck_assert_mem_eq(codes, want, 32);
    /* The largest element normalizes to 1 or just below it (x * (1/x) <= 1 in float32): still
     * the end codes. */
    float a = 0.0f;
    for (float t = 1.0f; t < 2.0f && a == 0.0f; t = nextafterf(t, 2.0f))
        if (t * (1.0f / t) < 1.0f)
            a = t;
    ck_assert_msg(a > 0.0f, "no absmax with absmax * (1/absmax) < 1 found");
    float ends[32] = {a, -a};
    ck_assert_int_eq(ql_quant4_ref(ends, QLORA_F32, 32, 32, QLORA_QUANT_NF4, codes, absmax), -1);
    ck_assert_uint_eq(codes[0], 0xf0);
    ck_assert_uint_eq(codes[1], 0x77);
    /* Odd n: the last low nibble is the zero code. {-2, 2, 0.5} / 2 = {-1, 1, 0.25 -> code 10}. */
    float odd[3] = {-2.0f, 2.0f, 0.5f};
    ck_assert_int_eq(ql_quant4_ref(odd, QLORA_F32, 1, 64, QLORA_QUANT_NF4, codes, absmax), -1);
    ck_assert_uint_eq(codes[0], 0x07);
    ck_assert_int_eq(ql_quant4_ref(odd, QLORA_F32, 3, 64, QLORA_QUANT_NF4, codes, absmax), -1);
    ck_assert_uint_eq(codes[0], 0x0f);
    ck_assert_uint_eq(codes[1], 0xa7);
    ck_assert_float_eq(absmax[0], 2.0f);
}
END_TEST

START_TEST(known_vectors_fp4) {
    /* absmax 1 (x[0] = 1). Magnitude buckets in value order: 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1
     * have codes 0, 1, 6, 7, 4, 5, 2, 3; bit 3 is the sign of v. */
    float x[32] = {1.0f, -1.0f, 0.5f, -0.5f, 0.25f, -0.25f, 1.0f / 3.0f, -1.0f / 3.0f, 2.0f / 3.0f, -2.0f / 3.0f,
                   1.0f / 6.0f, -1.0f / 6.0f, 1.0f / 192.0f, -1.0f / 192.0f, 0.0f, -0.0f, 1e-3f, -1e-3f};
    for (int t = 0; t < 7; t++) {
        x[18 + 2 * t] = ql_fp4_thresholds[t];                    /* on a threshold: lower bucket */
        x[19 + 2 * t] = -nextafterf(ql_fp4_thresholds[t], 2.0f); /* just above, negative */
    }
    static const uint8_t want[16] = {
        0x3b, 0x5d, 0x7f, 0x4c, 0x2a, 0x6e, 0x19, /* the 14 code values */
        0x00,                                     /* +0 and -0 (not < 0): both code 0 */
        0x08,                                     /* tiny values: magnitude 0, the sign kept */
        0x09, 0x1e, 0x6f, 0x7c, 0x4d, 0x5a, 0x2b, /* threshold t -> bucket t; just above, negative -> t + 1 */
    };
    uint8_t codes[16];
    float absmax;
    ck_assert_int_eq(ql_quant4_ref(x, QLORA_F32, 32, 32, QLORA_QUANT_FP4, codes, &absmax), -1);
    ck_assert_float_eq(absmax, 1.0f);
    ck_assert_mem_eq(codes, want, 16);
    float zeros[5] = {0};
    ck_assert_int_eq(ql_quant4_ref(zeros, QLORA_F32, 5, 32, QLORA_QUANT_FP4, codes, &absmax), -1);
    ck_assert_float_eq(absmax, 0.0f);
    ck_assert_uint_eq(codes[0], 0x00);
    ck_assert_uint_eq(codes[2], 0x00);
}
END_TEST

/* ------------------------------------------------- backends vs the reference */

static const qlora_dtype float_dtypes[3] = {QLORA_F32, QLORA_F16, QLORA_BF16};

/* Quantizes x (as dtype) on the backend and checks bytes, then every output dtype. */
static void check_backend_case(qlora_ctx *ctx, const char *backend, const float *x32, int64_t n, qlora_dtype dtype,
                               const qlora_quant_params *p) {
    char what[160];
    snprintf(what, sizeof what, "%s n=%lld %s %s bs=%d dq=%d", backend, (long long)n, qlora_dtype_name(dtype),
             qlora_quant_type_name(p->type), p->blocksize, p->double_quant);
    void *x = tu_to_dtype(x32, n, dtype);
    expected e = reference_quantize(x, dtype, n, p);
    int64_t shape[1] = {n};
    qlora_qtensor q;
    quantize_host_data(ctx, x, dtype, 1, shape, p, &q);
    ck_assert_int_eq(q.dtype, dtype);
    assert_matches(ctx, &q, &e, what);
    if (n % 2 == 1)
        ck_assert_msg((e.codes[n / 2] & 0x0f) == ql_quant4_zero_code(p->type), "%s: odd tail not padded", what);
    for (int o = 0; o < 3; o++) {
        void *got = dequantize_to_host(ctx, &q, float_dtypes[o]);
        void *want = reference_dequantize(&e, p, float_dtypes[o]);
        ck_assert_msg(memcmp(got, want, (size_t)n * elem_size(float_dtypes[o])) == 0, "%s: dequantized %s differs",
                      what, qlora_dtype_name(float_dtypes[o]));
        free(got);
        free(want);
    }
    qlora_qtensor_free(ctx, &q);
    expected_free(&e);
    free(x);
}

START_TEST(backends_match_reference_on_odd_sizes) {
    static const int64_t sizes[] = {1, 2, 63, 65, 127, 4097, 100003};
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        float *x = random_data(&rng, sizes[s]);
        for (int b = 0; b < nb; b++) {
            qlora_ctx *ctx = tu_ctx(&bs[b]);
            for (int d = 0; d < 3; d++)
                for (int type = 0; type < 2; type++)
                    for (int dq = 0; dq < 2; dq++) {
                        qlora_quant_params p = {(qlora_quant_type)type, 64, dq};
                        check_backend_case(ctx, bs[b].name, x, sizes[s], float_dtypes[d], &p);
                    }
            assert_no_live_memory(ctx);
            qlora_ctx_free(ctx);
        }
        free(x);
    }
}
END_TEST

START_TEST(every_blocksize_matches_reference) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (int blocksize = 32; blocksize <= 4096; blocksize *= 2) {
        int64_t n = 3 * (int64_t)blocksize + 17 + (int64_t)(tu_next(&rng) % 256) * blocksize;
        float *x = random_data(&rng, n);
        for (int b = 0; b < nb; b++) {
            qlora_ctx *ctx = tu_ctx(&bs[b]);
            qlora_quant_params p = {(qlora_quant_type)(blocksize / 32 % 2), blocksize, blocksize % 64 == 0};
            check_backend_case(ctx, bs[b].name, x, n, float_dtypes[blocksize / 32 % 3], &p);
            p.type = (qlora_quant_type)(1 - p.type);
            p.double_quant = !p.double_quant;
            check_backend_case(ctx, bs[b].name, x, n, QLORA_BF16, &p);
            qlora_ctx_free(ctx);
        }
        free(x);
    }
}
END_TEST

START_TEST(invalid_blocksizes_are_rejected) {
    static const int bad[] = {0, 16, 48, 100, 8192, -64, 4095};
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    float x[256] = {1.0f};
    int64_t shape[2] = {4, 64};
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_tensor_init(&t, "model.w", QLORA_F32, 2, shape, x, QLORA_DEVICE_HOST));
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        qlora_quant_params p = qlora_quant_default_params();
        p.blocksize = bad[i];
        qlora_qtensor q;
        ck_assert_qlora_fails(qlora_quantize(ctx, &t, &p, &q), QLORA_ERR_INVALID_ARG, "blocksize");
        ck_assert(strstr(qlora_last_error(), "'model.w'") != NULL);
        ck_assert_ptr_null(q.codes);
        ck_assert_qlora_fails(qlora_qtensor_alloc(ctx, &q, "model.v", 2, shape, QLORA_BF16, &p, 1),
                              QLORA_ERR_INVALID_ARG, "'model.v'");
    }
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

START_TEST(all_zero_blocks_store_zero_and_the_zero_code) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    enum { N = 300 }; /* blocks of 64: 0..3 full, 4 a tail of 44 */
    float x[N];
    tu_fill_normal(&rng, x, N, 1.0f);
    for (int i = 64; i < 128; i++)
        x[i] = 0.0f;
    for (int i = 192; i < 256; i++)
        x[i] = i % 2 ? 0.0f : -0.0f;
    for (int i = 256; i < N; i++)
        x[i] = 0.0f;
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        for (int type = 0; type < 2; type++) {
            qlora_quant_params p = {(qlora_quant_type)type, 64, 0};
            int64_t shape[1] = {N};
            qlora_qtensor q, h;
            quantize_host_data(ctx, x, QLORA_F32, 1, shape, &p, &q);
            ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &h, &q, 0));
            uint8_t zero_byte = type == QLORA_QUANT_NF4 ? 0x77 : 0x00;
            static const int zero_blocks[3] = {1, 3, 4};
            for (int k = 0; k < 3; k++) {
                int blk = zero_blocks[k];
                ck_assert_uint_eq(f_bits(h.absmax[blk]), 0);
                for (int j = blk * 32; j < (blk == 4 ? N / 2 : blk * 32 + 32); j++)
                    ck_assert_msg(h.codes[j] == zero_byte, "%s: byte %d = %02x", bs[b].name, j, h.codes[j]);
            }
            float *y = dequantize_to_host(ctx, &q, QLORA_F32);
            for (int i = 0; i < N; i++)
                if (x[i] == 0.0f && (i >= 256 || (i >= 64 && i < 128) || (i >= 192 && i < 256)))
                    ck_assert_uint_eq(f_bits(y[i]), 0);
            free(y);
            qlora_qtensor_free(ctx, &h);
            qlora_qtensor_free(ctx, &q);
        }
        /* An all-zero tensor with double quantization: offset 0, nested scale 0, 8-bit code 127. */
        float zeros[1000] = {0};
        int64_t shape[2] = {10, 100};
        qlora_quant_params p = {QLORA_QUANT_NF4, 32, 1};
        qlora_qtensor q, h;
        quantize_host_data(ctx, zeros, QLORA_F32, 2, shape, &p, &q);
        ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &h, &q, 0));
        ck_assert_uint_eq(f_bits(h.nested_offset), 0);
        ck_assert_uint_eq(f_bits(h.nested_absmax[0]), 0);
        for (int j = 0; j < 32; j++)
            ck_assert_uint_eq(h.qabsmax[j], 127);
        for (int j = 0; j < 500; j++)
            ck_assert_uint_eq(h.codes[j], 0x77);
        uint16_t *y = dequantize_to_host(ctx, &q, QLORA_BF16);
        for (int i = 0; i < 1000; i++)
            ck_assert_uint_eq(y[i], 0);
        free(y);
        qlora_qtensor_free(ctx, &h);
        qlora_qtensor_free(ctx, &q);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
}
END_TEST

static double rmse(const float *a, const float *b, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(s / (double)n);
}

START_TEST(gaussian_round_trip_error) {
    enum { N = 1 << 16 };
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    float *x = malloc(N * sizeof(float));
    ck_assert_ptr_nonnull(x);
    tu_fill_normal(&rng, x, N, 0.02f); /* the scale of LLM weights */
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        double err[2][2];
        for (int type = 0; type < 2; type++)
            for (int dq = 0; dq < 2; dq++) {
                qlora_quant_params p = {(qlora_quant_type)type, 64, dq};
                int64_t shape[2] = {256, N / 256};
                qlora_qtensor q;
                quantize_host_data(ctx, x, QLORA_F32, 2, shape, &p, &q);
                float *y = dequantize_to_host(ctx, &q, QLORA_F32);
                err[type][dq] = rmse(x, y, N) / 0.02;
                free(y);
                qlora_qtensor_free(ctx, &q);
            }
        /* Relative RMSE of 4-bit blockwise quantization of Gaussian data with blocks of 64: NF4
         * about 0.092, FP4 about 0.122; double quantization adds well under 1%. */
        ck_assert_msg(err[0][0] < err[1][0], "%s: NF4 %.4f not better than FP4 %.4f", bs[b].name, err[0][0],
                      err[1][0]);
        ck_assert_msg(err[0][0] > 0.08 && err[0][0] < 0.10, "%s: NF4 relative RMSE %.4f", bs[b].name, err[0][0]);
        ck_assert_msg(err[1][0] > 0.11 && err[1][0] < 0.13, "%s: FP4 relative RMSE %.4f", bs[b].name, err[1][0]);
        for (int type = 0; type < 2; type++)
            ck_assert_msg(err[type][1] < err[type][0] * 1.01, "%s: double quant RMSE %.4f vs %.4f", bs[b].name,
                          err[type][1], err[type][0]);
        qlora_ctx_free(ctx);
    }
    free(x);
}
END_TEST

START_TEST(double_quant_reconstruction_bound) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    int64_t n = 64 * 256 * 5 + 64 * 77 + 13;
    float *x = random_data(&rng, n);
    qlora_quant_params p = {QLORA_QUANT_NF4, 64, 1};
    expected e = reference_quantize(x, QLORA_F32, n, &p);
    float *decoded = malloc((size_t)e.nblocks * sizeof(float));
    ck_assert_ptr_nonnull(decoded);
    ql_double_dequant_ref(e.qabsmax, e.nested, e.offset, qlora_dynamic_map_signed(), e.nblocks, decoded);
    /* Nearest rounding in the dynamic map: at most half its widest gap (0.0140625 between the
     * entries near +-1) times the group's scale, plus float32 rounding of the decode. */
    for (int64_t j = 0; j < e.nblocks; j++) {
        float nested = e.nested[j / 256];
        float err = fabsf(decoded[j] - e.absmax[j]);
        float bound = 0.00703125f * nested + 4e-7f * (fabsf(e.absmax[j]) + fabsf(e.offset) + nested);
        ck_assert_msg(err <= bound, "block %lld: |%g - %g| = %g > %g", (long long)j, (double)decoded[j],
                      (double)e.absmax[j], (double)err, (double)bound);
    }
    /* The offset is the mean of the float32 scales. */
    double mean = 0.0;
    for (int64_t j = 0; j < e.nblocks; j++)
        mean += e.absmax[j];
    mean /= (double)e.nblocks;
    ck_assert(fabs(e.offset - mean) <= 1e-7 * mean);
    free(decoded);
    expected_free(&e);
    free(x);
}
END_TEST

START_TEST(fast_kernels_equal_reference_for_any_thread_count) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    int64_t n = 300001 + (int64_t)(tu_next(&rng) % 1000);
    float *x32 = random_data(&rng, n);
    const float *dyn = qlora_dynamic_map_signed();
    for (int d = 0; d < 3; d++) {
        void *x = tu_to_dtype(x32, n, float_dtypes[d]);
        for (int type = 0; type < 2; type++) {
            qlora_quant_params p = {(qlora_quant_type)type, 128, 1};
            expected e = reference_quantize(x, float_dtypes[d], n, &p);
            uint8_t *codes = malloc((size_t)(n + 1) / 2), *qabsmax = malloc((size_t)e.nblocks);
            float *absmax = malloc((size_t)e.nblocks * 4), *nested = malloc((size_t)e.nested_nblocks * 4);
            ck_assert(codes && qabsmax && absmax && nested);
            for (int threads = 0; threads <= 3; threads++) {
                ck_assert_int_eq(ql_quant4_fast(x, float_dtypes[d], n, 128, p.type, codes, absmax, threads), -1);
                ck_assert_mem_eq(codes, e.codes, (size_t)(n + 1) / 2);
                ck_assert_mem_eq(absmax, e.absmax, (size_t)e.nblocks * 4);
                float offset = ql_double_quant_fast(absmax, e.nblocks, dyn, qabsmax, nested, threads);
                ck_assert_uint_eq(f_bits(offset), f_bits(e.offset));
                ck_assert_mem_eq(qabsmax, e.qabsmax, (size_t)e.nblocks);
                ck_assert_mem_eq(nested, e.nested, (size_t)e.nested_nblocks * 4);
                for (int o = 0; o < 3; o++) {
                    void *want = reference_dequantize(&e, &p, float_dtypes[o]);
                    void *got = malloc((size_t)n * 4);
                    ck_assert_ptr_nonnull(got);
                    ql_dequant4_fast(codes, NULL, qabsmax, nested, offset, dyn, qlora_quant_codebook(p.type), n, 128,
                                     got, float_dtypes[o], threads);
                    ck_assert_mem_eq(got, want, (size_t)n * elem_size(float_dtypes[o]));
                    ql_dequant4_fast(codes, absmax, NULL, NULL, 0.0f, dyn, qlora_quant_codebook(p.type), n, 128, got,
                                     float_dtypes[o], threads);
                    ql_dequant4_ref(codes, absmax, qlora_quant_codebook(p.type), n, 128, want, float_dtypes[o]);
                    ck_assert_mem_eq(got, want, (size_t)n * elem_size(float_dtypes[o]));
                    free(want);
                    free(got);
                }
            }
            free(codes);
            free(qabsmax);
            free(absmax);
            free(nested);
            expected_free(&e);
        }
        free(x);
    }
    free(x32);
}
END_TEST

/* Every finite f16 bit pattern goes through the fast path's conversion exactly. */
START_TEST(fast_path_reads_every_finite_f16) {
    enum { N = 63488 }; /* 2 * 31 * 1024 finite patterns (exponent < 31) */
    uint16_t *h = malloc(N * sizeof(uint16_t));
    ck_assert_ptr_nonnull(h);
    int n = 0;
    for (uint32_t u = 0; u < 0x10000; u++)
        if ((u & 0x7c00) != 0x7c00)
            h[n++] = (uint16_t)u;
    ck_assert_int_eq(n, N);
    for (int type = 0; type < 2; type++) {
        uint8_t a[N / 2], b[N / 2];
        float am[N / 32], bm[N / 32];
        ck_assert_int_eq(ql_quant4_ref(h, QLORA_F16, N, 32, (qlora_quant_type)type, a, am), -1);
        ck_assert_int_eq(ql_quant4_fast(h, QLORA_F16, N, 32, (qlora_quant_type)type, b, bm, 2), -1);
        ck_assert_mem_eq(a, b, N / 2);
        ck_assert_mem_eq(am, bm, sizeof am);
    }
    free(h);
}
END_TEST

/* ------------------------------------------------------- errors and memory */

static void put_value(void *x, qlora_dtype dtype, int64_t i, float v) {
    if (dtype == QLORA_F32)
        ((float *)x)[i] = v;
    else if (dtype == QLORA_F16)
        ((uint16_t *)x)[i] = ql_f32_to_f16(v);
    else
        ((uint16_t *)x)[i] = ql_f32_to_bf16(v);
}

START_TEST(non_finite_values_are_rejected_naming_the_element) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    enum { R = 37, C = 50 };
    float x32[R * C];
    tu_fill_normal(&rng, x32, R * C, 1.0f);
    static const struct {
        qlora_dtype dtype;
        float value;
        const char *word;
    } cases[3] = {{QLORA_F32, NAN, "NaN"}, {QLORA_F16, -INFINITY, "-Inf"}, {QLORA_BF16, INFINITY, "+Inf"}};
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        for (int c = 0; c < 3; c++) {
            void *x = tu_to_dtype(x32, R * C, cases[c].dtype);
            put_value(x, cases[c].dtype, 20 * C + 7, cases[c].value);
            put_value(x, cases[c].dtype, 30 * C + 1, NAN); /* a later one is not reported */
            int64_t shape[2] = {R, C};
            qlora_tensor src = tu_device_tensor(ctx, "layers.3.mlp.w", cases[c].dtype, 2, shape, x);
            for (int dq = 0; dq < 2; dq++) {
                qlora_quant_params p = {(qlora_quant_type)dq, 64, dq};
                qlora_qtensor q;
                ck_assert_qlora_fails(qlora_quantize(ctx, &src, &p, &q), QLORA_ERR_NON_FINITE, "'layers.3.mlp.w'");
                const char *msg = qlora_last_error();
                ck_assert_msg(strstr(msg, cases[c].word) && strstr(msg, "element 1007") &&
                                  strstr(msg, "row 20, col 7"),
                              "%s: %s", bs[b].name, msg);
                ck_assert_ptr_null(q.codes);
                ck_assert_ptr_null(q.absmax);
                ck_assert_ptr_null(q.qabsmax);
            }
            qlora_tensor_free(ctx, &src);
            assert_no_live_memory(ctx);
            free(x);
        }
        /* More dimensions: the full index. */
        float y[2 * 3 * 5] = {0};
        y[1 * 15 + 2 * 5 + 3] = NAN;
        int64_t shape3[3] = {2, 3, 5};
        qlora_tensor src = tu_device_tensor(ctx, "t3", QLORA_F32, 3, shape3, y);
        qlora_qtensor q;
        ck_assert_qlora_fails(qlora_quantize(ctx, &src, NULL, &q), QLORA_ERR_NON_FINITE,
                              "element 28 (index [1, 2, 3])");
        qlora_tensor_free(ctx, &src);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
}
END_TEST

START_TEST(memory_accountant_sees_codes_and_scales) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    int64_t n = 64 * 256 * 4 + 1001; /* 1040 blocks of 64: 5 nested groups */
    float *x = random_data(&rng, n);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        int loc = qlora_ctx_backend(ctx) == QLORA_BACKEND_CUDA ? 1 : 0;
        for (int dq = 0; dq < 2; dq++) {
            qlora_quant_params p = {QLORA_QUANT_NF4, 64, dq};
            int64_t shape[1] = {n};
            qlora_qtensor q;
            quantize_host_data(ctx, x, QLORA_F32, 1, shape, &p, &q);
            qlora_mem_stats st;
            ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
            int64_t nblocks = (n + 63) / 64;
            ck_assert_int_eq(q.nblocks, nblocks);
            ck_assert_int_eq(q.nested_nblocks, dq ? 5 : 0);
            uint64_t scales = dq ? (uint64_t)nblocks + 5 * 4 : (uint64_t)nblocks * 4;
            ck_assert_uint_eq(st.current[loc][QLORA_MEM_BASE_WEIGHTS], (uint64_t)(n + 1) / 2);
            ck_assert_uint_eq(st.current[loc][QLORA_MEM_QUANT_STATE], scales);
            ck_assert_uint_eq(st.current[loc][QLORA_MEM_WORKSPACE], 0);
            ck_assert_uint_eq(st.total_current[0] + st.total_current[1], (uint64_t)(n + 1) / 2 + scales);
            ck_assert_uint_eq(qlora_qtensor_nbytes(&q), (size_t)(n + 1) / 2 + scales);
            qlora_qtensor_free(ctx, &q);
            ck_assert_ptr_null(q.codes);
            assert_no_live_memory(ctx);
        }
        qlora_ctx_free(ctx);
    }
    free(x);
}
END_TEST

START_TEST(arguments_are_checked_with_clear_errors) {
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    float x[100] = {0.5f, -1.0f};
    int64_t shape[2] = {10, 10};
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_tensor_init(&t, "w", QLORA_F32, 2, shape, x, QLORA_DEVICE_HOST));
    qlora_qtensor q;
    qlora_quant_params p = qlora_quant_default_params();
    ck_assert_qlora_fails(qlora_quantize(NULL, &t, &p, &q), QLORA_ERR_INVALID_ARG, "ctx");
    ck_assert_qlora_fails(qlora_quantize(ctx, NULL, &p, &q), QLORA_ERR_INVALID_ARG, "src");
    ck_assert_qlora_fails(qlora_quantize(ctx, &t, &p, NULL), QLORA_ERR_INVALID_ARG, "out");
    qlora_tensor bad = t;
    bad.dtype = QLORA_U8;
    ck_assert_qlora_fails(qlora_quantize(ctx, &bad, &p, &q), QLORA_ERR_DTYPE, "'w' is U8");
    bad = t;
    bad.data = NULL;
    ck_assert_qlora_fails(qlora_quantize(ctx, &bad, &p, &q), QLORA_ERR_INVALID_ARG, "'w' has no data");
    bad = t;
    bad.device = 0;
    ck_assert_qlora_fails(qlora_quantize(ctx, &bad, &p, &q), QLORA_ERR_DEVICE, "'w'");
    qlora_quant_params badp = p;
    badp.type = (qlora_quant_type)5;
    ck_assert_qlora_fails(qlora_quantize(ctx, &t, &badp, &q), QLORA_ERR_INVALID_ARG, "quant type");
    badp = p;
    badp.double_quant = 2;
    ck_assert_qlora_fails(qlora_quantize(ctx, &t, &badp, &q), QLORA_ERR_INVALID_ARG, "double_quant");

    ck_assert_qlora_ok(qlora_quantize(ctx, &t, NULL, &q)); /* NULL params: the defaults */
    ck_assert_str_eq(q.name, "w");
    ck_assert_int_eq(q.ndim, 2);
    ck_assert_int_eq(q.shape[0], 10);
    ck_assert_int_eq(q.shape[1], 10);
    ck_assert_int_eq(q.numel, 100);
    ck_assert_int_eq(q.blocksize, 64);
    ck_assert_int_eq(q.double_quant, 1);
    ck_assert_int_eq(q.device, QLORA_DEVICE_HOST);
    ck_assert_mem_eq(q.code, qlora_quant_codebook(QLORA_QUANT_NF4), sizeof q.code);
    ck_assert_mem_eq(q.nested_code, qlora_dynamic_map_signed(), sizeof q.nested_code);

    float out[100];
    qlora_tensor dst;
    int64_t wrong[1] = {99};
    ck_assert_qlora_ok(qlora_tensor_init(&dst, "y", QLORA_F32, 1, wrong, out, QLORA_DEVICE_HOST));
    ck_assert_qlora_fails(qlora_dequantize(ctx, &q, &dst), QLORA_ERR_SHAPE, "'y' has 99 elements");
    ck_assert_qlora_ok(qlora_tensor_init(&dst, "y", QLORA_I32, 2, shape, out, QLORA_DEVICE_HOST));
    ck_assert_qlora_fails(qlora_dequantize(ctx, &q, &dst), QLORA_ERR_DTYPE, "'y' is I32");
    ck_assert_qlora_ok(qlora_tensor_init(&dst, "y", QLORA_F32, 2, shape, out, 0));
    ck_assert_qlora_fails(qlora_dequantize(ctx, &q, &dst), QLORA_ERR_DEVICE, "'y'");
    ck_assert_qlora_ok(qlora_tensor_init(&dst, "y", QLORA_F32, 2, shape, NULL, QLORA_DEVICE_HOST));
    ck_assert_qlora_fails(qlora_dequantize(ctx, &q, &dst), QLORA_ERR_INVALID_ARG, "'y' has no data");
    ck_assert_qlora_ok(qlora_tensor_init(&dst, "y", QLORA_F32, 2, shape, out, QLORA_DEVICE_HOST));
    qlora_qtensor broken = q;
    broken.qabsmax = NULL;
    ck_assert_qlora_fails(qlora_dequantize(ctx, &broken, &dst), QLORA_ERR_INVALID_ARG, "'w' has no storage");
    broken = q;
    broken.nblocks = 3;
    ck_assert_qlora_fails(qlora_dequantize(ctx, &broken, &dst), QLORA_ERR_SHAPE, "'w'");
    ck_assert_qlora_fails(qlora_dequantize(ctx, NULL, &dst), QLORA_ERR_INVALID_ARG, "q");
    ck_assert_qlora_fails(qlora_qtensor_copy(ctx, &q, &q, 0), QLORA_ERR_INVALID_ARG, "dst != src");
    ck_assert_qlora_ok(qlora_dequantize(ctx, &q, &dst));
    ck_assert_float_eq(out[1], -1.0f);
    ck_assert(fabsf(out[0] - 0.5f) < 0.06f);

    /* Unaligned host data (as a file mapping may give): quantized from an aligned copy; an
     * unaligned output is refused. */
    unsigned char *raw = malloc(100 * 4 + 8);
    ck_assert_ptr_nonnull(raw);
    memcpy(raw + 2, x, 100 * 4);
    qlora_tensor unaligned;
    ck_assert_qlora_ok(qlora_tensor_init(&unaligned, "w", QLORA_F32, 2, shape, raw + 2, QLORA_DEVICE_HOST));
    qlora_qtensor q2;
    ck_assert_qlora_ok(qlora_quantize(ctx, &unaligned, NULL, &q2));
    ck_assert_mem_eq(q2.codes, q.codes, 50);
    ck_assert_mem_eq(q2.qabsmax, q.qabsmax, 2);
    ck_assert_qlora_ok(qlora_tensor_init(&dst, "y", QLORA_F32, 2, shape, raw + 2, QLORA_DEVICE_HOST));
    ck_assert_qlora_fails(qlora_dequantize(ctx, &q2, &dst), QLORA_ERR_INVALID_ARG, "'y': data");
    qlora_qtensor_free(ctx, &q2);
    free(raw);

    qlora_qtensor_free(ctx, NULL);
    ck_assert_uint_eq(qlora_qtensor_nbytes(NULL), 0);
    qlora_qtensor_free(ctx, &q);
    qlora_qtensor_free(ctx, &q); /* twice is harmless: the pointers were cleared */
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

START_TEST(qtensor_alloc_copy_and_empty_tensors) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    enum { R = 33, C = 70 };
    float *x = random_data(&rng, R * C);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        int64_t shape[2] = {R, C};
        qlora_quant_params p = {QLORA_QUANT_FP4, 32, 1};
        qlora_qtensor q, host, back, loaded;
        quantize_host_data(ctx, x, QLORA_F32, 2, shape, &p, &q);
        /* device -> host -> device, then dequantize: the same values */
        ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &host, &q, 0));
        ck_assert_int_eq(host.device, QLORA_DEVICE_HOST);
        ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &back, &host, 1));
        ck_assert_int_eq(back.device, qlora_ctx_device(ctx));
        /* storage for loading, filled from the host copy */
        ck_assert_qlora_ok(qlora_qtensor_alloc(ctx, &loaded, "loaded", 2, shape, QLORA_F32, &p, 0));
        ck_assert_int_eq(loaded.numel, R * C);
        ck_assert_int_eq(loaded.nblocks, (R * C + 31) / 32);
        ck_assert_int_eq(loaded.nested_nblocks, 1);
        ck_assert_uint_eq(qlora_qtensor_nbytes(&loaded), qlora_qtensor_nbytes(&q));
        memcpy(loaded.codes, host.codes, (size_t)(R * C + 1) / 2);
        memcpy(loaded.qabsmax, host.qabsmax, (size_t)host.nblocks);
        memcpy(loaded.nested_absmax, host.nested_absmax, 4);
        loaded.nested_offset = host.nested_offset;
        qlora_qtensor loaded_dev;
        ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &loaded_dev, &loaded, 1));
        float *y0 = dequantize_to_host(ctx, &q, QLORA_F32);
        float *y1 = dequantize_to_host(ctx, &back, QLORA_F32);
        float *y2 = dequantize_to_host(ctx, &loaded_dev, QLORA_F32);
        ck_assert_mem_eq(y0, y1, R * C * 4);
        ck_assert_mem_eq(y0, y2, R * C * 4);
        free(y0);
        free(y1);
        free(y2);
        qlora_qtensor_free(ctx, &q);
        qlora_qtensor_free(ctx, &host);
        qlora_qtensor_free(ctx, &back);
        qlora_qtensor_free(ctx, &loaded);
        qlora_qtensor_free(ctx, &loaded_dev);
        /* An empty tensor quantizes to empty storage and dequantizes to nothing. */
        int64_t empty_shape[2] = {0, 5};
        quantize_host_data(ctx, NULL, QLORA_F32, 2, empty_shape, &p, &q);
        ck_assert_int_eq(q.numel, 0);
        ck_assert_int_eq(q.nblocks, 0);
        ck_assert_uint_eq(qlora_qtensor_nbytes(&q), 0);
        qlora_tensor out;
        ck_assert_qlora_ok(qlora_tensor_init(&out, "none", QLORA_BF16, 2, empty_shape, NULL, qlora_ctx_device(ctx)));
        ck_assert_qlora_ok(qlora_dequantize(ctx, &q, &out));
        qlora_qtensor_free(ctx, &q);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
    free(x);
}
END_TEST

/* ------------------------------------------------- the offset alone */

/* qlora_quant_offset(src) against the nested_offset qlora_quantize stores, both on ctx. */
static void assert_offset_matches_quantize(qlora_ctx *ctx, const char *backend, const void *x, qlora_dtype dtype,
                                           int64_t n, const qlora_quant_params *p) {
    int64_t shape[1] = {n};
    qlora_tensor src = tu_device_tensor(ctx, "w", dtype, 1, shape, x);
    qlora_qtensor q;
    ck_assert_qlora_ok(qlora_quantize(ctx, &src, p, &q));
    float offset = -1.0f;
    ck_assert_qlora_ok(qlora_quant_offset(ctx, &src, p, &offset));
    ck_assert_msg(f_bits(offset) == f_bits(q.nested_offset), "%s n=%lld %s %s bs=%d dq=%d: offset %a, quantize %a",
                  backend, (long long)n, qlora_dtype_name(dtype), qlora_quant_type_name(p->type), p->blocksize,
                  p->double_quant, (double)offset, (double)q.nested_offset);
    if (!p->double_quant || n == 0)
        ck_assert_uint_eq(f_bits(offset), 0);
    qlora_qtensor_free(ctx, &q);
    qlora_tensor_free(ctx, &src);
}

START_TEST(quant_offset_equals_the_stored_offset) {
    /* 600007 elements at blocksize 32..128 span several QL_DQ_SUM_CHUNK chunks of block sums. */
    static const int64_t sizes[] = {0, 1, 63, 16389, 600007};
    static const int blocksizes[] = {32, 64, 128, 4096};
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        float *x32 = random_data(&rng, sizes[s]);
        float scale = (float)(0.01 + tu_uniform(&rng) * 100.0); /* offsets of any magnitude */
        for (int64_t i = 0; i < sizes[s]; i++)
            x32[i] *= scale;
        for (int d = 0; d < 3; d++) {
            void *x = tu_to_dtype(x32, sizes[s], float_dtypes[d]);
            for (int b = 0; b < nb; b++) {
                qlora_ctx *ctx = tu_ctx(&bs[b]);
                for (int k = 0; k < 4; k++) {
                    qlora_quant_params p = {(qlora_quant_type)((k + d) % 2), blocksizes[(s + k) % 4], k != 3};
                    assert_offset_matches_quantize(ctx, bs[b].name, x, float_dtypes[d], sizes[s], &p);
                }
                assert_no_live_memory(ctx);
                qlora_ctx_free(ctx);
            }
            free(x);
        }
        free(x32);
    }
}
END_TEST

START_TEST(quant_offset_checks_its_arguments) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    enum { R = 37, C = 50 };
    float x[R * C];
    tu_fill_normal(&rng, x, R * C, 1.0f);
    int64_t shape[2] = {R, C};
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        qlora_tensor t = tu_device_tensor(ctx, "layers.1.w", QLORA_F32, 2, shape, x);
        qlora_quant_params p = qlora_quant_default_params();
        float offset = 5.0f;
        ck_assert_qlora_fails(qlora_quant_offset(NULL, &t, &p, &offset), QLORA_ERR_INVALID_ARG, "ctx");
        ck_assert_qlora_fails(qlora_quant_offset(ctx, NULL, &p, &offset), QLORA_ERR_INVALID_ARG, "src");
        ck_assert_qlora_fails(qlora_quant_offset(ctx, &t, &p, NULL), QLORA_ERR_INVALID_ARG, "offset");
        qlora_tensor bad = t;
        bad.dtype = QLORA_I32;
        ck_assert_qlora_fails(qlora_quant_offset(ctx, &bad, &p, &offset), QLORA_ERR_DTYPE, "'layers.1.w' is I32");
        ck_assert_uint_eq(f_bits(offset), 0); /* cleared on failure */
        bad = t;
        bad.data = NULL;
        ck_assert_qlora_fails(qlora_quant_offset(ctx, &bad, &p, &offset), QLORA_ERR_INVALID_ARG, "has no data");
        bad = t;
        bad.device = t.device == QLORA_DEVICE_HOST ? 0 : QLORA_DEVICE_HOST;
        ck_assert_qlora_fails(qlora_quant_offset(ctx, &bad, &p, &offset), QLORA_ERR_DEVICE, "'layers.1.w'");
        qlora_quant_params badp = p;
        badp.blocksize = 48;
        ck_assert_qlora_fails(qlora_quant_offset(ctx, &t, &badp, &offset), QLORA_ERR_INVALID_ARG, "blocksize 48");
        badp = p;
        badp.type = (qlora_quant_type)7;
        ck_assert_qlora_fails(qlora_quant_offset(ctx, &t, &badp, &offset), QLORA_ERR_INVALID_ARG, "quant type");
        badp = p;
        badp.double_quant = 2;
        ck_assert_qlora_fails(qlora_quant_offset(ctx, &t, &badp, &offset), QLORA_ERR_INVALID_ARG, "double_quant");
        /* NULL params: the defaults (double quant), as qlora_quantize */
        qlora_qtensor q;
        ck_assert_qlora_ok(qlora_quantize(ctx, &t, NULL, &q));
        ck_assert_qlora_ok(qlora_quant_offset(ctx, &t, NULL, &offset));
        ck_assert_uint_eq(f_bits(offset), f_bits(q.nested_offset));
        ck_assert(offset > 0.0f);
        qlora_qtensor_free(ctx, &q);
        qlora_tensor_free(ctx, &t);

        /* NaN/Inf: the first one named as qlora_quantize names it, every dtype */
        static const struct {
            qlora_dtype dtype;
            float value;
            const char *word;
        } cases[3] = {{QLORA_F32, INFINITY, "+Inf"}, {QLORA_F16, NAN, "NaN"}, {QLORA_BF16, -INFINITY, "-Inf"}};
        for (int c = 0; c < 3; c++) {
            void *y = tu_to_dtype(x, R * C, cases[c].dtype);
            put_value(y, cases[c].dtype, 11 * C + 3, cases[c].value);
            put_value(y, cases[c].dtype, 30 * C + 1, NAN);
            qlora_tensor nf = tu_device_tensor(ctx, "layers.2.w", cases[c].dtype, 2, shape, y);
            offset = 5.0f;
            ck_assert_qlora_fails(qlora_quant_offset(ctx, &nf, NULL, &offset), QLORA_ERR_NON_FINITE,
                                  "qlora_quant_offset: tensor 'layers.2.w'");
            const char *msg = qlora_last_error();
            ck_assert_msg(strstr(msg, cases[c].word) && strstr(msg, "element 553") && strstr(msg, "row 11, col 3"),
                          "%s: %s", bs[b].name, msg);
            ck_assert_uint_eq(f_bits(offset), 0);
            /* without double quant there is no offset and src is not read */
            p.double_quant = 0;
            ck_assert_qlora_ok(qlora_quant_offset(ctx, &nf, &p, &offset));
            ck_assert_uint_eq(f_bits(offset), 0);
            p.double_quant = 1;
            qlora_tensor_free(ctx, &nf);
            free(y);
        }
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }

    /* Unaligned host data (a file mapping may give it): the offset of the aligned data. */
    for (int b = 0; b < nb; b++) {
        if (bs[b].params.backend == QLORA_BACKEND_CUDA)
            continue;
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        unsigned char *raw = malloc(sizeof x + 8);
        ck_assert_ptr_nonnull(raw);
        memcpy(raw + 2, x, sizeof x);
        qlora_tensor aligned, unaligned;
        ck_assert_qlora_ok(qlora_tensor_init(&aligned, "w", QLORA_F32, 2, shape, x, QLORA_DEVICE_HOST));
        ck_assert_qlora_ok(qlora_tensor_init(&unaligned, "w", QLORA_F32, 2, shape, raw + 2, QLORA_DEVICE_HOST));
        float want, got;
        ck_assert_qlora_ok(qlora_quant_offset(ctx, &aligned, NULL, &want));
        ck_assert_qlora_ok(qlora_quant_offset(ctx, &unaligned, NULL, &got));
        ck_assert_uint_eq(f_bits(got), f_bits(want));
        free(raw);
        assert_no_live_memory(ctx);
        qlora_ctx_free(ctx);
    }
}
END_TEST

START_TEST(cuda_context_rejects_host_tensors) {
    if (!tu_have_gpu())
        return;
    qlora_ctx_params cp = qlora_ctx_default_params();
    cp.backend = QLORA_BACKEND_CUDA;
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(&cp, &ctx));
    float x[64] = {1.0f};
    int64_t shape[1] = {64};
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_tensor_init(&t, "host_w", QLORA_F32, 1, shape, x, QLORA_DEVICE_HOST));
    qlora_qtensor q;
    ck_assert_qlora_fails(qlora_quantize(ctx, &t, NULL, &q), QLORA_ERR_DEVICE, "'host_w' is in host memory");
    assert_no_live_memory(ctx);
    qlora_ctx_free(ctx);
}
END_TEST

int main(void) {
    Suite *s = suite_create("quant4");
    TCase *tables = tcase_create("tables");
    tcase_add_test(tables, codebooks_are_bitsandbytes_bit_for_bit);
    tcase_add_test(tables, thresholds_are_the_bitsandbytes_decision_points);
    tcase_add_test(tables, dynamic_map_matches_bitsandbytes);
    tcase_add_test(tables, dynamic_map_is_built_once_across_threads);
    tcase_add_test(tables, dynamic_map_nearest_search);
    tcase_add_test(tables, double_quant_ties_fast_equals_reference);
    suite_add_tcase(s, tables);
    TCase *ref = tcase_create("reference");
    tcase_add_test(ref, known_vectors_nf4);
    tcase_add_test(ref, known_vectors_fp4);
    tcase_add_test(ref, double_quant_reconstruction_bound);
    suite_add_tcase(s, ref);
    TCase *backends = tcase_create("backends");
    tcase_add_test(backends, backends_match_reference_on_odd_sizes);
    tcase_add_test(backends, every_blocksize_matches_reference);
    tcase_add_test(backends, invalid_blocksizes_are_rejected);
    tcase_add_test(backends, all_zero_blocks_store_zero_and_the_zero_code);
    tcase_add_test(backends, gaussian_round_trip_error);
    tcase_add_test(backends, fast_kernels_equal_reference_for_any_thread_count);
    tcase_add_test(backends, fast_path_reads_every_finite_f16);
    suite_add_tcase(s, backends);
    TCase *api = tcase_create("api");
    tcase_add_test(api, non_finite_values_are_rejected_naming_the_element);
    tcase_add_test(api, memory_accountant_sees_codes_and_scales);
    tcase_add_test(api, arguments_are_checked_with_clear_errors);
    tcase_add_test(api, qtensor_alloc_copy_and_empty_tensors);
    tcase_add_test(api, cuda_context_rejects_host_tensors);
    tcase_add_test(api, quant_offset_equals_the_stored_offset);
    tcase_add_test(api, quant_offset_checks_its_arguments);
    suite_add_tcase(s, api);
    return tu_run_suite(s);
}
