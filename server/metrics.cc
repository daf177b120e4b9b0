#include "server/metrics.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"
#include "prometheus/text_serializer.h"

namespace sy::server {
namespace {

// Latency buckets from 1 ms to 60 s, about 2.5x apart (vLLM uses similar ranges).
const prometheus::Histogram::BucketBoundaries kLatency = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0,   2.5,    5.0,   7.5,  10.0,  20.0, 40.0,  60.0};
const prometheus::Histogram::BucketBoundaries kRequestLatency = {
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0};

std::string CodeName(absl::StatusCode code) {
  std::string s = absl::StatusCodeToString(code);  // "INVALID_ARGUMENT"
  return s.empty() ? absl::StrCat(static_cast<int>(code)) : s;
}

prometheus::MetricFamily Gauge(const std::string& name, const std::string& help, double v) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = prometheus::MetricType::Gauge;
  prometheus::ClientMetric m;
  m.gauge.value = v;
  f.metric.push_back(m);
  return f;
}

prometheus::MetricFamily Counter(const std::string& name, const std::string& help, double v) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = prometheus::MetricType::Counter;
  prometheus::ClientMetric m;
  m.counter.value = v;
  f.metric.push_back(m);
  return f;
}

}  // namespace

class ServerMetrics::EngineGauges : public prometheus::Collectable {
 public:
  explicit EngineGauges(const std::atomic<const scheduler::Engine*>* engine) : engine_(engine) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    scheduler::EngineStats s;
    if (const scheduler::Engine* e = engine_->load()) s = e->stats();
    const double usage = s.kv_blocks_total > 0
                             ? 1.0 - static_cast<double>(s.kv_blocks_free) / s.kv_blocks_total
                             : 0.0;
    return {Gauge("switchyard_requests_running", "Requests in the running batch.", s.running),
            Gauge("switchyard_requests_waiting", "Requests queued, not yet running.", s.waiting),
            Gauge("switchyard_kv_cache_usage_ratio", "Share of KV cache blocks in use (0-1).",
                  usage),
            Gauge("switchyard_kv_cache_blocks_free", "Free KV cache blocks.", s.kv_blocks_free),
            Gauge("switchyard_kv_cache_blocks_total",
                  "All KV cache blocks (every rank's pool).", s.kv_blocks_total),
            Counter("switchyard_requests_recovered_total",
                    "Sequences prefilled again on another rank after their rank died.",
                    static_cast<double>(s.recovered))};
  }

 private:
  const std::atomic<const scheduler::Engine*>* engine_;
};

