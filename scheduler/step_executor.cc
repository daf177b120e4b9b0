#include "scheduler/step_executor.h"

#include "kernels/core/status.h"
#include "kernels/core/thread_pool.h"

namespace sy::scheduler {

void SampleRows(std::span<const SampleSpec> specs, const float* logits, int64_t vocab,
                int32_t* tokens) {
  // A vocabulary-wide scan per row: a few percent of a batch-32 decode step, so spread.
  ThreadPool::Default().ParallelFor(static_cast<int64_t>(specs.size()), 4,
                                    [&](int64_t begin, int64_t end) {
                                      model::SampleScratch scratch;
                                      for (int64_t i = begin; i < end; ++i)
                                        tokens[i] = model::SampleToken(specs[i].params,
                                                                       specs[i].draw,
                                                                       logits + i * vocab, vocab,
                                                                       &scratch);
                                    });
}

LocalStepExecutor::LocalStepExecutor(model::MoeModel* model, int64_t num_blocks,
                                     int64_t block_size)
    : model_(model), cache_(model->config(), num_blocks, block_size) {}

absl::Status LocalStepExecutor::Execute(std::span<const model::SequenceInput> batch,
                                        std::span<const int32_t> homes,
                                        std::span<const SampleSpec> samples,
                                        std::vector<int32_t>* tokens) {
  SY_RETURN_IF_ERROR(model_->Forward(batch, cache_, &logits_));
  specs_.clear();
  for (size_t i = 0; i < batch.size(); ++i)
    if (WantsToken(batch[i])) specs_.push_back(i < samples.size() ? samples[i] : SampleSpec{});
  tokens->resize(specs_.size());
  SampleRows(specs_, logits_.data(), model_->config().vocab_size, tokens->data());
  return absl::OkStatus();
}

}  // namespace sy::scheduler
