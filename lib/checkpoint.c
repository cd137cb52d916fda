/*
 * Checkpoints: one .safetensors file, or a directory with model.safetensors or a sharded set
 * described by model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor: shard}}).
 * The index and the shards must agree exactly: every mapped tensor is in its shard, every
 * tensor of every shard is mapped there, and no name occurs twice.
 */
#include "internal.h"
#include "text_file.h"
#include "json_util.h"
#include "safetensors_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define QL_INDEX_NAME "model.safetensors.index.json"
#define QL_INDEX_MAX_BYTES (1ull << 30)

typedef struct ql_ck_entry {
    const char *name;   /* owned by its shard */
    size_t shard;
    size_t index;       /* tensor index within the shard */
} ql_ck_entry;

struct qlora_checkpoint {
    char *path;
    qlora_safetensors **shards;
    char **shard_names;        /* as written in the index (or the file path) */
    size_t nshards;
    ql_ck_entry *entries;      /* [count], sorted by name */
    size_t count;
};

static qlora_status ck_oom(const char *path) {
    return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "checkpoint '%s': out of memory", path);
}

void qlora_checkpoint_close(qlora_checkpoint *c) {
    if (!c)
        return;
    for (size_t i = 0; i < c->nshards; i++) {
        qlora_safetensors_close(c->shards[i]);
        free(c->shard_names[i]);
    }
    free(c->shards);
    free(c->shard_names);
    free(c->entries);
    free(c->path);
    free(c);
}

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const ql_ck_entry *)a)->name, ((const ql_ck_entry *)b)->name);
}

static const ql_ck_entry *find_entry(const qlora_checkpoint *c, const char *name) {
    ql_ck_entry key = {.name = name};
    return bsearch(&key, c->entries, c->count, sizeof *c->entries, cmp_entry);
}

/* Opens a shard (once) and returns its position. */
static qlora_status add_shard(qlora_checkpoint *c, const char *dir, const char *file, size_t *pos) {
    for (size_t i = 0; i < c->nshards; i++) {
        if (strcmp(c->shard_names[i], file) == 0) {
            *pos = i;
            return QLORA_OK;
        }
    }
    qlora_safetensors **s2 = realloc(c->shards, (c->nshards + 1) * sizeof *s2);
    if (s2)
        c->shards = s2;
    char **n2 = s2 ? realloc(c->shard_names, (c->nshards + 1) * sizeof *n2) : NULL;
    if (n2)
        c->shard_names = n2;
    char *full = NULL;
    if (!s2 || !n2 || asprintf(&full, "%s%s%s", dir ? dir : "", dir ? "/" : "", file) < 0)
        return ck_oom(c->path);
    char *name = strdup(file);
    if (!name) {
        free(full);
        return ck_oom(c->path);
    }
    qlora_safetensors *f = NULL;
    qlora_status st = qlora_safetensors_open(full, &f);
    free(full);
    if (st != QLORA_OK) {
        free(name);
        return st;
    }
    c->shards[c->nshards] = f;
    c->shard_names[c->nshards] = name;
    *pos = c->nshards++;
    return QLORA_OK;
}

static qlora_status open_single(qlora_checkpoint *c, const char *file) {
    size_t s;
    QL_CHECK(add_shard(c, NULL, file, &s));
    c->count = qlora_safetensors_count(c->shards[s]);
    c->entries = calloc(c->count ? c->count : 1, sizeof *c->entries);
    if (!c->entries)
        return ck_oom(c->path);
    for (size_t i = 0; i < c->count; i++)
        c->entries[i] = (ql_ck_entry){ql_safetensors_name(c->shards[s], i), s, i};
    qsort(c->entries, c->count, sizeof *c->entries, cmp_entry);
    return QLORA_OK;
}


/* A shard file name must stay inside the checkpoint directory. */
static int shard_name_ok(const char *s) {
    if (*s == '\0' || *s == '/')
        return 0;
    for (const char *p = s; *p;) {
        size_t seg = strcspn(p, "/");
        if (seg == 2 && p[0] == '.' && p[1] == '.')
            return 0;
        p += seg;
        if (*p == '/')
            p++;
    }
    return 1;
}

/* Every tensor of every shard must be mapped to that shard. */
static qlora_status check_shards_covered(qlora_checkpoint *c, const char *index_path) {
    for (size_t s = 0; s < c->nshards; s++) {
        for (size_t i = 0; i < qlora_safetensors_count(c->shards[s]); i++) {
            const char *name = ql_safetensors_name(c->shards[s], i);
            const ql_ck_entry *e = find_entry(c, name);
            if (!e)
                return ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': tensor '%s' of shard '%s' is not in "
                               "weight_map", index_path, name, c->shard_names[s]);
            if (e->shard != s)
                return ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': tensor '%s' is in shard '%s' and in shard "
                               "'%s'", index_path, name, c->shard_names[e->shard], c->shard_names[s]);
        }
    }
    return QLORA_OK;
}

/* Duplicate keys of an object are an error (cJSON keeps both). */
static qlora_status check_unique(const qlora_checkpoint *c, const char *index_path, const cJSON *obj) {
    const char *dup;
    int d = ql_json_duplicate_key(obj, &dup);
    if (d < 0)
        return ck_oom(c->path);
    if (d > 0)
        return ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': key '%s' appears twice", index_path, dup);
    return QLORA_OK;
}

