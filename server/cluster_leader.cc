#include "server/cluster_leader.h"

#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "parallel/ep_dispatch.h"
#include "parallel/gloo_communicator.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "scheduler/engine.h"

namespace sy::server {

struct ClusterLeader::Metrics {
  prometheus::Gauge* world_size = nullptr;
  prometheus::Gauge* balancedness = nullptr;
  prometheus::Family<prometheus::Gauge>* rank_tokens = nullptr;
  prometheus::Family<prometheus::Gauge>* rank_kv_blocks = nullptr;
  prometheus::Family<prometheus::Gauge>* rank_up = nullptr;
  prometheus::Family<prometheus::Gauge>* dispatch_bytes = nullptr;
  prometheus::Family<prometheus::Gauge>* alltoall_seconds = nullptr;
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
  if (options.min_ranks > 1 && options.local_ranks > 1)
    return absl::InvalidArgumentError(
        "--min-ranks (processes) and --local-ranks (threads) cannot both be above 1");
  if (options.min_ranks > 1 && options.secret.empty())
    return absl::InvalidArgumentError("--secret: required with --min-ranks above 1");
  if (options.collective_timeout_ms < 1)
    return absl::InvalidArgumentError("--collective-timeout-ms: must be >= 1");
  std::unique_ptr<ClusterLeader> c(new ClusterLeader());
  c->options_ = options;
  c->model_dir_ = model_dir;
  c->block_size_ = block_size;
  SY_ASSIGN_OR_RETURN(c->config_, model::ModelConfig::FromFile(
                                      (std::filesystem::path(model_dir) / "config.json").string()));
  const int64_t num_blocks = scheduler::NumBlocksForBytes(c->config_, kv_cache_bytes, block_size);
  c->num_blocks_ = num_blocks;
  const int world = options.world_size();
  if (c->config_.num_experts < 1)
    return absl::InvalidArgumentError("a multi-rank group needs a model with MoE layers");
  const int experts = static_cast<int>(c->config_.num_experts);
  const int min_slots = (experts + world - 1) / world;
  if (options.expert_slots_per_rank != 0 && options.expert_slots_per_rank < min_slots)
    return absl::InvalidArgumentError(absl::StrCat(
        "--expert-slots-per-rank: ", options.expert_slots_per_rank, " slots on ", world,
        " ranks cannot hold ", experts, " experts (at least ", min_slots, ")"));
  SY_ASSIGN_OR_RETURN(
      parallel::ExpertPlacement initial,
      parallel::ExpertPlacement::Contiguous(
          static_cast<int>(c->config_.num_layers), experts, world,
          options.expert_slots_per_rank > 0 ? options.expert_slots_per_rank : min_slots));
  c->placement_ = std::make_shared<const parallel::ExpertPlacement>(std::move(initial));
  const std::chrono::milliseconds timeout(options.collective_timeout_ms);

