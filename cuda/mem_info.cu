/*
 * The device's own account of its memory (cudaMemGetInfo), which the memory accountant sets
 * next to its tracked totals: the difference is what libqlora did not allocate itself.
 */
#include "cuda_internal.cuh"

extern "C" qlora_status ql_cuda_mem_info(ql_cuda_state *s, size_t *free_bytes, size_t *total_bytes) {
    if (!s || !free_bytes || !total_bytes)
        return ql_fail(QLORA_ERR_INVALID_ARG, "ql_cuda_mem_info: null argument");
    QL_CUDA_ENTER(s);
    QL_CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
    return QLORA_OK;
}
