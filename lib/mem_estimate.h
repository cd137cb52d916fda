/*
 * Internal contract between the model configuration (model_config.c) and the memory estimator
 * (mem_estimate.c): the shapes of one decoder layer's linear weights, parameter counts, and
 * the exact storage of a 4-bit quantized tensor. The formulas are in docs/memory.md.
 */
#ifndef QLORA_MEM_ESTIMATE_H
#define QLORA_MEM_ESTIMATE_H

#include "qlora.h"

/* The seven linear weights of a decoder layer, in checkpoint order. */
typedef enum ql_linear_id {
    QL_LINEAR_Q = 0,
    QL_LINEAR_K,
    QL_LINEAR_V,
    QL_LINEAR_O,
    QL_LINEAR_GATE,
    QL_LINEAR_UP,
    QL_LINEAR_DOWN,
    QL_LINEAR_COUNT
} ql_linear_id;

typedef struct ql_linear_shape {
    const char *name;   /* "q_proj", ... */
    uint64_t out, in;   /* weight [out, in] */
    int has_bias;       /* bias [out], frozen and 16-bit */
    int attention;      /* 1 for q, k, v, o (a LoRA target of both target sets) */
} ql_linear_shape;

/* Fills out[QL_LINEAR_COUNT] for cfg (not validated: the caller validates first). */
void ql_layer_linears(const qlora_model_config *cfg, ql_linear_shape out[QL_LINEAR_COUNT]);

typedef struct ql_param_counts {
    uint64_t total;
    uint64_t linear;     /* the L * 7 linear weights (what QLoRA quantizes) */
    uint64_t dense;      /* everything else: embedding, lm_head (untied), norms, biases */
    uint64_t embedding;  /* V * H */
    uint64_t lm_head;    /* V * H, or 0 when tied */
    uint64_t norms;      /* (2 L + 1) * H */
    uint64_t biases;
} ql_param_counts;

/* 0 on success, -1 when a count does not fit in 64 bits. */
int ql_model_param_counts(const qlora_model_config *cfg, ql_param_counts *out);

/* Bytes qlora_quantize allocates for a tensor of numel elements: the packed codes
 * ceil(numel / 2) (BASE_WEIGHTS) and the scales (QUANT_STATE): nblocks = ceil(numel /
 * blocksize) float32 absmax, or with double quantization nblocks uint8 + 4 * ceil(nblocks /
 * 256) float32 nested absmax. Equal to qlora_qtensor_nbytes split in two. */
void ql_quant4_bytes(uint64_t numel, int blocksize, int double_quant, uint64_t *codes, uint64_t *state);

/* Saved activations of one decoder layer per token, in bytes (docs/memory.md "Activations"),
 * for a regime (LoRA targets and rank matter unless it is FULL_16BIT). */
uint64_t ql_layer_saved_bytes_per_token(const qlora_model_config *cfg, const qlora_train_settings *s,
                                        qlora_train_regime regime);

#endif
