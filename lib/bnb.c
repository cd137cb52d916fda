/*
 * The bitsandbytes 4-bit key set of one quantized weight W, as Linear4bit._save_to_state_dict
 * and QuantState.as_dict(packed=True) write it (docs: spec nf4-bitsandbytes.md §4):
 *   W                                  U8  [(n+1)/2, 1]   packed codes (any dtype label on load)
 *   W.absmax                           F32 [nblocks], U8 [nblocks] with double quant
 *   W.quant_map                        F32 [16]
 *   W.nested_absmax                    F32 [ceil(nblocks/256)]   double quant only
 *   W.nested_quant_map                 F32 [256]                 double quant only
 *   W.quant_state.bitsandbytes__<t>    U8  [len]   json.dumps of the non-tensor fields
 * The JSON is reproduced byte for byte: keys quant_type, blocksize, dtype, shape, then
 * nested_blocksize, nested_dtype, nested_offset; separators ", " and ": "; nested_offset as
 * Python's repr of the float32 offset widened to double.
 */
#include "internal.h"
#include "json_util.h"
#include "quant4.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QL_BNB_KEY_MAX 1024
#define QL_BNB_STATE "quant_state.bitsandbytes__"

typedef struct ql_bnb_keys {
    char absmax[QL_BNB_KEY_MAX];
    char quant_map[QL_BNB_KEY_MAX];
    char nested_absmax[QL_BNB_KEY_MAX];
    char nested_quant_map[QL_BNB_KEY_MAX];
    char state[2][QL_BNB_KEY_MAX]; /* indexed by qlora_quant_type */
} ql_bnb_keys;

static qlora_status make_keys(const char *weight, ql_bnb_keys *k) {
    if (strlen(weight) + 64 > QL_BNB_KEY_MAX)
        return ql_fail(QLORA_ERR_INVALID_ARG, "bitsandbytes weight '%.64s...': name longer than %d bytes", weight,
                       QL_BNB_KEY_MAX - 64);
    snprintf(k->absmax, sizeof k->absmax, "%s.absmax", weight);
    snprintf(k->quant_map, sizeof k->quant_map, "%s.quant_map", weight);
    snprintf(k->nested_absmax, sizeof k->nested_absmax, "%s.nested_absmax", weight);
    snprintf(k->nested_quant_map, sizeof k->nested_quant_map, "%s.nested_quant_map", weight);
    snprintf(k->state[QLORA_QUANT_NF4], sizeof k->state[0], "%s." QL_BNB_STATE "nf4", weight);
    snprintf(k->state[QLORA_QUANT_FP4], sizeof k->state[1], "%s." QL_BNB_STATE "fp4", weight);
    return QLORA_OK;
}

