// WorkerMetrics: a worker's own /metrics, so that Prometheus sees every rank of the group and
// not only the leader's view of it (`switchyard worker --metrics-port P`). Read from the rank's
// RankRunner at scrape time, every series labelled with the rank id:
//   switchyard_rank_tokens_total, _rank_steps_total (counters), _rank_kv_blocks,
//   _rank_kv_blocks_used (gauges: its pool, and the blocks of its sequences in the latest
//   step), switchyard_ep_alltoall_seconds_total{phase}, _ep_dispatch_bytes_total{phase}
//   (counters over its epochs), switchyard_ep_membership_epoch, switchyard_ep_world_size,
//   switchyard_rank_state{state} (joining, serving, draining, gone).
// Thread safety: SetRunner from the worker's thread; scrapes from the exposer's threads.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/metrics_http.h"
#include "scheduler/rank_runner.h"

namespace sy::server {

class WorkerMetrics {
 public:
  // Serves /metrics on host:port (0: the OS picks).
  static absl::StatusOr<std::unique_ptr<WorkerMetrics>> Start(const std::string& host, int port);
  ~WorkerMetrics();
  int port() const { return port_; }
  // The runner of the rank `id` this process serves now (null while it joins). Not owned;
  // reset to null before it goes.
  void SetRunner(const scheduler::RankRunner* runner, int32_t id);

 private:
  class Collector;
  WorkerMetrics() = default;
  std::shared_ptr<Collector> collector_;
  std::unique_ptr<MetricsHttpServer> exposer_;
  int port_ = -1;
};

}  // namespace sy::server
