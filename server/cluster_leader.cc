#include "server/cluster_leader.h"

#include <cstdlib>
#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "parallel/ep_dispatch.h"
#include "parallel/transport.h"
#include "parallel/planner/membership_plan.h"
#include "parallel/planner/planner.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "scheduler/engine.h"

namespace sy::server {

using std::chrono::milliseconds;

// The group's metrics, fed by the executor (GroupObserver) and the membership table.
class ClusterLeader::Observer : public scheduler::GroupObserver {
 public:
  Observer(parallel::Membership* membership, prometheus::Registry* registry)
      : membership_(membership) {
    if (registry == nullptr) return;
    auto& r = *registry;
    world_size_ = &prometheus::BuildGauge().Name("switchyard_ep_world_size")
                       .Help("Ranks in the expert-parallel group (the membership epoch in force).")
                       .Register(r).Add({});
    epoch_ = &prometheus::BuildGauge().Name("switchyard_ep_membership_epoch")
                  .Help("Membership epoch in force.").Register(r).Add({});
    changes_ = &prometheus::BuildCounter().Name("switchyard_ep_membership_changes_total")
                    .Help("Membership changes, by reason (join, drain, failure).").Register(r);
    for (const char* reason : {"join", "drain", "failure"}) changes_->Add({{"reason", reason}});
    scale_ = &prometheus::BuildHistogram().Name("switchyard_ep_scale_seconds")
                  .Help("Seconds from a worker's join call to the first step that runs tokens on it.")
                  .Register(r).Add({}, prometheus::Histogram::BucketBoundaries{
                                           0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120});
    recovery_ = &prometheus::BuildHistogram().Name("switchyard_ep_recovery_seconds")
                     .Help("Seconds from a detected rank failure to the first step of the re-formed group.")
                     .Register(r).Add({}, prometheus::Histogram::BucketBoundaries{
                                              0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60});
    migrated_ = &prometheus::BuildCounter().Name("switchyard_ep_migrated_bytes_total")
                     .Help("Expert weight bytes ranks mapped for membership changes.")
                     .Register(r).Add({});
    rank_state_ = &prometheus::BuildGauge().Name("switchyard_rank_state")
                       .Help("1 for the state each rank is in (joining, serving, draining, gone, dead).")
                       .Register(r);
    rank_up_ = &prometheus::BuildGauge().Name("switchyard_rank_up")
                    .Help("1 while the rank is a member of the epoch in force.").Register(r);
    balancedness_ = &prometheus::BuildGauge().Name("switchyard_ep_balancedness")
                         .Help("Mean over max of the (token, expert) pairs each rank computed (1 = even).")
                         .Register(r).Add({});
    rank_tokens_ = &prometheus::BuildGauge().Name("switchyard_ep_rank_tokens_total")
                        .Help("Tokens run on each home rank (attention, KV cache) since start.").Register(r);
    rank_kv_blocks_ = &prometheus::BuildGauge().Name("switchyard_ep_rank_kv_blocks")
                           .Help("KV cache blocks held by the sequences of each home rank.").Register(r);
    dispatch_bytes_ = &prometheus::BuildGauge().Name("switchyard_ep_dispatch_bytes_total")
                           .Help("Bytes the leader rank sent to other ranks in this epoch, by phase.")
                           .Register(r);
    alltoall_seconds_ = &prometheus::BuildGauge().Name("switchyard_ep_alltoall_seconds_total")
                             .Help("Seconds the leader rank spent in all-to-alls in this epoch, by phase.")
                             .Register(r);
    step_seconds_ = &prometheus::BuildGauge().Name("switchyard_rank_step_seconds_total")
                         .Help("Seconds of this rank's steps by part: attention, experts, all_to_all "
                               "(every collective of the step, waits included), other.")
                         .Register(r);
    enabled_ = true;
  }

