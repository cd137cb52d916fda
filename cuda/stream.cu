/*
 * Extra streams, events and asynchronous copies: what the optimizer pager needs to move pages on
 * a copy stream while the update kernels run on the context stream. The opaque handles of
 * cuda_backend.h are the CUDA handles themselves, cast.
 */
#include "cuda_internal.cuh"

static cudaStream_t as_stream(const ql_cuda_state *s, ql_cuda_stream *stream) {
    return stream ? reinterpret_cast<cudaStream_t>(stream) : s->stream;
}

static cudaEvent_t as_event(ql_cuda_event *event) { return reinterpret_cast<cudaEvent_t>(event); }

qlora_status ql_cuda_stream_create(ql_cuda_state *s, ql_cuda_stream **out) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    QL_CUDA_ENTER(s);
    cudaStream_t stream = NULL;
    QL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    *out = reinterpret_cast<ql_cuda_stream *>(stream);
    return QLORA_OK;
}

void ql_cuda_stream_destroy(ql_cuda_state *s, ql_cuda_stream *stream) {
    if (!s || !stream)
        return;
    cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
    ql_cuda_release(s, &st, [](void *h) { return cudaStreamDestroy(static_cast<cudaStream_t>(h)); }, stream,
                    QLORA_LOG_WARN, "ql_cuda_stream_destroy");
}

qlora_status ql_cuda_stream_synchronize(ql_cuda_state *s, ql_cuda_stream *stream) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaStreamSynchronize(as_stream(s, stream)));
    return QLORA_OK;
}

qlora_status ql_cuda_event_create(ql_cuda_state *s, int timing, ql_cuda_event **out) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(out != NULL, "out");
    *out = NULL;
    QL_CUDA_ENTER(s);
    cudaEvent_t event = NULL;
    QL_CUDA_CHECK(cudaEventCreateWithFlags(&event, timing ? cudaEventDefault : cudaEventDisableTiming));
    *out = reinterpret_cast<ql_cuda_event *>(event);
    return QLORA_OK;
}

void ql_cuda_event_destroy(ql_cuda_state *s, ql_cuda_event *event) {
    if (!s || !event)
        return;
    ql_cuda_release(s, NULL, [](void *h) { return cudaEventDestroy(static_cast<cudaEvent_t>(h)); }, event,
                    QLORA_LOG_WARN, "ql_cuda_event_destroy");
}

qlora_status ql_cuda_event_record(ql_cuda_state *s, ql_cuda_event *event, ql_cuda_stream *stream) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(event != NULL, "event");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaEventRecord(as_event(event), as_stream(s, stream)));
    return QLORA_OK;
}

qlora_status ql_cuda_stream_wait_event(ql_cuda_state *s, ql_cuda_stream *stream, ql_cuda_event *event) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(event != NULL, "event");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaStreamWaitEvent(as_stream(s, stream), as_event(event), 0));
    return QLORA_OK;
}

qlora_status ql_cuda_event_elapsed_ms(ql_cuda_state *s, ql_cuda_event *start, ql_cuda_event *end, float *ms) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    QL_REQUIRE_ARG(start != NULL && end != NULL, "event");
    QL_REQUIRE_ARG(ms != NULL, "ms");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaEventElapsedTime(ms, as_event(start), as_event(end)));
    return QLORA_OK;
}

qlora_status ql_cuda_memcpy_async(ql_cuda_state *s, ql_cuda_stream *stream, void *dst, const void *src,
                                  size_t bytes) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (bytes == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(dst != NULL, "dst");
    QL_REQUIRE_ARG(src != NULL, "src");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(s, stream)));
    return QLORA_OK;
}

qlora_status ql_cuda_memset_async(ql_cuda_state *s, ql_cuda_stream *stream, void *d_dst, int value,
                                  size_t bytes) {
    QL_REQUIRE_ARG(s != NULL, "cuda state");
    if (bytes == 0)
        return QLORA_OK;
    QL_REQUIRE_ARG(d_dst != NULL, "d_dst");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaMemsetAsync(d_dst, value, bytes, as_stream(s, stream)));
    return QLORA_OK;
}
