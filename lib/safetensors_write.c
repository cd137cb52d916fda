/*
 * Streaming, atomic safetensors writer. Tensors are declared first; the first write freezes
 * the layout exactly as the reference writer (safetensors tensor.rs `prepare`) lays it out:
 * sorted by dtype (the reference's enum order, which increases with alignment) largest first,
 * then by name, back to back; header = compact JSON with __metadata__ first, padded with
 * spaces to a multiple of 8. Data goes straight to its final offset with pwrite into a temp
 * file next to the target; commit fsyncs, renames and fsyncs the directory, abort unlinks.
 * Sharded output follows huggingface_hub: greedy in declaration order, a tensor larger than
 * the maximum alone in its shard, shards numbered in the order they fill up.
 */
#include "internal.h"
#include "json_util.h"
#include "safetensors_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define QL_INDEX_NAME "model.safetensors.index.json"

typedef struct ql_wtensor {
    char *name;
    qlora_dtype dtype;
    int ndim;
    int64_t shape[QLORA_MAX_DIMS];
    uint64_t nbytes;
    int shard;
    uint64_t file_offset; /* where its data goes in its shard file (once frozen) */
    int written;
} ql_wtensor;

typedef struct ql_wfile {
    char *final_path;
    char *tmp_path;  /* NULL once renamed or removed */
    int fd;          /* -1 when closed */
    uint64_t size;   /* final file size */
} ql_wfile;

struct qlora_st_writer {
    char *path;                 /* target file, or the directory when sharded */
    char *dir;                  /* directory the outputs land in */
    char *base;                 /* file name of the target (unsharded) */
    uint64_t max_shard_bytes;   /* 0: one file */
    ql_wtensor *t;              /* [n], declaration order */
    size_t n, cap;
    size_t *slots;              /* name hash table: tensor index + 1, 0 = empty */
    size_t slot_cap;
    char **meta_keys, **meta_values;
    size_t meta_n, meta_cap;
    ql_wfile *files;            /* shard files, then the index file when there is one */
    int nfiles;
    int nshards;
    int frozen;
    int created_dir;            /* the writer made the shard directory: abort removes it */
    int committed;
    qlora_status failed;        /* first I/O failure: commit refuses */
    char *failed_msg;
};

/* The reference writer's sort key: the position of the dtype in its Dtype enum. */
static int dtype_rank(qlora_dtype d) {
    switch (d) {
    case QLORA_BOOL: return 0;
    case QLORA_F4: return 1;
    case QLORA_F6_E2M3: return 2;
    case QLORA_F6_E3M2: return 3;
    case QLORA_U8: return 4;
    case QLORA_I8: return 5;
    case QLORA_F8_E5M2: return 6;
    case QLORA_F8_E4M3: return 7;
    case QLORA_F8_E8M0: return 8;
    case QLORA_F8_E4M3FNUZ: return 9;
    case QLORA_F8_E5M2FNUZ: return 10;
    case QLORA_I16: return 11;
    case QLORA_U16: return 12;
    case QLORA_F16: return 13;
    case QLORA_BF16: return 14;
    case QLORA_I32: return 15;
    case QLORA_U32: return 16;
    case QLORA_F32: return 17;
    case QLORA_C64: return 18;
    case QLORA_F64: return 19;
    case QLORA_I64: return 20;
    case QLORA_U64: return 21;
    default: return -1; /* NF4/FP4: never declared */
    }
}

