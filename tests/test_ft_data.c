/* qlora-ft's training data (examples/qlora-ft/ft_data.h): the formats and their templates,
 * masks, truncation, malformed records, the eval split and the batcher, with the default
 * tokenizer of examples/qlora-ft/default. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ft_data.h"
#include "testutil.h"

/* The embedded default data (cmake/embed_files.cmake). */
extern const unsigned char ft_default_data[];
extern const size_t ft_default_data_len;

/* The QLoRA repository's Alpaca templates, written out here independently of the module. */
#define ALPACA_INPUT_PROMPT(ins, in)                                                                        \
    "Below is an instruction that describes a task, paired with an input that provides further context. " \
    "Write a response that appropriately completes the request.\n\n### Instruction:\n" ins                 \
    "\n\n### Input:\n" in "\n\n### Response: "
#define ALPACA_PROMPT(ins)                                                                                  \
    "Below is an instruction that describes a task. Write a response that appropriately completes the "   \
    "request.\n\n### Instruction:\n" ins "\n\n### Response: "

static qlora_tokenizer *tok;
static int32_t bos, eos;
static char dir[4096];

static void setup(void) {
    const char *path = tu_fixture("../../examples/qlora-ft/default/tokenizer.json");
    ck_assert_qlora_ok(qlora_tokenizer_load(path, &tok));
    bos = qlora_tokenizer_bos_id(tok);
    eos = qlora_tokenizer_eos_id(tok);
    ck_assert_int_ge(bos, 0);
    ck_assert_int_ge(eos, 0);
    char *d = tu_tempdir();
    snprintf(dir, sizeof dir, "%s", d);
    free(d);
}

static void teardown(void) {
    qlora_tokenizer_free(tok);
    tu_rmtree(dir);
}

static const char *write_data(const char *name, const char *text) {
    static char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    tu_write_file(path, text, strlen(text));
    return path;
}

static ft_data_opts opts_default(void) { return (ft_data_opts){FT_FORMAT_AUTO, 512, 0, 0}; }

static void load_ok(const char *path, const ft_data_opts *o, ft_dataset *ds) {
    char err[1024];
    int r = ft_dataset_load(path, NULL, 0, NULL, tok, o, ds, err, sizeof err);
    ck_assert_msg(r == 0, "load %s: %s", path, err);
}

/* Loading fails with a message that contains `needle` (e.g. "file:3: field"). */
static void load_fails(const char *path, const ft_data_opts *o, const char *needle) {
    char err[1024];
    ft_dataset ds;
    int r = ft_dataset_load(path, NULL, 0, NULL, tok, o, &ds, err, sizeof err);
    ck_assert_msg(r != 0, "load %s succeeded, expected '%s'", path, needle);
    ck_assert_msg(strstr(err, needle) != NULL, "error '%s' lacks '%s'", err, needle);
    ck_assert_int_eq(ds.count, 0);
}

/* Expected tokens: pieces encoded one by one, each prompt (0) or response (1). */
typedef struct expect {
    int32_t ids[1024];
    uint8_t target[1024];
    int64_t n;
} expect;

static void expect_start(expect *e) {
    e->n = 0;
    e->ids[e->n] = bos;
    e->target[e->n++] = 0;
}

static void expect_piece(expect *e, const char *text, int target) {
    size_t n = 0;
    ck_assert_qlora_ok(qlora_tokenizer_encode(tok, text, strlen(text), 0, e->ids + e->n, 1024 - (size_t)e->n - 1, &n));
    ck_assert_uint_lt(n, 1024 - (size_t)e->n - 1);
    memset(e->target + e->n, target, n);
    e->n += (int64_t)n;
}

static void expect_end(expect *e) {
    e->ids[e->n] = eos;
    e->target[e->n++] = 1;
}

static void check_example(const ft_example *x, const expect *e, int train_on_prompt) {
    ck_assert_int_eq(x->n, e->n);
    for (int64_t i = 0; i < e->n; i++) {
        ck_assert_msg(x->ids[i] == e->ids[i], "token %lld: %d, expected %d", (long long)i, x->ids[i], e->ids[i]);
        int want = i == 0 ? 0 : train_on_prompt ? 1 : e->target[i];
        ck_assert_msg(x->target[i] == want, "target %lld: %d, expected %d", (long long)i, x->target[i], want);
    }
}

static int64_t count_targets(const ft_dataset *ds) {
    int64_t t = 0;
    for (int64_t i = 0; i < ds->count; i++)
        for (int64_t k = 0; k < ds->ex[i].n; k++)
            t += ds->ex[i].target[k];
    return t;
}

START_TEST(format_names_round_trip) {
    for (int f = FT_FORMAT_AUTO; f <= FT_FORMAT_CHAT; f++)
        ck_assert_int_eq(ft_format_from_name(ft_format_name((ft_format)f)), f);
    ck_assert_int_eq(ft_format_from_name("prompt-completion"), FT_FORMAT_PROMPT_COMPLETION);
    ck_assert_int_eq(ft_format_from_name("sharegpt"), -1);
}
END_TEST

