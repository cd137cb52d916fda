/*
 * The model loads every checkpoint layout it accepts to the same model: tests/fixtures/tiny_llama
 * rewritten (through the public writer) as a sharded checkpoint and as a bitsandbytes 4-bit
 * checkpoint (the linear weights quantized offline, as qlora-quantize or transformers write
 * them) must give the same logits, bit for bit, as the BF16 original quantized while loading:
 * quantization is deterministic, so offline and at-load quantization store the same bytes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

enum { T = 10, V = 128 };

static int is_linear_weight(const char *name) {
    static const char *const proj[] = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "gate_proj.weight", "up_proj.weight", "down_proj.weight"};
    if (!strstr(name, ".layers."))
        return 0;
    for (size_t i = 0; i < sizeof proj / sizeof *proj; i++) {
        size_t n = strlen(name), m = strlen(proj[i]);
        if (n > m && strcmp(name + n - m, proj[i]) == 0)
            return 1;
    }
    return 0;
}

static void copy_config(const char *dst_dir) {
    char src[4096], dst[4096];
    snprintf(src, sizeof src, "%s/config.json", tu_fixture("tiny_llama"));
    snprintf(dst, sizeof dst, "%s/config.json", dst_dir);
    FILE *f = fopen(src, "rb");
    ck_assert_ptr_nonnull(f);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    tu_write_file(dst, buf, n);
}

/* Rewrites tiny_llama into dir: sharded (max_shard_bytes > 0) or with 4-bit linear weights. */
static void rewrite(qlora_ctx *ctx, const char *dir, uint64_t max_shard_bytes, int bnb) {
    qlora_checkpoint *ck;
    ck_assert_qlora_ok(qlora_checkpoint_open(tu_fixture("tiny_llama"), &ck));
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    qlora_st_writer *w;
    ck_assert_qlora_ok(qlora_st_writer_open(max_shard_bytes ? dir : path, max_shard_bytes, &w));
    size_t n = qlora_checkpoint_count(ck);
    qlora_qtensor *q = calloc(n, sizeof *q);
    qlora_quant_params qp = qlora_quant_default_params();
    for (size_t i = 0; i < n; i++) {
        qlora_tensor t;
        const char *name = qlora_checkpoint_name(ck, i);
        ck_assert_qlora_ok(qlora_checkpoint_find(ck, name, &t));
        if (bnb && is_linear_weight(name)) {
            ck_assert_qlora_ok(qlora_quantize(ctx, &t, &qp, &q[i]));
            ck_assert_qlora_ok(qlora_bnb_declare(w, name, &q[i]));
        } else {
            ck_assert_qlora_ok(qlora_st_writer_declare(w, name, t.dtype, t.ndim, t.shape));
        }
    }
    for (size_t i = 0; i < n; i++) {
        qlora_tensor t;
        const char *name = qlora_checkpoint_name(ck, i);
        ck_assert_qlora_ok(qlora_checkpoint_find(ck, name, &t));
        if (bnb && is_linear_weight(name))
            ck_assert_qlora_ok(qlora_bnb_write(w, name, &q[i]));
        else
            ck_assert_qlora_ok(qlora_st_writer_write(w, name, t.data, qlora_tensor_nbytes(&t)));
    }
    ck_assert_qlora_ok(qlora_st_writer_commit(w));
    for (size_t i = 0; i < n; i++)
        if (q[i].numel)
            qlora_qtensor_free(ctx, &q[i]);
    free(q);
    qlora_checkpoint_close(ck);
    copy_config(dir);
}

static void logits_of(qlora_ctx *ctx, const char *dir, float *logits) {
    static const int32_t ids[T] = {1, 7, 99, 23, 5, 64, 127, 0, 42, 3};
    qlora_model *m = NULL;
    qlora_model_load_opts o = qlora_model_load_default_opts();
    o.lora.rank = 0;
    ck_assert_qlora_ok(qlora_model_load(ctx, dir, &o, &m));
    ck_assert_qlora_ok(qlora_model_forward(m, ids, NULL, NULL, T, NULL, NULL, logits));
    qlora_model_free(m);
}

