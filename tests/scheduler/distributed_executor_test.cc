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
#include "tests/scheduler/rank_group_testing.h"
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
using testing::RankGroup;

// Sequence i is homed on rank id i % world (the ids of a group that never changed are its
// comm ranks).
std::vector<std::vector<int32_t>> GenerateAll(StepExecutor& exec,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              int64_t max_new, int world = 1) {
  std::vector<std::vector<int32_t>> tokens = prompts, blocks(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i)
    for (int b = 0; b < 8; ++b) blocks[i].push_back(static_cast<int32_t>(i * 8 + b));
  std::vector<int64_t> computed(prompts.size(), 0);
  std::vector<int32_t> next;
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
    absl::Status s = exec.Execute(batch, homes, {}, &next);  // no specs: greedy
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) return {};
    EXPECT_EQ(next.size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      computed[i] = static_cast<int64_t>(tokens[i].size());
      tokens[i].push_back(next[i]);
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i)
    tokens[i].erase(tokens[i].begin(), tokens[i].begin() + prompts[i].size());
  return tokens;
}

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

  RankGroup::Options o;
  o.world = GetParam();
  auto g = std::make_unique<RankGroup>(dir, o);
  DistributedStepExecutor* exec = g->executor();
  EXPECT_EQ(GenerateAll(*exec, Prompts(), 6, GetParam()), want);
  const DistributedStats st = exec->stats();
  EXPECT_EQ(st.world_size, GetParam());
  EXPECT_EQ(st.steps, 6);
  // Five sequences over the ranks: every rank ran some.
  for (int r = 0; r < GetParam(); ++r) EXPECT_GT(st.rank_tokens.at(r), 0) << "rank " << r;
  g.reset();  // the shutdown plan: every rank leaves its loop with OK
}

TEST_P(DistributedExecutorRanksTest, RanksWithoutSequencesStillServeTheirExperts) {
  Watchdog dog(std::chrono::seconds(60));
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kQwen3Moe, "tiny", DType::kF32);
  auto whole = model::MoeModel::Load(dir);
  ASSERT_TRUE(whole.ok()) << whole.status();
  LocalStepExecutor local(whole->get(), kNumBlocks, kBlockSize);
  const std::vector<std::vector<int32_t>> one = {{3, 141, 59, 26, 5}};
  const auto want = GenerateAll(local, one, 5);
  RankGroup::Options o;
  o.world = GetParam();
  RankGroup g(dir, o);
  EXPECT_EQ(GenerateAll(*g.executor(), one, 5), want);
  const DistributedStats st = g.executor()->stats();
  EXPECT_GT(st.rank_tokens.at(0), 0);
  for (int r = 1; r < GetParam(); ++r) EXPECT_EQ(st.rank_tokens.count(r), 0u);
}