/* torch dtype names as bitsandbytes writes them (str(dtype) without "torch."). */
static const char *torch_dtype_name(qlora_dtype d) {
    switch (d) {
    case QLORA_F32: return "float32";
    case QLORA_F16: return "float16";
    case QLORA_BF16: return "bfloat16";
    default: return NULL;
    }
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static qlora_status check_qtensor(const char *weight, const qlora_qtensor *q) {
    if (q->type != QLORA_QUANT_NF4 && q->type != QLORA_QUANT_FP4)
        return ql_fail(QLORA_ERR_INVALID_ARG, "bitsandbytes weight '%s': invalid quant type %d", weight, (int)q->type);
    if (!ql_quant4_blocksize_ok(q->blocksize))
        return ql_fail(QLORA_ERR_INVALID_ARG, "bitsandbytes weight '%s': invalid blocksize %d", weight, q->blocksize);
    if (!torch_dtype_name(q->dtype))
        return ql_fail(QLORA_ERR_DTYPE, "bitsandbytes weight '%s': original dtype %s is not F32, F16 or BF16", weight,
                       qlora_dtype_name(q->dtype));
    if (q->ndim < 0 || q->ndim > QLORA_MAX_DIMS)
        return ql_fail(QLORA_ERR_SHAPE, "bitsandbytes weight '%s': %d dimensions", weight, q->ndim);
    int64_t numel = 1;
    for (int i = 0; i < q->ndim; i++)
        if (q->shape[i] < 0 || (q->shape[i] != 0 && numel > INT64_MAX / q->shape[i]))
            return ql_fail(QLORA_ERR_SHAPE, "bitsandbytes weight '%s': invalid shape", weight);
        else
            numel *= q->shape[i];
    int64_t nblocks = ceil_div(numel, q->blocksize);
    int64_t nested = q->double_quant ? ceil_div(nblocks, QLORA_NESTED_BLOCKSIZE) : 0;
    if (numel != q->numel || nblocks != q->nblocks || nested != q->nested_nblocks)
        return ql_fail(QLORA_ERR_SHAPE, "bitsandbytes weight '%s': numel/nblocks/nested_nblocks (%lld/%lld/%lld) do "
                       "not match the shape and blocksize (%lld/%lld/%lld)", weight, (long long)q->numel,
                       (long long)q->nblocks, (long long)q->nested_nblocks, (long long)numel, (long long)nblocks,
                       (long long)nested);
    return QLORA_OK;
}

/* json.dumps of the non-tensor QuantState fields, byte for byte. */
static qlora_status build_blob(const char *weight, const qlora_qtensor *q, ql_buf *b) {
    ql_buf_printf(b, "{\"quant_type\": \"%s\", \"blocksize\": %d, \"dtype\": \"%s\", \"shape\": [",
                  qlora_quant_type_name(q->type), q->blocksize, torch_dtype_name(q->dtype));
    for (int i = 0; i < q->ndim; i++)
        ql_buf_printf(b, "%s%lld", i ? ", " : "", (long long)q->shape[i]);
    ql_buf_puts(b, "]");
    if (q->double_quant) {
        char offset[40];
        if (!ql_python_float_repr((double)q->nested_offset, offset, sizeof offset))
            return ql_fail(QLORA_ERR_NON_FINITE, "bitsandbytes weight '%s': nested_offset is not finite", weight);
        ql_buf_printf(b, ", \"nested_blocksize\": %d, \"nested_dtype\": \"float32\", \"nested_offset\": %s",
                      QLORA_NESTED_BLOCKSIZE, offset);
    }
    ql_buf_puts(b, "}");
    if (b->failed)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "bitsandbytes weight '%s': out of memory", weight);
    return QLORA_OK;
}

qlora_status qlora_bnb_declare(qlora_st_writer *w, const char *weight_name, const qlora_qtensor *q) {
    QL_REQUIRE_ARG(w != NULL, "w");
    QL_REQUIRE_ARG(weight_name != NULL, "weight_name");
    QL_REQUIRE_ARG(q != NULL, "q");
    QL_CHECK(check_qtensor(weight_name, q));
    ql_bnb_keys k;
    QL_CHECK(make_keys(weight_name, &k));
    ql_buf blob = {0};
    qlora_status st = build_blob(weight_name, q, &blob);
    int64_t blob_len = (int64_t)blob.len;
    ql_buf_free(&blob);
    QL_CHECK(st);
    int64_t packed[2] = {(q->numel + 1) / 2, 1};
    int64_t sixteen = 16, dyn = 256;
    QL_CHECK(qlora_st_writer_declare(w, weight_name, QLORA_U8, 2, packed));
    QL_CHECK(qlora_st_writer_declare(w, k.absmax, q->double_quant ? QLORA_U8 : QLORA_F32, 1, &q->nblocks));
    QL_CHECK(qlora_st_writer_declare(w, k.quant_map, QLORA_F32, 1, &sixteen));
    if (q->double_quant) {
        QL_CHECK(qlora_st_writer_declare(w, k.nested_absmax, QLORA_F32, 1, &q->nested_nblocks));
        QL_CHECK(qlora_st_writer_declare(w, k.nested_quant_map, QLORA_F32, 1, &dyn));
    }
    return qlora_st_writer_declare(w, k.state[q->type], QLORA_U8, 1, &blob_len);
}

