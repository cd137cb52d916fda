/* Tokenizer building blocks: hash maps, growable lists, UTF-8 and GPT-2's byte alphabet. */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ string map */
static uint64_t fnv1a(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static int strmap_grow(ql_strmap *m) {
    size_t cap = m->cap ? m->cap * 2 : 64;
    ql_strmap_entry *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return -1;
    for (size_t i = 0; i < m->cap; i++) {
        const ql_strmap_entry *e = &m->slots[i];
        if (!e->key)
            continue;
        size_t j = (size_t)fnv1a(e->key, e->len) & (cap - 1);
        while (slots[j].key)
            j = (j + 1) & (cap - 1);
        slots[j] = *e;
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return 0;
}

int ql_strmap_put(ql_strmap *m, const char *key, size_t len, int32_t value) {
    if ((m->used + 1) * 2 > m->cap && strmap_grow(m) != 0)
        return -1;
    size_t j = (size_t)fnv1a(key, len) & (m->cap - 1);
    while (m->slots[j].key) {
        if (m->slots[j].len == len && memcmp(m->slots[j].key, key, len) == 0)
            return 1;
        j = (j + 1) & (m->cap - 1);
    }
    m->slots[j] = (ql_strmap_entry){key, len, value};
    m->used++;
    return 0;
}

int32_t ql_strmap_get(const ql_strmap *m, const char *key, size_t len) {
    if (!m->cap)
        return -1;
    size_t j = (size_t)fnv1a(key, len) & (m->cap - 1);
    while (m->slots[j].key) {
        if (m->slots[j].len == len && memcmp(m->slots[j].key, key, len) == 0)
            return m->slots[j].value;
        j = (j + 1) & (m->cap - 1);
    }
    return -1;
}

void ql_strmap_free(ql_strmap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------ merge map */
static size_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static int mergemap_grow(ql_mergemap *m) {
    size_t cap = m->cap ? m->cap * 2 : 64;
    ql_mergemap_entry *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].key)
            continue;
        size_t j = mix64(m->slots[i].key) & (cap - 1);
        while (slots[j].key)
            j = (j + 1) & (cap - 1);
        slots[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return 0;
}

static uint64_t pair_key(int32_t left, int32_t right) {
    return (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
}

int ql_mergemap_put(ql_mergemap *m, int32_t left, int32_t right, int32_t rank, int32_t merged) {
    if ((m->used + 1) * 2 > m->cap && mergemap_grow(m) != 0)
        return -1;
    uint64_t key = pair_key(left, right);
    size_t j = mix64(key) & (m->cap - 1);
    while (m->slots[j].key) {
        if (m->slots[j].key == key) { /* a repeated merge keeps its last rank, as a HashMap insert */
            m->slots[j].rank = rank;
            m->slots[j].merged = merged;
            return 0;
        }
        j = (j + 1) & (m->cap - 1);
    }
    m->slots[j] = (ql_mergemap_entry){key, rank, merged};
    m->used++;
    return 0;
}

int ql_mergemap_get(const ql_mergemap *m, int32_t left, int32_t right, int32_t *rank, int32_t *merged) {
    if (!m->cap)
        return 0;
    uint64_t key = pair_key(left, right);
    size_t j = mix64(key) & (m->cap - 1);
    while (m->slots[j].key) {
        if (m->slots[j].key == key) {
            *rank = m->slots[j].rank;
            *merged = m->slots[j].merged;
            return 1;
        }
        j = (j + 1) & (m->cap - 1);
    }
    return 0;
}

void ql_mergemap_free(ql_mergemap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------ lists */
void ql_pieces_push(ql_pieces *p, const char *text, size_t len, int at_start, int32_t id) {
    if (p->failed)
        return;
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 16;
        ql_piece *v = realloc(p->v, cap * sizeof *v);
        if (!v) {
            p->failed = 1;
            return;
        }
        p->v = v;
        p->cap = cap;
    }
    char *copy = malloc(len + 1);
    if (!copy) {
        p->failed = 1;
        return;
    }
    if (len)
        memcpy(copy, text, len);
    copy[len] = '\0';
    p->v[p->n++] = (ql_piece){copy, len, at_start, id};
}

void ql_pieces_free(ql_pieces *p) {
    for (size_t i = 0; i < p->n; i++)
        free(p->v[i].text);
    free(p->v);
    memset(p, 0, sizeof *p);
}

void ql_ids_push(ql_ids *ids, int32_t id) {
    if (ids->failed)
        return;
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *v = realloc(ids->v, cap * sizeof *v);
        if (!v) {
            ids->failed = 1;
            return;
        }
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
}

/* ------------------------------------------------------------------ UTF-8 */
size_t ql_utf8_seq_len(unsigned char c) {
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        return 2;
    if (c >= 0xE0 && c <= 0xEF)
        return 3;
    if (c >= 0xF0 && c <= 0xF4)
        return 4;
    return 1;
}

size_t ql_utf8_put(char *out, uint32_t cp) {
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

uint32_t ql_utf8_get(const char *s, size_t n, size_t *len) {
    const unsigned char *u = (const unsigned char *)s;
    size_t k = ql_utf8_seq_len(u[0]);
    if (k > n)
        k = n;
    *len = k;
    if (k == 1)
        return u[0];
    uint32_t cp = u[0] & (0x7F >> k);
    for (size_t i = 1; i < k; i++)
        cp = (cp << 6) | (u[i] & 0x3F);
    return cp;
}

/* Bytes that print as themselves in GPT-2's alphabet: '!'..'~', U+00A1..U+00AC, U+00AE..U+00FF. */
static int bytelevel_printable(unsigned b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; }

uint32_t ql_bytelevel_char(unsigned char b) {
    if (bytelevel_printable(b))
        return b;
    uint32_t n = 0; /* the others, in increasing order, map to U+0100 + n */
    for (unsigned c = 0; c < b; c++)
        n += !bytelevel_printable(c);
    return 0x100 + n;
}

int ql_bytelevel_byte(uint32_t cp) {
    if (cp < 0x100)
        return bytelevel_printable(cp) ? (int)cp : -1;
    if (cp >= 0x100 + 68)
        return -1;
    uint32_t n = 0;
    for (unsigned c = 0; c < 256; c++)
        if (!bytelevel_printable(c) && n++ == cp - 0x100)
            return (int)c;
    return -1;
}

void ql_utf8_lossy_append(ql_pieces *out, const char *s, size_t n) {
    static const char replacement[] = "\xEF\xBF\xBD";
    const unsigned char *u = (const unsigned char *)s;
    char *buf = malloc(n * 3 + 1); /* each byte becomes at most U+FFFD */
    if (!buf) {
        out->failed = 1;
        return;
    }
    size_t o = 0, i = 0;
    while (i < n) {
        unsigned c = u[i];
        if (c < 0x80) {
            buf[o++] = (char)c;
            i++;
            continue;
        }
        size_t need = ql_utf8_seq_len((unsigned char)c);
        unsigned lo = 0x80, hi = 0xBF; /* the allowed range of the second byte */
        if (c == 0xE0) lo = 0xA0;
        else if (c == 0xED) hi = 0x9F;
        else if (c == 0xF0) lo = 0x90;
        else if (c == 0xF4) hi = 0x8F;
        size_t k = 1;
        if (need > 1 && i + 1 < n && u[i + 1] >= lo && u[i + 1] <= hi) {
            k = 2;
            while (k < need && i + k < n && u[i + k] >= 0x80 && u[i + k] <= 0xBF)
                k++;
        }
        if (need > 1 && k == need) {
            memcpy(buf + o, s + i, k);
            o += k;
        } else { /* the maximal invalid subpart: lead plus the continuation bytes that fit */
            memcpy(buf + o, replacement, 3);
            o += 3;
        }
        i += k;
    }
    ql_pieces_push(out, buf, o, 0, -1);
    free(buf);
}
