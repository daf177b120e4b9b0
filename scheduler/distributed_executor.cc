#include "scheduler/distributed_executor.h"

#include <algorithm>
#include <future>
#include <set>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "parallel/planner/membership_plan.h"
#include "scheduler/rank_control.h"

namespace sy::scheduler {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Old communicators stay open this long after a switch, so that a peer still reading the
// switch's broadcast does not see its connection close under it.
constexpr std::chrono::seconds kRetireAfter(2);
// After this many re-forms in a row with no step getting through, the step fails for good
// (its requests end with UNAVAILABLE) instead of being tried again.
constexpr int kMaxReformsPerStep = 3;
// Attempts to form a group from the survivors (a survivor may die during the re-form).
constexpr int kReformAttempts = 4;

absl::Status AsUnavailable(const absl::Status& s, const std::string& context) {
  if (s.ok()) return s;
  if (s.code() == absl::StatusCode::kUnavailable) return sy::Annotate(s, context);
  return absl::UnavailableError(absl::StrCat(context, ": ", s.ToString()));
}

std::string PrefixOf(int64_t epoch) { return absl::StrCat("epoch-", epoch); }

}  // namespace

const char* ReasonName(MembershipChange::Reason r) {
  switch (r) {
    case MembershipChange::Reason::kJoin: return "join";
    case MembershipChange::Reason::kDrain: return "drain";
    case MembershipChange::Reason::kFailure: return "failure";
  }
  return "unknown";
}

struct DistributedStepExecutor::Pending {
  parallel::EpochView view;
  std::shared_ptr<const parallel::ExpertPlacement> placement;
  std::unique_ptr<BackgroundComm> build;
  std::vector<int32_t> joiners, leavers;
  Clock::time_point started, deadline;
  int64_t gained_bytes = 0;
};

absl::StatusOr<std::unique_ptr<DistributedStepExecutor>> DistributedStepExecutor::Create(
    model::MoeModel* model, parallel::Membership* membership, GroupOptions options,
    const parallel::EpochView& first, std::unique_ptr<parallel::Communicator> first_comm,
    std::function<void(const absl::Status&)> on_failure) {
  if (first.world_size() > 1 && (first_comm == nullptr || first_comm->rank() != 0))
    return absl::InvalidArgumentError("the leader needs comm rank 0 of its first epoch");
  if (first.members.empty() || first.members[0] != 0)
    return absl::InvalidArgumentError("the first epoch must start with the leader (rank 0)");
  std::unique_ptr<DistributedStepExecutor> e(
      new DistributedStepExecutor(model, membership, std::move(options)));
  e->on_failure_ = std::move(on_failure);
  RankEpoch epoch;
  epoch.view = first;
  epoch.comm_rank = 0;
  SY_ASSIGN_OR_RETURN(epoch.placement, PlacementOfView(first, model->config()));
  epoch.comm = std::move(first_comm);
  SY_RETURN_IF_ERROR(Enter(model, &epoch, e->options_.dispatch).status());
  e->Install(std::move(epoch));
  membership->Commit(first);
  for (int32_t id : first.members)
    if (id != 0) e->QueueEvent({PoolEvent::Kind::kAdded, id, membership->kv_blocks(id)});
  membership->SetNotify([p = e.get()] {
    sy::MutexLock lock(&p->ctl_mu_);
    p->ctl_work_ = true;
    p->ctl_cv_.SignalAll();
  });
  e->pump_ = std::thread([p = e.get()] { p->Pump(); });
  e->controller_ = std::thread([p = e.get()] { p->Controller(); });
  return e;
}

DistributedStepExecutor::DistributedStepExecutor(model::MoeModel* model,
                                                 parallel::Membership* membership,
                                                 GroupOptions options)
    : model_(model),
      membership_(membership),
      options_(std::move(options)),
      cache_(model->config(), options_.num_blocks, options_.block_size),
      keepalive_(std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10),
                                                     options_.timeout / 4)) {
  stats_.rank_tokens[0] = 0;
  rate_since_ = Clock::now();
}

DistributedStepExecutor::~DistributedStepExecutor() {
  membership_->SetNotify(nullptr);
  {
    sy::MutexLock lock(&ctl_mu_);
    ctl_stop_ = true;
    ctl_cv_.SignalAll();
  }
  if (controller_.joinable()) controller_.join();
  {
    sy::MutexLock lock(&mu_);
    stop_ = true;
    cv_.SignalAll();
  }
  if (pump_.joinable()) pump_.join();
  model_->SetDispatcher(nullptr);
}

