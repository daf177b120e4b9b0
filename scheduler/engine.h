// Engine: the step loop of the leader (DESIGN.md §2 steps 2-7). gRPC threads Submit requests
// into a bounded intake queue; one engine thread owns the scheduler, the KV pools and the
// executor (which runs the model, here or on a rank group), and loops:
//
//   drain intake → apply pool events (ranks joined, draining, lost) → drop cancelled /
//   past-deadline sequences → Step: batch = Schedule(); RunBatch(batch) (the executor);
//   Postprocess(batch) (sample, stop tokens, EOS, stop strings, length; stream to sinks);
//   EndStep (retire the finished, count the step, then tell their sinks).
//
// A step the executor ABORTED (the rank group re-formed under it) counts for nothing: the
// lost ranks' sequences are preempted by their pool events and prefilled again elsewhere from
// prompt + output so far; a draw is a function of (seed, tokens generated so far), so the
// tokens are those they would have been.
//
// A cancelled request or one past its deadline is removed, and its KV blocks freed, at the
// next step boundary. Drain (graceful shutdown): StopAccepting, then WaitIdle, then Stop.
//
// Thread safety: Submit, StopAccepting, WaitIdle, Stop, stats and limits are safe from any
// thread. Sinks and the observer are called on the engine thread only.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "kernels/core/mutex.h"
#include "model/tokenizer.h"
#include "scheduler/batch_scheduler.h"
#include "scheduler/kv_pools.h"
#include "scheduler/request.h"
#include "scheduler/step_executor.h"

namespace sy::scheduler {

struct EngineOptions {
  SchedulerOptions scheduler;
  int64_t num_blocks = 0;     // KV cache blocks of this process's pool, id 0 (NumBlocksForBytes)
  int64_t block_size = 16;    // positions per block
  int64_t max_queue = 256;    // requests waiting (not yet running) before RESOURCE_EXHAUSTED
};

// KV blocks that fit in `bytes` for this model (at least 0).
int64_t NumBlocksForBytes(const model::ModelConfig& config, int64_t bytes, int64_t block_size);

// Step and request figures for metrics (server/metrics.h). Called on the engine thread.
struct StepStats {
  double seconds = 0;          // schedule + forward + sample + postprocess
  int64_t num_seqs = 0;
  int64_t num_prefill_tokens = 0;
  int64_t num_decode_tokens = 0;
  int64_t num_generated = 0;   // tokens sampled this step
  int64_t num_preempted = 0;
  int64_t running = 0, waiting = 0;
  double kv_usage = 0;         // used blocks / all blocks (every pool) after the step
};

struct RequestStats {
  FinishReason finish_reason = FinishReason::kNone;
  absl::StatusCode code = absl::StatusCode::kOk;
  double queue_seconds = 0;    // arrival → first scheduled (0 if never scheduled)
  double e2e_seconds = 0;      // arrival → finish
  int64_t prompt_tokens = 0;
  int64_t generation_tokens = 0;
};

class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  virtual void OnStep(const StepStats& step) = 0;
  virtual void OnFirstToken(double ttft_seconds) = 0;
  virtual void OnTokenGap(double seconds) = 0;  // between two tokens of one request
  virtual void OnRequestDone(const RequestStats& request) = 0;
};

struct EngineStats {
  int64_t running = 0;
  int64_t waiting = 0;         // intake + scheduler waiting queue
  int64_t kv_blocks_total = 0;  // every pool of the group
  int64_t kv_blocks_free = 0;
  int64_t requests_total = 0;  // accepted by Submit
  int64_t steps = 0;
  int64_t preemptions = 0;
  int64_t recovered = 0;       // sequences prefilled again because their rank died
};

class Engine {
 public:
  // tokenizer may be null (no text output); observer may be null. Both must outlive the
  // engine. Call Start() to run the engine thread.
  Engine(std::unique_ptr<StepExecutor> executor, const model::Tokenizer* tokenizer,
         const EngineOptions& options, EngineObserver* observer = nullptr);
  ~Engine();  // Stop()

