/*
 * The bitsandbytes 4-bit key set: write -> load round trips on every backend (one file and
 * sharded), the quant_state JSON byte for byte as Python's json.dumps writes it, load errors
 * naming the weight and key, and the checkpoint written by the real bitsandbytes
 * (tests/fixtures/bnb_reference.safetensors) read and written back byte for byte.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "testutil.h"

/* ------------------------------------------------------------------ helpers */

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    ck_assert_ptr_nonnull(p);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static qlora_ctx *cpu_ctx(void) {
    qlora_ctx_params p = qlora_ctx_default_params();
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(&p, &ctx));
    return ctx;
}

static size_t elem_size(qlora_dtype d) { return d == QLORA_F32 ? 4 : 2; }

/* Quantizes fresh N(0, 0.02^2) data of the given dtype and shape on a CPU context. */
static void quantize_random(qlora_ctx *ctx, tu_rng *rng, const char *name, qlora_dtype dtype, int ndim,
                            const int64_t *shape, qlora_quant_type type, int blocksize, int dq, qlora_qtensor *q) {
    qlora_tensor src;
    ck_assert_qlora_ok(qlora_tensor_init(&src, name, dtype, ndim, shape, NULL, QLORA_DEVICE_HOST));
    int64_t n = qlora_tensor_numel(&src);
    float *x = malloc((size_t)n * sizeof(float) + 1);
    void *data = malloc((size_t)n * elem_size(dtype) + 1);
    ck_assert(x && data);
    tu_fill_normal(rng, x, n, 0.02f);
    for (int64_t i = 0; i < n; i++) {
        if (dtype == QLORA_F32)
            ((float *)data)[i] = x[i];
        else if (dtype == QLORA_F16)
            ((uint16_t *)data)[i] = ql_f32_to_f16(x[i]);
        else
            ((uint16_t *)data)[i] = ql_f32_to_bf16(x[i]);
    }
    src.data = data;
    qlora_quant_params p = {.type = type, .blocksize = blocksize, .double_quant = dq};
    ck_assert_qlora_ok(qlora_quantize(ctx, &src, &p, q));
    free(x);
    free(data);
}

static void assert_same_qtensor(const qlora_qtensor *a, const qlora_qtensor *b) {
    ck_assert_int_eq(a->type, b->type);
    ck_assert_int_eq(a->blocksize, b->blocksize);
    ck_assert_int_eq(a->double_quant, b->double_quant);
    ck_assert_int_eq(a->dtype, b->dtype);
    ck_assert_int_eq(a->ndim, b->ndim);
    for (int i = 0; i < a->ndim; i++)
        ck_assert_int_eq(a->shape[i], b->shape[i]);
    ck_assert_int_eq(a->numel, b->numel);
    ck_assert_int_eq(a->nblocks, b->nblocks);
    ck_assert_int_eq(a->nested_nblocks, b->nested_nblocks);
    ck_assert_int_eq(a->device, QLORA_DEVICE_HOST);
    ck_assert_int_eq(b->device, QLORA_DEVICE_HOST);
    ck_assert_mem_eq(a->codes, b->codes, (size_t)(a->numel + 1) / 2);
    ck_assert_mem_eq(a->code, b->code, sizeof a->code);
    if (a->double_quant) {
        ck_assert_mem_eq(a->qabsmax, b->qabsmax, (size_t)a->nblocks);
        ck_assert_mem_eq(a->nested_absmax, b->nested_absmax, (size_t)a->nested_nblocks * sizeof(float));
        ck_assert_uint_eq(ql_f32_bits(a->nested_offset), ql_f32_bits(b->nested_offset));
        ck_assert_mem_eq(a->nested_code, b->nested_code, sizeof a->nested_code);
    } else {
        ck_assert_mem_eq(a->absmax, b->absmax, (size_t)a->nblocks * sizeof(float));
    }
}

/* -------------------------------------------------------------- round trip */

typedef struct rt_case {
    const char *name;
    qlora_quant_type type;
    int blocksize, dq;
    qlora_dtype dtype;
    int ndim;
    int64_t shape[3];
} rt_case;