ServerMetrics::ServerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      gauges_(std::make_shared<EngineGauges>(&engine_)) {
  auto& r = *registry_;
  ttft_ = &prometheus::BuildHistogram()
               .Name("switchyard_time_to_first_token_seconds")
               .Help("Time from arrival to the first generated token.")
               .Register(r)
               .Add({}, kLatency);
  itl_ = &prometheus::BuildHistogram()
              .Name("switchyard_inter_token_latency_seconds")
              .Help("Time between two consecutive tokens of one request.")
              .Register(r)
              .Add({}, kLatency);
  e2e_ = &prometheus::BuildHistogram()
              .Name("switchyard_e2e_request_latency_seconds")
              .Help("Time from arrival to the end of a request.")
              .Register(r)
              .Add({}, kRequestLatency);
  queue_ = &prometheus::BuildHistogram()
                .Name("switchyard_request_queue_seconds")
                .Help("Time from arrival to first being scheduled.")
                .Register(r)
                .Add({}, kLatency);
  step_ = &prometheus::BuildHistogram()
               .Name("switchyard_step_seconds")
               .Help("Duration of one engine step (schedule, forward, sample, postprocess).")
               .Register(r);
  auth_failures_ = &prometheus::BuildCounter()
                        .Name("switchyard_auth_failures_total")
                        .Help("Calls refused for a missing or wrong API key, admin token or "
                              "cluster signature, by service.")
                        .Register(r);
  for (const char* s : {"inference", "admin", "cluster"}) auth_failures_->Add({{"service", s}});
  step_prefill_ = &step_->Add({{"phase", "prefill"}}, kLatency);
  step_decode_ = &step_->Add({{"phase", "decode"}}, kLatency);
  step_mixed_ = &step_->Add({{"phase", "mixed"}}, kLatency);
  prompt_tokens_ = &prometheus::BuildCounter()
                        .Name("switchyard_prompt_tokens_total")
                        .Help("Prompt tokens of finished requests.")
                        .Register(r)
                        .Add({});
  generation_tokens_ = &prometheus::BuildCounter()
                            .Name("switchyard_generation_tokens_total")
                            .Help("Tokens generated.")
                            .Register(r)
                            .Add({});
  preemptions_ = &prometheus::BuildCounter()
                      .Name("switchyard_preemptions_total")
                      .Help("Sequences preempted (KV blocks freed, recomputed later).")
                      .Register(r)
                      .Add({});
  success_ = &prometheus::BuildCounter()
                  .Name("switchyard_request_success_total")
                  .Help("Requests that finished normally, by finish reason.")
                  .Register(r);
  for (const char* reason : {"stop", "length", "abort"}) success_->Add({{"finish_reason", reason}});
  failed_ = &prometheus::BuildCounter()
                 .Name("switchyard_requests_failed_total")
                 .Help("Calls that ended with a gRPC error, by status code.")
                 .Register(r);
  // The codes a serving daemon gives, at zero from the start (a rate() needs the zero); others
  // appear when they first occur.
  for (absl::StatusCode c :
       {absl::StatusCode::kInvalidArgument, absl::StatusCode::kResourceExhausted,
        absl::StatusCode::kUnavailable, absl::StatusCode::kDeadlineExceeded,
        absl::StatusCode::kCancelled, absl::StatusCode::kUnauthenticated,
        absl::StatusCode::kAborted, absl::StatusCode::kInternal})
    failed_->Add({{"code", CodeName(c)}});
}

ServerMetrics::~ServerMetrics() { exposer_.reset(); }

absl::Status ServerMetrics::StartExposer(const std::string& host, int port) {
  MetricsHttpOptions o;
  o.host = host;
  o.port = port;
  auto server = MetricsHttpServer::Start(o, {registry_, gauges_});
  if (!server.ok()) return server.status();
  exposer_ = std::move(*server);
  port_ = exposer_->port();
  return absl::OkStatus();
}

std::function<void()> ServerMetrics::AuthFailureCounter(const std::string& service) {
  prometheus::Counter* c = &auth_failures_->Add({{"service", service}});
  return [c] { c->Increment(); };
}

void ServerMetrics::RequestFailed(absl::StatusCode code) {
  failed_->Add({{"code", CodeName(code)}}).Increment();
}

void ServerMetrics::OnStep(const scheduler::StepStats& step) {
  prometheus::Histogram* h = step.num_prefill_tokens == 0  ? step_decode_
                             : step.num_decode_tokens == 0 ? step_prefill_
                                                           : step_mixed_;
  h->Observe(step.seconds);
  generation_tokens_->Increment(static_cast<double>(step.num_generated));
  if (step.num_preempted > 0) preemptions_->Increment(static_cast<double>(step.num_preempted));
}

void ServerMetrics::OnFirstToken(double ttft_seconds) { ttft_->Observe(ttft_seconds); }
void ServerMetrics::OnTokenGap(double seconds) { itl_->Observe(seconds); }

void ServerMetrics::OnRequestDone(const scheduler::RequestStats& r) {
  prompt_tokens_->Increment(static_cast<double>(r.prompt_tokens));
  e2e_->Observe(r.e2e_seconds);
  queue_->Observe(r.queue_seconds);
  // Every request the engine ends is counted here by finish reason (an aborted one is also
  // counted in requests_failed_total by its status code).
  success_->Add({{"finish_reason", scheduler::FinishReasonName(r.finish_reason)}}).Increment();
}

std::string ServerMetrics::Scrape() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  std::vector<prometheus::MetricFamily> g = gauges_->Collect();
  families.insert(families.end(), g.begin(), g.end());
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace sy::server
