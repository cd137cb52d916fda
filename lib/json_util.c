/* JSON text helpers: strict lexical checks, exact integers, escaping, Python float repr. */
#include "json_util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ql_utf8_valid(const char *s, size_t n, size_t *bad_offset) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = u[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp, min;
        if ((c & 0xE0) == 0xC0) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            goto bad;
        }
        if (len > n - i)
            goto bad;
        for (size_t k = 1; k < len; k++) {
            if ((u[i + k] & 0xC0) != 0x80)
                goto bad;
            cp = (cp << 6) | (u[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            goto bad;
        i += len;
    }
    return 1;
bad:
    *bad_offset = i;
    return 0;
}

static int is_json_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }
static int is_digit(char c) { return c >= '0' && c <= '9'; }
static int is_hex(char c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
/* A value token must be followed by one of these (or the end), else e.g. "01" or "truex". */
static int is_delimiter(char c) { return is_json_space(c) || c == ',' || c == ']' || c == '}' || c == ':'; }

static size_t lex_fail(char *why, size_t why_cap, size_t *bad_offset, size_t at, const char *what) {
    snprintf(why, why_cap, "%s", what);
    *bad_offset = at;
    return 0;
}

/* Scans a string starting at the opening quote; returns the index after the closing quote,
 * or 0 with the error filled in. */
static size_t lex_string(const char *t, size_t n, size_t i, char *why, size_t why_cap, size_t *bad) {
    size_t start = i++;
    while (i < n) {
        unsigned char ch = (unsigned char)t[i];
        if (ch == '"')
            return i + 1;
        if (ch < 0x20)
            return lex_fail(why, why_cap, bad, i, "raw control character inside a string");
        if (ch != '\\') {
            i++;
            continue;
        }
        if (i + 1 >= n)
            break;
        char e = t[i + 1];
        if (e != '\0' && strchr("\"\\/bfnrt", e) != NULL) {
            i += 2;
        } else if (e == 'u') {
            if (n - i < 6 || !is_hex(t[i + 2]) || !is_hex(t[i + 3]) || !is_hex(t[i + 4]) || !is_hex(t[i + 5]))
                return lex_fail(why, why_cap, bad, i, "invalid \\u escape");
            if (memcmp(t + i + 2, "0000", 4) == 0)
                return lex_fail(why, why_cap, bad, i, "string contains a NUL character (\\u0000)");
            i += 6;
        } else {
            return lex_fail(why, why_cap, bad, i, "invalid escape sequence");
        }
    }
    return lex_fail(why, why_cap, bad, start, "unterminated string");
}

/* Scans a number per the JSON grammar; returns the index after it, or 0 on error. */
static size_t lex_number(const char *t, size_t n, size_t i, char *why, size_t why_cap, size_t *bad) {
    size_t start = i;
    if (t[i] == '-')
        i++;
    if (i < n && t[i] == '0') {
        i++;
    } else if (i < n && is_digit(t[i])) {
        while (i < n && is_digit(t[i]))
            i++;
    } else {
        return lex_fail(why, why_cap, bad, start, "invalid number");
    }
    if (i < n && t[i] == '.') {
        i++;
        if (i >= n || !is_digit(t[i]))
            return lex_fail(why, why_cap, bad, start, "invalid number");
        while (i < n && is_digit(t[i]))
            i++;
    }
    if (i < n && (t[i] == 'e' || t[i] == 'E')) {
        i++;
        if (i < n && (t[i] == '+' || t[i] == '-'))
            i++;
        if (i >= n || !is_digit(t[i]))
            return lex_fail(why, why_cap, bad, start, "invalid number");
        while (i < n && is_digit(t[i]))
            i++;
    }
    if (i < n && !is_delimiter(t[i]))
        return lex_fail(why, why_cap, bad, start, "invalid number");
    return i;
}

static int is_structural(char c) { return c == '{' || c == '}' || c == '[' || c == ']' || c == ':' || c == ','; }

/* The literal (true/false/null) starting at text[i], or 0 if none. */
static size_t literal_len(const char *text, size_t n, size_t i) {
    static const char *const literals[3] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t l = strlen(literals[k]);
        if (n - i >= l && memcmp(text + i, literals[k], l) == 0 && (n - i == l || is_delimiter(text[i + l])))
            return l;
    }
    return 0;
}