  void Start();
  // Validates (InvalidArgument naming the field) and queues. ResourceExhausted when
  // max_queue requests already wait; Unavailable once StopAccepting or Stop was called.
  absl::Status Submit(Request request);
  void StopAccepting();
  // True once nothing is queued or running; false after `timeout`.
  bool WaitIdle(std::chrono::milliseconds timeout);
  // Aborts what is left (finish reason abort, status Unavailable) and joins the thread.
  void Stop();

  const ModelLimits& limits() const { return limits_; }
  const model::ModelConfig& config() const { return executor_->config(); }
  EngineStats stats() const;
  const EngineOptions& options() const { return options_; }

 private:
  void Loop();
  void ApplyPoolEvents();
  void DrainIntake();
  void AbortCancelled();
  // One step; true when it ran to its end (EndStep published the gauges).
  bool Step();
  // The step's batch (and its counts into *st).
  ScheduledBatch Schedule(StepStats* st);
  // Run, and on failure end the batch's requests (or, when the group changed under the step
  // and nothing ran, leave them to be scheduled again). True when there is output to
  // postprocess.
  bool RunBatch(const ScheduledBatch& batch);
  // Retires the finished sequences, counts the step, publishes the gauges, then tells the
  // finished requests' sinks.
  void EndStep(const std::vector<Sequence*>& finished, Clock::time_point start, StepStats* st);
  // The executor runs and samples the batch: sampled_ gets a token per entry that wants one.
  absl::Status Run(const ScheduledBatch& batch);
  // Samples, appends and streams one token per entry with compute_logits; returns the
  // sequences that are done (the caller finishes them once the step is counted).
  std::vector<Sequence*> Postprocess(const ScheduledBatch& batch, StepStats* st);
  // Appends and streams the new token `tok` of `seq`; true when it finished.
  bool AppendToken(Sequence* seq, int32_t tok, Clock::time_point now);
  void Finish(Sequence* seq, FinishReason reason, absl::Status status);
  // Finish in two halves: Retire removes the sequence (its blocks freed, the request counted)
  // and returns what its sink is to be told.
  struct Retired {
    std::shared_ptr<RequestSink> sink;
    Completion completion;
  };
  Retired Retire(Sequence* seq, FinishReason reason, absl::Status status);
  // The gauges stats() reads; with may_be_idle, also whether the engine is idle (waking
  // WaitIdle), which must wait until every finished request's sink has been told.
  void PublishStats(bool may_be_idle = true);
  // Whether the engine is idle (wakes WaitIdle), after a step's sinks heard their ends.
  void PublishIdleness();

  std::unique_ptr<StepExecutor> executor_;
  const model::Tokenizer* tokenizer_;
  EngineOptions options_;
  EngineObserver* observer_;
  ModelLimits limits_;
  std::vector<int32_t> eos_ids_;

  // Engine thread only.
  KvPools pools_;
  BatchScheduler scheduler_;
  int64_t next_seq_id_ = 0;
  std::vector<model::SequenceInput> inputs_;
  std::vector<int32_t> homes_;
  std::vector<PoolUsage> usage_;
  std::vector<SampleSpec> samples_;  // per entry of inputs_
  std::vector<Sequence*> sampling_;  // sequences sampled this step, in sampled_ order
  std::vector<int32_t> sampled_;

  mutable sy::Mutex mu_;
  sy::CondVar cv_;
  sy::CondVar idle_cv_;
  std::deque<Request> intake_ ABSL_GUARDED_BY(mu_);
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool busy_ ABSL_GUARDED_BY(mu_) = false;  // the scheduler holds sequences
  bool wake_ ABSL_GUARDED_BY(mu_) = false;  // the executor queued pool events

  std::atomic<int64_t> num_waiting_{0};  // intake + scheduler waiting
  std::atomic<int64_t> num_running_{0};
  std::atomic<int64_t> kv_free_{0};
  std::atomic<int64_t> kv_total_{0};
  std::atomic<int64_t> recovered_{0};
  std::atomic<int64_t> requests_total_{0};
  std::atomic<int64_t> steps_{0};
  std::atomic<int64_t> preemptions_{0};
  std::thread thread_;
};

}  // namespace sy::scheduler
