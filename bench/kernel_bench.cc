// kernel_bench: micro-benchmarks of the fast CPU backend on the `bench` preset's shapes
// (Mixtral-shaped: hidden 1024, intermediate 2816, 16 heads / 4 KV heads of 64, 8 experts
// top-2, vocab 32000, 8 layers), beside the machine's memory bandwidth measured in the same
// run (a streaming read of a 1 GiB buffer on the same pool).
//
//   kernel_bench [--dtype bf16|f32|f16] [--backend cpu|reference] [--seconds 0.3]
//
// For each kernel: median time per call, weight bytes read per second (GB/s) and GFLOP/s;
// then the tokens/s that the per-step kernel times imply for the model's decode at batch 1,
// batched decode and prefill (attention over the KV cache and small ops excluded). Results
// of the smaller shapes are checked against the reference backend first.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <immintrin.h>

#include "kernels/backend.h"
#include "kernels/core/dtype.h"
#include "kernels/core/logging.h"
#include "kernels/core/thread_pool.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/fast_backend.h"

namespace sy::kernels {
namespace {

constexpr int64_t kHidden = 1024, kInter = 2816, kVocab = 32000, kLayers = 8;
constexpr int64_t kHeads = 16, kKvHeads = 4, kHeadDim = 64, kExperts = 8, kTopK = 2;
constexpr int64_t kQkvRows = (kHeads + 2 * kKvHeads) * kHeadDim;  // fused q, k, v: 1536

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// CPU seconds (all threads) per call of the last TimeIt: on a loaded machine wall time
// measures the neighbours as much as the kernel; CPU time per call does not count time our
// threads were not running (it does count the pool's spinning).
double g_last_cpu_per_call = 0;

// Median seconds per call of fn over batches filling about `budget` seconds.
double TimeIt(const std::function<void()>& fn, double budget) {
  fn();  // warm up (scratch growth, page faults)
  std::vector<double> samples;
  const double start = Seconds();
  const double cpu0 = ProcessCpuSeconds();
  while (Seconds() - start < budget || samples.size() < 5) {
    const double t0 = Seconds();
    fn();
    samples.push_back(Seconds() - t0);
    if (samples.size() > 2000) break;
  }
  g_last_cpu_per_call = (ProcessCpuSeconds() - cpu0) / samples.size();
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return samples[samples.size() / 2];
}

struct Weight {
  std::vector<uint8_t> bytes;
  WeightView view;
  std::vector<std::vector<uint8_t>> copies;  // more copies so a rotation misses the caches
  std::vector<WeightView> views;
  // Copies so that cycling through them reads >= 128 MiB: every call then streams its
  // weights from memory, as in the model (1.3 GB of distinct weights per step).
  void MakeCopies() {
    const int64_t n = std::max<int64_t>(1, (128ll << 20) / size() + 1);
    views.assign(1, view);
    copies.resize(n - 1);
    for (auto& c : copies) {
      c = bytes;
      WeightView v = view;
      v.data = c.data();
      views.push_back(v);
    }
  }
  Weight(DType dtype, int64_t rows, int64_t cols, std::mt19937& rng) {
    const int64_t es = DTypeSize(dtype);
    bytes.resize(rows * cols * es);
    std::normal_distribution<float> d(0.f, 1.f / std::sqrt(static_cast<float>(cols)));
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float v = d(rng);
      if (dtype == DType::kF32) {
        std::memcpy(&bytes[i * 4], &v, 4);
      } else {
        const uint16_t h = dtype == DType::kBF16 ? F32ToBf16(v) : F32ToF16(v);
        std::memcpy(&bytes[i * 2], &h, 2);
      }
    }
    view = {dtype, bytes.data(), rows, cols, cols};
  }
  int64_t size() const { return static_cast<int64_t>(bytes.size()); }
};

__attribute__((target("avx512f"))) double SumAvx512(const float* p, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
         a3 = _mm512_setzero_ps();
  for (int64_t i = 0; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  // Sum the 16 lanes through a store: GCC 12's _mm512_reduce_add_ps builds on
  // _mm256_undefined_pd(), which -Wuninitialized reports.
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  double sum = 0;
  for (float v : lanes) sum += v;
  return sum;
}

double SumPortable(const float* p, int64_t n) {
  float acc[16] = {};
  for (int64_t i = 0; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += p[i + l];
  double s = 0;
  for (float a : acc) s += a;
  return s;
}

// Streaming read bandwidth (GB/s) of a 1 GiB buffer split over the pool's threads: the
// median and the best of several passes.
std::pair<double, double> MeasureBandwidth() {
  const int64_t n = (1ll << 30) / 4;
  std::vector<float> buf(n, 1.f);
  const bool avx = cpu::DetectCpuLevel() >= cpu::CpuLevel::kAvx512;
  std::vector<double> rates;
  volatile double sink = 0;
  for (int rep = 0; rep < 7; ++rep) {
    const double t0 = Seconds();
    std::vector<double> part(ThreadPool::Default().num_threads(), 0);
    ThreadPool::Default().ParallelFor(n / 4096, 1, [&](int64_t b, int64_t e) {
      const double s = avx ? SumAvx512(buf.data() + b * 4096, (e - b) * 4096)
                           : SumPortable(buf.data() + b * 4096, (e - b) * 4096);
      part[b * ThreadPool::Default().num_threads() / (n / 4096)] = s;
    });
    rates.push_back(n * 4.0 / (Seconds() - t0) / 1e9);
    for (double s : part) sink = sink + s;
  }
  std::sort(rates.begin(), rates.end());
  return {rates[rates.size() / 2], rates.back()};
}

double MaxNormalisedError(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * static_cast<double>(got[i] - want[i]);
    den += want[i] * static_cast<double>(want[i]);
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

int Main(int argc, char** argv) {
  std::string dtype_name = "bf16", backend_name = "cpu";
  double budget = 0.3;
  int64_t only_tokens = 0;  // --experts_only T: just the grouped experts at T tokens

  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--dtype") dtype_name = argv[i + 1];
    else if (flag == "--backend") backend_name = argv[i + 1];
    else if (flag == "--seconds") budget = std::atof(argv[i + 1]);
    else if (flag == "--experts_only") only_tokens = std::atol(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  auto dtype_or = ParseDType(dtype_name);
  if (!dtype_or.ok()) {
    std::fprintf(stderr, "%s\n", std::string(dtype_or.status().message()).c_str());
    return 2;
  }
  const DType dtype = *dtype_or;
  auto backend_or = MakeBackend(backend_name);
  if (!backend_or.ok()) {
    std::fprintf(stderr, "%s\n", std::string(backend_or.status().message()).c_str());
    return 2;
  }
  Backend& be = **backend_or;
  auto ref = MakeReferenceBackend();
  const double tol = dtype == DType::kBF16 ? 2.0 / 256 : 1e-5;

  std::printf("# kernel_bench: backend %s, dtype %s, %d threads\n", be.name().c_str(),
              dtype_name.c_str(), ThreadPool::Default().num_threads());
  auto [bw_median, bw_best] = only_tokens ? std::pair<double, double>{0, 0} : MeasureBandwidth();
  std::printf("memory bandwidth (1 GiB streaming read): median %.1f GB/s, best %.1f GB/s\n\n",
              bw_median, bw_best);

  std::mt19937 rng(42);
  Weight qkv(dtype, kQkvRows, kHidden, rng), wo(dtype, kHidden, kHidden, rng);
  Weight router(dtype, kExperts, kHidden, rng), lm_head(dtype, kVocab, kHidden, rng);
  std::vector<std::unique_ptr<Weight>> store;
  std::vector<ExpertWeights> experts(kExperts);
  for (int64_t e = 0; e < kExperts; ++e) {
    store.push_back(std::make_unique<Weight>(dtype, kInter, kHidden, rng));
    experts[e].w1 = store.back()->view;
    store.push_back(std::make_unique<Weight>(dtype, kInter, kHidden, rng));
    experts[e].w3 = store.back()->view;
    store.push_back(std::make_unique<Weight>(dtype, kHidden, kInter, rng));
    experts[e].w2 = store.back()->view;
  }
  const int64_t expert_bytes = 3 * store[0]->size();
  int failures = 0;

  // ---- dense MatMul --------------------------------------------------------------------
  std::printf("%-28s %6s %10s %9s %9s %11s %8s\n", "kernel", "tokens", "us/call", "GB/s",
              "GFLOP/s", "GFLOP/cpu-s", "check");
  struct Dense {
    const char* name;
    const Weight* w;
  };
  const Dense dense[] = {{"matmul qkv 1024->1536", &qkv},
                         {"matmul o 1024->1024", &wo},
                         {"matmul w1 1024->2816", store[0].get()},
                         {"matmul w2 2816->1024", store[2].get()},
                         {"matmul lm_head 1024->32000", &lm_head}};
  std::map<std::pair<std::string, int64_t>, double> times;
  for (const Dense& d : only_tokens ? std::span<const Dense>() : std::span<const Dense>(dense)) {
    const_cast<Weight*>(d.w)->MakeCopies();
    for (int64_t T : {1, 4, 16, 32, 128, 512}) {
      if (d.w == &lm_head && T > 32) continue;  // logits only for the last token of each seq
      const int64_t k = d.w->view.cols, n = d.w->view.rows;
      std::vector<float> x(T * k), y(T * n);
      std::normal_distribution<float> nd(0.f, 1.f);
      for (auto& v : x) v = nd(rng);
      std::string check = "-";
      if (T <= 4) {
        std::vector<float> want(T * n);
        SY_CHECK_OK(ref->MatMul(x.data(), T, d.w->view, want.data()));
        SY_CHECK_OK(be.MatMul(x.data(), T, d.w->view, y.data()));
        const double err = MaxNormalisedError(y, want);
        check = err <= tol ? "ok" : "FAIL";
        failures += err > tol;
      }
      size_t next = 0;
      const double s = TimeIt(
          [&] {
            SY_CHECK_OK(be.MatMul(x.data(), T, d.w->views[next], y.data()));
            next = (next + 1) % d.w->views.size();
          },
          budget);
      times[{d.name, T}] = s;
      std::printf("%-28s %6ld %10.1f %9.1f %9.1f %11.1f %8s\n", d.name, T, s * 1e6,
                  d.w->size() / s / 1e9, 2.0 * T * n * k / s / 1e9,
                  2.0 * T * n * k / g_last_cpu_per_call / 1e9, check.c_str());
    }
  }

  // ---- grouped experts (router picks top-2 of 8 at random) ------------------------------
  std::printf("\n%-28s %6s %10s %9s %9s %11s %8s\n", "grouped experts (top-2 of 8)", "tokens",
              "us/call", "GB/s", "GFLOP/s", "GFLOP/cpu-s", "check");
  std::map<int64_t, double> ffn_time;
  for (int64_t T : {1, 4, 16, 32, 128, 512}) {
    if (only_tokens > 0 && T != only_tokens) continue;
    std::vector<int64_t> count(kExperts, 0);
    for (int64_t t = 0; t < T; ++t) {
      int64_t a = rng() % kExperts, b = rng() % (kExperts - 1);
      if (b >= a) ++b;
      ++count[a];
      ++count[b];
    }
    std::vector<int64_t> offsets(kExperts + 1, 0);
    std::vector<const ExpertWeights*> ptrs(kExperts, nullptr);
    int64_t used = 0;
    for (int64_t e = 0; e < kExperts; ++e) {
      offsets[e + 1] = offsets[e] + count[e];
      if (count[e]) {
        ptrs[e] = &experts[e];
        ++used;
      }
    }
    const int64_t R = offsets.back();
    std::vector<float> x(R * kHidden), y(R * kHidden);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : x) v = nd(rng);
    std::string check = "-";
    if (T <= 4) {
      std::vector<float> want(R * kHidden);
      SY_CHECK_OK(ref->GroupedExpertFfn(x.data(), offsets.data(), kExperts, ptrs.data(), kHidden, want.data()));
      SY_CHECK_OK(be.GroupedExpertFfn(x.data(), offsets.data(), kExperts, ptrs.data(), kHidden, y.data()));
      const double err = MaxNormalisedError(y, want);
      const double ffn_tol = dtype == DType::kBF16 ? 3.0 / 256 : 1e-5;
      check = err <= ffn_tol ? "ok" : "FAIL";
      failures += err > ffn_tol;
    }
    const double s = TimeIt(
        [&] { SY_CHECK_OK(be.GroupedExpertFfn(x.data(), offsets.data(), kExperts, ptrs.data(), kHidden, y.data())); },
        budget);
    ffn_time[T] = s;
    std::printf("%-28s %6ld %10.1f %9.1f %9.1f %11.1f %8s\n",
                (std::string("experts used ") + std::to_string(used) + "/8").c_str(), T, s * 1e6,
                used * expert_bytes / s / 1e9, 2.0 * R * 3 * kHidden * kInter / s / 1e9,
                2.0 * R * 3 * kHidden * kInter / g_last_cpu_per_call / 1e9, check.c_str());
  }

  if (only_tokens) return failures ? 1 : 0;
  // ---- attention (decode over a 256-token context) ---------------------------------------
  {
    const int64_t block = 16, ctx = 256;
    std::vector<float> k(ctx * kKvHeads * kHeadDim), v(k.size()), q(kHeads * kHeadDim), o(q.size());
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& z : k) z = nd(rng);
    for (auto& z : v) z = nd(rng);
    for (auto& z : q) z = nd(rng);
    std::vector<int32_t> table(ctx / block);
    for (int64_t i = 0; i < ctx / block; ++i) table[i] = static_cast<int32_t>(i);
    PagedKv kv{k.data(), v.data(), block, kKvHeads, kHeadDim};
    const double s = TimeIt(
        [&] { SY_CHECK_OK(be.Attention(q.data(), 1, ctx - 1, kHeads, kv, table.data(), 0.125f, o.data())); },
        budget);
    std::printf("\nattention decode, 256 keys, 16 heads: %.1f us/call\n", s * 1e6);
  }

  // ---- implied model throughput ----------------------------------------------------------
  // One step of T tokens = 8 x (qkv + o + router + grouped experts) + LM head over the
  // sequences that need logits (all of them in decode, 1 in prefill).
  auto step = [&](int64_t T, int64_t logits_rows) {
    const int64_t Tk = std::min<int64_t>(T, 512);
    double layer = times[{"matmul qkv 1024->1536", Tk}] + times[{"matmul o 1024->1024", Tk}] +
                   ffn_time[Tk];
    return kLayers * layer + times[{"matmul lm_head 1024->32000", logits_rows}];
  };
  const double bytes_per_token =
      static_cast<double>(kLayers) * (qkv.size() + wo.size() + router.size() + kTopK * expert_bytes) +
      lm_head.size();
  std::printf("\nimplied by kernel times (attention and small ops excluded):\n");
  std::printf("  decode batch 1: %.1f tok/s (weights %.0f MB/token; roofline at %.1f GB/s: %.1f "
              "tok/s)\n",
              1.0 / step(1, 1), bytes_per_token / 1e6, bw_median, bw_median * 1e9 / bytes_per_token);
  for (int64_t b : {4, 16, 32}) std::printf("  decode batch %ld: %.1f tok/s\n", b, b / step(b, b));
  for (int64_t p : {128, 512}) std::printf("  prefill %ld: %.1f tok/s\n", p, p / step(p, 1));
  if (failures) {
    std::printf("\n%d CHECK FAILURES against the reference backend\n", failures);
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace sy::kernels

int main(int argc, char** argv) { return sy::kernels::Main(argc, argv); }
