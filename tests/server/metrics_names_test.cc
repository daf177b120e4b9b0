// The request metrics of DESIGN.md §7: each family's name, type and label values as a scrape
// shows them before any request (dashboards and alerts are written against these).
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/metrics.h"

namespace sy::server {
namespace {

TEST(MetricsNamesTest, EveryRequestFamilyIsExportedWithItsTypeAndLabels) {
  ServerMetrics m;
  const std::string text = m.Scrape();
  const std::vector<std::pair<std::string, std::string>> families = {
      {"switchyard_requests_running", "gauge"},
      {"switchyard_requests_waiting", "gauge"},
      {"switchyard_kv_cache_usage_ratio", "gauge"},
      {"switchyard_kv_cache_blocks_free", "gauge"},
      {"switchyard_kv_cache_blocks_total", "gauge"},
      {"switchyard_time_to_first_token_seconds", "histogram"},
      {"switchyard_inter_token_latency_seconds", "histogram"},
      {"switchyard_e2e_request_latency_seconds", "histogram"},
      {"switchyard_request_queue_seconds", "histogram"},
      {"switchyard_step_seconds", "histogram"},
      {"switchyard_prompt_tokens_total", "counter"},
      {"switchyard_generation_tokens_total", "counter"},
      {"switchyard_preemptions_total", "counter"},
      {"switchyard_request_success_total", "counter"},
      {"switchyard_requests_failed_total", "counter"},
      {"switchyard_requests_recovered_total", "counter"},
      {"switchyard_auth_failures_total", "counter"},
  };
  for (const auto& [name, type] : families)
    EXPECT_NE(text.find("# TYPE " + name + " " + type + "\n"), std::string::npos) << name;
  // Label values present from the start (a rate() over them needs the zero).
  for (const char* series :
       {"switchyard_request_success_total{finish_reason=\"stop\"} 0",
        "switchyard_request_success_total{finish_reason=\"length\"} 0",
        "switchyard_request_success_total{finish_reason=\"abort\"} 0",
        "switchyard_step_seconds_count{phase=\"prefill\"} 0",
        "switchyard_step_seconds_count{phase=\"decode\"} 0",
        "switchyard_step_seconds_count{phase=\"mixed\"} 0",
        "switchyard_auth_failures_total{service=\"inference\"} 0",
        "switchyard_auth_failures_total{service=\"admin\"} 0",
        "switchyard_auth_failures_total{service=\"cluster\"} 0",
        "switchyard_requests_failed_total{code=\"INVALID_ARGUMENT\"} 0",
        "switchyard_requests_failed_total{code=\"UNAVAILABLE\"} 0"})
    EXPECT_NE(text.find(series), std::string::npos) << series;
  // A failure is counted under its canonical code name.
  m.RequestFailed(absl::StatusCode::kResourceExhausted);
  EXPECT_NE(m.Scrape().find("switchyard_requests_failed_total{code=\"RESOURCE_EXHAUSTED\"} 1"),
            std::string::npos);
  m.AuthFailureCounter("admin")();
  EXPECT_NE(m.Scrape().find("switchyard_auth_failures_total{service=\"admin\"} 1"),
            std::string::npos);
}

}  // namespace
}  // namespace sy::server
