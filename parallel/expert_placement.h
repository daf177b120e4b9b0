// ExpertPlacement: which logical expert each physical slot of each MoE layer holds
// (DESIGN.md §4). Immutable once built; carries an epoch. Slot s lives on rank
// s / slots_per_rank. Every logical expert has at least one replica; extra slots hold
// replicas of hot experts, or stay empty (-1).
//
// `slot_share[l][s]` is the share of its expert's tokens that slot s serves (the shares of an
// expert's replicas sum to 1); empty means even split over the replicas.
//
// JSON form (also written by `switchyard plan --out`):
//   {"world_size": R, "slots_per_rank": S, "num_experts": E, "epoch": N (optional),
//    "layers": [{"layer": l, "physical_to_logical": [..R*S ints..],
//                "slot_share": [optional, R*S floats]}]}
//
// Thread safety: immutable after construction; share through std::shared_ptr<const ...>.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sy::parallel {

class ExpertPlacement {
 public:
  // physical_to_logical: [num_layers][world_size * slots_per_rank], -1 for an empty slot.
  // slot_share: empty, or per layer empty / [world_size * slots_per_rank].
  // InvalidArgument when an expert has no replica, an id is out of range, or shapes differ.
  static absl::StatusOr<ExpertPlacement> Create(
      int world_size, int slots_per_rank, int num_experts,
      std::vector<std::vector<int32_t>> physical_to_logical,
      std::vector<std::vector<float>> slot_share = {}, int64_t epoch = 0);

  // Expert e of every layer on rank e / ceil(E / R) (slots_per_rank = ceil(E / R)).
  static ExpertPlacement Contiguous(int num_layers, int num_experts, int world_size);
  // The same with `slots_per_rank` (>= ceil(E / R)) slots per rank; the extra slots start
  // empty (-1), room for the replicas a later plan adds. INVALID_ARGUMENT when too few.
  static absl::StatusOr<ExpertPlacement> Contiguous(int num_layers, int num_experts, int world_size,
                                                    int slots_per_rank);

  static absl::StatusOr<ExpertPlacement> FromJson(const std::string& json_text);
  absl::StatusOr<ExpertPlacement> static FromFile(const std::string& path);
  std::string ToJson() const;

  int num_layers() const { return static_cast<int>(physical_to_logical_.size()); }
  int world_size() const { return world_size_; }
  int slots_per_rank() const { return slots_per_rank_; }
  int num_slots() const { return world_size_ * slots_per_rank_; }
  int num_experts() const { return num_experts_; }
  int64_t epoch() const { return epoch_; }
  ExpertPlacement WithEpoch(int64_t epoch) const;

  int rank_of_slot(int slot) const { return slot / slots_per_rank_; }
  // Logical expert in `slot` of `layer`, -1 if empty.
  int32_t expert_of(int layer, int slot) const { return physical_to_logical_[layer][slot]; }
  const std::vector<int32_t>& physical_to_logical(int layer) const {
    return physical_to_logical_[layer];
  }
  // Slots holding expert e in `layer`, ascending.
  const std::vector<int32_t>& replicas_of(int layer, int expert) const {
    return logical_to_physical_[layer][expert];
  }
  // Share of expert(slot)'s tokens that `slot` serves (1 / replicas when not given).
  float share_of(int layer, int slot) const;
  bool has_shares(int layer) const { return !slot_share_.empty() && !slot_share_[layer].empty(); }

  bool operator==(const ExpertPlacement& o) const;

 private:
  int world_size_ = 0, slots_per_rank_ = 0, num_experts_ = 0;
  int64_t epoch_ = 0;
  std::vector<std::vector<int32_t>> physical_to_logical_;            // [L][R*S]
  std::vector<std::vector<std::vector<int32_t>>> logical_to_physical_;  // [L][E][replicas]
  std::vector<std::vector<float>> slot_share_;                       // [L][R*S] or empty
};

// Logical experts rank `rank` holds per layer (ascending, no repeats): what it loads.
std::vector<std::vector<int32_t>> ExpertsOfRank(const ExpertPlacement& placement, int rank);

}  // namespace sy::parallel
