#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace sy::model {

void RouteTopK(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t num_topk,
               bool renormalize, int32_t* topk_ids, float* topk_weights) {
  std::vector<int32_t> order(num_experts);
  std::vector<double> prob(num_experts);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* l = logits + t * num_experts;
    double mx = -INFINITY;
    for (int64_t e = 0; e < num_experts; ++e) mx = std::max(mx, static_cast<double>(l[e]));
    double sum = 0;
    for (int64_t e = 0; e < num_experts; ++e) sum += (prob[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < num_experts; ++e) prob[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + num_topk, order.end(), [&](int32_t a, int32_t b) {
      return l[a] > l[b] || (l[a] == l[b] && a < b);
    });
    double top_sum = 0;
    for (int64_t k = 0; k < num_topk; ++k) top_sum += prob[order[k]];
    for (int64_t k = 0; k < num_topk; ++k) {
      topk_ids[t * num_topk + k] = order[k];
      double w = prob[order[k]];
      if (renormalize) w /= top_sum;
      topk_weights[t * num_topk + k] = static_cast<float>(w);
    }
  }
}

}  // namespace sy::model