// ---- the pump ----------------------------------------------------------------------------

void DistributedStepExecutor::Install(RankEpoch next) {
  {
    sy::MutexLock lock(&stats_mu_);
    placement_ = next.placement;
    view_ = next.view;
    if (stats_dispatcher_ != nullptr)
      parallel::AddDispatchStats(&past_dispatch_, stats_dispatcher_->stats());
    stats_dispatcher_ = next.dispatcher.get();
    stats_.epoch = next.view.epoch;
    stats_.world_size = next.world_size();
    stats_.members = next.view.members;
  }
  if (cur_.comm != nullptr || cur_.dispatcher != nullptr)
    retired_.push_back({std::move(cur_), Clock::now()});
  cur_ = std::move(next);
  last_plan_ = Clock::now();
  PublishUsage();
}

void DistributedStepExecutor::Pump() {
  mu_.Lock();
  for (;;) {
    const auto deadline = std::chrono::steady_clock::now() +
                          (pending_ != nullptr ? std::chrono::milliseconds(5) : keepalive_);
    while (!stop_ && !job_ && controls_.empty() && !cv_.WaitUntil(&mu_, deadline)) {
    }
    // A waiting step goes first, then control plans (so the phases of a placement switch
    // interleave with the steps of a busy engine).
    if (job_) {
      mu_.Unlock();
      absl::Status s = broken_.load() ? absl::UnavailableError("the rank group is down")
                                      : RunStepJob();
      CheckPending();
      mu_.Lock();
      job_status_ = s;
      job_ = false;
      done_ = true;
      cv_.SignalAll();
      continue;
    }
    if (!controls_.empty()) {
      std::function<void(bool)> control = std::move(controls_.front());
      controls_.pop_front();
      mu_.Unlock();
      control(!broken_.load());
      mu_.Lock();
      continue;
    }
    if (stop_) {
      for (auto& control : controls_) control(false);  // refused: shutting down
      controls_.clear();
      mu_.Unlock();
      if (pending_ != nullptr) AbortPending(absl::UnavailableError("the leader is shutting down"));
      if (!broken_.load() && cur_.world_size() > 1) {
        absl::Status s = RunPlan(PlanKind::kShutdown);
        if (!s.ok()) SY_LOG(WARNING) << "sending the shutdown plan to the ranks: " << s;
      }
      return;
    }
    mu_.Unlock();
    CheckPending();
    while (!retired_.empty() && Clock::now() - retired_.front().since > kRetireAfter)
      retired_.pop_front();
    for (auto it = graveyard_.begin(); it != graveyard_.end();)
      it = (*it)->done() ? graveyard_.erase(it) : std::next(it);
    if (!broken_.load() && cur_.world_size() > 1 && Clock::now() - last_plan_ >= keepalive_) {
      absl::Status s = RunPlan(PlanKind::kKeepAlive);
      if (!s.ok()) Reform(AsUnavailable(s, "keep-alive to the ranks"));
    }
    mu_.Lock();
  }
}

absl::Status DistributedStepExecutor::Broadcast(PlanKind kind, std::span<const int32_t> payload) {
  if (kind == PlanKind::kStep) {
    EncodePlan(kind, planned_, &words_);
  } else if (IsControlPlan(kind)) {
    EncodeControlPlan(kind, payload, &words_);
  } else {
    EncodePlan(kind, {}, &words_);
  }
  last_plan_ = Clock::now();
  // One message whose size the ranks learn from it (SendPlan).
  return SendPlan(cur_.comm.get(), words_);
}

absl::Status DistributedStepExecutor::RunPlan(PlanKind kind, std::span<const int32_t> payload) {
  if (kind != PlanKind::kStep) return cur_.world_size() > 1 ? Broadcast(kind, payload) : absl::OkStatus();
  const Clock::time_point start = Clock::now();
  double collective = 0;
  absl::Status s = RunStep(&collective);
  sy::MutexLock lock(&stats_mu_);
  step_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
  collective_seconds_ += collective;
  return s;
}

