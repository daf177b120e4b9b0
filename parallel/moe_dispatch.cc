#include "parallel/moe_dispatch.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"

namespace sy::parallel {

void GatherExpertRows(const ExpertRows& rows, int64_t hidden, float* dst) {
  kernels::GatherRowsF32({rows.row_ptrs, rows.row_bf16}, 0, rows.num_rows, hidden, dst);
}

absl::Status MoeDispatcher::DispatchCombine(int layer, const float* x, int64_t num_tokens,
                                            int64_t hidden, const int32_t* topk_ids,
                                            const float* topk_weights, int64_t num_topk,
                                            const GroupedExpertFn& compute, float* out) {
  ExpertRows rows;
  absl::Status s = Dispatch(layer, x, num_tokens, hidden, topk_ids, topk_weights, num_topk, &rows);
  if (!s.ok()) {
    std::fill(out, out + num_tokens * hidden, 0.f);
    return s;
  }
  if (rows.num_rows > 0) {
    thread_local std::vector<float> gathered;
    gathered.resize(rows.num_rows * hidden);
    GatherExpertRows(rows, hidden, gathered.data());
    compute(layer, gathered.data(), rows.slot_offsets, rows.out);
  }
  return Combine(layer, out);
}

namespace {
absl::Status NoLanes(int lane) {
  return absl::UnimplementedError(
      absl::StrCat("micro-batch ", lane, ": this dispatcher runs one micro-batch per layer"));
}
}  // namespace

absl::Status MoeDispatcher::StartDispatch(int lane, int, const float*, int64_t, int64_t,
                                          const int32_t*, const float*, int64_t) {
  return NoLanes(lane);
}
absl::Status MoeDispatcher::FinishDispatch(int lane, ExpertRows*) { return NoLanes(lane); }
absl::Status MoeDispatcher::StartCombine(int lane, int, float*) { return NoLanes(lane); }
absl::Status MoeDispatcher::FinishCombine(int lane, int, float*) { return NoLanes(lane); }

void ExpertRowsMerger::Merge(const ExpertRows& a, const ExpertRows& b, int64_t num_slots,
                             int64_t hidden, ExpertRows* merged) {
  num_slots_ = num_slots;
  hidden_ = hidden;
  const int64_t n = a.num_rows + b.num_rows;
  row_ptrs_.resize(n);
  row_bf16_.resize(n);
  slot_offsets_.assign(num_slots + 1, 0);
  int64_t r = 0;
  for (int64_t s = 0; s < num_slots; ++s) {
    slot_offsets_[s] = r;
    for (const ExpertRows* lane : {&a, &b})
      for (int64_t i = lane->slot_offsets[s]; i < lane->slot_offsets[s + 1]; ++i, ++r) {
        row_ptrs_[r] = lane->row_ptrs[i];
        row_bf16_[r] = lane->row_bf16 != nullptr ? lane->row_bf16[i] : 0;
      }
  }
  slot_offsets_[num_slots] = r;
  out_.resize(n * hidden);
  merged->row_ptrs = row_ptrs_.data();
  merged->row_bf16 = row_bf16_.data();
  merged->slot_offsets = slot_offsets_.data();
  merged->num_rows = n;
  merged->out = out_.data();
}

void ExpertRowsMerger::Split(const ExpertRows& a, const ExpertRows& b) const {
  const float* src = out_.data();
  for (int64_t s = 0; s < num_slots_; ++s)
    for (const ExpertRows* lane : {&a, &b}) {
      const int64_t begin = lane->slot_offsets[s], count = lane->slot_offsets[s + 1] - begin;
      if (count == 0) continue;
      std::copy(src, src + count * hidden_, lane->out + begin * hidden_);
      src += count * hidden_;
    }
}

}  // namespace sy::parallel
