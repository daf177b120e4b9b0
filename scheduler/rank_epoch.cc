#include "scheduler/rank_epoch.h"

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"

namespace sy::scheduler {

absl::StatusOr<std::shared_ptr<const parallel::ExpertPlacement>> PlacementOfView(
    const parallel::EpochView& view, const model::ModelConfig& config) {
  SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement p,
                      parallel::ExpertPlacement::FromJson(view.placement_json));
  if (p.world_size() != view.world_size())
    return absl::InvalidArgumentError(absl::StrCat("epoch ", view.epoch, ": the placement has ",
                                                   p.world_size(), " ranks, the epoch ",
                                                   view.world_size()));
  if (p.num_layers() != config.num_layers || p.num_experts() != config.num_experts)
    return absl::InvalidArgumentError(absl::StrCat(
        "epoch ", view.epoch, ": the placement has ", p.num_layers(), " layers x ",
        p.num_experts(), " experts; the model ", config.num_layers, " x ", config.num_experts));
  return std::make_shared<const parallel::ExpertPlacement>(std::move(p));
}

absl::StatusOr<int64_t> PrepareExperts(model::MoeModel* model,
                                       const parallel::ExpertPlacement& placement, int comm_rank) {
  return model->AddExperts(parallel::ExpertsOfRank(placement, comm_rank));
}

absl::StatusOr<int64_t> Enter(model::MoeModel* model, RankEpoch* epoch,
                              const parallel::EpDispatchOptions& dispatch) {
  const std::vector<std::vector<int32_t>> mine =
      parallel::ExpertsOfRank(*epoch->placement, epoch->comm_rank);
  SY_RETURN_IF_ERROR(model->AddExperts(mine).status());  // a no-op after PrepareExperts
  if (epoch->world_size() > 1) {
    if (epoch->comm == nullptr)
      return absl::InternalError(absl::StrCat("epoch ", epoch->view.epoch, ": no communicator"));
    SY_ASSIGN_OR_RETURN(epoch->dispatcher, parallel::MakeExpertParallelDispatcher(
                                               epoch->comm.get(), epoch->placement, dispatch));
    model->SetDispatcher(epoch->dispatcher.get());
  } else {
    epoch->dispatcher.reset();
    model->SetDispatcher(nullptr);  // alone: the single-rank dispatcher, every expert here
  }
  return model->RetainExperts(mine);
}

absl::StatusOr<std::unique_ptr<parallel::Communicator>> BuildComm(
    const parallel::CommunicatorFactory& factory, const parallel::EpochView& view, int comm_rank,
    parallel::RendezvousStore* store) {
  std::unique_ptr<parallel::Communicator> comm;
  if (view.world_size() > 1) {
    auto built = factory(view.store_prefix, comm_rank, view.world_size());
    if (!built.ok())
      return sy::Annotate(built.status(), absl::StrCat("connecting epoch ", view.epoch));
    comm = std::move(*built);
  }
  if (store != nullptr) SY_RETURN_IF_ERROR(store->Set(parallel::ReadyKey(view, comm_rank), "1"));
  return comm;
}

BackgroundComm::BackgroundComm(parallel::CommunicatorFactory factory, parallel::EpochView view,
                               int comm_rank, parallel::RendezvousStore* store) {
  thread_ = std::thread([this, factory = std::move(factory), view = std::move(view), comm_rank,
                         store] {
    result_ = BuildComm(factory, view, comm_rank, store);
    done_.store(true);
  });
}

BackgroundComm::~BackgroundComm() {
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<std::unique_ptr<parallel::Communicator>> BackgroundComm::Take() {
  if (thread_.joinable()) thread_.join();
  return std::move(result_);
}

}  // namespace sy::scheduler