static uint64_t hash_name(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* The slot holding `name`, or the empty slot where it would go. */
static size_t find_slot(const qlora_st_writer *w, const char *name) {
    size_t mask = w->slot_cap - 1;
    size_t i = (size_t)hash_name(name) & mask;
    while (w->slots[i] != 0 && strcmp(w->t[w->slots[i] - 1].name, name) != 0)
        i = (i + 1) & mask;
    return i;
}

static ql_wtensor *lookup(const qlora_st_writer *w, const char *name) {
    size_t s = w->slots[find_slot(w, name)];
    return s ? &w->t[s - 1] : NULL;
}

static qlora_status oom(const qlora_st_writer *w) {
    return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors writer '%s': out of memory", w->path);
}

static qlora_status grow_slots(qlora_st_writer *w) {
    size_t ncap = w->slot_cap ? w->slot_cap * 2 : 64;
    size_t *old = w->slots;
    size_t old_cap = w->slot_cap;
    w->slots = calloc(ncap, sizeof *w->slots);
    if (!w->slots) {
        w->slots = old;
        return oom(w);
    }
    w->slot_cap = ncap;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i])
            w->slots[find_slot(w, w->t[old[i] - 1].name)] = old[i];
    free(old);
    return QLORA_OK;
}

static qlora_status io_fail(const qlora_st_writer *w, const char *what, const char *path, int err) {
    return ql_fail(QLORA_ERR_IO, "safetensors writer '%s': %s '%s': %s", w->path, what, path, strerror(err));
}

/* Remembers the first I/O failure so that commit refuses to publish a partial file. */
static qlora_status poison(qlora_st_writer *w, qlora_status st) {
    if (w->failed == QLORA_OK) {
        w->failed = st;
        w->failed_msg = strdup(qlora_last_error());
    }
    return st;
}

static uint64_t random_u64(void) {
    uint64_t r;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) == (ssize_t)sizeof r)
        return r;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    static _Atomic uint64_t counter;
    return ((uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull) ^ (uint64_t)ts.tv_sec ^ ++counter;
}

/* Creates .<base>.tmp-<pid>-<random> in dir, exclusively. */
static qlora_status create_temp(qlora_st_writer *w, ql_wfile *f, const char *base) {
    for (int attempt = 0; attempt < 100; attempt++) {
        char *tmp = NULL;
        if (asprintf(&tmp, "%s/.%s.tmp-%ld-%016llx", w->dir, base, (long)getpid(),
                     (unsigned long long)random_u64()) < 0)
            return oom(w);
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) {
            f->tmp_path = tmp;
            f->fd = fd;
            return QLORA_OK;
        }
        int e = errno;
        if (e != EEXIST) {
            qlora_status st = io_fail(w, "cannot create temp file", tmp, e);
            free(tmp);
            return st;
        }
        free(tmp);
    }
    return ql_fail(QLORA_ERR_IO, "safetensors writer '%s': no free temp file name in '%s'", w->path, w->dir);
}

static qlora_status pwrite_all(qlora_st_writer *w, const ql_wfile *f, const void *data, size_t n, uint64_t off) {
    const char *p = data;
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? (size_t)1 << 30 : n;
        ssize_t k = pwrite(f->fd, p, chunk, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return io_fail(w, "cannot write to", f->tmp_path, k < 0 ? errno : ENOSPC);
        p += k;
        off += (uint64_t)k;
        n -= (size_t)k;
    }
    return QLORA_OK;
}

static void close_and_remove_temps(qlora_st_writer *w) {
    for (int i = 0; i < w->nfiles; i++) {
        ql_wfile *f = &w->files[i];
        if (f->fd >= 0)
            close(f->fd);
        f->fd = -1;
        if (f->tmp_path)
            unlink(f->tmp_path);
        free(f->tmp_path);
        f->tmp_path = NULL;
    }
}

static void writer_free(qlora_st_writer *w) {
    close_and_remove_temps(w);
    if (w->created_dir && !w->committed)
        rmdir(w->dir); /* only succeeds when empty: nothing of anyone else's is lost */
    for (int i = 0; i < w->nfiles; i++)
        free(w->files[i].final_path);
    free(w->files);
    for (size_t i = 0; i < w->n; i++)
        free(w->t[i].name);
    free(w->t);
    free(w->slots);
    for (size_t i = 0; i < w->meta_n; i++) {
        free(w->meta_keys[i]);
        free(w->meta_values[i]);
    }
    free(w->meta_keys);
    free(w->meta_values);
    free(w->failed_msg);
    free(w->path);
    free(w->dir);
    free(w->base);
    free(w);
}

