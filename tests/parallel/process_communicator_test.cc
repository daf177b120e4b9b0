// The process engines, TcpCommunicator and GlooCommunicator, each run the same tests: ranks
// as separate PROCESSES (fork) over TCP on 127.0.0.1, rendezvous through a
// FileRendezvousStore in a fresh directory. Collectives and expert dispatch against plain
// references with 2, 3 and 4 processes; a killed or stuck peer gives UNAVAILABLE within the
// timeout on the others; Abort from another thread ends a waiting collective at once. For
// tcp also: a stranger connecting to a rank's port is dropped without harm, and ranks that
// call different collectives get an error, not a hang. A watchdog kills the children if
// anything hangs.
#include "parallel/gloo_communicator.h"
#include "parallel/tcp_communicator.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>
#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
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

absl::StatusOr<std::unique_ptr<Communicator>> Create(const std::string& engine, int rank, int n,
                                                     RendezvousStore* store, milliseconds timeout) {
  if (engine == "tcp")
    return CreateTcpCommunicator(
        {.rank = rank, .world_size = n, .store = store, .prefix = "test", .timeout = timeout});
  return CreateGlooCommunicator(
      {.rank = rank, .world_size = n, .store = store, .prefix = "test", .timeout = timeout});
}

std::unique_ptr<Communicator> Connect(const std::string& engine, const std::string& dir, int rank,
                                      int n, milliseconds timeout) {
  FileRendezvousStore store(dir);
  auto c = Create(engine, rank, n, &store, timeout);
  if (!c.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, std::string(c.status().message()).c_str());
    return nullptr;
  }
  return std::move(*c);
}

uint8_t MessageByte(int from, int to, int64_t b) {
  return static_cast<uint8_t>(from * 31 + to * 7 + b * 13 + 1);
}

struct Case {
  std::string engine;
  int ranks = 2;
};

class ProcessesTest : public ::testing::TestWithParam<Case> {};