START_TEST(sharded_and_bnb_checkpoints_load_the_same_model) {
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    static float ref[T * V], got[T * V];
    logits_of(ctx, tu_fixture("tiny_llama"), ref);

    char *dir = tu_tempdir();
    rewrite(ctx, dir, 64 * 1024, 0);
    char index[4200];
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(index, "rb");
    ck_assert_msg(f != NULL, "the sharded rewrite has no index");
    fclose(f);
    logits_of(ctx, dir, got);
    ck_assert_mem_eq(got, ref, sizeof ref);
    tu_rmtree(dir);
    free(dir);

    dir = tu_tempdir();
    rewrite(ctx, dir, 0, 1);
    qlora_checkpoint *ck;
    ck_assert_qlora_ok(qlora_checkpoint_open(dir, &ck));
    ck_assert(qlora_bnb_is_quantized(ck, "model.layers.1.mlp.down_proj.weight"));
    qlora_checkpoint_close(ck);
    logits_of(ctx, dir, got);
    ck_assert_mem_eq(got, ref, sizeof ref);
    tu_rmtree(dir);
    free(dir);
    qlora_ctx_free(ctx);
}
END_TEST

/* A checkpoint that disagrees with config.json is refused naming the tensor. */
START_TEST(inconsistent_checkpoints_are_refused) {
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    qlora_checkpoint *ck;
    ck_assert_qlora_ok(qlora_checkpoint_open(tu_fixture("tiny_llama"), &ck));
    char *dir = tu_tempdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    /* every tensor but one, and one with the wrong shape */
    for (int variant = 0; variant < 2; variant++) {
        qlora_st_writer *w;
        ck_assert_qlora_ok(qlora_st_writer_open(path, 0, &w));
        for (int pass = 0; pass < 2; pass++)
            for (size_t i = 0; i < qlora_checkpoint_count(ck); i++) {
                qlora_tensor t;
                const char *name = qlora_checkpoint_name(ck, i);
                ck_assert_qlora_ok(qlora_checkpoint_find(ck, name, &t));
                int target = strcmp(name, "model.layers.1.self_attn.v_proj.weight") == 0;
                if (target && variant == 0)
                    continue;
                int64_t shape[2] = {t.shape[0], t.ndim > 1 ? t.shape[1] : 0};
                if (target)
                    shape[0] /= 2;
                size_t bytes = qlora_tensor_nbytes(&t) / (target ? 2 : 1);
                if (pass == 0)
                    ck_assert_qlora_ok(qlora_st_writer_declare(w, name, t.dtype, t.ndim, shape));
                else
                    ck_assert_qlora_ok(qlora_st_writer_write(w, name, t.data, bytes));
            }
        ck_assert_qlora_ok(qlora_st_writer_commit(w));
        copy_config(dir);
        qlora_model *m = NULL;
        if (variant == 0)
            ck_assert_qlora_fails(qlora_model_load(ctx, dir, NULL, &m), QLORA_ERR_NOT_FOUND,
                                  "model.layers.1.self_attn.v_proj.weight");
        else
            ck_assert_qlora_fails(qlora_model_load(ctx, dir, NULL, &m), QLORA_ERR_SHAPE,
                                  "model.layers.1.self_attn.v_proj.weight");
        ck_assert_ptr_null(m);
    }
    qlora_checkpoint_close(ck);
    tu_rmtree(dir);
    free(dir);
    qlora_ctx_free(ctx);
}
END_TEST

int main(void) {
    Suite *s = suite_create("model_formats");
    TCase *tc = tcase_create("model_formats");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, sharded_and_bnb_checkpoints_load_the_same_model);
    tcase_add_test(tc, inconsistent_checkpoints_are_refused);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
