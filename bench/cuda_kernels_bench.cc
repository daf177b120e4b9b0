// cuda_kernels_bench: throughput of the CUDA grouped expert FFN and paged decode attention
// (kernels/cuda/cuda_kernels.h) on the bench-preset shapes, timed with CUDA events.
//
//   grouped FFN: hidden 1024, inter 2816, 8 experts, top-2, bf16; 1, 32, 512, 4096 tokens,
//     for each GEMM engine (built-in WMMA; cuBLAS when libcublas.so.13 loads). Reports
//     tokens/s, TFLOP/s (2·rows·3·hidden·inter per call) and GB/s (weights of the experts that
//     got rows + activations in and out, i.e. the bytes a perfect kernel must move).
//   decode attention: 16 heads / 4 KV heads, head_dim 64, block 16; batch × context grid,
//     f32 and bf16 caches. GB/s counts each KV byte once (GQA re-reads hit L2).
//
// Every configuration is checked in the same run against a double-precision CPU reference on
// sampled rows / heads; a mismatch prints FAIL and the exit status is 1. Without a device it
// prints why and exits 2. Only built with CUDA; never part of ctest.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/core/dtype.h"
#include "kernels/cuda/cuda_kernels.h"

namespace {

using sy::Bf16ToF32;
using sy::DType;
using sy::F32ToBf16;
namespace kc = sy::kernels::cuda;

#define CHECK_CUDA(expr)                                                                  \
  do {                                                                                    \
    cudaError_t e_ = (expr);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

#define CHECK_OK(expr)                                                                    \
  do {                                                                                    \
    absl::Status s_ = (expr);                                                             \
    if (!s_.ok()) {                                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, s_.ToString().c_str()); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

void* DevAlloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
  return p;
}

std::vector<uint16_t> RandomBf16(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = F32ToBf16(d(rng));
  return v;
}

// Milliseconds per call of `fn`, after warm-up, averaged over enough calls for ~200 ms.
template <typename F>
double TimeMs(cudaStream_t stream, F&& fn) {
  for (int i = 0; i < 3; ++i) fn();
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  CHECK_CUDA(cudaEventRecord(a, stream));
  fn();
  CHECK_CUDA(cudaEventRecord(b, stream));
  CHECK_CUDA(cudaEventSynchronize(b));
  float one = 0;
  CHECK_CUDA(cudaEventElapsedTime(&one, a, b));
  const int iters = std::clamp(static_cast<int>(200.0 / std::max(one, 1e-3f)), 5, 2000);
  CHECK_CUDA(cudaEventRecord(a, stream));
  for (int i = 0; i < iters; ++i) fn();
  CHECK_CUDA(cudaEventRecord(b, stream));
  CHECK_CUDA(cudaEventSynchronize(b));
  float total = 0;
  CHECK_CUDA(cudaEventElapsedTime(&total, a, b));
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  return total / iters;
}

// ---- grouped expert FFN -------------------------------------------------------------------------

constexpr int64_t kHidden = 1024, kInter = 2816, kExperts = 8, kTopk = 2;

bool BenchFfn(kc::GemmContext& gemm, cudaStream_t stream) {
  bool ok = true;
  // Weights ~ U(-1, 1)/sqrt(fan_in) so activations stay O(1).
  std::vector<std::vector<uint16_t>> w1(kExperts), w3(kExperts), w2(kExperts);
  std::vector<void*> dev;
  std::vector<kc::ExpertFfnWeights> views(kExperts);
  for (int64_t e = 0; e < kExperts; ++e) {
    w1[e] = RandomBf16(kInter * kHidden, 10 + 3 * e, 1.f / std::sqrt(float(kHidden)));
    w3[e] = RandomBf16(kInter * kHidden, 11 + 3 * e, 1.f / std::sqrt(float(kHidden)));
    w2[e] = RandomBf16(kHidden * kInter, 12 + 3 * e, 1.f / std::sqrt(float(kInter)));
    const std::vector<uint16_t>* src[3] = {&w1[e], &w3[e], &w2[e]};
    const void** dst[3] = {&views[e].w1, &views[e].w3, &views[e].w2};
    for (int j = 0; j < 3; ++j) {
      void* p = DevAlloc(src[j]->size() * 2);
      CHECK_CUDA(cudaMemcpy(p, src[j]->data(), src[j]->size() * 2, cudaMemcpyHostToDevice));
      dev.push_back(p);
      *dst[j] = p;
    }
  }
  std::printf("\ngrouped expert FFN, %s GEMM: hidden %ld, inter %ld, %ld experts, top-%ld, bf16\n",
              gemm.name().c_str(), long(kHidden), long(kInter), long(kExperts), long(kTopk));
  std::printf("%8s %8s %12s %14s %10s %10s %8s\n", "tokens", "rows", "time_us", "tokens/s", "TFLOP/s", "GB/s", "check");
  for (int64_t tokens : {1, 32, 512, 4096}) {
    // Each token picks kTopk distinct experts uniformly (a router on random data).
    std::mt19937 rng(100 + tokens);
    std::vector<int32_t> counts(kExperts, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<int32_t> ids(kExperts);
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      for (int64_t j = 0; j < kTopk; ++j) ++counts[ids[j]];
    }
    std::vector<int32_t> offsets(kExperts + 1, 0);
    for (int64_t e = 0; e < kExperts; ++e) offsets[e + 1] = offsets[e] + counts[e];
    const int64_t rows = offsets[kExperts];
    const std::vector<uint16_t> x = RandomBf16(rows * kHidden, 200 + tokens, 1.f);
    void* dx = DevAlloc(x.size() * 2);
    void* dy = DevAlloc(rows * kHidden * 2);
    const int64_t ws = kc::GroupedExpertFfnWorkspaceBytes(rows, kInter);
    void* dws = DevAlloc(ws);
    CHECK_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(dy, 0xff, rows * kHidden * 2));  // NaN: an unwritten output fails the check
    const double ms = TimeMs(stream, [&] {
      CHECK_OK(kc::GroupedExpertFfn(gemm, views.data(), kExperts, offsets.data(), kHidden, kInter, dx, dy, dws, ws,
                                    stream));
    });
    std::vector<uint16_t> y(rows * kHidden);
    CHECK_CUDA(cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost));

    // Check: the first and last row of every non-empty expert against a double reference
    // (activation rounded to bf16 as the kernel does); tolerance 2e-2·|ref| + 1e-2·rms(row).
    bool row_ok = true;
    std::vector<float> act(kInter);
    for (int64_t e = 0; e < kExperts && row_ok; ++e) {
      for (int64_t r : {int64_t(offsets[e]), int64_t(offsets[e + 1]) - 1}) {
        if (r < offsets[e] || r >= offsets[e + 1]) continue;
        for (int64_t i = 0; i < kInter; ++i) {
          double g = 0, u = 0;
          for (int64_t p = 0; p < kHidden; ++p) {
            const double xv = Bf16ToF32(x[r * kHidden + p]);
            g += Bf16ToF32(w1[e][i * kHidden + p]) * xv;
            u += Bf16ToF32(w3[e][i * kHidden + p]) * xv;
          }
          act[i] = Bf16ToF32(F32ToBf16(float(g / (1 + std::exp(-g)) * u)));
        }
        std::vector<double> ref(kHidden);
        double ss = 0;
        for (int64_t o = 0; o < kHidden; ++o) {
          double s = 0;
          for (int64_t i = 0; i < kInter; ++i) s += Bf16ToF32(w2[e][o * kInter + i]) * double(act[i]);
          ref[o] = s;
          ss += s * s;
        }
        const double rms = std::sqrt(ss / kHidden);
        for (int64_t o = 0; o < kHidden; ++o)
          if (!(std::abs(Bf16ToF32(y[r * kHidden + o]) - ref[o]) <= 2e-2 * std::abs(ref[o]) + 1e-2 * rms)) {
            std::printf("FAIL: expert %ld row %ld col %ld: got %g want %g\n", long(e), long(r), long(o),
                        Bf16ToF32(y[r * kHidden + o]), ref[o]);
            row_ok = false;
            break;
          }
      }
    }
    ok = ok && row_ok;
    int64_t active = 0;
    for (int64_t e = 0; e < kExperts; ++e) active += counts[e] > 0;
    const double flops = 2.0 * rows * 3.0 * kHidden * kInter;
    const double bytes = active * 3.0 * kHidden * kInter * 2 + rows * kHidden * 2.0 * 2;
    std::printf("%8ld %8ld %12.1f %14.0f %10.2f %10.0f %8s\n", long(tokens), long(rows), ms * 1e3,
                tokens / (ms * 1e-3), flops / (ms * 1e-3) / 1e12, bytes / (ms * 1e-3) / 1e9, row_ok ? "ok" : "FAIL");
    CHECK_CUDA(cudaFree(dx));
    CHECK_CUDA(cudaFree(dy));
    CHECK_CUDA(cudaFree(dws));
  }
  for (void* p : dev) CHECK_CUDA(cudaFree(p));
  return ok;
}

