/*
 * The memory accountant's reports: the tracked allocator's current and peak bytes per category
 * and location as a text table or a JSON object, written into the caller's buffer (the library
 * never prints), plus the device's own view from cudaMemGetInfo on a CUDA context.
 */
#include "internal.h"
#include "json_util.h" /* ql_buf */

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.h"
#endif

static const char *const location_names[2] = {"host", "device"};

qlora_status qlora_mem_device_info_get(const qlora_ctx *ctx, qlora_mem_device_info *out) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(out != NULL, "out");
    memset(out, 0, sizeof *out);
#ifdef QLORA_HAVE_CUDA
    if (ctx->cuda) {
        size_t free_bytes = 0, total_bytes = 0;
        QL_CHECK(ql_cuda_mem_info((ql_cuda_state *)ctx->cuda, &free_bytes, &total_bytes));
        qlora_mem_stats st;
        QL_CHECK(qlora_mem_get_stats(ctx, &st));
        out->available = 1;
        out->free_bytes = free_bytes;
        out->total_bytes = total_bytes;
        out->used_bytes = total_bytes >= free_bytes ? total_bytes - free_bytes : 0;
        out->tracked_bytes = st.total_current[1];
        out->untracked_bytes = (int64_t)out->used_bytes - (int64_t)out->tracked_bytes;
    }
#endif
    return QLORA_OK;
}

/* "0 B", "512 B", "1.50 KiB", ..., "3.25 TiB": binary units, as memory is allocated. */
static void human_bytes(uint64_t bytes, char *out, size_t cap) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)bytes;
    int u = 0;
    while (v >= 1024.0 && u < 5) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(out, cap, "%" PRIu64 " B", bytes);
    else
        snprintf(out, cap, "%.2f %s", v, units[u]);
}

/* Copies the finished report into the caller's buffer the way snprintf would. */
static qlora_status deliver(const char *fn, ql_buf *b, char *buf, size_t cap, size_t *needed) {
    if (b->failed) {
        ql_buf_free(b);
        return ql_fail(QLORA_ERR_OUT_OF_MEMORY, "%s: out of host memory building the report", fn);
    }
    *needed = b->len + 1;
    if (cap > 0) {
        size_t n = b->len < cap - 1 ? b->len : cap - 1;
        if (n)
            memcpy(buf, b->data, n);
        buf[n] = '\0';
    }
    ql_buf_free(b);
    return QLORA_OK;
}

static void text_row(ql_buf *b, const char *label, const uint64_t cur[2], const uint64_t peak[2]) {
    char cells[4][32];
    human_bytes(cur[0], cells[0], sizeof cells[0]);
    human_bytes(peak[0], cells[1], sizeof cells[1]);
    human_bytes(cur[1], cells[2], sizeof cells[2]);
    human_bytes(peak[1], cells[3], sizeof cells[3]);
    ql_buf_printf(b, "%-18s %14s %14s %14s %14s\n", label, cells[0], cells[1], cells[2], cells[3]);
}

