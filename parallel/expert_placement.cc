#include "parallel/expert_placement.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"
#include "nlohmann/json.hpp"

namespace sy::parallel {

absl::StatusOr<ExpertPlacement> ExpertPlacement::Create(
    int world_size, int slots_per_rank, int num_experts,
    std::vector<std::vector<int32_t>> physical_to_logical,
    std::vector<std::vector<float>> slot_share, int64_t epoch) {
  if (world_size <= 0 || slots_per_rank <= 0 || num_experts <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert placement: world_size, slots_per_rank and num_experts must be positive (got ",
        world_size, ", ", slots_per_rank, ", ", num_experts, ")"));
  }
  const int num_slots = world_size * slots_per_rank;
  if (num_slots < num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement: ", num_slots,
                                                   " slots cannot hold ", num_experts,
                                                   " experts"));
  }
  if (!slot_share.empty() && slot_share.size() != physical_to_logical.size()) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement: slot_share has ",
                                                   slot_share.size(), " layers, expected ",
                                                   physical_to_logical.size()));
  }
  ExpertPlacement p;
  p.world_size_ = world_size;
  p.slots_per_rank_ = slots_per_rank;
  p.num_experts_ = num_experts;
  p.epoch_ = epoch;
  p.logical_to_physical_.resize(physical_to_logical.size());
  for (size_t l = 0; l < physical_to_logical.size(); ++l) {
    const auto& map = physical_to_logical[l];
    if (static_cast<int>(map.size()) != num_slots) {
      return absl::InvalidArgumentError(absl::StrCat("expert placement: layer ", l, " has ",
                                                     map.size(), " slots, expected ",
                                                     num_slots));
    }
    auto& inv = p.logical_to_physical_[l];
    inv.assign(num_experts, {});
    for (int s = 0; s < num_slots; ++s) {
      const int32_t e = map[s];
      if (e == -1) continue;
      if (e < 0 || e >= num_experts) {
        return absl::InvalidArgumentError(absl::StrCat("expert placement: layer ", l, " slot ",
                                                       s, " holds expert ", e,
                                                       ", out of range [0, ", num_experts,
                                                       ")"));
      }
      inv[e].push_back(s);
    }
    for (int e = 0; e < num_experts; ++e) {
      if (inv[e].empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert placement: layer ", l, " expert ", e, " has no replica"));
      }
    }
    if (!slot_share.empty() && !slot_share[l].empty()) {
      const auto& share = slot_share[l];
      if (static_cast<int>(share.size()) != num_slots) {
        return absl::InvalidArgumentError(absl::StrCat("expert placement: layer ", l,
                                                       " slot_share has ", share.size(),
                                                       " entries, expected ", num_slots));
      }
      for (int e = 0; e < num_experts; ++e) {
        double sum = 0;
        for (int32_t s : inv[e]) {
          if (!(share[s] >= 0.0f) || !std::isfinite(share[s])) {
            return absl::InvalidArgumentError(absl::StrCat(
                "expert placement: layer ", l, " slot ", s, " has a negative share"));
          }
          sum += share[s];
        }
        if (std::fabs(sum - 1.0) > 1e-3) {
          return absl::InvalidArgumentError(
              absl::StrCat("expert placement: layer ", l, " expert ", e,
                           " replica shares sum to ", sum, ", expected 1"));
        }
      }
    }
  }
  p.physical_to_logical_ = std::move(physical_to_logical);
  p.slot_share_ = std::move(slot_share);
  return p;
}

