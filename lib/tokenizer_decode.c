/*
 * Decoding (tokenizers/src/decoders): ids -> token strings (special ones dropped on request),
 * then the decoder chain, each step rewriting the list of strings, then the strings joined
 * (with spaces when the file has no decoder, as `tokenizers` does).
 */
#include "json_util.h"
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

static void dec_bytelevel(const ql_pieces *in, ql_pieces *out) {
    size_t total = 0;
    for (size_t i = 0; i < in->n; i++)
        total += in->v[i].len;
    char *bytes = malloc(total + 1);
    if (!bytes) {
        out->failed = 1;
        return;
    }
    size_t o = 0;
    for (size_t i = 0; i < in->n; i++) {
        const ql_piece *p = &in->v[i];
        size_t start = o, at = 0;
        int all = 1;
        while (at < p->len && all) { /* a token maps to bytes only when all its characters do */
            size_t len;
            int b = ql_bytelevel_byte(ql_utf8_get(p->text + at, p->len - at, &len));
            all = b >= 0;
            if (all)
                bytes[o++] = (char)b;
            at += len;
        }
        if (!all) {
            o = start;
            memcpy(bytes + o, p->text, p->len);
            o += p->len;
        }
    }
    ql_utf8_lossy_append(out, bytes, o);
    free(bytes);
}

static int byte_token(const ql_piece *p, unsigned char *b) {
    static const char hex[] = "0123456789abcdef";
    if (p->len != 6 || strncmp(p->text, "<0x", 3) != 0 || p->text[5] != '>')
        return 0;
    unsigned v = 0;
    for (int i = 3; i < 5; i++) {
        char c = p->text[i];
        const char *h = c ? strchr(hex, c >= 'A' && c <= 'F' ? c - 'A' + 'a' : c) : NULL;
        if (!h)
            return 0;
        v = v * 16 + (unsigned)(h - hex);
    }
    *b = (unsigned char)v;
    return 1;
}

static void flush_bytes(ql_pieces *out, const unsigned char *run, size_t n) {
    if (!n)
        return;
    if (ql_utf8_valid((const char *)run, n, &(size_t){0})) {
        ql_pieces_push(out, (const char *)run, n, 0, -1);
        return;
    }
    for (size_t i = 0; i < n; i++) /* one U+FFFD per byte of an invalid run */
        ql_pieces_push(out, "\xEF\xBF\xBD", 3, 0, -1);
}

static void dec_bytefallback(const ql_pieces *in, ql_pieces *out) {
    unsigned char *run = malloc(in->n + 1);
    if (!run) {
        out->failed = 1;
        return;
    }
    size_t k = 0;
    for (size_t i = 0; i < in->n; i++) {
        unsigned char b;
        if (byte_token(&in->v[i], &b)) {
            run[k++] = b;
            continue;
        }
        flush_bytes(out, run, k);
        k = 0;
        ql_pieces_push(out, in->v[i].text, in->v[i].len, 0, -1);
    }
    flush_bytes(out, run, k);
    free(run);
}

static void dec_fuse(const ql_pieces *in, ql_pieces *out) {
    ql_buf b = {0};
    ql_buf_append(&b, "", 0);
    for (size_t i = 0; i < in->n; i++)
        ql_buf_append(&b, in->v[i].text, in->v[i].len);
    if (b.failed)
        out->failed = 1;
    else
        ql_pieces_push(out, b.data, b.len, 0, -1);
    ql_buf_free(&b);
}

/* Removes up to `start` leading and `stop` trailing copies of one character from each string. */
static void dec_strip(const ql_tok_step *st, const ql_pieces *in, ql_pieces *out) {
    for (size_t i = 0; i < in->n; i++) {
        const char *s = in->v[i].text;
        size_t b = 0, e = in->v[i].len;
        for (int k = 0; k < st->start && e - b >= st->alen && !memcmp(s + b, st->a, st->alen); k++)
            b += st->alen;
        for (int k = 0; k < st->stop && e - b >= st->alen && !memcmp(s + e - st->alen, st->a, st->alen); k++)
            e -= st->alen;
        ql_pieces_push(out, s + b, e - b, 0, -1);
    }
}

