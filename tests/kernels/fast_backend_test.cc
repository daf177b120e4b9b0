// Every kernel of the fast CPU backend against the reference backend, at every CPU level this
// machine has (portable, avx512, avx512bf16, amx), over odd shapes, 1 and many tokens, empty
// expert groups and all three weight dtypes.
//
// Error measure: normalised error ||y - y_ref||_2 / ||y_ref||_2 over the whole output. The
// weights are stored once in their dtype and both backends read the same stored values, so
// weight rounding is not counted; what is counted is what the fast path adds:
//  * f32 arithmetic instead of the reference's double: ~sqrt(K) * 2^-24 per dot product,
//    far below kF32Tol = 1e-5 for K <= 4096;
//  * on avx512bf16 and amx with bf16 weights, activations are rounded to bf16 (RNE; 8 significant
//    bits, unit roundoff u = 2^-8 ≈ 3.9e-3) before vdpbf16ps or tdpbf16ps: each product's relative error
//    is <= u and spread over [-u, u], so a dot product of random-signed terms has normalised
//    error about u/sqrt(3) ≈ 2.3e-3. kBf16MatMulTol = 2u ≈ 7.8e-3. The
//    expert FFN rounds twice (x, then silu(g)*u before the down projection):
//    kBf16FfnTol = 3u ≈ 1.2e-2.
//    That statistical argument needs many terms (K >= 32); for every shape, each bf16
//    output also obeys the worst-case bound |y - y_ref| <= (u + K 2^-24) Σ_k |x_k w_k|
//    (+ 2^-24 |bias|), which MatMul checks element by element.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/core/dtype.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/fast_backend.h"

