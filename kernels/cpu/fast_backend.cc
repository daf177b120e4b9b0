// Fast CPU backend: see fast_backend.h. Work is split over the default pool by output rows
// (MatMul), by (expert, slice of rows) with a cost-balanced split (GroupedExpertFfn), by
// (token, head) balanced by key count (Attention) and by rows (RmsNorm).
#include "kernels/cpu/fast_backend.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <new>
#include <vector>

#include "kernels/core/logging.h"
#include "kernels/core/thread_pool.h"
#include "kernels/cpu/cpu_kernels.h"

namespace sy::kernels {
namespace {

using cpu::CpuLevel;

// Multiply-adds below which a kernel call stays on the calling thread (about 10-50 us of
// work): handing work to the other worker costs microseconds when it is spinning and far
// more when it sleeps or the machine is loaded (KERNEL_NOTES.md).
constexpr double kMinParallelMacs = 1 << 20;
// MatMul ranges: 1 M multiply-adds or 256 KiB of weights, whichever comes first. By
// multiply-adds alone (2 MiB of bf16 weights at one token) a decode step's q / k / v / o
// projections each ran on one thread; sized by bytes they split, and batch-1 decode got
// 1.1x faster (bf16 on AMX, and f32 weights; bench/KERNEL_NOTES.md, AMX). 128 K multiply-adds
// alone had measured no better on the loaded machine (KERNEL_NOTES.md §8).
constexpr double kMinMatMulRangeMacs = 1 << 20;
constexpr double kMinMatMulRangeBytes = 256 << 10;
// Attention reads a cache-resident KV and has no weight streaming: a smaller call pays.
constexpr double kMinParallelAttentionMacs = 1 << 18;

// Scratch vectors start on a 64-byte line so row loads of activations do not split lines.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
template <typename T>
using ScratchVec = std::vector<T, Aligned64<T>>;

// Grow-only scratch owned by one thread.
template <typename V>
typename V::value_type* Grow(V& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Runs fn(begin, end) over [0, n) split into contiguous parts of about equal total cost
// (prefix[u] = summed cost of units before u; size n + 1), kRangesPerThread parts per thread,
// which the pool's threads claim as they come free. Below `min_cost` it runs inline.
void BalancedFor(const std::vector<double>& prefix, int64_t n, double min_cost,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  ThreadPool& pool = ThreadPool::Default();
  const double total = prefix[n];
  const int64_t parts =
      std::min<int64_t>(n, pool.num_threads() * ThreadPool::kRangesPerThread);
  if (pool.num_threads() <= 1 || total < min_cost || parts <= 1) {
    fn(0, n);
    return;
  }
  auto cut = [&](int64_t p) -> int64_t {
    if (p >= parts) return n;
    const double target = total * static_cast<double>(p) / static_cast<double>(parts);
    return std::lower_bound(prefix.begin(), prefix.begin() + n + 1, target) - prefix.begin();
  };
  pool.ParallelFor(parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = cut(p), e = cut(p + 1);
      if (e > b) fn(b, e);
    }
  });
}

// A slice [r0, r1) of the output rows of expert group g's projection.
struct FfnUnit {
  int64_t g, r0, r1;
};

// SWITCHYARD_KERNEL_PROFILE=1: wall time per (kernel, token-count bucket), printed to stderr
// when the backend is destroyed. Off by default (one branch per call).
class KernelProfile {
 public:
  KernelProfile() : enabled_(std::getenv("SWITCHYARD_KERNEL_PROFILE") != nullptr) {}
  ~KernelProfile() {
    if (!enabled_ || entries_.empty()) return;
    double total = 0;
    for (const auto& [key, e] : entries_) total += e.seconds;
    std::fprintf(stderr, "kernel profile (fast cpu backend): %.3f s in kernels\n", total);
    for (const auto& [key, e] : entries_) {
      std::fprintf(stderr, "  %-22s tokens<=%-5lld calls %8lld  %9.3f ms  %5.1f %%\n",
                   key.first.c_str(), static_cast<long long>(key.second),
                   static_cast<long long>(e.calls), e.seconds * 1e3, 100 * e.seconds / total);
    }
  }
  bool enabled() const { return enabled_; }
  void Add(const char* op, int64_t tokens, double seconds) {
    int64_t bucket = 1;
    while (bucket < tokens) bucket *= 2;
    Entry& e = entries_[{op, bucket}];
    ++e.calls;
    e.seconds += seconds;
  }
  static double Now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }

