// Multi-rank serving end to end, through the public gRPC API:
//   * ranks as threads (`serve --local-ranks N`, an in-process Daemon) and as processes (the
//     built `switchyard serve --min-ranks N --secret S` plus N-1 `switchyard worker --join`
//     on 127.0.0.1, OS-picked ports) give the same greedy tokens as one rank (the plain
//     single-sequence reference), on the tiny and the demo model, also when sequences are
//     preempted and recomputed;
//   * a join with the wrong secret is refused (PERMISSION_DENIED, worker exit status 3) and
//     takes no rank, as does one with another model or dtype (FAILED_PRECONDITION); SIGTERM
//     while waiting for --min-ranks exits promptly.
// The elastic group (joins, drains and failures under load) is elastic_process_test.cc.
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
#include "server/cluster_auth.h"
#include "server/cluster_service.h"
#include "server/daemon.h"
#include "switchyard/v1/cluster.grpc.pb.h"
#include "switchyard/v1/inference.grpc.pb.h"
#include "tests/server/cluster_testing.h"
#include "tests/testing/model_fixtures.h"
#include "tests/testing/watchdog.h"

namespace sy::server {
namespace {

using namespace sy::server::testing;  // NOLINT: the helpers of cluster_testing.h
using sy::testing::Watchdog;

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
    req.set_key("gloo/epoch-2/rank-1");
    SignRequest("guess", "StoreSet", &req);
    v1::StoreSetReply reply;
    EXPECT_EQ(stub->StoreSet(&ctx, req, &reply).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  // Another model is refused too (the worker's config.json fingerprint), also taking no rank.
  v1::JoinRequest other;
  other.set_host("127.0.0.1");
  other.mutable_model()->set_model_type("mixtral");
  other.mutable_model()->set_num_layers(99);
  SignRequest(kSecret, "Join", &other);
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
  // Another dtype is another model.
  auto m = model::ModelConfig::FromFile(TinyDir() + "/config.json");
  ASSERT_TRUE(m.ok());
  v1::JoinRequest req;
  req.set_host("127.0.0.1");
  req.set_kv_cache_bytes(kKvBytes);
  req.mutable_model()->set_model_type(m->model_type);
  req.mutable_model()->set_num_layers(m->num_layers);
  req.mutable_model()->set_hidden_size(m->hidden_size);
  req.mutable_model()->set_num_experts(m->num_experts);
  req.mutable_model()->set_vocab_size(m->vocab_size);
  req.mutable_model()->set_moe_intermediate_size(m->moe_intermediate_size);
  req.mutable_model()->set_num_experts_per_tok(m->num_experts_per_tok);
  req.mutable_model()->set_dtype(m->torch_dtype == "float32" ? "bfloat16" : "float32");
  SignRequest(kSecret, "Join", &req);
  grpc::ClientContext ctx;
  v1::JoinReply reply;
  const grpc::Status s = stub->Join(&ctx, req, &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("dtype"), std::string::npos) << s.error_message();
  EXPECT_EQ(g.Membership().world_size(), 2);
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

TEST(ClusterSecurityTest, SecretsFromFilesStayOutOfPsAndGuessingIsSlowed) {
  Watchdog dog(seconds(120));
  const std::string tmp = sy::testing::MakeTempDir("secret-file");
  std::ofstream(tmp + "/secret") << kSecret << "\n";
  Child leader(tmp, "leader",
               {"serve", "--model", TinyDir(), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", "--cluster-port", "0", "--secret-file", tmp + "/secret",
                "--kv-cache-bytes", absl::StrCat(kKvBytes)});
  const int cluster_port = PortAfterColon(leader.WaitForLine("cluster service on ", milliseconds(30000)));
  ASSERT_GT(cluster_port, 0) << leader.err();
  Child worker(tmp, "worker",
               {"worker", "--join", absl::StrCat("127.0.0.1:", cluster_port), "--secret-file",
                tmp + "/secret", "--model", TinyDir(), "--kv-cache-bytes", absl::StrCat(kKvBytes)});
  for (pid_t pid : {leader.pid(), worker.pid()}) {
    const std::string cmdline = sy::testing::ReadFile(absl::StrCat("/proc/", pid, "/cmdline"));
    EXPECT_EQ(cmdline.find(kSecret), std::string::npos) << "the secret shows in ps";
  }
  const auto until = std::chrono::steady_clock::now() + seconds(30);
  while (worker.err().find("joined") == std::string::npos && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(milliseconds(20));
  EXPECT_NE(worker.err().find("joined"), std::string::npos) << worker.err() << leader.err();
  // Ten wrong guesses from one address, then even the right secret waits a while.
  auto stub = v1::Cluster::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", cluster_port),
                                                       grpc::InsecureChannelCredentials()));
  auto set = [&](const std::string& secret, const std::string& value) {
    grpc::ClientContext ctx;
    v1::StoreSetRequest req;
    req.set_key("k");
    req.set_value(value);
    SignRequest(secret, "StoreSet", &req);
    v1::StoreSetReply reply;
    return stub->StoreSet(&ctx, req, &reply).error_code();
  };
  EXPECT_EQ(set(kSecret, std::string(100 << 10, 'x')), grpc::StatusCode::INVALID_ARGUMENT);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(set("guess", "v"), grpc::StatusCode::PERMISSION_DENIED) << i;
  EXPECT_EQ(set("guess", "v"), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(set(kSecret, "v"), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_FALSE(leader.Exited());
}

TEST(ClusterSecurityTest, SecretsGivenOnTheCommandLineAreOverwrittenInPsWithAWarning) {
  Watchdog dog(seconds(120));
  const std::string tmp = sy::testing::MakeTempDir("secret-argv");
  const std::string admin_token = "admin-token-0123456789";
  Child leader(tmp, "leader",
               {"serve", "--model", TinyDir(), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", "--cluster-port", "0", "--secret", kSecret,
                absl::StrCat("--admin-token=", admin_token), "--kv-cache-bytes",
                absl::StrCat(kKvBytes)});
  const int cluster_port = PortAfterColon(leader.WaitForLine("cluster service on ", milliseconds(30000)));
  ASSERT_GT(cluster_port, 0) << leader.err();
  Child worker(tmp, "worker",
               {"worker", "--join", absl::StrCat("127.0.0.1:", cluster_port), "--secret", kSecret,
                "--model", TinyDir(), "--kv-cache-bytes", absl::StrCat(kKvBytes)});
  const auto until = std::chrono::steady_clock::now() + seconds(30);
  while (worker.err().find("joined") == std::string::npos && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(milliseconds(20));
  EXPECT_NE(worker.err().find("joined"), std::string::npos) << worker.err() << leader.err();
  for (pid_t pid : {leader.pid(), worker.pid()}) {
    const std::string cmdline = sy::testing::ReadFile(absl::StrCat("/proc/", pid, "/cmdline"));
    EXPECT_EQ(cmdline.find(kSecret), std::string::npos) << "the secret shows in ps";
    EXPECT_EQ(cmdline.find(admin_token), std::string::npos) << "the admin token shows in ps";
    EXPECT_NE(cmdline.find("--secret"), std::string::npos);  // the flag itself stays
  }
  EXPECT_NE(leader.err().find("warning: --secret on the command line"), std::string::npos)
      << leader.err();
  EXPECT_NE(leader.err().find("--admin-token-file keeps it out"), std::string::npos) << leader.err();
  EXPECT_NE(worker.err().find("--secret-file keeps it out"), std::string::npos) << worker.err();
}

}  // namespace
}  // namespace sy::server
