#include "kernels/core/dtype.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace sy {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  if (name == "F32" || name == "f32" || name == "float32") return DType::kF32;
  if (name == "BF16" || name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "F16" || name == "f16" || name == "float16") return DType::kF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype '", name, "' (supported: F32, BF16, F16)"));
}

float F16ToF32(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

uint16_t F32ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  uint32_t absu = u & 0x7fffffff;
  if (absu > 0x7f800000) return static_cast<uint16_t>(sign | 0x7e00);   // NaN
  if (absu >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);  // overflow -> inf
  if (absu < 0x38800000) {  // subnormal or zero in f16
    float a;
    std::memcpy(&a, &absu, 4);
    uint32_t m = static_cast<uint32_t>(std::nearbyint(a * 16777216.0f));  // / 2^-24
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t exp = ((absu >> 23) - 112) << 10;
  uint32_t mant = (absu >> 13) & 0x3ff;
  uint32_t rest = absu & 0x1fff;
  uint32_t h = exp | mant;
  if (rest > 0x1000 || (rest == 0x1000 && (mant & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

void ConvertToF32(DType dtype, const void* src, int64_t n, float* dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(s[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      return;
    }
  }
}

}  // namespace sy
