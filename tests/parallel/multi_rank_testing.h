// Helpers for multi-rank tests of parallel/: ranks as threads (RunRankThreads) or as forked
// processes (RunRankProcesses), each under a watchdog so that a hang fails the test instead of
// stalling the suite, plus a small deterministic expert function and the plain reference
// Σ_k w_k · f_{e_k}(x_t) that dispatchers are compared against.
#pragma once

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace sy::parallel::testing {

// Runs fn(rank) on world_size threads; aborts the process (a loud test failure) if they do not
// all finish within `watchdog`.
inline void RunRankThreads(int world_size, std::chrono::milliseconds watchdog,
                           const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  std::promise<void> all_done;
  auto done = all_done.get_future();
  std::thread watcher([&] {
    if (done.wait_for(watchdog) != std::future_status::ready) {
      std::fprintf(stderr, "watchdog: rank threads still running after %lld ms\n",
                   static_cast<long long>(watchdog.count()));
      std::abort();
    }
  });
  for (int r = 0; r < world_size; ++r) threads.emplace_back(fn, r);
  for (auto& t : threads) t.join();
  all_done.set_value();
  watcher.join();
}

// Forks world_size processes running fn(rank); a child's exit status is fn's return value
// (0 = success). Returns the exit statuses (-signal for a killed child). Children still
// running after `watchdog` are killed with SIGKILL and reported as -SIGKILL, after an
// ADD_FAILURE. Children must not use objects whose threads exist only in the parent (e.g. a
// thread pool created before the fork).
inline std::vector<int> RunRankProcesses(int world_size, std::chrono::milliseconds watchdog,
                                         const std::function<int(int)>& fn) {
  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids(world_size, -1);
  for (int r = 0; r < world_size; ++r) {
    pid_t pid = fork();
    if (pid == 0) {
      int rc = 99;
      try {
        rc = fn(r);
      } catch (...) {
        rc = 98;
      }
      std::fflush(stdout);
      std::fflush(stderr);
      _exit(rc);
    }
    pids[r] = pid;
  }
  std::vector<int> status(world_size, 0);
  std::vector<bool> done(world_size, false);
  int left = world_size;
  const auto deadline = std::chrono::steady_clock::now() + watchdog;
  while (left > 0) {
    for (int r = 0; r < world_size; ++r) {
      if (done[r]) continue;
      int ws = 0;
      if (waitpid(pids[r], &ws, WNOHANG) == pids[r]) {
        done[r] = true;
        --left;
        status[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : -WTERMSIG(ws);
      }
    }
    if (left == 0) break;
    if (std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << "watchdog: rank processes still running after " << watchdog.count()
                    << " ms; killing them";
      for (int r = 0; r < world_size; ++r)
        if (!done[r]) {
          kill(pids[r], SIGKILL);
          waitpid(pids[r], nullptr, 0);
          status[r] = -SIGKILL;
        }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return status;
}

// Expert e of layer l: y[d] = tanh(a · x[d] + b · x[(d + 1) % hidden]) with a, b from (l, e).
inline void ExpertFn(int layer, int expert, const float* x, int64_t hidden, float* y) {
  const float a = 0.5f + 0.1f * static_cast<float>((expert * 7 + layer * 3) % 11);
  const float b = -0.3f + 0.05f * static_cast<float>((expert * 5 + layer) % 13);
  for (int64_t d = 0; d < hidden; ++d) y[d] = std::tanh(a * x[d] + b * x[(d + 1) % hidden]);
}

// out[t] = Σ_k topk_weights[t,k] · ExpertFn(layer, topk_ids[t,k], x[t]).
inline std::vector<float> ReferenceMoe(int layer, const std::vector<float>& x, int64_t hidden,
                                       const std::vector<int32_t>& topk_ids,
                                       const std::vector<float>& topk_weights,
                                       int64_t num_topk) {
  const int64_t num_tokens = hidden > 0 ? static_cast<int64_t>(x.size()) / hidden : 0;
  std::vector<float> out(x.size(), 0.f), y(hidden);
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int64_t k = 0; k < num_topk; ++k) {
      ExpertFn(layer, topk_ids[t * num_topk + k], &x[t * hidden], hidden, y.data());
      for (int64_t d = 0; d < hidden; ++d)
        out[t * hidden + d] += topk_weights[t * num_topk + k] * y[d];
    }
  return out;
}

}  // namespace sy::parallel::testing
