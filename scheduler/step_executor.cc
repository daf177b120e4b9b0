#include "scheduler/step_executor.h"

namespace sy::scheduler {

LocalStepExecutor::LocalStepExecutor(model::MoeModel* model, int64_t num_blocks,
                                     int64_t block_size)
    : model_(model), cache_(model->config(), num_blocks, block_size) {}

absl::Status LocalStepExecutor::Execute(std::span<const model::SequenceInput> batch,
                                        std::span<const int32_t> homes,
                                        std::vector<float>* logits) {
  return model_->Forward(batch, cache_, logits);
}

}  // namespace sy::scheduler
