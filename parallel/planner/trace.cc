#include "parallel/planner/trace.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"
#include "nlohmann/json.hpp"

namespace sy::parallel::planner {
namespace {

absl::Status Bad(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("routing trace: ", what));
}

absl::StatusOr<int> GetInt(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() <= 0) {
    return Bad(absl::StrCat("field '", key, "' must be a positive integer"));
  }
  return j[key].get<int>();
}

// Counts recomputed from the paths (the split halves have no counts of their own).
void CountsFromPaths(RoutingTrace* t) {
  t->expert_counts.assign(t->num_layers, std::vector<double>(t->num_experts, 0.0));
  for (const auto& tok : t->token_paths) {
    for (int l = 0; l < t->num_layers; ++l) {
      for (int32_t e : tok[l]) t->expert_counts[l][e] += 1.0;
    }
  }
  t->num_tokens = static_cast<int64_t>(t->token_paths.size());
}

}  // namespace

absl::StatusOr<RoutingTrace> ParseTrace(const std::string& json_text) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad("not a JSON object");
  RoutingTrace t;
  if (j.contains("model") && j["model"].is_string()) t.model = j["model"].get<std::string>();
  SY_ASSIGN_OR_RETURN(t.num_layers, GetInt(j, "num_layers"));
  SY_ASSIGN_OR_RETURN(t.num_experts, GetInt(j, "num_experts"));
  SY_ASSIGN_OR_RETURN(t.top_k, GetInt(j, "top_k"));
  if (t.top_k > t.num_experts) return Bad("top_k exceeds num_experts");
  if (j.contains("num_tokens") && j["num_tokens"].is_number_integer()) {
    t.num_tokens = j["num_tokens"].get<int64_t>();
  }
  t.layer_ids.resize(t.num_layers);
  for (int l = 0; l < t.num_layers; ++l) t.layer_ids[l] = l;
  if (j.contains("layer_ids")) {
    const auto& ids = j["layer_ids"];
    if (!ids.is_array() || static_cast<int>(ids.size()) != t.num_layers) {
      return Bad("'layer_ids' must hold num_layers integers");
    }
    for (int l = 0; l < t.num_layers; ++l) {
      if (!ids[l].is_number_integer()) return Bad("'layer_ids' holds a non-integer");
      t.layer_ids[l] = ids[l].get<int>();
    }
  }
  if (!j.contains("expert_counts") || !j["expert_counts"].is_array() ||
      static_cast<int>(j["expert_counts"].size()) != t.num_layers) {
    return Bad("'expert_counts' must be num_layers x num_experts numbers");
  }
  t.expert_counts.resize(t.num_layers);
  for (int l = 0; l < t.num_layers; ++l) {
    const auto& row = j["expert_counts"][l];
    if (!row.is_array() || static_cast<int>(row.size()) != t.num_experts) {
      return Bad(absl::StrCat("expert_counts[", l, "] must hold num_experts numbers"));
    }
    for (const auto& v : row) {
      if (!v.is_number() || v.get<double>() < 0) {
        return Bad(absl::StrCat("expert_counts[", l, "] holds a negative or non-number"));
      }
      t.expert_counts[l].push_back(v.get<double>());
    }
  }
  if (j.contains("token_paths") && !j["token_paths"].is_null()) {
    const auto& paths = j["token_paths"];
    if (!paths.is_array()) return Bad("'token_paths' is not an array");
    t.token_paths.resize(paths.size());
    for (size_t i = 0; i < paths.size(); ++i) {
      const auto& tok = paths[i];
      if (!tok.is_array() || static_cast<int>(tok.size()) != t.num_layers) {
        return Bad(absl::StrCat("token_paths[", i, "] must hold num_layers lists"));
      }
      auto& out = t.token_paths[i];
      out.resize(t.num_layers);
      for (int l = 0; l < t.num_layers; ++l) {
        const auto& cell = tok[l];
        if (!cell.is_array() || (!cell.empty() && static_cast<int>(cell.size()) != t.top_k)) {
          return Bad(absl::StrCat("token_paths[", i, "][", l, "] must be [] or top_k ids"));
        }
        for (const auto& v : cell) {
          if (!v.is_number_integer() || v.get<int>() < 0 || v.get<int>() >= t.num_experts) {
            return Bad(absl::StrCat("token_paths[", i, "][", l, "] holds a bad expert id"));
          }
          out[l].push_back(v.get<int32_t>());
        }
      }
    }
  }
  if (t.num_tokens <= 0) {
    if (t.has_paths()) {
      t.num_tokens = static_cast<int64_t>(t.token_paths.size());
    } else {
      double sum = 0;
      for (double c : t.expert_counts[0]) sum += c;
      t.num_tokens = static_cast<int64_t>(sum / t.top_k + 0.5);
    }
  }
  return t;
}

