/*
 * Normalizers and pre-tokenizers on text pieces (tokenizers/src/{normalizers,pre_tokenizers},
 * tokenizer/pattern.rs): regex ranges through PCRE2, the Unicode normal forms through utf8proc,
 * Split with its five behaviours, ByteLevel and Metaspace.
 */
#include "tokenizer_internal.h"

#include <utf8proc.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ regex */
int ql_regex_ranges(const pcre2_code *re, const char *s, size_t n, ql_range_fn fn, void *user) {
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md)
        return -1;
    size_t prev = 0, at = 0;
    int rc = 0;
    while (at <= n) {
        int m = pcre2_match(re, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK, md, NULL);
        if (m < 0)
            break; /* no further match (the text was checked as UTF-8 before) */
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (ms != prev && (rc = fn(user, prev, ms, 0)) != 0)
            break;
        if (me != ms && (rc = fn(user, ms, me, 1)) != 0)
            break;
        prev = me;
        if (me == ms) { /* an empty match: step over one character */
            if (me >= n)
                break;
            at = me + ql_utf8_seq_len((unsigned char)s[me]);
            prev = ms;
        } else {
            at = me;
        }
    }
    pcre2_match_data_free(md);
    if (rc == 0 && prev < n)
        rc = fn(user, prev, n, 0);
    return rc;
}

typedef struct replace_ctx {
    const char *s, *rep;
    size_t rep_len;
    char *buf;
    size_t len, cap;
    int failed;
} replace_ctx;

static void rbuf_append(replace_ctx *c, const char *p, size_t n) {
    if (c->failed)
        return;
    if (c->len + n + 1 > c->cap) {
        size_t cap = (c->len + n + 1) * 2;
        char *b = realloc(c->buf, cap);
        if (!b) {
            c->failed = 1;
            return;
        }
        c->buf = b;
        c->cap = cap;
    }
    memcpy(c->buf + c->len, p, n);
    c->len += n;
    c->buf[c->len] = '\0';
}

static int replace_range(void *user, size_t start, size_t end, int is_match) {
    replace_ctx *c = user;
    if (is_match)
        rbuf_append(c, c->rep, c->rep_len);
    else
        rbuf_append(c, c->s + start, end - start);
    return c->failed ? -1 : 0;
}

int ql_regex_replace(const pcre2_code *re, const char *s, size_t n, const char *rep, size_t rep_len, char **out,
                     size_t *out_len) {
    replace_ctx c = {.s = s, .rep = rep, .rep_len = rep_len};
    rbuf_append(&c, "", 0);
    if (c.failed || ql_regex_ranges(re, s, n, replace_range, &c) != 0) {
        free(c.buf);
        return -1;
    }
    *out = c.buf;
    *out_len = c.len;
    return 0;
}

/* ------------------------------------------------------------------ normalizer */
/* One of the four Unicode normal forms through utf8proc. The text was checked as UTF-8, so
 * utf8proc fails only when out of memory. */
static int unicode_normalize(const char *s, size_t n, int options, char **out, size_t *out_len) {
    if (n > (size_t)PTRDIFF_MAX)
        return -1;
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t len = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                        (utf8proc_option_t)options);
    if (len < 0)
        return -1;
    *out = (char *)dst; /* NUL-terminated, malloc'ed */
    *out_len = (size_t)len;
    return 0;
}