static const rt_case rt_cases[] = {
    {"model.layers.0.self_attn.q_proj.weight", QLORA_QUANT_NF4, 64, 1, QLORA_BF16, 2, {33, 70}},
    {"model.layers.0.mlp.down_proj.weight", QLORA_QUANT_FP4, 128, 0, QLORA_F16, 2, {5, 77}},
    {"odd.f32.weight", QLORA_QUANT_NF4, 32, 0, QLORA_F32, 3, {3, 3, 3}},
    {"fp4.dq.weight", QLORA_QUANT_FP4, 4096, 1, QLORA_BF16, 2, {300, 70}},
    {"two.nested.blocks.weight", QLORA_QUANT_NF4, 64, 1, QLORA_F32, 1, {257 * 64 + 3}},
};
#define N_RT (sizeof rt_cases / sizeof rt_cases[0])

static void write_cases(const char *path, uint64_t max_shard, const qlora_qtensor *qs) {
    qlora_st_writer *w;
    float bias[3] = {0.5f, -1.0f, 2.0f};
    int64_t nbias = 3;
    ck_assert_qlora_ok(qlora_st_writer_open(path, max_shard, &w));
    for (size_t i = 0; i < N_RT; i++)
        ck_assert_qlora_ok(qlora_bnb_declare(w, rt_cases[i].name, &qs[i]));
    ck_assert_qlora_ok(qlora_st_writer_declare(w, "plain.bias", QLORA_F32, 1, &nbias));
    ck_assert_qlora_ok(qlora_st_writer_write(w, "plain.bias", bias, sizeof bias));
    for (size_t i = N_RT; i-- > 0;)
        ck_assert_qlora_ok(qlora_bnb_write(w, rt_cases[i].name, &qs[i]));
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
}

static void check_key(const qlora_checkpoint *c, const char *weight, const char *suffix, qlora_dtype dtype, int ndim,
                      int64_t d0, int64_t d1) {
    char key[512];
    snprintf(key, sizeof key, "%s%s", weight, suffix);
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_checkpoint_find(c, key, &t));
    ck_assert_msg(t.dtype == dtype, "%s is %s", key, qlora_dtype_name(t.dtype));
    ck_assert_int_eq(t.ndim, ndim);
    ck_assert_int_eq(t.shape[0], d0);
    if (ndim > 1)
        ck_assert_int_eq(t.shape[1], d1);
}

static void check_loads(const char *path, const qlora_qtensor *qs) {
    qlora_checkpoint *c;
    ck_assert_qlora_ok(qlora_checkpoint_open(path, &c));
    ck_assert(!qlora_bnb_is_quantized(c, "plain.bias"));
    ck_assert(!qlora_bnb_is_quantized(c, "absent.weight"));
    for (size_t i = 0; i < N_RT; i++) {
        const qlora_qtensor *q = &qs[i];
        const char *wn = rt_cases[i].name;
        ck_assert(qlora_bnb_is_quantized(c, wn));
        check_key(c, wn, "", QLORA_U8, 2, (q->numel + 1) / 2, 1);
        check_key(c, wn, ".absmax", q->double_quant ? QLORA_U8 : QLORA_F32, 1, q->nblocks, 0);
        check_key(c, wn, ".quant_map", QLORA_F32, 1, 16, 0);
        if (q->double_quant) {
            check_key(c, wn, ".nested_absmax", QLORA_F32, 1, q->nested_nblocks, 0);
            check_key(c, wn, ".nested_quant_map", QLORA_F32, 1, 256, 0);
        }
    }
    tu_backend bs[4];
    int nb = tu_backends(bs);
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        for (size_t i = 0; i < N_RT; i++) {
            qlora_qtensor loaded, host;
            ck_assert_qlora_ok(qlora_bnb_load(ctx, c, rt_cases[i].name, &loaded));
            ck_assert_int_eq(loaded.device, qlora_ctx_device(ctx));
            ck_assert_str_eq(loaded.name, rt_cases[i].name);
            ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &host, &loaded, 0));
            assert_same_qtensor(&qs[i], &host);
            /* The loaded tensor dequantizes on its backend to what the original gives. */
            qlora_tensor out, back, want;
            ck_assert_qlora_ok(qlora_tensor_init(&out, "out", QLORA_F32, loaded.ndim, loaded.shape, NULL,
                                                 QLORA_DEVICE_HOST));
            back = want = out;
            ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &out, 1, QLORA_MEM_WORKSPACE));
            ck_assert_qlora_ok(qlora_tensor_alloc(ctx, &back, 0, QLORA_MEM_WORKSPACE));
            ck_assert_qlora_ok(qlora_dequantize(ctx, &loaded, &out));
            ck_assert_qlora_ok(qlora_tensor_copy(ctx, &back, &out));
            qlora_ctx *ref = cpu_ctx();
            ck_assert_qlora_ok(qlora_tensor_alloc(ref, &want, 0, QLORA_MEM_WORKSPACE));
            ck_assert_qlora_ok(qlora_dequantize(ref, &qs[i], &want));
            ck_assert_mem_eq(back.data, want.data, qlora_tensor_nbytes(&want));
            qlora_tensor_free(ref, &want);
            qlora_ctx_free(ref);
            qlora_tensor_free(ctx, &out);
            qlora_tensor_free(ctx, &back);
            qlora_qtensor_free(ctx, &host);
            qlora_qtensor_free(ctx, &loaded);
        }
        qlora_ctx_free(ctx);
    }
    qlora_checkpoint_close(c);
}

