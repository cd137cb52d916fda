/*
 * libqlora: QLoRA-style finetuning of large language models, in C with CUDA kernels.
 *
 * One public header. Conventions:
 *  - Every call that can fail returns a qlora_status; QLORA_OK is 0, failures are positive
 *    and pinned (they never change meaning). On failure, qlora_last_error() returns a
 *    thread-local message naming the file, tensor or argument at fault.
 *  - The library never exits, aborts or prints. Diagnostics go to the log callback, if set.
 *  - Every byte the library allocates goes through a context's tracked allocator and is
 *    tagged with a qlora_mem_category (the memory accountant).
 *  - Shapes are row-major. A weight of nn.Linear is [out, in].
 */
#ifndef QLORA_H
#define QLORA_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  define QLORA_API __declspec(dllexport)
#elif defined(__GNUC__) && __GNUC__ >= 4
#  define QLORA_API __attribute__((visibility("default")))
#else
#  define QLORA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- version */
#define QLORA_VERSION_MAJOR 0
#define QLORA_VERSION_MINOR 1
#define QLORA_VERSION_PATCH 0
#define QLORA_VERSION_NUMBER (QLORA_VERSION_MAJOR * 10000 + QLORA_VERSION_MINOR * 100 + QLORA_VERSION_PATCH)
#define QLORA_VERSION_STRING "0.1.0"

QLORA_API const char *qlora_version_string(void);  /* == QLORA_VERSION_STRING of the built library */
QLORA_API unsigned qlora_version_number(void);     /* == QLORA_VERSION_NUMBER of the built library */
/* 1 when the library was built with the CUDA backend (whether or not a GPU is present). */
QLORA_API int qlora_has_cuda_backend(void);

/* ----------------------------------------------------------------- status */
typedef enum qlora_status {
    QLORA_OK = 0,
    QLORA_ERR_INVALID_ARG = 1,    /* null pointer, out-of-range value, bad option */
    QLORA_ERR_OUT_OF_MEMORY = 2,  /* host or device allocation failed */
    QLORA_ERR_IO = 3,             /* open/read/write/rename failed (errno in the message) */
    QLORA_ERR_FORMAT = 4,         /* malformed file: bad header, JSON, offsets, sizes */
    QLORA_ERR_UNSUPPORTED = 5,    /* valid request this build/version cannot do */
    QLORA_ERR_NON_FINITE = 6,     /* NaN or Inf where finite values are required */
    QLORA_ERR_SHAPE = 7,          /* shapes do not match */
    QLORA_ERR_DTYPE = 8,          /* wrong or unsupported dtype */
    QLORA_ERR_DEVICE = 9,         /* tensor on the wrong device, or no such device */
    QLORA_ERR_CUDA = 10,          /* a CUDA runtime call failed */
    QLORA_ERR_CUBLAS = 11,        /* a cuBLAS call failed */
    QLORA_ERR_NOT_FOUND = 12,     /* no tensor/key/file of that name */
    QLORA_ERR_INTERNAL = 13       /* a bug in libqlora: please report */
} qlora_status;

/* Static description of a status ("invalid argument", ...). Never NULL. */
QLORA_API const char *qlora_status_string(qlora_status status);
/* The message of the last failure on this thread ("" when none). Valid until the next call
 * into the library on this thread. */
QLORA_API const char *qlora_last_error(void);
QLORA_API void qlora_clear_error(void);

typedef enum qlora_log_level {
    QLORA_LOG_DEBUG = 0,
    QLORA_LOG_INFO = 1,
    QLORA_LOG_WARN = 2,
    QLORA_LOG_ERROR = 3
} qlora_log_level;
typedef void (*qlora_log_fn)(qlora_log_level level, const char *message, void *user);
/* Process-wide log sink (NULL: silent, the default). Failures are also logged at ERROR. */
QLORA_API void qlora_set_log_callback(qlora_log_fn fn, void *user);

/* ------------------------------------------------------------------ dtypes */
/* Element types. The first group is what kernels compute on; the rest are storage types that
 * may appear in checkpoints (all safetensors dtypes). NF4/FP4 are packed two per byte. */
typedef enum qlora_dtype {
    QLORA_F32 = 0,
    QLORA_F16 = 1,
    QLORA_BF16 = 2,
    QLORA_U8 = 3,
    QLORA_NF4 = 4,
    QLORA_FP4 = 5,
    QLORA_BOOL = 6,
    QLORA_I8 = 7,
    QLORA_I16 = 8,
    QLORA_U16 = 9,
    QLORA_I32 = 10,
    QLORA_U32 = 11,
    QLORA_I64 = 12,
    QLORA_U64 = 13,
    QLORA_F64 = 14,
    QLORA_C64 = 15,
    QLORA_F8_E5M2 = 16,
    QLORA_F8_E4M3 = 17,
    QLORA_F8_E8M0 = 18,
    QLORA_F8_E4M3FNUZ = 19,
    QLORA_F8_E5M2FNUZ = 20,
    QLORA_F4 = 21,       /* safetensors' own 4-bit float (not bitsandbytes' FP4) */
    QLORA_F6_E2M3 = 22,
    QLORA_F6_E3M2 = 23,
    QLORA_DTYPE_COUNT
} qlora_dtype;

/* "F32", "BF16", "NF4", ...: the safetensors spelling where one exists. */
QLORA_API const char *qlora_dtype_name(qlora_dtype dtype);
/* Bits per element (4 for NF4/FP4/F4, 6 for F6_*); 0 for an invalid dtype. */
QLORA_API int qlora_dtype_bits(qlora_dtype dtype);
/* Parses a safetensors dtype string; QLORA_ERR_DTYPE if unknown. */
QLORA_API qlora_status qlora_dtype_from_name(const char *name, qlora_dtype *out);

/* ------------------------------------------------------- context, memory */
typedef enum qlora_backend {
    QLORA_BACKEND_CPU = 0,
    QLORA_BACKEND_CUDA = 1
} qlora_backend;

/* Which CPU kernels a CPU context runs: the fast ones (OpenMP, vectorised; default) or the
 * scalar reference written for clarity. Both produce identical bytes for quantization. */
typedef enum qlora_cpu_kernels {
    QLORA_CPU_FAST = 0,
    QLORA_CPU_REFERENCE = 1
} qlora_cpu_kernels;

typedef struct qlora_ctx_params {
    qlora_backend backend;
    int device;                    /* CUDA device index (CUDA backend) */
    int num_threads;               /* CPU threads, 0 = OpenMP default */
    qlora_cpu_kernels cpu_kernels;
} qlora_ctx_params;

typedef struct qlora_ctx qlora_ctx;

QLORA_API qlora_ctx_params qlora_ctx_default_params(void);  /* CPU, fast kernels */
/* CUDA backend: QLORA_ERR_UNSUPPORTED in a build without CUDA, QLORA_ERR_DEVICE when the
 * device does not exist. The context owns the stream and the cuBLAS handle. */
QLORA_API qlora_status qlora_ctx_create(const qlora_ctx_params *params, qlora_ctx **out);
/* Frees the context. Allocations still live are released and reported as a leak at WARN. */
QLORA_API void qlora_ctx_free(qlora_ctx *ctx);
QLORA_API qlora_backend qlora_ctx_backend(const qlora_ctx *ctx);
/* The device a context's tensors live on: QLORA_DEVICE_HOST for CPU, else the CUDA index. */
QLORA_API int qlora_ctx_device(const qlora_ctx *ctx);
/* Waits for all work queued on the context's stream (no-op on CPU). */
QLORA_API qlora_status qlora_ctx_synchronize(qlora_ctx *ctx);
/* Number of CUDA devices visible (0 in a CPU-only build or without a GPU). Never fails. */
QLORA_API int qlora_cuda_device_count(void);

#define QLORA_DEVICE_HOST (-1)

