#include "server/live_placement.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "kernels/core/dtype.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "parallel/planner/placement_problem.h"
#include "parallel/planner/planner.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "scheduler/rank_control.h"
#include "server/flags.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;
using parallel::ExpertPlacement;
using parallel::planner::RoutingTrace;

namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int ModelLayerOf(const RoutingTrace& t, int l) {
  return l < static_cast<int>(t.layer_ids.size()) ? t.layer_ids[l] : l;
}

std::vector<float> SharesOf(const ExpertPlacement& p, int layer) {
  std::vector<float> s;
  if (!p.has_shares(layer)) return s;
  for (int slot = 0; slot < p.num_slots(); ++slot) s.push_back(p.share_of(layer, slot));
  return s;
}

// The rows of `full` for the trace's MoE layers, as a placement of trace.num_layers layers.
absl::StatusOr<ExpertPlacement> Restrict(const ExpertPlacement& full, const RoutingTrace& t) {
  std::vector<std::vector<int32_t>> rows;
  std::vector<std::vector<float>> shares;
  bool any_share = false;
  for (int l = 0; l < t.num_layers; ++l) {
    const int ml = ModelLayerOf(t, l);
    if (ml < 0 || ml >= full.num_layers())
      return absl::InvalidArgumentError(absl::StrCat("trace layer ", ml, " is not in the placement"));
    rows.push_back(full.physical_to_logical(ml));
    shares.push_back(SharesOf(full, ml));
    any_share = any_share || !shares.back().empty();
  }
  if (!any_share) shares.clear();
  return ExpertPlacement::Create(full.world_size(), full.slots_per_rank(), full.num_experts(),
                                 std::move(rows), std::move(shares), full.epoch());
}

// `current` with the trace's MoE layers replaced by the planned ones.
absl::StatusOr<ExpertPlacement> Expand(const ExpertPlacement& planned, const ExpertPlacement& current,
                                       const RoutingTrace& t) {
  if (planned.slots_per_rank() != current.slots_per_rank() ||
      planned.world_size() != current.world_size())
    return absl::InternalError("planned placement has another shape than the current one");
  std::vector<std::vector<int32_t>> rows;
  std::vector<std::vector<float>> shares;
  for (int ml = 0; ml < current.num_layers(); ++ml) {
    rows.push_back(current.physical_to_logical(ml));
    shares.push_back(SharesOf(current, ml));
  }
  for (int l = 0; l < t.num_layers; ++l) {
    const int ml = ModelLayerOf(t, l);
    rows[ml] = planned.physical_to_logical(l);
    shares[ml] = SharesOf(planned, l);
  }
  bool any_share = false;
  for (const auto& s : shares) any_share = any_share || !s.empty();
  if (!any_share) shares.clear();
  return ExpertPlacement::Create(current.world_size(), current.slots_per_rank(),
                                 current.num_experts(), std::move(rows), std::move(shares),
                                 current.epoch());
}

}  // namespace

void AddAdminFlags(FlagSet& flags, AdminOptions* o) {
  flags.Add("admin-token", &o->admin_token,
            "bearer token the Admin service requires (metadata authorization: Bearer T); "
            "empty: SWITCHYARD_ADMIN_TOKEN, else no token and Admin answers only this host");
  flags.Add("admin-token-file", &o->admin_token_file,
            "read the admin token from this file (not visible in ps)");
  flags.Add("rebalance-every", &o->rebalance_every,
            "check the expert balance every N engine steps and rebalance when it is under "
            "--rebalance-threshold; 0: never");
  flags.Add("rebalance-threshold", &o->rebalance_threshold,
            "expected balancedness (mean/max rank load, 0..1) under which to rebalance");
  flags.Add("rebalance-policy", &o->rebalance_policy, "planner of the periodic rebalance (greedy, ilp)");
  flags.Add("planner-time-limit", &o->planner_time_limit_s, "ilp planner: seconds per layer");
  flags.Add("load-window-steps", &o->load_window_steps,
            "steps in the expert-load statistics' sliding window");
  flags.Add("switch-layers-per-plan", &o->switch_layers_per_plan,
            "placement switch: layers whose gained experts are mapped per control plan (steps "
            "run between plans)");
}

struct LivePlacement::Metrics {
  prometheus::Gauge* epoch = nullptr;
  prometheus::Counter* rebalances = nullptr;
  prometheus::Histogram* rebalance_seconds = nullptr;
  prometheus::Counter* migrated_bytes = nullptr;
  prometheus::Family<prometheus::Histogram>* solve_seconds = nullptr;
  prometheus::Gauge* gap = nullptr;
  prometheus::Gauge* expected_balancedness = nullptr;
};

