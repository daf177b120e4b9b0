// Multi-rank serving end to end, through the public gRPC API (issue 4):
//   * ranks as threads (`serve --local-ranks N`, an in-process Daemon) and as processes (the
//     built `switchyard serve --min-ranks N` plus N-1 `switchyard worker --join` on
//     127.0.0.1, OS-picked ports) give the same greedy tokens as one rank (the plain
//     single-sequence reference), on the tiny and the demo model, also when sequences are
//     preempted and recomputed;
//   * a worker killed with SIGKILL mid-generation ends the in-flight request with UNAVAILABLE
//     within the collective time-out; health turns NOT_SERVING; the leader stays up and
//     answers (UNAVAILABLE) at once;
//   * a join with the wrong secret is refused (PERMISSION_DENIED, worker exit status 3) and
//     takes no rank, as does one with another model (FAILED_PRECONDITION); a join past the
//     group size gets RESOURCE_EXHAUSTED; SIGTERM while waiting for ranks exits promptly.
// Child processes are killed by the fixtures; a watchdog aborts a hung test.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kernels/core/logging.h"
#include "server/cluster_service.h"
#include "server/daemon.h"
#include "switchyard/v1/cluster.grpc.pb.h"
#include "switchyard/v1/inference.grpc.pb.h"
#include "tests/testing/model_fixtures.h"
#include "tests/testing/child_process.h"
#include "tests/testing/watchdog.h"

namespace sy::server {
namespace {

namespace v1 = ::switchyard::v1;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kSecret[] = "test-secret-7f3a";
constexpr int64_t kKvBytes = 2 << 20;  // small: every rank allocates the leader's block count

using sy::testing::Watchdog;

using sy::testing::ReadFile;
using Child = sy::testing::ChildProcess;

int PortAfterColon(const std::string& s) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos) return 0;
  return std::atoi(s.c_str() + colon + 1);
}

struct GenResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
};

// Greedy Generate over the public API; `on_first_chunk` runs after the first streamed chunk.
GenResult Generate(const std::string& addr, const std::vector<int32_t>& prompt, int max_new,
                   const std::function<void()>& on_first_chunk = nullptr,
                   seconds deadline = seconds(60)) {
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + deadline);
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_new_tokens(max_new);
  req.mutable_sampling()->set_ignore_eos(true);
  auto reader = stub->Generate(&ctx, req);
  GenResult r;
  v1::GenerateResponse resp;
  bool first = true;
  while (reader->Read(&resp)) {
    if (resp.has_chunk() && first && on_first_chunk) {
      first = false;
      on_first_chunk();
    }
    if (resp.has_completion())
      r.tokens.assign(resp.completion().token_ids().begin(), resp.completion().token_ids().end());
  }
  r.status = reader->Finish();
  return r;
}

grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& addr) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(5));
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok()) return grpc::health::v1::HealthCheckResponse::UNKNOWN;
  return resp.status();
}

std::vector<std::vector<int32_t>> Prompts() {
  return {{1, 17, 42, 99, 5}, {300, 2}, {7, 7, 7, 7, 7, 7, 7, 11}, {450}, {23, 64, 128}};
}

// The plain reference: one rank, the whole model, one sequence at a time.
std::vector<std::vector<int32_t>> Reference(const std::string& dir, int max_new) {
  auto m = model::MoeModel::Load(dir);
  SY_CHECK(m.ok()) << m.status();
  std::vector<std::vector<int32_t>> out;
  for (const auto& p : Prompts()) out.push_back(sy::testing::GreedyGenerate(**m, p, max_new));
  return out;
}

// All prompts at once (so they share steps and spread over home ranks).
std::vector<GenResult> GenerateAll(const std::string& addr, int max_new) {
  std::vector<GenResult> results(Prompts().size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < Prompts().size(); ++i)
    threads.emplace_back([&, i] { results[i] = Generate(addr, Prompts()[i], max_new); });
  for (auto& t : threads) t.join();
  return results;
}

