// DistributedStepExecutor: the StepExecutor of the leader (rank 0) of a multi-rank group
// (DESIGN.md §2 steps 3-6, issue 4). The Engine does not change: it hands this executor the
// step's batch as it would a LocalStepExecutor. Per step the executor
//   1. gives every new sequence (start_pos == 0) a HOME RANK, the rank with the least KV
//      load (blocks of the sequences it holds); the home keeps the sequence's KV cache;
//   2. broadcasts the StepPlan (step_plan.h) from rank 0: first its size, then its words;
//   3. runs rank 0's share through the leader's MoeModel, whose MoE layers dispatch over the
//      same communicator (ExpertParallelDispatcher): every rank runs every layer's
//      collectives, also a rank with no sequence this step;
//   4. gathers each rank's logits rows on rank 0 (an all-to-all-v where only rank 0
//      receives) and returns them in input order. The Engine samples on the leader.
// The other ranks run RunRankLoop (worker processes, or threads in `serve --local-ranks`).
//
// Sequence identity: SequenceInput has no sequence id, so a sequence is known by its first KV
// block id, which it owns from its first step until it finishes or is preempted (a
// preempted sequence is recomputed from start_pos 0 and gets a home again). Block ids are
// global: every rank allocates a KvCache of the leader's block count, so a rank's cache is as
// big as the leader's although it holds only its own sequences' blocks (the memory cost of
// the simple design; a per-rank block pool in the BlockManager would remove it).
//
// Idle ranks wait inside a Broadcast, which has the collective time-out; a pump thread sends
// a keep-alive plan when no step ran for a quarter of the time-out, which also notices a
// dead rank while idle. All collectives run on that one thread.
//
// Failure: a failed collective (dead or stuck rank: UNAVAILABLE) breaks the group for good:
// that Execute and every later one return UNAVAILABLE at once, and `on_failure` runs once
// (the daemon turns health to NOT_SERVING). Re-forming the group is DESIGN.md §5.
//
// Thread safety: Execute on the engine thread; stats() from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"
#include "parallel/communicator.h"
#include "parallel/ep_dispatch.h"
#include "scheduler/step_executor.h"
#include "scheduler/step_plan.h"

namespace sy::scheduler {

struct DistributedStats {
  int world_size = 1;
  bool broken = false;
  int64_t steps = 0;
  std::vector<int64_t> rank_tokens;      // [world_size] tokens run per home rank, cumulative
  std::vector<int64_t> rank_kv_blocks;   // [world_size] KV blocks of live sequences per rank
  parallel::EpDispatchStats dispatch;    // the leader's dispatcher
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
  // model: the leader's share (its experts), not owned, outlives the executor; its dispatcher
  // is replaced by an ExpertParallelDispatcher over `comm` and restored on destruction.
  // comm: rank 0 of the group; owned_comm may own it (or be null when someone else does).
  static absl::StatusOr<std::unique_ptr<DistributedStepExecutor>> Create(
      model::MoeModel* model, parallel::Communicator* comm,
      std::unique_ptr<parallel::Communicator> owned_comm,
      std::shared_ptr<const parallel::ExpertPlacement> placement, int64_t num_blocks,
      int64_t block_size, std::function<void(const absl::Status&)> on_failure = nullptr);
  // Sends the shutdown plan (ranks leave their loop) unless the group is broken.
  ~DistributedStepExecutor() override;

  const model::ModelConfig& config() const override { return model_->config(); }
  absl::Status Execute(std::span<const model::SequenceInput> batch,
                       std::span<const int32_t> homes, std::vector<float>* logits) override;
  std::vector<PoolEvent> TakePoolEvents() override;
  void ReportPools(std::span<const PoolUsage> usage) override;

  DistributedStats stats() const;
  bool broken() const { return broken_.load(); }
  // Called with stats() after every step and once when the group fails (engine or pump
  // thread). Set before the first Execute.
  void SetStatsObserver(std::function<void(const DistributedStats&)> observer) {
    stats_observer_ = std::move(observer);
  }

