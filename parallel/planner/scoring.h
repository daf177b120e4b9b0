// Scoring a placement on a routing trace (usually held-out data it was not fitted on): the
// figures `switchyard plan` and bench/placement_eval_bench print.
//
// Load: rank r's load = sum over its slots of load[expert] * share(slot) (slot shares when
// the plan has them, else an even split over the expert's replicas). A layer's step time is
// set by its busiest rank and layers run one after another, so over layers
//   balancedness = sum_l mean_rank_load_l / sum_l max_rank_load_l   (1 = perfect)
//   max_over_mean = 1 / balancedness.
// Traffic model (data-parallel attention): each token lives on a home rank, uniformly random
// over the R ranks (computed exactly by averaging over every home rank). Each of its k
// experts is served by the replica on the home rank when there is one (no traffic), else by
// a replica drawn by share; the token travels once to every distinct remote rank it needs
// (one copy per destination rank, as DeepEP dispatches). traffic_per_token = expected
// remote copies per token per MoE layer (the combine sends the same number back).
//
// Thread safety: pure functions.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/trace.h"

namespace sy::parallel::planner {

struct LayerScore {
  double max_load = 0;   // assignments per token on the busiest rank
  double mean_load = 0;  // assignments per token per rank
  double traffic_per_token = -1;  // -1: the trace has no token paths
};

struct PlacementScore {
  double balancedness = 0;
  double max_over_mean = 0;
  double traffic_per_token = -1;  // mean over layers; -1 without token paths
  std::vector<LayerScore> layers;
};

LayerScore ScoreLayer(const ExpertPlacement& placement, int layer, const LayerStats& stats);

// InvalidArgument when the placement's layers or experts differ from the trace's.
absl::StatusOr<PlacementScore> ScorePlacement(const ExpertPlacement& placement,
                                              const RoutingTrace& trace);

struct MoveCount {
  int64_t experts = 0;  // (layer, rank, expert) copies a rank gains
  double bytes = 0;
};
// What applying `to` after `from` copies: for each layer and rank, the experts it holds in
// `to` but not in `from` (ranks beyond `from`'s count hold nothing). Layers must match.
MoveCount CountMoves(const ExpertPlacement& from, const ExpertPlacement& to,
                     double expert_bytes);

}  // namespace sy::parallel::planner
