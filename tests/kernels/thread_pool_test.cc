// ThreadPool: ranges cover [0, n) exactly once, grain keeps small loops inline, nested calls
// run inline on the worker, concurrent callers are serialised.
#include "kernels/core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace sy {
namespace {

TEST(ThreadPoolTest, ParallelForCoversEveryIndexExactlyOnce) {
  ThreadPool pool(3);
  for (int64_t n : {1, 2, 3, 7, 100, 1001}) {
    std::vector<std::atomic<int>> hits(n);
    pool.ParallelFor(n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPoolTest, LoopsSmallerThanTheGrainRunOnTheCallingThread) {
  ThreadPool pool(2);
  std::set<std::thread::id> ids;
  std::mutex mu;
  pool.ParallelFor(10, 16, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> l(mu);
    ids.insert(std::this_thread::get_id());
  });
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(*ids.begin(), std::this_thread::get_id());
}

TEST(ThreadPoolTest, AnAwakeWorkerTakesPartInLongRegions) {
  // Ranges are claimed, so a caller may run a whole region alone when the worker is slow to
  // wake; over many regions of 2 ms ranges the worker must take some.
  ThreadPool pool(2);
  std::set<std::thread::id> ids;
  std::mutex mu;
  for (int rep = 0; rep < 50 && ids.size() < 2; ++rep) {
    pool.ParallelFor(2, 1, [&](int64_t, int64_t) {
      {
        std::lock_guard<std::mutex> l(mu);
        ids.insert(std::this_thread::get_id());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    });
  }
  EXPECT_EQ(ids.size(), 2u);
}

TEST(ThreadPoolTest, RangesAreContiguousAndHoldAtLeastTheGrain) {
  ThreadPool pool(2);
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> seen;
  pool.ParallelFor(1000, 100, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> l(mu);
    seen.push_back({b, e});
  });
  std::sort(seen.begin(), seen.end());
  ASSERT_FALSE(seen.empty());
  EXPECT_LE(seen.size(), static_cast<size_t>(2 * ThreadPool::kRangesPerThread));
  EXPECT_EQ(seen.front().first, 0);
  EXPECT_EQ(seen.back().second, 1000);
  for (size_t i = 0; i < seen.size(); ++i) {
    if (i + 1 < seen.size()) {
      EXPECT_EQ(seen[i].second, seen[i + 1].first);
      EXPECT_GE(seen[i].second - seen[i].first, 100);
    }
  }
}

TEST(ThreadPoolTest, NestedParallelForRunsInlineWithoutDeadlock) {
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  pool.ParallelFor(4, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      pool.ParallelFor(10, 1, [&](int64_t b2, int64_t e2) { sum += (e2 - b2) * (i + 1); });
    }
  });
  EXPECT_EQ(sum.load(), 10 * (1 + 2 + 3 + 4));
}

TEST(ThreadPoolTest, ConcurrentCallersAreSerialisedAndAllComplete) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int rep = 0; rep < 200; ++rep) {
        pool.ParallelFor(100, 1, [&](int64_t b, int64_t e) { total += e - b; });
      }
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(total.load(), 4 * 200 * 100);
}

TEST(ThreadPoolTest, BackToBackRegionsOfGrowingRangeCountsRunEveryRangeOnce) {
  // A worker still holding the exhausted claim of a 2-range region must not claim a range of
  // the next 8-range region with it (that range would run twice and the region's done count
  // would overshoot: the caller waited forever). The regions run on a helper thread so a hang
  // fails the test instead of stalling it.
  ThreadPool pool(2);
  std::atomic<int> bad{0};
  std::atomic<bool> finished{false};
  std::thread driver([&] {
    for (int r = 0; r < 100000; ++r) {
      const int64_t n = r % 2 == 0 ? 2 : 8;
      std::atomic<int> hits[8] = {};
      pool.ParallelFor(n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i]++;
      });
      for (int64_t i = 0; i < n; ++i)
        if (hits[i].load() != 1) bad++;
    }
    finished = true;
  });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!finished && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!finished) {
    ADD_FAILURE() << "a ParallelFor region never completed";
    driver.detach();
    std::_Exit(1);
  }
  driver.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(ThreadPoolTest, SingleThreadPoolRunsInline) {
  ThreadPool pool(1);
  EXPECT_EQ(pool.num_threads(), 1);
  int calls = 0;
  pool.ParallelFor(1000, 1, [&](int64_t b, int64_t e) {
    ++calls;
    EXPECT_EQ(b, 0);
    EXPECT_EQ(e, 1000);
  });
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace sy
