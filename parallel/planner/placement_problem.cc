#include "parallel/planner/placement_problem.h"

#include "absl/strings/str_cat.h"

namespace sy::parallel::planner {

bool PlacementProblem::CurrentlyOn(int e, int r) const {
  if (current.empty() || current_slots_per_rank <= 0) return false;
  const size_t begin = static_cast<size_t>(r) * current_slots_per_rank;
  if (begin >= current.size()) return false;
  for (size_t s = begin; s < begin + current_slots_per_rank && s < current.size(); ++s) {
    if (current[s] == e) return true;
  }
  return false;
}

absl::Status PlacementProblem::Validate() const {
  if (world_size <= 0 || slots_per_rank <= 0 || num_experts <= 0 || top_k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement problem: ranks, slots per rank, experts and top_k must be positive"));
  }
  if (num_slots() < num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement problem: ", world_size, " ranks x ", slots_per_rank, " slots = ",
        num_slots(), " slots cannot hold ", num_experts, " experts"));
  }
  if (static_cast<int>(loads.size()) != num_experts ||
      static_cast<int>(expert_bytes.size()) != num_experts) {
    return absl::InvalidArgumentError("placement problem: loads/expert_bytes must have E entries");
  }
  for (double l : loads) {
    if (!(l >= 0)) return absl::InvalidArgumentError("placement problem: negative load");
  }
  for (const auto& w : scenario_loads) {
    if (static_cast<int>(w.size()) != num_experts) {
      return absl::InvalidArgumentError("placement problem: a load scenario must have E entries");
    }
    for (double l : w) {
      if (!(l >= 0)) return absl::InvalidArgumentError("placement problem: negative scenario load");
    }
  }
  for (const auto& p : pairs) {
    if (p.e < 0 || p.f >= num_experts || p.e >= p.f) {
      return absl::InvalidArgumentError("placement problem: bad co-activation pair");
    }
  }
  if (!current.empty() &&
      (current_slots_per_rank <= 0 || current.size() % current_slots_per_rank != 0)) {
    return absl::InvalidArgumentError("placement problem: current placement shape");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PlacementProblem>> BuildProblems(
    const RoutingTrace& trace, int world_size, int slots_per_rank, const ExpertPlacement* current,
    double expert_bytes, int scenario_windows) {
  if (current != nullptr && (current->num_experts() != trace.num_experts ||
                             current->num_layers() != trace.num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "current placement has ", current->num_layers(), " layers x ", current->num_experts(),
        " experts; the trace has ", trace.num_layers, " x ", trace.num_experts));
  }
  std::vector<PlacementProblem> out(trace.num_layers);
  for (int l = 0; l < trace.num_layers; ++l) {
    LayerStats st = ComputeLayerStats(trace, l);
    PlacementProblem& p = out[l];
    p.layer = l;
    p.world_size = world_size;
    p.slots_per_rank = slots_per_rank;
    p.num_experts = trace.num_experts;
    p.top_k = trace.top_k;
    p.loads = std::move(st.loads);
    p.pairs = std::move(st.pairs);
    if (scenario_windows > 1) p.scenario_loads = WindowLoads(trace, l, scenario_windows);
    p.expert_bytes.assign(trace.num_experts, expert_bytes);
    if (current != nullptr) {
      p.current = current->physical_to_logical(l);
      p.current_slots_per_rank = current->slots_per_rank();
    }
    auto s = p.Validate();
    if (!s.ok()) return s;
  }
  return out;
}

}  // namespace sy::parallel::planner