absl::Status DistributedStepExecutor::RunStep(double* collective_seconds) {
  const int world = cur_.world_size();
  const Clock::time_point start = Clock::now();
  if (world > 1) SY_RETURN_IF_ERROR(Broadcast(PlanKind::kStep, {}));
  *collective_seconds += std::chrono::duration<double>(Clock::now() - start).count();

  own_inputs_.clear();
  own_specs_.clear();
  for (const PlannedSequence& s : planned_)
    if (s.home_rank == 0) {
      own_inputs_.push_back(s.input);
      if (WantsToken(s.input)) own_specs_.push_back(s.sample);
    }
  SY_RETURN_IF_ERROR(model_->Forward(own_inputs_, cache_, &own_logits_));
  own_tokens_.resize(own_specs_.size());
  SampleRows(own_specs_, own_logits_.data(), model_->config().vocab_size, own_tokens_.data());
  if (world == 1) {
    job_tokens_->swap(own_tokens_);
    return absl::OkStatus();
  }
  const std::vector<int64_t> rows = TokensPerRank(planned_, world);
  int64_t total = 0;
  std::vector<int64_t> next_row(world, 0);
  for (int p = 0; p < world; ++p) {
    next_row[p] = total;
    total += rows[p];
  }
  gathered_.resize(total);
  const Clock::time_point gather = Clock::now();
  SY_RETURN_IF_ERROR(GatherRowsToLeader(cur_.comm.get(), own_tokens_.data(), sizeof(int32_t), rows,
                                        gathered_.data()));
  *collective_seconds += std::chrono::duration<double>(Clock::now() - gather).count();
  // Back to input order: rank p's tokens arrive in plan order of its sequences.
  job_tokens_->clear();
  for (const PlannedSequence& s : planned_)
    if (WantsToken(s.input)) job_tokens_->push_back(gathered_[next_row[s.home_rank]++]);
  return absl::OkStatus();
}

absl::Status DistributedStepExecutor::RunStepJob() {
  // Homes are rank ids; the plan speaks comm ranks of the epoch in force.
  std::map<int32_t, int64_t> tokens;
  for (size_t i = 0; i < planned_.size(); ++i) {
    const int32_t id = planned_ids_[i];
    const int r = cur_.view.comm_rank_of(id);
    if (r < 0)
      return absl::AbortedError(absl::StrCat("rank ", id, " is not in the group (epoch ",
                                             cur_.view.epoch, ")"));
    planned_[i].home_rank = r;
    tokens[id] += static_cast<int64_t>(planned_[i].input.tokens.size());
  }
  absl::Status s = RunPlan(PlanKind::kStep);
  if (!s.ok()) {
    if (cur_.world_size() == 1) return s;  // the model itself failed: no peer to blame
    Reform(AsUnavailable(s, "multi-rank step"));
    if (broken_.load()) return absl::UnavailableError(absl::StrCat("multi-rank step: ", s.message()));
    if (++reforms_without_step_ >= kMaxReformsPerStep) {
      reforms_without_step_ = 0;
      return absl::UnavailableError(absl::StrCat(
          "the step failed in ", kMaxReformsPerStep, " re-formed groups in a row: ", s.message()));
    }
    return absl::AbortedError(absl::StrCat("the rank group re-formed (epoch ", cur_.view.epoch,
                                           ") under this step: ", s.message()));
  }
  reforms_without_step_ = 0;
  const auto now = Clock::now();
  if (recovering_since_) {
    const double secs = std::chrono::duration<double>(now - *recovering_since_).count();
    recovering_since_.reset();
    SY_LOG(INFO) << "first step of the re-formed group (epoch " << cur_.view.epoch << ") "
                 << secs << " s after the failure was detected";
    if (GroupObserver* o = observer_.load()) o->OnRecovered(secs);
  }
  for (auto it = awaiting_first_tokens_.begin(); it != awaiting_first_tokens_.end();) {
    if (tokens.count(it->first) == 0) {
      ++it;
      continue;
    }
    const double secs = std::chrono::duration<double>(now - it->second).count();
    SY_LOG(INFO) << "rank " << it->first << " ran its first tokens " << secs
                 << " s after its join call";
    if (GroupObserver* o = observer_.load()) o->OnFirstTokens(it->first, secs);
    it = awaiting_first_tokens_.erase(it);
  }
  sy::MutexLock lock(&stats_mu_);
  for (const auto& [id, n] : tokens) stats_.rank_tokens[id] += n;
  ++stats_.steps;
  return absl::OkStatus();
}

