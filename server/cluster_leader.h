// ClusterLeader: the multi-rank side of `switchyard serve` (issue 4, DESIGN.md §2-3). The
// Daemon makes one when the group has more than one rank:
//   * processes (--min-ranks N --cluster-port P --secret S): starts the Cluster service
//     (server/cluster_service.h); MakeExecutor waits until N-1 workers have joined
//     (`switchyard worker --join`), then connects rank 0's GlooCommunicator through the
//     service's in-memory rendezvous store;
//   * threads (--local-ranks N): ranks 1..N-1 are threads of this process, each with its own
//     MoeModel (only its experts), dispatcher and KvCache, over a LocalCommunicatorGroup.
// Either way the leader's executor is a scheduler::DistributedStepExecutor and the placement
// is contiguous (ExpertPlacement::Contiguous). Health: NOT_SERVING until every rank is in
// (the daemon's Load has not returned), and again once the group fails.
//
// Metrics (RegisterMetrics, updated after each step): switchyard_ep_world_size,
// _ep_rank_tokens_total{rank}, _ep_rank_kv_blocks{rank}, _ep_dispatch_bytes_total{phase},
// _ep_alltoall_seconds_total{phase}, _ep_balancedness, _rank_up{rank}.
//
// Thread safety: Start, MakeExecutor and RegisterMetrics from the daemon's loading thread;
// the destructor after the executor (the engine) is gone.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/server.h"
#include "model/config.h"
#include "model/moe_model.h"
#include "parallel/expert_placement.h"
#include "parallel/local_communicator.h"
#include "prometheus/registry.h"
#include "scheduler/distributed_executor.h"
#include "server/cluster_service.h"

namespace sy::server {

struct ClusterOptions {
  int min_ranks = 1;            // ranks as processes, the leader included
  int local_ranks = 1;          // ranks as threads of this process
  std::string cluster_host = "0.0.0.0";  // where the Cluster service listens
  int cluster_port = 50052;     // 0: the OS picks (see ClusterLeader::cluster_port())
  std::string rank_host = "127.0.0.1";   // address rank 0's communicator announces
  std::string secret;           // required with --min-ranks > 1
  int64_t collective_timeout_ms = 30000;
  double rank_wait_timeout_s = 600;  // how long serve waits for --min-ranks ranks
  // Expert slots per rank and MoE layer; 0: ceil(experts / ranks). Extra slots start empty
  // and let a rebalance add replicas of hot experts.
  int expert_slots_per_rank = 0;

  int world_size() const { return min_ranks > local_ranks ? min_ranks : local_ranks; }
  bool multi_rank() const { return world_size() > 1; }
};

class ClusterLeader {
 public:
  // Reads model_dir/config.json, checks the options, makes the placement, starts the Cluster
  // service or the rank threads. kv_cache_bytes / block_size: the leader's KV cache, whose
  // block count every rank allocates (block ids are global).
  static absl::StatusOr<std::unique_ptr<ClusterLeader>> Start(
      const ClusterOptions& options, const std::string& model_dir, const std::string& backend,
      int64_t kv_cache_bytes, int64_t block_size,
      const std::function<void(const std::string&)>& progress = nullptr);
  ~ClusterLeader();

  // The experts the leader loads (LoadOptions::experts_per_layer).
  std::vector<std::vector<int32_t>> leader_experts() const;
  int cluster_port() const { return cluster_port_; }
  int world_size() const { return options_.world_size(); }

  // Waits for the ranks, connects rank 0 and returns the leader's executor over `model` (not
  // owned; loaded with leader_experts()). on_failure runs once when the group fails.
  // CANCELLED when *cancel turns true while waiting for the ranks (a drain during loading).
  absl::StatusOr<std::unique_ptr<scheduler::StepExecutor>> MakeExecutor(
      model::MoeModel* model, std::function<void(const absl::Status&)> on_failure,
      const std::atomic<bool>* cancel = nullptr);

  void RegisterMetrics(prometheus::Registry& registry);

 private:
  struct Metrics;
  ClusterLeader() = default;
  void Publish(const scheduler::DistributedStats& stats);

  ClusterOptions options_;
  model::ModelConfig config_;
  std::string model_dir_;
  int64_t num_blocks_ = 0, block_size_ = 16;
  std::shared_ptr<const parallel::ExpertPlacement> placement_;
  // Processes.
  std::unique_ptr<ClusterService> service_;
  std::unique_ptr<grpc::Server> server_;
  int cluster_port_ = -1;
  // Threads.
  struct LocalRank {
    std::unique_ptr<model::MoeModel> model;
    std::unique_ptr<parallel::ExpertParallelDispatcher> dispatcher;
    std::unique_ptr<model::KvCache> cache;
    std::thread thread;
  };
  std::unique_ptr<parallel::LocalCommunicatorGroup> group_;
  std::vector<std::unique_ptr<LocalRank>> local_ranks_;
  std::shared_ptr<Metrics> metrics_;
  scheduler::DistributedStepExecutor* executor_ = nullptr;  // owned by the engine
};

}  // namespace sy::server
