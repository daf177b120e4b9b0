// dtype conversions: bf16 / f16 round trips, round-to-nearest-even, special values, parsing.
#include "kernels/core/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace sy {
namespace {

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DTypeTest, Bf16RoundTripIsExactForBf16Values) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Bf16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToBf16(f), h) << h;
  }
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is halfway between 1.0 (0x3f80, even) and 1 + 2^-7 (0x3f81): ties go to even.
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808000)), 0x3f80);
  // 1 + 3*2^-8 is halfway between 0x3f81 (odd) and 0x3f82 (even).
  EXPECT_EQ(F32ToBf16(FromBits(0x3f818000)), 0x3f82);
  // Just above halfway rounds up; just below rounds down.
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808001)), 0x3f81);
  EXPECT_EQ(F32ToBf16(FromBits(0x3f807fff)), 0x3f80);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
  EXPECT_EQ(Bf16ToF32(F32ToBf16(INFINITY)), INFINITY);
  // The largest finite float rounds to infinity in bf16 (it is past bf16's max + half ulp).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(std::numeric_limits<float>::max())), INFINITY);
}

TEST(DTypeTest, Bf16RelativeErrorIsAtMostHalfAnUlp) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> d(-1e4f, 1e4f);
  for (int i = 0; i < 100000; ++i) {
    const float f = d(rng);
    if (f == 0) continue;
    EXPECT_LE(std::fabs(Bf16ToF32(F32ToBf16(f)) - f) / std::fabs(f), 1.0 / 256 + 1e-9);
  }
}

TEST(DTypeTest, F16RoundTripIsExactForEveryFiniteF16) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToF16(f), h) << h;
  }
}

TEST(DTypeTest, F16RoundsToNearestEvenAndSaturatesToInfinity) {
  // 1 + 2^-11 is halfway between 1.0 (0x3c00) and 1 + 2^-10 (0x3c01): to even.
  EXPECT_EQ(F32ToF16(1.f + std::ldexp(1.f, -11)), 0x3c00);
  EXPECT_EQ(F32ToF16(1.f + 3 * std::ldexp(1.f, -11)), 0x3c02);
  EXPECT_EQ(F32ToF16(65504.f), 0x7bff);
  EXPECT_EQ(F32ToF16(70000.f), 0x7c00);
  EXPECT_EQ(F32ToF16(-70000.f), 0xfc00);
  EXPECT_EQ(F32ToF16(std::ldexp(1.f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(F32ToF16(std::ldexp(1.f, -26)), 0x0000);  // below half of it: zero
  EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16(NAN))));
}

TEST(DTypeTest, ConvertToF32MatchesScalarConversions) {
  const uint16_t h[3] = {0x3f80, 0xc000, 0x0000};
  float out[3];
  ConvertToF32(DType::kBF16, h, 3, out);
  EXPECT_EQ(out[0], 1.f);
  EXPECT_EQ(out[1], -2.f);
  EXPECT_EQ(out[2], 0.f);
  const uint16_t f16[2] = {0x3c00, 0xbc00};
  ConvertToF32(DType::kF16, f16, 2, out);
  EXPECT_EQ(out[0], 1.f);
  EXPECT_EQ(out[1], -1.f);
}

TEST(DTypeTest, ParsesSafetensorsAndShortNamesAndRejectsOthers) {
  EXPECT_EQ(*ParseDType("BF16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("float16"), DType::kF16);
  EXPECT_EQ(*ParseDType("f32"), DType::kF32);
  EXPECT_EQ(ParseDType("I8").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_STREQ(DTypeName(DType::kBF16), "BF16");
}

}  // namespace
}  // namespace sy
