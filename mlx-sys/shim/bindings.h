/* kvserve: the header bindgen reads.
 * mlx-c declares the float16/bfloat16 accessors only on ARM (mlx/c/half.h).
 * Elsewhere, declare them over 16-bit raw bits so Rust sees one API on every
 * platform; shim/half.cpp defines them. The Rust types float16_t/bfloat16_t
 * are blocklisted and defined in src/lib.rs. */
#include <stdint.h>
#if !(defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) || defined(__aarch64__))
#define HAS_FLOAT16
typedef uint16_t float16_t;
#endif
#if !(defined(__ARM_FEATURE_BF16) || defined(__aarch64__))
#define HAS_BFLOAT16
typedef uint16_t bfloat16_t;
#endif
#include "mlx/c/mlx.h"
