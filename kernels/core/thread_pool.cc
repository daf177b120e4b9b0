#include "kernels/core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <chrono>
#include <memory>

namespace sy {
namespace {

thread_local bool tls_in_worker = false;
std::atomic<int> g_default_threads{0};

// How long a worker (or the caller) spins before it blocks.
constexpr int64_t kSpinMicros = 50;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until pred() or kSpinMicros passed; returns pred().
template <typename Pred>
bool SpinFor(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  while (true) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return pred();
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::WorkerLoop(int index) {
  tls_in_worker = true;
  uint64_t seen = 0;
  while (true) {
    const std::function<void(int64_t, int64_t)>* fn;
    std::pair<int64_t, int64_t> range;
    auto ready = [&] {
      return stop_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen;
    };
    if (!SpinFor(ready)) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_work_.wait(lock, ready);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    // fn_ and ranges_ were written before generation_ (release, under mu_) and stay put
    // until every worker has counted itself done below.
    seen = generation_.load(std::memory_order_acquire);
    fn = fn_;
    range = index < static_cast<int>(ranges_.size()) ? ranges_[index] : std::make_pair(0L, 0L);
    if (range.second > range.first) (*fn)(range.first, range.second);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);  // pairs with the caller's predicate check
      cv_done_.notify_one();
    }
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t min_grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_grain = std::max<int64_t>(1, min_grain);
  int64_t parts = std::min<int64_t>(num_threads_, (n + min_grain - 1) / min_grain);
  if (parts <= 1 || tls_in_worker) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  std::vector<std::pair<int64_t, int64_t>> ranges(num_threads_, {0, 0});
  int64_t chunk = (n + parts - 1) / parts;
  for (int64_t p = 0; p < parts; ++p) {
    ranges[p] = {std::min(n, p * chunk), std::min(n, (p + 1) * chunk)};
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    ranges_ = ranges;
    pending_.store(num_threads_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_work_.notify_all();
  tls_in_worker = true;
  if (ranges[0].second > ranges[0].first) fn(ranges[0].first, ranges[0].second);
  tls_in_worker = false;
  auto done = [&] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!SpinFor(done)) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, done);
  }
  std::lock_guard<std::mutex> lock(mu_);
  fn_ = nullptr;
}

void ThreadPool::SetDefaultThreads(int num_threads) { g_default_threads = num_threads; }

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = [] {
    int n = g_default_threads.load();
    if (n <= 0) {
      const char* env = std::getenv("SWITCHYARD_THREADS");
      n = env ? std::atoi(env) : 0;
    }
    if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    return new ThreadPool(n);
  }();
  return *pool;
}

}  // namespace sy
