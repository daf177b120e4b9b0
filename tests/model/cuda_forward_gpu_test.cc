// The forward pass with the cuda backend (weight products on the GPU) against the CPU backend,
// on the tiny and demo checkpoints of all four architectures: logits within 1e-2 of the CPU's
// relative to their largest magnitude, and the greedy token equal wherever the CPU's top-2
// margin is over 1e-2 of that magnitude (teacher-forced on the CPU's tokens, so one
// near-tie does not end the comparison); prefill equals token-by-token decode on the GPU
// within the same bound. Label gpu: skips without a device (fails with SY_REQUIRE_GPU=1).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "model/moe_model.h"
#include "model/sampler.h"
#include "tests/testing/gpu_testing.h"
#include "tests/testing/model_fixtures.h"

namespace sy::model {
namespace {

// Logits of every step: the prompt as one prefill, then `steps` decode tokens fed from `feed`
// (teacher forcing); or, with token_by_token, the prompt one token per step too.
std::vector<std::vector<float>> StepLogits(MoeModel& m, const std::vector<int32_t>& prompt,
                                           const std::vector<int32_t>& feed, bool token_by_token) {
  const int64_t bs = 16, total = static_cast<int64_t>(prompt.size() + feed.size());
  const int64_t nb = (total + bs - 1) / bs;
  KvCache cache(m.config(), nb, bs);
  std::vector<int32_t> blocks(nb);
  for (int64_t i = 0; i < nb; ++i) blocks[i] = static_cast<int32_t>(i);
  std::vector<std::vector<int32_t>> chunks;
  if (token_by_token) {
    for (int32_t t : prompt) chunks.push_back({t});
  } else {
    chunks.push_back(prompt);
  }
  for (int32_t t : feed) chunks.push_back({t});
  std::vector<std::vector<float>> out;
  int64_t pos = 0;
  for (const auto& c : chunks) {
    SequenceInput in;
    in.tokens = c;
    in.start_pos = pos;
    in.block_table = blocks;
    std::vector<float> logits;
    absl::Status s = m.Forward(std::span<const SequenceInput>(&in, 1), cache, &logits);
    EXPECT_TRUE(s.ok()) << s;
    pos += static_cast<int64_t>(c.size());
    out.push_back(logits);
  }
  return out;
}

float Scale(const std::vector<float>& v) {
  float s = 1e-6f;
  for (float f : v) s = std::max(s, std::abs(f));
  return s;
}

float RelErr(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  float worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
  return worst / Scale(want);
}

class CudaForwardTest
    : public ::testing::TestWithParam<std::tuple<Arch, std::string, DType>> {};

TEST_P(CudaForwardTest, MatchesTheCpuForward) {
  SKIP_WITHOUT_GPU();
  const auto [arch, preset, dtype] = GetParam();
  const std::string dir = sy::testing::SyntheticModelDir(arch, preset, dtype);
  LoadOptions cpu_o, gpu_o;
  cpu_o.backend = "cpu";
  gpu_o.backend = "cuda";
  auto cpu = MoeModel::Load(dir, cpu_o);
  auto gpu = MoeModel::Load(dir, gpu_o);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 5, 300, 2, 64, 128, 7, 11, 23};
  // The CPU's greedy continuation, fed to both.
  const std::vector<int32_t> feed = sy::testing::GreedyGenerate(**cpu, prompt, 8);
  const auto want = StepLogits(**cpu, prompt, feed, false);
  const auto got = StepLogits(**gpu, prompt, feed, false);
  ASSERT_EQ(got.size(), want.size());
  const int64_t vocab = (*cpu)->config().vocab_size;
  int compared = 0;
  for (size_t s = 0; s < want.size(); ++s) {
    EXPECT_LE(RelErr(got[s], want[s]), 1e-2f) << "step " << s;
    std::vector<float> sorted = want[s];
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    if ((sorted[0] - sorted[1]) / Scale(want[s]) > 1e-2f) {
      EXPECT_EQ(Greedy(got[s].data(), vocab), Greedy(want[s].data(), vocab)) << "step " << s;
      ++compared;
    }
  }
  EXPECT_GT(compared, 0) << "every step was a near-tie: the comparison proved nothing";
  // Prefill == token by token, on the GPU.
  const auto tbt = StepLogits(**gpu, prompt, feed, true);
  EXPECT_LE(RelErr(tbt[prompt.size() - 1], got[0]), 1e-2f);
  EXPECT_LE(RelErr(tbt.back(), got.back()), 1e-2f);
}

INSTANTIATE_TEST_SUITE_P(
    Checkpoints, CudaForwardTest,
    ::testing::Combine(::testing::Values(Arch::kMixtral, Arch::kQwen2Moe, Arch::kQwen3Moe, Arch::kOlmoe),
                       ::testing::Values(std::string("tiny"), std::string("demo")),
                       ::testing::Values(DType::kBF16, DType::kF32)),
    [](const auto& info) {
      return std::string(ArchName(std::get<0>(info.param))) + "_" + std::get<1>(info.param) + "_" +
             (std::get<2>(info.param) == DType::kBF16 ? "bf16" : "f32");
    });

}  // namespace
}  // namespace sy::model
