/*
 * The memory accountant's reports and the analytic estimator: preset parameter counts against
 * the published totals, the QLoRA paper's memory figures, exact golden values (derived by hand
 * from docs/memory.md), monotonicity, config.json parsing and its errors, the 4-bit storage
 * formula against what qlora_quantize really allocates, and reports against live allocations.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem_estimate.h" /* ql_quant4_bytes, ql_layer_linears, ql_layer_saved_bytes_per_token */
#include "model_internal.h" /* ql_model_config_check_runnable */
#include "testutil.h"

static qlora_model_config preset(const char *name) {
    qlora_model_config cfg;
    ck_assert_qlora_ok(qlora_model_config_preset(name, &cfg));
    return cfg;
}

static qlora_mem_estimate_result estimate(const qlora_model_config *cfg, const qlora_train_settings *s,
                                          qlora_train_regime regime) {
    qlora_mem_estimate_result r;
    ck_assert_qlora_ok(qlora_mem_estimate(cfg, s, regime, &r));
    return r;
}

/* ------------------------------------------------------------------ presets */
START_TEST(preset_parameter_counts_match_published_totals) {
    static const struct {
        const char *name;
        double published; /* model cards / papers */
        uint64_t exact;   /* P_total of docs/memory.md §2, worked out by hand */
    } cases[] = {
        {"llama-7b", 6.74e9, 6738415616ULL},     {"llama-13b", 13.0e9, 13015864320ULL},
        {"llama-33b", 32.5e9, 32528943616ULL},   {"llama-65b", 65.2e9, 65285660672ULL},
        {"llama-2-70b", 69.0e9, 68976648192ULL}, {"llama-3-8b", 8.03e9, 8030261248ULL},
        {"llama-3-70b", 70.6e9, 70553706496ULL}, {"mistral-7b", 7.24e9, 7241732096ULL},
        {"qwen2.5-7b", 7.62e9, 7615616512ULL},
    };
    size_t n = sizeof cases / sizeof cases[0];
    for (size_t i = 0; i < n; i++) {
        qlora_model_config cfg = preset(cases[i].name);
        ck_assert_str_eq(cfg.name, cases[i].name);
        qlora_mem_estimate_result r = estimate(&cfg, NULL, QLORA_REGIME_FULL_16BIT);
        ck_assert_msg(r.params_total == cases[i].exact, "%s: %llu parameters, expected %llu", cases[i].name,
                      (unsigned long long)r.params_total, (unsigned long long)cases[i].exact);
        double rel = fabs((double)r.params_total - cases[i].published) / cases[i].published;
        ck_assert_msg(rel < 0.005, "%s: %llu vs published %.4g (%.3f%%)", cases[i].name,
                      (unsigned long long)r.params_total, cases[i].published, 100 * rel);
        ck_assert_uint_eq(r.params_trainable, r.params_total);
    }
    /* every preset is listed and nothing more */
    size_t listed = 0;
    while (qlora_model_preset_name(listed))
        listed++;
    ck_assert_uint_eq(listed, n);
    qlora_model_config cfg;
    ck_assert_qlora_fails(qlora_model_config_preset("llama-8b", &cfg), QLORA_ERR_NOT_FOUND, "qwen2.5-7b");
    ck_assert_ptr_nonnull(strstr(qlora_last_error(), "'llama-8b'"));
}
END_TEST

/* ------------------------------------------------------------------ paper figures */
START_TEST(paper_65b_full_finetune_over_780gb_and_qlora_under_48gb) {
    qlora_model_config cfg = preset("llama-65b");
    qlora_train_settings s = qlora_train_default_settings(); /* seq 512, batch 1, r 64, all-linear, ckpt */
    ck_assert_int_eq(s.seq_len, 512);
    ck_assert_int_eq(s.micro_batch, 1);
    ck_assert_int_eq(s.lora_rank, 64);
    ck_assert_int_eq(s.targets, QLORA_TARGETS_ALL_LINEAR);
    ck_assert_int_eq(s.grad_checkpointing, 1);
    qlora_mem_estimate_result full = estimate(&cfg, &s, QLORA_REGIME_FULL_16BIT);
    qlora_mem_estimate_result q = estimate(&cfg, &s, QLORA_REGIME_QLORA);
    ck_assert_msg(full.total > 780000000000ULL, "full finetune %llu", (unsigned long long)full.total);
    ck_assert_msg(q.total < 48000000000ULL, "QLoRA %llu", (unsigned long long)q.total);
    /* 12 bytes per parameter before activations: BF16 weights + BF16 grads + FP32 m and v */
    ck_assert_uint_eq(full.weights + full.gradients + full.optimizer, 12 * full.params_total);
    double saving = (double)full.total / (double)q.total;
    ck_assert_msg(saving > 14 && saving < 20, "saving %.2f", saving);
    /* golden totals of docs/memory.md §6 */
    ck_assert_uint_eq(full.total, 784425003008ULL);
    ck_assert_uint_eq(q.total, 45403252736ULL);
    ck_assert_uint_eq(q.weights, 34458927104ULL);
    ck_assert_uint_eq(q.params_trainable, 799539200ULL);
}
END_TEST

