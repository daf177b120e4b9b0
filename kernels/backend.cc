#include "kernels/backend.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/row_kernels.h"

namespace sy::kernels {

absl::Status Backend::ApplyRope(float* q, float* k, int64_t num_tokens, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, const int32_t* positions,
                        double theta) {
  const int64_t half = head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
  auto rotate = [&](float* x, int64_t heads, double pos) {
    for (int64_t i = 0; i < half; ++i) {
      const double a = pos * inv_freq[i];
      const float c = static_cast<float>(std::cos(a)), s = static_cast<float>(std::sin(a));
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + h * head_dim;
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
      }
    }
  };
  for (int64_t t = 0; t < num_tokens; ++t) {
    const double pos = static_cast<double>(positions[t]);
    rotate(q + t * num_heads * head_dim, num_heads, pos);
    if (k != nullptr) rotate(k + t * num_kv_heads * head_dim, num_kv_heads, pos);
  }
  return absl::OkStatus();
}

absl::Status Backend::WriteKv(const float* k, const float* v, int64_t num_tokens, const int64_t* slots,
                      const PagedKv& kv) {
  const int64_t row = kv.num_kv_heads * kv.head_dim;
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::memcpy(kv.k + slots[t] * row, k + t * row, row * sizeof(float));
    std::memcpy(kv.v + slots[t] * row, v + t * row, row * sizeof(float));
  }
  return absl::OkStatus();
}

void GatherRowsF32(const RowList& x, int64_t first, int64_t count, int64_t hidden, float* dst) {
  for (int64_t i = 0; i < count; ++i) {
    const void* src = x.rows[first + i];
    if (x.bf16 != nullptr && x.bf16[first + i] != 0) {
      cpu::RowFromBf16(static_cast<const uint16_t*>(src), hidden, dst + i * hidden);
    } else {
      cpu::RowCopyF32(static_cast<const float*>(src), hidden, dst + i * hidden);
    }
  }
}

absl::Status Backend::GroupedExpertFfnRows(const RowList& x, const int64_t* offsets,
                                           int64_t num_groups,
                                           const ExpertWeights* const* experts, int64_t hidden,
                                           float* y) {
  const int64_t base = offsets[0];
  const int64_t R = offsets[num_groups] - base;
  if (R <= 0) return absl::OkStatus();
  std::vector<float> rows(R * hidden);
  std::vector<int64_t> local(offsets, offsets + num_groups + 1);
  for (int64_t& o : local) o -= base;
  GatherRowsF32(x, base, R, hidden, rows.data());
  return GroupedExpertFfn(rows.data(), local.data(), num_groups, experts, hidden,
                          y + base * hidden);
}

absl::Status Backend::AddGated(const float* x, const float* gate, int64_t num_rows, int64_t dim,
                       float* y) {
  for (int64_t t = 0; t < num_rows; ++t) {
    const float g = 1.f / (1.f + std::exp(-gate[t]));
    for (int64_t d = 0; d < dim; ++d) y[t * dim + d] += g * x[t * dim + d];
  }
  return absl::OkStatus();
}

}  // namespace sy::kernels
