/*
 * qlora-ft's file-system helpers: output directories that appear whole or not at all.
 * A directory is written as a sibling "<final>.tmp.<pid>" and committed by renames, after
 * fsync of every file in it and of the parent, so a crash (or a full disk) never leaves a
 * half-written adapter or checkpoint under the final name and never loses the previous one.
 * All return 0 on success, or nonzero with err[cap] saying what failed and on which path.
 */
#ifndef QLORA_FT_FS_H
#define QLORA_FT_FS_H

#include <stddef.h>

/* Creates (mkdir -p) dir. */
int ft_mkdirs(const char *dir, char *err, size_t cap);
/* Makes an empty temp directory next to `final` and writes its path to tmp[tmp_cap]; a stale one
 * of the same name (from a crashed run of this pid) is removed first. */
int ft_tmpdir_for(const char *final, char *tmp, size_t tmp_cap, char *err, size_t cap);
/* fsyncs every regular file in tmp and tmp itself, then replaces `final` by it: when final
 * exists it is first renamed to "<final>.old", removed once the new one is in place. */
int ft_dir_commit(const char *tmp, const char *final, char *err, size_t cap);
/* rm -rf path (a missing path is success). */
int ft_remove_tree(const char *path, char *err, size_t cap);
/* Writes a whole file (inside a temp dir; no atomicity of its own). */
int ft_write_file(const char *path, const void *data, size_t n, char *err, size_t cap);
/* Reads a whole file into a malloc'ed NUL-terminated buffer. */
int ft_read_file(const char *path, char **data, size_t *n, char *err, size_t cap);
/* 1 if path exists (any type). */
int ft_exists(const char *path);

#endif