  // Live placement and load statistics (issue 5; scheduler/rank_control.h; defined in
  // rank_control_leader.cc). Each call queues a control plan that the pump thread runs
  // before the next step (at once when idle) and blocks the caller until it ran; never call
  // from the engine thread.
  // The placement in force.
  std::shared_ptr<const parallel::ExpertPlacement> placement() const;
  // Switches every rank to `placement` (its epoch is replaced by the current one + 1) at one
  // step boundary, after the ranks mapped the experts they gain `layers_per_plan` layers per
  // control plan (steps run in between). INVALID_ARGUMENT when its shape does not fit the
  // group or the model; UNAVAILABLE when the group is (or becomes) broken.
  absl::StatusOr<PlacementSwitchReport> SwitchPlacement(const parallel::ExpertPlacement& placement,
                                                        int layers_per_plan = 4);
  // Every rank's expert-load window as trace JSON, in rank order; rank 0's entry is "" (the
  // leader's recorder is read directly by whoever installed it).
  absl::StatusOr<std::vector<std::string>> GatherLoadTraces();

 private:
  DistributedStepExecutor(model::MoeModel* model, parallel::Communicator* comm,
                          int64_t num_blocks, int64_t block_size);
  void Pump();
  // On the pump thread: one plan through the group (broadcast, own share, gather).
  absl::Status RunPlan(PlanKind kind);
  // Queues `fn` for the pump thread and waits for it (UNAVAILABLE once stopping).
  absl::Status RunControl(std::function<absl::Status()> fn);
  void Fail(const absl::Status& status);
  static absl::Status AsUnavailablePlacement(const absl::Status& s) {
    return s.code() == absl::StatusCode::kUnavailable
               ? s
               : absl::UnavailableError(std::string("rank control: ") + std::string(s.message()));
  }

  model::MoeModel* model_;
  parallel::Communicator* comm_;
  std::unique_ptr<parallel::Communicator> owned_comm_;
  std::unique_ptr<parallel::ExpertParallelDispatcher> dispatcher_;
  model::KvCache cache_;
  std::function<void(const absl::Status&)> on_failure_;
  std::function<void(const DistributedStats&)> stats_observer_;
  std::chrono::milliseconds keepalive_;

  // Engine thread only.
  std::vector<PlannedSequence> planned_;
  std::vector<PoolEvent> initial_pools_;

  // Handed from the engine thread to the pump thread.
  std::mutex mu_;
  std::condition_variable cv_;
  bool job_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status job_status_ ABSL_GUARDED_BY(mu_);
  std::span<const PlannedSequence> job_seqs_;  // valid while job_ is set
  std::vector<float>* job_logits_ = nullptr;
  absl::Status broken_status_;  // set once, before broken_ turns true
  std::deque<std::function<void(bool run)>> controls_ ABSL_GUARDED_BY(mu_);  // rank_control_leader.cc
  std::shared_ptr<const parallel::ExpertPlacement> placement_ ABSL_GUARDED_BY(stats_mu_);
  std::mutex switch_mu_;  // one SwitchPlacement at a time

  // Pump thread only.
  std::vector<int32_t> words_;
  std::vector<model::SequenceInput> own_inputs_;
  std::vector<float> own_logits_, gathered_;

  std::atomic<bool> broken_{false};
  mutable std::mutex stats_mu_;
  DistributedStats stats_ ABSL_GUARDED_BY(stats_mu_);
  std::thread pump_;
};

// The loop of every rank but 0: receive a plan, run this rank's sequences through `model`
// (whose dispatcher is this rank's ExpertParallelDispatcher over `comm`) on `cache`, send
// the logits rows to rank 0; until a shutdown plan (OK) or a failed collective
// (UNAVAILABLE: the leader or a peer is gone). `stop` (may be null) is checked between
// plans. The loop records the rank's expert load (an ExpertLoadRecorder on `model` while it
// runs) and answers control plans (scheduler/rank_control.h).
absl::Status RunRankLoop(parallel::Communicator* comm, model::MoeModel* model,
                         model::KvCache* cache, const std::atomic<bool>* stop = nullptr);

// Logical experts rank `rank` holds per layer under `placement` (LoadOptions::experts_per_layer).
std::vector<std::vector<int32_t>> ExpertsOfRank(const parallel::ExpertPlacement& placement,
                                                int rank);

}  // namespace sy::scheduler
