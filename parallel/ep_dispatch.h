// Expert-parallel dispatcher: the MoeDispatcher for more than one rank (DESIGN.md §2 step 5,
// DeepEP's layout → notify → dispatch → combine). Called by the model's MoE layer on every
// rank's engine thread, once per MoE layer per step, also when the rank has no tokens.
//
// Dispatch (steps 1-5), the model's experts, Combine (steps 6-7):
//   1. route: each (token, k) picks a physical slot of its logical expert (ChooseSlots);
//   2. layout: per destination rank, the tokens it needs, ONE row per token even when several
//      of its experts live there, plus per (row, expert) a pair {row, local slot, weight};
//   3-4. one all-to-all-v whose sizes travel with it (Communicator::AllToAllVDynamic: one
//      exchange on tcp, counts then rows elsewhere): per destination a WireCounts header
//      (rows, pairs; this rank's previous load, which gives every rank the load of all ranks
//      for balancedness at no extra collective; its placement epoch: on a mismatch every rank
//      returns FAILED_PRECONDITION before any expert runs or anything returns, and the
//      communicator stays usable), then the rows (f32 or bf16 on the wire) and the pairs;
//   5. the receiver groups the pairs by local slot (a row needed by two local experts is in
//      both groups): Dispatch returns the grouped rows by address (ExpertRows: rows stay in
//      x or in the receive buffer, in the wire dtype) and the model runs its grouped expert
//      FFN over them, which rounds them into its own bf16 rows in one pass;
//   6. the receiver pre-sums Σ weight · y per received row straight into the return buffer
//      (wire dtype), so the return all-to-all-v carries one row per (token, destination),
//      not one per (token, expert): with top-k and k > 1 that is up to k× fewer bytes back;
//   7. all-to-all-v back; one pass over out adds, per token, the weighted results of its
//      pairs computed on this rank and the partial sums of its other destinations
//      (overlap_combine: the own share while the return is in flight, the rest after it).
// Rows for this rank's own experts skip the wire both ways (read from x in f32, summed in f32):
// no packing, no copy through the communicator, no bf16 rounding. The row loops are the
// one-pass kernels of kernels/cpu/row_kernels.h.
// Wire segment from rank a to rank b (bytes, back to back):
//   counts WireCounts {int64 rows, int64 pairs, int64 previous load, int64 placement epoch}
//   rows  [num_rows, hidden] wire dtype, row-major
//   pairs [num_pairs] of {int32 row, int32 local_slot, f32 weight}
// Return segment from b to a: [num_rows, hidden] wire dtype, in a's row order.
//
// Empty slots (expert -1) get no rows. local_slot_expert() may return -1 for them.
//
// Thread safety: one engine thread calls Dispatch / Combine / SetPlacement; stats() may be called
// from any thread (metrics).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/core/thread_pool.h"
#include "parallel/communicator.h"
#include "parallel/expert_placement.h"
#include "parallel/moe_dispatch.h"

