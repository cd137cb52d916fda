/* Private access to parsed safetensors files for the checkpoint layer. */
#ifndef QLORA_SAFETENSORS_INTERNAL_H
#define QLORA_SAFETENSORS_INTERNAL_H

#include "qlora.h"

/* The header's limit, as the reference reader and writer enforce it. */
#define QL_ST_MAX_HEADER 100000000ull

/* Full name of the index-th tensor (descriptors truncate names to QLORA_NAME_MAX - 1). */
const char *ql_safetensors_name(const qlora_safetensors *f, size_t index);
/* The path the file was opened with. */
const char *ql_safetensors_path(const qlora_safetensors *f);
/* Index of a tensor by full name, or -1. */
int64_t ql_safetensors_lookup(const qlora_safetensors *f, const char *name);

#endif
