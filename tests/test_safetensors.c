/* safetensors reader (validation corpus), atomic/sharded writer, and checkpoints. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

/* ------------------------------------------------------------------ helpers */

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    ck_assert_ptr_nonnull(p);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static unsigned char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "fopen %s: %s", path, strerror(errno));
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    ck_assert_int_ge(n, 0);
    rewind(f);
    unsigned char *buf = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

static int count_dir_entries(const char *dir) {
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* A raw file: 8-byte little-endian header_len, then header[hlen], then data_len data bytes. */
static void write_raw(const char *path, uint64_t header_len, const char *header, size_t hlen, size_t data_len) {
    size_t n = 8 + hlen + data_len;
    unsigned char *buf = malloc(n);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(header_len >> (8 * i));
    memcpy(buf + 8, header, hlen);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + hlen + i] = (unsigned char)(i * 37 + 11);
    tu_write_file(path, buf, n);
    free(buf);
}

static void write_st(const char *path, const char *header, size_t data_len) {
    write_raw(path, strlen(header), header, strlen(header), data_len);
}

/* The file must be rejected with QLORA_ERR_FORMAT, naming the file and `needle`. */
static void expect_format(const char *path, const char *needle, const char *label) {
    qlora_safetensors *f = (qlora_safetensors *)1;
    qlora_status st = qlora_safetensors_open(path, &f);
    ck_assert_msg(st == QLORA_ERR_FORMAT, "%s: got %s: %s", label, qlora_status_string(st), qlora_last_error());
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(qlora_last_error(), path) != NULL, "%s: '%s' lacks the file name", label, qlora_last_error());
    if (needle)
        ck_assert_msg(strstr(qlora_last_error(), needle) != NULL, "%s: '%s' lacks '%s'", label, qlora_last_error(),
                      needle);
}

/* --------------------------------------------------------- reader: rejects */

typedef struct bad_header {
    const char *label;
    const char *header;
    size_t data_len;
    const char *needle; /* tensor name or key the message must contain */
} bad_header;

#define T1(dtype, shape, offs) "{\"w\":{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offs "}}"

