// Sampler: picks the next token from logits with a request's sampling parameters.
//
// temperature == 0 is greedy (argmax, lowest id on ties). Otherwise: logits / temperature,
// keep the top_k best (0 = all), softmax, keep the smallest set whose probability reaches
// top_p (nucleus), renormalise, and draw with the sequence's own RNG seeded from `seed`, so
// the same seed gives the same tokens. Thread safety: one Sampler per sequence.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace sy::model {

struct SamplingParams {
  float temperature = 0.f;
  float top_p = 1.f;
  int32_t top_k = 0;
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  int32_t Sample(const float* logits, int64_t vocab_size);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

// argmax with the lowest id on ties.
int32_t Greedy(const float* logits, int64_t vocab_size);

}  // namespace sy::model