  void OnStats(const scheduler::DistributedStats& s) override {
    if (!enabled_) return;
    world_size_->Set(s.world_size);
    epoch_->Set(static_cast<double>(s.epoch));
    balancedness_->Set(s.dispatch.balancedness);
    for (const auto& [id, n] : s.rank_tokens)
      rank_tokens_->Add({{"rank", absl::StrCat(id)}}).Set(static_cast<double>(n));
    for (const auto& [id, n] : s.rank_kv_blocks)
      rank_kv_blocks_->Add({{"rank", absl::StrCat(id)}}).Set(static_cast<double>(n));
    dispatch_bytes_->Add({{"phase", "dispatch"}}).Set(static_cast<double>(s.dispatch.dispatch_bytes));
    dispatch_bytes_->Add({{"phase", "combine"}}).Set(static_cast<double>(s.dispatch.combine_bytes));
    alltoall_seconds_->Add({{"phase", "counts"}}).Set(s.dispatch.counts_seconds);
    alltoall_seconds_->Add({{"phase", "dispatch"}}).Set(s.dispatch.dispatch_seconds);
    alltoall_seconds_->Add({{"phase", "combine"}}).Set(s.dispatch.combine_seconds);
    step_seconds_->Add({{"rank", "0"}, {"phase", "attention"}}).Set(s.split.attention);
    step_seconds_->Add({{"rank", "0"}, {"phase", "experts"}}).Set(s.split.experts);
    step_seconds_->Add({{"rank", "0"}, {"phase", "all_to_all"}}).Set(s.split.all_to_all);
    step_seconds_->Add({{"rank", "0"}, {"phase", "other"}}).Set(s.split.other);
    const auto now = std::chrono::steady_clock::now();
    bool publish = s.broken;
    {
      sy::MutexLock lock(&mu_);
      if (now - last_states_ > milliseconds(250)) {
        last_states_ = now;
        publish = true;
      }
    }
    if (publish) PublishStates(s.broken);
  }

  void OnMembershipChange(const scheduler::MembershipChange& c) override {
    if (!enabled_) return;
    changes_->Add({{"reason", scheduler::ReasonName(c.reason)}}).Increment();
    migrated_->Increment(static_cast<double>(c.migrated_bytes));
    epoch_->Set(static_cast<double>(c.epoch));
    PublishStates(false);
  }
  void OnFirstTokens(int32_t, double seconds) override {
    if (enabled_) scale_->Observe(seconds);
  }
  void OnRecovered(double seconds) override {
    if (enabled_) recovery_->Observe(seconds);
  }

 private:
  void PublishStates(bool broken) {
    const parallel::MembershipSnapshot snap = membership_->Snapshot();
    for (const parallel::RankInfo& r : snap.ranks) {
      const std::string id = absl::StrCat(r.id);
      for (parallel::RankState st :
           {parallel::RankState::kJoining, parallel::RankState::kServing,
            parallel::RankState::kDraining, parallel::RankState::kGone, parallel::RankState::kDead})
        rank_state_->Add({{"rank", id}, {"state", parallel::RankStateName(st)}})
            .Set(st == r.state ? 1 : 0);
      rank_up_->Add({{"rank", id}}).Set(!broken && r.comm_rank >= 0 ? 1 : 0);
    }
  }

