#include "kernels/core/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
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
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    sy::MutexLock lock(&mu_);
    stop_.store(true);
  }
  cv_work_.SignalAll();
  for (auto& t : workers_) t.join();
}

void ThreadPool::RunRanges(uint32_t generation) {
  while (true) {
    uint64_t c = claim_.load(std::memory_order_acquire);
    if (static_cast<uint32_t>(c >> 32) != generation) return;
    const int64_t index = static_cast<int64_t>(c & 0xffffffffu);
    // Read before claiming: if the region changed meanwhile the claim below fails. That
    // holds because the caller closes the old region's claims before it writes the new
    // region's fields (release), and these loads acquire: a worker that read a new field
    // also sees the closed claim, so its compare-exchange with the old value fails. (Without
    // the close, a worker holding the exhausted claim of the old region could read the new
    // region's larger range count and claim with the old value: a range run twice.)
    const auto* fn = fn_.load(std::memory_order_acquire);
    const int64_t n = n_.load(std::memory_order_acquire);
    const int64_t chunk = chunk_.load(std::memory_order_acquire);
    const int64_t ranges = num_ranges_.load(std::memory_order_acquire);
    if (index >= ranges) return;
    if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
    (*fn)(index * chunk, std::min(n, (index + 1) * chunk));
    // Completions are counted toward the region they were claimed in: (generation << 32) |
    // count, so a count can never carry over into the next region.
    uint64_t d = done_.load(std::memory_order_acquire);
    while (static_cast<uint32_t>(d >> 32) == generation &&
           !done_.compare_exchange_weak(d, d + 1, std::memory_order_acq_rel)) {
    }
    if (static_cast<uint32_t>(d >> 32) != generation) {
      stale_completions_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (static_cast<int64_t>(d & 0xffffffffu) + 1 == ranges) {
      sy::MutexLock lock(&mu_);  // pairs with the caller's predicate check
      cv_done_.Signal();
    }
  }
}

void ThreadPool::WorkerLoop() {
  tls_in_worker = true;
  uint32_t seen = 0;
  while (true) {
    auto ready = [&] {
      return stop_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen;
    };
    if (!SpinFor(ready)) {
      sy::MutexLock lock(&mu_);
      while (!ready()) cv_work_.Wait(&mu_);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = generation_.load(std::memory_order_acquire);
    RunRanges(seen);
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t min_grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_grain = std::max<int64_t>(1, min_grain);
  const int64_t max_ranges = std::min<int64_t>(n, num_threads_ * kRangesPerThread);
  int64_t ranges = std::min<int64_t>(max_ranges, (n + min_grain - 1) / min_grain);
  if (ranges <= 1 || num_threads_ <= 1 || tls_in_worker) {
    fn(0, n);
    return;
  }
  sy::MutexLock run_lock(&run_mu_);
  const int64_t chunk = (n + ranges - 1) / ranges;
  ranges = (n + chunk - 1) / chunk;
  uint32_t generation;
  {
    sy::MutexLock lock(&mu_);
    // Close the previous region's claims (index past any range count) before its fields
    // change; see RunRanges.
    claim_.store((static_cast<uint64_t>(generation_.load(std::memory_order_relaxed)) << 32) |
                     0xffffffffu,
                 std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_release);
    n_.store(n, std::memory_order_release);
    chunk_.store(chunk, std::memory_order_release);
    num_ranges_.store(ranges, std::memory_order_release);
    generation = generation_.load(std::memory_order_relaxed) + 1;
    done_.store(static_cast<uint64_t>(generation) << 32, std::memory_order_relaxed);
    claim_.store(static_cast<uint64_t>(generation) << 32, std::memory_order_release);
    generation_.store(generation, std::memory_order_release);
  }
  cv_work_.SignalAll();
  tls_in_worker = true;
  RunRanges(generation);
  tls_in_worker = false;
  const uint64_t all_done = (static_cast<uint64_t>(generation) << 32) | static_cast<uint64_t>(ranges);
  auto done = [&] { return done_.load(std::memory_order_acquire) == all_done; };
  if (!SpinFor(done)) {
    sy::MutexLock lock(&mu_);
    while (!done()) cv_done_.Wait(&mu_);
  }
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
