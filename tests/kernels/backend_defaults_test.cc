// The Backend methods every CPU backend inherits: RoPE, the KV cache write by slot, and the
// gated add, against the formulas written out (a device backend overrides them).
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"

namespace sy::kernels {
namespace {

TEST(BackendDefaultsTest, RopeRotatesEachPairByPositionTimesItsFrequency) {
  auto b = MakeReferenceBackend();
  const int64_t hd = 4, nh = 2, nkv = 1;
  const double theta = 10000.0;
  std::vector<float> q(2 * nh * hd), k(2 * nkv * hd);
  for (size_t i = 0; i < q.size(); ++i) q[i] = 0.1f * static_cast<float>(i + 1);
  for (size_t i = 0; i < k.size(); ++i) k[i] = -0.2f * static_cast<float>(i + 1);
  const std::vector<float> q0 = q, k0 = k;
  const int32_t positions[2] = {0, 7};
  EXPECT_TRUE(b->ApplyRope(q.data(), k.data(), 2, nh, nkv, hd, positions, theta).ok());
  auto expect_rotated = [&](const std::vector<float>& before, const std::vector<float>& after,
                            int64_t heads) {
    for (int t = 0; t < 2; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < hd / 2; ++i) {
          const double a = positions[t] * std::pow(theta, -2.0 * i / hd);
          const int64_t base = (t * heads + h) * hd;
          const double x1 = before[base + i], x2 = before[base + i + hd / 2];
          EXPECT_NEAR(after[base + i], x1 * std::cos(a) - x2 * std::sin(a), 1e-6);
          EXPECT_NEAR(after[base + i + hd / 2], x2 * std::cos(a) + x1 * std::sin(a), 1e-6);
        }
  };
  expect_rotated(q0, q, nh);
  expect_rotated(k0, k, nkv);
  for (int64_t i = 0; i < nh * hd; ++i) EXPECT_EQ(q[i], q0[i]);  // position 0: unchanged
}

TEST(BackendDefaultsTest, WriteKvPutsEachTokenInItsSlot) {
  auto b = MakeReferenceBackend();
  const int64_t block_size = 4, nkv = 2, hd = 3, row = nkv * hd;
  std::vector<float> kc(3 * block_size * row, 0.f), vc(kc.size(), 0.f);
  PagedKv kv{kc.data(), vc.data(), block_size, nkv, hd};
  std::vector<float> k(2 * row), v(2 * row);
  for (int64_t i = 0; i < 2 * row; ++i) {
    k[i] = static_cast<float>(i + 1);
    v[i] = -static_cast<float>(i + 1);
  }
  const int64_t slots[2] = {2 * block_size + 1, 5};  // block 2 row 1, block 1 row 1
  EXPECT_TRUE(b->WriteKv(k.data(), v.data(), 2, slots, kv).ok());
  for (int t = 0; t < 2; ++t)
    for (int64_t j = 0; j < row; ++j) {
      EXPECT_EQ(kc[slots[t] * row + j], k[t * row + j]);
      EXPECT_EQ(vc[slots[t] * row + j], v[t * row + j]);
    }
  float written = 0;
  for (float f : kc) written += f != 0.f;
  EXPECT_EQ(written, 2 * row);  // nothing else touched
}

TEST(BackendDefaultsTest, AddGatedAddsTheSigmoidOfTheGateTimesTheRow) {
  auto b = MakeReferenceBackend();
  const std::vector<float> x = {1.f, 2.f, 3.f, 4.f}, gate = {0.f, -2.f};
  std::vector<float> y = {10.f, 10.f, 10.f, 10.f};
  EXPECT_TRUE(b->AddGated(x.data(), gate.data(), 2, 2, y.data()).ok());
  const float g1 = 1.f / (1.f + std::exp(2.f));
  EXPECT_FLOAT_EQ(y[0], 10.5f);
  EXPECT_FLOAT_EQ(y[1], 11.f);
  EXPECT_FLOAT_EQ(y[2], 10.f + g1 * 3.f);
  EXPECT_FLOAT_EQ(y[3], 10.f + g1 * 4.f);
}

}  // namespace
}  // namespace sy::kernels
