// ExpertLoadRecorder: counts over a sliding window, token paths, the trace format round trip,
// and the model feeding it one Record per MoE layer per step.
#include "gtest/gtest.h"
#include "model/moe_model.h"
#include "parallel/expert_load.h"
#include "parallel/planner/trace.h"
#include "tests/testing/model_fixtures.h"

namespace sy::parallel {
namespace {

ExpertLoadOptions Opts(int window) {
  ExpertLoadOptions o;
  o.num_layers = 2;
  o.num_experts = 4;
  o.top_k = 2;
  o.window_steps = window;
  o.max_paths = 3;
  o.model = "test";
  return o;
}

TEST(ExpertLoadRecorderTest, CountsTokensPerExpertOverTheWindow) {
  ExpertLoadRecorder r(Opts(2));
  const int32_t s1l0[] = {0, 1, 0, 2}, s1l1[] = {3, 2, 3, 1};  // 2 tokens
  r.Record(0, s1l0, 2);
  r.Record(1, s1l1, 2);
  r.EndStep();
  auto t = r.Snapshot();
  EXPECT_EQ(t.num_tokens, 2);
  EXPECT_EQ(t.expert_counts[0], (std::vector<double>{2, 1, 1, 0}));
  EXPECT_EQ(t.expert_counts[1], (std::vector<double>{0, 1, 1, 2}));
  const int32_t s2[] = {1, 2};
  for (int step = 0; step < 2; ++step) {  // two more steps push step 1 out of the window
    r.Record(0, s2, 1);
    r.Record(1, s2, 1);
    r.EndStep();
  }
  t = r.Snapshot();
  EXPECT_EQ(t.num_tokens, 2);
  EXPECT_EQ(t.expert_counts[0], (std::vector<double>{0, 2, 2, 0}));
  // Paths: the last 3 tokens, all layers.
  ASSERT_EQ(t.token_paths.size(), 3u);
  EXPECT_EQ(t.token_paths[0][0], (std::vector<int32_t>{0, 2}));  // step 1, token 1, layer 0
  EXPECT_EQ(t.token_paths[2][1], (std::vector<int32_t>{1, 2}));
}

TEST(ExpertLoadRecorderTest, SnapshotRoundTripsThroughTheTraceFormat) {
  ExpertLoadRecorder r(Opts(8));
  const int32_t ids[] = {0, 3, 1, 3, 2, 3};
  r.Record(0, ids, 3);
  r.Record(1, ids, 3);
  r.EndStep();
  auto parsed = planner::ParseTrace(TraceToJson(r.Snapshot()));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->num_layers, 2);
  EXPECT_EQ(parsed->num_experts, 4);
  EXPECT_EQ(parsed->top_k, 2);
  EXPECT_EQ(parsed->expert_counts[1], (std::vector<double>{1, 1, 1, 3}));
  ASSERT_TRUE(parsed->has_paths());
  auto stats = planner::ComputeLayerStats(*parsed, 0);
  ASSERT_FALSE(stats.pairs.empty());  // expert 3 co-activates with 0, 1 and 2
  EXPECT_TRUE(stats.pairs[0].e == 3 || stats.pairs[0].f == 3);
}

TEST(ExpertLoadRecorderTest, ModelRecordsEveryMoeLayerOfEveryStep) {
  auto m = model::MoeModel::Load(sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32));
  ASSERT_TRUE(m.ok()) << m.status();
  const auto& c = (*m)->config();
  ExpertLoadOptions o;
  o.num_layers = static_cast<int>((*m)->MoeLayerIds().size());
  o.num_experts = static_cast<int>(c.num_experts);
  o.top_k = static_cast<int>(c.num_experts_per_tok);
  ExpertLoadRecorder r(o);
  (*m)->SetLoadRecorder(&r);
  sy::testing::GreedyGenerate(**m, {1, 2, 3, 4, 5}, 4);  // prefill of 5 + 3 decode steps
  (*m)->SetLoadRecorder(nullptr);
  auto t = r.Snapshot();
  EXPECT_EQ(r.steps_recorded(), 4);
  EXPECT_EQ(t.num_tokens, 8);
  for (int l = 0; l < o.num_layers; ++l) {
    double sum = 0;
    for (double v : t.expert_counts[l]) sum += v;
    EXPECT_EQ(sum, 8 * o.top_k) << "layer " << l;
  }
  EXPECT_EQ(t.token_paths.size(), 8u);
}

}  // namespace
}  // namespace sy::parallel
