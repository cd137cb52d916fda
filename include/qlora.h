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
/* Declares the bitsandbytes key set of q in a writer; then qlora_bnb_write writes it (q on host). */
QLORA_API qlora_status qlora_bnb_declare(qlora_st_writer *w, const char *weight_name, const qlora_qtensor *q);
QLORA_API qlora_status qlora_bnb_write(qlora_st_writer *w, const char *weight_name, const qlora_qtensor *q);

/* ------------------------------------------------- memory accountant report */
/* (section owned by the accountant/estimator work: reports, estimator) */

/* ------------------------------------------------------- paged AdamW */
/* (section owned by the optimizer work) */

#ifdef __cplusplus
}
#endif
#endif /* QLORA_H */
