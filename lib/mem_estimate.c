/*
 * The analytic memory estimator: predicts the accountant's categories for training a
 * Llama-family model in three regimes (16-bit full finetuning, 16-bit LoRA, QLoRA). Every
 * term below is one line of docs/memory.md; keep the two in step.
 */
#include "internal.h"
#include "mem_estimate.h"

#include <string.h>

#define QL_COMPUTE_BYTES 2u        /* activations and frozen 16-bit weights are BF16 */
#define QL_QLORA_BLOCKSIZE 64      /* NF4 blocks of the QLoRA recipe */
#define QL_MAX_SEQ_LEN (1LL << 24)
#define QL_MAX_MICRO_BATCH 65536LL
#define QL_MAX_RANK 65536LL
#define QL_MAX_OPTIMIZER_BYTES 16

qlora_train_settings qlora_train_default_settings(void) {
    qlora_train_settings s;
    memset(&s, 0, sizeof s);
    s.seq_len = 512;
    s.micro_batch = 1;
    s.lora_rank = 64;
    s.targets = QLORA_TARGETS_ALL_LINEAR;
    s.grad_checkpointing = 1;
    s.optimizer_state_bytes = 8;
    s.master_weights = 0;
    s.page_optimizer = 0;
    s.adapter_dtype = QLORA_BF16;
    return s;
}

const char *qlora_train_regime_name(qlora_train_regime regime) {
    switch (regime) {
    case QLORA_REGIME_FULL_16BIT: return "full_finetune_16bit";
    case QLORA_REGIME_LORA_16BIT: return "lora_16bit";
    case QLORA_REGIME_QLORA: return "qlora";
    default: return "invalid";
    }
}

void ql_quant4_bytes(uint64_t numel, int blocksize, int double_quant, uint64_t *codes, uint64_t *state) {
    uint64_t nblocks = (numel + (uint64_t)blocksize - 1) / (uint64_t)blocksize;
    *codes = (numel + 1) / 2;
    *state = double_quant ? nblocks + 4 * ((nblocks + QLORA_NESTED_BLOCKSIZE - 1) / QLORA_NESTED_BLOCKSIZE)
                          : 4 * nblocks;
}

static qlora_status check_settings(const qlora_train_settings *s) {
#define QL_SETTING_RANGE(field, lo, hi)                                                                   \
    do {                                                                                                  \
        if ((long long)s->field < (long long)(lo) || (long long)s->field > (long long)(hi))               \
            return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_mem_estimate: settings." #field " = %lld is out " \
                           "of range [%lld, %lld]", (long long)s->field, (long long)(lo), (long long)(hi)); \
    } while (0)
    QL_SETTING_RANGE(seq_len, 1, QL_MAX_SEQ_LEN);
    QL_SETTING_RANGE(micro_batch, 1, QL_MAX_MICRO_BATCH);
    QL_SETTING_RANGE(lora_rank, 1, QL_MAX_RANK);
    QL_SETTING_RANGE(targets, QLORA_TARGETS_ALL_LINEAR, QLORA_TARGETS_ATTENTION);
    QL_SETTING_RANGE(grad_checkpointing, 0, 1);
    QL_SETTING_RANGE(optimizer_state_bytes, 0, QL_MAX_OPTIMIZER_BYTES);
    QL_SETTING_RANGE(master_weights, 0, 1);
    QL_SETTING_RANGE(page_optimizer, 0, 1);
#undef QL_SETTING_RANGE
    if (s->adapter_dtype != QLORA_BF16 && s->adapter_dtype != QLORA_F16 && s->adapter_dtype != QLORA_F32)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_mem_estimate: settings.adapter_dtype %s is not BF16, F16 or F32",
                       qlora_dtype_name(s->adapter_dtype));
    return QLORA_OK;
}

/* Whether a linear layer carries a LoRA adapter in this regime. */
static int adapted(const qlora_train_settings *s, qlora_train_regime regime, const ql_linear_shape *lin) {
    return regime != QLORA_REGIME_FULL_16BIT && (s->targets == QLORA_TARGETS_ALL_LINEAR || lin->attention);
}

/* A linear layer's input must be kept when some weight gradient needs it: the layer's own
 * (full finetuning) or its adapter's A (LoRA). A frozen weight's backward (dX = dY W) does not. */
static int input_needed(const qlora_train_settings *s, qlora_train_regime regime, const ql_linear_shape *lin) {
    return regime == QLORA_REGIME_FULL_16BIT || adapted(s, regime, lin);
}