 private:
  struct Entry {
    int64_t calls = 0;
    double seconds = 0;
  };
  const bool enabled_;
  std::map<std::pair<std::string, int64_t>, Entry> entries_;
};

// Times one kernel call when profiling is on.
class ProfileScope {
 public:
  ProfileScope(KernelProfile& p, const char* op, int64_t tokens)
      : p_(p), op_(op), tokens_(tokens), start_(p.enabled() ? KernelProfile::Now() : 0) {}
  ~ProfileScope() {
    if (p_.enabled()) p_.Add(op_, tokens_, KernelProfile::Now() - start_);
  }

 private:
  KernelProfile& p_;
  const char* op_;
  int64_t tokens_;
  double start_;
};

class FastCpuBackend final : public Backend {
 public:
  explicit FastCpuBackend(CpuLevel level) : level_(level) {
    SY_CHECK(level <= cpu::DetectCpuLevel())
        << "CPU lacks " << cpu::CpuLevelName(level) << " (has "
        << cpu::CpuLevelName(cpu::DetectCpuLevel()) << ")";
  }

  std::string name() const override {
    return std::string("cpu(") + cpu::CpuLevelName(level_) + ")";
  }

  absl::Status MatMul(const float* x, int64_t num_tokens, const WeightView& w, float* y,
              const float* bias) override {
    const int64_t n = w.rows, k = w.cols, T = num_tokens;
    if (T <= 0 || n <= 0) return absl::OkStatus();
    ProfileScope prof(profile_, n >= 16384 ? "matmul(lm_head)" : "matmul", T);
    const uint16_t* xb = nullptr;
    int64_t ldxb = 0;
    if (UsesBf16Activations(w.dtype)) {
      ldxb = cpu::PaddedBf16Cols(k);
      uint16_t* buf = Grow(xb_, T * ldxb);
      ConvertToBf16(x, T, k, k, buf, ldxb);
      xb = buf;
    }
    if (UsesAmx(w)) {
      uint32_t* xp = Grow(xp_, cpu::AmxPackedSize(T, k));
      PackForAmx(xb, ldxb, T, k, xp);
      // Groups of 16 output rows (the AMX tile); the rows past the last full tile run on the
      // AVX-512 kernel.
      const int64_t full = n / 16 * 16;
      const int64_t groups = (n + 15) / 16;
      ThreadPool::Default().ParallelFor(groups, MatMulGrain(16, k, T, w.dtype), [&](int64_t g0, int64_t g1) {
        const int64_t r0 = g0 * 16, r1 = std::min(n, g1 * 16), rf = std::min(r1, full);
        if (rf > r0)
          cpu::DotRowsBf16Amx(xp, T, k, reinterpret_cast<const uint16_t*>(w.row(r0)),
                              w.row_stride, k, rf - r0, y + r0, n, bias ? bias + r0 : nullptr);
        DotRows(x, k, xb, ldxb, T, w, std::max(r0, rf), r1, y + std::max(r0, rf), n,
                bias ? bias + std::max(r0, rf) : nullptr);
      });
      return absl::OkStatus();
    }
    // Groups of 4 output rows (the register tile); ranges hold enough work to pay for a wake.
    const int64_t groups = (n + 3) / 4;
    ThreadPool::Default().ParallelFor(groups, MatMulGrain(4, k, T, w.dtype), [&](int64_t g0, int64_t g1) {
      const int64_t r0 = g0 * 4, r1 = std::min(n, g1 * 4);
      DotRows(x, k, xb, ldxb, T, w, r0, r1, y + r0, n, bias ? bias + r0 : nullptr);
    });
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const float* x, int64_t num_rows, int64_t dim, const WeightView& weight,
               float eps, float* y) override {
    if (num_rows <= 0) return absl::OkStatus();
    ProfileScope prof(profile_, "rmsnorm", num_rows);
    float* wf = Grow(norm_w_, dim);
    ConvertToF32(weight.dtype, weight.data, dim, wf);
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(kMinParallelMacs / dim));
    ThreadPool::Default().ParallelFor(num_rows, grain, [&](int64_t r0, int64_t r1) {
      if (level_ >= CpuLevel::kAvx512) {
        cpu::RmsNormAvx512(x + r0 * dim, r1 - r0, dim, wf, eps, y + r0 * dim);
      } else {
        cpu::RmsNormPortable(x + r0 * dim, r1 - r0, dim, wf, eps, y + r0 * dim);
      }
    });
    return absl::OkStatus();
  }

  absl::Status GroupedExpertFfn(const float* x, const int64_t* offsets, int64_t num_groups,
                        const ExpertWeights* const* experts, int64_t hidden,
                        float* y) override {
    return ExpertFfn(x, nullptr, offsets, num_groups, experts, hidden, y);
  }

  // Rows by address: when every expert with rows runs on bf16 activations, the rows are
  // rounded (f32) or copied (bf16) straight into the kernels' bf16 rows, one pass, no f32
  // copy; otherwise the default gather into f32.
  absl::Status GroupedExpertFfnRows(const RowList& x, const int64_t* offsets, int64_t num_groups,
                                    const ExpertWeights* const* experts, int64_t hidden,
                                    float* y) override {
    for (int64_t g = 0; g < num_groups; ++g) {
      if (offsets[g + 1] > offsets[g] &&
          (experts[g] == nullptr || !ExpertUsesBf16(*experts[g])))
        return Backend::GroupedExpertFfnRows(x, offsets, num_groups, experts, hidden, y);
    }
    return ExpertFfn(nullptr, &x, offsets, num_groups, experts, hidden, y);
  }

  // The grouped expert FFN over rows x (f32 [R, hidden]) or, when every expert runs on bf16
  // activations, over rows by address (list; x == nullptr).
  absl::Status ExpertFfn(const float* x, const RowList* list, const int64_t* offsets,
                         int64_t num_groups, const ExpertWeights* const* experts, int64_t hidden,
                         float* y) {
    const int64_t R = offsets[num_groups] - offsets[0];
    if (R <= 0) return absl::OkStatus();
    const int64_t base = offsets[0];
    ProfileScope prof(profile_, "grouped_experts", R);
    // Shapes and activation format per group.
    int64_t max_inter = 0;
    bool any_bf16 = false, any_f32 = false;
    for (int64_t g = 0; g < num_groups; ++g) {
      if (offsets[g + 1] == offsets[g]) continue;
      SY_CHECK(experts[g] != nullptr) << "group " << g << " has rows but no expert";
      const ExpertWeights& e = *experts[g];
      SY_CHECK(e.w1.cols == hidden && e.w3.cols == hidden && e.w2.rows == hidden &&
               e.w3.rows == e.w1.rows && e.w2.cols == e.w1.rows)
          << "expert " << g << " shapes do not match hidden " << hidden;
      max_inter = std::max(max_inter, e.w1.rows);
      any_bf16 |= ExpertUsesBf16(e);
      any_f32 |= !ExpertUsesBf16(e);
    }
    const int64_t ldxb = cpu::PaddedBf16Cols(hidden);
    const int64_t ldhb = cpu::PaddedBf16Cols(max_inter);
    uint16_t* xb = nullptr;
    uint16_t* hb = nullptr;
    float* hf = any_f32 ? Grow(hf_, R * max_inter) : nullptr;
    if (any_bf16) {
      xb = Grow(xb_, R * ldxb);
      if (list != nullptr) {
        GatherBf16(*list, base, R, hidden, xb, ldxb);
      } else {
        ConvertToBf16(x + base * hidden, R, hidden, hidden, xb, ldxb);
      }
      hb = Grow(hb_, R * ldhb);
    }
    // Groups on AMX: their rows packed once for the gate / up products
    // (xp) and, after phase 1, their silu(g) * u rows for the down product (hp).
    std::vector<int64_t>& xpo = xp_offset_;
    std::vector<int64_t>& hpo = hp_offset_;
    xpo.assign(num_groups, -1);
    hpo.assign(num_groups, -1);
    int64_t xp_size = 0, hp_size = 0;
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t rows = offsets[g + 1] - offsets[g];
      if (rows == 0 || !ExpertUsesBf16(*experts[g]) || !UsesAmx(experts[g]->w1) ||
          !UsesAmx(experts[g]->w2))
        continue;
      xpo[g] = xp_size;
      hpo[g] = hp_size;
      xp_size += cpu::AmxPackedSize(rows, hidden);
      hp_size += cpu::AmxPackedSize(rows, experts[g]->w1.rows);
    }
    uint32_t* xp = xp_size > 0 ? Grow(xp_, xp_size) : nullptr;
    uint32_t* hp = hp_size > 0 ? Grow(hp_, hp_size) : nullptr;
    // Packs the rows of every AMX group from `src` (ld) into dst at its offset.
    auto pack_groups = [&](const uint16_t* src, int64_t ld, bool down, uint32_t* dst) {
      ThreadPool::Default().ParallelFor(num_groups, 1, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          if (xpo[g] < 0) continue;
          const int64_t kp = down ? experts[g]->w1.rows : hidden;
          cpu::PackBf16ForAmx(src + (offsets[g] - base) * ld, ld, offsets[g + 1] - offsets[g],
                              kp, dst + (down ? hpo[g] : xpo[g]));
        }
      });
    };
    if (xp != nullptr) pack_groups(xb, ldxb, false, xp);

    // Phase 1: gate and up projections and silu(g) * u, by (expert, slice of kSlice rows).
    constexpr int64_t kSlice = 64;
    // Cost of one row of one weight matrix for `rows` tokens: streaming the row is worth
    // about kRowCost tokens of multiply-adds.
    constexpr double kRowCost = 8;
    std::vector<FfnUnit>& units = units_;
    std::vector<double>& prefix = prefix_;
    auto plan = [&](bool down) {
      units.clear();
      prefix.assign(1, 0.0);
      for (int64_t g = 0; g < num_groups; ++g) {
        const int64_t rows = offsets[g + 1] - offsets[g];
        if (rows == 0) continue;
        const int64_t n = down ? hidden : experts[g]->w1.rows;
        const int64_t k = down ? experts[g]->w1.rows : hidden;
        for (int64_t r0 = 0; r0 < n; r0 += kSlice) {
          const int64_t r1 = std::min(n, r0 + kSlice);
          units.push_back({g, r0, r1});
          prefix.push_back(prefix.back() + (down ? 1.0 : 2.0) * (r1 - r0) * k * (rows + kRowCost));
        }
      }
    };

    plan(false);
    BalancedFor(prefix, static_cast<int64_t>(units.size()), kMinParallelMacs, [&](int64_t u0, int64_t u1) {
      thread_local ScratchVec<float> gate, up;
      for (int64_t u = u0; u < u1; ++u) {
        const FfnUnit& un = units[u];
        const ExpertWeights& e = *experts[un.g];
        const int64_t rows = offsets[un.g + 1] - offsets[un.g];
        const int64_t first = offsets[un.g] - base;
        const int64_t nn = un.r1 - un.r0;
        float* gbuf = Grow(gate, rows * nn);
        float* ubuf = Grow(up, rows * nn);
        const bool bf = ExpertUsesBf16(e);
        const float* xs = bf ? nullptr : x + offsets[un.g] * hidden;
        const uint16_t* xbs = bf ? xb + first * ldxb : nullptr;
        if (xpo[un.g] >= 0) {
          const uint32_t* xpg = xp + xpo[un.g];
          cpu::DotRowsBf16Amx(xpg, rows, hidden, BfRow(e.w1, un.r0), e.w1.row_stride, hidden, nn,
                              gbuf, nn, nullptr);
          cpu::DotRowsBf16Amx(xpg, rows, hidden, BfRow(e.w3, un.r0), e.w3.row_stride, hidden, nn,
                              ubuf, nn, nullptr);
        } else {
          DotRows(xs, hidden, xbs, ldxb, rows, e.w1, un.r0, un.r1, gbuf, nn, nullptr);
          DotRows(xs, hidden, xbs, ldxb, rows, e.w3, un.r0, un.r1, ubuf, nn, nullptr);
        }
        for (int64_t t = 0; t < rows; ++t) {
          if (bf) {
            cpu::SiluMulAvx512(gbuf + t * nn, ubuf + t * nn, nn, nullptr,
                               hb + (first + t) * ldhb + un.r0);
          } else if (level_ >= CpuLevel::kAvx512) {
            cpu::SiluMulAvx512(gbuf + t * nn, ubuf + t * nn, nn,
                               hf + (first + t) * max_inter + un.r0, nullptr);
          } else {
            cpu::SiluMulPortable(gbuf + t * nn, ubuf + t * nn, nn,
                                 hf + (first + t) * max_inter + un.r0);
          }
        }
      }
    });

    // Phase 2: down projection, by (expert, slice of output columns).
    if (hp != nullptr) pack_groups(hb, ldhb, true, hp);
    plan(true);
    BalancedFor(prefix, static_cast<int64_t>(units.size()), kMinParallelMacs, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const FfnUnit& un = units[u];
        const ExpertWeights& e = *experts[un.g];
        const int64_t rows = offsets[un.g + 1] - offsets[un.g];
        const int64_t first = offsets[un.g] - base;
        const bool bf = ExpertUsesBf16(e);
        if (hpo[un.g] >= 0) {
          const int64_t inter = e.w1.rows;
          cpu::DotRowsBf16Amx(hp + hpo[un.g], rows, inter, BfRow(e.w2, un.r0), e.w2.row_stride,
                              inter, un.r1 - un.r0, y + offsets[un.g] * hidden + un.r0, hidden,
                              nullptr);
          continue;
        }
        DotRows(bf ? nullptr : hf + first * max_inter, max_inter,
                bf ? hb + first * ldhb : nullptr, ldhb, rows,
                e.w2, un.r0, un.r1, y + offsets[un.g] * hidden + un.r0, hidden, nullptr);
      }
    });
    return absl::OkStatus();
  }

  absl::Status Attention(const float* q, int64_t num_new, int64_t start_pos, int64_t num_heads,
                 const PagedKv& kv, const int32_t* block_table, float scale,
                 float* out) override {
    const AttentionSeq one{q, num_new, start_pos, block_table, out};
    return AttentionBatch(&one, 1, num_heads, kv, scale);
  }

  absl::Status AttentionBatch(const AttentionSeq* seqs, int64_t num_seqs, int64_t num_heads,
                      const PagedKv& kv, float scale) override {
    int64_t new_tokens = 0, rows = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
      new_tokens += std::max<int64_t>(0, seqs[s].num_new);
      if (seqs[s].num_new > 0) rows += seqs[s].start_pos + seqs[s].num_new;
    }
    if (new_tokens == 0) return absl::OkStatus();
    ProfileScope prof(profile_, "attention", new_tokens);
    const int64_t hd = kv.head_dim, nkv = kv.num_kv_heads;
    const int64_t group = num_heads / nkv;
    // Row pointers of every position of every sequence for every KV head: sequence s owns
    // [row_base[s] * nkv, (row_base[s] + total_s) * nkv), laid out [nkv][total_s].
    const float** kp = Grow(k_rows_, nkv * rows);
    const float** vp = Grow(v_rows_, nkv * rows);
    std::vector<int64_t>& row_base = seq_row_base_;
    std::vector<int64_t>& unit_base = seq_unit_base_;  // first unit of each sequence
    row_base.assign(num_seqs + 1, 0);
    unit_base.assign(num_seqs + 1, 0);
    for (int64_t s = 0; s < num_seqs; ++s) {
      const AttentionSeq& a = seqs[s];
      const int64_t total = a.num_new > 0 ? a.start_pos + a.num_new : 0;
      row_base[s + 1] = row_base[s] + total;
      unit_base[s + 1] = unit_base[s] + std::max<int64_t>(0, a.num_new) * num_heads;
      const float** ks = kp + row_base[s] * nkv;
      const float** vs = vp + row_base[s] * nkv;
      for (int64_t p = 0; p < total; ++p) {
        const int64_t row =
            (a.block_table[p / kv.block_size] * kv.block_size + p % kv.block_size) * nkv;
        for (int64_t h = 0; h < nkv; ++h) {
          ks[h * total + p] = kv.k + (row + h) * hd;
          vs[h * total + p] = kv.v + (row + h) * hd;
        }
      }
    }
    // Units (sequence, token i, head h), sequence- then i-major; cost grows with the key count.
    const int64_t n = unit_base[num_seqs];
    std::vector<double>& prefix = prefix_;
    prefix.resize(n + 1);
    prefix[0] = 0;
    for (int64_t s = 0, u = 0; s < num_seqs; ++s)
      for (int64_t v = 0; v < unit_base[s + 1] - unit_base[s]; ++v, ++u)
        prefix[u + 1] = prefix[u] + static_cast<double>(seqs[s].start_pos + v / num_heads + 1) * hd * 2;
    BalancedFor(prefix, n, kMinParallelAttentionMacs, [&](int64_t u0, int64_t u1) {
      thread_local std::vector<float> scores;
      int64_t s = std::upper_bound(unit_base.begin(), unit_base.end(), u0) - unit_base.begin() - 1;
      for (int64_t u = u0; u < u1; ++u) {
        while (u >= unit_base[s + 1]) ++s;
        const AttentionSeq& a = seqs[s];
        const int64_t total = a.start_pos + a.num_new;
        const int64_t v = u - unit_base[s];
        const int64_t i = v / num_heads, h = v % num_heads, kh = h / group;
        const int64_t len = a.start_pos + i + 1;
        float* sc = Grow(scores, len);
        const float* qi = a.q + (i * num_heads + h) * hd;
        float* o = a.out + (i * num_heads + h) * hd;
        const float** ks = kp + row_base[s] * nkv + kh * total;
        const float** vs = vp + row_base[s] * nkv + kh * total;
        if (level_ >= CpuLevel::kAvx512) {
          cpu::AttendOneAvx512(qi, ks, vs, len, hd, scale, sc, o);
        } else {
          cpu::AttendOnePortable(qi, ks, vs, len, hd, scale, sc, o);
        }
      }
    });
    return absl::OkStatus();
  }

 private:
  bool UsesBf16Activations(DType wdt) const {
    return level_ >= CpuLevel::kAvx512Bf16 && wdt == DType::kBF16;
  }
  // Products against bf16 W (K = w.cols a multiple of 32) run on the AMX tiles, at any
  // number of tokens: with one token too they read the weights faster than the vdpbf16ps
  // register tiles (bench/KERNEL_NOTES.md, AMX).
  bool UsesAmx(const WeightView& w) const {
    return level_ == CpuLevel::kAmx && w.dtype == DType::kBF16 && w.cols % cpu::kAmxK == 0;
  }
  // MatMul grain in groups of `group_rows` output rows (kMinMatMulRange*).
  static int64_t MatMulGrain(int64_t group_rows, int64_t k, int64_t tokens, DType wdt) {
    const double row_macs = static_cast<double>(k) * static_cast<double>(tokens);
    const double row_bytes = static_cast<double>(k) * static_cast<double>(DTypeSize(wdt));
    const double rows = std::min(kMinMatMulRangeMacs / row_macs, kMinMatMulRangeBytes / row_bytes);
    return std::max<int64_t>(1, static_cast<int64_t>(rows / static_cast<double>(group_rows)));
  }
  // Packs bf16 rows (ldxb) for the AMX kernels, by blocks of 16 rows over the pool.
  void PackForAmx(const uint16_t* xb, int64_t ldxb, int64_t rows, int64_t kp, uint32_t* xp) {
    const int64_t blocks = (rows + 15) / 16;
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(kMinParallelMacs / (16 * kp)));
    ThreadPool::Default().ParallelFor(blocks, grain, [&](int64_t b0, int64_t b1) {
      cpu::PackBf16ForAmx(xb + b0 * 16 * ldxb, ldxb, std::min(rows, b1 * 16) - b0 * 16, kp,
                          xp + cpu::AmxPackedSize(b0 * 16, kp));
    });
  }
  static const uint16_t* BfRow(const WeightView& w, int64_t r) {
    return reinterpret_cast<const uint16_t*>(w.row(r));
  }
  bool ExpertUsesBf16(const ExpertWeights& e) const {
    return UsesBf16Activations(e.w1.dtype) && UsesBf16Activations(e.w3.dtype) &&
           UsesBf16Activations(e.w2.dtype);
  }

  void ConvertToBf16(const float* x, int64_t rows, int64_t k, int64_t ldx, uint16_t* xb,
                     int64_t ldxb) {
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(4 * kMinParallelMacs / k));
    ThreadPool::Default().ParallelFor(rows, grain, [&](int64_t r0, int64_t r1) {
      cpu::ConvertRowsToBf16Avx512(x + r0 * ldx, r1 - r0, k, ldx, xb + r0 * ldxb, ldxb);
    });
  }

  // Row i of list (f32 rounded, bf16 copied) into xb row i - base, i in [base, base + rows).
  void GatherBf16(const RowList& list, int64_t base, int64_t rows, int64_t k, uint16_t* xb,
                  int64_t ldxb) {
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(4 * kMinParallelMacs / k));
    ThreadPool::Default().ParallelFor(rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint16_t* dst = xb + r * ldxb;
        const void* src = list.rows[base + r];
        if (list.bf16 != nullptr && list.bf16[base + r] != 0) {
          std::memcpy(dst, src, k * sizeof(uint16_t));
          std::fill(dst + k, dst + ldxb, uint16_t{0});
        } else {
          cpu::ConvertRowsToBf16Avx512(static_cast<const float*>(src), 1, k, k, dst, ldxb);
        }
      }
    });
  }

  // y[t * ldy + (j - r0)] = x[t] . W[j] (+ bias[j - r0]) for j in [r0, r1); x given as f32
  // (ldx) and, when W's dtype runs on bf16 activations, as bf16 (xb, ldxb).
  void DotRows(const float* x, int64_t ldx, const uint16_t* xb, int64_t ldxb, int64_t T,
               const WeightView& w, int64_t r0, int64_t r1, float* y, int64_t ldy,
               const float* bias) const {
    if (r1 <= r0 || T <= 0) return;
    if (UsesBf16Activations(w.dtype)) {
      cpu::DotRowsBf16Avx512(xb, ldxb, T, reinterpret_cast<const uint16_t*>(w.row(r0)),
                             w.row_stride, w.cols, r1 - r0, y, ldy, bias);
    } else if (level_ >= CpuLevel::kAvx512) {
      cpu::DotRowsF32Avx512(x, ldx, T, w.row(r0), w.dtype, w.row_stride, w.cols, r1 - r0, y,
                            ldy, bias);
    } else {
      cpu::DotRowsPortable(x, ldx, T, w.row(r0), w.dtype, w.row_stride, w.cols, r1 - r0, y,
                           ldy, bias);
    }
  }

  const CpuLevel level_;
  KernelProfile profile_;
  // Scratch of the calling thread (grow-only; no allocation once warm).
  ScratchVec<uint16_t> xb_, hb_;
  ScratchVec<uint32_t> xp_, hp_;  // activations packed for AMX
  std::vector<int64_t> xp_offset_, hp_offset_;  // per expert group; -1: not on AMX
  ScratchVec<float> hf_, norm_w_;
  std::vector<const float*> k_rows_, v_rows_;
  std::vector<double> prefix_;
  std::vector<int64_t> seq_row_base_, seq_unit_base_;
  std::vector<FfnUnit> units_;
};

}  // namespace

std::unique_ptr<Backend> MakeFastCpuBackend(cpu::CpuLevel level) {
  return std::make_unique<FastCpuBackend>(level);
}

std::unique_ptr<Backend> MakeFastCpuBackend() {
  return MakeFastCpuBackend(cpu::DetectCpuLevel());
}

}  // namespace sy::kernels