static const char ALPACA_JSONL[] =
    "{\"instruction\": \"Add the numbers.\", \"input\": \"3 and 4\", \"output\": \"3 plus 4 is 7.\"}\n"
    "{\"instruction\": \"Name a colour.\", \"input\": \"\", \"output\": \"Blue.\"}\n"
    "\n"
    "{\"instruction\": \"Say hi.\", \"output\": \"Hi!\"}\r\n"
    "{\"instruction\": \"Count to two.\", \"input\": null, \"output\": \"One, two.\"}\n";

static void check_alpaca(const ft_dataset *ds, int train_on_prompt) {
    ck_assert_int_eq(ds->format, FT_FORMAT_ALPACA);
    ck_assert_int_eq(ds->count, 4);
    expect e;
    expect_start(&e);
    expect_piece(&e, ALPACA_INPUT_PROMPT("Add the numbers.", "3 and 4"), 0);
    expect_piece(&e, "3 plus 4 is 7.", 1);
    expect_end(&e);
    check_example(&ds->ex[0], &e, train_on_prompt);
    const char *const ins[3] = {ALPACA_PROMPT("Name a colour."), ALPACA_PROMPT("Say hi."),
                                ALPACA_PROMPT("Count to two.")};
    const char *const out[3] = {"Blue.", "Hi!", "One, two."};
    for (int i = 0; i < 3; i++) {
        expect_start(&e);
        expect_piece(&e, ins[i], 0);
        expect_piece(&e, out[i], 1);
        expect_end(&e);
        check_example(&ds->ex[i + 1], &e, train_on_prompt);
    }
    int64_t tokens = 0;
    for (int i = 0; i < 4; i++)
        tokens += ds->ex[i].n;
    ck_assert_int_eq(ds->tokens, tokens);
    ck_assert_int_eq(ds->target_tokens, count_targets(ds));
    if (train_on_prompt)
        ck_assert_int_eq(ds->target_tokens, tokens - 4);
    ck_assert_int_eq(ds->truncated, 0);
    ck_assert_int_eq(ds->skipped, 0);
}

START_TEST(alpaca_with_and_without_input) {
    ft_data_opts o = opts_default();
    ft_dataset ds;
    load_ok(write_data("alpaca.jsonl", ALPACA_JSONL), &o, &ds);
    check_alpaca(&ds, 0);
    ft_dataset_free(&ds);
    o.format = FT_FORMAT_ALPACA; /* named rather than found: the same */
    load_ok(write_data("alpaca.jsonl", ALPACA_JSONL), &o, &ds);
    check_alpaca(&ds, 0);
    ft_dataset_free(&ds);
}
END_TEST

START_TEST(train_on_prompt_targets_every_token) {
    ft_data_opts o = opts_default();
    o.train_on_prompt = 1;
    ft_dataset ds;
    load_ok(write_data("alpaca.jsonl", ALPACA_JSONL), &o, &ds);
    check_alpaca(&ds, 1);
    ft_dataset_free(&ds);
}
END_TEST

START_TEST(text_and_prompt_completion) {
    ft_data_opts o = opts_default();
    ft_dataset ds;
    load_ok(write_data("text.jsonl", "{\"text\": \"The cat sat on the mat.\"}\n{\"text\": \"\"}\n"), &o, &ds);
    ck_assert_int_eq(ds.format, FT_FORMAT_TEXT);
    ck_assert_int_eq(ds.count, 2);
    expect e;
    expect_start(&e);
    expect_piece(&e, "The cat sat on the mat.", 1);
    expect_end(&e);
    check_example(&ds.ex[0], &e, 0);
    expect_start(&e); /* an empty text still teaches EOS */
    expect_end(&e);
    check_example(&ds.ex[1], &e, 0);
    ft_dataset_free(&ds);

    load_ok(write_data("pc.jsonl", "{\"prompt\": \"Q: 2+2?\\nA:\", \"completion\": \" 4\"}\n"), &o, &ds);
    ck_assert_int_eq(ds.format, FT_FORMAT_PROMPT_COMPLETION);
    expect_start(&e);
    expect_piece(&e, "Q: 2+2?\nA:", 0);
    expect_piece(&e, " 4", 1);
    expect_end(&e);
    check_example(&ds.ex[0], &e, 0);
    ck_assert_int_eq(ds.target_tokens, count_targets(&ds));
    ft_dataset_free(&ds);
}
END_TEST

