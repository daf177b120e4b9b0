// StepExecutor: the one seam through which the Engine runs the model for a step.
//
// The engine decides the batch (BatchScheduler) and hands the executor one SequenceInput per
// scheduled sequence (tokens, start position, block table); the executor runs the forward
// pass and returns logits for the inputs that ask for them. LocalStepExecutor runs a MoeModel
// with a KvCache on this process. The multi-rank engine (issue 4) adds an executor that
// broadcasts a step plan to the ranks and gathers their logits; the Engine does not change.
//
// Thread safety: Execute is called by the engine thread only.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"

namespace sy::scheduler {

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  virtual const model::ModelConfig& config() const = 0;
  // logits: resized to [inputs with compute_logits, vocab_size], row-major f32, input order.
  virtual absl::Status Execute(std::span<const model::SequenceInput> batch,
                               std::vector<float>* logits) = 0;
};

// Runs `model` (not owned; must outlive the executor) on a KV cache of num_blocks blocks of
// block_size positions.
class LocalStepExecutor : public StepExecutor {
 public:
  LocalStepExecutor(model::MoeModel* model, int64_t num_blocks, int64_t block_size);
  const model::ModelConfig& config() const override { return model_->config(); }
  absl::Status Execute(std::span<const model::SequenceInput> batch,
                       std::vector<float>* logits) override;

 private:
  model::MoeModel* model_;
  model::KvCache cache_;
};

}  // namespace sy::scheduler
