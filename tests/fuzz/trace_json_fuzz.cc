// libFuzzer target: a routing trace's JSON (parallel/planner/trace.h ParseTrace), as
// `switchyard plan --trace` and Admin load snapshots read it. Any bytes give a trace or an
// error, never a crash.
//   ./build-fuzz/tests/fuzz/trace_json_fuzz -max_total_time=600
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "parallel/planner/trace.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto t = sy::parallel::planner::ParseTrace(std::string(reinterpret_cast<const char*>(data), size));
  if (!t.ok()) return 0;
  if (static_cast<int>(t->expert_counts.size()) != t->num_layers) std::abort();
  return 0;
}