  parallel::Membership* membership_;
  bool enabled_ = false;
  sy::Mutex mu_;
  std::chrono::steady_clock::time_point last_states_ ABSL_GUARDED_BY(mu_){};
  prometheus::Gauge* world_size_ = nullptr;
  prometheus::Gauge* epoch_ = nullptr;
  prometheus::Family<prometheus::Counter>* changes_ = nullptr;
  prometheus::Histogram* scale_ = nullptr;
  prometheus::Histogram* recovery_ = nullptr;
  prometheus::Counter* migrated_ = nullptr;
  prometheus::Family<prometheus::Gauge>* rank_state_ = nullptr;
  prometheus::Family<prometheus::Gauge>* rank_up_ = nullptr;
  prometheus::Gauge* balancedness_ = nullptr;
  prometheus::Family<prometheus::Gauge>* rank_tokens_ = nullptr;
  prometheus::Family<prometheus::Gauge>* rank_kv_blocks_ = nullptr;
  prometheus::Family<prometheus::Gauge>* dispatch_bytes_ = nullptr;
  prometheus::Family<prometheus::Gauge>* alltoall_seconds_ = nullptr;
  prometheus::Family<prometheus::Gauge>* step_seconds_ = nullptr;
};

absl::StatusOr<std::unique_ptr<ClusterLeader>> ClusterLeader::Start(
    const ClusterOptions& options_in, const std::string& model_dir, const std::string& backend,
    int64_t kv_cache_bytes, int64_t block_size,
    const std::function<void(const std::string&)>& progress) {
  ClusterOptions options = options_in;
  if (options.secret.empty())
    if (const char* env = std::getenv("SWITCHYARD_CLUSTER_SECRET")) options.secret = env;
  if (block_size < 1) return absl::InvalidArgumentError("--block-size: must be >= 1");
  if (options.min_ranks < 1 || options.local_ranks < 1)
    return absl::InvalidArgumentError("--min-ranks and --local-ranks must be >= 1");
  if (options.local_ranks > 1 && (options.min_ranks > 1 || !options.secret.empty()))
    return absl::InvalidArgumentError(
        "--local-ranks (a fixed group of threads) cannot be combined with --min-ranks or "
        "--secret (an elastic group of processes)");
  if (options.min_ranks > 1 && options.secret.empty())
    return absl::InvalidArgumentError("--secret: required with --min-ranks above 1");
  if (options.max_ranks < 0 || (options.max_ranks > 0 && options.max_ranks < options.min_ranks))
    return absl::InvalidArgumentError("--max-ranks: 0 (unlimited) or at least --min-ranks");
  if (options.collective_timeout_ms < 1)
    return absl::InvalidArgumentError("--collective-timeout-ms: must be >= 1");
  if (options.transport != "tcp" && options.transport != "gloo")
    return absl::InvalidArgumentError(
        absl::StrCat("--transport: '", options.transport, "': expected tcp or gloo"));
  if (options.heartbeat_interval_ms < 1 || options.heartbeat_timeout_ms <= options.heartbeat_interval_ms)
    return absl::InvalidArgumentError(
        "--heartbeat-interval-ms must be >= 1 and below --heartbeat-timeout-ms");
  if (options.drain_timeout_s < 0 || options.join_timeout_s < 0)
    return absl::InvalidArgumentError("--drain-timeout and --join-timeout must be >= 0");
  {
    parallel::planner::PlannerOptions po;
    if (options.scale_policy != "repair")
      SY_RETURN_IF_ERROR(sy::Annotate(parallel::planner::CreatePlanner(options.scale_policy, po).status(),
                                      "--scale-policy"));
  }
  std::unique_ptr<ClusterLeader> c(new ClusterLeader());
  c->options_ = options;
  c->model_dir_ = model_dir;
  c->backend_ = backend;
  c->block_size_ = block_size;
  SY_ASSIGN_OR_RETURN(c->config_, model::ModelConfig::FromFile(
                                      (std::filesystem::path(model_dir) / "config.json").string()));
  c->num_blocks_ = scheduler::NumBlocksForBytes(c->config_, kv_cache_bytes, block_size);
  if (c->num_blocks_ < 1)
    return absl::InvalidArgumentError(absl::StrCat("--kv-cache-bytes: ", kv_cache_bytes,
                                                   " bytes hold no KV block"));
  if (c->config_.num_experts < 1)
    return absl::InvalidArgumentError("a rank group needs a model with MoE layers");
  const int experts = static_cast<int>(c->config_.num_experts);
  const int layers = static_cast<int>(c->config_.num_layers);
  parallel::MembershipOptions mo;
  mo.max_ranks = options.max_ranks;
  mo.heartbeat_timeout = milliseconds(options.heartbeat_timeout_ms);
  mo.leader_address = options.rank_host;
  mo.leader_kv_blocks = c->num_blocks_;
  c->membership_ = std::make_unique<parallel::Membership>(mo);
  c->observer_ = std::make_unique<Observer>(c->membership_.get(), nullptr);
  const milliseconds timeout(options.collective_timeout_ms);

  c->first_.epoch = 1;
  c->first_.store_prefix = "epoch-1";
  if (options.local_ranks > 1) {
    const int world = options.local_ranks;
    const int min_slots = (experts + world - 1) / world;
    if (options.expert_slots_per_rank != 0 && options.expert_slots_per_rank < min_slots)
      return absl::InvalidArgumentError(absl::StrCat(
          "--expert-slots-per-rank: ", options.expert_slots_per_rank, " slots on ", world,
          " ranks cannot hold ", experts, " experts (at least ", min_slots, ")"));
    SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement placement,
                        parallel::ExpertPlacement::Contiguous(
                            layers, experts, world, std::max(options.expert_slots_per_rank, min_slots)));
    c->first_.members = {0};
    c->rendezvous_ = std::make_unique<parallel::LocalRendezvous>(timeout);
    c->local_client_ = std::make_unique<parallel::LocalMembershipClient>(c->membership_.get());
    for (int r = 1; r < world; ++r) {
      SY_ASSIGN_OR_RETURN(int32_t id, c->membership_->AddJoining("thread", 0, c->num_blocks_));
      c->first_.members.push_back(id);
      auto lr = std::make_unique<LocalRank>();
      model::LoadOptions lo;
      lo.backend = backend;
      lo.experts_per_layer = parallel::ExpertsOfRank(placement, r);
      SY_ASSIGN_OR_RETURN(lr->model, model::MoeModel::Load(model_dir, lo));
      scheduler::RankRunnerOptions ro;
      ro.id = id;
      ro.model = lr->model.get();
      ro.num_blocks = c->num_blocks_;
      ro.block_size = block_size;
      ro.dispatch.two_batch_overlap = options.two_batch_overlap;
      parallel::LocalRendezvous* rv = c->rendezvous_.get();
      ro.make_comm = [rv](const std::string& prefix, int rank, int world_size) {
        return absl::StatusOr<std::unique_ptr<parallel::Communicator>>(rv->Join(prefix, rank, world_size));
      };
      ro.store = c->membership_->store();
      ro.client = c->local_client_.get();
      ro.heartbeat_interval = milliseconds(options.heartbeat_interval_ms);
      ro.restart_timeout = timeout;
      lr->runner = std::make_unique<scheduler::RankRunner>(ro);
      c->local_ranks_.push_back(std::move(lr));
    }
    c->first_.placement_json = placement.ToJson();
    for (auto& lr : c->local_ranks_) {
      LocalRank* p = lr.get();
      parallel::EpochView first = c->first_;
      lr->thread = std::thread([p, first] {
        absl::Status s = p->runner->Run(first, /*joining=*/false);
        if (!s.ok()) SY_LOG(WARNING) << "local rank left its loop: " << s;
      });
    }
  } else {
    // Elastic: the leader alone holds every expert until ranks join.
    SY_ASSIGN_OR_RETURN(parallel::ExpertPlacement placement,
                        parallel::ExpertPlacement::Contiguous(
                            layers, experts, 1, std::max(options.expert_slots_per_rank, experts)));
    c->first_.members = {0};
    c->first_.placement_json = placement.ToJson();
    ClusterServiceOptions so;
    so.secret = options.secret;
    so.model.set_model_type(c->config_.model_type);
    so.model.set_num_layers(c->config_.num_layers);
    so.model.set_hidden_size(c->config_.hidden_size);
    so.model.set_num_experts(c->config_.num_experts);
    so.model.set_vocab_size(c->config_.vocab_size);
    so.model.set_dtype(c->config_.torch_dtype);
    so.model.set_moe_intermediate_size(c->config_.moe_intermediate_size);
    so.model.set_num_experts_per_tok(c->config_.num_experts_per_tok);
    so.model_dir = model_dir;
    so.collective_timeout_ms = options.collective_timeout_ms;
    so.kv_block_size = block_size;
    so.kv_bytes_per_block = model::KvCache::BytesPerBlock(c->config_, block_size);
    so.heartbeat_interval_ms = options.heartbeat_interval_ms;
    so.transport = options.transport;
    so.two_batch_overlap = options.two_batch_overlap;
    c->service_ = std::make_unique<ClusterService>(so, c->membership_.get());
    SY_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds,
                        MakeServerCredentials(options.tls, "cluster-tls"));
    SY_ASSIGN_OR_RETURN(c->server_, StartClusterServer(options.cluster_host, options.cluster_port,
                                                       c->service_.get(), &c->cluster_port_, creds));
    if (progress)
      progress(absl::StrCat("cluster service on ", options.cluster_host, ":", c->cluster_port_,
                            options.min_ranks > 1
                                ? absl::StrCat("; waiting for ", options.min_ranks - 1, " worker(s)")
                                : std::string("; workers may join at any time")));
  }
  return c;
}

