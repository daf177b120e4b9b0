// Router semantics per architecture on hand-checked cases.
#include <cmath>

#include "gtest/gtest.h"
#include "model/router.h"

namespace sy::model {
namespace {

// logits [0, 1, 2, 3] for 4 experts: softmax = e^i / (1 + e + e^2 + e^3)
//   = [0.0320586, 0.0871443, 0.2368828, 0.6439143].
constexpr float kLogits[4] = {0.f, 1.f, 2.f, 3.f};

TEST(RouterTest, MixtralRenormalisesTopTwo) {
  // Mixtral: softmax over the top-2 logits {3, 2}: e / (1 + e) = 0.7310586, 1/(1+e) = 0.2689414.
  int32_t ids[2];
  float w[2];
  RouteTopK(kLogits, 1, 4, 2, /*renormalize=*/true, ids, w);
  EXPECT_EQ(ids[0], 3);
  EXPECT_EQ(ids[1], 2);
  EXPECT_NEAR(w[0], 0.7310586f, 1e-6);
  EXPECT_NEAR(w[1], 0.2689414f, 1e-6);
}

TEST(RouterTest, OlmoeKeepsSoftmaxProbabilitiesWithoutRenormalising) {
  // OLMoE (norm_topk_prob false): the full-softmax probabilities of the top-2.
  int32_t ids[2];
  float w[2];
  RouteTopK(kLogits, 1, 4, 2, /*renormalize=*/false, ids, w);
  EXPECT_EQ(ids[0], 3);
  EXPECT_EQ(ids[1], 2);
  EXPECT_NEAR(w[0], 0.6439143f, 1e-6);
  EXPECT_NEAR(w[1], 0.2368828f, 1e-6);
}

TEST(RouterTest, Qwen3NormTopkProbRenormalisesThreeOfFour) {
  // Qwen3 (norm_topk_prob true), top-3: p / (p3 + p2 + p1) with sum 0.9679414.
  int32_t ids[3];
  float w[3];
  RouteTopK(kLogits, 1, 4, 3, /*renormalize=*/true, ids, w);
  EXPECT_EQ(ids[2], 1);
  EXPECT_NEAR(w[0], 0.6439143f / 0.9679414f, 1e-6);
  EXPECT_NEAR(w[1], 0.2368828f / 0.9679414f, 1e-6);
  EXPECT_NEAR(w[2], 0.0871443f / 0.9679414f, 1e-6);
}

TEST(RouterTest, TiesPickTheLowerExpertId) {
  const float logits[4] = {1.f, 2.f, 2.f, 0.f};
  int32_t ids[2];
  float w[2];
  RouteTopK(logits, 1, 4, 2, true, ids, w);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 2);
  EXPECT_NEAR(w[0], 0.5f, 1e-7);
}

TEST(RouterTest, RoutesEachTokenIndependently) {
  const float logits[8] = {0.f, 1.f, 2.f, 3.f, 3.f, 2.f, 1.f, 0.f};
  int32_t ids[4];
  float w[4];
  RouteTopK(logits, 2, 4, 2, true, ids, w);
  EXPECT_EQ(ids[0], 3);
  EXPECT_EQ(ids[2], 0);
  EXPECT_EQ(ids[3], 1);
}

}  // namespace
}  // namespace sy::model