uint64_t ql_layer_saved_bytes_per_token(const qlora_model_config *cfg, const qlora_train_settings *s,
                                        qlora_train_regime regime) {
    const uint64_t b = QL_COMPUTE_BYTES, h = (uint64_t)cfg->hidden_size, inter = (uint64_t)cfg->intermediate_size;
    const uint64_t q = (uint64_t)cfg->num_heads * (uint64_t)cfg->head_dim;
    const uint64_t kv = (uint64_t)cfg->num_kv_heads * (uint64_t)cfg->head_dim;
    ql_linear_shape lin[QL_LINEAR_COUNT];
    ql_layer_linears(cfg, lin);
    uint64_t bytes = 0;
    /* attention block */
    bytes += b * h + 4;                                       /* x and the FP32 rstd: input_layernorm backward */
    if (input_needed(s, regime, &lin[QL_LINEAR_Q]) || input_needed(s, regime, &lin[QL_LINEAR_K]) ||
        input_needed(s, regime, &lin[QL_LINEAR_V]))
        bytes += b * h;                                       /* n1 = norm(x): input of q, k, v */
    bytes += b * (q + 2 * kv);                                /* q, k after RoPE, v: attention backward */
    bytes += b * q + 4 * (uint64_t)cfg->num_heads;            /* output O (o_proj's input) + FP32 log-sum-exp */
    /* MLP block */
    bytes += b * h + 4;                                       /* h1 = x + attn and its rstd: norm backward */
    if (input_needed(s, regime, &lin[QL_LINEAR_GATE]) || input_needed(s, regime, &lin[QL_LINEAR_UP]))
        bytes += b * h;                                       /* n2 = norm(h1): input of gate, up */
    bytes += 2 * b * inter;                                   /* gate and up outputs: SiLU and product backward */
    if (input_needed(s, regime, &lin[QL_LINEAR_DOWN]))
        bytes += b * inter;                                   /* silu(gate) * up: input of down */
    /* LoRA: u = A x per adapter (rank r), for the gradient of B; dropout masks are regenerated */
    for (int i = 0; i < QL_LINEAR_COUNT; i++)
        if (adapted(s, regime, &lin[i]))
            bytes += b * (uint64_t)s->lora_rank;
    return bytes;
}

/* Checked 64-bit arithmetic: a flag instead of a silent wrap. */
typedef struct acc {
    int overflow;
} acc;

static uint64_t mul(acc *a, uint64_t x, uint64_t y) {
    uint64_t r;
    if (__builtin_mul_overflow(x, y, &r))
        a->overflow = 1;
    return r;
}

static uint64_t add(acc *a, uint64_t x, uint64_t y) {
    uint64_t r;
    if (__builtin_add_overflow(x, y, &r))
        a->overflow = 1;
    return r;
}

static uint64_t max_u64(uint64_t x, uint64_t y) { return x > y ? x : y; }

