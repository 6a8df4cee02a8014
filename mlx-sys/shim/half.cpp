// kvserve: the four 16-bit float accessors that mlx-c compiles only on ARM,
// over raw bits (uint16_t) on other platforms. Errors go through mlx_error
// like every mlx-c function, so Rust sees them as Err, never as an abort.
#include <cstdint>
#include <cstring>
#include <exception>

#include "mlx/c/array.h"
#include "mlx/c/error.h"
#include "mlx/c/private/mlx.h"

#if !defined(HAS_FLOAT16)
static_assert(sizeof(mlx::core::float16_t) == sizeof(uint16_t));
extern "C" int mlx_array_item_float16(uint16_t* res, const mlx_array arr) {
  try {
    auto value = mlx_array_get_(arr).item<mlx::core::float16_t>();
    std::memcpy(res, &value, sizeof(uint16_t));
  } catch (std::exception& e) {
    mlx_error(e.what());
    return 1;
  }
  return 0;
}
extern "C" const uint16_t* mlx_array_data_float16(const mlx_array arr) {
  try {
    return reinterpret_cast<const uint16_t*>(
        mlx_array_get_(arr).data<mlx::core::float16_t>());
  } catch (std::exception& e) {
    mlx_error(e.what());
    return nullptr;
  }
}
#endif

#if !defined(HAS_BFLOAT16)
static_assert(sizeof(mlx::core::bfloat16_t) == sizeof(uint16_t));
extern "C" int mlx_array_item_bfloat16(uint16_t* res, const mlx_array arr) {
  try {
    auto value = mlx_array_get_(arr).item<mlx::core::bfloat16_t>();
    std::memcpy(res, &value, sizeof(uint16_t));
  } catch (std::exception& e) {
    mlx_error(e.what());
    return 1;
  }
  return 0;
}
extern "C" const uint16_t* mlx_array_data_bfloat16(const mlx_array arr) {
  try {
    return reinterpret_cast<const uint16_t*>(
        mlx_array_get_(arr).data<mlx::core::bfloat16_t>());
  } catch (std::exception& e) {
    mlx_error(e.what());
    return nullptr;
  }
}
#endif