qlora_status qlora_bnb_write(qlora_st_writer *w, const char *weight_name, const qlora_qtensor *q) {
    QL_REQUIRE_ARG(w != NULL, "w");
    QL_REQUIRE_ARG(weight_name != NULL, "weight_name");
    QL_REQUIRE_ARG(q != NULL, "q");
    QL_CHECK(check_qtensor(weight_name, q));
    if (q->device != QLORA_DEVICE_HOST)
        return ql_fail(QLORA_ERR_DEVICE, "bitsandbytes weight '%s': the quantized tensor is on device %d; copy it to "
                       "the host to write it", weight_name, q->device);
    ql_bnb_keys k;
    QL_CHECK(make_keys(weight_name, &k));
    size_t nb = (size_t)q->nblocks;
    QL_CHECK(qlora_st_writer_write(w, weight_name, q->codes, (size_t)(q->numel + 1) / 2));
    if (q->double_quant)
        QL_CHECK(qlora_st_writer_write(w, k.absmax, q->qabsmax, nb));
    else
        QL_CHECK(qlora_st_writer_write(w, k.absmax, q->absmax, nb * sizeof(float)));
    QL_CHECK(qlora_st_writer_write(w, k.quant_map, q->code, sizeof q->code));
    if (q->double_quant) {
        QL_CHECK(qlora_st_writer_write(w, k.nested_absmax, q->nested_absmax, (size_t)q->nested_nblocks * sizeof(float)));
        QL_CHECK(qlora_st_writer_write(w, k.nested_quant_map, q->nested_code, sizeof q->nested_code));
    }
    ql_buf blob = {0};
    qlora_status st = build_blob(weight_name, q, &blob);
    if (st == QLORA_OK)
        st = qlora_st_writer_write(w, k.state[q->type], blob.data, blob.len);
    ql_buf_free(&blob);
    return st;
}

