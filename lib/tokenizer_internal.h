/*
 * The tokenizer.json pipeline of Hugging Face `tokenizers`, as far as the Llama family needs it:
 * added-token split -> normalizer -> pre-tokenizer -> BPE -> post-processor, and the decoder
 * chain back. A loaded tokenizer is immutable, so one may be shared by threads (every call
 * allocates its own PCRE2 match data).
 */
#ifndef QLORA_TOKENIZER_INTERNAL_H
#define QLORA_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "internal.h"

#include <stddef.h>
#include <stdint.h>

/* ---- string -> id map (open addressing, FNV-1a) */
typedef struct ql_strmap_entry {
    const char *key; /* points into a string owned elsewhere; NULL = empty slot */
    size_t len;
    int32_t value;
} ql_strmap_entry;
typedef struct ql_strmap {
    ql_strmap_entry *slots;
    size_t cap, used;
} ql_strmap;
/* 0 on success, -1 out of memory. An existing key keeps its first value (returns 1). */
int ql_strmap_put(ql_strmap *m, const char *key, size_t len, int32_t value);
/* The value of key, or -1. */
int32_t ql_strmap_get(const ql_strmap *m, const char *key, size_t len);
void ql_strmap_free(ql_strmap *m);

/* ---- (left id, right id) -> (rank, merged id) */
typedef struct ql_mergemap_entry {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty */
    int32_t rank, merged;
} ql_mergemap_entry;
typedef struct ql_mergemap {
    ql_mergemap_entry *slots;
    size_t cap, used;
} ql_mergemap;
int ql_mergemap_put(ql_mergemap *m, int32_t left, int32_t right, int32_t rank, int32_t merged);
/* 1 with *rank and *merged when the pair merges, else 0. */
int ql_mergemap_get(const ql_mergemap *m, int32_t left, int32_t right, int32_t *rank, int32_t *merged);
void ql_mergemap_free(ql_mergemap *m);

/* ---- a growable list of strings (pieces of text or decoded tokens) */
typedef struct ql_piece {
    char *text; /* malloc'ed, NUL-terminated */
    size_t len;
    int at_start; /* begins at offset 0 of the input (Metaspace prepend_scheme "first") */
    int32_t id;   /* an added token's id, or -1 for text still to tokenize */
} ql_piece;
typedef struct ql_pieces {
    ql_piece *v;
    size_t n, cap;
    int failed; /* an allocation failed: the list is incomplete */
} ql_pieces;
void ql_pieces_push(ql_pieces *p, const char *text, size_t len, int at_start, int32_t id);
void ql_pieces_free(ql_pieces *p);

/* ---- pipeline steps (a Sequence is flattened into consecutive steps) */
typedef enum ql_tok_step_kind {
    QL_NORM_PREPEND,     /* a = the prefix, added to non-empty text */
    QL_NORM_REPLACE,     /* re -> a */
    QL_NORM_UNICODE,     /* flag = utf8proc options of NFC, NFD, NFKC or NFKD */
    QL_PRE_SPLIT,        /* re, behavior, invert */
    QL_PRE_BYTELEVEL,    /* flag = add_prefix_space, re = GPT-2's pattern when use_regex */
    QL_PRE_METASPACE,    /* a = replacement, scheme, flag = split */
    QL_DEC_BYTELEVEL,
    QL_DEC_REPLACE,      /* re -> a */
    QL_DEC_BYTEFALLBACK,
    QL_DEC_FUSE,
    QL_DEC_STRIP,        /* a = the character, start, stop */
    QL_DEC_METASPACE     /* a = replacement, scheme */
} ql_tok_step_kind;

typedef enum ql_split_behavior {
    QL_SPLIT_REMOVED,
    QL_SPLIT_ISOLATED,
    QL_SPLIT_MERGED_WITH_PREVIOUS,
    QL_SPLIT_MERGED_WITH_NEXT,
    QL_SPLIT_CONTIGUOUS
} ql_split_behavior;

enum { QL_PREPEND_ALWAYS, QL_PREPEND_FIRST, QL_PREPEND_NEVER };

typedef struct ql_tok_step {
    ql_tok_step_kind kind;
    char *a;
    size_t alen;
    pcre2_code *re;
    ql_split_behavior behavior;
    int invert, flag, scheme, start, stop;
} ql_tok_step;

typedef struct ql_added_token {
    char *content;  /* as in the file */
    size_t len;
    char *match;    /* what is searched: content, normalized when `normalized` */
    size_t match_len;
    int32_t id;
    int single_word, lstrip, rstrip, normalized, special;
} ql_added_token;

