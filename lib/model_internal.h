/*
 * The loaded Llama-family model (internal): what qlora_model_load fills (model_load.c) and
 * qlora_model_forward reads (model_forward.c).
 */
#ifndef QLORA_MODEL_INTERNAL_H
#define QLORA_MODEL_INTERNAL_H

#include "internal.h"
#include "mem_estimate.h"
#include "model_ops.h"

/* One decoder layer: seven quantized linear layers (order of ql_linear_id) and two norms. */
typedef struct ql_decoder_layer {
    qlora_qtensor weight[QL_LINEAR_COUNT];
    qlora_tensor bias[QL_LINEAR_COUNT];   /* BF16 [out]; data NULL when the layer has none */
    qlora_linear *linear[QL_LINEAR_COUNT];
    uint16_t *input_norm;                 /* [H] BF16 */
    uint16_t *post_attention_norm;        /* [H] BF16 */
} ql_decoder_layer;

struct qlora_model {
    qlora_ctx *ctx;
    qlora_model_config cfg;
    float rms_norm_eps;       /* cfg.rms_norm_eps as the kernels take it */
    ql_rope_params rope;      /* from cfg.rope_theta, cfg.head_dim and cfg.rope */
    uint16_t *embed_tokens;   /* [V, H] BF16 */
    uint16_t *final_norm;     /* [H] BF16 */
    uint16_t *lm_head;        /* [V, H] BF16; == embed_tokens when tied */
    ql_decoder_layer *layers; /* [L] */
};

/* QLORA_ERR_UNSUPPORTED naming config_path and the field when cfg (as parsed from that file)
 * asks for what the forward does not implement: a sliding window, an activation other than
 * silu, a RoPE type other than default, linear and llama3. The estimator accepts such configs. */
qlora_status ql_model_config_check_runnable(const char *config_path, const qlora_model_config *cfg);

#endif
