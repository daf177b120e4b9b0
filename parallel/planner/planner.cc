#include "parallel/planner/planner.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"

namespace sy::parallel::planner {

int CreditedPairs(const PlacementProblem& problem, const PlannerOptions& options) {
  const int limit = options.max_pairs > 0 ? options.max_pairs : 2 * problem.num_experts;
  return std::min<int>(limit, static_cast<int>(problem.pairs.size()));
}

ObjectiveTerms EvaluateObjective(const PlacementProblem& problem,
                                 const std::vector<int32_t>& physical_to_logical,
                                 const std::vector<float>& slot_share,
                                 const PlannerOptions& options) {
  const int R = problem.world_size, S = problem.slots_per_rank, E = problem.num_experts;
  std::vector<int> replicas(E, 0);
  for (int32_t e : physical_to_logical) {
    if (e >= 0) ++replicas[e];
  }
  // held[e * R + r]: rank r holds expert e.
  std::vector<char> held(static_cast<size_t>(E) * R, 0);
  ObjectiveTerms t;
  for (int w = 0; w < problem.num_scenarios(); ++w) {
    const std::vector<double>& loads = problem.scenario(w);
    std::vector<double> rank_load(R, 0.0);
    for (int s = 0; s < R * S; ++s) {
      const int32_t e = physical_to_logical[s];
      if (e < 0) continue;
      const double share = slot_share.empty() ? 1.0 / replicas[e] : slot_share[s];
      rank_load[s / S] += loads[e] * share;
      held[static_cast<size_t>(e) * R + s / S] = 1;
    }
    t.scenario_max_load.push_back(*std::max_element(rank_load.begin(), rank_load.end()));
  }
  t.max_load = options.average_scenarios ? 0.0 : t.scenario_max_load[0];
  if (options.average_scenarios) {
    for (double m : t.scenario_max_load) t.max_load += m / problem.num_scenarios();
  }
  // share_on[e * R + r]: the share of e's tokens served on r.
  std::vector<double> share_on(static_cast<size_t>(E) * R, 0.0);
  for (int s = 0; s < R * S; ++s) {
    const int32_t e = physical_to_logical[s];
    if (e < 0) continue;
    share_on[static_cast<size_t>(e) * R + s / S] +=
        slot_share.empty() ? 1.0 / replicas[e] : slot_share[s];
  }
  // Per expert: its tokens travel unless their home rank holds a replica.
  double per_expert = 0;
  for (int e = 0; e < E; ++e) {
    int ranks = 0;
    for (int r = 0; r < R; ++r) ranks += held[static_cast<size_t>(e) * R + r];
    per_expert += problem.loads[e] * (R - ranks) / R;
  }
  // Per credited pair: the copies co-location saves (PairSaving in planner.h).
  double saved = 0;
  const int np = CreditedPairs(problem, options);
  for (int i = 0; i < np; ++i) {
    const auto& p = problem.pairs[i];
    int either = 0;
    double both = 0;
    for (int r = 0; r < R; ++r) {
      const size_t ie = static_cast<size_t>(p.e) * R + r, jf = static_cast<size_t>(p.f) * R + r;
      either += held[ie] || held[jf];
      if (held[ie] && held[jf]) both += share_on[ie] * share_on[jf];
    }
    saved += p.weight * (R - either) / R * both;
  }
  const double k = problem.top_k;
  t.traffic = per_expert - (2.0 / k) * saved;
  if (problem.has_current()) {
    double mean_bytes = 0;
    for (double b : problem.expert_bytes) mean_bytes += b;
    mean_bytes /= E;
    for (int e = 0; e < E; ++e) {
      for (int r = 0; r < R; ++r) {
        if (held[static_cast<size_t>(e) * R + r] && !problem.CurrentlyOn(e, r)) {
          t.migration += mean_bytes > 0 ? problem.expert_bytes[e] / mean_bytes : 1.0;
        }
      }
    }
  }
  t.total = t.max_load + options.lambda * t.traffic + options.mu * t.migration;
  return t;
}

absl::StatusOr<PlanResult> Planner::Plan(const std::vector<PlacementProblem>& problems,
                                         int max_threads) const {
  if (problems.empty()) return absl::InvalidArgumentError("planner: no layers to plan");
  const auto start = std::chrono::steady_clock::now();
  const int L = static_cast<int>(problems.size());
  std::vector<absl::StatusOr<LayerPlan>> plans(L, absl::UnknownError("not solved"));
  int threads = max_threads > 0 ? max_threads
                                : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads = std::min(threads, L);
  // Each worker takes the next unsolved layer: CBC is single-threaded per model, so one layer
  // per hardware thread keeps the machine busy without oversubscribing it.
  std::atomic<int> next{0};
  auto worker = [&]() {
    for (int l = next++; l < L; l = next++) plans[l] = PlanLayer(problems[l]);
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();

  PlanResult result;
  std::vector<std::vector<int32_t>> p2l(L);
  std::vector<std::vector<float>> shares(L);
  bool any_share = false;
  for (int l = 0; l < L; ++l) {
    if (!plans[l].ok()) {
      return absl::Status(plans[l].status().code(),
                          absl::StrCat(name(), " planner: layer ", l, ": ",
                                       plans[l].status().message()));
    }
    LayerPlan& lp = *plans[l];
    p2l[l] = lp.physical_to_logical;
    shares[l] = lp.slot_share;
    any_share = any_share || !lp.slot_share.empty();
    result.objective += lp.objective;
    result.best_bound += lp.best_bound;
    result.max_gap = std::max(result.max_gap, lp.gap);
    result.solve_seconds += lp.solve_seconds;
    result.layers.push_back(std::move(lp));
  }
  if (!any_share) shares.clear();
  const auto& p0 = problems[0];
  auto placement = ExpertPlacement::Create(p0.world_size, p0.slots_per_rank, p0.num_experts,
                                           std::move(p2l), std::move(shares));
  if (!placement.ok()) {
    return absl::InternalError(absl::StrCat(name(), " planner produced an invalid placement: ",
                                            placement.status().message()));
  }
  result.placement = std::move(placement).value();
  result.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

std::vector<std::string> PlannerNames() { return {"contiguous", "round-robin", "greedy", "ilp"}; }

absl::StatusOr<std::unique_ptr<Planner>> CreatePlanner(const std::string& name,
                                                       const PlannerOptions& options) {
  if (name == "contiguous") return MakeContiguousPlanner(options);
  if (name == "round-robin") return MakeRoundRobinPlanner(options);
  if (name == "greedy") return MakeGreedyPlanner(options);
  if (name == "ilp") return MakeIlpPlanner(options);
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown placement policy '", name, "' (contiguous, round-robin, greedy, ilp)"));
}

}  // namespace sy::parallel::planner
