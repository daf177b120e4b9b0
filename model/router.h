// Router semantics of each architecture: router logits -> top-k experts and their weights.
//
//   Mixtral:   softmax over the top-k logits (== softmax over all, top-k, renormalise).
//   Qwen2/3-MoE, OLMoE: softmax over all experts, top-k; renormalise only when
//              norm_topk_prob is set (Qwen3 checkpoints set it; OLMoE never renormalises).
// Ties pick the lower expert id. Softmax is computed in double. Pure function; thread-safe.
#pragma once

#include <cstdint>

namespace sy::model {

// logits: f32 [num_tokens, num_experts]; topk_ids: [num_tokens, num_topk];
// topk_weights: f32 [num_tokens, num_topk], experts in descending weight order.
void RouteTopK(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t num_topk,
               bool renormalize, int32_t* topk_ids, float* topk_weights);

}  // namespace sy::model