/* Splits the target into directory and file name; creates the directory when sharding. */
static qlora_status prepare_target(qlora_st_writer *w) {
    struct stat st;
    if (w->max_shard_bytes > 0) {
        if (mkdir(w->path, 0777) == 0)
            w->created_dir = 1;
        else if (errno != EEXIST)
            return io_fail(w, "cannot create directory", w->path, errno);
        if (stat(w->path, &st) != 0)
            return io_fail(w, "cannot stat", w->path, errno);
        if (!S_ISDIR(st.st_mode))
            return io_fail(w, "not a directory:", w->path, ENOTDIR);
        w->dir = strdup(w->path);
        return w->dir ? QLORA_OK : oom(w);
    }
    const char *slash = strrchr(w->path, '/');
    const char *base = slash ? slash + 1 : w->path;
    if (*base == '\0')
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': the path names a directory, not a file",
                       w->path);
    if (stat(w->path, &st) == 0 && S_ISDIR(st.st_mode))
        return io_fail(w, "cannot write over", w->path, EISDIR);
    w->base = strdup(base);
    w->dir = slash == w->path ? strdup("/") : slash ? strndup(w->path, (size_t)(slash - w->path)) : strdup(".");
    if (!w->base || !w->dir)
        return oom(w);
    /* Create the temp file now so an unwritable destination fails at open. */
    w->files = calloc(1, sizeof *w->files);
    if (!w->files || !(w->files[0].final_path = strdup(w->path)))
        return oom(w);
    w->files[0].fd = -1;
    w->nfiles = 1;
    return create_temp(w, &w->files[0], w->base);
}

qlora_status qlora_st_writer_open(const char *path, uint64_t max_shard_bytes, qlora_st_writer **out) {
    QL_REQUIRE_ARG(path != NULL && *path != '\0', "path");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    qlora_st_writer *w = calloc(1, sizeof *w);
    if (!w)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors writer '%s': out of memory", path);
    w->max_shard_bytes = max_shard_bytes;
    if (!(w->path = strdup(path))) {
        free(w);
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "safetensors writer '%s': out of memory", path);
    }
    qlora_status st = grow_slots(w);
    if (st == QLORA_OK)
        st = prepare_target(w);
    if (st != QLORA_OK) {
        writer_free(w);
        return st;
    }
    *out = w;
    return QLORA_OK;
}

static qlora_status check_text(const qlora_st_writer *w, const char *what, const char *s) {
    size_t bad;
    if (!ql_utf8_valid(s, strlen(s), &bad))
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': %s is not valid UTF-8 (byte %zu)", w->path,
                       what, bad);
    return QLORA_OK;
}

qlora_status qlora_st_writer_set_metadata(qlora_st_writer *w, const char *key, const char *value) {
    QL_REQUIRE_ARG(w != NULL, "w");
    QL_REQUIRE_ARG(key != NULL, "key");
    QL_REQUIRE_ARG(value != NULL, "value");
    if (w->frozen)
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': metadata '%s' set after the first write",
                       w->path, key);
    QL_CHECK(check_text(w, "metadata key", key));
    QL_CHECK(check_text(w, "metadata value", value));
    char *v = strdup(value);
    if (!v)
        return oom(w);
    for (size_t i = 0; i < w->meta_n; i++) {
        if (strcmp(w->meta_keys[i], key) == 0) {
            free(w->meta_values[i]);
            w->meta_values[i] = v;
            return QLORA_OK;
        }
    }
    if (w->meta_n == w->meta_cap) {
        size_t ncap = w->meta_cap ? w->meta_cap * 2 : 8;
        char **k2 = realloc(w->meta_keys, ncap * sizeof *k2);
        if (k2)
            w->meta_keys = k2;
        char **v2 = k2 ? realloc(w->meta_values, ncap * sizeof *v2) : NULL;
        if (v2)
            w->meta_values = v2;
        if (!k2 || !v2) {
            free(v);
            return oom(w);
        }
        w->meta_cap = ncap;
    }
    if (!(w->meta_keys[w->meta_n] = strdup(key))) {
        free(v);
        return oom(w);
    }
    w->meta_values[w->meta_n++] = v;
    return QLORA_OK;
}

