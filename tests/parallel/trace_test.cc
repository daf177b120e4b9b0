#include "parallel/planner/trace.h"

#include <gtest/gtest.h>

#include <numeric>

#include "parallel/planner/placement_problem.h"

namespace sy::parallel::planner {
namespace {

const char* kTiny = R"({
  "model": "tiny", "num_layers": 2, "num_experts": 4, "top_k": 2,
  "expert_counts": [[3, 3, 1, 1], [2, 2, 2, 2]],
  "token_paths": [
    [[0, 1], [2, 3]],
    [[0, 1], []],
    [[2, 0], [0, 1]],
    [[1, 3], [2, 3]]
  ]})";

TEST(TraceTest, ParsesPathsAndSkipsUnknownCells) {
  auto t = ParseTrace(kTiny);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->num_layers, 2);
  EXPECT_EQ(t->top_k, 2);
  EXPECT_EQ(t->num_tokens, 4);
  EXPECT_TRUE(t->has_paths());
  const LayerStats l1 = ComputeLayerStats(*t, 1);
  EXPECT_EQ(l1.paths.size(), 3u);  // token 1 is unknown at layer 1
  EXPECT_DOUBLE_EQ(l1.num_tokens, 3);
  EXPECT_DOUBLE_EQ(l1.loads[2], 2.0 / 3);
  EXPECT_DOUBLE_EQ(l1.loads[0], 1.0 / 3);
}

TEST(TraceTest, CoActivationCountsPairsOfTheSameTokenSortedByWeight) {
  auto t = ParseTrace(kTiny);
  ASSERT_TRUE(t.ok());
  const LayerStats l0 = ComputeLayerStats(*t, 0);
  ASSERT_EQ(l0.pairs.size(), 3u);  // (0,1) twice, (0,2), (1,3)
  EXPECT_EQ(l0.pairs[0].e, 0);
  EXPECT_EQ(l0.pairs[0].f, 1);
  EXPECT_DOUBLE_EQ(l0.pairs[0].weight, 0.5);
  EXPECT_DOUBLE_EQ(l0.pairs[1].weight, 0.25);
  EXPECT_DOUBLE_EQ(std::accumulate(l0.loads.begin(), l0.loads.end(), 0.0), 2.0);
}

TEST(TraceTest, SplitPlansOnTheFirstHalfAndHoldsOutTheSecond) {
  auto t = ParseTrace(kTiny);
  ASSERT_TRUE(t.ok());
  auto halves = SplitTrace(*t);
  ASSERT_TRUE(halves.ok()) << halves.status();
  const auto& [plan, hold] = *halves;
  EXPECT_EQ(plan.token_paths.size(), 2u);
  EXPECT_EQ(hold.token_paths.size(), 2u);
  EXPECT_EQ(plan.expert_counts[0], (std::vector<double>{2, 2, 0, 0}));
  EXPECT_EQ(hold.expert_counts[0], (std::vector<double>{1, 1, 1, 1}));
  EXPECT_EQ(plan.expert_counts[1], (std::vector<double>{0, 0, 1, 1}));
}

TEST(TraceTest, WindowLoadsAreTheLoadsOfConsecutiveSlicesOfTheTokens) {
  auto t = ParseTrace(kTiny);
  ASSERT_TRUE(t.ok());
  // Layer 0, two windows: tokens {0,1} -> experts 0,1,0,1; tokens {2,3} -> 2,0,1,3.
  const auto w0 = WindowLoads(*t, 0, 2);
  ASSERT_EQ(w0.size(), 2u);
  EXPECT_EQ(w0[0], (std::vector<double>{1, 1, 0, 0}));
  EXPECT_EQ(w0[1], (std::vector<double>{0.5, 0.5, 0.5, 0.5}));
  // Layer 1, four windows: token 1 is unknown there, so its window is left out.
  const auto w1 = WindowLoads(*t, 1, 4);
  ASSERT_EQ(w1.size(), 3u);
  EXPECT_EQ(w1[1], (std::vector<double>{1, 1, 0, 0}));
  // BuildProblems carries them as load scenarios; a counts-only trace has none.
  auto problems = BuildProblems(*t, 2, 2, nullptr, 1.0, 2);
  ASSERT_TRUE(problems.ok()) << problems.status();
  EXPECT_EQ((*problems)[0].scenario_loads, w0);
  EXPECT_EQ((*problems)[0].num_scenarios(), 3);
  RoutingTrace counts = *t;
  counts.token_paths.clear();
  EXPECT_TRUE(WindowLoads(counts, 0, 4).empty());
}

TEST(TraceTest, CountsOnlyTraceGivesLoadsFromCountsAndNoPairs) {
  auto t = ParseTrace(R"({"num_layers": 1, "num_experts": 2, "top_k": 1, "num_tokens": 10,
                          "expert_counts": [[7, 3]]})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->has_paths());
  const LayerStats s = ComputeLayerStats(*t, 0);
  EXPECT_DOUBLE_EQ(s.loads[0], 0.7);
  EXPECT_TRUE(s.pairs.empty());
  EXPECT_EQ(SplitTrace(*t).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(TraceTest, RejectsMalformedTracesNamingTheField) {
  auto bad_id = ParseTrace(R"({"num_layers": 1, "num_experts": 2, "top_k": 1,
      "expert_counts": [[1, 1]], "token_paths": [[[5]]]})");
  EXPECT_EQ(bad_id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_id.status().message().find("token_paths[0][0]"), std::string::npos);
  auto short_row = ParseTrace(R"({"num_layers": 1, "num_experts": 3, "top_k": 1,
      "expert_counts": [[1, 1]]})");
  EXPECT_NE(short_row.status().message().find("expert_counts[0]"), std::string::npos);
  EXPECT_EQ(LoadTrace("/nonexistent.json").status().code(), absl::StatusCode::kNotFound);
}

TEST(TraceTest, LoadsEverySharedTraceWithCountsThatSumToTokensTimesTopK) {
  for (const char* name : {"esft_intent", "mixtral8x7b_humaneval_gsm8k", "olmoe_c4",
                           "mistral_book"}) {
    auto t = LoadTrace(std::string(SY_SHARED_DIR) + "/traces/" + name + ".json");
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->name, name);
    auto problems = BuildProblems(*t, 8, (t->num_experts + 7) / 8, nullptr, 1.0);
    ASSERT_TRUE(problems.ok()) << problems.status();
    for (const auto& p : *problems) {
      // Loads are assignments per token: they sum to top_k.
      EXPECT_NEAR(std::accumulate(p.loads.begin(), p.loads.end(), 0.0), t->top_k, 0.02 * t->top_k)
          << name << " layer " << p.layer;
    }
  }
}

}  // namespace
}  // namespace sy::parallel::planner
