/*
 * Loading tokenizer.json (tokenizers/src/tokenizer/serialization.rs): the BPE model (vocab,
 * merges in the "a b" string form and the ["a","b"] pair form), added tokens, normalizer,
 * pre-tokenizer, a TemplateProcessing post-processor and the decoder. Anything else is refused
 * by name rather than run differently from the reference.
 */
#include "json_util.h"
#include "tokenizer_internal.h"
#include "text_file.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define QL_TOKENIZER_MAX_BYTES (512u << 20)
#define QL_TOKENIZER_MAX_ID ((1 << 30) - 1)


static qlora_status oom(const qlora_tokenizer *t) {
    return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "tokenizer '%s': out of host memory", t->path);
}

static int get_id(const cJSON *v, int32_t *id) {
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > QL_TOKENIZER_MAX_ID ||
        v->valuedouble != (double)(int32_t)v->valuedouble)
        return 0;
    *id = (int32_t)v->valuedouble;
    return 1;
}

/* One merge: "a b" (legacy form: exactly one space) or ["a", "b"] (pair form, tokens may hold spaces). */
static qlora_status add_merge(qlora_tokenizer *t, const cJSON *m, int32_t rank) {
    const char *a = NULL, *b = NULL;
    size_t alen = 0, blen = 0;
    if (cJSON_IsString(m)) {
        const char *sp = strchr(m->valuestring, ' ');
        if (sp && !strchr(sp + 1, ' ')) {
            a = m->valuestring;
            alen = (size_t)(sp - a);
            b = sp + 1;
            blen = strlen(b);
        }
    } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) &&
               cJSON_IsString(m->child->next)) {
        a = m->child->valuestring;
        b = m->child->next->valuestring;
        alen = strlen(a);
        blen = strlen(b);
    }
    if (!a)
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': merge #%d is neither \"a b\" nor [\"a\", \"b\"]", t->path,
                       (int)rank);
    int32_t ia = ql_strmap_get(&t->vocab, a, alen), ib = ql_strmap_get(&t->vocab, b, blen);
    char *ab = malloc(alen + blen + 1);
    if (!ab)
        return oom(t);
    memcpy(ab, a, alen);
    memcpy(ab + alen, b, blen);
    ab[alen + blen] = '\0';
    int32_t iab = ql_strmap_get(&t->vocab, ab, alen + blen);
    if (ia < 0 || ib < 0 || iab < 0) {
        qlora_status s = ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': merge #%d ('%.*s' + '%.*s'): '%s' is not in the "
                                 "vocab", t->path, (int)rank, (int)alen, a, (int)blen, b,
                                 ia < 0 ? "left part" : ib < 0 ? "right part" : ab);
        free(ab);
        return s;
    }
    free(ab);
    if (ql_mergemap_put(&t->merges, ia, ib, rank, iab) != 0)
        return oom(t);
    return QLORA_OK;
}

static qlora_status parse_model(qlora_tokenizer *t, const cJSON *model, int32_t *max_id) {
    if (!cJSON_IsObject(model))
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': no 'model' object", t->path);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (type && !(cJSON_IsString(type) && !strcmp(type->valuestring, "BPE")))
        return ql_fail(QLORA_ERR_UNSUPPORTED, "tokenizer '%s': model type '%s' is not supported (only BPE)", t->path,
                       cJSON_IsString(type) ? type->valuestring : "?");
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': the BPE model needs a 'vocab' object and a 'merges' list",
                       t->path);
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0.0))
        return ql_fail(QLORA_ERR_UNSUPPORTED, "tokenizer '%s': BPE dropout is not supported (it makes encoding "
                       "random)", t->path);
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        int32_t id;
        if (!get_id(e, &id))
            return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': vocab entry '%s' has no valid id", t->path, e->string);
        size_t len = strlen(e->string);
        char *key = malloc(len + 1);
        if (!key)
            return oom(t);
        memcpy(key, e->string, len + 1);
        int put = ql_strmap_put(&t->vocab, key, len, id);
        if (put != 0) /* a repeated key keeps its first id */
            free(key);
        if (put < 0)
            return oom(t);
        if (id > *max_id)
            *max_id = id;
    }
    int32_t rank = 0;
    cJSON_ArrayForEach(e, merges) {
        if (rank == 0 && cJSON_IsString(e) && !strncmp(e->valuestring, "#version", 8))
            continue; /* the legacy header line */
        QL_CHECK(add_merge(t, e, rank));
        rank++;
    }
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    t->unk_id = -1;
    if (cJSON_IsString(unk)) {
        t->unk_id = ql_strmap_get(&t->vocab, unk->valuestring, strlen(unk->valuestring));
        if (t->unk_id < 0)
            return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': unk_token '%s' is not in the vocab", t->path,
                           unk->valuestring);
    }
    t->byte_fallback = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback"));
    t->fuse_unk = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "fuse_unk"));
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));
    for (int b = 0; b < 256; b++) {
        char piece[8];
        snprintf(piece, sizeof piece, "<0x%02X>", b);
        t->byte_ids[b] = ql_strmap_get(&t->vocab, piece, 6);
    }
    const char *fields[2] = {"continuing_subword_prefix", "end_of_word_suffix"};
    char **dst[2] = {&t->subword_prefix, &t->word_suffix};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, fields[i]);
        if (cJSON_IsString(v) && *v->valuestring && !(*dst[i] = strdup(v->valuestring)))
            return oom(t);
    }
    return QLORA_OK;
}

