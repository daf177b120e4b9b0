// GlooCommunicator: ranks as separate PROCESSES (fork) over TCP on 127.0.0.1, rendezvous
// through a FileRendezvousStore in a fresh directory. Collectives and expert dispatch against
// plain references with 2, 3 and 4 processes; a killed or stuck peer gives UNAVAILABLE
// within the timeout on the others. A watchdog kills the children if anything hangs.
#include "parallel/gloo_communicator.h"

#include <signal.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "parallel/ep_dispatch.h"
#include "tests/parallel/multi_rank_testing.h"

namespace sy::parallel {
namespace {

using std::chrono::milliseconds;
using testing::RunRankProcesses;

constexpr milliseconds kWatchdog{60000};

// In a child: print what failed and exit non-zero.
#define CHILD_EXPECT(rank, cond)                                                      \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "rank %d: %s:%d: expected %s\n", rank, __FILE__, __LINE__, \
                   #cond);                                                            \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/sy-gloo-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::unique_ptr<Communicator> Connect(const std::string& dir, int rank, int n,
                                      milliseconds timeout) {
  FileRendezvousStore store(dir);
  auto c = CreateGlooCommunicator(
      {.rank = rank, .world_size = n, .store = &store, .prefix = "test", .timeout = timeout});
  if (!c.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, std::string(c.status().message()).c_str());
    return nullptr;
  }
  return std::move(*c);
}

uint8_t MessageByte(int from, int to, int64_t b) {
  return static_cast<uint8_t>(from * 31 + to * 7 + b * 13 + 1);
}

class GlooProcessesTest : public ::testing::TestWithParam<int> {};

TEST_P(GlooProcessesTest, AllToAllVAndOtherCollectivesMatchReferences) {
  const int n = GetParam();
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(dir.path(), r, n, milliseconds(10000));
    CHILD_EXPECT(r, c != nullptr);
    CHILD_EXPECT(r, c->rank() == r && c->world_size() == n);
    for (int round = 0; round < 3; ++round) {
      // Sizes vary by round, include zeros, and one large (multi-MiB) message.
      std::vector<int64_t> sc(n), so(n), rcnt(n), ro(n);
      auto size = [&](int from, int to) -> int64_t {
        if ((from + to + round) % 3 == 0) return 0;
        return round == 2 && from == 0 ? (3 << 20) + to : 100 * (from + 1) + to + round;
      };
      int64_t st = 0, rt = 16;
      for (int p = 0; p < n; ++p) {
        sc[p] = size(r, p);
        so[p] = st;
        st += sc[p] + 3;
        rcnt[p] = size(p, r);
        ro[p] = rt;
        rt += rcnt[p] + 1;
      }
      std::vector<uint8_t> send(st), recv(rt, 0xAA), expected(rt, 0xAA);
      for (int p = 0; p < n; ++p)
        for (int64_t b = 0; b < sc[p]; ++b) send[so[p] + b] = MessageByte(r, p, b);
      for (int p = 0; p < n; ++p)
        for (int64_t b = 0; b < rcnt[p]; ++b) expected[ro[p] + b] = MessageByte(p, r, b);
      absl::Status s = c->AllToAllV(send.data(), sc, so, recv.data(), rcnt, ro);
      CHILD_EXPECT(r, s.ok());
      CHILD_EXPECT(r, recv == expected);
      // The same exchange started, with work (a sleep, later for higher ranks) before Wait.
      std::fill(recv.begin(), recv.end(), 0xAA);
      std::unique_ptr<PendingAllToAllV> pending =
          c->StartAllToAllV(send.data(), sc, so, recv.data(), rcnt, ro);
      std::this_thread::sleep_for(milliseconds(3 * r));
      CHILD_EXPECT(r, pending->Wait().ok());
      CHILD_EXPECT(r, recv == expected);
    }
    std::vector<int32_t> all(n, -1);
    int32_t mine = 500 + r;
    CHILD_EXPECT(r, c->AllGather(&mine, sizeof(mine), all.data()).ok());
    for (int p = 0; p < n; ++p) CHILD_EXPECT(r, all[p] == 500 + p);
    std::vector<int64_t> buf(4, r == 1 ? 99 : -1);
    CHILD_EXPECT(r, c->Broadcast(buf.data(), buf.size() * 8, 1).ok());
    CHILD_EXPECT(r, buf == std::vector<int64_t>(4, 99));
    CHILD_EXPECT(r, c->Barrier().ok());
    return 0;
  });
  for (int r = 0; r < n; ++r) EXPECT_EQ(rc[r], 0) << "rank " << r;
}

