// KvCache: the paged key/value storage of every layer on this rank.
//
// Per layer two f32 arrays, K and V, of [num_blocks, block_size, num_kv_heads, head_dim].
// A sequence owns a list of blocks (its block table, managed by scheduler/ BlockManager);
// logical position p lives in block block_table[p / block_size], row p % block_size.
// The cache only stores; it never decides who owns which block.
// Thread safety: none; the engine thread owns it.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "model/config.h"

namespace sy::model {

class KvCache {
 public:
  KvCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size);

  // Bytes one block takes over all layers (K and V).
  static int64_t BytesPerBlock(const ModelConfig& config, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  kernels::PagedKv layer(int64_t l) {
    return {k_[l].data(), v_[l].data(), block_size_, num_kv_heads_, head_dim_, num_blocks_};
  }

 private:
  int64_t num_blocks_, block_size_, num_kv_heads_, head_dim_;
  std::vector<std::vector<float>> k_, v_;  // [layers][num_blocks*block_size*kv_heads*head_dim]
};

}  // namespace sy::model
