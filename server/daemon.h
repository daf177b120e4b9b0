// Daemon: one `switchyard serve` process — the gRPC server (Inference, grpc.health.v1.Health,
// reflection), the Prometheus exposer, the model, the engine — and its life cycle:
//
//   Start()  : gRPC and /metrics listen at once; health is NOT_SERVING.
//   Load()   : load the model (or make the demo model), start the engine; health SERVING.
//   Drain()  : health NOT_SERVING, refuse new requests (UNAVAILABLE), let running and queued
//              requests finish (up to drain_timeout), abort the rest, stop the server.
//
// Used by cmd_serve.cc and by the in-process server tests.
// Thread safety: Start, Load and Drain are called from one controlling thread, in order;
// Drain may also come from a signal-waiting thread while Load runs (it then waits for Load).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/server.h"
#include "kernels/core/mutex.h"
#include "model/moe_model.h"
#include "model/tokenizer.h"
#include "scheduler/engine.h"
#include "server/cluster_leader.h"
#include "server/tls.h"
#include "server/inference_service.h"
#include "server/admin_service.h"
#include "server/live_placement.h"
#include "server/metrics.h"

namespace sy::server {

struct ServeOptions {
  std::string model;                 // checkpoint folder; "" or "demo": the built-in demo model
  std::string host = "0.0.0.0";
  int port = 50051;                  // 0: the OS picks (see Daemon::port())
  int metrics_port = 9400;           // 0: the OS picks; -1: no /metrics endpoint
  std::string metrics_host;          // "": --host
  std::string backend = "auto";
  int threads = 0;                   // compute threads; 0 = SWITCHYARD_THREADS or all cores
  int64_t kv_cache_bytes = 512ll << 20;
  int64_t block_size = 16;
  int64_t max_num_seqs = 64;
  int64_t max_num_batched_tokens = 512;
  int64_t max_queue = 256;
  int64_t default_max_new_tokens = 256;
  int64_t max_message_bytes = 4 << 20;  // larger requests get RESOURCE_EXHAUSTED
  double drain_timeout_s = 30;
  TlsServerOptions tls;              // the public port (Inference, Admin, health); plaintext when unset
  std::string api_key_file;          // keys Inference calls must bear (secrets.h ReadKeys); "": none
  ClusterOptions cluster;            // more than one rank (server/cluster_leader.h)
  AdminOptions admin;                // Admin service, load statistics, rebalancing (live_placement.h)
};

class Daemon {
 public:
  // Listens; the model is not loaded yet.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const ServeOptions& options);
  ~Daemon();

  // `progress` gets human-readable lines (may be null).
  absl::Status Load(const std::function<void(const std::string&)>& progress = nullptr);
  void Drain();

  int port() const { return port_; }
  int metrics_port() const { return metrics_ ? metrics_->port() : -1; }
  ServerMetrics& metrics() { return *metrics_; }
  scheduler::Engine* engine() { return engine_.get(); }
  LivePlacement* live_placement() { return live_.get(); }
  const std::string& model_dir() const { return model_dir_; }

 private:
  explicit Daemon(const ServeOptions& options);
  void SetHealth(bool serving);

  ServeOptions options_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<InferenceService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string model_dir_;
  std::unique_ptr<model::MoeModel> model_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  std::unique_ptr<ClusterLeader> cluster_;  // multi-rank only; outlives the engine
  std::unique_ptr<scheduler::Engine> engine_;
  std::unique_ptr<AdminService> admin_;
  std::unique_ptr<LivePlacement> live_;  // after engine_: destroyed before it
  sy::Mutex drain_mu_;  // Drain waits for a Load in progress, and runs once
  bool drained_ ABSL_GUARDED_BY(drain_mu_) = false;
  std::atomic<bool> cancel_load_{false};  // Drain during Load: stop waiting for ranks
};

// Resolves --model: "" and "demo" make (once) and return the demo checkpoint's folder.
absl::StatusOr<std::string> ResolveModelDir(const std::string& model,
                                            const std::function<void(const std::string&)>& progress);

}  // namespace sy::server