/* What an allocation is for: the memory accountant reports bytes per category. */
typedef enum qlora_mem_category {
    QLORA_MEM_BASE_WEIGHTS = 0,     /* packed NF4/FP4 codes */
    QLORA_MEM_QUANT_STATE = 1,      /* absmax, nested absmax, code books */
    QLORA_MEM_ADAPTER_WEIGHTS = 2,
    QLORA_MEM_ADAPTER_GRADS = 3,
    QLORA_MEM_OPTIMIZER_DEVICE = 4,
    QLORA_MEM_OPTIMIZER_HOST = 5,   /* optimizer pages evicted to host */
    QLORA_MEM_MASTER_WEIGHTS = 6,
    QLORA_MEM_ACTIVATIONS = 7,      /* saved for backward */
    QLORA_MEM_CHECKPOINTS = 8,      /* activation checkpoints */
    QLORA_MEM_WORKSPACE = 9,        /* scratch, temporaries */
    QLORA_MEM_DENSE_WEIGHTS = 10,   /* 16-bit frozen tensors: embeddings, norms, lm_head */
    QLORA_MEM_CATEGORY_COUNT
} qlora_mem_category;

QLORA_API const char *qlora_mem_category_name(qlora_mem_category category); /* "base_weights", ... */

typedef struct qlora_mem_stats {
    /* [0] = host, [1] = device; bytes currently allocated and the high-water mark. */
    uint64_t current[2][QLORA_MEM_CATEGORY_COUNT];
    uint64_t peak[2][QLORA_MEM_CATEGORY_COUNT];
    uint64_t total_current[2];
    uint64_t total_peak[2];          /* peak of the sum (not the sum of peaks) */
    uint64_t allocations;            /* number of successful allocations so far */
    uint64_t live_allocations;
} qlora_mem_stats;

/* Allocates `bytes` (may be 0) on the context's device (on_device = 1; host for a CPU
 * context) or in host memory (on_device = 0; pinned for a CUDA context). 256-byte aligned. */
QLORA_API qlora_status qlora_alloc(qlora_ctx *ctx, size_t bytes, int on_device,
                                   qlora_mem_category category, void **out);
/* Frees memory from qlora_alloc. NULL is a no-op; an unknown pointer is ignored and logged. */
QLORA_API void qlora_free(qlora_ctx *ctx, void *ptr);
QLORA_API qlora_status qlora_mem_get_stats(const qlora_ctx *ctx, qlora_mem_stats *out);
/* Resets peaks to the current values. */
QLORA_API void qlora_mem_reset_peak(qlora_ctx *ctx);

/* ----------------------------------------------------------------- tensor */
#define QLORA_MAX_DIMS 8
#define QLORA_NAME_MAX 160

/* A descriptor: it does not own its data unless allocated with qlora_tensor_alloc. */
typedef struct qlora_tensor {
    qlora_dtype dtype;
    int ndim;                         /* 0 = scalar */
    int64_t shape[QLORA_MAX_DIMS];
    void *data;
    int device;                       /* QLORA_DEVICE_HOST or a CUDA device index */
    char name[QLORA_NAME_MAX];        /* used in error messages; may be "" */
} qlora_tensor;

/* Fills a descriptor (data may be NULL). Fails on ndim > QLORA_MAX_DIMS or a negative dim. */
QLORA_API qlora_status qlora_tensor_init(qlora_tensor *t, const char *name, qlora_dtype dtype,
                                         int ndim, const int64_t *shape, void *data, int device);
QLORA_API int64_t qlora_tensor_numel(const qlora_tensor *t);
/* Storage bytes: ceil(numel * bits / 8) (so (n+1)/2 for NF4). */
QLORA_API size_t qlora_tensor_nbytes(const qlora_tensor *t);
/* Allocates storage for a described tensor on the context's device (on_device = 1) or host. */
QLORA_API qlora_status qlora_tensor_alloc(qlora_ctx *ctx, qlora_tensor *t, int on_device,
                                          qlora_mem_category category);
QLORA_API void qlora_tensor_free(qlora_ctx *ctx, qlora_tensor *t);
/* Copies src into dst (same dtype and numel; any host/device combination the ctx reaches). */
QLORA_API qlora_status qlora_tensor_copy(qlora_ctx *ctx, qlora_tensor *dst, const qlora_tensor *src);

/* ------------------------------------------------------ 4-bit quantization */
typedef enum qlora_quant_type {
    QLORA_QUANT_NF4 = 0,
    QLORA_QUANT_FP4 = 1
} qlora_quant_type;

typedef struct qlora_quant_params {
    qlora_quant_type type;   /* default NF4 */
    int blocksize;           /* power of two in 32..4096, default 64 */
    int double_quant;        /* default 1: absmax quantized to 8 bits in blocks of 256 */
} qlora_quant_params;

#define QLORA_NESTED_BLOCKSIZE 256

/* A 4-bit blockwise-quantized tensor in the bitsandbytes layout: the flat row-major array is
 * cut into blocks of `blocksize`; element 2j is the high nibble of codes[j]. */
typedef struct qlora_qtensor {
    qlora_quant_type type;
    int blocksize;
    int double_quant;
    qlora_dtype dtype;                /* dtype of the original tensor (default dequant output) */
    int ndim;
    int64_t shape[QLORA_MAX_DIMS];
    int64_t numel;
    int64_t nblocks;                  /* ceil(numel / blocksize) */
    int64_t nested_nblocks;           /* ceil(nblocks / 256) when double_quant, else 0 */
    uint8_t *codes;                   /* [(numel + 1) / 2] */
    float *absmax;                    /* [nblocks], when !double_quant */
    uint8_t *qabsmax;                 /* [nblocks], when double_quant */
    float *nested_absmax;             /* [nested_nblocks], when double_quant */
    float nested_offset;              /* mean of the float32 absmax, when double_quant */
    float code[16];                   /* the 4-bit code book (host copy) */
    float nested_code[256];           /* the signed dynamic 8-bit map (host copy) */
    int device;                       /* where codes/absmax live */
    char name[QLORA_NAME_MAX];
} qlora_qtensor;

QLORA_API qlora_quant_params qlora_quant_default_params(void);  /* NF4, 64, double quant */
/* The 16-entry code book of a type (bitsandbytes' float32 values), NULL if invalid. */
QLORA_API const float *qlora_quant_codebook(qlora_quant_type type);
/* The 256-entry signed dynamic map used for double quantization. */
QLORA_API const float *qlora_dynamic_map_signed(void);
QLORA_API const char *qlora_quant_type_name(qlora_quant_type type);  /* "nf4" / "fp4" */

/* Quantizes src (F32, F16 or BF16, on the context's device: host memory for a CPU context,
 * the GPU for a CUDA one, else QLORA_ERR_DEVICE) into out, whose storage is allocated by this
 * call on that device (codes: BASE_WEIGHTS, scales: QUANT_STATE). params NULL: the defaults.
 * NaN/Inf in src: QLORA_ERR_NON_FINITE naming the tensor and the element. On failure out
 * holds no storage. */
QLORA_API qlora_status qlora_quantize(qlora_ctx *ctx, const qlora_tensor *src,
                                      const qlora_quant_params *params, qlora_qtensor *out);
/* The nested_offset qlora_quantize(ctx, src, params) would store, bit for bit, computed with
 * one read of src and without quantizing: for writers that must size the quant_state blob
 * before the data. 0 without double quantization (src is not read then) and for an empty src.
 * Same argument, device and NaN/Inf checks as qlora_quantize; on failure *offset is 0. On a
 * CUDA context it quantizes into a temporary on the GPU. */
QLORA_API qlora_status qlora_quant_offset(qlora_ctx *ctx, const qlora_tensor *src,
                                          const qlora_quant_params *params, float *offset);
/* Dequantizes into dst (F32, F16 or BF16, numel == q->numel, same device as q). With double
 * quantization the absmax decode happens in the same pass. */
QLORA_API qlora_status qlora_dequantize(qlora_ctx *ctx, const qlora_qtensor *q, qlora_tensor *dst);
/* Allocates empty storage for a quantized tensor of the given shape (for loading). */
QLORA_API qlora_status qlora_qtensor_alloc(qlora_ctx *ctx, qlora_qtensor *q, const char *name,
                                           int ndim, const int64_t *shape, qlora_dtype dtype,
                                           const qlora_quant_params *params, int on_device);
/* Copies a quantized tensor to another device (dst is allocated). */
QLORA_API qlora_status qlora_qtensor_copy(qlora_ctx *ctx, qlora_qtensor *dst, const qlora_qtensor *src,
                                          int on_device);
