// contiguous, round-robin and greedy (DeepSeek EPLB) planners.
#include <chrono>

#include "absl/strings/str_cat.h"
#include "parallel/planner/eplb.h"
#include "parallel/planner/planner.h"

namespace sy::parallel::planner {
namespace {

LayerPlan Finish(const PlacementProblem& problem, std::vector<int32_t> p2l,
                 const PlannerOptions& options, std::chrono::steady_clock::time_point start) {
  LayerPlan plan;
  plan.physical_to_logical = std::move(p2l);
  plan.objective = EvaluateObjective(problem, plan.physical_to_logical, {}, options).total;
  plan.best_bound = plan.objective;  // a heuristic proves nothing; no gap is claimed
  plan.gap = 0;
  plan.solve_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return plan;
}

// Experts by id, ceil(E / R) to a rank; the rank's other slots stay empty.
class ContiguousPlanner : public Planner {
 public:
  explicit ContiguousPlanner(const PlannerOptions& o) : options_(o) {}
  std::string name() const override { return "contiguous"; }
  absl::StatusOr<LayerPlan> PlanLayer(const PlacementProblem& p) const override {
    const auto start = std::chrono::steady_clock::now();
    auto s = p.Validate();
    if (!s.ok()) return s;
    const int per_rank = (p.num_experts + p.world_size - 1) / p.world_size;
    std::vector<int32_t> p2l(p.num_slots(), -1);
    for (int e = 0; e < p.num_experts; ++e) {
      p2l[(e / per_rank) * p.slots_per_rank + e % per_rank] = e;
    }
    return Finish(p, std::move(p2l), options_, start);
  }

 private:
  PlannerOptions options_;
};

// Expert e on rank e % R.
class RoundRobinPlanner : public Planner {
 public:
  explicit RoundRobinPlanner(const PlannerOptions& o) : options_(o) {}
  std::string name() const override { return "round-robin"; }
  absl::StatusOr<LayerPlan> PlanLayer(const PlacementProblem& p) const override {
    const auto start = std::chrono::steady_clock::now();
    auto s = p.Validate();
    if (!s.ok()) return s;
    std::vector<int32_t> p2l(p.num_slots(), -1);
    for (int e = 0; e < p.num_experts; ++e) {
      p2l[(e % p.world_size) * p.slots_per_rank + e / p.world_size] = e;
    }
    return Finish(p, std::move(p2l), options_, start);
  }

 private:
  PlannerOptions options_;
};

class GreedyPlanner : public Planner {
 public:
  explicit GreedyPlanner(const PlannerOptions& o) : options_(o) {}
  std::string name() const override { return "greedy"; }
  absl::StatusOr<LayerPlan> PlanLayer(const PlacementProblem& p) const override {
    const auto start = std::chrono::steady_clock::now();
    auto s = p.Validate();
    if (!s.ok()) return s;
    if (options_.num_nodes > 1 && p.world_size % options_.num_nodes != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "greedy: ", p.world_size, " ranks do not split into ", options_.num_nodes, " nodes"));
    }
    std::vector<int32_t> p2l =
        RebalanceExperts(p.loads, p.num_slots(), options_.num_groups, options_.num_nodes,
                         p.world_size, options_.distinct_ranks);
    return Finish(p, std::move(p2l), options_, start);
  }

 private:
  PlannerOptions options_;
};

}  // namespace

std::unique_ptr<Planner> MakeContiguousPlanner(const PlannerOptions& o) {
  return std::make_unique<ContiguousPlanner>(o);
}
std::unique_ptr<Planner> MakeRoundRobinPlanner(const PlannerOptions& o) {
  return std::make_unique<RoundRobinPlanner>(o);
}
std::unique_ptr<Planner> MakeGreedyPlanner(const PlannerOptions& o) {
  return std::make_unique<GreedyPlanner>(o);
}

}  // namespace sy::parallel::planner
