// The elastic rank group as a user runs it: the built `switchyard serve --secret S` and
// `switchyard worker --join` processes over Gloo on 127.0.0.1, under 16 concurrent streams:
//   * the group grows 1 -> 2 -> 3 -> 4 by joins and shrinks back to 2 by one SIGTERM and one
//     Admin.DrainRank, with zero failed requests and every greedy output equal to a one-rank
//     run (tiny and demo models); `switchyard status` and /metrics show it;
//   * kill -9 of a worker holding the only copy of some experts, then of two workers at once,
//     then a restarted worker joining again: zero failed requests, the same tokens;
//   * SIGSTOP of a worker past the collective time-out, then SIGCONT: the group re-forms
//     without it, the old rank is fenced (it joins again as a new rank), nothing hangs;
//   * refusals that change nothing: a second join of one process, a join past --max-ranks, a
//     drain of the leader or of an unknown rank.
// Child processes are killed by the fixtures; a watchdog aborts a hung test.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "parallel/expert_placement.h"
#include "server/cluster_auth.h"
#include "switchyard/v1/cluster.grpc.pb.h"
#include "tests/server/cluster_testing.h"
#include "tests/server/server_fixture.h"
#include "tests/testing/watchdog.h"

namespace sy::server {
namespace {

using namespace sy::server::testing;  // NOLINT: the helpers of cluster_testing.h
using sy::testing::Watchdog;

constexpr int kMaxNew = 24;
constexpr int kStreams = 16;

// Every request the driver sent succeeded with the one-rank tokens of its prompt.
void ExpectNoFailureAndReferenceTokens(const LoadDriver& load,
                                       const std::vector<std::vector<int32_t>>& want,
                                       const std::string& logs) {
  int ran = 0;
  for (int i = 0; i < load.total(); ++i) {
    const GenResult& r = load.result(i);
    if (!r.ran) continue;
    ++ran;
    EXPECT_TRUE(r.status.ok()) << "request " << i << ": " << r.status.error_message() << "\n" << logs;
    EXPECT_EQ(r.tokens, want[load.prompt_of(i)]) << "request " << i;
  }
  EXPECT_GT(ran, kStreams);
}

int IdOfWorker(ProcessGroup& g, size_t worker_index) {
  const std::string err = g.worker(worker_index).err();
  const size_t at = err.rfind(" as rank ");
  return at == std::string::npos ? -1 : std::atoi(err.c_str() + at + 9);
}

struct Case {
  std::string preset;
};

class ElasticProcessTest : public ::testing::TestWithParam<Case> {};

TEST_P(ElasticProcessTest, GrowsToFourRanksAndShrinksToTwoUnderLoadWithoutAFailedRequest) {
  Watchdog dog(seconds(300));
  const std::string dir =
      sy::testing::SyntheticModelDir(model::Arch::kMixtral, GetParam().preset, DType::kF32);
  const auto prompts = ManyPrompts(kStreams);
  const auto want = Reference(dir, kMaxNew, prompts);
  ProcessGroup g(dir, 1, 5000);
  ASSERT_TRUE(g.WaitServing()) << g.Logs();
  LoadDriver load(g.addr(), prompts, kMaxNew, kStreams, 100000);
  ASSERT_TRUE(load.WaitStarted(kStreams)) << g.Logs();
  for (int n = 2; n <= 4; ++n) {
    g.AddWorker();
    ASSERT_TRUE(g.WaitWorld(n)) << "no " << n << " ranks\n" << g.Logs();
    ASSERT_TRUE(load.WaitStarted(load.started() + kStreams)) << g.Logs();  // the new rank works
  }
  // Scale down: SIGTERM to the first worker, Admin.DrainRank for the second.
  kill(g.worker(0).pid(), SIGTERM);
  ASSERT_TRUE(g.WaitWorld(3)) << g.Logs();
  EXPECT_EQ(g.worker(0).WaitExit(milliseconds(30000)), 0) << g.Logs();
  v1::DrainRankResponse drained;
  const grpc::Status s = g.DrainRank(IdOfWorker(g, 1), /*wait=*/true, &drained);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(drained.state(), "gone");
  ASSERT_TRUE(g.WaitWorld(2)) << g.Logs();
  EXPECT_EQ(g.worker(1).WaitExit(milliseconds(30000)), 0) << g.Logs();
  ASSERT_TRUE(load.WaitStarted(load.started() + kStreams)) << g.Logs();
  EXPECT_LT(load.done(), 100000);
  load.Stop();
  load.Join();
  ExpectNoFailureAndReferenceTokens(load, want, g.Logs());

  // What a user sees: `switchyard status` and the metrics.
  Child status(sy::testing::MakeTempDir("status"), "status", {"status", "--addr", g.addr()});
  EXPECT_EQ(status.WaitExit(milliseconds(30000)), 0);
  const std::string table = status.out();
  EXPECT_NE(table.find("membership epoch 6, 2 rank(s)"), std::string::npos) << table;
  EXPECT_NE(table.find("serving"), std::string::npos) << table;
  EXPECT_NE(table.find("gone"), std::string::npos) << table;
  const std::string metrics = HttpGet(g.metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(metrics, "switchyard_ep_membership_epoch"), 6) << metrics;
  EXPECT_EQ(MetricValue(metrics, "switchyard_ep_world_size"), 2);
  EXPECT_EQ(MetricValue(metrics, "switchyard_ep_membership_changes_total{reason=\"join\"}"), 3);
  EXPECT_EQ(MetricValue(metrics, "switchyard_ep_membership_changes_total{reason=\"drain\"}"), 2);
  EXPECT_EQ(MetricValue(metrics, "switchyard_ep_membership_changes_total{reason=\"failure\"}"), 0);
  EXPECT_EQ(MetricValue(metrics, "switchyard_ep_scale_seconds_count"), 3);
  EXPECT_EQ(MetricValue(metrics, "switchyard_rank_state{rank=\"1\",state=\"gone\"}"), 1);
  EXPECT_EQ(MetricValue(metrics, "switchyard_rank_state{rank=\"3\",state=\"serving\"}"), 1);
  EXPECT_EQ(MetricValue(metrics, "switchyard_requests_failed_total{code=\"UNAVAILABLE\"}"), 0);
}

INSTANTIATE_TEST_SUITE_P(Elastic, ElasticProcessTest, ::testing::Values(Case{"tiny"}, Case{"demo"}),
                         [](const auto& info) { return info.param.preset; });

// The experts rank `id` holds that no other rank of the group holds.
int SoleExperts(ProcessGroup& g, int id) {
  const v1::Membership m = g.Membership();
  int comm_rank = -1;
  for (const auto& r : m.ranks())
    if (r.id() == id) comm_rank = r.comm_rank();
  auto stub = v1::Admin::NewStub(grpc::CreateChannel(g.addr(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::Placement p;
  if (comm_rank < 0 || !stub->GetPlacement(&ctx, v1::GetPlacementRequest{}, &p).ok()) return -1;
  auto placement = parallel::ExpertPlacement::FromJson(p.placement_json());
  if (!placement.ok()) return -1;
  int sole = 0;
  const auto mine = parallel::ExpertsOfRank(*placement, comm_rank);
  for (int l = 0; l < placement->num_layers(); ++l)
    for (int32_t e : mine[l]) sole += placement->replicas_of(l, e).size() == 1;
  return sole;
}

TEST(ElasticFailureTest, KilledWorkersCostAPauseNotARequest) {
  Watchdog dog(seconds(300));
  const std::string dir = TinyDir();
  const auto prompts = ManyPrompts(kStreams);
  const auto want = Reference(dir, kMaxNew, prompts);
  constexpr int64_t kTimeoutMs = 3000;
  ProcessGroup g(dir, 4, kTimeoutMs);
  for (int i = 0; i < 3; ++i) g.AddWorker();
  ASSERT_TRUE(g.WaitServing()) << g.Logs();
  ASSERT_TRUE(g.WaitWorld(4)) << g.Logs();
  LoadDriver load(g.addr(), prompts, kMaxNew, kStreams, 100000);
  ASSERT_TRUE(load.WaitStarted(kStreams)) << g.Logs();
  // 4 experts on 4 ranks: every rank holds the only copy of its experts.
  EXPECT_GT(SoleExperts(g, IdOfWorker(g, 0)), 0);
  g.worker(0).Kill();
  ASSERT_TRUE(g.WaitWorld(3)) << g.Logs();
  ASSERT_TRUE(load.WaitStarted(load.started() + kStreams)) << g.Logs();
  g.worker(1).Kill();  // two at once
  g.worker(2).Kill();
  ASSERT_TRUE(g.WaitWorld(1)) << g.Logs();
  ASSERT_TRUE(load.WaitStarted(load.started() + kStreams)) << g.Logs();
  g.AddWorker();  // a restarted worker simply joins again
  ASSERT_TRUE(g.WaitWorld(2)) << g.Logs();
  ASSERT_TRUE(load.WaitStarted(load.started() + kStreams)) << g.Logs();
  load.Stop();
  load.Join();
  ExpectNoFailureAndReferenceTokens(load, want, g.Logs());
  EXPECT_EQ(Health(g.addr()), grpc::health::v1::HealthCheckResponse::SERVING);
  const std::string metrics = HttpGet(g.metrics_port(), "/metrics");
  EXPECT_GE(MetricValue(metrics, "switchyard_ep_membership_changes_total{reason=\"failure\"}"), 2);
  EXPECT_GE(MetricValue(metrics, "switchyard_ep_recovery_seconds_count"), 2);
  EXPECT_GT(MetricValue(metrics, "switchyard_requests_recovered_total"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "switchyard_rank_state{rank=\"1\",state=\"dead\"}"), 1);
}

TEST(ElasticFailureTest, AStoppedWorkerIsFencedAndJoinsAgainAsANewRank) {
  Watchdog dog(seconds(300));
  const std::string dir = TinyDir();
  const auto prompts = ManyPrompts(kStreams);
  const auto want = Reference(dir, kMaxNew, prompts);
  constexpr int64_t kTimeoutMs = 2000;
  ProcessGroup g(dir, 3, kTimeoutMs);
  g.AddWorker();
  g.AddWorker();
  ASSERT_TRUE(g.WaitServing()) << g.Logs();
  ASSERT_TRUE(g.WaitWorld(3)) << g.Logs();
  LoadDriver load(g.addr(), prompts, kMaxNew, kStreams, 100000);
  ASSERT_TRUE(load.WaitStarted(kStreams)) << g.Logs();
  const int stopped_id = IdOfWorker(g, 0);
  kill(g.worker(0).pid(), SIGSTOP);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(g.WaitWorld(2)) << g.Logs();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(kTimeoutMs + 10000));
  ASSERT_TRUE(load.WaitStarted(load.started() + kStreams)) << g.Logs();
  kill(g.worker(0).pid(), SIGCONT);
  // It learns it was fenced, and joins again under a new id.
  const auto until = std::chrono::steady_clock::now() + seconds(60);
  while (g.worker(0).err().find("fenced") == std::string::npos && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(milliseconds(20));
  EXPECT_NE(g.worker(0).err().find("fenced"), std::string::npos) << g.Logs();
  ASSERT_TRUE(g.WaitWorld(3)) << g.Logs();
  EXPECT_GT(IdOfWorker(g, 0), stopped_id);
  ASSERT_TRUE(load.WaitStarted(load.started() + kStreams)) << g.Logs();
  load.Stop();
  load.Join();
  ExpectNoFailureAndReferenceTokens(load, want, g.Logs());
  bool dead = false;
  const v1::Membership m = g.Membership();
  for (const auto& r : m.ranks()) dead = dead || (r.id() == stopped_id && r.state() == "dead");
  EXPECT_TRUE(dead);
}

TEST(ElasticRefusalTest, RefusedRequestsChangeNothing) {
  Watchdog dog(seconds(180));
  const std::string dir = TinyDir();
  ProcessGroup g(dir, 1, 5000, {"--max-ranks", "2", "--rank-join-timeout", "3"});
  ASSERT_TRUE(g.WaitServing()) << g.Logs();
  // Drains that cannot be.
  EXPECT_EQ(g.DrainRank(0, false).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(g.DrainRank(7, false).error_code(), grpc::StatusCode::NOT_FOUND);
  // A second join from one process: the first is placed but never connects (its epoch is
  // abandoned after --rank-join-timeout), the second is refused at once.
  auto stub = v1::Cluster::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", g.cluster_port()),
                                                       grpc::InsecureChannelCredentials()));
  auto cfg = model::ModelConfig::FromFile(dir + "/config.json");
  ASSERT_TRUE(cfg.ok());
  v1::JoinRequest req;
  req.set_host("127.0.0.1");
  req.set_instance(4242);
  req.set_kv_cache_bytes(kKvBytes);
  v1::ModelFingerprint* fp = req.mutable_model();
  fp->set_model_type(cfg->model_type);
  fp->set_num_layers(cfg->num_layers);
  fp->set_hidden_size(cfg->hidden_size);
  fp->set_num_experts(cfg->num_experts);
  fp->set_vocab_size(cfg->vocab_size);
  fp->set_dtype(cfg->torch_dtype);
  fp->set_moe_intermediate_size(cfg->moe_intermediate_size);
  fp->set_num_experts_per_tok(cfg->num_experts_per_tok);
  {
    grpc::ClientContext ctx;
    v1::JoinReply reply;
    SignRequest(kSecret, "Join", &req);
    ASSERT_TRUE(stub->Join(&ctx, req, &reply).ok());
    EXPECT_EQ(reply.epoch().members_size(), 2);
  }
  {
    grpc::ClientContext ctx;
    v1::JoinReply reply;
    SignRequest(kSecret, "Join", &req);
    const grpc::Status s = stub->Join(&ctx, req, &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS) << s.error_message();
  }
  // The placed-but-silent rank's epoch is abandoned; the group is still the leader alone.
  std::this_thread::sleep_for(milliseconds(4000));
  EXPECT_TRUE(g.WaitWorld(1)) << g.Logs();
  const GenResult one = Generate(g.addr(), Prompts()[0], 4);
  EXPECT_TRUE(one.status.ok()) << one.status.error_message();
  // --max-ranks 2: the first worker joins, the second is refused (exit status 3).
  g.AddWorker();
  ASSERT_TRUE(g.WaitWorld(2)) << g.Logs();
  Child* extra = g.AddWorker();
  EXPECT_EQ(extra->WaitExit(milliseconds(30000)), 3) << g.Logs();
  EXPECT_NE(extra->err().find("RESOURCE_EXHAUSTED"), std::string::npos) << extra->err();
  EXPECT_TRUE(g.WaitWorld(2));
  const GenResult two = Generate(g.addr(), Prompts()[1], 4);
  EXPECT_TRUE(two.status.ok()) << two.status.error_message();
  EXPECT_EQ(two.tokens, Reference(dir, 4)[1]);
}

}  // namespace
}  // namespace sy::server