static qlora_status parse_added(qlora_tokenizer *t, const cJSON *list, int32_t *max_id) {
    if (!list || cJSON_IsNull(list))
        return QLORA_OK;
    if (!cJSON_IsArray(list))
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': 'added_tokens' is not a list", t->path);
    size_t n = (size_t)cJSON_GetArraySize(list);
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added)
        return oom(t);
    const cJSON *e;
    cJSON_ArrayForEach(e, list) {
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        ql_added_token *a = &t->added[t->n_added];
        if (!cJSON_IsString(content) || !*content->valuestring ||
            !get_id(cJSON_GetObjectItemCaseSensitive(e, "id"), &a->id))
            return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': added token #%zu needs a non-empty 'content' and an "
                           "'id'", t->path, t->n_added);
        if (!(a->content = strdup(content->valuestring)))
            return oom(t);
        t->n_added++;
        a->len = strlen(a->content);
        a->special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "special"));
        const cJSON *norm = cJSON_GetObjectItemCaseSensitive(e, "normalized");
        a->normalized = cJSON_IsBool(norm) ? cJSON_IsTrue(norm) : !a->special;
        a->single_word = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "single_word"));
        a->lstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "lstrip"));
        a->rstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "rstrip"));
        if (a->id > *max_id)
            *max_id = a->id;
    }
    return QLORA_OK;
}

/* What a normalized added token is matched as: its content through the normalizer. */
static qlora_status normalize_added(qlora_tokenizer *t) {
    for (size_t i = 0; i < t->n_added; i++) {
        ql_added_token *a = &t->added[i];
        if (!a->normalized) {
            a->match = a->content;
            a->match_len = a->len;
        } else if (ql_tok_normalize(t, a->content, a->len, &a->match, &a->match_len) != 0) {
            return oom(t);
        }
    }
    return QLORA_OK;
}

static int32_t find_token(const qlora_tokenizer *t, const char *s) {
    for (size_t i = 0; i < t->n_added; i++)
        if (!strcmp(t->added[i].content, s))
            return t->added[i].id;
    return ql_strmap_get(&t->vocab, s, strlen(s));
}

/* The ids of a template's special token: special_tokens[name].ids, else the token itself. */
static qlora_status template_ids(qlora_tokenizer *t, const cJSON *specials, const char *name, ql_ids *out) {
    const cJSON *entry = cJSON_GetObjectItemCaseSensitive(specials, name);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(entry, "ids");
    if (cJSON_IsArray(ids)) {
        const cJSON *v;
        cJSON_ArrayForEach(v, ids) {
            int32_t id;
            if (!get_id(v, &id))
                return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': post_processor special token '%s' has a bad id",
                               t->path, name);
            ql_ids_push(out, id);
        }
    } else {
        int32_t id = find_token(t, name);
        if (id < 0)
            return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': post_processor special token '%s' is unknown", t->path,
                           name);
        ql_ids_push(out, id);
    }
    return out->failed ? oom(t) : QLORA_OK;
}

static qlora_status parse_template(qlora_tokenizer *t, const cJSON *pp) {
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(pp, "single");
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(pp, "special_tokens");
    if (!cJSON_IsArray(single))
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': TemplateProcessing without a 'single' template", t->path);
    ql_ids pre = {0}, post = {0};
    int seen_a = 0;
    qlora_status s = QLORA_OK;
    const cJSON *item;
    cJSON_ArrayForEach(item, single) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(item, "SpecialToken");
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(item, "Sequence");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(sp ? sp : seq, "id");
        if (!cJSON_IsString(id) || (seq && (seen_a || strcmp(id->valuestring, "A") != 0))) {
            s = ql_fail(QLORA_ERR_UNSUPPORTED, "tokenizer '%s': TemplateProcessing 'single' must hold special tokens "
                        "and one $A", t->path);
            break;
        }
        if (seq)
            seen_a = 1;
        else if ((s = template_ids(t, specials, id->valuestring, seen_a ? &post : &pre)) != QLORA_OK)
            break;
    }
    if (s == QLORA_OK && !seen_a)
        s = ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': TemplateProcessing 'single' has no $A", t->path);
    t->prefix_ids = pre.v;
    t->n_prefix = pre.n;
    t->suffix_ids = post.v;
    t->n_suffix = post.n;
    return s;
}