QLORA_API void qlora_qtensor_free(qlora_ctx *ctx, qlora_qtensor *q);
/* Bytes of codes + scales (what a checkpoint stores, excluding code books and JSON). */
QLORA_API size_t qlora_qtensor_nbytes(const qlora_qtensor *q);

/* ------------------------------------------------------------ safetensors */
/* A memory-mapped, fully validated safetensors file. Tensor descriptors returned point into
 * the read-only mapping (device HOST): never write through them, and note the data may be
 * unaligned for its dtype in files from other writers. */
typedef struct qlora_safetensors qlora_safetensors;

QLORA_API qlora_status qlora_safetensors_open(const char *path, qlora_safetensors **out);
QLORA_API void qlora_safetensors_close(qlora_safetensors *f);
QLORA_API size_t qlora_safetensors_count(const qlora_safetensors *f);
/* Tensors are indexed in data-offset order. */
QLORA_API qlora_status qlora_safetensors_get(const qlora_safetensors *f, size_t index, qlora_tensor *out);
QLORA_API qlora_status qlora_safetensors_find(const qlora_safetensors *f, const char *name, qlora_tensor *out);
/* A value of __metadata__, NULL when absent. */
QLORA_API const char *qlora_safetensors_metadata(const qlora_safetensors *f, const char *key);

/* A checkpoint: one .safetensors file, or a directory holding model.safetensors or a sharded
 * set with model.safetensors.index.json. Tensor names are unique across shards. */
typedef struct qlora_checkpoint qlora_checkpoint;

QLORA_API qlora_status qlora_checkpoint_open(const char *path, qlora_checkpoint **out);
QLORA_API void qlora_checkpoint_close(qlora_checkpoint *c);
QLORA_API size_t qlora_checkpoint_count(const qlora_checkpoint *c);
/* The i-th tensor name, in sorted order. */
QLORA_API const char *qlora_checkpoint_name(const qlora_checkpoint *c, size_t index);
QLORA_API qlora_status qlora_checkpoint_find(const qlora_checkpoint *c, const char *name, qlora_tensor *out);

/* Streaming, atomic writer. Declare every tensor first, then write each one's bytes in any
 * order; commit makes the output appear at once (temp file(s) + fsync + rename), abort
 * leaves nothing behind. With max_shard_bytes = 0 `path` is one .safetensors file;
 * otherwise `path` is a directory that receives model-0000i-of-0000n.safetensors (or
 * model.safetensors when one shard suffices) and model.safetensors.index.json. */
typedef struct qlora_st_writer qlora_st_writer;

QLORA_API qlora_status qlora_st_writer_open(const char *path, uint64_t max_shard_bytes, qlora_st_writer **out);
QLORA_API qlora_status qlora_st_writer_set_metadata(qlora_st_writer *w, const char *key, const char *value);
QLORA_API qlora_status qlora_st_writer_declare(qlora_st_writer *w, const char *name, qlora_dtype dtype,
                                               int ndim, const int64_t *shape);
QLORA_API qlora_status qlora_st_writer_write(qlora_st_writer *w, const char *name, const void *data, size_t nbytes);
/* Frees w in every case. */
QLORA_API qlora_status qlora_st_writer_commit(qlora_st_writer *w);
QLORA_API void qlora_st_writer_abort(qlora_st_writer *w);

/* ------------------------------------------- bitsandbytes 4-bit checkpoints */
/* `weight_name` is the full name of the quantized weight, e.g.
 * "model.layers.0.self_attn.q_proj.weight"; the companion keys are weight_name + ".absmax",
 * ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4|fp4". */

/* 1 if the checkpoint holds weight_name in the bitsandbytes 4-bit layout. */
QLORA_API int qlora_bnb_is_quantized(const qlora_checkpoint *c, const char *weight_name);
/* Loads a bitsandbytes 4-bit weight onto the context's device (code books read from the file). */
QLORA_API qlora_status qlora_bnb_load(qlora_ctx *ctx, const qlora_checkpoint *c, const char *weight_name,
                                      qlora_qtensor *out);
/* Declares the bitsandbytes key set of q in a writer; then qlora_bnb_write writes it (q on host).
 * Declaring reads only q's layout (type, blocksize, double_quant, dtype, ndim, shape, numel,
 * nblocks, nested_nblocks) and nested_offset, not its storage: a weight can be declared before
 * it is quantized, its offset from qlora_quant_offset. */
QLORA_API qlora_status qlora_bnb_declare(qlora_st_writer *w, const char *weight_name, const qlora_qtensor *q);
QLORA_API qlora_status qlora_bnb_write(qlora_st_writer *w, const char *weight_name, const qlora_qtensor *q);

/* ---------------------------------------------------------- QLoRA linear layer */
/* A linear layer whose frozen weight W [out, in] is 4-bit (NF4 or FP4, optionally double
 * quantized) plus trainable low-rank adapters A [r, in] and B [out, r] in BF16, with PEFT's
 * LoRA semantics (adapters move between the two):
 *
 *   Y  = X·Wᵀ (+ bias) + Σ_enabled s · H·Bᵀ,        H = bf16(dropout(X)·Aᵀ)  [M, r]
 *   dX = dY·W + Σ s · dropout'(G·A),                 G = bf16(dY·B)           [M, r]
 *   dB += s · dYᵀ·H,     dA += s · Gᵀ·dropout(X)     (W never gets a gradient)
 *
 * X, Y, dY, dX are BF16 [..., in] / [..., out] (M = the product of the leading dimensions).
 * Products accumulate in FP32 (the CPU reference in FP64); H and G are rounded to BF16 (as the
 * GPU stores them) and the CPU rounds Y and dX to BF16 once, at the end. CUDA multiplies W's
 * values rounded to BF16 (as bitsandbytes does) and rounds the LoRA part of Y and dX to BF16
 * before the 4-bit matmul adds onto it. s = alpha / r, or alpha / sqrt(r) with rsLoRA.
 * dropout(x) = bf16(x / (1 - p)) where kept, 0 where dropped; dropout' applies the same mask
 * and scale to the gradient. Element (i, k) is kept iff
 * Philox4x32-10 (key: the adapter's key, counter stream: the forward's rng_stream, index
 * i·in + k; see lib/philox.h) gives a uniform >= p, so masks are identical on every backend and
 * reproducible from (seed, stream). The adapter's key mixes its seed with the weight's name and
 * the adapter's name, so layers and adapters that share a seed still draw independent masks and
 * inits. Stream UINT64_MAX is reserved for the initialization of A.
 *
 * Saved for backward: H per enabled adapter, 2·r bytes per token per adapter (BF16, category
 * ACTIVATIONS). The dropout masks are recomputed from the RNG, not stored, and the input X is
 * not copied: the caller keeps it until backward.
 *
 * A layer is used by one thread at a time. The weight and the bias are referenced, not copied:
 * they must outlive the layer, stay on the context's device, and not change between a forward
 * and its backward. */

#define QLORA_LINEAR_MAX_ADAPTERS 8

typedef struct qlora_lora_params {
    int rank;              /* r >= 1 */
    float alpha;           /* lora_alpha (finite) */
    int use_rslora;        /* 0: s = alpha / r; 1: s = alpha / sqrt(r) */
    float dropout;         /* p in [0, 1): LoRA dropout on the adapter input in training */
    uint64_t seed;         /* init of A and the dropout masks */
    qlora_dtype grad_dtype;/* QLORA_BF16 (the QLoRA recipe) or QLORA_F32 */
} qlora_lora_params;

/* QLoRA's recipe: r 64, alpha 16, no rsLoRA, dropout 0.1 (the paper's value for 7B and 13B;
 * it used 0.05 for 33B and 65B), seed 0, BF16 gradients. */
QLORA_API qlora_lora_params qlora_lora_default_params(void);
/* The scaling s of a parameter set (alpha / r or alpha / sqrt(r)); NaN when rank < 1. */
QLORA_API float qlora_lora_scaling(const qlora_lora_params *params);

typedef struct qlora_linear qlora_linear;

/* Creates a layer over `weight`, a 2-D quantized tensor [out, in] on the context's device
 * (QLORA_ERR_DEVICE otherwise), and an optional bias, NULL or BF16 [out] on the same device.
 * Both are referenced (see above); qlora_linear_merge rewrites the weight. */
