// BlockManager: hands out the fixed-size blocks of the paged KV cache (model/kv_cache.h).
//
// The cache is `num_blocks` blocks of `block_size` token positions. A sequence owns a block
// table (block ids in position order): position p lives in block table[p / block_size].
// Free blocks sit on a LIFO free list, so allocation is O(1) and deterministic.
//
// Invariants: every block id is either on the free list or in exactly one table;
// num_free_blocks() + blocks in tables == num_blocks().
// Thread safety: none; the engine thread (BatchScheduler) owns it.
#pragma once

#include <cstdint>
#include <vector>

namespace sy::scheduler {

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }

  // Blocks a table must gain to cover `num_tokens` positions (0 if it already does).
  int64_t BlocksNeeded(const std::vector<int32_t>& table, int64_t num_tokens) const;
  // Grows `table` to cover `num_tokens` positions. False (table unchanged) when the free list
  // is too short.
  bool Allocate(std::vector<int32_t>* table, int64_t num_tokens);
  // Returns every block of `table` to the free list and clears it.
  void Free(std::vector<int32_t>* table);

 private:
  int64_t num_blocks_, block_size_;
  std::vector<int32_t> free_;  // top of the stack = back
};

}  // namespace sy::scheduler