static int has_tensor(const qlora_checkpoint *c, const char *name) {
    /* A lookup that must not disturb the caller's last error. */
    for (size_t lo = 0, hi = qlora_checkpoint_count(c); lo < hi;) {
        size_t mid = lo + (hi - lo) / 2;
        int cmp = strcmp(name, qlora_checkpoint_name(c, mid));
        if (cmp == 0)
            return 1;
        if (cmp < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return 0;
}

int qlora_bnb_is_quantized(const qlora_checkpoint *c, const char *weight_name) {
    ql_bnb_keys k;
    if (!c || !weight_name || strlen(weight_name) + 64 > QL_BNB_KEY_MAX)
        return 0;
    make_keys(weight_name, &k);
    return has_tensor(c, weight_name) &&
           (has_tensor(c, k.state[QLORA_QUANT_NF4]) || has_tensor(c, k.state[QLORA_QUANT_FP4]));
}

/* The fields of the JSON blob, validated. */
typedef struct ql_bnb_state {
    qlora_quant_type type;
    int blocksize;
    qlora_dtype dtype;
    int ndim;
    int64_t shape[QLORA_MAX_DIMS];
    int nested;
    float nested_offset;
} ql_bnb_state;

typedef struct ql_blob_parse {
    const char *key; /* the quant_state key, for messages */
    const ql_json_number *nums;
    size_t nnums;
} ql_blob_parse;

static qlora_status blob_fail(const ql_blob_parse *bp, const char *what, const char *field) {
    return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': '%s' %s", bp->key, field, what);
}

static qlora_status blob_uint(const ql_blob_parse *bp, const cJSON *node, const char *field, uint64_t *out) {
    if (!cJSON_IsNumber(node) || node->valueint < 0 || (size_t)node->valueint >= bp->nnums ||
        !ql_json_parse_u64(&bp->nums[node->valueint], out))
        return blob_fail(bp, "is not a non-negative integer", field);
    return QLORA_OK;
}

static qlora_status blob_field(const ql_blob_parse *bp, const cJSON *c, ql_bnb_state *s, unsigned *seen) {
    static const char *const fields[7] = {"quant_type", "blocksize", "dtype", "shape",
                                          "nested_blocksize", "nested_dtype", "nested_offset"};
    int f = 0;
    while (f < 7 && strcmp(c->string, fields[f]) != 0)
        f++;
    if (f == 7)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': unexpected key '%s'", bp->key, c->string);
    *seen |= 1u << f;
    uint64_t v;
    switch (f) {
    case 0:
        if (!cJSON_IsString(c) || (strcmp(c->valuestring, "nf4") != 0 && strcmp(c->valuestring, "fp4") != 0))
            return blob_fail(bp, "is not \"nf4\" or \"fp4\"", c->string);
        s->type = strcmp(c->valuestring, "nf4") == 0 ? QLORA_QUANT_NF4 : QLORA_QUANT_FP4;
        return QLORA_OK;
    case 1:
        QL_CHECK(blob_uint(bp, c, c->string, &v));
        if (v > 4096 || !ql_quant4_blocksize_ok((int)v))
            return blob_fail(bp, "is not a power of two in 32..4096", c->string);
        s->blocksize = (int)v;
        return QLORA_OK;
    case 2:
        if (cJSON_IsString(c)) {
            for (int d = QLORA_F32; d <= QLORA_BF16; d++) {
                if (strcmp(c->valuestring, torch_dtype_name((qlora_dtype)d)) == 0) {
                    s->dtype = (qlora_dtype)d;
                    return QLORA_OK;
                }
            }
        }
        return blob_fail(bp, "is not \"float32\", \"float16\" or \"bfloat16\"", c->string);
    case 3: {
        int ndim = cJSON_IsArray(c) ? cJSON_GetArraySize(c) : -1;
        if (ndim < 0 || ndim > QLORA_MAX_DIMS)
            return blob_fail(bp, "is not a list of at most 8 dimensions", c->string);
        int i = 0;
        for (const cJSON *d = c->child; d; d = d->next, i++) {
            QL_CHECK(blob_uint(bp, d, "shape", &v));
            if (v > (uint64_t)INT64_MAX)
                return blob_fail(bp, "has a dimension that is too large", c->string);
            s->shape[i] = (int64_t)v;
        }
        s->ndim = ndim;
        return QLORA_OK;
    }
    case 4:
        QL_CHECK(blob_uint(bp, c, c->string, &v));
        if (v != QLORA_NESTED_BLOCKSIZE)
            return blob_fail(bp, "is not 256", c->string);
        return QLORA_OK;
    case 5:
        if (!cJSON_IsString(c) || strcmp(c->valuestring, "float32") != 0)
            return blob_fail(bp, "is not \"float32\"", c->string);
        return QLORA_OK;
    default:
        if (!cJSON_IsNumber(c) || !isfinite(c->valuedouble))
            return blob_fail(bp, "is not a finite number", c->string);
        s->nested_offset = (float)c->valuedouble;
        return QLORA_OK;
    }
}

static qlora_status parse_blob(const char *key, const qlora_tensor *blob, qlora_quant_type suffix_type,
                               ql_bnb_state *s) {
    if (blob->dtype != QLORA_U8)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': dtype %s, expected U8", key,
                       qlora_dtype_name(blob->dtype));
    const char *text = blob->data;
    size_t n = qlora_tensor_nbytes(blob), bad;
    ql_blob_parse bp = {.key = key};
    ql_json_number *nums = NULL;
    char why[128];
    if (!ql_utf8_valid(text, n, &bad))
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': not valid UTF-8", key);
    if (!ql_json_lex_check(text, n, &nums, &bp.nnums, why, sizeof why, &bad))
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': not valid JSON: %s at byte %zu", key, why,
                       bad);
    bp.nums = nums;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    qlora_status st = QLORA_OK;
    const char *dup = NULL;
    int d = 0;
    if (!root || !cJSON_IsObject(root) || (size_t)(end - text) != n)
        st = ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': not a JSON object", key);
    else if ((d = ql_json_duplicate_key(root, &dup)) != 0)
        st = d < 0 ? ql_fail(QLORA_ERR_OUT_OF_MEMORY, "bitsandbytes quant_state '%s': out of memory", key)
                   : ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': key '%s' appears twice", key, dup);
    unsigned seen = 0;
    if (st == QLORA_OK) {
        ql_json_tag_numbers(root, 0);
        for (const cJSON *c = root->child; c && st == QLORA_OK; c = c->next)
            st = blob_field(&bp, c, s, &seen);
    }
    cJSON_Delete(root);
    free(nums);
    QL_CHECK(st);
    if ((seen & 0xF) != 0xF)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': missing one of quant_type, blocksize, dtype, "
                       "shape", key);
    if ((seen >> 4) != 0 && (seen >> 4) != 7)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': nested_blocksize, nested_dtype and "
                       "nested_offset must appear together", key);
    s->nested = (seen >> 4) == 7;
    if (s->type != suffix_type)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes quant_state '%s': quant_type '%s' does not match the key",
                       key, qlora_quant_type_name(s->type));
    return QLORA_OK;
}

