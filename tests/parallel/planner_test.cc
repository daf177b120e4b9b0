// Planners (contiguous, round-robin, greedy, ilp) on small problems: invariants of every plan,
// the ILP against greedy and against brute force, migration, and layers in parallel.
#include "parallel/planner/planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

#include "parallel/planner/scoring.h"

namespace sy::parallel::planner {
namespace {

// A random layer: skewed loads (sum top_k), co-activation pairs with random weights.
PlacementProblem RandomProblem(std::mt19937& rng, int E, int R, int S, int k) {
  PlacementProblem p;
  p.num_experts = E;
  p.world_size = R;
  p.slots_per_rank = S;
  p.top_k = k;
  std::exponential_distribution<double> ex(1.0);
  double sum = 0;
  for (int e = 0; e < E; ++e) {
    p.loads.push_back(ex(rng) + 0.05);
    sum += p.loads.back();
  }
  for (double& l : p.loads) l *= k / sum;
  std::uniform_real_distribution<double> u(0, 0.3);
  for (int e = 0; e < E; ++e) {
    for (int f = e + 1; f < E; ++f) {
      if (u(rng) < 0.1) p.pairs.push_back({e, f, u(rng)});
    }
  }
  std::sort(p.pairs.begin(), p.pairs.end(),
            [](const CoActivation& a, const CoActivation& b) { return a.weight > b.weight; });
  p.expert_bytes.assign(E, 1e6);
  return p;
}

PlannerOptions QuickIlp() {
  PlannerOptions o;
  o.time_limit_seconds = 0.5;
  o.lambda = 0.05;
  return o;
}

class EveryPolicyTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryPolicyTest, PlacesEveryExpertWithinCapacityAndReplicasOnDistinctRanks) {
  std::mt19937 rng(3);
  for (auto [E, R, S] : std::vector<std::tuple<int, int, int>>{{8, 4, 2}, {8, 4, 3}, {6, 4, 2},
                                                               {4, 8, 1}, {12, 3, 5}}) {
    PlacementProblem p = RandomProblem(rng, E, R, S, 2);
    auto planner = CreatePlanner(GetParam(), QuickIlp());
    ASSERT_TRUE(planner.ok());
    auto plan = (*planner)->PlanLayer(p);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(static_cast<int>(plan->physical_to_logical.size()), R * S);
    // Valid as an ExpertPlacement: every expert has a replica, ids in range, shares sum to 1.
    auto placement = ExpertPlacement::Create(R, S, E, {plan->physical_to_logical},
                                             plan->slot_share.empty()
                                                 ? std::vector<std::vector<float>>{}
                                                 : std::vector<std::vector<float>>{plan->slot_share});
    ASSERT_TRUE(placement.ok()) << GetParam() << ": " << placement.status();
    // Replicas of one expert on distinct ranks where there are no more replicas than ranks.
    for (int e = 0; e < E; ++e) {
      std::set<int> ranks;
      for (int32_t s : placement->replicas_of(0, e)) ranks.insert(s / S);
      const size_t replicas = placement->replicas_of(0, e).size();
      EXPECT_EQ(ranks.size(), std::min<size_t>(replicas, R))
          << GetParam() << " E=" << E << " R=" << R << " S=" << S << " expert " << e;
    }
    EXPECT_LE(plan->best_bound, plan->objective + 1e-9);
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, EveryPolicyTest,
                         ::testing::Values("contiguous", "round-robin", "greedy", "ilp"));

TEST(PlannerTest, FactoryRejectsAnUnknownPolicy) {
  EXPECT_EQ(CreatePlanner("best", {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PlannerTest, GreedyUsesExtraSlotsForReplicasOfTheHottestExpert) {
  PlacementProblem p;
  p.num_experts = 4;
  p.world_size = 2;
  p.slots_per_rank = 3;
  p.top_k = 1;
  p.loads = {0.7, 0.1, 0.1, 0.1};
  p.expert_bytes.assign(4, 1);
  auto plan = MakeGreedyPlanner({})->PlanLayer(p);
  ASSERT_TRUE(plan.ok());
  // Replicas by highest load per replica: 0.7 -> 0.35 -> 0.233, both extra slots to expert 0.
  EXPECT_EQ(std::count(plan->physical_to_logical.begin(), plan->physical_to_logical.end(), 0),
            3);
  // Largest-first packing: rank A gets 0.233 + 0.233 + 0.1, rank B 0.233 + 0.1 + 0.1.
  EXPECT_NEAR(EvaluateObjective(p, plan->physical_to_logical, {}, {}).max_load,
              2 * 0.7 / 3 + 0.1, 1e-9);
}

TEST(PlannerTest, IlpIsNeverWorseThanGreedyAndItsBoundIsBelowItsObjective) {
  std::mt19937 rng(4);
  const PlannerOptions o = QuickIlp();
  for (int trial = 0; trial < 6; ++trial) {
    PlacementProblem p = RandomProblem(rng, 8, 4, 2 + trial % 2, 2);
    auto greedy = MakeGreedyPlanner(o)->PlanLayer(p);
    auto ilp = MakeIlpPlanner(o)->PlanLayer(p);
    ASSERT_TRUE(greedy.ok() && ilp.ok());
    const double ilp_obj =
        EvaluateObjective(p, ilp->physical_to_logical, ilp->slot_share, o).total;
    EXPECT_NEAR(ilp_obj, ilp->objective, 1e-9);
    EXPECT_LE(ilp->objective, greedy->objective + 1e-9) << "trial " << trial;
    EXPECT_LE(ilp->best_bound, ilp->objective + 1e-9);
    EXPECT_GE(ilp->gap, 0.0);
  }
}

// W windows of a layer: the mean loads of `p`, each expert scaled by a random factor per window.
void AddScenarios(std::mt19937& rng, PlacementProblem* p, int W) {
  std::uniform_real_distribution<double> u(0.5, 1.5);
  for (int w = 0; w < W; ++w) {
    std::vector<double> loads = p->loads;
    double sum = 0;
    for (double& l : loads) sum += (l *= u(rng));
    for (double& l : loads) l *= p->top_k / sum;
    p->scenario_loads.push_back(std::move(loads));
  }
}

TEST(PlannerTest, ObjectiveAveragesTheStragglerLoadOverTheScenarios) {
  PlacementProblem p;
  p.num_experts = 4;
  p.world_size = 2;
  p.slots_per_rank = 2;
  p.top_k = 1;
  p.loads = {0.25, 0.25, 0.25, 0.25};
  p.scenario_loads = {{0.4, 0.1, 0.3, 0.2}, {0.1, 0.1, 0.1, 0.7}};
  p.expert_bytes.assign(4, 1);
  PlannerOptions o;
  o.lambda = 0;
  // Ranks {0,1} and {2,3}: straggler 0.5 (mean), 0.5 (window 1), 0.8 (window 2).
  const ObjectiveTerms t = EvaluateObjective(p, {0, 1, 2, 3}, {}, o);
  ASSERT_EQ(t.scenario_max_load.size(), 3u);
  EXPECT_NEAR(t.scenario_max_load[0], 0.5, 1e-12);
  EXPECT_NEAR(t.scenario_max_load[1], 0.5, 1e-12);
  EXPECT_NEAR(t.scenario_max_load[2], 0.8, 1e-12);
  EXPECT_NEAR(t.max_load, (0.5 + 0.5 + 0.8) / 3, 1e-12);
  EXPECT_NEAR(t.total, t.max_load, 1e-12);
  // Ranks {0,3} and {1,2}: 0.5, 0.6, 0.8.
  EXPECT_NEAR(EvaluateObjective(p, {0, 3, 1, 2}, {}, o).max_load, (0.5 + 0.6 + 0.8) / 3, 1e-12);
}

TEST(PlannerTest, IlpStragglerLoadIsAtMostGreedysInEveryPlanningScenario) {
  std::mt19937 rng(11);
  const PlannerOptions o = QuickIlp();
  for (int trial = 0; trial < 6; ++trial) {
    PlacementProblem p = RandomProblem(rng, 8, 4, 2 + trial % 2, 2);
    AddScenarios(rng, &p, 3);
    auto greedy = MakeGreedyPlanner(o)->PlanLayer(p);
    auto ilp = MakeIlpPlanner(o)->PlanLayer(p);
    ASSERT_TRUE(greedy.ok() && ilp.ok()) << ilp.status();
    const ObjectiveTerms g = EvaluateObjective(p, greedy->physical_to_logical, {}, o);
    const ObjectiveTerms i =
        EvaluateObjective(p, ilp->physical_to_logical, ilp->slot_share, o);
    ASSERT_EQ(i.scenario_max_load.size(), 4u);
    for (int w = 0; w < 4; ++w) {
      EXPECT_LE(i.scenario_max_load[w], g.scenario_max_load[w] + 1e-9)
          << "trial " << trial << " scenario " << w;
    }
    EXPECT_NEAR(i.total, ilp->objective, 1e-9);
    EXPECT_LE(ilp->objective, greedy->objective + 1e-9);
    EXPECT_LE(ilp->best_bound, ilp->objective + 1e-9);
  }
}

TEST(PlannerTest, IlpProvesTheOptimumOfA64By16LayerWhoseHottestExpertSetsThePace) {
  // 64 experts on 16 ranks x 4 slots: every rank holds exactly 4 experts, so the hottest
  // expert's rank carries at least it plus the 3 lightest others. Greedy reaches that and the
  // cut proves it exactly (without the cut CBC proves it only to within its allowable gap).
  PlacementProblem p;
  p.num_experts = 64;
  p.world_size = 16;
  p.slots_per_rank = 4;
  p.top_k = 1;
  std::mt19937 rng(12);
  std::uniform_real_distribution<double> u(0.005, 0.015);
  for (int e = 0; e < 64; ++e) p.loads.push_back(e == 5 ? 0.3 : u(rng));
  p.expert_bytes.assign(64, 1);
  std::vector<double> sorted = p.loads;
  std::sort(sorted.begin(), sorted.end());
  PlannerOptions o = QuickIlp();
  auto ilp = MakeIlpPlanner(o)->PlanLayer(p);
  ASSERT_TRUE(ilp.ok()) << ilp.status();
  const ObjectiveTerms t = EvaluateObjective(p, ilp->physical_to_logical, ilp->slot_share, o);
  EXPECT_NEAR(t.max_load, 0.3 + sorted[0] + sorted[1] + sorted[2], 1e-9);
  EXPECT_NEAR(ilp->best_bound, ilp->objective, 1e-9);
  EXPECT_LT(ilp->gap, 1e-9);
}

TEST(PlannerTest, NoSpareSlotBoundCountsSeveralHotExperts) {
  // Two hot experts (0.30, 0.29) on 4 ranks x 2 slots: one of them gets a filler of at least
  // 0.1, so the optimum is 0.39. The hottest-expert cut alone proves 0.31; with both hot
  // experts, either they share a rank (0.59) or their two ranks carry 0.30 + 0.29 + 0.01 + 0.1
  // between them, at least 0.35 on one.
  PlacementProblem p;
  p.num_experts = 8;
  p.world_size = 4;
  p.slots_per_rank = 2;
  p.top_k = 1;
  p.loads = {0.30, 0.29, 0.01, 0.1, 0.1, 0.1, 0.1, 0.1};
  p.expert_bytes.assign(8, 1);
  PlannerOptions o = QuickIlp();
  o.lambda = 0;
  auto ilp = MakeIlpPlanner(o)->PlanLayer(p);
  ASSERT_TRUE(ilp.ok()) << ilp.status();
  EXPECT_NEAR(ilp->objective, 0.39, 1e-9);
  EXPECT_GE(ilp->best_bound, 0.35 - 1e-9);
  EXPECT_LE(ilp->best_bound, 0.39 + 1e-9);
}

TEST(PlannerTest, IlpFindsTheBruteForceOptimumOfATinyInstanceAndBoundsItValidly) {
  // 6 experts, 3 ranks x 2 slots: every placement is a split into 3 pairs (15 of them); with
  // no spare slot there are no replicas, so shares are fixed and brute force is exact.
  std::mt19937 rng(5);
  PlannerOptions o = QuickIlp();
  o.time_limit_seconds = 5;
  o.balance_slack = -1;  // the plain objective, no cap from greedy
  o.target_gap = 0;
  for (int trial = 0; trial < 3; ++trial) {
    PlacementProblem p = RandomProblem(rng, 6, 3, 2, 2);
    double best = 1e300;
    std::vector<int32_t> perm = {0, 1, 2, 3, 4, 5};
    do {
      best = std::min(best, EvaluateObjective(p, perm, {}, o).total);
    } while (std::next_permutation(perm.begin(), perm.end()));
    auto ilp = MakeIlpPlanner(o)->PlanLayer(p);
    ASSERT_TRUE(ilp.ok());
    EXPECT_NEAR(ilp->objective, best, 1e-6) << "trial " << trial;
    // The bound is the planner's own (root LP, cuts, pair-credit LP; CBC's claims are not
    // used, see ilp_planner.cc): valid, and a proof only where it meets the objective.
    EXPECT_LE(ilp->best_bound, best + 1e-9);
    EXPECT_EQ(ilp->proven_optimal, ilp->best_bound >= ilp->objective - 1e-9);
  }
}

// The ILP's bound (CBC's, the pair-credit bound's) must stay under the true optimum, with
// dense co-activation where the pair term matters, in both forms of the straggler term.
TEST(PlannerTest, IlpBoundIsAtMostTheBruteForceOptimumWithDenseCoActivation) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<double> u(0, 1);
  for (auto [e_, r_, s_] : std::vector<std::tuple<int, int, int>>{{8, 4, 2}, {5, 3, 2}}) {
    const int E = e_, R = r_, S = s_;  // lambdas below capture these (C++17 bindings cannot be)
    for (int variant = 0; variant < 4; ++variant) {
      const bool average = variant % 2 == 0, capped = variant >= 2;
      PlacementProblem p = RandomProblem(rng, E, R, S, 2);
      p.pairs.clear();
      for (int e = 0; e < E; ++e) {
        for (int f = e + 1; f < E; ++f) {
          if (u(rng) < 0.6) p.pairs.push_back({e, f, 0.4 * u(rng)});
        }
      }
      std::sort(p.pairs.begin(), p.pairs.end(),
                [](const CoActivation& a, const CoActivation& b) { return a.weight > b.weight; });
      AddScenarios(rng, &p, 2);
      PlannerOptions o = QuickIlp();
      o.lambda = 0.5;  // pairs weigh as much as balance
      o.balance_slack = capped ? 0.0 : -1.0;
      o.average_scenarios = average;
      // With the guard, the program's placements keep every scenario's straggler load at or
      // under greedy's (the caps); brute force then searches only those.
      std::vector<double> cap(p.num_scenarios(), 1e300);
      if (capped) {
        auto greedy = MakeGreedyPlanner(o)->PlanLayer(p);
        ASSERT_TRUE(greedy.ok());
        cap = EvaluateObjective(p, greedy->physical_to_logical, {}, o).scenario_max_load;
      }
      // The best placement with even shares (with a spare slot the optimum over shares is at
      // most this): every filling of the slots that holds each expert.
      double best = 1e300;
      std::vector<int32_t> p2l(R * S, -1);
      std::vector<int> count(E, 0);
      auto rec = [&](auto&& self, int s) -> void {
        if (s == R * S) {
          if (std::all_of(count.begin(), count.end(), [](int c) { return c > 0; })) {
            const ObjectiveTerms t = EvaluateObjective(p, p2l, {}, o);
            bool within = true;
            for (int w = 0; w < p.num_scenarios(); ++w) {
              within = within && t.scenario_max_load[w] <= cap[w] + 1e-9;
            }
            if (within) best = std::min(best, t.total);
          }
          return;
        }
        for (int e = (R * S > E ? -1 : 0); e < E; ++e) {
          p2l[s] = e;
          if (e >= 0) ++count[e];
          self(self, s + 1);
          if (e >= 0) --count[e];
        }
      };
      if (R * S == E) {  // no spare slot: the placements are the permutations
        std::vector<int32_t> perm(E);
        for (int e = 0; e < E; ++e) perm[e] = e;
        do {
          p2l = perm;
          std::fill(count.begin(), count.end(), 1);
          rec(rec, R * S);
        } while (std::next_permutation(perm.begin(), perm.end()));
      } else {
        rec(rec, 0);
      }
      auto ilp = MakeIlpPlanner(o)->PlanLayer(p);
      ASSERT_TRUE(ilp.ok()) << ilp.status();
      EXPECT_LE(ilp->best_bound, best + 1e-9)
          << "E=" << E << " average=" << average << " capped=" << capped;
      EXPECT_LE(ilp->best_bound, ilp->objective + 1e-9);
      if (R * S == E) {
        EXPECT_GE(ilp->objective, best - 1e-9);
      }
    }
  }
}

TEST(PlannerTest, IlpMovesNothingWhenTheCurrentPlacementIsAlreadyBest) {
  std::mt19937 rng(6);
  PlacementProblem p = RandomProblem(rng, 8, 4, 2, 2);
  PlannerOptions o = QuickIlp();
  o.mu = 1.0;  // moving is expensive
  auto greedy = MakeGreedyPlanner(o)->PlanLayer(p);
  ASSERT_TRUE(greedy.ok());
  p.current = greedy->physical_to_logical;
  p.current_slots_per_rank = p.slots_per_rank;
  auto ilp = MakeIlpPlanner(o)->PlanLayer(p);
  ASSERT_TRUE(ilp.ok());
  auto from = ExpertPlacement::Create(4, 2, 8, {p.current});
  auto to = ExpertPlacement::Create(4, 2, 8, {ilp->physical_to_logical});
  ASSERT_TRUE(from.ok() && to.ok());
  EXPECT_EQ(CountMoves(*from, *to, 1e6).experts, 0);
  EXPECT_EQ(EvaluateObjective(p, ilp->physical_to_logical, ilp->slot_share, o).migration, 0);
}

TEST(PlannerTest, MigrationTermCountsExpertsARankGains) {
  PlacementProblem p;
  p.num_experts = 4;
  p.world_size = 2;
  p.slots_per_rank = 2;
  p.loads = {0.25, 0.25, 0.25, 0.25};
  p.expert_bytes = {1, 1, 1, 3};  // mean 1.5
  p.current = {0, 1, 2, 3};
  p.current_slots_per_rank = 2;
  EXPECT_EQ(EvaluateObjective(p, {0, 1, 2, 3}, {}, {}).migration, 0);
  // Swap experts 1 and 3: rank 0 gains 3 (2 units), rank 1 gains 1 (2/3 unit).
  EXPECT_NEAR(EvaluateObjective(p, {0, 3, 2, 1}, {}, {}).migration, 3 / 1.5 + 1 / 1.5, 1e-12);
}

TEST(PlannerTest, PlanSolvesLayersInParallelIntoOnePlacement) {
  std::mt19937 rng(7);
  std::vector<PlacementProblem> layers;
  for (int l = 0; l < 5; ++l) {
    layers.push_back(RandomProblem(rng, 8, 4, 3, 2));
    layers.back().layer = l;
  }
  auto ilp = MakeIlpPlanner(QuickIlp());
  auto plan = ilp->Plan(layers, 2);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->placement.num_layers(), 5);
  double sum = 0;
  for (int l = 0; l < 5; ++l) {
    EXPECT_EQ(plan->placement.physical_to_logical(l), plan->layers[l].physical_to_logical);
    EXPECT_NEAR(EvaluateObjective(layers[l], plan->layers[l].physical_to_logical,
                                  plan->layers[l].slot_share, QuickIlp()).total,
                plan->layers[l].objective, 1e-9);
    sum += plan->layers[l].objective;
  }
  EXPECT_NEAR(plan->objective, sum, 1e-9);
}

TEST(PlannerTest, RejectsAProblemWhoseSlotsCannotHoldEveryExpert) {
  std::mt19937 rng(8);
  PlacementProblem p = RandomProblem(rng, 8, 2, 3, 2);
  for (const auto& name : PlannerNames()) {
    auto plan = (*CreatePlanner(name, {}))->PlanLayer(p);
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
}

}  // namespace
}  // namespace sy::parallel::planner
