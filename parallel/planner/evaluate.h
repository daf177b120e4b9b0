// Plan-then-score: runs one placement policy on a plan trace and scores the result on an
// evaluation trace (held-out data where there is some). `switchyard plan` and
// bench/placement_eval_bench print these reports.
//
// Thread safety: pure function (the ILP itself solves layers on several threads).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/placement_problem.h"
#include "parallel/planner/planner.h"
#include "parallel/planner/scoring.h"
#include "parallel/planner/trace.h"

namespace sy::parallel::planner {

struct EvalSetup {
  int world_size = 0;
  int slots_per_rank = 0;
  const ExpertPlacement* current = nullptr;  // priced by the ILP; moves counted against it
  double expert_bytes = 0;                   // bytes of one expert's weights
  // Load scenarios: the plan trace's tokens cut into this many windows (BuildProblems).
  int scenario_windows = kDefaultScenarioWindows;
  PlannerOptions options;
};

struct PolicyReport {
  std::string policy;
  PlacementScore score;        // on the evaluation trace
  double fit_balancedness = 0; // on the plan trace (what the planner saw)
  MoveCount moved;             // vs setup.current, else vs ExpertPlacement::Contiguous
  PlanResult plan;             // placement, per-layer objective / bound / gap / time
};

// InvalidArgument when the traces disagree in layers or experts, or the shape is invalid.
absl::StatusOr<PolicyReport> EvaluatePolicy(const std::string& policy,
                                            const RoutingTrace& plan_trace,
                                            const RoutingTrace& eval_trace,
                                            const EvalSetup& setup);

}  // namespace sy::parallel::planner
