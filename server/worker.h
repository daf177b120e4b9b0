// Worker: one `switchyard worker --join HOST:PORT --secret S` process, a rank > 0 of a
// multi-rank group (issue 4, DESIGN.md §3). It asks the leader's Cluster service for a rank,
// loads the checkpoint from its own disk with only the experts the placement gives it,
// connects its GlooCommunicator through the leader's rendezvous store, and runs the step
// loop (scheduler::RunRankLoop) until the leader sends shutdown or goes away.
//
// Used by cmd_worker.cc. Thread safety: RunWorker blocks its calling thread.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"

namespace sy::server {

struct WorkerOptions {
  std::string join;                // leader's Cluster service, HOST:PORT
  std::string secret;
  std::string model = "demo";      // checkpoint folder ("" or "demo": the built-in demo model)
  std::string host = "127.0.0.1";  // address this rank's communicator listens on / announces
  std::string backend = "auto";
  int threads = 0;                 // compute threads; 0 = SWITCHYARD_THREADS or all cores
  double join_timeout_s = 60;      // how long to retry a leader that is not up yet
};

// OK when the leader shut the group down; PERMISSION_DENIED / FAILED_PRECONDITION /
// RESOURCE_EXHAUSTED when the join is refused; UNAVAILABLE when the leader or a peer went
// away mid-run. `progress` (may be null) gets human-readable lines.
absl::Status RunWorker(const WorkerOptions& options,
                       const std::function<void(const std::string&)>& progress = nullptr);

}  // namespace sy::server
