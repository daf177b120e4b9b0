// `switchyard serve`: the daemon. Listens at once (health NOT_SERVING), loads the model with a
// progress line, serves until SIGTERM or SIGINT, then drains (DESIGN.md §2, server/README.md).
#include <errno.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "kernels/core/mutex.h"

#include "kernels/core/logging.h"
#include "server/commands.h"
#include "server/daemon.h"
#include "server/flags.h"

namespace sy::server {
namespace {

int g_signal_pipe[2] = {-1, -1};

extern "C" void OnSignal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  if (write(g_signal_pipe[1], &b, 1) < 0) {
  }
}

// Prints "loading model ... 3.5 s" on one refreshed line (a plain line when stderr is not a
// terminal) until stopped.
class ProgressLine {
 public:
  void Start(const std::string& what) {
    Stop();
    what_ = what;
    start_ = std::chrono::steady_clock::now();
    tty_ = isatty(fileno(stderr));
    if (!tty_) {
      std::fprintf(stderr, "%s ...\n", what.c_str());
      return;
    }
    {
      sy::MutexLock lock(&mu_);
      running_ = true;
    }
    thread_ = std::thread([this] {
      sy::MutexLock lock(&mu_);
      while (running_) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
        std::fprintf(stderr, "\r%s ... %.1f s ", what_.c_str(), s);
        std::fflush(stderr);
        cv_.WaitFor(&mu_, std::chrono::milliseconds(250));
      }
      std::fprintf(stderr, "\n");
    });
  }
  void Stop() {
    {
      sy::MutexLock lock(&mu_);
      running_ = false;
      cv_.SignalAll();
    }
    if (thread_.joinable()) thread_.join();
  }
  ~ProgressLine() { Stop(); }

