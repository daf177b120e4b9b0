// LivePlacement: the daemon's expert-load statistics and live expert placement
// (DESIGN.md §4), behind Admin (server/admin_service.h) and the periodic rebalance of
// `serve --rebalance-every N --rebalance-threshold B`.
//
//   * Statistics: an ExpertLoadRecorder on the leader's model; with several ranks every rank
//     records its own tokens (RankRunner) and Snapshot() gathers their windows through the
//     step protocol (a kLoadStats control plan, scheduler/rank_control.h) and sums them, so
//     the trace covers every token the group ran, in the format of shared/traces/README.md.
//   * Apply: DistributedStepExecutor::SwitchPlacement: every rank maps the experts it gains
//     from its checkpoint (memory-mapped already; read ahead), a few layers per control plan
//     with steps in between, then all switch at one step boundary and drop freed experts.
//   * Rebalance: snapshot -> planner (parallel/planner, on the calling thread: an admin call
//     or the periodic thread, never the engine thread) -> apply, when the plan's expected
//     balancedness beats the current one.
// Balancedness here is EXPECTED on the window's loads: per MoE layer, mean over max of the
// per-rank sums of load x slot share; averaged over layers (1 = even).
//
// Metrics (in the daemon's registry): switchyard_placement_epoch, _rebalances_total,
// _rebalance_seconds (histogram: snapshot to switched), _migrated_bytes_total,
// _planner_solve_seconds{policy} (histogram), _planner_gap,
// _placement_expected_balancedness. (_ep_balancedness, measured by the dispatcher, comes from
// server/cluster_leader.h.)
//
// Thread safety: every method may be called from any thread; applies and rebalances are
// serialised (a Rebalance while another runs fails with FAILED_PRECONDITION).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "kernels/core/mutex.h"
#include "model/moe_model.h"
#include "parallel/expert_load.h"
#include "parallel/expert_placement.h"
#include "parallel/planner/trace.h"
#include "prometheus/registry.h"
#include "scheduler/distributed_executor.h"
#include "switchyard/v1/admin.pb.h"

namespace sy::server {

class FlagSet;

struct AdminOptions {
  std::string admin_token;        // "": Admin answers only the daemon's own host
  std::string admin_token_file;   // read at start (keeps the token out of `ps`)
  int64_t rebalance_every = 0;    // steps between periodic checks; 0 = off
  double rebalance_threshold = 0.9;  // rebalance when expected balancedness falls under it
  std::string rebalance_policy = "greedy";
  double planner_time_limit_s = 2.0;  // ilp, per layer
  int load_window_steps = 1024;   // the recorder's sliding window
  int switch_layers_per_plan = 4;  // layers whose gained experts one control plan maps
};

// --admin-token, --admin-token-file, --rebalance-every, --rebalance-threshold, --rebalance-policy,
// --planner-time-limit, --load-window-steps, --switch-layers-per-plan.
void AddAdminFlags(FlagSet& flags, AdminOptions* options);

class LivePlacement {
 public:
  // model: the leader's model (not owned; outlives this); the recorder is installed on it
  // now, so construct before the engine steps. executor: null on a single rank.
  LivePlacement(model::MoeModel* model, scheduler::DistributedStepExecutor* executor,
                prometheus::Registry* registry, const AdminOptions& options);
  ~LivePlacement();  // Stop()

  // Starts the periodic rebalance thread when options.rebalance_every > 0.
  void Start();
  // Stops the periodic thread; later Apply/Rebalance calls fail with UNAVAILABLE. Call before
  // the engine (and its executor) stops.
  void Stop();

  int world_size() const;
  // The group's summed window (all ranks). include_paths false drops token_paths.
  absl::StatusOr<parallel::planner::RoutingTrace> Snapshot(bool include_paths);
  std::shared_ptr<const parallel::ExpertPlacement> placement() const;
  // Mean/max of the pairs each rank computed since start (the dispatcher's figure; 1 on one
  // rank).
  double measured_balancedness() const;
  // Expected balancedness of `placement` on `trace`'s loads (see above).
  static double ExpectedBalancedness(const parallel::ExpertPlacement& placement,
                                     const parallel::planner::RoutingTrace& trace);

  absl::StatusOr<switchyard::v1::ApplyPlacementResponse> Apply(const parallel::ExpertPlacement& p);
  absl::StatusOr<switchyard::v1::RebalanceReport> Rebalance(const switchyard::v1::RebalanceRequest& r);

  int64_t rebalances() const { return rebalances_.load(); }
  // The leader's recent tokens per expert, [model layers][experts] (empty rows for dense
  // layers): what membership plans balance.
  std::vector<std::vector<double>> RecentLoads() const;

 private:
  struct Metrics;
  absl::StatusOr<switchyard::v1::ApplyPlacementResponse> ApplyLocked(
      const parallel::ExpertPlacement& p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(apply_mu_);
  absl::StatusOr<switchyard::v1::RebalanceReport> RebalanceLocked(
      const switchyard::v1::RebalanceRequest& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(apply_mu_);
  void Periodic();

  model::MoeModel* model_;
  scheduler::DistributedStepExecutor* executor_;
  AdminOptions options_;
  std::unique_ptr<parallel::ExpertLoadRecorder> recorder_;
  std::shared_ptr<const parallel::ExpertPlacement> single_rank_placement_;
  std::shared_ptr<Metrics> metrics_;
  sy::Mutex apply_mu_;  // guards no data: one apply / rebalance at a time
  std::atomic<bool> stopped_{false};
  std::atomic<int64_t> rebalances_{0};
  sy::Mutex thread_mu_;  // guards no data: pairs thread_cv_ with stopped_ (an atomic)
  sy::CondVar thread_cv_;
  std::thread thread_;
};

}  // namespace sy::server