absl::Status DistributedStepExecutor::Execute(std::span<const model::SequenceInput> batch,
                                              std::span<const int32_t> homes,
                                              std::span<const SampleSpec> samples,
                                              std::vector<int32_t>* tokens) {
  if (broken_.load()) {
    sy::MutexLock lock(&stats_mu_);
    return absl::UnavailableError(
        absl::StrCat("the rank group is down: ", broken_status_.message()));
  }
  planned_.clear();
  planned_ids_.clear();
  for (size_t i = 0; i < batch.size(); ++i) {
    planned_.push_back(PlannedSequence{0, batch[i], i < samples.size() ? samples[i] : SampleSpec{}});
    planned_ids_.push_back(i < homes.size() ? homes[i] : 0);
  }
  absl::Status status;
  {
    sy::MutexLock lock(&mu_);
    job_tokens_ = tokens;
    job_ = true;
    done_ = false;
    cv_.SignalAll();
    while (!done_) cv_.Wait(&mu_);
    status = job_status_;
  }
  PublishStats();
  return status;
}

// ---- membership changes --------------------------------------------------------------------

absl::StatusOr<parallel::ExpertPlacement> DistributedStepExecutor::PlanFor(
    const parallel::ExpertPlacement& current, const std::vector<int>& old_rank_of_new,
    bool urgent) const {
  if (options_.plan) return options_.plan(current, old_rank_of_new, urgent);
  parallel::planner::MembershipPlanOptions o;
  o.policy = urgent ? "repair" : "ilp";
  o.top_k = static_cast<int>(model_->config().num_experts_per_tok);
  return parallel::planner::PlanMembership(current, old_rank_of_new, {}, o);
}

absl::Status DistributedStepExecutor::PrepareEpoch(const parallel::EpochView& view,
                                                   int64_t based_on,
                                                   const std::vector<int32_t>& joiners,
                                                   const std::vector<int32_t>& leavers) {
  if (cur_.view.epoch != based_on || pending_ != nullptr)
    return absl::AbortedError("the membership changed while the next epoch was planned");
  auto pending = std::make_unique<Pending>();
  pending->view = view;
  SY_ASSIGN_OR_RETURN(pending->placement, PlacementOfView(view, model_->config()));
  if (cur_.world_size() > 1) {
    const std::vector<int32_t> payload = parallel::EncodeEpochView(view);
    SY_RETURN_IF_ERROR(AsUnavailable(Broadcast(PlanKind::kEpochPrepare, payload),
                                     "sending the next epoch to the ranks"));
  }
  absl::StatusOr<int64_t> gained = PrepareExperts(model_, *pending->placement, 0);
  PlacementSwitchCounts own;
  if (gained.ok()) own.gained_bytes = *gained;
  bool all_ok = gained.ok();
  if (cur_.world_size() > 1) {
    SY_ASSIGN_OR_RETURN(auto sum, AllGatherSwitchCounts(cur_.comm.get(), own, gained.ok()));
    all_ok = sum.second;
    pending->gained_bytes = sum.first.gained_bytes;
  } else {
    pending->gained_bytes = own.gained_bytes;
  }
  pending->joiners = joiners;
  pending->leavers = leavers;
  pending->started = Clock::now();
  pending->deadline = pending->started + options_.join_timeout;
  pending->build = std::make_unique<BackgroundComm>(options_.make_comm, view, 0, membership_->store());
  pending_ = std::move(pending);
  pending_epoch_ = true;
  if (!all_ok) {
    const absl::Status why = gained.ok() ? absl::InternalError("a rank could not map its experts")
                                         : gained.status();
    AbortPending(why);
    return why;
  }
  membership_->PublishJoin(joiners, view);
  SY_LOG(INFO) << "epoch " << view.epoch << " prepared: " << view.world_size() << " ranks ("
               << joiners.size() << " joining, " << leavers.size() << " leaving)";
  return absl::OkStatus();
}

void DistributedStepExecutor::CheckPending() {
  if (pending_ == nullptr || broken_.load()) return;
  bool ready = pending_->build->done();
  for (int r = 1; ready && r < pending_->view.world_size(); ++r)
    ready = membership_->store()->Get(parallel::ReadyKey(pending_->view, r),
                                      std::chrono::milliseconds(0)).ok();
  if (ready) {
    CommitPending();
  } else if (Clock::now() > pending_->deadline) {
    AbortPending(absl::DeadlineExceededError(absl::StrCat(
        "the ranks of epoch ", pending_->view.epoch, " did not all connect within ",
        options_.join_timeout.count(), " ms")));
  }
}

