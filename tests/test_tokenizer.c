/*
 * The tokenizer against the reference: tests/fixtures/make_tokenizer_fixtures.py trains small
 * tokenizers with Hugging Face `tokenizers` and records its ids and decodes for 300 strings
 * (and the four Unicode normal forms of some texts); every one must be reproduced exactly.
 * Plus the API contract and the refusals.
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "tokenizer_internal.h"

static char *read_all(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    ck_assert_msg(fp != NULL, "cannot open %s", path);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    buf[n] = '\0';
    if (len)
        *len = (size_t)n;
    return buf;
}

static cJSON *load_cases(void) {
    char *text = read_all(tu_fixture("tokenizer_cases.json"), NULL);
    cJSON *root = cJSON_Parse(text);
    free(text);
    ck_assert_ptr_nonnull(root);
    return root;
}

static qlora_tokenizer *load_fixture(const cJSON *cases, const char *kind) {
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(cases, "files");
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(files, kind);
    ck_assert(cJSON_IsString(f));
    qlora_tokenizer *tok = NULL;
    ck_assert_qlora_ok(qlora_tokenizer_load(tu_fixture(f->valuestring), &tok));
    return tok;
}

/* Escapes a string for a failure message. */
static const char *show(const char *s) {
    static char out[4][512];
    static int slot;
    char *o = out[slot++ & 3];
    size_t k = 0;
    for (; *s && k < sizeof out[0] - 8; s++) {
        unsigned char c = (unsigned char)*s;
        k += (size_t)(c < 0x20 ? snprintf(o + k, 8, "\\x%02x", c) : snprintf(o + k, 8, "%c", c));
    }
    o[k] = '\0';
    return o;
}

static int ids_match(const cJSON *want, const int32_t *got, size_t n) {
    if ((size_t)cJSON_GetArraySize(want) != n)
        return 0;
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, want) if (v->valueint != got[i++]) return 0;
    return 1;
}

static void format_ids(const int32_t *ids, size_t n, char *out, size_t cap) {
    size_t k = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n && k + 12 < cap; i++)
        k += (size_t)snprintf(out + k, cap - k, "%s%d", i ? "," : "", (int)ids[i]);
}

/* Encodes with and without special tokens and decodes (skipping and keeping special tokens);
 * returns the number of mismatches against the reference record. */
static int check_case(qlora_tokenizer *tok, const char *kind, const char *text, const cJSON *rec, int *round_trips) {
    int bad = 0;
    size_t len = strlen(text);
    int32_t ids[4096];
    const char *fields[2] = {"ids", "ids_special"};
    for (int special = 0; special < 2; special++) {
        size_t n = 0;
        ck_assert_qlora_ok(qlora_tokenizer_encode(tok, text, len, special, ids, 4096, &n));
        ck_assert_uint_le(n, 4096);
        const cJSON *want = cJSON_GetObjectItemCaseSensitive(rec, fields[special]);
        if (!ids_match(want, ids, n)) {
            char got[2048];
            format_ids(ids, n, got, sizeof got);
            char *w = cJSON_PrintUnformatted(want);
            fprintf(stderr, "%s %s '%s': got [%s], want %s\n", kind, fields[special], show(text), got, w);
            free(w);
            bad++;
        }
    }
    const cJSON *ref = cJSON_GetObjectItemCaseSensitive(rec, "ids_special");
    size_t n = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, ref) ids[n++] = v->valueint;
    const char *dfields[2] = {"decode_keep", "decode_skip"};
    for (int skip = 0; skip < 2; skip++) {
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(rec, dfields[skip]);
        const char *want = cJSON_IsString(d) ? d->valuestring : text; /* null: equal to the text */
        if (skip && !cJSON_IsString(d))
            (*round_trips)++;
        size_t needed = 0;
        ck_assert_qlora_ok(qlora_tokenizer_decode(tok, ids, n, skip, NULL, 0, &needed));
        char *buf = malloc(needed);
        ck_assert_ptr_nonnull(buf);
        size_t again = 0;
        ck_assert_qlora_ok(qlora_tokenizer_decode(tok, ids, n, skip, buf, needed, &again));
        ck_assert_uint_eq(again, needed);
        if (strcmp(buf, want) != 0) {
            fprintf(stderr, "%s %s '%s': got '%s', want '%s'\n", kind, dfields[skip], show(text), show(buf),
                    show(want));
            bad++;
        }
        free(buf);
    }
    return bad;
}