TEST_P(ProcessesTest, AllToAllVAndOtherCollectivesMatchReferences) {
  const int n = GetParam().ranks;
  const std::string engine = GetParam().engine;
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(engine, dir.path(), r, n, milliseconds(10000));
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
      // The same bytes with sizes only the senders know: back to back in rank order.
      std::vector<char> dyn(3, 'z');
      std::vector<int64_t> dcnt, doff;
      CHILD_EXPECT(r, c->AllToAllVDynamic(send.data(), sc, so, &dyn, &dcnt, &doff).ok());
      int64_t at = 0;
      for (int p = 0; p < n; ++p) {
        CHILD_EXPECT(r, dcnt[p] == rcnt[p] && doff[p] == at);
        for (int64_t b = 0; b < rcnt[p]; ++b)
          CHILD_EXPECT(r, static_cast<uint8_t>(dyn[at + b]) == MessageByte(p, r, b));
        at += rcnt[p];
      }
      // Started, with work before Wait: the same bytes once Wait returns.
      std::vector<char> dyn2;
      std::vector<int64_t> dcnt2, doff2;
      std::unique_ptr<PendingAllToAllV> dyn_pending =
          c->StartAllToAllVDynamic(send.data(), sc, so, &dyn2, &dcnt2, &doff2);
      std::this_thread::sleep_for(milliseconds(3 * (n - r)));
      CHILD_EXPECT(r, dyn_pending->Wait().ok());
      CHILD_EXPECT(r, dcnt2 == dcnt && doff2 == doff);
      CHILD_EXPECT(r, std::equal(dyn.begin(), dyn.begin() + at, dyn2.begin()));
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

TEST_P(ProcessesTest, ExpertDispatchMatchesTheReference) {
  const int n = GetParam().ranks;
  const std::string engine = GetParam().engine;
  TempDir dir;
  const int E = 8;
  const int64_t H = 24, K = 2;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(engine, dir.path(), r, n, milliseconds(10000));
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

INSTANTIATE_TEST_SUITE_P(Processes, ProcessesTest,
                         ::testing::Values(Case{"tcp", 2}, Case{"tcp", 3}, Case{"tcp", 4},
                                           Case{"gloo", 2}, Case{"gloo", 3}, Case{"gloo", 4}),
                         [](const auto& info) {
                           return info.param.engine + std::to_string(info.param.ranks);
                         });

class EngineTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineTest, KilledPeerGivesUnavailableWithinTheTimeoutAndLaterCallsFailFast) {
  const std::string engine = GetParam();
  const int n = 3;
  const milliseconds timeout(3000);
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(engine, dir.path(), r, n, timeout);
    CHILD_EXPECT(r, c != nullptr);
    CHILD_EXPECT(r, c->Barrier().ok());
    // The survivors write to a dead socket; that must break the group, not raise SIGPIPE.
    struct sigaction pipe_action {};
    CHILD_EXPECT(r, sigaction(SIGPIPE, nullptr, &pipe_action) == 0);
    if (engine == "gloo") CHILD_EXPECT(r, pipe_action.sa_handler == SIG_IGN);
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

TEST_P(EngineTest, StuckPeerGivesUnavailableAfterTheTimeout) {
  const std::string engine = GetParam();
  const int n = 2;
  const milliseconds timeout(800);
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(engine, dir.path(), r, n, timeout);
    CHILD_EXPECT(r, c != nullptr);
    CHILD_EXPECT(r, c->Barrier().ok());
    if (r == 1) std::this_thread::sleep_for(milliseconds(2500));  // stuck past the timeout
    auto t0 = std::chrono::steady_clock::now();
    absl::Status s = c->Barrier();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "rank %d: %.3f s: %s\n", r, secs, s.ToString().c_str());
    // The stuck rank finds its peer gone (connections closed) or times out itself; with eager
    // sends (tcp) its barrier may still complete from bytes that arrived before the peer gave
    // up, and then its next call fails.
    if (r == 1 && s.ok()) s = c->Barrier();
    CHILD_EXPECT(r, s.code() == absl::StatusCode::kUnavailable);
    if (r == 0) CHILD_EXPECT(r, secs > 0.6 && secs < 5.0);  // slack for loaded CI machines
    return 0;
  });
  EXPECT_EQ(rc[0], 0);
  EXPECT_EQ(rc[1], 0);
}

TEST_P(EngineTest, StartedExchangeWithAStuckPeerGivesUnavailableFromWait) {
  const std::string engine = GetParam();
  const int n = 2;
  const milliseconds timeout(800);
  TempDir dir;
  std::vector<int> rc = RunRankProcesses(n, kWatchdog, [&](int r) -> int {
    auto c = Connect(engine, dir.path(), r, n, timeout);
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
    if (r == 1 && s.ok()) s = c->Barrier();  // as above: the next call fails
    CHILD_EXPECT(r, s.code() == absl::StatusCode::kUnavailable);
    if (r == 0) CHILD_EXPECT(r, secs > 0.6 && secs < 5.0);
    CHILD_EXPECT(r, c->broken());
    return 0;
  });
  EXPECT_EQ(rc[0], 0);
  EXPECT_EQ(rc[1], 0);
}

TEST_P(EngineTest, RendezvousWithAMissingPeerGivesUnavailableWithinTheTimeout) {
  const std::string engine = GetParam();
  TempDir dir;
  FileRendezvousStore store(dir.path());
  auto t0 = std::chrono::steady_clock::now();
  auto c = Create(engine, 0, 2, &store, milliseconds(500));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
  EXPECT_LT(secs, 3.0);
}