int ql_json_lex_check(const char *text, size_t n, ql_json_number **numbers, size_t *count, char *why,
                      size_t why_cap, size_t *bad_offset) {
    ql_json_number *nums = NULL;
    size_t nnum = 0, cap = 0;
    size_t i = 0;
    *numbers = NULL;
    *count = 0;
    while (i < n) {
        char c = text[i];
        size_t next;
        if (is_json_space(c) || is_structural(c)) {
            next = i + 1;
        } else if (c == '"') {
            next = lex_string(text, n, i, why, why_cap, bad_offset);
        } else if (c == '-' || is_digit(c)) {
            next = lex_number(text, n, i, why, why_cap, bad_offset);
            if (next != 0 && nnum == cap) {
                size_t ncap = cap ? cap * 2 : 16;
                ql_json_number *grown = realloc(nums, ncap * sizeof *grown);
                if (!grown)
                    next = lex_fail(why, why_cap, bad_offset, i, "out of memory while scanning numbers");
                else
                    nums = grown, cap = ncap;
            }
            if (next != 0) {
                nums[nnum].text = text + i;
                nums[nnum].len = next - i;
                nnum++;
            }
        } else {
            size_t len = literal_len(text, n, i);
            next = len ? i + len : lex_fail(why, why_cap, bad_offset, i, "unexpected character");
        }
        if (next == 0) {
            free(nums);
            return 0;
        }
        i = next;
    }
    *numbers = nums;
    *count = nnum;
    return 1;
}

size_t ql_json_tag_numbers(cJSON *node, size_t next) {
    for (; node; node = node->next) {
        if (cJSON_IsNumber(node))
            node->valueint = (int)next++;
        if (node->child)
            next = ql_json_tag_numbers(node->child, next);
    }
    return next;
}