START_TEST(paper_7b_base_model_about_5gb) {
    qlora_model_config cfg = preset("llama-7b");
    qlora_mem_estimate_result q = estimate(&cfg, NULL, QLORA_REGIME_QLORA);
    /* NF4+DQ linear weights + BF16 embeddings/head/norms; the paper's measured 5,048 MB also
     * holds FP32-upcast embeddings and runtime overhead, so it bounds ours from above */
    ck_assert_uint_eq(q.bytes[QLORA_MEM_BASE_WEIGHTS], 3238002688ULL);
    ck_assert_uint_eq(q.bytes[QLORA_MEM_QUANT_STATE], 102768640ULL);
    ck_assert_uint_eq(q.bytes[QLORA_MEM_DENSE_WEIGHTS], 2 * (2ULL * 32000 * 4096 + 65 * 4096));
    ck_assert_msg(q.weights >= 3500000000ULL && q.weights <= 5048000000ULL, "7B 4-bit model %llu bytes",
                  (unsigned long long)q.weights);
    double bits = 8.0 * (double)(q.bytes[QLORA_MEM_BASE_WEIGHTS] + q.bytes[QLORA_MEM_QUANT_STATE]) /
                  (double)q.params_linear;
    ck_assert_msg(bits > 4.1269 && bits < 4.1271, "bits per parameter %.6f", bits);
    ck_assert_uint_eq(q.params_trainable, 159907840ULL); /* r (in + out) over 7 targets x 32 layers */
}
END_TEST

START_TEST(double_quant_saves_about_3gb_on_65b) {
    qlora_model_config cfg = preset("llama-65b");
    ql_linear_shape lin[QL_LINEAR_COUNT];
    ql_layer_linears(&cfg, lin);
    uint64_t with_dq = 0, without = 0;
    for (int i = 0; i < QL_LINEAR_COUNT; i++) {
        uint64_t codes, state_dq, state_plain;
        ql_quant4_bytes(lin[i].out * lin[i].in, 64, 1, &codes, &state_dq);
        ql_quant4_bytes(lin[i].out * lin[i].in, 64, 0, &codes, &state_plain);
        with_dq += (uint64_t)cfg.num_layers * state_dq;
        without += (uint64_t)cfg.num_layers * state_plain;
    }
    double saved = (double)(without - with_dq);
    ck_assert_msg(saved > 2.9e9 && saved < 3.1e9, "double quant saves %.3g bytes", saved);
    qlora_mem_estimate_result q = estimate(&cfg, NULL, QLORA_REGIME_QLORA);
    ck_assert_uint_eq(q.bytes[QLORA_MEM_QUANT_STATE], with_dq);
}
END_TEST

/* The storage formula is what qlora_quantize allocates, as the accountant sees it. */
START_TEST(quant_storage_formula_matches_the_allocator) {
    static const int64_t shapes[][2] = {{64, 64}, {33, 71}, {256, 320}, {1, 16385}, {97, 1031}};
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    qlora_ctx *ctx = NULL;
    ck_assert_qlora_ok(qlora_ctx_create(NULL, &ctx));
    for (int dq = 0; dq <= 1; dq++) {
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
            int64_t n = shapes[i][0] * shapes[i][1];
            float *x = malloc((size_t)n * sizeof *x);
            ck_assert_ptr_nonnull(x);
            tu_fill_normal(&rng, x, n, 0.02f);
            qlora_tensor src;
            ck_assert_qlora_ok(qlora_tensor_init(&src, "w", QLORA_F32, 2, shapes[i], x, QLORA_DEVICE_HOST));
            qlora_quant_params p = qlora_quant_default_params();
            p.double_quant = dq;
            qlora_qtensor q;
            ck_assert_qlora_ok(qlora_quantize(ctx, &src, &p, &q));
            uint64_t codes, state;
            ql_quant4_bytes((uint64_t)n, 64, dq, &codes, &state);
            qlora_mem_stats st;
            ck_assert_qlora_ok(qlora_mem_get_stats(ctx, &st));
            ck_assert_uint_eq(st.current[0][QLORA_MEM_BASE_WEIGHTS], codes);
            ck_assert_uint_eq(st.current[0][QLORA_MEM_QUANT_STATE], state);
            ck_assert_uint_eq(qlora_qtensor_nbytes(&q), codes + state);
            qlora_qtensor_free(ctx, &q);
            free(x);
        }
    }
    qlora_ctx_free(ctx);
}
END_TEST

