// The CUDA kernels of kernels/cuda/cuda_kernels.h against plain CPU references written here
// (double math over the same bf16/f32 inputs), so the binary needs only the CUDA driver, gtest
// and abseil. Label gpu: CI without a device leaves it out, and every test that touches the
// device skips when cudaGetDeviceCount fails or finds none.
//
// Tolerances (stated per check): f32 outputs within ~1e-5 relative of the double reference
// (f32 accumulation); bf16 outputs within 1e-2 relative (bf16 keeps 8 bits: 2^-8 = 3.9e-3 per
// rounding) plus a small absolute term; routing ids and permutation layouts exactly equal.
// Shapes follow the bench preset (hidden 1024, inter 2816, 8 experts top-2, 16 heads / 4 KV
// heads, head_dim 64, block 16) plus odd sizes that leave partial tiles and unaligned rows.
#include "kernels/cuda/cuda_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/core/dtype.h"
#include "tests/testing/gpu_testing.h"

namespace sy::kernels::cuda {
namespace {


#define ASSERT_CUDA(expr)                                       \
  do {                                                          \
    cudaError_t err_ = (expr);                                  \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

#define ASSERT_OK(expr)                       \
  do {                                        \
    absl::Status st_ = (expr);                \
    ASSERT_TRUE(st_.ok()) << #expr << ": " << st_; \
  } while (0)

// A device allocation of `bytes`, freed on scope exit. Filled with 0xff bytes (NaN as f32 and
// bf16, -1 as int32) so that an output a kernel forgets to write cannot pass on stale data
// that an earlier case left in recycled memory.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    err_ = cudaMalloc(&ptr_, bytes_);
    if (err_ != cudaSuccess) {
      ptr_ = nullptr;
      return;
    }
    err_ = cudaMemset(ptr_, 0xff, bytes_);
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  cudaError_t status() const { return err_; }
  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
  cudaError_t err_;
};

template <typename T>
cudaError_t Upload(const std::vector<T>& host, const DeviceBuffer& dev) {
  if (dev.status() != cudaSuccess) return dev.status();
  return cudaMemcpy(dev.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
}
template <typename T>
cudaError_t Download(const DeviceBuffer& dev, std::vector<T>* host) {
  if (dev.status() != cudaSuccess) return dev.status();
  return cudaMemcpy(host->data(), dev.get(), host->size() * sizeof(T), cudaMemcpyDeviceToHost);
}

// Host copy of an activation tensor in its device dtype: bytes plus the exact float values
// those bytes hold (so references see what the kernel sees).
struct HostTensor {
  DType dtype;
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

HostTensor MakeTensor(DType dtype, const std::vector<float>& v) {
  HostTensor t{dtype, std::vector<uint8_t>(v.size() * DTypeSize(dtype)), v};
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kBF16) {
      const uint16_t h = F32ToBf16(v[i]);
      std::memcpy(&t.bytes[2 * i], &h, 2);
      t.values[i] = Bf16ToF32(h);
    } else {
      std::memcpy(&t.bytes[4 * i], &v[i], 4);
    }
  }
  return t;
}

std::vector<float> ToFloats(DType dtype, const std::vector<uint8_t>& bytes) {
  std::vector<float> out(bytes.size() / DTypeSize(dtype));
  ConvertToF32(dtype, bytes.data(), static_cast<int64_t>(out.size()), out.data());
  return out;
}

std::vector<float> RandomVector(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Relative tolerance of one rounding to `dtype` plus f32 accumulation slack.
double RelTol(DType dtype) { return dtype == DType::kBF16 ? 1e-2 : 1e-5; }

// ---- RmsNorm --------------------------------------------------------------------------------

struct NormCase {
  DType x, w;
  int64_t rows, dim;
  bool in_place;
};

TEST(CudaRmsNormTest, MatchesDoubleReferenceForEveryDTypeAndOddSizes) {
  SKIP_WITHOUT_GPU();
  const NormCase cases[] = {
      {DType::kBF16, DType::kBF16, 7, 1024, false}, {DType::kF32, DType::kF32, 7, 1024, false},
      {DType::kBF16, DType::kF32, 3, 1001, false},  {DType::kF32, DType::kBF16, 2, 4099, false},
      {DType::kBF16, DType::kBF16, 5, 1024, true},  {DType::kF32, DType::kF32, 1, 8, true},
      {DType::kBF16, DType::kBF16, 4, 3, false},
  };
  uint32_t seed = 1;
  for (const NormCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << DTypeName(c.x) << " x, " << DTypeName(c.w) << " w, ["
                                      << c.rows << ", " << c.dim << "], in_place=" << c.in_place);
    const float eps = 1e-6f;
    HostTensor x = MakeTensor(c.x, RandomVector(c.rows * c.dim, seed++, -3.f, 3.f));
    HostTensor w = MakeTensor(c.w, RandomVector(c.dim, seed++, 0.5f, 1.5f));
    DeviceBuffer dx(x.bytes.size()), dw(w.bytes.size()), dy(x.bytes.size());
    ASSERT_CUDA(Upload(x.bytes, dx));
    ASSERT_CUDA(Upload(w.bytes, dw));
    void* y = c.in_place ? dx.get() : dy.get();
    ASSERT_OK(RmsNorm(dx.get(), c.x, c.rows, c.dim, dw.get(), c.w, eps, y, c.x, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    std::vector<uint8_t> got_bytes(x.bytes.size());
    ASSERT_CUDA(cudaMemcpy(got_bytes.data(), y, got_bytes.size(), cudaMemcpyDeviceToHost));
    const std::vector<float> got = ToFloats(c.x, got_bytes);
    for (int64_t r = 0; r < c.rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < c.dim; ++i) ss += double(x.values[r * c.dim + i]) * x.values[r * c.dim + i];
      const double inv = 1.0 / std::sqrt(ss / c.dim + eps);
      for (int64_t i = 0; i < c.dim; ++i) {
        const double ref = x.values[r * c.dim + i] * inv * w.values[i];
        ASSERT_NEAR(got[r * c.dim + i], ref, RelTol(c.x) * std::abs(ref) + 1e-6) << r << "," << i;
      }
    }
  }
}

TEST(CudaRmsNormTest, RejectsF16AndInPlaceDTypeChange) {
  float dummy = 0;
  EXPECT_EQ(RmsNorm(&dummy, DType::kF16, 1, 1, &dummy, DType::kF32, 1e-6f, &dummy, DType::kF32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RmsNorm(&dummy, DType::kF32, 1, 1, &dummy, DType::kF32, 1e-6f, &dummy, DType::kBF16, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- RoPE -----------------------------------------------------------------------------------

void RopeReference(std::vector<float>* x, int64_t tokens, int64_t heads, int64_t hd,
                   const std::vector<int32_t>& pos, double theta) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double a = pos[t] * std::pow(theta, -2.0 * double(i) / double(hd));
      const float c = float(std::cos(a)), s = float(std::sin(a));
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x->data() + (t * heads + h) * hd;
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
      }
    }
}

TEST(CudaRopeTest, RotatesHalvesLikeHuggingFaceAtLargeAndSmallPositions) {
  SKIP_WITHOUT_GPU();
  struct Case {
    DType dtype;
    int64_t tokens, heads, kv_heads, hd;
    double theta;
  };
  const Case cases[] = {{DType::kF32, 6, 16, 4, 64, 1e4},
                        {DType::kBF16, 6, 16, 4, 64, 1e6},
                        {DType::kF32, 3, 3, 1, 34, 1e4},
                        {DType::kBF16, 2, 2, 0, 128, 5e5}};
  uint32_t seed = 100;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << DTypeName(c.dtype) << " heads " << c.heads << "/" << c.kv_heads
                                      << " hd " << c.hd << " theta " << c.theta);
    std::vector<int32_t> pos = {0, 1, 17, 1000, 123456, 4095};
    pos.resize(c.tokens);
    HostTensor q = MakeTensor(c.dtype, RandomVector(c.tokens * c.heads * c.hd, seed++));
    HostTensor k = MakeTensor(c.dtype, RandomVector(c.tokens * c.kv_heads * c.hd, seed++));
    DeviceBuffer dq(q.bytes.size()), dk(k.bytes.size()), dpos(pos.size() * 4);
    ASSERT_CUDA(Upload(q.bytes, dq));
    ASSERT_CUDA(Upload(k.bytes, dk));
    ASSERT_CUDA(Upload(pos, dpos));
    ASSERT_OK(ApplyRope(dq.get(), c.kv_heads ? dk.get() : nullptr, c.dtype, c.tokens, c.heads, c.kv_heads,
                        c.hd, dpos.as<int32_t>(), c.theta, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    std::vector<uint8_t> gq(q.bytes.size()), gk(k.bytes.size());
    ASSERT_CUDA(Download(dq, &gq));
    ASSERT_CUDA(Download(dk, &gk));
    std::vector<float> rq = q.values, rk = k.values;
    RopeReference(&rq, c.tokens, c.heads, c.hd, pos, c.theta);
    RopeReference(&rk, c.tokens, c.kv_heads, c.hd, pos, c.theta);
    const std::vector<float> fq = ToFloats(c.dtype, gq), fk = ToFloats(c.dtype, gk);
    // Values are O(1); f32: 1e-5 absolute (float sin/cos products), bf16: one rounding.
    for (size_t i = 0; i < rq.size(); ++i)
      ASSERT_NEAR(fq[i], rq[i], RelTol(c.dtype) * std::abs(rq[i]) + 1e-5) << "q " << i;
    for (size_t i = 0; i < rk.size(); ++i)
      ASSERT_NEAR(fk[i], rk[i], RelTol(c.dtype) * std::abs(rk[i]) + 1e-5) << "k " << i;
  }
}

// ---- Router ---------------------------------------------------------------------------------

// Same semantics as model/router.cc RouteTopK (kept here so the binary stays self-contained).
void RouteReference(const std::vector<float>& logits, int64_t T, int64_t E, int64_t K, bool renorm,
                    std::vector<int32_t>* ids, std::vector<float>* weights) {
  std::vector<int32_t> order(E);
  std::vector<double> prob(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = &logits[t * E];
    double mx = -INFINITY, sum = 0;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, double(l[e]));
    for (int64_t e = 0; e < E; ++e) sum += (prob[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) prob[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    double top = 0;
    for (int64_t k = 0; k < K; ++k) top += prob[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      (*ids)[t * K + k] = order[k];
      (*weights)[t * K + k] = float(renorm ? prob[order[k]] / top : prob[order[k]]);
    }
  }
}

TEST(CudaRouterTest, PicksTheSameExpertsAsTheCpuRouterWithTiesToTheLowerId) {
  SKIP_WITHOUT_GPU();
  struct Case {
    int64_t tokens, experts, topk;
    bool renorm;
  };
  const Case cases[] = {{37, 8, 2, true},   {37, 8, 2, false}, {64, 64, 8, true}, {19, 256, 8, false},
                        {5, 60, 3, true},   {9, 1, 1, true},   {1, 33, 1, false}, {200, 128, 4, true}};
  uint32_t seed = 200;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "T=" << c.tokens << " E=" << c.experts << " k=" << c.topk
                                      << " renorm=" << c.renorm);
    // Logits on a coarse grid (multiples of 1/4 in [-2, 2]) so that ties are common.
    std::vector<float> logits = RandomVector(c.tokens * c.experts, seed++, -2.f, 2.f);
    for (auto& v : logits) v = std::round(v * 4) / 4;
    std::vector<int32_t> ref_ids(c.tokens * c.topk), got_ids(ref_ids.size());
    std::vector<float> ref_w(ref_ids.size()), got_w(ref_ids.size());
    RouteReference(logits, c.tokens, c.experts, c.topk, c.renorm, &ref_ids, &ref_w);
    DeviceBuffer dl(logits.size() * 4), di(ref_ids.size() * 4), dw(ref_w.size() * 4);
    ASSERT_CUDA(Upload(logits, dl));
    ASSERT_OK(RouteTopK(dl.as<float>(), c.tokens, c.experts, c.topk, c.renorm, di.as<int32_t>(),
                        dw.as<float>(), nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    ASSERT_CUDA(Download(di, &got_ids));
    ASSERT_CUDA(Download(dw, &got_w));
    EXPECT_EQ(got_ids, ref_ids);
    for (size_t i = 0; i < ref_w.size(); ++i) ASSERT_NEAR(got_w[i], ref_w[i], 1e-5 * ref_w[i] + 1e-7) << i;
  }
}

TEST(CudaRouterTest, RejectsMoreThanEightChoicesOrTooManyExperts) {
  EXPECT_EQ(RouteTopK(nullptr, 1, 16, 9, true, nullptr, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RouteTopK(nullptr, 1, 257, 2, true, nullptr, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RouteTopK(nullptr, 1, 2, 3, true, nullptr, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

// ---- MoE permute ----------------------------------------------------------------------------

struct Layout {
  std::vector<int32_t> counts, offsets, grouped_to_flat, flat_to_grouped;
};

Layout LayoutReference(const std::vector<int32_t>& ids, int64_t E) {
  const int64_t n = static_cast<int64_t>(ids.size());
  Layout L{std::vector<int32_t>(E, 0), std::vector<int32_t>(E + 1, 0), std::vector<int32_t>(n, -1),
           std::vector<int32_t>(n, -1)};
  for (int32_t id : ids)
    if (id >= 0 && id < E) ++L.counts[id];
  for (int64_t e = 0; e < E; ++e) L.offsets[e + 1] = L.offsets[e] + L.counts[e];
  std::vector<int32_t> next(L.offsets.begin(), L.offsets.end() - 1);
  for (int64_t f = 0; f < n; ++f) {  // ascending flat index: the stable order
    const int32_t id = ids[f];
    if (id < 0 || id >= E) continue;
    L.grouped_to_flat[next[id]] = static_cast<int32_t>(f);
    L.flat_to_grouped[f] = next[id]++;
  }
  return L;
}

// Runs MoePermuteLayout and checks it against the reference; returns the device layout.
void CheckLayout(const std::vector<int32_t>& ids, int64_t T, int64_t K, int64_t E, DeviceBuffer* d_g2f,
                 DeviceBuffer* d_f2g, Layout* out) {
  const Layout ref = LayoutReference(ids, E);
  DeviceBuffer dids(ids.size() * 4), dcounts(E * 4), doffs((E + 1) * 4);
  ASSERT_CUDA(Upload(ids, dids));
  ASSERT_OK(MoePermuteLayout(dids.as<int32_t>(), T, K, E, dcounts.as<int32_t>(), doffs.as<int32_t>(),
                             d_g2f->as<int32_t>(), d_f2g->as<int32_t>(), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  Layout got{std::vector<int32_t>(E), std::vector<int32_t>(E + 1), std::vector<int32_t>(ids.size()),
             std::vector<int32_t>(ids.size())};
  ASSERT_CUDA(Download(dcounts, &got.counts));
  ASSERT_CUDA(Download(doffs, &got.offsets));
  ASSERT_CUDA(Download(*d_g2f, &got.grouped_to_flat));
  ASSERT_CUDA(Download(*d_f2g, &got.flat_to_grouped));
  EXPECT_EQ(got.counts, ref.counts);
  EXPECT_EQ(got.offsets, ref.offsets);
  EXPECT_EQ(got.grouped_to_flat, ref.grouped_to_flat);
  EXPECT_EQ(got.flat_to_grouped, ref.flat_to_grouped);
  *out = ref;
}

TEST(CudaMoePermuteTest, LayoutIsTheStableExpertGroupingAndDropsForeignIds) {
  SKIP_WITHOUT_GPU();
  struct Case {
    int64_t tokens, topk, experts;
    bool foreign;  // some ids are -1 or >= E (experts on another rank)
  };
  const Case cases[] = {{100, 2, 8, false}, {513, 8, 256, false}, {77, 3, 5, true}, {1, 1, 1, false},
                        {0, 2, 8, false},   {4096, 2, 8, false}};
  std::mt19937 rng(300);
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "T=" << c.tokens << " k=" << c.topk << " E=" << c.experts);
    std::vector<int32_t> ids(c.tokens * c.topk);
    std::uniform_int_distribution<int32_t> pick(c.foreign ? -1 : 0, c.foreign ? int32_t(c.experts) : int32_t(c.experts - 1));
    for (auto& id : ids) id = pick(rng);
    DeviceBuffer g2f(ids.size() * 4), f2g(ids.size() * 4);
    Layout ref;
    CheckLayout(ids, c.tokens, c.topk, c.experts, &g2f, &f2g, &ref);
  }
}

TEST(CudaMoePermuteTest, GatherThenCombineIsTheWeightedSumOfEachTokensRows) {
  SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    for (int64_t hidden : {1024, 37}) {
      SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " hidden " << hidden);
      const int64_t T = 45, K = 2, E = 8;
      std::mt19937 rng(400 + hidden);
      std::uniform_int_distribution<int32_t> pick(-1, E - 1);  // -1: dropped choice
      std::vector<int32_t> ids(T * K);
      for (auto& id : ids) id = pick(rng);
      DeviceBuffer g2f(ids.size() * 4), f2g(ids.size() * 4);
      Layout L;
      CheckLayout(ids, T, K, E, &g2f, &f2g, &L);
      if (HasFatalFailure()) return;
      HostTensor x = MakeTensor(dtype, RandomVector(T * hidden, 401));
      const int64_t rows = T * K;  // includes the -1 tail, which must come back zero
      DeviceBuffer dx(x.bytes.size()), dgx(rows * hidden * DTypeSize(dtype));
      ASSERT_CUDA(Upload(x.bytes, dx));
      ASSERT_OK(MoeGatherRows(dx.get(), dtype, T, hidden, K, g2f.as<int32_t>(), rows, dgx.get(), nullptr));
      std::vector<uint8_t> gx(rows * hidden * DTypeSize(dtype));
      ASSERT_CUDA(cudaDeviceSynchronize());
      ASSERT_CUDA(Download(dgx, &gx));
      const std::vector<float> gxf = ToFloats(dtype, gx);
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t f = L.grouped_to_flat[r];
        for (int64_t i = 0; i < hidden; ++i)  // a copy: exact
          ASSERT_EQ(gxf[r * hidden + i], f < 0 ? 0.f : x.values[(f / K) * hidden + i]) << r << "," << i;
      }
      // "Expert" output: a distinct row per grouped row, then combine back.
      HostTensor y = MakeTensor(dtype, RandomVector(rows * hidden, 402));
      std::vector<float> w = RandomVector(T * K, 403, 0.f, 1.f);
      DeviceBuffer dy(y.bytes.size()), dw(w.size() * 4), dout(T * hidden * 4);
      ASSERT_CUDA(Upload(y.bytes, dy));
      ASSERT_CUDA(Upload(w, dw));
      ASSERT_OK(MoeCombine(dy.get(), dtype, f2g.as<int32_t>(), dw.as<float>(), T, K, hidden, dout.get(),
                           DType::kF32, nullptr));
      std::vector<float> out(T * hidden);
      ASSERT_CUDA(cudaDeviceSynchronize());
      ASSERT_CUDA(Download(dout, &out));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < hidden; ++i) {
          double ref = 0;
          for (int64_t j = 0; j < K; ++j) {
            const int32_t r = L.flat_to_grouped[t * K + j];
            if (r >= 0) ref += double(w[t * K + j]) * y.values[r * hidden + i];
          }
          ASSERT_NEAR(out[t * hidden + i], ref, 1e-6 * (1 + std::abs(ref))) << t << "," << i;
        }
    }
  }
}

// ---- GEMM and grouped expert FFN -------------------------------------------------------------

std::vector<std::unique_ptr<GemmContext>> GemmEngines() {
  std::vector<std::unique_ptr<GemmContext>> out;
  auto builtin = GemmContext::Create(GemmBackend::kBuiltin);
  EXPECT_TRUE(builtin.ok()) << builtin.status();
  if (builtin.ok()) out.push_back(std::move(*builtin));
  auto cublas = GemmContext::Create(GemmBackend::kCublas);
  if (cublas.ok()) {
    out.push_back(std::move(*cublas));
  } else {
    std::printf("[ note ] cuBLAS not available (%s); testing the built-in GEMM only\n",
                std::string(cublas.status().message()).c_str());
  }
  return out;
}

TEST(CudaGemmTest, BothEnginesMatchDoubleReferenceOnSkinnyFullAndPartialTiles) {
  SKIP_WITHOUT_GPU();
  struct Case {
    int64_t m, n, k;
  };
  // m <= 32 with k % 8 == 0 takes the built-in skinny kernel (decode), the rest the tiled one.
  const Case cases[] = {{1, 64, 64},   {33, 100, 72},    {130, 2816, 1024}, {5, 17, 13},   {64, 1024, 2816},
                        {2, 3, 1},     {7, 2816, 1024},  {32, 100, 264},    {17, 1024, 2816}, {9, 13, 8}};
  for (auto& engine : GemmEngines()) {
    uint32_t seed = 500;
    for (const Case& c : cases) {
      for (DType ydt : {DType::kF32, DType::kBF16}) {
        SCOPED_TRACE(::testing::Message() << engine->name() << " m=" << c.m << " n=" << c.n << " k=" << c.k
                                          << " y " << DTypeName(ydt));
        HostTensor x = MakeTensor(DType::kBF16, RandomVector(c.m * c.k, seed++));
        HostTensor w = MakeTensor(DType::kBF16, RandomVector(c.n * c.k, seed++));
        DeviceBuffer dx(x.bytes.size()), dw(w.bytes.size()), dy(c.m * c.n * DTypeSize(ydt));
        ASSERT_CUDA(Upload(x.bytes, dx));
        ASSERT_CUDA(Upload(w.bytes, dw));
        ASSERT_OK(engine->Gemm(dx.get(), dw.get(), c.m, c.n, c.k, dy.get(), ydt, nullptr));
        std::vector<uint8_t> yb(c.m * c.n * DTypeSize(ydt));
        ASSERT_CUDA(cudaDeviceSynchronize());
        ASSERT_CUDA(Download(dy, &yb));
        const std::vector<float> y = ToFloats(ydt, yb);
        for (int64_t i = 0; i < c.m; ++i)
          for (int64_t j = 0; j < c.n; ++j) {
            double ref = 0, mag = 0;
            for (int64_t p = 0; p < c.k; ++p) {
              const double prod = double(x.values[i * c.k + p]) * w.values[j * c.k + p];
              ref += prod;
              mag += std::abs(prod);
            }
            // bf16 products are exact in f32; the sum's error grows with Σ|x·w|.
            const double tol = 3e-5 * mag + (ydt == DType::kBF16 ? 8e-3 * std::abs(ref) : 0) + 1e-6;
            ASSERT_NEAR(y[i * c.n + j], ref, tol) << i << "," << j;
          }
      }
    }
  }
}

// The reference of one expert over rows of x: double projections, activation rounded to bf16
// as the kernel does, double down projection.
void FfnReference(const std::vector<float>& x, int64_t rows, int64_t hidden, int64_t inter,
                  const std::vector<float>& w1, const std::vector<float>& w3, const std::vector<float>& w2,
                  float* y) {
  std::vector<float> act(inter);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = &x[r * hidden];
    for (int64_t i = 0; i < inter; ++i) {
      double g = 0, u = 0;
      for (int64_t p = 0; p < hidden; ++p) {
        g += double(w1[i * hidden + p]) * xr[p];
        u += double(w3[i * hidden + p]) * xr[p];
      }
      act[i] = Bf16ToF32(F32ToBf16(float(g / (1 + std::exp(-g)) * u)));
    }
    for (int64_t o = 0; o < hidden; ++o) {
      double s = 0;
      for (int64_t i = 0; i < inter; ++i) s += double(w2[o * inter + i]) * act[i];
      y[r * hidden + o] = float(s);
    }
  }
}

// Device weights of `num_experts` experts with weights ~ U(-1, 1)/sqrt(fan_in), bf16.
struct Experts {
  std::vector<HostTensor> w1, w3, w2;
  std::vector<std::unique_ptr<DeviceBuffer>> buffers;
  std::vector<ExpertFfnWeights> views;
};

Experts MakeExperts(int64_t E, int64_t hidden, int64_t inter, uint32_t seed) {
  Experts ex;
  auto scaled = [](std::vector<float> v, int64_t fan_in) {
    for (auto& x : v) x /= std::sqrt(float(fan_in));
    return v;
  };
  for (int64_t e = 0; e < E; ++e) {
    ex.w1.push_back(MakeTensor(DType::kBF16, scaled(RandomVector(inter * hidden, seed++), hidden)));
    ex.w3.push_back(MakeTensor(DType::kBF16, scaled(RandomVector(inter * hidden, seed++), hidden)));
    ex.w2.push_back(MakeTensor(DType::kBF16, scaled(RandomVector(hidden * inter, seed++), inter)));
    ExpertFfnWeights v;
    const std::pair<const HostTensor*, const void**> slots[] = {
        {&ex.w1.back(), &v.w1}, {&ex.w3.back(), &v.w3}, {&ex.w2.back(), &v.w2}};
    for (const auto& [t, slot] : slots) {
      ex.buffers.push_back(std::make_unique<DeviceBuffer>(t->bytes.size()));
      EXPECT_EQ(Upload(t->bytes, *ex.buffers.back()), cudaSuccess);
      *slot = ex.buffers.back()->get();
    }
    ex.views.push_back(v);
  }
  return ex;
}

// |got - ref| <= 2e-2·|ref| + 1e-2·rms(ref): one bf16 rounding of y and of the activation,
// relative to the output's scale.
void ExpectCloseBf16(const std::vector<float>& got, const std::vector<float>& ref) {
  double ss = 0;
  for (float r : ref) ss += double(r) * r;
  const double rms = std::sqrt(ss / std::max<size_t>(ref.size(), 1));
  int bad = 0;
  for (size_t i = 0; i < ref.size() && bad < 10; ++i)
    if (!(std::abs(got[i] - ref[i]) <= 2e-2 * std::abs(ref[i]) + 1e-2 * rms)) {
      ADD_FAILURE() << "element " << i << ": got " << got[i] << " want " << ref[i] << " (rms " << rms << ")";
      ++bad;
    }
}

TEST(CudaGroupedExpertFfnTest, MatchesPerExpertReferenceWithEmptyAndOddExperts) {
  SKIP_WITHOUT_GPU();
  struct Case {
    int64_t hidden, inter;
    std::vector<int32_t> offsets;
  };
  const Case cases[] = {
      {1024, 2816, {0, 5, 5, 12, 13, 13, 20, 31, 32}},  // bench preset, 8 experts, two empty
      {72, 40, {0, 0, 70, 71}},                          // odd sizes, first expert empty
      {24, 13, {0, 3}},                                  // K % 8 != 0 in the down projection
  };
  for (auto& engine : GemmEngines()) {
    uint32_t seed = 600;
    for (const Case& c : cases) {
      const int64_t E = static_cast<int64_t>(c.offsets.size()) - 1, R = c.offsets.back();
      SCOPED_TRACE(::testing::Message() << engine->name() << " hidden " << c.hidden << " inter " << c.inter
                                        << " experts " << E << " rows " << R);
      Experts ex = MakeExperts(E, c.hidden, c.inter, seed);
      seed += 3 * E;
      HostTensor x = MakeTensor(DType::kBF16, RandomVector(R * c.hidden, seed++));
      const int64_t ws = GroupedExpertFfnWorkspaceBytes(R, c.inter);
      DeviceBuffer dx(x.bytes.size()), dy(R * c.hidden * 2), dws(ws);
      ASSERT_CUDA(Upload(x.bytes, dx));
      ASSERT_OK(GroupedExpertFfn(*engine, ex.views.data(), E, c.offsets.data(), c.hidden, c.inter, dx.get(),
                                 dy.get(), dws.get(), ws, nullptr));
      std::vector<uint16_t> yb(R * c.hidden);
      ASSERT_CUDA(cudaDeviceSynchronize());
      ASSERT_CUDA(Download(dy, &yb));
      std::vector<float> got(yb.size()), ref(yb.size());
      for (size_t i = 0; i < yb.size(); ++i) got[i] = Bf16ToF32(yb[i]);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = c.offsets[e], rows = c.offsets[e + 1] - r0;
        std::vector<float> xe(x.values.begin() + r0 * c.hidden, x.values.begin() + (r0 + rows) * c.hidden);
        FfnReference(xe, rows, c.hidden, c.inter, ex.w1[e].values, ex.w3[e].values, ex.w2[e].values,
                     &ref[r0 * c.hidden]);
      }
      ExpectCloseBf16(got, ref);
    }
  }
}

TEST(CudaGroupedExpertFfnTest, RejectsSmallWorkspaceAndDecreasingOffsets) {
  auto engine = GemmContext::Create(GemmBackend::kBuiltin);
  ASSERT_TRUE(engine.ok());
  // Never dereferenced: both calls fail their host-side checks before any launch.
  int dummy = 0;
  const ExpertFfnWeights w[2] = {{&dummy, &dummy, &dummy}, {&dummy, &dummy, &dummy}};
  const int32_t bad[] = {0, 4, 2};
  EXPECT_EQ(GroupedExpertFfn(**engine, w, 2, bad, 8, 8, &dummy, &dummy, &dummy, 1 << 20, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  const int32_t good[] = {0, 2, 4};
  EXPECT_EQ(GroupedExpertFfn(**engine, w, 2, good, 8, 8, &dummy, &dummy, &dummy, 16, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- Paged decode attention ------------------------------------------------------------------

struct AttnCase {
  DType q, kv;
  int64_t heads, kv_heads, hd, block_size;
  std::vector<int32_t> lens;
};

// With `split`, a workspace lets the kernel split contexts over blocks (and merge them).
void RunAttentionCase(const AttnCase& c, uint32_t seed, bool split) {
  const int64_t S = static_cast<int64_t>(c.lens.size());
  int64_t max_blocks = 1;
  for (int32_t l : c.lens) max_blocks = std::max<int64_t>(max_blocks, (l + c.block_size - 1) / c.block_size);
  const int64_t num_blocks = S * max_blocks + 3;
  // Blocks handed out in a shuffled order so the table really indirects.
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(seed));
  std::vector<int32_t> tables(S * max_blocks);
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = perm[i];
  const int64_t row = c.kv_heads * c.hd;
  HostTensor q = MakeTensor(c.q, RandomVector(S * c.heads * c.hd, seed + 1));
  HostTensor k = MakeTensor(c.kv, RandomVector(num_blocks * c.block_size * row, seed + 2, -2.f, 2.f));
  HostTensor v = MakeTensor(c.kv, RandomVector(num_blocks * c.block_size * row, seed + 3));
  DeviceBuffer dq(q.bytes.size()), dk(k.bytes.size()), dv(v.bytes.size()), dt(tables.size() * 4),
      dl(c.lens.size() * 4), dout(q.bytes.size());
  ASSERT_CUDA(Upload(q.bytes, dq));
  ASSERT_CUDA(Upload(k.bytes, dk));
  ASSERT_CUDA(Upload(v.bytes, dv));
  ASSERT_CUDA(Upload(tables, dt));
  ASSERT_CUDA(Upload(c.lens, dl));
  const int64_t ws_bytes = split ? PagedDecodeAttentionWorkspaceBytes(S, c.heads, c.hd) : 0;
  DeviceBuffer ws(ws_bytes);
  ASSERT_OK(PagedDecodeAttention(dq.get(), c.q, dk.get(), dv.get(), c.kv, dt.as<int32_t>(), dl.as<int32_t>(), S,
                                 c.heads, c.kv_heads, c.hd, c.block_size, max_blocks, 0.f, dout.get(), c.q,
                                 split ? ws.get() : nullptr, ws_bytes, nullptr));
  std::vector<uint8_t> ob(q.bytes.size()), again(q.bytes.size());
  ASSERT_CUDA(cudaDeviceSynchronize());
  ASSERT_CUDA(Download(dout, &ob));
  // A second launch into a poisoned output must give the same bytes (fixed merge orders).
  ASSERT_CUDA(cudaMemset(dout.get(), 0xff, dout.size()));
  ASSERT_OK(PagedDecodeAttention(dq.get(), c.q, dk.get(), dv.get(), c.kv, dt.as<int32_t>(), dl.as<int32_t>(), S,
                                 c.heads, c.kv_heads, c.hd, c.block_size, max_blocks, 0.f, dout.get(), c.q,
                                 split ? ws.get() : nullptr, ws_bytes, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  ASSERT_CUDA(Download(dout, &again));
  EXPECT_EQ(again, ob) << "second launch differs";
  const std::vector<float> got = ToFloats(c.q, ob);
  const double scale = 1.0 / std::sqrt(double(c.hd));
  const int64_t group = c.heads / c.kv_heads;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < c.heads; ++h) {
      const float* qv = &q.values[(s * c.heads + h) * c.hd];
      std::vector<double> sc(c.lens[s]), o(c.hd, 0.0);
      double mx = -INFINITY, sum = 0;
      auto at = [&](int64_t p) {
        return (int64_t(tables[s * max_blocks + p / c.block_size]) * c.block_size + p % c.block_size) * row +
               (h / group) * c.hd;
      };
      for (int64_t p = 0; p < c.lens[s]; ++p) {
        double d = 0;
        for (int64_t i = 0; i < c.hd; ++i) d += double(qv[i]) * k.values[at(p) + i];
        sc[p] = d * scale;
        mx = std::max(mx, sc[p]);
      }
      for (int64_t p = 0; p < c.lens[s]; ++p) {
        const double e = std::exp(sc[p] - mx);
        sum += e;
        for (int64_t i = 0; i < c.hd; ++i) o[i] += e * v.values[at(p) + i];
      }
      for (int64_t i = 0; i < c.hd; ++i) {
        const double ref = c.lens[s] ? o[i] / sum : 0.0;
        // Outputs are averages of O(1) values: f32 within 2e-5 absolute, bf16 one rounding.
        ASSERT_NEAR(got[(s * c.heads + h) * c.hd + i], ref, RelTol(c.q) * std::abs(ref) + 2e-5)
            << "seq " << s << " head " << h << " dim " << i;
      }
    }
}

TEST(CudaPagedDecodeAttentionTest, MatchesDoubleReferenceWithGqaScatteredBlocksAndSplitContexts) {
  SKIP_WITHOUT_GPU();
  const AttnCase cases[] = {
      {DType::kF32, DType::kF32, 16, 4, 64, 16, {1, 16, 17, 100, 0, 513}},
      {DType::kBF16, DType::kBF16, 16, 4, 64, 16, {1, 16, 17, 100, 0, 513}},
      {DType::kBF16, DType::kF32, 6, 2, 80, 7, {3, 50, 29}},
      {DType::kF32, DType::kBF16, 4, 4, 256, 5, {64, 1}},
      {DType::kF32, DType::kF32, 3, 1, 18, 16, {40}},
      {DType::kF32, DType::kF32, 8, 8, 128, 16, {2048}},
      {DType::kBF16, DType::kBF16, 2, 1, 64, 16, {4000, 3, 0, 1500}},  // few blocks: many splits
  };
  uint32_t seed = 700;
  for (const AttnCase& c : cases) {
    for (bool split : {false, true}) {
      SCOPED_TRACE(::testing::Message() << DTypeName(c.q) << " q, " << DTypeName(c.kv) << " kv, heads " << c.heads
                                        << "/" << c.kv_heads << " hd " << c.hd << " block " << c.block_size
                                        << (split ? ", split contexts" : ", one block per head"));
      RunAttentionCase(c, seed, split);
      if (HasFatalFailure()) return;
    }
    seed += 10;
  }
}

TEST(CudaWritePagedKvTest, RowsLandInTheirSlotsAndOtherSlotsAreUntouched) {
  SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::kF32, DType::kBF16})
    for (int64_t row : {int64_t{64}, int64_t{12}}) {  // 16-byte words, and 2-byte words
      const int64_t tokens = 5, num_slots = 40, es = DTypeSize(dtype);
      const std::vector<int64_t> slots = {7, 0, 39, 16, 8};
      HostTensor k = MakeTensor(dtype, RandomVector(tokens * row, 11));
      HostTensor v = MakeTensor(dtype, RandomVector(tokens * row, 12));
      DeviceBuffer dk(k.bytes.size()), dv(v.bytes.size()), ds(slots.size() * 8),
          kc(num_slots * row * es), vc(num_slots * row * es);
      ASSERT_CUDA(Upload(k.bytes, dk));
      ASSERT_CUDA(Upload(v.bytes, dv));
      ASSERT_CUDA(Upload(slots, ds));
      ASSERT_OK(WritePagedKv(dk.get(), dv.get(), dtype, tokens, row, ds.as<int64_t>(), num_slots,
                             kc.get(), vc.get(), nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      std::vector<uint8_t> kh(num_slots * row * es), vh(num_slots * row * es);
      ASSERT_CUDA(Download(kc, &kh));
      ASSERT_CUDA(Download(vc, &vh));
      std::vector<bool> written(num_slots, false);
      for (int64_t t = 0; t < tokens; ++t) {
        written[slots[t]] = true;
        EXPECT_EQ(std::memcmp(&kh[slots[t] * row * es], &k.bytes[t * row * es], row * es), 0) << t;
        EXPECT_EQ(std::memcmp(&vh[slots[t] * row * es], &v.bytes[t * row * es], row * es), 0) << t;
      }
      for (int64_t sl = 0; sl < num_slots; ++sl) {
        if (written[sl]) continue;
        for (int64_t b = 0; b < row * es; ++b) {
          ASSERT_EQ(kh[sl * row * es + b], 0xff) << "slot " << sl << " written";
        }
      }
    }
}

TEST(CudaPagedDecodeAttentionTest, RejectsHeadDimAbove256AndUnevenGroups) {
  EXPECT_EQ(PagedDecodeAttention(nullptr, DType::kF32, nullptr, nullptr, DType::kF32, nullptr, nullptr, 1, 4, 4,
                                 320, 16, 1, 0.f, nullptr, DType::kF32, nullptr, 0, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PagedDecodeAttention(nullptr, DType::kF32, nullptr, nullptr, DType::kF32, nullptr, nullptr, 1, 6, 4,
                                 64, 16, 1, 0.f, nullptr, DType::kF32, nullptr, 0, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- A whole MoE block, twice --------------------------------------------------------------

// norm → router → layout → gather → grouped FFN → combine on the bench preset, checked against
// the references above chained on the host, and run twice to show it is bitwise deterministic.
TEST(CudaMoeBlockTest, ChainedKernelsMatchTheHostChainAndRepeatBitwise) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 32, H = 1024, I = 2816, E = 8, K = 2;
  auto engine = GemmContext::Create(GemmBackend::kAuto);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Experts ex = MakeExperts(E, H, I, 800);
  HostTensor x = MakeTensor(DType::kBF16, RandomVector(T * H, 830, -2.f, 2.f));
  HostTensor norm_w = MakeTensor(DType::kBF16, RandomVector(H, 831, 0.5f, 1.5f));
  std::vector<float> router_w = RandomVector(E * H, 832);  // f32 [E, H]; logits on the host

  cudaStream_t stream;
  ASSERT_CUDA(cudaStreamCreate(&stream));
  DeviceBuffer dx(x.bytes.size()), dnw(norm_w.bytes.size()), dn(T * H * 2), dlog(T * E * 4), dids(T * K * 4),
      dtw(T * K * 4), dcnt(E * 4), doff((E + 1) * 4), dg2f(T * K * 4), df2g(T * K * 4), dgx(T * K * H * 2),
      dgy(T * K * H * 2), dout(T * H * 4), dws(GroupedExpertFfnWorkspaceBytes(T * K, I));
  ASSERT_CUDA(Upload(x.bytes, dx));
  ASSERT_CUDA(Upload(norm_w.bytes, dnw));

  // Host chain: normed activations (bf16 as the kernel stores them) and router logits.
  std::vector<float> normed(T * H), logits(T * E);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += double(x.values[t * H + i]) * x.values[t * H + i];
    const double inv = 1.0 / std::sqrt(ss / H + 1e-6);
    for (int64_t i = 0; i < H; ++i)
      normed[t * H + i] = Bf16ToF32(F32ToBf16(float(x.values[t * H + i] * inv * norm_w.values[i])));
  }
  std::vector<float> out_first;
  for (int run = 0; run < 2; ++run) {
    // Poison every intermediate so that the second run cannot pass on the first run's data.
    for (const DeviceBuffer* b : {&dn, &dids, &dtw, &dcnt, &doff, &dg2f, &df2g, &dgx, &dgy, &dout})
      ASSERT_CUDA(cudaMemsetAsync(b->get(), 0xff, b->size(), stream));
    ASSERT_OK(RmsNorm(dx.get(), DType::kBF16, T, H, dnw.get(), DType::kBF16, 1e-6f, dn.get(), DType::kBF16, stream));
    std::vector<uint16_t> nb(T * H);
    ASSERT_CUDA(cudaStreamSynchronize(stream));
    ASSERT_CUDA(Download(dn, &nb));
    std::vector<float> gpu_normed(T * H);
    for (int64_t i = 0; i < T * H; ++i) gpu_normed[i] = Bf16ToF32(nb[i]);
    // Logits from the GPU's normed rows so routing sees the same inputs on both sides.
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) {
        double s = 0;
        for (int64_t i = 0; i < H; ++i) s += double(router_w[e * H + i]) * gpu_normed[t * H + i];
        logits[t * E + e] = float(s);
      }
    if (run == 0) {
      for (int64_t i = 0; i < T * H; ++i)
        ASSERT_NEAR(gpu_normed[i], normed[i], 1e-2 * std::abs(normed[i]) + 1e-6) << i;
    }
    ASSERT_CUDA(Upload(logits, dlog));
    ASSERT_OK(RouteTopK(dlog.as<float>(), T, E, K, true, dids.as<int32_t>(), dtw.as<float>(), stream));
    ASSERT_OK(MoePermuteLayout(dids.as<int32_t>(), T, K, E, dcnt.as<int32_t>(), doff.as<int32_t>(),
                               dg2f.as<int32_t>(), df2g.as<int32_t>(), stream));
    ASSERT_OK(MoeGatherRows(dn.get(), DType::kBF16, T, H, K, dg2f.as<int32_t>(), T * K, dgx.get(), stream));
    std::vector<int32_t> offsets(E + 1);
    ASSERT_CUDA(cudaMemcpyAsync(offsets.data(), doff.get(), (E + 1) * 4, cudaMemcpyDeviceToHost, stream));
    ASSERT_CUDA(cudaStreamSynchronize(stream));
    ASSERT_OK(GroupedExpertFfn(**engine, ex.views.data(), E, offsets.data(), H, I, dgx.get(), dgy.get(), dws.get(),
                               GroupedExpertFfnWorkspaceBytes(T * K, I), stream));
    ASSERT_OK(MoeCombine(dgy.get(), DType::kBF16, df2g.as<int32_t>(), dtw.as<float>(), T, K, H, dout.get(),
                         DType::kF32, stream));
    std::vector<float> out(T * H);
    ASSERT_CUDA(cudaStreamSynchronize(stream));
    ASSERT_CUDA(Download(dout, &out));
    if (run == 1) {
      EXPECT_EQ(std::memcmp(out.data(), out_first.data(), out.size() * 4), 0) << "second run differs";
      break;
    }
    out_first = out;
    // Host chain from the same normed rows: route, run each chosen expert, weighted sum.
    std::vector<int32_t> ids(T * K);
    std::vector<float> tw(T * K);
    RouteReference(logits, T, E, K, true, &ids, &tw);
    std::vector<float> ref(T * H, 0.f), y(H);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < K; ++j) {
        const int32_t e = ids[t * K + j];
        std::vector<float> xr(gpu_normed.begin() + t * H, gpu_normed.begin() + (t + 1) * H);
        FfnReference(xr, 1, H, I, ex.w1[e].values, ex.w3[e].values, ex.w2[e].values, y.data());
        // The kernel rounds each expert row to bf16 before combining.
        for (int64_t i = 0; i < H; ++i) ref[t * H + i] += tw[t * K + j] * Bf16ToF32(F32ToBf16(y[i]));
      }
    ExpectCloseBf16(out, ref);
  }
  ASSERT_CUDA(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace sy::kernels::cuda
