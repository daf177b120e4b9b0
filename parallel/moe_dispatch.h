// MoeDispatcher: the seam through which every MoE layer moves tokens to their experts and the
// results back (DESIGN.md §2 step 5b–f).
//
// The model computes the router (topk_ids / topk_weights over *logical* experts) and hands
// the rest to a dispatcher: pick a replica (physical slot) per (token, expert), ship each
// token once per destination rank, run the experts of this rank as one grouped computation,
// ship results back, and combine Σ_k weight_k · y_k. The single-rank dispatcher does the
// grouping in place; the expert-parallel dispatcher (all-to-all over a Communicator)
// implements the same interface, so the model does not know how many ranks there are.
//
// Thread safety: one engine thread per rank calls a dispatcher; not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"

namespace sy::parallel {

// Runs the FFNs of this rank's local slots (physical experts) of `layer`.
// rows: f32 [R, hidden] grouped by local slot; slot_offsets: [num_local_slots + 1], rows of
// local slot s are [slot_offsets[s], slot_offsets[s+1]). Writes out: f32 [R, hidden].
using GroupedExpertFn = std::function<void(int layer, const float* rows,
                                           const int64_t* slot_offsets, float* out)>;

class MoeDispatcher {
 public:
  virtual ~MoeDispatcher() = default;

  // x: f32 [num_tokens, hidden] (this rank's tokens); topk_ids: [num_tokens, num_topk]
  // logical expert ids; topk_weights: f32 [num_tokens, num_topk].
  // out: f32 [num_tokens, hidden], overwritten with Σ_k topk_weights[t,k] · expert(x[t]).
  // Must be called on every rank for every MoE layer, also with num_tokens == 0.
  // UNAVAILABLE when a peer fails or times out.
  virtual absl::Status DispatchCombine(int layer, const float* x, int64_t num_tokens,
                                       int64_t hidden, const int32_t* topk_ids,
                                       const float* topk_weights, int64_t num_topk,
                                       const GroupedExpertFn& compute, float* out) = 0;

  // Number of local slots of `layer` on this rank (the groups GroupedExpertFn receives).
  virtual int64_t num_local_slots(int layer) const = 0;
  // Logical expert held in local slot `slot` of `layer` on this rank.
  virtual int32_t local_slot_expert(int layer, int64_t slot) const = 0;
};

// One rank holding every expert: local slot e == logical expert e.
std::unique_ptr<MoeDispatcher> MakeSingleRankDispatcher(int64_t num_experts);

}  // namespace sy::parallel
