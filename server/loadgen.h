// Loadgen: the load generator behind `switchyard loadgen`, and its report — the figures vLLM's
// serving benchmark prints (request and token throughput; time to first token, time per
// output token, inter-token latency and end-to-end latency at mean/p50/p90/p99; errors by
// gRPC code).
//
// Closed loop (`concurrency` streams, each sending its next request when the last ends) or
// open loop (`rate` requests/s with Poisson arrivals, at most `concurrency` in flight).
// Prompts are random token ids (seeded); every request asks for exactly max_new_tokens tokens
// (ignore_eos), greedy. Thread safety: RunLoadgen is self-contained (its own threads).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/tls.h"

namespace sy::server {

struct LoadgenOptions {
  std::string addr = "127.0.0.1:50051";
  TlsClientOptions tls;
  std::string api_key;  // sent as "authorization: Bearer KEY" when set
  int concurrency = 8;
  int requests = 64;
  int prompt_len = 32;
  int max_new_tokens = 64;
  double rate = 0;          // requests/s; 0 = closed loop
  uint64_t seed = 0;
  double wait_ready_s = 60;  // wait for health SERVING first
  double timeout_s = 600;    // per-request deadline
};

struct LatencySummary {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;  // seconds
  int64_t count = 0;
};
// Percentiles by linear interpolation between closest ranks (numpy's default).
LatencySummary Summarize(std::vector<double> values);

struct LoadgenReport {
  int64_t requests_ok = 0;
  int64_t requests_failed = 0;
  std::map<std::string, int64_t> errors;  // gRPC code name -> count
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;
  double duration_s = 0;
  double request_throughput = 0;  // requests/s
  double output_throughput = 0;   // output tokens/s
  double total_throughput = 0;    // (prompt + output) tokens/s
  // Decode throughput while every stream of the first wave is generating: from the moment the
  // last of the first `concurrency` requests got its first token to the moment the first of
  // them finished; output tokens in that window / its length. With concurrency C this is the
  // server's batch-C decode rate, comparable with the engine benchmark's (bench/model_bench).
  double steady_decode_throughput = 0;
  double steady_window_s = 0;
  LatencySummary ttft, tpot, itl, e2e;
  std::string Table() const;
};

absl::StatusOr<LoadgenReport> RunLoadgen(const LoadgenOptions& options);

}  // namespace sy::server