/* ------------------------------------------------------------------ structure */
START_TEST(totals_are_the_sum_of_their_parts) {
    qlora_train_settings s = qlora_train_default_settings();
    for (size_t p = 0; qlora_model_preset_name(p); p++) {
        qlora_model_config cfg = preset(qlora_model_preset_name(p));
        for (int reg = 0; reg < QLORA_REGIME_COUNT; reg++) {
            for (int paged = 0; paged <= 1; paged++) {
                s.page_optimizer = paged;
                qlora_mem_estimate_result r = estimate(&cfg, &s, (qlora_train_regime)reg);
                uint64_t sum = 0;
                for (int c = 0; c < QLORA_MEM_CATEGORY_COUNT; c++)
                    sum += r.bytes[c];
                ck_assert_uint_eq(sum, r.total);
                ck_assert_uint_eq(r.weights + r.trainable + r.gradients + r.optimizer + r.activations, r.total);
                ck_assert_uint_eq(r.optimizer, 8 * r.params_trainable);
                ck_assert_uint_eq(r.bytes[paged ? QLORA_MEM_OPTIMIZER_DEVICE : QLORA_MEM_OPTIMIZER_HOST], 0);
                ck_assert_uint_eq(r.device_total, r.total - r.bytes[QLORA_MEM_OPTIMIZER_HOST]);
                ck_assert_uint_gt(r.bytes[QLORA_MEM_CHECKPOINTS], 0);
                ck_assert_uint_eq(r.bytes[QLORA_MEM_MASTER_WEIGHTS], 0);
            }
        }
    }
    ck_assert_str_eq(qlora_train_regime_name(QLORA_REGIME_FULL_16BIT), "full_finetune_16bit");
    ck_assert_str_eq(qlora_train_regime_name(QLORA_REGIME_LORA_16BIT), "lora_16bit");
    ck_assert_str_eq(qlora_train_regime_name(QLORA_REGIME_QLORA), "qlora");
    ck_assert_str_eq(qlora_train_regime_name(QLORA_REGIME_COUNT), "invalid");
}
END_TEST

START_TEST(regimes_order_and_master_weights) {
    qlora_train_settings s = qlora_train_default_settings();
    for (size_t p = 0; qlora_model_preset_name(p); p++) {
        qlora_model_config cfg = preset(qlora_model_preset_name(p));
        qlora_mem_estimate_result full = estimate(&cfg, &s, QLORA_REGIME_FULL_16BIT);
        qlora_mem_estimate_result lora = estimate(&cfg, &s, QLORA_REGIME_LORA_16BIT);
        qlora_mem_estimate_result q = estimate(&cfg, &s, QLORA_REGIME_QLORA);
        ck_assert_uint_gt(full.total, lora.total);
        ck_assert_uint_gt(lora.total, q.total);
        ck_assert_uint_eq(lora.params_trainable, q.params_trainable);
        ck_assert_uint_eq(lora.bytes[QLORA_MEM_DENSE_WEIGHTS], q.bytes[QLORA_MEM_DENSE_WEIGHTS]);
        ck_assert_uint_eq(full.trainable, 0); /* trained in place */
        s.master_weights = 1;
        qlora_mem_estimate_result fm = estimate(&cfg, &s, QLORA_REGIME_FULL_16BIT);
        ck_assert_uint_eq(fm.trainable, 4 * full.params_total);
        ck_assert_uint_eq(fm.total, full.total + 4 * full.params_total);
        s.master_weights = 0;
    }
}
END_TEST

START_TEST(estimates_grow_with_seq_batch_and_rank) {
    static const char *const models[] = {"llama-7b", "mistral-7b", "qwen2.5-7b"};
    for (size_t m = 0; m < sizeof models / sizeof models[0]; m++) {
        qlora_model_config cfg = preset(models[m]);
        for (int reg = 0; reg < QLORA_REGIME_COUNT; reg++) {
            qlora_train_settings s = qlora_train_default_settings();
            uint64_t prev = 0;
            for (int64_t seq = 128; seq <= 8192; seq *= 2) {
                s.seq_len = seq;
                uint64_t t = estimate(&cfg, &s, (qlora_train_regime)reg).total;
                ck_assert_uint_gt(t, prev);
                prev = t;
            }
            s = qlora_train_default_settings();
            prev = 0;
            for (int64_t b = 1; b <= 32; b *= 2) {
                s.micro_batch = b;
                uint64_t t = estimate(&cfg, &s, (qlora_train_regime)reg).total;
                ck_assert_uint_gt(t, prev);
                prev = t;
            }
            s = qlora_train_default_settings();
            qlora_mem_estimate_result r_lo, r_hi;
            s.lora_rank = 8;
            r_lo = estimate(&cfg, &s, (qlora_train_regime)reg);
            s.lora_rank = 128;
            r_hi = estimate(&cfg, &s, (qlora_train_regime)reg);
            if (reg == QLORA_REGIME_FULL_16BIT) {
                ck_assert_uint_eq(r_hi.total, r_lo.total); /* no adapters */
            } else {
                ck_assert_uint_gt(r_hi.total, r_lo.total);
                ck_assert_uint_eq(r_hi.params_trainable, 16 * r_lo.params_trainable); /* linear in r */
            }
            /* checkpointing trades activations for recomputation: never more */
            s = qlora_train_default_settings();
            qlora_mem_estimate_result on = estimate(&cfg, &s, (qlora_train_regime)reg);
            s.grad_checkpointing = 0;
            qlora_mem_estimate_result off = estimate(&cfg, &s, (qlora_train_regime)reg);
            ck_assert_uint_lt(on.activations, off.activations);
            ck_assert_uint_eq(off.bytes[QLORA_MEM_CHECKPOINTS], 0);
            ck_assert_uint_eq(on.total - on.activations, off.total - off.activations);
            /* attention-only adapters train fewer parameters than all-linear */
            s = qlora_train_default_settings();
            s.targets = QLORA_TARGETS_ATTENTION;
            qlora_mem_estimate_result attn = estimate(&cfg, &s, (qlora_train_regime)reg);
            if (reg == QLORA_REGIME_FULL_16BIT)
                ck_assert_uint_eq(attn.total, on.total);
            else
                ck_assert_uint_lt(attn.params_trainable, on.params_trainable);
        }
    }
}
END_TEST

