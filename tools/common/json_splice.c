/* Text-level edits of a JSON object's top-level members (see json_splice.h). */
#include "json_splice.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tool_strbuf_add(tool_strbuf *b, const char *s, size_t n) {
    if (b->failed)
        return;
    if (n > SIZE_MAX / 4 - b->len) {
        b->failed = 1;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t want = 2 * (b->len + n + 1);
        char *grown = realloc(b->data, want);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->data = grown;
        b->cap = want;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void tool_strbuf_puts(tool_strbuf *b, const char *s) { tool_strbuf_add(b, s, strlen(s)); }

void tool_strbuf_json_string(tool_strbuf *b, const char *s) {
    tool_strbuf_puts(b, "\"");
    for (; *s; s++) {
        char esc[8];
        if (*s == '"' || *s == '\\')
            snprintf(esc, sizeof esc, "\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            snprintf(esc, sizeof esc, "\\u%04x", (unsigned)(unsigned char)*s);
        else
            snprintf(esc, sizeof esc, "%c", *s);
        tool_strbuf_puts(b, esc);
    }
    tool_strbuf_puts(b, "\"");
}

void tool_strbuf_free(tool_strbuf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* ---- scanning (the text is valid JSON: only bounds are checked) */
static size_t skip_ws(const char *s, size_t n, size_t i) {
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
        i++;
    return i;
}

static size_t skip_string(const char *s, size_t n, size_t i) {
    for (i++; i < n && s[i] != '"'; i++)
        if (s[i] == '\\')
            i++;
    return i < n ? i + 1 : n;
}

static size_t skip_value(const char *s, size_t n, size_t i) {
    if (i < n && s[i] == '"')
        return skip_string(s, n, i);
    if (i < n && (s[i] == '{' || s[i] == '[')) {
        int depth = 0;
        while (i < n) {
            if (s[i] == '"') {
                i = skip_string(s, n, i);
                continue;
            }
            if (s[i] == '{' || s[i] == '[')
                depth++;
            else if (s[i] == '}' || s[i] == ']')
                depth--;
            i++;
            if (depth == 0)
                break;
        }
        return i;
    }
    while (i < n && !strchr(",}] \t\r\n", s[i]))
        i++;
    return i;
}

int tool_json_scan(const char *s, size_t n, tool_json_object *obj) {
    memset(obj, 0, sizeof *obj);
    size_t cap = 0, i = skip_ws(s, n, 0);
    if (i >= n || s[i] != '{')
        return -1;
    i++;
    for (;;) {
        size_t sep = i;
        i = skip_ws(s, n, i);
        if (i >= n)
            break;
        if (s[i] == '}') {
            obj->close_brace = i;
            if (obj->count > 0) {
                /* The whitespace before the first key, e.g. "\n  ", gives the indentation. */
                const tool_json_member *m0 = &obj->members[0];
                const char *nl = memchr(s + m0->sep_start, '\n', m0->key_start - m0->sep_start);
                obj->multiline = nl != NULL;
                if (nl) {
                    size_t len = (size_t)(s + m0->key_start - nl - 1);
                    snprintf(obj->indent, sizeof obj->indent, "%.*s", (int)len, nl + 1);
                }
            }
            return 0;
        }
        if (obj->count == cap) {
            cap = cap ? 2 * cap : 32;
            tool_json_member *grown = realloc(obj->members, cap * sizeof *grown);
            if (!grown)
                break;
            obj->members = grown;
        }
        tool_json_member *m = &obj->members[obj->count++];
        m->sep_start = sep;
        m->key_start = i;
        size_t key_end = skip_string(s, n, i), klen = key_end - i - 2;
        snprintf(m->key, sizeof m->key, "%.*s", (int)(klen < sizeof m->key ? klen : sizeof m->key - 1), s + i + 1);
        i = skip_ws(s, n, key_end);
        if (i >= n || s[i] != ':')
            break;
        m->value_end = skip_value(s, n, skip_ws(s, n, i + 1));
        i = skip_ws(s, n, m->value_end);
        if (i < n && s[i] == ',')
            i++;
    }
    tool_json_object_free(obj);
    return -1;
}

void tool_json_object_free(tool_json_object *obj) {
    free(obj->members);
    memset(obj, 0, sizeof *obj);
}

size_t tool_json_find(const tool_json_object *obj, const char *key) {
    for (size_t i = 0; i < obj->count; i++)
        if (!strcmp(obj->members[i].key, key))
            return i;
    return obj->count;
}

static char *take(tool_strbuf *b) {
    if (b->failed) {
        tool_strbuf_free(b);
        return NULL;
    }
    return b->data;
}

char *tool_json_insert(const char *text, size_t n, const tool_json_object *obj, const char *key,
                       const char *member) {
    const tool_json_member *m = obj->members;
    tool_strbuf b = {0};
    if (obj->count == 0) {
        tool_strbuf_add(&b, text, obj->close_brace);
        tool_strbuf_puts(&b, member);
        tool_strbuf_add(&b, text + obj->close_brace, n - obj->close_brace);
        return take(&b);
    }
    int sorted = 1;
    for (size_t i = 1; i < obj->count; i++)
        if (strcmp(m[i - 1].key, m[i].key) > 0)
            sorted = 0;
    size_t before = obj->count;
    for (size_t i = 0; sorted && i < obj->count && before == obj->count; i++)
        if (strcmp(m[i].key, key) > 0)
            before = i;
    /* The separator ("\n  ") a member gets is the one the first member has. */
    const char *sep = text + m[0].sep_start;
    size_t sep_len = m[0].key_start - m[0].sep_start;
    if (before < obj->count) {
        tool_strbuf_add(&b, text, m[before].key_start);
        tool_strbuf_puts(&b, member);
        tool_strbuf_puts(&b, ",");
        tool_strbuf_add(&b, sep, sep_len);
        tool_strbuf_add(&b, text + m[before].key_start, n - m[before].key_start);
    } else {
        size_t end = m[obj->count - 1].value_end;
        tool_strbuf_add(&b, text, end);
        tool_strbuf_puts(&b, ",");
        tool_strbuf_add(&b, sep, sep_len);
        tool_strbuf_puts(&b, member);
        tool_strbuf_add(&b, text + end, n - end);
    }
    return take(&b);
}

char *tool_json_remove(const char *text, size_t n, const tool_json_object *obj, size_t k) {
    const tool_json_member *m = obj->members;
    size_t from, to;
    if (k > 0) { /* from the end of the previous value: drops ",<ws>key: value" */
        from = m[k - 1].value_end;
        to = m[k].value_end;
    } else if (obj->count > 1) { /* the first of several: drops "key: value,<ws>" */
        from = m[0].key_start;
        to = m[1].key_start;
    } else {
        from = m[0].sep_start;
        to = m[0].value_end;
    }
    tool_strbuf b = {0};
    tool_strbuf_add(&b, text, from);
    tool_strbuf_add(&b, text + to, n - to);
    return take(&b);
}