START_TEST(chat_turns_and_masks) {
    ft_data_opts o = opts_default();
    ft_dataset ds;
    load_ok(write_data("chat.jsonl",
                       "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},"
                       " {\"role\": \"user\", \"content\": \"Hello\"}, {\"role\": \"assistant\", \"content\": \"Hi.\"},"
                       " {\"role\": \"user\", \"content\": \"Two plus two?\"},"
                       " {\"role\": \"assistant\", \"content\": \"Four.\"}]}\n"
                       "{\"messages\": [{\"role\": \"user\", \"content\": \"Ping\"},"
                       " {\"role\": \"assistant\", \"content\": \"Pong\"}]}\n"),
            &o, &ds);
    ck_assert_int_eq(ds.format, FT_FORMAT_CHAT);
    ck_assert_int_eq(ds.count, 2);
    expect e;
    expect_start(&e);
    expect_piece(&e, "### Human: Be brief.\n\nHello### Assistant: ", 0);
    expect_piece(&e, "Hi.", 1);
    expect_piece(&e, "### Human: Two plus two?### Assistant: ", 0);
    expect_piece(&e, "Four.", 1);
    expect_end(&e);
    check_example(&ds.ex[0], &e, 0);
    expect_start(&e);
    expect_piece(&e, "### Human: Ping### Assistant: ", 0);
    expect_piece(&e, "Pong", 1);
    expect_end(&e);
    check_example(&ds.ex[1], &e, 0);
    ft_dataset_free(&ds);

    const char *good = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
                       "{\"role\": \"assistant\", \"content\": \"b\"}]}\n";
    char text[1024];
    snprintf(text, sizeof text, "%s%s", good, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n");
    load_fails(write_data("c1.jsonl", text), &o, "c1.jsonl:2: the conversation does not end with an assistant");
    snprintf(text, sizeof text, "%s%s", good,
             "{\"messages\": [{\"role\": \"bot\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}");
    load_fails(write_data("c2.jsonl", text), &o, "c2.jsonl:2: messages[0]: role 'bot' is not");
    snprintf(text, sizeof text, "%s%s", good,
             "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}");
    load_fails(write_data("c3.jsonl", text), &o, "c3.jsonl:2: messages[1]: a system message must be followed");
    snprintf(text, sizeof text, "%s%s", good, "{\"messages\": [{\"role\": \"user\", \"content\": [1]}]}");
    load_fails(write_data("c4.jsonl", text), &o, "c4.jsonl:2: messages[0]: field 'content' is an array");
    snprintf(text, sizeof text, "%s%s", good, "{\"messages\": {}}");
    load_fails(write_data("c5.jsonl", text), &o, "c5.jsonl:2: field 'messages' is an object, not an array");
}
END_TEST

START_TEST(truncation_is_counted) {
    ft_data_opts o = opts_default();
    ft_dataset full, cut;
    const char *path = write_data("trunc.jsonl",
                                  "{\"prompt\": \"Short.\", \"completion\": \" Yes.\"}\n"
                                  "{\"prompt\": \"A much longer prompt that keeps going with many words before\","
                                  " \"completion\": \" a rather long completion that goes on and on.\"}\n");
    load_ok(path, &o, &full);
    int64_t prompt = 0; /* BOS and prompt tokens of the second example */
    while (!full.ex[1].target[prompt])
        prompt++;
    ck_assert_int_lt(full.ex[0].n, prompt);
    ck_assert_int_gt(full.ex[1].n, prompt + 4);
    o.max_seq = prompt + 3;
    load_ok(path, &o, &cut);
    ck_assert_int_eq(cut.count, 2);
    ck_assert_int_eq(cut.truncated, 1);
    ck_assert_int_eq(cut.ex[0].n, full.ex[0].n);
    ck_assert_int_eq(cut.ex[1].n, o.max_seq);
    ck_assert_int_eq(memcmp(cut.ex[1].ids, full.ex[1].ids, (size_t)o.max_seq * sizeof(int32_t)), 0);
    ck_assert_int_eq(memcmp(cut.ex[1].target, full.ex[1].target, (size_t)o.max_seq), 0);
    ck_assert_int_eq(cut.tokens, full.ex[0].n + o.max_seq);
    ck_assert_int_eq(cut.target_tokens, count_targets(&cut));
    ck_assert_int_eq(cut.target_tokens, full.target_tokens - (full.ex[1].n - o.max_seq));
    ft_dataset_free(&full);
    ft_dataset_free(&cut);

    /* A prompt that fills max_seq leaves nothing to learn: an error, or a skip. */
    o.max_seq = prompt;
    char needle[128];
    snprintf(needle, sizeof needle, "trunc.jsonl:2: no target tokens left when truncated to %lld", (long long)prompt);
    load_fails(path, &o, needle);
    o.skip_bad_lines = 1;
    load_ok(path, &o, &cut);
    ck_assert_int_eq(cut.count, 1);
    ck_assert_int_eq(cut.skipped, 1);
    ck_assert_int_eq(cut.truncated, 0);
    ft_dataset_free(&cut);
}
END_TEST

/* Lines far longer than any stdio buffer are read whole (here ~240 KB), in both forms. */
START_TEST(long_lines_are_read_whole) {
    size_t words = 60000, cap = words * 5 + 64;
    char *text = malloc(cap);
    ck_assert_ptr_nonnull(text);
    size_t len = (size_t)snprintf(text, cap, "{\"text\": \"");
    for (size_t i = 0; i < words; i++)
        len += (size_t)snprintf(text + len, cap - len, "%s", i % 2 ? "mat " : "cat ");
    len += (size_t)snprintf(text + len, cap - len, "end\"}\n{\"text\": \"short\"}\n");
    ft_data_opts o = opts_default();
    ft_dataset ds;
    load_ok(write_data("long.jsonl", text), &o, &ds);
    ck_assert_int_eq(ds.count, 2);
    ck_assert_int_eq(ds.truncated, 1);
    ck_assert_int_eq(ds.ex[0].n, 512);
    ck_assert_int_eq(ds.ex[1].ids[ds.ex[1].n - 1], eos);
    ft_dataset_free(&ds);
    /* The same records as a JSON array. */
    char *nl = strchr(text, '\n');
    *nl = ',';
    text[len - 1] = ']';
    memmove(text + 1, text, len);
    text[0] = '[';
    text[len + 1] = '\0';
    load_ok(write_data("long.json", text), &o, &ds);
    ck_assert_int_eq(ds.count, 2);
    ck_assert_int_eq(ds.truncated, 1);
    ft_dataset_free(&ds);
    free(text);
}
END_TEST

/* Each malformed record, alone after two good lines (and a blank one), is reported at its line. */
START_TEST(malformed_records_name_file_and_line) {
    static const char *const bad[][2] = {
        {"{\"instruction\": \"x\", \"output\": ", "bad.jsonl:4: not valid JSON"},
        {"{\"instruction\": \"x\"}", "bad.jsonl:4: field 'output' is missing"},
        {"{\"instruction\": \"x\", \"output\": 5}", "bad.jsonl:4: field 'output' is a number, not a string"},
        {"{\"instruction\": \"x\", \"input\": [], \"output\": \"y\"}", "bad.jsonl:4: field 'input' is an array"},
        {"{\"text\": \"plain\"}", "bad.jsonl:4: a record in the text format in a file of the alpaca format"},
        {"[1, 2]", "bad.jsonl:4: the record is not a JSON object"},
        {"{\"instruction\": \"x\", \"output\": \"y\"} extra", "bad.jsonl:4: unexpected text after the JSON record"},
        {"{\"instruction\": \"x\", \"output\": \"\xff\"}", "bad.jsonl:4: cannot tokenize"},
    };
    const char *good = "{\"instruction\": \"a\", \"output\": \"b\"}\n";
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        char text[1024];
        snprintf(text, sizeof text, "%s\n%s%s\n%s", good, good, bad[k][0], good);
        const char *path = write_data("bad.jsonl", text);
        ft_data_opts o = opts_default();
        load_fails(path, &o, bad[k][1]);
        o.skip_bad_lines = 1;
        ft_dataset ds;
        char err[1024];
        ck_assert_int_eq(ft_dataset_load(path, NULL, 0, NULL, tok, &o, &ds, err, sizeof err), 0);
        ck_assert_int_eq(ds.count, 3);
        ck_assert_int_eq(ds.skipped, 1);
        ck_assert_msg(strstr(err, bad[k][1]) != NULL, "first skip '%s' lacks '%s'", err, bad[k][1]);
        ft_dataset_free(&ds);
    }
    /* No record names a format, an explicit format mismatching, an empty file, only skips. */
    ft_data_opts o = opts_default();
    load_fails(write_data("none.jsonl", "{\"question\": \"q\"}\n"), &o, "none.jsonl:1: the record has none of the fields");
    o.format = FT_FORMAT_PROMPT_COMPLETION;
    load_fails(write_data("named.jsonl", "{\"prompt\": \"p\", \"completion\": \"c\"}\n{\"text\": \"t\"}\n"), &o,
               "named.jsonl:2: field 'prompt' is missing");
    o.format = FT_FORMAT_AUTO;
    load_fails(write_data("empty.jsonl", ""), &o, "empty.jsonl:1: no usable records");
    load_fails(write_data("blank.jsonl", "\n  \n\n"), &o, "blank.jsonl:3: no usable records");
    o.skip_bad_lines = 1;
    load_fails(write_data("allbad.jsonl", "nope\n{}\n"), &o, "allbad.jsonl:2: no usable records (2 skipped)");
    char err[1024];
    ft_dataset ds;
    ck_assert_int_ne(ft_dataset_load(tu_fixture("no-such-dir/x.jsonl"), NULL, 0, NULL, tok, &o, &ds, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "no-such-dir/x.jsonl: cannot open"));
}
END_TEST

