// ClusterLeader: the rank-group side of `switchyard serve` (DESIGN.md §3 and §5,
// server/CLUSTER.md). The Daemon makes one when the daemon serves a group:
//   * elastic (`--secret S`, or `--min-ranks N` above 1): the group starts as the leader
//     alone (holding every expert) and ranks join at any time through the Cluster service
//     (server/cluster_service.h, `switchyard worker --join`), drain out (SIGTERM to a worker,
//     Admin.DrainRank) or die (the group re-forms from the survivors). `--min-ranks N`: the
//     daemon is not SERVING before N ranks are in; `--max-ranks M` caps the group.
//     Communicators: Gloo over TCP, meeting through the Membership's rendezvous store.
//   * threads (`--local-ranks N`): ranks 1..N-1 are threads of this process running the same
//     RankRunner, each with its own model share, KV pool and LocalCommunicator; the group is
//     fixed (no Cluster service).
// Either way the leader's executor is a scheduler::DistributedStepExecutor over the group's
// parallel::Membership.
//
// Metrics (RegisterMetrics): switchyard_ep_world_size, _ep_membership_epoch,
// _ep_membership_changes_total{reason}, _ep_scale_seconds, _ep_recovery_seconds,
// _ep_migrated_bytes_total, _rank_state{rank,state}, _rank_up{rank},
// _ep_rank_tokens_total{rank}, _ep_rank_kv_blocks{rank}, _ep_dispatch_bytes_total{phase},
// _ep_alltoall_seconds_total{phase}, _ep_balancedness.
//
// Thread safety: Start, MakeExecutor and RegisterMetrics from the daemon's loading thread;
// membership() and SetLoadSource from any thread; the destructor after the executor (the
// engine) is gone.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/server.h"
#include "kernels/core/mutex.h"
#include "model/config.h"
#include "model/moe_model.h"
#include "parallel/expert_placement.h"
#include "parallel/local_communicator.h"
#include "parallel/membership.h"
#include "prometheus/registry.h"
#include "scheduler/distributed_executor.h"
#include "scheduler/rank_runner.h"
#include "server/cluster_service.h"
#include "server/tls.h"

namespace sy::server {

struct ClusterOptions {
  int min_ranks = 1;            // elastic: SERVING once this many ranks (the leader included)
  int max_ranks = 0;            // elastic: most ranks; 0 = unlimited
  int local_ranks = 1;          // ranks as threads of this process (a fixed group)
  std::string cluster_host;     // where the Cluster service listens; "": serve's --host
  int cluster_port = 50052;     // 0: the OS picks (see ClusterLeader::cluster_port())
  // Address rank 0's communicator listens on and announces; "": --host when that is one
  // address, else the address of this machine's host name.
  std::string rank_host;
  std::string secret;           // joins need it; set (flag, file or env): the group is elastic
  std::string secret_file;      // read at start (keeps the secret out of `ps`)
  int64_t collective_timeout_ms = 30000;
  std::string transport = "tcp";  // rank processes' communicator engine: tcp | gloo
  // Every rank splits each step in two micro-batches and overlaps one's all-to-all with the
  // other's attention (EpDispatchOptions::two_batch_overlap); workers take the leader's.
  bool two_batch_overlap = false;
  int64_t heartbeat_interval_ms = 200;
  int64_t heartbeat_timeout_ms = 1000;  // a rank silent this long is dead once its epoch broke
  double rank_wait_timeout_s = 600;  // how long serve waits for --min-ranks ranks
  double drain_timeout_s = 30;  // a draining rank's sequences move to other ranks after this
  double join_timeout_s = 0;    // a joining rank must connect within this; 0: the collective time-out (at least 10 s)
  // Expert slots per rank and MoE layer; 0: ceil(experts / ranks). Extra slots start empty
  // and let a rebalance add replicas of hot experts.
  int expert_slots_per_rank = 0;
  TlsServerOptions tls;                // the Cluster service (mutual TLS with client_ca)
  std::string scale_policy = "ilp";    // planner for joins and drains (failures: repair)
  double scale_time_limit_s = 0.2;     // per layer

  bool elastic() const { return local_ranks <= 1 && (min_ranks > 1 || !secret.empty()); }
  bool multi_rank() const { return local_ranks > 1 || elastic(); }
};

class ClusterLeader {
 public:
  // Reads model_dir/config.json, checks the options, starts the Cluster service or the rank
  // threads. kv_cache_bytes / block_size: every rank's KV pool (workers bring their own).
  static absl::StatusOr<std::unique_ptr<ClusterLeader>> Start(
      const ClusterOptions& options, const std::string& model_dir, const std::string& backend,
      int64_t kv_cache_bytes, int64_t block_size,
      const std::function<void(const std::string&)>& progress = nullptr);
  ~ClusterLeader();

  // The experts the leader loads at start (LoadOptions::experts_per_layer; empty: all).
  std::vector<std::vector<int32_t>> leader_experts() const;
  int cluster_port() const { return cluster_port_; }
  parallel::Membership* membership() { return membership_.get(); }
  const ClusterOptions& options() const { return options_; }

  // Makes the leader's executor over `model` (not owned; loaded with leader_experts()); with
  // --min-ranks waits until that many ranks serve. on_failure runs once when the group cannot
  // go on. CANCELLED when *cancel turns true while waiting (a drain during loading).
  absl::StatusOr<std::unique_ptr<scheduler::StepExecutor>> MakeExecutor(
      model::MoeModel* model, std::function<void(const absl::Status&)> on_failure,
      const std::atomic<bool>* cancel = nullptr);

  void RegisterMetrics(prometheus::Registry& registry);
  // The Cluster service ranks call (for its auth-failure hook); null when every rank is a
  // thread of this process.
  ClusterService* service() { return service_.get(); }
  // Recent tokens per expert [layers][experts] that membership plans balance (the leader's
  // load window); unset: even loads.
  void SetLoadSource(std::function<std::vector<std::vector<double>>()> source);

 private:
  class Observer;
  ClusterLeader() = default;
  absl::StatusOr<parallel::ExpertPlacement> PlanMembership(const parallel::ExpertPlacement& current,
                                                          const std::vector<int>& old_rank_of_new,
                                                          bool urgent) const;

  ClusterOptions options_;
  model::ModelConfig config_;
  std::string model_dir_, backend_;
  int64_t num_blocks_ = 0, block_size_ = 16;
  std::unique_ptr<parallel::Membership> membership_;
  parallel::EpochView first_;
  // Elastic.
  std::unique_ptr<ClusterService> service_;
  std::unique_ptr<grpc::Server> server_;
  int cluster_port_ = -1;
  // Threads.
  struct LocalRank {
    std::unique_ptr<model::MoeModel> model;
    std::unique_ptr<scheduler::RankRunner> runner;
    std::thread thread;
  };
  std::unique_ptr<parallel::LocalRendezvous> rendezvous_;
  std::unique_ptr<parallel::LocalMembershipClient> local_client_;
  std::vector<std::unique_ptr<LocalRank>> local_ranks_;

  std::unique_ptr<Observer> observer_;
  mutable sy::Mutex load_mu_;
  std::function<std::vector<std::vector<double>>()> load_source_ ABSL_GUARDED_BY(load_mu_);
};

}  // namespace sy::server