TEST_P(GlooProcessesTest, ExpertDispatchMatchesTheReference) {
  const int n = GetParam();
  TempDir dir;
  const int E = 8;
  const int64_t H = 24, K = 2;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(dir.path(), r, n, milliseconds(10000));
    CHILD_EXPECT(r, c != nullptr);
    auto placement =
        std::make_shared<const ExpertPlacement>(ExpertPlacement::Contiguous(2, E, n));
    auto d = MakeExpertParallelDispatcher(c.get(), placement, {});
    CHILD_EXPECT(r, d.ok());
    for (int layer = 0; layer < 2; ++layer) {
      // Rank 1 has no tokens in layer 0; tokens are skewed towards experts 0..2.
      const int64_t T = (layer == 0 && r == 1) ? 0 : 13 + 5 * r;
      std::vector<float> x(T * H);
      std::vector<int32_t> ids(T * K);
      std::vector<float> w(T * K);
      for (int64_t i = 0; i < T * H; ++i) x[i] = std::sin(0.37f * i + r + layer);
      for (int64_t t = 0; t < T; ++t) {
        ids[t * K] = static_cast<int32_t>((t + r) % 3);
        ids[t * K + 1] = static_cast<int32_t>(3 + (t * 7 + layer) % (E - 3));
        w[t * K] = 0.25f + 0.5f * ((t % 4) / 4.f);
        w[t * K + 1] = 1.f - w[t * K];
      }
      std::vector<float> out(T * H);
      ExpertParallelDispatcher* disp = d->get();
      auto compute = [&](int l, const float* rows, const int64_t* off, float* y) {
        for (int64_t s = 0; s < disp->num_local_slots(l); ++s)
          for (int64_t i = off[s]; i < off[s + 1]; ++i)
            testing::ExpertFn(l, disp->local_slot_expert(l, s), rows + i * H, H, y + i * H);
      };
      CHILD_EXPECT(r, disp->DispatchCombine(layer, x.data(), T, H, ids.data(), w.data(), K,
                                            compute, out.data())
                          .ok());
      std::vector<float> want = testing::ReferenceMoe(layer, x, H, ids, w, K);
      for (int64_t i = 0; i < T * H; ++i) CHILD_EXPECT(r, std::abs(out[i] - want[i]) < 1e-5f);
    }
    CHILD_EXPECT(r, (*d)->stats().calls == 2);
    return 0;
  });
  for (int r = 0; r < n; ++r) EXPECT_EQ(rc[r], 0) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Processes, GlooProcessesTest, ::testing::Values(2, 3, 4));

TEST(GlooCommunicatorTest, KilledPeerGivesUnavailableWithinTheTimeoutAndLaterCallsFailFast) {
  const int n = 3;
  const milliseconds timeout(3000);
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(dir.path(), r, n, timeout);
    CHILD_EXPECT(r, c != nullptr);
    CHILD_EXPECT(r, c->Barrier().ok());
    if (r == 2) raise(SIGKILL);  // dies without closing anything itself
    std::this_thread::sleep_for(milliseconds(100));
    std::vector<int64_t> counts(n, 64), offsets(n);
    for (int p = 0; p < n; ++p) offsets[p] = 64 * p;
    std::vector<char> send(64 * n, 'a'), recv(64 * n);
    auto t0 = std::chrono::steady_clock::now();
    absl::Status s = c->AllToAllV(send.data(), counts, offsets, recv.data(), counts, offsets);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "rank %d: %.3f s: %s\n", r, secs, s.ToString().c_str());
    CHILD_EXPECT(r, s.code() == absl::StatusCode::kUnavailable);
    CHILD_EXPECT(r, secs < 3.0 + 3.0);  // within the timeout, plus slack for loaded machines
    CHILD_EXPECT(r, c->broken());
    t0 = std::chrono::steady_clock::now();
    CHILD_EXPECT(r, c->Barrier().code() == absl::StatusCode::kUnavailable);
    CHILD_EXPECT(r, std::chrono::steady_clock::now() - t0 < milliseconds(100));
    return 0;
  });
  EXPECT_EQ(rc[0], 0);
  EXPECT_EQ(rc[1], 0);
  EXPECT_EQ(rc[2], -SIGKILL);
}

TEST(GlooCommunicatorTest, StuckPeerGivesUnavailableAfterTheTimeout) {
  const int n = 2;
  const milliseconds timeout(800);
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(dir.path(), r, n, timeout);
    CHILD_EXPECT(r, c != nullptr);
    CHILD_EXPECT(r, c->Barrier().ok());
    if (r == 1) std::this_thread::sleep_for(milliseconds(2500));  // stuck past the timeout
    auto t0 = std::chrono::steady_clock::now();
    absl::Status s = c->Barrier();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "rank %d: %.3f s: %s\n", r, secs, s.ToString().c_str());
    // The stuck rank finds its peer gone (connections closed) or times out itself.
    CHILD_EXPECT(r, s.code() == absl::StatusCode::kUnavailable);
    if (r == 0) CHILD_EXPECT(r, secs > 0.6 && secs < 5.0);  // slack for loaded CI machines
    return 0;
  });
  EXPECT_EQ(rc[0], 0);
  EXPECT_EQ(rc[1], 0);
}

