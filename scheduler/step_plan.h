// StepPlan: the message the leader broadcasts to every rank once per engine step (DESIGN.md
// §2 step 4), and its wire form. Built by DistributedStepExecutor (leader), read by
// RunRankLoop (every other rank) and by the leader for its own share.
//
// Wire form: little-endian int32 words, back to back:
//   header  [magic 0x53595031 "SYP1", kind, num_seqs]
//   per seq [home_rank, start_pos, compute_logits (0/1), num_tokens, tokens...,
//            num_blocks, block ids...]
//   control kinds only (kPlacement, kLoadStats): [payload words...] after the header
// A rank runs the sequences whose home_rank is its own, in plan order, and sends back one
// logits row per such sequence that has compute_logits and at least one token.
//
// Thread safety: plain values.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "model/moe_model.h"

namespace sy::scheduler {

enum class PlanKind : int32_t {
  kStep = 1,       // run the sequences, return logits
  kKeepAlive = 2,  // no work: keeps idle ranks inside their collective time-out
  kShutdown = 3,   // leave the rank loop (the leader is shutting down)
  // Control plans (issue 5, scheduler/rank_control.h); no sequences, a payload instead.
  kPlacement = 4,  // switch to the placement in the payload at this step boundary
  kLoadStats = 5,  // send this rank's expert-load trace to rank 0
};

struct PlannedSequence {
  int32_t home_rank = 0;
  model::SequenceInput input;  // spans point into the plan's words (decoded) or the engine's
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

// Logits rows each rank returns for `seqs`: [world_size].
std::vector<int64_t> LogitRowsPerRank(std::span<const PlannedSequence> seqs, int world_size);

}  // namespace sy::scheduler
