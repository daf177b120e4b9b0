#include "parallel/expert_placement.h"

#include <gtest/gtest.h>

namespace sy::parallel {
namespace {

TEST(ExpertPlacementTest, BuildsTheInverseMapWithReplicasAscending) {
  // 2 ranks x 3 slots; expert 0 on both ranks, slot 5 empty.
  auto p = ExpertPlacement::Create(2, 3, 4, {{0, 1, 2, 3, 0, -1}});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_layers(), 1);
  EXPECT_EQ(p->num_slots(), 6);
  EXPECT_EQ(p->replicas_of(0, 0), (std::vector<int32_t>{0, 4}));
  EXPECT_EQ(p->replicas_of(0, 3), (std::vector<int32_t>{3}));
  EXPECT_EQ(p->rank_of_slot(4), 1);
  EXPECT_EQ(p->expert_of(0, 5), -1);
  EXPECT_FLOAT_EQ(p->share_of(0, 0), 0.5f);
  EXPECT_FLOAT_EQ(p->share_of(0, 1), 1.0f);
  EXPECT_FLOAT_EQ(p->share_of(0, 5), 0.0f);
  EXPECT_FALSE(p->has_shares(0));
}

TEST(ExpertPlacementTest, RejectsExpertWithoutReplica) {
  auto p = ExpertPlacement::Create(2, 2, 4, {{0, 1, 2, 2}});
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("expert 3 has no replica"), std::string::npos);
}

TEST(ExpertPlacementTest, RejectsOutOfRangeIdsAndWrongSlotCounts) {
  EXPECT_FALSE(ExpertPlacement::Create(2, 2, 4, {{0, 1, 2, 4}}).ok());
  EXPECT_FALSE(ExpertPlacement::Create(2, 2, 4, {{0, 1, 2, -2}}).ok());
  EXPECT_FALSE(ExpertPlacement::Create(2, 2, 4, {{0, 1, 2}}).ok());
  EXPECT_FALSE(ExpertPlacement::Create(1, 2, 4, {{0, 1}}).ok());  // too few slots
}

TEST(ExpertPlacementTest, RejectsSharesThatDoNotSumToOne) {
  auto bad = ExpertPlacement::Create(2, 2, 3, {{0, 1, 0, 2}}, {{0.5f, 1.0f, 0.6f, 1.0f}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  auto good = ExpertPlacement::Create(2, 2, 3, {{0, 1, 0, 2}}, {{0.25f, 1.0f, 0.75f, 1.0f}});
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_FLOAT_EQ(good->share_of(0, 2), 0.75f);
}

TEST(ExpertPlacementTest, ContiguousPutsExpertByIdOnRankEOverCeilEOverR) {
  ExpertPlacement p = ExpertPlacement::Contiguous(2, 10, 4);  // 3 slots per rank
  EXPECT_EQ(p.slots_per_rank(), 3);
  for (int e = 0; e < 10; ++e) {
    ASSERT_EQ(p.replicas_of(1, e).size(), 1u);
    EXPECT_EQ(p.rank_of_slot(p.replicas_of(1, e)[0]), e / 3);
  }
  EXPECT_EQ(p.expert_of(0, 11), -1);
}

TEST(ExpertPlacementTest, ContiguousWithSpareSlotsKeepsRanksAndLeavesTheExtraSlotsEmpty) {
  auto p = ExpertPlacement::Contiguous(1, 10, 4, 5);  // 3 needed per rank, 2 spare
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->slots_per_rank(), 5);
  for (int e = 0; e < 10; ++e) {
    ASSERT_EQ(p->replicas_of(0, e).size(), 1u);
    EXPECT_EQ(p->rank_of_slot(p->replicas_of(0, e)[0]), e / 3);
  }
  EXPECT_EQ(p->physical_to_logical(0),
            (std::vector<int32_t>{0, 1, 2, -1, -1, 3, 4, 5, -1, -1, 6, 7, 8, -1, -1, 9, -1, -1, -1, -1}));
  EXPECT_EQ(ExpertPlacement::Contiguous(1, 10, 4, 2).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ExpertPlacementTest, RoundTripsThroughJsonWithSharesAndEpoch) {
  auto p = ExpertPlacement::Create(2, 2, 3, {{0, 1, 0, 2}, {2, 1, 0, -1}},
                                   {{0.25f, 1.0f, 0.75f, 1.0f}, {}}, 7);
  ASSERT_TRUE(p.ok()) << p.status();
  auto q = ExpertPlacement::FromJson(p->ToJson());
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(*p == *q);
  EXPECT_EQ(q->epoch(), 7);
  EXPECT_TRUE(q->has_shares(0));
  EXPECT_FALSE(q->has_shares(1));
  EXPECT_FALSE(*p == p->WithEpoch(8));
}

TEST(ExpertPlacementTest, ReadsTheDocumentedJsonFormWithLayersOutOfOrder) {
  auto p = ExpertPlacement::FromJson(R"({"world_size": 2, "slots_per_rank": 1, "num_experts": 2,
      "layers": [{"layer": 1, "physical_to_logical": [1, 0]},
                 {"layer": 0, "physical_to_logical": [0, 1]}]})");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->expert_of(0, 0), 0);
  EXPECT_EQ(p->expert_of(1, 0), 1);
}

TEST(ExpertPlacementTest, ReadsFilesThatNameTheRankCountNumRanks) {
  auto p = ExpertPlacement::FromJson(R"({"num_ranks": 2, "slots_per_rank": 1, "num_experts": 2,
      "layers": [{"layer": 0, "physical_to_logical": [1, 0]}]})");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->world_size(), 2);
  EXPECT_EQ(p->expert_of(0, 0), 1);
}

TEST(ExpertPlacementTest, FromJsonNamesTheMissingField) {
  auto p = ExpertPlacement::FromJson(R"({"world_size": 2, "num_experts": 2, "layers": []})");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("slots_per_rank"), std::string::npos);
  EXPECT_FALSE(ExpertPlacement::FromJson("not json").ok());
  EXPECT_EQ(ExpertPlacement::FromFile("/nonexistent/placement.json").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sy::parallel