START_TEST(layer_activation_formula_golden) {
    qlora_train_settings s = qlora_train_default_settings();
    qlora_model_config c7 = preset("llama-7b"), c65 = preset("llama-65b");
    /* docs/memory.md §5: 2 (4H + 2q + 2kv + 3I + 7r) + 8 + 4 nh */
    ck_assert_uint_eq(ql_layer_saved_bytes_per_token(&c7, &s, QLORA_REGIME_QLORA), 132616);
    ck_assert_uint_eq(ql_layer_saved_bytes_per_token(&c65, &s, QLORA_REGIME_QLORA), 264328);
    /* full finetuning keeps the same inputs but no adapter outputs */
    ck_assert_uint_eq(ql_layer_saved_bytes_per_token(&c7, &s, QLORA_REGIME_FULL_16BIT), 132616 - 2 * 7 * 64);
    /* attention-only LoRA: the MLP's inputs n2 and silu(gate)*up are no longer needed */
    s.targets = QLORA_TARGETS_ATTENTION;
    ck_assert_uint_eq(ql_layer_saved_bytes_per_token(&c7, &s, QLORA_REGIME_QLORA),
                      132616 - 2 * (4096 + 11008) - 2 * 3 * 64);
    /* checkpointing: each layer's input for all layers + one recomputed layer */
    s = qlora_train_default_settings();
    qlora_mem_estimate_result r = estimate(&c7, &s, QLORA_REGIME_QLORA);
    ck_assert_uint_eq(r.bytes[QLORA_MEM_CHECKPOINTS], 512ULL * 32 * 2 * 4096);
    ck_assert_uint_eq(r.bytes[QLORA_MEM_ACTIVATIONS], 512ULL * (132616 - 2 * 4096) + 512ULL * (2 * 4096 + 4 + 8));
    ck_assert_uint_eq(r.bytes[QLORA_MEM_WORKSPACE],
                      512ULL * 32000 * 6 + 512ULL * 2 * (4096 + 4096 + 3 * 11008) + 2ULL * 11008 * 4096);
}
END_TEST

START_TEST(bad_settings_are_rejected) {
    qlora_model_config cfg = preset("llama-65b");
    qlora_mem_estimate_result r;
    qlora_train_settings s = qlora_train_default_settings();
    s.seq_len = 0;
    ck_assert_qlora_fails(qlora_mem_estimate(&cfg, &s, QLORA_REGIME_QLORA, &r), QLORA_ERR_INVALID_ARG, "seq_len");
    s = qlora_train_default_settings();
    s.lora_rank = -4;
    ck_assert_qlora_fails(qlora_mem_estimate(&cfg, &s, QLORA_REGIME_QLORA, &r), QLORA_ERR_INVALID_ARG, "lora_rank");
    s = qlora_train_default_settings();
    s.adapter_dtype = QLORA_NF4;
    ck_assert_qlora_fails(qlora_mem_estimate(&cfg, &s, QLORA_REGIME_QLORA, &r), QLORA_ERR_INVALID_ARG,
                          "adapter_dtype");
    s = qlora_train_default_settings();
    s.optimizer_state_bytes = 17;
    ck_assert_qlora_fails(qlora_mem_estimate(&cfg, &s, QLORA_REGIME_QLORA, &r), QLORA_ERR_INVALID_ARG,
                          "optimizer_state_bytes");
    ck_assert_qlora_fails(qlora_mem_estimate(&cfg, NULL, (qlora_train_regime)7, &r), QLORA_ERR_INVALID_ARG,
                          "regime");
    /* the largest allowed tokens per micro-batch without checkpointing overflow 64 bits */
    s = qlora_train_default_settings();
    s.seq_len = 1LL << 24;
    s.micro_batch = 65536;
    s.grad_checkpointing = 0;
    ck_assert_qlora_fails(qlora_mem_estimate(&cfg, &s, QLORA_REGIME_QLORA, &r), QLORA_ERR_INVALID_ARG, "overflows");
    qlora_model_config bad = cfg;
    bad.num_kv_heads = 24;
    ck_assert_qlora_fails(qlora_mem_estimate(&bad, NULL, QLORA_REGIME_QLORA, &r), QLORA_ERR_INVALID_ARG,
                          "num_key_value_heads");
    bad = cfg;
    bad.hidden_size = 0;
    ck_assert_qlora_fails(qlora_model_config_validate(&bad), QLORA_ERR_INVALID_ARG, "hidden_size");
    bad = cfg;
    bad.intermediate_size = 4000000;
    bad.num_layers = 9999;
    bad.hidden_size = 1000000;
    ck_assert_qlora_fails(qlora_model_config_validate(&bad), QLORA_ERR_INVALID_ARG, "10^14");
}
END_TEST

/* ------------------------------------------------------------------ config.json */
static char *write_config(const char *dir, const char *name, const char *json) {
    char *path = malloc(strlen(dir) + strlen(name) + 2);
    ck_assert_ptr_nonnull(path);
    sprintf(path, "%s/%s", dir, name);
    tu_write_file(path, json, strlen(json));
    return path;
}

