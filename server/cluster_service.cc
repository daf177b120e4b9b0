#include "server/cluster_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "kernels/core/logging.h"
#include "server/grpc_status.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;
using std::chrono::milliseconds;

namespace {

// Blocking membership waits run in slices so that a cancelled call (the worker gave up, or
// this server shuts down) frees its handler thread soon: the server's shutdown waits for
// every handler.
constexpr milliseconds kSlice(100);
// What the rendezvous store takes (Gloo keeps a few dozen bytes per rank there).
constexpr size_t kMaxStoreKey = 256;
constexpr size_t kMaxStoreValue = 64 << 10;

std::string Describe(const v1::ModelFingerprint& m) {
  return absl::StrCat(m.model_type(), ", ", m.num_layers(), " layers, hidden ", m.hidden_size(),
                      ", ", m.num_experts(), " experts of ", m.moe_intermediate_size(), " (top-",
                      m.num_experts_per_tok(), "), vocab ", m.vocab_size(), ", dtype ", m.dtype());
}

}  // namespace

void ToProto(const parallel::EpochView& view, v1::EpochAssignment* out) {
  out->set_epoch(view.epoch);
  for (int32_t id : view.members) out->add_members(id);
  out->set_store_prefix(view.store_prefix);
  out->set_placement_json(view.placement_json);
}

parallel::EpochView FromProto(const v1::EpochAssignment& a) {
  parallel::EpochView v;
  v.epoch = a.epoch();
  v.members.assign(a.members().begin(), a.members().end());
  v.store_prefix = a.store_prefix();
  v.placement_json = a.placement_json();
  return v;
}

ClusterService::ClusterService(ClusterServiceOptions options, parallel::Membership* membership)
    : options_(std::move(options)), verifier_(options_.secret), membership_(membership) {}

grpc::Status ClusterService::CheckAuth(grpc::ServerContext* ctx, absl::string_view method,
                                       const google::protobuf::Message& req,
                                       const std::string& auth) const {
  const std::string peer = ctx != nullptr ? ctx->peer() : "";
  if (absl::Status s = limiter_.Admit(peer); !s.ok()) return ToGrpcStatus(s);
  if (absl::Status s = verifier_.Verify(method, req, auth); !s.ok()) {
    if (s.code() == absl::StatusCode::kPermissionDenied) limiter_.Failed(peer);
    // At most one line per 5 s: a wrong secret is said, a flood is not.
    const int64_t now = std::chrono::duration_cast<milliseconds>(
                            std::chrono::steady_clock::now().time_since_epoch()).count();
    int64_t last = last_refusal_log_ms_.load();
    if (now - last > 5000 && last_refusal_log_ms_.compare_exchange_strong(last, now))
      SY_LOG(WARNING) << "cluster: refused " << method << " from " << peer << ": " << s.message();
    return ToGrpcStatus(s);
  }
  return grpc::Status::OK;
}

grpc::Status ClusterService::Join(grpc::ServerContext* ctx, const v1::JoinRequest* req,
                                  v1::JoinReply* reply) {
  if (grpc::Status s = CheckAuth(ctx, "Join", *req, req->auth()); !s.ok()) return s;
  if (req->host().size() > 255)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "host: longer than 255 bytes");
  const v1::ModelFingerprint& m = req->model();
  const v1::ModelFingerprint& want = options_.model;
  if (m.model_type() != want.model_type() || m.num_layers() != want.num_layers() ||
      m.hidden_size() != want.hidden_size() || m.num_experts() != want.num_experts() ||
      m.vocab_size() != want.vocab_size() || m.dtype() != want.dtype() ||
      m.moe_intermediate_size() != want.moe_intermediate_size() ||
      m.num_experts_per_tok() != want.num_experts_per_tok())
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("the worker's model (", Describe(m),
                                     ") differs from the leader's (", Describe(want), ")"));
  const int64_t blocks =
      options_.kv_bytes_per_block > 0 ? req->kv_cache_bytes() / options_.kv_bytes_per_block : 0;
  if (blocks < 1)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("kv_cache_bytes: ", req->kv_cache_bytes(),
                                     " bytes hold no KV block of ", options_.kv_bytes_per_block,
                                     " bytes (worker --kv-cache-bytes)"));
  absl::StatusOr<int32_t> id = membership_->AddJoining(req->host(), req->instance(), blocks);
  if (!id.ok()) return ToGrpcStatus(id.status());
  SY_LOG(INFO) << "cluster: " << req->host() << " asks to join; rank id " << *id;
  const auto deadline = std::chrono::steady_clock::now() + options_.join_wait;
  absl::StatusOr<parallel::EpochView> view = absl::DeadlineExceededError("");
  for (;;) {
    view = membership_->AwaitJoin(*id, kSlice);
    if (view.ok() || view.status().code() != absl::StatusCode::kDeadlineExceeded) break;
    if (ctx->IsCancelled() || std::chrono::steady_clock::now() >= deadline) {
      membership_->RefuseJoin({*id}, absl::CancelledError("the join call ended"));
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          "the leader did not place the rank in time");
    }
  }
  if (!view.ok()) return ToGrpcStatus(view.status());
  reply->set_rank(*id);
  ToProto(*view, reply->mutable_epoch());
  reply->set_model_dir_hint(options_.model_dir);
  reply->set_collective_timeout_ms(options_.collective_timeout_ms);
  reply->set_num_kv_blocks(blocks);
  reply->set_kv_block_size(options_.kv_block_size);
  reply->set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  reply->set_transport(options_.transport);
  reply->set_two_batch_overlap(options_.two_batch_overlap);
  return grpc::Status::OK;
}

