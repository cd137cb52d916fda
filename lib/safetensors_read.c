/*
 * safetensors reader: maps the file read-only and validates it the way the reference reader
 * (huggingface/safetensors, tensor.rs read_metadata + Metadata::validate) does, before any
 * descriptor into the mapping is handed out. Stricter where the reference is lax on purpose:
 * duplicate keys, extra keys in a tensor entry and non-JSON whitespace are rejected.
 * Every failure is QLORA_ERR_FORMAT naming the file and, where one is at fault, the tensor.
 */
#include "internal.h"
#include "json_util.h"
#include "safetensors_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct ql_st_entry {
    char *name;
    qlora_dtype dtype;
    int ndim;
    int64_t shape[QLORA_MAX_DIMS];
    uint64_t begin, end; /* byte offsets into the data section, end exclusive */
} ql_st_entry;

struct qlora_safetensors {
    char *path;
    unsigned char *map;          /* the whole file, read-only */
    size_t map_size;
    const unsigned char *data;   /* the data section: map + 8 + header length */
    ql_st_entry *tensors;        /* [count], in data-offset order */
    size_t count;
    ql_st_entry **by_name;       /* [count], sorted by name for lookups */
    char **meta_keys, **meta_values;
    size_t meta_count;
};

/* What the header checks need besides the file: the exact number tokens of the JSON text. */
typedef struct ql_st_parse {
    qlora_safetensors *f;
    const ql_json_number *nums;
    size_t nnums;
} ql_st_parse;

#define ST_FAIL(f, ...) ql_st_fail((f), __VA_ARGS__)

static qlora_status ql_st_fail(const qlora_safetensors *f, const char *fmt, ...) QL_PRINTF(2, 3);
static qlora_status ql_st_fail(const qlora_safetensors *f, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ql_fail(QLORA_ERR_FORMAT, "safetensors file '%s': %s", f->path, msg);
}