qlora_status qlora_mem_estimate(const qlora_model_config *cfg, const qlora_train_settings *settings,
                                qlora_train_regime regime, qlora_mem_estimate_result *out) {
    QL_REQUIRE_ARG(cfg != NULL, "cfg");
    QL_REQUIRE_ARG(out != NULL, "out");
    if ((int)regime < 0 || regime >= QLORA_REGIME_COUNT)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_mem_estimate: unknown regime %d", (int)regime);
    QL_CHECK(qlora_model_config_validate(cfg));
    qlora_train_settings s = settings ? *settings : qlora_train_default_settings();
    QL_CHECK(check_settings(&s));

    acc a = {0};
    const uint64_t b = QL_COMPUTE_BYTES, layers = (uint64_t)cfg->num_layers, h = (uint64_t)cfg->hidden_size;
    const uint64_t inter = (uint64_t)cfg->intermediate_size, vocab = (uint64_t)cfg->vocab_size;
    const uint64_t q = (uint64_t)cfg->num_heads * (uint64_t)cfg->head_dim;
    const uint64_t kv = (uint64_t)cfg->num_kv_heads * (uint64_t)cfg->head_dim;
    const uint64_t rank = (uint64_t)s.lora_rank;
    const uint64_t adapter_bytes = (uint64_t)qlora_dtype_bits(s.adapter_dtype) / 8;
    ql_param_counts pc;
    if (ql_model_param_counts(cfg, &pc) != 0)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_mem_estimate: parameter count overflows");
    ql_linear_shape lin[QL_LINEAR_COUNT];
    ql_layer_linears(cfg, lin);

    uint64_t cat[QLORA_MEM_CATEGORY_COUNT] = {0};
    /* Frozen or trained weights. QLoRA: each linear weight in NF4 + double quant, blocksize 64. */
    uint64_t largest_linear = 0;
    for (int i = 0; i < QL_LINEAR_COUNT; i++) {
        uint64_t numel = mul(&a, lin[i].out, lin[i].in);
        largest_linear = max_u64(largest_linear, numel);
        if (regime == QLORA_REGIME_QLORA) {
            uint64_t codes, state;
            ql_quant4_bytes(numel, QL_QLORA_BLOCKSIZE, 1, &codes, &state);
            cat[QLORA_MEM_BASE_WEIGHTS] = add(&a, cat[QLORA_MEM_BASE_WEIGHTS], mul(&a, layers, codes));
            cat[QLORA_MEM_QUANT_STATE] = add(&a, cat[QLORA_MEM_QUANT_STATE], mul(&a, layers, state));
        }
    }
    if (regime != QLORA_REGIME_QLORA)
        cat[QLORA_MEM_BASE_WEIGHTS] = mul(&a, b, pc.linear);
    cat[QLORA_MEM_DENSE_WEIGHTS] = mul(&a, b, pc.dense); /* embeddings, lm_head, norms, biases */

    /* What is trained: every parameter in place, or LoRA A [r, in] and B [out, r] per target. */
    uint64_t trainable;
    if (regime == QLORA_REGIME_FULL_16BIT) {
        trainable = pc.total;
        cat[QLORA_MEM_ADAPTER_GRADS] = mul(&a, b, trainable);
    } else {
        uint64_t per_layer = 0;
        for (int i = 0; i < QL_LINEAR_COUNT; i++)
            if (adapted(&s, regime, &lin[i]))
                per_layer = add(&a, per_layer, mul(&a, rank, add(&a, lin[i].in, lin[i].out)));
        trainable = mul(&a, layers, per_layer);
        cat[QLORA_MEM_ADAPTER_WEIGHTS] = mul(&a, adapter_bytes, trainable);
        cat[QLORA_MEM_ADAPTER_GRADS] = mul(&a, adapter_bytes, trainable);
    }
    if (s.master_weights)
        cat[QLORA_MEM_MASTER_WEIGHTS] = mul(&a, 4, trainable);
    cat[s.page_optimizer ? QLORA_MEM_OPTIMIZER_HOST : QLORA_MEM_OPTIMIZER_DEVICE] =
        mul(&a, (uint64_t)s.optimizer_state_bytes, trainable);

    /* Activations, at the start of the backward pass (their peak). */
    const uint64_t tokens = mul(&a, (uint64_t)s.seq_len, (uint64_t)s.micro_batch);
    const uint64_t layer = ql_layer_saved_bytes_per_token(cfg, &s, regime);
    if (s.grad_checkpointing) {
        /* each layer's input is kept; one layer at a time is recomputed with its full saved set,
         * whose own input is that checkpoint */
        cat[QLORA_MEM_CHECKPOINTS] = mul(&a, tokens, mul(&a, layers, b * h));
        cat[QLORA_MEM_ACTIVATIONS] = mul(&a, tokens, layer - b * h);
    } else {
        cat[QLORA_MEM_ACTIVATIONS] = mul(&a, tokens, mul(&a, layers, layer));
    }
    /* after the layers: the final norm's input and rstd, its output when lm_head is trained,
     * and the token ids and labels (int32) */
    uint64_t head = b * h + 4 + (regime == QLORA_REGIME_FULL_16BIT ? b * h : 0) + 8;
    cat[QLORA_MEM_ACTIVATIONS] = add(&a, cat[QLORA_MEM_ACTIVATIONS], mul(&a, tokens, head));

    /* Workspace: logits (BF16) and the FP32 loss buffer that the logits' gradient overwrites;
     * the backward pass's gradient buffers for one layer (residual gradient + the larger of the
     * MLP's dn2, d(act), d(gate), d(up) and attention's dn1, dO, dq, dk, dv); and for QLoRA one
     * weight dequantized to BF16 at a time. */
    uint64_t logits = mul(&a, tokens, mul(&a, vocab, b + 4));
    uint64_t mlp_grads = h + 3 * inter, attn_grads = h + 2 * q + 2 * kv;
    uint64_t backward = mul(&a, tokens, b * (h + max_u64(mlp_grads, attn_grads)));
    uint64_t dequant = regime == QLORA_REGIME_QLORA ? mul(&a, b, largest_linear) : 0;
    cat[QLORA_MEM_WORKSPACE] = add(&a, add(&a, logits, backward), dequant);

    qlora_mem_estimate_result r;
    memset(&r, 0, sizeof r);
    r.params_total = pc.total;
    r.params_linear = pc.linear;
    r.params_trainable = trainable;
    memcpy(r.bytes, cat, sizeof cat);
    r.weights = add(&a, add(&a, cat[QLORA_MEM_BASE_WEIGHTS], cat[QLORA_MEM_QUANT_STATE]),
                    cat[QLORA_MEM_DENSE_WEIGHTS]);
    r.trainable = add(&a, cat[QLORA_MEM_ADAPTER_WEIGHTS], cat[QLORA_MEM_MASTER_WEIGHTS]);
    r.gradients = cat[QLORA_MEM_ADAPTER_GRADS];
    r.optimizer = add(&a, cat[QLORA_MEM_OPTIMIZER_DEVICE], cat[QLORA_MEM_OPTIMIZER_HOST]);
    r.activations = add(&a, add(&a, cat[QLORA_MEM_ACTIVATIONS], cat[QLORA_MEM_CHECKPOINTS]),
                        cat[QLORA_MEM_WORKSPACE]);
    r.total = add(&a, add(&a, add(&a, add(&a, r.weights, r.trainable), r.gradients), r.optimizer), r.activations);
    r.device_total = r.total - cat[QLORA_MEM_OPTIMIZER_HOST];
    if (a.overflow)
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_mem_estimate: the estimate for %s overflows 64 bits "
                       "(seq_len %lld x micro_batch %lld is too large)", cfg->name, (long long)s.seq_len,
                       (long long)s.micro_batch);
    *out = r;
    return QLORA_OK;
}
