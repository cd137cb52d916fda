/*
 * PEFT LoRA adapters on disk, as `peft` writes and reads them:
 *   adapter_config.json        peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
 *                              lora_dropout, target_modules (sorted list), use_rslora, bias
 *                              "none", base_model_name_or_path, fan_in_fan_out false,
 *                              inference_mode true, init_lora_weights true, modules_to_save null,
 *                              and the other LoraConfig fields with peft's defaults
 *   adapter_model.safetensors  base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_A.weight
 *                              [r, in] and .lora_B.weight [out, r], BF16 (metadata format "pt")
 * The model's adapter is the one named "default" in every adapted layer (qlora_model_load
 * attaches it). Saving is atomic (ft_fs.h). On a CUDA context the tensors travel through host
 * buffers, copied on the model's context.
 */
#ifndef QLORA_FT_ADAPTER_H
#define QLORA_FT_ADAPTER_H

#include <qlora.h>

#include <stddef.h>
#include <stdint.h>

typedef struct ft_adapter_config {
    int rank;
    float alpha;
    float dropout;
    int use_rslora;
    uint32_t targets;                 /* QLORA_TARGET_* bits */
    char base_model[4096];            /* base_model_name_or_path */
} ft_adapter_config;

/* Writes `dir` (replacing it atomically). */
int ft_adapter_save(qlora_model *model, const ft_adapter_config *cfg, const char *dir, char *err, size_t cap);
/* Writes the adapter files into an existing directory (a checkpoint's temp dir), not atomically. */
int ft_adapter_write_files(qlora_model *model, const ft_adapter_config *cfg, const char *dir, char *err,
                           size_t cap);
/* Writes dir/adapter_config.json alone (what ft_adapter_write_files writes beside the weights). */
int ft_adapter_config_write(const ft_adapter_config *cfg, const char *dir, char *err, size_t cap);
/* Reads dir/adapter_config.json: errors name the file and field (not LORA, unknown target
 * module, rank < 1, ...). */
int ft_adapter_read_config(const char *dir, ft_adapter_config *cfg, char *err, size_t cap);
/* Copies dir/adapter_model.safetensors into the model's "default" adapters, which must exist
 * with the same rank and targets (load the model with the config's rank/targets first):
 * every tensor is checked (missing, extra, wrong shape, dtype BF16/F16/F32 converted to BF16). */
int ft_adapter_load(qlora_model *model, const char *dir, char *err, size_t cap);
/* PEFT's key of a layer's lora_A / lora_B weight (which = 'A' or 'B'). */
void ft_adapter_key(int64_t layer, int proj, char which, char *out, size_t cap);

/* qlora-ft merge: `qlora-ft merge --model DIR --adapter DIR --out DIR [--bits 16|4]` (argv
 * after "merge"). Writes an HF model directory: config.json (with a bitsandbytes
 * quantization_config for --bits 4), the tokenizer files of the base, model.safetensors with
 * W' = dequant(W) + s·B·A for every adapted linear (BF16 for 16 bits, or re-quantized NF4 in
 * the bitsandbytes layout for 4) and every other tensor as in the base. Returns the process
 * exit code (0, 2 for usage errors, 1 for failures) after printing what it did or what failed. */
int ft_merge_main(int argc, char **argv);

#endif