static void check_kind(const char *kind) {
    cJSON *cases = load_cases();
    qlora_tokenizer *tok = load_fixture(cases, kind);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(cases, "cases"), *c;
    int total = 0, bad_cases = 0, round_trips = 0;
    cJSON_ArrayForEach(c, list) {
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(c, "text");
        const cJSON *rec = cJSON_GetObjectItemCaseSensitive(c, kind);
        ck_assert(cJSON_IsString(text) && cJSON_IsObject(rec));
        total++;
        bad_cases += check_case(tok, kind, text->valuestring, rec, &round_trips) != 0;
    }
    printf("%s: %d/%d cases match the reference (%d round trips)\n", kind, total - bad_cases, total, round_trips);
    ck_assert_int_ge(total, 300);
    ck_assert_int_gt(round_trips, 100);
    ck_assert_msg(bad_cases == 0, "%s: %d of %d cases differ from the reference", kind, bad_cases, total);
    qlora_tokenizer_free(tok);
    cJSON_Delete(cases);
}

START_TEST(bytelevel_matches_reference) { check_kind("bytelevel"); }
END_TEST

START_TEST(spm_metaspace_matches_reference) { check_kind("spm"); }
END_TEST

START_TEST(spm_legacy_matches_reference) { check_kind("spm_legacy"); }
END_TEST

START_TEST(qwen2_nfc_matches_reference) { check_kind("qwen2"); }
END_TEST

/* The four Unicode normal forms against `tokenizers`' normalize_str, on texts that each changes. */
START_TEST(unicode_normalizers_match_reference) {
    static const char *forms[] = {"NFC", "NFD", "NFKC", "NFKD"};
    cJSON *cases = load_cases();
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(cases, "normalizers");
    ck_assert_int_ge(cJSON_GetArraySize(list), 20);
    char *dir = tu_tempdir();
    char path[1024];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    for (int f = 0; f < 4; f++) {
        char json[512];
        snprintf(json, sizeof json, "{\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"%s\"}]},"
                 "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}", forms[f]);
        tu_write_file(path, json, strlen(json));
        qlora_tokenizer *tok = NULL;
        ck_assert_qlora_ok(qlora_tokenizer_load(path, &tok));
        int changed = 0, bad = 0;
        const cJSON *c;
        cJSON_ArrayForEach(c, list) {
            const char *text = cJSON_GetObjectItemCaseSensitive(c, "text")->valuestring;
            const cJSON *want = cJSON_GetObjectItemCaseSensitive(c, forms[f]);
            ck_assert(cJSON_IsString(want));
            char *got = NULL;
            size_t len = 0;
            ck_assert_int_eq(ql_tok_normalize(tok, text, strlen(text), &got, &len), 0);
            if (len != strlen(want->valuestring) || memcmp(got, want->valuestring, len) != 0) {
                fprintf(stderr, "%s '%s': got '%.*s', want '%s'\n", forms[f], text, (int)len, got, want->valuestring);
                bad++;
            }
            changed += strcmp(text, want->valuestring) != 0;
            free(got);
        }
        ck_assert_msg(bad == 0, "%s: %d texts normalize differently from the reference", forms[f], bad);
        ck_assert_int_ge(changed, 10); /* the texts exercise the form */
        qlora_tokenizer_free(tok);
    }
    tu_rmtree(dir);
    free(dir);
    cJSON_Delete(cases);
}
END_TEST

