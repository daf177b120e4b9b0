// Synthetic checkpoints in the real Hugging Face format (config.json, generation_config.json,
// model.safetensors or shards + model.safetensors.index.json, tokenizer.json), for tests,
// benchmarks and the built-in demo model. They load through the same code a user's
// checkpoint takes. Weights are random from a fixed seed (same seed, same bytes).
//
// Presets (all architectures; the MoE shape is the same, each arch adds its own parts):
//   tiny:  vocab 512,   hidden 64,   inter 128,  2 layers, 4 heads, 2 KV heads, 4 experts top-2
//   demo:  vocab 4096,  hidden 256,  inter 512,  4 layers, 8 heads, 2 KV heads, 8 experts top-2
//   bench: vocab 32000, hidden 1024, inter 2816, 8 layers, 16 heads, 4 KV heads, 8 experts
//          top-2 (Mixtral-shaped, about 0.64 B parameters)
//   olmoe-1b-7b: vocab 50304, hidden 2048, expert inter 1024, 16 layers, 16 heads, 16 KV
//          heads, 64 experts top-8 (OLMoE-1B-7B-shaped, about 6.9 B parameters, 13.8 GB in
//          bf16: the GPU benchmark's shape)
// Qwen-MoE checkpoints may name dense layers (`mlp_only_layers`), written with a plain MLP.
// Tensors are generated while the files are written (one tensor in memory at a time); a
// checkpoint larger than the folder's free space is refused (RESOURCE_EXHAUSTED) before any
// weight is written.
// Thread safety: pure function of its options.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/core/dtype.h"
#include "model/config.h"

namespace sy::model {

struct SyntheticOptions {
  Arch arch = Arch::kMixtral;
  std::string preset = "tiny";  // tiny | demo | bench | olmoe-1b-7b
  uint64_t seed = 0;
  DType dtype = DType::kF32;
  std::string out_dir;
  int64_t shard_bytes = 0;  // > 0: split into model-0000x-of-0000y.safetensors shards
  bool write_tokenizer = true;
  // Layers written with a dense MLP (`mlp.{gate,up,down}_proj`, intermediate size = the
  // preset's) instead of the MoE block, named in config.json's `mlp_only_layers` the way
  // Qwen-MoE checkpoints do. Qwen2-MoE and Qwen3-MoE only (INVALID_ARGUMENT otherwise).
  std::vector<int64_t> mlp_only_layers;
};

absl::Status WriteSyntheticCheckpoint(const SyntheticOptions& options);
// Bytes of the weights WriteSyntheticCheckpoint would write (nothing is generated).
absl::StatusOr<int64_t> SyntheticWeightBytes(const SyntheticOptions& options);

absl::StatusOr<Arch> ParseArch(const std::string& name);  // mixtral|qwen2_moe|qwen3_moe|olmoe

// Where the daemon keeps its built-in demo model: $SWITCHYARD_CACHE, else
// $XDG_CACHE_HOME/switchyard, else ~/.cache/switchyard; plus "/demo-mixtral-bf16-v1".
std::string DefaultDemoDir();
// Writes the demo checkpoint to `dir` unless a complete one is already there.
absl::Status EnsureDemoModel(const std::string& dir);

}  // namespace sy::model