int ql_tok_normalize(const qlora_tokenizer *t, const char *text, size_t n, char **out, size_t *out_len) {
    char *cur = malloc(n + 1);
    if (!cur)
        return -1;
    memcpy(cur, text, n);
    cur[n] = '\0';
    size_t len = n;
    for (size_t i = 0; i < t->n_norm; i++) {
        const ql_tok_step *st = &t->norm[i];
        char *next = NULL;
        size_t next_len = 0;
        if (st->kind == QL_NORM_PREPEND) {
            if (len == 0) /* Prepend leaves empty text alone */
                continue;
            next = malloc(st->alen + len + 1);
            if (next) {
                memcpy(next, st->a, st->alen);
                memcpy(next + st->alen, cur, len + 1);
                next_len = st->alen + len;
            }
        } else if (st->kind == QL_NORM_UNICODE) {
            if (unicode_normalize(cur, len, st->flag, &next, &next_len) != 0)
                next = NULL;
        } else if (ql_regex_replace(st->re, cur, len, st->a, st->alen, &next, &next_len) != 0) {
            next = NULL;
        }
        free(cur);
        if (!next)
            return -1;
        cur = next;
        len = next_len;
    }
    *out = cur;
    *out_len = len;
    return 0;
}

/* ------------------------------------------------------------------ pre-tokenizers */
typedef struct range {
    size_t start, end;
    int is_match;
} range;

typedef struct ranges {
    range *v;
    size_t n, cap;
    int invert;
} ranges;

static int collect_range(void *user, size_t start, size_t end, int is_match) {
    ranges *r = user;
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        range *v = realloc(r->v, cap * sizeof *v);
        if (!v)
            return -1;
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n++] = (range){start, end, r->invert ? !is_match : is_match};
    return 0;
}

/* Applies a split behaviour to the ranges in place (tokenizer/normalizer.rs `split`). */
static void apply_behavior(ranges *r, ql_split_behavior b) {
    size_t k = 0;
    int prev_match = 0;
    switch (b) {
    case QL_SPLIT_ISOLATED:
        return;
    case QL_SPLIT_REMOVED:
        for (size_t i = 0; i < r->n; i++)
            if (!r->v[i].is_match)
                r->v[k++] = r->v[i];
        break;
    case QL_SPLIT_MERGED_WITH_PREVIOUS:
        for (size_t i = 0; i < r->n; i++) {
            range x = r->v[i];
            if (x.is_match && !prev_match && k > 0)
                r->v[k - 1].end = x.end;
            else
                r->v[k++] = x;
            prev_match = x.is_match;
        }
        break;
    case QL_SPLIT_MERGED_WITH_NEXT: /* the same from the right, then back in order */
        for (size_t i = r->n; i-- > 0;) {
            range x = r->v[i];
            if (x.is_match && !prev_match && k > 0)
                r->v[r->n - k].start = x.start;
            else {
                k++;
                r->v[r->n - k] = x;
            }
            prev_match = x.is_match;
        }
        memmove(r->v, r->v + (r->n - k), k * sizeof *r->v);
        break;
    case QL_SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < r->n; i++) {
            range x = r->v[i];
            if (x.is_match == prev_match && k > 0)
                r->v[k - 1].end = x.end;
            else
                r->v[k++] = x;
            prev_match = x.is_match;
        }
        break;
    }
    r->n = k;
}

/* Splits every piece of *in by re, replacing *in with the result. */
static int split_pieces(ql_pieces *in, const pcre2_code *re, ql_split_behavior b, int invert) {
    ql_pieces out = {0};
    for (size_t i = 0; i < in->n && !out.failed; i++) {
        const ql_piece *p = &in->v[i];
        ranges r = {.invert = invert};
        if (ql_regex_ranges(re, p->text, p->len, collect_range, &r) != 0) {
            free(r.v);
            out.failed = 1;
            break;
        }
        apply_behavior(&r, b);
        for (size_t j = 0; j < r.n; j++)
            if (r.v[j].end > r.v[j].start)
                ql_pieces_push(&out, p->text + r.v[j].start, r.v[j].end - r.v[j].start,
                               p->at_start && r.v[j].start == 0, -1);
        free(r.v);
    }
    ql_pieces_free(in);
    *in = out;
    return out.failed ? -1 : 0;
}

