#include "server/worker.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "kernels/core/thread_pool.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"
#include "parallel/transport.h"
#include "parallel/membership.h"
#include "scheduler/rank_runner.h"
#include "server/cluster_auth.h"
#include "server/cluster_service.h"
#include "server/daemon.h"
#include "server/grpc_rendezvous_store.h"
#include "server/grpc_status.h"
#include "server/net_address.h"
#include "server/secrets.h"
#include "server/worker_metrics.h"
#include "switchyard/v1/cluster.grpc.pb.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;
using std::chrono::milliseconds;

namespace {

// The rank side of the membership protocol over the leader's Cluster service.
class GrpcMembershipClient final : public parallel::MembershipClient {
 public:
  GrpcMembershipClient(std::shared_ptr<grpc::Channel> channel, std::string secret)
      : stub_(v1::Cluster::NewStub(channel)), secret_(std::move(secret)) {}
  // The nonce this process joined with (sent with every call).
  void set_instance(uint64_t instance) { instance_ = instance; }

  absl::StatusOr<parallel::EpochView> AwaitRestart(int32_t id, int64_t after_epoch,
                                                   milliseconds timeout) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + timeout + std::chrono::seconds(5));
    v1::AwaitRestartRequest req;
    req.set_rank(id);
    req.set_after_epoch(after_epoch);
    req.set_timeout_ms(timeout.count());
    req.set_instance(instance_);
    SignRequest(secret_, "AwaitRestart", &req);
    v1::EpochAssignment reply;
    grpc::Status s = stub_->AwaitRestart(&ctx, req, &reply);
    if (!s.ok()) return FromGrpcStatus(s);
    return FromProto(reply);
  }

  absl::StatusOr<parallel::HeartbeatReply> Heartbeat(int32_t id) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::HeartbeatRequest req;
    req.set_rank(id);
    req.set_instance(instance_);
    SignRequest(secret_, "Heartbeat", &req);
    v1::HeartbeatReply reply;
    grpc::Status s = stub_->Heartbeat(&ctx, req, &reply);
    if (!s.ok()) return FromGrpcStatus(s);
    parallel::HeartbeatReply r;
    r.epoch = reply.membership_epoch();
    r.broken_epoch = reply.broken_epoch();
    r.fenced = reply.fenced();
    return r;
  }

  absl::Status Leave(int32_t id) override {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::LeaveRequest req;
    req.set_rank(id);
    req.set_instance(instance_);
    SignRequest(secret_, "Leave", &req);
    v1::LeaveReply reply;
    return FromGrpcStatus(stub_->Leave(&ctx, req, &reply));
  }

 private:
  std::unique_ptr<v1::Cluster::Stub> stub_;
  std::string secret_;
  std::atomic<uint64_t> instance_{0};
};

uint64_t RandomInstance() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(getpid());
}

bool Retryable(absl::StatusCode c) {
  return c == absl::StatusCode::kUnavailable || c == absl::StatusCode::kDeadlineExceeded ||
         c == absl::StatusCode::kAborted;
}

}  // namespace

