// Live rebalancing with the ranks as processes over Gloo: `switchyard serve
// --min-ranks 4` and three `switchyard worker`s on 127.0.0.1. While requests stream, a
// placement is applied and a rebalance planned through Admin; every request's greedy tokens
// equal the one-rank reference, and the load statistics gathered from all four processes add
// up to the tokens run.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/core/logging.h"
#include "model/moe_model.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/trace.h"
#include "switchyard/v1/admin.grpc.pb.h"
#include "switchyard/v1/inference.grpc.pb.h"
#include "tests/testing/child_process.h"
#include "tests/testing/model_fixtures.h"

namespace sy::server {
namespace {
namespace v1 = ::switchyard::v1;
using std::chrono::milliseconds;
using std::chrono::seconds;

using Proc = sy::testing::ChildProcess;

std::vector<std::vector<int32_t>> Prompts() {
  return {{1, 17, 42, 99, 5}, {300, 2}, {7, 7, 7, 7, 7, 7, 7, 11}, {450}, {23, 64, 128}, {5, 6}};
}

std::vector<int32_t> Stream(v1::Inference::Stub& stub, const std::vector<int32_t>& prompt,
                            int max_new, std::atomic<int>* chunks, grpc::Status* status) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(120));
  v1::GenerateRequest req;
  for (int32_t id : prompt) req.mutable_token_ids()->add_ids(id);
  req.mutable_sampling()->set_max_new_tokens(max_new);
  req.mutable_sampling()->set_ignore_eos(true);
  req.set_stream(true);
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::vector<int32_t> tokens;
  while (reader->Read(&resp))
    if (resp.has_chunk()) {
      tokens.insert(tokens.end(), resp.chunk().token_ids().begin(), resp.chunk().token_ids().end());
      chunks->fetch_add(1);
    }
  *status = reader->Finish();
  return tokens;
}

