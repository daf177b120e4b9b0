// RankRunner: the life of one rank that is not the leader (a `switchyard worker` process, or
// a thread of `serve --local-ranks`), across membership epochs (DESIGN.md §5,
// parallel/MEMBERSHIP.md).
//
// In an epoch the rank runs the step protocol (scheduler/step_plan.h) on the epoch's
// communicator: receive a plan, run the sequences homed here (attention on its own KV pool,
// MoE layers through the dispatcher: every rank joins every collective), send their logits to
// rank 0; answer control plans (placement switch, load statistics, scheduler/rank_control.h);
// and for membership:
//   kEpochPrepare  map the experts the next epoch gives it and build its communicator on a
//                  background thread (BackgroundComm), while this epoch keeps serving;
//   kEpochCommit   switch to the new communicator, dispatcher and placement at this step
//                  boundary; a rank that is not in the new epoch (drained out) leaves: OK;
//   kEpochAbort    forget the prepared epoch and the experts mapped for it.
// When a collective fails (a peer or the leader died, or the heartbeat learnt that the epoch
// broke), the rank checks in with the leader (MembershipClient::AwaitRestart) and enters the
// re-formed epoch it is given. Its KV cache survives: its sequences go on where they were.
//
// A heartbeat thread tells the leader the rank lives, every heartbeat_interval, and learns:
// the epoch broke (abort the communicator, so the serving thread stops waiting for a dead
// peer), or this rank was fenced (declared dead while it was stopped or cut off: abort and
// leave with FAILED_PRECONDITION; it must join again as a new rank).
//
// Thread safety: Run blocks its thread; Kill, Leave and exit() from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "kernels/core/mutex.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"
#include "parallel/ep_dispatch.h"
#include "parallel/expert_load.h"
#include "parallel/membership.h"
#include "scheduler/rank_epoch.h"
#include "scheduler/step_split.h"
#include "scheduler/step_plan.h"

namespace sy::scheduler {

struct RankRunnerOptions {
  int32_t id = 0;                 // this rank's id (parallel/membership.h)
  model::MoeModel* model = nullptr;  // not owned; this rank's share
  int64_t num_blocks = 0;         // this rank's KV pool
  int64_t block_size = 16;
  parallel::CommunicatorFactory make_comm;
  parallel::RendezvousStore* store = nullptr;     // the leader's store (ready keys); not owned
  parallel::MembershipClient* client = nullptr;   // not owned
  std::chrono::milliseconds heartbeat_interval{200};
  // How long the rank waits for a re-formed epoch (and tolerates a silent leader).
  std::chrono::milliseconds restart_timeout{30000};
  parallel::EpDispatchOptions dispatch;
};

enum class RankExit {
  kRunning,
  kShutdown,    // the leader shut the group down (OK)
  kRemoved,     // drained out of the group (OK)
  kFenced,      // declared dead: FAILED_PRECONDITION; join again as a new rank
  kLeaderGone,  // the leader is unreachable: UNAVAILABLE
  kNeverFormed, // the epoch it joined into never formed: UNAVAILABLE; join again
  kKilled,      // Kill()
};
const char* RankExitName(RankExit e);

// What a rank has done, for its own /metrics (server/worker.h). Cumulative over epochs.
struct RankStats {
  int64_t epoch = 0;        // membership epoch it serves in (0: none yet)
  int comm_rank = -1;
  int world_size = 0;
  bool leaving = false;     // it asked to be drained out
  RankExit exit = RankExit::kRunning;
  int64_t steps = 0;        // step plans run
  int64_t tokens = 0;       // tokens of its home sequences
  int64_t kv_blocks = 0;    // its KV pool
  int64_t kv_blocks_used = 0;  // blocks its sequences of the latest step hold
  parallel::EpDispatchStats dispatch;  // bytes and seconds summed over its epochs
  StepSplit split;                     // where its steps went
};

class RankRunner {
 public:
  explicit RankRunner(RankRunnerOptions options);
  ~RankRunner();

  // Serves from `first` (the epoch this rank joined into, or the group's first) until it
  // leaves; exit() says why. `joining`: the rank was not in the group before `first` (an
  // epoch that never forms is then kNeverFormed, not a failure to recover from).
  absl::Status Run(const parallel::EpochView& first, bool joining);
  RankExit exit() const { return exit_.load(); }
  // Any thread.
  RankStats stats() const;

  // Asks the leader to drain this rank out (the worker's SIGTERM); Run returns OK once the
  // leader let it go.
  absl::Status Leave();
  // Stops at once without telling anyone, as a killed process would (tests).
  void Kill();

 private:
  absl::Status EnterView(const parallel::EpochView& view);
  // The plan loop of the epoch in force; returns when the rank leaves it.
  absl::Status Serve();
  absl::Status HandleMembershipPlan(const DecodedPlan& plan, bool* left);
  void Heartbeats();
  void AbortComm();
  void SetEpoch(RankEpoch next);

  RankRunnerOptions o_;
  model::KvCache cache_;
  parallel::ExpertLoadRecorder recorder_;

  // Serving thread.
  RankEpoch cur_;
  std::unique_ptr<BackgroundComm> pending_build_;
  parallel::EpochView pending_view_;
  std::vector<std::unique_ptr<BackgroundComm>> graveyard_;
  std::deque<std::pair<RankEpoch, std::chrono::steady_clock::time_point>> retired_;

  sy::Mutex comm_mu_;  // the heartbeat thread aborts the communicator in force
  parallel::Communicator* comm_ ABSL_GUARDED_BY(comm_mu_) = nullptr;
  std::atomic<int64_t> epoch_{0};
  std::atomic<RankExit> exit_{RankExit::kRunning};
  std::atomic<bool> leaving_{false};
  mutable sy::Mutex stats_mu_;
  RankStats stats_ ABSL_GUARDED_BY(stats_mu_);
  parallel::EpDispatchStats past_ ABSL_GUARDED_BY(stats_mu_);  // epochs gone by
  std::vector<char> plan_bytes_;  // ReceivePlan's scratch (the serving thread)
  double step_seconds_ ABSL_GUARDED_BY(stats_mu_) = 0;        // plan received → results sent
  double collective_seconds_ ABSL_GUARDED_BY(stats_mu_) = 0;  // of which plan and results
  const parallel::ExpertParallelDispatcher* dispatcher_ ABSL_GUARDED_BY(stats_mu_) = nullptr;
  std::atomic<bool> stop_{false};
  std::atomic<bool> fenced_{false};
  std::atomic<bool> leader_gone_{false};
  // Guards no data: pairs hb_cv_ with stop_ (an atomic), so Stop wakes the heartbeat thread.
  sy::Mutex hb_mu_;
  sy::CondVar hb_cv_;
  std::thread heartbeat_;
};

}  // namespace sy::scheduler
