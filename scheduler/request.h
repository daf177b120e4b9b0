// Request: what a client asked for, as the engine sees it (token ids, generation parameters,
// timing, where the output goes), plus the validation every request passes before it is queued.
//
// Created by server/ (one per Generate call) and handed to Engine::Submit; from then on the
// engine thread owns it. RequestSink is the way back: the engine thread calls it, the server
// implements it without blocking (a queue and one gRPC write in flight).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model/sampler.h"

namespace sy::scheduler {

using Clock = std::chrono::steady_clock;

enum class FinishReason { kNone, kStop, kLength, kAbort };
const char* FinishReasonName(FinishReason reason);  // "stop", "length", "abort"

struct GenerationParams {
  model::SamplingParams sampling;  // temperature 0 = greedy
  int64_t max_new_tokens = 16;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;
  bool ignore_eos = false;
};

// The final result of a request; `status` is OK unless the engine failed it (model error,
// shutdown, deadline: then finish_reason is kAbort).
struct Completion {
  std::string request_id;
  std::vector<int32_t> output_ids;
  std::string text;
  FinishReason finish_reason = FinishReason::kNone;
  int64_t prompt_tokens = 0;
  absl::Status status;
};

// Called by the engine thread only; implementations must not block.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  // New tokens of one step and the text that became final with them (may be empty).
  virtual void OnTokens(std::span<const int32_t> ids, const std::string& text) = 0;
  // Exactly once, last.
  virtual void OnFinish(const Completion& completion) = 0;
  // Polled at every step boundary; true once the client has gone away.
  virtual bool IsCancelled() const = 0;
};

struct Request {
  std::string id;
  std::vector<int32_t> prompt;
  GenerationParams params;
  Clock::time_point arrival = Clock::now();
  Clock::time_point deadline = Clock::time_point::max();
  std::shared_ptr<RequestSink> sink;
};

// What validation checks a request against.
struct ModelLimits {
  int64_t vocab_size = 0;
  int64_t context_length = 0;  // prompt + max_new_tokens must fit
};

// InvalidArgument naming the offending field (prompt, prompt[i], max_new_tokens,
// sampling.temperature, sampling.top_p, sampling.top_k, stop, stop_token_ids) for input the
// model cannot serve. Field names are those of switchyard.v1.GenerateRequest.
absl::Status ValidateRequest(const Request& request, const ModelLimits& limits);

}  // namespace sy::scheduler
