// Helpers of the multi-rank server tests: a greedy Generate over the public API, health, the
// one-rank reference, a leader process (`switchyard serve --secret`) with worker processes on
// 127.0.0.1 (OS-picked ports), Admin calls on the group, and a load driver that keeps
// streams running while a test changes the group.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "kernels/core/logging.h"
#include "model/moe_model.h"
#include "switchyard/v1/admin.grpc.pb.h"
#include "switchyard/v1/inference.grpc.pb.h"
#include "tests/testing/child_process.h"
#include "tests/testing/model_fixtures.h"

namespace sy::server::testing {

namespace v1 = ::switchyard::v1;
using std::chrono::milliseconds;
using std::chrono::seconds;

inline constexpr char kSecret[] = "test-secret-7f3a";
inline constexpr int64_t kKvBytes = 2 << 20;

inline int PortAfterColon(const std::string& s) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos) return 0;
  return std::atoi(s.c_str() + colon + 1);
}

struct GenResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  bool ran = false;  // LoadDriver: the request was sent
};

// Greedy (or seeded, temperature > 0) Generate over the public API; `on_first_chunk` runs
// after the first streamed chunk.
inline GenResult Generate(const std::string& addr, const std::vector<int32_t>& prompt, int max_new,
                          const std::function<void()>& on_first_chunk = nullptr,
                          seconds deadline = seconds(60), float temperature = 0,
                          uint64_t seed = 0) {
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + deadline);
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_temperature(temperature);
  req.mutable_sampling()->set_seed(seed);
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

inline grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& addr) {
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

inline std::vector<std::vector<int32_t>> Prompts() {
  return {{1, 17, 42, 99, 5}, {300, 2}, {7, 7, 7, 7, 7, 7, 7, 11}, {450}, {23, 64, 128}};
}

// `n` different prompts.
inline std::vector<std::vector<int32_t>> ManyPrompts(int n) {
  std::vector<std::vector<int32_t>> out;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 2 + i % 9; ++j) p.push_back((i * 53 + j * 17 + 3) % 400);
    out.push_back(p);
  }
  return out;
}

// The plain reference: one rank, the whole model, one sequence at a time.
inline std::vector<std::vector<int32_t>> Reference(const std::string& dir, int max_new,
                                                   const std::vector<std::vector<int32_t>>& prompts = Prompts()) {
  auto m = model::MoeModel::Load(dir);
  SY_CHECK(m.ok()) << m.status();
  std::vector<std::vector<int32_t>> out;
  for (const auto& p : prompts) out.push_back(sy::testing::GreedyGenerate(**m, p, max_new));
  return out;
}

inline std::string TinyDir() {
  return sy::testing::SyntheticModelDir(model::Arch::kMixtral, "tiny", DType::kF32);
}

using Child = sy::testing::ChildProcess;

