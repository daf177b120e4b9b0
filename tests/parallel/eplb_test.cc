#include "parallel/planner/eplb.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <random>

namespace sy::parallel::planner {
namespace {

// The example of deepseek-ai/EPLB's README: 2 layers x 12 experts in 4 groups, 16 replicas,
// 2 nodes x 4 GPUs; the README prints this physical_to_logical map.
const std::vector<std::vector<double>> kExampleWeight = {
    {90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
    {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};
const std::vector<std::vector<int32_t>> kExampleOutput = {
    {5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
    {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1}};

TEST(EplbTest, HierarchicalPolicyReproducesDeepSeekReadmeExample) {
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(RebalanceExperts(kExampleWeight[l], 16, 4, 2, 8), kExampleOutput[l]) << "layer " << l;
    // Keeping replicas on distinct ranks changes nothing here: EPLB already did.
    EXPECT_EQ(RebalanceExperts(kExampleWeight[l], 16, 4, 2, 8, /*distinct_ranks=*/true),
              kExampleOutput[l]);
  }
}

TEST(EplbTest, GroupsThatDoNotSplitOverNodesFallBackToTheGlobalPolicy) {
  // 3 groups over 2 nodes: global policy == one group, one node.
  EXPECT_EQ(RebalanceExperts(kExampleWeight[0], 16, 3, 2, 8),
            RebalanceExperts(kExampleWeight[0], 16, 1, 1, 8));
}

// Brute force: the smallest possible largest load per replica over every replica count
// vector with counts >= 1 summing to num_phy.
double BestMaxPerReplica(const std::vector<double>& w, int num_phy) {
  const int n = static_cast<int>(w.size());
  double best = 1e300;
  std::vector<int> c(n, 1);
  std::function<void(int, int)> rec = [&](int i, int left) {
    if (i == n - 1) {
      c[i] = 1 + left;
      double m = 0;
      for (int e = 0; e < n; ++e) m = std::max(m, w[e] / c[e]);
      best = std::min(best, m);
      return;
    }
    for (int extra = 0; extra <= left; ++extra) {
      c[i] = 1 + extra;
      rec(i + 1, left - extra);
    }
  };
  rec(0, num_phy - n);
  return best;
}

TEST(EplbTest, ReplicateExpertsMatchesBruteForceOptimumOfLargestLoadPerReplica) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(1, 100);
  for (int trial = 0; trial < 50; ++trial) {
    const int n = 2 + trial % 4, phy = n + trial % 5;
    std::vector<double> w(n);
    for (double& x : w) x = u(rng);
    const Replication r = ReplicateExperts(w, phy);
    ASSERT_EQ(static_cast<int>(r.phy_to_log.size()), phy);
    EXPECT_EQ(std::accumulate(r.count.begin(), r.count.end(), 0), phy);
    double m = 0;
    for (int e = 0; e < n; ++e) {
      EXPECT_EQ(std::count(r.phy_to_log.begin(), r.phy_to_log.end(), e), r.count[e]);
      m = std::max(m, w[e] / r.count[e]);
    }
    EXPECT_DOUBLE_EQ(m, BestMaxPerReplica(w, phy)) << "trial " << trial;
  }
}

// With two items per pack, largest-first into the lightest pack pairs the i-th largest with
// the i-th smallest, which is optimal; check against every pairing.
TEST(EplbTest, BalancedPackingWithTwoPerPackMatchesBruteForceOptimum) {
  std::mt19937 rng(2);
  std::uniform_real_distribution<double> u(1, 100);
  for (int trial = 0; trial < 30; ++trial) {
    const int packs = 2 + trial % 3, n = 2 * packs;
    std::vector<double> w(n);
    for (double& x : w) x = u(rng);
    const Packing p = BalancedPacking(w, packs);
    std::vector<double> load(packs, 0);
    std::vector<int> items(packs, 0);
    for (int i = 0; i < n; ++i) {
      load[p.pack_index[i]] += w[i];
      ++items[p.pack_index[i]];
    }
    for (int k = 0; k < packs; ++k) EXPECT_EQ(items[k], 2);
    const double got = *std::max_element(load.begin(), load.end());
    // Every assignment of items to packs with two per pack.
    std::vector<int> assign(n);
    for (int i = 0; i < n; ++i) assign[i] = i / 2;
    double best = 1e300;
    do {
      std::vector<double> l(packs, 0);
      for (int i = 0; i < n; ++i) l[assign[i]] += w[i];
      best = std::min(best, *std::max_element(l.begin(), l.end()));
    } while (std::next_permutation(assign.begin(), assign.end()));
    EXPECT_DOUBLE_EQ(got, best) << "trial " << trial;
  }
}

TEST(EplbTest, BalancedPackingFillsEveryPackExactlyAndNumbersItemsWithinIt) {
  const std::vector<double> w = {5, 1, 9, 3, 3, 7, 2, 8, 6};
  const Packing p = BalancedPacking(w, 3);
  std::vector<std::vector<int>> ranks(3);
  for (size_t i = 0; i < w.size(); ++i) ranks[p.pack_index[i]].push_back(p.rank_in_pack[i]);
  for (auto& r : ranks) {
    std::sort(r.begin(), r.end());
    EXPECT_EQ(r, (std::vector<int>{0, 1, 2}));
  }
}

TEST(EplbTest, DistinctKeysKeepReplicasOfOneExpertOnDifferentPacks) {
  // Two replicas of a very hot expert (key 0) and light experts: plain largest-first may put
  // both hot replicas together only if forced; with keys they never share a pack.
  const std::vector<double> w = {50, 50, 1, 1, 1, 1};
  const std::vector<int32_t> key = {0, 0, 1, 2, 3, 4};
  const Packing p = BalancedPacking(w, 2, &key);
  EXPECT_NE(p.pack_index[0], p.pack_index[1]);
}

}  // namespace
}  // namespace sy::parallel::planner
