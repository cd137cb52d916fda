/*
 * Shared helpers for the Check suites: the backends a test runs on, fresh random data (seeded
 * per run, printed, and reproducible with QLORA_TEST_SEED=N), temp dirs and fixture paths.
 */
#ifndef QLORA_TESTUTIL_H
#define QLORA_TESTUTIL_H

#include <check.h>
#include <stdint.h>

#include "qlora.h"

/* Fails the test with the library's last error when a call does not return QLORA_OK. */
#define ck_assert_qlora_ok(expr)                                                                     \
    do {                                                                                             \
        qlora_status ck_st_ = (expr);                                                                \
        ck_assert_msg(ck_st_ == QLORA_OK, "%s -> %s: %s", #expr, qlora_status_string(ck_st_),       \
                      qlora_last_error());                                                           \
    } while (0)

/* Asserts a specific failure status and that the message contains `needle`. */
#define ck_assert_qlora_fails(expr, status, needle)                                                  \
    do {                                                                                             \
        qlora_status ck_st_ = (expr);                                                                \
        ck_assert_msg(ck_st_ == (status), "%s -> %s (expected %s): %s", #expr,                      \
                      qlora_status_string(ck_st_), qlora_status_string(status), qlora_last_error()); \
        ck_assert_msg(strstr(qlora_last_error(), (needle)) != NULL, "error '%s' lacks '%s'",        \
                      qlora_last_error(), (needle));                                                 \
    } while (0)

/* The backends present in this build and machine: CPU-fast, CPU-reference, and CUDA device 0
 * when a GPU is visible. A test loops over them ("same test on each backend"). */
typedef struct tu_backend {
    const char *name;
    qlora_ctx_params params;
} tu_backend;
int tu_backends(tu_backend out[4]);
/* CUDA device 0 (whether or not one is visible). */
tu_backend tu_cuda_backend(void);
/* Creates a context for a backend; the test fails if it cannot. */
qlora_ctx *tu_ctx(const tu_backend *b);
/* tu_ctx(cuda:0): only where tu_have_gpu(). */
qlora_ctx *tu_cuda_ctx(void);
/* A tensor on the context's device (a workspace allocation) holding a copy of host data
 * (NULL: uninitialized). */
qlora_tensor tu_device_tensor(qlora_ctx *ctx, const char *name, qlora_dtype dtype, int ndim, const int64_t *shape,
                              const void *host);
/* 1 when a CUDA backend is usable here (built in and a device visible). */
int tu_have_gpu(void);

/* Random numbers: xoshiro256** seeded from tu_seed(). */
typedef struct tu_rng {
    uint64_t s[4];
} tu_rng;
uint64_t tu_seed(void);                      /* per-run seed, printed once */
void tu_rng_init(tu_rng *r, uint64_t seed);
uint64_t tu_next(tu_rng *r);
double tu_uniform(tu_rng *r);                /* [0, 1) */
double tu_normal(tu_rng *r);                 /* N(0, 1) */
/* Fills x[n] with N(0, sigma^2) float32 values. */
void tu_fill_normal(tu_rng *r, float *x, int64_t n, float sigma);

/* calloc that fails the test instead of returning NULL (n may be 0). */
void *tu_xmalloc(size_t n);
/* n BF16 values drawn from N(0, sigma^2), malloc'ed. */
uint16_t *tu_random_bf16(tu_rng *r, int64_t n, float sigma);
/* Converts float32 data to F32/F16/BF16 (RNE) in a malloc'ed buffer (never NULL). */
void *tu_to_dtype(const float *x, int64_t n, qlora_dtype dtype);

/* Makes a fresh temp directory (removed by tu_rmtree). Returned string is malloc'ed. */
char *tu_tempdir(void);
void tu_rmtree(const char *path);
/* Path of a fixture file: $QLORA_FIXTURES/<name> (static buffer). */
const char *tu_fixture(const char *name);
/* Writes bytes to a file; the test fails on error. */
void tu_write_file(const char *path, const void *data, size_t n);

/* Runs a suite with CK_NORMAL output and returns the process exit code. */
int tu_run_suite(Suite *s);

#endif