START_TEST(roundtrip_every_backend) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    qlora_ctx *ctx = cpu_ctx();
    qlora_qtensor qs[N_RT];
    for (size_t i = 0; i < N_RT; i++) {
        const rt_case *rc = &rt_cases[i];
        quantize_random(ctx, &rng, rc->name, rc->dtype, rc->ndim, rc->shape, rc->type, rc->blocksize, rc->dq, &qs[i]);
    }
    char *dir = tu_tempdir();
    char *file = path_join(dir, "bnb.safetensors");
    write_cases(file, 0, qs);
    check_loads(file, qs);
    /* Sharded: the key set of one weight may span shards. */
    char *sharded = path_join(dir, "sharded");
    write_cases(sharded, 4096, qs);
    char *index = path_join(sharded, "model.safetensors.index.json");
    FILE *probe = fopen(index, "rb");
    ck_assert_msg(probe != NULL, "expected several shards and an index");
    fclose(probe);
    check_loads(sharded, qs);
    for (size_t i = 0; i < N_RT; i++)
        qlora_qtensor_free(ctx, &qs[i]);
    qlora_ctx_free(ctx);
    free(index);
    free(sharded);
    free(file);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* ---------------------------------------------------------- the JSON blob */

typedef struct blob_case {
    qlora_quant_type type;
    int blocksize;
    qlora_dtype dtype;
    int ndim;
    int64_t shape[3];
    int dq;
    uint32_t offset_bits; /* the float32 nested_offset */
    const char *json;     /* what Python writes: json.dumps of the dict bitsandbytes builds */
} blob_case;

