// DistributedStepExecutor: the StepExecutor of the leader (rank 0) of an elastic rank group
// (DESIGN.md §2 steps 4-6 and §5; parallel/MEMBERSHIP.md). The Engine does not know how many
// ranks there are: it hands over each step's batch with each sequence's home (a rank id, whose
// KV pool holds the sequence), and applies the PoolEvents this executor queues when ranks
// join, drain or die.
//
// Per step (the pump thread): the StepPlan (step_plan.h) is broadcast on the epoch's
// communicator, every rank runs its own sequences through its model (whose MoE layers
// dispatch over the same communicator) and samples them, and the other ranks send their token
// ids back (4 bytes per sequence, not a logits row). With the leader alone (an epoch of one
// rank) the step is a plain forward pass and sampling.
//
// Membership, one change at a time, at step boundaries:
//   * join / drain (the controller thread plans, the pump applies): the new epoch's placement
//     comes from GroupOptions::plan (the planner with its migration term); a kEpochPrepare
//     control plan makes every staying rank map its new experts and build the new
//     communicator in the background (BackgroundComm) while steps go on; once every rank of
//     the new epoch set its ready key, a kEpochCommit plan switches all of them at one step
//     boundary (membership epoch and placement epoch together). A joining rank's pool is
//     added then (PoolEvent kAdded). A draining rank first stops taking sequences
//     (kDraining); its sequences finish, or are moved after drain_timeout (kEvict); once its
//     pool is empty it is left out of the next epoch (kRemoved) and exits.
//   * failure (the pump, inside the failed step): any failed collective aborts the
//     communicator; the Membership's epoch is broken (heartbeats tell every rank, which aborts
//     its own communicator and checks in); ranks that do not check in before their heartbeat
//     goes stale are declared dead and fenced; the survivors form a new epoch at once (the
//     dead ranks' experts go to survivors: a surviving replica, else each survivor's own
//     checkpoint); the step returns ABORTED and kLost events make the engine prefill the dead
//     ranks' sequences again elsewhere. UNAVAILABLE only when no group can be formed.
//
// Idle ranks wait for the next plan with the collective time-out; a keep-alive plan every
// time-out/4 keeps them there and notices a dead rank while idle.
//
// Thread safety: Execute, TakePoolEvents, ReportPools on the engine thread; SwitchPlacement,
// GatherLoadTraces from any other thread (they wait for the pump); stats() and placement()
// from any thread. All collectives run on the pump thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "kernels/core/mutex.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"
#include "parallel/communicator.h"
#include "parallel/ep_dispatch.h"
#include "parallel/membership.h"
#include "scheduler/rank_epoch.h"
#include "scheduler/step_executor.h"
#include "scheduler/step_plan.h"
#include "scheduler/step_split.h"

namespace sy::scheduler {

// Places experts for a new membership: old_rank_of_new[j] is the rank of `current` that
// becomes rank j (-1: a joiner). urgent: a failure, the group waits for the answer.
using MembershipPlanFn = std::function<absl::StatusOr<parallel::ExpertPlacement>(
    const parallel::ExpertPlacement& current, const std::vector<int>& old_rank_of_new,
    bool urgent)>;

struct GroupOptions {
  int64_t num_blocks = 0;  // the leader's KV pool (id 0)
  int64_t block_size = 16;
  std::chrono::milliseconds timeout{30000};        // collectives and rendezvous
  std::chrono::milliseconds drain_timeout{30000};  // then a draining rank's sequences move
  // A prepared epoch whose ranks are not all connected by then is abandoned.
  std::chrono::milliseconds join_timeout{60000};
  parallel::CommunicatorFactory make_comm;  // rank 0's communicators
  MembershipPlanFn plan;                    // null: PlanMembership, even loads (ilp / repair)
  parallel::EpDispatchOptions dispatch;
};

struct DistributedStats {
  int64_t epoch = 0;
  int world_size = 1;
  std::vector<int32_t> members;  // rank id of each comm rank
  bool broken = false;
  int64_t steps = 0;
  std::map<int32_t, int64_t> rank_tokens;     // by rank id: tokens run there, cumulative
  std::map<int32_t, int64_t> rank_kv_blocks;  // by rank id: KV blocks its sequences hold
  parallel::EpDispatchStats dispatch;         // the leader's dispatcher in this epoch
  StepSplit split;                            // where the leader's steps went (all epochs)
  int64_t joins = 0, drains = 0, failures = 0;  // membership changes by reason
  int64_t migrated_bytes = 0;  // expert bytes ranks mapped for membership changes
};

struct MembershipChange {
  enum class Reason { kJoin, kDrain, kFailure };
  Reason reason = Reason::kJoin;
  int64_t epoch = 0;
  std::vector<int32_t> joined, left, lost;
  int64_t migrated_bytes = 0;
  double seconds = 0;  // prepare to commit (join/drain), detection to re-formed (failure)
};
const char* ReasonName(MembershipChange::Reason r);

// Called on the pump or engine thread; must not block.
class GroupObserver {
 public:
  virtual ~GroupObserver() = default;
  virtual void OnStats(const DistributedStats& stats) {}
  virtual void OnMembershipChange(const MembershipChange& change) {}
  // A joined rank ran its first tokens: seconds since its join call.
  virtual void OnFirstTokens(int32_t id, double seconds_since_join) {}
  // The first step of a re-formed group: seconds since the failure was detected.
  virtual void OnRecovered(double seconds) {}
};

// What SwitchPlacement did, summed over ranks.
struct PlacementSwitchReport {
  int64_t epoch = 0;
  int64_t experts_gained = 0, experts_released = 0;
  int64_t gained_bytes = 0, released_bytes = 0;
  double seconds = 0;  // from the call to every rank switched
};

class DistributedStepExecutor : public StepExecutor {
 public:
  // model: the leader's share (loaded with at least its experts of `first`), not owned.
  // membership: the group's (not owned; outlives the executor); `first` becomes its epoch in
  // force; its other members are already serving it (threads of this process) or none.
  // first_comm: rank 0's communicator of `first` (null when first has one rank).
  // on_failure runs once when no group can be formed any more.
  static absl::StatusOr<std::unique_ptr<DistributedStepExecutor>> Create(
      model::MoeModel* model, parallel::Membership* membership, GroupOptions options,
      const parallel::EpochView& first, std::unique_ptr<parallel::Communicator> first_comm,
      std::function<void(const absl::Status&)> on_failure = nullptr);
  // Sends the shutdown plan (ranks leave their loop) unless the group is broken.
  ~DistributedStepExecutor() override;