// ---- paged decode attention --------------------------------------------------------------------

bool BenchAttention(cudaStream_t stream) {
  constexpr int64_t kHeads = 16, kKvHeads = 4, kHeadDim = 64, kBlock = 16;
  bool ok = true;
  std::printf("\npaged decode attention: %ld heads / %ld KV heads, head_dim %ld, block %ld\n", long(kHeads),
              long(kKvHeads), long(kHeadDim), long(kBlock));
  std::printf("%6s %8s %8s %6s %12s %10s %8s\n", "kv", "seqs", "context", "split", "time_us", "GB/s", "check");
  for (DType kv : {DType::kBF16, DType::kF32}) {
    for (auto [seqs, ctx] : {std::pair<int64_t, int64_t>{1, 4096}, {32, 1024}, {32, 4096}, {128, 2048}}) {
      const int64_t blocks_per_seq = (ctx + kBlock - 1) / kBlock, num_blocks = seqs * blocks_per_seq;
      const int64_t row = kKvHeads * kHeadDim, esz = sy::DTypeSize(kv);
      const int64_t cache_elems = num_blocks * kBlock * row;
      std::vector<float> kf(cache_elems), vf(cache_elems), qf(seqs * kHeads * kHeadDim);
      std::mt19937 rng(900 + seqs + ctx);
      std::uniform_real_distribution<float> d(-1.f, 1.f);
      for (auto* v : {&kf, &vf, &qf})
        for (auto& x : *v) x = d(rng);
      std::vector<uint8_t> kb(cache_elems * esz), vb(cache_elems * esz);
      for (int64_t i = 0; i < cache_elems; ++i) {
        if (kv == DType::kBF16) {
          const uint16_t hk = F32ToBf16(kf[i]), hv = F32ToBf16(vf[i]);
          std::memcpy(&kb[2 * i], &hk, 2);
          std::memcpy(&vb[2 * i], &hv, 2);
          kf[i] = Bf16ToF32(hk);
          vf[i] = Bf16ToF32(hv);
        } else {
          std::memcpy(&kb[4 * i], &kf[i], 4);
          std::memcpy(&vb[4 * i], &vf[i], 4);
        }
      }
      std::vector<int32_t> table(seqs * blocks_per_seq), lens(seqs, static_cast<int32_t>(ctx));
      std::iota(table.begin(), table.end(), 0);
      std::shuffle(table.begin(), table.end(), rng);
      void* dq = DevAlloc(qf.size() * 4);
      void* dk = DevAlloc(kb.size());
      void* dv = DevAlloc(vb.size());
      void* dt = DevAlloc(table.size() * 4);
      void* dl = DevAlloc(lens.size() * 4);
      void* dout = DevAlloc(qf.size() * 4);
      CHECK_CUDA(cudaMemcpy(dq, qf.data(), qf.size() * 4, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(dk, kb.data(), kb.size(), cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(dv, vb.data(), vb.size(), cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(dt, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(dl, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
      for (bool split : {false, true}) {
        const int64_t ws_bytes = split ? kc::PagedDecodeAttentionWorkspaceBytes(seqs, kHeads, kHeadDim) : 0;
        void* dws = DevAlloc(ws_bytes);
        CHECK_CUDA(cudaMemset(dout, 0xff, qf.size() * 4));  // NaN: an unwritten output fails the check
        const double ms = TimeMs(stream, [&] {
          CHECK_OK(kc::PagedDecodeAttention(dq, DType::kF32, dk, dv, kv, static_cast<int32_t*>(dt),
                                            static_cast<int32_t*>(dl), seqs, kHeads, kKvHeads, kHeadDim, kBlock,
                                            blocks_per_seq, 0.f, dout, DType::kF32, split ? dws : nullptr, ws_bytes,
                                            stream));
        });
        std::vector<float> out(qf.size());
        CHECK_CUDA(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost));
        // Check: every head of the first and last sequence, 2e-5 absolute (f32 output).
        bool good = true;
        for (int64_t s : {int64_t(0), seqs - 1}) {
          for (int64_t h = 0; h < kHeads && good; ++h) {
            std::vector<double> sc(ctx), o(kHeadDim, 0.0);
            double mx = -INFINITY, sum = 0;
            auto at = [&](int64_t p) {
              return (int64_t(table[s * blocks_per_seq + p / kBlock]) * kBlock + p % kBlock) * row +
                     (h / (kHeads / kKvHeads)) * kHeadDim;
            };
            for (int64_t p = 0; p < ctx; ++p) {
              double dot = 0;
              for (int64_t i = 0; i < kHeadDim; ++i) dot += double(qf[(s * kHeads + h) * kHeadDim + i]) * kf[at(p) + i];
              sc[p] = dot / std::sqrt(double(kHeadDim));
              mx = std::max(mx, sc[p]);
            }
            for (int64_t p = 0; p < ctx; ++p) {
              const double e = std::exp(sc[p] - mx);
              sum += e;
              for (int64_t i = 0; i < kHeadDim; ++i) o[i] += e * vf[at(p) + i];
            }
            for (int64_t i = 0; i < kHeadDim; ++i)
              if (!(std::abs(out[(s * kHeads + h) * kHeadDim + i] - o[i] / sum) <= 2e-5)) {
                std::printf("FAIL: seq %ld head %ld dim %ld: got %g want %g\n", long(s), long(h), long(i),
                            out[(s * kHeads + h) * kHeadDim + i], o[i] / sum);
                good = false;
                break;
              }
          }
        }
        ok = ok && good;
        const double bytes = 2.0 * seqs * ctx * row * esz + qf.size() * 4.0 * 2;
        std::printf("%6s %8ld %8ld %6s %12.1f %10.0f %8s\n", sy::DTypeName(kv), long(seqs), long(ctx),
                    split ? "yes" : "no", ms * 1e3, bytes / (ms * 1e-3) / 1e9, good ? "ok" : "FAIL");
        CHECK_CUDA(cudaFree(dws));
      }
      for (void* p : {dq, dk, dv, dt, dl, dout}) CHECK_CUDA(cudaFree(p));
    }
  }
  return ok;
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("cuda_kernels_bench: no CUDA device; nothing measured\n");
    return 2;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  bool ok = true;
  for (auto backend : {kc::GemmBackend::kBuiltin, kc::GemmBackend::kCublas}) {
    auto gemm = kc::GemmContext::Create(backend);
    if (!gemm.ok()) {
      std::printf("\n(%s GEMM unavailable: %s)\n", backend == kc::GemmBackend::kCublas ? "cuBLAS" : "built-in",
                  gemm.status().ToString().c_str());
      continue;
    }
    ok = BenchFfn(**gemm, stream) && ok;
  }
  ok = BenchAttention(stream) && ok;
  CHECK_CUDA(cudaStreamDestroy(stream));
  std::printf("\n%s\n", ok ? "all results checked: ok" : "RESULT CHECK FAILED");
  return ok ? 0 : 1;
}
