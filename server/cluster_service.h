// ClusterService: the leader's switchyard.v1.Cluster service (proto/switchyard/v1/cluster.proto,
// DESIGN.md §3 and §5): a thin gRPC face of the group's parallel::Membership. Workers join
// through it (the leader places them in the next epoch), heartbeat, check in after a failure
// (AwaitRestart), ask to leave, and meet through its rendezvous key-value store (the leader's
// own communicators use Membership::store() directly). Every call must be signed with the
// cluster secret (cluster_auth.h: an HMAC, never the secret itself); a wrong, stale, replayed or
// altered one is PERMISSION_DENIED and changes nothing, and a peer that fails 10 times in 10 s
// is refused (RESOURCE_EXHAUSTED) for a while. Keys and
// values of the rendezvous store are capped (256 bytes, 64 KiB).
//
// Runs on its own gRPC server (the --cluster-port), started by ClusterLeader.
// Thread safety: thread-safe (gRPC sync handler threads call in concurrently).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "parallel/membership.h"
#include "server/cluster_auth.h"
#include "server/secrets.h"
#include "switchyard/v1/cluster.grpc.pb.h"

namespace sy::server {

struct ClusterServiceOptions {
  std::string secret;
  ::switchyard::v1::ModelFingerprint model;  // joins with another model are refused
  std::string model_dir;
  int64_t collective_timeout_ms = 30000;
  int64_t kv_block_size = 16;
  int64_t kv_bytes_per_block = 0;  // KV cache bytes of one block of this model
  int64_t heartbeat_interval_ms = 200;
  std::string transport = "tcp";  // the group's communicator engine (parallel/transport.h)
  bool two_batch_overlap = false;  // EpDispatchOptions::two_batch_overlap of every rank
  // How long a Join waits for the leader to place the rank.
  std::chrono::milliseconds join_wait{60000};
};

class ClusterService final : public ::switchyard::v1::Cluster::Service {
 public:
  // membership: not owned; outlives the service.
  ClusterService(ClusterServiceOptions options, parallel::Membership* membership);

  grpc::Status Join(grpc::ServerContext* ctx, const ::switchyard::v1::JoinRequest* req,
                    ::switchyard::v1::JoinReply* reply) override;
  grpc::Status AwaitRestart(grpc::ServerContext* ctx,
                            const ::switchyard::v1::AwaitRestartRequest* req,
                            ::switchyard::v1::EpochAssignment* reply) override;
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const ::switchyard::v1::HeartbeatRequest* req,
                         ::switchyard::v1::HeartbeatReply* reply) override;
  grpc::Status Leave(grpc::ServerContext* ctx, const ::switchyard::v1::LeaveRequest* req,
                     ::switchyard::v1::LeaveReply* reply) override;
  grpc::Status StoreSet(grpc::ServerContext* ctx, const ::switchyard::v1::StoreSetRequest* req,
                        ::switchyard::v1::StoreSetReply* reply) override;
  grpc::Status StoreGet(grpc::ServerContext* ctx, const ::switchyard::v1::StoreGetRequest* req,
                        ::switchyard::v1::StoreGetReply* reply) override;
  int64_t auth_failures() const { return limiter_.failures(); }
  // Failed checks go to `f` too (a metric's counter).
  void set_on_auth_failure(std::function<void()> f) { limiter_.set_on_failure(std::move(f)); }

 private:
  grpc::Status CheckAuth(grpc::ServerContext* ctx, absl::string_view method,
                         const google::protobuf::Message& req, const std::string& auth) const;

  const ClusterServiceOptions options_;
  mutable AuthLimiter limiter_;
  mutable ClusterCallVerifier verifier_;
  mutable std::atomic<int64_t> last_refusal_log_ms_{-10000};
  parallel::Membership* membership_;
};

// EpochView <-> its wire form.
void ToProto(const parallel::EpochView& view, ::switchyard::v1::EpochAssignment* out);
parallel::EpochView FromProto(const ::switchyard::v1::EpochAssignment& a);

// Starts a gRPC server for `service` on host:port (0: the OS picks; *bound_port gets it).
absl::StatusOr<std::unique_ptr<grpc::Server>> StartClusterServer(
    const std::string& host, int port, ClusterService* service, int* bound_port,
    std::shared_ptr<grpc::ServerCredentials> credentials = nullptr);

}  // namespace sy::server