START_TEST(json_array_form) {
    ft_data_opts o = opts_default();
    ft_dataset lines, array, memory;
    load_ok(write_data("alpaca.jsonl", ALPACA_JSONL), &o, &lines);
    const char *array_text = "\xEF\xBB\xBF[\n"
                             "  {\"instruction\": \"Add the numbers.\", \"input\": \"3 and 4\", \"output\": \"3 plus 4 is 7.\"},\n"
                             "  {\"instruction\": \"Name a colour.\",\n   \"input\": \"\", \"output\": \"Blue.\"},\n"
                             "  {\"instruction\": \"Say hi.\", \"output\": \"Hi!\"}, {\"instruction\": \"Count to two.\","
                             " \"input\": null, \"output\": \"One, two.\"}\n]\n";
    load_ok(write_data("alpaca.json", array_text), &o, &array);
    ck_assert_int_eq(array.count, lines.count);
    for (int64_t i = 0; i < lines.count; i++) {
        ck_assert_int_eq(array.ex[i].n, lines.ex[i].n);
        ck_assert_int_eq(memcmp(array.ex[i].ids, lines.ex[i].ids, (size_t)lines.ex[i].n * sizeof(int32_t)), 0);
        ck_assert_int_eq(memcmp(array.ex[i].target, lines.ex[i].target, (size_t)lines.ex[i].n), 0);
    }
    /* The same bytes from memory, named in messages by `name`. */
    char err[1024];
    ck_assert_int_eq(ft_dataset_load(NULL, array_text, strlen(array_text), "mem.json", tok, &o, &memory, err, sizeof err),
                     0);
    ck_assert_int_eq(memory.count, lines.count);
    ck_assert_int_eq(memory.tokens, lines.tokens);
    ft_dataset_free(&lines);
    ft_dataset_free(&array);
    ft_dataset_free(&memory);

    load_fails(write_data("a.json", "[\n {\"text\": \"a\"},\n\n {\"text\": 3}\n]"), &o, "a.json:4: element 1: field 'text'");
    o.skip_bad_lines = 1;
    load_ok(write_data("a.json", "[\n {\"text\": \"a\"},\n\n {\"text\": 3}\n]"), &o, &array);
    ck_assert_int_eq(array.count, 1);
    ck_assert_int_eq(array.skipped, 1);
    ft_dataset_free(&array);
    o.skip_bad_lines = 0;
    load_fails(write_data("b.json", "[{\"text\": \"a\"},\n {\"text\": \"b\",}\n]"), &o, "b.json:2: element 1: not valid JSON");
    load_fails(write_data("c.json", "[{\"text\": \"a\"}\n {\"text\": \"b\"}]"), &o, "c.json:2: expected ',' or ']' after element 0");
    load_fails(write_data("d.json", "[{\"text\": \"a\"},\n"), &o, "d.json:2: the JSON array is not closed");
    load_fails(write_data("e.json", "[]"), &o, "e.json:1: no usable records");
    ck_assert_int_ne(ft_dataset_load(NULL, "{\"text\": 1}", 11, "embedded.jsonl", tok, &o, &memory, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "embedded.jsonl:1: field 'text'"));
}
END_TEST

