/*
 * Parses the normalizer, pre_tokenizer and decoder objects of tokenizer.json into flat lists
 * of steps (a Sequence is inlined), compiling their patterns with PCRE2 (UTF + Unicode
 * properties, so \s, \w and \p{L} mean what Oniguruma means in `tokenizers`).
 */
#include "tokenizer_internal.h"

#include <cjson/cJSON.h>
#include <utf8proc.h>
#include <stdlib.h>
#include <string.h>

/* GPT-2's pattern, used by ByteLevel with use_regex (pre_tokenizers/byte_level.rs). */
static const char gpt2_pattern[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

qlora_status ql_tok_compile(const qlora_tokenizer *t, const char *pattern, size_t len, uint32_t extra,
                            const char *where, pcre2_code **out) {
    int err = 0;
    PCRE2_SIZE at = 0;
    uint32_t opts = PCRE2_UTF | extra;
    if (!(extra & PCRE2_LITERAL)) /* PCRE2 allows UCP only on patterns */
        opts |= PCRE2_UCP;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, len, opts, &err, &at, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': %s: pattern does not compile at offset %zu: %s", t->path,
                       where, (size_t)at, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter is used when JIT is unavailable */
    *out = re;
    return QLORA_OK;
}

qlora_status ql_tok_compile_pattern(const qlora_tokenizer *t, const void *node, const char *where, pcre2_code **out) {
    const cJSON *pat = node;
    const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
    if (cJSON_IsString(rx))
        return ql_tok_compile(t, rx->valuestring, strlen(rx->valuestring), 0, where, out);
    if (cJSON_IsString(str))
        return ql_tok_compile(t, str->valuestring, strlen(str->valuestring), PCRE2_LITERAL, where, out);
    return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': %s: pattern must be {\"Regex\": ...} or {\"String\": ...}",
                   t->path, where);
}

void ql_tok_steps_free(ql_tok_step *steps, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(steps[i].a);
        pcre2_code_free(steps[i].re);
    }
    free(steps);
}

typedef struct step_list {
    ql_tok_step *v;
    size_t n, cap;
} step_list;

static qlora_status push_step(const qlora_tokenizer *t, step_list *l, ql_tok_step st) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        ql_tok_step *v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            free(st.a);
            pcre2_code_free(st.re);
            return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "tokenizer '%s': out of host memory", t->path);
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = st;
    return QLORA_OK;
}

static const char *str_field(const cJSON *o, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A boolean field with its default when absent. */
static int bool_field(const cJSON *o, const char *name, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

static qlora_status set_string(const qlora_tokenizer *t, ql_tok_step *st, const char *s, const char *where) {
    if (!s)
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': %s: missing string field", t->path, where);
    st->alen = strlen(s);
    st->a = malloc(st->alen + 1);
    if (!st->a)
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "tokenizer '%s': out of host memory", t->path);
    memcpy(st->a, s, st->alen + 1);
    return QLORA_OK;
}

static qlora_status prepend_scheme(const qlora_tokenizer *t, const cJSON *o, const char *where, int *scheme) {
    const char *s = str_field(o, "prepend_scheme");
    const cJSON *legacy = cJSON_GetObjectItemCaseSensitive(o, "add_prefix_space"); /* before tokenizers 0.15 */
    if (!s)
        *scheme = (legacy && cJSON_IsFalse(legacy)) ? QL_PREPEND_NEVER : QL_PREPEND_ALWAYS;
    else if (!strcmp(s, "always"))
        *scheme = QL_PREPEND_ALWAYS;
    else if (!strcmp(s, "first"))
        *scheme = QL_PREPEND_FIRST;
    else if (!strcmp(s, "never"))
        *scheme = QL_PREPEND_NEVER;
    else
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': %s: unknown prepend_scheme '%s'", t->path, where, s);
    return QLORA_OK;
}

static qlora_status parse_one(const qlora_tokenizer *t, const cJSON *o, int which, step_list *l);

static qlora_status parse_sequence(const qlora_tokenizer *t, const cJSON *items, const char *where, int which,
                                   step_list *l) {
    if (!cJSON_IsArray(items))
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': %s Sequence without its list", t->path, where);
    const cJSON *it;
    cJSON_ArrayForEach(it, items) QL_CHECK(parse_one(t, it, which, l));
    return QLORA_OK;
}

static qlora_status parse_normalizer(const qlora_tokenizer *t, const cJSON *o, const char *type, step_list *l) {
    ql_tok_step st = {0};
    if (!strcmp(type, "Sequence"))
        return parse_sequence(t, cJSON_GetObjectItemCaseSensitive(o, "normalizers"), "normalizer",
                              QL_STEPS_NORMALIZER, l);
    if (!strcmp(type, "Prepend")) {
        st.kind = QL_NORM_PREPEND;
        QL_CHECK(set_string(t, &st, str_field(o, "prepend"), "normalizer Prepend"));
        return push_step(t, l, st);
    }
    if (!strcmp(type, "Replace")) {
        st.kind = QL_NORM_REPLACE;
        QL_CHECK(set_string(t, &st, str_field(o, "content"), "normalizer Replace"));
        qlora_status s = ql_tok_compile_pattern(t, cJSON_GetObjectItemCaseSensitive(o, "pattern"),
                                                "normalizer Replace", &st.re);
        if (s != QLORA_OK) {
            free(st.a);
            return s;
        }
        return push_step(t, l, st);
    }
    static const struct {
        const char *name;
        int options;
    } forms[] = {{"NFC", UTF8PROC_STABLE | UTF8PROC_COMPOSE},
                 {"NFD", UTF8PROC_STABLE | UTF8PROC_DECOMPOSE},
                 {"NFKC", UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT},
                 {"NFKD", UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT}};
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++)
        if (!strcmp(type, forms[i].name)) {
            st.kind = QL_NORM_UNICODE;
            st.flag = forms[i].options;
            return push_step(t, l, st);
        }
    return ql_fail(QLORA_ERR_UNSUPPORTED,
                   "tokenizer '%s': normalizer '%s' is not supported (Sequence, Prepend, Replace, NFC, NFD, NFKC, "
                   "NFKD)", t->path, type);
}

