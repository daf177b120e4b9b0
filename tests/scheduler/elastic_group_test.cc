// The elastic rank group under an Engine, ranks as threads (tests/scheduler/rank_group_testing.h):
// while 16 streams generate, ranks join (1 -> 2 -> 3 -> 4), drain (2 of them, one past its
// drain time-out so its sequences move), die (one, two at once, one holding the only copy of
// some experts), and every stream still gets exactly the tokens of a one-rank run (greedy, and
// seeded sampling), with no request failed. Over LocalCommunicator groups and over Gloo.
// A watchdog aborts a hung test.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "scheduler/engine.h"
#include "scheduler/step_executor.h"
#include "tests/scheduler/rank_group_testing.h"
#include "tests/testing/model_fixtures.h"
#include "tests/testing/watchdog.h"

namespace sy::scheduler {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::RankGroup;

class Sink : public RequestSink {
 public:
  void OnTokens(std::span<const int32_t> ids, const std::string&) override {
    std::lock_guard<std::mutex> lock(mu);
    streamed.insert(streamed.end(), ids.begin(), ids.end());
  }
  void OnFinish(const Completion& c) override {
    std::lock_guard<std::mutex> lock(mu);
    completion = c;
    done = true;
    cv.notify_all();
  }
  bool IsCancelled() const override { return false; }
  bool WaitDone(seconds timeout) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, [&] { return done; });
  }
  size_t num_streamed() {
    std::lock_guard<std::mutex> lock(mu);
    return streamed.size();
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> streamed;
  Completion completion;
  bool done = false;
};

constexpr int kMaxNew = 40;

std::vector<std::vector<int32_t>> Prompts(int n) {
  std::vector<std::vector<int32_t>> out;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 3 + i % 7; ++j) p.push_back((i * 37 + j * 11 + 1) % 500);
    out.push_back(p);
  }
  return out;
}

EngineOptions Options() {
  EngineOptions eo;
  eo.num_blocks = 64;  // the leader's pool; every rank brings 64 more
  eo.block_size = 4;
  eo.scheduler.max_num_seqs = 16;
  eo.scheduler.max_num_batched_tokens = 64;
  return eo;
}

struct Streams {
  std::vector<std::shared_ptr<Sink>> sinks;
  size_t streamed() {
    size_t n = 0;
    for (auto& s : sinks) n += s->num_streamed();
    return n;
  }
  // Waits until `n` tokens were streamed over all requests.
  bool WaitStreamed(size_t n, seconds timeout = seconds(60)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (streamed() < n) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(milliseconds(2));
    }
    return true;
  }
};

Streams Submit(Engine& engine, const std::vector<std::vector<int32_t>>& prompts, float temperature) {
  Streams s;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto sink = std::make_shared<Sink>();
    Request r;
    r.prompt = prompts[i];
    r.params.max_new_tokens = kMaxNew;
    r.params.ignore_eos = true;
    r.params.sampling.temperature = temperature;
    r.params.sampling.seed = 1000 + i;
    r.sink = sink;
    EXPECT_TRUE(engine.Submit(std::move(r)).ok());
    s.sinks.push_back(sink);
  }
  return s;
}

// What one process running the whole model gives for the same requests.
std::vector<std::vector<int32_t>> OneRank(const std::string& dir,
                                          const std::vector<std::vector<int32_t>>& prompts,
                                          float temperature) {
  auto m = model::MoeModel::Load(dir);
  SY_CHECK(m.ok()) << m.status();
  EngineOptions eo = Options();
  eo.num_blocks = 1024;
  Engine engine(std::make_unique<LocalStepExecutor>(m->get(), eo.num_blocks, eo.block_size), nullptr, eo);
  engine.Start();
  Streams s = Submit(engine, prompts, temperature);
  std::vector<std::vector<int32_t>> out;
  for (auto& sink : s.sinks) {
    SY_CHECK(sink->WaitDone(seconds(120)));
    out.push_back(sink->completion.output_ids);
  }
  engine.Stop();
  return out;
}