static const bad_header bad_headers[] = {
    {"invalid JSON", "{\"w\":", 0, "JSON"},
    {"JSON array", "[1,2]", 0, "not a JSON object"},
    {"JSON string", "\"w\"", 0, "not a JSON object"},
    {"trailing JSON", "{}{}", 0, "after the JSON object"},
    {"trailing garbage", "{} x", 0, "JSON"},
    {"leading zero", T1("U8", "[01]", "[0,1]"), 1, "JSON"},
    {"plus sign", T1("U8", "[+1]", "[0,1]"), 1, "JSON"},
    {"control char in string", "{\"w\x01\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "control"},
    {"vertical tab whitespace", "\v{}", 0, "JSON"},
    {"NUL escape", "{\"w\\u0000x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "NUL"},
    {"lone surrogate", "{\"w\\ud800\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "JSON"},
    {"unknown dtype", T1("Q8", "[1]", "[0,1]"), 1, "'w'"},
    {"NF4 is not a safetensors dtype", T1("NF4", "[2]", "[0,1]"), 1, "'w'"},
    {"dtype not a string", "{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "'w'"},
    {"fractional shape", T1("U8", "[2.0]", "[0,2]"), 2, "'w'"},
    {"fractional shape 2", T1("U8", "[1.5]", "[0,2]"), 2, "'w'"},
    {"negative shape", T1("U8", "[-1]", "[0,1]"), 1, "'w'"},
    {"exponent shape", T1("U8", "[1e1]", "[0,10]"), 10, "'w'"},
    {"shape beyond u64", T1("U8", "[18446744073709551616]", "[0,1]"), 1, "'w'"},
    {"shape not an array", T1("U8", "3", "[0,3]"), 3, "'w'"},
    {"shape of strings", T1("U8", "[\"3\"]", "[0,3]"), 3, "'w'"},
    {"negative offset", T1("U8", "[1]", "[-1,0]"), 1, "'w'"},
    {"fractional offset", T1("U8", "[1]", "[0,1.0]"), 1, "'w'"},
    {"one offset", T1("U8", "[1]", "[1]"), 1, "'w'"},
    {"three offsets", T1("U8", "[1]", "[0,1,1]"), 1, "'w'"},
    {"entry not an object", "{\"w\":5}", 0, "'w'"},
    {"missing data_offsets", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1, "'w'"},
    {"missing dtype", "{\"w\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "'w'"},
    {"extra key", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", 1, "'w'"},
    {"duplicate key in entry", "{\"w\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
     "'w'"},
    {"duplicate tensor", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                         "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, "'w'"},
    {"metadata value not a string", "{\"__metadata__\":{\"k\":1}}", 0, "__metadata__"},
    {"metadata not an object", "{\"__metadata__\":\"pt\"}", 0, "__metadata__"},
    {"duplicate metadata key", "{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, "'k'"},
    {"duplicate __metadata__", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, "__metadata__"},
    {"gap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, "'b'"},
    {"overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "'b'"},
    {"same offsets (json attack)", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                                   "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "data_offsets"},
    {"not starting at 0", T1("F32", "[1]", "[4,8]"), 8, "'w'"},
    {"end before begin", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                         "\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,2]}}", 4, "'b'"},
    {"wrong byte count", T1("F32", "[2]", "[0,4]"), 4, "'w'"},
    {"wrong byte count 2", T1("BF16", "[3,2]", "[0,13]"), 13, "'w'"},
    {"trailing bytes", T1("F32", "[2]", "[0,8]"), 11, "trailing"},
    {"truncated data", T1("F32", "[4]", "[0,16]"), 8, "truncated"},
    {"empty header with data", "{}", 1, "trailing"},
    {"overflowing shape", T1("F32", "[4294967296,4294967296,16]", "[0,0]"), 0, "'w'"},
    {"overflowing bits", T1("F64", "[4294967296,1073741824]", "[0,0]"), 0, "'w'"},
    {"F4 odd count", T1("F4", "[3]", "[0,2]"), 2, "'w'"},
    {"F6 count not a byte multiple", T1("F6_E2M3", "[2]", "[0,2]"), 2, "'w'"},
};

START_TEST(reader_rejects_malformed_headers) {
    char *dir = tu_tempdir();
    for (size_t i = 0; i < sizeof bad_headers / sizeof bad_headers[0]; i++) {
        const bad_header *b = &bad_headers[i];
        char name[64];
        snprintf(name, sizeof name, "bad-%02zu.safetensors", i);
        char *path = path_join(dir, name);
        write_st(path, b->header, b->data_len);
        expect_format(path, b->needle, b->label);
        free(path);
    }
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(reader_rejects_bad_framing) {
    char *dir = tu_tempdir();
    char *path = path_join(dir, "frame.safetensors");
    /* Fewer than 8 bytes. */
    tu_write_file(path, "\x02\x00\x00\x00\x00", 5);
    expect_format(path, "8-byte", "too small");
    tu_write_file(path, "", 0);
    expect_format(path, "8-byte", "empty file");
    /* Header length over 100,000,000. */
    write_raw(path, 100000001ull, "{}", 2, 0);
    expect_format(path, "exceeds", "header too large");
    /* Huge length: must not overflow 8 + N. */
    write_raw(path, UINT64_MAX, "{}", 2, 0);
    expect_format(path, "exceeds", "header length 2^64-1");
    write_raw(path, UINT64_MAX - 7, "{}", 2, 0);
    expect_format(path, "exceeds", "header length 2^64-8");
    /* Header past the end of the file. */
    write_raw(path, 100, "{}      ", 8, 0);
    expect_format(path, "past the end", "header past EOF");
    /* Invalid UTF-8, an overlong encoding, and an encoded surrogate. */
    const char *bad_utf8[3] = {"{\"w\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                               "{\"w\xc0\xaf\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                               "{\"w\xed\xa0\x80\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}"};
    for (int i = 0; i < 3; i++) {
        write_st(path, bad_utf8[i], 1);
        expect_format(path, "UTF-8", "bad UTF-8");
    }
    /* A NUL byte inside the header (outside a string). */
    write_raw(path, 3, "{}\0", 3, 0);
    expect_format(path, "JSON", "NUL after the object");
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(reader_reports_missing_and_unsupported) {
    char *dir = tu_tempdir();
    char *path = path_join(dir, "absent.safetensors");
    qlora_safetensors *f;
    ck_assert_qlora_fails(qlora_safetensors_open(path, &f), QLORA_ERR_NOT_FOUND, "absent.safetensors");
    ck_assert_qlora_fails(qlora_safetensors_open(dir, &f), QLORA_ERR_IO, "not a regular file");
    /* Nine dimensions are valid safetensors but beyond QLORA_MAX_DIMS. */
    write_st(path, T1("U8", "[1,1,1,1,1,1,1,1,1]", "[0,1]"), 1);
    ck_assert_qlora_fails(qlora_safetensors_open(path, &f), QLORA_ERR_UNSUPPORTED, "'w'");
    ck_assert_qlora_fails(qlora_safetensors_open(NULL, &f), QLORA_ERR_INVALID_ARG, "path");
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* --------------------------------------------------------- reader: accepts */

START_TEST(reader_accepts_edge_cases) {
    char *dir = tu_tempdir();
    char *path = path_join(dir, "edge.safetensors");
    qlora_safetensors *f;
    qlora_tensor t;

    /* "{}" with no padding, and the reference writer's empty file. */
    write_st(path, "{}", 0);
    ck_assert_qlora_ok(qlora_safetensors_open(path, &f));
    ck_assert_uint_eq(qlora_safetensors_count(f), 0);
    ck_assert_ptr_null(qlora_safetensors_metadata(f, "format"));
    qlora_safetensors_close(f);
    write_st(path, "{}      ", 0);
    ck_assert_qlora_ok(qlora_safetensors_open(path, &f));
    qlora_safetensors_close(f);

    /* Leading and trailing JSON whitespace, null metadata, header keys out of offset order,
     * a scalar, zero-sized tensors, sub-byte types with whole bytes. */
    const char *hdr = " \n\t\r{\"__metadata__\":null,"
                      "\"z\":{\"data_offsets\":[8,12],\"shape\":[],\"dtype\":\"F32\"},"
                      "\"e1\":{\"dtype\":\"BF16\",\"shape\":[0,5],\"data_offsets\":[8,8]},"
                      "\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]},"
                      "\"f4\":{\"dtype\":\"F4\",\"shape\":[2,3],\"data_offsets\":[12,15]},"
                      "\"f6\":{\"dtype\":\"F6_E3M2\",\"shape\":[4],\"data_offsets\":[15,18]},"
                      "\"e2\":{\"dtype\":\"U8\",\"shape\":[3,0],\"data_offsets\":[18,18]}} \r\n\t ";
    write_st(path, hdr, 18);
    ck_assert_qlora_ok(qlora_safetensors_open(path, &f));
    ck_assert_uint_eq(qlora_safetensors_count(f), 6);
    ck_assert_ptr_null(qlora_safetensors_metadata(f, "format"));
    const char *order[6] = {"a", "e1", "z", "f4", "f6", "e2"};
    const unsigned char *prev = NULL;
    for (size_t i = 0; i < 6; i++) {
        ck_assert_qlora_ok(qlora_safetensors_get(f, i, &t));
        ck_assert_str_eq(t.name, order[i]);
        ck_assert_int_eq(t.device, QLORA_DEVICE_HOST);
        ck_assert(prev == NULL || (const unsigned char *)t.data >= prev);
        prev = t.data;
    }
    ck_assert_qlora_ok(qlora_safetensors_find(f, "z", &t));
    ck_assert_int_eq(t.dtype, QLORA_F32);
    ck_assert_int_eq(t.ndim, 0);
    ck_assert_int_eq(qlora_tensor_numel(&t), 1);
    /* The data bytes are exactly where the offsets say (write_raw's pattern). */
    ck_assert_uint_eq(((const unsigned char *)t.data)[0], (unsigned char)(8 * 37 + 11));
    ck_assert_qlora_ok(qlora_safetensors_find(f, "e1", &t));
    ck_assert_int_eq(t.ndim, 2);
    ck_assert_int_eq(t.shape[0], 0);
    ck_assert_int_eq(t.shape[1], 5);
    ck_assert_int_eq(qlora_tensor_numel(&t), 0);
    ck_assert_qlora_ok(qlora_safetensors_find(f, "f4", &t));
    ck_assert_int_eq(t.dtype, QLORA_F4);
    ck_assert_uint_eq(qlora_tensor_nbytes(&t), 3);
    ck_assert_qlora_fails(qlora_safetensors_find(f, "nope", &t), QLORA_ERR_NOT_FOUND, "'nope'");
    ck_assert_qlora_fails(qlora_safetensors_get(f, 6, &t), QLORA_ERR_INVALID_ARG, "out of range");
    qlora_safetensors_close(f);

    /* Metadata of strings, escaped and non-ASCII. */
    write_st(path, "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"a\\\"b\\u00e9\\n\"}}", 0);
    ck_assert_qlora_ok(qlora_safetensors_open(path, &f));
    ck_assert_str_eq(qlora_safetensors_metadata(f, "format"), "pt");
    ck_assert_str_eq(qlora_safetensors_metadata(f, "note"), "a\"b\xc3\xa9\n");
    ck_assert_ptr_null(qlora_safetensors_metadata(f, "other"));
    qlora_safetensors_close(f);
    qlora_safetensors_close(NULL);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* ------------------------------------------------------------------ writer */

typedef struct rt_tensor {
    char name[64];
    qlora_dtype dtype;
    int ndim;
    int64_t shape[QLORA_MAX_DIMS];
    unsigned char *data;
    size_t nbytes;
} rt_tensor;

/* Random tensors of every storable dtype, incl. scalars, zero-sized and sub-byte ones. */
static int make_random_tensors(tu_rng *rng, rt_tensor *ts, int max) {
    int n = 0;
    for (int d = 0; d < QLORA_DTYPE_COUNT && n < max; d++) {
        if (d == QLORA_NF4 || d == QLORA_FP4)
            continue;
        for (int v = 0; v < 3 && n < max; v++) {
            rt_tensor *t = &ts[n];
            snprintf(t->name, sizeof t->name, "layer.%d.%s.v%d", (int)(tu_next(rng) % 100), qlora_dtype_name(d), v);
            t->dtype = (qlora_dtype)d;
            t->ndim = v == 0 ? 0 : 1 + (int)(tu_next(rng) % 4);
            int64_t numel = 1;
            for (int k = 0; k < t->ndim; k++) {
                t->shape[k] = 1 + (int64_t)(tu_next(rng) % 6);
                numel *= t->shape[k];
            }
            if (v == 2 && t->ndim > 0) { /* zero-sized */
                t->shape[t->ndim - 1] = 0;
                numel = 0;
            }
            int bits = qlora_dtype_bits(t->dtype);
            if (bits < 8 && (numel * bits) % 8 != 0) { /* make sub-byte types a whole number of bytes */
                t->ndim = 1;
                t->shape[0] = 8;
                numel = 8;
            }
            t->nbytes = (size_t)(numel * bits / 8);
            t->data = malloc(t->nbytes + 1);
            ck_assert_ptr_nonnull(t->data);
            for (size_t b = 0; b < t->nbytes; b++)
                t->data[b] = (unsigned char)tu_next(rng);
            n++;
        }
    }
    return n;
}

static void shuffle(tu_rng *rng, int *idx, int n) {
    for (int i = 0; i < n; i++)
        idx[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(tu_next(rng) % (uint64_t)(i + 1));
        int tmp = idx[i];
        idx[i] = idx[j];
        idx[j] = tmp;
    }
}

static void check_tensor_in(const qlora_safetensors *f, const rt_tensor *e) {
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_safetensors_find(f, e->name, &t));
    ck_assert_str_eq(t.name, e->name);
    ck_assert_int_eq(t.dtype, e->dtype);
    ck_assert_int_eq(t.ndim, e->ndim);
    for (int k = 0; k < e->ndim; k++)
        ck_assert_int_eq(t.shape[k], e->shape[k]);
    ck_assert_uint_eq(qlora_tensor_nbytes(&t), e->nbytes);
    ck_assert(e->nbytes == 0 || memcmp(t.data, e->data, e->nbytes) == 0);
}

START_TEST(writer_roundtrip_random_tensors) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    char *dir = tu_tempdir();
    char *path = path_join(dir, "rt.safetensors");
    rt_tensor ts[80];
    int n = make_random_tensors(&rng, ts, 80);
    int order[80];
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_qlora_ok(qlora_st_writer_set_metadata(w, "note", "round trip \"quoted\" caf\xc3\xa9"));
    ck_assert_qlora_ok(qlora_st_writer_set_metadata(w, "step", "1"));
    ck_assert_qlora_ok(qlora_st_writer_set_metadata(w, "step", "2"));
    shuffle(&rng, order, n);
    for (int i = 0; i < n; i++)
        ck_assert_qlora_ok(qlora_st_writer_declare(w, ts[order[i]].name, ts[order[i]].dtype, ts[order[i]].ndim,
                                                   ts[order[i]].shape));
    shuffle(&rng, order, n);
    for (int i = 0; i < n; i++)
        ck_assert_qlora_ok(qlora_st_writer_write(w, ts[order[i]].name, ts[order[i]].data, ts[order[i]].nbytes));
    ck_assert(!file_exists(path)); /* nothing visible before commit */
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    ck_assert_int_eq(count_dir_entries(dir), 1);

    qlora_safetensors *f;
    ck_assert_qlora_ok(qlora_safetensors_open(path, &f));
    ck_assert_uint_eq(qlora_safetensors_count(f), (size_t)n);
    ck_assert_str_eq(qlora_safetensors_metadata(f, "format"), "pt");
    ck_assert_str_eq(qlora_safetensors_metadata(f, "note"), "round trip \"quoted\" caf\xc3\xa9");
    ck_assert_str_eq(qlora_safetensors_metadata(f, "step"), "2");
    for (int i = 0; i < n; i++)
        check_tensor_in(f, &ts[i]);
    /* The reference layout: dtypes of larger alignment first, so every tensor is aligned. */
    for (size_t i = 0; i < qlora_safetensors_count(f); i++) {
        qlora_tensor t;
        ck_assert_qlora_ok(qlora_safetensors_get(f, i, &t));
        int bytes = qlora_dtype_bits(t.dtype) / 8;
        if (bytes > 1)
            ck_assert_msg((uintptr_t)t.data % (uintptr_t)bytes == 0, "'%s' is unaligned", t.name);
    }
    qlora_safetensors_close(f);

    /* Header length is a multiple of 8 and the header starts with '{'. */
    size_t len;
    unsigned char *bytes = read_all(path, &len);
    ck_assert_uint_eq(bytes[0] % 8, 0);
    ck_assert_int_eq(bytes[8], '{');
    free(bytes);
    for (int i = 0; i < n; i++)
        free(ts[i].data);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(writer_matches_reference_bytes) {
    /* st_reference.safetensors was written by the Python safetensors 0.8 binding
     * (tests/fixtures/make_st_fixture.py); writing the same tensors must give the same bytes. */
    const char *ref = tu_fixture("st_reference.safetensors");
    qlora_safetensors *f;
    ck_assert_qlora_ok(qlora_safetensors_open(ref, &f));
    size_t n = qlora_safetensors_count(f);
    ck_assert_uint_ge(n, 20);
    ck_assert_str_eq(qlora_safetensors_metadata(f, "format"), "pt");
    char *dir = tu_tempdir();
    char *path = path_join(dir, "ours.safetensors");
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    for (size_t i = n; i-- > 0;) {
        qlora_tensor t;
        ck_assert_qlora_ok(qlora_safetensors_get(f, i, &t));
        ck_assert_qlora_ok(qlora_st_writer_declare(w, t.name, t.dtype, t.ndim, t.shape));
    }
    for (size_t k = 0; k < n; k++) {
        qlora_tensor t;
        ck_assert_qlora_ok(qlora_safetensors_get(f, (k * 7) % n, &t)); /* 7 is coprime with n: a permutation */
        ck_assert_qlora_ok(qlora_st_writer_write(w, t.name, t.data, qlora_tensor_nbytes(&t)));
    }
    ck_assert_uint_ne(n % 7, 0);
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    qlora_safetensors_close(f);
    size_t la, lb;
    unsigned char *a = read_all(ref, &la), *b = read_all(path, &lb);
    ck_assert_uint_eq(la, lb);
    size_t first_diff = 0;
    while (first_diff < la && a[first_diff] == b[first_diff])
        first_diff++;
    ck_assert_msg(first_diff == la, "files differ at byte %zu", first_diff);
    free(a);
    free(b);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(writer_rejects_misuse) {
    char *dir = tu_tempdir();
    char *path = path_join(dir, "m.safetensors");
    qlora_st_writer *w;
    int64_t shape[2] = {2, 3}, odd = 3;
    float data[6] = {1, 2, 3, 4, 5, 6};
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "w", QLORA_F32, 2, shape));
    ck_assert_qlora_fails(qlora_st_writer_declare(w, "w", QLORA_F32, 2, shape), QLORA_ERR_INVALID_ARG, "'w'");
    ck_assert_qlora_fails(qlora_st_writer_declare(w, "q", QLORA_NF4, 2, shape), QLORA_ERR_DTYPE, "'q'");
    ck_assert_qlora_fails(qlora_st_writer_declare(w, "f4", QLORA_F4, 1, &odd), QLORA_ERR_SHAPE, "'f4'");
    ck_assert_qlora_fails(qlora_st_writer_declare(w, "__metadata__", QLORA_U8, 1, &odd), QLORA_ERR_INVALID_ARG,
                          "__metadata__");
    ck_assert_qlora_fails(qlora_st_writer_declare(w, "bad\xff", QLORA_U8, 1, &odd), QLORA_ERR_INVALID_ARG, "UTF-8");
    ck_assert_qlora_fails(qlora_st_writer_write(w, "nope", data, 4), QLORA_ERR_NOT_FOUND, "'nope'");
    ck_assert_qlora_fails(qlora_st_writer_write(w, "w", data, 20), QLORA_ERR_SHAPE, "'w'");
    ck_assert_qlora_ok(qlora_st_writer_write(w, "w", data, sizeof data));
    ck_assert_qlora_fails(qlora_st_writer_write(w, "w", data, sizeof data), QLORA_ERR_INVALID_ARG, "twice");
    ck_assert_qlora_fails(qlora_st_writer_declare(w, "late", QLORA_U8, 1, &odd), QLORA_ERR_INVALID_ARG, "'late'");
    ck_assert_qlora_fails(qlora_st_writer_set_metadata(w, "k", "v"), QLORA_ERR_INVALID_ARG, "'k'");
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    ck_assert(file_exists(path));
    ck_assert_qlora_fails(qlora_st_writer_commit(NULL), QLORA_ERR_INVALID_ARG, "w");
    qlora_st_writer_abort(NULL);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(writer_commit_refuses_missing_tensor) {
    char *dir = tu_tempdir();
    char *path = path_join(dir, "m.safetensors");
    qlora_st_writer *w;
    int64_t n4 = 4, n0 = 0;
    uint8_t bytes[4] = {1, 2, 3, 4};
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "written", QLORA_U8, 1, &n4));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "forgotten", QLORA_U8, 1, &n4));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "written", bytes, 4));
    ck_assert_qlora_fails(qlora_st_writer_commit(w), QLORA_ERR_INVALID_ARG, "'forgotten'");
    ck_assert_int_eq(count_dir_entries(dir), 0);
    /* Zero-sized tensors must be written too (with 0 bytes). */
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "empty", QLORA_F32, 1, &n0));
    ck_assert_qlora_fails(qlora_st_writer_commit(w), QLORA_ERR_INVALID_ARG, "'empty'");
    ck_assert_int_eq(count_dir_entries(dir), 0);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(writer_abort_leaves_nothing) {
    char *dir = tu_tempdir();
    char *path = path_join(dir, "a.safetensors");
    char *shards = path_join(dir, "sharded");
    int64_t n = 64;
    uint8_t bytes[64] = {0};
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_int_eq(count_dir_entries(dir), 1); /* the temp file */
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "x", QLORA_U8, 1, &n));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "x", bytes, 64));
    qlora_st_writer_abort(w);
    ck_assert_int_eq(count_dir_entries(dir), 0);

    ck_assert_qlora_ok(qlora_st_writer_open(shards, 100, &w));
    for (int i = 0; i < 5; i++) {
        char name[16];
        snprintf(name, sizeof name, "t%d", i);
        ck_assert_qlora_ok(qlora_st_writer_declare(w, name, QLORA_U8, 1, &n));
    }
    ck_assert_qlora_ok(qlora_st_writer_write(w, "t3", bytes, 64));
    ck_assert_int_eq(count_dir_entries(shards), 6); /* 5 shards + index, all temp */
    qlora_st_writer_abort(w);
    ck_assert(!file_exists(shards)); /* the directory it created is gone too */
    free(path);
    free(shards);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(writer_replaces_existing_file) {
    char *dir = tu_tempdir();
    char *path = path_join(dir, "r.safetensors");
    tu_write_file(path, "old contents", 12);
    qlora_st_writer *w;
    int64_t n = 2;
    uint16_t v[2] = {7, 9};
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "v", QLORA_U16, 1, &n));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "v", v, sizeof v));
    size_t len;
    unsigned char *old = read_all(path, &len);
    ck_assert_uint_eq(len, 12); /* untouched until commit */
    free(old);
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    qlora_safetensors *f;
    ck_assert_qlora_ok(qlora_safetensors_open(path, &f));
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_safetensors_find(f, "v", &t));
    ck_assert_int_eq(((uint16_t *)t.data)[1], 9);
    qlora_safetensors_close(f);
    ck_assert_int_eq(count_dir_entries(dir), 1);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(writer_unwritable_destination_is_io_error) {
    char *dir = tu_tempdir();
    char *missing = path_join(dir, "no-such-dir/x.safetensors");
    char *file = path_join(dir, "plain");
    tu_write_file(file, "x", 1);
    char *under_file = path_join(file, "x.safetensors");
    qlora_st_writer *w = (qlora_st_writer *)1;
    ck_assert_qlora_fails(qlora_st_writer_open(missing, 0, &w), QLORA_ERR_IO, missing);
    ck_assert_ptr_null(w);
    ck_assert(strstr(qlora_last_error(), "No such file") != NULL);
    ck_assert_qlora_fails(qlora_st_writer_open(under_file, 0, &w), QLORA_ERR_IO, under_file);
    ck_assert_qlora_fails(qlora_st_writer_open(missing, 1000, &w), QLORA_ERR_IO, missing); /* parent missing */
    ck_assert_qlora_fails(qlora_st_writer_open(file, 1000, &w), QLORA_ERR_IO, file);       /* not a directory */
    ck_assert_qlora_fails(qlora_st_writer_open(dir, 0, &w), QLORA_ERR_IO, dir);            /* a directory */
    if (geteuid() != 0) { /* permissions do not stop root */
        char *ro = path_join(dir, "ro");
        ck_assert_int_eq(mkdir(ro, 0555), 0);
        char *target = path_join(ro, "x.safetensors");
        ck_assert_qlora_fails(qlora_st_writer_open(target, 0, &w), QLORA_ERR_IO, target);
        free(target);
        free(ro);
    }
    free(missing);
    free(file);
    free(under_file);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(writer_reports_short_writes) {
    /* A file size limit makes pwrite fail with EFBIG (SIGXFSZ ignored); the writer must
     * report it, refuse to commit and remove the temp file. Runs in a child so the limit
     * does not leak into other tests. */
    char *dir = tu_tempdir();
    char *path = path_join(dir, "big.safetensors");
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {4096, 4096};
        int code = 0;
        if (setrlimit(RLIMIT_FSIZE, &rl) != 0)
            _exit(10);
        static uint8_t big[1 << 16];
        int64_t n = sizeof big;
        qlora_st_writer *w;
        if (qlora_st_writer_open(path, 0, &w) != QLORA_OK || qlora_st_writer_declare(w, "big", QLORA_U8, 1, &n))
            _exit(11);
        qlora_status st = qlora_st_writer_write(w, "big", big, sizeof big);
        if (st != QLORA_ERR_IO || strstr(qlora_last_error(), "File too large") == NULL)
            code = 12;
        if (qlora_st_writer_commit(w) != QLORA_ERR_IO)
            code = 13;
        if (count_dir_entries(dir) != 0)
            code = 14;
        free(path); /* no leaks reported by a checker in the child */
        free(dir);
        _exit(code);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* ------------------------------------------------------- sharding + checkpoints */

static void write_sharded_example(const char *out, uint64_t max_shard) {
    /* Sizes 40, 30, 200, 32, 0 bytes: with max 64 huggingface_hub gives [a], [big], [b, c, d]. */
    int64_t s_a = 10, s_b = 30, s_big = 50, s_c = 4, s_d = 0;
    float a[10], big[50];
    uint8_t b[30];
    int64_t c[4] = {1, -2, 3, -4};
    for (int i = 0; i < 10; i++)
        a[i] = (float)i * 0.5f;
    for (int i = 0; i < 50; i++)
        big[i] = (float)-i;
    for (int i = 0; i < 30; i++)
        b[i] = (uint8_t)(200 + i);
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(out, max_shard, &w));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "a", QLORA_F32, 1, &s_a));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "b", QLORA_U8, 1, &s_b));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "big", QLORA_F32, 1, &s_big));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "c", QLORA_I64, 1, &s_c));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "d", QLORA_U8, 1, &s_d));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "c", c, sizeof c));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "big", big, sizeof big));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "d", NULL, 0));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "a", a, sizeof a));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "b", b, sizeof b));
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
}