START_TEST(config_json_transformers_4_and_5) {
    char *dir = tu_tempdir();
    /* transformers 4.x, Llama 3 8B as shipped (no head_dim, top-level rope_theta) */
    char *p4 = write_config(dir, "llama3.json",
                            "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, "
                            "\"hidden_size\": 4096, \"intermediate_size\": 14336, \"model_type\": \"llama\", "
                            "\"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"num_key_value_heads\": 8, "
                            "\"rope_scaling\": null, \"rope_theta\": 500000.0, \"tie_word_embeddings\": false, "
                            "\"torch_dtype\": \"bfloat16\", \"vocab_size\": 128256}");
    qlora_model_config cfg, ref = preset("llama-3-8b");
    ck_assert_qlora_ok(qlora_model_config_from_json_file(p4, &cfg));
    ck_assert_int_eq(cfg.head_dim, 128);
    ck_assert_int_eq(cfg.num_kv_heads, 8);
    ck_assert(cfg.rope_theta == 500000.0);
    ck_assert_ptr_nonnull(strstr(cfg.name, "llama3.json"));
    qlora_mem_estimate_result a = estimate(&cfg, NULL, QLORA_REGIME_QLORA);
    qlora_mem_estimate_result b = estimate(&ref, NULL, QLORA_REGIME_QLORA);
    ck_assert_mem_eq(&a, &b, sizeof a);

    /* transformers 5.x: rope_parameters and dtype; explicit head_dim != H / nh; tied embeddings */
    char *p5 = write_config(dir, "v5.json",
                            "{\"dtype\": \"bfloat16\", \"head_dim\": 160, \"hidden_size\": 2560, "
                            "\"intermediate_size\": 9728, \"model_type\": \"llama\", \"num_attention_heads\": 32, "
                            "\"num_hidden_layers\": 4, \"num_key_value_heads\": 8, \"rope_parameters\": "
                            "{\"rope_type\": \"default\", \"rope_theta\": 1000000.0}, \"tie_word_embeddings\": true, "
                            "\"vocab_size\": 1000}");
    ck_assert_qlora_ok(qlora_model_config_from_json_file(p5, &cfg));
    ck_assert_int_eq(cfg.head_dim, 160);
    ck_assert(cfg.rope_theta == 1000000.0);
    ck_assert_int_eq(cfg.tie_word_embeddings, 1);
    a = estimate(&cfg, NULL, QLORA_REGIME_FULL_16BIT);
    uint64_t per_layer = 2ULL * 2560 * 5120 + 2ULL * 2560 * 1280 + 3ULL * 2560 * 9728;
    ck_assert_uint_eq(a.params_linear, 4 * per_layer);
    ck_assert_uint_eq(a.params_total, 4 * per_layer + 1000ULL * 2560 + 9ULL * 2560); /* no lm_head */

    /* Qwen2: q/k/v bias without a flag; num_key_value_heads null means no GQA */
    char *pq = write_config(dir, "qwen2.json",
                            "{\"model_type\": \"qwen2\", \"hidden_size\": 3584, \"intermediate_size\": 18944, "
                            "\"num_hidden_layers\": 28, \"num_attention_heads\": 28, \"num_key_value_heads\": 4, "
                            "\"vocab_size\": 152064, \"tie_word_embeddings\": false, \"rope_theta\": 1000000.0}");
    ck_assert_qlora_ok(qlora_model_config_from_json_file(pq, &cfg));
    ck_assert_int_eq(cfg.qkv_bias, 1);
    ck_assert_int_eq(cfg.o_bias, 0);
    ref = preset("qwen2.5-7b");
    ck_assert_uint_eq(estimate(&cfg, NULL, QLORA_REGIME_QLORA).total, estimate(&ref, NULL, QLORA_REGIME_QLORA).total);
    char *pn = write_config(dir, "nullkv.json",
                            "{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, "
                            "\"num_attention_heads\": 4, \"num_key_value_heads\": null, \"head_dim\": null, "
                            "\"vocab_size\": 100, \"attention_bias\": true}");
    ck_assert_qlora_ok(qlora_model_config_from_json_file(pn, &cfg));
    ck_assert_int_eq(cfg.num_kv_heads, 4);
    ck_assert_int_eq(cfg.head_dim, 16);
    ck_assert_int_eq(cfg.qkv_bias, 1);
    ck_assert_int_eq(cfg.o_bias, 1);
    ck_assert(cfg.rope_theta == 0.0);
    /* multimodal wrapper: the language model's config under text_config */
    char *pm = write_config(dir, "mm.json",
                            "{\"model_type\": \"llava\", \"vision_config\": {\"hidden_size\": 1024}, "
                            "\"text_config\": {\"model_type\": \"mistral\", \"hidden_size\": 4096, "
                            "\"intermediate_size\": 14336, \"num_hidden_layers\": 32, \"num_attention_heads\": 32, "
                            "\"num_key_value_heads\": 8, \"vocab_size\": 32000}}");
    ck_assert_qlora_ok(qlora_model_config_from_json_file(pm, &cfg));
    ref = preset("mistral-7b");
    ck_assert_uint_eq(estimate(&cfg, NULL, QLORA_REGIME_FULL_16BIT).params_total,
                      estimate(&ref, NULL, QLORA_REGIME_FULL_16BIT).params_total);
    free(p4);
    free(p5);
    free(pq);
    free(pn);
    free(pm);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* The fields the forward reads come from the same parse; what the forward cannot run is still
 * estimable and refused only by ql_model_config_check_runnable. */
START_TEST(config_json_forward_fields_and_runnable_check) {
    char *dir = tu_tempdir();
    const char *shape = "\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, "
                        "\"num_attention_heads\": 4, \"vocab_size\": 100, ";
    char json[1024];
    snprintf(json, sizeof json, "{%s\"model_type\": \"llama\", \"rms_norm_eps\": 1e-05, \"hidden_act\": "
             "\"silu\", \"rope_scaling\": {\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": "
             "4.0, \"original_max_position_embeddings\": 8192, \"rope_type\": \"llama3\"}}", shape);
    char *p31 = write_config(dir, "llama31.json", json);
    qlora_model_config cfg;
    ck_assert_qlora_ok(qlora_model_config_from_json_file(p31, &cfg));
    ck_assert(cfg.rms_norm_eps == 1e-5);
    ck_assert_int_eq(cfg.rope.type, QLORA_ROPE_LLAMA3);
    ck_assert(cfg.rope.factor == 8.0 && cfg.rope.low_freq_factor == 1.0 && cfg.rope.high_freq_factor == 4.0);
    ck_assert_int_eq(cfg.rope.original_max_position_embeddings, 8192);
    ck_assert_str_eq(cfg.model_type, "llama");
    ck_assert_int_eq(cfg.sliding_window, 0);
    ck_assert_qlora_ok(ql_model_config_check_runnable(p31, &cfg));

    struct { const char *extra, *needle; } refused[] = {
        {"\"model_type\": \"mistral\", \"sliding_window\": 4096", "'sliding_window' is 4096"},
        {"\"model_type\": \"qwen2\", \"sliding_window\": 512, \"use_sliding_window\": true", "use_sliding_window"},
        {"\"model_type\": \"llama\", \"hidden_act\": \"gelu\"", "'hidden_act' is 'gelu'"},
        {"\"model_type\": \"llama\", \"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4.0}", "'yarn'"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        snprintf(json, sizeof json, "{%s%s}", shape, refused[i].extra);
        char *p = write_config(dir, "refused.json", json);
        ck_assert_qlora_ok(qlora_model_config_from_json_file(p, &cfg)); /* estimable */
        ck_assert_int_eq(cfg.rms_norm_eps == 1e-6, 1);                  /* LlamaConfig's default */
        ck_assert_qlora_fails(ql_model_config_check_runnable(p, &cfg), QLORA_ERR_UNSUPPORTED, refused[i].needle);
        free(p);
    }
    /* Qwen2 keeps a window size that is unused while use_sliding_window is false */
    snprintf(json, sizeof json, "{%s\"model_type\": \"qwen2\", \"sliding_window\": 131072, "
             "\"use_sliding_window\": false}", shape);
    char *pq = write_config(dir, "qwen.json", json);
    ck_assert_qlora_ok(qlora_model_config_from_json_file(pq, &cfg));
    ck_assert_int_eq(cfg.sliding_window, 0);
    ck_assert_qlora_ok(ql_model_config_check_runnable(pq, &cfg));

    /* presets carry the published epsilon and RoPE (Llama 3.0: no scaling) */
    struct { const char *name; double eps, theta; int64_t window; } presets[] = {
        {"llama-7b", 1e-6, 10000.0, 0},      {"llama-2-70b", 1e-5, 10000.0, 0},
        {"llama-3-8b", 1e-5, 500000.0, 0},   {"mistral-7b", 1e-5, 10000.0, 4096},
        {"qwen2.5-7b", 1e-6, 1000000.0, 0},
    };
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        qlora_model_config c = preset(presets[i].name);
        ck_assert_msg(c.rms_norm_eps == presets[i].eps && c.rope_theta == presets[i].theta, "%s", presets[i].name);
        ck_assert_int_eq(c.rope.type, QLORA_ROPE_DEFAULT);
        ck_assert_str_eq(c.hidden_act, "silu");
        ck_assert_int_eq(c.sliding_window, presets[i].window);
    }
    free(p31);
    free(pq);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(config_json_errors_name_the_file_and_field) {
    static const struct {
        const char *json;
        qlora_status status;
        const char *needle;
    } cases[] = {
        {"{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4}",
         QLORA_ERR_FORMAT, "missing field 'vocab_size'"},
        {"{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 0, "
         "\"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "'num_attention_heads' must be > 0"},
        {"{\"hidden_size\": 4000, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 3, "
         "\"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "not divisible"},
        {"{\"hidden_size\": 1000000000, \"intermediate_size\": 128, \"num_hidden_layers\": 2, "
         "\"num_attention_heads\": 4, \"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "hidden_size = 1000000000 is absurdly large"},
        {"{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": -2, \"num_attention_heads\": 4, "
         "\"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "num_hidden_layers must be > 0"},
        {"{\"hidden_size\": \"4096\", \"intermediate_size\": 128, \"num_hidden_layers\": 2, "
         "\"num_attention_heads\": 4, \"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "'hidden_size' must be an integer"},
        {"{\"hidden_size\": 64.5, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
         "\"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "'hidden_size' must be an integer"},
        {"{\"hidden_size\": 64, \"intermediate_size\": null, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
         "\"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "null field 'intermediate_size'"},
        {"{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
         "\"num_key_value_heads\": 3, \"vocab_size\": 10}",
         QLORA_ERR_FORMAT, "num_key_value_heads 3 must divide"},
        {"{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
         "\"vocab_size\": 10, \"tie_word_embeddings\": \"yes\"}",
         QLORA_ERR_FORMAT, "'tie_word_embeddings' must be true or false"},
        {"{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
         "\"vocab_size\": 10, \"rope_parameters\": {\"rope_theta\": -1}}",
         QLORA_ERR_FORMAT, "'rope_parameters.rope_theta' must be a positive number"},
        {"{\"model_type\": \"gpt2\", \"n_embd\": 768}", QLORA_ERR_UNSUPPORTED, "model_type 'gpt2'"},
        {"{\"hidden_size\": 64,", QLORA_ERR_FORMAT, "not valid JSON"},
        {"{\"hidden_size\": 64} trailing", QLORA_ERR_FORMAT, "not valid JSON"},
        {"[1, 2]", QLORA_ERR_FORMAT, "not a JSON object"},
    };
    char *dir = tu_tempdir();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "bad%zu.json", i);
        char *path = write_config(dir, name, cases[i].json);
        qlora_model_config cfg;
        ck_assert_qlora_fails(qlora_model_config_from_json_file(path, &cfg), cases[i].status, cases[i].needle);
        ck_assert_msg(strstr(qlora_last_error(), path) != NULL, "error '%s' does not name %s", qlora_last_error(),
                      path);
        free(path);
    }
    char *missing = write_config(dir, "present.json", "{}");
    strcpy(missing + strlen(missing) - strlen("present.json"), "absent.json");
    qlora_model_config cfg;
    ck_assert_qlora_fails(qlora_model_config_from_json_file(missing, &cfg), QLORA_ERR_NOT_FOUND, "absent.json");
    free(missing);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

/* ------------------------------------------------------------------ the accountant's reports */
static cJSON *report_json(qlora_ctx *ctx) {
    size_t need = 0;
    ck_assert_qlora_ok(qlora_mem_report_json(ctx, NULL, 0, &need));
    char *buf = malloc(need);
    ck_assert_ptr_nonnull(buf);
    size_t again = 0;
    ck_assert_qlora_ok(qlora_mem_report_json(ctx, buf, need, &again));
    ck_assert_uint_eq(again, need);
    ck_assert_uint_eq(strlen(buf) + 1, need);
    cJSON *root = cJSON_Parse(buf);
    ck_assert_msg(root != NULL, "report is not JSON: %s", buf);
    free(buf);
    return root;
}

static uint64_t json_u64(const cJSON *obj, const char *a, const char *b, const char *c) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, a);
    if (b)
        v = cJSON_GetObjectItemCaseSensitive(v, b);
    if (c)
        v = cJSON_GetObjectItemCaseSensitive(v, c);
    ck_assert_msg(cJSON_IsNumber(v), "no number at %s.%s.%s", a, b ? b : "", c ? c : "");
    return (uint64_t)v->valuedouble;
}

START_TEST(reports_match_live_allocations) {
    tu_backend bs[4];
    int nb = tu_backends(bs);
    tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    for (int bk = 0; bk < nb; bk++) {
        qlora_ctx *ctx = tu_ctx(&bs[bk]);
        int cuda = qlora_ctx_backend(ctx) == QLORA_BACKEND_CUDA;
        enum { N = 60 };
        void *p[N];
        uint64_t expect[2][QLORA_MEM_CATEGORY_COUNT] = {{0}};
        for (int i = 0; i < N; i++) {
            size_t bytes = 1 + (size_t)(tu_uniform(&rng) * 200000);
            int on_device = i % 3 != 0;
            qlora_mem_category cat = (qlora_mem_category)(i % QLORA_MEM_CATEGORY_COUNT);
            ck_assert_qlora_ok(qlora_alloc(ctx, bytes, on_device, cat, &p[i]));
            expect[cuda && on_device ? 1 : 0][cat] += bytes;
        }
        cJSON *root = report_json(ctx);
        uint64_t sum[2] = {0, 0};
        for (int c = 0; c < QLORA_MEM_CATEGORY_COUNT; c++) {
            const char *name = qlora_mem_category_name((qlora_mem_category)c);
            for (int loc = 0; loc < 2; loc++) {
                const char *where = loc ? "device" : "host";
                ck_assert_uint_eq(json_u64(cJSON_GetObjectItem(root, "categories"), name, where, "current"),
                                  expect[loc][c]);
                ck_assert_uint_eq(json_u64(cJSON_GetObjectItem(root, "categories"), name, where, "peak"),
                                  expect[loc][c]);
                sum[loc] += expect[loc][c];
            }
        }
        ck_assert_uint_eq(json_u64(root, "total", "host", "current"), sum[0]);
        ck_assert_uint_eq(json_u64(root, "total", "device", "current"), sum[1]);
        ck_assert_uint_eq(json_u64(root, "live_allocations", NULL, NULL), N);
        ck_assert_str_eq(cJSON_GetObjectItem(root, "backend")->valuestring, cuda ? "cuda" : "cpu");
        const cJSON *dm = cJSON_GetObjectItem(root, "device_memory");
        if (cuda) {
            ck_assert_ptr_nonnull(dm);
            ck_assert_uint_eq(json_u64(dm, "tracked", NULL, NULL), sum[1]);
            ck_assert_uint_ge(json_u64(dm, "used", NULL, NULL), sum[1]);
            qlora_mem_device_info info;
            ck_assert_qlora_ok(qlora_mem_device_info_get(ctx, &info));
            ck_assert_int_eq(info.available, 1);
            ck_assert_uint_eq(info.used_bytes, info.total_bytes - info.free_bytes);
            ck_assert_int_eq(info.untracked_bytes, (int64_t)info.used_bytes - (int64_t)sum[1]);
        } else {
            ck_assert_ptr_null(dm);
            qlora_mem_device_info info;
            ck_assert_qlora_ok(qlora_mem_device_info_get(ctx, &info));
            ck_assert_int_eq(info.available, 0);
            ck_assert_uint_eq(info.total_bytes, 0);
        }
        cJSON_Delete(root);

        /* the text report: every category, the totals in exact bytes; snprintf-style sizing */
        size_t need = 0;
        ck_assert_qlora_ok(qlora_mem_report_text(ctx, NULL, 0, &need));
        char *text = malloc(need);
        ck_assert_ptr_nonnull(text);
        size_t again = 0;
        ck_assert_qlora_ok(qlora_mem_report_text(ctx, text, need, &again));
        ck_assert_uint_eq(again, need);
        for (int c = 0; c < QLORA_MEM_CATEGORY_COUNT; c++)
            ck_assert_msg(strstr(text, qlora_mem_category_name((qlora_mem_category)c)) != NULL, "%s", text);
        char line[160];
        snprintf(line, sizeof line, "total bytes: host %llu current", (unsigned long long)sum[0]);
        ck_assert_msg(strstr(text, line) != NULL, "'%s' not in:\n%s", line, text);
        snprintf(line, sizeof line, "device %llu current", (unsigned long long)sum[1]);
        ck_assert_msg(strstr(text, line) != NULL, "'%s' not in:\n%s", line, text);
        char small[16];
        ck_assert_qlora_ok(qlora_mem_report_text(ctx, small, sizeof small, &again));
        ck_assert_uint_eq(again, need);
        ck_assert_uint_eq(strlen(small), sizeof small - 1);
        ck_assert_int_eq(strncmp(small, text, sizeof small - 1), 0);
        free(text);

        /* free everything: back to zero, peaks kept */
        for (int i = 0; i < N; i++)
            qlora_free(ctx, p[i]);
        root = report_json(ctx);
        ck_assert_uint_eq(json_u64(root, "total", "host", "current"), 0);
        ck_assert_uint_eq(json_u64(root, "total", "device", "current"), 0);
        ck_assert_uint_eq(json_u64(root, "total", "host", "peak"), sum[0]);
        ck_assert_uint_eq(json_u64(root, "live_allocations", NULL, NULL), 0);
        for (int c = 0; c < QLORA_MEM_CATEGORY_COUNT; c++)
            ck_assert_uint_eq(json_u64(cJSON_GetObjectItem(root, "categories"),
                                       qlora_mem_category_name((qlora_mem_category)c), "host", "current"),
                              0);
        cJSON_Delete(root);
        ck_assert_qlora_fails(qlora_mem_report_text(ctx, NULL, 5, &need), QLORA_ERR_INVALID_ARG, "buf");
        ck_assert_qlora_fails(qlora_mem_report_json(NULL, NULL, 0, &need), QLORA_ERR_INVALID_ARG, "ctx");
        qlora_ctx_free(ctx);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("mem_estimate");
    TCase *tc = tcase_create("mem_estimate");
    tcase_add_test(tc, preset_parameter_counts_match_published_totals);
    tcase_add_test(tc, paper_65b_full_finetune_over_780gb_and_qlora_under_48gb);
    tcase_add_test(tc, paper_7b_base_model_about_5gb);
    tcase_add_test(tc, double_quant_saves_about_3gb_on_65b);
    tcase_add_test(tc, quant_storage_formula_matches_the_allocator);
    tcase_add_test(tc, totals_are_the_sum_of_their_parts);
    tcase_add_test(tc, regimes_order_and_master_weights);
    tcase_add_test(tc, estimates_grow_with_seq_batch_and_rank);
    tcase_add_test(tc, layer_activation_formula_golden);
    tcase_add_test(tc, bad_settings_are_rejected);
    tcase_add_test(tc, config_json_transformers_4_and_5);
    tcase_add_test(tc, config_json_forward_fields_and_runnable_check);
    tcase_add_test(tc, config_json_errors_name_the_file_and_field);
    tcase_add_test(tc, reports_match_live_allocations);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
