/*
 * Loading a training data set: records from a JSON Lines file (streamed a line at a time, of
 * any length: the file is never held whole), a JSON array (the form of alpaca_data.json, read
 * whole and parsed an element at a time so each error gets its line), or the embedded default
 * data; each record is rendered (ft_template.c), tokenized piece by piece, masked and truncated.
 *
 * Which of the two forms a file holds is read from its first character: '[' opens an array
 * (a JSON Lines record is an object, so it never starts that way), whatever the extension.
 */
#include "ft_error.h"
#include "ft_data.h"
#include "ft_template.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WHY_CAP 1024

typedef struct loader {
    const char *name;
    const qlora_tokenizer *tok;
    ft_data_opts opts;
    int32_t bos, eos;
    ft_dataset *ds;
    int64_t ex_cap;
    ft_render render;
    int32_t *ids;     /* the example being built */
    uint8_t *target;
    size_t n, cap;
    int64_t line;     /* the line being read (for messages) */
    char *err;
    size_t errcap;
} loader;

static int out_of_memory(loader *L) { return ft_fail(L->err, L->errcap, "%s: out of memory", L->name); }

/* A malformed record: skipped and counted (the first message kept in err) with skip_bad_lines,
 * else the end of loading. `element` >= 0 names the array element of a .json file. */
static int bad_record(loader *L, int64_t element, const char *why) {
    char where[64] = "";
    if (element >= 0)
        snprintf(where, sizeof where, "element %lld: ", (long long)element);
    if (L->opts.skip_bad_lines && L->ds->skipped++ > 0)
        return 0;
    ft_fail(L->err, L->errcap, "%s:%lld: %s%s", L->name, (long long)L->line, where, why);
    return L->opts.skip_bad_lines ? 0 : -1;
}

static int reserve_tokens(loader *L, size_t need) {
    if (need <= L->cap)
        return 0;
    size_t cap = L->cap ? L->cap : 256;
    while (cap < need)
        cap *= 2;
    int32_t *ids = realloc(L->ids, cap * sizeof *ids);
    if (!ids)
        return -1;
    L->ids = ids;
    uint8_t *target = realloc(L->target, cap);
    if (!target)
        return -1;
    L->target = target;
    L->cap = cap;
    return 0;
}

static int push_token(loader *L, int32_t id, int target) {
    if (reserve_tokens(L, L->n + 1))
        return -1;
    L->ids[L->n] = id;
    L->target[L->n++] = (uint8_t)target;
    return 0;
}

/* Tokenizes one piece onto the example: 0, 1 when the tokenizer refuses the text (why set,
 * e.g. invalid UTF-8), -1 when memory ran out. */
static int encode_piece(loader *L, const char *text, size_t len, int target, char *why) {
    if (len == 0)
        return 0;
    for (;;) {
        size_t n = 0;
        qlora_status st = qlora_tokenizer_encode(L->tok, text, len, 0, L->ids + L->n, L->cap - L->n, &n);
        if (st == QLORA_ERR_OUT_OF_MEMORY)
            return -1;
        if (st != QLORA_OK) {
            snprintf(why, WHY_CAP, "cannot tokenize: %s", qlora_last_error());
            return 1;
        }
        if (n <= L->cap - L->n) {
            memset(L->target + L->n, target, n);
            L->n += n;
            return 0;
        }
        if (reserve_tokens(L, L->n + n))
            return -1;
    }
}

static int store_example(loader *L) {
    ft_dataset *ds = L->ds;
    if (ds->count == L->ex_cap) {
        int64_t cap = L->ex_cap ? 2 * L->ex_cap : 64;
        ft_example *ex = realloc(ds->ex, (size_t)cap * sizeof *ex);
        if (!ex)
            return -1;
        ds->ex = ex;
        L->ex_cap = cap;
    }
    ft_example e = {malloc(L->n * sizeof *e.ids), malloc(L->n), (int64_t)L->n};
    if (!e.ids || !e.target) {
        free(e.ids);
        free(e.target);
        return -1;
    }
    memcpy(e.ids, L->ids, L->n * sizeof *e.ids);
    memcpy(e.target, L->target, L->n);
    ds->ex[ds->count++] = e;
    return 0;
}

