#include "scheduler/block_manager.h"

#include "kernels/core/logging.h"

namespace sy::scheduler {

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  SY_CHECK(num_blocks >= 0 && block_size > 0);
  free_.reserve(num_blocks);
  // Block 0 on top, so a fresh manager hands out 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t BlockManager::BlocksNeeded(const std::vector<int32_t>& table, int64_t num_tokens) const {
  const int64_t want = (num_tokens + block_size_ - 1) / block_size_;
  const int64_t have = static_cast<int64_t>(table.size());
  return want > have ? want - have : 0;
}

bool BlockManager::Allocate(std::vector<int32_t>* table, int64_t num_tokens) {
  const int64_t need = BlocksNeeded(*table, num_tokens);
  if (need > num_free_blocks()) return false;
  for (int64_t i = 0; i < need; ++i) {
    table->push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void BlockManager::Free(std::vector<int32_t>* table) {
  for (auto it = table->rbegin(); it != table->rend(); ++it) free_.push_back(*it);
  SY_CHECK_LE(static_cast<int64_t>(free_.size()), num_blocks_) << "a block was freed twice";
  table->clear();
}

}  // namespace sy::scheduler