absl::Status RunWorker(const WorkerOptions& options,
                       const std::function<void(const std::string&)>& progress,
                       const std::atomic<bool>* leave) {
  WorkerOptions o = options;
  SY_ASSIGN_OR_RETURN(o.secret, ReadSecret(o.secret, o.secret_file, "secret-file",
                                            "SWITCHYARD_CLUSTER_SECRET"));
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };
  auto leaving = [&] { return leave != nullptr && leave->load(); };
  if (o.join.empty()) return absl::InvalidArgumentError("--join: the leader's HOST:PORT is required");
  if (o.secret.empty()) return absl::InvalidArgumentError("--secret: the cluster secret is required");
  if (o.threads > 0) ThreadPool::SetDefaultThreads(o.threads);
  const bool auto_host = o.host.empty();
  SY_ASSIGN_OR_RETURN(const std::string dir, ResolveModelDir(o.model, progress));
  SY_ASSIGN_OR_RETURN(const model::ModelConfig config,
                      model::ModelConfig::FromFile((std::filesystem::path(dir) / "config.json").string()));
  // The shared weights now; the experts once the leader says which (memory-mapped, cheap).
  model::LoadOptions lo;
  lo.backend = o.backend;
  lo.experts_per_layer.assign(config.num_layers, {});
  say(absl::StrCat("loading ", dir));
  const auto load_start = std::chrono::steady_clock::now();
  SY_ASSIGN_OR_RETURN(std::unique_ptr<model::MoeModel> m, model::MoeModel::Load(dir, lo));
  say(absl::StrCat("loaded the shared weights in ",
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count(),
                   " s"));

  std::unique_ptr<WorkerMetrics> metrics;
  if (o.metrics_port >= 0) {
    SY_ASSIGN_OR_RETURN(metrics, WorkerMetrics::Start(o.metrics_host, o.metrics_port));
    say(absl::StrCat("metrics on http://", o.metrics_host, ":", metrics->port(), "/metrics"));
  }

  SY_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel, MakeChannel(o.join, o.tls));
  auto stub = v1::Cluster::NewStub(channel);
  GrpcRendezvousStore store(channel, o.secret);
  GrpcMembershipClient client(channel, o.secret);
  v1::JoinRequest req;
  req.set_host(o.host);
  req.set_instance(RandomInstance());
  req.set_kv_cache_bytes(o.kv_cache_bytes);
  v1::ModelFingerprint* fp = req.mutable_model();
  fp->set_model_type(config.model_type);
  fp->set_num_layers(config.num_layers);
  fp->set_hidden_size(config.hidden_size);
  fp->set_num_experts(config.num_experts);
  fp->set_vocab_size(config.vocab_size);
  fp->set_dtype(config.torch_dtype);
  fp->set_moe_intermediate_size(config.moe_intermediate_size);
  fp->set_num_experts_per_tok(config.num_experts_per_tok);

  const milliseconds join_timeout(static_cast<int64_t>(o.join_timeout_s * 1000));
  auto give_up = std::chrono::steady_clock::now() + join_timeout;
  for (;;) {
    // Join, retrying while the leader is not up, re-forms, or could not take the rank.
    v1::JoinReply reply;
    for (;;) {
      if (leaving()) return absl::OkStatus();
      if (auto_host) {  // the interface that routes to the leader (whose name may not resolve yet)
        absl::StatusOr<std::string> local = LocalAddressTowards(HostOf(o.join));
        if (!local.ok()) {
          if (std::chrono::steady_clock::now() >= give_up)
            return sy::Annotate(absl::UnavailableError(local.status().message()),
                                absl::StrCat("joining ", o.join));
          std::this_thread::sleep_for(milliseconds(200));
          continue;
        }
        o.host = *local;
        req.set_host(o.host);
      }
      SignRequest(o.secret, "Join", &req);  // a fresh nonce and time for every attempt
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      grpc::Status s = stub->Join(&ctx, req, &reply);
      if (s.ok()) break;
      const absl::Status st = FromGrpcStatus(s);
      if (!Retryable(st.code()) || std::chrono::steady_clock::now() >= give_up)
        return sy::Annotate(st, absl::StrCat("joining ", o.join));
      std::this_thread::sleep_for(milliseconds(200));
    }
    const parallel::EpochView view = FromProto(reply.epoch());
    const int32_t id = reply.rank();
    client.set_instance(req.instance());
    say(absl::StrCat("joined ", o.join, " as rank ", id, " (epoch ", view.epoch, ", ",
                     view.world_size(), " ranks)"));

    scheduler::RankRunnerOptions ro;
    ro.id = id;
    ro.model = m.get();
    ro.num_blocks = reply.num_kv_blocks();
    ro.dispatch.two_batch_overlap = reply.two_batch_overlap();
    ro.block_size = reply.kv_block_size();
    SY_ASSIGN_OR_RETURN(
        ro.make_comm,
        parallel::ProcessCommunicatorFactory(reply.transport().empty() ? "gloo" : reply.transport(),
                                             &store, o.host, milliseconds(reply.collective_timeout_ms())));
    ro.store = &store;
    ro.client = &client;
    ro.heartbeat_interval = milliseconds(std::max<int64_t>(1, reply.heartbeat_interval_ms()));
    ro.restart_timeout = std::max(milliseconds(reply.collective_timeout_ms()), milliseconds(5000));
    scheduler::RankRunner runner(ro);
    if (metrics != nullptr) metrics->SetRunner(&runner, id);
    struct Unset {
      WorkerMetrics* m;
      ~Unset() {
        if (m != nullptr) m->SetRunner(nullptr, -1);
      }
    } unset{metrics.get()};

    // SIGTERM: ask the leader to drain this rank out; Run returns when it let the rank go.
    std::atomic<bool> done{false};
    std::thread leaver([&] {
      while (!done.load()) {
        if (leaving()) {
          say(absl::StrCat("rank ", id, ": draining out of the group"));
          absl::Status s = runner.Leave();
          if (!s.ok()) {
            SY_LOG(WARNING) << "asking the leader to drain rank " << id << ": " << s;
            runner.Kill();
          }
          return;
        }
        std::this_thread::sleep_for(milliseconds(50));
      }
    });
    absl::Status s = runner.Run(view, /*joining=*/true);
    done = true;
    leaver.join();
    const scheduler::RankExit why = runner.exit();
    if (s.ok()) {
      say(absl::StrCat("rank ", id, ": ", scheduler::RankExitName(why)));
      return absl::OkStatus();
    }
    if (leaving()) return why == scheduler::RankExit::kKilled ? s : absl::OkStatus();
    const bool again = (why == scheduler::RankExit::kFenced && o.rejoin) ||
                       why == scheduler::RankExit::kNeverFormed ||
                       why == scheduler::RankExit::kLeaderGone;
    if (!again) return s;
    say(absl::StrCat("rank ", id, ": ", scheduler::RankExitName(why), " (", s.message(),
                     "); joining again as a new rank"));
    give_up = std::chrono::steady_clock::now() + join_timeout;
    req.set_instance(RandomInstance());
  }
}

}  // namespace sy::server
