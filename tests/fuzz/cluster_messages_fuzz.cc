// libFuzzer target: what a rank decodes from the group's broadcasts: a step plan
// (scheduler/step_plan.h DecodePlan) and a membership epoch view (parallel/membership.h
// DecodeEpochView). A decoded plan's spans stay inside the words; a decoded view encodes and
// decodes back to itself.
//   ./build-fuzz/tests/fuzz/cluster_messages_fuzz -max_total_time=600
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "parallel/membership.h"
#include "scheduler/step_plan.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<int32_t> words(size / 4);
  if (!words.empty()) std::memcpy(words.data(), data, words.size() * 4);
  auto plan = sy::scheduler::DecodePlan(words);
  if (plan.ok()) {
    const int32_t* lo = words.data();
    const int32_t* hi = words.data() + words.size();
    for (const auto& s : plan->seqs) {
      if (!s.input.tokens.empty() && (s.input.tokens.data() < lo || s.input.tokens.data() + s.input.tokens.size() > hi))
        std::abort();
      if (!s.input.block_table.empty() &&
          (s.input.block_table.data() < lo || s.input.block_table.data() + s.input.block_table.size() > hi))
        std::abort();
    }
  }
  auto view = sy::parallel::DecodeEpochView(words);
  if (view.ok()) {
    // What a rank decoded, encoded again, decodes to the same view (the words themselves may
    // differ only in the padding of the strings).
    auto again = sy::parallel::DecodeEpochView(sy::parallel::EncodeEpochView(*view));
    if (!again.ok() || again->epoch != view->epoch || again->members != view->members ||
        again->store_prefix != view->store_prefix || again->placement_json != view->placement_json)
      std::abort();
  }
  return 0;
}