qlora_status qlora_mem_report_text(const qlora_ctx *ctx, char *buf, size_t cap, size_t *needed) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(needed != NULL, "needed");
    QL_REQUIRE_ARG(buf != NULL || cap == 0, "buf");
    qlora_mem_stats st;
    qlora_mem_device_info dev;
    QL_CHECK(qlora_mem_get_stats(ctx, &st));
    QL_CHECK(qlora_mem_device_info_get(ctx, &dev));

    ql_buf b = {0};
    int is_cuda = ctx->params.backend == QLORA_BACKEND_CUDA;
    if (is_cuda)
        ql_buf_printf(&b, "libqlora memory accountant (CUDA context, device %d)\n", ctx->params.device);
    else
        ql_buf_puts(&b, "libqlora memory accountant (CPU context: all memory is host memory)\n");
    ql_buf_printf(&b, "%-18s %14s %14s %14s %14s\n", "category", "host current", "host peak", "device current",
                  "device peak");
    for (int c = 0; c < QLORA_MEM_CATEGORY_COUNT; c++) {
        uint64_t cur[2] = {st.current[0][c], st.current[1][c]};
        uint64_t peak[2] = {st.peak[0][c], st.peak[1][c]};
        text_row(&b, qlora_mem_category_name((qlora_mem_category)c), cur, peak);
    }
    text_row(&b, "total", st.total_current, st.total_peak);
    ql_buf_printf(&b, "total bytes: host %" PRIu64 " current, %" PRIu64 " peak; device %" PRIu64
                      " current, %" PRIu64 " peak (a total's peak is the peak of the sum)\n",
                  st.total_current[0], st.total_peak[0], st.total_current[1], st.total_peak[1]);
    ql_buf_printf(&b, "allocations: %" PRIu64 " made, %" PRIu64 " live\n", st.allocations, st.live_allocations);
    if (dev.available) {
        char used[32], total[32], free_[32], tracked[32], untracked[32];
        human_bytes(dev.used_bytes, used, sizeof used);
        human_bytes(dev.total_bytes, total, sizeof total);
        human_bytes(dev.free_bytes, free_, sizeof free_);
        human_bytes(dev.tracked_bytes, tracked, sizeof tracked);
        human_bytes((uint64_t)(dev.untracked_bytes < 0 ? -dev.untracked_bytes : dev.untracked_bytes), untracked,
                    sizeof untracked);
        ql_buf_printf(&b, "device %d (cudaMemGetInfo): %s used of %s, %s free; tracked %s; untracked %s%s "
                          "(CUDA context, cuBLAS, other processes)\n",
                      ctx->params.device, used, total, free_, tracked, dev.untracked_bytes < 0 ? "-" : "",
                      untracked);
    }
    return deliver("qlora_mem_report_text", &b, buf, cap, needed);
}

static void json_pair(ql_buf *b, uint64_t current, uint64_t peak) {
    ql_buf_printf(b, "{\"current\": %" PRIu64 ", \"peak\": %" PRIu64 "}", current, peak);
}

static void json_locations(ql_buf *b, const uint64_t cur[2], const uint64_t peak[2]) {
    ql_buf_puts(b, "{");
    for (int loc = 0; loc < 2; loc++) {
        ql_buf_printf(b, "%s\"%s\": ", loc ? ", " : "", location_names[loc]);
        json_pair(b, cur[loc], peak[loc]);
    }
    ql_buf_puts(b, "}");
}

qlora_status qlora_mem_report_json(const qlora_ctx *ctx, char *buf, size_t cap, size_t *needed) {
    QL_REQUIRE_ARG(ctx != NULL, "ctx");
    QL_REQUIRE_ARG(needed != NULL, "needed");
    QL_REQUIRE_ARG(buf != NULL || cap == 0, "buf");
    qlora_mem_stats st;
    qlora_mem_device_info dev;
    QL_CHECK(qlora_mem_get_stats(ctx, &st));
    QL_CHECK(qlora_mem_device_info_get(ctx, &dev));

    ql_buf b = {0};
    int is_cuda = ctx->params.backend == QLORA_BACKEND_CUDA;
    ql_buf_printf(&b, "{\"backend\": \"%s\", \"device\": %d, \"categories\": {", is_cuda ? "cuda" : "cpu",
                  is_cuda ? ctx->params.device : QLORA_DEVICE_HOST);
    for (int c = 0; c < QLORA_MEM_CATEGORY_COUNT; c++) {
        uint64_t cur[2] = {st.current[0][c], st.current[1][c]};
        uint64_t peak[2] = {st.peak[0][c], st.peak[1][c]};
        ql_buf_printf(&b, "%s\"%s\": ", c ? ", " : "", qlora_mem_category_name((qlora_mem_category)c));
        json_locations(&b, cur, peak);
    }
    ql_buf_puts(&b, "}, \"total\": ");
    json_locations(&b, st.total_current, st.total_peak);
    ql_buf_printf(&b, ", \"allocations\": %" PRIu64 ", \"live_allocations\": %" PRIu64, st.allocations,
                  st.live_allocations);
    if (dev.available)
        ql_buf_printf(&b,
                      ", \"device_memory\": {\"free\": %" PRIu64 ", \"total\": %" PRIu64 ", \"used\": %" PRIu64
                      ", \"tracked\": %" PRIu64 ", \"untracked\": %" PRId64 "}",
                      dev.free_bytes, dev.total_bytes, dev.used_bytes, dev.tracked_bytes, dev.untracked_bytes);
    ql_buf_puts(&b, "}\n");
    return deliver("qlora_mem_report_json", &b, buf, cap, needed);
}
