#include "model/sampler.h"

#include <algorithm>
#include <cmath>

namespace sy::model {

int32_t Greedy(const float* logits, int64_t vocab_size) {
  int32_t best = 0;
  for (int64_t i = 1; i < vocab_size; ++i)
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  return best;
}

namespace {

// splitmix64's finaliser: a bijection that spreads every input bit over the output.
uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

int32_t SampleToken(const SamplingParams& params_, uint64_t draw, const float* logits,
                    int64_t vocab_size, SampleScratch* scratch) {
  if (params_.temperature <= 0.f) return Greedy(logits, vocab_size);
  const double inv_t = 1.0 / params_.temperature;
  SampleScratch& scratch_ = *scratch;
  scratch_.resize(vocab_size);
  for (int64_t i = 0; i < vocab_size; ++i) scratch_[i] = {logits[i], static_cast<int32_t>(i)};
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int64_t keep = vocab_size;
  if (params_.top_k > 0 && params_.top_k < vocab_size) {
    keep = params_.top_k;
    std::partial_sort(scratch_.begin(), scratch_.begin() + keep, scratch_.end(), better);
  } else {
    std::sort(scratch_.begin(), scratch_.end(), better);
  }
  // Softmax over the kept candidates (sorted best first), in double.
  std::vector<double> p(keep);
  const double mx = scratch_[0].first;
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += (p[i] = std::exp((scratch_[i].first - mx) * inv_t));
  // Nucleus: the smallest prefix whose mass reaches top_p.
  int64_t n = keep;
  if (params_.top_p < 1.f) {
    double acc = 0;
    for (int64_t i = 0; i < keep; ++i) {
      acc += p[i] / sum;
      if (acc >= params_.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double mass = 0;
  for (int64_t i = 0; i < n; ++i) mass += p[i];
  // 53 random bits -> uniform in [0, mass).
  const uint64_t bits = Mix(params_.seed + 0x9E3779B97F4A7C15ull * Mix(draw + 0x632BE59BD9B4E019ull));
  double u = static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0) * mass;
  for (int64_t i = 0; i < n; ++i) {
    u -= p[i];
    if (u < 0) return scratch_[i].second;
  }
  return scratch_[n - 1].second;
}

}  // namespace sy::model
