#include "scheduler/step_split.h"

#include <algorithm>

namespace sy::scheduler {

StepSplit SplitSteps(int64_t steps, double step_seconds, double collective_seconds,
                     const model::ForwardTimes& forward, const parallel::EpDispatchStats* dispatch) {
  StepSplit s;
  s.steps = steps;
  s.attention = forward.attention;
  if (dispatch == nullptr) {
    s.experts = forward.moe;
    s.all_to_all = collective_seconds;
  } else {
    s.experts = dispatch->expert_seconds;
    s.all_to_all = collective_seconds + dispatch->counts_seconds + dispatch->dispatch_seconds +
                   dispatch->combine_seconds;
  }
  s.other = std::max(0.0, step_seconds - s.attention - s.experts - s.all_to_all);
  return s;
}

}  // namespace sy::scheduler
