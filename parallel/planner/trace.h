// RoutingTrace: expert-routing statistics in the shared trace format (shared/traces/README.md):
// per-layer token counts per logical expert and, optionally, each token's k experts per layer.
// The planners (`switchyard plan`, bench/placement_eval_bench) read it; the engine's load
// statistics dump writes the same format.
//
// Units: a layer's `loads` are (token, choice) assignments per token, so they sum to top_k;
// a co-activation weight is the fraction of tokens that chose both experts of a pair.
//
// Thread safety: plain values; const access from many threads is safe.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace sy::parallel::planner {

struct RoutingTrace {
  std::string name;   // file stem or a label ("esft_law[plan]")
  std::string model;
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 0;
  int64_t num_tokens = 0;  // tokens behind expert_counts (0 when the file does not say)
  std::vector<int> layer_ids;                         // [L] model layer of each row
  std::vector<std::vector<double>> expert_counts;     // [L][E] assignments per expert
  // [T][L][k] expert ids of token t at layer l; an empty list means unknown (skipped).
  // Empty when the file has no paths (counts only).
  std::vector<std::vector<std::vector<int32_t>>> token_paths;

  bool has_paths() const { return !token_paths.empty(); }
};

// One pair of experts chosen by the same token in the same layer (e < f).
struct CoActivation {
  int32_t e = 0, f = 0;
  double weight = 0;  // fraction of the layer's known tokens that chose both
};

// What one layer of a trace says: loads and co-activation.
struct LayerStats {
  double num_tokens = 0;            // tokens behind the loads
  std::vector<double> loads;        // [E] assignments per token (sums to ~top_k)
  std::vector<CoActivation> pairs;  // every co-activated pair, by weight descending
  // [T'][k] the known paths of this layer (tokens with unknown routing left out).
  std::vector<std::vector<int32_t>> paths;
};

absl::StatusOr<RoutingTrace> ParseTrace(const std::string& json_text);
// NotFound when the file cannot be read; InvalidArgument (naming the field) when malformed.
absl::StatusOr<RoutingTrace> LoadTrace(const std::string& path);

// Splits a trace with token paths into its first and second halves of tokens (plan on the
// first, score on the second); counts are recomputed from the paths of each half.
// FailedPrecondition when the trace has no paths.
absl::StatusOr<std::pair<RoutingTrace, RoutingTrace>> SplitTrace(const RoutingTrace& trace);

// Loads of `layer` in each of `num_windows` consecutive, equal slices of the trace's tokens
// (assignments per token, each row sums to ~top_k; tokens with unknown routing skipped):
// [W][E]. Windows with no known token are left out; empty without token paths. The planner
// uses them as load scenarios (how much the load moves over time).
std::vector<std::vector<double>> WindowLoads(const RoutingTrace& trace, int layer,
                                             int num_windows);

// Loads and co-activation of `layer`. With paths, both come from the paths (tokens with
// unknown routing skipped); without, loads come from expert_counts and there are no pairs.
LayerStats ComputeLayerStats(const RoutingTrace& trace, int layer);

}  // namespace sy::parallel::planner
