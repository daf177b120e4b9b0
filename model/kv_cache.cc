#include "model/kv_cache.h"

namespace sy::model {

KvCache::KvCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      num_kv_heads_(config.num_kv_heads),
      head_dim_(config.head_dim) {
  const size_t per_layer = static_cast<size_t>(num_blocks * block_size * num_kv_heads_ * head_dim_);
  k_.resize(config.num_layers);
  v_.resize(config.num_layers);
  for (int64_t l = 0; l < config.num_layers; ++l) {
    k_[l].assign(per_layer, 0.f);
    v_[l].assign(per_layer, 0.f);
  }
}

int64_t KvCache::BytesPerBlock(const ModelConfig& config, int64_t block_size) {
  return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim *
         static_cast<int64_t>(sizeof(float));
}

}  // namespace sy::model
