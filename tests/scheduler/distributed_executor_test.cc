// DistributedStepExecutor with ranks as threads (LocalCommunicatorGroup): several sequences
// prefilled and decoded greedily over 1, 2, 3 and 4 ranks give the same tokens as one
// LocalStepExecutor running the whole model; ranks with no sequence still join every
// collective; a broken group fails the step with UNAVAILABLE and fails every later one fast.
// The step plan's wire form round-trips. A watchdog aborts a hung test.
#include "scheduler/distributed_executor.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "gtest/gtest.h"
#include "kernels/core/logging.h"
#include "parallel/local_communicator.h"
#include "scheduler/step_plan.h"
#include "tests/testing/model_fixtures.h"
#include "tests/testing/watchdog.h"

namespace sy::scheduler {
namespace {

using std::chrono::milliseconds;

using sy::testing::Watchdog;

constexpr int64_t kBlockSize = 4;
constexpr int64_t kNumBlocks = 64;

// Greedy generation of several sequences in lockstep through `exec`, the way the Engine
// drives an executor: one prefill step for all, then one decode token per sequence per step.
// Sequence i owns blocks [i * 8, i * 8 + 8).
// Sequence i is homed on rank i % world.
std::vector<std::vector<int32_t>> GenerateAll(StepExecutor& exec,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              int64_t max_new, int world = 1) {
  const int64_t vocab = exec.config().vocab_size;
  std::vector<std::vector<int32_t>> tokens = prompts, blocks(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i)
    for (int b = 0; b < 8; ++b) blocks[i].push_back(static_cast<int32_t>(i * 8 + b));
  std::vector<int64_t> computed(prompts.size(), 0);
  std::vector<float> logits;
  for (int64_t step = 0; step < max_new; ++step) {
    std::vector<model::SequenceInput> batch;
    std::vector<int32_t> homes;
    for (size_t i = 0; i < prompts.size(); ++i) {
      homes.push_back(static_cast<int32_t>(i % world));
      model::SequenceInput in;
      in.tokens = std::span<const int32_t>(tokens[i].data() + computed[i],
                                           tokens[i].size() - computed[i]);
      in.start_pos = computed[i];
      in.block_table = blocks[i];
      batch.push_back(in);
    }
    absl::Status s = exec.Execute(batch, homes, &logits);
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) return {};
    EXPECT_EQ(logits.size(), prompts.size() * vocab);
    for (size_t i = 0; i < prompts.size(); ++i) {
      computed[i] = static_cast<int64_t>(tokens[i].size());
      const float* row = logits.data() + i * vocab;
      tokens[i].push_back(static_cast<int32_t>(std::max_element(row, row + vocab) - row));
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i)
    tokens[i].erase(tokens[i].begin(), tokens[i].begin() + prompts[i].size());
  return tokens;
}

// Ranks 1..N-1 as threads, each with only its experts; rank 0's executor over `leader`.
class ThreadGroup {
 public:
  ThreadGroup(const std::string& dir, int world, milliseconds timeout)
      : group_(world, timeout) {
    auto cfg = model::ModelConfig::FromFile(dir + "/config.json");
    SY_CHECK(cfg.ok()) << cfg.status();
    const model::ModelConfig& c = *cfg;
    placement_ = std::make_shared<const parallel::ExpertPlacement>(parallel::ExpertPlacement::Contiguous(
        static_cast<int>(c.num_layers), static_cast<int>(c.num_experts), world));
    for (int r = 0; r < world; ++r) {
      model::LoadOptions lo;
      lo.experts_per_layer = ExpertsOfRank(*placement_, r);
      auto m = model::MoeModel::Load(dir, lo);
      SY_CHECK(m.ok()) << m.status();
      models_.push_back(std::move(*m));
    }
    for (int r = 1; r < world; ++r) {
      auto d = parallel::MakeExpertParallelDispatcher(group_.comm(r), placement_);
      SY_CHECK(d.ok());
      dispatchers_.push_back(std::move(*d));
      models_[r]->SetDispatcher(dispatchers_.back().get());
      caches_.push_back(std::make_unique<model::KvCache>(models_[r]->config(), kNumBlocks, kBlockSize));
    }
    for (int r = 1; r < world; ++r)
      threads_.emplace_back([this, r] {
        results_[r] = RunRankLoop(group_.comm(r), models_[r].get(), caches_[r - 1].get());
      });
  }
  ~ThreadGroup() {
    executor_.reset();  // sends the shutdown plan
    for (auto& t : threads_) t.join();
  }
  absl::StatusOr<DistributedStepExecutor*> MakeExecutor(
      std::function<void(const absl::Status&)> on_failure = nullptr) {
    auto e = DistributedStepExecutor::Create(models_[0].get(), group_.comm(0), nullptr, placement_,
                                             kNumBlocks, kBlockSize, std::move(on_failure));
    if (!e.ok()) return e.status();
    executor_ = std::move(*e);
    return executor_.get();
  }
  void Stop() {
    executor_.reset();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }
  parallel::LocalCommunicatorGroup& group() { return group_; }
  const absl::Status& result(int r) const { return results_[r]; }

