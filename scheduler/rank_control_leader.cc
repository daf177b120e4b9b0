// The leader's side of the rank control plans (scheduler/rank_control.h): the
// DistributedStepExecutor members that queue a control plan on the pump thread.
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
    const parallel::ExpertPlacement& requested) {
  const auto t0 = std::chrono::steady_clock::now();
  const model::ModelConfig& c = model_->config();
  if (requested.num_ranks() != comm_->world_size())
    return absl::InvalidArgumentError(absl::StrCat("placement: num_ranks is ", requested.num_ranks(),
                                                   ", the group has ", comm_->world_size(), " ranks"));
  if (requested.num_layers() != c.num_layers || requested.num_experts() != c.num_experts)
    return absl::InvalidArgumentError(absl::StrCat(
        "placement: ", requested.num_layers(), " layers x ", requested.num_experts(),
        " experts; the model has ", c.num_layers, " x ", c.num_experts));
  PlacementSwitchReport report;
  absl::Status s = RunControl([&]() -> absl::Status {
    // On the pump thread: no step runs now, and placement_ changes only here.
    const int64_t epoch = placement()->epoch() + 1;
    const std::string json = requested.WithEpoch(epoch).ToJson();
    // Every rank, the leader included, switches to the placement parsed from the same text.
    SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement parsed, parallel::ExpertPlacement::FromJson(json));
    auto next = std::make_shared<const parallel::ExpertPlacement>(std::move(parsed));
    EncodeControlPlan(PlanKind::kPlacement, PackBytes(json), &words_);
    int64_t n = static_cast<int64_t>(words_.size());
    absl::Status sent = comm_->Broadcast(&n, sizeof(n), 0);
    if (sent.ok()) sent = comm_->Broadcast(words_.data(), n * sizeof(int32_t), 0);
    if (!sent.ok()) {
      Fail(sent);
      return sent;
    }
    absl::StatusOr<PlacementSwitchCounts> own = SwitchPlacementOnRank(model_, dispatcher_.get(), next, 0);
    if (!own.ok()) SY_LOG(ERROR) << "rank 0: placement switch failed: " << own.status();
    auto sum = AllGatherSwitchCounts(comm_, own.ok() ? *own : PlacementSwitchCounts{}, own.ok());
    absl::Status bad = !sum.ok() ? sum.status()
                       : !own.ok() ? own.status()
                       : !sum->second ? absl::InternalError("a rank failed the placement switch")
                                      : absl::OkStatus();
    if (!bad.ok()) {  // ranks may now disagree on the placement: the group cannot go on
      const absl::Status failed = AsUnavailablePlacement(bad);
      Fail(failed);
      return failed;
    }
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      placement_ = next;
    }
    report.epoch = epoch;
    report.experts_gained = sum->first.experts_gained;
    report.experts_released = sum->first.experts_released;
    report.gained_bytes = sum->first.gained_bytes;
    report.released_bytes = sum->first.released_bytes;
    return absl::OkStatus();
  });
  SY_RETURN_IF_ERROR(s);
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