QLORA_API qlora_status qlora_linear_create(qlora_ctx *ctx, qlora_qtensor *weight, const qlora_tensor *bias,
                                           qlora_linear **out);
/* Frees the layer and its adapters (not the weight or the bias). NULL is a no-op. */
QLORA_API void qlora_linear_free(qlora_linear *lin);
QLORA_API int64_t qlora_linear_in_features(const qlora_linear *lin);
QLORA_API int64_t qlora_linear_out_features(const qlora_linear *lin);
/* The frozen 4-bit weight the layer references (e.g. to save it after qlora_linear_merge). */
QLORA_API const qlora_qtensor *qlora_linear_weight(const qlora_linear *lin);

/* Attaches an adapter (enabled) named `name` (1-63 characters, no dots or spaces, unique in the
 * layer, e.g. "default"); params NULL:
 * the defaults. A is initialized as PEFT does (kaiming_uniform with a = sqrt(5), i.e. uniform in
 * ±1/sqrt(in)) from the adapter's key, B and the gradients are zero. A and B are allocated as
 * ADAPTER_WEIGHTS, dA and dB as ADAPTER_GRADS. *id (may be NULL) receives its index 0, 1, ... */
QLORA_API qlora_status qlora_linear_add_adapter(qlora_linear *lin, const char *name, const qlora_lora_params *params,
                                                int *id);
/* The index of the adapter called `name`: QLORA_ERR_NOT_FOUND if none. */
QLORA_API qlora_status qlora_linear_find_adapter(const qlora_linear *lin, const char *name, int *id);
QLORA_API qlora_status qlora_linear_adapter_params(const qlora_linear *lin, int id, qlora_lora_params *out);
/* Enabled adapters take part in forward and backward; disabled ones are skipped entirely. */
QLORA_API qlora_status qlora_linear_adapter_enable(qlora_linear *lin, int id, int enabled);
/* Descriptors of the adapter's tensors on the context's device, for the optimizer and for
 * saving/loading (write A and B through them; the layer owns the storage). Any output may be
 * NULL. Names are "<weight name without .weight>.lora_A.<adapter>.weight" and so on, as in PEFT's
 * state dict; the gradients add ".grad". A [r, in], B [out, r] BF16; dA, dB in grad_dtype. */
QLORA_API qlora_status qlora_linear_adapter_tensors(const qlora_linear *lin, int id, qlora_tensor *a, qlora_tensor *b,
                                                    qlora_tensor *grad_a, qlora_tensor *grad_b);
/* Sets every adapter's gradients to zero (backward accumulates into them). */
QLORA_API qlora_status qlora_linear_zero_grads(qlora_linear *lin);

typedef struct qlora_linear_fwd_opts {
    int training;          /* 1: LoRA dropout is applied (with the adapter's p) */
    uint64_t rng_stream;   /* dropout counter: advance it every step (and micro-batch) so masks differ
                            * between steps and can be replayed; UINT64_MAX is reserved */
} qlora_linear_fwd_opts;

/* What a forward keeps for its backward. Zero-initialize it (= {0}) before the first forward;
 * qlora_linear_saved_free empties it again. */
typedef struct qlora_linear_saved {
    const qlora_linear *layer;                    /* the layer that filled it, NULL when empty */
    int64_t rows;                                 /* M */
    int training;
    uint64_t rng_stream;
    int count;                                    /* adapters enabled at the forward */
    int adapter[QLORA_LINEAR_MAX_ADAPTERS];       /* their ids */
    qlora_tensor h[QLORA_LINEAR_MAX_ADAPTERS];    /* H [M, r] BF16 on the context's device */
} qlora_linear_saved;

/* y = layer(x), x [..., in] and y [..., out] BF16 with the same leading dimensions, on the
 * context's device; y must not overlap x. opts NULL: inference (no dropout). saved NULL: nothing
 * is kept (inference); otherwise it must be empty and receives what backward needs. */
QLORA_API qlora_status qlora_linear_forward(qlora_linear *lin, const qlora_tensor *x, qlora_tensor *y,
                                            const qlora_linear_fwd_opts *opts, qlora_linear_saved *saved);
/* Backward of the forward that filled `saved`, with the same x: accumulates the gradients of the
 * adapters that were enabled then, and writes dx ([..., in] BF16) unless dx is NULL (the first
 * layer needs none). The dropout masks are those of the forward (its stream is in `saved`). */
QLORA_API qlora_status qlora_linear_backward(qlora_linear *lin, const qlora_tensor *x, const qlora_tensor *dy,
                                             const qlora_linear_saved *saved, qlora_tensor *dx);
/* Releases the activations held by `saved` and empties it. NULL or empty: no-op. */
QLORA_API void qlora_linear_saved_free(qlora_linear_saved *saved);

/* Merges adapter `id` into the frozen weight: W' = dequant(W) + s·B·A in FP32, re-quantized
 * with `requant` (NULL: the weight's own type, blocksize and double quantization). This changes
 * the weight the layer references (in place when the layout is unchanged; otherwise its storage
 * is replaced, so it must come from this context's allocator) and disables the adapter, whose
 * tensors stay available. Rounding to 4 bits makes the merged layer only approximately equal to
 * the layer with the adapter. Any saved activations of this layer are invalid afterwards. */
QLORA_API qlora_status qlora_linear_merge(qlora_linear *lin, int id, const qlora_quant_params *requant);

/* -------------------------------------------------------------- tokenizer */
/* A Hugging Face tokenizer.json with a BPE model, as `tokenizers` runs it: byte-level BPE
 * (GPT-2, Llama 3, SmolLM, Qwen2: Split regex and/or ByteLevel pre-tokenizer, ignore_merges,
 * NFC) and the SentencePiece style of Llama 2 and Mistral (Metaspace, or the legacy Prepend +
 * Replace normalizer; byte fallback to <0xNN> pieces). Normalizers: Prepend, Replace, NFC, NFD,
 * NFKC, NFKD (through utf8proc; its Unicode tables are newer than those of `tokenizers`, so
 * characters assigned since can normalize differently). Added and special tokens are split
 * out before normalization (honouring lstrip, rstrip, single_word and normalized); merges may
 * be "a b" strings or ["a", "b"] pairs. Components the library does not implement (other models
 * such as WordPiece or Unigram, other normalizers, BPE dropout, ...) are refused at load with
 * QLORA_ERR_UNSUPPORTED naming the file and the component, never run differently.
 * A loaded tokenizer is immutable and may be used from several threads at once. */
typedef struct qlora_tokenizer qlora_tokenizer;

/* Loads tokenizer.json from `path`. QLORA_ERR_NOT_FOUND / QLORA_ERR_IO when it cannot be read;
 * QLORA_ERR_FORMAT naming the file and the field when it is malformed (bad JSON, a merge of
 * tokens missing from the vocab, ...). If tokenizer_config.json lies in the same directory,
 * its bos_token / eos_token name the BOS / EOS ids (see qlora_tokenizer_bos_id). */
QLORA_API qlora_status qlora_tokenizer_load(const char *path, qlora_tokenizer **out);
/* NULL is a no-op. */
QLORA_API void qlora_tokenizer_free(qlora_tokenizer *tok);

/* Encodes text[len] (UTF-8; invalid UTF-8 is QLORA_ERR_INVALID_ARG, never replaced silently)
 * like tokenizer.encode(text, add_special_tokens=add_special).ids: add_special != 0 adds what
 * the post-processor's template puts around the text (BOS, and EOS where the template has it).
 * Like snprintf: writes the first min(cap, *n) ids to ids[cap] and sets *n to the full count,
 * so a call with cap 0 (ids may be NULL) sizes the buffer. */
QLORA_API qlora_status qlora_tokenizer_encode(const qlora_tokenizer *tok, const char *text, size_t len,
                                              int add_special, int32_t *ids, size_t cap, size_t *n);
/* Decodes ids[n] like tokenizer.decode(ids, skip_special_tokens=skip_special) into buf[cap],
 * NUL-terminated and truncated when cap is too small (buf may be NULL when cap is 0); *needed
 * receives the size of the whole text, NUL included. Byte sequences that are not UTF-8 decode
 * to U+FFFD as in the reference. An id that is not a token is QLORA_ERR_INVALID_ARG. */