/* Expected texts produced by python3 (json.dumps, the offset as float(np.float32(v))). */
static const blob_case blob_cases[] = {
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 2, {4096, 4096}, 1, 0x3c4985f0u,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [4096, 4096], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.012299999594688416}"},
    {QLORA_QUANT_FP4, 128, QLORA_F16, 2, {7, 3}, 0, 0,
     "{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"float16\", \"shape\": [7, 3]}"},
    {QLORA_QUANT_NF4, 32, QLORA_F32, 1, {5}, 1, 0x3727c5acu,
     "{\"quant_type\": \"nf4\", \"blocksize\": 32, \"dtype\": \"float32\", \"shape\": [5], \"nested_blocksize\": 256, "
     "\"nested_dtype\": \"float32\", \"nested_offset\": 9.999999747378752e-06}"},
    {QLORA_QUANT_FP4, 4096, QLORA_BF16, 3, {2, 3, 4}, 1, 0x41400000u,
     "{\"quant_type\": \"fp4\", \"blocksize\": 4096, \"dtype\": \"bfloat16\", \"shape\": [2, 3, 4], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 12.0}"},
    {QLORA_QUANT_NF4, 64, QLORA_F16, 2, {11, 13}, 1, 0x3dcccccdu,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float16\", \"shape\": [11, 13], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.10000000149011612}"},
    {QLORA_QUANT_NF4, 256, QLORA_BF16, 2, {1, 1}, 1, 0x47f12065u,
     "{\"quant_type\": \"nf4\", \"blocksize\": 256, \"dtype\": \"bfloat16\", \"shape\": [1, 1], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 123456.7890625}"},
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 2, {3, 5}, 1, 0x5a0e1bcau,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 5], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 1.0000000272564224e+16}"},
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 2, {3, 5}, 1, 0x34210fb0u,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 5], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 1.500000053056283e-07}"},
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 2, {3, 5}, 1, 0x7f7fffffu,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 5], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 3.4028234663852886e+38}"},
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 2, {3, 5}, 1, 0x00800000u,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 5], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 1.1754943508222875e-38}"},
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 2, {3, 5}, 1, 0x3901725bu,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 5], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.0001234499941347167}"},
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 2, {3, 5}, 1, 0x00000000u,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [3, 5], "
     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.0}"},
    {QLORA_QUANT_NF4, 2048, QLORA_F32, 2, {0, 4}, 0, 0,
     "{\"quant_type\": \"nf4\", \"blocksize\": 2048, \"dtype\": \"float32\", \"shape\": [0, 4]}"},
    {QLORA_QUANT_NF4, 64, QLORA_BF16, 0, {0}, 1, 0x40200000u,
     "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [], \"nested_blocksize\": 256, "
     "\"nested_dtype\": \"float32\", \"nested_offset\": 2.5}"},
};
#define N_BLOB (sizeof blob_cases / sizeof blob_cases[0])

/* A host qtensor of the case's layout with patterned (non-zero) storage. */
static void patterned_qtensor(qlora_ctx *ctx, const blob_case *bc, const char *name, qlora_qtensor *q) {
    qlora_quant_params p = {.type = bc->type, .blocksize = bc->blocksize, .double_quant = bc->dq};
    ck_assert_qlora_ok(qlora_qtensor_alloc(ctx, q, name, bc->ndim, bc->shape, bc->dtype, &p, 0));
    if (q->numel > 0)
        memset(q->codes, 0x5a, (size_t)(q->numel + 1) / 2);
    if (bc->dq) {
        memset(q->qabsmax, 0x81, (size_t)q->nblocks);
        for (int64_t i = 0; i < q->nested_nblocks; i++)
            q->nested_absmax[i] = 0.25f + (float)i;
        q->nested_offset = ql_bits_f32(bc->offset_bits);
    } else {
        for (int64_t i = 0; i < q->nblocks; i++)
            q->absmax[i] = 0.5f + (float)i;
    }
}