void qlora_safetensors_close(qlora_safetensors *f) {
    if (!f)
        return;
    if (f->map)
        munmap(f->map, f->map_size);
    for (size_t i = 0; i < f->count; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    free(f->by_name);
    for (size_t i = 0; i < f->meta_count; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    free(f->path);
    free(f);
}

static qlora_status map_file(qlora_safetensors *f) {
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ql_fail(errno == ENOENT ? QLORA_ERR_NOT_FOUND : QLORA_ERR_IO, "safetensors file '%s': cannot open: %s",
                       f->path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return ql_fail(QLORA_ERR_IO, "safetensors file '%s': cannot stat: %s", f->path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ql_fail(QLORA_ERR_IO, "safetensors file '%s': not a regular file", f->path);
    }
    if (st.st_size < 8) {
        close(fd);
        return ST_FAIL(f, "the file has %lld bytes, fewer than the 8-byte header length", (long long)st.st_size);
    }
    f->map_size = (size_t)st.st_size;
    void *m = mmap(NULL, f->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (m == MAP_FAILED)
        return ql_fail(QLORA_ERR_IO, "safetensors file '%s': cannot map %zu bytes: %s", f->path, f->map_size,
                       strerror(e));
    f->map = m;
    return QLORA_OK;
}

/* An unsigned integer field of a tensor entry, read from its exact token text. */
static qlora_status parse_uint(const ql_st_parse *ps, const cJSON *node, const char *tensor, const char *field,
                               int index, uint64_t *out) {
    if (!cJSON_IsNumber(node) || node->valueint < 0 || (size_t)node->valueint >= ps->nnums)
        return ST_FAIL(ps->f, "tensor '%s': %s[%d] is not a number", tensor, field, index);
    const ql_json_number *tok = &ps->nums[node->valueint];
    if (!ql_json_parse_u64(tok, out))
        return ST_FAIL(ps->f, "tensor '%s': %s[%d] is '%.*s', not a non-negative integer that fits 64 bits", tensor,
                       field, index, (int)(tok->len > 40 ? 40 : tok->len), tok->text);
    return QLORA_OK;
}

static qlora_status parse_tensor(const ql_st_parse *ps, const cJSON *item, ql_st_entry *e) {
    const char *name = item->string;
    if (!cJSON_IsObject(item))
        return ST_FAIL(ps->f, "tensor '%s': the entry is not an object", name);
    const char *dup;
    int d = ql_json_duplicate_key(item, &dup);
    if (d < 0)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", ps->f->path);
    if (d > 0)
        return ST_FAIL(ps->f, "tensor '%s': key '%s' appears twice", name, dup);
    int have_dtype = 0, have_shape = 0, have_offsets = 0;
    for (const cJSON *c = item->child; c; c = c->next) {
        if (strcmp(c->string, "dtype") == 0) {
            if (!cJSON_IsString(c))
                return ST_FAIL(ps->f, "tensor '%s': dtype is not a string", name);
            if (qlora_dtype_from_name(c->valuestring, &e->dtype) != QLORA_OK)
                return ST_FAIL(ps->f, "tensor '%s': unknown dtype '%s'", name, c->valuestring);
            have_dtype = 1;
        } else if (strcmp(c->string, "shape") == 0) {
            if (!cJSON_IsArray(c))
                return ST_FAIL(ps->f, "tensor '%s': shape is not an array", name);
            int ndim = cJSON_GetArraySize(c);
            if (ndim > QLORA_MAX_DIMS)
                return ql_fail(QLORA_ERR_UNSUPPORTED, "safetensors file '%s': tensor '%s' has %d dimensions (libqlora "
                               "supports at most %d)", ps->f->path, name, ndim, QLORA_MAX_DIMS);
            int i = 0;
            for (const cJSON *dim = c->child; dim; dim = dim->next, i++) {
                uint64_t v;
                QL_CHECK(parse_uint(ps, dim, name, "shape", i, &v));
                if (v > (uint64_t)INT64_MAX)
                    return ST_FAIL(ps->f, "tensor '%s': shape[%d] = %llu is too large", name, i,
                                   (unsigned long long)v);
                e->shape[i] = (int64_t)v;
            }
            e->ndim = ndim;
            have_shape = 1;
        } else if (strcmp(c->string, "data_offsets") == 0) {
            if (!cJSON_IsArray(c) || cJSON_GetArraySize(c) != 2)
                return ST_FAIL(ps->f, "tensor '%s': data_offsets is not an array of two integers", name);
            QL_CHECK(parse_uint(ps, c->child, name, "data_offsets", 0, &e->begin));
            QL_CHECK(parse_uint(ps, c->child->next, name, "data_offsets", 1, &e->end));
            have_offsets = 1;
        } else {
            return ST_FAIL(ps->f, "tensor '%s': unexpected key '%s' (allowed: dtype, shape, data_offsets)", name,
                           c->string);
        }
    }
    if (!have_dtype || !have_shape || !have_offsets)
        return ST_FAIL(ps->f, "tensor '%s': missing '%s'", name,
                       !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets");
    e->name = strdup(name);
    if (!e->name)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", ps->f->path);
    return QLORA_OK;
}

static qlora_status parse_metadata(qlora_safetensors *f, const cJSON *m) {
    if (cJSON_IsNull(m))
        return QLORA_OK; /* the reference reads it as an Option: null means absent */
    if (!cJSON_IsObject(m))
        return ST_FAIL(f, "__metadata__ is not an object");
    const char *dup;
    int d = ql_json_duplicate_key(m, &dup);
    if (d < 0)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", f->path);
    if (d > 0)
        return ST_FAIL(f, "__metadata__ key '%s' appears twice", dup);
    size_t n = (size_t)cJSON_GetArraySize(m);
    f->meta_keys = calloc(n ? n : 1, sizeof *f->meta_keys);
    f->meta_values = calloc(n ? n : 1, sizeof *f->meta_values);
    if (!f->meta_keys || !f->meta_values)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", f->path);
    for (const cJSON *c = m->child; c; c = c->next) {
        if (!cJSON_IsString(c))
            return ST_FAIL(f, "__metadata__ value of '%s' is not a string", c->string);
        f->meta_keys[f->meta_count] = strdup(c->string);
        f->meta_values[f->meta_count] = strdup(c->valuestring);
        f->meta_count++;
        if (!f->meta_keys[f->meta_count - 1] || !f->meta_values[f->meta_count - 1])
            return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", f->path);
    }
    return QLORA_OK;
}

static int cmp_offsets(const void *a, const void *b) {
    const ql_st_entry *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_names(const void *a, const void *b) {
    return strcmp((*(ql_st_entry *const *)a)->name, (*(ql_st_entry *const *)b)->name);
}

/* Offsets contiguous from 0 in offset order, each size exactly what dtype and shape need, and
 * the data section ending exactly at the end of the file. */
static qlora_status check_layout(qlora_safetensors *f, uint64_t header_len) {
    qsort(f->tensors, f->count, sizeof *f->tensors, cmp_offsets);
    uint64_t expect = 0;
    for (size_t i = 0; i < f->count; i++) {
        const ql_st_entry *e = &f->tensors[i];
        if (e->begin != expect || e->end < e->begin)
            return ST_FAIL(f, "tensor '%s': data_offsets [%llu, %llu] must begin at %llu, where the previous tensor "
                           "ends (gap, overlap, or offsets not starting at 0)", e->name,
                           (unsigned long long)e->begin, (unsigned long long)e->end, (unsigned long long)expect);
        expect = e->end;
        uint64_t numel = 1, nbits;
        for (int k = 0; k < e->ndim; k++)
            if (__builtin_mul_overflow(numel, (uint64_t)e->shape[k], &numel))
                return ST_FAIL(f, "tensor '%s': the element count of its shape overflows", e->name);
        if (__builtin_mul_overflow(numel, (uint64_t)qlora_dtype_bits(e->dtype), &nbits))
            return ST_FAIL(f, "tensor '%s': the bit size of its shape overflows", e->name);
        if (nbits % 8 != 0)
            return ST_FAIL(f, "tensor '%s': %llu elements of %s are not a whole number of bytes", e->name,
                           (unsigned long long)numel, qlora_dtype_name(e->dtype));
        if (e->end - e->begin != nbits / 8)
            return ST_FAIL(f, "tensor '%s': data_offsets [%llu, %llu] span %llu bytes but %llu elements of %s take "
                           "%llu", e->name, (unsigned long long)e->begin, (unsigned long long)e->end,
                           (unsigned long long)(e->end - e->begin), (unsigned long long)numel,
                           qlora_dtype_name(e->dtype), (unsigned long long)(nbits / 8));
    }
    uint64_t data_size = (uint64_t)f->map_size - 8 - header_len;
    if (expect != data_size)
        return ST_FAIL(f, "the tensors cover %llu data bytes but the file holds %llu after the header (%s)",
                       (unsigned long long)expect, (unsigned long long)data_size,
                       expect < data_size ? "trailing bytes are not allowed" : "the file is truncated");
    f->by_name = malloc((f->count ? f->count : 1) * sizeof *f->by_name);
    if (!f->by_name)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", f->path);
    for (size_t i = 0; i < f->count; i++)
        f->by_name[i] = &f->tensors[i];
    qsort(f->by_name, f->count, sizeof *f->by_name, cmp_names);
    return QLORA_OK;
}

static qlora_status parse_root(ql_st_parse *ps, cJSON *root) {
    qlora_safetensors *f = ps->f;
    if (!cJSON_IsObject(root))
        return ST_FAIL(f, "the header is not a JSON object");
    const char *dup;
    int d = ql_json_duplicate_key(root, &dup);
    if (d < 0)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", f->path);
    if (d > 0)
        return ST_FAIL(f, "key '%s' appears twice in the header", dup);
    if (ql_json_tag_numbers(root, 0) != ps->nnums)
        return ql_fail(QLORA_ERR_INTERNAL, "safetensors file '%s': JSON number tokens do not match the parse",
                       f->path);
    size_t n = 0;
    for (const cJSON *c = root->child; c; c = c->next)
        n += strcmp(c->string, "__metadata__") != 0;
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    if (!f->tensors)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", f->path);
    for (const cJSON *c = root->child; c; c = c->next) {
        if (strcmp(c->string, "__metadata__") == 0) {
            QL_CHECK(parse_metadata(f, c));
            continue;
        }
        QL_CHECK(parse_tensor(ps, c, &f->tensors[f->count]));
        f->count++;
    }
    return QLORA_OK;
}

/* Header text checks in the reference's order: UTF-8, then JSON (lexically strict, then
 * structurally via cJSON), then types. */
static qlora_status parse_header(qlora_safetensors *f, uint64_t header_len) {
    const char *text = (const char *)f->map + 8;
    size_t n = (size_t)header_len;
    size_t bad;
    if (!ql_utf8_valid(text, n, &bad))
        return ST_FAIL(f, "the header is not valid UTF-8 (byte %zu of the header)", bad);
    ql_st_parse ps = {.f = f};
    ql_json_number *nums = NULL;
    char why[128];
    if (!ql_json_lex_check(text, n, &nums, &ps.nnums, why, sizeof why, &bad))
        return ST_FAIL(f, "the header is not valid JSON: %s at byte %zu of the header", why, bad);
    ps.nums = nums;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    qlora_status st;
    if (!root) {
        size_t at = end && end >= text && end <= text + n ? (size_t)(end - text) : 0;
        st = ST_FAIL(f, "the header is not valid JSON (near byte %zu of the header)", at);
    } else {
        size_t rest = (size_t)(end - text);
        while (rest < n && (text[rest] == ' ' || text[rest] == '\t' || text[rest] == '\r' || text[rest] == '\n'))
            rest++;
        st = rest != n ? ST_FAIL(f, "the header has content after the JSON object (byte %zu)", rest)
                       : parse_root(&ps, root);
    }
    cJSON_Delete(root);
    free(nums);
    return st;
}

qlora_status qlora_safetensors_open(const char *path, qlora_safetensors **out) {
    QL_REQUIRE_ARG(path != NULL, "path");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    qlora_safetensors *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors file '%s': out of memory", path);
    }
    qlora_status st = map_file(f);
    if (st == QLORA_OK) {
        uint64_t header_len = 0;
        for (int i = 7; i >= 0; i--)
            header_len = header_len << 8 | f->map[i];
        if (header_len > QL_ST_MAX_HEADER)
            st = ST_FAIL(f, "header length %llu exceeds the limit of %llu bytes", (unsigned long long)header_len,
                         QL_ST_MAX_HEADER);
        else if (header_len > f->map_size - 8)
            st = ST_FAIL(f, "header length %llu runs past the end of the %zu-byte file",
                         (unsigned long long)header_len, f->map_size);
        if (st == QLORA_OK)
            st = parse_header(f, header_len);
        if (st == QLORA_OK)
            st = check_layout(f, header_len);
        f->data = f->map + 8 + header_len;
    }
    if (st != QLORA_OK) {
        qlora_safetensors_close(f);
        return st;
    }
    *out = f;
    return QLORA_OK;
}

size_t qlora_safetensors_count(const qlora_safetensors *f) { return f ? f->count : 0; }

static qlora_status describe(const qlora_safetensors *f, const ql_st_entry *e, qlora_tensor *out) {
    /* The mapping is read-only; the descriptor's data is non-const only by API shape. */
    return qlora_tensor_init(out, e->name, e->dtype, e->ndim, e->shape, (void *)(uintptr_t)(f->data + e->begin),
                             QLORA_DEVICE_HOST);
}

qlora_status qlora_safetensors_get(const qlora_safetensors *f, size_t index, qlora_tensor *out) {
    QL_REQUIRE_ARG(f != NULL, "f");
    QL_REQUIRE_ARG(out != NULL, "out");
    if (index >= f->count)
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors file '%s': index %zu out of range (%zu tensors)", f->path,
                       index, f->count);
    return describe(f, &f->tensors[index], out);
}

int64_t ql_safetensors_lookup(const qlora_safetensors *f, const char *name) {
    size_t lo = 0, hi = f->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->by_name[mid]->name);
        if (c == 0)
            return (int64_t)(f->by_name[mid] - f->tensors);
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}

qlora_status qlora_safetensors_find(const qlora_safetensors *f, const char *name, qlora_tensor *out) {
    QL_REQUIRE_ARG(f != NULL, "f");
    QL_REQUIRE_ARG(name != NULL, "name");
    QL_REQUIRE_ARG(out != NULL, "out");
    int64_t i = ql_safetensors_lookup(f, name);
    if (i < 0)
        return ql_fail(QLORA_ERR_NOT_FOUND, "safetensors file '%s': no tensor named '%s'", f->path, name);
    return describe(f, &f->tensors[i], out);
}

const char *qlora_safetensors_metadata(const qlora_safetensors *f, const char *key) {
    if (!f || !key)
        return NULL;
    for (size_t i = 0; i < f->meta_count; i++)
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_values[i];
    return NULL;
}

const char *ql_safetensors_name(const qlora_safetensors *f, size_t index) {
    return f && index < f->count ? f->tensors[index].name : NULL;
}

const char *ql_safetensors_path(const qlora_safetensors *f) { return f ? f->path : NULL; }