QLORA_API qlora_status qlora_tokenizer_decode(const qlora_tokenizer *tok, const int32_t *ids, size_t n,
                                              int skip_special, char *buf, size_t cap, size_t *needed);
/* 1 + the largest token id (model vocabulary and added tokens): the rows an embedding needs. */
QLORA_API int32_t qlora_tokenizer_vocab_size(const qlora_tokenizer *tok);
/* The id of a token spelled exactly `token` (an added token or a vocabulary entry, in the
 * model's own alphabet, e.g. "<s>", "\xc4\xa0the"), or -1. */
QLORA_API int32_t qlora_tokenizer_token_id(const qlora_tokenizer *tok, const char *token);
/* The spelling of token `id` (owned by the tokenizer), or NULL when no token has that id. An
 * added token with "normalized": true is spelled as the normalizer leaves it, as in decode. */
QLORA_API const char *qlora_tokenizer_token(const qlora_tokenizer *tok, int32_t id);
/* BOS: the first token the post-processor's template puts before the text, else
 * tokenizer_config.json's bos_token; EOS: tokenizer_config.json's eos_token, else the last token
 * the template puts after the text. -1 when there is none. */
QLORA_API int32_t qlora_tokenizer_bos_id(const qlora_tokenizer *tok);
QLORA_API int32_t qlora_tokenizer_eos_id(const qlora_tokenizer *tok);

/* ------------------------------------------------------------------ model */
/* A Llama-family causal LM (LlamaForCausalLM, MistralForCausalLM without a sliding window,
 * Qwen2ForCausalLM) loaded from a Hugging Face model directory as a QLoRA model: every decoder
 * linear weight (q, k, v, o, gate, up, down) is 4-bit, each wrapped in a qlora_linear with the
 * adapters chosen at load; embeddings, norms, biases and lm_head stay 16-bit (BF16, category
 * DENSE_WEIGHTS; a tied lm_head shares the embedding). The forward follows transformers' eager
 * BF16 computation (/work/shared/spec/formats.md §2): BF16 activations, each residual add
 * rounded to BF16, FP32 logits and loss. It runs on CPU and CUDA contexts. On a CUDA context
 * the weights (quantized on the GPU, bit-identical with the CPU quantizer), the adapters, the
 * activations and the KV cache live on the context's GPU; the per-token arguments (tokens,
 * positions, seq_start, labels, prompts) and the results (logits, loss, generated ids) are host
 * memory on every backend. Those arguments are checked on the host before anything runs, so a
 * bad one fails with the same message on both backends. The CUDA kernels round to BF16 where
 * the CPU ones do but sum in other orders (and CUDA's one-token decode path of the 4-bit
 * weights, used by generation steps, rounds them differently from its batched path), so the
 * backends agree to BF16 noise, not bit for bit. A model is used by one thread at a time. */
typedef struct qlora_model qlora_model;
struct qlora_model_config;

typedef struct qlora_model_load_opts {
    /* How BF16/F16/F32 linear weights are quantized while loading (weights stored by
     * bitsandbytes in 4 bits are loaded as they are). Default: NF4, blocksize 64, double quant. */
    qlora_quant_params quant;
    /* Adapter "default" on every decoder linear layer (not lm_head), B = 0 at init so the
     * model's output is unchanged. rank 0: no adapters. Default: qlora_lora_default_params(). */
    qlora_lora_params lora;
    /* Which decoder linear layers get the adapter: an OR of QLORA_TARGET_* bits.
     * Default: QLORA_TARGET_ALL_LINEAR (the QLoRA recipe). */
    uint32_t targets;
} qlora_model_load_opts;

/* Adapter targets, one bit per decoder projection (PEFT's target_modules names). */
#define QLORA_TARGET_Q_PROJ    (1u << 0)
#define QLORA_TARGET_K_PROJ    (1u << 1)
#define QLORA_TARGET_V_PROJ    (1u << 2)
#define QLORA_TARGET_O_PROJ    (1u << 3)
#define QLORA_TARGET_GATE_PROJ (1u << 4)
#define QLORA_TARGET_UP_PROJ   (1u << 5)
#define QLORA_TARGET_DOWN_PROJ (1u << 6)
#define QLORA_TARGET_ATTENTION (QLORA_TARGET_Q_PROJ | QLORA_TARGET_K_PROJ | QLORA_TARGET_V_PROJ | QLORA_TARGET_O_PROJ)
#define QLORA_TARGET_ALL_LINEAR (QLORA_TARGET_ATTENTION | QLORA_TARGET_GATE_PROJ | QLORA_TARGET_UP_PROJ | \
                                 QLORA_TARGET_DOWN_PROJ)
/* The projection name of target bit i ("q_proj" ... "down_proj"), NULL for i outside [0, 7). */
QLORA_API const char *qlora_target_name(int i);

QLORA_API qlora_model_load_opts qlora_model_load_default_opts(void);

/* Loads the model in directory `dir`: config.json (see qlora_model_config_from_json_file; also
 * rms_norm_eps, hidden_act and the RoPE type) and the checkpoint (model.safetensors or a sharded
 * set), quantizing tensor by tensor so the 16-bit linear weights are never all in memory.
 * opts NULL: the defaults. Refused with QLORA_ERR_UNSUPPORTED naming config.json and the field:
 * a model_type other than llama, mistral, qwen2; a RoPE type other than default, linear, llama3;
 * a sliding window; an activation other than silu. A missing tensor is QLORA_ERR_NOT_FOUND, a
 * wrong shape QLORA_ERR_SHAPE and an unusable dtype QLORA_ERR_DTYPE, each naming the tensor. */
QLORA_API qlora_status qlora_model_load(qlora_ctx *ctx, const char *dir, const qlora_model_load_opts *opts,
                                        qlora_model **out);
/* Frees the model and everything it allocated. NULL is a no-op. */
QLORA_API void qlora_model_free(qlora_model *model);
/* The context the model was loaded on (to copy its tensors, e.g. adapters, with qlora_tensor_copy). */
QLORA_API qlora_ctx *qlora_model_context(const qlora_model *model);
/* The model's dimensions as read from config.json. */
QLORA_API qlora_status qlora_model_get_config(const qlora_model *model, struct qlora_model_config *out);
/* The linear layer `proj` ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
 * "down_proj") of decoder layer `layer` (owned by the model), e.g. to reach its adapters. */
QLORA_API qlora_status qlora_model_linear(qlora_model *model, int64_t layer, const char *proj, qlora_linear **out);

/* Inference forward over T tokens (a packed batch of one or more sequences):
 *   tokens     [T] ids in [0, vocab_size)
 *   positions  [T] RoPE positions (>= 0), or NULL: t - seq_start[t] (0, 1, ... per sequence)
 *   seq_start  [T] first token of t's sequence (seq_start[0] = 0, each entry seq_start[t-1] or
 *              t: sequences are contiguous), or NULL: one sequence. Attention is causal and
 *              never crosses a sequence boundary.
 *   labels     [T] targets, already shifted (labels[t] is what position t predicts; -100 is
 *              ignored), or NULL: no loss. *loss_out receives the mean cross-entropy over the
 *              non-ignored tokens (0 when there are none), computed in chunks of tokens so the
 *              [T, V] logits are never all in memory.
 *   logits_out [T, V] FP32 (may be NULL): the logits, not rounded to BF16.
 * Enabled adapters take part (without dropout). */
QLORA_API qlora_status qlora_model_forward(qlora_model *model, const int32_t *tokens, const int32_t *positions,
                                           const int32_t *seq_start, int64_t T, const int32_t *labels,
                                           float *loss_out, float *logits_out);

/* Enables or disables, in every layer that has it, the adapter called `name` (generation with
 * the adapter on or off). QLORA_ERR_NOT_FOUND when no layer has it. */
QLORA_API qlora_status qlora_model_enable_adapter(qlora_model *model, const char *name, int enabled);