// A leader (`serve --secret S --min-ranks N`) and its workers, all on 127.0.0.1.
class ProcessGroup {
 public:
  ProcessGroup(const std::string& model_dir, int min_ranks, int64_t collective_timeout_ms = 20000,
               std::vector<std::string> extra = {})
      : tmp_(sy::testing::MakeTempDir("cluster")), model_dir_(model_dir) {
    std::vector<std::string> args{"serve", "--model", model_dir, "--host", "127.0.0.1", "--port", "0",
                                  "--metrics-port", "0", "--min-ranks", absl::StrCat(min_ranks),
                                  "--cluster-port", "0", "--secret", kSecret,
                                  "--kv-cache-bytes", absl::StrCat(kKvBytes),
                                  "--collective-timeout-ms", absl::StrCat(collective_timeout_ms),
                                  "--rank-wait-timeout", "60"};
    args.insert(args.end(), extra.begin(), extra.end());
    leader_ = std::make_unique<Child>(tmp_, "leader", args);
    cluster_port_ = PortAfterColon(leader_->WaitForLine("cluster service on ", milliseconds(30000)));
    port_ = PortAfterColon(leader_->WaitForLine("listening on ", milliseconds(1000)));
    metrics_port_ = PortAfterColon(leader_->WaitForLine("metrics on http://", milliseconds(1000)));
  }
  Child* AddWorker(const std::string& secret = kSecret, std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"worker", "--join", absl::StrCat("127.0.0.1:", cluster_port_),
                                  "--secret", secret, "--model", model_dir_, "--join-timeout", "20",
                                  "--kv-cache-bytes", absl::StrCat(kKvBytes)};
    args.insert(args.end(), extra.begin(), extra.end());
    workers_.push_back(std::make_unique<Child>(tmp_, absl::StrCat("worker", workers_.size()), args));
    return workers_.back().get();
  }
  bool WaitServing() { return !leader_->WaitForLine("serving on ", milliseconds(60000)).empty(); }
  std::string addr() const { return absl::StrCat("127.0.0.1:", port_); }
  int cluster_port() const { return cluster_port_; }
  int metrics_port() const { return metrics_port_; }
  Child& leader() { return *leader_; }
  Child& worker(size_t i) { return *workers_[i]; }
  std::string Logs() {
    std::string s = absl::StrCat("--- leader stderr:\n", leader_->err());
    for (size_t i = 0; i < workers_.size(); ++i)
      absl::StrAppend(&s, "--- worker ", i, " stderr:\n", workers_[i]->err());
    return s;
  }

  v1::Membership Membership() {
    auto stub = v1::Admin::NewStub(grpc::CreateChannel(addr(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
    v1::Membership m;
    grpc::Status s = stub->GetMembership(&ctx, v1::GetMembershipRequest{}, &m);
    if (!s.ok()) m.set_world_size(-1);
    return m;
  }
  // Waits until `n` ranks serve in the epoch in force (and none is re-forming).
  bool WaitWorld(int n, seconds timeout = seconds(60)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const v1::Membership m = Membership();
      if (m.world_size() == n && !m.reforming()) {
        bool settled = true;
        for (const auto& r : m.ranks()) settled = settled && r.state() != "joining";
        if (settled) return true;
      }
      std::this_thread::sleep_for(milliseconds(20));
    }
    return false;
  }
  grpc::Status DrainRank(int rank, bool wait, v1::DrainRankResponse* out = nullptr) {
    auto stub = v1::Admin::NewStub(grpc::CreateChannel(addr(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(90));
    v1::DrainRankRequest req;
    req.set_rank(rank);
    req.set_wait(wait);
    v1::DrainRankResponse resp;
    grpc::Status s = stub->DrainRank(&ctx, req, &resp);
    if (out != nullptr) *out = resp;
    return s;
  }

 private:
  std::string tmp_, model_dir_;
  std::unique_ptr<Child> leader_;
  std::vector<std::unique_ptr<Child>> workers_;
  int cluster_port_ = 0, port_ = 0, metrics_port_ = 0;
};

// Keeps `concurrency` streams running over `prompts` (request i takes prompt i % size) until
// `total` requests were sent or Stop(); records every result.
class LoadDriver {
 public:
  LoadDriver(std::string addr, std::vector<std::vector<int32_t>> prompts, int max_new,
             int concurrency, int total, float temperature = 0)
      : addr_(std::move(addr)), prompts_(std::move(prompts)), max_new_(max_new), total_(total),
        temperature_(temperature), results_(total) {
    for (int t = 0; t < concurrency; ++t)
      threads_.emplace_back([this] {
        for (int i = next_++; i < total_ && !stop_.load(); i = next_++) {
          results_[i] = Generate(addr_, prompts_[i % prompts_.size()], max_new_,
                                 [this] { ++started_; }, seconds(120), temperature_, 1000 + i);
          results_[i].ran = true;
          ++done_;
        }
      });
  }
  ~LoadDriver() {
    Stop();
    Join();
  }
  // No new request starts; the running ones finish.
  void Stop() { stop_ = true; }
  void Join() {
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }
  int done() const { return done_.load(); }
  int started() const { return started_.load(); }
  // Waits until `n` requests have started streaming.
  bool WaitStarted(int n, seconds timeout = seconds(60)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (started_.load() < n && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(milliseconds(5));
    return started_.load() >= n;
  }
  const GenResult& result(int i) const { return results_[i]; }
  int total() const { return total_; }
  int prompt_of(int i) const { return static_cast<int>(i % prompts_.size()); }

 private:
  std::string addr_;
  std::vector<std::vector<int32_t>> prompts_;
  int max_new_, total_;
  float temperature_;
  std::vector<GenResult> results_;
  std::atomic<int> next_{0}, done_{0}, started_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

}  // namespace sy::server::testing