namespace sy::kernels {
namespace {

using cpu::CpuLevel;

constexpr double kF32Tol = 1e-5;
constexpr double kBf16Unit = 1.0 / 256;  // 2^-8, bf16 unit roundoff
constexpr double kBf16MatMulTol = 2 * kBf16Unit;
constexpr double kBf16FfnTol = 3 * kBf16Unit;

double NormalisedError(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  if (!std::isfinite(num)) return INFINITY;
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

std::vector<float> RandomVec(int64_t n, std::mt19937& rng, float scale = 1.f) {
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A weight matrix stored in `dtype` with `row_stride` >= cols (padding filled with NaN so a
// kernel that reads past a row's end shows up).
struct StoredWeight {
  std::vector<uint8_t> bytes;
  WeightView view;
  StoredWeight(DType dtype, int64_t rows, int64_t cols, int64_t row_stride, std::mt19937& rng,
               float scale = 1.f) {
    const int64_t es = DTypeSize(dtype);
    bytes.resize(std::max<int64_t>(1, rows * row_stride * es));
    std::uniform_real_distribution<float> d(-scale, scale);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < row_stride; ++c) {
        const float v = c < cols ? d(rng) : NAN;
        uint8_t* p = bytes.data() + (r * row_stride + c) * es;
        if (dtype == DType::kF32) {
          std::memcpy(p, &v, 4);
        } else {
          const uint16_t h = dtype == DType::kBF16 ? F32ToBf16(v) : F32ToF16(v);
          std::memcpy(p, &h, 2);
        }
      }
    }
    view = {dtype, bytes.data(), rows, cols, row_stride};
  }
};

double MatMulTol(CpuLevel level, DType dtype) {
  return level >= CpuLevel::kAvx512Bf16 && dtype == DType::kBF16 ? kBf16MatMulTol : kF32Tol;
}

std::vector<CpuLevel> AvailableLevels() {
  std::vector<CpuLevel> out;
  for (CpuLevel l : {CpuLevel::kPortable, CpuLevel::kAvx512, CpuLevel::kAvx512Bf16,
                     CpuLevel::kAmx}) {
    if (l <= cpu::DetectCpuLevel()) out.push_back(l);
  }
  return out;
}

class FastBackendTest : public ::testing::TestWithParam<CpuLevel> {
 protected:
  std::unique_ptr<Backend> fast_ = MakeFastCpuBackend(GetParam());
  std::unique_ptr<Backend> ref_ = MakeReferenceBackend();
  std::mt19937 rng_{1234};
};

struct MatMulShape {
  int64_t tokens, n, k;
};

TEST_P(FastBackendTest, MatMulMatchesReferenceForEveryDtypeAndOddShape) {
  const std::vector<MatMulShape> shapes = {{1, 1, 1},    {1, 5, 7},     {3, 37, 33},
                                           {4, 64, 64},  {5, 67, 130},  {17, 100, 1000},
                                           {33, 48, 96}, {1, 300, 1024}, {9, 13, 2816},
                                           // AMX tiles (>= 16 tokens, K % 32 == 0): one and
                                           // two 16-row weight tiles, a tail of rows, partial
                                           // token tiles
                                           {16, 16, 32},  {40, 70, 64},  {64, 96, 1024},
                                           {100, 200, 2816}};
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const MatMulShape& s : shapes) {
      for (bool with_bias : {false, true}) {
        for (int64_t pad : {0, 3}) {
          StoredWeight w(dtype, s.n, s.k, s.k + pad, rng_);
          auto x = RandomVec(s.tokens * s.k, rng_);
          auto bias = RandomVec(s.n, rng_);
          std::vector<float> got(s.tokens * s.n, NAN), want(s.tokens * s.n);
          EXPECT_TRUE(fast_->MatMul(x.data(), s.tokens, w.view, got.data(), with_bias ? bias.data() : nullptr).ok());
          EXPECT_TRUE(ref_->MatMul(x.data(), s.tokens, w.view, want.data(), with_bias ? bias.data() : nullptr).ok());
          const bool bf16_acts = MatMulTol(GetParam(), dtype) != kF32Tol;
          if (!bf16_acts || s.k >= 32) {
            EXPECT_LE(NormalisedError(got, want), MatMulTol(GetParam(), dtype))
                << DTypeName(dtype) << " T=" << s.tokens << " N=" << s.n << " K=" << s.k
                << " bias=" << with_bias << " pad=" << pad;
          }
          if (bf16_acts) {
            std::vector<float> wrow(s.k);
            for (int64_t j = 0; j < s.n; ++j) {
              ConvertToF32(dtype, w.view.row(j), s.k, wrow.data());
              for (int64_t t = 0; t < s.tokens; ++t) {
                double abs_sum = 0;
                for (int64_t i = 0; i < s.k; ++i) abs_sum += std::fabs(x[t * s.k + i] * wrow[i]);
                const double bound = (kBf16Unit + s.k * std::ldexp(1.0, -24)) * abs_sum +
                                     (with_bias ? std::ldexp(std::fabs(bias[j]), -24) : 0.0);
                ASSERT_LE(std::fabs(got[t * s.n + j] - want[t * s.n + j]), bound)
                    << "T=" << s.tokens << " N=" << s.n << " K=" << s.k << " t=" << t << " j=" << j;
              }
            }
          }
        }
      }
    }
  }
}

TEST_P(FastBackendTest, MatMulWithZeroTokensWritesNothing) {
  StoredWeight w(DType::kBF16, 8, 16, 16, rng_);
  std::vector<float> y(4, 7.f);
  EXPECT_TRUE(fast_->MatMul(nullptr, 0, w.view, y.data(), nullptr).ok());
  EXPECT_EQ(y, std::vector<float>(4, 7.f));
}

TEST_P(FastBackendTest, RmsNormMatchesReferenceInPlaceAndOutOfPlace) {
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t dim : {1, 17, 64, 1024, 1030}) {
      for (int64_t rows : {1, 5, 100}) {
        StoredWeight w(dtype, 1, dim, dim, rng_);
        auto x = RandomVec(rows * dim, rng_, 3.f);
        std::vector<float> got(rows * dim), want(rows * dim);
        EXPECT_TRUE(fast_->RmsNorm(x.data(), rows, dim, w.view, 1e-6f, got.data()).ok());
        EXPECT_TRUE(ref_->RmsNorm(x.data(), rows, dim, w.view, 1e-6f, want.data()).ok());
        EXPECT_LE(NormalisedError(got, want), kF32Tol) << "dim=" << dim << " rows=" << rows;
        std::vector<float> inplace = x;
        EXPECT_TRUE(fast_->RmsNorm(inplace.data(), rows, dim, w.view, 1e-6f, inplace.data()).ok());
        EXPECT_LE(NormalisedError(inplace, want), kF32Tol) << "in place dim=" << dim;
      }
    }
  }
}