/* ---- Training: forward and backward to the adapters. Every weight but the enabled adapters'
 * A and B is frozen, so the backward computes only what those gradients need.
 *
 * Activation checkpointing (on by default). The forward keeps only each decoder layer's input
 * h_i [T, H] BF16 (category CHECKPOINTS: 2·H bytes per token per layer, plus the final norm's
 * input); the backward recomputes one layer at a time from h_i, with the same dropout masks
 * (same rng_stream), keeping that layer's activations (category ACTIVATIONS) only while its
 * backward runs. Without checkpointing every layer's activations are kept from the forward:
 * per token per layer, in bytes, 2·(4H + 2·qd + 2·kvd + 3I) + 4·nh + the adapters' H
 * (2·r per adapted projection), with qd = nh·d, kvd = nkv·d, I = intermediate_size. Both modes
 * give the same gradients bit for bit. */
typedef struct qlora_batch {
    const int32_t *tokens;     /* [T] ids in [0, vocab_size) */
    const int32_t *positions;  /* [T] or NULL: see qlora_model_forward */
    const int32_t *seq_start;  /* [T] or NULL: one sequence; see qlora_model_forward */
    const int32_t *labels;     /* [T] already shifted; -100 ignored */
    int64_t T;
} qlora_batch;

typedef struct qlora_train_step_opts {
    int grad_checkpointing;    /* 1 (default): recompute each layer in backward */
    uint64_t rng_stream;       /* LoRA dropout stream of this micro-batch (see qlora_linear_fwd_opts) */
    double loss_denom;         /* > 0: the gradient is that of Σ token losses / loss_denom (e.g. the
                                  target tokens of all micro-batches of one update); 0 (default):
                                  of the mean over this batch's target tokens */
    int64_t loss_chunk_tokens; /* tokens per cross-entropy chunk; 0 (default): 128 */
} qlora_train_step_opts;

QLORA_API qlora_train_step_opts qlora_train_step_default_opts(void);

typedef struct qlora_train_step_result {
    double loss_sum;           /* Σ over target tokens of −log p(label) (training mode: dropout on) */
    int64_t targets;           /* target tokens (labels != -100) */
} qlora_train_step_result;

/* One micro-batch in training mode (LoRA dropout on): accumulates into the enabled adapters'
 * gradients (zero them with qlora_optimizer_zero_grad or qlora_linear_zero_grads between
 * updates). The batch arrays are host memory on every backend. opts NULL: the defaults. */
QLORA_API qlora_status qlora_model_forward_backward(qlora_model *model, const qlora_batch *batch,
                                                    const qlora_train_step_opts *opts,
                                                    qlora_train_step_result *out);

/* ---- Generation with a KV cache: the prompt in one pass, then one token at a time, each
 * step through the 4-bit decode path with the enabled adapters. */
typedef struct qlora_generate_opts {
    int64_t max_new_tokens;    /* 128 */
    float temperature;         /* 0: greedy (argmax, lowest id on ties); > 0: sampling (1.0) */
    float top_p;               /* nucleus sampling: the smallest set of most likely tokens whose
                                  probability reaches top_p (1.0: off); in (0, 1] */
    uint64_t seed;             /* sampling is reproducible from (seed, prompt) */
    int32_t eos_id;            /* generation stops after this token; -1: never (default) */
    /* Called with each new token as it is chosen (NULL: none); returning nonzero stops. */
    int (*on_token)(int32_t id, void *user);
    void *user;
} qlora_generate_opts;

QLORA_API qlora_generate_opts qlora_generate_default_opts(void);

/* Generates after prompt[n_prompt] (n_prompt >= 1), writing at most `cap` new ids to out
 * (*n_out of them). The cache holds n_prompt + max_new_tokens positions (2·L·nkv·d BF16 per
 * position, category WORKSPACE, freed before returning). */
QLORA_API qlora_status qlora_model_generate(qlora_model *model, const int32_t *prompt, int64_t n_prompt,
                                            const qlora_generate_opts *opts, int32_t *out, int64_t cap,
                                            int64_t *n_out);

/* ---- A random model, for tests, examples and benchmarks. Writes the Hugging Face directory
 * `dir` (created when missing; its parent must exist) that qlora_model_load reads as cfg:
 *   config.json        {Llama,Mistral,Qwen2}ForCausalLM after cfg->model_type ("" = llama),
 *                      torch_dtype bfloat16, max_position_embeddings 4096, initializer_range
 *                      init_std; qlora_model_config_from_json_file reads back cfg (all but
 *                      `name`; an rms_norm_eps of 0 reads back as 1e-6)
 *   model.safetensors  BF16: every tensor qlora_model_load needs (lm_head.weight only when
 *                      untied); linear weights, embedding and lm_head N(0, init_std²); norms 1;
 *                      biases 0
 * Row r of tensor `name` is drawn from its own splitmix64 stream, seeded with
 * mix64(seed ^ fnv1a64(name) ^ r·0xd1b54a32d192ed03), by Box-Muller in double precision
 * (cos, then sin, of each pair), rounded to BF16 to nearest even: the same bytes for the same
 * (cfg, seed, init_std) on every machine and thread count, and a tensor's values do not depend
 * on which other tensors the model has. The weights are committed atomically (temp file +
 * rename), then config.json the same way. Host memory: one buffer the size of the largest
 * tensor (malloc, not the accountant: no context is involved). QLORA_ERR_INVALID_ARG for an
 * invalid cfg (see qlora_model_config_validate), a negative or non-finite init_std, a
 * model_type other than llama, mistral, qwen2, or biases config.json cannot express (llama and
 * mistral: qkv_bias == o_bias, their attention_bias; qwen2: qkv_bias set); QLORA_ERR_IO naming
 * the path when a file or the directory cannot be written. */
QLORA_API qlora_status qlora_model_write_random(const struct qlora_model_config *cfg, const char *dir, uint64_t seed,
                                                double init_std);

/* ------------------------------------------------- memory accountant report */
/* The accountant's tables, written like snprintf into buf[cap] (NUL-terminated, truncated when
 * cap is too small; buf may be NULL when cap is 0). *needed receives the size of the whole
 * report, NUL included: call once with cap 0 to size the buffer. Allocations made between two
 * calls can make the second report longer. The library never prints; the caller does.
 * Text: one row per category with current and peak bytes on host and device, then totals
 * (the peak of the sum, not the sum of peaks). On a CUDA context both reports add the device's
 * own view (qlora_mem_device_info). */
QLORA_API qlora_status qlora_mem_report_text(const qlora_ctx *ctx, char *buf, size_t cap, size_t *needed);
/* One JSON object, every count an integer in bytes:
 *   {"backend": "cpu"|"cuda", "device": -1|index,
 *    "categories": {"base_weights": {"host": {"current": N, "peak": N}, "device": {...}}, ...},
 *    "total": {"host": {"current": N, "peak": N}, "device": {...}},
 *    "allocations": N, "live_allocations": N,
 *    "device_memory": {"free": N, "total": N, "used": N, "tracked": N, "untracked": N}}
 * "device_memory" only on a CUDA context; "untracked" may be negative. */
QLORA_API qlora_status qlora_mem_report_json(const qlora_ctx *ctx, char *buf, size_t cap, size_t *needed);

/* The device's own view of its memory (cudaMemGetInfo) next to the accountant's. */
typedef struct qlora_mem_device_info {
    int available;              /* 1 on a CUDA context; 0 on a CPU one (and all else 0) */
    uint64_t free_bytes;
    uint64_t total_bytes;
    uint64_t used_bytes;        /* total - free: all processes, CUDA contexts, cuBLAS, libqlora */
    uint64_t tracked_bytes;     /* the accountant's current device total */
    int64_t untracked_bytes;    /* used - tracked: what did not go through qlora_alloc (the CUDA
                                   context, cuBLAS workspaces, other processes, cudaMalloc rounding) */
} qlora_mem_device_info;
QLORA_API qlora_status qlora_mem_device_info_get(const qlora_ctx *ctx, qlora_mem_device_info *out);

/* ---- The analytic estimator: what training a model needs, before loading it. Every formula
 * is written down in docs/memory.md. Bytes are exact integers; GB in docs means 10^9 bytes. */

/* The shape of a Llama-family decoder (Llama 1/2/3, Mistral, Qwen2): pre-norm layers of
 * attention (q, k, v, o) and a SwiGLU MLP (gate, up, down), RMSNorm, untied or tied lm_head. */