START_TEST(special_ids_and_lookup) {
    qlora_tokenizer *bl = NULL, *spm = NULL, *legacy = NULL;
    ck_assert_qlora_ok(qlora_tokenizer_load(tu_fixture("tokenizer_bytelevel.json"), &bl));
    ck_assert_qlora_ok(qlora_tokenizer_load(tu_fixture("tokenizer_spm.json"), &spm));
    ck_assert_qlora_ok(qlora_tokenizer_load(tu_fixture("tokenizer_spm_legacy.json"), &legacy));
    ck_assert_int_eq(qlora_tokenizer_token_id(bl, "<|begin_of_text|>"), 0);
    ck_assert_int_eq(qlora_tokenizer_bos_id(bl), 0);
    ck_assert_int_eq(qlora_tokenizer_eos_id(bl), -1); /* the template adds no EOS and no config names one */
    ck_assert_int_eq(qlora_tokenizer_vocab_size(bl), 1002); /* 1000 trained + <|mask|> + <tool> */
    ck_assert_str_eq(qlora_tokenizer_token(bl, 1001), "<tool>");
    ck_assert_ptr_null(qlora_tokenizer_token(bl, 1002));
    ck_assert_int_eq(qlora_tokenizer_token_id(bl, "no such token"), -1);
    ck_assert_int_eq(qlora_tokenizer_token_id(spm, "<0x0A>"), 13);
    ck_assert_int_eq(qlora_tokenizer_bos_id(spm), 1);
    ck_assert_int_eq(qlora_tokenizer_eos_id(spm), -1);
    ck_assert_int_eq(qlora_tokenizer_bos_id(legacy), 1);
    ck_assert_int_eq(qlora_tokenizer_eos_id(legacy), 2);
    ck_assert_int_eq(qlora_tokenizer_vocab_size(spm), 700);
    qlora_tokenizer_free(bl);
    qlora_tokenizer_free(spm);
    qlora_tokenizer_free(legacy);
    qlora_tokenizer *qwen = NULL;
    ck_assert_qlora_ok(qlora_tokenizer_load(tu_fixture("tokenizer_qwen2.json"), &qwen));
    ck_assert_int_eq(qlora_tokenizer_token_id(qwen, "<|im_end|>"), 2);
    ck_assert_int_eq(qlora_tokenizer_bos_id(qwen), -1); /* the ByteLevel post-processor adds nothing */
    ck_assert_int_eq(qlora_tokenizer_vocab_size(qwen), 1003); /* 1000 trained + three added */
    /* Looked up by the spelling in the file (decomposed), spelled as NFC leaves it. */
    ck_assert_int_eq(qlora_tokenizer_token_id(qwen, "<cafe\xcc\x81>"), 1000);
    ck_assert_str_eq(qlora_tokenizer_token(qwen, 1000), "<caf\xc3\xa9>");
    ck_assert_str_eq(qlora_tokenizer_token(qwen, 1001), "<|e\xcc\x81|>"); /* not normalized */
    qlora_tokenizer_free(qwen);
    qlora_tokenizer_free(NULL);
}
END_TEST

START_TEST(eos_from_tokenizer_config) {
    char *dir = tu_tempdir();
    char path[1024], cfg[1024];
    size_t len = 0;
    char *json = read_all(tu_fixture("tokenizer_spm.json"), &len);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
    tu_write_file(path, json, len);
    free(json);
    const char *config = "{\"bos_token\": {\"content\": \"<s>\"}, \"eos_token\": \"</s>\"}";
    tu_write_file(cfg, config, strlen(config));
    qlora_tokenizer *tok = NULL;
    ck_assert_qlora_ok(qlora_tokenizer_load(path, &tok));
    ck_assert_int_eq(qlora_tokenizer_bos_id(tok), 1);
    ck_assert_int_eq(qlora_tokenizer_eos_id(tok), 2);
    qlora_tokenizer_free(tok);
    tu_write_file(cfg, "{\"eos_token\":", 13);
    ck_assert_qlora_fails(qlora_tokenizer_load(path, &tok), QLORA_ERR_FORMAT, "tokenizer_config.json");
    tu_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(buffers_work_like_snprintf) {
    qlora_tokenizer *tok = NULL;
    ck_assert_qlora_ok(qlora_tokenizer_load(tu_fixture("tokenizer_bytelevel.json"), &tok));
    const char *text = "Hello world, café 😀";
    size_t n = 0, m = 0;
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, text, strlen(text), 1, NULL, 0, &n));
    ck_assert_uint_gt(n, 3);
    int32_t full[64], part[64];
    for (int i = 0; i < 64; i++)
        part[i] = -7;
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, text, strlen(text), 1, full, 64, &m));
    ck_assert_uint_eq(m, n);
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, text, strlen(text), 1, part, 2, &m));
    ck_assert_uint_eq(m, n);
    ck_assert_int_eq(part[0], full[0]);
    ck_assert_int_eq(part[1], full[1]);
    ck_assert_int_eq(part[2], -7);
    size_t needed = 0;
    char small[6];
    ck_assert_qlora_ok(qlora_tokenizer_decode(tok, full, n, 1, small, sizeof small, &needed));
    ck_assert_uint_eq(needed, strlen(text) + 1);
    ck_assert_str_eq(small, "Hello");
    /* A text embedded in a larger buffer: only len bytes count. */
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, "Hello world", 5, 0, part, 64, &m));
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, "Hello", 5, 0, full, 64, &n));
    ck_assert_uint_eq(m, n);
    ck_assert_int_eq(memcmp(part, full, n * sizeof *full), 0);
    qlora_tokenizer_free(tok);
}
END_TEST

