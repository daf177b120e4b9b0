// Rank control: the between-step operations (live expert placement and load
// statistics) that travel through the step protocol (scheduler/step_plan.h control kinds),
// so that every rank takes them at the same step boundary.
//
//   kPlacement, in two phases, each a control plan carrying [phase, first layer, end layer,
//     the placement's JSON packed into words]:
//     * prepare (a few layers per plan, steps run in between): every rank maps the experts
//       of those layers it gains from the checkpoint (MoeModel::AddExperts: the file is
//       already memory-mapped; the pages are read ahead) — harmless before the switch, as
//       the dispatcher routes nothing to them yet;
//     * switch (one plan): every rank switches its ExpertParallelDispatcher to the new
//       placement and drops the experts it no longer holds (MoeModel::RetainExperts).
//     After each plan all ranks all-gather their counts (gained, released, bytes, ok). The
//     plan stream is one ordered broadcast, so every rank switches between the same two
//     steps; the dispatcher's epoch check in its first exchange catches any that did not.
//   kLoadStats: every rank sends its ExpertLoadRecorder's window (trace JSON) to rank 0,
//     which merges them (MergeTraces): the leader alone sees only its own sequences' tokens.
//
// Called by RankRunner (every rank but 0) and DistributedStepExecutor (rank 0, pump thread).
// Thread safety: each function runs on the calling rank's engine/pump thread.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/moe_model.h"
#include "parallel/communicator.h"
#include "parallel/ep_dispatch.h"
#include "parallel/expert_load.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/trace.h"
#include "scheduler/step_plan.h"

namespace sy::scheduler {

// Per rank, or summed over ranks.
struct PlacementSwitchCounts {
  int64_t experts_gained = 0;    // (layer, expert) pairs newly mapped
  int64_t experts_released = 0;  // (layer, expert) pairs dropped after the switch
  int64_t gained_bytes = 0;      // weight bytes of the experts gained
  int64_t released_bytes = 0;
};

// Bytes <-> control payload words: [byte length, bytes packed 4 per word].
std::vector<int32_t> PackBytes(const std::string& bytes);
absl::StatusOr<std::string> UnpackBytes(std::span<const int32_t> words);

enum class PlacementPhase : int32_t { kPrepare = 0, kSwitch = 1 };

// kPlacement payload: [phase, first_layer, end_layer, PackBytes(json)...].
std::vector<int32_t> EncodePlacementPayload(PlacementPhase phase, int first_layer, int end_layer,
                                            const std::string& json);
struct PlacementPayload {
  PlacementPhase phase = PlacementPhase::kPrepare;
  int first_layer = 0, end_layer = 0;
  std::shared_ptr<const parallel::ExpertPlacement> placement;
};
absl::StatusOr<PlacementPayload> DecodePlacementPayload(std::span<const int32_t> words);

// One rank's part of a phase. kPrepare: AddExperts for layers [first_layer, end_layer) (gained
// counts). kSwitch: AddExperts(all layers, a no-op after the prepares) ->
// dispatcher->SetPlacement -> RetainExperts (released counts). dispatcher may be null (a
// model without expert parallelism: only the weights change).
absl::StatusOr<PlacementSwitchCounts> PlacementPhaseOnRank(
    model::MoeModel* model, parallel::ExpertParallelDispatcher* dispatcher,
    const PlacementPayload& payload, int rank);

// Collective: every rank contributes its counts and whether its switch worked; every rank
// gets the sum and whether all worked (false: some rank failed; the group must not step on).
absl::StatusOr<std::pair<PlacementSwitchCounts, bool>> AllGatherSwitchCounts(
    parallel::Communicator* comm, const PlacementSwitchCounts& own, bool ok);

// Collective: rank p sends `own`; rank 0 gets all of them in rank order in *all.
absl::Status GatherStringsToLeader(parallel::Communicator* comm, const std::string& own,
                                   std::vector<std::string>* all);

// Handles a control plan on a rank other than 0 (RankRunner). recorder may be null (the
// rank then sends an empty trace).
absl::Status HandleControlPlan(parallel::Communicator* comm, model::MoeModel* model,
                               const parallel::ExpertLoadRecorder* recorder,
                               const DecodedPlan& plan);

// The recorder options that fit `model` (its MoE layers, experts, top-k).
parallel::ExpertLoadOptions LoadOptionsForModel(const model::MoeModel& model,
                                                int window_steps = 1024, int max_paths = 4096);

// Sums the ranks' windows: counts and tokens add up, paths are concatenated (the last
// `max_paths`; 0 keeps all). InvalidArgument when the shapes differ. Empty input: an empty
// trace.
absl::StatusOr<parallel::planner::RoutingTrace> MergeTraces(
    const std::vector<parallel::planner::RoutingTrace>& traces, int max_paths = 0);

}  // namespace sy::scheduler
