// `switchyard worker`: joins a leader (`switchyard serve --cluster-port P --secret S`) as one
// more rank and serves its share of every step (server/worker.h). SIGTERM or SIGINT drains
// the rank out of the group first (no request fails), then it exits 0.
// Exit status: 0 when the leader shut the group down or let this rank go, 1 on any failure
// (message on stderr), 2 on bad flags, 3 when the join was refused (wrong secret, other model,
// group full, a second join of this process).
#include <signal.h>

#include <atomic>
#include <cstdio>

#include "server/commands.h"
#include "server/flags.h"
#include "server/worker.h"

namespace sy::server {
namespace {

std::atomic<bool> g_leave{false};

extern "C" void OnWorkerSignal(int) { g_leave.store(true); }

}  // namespace

int WorkerCommand(int argc, char** argv) {
  WorkerOptions o;
  FlagSet flags("worker",
                "Join a leader's rank group: `switchyard worker --join HOST:PORT --secret S`.\n"
                "The checkpoint is read from this machine's disk (--model). SIGTERM drains the\n"
                "rank out of the group (its sequences finish or move), then it exits 0.");
  flags.Add("join", &o.join, "the leader's Cluster service (serve --cluster-port), HOST:PORT");
  flags.Add("secret", &o.secret, "the cluster secret (serve --secret; or env SWITCHYARD_CLUSTER_SECRET)");
  flags.Add("secret-file", &o.secret_file, "read the cluster secret from this file (not in ps)");
  flags.Add("model", &o.model, "checkpoint folder; empty or 'demo': the built-in demo model");
  flags.Add("host", &o.host,
            "address this rank listens on for the other ranks (announced); empty: the address "
            "of the interface that routes to the leader");
  std::string device = "cpu";
  flags.Add("device", &device,
            "where this rank's model runs: cpu, or cuda / cuda:K (the weight products on GPU K)");
  flags.Add("backend", &o.backend, "CPU compute backend (auto, cpu, reference)");
  flags.Add("threads", &o.threads, "compute threads; 0: SWITCHYARD_THREADS or every core");
  flags.Add("kv-cache-bytes", &o.kv_cache_bytes,
            "bytes of this rank's KV cache (the sequences homed here); it adds to the group's");
  flags.Add("join-timeout", &o.join_timeout_s,
            "seconds to keep retrying a leader that does not answer (also after it went away)");
  flags.Add("metrics-port", &o.metrics_port,
            "this rank's Prometheus /metrics port (its tokens, all-to-all seconds, KV use, "
            "state); -1: none, 0: the OS picks");
  flags.Add("metrics-host", &o.metrics_host, "address /metrics listens on");
  flags.Add("tls-ca", &o.tls.ca, "PEM CA that verifies the leader's Cluster service (TLS)");
  flags.Add("tls-cert", &o.tls.cert, "PEM certificate this rank presents (the leader's --cluster-tls-ca)");
  flags.Add("tls-key", &o.tls.key, "PEM key of --tls-cert");
  flags.Add("tls-server-name", &o.tls.server_name, "name to check in the leader's certificate");
  flags.Add("rejoin", &o.rejoin,
            "join again as a new rank when fenced (declared dead while stopped or cut off)");
  flags.MarkSecret("secret", "secret-file");
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  if (auto b = BackendForDevice(device, o.backend); b.ok()) {
    o.backend = *b;
  } else {
    std::fprintf(stderr, "worker: %s\n", b.status().ToString().c_str());
    return 2;
  }
  struct sigaction sa {};
  sa.sa_handler = OnWorkerSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  absl::Status s = RunWorker(
      o, [](const std::string& line) { std::fprintf(stderr, "worker: %s\n", line.c_str()); },
      &g_leave);
  if (s.ok()) {
    std::fprintf(stderr, "worker: bye\n");
    return 0;
  }
  const bool refused = s.code() == absl::StatusCode::kPermissionDenied ||
                       s.code() == absl::StatusCode::kUnauthenticated ||
                       s.code() == absl::StatusCode::kFailedPrecondition ||
                       s.code() == absl::StatusCode::kAlreadyExists ||
                       s.code() == absl::StatusCode::kInvalidArgument ||
                       s.code() == absl::StatusCode::kResourceExhausted;
  std::fprintf(stderr, "worker: %s%s\n", refused ? "join refused: " : "", s.ToString().c_str());
  return refused ? 3 : 1;
}

}  // namespace sy::server
