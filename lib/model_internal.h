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

/* What one decoder layer's forward leaves behind, all [T, ...] BF16 on the context's device
 * (lse float32). Inference needs only the scratch; training keeps all of it for the backward:
 * xn1 = input_norm(h_in), q/k after RoPE, attn (o_proj's input), h_mid = h_in + o (the residual
 * stream between the two blocks), xn2 = post_attention_norm(h_mid), gate/up (before SwiGLU),
 * act = swiglu(gate, up) (down's input), mlp = down's output, and each linear's saved state. */
typedef struct ql_layer_acts {
    uint16_t *xn1, *q, *k, *v, *attn, *o, *h_mid, *xn2, *gate, *up, *act;
    float *lse;
    qlora_linear_saved saved[QL_LINEAR_COUNT];
    void *base;             /* one allocation holding them all */
} ql_layer_acts;

/* The per-token inputs of a batch on the context's device, checked on the host first. */
typedef struct ql_model_batch {
    int64_t T;
    int32_t *tokens, *pos, *seq_start, *labels; /* seq_start / labels NULL when absent */
    ql_rope_table rope;                         /* positions 0 .. max(pos) */
    void *base;
    /* Generation (model_generate.c): the batch is tokens past .. past+T-1 of one sequence; the
     * layers append their keys and values to the cache [L, cache_cap, nkv·d] and attend to it. */
    uint16_t *cache_k, *cache_v;
    int64_t cache_cap, past;
} ql_model_batch;

/* Checks tokens (in [0, V)), positions (given, or t - seq_start[t]; >= 0), seq_start
 * (contiguous sequences) and labels (-100 or in [0, V)) on the host, then copies them to the
 * context's device and builds the RoPE table. `who` prefixes messages. */
qlora_status ql_model_batch_init(qlora_model *m, const char *who, const int32_t *tokens, const int32_t *positions,
                                 const int32_t *seq_start, const int32_t *labels, int64_t T, ql_model_batch *b);
void ql_model_batch_free(qlora_model *m, ql_model_batch *b);

/* Allocates the activations of one layer over T tokens in `category`. */
qlora_status ql_layer_acts_alloc(qlora_model *m, int64_t T, qlora_mem_category category, ql_layer_acts *a);
void ql_layer_acts_free(qlora_model *m, ql_layer_acts *a);

/* Decoder layer `index` on h_in [T, H] -> h_out (may be h_in: updated in place). opts NULL:
 * inference (nothing saved); otherwise training mode with that dropout stream, and every
 * linear's state saved into a->saved for ql_layer_backward (free it with
 * ql_layer_acts_release_saved). */
qlora_status ql_layer_forward(qlora_model *m, int64_t index, const ql_model_batch *b, const uint16_t *h_in,
                              uint16_t *h_out, ql_layer_acts *a, const qlora_linear_fwd_opts *opts);
/* Backward of a training-mode ql_layer_forward whose activations are in a: dh [T, H] holds the
 * gradient of the layer's output and receives that of its input h_in (not computed when
 * need_dh_in is 0: the first layer). Accumulates the enabled adapters' gradients. */
qlora_status ql_layer_backward(qlora_model *m, int64_t index, const ql_model_batch *b, const uint16_t *h_in,
                               ql_layer_acts *a, uint16_t *dh, int need_dh_in);
void ql_layer_acts_release_saved(ql_layer_acts *a);

/* QLORA_ERR_UNSUPPORTED naming config_path and the field when cfg (as parsed from that file)
 * asks for what the forward does not implement: a sliding window, an activation other than
 * silu, a RoPE type other than default, linear and llama3. The estimator accepts such configs. */
qlora_status ql_model_config_check_runnable(const char *config_path, const qlora_model_config *cfg);

#endif