struct FfnCase {
  std::vector<int64_t> rows_per_group;  // 0 = empty group (null expert)
  int64_t hidden, inter;
  int64_t first_row;  // offsets[0]
};

TEST_P(FastBackendTest, GroupedExpertFfnMatchesReferenceWithEmptyGroups) {
  const std::vector<FfnCase> cases = {
      {{0, 1, 5, 0, 17}, 67, 45, 0},     {{3, 0}, 128, 96, 0},  {{1, 1}, 1024, 2816, 0},
      {{0, 0, 0}, 32, 32, 0},            {{40}, 64, 200, 0},     {{2, 7}, 33, 70, 3},
      {{9, 4, 1, 0, 0, 0, 0, 30}, 96, 160, 0},
      // groups on the AMX tiles (>= 16 rows, hidden and inter multiples of 32) beside small ones
      {{20, 0, 33, 16, 3}, 64, 96, 0},   {{17, 40}, 1024, 352, 5}};
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const FfnCase& c : cases) {
      const int64_t g_count = static_cast<int64_t>(c.rows_per_group.size());
      std::vector<int64_t> offsets(g_count + 1, c.first_row);
      for (int64_t g = 0; g < g_count; ++g) offsets[g + 1] = offsets[g] + c.rows_per_group[g];
      const int64_t total_rows = offsets.back();
      std::vector<std::unique_ptr<StoredWeight>> store;
      std::vector<ExpertWeights> experts(g_count);
      std::vector<const ExpertWeights*> ptrs(g_count, nullptr);
      for (int64_t g = 0; g < g_count; ++g) {
        if (c.rows_per_group[g] == 0) continue;
        const float s1 = 1.f / std::sqrt(static_cast<float>(c.hidden));
        const float s2 = 1.f / std::sqrt(static_cast<float>(c.inter));
        store.push_back(std::make_unique<StoredWeight>(dtype, c.inter, c.hidden, c.hidden, rng_, s1));
        experts[g].w1 = store.back()->view;
        store.push_back(std::make_unique<StoredWeight>(dtype, c.inter, c.hidden, c.hidden, rng_, s1));
        experts[g].w3 = store.back()->view;
        store.push_back(std::make_unique<StoredWeight>(dtype, c.hidden, c.inter, c.inter, rng_, s2));
        experts[g].w2 = store.back()->view;
        ptrs[g] = &experts[g];
      }
      auto x = RandomVec(std::max<int64_t>(1, total_rows * c.hidden), rng_, 2.f);
      // Rows before offsets[0] are not the kernel's to write.
      std::vector<float> got(std::max<int64_t>(1, total_rows * c.hidden), 5.f);
      std::vector<float> want = got;
      EXPECT_TRUE(fast_->GroupedExpertFfn(x.data(), offsets.data(), g_count, ptrs.data(), c.hidden, got.data()).ok());
      EXPECT_TRUE(ref_->GroupedExpertFfn(x.data(), offsets.data(), g_count, ptrs.data(), c.hidden, want.data()).ok());
      const double tol =
          GetParam() >= CpuLevel::kAvx512Bf16 && dtype == DType::kBF16 ? kBf16FfnTol : kF32Tol;
      EXPECT_LE(NormalisedError(got, want), tol)
          << DTypeName(dtype) << " groups=" << g_count << " hidden=" << c.hidden
          << " inter=" << c.inter;
      for (int64_t i = 0; i < c.first_row * c.hidden; ++i) ASSERT_EQ(got[i], 5.f);
    }
  }
}

