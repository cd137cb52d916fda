/* qlora-ft's error reporting (ft_error.h). */
#include "ft_error.h"

#include <stdarg.h>
#include <stdio.h>

int ft_fail(char *err, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (err && cap)
        vsnprintf(err, cap, fmt, ap);
    va_end(ap);
    return -1;
}
