// Worker: one `switchyard worker --join HOST:PORT --secret S` process, a rank of an elastic
// group (DESIGN.md §3 and §5, server/CLUSTER.md). It loads the checkpoint from its own disk
// (the shared weights now, its experts once the leader placed it: the file is memory-mapped,
// so both are cheap), asks the leader's Cluster service to join (retrying while the leader is
// not up or the group re-forms), and runs scheduler::RankRunner: the step protocol in every
// membership epoch it is part of, heartbeats, re-forms after failures.
//
//   * `leave` turning true (SIGTERM) asks the leader to drain this rank out; the worker
//     returns OK once the group switched without it.
//   * Fenced (declared dead while it was stopped or cut off) or placed in an epoch that never
//     formed: it joins again as a new rank (a new id), while the leader answers, up to
//     --join-timeout since it last served.
//
// Used by cmd_worker.cc. Thread safety: RunWorker blocks its calling thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "server/tls.h"

namespace sy::server {

struct WorkerOptions {
  std::string join;                // leader's Cluster service, HOST:PORT
  std::string secret;
  std::string secret_file;         // read at start (keeps the secret out of `ps`)
  std::string model = "demo";      // checkpoint folder ("" or "demo": the built-in demo model)
  // Address this rank's communicator listens on and announces; "": the address of the
  // interface that routes to the leader.
  std::string host;
  std::string backend = "auto";
  int threads = 0;                 // compute threads; 0 = SWITCHYARD_THREADS or all cores
  int64_t kv_cache_bytes = 512ll << 20;  // this rank's KV pool
  double join_timeout_s = 60;      // how long to retry a leader that does not answer
  std::string metrics_host = "0.0.0.0";
  int metrics_port = -1;           // this rank's /metrics (server/worker_metrics.h); -1: none
  bool rejoin = true;              // join again as a new rank when fenced
  TlsClientOptions tls;            // to the Cluster service (the leader's --cluster-tls-*)
};

// OK when the leader shut the group down or drained this rank out; PERMISSION_DENIED /
// FAILED_PRECONDITION / ALREADY_EXISTS / RESOURCE_EXHAUSTED / INVALID_ARGUMENT when the join
// is refused; UNAVAILABLE when the leader went away and did not come back within
// join_timeout. `progress` (may be null) gets human-readable lines. `leave` (may be null):
// set it to drain this rank out.
absl::Status RunWorker(const WorkerOptions& options,
                       const std::function<void(const std::string&)>& progress = nullptr,
                       const std::atomic<bool>* leave = nullptr);

}  // namespace sy::server
