/*
 * The 4-bit code books (NF4, FP4), their decision thresholds, and the signed 8-bit dynamic map
 * used to double-quantize block scales, all as bitsandbytes has them (docs/format.md).
 * Code book entries are stored as IEEE-754 bit patterns so they are exact by construction.
 */
#include "internal.h"
#include "quant4.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>

/* C11 allows reading a union member other than the one initialised: the bytes are reinterpreted. */
typedef union ql_codebook_bits {
    uint32_t bits[16];
    float values[16];
} ql_codebook_bits;

/* bitsandbytes get_4bit_type("nf4"): sorted, exact zero at code 7, ends at exactly -1 and 1. */
static const ql_codebook_bits nf4_codebook = {.bits = {
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, 0x00000000u,
    0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u,
}};

/* bitsandbytes get_4bit_type("fp4"): bit 3 = sign, bits 2..0 index the magnitudes
 * {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12. Code 8 is +0.0, not -0.0: bnb builds the table from the
 * Python integer -0, and its serialized quant_map holds +0.0 there. */
static const ql_codebook_bits fp4_codebook = {.bits = {
    0x00000000u, 0x3baaaaabu, 0x3f2aaaabu, 0x3f800000u, 0x3eaaaaabu, 0x3f000000u, 0x3e2aaaabu, 0x3e800000u,
    0x00000000u, 0xbbaaaaabu, 0xbf2aaaabu, 0xbf800000u, 0xbeaaaaabu, 0xbf000000u, 0xbe2aaaabu, 0xbe800000u,
}};

/* The float literals of bitsandbytes' CUDA NF4 comparison tree: the midpoints of adjacent code
 * values printed as doubles, then rounded to float32 by the compiler. For thresholds 0, 8, 12
 * and 14 the float32 midpoint (a + b) / 2 is an exact tie and rounds the other way, one ulp
 * off these; we use the literals because they decide the bytes bnb writes on a GPU. */
const float ql_nf4_thresholds[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,  -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,  0.2035212516784668f,  0.2920137718319893f,   0.3893125355243683f,
    0.5016634166240692f,  0.6427869200706482f,  0.8614784181118011f,
};

/* The float literals of bitsandbytes' CUDA FP4 comparison tree, on |v|. Five of them are a few
 * ulps off the exact float32 midpoints (0.583333f vs 0.58333334f, ...); we use the literals
 * because they decide the bytes bnb writes on a GPU. */
const float ql_fp4_thresholds[7] = {
    0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f,
};

/* Magnitude code of each bucket k = number of FP4 thresholds exceeded, in value order. */
const uint8_t ql_fp4_bucket_code[8] = {0, 1, 6, 7, 4, 5, 2, 3};

int ql_quant4_blocksize_ok(int blocksize) {
    return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

const float *qlora_quant_codebook(qlora_quant_type type) {
    switch (type) {
    case QLORA_QUANT_NF4: return nf4_codebook.values;
    case QLORA_QUANT_FP4: return fp4_codebook.values;
    }
    return NULL;
}

const char *qlora_quant_type_name(qlora_quant_type type) {
    switch (type) {
    case QLORA_QUANT_NF4: return "nf4";
    case QLORA_QUANT_FP4: return "fp4";
    }
    return "invalid";
}

qlora_quant_params qlora_quant_default_params(void) {
    qlora_quant_params p;
    p.type = QLORA_QUANT_NF4;
    p.blocksize = 64;
    p.double_quant = 1;
    return p;
}

/* ---- the signed dynamic map ----
 * create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for i = 0..6, the 2^i
 * midpoints of torch.linspace(0.1, 1, 2^i + 1) in float32, times (float)10^(i-6), with both
 * signs; plus 0 and 1; sorted. Every step is float32 arithmetic, reproduced here exactly. */

/* torch.linspace(start, end, steps) for float32 on the CPU: the first half counts up from start,
 * the second half down from end, each value one fused multiply-add (one rounding). */
static void torch_linspace_f32(float start, float end, int steps, float *out) {
    float step = (end - start) / (float)(steps - 1);
    int halfway = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < halfway ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - 1 - i), end);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float dynamic_map[256];
static pthread_once_t dynamic_map_once = PTHREAD_ONCE_INIT;

static void build_dynamic_map(void) {
    static const double decade[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    float boundaries[65];
    int n = 0;
    for (int i = 0; i < 7; i++) {
        int items = 1 << i;
        torch_linspace_f32(0.1f, 1.0f, items + 1, boundaries);
        float scale = (float)decade[i]; /* torch multiplies a float32 tensor by a float32 scalar */
        for (int k = 0; k < items; k++) {
            float mean = (boundaries[k] + boundaries[k + 1]) / 2.0f;
            float v = scale * mean;
            dynamic_map[n++] = v;
            dynamic_map[n++] = -v;
        }
    }
    dynamic_map[n++] = 0.0f;
    dynamic_map[n++] = 1.0f;
    qsort(dynamic_map, (size_t)n, sizeof dynamic_map[0], cmp_float);
}

const float *qlora_dynamic_map_signed(void) {
    pthread_once(&dynamic_map_once, build_dynamic_map);
    return dynamic_map;
}
