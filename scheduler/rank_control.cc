#include "scheduler/rank_control.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"

namespace sy::scheduler {

std::vector<int32_t> PackBytes(const std::string& bytes) {
  std::vector<int32_t> words(1 + (bytes.size() + 3) / 4, 0);
  words[0] = static_cast<int32_t>(bytes.size());
  if (!bytes.empty()) std::memcpy(words.data() + 1, bytes.data(), bytes.size());
  return words;
}

absl::StatusOr<std::string> UnpackBytes(std::span<const int32_t> words) {
  if (words.empty()) return absl::InvalidArgumentError("control payload: empty");
  const int64_t n = words[0];
  if (n < 0 || (n + 3) / 4 != static_cast<int64_t>(words.size()) - 1)
    return absl::InvalidArgumentError(absl::StrCat("control payload: bad byte length ", n));
  std::string s(static_cast<size_t>(n), '\0');
  if (n > 0) std::memcpy(s.data(), words.data() + 1, static_cast<size_t>(n));
  return s;
}

std::vector<int32_t> EncodePlacementPayload(PlacementPhase phase, int first_layer, int end_layer,
                                            const std::string& json) {
  std::vector<int32_t> words = {static_cast<int32_t>(phase), first_layer, end_layer};
  const std::vector<int32_t> packed = PackBytes(json);
  words.insert(words.end(), packed.begin(), packed.end());
  return words;
}

absl::StatusOr<PlacementPayload> DecodePlacementPayload(std::span<const int32_t> words) {
  if (words.size() < 4 || words[0] < 0 || words[0] > 1)
    return absl::InvalidArgumentError("placement control plan: bad header");
  PlacementPayload p;
  p.phase = static_cast<PlacementPhase>(words[0]);
  p.first_layer = words[1];
  p.end_layer = words[2];
  SY_ASSIGN_OR_RETURN(std::string json, UnpackBytes(words.subspan(3)));
  SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement placement, parallel::ExpertPlacement::FromJson(json));
  if (p.first_layer < 0 || p.end_layer < p.first_layer || p.end_layer > placement.num_layers())
    return absl::InvalidArgumentError("placement control plan: bad layer range");
  p.placement = std::make_shared<const parallel::ExpertPlacement>(std::move(placement));
  return p;
}

absl::StatusOr<PlacementSwitchCounts> PlacementPhaseOnRank(
    model::MoeModel* model, parallel::ExpertParallelDispatcher* dispatcher,
    const PlacementPayload& payload, int rank) {
  std::vector<std::vector<int32_t>> wanted = parallel::ExpertsOfRank(*payload.placement, rank);
  PlacementSwitchCounts c;
  std::vector<std::vector<int32_t>> before(wanted.size());
  for (size_t l = 0; l < wanted.size(); ++l) before[l] = model->LoadedExperts(static_cast<int>(l));
  if (payload.phase == PlacementPhase::kPrepare) {
    std::vector<std::vector<int32_t>> some(wanted.size());
    for (int l = payload.first_layer; l < payload.end_layer; ++l) some[l] = wanted[l];
    SY_ASSIGN_OR_RETURN(c.gained_bytes, model->AddExperts(some));
  } else {
    SY_ASSIGN_OR_RETURN(c.gained_bytes, model->AddExperts(wanted));
    if (dispatcher != nullptr) SY_RETURN_IF_ERROR(dispatcher->SetPlacement(payload.placement));
    SY_ASSIGN_OR_RETURN(c.released_bytes, model->RetainExperts(wanted));
  }
  for (size_t l = 0; l < wanted.size(); ++l) {
    const std::vector<int32_t> after = model->LoadedExperts(static_cast<int>(l));
    for (int32_t e : after)
      if (!std::binary_search(before[l].begin(), before[l].end(), e)) ++c.experts_gained;
    for (int32_t e : before[l])
      if (!std::binary_search(after.begin(), after.end(), e)) ++c.experts_released;
  }
  return c;
}

absl::StatusOr<std::pair<PlacementSwitchCounts, bool>> AllGatherSwitchCounts(
    parallel::Communicator* comm, const PlacementSwitchCounts& own, bool ok) {
  const int world = comm->world_size();
  const int64_t mine[5] = {own.experts_gained, own.experts_released, own.gained_bytes,
                           own.released_bytes, ok ? 1 : 0};
  std::vector<int64_t> all(5 * world, 0);
  SY_RETURN_IF_ERROR(comm->AllGather(mine, sizeof(mine), all.data()));
  PlacementSwitchCounts sum;
  bool all_ok = true;
  for (int p = 0; p < world; ++p) {
    sum.experts_gained += all[5 * p];
    sum.experts_released += all[5 * p + 1];
    sum.gained_bytes += all[5 * p + 2];
    sum.released_bytes += all[5 * p + 3];
    all_ok = all_ok && all[5 * p + 4] == 1;
  }
  return std::make_pair(sum, all_ok);
}

