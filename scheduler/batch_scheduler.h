// BatchScheduler: the batching policy of one engine step (DESIGN.md §2 step 3) — which
// sequences run, with how many tokens each, and who is preempted. Pure policy: no threads, no
// model; the Engine calls it, and tests drive it step by step with a fake model.
//
// Each step (continuous batching, chunked prefill):
//   1. decode: every running sequence with one pending token, oldest first. When the KV cache
//      has no block for it, the newest running sequence not yet in this step's batch is
//      preempted by recompute (blocks freed, back to the front of the waiting queue); if no
//      other sequence is left, the sequence preempts itself.
//   2. prefill chunks: running sequences part-way through their prompt, oldest first, then
//      waiting sequences in FCFS order, each given min(pending, budget left) tokens, as long
//      as the step stays under max_num_batched_tokens tokens and max_num_seqs sequences and
//      the chunk's blocks are free (a chunk shrinks to the free blocks). Admission is strict
//      FCFS (nobody jumps the queue) and is skipped in a step that had to preempt.
// A sequence needs logits in a step when its chunk reaches its last token.
//
// KV pools (scheduler/kv_pools.h): admission gives a sequence its HOME, the accepting pool
// with the most free blocks that can hold its longest length (prompt + max_new_tokens); its
// blocks come from that pool until it finishes or is preempted, and preemption only takes
// victims of the same pool. PreemptPool moves every sequence of a pool back to the waiting
// queue (its rank died or drains): they are prefilled again, elsewhere, from prompt + output.
//
// Thread safety: none; owned by the engine thread.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "scheduler/kv_pools.h"
#include "scheduler/sequence.h"

namespace sy::scheduler {

struct SchedulerOptions {
  int64_t max_num_seqs = 64;             // sequences per step
  int64_t max_num_batched_tokens = 512;  // tokens per step (decode tokens + prefill chunks)
};

struct ScheduledSequence {
  Sequence* seq = nullptr;
  int64_t num_tokens = 0;      // tokens [seq->num_computed, seq->num_computed + num_tokens)
  bool compute_logits = false; // the chunk ends at the sequence's last token
};

struct ScheduledBatch {
  std::vector<ScheduledSequence> entries;  // decodes first, then prefill chunks
  std::vector<Sequence*> preempted;        // preempted during this Schedule() call
  int64_t num_tokens() const;
  int64_t num_decode() const;  // entries with exactly one token that completes the sequence
  bool empty() const { return entries.empty(); }
};

class BatchScheduler {
 public:
  BatchScheduler(const SchedulerOptions& options, KvPools* pools);

  // Queues a new sequence at the back of the waiting queue.
  void Add(std::unique_ptr<Sequence> seq);
  ScheduledBatch Schedule();
  // After the model ran `batch`: the scheduled tokens are now in the KV cache.
  void CommitStep(const ScheduledBatch& batch);
  // Frees the sequence's blocks and removes it (running or waiting); returns ownership.
  std::unique_ptr<Sequence> Remove(Sequence* seq);
  // Preempts (recompute) every running sequence homed in `pool`; returns them.
  std::vector<Sequence*> PreemptPool(int32_t pool);

  bool empty() const { return running_.empty() && waiting_.empty(); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  // Every sequence, running (oldest first) then waiting (queue order).
  std::vector<Sequence*> AllSequences() const;
  const KvPools& pools() const { return *pools_; }
  // Running sequences and the blocks they hold, per home pool.
  struct PoolLoad {
    int64_t num_seqs = 0;
    int64_t used_blocks = 0;
  };
  PoolLoad LoadOf(int32_t pool) const;
  int64_t num_preemptions() const { return num_preemptions_; }

 private:
  void Preempt(Sequence* seq);

  // Positions `seq` may grow to (its home must hold them).
  static int64_t MaxPositions(const Sequence& seq);

  SchedulerOptions options_;
  KvPools* pools_;
  std::vector<std::unique_ptr<Sequence>> running_;  // sorted by id (arrival)
  std::deque<std::unique_ptr<Sequence>> waiting_;   // preempted ones at the front
  int64_t num_preemptions_ = 0;
};

}  // namespace sy::scheduler