void DistributedStepExecutor::CommitPending() {
  const int64_t epoch = pending_->view.epoch;
  if (cur_.world_size() > 1) {
    const int32_t payload[1] = {static_cast<int32_t>(epoch)};
    absl::Status s = Broadcast(PlanKind::kEpochCommit, payload);
    if (!s.ok()) {
      Reform(AsUnavailable(s, "switching the ranks to the next epoch"));
      return;
    }
  }
  std::unique_ptr<Pending> p = std::move(pending_);
  pending_epoch_ = false;
  RankEpoch next;
  next.view = p->view;
  next.comm_rank = 0;
  next.placement = p->placement;
  absl::StatusOr<std::unique_ptr<parallel::Communicator>> comm = p->build->Take();
  absl::Status s = comm.status();
  if (s.ok()) {
    next.comm = std::move(*comm);
    s = Enter(model_, &next, options_.dispatch).status();
  }
  if (!s.ok()) {  // the ranks switched: the leader must, or the group re-forms
    SY_LOG(ERROR) << "leader: entering epoch " << epoch << ": " << s;
    Reform(AsUnavailable(s, "entering the next epoch"));
    return;
  }
  const parallel::EpochView view = next.view;
  Install(std::move(next));
  const auto now = Clock::now();
  // The engine's pool events and the figures go first: whoever sees the membership's new
  // epoch (a status call, a client that waits for the join) finds an engine that already
  // homes new sequences on the joined ranks.
  for (int32_t id : p->joiners) {
    QueueEvent({PoolEvent::Kind::kAdded, id, membership_->kv_blocks(id)});
    awaiting_first_tokens_[id] = membership_->joined_at(id);
  }
  for (int32_t id : p->leavers) QueueEvent({PoolEvent::Kind::kRemoved, id, 0});
  MembershipChange change;
  change.reason = p->joiners.empty() ? MembershipChange::Reason::kDrain
                                     : MembershipChange::Reason::kJoin;
  change.epoch = epoch;
  change.joined = p->joiners;
  change.left = p->leavers;
  change.migrated_bytes = p->gained_bytes;
  change.seconds = std::chrono::duration<double>(now - p->started).count();
  {
    sy::MutexLock lock(&stats_mu_);
    if (!p->joiners.empty()) ++stats_.joins;
    if (!p->leavers.empty()) ++stats_.drains;
    stats_.migrated_bytes += p->gained_bytes;
  }
  membership_->Commit(view);
  SY_LOG(INFO) << "epoch " << epoch << " in force: " << view.world_size() << " ranks, "
               << p->joiners.size() << " joined, " << p->leavers.size() << " left, "
               << p->gained_bytes << " expert bytes mapped, " << change.seconds << " s";
  if (GroupObserver* o = observer_.load()) o->OnMembershipChange(change);
  {
    sy::MutexLock lock(&ctl_mu_);  // the controller may plan the next change
    ctl_work_ = true;
    ctl_cv_.SignalAll();
  }
}

void DistributedStepExecutor::AbortPending(const absl::Status& why) {
  if (pending_ == nullptr) return;
  std::unique_ptr<Pending> p = std::move(pending_);
  pending_epoch_ = false;
  SY_LOG(WARNING) << "epoch " << p->view.epoch << " abandoned: " << why;
  membership_->RefuseJoin(p->joiners, absl::UnavailableError(
                                          absl::StrCat("the group did not take the rank: ",
                                                       why.message())));
  graveyard_.push_back(std::move(p->build));
  model_->RetainExperts(parallel::ExpertsOfRank(*cur_.placement, 0)).IgnoreError();
  if (cur_.world_size() > 1 && !cur_.comm->broken()) {
    const int32_t payload[1] = {static_cast<int32_t>(p->view.epoch)};
    absl::Status s = Broadcast(PlanKind::kEpochAbort, payload);
    if (!s.ok()) Reform(AsUnavailable(s, "abandoning the next epoch"));
  }
}

