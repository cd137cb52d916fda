/*
 * Internal to qlora-ft's data module: a record's shape and its rendering as text pieces, each
 * either prompt or response, in order (the loader tokenizes each piece on its own, as QLoRA
 * tokenizes source and target separately, and masks by piece).
 */
#ifndef QLORA_FT_TEMPLATE_H
#define QLORA_FT_TEMPLATE_H

#include "ft_data.h"

#include <cjson/cJSON.h>
#include <stddef.h>

typedef struct ft_piece {
    size_t off, len;  /* in ft_render.text */
    int response;     /* 1: response text (loss on it), 0: prompt */
} ft_piece;

/* A reusable rendering buffer: clear it, render into it, read pieces; free it at the end. */
typedef struct ft_render {
    char *text;
    size_t len, cap;
    ft_piece *piece;
    int n, piece_cap;
} ft_render;

/* The shape a record's keys identify: "messages" -> chat, else "instruction" -> alpaca, else
 * "prompt" or "completion" -> prompt-completion, else "text" -> text; FT_FORMAT_AUTO when none. */
ft_format ft_record_shape(const cJSON *record);

/* Renders a JSON object in `format` (not AUTO) after clearing r. Returns 0 on success, 1 when
 * the record is malformed (why[whycap] says what is wrong: a missing field, a wrong type, a bad
 * conversation), -1 when memory ran out. */
int ft_render_record(const cJSON *record, ft_format format, ft_render *r, char *why, size_t whycap);

void ft_render_free(ft_render *r);

#endif
