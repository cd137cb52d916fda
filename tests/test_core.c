/* The C API core: version, status and errors, contexts, the tracked allocator, tensors. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

START_TEST(version_matches_header) {
    ck_assert_str_eq(qlora_version_string(), QLORA_VERSION_STRING);
    ck_assert_uint_eq(qlora_version_number(), QLORA_VERSION_NUMBER);
}
END_TEST

START_TEST(status_strings_cover_all) {
    for (int s = QLORA_OK; s <= QLORA_ERR_INTERNAL; s++)
        ck_assert_msg(strcmp(qlora_status_string((qlora_status)s), "unknown status") != 0, "status %d", s);
    ck_assert_str_eq(qlora_status_string((qlora_status)999), "unknown status");
}
END_TEST

static int log_calls;
static char log_last[1024];
static void capture_log(qlora_log_level level, const char *msg, void *user) {
    (void)user;
    if (level == QLORA_LOG_ERROR) {
        log_calls++;
        snprintf(log_last, sizeof log_last, "%s", msg);
    }
}

START_TEST(errors_name_the_argument_and_reach_the_log) {
    qlora_set_log_callback(capture_log, NULL);
    qlora_clear_error();
    ck_assert_str_eq(qlora_last_error(), "");
    ck_assert_qlora_fails(qlora_ctx_create(NULL, NULL), QLORA_ERR_INVALID_ARG, "out");
    ck_assert_int_eq(log_calls, 1);
    ck_assert_str_eq(log_last, qlora_last_error());
    qlora_ctx_params p = qlora_ctx_default_params();
    p.num_threads = -3;
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_fails(qlora_ctx_create(&p, &ctx), QLORA_ERR_INVALID_ARG, "num_threads");
    ck_assert_ptr_null(ctx);
    qlora_set_log_callback(NULL, NULL);
}
END_TEST

START_TEST(cuda_context_without_gpu_is_a_clear_error) {
    if (tu_have_gpu())
        return;
    qlora_ctx_params p = qlora_ctx_default_params();
    p.backend = QLORA_BACKEND_CUDA;
    qlora_ctx *ctx = NULL;
    qlora_status st = qlora_ctx_create(&p, &ctx);
    ck_assert_int_eq(st, qlora_has_cuda_backend() ? QLORA_ERR_DEVICE : QLORA_ERR_UNSUPPORTED);
    ck_assert_ptr_null(ctx);
    ck_assert(strlen(qlora_last_error()) > 10);
}
END_TEST

START_TEST(allocator_tracks_categories_and_peaks) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        int loc = qlora_ctx_backend(ctx) == QLORA_BACKEND_CUDA ? 1 : 0;
        void *p[200];
        for (int i = 0; i < 200; i++)
            ck_assert_qlora_ok(qlora_alloc(ctx, 1000 + (size_t)i, 1, (qlora_mem_category)(i % 3), &p[i]));
        qlora_mem_stats st;
        ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
        uint64_t total = 0;
        for (int i = 0; i < 200; i++)
            total += 1000 + (uint64_t)i;
        ck_assert_uint_eq(st.total_current[loc], total);
        ck_assert_uint_eq(st.current[loc][0] + st.current[loc][1] + st.current[loc][2], total);
        ck_assert_uint_eq(st.live_allocations, 200);
        for (int i = 0; i < 200; i += 2)
            qlora_free(ctx, p[i]);
        ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
        ck_assert_uint_eq(st.total_peak[loc], total);
        ck_assert_uint_eq(st.live_allocations, 100);
        qlora_mem_reset_peak(ctx);
        ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
        ck_assert_uint_eq(st.total_peak[loc], st.total_current[loc]);
        for (int i = 1; i < 200; i += 2) {
            ck_assert_uint_eq((uintptr_t)p[i] % 256, 0);
            qlora_free(ctx, p[i]);
        }
        ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
        ck_assert_uint_eq(st.total_current[loc], 0);
        ck_assert_uint_eq(st.allocations, 200);
        qlora_free(ctx, NULL);
        ck_assert_qlora_fails(qlora_alloc(ctx, 16, 1, QLORA_MEM_CATEGORY_COUNT, &p[0]), QLORA_ERR_INVALID_ARG,
                              "category");
        ck_assert_qlora_fails(qlora_alloc(ctx, SIZE_MAX, 1, QLORA_MEM_WORKSPACE, &p[0]), QLORA_ERR_OUT_OF_MEMORY,
                              "too large");
        qlora_ctx_free(ctx);
    }
}
END_TEST

START_TEST(category_names_are_distinct) {
    for (int i = 0; i < QLORA_MEM_CATEGORY_COUNT; i++)
        for (int j = i + 1; j < QLORA_MEM_CATEGORY_COUNT; j++)
            ck_assert_str_ne(qlora_mem_category_name((qlora_mem_category)i), qlora_mem_category_name((qlora_mem_category)j));
    ck_assert_str_eq(qlora_mem_category_name(QLORA_MEM_CATEGORY_COUNT), "invalid");
}
END_TEST

START_TEST(tensor_sizes_and_dtypes) {
    qlora_tensor t;
    int64_t shape[2] = {3, 5};
    ck_assert_qlora_ok(qlora_tensor_init(&t, "w", QLORA_NF4, 2, shape, NULL, QLORA_DEVICE_HOST));
    ck_assert_int_eq(qlora_tensor_numel(&t), 15);
    ck_assert_uint_eq(qlora_tensor_nbytes(&t), 8);
    ck_assert_qlora_ok(qlora_tensor_init(&t, "s", QLORA_BF16, 0, NULL, NULL, QLORA_DEVICE_HOST));
    ck_assert_int_eq(qlora_tensor_numel(&t), 1);
    ck_assert_uint_eq(qlora_tensor_nbytes(&t), 2);
    int64_t bad[1] = {-1};
    ck_assert_qlora_fails(qlora_tensor_init(&t, "neg", QLORA_F32, 1, bad, NULL, QLORA_DEVICE_HOST), QLORA_ERR_SHAPE,
                          "'neg'");
    ck_assert_qlora_fails(qlora_tensor_init(&t, "deep", QLORA_F32, 9, shape, NULL, QLORA_DEVICE_HOST),
                          QLORA_ERR_SHAPE, "'deep'");
    qlora_dtype d;
    ck_assert_qlora_ok(qlora_dtype_from_name("F8_E4M3FNUZ", &d));
    ck_assert_int_eq(d, QLORA_F8_E4M3FNUZ);
    ck_assert_qlora_fails(qlora_dtype_from_name("NF4", &d), QLORA_ERR_DTYPE, "NF4");
    ck_assert_int_eq(qlora_dtype_bits(QLORA_F6_E2M3), 6);
    for (int i = 0; i < QLORA_DTYPE_COUNT; i++)
        ck_assert_int_gt(qlora_dtype_bits((qlora_dtype)i), 0);
}
END_TEST

START_TEST(tensor_alloc_copy_roundtrip) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        int64_t shape[2] = {17, 33};
        qlora_tensor host, dev, back;
        ck_assert_qlora_ok(qlora_tensor_init(&host, "host", QLORA_F32, 2, shape, NULL, QLORA_DEVICE_HOST));
        ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &host, 0, QLORA_MEM_WORKSPACE));
        tu_fill_normal(&rng, host.data, 17 * 33, 1.0f);
        dev = host;
        ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &dev, 1, QLORA_MEM_WORKSPACE));
        back = host;
        ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &back, 0, QLORA_MEM_WORKSPACE));
        ck_assert_qlora_ok(qlora_tensor_copy(ctx, &dev, &host));
        ck_assert_qlora_ok(qlora_tensor_copy(ctx, &back, &dev));
        ck_assert_mem_eq(host.data, back.data, 17 * 33 * 4);
        qlora_tensor wrong = host;
        wrong.dtype = QLORA_BF16;
        ck_assert_qlora_fails(qlora_tensor_copy(ctx, &wrong, &host), QLORA_ERR_DTYPE, "'host'");
        qlora_tensor_free(ctx, &host);
        qlora_tensor_free(ctx, &dev);
        qlora_tensor_free(ctx, &back);
        qlora_mem_stats st;
        ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
        ck_assert_uint_eq(st.total_current[0] + st.total_current[1], 0);
        qlora_ctx_free(ctx);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("core");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, version_matches_header);
    tcase_add_test(tc, status_strings_cover_all);
    tcase_add_test(tc, errors_name_the_argument_and_reach_the_log);
    tcase_add_test(tc, cuda_context_without_gpu_is_a_clear_error);
    tcase_add_test(tc, allocator_tracks_categories_and_peaks);
    tcase_add_test(tc, category_names_are_distinct);
    tcase_add_test(tc, tensor_sizes_and_dtypes);
    tcase_add_test(tc, tensor_alloc_copy_roundtrip);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
