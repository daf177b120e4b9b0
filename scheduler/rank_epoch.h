// RankEpoch: what one rank serves a membership epoch with (parallel/membership.h): the
// epoch's view, this rank's comm rank in it, the expert placement, the communicator (none
// when the leader is alone) and the expert-parallel dispatcher over it. Shared by the leader
// (scheduler/distributed_executor.h) and every other rank (scheduler/rank_runner.h), which
// enter epochs the same way:
//   1. PrepareExperts: map the experts the rank gains under the new placement (the checkpoint
//      is memory-mapped: cheap, and harmless while the old epoch serves: nothing routes to
//      them yet);
//   2. the communicator: built on a BackgroundComm thread while the old epoch serves (a join
//      or a drain), or at once (a re-form, when nothing serves);
//   3. Enter: the dispatcher over the new communicator replaces the model's, and the experts
//      the rank no longer holds are dropped.
//
// Thread safety: RankEpoch and the functions belong to the rank's serving thread;
// BackgroundComm builds on its own thread and is polled (done) from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "absl/status/statusor.h"
#include "model/moe_model.h"
#include "parallel/communicator.h"
#include "parallel/ep_dispatch.h"
#include "parallel/expert_placement.h"
#include "parallel/membership.h"
#include "parallel/rendezvous_store.h"

namespace sy::scheduler {

struct RankEpoch {
  parallel::EpochView view;
  int comm_rank = 0;
  std::shared_ptr<const parallel::ExpertPlacement> placement;
  std::unique_ptr<parallel::Communicator> comm;  // null when world_size() == 1
  std::unique_ptr<parallel::ExpertParallelDispatcher> dispatcher;

  int world_size() const { return view.world_size(); }
};

// The view's placement, checked against the view's size and the model.
absl::StatusOr<std::shared_ptr<const parallel::ExpertPlacement>> PlacementOfView(
    const parallel::EpochView& view, const model::ModelConfig& config);

// Maps the experts `comm_rank` holds under `placement` that the model lacks; their bytes.
absl::StatusOr<int64_t> PrepareExperts(model::MoeModel* model,
                                       const parallel::ExpertPlacement& placement, int comm_rank);

// Switches `model` to `epoch`: a dispatcher over epoch->comm (the model's single-rank one when
// the rank is alone), then drops the experts the rank no longer holds (their bytes).
absl::StatusOr<int64_t> Enter(model::MoeModel* model, RankEpoch* epoch,
                              const parallel::EpDispatchOptions& dispatch = {});

// Builds one rank's communicator of a new epoch on a thread of its own, and on success sets
// the rank's ready key (parallel::ReadyKey) in `store` (may be null), so that the leader knows
// when every rank of the epoch is connected.
class BackgroundComm {
 public:
  BackgroundComm(parallel::CommunicatorFactory factory, parallel::EpochView view, int comm_rank,
                 parallel::RendezvousStore* store);
  ~BackgroundComm();  // waits for the build (it ends within the collective time-out)
  bool done() const { return done_.load(); }
  // Waits for the build.
  absl::StatusOr<std::unique_ptr<parallel::Communicator>> Take();

 private:
  absl::StatusOr<std::unique_ptr<parallel::Communicator>> result_ =
      absl::UnavailableError("not built");
  std::atomic<bool> done_{false};
  std::thread thread_;
};

// Builds the communicator of `view` for `comm_rank` on the calling thread (none when alone)
// and sets the ready key.
absl::StatusOr<std::unique_ptr<parallel::Communicator>> BuildComm(
    const parallel::CommunicatorFactory& factory, const parallel::EpochView& view, int comm_rank,
    parallel::RendezvousStore* store);

}  // namespace sy::scheduler
