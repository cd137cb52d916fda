/*
 * Messages and option splitting of the command-line programs (not part of libqlora). Messages go
 * to stderr, each prefixed with the program's name, set once by tool_cli_init at the start of main.
 */
#ifndef QLORA_TOOL_CLI_H
#define QLORA_TOOL_CLI_H

/* The exit code of a bad command line, the same in every program. */
enum { TOOL_EXIT_USAGE = 1 };

void tool_cli_init(const char *prog);
/* "PROG: message" and a newline. */
void tool_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "PROG: message" and a pointer to --help; returns TOOL_EXIT_USAGE. */
int tool_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define TOOL_OPTION_NAME_MAX 32
/* Splits the option argv[*i] ("--opt", "--opt=VALUE" or "--opt VALUE") into its name and, for
 * the names listed in with_value (NULL-terminated), its value, advancing *i past a separate
 * value. *value is NULL for options without one. Returns 0, or TOOL_EXIT_USAGE (message
 * printed) when a value is missing or given to an option that takes none. */
int tool_option(int argc, char **argv, int *i, const char *const *with_value, char name[TOOL_OPTION_NAME_MAX],
                const char **value);

#endif