/* Rewrites every piece through fn (which returns a malloc'ed string, NULL when out of memory). */
typedef char *(*rewrite_fn)(const ql_tok_step *st, const ql_piece *p, size_t *len);
static int rewrite_pieces(ql_pieces *in, const ql_tok_step *st, rewrite_fn fn) {
    for (size_t i = 0; i < in->n; i++) {
        size_t len = 0;
        char *s = fn(st, &in->v[i], &len);
        if (!s)
            return -1;
        free(in->v[i].text);
        in->v[i].text = s;
        in->v[i].len = len;
    }
    return 0;
}

static char *prefix_space(const ql_tok_step *st, const ql_piece *p, size_t *len) {
    (void)st;
    int add = p->len == 0 || p->text[0] != ' ';
    char *s = malloc(p->len + 2);
    if (!s)
        return NULL;
    if (add)
        s[0] = ' ';
    memcpy(s + add, p->text, p->len + 1);
    *len = p->len + (size_t)add;
    return s;
}

static char *bytes_to_alphabet(const ql_tok_step *st, const ql_piece *p, size_t *len) {
    (void)st;
    char *s = malloc(p->len * 2 + 1); /* every byte becomes a 1- or 2-byte character */
    if (!s)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < p->len; i++)
        o += ql_utf8_put(s + o, ql_bytelevel_char((unsigned char)p->text[i]));
    s[o] = '\0';
    *len = o;
    return s;
}

static char *metaspace(const ql_tok_step *st, const ql_piece *p, size_t *len) {
    size_t spaces = 0;
    for (size_t i = 0; i < p->len; i++)
        spaces += p->text[i] == ' ';
    char *s = malloc(p->len + spaces * st->alen + st->alen + 1);
    if (!s)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < p->len; i++) {
        if (p->text[i] == ' ') {
            memcpy(s + o, st->a, st->alen);
            o += st->alen;
        } else {
            s[o++] = p->text[i];
        }
    }
    int starts = o >= st->alen && memcmp(s, st->a, st->alen) == 0;
    int prepend = !starts && (st->scheme == QL_PREPEND_ALWAYS || (st->scheme == QL_PREPEND_FIRST && p->at_start));
    if (prepend) {
        memmove(s + st->alen, s, o);
        memcpy(s, st->a, st->alen);
        o += st->alen;
    }
    s[o] = '\0';
    *len = o;
    return s;
}

int ql_tok_pretokenize(const qlora_tokenizer *t, const ql_piece *in, ql_pieces *out) {
    ql_pieces cur = {0};
    ql_pieces_push(&cur, in->text, in->len, in->at_start, -1);
    int rc = cur.failed ? -1 : 0;
    for (size_t i = 0; i < t->n_pre && rc == 0; i++) {
        const ql_tok_step *st = &t->pre[i];
        switch (st->kind) {
        case QL_PRE_SPLIT:
            rc = split_pieces(&cur, st->re, st->behavior, st->invert);
            break;
        case QL_PRE_BYTELEVEL:
            if (st->flag)
                rc = rewrite_pieces(&cur, st, prefix_space);
            if (rc == 0 && st->re)
                rc = split_pieces(&cur, st->re, QL_SPLIT_ISOLATED, 0);
            if (rc == 0)
                rc = rewrite_pieces(&cur, st, bytes_to_alphabet);
            break;
        case QL_PRE_METASPACE:
            rc = rewrite_pieces(&cur, st, metaspace);
            if (rc == 0 && st->flag)
                rc = split_pieces(&cur, st->re, QL_SPLIT_MERGED_WITH_NEXT, 0);
            break;
        default:
            rc = -1;
            break;
        }
    }
    for (size_t i = 0; i < cur.n && rc == 0; i++)
        if (cur.v[i].len)
            ql_pieces_push(out, cur.v[i].text, cur.v[i].len, cur.v[i].at_start, -1);
    ql_pieces_free(&cur);
    return rc == 0 && !out->failed ? 0 : -1;
}
