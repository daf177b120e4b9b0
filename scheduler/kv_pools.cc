#include "scheduler/kv_pools.h"

#include <tuple>

#include "kernels/core/logging.h"

namespace sy::scheduler {

void KvPools::Add(int32_t id, int64_t num_blocks) {
  SY_CHECK(!Has(id)) << "KV pool " << id << " exists";
  pools_[id] = Entry{std::make_unique<BlockManager>(num_blocks, block_size_), true};
}

void KvPools::Remove(int32_t id) {
  auto it = pools_.find(id);
  SY_CHECK(it != pools_.end()) << "no KV pool " << id;
  SY_CHECK_EQ(it->second.blocks->num_free_blocks(), it->second.blocks->num_blocks())
      << "KV pool " << id << " removed while sequences hold blocks";
  pools_.erase(it);
}

void KvPools::SetAccepting(int32_t id, bool accepting) {
  auto it = pools_.find(id);
  SY_CHECK(it != pools_.end()) << "no KV pool " << id;
  it->second.accepting = accepting;
}

bool KvPools::accepting(int32_t id) const {
  auto it = pools_.find(id);
  return it != pools_.end() && it->second.accepting;
}

BlockManager& KvPools::pool(int32_t id) {
  auto it = pools_.find(id);
  SY_CHECK(it != pools_.end()) << "no KV pool " << id;
  return *it->second.blocks;
}

const BlockManager& KvPools::pool(int32_t id) const {
  auto it = pools_.find(id);
  SY_CHECK(it != pools_.end()) << "no KV pool " << id;
  return *it->second.blocks;
}

std::vector<int32_t> KvPools::ids() const {
  std::vector<int32_t> out;
  for (const auto& [id, e] : pools_) out.push_back(id);
  return out;
}

std::optional<int32_t> KvPools::PickHome(int64_t positions) const {
  // Pools that can hold the whole sequence first; with none, any accepting pool (the
  // sequence then preempts itself if it outgrows it, as on one pool).
  for (bool must_fit : {true, false}) {
    std::optional<int32_t> best;
    std::tuple<int, int64_t, int64_t> best_key;  // (no free block, sequences, -free blocks)
    for (const auto& [id, e] : pools_) {
      if (!e.accepting || (must_fit && e.blocks->num_blocks() * block_size_ < positions)) continue;
      const int64_t free = e.blocks->num_free_blocks();
      const std::tuple<int, int64_t, int64_t> key{free > 0 ? 0 : 1, e.num_seqs, -free};
      if (!best || key < best_key) {  // ties keep the lower id (map order)
        best = id;
        best_key = key;
      }
    }
    if (best) return best;
  }
  return std::nullopt;
}

void KvPools::AddSequence(int32_t id, int delta) {
  auto it = pools_.find(id);
  SY_CHECK(it != pools_.end()) << "no KV pool " << id;
  it->second.num_seqs += delta;
  SY_CHECK_GE(it->second.num_seqs, 0);
}

int64_t KvPools::num_seqs(int32_t id) const {
  auto it = pools_.find(id);
  return it == pools_.end() ? 0 : it->second.num_seqs;
}

int64_t KvPools::num_blocks() const {
  int64_t n = 0;
  for (const auto& [id, e] : pools_) n += e.blocks->num_blocks();
  return n;
}

int64_t KvPools::num_free_blocks() const {
  int64_t n = 0;
  for (const auto& [id, e] : pools_) n += e.blocks->num_free_blocks();
  return n;
}

}  // namespace sy::scheduler
