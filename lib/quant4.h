/*
 * 4-bit blockwise quantization (NF4/FP4) and double quantization of the block scales, as
 * bitsandbytes does it (see docs/format.md). Host kernels over raw buffers, in two flavours
 * that must produce identical bytes: *_ref (scalar, written for clarity) and *_fast (OpenMP,
 * vectorisable). The CUDA kernels (cuda/cuda_backend.h) match them bit for bit.
 *
 * Canonical rules every implementation follows:
 *  - absmax[b] = max |x| over block b in float32; scale = 1.0f / absmax[b]; v = x * scale.
 *  - code = number of float32 thresholds t with v > t (NF4: the 15 of ql_nf4_thresholds; FP4:
 *    sign bit 8 when v < 0, plus ql_fp4_bucket_code[number of ql_fp4_thresholds below |v|]).
 *    The thresholds are bnb's CUDA float literals, which are NOT all the float32 midpoints
 *    (a + b) / 2 of the code book (see lib/codebook.c): use these tables, do not recompute.
 *  - absmax == 0: store 0 and emit the zero code (7 for NF4, 0 for FP4).
 *  - byte j = code(2j) << 4 | code(2j+1); an odd tail pads the low nibble with the zero code.
 *  - double quant offset: sum absmax in double, sequentially within consecutive chunks of
 *    QL_DQ_SUM_CHUNK entries, then the chunk sums sequentially in double; offset =
 *    (float)(sum / nblocks). Per group g of QL_NESTED_BLOCKSIZE scales: c = absmax - offset
 *    (float32), nested[g] = max |c|, q = ql_dynamic_map_nearest(dyn, c * (1.0f / nested[g]))
 *    (nested[g] == 0: v = 0, q = 127). Decode: absmax = dyn[q] * nested[j / 256] + offset as two
 *    float32 roundings (no FMA contraction: C is built with -ffp-contract=off, CUDA uses
 *    __fmul_rn/__fadd_rn).
 */
#ifndef QLORA_QUANT4_H
#define QLORA_QUANT4_H

#include "qlora.h"

#define QL_DQ_SUM_CHUNK 4096

/* The 15 NF4 decision thresholds (midpoints of adjacent code values, as float32). */
extern const float ql_nf4_thresholds[15];
/* The 7 FP4 magnitude thresholds and the magnitude code for each of the 8 buckets. */
extern const float ql_fp4_thresholds[7];
extern const uint8_t ql_fp4_bucket_code[8];

/* Zero code of a 4-bit type: 7 (NF4) or 0 (FP4). */
static inline uint8_t ql_quant4_zero_code(qlora_quant_type type) { return type == QLORA_QUANT_NF4 ? 7 : 0; }
/* 1 for a power of two in 32..4096. */
int ql_quant4_blocksize_ok(int blocksize);

/* --- scalar reference --- */
/* x: n elements of dtype F32/F16/BF16. Returns the index of the first non-finite element, or
 * -1 after writing codes[(n+1)/2] and absmax[ceil(n/blocksize)]. */
int64_t ql_quant4_ref(const void *x, qlora_dtype dtype, int64_t n, int blocksize, qlora_quant_type type,
                      uint8_t *codes, float *absmax);
/* Only the absmax half of ql_quant4_ref: same return value, writes absmax[ceil(n/blocksize)]. */
int64_t ql_block_absmax_ref(const void *x, qlora_dtype dtype, int64_t n, int blocksize, float *absmax);
/* The double quant offset of absmax[nblocks] (the canonical mean above; 0 when nblocks is 0). */
float ql_absmax_mean_ref(const float *absmax, int64_t nblocks);
void ql_dequant4_ref(const uint8_t *codes, const float *absmax, const float code[16], int64_t n,
                     int blocksize, void *out, qlora_dtype out_dtype);
/* Double quantization: returns the offset; writes qabsmax[nblocks], nested[ceil(nblocks/256)]. */
float ql_double_quant_ref(const float *absmax, int64_t nblocks, const float dyn[256], uint8_t *qabsmax,
                          float *nested);
void ql_double_dequant_ref(const uint8_t *qabsmax, const float *nested, float offset, const float dyn[256],
                           int64_t nblocks, float *absmax);
/* Nearest entry of the sorted 256-entry dynamic map (ties between two entries: as bitsandbytes'
 * binary search resolves them). */
uint8_t ql_dynamic_map_nearest(const float dyn[256], float x);

/* --- fast (OpenMP, vectorisable) --- same contracts and bytes; num_threads 0 = OpenMP default */
int64_t ql_quant4_fast(const void *x, qlora_dtype dtype, int64_t n, int blocksize, qlora_quant_type type,
                       uint8_t *codes, float *absmax, int num_threads);
int64_t ql_block_absmax_fast(const void *x, qlora_dtype dtype, int64_t n, int blocksize, float *absmax,
                             int num_threads);
float ql_absmax_mean_fast(const float *absmax, int64_t nblocks, int num_threads);
/* Fused: decodes absmax from qabsmax/nested/offset (when qabsmax != NULL) in the same pass. */
void ql_dequant4_fast(const uint8_t *codes, const float *absmax, const uint8_t *qabsmax, const float *nested,
                      float offset, const float dyn[256], const float code[16], int64_t n, int blocksize,
                      void *out, qlora_dtype out_dtype, int num_threads);
float ql_double_quant_fast(const float *absmax, int64_t nblocks, const float dyn[256], uint8_t *qabsmax,
                           float *nested, int num_threads);

#endif
