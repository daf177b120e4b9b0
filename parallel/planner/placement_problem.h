// PlacementProblem: one MoE layer's placement question, the input every Planner takes
// (DESIGN.md §4): the experts' loads and co-activation, the rank group's shape, the current
// placement (to price migration) and each expert's bytes.
//
// Units: loads are assignments per token (they sum to top_k), co-activation weights are the
// fraction of tokens that chose both experts, bytes are bytes of one expert's weights.
//
// Thread safety: plain values; const access from many threads is safe.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/trace.h"

namespace sy::parallel::planner {

struct PlacementProblem {
  int layer = 0;
  int world_size = 0;
  int slots_per_rank = 0;
  int num_experts = 0;
  int top_k = 1;
  std::vector<double> loads;          // [E] assignments per token
  std::vector<CoActivation> pairs;    // co-activated pairs, by weight descending (may be empty)
  // Load scenarios: the loads of W time windows of the planning data ([W][E], each like
  // `loads`), empty when only the mean is known. The straggler load M of the objective is taken
  // over `loads` and every scenario (their worst, or their mean with average_scenarios, see
  // planner.h), so a plan is judged by how it copes with the load moving, not only by its fit
  // to the mean.
  std::vector<std::vector<double>> scenario_loads;
  // Current placement of this layer: physical_to_logical over current_world_size *
  // current_slots_per_rank slots (the rank count may differ: scale-up/down). Empty: none.
  std::vector<int32_t> current;
  int current_slots_per_rank = 0;
  std::vector<double> expert_bytes;   // [E]

  int num_slots() const { return world_size * slots_per_rank; }
  // Scenario 0 is the mean (`loads`), 1..W the windows.
  int num_scenarios() const { return 1 + static_cast<int>(scenario_loads.size()); }
  const std::vector<double>& scenario(int w) const {
    return w == 0 ? loads : scenario_loads[w - 1];
  }
  bool has_current() const { return !current.empty(); }
  // True if the current placement holds expert e on rank r.
  bool CurrentlyOn(int e, int r) const;
  // InvalidArgument when shapes disagree or the slots cannot hold every expert.
  absl::Status Validate() const;
};

// Time windows the planning data is cut into for load scenarios (BuildProblems).
inline constexpr int kDefaultScenarioWindows = 8;

// One problem per layer of `trace`. `current` may be null; when given it must have the
// trace's expert count and layer count. expert_bytes: bytes of each expert's weights.
// scenario_windows: with token paths, the loads of that many consecutive token windows
// become the problem's scenarios (WindowLoads; 0 or 1: none).
absl::StatusOr<std::vector<PlacementProblem>> BuildProblems(
    const RoutingTrace& trace, int world_size, int slots_per_rank, const ExpertPlacement* current,
    double expert_bytes, int scenario_windows = kDefaultScenarioWindows);

}  // namespace sy::parallel::planner
