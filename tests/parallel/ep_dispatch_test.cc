// Expert-parallel dispatch/combine over LocalCommunicator against the plain reference
// Σ_k w_k · f_{e_k}(x_t): 1–4 ranks, skewed routing, ranks with no tokens or receiving
// nothing, replicated experts with and without shares, bf16 on the wire, exact routing, and
// failures that become UNAVAILABLE.
#include "parallel/ep_dispatch.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/core/status.h"
#include "tests/testing/faulty_communicator.h"
#include "parallel/local_communicator.h"
#include "tests/parallel/multi_rank_testing.h"

namespace sy::parallel {
namespace {

using std::chrono::milliseconds;
using testing::ExpertFn;
using testing::ReferenceMoe;
using testing::RunRankThreads;

constexpr milliseconds kWatchdog{30000};

// One rank's tokens for one layer.
struct RankInput {
  std::vector<float> x;            // [T, hidden]
  std::vector<int32_t> topk_ids;   // [T, K]
  std::vector<float> topk_weights; // [T, K]
  int64_t num_tokens = 0;
};

// Random routing over `experts` (distinct per token), weights normalised. x[t][hidden-1] holds
// a unique token id (rank * 10000 + t) so routing can be traced.
RankInput MakeInput(int rank, int64_t num_tokens, int64_t hidden, int64_t num_topk,
                    const std::vector<int32_t>& experts, uint32_t seed) {
  std::mt19937 rng(seed * 1000 + rank);
  std::uniform_real_distribution<float> u(-1.f, 1.f), w(0.1f, 1.f);
  RankInput in;
  in.num_tokens = num_tokens;
  in.x.resize(num_tokens * hidden);
  for (auto& v : in.x) v = u(rng);
  for (int64_t t = 0; t < num_tokens; ++t)
    in.x[t * hidden + hidden - 1] = static_cast<float>(rank * 10000 + t);
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::vector<int32_t> pool = experts;
    std::shuffle(pool.begin(), pool.end(), rng);
    float sum = 0;
    for (int64_t k = 0; k < num_topk; ++k) {
      in.topk_ids.push_back(pool[k % pool.size()]);
      in.topk_weights.push_back(w(rng));
      sum += in.topk_weights.back();
    }
    for (int64_t k = 0; k < num_topk; ++k) in.topk_weights[t * num_topk + k] /= sum;
  }
  return in;
}

std::vector<int32_t> Iota(int n) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  return v;
}

struct RunResult {
  std::vector<std::vector<float>> out;  // per rank [T, hidden]
  std::vector<absl::Status> status;
  // per rank: (token id, local slot) of every row its experts computed
  std::vector<std::multiset<std::pair<int64_t, int64_t>>> computed;
  std::vector<EpDispatchStats> stats;
};

// Runs `layers` DispatchCombine calls on every rank (inputs[layer][rank]).
RunResult RunDispatch(int n, std::shared_ptr<const ExpertPlacement> placement,
                      const std::vector<std::vector<RankInput>>& inputs, int64_t hidden,
                      int64_t num_topk, EpDispatchOptions options = {},
                      std::function<Communicator*(int, Communicator*)> wrap = nullptr,
                      milliseconds timeout = milliseconds(5000)) {
  LocalCommunicatorGroup group(n, timeout);
  RunResult res;
  res.out.resize(n);
  res.status.assign(n, absl::OkStatus());
  res.computed.resize(n);
  res.stats.resize(n);
  RunRankThreads(n, kWatchdog, [&](int r) {
    Communicator* comm = wrap ? wrap(r, group.comm(r)) : group.comm(r);
    auto d = MakeExpertParallelDispatcher(comm, placement, options);
    ASSERT_TRUE(d.ok()) << d.status();
    ExpertParallelDispatcher* disp = d->get();
    for (size_t layer = 0; layer < inputs.size(); ++layer) {
      const RankInput& in = inputs[layer][r];
      auto compute = [&](int l, const float* rows, const int64_t* offsets, float* y) {
        for (int64_t s = 0; s < disp->num_local_slots(l); ++s) {
          const int32_t e = disp->local_slot_expert(l, s);
          for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
            ASSERT_GE(e, 0) << "rows for an empty slot";
            ExpertFn(l, e, rows + i * hidden, hidden, y + i * hidden);
            res.computed[r].insert({static_cast<int64_t>(rows[i * hidden + hidden - 1]), s});
          }
        }
      };
      res.out[r].assign(in.num_tokens * hidden, -7.f);
      absl::Status s = disp->DispatchCombine(static_cast<int>(layer), in.x.data(),
                                             in.num_tokens, hidden, in.topk_ids.data(),
                                             in.topk_weights.data(), num_topk, compute,
                                             res.out[r].data());
      if (!s.ok()) {
        res.status[r] = s;
        break;
      }
    }
    res.stats[r] = disp->stats();
  });
  return res;
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want, float tol,
                const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  float worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
  EXPECT_LE(worst, tol) << what;
}