grpc::Status ClusterService::AwaitRestart(grpc::ServerContext* ctx,
                                          const v1::AwaitRestartRequest* req,
                                          v1::EpochAssignment* reply) {
  if (grpc::Status s = CheckAuth(ctx, "AwaitRestart", *req, req->auth()); !s.ok()) return s;
  if (absl::Status s = membership_->CheckInstance(req->rank(), req->instance()); !s.ok())
    return ToGrpcStatus(s);
  const auto deadline = std::chrono::steady_clock::now() +
                        milliseconds(std::clamp<int64_t>(req->timeout_ms(), 0, 600000));
  for (;;) {
    absl::StatusOr<parallel::EpochView> v =
        membership_->AwaitRestart(req->rank(), req->after_epoch(), kSlice);
    if (v.ok()) {
      ToProto(*v, reply);
      return grpc::Status::OK;
    }
    if (v.status().code() != absl::StatusCode::kDeadlineExceeded) return ToGrpcStatus(v.status());
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled");
    if (std::chrono::steady_clock::now() >= deadline) return ToGrpcStatus(v.status());
  }
}

grpc::Status ClusterService::Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                                       v1::HeartbeatReply* reply) {
  if (grpc::Status s = CheckAuth(ctx, "Heartbeat", *req, req->auth()); !s.ok()) return s;
  if (absl::Status s = membership_->CheckInstance(req->rank(), req->instance()); !s.ok())
    return ToGrpcStatus(s);
  absl::StatusOr<parallel::HeartbeatReply> r = membership_->Heartbeat(req->rank());
  if (!r.ok()) return ToGrpcStatus(r.status());
  reply->set_membership_epoch(r->epoch);
  reply->set_broken_epoch(r->broken_epoch);
  reply->set_fenced(r->fenced);
  return grpc::Status::OK;
}

grpc::Status ClusterService::Leave(grpc::ServerContext* ctx, const v1::LeaveRequest* req,
                                   v1::LeaveReply*) {
  if (grpc::Status s = CheckAuth(ctx, "Leave", *req, req->auth()); !s.ok()) return s;
  if (absl::Status s = membership_->CheckInstance(req->rank(), req->instance()); !s.ok())
    return ToGrpcStatus(s);
  return ToGrpcStatus(membership_->RequestDrain(req->rank()));
}

grpc::Status ClusterService::StoreSet(grpc::ServerContext* ctx, const v1::StoreSetRequest* req,
                                      v1::StoreSetReply*) {
  if (grpc::Status s = CheckAuth(ctx, "StoreSet", *req, req->auth()); !s.ok()) return s;
  if (req->key().size() > kMaxStoreKey || req->value().size() > kMaxStoreValue)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("rendezvous store: keys up to ", kMaxStoreKey,
                                     " bytes and values up to ", kMaxStoreValue, " bytes"));
  return ToGrpcStatus(membership_->store()->Set(req->key(), req->value()));
}

grpc::Status ClusterService::StoreGet(grpc::ServerContext* ctx, const v1::StoreGetRequest* req,
                                      v1::StoreGetReply* reply) {
  if (grpc::Status s = CheckAuth(ctx, "StoreGet", *req, req->auth()); !s.ok()) return s;
  const int64_t ms = std::clamp<int64_t>(req->timeout_ms(), 0, 600000);
  const auto deadline = std::chrono::steady_clock::now() + milliseconds(ms);
  for (;;) {
    const auto left = std::chrono::duration_cast<milliseconds>(
        deadline - std::chrono::steady_clock::now());
    absl::StatusOr<std::string> v =
        membership_->store()->Get(req->key(), std::clamp(left, milliseconds(0), kSlice));
    if (v.ok()) {
      reply->set_value(*v);
      return grpc::Status::OK;
    }
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled");
    if (left <= kSlice) return ToGrpcStatus(v.status());
  }
}

absl::StatusOr<std::unique_ptr<grpc::Server>> StartClusterServer(
    const std::string& host, int port, ClusterService* service, int* bound_port,
    std::shared_ptr<grpc::ServerCredentials> credentials) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(host, ":", port),
                           credentials != nullptr ? credentials : grpc::InsecureServerCredentials(),
                           bound_port);
  builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *bound_port == 0)
    return absl::UnavailableError(
        absl::StrCat("--cluster-port: cannot listen on ", host, ":", port));
  return server;
}

}  // namespace sy::server
