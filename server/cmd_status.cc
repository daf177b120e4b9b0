// `switchyard status --addr HOST:PORT`: the rank group of a running `switchyard serve`
// (Admin.GetMembership) as a table: the membership epoch, then each rank's id, address,
// state, comm rank, home sequences, KV blocks, expert slots and tokens per second. --drain ID
// drains a rank out first (Admin.DrainRank; --wait: until it has left). --json prints the
// reply as JSON. --admin-token (or SWITCHYARD_ADMIN_TOKEN) is sent as `authorization: Bearer T`.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "server/admin_client.h"
#include "server/commands.h"
#include "server/flags.h"
#include "switchyard/v1/admin.grpc.pb.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

int StatusCommand(int argc, char** argv) {
  int drain = -1;
  bool wait = false, json = false;
  FlagSet flags("status", "The rank group of a running `switchyard serve` (Admin.GetMembership).\n"
                          "usage: switchyard status --addr HOST:PORT [--drain ID [--wait]]");
  AdminClient admin("status", 10);
  admin.AddFlags(flags);
  flags.Add("drain", &drain, "drain this rank id out of the group first");
  flags.Add("wait", &wait, "--drain: return once the rank has left");
  flags.Add("json", &json, "print the membership as JSON");
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  if (!admin.Connect()) return 2;
  auto* stub = &admin.stub();
  auto context = [&](grpc::ClientContext* ctx) { admin.Prepare(ctx); };
  auto fail = [&](const grpc::Status& st) { return admin.Fail(st); };
  if (drain >= 0) {
    grpc::ClientContext ctx;
    context(&ctx);
    v1::DrainRankRequest req;
    req.set_rank(drain);
    req.set_wait(wait);
    v1::DrainRankResponse resp;
    grpc::Status st = stub->DrainRank(&ctx, req, &resp);
    if (!st.ok()) return fail(st);
    std::fprintf(stderr, "rank %d: %s (epoch %lld)\n", drain, resp.state().c_str(),
                 static_cast<long long>(resp.epoch()));
  }
  grpc::ClientContext ctx;
  context(&ctx);
  v1::Membership m;
  grpc::Status st = stub->GetMembership(&ctx, v1::GetMembershipRequest{}, &m);
  if (!st.ok()) return fail(st);
  if (json) {
    std::string out;
    google::protobuf::util::JsonPrintOptions o;
    o.add_whitespace = true;
    o.always_print_primitive_fields = true;
    (void)google::protobuf::util::MessageToJsonString(m, &out, o);
    std::printf("%s", out.c_str());
    return 0;
  }
  std::printf("membership epoch %lld%s, %d rank(s), placement epoch %lld\n",
              static_cast<long long>(m.epoch()), m.reforming() ? " (re-forming)" : "",
              m.world_size(), static_cast<long long>(m.placement_epoch()));
  std::printf("%4s  %-21s %-9s %4s %6s %13s %6s %9s %7s\n", "id", "address", "state", "comm",
              "seqs", "kv blocks", "slots", "tokens/s", "hb age");
  for (const v1::RankStatus& r : m.ranks()) {
    const std::string kv = std::to_string(r.kv_blocks_used()) + "/" + std::to_string(r.kv_blocks());
    std::printf("%4d  %-21s %-9s %4s %6lld %13s %6lld %9.1f %6.1fs\n", r.id(),
                r.address().empty() ? "-" : r.address().c_str(), r.state().c_str(),
                r.comm_rank() >= 0 ? std::to_string(r.comm_rank()).c_str() : "-",
                static_cast<long long>(r.home_sequences()), kv.c_str(),
                static_cast<long long>(r.expert_slots()), r.tokens_per_second(),
                r.heartbeat_age_seconds());
  }
  return 0;
}

}  // namespace sy::server
