/*
 * The BPE model on one word (tokenizers/src/models/bpe/{model.rs, word.rs}): characters to
 * ids (with byte fallback and unk), then merges lowest rank first, leftmost on ties, through a
 * min-heap of candidate pairs whose stale entries are skipped when popped.
 */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct sym {
    int32_t id;
    int prev, next; /* linked list over the live symbols; -1 at the ends */
    int alive;
} sym;

typedef struct cand {
    int32_t rank, merged;
    int pos;
} cand;

static int cand_less(const cand *a, const cand *b) { return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos; }

typedef struct heap {
    cand *v;
    size_t n, cap;
} heap;

static int heap_push(heap *h, cand c) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 32;
        cand *v = realloc(h->v, cap * sizeof *v);
        if (!v)
            return -1;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0 && cand_less(&c, &h->v[(i - 1) / 2])) {
        h->v[i] = h->v[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->v[i] = c;
    return 0;
}

static cand heap_pop(heap *h) {
    cand top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const cand *best = &last;
        if (l < h->n && cand_less(&h->v[l], best)) {
            m = l;
            best = &h->v[l];
        }
        if (r < h->n && cand_less(&h->v[r], best))
            m = r;
        if (m == i)
            break;
        h->v[i] = h->v[m];
        i = m;
    }
    if (h->n)
        h->v[i] = last;
    return top;
}

/* Pushes the merge of s[pos] with its successor, if that pair merges. */
static int push_pair(const qlora_tokenizer *t, heap *h, const sym *s, int pos) {
    if (pos < 0 || s[pos].next < 0)
        return 0;
    cand c = {0, 0, pos};
    if (!ql_mergemap_get(&t->merges, s[pos].id, s[s[pos].next].id, &c.rank, &c.merged))
        return 0;
    return heap_push(h, c);
}

/* The ids of each character (model.rs merge_word): prefix/suffix, vocab, byte fallback, unk. */
static int word_symbols(const qlora_tokenizer *t, const char *w, size_t n, sym **out, int *count) {
    sym *s = malloc((n ? n : 1) * sizeof *s);
    char *tmp = NULL;
    size_t pre = t->subword_prefix ? strlen(t->subword_prefix) : 0, suf = t->word_suffix ? strlen(t->word_suffix) : 0;
    if (pre || suf)
        tmp = malloc(pre + suf + 5);
    if (!s || ((pre || suf) && !tmp)) {
        free(s);
        free(tmp);
        return -1;
    }
    int k = 0;
    int32_t unk = -1; /* a pending (possibly fused) unk */
    for (size_t i = 0; i < n;) {
        size_t len = ql_utf8_seq_len((unsigned char)w[i]);
        if (len > n - i)
            len = n - i;
        const char *key = w + i;
        size_t klen = len;
        if ((i > 0 && pre) || (i + len == n && suf)) {
            size_t o = 0;
            if (i > 0 && pre) {
                memcpy(tmp, t->subword_prefix, pre);
                o = pre;
            }
            memcpy(tmp + o, w + i, len);
            o += len;
            if (i + len == n && suf) {
                memcpy(tmp + o, t->word_suffix, suf);
                o += suf;
            }
            key = tmp;
            klen = o;
        }
        int32_t id = ql_strmap_get(&t->vocab, key, klen);
        if (id >= 0) {
            if (unk >= 0) {
                s[k++] = (sym){unk, 0, 0, 1};
                unk = -1;
            }
            s[k++] = (sym){id, 0, 0, 1};
        } else {
            int all = t->byte_fallback;
            for (size_t b = 0; all && b < klen; b++)
                all = t->byte_ids[(unsigned char)key[b]] >= 0;
            if (all) {
                sym *grown = realloc(s, (size_t)(k + (int)klen + (int)(n - i)) * sizeof *s);
                if (!grown) {
                    free(s);
                    free(tmp);
                    return -1;
                }
                s = grown;
                for (size_t b = 0; b < klen; b++)
                    s[k++] = (sym){t->byte_ids[(unsigned char)key[b]], 0, 0, 1};
            } else if (t->unk_id >= 0) {
                if (unk >= 0 && !t->fuse_unk)
                    s[k++] = (sym){unk, 0, 0, 1};
                unk = t->unk_id;
            } else {
                free(s);
                free(tmp);
                return -2;
            }
        }
        i += len;
    }
    if (unk >= 0)
        s[k++] = (sym){unk, 0, 0, 1};
    free(tmp);
    for (int i = 0; i < k; i++) {
        s[i].prev = i - 1;
        s[i].next = i + 1 < k ? i + 1 : -1;
    }
    *out = s;
    *count = k;
    return 0;
}

int ql_bpe_word(const qlora_tokenizer *t, const char *w, size_t n, ql_ids *out) {
    if (n == 0)
        return 0;
    if (t->ignore_merges) {
        int32_t id = ql_strmap_get(&t->vocab, w, n);
        if (id >= 0) {
            ql_ids_push(out, id);
            return out->failed ? -1 : 0;
        }
    }
    sym *s = NULL;
    int k = 0, rc = word_symbols(t, w, n, &s, &k);
    if (rc != 0)
        return rc;
    heap h = {0};
    for (int i = 0; i + 1 < k && rc == 0; i++)
        rc = push_pair(t, &h, s, i);
    while (rc == 0 && h.n) {
        cand c = heap_pop(&h);
        if (!s[c.pos].alive || s[c.pos].next < 0)
            continue;
        int right = s[c.pos].next;
        int32_t rank, merged;
        if (!ql_mergemap_get(&t->merges, s[c.pos].id, s[right].id, &rank, &merged) || merged != c.merged)
            continue; /* stale: one side merged since this entry was pushed */
        s[c.pos].id = c.merged;
        s[right].alive = 0;
        s[c.pos].next = s[right].next;
        if (s[right].next >= 0)
            s[s[right].next].prev = c.pos;
        rc = push_pair(t, &h, s, s[c.pos].prev);
        if (rc == 0)
            rc = push_pair(t, &h, s, c.pos);
    }
    for (int i = 0; rc == 0 && i < k; i++)
        if (s[i].alive)
            ql_ids_push(out, s[i].id);
    free(h.v);
    free(s);
    if (rc == 0 && out->failed)
        rc = -1;
    return rc;
}