/* One parsed record: shape check, rendering, tokens, mask, truncation. */
static int take_record(loader *L, const cJSON *rec, int64_t element) {
    char why[WHY_CAP];
    ft_dataset *ds = L->ds;
    if (!cJSON_IsObject(rec))
        return bad_record(L, element, "the record is not a JSON object");
    ft_format shape = ft_record_shape(rec);
    if (L->opts.format == FT_FORMAT_AUTO && ds->format == FT_FORMAT_AUTO) {
        if (shape == FT_FORMAT_AUTO)
            return bad_record(L, element, "the record has none of the fields that name a format "
                                          "('instruction', 'text', 'prompt', 'messages')");
        ds->format = shape;
    } else if (L->opts.format == FT_FORMAT_AUTO && shape != FT_FORMAT_AUTO && shape != ds->format) {
        snprintf(why, sizeof why, "a record in the %s format in a file of the %s format (chosen by its first record)",
                 ft_format_name(shape), ft_format_name(ds->format));
        return bad_record(L, element, why);
    }
    int r = ft_render_record(rec, ds->format, &L->render, why, sizeof why);
    if (r != 0)
        return r < 0 ? out_of_memory(L) : bad_record(L, element, why);

    int all = L->opts.train_on_prompt;
    L->n = 0;
    if (L->bos >= 0 && push_token(L, L->bos, 0))
        return out_of_memory(L);
    for (int i = 0; i < L->render.n; i++) {
        const ft_piece *p = &L->render.piece[i];
        r = encode_piece(L, L->render.text + p->off, p->len, all || p->response, why);
        if (r != 0)
            return r < 0 ? out_of_memory(L) : bad_record(L, element, why);
    }
    if (L->eos >= 0 && push_token(L, L->eos, 1))
        return out_of_memory(L);
    if (L->n)
        L->target[0] = 0; /* nothing precedes the first token, so it is never predicted */

    size_t full = L->n;
    if ((int64_t)L->n > L->opts.max_seq)
        L->n = (size_t)L->opts.max_seq;
    int64_t targets = 0;
    for (size_t i = 0; i < L->n; i++)
        targets += L->target[i];
    if (targets == 0) {
        if (full > L->n)
            snprintf(why, sizeof why, "no target tokens left when truncated to %lld of its %zu tokens "
                     "(the prompt is too long)", (long long)L->opts.max_seq, full);
        else
            snprintf(why, sizeof why, "no target tokens (the response is empty and the tokenizer has no EOS)");
        return bad_record(L, element, why);
    }
    if (store_example(L))
        return out_of_memory(L);
    ds->truncated += full > L->n;
    ds->tokens += (int64_t)L->n;
    ds->target_tokens += targets;
    return 0;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

/* One line of a JSON Lines file (no newline): blank lines are skipped. */
static int take_line(loader *L, const char *s, size_t len) {
    if (L->line == 1 && len >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) { /* UTF-8 byte order mark */
        s += 3;
        len -= 3;
    }
    size_t start = 0;
    while (start < len && is_space(s[start]))
        start++;
    if (start == len)
        return 0;
    const char *end = NULL;
    cJSON *rec = cJSON_ParseWithLengthOpts(s, len, &end, 0);
    char why[WHY_CAP];
    if (!rec) {
        snprintf(why, sizeof why, "not valid JSON (column %lld)", (long long)(end ? end - s + 1 : 1));
        return bad_record(L, -1, why);
    }
    size_t rest = (size_t)(end - s);
    while (rest < len && is_space(s[rest]))
        rest++;
    int r;
    if (rest < len) {
        snprintf(why, sizeof why, "unexpected text after the JSON record (column %zu)", rest + 1);
        r = bad_record(L, -1, why);
    } else {
        r = take_record(L, rec, -1);
    }
    cJSON_Delete(rec);
    return r;
}

static int64_t count_lines(const char *s, const char *end) {
    int64_t n = 0;
    for (; s < end; s++)
        n += *s == '\n';
    return n;
}

static const char *skip_space(loader *L, const char *s, const char *end) {
    for (; s < end && is_space(*s); s++)
        L->line += *s == '\n';
    return s;
}

/* A JSON array of records, text[len] whole. A record that is not JSON ends the load even with
 * skip_bad_lines: the array cannot be resynchronised after it. */
static int take_array(loader *L, const char *text, size_t len) {
    const char *end = text + len, *p = skip_space(L, text, end);
    p = skip_space(L, p + 1, end); /* after '[' */
    for (int64_t element = 0; p < end && *p != ']'; element++) {
        const char *stop = NULL;
        cJSON *rec = cJSON_ParseWithLengthOpts(p, (size_t)(end - p), &stop, 0);
        if (!rec) {
            L->line += count_lines(p, stop ? stop : p);
            return ft_fail(L->err, L->errcap, "%s:%lld: element %lld: not valid JSON", L->name, (long long)L->line,
                        (long long)element);
        }
        int r = take_record(L, rec, element);
        cJSON_Delete(rec);
        if (r)
            return r;
        L->line += count_lines(p, stop);
        p = skip_space(L, stop, end);
        if (p < end && *p == ',')
            p = skip_space(L, p + 1, end);
        else if (p >= end || *p != ']')
            return ft_fail(L->err, L->errcap, "%s:%lld: expected ',' or ']' after element %lld", L->name,
                        (long long)L->line, (long long)element);
    }
    if (p >= end)
        return ft_fail(L->err, L->errcap, "%s:%lld: the JSON array is not closed", L->name, (long long)L->line);
    p = skip_space(L, p + 1, end);
    if (p < end)
        return ft_fail(L->err, L->errcap, "%s:%lld: unexpected text after the JSON array", L->name, (long long)L->line);
    return 0;
}

static int starts_array(const char *s, size_t len) {
    if (len >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) {
        s += 3;
        len -= 3;
    }
    while (len && is_space(*s)) {
        s++;
        len--;
    }
    return len && *s == '[';
}

static int take_text(loader *L, const char *text, size_t len) {
    if (starts_array(text, len)) {
        L->line = 1;
        size_t bom = len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3) ? 3 : 0;
        return take_array(L, text + bom, len - bom);
    }
    for (size_t pos = 0; pos < len;) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t line_len = nl ? (size_t)(nl - text) - pos : len - pos;
        L->line++;
        if (take_line(L, text + pos, line_len))
            return -1;
        pos += line_len + 1;
    }
    return 0;
}

