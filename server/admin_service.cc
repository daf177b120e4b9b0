#include "server/admin_service.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "parallel/expert_load.h"
#include "server/grpc_status.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

AdminService::AdminService(const std::string& token) : token_(token) {
  if (token_.empty())
    if (const char* env = std::getenv("SWITCHYARD_ADMIN_TOKEN")) token_ = env;
}

grpc::Status AdminService::Admit(grpc::ServerContext* context, LivePlacement** live) const {
  const std::string peer = context->peer();
  if (absl::Status s = limiter_.Admit(peer); !s.ok()) return ToGrpcStatus(s);
  if (token_.empty() && !AuthLimiter::IsLoopback(peer))
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "Admin answers other hosts only with a token: serve with --admin-token-file "
                        "(or --admin-token / SWITCHYARD_ADMIN_TOKEN), or call it from the daemon's "
                        "host");
  if (!token_.empty()) {
    const auto& md = context->client_metadata();
    auto it = md.find("authorization");
    const bool ok = it != md.end() &&
                    BearerMatches(absl::string_view(it->second.data(), it->second.size()), {token_});
    if (!ok) {
      limiter_.Failed(peer);
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "Admin needs metadata 'authorization: Bearer <--admin-token>'");
    }
  }
  *live = live_.load();
  if (*live == nullptr)
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is loading or the daemon is draining");
  return grpc::Status::OK;
}

grpc::Status AdminService::GetExpertLoad(grpc::ServerContext* context,
                                         const v1::GetExpertLoadRequest* request,
                                         v1::ExpertLoad* response) {
  LivePlacement* live = nullptr;
  if (grpc::Status s = Admit(context, &live); !s.ok()) return s;
  auto trace = live->Snapshot(request->include_paths());
  if (!trace.ok()) return ToGrpcStatus(trace.status());
  response->set_trace_json(parallel::TraceToJson(*trace));
  response->set_num_tokens(trace->num_tokens);
  response->set_num_layers(trace->num_layers);
  response->set_num_experts(trace->num_experts);
  response->set_top_k(trace->top_k);
  for (const auto& counts : trace->expert_counts) {
    double mx = 0, sum = 0;
    for (double c : counts) {
      mx = std::max(mx, c);
      sum += c;
    }
    response->add_expert_balancedness(
        mx > 0 ? sum / static_cast<double>(counts.size()) / mx : 1.0);
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::GetPlacement(grpc::ServerContext* context, const v1::GetPlacementRequest*,
                                        v1::Placement* response) {
  LivePlacement* live = nullptr;
  if (grpc::Status s = Admit(context, &live); !s.ok()) return s;
  auto p = live->placement();
  if (p == nullptr)
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "the model has no MoE layers");
  response->set_placement_json(p->ToJson());
  response->set_epoch(p->epoch());
  response->set_world_size(p->world_size());
  response->set_slots_per_rank(p->slots_per_rank());
  response->set_rank_balancedness(live->measured_balancedness());
  return grpc::Status::OK;
}

grpc::Status AdminService::ApplyPlacement(grpc::ServerContext* context,
                                          const v1::ApplyPlacementRequest* request,
                                          v1::ApplyPlacementResponse* response) {
  LivePlacement* live = nullptr;
  if (grpc::Status s = Admit(context, &live); !s.ok()) return s;
  auto p = parallel::ExpertPlacement::FromJson(request->placement_json());
  if (!p.ok())
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "placement_json: " + std::string(p.status().message()));
  auto r = live->Apply(*p);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = *r;
  return grpc::Status::OK;
}

grpc::Status AdminService::Rebalance(grpc::ServerContext* context, const v1::RebalanceRequest* request,
                                     v1::RebalanceReport* response) {
  LivePlacement* live = nullptr;
  if (grpc::Status s = Admit(context, &live); !s.ok()) return s;
  auto r = live->Rebalance(*request);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = *r;
  return grpc::Status::OK;
}

grpc::Status AdminService::GetMembership(grpc::ServerContext* context,
                                         const v1::GetMembershipRequest*, v1::Membership* response) {
  LivePlacement* live = nullptr;
  if (grpc::Status s = Admit(context, &live); !s.ok()) return s;
  if (auto p = live->placement()) response->set_placement_epoch(p->epoch());
  parallel::Membership* m = membership_.load();
  if (m == nullptr) {  // one process: the leader alone, always
    response->set_epoch(1);
    response->set_world_size(1);
    v1::RankStatus* r = response->add_ranks();
    r->set_id(0);
    r->set_state("serving");
    r->set_comm_rank(0);
    return grpc::Status::OK;
  }
  const parallel::MembershipSnapshot snap = m->Snapshot();
  response->set_epoch(snap.epoch);
  response->set_reforming(snap.reforming);
  int world = 0;
  // Members of the epoch in force first (by comm rank), then the others by id.
  std::vector<const parallel::RankInfo*> order;
  for (const auto& r : snap.ranks)
    if (r.comm_rank >= 0) order.push_back(&r);
  std::sort(order.begin(), order.end(),
            [](const parallel::RankInfo* a, const parallel::RankInfo* b) { return a->comm_rank < b->comm_rank; });
  world = static_cast<int>(order.size());
  for (const auto& r : snap.ranks)
    if (r.comm_rank < 0) order.push_back(&r);
  response->set_world_size(world);
  for (const parallel::RankInfo* r : order) {
    v1::RankStatus* out = response->add_ranks();
    out->set_id(r->id);
    out->set_address(r->address);
    out->set_state(parallel::RankStateName(r->state));
    out->set_comm_rank(r->comm_rank);
    out->set_home_sequences(r->home_seqs);
    out->set_kv_blocks_used(r->kv_blocks_used);
    out->set_kv_blocks(r->kv_blocks);
    out->set_expert_slots(r->expert_slots);
    out->set_tokens_per_second(r->tokens_per_second);
    out->set_heartbeat_age_seconds(r->heartbeat_age_s);
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::DrainRank(grpc::ServerContext* context, const v1::DrainRankRequest* request,
                                     v1::DrainRankResponse* response) {
  LivePlacement* live = nullptr;
  if (grpc::Status s = Admit(context, &live); !s.ok()) return s;
  parallel::Membership* m = membership_.load();
  if (m == nullptr)
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this daemon runs one rank: there is no rank to drain (serve with --secret "
                        "and let workers join)");
  if (absl::Status s = m->RequestDrain(request->rank()); !s.ok()) return ToGrpcStatus(s);
  auto state_of = [&](int32_t id) -> std::string {
    for (const auto& r : m->Snapshot().ranks)
      if (r.id == id) return parallel::RankStateName(r.state);
    return "gone";
  };
  if (request->wait()) {
    const auto deadline = std::chrono::steady_clock::now() + wait_limit_;
    for (;;) {
      const std::string st = state_of(request->rank());
      if (st == "gone" || st == "dead") break;
      if (context->IsCancelled())
        return grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled (the drain goes on)");
      if (std::chrono::steady_clock::now() >= deadline)
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                            "the rank is still draining (the drain goes on)");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  response->set_epoch(m->epoch());
  response->set_state(state_of(request->rank()));
  return grpc::Status::OK;
}

}  // namespace sy::server
