/*
 * Atomic output directories (see ft_fs.h): write into "<final>.tmp.<pid>", fsync, then rename.
 * Every failing system call ends the operation with a message naming the path and errno's text.
 */
#include "ft_error.h"
#include "ft_fs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int sys_fail(char *err, size_t cap, const char *what, const char *path, int e) {
    return ft_fail(err, cap, "cannot %s '%s': %s", what, path, strerror(e));
}

/* dst[cap] = a + b (+ c); -1 when it does not fit. */
static int join(char *dst, size_t cap, const char *a, const char *b, const char *c, char *err, size_t errcap) {
    int n = snprintf(dst, cap, "%s%s%s", a, b, c ? c : "");
    if (n < 0 || (size_t)n >= cap)
        return ft_fail(err, errcap, "path too long: '%s%s%s'", a, b, c ? c : "");
    return 0;
}

/* The path without trailing slashes (but "/" stays "/"). */
static int trimmed(const char *path, char *out, size_t cap, char *err, size_t errcap) {
    size_t n = strlen(path);
    if (n == 0)
        return ft_fail(err, errcap, "empty path");
    while (n > 1 && path[n - 1] == '/')
        n--;
    if (n >= cap)
        return ft_fail(err, errcap, "path too long: '%s'", path);
    memcpy(out, path, n);
    out[n] = '\0';
    return 0;
}

int ft_exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

int ft_mkdirs(const char *dir, char *err, size_t cap) {
    char path[PATH_MAX];
    if (trimmed(dir, path, sizeof path, err, cap))
        return -1;
    /* Create each prefix in turn; existing directories are fine, anything else is not. */
    for (char *p = path + 1;; p++) {
        int end = *p == '\0';
        if (*p != '/' && !end)
            continue;
        *p = '\0';
        if (mkdir(path, 0777) != 0) {
            int e = errno;
            struct stat st;
            if (e != EEXIST)
                return sys_fail(err, cap, "create directory", path, e);
            if (stat(path, &st) != 0)
                return sys_fail(err, cap, "stat", path, errno);
            if (!S_ISDIR(st.st_mode))
                return ft_fail(err, cap, "cannot create directory '%s': a file of that name exists", path);
        }
        if (end)
            return 0;
        *p = '/';
    }
}

/* Removes dir's contents and dir itself (not following symbolic links). */
static int remove_dir(const char *dir, char *err, size_t cap) {
    DIR *d = opendir(dir);
    if (!d)
        return sys_fail(err, cap, "open directory", dir, errno);
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *ent = readdir(d);
        if (!ent) {
            if (errno)
                rc = sys_fail(err, cap, "read directory", dir, errno);
            break;
        }
        if (!strcmp(ent->d_name, ".") || !strcmp(ent->d_name, ".."))
            continue;
        char path[PATH_MAX];
        if ((rc = join(path, sizeof path, dir, "/", ent->d_name, err, cap)) != 0)
            break;
        if ((rc = ft_remove_tree(path, err, cap)) != 0)
            break;
    }
    if (closedir(d) != 0 && rc == 0)
        rc = sys_fail(err, cap, "close directory", dir, errno);
    if (rc == 0 && rmdir(dir) != 0)
        rc = sys_fail(err, cap, "remove directory", dir, errno);
    return rc;
}

int ft_remove_tree(const char *path, char *err, size_t cap) {
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : sys_fail(err, cap, "stat", path, errno);
    if (S_ISDIR(st.st_mode))
        return remove_dir(path, err, cap);
    if (unlink(path) != 0 && errno != ENOENT)
        return sys_fail(err, cap, "remove", path, errno);
    return 0;
}

int ft_tmpdir_for(const char *final, char *tmp, size_t tmp_cap, char *err, size_t cap) {
    char path[PATH_MAX], suffix[32];
    if (trimmed(final, path, sizeof path, err, cap))
        return -1;
    snprintf(suffix, sizeof suffix, ".tmp.%ld", (long)getpid());
    if (join(tmp, tmp_cap, path, suffix, NULL, err, cap))
        return -1;
    /* The parent must exist for the final rename; --out a/b/c creates a and b. */
    char *slash = strrchr(path, '/');
    if (slash && slash != path) {
        *slash = '\0';
        if (ft_mkdirs(path, err, cap))
            return -1;
    }
    if (ft_remove_tree(tmp, err, cap))
        return -1;
    if (mkdir(tmp, 0777) != 0)
        return sys_fail(err, cap, "create directory", tmp, errno);
    return 0;
}

/* fsync of a directory: some file systems refuse it (EINVAL), the renames stay atomic there. */
static int sync_dir(const char *dir, char *err, size_t cap) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return sys_fail(err, cap, "open directory", dir, errno);
    int rc = fsync(fd), e = errno;
    if (close(fd) != 0 && rc == 0) {
        rc = -1;
        e = errno;
    }
    if (rc != 0 && e != EINVAL)
        return sys_fail(err, cap, "fsync directory", dir, e);
    return 0;
}