namespace sy::parallel {

enum class WireDType { kF32, kBF16 };

struct EpDispatchOptions {
  // Element type of token rows and returned rows on the wire. bf16 halves the bytes; the
  // experts' kernel reads received bf16 rows where they are.
  WireDType wire_dtype = WireDType::kF32;
  // Pool for the packing, grouping, pre-sum and combine loops; nullptr runs them on the
  // calling thread. (Not ThreadPool::Default() implicitly: a forked rank process must not
  // inherit a pool whose threads stayed in the parent.)
  ThreadPool* pool = nullptr;
  // Combine this rank's own share of every token while the return exchange is in flight
  // (Communicator::StartAllToAllV), and add the returned partial sums after it. Hides the
  // own share behind the transfer or a slower peer, at the price of a second pass over the
  // tokens served both here and remotely. Off by default: on the 2-core test host it did not
  // pay (parallel/NOTES.md, dispatch overhead); it is meant for links slower than memory.
  bool overlap_combine = false;
  // Two-batch overlap (micro_batches() == 2, see MoeDispatcher): the model splits each step in
  // two micro-batches, hides one's dispatch behind the other's attention and the other's
  // return behind the next layer's attention, and runs the experts once over both. Every rank
  // of a group must agree (the collectives' order depends on it).
  bool two_batch_overlap = false;
};

// Cumulative counters of one rank's dispatcher (exported as switchyard_ep_* metrics).
struct EpDispatchStats {
  int world_size = 0;
  int64_t calls = 0;
  int64_t tokens = 0;          // tokens this rank dispatched
  int64_t rows_sent = 0;       // token rows sent to other ranks (one per token and rank)
  int64_t pairs_computed = 0;  // (token, expert) rows this rank's experts computed
  int64_t dispatch_bytes = 0;  // bytes this rank sent to other ranks, dispatch phase
  int64_t combine_bytes = 0;   // bytes this rank sent to other ranks, combine phase
  double counts_seconds = 0;    // wall time in a separate counts exchange (0: none; the counts
                                // travel with the rows)
  double dispatch_seconds = 0;  // wall time in the rows all-to-all-v
  double combine_seconds = 0;   // wall time in the return all-to-all-v
  // Wall time of the phases outside the communicator (the dispatcher's own overhead, and
  // the expert callback), summed over calls.
  double layout_seconds = 0;  // routing and per-destination layout
  double pack_seconds = 0;    // rows into the send buffer (f32 → wire dtype)
  double group_seconds = 0;   // received pairs sorted by slot (rows are not copied)
  double expert_seconds = 0;  // the caller's experts: from Dispatch's return to Combine
  double presum_seconds = 0;  // Σ weight · y per received row into the return buffer
  double merge_seconds = 0;   // out = own weighted results + returned partial sums
  // Pairs computed per rank in the latest call whose loads are known (one call behind; with
  // two micro-batches a call is one lane's half of the layer: total_rank_load sums both).
  std::vector<int64_t> last_rank_load;
  // Pairs computed per rank over all calls (one call behind).
  std::vector<int64_t> total_rank_load;
  // mean / max of total_rank_load (1 = perfectly balanced; 1 also when nothing ran yet).
  double balancedness = 1.0;
};

// sum += d for the cumulative counters and seconds (the loads and balancedness stay sum's).
void AddDispatchStats(EpDispatchStats* sum, const EpDispatchStats& d);

class ExpertParallelDispatcher : public MoeDispatcher {
 public:
  virtual EpDispatchStats stats() const = 0;
  // Switches to a new placement (same world_size) at a step boundary, on every rank; until
  // all ranks have switched, DispatchCombine fails with FAILED_PRECONDITION (epoch check).
  virtual absl::Status SetPlacement(std::shared_ptr<const ExpertPlacement> placement) = 0;
};

// comm: not owned, must outlive the dispatcher. INVALID_ARGUMENT when the placement's number
// of ranks differs from the communicator's world size.
absl::StatusOr<std::unique_ptr<ExpertParallelDispatcher>> MakeExpertParallelDispatcher(
    Communicator* comm, std::shared_ptr<const ExpertPlacement> placement,
    EpDispatchOptions options = {});

// Routing rule (step 1), exposed for tests and the planner's traffic model. For each
// (token, k) of `rank`'s tokens: a replica on `rank` itself if there is one (several: round
// robin among them); else the remote replicas in proportion to share_of (even split when the
// placement has no shares or all remote shares are 0), by smooth weighted round robin whose
// tie-break starts at a rank-dependent replica so that ranks do not all pick the same one.
// Deterministic. topk_ids: [num_tokens, num_topk]; slots: [num_tokens, num_topk] out.
// INVALID_ARGUMENT when an id is out of [0, num_experts).
absl::Status ChooseSlots(const ExpertPlacement& placement, int layer, int rank,
                         const int32_t* topk_ids, int64_t num_tokens, int64_t num_topk,
                         int32_t* slots);

}  // namespace sy::parallel
