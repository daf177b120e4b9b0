#include "server/worker.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "kernels/core/status.h"
#include "kernels/core/thread_pool.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"
#include "parallel/ep_dispatch.h"
#include "parallel/expert_placement.h"
#include "parallel/gloo_communicator.h"
#include "parallel/grpc_rendezvous_store.h"
#include "scheduler/distributed_executor.h"
#include "server/daemon.h"
#include "server/grpc_status.h"
#include "switchyard/v1/cluster.grpc.pb.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

absl::Status RunWorker(const WorkerOptions& options,
                       const std::function<void(const std::string&)>& progress) {
  WorkerOptions o = options;
  if (o.secret.empty())
    if (const char* env = std::getenv("SWITCHYARD_CLUSTER_SECRET")) o.secret = env;
  auto say = [&](const std::string& s) {
    if (progress) progress(s);
  };
  if (o.join.empty()) return absl::InvalidArgumentError("--join: the leader's HOST:PORT is required");
  if (o.secret.empty()) return absl::InvalidArgumentError("--secret: the cluster secret is required");
  if (o.threads > 0) ThreadPool::SetDefaultThreads(o.threads);
  SY_ASSIGN_OR_RETURN(const std::string dir, ResolveModelDir(o.model, progress));
  SY_ASSIGN_OR_RETURN(const model::ModelConfig config,
                      model::ModelConfig::FromFile((std::filesystem::path(dir) / "config.json").string()));

  // Join, retrying while the leader is not up yet.
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(o.join, grpc::InsecureChannelCredentials());
  auto stub = v1::Cluster::NewStub(channel);
  v1::JoinRequest req;
  req.set_secret(o.secret);
  req.set_host(o.host);
  req.mutable_model()->set_model_type(config.model_type);
  req.mutable_model()->set_num_layers(config.num_layers);
  req.mutable_model()->set_hidden_size(config.hidden_size);
  req.mutable_model()->set_num_experts(config.num_experts);
  req.mutable_model()->set_vocab_size(config.vocab_size);
  v1::JoinReply reply;
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(o.join_timeout_s * 1000));
  for (;;) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::Status s = stub->Join(&ctx, req, &reply);
    if (s.ok()) break;
    const bool retry = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!retry || std::chrono::steady_clock::now() >= give_up)
      return sy::Annotate(FromGrpcStatus(s), absl::StrCat("joining ", o.join));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  const int rank = reply.rank(), world = reply.world_size();
  say(absl::StrCat("joined ", o.join, " as rank ", rank, " of ", world, " (epoch ",
                   reply.membership_epoch(), ")"));

  SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement placement,
                      parallel::ExpertPlacement::FromJson(reply.placement_json()));
  if (placement.num_ranks() != world)
    return absl::InternalError(absl::StrCat("the leader's placement has ", placement.num_ranks(),
                                            " ranks, the group ", world));
  auto shared_placement = std::make_shared<const parallel::ExpertPlacement>(std::move(placement));
  model::LoadOptions lo;
  lo.backend = o.backend;
  lo.experts_per_layer = scheduler::ExpertsOfRank(*shared_placement, rank);
  say(absl::StrCat("loading ", dir, " (rank ", rank, "'s experts)"));
  SY_ASSIGN_OR_RETURN(std::unique_ptr<model::MoeModel> m, model::MoeModel::Load(dir, lo));

  parallel::GrpcRendezvousStore store(channel, o.secret);
  parallel::GlooOptions go;
  go.rank = rank;
  go.world_size = world;
  go.store = &store;
  go.prefix = reply.store_prefix();
  go.hostname = o.host;
  go.timeout = std::chrono::milliseconds(reply.collective_timeout_ms());
  auto comm = parallel::CreateGlooCommunicator(go);
  if (!comm.ok()) return sy::Annotate(comm.status(), "connecting to the other ranks");
  SY_ASSIGN_OR_RETURN(auto dispatcher,
                      parallel::MakeExpertParallelDispatcher(comm->get(), shared_placement));
  m->SetDispatcher(dispatcher.get());
  model::KvCache cache(m->config(), reply.num_kv_blocks(), reply.kv_block_size());
  say(absl::StrCat("rank ", rank, " connected; serving steps"));
  absl::Status s = scheduler::RunRankLoop(comm->get(), m.get(), &cache);
  m->SetDispatcher(nullptr);
  return s;
}

}  // namespace sy::server
