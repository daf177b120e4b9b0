// Planner: problem (loads, co-activation, ranks, slots per rank, current placement, expert
// bytes) -> placement of one MoE layer + report (objective, bound, gap, time) (DESIGN.md §4).
// Policies, by name (CreatePlanner):
//   contiguous   expert e on rank e / ceil(E/R); extra slots stay empty (what a naive system does)
//   round-robin  expert e on rank e % R; extra slots stay empty
//   greedy       DeepSeek EPLB (parallel/planner/eplb.h): replicas by highest load per
//                replica, then largest-first packing into ranks with free slots
//   ilp          mixed-integer program solved by CBC, warm-started from greedy (ilp_planner.cc)
//
// The ILP objective (EvaluateObjective scores any plan on it, so policies can be compared):
//   M + lambda * traffic + mu * migration
//   M          the straggler rank's load, assignments per token (the ideal is top_k / R),
//              averaged over the load scenarios: the mean loads and every window of the
//              planning data (PlacementProblem::scenario_loads). An estimate of the expected
//              straggler load on new data: it prices how a plan copes with the load moving,
//              not only its fit to the mean. Without scenarios, the straggler load.
//   traffic    sum_e load[e] * (R - c_e) / R  -  (2/top_k) * sum over credited pairs of
//              PairSaving: copies of a token sent to other ranks per token, counting one copy
//              per destination rank, with the home rank uniformly random and each expert's
//              tokens served by a replica on the home rank when there is one, else by a
//              replica drawn by share (as scoring.h and the dispatcher do). c_e = ranks holding
//              e. PairSaving(e,f) = weight * (R - |ranks(e) u ranks(f)|) / R *
//              sum_{r holds both} share_e(r) * share_f(r): the copies saved when both go to
//              the same rank. Exact for top_k = 2; for larger k the 2/k weight never credits
//              more than co-location saves with one replica each (a k-clique on one rank saves
//              exactly k - 1). With one replica each it is (1 - 1/R) * (k - (2/k) * the
//              co-located pairs' weight). Only the `max_pairs` strongest pairs are credited.
//   migration  experts a rank gains relative to the current placement, each weighted by its
//              bytes / mean expert bytes (0 without a current placement)
//
// Thread safety: a Planner is immutable after creation; PlanLayer and Plan may be called from
// several threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/placement_problem.h"

namespace sy::parallel::planner {

struct PlannerOptions {
  // ILP: wall-clock limit per layer, seconds.
  double time_limit_seconds = 2.0;
  // ILP objective weights (units above): lambda per copy per token, mu per expert moved.
  double lambda = 0.02;
  double mu = 0.001;
  // ILP: credit only this many strongest co-activated pairs (0: 2 * num_experts).
  int max_pairs = 0;
  // ILP: in every load scenario the straggler load may not exceed greedy's by more than this
  // fraction (a negative value lifts the cap). With 0 the ILP balances no worse than greedy
  // on the mean loads and on every window of the planning data, and spends its freedom on
  // traffic and migration.
  double balance_slack = 0.0;
  // ILP: fit slot shares to the planned loads (the a[e,r] of the program, or an LP for a fixed
  // placement). Off: every plan splits an expert's tokens evenly over its replicas.
  bool fit_shares = true;
  // The straggler term M: true = averaged over the mean loads and every load scenario (robust,
  // but no LP bound comes near it: no integral placement balances every noisy window at
  // once); false = the straggler load under the mean loads, with the scenarios only as caps
  // (balance_slack) and in fitting shares.
  bool average_scenarios = true;
  // Stop when the relative gap falls under this.
  double target_gap = 1e-3;
  // greedy: hierarchical EPLB (groups -> nodes, replicas within nodes, then GPUs) when
  // num_groups % num_nodes == 0 and num_nodes > 1; otherwise the global policy.
  int num_nodes = 1;
  int num_groups = 1;
  // greedy: keep replicas of one expert on distinct ranks where a rank with free slots allows.
  bool distinct_ranks = true;
  // Plan(): layers solved at once (0: hardware threads).
  int max_threads = 0;
};

struct LayerPlan {
  std::vector<int32_t> physical_to_logical;  // [R * S], -1 for an empty slot
  std::vector<float> slot_share;             // [R * S] or empty (even split over replicas)
  double objective = 0;    // on the ILP objective (EvaluateObjective)
  double best_bound = 0;   // lower bound on the optimum (== objective when not known)
  double gap = 0;          // (objective - best_bound) / max(|objective|, 1e-9)
  double solve_seconds = 0;  // wall clock
  double cpu_seconds = 0;    // CPU time of the solving thread (ilp; 0 for the heuristics)
  bool proven_optimal = false;  // best_bound reaches the objective
  std::string note;        // e.g. "cbc returned nothing, kept greedy"
};

struct ObjectiveTerms {
  double max_load = 0;     // M: the straggler load averaged over scenarios, per token
  std::vector<double> scenario_max_load;  // [num_scenarios] the straggler load in each
  double traffic = 0;      // copies per token (proxy above)
  double migration = 0;    // experts moved, weighted by bytes / mean bytes
  double total = 0;        // M + lambda * traffic + mu * migration
};

// Scores one layer's plan on the ILP objective. Shares: slot_share when given, else even.
ObjectiveTerms EvaluateObjective(const PlacementProblem& problem,
                                 const std::vector<int32_t>& physical_to_logical,
                                 const std::vector<float>& slot_share,
                                 const PlannerOptions& options);

// The pairs the ILP credits: the `max_pairs` strongest (see PlannerOptions).
int CreditedPairs(const PlacementProblem& problem, const PlannerOptions& options);

struct PlanResult {
  ExpertPlacement placement;
  std::vector<LayerPlan> layers;
  double wall_seconds = 0;
  // Over layers: sum of objectives, sum of bounds, the largest gap, the summed solve time.
  double objective = 0, best_bound = 0, max_gap = 0, solve_seconds = 0;
};

class Planner {
 public:
  virtual ~Planner() = default;
  virtual std::string name() const = 0;
  // InvalidArgument for a malformed problem.
  virtual absl::StatusOr<LayerPlan> PlanLayer(const PlacementProblem& problem) const = 0;
  // Every layer, solved in parallel on up to max_threads threads (one layer per thread).
  absl::StatusOr<PlanResult> Plan(const std::vector<PlacementProblem>& problems,
                                  int max_threads = 0) const;
};

// contiguous, round-robin, greedy, ilp. InvalidArgument for another name.
absl::StatusOr<std::unique_ptr<Planner>> CreatePlanner(const std::string& name,
                                                       const PlannerOptions& options);
std::vector<std::string> PlannerNames();

// Implementations (simple_planners.cc, ilp_planner.cc).
std::unique_ptr<Planner> MakeContiguousPlanner(const PlannerOptions& options);
std::unique_ptr<Planner> MakeRoundRobinPlanner(const PlannerOptions& options);
std::unique_ptr<Planner> MakeGreedyPlanner(const PlannerOptions& options);
std::unique_ptr<Planner> MakeIlpPlanner(const PlannerOptions& options);

}  // namespace sy::parallel::planner
