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
    float rms_norm_eps;
    ql_rope_params rope;
    uint16_t *embed_tokens;   /* [V, H] BF16 */
    uint16_t *final_norm;     /* [H] BF16 */
    uint16_t *lm_head;        /* [V, H] BF16; == embed_tokens when tied */
    ql_decoder_layer *layers; /* [L] */
};

/* What config.json says beyond qlora_model_config: the norm epsilon and the RoPE variant.
 * Unsupported features are QLORA_ERR_UNSUPPORTED naming the file and the field. */
qlora_status ql_model_read_extras(const char *config_path, const qlora_model_config *cfg, float *rms_norm_eps,
                                  ql_rope_params *rope);

#endif