void DistributedStepExecutor::Reform(const absl::Status& cause) {
  if (broken_.load()) return;
  const auto t0 = Clock::now();
  SY_LOG(WARNING) << "epoch " << cur_.view.epoch << " failed (" << cause
                  << "); re-forming the group from the ranks that answer";
  if (cur_.comm != nullptr) cur_.comm->Abort();
  if (pending_ != nullptr) {
    membership_->RefuseJoin(pending_->joiners,
                            absl::AbortedError("the group re-formed before the rank joined"));
    graveyard_.push_back(std::move(pending_->build));
    pending_.reset();
    pending_epoch_ = false;
  }
  parallel::EpochView view = cur_.view;
  std::shared_ptr<const parallel::ExpertPlacement> placement = cur_.placement;
  std::vector<int32_t> lost;
  for (int attempt = 0; attempt < kReformAttempts; ++attempt) {
    membership_->BreakEpoch(view.epoch);
    const std::vector<int32_t> survivors = membership_->WaitForSurvivors(view, options_.timeout);
    std::vector<int32_t> dead;
    for (int32_t id : view.members)
      if (id != 0 && std::find(survivors.begin(), survivors.end(), id) == survivors.end())
        dead.push_back(id);
    membership_->MarkDead(dead);
    lost.insert(lost.end(), dead.begin(), dead.end());
    for (int32_t id : dead) SY_LOG(WARNING) << "rank " << id << " is declared dead and fenced";

    parallel::EpochView next_view;
    next_view.members = {0};
    next_view.members.insert(next_view.members.end(), survivors.begin(), survivors.end());
    std::vector<int> old_rank_of_new;
    for (int32_t id : next_view.members) old_rank_of_new.push_back(view.comm_rank_of(id));
    absl::StatusOr<parallel::ExpertPlacement> planned = PlanFor(*placement, old_rank_of_new, true);
    if (!planned.ok()) {
      Fail(AsUnavailable(planned.status(), "placing the experts on the surviving ranks"));
      return;
    }
    next_view.epoch = membership_->NextEpoch();
    next_view.store_prefix = PrefixOf(next_view.epoch);
    next_view.placement_json = planned->WithEpoch(placement->epoch() + 1).ToJson();
    membership_->PublishRestart(next_view);

    RankEpoch next;
    next.view = next_view;
    next.comm_rank = 0;
    absl::Status s;
    auto np = PlacementOfView(next_view, model_->config());
    s = np.status();
    if (s.ok()) {
      next.placement = *np;
      s = PrepareExperts(model_, *next.placement, 0).status();
    }
    if (s.ok()) {
      auto comm = BuildComm(options_.make_comm, next_view, 0, membership_->store());
      s = comm.status();
      if (s.ok()) next.comm = std::move(*comm);
    }
    if (s.ok()) s = Enter(model_, &next, options_.dispatch).status();
    if (!s.ok()) {
      SY_LOG(WARNING) << "re-forming as epoch " << next_view.epoch << ": " << s << "; again";
      view = next_view;
      placement = next.placement != nullptr ? next.placement : placement;
      continue;
    }
    Install(std::move(next));
    for (int32_t id : lost) QueueEvent({PoolEvent::Kind::kLost, id, 0});
    recovering_since_ = t0;
    MembershipChange change;
    change.reason = MembershipChange::Reason::kFailure;
    change.epoch = next_view.epoch;
    change.lost = lost;
    change.seconds = Since(t0);
    {
      sy::MutexLock lock(&stats_mu_);
      ++stats_.failures;
    }
    membership_->Commit(next_view);  // after the events and figures, as CommitPending
    SY_LOG(WARNING) << "the group re-formed as epoch " << next_view.epoch << " with "
                    << next_view.world_size() << " rank(s), " << lost.size() << " lost, in "
                    << change.seconds << " s";
    if (GroupObserver* o = observer_.load()) o->OnMembershipChange(change);
    sy::MutexLock lock(&ctl_mu_);
    ctl_work_ = true;
    ctl_cv_.SignalAll();
    return;
  }
  Fail(absl::UnavailableError(absl::StrCat("the rank group could not re-form after ",
                                           kReformAttempts, " attempts: ", cause.message())));
}

