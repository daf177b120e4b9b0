#include "model/synthetic.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/core/status.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace sy::model {
namespace {

using nlohmann::json;

struct Shape {
  int64_t vocab, hidden, inter, layers, heads, kv_heads, head_dim, experts, topk;
};

absl::StatusOr<Shape> PresetShape(const std::string& preset) {
  if (preset == "tiny") return Shape{512, 64, 128, 2, 4, 2, 16, 4, 2};
  if (preset == "demo") return Shape{4096, 256, 512, 4, 8, 2, 32, 8, 2};
  if (preset == "bench") return Shape{32000, 1024, 2816, 8, 16, 4, 64, 8, 2};
  if (preset == "olmoe-1b-7b") return Shape{50304, 2048, 1024, 16, 16, 16, 128, 64, 8};
  return absl::InvalidArgumentError(
      absl::StrCat("unknown preset '", preset, "' (tiny, demo, bench, olmoe-1b-7b)"));
}

// splitmix64: small, fast, and the same on every platform (std::normal_distribution is not).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  // Box–Muller.
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u = Uniform(), v = Uniform();
    double r = std::sqrt(-2.0 * std::log(u));
    spare_ = r * std::sin(2 * M_PI * v);
    has_spare_ = true;
    return r * std::cos(2 * M_PI * v);
  }

 private:
  uint64_t s_;
  bool has_spare_ = false;
  double spare_ = 0;
};

// A tensor of N(mean, stddev) values, generated while the file is written. Each tensor gets
// its own stream (seed, tensor index), so adding a tensor to one architecture does not shift
// the others' weights.
TensorSource MakeTensor(const std::string& name, std::vector<int64_t> shape, DType dtype,
                        uint64_t seed, uint64_t index, double mean, double stddev) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  TensorSource t{name, dtype, std::move(shape), n * static_cast<int64_t>(DTypeSize(dtype)), nullptr};
  t.fill = [n, dtype, seed, index, mean, stddev](uint8_t* dst) {
    Rng rng(seed ^ (index * 0xD1B54A32D192ED03ull));
    for (int64_t i = 0; i < n; ++i) {
      float v = static_cast<float>(mean + stddev * rng.Normal());
      if (dtype == DType::kF32) {
        std::memcpy(&dst[i * 4], &v, 4);
      } else {
        uint16_t h = dtype == DType::kBF16 ? F32ToBf16(v) : F32ToF16(v);
        std::memcpy(&dst[i * 2], &h, 2);
      }
    }
  };
  return t;
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  out << text;
  return out ? absl::OkStatus() : absl::DataLossError(absl::StrCat("short write to ", path));
}

// The checkpoint's tensors in file order (their bytes are generated when written).
std::vector<TensorSource> Tensors(const Shape& s, const SyntheticOptions& o) {
  const Arch arch = o.arch;
  const bool mixtral = arch == Arch::kMixtral;
  const int64_t H = s.hidden, hd = s.head_dim;
  const int64_t shared_inter = arch == Arch::kQwen2Moe ? s.inter : 0;
  // Weights. Scales keep activations O(1) through the layers and make routing decisive:
  // projections ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1), router ~ N(0, 4/fan_in).
  std::vector<TensorSource> tensors;
  uint64_t idx = 0;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, double mean, double sd) {
    tensors.push_back(MakeTensor(name, std::move(shape), o.dtype, o.seed, idx++, mean, sd));
  };
  const double sh = 1.0 / std::sqrt(static_cast<double>(H));
  add("model.embed_tokens.weight", {s.vocab, H}, 0, 1.0);
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {H}, 1.0, 0.1);
    add(p + "post_attention_layernorm.weight", {H}, 1.0, 0.1);
    add(p + "self_attn.q_proj.weight", {s.heads * hd, H}, 0, sh);
    add(p + "self_attn.k_proj.weight", {s.kv_heads * hd, H}, 0, sh);
    add(p + "self_attn.v_proj.weight", {s.kv_heads * hd, H}, 0, sh);
    add(p + "self_attn.o_proj.weight", {H, s.heads * hd}, 0, 1.0 / std::sqrt(static_cast<double>(s.heads * hd)));
    if (arch == Arch::kQwen2Moe) {
      add(p + "self_attn.q_proj.bias", {s.heads * hd}, 0, 0.1);
      add(p + "self_attn.k_proj.bias", {s.kv_heads * hd}, 0, 0.1);
      add(p + "self_attn.v_proj.bias", {s.kv_heads * hd}, 0, 0.1);
    }
    if (arch == Arch::kQwen3Moe) {
      add(p + "self_attn.q_norm.weight", {hd}, 1.0, 0.1);
      add(p + "self_attn.k_norm.weight", {hd}, 1.0, 0.1);
    }
    if (arch == Arch::kOlmoe) {
      add(p + "self_attn.q_norm.weight", {s.heads * hd}, 1.0, 0.1);
      add(p + "self_attn.k_norm.weight", {s.kv_heads * hd}, 1.0, 0.1);
    }
    const std::string m = p + (mixtral ? "block_sparse_moe." : "mlp.");
    const double si = 1.0 / std::sqrt(static_cast<double>(s.inter));
    if (std::find(o.mlp_only_layers.begin(), o.mlp_only_layers.end(), l) != o.mlp_only_layers.end()) {
      add(m + "gate_proj.weight", {s.inter, H}, 0, sh);
      add(m + "up_proj.weight", {s.inter, H}, 0, sh);
      add(m + "down_proj.weight", {H, s.inter}, 0, si);
      continue;
    }
    add(m + "gate.weight", {s.experts, H}, 0, 2.0 * sh);
    for (int64_t e = 0; e < s.experts; ++e) {
      const std::string ep = absl::StrCat(m, "experts.", e, ".");
      add(ep + (mixtral ? "w1" : "gate_proj") + ".weight", {s.inter, H}, 0, sh);
      add(ep + (mixtral ? "w2" : "down_proj") + ".weight", {H, s.inter}, 0, si);
      add(ep + (mixtral ? "w3" : "up_proj") + ".weight", {s.inter, H}, 0, sh);
    }
    if (arch == Arch::kQwen2Moe) {
      add(m + "shared_expert.gate_proj.weight", {shared_inter, H}, 0, sh);
      add(m + "shared_expert.up_proj.weight", {shared_inter, H}, 0, sh);
      add(m + "shared_expert.down_proj.weight", {H, shared_inter}, 0, 1.0 / std::sqrt(static_cast<double>(shared_inter)));
      add(m + "shared_expert_gate.weight", {1, H}, 0, sh);
    }
  }
  add("model.norm.weight", {H}, 1.0, 0.1);
  add("lm_head.weight", {s.vocab, H}, 0, sh);

  return tensors;
}

}  // namespace

