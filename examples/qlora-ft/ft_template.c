/*
 * Prompt templates of qlora-ft: a JSON record becomes prompt and response pieces.
 *
 *   alpaca   The QLoRA repository's ALPACA_PROMPT_DICT (qlora.py): with a non-empty "input",
 *              "Below is an instruction that describes a task, paired with an input that provides
 *              further context. Write a response that appropriately completes the request.\n\n
 *              ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
 *            and with "input" absent, null or "",
 *              "Below is an instruction that describes a task. Write a response that appropriately
 *              completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
 *            as the prompt; "output" is the response.
 *   text     "text" is the response; there is no prompt.
 *   prompt-completion  "prompt" verbatim is the prompt, "completion" the response.
 *   chat     The turns of QLoRA's OASST1 (Guanaco) runs, messages in order:
 *              user       -> prompt "### Human: " + content
 *              assistant  -> prompt "### Assistant: ", then response content
 *              system     -> its content + "\n\n" is put after the next user turn's "### Human: "
 *            e.g. [system S, user U1, assistant A1, user U2, assistant A2] renders as
 *              "### Human: S\n\nU1### Assistant: " A1 "### Human: U2### Assistant: " A2
 *            (prompt pieces quoted). The conversation must end with an assistant message, and a
 *            system message must be followed by a user message.
 */
#include "ft_template.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char ALPACA_INPUT_HEAD[] = "Below is an instruction that describes a task, paired with an input that "
                                        "provides further context. Write a response that appropriately completes "
                                        "the request.\n\n### Instruction:\n";
static const char ALPACA_NO_INPUT_HEAD[] = "Below is an instruction that describes a task. Write a response that "
                                           "appropriately completes the request.\n\n### Instruction:\n";
static const char ALPACA_INPUT_MID[] = "\n\n### Input:\n";
static const char ALPACA_TAIL[] = "\n\n### Response: ";
static const char CHAT_HUMAN[] = "### Human: ";
static const char CHAT_ASSISTANT[] = "### Assistant: ";

static const char *const FORMAT_NAMES[] = {"auto", "alpaca", "text", "prompt-completion", "chat"};

int ft_format_from_name(const char *name) {
    for (int f = 0; name && f < (int)(sizeof FORMAT_NAMES / sizeof FORMAT_NAMES[0]); f++)
        if (!strcmp(name, FORMAT_NAMES[f]))
            return f;
    return -1;
}

const char *ft_format_name(ft_format f) {
    return (int)f >= 0 && (int)f < (int)(sizeof FORMAT_NAMES / sizeof FORMAT_NAMES[0]) ? FORMAT_NAMES[f] : "unknown";
}

ft_format ft_record_shape(const cJSON *record) {
    if (cJSON_HasObjectItem(record, "messages"))
        return FT_FORMAT_CHAT;
    if (cJSON_HasObjectItem(record, "instruction"))
        return FT_FORMAT_ALPACA;
    if (cJSON_HasObjectItem(record, "prompt") || cJSON_HasObjectItem(record, "completion"))
        return FT_FORMAT_PROMPT_COMPLETION;
    if (cJSON_HasObjectItem(record, "text"))
        return FT_FORMAT_TEXT;
    return FT_FORMAT_AUTO;
}

void ft_render_free(ft_render *r) {
    free(r->text);
    free(r->piece);
    memset(r, 0, sizeof *r);
}

/* Appends text to the rendering, extending the last piece when it is of the same kind. */
static int append(ft_render *r, const char *s, size_t len, int response) {
    if (r->len + len + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 256;
        while (cap < r->len + len + 1)
            cap *= 2;
        char *text = realloc(r->text, cap);
        if (!text)
            return -1;
        r->text = text;
        r->cap = cap;
    }
    memcpy(r->text + r->len, s, len);
    if (r->n == 0 || r->piece[r->n - 1].response != response) {
        if (r->n == r->piece_cap) {
            int cap = r->piece_cap ? 2 * r->piece_cap : 8;
            ft_piece *piece = realloc(r->piece, (size_t)cap * sizeof *piece);
            if (!piece)
                return -1;
            r->piece = piece;
            r->piece_cap = cap;
        }
        r->piece[r->n++] = (ft_piece){r->len, 0, response};
    }
    r->piece[r->n - 1].len += len;
    r->len += len;
    r->text[r->len] = '\0';
    return 0;
}

static int append_str(ft_render *r, const char *s, int response) { return append(r, s, strlen(s), response); }

static int malformed(char *why, size_t whycap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (why && whycap)
        vsnprintf(why, whycap, fmt, ap);
    va_end(ap);
    return 1;
}