std::string TinyDir() {
  return sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
}

// ---- ranks as threads: an in-process Daemon with --local-ranks ----------------------------

struct LocalCase {
  std::string preset;
  int ranks;
};

class ClusterThreadsTest : public ::testing::TestWithParam<LocalCase> {};

TEST_P(ClusterThreadsTest, LocalRanksGiveTheGreedyTokensOfOneRank) {
  Watchdog dog(seconds(120));
  const LocalCase c = GetParam();
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, c.preset, DType::kF32);
  const int max_new = 6;
  const auto want = Reference(dir, max_new);
  ServeOptions o;
  o.model = dir;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = -1;
  o.kv_cache_bytes = kKvBytes * 4;
  o.cluster.local_ranks = c.ranks;
  o.cluster.collective_timeout_ms = 10000;
  auto d = Daemon::Start(o);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_TRUE((*d)->Load().ok());
  const std::string addr = absl::StrCat("127.0.0.1:", (*d)->port());
  EXPECT_EQ(Health(addr), grpc::health::v1::HealthCheckResponse::SERVING);
  const auto got = GenerateAll(addr, max_new);
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i;
  }
  const std::string metrics = (*d)->metrics().Scrape();
  if (c.ranks > 1) {
    EXPECT_NE(metrics.find(absl::StrCat("switchyard_ep_world_size ", c.ranks)), std::string::npos);
    EXPECT_NE(metrics.find("switchyard_rank_up{rank=\"1\"} 1"), std::string::npos);
    EXPECT_NE(metrics.find("switchyard_ep_dispatch_bytes_total{phase=\"dispatch\"}"), std::string::npos);
  }
  (*d)->Drain();
}

INSTANTIATE_TEST_SUITE_P(Cluster, ClusterThreadsTest,
                         ::testing::Values(LocalCase{"tiny", 1}, LocalCase{"tiny", 2},
                                           LocalCase{"tiny", 3}, LocalCase{"tiny", 4},
                                           LocalCase{"demo", 1}, LocalCase{"demo", 2},
                                           LocalCase{"demo", 4}),
                         [](const auto& info) {
                           return absl::StrCat(info.param.preset, "_", info.param.ranks, "ranks");
                         });

TEST(ClusterThreadsPreemptionTest, PreemptedSequencesAreRecomputedOnANewHomeRank) {
  Watchdog dog(seconds(120));
  const std::string dir = TinyDir();
  const int max_new = 40;
  const auto want = Reference(dir, max_new);
  ServeOptions o;
  o.model = dir;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = -1;
  // Each rank's pool holds 4 blocks of 16 positions, 12 in the group, for 5 sequences that
  // need 3 each: the scheduler must preempt.
  o.kv_cache_bytes = 4 * model::KvCache::BytesPerBlock(*model::ModelConfig::FromFile(dir + "/config.json"), 16);
  o.cluster.local_ranks = 3;
  o.cluster.collective_timeout_ms = 10000;
  auto d = Daemon::Start(o);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_TRUE((*d)->Load().ok());
  const auto got = GenerateAll(absl::StrCat("127.0.0.1:", (*d)->port()), max_new);
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i;
  }
  EXPECT_GT((*d)->engine()->stats().preemptions, 0);
  (*d)->Drain();
}

// ---- ranks as processes over Gloo (one rank: the threads case with 1 rank, same path) -------------------------------------------------------

