// Rank control (scheduler/rank_control.h): the control plans' wire form, trace merging, and
// and a model whose experts are added and dropped live (the end-to-end switch on 4 ranks is
// tests/server/admin_service_test.cc).
#include "scheduler/rank_control.h"

#include <thread>

#include "gtest/gtest.h"
#include "model/kv_cache.h"
#include "parallel/local_communicator.h"
#include "scheduler/distributed_executor.h"
#include "tests/testing/model_fixtures.h"

namespace sy::scheduler {
namespace {

TEST(RankControlTest, PackedBytesComeBackUnchangedForEveryLengthModuloFour) {
  for (std::string s : {std::string(""), std::string("a"), std::string("ab"), std::string("abc"),
                        std::string("abcd"), std::string("{\"x\": [1, 2]}\n\0z", 16)}) {
    auto back = UnpackBytes(PackBytes(s));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, s);
  }
  std::vector<int32_t> bad = PackBytes("abcdef");
  bad[0] = 99;
  EXPECT_EQ(UnpackBytes(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RankControlTest, ControlPlansCarryTheirPayloadAndRefuseSequences) {
  std::vector<int32_t> words;
  const std::vector<int32_t> payload = PackBytes("hello");
  EncodeControlPlan(PlanKind::kPlacement, payload, &words);
  auto plan = DecodePlan(words);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kind, PlanKind::kPlacement);
  EXPECT_TRUE(plan->seqs.empty());
  EXPECT_EQ(std::vector<int32_t>(plan->payload.begin(), plan->payload.end()), payload);
  words[2] = 1;  // num_seqs
  EXPECT_EQ(DecodePlan(words).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RankControlTest, PlacementPayloadsCarryPhaseLayersAndThePlacement) {
  const parallel::ExpertPlacement p = parallel::ExpertPlacement::Contiguous(3, 8, 4).WithEpoch(5);
  auto back = DecodePlacementPayload(EncodePlacementPayload(PlacementPhase::kPrepare, 1, 3, p.ToJson()));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->phase, PlacementPhase::kPrepare);
  EXPECT_EQ(back->first_layer, 1);
  EXPECT_EQ(back->end_layer, 3);
  EXPECT_TRUE(*back->placement == p);
  EXPECT_FALSE(DecodePlacementPayload(EncodePlacementPayload(PlacementPhase::kSwitch, 2, 4, p.ToJson())).ok());
  EXPECT_FALSE(DecodePlacementPayload(EncodePlacementPayload(PlacementPhase::kSwitch, 0, 3, "{")).ok());
}

TEST(RankControlTest, MergedTracesAddCountsAndTokensAndKeepTheLastPaths) {
  parallel::planner::RoutingTrace a, b;
  for (auto* t : {&a, &b}) {
    t->num_layers = 1;
    t->num_experts = 3;
    t->top_k = 1;
  }
  a.expert_counts = {{1, 2, 3}};
  a.num_tokens = 6;
  a.token_paths = {{{0}}, {{1}}};
  b.expert_counts = {{10, 0, 5}};
  b.num_tokens = 15;
  b.token_paths = {{{2}}};
  auto m = MergeTraces({a, b}, 2);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->expert_counts, (std::vector<std::vector<double>>{{11, 2, 8}}));
  EXPECT_EQ(m->num_tokens, 21);
  EXPECT_EQ(m->token_paths, (std::vector<std::vector<std::vector<int32_t>>>{{{1}}, {{2}}}));
  b.num_experts = 4;
  EXPECT_EQ(MergeTraces({a, b}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RankControlTest, AddedExpertsGiveTheLogitsOfTheWholeModelAndRetainDropsTheRest) {
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
  auto full = model::MoeModel::Load(dir);
  ASSERT_TRUE(full.ok());
  const auto& c = (*full)->config();
  model::LoadOptions lo;
  lo.experts_per_layer.assign(c.num_layers, {0});
  auto part = model::MoeModel::Load(dir, lo);
  ASSERT_TRUE(part.ok());
  std::vector<std::vector<int32_t>> all(c.num_layers);
  for (auto& l : all)
    for (int32_t e = 0; e < c.num_experts; ++e) l.push_back(e);
  auto added = (*part)->AddExperts(all);
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_GT(*added, 0);
  EXPECT_EQ(*(*part)->AddExperts(all), 0);  // already there
  EXPECT_EQ((*part)->LoadedExperts(0), all[0]);
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 5};
  EXPECT_EQ(sy::testing::PrefillLogits(**part, prompt), sy::testing::PrefillLogits(**full, prompt));
  std::vector<std::vector<int32_t>> keep(c.num_layers, {1});
  auto dropped = (*part)->RetainExperts(keep);
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, *added);  // E - 1 experts of one size each way
  EXPECT_EQ((*part)->LoadedExperts(0), std::vector<int32_t>{1});
  std::vector<std::vector<int32_t>> bad(c.num_layers, {static_cast<int32_t>(c.num_experts)});
  EXPECT_EQ((*part)->AddExperts(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sy::scheduler
