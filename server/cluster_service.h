// ClusterService: the leader's switchyard.v1.Cluster service (proto/switchyard/v1/cluster.proto,
// DESIGN.md §3). It hands out ranks 1..world_size-1 in join order, serves the rendezvous
// key-value store the workers' communicators meet through (the leader's own communicator
// uses store() directly), and refuses any call whose secret differs (PERMISSION_DENIED,
// compared in constant time; nothing changes).
//
// Runs on its own gRPC server (the --cluster-port), started by ClusterLeader.
// Thread safety: thread-safe (gRPC sync handler threads call in concurrently).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "grpcpp/server.h"
#include "parallel/rendezvous_store.h"
#include "switchyard/v1/cluster.grpc.pb.h"

namespace sy::server {

// True when a and b are equal; the time taken depends on their lengths only.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

struct ClusterServiceOptions {
  std::string secret;
  int world_size = 1;
  ::switchyard::v1::ModelFingerprint model;  // joins with another model are refused
  std::string model_dir;
  std::string placement_json;
  std::string store_prefix = "gloo/epoch-1";
  int64_t membership_epoch = 1;
  int64_t collective_timeout_ms = 30000;
  int64_t num_kv_blocks = 0;
  int64_t kv_block_size = 16;
};

class ClusterService final : public ::switchyard::v1::Cluster::Service {
 public:
  explicit ClusterService(ClusterServiceOptions options);

  parallel::RendezvousStore* store() { return &store_; }
  // Waits until every rank has joined; DEADLINE_EXCEEDED after `timeout`, CANCELLED once
  // *cancel (may be null; polled every 50 ms) is true.
  absl::Status WaitForRanks(std::chrono::milliseconds timeout,
                            const std::atomic<bool>* cancel = nullptr);
  int joined() const;  // ranks taken, the leader included
  void SetServing(bool serving);

  grpc::Status Join(grpc::ServerContext* ctx, const ::switchyard::v1::JoinRequest* req,
                    ::switchyard::v1::JoinReply* reply) override;
  grpc::Status StoreSet(grpc::ServerContext* ctx, const ::switchyard::v1::StoreSetRequest* req,
                        ::switchyard::v1::StoreSetReply* reply) override;
  grpc::Status StoreGet(grpc::ServerContext* ctx, const ::switchyard::v1::StoreGetRequest* req,
                        ::switchyard::v1::StoreGetReply* reply) override;
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const ::switchyard::v1::HeartbeatRequest* req,
                         ::switchyard::v1::HeartbeatReply* reply) override;

 private:
  grpc::Status CheckSecret(const std::string& secret) const;

  const ClusterServiceOptions options_;
  parallel::MemoryRendezvousStore store_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int next_rank_ ABSL_GUARDED_BY(mu_) = 1;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
};

// Starts a gRPC server for `service` on host:port (0: the OS picks; *bound_port gets it).
absl::StatusOr<std::unique_ptr<grpc::Server>> StartClusterServer(const std::string& host, int port,
                                                                 ClusterService* service,
                                                                 int* bound_port);

}  // namespace sy::server