std::shared_ptr<const ExpertPlacement> Contiguous(int layers, int experts, int ranks) {
  return std::make_shared<const ExpertPlacement>(
      ExpertPlacement::Contiguous(layers, experts, ranks));
}

// ---- routing rule -----------------------------------------------------------------------------

TEST(ChooseSlotsTest, PrefersAReplicaOnTheTokensOwnRank) {
  // 2 ranks × 3 slots; expert 0 in slot 0 (rank 0) and slot 4 (rank 1).
  auto p = ExpertPlacement::Create(2, 3, 4, {{0, 1, 2, 3, 0, -1}});
  ASSERT_TRUE(p.ok()) << p.status();
  std::vector<int32_t> ids = {0, 0, 0, 1}, slots(4);
  ASSERT_TRUE(ChooseSlots(*p, 0, 1, ids.data(), 4, 1, slots.data()).ok());
  EXPECT_EQ(slots, (std::vector<int32_t>{4, 4, 4, 1}));
  ASSERT_TRUE(ChooseSlots(*p, 0, 0, ids.data(), 4, 1, slots.data()).ok());
  EXPECT_EQ(slots, (std::vector<int32_t>{0, 0, 0, 1}));
}

TEST(ChooseSlotsTest, SplitsRemoteTokensInProportionToShares) {
  // 3 ranks × 2 slots; expert 0 on rank 1 (slot 2, share 0.75) and rank 2 (slot 4, 0.25).
  auto p = ExpertPlacement::Create(3, 2, 4, {{1, 2, 0, 3, 0, -1}},
                                   {{1.f, 1.f, 0.75f, 1.f, 0.25f, 0.f}});
  ASSERT_TRUE(p.ok()) << p.status();
  std::vector<int32_t> ids(400, 0), slots(400);
  ASSERT_TRUE(ChooseSlots(*p, 0, 0, ids.data(), 400, 1, slots.data()).ok());
  EXPECT_EQ(std::count(slots.begin(), slots.end(), 2), 300);
  EXPECT_EQ(std::count(slots.begin(), slots.end(), 4), 100);
  // Every prefix of 4 picks stays within one token of the 3:1 split.
  for (int i = 4; i <= 400; i += 4)
    EXPECT_EQ(std::count(slots.begin(), slots.begin() + i, 2), 3 * i / 4) << i;
}

TEST(ChooseSlotsTest, SplitsEvenlyWithoutSharesAndStartsAtARankDependentReplica) {
  // 3 ranks × 2 slots; expert 0 on ranks 1 and 2; tokens from rank 0.
  auto p = ExpertPlacement::Create(3, 2, 3, {{1, 2, 0, -1, 0, -1}});
  ASSERT_TRUE(p.ok()) << p.status();
  std::vector<int32_t> ids(10, 0), slots(10);
  ASSERT_TRUE(ChooseSlots(*p, 0, 0, ids.data(), 10, 1, slots.data()).ok());
  EXPECT_EQ(std::count(slots.begin(), slots.end(), 2), 5);
  EXPECT_EQ(std::count(slots.begin(), slots.end(), 4), 5);
  // A 4-rank placement where ranks 0 and 1 both route to remote replicas on ranks 2 and 3: their
  // first picks differ.
  auto q = ExpertPlacement::Create(4, 1, 2, {{1, -1, 0, 0}});
  ASSERT_TRUE(q.ok()) << q.status();
  int32_t id = 0, s0 = -1, s1 = -1;
  ASSERT_TRUE(ChooseSlots(*q, 0, 0, &id, 1, 1, &s0).ok());
  ASSERT_TRUE(ChooseSlots(*q, 0, 1, &id, 1, 1, &s1).ok());
  EXPECT_NE(s0, s1);
}