TEST(GlooCommunicatorTest, StartedExchangeWithAStuckPeerGivesUnavailableFromWait) {
  const int n = 2;
  const milliseconds timeout(800);
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(dir.path(), r, n, timeout);
    CHILD_EXPECT(r, c != nullptr);
    CHILD_EXPECT(r, c->Barrier().ok());
    if (r == 1) std::this_thread::sleep_for(milliseconds(2500));  // stuck past the timeout
    std::vector<int64_t> counts(n, 4), offsets = {0, 4};
    std::vector<uint8_t> send(8, 1), recv(8, 0);
    std::unique_ptr<PendingAllToAllV> pending =
        c->StartAllToAllV(send.data(), counts, offsets, recv.data(), counts, offsets);
    auto t0 = std::chrono::steady_clock::now();
    absl::Status s = pending->Wait();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "rank %d: %.3f s: %s\n", r, secs, s.ToString().c_str());
    CHILD_EXPECT(r, s.code() == absl::StatusCode::kUnavailable);
    if (r == 0) CHILD_EXPECT(r, secs > 0.6 && secs < 5.0);
    CHILD_EXPECT(r, c->broken());
    return 0;
  });
  EXPECT_EQ(rc[0], 0);
  EXPECT_EQ(rc[1], 0);
}

TEST(GlooCommunicatorTest, RendezvousWithAMissingPeerGivesUnavailableWithinTheTimeout) {
  TempDir dir;
  FileRendezvousStore store(dir.path());
  auto t0 = std::chrono::steady_clock::now();
  auto c = CreateGlooCommunicator(
      {.rank = 0, .world_size = 2, .store = &store, .timeout = milliseconds(500)});
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
  EXPECT_LT(secs, 3.0);
}

// Abort from another thread (the membership's heartbeat thread does it when the group
// re-forms) wakes a collective that waits for a silent peer, long before the time-out; later
// calls fail at once. Two ranks as threads of this process, through a GlooCommunicatorFactory.
TEST(GlooCommunicatorTest, AbortFromAnotherThreadEndsAWaitingCollectiveAtOnce) {
  MemoryRendezvousStore store;
  GlooOptions base;
  base.store = &store;
  base.timeout = milliseconds(20000);
  auto factory = GlooCommunicatorFactory(base);
  absl::StatusOr<std::unique_ptr<Communicator>> c1 = absl::UnknownError("");
  std::thread peer([&] { c1 = factory("abort-test", 1, 2); });
  auto c0 = factory("abort-test", 0, 2);
  peer.join();
  ASSERT_TRUE(c0.ok()) << c0.status();
  ASSERT_TRUE(c1.ok()) << c1.status();
  // Rank 1 stays silent; rank 0 waits in a broadcast from rank 1.
  std::thread aborter([&] {
    std::this_thread::sleep_for(milliseconds(200));
    (*c0)->Abort();
  });
  int64_t v = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = (*c0)->Broadcast(&v, sizeof(v), 1);
  const auto waited = std::chrono::steady_clock::now() - t0;
  aborter.join();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_LT(waited, milliseconds(5000));
  EXPECT_TRUE((*c0)->broken());
  EXPECT_EQ((*c0)->Barrier().code(), absl::StatusCode::kUnavailable);
  (*c0)->Abort();  // idempotent
}

TEST(GlooCommunicatorTest, OneRankNeedsNoPeers) {
  TempDir dir;
  FileRendezvousStore store(dir.path());
  auto c = CreateGlooCommunicator({.rank = 0, .world_size = 1, .store = &store});
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<int64_t> cnt = {5}, off = {0};
  char send[5] = {1, 2, 3, 4, 5}, recv[5] = {};
  ASSERT_TRUE((*c)->AllToAllV(send, cnt, off, recv, cnt, off).ok());
  EXPECT_EQ(std::string(recv, 5), std::string(send, 5));
}

TEST(FileRendezvousStoreTest, GetWaitsForSetAndTimesOutOtherwise) {
  TempDir dir;
  FileRendezvousStore store(dir.path());
  EXPECT_EQ(store.Get("a/b", milliseconds(50)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(50));
    ASSERT_TRUE(store.Set("a/b", std::string("x\0y", 3)).ok());
  });
  auto v = store.Get("a/b", milliseconds(5000));
  setter.join();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, std::string("x\0y", 3));
}

}  // namespace
}  // namespace sy::parallel