static qlora_status parse_behavior(const qlora_tokenizer *t, const char *s, ql_split_behavior *b) {
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    for (int i = 0; s && i < 5; i++)
        if (!strcmp(s, names[i])) {
            *b = (ql_split_behavior)i;
            return QLORA_OK;
        }
    return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': pre_tokenizer Split: unknown behavior '%s'", t->path,
                   s ? s : "(missing)");
}

static qlora_status parse_pre(const qlora_tokenizer *t, const cJSON *o, const char *type, step_list *l) {
    ql_tok_step st = {0};
    if (!strcmp(type, "Sequence"))
        return parse_sequence(t, cJSON_GetObjectItemCaseSensitive(o, "pretokenizers"), "pre_tokenizer",
                              QL_STEPS_PRE_TOKENIZER, l);
    if (!strcmp(type, "Split")) {
        st.kind = QL_PRE_SPLIT;
        st.invert = bool_field(o, "invert", 0);
        QL_CHECK(parse_behavior(t, str_field(o, "behavior"), &st.behavior));
        QL_CHECK(ql_tok_compile_pattern(t, cJSON_GetObjectItemCaseSensitive(o, "pattern"), "pre_tokenizer Split",
                                        &st.re));
        return push_step(t, l, st);
    }
    if (!strcmp(type, "ByteLevel")) {
        st.kind = QL_PRE_BYTELEVEL;
        st.flag = bool_field(o, "add_prefix_space", 1);
        if (bool_field(o, "use_regex", 1))
            QL_CHECK(ql_tok_compile(t, gpt2_pattern, sizeof gpt2_pattern - 1, 0, "pre_tokenizer ByteLevel", &st.re));
        return push_step(t, l, st);
    }
    if (!strcmp(type, "Metaspace")) {
        st.kind = QL_PRE_METASPACE;
        st.flag = bool_field(o, "split", 1);
        QL_CHECK(prepend_scheme(t, o, "pre_tokenizer Metaspace", &st.scheme));
        QL_CHECK(set_string(t, &st, str_field(o, "replacement"), "pre_tokenizer Metaspace"));
        qlora_status s = ql_tok_compile(t, st.a, st.alen, PCRE2_LITERAL, "pre_tokenizer Metaspace", &st.re);
        if (s != QLORA_OK) {
            free(st.a);
            return s;
        }
        return push_step(t, l, st);
    }
    return ql_fail(QLORA_ERR_UNSUPPORTED,
                   "tokenizer '%s': pre_tokenizer '%s' is not supported (Sequence, Split, ByteLevel, Metaspace)",
                   t->path, type);
}