/* A JSON Lines text of `n` random prompt-completion records: random words, random lengths. */
static char *random_records(tu_rng *r, int n) {
    static const char *const words[] = {"apple", "river", "seven", "blue", "the", "of", "garden", "quick",
                                        "plus", "is", "word", "letter", "42", "sky", "walks", "to"};
    size_t cap = (size_t)n * 800 + 1, len = 0;
    char *text = malloc(cap);
    ck_assert_ptr_nonnull(text);
    for (int i = 0; i < n; i++) {
        int np = 1 + (int)(tu_next(r) % 20), nc = 1 + (int)(tu_next(r) % 25);
        len += (size_t)snprintf(text + len, cap - len, "{\"prompt\": \"");
        for (int w = 0; w < np; w++)
            len += (size_t)snprintf(text + len, cap - len, "%s%s", w ? " " : "", words[tu_next(r) % 16]);
        len += (size_t)snprintf(text + len, cap - len, "\", \"completion\": \"");
        for (int w = 0; w < nc; w++)
            len += (size_t)snprintf(text + len, cap - len, " %s", words[tu_next(r) % 16]);
        len += (size_t)snprintf(text + len, cap - len, "\"}\n");
    }
    return text;
}

/* Longer than any random record (at most 45 words of at most 4 tokens each, BOS and EOS). */
#define RANDOM_MAX_SEQ 200

static void load_random(int n, ft_dataset *ds) {
    tu_rng r;
    tu_rng_init(&r, tu_seed());
    char *text = random_records(&r, n);
    ft_data_opts o = opts_default();
    o.max_seq = RANDOM_MAX_SEQ;
    o.train_on_prompt = (int)(tu_next(&r) & 1);
    char err[1024];
    int rc = ft_dataset_load(NULL, text, strlen(text), "random.jsonl", tok, &o, ds, err, sizeof err);
    free(text);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_int_eq(ds->count, n);
    ck_assert_int_eq(ds->truncated, 0);
}

static void load_default(ft_dataset *ds) {
    ft_data_opts o = opts_default();
    char err[1024];
    int rc = ft_dataset_load(NULL, (const char *)ft_default_data, ft_default_data_len, "default/data.jsonl", tok, &o, ds,
                             err, sizeof err);
    ck_assert_msg(rc == 0, "%s", err);
}

START_TEST(default_data_loads_cleanly) {
    ft_dataset ds;
    load_default(&ds);
    ck_assert_int_eq(ds.format, FT_FORMAT_ALPACA);
    ck_assert_int_ge(ds.count, 600);
    ck_assert_int_eq(ds.skipped, 0);
    ck_assert_int_eq(ds.truncated, 0);
    ck_assert_int_eq(qlora_tokenizer_vocab_size(tok), 512);
    for (int64_t i = 0; i < ds.count; i++) {
        ck_assert_int_eq(ds.ex[i].ids[0], bos);
        ck_assert_int_eq(ds.ex[i].ids[ds.ex[i].n - 1], eos);
        ck_assert_int_le(ds.ex[i].n, 128);
    }
    ft_dataset_free(&ds);
}
END_TEST

static int same_example(const ft_example *a, const ft_example *b) {
    return a->n == b->n && !memcmp(a->ids, b->ids, (size_t)a->n * sizeof(int32_t)) &&
           !memcmp(a->target, b->target, (size_t)a->n);
}