absl::Status GatherStringsToLeader(parallel::Communicator* comm, const std::string& own,
                                   std::vector<std::string>* all) {
  const int world = comm->world_size(), rank = comm->rank();
  const int64_t n = static_cast<int64_t>(own.size());
  std::vector<int64_t> sizes(world, 0);
  SY_RETURN_IF_ERROR(comm->AllGather(&n, sizeof(n), sizes.data()));
  std::vector<int64_t> send_counts(world, 0), zeros(world, 0), recv_counts(world, 0),
      recv_offsets(world, 0);
  send_counts[0] = n;
  int64_t total = 0;
  if (rank == 0) {
    for (int p = 0; p < world; ++p) {
      recv_counts[p] = sizes[p];
      recv_offsets[p] = total;
      total += sizes[p];
    }
  }
  std::string recv(static_cast<size_t>(total), '\0');
  char dummy = 0;
  SY_RETURN_IF_ERROR(comm->AllToAllV(own.empty() ? &dummy : own.data(), send_counts, zeros,
                                     recv.empty() ? &dummy : recv.data(), recv_counts,
                                     recv_offsets));
  if (rank == 0 && all != nullptr) {
    all->clear();
    for (int p = 0; p < world; ++p) all->push_back(recv.substr(recv_offsets[p], recv_counts[p]));
  }
  return absl::OkStatus();
}

absl::Status HandleControlPlan(parallel::Communicator* comm, model::MoeModel* model,
                               const parallel::ExpertLoadRecorder* recorder,
                               const DecodedPlan& plan) {
  const int rank = comm->rank();
  if (plan.kind == PlanKind::kLoadStats) {
    const std::string json = recorder != nullptr ? parallel::TraceToJson(recorder->Snapshot()) : "";
    return sy::Annotate(GatherStringsToLeader(comm, json, nullptr),
                        absl::StrCat("rank ", rank, ": sending load statistics"));
  }
  if (plan.kind != PlanKind::kPlacement)
    return absl::InvalidArgumentError("not a control plan");
  absl::StatusOr<PlacementSwitchCounts> counts = absl::InternalError("no placement");
  absl::StatusOr<PlacementPayload> payload = DecodePlacementPayload(plan.payload);
  if (payload.ok()) {
    auto* ep = dynamic_cast<parallel::ExpertParallelDispatcher*>(model->dispatcher());
    counts = PlacementPhaseOnRank(model, ep, *payload, rank);
  } else {
    counts = payload.status();
  }
  if (!counts.ok()) SY_LOG(ERROR) << "rank " << rank << ": placement switch failed: " << counts.status();
  SY_ASSIGN_OR_RETURN(auto sum, AllGatherSwitchCounts(
                                    comm, counts.ok() ? *counts : PlacementSwitchCounts{},
                                    counts.ok()));
  if (!counts.ok()) return sy::Annotate(counts.status(), absl::StrCat("rank ", rank, ": placement switch"));
  if (!sum.second)
    return absl::AbortedError(absl::StrCat("rank ", rank, ": another rank failed the placement switch"));
  return absl::OkStatus();
}

parallel::ExpertLoadOptions LoadOptionsForModel(const model::MoeModel& model, int window_steps,
                                                int max_paths) {
  parallel::ExpertLoadOptions o;
  o.layer_ids = model.MoeLayerIds();
  o.num_layers = static_cast<int>(o.layer_ids.size());
  o.num_experts = static_cast<int>(model.config().num_experts);
  o.top_k = static_cast<int>(model.config().num_experts_per_tok);
  o.window_steps = window_steps;
  o.max_paths = max_paths;
  o.model = model.config().model_type;
  return o;
}

absl::StatusOr<parallel::planner::RoutingTrace> MergeTraces(
    const std::vector<parallel::planner::RoutingTrace>& traces, int max_paths) {
  parallel::planner::RoutingTrace out;
  if (traces.empty()) return out;
  out = traces[0];
  for (size_t i = 1; i < traces.size(); ++i) {
    const auto& t = traces[i];
    if (t.num_layers != out.num_layers || t.num_experts != out.num_experts || t.top_k != out.top_k)
      return absl::InvalidArgumentError(absl::StrCat(
          "merging load traces: rank trace ", i, " has ", t.num_layers, " layers x ",
          t.num_experts, " experts, top-", t.top_k, "; rank 0 has ", out.num_layers, " x ",
          out.num_experts, ", top-", out.top_k));
    for (int l = 0; l < out.num_layers; ++l)
      for (int e = 0; e < out.num_experts; ++e) out.expert_counts[l][e] += t.expert_counts[l][e];
    out.num_tokens += t.num_tokens;
    out.token_paths.insert(out.token_paths.end(), t.token_paths.begin(), t.token_paths.end());
  }
  if (max_paths > 0 && static_cast<int64_t>(out.token_paths.size()) > max_paths)
    out.token_paths.erase(out.token_paths.begin(), out.token_paths.end() - max_paths);
  return out;
}

}  // namespace sy::scheduler
