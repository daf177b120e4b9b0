#include "parallel/moe_dispatch.h"

#include <algorithm>

namespace sy::parallel {

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
  if (rows.num_rows > 0) compute(layer, rows.rows, rows.slot_offsets, rows.out);
  return Combine(layer, out);
}

}  // namespace sy::parallel
