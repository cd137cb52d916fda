/*
 * JSON text helpers for the file formats: strict UTF-8 and JSON token checks that cJSON does
 * not make (it accepts any byte <= 0x20 as whitespace, raw control characters in strings and
 * numbers such as "01" or "+1", and keeps duplicate keys), a growable output buffer, and the
 * two escaping styles we must reproduce byte for byte: serde_json (safetensors headers) and
 * Python's json.dumps with ensure_ascii (index files, bitsandbytes blobs).
 */
#ifndef QLORA_JSON_UTIL_H
#define QLORA_JSON_UTIL_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

/* Strict UTF-8 (no overlong forms, surrogates or code points above U+10FFFF), as Rust's
 * str::from_utf8. Returns 1 if valid; else 0 with *bad_offset = first offending byte. */
int ql_utf8_valid(const char *s, size_t n, size_t *bad_offset);

/* A number token of the JSON text, in document order. */
typedef struct ql_json_number {
    const char *text;
    size_t len;
} ql_json_number;

/* Checks every token of text[0..n) against the JSON grammar's lexical rules (whitespace is
 * only space, tab, CR, LF; strings hold no raw control characters or \u0000; numbers follow
 * the grammar; literals are true/false/null) and lists the number tokens. Returns 1 if the
 * text is lexically valid; else 0 with a description in why[why_cap] and *bad_offset. On
 * success *numbers (malloc'ed, may be NULL when none) must be freed by the caller. */
int ql_json_lex_check(const char *text, size_t n, ql_json_number **numbers, size_t *count, char *why,
                      size_t why_cap, size_t *bad_offset);

/* Stores in every number node of `node`, its descendants and its later siblings its index in
 * document order (in valueint, which we never read as a number), starting at `next`, so the
 * exact token text from ql_json_lex_check can be found for it. Returns the next index. */
size_t ql_json_tag_numbers(cJSON *node, size_t next);

/* Parses a token as an exact unsigned integer: digits only, no sign, fraction or exponent,
 * no overflow. Returns 1 on success. */
int ql_json_parse_u64(const ql_json_number *tok, uint64_t *out);

/* 1 with *dup = a key that occurs twice among the children of an object, 0 when all keys
 * are distinct, -1 when out of memory. */
int ql_json_duplicate_key(const cJSON *object, const char **dup);

/* A growable NUL-terminated byte buffer. On allocation failure it sets `failed` and ignores
 * further appends, so callers check once at the end. */
typedef struct ql_buf {
    char *data;
    size_t len, cap;
    int failed;
} ql_buf;

void ql_buf_free(ql_buf *b);
void ql_buf_append(ql_buf *b, const char *s, size_t n);
void ql_buf_puts(ql_buf *b, const char *s);
void ql_buf_printf(ql_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a quoted JSON string escaped like serde_json: \" \\ \b \f \n \r \t, other
 * control characters as \u00xx, everything else (UTF-8 included) verbatim. */
void ql_buf_json_string_serde(ql_buf *b, const char *s);
/* Appends s (valid UTF-8) as a quoted JSON string escaped like Python's json.dumps with
 * ensure_ascii=True: non-ASCII and DEL as \uxxxx (surrogate pairs above U+FFFF). */
void ql_buf_json_string_python(ql_buf *b, const char *s);

/* Writes repr(float(v)) as Python prints it (the shortest string that reads back as v;
 * exponent form when the decimal exponent is < -4 or >= 16; "12.0", "0.0123", "1e-05").
 * Returns 0 for NaN/Inf (not representable in standard JSON), else the length. out must
 * hold at least 32 bytes. */
int ql_python_float_repr(double v, char *out, size_t cap);

#endif