absl::StatusOr<Arch> ParseArch(const std::string& name) {
  if (name == "mixtral") return Arch::kMixtral;
  if (name == "qwen2_moe") return Arch::kQwen2Moe;
  if (name == "qwen3_moe") return Arch::kQwen3Moe;
  if (name == "olmoe") return Arch::kOlmoe;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown architecture '", name, "' (mixtral, qwen2_moe, qwen3_moe, olmoe)"));
}

namespace {

absl::Status CheckDenseLayers(const Shape& s, const SyntheticOptions& o) {
  if (o.mlp_only_layers.empty()) return absl::OkStatus();
  if (o.arch != Arch::kQwen2Moe && o.arch != Arch::kQwen3Moe)
    return absl::InvalidArgumentError(absl::StrCat(
        "dense (mlp_only) layers are a Qwen-MoE feature; ", ArchName(o.arch), " checkpoints have none"));
  for (int64_t l : o.mlp_only_layers)
    if (l < 0 || l >= s.layers)
      return absl::InvalidArgumentError(absl::StrCat("mlp_only layer ", l, " is out of range: the ",
                                                     o.preset, " preset has ", s.layers, " layers"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<int64_t> SyntheticWeightBytes(const SyntheticOptions& o) {
  SY_ASSIGN_OR_RETURN(Shape s, PresetShape(o.preset));
  SY_RETURN_IF_ERROR(CheckDenseLayers(s, o));
  int64_t total = 0;
  for (const auto& t : Tensors(s, o)) total += t.bytes;
  return total;
}

absl::Status WriteSyntheticCheckpoint(const SyntheticOptions& o) {
  SY_ASSIGN_OR_RETURN(Shape s, PresetShape(o.preset));
  SY_RETURN_IF_ERROR(CheckDenseLayers(s, o));
  std::error_code ec;
  std::filesystem::create_directories(o.out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", o.out_dir, ": ", ec.message()));
  // Refuse before writing anything when the weights cannot fit (olmoe-1b-7b is ~14 GB); the
  // weight files of an earlier checkpoint in the folder are replaced, so their space counts.
  std::vector<TensorSource> tensors = Tensors(s, o);
  int64_t total_bytes = 0;
  for (const auto& t : tensors) total_bytes += t.bytes;
  uintmax_t replaced = 0;
  for (const auto& entry : std::filesystem::directory_iterator(o.out_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("model", 0) == 0 && name.find(".safetensors") != std::string::npos)
      replaced += entry.file_size(ec);
  }
  const std::filesystem::space_info space = std::filesystem::space(o.out_dir, ec);
  if (!ec && static_cast<uintmax_t>(total_bytes) > space.available + replaced)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the %s checkpoint needs %.2f GB of weights; %s has %.2f GB free", o.preset,
        static_cast<double>(total_bytes) / 1e9, o.out_dir,
        static_cast<double>(space.available + replaced) / 1e9));
  const Arch arch = o.arch;
  const bool mixtral = arch == Arch::kMixtral;
  const int64_t H = s.hidden, hd = s.head_dim;
  const int64_t shared_inter = arch == Arch::kQwen2Moe ? s.inter : 0;

  // config.json in each architecture's own spelling.
  json cfg;
  const char* arch_cls[] = {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                            "OlmoeForCausalLM"};
  cfg["architectures"] = {arch_cls[static_cast<int>(arch)]};
  cfg["model_type"] = ArchName(arch);
  cfg["vocab_size"] = s.vocab;
  cfg["hidden_size"] = H;
  cfg["intermediate_size"] = s.inter;
  cfg["num_hidden_layers"] = s.layers;
  cfg["num_attention_heads"] = s.heads;
  cfg["num_key_value_heads"] = s.kv_heads;
  cfg["head_dim"] = hd;
  cfg["num_experts_per_tok"] = s.topk;
  cfg["hidden_act"] = "silu";
  cfg["max_position_embeddings"] = 4096;
  cfg["rms_norm_eps"] = mixtral || arch == Arch::kOlmoe ? 1e-5 : 1e-6;
  cfg["rope_theta"] = mixtral ? 1e6 : 10000.0;
  cfg["tie_word_embeddings"] = false;
  cfg["bos_token_id"] = 1;
  cfg["eos_token_id"] = 2;
  cfg["torch_dtype"] = o.dtype == DType::kF32 ? "float32" : o.dtype == DType::kBF16 ? "bfloat16" : "float16";
  if (mixtral) {
    cfg["num_local_experts"] = s.experts;
    cfg["sliding_window"] = nullptr;
  } else {
    cfg["num_experts"] = s.experts;
    if (arch != Arch::kOlmoe) {
      cfg["moe_intermediate_size"] = s.inter;
      cfg["decoder_sparse_step"] = 1;
      cfg["mlp_only_layers"] = o.mlp_only_layers;
    }
    cfg["norm_topk_prob"] = arch == Arch::kQwen3Moe;
  }
  if (arch == Arch::kQwen2Moe) cfg["shared_expert_intermediate_size"] = shared_inter;
  if (arch == Arch::kQwen3Moe || arch == Arch::kOlmoe) cfg["attention_bias"] = false;
  if (arch == Arch::kOlmoe) cfg["clip_qkv"] = nullptr;
  SY_RETURN_IF_ERROR(WriteText(o.out_dir + "/config.json", cfg.dump(2) + "\n"));
  json gen = {{"bos_token_id", 1}, {"eos_token_id", 2}};
  SY_RETURN_IF_ERROR(WriteText(o.out_dir + "/generation_config.json", gen.dump(2) + "\n"));

  // Remove files of an earlier checkpoint in the same folder, so that a shard layout and a
  // single file never coexist.
  for (const auto& entry : std::filesystem::directory_iterator(o.out_dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("model", 0) == 0 && (name.find(".safetensors") != std::string::npos))
      std::filesystem::remove(entry.path(), ec);
  }
  if (o.shard_bytes <= 0) {
    SY_RETURN_IF_ERROR(WriteSafetensors(o.out_dir + "/model.safetensors", tensors));
  } else {
    std::vector<std::vector<TensorSource>> shards(1);
    int64_t cur = 0;
    for (auto& t : tensors) {
      if (cur > 0 && cur + t.bytes > o.shard_bytes) {
        shards.emplace_back();
        cur = 0;
      }
      cur += t.bytes;
      shards.back().push_back(std::move(t));
    }
    json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
    int64_t total = 0;
    for (size_t i = 0; i < shards.size(); ++i) {
      std::string file = absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, shards.size());
      for (const auto& t : shards[i]) {
        index["weight_map"][t.name] = file;
        total += t.bytes;
      }
      SY_RETURN_IF_ERROR(WriteSafetensors(o.out_dir + "/" + file, shards[i]));
    }
    index["metadata"]["total_size"] = total;
    SY_RETURN_IF_ERROR(WriteText(o.out_dir + "/model.safetensors.index.json", index.dump(2) + "\n"));
  }
  if (o.write_tokenizer) {
    SY_RETURN_IF_ERROR(WriteSyntheticTokenizer(
        o.out_dir, s.vocab, mixtral ? TokenizerStyle::kSentencePieceBpe : TokenizerStyle::kByteLevelBpe));
  }
  return absl::OkStatus();
}

std::string DefaultDemoDir() {
  std::string base;
  if (const char* c = std::getenv("SWITCHYARD_CACHE"); c && *c) {
    base = c;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) {
    base = std::string(x) + "/switchyard";
  } else if (const char* h = std::getenv("HOME"); h && *h) {
    base = std::string(h) + "/.cache/switchyard";
  } else {
    base = "/tmp/switchyard-cache";
  }
  return base + "/demo-mixtral-bf16-v1";
}

absl::Status EnsureDemoModel(const std::string& dir) {
  // A marker written last makes an interrupted write start over.
  const std::string marker = dir + "/.complete";
  if (std::ifstream(marker).good()) return absl::OkStatus();
  SyntheticOptions o;
  o.arch = Arch::kMixtral;
  o.preset = "demo";
  o.seed = 0;
  o.dtype = DType::kBF16;
  o.out_dir = dir;
  SY_RETURN_IF_ERROR(WriteSyntheticCheckpoint(o));
  return WriteText(marker, "demo v1\n");
}

}  // namespace sy::model