qlora_status qlora_st_writer_declare(qlora_st_writer *w, const char *name, qlora_dtype dtype, int ndim,
                                     const int64_t *shape) {
    QL_REQUIRE_ARG(w != NULL, "w");
    QL_REQUIRE_ARG(name != NULL, "name");
    if (w->frozen)
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': tensor '%s' declared after the first write",
                       w->path, name);
    QL_CHECK(check_text(w, "a tensor name", name));
    if (strcmp(name, "__metadata__") == 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': '__metadata__' is reserved", w->path);
    if (dtype_rank(dtype) < 0)
        return ql_fail(QLORA_ERR_DTYPE, "safetensors writer '%s': tensor '%s': dtype %s cannot be stored in "
                       "safetensors (store packed 4-bit codes as U8)", w->path, name, qlora_dtype_name(dtype));
    qlora_tensor desc;
    QL_CHECK(qlora_tensor_init(&desc, name, dtype, ndim, shape, NULL, QLORA_DEVICE_HOST));
    int64_t numel = qlora_tensor_numel(&desc);
    if (numel < 0 || (unsigned __int128)(uint64_t)numel * (unsigned)qlora_dtype_bits(dtype) > UINT64_MAX)
        return ql_fail(QLORA_ERR_SHAPE, "safetensors writer '%s': tensor '%s': the size overflows", w->path, name);
    uint64_t nbits = (uint64_t)numel * (unsigned)qlora_dtype_bits(dtype);
    if (nbits % 8 != 0)
        return ql_fail(QLORA_ERR_SHAPE, "safetensors writer '%s': tensor '%s': %lld elements of %s are not a whole "
                       "number of bytes", w->path, name, (long long)numel, qlora_dtype_name(dtype));
    if (lookup(w, name))
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': tensor '%s' declared twice", w->path, name);
    if (w->n == w->cap) {
        size_t ncap = w->cap ? w->cap * 2 : 64;
        ql_wtensor *grown = realloc(w->t, ncap * sizeof *grown);
        if (!grown)
            return oom(w);
        w->t = grown;
        w->cap = ncap;
    }
    if (2 * (w->n + 1) > w->slot_cap)
        QL_CHECK(grow_slots(w));
    ql_wtensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return oom(w);
    t->dtype = dtype;
    t->ndim = ndim;
    memcpy(t->shape, desc.shape, sizeof t->shape);
    t->nbytes = nbits / 8;
    w->slots[find_slot(w, name)] = ++w->n;
    return QLORA_OK;
}

/* Shard of each tensor: huggingface_hub's greedy split (split_state_dict_into_shards_factory). */
static qlora_status assign_shards(qlora_st_writer *w) {
    if (w->max_shard_bytes == 0 || w->n == 0) {
        for (size_t i = 0; i < w->n; i++)
            w->t[i].shard = 0;
        w->nshards = 1;
        return QLORA_OK;
    }
    /* Groups get ids as they open; a group's shard number is its rank in completion order. */
    int *group_rank = malloc(w->n * sizeof *group_rank);
    if (!group_rank)
        return oom(w);
    int ngroups = 0, done = 0, open_group = -1;
    uint64_t open_bytes = 0;
    for (size_t i = 0; i < w->n; i++) {
        uint64_t b = w->t[i].nbytes;
        if (b > w->max_shard_bytes) {
            group_rank[ngroups] = done++;
            w->t[i].shard = ngroups++;
            continue;
        }
        if (open_group >= 0 && b > w->max_shard_bytes - open_bytes) {
            group_rank[open_group] = done++;
            open_group = -1;
        }
        if (open_group < 0) {
            open_group = ngroups++;
            open_bytes = 0;
        }
        w->t[i].shard = open_group;
        open_bytes += b;
    }
    if (open_group >= 0)
        group_rank[open_group] = done++;
    for (size_t i = 0; i < w->n; i++)
        w->t[i].shard = group_rank[w->t[i].shard];
    free(group_rank);
    w->nshards = ngroups;
    return QLORA_OK;
}