static qlora_status parse_decoder(const qlora_tokenizer *t, const cJSON *o, const char *type, step_list *l) {
    ql_tok_step st = {0};
    if (!strcmp(type, "Sequence"))
        return parse_sequence(t, cJSON_GetObjectItemCaseSensitive(o, "decoders"), "decoder", QL_STEPS_DECODER, l);
    if (!strcmp(type, "ByteLevel")) {
        st.kind = QL_DEC_BYTELEVEL;
        return push_step(t, l, st);
    }
    if (!strcmp(type, "ByteFallback")) {
        st.kind = QL_DEC_BYTEFALLBACK;
        return push_step(t, l, st);
    }
    if (!strcmp(type, "Fuse")) {
        st.kind = QL_DEC_FUSE;
        return push_step(t, l, st);
    }
    if (!strcmp(type, "Replace")) {
        st.kind = QL_DEC_REPLACE;
        QL_CHECK(set_string(t, &st, str_field(o, "content"), "decoder Replace"));
        qlora_status s = ql_tok_compile_pattern(t, cJSON_GetObjectItemCaseSensitive(o, "pattern"), "decoder Replace",
                                                &st.re);
        if (s != QLORA_OK) {
            free(st.a);
            return s;
        }
        return push_step(t, l, st);
    }
    if (!strcmp(type, "Strip")) {
        st.kind = QL_DEC_STRIP;
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(o, "start");
        const cJSON *stop = cJSON_GetObjectItemCaseSensitive(o, "stop");
        const char *c = str_field(o, "content");
        size_t clen = 0;
        if (!cJSON_IsNumber(start) || !cJSON_IsNumber(stop) || start->valuedouble < 0 || stop->valuedouble < 0 ||
            start->valuedouble > 1e6 || stop->valuedouble > 1e6 || !c || !*c ||
            (ql_utf8_get(c, strlen(c), &clen), clen != strlen(c)))
            return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': decoder Strip needs one character 'content' and "
                           "non-negative 'start' and 'stop'", t->path);
        st.start = start->valueint;
        st.stop = stop->valueint;
        QL_CHECK(set_string(t, &st, c, "decoder Strip"));
        return push_step(t, l, st);
    }
    if (!strcmp(type, "Metaspace")) {
        st.kind = QL_DEC_METASPACE;
        QL_CHECK(prepend_scheme(t, o, "decoder Metaspace", &st.scheme));
        QL_CHECK(set_string(t, &st, str_field(o, "replacement"), "decoder Metaspace"));
        return push_step(t, l, st);
    }
    return ql_fail(QLORA_ERR_UNSUPPORTED,
                   "tokenizer '%s': decoder '%s' is not supported (Sequence, ByteLevel, Replace, ByteFallback, Fuse, "
                   "Strip, Metaspace)", t->path, type);
}

static qlora_status parse_one(const qlora_tokenizer *t, const cJSON *o, int which, step_list *l) {
    static const char *what[] = {"normalizer", "pre_tokenizer", "decoder"};
    const char *type = cJSON_IsObject(o) ? str_field(o, "type") : NULL;
    if (!type)
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': %s is not an object with a 'type'", t->path, what[which]);
    if (which == QL_STEPS_NORMALIZER)
        return parse_normalizer(t, o, type, l);
    if (which == QL_STEPS_PRE_TOKENIZER)
        return parse_pre(t, o, type, l);
    return parse_decoder(t, o, type, l);
}

qlora_status ql_tok_parse_steps(qlora_tokenizer *t, const void *node, int which) {
    const cJSON *o = node;
    step_list l = {0};
    if (o && !cJSON_IsNull(o)) {
        qlora_status s = parse_one(t, o, which, &l);
        if (s != QLORA_OK) {
            ql_tok_steps_free(l.v, l.n);
            return s;
        }
    }
    if (which == QL_STEPS_NORMALIZER) {
        t->norm = l.v;
        t->n_norm = l.n;
    } else if (which == QL_STEPS_PRE_TOKENIZER) {
        t->pre = l.v;
        t->n_pre = l.n;
    } else {
        t->dec = l.v;
        t->n_dec = l.n;
        t->has_decoder = o && !cJSON_IsNull(o);
    }
    return QLORA_OK;
}
