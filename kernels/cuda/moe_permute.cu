// MoE permute: layout, gather and combine (phase 3 of kernels/cuda/cuda_kernels.h).
//
// The layout is built without atomics so it is the same on every run: one block per expert
// counts, then compacts (block-wide ballot scan), the choices routed to it, in flat order.
// Each block reads all num_tokens * num_topk ids, i.e. O(E · T · k) loads in total; for the
// shapes served here (E <= 256, T·k <= 64k, ids stay in L2) that is a few tens of microseconds.
#include "kernels/cuda/cuda_util.cuh"

namespace sy::kernels::cuda {
namespace {

constexpr int kLayoutThreads = 256;

__global__ void CountPerExpertKernel(const int32_t* __restrict__ topk_ids, int64_t num_flat,
                                     int32_t* __restrict__ expert_counts) {
  __shared__ int warp_counts[kLayoutThreads / 32];
  const int e = blockIdx.x;
  int c = 0;
  for (int64_t f = threadIdx.x; f < num_flat; f += blockDim.x) c += topk_ids[f] == e;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kLayoutThreads / 32; ++w) total += warp_counts[w];
    expert_counts[e] = total;
  }
}

__global__ void ExclusiveScanKernel(const int32_t* __restrict__ counts, int num_experts,
                                    int32_t* __restrict__ offsets) {
  if (threadIdx.x != 0) return;
  int32_t run = 0;
  for (int e = 0; e < num_experts; ++e) {
    offsets[e] = run;
    run += counts[e];
  }
  offsets[num_experts] = run;
}

// Block e writes the grouped rows of expert e, in ascending flat index.
__global__ void CompactPerExpertKernel(const int32_t* __restrict__ topk_ids, int64_t num_flat,
                                       const int32_t* __restrict__ expert_offsets,
                                       int32_t* __restrict__ grouped_to_flat,
                                       int32_t* __restrict__ flat_to_grouped) {
  __shared__ int warp_counts[kLayoutThreads / 32];
  const int e = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int base = expert_offsets[e];
  for (int64_t chunk = 0; chunk < num_flat; chunk += kLayoutThreads) {
    const int64_t f = chunk + threadIdx.x;
    const bool match = f < num_flat && topk_ids[f] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, match);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, chunk_total = 0;
    for (int w = 0; w < kLayoutThreads / 32; ++w) {
      if (w < warp) before += warp_counts[w];
      chunk_total += warp_counts[w];
    }
    if (match) {
      const int row = base + before + __popc(ballot & ((1u << lane) - 1u));
      grouped_to_flat[row] = static_cast<int32_t>(f);
      flat_to_grouped[f] = row;
    }
    base += chunk_total;
    __syncthreads();  // warp_counts is rewritten by the next chunk
  }
}

template <typename V>
__global__ void GatherRowsKernel(const V* __restrict__ x, int64_t row_vecs, int64_t num_topk,
                                 const int32_t* __restrict__ grouped_to_flat,
                                 V* __restrict__ grouped_x) {
  const int64_t row = blockIdx.x;
  const int32_t f = grouped_to_flat[row];
  V* dst = grouped_x + row * row_vecs;
  if (f < 0) {
    for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) dst[i] = V{};
    return;
  }
  const V* src = x + (f / num_topk) * row_vecs;
  for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) dst[i] = src[i];
}

template <typename TY, typename TO>
__global__ void CombineKernel(const TY* __restrict__ grouped_y,
                              const int32_t* __restrict__ flat_to_grouped,
                              const float* __restrict__ topk_weights, int num_topk,
                              int64_t hidden, TO* __restrict__ out) {
  __shared__ int32_t rows[kMaxTopk * 4];
  __shared__ float weights[kMaxTopk * 4];
  const int64_t t = blockIdx.x;
  for (int j = threadIdx.x; j < num_topk; j += blockDim.x) {
    rows[j] = flat_to_grouped[t * num_topk + j];
    weights[j] = topk_weights[t * num_topk + j];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < num_topk; ++j)
      if (rows[j] >= 0) acc += weights[j] * internal::Load(grouped_y, rows[j] * hidden + i);
    internal::Store(out, t * hidden + i, acc);
  }
}

}  // namespace