START_TEST(blob_text_is_what_python_writes) {
    qlora_ctx *ctx = cpu_ctx();
    qlora_qtensor qs[N_BLOB];
    char names[N_BLOB][32];
    char *dir = tu_tempdir();
    char *path = path_join(dir, "blobs.safetensors");
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    for (size_t i = 0; i < N_BLOB; i++) {
        snprintf(names[i], sizeof names[i], "w%zu.weight", i);
        patterned_qtensor(ctx, &blob_cases[i], names[i], &qs[i]);
        ck_assert_qlora_ok(qlora_bnb_declare(w, names[i], &qs[i]));
    }
    for (size_t i = 0; i < N_BLOB; i++)
        ck_assert_qlora_ok(qlora_bnb_write(w, names[i], &qs[i]));
    ck_assert_qlora_ok(qlora_st_writer_commit(w));

    qlora_checkpoint *c;
    ck_assert_qlora_ok(qlora_checkpoint_open(path, &c));
    for (size_t i = 0; i < N_BLOB; i++) {
        char key[96];
        snprintf(key, sizeof key, "%s.quant_state.bitsandbytes__%s", names[i], qlora_quant_type_name(blob_cases[i].type));
        qlora_tensor t;
        ck_assert_qlora_ok(qlora_checkpoint_find(c, key, &t));
        size_t n = qlora_tensor_nbytes(&t);
        const char *want = blob_cases[i].json;
        ck_assert_msg(n == strlen(want) && memcmp(t.data, want, n) == 0, "case %zu: wrote %.*s\nexpected %s", i,
                      (int)n, (const char *)t.data, want);
        /* And it loads back to the same state. */
        qlora_qtensor back;
        ck_assert_qlora_ok(qlora_bnb_load(ctx, c, names[i], &back));
        assert_same_qtensor(&qs[i], &back);
        qlora_qtensor_free(ctx, &back);
    }
    qlora_checkpoint_close(c);
    for (size_t i = 0; i < N_BLOB; i++)
        qlora_qtensor_free(ctx, &qs[i]);

    /* A non-finite offset cannot be written as standard JSON. */
    qlora_qtensor bad;
    patterned_qtensor(ctx, &blob_cases[2], "nan.weight", &bad);
    bad.nested_offset = ql_bits_f32(0x7fc00000u);
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    ck_assert_qlora_fails(qlora_bnb_declare(w, "nan.weight", &bad), QLORA_ERR_NON_FINITE, "nan.weight");
    qlora_st_writer_abort(w);
    qlora_qtensor_free(ctx, &bad);
    qlora_ctx_free(ctx);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* ------------------------------------------------------------ load errors */

/* One tensor of a hand-assembled checkpoint. */
typedef struct entry {
    char name[128];
    qlora_dtype dtype;
    int ndim;
    int64_t shape[2];
    const void *data;
    size_t nbytes;
} entry;

#define W "model.layers.3.mlp.up_proj.weight"

static void set_entry(entry *e, const char *suffix, qlora_dtype dtype, int ndim, int64_t d0, int64_t d1,
                      const void *data) {
    snprintf(e->name, sizeof e->name, "%s%s", W, suffix);
    e->dtype = dtype;
    e->ndim = ndim;
    e->shape[0] = d0;
    e->shape[1] = d1;
    e->data = data;
    qlora_tensor t;
    ck_assert_qlora_ok(qlora_tensor_init(&t, e->name, dtype, ndim, e->shape, NULL, QLORA_DEVICE_HOST));
    e->nbytes = qlora_tensor_nbytes(&t);
}

enum { K_W, K_ABSMAX, K_QMAP, K_NABSMAX, K_NQMAP, K_STATE, K_EXTRA, K_COUNT };

/* The valid key set of q (NF4, double quant), with the JSON text given. */
static int valid_entries(const qlora_qtensor *q, const char *json, entry *e) {
    set_entry(&e[K_W], "", QLORA_U8, 2, (q->numel + 1) / 2, 1, q->codes);
    set_entry(&e[K_ABSMAX], ".absmax", QLORA_U8, 1, q->nblocks, 0, q->qabsmax);
    set_entry(&e[K_QMAP], ".quant_map", QLORA_F32, 1, 16, 0, q->code);
    set_entry(&e[K_NABSMAX], ".nested_absmax", QLORA_F32, 1, q->nested_nblocks, 0, q->nested_absmax);
    set_entry(&e[K_NQMAP], ".nested_quant_map", QLORA_F32, 1, 256, 0, q->nested_code);
    set_entry(&e[K_STATE], ".quant_state.bitsandbytes__nf4", QLORA_U8, 1, (int64_t)strlen(json), 0, json);
    return K_STATE + 1;
}

static void write_entries(const char *path, const entry *e, int n) {
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    for (int i = 0; i < n; i++)
        if (e[i].name[0])
            ck_assert_qlora_ok(qlora_st_writer_declare(w, e[i].name, e[i].dtype, e[i].ndim, e[i].shape));
    for (int i = 0; i < n; i++)
        if (e[i].name[0])
            ck_assert_qlora_ok(qlora_st_writer_write(w, e[i].name, e[i].data, e[i].nbytes));
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
}

static qlora_status load_entries(qlora_ctx *ctx, const char *path, const entry *e, int n, qlora_qtensor *out) {
    write_entries(path, e, n);
    qlora_checkpoint *c;
    ck_assert_qlora_ok(qlora_checkpoint_open(path, &c));
    qlora_status st = qlora_bnb_load(ctx, c, W, out);
    qlora_checkpoint_close(c);
    return st;
}

START_TEST(load_rejects_inconsistent_key_sets) {
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    qlora_ctx *ctx = cpu_ctx();
    int64_t shape[2] = {16, 40};
    qlora_qtensor q, out;
    quantize_random(ctx, &rng, W, QLORA_BF16, 2, shape, QLORA_QUANT_NF4, 64, 1, &q);
    char offset[64];
    snprintf(offset, sizeof offset, "%.17g", (double)q.nested_offset);
    char good[512];
    snprintf(good, sizeof good, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": "
             "[16, 40], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": %s}", offset);
    char *dir = tu_tempdir();
    char *path = path_join(dir, "bad.safetensors");
    entry e[K_COUNT];
    memset(e, 0, sizeof e);
    int n = valid_entries(&q, good, e);

    /* The valid set loads, also with the codes labelled as another quant_storage dtype. */
    ck_assert_qlora_ok(load_entries(ctx, path, e, n, &out));
    assert_same_qtensor(&q, &out);
    qlora_qtensor_free(ctx, &out);
    entry m[K_COUNT];
    memcpy(m, e, sizeof e);
    set_entry(&m[K_W], "", QLORA_BF16, 2, (q.numel + 1) / 4, 1, q.codes);
    ck_assert_qlora_ok(load_entries(ctx, path, m, n, &out));
    assert_same_qtensor(&q, &out);
    qlora_qtensor_free(ctx, &out);

    static const struct {
        const char *json; /* replaces the quant_state text */
        const char *needle;
    } bad_json[] = {
        {"{not json", "not valid JSON"},
        {"[1, 2]", "not a JSON object"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, 40], \"foo\": 1}",
         "'foo'"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, 40], "
         "\"nested_blocksize\": 128, \"nested_dtype\": \"float32\", \"nested_offset\": 0.1}", "nested_blocksize"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"bfloat16\", \"shape\": [16, 40]}", "'blocksize'"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64.0, \"dtype\": \"bfloat16\", \"shape\": [16, 40]}", "'blocksize'"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"torch.bfloat16\", \"shape\": [16, 40]}",
         "'dtype'"},
        {"{\"quant_type\": \"nf8\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, 40]}", "'quant_type'"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, -40]}", "'shape'"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\"}", "missing"},
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, 40], "
         "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\"}", "together"},
        {"{\"quant_type\": \"nf4\", \"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
         "\"shape\": [16, 40]}", "twice"},
        {"{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, 40]}",
         "does not match"},
        /* Shape product disagrees with the packed codes. */
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, 41], "
         "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}", "packed codes"},
        /* No nested fields, but the nested tensors (and a U8 absmax) are there. */
        {"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [16, 40]}", ".absmax"},
    };
    for (size_t i = 0; i < sizeof bad_json / sizeof bad_json[0]; i++) {
        memcpy(m, e, sizeof e);
        set_entry(&m[K_STATE], ".quant_state.bitsandbytes__nf4", QLORA_U8, 1, (int64_t)strlen(bad_json[i].json), 0,
                  bad_json[i].json);
        qlora_status st = load_entries(ctx, path, m, n, &out);
        ck_assert_msg(st == QLORA_ERR_FORMAT, "json case %zu: %s: %s", i, qlora_status_string(st), qlora_last_error());
        ck_assert_msg(strstr(qlora_last_error(), bad_json[i].needle) != NULL, "json case %zu: '%s' lacks '%s'", i,
                      qlora_last_error(), bad_json[i].needle);
        ck_assert_msg(strstr(qlora_last_error(), W) != NULL, "json case %zu: '%s' lacks the weight", i,
                      qlora_last_error());
    }

    /* Key-set errors. */
    uint8_t spare[64] = {1};
    memcpy(m, e, sizeof e);
    m[K_STATE].name[0] = '\0';
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_NOT_FOUND, W ".quant_state.bitsandbytes__nf4");
    memcpy(m, e, sizeof e);
    snprintf(m[K_STATE].name, sizeof m[K_STATE].name, "%s.quant_state.bitsandbytes__fp4", W);
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_FORMAT, "does not match");
    memcpy(m, e, sizeof e);
    m[K_EXTRA] = m[K_STATE];
    snprintf(m[K_EXTRA].name, sizeof m[K_EXTRA].name, "%s.quant_state.bitsandbytes__fp4", W);
    ck_assert_qlora_fails(load_entries(ctx, path, m, K_COUNT, &out), QLORA_ERR_FORMAT, "both");
    memcpy(m, e, sizeof e);
    set_entry(&m[K_ABSMAX], ".absmax", QLORA_U8, 1, q.nblocks - 1, 0, q.qabsmax);
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_FORMAT, W ".absmax");
    memcpy(m, e, sizeof e);
    set_entry(&m[K_ABSMAX], ".absmax", QLORA_F32, 1, q.nblocks, 0, spare);
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_FORMAT, W ".absmax");
    memcpy(m, e, sizeof e);
    m[K_NABSMAX].name[0] = '\0';
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_FORMAT, W ".nested_absmax");
    memcpy(m, e, sizeof e);
    set_entry(&m[K_QMAP], ".quant_map", QLORA_F32, 1, 15, 0, q.code);
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_FORMAT, W ".quant_map");
    memcpy(m, e, sizeof e);
    set_entry(&m[K_W], "", QLORA_U8, 2, (q.numel + 1) / 2 - 1, 1, q.codes);
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_FORMAT, "packed codes");
    memcpy(m, e, sizeof e);
    set_entry(&m[K_STATE], ".quant_state.bitsandbytes__nf4", QLORA_I8, 1, (int64_t)strlen(good), 0, good);
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_FORMAT, "U8");
    memcpy(m, e, sizeof e);
    m[K_W].name[0] = '\0';
    ck_assert_qlora_fails(load_entries(ctx, path, m, n, &out), QLORA_ERR_NOT_FOUND, W);
    ck_assert_qlora_fails(qlora_bnb_load(ctx, NULL, W, &out), QLORA_ERR_INVALID_ARG, "c");

    /* The writer side refuses a device tensor and an inconsistent descriptor. */
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
    qlora_qtensor broken = q;
    broken.nblocks++;
    ck_assert_qlora_fails(qlora_bnb_declare(w, W, &broken), QLORA_ERR_SHAPE, W);
    broken = q;
    broken.dtype = QLORA_U8;
    ck_assert_qlora_fails(qlora_bnb_declare(w, W, &broken), QLORA_ERR_DTYPE, W);
    broken = q;
    broken.device = 0;
    ck_assert_qlora_fails(qlora_bnb_write(w, W, &broken), QLORA_ERR_DEVICE, W);
    qlora_st_writer_abort(w);

    qlora_qtensor_free(ctx, &q);
    qlora_ctx_free(ctx);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* ---------------------------------------------- the real bitsandbytes file */