void ExpectAllMatch(Streams& s, const std::vector<std::vector<int32_t>>& want) {
  for (size_t i = 0; i < s.sinks.size(); ++i) {
    ASSERT_TRUE(s.sinks[i]->WaitDone(seconds(120))) << "request " << i << " hangs";
    const Completion& c = s.sinks[i]->completion;
    EXPECT_TRUE(c.status.ok()) << "request " << i << ": " << c.status;
    EXPECT_EQ(c.output_ids, want[i]) << "request " << i;
    // The stream saw each token once, in order (a re-prefill streams nothing twice).
    EXPECT_EQ(s.sinks[i]->streamed, want[i]) << "request " << i;
  }
}

std::string Tiny() { return sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32); }

// A RankGroup serving an Engine. The engine goes first (it owns the executor).
struct Served {
  Served(const std::string& dir, RankGroup::Options o) : group(dir, o), exec(group.executor()) {
    engine = std::make_unique<Engine>(group.TakeExecutor(), nullptr, Options());
    engine->Start();
  }
  ~Served() { engine.reset(); }
  RankGroup group;
  DistributedStepExecutor* exec;
  std::unique_ptr<Engine> engine;
};

class ElasticGroupTest : public ::testing::TestWithParam<std::string> {};  // param: comm

TEST_P(ElasticGroupTest, GrowsToFourRanksAndDrainsToTwoWithoutAFailedRequest) {
  sy::testing::Watchdog dog(seconds(240));
  const std::string dir = Tiny();
  const auto prompts = Prompts(16);
  const auto want = OneRank(dir, prompts, 0);
  RankGroup::Options o;
  o.comm = GetParam();
  Served served(dir, o);
  RankGroup& g = served.group;
  DistributedStepExecutor* exec = served.exec;
  Engine* engine = served.engine.get();
  // A wave of 4 streams, then a join, and so on: 1 -> 2 -> 3 -> 4 ranks while streams run;
  // each wave finds a new rank with the fewest sequences.
  Streams s;
  std::vector<int32_t> ids;
  for (int n = 1; n <= 4; ++n) {
    const std::vector<std::vector<int32_t>> wave(prompts.begin() + 4 * (n - 1), prompts.begin() + 4 * n);
    Streams w = Submit(*engine, wave, 0);
    for (auto& sink : w.sinks) s.sinks.push_back(sink);
    ASSERT_TRUE(w.WaitStreamed(8));  // the wave runs (its sequences have their homes)
    if (n == 4) break;
    ids.push_back(g.Join());
    ASSERT_TRUE(g.WaitWorld(n + 1)) << "the group did not reach " << n + 1 << " ranks";
  }
  ASSERT_TRUE(g.Drain(ids[0]).ok());  // as SIGTERM on a worker would
  ASSERT_TRUE(g.Drain(ids[2]).ok());  // as Admin.DrainRank would
  ASSERT_TRUE(g.WaitWorld(2));
  EXPECT_TRUE(g.WaitExit(ids[0]).ok());
  EXPECT_TRUE(g.WaitExit(ids[2]).ok());
  EXPECT_EQ(g.exit(ids[0]), RankExit::kRemoved);
  EXPECT_EQ(g.exit(ids[2]), RankExit::kRemoved);
  ExpectAllMatch(s, want);
  const DistributedStats st = exec->stats();
  EXPECT_EQ(st.world_size, 2);
  EXPECT_EQ(st.failures, 0);
  EXPECT_EQ(st.joins, 3);
  EXPECT_GE(st.drains, 1);
  for (int32_t id : ids) EXPECT_GT(st.rank_tokens.count(id) ? st.rank_tokens.at(id) : 0, 0) << id;
  EXPECT_EQ(engine->stats().recovered, 0);
}

TEST_P(ElasticGroupTest, AKilledRankCostsAPauseNotARequest) {
  sy::testing::Watchdog dog(seconds(240));
  const std::string dir = Tiny();
  const auto prompts = Prompts(16);
  const auto want = OneRank(dir, prompts, 0);
  RankGroup::Options o;
  o.world = 3;  // contiguous placement of 4 experts: every rank holds the only copy of some
  o.comm = GetParam();
  Served served(dir, o);
  RankGroup& g = served.group;
  DistributedStepExecutor* exec = served.exec;
  Engine* engine = served.engine.get();
  Streams s = Submit(*engine, prompts, 0);
  ASSERT_TRUE(s.WaitStreamed(60));
  g.Kill(2);
  ExpectAllMatch(s, want);
  const DistributedStats st = exec->stats();
  EXPECT_EQ(st.world_size, 2);
  EXPECT_EQ(st.failures, 1);
  EXPECT_GT(engine->stats().recovered, 0);  // rank 2's sequences were prefilled again
  EXPECT_EQ(g.exit(2), RankExit::kKilled);
  // The group goes on, and grows again: the killed process would join as a new rank.
  Streams more = Submit(*engine, prompts, 0);
  const int32_t again = g.Join();
  EXPECT_GT(again, 2);
  EXPECT_TRUE(g.WaitWorld(3));
  ExpectAllMatch(more, want);
}

