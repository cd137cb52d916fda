/*
 * Messages and option splitting of the command-line programs (tool_cli.h).
 */
#include "tool_cli.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

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

int tool_option(int argc, char **argv, int *i, const char *const *with_value, char name[TOOL_OPTION_NAME_MAX],
                const char **value) {
    const char *arg = argv[*i];
    const char *eq = strchr(arg, '=');
    size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
    if (name_len > TOOL_OPTION_NAME_MAX - 1)
        name_len = TOOL_OPTION_NAME_MAX - 1;
    snprintf(name, TOOL_OPTION_NAME_MAX, "%.*s", (int)name_len, arg);
    int takes_value = 0;
    for (const char *const *w = with_value; *w; w++)
        takes_value |= !strcmp(name, *w);
    *value = NULL;
    if (takes_value) {
        if (eq)
            *value = eq + 1;
        else if (*i + 1 < argc)
            *value = argv[++*i];
        else
            return tool_usage_error("option %s needs a value", name);
    } else if (eq) {
        return tool_usage_error("option %s takes no value", name);
    }
    return 0;
}