absl::StatusOr<RoutingTrace> LoadTrace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("routing trace: cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto t = ParseTrace(ss.str());
  if (!t.ok()) return Annotate(t.status(), path);
  std::string stem = path.substr(path.find_last_of('/') + 1);
  if (stem.size() > 5 && stem.substr(stem.size() - 5) == ".json") stem.resize(stem.size() - 5);
  t->name = stem;
  return t;
}

absl::StatusOr<std::pair<RoutingTrace, RoutingTrace>> SplitTrace(const RoutingTrace& trace) {
  if (!trace.has_paths() || trace.token_paths.size() < 2) {
    return absl::FailedPreconditionError(absl::StrCat(
        "routing trace ", trace.name, ": no token paths to split into plan and holdout"));
  }
  RoutingTrace plan = trace, hold = trace;
  plan.token_paths.clear();
  hold.token_paths.clear();
  const size_t half = trace.token_paths.size() / 2;
  plan.token_paths.assign(trace.token_paths.begin(), trace.token_paths.begin() + half);
  hold.token_paths.assign(trace.token_paths.begin() + half, trace.token_paths.end());
  CountsFromPaths(&plan);
  CountsFromPaths(&hold);
  plan.name = trace.name + "[plan]";
  hold.name = trace.name + "[holdout]";
  return std::make_pair(std::move(plan), std::move(hold));
}

std::vector<std::vector<double>> WindowLoads(const RoutingTrace& trace, int layer,
                                             int num_windows) {
  std::vector<std::vector<double>> out;
  if (!trace.has_paths() || num_windows <= 0) return out;
  const size_t T = trace.token_paths.size();
  for (int w = 0; w < num_windows; ++w) {
    const size_t begin = T * w / num_windows, end = T * (w + 1) / num_windows;
    std::vector<double> loads(trace.num_experts, 0.0);
    double known = 0;
    for (size_t t = begin; t < end; ++t) {
      const auto& p = trace.token_paths[t][layer];
      if (p.empty()) continue;
      known += 1;
      for (int32_t e : p) loads[e] += 1.0;
    }
    if (known == 0) continue;
    for (double& l : loads) l /= known;
    out.push_back(std::move(loads));
  }
  return out;
}

LayerStats ComputeLayerStats(const RoutingTrace& trace, int layer) {
  LayerStats s;
  const int E = trace.num_experts;
  s.loads.assign(E, 0.0);
  if (!trace.has_paths()) {
    s.num_tokens = static_cast<double>(std::max<int64_t>(trace.num_tokens, 1));
    for (int e = 0; e < E; ++e) s.loads[e] = trace.expert_counts[layer][e] / s.num_tokens;
    return s;
  }
  std::vector<double> co(static_cast<size_t>(E) * E, 0.0);
  for (const auto& tok : trace.token_paths) {
    const auto& p = tok[layer];
    if (p.empty()) continue;
    s.paths.push_back(p);
    for (size_t i = 0; i < p.size(); ++i) {
      s.loads[p[i]] += 1.0;
      for (size_t j = i + 1; j < p.size(); ++j) {
        const int a = std::min(p[i], p[j]), b = std::max(p[i], p[j]);
        if (a != b) co[static_cast<size_t>(a) * E + b] += 1.0;
      }
    }
  }
  s.num_tokens = static_cast<double>(std::max<size_t>(s.paths.size(), 1));
  for (double& l : s.loads) l /= s.num_tokens;
  for (int a = 0; a < E; ++a) {
    for (int b = a + 1; b < E; ++b) {
      const double c = co[static_cast<size_t>(a) * E + b];
      if (c > 0) s.pairs.push_back({a, b, c / s.num_tokens});
    }
  }
  std::stable_sort(s.pairs.begin(), s.pairs.end(),
                   [](const CoActivation& x, const CoActivation& y) { return x.weight > y.weight; });
  return s;
}

}  // namespace sy::parallel::planner
