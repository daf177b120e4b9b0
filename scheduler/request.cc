#include "scheduler/request.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace sy::scheduler {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
    case FinishReason::kNone: break;
  }
  return "none";
}

absl::Status ValidateRequest(const Request& request, const ModelLimits& limits) {
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  if (n == 0) return absl::InvalidArgumentError("prompt: empty (no tokens)");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = request.prompt[i];
    if (id < 0 || id >= limits.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token_ids[", i, "]: ", id,
                                                     " is outside the vocabulary [0, ",
                                                     limits.vocab_size, ")"));
  }
  if (n >= limits.context_length)
    return absl::InvalidArgumentError(absl::StrCat("prompt: ", n,
                                                   " tokens leave no room in the context of ",
                                                   limits.context_length, " tokens"));
  const GenerationParams& p = request.params;
  if (p.max_new_tokens <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.max_new_tokens: ", p.max_new_tokens, " must be at least 1"));
  if (n + p.max_new_tokens > limits.context_length)
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling.max_new_tokens: ", p.max_new_tokens, " plus the prompt's ", n,
        " tokens exceed the context of ", limits.context_length, " tokens"));
  const float t = p.sampling.temperature;
  if (std::isnan(t) || std::isinf(t) || t < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.temperature: ", t, " must be a finite number >= 0"));
  const float top_p = p.sampling.top_p;
  if (std::isnan(top_p) || !(top_p > 0.f && top_p <= 1.f))
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p: ", top_p, " must be in (0, 1]"));
  if (p.sampling.top_k < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_k: ", p.sampling.top_k, " must be >= 0 (0 = all tokens)"));
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i) {
    const int32_t id = p.stop_token_ids[i];
    if (id < 0 || id >= limits.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop_token_ids[", i, "]: ", id,
                                                     " is outside the vocabulary"));
  }
  for (size_t i = 0; i < p.stop_strings.size(); ++i) {
    const std::string& s = p.stop_strings[i];
    if (s.empty())
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop[", i, "]: empty"));
    // A token is at least one byte, so a stop string longer (in bytes) than the context can
    // never match within it.
    if (static_cast<int64_t>(s.size()) > limits.context_length)
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop[", i, "]: ", s.size(),
                                                     " bytes is longer than the context of ",
                                                     limits.context_length, " tokens"));
  }
  return absl::OkStatus();
}

}  // namespace sy::scheduler