// Abort from another thread (the membership's heartbeat thread does it when the group
// re-forms) wakes a collective that waits for a silent peer, long before the time-out; later
// calls fail at once. Two ranks as threads of this process, through the engine's factory.
TEST_P(EngineTest, AbortFromAnotherThreadEndsAWaitingCollectiveAtOnce) {
  const std::string engine = GetParam();
  MemoryRendezvousStore store;
  auto factory = [&](const std::string& prefix, int rank, int n) {
    return Create(engine, rank, n, &store, milliseconds(20000));
  };
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

TEST_P(EngineTest, OneRankNeedsNoPeers) {
  const std::string engine = GetParam();
  TempDir dir;
  FileRendezvousStore store(dir.path());
  auto c = Create(engine, 0, 1, &store, milliseconds(30000));
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<int64_t> cnt = {5}, off = {0};
  char send[5] = {1, 2, 3, 4, 5}, recv[5] = {};
  ASSERT_TRUE((*c)->AllToAllV(send, cnt, off, recv, cnt, off).ok());
  EXPECT_EQ(std::string(recv, 5), std::string(send, 5));
}

INSTANTIATE_TEST_SUITE_P(Engines, EngineTest, ::testing::Values("tcp", "gloo"),
                         [](const auto& info) { return info.param; });

// A process that connects to a rank's port without the rank's token (a port scanner, a rank
// of another group) is dropped; the group still forms and works.
TEST(TcpCommunicatorTest, AStrangerOnTheRankPortIsDroppedAndTheGroupForms) {
  MemoryRendezvousStore store;
  absl::StatusOr<std::unique_ptr<Communicator>> c0 = absl::UnknownError("");
  std::thread rank0([&] { c0 = Create("tcp", 0, 2, &store, milliseconds(10000)); });
  auto addr = store.Get("test/addr/0", milliseconds(5000));
  ASSERT_TRUE(addr.ok()) << addr.status();
  // The stranger: rank 1's hello with a wrong token, then a silent connection.
  const std::vector<std::string> f = absl::StrSplit(*addr, ' ');
  ASSERT_EQ(f.size(), 3u);
  for (int i = 0; i < 2; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(std::stoi(f[1])));
    inet_pton(AF_INET, f[0].c_str(), &a.sin_addr);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    if (i == 0) {
      char hello[48] = {'S', 'Y', 'T', 'C', 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0};
      std::memset(hello + 16, 'x', 32);
      ASSERT_EQ(send(fd, hello, sizeof(hello), 0), static_cast<ssize_t>(sizeof(hello)));
    } else {
      ASSERT_EQ(send(fd, "GET / HTTP/1.0\r\n\r\n", 18, 0), 18);
    }
    close(fd);
  }
  auto c1 = Create("tcp", 1, 2, &store, milliseconds(10000));
  rank0.join();
  ASSERT_TRUE(c0.ok()) << c0.status();
  ASSERT_TRUE(c1.ok()) << c1.status();
  int64_t v = 0, w = 42;
  std::thread t([&] { EXPECT_TRUE((*c1)->Broadcast(&w, sizeof(w), 1).ok()); });
  EXPECT_TRUE((*c0)->Broadcast(&v, sizeof(v), 1).ok());
  t.join();
  EXPECT_EQ(v, 42);
}

// Ranks that disagree on a size (a bug in the caller) get INTERNAL at once, not a hang.
TEST(TcpCommunicatorTest, MismatchedCollectivesFailInsteadOfHanging) {
  MemoryRendezvousStore store;
  absl::StatusOr<std::unique_ptr<Communicator>> c1 = absl::UnknownError("");
  std::thread peer([&] { c1 = Create("tcp", 1, 2, &store, milliseconds(10000)); });
  auto c0 = Create("tcp", 0, 2, &store, milliseconds(10000));
  peer.join();
  ASSERT_TRUE(c0.ok() && c1.ok());
  char b0[16] = {}, b1[16] = {};
  absl::Status s1;
  std::thread t([&] { s1 = (*c1)->Broadcast(b1, 8, 0); });
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s0 = (*c0)->Broadcast(b0, 16, 0);  // rank 1 expects 8 bytes
  t.join();
  EXPECT_TRUE(s0.ok() || s0.code() == absl::StatusCode::kUnavailable) << s0;
  EXPECT_EQ(s1.code(), absl::StatusCode::kInternal) << s1;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(5000));
  EXPECT_TRUE((*c1)->broken());
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