  const model::ModelConfig& config() const override { return model_->config(); }
  absl::Status Execute(std::span<const model::SequenceInput> batch,
                       std::span<const int32_t> homes, std::span<const SampleSpec> samples,
                       std::vector<int32_t>* tokens) override;
  std::vector<PoolEvent> TakePoolEvents() override;
  void ReportPools(std::span<const PoolUsage> usage) override;
  void SetWakeup(std::function<void()> wake) override;

  DistributedStats stats() const;
  bool broken() const { return broken_.load(); }
  // Not owned; must outlive the executor (or be replaced by null first).
  void SetObserver(GroupObserver* observer) { observer_.store(observer); }

  // Live placement and load statistics (scheduler/rank_control.h; rank_control_leader.cc).
  // Each call queues a control plan that the pump runs before the next step (at once when
  // idle) and blocks the caller until it ran; never call from the engine thread.
  std::shared_ptr<const parallel::ExpertPlacement> placement() const;
  // Switches every rank to `placement` (its epoch is replaced by the current one + 1) at one
  // step boundary, after the ranks mapped the experts they gain `layers_per_plan` layers per
  // control plan (steps run in between). INVALID_ARGUMENT when its shape does not fit the
  // group or the model; ABORTED when the membership changed meanwhile (plan again);
  // UNAVAILABLE when the group is down.
  absl::StatusOr<PlacementSwitchReport> SwitchPlacement(const parallel::ExpertPlacement& placement,
                                                        int layers_per_plan = 4);
  // Every rank's expert-load window as trace JSON, in comm rank order; rank 0's entry is ""
  // (the leader's recorder is read directly by whoever installed it).
  absl::StatusOr<std::vector<std::string>> GatherLoadTraces();

 private:
  struct Pending;  // a prepared epoch waiting for its ranks to connect

  DistributedStepExecutor(model::MoeModel* model, parallel::Membership* membership,
                          GroupOptions options);
  // Pump thread.
  void Pump();
  absl::Status RunStepJob();
  absl::Status RunPlan(PlanKind kind, std::span<const int32_t> payload = {});
  // A step plan: broadcast, the leader's own forward pass, the results gathered.
  absl::Status RunStep(double* collective_seconds);
  absl::Status Broadcast(PlanKind kind, std::span<const int32_t> payload);
  absl::Status PrepareEpoch(const parallel::EpochView& view, int64_t based_on,
                            const std::vector<int32_t>& joiners,
                            const std::vector<int32_t>& leavers);
  void CheckPending();
  void CommitPending();
  void AbortPending(const absl::Status& why);
  // A collective failed: re-form the group from the survivors (or fail it for good).
  void Reform(const absl::Status& cause);
  void Install(RankEpoch next);
  // Queues `fn` for the pump thread and waits for it (UNAVAILABLE once stopping). A failure
  // that broke the communicator re-forms the group before the caller gets its status.
  absl::Status RunControl(std::function<absl::Status()> fn);
  // Controller thread: joins and drains.
  void Controller();
  void Reconcile();
  void QueueEvent(PoolEvent event);
  void Fail(const absl::Status& status);
  void PublishStats();
  // Each member's pool, slots and token rate into the Membership (GetMembership).
  void PublishUsage();
  absl::StatusOr<parallel::ExpertPlacement> PlanFor(const parallel::ExpertPlacement& current,
                                                   const std::vector<int>& old_rank_of_new,
                                                   bool urgent) const;