/* A companion tensor with the expected dtype and element count. */
static qlora_status find_part(const qlora_checkpoint *c, const char *weight, const char *key, qlora_dtype dtype,
                              int64_t numel, qlora_tensor *out) {
    if (!has_tensor(c, key))
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes weight '%s': key '%s' is missing", weight, key);
    QL_CHECK(qlora_checkpoint_find(c, key, out));
    if (out->dtype != dtype || qlora_tensor_numel(out) != numel)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes weight '%s': key '%s' is %s with %lld elements, expected %s "
                       "with %lld", weight, key, qlora_dtype_name(out->dtype), (long long)qlora_tensor_numel(out),
                       qlora_dtype_name(dtype), (long long)numel);
    return QLORA_OK;
}

/* Copies bytes from the mapped file into a (host or device) buffer of the context. */
static qlora_status copy_in(qlora_ctx *ctx, void *dst, int dst_device, const void *src, size_t n, const char *label) {
    if (n == 0)
        return QLORA_OK;
    int64_t len = (int64_t)n;
    qlora_tensor d, s;
    QL_CHECK(qlora_tensor_init(&s, label, QLORA_U8, 1, &len, (void *)(uintptr_t)src, QLORA_DEVICE_HOST));
    QL_CHECK(qlora_tensor_init(&d, label, QLORA_U8, 1, &len, dst, dst_device));
    return qlora_tensor_copy(ctx, &d, &s);
}