static qlora_status parse_post(qlora_tokenizer *t, const cJSON *pp) {
    if (!pp || cJSON_IsNull(pp))
        return QLORA_OK;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(pp, "type");
    if (!cJSON_IsString(type))
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': post_processor has no 'type'", t->path);
    if (!strcmp(type->valuestring, "TemplateProcessing"))
        return parse_template(t, pp);
    if (!strcmp(type->valuestring, "ByteLevel")) /* only moves offsets */
        return QLORA_OK;
    if (!strcmp(type->valuestring, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pp, "processors"), *p;
        if (!cJSON_IsArray(list))
            return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': post_processor Sequence without 'processors'", t->path);
        cJSON_ArrayForEach(p, list) QL_CHECK(parse_post(t, p));
        return QLORA_OK;
    }
    return ql_fail(QLORA_ERR_UNSUPPORTED, "tokenizer '%s': post_processor '%s' is not supported (TemplateProcessing, "
                   "ByteLevel, Sequence)", t->path, type->valuestring);
}

/* bos_token / eos_token of tokenizer_config.json beside the file: a string or {"content": ...}. */
static int32_t config_token(const qlora_tokenizer *t, const cJSON *cfg, const char *field) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, field);
    if (cJSON_IsObject(v))
        v = cJSON_GetObjectItemCaseSensitive(v, "content");
    return cJSON_IsString(v) ? find_token(t, v->valuestring) : -1;
}

static qlora_status read_special_ids(qlora_tokenizer *t) {
    t->bos_id = t->n_prefix ? t->prefix_ids[0] : -1;
    t->eos_id = t->n_suffix ? t->suffix_ids[t->n_suffix - 1] : -1;
    const char *slash = strrchr(t->path, '/');
    size_t dir = slash ? (size_t)(slash - t->path + 1) : 0;
    char *cfg_path = malloc(dir + sizeof "tokenizer_config.json");
    if (!cfg_path)
        return oom(t);
    memcpy(cfg_path, t->path, dir);
    strcpy(cfg_path + dir, "tokenizer_config.json");
    FILE *fp = fopen(cfg_path, "rb");
    if (!fp) { /* optional */
        free(cfg_path);
        return QLORA_OK;
    }
    fclose(fp);
    char *text = NULL;
    size_t len = 0;
    qlora_status s = ql_read_text_file("tokenizer config", cfg_path, QL_TOKENIZER_MAX_BYTES, &text, &len);
    if (s == QLORA_OK) {
        cJSON *cfg = cJSON_ParseWithLength(text, len);
        if (!cJSON_IsObject(cfg)) {
            s = ql_fail(QLORA_ERR_FORMAT, "tokenizer config '%s': not a JSON object", cfg_path);
        } else {
            int32_t bos = config_token(t, cfg, "bos_token"), eos = config_token(t, cfg, "eos_token");
            if (t->bos_id < 0)
                t->bos_id = bos;
            if (eos >= 0)
                t->eos_id = eos;
        }
        cJSON_Delete(cfg);
        free(text);
    }
    free(cfg_path);
    return s;
}

/* Fills the id -> token table: model tokens, then added tokens (which win, as in decode), a
 * normalized one spelled as the normalizer leaves it (what `tokenizers` hands its decoder).
 * Decode skips an id whose spelling is the content of a special token (is_special_token
 * compares strings, so a normalized special token that normalization changes is kept). */
static qlora_status build_id_table(qlora_tokenizer *t, int32_t max_id) {
    t->vocab_size = max_id + 1;
    size_t n = (size_t)t->vocab_size;
    t->id_to_token = calloc(n ? n : 1, sizeof *t->id_to_token);
    t->special = calloc(n ? n : 1, 1);
    if (!t->id_to_token || !t->special)
        return oom(t);
    for (size_t i = 0; i < t->vocab.cap; i++)
        if (t->vocab.slots[i].key)
            t->id_to_token[t->vocab.slots[i].value] = (char *)t->vocab.slots[i].key;
    ql_strmap specials = {0};
    for (size_t i = 0; i < t->n_added; i++) {
        const ql_added_token *a = &t->added[i];
        t->id_to_token[a->id] = a->normalized ? a->match : a->content;
        if (a->special && ql_strmap_put(&specials, a->content, a->len, a->id) < 0) {
            ql_strmap_free(&specials);
            return oom(t);
        }
    }
    for (size_t id = 0; id < n && specials.used; id++) {
        const char *s = t->id_to_token[id];
        t->special[id] = s && ql_strmap_get(&specials, s, strlen(s)) >= 0;
    }
    ql_strmap_free(&specials);
    return QLORA_OK;
}

