// Plain reference kernels: one obvious loop per operation, accumulating in double so they can
// serve as the yardstick for every fast kernel (and land within ~1e-6 of float64 math).
// Parallelised over output rows on the default pool only to keep tests quick.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/backend.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "kernels/core/thread_pool.h"

namespace sy::kernels {
namespace {

inline float Load(DType dtype, const uint8_t* base, int64_t i) {
  switch (dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, base + i * 4, 4);
      return f;
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, base + i * 2, 2);
      return Bf16ToF32(h);
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, base + i * 2, 2);
      return F16ToF32(h);
    }
  }
  return 0.f;
}

double DotRowD(const WeightView& w, int64_t row, const float* x) {
  const uint8_t* r = w.row(row);
  double acc = 0;
  for (int64_t i = 0; i < w.cols; ++i) acc += static_cast<double>(Load(w.dtype, r, i)) * x[i];
  return acc;
}

class ReferenceBackend final : public Backend {
 public:
  std::string name() const override { return "reference"; }

  absl::Status MatMul(const float* x, int64_t num_tokens, const WeightView& w, float* y,
              const float* bias) override {
    const int64_t n = w.rows, k = w.cols;
    ThreadPool::Default().ParallelFor(n, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = 0; t < num_tokens; ++t) {
        for (int64_t j = b; j < e; ++j) {
          double v = DotRowD(w, j, x + t * k);
          if (bias) v += bias[j];
          y[t * n + j] = static_cast<float>(v);
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const float* x, int64_t num_rows, int64_t dim, const WeightView& weight,
               float eps, float* y) override {
    const uint8_t* wb = static_cast<const uint8_t*>(weight.data);
    for (int64_t r = 0; r < num_rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[r * dim + i]) * x[r * dim + i];
      double inv = 1.0 / std::sqrt(ss / dim + eps);
      for (int64_t i = 0; i < dim; ++i) {
        y[r * dim + i] = static_cast<float>(x[r * dim + i] * inv * Load(weight.dtype, wb, i));
      }
    }
    return absl::OkStatus();
  }

  absl::Status GroupedExpertFfn(const float* x, const int64_t* offsets, int64_t num_groups,
                        const ExpertWeights* const* experts, int64_t hidden,
                        float* y) override {
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t rows = offsets[g + 1] - offsets[g];
      if (rows == 0) continue;
      SY_CHECK(experts[g] != nullptr) << "group " << g << " has rows but no expert";
      const ExpertWeights& ew = *experts[g];
      const int64_t inter = ew.w1.rows;
      std::vector<float> gate(rows * inter), up(rows * inter);
      const float* xg = x + offsets[g] * hidden;
      SY_RETURN_IF_ERROR(MatMul(xg, rows, ew.w1, gate.data(), nullptr));
      SY_RETURN_IF_ERROR(MatMul(xg, rows, ew.w3, up.data(), nullptr));
      for (int64_t i = 0; i < rows * inter; ++i) {
        double a = gate[i];
        gate[i] = static_cast<float>(a / (1.0 + std::exp(-a)) * up[i]);
      }
      SY_RETURN_IF_ERROR(MatMul(gate.data(), rows, ew.w2, y + offsets[g] * hidden, nullptr));
    }
    return absl::OkStatus();
  }

  absl::Status Attention(const float* q, int64_t num_new, int64_t start_pos, int64_t num_heads,
                 const PagedKv& kv, const int32_t* block_table, float scale,
                 float* out) override {
    const int64_t hd = kv.head_dim, nkv = kv.num_kv_heads;
    const int64_t group = num_heads / nkv;
    auto kv_row = [&](const float* base, int64_t pos, int64_t h) {
      int64_t block = block_table[pos / kv.block_size];
      int64_t row = pos % kv.block_size;
      return base + ((block * kv.block_size + row) * nkv + h) * hd;
    };
    ThreadPool::Default().ParallelFor(num_new * num_heads, 1, [&](int64_t b, int64_t e) {
      std::vector<double> scores;
      for (int64_t idx = b; idx < e; ++idx) {
        const int64_t i = idx / num_heads, h = idx % num_heads, kh = h / group;
        const int64_t len = start_pos + i + 1;
        const float* qi = q + (i * num_heads + h) * hd;
        scores.assign(len, 0.0);
        double mx = -INFINITY;
        for (int64_t p = 0; p < len; ++p) {
          const float* kp = kv_row(kv.k, p, kh);
          double s = 0;
          for (int64_t d = 0; d < hd; ++d) s += static_cast<double>(qi[d]) * kp[d];
          scores[p] = s * scale;
          mx = std::max(mx, scores[p]);
        }
        double sum = 0;
        for (int64_t p = 0; p < len; ++p) sum += (scores[p] = std::exp(scores[p] - mx));
        std::vector<double> acc(hd, 0.0);
        for (int64_t p = 0; p < len; ++p) {
          const float* vp = kv_row(kv.v, p, kh);
          double wgt = scores[p] / sum;
          for (int64_t d = 0; d < hd; ++d) acc[d] += wgt * vp[d];
        }
        float* o = out + (i * num_heads + h) * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<float>(acc[d]);
      }
    });
    return absl::OkStatus();
  }
};

}  // namespace

float DotRow(const WeightView& w, int64_t row, const float* x) {
  return static_cast<float>(DotRowD(w, row, x));
}

std::unique_ptr<Backend> MakeReferenceBackend() { return std::make_unique<ReferenceBackend>(); }

}  // namespace sy::kernels