absl::Status MoePermuteLayout(const int32_t* topk_ids, int64_t num_tokens, int64_t num_topk,
                              int64_t num_experts, int32_t* expert_counts,
                              int32_t* expert_offsets, int32_t* grouped_to_flat,
                              int32_t* flat_to_grouped, cudaStream_t stream) {
  const int64_t num_flat = num_tokens * num_topk;
  if (num_tokens < 0 || num_topk < 1 || num_experts < 1 || num_experts > 65535 ||
      num_flat > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("MoePermuteLayout: bad sizes tokens=", num_tokens,
                                                   " topk=", num_topk, " experts=", num_experts));
  if (num_flat > 0) {
    if (auto s = CudaStatus(cudaMemsetAsync(grouped_to_flat, 0xff, num_flat * sizeof(int32_t), stream),
                            "MoePermuteLayout memset");
        !s.ok())
      return s;
    if (auto s = CudaStatus(cudaMemsetAsync(flat_to_grouped, 0xff, num_flat * sizeof(int32_t), stream),
                            "MoePermuteLayout memset");
        !s.ok())
      return s;
  }
  CountPerExpertKernel<<<num_experts, kLayoutThreads, 0, stream>>>(topk_ids, num_flat, expert_counts);
  if (auto s = internal::LaunchStatus("CountPerExpertKernel"); !s.ok()) return s;
  ExclusiveScanKernel<<<1, 32, 0, stream>>>(expert_counts, static_cast<int>(num_experts), expert_offsets);
  if (auto s = internal::LaunchStatus("ExclusiveScanKernel"); !s.ok()) return s;
  if (num_flat == 0) return absl::OkStatus();
  CompactPerExpertKernel<<<num_experts, kLayoutThreads, 0, stream>>>(topk_ids, num_flat, expert_offsets,
                                                                     grouped_to_flat, flat_to_grouped);
  return internal::LaunchStatus("CompactPerExpertKernel");
}

absl::Status MoeGatherRows(const void* x, DType dtype, int64_t num_tokens, int64_t hidden,
                           int64_t num_topk, const int32_t* grouped_to_flat, int64_t num_rows,
                           void* grouped_x, cudaStream_t stream) {
  if (auto s = internal::CheckActDType(dtype, "MoeGatherRows"); !s.ok()) return s;
  if (num_tokens < 0 || hidden <= 0 || num_topk < 1 || num_rows < 0 || num_rows > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("MoeGatherRows: bad sizes tokens=", num_tokens,
                                                   " hidden=", hidden, " rows=", num_rows));
  if (num_rows == 0) return absl::OkStatus();
  const int64_t row_bytes = hidden * DTypeSize(dtype);
  const bool vec = row_bytes % 16 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(grouped_x) & 15) == 0;
  if (vec) {
    GatherRowsKernel<uint4><<<num_rows, 128, 0, stream>>>(static_cast<const uint4*>(x), row_bytes / 16,
                                                          num_topk, grouped_to_flat,
                                                          static_cast<uint4*>(grouped_x));
  } else {
    GatherRowsKernel<uint16_t><<<num_rows, 128, 0, stream>>>(static_cast<const uint16_t*>(x), row_bytes / 2,
                                                             num_topk, grouped_to_flat,
                                                             static_cast<uint16_t*>(grouped_x));
  }
  return internal::LaunchStatus("GatherRowsKernel");
}

absl::Status MoeCombine(const void* grouped_y, DType y_dtype, const int32_t* flat_to_grouped,
                        const float* topk_weights, int64_t num_tokens, int64_t num_topk,
                        int64_t hidden, void* out, DType out_dtype, cudaStream_t stream) {
  if (auto s = internal::CheckActDType(y_dtype, "MoeCombine y"); !s.ok()) return s;
  if (auto s = internal::CheckActDType(out_dtype, "MoeCombine out"); !s.ok()) return s;
  if (num_tokens < 0 || num_topk < 1 || num_topk > kMaxTopk * 4 || hidden <= 0 ||
      num_tokens > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("MoeCombine: bad sizes tokens=", num_tokens,
                                                   " topk=", num_topk, " hidden=", hidden));
  if (num_tokens == 0) return absl::OkStatus();
  const int threads = hidden >= 256 ? 256 : 64;
  internal::Dispatch(y_dtype, [&](auto* yt) {
    using TY = std::remove_pointer_t<decltype(yt)>;
    internal::Dispatch(out_dtype, [&](auto* ot) {
      using TO = std::remove_pointer_t<decltype(ot)>;
      CombineKernel<TY, TO><<<num_tokens, threads, 0, stream>>>(
          static_cast<const TY*>(grouped_y), flat_to_grouped, topk_weights,
          static_cast<int>(num_topk), hidden, static_cast<TO*>(out));
    });
  });
  return internal::LaunchStatus("CombineKernel");
}

}  // namespace sy::kernels::cuda
