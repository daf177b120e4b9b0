// ServerMetrics: the request and step metrics of DESIGN.md §7 in Prometheus text format,
// served at http://HOST:PORT/metrics by MetricsHttpServer (server/metrics_http.h).
//
// The engine reports through the EngineObserver interface (engine thread); gRPC threads
// count failed calls; gauges (running, waiting, KV usage) are read from Engine::stats() at
// scrape time, so they are right even when no step runs. Names:
//   switchyard_requests_running, _requests_waiting, _kv_cache_usage_ratio (gauges)
//   switchyard_time_to_first_token_seconds, _inter_token_latency_seconds,
//   _e2e_request_latency_seconds, _request_queue_seconds, _step_seconds{phase} (histograms)
//   switchyard_prompt_tokens_total (at finish), _generation_tokens_total,
//   _request_success_total{finish_reason}, _requests_failed_total{code},
//   _preemptions_total (counters), switchyard_requests_recovered_total (read from the
//   engine at scrape time: sequences prefilled again after their rank died)
// Thread safety: every method is safe from any thread (prometheus-cpp metrics are atomic).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "scheduler/engine.h"
#include "server/metrics_http.h"

namespace sy::server {

class ServerMetrics : public scheduler::EngineObserver {
 public:
  ServerMetrics();
  ~ServerMetrics() override;

  // Serves /metrics on host:port (port 0: the OS picks; see port()).
  absl::Status StartExposer(const std::string& host, int port);
  int port() const { return port_; }

  // The engine whose gauges are read at scrape time (null: zero). Not owned.
  void SetEngine(const scheduler::Engine* engine) { engine_.store(engine); }
  // A call that ended with a non-OK status (validation, queue full, abort...).
  void RequestFailed(absl::StatusCode code);
  // What counts one failed authentication of `service` ("inference", "admin", "cluster") in
  // switchyard_auth_failures_total{service}; thread-safe.
  std::function<void()> AuthFailureCounter(const std::string& service);

  // EngineObserver (engine thread).
  void OnStep(const scheduler::StepStats& step) override;
  void OnFirstToken(double ttft_seconds) override;
  void OnTokenGap(double seconds) override;
  void OnRequestDone(const scheduler::RequestStats& request) override;

  // The registry behind /metrics, for other units' metrics (server/cluster_leader.h).
  prometheus::Registry& registry() { return *registry_; }

  // The text a scrape returns (tests, `switchyard serve` without an exposer).
  std::string Scrape() const;

 private:
  class EngineGauges;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<EngineGauges> gauges_;
  std::unique_ptr<MetricsHttpServer> exposer_;
  int port_ = -1;  // -1 until StartExposer
  std::atomic<const scheduler::Engine*> engine_{nullptr};

  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_;
  prometheus::Family<prometheus::Histogram>* step_;
  prometheus::Family<prometheus::Counter>* auth_failures_;
  prometheus::Histogram* step_prefill_;
  prometheus::Histogram* step_decode_;
  prometheus::Histogram* step_mixed_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* preemptions_;
  prometheus::Family<prometheus::Counter>* success_;
  prometheus::Family<prometheus::Counter>* failed_;
};

}  // namespace sy::server
