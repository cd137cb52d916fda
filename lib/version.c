/* Version and build information. */
#include "internal.h"

const char *qlora_version_string(void) { return QLORA_VERSION_STRING; }

unsigned qlora_version_number(void) { return QLORA_VERSION_NUMBER; }

int qlora_has_cuda_backend(void) {
#ifdef QLORA_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}
