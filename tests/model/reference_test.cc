// The engine against an independent implementation: shared/reference/mixtral-tiny holds a
// tiny Mixtral checkpoint and what llama.cpp and a float64 forward pass (exact math) computed
// from it. See shared/reference/README.md for the tolerances these tests use.
#include <algorithm>
#include <cstdio>
#include <cmath>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "model/moe_model.h"
#include "model/sampler.h"
#include "nlohmann/json.hpp"
#include "tests/testing/model_fixtures.h"

namespace sy::model {
namespace {

using nlohmann::json;

json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

struct Diff {
  double max_abs = 0, range = 0;
};

Diff Compare(const std::vector<float>& ours, const std::vector<float>& ref) {
  Diff d;
  EXPECT_EQ(ours.size(), ref.size());
  float lo = *std::min_element(ref.begin(), ref.end()), hi = *std::max_element(ref.begin(), ref.end());
  d.range = hi - lo;
  for (size_t i = 0; i < std::min(ours.size(), ref.size()); ++i)
    d.max_abs = std::max(d.max_abs, std::fabs(static_cast<double>(ours[i]) - ref[i]));
  return d;
}

std::unique_ptr<MoeModel> LoadRef(const std::string& sub, const std::string& backend) {
  LoadOptions o;
  o.backend = backend;
  auto m = MoeModel::Load(sy::testing::ReferenceDir() + "/" + sub, o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// Greedy tokens must agree up to the first step whose top1-top2 margin is under `margin_tol`
// (where rounding may legitimately pick the other token).
void ExpectGreedyMatches(const std::vector<int32_t>& ours, const json& prompt, double margin_tol,
                         const std::string& what) {
  const auto ref = prompt["greedy"].get<std::vector<int32_t>>();
  const auto margins = prompt["greedy_top1_top2_margin"].get<std::vector<double>>();
  for (size_t s = 0; s < ref.size(); ++s) {
    if (margins[s] < margin_tol) break;
    ASSERT_EQ(ours[s], ref[s]) << what << ": greedy step " << s << " (margin " << margins[s] << ")";
  }
}

class ReferenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ReferenceTest, F32LogitsMatchLlamaCppAndExactMath) {
  auto m = LoadRef("hf-f32", GetParam());
  ASSERT_NE(m, nullptr);
  for (const char* file : {"llamacpp-f32.json", "exact-f32.json"}) {
    json ref = ReadJson(sy::testing::ReferenceDir() + "/" + file);
    for (const auto& p : ref["prompts"]) {
      auto tokens = p["tokens"].get<std::vector<int32_t>>();
      auto logits = sy::testing::PrefillLogits(*m, tokens);
      Diff d = Compare(logits, p["last_logits"].get<std::vector<float>>());
      std::printf("[%s] %s, %zu tokens: max abs err %.3g (%.3g of the logit range)\n", GetParam().c_str(), file,
                  tokens.size(), d.max_abs, d.max_abs / d.range);
      EXPECT_LT(d.max_abs, 1e-3 * d.range)
          << file << " prompt of " << tokens.size() << " tokens: max abs err " << d.max_abs
          << " vs logit range " << d.range;
    }
  }
}

TEST_P(ReferenceTest, F32GreedyContinuationsMatchLlamaCpp) {
  auto m = LoadRef("hf-f32", GetParam());
  ASSERT_NE(m, nullptr);
  json ref = ReadJson(sy::testing::ReferenceDir() + "/llamacpp-f32.json");
  for (const auto& p : ref["prompts"]) {
    auto tokens = p["tokens"].get<std::vector<int32_t>>();
    auto ours = sy::testing::GreedyGenerate(*m, tokens, 16);
    ExpectGreedyMatches(ours, p, 1e-3, "llamacpp-f32, " + std::to_string(tokens.size()) + " tokens");
  }
}

TEST_P(ReferenceTest, F32DecodeStepLogitsMatchLlamaCpp) {
  // Every decode step (reading the KV cache), not just the prefill, lands on llama.cpp's logits.
  auto m = LoadRef("hf-f32", GetParam());
  ASSERT_NE(m, nullptr);
  json ref = ReadJson(sy::testing::ReferenceDir() + "/llamacpp-f32.json");
  const auto& p = ref["prompts"][1];
  auto tokens = p["tokens"].get<std::vector<int32_t>>();
  auto greedy = p["greedy"].get<std::vector<int32_t>>();
  const auto& steps = p["greedy_step_logits"];
  const int64_t bs = 16, nb = 4;
  KvCache cache(m->config(), nb, bs);
  std::vector<int32_t> blocks = {0, 1, 2, 3};
  std::vector<float> logits;
  SequenceInput in;
  in.tokens = tokens;
  in.block_table = blocks;
  ASSERT_TRUE(m->Forward(std::span<const SequenceInput>(&in, 1), cache, &logits).ok());
  int64_t pos = static_cast<int64_t>(tokens.size());
  for (size_t s = 0; s + 1 < greedy.size(); ++s) {
    std::vector<int32_t> feed = {greedy[s]};
    in.tokens = feed;
    in.start_pos = pos++;
    ASSERT_TRUE(m->Forward(std::span<const SequenceInput>(&in, 1), cache, &logits).ok());
    Diff d = Compare(logits, steps[s].get<std::vector<float>>());
    EXPECT_LT(d.max_abs, 1e-3 * d.range) << "decode step " << s;
  }
}

TEST_P(ReferenceTest, Bf16StaysWithinStatedToleranceOfExactMath) {
  // Activations stay f32 (only weights are bf16), so we should land much closer to exact
  // math than llama.cpp, which rounds activations to bf16 (0.02-0.15 off). Stated tolerance:
  // max abs error under 2e-3 of the logit range.
  auto m = LoadRef("hf-bf16", GetParam());
  ASSERT_NE(m, nullptr);
  json ref = ReadJson(sy::testing::ReferenceDir() + "/exact-bf16.json");
  for (const auto& p : ref["prompts"]) {
    auto tokens = p["tokens"].get<std::vector<int32_t>>();
    auto logits = sy::testing::PrefillLogits(*m, tokens);
    Diff d = Compare(logits, p["last_logits"].get<std::vector<float>>());
    std::printf("[%s] exact-bf16, %zu tokens: max abs err %.3g (%.3g of the logit range)\n", GetParam().c_str(),
                tokens.size(), d.max_abs, d.max_abs / d.range);
    EXPECT_LT(d.max_abs, 2e-3 * d.range) << tokens.size() << " tokens: max abs err " << d.max_abs
                                         << " range " << d.range;
    auto ours = sy::testing::GreedyGenerate(*m, tokens, 16);
    ExpectGreedyMatches(ours, p, 1e-2, "exact-bf16, " + std::to_string(tokens.size()) + " tokens");
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, ReferenceTest, ::testing::Values("reference", "auto"));

}  // namespace
}  // namespace sy::model
