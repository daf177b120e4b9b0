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
#include "model/sampler.h"

namespace sy::scheduler {

// How to pick the next token of an input that wants one (model/sampler.h).
struct SampleSpec {
  model::SamplingParams params;
  uint64_t draw = 0;  // the sequence's tokens generated so far
};

// An input wants a token when it asks for logits and has tokens this step.
inline bool WantsToken(const model::SequenceInput& in) {
  return in.compute_logits && !in.tokens.empty();
}

// tokens[i] = the token that row i of `logits` ([rows, vocab] f32) gives under specs[i], on
// the default thread pool.
void SampleRows(std::span<const SampleSpec> specs, const float* logits, int64_t vocab,
                int32_t* tokens);

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
  // batch[i] is homed in pool homes[i] and, when it wants a token, is sampled with samples[i]
  // where its logits are (the home rank: only token ids travel). tokens: resized to one per
  // input that wants a token, in input order.
  virtual absl::Status Execute(std::span<const model::SequenceInput> batch,
                               std::span<const int32_t> homes,
                               std::span<const SampleSpec> samples,
                               std::vector<int32_t>* tokens) = 0;

  // Pool changes since the last call, to apply before the next Schedule.
  virtual std::vector<PoolEvent> TakePoolEvents() { return {}; }
  // The engine's pools after it applied every event taken so far (called after each step and
  // whenever the engine goes idle).
  virtual void ReportPools(std::span<const PoolUsage> usage) {}
  // `wake` makes an idle engine take its pool events; the executor calls it whenever it queues
  // one. Set before the engine thread starts; once SetWakeup (nullptr when the engine stops)
  // returns, the previous `wake` is not running and will not run again.
  virtual void SetWakeup(std::function<void()> wake) {}
};

// Runs `model` (not owned; must outlive the executor) on a KV cache of num_blocks blocks of
// block_size positions: the engine's one pool, id 0.
class LocalStepExecutor : public StepExecutor {
 public:
  LocalStepExecutor(model::MoeModel* model, int64_t num_blocks, int64_t block_size);
  const model::ModelConfig& config() const override { return model_->config(); }
  absl::Status Execute(std::span<const model::SequenceInput> batch,
                       std::span<const int32_t> homes, std::span<const SampleSpec> samples,
                       std::vector<int32_t>* tokens) override;

 private:
  model::MoeModel* model_;
  model::KvCache cache_;
  std::vector<float> logits_;
  std::vector<SampleSpec> specs_;
};

}  // namespace sy::scheduler
