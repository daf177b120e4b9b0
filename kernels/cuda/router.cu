// RouteTopK: softmax + top-k per token (phase 2 of kernels/cuda/cuda_kernels.h).
#include <climits>

#include "kernels/cuda/cuda_util.cuh"

namespace sy::kernels::cuda {
namespace {

constexpr int kPerLane = kMaxExperts / 32;  // logits each lane holds
constexpr int kWarpsPerBlock = 4;

// One warp per token; lane l holds experts l, l+32, l+64, ... Selection compares logits (as
// model/router.cc does; softmax is monotone) with ties to the lower id, k rounds of a warp
// arg-max. NaN logits are treated as -inf so that k experts are always chosen.
__global__ void RouteTopKKernel(const float* __restrict__ logits, int64_t num_tokens,
                                int num_experts, int num_topk, bool renormalize,
                                int32_t* __restrict__ topk_ids, float* __restrict__ topk_weights) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= num_tokens) return;  // whole warps leave together
  const float* l = logits + t * num_experts;
  float v[kPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + 32 * j;
    float x = e < num_experts ? l[e] : -INFINITY;
    if (isnan(x)) x = -INFINITY;
    v[j] = x;
    mx = fmaxf(mx, x);
  }
  mx = internal::WarpMax(mx);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    if (lane + 32 * j < num_experts) sum += expf(v[j] - mx);
  sum = internal::WarpSum(sum);

  unsigned taken = 0;
  float prob[kMaxTopk];
  int ids[kMaxTopk];
  float top_sum = 0.f;
#pragma unroll
  for (int kk = 0; kk < kMaxTopk; ++kk) {
    if (kk >= num_topk) break;
    float bv = -INFINITY;
    int be = INT_MAX;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      if (e < num_experts && !((taken >> j) & 1u) && (v[j] > bv || (v[j] == bv && e < be))) {
        bv = v[j];
        be = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oe = __shfl_xor_sync(0xffffffffu, be, o);
      if (ov > bv || (ov == bv && oe < be)) {
        bv = ov;
        be = oe;
      }
    }
    if ((be & 31) == lane) taken |= 1u << (be >> 5);
    ids[kk] = be;
    prob[kk] = expf(bv - mx) / sum;
    top_sum += prob[kk];
  }
  if (lane == 0) {
    for (int kk = 0; kk < num_topk; ++kk) {
      topk_ids[t * num_topk + kk] = ids[kk];
      topk_weights[t * num_topk + kk] = renormalize ? prob[kk] / top_sum : prob[kk];
    }
  }
}

}  // namespace

absl::Status RouteTopK(const float* logits, int64_t num_tokens, int64_t num_experts,
                       int64_t num_topk, bool renormalize, int32_t* topk_ids,
                       float* topk_weights, cudaStream_t stream) {
  if (num_tokens < 0 || num_experts <= 0 || num_experts > kMaxExperts || num_topk < 1 ||
      num_topk > kMaxTopk || num_topk > num_experts)
    return absl::InvalidArgumentError(absl::StrCat(
        "RouteTopK: need 1 <= num_topk <= min(", kMaxTopk, ", num_experts) and num_experts <= ",
        kMaxExperts, "; got tokens=", num_tokens, " experts=", num_experts, " topk=", num_topk));
  if (num_tokens == 0) return absl::OkStatus();
  const int64_t blocks = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > INT32_MAX) return absl::InvalidArgumentError("RouteTopK: too many tokens");
  RouteTopKKernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
      logits, num_tokens, static_cast<int>(num_experts), static_cast<int>(num_topk), renormalize,
      topk_ids, topk_weights);
  return internal::LaunchStatus("RouteTopKKernel");
}

}  // namespace sy::kernels::cuda