static int sync_file(const char *path, char *err, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sys_fail(err, cap, "open", path, errno);
    if (fsync(fd) != 0) {
        int e = errno;
        close(fd);
        return sys_fail(err, cap, "fsync", path, e);
    }
    if (close(fd) != 0)
        return sys_fail(err, cap, "close", path, errno);
    return 0;
}

/* fsyncs every regular file under dir (recursively), each subdirectory, and dir itself. */
static int sync_tree(const char *dir, char *err, size_t cap) {
    DIR *d = opendir(dir);
    if (!d)
        return sys_fail(err, cap, "open directory", dir, errno);
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *ent = readdir(d);
        if (!ent) {
            if (errno)
                rc = sys_fail(err, cap, "read directory", dir, errno);
            break;
        }
        if (!strcmp(ent->d_name, ".") || !strcmp(ent->d_name, ".."))
            continue;
        char path[PATH_MAX];
        struct stat st;
        if ((rc = join(path, sizeof path, dir, "/", ent->d_name, err, cap)) != 0)
            break;
        if (lstat(path, &st) != 0) {
            rc = sys_fail(err, cap, "stat", path, errno);
            break;
        }
        if (S_ISDIR(st.st_mode))
            rc = sync_tree(path, err, cap);
        else if (S_ISREG(st.st_mode))
            rc = sync_file(path, err, cap);
        if (rc)
            break;
    }
    if (closedir(d) != 0 && rc == 0)
        rc = sys_fail(err, cap, "close directory", dir, errno);
    return rc ? rc : sync_dir(dir, err, cap);
}

int ft_dir_commit(const char *tmp, const char *final, char *err, size_t cap) {
    char path[PATH_MAX], old[PATH_MAX], parent[PATH_MAX];
    if (trimmed(final, path, sizeof path, err, cap) || join(old, sizeof old, path, ".old", NULL, err, cap))
        return -1;
    const char *slash = strrchr(path, '/');
    if (!slash)
        strcpy(parent, ".");
    else if (slash == path)
        strcpy(parent, "/");
    else
        snprintf(parent, sizeof parent, "%.*s", (int)(slash - path), path);
    if (sync_tree(tmp, err, cap))
        return -1;
    /* When final exists it is the good copy and any "<final>.old" is debris of an earlier run.
     * When it does not, "<final>.old" may be the only copy left by a crash between the two
     * renames: it is removed only once the new directory is in place. */
    if (ft_exists(path)) {
        if (ft_remove_tree(old, err, cap))
            return -1;
        if (rename(path, old) != 0)
            return sys_fail(err, cap, "rename the previous output aside to", old, errno);
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        ft_fail(err, cap, "cannot rename '%s' to '%s': %s", tmp, path, strerror(e));
        if (ft_exists(old) && !ft_exists(path) && rename(old, path) != 0) {
            size_t n = strlen(err);
            snprintf(err + n, cap - n, " (the previous output is left in '%s')", old);
        }
        return -1;
    }
    if (sync_dir(parent, err, cap))
        return -1;
    return ft_remove_tree(old, err, cap);
}

int ft_write_file(const char *path, const void *data, size_t n, char *err, size_t cap) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0)
        return sys_fail(err, cap, "create", path, errno);
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            close(fd);
            return sys_fail(err, cap, "write", path, e);
        }
        p += w;
        n -= (size_t)w;
    }
    if (close(fd) != 0)
        return sys_fail(err, cap, "close", path, errno);
    return 0;
}

int ft_read_file(const char *path, char **data, size_t *n, char *err, size_t cap) {
    *data = NULL;
    *n = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sys_fail(err, cap, "open", path, errno);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return sys_fail(err, cap, "stat", path, e);
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return sys_fail(err, cap, "read", path, EISDIR);
    }
    size_t bufcap = st.st_size > 0 ? (size_t)st.st_size + 1 : 4096, len = 0;
    char *buf = malloc(bufcap);
    if (!buf) {
        close(fd);
        return ft_fail(err, cap, "cannot read '%s': out of memory", path);
    }
    for (;;) {
        if (len + 1 >= bufcap) { /* a file that grew, or one without a size (a pipe) */
            char *grown = bufcap <= SIZE_MAX / 2 ? realloc(buf, bufcap * 2) : NULL;
            if (!grown) {
                free(buf);
                close(fd);
                return ft_fail(err, cap, "cannot read '%s': out of memory", path);
            }
            buf = grown;
            bufcap *= 2;
        }
        ssize_t r = read(fd, buf + len, bufcap - 1 - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return sys_fail(err, cap, "read", path, e);
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd); /* read-only: nothing to lose on a failing close */
    buf[len] = '\0';
    *data = buf;
    *n = len;
    return 0;
}
