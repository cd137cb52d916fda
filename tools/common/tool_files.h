/*
 * File helpers for the command-line programs (not part of libqlora). POSIX style: functions
 * return 0 on success, -1 with errno set on failure.
 */
#ifndef QLORA_TOOL_FILES_H
#define QLORA_TOOL_FILES_H

#include <stddef.h>
#include <stdint.h>

/* "dir/name", malloc'ed (NULL when out of memory). */
char *tool_path_join(const char *dir, const char *name);
/* The whole file, NUL-terminated, malloc'ed in *out; *len excludes the NUL. */
int tool_read_file(const char *path, char **out, size_t *len);
/* Creates a new file (fails with EEXIST if it exists), writes data and fsyncs it. */
int tool_write_new_file(const char *path, const char *data, size_t len);
/* Copies a file's bytes into a new file `to` (EEXIST if it exists), fsynced. */
int tool_copy_file(const char *from, const char *to);
/* Removes a directory tree the caller created (symlinks are removed, never followed). */
void tool_remove_tree(const char *path);
/* Size of a file in bytes (following symlinks), 0 when it cannot be read. */
uint64_t tool_file_size(const char *path);

#endif
