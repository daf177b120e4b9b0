// ThreadPool: the one pool every CPU kernel parallelises on (no nested parallel regions, no
// oversubscription).
//
// ParallelFor splits [0, n) into contiguous ranges of at least `min_grain` items (at most
// kRangesPerThread per thread) which the calling thread and the workers claim one at a time
// until none is left, returning when all are done. A ParallelFor issued from inside a worker
// (nested) runs inline on that worker. Thread-safe: concurrent ParallelFor calls from
// different threads are serialised.
//
// Why claimed ranges rather than one fixed range per thread: on a shared machine a worker
// may not be scheduled for milliseconds; with fixed ranges every parallel region would wait
// for it, while here the caller takes the sleeping worker's share and only waits for ranges
// a worker has actually started. And why spinning: a model step issues hundreds of short
// parallel regions a few microseconds apart, so after a region a worker spins (with pause)
// for up to kSpinMicros watching for the next one before it sleeps on a condition variable,
// and the caller spins as long for the workers to finish; a futex wake-up costs tens of
// microseconds, more on a loaded machine.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "kernels/core/mutex.h"

namespace sy {

class ThreadPool {
 public:
  static constexpr int64_t kRangesPerThread = 4;

  // num_threads counts the caller: 1 means everything runs inline.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // fn(begin, end) over disjoint ranges covering [0, n). Ranges hold at least `min_grain`
  // items (except the last), so tiny loops stay on one thread. With n == num_threads() and
  // min_grain 1, each range is a single index (per-thread work split by the caller).
  void ParallelFor(int64_t n, int64_t min_grain,
                   const std::function<void(int64_t, int64_t)>& fn);

  // The process-wide pool; sized by SetDefaultThreads() before first use, else by
  // SWITCHYARD_THREADS, else by std::thread::hardware_concurrency().
  static ThreadPool& Default();
  static void SetDefaultThreads(int num_threads);

 private:
  void WorkerLoop();
  // Claims and runs ranges of the region tagged `generation` until none is left.
  void RunRanges(uint32_t generation);

  int num_threads_;
  std::vector<std::thread> workers_;
  // Neither mutex guards data: run_mu_ serialises ParallelFor callers, mu_ pairs the
  // condition variables with the atomics below (which carry the region).
  Mutex run_mu_;
  Mutex mu_;
  CondVar cv_work_;
  CondVar cv_done_;
  // The current region. Written by the caller before it publishes `claim_`; atomics because
  // a late worker may read them while the next region is being set up (it then fails to
  // claim and drops what it read).
  std::atomic<const std::function<void(int64_t, int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_{0}, chunk_{0}, num_ranges_{0};
  std::atomic<uint64_t> claim_{0};  // (generation << 32) | next range index
  std::atomic<uint64_t> done_{0};  // (generation << 32) | ranges finished
  // Completions that arrived after their region had ended (none expected; counted so that
  // a test or a debugger can see one).
  std::atomic<int64_t> stale_completions_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace sy
