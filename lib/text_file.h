/* Reading a small whole text file (a JSON config, index or tokenizer) into memory. */
#ifndef QLORA_TEXT_FILE_H
#define QLORA_TEXT_FILE_H

#include "internal.h"

/* Reads `path` into a NUL-terminated malloc'ed buffer (*out, *len bytes without the NUL). Errors
 * name it as "<what> '<path>'": QLORA_ERR_NOT_FOUND when it does not exist, QLORA_ERR_FORMAT
 * when it is not a regular file or is larger than max_bytes, QLORA_ERR_IO when reading fails,
 * QLORA_ERR_OUT_OF_MEMORY. */
qlora_status ql_read_text_file(const char *what, const char *path, size_t max_bytes, char **out, size_t *len);

#endif
