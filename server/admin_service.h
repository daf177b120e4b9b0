// AdminService: switchyard.v1.Admin (proto/switchyard/v1/admin.proto) — expert-load
// statistics, the expert placement, live placement changes and rebalancing. A thin
// gRPC layer over LivePlacement (server/live_placement.h); registered on the daemon's public
// port next to Inference (synchronous handlers: an apply or a rebalance waits for a step
// boundary and the planner, seconds at most, on a gRPC sync thread).
//
// Auth: with a token (--admin-token-file, --admin-token, or SWITCHYARD_ADMIN_TOKEN) every call
// must carry `authorization: Bearer <token>`, else UNAUTHENTICATED; a peer that fails 10 times
// in 10 s gets RESOURCE_EXHAUSTED for a while. Without a token Admin answers only callers on
// the daemon's own host (loopback peers); others get PERMISSION_DENIED. Until SetReady (model
// loading) and after SetReady(nullptr) (draining): UNAVAILABLE.
//
// Thread safety: handlers run on gRPC threads concurrently; SetReady from the daemon's thread.
// The LivePlacement must outlive the gRPC server.
#pragma once

#include <atomic>
#include <chrono>
#include <string>

#include "grpcpp/server_context.h"
#include "parallel/membership.h"
#include "server/live_placement.h"
#include "server/secrets.h"
#include "switchyard/v1/admin.grpc.pb.h"

namespace sy::server {

class AdminService final : public switchyard::v1::Admin::Service {
 public:
  explicit AdminService(const std::string& token);
  void SetReady(LivePlacement* live) { live_.store(live); }
  // The rank group's membership (null: a one-process daemon). Not owned.
  void SetCluster(parallel::Membership* membership) { membership_.store(membership); }
  // How long DrainRank with wait may block.
  void SetDrainWaitLimit(std::chrono::milliseconds limit) { wait_limit_ = limit; }
  bool has_token() const { return !token_.empty(); }
  int64_t auth_failures() const { return limiter_.failures(); }
  // Failed checks go to `f` too (a metric's counter).
  void set_on_auth_failure(std::function<void()> f) { limiter_.set_on_failure(std::move(f)); }

  grpc::Status GetExpertLoad(grpc::ServerContext* context,
                             const switchyard::v1::GetExpertLoadRequest* request,
                             switchyard::v1::ExpertLoad* response) override;
  grpc::Status GetPlacement(grpc::ServerContext* context,
                            const switchyard::v1::GetPlacementRequest* request,
                            switchyard::v1::Placement* response) override;
  grpc::Status ApplyPlacement(grpc::ServerContext* context,
                              const switchyard::v1::ApplyPlacementRequest* request,
                              switchyard::v1::ApplyPlacementResponse* response) override;
  grpc::Status Rebalance(grpc::ServerContext* context,
                         const switchyard::v1::RebalanceRequest* request,
                         switchyard::v1::RebalanceReport* response) override;
  grpc::Status GetMembership(grpc::ServerContext* context,
                             const switchyard::v1::GetMembershipRequest* request,
                             switchyard::v1::Membership* response) override;
  grpc::Status DrainRank(grpc::ServerContext* context,
                         const switchyard::v1::DrainRankRequest* request,
                         switchyard::v1::DrainRankResponse* response) override;

 private:
  // OK with the LivePlacement, or UNAUTHENTICATED / UNAVAILABLE.
  grpc::Status Admit(grpc::ServerContext* context, LivePlacement** live) const;

  std::string token_;
  mutable AuthLimiter limiter_;
  std::atomic<LivePlacement*> live_{nullptr};
  std::atomic<parallel::Membership*> membership_{nullptr};
  std::chrono::milliseconds wait_limit_{90000};
};

}  // namespace sy::server