TEST_P(FastBackendTest, GroupedExpertFfnRowsReadsF32AndBf16RowsByAddress) {
  // Rows scattered over two buffers (f32 token rows, a bf16 "receive buffer"), listed out of
  // order: the same results as GroupedExpertFfn over the rows gathered into f32 (bf16 rows
  // widened exactly), for bf16 experts (the direct path) and f32 experts (the default path).
  const int64_t hidden = 64, inter = 96;
  const std::vector<int64_t> rows_per_group = {18, 0, 5, 1};
  const int64_t first_row = 2;
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    const int64_t G = static_cast<int64_t>(rows_per_group.size());
    std::vector<int64_t> offsets(G + 1, first_row);
    for (int64_t g = 0; g < G; ++g) offsets[g + 1] = offsets[g] + rows_per_group[g];
    const int64_t R = offsets.back();
    std::vector<std::unique_ptr<StoredWeight>> store;
    std::vector<ExpertWeights> experts(G);
    std::vector<const ExpertWeights*> ptrs(G, nullptr);
    for (int64_t g = 0; g < G; ++g) {
      if (rows_per_group[g] == 0) continue;
      store.push_back(std::make_unique<StoredWeight>(dtype, inter, hidden, hidden, rng_, 0.125f));
      experts[g].w1 = store.back()->view;
      store.push_back(std::make_unique<StoredWeight>(dtype, inter, hidden, hidden, rng_, 0.125f));
      experts[g].w3 = store.back()->view;
      store.push_back(std::make_unique<StoredWeight>(dtype, hidden, inter, inter, rng_, 0.1f));
      experts[g].w2 = store.back()->view;
      ptrs[g] = &experts[g];
    }
    auto tokens = RandomVec(R * hidden, rng_, 2.f);
    std::vector<uint16_t> wire(R * hidden);
    for (int64_t i = 0; i < R * hidden; ++i) wire[i] = F32ToBf16(tokens[i]);
    std::vector<const void*> addr(R);
    std::vector<uint8_t> is_bf16(R);
    std::vector<float> gathered(R * hidden);
    for (int64_t i = 0; i < R; ++i) {
      const int64_t src = R - 1 - i;  // listed in reverse
      is_bf16[i] = i % 3 == 1;
      addr[i] = is_bf16[i] ? static_cast<const void*>(&wire[src * hidden])
                           : static_cast<const void*>(&tokens[src * hidden]);
      for (int64_t d = 0; d < hidden; ++d)
        gathered[i * hidden + d] =
            is_bf16[i] ? Bf16ToF32(wire[src * hidden + d]) : tokens[src * hidden + d];
    }
    std::vector<float> got(R * hidden, 5.f), want(R * hidden, 5.f), ref(R * hidden, 5.f);
    ASSERT_TRUE(fast_->GroupedExpertFfnRows({addr.data(), is_bf16.data()}, offsets.data(), G,
                                            ptrs.data(), hidden, got.data()).ok());
    ASSERT_TRUE(fast_->GroupedExpertFfn(gathered.data(), offsets.data(), G, ptrs.data(), hidden,
                                        want.data()).ok());
    ASSERT_TRUE(ref_->GroupedExpertFfnRows({addr.data(), is_bf16.data()}, offsets.data(), G,
                                           ptrs.data(), hidden, ref.data()).ok());
    // The direct path rounds each row to bf16 exactly as GroupedExpertFfn does: equal.
    EXPECT_EQ(got, want) << DTypeName(dtype);
    const double tol =
        GetParam() >= CpuLevel::kAvx512Bf16 && dtype == DType::kBF16 ? kBf16FfnTol : kF32Tol;
    EXPECT_LE(NormalisedError(got, ref), tol) << DTypeName(dtype);
    for (int64_t i = 0; i < first_row * hidden; ++i) ASSERT_EQ(got[i], 5.f);
  }
}

struct AttnCase {
  int64_t num_new, start_pos, num_heads, num_kv_heads, head_dim, block_size;
};

