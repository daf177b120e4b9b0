#include "parallel/planner/scoring.h"

#include "parallel/planner/planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <random>
#include <set>

namespace sy::parallel::planner {
namespace {

LayerStats Stats(std::vector<std::vector<int32_t>> paths, int E) {
  LayerStats s;
  s.loads.assign(E, 0);
  for (const auto& p : paths) {
    for (int32_t e : p) s.loads[e] += 1.0 / paths.size();
  }
  s.num_tokens = paths.size();
  s.paths = std::move(paths);
  return s;
}

// A random placement: every expert once, then (with `replicas`) random replicas on distinct
// ranks in all but one of the other slots; random uneven shares.
void RandomPlacement(std::mt19937& rng, int R, int S, int E, bool replicas,
                     std::vector<int32_t>* map, std::vector<float>* share) {
  map->assign(R * S, -1);
  std::vector<int> order(R * S);
  for (int i = 0; i < R * S; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (int e = 0; e < E; ++e) (*map)[order[e]] = e;
  for (int i = E; replicas && i < R * S - 1; ++i) {
    const int e = rng() % E, s = order[i];
    bool on_rank = false;
    for (int t = (s / S) * S; t < (s / S + 1) * S; ++t) on_rank |= (*map)[t] == e;
    if (!on_rank) (*map)[s] = e;
  }
  share->assign(R * S, 0);
  std::vector<double> sum(E, 0);
  std::uniform_real_distribution<float> u(0.1f, 1.0f);
  for (int s = 0; s < R * S; ++s) {
    if ((*map)[s] >= 0) sum[(*map)[s]] += ((*share)[s] = u(rng));
  }
  for (int s = 0; s < R * S; ++s) {
    if ((*map)[s] >= 0) (*share)[s] /= sum[(*map)[s]];
  }
}

TEST(ScoringTest, TwoExpertsOnTwoRanksSendOneCopyWhateverTheHome) {
  auto p = ExpertPlacement::Create(2, 1, 2, {{0, 1}});
  ASSERT_TRUE(p.ok());
  const LayerScore s = ScoreLayer(*p, 0, Stats({{0, 1}}, 2));
  EXPECT_DOUBLE_EQ(s.traffic_per_token, 1.0);
  EXPECT_DOUBLE_EQ(s.max_load, 1.0);
  EXPECT_DOUBLE_EQ(s.mean_load, 1.0);
}

TEST(ScoringTest, CoLocatedExpertsTravelOnceAndOnlyFromOtherHomes) {
  // Both experts on rank 0: home 0 sends nothing, home 1 one copy (not two).
  auto p = ExpertPlacement::Create(2, 2, 2, {{0, 1, -1, -1}});
  ASSERT_TRUE(p.ok());
  const LayerScore s = ScoreLayer(*p, 0, Stats({{0, 1}}, 2));
  EXPECT_DOUBLE_EQ(s.traffic_per_token, 0.5);
  EXPECT_DOUBLE_EQ(s.max_load, 2.0);
  EXPECT_DOUBLE_EQ(s.mean_load, 1.0);
}

TEST(ScoringTest, ALocalReplicaServesTheTokenAtHome) {
  // Expert 0 on both ranks, expert 1 on rank 1: home 0 needs rank 1, home 1 needs nothing.
  auto p = ExpertPlacement::Create(2, 2, 2, {{0, -1, 0, 1}});
  ASSERT_TRUE(p.ok());
  EXPECT_DOUBLE_EQ(ScoreLayer(*p, 0, Stats({{0, 1}}, 2)).traffic_per_token, 0.5);
}

// Plain reference: enumerate every home rank and every replica choice of every remote
// expert (drawn by share), and average the number of distinct remote ranks.
double ReferenceTraffic(const ExpertPlacement& p, const std::vector<std::vector<int32_t>>& paths) {
  const int R = p.world_size();
  double total = 0;
  for (const auto& path : paths) {
    double token = 0;
    for (int h = 0; h < R; ++h) {
      std::function<void(size_t, double, std::set<int>)> rec = [&](size_t i, double prob,
                                                                   std::set<int> used) {
        if (i == path.size()) {
          token += prob * used.size() / R;
          return;
        }
        const auto& slots = p.replicas_of(0, path[i]);
        if (std::any_of(slots.begin(), slots.end(),
                        [&](int32_t s) { return p.rank_of_slot(s) == h; })) {
          rec(i + 1, prob, used);
          return;
        }
        for (int32_t s : slots) {
          auto u = used;
          u.insert(p.rank_of_slot(s));
          rec(i + 1, prob * p.share_of(0, s), u);
        }
      };
      rec(0, 1.0, {});
    }
    total += token;
  }
  return total / paths.size();
}

TEST(ScoringTest, TrafficMatchesEnumerationOverHomesAndReplicaChoices) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 20; ++trial) {
    const int R = 3 + trial % 2, S = 3, E = 7;
    std::vector<int32_t> map;
    std::vector<float> share;
    RandomPlacement(rng, R, S, E, /*replicas=*/true, &map, &share);
    auto p = ExpertPlacement::Create(R, S, E, {map}, {share});
    ASSERT_TRUE(p.ok()) << p.status();
    std::vector<std::vector<int32_t>> paths;
    for (int t = 0; t < 30; ++t) {
      std::vector<int32_t> all = {0, 1, 2, 3, 4, 5, 6};
      std::shuffle(all.begin(), all.end(), rng);
      paths.push_back({all[0], all[1], all[2]});
    }
    const LayerScore s = ScoreLayer(*p, 0, Stats(paths, E));
    EXPECT_NEAR(s.traffic_per_token, ReferenceTraffic(*p, paths), 1e-6) << "trial " << trial;
  }
}

// The ILP objective's traffic term (planner.h) against the scored traffic: equal for top-2
// routing with replicas and uneven shares (every pair credited), and with one replica per
// expert never under it for top-3.
TEST(ScoringTest, ObjectiveTrafficIsTheScoredTrafficForTopTwo) {
  std::mt19937 rng(10);
  for (int trial = 0; trial < 20; ++trial) {
    const int k = trial < 10 ? 2 : 3;
    const int R = 3 + trial % 2, S = 3, E = 7;
    std::vector<int32_t> map;
    std::vector<float> share;
    RandomPlacement(rng, R, S, E, /*replicas=*/k == 2, &map, &share);
    auto placement = ExpertPlacement::Create(R, S, E, {map}, {share});
    ASSERT_TRUE(placement.ok()) << placement.status();
    std::vector<std::vector<int32_t>> paths;
    for (int t = 0; t < 40; ++t) {
      std::vector<int32_t> all = {0, 1, 2, 3, 4, 5, 6};
      std::shuffle(all.begin(), all.end(), rng);
      paths.push_back(std::vector<int32_t>(all.begin(), all.begin() + k));
    }
    const LayerStats stats = Stats(paths, E);
    PlacementProblem problem;
    problem.world_size = R;
    problem.slots_per_rank = S;
    problem.num_experts = E;
    problem.top_k = k;
    problem.loads = stats.loads;
    problem.expert_bytes.assign(E, 1);
    std::vector<double> together(E * E, 0);
    for (const auto& path : paths) {
      for (int i = 0; i < k; ++i) {
        for (int j = i + 1; j < k; ++j) {
          together[std::min(path[i], path[j]) * E + std::max(path[i], path[j])] +=
              1.0 / paths.size();
        }
      }
    }
    for (int e = 0; e < E; ++e) {
      for (int f = e + 1; f < E; ++f) {
        if (together[e * E + f] > 0) problem.pairs.push_back({e, f, together[e * E + f]});
      }
    }
    PlannerOptions o;
    o.max_pairs = E * E;  // every pair credited
    const double objective_traffic = EvaluateObjective(problem, map, share, o).traffic;
    const double scored = ScoreLayer(*placement, 0, stats).traffic_per_token;
    if (k == 2) {
      EXPECT_NEAR(objective_traffic, scored, 1e-6) << "trial " << trial;
    } else {
      EXPECT_GE(objective_traffic, scored - 1e-9) << "trial " << trial;
    }
  }
}

TEST(ScoringTest, RankLoadUsesSlotShares) {
  // Expert 0 (load 0.75) split 1/3 on rank 0, 2/3 on rank 1; expert 1 (0.25) on rank 0.
  auto p = ExpertPlacement::Create(2, 2, 2, {{0, 1, 0, -1}}, {{1.0f / 3, 1.0f, 2.0f / 3, 0.0f}});
  ASSERT_TRUE(p.ok()) << p.status();
  LayerStats st;
  st.loads = {0.75, 0.25};
  const LayerScore s = ScoreLayer(*p, 0, st);
  EXPECT_NEAR(s.max_load, 0.5, 1e-6);
  EXPECT_NEAR(s.mean_load, 0.5, 1e-6);
  EXPECT_LT(s.traffic_per_token, 0);  // no paths, no traffic figure
}

TEST(ScoringTest, CountMovesIsZeroForTheSamePlacementAndCountsGainedExperts) {
  auto a = ExpertPlacement::Create(2, 2, 4, {{0, 1, 2, 3}, {0, 1, 2, 3}});
  auto b = ExpertPlacement::Create(2, 2, 4, {{1, 0, 2, 3}, {0, 3, 2, 1}});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(CountMoves(*a, *a, 10).experts, 0);
  EXPECT_EQ(CountMoves(*a, *b, 10).experts, 2);  // layer 0 reorders within ranks: free
  EXPECT_DOUBLE_EQ(CountMoves(*a, *b, 10).bytes, 20);
  // Scale-up: a new rank holds nothing, so everything it gets is moved.
  auto c = ExpertPlacement::Create(3, 2, 4, {{0, 1, 2, 3, 0, -1}, {0, 1, 2, 3, 3, -1}});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(CountMoves(*a, *c, 1).experts, 2);
}

}  // namespace
}  // namespace sy::parallel::planner