static void check_example_checkpoint(const char *path) {
    qlora_checkpoint *c;
    ck_assert_qlora_ok(qlora_checkpoint_open(path, &c));
    ck_assert_uint_eq(qlora_checkpoint_count(c), 5);
    const char *sorted[5] = {"a", "b", "big", "c", "d"};
    for (size_t i = 0; i < 5; i++)
        ck_assert_str_eq(qlora_checkpoint_name(c, i), sorted[i]);
    ck_assert_ptr_null(qlora_checkpoint_name(c, 5));
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_checkpoint_find(c, "big", &t));
    ck_assert_int_eq(t.dtype, QLORA_F32);
    float v;
    memcpy(&v, (const char *)t.data + 49 * sizeof(float), sizeof v);
    ck_assert_float_eq(v, -49.0f);
    ck_assert_qlora_ok(qlora_checkpoint_find(c, "c", &t));
    int64_t cv;
    memcpy(&cv, (const char *)t.data + 3 * sizeof cv, sizeof cv);
    ck_assert_int_eq(cv, -4);
    ck_assert_qlora_ok(qlora_checkpoint_find(c, "b", &t));
    ck_assert_uint_eq(((const uint8_t *)t.data)[29], 229);
    ck_assert_qlora_ok(qlora_checkpoint_find(c, "d", &t));
    ck_assert_int_eq(qlora_tensor_numel(&t), 0);
    ck_assert_qlora_fails(qlora_checkpoint_find(c, "zz", &t), QLORA_ERR_NOT_FOUND, "'zz'");
    qlora_checkpoint_close(c);
}