static qlora_status parse_index(qlora_checkpoint *c, const char *dir, const char *index_path, const cJSON *root) {
    if (!cJSON_IsObject(root))
        return ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': not a JSON object", index_path);
    QL_CHECK(check_unique(c, index_path, root));
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map))
        return ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': 'weight_map' is missing or not an object",
                       index_path);
    QL_CHECK(check_unique(c, index_path, map));
    c->count = (size_t)cJSON_GetArraySize(map);
    c->entries = calloc(c->count ? c->count : 1, sizeof *c->entries);
    if (!c->entries)
        return ck_oom(c->path);
    size_t k = 0;
    for (const cJSON *item = map->child; item; item = item->next, k++) {
        if (!cJSON_IsString(item) || !shard_name_ok(item->valuestring))
            return ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': tensor '%s' maps to an invalid shard name",
                           index_path, item->string);
        size_t s;
        QL_CHECK(add_shard(c, dir, item->valuestring, &s));
        int64_t idx = ql_safetensors_lookup(c->shards[s], item->string);
        if (idx < 0)
            return ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': tensor '%s' is mapped to shard '%s', which "
                           "does not contain it", index_path, item->string, item->valuestring);
        c->entries[k] = (ql_ck_entry){ql_safetensors_name(c->shards[s], (size_t)idx), s, (size_t)idx};
    }
    qsort(c->entries, c->count, sizeof *c->entries, cmp_entry);
    return check_shards_covered(c, index_path);
}

static qlora_status open_index(qlora_checkpoint *c, const char *dir, const char *index_path) {
    char *text = NULL;
    size_t n = 0;
    QL_CHECK(ql_read_text_file("checkpoint index", index_path, QL_INDEX_MAX_BYTES, &text, &n));
    size_t bad;
    ql_json_number *nums = NULL;
    size_t nnums;
    char why[128];
    qlora_status st = QLORA_OK;
    if (!ql_utf8_valid(text, n, &bad))
        st = ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': not valid UTF-8 (byte %zu)", index_path, bad);
    else if (!ql_json_lex_check(text, n, &nums, &nnums, why, sizeof why, &bad))
        st = ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': not valid JSON: %s at byte %zu", index_path, why, bad);
    free(nums);
    cJSON *root = NULL;
    if (st == QLORA_OK) {
        const char *end = NULL;
        root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
        size_t rest = root ? (size_t)(end - text) : 0;
        while (root && rest < n && (text[rest] == ' ' || text[rest] == '\t' || text[rest] == '\r' || text[rest] == '\n'))
            rest++;
        if (!root || rest != n)
            st = ql_fail(QLORA_ERR_FORMAT, "checkpoint index '%s': not valid JSON", index_path);
    }
    if (st == QLORA_OK)
        st = parse_index(c, dir, index_path, root);
    cJSON_Delete(root);
    free(text);
    return st;
}

qlora_status qlora_checkpoint_open(const char *path, qlora_checkpoint **out) {
    QL_REQUIRE_ARG(path != NULL, "path");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0)
        return ql_fail(errno == ENOENT ? QLORA_ERR_NOT_FOUND : QLORA_ERR_IO, "checkpoint '%s': %s", path,
                       strerror(errno));
    qlora_checkpoint *c = calloc(1, sizeof *c);
    if (!c || !(c->path = strdup(path))) {
        free(c);
        return ck_oom(path);
    }
    qlora_status status;
    if (!S_ISDIR(st.st_mode)) {
        status = open_single(c, path);
    } else {
        char *index = NULL, *single = NULL;
        if (asprintf(&index, "%s/%s", path, QL_INDEX_NAME) < 0)
            index = NULL;
        if (asprintf(&single, "%s/model.safetensors", path) < 0)
            single = NULL;
        struct stat is;
        if (!index || !single)
            status = ck_oom(path);
        else if (stat(index, &is) == 0)
            status = open_index(c, path, index);
        else if (stat(single, &is) == 0)
            status = open_single(c, single);
        else
            status = ql_fail(QLORA_ERR_NOT_FOUND, "checkpoint '%s': the directory has neither %s nor "
                             "model.safetensors", path, QL_INDEX_NAME);
        free(index);
        free(single);
    }
    if (status != QLORA_OK) {
        qlora_checkpoint_close(c);
        return status;
    }
    *out = c;
    return QLORA_OK;
}

size_t qlora_checkpoint_count(const qlora_checkpoint *c) { return c ? c->count : 0; }

const char *qlora_checkpoint_name(const qlora_checkpoint *c, size_t index) {
    return c && index < c->count ? c->entries[index].name : NULL;
}

qlora_status qlora_checkpoint_find(const qlora_checkpoint *c, const char *name, qlora_tensor *out) {
    QL_REQUIRE_ARG(c != NULL, "c");
    QL_REQUIRE_ARG(name != NULL, "name");
    QL_REQUIRE_ARG(out != NULL, "out");
    const ql_ck_entry *e = find_entry(c, name);
    if (!e)
        return ql_fail(QLORA_ERR_NOT_FOUND, "checkpoint '%s': no tensor named '%s'", c->path, name);
    return qlora_safetensors_get(c->shards[e->shard], e->index, out);
}
