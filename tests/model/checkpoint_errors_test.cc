// Bad checkpoints fail with a clear error that names the file and the tensor; a fuzz-style
// smoke test throws mutated headers at the safetensors parser (the libFuzzer target in
// tests/fuzz/ does the same without a budget).
#include <filesystem>
#include <fstream>
#include <cstring>
#include <random>
#include <set>
#include <sstream>

#include "gtest/gtest.h"
#include "model/config.h"
#include "model/moe_model.h"
#include "model/safetensors.h"
#include "model/synthetic.h"
#include "tests/testing/model_fixtures.h"

namespace sy::model {
namespace {

namespace fs = std::filesystem;

std::string CopyOfTiny() {
  std::string src = sy::testing::SyntheticModelDir(Arch::kMixtral, "tiny", DType::kF32);
  std::string dst = sy::testing::MakeTempDir("bad");
  for (const auto& e : fs::directory_iterator(src)) fs::copy(e.path(), dst + "/" + e.path().filename().string());
  return dst;
}

std::string ReadFile(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

// Rewrites the checkpoint with `mutate` applied to its tensor list.
void Rewrite(const std::string& dir, const std::function<void(std::vector<TensorToWrite>&)>& mutate) {
  auto reader = CheckpointReader::Open(dir);
  ASSERT_TRUE(reader.ok());
  std::vector<TensorToWrite> ts;
  for (const auto& name : (*reader)->Names()) {
    auto v = (*reader)->Get(name);
    const uint8_t* p = static_cast<const uint8_t*>(v->data);
    ts.push_back({name, v->dtype, v->shape, std::vector<uint8_t>(p, p + v->numel() * DTypeSize(v->dtype))});
  }
  reader->reset();
  mutate(ts);
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", ts).ok());
}

absl::Status LoadStatus(const std::string& dir) { return MoeModel::Load(dir).status(); }

TEST(CheckpointErrorsTest, MissingTensorNamesTheTensor) {
  std::string dir = CopyOfTiny();
  Rewrite(dir, [](auto& ts) {
    ts.erase(std::remove_if(ts.begin(), ts.end(), [](const auto& t) {
      return t.name == "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    }), ts.end());
  });
  auto s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(s.message().find("model.layers.1.block_sparse_moe.experts.3.w2.weight"), absl::string_view::npos) << s;
}

TEST(CheckpointErrorsTest, WrongShapeNamesFileTensorAndBothShapes) {
  std::string dir = CopyOfTiny();
  Rewrite(dir, [](auto& ts) {
    for (auto& t : ts)
      if (t.name == "model.layers.0.block_sparse_moe.experts.1.w2.weight") t.shape = {128, 64};
  });
  auto s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("model.safetensors: tensor model.layers.0.block_sparse_moe.experts.1.w2.weight: "
                             "shape [128, 64], expected [64, 128]"),
            absl::string_view::npos)
      << s;
}

TEST(CheckpointErrorsTest, UnknownArchitectureIsRejected) {
  std::string dir = CopyOfTiny();
  std::string cfg = ReadFile(dir + "/config.json");
  cfg.replace(cfg.find("MixtralForCausalLM"), 18, "GPT2LMHeadModel");
  WriteFile(dir + "/config.json", cfg);
  auto s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("unsupported architecture 'GPT2LMHeadModel'"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("config.json"), absl::string_view::npos) << s;
}

TEST(CheckpointErrorsTest, UnknownDtypeNamesTheTensor) {
  std::string dir = CopyOfTiny();
  std::string f = ReadFile(dir + "/model.safetensors");
  auto pos = f.find("\"dtype\":\"F32\"");
  ASSERT_NE(pos, std::string::npos);
  f.replace(pos, 13, "\"dtype\":\"I64\"");  // same length: the header stays valid JSON
  WriteFile(dir + "/model.safetensors", f);
  auto s = LoadStatus(dir);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("unsupported dtype 'I64'"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("tensor "), absl::string_view::npos) << s;
}

TEST(CheckpointErrorsTest, TruncatedFileIsRejected) {
  std::string dir = CopyOfTiny();
  std::string f = ReadFile(dir + "/model.safetensors");
  WriteFile(dir + "/model.safetensors", f.substr(0, f.size() - 100));
  auto s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("past the end of the file"), absl::string_view::npos) << s;
  WriteFile(dir + "/model.safetensors", f.substr(0, 5));
  s = LoadStatus(dir);
  EXPECT_NE(s.message().find("truncated safetensors file"), absl::string_view::npos) << s;
}

TEST(CheckpointErrorsTest, CorruptHeaderIsRejected) {
  std::string dir = CopyOfTiny();
  std::string f = ReadFile(dir + "/model.safetensors");
  f[8] = '#';  // the JSON's opening brace
  WriteFile(dir + "/model.safetensors", f);
  auto s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("corrupt safetensors header"), absl::string_view::npos) << s;
  // A header length larger than the file.
  f = ReadFile(dir + "/model.safetensors");
  f[6] = 1;
  WriteFile(dir + "/model.safetensors", f);
  s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
}

TEST(CheckpointErrorsTest, OffsetsPastTheEndAreRejected) {
  std::string header = R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  std::string file(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(n >> (8 * i));
  file += header + std::string(8, '\0');  // only 8 of the 16 data bytes
  auto h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "x.safetensors");
  EXPECT_EQ(h.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(h.status().message().find("x.safetensors: tensor w: data_offsets end 16 is past the end"),
            absl::string_view::npos)
      << h.status();
}

TEST(CheckpointErrorsTest, MismatchedOffsetsAndShapeAreRejected) {
  std::string header = R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  file += header + std::string(16, '\0');
  auto h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "y");
  EXPECT_FALSE(h.ok());
  EXPECT_NE(h.status().message().find("do not hold 12 bytes"), absl::string_view::npos) << h.status();
}

TEST(CheckpointErrorsTest, OverlappingTensorsAreRejected) {
  std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  file += header + std::string(16, '\0');
  auto h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "o.safetensors");
  EXPECT_EQ(h.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(h.status().message().find("tensors a and b overlap"), absl::string_view::npos) << h.status();
}

TEST(CheckpointErrorsTest, ParserSurvivesMutatedHeaders) {
  // Deterministic mutation fuzzing: byte flips, truncations and insertions of a valid file.
  std::string dir = sy::testing::SyntheticModelDir(Arch::kMixtral, "tiny", DType::kF32);
  std::string f = ReadFile(dir + "/model.safetensors");
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | static_cast<uint8_t>(f[i]);
  std::string base = f.substr(0, 8 + hlen + 4096);
  std::mt19937_64 rng(42);
  int ok = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string m = base;
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t at = rng() % std::min<size_t>(m.size(), 8 + hlen);
      switch (rng() % 4) {
        case 0: m[at] = static_cast<char>(rng()); break;
        case 1: m.resize(at); break;
        case 2: m.insert(at, 1, "{}[]\",:0-9e"[rng() % 11]); break;
        case 3: if (at < 8) m[at] = static_cast<char>(rng()); break;
      }
      if (m.empty()) break;
    }
    auto h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(m.data()), m.size(), "fuzz");
    if (h.ok()) {
      ++ok;
      for (const auto& [name, info] : h->tensors) ASSERT_LE(h->data_start + info.end, m.size()) << name;
    }
  }
  SUCCEED() << ok << " mutated headers still parsed";
}

