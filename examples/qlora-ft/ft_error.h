/* qlora-ft's error reporting: modules return nonzero and leave a message in the caller's buffer. */
#ifndef QLORA_FT_ERROR_H
#define QLORA_FT_ERROR_H

#include <stddef.h>

/* Formats the message into err[cap] (when err is not NULL and cap > 0) and returns -1. */
int ft_fail(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