START_TEST(bad_input_is_refused) {
    qlora_tokenizer *tok = NULL;
    ck_assert_qlora_ok(qlora_tokenizer_load(tu_fixture("tokenizer_spm.json"), &tok));
    size_t n = 0;
    int32_t ids[8];
    ck_assert_qlora_fails(qlora_tokenizer_encode(tok, "ab\xC3(", 4, 0, ids, 8, &n), QLORA_ERR_INVALID_ARG,
                          "not valid UTF-8 (byte 2");
    ck_assert_qlora_fails(qlora_tokenizer_encode(tok, "\xED\xA0\x80", 3, 0, ids, 8, &n), QLORA_ERR_INVALID_ARG,
                          "UTF-8");
    int32_t bad[2] = {5, 700};
    char buf[16];
    ck_assert_qlora_fails(qlora_tokenizer_decode(tok, bad, 2, 0, buf, sizeof buf, &n), QLORA_ERR_INVALID_ARG,
                          "ids[1] = 700");
    bad[1] = -1;
    ck_assert_qlora_fails(qlora_tokenizer_decode(tok, bad, 2, 0, buf, sizeof buf, &n), QLORA_ERR_INVALID_ARG,
                          "ids[1] = -1");
    ck_assert_qlora_fails(qlora_tokenizer_encode(NULL, "a", 1, 0, ids, 8, &n), QLORA_ERR_INVALID_ARG, "tok");
    ck_assert_qlora_fails(qlora_tokenizer_encode(tok, NULL, 1, 0, ids, 8, &n), QLORA_ERR_INVALID_ARG, "text");
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, NULL, 0, 0, NULL, 0, &n));
    ck_assert_uint_eq(n, 0);
    qlora_tokenizer_free(tok);
}
END_TEST

/* Writes `json` as a tokenizer file and checks that loading fails with status and needle. */
static void refused(const char *json, qlora_status status, const char *needle) {
    char *dir = tu_tempdir();
    char path[1024];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    tu_write_file(path, json, strlen(json));
    qlora_tokenizer *tok = (qlora_tokenizer *)(uintptr_t)1;
    ck_assert_qlora_fails(qlora_tokenizer_load(path, &tok), status, needle);
    ck_assert_ptr_null(tok);
    ck_assert_msg(strstr(qlora_last_error(), path) != NULL, "error '%s' does not name the file", qlora_last_error());
    tu_rmtree(dir);
    free(dir);
}

#define MODEL_OK "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[\"a b\"]}"

