// placement_eval_bench: the planner evaluation. For every trace in
// SY_SHARED_DIR/traces, 8 and 16 ranks, and 0 %, 12.5 % and 25 % extra slots, plans with
// greedy (DeepSeek EPLB) and ilp (CBC) and scores both on held-out data: the second half of
// the tokens where the trace has token paths, else in-sample (said in the table).
//
// Targets, checked and reported (never tuned to pass):
//   bal    ilp balancedness on held-out data >= greedy's
//   traf   ilp cross-rank traffic per token < greedy's (traces with token paths only)
//   time   at 64 experts x 16 ranks, every layer solves within 2 s with a gap under 1 %
// Exit status 0 when every checked target holds, 1 otherwise.
//
//   placement_eval_bench [--traces DIR] [--filter SUBSTR] [--ranks 8,16]
//                        [--extra 0,12.5,25] [--time-limit 2] [--lambda 0.02] [--threads 0]
//                        [--layers 0]
//                        [--windows 4] [--no-fit-shares] [--no-average-scenarios]
//                        [--json FILE]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "parallel/planner/evaluate.h"
#include "server/flags.h"

namespace pl = sy::parallel::planner;

namespace {

std::vector<double> ParseList(const std::string& s) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(absl::string_view(s), ',')) {
    double v = 0;
    if (absl::SimpleAtod(part, &v)) out.push_back(v);
  }
  return out;
}

