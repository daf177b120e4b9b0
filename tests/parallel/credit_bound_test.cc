// CreditBound against brute force: on tiny layers it must bound the pair weight of every
// placement (with and without spare slots, and under a straggler-load limit), and it is exact
// where the pair graph is disjoint cliques of S experts.
#include "parallel/planner/credit_bound.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "parallel/planner/planner.h"

namespace sy::parallel::planner {
namespace {

PlacementProblem RandomLayer(std::mt19937& rng, int E, int R, int S) {
  PlacementProblem p;
  p.num_experts = E;
  p.world_size = R;
  p.slots_per_rank = S;
  p.top_k = 2;
  std::exponential_distribution<double> ex(1.0);
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += p.loads.emplace_back(ex(rng) + 0.05);
  for (double& l : p.loads) l *= 2 / sum;
  std::uniform_real_distribution<double> u(0, 1);
  for (int e = 0; e < E; ++e) {
    for (int f = e + 1; f < E; ++f) {
      if (u(rng) < 0.5) p.pairs.push_back({e, f, 0.3 * u(rng)});
    }
  }
  std::sort(p.pairs.begin(), p.pairs.end(),
            [](const CoActivation& a, const CoActivation& b) { return a.weight > b.weight; });
  p.expert_bytes.assign(E, 1);
  return p;
}

double Credit(const PlacementProblem& p, const std::vector<int32_t>& p2l) {
  const int S = p.slots_per_rank;
  double credit = 0;
  for (const auto& pr : p.pairs) {
    bool together = false;
    for (int r = 0; r < p.world_size && !together; ++r) {
      bool has_e = false, has_f = false;
      for (int s = r * S; s < (r + 1) * S; ++s) {
        has_e = has_e || p2l[s] == pr.e;
        has_f = has_f || p2l[s] == pr.f;
      }
      together = has_e && has_f;
    }
    if (together) credit += pr.weight;
  }
  return credit;
}

// Every placement that holds each expert at least once (slots may stay empty): calls
// visit(p2l).
template <typename F>
void EveryPlacement(const PlacementProblem& p, F visit) {
  const int n = p.num_slots(), E = p.num_experts;
  std::vector<int32_t> p2l(n, -1);
  std::vector<int> count(E, 0);
  auto rec = [&](auto&& self, int s) -> void {
    if (s == n) {
      if (std::all_of(count.begin(), count.end(), [](int c) { return c > 0; })) visit(p2l);
      return;
    }
    for (int e = -1; e < E; ++e) {
      p2l[s] = e;
      if (e >= 0) ++count[e];
      self(self, s + 1);
      if (e >= 0) --count[e];
    }
  };
  rec(rec, 0);
}

TEST(CreditBoundTest, BoundsThePairWeightOfEveryPlacement) {
  std::mt19937 rng(21);
  for (auto [E, R, S] : std::vector<std::tuple<int, int, int>>{
           {6, 3, 2}, {6, 2, 3}, {5, 3, 2}, {4, 2, 3}, {5, 2, 3}}) {
    for (int trial = 0; trial < 3; ++trial) {
      PlacementProblem p = RandomLayer(rng, E, R, S);
      const int P = static_cast<int>(p.pairs.size());
      auto cb = CreditBound::Build(p, P);
      ASSERT_NE(cb, nullptr);
      double best = 0;
      EveryPlacement(p, [&](const std::vector<int32_t>& p2l) {
        best = std::max(best, Credit(p, p2l));
      });
      const double u = cb->UpperBound(1e300);
      EXPECT_GE(u, best - 1e-9) << "E=" << E << " R=" << R << " S=" << S;
      double all = 0;
      for (const auto& pr : p.pairs) all += pr.weight;
      EXPECT_LE(u, all * (1 + 1e-6));
    }
  }
}

TEST(CreditBoundTest, UnderALoadLimitBoundsThePlacementsThatMeetIt) {
  // No spare slot: the limit drops components whose rank would be too heavy.
  std::mt19937 rng(22);
  for (int trial = 0; trial < 6; ++trial) {
    PlacementProblem p = RandomLayer(rng, 6, 3, 2);
    auto cb = CreditBound::Build(p, static_cast<int>(p.pairs.size()));
    ASSERT_NE(cb, nullptr);
    std::vector<std::pair<double, double>> placements;  // (straggler load, credit)
    std::vector<int32_t> perm = {0, 1, 2, 3, 4, 5};
    do {
      const ObjectiveTerms t = EvaluateObjective(p, perm, {}, PlannerOptions{});
      placements.emplace_back(t.max_load, Credit(p, perm));
    } while (std::next_permutation(perm.begin(), perm.end()));
    std::vector<double> limits;
    for (const auto& [m, c] : placements) limits.push_back(m);
    std::sort(limits.begin(), limits.end());
    double previous = 0;
    for (double b : limits) {
      double best = 0;
      for (const auto& [m, c] : placements) {
        if (m <= b + 1e-12) best = std::max(best, c);
      }
      const double u = cb->UpperBound(b);
      EXPECT_GE(u, best - 1e-9) << "trial " << trial << " limit " << b;
      EXPECT_GE(u, previous - 1e-9) << "the bound grows with the limit";
      previous = u;
    }
  }
}

TEST(CreditBoundTest, ObjectiveLowerBoundIsAtMostTheBestPlacement) {
  // No spare slot, objective M + constant - coef * credit with M the straggler load: brute
  // force over every placement against the bound, handed the worst placement's objective.
  std::mt19937 rng(24);
  const double constant = 0.1;
  for (double coef : {0.05, 0.3, 1.0}) {
    for (int trial = 0; trial < 4; ++trial) {
      PlacementProblem p = RandomLayer(rng, 8, 4, 2);
      double best = 1e300, worst = -1e300;
      std::vector<int32_t> perm = {0, 1, 2, 3, 4, 5, 6, 7};
      do {
        const double m = EvaluateObjective(p, perm, {}, PlannerOptions{}).max_load;
        const double v = m + constant - coef * Credit(p, perm);
        best = std::min(best, v);
        worst = std::max(worst, v);
      } while (std::next_permutation(perm.begin(), perm.end()));
      auto cb = CreditBound::Build(p, static_cast<int>(p.pairs.size()));
      ASSERT_NE(cb, nullptr);
      const double lb_m = 2.0 / 4;  // total / R
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      for (bool parametric : {false, true}) {
        const double bound = cb->ObjectiveLowerBound(worst, lb_m, constant, coef, parametric,
                                                     deadline);
        EXPECT_LE(bound, best + 1e-9) << "coef " << coef << " parametric " << parametric;
        EXPECT_GT(bound, -1e300);
      }
      // The load filter only helps.
      EXPECT_GE(cb->ObjectiveLowerBound(worst, lb_m, constant, coef, true, deadline),
                cb->ObjectiveLowerBound(worst, lb_m, constant, coef, false, deadline) - 1e-12);
    }
  }
}

TEST(CreditBoundTest, ExactOnDisjointCliques) {
  // 8 experts in two cliques of 4 (ranks of 4 slots): the best placement credits every pair.
  PlacementProblem p;
  p.num_experts = 8;
  p.world_size = 2;
  p.slots_per_rank = 4;
  p.top_k = 2;
  p.loads.assign(8, 0.25);
  p.expert_bytes.assign(8, 1);
  double all = 0;
  for (int g = 0; g < 2; ++g) {
    for (int i = 0; i < 4; ++i) {
      for (int j = i + 1; j < 4; ++j) {
        p.pairs.push_back({4 * g + i, 4 * g + j, 0.01 * (1 + i + j + g)});
        all += p.pairs.back().weight;
      }
    }
  }
  auto cb = CreditBound::Build(p, static_cast<int>(p.pairs.size()));
  ASSERT_NE(cb, nullptr);
  EXPECT_NEAR(cb->UpperBound(1e300), all, 1e-6);
  EXPECT_NEAR(cb->UpperBound(1.0), all, 1e-6);  // each clique weighs exactly a rank's share
  EXPECT_NEAR(cb->UpperBound(0.99), 0.0, 1e-6);  // no rank of 4 can stay under 0.99
}

TEST(CreditBoundTest, NullWithoutPairsOrWithTooManyColumns) {
  std::mt19937 rng(23);
  PlacementProblem p = RandomLayer(rng, 6, 3, 2);
  EXPECT_EQ(CreditBound::Build(p, 0), nullptr);
  EXPECT_EQ(CreditBound::Build(p, static_cast<int>(p.pairs.size()), /*max_columns=*/2), nullptr);
}

}  // namespace
}  // namespace sy::parallel::planner