INSTANTIATE_TEST_SUITE_P(Comm, ElasticGroupTest, ::testing::Values("local", "tcp", "gloo"),
                         [](const auto& info) { return info.param; });

TEST(ElasticGroupSamplingTest, TwoRanksKilledAtOnceAndSeededSamplingStillMatches) {
  sy::testing::Watchdog dog(seconds(240));
  const std::string dir = Tiny();
  const auto prompts = Prompts(12);
  const auto want = OneRank(dir, prompts, 0.8f);
  RankGroup::Options o;
  o.world = 4;
  Served served(dir, o);
  RankGroup& g = served.group;
  DistributedStepExecutor* exec = served.exec;
  Engine* engine = served.engine.get();
  Streams s = Submit(*engine, prompts, 0.8f);
  ASSERT_TRUE(s.WaitStreamed(50));
  g.Kill(1);
  g.Kill(3);
  ExpectAllMatch(s, want);
  EXPECT_EQ(exec->stats().world_size, 2);
}

TEST(ElasticGroupDrainTest, ADrainPastItsTimeOutMovesTheSequencesElsewhere) {
  sy::testing::Watchdog dog(seconds(240));
  const std::string dir = Tiny();
  const auto prompts = Prompts(16);
  const auto want = OneRank(dir, prompts, 0);
  RankGroup::Options o;
  o.world = 3;
  o.drain_timeout = milliseconds(1);
  Served served(dir, o);
  RankGroup& g = served.group;
  DistributedStepExecutor* exec = served.exec;
  Engine* engine = served.engine.get();
  Streams s = Submit(*engine, prompts, 0);
  ASSERT_TRUE(s.WaitStreamed(60));
  ASSERT_TRUE(g.Drain(1).ok());
  ASSERT_TRUE(g.WaitWorld(2));
  EXPECT_TRUE(g.WaitExit(1).ok());
  ExpectAllMatch(s, want);
  EXPECT_EQ(exec->stats().failures, 0);
  EXPECT_GT(engine->stats().preemptions, 0);  // its sequences moved
}

// The engine applies capacity events when it wakes, so a world change shows in its stats a
// moment after the group's.
bool WaitKvBlocks(Engine& engine, int64_t want) {
  const auto deadline = std::chrono::steady_clock::now() + seconds(10);
  while (engine.stats().kv_blocks_total != want && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(milliseconds(5));
  return engine.stats().kv_blocks_total == want;
}

TEST(ElasticGroupIdleTest, JoinsAndDrainsOfAnIdleGroupNeedNoStep) {
  sy::testing::Watchdog dog(seconds(120));
  const std::string dir = Tiny();
  Served served(dir, {});
  RankGroup& g = served.group;
  Engine* engine = served.engine.get();
  const int32_t a = g.Join();
  ASSERT_TRUE(g.WaitWorld(2));
  const int32_t b = g.Join();
  ASSERT_TRUE(g.WaitWorld(3));
  EXPECT_TRUE(WaitKvBlocks(*engine, 3 * 64)) << engine->stats().kv_blocks_total;  // capacity follows the group
  ASSERT_TRUE(g.Drain(a).ok());
  ASSERT_TRUE(g.WaitWorld(2));
  EXPECT_TRUE(g.WaitExit(a).ok());
  // The pool of the drained rank left the engine too.
  EXPECT_TRUE(WaitKvBlocks(*engine, 2 * 64)) << engine->stats().kv_blocks_total;
  EXPECT_EQ(g.membership().Snapshot().epoch, 4);
  (void)b;
}

}  // namespace
}  // namespace sy::scheduler
