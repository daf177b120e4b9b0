#include "parallel/moe_dispatch.h"

#include <algorithm>
#include <vector>

#include "kernels/cpu/row_kernels.h"

namespace sy::parallel {

void GatherExpertRows(const ExpertRows& rows, int64_t hidden, float* dst) {
  for (int64_t i = 0; i < rows.num_rows; ++i) {
    if (rows.row_bf16 != nullptr && rows.row_bf16[i] != 0) {
      kernels::cpu::RowFromBf16(static_cast<const uint16_t*>(rows.row_ptrs[i]), hidden,
                                dst + i * hidden);
    } else {
      kernels::cpu::RowCopyF32(static_cast<const float*>(rows.row_ptrs[i]), hidden,
                               dst + i * hidden);
    }
  }
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