/* The RoPE variant of config.json's rope_scaling (transformers 4.x) or rope_parameters (5.x). */
typedef enum qlora_rope_type {
    QLORA_ROPE_DEFAULT = 0,    /* no scaling */
    QLORA_ROPE_LINEAR = 1,     /* positions divided by factor */
    QLORA_ROPE_LLAMA3 = 2,     /* Llama 3.1's frequency-dependent scaling */
    QLORA_ROPE_UNSUPPORTED = 3 /* any other rope_type (yarn, dynamic, longrope...): estimable, not runnable */
} qlora_rope_type;

typedef struct qlora_rope_config {
    qlora_rope_type type;
    char type_name[32];       /* rope_type as written ("default" when absent), for messages */
    double factor;            /* linear, llama3; 0 otherwise */
    double low_freq_factor;   /* llama3 */
    double high_freq_factor;  /* llama3 */
    int64_t original_max_position_embeddings; /* llama3 */
} qlora_rope_config;

typedef struct qlora_model_config {
    char name[QLORA_NAME_MAX];  /* the preset name, or "<model_type> (<path>)" */
    int64_t hidden_size;        /* H */
    int64_t intermediate_size;  /* I: MLP inner size */
    int64_t num_layers;         /* L */
    int64_t num_heads;          /* nh */
    int64_t num_kv_heads;       /* nkv: == nh without grouped-query attention */
    int64_t head_dim;           /* d: hidden_size / num_heads unless the config says otherwise */
    int64_t vocab_size;         /* V */
    int tie_word_embeddings;    /* lm_head shares the embedding matrix */
    int qkv_bias;               /* q, k, v have a bias (Qwen2; Llama with attention_bias) */
    int o_bias;                 /* o_proj has a bias (Llama with attention_bias) */
    int mlp_bias;               /* gate, up, down have a bias */
    double rope_theta;          /* RoPE base, 0 when the config has none (not used for memory) */
    /* Read for the forward, not used for memory: */
    char model_type[16];        /* "llama", "mistral" or "qwen2" */
    double rms_norm_eps;        /* RMSNorm epsilon; 1e-6 (LlamaConfig's default) when absent */
    qlora_rope_config rope;     /* RoPE scaling; QLORA_ROPE_DEFAULT when absent or null */
    char hidden_act[32];        /* MLP activation; "silu" when absent */
    int64_t sliding_window;     /* window in tokens when sliding-window attention is on, else 0 */
} qlora_model_config;

/* Reads a Hugging Face config.json: transformers 4.x names (rope_theta, torch_dtype) and 5.x
 * ones (rope_parameters, dtype); a multimodal config's "text_config" when the top level has no
 * hidden_size. QLORA_ERR_NOT_FOUND / QLORA_ERR_IO when the file cannot be read;
 * QLORA_ERR_FORMAT naming the file and the field when one is missing, mistyped, out of range
 * or inconsistent (e.g. hidden_size not divisible by num_attention_heads without head_dim, a
 * llama3 rope_scaling without low_freq_factor). Features the forward does not implement (a
 * sliding window, yarn RoPE, a gelu activation) are recorded, not refused: qlora_model_load
 * refuses them. */
QLORA_API qlora_status qlora_model_config_from_json_file(const char *path, qlora_model_config *out);
/* A preset with the published dimensions (docs/memory.md lists them with their sources):
 * llama-7b, llama-13b, llama-33b, llama-65b, llama-2-70b, llama-3-8b, llama-3-70b,
 * mistral-7b, qwen2.5-7b. QLORA_ERR_NOT_FOUND listing the valid names. */
QLORA_API qlora_status qlora_model_config_preset(const char *name, qlora_model_config *out);
/* The index-th preset name, NULL past the end. */
QLORA_API const char *qlora_model_preset_name(size_t index);
/* QLORA_ERR_INVALID_ARG naming the field unless every size is positive and sane (limits in
 * docs/memory.md), nkv divides nh, and the parameter count stays below 10^14. */
QLORA_API qlora_status qlora_model_config_validate(const qlora_model_config *cfg);

typedef enum qlora_lora_targets {
    QLORA_TARGETS_ALL_LINEAR = 0,  /* q, k, v, o, gate, up, down: the QLoRA recipe */
    QLORA_TARGETS_ATTENTION = 1    /* q, k, v, o */
} qlora_lora_targets;

typedef struct qlora_train_settings {
    int64_t seq_len;            /* tokens per sequence (default 512) */
    int64_t micro_batch;        /* sequences per forward/backward pass (1) */
    int64_t lora_rank;          /* r (64) */
    qlora_lora_targets targets; /* (all-linear) */
    int grad_checkpointing;     /* keep each layer's input only and recompute the layer (1) */
    int optimizer_state_bytes;  /* per trainable parameter: 8 = AdamW with FP32 m and v (8);
                                   2 = 8-bit Adam; 0 = plain SGD. At most 16 */
    int master_weights;         /* FP32 master copy of the trainable parameters (0) */
    int page_optimizer;         /* optimizer state paged out to host memory (0) */
    qlora_dtype adapter_dtype;  /* LoRA weights and gradients: BF16 (default), F16 or F32 */
} qlora_train_settings;

QLORA_API qlora_train_settings qlora_train_default_settings(void);

typedef enum qlora_train_regime {
    QLORA_REGIME_FULL_16BIT = 0,  /* every weight trained: BF16 weights and gradients */
    QLORA_REGIME_LORA_16BIT = 1,  /* frozen BF16 base + LoRA adapters */
    QLORA_REGIME_QLORA = 2,       /* frozen NF4 + double-quant base (blocksize 64) + LoRA */
    QLORA_REGIME_COUNT
} qlora_train_regime;

/* "full_finetune_16bit", "lora_16bit", "qlora" ("invalid" otherwise). */
QLORA_API const char *qlora_train_regime_name(qlora_train_regime regime);

typedef struct qlora_mem_estimate_result {
    uint64_t params_total;      /* parameters of the base model */
    uint64_t params_linear;     /* of which in the decoder layers' linear weights */
    uint64_t params_trainable;  /* every parameter (full finetuning) or the LoRA A and B */
    /* Predicted peak bytes per accountant category (at the start of the backward pass). For
     * the 16-bit regimes base_weights holds the BF16 linear weights. */
    uint64_t bytes[QLORA_MEM_CATEGORY_COUNT];
    /* The same grouped as qlora-mem prints them; total is the sum of the five. */
    uint64_t weights;           /* base_weights + quant_state + dense_weights */
    uint64_t trainable;         /* adapter_weights + master_weights (full finetuning trains the
                                   weights in place: only a master copy adds to this) */
    uint64_t gradients;         /* adapter_grads (the gradient of whatever is trained) */
    uint64_t optimizer;         /* optimizer_device + optimizer_host */
    uint64_t activations;       /* activations + checkpoints + workspace */
    uint64_t total;
    uint64_t device_total;      /* total - optimizer_host: what must fit on the GPU */
} qlora_mem_estimate_result;

/* Predicts the memory of training cfg with settings (NULL: the defaults) in a regime.
 * QLORA_ERR_INVALID_ARG naming the field for an invalid config or setting. */
QLORA_API qlora_status qlora_mem_estimate(const qlora_model_config *cfg, const qlora_train_settings *settings,
                                          qlora_train_regime regime, qlora_mem_estimate_result *out);

