#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/moe_dispatch.h"

namespace sy::parallel {
namespace {

// Groups (token, k) pairs by expert with a counting sort (Dispatch: the addresses of the
// token rows, nothing copied), and scatters the weighted results of the grouped rows back
// (Combine). A token that picks the same expert twice (never happens with top-k, but cheap
// to allow) contributes twice.
class SingleRankDispatcher final : public MoeDispatcher {
 public:
  explicit SingleRankDispatcher(int64_t num_experts) : num_experts_(num_experts) {}

  absl::Status Dispatch(int layer, const float* x, int64_t num_tokens, int64_t hidden,
                        const int32_t* topk_ids, const float* topk_weights, int64_t num_topk,
                        ExpertRows* rows) override {
    const int64_t n = num_tokens * num_topk;
    offsets_.assign(num_experts_ + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (topk_ids[i] < 0 || topk_ids[i] >= num_experts_)
        return absl::InternalError(absl::StrCat("router picked expert ", topk_ids[i],
                                                " of ", num_experts_));
      ++offsets_[topk_ids[i] + 1];
    }
    for (int64_t e = 0; e < num_experts_; ++e) offsets_[e + 1] += offsets_[e];
    cursor_.assign(offsets_.begin(), offsets_.end() - 1);
    row_of_.resize(n);
    row_ptrs_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      int64_t r = cursor_[topk_ids[i]]++;
      row_of_[i] = r;
      row_ptrs_[r] = x + (i / num_topk) * hidden;
    }
    results_.resize(n * hidden);
    num_tokens_ = num_tokens;
    hidden_ = hidden;
    num_topk_ = num_topk;
    topk_weights_ = topk_weights;
    rows->row_ptrs = row_ptrs_.data();
    rows->row_bf16 = nullptr;
    rows->slot_offsets = offsets_.data();
    rows->num_rows = n;
    rows->out = results_.data();
    return absl::OkStatus();
  }

  absl::Status Combine(int layer, float* out) override {
    const int64_t hidden = hidden_, num_topk = num_topk_;
    std::fill(out, out + num_tokens_ * hidden, 0.f);
    for (int64_t t = 0; t < num_tokens_; ++t) {
      float* o = out + t * hidden;
      for (int64_t k = 0; k < num_topk; ++k) {
        const float w = topk_weights_[t * num_topk + k];
        const float* y = &results_[row_of_[t * num_topk + k] * hidden];
        for (int64_t d = 0; d < hidden; ++d) o[d] += w * y[d];
      }
    }
    return absl::OkStatus();
  }

  int64_t num_local_slots(int) const override { return num_experts_; }
  int32_t local_slot_expert(int, int64_t slot) const override {
    return static_cast<int32_t>(slot);
  }

 private:
  int64_t num_experts_;
  std::vector<int64_t> offsets_, cursor_, row_of_;
  std::vector<const void*> row_ptrs_;  // grouped row r: its token's row of x
  std::vector<float> results_;
  // The layer between Dispatch and Combine.
  int64_t num_tokens_ = 0, hidden_ = 0, num_topk_ = 0;
  const float* topk_weights_ = nullptr;
};

}  // namespace

std::unique_ptr<MoeDispatcher> MakeSingleRankDispatcher(int64_t num_experts) {
  return std::make_unique<SingleRankDispatcher>(num_experts);
}

}  // namespace sy::parallel
