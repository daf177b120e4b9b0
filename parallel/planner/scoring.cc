#include "parallel/planner/scoring.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"

namespace sy::parallel::planner {

LayerScore ScoreLayer(const ExpertPlacement& placement, int layer, const LayerStats& stats) {
  const int R = placement.world_size(), E = placement.num_experts();
  // rank_share[e][r]: the share of e's tokens served on rank r.
  std::vector<std::vector<std::pair<int, double>>> rank_share(E);
  std::vector<double> rank_load(R, 0.0);
  for (int s = 0; s < placement.num_slots(); ++s) {
    const int32_t e = placement.expert_of(layer, s);
    if (e < 0) continue;
    const int r = placement.rank_of_slot(s);
    const double share = placement.share_of(layer, s);
    rank_load[r] += stats.loads[e] * share;
    auto& v = rank_share[e];
    auto it = std::find_if(v.begin(), v.end(), [&](const auto& x) { return x.first == r; });
    if (it == v.end()) {
      v.push_back({r, share});
    } else {
      it->second += share;
    }
  }
  LayerScore score;
  score.max_load = *std::max_element(rank_load.begin(), rank_load.end());
  for (double l : rank_load) score.mean_load += l;
  score.mean_load /= R;
  if (stats.paths.empty()) return score;

  double total = 0;
  std::vector<int> ranks;  // ranks holding any of the token's experts
  for (const auto& path : stats.paths) {
    ranks.clear();
    for (int32_t e : path) {
      for (const auto& [r, sh] : rank_share[e]) {
        if (std::find(ranks.begin(), ranks.end(), r) == ranks.end()) ranks.push_back(r);
      }
    }
    // Expected distinct remote ranks for home rank h; a home outside `ranks` has every expert
    // remote, and all such homes give the same value.
    auto remote_ranks = [&](int h) {
      double sum = 0;
      for (int r : ranks) {
        if (r == h) continue;
        double none = 1.0;  // probability that no expert of the token is sent to r
        for (int32_t e : path) {
          const auto& v = rank_share[e];
          bool local = false;
          double p = 0;
          for (const auto& [rr, sh] : v) {
            if (rr == h) local = true;
            if (rr == r) p = sh;
          }
          if (!local) none *= 1.0 - p;
        }
        sum += 1.0 - none;
      }
      return sum;
    };
    double t = 0;
    for (int r : ranks) t += remote_ranks(r);
    if (static_cast<int>(ranks.size()) < R) t += (R - ranks.size()) * remote_ranks(-1);
    total += t / R;
  }
  score.traffic_per_token = total / stats.paths.size();
  return score;
}

absl::StatusOr<PlacementScore> ScorePlacement(const ExpertPlacement& placement,
                                              const RoutingTrace& trace) {
  if (placement.num_layers() != trace.num_layers ||
      placement.num_experts() != trace.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scoring: placement has ", placement.num_layers(), " layers x ",
        placement.num_experts(), " experts; trace ", trace.name, " has ", trace.num_layers,
        " x ", trace.num_experts));
  }
  PlacementScore out;
  double sum_max = 0, sum_mean = 0, sum_traffic = 0;
  for (int l = 0; l < trace.num_layers; ++l) {
    const LayerStats st = ComputeLayerStats(trace, l);
    out.layers.push_back(ScoreLayer(placement, l, st));
    sum_max += out.layers.back().max_load;
    sum_mean += out.layers.back().mean_load;
    sum_traffic += out.layers.back().traffic_per_token;
  }
  out.balancedness = sum_max > 0 ? sum_mean / sum_max : 1.0;
  out.max_over_mean = sum_mean > 0 ? sum_max / sum_mean : 1.0;
  if (trace.has_paths()) out.traffic_per_token = sum_traffic / trace.num_layers;
  return out;
}

MoveCount CountMoves(const ExpertPlacement& from, const ExpertPlacement& to,
                     double expert_bytes) {
  SY_CHECK_EQ(from.num_layers(), to.num_layers());
  MoveCount m;
  for (int l = 0; l < to.num_layers(); ++l) {
    for (int r = 0; r < to.world_size(); ++r) {
      std::vector<int32_t> had, has;
      if (r < from.world_size()) {
        for (int s = r * from.slots_per_rank(); s < (r + 1) * from.slots_per_rank(); ++s) {
          if (from.expert_of(l, s) >= 0) had.push_back(from.expert_of(l, s));
        }
      }
      for (int s = r * to.slots_per_rank(); s < (r + 1) * to.slots_per_rank(); ++s) {
        const int32_t e = to.expert_of(l, s);
        if (e < 0 || std::find(has.begin(), has.end(), e) != has.end()) continue;
        has.push_back(e);
        if (std::find(had.begin(), had.end(), e) == had.end()) ++m.experts;
      }
    }
  }
  m.bytes = static_cast<double>(m.experts) * expert_bytes;
  return m;
}

}  // namespace sy::parallel::planner
