// ExpertLoadRecorder: the engine's expert-load statistics (DESIGN.md §4).
//
// The model calls Record() with each MoE layer's routing (top-k logical expert ids of every
// token of the step) and EndStep() once per step. The recorder keeps, over a sliding window of
// the last `window_steps` steps, the tokens per logical expert of every MoE layer, and the
// routing paths of the last `max_paths` tokens (all layers), from which co-activation (two
// experts chosen by the same token in the same layer) follows. Snapshot() returns them in the
// trace format of shared/traces/README.md — the file the planner reads — so what a live
// daemon records and what `switchyard plan` reads are the same thing.
//
// Cost: O(tokens × k) counter increments and a copy of the ids per layer; measured under 1 %
// of a decode step (bench/model_bench with --record-load).
//
// Thread safety: Record/EndStep from the engine thread; Snapshot from any thread
// (one mutex; the engine holds it only for the O(T·k) update).
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "kernels/core/mutex.h"
#include "parallel/planner/trace.h"

namespace sy::parallel {

struct ExpertLoadOptions {
  int num_layers = 0;       // MoE layers recorded (index 0..num_layers-1)
  int num_experts = 0;
  int top_k = 0;
  int window_steps = 1024;  // sliding window of steps for the counts
  int max_paths = 4096;     // most recent token paths kept
  std::string model;        // label written into the trace
  std::vector<int> layer_ids;  // model layer of each recorded layer (default 0..L-1)
};

class ExpertLoadRecorder {
 public:
  explicit ExpertLoadRecorder(const ExpertLoadOptions& options);

  // topk_ids: [num_tokens, top_k] logical expert ids of MoE layer `layer` in this step.
  void Record(int layer, const int32_t* topk_ids, int64_t num_tokens);
  // Closes the step: its counts join the window, its token paths the path buffer.
  void EndStep();

  // The window as a trace: expert_counts [L][E] summed over the window, token_paths of the
  // last max_paths tokens, num_tokens = tokens in the window.
  planner::RoutingTrace Snapshot() const;
  int64_t steps_recorded() const;

 private:
  ExpertLoadOptions o_;
  // Current step (engine thread only).
  std::vector<std::vector<int64_t>> step_counts_;      // [L][E]
  std::vector<std::vector<int32_t>> step_ids_;         // [L][T*k]
  int64_t step_tokens_ = 0;

  mutable sy::Mutex mu_;
  std::deque<std::vector<std::vector<int64_t>>> window_ ABSL_GUARDED_BY(mu_);  // per step [L][E]
  std::deque<int64_t> window_tokens_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<int64_t>> totals_ ABSL_GUARDED_BY(mu_);  // [L][E] over the window
  int64_t total_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<std::vector<std::vector<int32_t>>> paths_ ABSL_GUARDED_BY(mu_);  // [T][L][k]
  int64_t steps_ ABSL_GUARDED_BY(mu_) = 0;
};

// Writes a trace in the shared/traces JSON format.
std::string TraceToJson(const planner::RoutingTrace& trace);

}  // namespace sy::parallel