static int cmp_layout(const void *a, const void *b) {
    const ql_wtensor *x = *(ql_wtensor *const *)a, *y = *(ql_wtensor *const *)b;
    int rx = dtype_rank(x->dtype), ry = dtype_rank(y->dtype);
    if (rx != ry)
        return rx > ry ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(ql_wtensor *const *)a)->name, (*(ql_wtensor *const *)b)->name);
}

/* The header of one shard: compact JSON as serde_json writes it, padded to a multiple of 8. */
static qlora_status build_header(qlora_st_writer *w, ql_wtensor **order, size_t count, ql_buf *h) {
    const char *format = "pt";
    for (size_t i = 0; i < w->meta_n; i++)
        if (strcmp(w->meta_keys[i], "format") == 0)
            format = w->meta_values[i];
    ql_buf_puts(h, "{\"__metadata__\":{\"format\":");
    ql_buf_json_string_serde(h, format);
    for (size_t i = 0; i < w->meta_n; i++) {
        if (strcmp(w->meta_keys[i], "format") == 0)
            continue;
        ql_buf_puts(h, ",");
        ql_buf_json_string_serde(h, w->meta_keys[i]);
        ql_buf_puts(h, ":");
        ql_buf_json_string_serde(h, w->meta_values[i]);
    }
    ql_buf_puts(h, "}");
    uint64_t offset = 0;
    for (size_t i = 0; i < count; i++) {
        const ql_wtensor *t = order[i];
        ql_buf_puts(h, ",");
        ql_buf_json_string_serde(h, t->name);
        ql_buf_printf(h, ":{\"dtype\":\"%s\",\"shape\":[", qlora_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++)
            ql_buf_printf(h, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        ql_buf_printf(h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                      (unsigned long long)(offset + t->nbytes));
        offset += t->nbytes;
    }
    ql_buf_puts(h, "}");
    while (h->len % 8 != 0 && !h->failed)
        ql_buf_puts(h, " ");
    if (h->failed)
        return oom(w);
    if (h->len > QL_ST_MAX_HEADER)
        return ql_fail(QLORA_ERR_FORMAT, "safetensors writer '%s': the header would take %zu bytes, over the limit "
                       "of %llu", w->path, h->len, QL_ST_MAX_HEADER);
    return QLORA_OK;
}

/* Lays out one shard file: header written, data offsets of its tensors assigned, space reserved. */
static qlora_status layout_file(qlora_st_writer *w, ql_wfile *f, int shard, ql_wtensor **order) {
    size_t count = 0;
    for (size_t i = 0; i < w->n; i++)
        if (w->t[i].shard == shard)
            order[count++] = &w->t[i];
    qsort(order, count, sizeof *order, cmp_layout);
    ql_buf h = {0};
    qlora_status st = build_header(w, order, count, &h);
    if (st == QLORA_OK) {
        uint64_t pos = 8 + h.len;
        for (size_t i = 0; i < count; i++) {
            order[i]->file_offset = pos;
            pos += order[i]->nbytes;
        }
        f->size = pos;
        unsigned char len8[8];
        for (int b = 0; b < 8; b++)
            len8[b] = (unsigned char)((uint64_t)h.len >> (8 * b));
        st = pwrite_all(w, f, len8, 8, 0);
        if (st == QLORA_OK)
            st = pwrite_all(w, f, h.data, h.len, 8);
    }
    ql_buf_free(&h);
    /* Reserve the space now: a full disk shows up here rather than half-way through. */
    if (st == QLORA_OK && f->size > 8 && fallocate(f->fd, 0, 0, (off_t)f->size) != 0 && errno != EOPNOTSUPP &&
        errno != ENOSYS && errno != EINVAL)
        st = io_fail(w, "cannot reserve space for", f->tmp_path, errno);
    return st;
}

static qlora_status freeze(qlora_st_writer *w) {
    QL_CHECK(assign_shards(w));
    if (w->max_shard_bytes > 0) {
        w->nfiles = w->nshards + (w->nshards > 1);
        w->files = calloc((size_t)w->nfiles, sizeof *w->files);
        if (!w->files) {
            w->nfiles = 0;
            return oom(w);
        }
        for (int i = 0; i < w->nfiles; i++)
            w->files[i].fd = -1;
        for (int i = 0; i < w->nfiles; i++) {
            char name[64];
            if (i == w->nshards)
                snprintf(name, sizeof name, "%s", QL_INDEX_NAME);
            else if (w->nshards == 1)
                snprintf(name, sizeof name, "model.safetensors");
            else
                snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", i + 1, w->nshards);
            if (asprintf(&w->files[i].final_path, "%s/%s", w->dir, name) < 0) {
                w->files[i].final_path = NULL;
                return oom(w);
            }
            QL_CHECK(create_temp(w, &w->files[i], name));
        }
    }
    ql_wtensor **order = malloc((w->n ? w->n : 1) * sizeof *order);
    if (!order)
        return oom(w);
    qlora_status st = QLORA_OK;
    for (int s = 0; s < w->nshards && st == QLORA_OK; s++)
        st = layout_file(w, &w->files[s], s, order);
    free(order);
    if (st == QLORA_OK)
        w->frozen = 1;
    return st;
}

qlora_status qlora_st_writer_write(qlora_st_writer *w, const char *name, const void *data, size_t nbytes) {
    QL_REQUIRE_ARG(w != NULL, "w");
    QL_REQUIRE_ARG(name != NULL, "name");
    if (w->failed != QLORA_OK)
        return ql_fail(w->failed, "safetensors writer '%s': an earlier call failed: %s", w->path, w->failed_msg);
    ql_wtensor *t = lookup(w, name);
    if (!t)
        return ql_fail(QLORA_ERR_NOT_FOUND, "safetensors writer '%s': tensor '%s' was not declared", w->path, name);
    if (t->written)
        return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': tensor '%s' written twice", w->path, name);
    if (nbytes != t->nbytes)
        return ql_fail(QLORA_ERR_SHAPE, "safetensors writer '%s': tensor '%s': got %zu bytes, its dtype and shape "
                       "take %llu", w->path, name, nbytes, (unsigned long long)t->nbytes);
    QL_REQUIRE_ARG(data != NULL || nbytes == 0, "data");
    if (!w->frozen) {
        qlora_status st = freeze(w);
        if (st != QLORA_OK)
            return poison(w, st);
    }
    qlora_status st = pwrite_all(w, &w->files[t->shard], data, nbytes, t->file_offset);
    if (st != QLORA_OK)
        return poison(w, st);
    t->written = 1;
    return QLORA_OK;
}

/* The index file as transformers writes it: json.dumps(indent=2, sort_keys=True) + "\n". */
static qlora_status write_index(qlora_st_writer *w, ql_wfile *f) {
    ql_wtensor **sorted = malloc(w->n * sizeof *sorted);
    if (!sorted)
        return oom(w);
    uint64_t total = 0;
    for (size_t i = 0; i < w->n; i++) {
        sorted[i] = &w->t[i];
        total += w->t[i].nbytes;
    }
    qsort(sorted, w->n, sizeof *sorted, cmp_name);
    ql_buf b = {0};
    ql_buf_printf(&b, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {\n",
                  (unsigned long long)total);
    for (size_t i = 0; i < w->n; i++) {
        const char *shard = strrchr(w->files[sorted[i]->shard].final_path, '/') + 1;
        ql_buf_puts(&b, "    ");
        ql_buf_json_string_python(&b, sorted[i]->name);
        ql_buf_puts(&b, ": ");
        ql_buf_json_string_python(&b, shard);
        ql_buf_puts(&b, i + 1 < w->n ? ",\n" : "\n");
    }
    ql_buf_puts(&b, "  }\n}\n");
    free(sorted);
    qlora_status st = b.failed ? oom(w) : pwrite_all(w, f, b.data, b.len, 0);
    f->size = b.len;
    ql_buf_free(&b);
    return st;
}

static qlora_status finish_file(qlora_st_writer *w, ql_wfile *f) {
    if (ftruncate(f->fd, (off_t)f->size) != 0)
        return io_fail(w, "cannot set the size of", f->tmp_path, errno);
    if (fsync(f->fd) != 0)
        return io_fail(w, "cannot fsync", f->tmp_path, errno);
    int rc = close(f->fd);
    f->fd = -1;
    if (rc != 0)
        return io_fail(w, "cannot close", f->tmp_path, errno);
    return QLORA_OK;
}

static qlora_status sync_dir(qlora_st_writer *w) {
    int fd = open(w->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return io_fail(w, "cannot open directory", w->dir, errno);
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    /* Some file systems cannot fsync a directory (EINVAL); the rename itself is still atomic. */
    if (rc != 0 && e != EINVAL)
        return io_fail(w, "cannot fsync directory", w->dir, e);
    return QLORA_OK;
}

static qlora_status publish(qlora_st_writer *w) {
    if (w->failed != QLORA_OK)
        return ql_fail(w->failed, "safetensors writer '%s': not committed because an earlier call failed: %s",
                       w->path, w->failed_msg ? w->failed_msg : "");
    if (!w->frozen)
        QL_CHECK(freeze(w));
    for (size_t i = 0; i < w->n; i++)
        if (!w->t[i].written)
            return ql_fail(QLORA_ERR_INVALID_ARG, "safetensors writer '%s': not committed: tensor '%s' was declared "
                           "but never written", w->path, w->t[i].name);
    if (w->nfiles > w->nshards)
        QL_CHECK(write_index(w, &w->files[w->nshards]));
    for (int i = 0; i < w->nfiles; i++)
        QL_CHECK(finish_file(w, &w->files[i]));
    /* Every file is complete and durable before the first becomes visible; the index goes
     * last so it never names a shard that is not there yet. */
    for (int i = 0; i < w->nfiles; i++) {
        ql_wfile *f = &w->files[i];
        if (rename(f->tmp_path, f->final_path) != 0)
            return io_fail(w, "cannot rename the temp file onto", f->final_path, errno);
        free(f->tmp_path);
        f->tmp_path = NULL;
        w->committed = 1;
    }
    if (w->max_shard_bytes > 0 && w->nshards == 1) {
        /* A stale index from an earlier sharded save would shadow the new model.safetensors. */
        char *stale = NULL;
        if (asprintf(&stale, "%s/%s", w->dir, QL_INDEX_NAME) < 0)
            return oom(w);
        int rc = unlink(stale), e = errno;
        qlora_status st = rc != 0 && e != ENOENT ? io_fail(w, "cannot remove the stale index", stale, e) : QLORA_OK;
        free(stale);
        QL_CHECK(st);
    }
    return sync_dir(w);
}

qlora_status qlora_st_writer_commit(qlora_st_writer *w) {
    QL_REQUIRE_ARG(w != NULL, "w");
    qlora_status st = publish(w);
    writer_free(w); /* removes whatever temp file was not published */
    return st;
}

void qlora_st_writer_abort(qlora_st_writer *w) {
    if (w)
        writer_free(w);
}
