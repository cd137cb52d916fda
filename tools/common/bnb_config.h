/*
 * The quantization_config member transformers writes into config.json for a bitsandbytes 4-bit
 * model, for qlora-quantize and qlora-ft merge.
 */
#ifndef QLORA_BNB_CONFIG_H
#define QLORA_BNB_CONFIG_H

#include <qlora.h>

#include "json_splice.h"

/* "quantization_config": {...} exactly as transformers writes it (json.dumps with
 * sort_keys=True), laid out like the object obj was scanned from: one key per line with its
 * indentation, or all on one line. skipped[nskipped]: llm_int8_skip_modules (null when none).
 * Returns a malloc'ed string, NULL when memory ran out. */
char *tool_bnb_quantization_member(const tool_json_object *obj, qlora_quant_type type, int double_quant,
                                   char *const *skipped, size_t nskipped);

#endif