static const char *json_type_name(const cJSON *v) {
    if (cJSON_IsNull(v))
        return "null";
    if (cJSON_IsBool(v))
        return "a boolean";
    if (cJSON_IsNumber(v))
        return "a number";
    if (cJSON_IsArray(v))
        return "an array";
    if (cJSON_IsObject(v))
        return "an object";
    return "not a string";
}

/* The string field `key` of obj into *out; `where` prefixes the message ("" or "messages[2]: "). */
static int string_field(const cJSON *obj, const char *key, const char *where, const char **out, char *why,
                        size_t whycap) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v)
        return malformed(why, whycap, "%sfield '%s' is missing", where, key);
    if (!cJSON_IsString(v))
        return malformed(why, whycap, "%sfield '%s' is %s, not a string", where, key, json_type_name(v));
    *out = v->valuestring;
    return 0;
}

static int render_alpaca(const cJSON *rec, ft_render *r, char *why, size_t whycap) {
    const char *instruction, *input = "", *output;
    if (string_field(rec, "instruction", "", &instruction, why, whycap) ||
        string_field(rec, "output", "", &output, why, whycap))
        return 1;
    const cJSON *in = cJSON_GetObjectItemCaseSensitive(rec, "input");
    if (in && !cJSON_IsNull(in) && string_field(rec, "input", "", &input, why, whycap))
        return 1;
    if (*input) {
        if (append_str(r, ALPACA_INPUT_HEAD, 0) || append_str(r, instruction, 0) ||
            append_str(r, ALPACA_INPUT_MID, 0) || append_str(r, input, 0))
            return -1;
    } else if (append_str(r, ALPACA_NO_INPUT_HEAD, 0) || append_str(r, instruction, 0)) {
        return -1;
    }
    return append_str(r, ALPACA_TAIL, 0) || append_str(r, output, 1) ? -1 : 0;
}

static int render_chat(const cJSON *rec, ft_render *r, char *why, size_t whycap) {
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(rec, "messages");
    if (!cJSON_IsArray(messages))
        return malformed(why, whycap, "field 'messages' is %s, not an array", json_type_name(messages));
    const char *system = NULL; /* waiting for the next user turn */
    int index = 0, last_is_assistant = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, messages) {
        char where[48];
        snprintf(where, sizeof where, "messages[%d]: ", index);
        if (!cJSON_IsObject(m))
            return malformed(why, whycap, "%s%s, not an object", where, json_type_name(m));
        const char *role, *content;
        if (string_field(m, "role", where, &role, why, whycap) ||
            string_field(m, "content", where, &content, why, whycap))
            return 1;
        last_is_assistant = 0;
        if (!strcmp(role, "system")) {
            if (system)
                return malformed(why, whycap, "%stwo system messages without a user message between them", where);
            system = content;
        } else if (!strcmp(role, "user")) {
            if (append_str(r, CHAT_HUMAN, 0) ||
                (system && (append_str(r, system, 0) || append_str(r, "\n\n", 0))) || append_str(r, content, 0))
                return -1;
            system = NULL;
        } else if (!strcmp(role, "assistant")) {
            if (system)
                return malformed(why, whycap, "%sa system message must be followed by a user message", where);
            if (append_str(r, CHAT_ASSISTANT, 0) || append_str(r, content, 1))
                return -1;
            last_is_assistant = 1;
        } else {
            return malformed(why, whycap, "%srole '%s' is not 'system', 'user' or 'assistant'", where, role);
        }
        index++;
    }
    if (index == 0)
        return malformed(why, whycap, "field 'messages' is empty");
    if (!last_is_assistant)
        return malformed(why, whycap, "the conversation does not end with an assistant message");
    return 0;
}

int ft_render_record(const cJSON *rec, ft_format format, ft_render *r, char *why, size_t whycap) {
    r->len = 0;
    r->n = 0;
    if (!cJSON_IsObject(rec))
        return malformed(why, whycap, "the record is %s, not a JSON object", json_type_name(rec));
    const char *a, *b;
    switch (format) {
    case FT_FORMAT_ALPACA:
        return render_alpaca(rec, r, why, whycap);
    case FT_FORMAT_TEXT:
        if (string_field(rec, "text", "", &a, why, whycap))
            return 1;
        return append_str(r, a, 1) ? -1 : 0;
    case FT_FORMAT_PROMPT_COMPLETION:
        if (string_field(rec, "prompt", "", &a, why, whycap) || string_field(rec, "completion", "", &b, why, whycap))
            return 1;
        return append_str(r, a, 0) || append_str(r, b, 1) ? -1 : 0;
    case FT_FORMAT_CHAT:
        return render_chat(rec, r, why, whycap);
    case FT_FORMAT_AUTO:
        break;
    }
    return malformed(why, whycap, "no record format chosen");
}