static qlora_status load_parts(qlora_ctx *ctx, const qlora_checkpoint *c, const char *weight, const ql_bnb_keys *k,
                               const ql_bnb_state *s, qlora_qtensor *out) {
    int64_t numel = 1;
    for (int i = 0; i < s->ndim; i++)
        if (__builtin_mul_overflow(numel, s->shape[i], &numel))
            return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes weight '%s': the shape overflows", weight);
    int64_t nblocks = ceil_div(numel, s->blocksize);
    qlora_tensor codes, absmax, qmap, nested = {0}, nmap = {0};
    QL_CHECK(qlora_checkpoint_find(c, weight, &codes));
    /* Packed codes: raw bytes, whatever quant_storage dtype labels them. */
    size_t packed = (size_t)((numel + 1) / 2);
    if (qlora_tensor_nbytes(&codes) != packed)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes weight '%s': %zu bytes of packed codes, the shape needs %zu",
                       weight, qlora_tensor_nbytes(&codes), packed);
    QL_CHECK(find_part(c, weight, k->absmax, s->nested ? QLORA_U8 : QLORA_F32, nblocks, &absmax));
    QL_CHECK(find_part(c, weight, k->quant_map, QLORA_F32, 16, &qmap));
    if (s->nested) {
        QL_CHECK(find_part(c, weight, k->nested_absmax, QLORA_F32, ceil_div(nblocks, QLORA_NESTED_BLOCKSIZE), &nested));
        QL_CHECK(find_part(c, weight, k->nested_quant_map, QLORA_F32, 256, &nmap));
    } else if (has_tensor(c, k->nested_absmax) || has_tensor(c, k->nested_quant_map)) {
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes weight '%s': nested_absmax/nested_quant_map present but the "
                       "quant_state has no nested fields", weight);
    }
    qlora_quant_params p = {.type = s->type, .blocksize = s->blocksize, .double_quant = s->nested};
    QL_CHECK(qlora_qtensor_alloc(ctx, out, weight, s->ndim, s->shape, s->dtype, &p, 1));
    qlora_status st = copy_in(ctx, out->codes, out->device, codes.data, packed, weight);
    if (st == QLORA_OK && s->nested)
        st = copy_in(ctx, out->qabsmax, out->device, absmax.data, (size_t)nblocks, k->absmax);
    if (st == QLORA_OK && !s->nested)
        st = copy_in(ctx, out->absmax, out->device, absmax.data, (size_t)nblocks * sizeof(float), k->absmax);
    if (st == QLORA_OK && s->nested)
        st = copy_in(ctx, out->nested_absmax, out->device, nested.data,
                     (size_t)out->nested_nblocks * sizeof(float), k->nested_absmax);
    if (st != QLORA_OK) {
        qlora_qtensor_free(ctx, out);
        return st;
    }
    /* Code books come from the file (the mapping may be unaligned for float). */
    memcpy(out->code, qmap.data, sizeof out->code);
    if (s->nested) {
        memcpy(out->nested_code, nmap.data, sizeof out->nested_code);
        out->nested_offset = s->nested_offset;
    }
    return QLORA_OK;
}

qlora_status qlora_bnb_load(qlora_ctx *ctx, const qlora_checkpoint *c, const char *weight_name, qlora_qtensor *out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(c != NULL, "c");
    QL_REQUIRE_ARG(weight_name != NULL, "weight_name");
    QL_REQUIRE_ARG(out != NULL, "out");
    ql_bnb_keys k;
    QL_CHECK(make_keys(weight_name, &k));
    if (!has_tensor(c, weight_name))
        return ql_fail(QLORA_ERR_NOT_FOUND, "bitsandbytes weight '%s': not in the checkpoint", weight_name);
    int nf4 = has_tensor(c, k.state[QLORA_QUANT_NF4]), fp4 = has_tensor(c, k.state[QLORA_QUANT_FP4]);
    if (nf4 && fp4)
        return ql_fail(QLORA_ERR_FORMAT, "bitsandbytes weight '%s': both '%s' and '%s' are present", weight_name,
                       k.state[QLORA_QUANT_NF4], k.state[QLORA_QUANT_FP4]);
    if (!nf4 && !fp4)
        return ql_fail(QLORA_ERR_NOT_FOUND, "bitsandbytes weight '%s': no '%s' or '%s' key, so it is not a "
                       "bitsandbytes 4-bit weight", weight_name, k.state[QLORA_QUANT_NF4], k.state[QLORA_QUANT_FP4]);
    qlora_quant_type type = nf4 ? QLORA_QUANT_NF4 : QLORA_QUANT_FP4;
    qlora_tensor blob;
    QL_CHECK(qlora_checkpoint_find(c, k.state[type], &blob));
    ql_bnb_state s = {0};
    QL_CHECK(parse_blob(k.state[type], &blob, type, &s));
    return load_parts(ctx, c, weight_name, &k, &s, out);
}