  if (options.min_ranks > 1) {
    ClusterServiceOptions so;
    so.secret = options.secret;
    so.world_size = world;
    so.model.set_model_type(c->config_.model_type);
    so.model.set_num_layers(c->config_.num_layers);
    so.model.set_hidden_size(c->config_.hidden_size);
    so.model.set_num_experts(c->config_.num_experts);
    so.model.set_vocab_size(c->config_.vocab_size);
    so.model_dir = model_dir;
    so.placement_json = c->placement_->ToJson();
    so.collective_timeout_ms = options.collective_timeout_ms;
    so.num_kv_blocks = num_blocks;
    so.kv_block_size = block_size;
    c->service_ = std::make_unique<ClusterService>(so);
    SY_ASSIGN_OR_RETURN(c->server_, StartClusterServer(options.cluster_host, options.cluster_port,
                                                       c->service_.get(), &c->cluster_port_));
    if (progress)
      progress(absl::StrCat("cluster service on ", options.cluster_host, ":", c->cluster_port_,
                            "; waiting for ", world - 1, " worker(s)"));
  } else {
    c->group_ = std::make_unique<parallel::LocalCommunicatorGroup>(world, timeout);
    for (int r = 1; r < world; ++r) {
      auto lr = std::make_unique<LocalRank>();
      model::LoadOptions lo;
      lo.backend = backend;
      lo.experts_per_layer = scheduler::ExpertsOfRank(*c->placement_, r);
      SY_ASSIGN_OR_RETURN(lr->model, model::MoeModel::Load(model_dir, lo));
      SY_ASSIGN_OR_RETURN(lr->dispatcher,
                          parallel::MakeExpertParallelDispatcher(c->group_->comm(r), c->placement_));
      lr->model->SetDispatcher(lr->dispatcher.get());
      lr->cache = std::make_unique<model::KvCache>(lr->model->config(), num_blocks, block_size);
      c->local_ranks_.push_back(std::move(lr));
    }
    for (int r = 1; r < world; ++r) {
      LocalRank* lr = c->local_ranks_[r - 1].get();
      parallel::Communicator* comm = c->group_->comm(r);
      lr->thread = std::thread([lr, comm, r] {
        absl::Status s = scheduler::RunRankLoop(comm, lr->model.get(), lr->cache.get());
        if (!s.ok()) SY_LOG(WARNING) << "local rank " << r << " left its loop: " << s;
      });
    }
  }
  return c;
}

ClusterLeader::~ClusterLeader() {
  // The executor (gone by now) sent the shutdown plan; breaking the group also frees rank
  // threads whose leader never started.
  if (group_ != nullptr) {
    group_->TEST_Break();
    for (auto& lr : local_ranks_)
      if (lr->thread.joinable()) lr->thread.join();
  }
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

std::vector<std::vector<int32_t>> ClusterLeader::leader_experts() const {
  return scheduler::ExpertsOfRank(*placement_, 0);
}

absl::StatusOr<std::unique_ptr<scheduler::StepExecutor>> ClusterLeader::MakeExecutor(
    model::MoeModel* model, std::function<void(const absl::Status&)> on_failure,
    const std::atomic<bool>* cancel) {
  parallel::Communicator* comm = nullptr;
  std::unique_ptr<parallel::Communicator> owned;
  if (service_ != nullptr) {
    SY_RETURN_IF_ERROR(service_->WaitForRanks(
        std::chrono::milliseconds(static_cast<int64_t>(options_.rank_wait_timeout_s * 1000)), cancel));
    parallel::GlooOptions go;
    go.rank = 0;
    go.world_size = options_.world_size();
    go.store = service_->store();
    go.prefix = "gloo/epoch-1";
    go.hostname = options_.rank_host;
    go.timeout = std::chrono::milliseconds(options_.collective_timeout_ms);
    auto created = parallel::CreateGlooCommunicator(go);
    if (!created.ok()) return sy::Annotate(created.status(), "connecting rank 0 to the workers");
    owned = std::move(*created);
    comm = owned.get();
  } else {
    comm = group_->comm(0);
  }
  ClusterService* service = service_.get();
  auto fail = [service, on_failure = std::move(on_failure)](const absl::Status& s) {
    if (service != nullptr) service->SetServing(false);
    if (on_failure) on_failure(s);
  };
  SY_ASSIGN_OR_RETURN(auto executor, scheduler::DistributedStepExecutor::Create(
                                         model, comm, std::move(owned), placement_, num_blocks_,
                                         block_size_, fail));
  executor_ = executor.get();
  executor->SetStatsObserver([this](const scheduler::DistributedStats& s) { Publish(s); });
  Publish(executor->stats());
  if (service_ != nullptr) service_->SetServing(true);
  return std::unique_ptr<scheduler::StepExecutor>(std::move(executor));
}

void ClusterLeader::RegisterMetrics(prometheus::Registry& registry) {
  auto m = std::make_shared<Metrics>();
  m->world_size = &prometheus::BuildGauge()
                       .Name("switchyard_ep_world_size")
                       .Help("Ranks in the expert-parallel group.")
                       .Register(registry)
                       .Add({});
  m->balancedness = &prometheus::BuildGauge()
                         .Name("switchyard_ep_balancedness")
                         .Help("Mean over max of the (token, expert) pairs each rank computed (1 = even).")
                         .Register(registry)
                         .Add({});
  m->rank_tokens = &prometheus::BuildGauge()
                        .Name("switchyard_ep_rank_tokens_total")
                        .Help("Tokens run on each home rank (attention, KV cache) since start.")
                        .Register(registry);
  m->rank_kv_blocks = &prometheus::BuildGauge()
                           .Name("switchyard_ep_rank_kv_blocks")
                           .Help("KV cache blocks held by recent sequences of each home rank.")
                           .Register(registry);
  m->rank_up = &prometheus::BuildGauge()
                    .Name("switchyard_rank_up")
                    .Help("1 while the rank is in a working group, 0 once the group failed.")
                    .Register(registry);
  m->dispatch_bytes = &prometheus::BuildGauge()
                           .Name("switchyard_ep_dispatch_bytes_total")
                           .Help("Bytes the leader rank sent to other ranks, by phase.")
                           .Register(registry);
  m->alltoall_seconds = &prometheus::BuildGauge()
                             .Name("switchyard_ep_alltoall_seconds_total")
                             .Help("Seconds the leader rank spent in all-to-alls, by phase.")
                             .Register(registry);
  m->world_size->Set(options_.world_size());
  metrics_ = m;
}

void ClusterLeader::Publish(const scheduler::DistributedStats& s) {
  Metrics* m = metrics_.get();
  if (m == nullptr) return;
  m->world_size->Set(s.world_size);
  m->balancedness->Set(s.dispatch.balancedness);
  for (int r = 0; r < s.world_size; ++r) {
    const std::map<std::string, std::string> label{{"rank", absl::StrCat(r)}};
    m->rank_tokens->Add(label).Set(static_cast<double>(s.rank_tokens[r]));
    m->rank_kv_blocks->Add(label).Set(static_cast<double>(s.rank_kv_blocks[r]));
    // A failed collective does not say which peer died: every other rank counts as down.
    m->rank_up->Add(label).Set(r == 0 || !s.broken ? 1 : 0);
  }
  m->dispatch_bytes->Add({{"phase", "dispatch"}}).Set(static_cast<double>(s.dispatch.dispatch_bytes));
  m->dispatch_bytes->Add({{"phase", "combine"}}).Set(static_cast<double>(s.dispatch.combine_bytes));
  m->alltoall_seconds->Add({{"phase", "counts"}}).Set(s.dispatch.counts_seconds);
  m->alltoall_seconds->Add({{"phase", "dispatch"}}).Set(s.dispatch.dispatch_seconds);
  m->alltoall_seconds->Add({{"phase", "combine"}}).Set(s.dispatch.combine_seconds);
}

}  // namespace sy::server
