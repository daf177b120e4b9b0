// StepSplit: where one rank's steps went, in four parts that add up to the steps' wall time
// (exported as switchyard_rank_step_seconds_total{phase}; bench/ep_bench.sh prints it).
//   attention   the model's attention blocks (norms, projections, RoPE, KV write, attention);
//   experts     the grouped expert FFNs this rank ran (for one rank: its whole MoE blocks);
//   all_to_all  the collectives of the step: the expert dispatch's counts, rows and return
//               exchanges, the step plan and the results sent to the leader, each including
//               its wait for the slowest peer;
//   other       the rest: embedding, router, dispatch layout and packing, LM head, copies.
#pragma once

#include <cstdint>

#include "model/moe_model.h"
#include "parallel/ep_dispatch.h"

namespace sy::scheduler {

struct StepSplit {
  int64_t steps = 0;
  double attention = 0, experts = 0, all_to_all = 0, other = 0;
  double total() const { return attention + experts + all_to_all + other; }
};

// step_seconds: the wall time of the rank's steps; collective_seconds: the step's collectives
// outside the model (plan, results); forward: the rank's model; dispatch: its dispatcher's
// counters over the same steps (nullptr: a single rank, no dispatch).
StepSplit SplitSteps(int64_t steps, double step_seconds, double collective_seconds,
                     const model::ForwardTimes& forward, const parallel::EpDispatchStats* dispatch);

}  // namespace sy::scheduler
