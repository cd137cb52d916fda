/* bitsandbytes' quantization_config member of config.json (bnb_config.h). */
#include "bnb_config.h"

#include <stdio.h>

/* The quantization_config member exactly as transformers writes it (json.dumps with
 * sort_keys=True), laid out like the rest of the file: one key per line with its indentation,
 * or all on one line. skipped[nskipped]: llm_int8_skip_modules (null when none). */
char *tool_bnb_quantization_member(const tool_json_object *obj, qlora_quant_type type, int double_quant,
                                   char *const *skipped, size_t nskipped) {
    char nl1[80] = "", nl2[160] = "", nl3[240] = "";
    if (obj->multiline) { /* level 1 is the object's indentation; deeper levels repeat it */
        snprintf(nl1, sizeof nl1, "\n%s", obj->indent);
        snprintf(nl2, sizeof nl2, "\n%s%s", obj->indent, obj->indent);
        snprintf(nl3, sizeof nl3, "\n%s%s%s", obj->indent, obj->indent, obj->indent);
    }
    const char *comma = obj->multiline ? "," : ", ";
    char type_field[48], dq[48];
    snprintf(type_field, sizeof type_field, "\"bnb_4bit_quant_type\": \"%s\"", qlora_quant_type_name(type));
    snprintf(dq, sizeof dq, "\"bnb_4bit_use_double_quant\": %s", double_quant ? "true" : "false");
    const char *fields[] = {"\"_load_in_4bit\": true",
                            "\"_load_in_8bit\": false",
                            "\"bnb_4bit_compute_dtype\": \"bfloat16\"",
                            "\"bnb_4bit_quant_storage\": \"uint8\"",
                            type_field,
                            dq,
                            "\"llm_int8_enable_fp32_cpu_offload\": false",
                            "\"llm_int8_has_fp16_weight\": false",
                            NULL, /* llm_int8_skip_modules */
                            "\"llm_int8_threshold\": 6.0",
                            "\"load_in_4bit\": true",
                            "\"load_in_8bit\": false",
                            "\"quant_method\": \"bitsandbytes\""};
    const size_t nfields = sizeof fields / sizeof fields[0];
    tool_strbuf b = {0};
    tool_strbuf_puts(&b, "\"quantization_config\": {");
    for (size_t f = 0; f < nfields; f++) {
        tool_strbuf_puts(&b, nl2);
        if (fields[f]) {
            tool_strbuf_puts(&b, fields[f]);
        } else if (nskipped == 0) {
            tool_strbuf_puts(&b, "\"llm_int8_skip_modules\": null");
        } else {
            tool_strbuf_puts(&b, "\"llm_int8_skip_modules\": [");
            for (size_t i = 0; i < nskipped; i++) {
                tool_strbuf_puts(&b, nl3);
                tool_strbuf_json_string(&b, skipped[i]);
                if (i + 1 < nskipped)
                    tool_strbuf_puts(&b, comma);
            }
            tool_strbuf_puts(&b, nl2);
            tool_strbuf_puts(&b, "]");
        }
        if (f + 1 < nfields)
            tool_strbuf_puts(&b, comma);
    }
    tool_strbuf_puts(&b, nl1);
    tool_strbuf_puts(&b, "}");
    if (b.failed) {
        tool_strbuf_free(&b);
        return NULL;
    }
    return b.data;
}
