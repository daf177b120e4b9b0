// StepPlan: the message the leader broadcasts to every rank once per engine step (DESIGN.md
// §2 step 4), and its wire form. Built by DistributedStepExecutor (leader), read by
// RankRunner (every other rank) and by the leader for its own share.
//
// Wire form: little-endian int32 words, back to back:
//   header  [magic 0x53595031 "SYP1", kind, num_seqs]
//   per seq [home_rank, start_pos, compute_logits (0/1), num_tokens, tokens...,
//            num_blocks, block ids...,
//            with compute_logits: temperature (f32 bits), top_p (f32 bits), top_k,
//            seed low, seed high, draw low, draw high]
//   control kinds only (kPlacement and later): [payload words...] after the header
// It travels as one message whose size comes with it (SendPlan / ReceivePlan). A rank runs
// the sequences whose home_rank is its own, in plan order, samples each that wants a token
// (compute_logits and at least one token) and sends back the token ids.
//
// Thread safety: plain values.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "model/moe_model.h"
#include "parallel/communicator.h"
#include "scheduler/step_executor.h"

namespace sy::scheduler {

enum class PlanKind : int32_t {
  kStep = 1,       // run the sequences, return logits
  kKeepAlive = 2,  // no work: keeps idle ranks inside their collective time-out
  kShutdown = 3,   // leave the rank loop (the leader is shutting down)
  // Control plans; no sequences, a payload instead.
  kPlacement = 4,  // switch to the placement in the payload (scheduler/rank_control.h)
  kLoadStats = 5,  // send this rank's expert-load trace to rank 0
  // Membership (parallel/membership.h, scheduler/rank_runner.h):
  kEpochPrepare = 6,  // payload: the next epoch's view; map its experts, connect in background
  kEpochCommit = 7,   // payload: [epoch]; switch to it now (a rank not in it leaves)
  kEpochAbort = 8,    // payload: [epoch]; forget the prepared epoch
};
inline bool IsControlPlan(PlanKind kind) { return static_cast<int32_t>(kind) >= 4; }

struct PlannedSequence {
  int32_t home_rank = 0;
  model::SequenceInput input;  // spans point into the plan's words (decoded) or the engine's
  SampleSpec sample;           // with compute_logits: how its home rank picks the token
};

// Appends the wire form of a plan to `words` (cleared first).
void EncodePlan(PlanKind kind, std::span<const PlannedSequence> seqs, std::vector<int32_t>* words);
// A control plan (no sequences): the header, then `payload`.
void EncodeControlPlan(PlanKind kind, std::span<const int32_t> payload, std::vector<int32_t>* words);

struct DecodedPlan {
  PlanKind kind = PlanKind::kKeepAlive;
  std::vector<PlannedSequence> seqs;  // spans into the decoded words; keep them alive
  std::span<const int32_t> payload;   // control kinds: the words after the header
};

// INVALID_ARGUMENT on a malformed plan (wrong magic, lengths past the end, unknown kind).
absl::StatusOr<DecodedPlan> DecodePlan(std::span<const int32_t> words);

// The plan's words from rank 0 to every other rank, as one message whose size travels with it
// (Communicator::AllToAllVDynamic: one exchange on tcp).
absl::Status SendPlan(parallel::Communicator* comm, std::span<const int32_t> words);
// On the other ranks: `bytes` is scratch; `words` gets the plan. INTERNAL for a size that is
// not whole words or is past the largest plan.
absl::Status ReceivePlan(parallel::Communicator* comm, std::vector<char>* bytes,
                         std::vector<int32_t>* words);

// Tokens each rank returns for `seqs` (its sequences that want one): [world_size].
std::vector<int64_t> TokensPerRank(std::span<const PlannedSequence> seqs, int world_size);

// Sends this rank's `rows_per_rank[rank]` rows of `row_bytes` each (`own`) to rank 0 (an
// all-to-all-v where only rank 0 receives). On rank 0, `recv` gets every rank's rows back to
// back in rank order; elsewhere it may be null.
absl::Status GatherRowsToLeader(parallel::Communicator* comm, const void* own, int64_t row_bytes,
                                std::span<const int64_t> rows_per_rank, void* recv);

}  // namespace sy::scheduler