TEST(ChooseSlotsTest, RejectsExpertIdOutOfRange) {
  auto p = Contiguous(1, 4, 2);
  std::vector<int32_t> ids = {0, 4}, slots(2);
  EXPECT_EQ(ChooseSlots(*p, 0, 0, ids.data(), 2, 1, slots.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- dispatch/combine against the reference ---------------------------------------------------

class EpDispatchRanksTest : public ::testing::TestWithParam<int> {};

TEST_P(EpDispatchRanksTest, MatchesReferenceWithUnevenTokenCountsAndAnIdleRank) {
  const int n = GetParam();
  const int E = 8, L = 3;
  const int64_t H = 16, K = 2;
  auto placement = Contiguous(L, E, n);
  std::vector<std::vector<RankInput>> inputs(L);
  for (int l = 0; l < L; ++l)
    for (int r = 0; r < n; ++r) {
      // The last rank has no tokens in layer 1 (when there are ≥ 2 ranks).
      const int64_t T = (n > 1 && r == n - 1 && l == 1) ? 0 : 5 + 7 * r + l;
      inputs[l].push_back(MakeInput(r, T, H, K, Iota(E), 17 + l));
    }
  RunResult res = RunDispatch(n, placement, inputs, H, K);
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(res.status[r].ok()) << res.status[r];
    const RankInput& in = inputs[L - 1][r];
    ExpectNear(res.out[r], ReferenceMoe(L - 1, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
               "rank " + std::to_string(r));
    EXPECT_EQ(res.stats[r].calls, L);
    EXPECT_EQ(res.stats[r].world_size, n);
  }
}

TEST_P(EpDispatchRanksTest, RoutesEveryTokenExpertPairExactlyOnceAndSendsOneRowPerRank) {
  const int n = GetParam();
  const int E = 6;
  const int64_t H = 8, K = 3;
  auto placement = Contiguous(1, E, n);
  std::vector<std::vector<RankInput>> inputs(1);
  for (int r = 0; r < n; ++r) inputs[0].push_back(MakeInput(r, 9 + r, H, K, Iota(E), 5));
  RunResult res = RunDispatch(n, placement, inputs, H, K);
  // Expected: ChooseSlots per rank; per destination the multiset of (token id, local slot).
  std::vector<std::multiset<std::pair<int64_t, int64_t>>> expected(n);
  std::vector<int64_t> expected_rows_sent(n, 0), expected_bytes(n, 0);
  const int spr = placement->slots_per_rank();
  for (int r = 0; r < n; ++r) {
    const RankInput& in = inputs[0][r];
    expected_bytes[r] += (n - 1) * 32;  // the counts header of every message to a peer
    std::vector<int32_t> slots(in.num_tokens * K);
    ASSERT_TRUE(ChooseSlots(*placement, 0, r, in.topk_ids.data(), in.num_tokens, K,
                            slots.data()).ok());
    for (int64_t t = 0; t < in.num_tokens; ++t) {
      std::set<int> dests;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t s = slots[t * K + k];
        expected[s / spr].insert({r * 10000 + t, s % spr});
        dests.insert(s / spr);
        if (s / spr != r) expected_bytes[r] += 12;
      }
      for (int d : dests)
        if (d != r) {
          ++expected_rows_sent[r];
          expected_bytes[r] += H * 4;
        }
    }
  }
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(res.status[r].ok()) << res.status[r];
    EXPECT_EQ(res.computed[r], expected[r]) << "rank " << r;
    EXPECT_EQ(res.stats[r].rows_sent, expected_rows_sent[r]) << "rank " << r;
    EXPECT_EQ(res.stats[r].dispatch_bytes, expected_bytes[r]) << "rank " << r;
    // Pre-summed return: one row back per row received from another rank.
    EXPECT_EQ(res.stats[r].pairs_computed, static_cast<int64_t>(expected[r].size()));
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, EpDispatchRanksTest, ::testing::Values(1, 2, 3, 4));

TEST(EpDispatchTest, SkewedRoutingToOneRankLeavesOthersReceivingNothingAndLowersBalancedness) {
  const int n = 4, E = 8, L = 3;
  const int64_t H = 12, K = 2;
  auto placement = Contiguous(L, E, n);  // experts 0, 1 on rank 0
  std::vector<std::vector<RankInput>> inputs(L);
  for (int l = 0; l < L; ++l)
    for (int r = 0; r < n; ++r) inputs[l].push_back(MakeInput(r, 6 + r, H, K, {0, 1}, 3 + l));
  RunResult res = RunDispatch(n, placement, inputs, H, K);
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(res.status[r].ok()) << res.status[r];
    const RankInput& in = inputs[L - 1][r];
    ExpectNear(res.out[r], ReferenceMoe(L - 1, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
               "rank " + std::to_string(r));
    if (r > 0) {
      EXPECT_EQ(res.stats[r].pairs_computed, 0) << "rank " << r;
    }
  }
  // Loads are learnt one call late: layers 0 and 1 are known after 3 calls.
  const EpDispatchStats& s = res.stats[2];
  int64_t all_pairs = 0;
  for (int r = 0; r < n; ++r) all_pairs += 2 * (6 + r) * K;
  EXPECT_EQ(s.total_rank_load, (std::vector<int64_t>{all_pairs, 0, 0, 0}));
  EXPECT_DOUBLE_EQ(s.balancedness, 0.25);
}

TEST(EpDispatchTest, ReplicatedHotExpertIsServedOnEachTokensOwnRank) {
  // 3 ranks × 3 slots, 6 experts; expert 0 replicated on every rank.
  auto p = ExpertPlacement::Create(3, 3, 6, {{0, 1, 2, 0, 3, 4, 0, 5, -1}});
  ASSERT_TRUE(p.ok()) << p.status();
  auto placement = std::make_shared<const ExpertPlacement>(*p);
  const int64_t H = 8, K = 1;
  std::vector<std::vector<RankInput>> inputs(1);
  for (int r = 0; r < 3; ++r) inputs[0].push_back(MakeInput(r, 10, H, K, {0}, 9));
  RunResult res = RunDispatch(3, placement, inputs, H, K);
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(res.status[r].ok()) << res.status[r];
    const RankInput& in = inputs[0][r];
    ExpectNear(res.out[r], ReferenceMoe(0, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
               "rank " + std::to_string(r));
    EXPECT_EQ(res.stats[r].rows_sent, 0);
    EXPECT_EQ(res.stats[r].pairs_computed, 10);
  }
}

TEST(EpDispatchTest, RemoteReplicasServeInProportionToTheirShares) {
  // Expert 0 on rank 1 (share 0.75) and rank 2 (share 0.25); all of rank 0's tokens pick it.
  auto p = ExpertPlacement::Create(3, 2, 4, {{1, 2, 0, 3, 0, -1}},
                                   {{1.f, 1.f, 0.75f, 1.f, 0.25f, 0.f}});
  ASSERT_TRUE(p.ok()) << p.status();
  auto placement = std::make_shared<const ExpertPlacement>(*p);
  const int64_t H = 8, K = 1;
  std::vector<std::vector<RankInput>> inputs(1);
  inputs[0].push_back(MakeInput(0, 40, H, K, {0}, 2));
  inputs[0].push_back(MakeInput(1, 0, H, K, {0}, 2));
  inputs[0].push_back(MakeInput(2, 0, H, K, {0}, 2));
  RunResult res = RunDispatch(3, placement, inputs, H, K);
  for (int r = 0; r < 3; ++r) ASSERT_TRUE(res.status[r].ok()) << res.status[r];
  const RankInput& in = inputs[0][0];
  ExpectNear(res.out[0], ReferenceMoe(0, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
             "rank 0");
  EXPECT_EQ(res.stats[1].pairs_computed, 30);
  EXPECT_EQ(res.stats[2].pairs_computed, 10);
}

TEST(EpDispatchTest, TokenWithTwoExpertsOnOneRankTravelsOnceAndIsComputedForBoth) {
  // 2 ranks, experts 0,1 on rank 1; rank 0's tokens pick both.
  auto placement = Contiguous(1, 4, 2);  // rank 0: {0,1}, rank 1: {2,3}
  const int64_t H = 8, K = 2;
  std::vector<std::vector<RankInput>> inputs(1);
  inputs[0].push_back(MakeInput(0, 7, H, K, {2, 3}, 4));
  inputs[0].push_back(MakeInput(1, 0, H, K, {2, 3}, 4));
  RunResult res = RunDispatch(2, placement, inputs, H, K);
  ASSERT_TRUE(res.status[0].ok()) << res.status[0];
  ASSERT_TRUE(res.status[1].ok()) << res.status[1];
  const RankInput& in = inputs[0][0];
  ExpectNear(res.out[0], ReferenceMoe(0, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
             "rank 0");
  EXPECT_EQ(res.stats[0].rows_sent, 7);
  EXPECT_EQ(res.stats[1].pairs_computed, 14);
  // Pre-summed return: 7 rows back, not 14.
  EXPECT_EQ(res.stats[1].combine_bytes, 7 * H * 4);
}

TEST(EpDispatchTest, Bf16OnTheWireStaysWithinBf16Tolerance) {
  const int n = 3, E = 9;
  const int64_t H = 32, K = 2;
  auto placement = Contiguous(1, E, n);
  std::vector<std::vector<RankInput>> inputs(1);
  for (int r = 0; r < n; ++r) inputs[0].push_back(MakeInput(r, 20, H, K, Iota(E), 8));
  // Token ids in the last column do not survive bf16; clear them.
  for (auto& in : inputs[0])
    for (int64_t t = 0; t < in.num_tokens; ++t) in.x[t * H + H - 1] = 0.5f;
  RunResult res = RunDispatch(n, placement, inputs, H, K, {.wire_dtype = WireDType::kBF16});
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(res.status[r].ok()) << res.status[r];
    const RankInput& in = inputs[0][r];
    // Outputs are ≤ 1 in magnitude; two bf16 roundings (rows out, sums back) plus the
    // expert's slope (< 2) give well under 2^-6.
    ExpectNear(res.out[r], ReferenceMoe(0, in.x, H, in.topk_ids, in.topk_weights, K), 1.6e-2f,
               "rank " + std::to_string(r));
    EXPECT_EQ(res.stats[r].dispatch_bytes % 2, 0);
  }
}

TEST(EpDispatchTest, PooledRowLoopsGiveTheSameResultsAsInline) {
  const int n = 3, E = 6;
  const int64_t H = 64, K = 3;  // 64-float rows: the grain is 256 rows, so use many tokens
  auto placement = Contiguous(1, E, n);
  std::vector<std::vector<RankInput>> inputs(1);
  for (int r = 0; r < n; ++r) inputs[0].push_back(MakeInput(r, 700 + 50 * r, H, K, Iota(E), 21));
  ThreadPool pool(3);
  RunResult inline_res = RunDispatch(n, placement, inputs, H, K);
  RunResult pooled = RunDispatch(n, placement, inputs, H, K, {.pool = &pool});
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(pooled.status[r].ok()) << pooled.status[r];
    EXPECT_EQ(pooled.out[r], inline_res.out[r]) << "rank " << r;  // same order of sums
    const RankInput& in = inputs[0][r];
    ExpectNear(pooled.out[r], ReferenceMoe(0, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
               "rank " + std::to_string(r));
  }
}

TEST(EpDispatchTest, OverlappedCombineMatchesTheReferenceAndTheOnePassCombine) {
  const int E = 6, L = 2;
  const int64_t H = 40, K = 3;  // 3 of 6 experts: most tokens are served here and remotely
  for (int n = 1; n <= 4; ++n) {
    for (WireDType wire : {WireDType::kF32, WireDType::kBF16}) {
      auto placement = Contiguous(L, E, n);
      std::vector<std::vector<RankInput>> inputs(L);
      for (int l = 0; l < L; ++l)
        for (int r = 0; r < n; ++r) {
          const int64_t T = (n > 1 && r == 0 && l == 1) ? 0 : 30 + 11 * r;  // an idle rank
          inputs[l].push_back(MakeInput(r, T, H, K, Iota(E), 40 + l));
          if (wire == WireDType::kBF16)  // token ids in the last column do not survive bf16
            for (int64_t t = 0; t < T; ++t) inputs[l][r].x[t * H + H - 1] = 0.5f;
        }
      RunResult one_pass = RunDispatch(n, placement, inputs, H, K, {.wire_dtype = wire});
      RunResult overlapped =
          RunDispatch(n, placement, inputs, H, K, {.wire_dtype = wire, .overlap_combine = true});
      for (int r = 0; r < n; ++r) {
        const std::string what = "ranks " + std::to_string(n) + " rank " + std::to_string(r) +
                                 (wire == WireDType::kBF16 ? " bf16" : " f32");
        ASSERT_TRUE(overlapped.status[r].ok()) << overlapped.status[r] << " " << what;
        const RankInput& in = inputs[L - 1][r];
        ExpectNear(overlapped.out[r], ReferenceMoe(L - 1, in.x, H, in.topk_ids, in.topk_weights, K),
                   wire == WireDType::kBF16 ? 2e-2f : 1e-5f, what);
        // Same terms, summed in a different order: equal to rounding.
        ExpectNear(overlapped.out[r], one_pass.out[r], wire == WireDType::kBF16 ? 1e-5f : 1e-6f,
                   what + " vs one pass");
      }
    }
  }
}

TEST(EpDispatchTest, OverlappedCombineWithARankFailingTheReturnIsUnavailableEverywhere) {
  const int n = 3, E = 6;
  const int64_t H = 8, K = 2;
  auto placement = Contiguous(1, E, n);
  std::vector<std::vector<RankInput>> inputs(1);
  for (int r = 0; r < n; ++r) inputs[0].push_back(MakeInput(r, 9, H, K, Iota(E), 3));
  std::vector<std::unique_ptr<FaultyCommunicator>> faulty(n);
  // Rank 2 fails its third collective (the return all-to-all-v).
  RunResult res = RunDispatch(
      n, placement, inputs, H, K, {.overlap_combine = true},
      [&](int r, Communicator* c) -> Communicator* {
        if (r != 2) return c;
        faulty[r] = std::make_unique<FaultyCommunicator>(
            c, FaultyCommunicator::Options{.fault_call = 2});
        return faulty[r].get();
      },
      milliseconds(300));
  for (int r = 0; r < n; ++r)
    EXPECT_EQ(res.status[r].code(), absl::StatusCode::kUnavailable) << "rank " << r << ": "
                                                                   << res.status[r];
}

TEST(EpDispatchTest, AFailingRankMakesEveryRankUnavailableWithinTheTimeout) {
  const int n = 3, E = 6;
  const int64_t H = 8, K = 2;
  auto placement = Contiguous(1, E, n);
  std::vector<std::vector<RankInput>> inputs(1);
  for (int r = 0; r < n; ++r) inputs[0].push_back(MakeInput(r, 5, H, K, Iota(E), 1));
  std::vector<std::unique_ptr<FaultyCommunicator>> faulty(n);
  auto t0 = std::chrono::steady_clock::now();
  // Rank 1 fails its second collective (the rows all-to-all-v).
  RunResult res = RunDispatch(
      n, placement, inputs, H, K, {},
      [&](int r, Communicator* c) -> Communicator* {
        if (r != 1) return c;
        faulty[r] = std::make_unique<FaultyCommunicator>(
            c, FaultyCommunicator::Options{.fault_call = 1});
        return faulty[r].get();
      },
      milliseconds(300));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int r = 0; r < n; ++r)
    EXPECT_EQ(res.status[r].code(), absl::StatusCode::kUnavailable) << "rank " << r << ": "
                                                                   << res.status[r];
  EXPECT_LT(seconds, 5.0);
}

TEST(EpDispatchTest, BadExpertIdFailsOnlyItsRankAndPeersStillGetTheirResults) {
  const int n = 2, E = 4;
  const int64_t H = 8, K = 1;
  auto placement = Contiguous(1, E, n);
  std::vector<std::vector<RankInput>> inputs(1);
  inputs[0].push_back(MakeInput(0, 4, H, K, Iota(E), 6));
  inputs[0].push_back(MakeInput(1, 4, H, K, Iota(E), 6));
  inputs[0][1].topk_ids[2] = 77;
  RunResult res = RunDispatch(n, placement, inputs, H, K);
  EXPECT_TRUE(res.status[0].ok()) << res.status[0];
  EXPECT_EQ(res.status[1].code(), absl::StatusCode::kInvalidArgument) << res.status[1];
  const RankInput& in = inputs[0][0];
  ExpectNear(res.out[0], ReferenceMoe(0, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
             "rank 0");
}

TEST(EpDispatchTest, PlacementEpochMismatchFailsEveryRankAndTheGroupRecoversOnceAllSwitch) {
  const int n = 2, E = 4;
  const int64_t H = 8, K = 2;
  auto old_placement = Contiguous(1, E, n);
  auto new_placement = std::make_shared<const ExpertPlacement>(old_placement->WithEpoch(1));
  LocalCommunicatorGroup group(n, milliseconds(5000));
  std::vector<absl::Status> first(n), second(n);
  std::vector<RankInput> inputs;
  for (int r = 0; r < n; ++r) inputs.push_back(MakeInput(r, 6, H, K, Iota(E), 30));
  std::vector<std::vector<float>> out(n, std::vector<float>(6 * H));
  RunRankThreads(n, kWatchdog, [&](int r) {
    auto d = MakeExpertParallelDispatcher(group.comm(r), old_placement);
    ASSERT_TRUE(d.ok());
    ExpertParallelDispatcher* disp = d->get();
    auto compute = [&](int l, const float* rows, const int64_t* off, float* y) {
      for (int64_t s = 0; s < disp->num_local_slots(l); ++s)
        for (int64_t i = off[s]; i < off[s + 1]; ++i)
          ExpertFn(l, disp->local_slot_expert(l, s), rows + i * H, H, y + i * H);
    };
    const RankInput& in = inputs[r];
    if (r == 1) {
      ASSERT_TRUE(disp->SetPlacement(new_placement).ok());  // only rank 1 switched
    }
    first[r] = disp->DispatchCombine(0, in.x.data(), 6, H, in.topk_ids.data(),
                                     in.topk_weights.data(), K, compute, out[r].data());
    if (r == 0) {
      ASSERT_TRUE(disp->SetPlacement(new_placement).ok());
    }
    second[r] = disp->DispatchCombine(0, in.x.data(), 6, H, in.topk_ids.data(),
                                      in.topk_weights.data(), K, compute, out[r].data());
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(first[r].code(), absl::StatusCode::kFailedPrecondition) << first[r];
    ASSERT_TRUE(second[r].ok()) << second[r];
    const RankInput& in = inputs[r];
    ExpectNear(out[r], ReferenceMoe(0, in.x, H, in.topk_ids, in.topk_weights, K), 1e-5f,
               "rank " + std::to_string(r));
  }
  EXPECT_FALSE(group.broken());
}

TEST(EpDispatchTest, RejectsPlacementForADifferentNumberOfRanks) {
  LocalCommunicatorGroup group(2, milliseconds(1000));
  EXPECT_EQ(MakeExpertParallelDispatcher(group.comm(0), Contiguous(1, 4, 3)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EpDispatchTest, OneRankMatchesTheSingleRankDispatcher) {
  const int E = 5;
  const int64_t H = 8, K = 2;
  RankInput in = MakeInput(0, 11, H, K, Iota(E), 12);
  LocalCommunicatorGroup group(1, milliseconds(1000));
  auto ep = MakeExpertParallelDispatcher(group.comm(0), Contiguous(1, E, 1));
  ASSERT_TRUE(ep.ok());
  auto single = MakeSingleRankDispatcher(E);
  auto compute_for = [&](MoeDispatcher* d) {
    return [d](int l, const float* rows, const int64_t* off, float* y) {
      for (int64_t s = 0; s < d->num_local_slots(l); ++s)
        for (int64_t i = off[s]; i < off[s + 1]; ++i)
          ExpertFn(l, d->local_slot_expert(l, s), rows + i * H, H, y + i * H);
    };
  };
  std::vector<float> a(11 * H), b(11 * H);
  ASSERT_TRUE((*ep)->DispatchCombine(0, in.x.data(), 11, H, in.topk_ids.data(),
                                     in.topk_weights.data(), K, compute_for(ep->get()),
                                     a.data()).ok());
  ASSERT_TRUE(single->DispatchCombine(0, in.x.data(), 11, H, in.topk_ids.data(),
                                      in.topk_weights.data(), K, compute_for(single.get()),
                                      b.data()).ok());
  ExpectNear(a, b, 1e-6f, "one rank");
}

// ---- two micro-batches (two-batch overlap) ----------------------------------------------------

TEST(ExpertRowsMergerTest, ListsEachSlotsRowsOfLaneZeroThenLaneOneAndSplitsTheOutputsBack) {
  const int64_t H = 2;
  float xa[3][H] = {{1, 1}, {2, 2}, {3, 3}}, xb[2][H] = {{10, 10}, {20, 20}};
  const void* pa[3] = {xa[0], xa[1], xa[2]};
  const void* pb[2] = {xb[0], xb[1]};
  const uint8_t bf_b[2] = {0, 1};
  const int64_t off_a[4] = {0, 2, 2, 3}, off_b[4] = {0, 1, 1, 2};  // slots 0, 1 (empty), 2
  std::vector<float> out_a(3 * H, -1), out_b(2 * H, -1);
  ExpertRows a{pa, nullptr, off_a, 3, out_a.data()}, b{pb, bf_b, off_b, 2, out_b.data()};
  ExpertRowsMerger m;
  ExpertRows merged;
  m.Merge(a, b, 3, H, &merged);
  ASSERT_EQ(merged.num_rows, 5);
  const std::vector<const void*> want = {xa[0], xa[1], xb[0], xa[2], xb[1]};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(merged.row_ptrs[i], want[i]) << i;
  EXPECT_EQ(std::vector<uint8_t>(merged.row_bf16, merged.row_bf16 + 5),
            (std::vector<uint8_t>{0, 0, 0, 0, 1}));
  EXPECT_EQ(std::vector<int64_t>(merged.slot_offsets, merged.slot_offsets + 4),
            (std::vector<int64_t>{0, 3, 3, 5}));
  for (int i = 0; i < 5 * H; ++i) merged.out[i] = static_cast<float>(i);
  m.Split(a, b);
  EXPECT_EQ(out_a, (std::vector<float>{0, 1, 2, 3, 6, 7}));
  EXPECT_EQ(out_b, (std::vector<float>{4, 5, 8, 9}));
}

// Every rank runs the layers as two lanes, in the model's order: lane 1's previous return
// finished, lane 0 dispatched (started, finished), lane 1 dispatched, the experts once over
// both lanes' rows, lane 0 combined, lane 1's return started (finished in the next layer).
struct LaneResult {
  std::vector<std::vector<float>> out[2];  // [lane][rank]
  std::vector<absl::Status> status;
  std::vector<EpDispatchStats> stats;
};
LaneResult RunLanes(int n, std::shared_ptr<const ExpertPlacement> placement,
                    const std::vector<std::vector<RankInput>> inputs[2], int64_t hidden,
                    int64_t num_topk, EpDispatchOptions options) {
  LocalCommunicatorGroup group(n, milliseconds(5000));
  LaneResult res;
  for (auto& o : res.out) o.resize(n);
  res.status.assign(n, absl::OkStatus());
  res.stats.resize(n);
  options.two_batch_overlap = true;
  RunRankThreads(n, kWatchdog, [&](int r) {
    auto d = MakeExpertParallelDispatcher(group.comm(r), placement, options);
    ASSERT_TRUE(d.ok()) << d.status();
    ExpertParallelDispatcher* disp = d->get();
    ASSERT_EQ(disp->micro_batches(), 2);
    ExpertRowsMerger merger;
    auto run = [&]() -> absl::Status {
      int returning = -1;
      for (size_t layer = 0; layer < inputs[0].size(); ++layer) {
        const int l = static_cast<int>(layer);
        const RankInput& a = inputs[0][layer][r];
        const RankInput& b = inputs[1][layer][r];
        if (returning >= 0)
          SY_RETURN_IF_ERROR(disp->FinishCombine(1, returning, res.out[1][r].data()));
        SY_RETURN_IF_ERROR(disp->StartDispatch(0, l, a.x.data(), a.num_tokens, hidden,
                                               a.topk_ids.data(), a.topk_weights.data(),
                                               num_topk));
        ExpertRows ra, rb, rows;
        SY_RETURN_IF_ERROR(disp->FinishDispatch(0, &ra));
        SY_RETURN_IF_ERROR(disp->StartDispatch(1, l, b.x.data(), b.num_tokens, hidden,
                                               b.topk_ids.data(), b.topk_weights.data(),
                                               num_topk));
        SY_RETURN_IF_ERROR(disp->FinishDispatch(1, &rb));
        merger.Merge(ra, rb, disp->num_local_slots(l), hidden, &rows);
        std::vector<float> gathered(rows.num_rows * hidden);
        GatherExpertRows(rows, hidden, gathered.data());
        for (int64_t s = 0; s < disp->num_local_slots(l); ++s)
          for (int64_t i = rows.slot_offsets[s]; i < rows.slot_offsets[s + 1]; ++i)
            ExpertFn(l, disp->local_slot_expert(l, s), &gathered[i * hidden], hidden,
                     rows.out + i * hidden);
        merger.Split(ra, rb);
        res.out[0][r].assign(a.num_tokens * hidden, -7.f);
        res.out[1][r].assign(b.num_tokens * hidden, -7.f);
        SY_RETURN_IF_ERROR(disp->StartCombine(0, l, res.out[0][r].data()));
        SY_RETURN_IF_ERROR(disp->FinishCombine(0, l, res.out[0][r].data()));
        SY_RETURN_IF_ERROR(disp->StartCombine(1, l, res.out[1][r].data()));
        returning = l;
      }
      return returning >= 0 ? disp->FinishCombine(1, returning, res.out[1][r].data())
                            : absl::OkStatus();
    };
    res.status[r] = run();
    res.stats[r] = disp->stats();
  });
  return res;
}

class EpDispatchLanesTest : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(EpDispatchLanesTest, BothMicroBatchesMatchTheReferenceWithEmptyLanesAndReplicas) {
  const auto [n, bf16] = GetParam();
  const int E = 8, L = 3;
  const int64_t H = 16, K = 2;
  // A replica of the hot expert 0 on every rank.
  std::vector<std::vector<int32_t>> slots(n);
  for (int e = 0; e < E; ++e) slots[e % n].push_back(e);
  for (int r = 1; r < n; ++r) slots[r].push_back(0);
  const int spr = static_cast<int>(std::max_element(slots.begin(), slots.end(),
                                                    [](auto& x, auto& y) { return x.size() < y.size(); })
                                       ->size());
  std::vector<int32_t> flat;
  for (auto& sl : slots) {
    sl.resize(spr, -1);
    flat.insert(flat.end(), sl.begin(), sl.end());
  }
  auto p = ExpertPlacement::Create(n, spr, E, std::vector<std::vector<int32_t>>(L, flat));
  ASSERT_TRUE(p.ok()) << p.status();
  auto placement = std::make_shared<const ExpertPlacement>(std::move(*p));
  std::vector<std::vector<RankInput>> inputs[2];
  for (int lane = 0; lane < 2; ++lane) {
    inputs[lane].resize(L);
    for (int l = 0; l < L; ++l)
      for (int r = 0; r < n; ++r) {
        // Lane 0 of rank 0 is empty in layer 1; lane 1 of the last rank in layer 2.
        const bool empty = (lane == 0 && r == 0 && l == 1) || (lane == 1 && r == n - 1 && l == 2);
        inputs[lane][l].push_back(
            MakeInput(r + 100 * lane, empty ? 0 : 3 + 2 * r + l + lane, H, K, Iota(E), 31 + l));
      }
  }
  EpDispatchOptions o;
  o.wire_dtype = bf16 ? WireDType::kBF16 : WireDType::kF32;
  LaneResult res = RunLanes(n, placement, inputs, H, K, o);
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(res.status[r].ok()) << "rank " << r << ": " << res.status[r];
    for (int lane = 0; lane < 2; ++lane) {
      const RankInput& in = inputs[lane][L - 1][r];
      ExpectNear(res.out[lane][r], ReferenceMoe(L - 1, in.x, H, in.topk_ids, in.topk_weights, K),
                 bf16 ? 2e-2f : 1e-5f, "rank " + std::to_string(r) + " lane " + std::to_string(lane));
    }
    EXPECT_EQ(res.stats[r].calls, 2 * L);
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, EpDispatchLanesTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Bool()));

TEST(EpDispatchLanesTest, CallsOutOfOrderAreRefusedAndOneLaneDispatchersHaveNoLaneOne) {
  LocalCommunicatorGroup group(1, milliseconds(1000));
  auto one = MakeExpertParallelDispatcher(group.comm(0), Contiguous(1, 4, 1));
  ASSERT_TRUE(one.ok());
  EXPECT_EQ((*one)->micro_batches(), 1);
  ExpertRows rows;
  EXPECT_EQ((*one)->FinishDispatch(1, &rows).code(), absl::StatusCode::kInvalidArgument);
  EpDispatchOptions o;
  o.two_batch_overlap = true;
  auto two = MakeExpertParallelDispatcher(group.comm(0), Contiguous(1, 4, 1), o);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ((*two)->FinishDispatch(1, &rows).code(), absl::StatusCode::kFailedPrecondition);
  std::vector<float> out(4);
  EXPECT_EQ((*two)->StartCombine(0, 0, out.data()).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*two)->FinishCombine(1, 0, out.data()).code(), absl::StatusCode::kFailedPrecondition);
  auto single = MakeSingleRankDispatcher(4);
  EXPECT_EQ(single->micro_batches(), 1);
  EXPECT_EQ(single->FinishDispatch(0, &rows).code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace sy::parallel