TEST_P(FastBackendTest, AttentionMatchesReferenceOverShuffledBlocks) {
  const std::vector<AttnCase> cases = {{1, 0, 4, 2, 64, 4},   {7, 0, 4, 2, 64, 4},
                                       {1, 9, 16, 4, 64, 16}, {5, 30, 16, 4, 64, 16},
                                       {3, 2, 3, 1, 20, 5},   {64, 0, 8, 8, 128, 16},
                                       {1, 200, 2, 1, 80, 7}};
  for (const AttnCase& c : cases) {
    const int64_t total = c.start_pos + c.num_new;
    const int64_t nblocks = (total + c.block_size - 1) / c.block_size;
    const int64_t pool_blocks = nblocks + 3;
    std::vector<int32_t> table(pool_blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng_);
    table.resize(nblocks);
    const int64_t cache = pool_blocks * c.block_size * c.num_kv_heads * c.head_dim;
    auto k = RandomVec(cache, rng_, 1.f);
    auto v = RandomVec(cache, rng_, 1.f);
    PagedKv kv{k.data(), v.data(), c.block_size, c.num_kv_heads, c.head_dim};
    auto q = RandomVec(c.num_new * c.num_heads * c.head_dim, rng_, 2.f);
    std::vector<float> got(q.size(), NAN), want(q.size());
    const float scale = 1.f / std::sqrt(static_cast<float>(c.head_dim));
    EXPECT_TRUE(fast_->Attention(q.data(), c.num_new, c.start_pos, c.num_heads, kv, table.data(), scale, got.data()).ok());
    EXPECT_TRUE(ref_->Attention(q.data(), c.num_new, c.start_pos, c.num_heads, kv, table.data(), scale, want.data()).ok());
    EXPECT_LE(NormalisedError(got, want), kF32Tol)
        << "new=" << c.num_new << " start=" << c.start_pos << " hd=" << c.head_dim;
  }
}

TEST_P(FastBackendTest, AttentionBatchMatchesReferenceAttentionPerSequence) {
  // One layer's cache shared by five sequences in shuffled blocks: a prefill chunk after a
  // prefix, decode steps at different lengths, a fresh prompt and one with no new tokens.
  const int64_t heads = 16, kv_heads = 4, hd = 64, bs = 16;
  struct Seq { int64_t start, num_new; };
  const std::vector<Seq> seqs = {{40, 9}, {130, 1}, {0, 1}, {0, 23}, {57, 0}, {7, 1}};
  int64_t blocks = 0;
  std::vector<std::vector<int32_t>> tables;
  for (const Seq& q : seqs) {
    const int64_t nb = (q.start + q.num_new + bs - 1) / bs;
    tables.emplace_back(nb);
    blocks += nb;
  }
  std::vector<int32_t> pool(blocks + 2);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng_);
  int64_t next = 0;
  for (auto& t : tables)
    for (auto& b : t) b = pool[next++];
  const int64_t cache = (blocks + 2) * bs * kv_heads * hd;
  auto k = RandomVec(cache, rng_, 1.f);
  auto v = RandomVec(cache, rng_, 1.f);
  PagedKv kv{k.data(), v.data(), bs, kv_heads, hd};
  std::vector<std::vector<float>> q, got, want;
  std::vector<AttentionSeq> batch;
  for (size_t s = 0; s < seqs.size(); ++s) {
    q.push_back(RandomVec(std::max<int64_t>(1, seqs[s].num_new * heads * hd), rng_, 2.f));
    got.emplace_back(q.back().size(), NAN);
    want.emplace_back(q.back().size(), NAN);
  }
  for (size_t s = 0; s < seqs.size(); ++s)
    batch.push_back({q[s].data(), seqs[s].num_new, seqs[s].start, tables[s].data(), got[s].data()});
  const float scale = 0.125f;
  EXPECT_TRUE(fast_->AttentionBatch(batch.data(), static_cast<int64_t>(batch.size()), heads, kv, scale).ok());
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (seqs[s].num_new == 0) {
      EXPECT_TRUE(std::isnan(got[s][0])) << "a sequence without new tokens is not written";
      continue;
    }
    EXPECT_TRUE(ref_->Attention(q[s].data(), seqs[s].num_new, seqs[s].start, heads, kv, tables[s].data(), scale,
                    want[s].data()).ok());
    EXPECT_LE(NormalisedError(got[s], want[s]), kF32Tol) << "sequence " << s;
  }
}

INSTANTIATE_TEST_SUITE_P(EveryCpuLevel, FastBackendTest, ::testing::ValuesIn(AvailableLevels()),
                         [](const ::testing::TestParamInfo<CpuLevel>& info) {
                           return std::string(cpu::CpuLevelName(info.param));
                         });

