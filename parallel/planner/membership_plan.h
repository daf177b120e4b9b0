// Placement for a new membership (DESIGN.md §5): when ranks join, drain or die, the experts
// are placed for the new group with the migration term, so that few experts move.
//
// `old_rank_of_new[j]` is the rank (of `current`) that becomes rank j of the new group, or -1
// for a rank that joins holding no expert; old ranks not listed are leaving (drained or
// dead): their experts must live elsewhere, from a surviving replica or from each rank's own
// checkpoint. Slots per rank become max(slots_per_rank option, ceil(E / new ranks)).
//
// Policies:
//   repair  keep every expert every staying rank holds (up to the new slot count, the
//           most-loaded first), give the experts left without a replica to the least-loaded
//           ranks with a free slot, then move experts from the most- to the least-loaded rank
//           while that lowers the straggler load (a joiner starts empty). Deterministic and
//           instant: the failure path uses it.
//   any planner policy (parallel/planner/planner.h; ilp by default for joins and drains): the
//           layer problems with the repaired current placement's rank mapping as `current`
//           (so the migration term prices every expert a rank gains), under a time limit; a
//           planner error falls back to repair.
//
// Thread safety: pure functions.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "parallel/expert_placement.h"

namespace sy::parallel::planner {

struct MembershipPlanOptions {
  std::string policy = "ilp";
  double time_limit_seconds = 0.2;  // per layer (planner policies)
  int slots_per_rank = 0;           // 0: ceil(E / ranks)
  int top_k = 2;
  double expert_bytes = 1;          // bytes of one expert's weights (migration prices)
};

// loads: [num_layers][num_experts] recent tokens per expert (any scale), or empty (even).
absl::StatusOr<ExpertPlacement> PlanMembership(const ExpertPlacement& current,
                                               const std::vector<int>& old_rank_of_new,
                                               const std::vector<std::vector<double>>& loads,
                                               const MembershipPlanOptions& options);

}  // namespace sy::parallel::planner