LivePlacement::LivePlacement(model::MoeModel* model, scheduler::DistributedStepExecutor* executor,
                             prometheus::Registry* registry, const AdminOptions& options)
    : model_(model), executor_(executor), options_(options) {
  recorder_ = std::make_unique<parallel::ExpertLoadRecorder>(
      scheduler::LoadOptionsForModel(*model, std::max(1, options.load_window_steps)));
  model_->SetLoadRecorder(recorder_.get());
  const model::ModelConfig& c = model->config();
  if (executor_ == nullptr && c.num_experts > 0)
    single_rank_placement_ = std::make_shared<const ExpertPlacement>(ExpertPlacement::Contiguous(
        static_cast<int>(c.num_layers), static_cast<int>(c.num_experts), 1));
  if (registry != nullptr) {
    auto m = std::make_shared<Metrics>();
    m->epoch = &prometheus::BuildGauge()
                    .Name("switchyard_placement_epoch")
                    .Help("Epoch of the expert placement in force.")
                    .Register(*registry)
                    .Add({});
    m->rebalances = &prometheus::BuildCounter()
                         .Name("switchyard_rebalances_total")
                         .Help("Placements applied live (Admin.ApplyPlacement, Admin.Rebalance, periodic).")
                         .Register(*registry)
                         .Add({});
    m->rebalance_seconds = &prometheus::BuildHistogram()
                                .Name("switchyard_rebalance_seconds")
                                .Help("Seconds from the load snapshot (or the apply call) to every rank switched.")
                                .Register(*registry)
                                .Add({}, prometheus::Histogram::BucketBoundaries{
                                             0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60});
    m->migrated_bytes = &prometheus::BuildCounter()
                             .Name("switchyard_migrated_bytes_total")
                             .Help("Expert weight bytes ranks gained through placement changes.")
                             .Register(*registry)
                             .Add({});
    m->solve_seconds = &prometheus::BuildHistogram()
                            .Name("switchyard_planner_solve_seconds")
                            .Help("Planner wall time per rebalance, by policy.")
                            .Register(*registry);
    m->gap = &prometheus::BuildGauge()
                  .Name("switchyard_planner_gap")
                  .Help("Largest relative optimality gap over layers of the last plan (0 for heuristics).")
                  .Register(*registry)
                  .Add({});
    m->expected_balancedness = &prometheus::BuildGauge()
                                    .Name("switchyard_placement_expected_balancedness")
                                    .Help("Mean/max rank load of the placement on the load window (1 = even).")
                                    .Register(*registry)
                                    .Add({});
    m->expected_balancedness->Set(1);
    metrics_ = m;
  }
}

LivePlacement::~LivePlacement() {
  Stop();
  model_->SetLoadRecorder(nullptr);
}

void LivePlacement::Start() {
  if (options_.rebalance_every > 0 && executor_ != nullptr)
    thread_ = std::thread([this] { Periodic(); });
}

