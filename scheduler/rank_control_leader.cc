// The leader's side of the rank control plans (scheduler/rank_control.h): the
// DistributedStepExecutor members that queue a control plan on the pump thread.
#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "scheduler/distributed_executor.h"
#include "scheduler/rank_control.h"

namespace sy::scheduler {

std::shared_ptr<const parallel::ExpertPlacement> DistributedStepExecutor::placement() const {
  sy::MutexLock lock(&stats_mu_);
  return placement_;
}

absl::StatusOr<PlacementSwitchReport> DistributedStepExecutor::SwitchPlacement(
    const parallel::ExpertPlacement& requested, int layers_per_plan) {
  const auto t0 = std::chrono::steady_clock::now();
  const model::ModelConfig& c = model_->config();
  if (requested.num_layers() != c.num_layers || requested.num_experts() != c.num_experts)
    return absl::InvalidArgumentError(absl::StrCat(
        "placement: ", requested.num_layers(), " layers x ", requested.num_experts(),
        " experts; the model has ", c.num_layers, " x ", c.num_experts));
  if (layers_per_plan < 1) return absl::InvalidArgumentError("layers_per_plan must be >= 1");
  // Only this call and membership changes change placement_; one switch at a time, and no
  // membership change starts while it runs (a failure still may: the phases then see
  // another epoch and the switch ends ABORTED).
  sy::MutexLock switching(&switch_mu_);
  switching_placement_ = true;
  struct Clear {
    std::atomic<bool>* f;
    ~Clear() { *f = false; }
  } clear{&switching_placement_};
  while (pending_epoch_.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::shared_ptr<const parallel::ExpertPlacement> current;
  int64_t membership_epoch = 0;
  {
    sy::MutexLock lock(&stats_mu_);
    current = placement_;
    membership_epoch = view_.epoch;
  }
  if (requested.world_size() != current->world_size())
    return absl::InvalidArgumentError(absl::StrCat("placement: world_size is ", requested.world_size(),
                                                   ", the group has ", current->world_size(),
                                                   " ranks"));
  const int64_t epoch = current->epoch() + 1;
  const std::string json = requested.WithEpoch(epoch).ToJson();
  // Every rank, the leader included, uses the placement parsed from the same text.
  PlacementPayload payload;
  {
    SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement parsed, parallel::ExpertPlacement::FromJson(json));
    payload.placement = std::make_shared<const parallel::ExpertPlacement>(std::move(parsed));
  }
  // One control plan on the pump thread: broadcast it, run rank 0's part, all-gather counts.
  // A failure after the broadcast re-forms the group (ranks could disagree from then on).
  PlacementSwitchReport report;
  auto phase = [&](PlacementPhase ph, int first, int end) -> absl::Status {
    return RunControl([&, ph, first, end]() -> absl::Status {
      if (cur_.view.epoch != membership_epoch)
        return absl::AbortedError(absl::StrCat("the group changed (epoch ", cur_.view.epoch,
                                               ") during the placement switch; plan again"));
      if (cur_.world_size() > 1)
        SY_RETURN_IF_ERROR(Broadcast(PlanKind::kPlacement, EncodePlacementPayload(ph, first, end, json)));
      PlacementPayload mine = payload;
      mine.phase = ph;
      mine.first_layer = first;
      mine.end_layer = end;
      absl::StatusOr<PlacementSwitchCounts> own =
          PlacementPhaseOnRank(model_, cur_.dispatcher.get(), mine, 0);
      if (!own.ok()) SY_LOG(ERROR) << "rank 0: placement switch failed: " << own.status();
      std::pair<PlacementSwitchCounts, bool> sum{own.ok() ? *own : PlacementSwitchCounts{}, own.ok()};
      if (cur_.world_size() > 1) {
        SY_ASSIGN_OR_RETURN(sum, AllGatherSwitchCounts(cur_.comm.get(), sum.first, own.ok()));
      }
      if (!own.ok() || !sum.second) {
        // Ranks may disagree from here on: abort, so that the group re-forms.
        if (cur_.comm != nullptr) cur_.comm->Abort();
        return absl::UnavailableError(absl::StrCat(
            "a rank failed the placement switch", own.ok() ? "" : ": ", own.ok() ? "" : own.status().message()));
      }
      report.experts_gained += sum.first.experts_gained;
      report.experts_released += sum.first.experts_released;
      report.gained_bytes += sum.first.gained_bytes;
      report.released_bytes += sum.first.released_bytes;
      if (ph == PlacementPhase::kSwitch) {
        cur_.placement = payload.placement;
        parallel::EpochView view = cur_.view;
        view.placement_json = json;
        cur_.view = view;
        sy::MutexLock lock(&stats_mu_);
        placement_ = payload.placement;
        view_ = view;
      }
      return absl::OkStatus();
    });
  };
  // Prepare a few layers per plan; the pump runs waiting steps between plans.
  for (int first = 0; first < c.num_layers; first += layers_per_plan) {
    const int end = static_cast<int>(std::min<int64_t>(c.num_layers, first + layers_per_plan));
    SY_RETURN_IF_ERROR(phase(PlacementPhase::kPrepare, first, end));
  }
  SY_RETURN_IF_ERROR(phase(PlacementPhase::kSwitch, 0, static_cast<int>(c.num_layers)));
  report.epoch = epoch;
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  SY_LOG(INFO) << "placement epoch " << report.epoch << " in force on " << current->world_size()
               << " ranks: " << report.experts_gained << " experts gained ("
               << report.gained_bytes << " bytes), " << report.experts_released << " released, "
               << report.seconds << " s";
  return report;
}

absl::StatusOr<std::vector<std::string>> DistributedStepExecutor::GatherLoadTraces() {
  std::vector<std::string> all;
  SY_RETURN_IF_ERROR(RunControl([&]() -> absl::Status {
    if (cur_.world_size() == 1) {
      all = {""};
      return absl::OkStatus();
    }
    SY_RETURN_IF_ERROR(Broadcast(PlanKind::kLoadStats, {}));
    return GatherStringsToLeader(cur_.comm.get(), "", &all);
  }));
  return all;
}

}  // namespace sy::scheduler
