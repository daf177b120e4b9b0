// Sampler: picks the next token from logits with a request's sampling parameters.
//
// temperature == 0 is greedy (argmax, lowest id on ties). Otherwise: logits / temperature,
// keep the top_k best (0 = all), softmax, keep the smallest set whose probability reaches
// top_p (nucleus), renormalise, and draw. The draw's random number is a hash of (seed, draw
// index), the index counting the sequence's generated tokens: the same seed gives the same
// tokens, on whichever rank and after whatever preemption the sequence is sampled
// (SampleToken; Sampler counts the draws itself). Thread safety: one Sampler per sequence;
// SampleToken is pure (scratch is the caller's).
#pragma once

#include <cstdint>
#include <vector>

namespace sy::model {

struct SamplingParams {
  float temperature = 0.f;
  float top_p = 1.f;
  int32_t top_k = 0;
  uint64_t seed = 0;
};

using SampleScratch = std::vector<std::pair<float, int32_t>>;

// Draw number `draw` (0 for a sequence's first generated token) of a sequence with `params`.
int32_t SampleToken(const SamplingParams& params, uint64_t draw, const float* logits,
                    int64_t vocab_size, SampleScratch* scratch);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params) {}
  int32_t Sample(const float* logits, int64_t vocab_size) {
    return SampleToken(params_, draws_++, logits, vocab_size, &scratch_);
  }
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  uint64_t draws_ = 0;
  SampleScratch scratch_;
};

// argmax with the lowest id on ties.
int32_t Greedy(const float* logits, int64_t vocab_size);

}  // namespace sy::model
