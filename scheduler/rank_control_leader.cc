// The leader's side of the rank control plans (scheduler/rank_control.h): the
// DistributedStepExecutor members that queue a control plan on the pump thread.
#include <algorithm>
#include <chrono>
#include <future>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "scheduler/distributed_executor.h"
#include "scheduler/rank_control.h"

namespace sy::scheduler {

std::shared_ptr<const parallel::ExpertPlacement> DistributedStepExecutor::placement() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return placement_;
}

absl::Status DistributedStepExecutor::RunControl(std::function<absl::Status()> fn) {
  auto done = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> result = done->get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::UnavailableError("the rank group is shutting down");
    controls_.push_back([this, fn = std::move(fn), done](bool run) {
      if (!run) {
        done->set_value(absl::UnavailableError("the rank group is shutting down"));
        return;
      }
      if (broken_.load()) {
        done->set_value(absl::UnavailableError("the rank group is down"));
        return;
      }
      done->set_value(fn());
    });
    cv_.notify_all();
  }
  return result.get();
}

absl::StatusOr<PlacementSwitchReport> DistributedStepExecutor::SwitchPlacement(
    const parallel::ExpertPlacement& requested, int layers_per_plan) {
  const auto t0 = std::chrono::steady_clock::now();
  const model::ModelConfig& c = model_->config();
  if (requested.num_ranks() != comm_->world_size())
    return absl::InvalidArgumentError(absl::StrCat("placement: num_ranks is ", requested.num_ranks(),
                                                   ", the group has ", comm_->world_size(), " ranks"));
  if (requested.num_layers() != c.num_layers || requested.num_experts() != c.num_experts)
    return absl::InvalidArgumentError(absl::StrCat(
        "placement: ", requested.num_layers(), " layers x ", requested.num_experts(),
        " experts; the model has ", c.num_layers, " x ", c.num_experts));
  if (layers_per_plan < 1) return absl::InvalidArgumentError("layers_per_plan must be >= 1");
  // Only this call changes placement_, and only one runs at a time (switch_mu_).
  std::lock_guard<std::mutex> switching(switch_mu_);
  const int64_t epoch = placement()->epoch() + 1;
  const std::string json = requested.WithEpoch(epoch).ToJson();
  // Every rank, the leader included, uses the placement parsed from the same text.
  PlacementPayload payload;
  {
    SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement parsed, parallel::ExpertPlacement::FromJson(json));
    payload.placement = std::make_shared<const parallel::ExpertPlacement>(std::move(parsed));
  }
  // One control plan on the pump thread: broadcast it, run rank 0's part, all-gather counts.
  // A failure after the broadcast fails the group (ranks could disagree from then on).
  PlacementSwitchReport report;
  auto phase = [&](PlacementPhase ph, int first, int end) -> absl::Status {
    return RunControl([&, ph, first, end]() -> absl::Status {
      EncodeControlPlan(PlanKind::kPlacement, EncodePlacementPayload(ph, first, end, json), &words_);
      int64_t n = static_cast<int64_t>(words_.size());
      absl::Status sent = comm_->Broadcast(&n, sizeof(n), 0);
      if (sent.ok()) sent = comm_->Broadcast(words_.data(), n * sizeof(int32_t), 0);
      if (!sent.ok()) {
        const absl::Status failed = AsUnavailablePlacement(sent);
        Fail(failed);
        return failed;
      }
      PlacementPayload mine = payload;
      mine.phase = ph;
      mine.first_layer = first;
      mine.end_layer = end;
      absl::StatusOr<PlacementSwitchCounts> own =
          PlacementPhaseOnRank(model_, dispatcher_.get(), mine, 0);
      if (!own.ok()) SY_LOG(ERROR) << "rank 0: placement switch failed: " << own.status();
      auto sum = AllGatherSwitchCounts(comm_, own.ok() ? *own : PlacementSwitchCounts{}, own.ok());
      absl::Status bad = !sum.ok() ? sum.status()
                         : !own.ok() ? own.status()
                         : !sum->second ? absl::InternalError("a rank failed the placement switch")
                                        : absl::OkStatus();
      if (!bad.ok()) {
        const absl::Status failed = AsUnavailablePlacement(bad);
        Fail(failed);
        return failed;
      }
      report.experts_gained += sum->first.experts_gained;
      report.experts_released += sum->first.experts_released;
      report.gained_bytes += sum->first.gained_bytes;
      report.released_bytes += sum->first.released_bytes;
      if (ph == PlacementPhase::kSwitch) {
        std::lock_guard<std::mutex> lock(stats_mu_);
        placement_ = payload.placement;
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
  SY_LOG(INFO) << "placement epoch " << report.epoch << " in force on " << comm_->world_size()
               << " ranks: " << report.experts_gained << " experts gained ("
               << report.gained_bytes << " bytes), " << report.experts_released << " released, "
               << report.seconds << " s";
  return report;
}

absl::StatusOr<std::vector<std::string>> DistributedStepExecutor::GatherLoadTraces() {
  std::vector<std::string> all;
  SY_RETURN_IF_ERROR(RunControl([&]() -> absl::Status {
    EncodeControlPlan(PlanKind::kLoadStats, {}, &words_);
    int64_t n = static_cast<int64_t>(words_.size());
    absl::Status s = comm_->Broadcast(&n, sizeof(n), 0);
    if (s.ok()) s = comm_->Broadcast(words_.data(), n * sizeof(int32_t), 0);
    if (s.ok()) s = GatherStringsToLeader(comm_, "", &all);
    if (!s.ok()) {
      const absl::Status failed = AsUnavailablePlacement(s);
      Fail(failed);
      return failed;
    }
    return absl::OkStatus();
  }));
  return all;
}

}  // namespace sy::scheduler
