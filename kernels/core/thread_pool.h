// ThreadPool: the one pool every CPU kernel parallelises on (no nested parallel regions, no
// oversubscription: issue 6).
//
// ParallelFor splits [0, n) into at most num_threads() contiguous ranges and runs them on the
// pool's workers plus the calling thread, returning when all are done. A ParallelFor issued
// from inside a worker (nested) runs inline on that worker. Thread-safe: concurrent
// ParallelFor calls from different threads are serialised.
//
// Hand-off: a model step issues hundreds of short parallel regions a few microseconds
// apart, so after a task a worker spins (with pause) for up to kSpinMicros watching for the
// next one before it sleeps on a condition variable, and the caller spins as long for the
// workers to finish; a futex wake-up costs tens of microseconds, more on a loaded machine.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sy {

class ThreadPool {
 public:
  // num_threads counts the caller: 1 means everything runs inline.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // fn(begin, end) over disjoint ranges covering [0, n). Ranges hold at least `min_grain`
  // items (except the last), so tiny loops stay on one thread.
  void ParallelFor(int64_t n, int64_t min_grain,
                   const std::function<void(int64_t, int64_t)>& fn);

  // The process-wide pool; sized by SetDefaultThreads() before first use, else by
  // SWITCHYARD_THREADS, else by std::thread::hardware_concurrency().
  static ThreadPool& Default();
  static void SetDefaultThreads(int num_threads);

 private:
  void WorkerLoop(int index);

  int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // serialises ParallelFor callers
  std::mutex mu_;
  std::condition_variable cv_work_;
  std::condition_variable cv_done_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;  // guarded by mu_
  std::vector<std::pair<int64_t, int64_t>> ranges_;            // guarded by mu_
  // Written under mu_; read by spinning workers with acquire loads.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace sy
