/*
 * Function attributes of the fast host kernels (lib/adamw_fast.c, lib/quant4_fast.c).
 */
#ifndef QLORA_SIMD_ATTRS_H
#define QLORA_SIMD_ATTRS_H

/* The per-dtype copies rely on their helpers being inlined with constant arguments. */
#if defined(__GNUC__)
#define QL_INLINE static inline __attribute__((always_inline))
#else
#define QL_INLINE static inline
#endif

/* QL_TARGET_CLONES("avx2", "default"): on x86-64 the function is compiled once per listed target
 * and the loader picks one (an ifunc); elsewhere it is compiled once. The clones perform the same
 * IEEE operations with no contraction, so every path gives identical bits. */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define QL_TARGET_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#endif
#endif
#ifndef QL_TARGET_CLONES
#define QL_TARGET_CLONES(...)
#endif

#endif
