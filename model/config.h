// ModelConfig: every hyper-parameter of a supported MoE checkpoint, read from config.json
// with the defaults of the Hugging Face configuration classes (MixtralConfig,
// Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig). Plain value type.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sy::model {

enum class Arch { kMixtral, kQwen2Moe, kQwen3Moe, kOlmoe };

// How q/k are normalised after the projections.
enum class QkNorm {
  kNone,     // Mixtral, Qwen2-MoE
  kPerHead,  // Qwen3-MoE: RMSNorm over head_dim, weight [head_dim]
  kFull,     // OLMoE: RMSNorm over num_heads*head_dim (k: num_kv_heads*head_dim)
};

struct ModelConfig {
  Arch arch = Arch::kMixtral;
  std::string architecture;  // "MixtralForCausalLM", ...
  std::string model_type;    // "mixtral", ...
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP layers (Qwen mlp_only_layers / sparse step)
  int64_t moe_intermediate_size = 0;  // each routed expert
  int64_t shared_expert_intermediate_size = 0;  // Qwen2-MoE; 0 = no shared expert
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  bool norm_topk_prob = true;   // renormalise the top-k weights to sum to 1
  QkNorm qk_norm = QkNorm::kNone;
  bool attention_bias = false;  // q/k/v projections carry a bias (Qwen2-MoE)
  double clip_qkv = 0;          // OLMoE clip_qkv; 0 = off
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;
  std::string torch_dtype;

  // True when `layer` uses the MoE block (else the dense MLP of intermediate_size).
  bool IsMoeLayer(int64_t layer) const;

  // Parses config.json text; `path` only names the file in errors. InvalidArgument for an
  // unknown architecture, a missing required field, or inconsistent sizes.
  static absl::StatusOr<ModelConfig> FromJson(const std::string& text, const std::string& path);
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);

 private:
  static absl::StatusOr<ModelConfig> Parse(const std::string& text, const std::string& path);
};

const char* ArchName(Arch arch);  // "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"

}  // namespace sy::model