ClusterLeader::~ClusterLeader() {
  // The executor (gone by now) sent the shutdown plan; a rank thread still in its loop (the
  // executor never started) is stopped.
  for (auto& lr : local_ranks_) lr->runner->Kill();
  for (auto& lr : local_ranks_)
    if (lr->thread.joinable()) lr->thread.join();
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

std::vector<std::vector<int32_t>> ClusterLeader::leader_experts() const {
  auto p = parallel::ExpertPlacement::FromJson(first_.placement_json);
  SY_CHECK(p.ok()) << p.status();
  return parallel::ExpertsOfRank(*p, 0);
}

void ClusterLeader::SetLoadSource(std::function<std::vector<std::vector<double>>()> source) {
  sy::MutexLock lock(&load_mu_);
  load_source_ = std::move(source);
}

absl::StatusOr<parallel::ExpertPlacement> ClusterLeader::PlanMembership(
    const parallel::ExpertPlacement& current, const std::vector<int>& old_rank_of_new,
    bool urgent) const {
  std::vector<std::vector<double>> loads;
  {
    sy::MutexLock lock(&load_mu_);
    if (load_source_) loads = load_source_();
  }
  parallel::planner::MembershipPlanOptions o;
  o.policy = urgent ? "repair" : options_.scale_policy;
  o.time_limit_seconds = options_.scale_time_limit_s;
  o.slots_per_rank = options_.expert_slots_per_rank;
  o.top_k = static_cast<int>(config_.num_experts_per_tok);
  o.expert_bytes = 3.0 * static_cast<double>(config_.hidden_size) *
                   static_cast<double>(config_.moe_intermediate_size);
  return parallel::planner::PlanMembership(current, old_rank_of_new, loads, o);
}

absl::StatusOr<std::unique_ptr<scheduler::StepExecutor>> ClusterLeader::MakeExecutor(
    model::MoeModel* model, std::function<void(const absl::Status&)> on_failure,
    const std::atomic<bool>* cancel) {
  const milliseconds timeout(options_.collective_timeout_ms);
  scheduler::GroupOptions go;
  go.num_blocks = num_blocks_;
  go.block_size = block_size_;
  go.timeout = timeout;
  go.drain_timeout = milliseconds(static_cast<int64_t>(options_.drain_timeout_s * 1000));
  go.dispatch.two_batch_overlap = options_.two_batch_overlap;
  go.join_timeout = options_.join_timeout_s > 0
                        ? milliseconds(static_cast<int64_t>(options_.join_timeout_s * 1000))
                        : std::max(timeout, milliseconds(10000));
  go.plan = [this](const parallel::ExpertPlacement& current, const std::vector<int>& old_rank_of_new,
                   bool urgent) { return PlanMembership(current, old_rank_of_new, urgent); };
  std::unique_ptr<parallel::Communicator> first_comm;
  if (rendezvous_ != nullptr) {
    parallel::LocalRendezvous* rv = rendezvous_.get();
    go.make_comm = [rv](const std::string& prefix, int rank, int world_size) {
      return absl::StatusOr<std::unique_ptr<parallel::Communicator>>(rv->Join(prefix, rank, world_size));
    };
    first_comm = rv->Join(first_.store_prefix, 0, first_.world_size());
  } else {
    SY_ASSIGN_OR_RETURN(go.make_comm,
                        parallel::ProcessCommunicatorFactory(options_.transport, membership_->store(),
                                                             options_.rank_host, timeout));
  }
  SY_ASSIGN_OR_RETURN(auto executor,
                      scheduler::DistributedStepExecutor::Create(model, membership_.get(), go, first_,
                                                                 std::move(first_comm),
                                                                 std::move(on_failure)));
  executor->SetObserver(observer_.get());
  observer_->OnStats(executor->stats());
  if (options_.elastic() && options_.min_ranks > 1) {
    const auto deadline = std::chrono::steady_clock::now() +
                          milliseconds(static_cast<int64_t>(options_.rank_wait_timeout_s * 1000));
    while (membership_->serving_ranks() < options_.min_ranks) {
      if (cancel != nullptr && cancel->load())
        return absl::CancelledError("stopped waiting for ranks: the server is shutting down");
      if (std::chrono::steady_clock::now() >= deadline)
        return absl::DeadlineExceededError(absl::StrCat(
            "only ", membership_->serving_ranks(), " of ", options_.min_ranks,
            " ranks joined within ", options_.rank_wait_timeout_s, " s (--min-ranks)"));
      std::this_thread::sleep_for(milliseconds(20));
    }
  }
  return std::unique_ptr<scheduler::StepExecutor>(std::move(executor));
}

void ClusterLeader::RegisterMetrics(prometheus::Registry& registry) {
  observer_ = std::make_unique<Observer>(membership_.get(), &registry);
}

}  // namespace sy::server
