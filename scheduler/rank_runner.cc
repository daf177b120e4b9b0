#include "scheduler/rank_runner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "scheduler/rank_control.h"

namespace sy::scheduler {

const char* RankExitName(RankExit e) {
  switch (e) {
    case RankExit::kRunning: return "running";
    case RankExit::kShutdown: return "the leader shut the group down";
    case RankExit::kRemoved: return "drained out of the group";
    case RankExit::kFenced: return "fenced";
    case RankExit::kLeaderGone: return "the leader is gone";
    case RankExit::kNeverFormed: return "the epoch it joined never formed";
    case RankExit::kKilled: return "killed";
  }
  return "unknown";
}

RankRunner::RankRunner(RankRunnerOptions options)
    : o_(std::move(options)),
      cache_(o_.model->config(), o_.num_blocks, o_.block_size),
      recorder_(LoadOptionsForModel(*o_.model)) {
  o_.model->SetLoadRecorder(&recorder_);
}

RankRunner::~RankRunner() {
  stop_ = true;
  {
    sy::MutexLock lock(&hb_mu_);
    hb_cv_.SignalAll();
  }
  if (heartbeat_.joinable()) heartbeat_.join();
  o_.model->SetDispatcher(nullptr);
  o_.model->SetLoadRecorder(nullptr);
}

void RankRunner::AbortComm() {
  sy::MutexLock lock(&comm_mu_);
  if (comm_ != nullptr) comm_->Abort();
}

void RankRunner::SetEpoch(RankEpoch next) {
  {
    // The communicator and its epoch change together: the heartbeat thread must not abort
    // the new communicator for the old epoch's failure.
    sy::MutexLock lock(&comm_mu_);
    comm_ = next.comm.get();
    epoch_ = next.view.epoch;
  }
  {
    sy::MutexLock lock(&stats_mu_);
    if (dispatcher_ != nullptr) parallel::AddDispatchStats(&past_, dispatcher_->stats());
    dispatcher_ = next.dispatcher.get();
    stats_.epoch = next.view.epoch;
    stats_.comm_rank = next.comm_rank;
    stats_.world_size = next.view.world_size();
  }
  // The old communicator stays open a little: a peer may still be reading the switch's
  // broadcast on it (the model already left its dispatcher: Enter switched it).
  if (cur_.comm != nullptr || cur_.dispatcher != nullptr)
    retired_.push_back({std::move(cur_), std::chrono::steady_clock::now()});
  cur_ = std::move(next);
  if (stop_.load() || fenced_.load()) AbortComm();
}

void RankRunner::Kill() {
  exit_ = RankExit::kKilled;
  stop_ = true;
  AbortComm();
  sy::MutexLock lock(&hb_mu_);
  hb_cv_.SignalAll();
}

absl::Status RankRunner::Leave() {
  leaving_ = true;
  return o_.client->Leave(o_.id);
}


RankStats RankRunner::stats() const {
  sy::MutexLock lock(&stats_mu_);
  RankStats s = stats_;
  s.exit = exit_.load();
  s.leaving = leaving_.load();
  s.kv_blocks = o_.num_blocks;
  s.dispatch = past_;
  if (dispatcher_ != nullptr) parallel::AddDispatchStats(&s.dispatch, dispatcher_->stats());
  s.split = SplitSteps(s.steps, step_seconds_, collective_seconds_, o_.model->forward_times(),
                       &s.dispatch);
  return s;
}

void RankRunner::Heartbeats() {
  auto last_ok = std::chrono::steady_clock::now();
  auto last_said = std::chrono::steady_clock::time_point{};
  hb_mu_.Lock();
  while (!stop_.load() && exit_.load() == RankExit::kRunning) {
    const auto deadline = std::chrono::steady_clock::now() + o_.heartbeat_interval;
    while (!stop_.load() && !hb_cv_.WaitUntil(&hb_mu_, deadline)) {
    }
    if (stop_.load() || exit_.load() != RankExit::kRunning) break;
    hb_mu_.Unlock();
    absl::StatusOr<parallel::HeartbeatReply> r = o_.client->Heartbeat(o_.id);
    const auto now = std::chrono::steady_clock::now();
    if (r.ok()) {
      last_ok = now;
      if (r->fenced) {
        if (!fenced_.exchange(true))
          SY_LOG(WARNING) << "rank " << o_.id << ": fenced by the leader (declared dead)";
        AbortComm();
      } else {
        // The leader re-forms the group: stop waiting for a dead peer.
        sy::MutexLock lock(&comm_mu_);
        if (r->broken_epoch >= epoch_.load() && comm_ != nullptr) comm_->Abort();
      }
    } else if (r.status().code() == absl::StatusCode::kNotFound) {
      fenced_ = true;
      AbortComm();
    } else {
      // Said the first time after an answer and then every 5 s, so that a rank that cannot
      // reach the leader says why long before restart_timeout.
      if (now - last_said > std::chrono::seconds(5) || last_said < last_ok) {
        SY_LOG(WARNING) << "rank " << o_.id << ": heartbeat failed: " << r.status();
        last_said = now;
      }
    }
    if (!r.ok() && r.status().code() != absl::StatusCode::kNotFound &&
        now - last_ok > o_.restart_timeout) {
      if (!leader_gone_.exchange(true))
        SY_LOG(WARNING) << "rank " << o_.id << ": no heartbeat answer for "
                        << o_.restart_timeout.count() << " ms: " << r.status();
      AbortComm();
    }
    hb_mu_.Lock();
  }
  hb_mu_.Unlock();
}

absl::Status RankRunner::EnterView(const parallel::EpochView& view) {
  RankEpoch next;
  next.view = view;
  next.comm_rank = view.comm_rank_of(o_.id);
  if (next.comm_rank < 0)
    return absl::InternalError(absl::StrCat("rank ", o_.id, " is not in epoch ", view.epoch));
  const auto t0 = std::chrono::steady_clock::now();
  SY_ASSIGN_OR_RETURN(next.placement, PlacementOfView(view, o_.model->config()));
  SY_RETURN_IF_ERROR(PrepareExperts(o_.model, *next.placement, next.comm_rank).status());
  const auto t1 = std::chrono::steady_clock::now();
  SY_ASSIGN_OR_RETURN(next.comm, BuildComm(o_.make_comm, view, next.comm_rank, o_.store));
  SY_RETURN_IF_ERROR(Enter(o_.model, &next, o_.dispatch).status());
  const auto t2 = std::chrono::steady_clock::now();
  SY_LOG(INFO) << "rank " << o_.id << " entered epoch " << view.epoch << " as comm rank "
               << next.comm_rank << " of " << view.world_size() << ": experts mapped in "
               << std::chrono::duration<double>(t1 - t0).count() << " s, connected in "
               << std::chrono::duration<double>(t2 - t1).count() << " s";
  SetEpoch(std::move(next));
  return absl::OkStatus();
}

absl::Status RankRunner::Run(const parallel::EpochView& first, bool joining) {
  if (o_.client != nullptr && o_.heartbeat_interval.count() > 0)
    heartbeat_ = std::thread([this] { Heartbeats(); });
  parallel::EpochView view = first;
  bool formed = !joining;
  for (;;) {
    absl::Status s = EnterView(view);
    if (s.ok()) {
      s = Serve();
      if (exit_.load() == RankExit::kShutdown || exit_.load() == RankExit::kRemoved) {
        SY_LOG(INFO) << "rank " << o_.id << ": " << RankExitName(exit_.load());
        return absl::OkStatus();
      }
      formed = true;
    }
    if (stop_.load()) return absl::CancelledError(absl::StrCat("rank ", o_.id, " stopped"));
    if (!formed) {
      exit_ = RankExit::kNeverFormed;
      return absl::UnavailableError(
          absl::StrCat("rank ", o_.id, ": epoch ", view.epoch, " never formed: ", s.message()));
    }
    SY_LOG(WARNING) << "rank " << o_.id << " left epoch " << std::max(view.epoch, epoch_.load())
                    << ": " << s
                    << "; waiting for the re-formed group";
    {
      sy::MutexLock lock(&comm_mu_);
      if (comm_ != nullptr) comm_->Abort();
    }
    // A build of an epoch that will never form ends within its time-out; do not wait for it.
    if (pending_build_ != nullptr) graveyard_.push_back(std::move(pending_build_));
    const int64_t after = std::max(view.epoch, epoch_.load());
    absl::StatusOr<parallel::EpochView> next =
        fenced_.load() ? absl::FailedPreconditionError("fenced")
                       : o_.client->AwaitRestart(o_.id, after, o_.restart_timeout);
    if (!next.ok()) {
      if (next.status().code() == absl::StatusCode::kFailedPrecondition ||
          next.status().code() == absl::StatusCode::kNotFound) {
        exit_ = RankExit::kFenced;
        return absl::FailedPreconditionError(
            absl::StrCat("rank ", o_.id, " was fenced: ", next.status().message()));
      }
      exit_ = RankExit::kLeaderGone;
      return absl::UnavailableError(
          absl::StrCat("rank ", o_.id, ": no re-formed group: ", next.status().message()));
    }
    view = *next;
  }
}

absl::Status RankRunner::Serve() {
  const int64_t vocab = o_.model->config().vocab_size;
  std::vector<int32_t> words;
  std::vector<model::SequenceInput> inputs;
  std::vector<float> logits;
  std::vector<SampleSpec> specs;
  std::vector<int32_t> blocks, sampled;
  for (;;) {
    if (stop_.load()) return absl::CancelledError("rank stopped");
    while (!retired_.empty() &&
           std::chrono::steady_clock::now() - retired_.front().second > std::chrono::seconds(2))
      retired_.pop_front();
    parallel::Communicator* comm = cur_.comm.get();
    const int me = cur_.comm_rank, world = cur_.world_size();
    if (comm == nullptr)  // an epoch of the leader alone has no other rank
      return absl::InternalError("a rank other than the leader in a one-rank epoch");
    SY_RETURN_IF_ERROR(sy::Annotate(ReceivePlan(comm, &plan_bytes_, &words), "waiting for a step plan"));
    const auto plan_start = std::chrono::steady_clock::now();  // the wait for a plan is not step time
    SY_ASSIGN_OR_RETURN(DecodedPlan plan, DecodePlan(words));
    switch (plan.kind) {
      case PlanKind::kShutdown:
        exit_ = RankExit::kShutdown;
        return absl::OkStatus();
      case PlanKind::kKeepAlive:
        continue;
      case PlanKind::kPlacement:
      case PlanKind::kLoadStats:
        SY_RETURN_IF_ERROR(HandleControlPlan(comm, o_.model, &recorder_, plan));
        continue;
      case PlanKind::kEpochPrepare:
      case PlanKind::kEpochCommit:
      case PlanKind::kEpochAbort: {
        bool left = false;
        SY_RETURN_IF_ERROR(HandleMembershipPlan(plan, &left));
        if (left) return absl::OkStatus();
        continue;
      }
      case PlanKind::kStep:
        break;
    }
    inputs.clear();
    specs.clear();
    int64_t tokens = 0;
    blocks.clear();
    for (const PlannedSequence& s : plan.seqs)
      if (s.home_rank == me) {
        inputs.push_back(s.input);
        if (WantsToken(s.input)) specs.push_back(s.sample);
        tokens += static_cast<int64_t>(s.input.tokens.size());
        blocks.insert(blocks.end(), s.input.block_table.begin(), s.input.block_table.end());
      }
    {
      std::sort(blocks.begin(), blocks.end());
      const int64_t used = std::unique(blocks.begin(), blocks.end()) - blocks.begin();
      sy::MutexLock lock(&stats_mu_);
      ++stats_.steps;
      stats_.tokens += tokens;
      stats_.kv_blocks_used = used;
    }
    SY_RETURN_IF_ERROR(sy::Annotate(o_.model->Forward(inputs, cache_, &logits),
                                    absl::StrCat("rank ", o_.id, " step")));
    sampled.resize(specs.size());
    SampleRows(specs, logits.data(), vocab, sampled.data());
    const auto gather_start = std::chrono::steady_clock::now();
    const std::vector<int64_t> rows = TokensPerRank(plan.seqs, world);
    SY_RETURN_IF_ERROR(sy::Annotate(
        GatherRowsToLeader(comm, sampled.data(), sizeof(int32_t), rows, nullptr),
        "sending tokens to rank 0"));
    const auto end = std::chrono::steady_clock::now();
    {
      sy::MutexLock lock(&stats_mu_);
      step_seconds_ += std::chrono::duration<double>(end - plan_start).count();
      collective_seconds_ += std::chrono::duration<double>(end - gather_start).count();
    }
  }
}

absl::Status RankRunner::HandleMembershipPlan(const DecodedPlan& plan, bool* left) {
  parallel::Communicator* comm = cur_.comm.get();
  if (plan.kind == PlanKind::kEpochPrepare) {
    absl::StatusOr<parallel::EpochView> view = parallel::DecodeEpochView(plan.payload);
    PlacementSwitchCounts counts;
    absl::Status s = view.status();
    if (s.ok()) {
      pending_view_ = *view;
      const int r = view->comm_rank_of(o_.id);
      if (r >= 0) {  // this rank stays: its experts of the next epoch, its next communicator
        auto placement = PlacementOfView(*view, o_.model->config());
        s = placement.status();
        if (s.ok()) {
          auto gained = PrepareExperts(o_.model, **placement, r);
          s = gained.status();
          if (s.ok()) counts.gained_bytes = *gained;
        }
        if (s.ok())
          pending_build_ = std::make_unique<BackgroundComm>(o_.make_comm, *view, r, o_.store);
      }
    }
    if (!s.ok()) SY_LOG(ERROR) << "rank " << o_.id << ": preparing the next epoch: " << s;
    SY_ASSIGN_OR_RETURN(auto sum, AllGatherSwitchCounts(comm, counts, s.ok()));
    (void)sum;
    return absl::OkStatus();
  }
  if (plan.payload.size() != 1)
    return absl::InvalidArgumentError("membership control plan: bad payload");
  const int64_t epoch = plan.payload[0];
  if (plan.kind == PlanKind::kEpochAbort) {
    if (pending_build_ != nullptr) graveyard_.push_back(std::move(pending_build_));
    for (auto it = graveyard_.begin(); it != graveyard_.end();)
      it = (*it)->done() ? graveyard_.erase(it) : std::next(it);
    SY_RETURN_IF_ERROR(
        o_.model->RetainExperts(parallel::ExpertsOfRank(*cur_.placement, cur_.comm_rank)).status());
    return absl::OkStatus();
  }
  // kEpochCommit
  if (pending_view_.epoch != epoch)
    return absl::InternalError(absl::StrCat("rank ", o_.id, ": commit of epoch ", epoch,
                                            ", prepared ", pending_view_.epoch));
  const int r = pending_view_.comm_rank_of(o_.id);
  if (r < 0) {  // drained out: the group goes on without this rank
    exit_ = RankExit::kRemoved;
    *left = true;
    return absl::OkStatus();
  }
  if (pending_build_ == nullptr)
    return absl::InternalError(absl::StrCat("rank ", o_.id, ": epoch ", epoch, " was not prepared"));
  RankEpoch next;
  next.view = pending_view_;
  next.comm_rank = r;
  SY_ASSIGN_OR_RETURN(next.placement, PlacementOfView(next.view, o_.model->config()));
  SY_ASSIGN_OR_RETURN(next.comm, pending_build_->Take());
  pending_build_.reset();
  SY_RETURN_IF_ERROR(Enter(o_.model, &next, o_.dispatch).status());
  SetEpoch(std::move(next));
  return absl::OkStatus();
}

}  // namespace sy::scheduler
