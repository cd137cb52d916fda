/*
 * Encoding (tokenizers/src/tokenizer/{mod.rs, added_vocabulary.rs}): added tokens are split out
 * of the raw text first (the non-normalized ones), then each remaining piece is normalized and
 * the normalized added tokens are split out of it; what is left is pre-tokenized and run through
 * BPE; the post-processor's template adds BOS/EOS.
 */
#include "json_util.h"
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

static int is_space_at(const char *s, size_t n, size_t *len) {
    uint32_t cp = ql_utf8_get(s, n, len);
    /* Rust's char::is_whitespace: the White_Space property. */
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

/* 1 when the character that starts at s (forward) or ends at s+n (backward) is a word character. */
static int word_char_at(const qlora_tokenizer *t, const char *s, size_t n, int backward) {
    if (n == 0)
        return 0;
    size_t start = 0;
    if (backward) {
        start = n - 1;
        while (start > 0 && ((unsigned char)s[start] & 0xC0) == 0x80)
            start--;
    }
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    if (!md)
        return 0;
    int rc = pcre2_match(t->word_char, (PCRE2_SPTR)(s + start), n - start, 0, PCRE2_NO_UTF_CHECK, md, NULL);
    pcre2_match_data_free(md);
    return rc >= 0;
}

/* The longest added token of this pass that matches at s[i..n) (leftmost-longest, as the
 * Aho-Corasick automaton of `tokenizers`), or NULL. */
static const ql_added_token *longest_at(const qlora_tokenizer *t, int normalized, const char *s, size_t n, size_t i) {
    const ql_added_token *best = NULL;
    for (size_t k = 0; k < t->n_added; k++) {
        const ql_added_token *a = &t->added[k];
        if (a->normalized != normalized || a->match_len == 0 || a->match_len > n - i ||
            (best && a->match_len <= best->match_len))
            continue;
        if (memcmp(s + i, a->match, a->match_len) == 0)
            best = a;
    }
    return best;
}

/* Splits one piece around the added tokens of a pass (split_with_indices). */
static void split_added(const qlora_tokenizer *t, int normalized, const char *s, size_t n, int at_start,
                        ql_pieces *out) {
    size_t done = 0; /* end of the last token taken */
    size_t i = 0;
    while (i < n) {
        const ql_added_token *a = longest_at(t, normalized, s, n, i);
        if (!a) {
            i++;
            continue;
        }
        size_t start = i, stop = i + a->match_len;
        i = stop; /* a discarded match is still consumed (find_iter does not overlap) */
        if (a->single_word && (word_char_at(t, s, start, 1) || word_char_at(t, s + stop, n - stop, 0)))
            continue;
        if (a->lstrip) {
            size_t j = start;
            while (j > done) {
                size_t k = j - 1, len;
                while (k > done && ((unsigned char)s[k] & 0xC0) == 0x80)
                    k--;
                if (!is_space_at(s + k, n - k, &len))
                    break;
                j = k;
            }
            start = j;
        }
        if (a->rstrip) {
            size_t len;
            while (stop < n && is_space_at(s + stop, n - stop, &len))
                stop += len;
            i = stop;
        }
        if (start > done)
            ql_pieces_push(out, s + done, start - done, at_start && done == 0, -1);
        ql_pieces_push(out, s + start, stop - start, 0, a->id);
        done = stop;
    }
    if (n > done)
        ql_pieces_push(out, s + done, n - done, at_start && done == 0, -1);
}

static int has_pass(const qlora_tokenizer *t, int normalized) {
    for (size_t k = 0; k < t->n_added; k++)
        if (t->added[k].normalized == normalized)
            return 1;
    return 0;
}

/* The ids of text[n] without the post-processor. 0, -1 out of memory, -2 a character has no token. */
static int encode_ids(const qlora_tokenizer *t, const char *text, size_t n, ql_ids *ids) {
    ql_pieces raw = {0}, norm = {0};
    if (has_pass(t, 0))
        split_added(t, 0, text, n, 1, &raw);
    else
        ql_pieces_push(&raw, text, n, 1, -1);
    int rc = raw.failed ? -1 : 0;
    for (size_t i = 0; i < raw.n && rc == 0; i++) {
        const ql_piece *p = &raw.v[i];
        if (p->id >= 0) {
            ql_pieces_push(&norm, p->text, p->len, 0, p->id);
            continue;
        }
        char *s = NULL;
        size_t len = 0;
        if (ql_tok_normalize(t, p->text, p->len, &s, &len) != 0) {
            rc = -1;
            break;
        }
        if (has_pass(t, 1))
            split_added(t, 1, s, len, p->at_start, &norm);
        else if (len)
            ql_pieces_push(&norm, s, len, p->at_start, -1);
        free(s);
        if (norm.failed)
            rc = -1;
    }
    ql_pieces_free(&raw);
    for (size_t i = 0; i < norm.n && rc == 0; i++) {
        const ql_piece *p = &norm.v[i];
        if (p->id >= 0) {
            ql_ids_push(ids, p->id);
            continue;
        }
        ql_pieces words = {0};
        rc = ql_tok_pretokenize(t, p, &words);
        for (size_t w = 0; w < words.n && rc == 0; w++)
            rc = ql_bpe_word(t, words.v[w].text, words.v[w].len, ids);
        ql_pieces_free(&words);
    }
    ql_pieces_free(&norm);
    if (rc == 0 && ids->failed)
        rc = -1;
    return rc;
}

qlora_status qlora_tokenizer_encode(const qlora_tokenizer *t, const char *text, size_t len, int add_special,
                                    int32_t *ids, size_t cap, size_t *n) {
    QL_REQUIRE_ARG(t != NULL, "tok");
    QL_REQUIRE_ARG(text != NULL || len == 0, "text");
    QL_REQUIRE_ARG(ids != NULL || cap == 0, "ids");
    QL_REQUIRE_ARG(n != NULL, "n");
    *n = 0;
    size_t bad = 0;
    if (len && !ql_utf8_valid(text, len, &bad))
        return ql_fail(QLORA_ERR_INVALID_ARG, "qlora_tokenizer_encode: text is not valid UTF-8 (byte %zu of %zu)",
                       bad, len);
    ql_ids out = {0};
    if (add_special)
        for (size_t i = 0; i < t->n_prefix; i++)
            ql_ids_push(&out, t->prefix_ids[i]);
    int rc = len ? encode_ids(t, text, len, &out) : 0;
    if (add_special && rc == 0)
        for (size_t i = 0; i < t->n_suffix; i++)
            ql_ids_push(&out, t->suffix_ids[i]);
    if (rc == 0 && out.failed)
        rc = -1;
    if (rc != 0) {
        free(out.v);
        if (rc == -2)
            return ql_fail(QLORA_ERR_INVALID_ARG, "tokenizer '%s': the text has a character with no token (no "
                           "unk_token and no byte fallback)", t->path);
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "tokenizer '%s': out of host memory while encoding", t->path);
    }
    if (out.n && cap)
        memcpy(ids, out.v, (out.n < cap ? out.n : cap) * sizeof *ids);
    *n = out.n;
    free(out.v);
    return QLORA_OK;
}
