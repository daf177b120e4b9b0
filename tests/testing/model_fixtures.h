// Test helpers shared by the model, scheduler and server tests: temporary folders, synthetic
// checkpoints, the shared/ reference files, and a plain single-sequence generator.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/moe_model.h"
#include "model/synthetic.h"

namespace sy::testing {

// A fresh empty folder under $TEST_TMPDIR or /tmp, removed at exit of the test binary.
std::string MakeTempDir(const std::string& prefix);

// Writes a synthetic checkpoint once per (arch, preset, dtype, seed, shard_bytes, dense layers)
// per test binary and returns its folder.
std::string SyntheticModelDir(model::Arch arch, const std::string& preset, DType dtype,
                              uint64_t seed = 0, int64_t shard_bytes = 0,
                              const std::vector<int64_t>& mlp_only_layers = {});

// SY_SHARED_DIR "/reference/mixtral-tiny".
std::string ReferenceDir();

// Greedy generation of `max_new` tokens for one prompt, one token per step after prefill.
std::vector<int32_t> GreedyGenerate(model::MoeModel& m, const std::vector<int32_t>& prompt,
                                    int64_t max_new);

// Logits of the last prompt position (prefill in one step).
std::vector<float> PrefillLogits(model::MoeModel& m, const std::vector<int32_t>& prompt);

}  // namespace sy::testing
