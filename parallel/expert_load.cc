#include "parallel/expert_load.h"

#include <numeric>

#include "kernels/core/mutex.h"

#include "nlohmann/json.hpp"

namespace sy::parallel {

ExpertLoadRecorder::ExpertLoadRecorder(const ExpertLoadOptions& options) : o_(options) {
  if (o_.layer_ids.empty()) {
    o_.layer_ids.resize(o_.num_layers);
    std::iota(o_.layer_ids.begin(), o_.layer_ids.end(), 0);
  }
  step_counts_.assign(o_.num_layers, std::vector<int64_t>(o_.num_experts, 0));
  step_ids_.assign(o_.num_layers, {});
  totals_.assign(o_.num_layers, std::vector<int64_t>(o_.num_experts, 0));
}

void ExpertLoadRecorder::Record(int layer, const int32_t* topk_ids, int64_t num_tokens) {
  if (layer < 0 || layer >= o_.num_layers) return;
  auto& counts = step_counts_[layer];
  for (int64_t i = 0; i < num_tokens * o_.top_k; ++i) {
    const int32_t e = topk_ids[i];
    if (e >= 0 && e < o_.num_experts) ++counts[e];
  }
  step_ids_[layer].assign(topk_ids, topk_ids + num_tokens * o_.top_k);
  step_tokens_ = num_tokens;
}

void ExpertLoadRecorder::EndStep() {
  sy::MutexLock lock(&mu_);
  ++steps_;
  for (int l = 0; l < o_.num_layers; ++l)
    for (int e = 0; e < o_.num_experts; ++e) totals_[l][e] += step_counts_[l][e];
  total_tokens_ += step_tokens_;
  window_.push_back(step_counts_);
  window_tokens_.push_back(step_tokens_);
  while (static_cast<int>(window_.size()) > o_.window_steps) {
    for (int l = 0; l < o_.num_layers; ++l)
      for (int e = 0; e < o_.num_experts; ++e) totals_[l][e] -= window_.front()[l][e];
    total_tokens_ -= window_tokens_.front();
    window_.pop_front();
    window_tokens_.pop_front();
  }
  // Token paths: a layer whose ids did not come this step (dense layer, no tokens) is unknown.
  for (int64_t t = 0; t < step_tokens_; ++t) {
    std::vector<std::vector<int32_t>> path(o_.num_layers);
    for (int l = 0; l < o_.num_layers; ++l) {
      const auto& ids = step_ids_[l];
      if (static_cast<int64_t>(ids.size()) == step_tokens_ * o_.top_k)
        path[l].assign(ids.begin() + t * o_.top_k, ids.begin() + (t + 1) * o_.top_k);
    }
    paths_.push_back(std::move(path));
  }
  while (static_cast<int>(paths_.size()) > o_.max_paths) paths_.pop_front();
  for (auto& c : step_counts_) std::fill(c.begin(), c.end(), 0);
  for (auto& ids : step_ids_) ids.clear();
  step_tokens_ = 0;
}

planner::RoutingTrace ExpertLoadRecorder::Snapshot() const {
  sy::MutexLock lock(&mu_);
  planner::RoutingTrace t;
  t.name = "live";
  t.model = o_.model;
  t.num_layers = o_.num_layers;
  t.num_experts = o_.num_experts;
  t.top_k = o_.top_k;
  t.num_tokens = total_tokens_;
  t.layer_ids = o_.layer_ids;
  t.expert_counts.resize(o_.num_layers);
  for (int l = 0; l < o_.num_layers; ++l)
    t.expert_counts[l].assign(totals_[l].begin(), totals_[l].end());
  t.token_paths.assign(paths_.begin(), paths_.end());
  return t;
}

int64_t ExpertLoadRecorder::steps_recorded() const {
  sy::MutexLock lock(&mu_);
  return steps_;
}

std::string TraceToJson(const planner::RoutingTrace& t) {
  nlohmann::json j;
  j["model"] = t.model;
  j["source"] = "switchyard live expert-load statistics";
  j["num_layers"] = t.num_layers;
  j["num_experts"] = t.num_experts;
  j["top_k"] = t.top_k;
  j["num_tokens"] = t.num_tokens;
  j["layer_ids"] = t.layer_ids;
  j["expert_counts"] = t.expert_counts;
  if (!t.token_paths.empty()) j["token_paths"] = t.token_paths;
  j["phase"] = "serving";
  return j.dump();
}

}  // namespace sy::parallel
