// DeepSeek EPLB (deepseek-ai/EPLB eplb.py), re-written from its published description for one
// layer at a time: the `greedy` planner and the ILP's warm start.
//   ReplicateExperts   num_phy replicas: every expert once, then repeatedly one more replica
//                      for the expert with the highest load per replica;
//   BalancedPacking    items largest-first, each into the pack with the least load among the
//                      packs that still have free places (exactly n / m items per pack);
//   RebalanceExperts   hierarchical when num_groups % num_nodes == 0: pack expert groups to
//                      nodes, replicate within each node, pack a node's replicas to its GPUs;
//                      otherwise the global policy (one group, one node).
// Ties go to the lowest index, as Python's min() and torch's max() do.
//
// Thread safety: pure functions.
#pragma once

#include <cstdint>
#include <vector>

namespace sy::parallel::planner {

struct Replication {
  std::vector<int32_t> phy_to_log;    // [num_phy] logical expert of each replica
  std::vector<int32_t> replica_rank;  // [num_phy] index of the replica among its expert's
  std::vector<int32_t> count;         // [num_log] replicas per expert
};
// weight: [num_log]. num_phy >= num_log.
Replication ReplicateExperts(const std::vector<double>& weight, int num_phy);

struct Packing {
  std::vector<int32_t> pack_index;    // [n] pack of each item
  std::vector<int32_t> rank_in_pack;  // [n] position of the item in its pack
};
// weight: [n] with n % num_packs == 0. When `key` is given ([n]), an item avoids packs that
// already hold an item with the same key while a pack without one still has room (EPLB
// itself does not; it keeps replicas of one expert on distinct ranks).
Packing BalancedPacking(const std::vector<double>& weight, int num_packs,
                        const std::vector<int32_t>* key = nullptr);

// physical_to_logical [num_replicas] of one layer; slot s is on GPU s / (num_replicas /
// num_gpus). Requires num_replicas % num_gpus == 0, num_gpus % num_nodes == 0 and, for the
// hierarchical policy, num_experts % num_groups == 0.
std::vector<int32_t> RebalanceExperts(const std::vector<double>& weight, int num_replicas,
                                      int num_groups, int num_nodes, int num_gpus,
                                      bool distinct_ranks = false);

}  // namespace sy::parallel::planner
