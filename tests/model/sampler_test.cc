// Sampler: greedy ties, and the distributions that temperature, top-k and top-p give (counted
// over many draws with fixed seeds, against the probabilities computed here in double), and
// what the seed does.
#include "model/sampler.h"

#include <cmath>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace sy::model {
namespace {

// Frequencies of each token over `n` draws of one sampler.
std::vector<double> Frequencies(const SamplingParams& p, const std::vector<float>& logits, int n) {
  Sampler s(p);
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < n; ++i) {
    const int32_t t = s.Sample(logits.data(), static_cast<int64_t>(logits.size()));
    EXPECT_GE(t, 0);
    EXPECT_LT(t, static_cast<int32_t>(logits.size()));
    f[t] += 1.0 / n;
  }
  return f;
}

// softmax(logits / t) over the kept ids (others 0), renormalised.
std::vector<double> Expected(const std::vector<float>& logits, double t, const std::vector<bool>& keep) {
  std::vector<double> p(logits.size(), 0.0);
  double z = 0;
  for (size_t i = 0; i < logits.size(); ++i)
    if (keep[i]) z += p[i] = std::exp(logits[i] / t);
  for (double& x : p) x /= z;
  return p;
}

constexpr int kDraws = 20000;
constexpr double kTol = 0.02;  // about 6 standard deviations of a frequency near 0.5

// Probabilities 1/7, 2/7, 4/7 at temperature 1, and a token far below.
const std::vector<float> kLogits = {0.f, std::log(2.f), std::log(4.f), -30.f};

TEST(SamplerTest, GreedyTakesTheArgmaxAndTheLowestIdOnTies) {
  const std::vector<float> l = {1.f, 3.f, 3.f, -1.f};
  EXPECT_EQ(Greedy(l.data(), 4), 1);
  Sampler s({});  // temperature 0
  for (int i = 0; i < 10; ++i) EXPECT_EQ(s.Sample(l.data(), 4), 1);
}

TEST(SamplerTest, TemperatureGivesTheSoftmaxOfTheScaledLogits) {
  for (double t : {1.0, 2.0, 0.5}) {
    SamplingParams p;
    p.temperature = static_cast<float>(t);
    p.seed = 11;
    const auto f = Frequencies(p, kLogits, kDraws);
    const auto e = Expected(kLogits, t, {true, true, true, true});
    for (size_t i = 0; i < kLogits.size(); ++i) EXPECT_NEAR(f[i], e[i], kTol) << "t=" << t << " id " << i;
  }
}

TEST(SamplerTest, TopKKeepsOnlyTheKBestRenormalised) {
  SamplingParams p;
  p.temperature = 1.f;
  p.top_k = 2;
  p.seed = 5;
  const auto f = Frequencies(p, kLogits, kDraws);
  const auto e = Expected(kLogits, 1.0, {false, true, true, false});
  for (size_t i = 0; i < kLogits.size(); ++i) EXPECT_NEAR(f[i], e[i], kTol) << i;
  EXPECT_EQ(f[0], 0.0);
}

TEST(SamplerTest, TopPKeepsTheSmallestSetReachingP) {
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 3;
  p.top_p = 0.5f;  // 4/7 alone reaches it
  auto f = Frequencies(p, kLogits, 2000);
  EXPECT_EQ(f[0] + f[1] + f[3], 0.0);  // only id 2
  p.top_p = 0.8f;  // 4/7 + 2/7 = 0.857
  f = Frequencies(p, kLogits, kDraws);
  const auto e = Expected(kLogits, 1.0, {false, true, true, false});
  for (size_t i = 0; i < kLogits.size(); ++i) EXPECT_NEAR(f[i], e[i], kTol) << i;
  p.top_p = 1.f;  // everything
  f = Frequencies(p, kLogits, kDraws);
  EXPECT_GT(f[0], 0.1);
}

TEST(SamplerTest, TheSameSeedGivesTheSameTokensAndAnotherSeedOthers) {
  std::vector<float> flat(1000, 0.f);  // every token equally likely
  auto draw = [&](uint64_t seed) {
    SamplingParams p;
    p.temperature = 1.f;
    p.seed = seed;
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.Sample(flat.data(), 1000));
    return out;
  };
  EXPECT_EQ(draw(42), draw(42));
  EXPECT_NE(draw(42), draw(43));
  // The draws cover the vocabulary (not one token over and over).
  const auto d = draw(7);
  EXPECT_GT(std::set<int32_t>(d.begin(), d.end()).size(), 50u);
}

}  // namespace
}  // namespace sy::model
