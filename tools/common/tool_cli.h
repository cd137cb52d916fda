/*
 * Messages of the command-line programs (not part of libqlora): on stderr, each prefixed with
 * the program's name, set once by tool_cli_init at the start of main.
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

#endif