absl::Status DistributedStepExecutor::RunControl(std::function<absl::Status()> fn) {
  auto done = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> result = done->get_future();
  {
    sy::MutexLock lock(&mu_);
    if (stop_) return absl::UnavailableError("the rank group is shutting down");
    controls_.push_back([this, fn = std::move(fn), done](bool run) {
      if (!run) {
        done->set_value(absl::UnavailableError(broken_.load() ? "the rank group is down"
                                                              : "the rank group is shutting down"));
        return;
      }
      absl::Status s = fn();
      if (!s.ok() && cur_.comm != nullptr && cur_.comm->broken()) {
        Reform(s);
        if (!broken_.load())
          s = absl::AbortedError(absl::StrCat("the rank group re-formed: ", s.message()));
      }
      done->set_value(s);
    });
    cv_.SignalAll();
  }
  return result.get();
}

void DistributedStepExecutor::Controller() {
  sy::MutexLock lock(&ctl_mu_);
  while (!ctl_stop_) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
    while (!ctl_stop_ && !ctl_work_ && !ctl_cv_.WaitUntil(&ctl_mu_, deadline)) {
    }
    if (ctl_stop_) break;
    ctl_work_ = false;
    ctl_mu_.Unlock();
    Reconcile();
    ctl_mu_.Lock();
  }
}

void DistributedStepExecutor::Reconcile() {
  if (broken_.load()) return;
  const auto now = Clock::now();
  // Drains: stop admissions, wait for the pool to empty (or move its sequences), then leave.
  const std::vector<int32_t> draining = membership_->Draining();
  for (auto it = drains_.begin(); it != drains_.end();)
    it = std::find(draining.begin(), draining.end(), it->first) == draining.end() ? drains_.erase(it)
                                                                                  : std::next(it);
  std::vector<int32_t> leavers;
  for (int32_t id : draining) {
    auto it = drains_.find(id);
    if (it == drains_.end()) {
      Drain d;
      d.deadline = now + options_.drain_timeout;
      {
        sy::MutexLock lock(&events_mu_);
        d.event_seq = events_queued_ + 1;
      }
      QueueEvent({PoolEvent::Kind::kDraining, id, 0});
      drains_[id] = d;
      continue;
    }
    Drain& d = it->second;
    bool empty = false;
    {
      sy::MutexLock lock(&events_mu_);
      auto u = usage_.find(id);
      empty = events_reported_ >= d.event_seq && (u == usage_.end() || u->second.num_seqs == 0);
    }
    if (empty) {
      leavers.push_back(id);
    } else if (now > d.deadline && !d.evicted) {
      SY_LOG(INFO) << "rank " << id << " still holds sequences after the drain time-out; "
                   << "moving them to other ranks";
      {
        sy::MutexLock lock(&events_mu_);
        d.event_seq = events_queued_ + 1;
      }
      QueueEvent({PoolEvent::Kind::kEvict, id, 0});
      d.evicted = true;
    }
  }
  std::vector<int32_t> joiners;
  for (const auto& [id, blocks] : membership_->PendingJoins()) joiners.push_back(id);
  // (The controller looks again every 20 ms: draining pools empty out, a change in flight
  // ends.)
  if (joiners.empty() && leavers.empty()) return;
  if (pending_epoch_.load() || switching_placement_.load()) return;  // one change at a time
  parallel::EpochView cur;
  std::shared_ptr<const parallel::ExpertPlacement> placement;
  {
    sy::MutexLock lock(&stats_mu_);
    cur = view_;
    placement = placement_;
  }
  parallel::EpochView next;
  std::vector<int> old_rank_of_new;
  for (int32_t id : cur.members) {
    if (std::find(leavers.begin(), leavers.end(), id) != leavers.end()) continue;
    next.members.push_back(id);
    old_rank_of_new.push_back(cur.comm_rank_of(id));
  }
  for (int32_t id : joiners) {
    next.members.push_back(id);
    old_rank_of_new.push_back(-1);
  }
  const auto plan_start = Clock::now();
  absl::StatusOr<parallel::ExpertPlacement> planned = PlanFor(*placement, old_rank_of_new, false);
  SY_LOG(INFO) << "placement for " << next.members.size() << " ranks planned in "
               << Since(plan_start) << " s";
  if (!planned.ok()) {
    SY_LOG(ERROR) << "placing experts for the next epoch: " << planned.status();
    membership_->RefuseJoin(joiners, sy::Annotate(planned.status(), "placing the experts"));
    return;
  }
  next.epoch = membership_->NextEpoch();
  next.store_prefix = PrefixOf(next.epoch);
  next.placement_json = planned->WithEpoch(placement->epoch() + 1).ToJson();
  absl::Status s = RunControl([&]() { return PrepareEpoch(next, cur.epoch, joiners, leavers); });
  if (s.code() == absl::StatusCode::kAborted) {
    SY_LOG(INFO) << "the group changed while epoch " << next.epoch << " was planned; again";
  } else if (!s.ok()) {
    SY_LOG(ERROR) << "preparing epoch " << next.epoch << ": " << s;
    membership_->RefuseJoin(joiners, s);
  }
}