int ql_json_parse_u64(const ql_json_number *tok, uint64_t *out) {
    if (tok->len == 0 || (tok->len > 1 && tok->text[0] == '0'))
        return 0;
    uint64_t v = 0;
    for (size_t i = 0; i < tok->len; i++) {
        char c = tok->text[i];
        if (!is_digit(c))
            return 0;
        unsigned d = (unsigned)(c - '0');
        if (v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

static int cmp_cstr_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int ql_json_duplicate_key(const cJSON *object, const char **dup) {
    size_t n = 0;
    *dup = NULL;
    for (const cJSON *c = object->child; c; c = c->next)
        n++;
    if (n < 2)
        return 0;
    const char **keys = malloc(n * sizeof *keys);
    if (!keys)
        return -1;
    size_t k = 0;
    for (const cJSON *c = object->child; c; c = c->next)
        keys[k++] = c->string ? c->string : "";
    qsort(keys, n, sizeof *keys, cmp_cstr_ptr);
    for (size_t i = 1; i < n && !*dup; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0)
            *dup = keys[i];
    free(keys);
    return *dup ? 1 : 0;
}

void ql_buf_free(ql_buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

void ql_buf_append(ql_buf *b, const char *s, size_t n) {
    if (b->failed)
        return;
    if (n + 1 > b->cap - b->len || !b->data) {
        size_t ncap = b->cap ? b->cap : 256;
        while (ncap - b->len < n + 1) {
            if (ncap > SIZE_MAX / 2) {
                b->failed = 1;
                return;
            }
            ncap *= 2;
        }
        char *grown = realloc(b->data, ncap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->data = grown;
        b->cap = ncap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void ql_buf_puts(ql_buf *b, const char *s) { ql_buf_append(b, s, strlen(s)); }

void ql_buf_printf(ql_buf *b, const char *fmt, ...) {
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = 1;
        return;
    }
    if ((size_t)n < sizeof small) {
        ql_buf_append(b, small, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        b->failed = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    ql_buf_append(b, big, (size_t)n);
    free(big);
}

/* The short escape of a control character or quote, or NULL when \u00xx is needed. */
static const char *short_escape(unsigned char c) {
    switch (c) {
    case '"': return "\\\"";
    case '\\': return "\\\\";
    case '\b': return "\\b";
    case '\f': return "\\f";
    case '\n': return "\\n";
    case '\r': return "\\r";
    case '\t': return "\\t";
    default: return NULL;
    }
}

void ql_buf_json_string_serde(ql_buf *b, const char *s) {
    ql_buf_append(b, "\"", 1);
    const char *run = s;
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        ql_buf_append(b, run, (size_t)(p - run));
        const char *e = short_escape(c);
        if (e)
            ql_buf_puts(b, e);
        else
            ql_buf_printf(b, "\\u%04x", c);
        run = p + 1;
    }
    ql_buf_puts(b, run);
    ql_buf_append(b, "\"", 1);
}

void ql_buf_json_string_python(ql_buf *b, const char *s) {
    const unsigned char *u = (const unsigned char *)s;
    ql_buf_append(b, "\"", 1);
    size_t i = 0;
    while (u[i]) {
        unsigned c = u[i];
        if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') {
            ql_buf_append(b, (const char *)&u[i], 1);
            i++;
            continue;
        }
        if (c < 0x80) {
            const char *e = short_escape((unsigned char)c);
            if (e)
                ql_buf_puts(b, e);
            else
                ql_buf_printf(b, "\\u%04x", c);
            i++;
            continue;
        }
        /* Multi-byte UTF-8 (the caller guarantees validity). */
        size_t len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
        uint32_t cp = len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
        for (size_t k = 1; k < len && u[i + k]; k++)
            cp = (cp << 6) | (u[i + k] & 0x3F);
        if (cp >= 0x10000) {
            uint32_t v = cp - 0x10000;
            ql_buf_printf(b, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
        } else {
            ql_buf_printf(b, "\\u%04x", cp);
        }
        i += len;
    }
    ql_buf_append(b, "\"", 1);
}

/* The shortest decimal digits that read back as v (v finite, nonzero, positive), as Python's
 * repr picks them: value = 0.digits * 10^decpt. Returns the digit count. Per precision, the
 * correctly rounded candidate is tried first, then its neighbour on the other side of v: at a
 * power of two the rounding interval is lopsided and only the neighbour may read back. */
static int shortest_digits(double v, char digits[24], int *decpt) {
    unsigned long long mant = 0;
    int scale = 0; /* v == mant * 10^scale */
    for (int prec = 1; prec <= 17; prec++) {
        char sci[40], cand[48];
        snprintf(sci, sizeof sci, "%.*e", prec - 1, v);
        unsigned long long m = 0;
        const char *p = sci;
        for (; *p && *p != 'e'; p++)
            if (is_digit(*p))
                m = m * 10 + (unsigned long long)(*p - '0');
        int sc = atoi(p + 1) - (prec - 1);
        mant = m, scale = sc;
        if (strtod(sci, NULL) == v)
            break;
        int found = 0;
        for (int delta = -1; delta <= 1 && !found; delta += 2) {
            unsigned long long m2 = m + (unsigned long long)(long long)delta;
            if (m2 == 0)
                continue;
            snprintf(cand, sizeof cand, "%llue%d", m2, sc);
            if (strtod(cand, NULL) == v)
                mant = m2, found = 1;
        }
        if (found)
            break;
    }
    int nd = snprintf(digits, 24, "%llu", mant);
    while (nd > 1 && digits[nd - 1] == '0')
        digits[--nd] = '\0', scale++;
    *decpt = scale + nd;
    return nd;
}

int ql_python_float_repr(double v, char *out, size_t cap) {
    if (!isfinite(v) || cap < 32)
        return 0;
    if (v == 0.0)
        return snprintf(out, cap, "%s", signbit(v) ? "-0.0" : "0.0");
    char digits[24];
    int decpt;
    int nd = shortest_digits(fabs(v), digits, &decpt);
    int exp10 = decpt - 1; /* value = d.ddd * 10^exp10 */
    int neg = v < 0;

    ql_buf b = {0};
    if (neg)
        ql_buf_append(&b, "-", 1);
    if (decpt <= -4 || decpt > 16) {
        ql_buf_append(&b, digits, 1);
        if (nd > 1) {
            ql_buf_append(&b, ".", 1);
            ql_buf_append(&b, digits + 1, (size_t)nd - 1);
        }
        ql_buf_printf(&b, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
    } else if (decpt <= 0) {
        ql_buf_append(&b, "0.", 2);
        for (int k = 0; k < -decpt; k++)
            ql_buf_append(&b, "0", 1);
        ql_buf_append(&b, digits, (size_t)nd);
    } else if (decpt < nd) {
        ql_buf_append(&b, digits, (size_t)decpt);
        ql_buf_append(&b, ".", 1);
        ql_buf_append(&b, digits + decpt, (size_t)(nd - decpt));
    } else {
        ql_buf_append(&b, digits, (size_t)nd);
        for (int k = nd; k < decpt; k++)
            ql_buf_append(&b, "0", 1);
        ql_buf_append(&b, ".0", 2);
    }
    int len = 0;
    if (!b.failed && b.len < cap) {
        memcpy(out, b.data, b.len + 1);
        len = (int)b.len;
    }
    ql_buf_free(&b);
    return len;
}
