/*
 * qlora-ft's training data: reading JSON / JSONL datasets in the common shapes, rendering them
 * with prompt templates, tokenizing, and cutting them into micro-batches (packed or grouped by
 * length). Uses only the public libqlora API (the tokenizer) and cJSON.
 *
 * Shapes (one per file; FT_FORMAT_AUTO picks it from the first record's keys):
 *   alpaca             {"instruction", "input" (optional, may be ""), "output"}: the QLoRA
 *                      repository's Alpaca templates (with and without input) as the prompt,
 *                      output as the response.
 *   text               {"text"}: no prompt, everything is response (always trained on).
 *   prompt_completion  {"prompt", "completion"}: prompt as written, completion as response.
 *   chat               {"messages": [{"role": "system"|"user"|"assistant", "content"}...]}:
 *                      rendered as "### Human: ...### Assistant: ..." turns (the template of
 *                      QLoRA's OASST1 runs; system text prefixes the first human turn); every
 *                      assistant turn is response, the rest prompt.
 * A .jsonl file holds one record per line (blank lines skipped); a .json file holds an array of
 * records. Each example is BOS + prompt + response + EOS (BOS/EOS only when the tokenizer has
 * them). Loss is on the response tokens (and EOS) only unless train_on_prompt.
 */
#ifndef QLORA_FT_DATA_H
#define QLORA_FT_DATA_H

#include <qlora.h>

#include <stddef.h>
#include <stdint.h>

typedef enum ft_format {
    FT_FORMAT_AUTO = 0,
    FT_FORMAT_ALPACA,
    FT_FORMAT_TEXT,
    FT_FORMAT_PROMPT_COMPLETION,
    FT_FORMAT_CHAT
} ft_format;

/* "auto", "alpaca", "text", "prompt-completion", "chat"; -1 for an unknown name. */
int ft_format_from_name(const char *name);
const char *ft_format_name(ft_format f);

typedef struct ft_data_opts {
    ft_format format;
    int64_t max_seq;        /* longer examples are truncated to this many tokens (counted) */
    int train_on_prompt;    /* 1: loss on every token */
    int skip_bad_lines;     /* 1: malformed records are counted and skipped; 0: loading fails */
} ft_data_opts;

/* One tokenized example: ids[n] and, per token, whether the model is trained to predict it. */
typedef struct ft_example {
    int32_t *ids;
    uint8_t *target;        /* 1: this token is a training target (its predecessor gets a label) */
    int64_t n;
} ft_example;

typedef struct ft_dataset {
    ft_format format;       /* the shape found */
    ft_example *ex;
    int64_t count;
    int64_t truncated;      /* examples cut to max_seq */
    int64_t skipped;        /* malformed records skipped (skip_bad_lines) */
    int64_t tokens;         /* Σ n after truncation */
    int64_t target_tokens;  /* Σ targets */
} ft_dataset;

/* Loads `path` (or, when path is NULL, the `len` bytes at `text`, named `name` in messages:
 * the embedded default data), tokenizing with tok. Errors: nonzero return with err holding
 * "<file>:<line>: <what is wrong>" (a record that is not JSON, a missing or non-string field,
 * a shape that differs from the file's, an empty file, an example with no target tokens).
 * Every error names the file and the line (for .json: the array index). With skip_bad_lines, a
 * successful load leaves the first skipped record's message in err ("" when none was skipped). */
int ft_dataset_load(const char *path, const char *text, size_t len, const char *name, const qlora_tokenizer *tok,
                    const ft_data_opts *opts, ft_dataset *out, char *err, size_t errcap);
void ft_dataset_free(ft_dataset *ds);

/* Moves a deterministic fraction of the examples (seeded shuffle; at least 1 when fraction > 0
 * and count >= 2, and never all of them) into *eval; the rest stay in ds in their order. */
int ft_dataset_split(ft_dataset *ds, double fraction, uint64_t seed, ft_dataset *eval, char *err, size_t errcap);

/* A micro-batch as qlora_model_forward_backward takes it: T tokens of one or more sequences
 * packed back to back (no padding), seq_start/positions marking sequence boundaries, labels
 * already shifted (labels[t] = ids[t+1] when t+1 is in the same sequence and a target, else
 * -100). With packing, consecutive examples share a row of max_seq tokens and are separate
 * sequences (attention and positions restart at each example). */
typedef struct ft_batch {
    int32_t *tokens, *labels, *seq_start, *positions;  /* [T] each */
    int64_t T, cap;
    int64_t examples;       /* examples in this batch */
    int64_t targets;        /* labels != -100 */
} ft_batch;

void ft_batch_free(ft_batch *b);

/* Walks a dataset in epochs: each epoch a seeded permutation (seed, epoch), then micro-batches
 * of `micro_batch` rows. Without packing a row is one example, and rows are grouped by length:
 * the permutation is cut into windows of 64 micro-batches and each window is sorted by length
 * (stable), so a batch holds examples of similar length. With packing, a row is filled with
 * whole examples in permutation order while they fit in max_seq tokens. The position (epoch,
 * cursor) is the whole state: saving and restoring it resumes the exact sequence of batches. */
typedef struct ft_batcher {
    const ft_dataset *ds;
    int64_t micro_batch, max_seq;
    int packing;
    uint64_t seed;
    int64_t epoch;          /* epochs completed */
    int64_t cursor;         /* examples of this epoch consumed */
    int64_t *order;         /* this epoch's order (after grouping) */
} ft_batcher;

int ft_batcher_init(ft_batcher *b, const ft_dataset *ds, int64_t micro_batch, int64_t max_seq, int packing,
                    uint64_t seed, char *err, size_t errcap);
/* Restores a saved position (epoch, cursor) — recomputes that epoch's order. */
int ft_batcher_seek(ft_batcher *b, int64_t epoch, int64_t cursor, char *err, size_t errcap);
/* Fills *out with the next micro-batch (moving to the next epoch at the end of one; a batch
 * never spans two epochs). */
int ft_batcher_next(ft_batcher *b, ft_batch *out, char *err, size_t errcap);
void ft_batcher_free(ft_batcher *b);

#endif
