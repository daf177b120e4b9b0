// Device helpers shared by the .cu files of kernels/cuda (not a public header).
// Element loads/stores for f32 and bf16 activations, warp reductions, and the host-side
// argument checks every launcher does before it launches anything.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/core/dtype.h"
#include "kernels/cuda/cuda_kernels.h"

namespace sy::kernels::cuda::internal {

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void Store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// f32 or bf16 activations only.
inline absl::Status CheckActDType(DType t, const char* what) {
  if (t == DType::kF32 || t == DType::kBF16) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": dtype ", DTypeName(t), " is not supported (f32 or bf16)"));
}

// Status of the launch just made (cudaGetLastError), annotated with the kernel's name.
inline absl::Status LaunchStatus(const char* kernel) {
  return CudaStatus(cudaGetLastError(), kernel);
}

// Calls f(tag) with a null pointer of the element type of `t` (float or __nv_bfloat16), so a
// launcher can template its kernel on the dtype: Dispatch(t, [&](auto* tag) { ... }).
template <typename F>
void Dispatch(DType t, F&& f) {
  if (t == DType::kBF16) {
    f(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    f(static_cast<float*>(nullptr));
  }
}

}  // namespace sy::kernels::cuda::internal