START_TEST(sharded_write_and_read) {
    char *dir = tu_tempdir();
    char *out = path_join(dir, "ckpt"); /* created by the writer */
    write_sharded_example(out, 64);
    ck_assert_int_eq(count_dir_entries(out), 4);
    char *index = path_join(out, "model.safetensors.index.json");
    size_t len;
    char *text = (char *)read_all(index, &len);
    /* Exactly json.dumps(index, indent=2, sort_keys=True) + "\n", as transformers writes it. */
    const char *expected = "{\n"
                           "  \"metadata\": {\n"
                           "    \"total_size\": 302\n"
                           "  },\n"
                           "  \"weight_map\": {\n"
                           "    \"a\": \"model-00001-of-00003.safetensors\",\n"
                           "    \"b\": \"model-00003-of-00003.safetensors\",\n"
                           "    \"big\": \"model-00002-of-00003.safetensors\",\n"
                           "    \"c\": \"model-00003-of-00003.safetensors\",\n"
                           "    \"d\": \"model-00003-of-00003.safetensors\"\n"
                           "  }\n"
                           "}\n";
    ck_assert_str_eq(text, expected);
    free(text);
    char *shard3 = path_join(out, "model-00003-of-00003.safetensors");
    qlora_safetensors *f;
    ck_assert_qlora_ok(qlora_safetensors_open(shard3, &f));
    ck_assert_uint_eq(qlora_safetensors_count(f), 3);
    ck_assert_str_eq(qlora_safetensors_metadata(f, "format"), "pt");
    qlora_safetensors_close(f);
    check_example_checkpoint(out);

    /* Everything fits in one shard: model.safetensors, no index (a stale one is removed). */
    write_sharded_example(out, 1000);
    char *single = path_join(out, "model.safetensors");
    ck_assert(file_exists(single));
    ck_assert(!file_exists(index));
    check_example_checkpoint(out);
    check_example_checkpoint(single);
    free(single);
    free(shard3);
    free(index);
    free(out);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* A small two-shard checkpoint written by hand, with an index text of our choosing. */
static void write_two_shards(const char *dir, const char *index_text) {
    char *s1 = path_join(dir, "s1.safetensors"), *s2 = path_join(dir, "s2.safetensors");
    write_st(s1, "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
                 "\"y\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]}}", 3);
    write_st(s2, "{\"z\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4);
    char *idx = path_join(dir, "model.safetensors.index.json");
    tu_write_file(idx, index_text, strlen(index_text));
    free(s1);
    free(s2);
    free(idx);
}

START_TEST(checkpoint_index_must_match_shards) {
    char *dir = tu_tempdir();
    qlora_checkpoint *c = (qlora_checkpoint *)1;
    ck_assert_qlora_fails(qlora_checkpoint_open(dir, &c), QLORA_ERR_NOT_FOUND, "model.safetensors");
    ck_assert_ptr_null(c);

    write_two_shards(dir, "{\"metadata\":{\"total_size\":7},\"weight_map\":"
                          "{\"z\":\"s2.safetensors\",\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\"}}");
    ck_assert_qlora_ok(qlora_checkpoint_open(dir, &c));
    ck_assert_uint_eq(qlora_checkpoint_count(c), 3);
    ck_assert_str_eq(qlora_checkpoint_name(c, 0), "x");
    ck_assert_str_eq(qlora_checkpoint_name(c, 2), "z");
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_checkpoint_find(c, "z", &t));
    ck_assert_int_eq(t.shape[0], 4);
    qlora_checkpoint_close(c);

    static const struct {
        const char *index;
        qlora_status status;
        const char *needle1, *needle2;
    } bad[] = {
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\",\"z\":\"gone.safetensors\"}}",
         QLORA_ERR_NOT_FOUND, "gone.safetensors", "gone.safetensors"},
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\",\"z\":\"s2.safetensors\"}}",
         QLORA_ERR_FORMAT, "'y'", "s2.safetensors"},
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"z\":\"s2.safetensors\"}}", QLORA_ERR_FORMAT, "'y'",
         "s1.safetensors"},
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\",\"z\":\"s2.safetensors\","
         "\"q\":\"s2.safetensors\"}}", QLORA_ERR_FORMAT, "'q'", "s2.safetensors"},
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\","
         "\"z\":\"s2.safetensors\"}}", QLORA_ERR_FORMAT, "'x'", "twice"},
        {"{\"weight_map\":{\"x\":\"../s1.safetensors\"}}", QLORA_ERR_FORMAT, "'x'", "shard name"},
        {"{\"weight_map\":{\"x\":1}}", QLORA_ERR_FORMAT, "'x'", "shard name"},
        {"{\"metadata\":{}}", QLORA_ERR_FORMAT, "weight_map", "index"},
        {"{\"weight_map\":", QLORA_ERR_FORMAT, "JSON", "index"},
        {"[]", QLORA_ERR_FORMAT, "object", "index"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_two_shards(dir, bad[i].index);
        c = (qlora_checkpoint *)1;
        ck_assert_qlora_fails(qlora_checkpoint_open(dir, &c), bad[i].status, bad[i].needle1);
        ck_assert_msg(strstr(qlora_last_error(), bad[i].needle2) != NULL, "case %zu: '%s' lacks '%s'", i,
                      qlora_last_error(), bad[i].needle2);
        ck_assert_ptr_null(c);
    }

    /* The same tensor in two shards. */
    char *s2 = path_join(dir, "s2.safetensors");
    write_two_shards(dir, "{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\",\"z\":\"s2.safetensors\"}}");
    write_st(s2, "{\"y\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                 "\"z\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[1,5]}}", 5);
    ck_assert_qlora_fails(qlora_checkpoint_open(dir, &c), QLORA_ERR_FORMAT, "'y'");
    ck_assert(strstr(qlora_last_error(), "s2.safetensors") != NULL);
    /* A malformed shard: its own error, naming the shard file. */
    write_st(s2, "{\"z\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,3]}}", 3);
    ck_assert_qlora_fails(qlora_checkpoint_open(dir, &c), QLORA_ERR_FORMAT, "s2.safetensors");
    free(s2);
    char *missing = path_join(dir, "missing.safetensors");
    ck_assert_qlora_fails(qlora_checkpoint_open(missing, &c), QLORA_ERR_NOT_FOUND, "missing.safetensors");
    free(missing);
    qlora_checkpoint_close(NULL);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("safetensors");
    TCase *rd = tcase_create("reader");
    tcase_add_test(rd, reader_rejects_malformed_headers);
    tcase_add_test(rd, reader_rejects_bad_framing);
    tcase_add_test(rd, reader_reports_missing_and_unsupported);
    tcase_add_test(rd, reader_accepts_edge_cases);
    suite_add_tcase(s, rd);
    TCase *wr = tcase_create("writer");
    tcase_add_test(wr, writer_roundtrip_random_tensors);
    tcase_add_test(wr, writer_matches_reference_bytes);
    tcase_add_test(wr, writer_rejects_misuse);
    tcase_add_test(wr, writer_commit_refuses_missing_tensor);
    tcase_add_test(wr, writer_abort_leaves_nothing);
    tcase_add_test(wr, writer_replaces_existing_file);
    tcase_add_test(wr, writer_unwritable_destination_is_io_error);
    tcase_add_test(wr, writer_reports_short_writes);
    suite_add_tcase(s, wr);
    TCase *ck = tcase_create("checkpoint");
    tcase_add_test(ck, sharded_write_and_read);
    tcase_add_test(ck, checkpoint_index_must_match_shards);
    suite_add_tcase(s, ck);
    return tu_run_suite(s);
}
