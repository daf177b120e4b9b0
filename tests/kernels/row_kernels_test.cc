// The dispatcher's row kernels (kernels/cpu/row_kernels.h) at every CPU level this machine
// has, against plain references: kernels/core/dtype.h's F32ToBf16 / Bf16ToF32 and a double
// accumulation for the fused weighted sums. Row lengths 1–70 cover the masked tails.
#include "kernels/cpu/row_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/core/dtype.h"
#include "kernels/cpu/cpu_kernels.h"

namespace sy::kernels::cpu {
namespace {

std::vector<int> Levels() {
  std::vector<int> out;
  for (int l = 0; l <= static_cast<int>(DetectCpuLevel()); ++l) out.push_back(l);
  return out;
}

class DispatchRowsTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { OverrideRowKernelsLevel(GetParam()); }
  void TearDown() override { OverrideRowKernelsLevel(-1); }
};

// Normal values, ties of the rounding, NaN, ±inf, the largest finite float (rounds to inf),
// zeros. Denormals are left out: vcvtneps2bf16 flushes them to zero by design.
std::vector<float> Values(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::max(),
                            0.f,
                            -0.f,
                            1.00390625f,   // 1 + 2^-8: a tie, rounds down to even
                            1.01171875f};  // 1 + 3·2^-8: a tie, rounds up to even
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = i % 5 == 3 ? specials[(i / 5) % 8] : u(rng);
  return v;
}

TEST_P(DispatchRowsTest, RowToBf16RoundsToNearestEvenLikeTheScalarReference) {
  for (int64_t n = 1; n <= 70; ++n) {
    const std::vector<float> src = Values(n, static_cast<uint32_t>(n));
    std::vector<uint16_t> got(n + 1, 0xabcd);
    RowToBf16(src.data(), n, got.data());
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t want = F32ToBf16(src[i]);
      if (std::isnan(src[i])) {
        EXPECT_TRUE(std::isnan(Bf16ToF32(got[i]))) << "n=" << n << " i=" << i;
      } else {
        EXPECT_EQ(got[i], want) << "n=" << n << " i=" << i << " x=" << src[i];
      }
    }
    EXPECT_EQ(got[n], 0xabcd) << "wrote past the row, n=" << n;
  }
}

TEST_P(DispatchRowsTest, RowFromBf16IsExact) {
  for (int64_t n = 1; n <= 70; ++n) {
    std::vector<uint16_t> src(n);
    for (int64_t i = 0; i < n; ++i) src[i] = static_cast<uint16_t>(0x3f80 + i * 37);
    std::vector<float> got(n + 1, -7.f);
    RowFromBf16(src.data(), n, got.data());
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(got[i], Bf16ToF32(src[i])) << i;
    EXPECT_EQ(got[n], -7.f);
  }
}

TEST_P(DispatchRowsTest, RowCopyF32CopiesEveryBitAndNothingMore) {
  for (int64_t n = 1; n <= 70; ++n) {
    const std::vector<float> src = Values(n, static_cast<uint32_t>(100 + n));
    std::vector<float> got(n + 1, -7.f);
    RowCopyF32(src.data(), n, got.data());
    EXPECT_EQ(std::memcmp(got.data(), src.data(), n * sizeof(float)), 0) << "n=" << n;
    EXPECT_EQ(got[n], -7.f);
  }
}

TEST_P(DispatchRowsTest, SumRowsMatchesADoubleReferenceForEveryInputMix) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (int64_t n : {1, 15, 16, 17, 100, 1024}) {
    for (int num_y = 0; num_y <= 3; ++num_y) {
      for (int num_parts = 0; num_parts <= 2; ++num_parts) {
        for (bool parts_bf16 : {false, true}) {
          for (bool out_bf16 : {false, true}) {
            std::vector<std::vector<float>> y(num_y, std::vector<float>(n));
            std::vector<float> w(num_y);
            std::vector<std::vector<float>> pf(num_parts, std::vector<float>(n));
            std::vector<std::vector<uint16_t>> pb(num_parts, std::vector<uint16_t>(n));
            std::vector<const float*> yp;
            std::vector<const void*> pp;
            for (int i = 0; i < num_y; ++i) {
              for (auto& v : y[i]) v = u(rng);
              w[i] = u(rng);
              yp.push_back(y[i].data());
            }
            for (int j = 0; j < num_parts; ++j) {
              for (int64_t c = 0; c < n; ++c) {
                pf[j][c] = u(rng);
                pb[j][c] = F32ToBf16(pf[j][c]);
              }
              pp.push_back(parts_bf16 ? static_cast<const void*>(pb[j].data()) : pf[j].data());
            }
            RowSum sum{yp.data(), w.data(), num_y, pp.data(), num_parts, parts_bf16};
            std::vector<float> out_f(n + 1, -9.f);
            std::vector<uint16_t> out_b(n + 1, 0xabcd);
            SumRows(sum, n, out_bf16 ? nullptr : out_f.data(), out_bf16 ? out_b.data() : nullptr);
            for (int64_t c = 0; c < n; ++c) {
              double want = 0;
              for (int i = 0; i < num_y; ++i) want += static_cast<double>(w[i]) * y[i][c];
              for (int j = 0; j < num_parts; ++j)
                want += parts_bf16 ? Bf16ToF32(pb[j][c]) : pf[j][c];
              const double got = out_bf16 ? Bf16ToF32(out_b[c]) : out_f[c];
              const double tol = out_bf16 ? 1e-2 * (1 + std::abs(want)) : 1e-5;
              ASSERT_NEAR(got, want, tol) << "n=" << n << " num_y=" << num_y
                                          << " num_parts=" << num_parts << " c=" << c;
            }
            EXPECT_EQ(out_f[n], -9.f);
            EXPECT_EQ(out_b[n], 0xabcd);
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(CpuLevels, DispatchRowsTest, ::testing::ValuesIn(Levels()),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::string(CpuLevelName(
                               static_cast<CpuLevel>(info.param)));
                         });

}  // namespace
}  // namespace sy::kernels::cpu
