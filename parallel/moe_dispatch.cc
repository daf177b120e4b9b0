#include "parallel/moe_dispatch.h"

#include <algorithm>
#include <vector>

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

}  // namespace sy::parallel
