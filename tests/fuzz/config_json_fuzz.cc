// libFuzzer target: config.json of a checkpoint (model/config.h ModelConfig::FromJson). Any
// bytes give a config or an error; an accepted config is within the bounds the loader relies on.
//   ./build-fuzz/tests/fuzz/config_json_fuzz -max_total_time=600
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto c = sy::model::ModelConfig::FromJson(std::string(reinterpret_cast<const char*>(data), size),
                                            "config.json");
  if (!c.ok()) return 0;
  if (c->num_layers < 1 || c->num_layers > 1024 || c->hidden_size < 1 || c->vocab_size < 1 ||
      c->num_experts < 1 || c->num_experts_per_tok > c->num_experts || c->head_dim % 2 != 0 ||
      !(c->rms_norm_eps > 0) || !(c->rope_theta > 0) || !std::isfinite(c->rope_theta))
    std::abort();
  return 0;
}