static qlora_status load_json(qlora_tokenizer *t, const cJSON *root) {
    if (!cJSON_IsObject(root))
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': not a JSON object", t->path);
    int32_t max_id = -1;
    QL_CHECK(parse_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"), &max_id));
    QL_CHECK(parse_added(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), &max_id));
    QL_CHECK(ql_tok_parse_steps(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), QL_STEPS_NORMALIZER));
    QL_CHECK(ql_tok_parse_steps(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), QL_STEPS_PRE_TOKENIZER));
    QL_CHECK(ql_tok_parse_steps(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"), QL_STEPS_DECODER));
    QL_CHECK(parse_post(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor")));
    QL_CHECK(normalize_added(t));
    QL_CHECK(ql_tok_compile(t, "^\\w", 3, 0, "single_word check", &t->word_char));
    QL_CHECK(build_id_table(t, max_id));
    for (size_t i = 0; i < t->n_prefix + t->n_suffix; i++) {
        int32_t id = i < t->n_prefix ? t->prefix_ids[i] : t->suffix_ids[i - t->n_prefix];
        if (id >= t->vocab_size || !t->id_to_token[id])
            return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': post_processor id %d is not a token", t->path, (int)id);
    }
    return read_special_ids(t);
}

qlora_status qlora_tokenizer_load(const char *path, qlora_tokenizer **out) {
    QL_REQUIRE_ARG(path != NULL, "path");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    QL_CHECK(ql_read_text_file("tokenizer", path, QL_TOKENIZER_MAX_BYTES, &text, &len));
    size_t bad = 0;
    if (!ql_utf8_valid(text, len, &bad)) {
        free(text);
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': invalid UTF-8 at byte %zu", path, bad);
    }
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= text && at <= text + len ? (size_t)(at - text) : 0;
        free(text);
        return ql_fail(QLORA_ERR_FORMAT, "tokenizer '%s': malformed JSON near byte %zu", path, off);
    }
    free(text);
    qlora_tokenizer *t = calloc(1, sizeof *t);
    qlora_status s = t && (t->path = strdup(path)) ? QLORA_OK
                                                   : ql_fail(QLORA_ERR_OUT_OF_MEMORY, "tokenizer '%s': out of host "
                                                             "memory", path);
    if (s == QLORA_OK)
        s = load_json(t, root);
    cJSON_Delete(root);
    if (s != QLORA_OK) {
        qlora_tokenizer_free(t);
        return s;
    }
    *out = t;
    return QLORA_OK;
}

void qlora_tokenizer_free(qlora_tokenizer *t) {
    if (!t)
        return;
    for (size_t i = 0; i < t->vocab.cap; i++)
        free((char *)t->vocab.slots[i].key);
    ql_strmap_free(&t->vocab);
    ql_mergemap_free(&t->merges);
    for (size_t i = 0; i < t->n_added; i++) {
        if (t->added[i].match != t->added[i].content)
            free(t->added[i].match);
        free(t->added[i].content);
    }
    free(t->added);
    ql_tok_steps_free(t->norm, t->n_norm);
    ql_tok_steps_free(t->pre, t->n_pre);
    ql_tok_steps_free(t->dec, t->n_dec);
    pcre2_code_free(t->word_char);
    free(t->prefix_ids);
    free(t->suffix_ids);
    free(t->id_to_token);
    free(t->special);
    free(t->subword_prefix);
    free(t->word_suffix);
    free(t->path);
    free(t);
}

int32_t qlora_tokenizer_vocab_size(const qlora_tokenizer *t) { return t ? t->vocab_size : 0; }
int32_t qlora_tokenizer_bos_id(const qlora_tokenizer *t) { return t ? t->bos_id : -1; }
int32_t qlora_tokenizer_eos_id(const qlora_tokenizer *t) { return t ? t->eos_id : -1; }

int32_t qlora_tokenizer_token_id(const qlora_tokenizer *t, const char *token) {
    return t && token ? find_token(t, token) : -1;
}

const char *qlora_tokenizer_token(const qlora_tokenizer *t, int32_t id) {
    return t && id >= 0 && id < t->vocab_size ? t->id_to_token[id] : NULL;
}
