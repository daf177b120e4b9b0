// LocalCommunicator and FaultyCommunicator: collectives against plain references for 1–4
// ranks, and failures that turn into UNAVAILABLE on every rank instead of a hang.
#include "parallel/local_communicator.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/faulty_communicator.h"
#include "tests/parallel/multi_rank_testing.h"

namespace sy::parallel {
namespace {

using std::chrono::milliseconds;
using testing::RunRankThreads;

constexpr milliseconds kWatchdog{20000};

// Byte b of the message from rank `from` to rank `to`.
uint8_t MessageByte(int from, int to, int64_t b) {
  return static_cast<uint8_t>(from * 31 + to * 7 + b * 13 + 1);
}

// Bytes rank `from` sends rank `to`: varied, with zeros (including to itself).
int64_t MessageSize(int from, int to, int salt) {
  return ((from * 5 + to * 3 + salt) % 4 == 0) ? 0 : (from + 1) * (to + 2) * 3 + salt;
}

class AllToAllVTest : public ::testing::TestWithParam<int> {};

TEST_P(AllToAllVTest, DeliversEveryBlockToItsOffsetWithGapsAndEmptyMessages) {
  const int n = GetParam();
  LocalCommunicatorGroup group(n, milliseconds(5000));
  for (int salt = 0; salt < 3; ++salt) {
    RunRankThreads(n, kWatchdog, [&](int r) {
      std::vector<int64_t> sc(n), so(n), rc(n), ro(n);
      int64_t st = 7, rt = 3;  // leading gaps: offsets need not start at 0
      for (int p = 0; p < n; ++p) {
        sc[p] = MessageSize(r, p, salt);
        so[p] = st;
        st += sc[p] + 5;  // gaps between blocks
        rc[p] = MessageSize(p, r, salt);
        ro[p] = rt;
        rt += rc[p] + 2;
      }
      std::vector<uint8_t> send(st, 0xEE), recv(rt, 0xAA);
      for (int p = 0; p < n; ++p)
        for (int64_t b = 0; b < sc[p]; ++b) send[so[p] + b] = MessageByte(r, p, b);
      ASSERT_TRUE(group.comm(r)->AllToAllV(send.data(), sc, so, recv.data(), rc, ro).ok());
      std::vector<uint8_t> expected(rt, 0xAA);
      for (int p = 0; p < n; ++p)
        for (int64_t b = 0; b < rc[p]; ++b) expected[ro[p] + b] = MessageByte(p, r, b);
      EXPECT_EQ(recv, expected) << "rank " << r << " salt " << salt;
    });
  }
}

TEST_P(AllToAllVTest, AllToAllAllGatherAllGatherVAndBroadcastMatchReferences) {
  const int n = GetParam();
  LocalCommunicatorGroup group(n, milliseconds(5000));
  RunRankThreads(n, kWatchdog, [&](int r) {
    Communicator* c = group.comm(r);
    // AllToAll of one int64 per rank.
    std::vector<int64_t> send(n), recv(n, -1);
    for (int p = 0; p < n; ++p) send[p] = r * 100 + p;
    ASSERT_TRUE(c->AllToAll(send.data(), recv.data(), sizeof(int64_t)).ok());
    for (int p = 0; p < n; ++p) EXPECT_EQ(recv[p], p * 100 + r);
    // AllGather.
    int32_t mine = 1000 + r;
    std::vector<int32_t> all(n, -1);
    ASSERT_TRUE(c->AllGather(&mine, sizeof(mine), all.data()).ok());
    for (int p = 0; p < n; ++p) EXPECT_EQ(all[p], 1000 + p);
    // AllGatherV: rank p contributes p + 1 bytes of value p.
    std::vector<int64_t> counts(n);
    int64_t total = 0;
    for (int p = 0; p < n; ++p) total += counts[p] = p + 1;
    std::vector<uint8_t> contrib(r + 1, static_cast<uint8_t>(r)), gathered(total, 0xFF);
    ASSERT_TRUE(c->AllGatherV(contrib.data(), gathered.data(), counts).ok());
    std::vector<uint8_t> expected;
    for (int p = 0; p < n; ++p) expected.insert(expected.end(), p + 1, static_cast<uint8_t>(p));
    EXPECT_EQ(gathered, expected);
    // Broadcast from the last rank.
    std::vector<int32_t> buf(5, r == n - 1 ? 42 : -r);
    ASSERT_TRUE(c->Broadcast(buf.data(), buf.size() * sizeof(int32_t), n - 1).ok());
    EXPECT_EQ(buf, std::vector<int32_t>(5, 42));
    EXPECT_TRUE(c->Barrier().ok());
  });
}

TEST_P(AllToAllVTest, StartedExchangeDeliversByWaitWhileRanksArriveAtDifferentTimes) {
  const int n = GetParam();
  LocalCommunicatorGroup group(n, milliseconds(5000));
  RunRankThreads(n, kWatchdog, [&](int r) {
    for (int round = 0; round < 3; ++round) {
      std::vector<int64_t> sc(n), so(n), rc(n), ro(n);
      int64_t st = 0, rt = 0;
      for (int p = 0; p < n; ++p) {
        sc[p] = MessageSize(r, p, round);
        so[p] = st;
        st += sc[p];
        rc[p] = MessageSize(p, r, round);
        ro[p] = rt;
        rt += rc[p];
      }
      std::vector<uint8_t> send(st + 1), recv(rt + 1, 0xAA);
      for (int p = 0; p < n; ++p)
        for (int64_t b = 0; b < sc[p]; ++b) send[so[p] + b] = MessageByte(r, p, b);
      // Rank r is r·5 ms late to the start, and works 10 ms between start and wait.
      std::this_thread::sleep_for(milliseconds(5 * r));
      std::unique_ptr<PendingAllToAllV> pending =
          group.comm(r)->StartAllToAllV(send.data(), sc, so, recv.data(), rc, ro);
      std::this_thread::sleep_for(milliseconds(10));
      ASSERT_TRUE(pending->Wait().ok());
      for (int p = 0; p < n; ++p)
        for (int64_t b = 0; b < rc[p]; ++b)
          ASSERT_EQ(recv[ro[p] + b], MessageByte(p, r, b)) << "from " << p << " byte " << b;
      EXPECT_EQ(recv[rt], 0xAA);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, AllToAllVTest, ::testing::Values(1, 2, 3, 4));

TEST(LocalCommunicatorTest, StartedExchangeWithAMissingPeerGivesUnavailableFromWait) {
  const int n = 2;
  LocalCommunicatorGroup group(n, milliseconds(300));
  std::vector<int64_t> counts(n, 4), offsets = {0, 4};
  std::vector<uint8_t> send(8, 1), recv(8, 0);
  std::unique_ptr<PendingAllToAllV> pending =
      group.comm(0)->StartAllToAllV(send.data(), counts, offsets, recv.data(), counts, offsets);
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(pending->Wait().code(), absl::StatusCode::kUnavailable);  // rank 1 never comes
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(secs, 0.25);
  EXPECT_LT(secs, 5.0);
  EXPECT_TRUE(group.broken());
  EXPECT_EQ(group.comm(1)
                ->StartAllToAllV(send.data(), counts, offsets, recv.data(), counts, offsets)
                ->Wait()
                .code(),
            absl::StatusCode::kUnavailable);
}

TEST(LocalCommunicatorTest, RankThatNeverArrivesGivesUnavailableWithinTimeoutOnEveryOtherRank) {
  const int n = 3;
  const milliseconds timeout(300);
  LocalCommunicatorGroup group(n, timeout);
  std::vector<absl::Status> status(n);
  std::vector<double> seconds(n, 0);
  RunRankThreads(n, kWatchdog, [&](int r) {
    if (r == 2) return;  // rank 2 "died"
    auto t0 = std::chrono::steady_clock::now();
    status[r] = group.comm(r)->Barrier();
    seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(status[r].code(), absl::StatusCode::kUnavailable) << status[r];
    EXPECT_GE(seconds[r], 0.25);
    EXPECT_LT(seconds[r], 5.0);  // slack for loaded machines
  }
  EXPECT_TRUE(group.broken());
  // Broken: later calls fail fast on every rank, including the one that never came.
  for (int r = 0; r < n; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(group.comm(r)->Barrier().code(), absl::StatusCode::kUnavailable);
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.1);
    EXPECT_TRUE(group.comm(r)->broken());
  }
}

TEST(LocalCommunicatorTest, BreakingTheGroupWakesWaitingRanksBeforeTheirTimeout) {
  LocalCommunicatorGroup group(2, milliseconds(60000));
  absl::Status s;
  std::thread waiter([&] { s = group.comm(0)->Barrier(); });
  std::this_thread::sleep_for(milliseconds(50));
  group.Break();
  waiter.join();  // would take a minute without the wake-up
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
}

TEST(LocalCommunicatorTest, AbortingDuringAnExchangeLetsNoRankReadAFreedBuffer) {
  // Rank 1 aborts while ranks copy out of each other's send buffers; every rank leaves with
  // UNAVAILABLE or OK, and (under ASan) nobody reads a buffer its owner already freed.
  for (int round = 0; round < 20; ++round) {
    LocalRendezvous rendezvous(milliseconds(5000));
    std::vector<std::unique_ptr<Communicator>> comms;
    for (int r = 0; r < 3; ++r) comms.push_back(rendezvous.Join("k", r, 3));
    RunRankThreads(3, kWatchdog, [&](int r) {
      for (int i = 0; i < 50; ++i) {
        std::vector<int32_t> send(3 * 64, r), recv(3 * 64, -1);
        if (r == 1 && i == round) comms[r]->Abort();
        if (!comms[r]->AllToAll(send.data(), recv.data(), 64 * sizeof(int32_t)).ok()) return;
      }
    });
    for (auto& c : comms) EXPECT_TRUE(c->broken());
  }
}

TEST(LocalRendezvousTest, RanksOfOneKeyShareAGroupAndOtherKeysDoNot) {
  LocalRendezvous rendezvous(milliseconds(5000));
  auto a0 = rendezvous.Join("epoch-2", 0, 2), a1 = rendezvous.Join("epoch-2", 1, 2);
  auto b0 = rendezvous.Join("epoch-3", 0, 2), b1 = rendezvous.Join("epoch-3", 1, 2);
  a0->Abort();  // breaks epoch-2 only
  EXPECT_TRUE(a1->broken());
  EXPECT_FALSE(b0->broken());
  int32_t v[2] = {0, 0};
  std::thread t([&] { EXPECT_TRUE(b1->Broadcast(&v[1], sizeof(int32_t), 0).ok()); });
  v[0] = 7;
  EXPECT_TRUE(b0->Broadcast(&v[0], sizeof(int32_t), 0).ok());
  t.join();
  EXPECT_EQ(v[1], 7);
}

TEST(LocalCommunicatorTest, MismatchedCountsAreInvalidArgumentAndBreakTheGroup) {
  LocalCommunicatorGroup group(2, milliseconds(2000));
  std::vector<absl::Status> status(2);
  RunRankThreads(2, kWatchdog, [&](int r) {
    std::vector<int64_t> sc = {4, 4}, so = {0, 4}, rc = {4, 4}, ro = {0, 4};
    if (r == 1) rc[0] = 3;  // rank 0 sends 4
    std::vector<char> send(8, 'x'), recv(8);
    status[r] = group.comm(r)->AllToAllV(send.data(), sc, so, recv.data(), rc, ro);
  });
  EXPECT_TRUE(status[0].ok() || status[0].code() == absl::StatusCode::kUnavailable) << status[0];
  EXPECT_EQ(status[1].code(), absl::StatusCode::kInvalidArgument) << status[1];
  EXPECT_TRUE(group.broken());
}

TEST(LocalCommunicatorTest, WrongSpanSizeIsInvalidArgument) {
  LocalCommunicatorGroup group(1, milliseconds(1000));
  std::vector<int64_t> two = {0, 0}, one = {0};
  char b = 0;
  EXPECT_EQ(group.comm(0)->AllToAllV(&b, two, one, &b, one, one).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FaultyCommunicatorTest, FailingTheNthCallMakesEveryRankUnavailable) {
  const int n = 3;
  LocalCommunicatorGroup group(n, milliseconds(300));
  FaultyCommunicator faulty(group.comm(1), {.fault_call = 2, .fault = FaultyCommunicator::Fault::kFail});
  std::vector<std::vector<absl::Status>> status(n);
  RunRankThreads(n, kWatchdog, [&](int r) {
    Communicator* c = r == 1 ? static_cast<Communicator*>(&faulty) : group.comm(r);
    for (int i = 0; i < 4; ++i) status[r].push_back(c->Barrier());
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_TRUE(status[r][0].ok());
    EXPECT_TRUE(status[r][1].ok());
    EXPECT_EQ(status[r][2].code(), absl::StatusCode::kUnavailable) << "rank " << r;
    EXPECT_EQ(status[r][3].code(), absl::StatusCode::kUnavailable) << "rank " << r;
  }
  EXPECT_NE(status[1][2].message().find("injected"), absl::string_view::npos);
  EXPECT_EQ(faulty.calls(), 3);  // the call after the failure never reached the counter
}

TEST(FaultyCommunicatorTest, StallLongerThanTimeoutGivesUnavailableAndShorterStallDoesNot) {
  const int n = 2;
  {
    LocalCommunicatorGroup group(n, milliseconds(1000));
    FaultyCommunicator slow(group.comm(0), {.fault_call = 0,
                                            .fault = FaultyCommunicator::Fault::kStall,
                                            .stall = milliseconds(100)});
    std::vector<absl::Status> status(n);
    RunRankThreads(n, kWatchdog, [&](int r) {
      status[r] = r == 0 ? slow.Barrier() : group.comm(r)->Barrier();
    });
    EXPECT_TRUE(status[0].ok()) << status[0];
    EXPECT_TRUE(status[1].ok()) << status[1];
  }
  {
    LocalCommunicatorGroup group(n, milliseconds(200));
    FaultyCommunicator stuck(group.comm(0), {.fault_call = 0,
                                             .fault = FaultyCommunicator::Fault::kStall,
                                             .stall = milliseconds(600)});
    std::vector<absl::Status> status(n);
    RunRankThreads(n, kWatchdog, [&](int r) {
      status[r] = r == 0 ? stuck.Barrier() : group.comm(r)->Barrier();
    });
    EXPECT_EQ(status[1].code(), absl::StatusCode::kUnavailable) << status[1];
    EXPECT_EQ(status[0].code(), absl::StatusCode::kUnavailable) << status[0];
  }
}

}  // namespace
}  // namespace sy::parallel