struct qlora_tokenizer {
    char *path;
    /* BPE model */
    ql_strmap vocab;
    ql_mergemap merges;
    char **id_to_token;    /* [vocab_size]: model tokens, replaced by added tokens (normalized ones: match) */
    unsigned char *special; /* [vocab_size]: 1 when the spelling is a special token's (skipped by decode) */
    int32_t vocab_size;    /* 1 + the largest id */
    int32_t unk_id;        /* -1: none */
    int byte_fallback, fuse_unk, ignore_merges;
    int32_t byte_ids[256]; /* <0xNN> pieces (-1 when absent) */
    char *subword_prefix, *word_suffix;
    /* added tokens */
    ql_added_token *added;
    size_t n_added;
    /* pipeline */
    ql_tok_step *norm, *pre, *dec;
    size_t n_norm, n_pre, n_dec;
    int has_decoder;
    /* post-processor: ids added around the sequence by add_special */
    int32_t *prefix_ids, *suffix_ids;
    size_t n_prefix, n_suffix;
    int32_t bos_id, eos_id;
    pcre2_code *word_char; /* \w, for single_word added tokens */
};

/* ---- UTF-8 and the byte-level alphabet */
/* Length of the UTF-8 sequence starting with byte c (1 for invalid lead bytes). */
size_t ql_utf8_seq_len(unsigned char c);
/* Appends the code point as UTF-8; returns the number of bytes (1-4). */
size_t ql_utf8_put(char *out, uint32_t cp);
/* Decodes one code point of valid UTF-8 at s (n bytes left); *len receives its length. */
uint32_t ql_utf8_get(const char *s, size_t n, size_t *len);
/* GPT-2's bytes_to_unicode: the code point that stands for byte b. */
uint32_t ql_bytelevel_char(unsigned char b);
/* The byte a code point stands for, or -1 when it is not in the alphabet. */
int ql_bytelevel_byte(uint32_t cp);
/* Appends s[n] with every maximal invalid UTF-8 subpart replaced by U+FFFD (Rust's
 * String::from_utf8_lossy). */
void ql_utf8_lossy_append(ql_pieces *out, const char *s, size_t n);

/* ---- pipeline stages (tokenizer_pretok.c) */
/* Applies the normalizer to text[n] into *out (malloc'ed). Returns 0, or -1 out of memory. */
int ql_tok_normalize(const qlora_tokenizer *t, const char *text, size_t n, char **out, size_t *out_len);
/* Pre-tokenizes one piece of text into words (pushed onto *out). Returns 0, or -1 out of memory. */
int ql_tok_pretokenize(const qlora_tokenizer *t, const ql_piece *in, ql_pieces *out);
/* Runs one compiled regex over s[n], calling back with each (start, end, is_match) range in
 * order as `tokenizers` splits text (no empty ranges). Returns 0, or -1 out of memory. */
typedef int (*ql_range_fn)(void *user, size_t start, size_t end, int is_match);
int ql_regex_ranges(const pcre2_code *re, const char *s, size_t n, ql_range_fn fn, void *user);
/* Replaces every match of re in s[n] by rep into *out (malloc'ed). 0, or -1 out of memory. */
int ql_regex_replace(const pcre2_code *re, const char *s, size_t n, const char *rep, size_t rep_len, char **out,
                     size_t *out_len);

/* ---- BPE (tokenizer_bpe.c): appends the ids of one word. 0, -1 out of memory, or -2 when a
 * character has no token (no unk and no byte fallback). */
typedef struct ql_ids {
    int32_t *v;
    size_t n, cap;
    int failed;
} ql_ids;
void ql_ids_push(ql_ids *ids, int32_t id);
int ql_bpe_word(const qlora_tokenizer *t, const char *word, size_t n, ql_ids *out);

/* ---- loading helpers (tokenizer_load.c, tokenizer_steps.c) */
qlora_status ql_tok_parse_steps(qlora_tokenizer *t, const void *json_node, int which);
enum { QL_STEPS_NORMALIZER, QL_STEPS_PRE_TOKENIZER, QL_STEPS_DECODER };
/* Compiles a pattern object {"Regex": ...} or {"String": ...} (literal). */
qlora_status ql_tok_compile_pattern(const qlora_tokenizer *t, const void *pattern_node, const char *where,
                                    pcre2_code **out);
qlora_status ql_tok_compile(const qlora_tokenizer *t, const char *pattern, size_t len, uint32_t extra,
                            const char *where, pcre2_code **out);
void ql_tok_steps_free(ql_tok_step *steps, size_t n);

#endif
