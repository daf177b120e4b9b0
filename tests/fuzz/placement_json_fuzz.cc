// libFuzzer target: an expert placement's JSON (parallel/expert_placement.h FromJson), as
// Admin.ApplyPlacement and `switchyard plan` read it. An accepted placement has every expert
// replicated, and its JSON reads back to the same placement.
//   ./build-fuzz/tests/fuzz/placement_json_fuzz -max_total_time=600
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "parallel/expert_placement.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto p = sy::parallel::ExpertPlacement::FromJson(std::string(reinterpret_cast<const char*>(data), size));
  if (!p.ok()) return 0;
  for (int l = 0; l < p->num_layers(); ++l)
    for (int e = 0; e < p->num_experts(); ++e)
      if (p->replicas_of(l, e).empty()) std::abort();
  auto again = sy::parallel::ExpertPlacement::FromJson(p->ToJson());
  if (!again.ok() || !(*again == *p)) std::abort();
  return 0;
}