TEST(BackendRegistryTest, CpuAndAutoPickTheFastBackendAndUnknownNamesFail) {
  auto cpu_backend = MakeBackend("cpu");
  ASSERT_TRUE(cpu_backend.ok());
  EXPECT_EQ((*cpu_backend)->name().rfind("cpu(", 0), 0u) << (*cpu_backend)->name();
  auto auto_backend = MakeBackend("auto");
  ASSERT_TRUE(auto_backend.ok());
  EXPECT_EQ((*auto_backend)->name(), (*cpu_backend)->name());
  auto ref = MakeBackend("reference");
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ((*ref)->name(), "reference");
  auto bad = MakeBackend("tpu");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BackendRegistryTest, CudaWithoutAUsableDeviceIsAClearFailedPrecondition) {
  for (const char* bad : {"cuda:", "cuda:x", "cuda:-1", "cuda0", "cudax"})
    EXPECT_EQ(MakeBackend(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  auto cuda = MakeBackend("cuda");
  if (cuda.ok()) {  // a GPU host (tests/kernels/cuda_backend_gpu_test.cc checks the rest)
    EXPECT_EQ((*cuda)->name().rfind("cuda:0", 0), 0u) << (*cuda)->name();
    return;
  }
  // This build has no CUDA, or the host no device or driver: said at once, never a crash.
  EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition) << cuda.status();
  EXPECT_NE(cuda.status().message().find("CUDA"), std::string::npos) << cuda.status();
  EXPECT_EQ(MakeBackend("cuda:1").status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(CpuKernelsTest, Bf16ConversionRoundsToNearestEvenAndZeroPads) {
  if (cpu::DetectCpuLevel() < CpuLevel::kAvx512Bf16) GTEST_SKIP() << "no AVX512-BF16";
  std::mt19937 rng(7);
  for (int64_t k : {1, 31, 32, 33, 100}) {
    auto x = RandomVec(3 * k, rng, 100.f);
    x[0] = 1.f + 1.f / 256;  // exactly halfway between two bf16: rounds to even (1.0)
    const int64_t ld = cpu::PaddedBf16Cols(k);
    std::vector<uint16_t> out(3 * ld, 0xffff);
    cpu::ConvertRowsToBf16Avx512(x.data(), 3, k, k, out.data(), ld);
    for (int64_t r = 0; r < 3; ++r) {
      for (int64_t c = 0; c < ld; ++c) {
        const uint16_t want = c < k ? F32ToBf16(x[r * k + c]) : 0;
        ASSERT_EQ(out[r * ld + c], want) << "k=" << k << " r=" << r << " c=" << c;
      }
    }
    EXPECT_EQ(out[0], 0x3f80);
  }
}

TEST(CpuKernelsTest, AmxPackingInterleavesColumnPairsByBlocksOfSixteenRows) {
  if (cpu::DetectCpuLevel() < CpuLevel::kAmx) GTEST_SKIP() << "no AMX";
  std::mt19937 rng(11);
  for (int64_t T : {1, 16, 21}) {
    for (int64_t kp : {32, 96}) {
      const int64_t ld = kp + 32;
      std::vector<uint16_t> x(T * ld);
      for (auto& v : x) v = static_cast<uint16_t>(rng());
      // The packed blocks are stored with aligned 64-byte stores.
      std::vector<uint32_t> buf(cpu::AmxPackedSize(T, kp) + 16, 0xdeadbeef);
      uint32_t* packed = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / 4 % 16) % 16;
      cpu::PackBf16ForAmx(x.data(), ld, T, kp, packed);
      for (int64_t t = 0; t < (T + 15) / 16 * 16; ++t) {
        for (int64_t c = 0; c < kp / 2; ++c) {
          const uint32_t want =
              t < T ? static_cast<uint32_t>(x[t * ld + 2 * c]) |
                          static_cast<uint32_t>(x[t * ld + 2 * c + 1]) << 16
                    : 0u;
          ASSERT_EQ(packed[t / 16 * 16 * (kp / 2) + c * 16 + t % 16], want)
              << "T=" << T << " kp=" << kp << " t=" << t << " c=" << c;
        }
      }
    }
  }
}

}  // namespace
}  // namespace sy::kernels
