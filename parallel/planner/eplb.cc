#include "parallel/planner/eplb.h"

#include <algorithm>
#include <numeric>

#include "kernels/core/logging.h"

namespace sy::parallel::planner {

Replication ReplicateExperts(const std::vector<double>& weight, int num_phy) {
  const int num_log = static_cast<int>(weight.size());
  SY_CHECK(num_phy >= num_log);
  Replication r;
  r.phy_to_log.resize(num_phy);
  r.replica_rank.assign(num_phy, 0);
  r.count.assign(num_log, 1);
  for (int i = 0; i < num_log; ++i) r.phy_to_log[i] = i;
  for (int i = num_log; i < num_phy; ++i) {
    int best = 0;
    for (int e = 1; e < num_log; ++e) {
      if (weight[e] / r.count[e] > weight[best] / r.count[best]) best = e;
    }
    r.phy_to_log[i] = best;
    r.replica_rank[i] = r.count[best];
    ++r.count[best];
  }
  return r;
}

Packing BalancedPacking(const std::vector<double>& weight, int num_packs,
                        const std::vector<int32_t>* key) {
  const int n = static_cast<int>(weight.size());
  SY_CHECK(num_packs > 0 && n % num_packs == 0);
  const int per_pack = n / num_packs;
  Packing p;
  p.pack_index.assign(n, -1);
  p.rank_in_pack.assign(n, -1);
  if (per_pack == 1) {
    for (int i = 0; i < n; ++i) {
      p.pack_index[i] = i;
      p.rank_in_pack[i] = 0;
    }
    return p;
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return weight[a] > weight[b]; });
  std::vector<double> pack_weight(num_packs, 0.0);
  std::vector<int> pack_items(num_packs, 0);
  std::vector<std::vector<int32_t>> pack_keys(num_packs);
  for (int item : order) {
    int best = -1;
    for (int pass = 0; pass < 2 && best < 0; ++pass) {
      const bool avoid_same_key = key != nullptr && pass == 0;
      for (int k = 0; k < num_packs; ++k) {
        if (pack_items[k] >= per_pack) continue;
        if (avoid_same_key && std::find(pack_keys[k].begin(), pack_keys[k].end(),
                                        (*key)[item]) != pack_keys[k].end()) {
          continue;
        }
        if (best < 0 || pack_weight[k] < pack_weight[best]) best = k;
      }
    }
    SY_CHECK(best >= 0);
    p.pack_index[item] = best;
    p.rank_in_pack[item] = pack_items[best];
    pack_weight[best] += weight[item];
    ++pack_items[best];
    if (key != nullptr) pack_keys[best].push_back((*key)[item]);
  }
  return p;
}

std::vector<int32_t> RebalanceExperts(const std::vector<double>& weight, int num_replicas,
                                      int num_groups, int num_nodes, int num_gpus,
                                      bool distinct_ranks) {
  const int num_log = static_cast<int>(weight.size());
  if (num_groups <= 0 || num_nodes <= 0 || num_groups % num_nodes != 0 ||
      num_log % num_groups != 0) {
    num_groups = 1;  // the global policy
    num_nodes = 1;
  }
  SY_CHECK(num_replicas % num_gpus == 0 && num_gpus % num_nodes == 0);
  const int group_size = num_log / num_groups;
  const int groups_per_node = num_groups / num_nodes;
  const int log_per_node = num_log / num_nodes;
  const int phy_per_node = num_replicas / num_nodes;
  const int phy_per_gpu = num_replicas / num_gpus;
  const int gpus_per_node = num_gpus / num_nodes;

  // Step 1: groups to nodes. mlog ("middle" logical id) numbers experts node by node.
  std::vector<double> group_tokens(num_groups, 0.0);
  for (int e = 0; e < num_log; ++e) group_tokens[e / group_size] += weight[e];
  const Packing groups = BalancedPacking(group_tokens, num_nodes);
  std::vector<int32_t> mlog_to_log(num_log);
  for (int e = 0; e < num_log; ++e) {
    const int g = e / group_size;
    const int mlog =
        (groups.pack_index[g] * groups_per_node + groups.rank_in_pack[g]) * group_size +
        e % group_size;
    mlog_to_log[mlog] = e;
  }

  std::vector<int32_t> phy_to_log(num_replicas, -1);
  for (int node = 0; node < num_nodes; ++node) {
    // Step 2: replicas within the node.
    std::vector<double> node_tokens(log_per_node);
    for (int j = 0; j < log_per_node; ++j) {
      node_tokens[j] = weight[mlog_to_log[node * log_per_node + j]];
    }
    const Replication rep = ReplicateExperts(node_tokens, phy_per_node);
    // Step 3: the node's replicas to its GPUs, each weighing its expert's load / replicas.
    std::vector<double> phy_tokens(phy_per_node);
    for (int i = 0; i < phy_per_node; ++i) {
      phy_tokens[i] = node_tokens[rep.phy_to_log[i]] / rep.count[rep.phy_to_log[i]];
    }
    const Packing packs = BalancedPacking(phy_tokens, gpus_per_node,
                                          distinct_ranks ? &rep.phy_to_log : nullptr);
    for (int i = 0; i < phy_per_node; ++i) {
      const int slot = node * phy_per_node + packs.pack_index[i] * phy_per_gpu +
                       packs.rank_in_pack[i];
      phy_to_log[slot] = mlog_to_log[node * log_per_node + rep.phy_to_log[i]];
    }
  }
  return phy_to_log;
}

}  // namespace sy::parallel::planner
