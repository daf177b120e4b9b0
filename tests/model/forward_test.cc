// Properties of the forward pass on synthetic checkpoints of every architecture: batched
// prefill equals token-by-token decode, chunked prefill equals one-shot prefill, and a batch
// of sequences of mixed lengths equals each sequence run alone; Qwen-MoE dense layers mixed
// with MoE layers.
#include <cmath>

#include "gtest/gtest.h"
#include "model/moe_model.h"
#include "model/sampler.h"
#include "tests/testing/model_fixtures.h"

namespace sy::model {
namespace {

double MaxAbsDiff(const float* a, const float* b, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

std::vector<int32_t> Prompt(int64_t n, int64_t vocab, int seed) {
  std::vector<int32_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>((i * 7919 + seed * 104729 + 3) % vocab);
  p[0] = 1;
  return p;
}

// Feeds `prompt` one token per step through blocks `blocks` of a fresh cache of `num_blocks`
// blocks of 16; returns the last step's logits (empty after a failed step).
std::vector<float> DecodeTokenByToken(MoeModel& model, const std::vector<int32_t>& prompt,
                                      std::vector<int32_t> blocks, int64_t num_blocks) {
  KvCache cache(model.config(), num_blocks, 16);
  std::vector<float> logits;
  for (size_t i = 0; i < prompt.size(); ++i) {
    SequenceInput in;
    in.tokens = std::span<const int32_t>(&prompt[i], 1);
    in.start_pos = static_cast<int64_t>(i);
    in.block_table = blocks;
    const absl::Status s = model.Forward(std::span<const SequenceInput>(&in, 1), cache, &logits);
    EXPECT_TRUE(s.ok()) << "position " << i << ": " << s;
    if (!s.ok()) return {};
  }
  return logits;
}

class ForwardTest : public ::testing::TestWithParam<Arch> {
 protected:
  void SetUp() override {
    auto m = MoeModel::Load(sy::testing::SyntheticModelDir(GetParam(), "tiny", DType::kF32));
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }
  std::unique_ptr<MoeModel> model_;
};

TEST_P(ForwardTest, BatchedPrefillEqualsTokenByTokenDecode) {
  const auto& c = model_->config();
  auto prompt = Prompt(37, c.vocab_size, 1);
  auto full = sy::testing::PrefillLogits(*model_, prompt);
  // Non-contiguous blocks on purpose.
  const std::vector<float> logits = DecodeTokenByToken(*model_, prompt, {3, 0, 2}, 4);
  ASSERT_EQ(logits.size(), static_cast<size_t>(c.vocab_size));
  EXPECT_LT(MaxAbsDiff(full.data(), logits.data(), c.vocab_size), 1e-4);
}

TEST_P(ForwardTest, ChunkedPrefillEqualsOneShotPrefill) {
  const auto& c = model_->config();
  auto prompt = Prompt(50, c.vocab_size, 2);
  auto full = sy::testing::PrefillLogits(*model_, prompt);
  KvCache cache(c, 4, 16);
  std::vector<int32_t> blocks = {0, 1, 2, 3};
  std::vector<float> logits;
  for (size_t start = 0; start < prompt.size(); start += 13) {
    size_t n = std::min<size_t>(13, prompt.size() - start);
    SequenceInput in;
    in.tokens = std::span<const int32_t>(&prompt[start], n);
    in.start_pos = static_cast<int64_t>(start);
    in.block_table = blocks;
    in.compute_logits = start + n == prompt.size();
    ASSERT_TRUE(model_->Forward(std::span<const SequenceInput>(&in, 1), cache, &logits).ok());
  }
  EXPECT_LT(MaxAbsDiff(full.data(), logits.data(), c.vocab_size), 1e-4);
}

TEST_P(ForwardTest, MixedLengthBatchEqualsEachSequenceAlone) {
  const auto& c = model_->config();
  std::vector<std::vector<int32_t>> prompts = {Prompt(5, c.vocab_size, 3), Prompt(21, c.vocab_size, 4),
                                               Prompt(1, c.vocab_size, 5), Prompt(16, c.vocab_size, 6)};
  // Alone: prefill + 4 greedy decode steps each.
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : prompts) alone.push_back(sy::testing::GreedyGenerate(*model_, p, 5));
  // Together: one batched prefill, then batched decode steps.
  KvCache cache(c, 16, 16);
  std::vector<std::vector<int32_t>> tables = {{0, 1}, {2, 3, 4}, {5}, {6, 7}};
  std::vector<std::vector<int32_t>> feed = prompts, out(prompts.size());
  std::vector<int64_t> pos(prompts.size(), 0);
  std::vector<float> logits;
  for (int step = 0; step < 5; ++step) {
    std::vector<SequenceInput> batch(prompts.size());
    for (size_t s = 0; s < prompts.size(); ++s) {
      batch[s].tokens = feed[s];
      batch[s].start_pos = pos[s];
      batch[s].block_table = tables[s];
    }
    ASSERT_TRUE(model_->Forward(batch, cache, &logits).ok());
    for (size_t s = 0; s < prompts.size(); ++s) {
      pos[s] += static_cast<int64_t>(feed[s].size());
      int32_t next = Greedy(&logits[s * c.vocab_size], c.vocab_size);
      out[s].push_back(next);
      feed[s].assign(1, next);
    }
  }
  for (size_t s = 0; s < prompts.size(); ++s) EXPECT_EQ(out[s], alone[s]) << "sequence " << s;
}

TEST_P(ForwardTest, Bf16WeightsStayCloseToF32) {
  // Same seed in bf16: weights differ by bf16 rounding (2^-9 relative), so logits move by a
  // few 1e-3 of their range at most on the tiny preset.
  auto bf = MoeModel::Load(sy::testing::SyntheticModelDir(GetParam(), "tiny", DType::kBF16));
  ASSERT_TRUE(bf.ok()) << bf.status();
  const auto& c = model_->config();
  auto prompt = Prompt(24, c.vocab_size, 7);
  auto a = sy::testing::PrefillLogits(*model_, prompt);
  auto b = sy::testing::PrefillLogits(**bf, prompt);
  float lo = *std::min_element(a.begin(), a.end()), hi = *std::max_element(a.begin(), a.end());
  EXPECT_LT(MaxAbsDiff(a.data(), b.data(), c.vocab_size), 2e-2 * (hi - lo));
}

TEST_P(ForwardTest, ShardedCheckpointLoadsTheSameWeights) {
  auto sharded = MoeModel::Load(sy::testing::SyntheticModelDir(GetParam(), "tiny", DType::kF32, 0, 64 * 1024));
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  auto prompt = Prompt(9, model_->config().vocab_size, 8);
  EXPECT_EQ(sy::testing::PrefillLogits(*model_, prompt), sy::testing::PrefillLogits(**sharded, prompt));
}

TEST_P(ForwardTest, RejectsTokenOutsideVocabulary) {
  KvCache cache(model_->config(), 1, 16);
  std::vector<int32_t> blocks = {0};
  std::vector<int32_t> tokens = {1, static_cast<int32_t>(model_->config().vocab_size)};
  SequenceInput in;
  in.tokens = tokens;
  in.block_table = blocks;
  std::vector<float> logits;
  auto s = model_->Forward(std::span<const SequenceInput>(&in, 1), cache, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("outside the vocabulary"), absl::string_view::npos) << s;
}

// Qwen-MoE checkpoints may make some layers dense (`mlp_only_layers`): those layers run a plain
// MLP, have no router or dispatch, and the forward properties hold across the mix.
class DenseLayersTest : public ::testing::TestWithParam<Arch> {};

TEST_P(DenseLayersTest, MixedDenseAndMoeLayersKeepTheForwardProperties) {
  const std::string dir = sy::testing::SyntheticModelDir(GetParam(), "demo", DType::kF32, 0, 0, {1});
  auto m = MoeModel::Load(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  MoeModel& model = **m;
  const auto& c = model.config();
  EXPECT_FALSE(c.IsMoeLayer(1));
  EXPECT_EQ(model.MoeLayerIds(), (std::vector<int>{0, 2, 3}));
  // The dense layer does work: the same seed without it gives other logits.
  auto prompt = Prompt(29, c.vocab_size, 9);
  auto full = sy::testing::PrefillLogits(model, prompt);
  auto all_moe = MoeModel::Load(sy::testing::SyntheticModelDir(GetParam(), "demo", DType::kF32));
  ASSERT_TRUE(all_moe.ok()) << all_moe.status();
  EXPECT_GT(MaxAbsDiff(full.data(), sy::testing::PrefillLogits(**all_moe, prompt).data(), c.vocab_size), 1e-2);
  // Prefill equals token-by-token decode.
  const std::vector<float> logits = DecodeTokenByToken(model, prompt, {1, 0}, 2);
  ASSERT_EQ(logits.size(), static_cast<size_t>(c.vocab_size));
  EXPECT_LT(MaxAbsDiff(full.data(), logits.data(), c.vocab_size), 1e-4);
}

TEST(DenseLayersTest, OnlyQwenMoeCheckpointsNameDenseLayersAndOnlyLayersThatExist) {
  SyntheticOptions o;
  o.preset = "tiny";
  o.out_dir = sy::testing::MakeTempDir("dense");
  o.mlp_only_layers = {0};
  o.arch = Arch::kMixtral;
  absl::Status s = WriteSyntheticCheckpoint(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("mixtral"), absl::string_view::npos) << s;
  o.arch = Arch::kQwen3Moe;
  o.mlp_only_layers = {2};
  s = WriteSyntheticCheckpoint(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("has 2 layers"), absl::string_view::npos) << s;
  o.mlp_only_layers = {0};
  ASSERT_TRUE(WriteSyntheticCheckpoint(o).ok());
  auto m = MoeModel::Load(o.out_dir);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->config().mlp_only_layers, (std::vector<int64_t>{0}));
  EXPECT_EQ((*m)->MoeLayerIds(), (std::vector<int>{1}));
}

INSTANTIATE_TEST_SUITE_P(Archs, DenseLayersTest, ::testing::Values(Arch::kQwen2Moe, Arch::kQwen3Moe),
                         [](const auto& info) { return std::string(ArchName(info.param)); });

INSTANTIATE_TEST_SUITE_P(Archs, ForwardTest,
                         ::testing::Values(Arch::kMixtral, Arch::kQwen2Moe, Arch::kQwen3Moe, Arch::kOlmoe),
                         [](const auto& info) { return std::string(ArchName(info.param)); });

}  // namespace
}  // namespace sy::model