START_TEST(split_is_deterministic_and_keeps_order) {
    ft_dataset all, train1, eval1, train2, eval2, train3, eval3;
    load_default(&all);
    load_default(&train1);
    load_default(&train2);
    load_default(&train3);
    char err[256];
    ck_assert_int_eq(ft_dataset_split(&train1, 0.1, 7, &eval1, err, sizeof err), 0);
    ck_assert_int_eq(ft_dataset_split(&train2, 0.1, 7, &eval2, err, sizeof err), 0);
    ck_assert_int_eq(ft_dataset_split(&train3, 0.1, 8, &eval3, err, sizeof err), 0);
    int64_t want = (int64_t)(0.1 * (double)all.count + 0.5);
    ck_assert_int_eq(eval1.count, want);
    ck_assert_int_eq(train1.count + eval1.count, all.count);
    ck_assert_int_eq(train1.tokens + eval1.tokens, all.tokens);
    ck_assert_int_eq(train1.target_tokens + eval1.target_tokens, all.target_tokens);
    ck_assert_int_eq(eval1.target_tokens, count_targets(&eval1));
    int differs = eval3.count != eval1.count;
    for (int64_t i = 0; i < eval1.count; i++) {
        ck_assert(same_example(&eval1.ex[i], &eval2.ex[i]));
        differs |= i < eval3.count && !same_example(&eval1.ex[i], &eval3.ex[i]);
    }
    ck_assert_msg(differs, "seeds 7 and 8 chose the same eval set");
    /* Both parts are subsequences of the original order, together covering it. */
    int64_t t = 0, e = 0;
    for (int64_t i = 0; i < all.count; i++) {
        if (e < eval1.count && same_example(&all.ex[i], &eval1.ex[e]))
            e++;
        else if (t < train1.count && same_example(&all.ex[i], &train1.ex[t]))
            t++;
    }
    ck_assert_int_eq(t, train1.count);
    ck_assert_int_eq(e, eval1.count);
    ft_dataset_free(&train1);
    ft_dataset_free(&eval1);
    ft_dataset_free(&train2);
    ft_dataset_free(&eval2);
    ft_dataset_free(&train3);
    ft_dataset_free(&eval3);

    /* At least one, never all; nothing for a fraction 0 or a single example; [0, 1) only. */
    ft_dataset two, ev;
    ck_assert_int_eq(ft_dataset_split(&all, 1e-9, 1, &ev, err, sizeof err), 0);
    ck_assert_int_eq(ev.count, 1);
    ft_dataset_free(&ev);
    ck_assert_int_eq(ft_dataset_split(&all, 0.0, 1, &ev, err, sizeof err), 0);
    ck_assert_int_eq(ev.count, 0);
    ck_assert_int_ne(ft_dataset_split(&all, 1.0, 1, &ev, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "eval fraction 1"));
    ft_data_opts o = opts_default();
    load_ok(write_data("two.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n"), &o, &two);
    ck_assert_int_eq(ft_dataset_split(&two, 0.99, 3, &ev, err, sizeof err), 0);
    ck_assert_int_eq(ev.count, 1);
    ck_assert_int_eq(two.count, 1);
    ft_dataset_free(&ev);
    ck_assert_int_eq(ft_dataset_split(&two, 0.5, 3, &ev, err, sizeof err), 0);
    ck_assert_int_eq(ev.count, 0);
    ft_dataset_free(&two);
    ft_dataset_free(&all);
}
END_TEST

/* Checks a batch against the dataset: it is examples order[first..] back to back, with
 * seq_start/positions restarting at each and labels shifted inside each example only.
 * Returns the number of examples, marking them in seen[]. */
static int64_t check_batch(const ft_batcher *b, const ft_batch *x, int64_t first, int *seen) {
    const ft_dataset *ds = b->ds;
    int64_t t = 0, k = first, targets = 0;
    while (t < x->T) {
        ck_assert_int_lt(k, ds->count);
        const ft_example *e = &ds->ex[b->order[k]];
        seen[b->order[k]]++;
        ck_assert_int_le(t + e->n, x->T);
        for (int64_t i = 0; i < e->n; i++) {
            ck_assert_int_eq(x->tokens[t + i], e->ids[i]);
            ck_assert_int_eq(x->seq_start[t + i], t);
            ck_assert_int_eq(x->positions[t + i], i);
            int32_t want = i + 1 < e->n && e->target[i + 1] ? e->ids[i + 1] : -100;
            ck_assert_int_eq(x->labels[t + i], want);
            targets += want != -100;
        }
        ck_assert_int_eq(x->labels[t + e->n - 1], -100); /* never across into the next example */
        t += e->n;
        k++;
    }
    ck_assert_int_eq(x->examples, k - first);
    ck_assert_int_eq(x->targets, targets);
    return k - first;
}