// ---- pool events and figures ---------------------------------------------------------------

void DistributedStepExecutor::QueueEvent(PoolEvent event) {
  {
    sy::MutexLock lock(&events_mu_);
    events_.push_back(event);
    ++events_queued_;
  }
  sy::MutexLock lock(&wake_mu_);  // held while it runs: SetWakeup waits for it
  if (wake_) wake_();
}

void DistributedStepExecutor::SetWakeup(std::function<void()> wake) {
  sy::MutexLock lock(&wake_mu_);
  wake_ = std::move(wake);
}

std::vector<PoolEvent> DistributedStepExecutor::TakePoolEvents() {
  sy::MutexLock lock(&events_mu_);
  events_taken_ = events_queued_;
  return std::move(events_);
}

void DistributedStepExecutor::ReportPools(std::span<const PoolUsage> usage) {
  {
    sy::MutexLock lock(&events_mu_);
    events_reported_ = events_taken_;
    usage_.clear();
    for (const PoolUsage& u : usage) usage_[u.pool] = u;
  }
  {
    sy::MutexLock lock(&stats_mu_);
    stats_.rank_kv_blocks.clear();
    for (const PoolUsage& u : usage) stats_.rank_kv_blocks[u.pool] = u.used_blocks;
    const double dt = Since(rate_since_);
    if (dt >= 1.0) {  // tokens per second per rank over the last second or more
      for (const auto& [id, n] : stats_.rank_tokens) rate_[id] = (n - rate_tokens_[id]) / dt;
      rate_tokens_ = stats_.rank_tokens;
      rate_since_ = Clock::now();
    }
  }
  PublishUsage();
}

void DistributedStepExecutor::PublishUsage() {
  std::map<int32_t, PoolUsage> usage;
  {
    sy::MutexLock lock(&events_mu_);
    usage = usage_;
  }
  std::shared_ptr<const parallel::ExpertPlacement> placement;
  parallel::EpochView view;
  std::map<int32_t, double> rates;
  {
    sy::MutexLock lock(&stats_mu_);
    rates = rate_;
    placement = placement_;
    view = view_;
  }
  // Every member of the epoch in force: its pool as the engine last reported it, its slots.
  for (int r = 0; r < view.world_size(); ++r) {
    const int32_t id = view.members[r];
    int64_t slots = 0;
    if (placement != nullptr)
      for (int l = 0; l < placement->num_layers(); ++l)
        for (int s = r * placement->slots_per_rank(); s < (r + 1) * placement->slots_per_rank(); ++s)
          slots += placement->expert_of(l, s) >= 0;
    const PoolUsage u = usage.count(id) ? usage.at(id) : PoolUsage{};
    membership_->SetUsage(id, u.num_seqs, u.used_blocks, slots, rates[id]);
  }
}

void DistributedStepExecutor::PublishStats() {
  if (GroupObserver* o = observer_.load()) o->OnStats(stats());
}

void DistributedStepExecutor::Fail(const absl::Status& status) {
  {
    sy::MutexLock lock(&stats_mu_);
    if (broken_.load()) return;
    broken_status_ = status;
    stats_.broken = true;
    broken_.store(true);
  }
  SY_LOG(ERROR) << "rank group failed: " << status;
  if (GroupObserver* o = observer_.load()) o->OnStats(stats());
  if (on_failure_) on_failure_(status);
}

DistributedStats DistributedStepExecutor::stats() const {
  sy::MutexLock lock(&stats_mu_);
  DistributedStats s = stats_;
  if (stats_dispatcher_ != nullptr) s.dispatch = stats_dispatcher_->stats();
  parallel::EpDispatchStats all = past_dispatch_;
  parallel::AddDispatchStats(&all, s.dispatch);
  s.split = SplitSteps(s.steps, step_seconds_, collective_seconds_, model_->forward_times(), &all);
  return s;
}

}  // namespace sy::scheduler
