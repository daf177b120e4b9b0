#include "parallel/planner/membership_plan.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "parallel/planner/planner.h"

namespace sy::parallel::planner {
namespace {

// One layer by the repair policy. held[j]: experts new rank j keeps from `current`.
std::vector<int32_t> RepairLayer(const std::vector<std::vector<int32_t>>& held,
                                 const std::vector<double>& load, int num_experts, int slots) {
  const int R = static_cast<int>(held.size());
  std::vector<std::vector<int32_t>> on(R);
  std::vector<int> replicas(num_experts, 0);
  for (int j = 0; j < R; ++j) {
    on[j] = held[j];
    std::sort(on[j].begin(), on[j].end());
    on[j].erase(std::unique(on[j].begin(), on[j].end()), on[j].end());
    for (int32_t e : on[j]) ++replicas[e];
  }
  // The least-loaded expert on rank j, among its extra replicas when `replica_only`; -1: none.
  auto victim = [&](int j, bool replica_only) {
    int pick = -1;
    for (size_t i = 0; i < on[j].size(); ++i) {
      const int32_t e = on[j][i];
      if (replica_only && replicas[e] < 2) continue;
      if (pick < 0 || load[e] < load[on[j][pick]]) pick = static_cast<int>(i);
    }
    return pick;
  };
  auto drop = [&](int j, int i) {
    --replicas[on[j][i]];
    on[j].erase(on[j].begin() + i);
  };
  // A rank over the new slot count drops extra replicas first, then its least-loaded experts
  // (which then need a new home).
  for (int j = 0; j < R; ++j)
    while (static_cast<int>(on[j].size()) > slots) {
      const int i = victim(j, true);
      drop(j, i >= 0 ? i : victim(j, false));
    }
  // Experts left without a replica need free slots: take them from extra replicas (there is
  // always room once every expert has one replica, as R * slots >= E).
  auto orphans_count = [&] {
    return static_cast<int>(std::count(replicas.begin(), replicas.end(), 0));
  };
  auto free_slots = [&] {
    int used = 0;
    for (const auto& o : on) used += static_cast<int>(o.size());
    return R * slots - used;
  };
  while (free_slots() < orphans_count()) {
    int bj = -1, bi = -1;
    for (int j = 0; j < R; ++j) {
      const int i = victim(j, true);
      if (i >= 0 && (bj < 0 || load[on[j][i]] < load[on[bj][bi]])) {
        bj = j;
        bi = i;
      }
    }
    if (bj < 0) break;  // cannot happen when R * slots >= E
    drop(bj, bi);
  }
  // Each expert's load is spread over its replicas.
  auto rank_load = [&](int j) {
    double s = 0;
    for (int32_t e : on[j]) s += load[e] / std::max(1, replicas[e]);
    return s;
  };
  std::vector<int32_t> orphans;
  for (int e = 0; e < num_experts; ++e)
    if (replicas[e] == 0) orphans.push_back(e);
  std::stable_sort(orphans.begin(), orphans.end(),
                   [&](int32_t a, int32_t b) { return load[a] > load[b]; });
  for (int32_t e : orphans) {
    int best = -1;
    for (int j = 0; j < R; ++j)
      if (static_cast<int>(on[j].size()) < slots && (best < 0 || rank_load(j) < rank_load(best)))
        best = j;
    if (best < 0) return {};  // no room (R * slots < E): the caller reports it
    on[best].push_back(e);
    replicas[e] = 1;
  }
  // Even out: move an expert (a sole replica) from the most- to the least-loaded rank that has
  // a free slot while the move lowers the larger of the two. Bounded by the expert count.
  for (int iter = 0; iter < num_experts * R; ++iter) {
    int hi = 0, lo = -1;
    for (int j = 0; j < R; ++j) {
      if (rank_load(j) > rank_load(hi)) hi = j;
      if (static_cast<int>(on[j].size()) < slots && (lo < 0 || rank_load(j) < rank_load(lo))) lo = j;
    }
    if (lo < 0 || lo == hi) break;
    const double h = rank_load(hi), l = rank_load(lo);
    int pick = -1;
    double best_max = h;
    for (size_t i = 0; i < on[hi].size(); ++i) {
      const int32_t e = on[hi][i];
      if (replicas[e] != 1) continue;
      const double m = std::max(h - load[e], l + load[e]);
      if (m < best_max - 1e-12) {
        best_max = m;
        pick = static_cast<int>(i);
      }
    }
    if (pick < 0) break;
    on[lo].push_back(on[hi][pick]);
    on[hi].erase(on[hi].begin() + pick);
  }
  std::vector<int32_t> p2l(static_cast<size_t>(R) * slots, -1);
  for (int j = 0; j < R; ++j)
    for (size_t i = 0; i < on[j].size(); ++i) p2l[j * slots + i] = on[j][i];
  return p2l;
}

}  // namespace

absl::StatusOr<ExpertPlacement> PlanMembership(const ExpertPlacement& current,
                                               const std::vector<int>& old_rank_of_new,
                                               const std::vector<std::vector<double>>& loads,
                                               const MembershipPlanOptions& options) {
  const int R = static_cast<int>(old_rank_of_new.size());
  const int E = current.num_experts(), L = current.num_layers();
  if (R < 1) return absl::InvalidArgumentError("membership plan: no rank");
  for (int o : old_rank_of_new)
    if (o < -1 || o >= current.world_size())
      return absl::InvalidArgumentError(absl::StrCat("membership plan: bad old rank ", o));
  if (!loads.empty() && static_cast<int>(loads.size()) != L)
    return absl::InvalidArgumentError("membership plan: loads for another layer count");
  const int S = std::max(options.slots_per_rank, (E + R - 1) / R);
  const int cS = current.slots_per_rank();

  std::vector<std::vector<double>> layer_loads(L);
  for (int l = 0; l < L; ++l) {
    std::vector<double> w(E, 1.0);
    if (!loads.empty() && static_cast<int>(loads[l].size()) == E) {
      const double total = std::accumulate(loads[l].begin(), loads[l].end(), 0.0);
      if (total > 0)
        for (int e = 0; e < E; ++e) w[e] = loads[l][e] / total * E + 1e-3;  // mean 1, never 0
    }
    layer_loads[l] = w;
  }
  // The current placement in the new rank order: what each staying rank holds.
  std::vector<std::vector<int32_t>> p2l(L);
  std::vector<std::vector<int32_t>> remapped(L, std::vector<int32_t>(static_cast<size_t>(R) * cS, -1));
  for (int l = 0; l < L; ++l) {
    std::vector<std::vector<int32_t>> held(R);
    for (int j = 0; j < R; ++j) {
      if (old_rank_of_new[j] < 0) continue;
      for (int s = 0; s < cS; ++s) {
        const int32_t e = current.expert_of(l, old_rank_of_new[j] * cS + s);
        remapped[l][j * cS + s] = e;
        if (e >= 0) held[j].push_back(e);
      }
    }
    p2l[l] = RepairLayer(held, layer_loads[l], E, S);
    if (p2l[l].empty())
      return absl::InternalError(absl::StrCat("membership plan: layer ", l, ": no room for every expert"));
  }
  SY_ASSIGN_OR_RETURN(ExpertPlacement repaired, ExpertPlacement::Create(R, S, E, p2l));
  if (options.policy == "repair" || R == 1) return repaired;

  PlannerOptions po;
  po.time_limit_seconds = options.time_limit_seconds;
  auto planner = CreatePlanner(options.policy, po);
  if (!planner.ok()) return planner.status();
  std::vector<PlacementProblem> problems(L);
  for (int l = 0; l < L; ++l) {
    PlacementProblem& p = problems[l];
    p.layer = l;
    p.world_size = R;
    p.slots_per_rank = S;
    p.num_experts = E;
    p.top_k = std::max(1, options.top_k);
    p.loads.resize(E);
    for (int e = 0; e < E; ++e) p.loads[e] = layer_loads[l][e] / E * p.top_k;
    p.current = remapped[l];
    p.current_slots_per_rank = cS;
    p.expert_bytes.assign(E, options.expert_bytes);
  }
  auto plan = (*planner)->Plan(problems);
  if (!plan.ok()) {
    SY_LOG(WARNING) << "membership plan: " << options.policy << " failed (" << plan.status()
                    << "); keeping the repaired placement";
    return repaired;
  }
  return std::move(plan->placement);
}

}  // namespace sy::parallel::planner
