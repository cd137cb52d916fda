/*
 * Text-level edits of a JSON object's top-level members, for config.json: a member is
 * spliced in or cut out and every other byte of the file stays as it was (a parse + print
 * round trip would rewrite "rope_theta": 10000.0 as 10000, re-indent, reorder...).
 * The text must already be known to be valid JSON (check it with cJSON first).
 */
#ifndef QLORA_JSON_SPLICE_H
#define QLORA_JSON_SPLICE_H

#include <stddef.h>

/* A growable NUL-terminated string; on allocation failure `failed` is set and later
 * appends are ignored, so callers check once at the end. */
typedef struct tool_strbuf {
    char *data;
    size_t len, cap;
    int failed;
} tool_strbuf;

void tool_strbuf_add(tool_strbuf *b, const char *s, size_t n);
void tool_strbuf_puts(tool_strbuf *b, const char *s);
/* Appends s as a JSON string literal (quotes, backslashes and control characters escaped). */
void tool_strbuf_json_string(tool_strbuf *b, const char *s);
void tool_strbuf_free(tool_strbuf *b);

typedef struct tool_json_member {
    size_t sep_start;   /* start of the whitespace before the key (just after '{' or ',') */
    size_t key_start;   /* the key's opening quote */
    size_t value_end;   /* one past the value */
    char key[64];       /* raw key text (escapes not decoded), truncated */
} tool_json_member;

typedef struct tool_json_object {
    tool_json_member *members;  /* [count], in document order */
    size_t count;
    size_t close_brace;         /* offset of the closing '}' */
    char indent[64];            /* indentation of the members, e.g. "  " */
    int multiline;              /* 0: the members share one line (then indent is "") */
} tool_json_object;

/* Lists the top-level members of the JSON object in text[0..n). Returns 0, or -1 when the
 * text is not an object or memory runs out. */
int tool_json_scan(const char *text, size_t n, tool_json_object *obj);
void tool_json_object_free(tool_json_object *obj);
/* Index of the first member with this key, or obj->count when absent. */
size_t tool_json_find(const tool_json_object *obj, const char *key);
/* A malloc'ed copy of text with `member` ('"key": value', formatted for the object's
 * indentation) added: before the first key sorting after `key` when the keys are sorted
 * (as transformers writes them), else last. NULL when out of memory. */
char *tool_json_insert(const char *text, size_t n, const tool_json_object *obj, const char *key,
                       const char *member);
/* A malloc'ed copy of text without member k (and one separating comma). */
char *tool_json_remove(const char *text, size_t n, const tool_json_object *obj, size_t k);

#endif
