// StepExecutor: the one seam through which the Engine runs the model for a step.
//
// The engine decides the batch (BatchScheduler) and hands the executor one SequenceInput per
// scheduled sequence (tokens, start position, block table) with the sequence's home (the KV
// pool it lives in, scheduler/kv_pools.h); the executor runs the forward pass and returns
// logits for the inputs that ask for them. LocalStepExecutor runs a MoeModel with a KvCache in
// this process (one pool, id 0). DistributedStepExecutor (distributed_executor.h) runs a rank
// group whose members come and go; it tells the engine how the pools change through
// PoolEvents, which the engine applies at the top of its next step.
//
// Execute's status:
//   OK           logits hold a row per input with compute_logits, in input order;
//   ABORTED      the group changed under the step (a rank died and the group re-formed, or a
//                home is no longer in the group): nothing of the step counts. The engine takes
//                the pool events (which preempt the lost pools' sequences) and schedules
//                again; the other sequences simply run their chunk again;
//   other        the step failed for good (UNAVAILABLE: the group cannot go on); the engine
//                ends the step's requests with that status.
//
// Thread safety: Execute, TakePoolEvents and ReportPools are called by the engine thread
// only; the wake-up callback may be called from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"

namespace sy::scheduler {

// A change to the engine's KV pools, in the order the executor decided them.
struct PoolEvent {
  enum class Kind {
    kAdded,     // a rank joined: new pool of num_blocks blocks, accepting
    kDraining,  // the rank drains: no new sequences; the ones it has may finish there
    kEvict,     // the drain ran out of time: move its sequences elsewhere (preempt them)
    kLost,      // the rank died: its KV is gone; preempt its sequences, remove the pool
    kRemoved,   // the rank left the group (its pool is empty): remove the pool
  };
  Kind kind = Kind::kAdded;
  int32_t pool = 0;        // the rank's id
  int64_t num_blocks = 0;  // kAdded
};

// One pool as the engine sees it after a step.
struct PoolUsage {
  int32_t pool = 0;
  int64_t num_seqs = 0;     // running sequences homed there
  int64_t used_blocks = 0;
  int64_t num_blocks = 0;
};

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  virtual const model::ModelConfig& config() const = 0;
  // batch[i] is homed in pool homes[i]. logits: resized to [inputs with compute_logits,
  // vocab_size], row-major f32, input order.
  virtual absl::Status Execute(std::span<const model::SequenceInput> batch,
                               std::span<const int32_t> homes, std::vector<float>* logits) = 0;

  // Pool changes since the last call, to apply before the next Schedule.
  virtual std::vector<PoolEvent> TakePoolEvents() { return {}; }
  // The engine's pools after it applied every event taken so far (called after each step and
  // whenever the engine goes idle).
  virtual void ReportPools(std::span<const PoolUsage> usage) {}
  // `wake` makes an idle engine take its pool events; the executor calls it whenever it queues
  // one. Set once, before the engine thread starts.
  virtual void SetWakeup(std::function<void()> wake) {}
};

// Runs `model` (not owned; must outlive the executor) on a KV cache of num_blocks blocks of
// block_size positions: the engine's one pool, id 0.
class LocalStepExecutor : public StepExecutor {
 public:
  LocalStepExecutor(model::MoeModel* model, int64_t num_blocks, int64_t block_size);
  const model::ModelConfig& config() const override { return model_->config(); }
  absl::Status Execute(std::span<const model::SequenceInput> batch,
                       std::span<const int32_t> homes, std::vector<float>* logits) override;

 private:
  model::MoeModel* model_;
  model::KvCache cache_;
};

}  // namespace sy::scheduler