 private:
  parallel::LocalCommunicatorGroup group_;
  std::shared_ptr<const parallel::ExpertPlacement> placement_;
  std::vector<std::unique_ptr<model::MoeModel>> models_;
  std::vector<std::unique_ptr<parallel::ExpertParallelDispatcher>> dispatchers_;
  std::vector<std::unique_ptr<model::KvCache>> caches_;
  std::vector<absl::Status> results_ = std::vector<absl::Status>(8);
  std::vector<std::thread> threads_;
  std::unique_ptr<DistributedStepExecutor> executor_;
};

std::vector<std::vector<int32_t>> Prompts() {
  return {{1, 17, 42, 99, 5}, {300, 2}, {7, 7, 7, 7, 7, 7, 7, 7, 7, 11}, {450}, {23, 64, 128}};
}

class DistributedExecutorRanksTest : public ::testing::TestWithParam<int> {};

TEST_P(DistributedExecutorRanksTest, GreedyTokensMatchOneRank) {
  Watchdog dog(std::chrono::seconds(60));
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
  auto whole = model::MoeModel::Load(dir);
  ASSERT_TRUE(whole.ok()) << whole.status();
  LocalStepExecutor local(whole->get(), kNumBlocks, kBlockSize);
  const auto want = GenerateAll(local, Prompts(), 6);
  ASSERT_EQ(want.size(), Prompts().size());

  ThreadGroup g(dir, GetParam(), milliseconds(10000));
  auto exec = g.MakeExecutor();
  ASSERT_TRUE(exec.ok()) << exec.status();
  EXPECT_EQ(GenerateAll(**exec, Prompts(), 6, GetParam()), want);
  const DistributedStats st = (*exec)->stats();
  EXPECT_EQ(st.world_size, GetParam());
  EXPECT_EQ(st.steps, 6);
  // Five sequences over the ranks: every rank ran some.
  for (int r = 0; r < GetParam(); ++r) EXPECT_GT(st.rank_tokens[r], 0) << "rank " << r;
  g.Stop();
  for (int r = 1; r < GetParam(); ++r) EXPECT_TRUE(g.result(r).ok()) << g.result(r);
}

TEST_P(DistributedExecutorRanksTest, RanksWithoutSequencesStillServeTheirExperts) {
  Watchdog dog(std::chrono::seconds(60));
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kQwen3Moe, "tiny", DType::kF32);
  auto whole = model::MoeModel::Load(dir);
  ASSERT_TRUE(whole.ok()) << whole.status();
  LocalStepExecutor local(whole->get(), kNumBlocks, kBlockSize);
  const std::vector<std::vector<int32_t>> one = {{3, 141, 59, 26, 5}};
  const auto want = GenerateAll(local, one, 5);
  ThreadGroup g(dir, GetParam(), milliseconds(10000));
  auto exec = g.MakeExecutor();
  ASSERT_TRUE(exec.ok()) << exec.status();
  EXPECT_EQ(GenerateAll(**exec, one, 5), want);
  const DistributedStats st = (*exec)->stats();
  EXPECT_GT(st.rank_tokens[0], 0);
  for (int r = 1; r < GetParam(); ++r) EXPECT_EQ(st.rank_tokens[r], 0);
}

INSTANTIATE_TEST_SUITE_P(Ranks, DistributedExecutorRanksTest, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

TEST(DistributedExecutorTest, BrokenGroupFailsTheStepWithUnavailableAndEveryStepAfter) {
  Watchdog dog(std::chrono::seconds(60));
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
  ThreadGroup g(dir, 3, milliseconds(2000));
  std::atomic<int> failures{0};
  auto exec = g.MakeExecutor([&](const absl::Status& s) {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
    ++failures;
  });
  ASSERT_TRUE(exec.ok()) << exec.status();
  ASSERT_EQ(GenerateAll(**exec, Prompts(), 2).size(), Prompts().size());
  g.group().TEST_Break();  // as a dead rank would
  const std::vector<int32_t> toks = {1, 2, 3}, blocks = {60};
  model::SequenceInput in{toks, 0, blocks, true};
  std::vector<float> logits;
  const auto t0 = std::chrono::steady_clock::now();
  const int32_t home = 0;
  EXPECT_EQ((*exec)->Execute({&in, 1}, {&home, 1}, &logits).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*exec)->Execute({&in, 1}, {&home, 1}, &logits).code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_TRUE((*exec)->broken());
  EXPECT_EQ(failures.load(), 1);
  g.Stop();
  for (int r = 1; r < 3; ++r) EXPECT_EQ(g.result(r).code(), absl::StatusCode::kUnavailable);
}

TEST(DistributedExecutorTest, IdleRanksOutliveTheCollectiveTimeoutThroughKeepAlives) {
  Watchdog dog(std::chrono::seconds(60));
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
  ThreadGroup g(dir, 2, milliseconds(200));
  auto exec = g.MakeExecutor();
  ASSERT_TRUE(exec.ok()) << exec.status();
  std::this_thread::sleep_for(milliseconds(1000));  // five time-outs with no step
  EXPECT_FALSE((*exec)->broken());
  EXPECT_EQ(GenerateAll(**exec, {{5, 6, 7}}, 2).size(), 1u);
}

TEST(StepPlanTest, RoundTripsAndRejectsTruncatedPlans) {
  const std::vector<int32_t> t0 = {1, 2, 3}, b0 = {7, 9}, t1 = {4}, b1 = {3};
  std::vector<PlannedSequence> seqs(2);
  seqs[0].home_rank = 2;
  seqs[0].input = {t0, 0, b0, true};
  seqs[1].home_rank = 0;
  seqs[1].input = {t1, 12, b1, false};
  std::vector<int32_t> words;
  EncodePlan(PlanKind::kStep, seqs, &words);
  auto plan = DecodePlan(words);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kind, PlanKind::kStep);
  ASSERT_EQ(plan->seqs.size(), 2u);
  EXPECT_EQ(plan->seqs[0].home_rank, 2);
  EXPECT_EQ(std::vector<int32_t>(plan->seqs[0].input.tokens.begin(), plan->seqs[0].input.tokens.end()), t0);
  EXPECT_EQ(std::vector<int32_t>(plan->seqs[0].input.block_table.begin(),
                                 plan->seqs[0].input.block_table.end()), b0);
  EXPECT_EQ(plan->seqs[1].input.start_pos, 12);
  EXPECT_FALSE(plan->seqs[1].input.compute_logits);
  EXPECT_EQ(LogitRowsPerRank(plan->seqs, 3), (std::vector<int64_t>{0, 0, 1}));
  for (size_t n = 0; n < words.size(); ++n)
    EXPECT_FALSE(DecodePlan(std::span<const int32_t>(words.data(), n)).ok()) << n << " words";
}

}  // namespace
}  // namespace sy::scheduler