/* ------------------------------------------------------- paged AdamW */
/* AdamW with float32 moments for BF16 trainable tensors (LoRA adapters), the update of
 * bitsandbytes' paged_adamw_32bit: per element, in float32,
 *   g = grad * grad_scale * clip_coef
 *   m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
 *   p = p - (lr c2 / c1) m / (sqrt(v) + eps c2),   c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t)
 *   p = p (1 - lr weight_decay)    (decoupled decay applied AFTER the Adam step, as bitsandbytes
 *                                   does; PyTorch's AdamW shrinks p before it)
 * with t = 1 for the first update. p is the FP32 master copy when master_weights is on (the BF16
 * parameter is then its rounding), else the BF16 parameter itself, rounded to nearest even.
 *
 * Paging. The state of every parameter is cut into pages of page_bytes: page j of a parameter
 * holds elements [j*E, (j+1)*E) with E = page_bytes / (4 * states), rounded down to a multiple
 * of 64 (states = 2 for m, v, or 3 with a master copy). When every parameter is smaller than E,
 * pages shrink to the largest parameter rounded up to 64 elements (elements_per_page reports
 * the size in force), so small adapters do not each hold a 2 MiB page. A page is resident in
 * the device pool or evicted to pinned host memory; each step visits the pages in registration
 * order and makes each resident just before its update (and prefetches the next one while it
 * runs, on a copy stream). With gpu_mem_limit at most floor(gpu_mem_limit / page_bytes) pages
 * are resident; when a page must come in and the pool is full, the resident page whose next use
 * in that fixed order is farthest away is evicted, never the page being updated (for a cyclic
 * order this keeps most pages in place, where least-recently-used would miss on every page;
 * the counts are deterministic and equal on every backend). A failed device
 * allocation while the pool grows caps the pool and evicts instead. Paging never changes a
 * result: a paged run equals an unpaged one bit for bit. On a CPU context the same page table
 * runs against a simulated device pool (host memory counted as device-pool categories).
 *
 * Memory accountant: pool pages count as optimizer_device (m, v) and master_weights (the FP32
 * copy); host copies of evicted pages (kept for reuse once made) count as optimizer_host. */

typedef enum qlora_lr_kind {
    QLORA_LR_CONSTANT = 0,   /* constant after warmup (the QLoRA recipe) */
    QLORA_LR_LINEAR = 1,     /* linear decay to min_lr after warmup */
    QLORA_LR_COSINE = 2      /* half-cosine decay to min_lr after warmup */
} qlora_lr_kind;

/* The learning rate of update s (s = updates already taken: 0 for the first, as in Hugging
 * Face's LambdaLR schedulers), with W = warmup_steps, T = total_steps, r = min_lr_ratio:
 *   s < W:     lr * s / W                                       (so the first update uses lr 0)
 *   CONSTANT:  lr
 *   LINEAR:    lr * (r + (1 - r) * max(0, (T - s) / max(1, T - W)))
 *   COSINE:    lr * (r + (1 - r) * 0.5 * (1 + cos(pi * min(1, (s - W) / max(1, T - W)))))
 * With r = 0 these are transformers' get_{constant,linear,cosine}_schedule_with_warmup, except
 * that cosine holds min_lr after T instead of rising again. */
typedef struct qlora_lr_schedule {
    qlora_lr_kind kind;
    double lr;              /* peak learning rate, >= 0 */
    int64_t warmup_steps;   /* >= 0 */
    int64_t total_steps;    /* LINEAR/COSINE: > 0, the update at which min_lr is reached */
    double min_lr_ratio;    /* LINEAR/COSINE floor as a fraction of lr, in [0, 1] */
} qlora_lr_schedule;

/* *lr = the schedule's learning rate for update `step` (>= 0). Fails on an invalid schedule,
 * naming the field. */
QLORA_API qlora_status qlora_lr_at(const qlora_lr_schedule *schedule, int64_t step, double *lr);

typedef struct qlora_adamw_params {
    double beta1;             /* 0.9 */
    double beta2;             /* 0.999 */
    double eps;               /* 1e-8 */
    double weight_decay;      /* 0.0 (QLoRA) */
    double max_grad_norm;     /* global L2 clipping threshold, 0 = off; 0.3 (QLoRA) */
    int master_weights;       /* 1: keep an FP32 master copy of each parameter; 0 (QLoRA) */
    uint64_t gpu_mem_limit;   /* bytes of the device pool for state pages; 0 = no limit */
    size_t page_bytes;        /* bytes per page, >= 256 * states; 2 MiB */
    qlora_lr_schedule schedule; /* CONSTANT, lr 2e-4, no warmup */
} qlora_adamw_params;

typedef struct qlora_optimizer qlora_optimizer;

/* What one qlora_optimizer_step did. */
typedef struct qlora_step_report {
    int64_t step;          /* updates taken so far (this one included unless skipped) */
    int skipped;           /* 1: a gradient held NaN/Inf; nothing was written */
    int64_t skipped_total; /* steps skipped so far (saved and restored with the state) */
    double grad_norm;      /* global L2 norm of grad * grad_scale before clipping; NaN if skipped */
    double clip_coef;      /* min(1, max_grad_norm / (grad_norm + 1e-6)); 1 without clipping */
    double lr;             /* learning rate of this update (of the update that was skipped) */
} qlora_step_report;

typedef struct qlora_paging_stats {
    uint64_t pages_total;       /* pages of all registered parameters */
    uint64_t pages_on_device;   /* resident now */
    uint64_t pool_pages;        /* device page slots allocated so far */
    uint64_t pool_limit;        /* most slots the pool may hold: from gpu_mem_limit or a failed
                                   device allocation; 0 = no limit */
    uint64_t elements_per_page;
    uint64_t page_outs, page_ins;  /* device -> host and host -> device page copies */
    uint64_t bytes_out, bytes_in;
    double seconds;             /* time spent copying pages (CUDA: measured on the copy stream
                                   with events; CPU: wall time of the copies) */
} qlora_paging_stats;

QLORA_API qlora_adamw_params qlora_adamw_default_params(void);
/* params NULL: the defaults. The optimizer belongs to ctx and must be freed before it. */
QLORA_API qlora_status qlora_adamw_create(qlora_ctx *ctx, const qlora_adamw_params *params,
                                          qlora_optimizer **out);
/* Registers a trainable tensor (before the first step): param BF16 and grad BF16 or F32 with
 * the same number of elements, both on the context's device, neither moved nor freed while the
 * optimizer lives. param->name (non-empty, unique) names the state in errors and save files.
 * The state starts at zero (the master copy at the parameter's value). */
QLORA_API qlora_status qlora_optimizer_add_param(qlora_optimizer *opt, const qlora_tensor *param,
                                                 const qlora_tensor *grad);
/* One update of every registered parameter from its accumulated gradient: grad_scale (> 0,
 * e.g. 1 / accumulation_steps) multiplies every gradient; then the global norm is clipped to
 * max_grad_norm. If any gradient element is NaN/Inf the step is skipped: no parameter or state
 * is written and neither the step count nor the schedule advances (as PyTorch's GradScaler and
 * transformers' Trainer do); it is reported, not an error. Gradients are left as they are (call
 * qlora_optimizer_zero_grad). out may be NULL. On CUDA the update is queued on the context
 * stream. */
QLORA_API qlora_status qlora_optimizer_step(qlora_optimizer *opt, double grad_scale, qlora_step_report *out);
/* Sets every registered gradient to zero (before accumulating the next micro-batches). */
QLORA_API qlora_status qlora_optimizer_zero_grad(qlora_optimizer *opt);
/* The hyperparameters in force (after a load, those of the file). */
QLORA_API qlora_status qlora_optimizer_get_params(const qlora_optimizer *opt, qlora_adamw_params *out);
/* Saves the exact state (m, v, the master copies, the step count and the hyperparameters) as
 * one safetensors file, atomically: tensors "<param>.exp_avg", "<param>.exp_avg_sq" and, with
 * master weights, "<param>.master" (F32, the parameter's shape), hyperparameters in metadata.
 * The parameters themselves are the caller's to save. */
QLORA_API qlora_status qlora_optimizer_save(qlora_optimizer *opt, const char *path);
/* Restores a saved state into an optimizer with the same parameters registered (same names,
 * shapes and master_weights setting; nothing else in the file). Everything is validated before
 * anything is written. The hyperparameters and schedule become those of the file; the paging
 * settings stay this optimizer's. */
QLORA_API qlora_status qlora_optimizer_load(qlora_optimizer *opt, const char *path);
/* Waits for queued optimizer work (so that `seconds` is complete), then fills *out. */
QLORA_API qlora_status qlora_optimizer_paging_stats(qlora_optimizer *opt, qlora_paging_stats *out);
/* Waits for queued work and releases every page. NULL is a no-op. */
QLORA_API void qlora_optimizer_free(qlora_optimizer *opt);

#ifdef __cplusplus
}
#endif
#endif /* QLORA_H */
