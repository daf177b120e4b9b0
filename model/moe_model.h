// MoeModel: a Hugging Face MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) loaded from a
// checkpoint folder, and its forward pass over a batch of sequences (DESIGN.md §2 step 5-6).
//
// Load() reads config.json and the safetensors file(s) (memory-mapped; weights stay in their
// file dtype). Forward() runs one engine step: any mix of prefill chunks and decode tokens of
// several sequences, each with its own KV blocks. The MoE layer goes through the seams router
// → MoeDispatcher (dispatch / grouped expert compute / combine) → residual; the heavy math
// goes through a kernels::Backend.
//
// Thread safety: Load is a factory; Forward must be called from one thread at a time (the
// engine thread). The model is otherwise immutable.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "parallel/expert_load.h"
#include "parallel/moe_dispatch.h"

namespace sy::model {

struct LoadOptions {
  std::string backend = "auto";  // kernels::MakeBackend name
  // Experts to load per layer (logical ids); empty = all. A rank of an expert-parallel group
  // loads only the experts its placement gives it.
  std::vector<std::vector<int32_t>> experts_per_layer;
};

// Where the forward passes spent their time, cumulative since Load (wall seconds).
struct ForwardTimes {
  int64_t calls = 0;
  double total = 0;      // whole Forward calls
  double attention = 0;  // norms, q/k/v/o projections, RoPE, KV write, attention
  double moe = 0;        // router + dispatcher (experts, and the all-to-alls with several ranks)
  double lm_head = 0;    // final norm and the LM head
};

// One sequence's share of a step.
struct SequenceInput {
  std::span<const int32_t> tokens;       // new tokens this step (prefill chunk or 1 decode)
  int64_t start_pos = 0;                 // tokens of this sequence already in the KV cache
  std::span<const int32_t> block_table;  // covers positions [0, start_pos + tokens.size())
  bool compute_logits = true;            // produce logits for the last new token
};

class MoeModel {
 public:
  static absl::StatusOr<std::unique_ptr<MoeModel>> Load(const std::string& dir,
                                                        const LoadOptions& options = {});
  virtual ~MoeModel() = default;

  virtual const ModelConfig& config() const = 0;
  virtual const std::string& dir() const = 0;
  // Bytes of weights one decode token reads at batch 1 (attention, top-k experts, LM head…).
  virtual int64_t DecodeBytesPerToken() const = 0;
  virtual int64_t NumParameters() const = 0;

  // Replaces the single-rank dispatcher (expert parallelism). Not owned.
  virtual void SetDispatcher(parallel::MoeDispatcher* dispatcher) = 0;
  // Records every step's routing (null: off). Not owned. Recorded layer i is the i-th MoE
  // layer; MoeLayerIds() gives their model layer numbers.
  virtual void SetLoadRecorder(parallel::ExpertLoadRecorder* recorder) = 0;
  virtual std::vector<int> MoeLayerIds() const = 0;
  // The dispatcher in use (the single-rank one unless SetDispatcher replaced it).
  virtual parallel::MoeDispatcher* dispatcher() const = 0;

  // Live placement changes (engine thread, between steps). experts_per_layer:
  // [num_layers] logical expert ids per model layer. AddExperts maps the weights of the
  // listed experts that are not loaded yet from the checkpoint (already memory-mapped, so this
  // is cheap; pages fault in on first use) and returns their bytes; RetainExperts drops every
  // expert not listed (returns the bytes dropped). InvalidArgument for a bad id or shape.
  virtual absl::StatusOr<int64_t> AddExperts(
      const std::vector<std::vector<int32_t>>& experts_per_layer) = 0;
  virtual absl::StatusOr<int64_t> RetainExperts(
      const std::vector<std::vector<int32_t>>& experts_per_layer) = 0;
  // Logical experts loaded in model layer `layer`, ascending (empty for a dense layer).
  virtual std::vector<int32_t> LoadedExperts(int layer) const = 0;

  // One step. logits: resized to [number of inputs with compute_logits, vocab_size], in
  // input order. Writes the new tokens' K/V into `cache`. InvalidArgument for token ids
  // outside the vocabulary or positions past max_position_embeddings; UNAVAILABLE when the
  // dispatcher's peers fail.
  virtual absl::Status Forward(std::span<const SequenceInput> batch, KvCache& cache,
                               std::vector<float>* logits) = 0;
  // Safe from any thread (metrics) while Forward runs.
  virtual ForwardTimes forward_times() const = 0;
};

}  // namespace sy::model