 private:
  std::string what_;
  std::chrono::steady_clock::time_point start_;
  bool tty_ = false;
  sy::Mutex mu_;
  sy::CondVar cv_;
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace

int ServeCommand(int argc, char** argv) {
  ServeOptions o;
  FlagSet flags("serve",
                "Serve a MoE model over gRPC (switchyard.v1.Inference, grpc.health.v1.Health,\n"
                "reflection) with Prometheus metrics at http://HOST:METRICS_PORT/metrics.\n"
                "SIGTERM or SIGINT drains: running requests finish, new ones get UNAVAILABLE.");
  flags.Add("model", &o.model,
            "checkpoint folder (Hugging Face layout); empty or 'demo': the built-in demo model, "
            "written once to the cache folder");
  flags.Add("host", &o.host, "address to listen on (gRPC and metrics)");
  flags.Add("port", &o.port, "gRPC port; 0 lets the OS pick (printed on stdout)");
  flags.Add("metrics-port", &o.metrics_port, "Prometheus /metrics port; 0: OS picks; -1: off");
  flags.Add("metrics-host", &o.metrics_host, "address /metrics listens on; empty: --host");
  flags.Add("tls-cert", &o.tls.cert, "PEM certificate chain: TLS on the gRPC port");
  flags.Add("tls-key", &o.tls.key, "PEM private key of --tls-cert");
  flags.Add("api-key-file", &o.api_key_file,
            "file of API keys (one per line, 16+ bytes): Inference calls need metadata "
            "'authorization: Bearer KEY'");
  flags.Add("tls-client-ca", &o.tls.client_ca,
            "PEM CA: clients must present a certificate it signed (mutual TLS)");
  flags.Add("cluster-tls-cert", &o.cluster.tls.cert,
            "PEM certificate of the Cluster service (with --cluster-tls-key, --cluster-tls-ca: "
            "ranks need a certificate of that CA, mutual TLS)");
  flags.Add("cluster-tls-key", &o.cluster.tls.key, "PEM key of --cluster-tls-cert");
  flags.Add("cluster-tls-ca", &o.cluster.tls.client_ca, "PEM CA that signs the ranks' certificates");
  std::string device = "cpu";
  flags.Add("device", &device,
            "where the model runs: cpu, or cuda / cuda:K (the weight products on GPU K, "
            "weights uploaded once in bf16; the rest on the CPU)");
  flags.Add("backend", &o.backend, "CPU compute backend (auto, cpu, reference)");
  flags.Add("threads", &o.threads, "compute threads; 0: SWITCHYARD_THREADS or every core");
  flags.Add("kv-cache-bytes", &o.kv_cache_bytes, "bytes of paged KV cache (sets the block count)");
  flags.Add("block-size", &o.block_size, "token positions per KV cache block");
  flags.Add("max-num-seqs", &o.max_num_seqs, "most sequences in one engine step");
  flags.Add("max-num-batched-tokens", &o.max_num_batched_tokens,
            "most tokens in one engine step (decode tokens plus prefill chunks)");
  flags.Add("max-queue", &o.max_queue,
            "most requests waiting to run; more get RESOURCE_EXHAUSTED");
  flags.Add("default-max-new-tokens", &o.default_max_new_tokens,
            "max_new_tokens of a request that does not set it (capped by the context)");
  flags.Add("max-message-bytes", &o.max_message_bytes,
            "largest request message; larger gets RESOURCE_EXHAUSTED");
  flags.Add("drain-timeout", &o.drain_timeout_s,
            "seconds a drain waits for running requests before aborting them (the daemon), or "
            "before moving them to other ranks (a rank drained out of the group)");
  flags.Add("secret", &o.cluster.secret,
            "cluster secret workers must present (or env SWITCHYARD_CLUSTER_SECRET); with it the "
            "daemon serves an elastic rank group that `switchyard worker --join` joins at any time");
  flags.Add("secret-file", &o.cluster.secret_file,
            "read the cluster secret from this file (not visible in ps)");
  flags.Add("cluster-host", &o.cluster.cluster_host,
            "address the Cluster service listens on; empty: --host");
  flags.Add("cluster-port", &o.cluster.cluster_port,
            "port of the Cluster service workers join; 0: OS picks (printed)");
  flags.Add("min-ranks", &o.cluster.min_ranks,
            "ranks (processes, this leader included) before the daemon reports SERVING");
  flags.Add("max-ranks", &o.cluster.max_ranks, "most ranks in the group; 0: unlimited");
  flags.Add("local-ranks", &o.cluster.local_ranks,
            "a fixed group of ranks as threads of this process (tests, one host)");
  flags.Add("rank-host", &o.cluster.rank_host,
            "address this rank announces to the other ranks; empty: --host when it is one "
            "address, else the address of this machine's host name");
  flags.Add("transport", &o.cluster.transport,
            "how rank processes exchange tokens: tcp (sockets, the calling thread does the I/O) "
            "or gloo; workers use the leader's");
  flags.Add("two-batch-overlap", &o.cluster.two_batch_overlap,
            "split each step of a rank group in two micro-batches: one's all-to-all runs "
            "while the other computes its attention, the experts run once over both; workers "
            "use the leader's (off by default: on CPU rank groups it measured no faster, "
            "parallel/NOTES.md)");
  flags.Add("collective-timeout-ms", &o.cluster.collective_timeout_ms,
            "a rank that does not answer a collective within this fails its epoch (the group "
            "re-forms without it)");
  flags.Add("heartbeat-interval-ms", &o.cluster.heartbeat_interval_ms,
            "how often workers tell the leader they live");
  flags.Add("heartbeat-timeout-ms", &o.cluster.heartbeat_timeout_ms,
            "after a failure, a rank silent this long is declared dead (fenced)");
  flags.Add("rank-wait-timeout", &o.cluster.rank_wait_timeout_s,
            "seconds to wait for --min-ranks ranks before giving up");
  flags.Add("rank-join-timeout", &o.cluster.join_timeout_s,
            "seconds a joining rank has to connect to the group; 0: the collective time-out "
            "(at least 10 s)");
  flags.Add("scale-policy", &o.cluster.scale_policy,
            "placement planner when ranks join or drain (ilp, greedy, repair, ...); failures use "
            "repair");
  flags.Add("scale-time-limit", &o.cluster.scale_time_limit_s,
            "seconds the scale planner may spend per layer");
  flags.Add("expert-slots-per-rank", &o.cluster.expert_slots_per_rank,
            "expert slots per rank and MoE layer (0: ceil(experts / ranks)); extra slots start "
            "empty and let a rebalance replicate hot experts");
  AddAdminFlags(flags, &o.admin);
  flags.MarkSecret("secret", "secret-file");
  flags.MarkSecret("admin-token", "admin-token-file");
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  absl::Status s;
  if (auto b = BackendForDevice(device, o.backend); b.ok()) {
    o.backend = *b;
  } else {
    std::fprintf(stderr, "serve: %s\n", b.status().ToString().c_str());
    return 2;
  }

  // SIGTERM / SIGINT write to a pipe; one waiting thread reads it and drains. (A handler, not
  // sigwait: libraries may start threads before main that would take the default action.)
  if (pipe(g_signal_pipe) != 0) {
    std::perror("serve: pipe");
    return 1;
  }
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  auto daemon = Daemon::Start(o);
  if (!daemon.ok()) {
    std::fprintf(stderr, "serve: %s\n", daemon.status().ToString().c_str());
    return 1;
  }
  Daemon* d = daemon->get();
  std::printf("listening on %s:%d\n", o.host.c_str(), d->port());
  if (d->metrics_port() >= 0)
    std::printf("metrics on http://%s:%d/metrics\n",
                (o.metrics_host.empty() ? o.host : o.metrics_host).c_str(), d->metrics_port());
  std::fflush(stdout);

  std::atomic<int> signal_seen{0};
  std::thread waiter([&] {
    unsigned char sig = 0;
    while (read(g_signal_pipe[0], &sig, 1) < 0 && errno == EINTR) {
    }
    signal_seen = sig == 0 ? -1 : sig;
    if (sig != 0)
      std::fprintf(stderr, "serve: signal %d: draining (health NOT_SERVING, running requests finish)\n", sig);
    d->Drain();
  });

  ProgressLine line;
  absl::Status loaded = d->Load([&](const std::string& msg) {
    if (msg.rfind("cluster service on ", 0) == 0) {  // workers need the port: stdout too
      std::printf("%s\n", msg.c_str());
      std::fflush(stdout);
    }
    if (msg.rfind("loaded ", 0) == 0) {
      line.Stop();
      std::fprintf(stderr, "%s\n", msg.c_str());
    } else {
      line.Start(msg);
    }
  });
  line.Stop();
  if (!loaded.ok() && signal_seen.load() == 0) {
    std::fprintf(stderr, "serve: %s\n", loaded.ToString().c_str());
    const unsigned char stop = 0;
    if (write(g_signal_pipe[1], &stop, 1) != 1) std::perror("serve: write");
    waiter.join();
    return 1;
  }
  if (loaded.ok()) {
    std::printf("serving on %s:%d\n", o.host.c_str(), d->port());
    std::fflush(stdout);
  }
  waiter.join();
  std::fprintf(stderr, "serve: drained, bye\n");
  return 0;
}

}  // namespace sy::server
