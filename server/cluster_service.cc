#include "server/cluster_service.h"

#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "kernels/core/logging.h"
#include "server/grpc_status.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  // Every byte of the longer string is read, so the time does not tell how many bytes match.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

ClusterService::ClusterService(ClusterServiceOptions options) : options_(std::move(options)) {}

grpc::Status ClusterService::CheckSecret(const std::string& secret) const {
  if (options_.secret.empty() || !ConstantTimeEquals(secret, options_.secret))
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "wrong cluster secret");
  return grpc::Status::OK;
}

absl::Status ClusterService::WaitForRanks(std::chrono::milliseconds timeout,
                                          const std::atomic<bool>* cancel) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::unique_lock<std::mutex> lock(mu_);
  while (next_rank_ < options_.world_size) {
    if (cancel != nullptr && cancel->load())
      return absl::CancelledError("stopped waiting for ranks: the server is shutting down");
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) break;
    cv_.wait_for(lock, std::min<std::chrono::steady_clock::duration>(deadline - now,
                                                                     std::chrono::milliseconds(50)));
  }
  if (next_rank_ < options_.world_size)
    return absl::DeadlineExceededError(
        absl::StrCat("only ", next_rank_, " of ", options_.world_size, " ranks joined within ",
                     timeout.count() / 1000.0, " s (--min-ranks)"));
  return absl::OkStatus();
}

int ClusterService::joined() const {
  std::lock_guard<std::mutex> lock(mu_);
  return next_rank_;
}

void ClusterService::SetServing(bool serving) {
  std::lock_guard<std::mutex> lock(mu_);
  serving_ = serving;
}

grpc::Status ClusterService::Join(grpc::ServerContext*, const v1::JoinRequest* req,
                                  v1::JoinReply* reply) {
  if (grpc::Status s = CheckSecret(req->secret()); !s.ok()) {
    SY_LOG(WARNING) << "cluster: refused a join from " << req->host() << ": wrong secret";
    return s;
  }
  const v1::ModelFingerprint& m = req->model();
  const v1::ModelFingerprint& want = options_.model;
  if (m.model_type() != want.model_type() || m.num_layers() != want.num_layers() ||
      m.hidden_size() != want.hidden_size() || m.num_experts() != want.num_experts() ||
      m.vocab_size() != want.vocab_size())
    return grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrCat("the worker's model (", m.model_type(), ", ", m.num_layers(), " layers, hidden ",
                     m.hidden_size(), ", ", m.num_experts(), " experts, vocab ", m.vocab_size(),
                     ") differs from the leader's (", want.model_type(), ", ", want.num_layers(),
                     " layers, hidden ", want.hidden_size(), ", ", want.num_experts(),
                     " experts, vocab ", want.vocab_size(), ")"));
  int rank = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (next_rank_ >= options_.world_size)
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrCat("all ", options_.world_size,
                                       " ranks are taken (no elastic scale-up yet)"));
    rank = next_rank_++;
    cv_.notify_all();
  }
  SY_LOG(INFO) << "cluster: " << req->host() << " joined as rank " << rank << " of "
               << options_.world_size;
  reply->set_rank(rank);
  reply->set_world_size(options_.world_size);
  reply->set_membership_epoch(options_.membership_epoch);
  reply->set_model_dir_hint(options_.model_dir);
  reply->set_placement_json(options_.placement_json);
  reply->set_store_prefix(options_.store_prefix);
  reply->set_collective_timeout_ms(options_.collective_timeout_ms);
  reply->set_num_kv_blocks(options_.num_kv_blocks);
  reply->set_kv_block_size(options_.kv_block_size);
  return grpc::Status::OK;
}

grpc::Status ClusterService::StoreSet(grpc::ServerContext*, const v1::StoreSetRequest* req,
                                      v1::StoreSetReply*) {
  if (grpc::Status s = CheckSecret(req->secret()); !s.ok()) return s;
  return ToGrpcStatus(store_.Set(req->key(), req->value()));
}

grpc::Status ClusterService::StoreGet(grpc::ServerContext* ctx, const v1::StoreGetRequest* req,
                                      v1::StoreGetReply* reply) {
  if (grpc::Status s = CheckSecret(req->secret()); !s.ok()) return s;
  const int64_t ms = std::clamp<int64_t>(req->timeout_ms(), 0, 600000);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  // Waits in slices so that a cancelled call (the worker gave up, or this server shuts down)
  // frees its handler thread soon: the server's shutdown waits for every handler.
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    absl::StatusOr<std::string> v =
        store_.Get(req->key(), std::clamp(left, std::chrono::milliseconds(0),
                                          std::chrono::milliseconds(100)));
    if (v.ok()) {
      reply->set_value(*v);
      return grpc::Status::OK;
    }
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled");
    if (left <= std::chrono::milliseconds(100)) return ToGrpcStatus(v.status());
  }
}

grpc::Status ClusterService::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req,
                                       v1::HeartbeatReply* reply) {
  if (grpc::Status s = CheckSecret(req->secret()); !s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  reply->set_membership_epoch(options_.membership_epoch);
  reply->set_world_size(options_.world_size);
  reply->set_serving(serving_);
  return grpc::Status::OK;
}

absl::StatusOr<std::unique_ptr<grpc::Server>> StartClusterServer(const std::string& host, int port,
                                                                 ClusterService* service,
                                                                 int* bound_port) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(host, ":", port), grpc::InsecureServerCredentials(),
                           bound_port);
  builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *bound_port == 0)
    return absl::UnavailableError(
        absl::StrCat("--cluster-port: cannot listen on ", host, ":", port));
  return server;
}

}  // namespace sy::server