ExpertPlacement ExpertPlacement::Contiguous(int num_layers, int num_experts, int world_size) {
  auto p = Contiguous(num_layers, num_experts, world_size, (num_experts + world_size - 1) / world_size);
  return std::move(p).value();  // valid by construction
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::Contiguous(int num_layers, int num_experts,
                                                            int world_size, int slots_per_rank) {
  if (world_size < 1) return absl::InvalidArgumentError("expert placement: world_size must be >= 1");
  const int per_rank = (num_experts + world_size - 1) / world_size;
  if (slots_per_rank < per_rank)
    return absl::InvalidArgumentError(absl::StrCat(
        "expert placement: ", slots_per_rank, " slots per rank cannot hold ", num_experts,
        " experts on ", world_size, " ranks (at least ", per_rank, ")"));
  // Expert e in slot e % per_rank of rank e / per_rank, as without extra slots.
  std::vector<int32_t> map(static_cast<size_t>(slots_per_rank) * world_size, -1);
  for (int e = 0; e < num_experts; ++e) map[(e / per_rank) * slots_per_rank + e % per_rank] = e;
  return Create(world_size, slots_per_rank, num_experts,
                std::vector<std::vector<int32_t>>(num_layers, map));
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromJson(const std::string& json_text) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("expert placement: not a JSON object");
  }
  auto get_int = [&](const char* key, int* out) -> absl::Status {
    if (!j.contains(key) || !j[key].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert placement: missing integer field '", key, "'"));
    }
    *out = j[key].get<int>();
    return absl::OkStatus();
  };
  int world_size = 0, slots_per_rank = 0, num_experts = 0;
  // Files written before the key was named world_size say num_ranks.
  const bool old_key = j.contains("num_ranks") && !j.contains("world_size");
  SY_RETURN_IF_ERROR(get_int(old_key ? "num_ranks" : "world_size", &world_size));
  SY_RETURN_IF_ERROR(get_int("slots_per_rank", &slots_per_rank));
  SY_RETURN_IF_ERROR(get_int("num_experts", &num_experts));
  int64_t epoch = 0;
  if (j.contains("epoch")) {
    if (!j["epoch"].is_number_integer()) {
      return absl::InvalidArgumentError("expert placement: 'epoch' is not an integer");
    }
    epoch = j["epoch"].get<int64_t>();
  }
  if (!j.contains("layers") || !j["layers"].is_array()) {
    return absl::InvalidArgumentError("expert placement: missing array 'layers'");
  }
  const auto& layers = j["layers"];
  std::vector<std::vector<int32_t>> p2l(layers.size());
  std::vector<std::vector<float>> shares(layers.size());
  bool any_share = false;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& lj = layers[i];
    size_t index = i;
    if (lj.contains("layer")) {
      if (!lj["layer"].is_number_integer() || lj["layer"].get<int64_t>() < 0 ||
          lj["layer"].get<size_t>() >= layers.size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert placement: layers[", i, "].layer is out of range"));
      }
      index = lj["layer"].get<size_t>();
    }
    if (!p2l[index].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert placement: layer ", index, " is given twice"));
    }
    if (!lj.contains("physical_to_logical") || !lj["physical_to_logical"].is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expert placement: layers[", i, "] has no array 'physical_to_logical'"));
    }
    for (const auto& v : lj["physical_to_logical"]) {
      if (!v.is_number_integer()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "expert placement: layers[", i, "].physical_to_logical holds a non-integer"));
      }
      p2l[index].push_back(v.get<int32_t>());
    }
    if (p2l[index].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert placement: layers[", i, "].physical_to_logical is empty"));
    }
    if (lj.contains("slot_share") && !lj["slot_share"].is_null()) {
      if (!lj["slot_share"].is_array()) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert placement: layers[", i, "].slot_share is not an array"));
      }
      for (const auto& v : lj["slot_share"]) {
        if (!v.is_number()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "expert placement: layers[", i, "].slot_share holds a non-number"));
        }
        shares[index].push_back(v.get<float>());
      }
      any_share = any_share || !shares[index].empty();
    }
  }
  if (!any_share) shares.clear();
  return Create(world_size, slots_per_rank, num_experts, std::move(p2l), std::move(shares),
                epoch);
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("expert placement: cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto p = FromJson(ss.str());
  if (!p.ok()) return Annotate(p.status(), path);
  return p;
}

std::string ExpertPlacement::ToJson() const {
  nlohmann::json j;
  j["world_size"] = world_size_;
  j["slots_per_rank"] = slots_per_rank_;
  j["num_experts"] = num_experts_;
  j["epoch"] = epoch_;
  nlohmann::json layers = nlohmann::json::array();
  for (int l = 0; l < num_layers(); ++l) {
    nlohmann::json lj;
    lj["layer"] = l;
    lj["physical_to_logical"] = physical_to_logical_[l];
    if (has_shares(l)) lj["slot_share"] = slot_share_[l];
    layers.push_back(std::move(lj));
  }
  j["layers"] = std::move(layers);
  return j.dump();
}

ExpertPlacement ExpertPlacement::WithEpoch(int64_t epoch) const {
  ExpertPlacement p = *this;
  p.epoch_ = epoch;
  return p;
}

float ExpertPlacement::share_of(int layer, int slot) const {
  const int32_t e = physical_to_logical_[layer][slot];
  if (e < 0) return 0.0f;
  if (has_shares(layer)) return slot_share_[layer][slot];
  return 1.0f / static_cast<float>(logical_to_physical_[layer][e].size());
}

bool ExpertPlacement::operator==(const ExpertPlacement& o) const {
  if (world_size_ != o.world_size_ || slots_per_rank_ != o.slots_per_rank_ ||
      num_experts_ != o.num_experts_ || epoch_ != o.epoch_ ||
      physical_to_logical_ != o.physical_to_logical_) {
    return false;
  }
  for (int l = 0; l < num_layers(); ++l) {
    for (int s = 0; s < num_slots(); ++s) {
      if (share_of(l, s) != o.share_of(l, s)) return false;
    }
  }
  return true;
}

std::vector<std::vector<int32_t>> ExpertsOfRank(const ExpertPlacement& placement, int rank) {
  std::vector<std::vector<int32_t>> out(placement.num_layers());
  const int S = placement.slots_per_rank();
  for (int l = 0; l < placement.num_layers(); ++l) {
    for (int s = rank * S; s < (rank + 1) * S; ++s)
      if (placement.expert_of(l, s) >= 0) out[l].push_back(placement.expert_of(l, s));
    std::sort(out[l].begin(), out[l].end());
    out[l].erase(std::unique(out[l].begin(), out[l].end()), out[l].end());
  }
  return out;
}

}  // namespace sy::parallel
