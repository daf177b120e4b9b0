// `switchyard plan`: plans expert placement from a routing trace with one or every policy,
// scores each plan (on held-out data when there is some) and writes the last plan as JSON.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "parallel/expert_placement.h"
#include "parallel/planner/evaluate.h"
#include "server/commands.h"
#include "server/flags.h"

namespace sy::server {
namespace {

namespace pl = sy::parallel::planner;

std::string Bytes(double b) {
  if (b >= 1e9) return absl::StrFormat("%.2f GB", b / 1e9);
  if (b >= 1e6) return absl::StrFormat("%.1f MB", b / 1e6);
  return absl::StrFormat("%.0f B", b);
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "plan: %s\n", std::string(s.message()).c_str());
  return absl::IsInvalidArgument(s) ? 2 : 1;
}

}  // namespace

int PlanCommand(int argc, char** argv) {
  std::string trace_path, holdout_path, current_path, policy = "all", out, report_json;
  int ranks = 0, slots_per_rank = 0, threads = 0, nodes = 1, groups = 1, max_pairs = 0;
  double time_limit = 2.0, expert_bytes = 3.0 * 2048 * 1408 * 2;
  pl::PlannerOptions defaults;
  double lambda = defaults.lambda, mu = defaults.mu, balance_slack = defaults.balance_slack;
  FlagSet flags("plan",
                "Plans expert placement from a routing trace (shared/traces format) and scores it.\n"
                "Scored on --holdout when given; else, when the trace has token paths, planned on\n"
                "the first half of its tokens and scored on the second; else scored in-sample.");
  flags.Add("trace", &trace_path, "routing trace JSON to plan on (required)");
  flags.Add("holdout", &holdout_path, "routing trace JSON to score on (same layers and experts)");
  flags.Add("ranks", &ranks, "number of ranks R (required)");
  flags.Add("slots-per-rank", &slots_per_rank, "expert slots per rank S; R*S >= experts (required)");
  flags.Add("current", &current_path, "current placement JSON: migration is priced and counted against it");
  flags.Add("policy", &policy, "all | contiguous | round-robin | greedy | ilp");
  flags.Add("time-limit", &time_limit, "ilp: seconds per layer");
  flags.Add("lambda", &lambda, "ilp: objective weight of one cross-rank copy per token (in load units)");
  flags.Add("mu", &mu, "ilp: objective weight of one expert moved (in load units)");
  flags.Add("balance-slack", &balance_slack, "ilp: straggler load may exceed greedy's (in any scenario) by this fraction (<0: no cap)");
  bool fit_shares = true;
  flags.Add("fit-shares", &fit_shares, "ilp: fit slot shares to the planned loads (--no-fit-shares: even split)");
  int windows = pl::kDefaultScenarioWindows;
  flags.Add("windows", &windows, "ilp: load scenarios = this many windows of the planning tokens (0: mean only)");
  bool average_scenarios = true;
  flags.Add("average-scenarios", &average_scenarios,
            "ilp: straggler term averaged over the mean loads and every window (robust; "
            "--no-average-scenarios: the mean loads' straggler, windows only as caps: a tighter "
            "bound, less held-out balance)");
  flags.Add("max-pairs", &max_pairs, "ilp: co-activated pairs credited per layer (0: 2 * experts)");
  flags.Add("nodes", &nodes, "greedy: nodes for hierarchical EPLB (ranks split evenly)");
  flags.Add("groups", &groups, "greedy: expert groups for hierarchical EPLB");
  flags.Add("expert-bytes", &expert_bytes, "bytes of one expert's weights (default: DeepSeek-V2-Lite bf16)");
  flags.Add("threads", &threads, "layers solved at once (0: hardware threads)");
  flags.Add("out", &out, "write the placement of the last policy here (JSON)");
  flags.Add("report-json", &report_json, "write the figures here as a JSON list");
  absl::Status s = flags.Parse(argc, argv);
  if (absl::IsCancelled(s)) {
    std::cout << s.message();
    return 0;
  }
  if (s.ok() && trace_path.empty()) s = absl::InvalidArgumentError("--trace is required");
  if (s.ok() && ranks <= 0) s = absl::InvalidArgumentError("--ranks must be positive");
  if (s.ok() && slots_per_rank <= 0) {
    s = absl::InvalidArgumentError("--slots-per-rank must be positive");
  }
  if (s.ok() && time_limit <= 0) s = absl::InvalidArgumentError("--time-limit must be positive");
  std::vector<std::string> policies;
  if (policy == "all") {
    policies = pl::PlannerNames();
  } else {
    policies = {policy};
  }
  for (const auto& p : policies) {
    if (!s.ok()) break;
    auto made = pl::CreatePlanner(p, {});
    if (!made.ok()) s = made.status();
  }
  if (!s.ok()) return Fail(s);

  auto trace = pl::LoadTrace(trace_path);
  if (!trace.ok()) return Fail(trace.status());
  if (ranks * slots_per_rank < trace->num_experts) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "--ranks ", ranks, " x --slots-per-rank ", slots_per_rank, " = ",
        ranks * slots_per_rank, " slots cannot hold ", trace->num_experts, " experts")));
  }
  pl::RoutingTrace plan_trace, eval_trace;
  std::string scored_on;
  if (!holdout_path.empty()) {
    auto hold = pl::LoadTrace(holdout_path);
    if (!hold.ok()) return Fail(hold.status());
    plan_trace = std::move(*trace);
    eval_trace = std::move(*hold);
    scored_on = absl::StrCat("planned on ", plan_trace.name, ", scored on ", eval_trace.name,
                             " (--holdout)");
  } else if (trace->has_paths()) {
    auto halves = pl::SplitTrace(*trace);
    if (!halves.ok()) return Fail(halves.status());
    plan_trace = std::move(halves->first);
    eval_trace = std::move(halves->second);
    scored_on = absl::StrCat("planned on the first half of ", trace->name, "'s tokens (",
                             plan_trace.token_paths.size(), "), scored on the second half (",
                             eval_trace.token_paths.size(), ")");
  } else {
    plan_trace = *trace;
    eval_trace = std::move(*trace);
    scored_on = absl::StrCat("scored in-sample: ", plan_trace.name,
                             " has no token paths to split and no --holdout was given");
  }

  std::optional<parallel::ExpertPlacement> current;
  if (!current_path.empty()) {
    auto c = parallel::ExpertPlacement::FromFile(current_path);
    if (!c.ok()) return Fail(c.status());
    current = std::move(*c);
  }

  pl::EvalSetup setup;
  setup.world_size = ranks;
  setup.slots_per_rank = slots_per_rank;
  setup.current = current ? &*current : nullptr;
  setup.expert_bytes = expert_bytes;
  setup.scenario_windows = windows;
  setup.options.time_limit_seconds = time_limit;
  setup.options.lambda = lambda;
  setup.options.mu = mu;
  setup.options.balance_slack = balance_slack;
  setup.options.max_pairs = max_pairs;
  setup.options.fit_shares = fit_shares;
  setup.options.average_scenarios = average_scenarios;
  setup.options.num_nodes = nodes;
  setup.options.num_groups = groups;
  setup.options.max_threads = threads;

  std::printf("%s: %d layers x %d experts, top-%d; %d ranks x %d slots (%d extra)\n",
              plan_trace.model.empty() ? plan_trace.name.c_str() : plan_trace.model.c_str(),
              plan_trace.num_layers, plan_trace.num_experts, plan_trace.top_k, ranks,
              slots_per_rank, ranks * slots_per_rank - plan_trace.num_experts);
  std::printf("%s\n", scored_on.c_str());
  std::printf("moved: %s\n\n", current ? "against --current"
                                        : "against contiguous placement by id (no --current)");
  std::printf("%-12s %9s %9s %9s %10s %7s %10s %9s %8s %10s\n", "policy", "max/mean",
              "balanced", "fit bal", "traffic/t", "moved", "bytes", "solve s", "gap",
              "objective");
  nlohmann::json report = nlohmann::json::array();
  for (size_t i = 0; i < policies.size(); ++i) {
    auto r = pl::EvaluatePolicy(policies[i], plan_trace, eval_trace, setup);
    if (!r.ok()) return Fail(r.status());
    const bool last = i + 1 == policies.size();
    const std::string traffic = r->score.traffic_per_token < 0
                                    ? std::string("n/a")
                                    : absl::StrFormat("%.3f", r->score.traffic_per_token);
    std::printf("%-12s %9.3f %9.3f %9.3f %10s %7lld %10s %9.2f %7.2f%% %10.5f\n",
                policies[i].c_str(), r->score.max_over_mean, r->score.balancedness,
                r->fit_balancedness, traffic.c_str(), static_cast<long long>(r->moved.experts),
                Bytes(r->moved.bytes).c_str(), r->plan.wall_seconds, 100.0 * r->plan.max_gap,
                r->plan.objective);
    nlohmann::json row;
    row["policy"] = policies[i];
    row["balancedness"] = r->score.balancedness;
    row["max_over_mean"] = r->score.max_over_mean;
    row["fit_balancedness"] = r->fit_balancedness;
    row["traffic_per_token"] =
        r->score.traffic_per_token < 0 ? nlohmann::json(nullptr) : nlohmann::json(r->score.traffic_per_token);
    row["moved_experts"] = r->moved.experts;
    row["moved_bytes"] = r->moved.bytes;
    row["solve_seconds"] = r->plan.wall_seconds;
    row["gap"] = r->plan.max_gap;
    row["objective"] = r->plan.objective;
    row["best_bound"] = r->plan.best_bound;
    row["placement_file"] = (last && !out.empty()) ? out : "";
    report.push_back(std::move(row));
    if (last && !out.empty()) {
      std::ofstream f(out);
      f << r->plan.placement.ToJson() << "\n";
      if (!f) return Fail(absl::InternalError(absl::StrCat("cannot write ", out)));
      std::printf("\nwrote the %s placement to %s\n", policies[i].c_str(), out.c_str());
    }
  }
  std::printf(
      "\nmax/mean, balanced (mean/max rank load, summed over layers) and traffic (expected\n"
      "remote copies per token per layer, home rank uniform) are on the scored data; fit bal on\n"
      "the planned data; gap is the largest over layers; objective is the ILP objective summed\n"
      "over layers.\n");
  if (!report_json.empty()) {
    std::ofstream f(report_json);
    f << report.dump(2) << "\n";
    if (!f) return Fail(absl::InternalError(absl::StrCat("cannot write ", report_json)));
  }
  return 0;
}

}  // namespace sy::server