void LivePlacement::Stop() {
  {
    sy::MutexLock lock(&thread_mu_);
    stopped_ = true;
    thread_cv_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
  sy::MutexLock lock(&apply_mu_);  // an apply in flight finishes first
}

int LivePlacement::world_size() const {
  return executor_ != nullptr ? executor_->placement()->world_size() : 1;
}

std::shared_ptr<const ExpertPlacement> LivePlacement::placement() const {
  return executor_ != nullptr ? executor_->placement() : single_rank_placement_;
}

double LivePlacement::measured_balancedness() const {
  return executor_ != nullptr ? executor_->stats().dispatch.balancedness : 1.0;
}

absl::StatusOr<RoutingTrace> LivePlacement::Snapshot(bool include_paths) {
  if (stopped_.load()) return absl::UnavailableError("the daemon is draining");
  std::vector<RoutingTrace> traces{recorder_->Snapshot()};
  if (executor_ != nullptr) {
    SY_ASSIGN_OR_RETURN(std::vector<std::string> jsons, executor_->GatherLoadTraces());
    for (size_t r = 1; r < jsons.size(); ++r) {
      if (jsons[r].empty()) continue;
      auto t = parallel::planner::ParseTrace(jsons[r]);
      if (!t.ok()) return sy::Annotate(t.status(), absl::StrCat("load trace of rank ", r));
      traces.push_back(*std::move(t));
    }
  }
  SY_ASSIGN_OR_RETURN(RoutingTrace merged, scheduler::MergeTraces(traces));
  merged.name = "switchyard-live";
  merged.model = model_->config().model_type;
  if (!include_paths) merged.token_paths.clear();
  return merged;
}

double LivePlacement::ExpectedBalancedness(const ExpertPlacement& p, const RoutingTrace& t) {
  double sum = 0;
  int layers = 0;
  for (int l = 0; l < t.num_layers; ++l) {
    const int ml = ModelLayerOf(t, l);
    if (ml < 0 || ml >= p.num_layers()) continue;
    std::vector<double> load(p.world_size(), 0);
    for (int slot = 0; slot < p.num_slots(); ++slot) {
      const int32_t e = p.expert_of(ml, slot);
      if (e < 0 || e >= static_cast<int>(t.expert_counts[l].size())) continue;
      load[p.rank_of_slot(slot)] += t.expert_counts[l][e] * p.share_of(ml, slot);
    }
    const double mx = *std::max_element(load.begin(), load.end());
    double mean = 0;
    for (double v : load) mean += v;
    mean /= static_cast<double>(load.size());
    sum += mx > 0 ? mean / mx : 1.0;
    ++layers;
  }
  return layers > 0 ? sum / layers : 1.0;
}

absl::StatusOr<v1::ApplyPlacementResponse> LivePlacement::Apply(const ExpertPlacement& p) {
  sy::MutexLock lock(&apply_mu_);
  return ApplyLocked(p);
}

absl::StatusOr<v1::ApplyPlacementResponse> LivePlacement::ApplyLocked(const ExpertPlacement& p) {
  if (stopped_.load()) return absl::UnavailableError("the daemon is draining");
  if (executor_ == nullptr)
    return absl::FailedPreconditionError(
        "this daemon runs one rank: every expert is on it, there is no placement to change "
        "(serve with --local-ranks or --min-ranks above 1)");
  SY_ASSIGN_OR_RETURN(scheduler::PlacementSwitchReport r, executor_->SwitchPlacement(p, options_.switch_layers_per_plan));
  v1::ApplyPlacementResponse out;
  out.set_epoch(r.epoch);
  out.set_experts_gained(r.experts_gained);
  out.set_experts_released(r.experts_released);
  out.set_migrated_bytes(r.gained_bytes);
  out.set_switch_seconds(r.seconds);
  rebalances_.fetch_add(1);
  if (metrics_ != nullptr) {
    metrics_->epoch->Set(static_cast<double>(r.epoch));
    metrics_->rebalances->Increment();
    metrics_->migrated_bytes->Increment(static_cast<double>(r.gained_bytes));
  }
  return out;
}

absl::StatusOr<v1::RebalanceReport> LivePlacement::Rebalance(const v1::RebalanceRequest& req) {
  if (!apply_mu_.TryLock())
    return absl::FailedPreconditionError("a placement change is already running");
  absl::StatusOr<v1::RebalanceReport> report = RebalanceLocked(req);
  apply_mu_.Unlock();
  return report;
}

absl::StatusOr<v1::RebalanceReport> LivePlacement::RebalanceLocked(
    const v1::RebalanceRequest& req) {
  if (stopped_.load()) return absl::UnavailableError("the daemon is draining");
  if (executor_ == nullptr)
    return absl::FailedPreconditionError(
        "this daemon runs one rank: there is nothing to rebalance (serve with --local-ranks or "
        "--min-ranks above 1)");
  const auto t0 = std::chrono::steady_clock::now();
  v1::RebalanceReport report;
  report.set_policy(req.policy().empty() ? "greedy" : req.policy());
  parallel::planner::PlannerOptions po;
  po.time_limit_seconds = req.time_limit_seconds() > 0 ? req.time_limit_seconds()
                                                        : options_.planner_time_limit_s;
  auto planner = parallel::planner::CreatePlanner(report.policy(), po);
  if (!planner.ok()) return sy::Annotate(planner.status(), "policy");
  if (req.min_improvement() < 0 || req.time_limit_seconds() < 0)
    return absl::InvalidArgumentError("min_improvement and time_limit_seconds must be >= 0");

  SY_ASSIGN_OR_RETURN(RoutingTrace trace, Snapshot(true));
  report.set_window_tokens(trace.num_tokens);
  const std::shared_ptr<const ExpertPlacement> current = placement();
  const double before = ExpectedBalancedness(*current, trace);
  report.set_balancedness_before(before);
  if (metrics_ != nullptr) metrics_->expected_balancedness->Set(before);
  if (trace.num_tokens <= 0) {
    report.set_balancedness_after(before);
    report.set_reason("no tokens in the load window yet");
    return report;
  }
  SY_ASSIGN_OR_RETURN(ExpertPlacement sub, Restrict(*current, trace));
  const model::ModelConfig& c = model_->config();
  const double expert_bytes = 3.0 * static_cast<double>(c.hidden_size) *
                              static_cast<double>(c.moe_intermediate_size) * 2.0;
  SY_ASSIGN_OR_RETURN(auto problems, parallel::planner::BuildProblems(
                                         trace, current->world_size(), current->slots_per_rank(),
                                         &sub, expert_bytes));
  SY_ASSIGN_OR_RETURN(parallel::planner::PlanResult plan, (*planner)->Plan(problems));
  report.set_solve_seconds(plan.wall_seconds);
  report.set_gap(plan.max_gap);
  if (metrics_ != nullptr) {
    metrics_->solve_seconds
        ->Add({{"policy", report.policy()}},
              prometheus::Histogram::BucketBoundaries{0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60})
        .Observe(plan.wall_seconds);
    metrics_->gap->Set(plan.max_gap);
  }
  SY_ASSIGN_OR_RETURN(ExpertPlacement next, Expand(plan.placement, *current, trace));
  const double after = ExpectedBalancedness(next, trace);
  report.set_balancedness_after(after);
  report.set_placement_json(next.ToJson());
  if (req.dry_run()) {
    report.set_reason("dry run");
    return report;
  }
  if (next == current->WithEpoch(next.epoch())) {
    report.set_reason("the plan is the placement in force");
    return report;
  }
  if (!(after > before + req.min_improvement())) {
    report.set_reason(absl::StrCat("no improvement: expected balancedness ", before, " -> ", after));
    return report;
  }
  SY_ASSIGN_OR_RETURN(v1::ApplyPlacementResponse applied, ApplyLocked(next));
  *report.mutable_apply() = applied;
  report.set_applied(true);
  report.set_reason(absl::StrCat("expected balancedness ", before, " -> ", after));
  if (metrics_ != nullptr) {
    metrics_->rebalance_seconds->Observe(Seconds(t0));
    metrics_->expected_balancedness->Set(after);
  }
  return report;
}

void LivePlacement::Periodic() {
  int64_t last = recorder_->steps_recorded();
  thread_mu_.Lock();
  while (!stopped_.load()) {
    thread_cv_.WaitFor(&thread_mu_, std::chrono::milliseconds(20));
    if (stopped_.load()) break;
    const int64_t steps = recorder_->steps_recorded();
    if (steps - last < options_.rebalance_every) continue;
    last = steps;
    thread_mu_.Unlock();
    auto trace = Snapshot(false);
    if (trace.ok() && trace->num_tokens > 0) {
      const double b = ExpectedBalancedness(*placement(), *trace);
      if (metrics_ != nullptr) metrics_->expected_balancedness->Set(b);
      if (b < options_.rebalance_threshold) {
        v1::RebalanceRequest req;
        req.set_policy(options_.rebalance_policy);
        auto r = Rebalance(req);
        if (!r.ok())
          SY_LOG(WARNING) << "periodic rebalance: " << r.status();
        else
          SY_LOG(INFO) << "periodic rebalance at step " << steps << " (balancedness " << b
                       << " < " << options_.rebalance_threshold << "): "
                       << (r->applied() ? "applied, " : "not applied, ") << r->reason();
      }
    } else if (!trace.ok()) {
      SY_LOG(WARNING) << "periodic rebalance: load snapshot: " << trace.status();
    }
    thread_mu_.Lock();
  }
  thread_mu_.Unlock();
}

std::vector<std::vector<double>> LivePlacement::RecentLoads() const {
  const RoutingTrace t = recorder_->Snapshot();
  std::vector<std::vector<double>> loads(model_->config().num_layers);
  for (int l = 0; l < t.num_layers; ++l) {
    const int ml = ModelLayerOf(t, l);
    if (ml < 0 || ml >= static_cast<int>(loads.size())) continue;
    loads[ml].assign(t.expert_counts[l].begin(), t.expert_counts[l].end());
  }
  return loads;
}

}  // namespace sy::server
