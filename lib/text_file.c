/* Whole-file reads of small text files (see text_file.h). */
#include "text_file.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

qlora_status ql_read_text_file(const char *what, const char *path, size_t max_bytes, char **out, size_t *len) {
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return ql_fail(errno == ENOENT ? QLORA_ERR_NOT_FOUND : QLORA_ERR_IO, "%s '%s': cannot open: %s", what, path,
                       strerror(errno));
    struct stat st;
    if (fstat(fileno(fp), &st) != 0) {
        int err = errno;
        fclose(fp);
        return ql_fail(QLORA_ERR_IO, "%s '%s': cannot stat: %s", what, path, strerror(err));
    }
    if (!S_ISREG(st.st_mode) || st.st_size < 0 || (unsigned long long)st.st_size > max_bytes) {
        fclose(fp);
        return ql_fail(QLORA_ERR_FORMAT, "%s '%s': not a regular file of at most %zu bytes", what, path, max_bytes);
    }
    size_t n = (size_t)st.st_size;
    char *buf = malloc(n + 1);
    if (!buf) {
        fclose(fp);
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "%s '%s': out of host memory", what, path);
    }
    size_t got = fread(buf, 1, n, fp);
    int err = ferror(fp);
    fclose(fp);
    if (got != n || err) {
        free(buf);
        return ql_fail(QLORA_ERR_IO, "%s '%s': read %zu of %zu bytes", what, path, got, n);
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return QLORA_OK;
}