/* Names of the quantized weights in a checkpoint (those with a quant_state key). */
static int bnb_weights(const qlora_checkpoint *c, char names[][256], int max) {
    int n = 0;
    for (size_t i = 0; i < qlora_checkpoint_count(c); i++) {
        const char *key = qlora_checkpoint_name(c, i);
        const char *s = strstr(key, ".quant_state.bitsandbytes__");
        if (s && n < max) {
            snprintf(names[n], 256, "%.*s", (int)(s - key), key);
            n++;
        }
    }
    return n;
}

START_TEST(bitsandbytes_fixture_loads_and_rewrites_identically) {
    /* bnb_reference.safetensors: Linear4bit state dicts saved by bitsandbytes 0.50.2
     * (tests/fixtures/make_bnb_fixtures.py). Loading each weight and writing it back must
     * give the fixture's tensors byte for byte, dtypes and shapes included. */
    qlora_checkpoint *ref;
    ck_assert_qlora_ok(qlora_checkpoint_open(tu_fixture("bnb_reference.safetensors"), &ref));
    char names[32][256];
    int nw = bnb_weights(ref, names, 32);
    ck_assert_int_ge(nw, 4);
    tu_backend bs[4];
    int nb = tu_backends(bs);
    char *dir = tu_tempdir();
    char *path = path_join(dir, "rewritten.safetensors");
    for (int b = 0; b < nb; b++) {
        qlora_ctx *ctx = tu_ctx(&bs[b]);
        qlora_qtensor q[32];
        qlora_st_writer *w;
        ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
        for (int i = 0; i < nw; i++) {
            ck_assert(qlora_bnb_is_quantized(ref, names[i]));
            qlora_qtensor loaded;
            ck_assert_qlora_ok(qlora_bnb_load(ctx, ref, names[i], &loaded));
            ck_assert_qlora_ok(qlora_qtensor_copy(ctx, &q[i], &loaded, 0));
            qlora_qtensor_free(ctx, &loaded);
            ck_assert_qlora_ok(qlora_bnb_declare(w, names[i], &q[i]));
        }
        for (int i = 0; i < nw; i++)
            ck_assert_qlora_ok(qlora_bnb_write(w, names[i], &q[i]));
        ck_assert_qlora_ok(qlora_st_writer_commit(w));

        qlora_checkpoint *ours;
        ck_assert_qlora_ok(qlora_checkpoint_open(path, &ours));
        size_t compared = 0;
        for (size_t k = 0; k < qlora_checkpoint_count(ours); k++) {
            const char *key = qlora_checkpoint_name(ours, k);
            qlora_tensor a, o;
            ck_assert_qlora_ok(qlora_checkpoint_find(ref, key, &a));
            ck_assert_qlora_ok(qlora_checkpoint_find(ours, key, &o));
            ck_assert_msg(a.dtype == o.dtype && a.ndim == o.ndim, "%s: %s/%d vs %s/%d", key,
                          qlora_dtype_name(a.dtype), a.ndim, qlora_dtype_name(o.dtype), o.ndim);
            for (int d = 0; d < a.ndim; d++)
                ck_assert_int_eq(a.shape[d], o.shape[d]);
            ck_assert_uint_eq(qlora_tensor_nbytes(&a), qlora_tensor_nbytes(&o));
            ck_assert_msg(memcmp(a.data, o.data, qlora_tensor_nbytes(&a)) == 0, "%s: bytes differ", key);
            compared++;
        }
        /* Every bitsandbytes key of the fixture was produced (4 or 6 per weight). */
        size_t expected = 0;
        for (size_t k = 0; k < qlora_checkpoint_count(ref); k++)
            for (int i = 0; i < nw; i++)
                if (strncmp(qlora_checkpoint_name(ref, k), names[i], strlen(names[i])) == 0 &&
                    (qlora_checkpoint_name(ref, k)[strlen(names[i])] == '\0' ||
                     qlora_checkpoint_name(ref, k)[strlen(names[i])] == '.'))
                    expected++;
        ck_assert_uint_eq(compared, expected);
        qlora_checkpoint_close(ours);
        for (int i = 0; i < nw; i++)
            qlora_qtensor_free(ctx, &q[i]);
        qlora_ctx_free(ctx);
    }
    qlora_checkpoint_close(ref);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("bnb");
    TCase *tc = tcase_create("keyset");
    tcase_add_test(tc, roundtrip_every_backend);
    tcase_add_test(tc, blob_text_is_what_python_writes);
    tcase_add_test(tc, load_rejects_inconsistent_key_sets);
    tcase_add_test(tc, bitsandbytes_fixture_loads_and_rewrites_identically);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
