/* Shared helpers for the Check suites (see testutil.h). */
#include "testutil.h"

#include "half.h"

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int tu_have_gpu(void) { return qlora_has_cuda_backend() && qlora_cuda_device_count() > 0; }

int tu_backends(tu_backend out[4]) {
    int n = 0;
    out[n].name = "cpu-fast";
    out[n].params = qlora_ctx_default_params();
    n++;
    out[n].name = "cpu-reference";
    out[n].params = qlora_ctx_default_params();
    out[n].params.cpu_kernels = QLORA_CPU_REFERENCE;
    n++;
    if (tu_have_gpu())
        out[n++] = tu_cuda_backend();
    return n;
}

tu_backend tu_cuda_backend(void) {
    tu_backend b;
    b.name = "cuda:0";
    b.params = qlora_ctx_default_params();
    b.params.backend = QLORA_BACKEND_CUDA;
    b.params.device = 0;
    return b;
}

qlora_ctx *tu_ctx(const tu_backend *b) {
    qlora_ctx *ctx = NULL;
    qlora_status st = qlora_ctx_create(&b->params, &ctx);
    ck_assert_msg(st == QLORA_OK, "backend %s: %s", b->name, qlora_last_error());
    return ctx;
}

qlora_ctx *tu_cuda_ctx(void) {
    tu_backend b = tu_cuda_backend();
    return tu_ctx(&b);
}

qlora_tensor tu_device_tensor(qlora_ctx *ctx, const char *name, qlora_dtype dtype, int ndim, const int64_t *shape,
                              const void *host) {
    qlora_tensor h, d;
    ck_assert_qlora_ok(qlora_tensor_init(&h, name, dtype, ndim, shape, (void *)host, QLORA_DEVICE_HOST));
    d = h;
    ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &d, 1, QLORA_MEM_WORKSPACE));
    if (host)
        ck_assert_qlora_ok(qlora_tensor_copy(ctx, &d, &h));
    return d;
}

uint64_t tu_seed(void) {
    static uint64_t seed;
    static int init;
    if (!init) {
        const char *env = getenv("QLORA_TEST_SEED");
        if (env && *env)
            seed = strtoull(env, NULL, 0);
        else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            seed = (uint64_t)ts.tv_sec * 1000003u ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32);
        }
        init = 1;
        fprintf(stderr, "test seed: QLORA_TEST_SEED=%llu\n", (unsigned long long)seed);
    }
    return seed;
}

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void tu_rng_init(tu_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t tu_next(tu_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double tu_uniform(tu_rng *r) { return (double)(tu_next(r) >> 11) * 0x1.0p-53; }

double tu_normal(tu_rng *r) {
    double u1 = tu_uniform(r), u2 = tu_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void tu_fill_normal(tu_rng *r, float *x, int64_t n, float sigma) {
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)(tu_normal(r) * sigma);
}

void *tu_to_dtype(const float *x, int64_t n, qlora_dtype dtype) {
    size_t elem = dtype == QLORA_F32 ? 4 : 2;
    void *out = malloc((size_t)(n > 0 ? n : 1) * elem);
    ck_assert_ptr_nonnull(out);
    for (int64_t i = 0; i < n; i++) {
        if (dtype == QLORA_F32)
            ((float *)out)[i] = x[i];
        else if (dtype == QLORA_F16)
            ((uint16_t *)out)[i] = ql_f32_to_f16(x[i]);
        else
            ((uint16_t *)out)[i] = ql_f32_to_bf16(x[i]);
    }
    return out;
}

char *tu_tempdir(void) {
    const char *base = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/qlora-test-XXXXXX", base && *base ? base : "/tmp");
    char *d = mkdtemp(tmpl);
    ck_assert_msg(d != NULL, "mkdtemp: %s", strerror(errno));
    return strdup(d);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void tu_rmtree(const char *path) {
    if (path)
        nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

const char *tu_fixture(const char *name) {
    static char buf[4096];
    const char *dir = getenv("QLORA_FIXTURES");
    snprintf(buf, sizeof buf, "%s/%s", dir && *dir ? dir : "tests/fixtures", name);
    return buf;
}

void tu_write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "fopen %s: %s", path, strerror(errno));
    ck_assert_msg(fwrite(data, 1, n, f) == n, "fwrite %s", path);
    ck_assert_msg(fclose(f) == 0, "fclose %s", path);
}

int tu_run_suite(Suite *s) {
    (void)tu_seed();
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

void *tu_xmalloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

uint16_t *tu_random_bf16(tu_rng *r, int64_t n, float sigma) {
    float *f = tu_xmalloc((size_t)n * sizeof(float));
    tu_fill_normal(r, f, n, sigma);
    uint16_t *h = tu_to_dtype(f, n, QLORA_BF16);
    free(f);
    return h;
}