START_TEST(batches_cover_each_epoch_once) {
    ft_dataset ds;
    load_random(203, &ds);
    for (int packing = 0; packing <= 1; packing++) {
        ft_batcher b;
        ft_batch x = {0};
        char err[256];
        int64_t mb = packing ? 2 : 5, max_seq = RANDOM_MAX_SEQ;
        ck_assert_int_eq(ft_batcher_init(&b, &ds, mb, max_seq, packing, 11, err, sizeof err), 0);
        int *seen = calloc((size_t)ds.count, sizeof *seen);
        for (int64_t epoch = 0; epoch < 3; epoch++) {
            memset(seen, 0, (size_t)ds.count * sizeof *seen);
            ck_assert_int_eq(b.epoch, epoch);
            ck_assert_int_eq(b.cursor, 0);
            int64_t consumed = 0;
            int64_t *order = malloc((size_t)ds.count * sizeof *order);
            memcpy(order, b.order, (size_t)ds.count * sizeof *order);
            while (b.epoch == epoch) {
                ck_assert_int_eq(b.cursor, consumed);
                ft_batcher bb = b; /* check against this epoch's order */
                bb.order = order;
                ck_assert_int_eq(ft_batcher_next(&b, &x, err, sizeof err), 0);
                int64_t n = check_batch(&bb, &x, consumed, seen);
                if (packing) {
                    /* rows: greedy fill of max_seq, at most mb rows; the batch is full unless the epoch ended */
                    int64_t rows = 0, used = max_seq + 1;
                    for (int64_t k = consumed; k < consumed + n; k++) {
                        int64_t len = ds.ex[order[k]].n;
                        if (used + len > max_seq) {
                            rows++;
                            used = 0;
                        }
                        used += len;
                    }
                    ck_assert_int_le(rows, mb);
                    if (consumed + n < ds.count)
                        ck_assert(rows == mb && used + ds.ex[order[consumed + n]].n > max_seq);
                } else {
                    ck_assert_int_eq(n, consumed + mb <= ds.count ? mb : ds.count - consumed);
                }
                consumed += n;
            }
            free(order);
            ck_assert_int_eq(consumed, ds.count);
            for (int64_t i = 0; i < ds.count; i++)
                ck_assert_msg(seen[i] == 1, "epoch %lld: example %lld seen %d times", (long long)epoch, (long long)i,
                              seen[i]);
        }
        free(seen);
        ft_batch_free(&x);
        ft_batcher_free(&b);
    }
    ft_dataset_free(&ds);
}
END_TEST

START_TEST(grouping_sorts_windows_by_length) {
    ft_dataset ds;
    load_random(700, &ds);
    char err[256];
    ft_batcher b, packed;
    int64_t mb = 3, window = 64 * mb;
    ck_assert_int_eq(ft_batcher_init(&b, &ds, mb, RANDOM_MAX_SEQ, 0, 5, err, sizeof err), 0);
    ck_assert_int_eq(ft_batcher_init(&packed, &ds, mb, RANDOM_MAX_SEQ, 1, 5, err, sizeof err), 0);
    /* The same permutation, each window of the grouped order sorted (the packed order is not). */
    int unsorted = 0;
    for (int64_t w = 0; w < ds.count; w += window) {
        int64_t end = w + window < ds.count ? w + window : ds.count;
        int64_t *sorted = malloc((size_t)(end - w) * sizeof *sorted);
        memcpy(sorted, packed.order + w, (size_t)(end - w) * sizeof *sorted);
        for (int64_t i = w; i < end; i++) {
            if (i > w) {
                ck_assert_int_le(ds.ex[b.order[i - 1]].n, ds.ex[b.order[i]].n);
                unsorted |= ds.ex[packed.order[i - 1]].n > ds.ex[packed.order[i]].n;
            }
            /* stable: equal lengths keep the permutation's order; the window holds the same examples */
            int64_t pos = -1;
            for (int64_t j = 0; j < end - w; j++)
                if (sorted[j] == b.order[i])
                    pos = j;
            ck_assert_msg(pos >= 0, "example %lld moved across windows", (long long)b.order[i]);
            if (i > w && ds.ex[b.order[i - 1]].n == ds.ex[b.order[i]].n) {
                int64_t prev = -1;
                for (int64_t j = 0; j < end - w; j++)
                    if (sorted[j] == b.order[i - 1])
                        prev = j;
                ck_assert_int_lt(prev, pos);
            }
        }
        free(sorted);
    }
    ck_assert(unsorted);
    ft_batcher_free(&b);
    ft_batcher_free(&packed);
    ft_dataset_free(&ds);
}
END_TEST

typedef struct walked {
    int64_t epoch, cursor, T;
    int32_t *tokens, *labels;
} walked;