TEST(LiveRebalanceProcessTest, GlooRanksSwitchPlacementMidStreamWithTheSameGreedyTokens) {
  const int ranks = 4, max_new = 64;
  const std::string dir = sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
  auto m = model::MoeModel::Load(dir);
  ASSERT_TRUE(m.ok());
  std::vector<std::vector<int32_t>> want;
  for (const auto& p : Prompts()) want.push_back(sy::testing::GreedyGenerate(**m, p, max_new));
  const model::ModelConfig& c = (*m)->config();

  const std::string tmp = sy::testing::MakeTempDir("live-rebalance");
  Proc leader(tmp, "leader",
              {"serve", "--model", dir, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
               "--min-ranks", absl::StrCat(ranks), "--cluster-port", "0", "--secret", "s",
               "--admin-token", "tok", "--kv-cache-bytes", absl::StrCat(8 << 20),
               "--collective-timeout-ms", "20000", "--rank-wait-timeout", "60"});
  const int cluster_port = leader.WaitForPort("cluster service on ", milliseconds(30000));
  ASSERT_GT(cluster_port, 0) << leader.err();
  std::vector<std::unique_ptr<Proc>> workers;
  for (int r = 1; r < ranks; ++r)
    workers.push_back(std::make_unique<Proc>(
        tmp, absl::StrCat("worker", r),
        std::vector<std::string>{"worker", "--join", absl::StrCat("127.0.0.1:", cluster_port),
                                 "--secret", "s", "--model", dir, "--join-timeout", "20"}));
  const int port = leader.WaitForPort("serving on ", milliseconds(60000));
  ASSERT_GT(port, 0) << leader.err();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  auto inference = v1::Inference::NewStub(channel);
  auto admin = v1::Admin::NewStub(channel);
  auto admin_ctx = [](grpc::ClientContext* ctx) {
    ctx->set_deadline(std::chrono::system_clock::now() + seconds(60));
    ctx->AddMetadata("authorization", "Bearer tok");
  };

  std::atomic<int> chunks{0}, finished{0};
  std::vector<std::vector<int32_t>> got(Prompts().size());
  std::vector<grpc::Status> status(Prompts().size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < Prompts().size(); ++i)
    threads.emplace_back([&, i] {
      got[i] = Stream(*inference, Prompts()[i], max_new, &chunks, &status[i]);
      finished.fetch_add(1);
    });
  const auto until = std::chrono::steady_clock::now() + seconds(60);
  while (chunks.load() < 20 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(milliseconds(1));

  // Every expert one rank on: each rank gains and frees one expert per MoE layer.
  const int E = static_cast<int>(c.num_experts), S = (E + ranks - 1) / ranks;
  std::vector<std::vector<int32_t>> rows(c.num_layers, std::vector<int32_t>(ranks * S, -1));
  for (auto& row : rows)
    for (int e = 0; e < E; ++e) row[((e / S + 1) % ranks) * S + e % S] = e;
  auto shifted = parallel::ExpertPlacement::Create(ranks, S, E, rows);
  ASSERT_TRUE(shifted.ok()) << shifted.status();
  // The placement the joins left in force (planned with the migration term), to count the
  // experts each rank gains.
  parallel::ExpertPlacement before = *shifted;
  int64_t before_epoch = 0;
  {
    grpc::ClientContext ctx;
    admin_ctx(&ctx);
    v1::Placement p;
    ASSERT_TRUE(admin->GetPlacement(&ctx, v1::GetPlacementRequest{}, &p).ok());
    auto parsed = parallel::ExpertPlacement::FromJson(p.placement_json());
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    before = *parsed;
    before_epoch = p.epoch();
  }
  int64_t gains = 0;
  for (int l : (*m)->MoeLayerIds())
    for (int r = 0; r < ranks; ++r) {
      const auto now = parallel::ExpertsOfRank(before, r)[l], next = parallel::ExpertsOfRank(*shifted, r)[l];
      for (int32_t e : next) gains += std::find(now.begin(), now.end(), e) == now.end();
    }
  const int finished_before = finished.load();
  {
    grpc::ClientContext ctx;
    admin_ctx(&ctx);
    v1::ApplyPlacementRequest req;
    req.set_placement_json(shifted->ToJson());
    v1::ApplyPlacementResponse resp;
    grpc::Status s = admin->ApplyPlacement(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message() << leader.err();
    EXPECT_EQ(resp.epoch(), before_epoch + 1);
    EXPECT_EQ(resp.experts_gained(), gains);
  }
  EXPECT_LT(finished_before, static_cast<int>(Prompts().size())) << "applied after the load ended";
  {
    grpc::ClientContext ctx;
    admin_ctx(&ctx);
    v1::RebalanceRequest req;
    req.set_policy("greedy");
    v1::RebalanceReport r;
    grpc::Status s = admin->Rebalance(&ctx, req, &r);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_GT(r.window_tokens(), 0);
  }
  for (auto& t : threads) t.join();
  int64_t tokens_run = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(status[i].ok()) << status[i].error_message();
    EXPECT_EQ(got[i], want[i]) << "prompt " << i;
    tokens_run += static_cast<int64_t>(Prompts()[i].size()) + max_new - 1;
  }
  // The window holds every token of the four processes.
  grpc::ClientContext ctx;
  admin_ctx(&ctx);
  v1::ExpertLoad load;
  ASSERT_TRUE(admin->GetExpertLoad(&ctx, v1::GetExpertLoadRequest(), &load).ok());
  EXPECT_EQ(load.num_tokens(), tokens_run);
  auto trace = parallel::planner::ParseTrace(load.trace_json());
  ASSERT_TRUE(trace.ok()) << trace.status();
  for (const auto& counts : trace->expert_counts) {
    double sum = 0;
    for (double v : counts) sum += v;
    EXPECT_EQ(sum, static_cast<double>(tokens_run * c.num_experts_per_tok));
  }
}

}  // namespace
}  // namespace sy::server
