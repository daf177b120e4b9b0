// GrpcRendezvousStore: the RendezvousStore of a worker process, backed by the leader's
// switchyard.v1.Cluster service (StoreSet / StoreGet). The leader itself uses the in-memory
// store that its Cluster service serves (server/cluster_service.h), so both ends see one map.
//
// Used by `switchyard worker` (server/worker.cc) to build its GlooCommunicator.
// Thread safety: thread-safe (gRPC stubs are).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "parallel/rendezvous_store.h"
#include "switchyard/v1/cluster.grpc.pb.h"

namespace sy::server {

class GrpcRendezvousStore final : public parallel::RendezvousStore {
 public:
  // channel: to the leader's Cluster service; secret: the cluster secret that signs each call
  // (cluster_auth.h; the secret itself is never sent).
  GrpcRendezvousStore(std::shared_ptr<grpc::Channel> channel, std::string secret);

  // gRPC errors keep their code (UNAVAILABLE when the leader is gone, PERMISSION_DENIED for
  // a wrong secret); a key not set in time is DEADLINE_EXCEEDED.
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key,
                                  std::chrono::milliseconds timeout) override;

 private:
  std::unique_ptr<::switchyard::v1::Cluster::Stub> stub_;
  std::string secret_;
};

}  // namespace sy::server
