// Membership (parallel/membership.h): the epoch view's wire form round-trips and rejects
// truncation; joins are refused with their documented codes and change nothing (a second join
// of one process, --max-ranks, a join while the group re-forms, no KV cache); drains of the
// leader, of an unknown or a non-serving rank are refused; after a broken epoch the survivors
// are the ranks that check in or still heartbeat, the others are fenced for good; a placed
// join is published to the joiner, a refused one ends its wait.
// PlanMembership (parallel/planner/membership_plan.h): staying ranks keep their experts,
// experts without a surviving replica find a home, a joiner gets a fair share, one rank holds
// all.
#include "parallel/membership.h"

#include <chrono>
#include <set>
#include <thread>

#include "gtest/gtest.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/membership_plan.h"

namespace sy::parallel {
namespace {

using std::chrono::milliseconds;

MembershipOptions Opts(int max_ranks = 0) {
  MembershipOptions o;
  o.max_ranks = max_ranks;
  o.heartbeat_timeout = milliseconds(200);
  o.leader_kv_blocks = 10;
  return o;
}

EpochView ViewOf(int64_t epoch, std::vector<int32_t> members) {
  EpochView v;
  v.epoch = epoch;
  v.members = std::move(members);
  v.store_prefix = "epoch-" + std::to_string(epoch);
  v.placement_json = "{\"x\": 1}";
  return v;
}

TEST(EpochViewTest, RoundTripsAndRejectsTruncatedWords) {
  EpochView v = ViewOf((int64_t{1} << 33) + 5, {0, 4, 9});
  const std::vector<int32_t> w = EncodeEpochView(v);
  auto back = DecodeEpochView(w);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->epoch, v.epoch);
  EXPECT_EQ(back->members, v.members);
  EXPECT_EQ(back->store_prefix, v.store_prefix);
  EXPECT_EQ(back->placement_json, v.placement_json);
  EXPECT_EQ(back->comm_rank_of(9), 2);
  EXPECT_EQ(back->comm_rank_of(5), -1);
  for (size_t n = 0; n < w.size(); ++n)
    EXPECT_FALSE(DecodeEpochView(std::span<const int32_t>(w.data(), n)).ok()) << n;
  std::vector<int32_t> not_leader = w;
  not_leader[3] = 4;  // comm rank 0 must be rank 0
  EXPECT_FALSE(DecodeEpochView(not_leader).ok());
}

TEST(MembershipTest, JoinsAreRefusedWithTheirCodesAndChangeNothing) {
  Membership m(Opts(/*max_ranks=*/3));
  auto a = m.AddJoining("h1", 77, 8);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, 1);
  EXPECT_EQ(m.AddJoining("h1", 77, 8).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m.AddJoining("h3", 79, 0).status().code(), absl::StatusCode::kInvalidArgument);
  auto b = m.AddJoining("h2", 78, 8);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(m.AddJoining("h4", 80, 8).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(m.PendingJoins().size(), 2u);
  // While the group re-forms, joins wait for the next epoch (ABORTED: retry).
  m.BreakEpoch(1);
  EXPECT_EQ(m.AddJoining("h5", 81, 8).status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(m.PendingJoins().size(), 2u);
  m.Commit(ViewOf(2, {0}));
  m.RefuseJoin({*b}, absl::UnavailableError("no"));
  EXPECT_EQ(m.AddJoining("h5", 81, 8).status().code(), absl::StatusCode::kOk);
}

TEST(MembershipTest, DrainsOfTheLeaderOrOfUnknownOrNonServingRanksAreRefused) {
  Membership m(Opts());
  auto a = m.AddJoining("h1", 1, 8);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(m.RequestDrain(0).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m.RequestDrain(42).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m.RequestDrain(*a).code(), absl::StatusCode::kFailedPrecondition);  // joining
  m.PublishJoin({*a}, ViewOf(2, {0, *a}));
  auto v = m.AwaitJoin(*a, milliseconds(10));
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->comm_rank_of(*a), 1);
  m.Commit(*v);
  EXPECT_TRUE(m.RequestDrain(*a).ok());
  EXPECT_TRUE(m.RequestDrain(*a).ok());  // again: no change
  EXPECT_EQ(m.Draining(), std::vector<int32_t>{*a});
  m.Commit(ViewOf(3, {0}));  // it left
  EXPECT_EQ(m.RequestDrain(*a).code(), absl::StatusCode::kFailedPrecondition);
  auto hb = m.Heartbeat(*a);
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->fenced);
}