static int read_whole(loader *L, FILE *fp, char **out, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, fp);
        if (n < cap)
            break;
        char *grown = cap <= SIZE_MAX / 2 ? realloc(buf, cap *= 2) : NULL;
        if (!grown)
            free(buf);
        buf = grown;
    }
    if (!buf)
        return out_of_memory(L);
    if (ferror(fp)) {
        free(buf);
        return ft_fail(L->err, L->errcap, "%s: read error: %s", L->name, strerror(errno));
    }
    *out = buf;
    *len = n;
    return 0;
}

static int take_file(loader *L, FILE *fp) {
    int c = fgetc(fp);
    if (c == 0xEF) /* a UTF-8 byte order mark, else no JSON at all (reported line by line) */
        c = fgetc(fp) == 0xBB && fgetc(fp) == 0xBF ? fgetc(fp) : 0;
    while (c != EOF && is_space((char)c))
        c = fgetc(fp);
    int array = c == '[';
    if (array) {
        rewind(fp);
        char *text = NULL;
        size_t len = 0;
        if (read_whole(L, fp, &text, &len))
            return -1;
        int r = take_text(L, text, len);
        free(text);
        return r;
    }
    rewind(fp);
    char *line = NULL;
    size_t cap = 0;
    int r = 0;
    for (;;) {
        errno = 0;
        ssize_t n = getline(&line, &cap, fp);
        if (n < 0) {
            if (errno == ENOMEM)
                r = out_of_memory(L);
            else if (ferror(fp))
                r = ft_fail(L->err, L->errcap, "%s:%lld: read error: %s", L->name, (long long)L->line + 1,
                         strerror(errno));
            break;
        }
        L->line++;
        size_t len = (size_t)n;
        if (len && line[len - 1] == '\n')
            len--;
        if ((r = take_line(L, line, len)) != 0)
            break;
    }
    free(line);
    return r;
}

void ft_dataset_free(ft_dataset *ds) {
    if (!ds)
        return;
    for (int64_t i = 0; i < ds->count; i++) {
        free(ds->ex[i].ids);
        free(ds->ex[i].target);
    }
    free(ds->ex);
    memset(ds, 0, sizeof *ds);
}

int ft_dataset_load(const char *path, const char *text, size_t len, const char *name, const qlora_tokenizer *tok,
                    const ft_data_opts *opts, ft_dataset *out, char *err, size_t errcap) {
    if (err && errcap)
        err[0] = '\0';
    if (!out || !tok || !opts || (!path && !text))
        return ft_fail(err, errcap, "ft_dataset_load: %s is NULL", !out ? "out" : !tok ? "tok" : !opts ? "opts" : "text");
    memset(out, 0, sizeof *out);
    const char *label = path ? path : name ? name : "(data)";
    if ((int)opts->format < FT_FORMAT_AUTO || opts->format > FT_FORMAT_CHAT)
        return ft_fail(err, errcap, "%s: unknown data format %d", label, (int)opts->format);
    if (opts->max_seq < 2)
        return ft_fail(err, errcap, "%s: max_seq %lld is too small (at least 2 tokens)", label, (long long)opts->max_seq);

    loader L = {.name = label, .tok = tok, .opts = *opts, .ds = out, .err = err, .errcap = errcap};
    L.bos = qlora_tokenizer_bos_id(tok);
    L.eos = qlora_tokenizer_eos_id(tok);
    out->format = opts->format;
    int r;
    if (path) {
        FILE *fp = fopen(path, "rb");
        if (!fp)
            return ft_fail(err, errcap, "%s: cannot open: %s", path, strerror(errno));
        r = take_file(&L, fp);
        fclose(fp);
    } else {
        r = take_text(&L, text, len);
    }
    if (r == 0 && out->count == 0)
        r = ft_fail(err, errcap, "%s:%lld: no usable records (%lld skipped)", label, (long long)(L.line ? L.line : 1),
                 (long long)out->skipped);
    ft_render_free(&L.render);
    free(L.ids);
    free(L.target);
    if (r != 0) {
        ft_dataset_free(out);
        return -1;
    }
    return 0;
}