START_TEST(seek_resumes_the_same_batches) {
    ft_dataset ds;
    load_random(97, &ds);
    for (int packing = 0; packing <= 1; packing++) {
        char err[256];
        ft_batcher b;
        ft_batch x = {0};
        ck_assert_int_eq(ft_batcher_init(&b, &ds, 4, RANDOM_MAX_SEQ, packing, 1234, err, sizeof err), 0);
        walked w[200];
        int n = 0;
        while (b.epoch < 3) {
            ck_assert_int_lt(n, 200);
            w[n].epoch = b.epoch;
            w[n].cursor = b.cursor;
            ck_assert_int_eq(ft_batcher_next(&b, &x, err, sizeof err), 0);
            w[n].T = x.T;
            w[n].tokens = malloc((size_t)x.T * sizeof(int32_t));
            w[n].labels = malloc((size_t)x.T * sizeof(int32_t));
            memcpy(w[n].tokens, x.tokens, (size_t)x.T * sizeof(int32_t));
            memcpy(w[n].labels, x.labels, (size_t)x.T * sizeof(int32_t));
            n++;
        }
        ft_batcher_free(&b);
        /* Resuming from any saved position replays the rest exactly. */
        for (int start = 0; start < n; start += 3) {
            ft_batcher r;
            ck_assert_int_eq(ft_batcher_init(&r, &ds, 4, RANDOM_MAX_SEQ, packing, 1234, err, sizeof err), 0);
            ck_assert_int_eq(ft_batcher_seek(&r, w[start].epoch, w[start].cursor, err, sizeof err), 0);
            for (int i = start; i < n; i++) {
                ck_assert_int_eq(r.epoch, w[i].epoch);
                ck_assert_int_eq(r.cursor, w[i].cursor);
                ck_assert_int_eq(ft_batcher_next(&r, &x, err, sizeof err), 0);
                ck_assert_int_eq(x.T, w[i].T);
                ck_assert_int_eq(memcmp(x.tokens, w[i].tokens, (size_t)x.T * sizeof(int32_t)), 0);
                ck_assert_int_eq(memcmp(x.labels, w[i].labels, (size_t)x.T * sizeof(int32_t)), 0);
            }
            ck_assert_int_eq(r.epoch, 3);
            ft_batcher_free(&r);
        }
        /* The end of an epoch is the start of the next; positions outside the data are refused. */
        ft_batcher r;
        ck_assert_int_eq(ft_batcher_init(&r, &ds, 4, RANDOM_MAX_SEQ, packing, 1234, err, sizeof err), 0);
        ck_assert_int_eq(ft_batcher_seek(&r, 1, ds.count, err, sizeof err), 0);
        ck_assert_int_eq(r.epoch, 2);
        ck_assert_int_eq(r.cursor, 0);
        ck_assert_int_ne(ft_batcher_seek(&r, 0, ds.count + 1, err, sizeof err), 0);
        ck_assert_ptr_nonnull(strstr(err, "outside the data"));
        ft_batcher_free(&r);
        for (int i = 0; i < n; i++) {
            free(w[i].tokens);
            free(w[i].labels);
        }
        ft_batch_free(&x);
    }
    ft_dataset_free(&ds);
}
END_TEST

START_TEST(epoch_orders_depend_on_seed_and_epoch) {
    ft_dataset ds;
    load_random(150, &ds);
    char err[256];
    ft_batcher a, b, c;
    ck_assert_int_eq(ft_batcher_init(&a, &ds, 2, RANDOM_MAX_SEQ, 1, 9, err, sizeof err), 0);
    ck_assert_int_eq(ft_batcher_init(&b, &ds, 2, RANDOM_MAX_SEQ, 1, 9, err, sizeof err), 0);
    ck_assert_int_eq(ft_batcher_init(&c, &ds, 2, RANDOM_MAX_SEQ, 1, 10, err, sizeof err), 0);
    ck_assert_int_eq(memcmp(a.order, b.order, (size_t)ds.count * sizeof(int64_t)), 0);
    ck_assert_int_ne(memcmp(a.order, c.order, (size_t)ds.count * sizeof(int64_t)), 0);
    ft_batcher_free(&c);
    ck_assert_int_eq(ft_batcher_seek(&b, 1, 0, err, sizeof err), 0);
    ck_assert_int_ne(memcmp(a.order, b.order, (size_t)ds.count * sizeof(int64_t)), 0);
    /* Every order is a permutation. */
    int *seen = calloc((size_t)ds.count, sizeof *seen);
    for (int64_t i = 0; i < ds.count; i++)
        seen[b.order[i]]++;
    for (int64_t i = 0; i < ds.count; i++)
        ck_assert_int_eq(seen[i], 1);
    free(seen);
    /* Examples longer than max_seq, and empty datasets, are refused at init. */
    ck_assert_int_ne(ft_batcher_init(&c, &ds, 2, 8, 1, 9, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(err, "max_seq 8"));
    ft_dataset empty = {0};
    ck_assert_int_ne(ft_batcher_init(&c, &empty, 2, RANDOM_MAX_SEQ, 1, 9, err, sizeof err), 0);
    ft_batcher_free(&a);
    ft_batcher_free(&b);
    ft_dataset_free(&ds);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ft_data");
    TCase *tc = tcase_create("ft_data");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, format_names_round_trip);
    tcase_add_test(tc, alpaca_with_and_without_input);
    tcase_add_test(tc, train_on_prompt_targets_every_token);
    tcase_add_test(tc, text_and_prompt_completion);
    tcase_add_test(tc, chat_turns_and_masks);
    tcase_add_test(tc, truncation_is_counted);
    tcase_add_test(tc, long_lines_are_read_whole);
    tcase_add_test(tc, malformed_records_name_file_and_line);
    tcase_add_test(tc, json_array_form);
    tcase_add_test(tc, default_data_loads_cleanly);
    tcase_add_test(tc, split_is_deterministic_and_keeps_order);
    tcase_add_test(tc, batches_cover_each_epoch_once);
    tcase_add_test(tc, grouping_sorts_windows_by_length);
    tcase_add_test(tc, seek_resumes_the_same_batches);
    tcase_add_test(tc, epoch_orders_depend_on_seed_and_epoch);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