INSTANTIATE_TEST_SUITE_P(Ranks, DistributedExecutorRanksTest, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

// Two-batch overlap: every rank splits its tokens in two micro-batches (a split may fall inside
// a prompt) and interleaves them with the exchanges; the tokens stay those of one rank, for
// every architecture (Qwen2-MoE's shared expert included), over threads and sockets, with dense
// layers among the MoE layers.
struct OverlapCase {
  model::Arch arch;
  int world;
  std::string comm;
  std::vector<int64_t> dense_layers = {};  // demo preset (4 layers) with these dense, else tiny
};
std::string OverlapCaseName(const OverlapCase& c) {
  static const char* const kArch[] = {"mixtral", "qwen2moe", "qwen3moe", "olmoe"};
  std::string name = std::string(kArch[static_cast<int>(c.arch)]) + "_" + std::to_string(c.world) +
                     "ranks_" + c.comm;
  for (int64_t l : c.dense_layers) name += "_dense" + std::to_string(l);
  return name;
}
class TwoBatchOverlapTest : public ::testing::TestWithParam<OverlapCase> {};

TEST_P(TwoBatchOverlapTest, GreedyTokensMatchOneRank) {
  Watchdog dog(std::chrono::seconds(90));
  const OverlapCase c = GetParam();
  const std::string dir =
      c.dense_layers.empty() ? sy::testing::SyntheticModelDir(c.arch, "tiny", DType::kF32)
                             : sy::testing::SyntheticModelDir(c.arch, "demo", DType::kF32, 0, 0, c.dense_layers);
  auto whole = model::MoeModel::Load(dir);
  ASSERT_TRUE(whole.ok()) << whole.status();
  LocalStepExecutor local(whole->get(), kNumBlocks, kBlockSize);
  const auto want = GenerateAll(local, Prompts(), 5);
  ASSERT_EQ(want.size(), Prompts().size());
  RankGroup::Options o;
  o.world = c.world;
  o.comm = c.comm;
  o.two_batch_overlap = true;
  auto g = std::make_unique<RankGroup>(dir, o);
  EXPECT_EQ(GenerateAll(*g->executor(), Prompts(), 5, c.world), want);
  // Two dispatches per MoE layer per step: the overlapped schedule ran.
  const DistributedStats st = g->executor()->stats();
  const int64_t moe_layers = static_cast<int64_t>(whole->get()->MoeLayerIds().size());
  EXPECT_EQ(st.dispatch.calls, 2 * moe_layers * 5);
  g.reset();
}

INSTANTIATE_TEST_SUITE_P(
    Cases, TwoBatchOverlapTest,
    ::testing::Values(OverlapCase{model::Arch::kMixtral, 2, "local"},
                      OverlapCase{model::Arch::kMixtral, 3, "local"},
                      OverlapCase{model::Arch::kQwen2Moe, 4, "local"},
                      OverlapCase{model::Arch::kQwen3Moe, 2, "tcp"},
                      OverlapCase{model::Arch::kOlmoe, 3, "gloo"},
                      // A dense layer between MoE layers: lane 1's return of layer 0 is finished
                      // before layer 1's MLP, and layer 2 starts the exchanges again.
                      OverlapCase{model::Arch::kQwen2Moe, 2, "local", {1}},
                      OverlapCase{model::Arch::kQwen3Moe, 3, "local", {0, 2}}),
    [](const auto& info) { return OverlapCaseName(info.param); });

TEST(DistributedExecutorTest, AnAbortedCommunicatorReFormsTheGroupAndTheNextStepRuns) {
  Watchdog dog(std::chrono::seconds(60));
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
  RankGroup::Options o;
  o.world = 3;
  RankGroup g(dir, o);
  DistributedStepExecutor* exec = g.executor();
  ASSERT_EQ(GenerateAll(*exec, Prompts(), 2, 3).size(), Prompts().size());
  // Every rank lives: they check in and the group re-forms with all three.
  g.membership().BreakEpoch(g.membership().epoch());  // heartbeats abort the ranks' comms
  const std::vector<int32_t> toks = {1, 2, 3}, blocks = {60};
  model::SequenceInput in{toks, 0, blocks, true};
  const int32_t home = 1;
  std::vector<int32_t> next;
  absl::Status s;
  for (int i = 0; i < 50; ++i) {  // the next step fails once the ranks aborted, then re-forms
    s = exec->Execute({&in, 1}, {&home, 1}, {}, &next);
    if (!s.ok()) break;
    std::this_thread::sleep_for(milliseconds(20));
  }
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_TRUE(exec->Execute({&in, 1}, {&home, 1}, {}, &next).ok());
  const DistributedStats st = exec->stats();
  EXPECT_EQ(st.world_size, 3);
  EXPECT_EQ(st.failures, 1);
  EXPECT_FALSE(exec->broken());
  EXPECT_GE(st.epoch, 2);
}

TEST(DistributedExecutorTest, IdleRanksOutliveTheCollectiveTimeoutThroughKeepAlives) {
  Watchdog dog(std::chrono::seconds(60));
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
  RankGroup::Options o;
  o.world = 2;
  o.timeout = milliseconds(200);
  RankGroup g(dir, o);
  std::this_thread::sleep_for(milliseconds(1000));  // five time-outs with no step
  EXPECT_FALSE(g.executor()->broken());
  EXPECT_EQ(g.executor()->stats().failures, 0);
  EXPECT_EQ(GenerateAll(*g.executor(), {{5, 6, 7}}, 2).size(), 1u);
}

TEST(StepPlanTest, RoundTripsAndRejectsTruncatedPlans) {
  const std::vector<int32_t> t0 = {1, 2, 3}, b0 = {7, 9}, t1 = {4}, b1 = {3};
  std::vector<PlannedSequence> seqs(2);
  seqs[0].home_rank = 2;
  seqs[0].input = {t0, 0, b0, true};
  seqs[0].sample.params = {0.7f, 0.9f, 5, (uint64_t{1} << 40) + 3};
  seqs[0].sample.draw = (uint64_t{1} << 33) + 7;
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
  EXPECT_EQ(TokensPerRank(plan->seqs, 3), (std::vector<int64_t>{0, 0, 1}));
  // The home rank samples: the parameters and the draw index travel with the sequence.
  const SampleSpec& got = plan->seqs[0].sample;
  EXPECT_EQ(got.params.temperature, 0.7f);
  EXPECT_EQ(got.params.top_p, 0.9f);
  EXPECT_EQ(got.params.top_k, 5);
  EXPECT_EQ(got.params.seed, (uint64_t{1} << 40) + 3);
  EXPECT_EQ(got.draw, (uint64_t{1} << 33) + 7);
  for (size_t n = 0; n < words.size(); ++n)
    EXPECT_FALSE(DecodePlan(std::span<const int32_t>(words.data(), n)).ok()) << n << " words";
  // Parameters no request could have (a corrupt plan) are refused.
  seqs[0].sample.params.top_p = 0.f;
  EncodePlan(PlanKind::kStep, seqs, &words);
  EXPECT_EQ(DecodePlan(words).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(StepPlanTest, ASequenceCountTheWordsCannotHoldIsRefusedWithoutAllocating) {
  // Found by the cluster-messages fuzzer: a huge count used to size the vector first.
  std::vector<int32_t> words;
  EncodePlan(PlanKind::kStep, {}, &words);
  ASSERT_EQ(words.size(), 3u);
  words[2] = 0x7fffffff;
  words.insert(words.end(), 10, 0);
  const auto plan = DecodePlan(words);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(plan.status().message().find("cannot fit"), std::string::npos) << plan.status();
}

}  // namespace
}  // namespace sy::scheduler