TEST(SyntheticCheckpointTest, OlmoePresetHasTheOlmoe1b7bShapeAndItsSize) {
  SyntheticOptions o;
  o.arch = Arch::kOlmoe;
  o.preset = "olmoe-1b-7b";
  o.dtype = DType::kBF16;
  auto bytes = SyntheticWeightBytes(o);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  // vocab 50304, hidden 2048, 16 layers of attention 4 x 2048^2 with q/k norms, router 64 x
  // 2048 and 64 experts of 3 x 1024 x 2048; embeddings, final norm and LM head.
  const int64_t V = 50304, H = 2048, L = 16, E = 64, I = 1024;
  const int64_t per_layer = 2 * H + 4 * H * H + 2 * H + E * H + E * 3 * I * H;
  const int64_t params = V * H + L * per_layer + H + V * H;
  EXPECT_EQ(*bytes, 2 * params);
  EXPECT_NEAR(static_cast<double>(params), 6.92e9, 0.01e9);
  o.preset = "huge";
  EXPECT_EQ(SyntheticWeightBytes(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SyntheticCheckpointTest, ShardedAndSingleFileCheckpointsHoldTheSameTensors) {
  SyntheticOptions o;
  o.arch = Arch::kQwen2Moe;
  o.preset = "tiny";
  o.dtype = DType::kBF16;
  o.out_dir = sy::testing::MakeTempDir("single");
  ASSERT_TRUE(WriteSyntheticCheckpoint(o).ok());
  const std::string single = o.out_dir;
  o.out_dir = sy::testing::MakeTempDir("sharded");
  o.shard_bytes = 50000;
  ASSERT_TRUE(WriteSyntheticCheckpoint(o).ok());
  EXPECT_TRUE(fs::exists(o.out_dir + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(o.out_dir + "/model.safetensors"));
  auto a = CheckpointReader::Open(single);
  auto b = CheckpointReader::Open(o.out_dir);
  ASSERT_TRUE(a.ok() && b.ok());
  const std::vector<std::string> names = (*a)->Names();
  ASSERT_EQ(names, (*b)->Names());
  std::set<std::string> files;
  for (const std::string& n : names) {
    auto x = (*a)->Get(n);
    auto y = (*b)->Get(n);
    ASSERT_TRUE(x.ok() && y.ok()) << n;
    ASSERT_EQ(x->shape, y->shape) << n;
    EXPECT_EQ(std::memcmp(x->data, y->data, x->numel() * DTypeSize(x->dtype)), 0) << n;
    files.insert(y->file);
  }
  EXPECT_GT(files.size(), 2u) << "expected several shards";
}

TEST(ConfigTest, UsesHuggingFaceDefaultsPerArchitecture) {
  auto q3 = ModelConfig::FromJson(R"({"architectures":["Qwen3MoeForCausalLM"],"hidden_size":256,
      "num_attention_heads":8})", "c.json");
  ASSERT_TRUE(q3.ok()) << q3.status();
  EXPECT_EQ(q3->head_dim, 32);                // hidden / heads when head_dim is absent
  EXPECT_EQ(q3->num_kv_heads, 4);             // Qwen3MoeConfig default
  EXPECT_EQ(q3->num_experts, 128);
  EXPECT_EQ(q3->num_experts_per_tok, 8);
  EXPECT_EQ(q3->moe_intermediate_size, 768);
  EXPECT_FALSE(q3->norm_topk_prob);
  EXPECT_EQ(q3->qk_norm, QkNorm::kPerHead);
  EXPECT_DOUBLE_EQ(q3->rms_norm_eps, 1e-6);
  auto ol = ModelConfig::FromJson(R"({"model_type":"olmoe","hidden_size":128,"num_attention_heads":4})", "c.json");
  ASSERT_TRUE(ol.ok()) << ol.status();
  EXPECT_EQ(ol->num_kv_heads, 4);  // defaults to num_attention_heads
  EXPECT_EQ(ol->num_experts, 64);
  EXPECT_FALSE(ol->norm_topk_prob);
  EXPECT_EQ(ol->qk_norm, QkNorm::kFull);
  auto q2 = ModelConfig::FromJson(R"({"architectures":["Qwen2MoeForCausalLM"],"decoder_sparse_step":2,
      "mlp_only_layers":[3]})", "c.json");
  ASSERT_TRUE(q2.ok()) << q2.status();
  EXPECT_TRUE(q2->attention_bias);
  EXPECT_EQ(q2->shared_expert_intermediate_size, 5632);
  EXPECT_FALSE(q2->IsMoeLayer(0));
  EXPECT_TRUE(q2->IsMoeLayer(1));
  EXPECT_FALSE(q2->IsMoeLayer(3));
  auto mx = ModelConfig::FromJson(R"({"architectures":["MixtralForCausalLM"]})", "c.json");
  ASSERT_TRUE(mx.ok());
  EXPECT_EQ(mx->num_experts, 8);
  EXPECT_EQ(mx->head_dim, 128);
  EXPECT_TRUE(mx->norm_topk_prob);
}

TEST(ConfigTest, RejectsInconsistentSizes) {
  auto c = ModelConfig::FromJson(R"({"architectures":["MixtralForCausalLM"],"num_attention_heads":6,
      "num_key_value_heads":4})", "cfg.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("cfg.json"), absl::string_view::npos);
  auto r = ModelConfig::FromJson(R"({"architectures":["MixtralForCausalLM"],"rope_scaling":{"type":"yarn"}})", "cfg.json");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  auto bad = ModelConfig::FromJson("{not json", "cfg.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConfigTest, OutOfRangeValuesAreRefusedNamingTheFileAndKeyBeforeAnyAllocation) {
  struct Case {
    const char* json;
    const char* key;
  };
  const Case cases[] = {
      {R"({"architectures":["MixtralForCausalLM"],"num_hidden_layers":1000000000})", "num_hidden_layers"},
      {R"({"architectures":["MixtralForCausalLM"],"num_hidden_layers":4000000})", "num_hidden_layers"},
      {R"({"architectures":["MixtralForCausalLM"],"vocab_size":2000000000})", "vocab_size"},
      {R"({"architectures":["MixtralForCausalLM"],"num_local_experts":100000})", "num_experts"},
      {R"({"architectures":["MixtralForCausalLM"],"max_position_embeddings":1000000000000})",
       "max_position_embeddings"},
      {R"({"architectures":["MixtralForCausalLM"],"rope_theta":0})", "rope_theta"},
      {R"({"architectures":["MixtralForCausalLM"],"rope_theta":-5})", "rope_theta"},
      {R"({"architectures":["MixtralForCausalLM"],"rms_norm_eps":-1})", "rms_norm_eps"},
      {R"({"architectures":["MixtralForCausalLM"],"rms_norm_eps":0})", "rms_norm_eps"},
      // Wrong types (found by the config.json fuzzer: these used to throw out of the parser).
      {R"({"model_type":5})", "model_type"},
      {R"({"architectures":["MixtralForCausalLM"],"torch_dtype":["bfloat16"]})", "torch_dtype"},
      {R"({"architectures":["MixtralForCausalLM"],"num_hidden_layers":1e300})", "num_hidden_layers"},
      {R"({"architectures":["MixtralForCausalLM"],"hidden_size":18446744073709551615})", "hidden_size"},
      {R"({"architectures":["MixtralForCausalLM"],"eos_token_id":"</s>"})", "eos_token_id"},
      {R"({"architectures":["MixtralForCausalLM"],"bos_token_id":4294967296})", "bos_token_id"},
  };
  for (const Case& c : cases) {
    auto r = ModelConfig::FromJson(c.json, "config.json");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_NE(r.status().message().find("config.json"), absl::string_view::npos) << r.status();
    EXPECT_NE(r.status().message().find(c.key), absl::string_view::npos) << r.status();
  }
}

}  // namespace
}  // namespace sy::model
