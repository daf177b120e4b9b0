// Admin service and live expert placement, through the public gRPC API of an
// in-process daemon on 127.0.0.1: the load statistics add up to the tokens run, `switchyard
// stats` writes a trace the planner reads, the admin token is enforced, and placements
// applied (and rebalances planned) while requests stream leave every request's greedy tokens
// equal to the plain one-rank reference.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/core/logging.h"
#include "parallel/planner/trace.h"
#include "scheduler/distributed_executor.h"
#include "server/commands.h"
#include "server/daemon.h"
#include "switchyard/v1/admin.grpc.pb.h"
#include "switchyard/v1/inference.grpc.pb.h"
#include "tests/testing/model_fixtures.h"

namespace sy::server {
namespace {
namespace v1 = ::switchyard::v1;
using std::chrono::seconds;

std::string TinyDir() {
  return sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
}

std::vector<std::vector<int32_t>> Prompts() {
  return {{1, 17, 42, 99, 5}, {300, 2}, {7, 7, 7, 7, 7, 7, 7, 11}, {450},
          {23, 64, 128},      {5, 6},   {100, 200, 300, 400},      {9, 8, 7, 6, 5, 4}};
}

std::vector<std::vector<int32_t>> Reference(const std::string& dir, int max_new) {
  auto m = model::MoeModel::Load(dir);
  SY_CHECK(m.ok()) << m.status();
  std::vector<std::vector<int32_t>> out;
  for (const auto& p : Prompts()) out.push_back(sy::testing::GreedyGenerate(**m, p, max_new));
  return out;
}

ServeOptions Options(const std::string& dir, int ranks) {
  ServeOptions o;
  o.model = dir;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = -1;
  o.kv_cache_bytes = 16 << 20;
  o.max_num_seqs = 32;
  o.cluster.local_ranks = ranks;
  o.cluster.collective_timeout_ms = 20000;
  return o;
}

std::unique_ptr<Daemon> StartDaemon(const ServeOptions& o) {
  auto d = Daemon::Start(o);
  SY_CHECK(d.ok()) << d.status();
  absl::Status s = (*d)->Load();
  SY_CHECK(s.ok()) << s;
  return *std::move(d);
}

std::shared_ptr<grpc::Channel> Channel(const Daemon& d) {
  return grpc::CreateChannel(absl::StrCat("127.0.0.1:", d.port()), grpc::InsecureChannelCredentials());
}

void Deadline(grpc::ClientContext* ctx, const std::string& token = "") {
  ctx->set_deadline(std::chrono::system_clock::now() + seconds(60));
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

// The placement in force (Admin.GetPlacement, no token); a failed call fails the test and
// returns an empty Placement.
v1::Placement CurrentPlacement(v1::Admin::Stub& admin) {
  grpc::ClientContext ctx;
  Deadline(&ctx);
  v1::Placement p;
  grpc::Status s = admin.GetPlacement(&ctx, v1::GetPlacementRequest(), &p);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return p;
}

struct Stream {
  grpc::Status status;
  std::vector<int32_t> tokens;
};

// Waits (at most 60 s) until `chunks` reaches n: the streams are under way.
void WaitForChunks(const std::atomic<int>& chunks, int n) {
  const auto until = std::chrono::steady_clock::now() + seconds(60);
  while (chunks.load() < n && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

// Streams one request; `chunks` counts chunks received over all streams.
Stream Generate(v1::Inference::Stub& stub, const std::vector<int32_t>& prompt, int max_new,
                std::atomic<int>* chunks) {
  grpc::ClientContext ctx;
  Deadline(&ctx);
  v1::GenerateRequest req;
  for (int32_t id : prompt) req.mutable_token_ids()->add_ids(id);
  req.mutable_sampling()->set_max_new_tokens(max_new);
  req.mutable_sampling()->set_ignore_eos(true);
  req.set_stream(true);
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  Stream s;
  while (reader->Read(&resp)) {
    if (resp.has_chunk()) {
      s.tokens.insert(s.tokens.end(), resp.chunk().token_ids().begin(), resp.chunk().token_ids().end());
      if (chunks != nullptr) chunks->fetch_add(1);
    }
  }
  s.status = reader->Finish();
  return s;
}

int64_t TokensRun(int max_new) {  // prompt + generated tokens fed back (all but the last)
  int64_t n = 0;
  for (const auto& p : Prompts()) n += static_cast<int64_t>(p.size()) + max_new - 1;
  return n;
}

// Expert e of MoE layers on rank (e + shift) % R (one slot per rank per expert when E == R*S).
std::string ShiftedPlacement(const model::ModelConfig& c, int ranks, int shift) {
  const int E = static_cast<int>(c.num_experts), S = (E + ranks - 1) / ranks;
  std::vector<std::vector<int32_t>> rows(c.num_layers, std::vector<int32_t>(ranks * S, -1));
  for (auto& row : rows) {
    std::vector<int> used(ranks, 0);
    for (int e = 0; e < E; ++e) {
      const int r = (e / S + shift) % ranks;
      row[r * S + used[r]++] = e;
    }
  }
  auto p = parallel::ExpertPlacement::Create(ranks, S, E, rows);
  SY_CHECK(p.ok()) << p.status();
  return p->ToJson();
}

class AdminLoadTest : public ::testing::TestWithParam<int> {};

TEST_P(AdminLoadTest, ExpertLoadCountsAddUpToTokensTimesTopKAndStatsWritesATracePlanReads) {
  const int ranks = GetParam(), max_new = 5;
  const std::string dir = TinyDir();
  auto d = StartDaemon(Options(dir, ranks));
  auto inference = v1::Inference::NewStub(Channel(*d));
  std::vector<std::thread> threads;
  std::vector<Stream> got(Prompts().size());
  for (size_t i = 0; i < Prompts().size(); ++i)
    threads.emplace_back([&, i] { got[i] = Generate(*inference, Prompts()[i], max_new, nullptr); });
  for (auto& t : threads) t.join();
  for (const auto& g : got) ASSERT_TRUE(g.status.ok()) << g.status.error_message();

  auto admin = v1::Admin::NewStub(Channel(*d));
  grpc::ClientContext ctx;
  Deadline(&ctx);
  v1::GetExpertLoadRequest req;
  req.set_include_paths(true);
  v1::ExpertLoad load;
  ASSERT_TRUE(admin->GetExpertLoad(&ctx, req, &load).ok());
  auto m = model::MoeModel::Load(dir);
  ASSERT_TRUE(m.ok());
  const model::ModelConfig& c = (*m)->config();
  EXPECT_EQ(load.num_tokens(), TokensRun(max_new));
  EXPECT_EQ(load.num_layers(), static_cast<int>((*m)->MoeLayerIds().size()));
  EXPECT_EQ(load.top_k(), c.num_experts_per_tok);
  EXPECT_EQ(load.expert_balancedness_size(), load.num_layers());

  // `switchyard stats --out FILE`, read back with the planner's loader.
  const std::string out = sy::testing::MakeTempDir("admin-stats") + "/live.json";
  std::string addr = absl::StrCat("--addr=127.0.0.1:", d->port()), out_flag = "--out=" + out;
  char* argv[] = {addr.data(), out_flag.data()};
  ASSERT_EQ(StatsCommand(2, argv), 0);
  auto trace = parallel::planner::LoadTrace(out);
  ASSERT_TRUE(trace.ok()) << trace.status();
  EXPECT_EQ(trace->num_tokens, TokensRun(max_new));
  EXPECT_EQ(trace->layer_ids, (*m)->MoeLayerIds());
  ASSERT_EQ(static_cast<int>(trace->expert_counts.size()), trace->num_layers);
  for (int l = 0; l < trace->num_layers; ++l) {
    double sum = 0;
    for (double v : trace->expert_counts[l]) sum += v;
    EXPECT_EQ(sum, static_cast<double>(TokensRun(max_new) * c.num_experts_per_tok)) << "layer " << l;
  }
  // Every token's path is there (the window is far larger), each with top_k distinct experts.
  ASSERT_EQ(static_cast<int64_t>(trace->token_paths.size()), TokensRun(max_new));
  for (const auto& path : trace->token_paths)
    for (const auto& ids : path) EXPECT_EQ(static_cast<int>(ids.size()), c.num_experts_per_tok);

  // `switchyard plan --trace` plans on it.
  const std::string plan_out = out + ".placement.json";
  std::string a1 = "--trace=" + out, a2 = "--ranks=2",
              a3 = absl::StrCat("--slots-per-rank=", (c.num_experts + 1) / 2), a4 = "--policy=greedy",
              a5 = "--out=" + plan_out;
  char* plan_argv[] = {a1.data(), a2.data(), a3.data(), a4.data(), a5.data()};
  EXPECT_EQ(PlanCommand(5, plan_argv), 0);
  EXPECT_TRUE(parallel::ExpertPlacement::FromFile(plan_out).ok());
  d->Drain();
}

INSTANTIATE_TEST_SUITE_P(Admin, AdminLoadTest, ::testing::Values(1, 4),
                         [](const auto& info) { return absl::StrCat(info.param, "ranks"); });

TEST(AdminAuthTest, AdminNeedsTheBearerTokenWhenOneIsSet) {
  ServeOptions o = Options(TinyDir(), 2);
  o.admin.admin_token = "s3cret";
  auto d = StartDaemon(o);
  auto admin = v1::Admin::NewStub(Channel(*d));
  for (const std::string token : {"", "wrong", "s3cre", "s3cret!"}) {
    grpc::ClientContext ctx;
    Deadline(&ctx, token);
    v1::Placement p;
    EXPECT_EQ(admin->GetPlacement(&ctx, v1::GetPlacementRequest(), &p).error_code(),
              grpc::StatusCode::UNAUTHENTICATED)
        << "token '" << token << "'";
  }
  grpc::ClientContext ctx;
  Deadline(&ctx, "s3cret");
  v1::Placement p;
  ASSERT_TRUE(admin->GetPlacement(&ctx, v1::GetPlacementRequest(), &p).ok());
  EXPECT_EQ(p.world_size(), 2);
  EXPECT_EQ(p.epoch(), 0);  // thread ranks: the first epoch's placement
  std::string addr = absl::StrCat("--addr=127.0.0.1:", d->port());
  char* argv[] = {addr.data()};
  EXPECT_EQ(StatsCommand(1, argv), 3);  // UNAUTHENTICATED
  EXPECT_EQ(StatusCommand(1, argv), 3);
  // The membership calls obey the token too.
  {
    grpc::ClientContext bad;
    Deadline(&bad, "wrong");
    v1::Membership m;
    EXPECT_EQ(admin->GetMembership(&bad, v1::GetMembershipRequest(), &m).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext bad_drain;
    Deadline(&bad_drain, "");
    v1::DrainRankRequest dr;
    dr.set_rank(1);
    v1::DrainRankResponse resp;
    EXPECT_EQ(admin->DrainRank(&bad_drain, dr, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  grpc::ClientContext good;
  Deadline(&good, "s3cret");
  v1::Membership m;
  ASSERT_TRUE(admin->GetMembership(&good, v1::GetMembershipRequest(), &m).ok());
  EXPECT_EQ(m.world_size(), 2);  // the drain above changed nothing
  EXPECT_EQ(m.ranks(1).state(), "serving");
  d->Drain();
}

TEST(AdminSingleRankTest, TheMembershipOfOneProcessIsTheLeaderAlone) {
  auto d = StartDaemon(Options(TinyDir(), 1));
  auto admin = v1::Admin::NewStub(Channel(*d));
  grpc::ClientContext ctx;
  Deadline(&ctx);
  v1::Membership m;
  ASSERT_TRUE(admin->GetMembership(&ctx, v1::GetMembershipRequest(), &m).ok());
  EXPECT_EQ(m.world_size(), 1);
  ASSERT_EQ(m.ranks_size(), 1);
  EXPECT_EQ(m.ranks(0).state(), "serving");
  grpc::ClientContext ctx2;
  Deadline(&ctx2);
  v1::DrainRankRequest dr;
  dr.set_rank(0);
  v1::DrainRankResponse resp;
  EXPECT_EQ(admin->DrainRank(&ctx2, dr, &resp).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  d->Drain();
}

TEST(AdminSingleRankTest, ApplyPlacementOnOneRankIsAFailedPrecondition) {
  auto d = StartDaemon(Options(TinyDir(), 1));
  auto admin = v1::Admin::NewStub(Channel(*d));
  v1::Placement p;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    ASSERT_TRUE(admin->GetPlacement(&ctx, v1::GetPlacementRequest(), &p).ok());
  }
  EXPECT_EQ(p.world_size(), 1);
  grpc::ClientContext ctx;
  Deadline(&ctx);
  v1::ApplyPlacementRequest req;
  req.set_placement_json(p.placement_json());
  v1::ApplyPlacementResponse resp;
  EXPECT_EQ(admin->ApplyPlacement(&ctx, req, &resp).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  d->Drain();
}

TEST(AdminApplyTest, BadPlacementsAreInvalidArgumentAndChangeNothing) {
  auto d = StartDaemon(Options(TinyDir(), 2));
  auto admin = v1::Admin::NewStub(Channel(*d));
  auto m = model::MoeModel::Load(TinyDir());
  ASSERT_TRUE(m.ok());
  for (const std::string& json : {std::string("{not json"), ShiftedPlacement((*m)->config(), 4, 1)}) {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ApplyPlacementRequest req;
    req.set_placement_json(json);
    v1::ApplyPlacementResponse resp;
    EXPECT_EQ(admin->ApplyPlacement(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  const v1::Placement p = CurrentPlacement(*admin);
  EXPECT_EQ(p.epoch(), 0);
  d->Drain();
}

// A placement with more slots per rank than the contiguous one (replicas of hot experts, as
// `switchyard plan --slots-per-rank` writes) applies live: the greedy tokens stay the same.
TEST(LiveRebalanceTest, APlacementWithReplicasInExtraSlotsAppliesMidStream) {
  const int ranks = 2, max_new = 32;
  const std::string dir = TinyDir();
  const auto want = Reference(dir, max_new);
  auto d = StartDaemon(Options(dir, ranks));
  auto inference = v1::Inference::NewStub(Channel(*d));
  auto admin = v1::Admin::NewStub(Channel(*d));
  auto m = model::MoeModel::Load(dir);
  ASSERT_TRUE(m.ok());
  const model::ModelConfig& c = (*m)->config();
  ASSERT_EQ(c.num_experts, 4);
  // 3 slots per rank: experts 0 and 3 on both ranks, with uneven shares.
  std::vector<std::vector<int32_t>> rows(c.num_layers, {0, 1, 3, 2, 0, 3});
  std::vector<std::vector<float>> shares(c.num_layers, {0.75f, 1.f, 0.5f, 1.f, 0.25f, 0.5f});
  auto replicated = parallel::ExpertPlacement::Create(ranks, 3, 4, rows, shares);
  ASSERT_TRUE(replicated.ok()) << replicated.status();

  std::atomic<int> chunks{0};
  std::vector<Stream> got(Prompts().size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < Prompts().size(); ++i)
    threads.emplace_back([&, i] { got[i] = Generate(*inference, Prompts()[i], max_new, &chunks); });
  WaitForChunks(chunks, static_cast<int>(Prompts().size()) * max_new / 8);
  v1::ApplyPlacementResponse applied;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ApplyPlacementRequest req;
    req.set_placement_json(replicated->ToJson());
    grpc::Status s = admin->ApplyPlacement(&ctx, req, &applied);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(applied.epoch(), 1);
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i;
  }
  const v1::Placement now = CurrentPlacement(*admin);
  EXPECT_EQ(now.slots_per_rank(), 3);
  d->Drain();
}

// serve --expert-slots-per-rank leaves room for replicas: the contiguous start has empty extra
// slots, a rebalance fills them with replicas of the hot experts, and the tokens stay the same.
TEST(LiveRebalanceTest, ExtraExpertSlotsLetARebalanceReplicateExperts) {
  const int ranks = 2, max_new = 8;
  const std::string dir = TinyDir();
  const auto want = Reference(dir, max_new);
  ServeOptions o = Options(dir, ranks);
  o.cluster.expert_slots_per_rank = 3;  // 4 experts: 2 slots needed, 1 spare per rank
  auto d = StartDaemon(o);
  auto inference = v1::Inference::NewStub(Channel(*d));
  auto admin = v1::Admin::NewStub(Channel(*d));
  {
    const v1::Placement p = CurrentPlacement(*admin);
    EXPECT_EQ(p.slots_per_rank(), 3);
    auto start = parallel::ExpertPlacement::FromJson(p.placement_json());
    ASSERT_TRUE(start.ok());
    EXPECT_EQ(start->physical_to_logical(0), (std::vector<int32_t>{0, 1, -1, 2, 3, -1}));
  }
  for (size_t i = 0; i < Prompts().size(); ++i) {
    std::atomic<int> chunks{0};
    Stream s = Generate(*inference, Prompts()[i], max_new, &chunks);
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, want[i]);
  }
  {
    // The ILP plans on the live window's load scenarios too; a dry run applies nothing.
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::RebalanceRequest req;
    req.set_policy("ilp");
    req.set_dry_run(true);
    req.set_time_limit_seconds(0.5);
    v1::RebalanceReport ilp;
    grpc::Status s = admin->Rebalance(&ctx, req, &ilp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_FALSE(ilp.applied());
    EXPECT_GE(ilp.gap(), 0.0);
    auto planned = parallel::ExpertPlacement::FromJson(ilp.placement_json());
    ASSERT_TRUE(planned.ok()) << planned.status();
    EXPECT_EQ(planned->slots_per_rank(), 3);
    EXPECT_GT(ilp.window_tokens(), 0);
  }
  v1::RebalanceReport report;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::RebalanceRequest req;
    req.set_policy("greedy");
    grpc::Status s = admin->Rebalance(&ctx, req, &report);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_TRUE(report.applied()) << report.reason();
  auto planned = parallel::ExpertPlacement::FromJson(report.placement_json());
  ASSERT_TRUE(planned.ok()) << planned.status();
  EXPECT_EQ(planned->slots_per_rank(), 3);
  for (int l = 0; l < planned->num_layers(); ++l) {
    int used = 0;
    for (int32_t e : planned->physical_to_logical(l)) used += e >= 0;
    if (used > 0) {
      EXPECT_EQ(used, 6) << "layer " << l << ": greedy fills every slot with a replica";
    }
  }
  for (size_t i = 0; i < Prompts().size(); ++i) {
    std::atomic<int> chunks{0};
    Stream s = Generate(*inference, Prompts()[i], max_new, &chunks);
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, want[i]) << "prompt " << i << " after the rebalance";
  }
  d->Drain();
}

TEST(LiveRebalanceTest, TooFewExpertSlotsPerRankIsInvalidArgument) {
  ServeOptions o = Options(TinyDir(), 2);
  o.cluster.expert_slots_per_rank = 1;  // 2 ranks x 1 slot cannot hold 4 experts
  auto d = Daemon::Start(o);
  absl::Status s = d.ok() ? (*d)->Load() : d.status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("--expert-slots-per-rank"), std::string::npos) << s;
}

// Live rebalancing end to end: 4 ranks (threads) under streaming load; placements applied and a
// rebalance planned while the requests run; every request's greedy tokens equal the plain
// one-rank reference (= a run without any rebalance).
TEST(LiveRebalanceTest, PlacementsAppliedMidStreamKeepEveryRequestsGreedyTokens) {
  const int ranks = 4, max_new = 48;
  const std::string dir = TinyDir();
  const auto want = Reference(dir, max_new);
  ServeOptions o = Options(dir, ranks);
  o.metrics_port = 0;
  o.admin.switch_layers_per_plan = 1;  // one prepare plan per layer, steps in between
  auto d = StartDaemon(o);
  auto inference = v1::Inference::NewStub(Channel(*d));
  auto admin = v1::Admin::NewStub(Channel(*d));
  auto m = model::MoeModel::Load(dir);
  ASSERT_TRUE(m.ok());
  const model::ModelConfig& c = (*m)->config();
  const int moe_layers = static_cast<int>((*m)->MoeLayerIds().size());

  std::atomic<int> chunks{0}, finished{0};
  std::vector<Stream> got(Prompts().size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < Prompts().size(); ++i)
    threads.emplace_back([&, i] {
      got[i] = Generate(*inference, Prompts()[i], max_new, &chunks);
      finished.fetch_add(1);
    });
  auto wait_chunks = [&](int n) { WaitForChunks(chunks, n); };
  const int total_chunks = static_cast<int>(Prompts().size()) * max_new;

  // 1. Every expert moves one rank on (each rank gains and frees one expert per MoE layer).
  wait_chunks(total_chunks / 8);
  int finished_at_apply = finished.load();
  v1::ApplyPlacementResponse applied;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ApplyPlacementRequest req;
    req.set_placement_json(ShiftedPlacement(c, ranks, 1));
    grpc::Status s = admin->ApplyPlacement(&ctx, req, &applied);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_LT(finished_at_apply, static_cast<int>(Prompts().size())) << "applied after the load ended";
  EXPECT_EQ(applied.epoch(), 1);
  const int per_rank = static_cast<int>(c.num_experts) / ranks;
  EXPECT_EQ(applied.experts_gained(), ranks * per_rank * moe_layers);
  EXPECT_EQ(applied.experts_released(), ranks * per_rank * moe_layers);
  EXPECT_GT(applied.migrated_bytes(), 0);

  // 2. A rebalance planned on the live load (applied only if it helps), then another shift.
  wait_chunks(total_chunks / 3);
  v1::RebalanceReport rebalance;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::RebalanceRequest req;
    req.set_policy("greedy");
    grpc::Status s = admin->Rebalance(&ctx, req, &rebalance);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_GT(rebalance.window_tokens(), 0);
  EXPECT_FALSE(rebalance.placement_json().empty());
  if (rebalance.applied()) {
    EXPECT_GT(rebalance.balancedness_after(), rebalance.balancedness_before());
  }
  const int64_t epoch_after_rebalance = rebalance.applied() ? 2 : 1;
  wait_chunks(total_chunks / 2);
  finished_at_apply = finished.load();
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ApplyPlacementRequest req;
    req.set_placement_json(ShiftedPlacement(c, ranks, 2));
    grpc::Status s = admin->ApplyPlacement(&ctx, req, &applied);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_LT(finished_at_apply, static_cast<int>(Prompts().size())) << "applied after the load ended";
  EXPECT_EQ(applied.epoch(), epoch_after_rebalance + 1);

  for (auto& t : threads) t.join();
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i;
  }
  // The placement in force is the last one applied.
  const v1::Placement now = CurrentPlacement(*admin);
  EXPECT_EQ(now.epoch(), applied.epoch());
  auto expected = parallel::ExpertPlacement::FromJson(ShiftedPlacement(c, ranks, 2));
  auto in_force = parallel::ExpertPlacement::FromJson(now.placement_json());
  ASSERT_TRUE(expected.ok() && in_force.ok());
  EXPECT_TRUE(*in_force == expected->WithEpoch(now.epoch()));
  const std::string metrics = d->metrics().Scrape();
  EXPECT_NE(metrics.find(absl::StrCat("switchyard_placement_epoch ", applied.epoch())), std::string::npos);
  EXPECT_NE(metrics.find(absl::StrCat("switchyard_rebalances_total ", applied.epoch())), std::string::npos);
  EXPECT_NE(metrics.find("switchyard_planner_solve_seconds_count{policy=\"greedy\"} 1"), std::string::npos);
  d->Drain();
}

TEST(LiveRebalanceTest, PeriodicRebalanceRunsThePlannerOffTheStepLoopAndKeepsTokens) {
  const int ranks = 2, max_new = 48;
  const std::string dir = TinyDir();
  const auto want = Reference(dir, max_new);
  ServeOptions o = Options(dir, ranks);
  o.admin.rebalance_every = 4;
  o.admin.rebalance_threshold = 1.01;  // always under: the planner runs every 4 steps
  auto d = StartDaemon(o);
  auto inference = v1::Inference::NewStub(Channel(*d));
  std::vector<Stream> got(Prompts().size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < Prompts().size(); ++i)
    threads.emplace_back([&, i] { got[i] = Generate(*inference, Prompts()[i], max_new, nullptr); });
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i;
  }
  // The periodic thread notices the steps at its next poll (every 20 ms), also after the load.
  std::string metrics;
  const auto until = std::chrono::steady_clock::now() + seconds(20);
  do {
    metrics = d->metrics().Scrape();
    if (metrics.find("switchyard_planner_solve_seconds_count{policy=\"greedy\"}") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  } while (std::chrono::steady_clock::now() < until);
  EXPECT_NE(metrics.find("switchyard_planner_solve_seconds_count{policy=\"greedy\"}"), std::string::npos)
      << metrics;
  EXPECT_EQ(metrics.find("switchyard_planner_solve_seconds_count{policy=\"greedy\"} 0"), std::string::npos);
  d->Drain();
}

}  // namespace
}  // namespace sy::server
