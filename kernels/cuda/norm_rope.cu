// RmsNorm and rotate-half RoPE (phase 1 of kernels/cuda/cuda_kernels.h).
#include "kernels/cuda/cuda_util.cuh"

namespace sy::kernels::cuda {
namespace {

using internal::Load;
using internal::Store;

// Block-wide sum in a fixed order (warp butterflies, then warp 0 over the warp partials), so
// the result does not depend on scheduling.
__device__ float BlockSum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  v = internal::WarpSum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < num_warps ? partial[lane] : 0.f;
    s = internal::WarpSum(s);
    if (lane == 0) partial[0] = s;
  }
  __syncthreads();
  return partial[0];
}

// One block per row. kVec: x is read 16 bytes at a time (dim % (16 / sizeof(TX)) == 0 and x
// 16-byte aligned). Each thread touches the same elements in both passes, so y == x is safe.
template <typename TX, typename TW, typename TY, bool kVec>
__global__ void RmsNormKernel(const TX* __restrict__ x, const TW* __restrict__ w, TY* y,
                              int64_t dim, float eps) {
  const TX* xr = x + static_cast<int64_t>(blockIdx.x) * dim;
  TY* yr = y + static_cast<int64_t>(blockIdx.x) * dim;
  constexpr int kV = 16 / sizeof(TX);
  float ss = 0.f;
  if constexpr (kVec) {
    for (int64_t v = threadIdx.x; v < dim / kV; v += blockDim.x) {
      const uint4 raw = reinterpret_cast<const uint4*>(xr)[v];
      const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const float f = Load(e, j);
        ss += f * f;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float f = Load(xr, i);
      ss += f * f;
    }
  }
  const float inv_rms = rsqrtf(BlockSum(ss) / static_cast<float>(dim) + eps);
  if constexpr (kVec) {
    for (int64_t v = threadIdx.x; v < dim / kV; v += blockDim.x) {
      const uint4 raw = reinterpret_cast<const uint4*>(xr)[v];
      const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int64_t i = v * kV + j;
        Store(yr, i, Load(e, j) * inv_rms * Load(w, i));
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
      Store(yr, i, Load(xr, i) * inv_rms * Load(w, i));
  }
}

template <typename T>
__global__ void RopeKernel(T* q, T* k, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, const int32_t* __restrict__ positions,
                           double theta) {
  const int64_t t = blockIdx.x, half = head_dim / 2;
  const double pos = static_cast<double>(positions[t]);
  const int64_t total = (num_heads + num_kv_heads) * half;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t head = idx / half, i = idx % half;
    T* v = head < num_heads ? q + (t * num_heads + head) * head_dim
                            : k + (t * num_kv_heads + (head - num_heads)) * head_dim;
    // Angles in double as model/moe_model.cc does: positions reach 1e5+ and an f32 product
    // would be off by whole milliradians.
    const double a = pos * pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    double s, c;
    sincos(a, &s, &c);
    const float cf = static_cast<float>(c), sf = static_cast<float>(s);
    const float x1 = Load(v, i), x2 = Load(v, i + half);
    Store(v, i, x1 * cf - x2 * sf);
    Store(v, i + half, x2 * cf + x1 * sf);
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

absl::Status RmsNorm(const void* x, DType x_dtype, int64_t num_rows, int64_t dim,
                     const void* weight, DType w_dtype, float eps, void* y, DType y_dtype,
                     cudaStream_t stream) {
  if (auto s = internal::CheckActDType(x_dtype, "RmsNorm x"); !s.ok()) return s;
  if (auto s = internal::CheckActDType(w_dtype, "RmsNorm weight"); !s.ok()) return s;
  if (auto s = internal::CheckActDType(y_dtype, "RmsNorm y"); !s.ok()) return s;
  if (num_rows < 0 || dim <= 0 || num_rows > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: bad shape [", num_rows, ", ", dim, "]"));
  if (x == y && x_dtype != y_dtype)
    return absl::InvalidArgumentError("RmsNorm: in place needs x_dtype == y_dtype");
  if (num_rows == 0) return absl::OkStatus();
  const int64_t vec = 16 / DTypeSize(x_dtype);
  const bool use_vec = dim % vec == 0 && Aligned16(x);
  const int64_t work = use_vec ? dim / vec : dim;
  const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, (work + 31) / 32 * 32)));
  internal::Dispatch(x_dtype, [&](auto* xt) {
    using TX = std::remove_pointer_t<decltype(xt)>;
    internal::Dispatch(w_dtype, [&](auto* wt) {
      using TW = std::remove_pointer_t<decltype(wt)>;
      internal::Dispatch(y_dtype, [&](auto* yt) {
        using TY = std::remove_pointer_t<decltype(yt)>;
        if (use_vec) {
          RmsNormKernel<TX, TW, TY, true><<<num_rows, threads, 0, stream>>>(
              static_cast<const TX*>(x), static_cast<const TW*>(weight), static_cast<TY*>(y), dim, eps);
        } else {
          RmsNormKernel<TX, TW, TY, false><<<num_rows, threads, 0, stream>>>(
              static_cast<const TX*>(x), static_cast<const TW*>(weight), static_cast<TY*>(y), dim, eps);
        }
      });
    });
  });
  return internal::LaunchStatus("RmsNormKernel");
}

absl::Status ApplyRope(void* q, void* k, DType dtype, int64_t num_tokens, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, const int32_t* positions,
                       double theta, cudaStream_t stream) {
  if (auto s = internal::CheckActDType(dtype, "ApplyRope"); !s.ok()) return s;
  if (num_tokens < 0 || num_heads < 0 || num_kv_heads < 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      num_tokens > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("ApplyRope: bad shape tokens=", num_tokens,
                                                   " heads=", num_heads, " kv_heads=", num_kv_heads,
                                                   " head_dim=", head_dim, " (head_dim must be even)"));
  if (num_kv_heads > 0 && k == nullptr)
    return absl::InvalidArgumentError("ApplyRope: k is null but num_kv_heads > 0");
  if (!(theta > 0)) return absl::InvalidArgumentError("ApplyRope: theta must be positive");
  if (num_tokens == 0 || num_heads + num_kv_heads == 0) return absl::OkStatus();
  internal::Dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    RopeKernel<T><<<num_tokens, 128, 0, stream>>>(static_cast<T*>(q), static_cast<T*>(k), num_heads,
                                                  num_kv_heads, head_dim, positions, theta);
  });
  return internal::LaunchStatus("RopeKernel");
}

}  // namespace sy::kernels::cuda