TEST(MembershipTest, AfterABrokenEpochTheSilentRanksAreDeadAndFencedForGood) {
  Membership m(Opts());
  std::vector<int32_t> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(*m.AddJoining("h", 100 + i, 8));
  const EpochView e2 = ViewOf(2, {0, ids[0], ids[1], ids[2]});
  m.Commit(e2);
  m.BreakEpoch(2);
  auto hb = m.Heartbeat(ids[0]);
  ASSERT_TRUE(hb.ok());
  EXPECT_EQ(hb->broken_epoch, 2);
  EXPECT_FALSE(hb->fenced);
  // ids[0] checks in; ids[1] keeps heartbeating a little, then checks in; ids[2] is silent.
  std::thread a([&] { EXPECT_TRUE(m.AwaitRestart(ids[0], 2, milliseconds(5000)).ok()); });
  std::thread b([&] {
    for (int i = 0; i < 3; ++i) {
      m.Heartbeat(ids[1]).IgnoreError();
      std::this_thread::sleep_for(milliseconds(50));
    }
    EXPECT_TRUE(m.AwaitRestart(ids[1], 2, milliseconds(5000)).ok());
  });
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> survivors = m.WaitForSurvivors(e2, milliseconds(5000));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(3000));
  EXPECT_EQ(survivors, (std::vector<int32_t>{ids[0], ids[1]}));
  m.MarkDead({ids[2]});
  m.PublishRestart(ViewOf(3, {0, ids[0], ids[1]}));
  a.join();
  b.join();
  m.Commit(ViewOf(3, {0, ids[0], ids[1]}));
  // The dead rank comes back: fenced, and never placed again.
  EXPECT_EQ(m.AwaitRestart(ids[2], 2, milliseconds(100)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(m.Heartbeat(ids[2])->fenced);
  EXPECT_EQ(m.RequestDrain(ids[2]).code(), absl::StatusCode::kFailedPrecondition);
  const MembershipSnapshot snap = m.Snapshot();
  EXPECT_EQ(snap.epoch, 3);
  EXPECT_FALSE(snap.reforming);
  for (const RankInfo& r : snap.ranks)
    if (r.id == ids[2]) {
      EXPECT_EQ(r.state, RankState::kDead);
    }
}

TEST(MembershipTest, ARefusedJoinEndsTheJoinersWait) {
  Membership m(Opts());
  const int32_t id = *m.AddJoining("h", 5, 8);
  EXPECT_EQ(m.AwaitJoin(id, milliseconds(20)).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(m.PendingJoins().size(), 1u);  // a wait that times out does not drop the join
  std::thread t([&] { m.RefuseJoin({id}, absl::UnavailableError("no room")); });
  EXPECT_EQ(m.AwaitJoin(id, milliseconds(5000)).status().code(), absl::StatusCode::kUnavailable);
  t.join();
  EXPECT_TRUE(m.PendingJoins().empty());
}

// ---- PlanMembership ---------------------------------------------------------------------

int Moved(const ExpertPlacement& from, const std::vector<int>& old_rank_of_new,
          const ExpertPlacement& to) {
  int gained = 0;
  for (int j = 0; j < to.world_size(); ++j) {
    const auto mine = ExpertsOfRank(to, j);
    std::vector<std::vector<int32_t>> had(to.num_layers());
    if (old_rank_of_new[j] >= 0) had = ExpertsOfRank(from, old_rank_of_new[j]);
    for (int l = 0; l < to.num_layers(); ++l)
      for (int32_t e : mine[l]) gained += std::find(had[l].begin(), had[l].end(), e) == had[l].end();
  }
  return gained;
}

class PlanMembershipTest : public ::testing::TestWithParam<std::string> {};

TEST_P(PlanMembershipTest, AJoinerGetsAShareAndFewExpertsMove) {
  const ExpertPlacement cur = ExpertPlacement::Contiguous(3, 8, 2);  // 4 + 4
  planner::MembershipPlanOptions o;
  o.policy = GetParam();
  const std::vector<int> map = {0, 1, -1};
  auto next = planner::PlanMembership(cur, map, {}, o);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->world_size(), 3);
  EXPECT_EQ(next->slots_per_rank(), 3);
  for (int l = 0; l < 3; ++l) EXPECT_FALSE(ExpertsOfRank(*next, 2)[l].empty()) << "layer " << l;
  // The joiner needs at least 2 experts per layer for a fair share; nothing else should move.
  EXPECT_LE(Moved(cur, map, *next), 3 * 3);
}

TEST_P(PlanMembershipTest, ExpertsOfALostRankFindAHomeAndStayingRanksKeepTheirs) {
  const ExpertPlacement cur = ExpertPlacement::Contiguous(2, 8, 4);  // 2 per rank
  planner::MembershipPlanOptions o;
  o.policy = GetParam();
  const std::vector<int> map = {0, 1, 3};  // rank 2 died
  auto next = planner::PlanMembership(cur, map, {}, o);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->world_size(), 3);
  for (int l = 0; l < 2; ++l) {
    for (int e = 0; e < 8; ++e) EXPECT_FALSE(next->replicas_of(l, e).empty()) << l << "/" << e;
    // Staying ranks keep what they had.
    for (int j = 0; j < 3; ++j) {
      const auto had = ExpertsOfRank(cur, map[j])[l];
      const auto mine = ExpertsOfRank(*next, j)[l];
      for (int32_t e : had) {
        if (GetParam() == "repair") {
          EXPECT_NE(std::find(mine.begin(), mine.end(), e), mine.end());
        }
      }
    }
  }
  EXPECT_LE(Moved(cur, map, *next), GetParam() == "repair" ? 2 * 2 : 2 * 4);
}

