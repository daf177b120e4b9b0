#include "parallel/planner/evaluate.h"

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"

namespace sy::parallel::planner {

absl::StatusOr<PolicyReport> EvaluatePolicy(const std::string& policy,
                                            const RoutingTrace& plan_trace,
                                            const RoutingTrace& eval_trace,
                                            const EvalSetup& setup) {
  if (plan_trace.num_layers != eval_trace.num_layers ||
      plan_trace.num_experts != eval_trace.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "plan trace ", plan_trace.name, " (", plan_trace.num_layers, " layers x ",
        plan_trace.num_experts, " experts) and evaluation trace ", eval_trace.name, " (",
        eval_trace.num_layers, " x ", eval_trace.num_experts, ") differ"));
  }
  SY_ASSIGN_OR_RETURN(auto planner, CreatePlanner(policy, setup.options));
  SY_ASSIGN_OR_RETURN(auto problems,
                      BuildProblems(plan_trace, setup.world_size, setup.slots_per_rank,
                                    setup.current, setup.expert_bytes,
                                    setup.scenario_windows));
  PolicyReport report;
  report.policy = policy;
  SY_ASSIGN_OR_RETURN(report.plan, planner->Plan(problems, setup.options.max_threads));
  SY_ASSIGN_OR_RETURN(report.score, ScorePlacement(report.plan.placement, eval_trace));
  SY_ASSIGN_OR_RETURN(PlacementScore fit, ScorePlacement(report.plan.placement, plan_trace));
  report.fit_balancedness = fit.balancedness;
  if (setup.current != nullptr) {
    report.moved = CountMoves(*setup.current, report.plan.placement, setup.expert_bytes);
  } else {
    report.moved = CountMoves(ExpertPlacement::Contiguous(plan_trace.num_layers,
                                                          plan_trace.num_experts,
                                                          setup.world_size),
                              report.plan.placement, setup.expert_bytes);
  }
  return report;
}

}  // namespace sy::parallel::planner
