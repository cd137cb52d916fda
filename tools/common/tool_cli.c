/*
 * Messages of the command-line programs (tool_cli.h).
 */
#include "tool_cli.h"

#include <stdarg.h>
#include <stdio.h>

static const char *prog_name = "qlora";

void tool_cli_init(const char *prog) { prog_name = prog; }

void tool_say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", prog_name);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int tool_usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", prog_name);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\nTry '%s --help' for more information.\n", prog_name);
    va_end(ap);
    return TOOL_EXIT_USAGE;
}
