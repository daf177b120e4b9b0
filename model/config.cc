#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"
#include "nlohmann/json.hpp"

namespace sy::model {
namespace {

using nlohmann::json;

// Reads an integer field, with `def` when absent or null; InvalidArgument on a wrong type.
absl::StatusOr<int64_t> GetInt(const json& j, const char* key, int64_t def, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field '", key, "' must be an integer within 64 bits"));
  };
  if (it->is_number_unsigned()) {
    if (it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) return bad();
    return static_cast<int64_t>(it->get<uint64_t>());
  }
  if (it->is_number_integer()) return it->get<int64_t>();
  if (!it->is_number()) return bad();
  // 4096.0 is 4096; the range check comes first (casting a larger double is undefined).
  const double d = it->get<double>();
  if (!(d >= -9.2e18 && d <= 9.2e18) || d != std::floor(d)) return bad();
  return static_cast<int64_t>(d);
}

absl::StatusOr<std::string> GetString(const json& j, const char* key, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::string();
  if (!it->is_string())
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' must be a string"));
  return it->get<std::string>();
}

// A token id field (bos_token_id, eos_token_id and its list): integers in [0, 2^31).
absl::Status AppendTokenIds(const json& v, const char* key, const std::string& path,
                            std::vector<int32_t>* out) {
  if (v.is_null()) return absl::OkStatus();
  auto one = [&](const json& x) -> absl::Status {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", key, " must be a token id (a non-negative integer), got ", x.dump()));
    out->push_back(static_cast<int32_t>(x.get<int64_t>()));
    return absl::OkStatus();
  };
  if (!v.is_array()) return one(v);
  for (const json& x : v) SY_RETURN_IF_ERROR(one(x));
  return absl::OkStatus();
}

absl::StatusOr<double> GetNum(const json& j, const char* key, double def, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_number())
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' must be a number"));
  return it->get<double>();
}

absl::StatusOr<bool> GetBool(const json& j, const char* key, bool def, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_boolean())
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' must be true or false"));
  return it->get<bool>();
}

}  // namespace

const char* ArchName(Arch arch) {
  switch (arch) {
    case Arch::kMixtral: return "mixtral";
    case Arch::kQwen2Moe: return "qwen2_moe";
    case Arch::kQwen3Moe: return "qwen3_moe";
    case Arch::kOlmoe: return "olmoe";
  }
  return "?";
}

