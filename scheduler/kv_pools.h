// KvPools: the paged KV cache of a rank group as one block pool per home rank (DESIGN.md §5,
// "capacity follows the group"). Attention is data-parallel: a sequence's K/V live on its home
// rank only, so each rank owns a BlockManager of its own size and a sequence's block ids are
// ids of its home's pool. A single-process engine has one pool, id 0.
//
// Pools are keyed by the rank's stable id (the leader is 0; a rank that joins brings a new id
// and its own capacity). A pool stops accepting new sequences while its rank drains and is
// removed once it is empty (or, when its rank died, after its sequences were preempted).
//
// Invariants: every block of every pool is on that pool's free list or in exactly one table of
// a sequence homed there; Remove() only an empty pool.
// Thread safety: none; the engine thread (BatchScheduler) owns it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "scheduler/block_manager.h"

namespace sy::scheduler {

class KvPools {
 public:
  explicit KvPools(int64_t block_size) : block_size_(block_size) {}

  // Adds pool `id` (not present yet) of num_blocks blocks, accepting.
  void Add(int32_t id, int64_t num_blocks);
  // Removes pool `id`; every one of its blocks must be free.
  void Remove(int32_t id);
  void SetAccepting(int32_t id, bool accepting);

  bool Has(int32_t id) const { return pools_.count(id) > 0; }
  bool accepting(int32_t id) const;
  BlockManager& pool(int32_t id);
  const BlockManager& pool(int32_t id) const;
  std::vector<int32_t> ids() const;

  // The home for a new sequence that may grow to `positions` positions: among the accepting
  // pools that can hold it (else among all accepting pools) and have a free block, the one
  // with the fewest sequences (attention is data-parallel: even sequence counts even out
  // the ranks' step time), then the most free blocks, then the lowest id. nullopt when no
  // pool accepts.
  std::optional<int32_t> PickHome(int64_t positions) const;
  // Sequences homed in a pool (the scheduler counts admissions and departures).
  void AddSequence(int32_t id, int delta);
  int64_t num_seqs(int32_t id) const;

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const;       // summed over pools
  int64_t num_free_blocks() const;  // summed over pools

 private:
  struct Entry {
    std::unique_ptr<BlockManager> blocks;
    bool accepting = true;
    int64_t num_seqs = 0;
  };
  int64_t block_size_;
  std::map<int32_t, Entry> pools_;
};

}  // namespace sy::scheduler
