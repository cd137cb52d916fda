/* Status strings, the thread-local last-error message and the process-wide log callback. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

#define QL_ERROR_MAX 1024

static _Thread_local char tls_error[QL_ERROR_MAX];

static qlora_log_fn log_fn;
static void *log_user;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

const char *qlora_status_string(qlora_status status) {
    switch (status) {
    case QLORA_OK: return "ok";
    case QLORA_ERR_INVALID_ARG: return "invalid argument";
    case QLORA_ERR_OUT_OF_MEMORY: return "out of memory";
    case QLORA_ERR_IO: return "I/O error";
    case QLORA_ERR_FORMAT: return "malformed file";
    case QLORA_ERR_UNSUPPORTED: return "unsupported";
    case QLORA_ERR_NON_FINITE: return "non-finite value";
    case QLORA_ERR_SHAPE: return "shape mismatch";
    case QLORA_ERR_DTYPE: return "wrong dtype";
    case QLORA_ERR_DEVICE: return "wrong or missing device";
    case QLORA_ERR_CUDA: return "CUDA error";
    case QLORA_ERR_CUBLAS: return "cuBLAS error";
    case QLORA_ERR_NOT_FOUND: return "not found";
    case QLORA_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char *qlora_last_error(void) { return tls_error; }

void qlora_clear_error(void) { tls_error[0] = '\0'; }

void qlora_set_log_callback(qlora_log_fn fn, void *user) {
    pthread_mutex_lock(&log_lock);
    log_fn = fn;
    log_user = user;
    pthread_mutex_unlock(&log_lock);
}

static void log_message(qlora_log_level level, const char *msg) {
    pthread_mutex_lock(&log_lock);
    qlora_log_fn fn = log_fn;
    void *user = log_user;
    pthread_mutex_unlock(&log_lock);
    if (fn)
        fn(level, msg, user);
}

void ql_log(qlora_log_level level, const char *fmt, ...) {
    char buf[QL_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    log_message(level, buf);
}

qlora_status ql_fail(qlora_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tls_error, sizeof tls_error, fmt, ap);
    va_end(ap);
    log_message(QLORA_LOG_ERROR, tls_error);
    return status;
}

void ql_error_prefix(const char *fmt, ...) {
    char prefix[QL_ERROR_MAX], old[QL_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, tls_error, sizeof old);
    size_t n = strlen(prefix);
    if (n > sizeof tls_error - 3)
        n = sizeof tls_error - 3;
    memcpy(tls_error, prefix, n);
    memcpy(tls_error + n, ": ", 2);
    size_t rest = sizeof tls_error - n - 3;
    size_t m = strnlen(old, rest);
    memcpy(tls_error + n + 2, old, m);
    tls_error[n + 2 + m] = '\0';
}