  model::MoeModel* model_;
  parallel::Membership* membership_;
  GroupOptions options_;
  model::KvCache cache_;
  std::function<void(const absl::Status&)> on_failure_;
  std::atomic<GroupObserver*> observer_{nullptr};
  std::chrono::milliseconds keepalive_;

  // Pump thread only.
  RankEpoch cur_;
  std::unique_ptr<Pending> pending_;
  std::vector<std::unique_ptr<BackgroundComm>> graveyard_;  // abandoned builds, until done
  struct Retired {
    RankEpoch epoch;
    std::chrono::steady_clock::time_point since;
  };
  std::deque<Retired> retired_;  // old epochs' communicators, closed a little later
  std::vector<int32_t> words_;
  std::vector<model::SequenceInput> own_inputs_;
  std::vector<float> own_logits_;
  std::vector<SampleSpec> own_specs_;
  std::vector<int32_t> own_tokens_, gathered_;
  std::chrono::steady_clock::time_point last_plan_{};
  int reforms_without_step_ = 0;
  std::optional<std::chrono::steady_clock::time_point> recovering_since_;
  std::map<int32_t, std::chrono::steady_clock::time_point> awaiting_first_tokens_;

  // Engine thread (while a job is posted, the pump reads and rewrites it).
  std::vector<PlannedSequence> planned_;
  std::vector<int32_t> planned_ids_;

  // Engine thread <-> pump thread.
  sy::Mutex mu_;
  sy::CondVar cv_;
  bool job_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status job_status_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t>* job_tokens_ = nullptr;
  std::deque<std::function<void(bool run)>> controls_ ABSL_GUARDED_BY(mu_);
  sy::Mutex switch_mu_;  // guards no data: one SwitchPlacement at a time
  std::atomic<bool> switching_placement_{false};
  std::atomic<bool> pending_epoch_{false};

  // Pool events (any thread -> engine thread) and the engine's reports.
  mutable sy::Mutex events_mu_;
  std::vector<PoolEvent> events_ ABSL_GUARDED_BY(events_mu_);
  int64_t events_queued_ ABSL_GUARDED_BY(events_mu_) = 0;
  int64_t events_taken_ ABSL_GUARDED_BY(events_mu_) = 0;
  int64_t events_reported_ ABSL_GUARDED_BY(events_mu_) = 0;  // taken before the last report
  std::map<int32_t, PoolUsage> usage_ ABSL_GUARDED_BY(events_mu_);
  sy::Mutex wake_mu_;  // never held with events_mu_
  std::function<void()> wake_ ABSL_GUARDED_BY(wake_mu_);

  // Controller thread.
  struct Drain {
    int64_t event_seq = 0;  // the kDraining (or kEvict) event the engine must have applied
    std::chrono::steady_clock::time_point deadline;
    bool evicted = false;
  };
  std::map<int32_t, Drain> drains_;
  sy::Mutex ctl_mu_;
  sy::CondVar ctl_cv_;
  bool ctl_stop_ ABSL_GUARDED_BY(ctl_mu_) = false;
  bool ctl_work_ ABSL_GUARDED_BY(ctl_mu_) = false;

  std::atomic<bool> broken_{false};
  mutable sy::Mutex stats_mu_;
  DistributedStats stats_ ABSL_GUARDED_BY(stats_mu_);
  absl::Status broken_status_ ABSL_GUARDED_BY(stats_mu_);
  std::shared_ptr<const parallel::ExpertPlacement> placement_ ABSL_GUARDED_BY(stats_mu_);
  parallel::EpochView view_ ABSL_GUARDED_BY(stats_mu_);  // the epoch in force
  std::chrono::steady_clock::time_point rate_since_ ABSL_GUARDED_BY(stats_mu_){};
  std::map<int32_t, int64_t> rate_tokens_ ABSL_GUARDED_BY(stats_mu_);
  std::map<int32_t, double> rate_ ABSL_GUARDED_BY(stats_mu_);
  const parallel::ExpertParallelDispatcher* stats_dispatcher_ ABSL_GUARDED_BY(stats_mu_) = nullptr;
  parallel::EpDispatchStats past_dispatch_ ABSL_GUARDED_BY(stats_mu_);  // epochs gone by
  double step_seconds_ ABSL_GUARDED_BY(stats_mu_) = 0;        // the leader's steps
  double collective_seconds_ ABSL_GUARDED_BY(stats_mu_) = 0;  // of which plan and results

  std::thread pump_, controller_;
};

}  // namespace sy::scheduler