// A leader (`serve --min-ranks N`) and its workers, all on 127.0.0.1.
class ProcessGroup {
 public:
  ProcessGroup(const std::string& model_dir, int ranks, int64_t collective_timeout_ms = 20000)
      : tmp_(sy::testing::MakeTempDir("cluster")), model_dir_(model_dir) {
    leader_ = std::make_unique<Child>(
        tmp_, "leader",
        std::vector<std::string>{"serve", "--model", model_dir, "--host", "127.0.0.1", "--port", "0",
                                 "--metrics-port", "-1", "--min-ranks", absl::StrCat(ranks),
                                 "--cluster-port", "0", "--secret", kSecret,
                                 "--kv-cache-bytes", absl::StrCat(kKvBytes),
                                 "--collective-timeout-ms", absl::StrCat(collective_timeout_ms),
                                 "--rank-wait-timeout", "60"});
    cluster_port_ = PortAfterColon(leader_->WaitForLine("cluster service on ", milliseconds(30000)));
    port_ = PortAfterColon(leader_->WaitForLine("listening on ", milliseconds(1000)));
  }
  Child* AddWorker(const std::string& secret = kSecret) {
    workers_.push_back(std::make_unique<Child>(
        tmp_, absl::StrCat("worker", workers_.size()),
        std::vector<std::string>{"worker", "--join", absl::StrCat("127.0.0.1:", cluster_port_),
                                 "--secret", secret, "--model", model_dir_, "--join-timeout", "20"}));
    return workers_.back().get();
  }
  bool WaitServing() { return !leader_->WaitForLine("serving on ", milliseconds(60000)).empty(); }
  std::string addr() const { return absl::StrCat("127.0.0.1:", port_); }
  int cluster_port() const { return cluster_port_; }
  Child& leader() { return *leader_; }
  std::string Logs() {
    std::string s = absl::StrCat("--- leader stderr:\n", leader_->err());
    for (size_t i = 0; i < workers_.size(); ++i)
      absl::StrAppend(&s, "--- worker ", i, " stderr:\n", workers_[i]->err());
    return s;
  }

 private:
  std::string tmp_, model_dir_;
  std::unique_ptr<Child> leader_;
  std::vector<std::unique_ptr<Child>> workers_;
  int cluster_port_ = 0, port_ = 0;
};

class ClusterProcessesTest : public ::testing::TestWithParam<LocalCase> {};

TEST_P(ClusterProcessesTest, WorkerProcessesGiveTheGreedyTokensOfOneRank) {
  Watchdog dog(seconds(120));
  const int ranks = GetParam().ranks;
  const int max_new = 8;
  const std::string dir =
      sy::testing::SyntheticModelDir(model::Arch::kMixtral, GetParam().preset, DType::kF32);
  const auto want = Reference(dir, max_new);
  ProcessGroup g(dir, ranks);
  ASSERT_GT(g.cluster_port(), 0) << g.Logs();
  for (int r = 1; r < ranks; ++r) g.AddWorker();
  ASSERT_TRUE(g.WaitServing()) << g.Logs();
  EXPECT_EQ(Health(g.addr()), grpc::health::v1::HealthCheckResponse::SERVING);
  const auto got = GenerateAll(g.addr(), max_new);
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << got[i].status.error_message() << g.Logs();
    EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Cluster, ClusterProcessesTest,
                         ::testing::Values(LocalCase{"tiny", 2}, LocalCase{"tiny", 3},
                                           LocalCase{"tiny", 4}, LocalCase{"demo", 3}),
                         [](const auto& info) {
                           return absl::StrCat(info.param.preset, "_", info.param.ranks, "processes");
                         });

