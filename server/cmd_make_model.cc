// `switchyard make-model`: writes a synthetic checkpoint in the Hugging Face format.
#include <cstdio>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/core/dtype.h"
#include "model/synthetic.h"
#include "server/commands.h"
#include "server/flags.h"

namespace sy::server {

int MakeModelCommand(int argc, char** argv) {
  std::string arch = "mixtral", preset = "tiny", dtype = "f32", out, dense_layers;
  int64_t seed = 0, shard_bytes = 0;
  FlagSet flags("make-model",
                "Writes a synthetic MoE checkpoint (config.json, safetensors, tokenizer.json) with\n"
                "random weights from a fixed seed, in the real Hugging Face format.");
  flags.Add("arch", &arch, "architecture: mixtral | qwen2_moe | qwen3_moe | olmoe");
  flags.Add("preset", &preset, "size: tiny | demo | bench | olmoe-1b-7b (bench: Mixtral-shaped, ~0.64 B parameters; "
            "olmoe-1b-7b: OLMoE-1B-7B-shaped, ~6.9 B parameters, 13.8 GB in bf16)");
  flags.Add("seed", &seed, "random seed (same seed, same bytes)");
  flags.Add("dtype", &dtype, "weight dtype: f32 | bf16 | f16");
  flags.Add("out", &out, "output folder (created if missing)");
  flags.Add("mlp-only-layers", &dense_layers,
            "comma-separated layer indices written with a dense MLP instead of experts (qwen2_moe, "
            "qwen3_moe: config.json's mlp_only_layers)");
  flags.Add("shard-bytes", &shard_bytes, "split into model-0000x-of-0000y.safetensors shards of about this size (0: one file)");
  absl::Status s = flags.Parse(argc, argv);
  if (absl::IsCancelled(s)) {
    std::cout << s.message();
    return 0;
  }
  if (s.ok() && out.empty()) s = absl::InvalidArgumentError("--out is required");
  model::SyntheticOptions o;
  for (absl::string_view part : absl::StrSplit(dense_layers, ',', absl::SkipWhitespace())) {
    int64_t layer = 0;
    if (s.ok() && !absl::SimpleAtoi(part, &layer))
      s = absl::InvalidArgumentError(absl::StrCat("--mlp-only-layers: '", part, "' is not a layer index"));
    o.mlp_only_layers.push_back(layer);
  }
  if (s.ok()) {
    auto a = model::ParseArch(arch);
    auto d = ParseDType(dtype);
    if (!a.ok()) s = a.status();
    else if (!d.ok()) s = d.status();
    else {
      o.arch = *a;
      o.dtype = *d;
    }
  }
  if (!s.ok()) {
    std::fprintf(stderr, "make-model: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  o.preset = preset;
  o.seed = static_cast<uint64_t>(seed);
  o.out_dir = out;
  o.shard_bytes = shard_bytes;
  s = model::WriteSyntheticCheckpoint(o);
  if (!s.ok()) {
    std::fprintf(stderr, "make-model: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::fprintf(stderr, "wrote %s %s checkpoint (%s, seed %lld) to %s\n", arch.c_str(), preset.c_str(),
               dtype.c_str(), static_cast<long long>(seed), out.c_str());
  return 0;
}

}  // namespace sy::server