bool ModelConfig::IsMoeLayer(int64_t layer) const {
  if (num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
    return false;
  return decoder_sparse_step <= 1 || (layer + 1) % decoder_sparse_step == 0;
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const std::string& text, const std::string& path) {
  // Every field is read through a type check; this catches whatever one of them missed.
  try {
    return Parse(text, path);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
}

absl::StatusOr<ModelConfig> ModelConfig::Parse(const std::string& text, const std::string& path) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  ModelConfig c;
  // Architecture: from "architectures"[0], else from "model_type".
  std::string arch_name;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string()) {
    arch_name = j["architectures"][0].get<std::string>();
  }
  SY_ASSIGN_OR_RETURN(std::string model_type, GetString(j, "model_type", path));
  c.model_type = model_type;
  if (arch_name == "MixtralForCausalLM" || (arch_name.empty() && model_type == "mixtral")) {
    c.arch = Arch::kMixtral;
    arch_name = "MixtralForCausalLM";
  } else if (arch_name == "Qwen2MoeForCausalLM" || (arch_name.empty() && model_type == "qwen2_moe")) {
    c.arch = Arch::kQwen2Moe;
    arch_name = "Qwen2MoeForCausalLM";
  } else if (arch_name == "Qwen3MoeForCausalLM" || (arch_name.empty() && model_type == "qwen3_moe")) {
    c.arch = Arch::kQwen3Moe;
    arch_name = "Qwen3MoeForCausalLM";
  } else if (arch_name == "OlmoeForCausalLM" || (arch_name.empty() && model_type == "olmoe")) {
    c.arch = Arch::kOlmoe;
    arch_name = "OlmoeForCausalLM";
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": unsupported architecture '", arch_name.empty() ? model_type : arch_name,
        "' (supported: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, "
        "OlmoeForCausalLM)"));
  }
  c.architecture = arch_name;

  // Defaults of the Hugging Face configuration classes, per architecture.
  struct Defaults {
    int64_t vocab, hidden, inter, layers, heads, kv_heads, experts, topk, moe_inter, shared_inter,
        max_pos;
    double eps, theta;
    bool norm_topk;
  };
  Defaults d{};
  switch (c.arch) {
    case Arch::kMixtral:
      d = {32000, 4096, 14336, 32, 32, 8, 8, 2, 0, 0, 4096 * 32, 1e-5, 1e6, true};
      break;
    case Arch::kQwen2Moe:
      d = {151936, 2048, 5632, 24, 16, 16, 60, 4, 1408, 5632, 32768, 1e-6, 10000.0, false};
      break;
    case Arch::kQwen3Moe:
      d = {151936, 2048, 6144, 24, 32, 4, 128, 8, 768, 0, 32768, 1e-6, 10000.0, false};
      break;
    case Arch::kOlmoe:
      d = {50304, 2048, 2048, 16, 16, -1, 64, 8, 0, 0, 4096, 1e-5, 10000.0, false};
      break;
  }
  SY_ASSIGN_OR_RETURN(c.vocab_size, GetInt(j, "vocab_size", d.vocab, path));
  SY_ASSIGN_OR_RETURN(c.hidden_size, GetInt(j, "hidden_size", d.hidden, path));
  SY_ASSIGN_OR_RETURN(c.intermediate_size, GetInt(j, "intermediate_size", d.inter, path));
  SY_ASSIGN_OR_RETURN(c.num_layers, GetInt(j, "num_hidden_layers", d.layers, path));
  SY_ASSIGN_OR_RETURN(c.num_heads, GetInt(j, "num_attention_heads", d.heads, path));
  SY_ASSIGN_OR_RETURN(c.num_kv_heads, GetInt(j, "num_key_value_heads",
                                             d.kv_heads < 0 ? c.num_heads : d.kv_heads, path));
  SY_ASSIGN_OR_RETURN(c.max_position_embeddings, GetInt(j, "max_position_embeddings", d.max_pos, path));
  SY_ASSIGN_OR_RETURN(c.rms_norm_eps, GetNum(j, "rms_norm_eps", d.eps, path));
  SY_ASSIGN_OR_RETURN(c.rope_theta, GetNum(j, "rope_theta", d.theta, path));
  SY_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, "tie_word_embeddings", false, path));
  SY_ASSIGN_OR_RETURN(c.num_experts_per_tok, GetInt(j, "num_experts_per_tok", d.topk, path));
  if (c.arch == Arch::kMixtral) {
    SY_ASSIGN_OR_RETURN(c.num_experts, GetInt(j, "num_local_experts", d.experts, path));
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = true;  // softmax over the top-k logits == renormalised top-k
  } else {
    SY_ASSIGN_OR_RETURN(c.num_experts, GetInt(j, "num_experts", d.experts, path));
    if (c.arch == Arch::kOlmoe) {
      c.moe_intermediate_size = c.intermediate_size;  // OLMoE experts use intermediate_size
    } else {
      SY_ASSIGN_OR_RETURN(c.moe_intermediate_size, GetInt(j, "moe_intermediate_size", d.moe_inter, path));
    }
    SY_ASSIGN_OR_RETURN(c.norm_topk_prob, GetBool(j, "norm_topk_prob", d.norm_topk, path));
  }
  if (c.arch == Arch::kQwen2Moe) {
    SY_ASSIGN_OR_RETURN(c.shared_expert_intermediate_size,
                        GetInt(j, "shared_expert_intermediate_size", d.shared_inter, path));
    c.attention_bias = true;  // Qwen2MoeAttention: q/k/v Linear(bias=True)
  }
  if (c.arch == Arch::kQwen3Moe) {
    SY_ASSIGN_OR_RETURN(c.attention_bias, GetBool(j, "attention_bias", false, path));
    c.qk_norm = QkNorm::kPerHead;
  }
  if (c.arch == Arch::kOlmoe) {
    SY_ASSIGN_OR_RETURN(c.attention_bias, GetBool(j, "attention_bias", false, path));
    SY_ASSIGN_OR_RETURN(c.clip_qkv, GetNum(j, "clip_qkv", 0.0, path));
    c.qk_norm = QkNorm::kFull;
  }
  if (c.arch == Arch::kQwen2Moe || c.arch == Arch::kQwen3Moe) {
    SY_ASSIGN_OR_RETURN(c.decoder_sparse_step, GetInt(j, "decoder_sparse_step", 1, path));
    if (j.contains("mlp_only_layers") && j["mlp_only_layers"].is_array()) {
      for (const auto& v : j["mlp_only_layers"]) {
        if (!v.is_number_integer())
          return absl::InvalidArgumentError(absl::StrCat(path, ": mlp_only_layers must hold integers"));
        c.mlp_only_layers.push_back(v.get<int64_t>());
      }
    }
  }
  if (c.num_heads <= 0)
    return absl::InvalidArgumentError(absl::StrCat(path, ": num_attention_heads must be positive"));
  int64_t default_head_dim = c.hidden_size / c.num_heads;
  SY_ASSIGN_OR_RETURN(c.head_dim, GetInt(j, "head_dim", default_head_dim, path));
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": rope_scaling is not supported yet (got ", j["rope_scaling"].dump(), ")"));
  }
  if (j.contains("hidden_act") && j["hidden_act"].is_string() && j["hidden_act"] != "silu")
    return absl::InvalidArgumentError(absl::StrCat(path, ": hidden_act '",
                                                   j["hidden_act"].get<std::string>(),
                                                   "' is not supported (only silu)"));
  if (j.contains("bos_token_id")) {
    std::vector<int32_t> bos;
    SY_RETURN_IF_ERROR(AppendTokenIds(j["bos_token_id"], "bos_token_id", path, &bos));
    if (bos.size() > 1)
      return absl::InvalidArgumentError(absl::StrCat(path, ": bos_token_id must be one id"));
    if (!bos.empty()) c.bos_token_id = bos[0];
  }
  if (j.contains("eos_token_id"))
    SY_RETURN_IF_ERROR(AppendTokenIds(j["eos_token_id"], "eos_token_id", path, &c.eos_token_ids));
  SY_ASSIGN_OR_RETURN(c.torch_dtype, GetString(j, "torch_dtype", path));

  // Consistency.
  auto positive = [&](int64_t v, const char* name) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(path, ": ", name, " must be positive, got ", v));
    return absl::OkStatus();
  };
  SY_RETURN_IF_ERROR(positive(c.vocab_size, "vocab_size"));
  SY_RETURN_IF_ERROR(positive(c.hidden_size, "hidden_size"));
  SY_RETURN_IF_ERROR(positive(c.num_layers, "num_hidden_layers"));
  SY_RETURN_IF_ERROR(positive(c.num_kv_heads, "num_key_value_heads"));
  SY_RETURN_IF_ERROR(positive(c.head_dim, "head_dim"));
  SY_RETURN_IF_ERROR(positive(c.num_experts, "num_experts"));
  SY_RETURN_IF_ERROR(positive(c.num_experts_per_tok, "num_experts_per_tok"));
  SY_RETURN_IF_ERROR(positive(c.moe_intermediate_size, "moe_intermediate_size"));
  if (c.head_dim % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat(path, ": head_dim must be even for RoPE"));
  if (c.num_heads % c.num_kv_heads != 0)
    return absl::InvalidArgumentError(absl::StrCat(path, ": num_attention_heads (", c.num_heads,
                                                   ") must be a multiple of num_key_value_heads (",
                                                   c.num_kv_heads, ")"));
  // Upper bounds before anything is allocated from these numbers (a layer count of a
  // billion once aborted the process): far above any released model, far below harm.
  auto at_most = [&](int64_t v, int64_t max, const char* name) -> absl::Status {
    if (v > max)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", name, " is ", v, ", more than this server takes (", max, ")"));
    return absl::OkStatus();
  };
  SY_RETURN_IF_ERROR(at_most(c.vocab_size, int64_t{1} << 22, "vocab_size"));
  SY_RETURN_IF_ERROR(at_most(c.hidden_size, int64_t{1} << 16, "hidden_size"));
  SY_RETURN_IF_ERROR(at_most(c.num_layers, 1024, "num_hidden_layers"));
  SY_RETURN_IF_ERROR(at_most(c.num_heads, 1024, "num_attention_heads"));
  SY_RETURN_IF_ERROR(at_most(c.head_dim, 4096, "head_dim"));
  SY_RETURN_IF_ERROR(at_most(c.num_experts, 4096, "num_experts"));
  SY_RETURN_IF_ERROR(at_most(c.num_experts_per_tok, 64, "num_experts_per_tok"));
  SY_RETURN_IF_ERROR(at_most(c.moe_intermediate_size, int64_t{1} << 18, "moe_intermediate_size"));
  SY_RETURN_IF_ERROR(at_most(c.intermediate_size, int64_t{1} << 18, "intermediate_size"));
  SY_RETURN_IF_ERROR(at_most(c.shared_expert_intermediate_size, int64_t{1} << 18,
                             "shared_expert_intermediate_size"));
  SY_RETURN_IF_ERROR(at_most(c.max_position_embeddings, int64_t{1} << 24, "max_position_embeddings"));
  // Values that would make every logit NaN.
  if (!std::isfinite(c.rms_norm_eps) || c.rms_norm_eps <= 0 || c.rms_norm_eps >= 1)
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": rms_norm_eps must be in (0, 1), got ", c.rms_norm_eps));
  if (!std::isfinite(c.rope_theta) || c.rope_theta <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": rope_theta must be a positive number, got ", c.rope_theta));
  if (c.num_experts_per_tok > c.num_experts)
    return absl::InvalidArgumentError(absl::StrCat(path, ": num_experts_per_tok (", c.num_experts_per_tok,
                                                   ") exceeds the number of experts (", c.num_experts, ")"));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return FromJson(ss.str(), path);
}

}  // namespace sy::model