// Keeps the first `n` layers (n <= 0: all).
pl::RoutingTrace FirstLayers(pl::RoutingTrace t, int n) {
  if (n <= 0 || n >= t.num_layers) return t;
  t.num_layers = n;
  t.expert_counts.resize(n);
  t.layer_ids.resize(n);
  for (auto& tok : t.token_paths) tok.resize(n);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string traces_dir = std::string(SY_SHARED_DIR) + "/traces", filter, ranks_list = "8,16",
              extra_list = "0,12.5,25", json_out;
  double time_limit = 2.0, lambda = pl::PlannerOptions{}.lambda;
  int max_pairs = 0;
  int threads = 0, layers = 0, windows = pl::kDefaultScenarioWindows;
  bool fit_shares = true, average_scenarios = true;
  sy::server::FlagSet flags("placement_eval_bench", "greedy vs ilp expert placement on every trace");
  flags.Add("traces", &traces_dir, "folder of routing traces (*.json)");
  flags.Add("filter", &filter, "only traces whose file name contains this");
  flags.Add("ranks", &ranks_list, "rank counts, comma-separated");
  flags.Add("extra", &extra_list, "extra slots in percent of the expert count, comma-separated");
  flags.Add("time-limit", &time_limit, "ilp seconds per layer");
  flags.Add("lambda", &lambda, "ilp: objective weight of one cross-rank copy per token");
  flags.Add("max-pairs", &max_pairs, "ilp: co-activated pairs credited per layer (0: 2 * experts)");
  flags.Add("threads", &threads, "layers solved at once (0: hardware threads)");
  flags.Add("layers", &layers, "plan only the first N layers of each trace (0: all)");
  flags.Add("json", &json_out, "also write the rows here");
  flags.Add("windows", &windows, "load scenarios: windows of the planning half (0: mean only)");
  flags.Add("fit-shares", &fit_shares, "ilp: fit slot shares (--no-fit-shares: even split)");
  flags.Add("average-scenarios", &average_scenarios,
            "ilp: straggler term averaged over the windows (--no-average-scenarios: the mean "
            "loads' straggler, windows as caps)");
  absl::Status s = flags.Parse(argc, argv);
  if (absl::IsCancelled(s)) {
    std::cout << s.message();
    return 0;
  }
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return 2;
  }
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(traces_dir)) {
    const std::string name = entry.path().filename().string();
    if (entry.path().extension() == ".json" && name.find(filter) != std::string::npos) {
      files.push_back(entry.path().string());
    }
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::fprintf(stderr, "no traces in %s\n", traces_dir.c_str());
    return 2;
  }

  std::printf("%-28s %3s %3s %6s %5s | %7s %7s | %7s %7s | %6s %6s | %6s %6s %7s | %s\n",
              "trace", "R", "S", "extra", "data", "bal gr", "bal ilp", "traf gr", "traf il",
              "fit gr", "fit il", "wall s", "cpu s", "max gap", "targets");
  nlohmann::json rows = nlohmann::json::array();
  int checked = 0, failed = 0;
  for (const auto& file : files) {
    auto trace = pl::LoadTrace(file);
    if (!trace.ok()) {
      std::fprintf(stderr, "%s\n", std::string(trace.status().message()).c_str());
      return 1;
    }
    *trace = FirstLayers(std::move(*trace), layers);
    pl::RoutingTrace plan_trace, eval_trace;
    std::string data;
    if (trace->has_paths()) {
      auto halves = pl::SplitTrace(*trace);
      plan_trace = std::move(halves->first);
      eval_trace = std::move(halves->second);
      data = "hold";
    } else {
      plan_trace = *trace;
      eval_trace = *trace;
      data = "in";
    }
    const int E = trace->num_experts;
    for (double R : ParseList(ranks_list)) {
      int last_s = -1;
      for (double extra : ParseList(extra_list)) {
        const int ranks = static_cast<int>(R);
        // Slots per rank: at least the asked extra; the printed extra is what R x S gives
        // (12.5 % of 64 experts over 16 ranks rounds up to 25 %). A shape met already is
        // skipped.
        const int S = std::max(
            1, static_cast<int>(std::ceil(E * (1.0 + extra / 100.0) / ranks - 1e-9)));
        if (S == last_s) continue;
        last_s = S;
        pl::EvalSetup setup;
        setup.world_size = ranks;
        setup.slots_per_rank = S;
        setup.expert_bytes = 1.0;
        setup.options.time_limit_seconds = time_limit;
        setup.options.max_threads = threads;
        setup.options.fit_shares = fit_shares;
        setup.options.average_scenarios = average_scenarios;
        setup.options.lambda = lambda;
        setup.options.max_pairs = max_pairs;
        setup.scenario_windows = windows;
        auto greedy = pl::EvaluatePolicy("greedy", plan_trace, eval_trace, setup);
        auto ilp = pl::EvaluatePolicy("ilp", plan_trace, eval_trace, setup);
        if (!greedy.ok() || !ilp.ok()) {
          std::fprintf(stderr, "%s R=%d S=%d: %s\n", trace->name.c_str(), ranks, S,
                       std::string((greedy.ok() ? ilp.status() : greedy.status()).message()).c_str());
          return 1;
        }
        double max_s = 0, max_cpu = 0, max_gap = 0;
        for (const auto& l : ilp->plan.layers) {
          max_s = std::max(max_s, l.solve_seconds);
          max_cpu = std::max(max_cpu, l.cpu_seconds);
          max_gap = std::max(max_gap, l.gap);
        }
        std::string verdict;
        auto check = [&](const char* name, bool ok) {
          ++checked;
          if (!ok) ++failed;
          verdict += std::string(name) + (ok ? ":ok " : ":FAIL ");
        };
        check("bal", ilp->score.balancedness >= greedy->score.balancedness - 1e-9);
        const bool has_traffic = greedy->score.traffic_per_token >= 0;
        if (has_traffic) {
          check("traf", ilp->score.traffic_per_token < greedy->score.traffic_per_token);
        }
        if (E == 64 && ranks == 16) {
          // Wall time is what the issue asks; on a shared, oversubscribed machine the CPU time
          // of the solving thread says what one free core would take. Both are reported.
          check("wall2s", max_s <= 2.0);
          check("cpu2s", max_cpu <= 2.0);
          check("gap1%", max_gap < 0.01);
        }
        auto traffic = [](double t) { return t < 0 ? std::string("    n/a") : ([&] {
          char b[16];
          std::snprintf(b, sizeof b, "%7.3f", t);
          return std::string(b);
        })(); };
        std::printf("%-28s %3d %3d %5.1f%% %5s | %7.4f %7.4f | %s %s | %6.4f %6.4f | %6.2f %6.2f %6.2f%% | %s\n",
                    trace->name.c_str(), ranks, S, 100.0 * (ranks * S - E) / E, data.c_str(),
                    greedy->score.balancedness, ilp->score.balancedness,
                    traffic(greedy->score.traffic_per_token).c_str(),
                    traffic(ilp->score.traffic_per_token).c_str(), greedy->fit_balancedness,
                    ilp->fit_balancedness, max_s, max_cpu, 100.0 * max_gap, verdict.c_str());
        std::fflush(stdout);
        nlohmann::json row;
        row["trace"] = trace->name;
        row["ranks"] = ranks;
        row["slots_per_rank"] = S;
        row["data"] = data;
        row["greedy_balancedness"] = greedy->score.balancedness;
        row["ilp_balancedness"] = ilp->score.balancedness;
        row["greedy_traffic"] = greedy->score.traffic_per_token;
        row["ilp_traffic"] = ilp->score.traffic_per_token;
        row["greedy_fit_balancedness"] = greedy->fit_balancedness;
        row["ilp_fit_balancedness"] = ilp->fit_balancedness;
        row["ilp_max_layer_seconds"] = max_s;
        row["ilp_max_layer_cpu_seconds"] = max_cpu;
        row["ilp_max_gap"] = max_gap;
        row["ilp_wall_seconds"] = ilp->plan.wall_seconds;
        row["targets"] = verdict;
        rows.push_back(std::move(row));
      }
    }
  }
  std::printf("\nbal = mean/max rank load summed over layers on the scored data (hold: second half\n"
              "of the tokens; in: in-sample, the trace has counts only); traf = expected remote\n"
              "copies per token per layer (home rank uniform); fit = balancedness on the planned\n"
              "data; wall s / cpu s / max gap = the ilp's slowest layer (wall clock, CPU time of its\n"
              "thread) and largest gap.\n");
  std::printf("targets: %d checked, %d failed\n", checked, failed);
  if (!json_out.empty()) std::ofstream(json_out) << rows.dump(2) << "\n";
  return failed == 0 ? 0 : 1;
}