TEST(ClusterFaultTest, KilledWorkerEndsInFlightRequestsWithUnavailableAndHealthNotServing) {
  Watchdog dog(seconds(120));
  constexpr int64_t kTimeoutMs = 3000;
  ProcessGroup g(TinyDir(), 2, kTimeoutMs);
  ASSERT_GT(g.cluster_port(), 0) << g.Logs();
  Child* worker = g.AddWorker();
  ASSERT_TRUE(g.WaitServing()) << g.Logs();
  std::chrono::steady_clock::time_point killed;
  // Long enough that it is still running when the worker dies.
  const GenResult r = Generate(g.addr(), {1, 2, 3}, 3500, [&] {
    worker->Kill();
    killed = std::chrono::steady_clock::now();
  });
  const auto ended = std::chrono::steady_clock::now();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_LT(ended - killed, milliseconds(kTimeoutMs + 5000));
  EXPECT_EQ(Health(g.addr()), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // The leader neither hangs nor crashes: it is alive and answers a new request at once.
  EXPECT_FALSE(g.leader().Exited()) << g.Logs();
  const auto t0 = std::chrono::steady_clock::now();
  const GenResult again = Generate(g.addr(), {4, 5}, 4);
  EXPECT_EQ(again.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, seconds(5));
  EXPECT_FALSE(g.leader().Exited()) << g.Logs();
}

TEST(ClusterJoinTest, WrongSecretIsRefusedAndTakesNoRank) {
  Watchdog dog(seconds(120));
  ProcessGroup g(TinyDir(), 2);
  ASSERT_GT(g.cluster_port(), 0) << g.Logs();
  Child* bad = g.AddWorker("not-the-secret");
  EXPECT_EQ(bad->WaitExit(milliseconds(30000)), 3) << g.Logs();
  EXPECT_NE(bad->err().find("PERMISSION_DENIED"), std::string::npos) << bad->err();
  // Direct calls with the wrong secret change nothing either.
  auto stub = v1::Cluster::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", g.cluster_port()), grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext ctx;
    v1::StoreSetRequest req;
    req.set_secret("guess");
    req.set_key("gloo/epoch-1/rank-1");
    v1::StoreSetReply reply;
    EXPECT_EQ(stub->StoreSet(&ctx, req, &reply).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  // Another model is refused too (the worker's config.json fingerprint), also taking no rank.
  v1::JoinRequest other;
  other.set_secret(kSecret);
  other.set_host("127.0.0.1");
  other.mutable_model()->set_model_type("mixtral");
  other.mutable_model()->set_num_layers(99);
  {
    grpc::ClientContext ctx;
    v1::JoinReply reply;
    EXPECT_EQ(stub->Join(&ctx, other, &reply).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  // The one free rank is still free: the right secret gets it and the group serves.
  g.AddWorker();
  ASSERT_TRUE(g.WaitServing()) << g.Logs();
  const GenResult r = Generate(g.addr(), Prompts()[0], 4);
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, Reference(TinyDir(), 4)[0]);
  // A join past the group size is refused.
  grpc::ClientContext ctx;
  v1::JoinRequest req;
  req.set_secret(kSecret);
  req.set_host("127.0.0.1");
  v1::JoinReply reply;
  auto m = model::ModelConfig::FromFile(TinyDir() + "/config.json");
  ASSERT_TRUE(m.ok());
  req.mutable_model()->set_model_type(m->model_type);
  req.mutable_model()->set_num_layers(m->num_layers);
  req.mutable_model()->set_hidden_size(m->hidden_size);
  req.mutable_model()->set_num_experts(m->num_experts);
  req.mutable_model()->set_vocab_size(m->vocab_size);
  EXPECT_EQ(stub->Join(&ctx, req, &reply).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST(ClusterJoinTest, SigtermWhileWaitingForRanksExitsPromptly) {
  Watchdog dog(seconds(120));
  ProcessGroup g(TinyDir(), 3);
  ASSERT_GT(g.cluster_port(), 0) << g.Logs();
  g.AddWorker();  // one of two: the leader keeps waiting (--rank-wait-timeout 60)
  std::this_thread::sleep_for(milliseconds(300));
  EXPECT_EQ(Health(g.addr()), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  kill(g.leader().pid(), SIGTERM);
  EXPECT_EQ(g.leader().WaitExit(milliseconds(10000)), 0) << g.Logs();
}

TEST(ClusterJoinTest, ConstantTimeEqualsComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("abcd", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
}

}  // namespace
}  // namespace sy::server
