// `switchyard stats --addr HOST:PORT [--out FILE]`: an Admin client. By default it
// writes the daemon's expert-load window in the trace format of shared/traces/README.md (what
// `switchyard plan --trace` reads) to --out (or stdout) and a summary line to stderr. Other
// actions: --placement (print the placement JSON in force), --apply FILE (switch to the
// placement in FILE), --rebalance POLICY (plan on the live load and apply; --dry-run plans
// only). --admin-token (or SWITCHYARD_ADMIN_TOKEN) is sent as `authorization: Bearer T`.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "grpcpp/grpcpp.h"
#include "server/admin_client.h"
#include "server/commands.h"
#include "server/flags.h"
#include "switchyard/v1/admin.grpc.pb.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

int StatsCommand(int argc, char** argv) {
  std::string out, apply, rebalance;
  bool no_paths = false, show_placement = false, dry_run = false;
  double time_limit = 0;
  FlagSet flags("stats", "Expert-load statistics and placement of a running `switchyard serve`.\n"
                         "usage: switchyard stats --addr HOST:PORT [--out trace.json]");
  AdminClient admin("stats", 120);
  admin.AddFlags(flags);
  flags.Add("out", &out, "write the trace JSON here (default: stdout)");
  flags.Add("no-paths", &no_paths, "counts only, no per-token routing paths");
  flags.Add("placement", &show_placement, "print the placement in force (JSON) instead");
  flags.Add("apply", &apply, "apply the placement JSON in this file");
  flags.Add("rebalance", &rebalance, "plan with this policy (greedy, ilp) on the live load and apply");
  flags.Add("dry-run", &dry_run, "--rebalance: plan only");
  flags.Add("time-limit", &time_limit, "--rebalance ilp: seconds per layer (0: the server's)");
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  if (!admin.Connect()) return 2;
  auto* stub = &admin.stub();
  grpc::ClientContext ctx;
  admin.Prepare(&ctx);
  auto fail = [&](const grpc::Status& st) { return admin.Fail(st); };
  std::string text;  // what goes to --out / stdout
  if (!apply.empty()) {
    std::ifstream f(apply);
    if (!f) {
      std::fprintf(stderr, "stats: --apply: cannot read %s\n", apply.c_str());
      return 2;
    }
    std::stringstream ss;
    ss << f.rdbuf();
    v1::ApplyPlacementRequest req;
    req.set_placement_json(ss.str());
    v1::ApplyPlacementResponse resp;
    grpc::Status st = stub->ApplyPlacement(&ctx, req, &resp);
    if (!st.ok()) return fail(st);
    std::fprintf(stderr, "placement epoch %lld in force: %lld experts gained (%lld bytes), %lld released, %.3f s\n",
                 static_cast<long long>(resp.epoch()), static_cast<long long>(resp.experts_gained()),
                 static_cast<long long>(resp.migrated_bytes()),
                 static_cast<long long>(resp.experts_released()), resp.switch_seconds());
    return 0;
  }
  if (!rebalance.empty()) {
    v1::RebalanceRequest req;
    req.set_policy(rebalance);
    req.set_dry_run(dry_run);
    req.set_time_limit_seconds(time_limit);
    v1::RebalanceReport r;
    grpc::Status st = stub->Rebalance(&ctx, req, &r);
    if (!st.ok()) return fail(st);
    std::fprintf(stderr,
                 "rebalance %s: %s (%s); expected balancedness %.4f -> %.4f; solve %.3f s, gap %.4f; "
                 "%lld tokens in the window\n",
                 r.policy().c_str(), r.applied() ? "applied" : "not applied", r.reason().c_str(),
                 r.balancedness_before(), r.balancedness_after(), r.solve_seconds(), r.gap(),
                 static_cast<long long>(r.window_tokens()));
    if (r.applied())
      std::fprintf(stderr, "placement epoch %lld: %lld experts gained (%lld bytes), %lld released, %.3f s\n",
                   static_cast<long long>(r.apply().epoch()),
                   static_cast<long long>(r.apply().experts_gained()),
                   static_cast<long long>(r.apply().migrated_bytes()),
                   static_cast<long long>(r.apply().experts_released()), r.apply().switch_seconds());
    text = r.placement_json();
  } else if (show_placement) {
    v1::Placement p;
    grpc::Status st = stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &p);
    if (!st.ok()) return fail(st);
    std::fprintf(stderr, "placement epoch %lld, %d ranks x %d slots, measured balancedness %.4f\n",
                 static_cast<long long>(p.epoch()), p.world_size(), p.slots_per_rank(),
                 p.rank_balancedness());
    text = p.placement_json();
  } else {
    v1::GetExpertLoadRequest req;
    req.set_include_paths(!no_paths);
    v1::ExpertLoad load;
    grpc::Status st = stub->GetExpertLoad(&ctx, req, &load);
    if (!st.ok()) return fail(st);
    double worst = 1;
    for (double b : load.expert_balancedness()) worst = std::min(worst, b);
    std::fprintf(stderr, "%lld tokens in the window, %d MoE layers x %d experts, top-%d; "
                         "least even layer: mean/max expert load %.3f\n",
                 static_cast<long long>(load.num_tokens()), load.num_layers(), load.num_experts(),
                 load.top_k(), worst);
    text = load.trace_json();
  }
  if (out.empty()) {
    std::printf("%s\n", text.c_str());
  } else {
    std::ofstream f(out);
    f << text << "\n";
    if (!f) {
      std::fprintf(stderr, "stats: cannot write %s\n", out.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace sy::server
