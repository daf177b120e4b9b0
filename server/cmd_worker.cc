// `switchyard worker`: joins a leader (`switchyard serve --min-ranks N --cluster-port P
// --secret S`) as one more rank and runs its share of every step (server/worker.h).
// Exit status: 0 when the leader shut the group down, 1 on any failure (message on stderr),
// 2 on bad flags, 3 when the join was refused (wrong secret, other model, group full).
#include <cstdio>

#include "server/commands.h"
#include "server/flags.h"
#include "server/worker.h"

namespace sy::server {

int WorkerCommand(int argc, char** argv) {
  WorkerOptions o;
  FlagSet flags("worker",
                "Join a leader's rank group: `switchyard worker --join HOST:PORT --secret S`.\n"
                "The checkpoint is read from this machine's disk (--model).");
  flags.Add("join", &o.join, "the leader's Cluster service (serve --cluster-port), HOST:PORT");
  flags.Add("secret", &o.secret, "the cluster secret (serve --secret)");
  flags.Add("model", &o.model, "checkpoint folder; empty or 'demo': the built-in demo model");
  flags.Add("host", &o.host, "address this rank listens on for the other ranks (announced)");
  flags.Add("backend", &o.backend, "compute backend (auto, reference, cpu, cuda)");
  flags.Add("threads", &o.threads, "compute threads; 0: SWITCHYARD_THREADS or every core");
  flags.Add("join-timeout", &o.join_timeout_s, "seconds to keep retrying a leader that is not up");
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  absl::Status s;
  s = RunWorker(o, [](const std::string& line) { std::fprintf(stderr, "worker: %s\n", line.c_str()); });
  if (s.ok()) {
    std::fprintf(stderr, "worker: the leader shut the group down, bye\n");
    return 0;
  }
  const bool refused = s.code() == absl::StatusCode::kPermissionDenied ||
                       s.code() == absl::StatusCode::kUnauthenticated ||
                       s.code() == absl::StatusCode::kFailedPrecondition ||
                       s.code() == absl::StatusCode::kResourceExhausted;
  std::fprintf(stderr, "worker: %s%s\n", refused ? "join refused: " : "", s.ToString().c_str());
  return refused ? 3 : 1;
}

}  // namespace sy::server
