/* Element types: names as safetensors spells them, sizes in bits. */
#include "internal.h"

#include <string.h>

static const struct {
    const char *name;
    int bits;
} dtype_info[QLORA_DTYPE_COUNT] = {
    [QLORA_F32] = {"F32", 32},         [QLORA_F16] = {"F16", 16},
    [QLORA_BF16] = {"BF16", 16},       [QLORA_U8] = {"U8", 8},
    [QLORA_NF4] = {"NF4", 4},          [QLORA_FP4] = {"FP4", 4},
    [QLORA_BOOL] = {"BOOL", 8},        [QLORA_I8] = {"I8", 8},
    [QLORA_I16] = {"I16", 16},         [QLORA_U16] = {"U16", 16},
    [QLORA_I32] = {"I32", 32},         [QLORA_U32] = {"U32", 32},
    [QLORA_I64] = {"I64", 64},         [QLORA_U64] = {"U64", 64},
    [QLORA_F64] = {"F64", 64},         [QLORA_C64] = {"C64", 64},
    [QLORA_F8_E5M2] = {"F8_E5M2", 8},  [QLORA_F8_E4M3] = {"F8_E4M3", 8},
    [QLORA_F8_E8M0] = {"F8_E8M0", 8},  [QLORA_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [QLORA_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [QLORA_F4] = {"F4", 4},            [QLORA_F6_E2M3] = {"F6_E2M3", 6},
    [QLORA_F6_E3M2] = {"F6_E3M2", 6},
};

static int dtype_valid(qlora_dtype d) { return (int)d >= 0 && d < QLORA_DTYPE_COUNT; }

const char *qlora_dtype_name(qlora_dtype dtype) {
    return dtype_valid(dtype) ? dtype_info[dtype].name : "invalid";
}

int qlora_dtype_bits(qlora_dtype dtype) { return dtype_valid(dtype) ? dtype_info[dtype].bits : 0; }

qlora_status qlora_dtype_from_name(const char *name, qlora_dtype *out) {
    QL_REQUIRE_ARG(name != NULL, "name");
    QL_REQUIRE_ARG(out != NULL, "out");
    /* NF4/FP4 are libqlora's packed types, not safetensors dtypes. */
    for (int d = 0; d < QLORA_DTYPE_COUNT; d++) {
        if (d == QLORA_NF4 || d == QLORA_FP4)
            continue;
        if (strcmp(name, dtype_info[d].name) == 0) {
            *out = (qlora_dtype)d;
            return QLORA_OK;
        }
    }
    return ql_fail(QLORA_ERR_DTYPE, "unknown dtype '%s'", name);
}

size_t ql_dtype_nbytes(qlora_dtype dtype, int64_t n, int *overflow) {
    *overflow = 0;
    int bits = qlora_dtype_bits(dtype);
    if (n < 0 || bits == 0) {
        *overflow = 1;
        return 0;
    }
    unsigned __int128 total = (unsigned __int128)(uint64_t)n * (unsigned)bits;
    total = (total + 7) / 8;
    if (total > (unsigned __int128)SIZE_MAX) {
        *overflow = 1;
        return 0;
    }
    return (size_t)total;
}
