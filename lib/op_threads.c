/* The thread count shared by the model ops (lib/model_ops.h). */
#include "model_ops.h"

#include <omp.h>

int ql_ops_threads(const qlora_ctx *ctx) {
    return ctx->params.num_threads > 0 ? ctx->params.num_threads : omp_get_max_threads();
}
