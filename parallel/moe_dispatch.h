// MoeDispatcher: the seam through which every MoE layer moves tokens to their experts and the
// results back (DESIGN.md §2 step 5b–f).
//
// The model computes the router (topk_ids / topk_weights over *logical* experts), then:
//   Dispatch  pick a replica (physical slot) per (token, expert), ship each token once per
//             destination rank, and hand back the rows this rank's experts must compute,
//             grouped by local slot (ExpertRows);
//   (model)   run this rank's experts over those rows as one grouped computation (the
//             backend's GroupedExpertFfnRows), writing ExpertRows::out;
//   Combine   ship the results back and combine Σ_k weight_k · y_k into the token rows.
// The single-rank dispatcher groups addresses of the token rows; the expert-parallel dispatcher (all-to-all over
// a Communicator) implements the same phases, so the model does not know how many ranks
// there are. DispatchCombine runs the three with a callback (tests, benchmarks).
//
// Thread safety: one engine thread per rank calls a dispatcher; not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"

namespace sy::parallel {

// Runs the FFNs of this rank's local slots (physical experts) of `layer`.
// rows: f32 [R, hidden] grouped by local slot; slot_offsets: [num_local_slots + 1], rows of
// local slot s are [slot_offsets[s], slot_offsets[s+1]). Writes out: f32 [R, hidden].
using GroupedExpertFn = std::function<void(int layer, const float* rows,
                                           const int64_t* slot_offsets, float* out)>;

// What Dispatch hands the model: the rows this rank's experts compute in one MoE layer,
// grouped by local slot. The rows are not copied into groups: grouped row i is at
// row_ptrs[i] (a token row of x, or a row in the dispatcher's receive buffer), `hidden`
// values in f32, or in bf16 where row_bf16 != nullptr and row_bf16[i] != 0 (rows that came
// over a bf16 wire). The backend's GroupedExpertFfnRows reads them where they are.
struct ExpertRows {
  const void* const* row_ptrs = nullptr;  // [num_rows]
  const uint8_t* row_bf16 = nullptr;      // [num_rows] or nullptr (every row f32)
  const int64_t* slot_offsets = nullptr;  // [num_local_slots + 1]: slot s has rows
                                          // [slot_offsets[s], slot_offsets[s + 1])
  int64_t num_rows = 0;
  float* out = nullptr;  // f32 [num_rows, hidden]: the caller writes each row's expert output
};

// The rows of `rows` as f32 [num_rows, hidden] into dst (the callback form; tests).
void GatherExpertRows(const ExpertRows& rows, int64_t hidden, float* dst);

class MoeDispatcher {
 public:
  virtual ~MoeDispatcher() = default;

  // x: f32 [num_tokens, hidden] (this rank's tokens); topk_ids: [num_tokens, num_topk]
  // logical expert ids; topk_weights: f32 [num_tokens, num_topk]. Called on every rank for
  // every MoE layer, also with num_tokens == 0. On an error the layer is over for this rank
  // (no Combine): UNAVAILABLE when a peer fails or times out, FAILED_PRECONDITION when the
  // ranks' placements differ (every rank sees it). `rows` stays valid until Combine.
  virtual absl::Status Dispatch(int layer, const float* x, int64_t num_tokens, int64_t hidden,
                                const int32_t* topk_ids, const float* topk_weights,
                                int64_t num_topk, ExpertRows* rows) = 0;
  // After the caller wrote every row's expert output to rows->out; x, topk_ids and
  // topk_weights unchanged since Dispatch. out: f32 [num_tokens, hidden], overwritten with
  // Σ_k topk_weights[t,k] · expert(x[t]). Follows every successful Dispatch, on every rank.
  virtual absl::Status Combine(int layer, float* out) = 0;

  // Dispatch, compute(layer, rows gathered into f32, slot_offsets, rows out), Combine; on a
  // Dispatch error, out is zeros.
  absl::Status DispatchCombine(int layer, const float* x, int64_t num_tokens, int64_t hidden,
                               const int32_t* topk_ids, const float* topk_weights,
                               int64_t num_topk, const GroupedExpertFn& compute, float* out);

  // Two-batch overlap. When micro_batches() is 2 (the expert-parallel dispatcher made with
  // EpDispatchOptions::two_batch_overlap; every rank of a group answers the same), the model
  // splits each step's tokens into two micro-batches (lanes 0 and 1) and interleaves them so
  // that one's exchange is in flight while it computes the other's attention:
  //   StartDispatch(lane)   route, pack and post the rows' exchange; returns at once;
  //   FinishDispatch(lane)  wait for it; the lane's rows (as Dispatch);
  //   StartCombine(lane)    pre-sum and post the return exchange;
  //   FinishCombine(lane)   wait for it; out (as Combine).
  // Each lane has its own state, so the experts can run once over both lanes' rows. At most
  // one exchange is in flight at a time (Communicator contract): after a Start, the next call
  // on the dispatcher is that lane's Finish, with any computation between them. Every rank
  // makes the same sequence of calls. Dispatch / Combine are lane 0's Start + Finish.
  // Default: one micro-batch; the lane calls return UNIMPLEMENTED.
  virtual int micro_batches() const { return 1; }
  virtual absl::Status StartDispatch(int lane, int layer, const float* x, int64_t num_tokens,
                                     int64_t hidden, const int32_t* topk_ids,
                                     const float* topk_weights, int64_t num_topk);
  virtual absl::Status FinishDispatch(int lane, ExpertRows* rows);
  virtual absl::Status StartCombine(int lane, int layer, float* out);
  virtual absl::Status FinishCombine(int lane, int layer, float* out);

  // Number of local slots of `layer` on this rank (the groups GroupedExpertFn receives).
  virtual int64_t num_local_slots(int layer) const = 0;
  // Logical expert held in local slot `slot` of `layer` on this rank.
  virtual int32_t local_slot_expert(int layer, int64_t slot) const = 0;
};

// Both lanes' rows of a two-batch-overlap layer as one grouped computation, so that every
// expert's weights are read once per layer: Merge lists slot s's rows of lane 0, then of
// lane 1 (addresses only); after the experts wrote merged.out, Split copies each row's output
// to its lane's ExpertRows::out.
class ExpertRowsMerger {
 public:
  void Merge(const ExpertRows& a, const ExpertRows& b, int64_t num_slots, int64_t hidden,
             ExpertRows* merged);
  void Split(const ExpertRows& a, const ExpertRows& b) const;

 private:
  int64_t num_slots_ = 0, hidden_ = 0;
  std::vector<const void*> row_ptrs_;
  std::vector<uint8_t> row_bf16_;
  std::vector<int64_t> slot_offsets_;
  std::vector<float> out_;
};

// One rank holding every expert: local slot e == logical expert e.
std::unique_ptr<MoeDispatcher> MakeSingleRankDispatcher(int64_t num_experts);

}  // namespace sy::parallel
