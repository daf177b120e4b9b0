// Element types of weights and their conversions to float.
//
// Checkpoints hold f32, bf16 or f16 weights; activations are f32 throughout the CPU engine.
// bf16 rounding is round-to-nearest-even (what PyTorch and the reference files use).
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sy {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int64_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }
const char* DTypeName(DType t);  // "F32", "BF16", "F16" (safetensors spelling)
// Parses the safetensors spelling ("F32", "BF16", "F16") or the short form ("f32", "bf16",
// "f16", "float32", "bfloat16", "float16"). InvalidArgument for anything else.
absl::StatusOr<DType> ParseDType(absl::string_view name);

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Converts `n` elements of `dtype` at `src` to float.
void ConvertToF32(DType dtype, const void* src, int64_t n, float* dst);

}  // namespace sy