static void dec_replace(const ql_tok_step *st, const ql_pieces *in, ql_pieces *out) {
    for (size_t i = 0; i < in->n && !out->failed; i++) {
        char *s = NULL;
        size_t len = 0;
        if (ql_regex_replace(st->re, in->v[i].text, in->v[i].len, st->a, st->alen, &s, &len) != 0) {
            out->failed = 1;
            return;
        }
        ql_pieces_push(out, s, len, 0, -1);
        free(s);
    }
}

/* Metaspace: the replacement becomes a space, except in the first string, where it is dropped
 * (unless prepend_scheme is "never"). */
static void dec_metaspace(const ql_tok_step *st, const ql_pieces *in, ql_pieces *out) {
    for (size_t i = 0; i < in->n && !out->failed; i++) {
        const ql_piece *p = &in->v[i];
        char *s = malloc(p->len + 1);
        if (!s) {
            out->failed = 1;
            return;
        }
        size_t o = 0;
        for (size_t k = 0; k < p->len;) {
            if (p->len - k >= st->alen && !memcmp(p->text + k, st->a, st->alen)) {
                if (!(i == 0 && st->scheme != QL_PREPEND_NEVER))
                    s[o++] = ' ';
                k += st->alen;
            } else {
                s[o++] = p->text[k++];
            }
        }
        ql_pieces_push(out, s, o, 0, -1);
        free(s);
    }
}

static int run_decoder(const qlora_tokenizer *t, ql_pieces *toks, ql_buf *text) {
    for (size_t i = 0; i < t->n_dec && !toks->failed; i++) {
        const ql_tok_step *st = &t->dec[i];
        ql_pieces next = {0};
        switch (st->kind) {
        case QL_DEC_BYTELEVEL: dec_bytelevel(toks, &next); break;
        case QL_DEC_BYTEFALLBACK: dec_bytefallback(toks, &next); break;
        case QL_DEC_FUSE: dec_fuse(toks, &next); break;
        case QL_DEC_STRIP: dec_strip(st, toks, &next); break;
        case QL_DEC_REPLACE: dec_replace(st, toks, &next); break;
        case QL_DEC_METASPACE: dec_metaspace(st, toks, &next); break;
        default: next.failed = 1; break;
        }
        ql_pieces_free(toks);
        *toks = next;
    }
    if (toks->failed)
        return -1;
    for (size_t i = 0; i < toks->n; i++) {
        if (!t->has_decoder && i > 0)
            ql_buf_append(text, " ", 1);
        ql_buf_append(text, toks->v[i].text, toks->v[i].len);
    }
    return text->failed ? -1 : 0;
}

qlora_status qlora_tokenizer_decode(const qlora_tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                                    char *buf, size_t cap, size_t *needed) {
    QL_REQUIRE_ARG(t != NULL, "tok");
    QL_REQUIRE_ARG(ids != NULL || n == 0, "ids");
    QL_REQUIRE_ARG(buf != NULL || cap == 0, "buf");
    QL_REQUIRE_ARG(needed != NULL, "needed");
    *needed = 0;
    ql_pieces toks = {0};
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_size || !t->id_to_token[id]) {
            ql_pieces_free(&toks);
            return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_tokenizer_decode: ids[%zu] = %d is not a token of '%s' "
                           "(vocab size %d)", i, (int)id, t->path, (int)t->vocab_size);
        }
        if (skip_special && t->special[id])
            continue;
        const char *s = t->id_to_token[id];
        ql_pieces_push(&toks, s, strlen(s), 0, id);
    }
    ql_buf text = {0};
    ql_buf_append(&text, "", 0);
    int rc = toks.failed ? -1 : run_decoder(t, &toks, &text);
    ql_pieces_free(&toks);
    if (rc != 0) {
        ql_buf_free(&text);
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "tokenizer '%s': out of host memory while decoding", t->path);
    }
    if (cap) {
        size_t k = text.len < cap - 1 ? text.len : cap - 1;
        memcpy(buf, text.data, k);
        buf[k] = '\0';
    }
    *needed = text.len + 1;
    ql_buf_free(&text);
    return QLORA_OK;
}
