// The cuda Backend (kernels/cuda/cuda_backend.h) against the reference backend on the same
// inputs: MatMul for bf16, f32 and f16 weights (row strides with padding, bias, 1 to 70
// tokens), the grouped expert FFN with empty groups and an offset first group, and the weight
// cache (a second product with the same weight reuses its upload). Label gpu: skips without a
// device (fails instead with SY_REQUIRE_GPU=1).
//
// Tolerance: activations go to the device in bf16, products accumulate in f32, expert outputs
// come back in bf16, so every output is within 2e-2 of the f32 reference relative to the
// output's largest magnitude.
#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <cstdlib>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/core/dtype.h"
#include "tests/testing/gpu_testing.h"

namespace sy::kernels::cuda {
namespace {


// A weight of `rows` x `cols` in `dtype` with `pad` unused elements after each row.
struct HostWeight {
  std::vector<uint8_t> bytes;
  WeightView view;
};
HostWeight MakeWeight(int64_t rows, int64_t cols, int64_t pad, DType dtype, std::mt19937& rng) {
  std::normal_distribution<float> n(0.f, 1.f / std::sqrt(static_cast<float>(cols)));
  HostWeight w;
  const int64_t stride = cols + pad, es = DTypeSize(dtype);
  w.bytes.assign(static_cast<size_t>(rows * stride * es), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = n(rng);
      uint8_t* p = &w.bytes[(r * stride + c) * es];
      if (dtype == DType::kF32) {
        std::memcpy(p, &v, 4);
      } else {
        const uint16_t h = dtype == DType::kBF16 ? F32ToBf16(v) : F32ToF16(v);
        std::memcpy(p, &h, 2);
      }
    }
  w.view = {dtype, w.bytes.data(), rows, cols, stride};
  return w;
}

std::vector<float> Random(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& f : v) f = d(rng);
  return v;
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  float scale = 1e-6f, worst = 0.f;
  for (float w : want) scale = std::max(scale, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << " [" << i << "]";
    worst = std::max(worst, std::abs(got[i] - want[i]));
  }
  EXPECT_LE(worst / scale, 2e-2f) << what << ": worst " << worst << " of scale " << scale;
}

TEST(CudaBackendTest, MatMulMatchesTheReferenceForEveryWeightDtype) {
  SKIP_WITHOUT_GPU();
  auto cuda = MakeCudaBackend(0);
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  auto ref = MakeReferenceBackend();
  std::mt19937 rng(3);
  for (DType dtype : {DType::kBF16, DType::kF32, DType::kF16})
    for (int64_t tokens : {1, 7, 70})
      for (auto [n, k, pad] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
               {64, 128, 0}, {37, 96, 8}, {1000, 256, 0}}) {
        HostWeight w = MakeWeight(n, k, pad, dtype, rng);
        auto x = Random(tokens * k, rng);
        auto bias = Random(n, rng);
        std::vector<float> got(tokens * n, -1.f), want(tokens * n);
        const std::string what = std::string(DTypeName(dtype)) + " T=" + std::to_string(tokens) +
                                 " N=" + std::to_string(n) + " K=" + std::to_string(k);
        ASSERT_TRUE((*cuda)->MatMul(x.data(), tokens, w.view, got.data(), bias.data()).ok()) << what;
        ASSERT_TRUE(ref->MatMul(x.data(), tokens, w.view, want.data(), bias.data()).ok());
        ExpectClose(got, want, what);
        // Again: the weight's upload is reused, the result is the same bit for bit.
        std::vector<float> again(tokens * n);
        ASSERT_TRUE((*cuda)->MatMul(x.data(), tokens, w.view, again.data(), bias.data()).ok());
        EXPECT_EQ(again, got) << what;
      }
}

TEST(CudaBackendTest, GroupedExpertFfnMatchesTheReferenceWithEmptyGroups) {
  SKIP_WITHOUT_GPU();
  auto cuda = MakeCudaBackend(0);
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  auto ref = MakeReferenceBackend();
  std::mt19937 rng(5);
  const int64_t hidden = 256, inter = 384, groups = 5;
  std::vector<HostWeight> store;
  std::vector<ExpertWeights> experts(groups);
  for (int64_t g = 0; g < groups; ++g) {
    store.push_back(MakeWeight(inter, hidden, 0, DType::kBF16, rng));
    experts[g].w1 = store.back().view;
    store.push_back(MakeWeight(inter, hidden, 0, DType::kBF16, rng));
    experts[g].w3 = store.back().view;
    store.push_back(MakeWeight(hidden, inter, 0, DType::kBF16, rng));
    experts[g].w2 = store.back().view;
  }
  std::vector<const ExpertWeights*> ptrs(groups);
  for (int64_t g = 0; g < groups; ++g) ptrs[g] = &experts[g];
  // Rows 0-2 are before the first group (offsets[0] = 3); groups 1 and 3 are empty.
  const std::vector<int64_t> offsets = {3, 10, 10, 41, 41, 44};
  auto x = Random(44 * hidden, rng);
  std::vector<float> got(44 * hidden, -5.f), want(44 * hidden, -5.f);
  ASSERT_TRUE((*cuda)->GroupedExpertFfn(x.data(), offsets.data(), groups, ptrs.data(), hidden, got.data()).ok());
  ASSERT_TRUE(ref->GroupedExpertFfn(x.data(), offsets.data(), groups, ptrs.data(), hidden, want.data()).ok());
  for (int64_t i = 0; i < 3 * hidden; ++i) ASSERT_EQ(got[i], -5.f) << "row before the groups written";
  ExpectClose(std::vector<float>(got.begin() + 3 * hidden, got.end()),
              std::vector<float>(want.begin() + 3 * hidden, want.end()), "grouped FFN");
}

TEST(CudaBackendTest, ADeviceIndexPastTheHostsDevicesIsAnInvalidArgument) {
  SKIP_WITHOUT_GPU();
  int n = 0;
  ASSERT_EQ(cudaGetDeviceCount(&n), cudaSuccess);
  EXPECT_EQ(MakeCudaBackend(n).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sy::kernels::cuda