INSTANTIATE_TEST_SUITE_P(Policies, PlanMembershipTest, ::testing::Values("repair", "ilp"));

TEST(PlanMembershipRepairTest, OneRankHoldsEveryExpertAndBusyExpertsAreKeptFirst) {
  const ExpertPlacement cur = ExpertPlacement::Contiguous(1, 4, 4);
  planner::MembershipPlanOptions o;
  o.policy = "repair";
  auto alone = planner::PlanMembership(cur, {0}, {}, o);
  ASSERT_TRUE(alone.ok());
  EXPECT_EQ(ExpertsOfRank(*alone, 0)[0], (std::vector<int32_t>{0, 1, 2, 3}));
  // Two replicas of expert 0 on a rank that must shrink to 1 slot: the replica goes first.
  std::vector<std::vector<int32_t>> p2l = {{0, 1, 0, 2, 3, 0}};
  auto rep = ExpertPlacement::Create(3, 2, 4, p2l);
  ASSERT_TRUE(rep.ok()) << rep.status();
  auto grown = planner::PlanMembership(*rep, {0, 1, 2, -1}, {{9, 1, 1, 1}}, o);
  ASSERT_TRUE(grown.ok()) << grown.status();
  for (int e = 0; e < 4; ++e) EXPECT_FALSE(grown->replicas_of(0, e).empty()) << e;
}

}  // namespace
}  // namespace sy::parallel