START_TEST(bad_files_are_refused) {
    qlora_tokenizer *tok = NULL;
    ck_assert_qlora_fails(qlora_tokenizer_load("/nonexistent/tokenizer.json", &tok), QLORA_ERR_NOT_FOUND,
                          "/nonexistent/tokenizer.json");
    refused("{\"model\": {\"type\": \"BPE\", ", QLORA_ERR_FORMAT, "malformed JSON");
    refused("[1, 2]", QLORA_ERR_FORMAT, "not a JSON object");
    refused("{\"model\":{\"type\":\"WordPiece\",\"vocab\":{\"a\":0}}}", QLORA_ERR_UNSUPPORTED,
            "model type 'WordPiece' is not supported");
    refused("{\"model\":{\"type\":\"Unigram\",\"vocab\":[[\"a\",0.0]]}}", QLORA_ERR_UNSUPPORTED, "'Unigram'");
    refused("{\"normalizer\":{\"type\":\"Lowercase\"}," MODEL_OK "}", QLORA_ERR_UNSUPPORTED,
            "normalizer 'Lowercase'");
    refused("{\"pre_tokenizer\":{\"type\":\"Whitespace\"}," MODEL_OK "}", QLORA_ERR_UNSUPPORTED,
            "pre_tokenizer 'Whitespace'");
    refused("{\"decoder\":{\"type\":\"WordPiece\"}," MODEL_OK "}", QLORA_ERR_UNSUPPORTED, "decoder 'WordPiece'");
    refused("{\"post_processor\":{\"type\":\"BertProcessing\"}," MODEL_OK "}", QLORA_ERR_UNSUPPORTED,
            "post_processor 'BertProcessing'");
    refused("{\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(a\"},\"behavior\":\"Isolated\"}," MODEL_OK
            "}", QLORA_ERR_FORMAT, "does not compile");
    refused("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"a b\"]}}", QLORA_ERR_FORMAT,
            "merge #0 ('a' + 'b'): 'ab' is not in the vocab");
    refused("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[\"ab\"]}}", QLORA_ERR_FORMAT,
            "merge #0 is neither");
    refused("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-3},\"merges\":[]}}", QLORA_ERR_FORMAT,
            "vocab entry 'a' has no valid id");
    refused("{\"model\":{\"type\":\"BPE\",\"dropout\":0.1,\"vocab\":{\"a\":0},\"merges\":[]}}", QLORA_ERR_UNSUPPORTED,
            "dropout");
    refused("{\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"vocab\":{\"a\":0},\"merges\":[]}}",
            QLORA_ERR_FORMAT, "unk_token '<unk>' is not in the vocab");
    refused("{\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\"}},"
            "{\"Sequence\":{\"id\":\"A\"}}],\"special_tokens\":{}}," MODEL_OK "}", QLORA_ERR_FORMAT,
            "special token '<s>' is unknown");
    refused("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"x\":\"\xC3\x28\"}", QLORA_ERR_FORMAT,
            "invalid UTF-8");
}
END_TEST

/* A minimal file: merges in the pair form (tokens may hold spaces), no pre-tokenizer, no
 * decoder (tokens are joined with spaces), unk fused over unknown characters. */
START_TEST(pair_merges_and_fused_unk) {
    const char *json = "{\"added_tokens\":[{\"id\":5,\"content\":\"<x>\",\"special\":true}],"
                       "\"model\":{\"type\":\"BPE\",\"unk_token\":\"?\",\"fuse_unk\":true,"
                       "\"vocab\":{\"?\":0,\"a\":1,\" \":2,\"a \":3,\"a a\":4},"
                       "\"merges\":[[\"a\",\" \"],[\"a \",\"a\"]]}}";
    char *dir = tu_tempdir();
    char path[1024];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    tu_write_file(path, json, strlen(json));
    qlora_tokenizer *tok = NULL;
    ck_assert_qlora_ok(qlora_tokenizer_load(path, &tok));
    int32_t ids[16];
    size_t n = 0;
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, "a azz<x>a", 9, 1, ids, 16, &n));
    ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(ids[0], 4); /* "a a" */
    ck_assert_int_eq(ids[1], 0); /* "zz" fused into one unk */
    ck_assert_int_eq(ids[2], 5);
    ck_assert_int_eq(ids[3], 1);
    char buf[64];
    size_t needed = 0;
    ck_assert_qlora_ok(qlora_tokenizer_decode(tok, ids, n, 0, buf, sizeof buf, &needed));
    ck_assert_str_eq(buf, "a a ? <x> a");
    ck_assert_qlora_ok(qlora_tokenizer_decode(tok, ids, n, 1, buf, sizeof buf, &needed));
    ck_assert_str_eq(buf, "a a ? a");
    qlora_tokenizer_free(tok);
    tu_rmtree(dir);
    free(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("tokenizer");
    tcase_add_test(tc, bytelevel_matches_reference);
    tcase_add_test(tc, spm_metaspace_matches_reference);
    tcase_add_test(tc, spm_legacy_matches_reference);
    tcase_add_test(tc, qwen2_nfc_matches_reference);
    tcase_add_test(tc, unicode_normalizers_match_reference);
    tcase_add_test(tc, special_ids_and_lookup);
    tcase_add_test(tc, eos_from_tokenizer_config);
    tcase_add_test(tc, buffers_work_like_snprintf);
    tcase_add_test(tc, bad_input_is_refused);
    tcase_add_test(tc, bad_files_are_refused);
    tcase_add_test(tc, pair_merges_and_fused_unk);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
